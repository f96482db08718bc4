//! The message store: conversations, their gap-free event logs, messages, read positions and the
//! live fan-out of new events. Every write that must be atomic (checking participation, applying
//! the change, assigning the next sequence, recording the event, publishing it) is one store
//! call, so replicas sharing a store agree on every sequence.

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    error::{BoxError, Error, ErrorKind, Reason},
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::{
        ClientId, Conversation, Event, MAX_PARTICIPANTS, Message, MessageRecord, UnixMillis,
    },
};

pub type StoreResult<T> = Result<T, StoreError>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request conflicts with the stored state; see the [`Rejection`].
    #[error("rejected: {0:?}")]
    Rejected(Rejection),
    /// The backend cannot be reached or answered with an error; a retry may help.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// The backend did not answer in time; a retry may help.
    #[error("store timed out")]
    Timeout,
    /// Stored data could not be read back: a bug or tampering.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// How store failures read to callers: a rejection is the caller's mistake, infrastructure
/// trouble stays retryable.
impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Rejected(rejection) => match rejection {
                Rejection::ConversationNotFound => {
                    Error::not_found(Reason::ConversationNotFound, "conversation not found")
                }
                Rejection::MessageNotFound => {
                    Error::not_found(Reason::MessageNotFound, "message not found")
                }
                Rejection::ParticipantNotFound => Error::not_found(
                    Reason::ParticipantNotFound,
                    "that user is not a participant",
                ),
                Rejection::NotParticipant => Error::permission_denied(
                    Reason::NotAParticipant,
                    "you are not a participant of this conversation",
                ),
                Rejection::NotCreator => Error::permission_denied(
                    Reason::NotConversationCreator,
                    "only the conversation's creator may remove other participants",
                ),
                Rejection::NotSender => Error::permission_denied(
                    Reason::NotMessageSender,
                    "only the sender may delete a message",
                ),
                Rejection::SequenceAhead => Error::invalid_field(
                    "sequence",
                    "sequence is beyond the conversation's last sequence",
                ),
                Rejection::TooManyParticipants => Error::new(
                    ErrorKind::FailedPrecondition,
                    Reason::TooManyParticipants,
                    format!("a conversation may have at most {MAX_PARTICIPANTS} participants"),
                ),
                Rejection::TooManyConversations => Error::new(
                    ErrorKind::FailedPrecondition,
                    Reason::TooManyConversations,
                    "a user to add is already in as many conversations as a user may be in",
                )
                .with_quota_violation(
                    "messaging.max_conversations_per_user",
                    "conversations one user may be in; one must leave one first",
                ),
                Rejection::FileDeleted => {
                    Error::not_found(Reason::FileNotFound, "file not found in this conversation")
                        .with_field("file_id")
                }
            },
            // Connection loss or a failover: the same request may well succeed shortly.
            StoreError::Unavailable(source) => Error::new(
                ErrorKind::Unavailable,
                Reason::BackendUnavailable,
                "the message store is unavailable; retry shortly",
            )
            .with_source(source),
            StoreError::Timeout => Error::new(
                ErrorKind::Unavailable,
                Reason::BackendTimeout,
                "the message store did not answer in time; retry shortly",
            ),
            // Unreadable data will not become readable by retrying.
            StoreError::Corrupt(detail) => Error::internal(detail),
        }
    }
}

/// A write refused because of the state it found, decided atomically with the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    ConversationNotFound,
    MessageNotFound,
    /// The acting user is not a participant.
    NotParticipant,
    /// Only the creator may remove someone else.
    NotCreator,
    /// Only the sender may delete a message.
    NotSender,
    /// The user to remove is not a participant.
    ParticipantNotFound,
    /// A read position beyond the newest event.
    SequenceAhead,
    /// The change would exceed the participant limit.
    TooManyParticipants,
    /// A user to add is already in as many conversations as a user may be.
    TooManyConversations,
    /// The message carries a file that was deleted.
    FileDeleted,
}

impl From<Rejection> for StoreError {
    fn from(rejection: Rejection) -> Self {
        Self::Rejected(rejection)
    }
}

