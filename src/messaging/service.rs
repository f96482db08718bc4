//! The conversation rules: who may do what, what is valid, idempotent retries, paging, and live
//! subscriptions that resume without gaps. Storage atomicity is the store's job; everything a
//! caller can get wrong is checked here first.

use std::sync::Arc;

use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use super::{
    live::LiveHub,
    model::{
        ClientId, Conversation, Event, EventKind, FileAttachment, MAX_PARTICIPANTS, MAX_TEXT_CHARS,
        MAX_TITLE_CHARS, Message, MessageContent, MessageKind, MessageRecord, UnixMillis,
    },
    paging::{self, PageSize},
    subscription,
};
use crate::{
    auth::Caller,
    config::MessagingSettings,
    error::{Error, ErrorKind, Reason, Result},
    ids::{ConversationId, FileId, MessageId, UserId},
    quota::PerCallerSlots,
    store::file_records::FileRecordStore,
    store::messages::{
        ActivityCursor, AppendOutcome, ChangeOutcome, CreateOutcome, CreateRequest, DeleteOutcome,
        MessageStore, NewConversation, NewMessage, ReadOutcome, ReadState, Rejection, StoreError,
    },
};

/// Most user ids one CreateConversation / AddParticipants request may name.
pub const MAX_USERS_PER_REQUEST: usize = 100;

/// A conversation as one participant sees it.
#[derive(Debug, Clone)]
pub struct ConversationView {
    pub conversation: Conversation,
    pub unread_count: u64,
    pub last_message: Option<Message>,
}

/// What SendMessage posts.
#[derive(Debug, Clone)]
pub enum SendContent {
    Text(String),
    FileId(FileId),
}

/// Conversations, messages and subscriptions over a [`MessageStore`].
pub struct ConversationService {
    store: Arc<dyn MessageStore>,
    file_records: Arc<dyn FileRecordStore>,
    hub: Arc<LiveHub>,
    subscriptions: PerCallerSlots,
    settings: MessagingSettings,
}

impl ConversationService {
    /// Builds the service and starts routing the store's live feed to local subscribers.
    /// `file_records` resolves the `file_id` of SendMessage.
    pub fn new(
        store: Arc<dyn MessageStore>,
        file_records: Arc<dyn FileRecordStore>,
        settings: MessagingSettings,
    ) -> Self {
        let hub = LiveHub::new();
        hub.spawn_dispatcher(store.live_events());
        Self {
            store,
            file_records,
            hub,
            subscriptions: PerCallerSlots::new(settings.max_subscriptions_per_caller),
            settings,
        }
    }

    /// The conversation, if it exists and `caller` participates (for other domains' checks).
    pub async fn conversation_of_participant(
        &self,
        caller: &Caller,
        id: ConversationId,
    ) -> Result<Conversation> {
        self.participating(caller, id).await
    }

    /// A message of a conversation `caller` participates in (a completed upload's
    /// announcement, found again for a retry).
    pub async fn message_of_participant(
        &self,
        caller: &Caller,
        id: ConversationId,
        message_id: MessageId,
    ) -> Result<Message> {
        self.participating(caller, id).await?;
        self.store
            .message(id, message_id)
            .await?
            .ok_or_else(|| Error::not_found(Reason::MessageNotFound, "message not found"))
    }

    /// Posts the FILE or IMAGE message announcing an upload, under a message id chosen by the
    /// caller (so the file record can name it before it is posted).
    pub async fn post_file(
        &self,
        caller: &Caller,
        id: ConversationId,
        message_id: MessageId,
        attachment: FileAttachment,
        caption: String,
    ) -> Result<Message> {
        let kind = MessageKind::for_file(attachment.category);
        let client_message_id =
            ClientId::from_field("client_message_id", &format!("file:{}", attachment.file_id))?;
        let fingerprint = fingerprint(&["file", attachment.file_id.as_str(), &caption]);
        let new = NewMessage {
            conversation_id: id,
            record: MessageRecord {
                id: message_id,
                sender: caller.user_id.clone(),
                kind,
                client_message_id,
                content: Some(MessageContent {
                    text: caption,
                    file: Some(attachment),
                }),
            },
            fingerprint,
            idempotency_window_secs: self.settings.idempotency_window.as_secs(),
        };
        match self.store.append_message(new).await? {
            AppendOutcome::Appended(message) => Ok(message),
            AppendOutcome::Duplicate { message, .. } => Ok(message),
        }
    }

    pub async fn create_conversation(
        &self,
        caller: &Caller,
        title: &str,
        others: Vec<UserId>,
        request_id: Option<ClientId>,
    ) -> Result<ConversationView> {
        let title = title.trim();
        if title.chars().count() > MAX_TITLE_CHARS {
            return Err(Error::invalid_field(
                "title",
                format!("title must be at most {MAX_TITLE_CHARS} characters"),
            ));
        }
        let mut participants = vec![caller.user_id.clone()];
        participants.extend(others.into_iter().filter(|user| *user != caller.user_id));
        // Ids are random, never derived from (user, request_id): nobody can compute another
        // user's conversation ids. The store remembers which one a request_id created.
        let request = request_id.map(|request_id| CreateRequest {
            request_id,
            window: self.settings.idempotency_window,
        });
        let mut sorted: Vec<&str> = participants.iter().map(UserId::as_str).collect();
        sorted.sort_unstable();
        let fingerprint = fingerprint(&[title, &sorted.join("\u{0}")]);
        let new = NewConversation {
            id: ConversationId::generate(),
            title: title.to_owned(),
            participants,
            created_by: caller.user_id.clone(),
            fingerprint: fingerprint.clone(),
            request,
        };
        let conversation = match self.store.create_conversation(new).await? {
            CreateOutcome::Created(conversation) => conversation,
            CreateOutcome::Existing {
                conversation,
                fingerprint: existing,
            } => {
                if existing != fingerprint {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        Reason::RequestIdReused,
                        "request_id was already used for a different conversation",
                    )
                    .with_field("request_id"));
                }
                // A replay answers with the conversation as it is now: only to a participant,
                // like every read (the creator may have left since).
                if !conversation.has_participant(&caller.user_id) {
                    return Err(Error::permission_denied(
                        Reason::NotAParticipant,
                        "request_id created a conversation you no longer participate in",
                    ));
                }
                conversation
            }
        };
        self.view(conversation, &caller.user_id).await
    }

    pub async fn get_conversation(
        &self,
        caller: &Caller,
        id: ConversationId,
    ) -> Result<ConversationView> {
        let conversation = self.participating(caller, id).await?;
        self.view(conversation, &caller.user_id).await
    }

    pub async fn list_conversations(
        &self,
        caller: &Caller,
        size: PageSize,
        page_token: &str,
    ) -> Result<(Vec<ConversationView>, String)> {
        let cursor = paging::decode_conversations_token(page_token)?;
        let entries = self
            .store
            .conversations_of(&caller.user_id, cursor.as_ref(), size.get() + 1)
            .await?;
        let has_more = entries.len() > size.get();
        let last_cursor = entries[..entries.len().min(size.get())]
            .last()
            .map(|entry| ActivityCursor {
                activity: entry.activity,
                conversation_id: entry.conversation.id,
            });
        // All of a page's read states at once (at most a page size of them): one round trip's
        // wait rather than one per conversation.
        let views = futures::future::try_join_all(
            entries
                .into_iter()
                .take(size.get())
                .map(|entry| self.view(entry.conversation, &caller.user_id)),
        )
        .await?;
        let next = match (has_more, last_cursor) {
            (true, Some(cursor)) => paging::encode_conversations_token(&cursor),
            _ => String::new(),
        };
        Ok((views, next))
    }

    pub async fn add_participants(
        &self,
        caller: &Caller,
        id: ConversationId,
        users: &[UserId],
    ) -> Result<ConversationView> {
        let outcome = self
            .store
            .add_participants(id, &caller.user_id, users)
            .await?;
        let conversation = match outcome {
            ChangeOutcome::Changed(conversation, _) | ChangeOutcome::Unchanged(conversation) => {
                conversation
            }
        };
        self.view(conversation, &caller.user_id).await
    }

    pub async fn remove_participant(
        &self,
        caller: &Caller,
        id: ConversationId,
        user: &UserId,
    ) -> Result<ConversationView> {
        let outcome = self
            .store
            .remove_participant(id, &caller.user_id, user)
            .await?;
        let conversation = match outcome {
            ChangeOutcome::Changed(conversation, _) | ChangeOutcome::Unchanged(conversation) => {
                conversation
            }
        };
        Ok(ConversationView {
            conversation,
            unread_count: 0,
            last_message: None,
        })
    }

    pub async fn send_message(
        &self,
        caller: &Caller,
        id: ConversationId,
        client_message_id: ClientId,
        content: Option<SendContent>,
    ) -> Result<Message> {
        let (kind, content, fingerprint) = match content {
            Some(SendContent::Text(text)) => {
                let text = validate_text(&text)?;
                let fingerprint = fingerprint(&["text", &text]);
                (
                    MessageKind::Text,
                    MessageContent { text, file: None },
                    fingerprint,
                )
            }
            Some(SendContent::FileId(file_id)) => {
                // Participation first, so outsiders learn nothing about the conversation's files.
                self.participating(caller, id).await?;
                let attachment = self.attachment(id, &file_id).await?;
                let kind = MessageKind::for_file(attachment.category);
                let fingerprint = fingerprint(&["file", file_id.as_str()]);
                let content = MessageContent {
                    text: String::new(),
                    file: Some(attachment),
                };
                (kind, content, fingerprint)
            }
            None => {
                return Err(Error::invalid_field(
                    "content",
                    "text or file_id is required",
                ));
            }
        };
        let new = NewMessage {
            conversation_id: id,
            record: MessageRecord {
                id: MessageId::generate(),
                sender: caller.user_id.clone(),
                kind,
                client_message_id,
                content: Some(content),
            },
            fingerprint: fingerprint.clone(),
            idempotency_window_secs: self.settings.idempotency_window.as_secs(),
        };
        match self.store.append_message(new).await? {
            AppendOutcome::Appended(message) => Ok(message),
            AppendOutcome::Duplicate {
                message,
                fingerprint: original,
            } => {
                if original == fingerprint {
                    Ok(message)
                } else {
                    Err(Error::new(
                        ErrorKind::AlreadyExists,
                        Reason::ClientMessageIdReused,
                        "client_message_id was already used for a different message",
                    )
                    .with_field("client_message_id"))
                }
            }
        }
    }

    pub async fn list_messages(
        &self,
        caller: &Caller,
        id: ConversationId,
        size: PageSize,
        page_token: &str,
    ) -> Result<(Vec<Message>, String)> {
        let conversation = self.participating(caller, id).await?;
        let before = paging::decode_messages_token(page_token, conversation.id)?;
        let mut messages = self
            .store
            .messages_before(conversation.id, before, size.get() + 1)
            .await?;
        let has_more = messages.len() > size.get();
        messages.truncate(size.get());
        let next = match (has_more, messages.last()) {
            (true, Some(oldest)) => paging::encode_messages_token(conversation.id, oldest.sequence),
            _ => String::new(),
        };
        Ok((messages, next))
    }

    pub async fn delete_message(
        &self,
        caller: &Caller,
        id: ConversationId,
        message_id: MessageId,
    ) -> Result<Message> {
        match self
            .store
            .delete_message(id, message_id, &caller.user_id)
            .await?
        {
            DeleteOutcome::Deleted(message, _) | DeleteOutcome::AlreadyDeleted(message) => {
                Ok(message)
            }
        }
    }

    /// Tombstones every message of conversation `id` carrying file `file_id` and refuses later
    /// re-posts of it, on behalf of `caller` (the file service checks they uploaded it).
    pub async fn delete_file_messages(
        &self,
        caller: &Caller,
        id: ConversationId,
        file_id: &FileId,
        file_expire_time: UnixMillis,
    ) -> Result<()> {
        self.store
            .delete_file_messages(id, file_id, &caller.user_id, file_expire_time)
            .await?;
        Ok(())
    }

    pub async fn mark_read(
        &self,
        caller: &Caller,
        id: ConversationId,
        sequence: u64,
    ) -> Result<u64> {
        match self.store.mark_read(id, &caller.user_id, sequence).await? {
            ReadOutcome::Advanced(event) => match event.kind {
                EventKind::ReadReceipt { read_sequence, .. } => Ok(read_sequence),
                _ => Err(Error::internal("mark_read recorded a non-receipt event")),
            },
            ReadOutcome::Unchanged { read_sequence } => Ok(read_sequence),
        }
    }

    /// Every event after `after_sequence`, then live ones, with no gap and no duplicate.
    ///
    /// The live receiver is registered before history is read, and events are de-duplicated
    /// by sequence, so nothing committed between the two is lost. A gap in the live feed (a
    /// lost connection, a lagging dispatcher) sends the stream back to the store to catch up.
    pub async fn subscribe(
        &self,
        caller: &Caller,
        id: ConversationId,
        after_sequence: u64,
    ) -> Result<BoxStream<'static, Result<Event>>> {
        let conversation = self.participating(caller, id).await?;
        if after_sequence > conversation.last_sequence {
            return Err(Error::invalid_field(
                "after_sequence",
                format!(
                    "after_sequence {after_sequence} is beyond the conversation's last sequence {}",
                    conversation.last_sequence
                ),
            ));
        }
        let slot = self
            .subscriptions
            .try_take(&caller.user_id)
            .ok_or_else(|| too_many_subscriptions(self.subscriptions.per_caller()))?;
        // Registered first, then watched: whatever the feed carries once the watch holds is
        // queued for this stream, and the store read that follows overlaps it.
        let live = self
            .hub
            .register(conversation.id, self.settings.subscriber_buffer);
        let watch = self.store.watch(conversation.id).await?;
        let stream = subscription::events(
            self.store.clone(),
            slot,
            live,
            watch,
            conversation.id,
            caller.user_id.clone(),
            after_sequence,
        );
        Ok(Box::pin(stream))
    }

    /// The file `file_id` as an attachment, if it belongs to conversation `id` and is live.
    async fn attachment(&self, id: ConversationId, file_id: &FileId) -> Result<FileAttachment> {
        let not_found = || {
            Error::not_found(Reason::FileNotFound, "file not found in this conversation")
                .with_field("file_id")
        };
        let record = self
            .file_records
            .get(file_id)
            .await?
            .filter(|record| record.conversation_id == id)
            .ok_or_else(not_found)?;
        Ok(record.attachment())
    }

    /// The conversation, if it exists and `caller` participates.
    async fn participating(&self, caller: &Caller, id: ConversationId) -> Result<Conversation> {
        let conversation = self
            .store
            .conversation(id)
            .await?
            .ok_or_else(|| StoreError::from(Rejection::ConversationNotFound))?;
        if !conversation.has_participant(&caller.user_id) {
            return Err(StoreError::from(Rejection::NotParticipant).into());
        }
        Ok(conversation)
    }

    async fn view(&self, conversation: Conversation, user: &UserId) -> Result<ConversationView> {
        let ReadState {
            unread_count,
            last_message,
            ..
        } = self.store.read_state(conversation.id, user).await?;
        Ok(ConversationView {
            conversation,
            unread_count,
            last_message,
        })
    }
}