/// A conversation to create.
#[derive(Debug, Clone)]
pub struct NewConversation {
    /// The id to create it under: fresh and random, unless `request` was seen before.
    pub id: ConversationId,
    pub title: String,
    /// The creator first, then the others, without duplicates.
    pub participants: Vec<UserId>,
    pub created_by: UserId,
    /// Identifies the request's content, so a retry can be told from a conflicting reuse.
    pub fingerprint: String,
    /// The creator's idempotency key, if the request has one.
    pub request: Option<CreateRequest>,
}

/// A `request_id` and how long the store remembers which conversation it created.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub request_id: ClientId,
    /// Exactly this long after the first create, the same `request_id` creates a new one.
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Created(Conversation),
    /// A conversation with this id exists already, or the creator's `request_id` created this
    /// one within its window (a retry, or a conflicting reuse).
    Existing {
        conversation: Conversation,
        fingerprint: String,
    },
}

/// A message to append, before the store assigns its sequence and time.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub conversation_id: ConversationId,
    pub record: MessageRecord,
    /// Identifies the content, so a retry can be told from a conflicting reuse.
    pub fingerprint: String,
    /// How long `(sender, client_message_id)` is remembered.
    pub idempotency_window_secs: u64,
}

#[derive(Debug, Clone)]
pub enum AppendOutcome {
    /// The message as appended (its `MessageCreated` event is on the live feed).
    Appended(Message),
    /// The sender used this `client_message_id` before, within the window.
    Duplicate {
        message: Message,
        fingerprint: String,
    },
}

#[derive(Debug, Clone)]
// Returned once per call and moved straight out: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ChangeOutcome {
    /// The change happened and was recorded as this event.
    Changed(Conversation, Event),
    /// Nothing to change (e.g. everyone was already a participant).
    Unchanged(Conversation),
}

#[derive(Debug, Clone)]
// Returned once per call and moved straight out: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum DeleteOutcome {
    /// The tombstone and the `MessageDeleted` event.
    Deleted(Message, Event),
    AlreadyDeleted(Message),
}

#[derive(Debug, Clone, PartialEq, Eq)]
// Returned once per call and moved straight out: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ReadOutcome {
    /// The read position moved forward; the receipt event has this sequence.
    Advanced(Event),
    /// The position was already at or past the one given: unchanged.
    Unchanged { read_sequence: u64 },
}

/// Events after a point, with how much history was trimmed.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Events with sequences up to this one were trimmed by retention (0: none).
    pub trimmed_through: u64,
}

/// A conversation in a user's list, ordered by its latest activity.
#[derive(Debug, Clone)]
pub struct ConversationEntry {
    pub conversation: Conversation,
    pub activity: UnixMillis,
}

/// Where a page of a user's conversations starts: after this entry (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityCursor {
    pub activity: UnixMillis,
    pub conversation_id: ConversationId,
}

/// A user's view of one conversation.
#[derive(Debug, Clone, Default)]
pub struct ReadState {
    pub read_sequence: u64,
    /// Non-deleted messages after `read_sequence` sent by others.
    pub unread_count: u64,
    pub last_message: Option<Message>,
}