fn too_many_subscriptions(per_caller: usize) -> Error {
    Error::new(
        ErrorKind::ResourceExhausted,
        Reason::TooManySubscriptions,
        format!(
            "at most {per_caller} live subscriptions per caller on one server; end one before opening another"
        ),
    )
    .with_quota_violation(
        "messaging.max_subscriptions_per_caller",
        format!("live SubscribeMessages streams per caller per server: {per_caller}"),
    )
}

fn validate_text(text: &str) -> Result<String> {
    let trimmed = text.trim();
    let chars = trimmed.chars().count();
    if chars == 0 {
        return Err(Error::invalid_field("text", "text must not be empty"));
    }
    if chars > MAX_TEXT_CHARS {
        return Err(Error::invalid_field(
            "text",
            format!("text must be at most {MAX_TEXT_CHARS} characters, got {chars}"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// The user ids a request names, parsed, without repeats: at least `min`, at most
/// [`MAX_USERS_PER_REQUEST`].
pub fn parse_users(field: &'static str, raw: &[String], min: usize) -> Result<Vec<UserId>> {
    if raw.len() < min {
        return Err(Error::invalid_field(
            field,
            format!("{field} must name at least {min} user"),
        ));
    }
    if raw.len() > MAX_USERS_PER_REQUEST {
        return Err(Error::invalid_field(
            field,
            format!("{field} may name at most {MAX_USERS_PER_REQUEST} users per request"),
        ));
    }
    let mut users: Vec<UserId> = Vec::with_capacity(raw.len());
    for id in raw {
        let user = UserId::from_field(field, id)?;
        if !users.contains(&user) {
            users.push(user);
        }
    }
    if users.len() >= MAX_PARTICIPANTS {
        return Err(Error::invalid_field(field, "too many participants"));
    }
    Ok(users)
}

fn fingerprint(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0xff]);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