/// Conversations, events and messages; see the module docs.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Creates the conversation, or reports the one that already has this id, or the one
    /// `new.request` created within its window (its id then differs from `new.id`). Creation
    /// records no event: `last_sequence` starts at 0. Rejection: TooManyConversations (a
    /// participant is in [`ConversationCap`] conversations already; never for one they are in).
    async fn create_conversation(&self, new: NewConversation) -> StoreResult<CreateOutcome>;

    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>>;

    /// Adds `users` (those not yet participants) on behalf of participant `by`.
    /// Rejections: ConversationNotFound, NotParticipant, TooManyParticipants,
    /// TooManyConversations.
    async fn add_participants(
        &self,
        id: ConversationId,
        by: &UserId,
        users: &[UserId],
    ) -> StoreResult<ChangeOutcome>;

    /// Removes `user` on behalf of `by` (themselves, or anyone when `by` created it).
    /// Rejections: ConversationNotFound, NotParticipant, NotCreator, ParticipantNotFound.
    async fn remove_participant(
        &self,
        id: ConversationId,
        by: &UserId,
        user: &UserId,
    ) -> StoreResult<ChangeOutcome>;

    /// Appends a message from `record.sender`, unless the sender used its `client_message_id`
    /// within the idempotency window. Rejections: ConversationNotFound, NotParticipant,
    /// FileDeleted (the message carries a file deleted with `delete_file_messages`).
    async fn append_message(&self, new: NewMessage) -> StoreResult<AppendOutcome>;

    /// Turns the message into a tombstone (in history and in the replayed `MessageCreated`
    /// event) and records a `MessageDeleted` event.
    /// Rejections: ConversationNotFound, NotParticipant, MessageNotFound, NotSender.
    async fn delete_message(
        &self,
        id: ConversationId,
        message_id: MessageId,
        by: &UserId,
    ) -> StoreResult<DeleteOutcome>;

    /// Tombstones every message of the conversation that carries file `file_id` (the upload's
    /// own FILE/IMAGE message and every re-post), recording a `MessageDeleted` event by `by` for
    /// each one not yet deleted, oldest first. From then until `file_expire_time` (when the file
    /// record is gone anyway) no message carrying the file is appended (`FileDeleted`), so a
    /// re-post racing the deletion cannot leave a copy. Safe to repeat.
    /// Rejections: ConversationNotFound, NotParticipant.
    async fn delete_file_messages(
        &self,
        id: ConversationId,
        file_id: &FileId,
        by: &UserId,
        file_expire_time: UnixMillis,
    ) -> StoreResult<Vec<Event>>;

    /// Moves `user`'s read position forward to `sequence` and records a read receipt.
    /// Rejections: ConversationNotFound, NotParticipant, SequenceAhead.
    async fn mark_read(
        &self,
        id: ConversationId,
        user: &UserId,
        sequence: u64,
    ) -> StoreResult<ReadOutcome>;

    /// Up to `limit` events with sequences after `after`, oldest first.
    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: usize,
    ) -> StoreResult<EventPage>;

    /// Up to `limit` messages (tombstones included) with sequences below `before` (all when
    /// `None`), newest first.
    async fn messages_before(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Message>>;

    async fn message(
        &self,
        id: ConversationId,
        message_id: MessageId,
    ) -> StoreResult<Option<Message>>;

    /// The user's conversations, most recent activity first, starting after `cursor`.
    async fn conversations_of(
        &self,
        user: &UserId,
        cursor: Option<&ActivityCursor>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationEntry>>;

    async fn read_state(&self, id: ConversationId, user: &UserId) -> StoreResult<ReadState>;

    /// Subscribes to the events committed from now on, by any replica sharing this store, in
    /// the conversations this replica [watches](Self::watch) (a store may carry others too).
    fn live_events(&self) -> tokio::sync::broadcast::Receiver<LiveSignal>;

    /// Makes `live_events` carry conversation `id`'s events until the returned watch is
    /// dropped. Returns once that holds: an event committed after it returns is delivered, so
    /// a reader who watches, then reads the store, misses nothing in between.
    async fn watch(&self, id: ConversationId) -> StoreResult<LiveWatch>;
}

/// Keeps a conversation's events on the live feed while held; see [`MessageStore::watch`].
#[must_use = "the conversation is watched only while this is held"]
pub struct LiveWatch {
    _release: Option<Box<dyn Send + Sync>>,
}

impl LiveWatch {
    /// A watch with nothing to release (a store whose feed carries every event).
    pub fn unneeded() -> Self {
        Self { _release: None }
    }

    /// A watch that ends when `release` is dropped.
    pub fn releasing(release: impl Send + Sync + 'static) -> Self {
        Self {
            _release: Some(Box::new(release)),
        }
    }
}

impl std::fmt::Debug for LiveWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveWatch")
    }
}

/// What the live feed carries.
#[derive(Debug, Clone)]
pub enum LiveSignal {
    /// A committed event.
    Event(std::sync::Arc<Event>),
    /// The feed may have missed events (e.g. the backend connection was lost and restored):
    /// subscribers must re-read from the store after their last sequence.
    Resync,
}

/// Most conversations one user may be in. A user's conversation list is read whole to order
/// a page (see `conversations_of`), and anyone may add a user to a conversation: without a cap
/// one caller could make another user's every list page arbitrarily expensive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationCap(pub usize);

impl ConversationCap {
    pub const DEFAULT: Self = Self(1000);

    /// Whether a user already in `held` conversations may join one more.
    pub fn admits(self, held: usize) -> bool {
        held < self.0
    }
}

/// How much history a conversation keeps; older events are trimmed as new ones arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_events: u64,
    pub max_age: std::time::Duration,
}
