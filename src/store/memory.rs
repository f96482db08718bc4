//! The in-process message store: the zero-setup default for a single replica. It keeps the same
//! contract as the Redis store (the conformance suite runs against both); one mutex makes every
//! write atomic, and events are published while it is held, so the live feed is in commit order.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::messages::{
    ActivityCursor, AppendOutcome, ChangeOutcome, ConversationCap, ConversationEntry,
    CreateOutcome, CreateRequest, DeleteOutcome, EventPage, LiveSignal, LiveWatch, MessageStore,
    NewConversation, NewMessage, ReadOutcome, ReadState, Rejection, Retention, StoreResult,
};
use crate::{
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::{
        ClientId, Conversation, Event, EventKind, MAX_PARTICIPANTS, Message, MessageRecord,
        UnixMillis, now_millis,
    },
};

/// Events buffered for live subscribers before a slow dispatcher gets a resync instead.
const LIVE_CAPACITY: usize = 4096;

pub struct MemoryMessageStore {
    state: Mutex<State>,
    live: broadcast::Sender<LiveSignal>,
    retention: Retention,
    cap: ConversationCap,
}

#[derive(Default)]
struct State {
    conversations: HashMap<ConversationId, ConversationState>,
    /// Per user: their conversations and each one's latest activity.
    activity: HashMap<UserId, HashMap<ConversationId, UnixMillis>>,
    /// `(creator, request_id)` -> the conversation it created, until the window ends.
    requests: HashMap<(UserId, ClientId), (ConversationId, Instant)>,
    /// The keys of `requests` in the order they were made, so expired ones are dropped without
    /// scanning them all.
    request_order: VecDeque<(Instant, (UserId, ClientId))>,
}

impl State {
    /// Refuses if one of `users` (none of them in the conversation yet) is in as many
    /// conversations as `cap` allows.
    fn check_room(&self, cap: ConversationCap, users: &[UserId]) -> StoreResult<()> {
        let full = users
            .iter()
            .any(|user| !cap.admits(self.activity.get(user).map_or(0, HashMap::len)));
        if full {
            return Err(Rejection::TooManyConversations.into());
        }
        Ok(())
    }

    /// The conversation `request` created, if its window is still open; else claims the window
    /// for `candidate`. Returns the id to create (or find) the conversation under.
    fn claim_request(
        &mut self,
        creator: &UserId,
        request: &CreateRequest,
        candidate: ConversationId,
    ) -> ConversationId {
        let now = Instant::now();
        while let Some((expires, _)) = self.request_order.front()
            && *expires <= now
        {
            let (_, key) = self.request_order.pop_front().expect("front exists");
            if self
                .requests
                .get(&key)
                .is_some_and(|(_, expires)| *expires <= now)
            {
                self.requests.remove(&key);
            }
        }
        let key = (creator.clone(), request.request_id.clone());
        if let Some((id, expires)) = self.requests.get(&key)
            && *expires > now
        {
            return *id;
        }
        let expires = now + request.window;
        self.requests.insert(key.clone(), (candidate, expires));
        self.request_order.push_back((expires, key));
        candidate
    }

    /// Conversation `id`, if `user` takes part in it.
    /// Rejections: ConversationNotFound, NotParticipant.
    fn participating(
        &mut self,
        id: ConversationId,
        user: &UserId,
    ) -> StoreResult<&mut ConversationState> {
        let conversation = self
            .conversations
            .get_mut(&id)
            .ok_or(Rejection::ConversationNotFound)?;
        if !conversation.conversation.has_participant(user) {
            return Err(Rejection::NotParticipant.into());
        }
        Ok(conversation)
    }
}

struct ConversationState {
    conversation: Conversation,
    fingerprint: String,
    events: BTreeMap<u64, (UnixMillis, EventKind)>,
    /// Message sequence -> id, tombstones included.
    history: BTreeMap<u64, MessageId>,
    messages: HashMap<MessageId, (u64, UnixMillis, MessageRecord)>,
    reads: HashMap<UserId, u64>,
    sent: HashMap<(UserId, ClientId), SentRecord>,
    trimmed_through: u64,
    /// Files deleted with `delete_file_messages` -> until when messages carrying them are refused.
    deleted_files: HashMap<FileId, UnixMillis>,
}

struct SentRecord {
    message_id: MessageId,
    fingerprint: String,
    expires: Instant,
}

impl MemoryMessageStore {
    pub fn new(retention: Retention) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Self {
            state: Mutex::new(State::default()),
            live,
            retention,
            cap: ConversationCap::DEFAULT,
        }
    }

    /// Caps the conversations one user may be in (default [`ConversationCap::DEFAULT`]).
    pub fn with_conversation_cap(mut self, cap: ConversationCap) -> Self {
        self.cap = cap;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave half a write behind: every write is
        // computed before it is applied. So a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the next event, trims history, publishes it; all under the caller's lock.
    fn append_event(&self, state: &mut State, id: ConversationId, kind: EventKind) -> Event {
        let now = now_millis();
        let conversation = state
            .conversations
            .get_mut(&id)
            .expect("caller checked the conversation exists");
        conversation.conversation.last_sequence += 1;
        let sequence = conversation.conversation.last_sequence;
        if let EventKind::MessageCreated(record) = &kind {
            conversation.history.insert(sequence, record.id);
            conversation
                .messages
                .insert(record.id, (sequence, now, record.clone()));
        }
        conversation.events.insert(sequence, (now, kind.clone()));
        conversation.trim(self.retention, now);
        let event = Event {
            conversation_id: id,
            sequence,
            create_time: now,
            kind,
        };
        if matches!(event.kind, EventKind::MessageCreated(_)) {
            let participants = conversation.conversation.participants.clone();
            for user in participants {
                state.activity.entry(user).or_default().insert(id, now);
            }
        }
        // No receivers is fine: nobody is subscribed right now.
        let _ = self.live.send(LiveSignal::Event(Arc::new(event.clone())));
        event
    }
}

impl ConversationState {
    fn message(&self, conversation_id: ConversationId, message_id: MessageId) -> Option<Message> {
        self.messages
            .get(&message_id)
            .map(|(sequence, create_time, record)| Message {
                conversation_id,
                sequence: *sequence,
                create_time: *create_time,
                record: record.clone(),
            })
    }

    fn trim(&mut self, retention: Retention, now: UnixMillis) {
        let max_age = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.saturating_sub(max_age);
        let mut trim_through = self
            .events
            .iter()
            .take_while(|(_, (time, _))| *time < cutoff)
            .map(|(sequence, _)| *sequence)
            .last()
            .unwrap_or(0);
        let excess = (self.events.len() as u64).saturating_sub(retention.max_events);
        if excess > 0
            && let Some((sequence, _)) = self.events.iter().nth(excess as usize - 1)
        {
            trim_through = trim_through.max(*sequence);
        }
        if trim_through == 0 {
            return;
        }
        self.events = self.events.split_off(&(trim_through + 1));
        let kept = self.history.split_off(&(trim_through + 1));
        for message_id in std::mem::replace(&mut self.history, kept).into_values() {
            self.messages.remove(&message_id);
        }
        self.trimmed_through = self.trimmed_through.max(trim_through);
    }
}

#[async_trait]
impl MessageStore for MemoryMessageStore {
    async fn create_conversation(&self, mut new: NewConversation) -> StoreResult<CreateOutcome> {
        let mut state = self.lock();
        if let Some(request) = &new.request {
            new.id = state.claim_request(&new.created_by, request, new.id);
        }
        if let Some(existing) = state.conversations.get(&new.id) {
            return Ok(CreateOutcome::Existing {
                conversation: existing.conversation.clone(),
                fingerprint: existing.fingerprint.clone(),
            });
        }
        state.check_room(self.cap, &new.participants)?;
        let now = now_millis();
        let conversation = Conversation {
            id: new.id,
            title: new.title,
            participants: new.participants,
            created_by: new.created_by,
            create_time: now,
            last_sequence: 0,
        };
        for user in &conversation.participants {
            state
                .activity
                .entry(user.clone())
                .or_default()
                .insert(new.id, now);
        }
        state.conversations.insert(
            new.id,
            ConversationState {
                conversation: conversation.clone(),
                fingerprint: new.fingerprint,
                events: BTreeMap::new(),
                history: BTreeMap::new(),
                messages: HashMap::new(),
                reads: HashMap::new(),
                sent: HashMap::new(),
                trimmed_through: 0,
                deleted_files: HashMap::new(),
            },
        );
        Ok(CreateOutcome::Created(conversation))
    }

    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>> {
        Ok(self
            .lock()
            .conversations
            .get(&id)
            .map(|state| state.conversation.clone()))
    }

    async fn add_participants(
        &self,
        id: ConversationId,
        by: &UserId,
        users: &[UserId],
    ) -> StoreResult<ChangeOutcome> {
        let mut state = self.lock();
        let current = &mut state.participating(id, by)?.conversation;
        let mut added: Vec<UserId> = Vec::new();
        for user in users {
            if !current.has_participant(user) && !added.contains(user) {
                added.push(user.clone());
            }
        }
        if added.is_empty() {
            return Ok(ChangeOutcome::Unchanged(current.clone()));
        }
        if current.participants.len() + added.len() > MAX_PARTICIPANTS {
            return Err(Rejection::TooManyParticipants.into());
        }
        state.check_room(self.cap, &added)?;
        let current = &mut state.participating(id, by)?.conversation;
        current.participants.extend(added.iter().cloned());
        let participants = current.participants.clone();
        let event = self.append_event(
            &mut state,
            id,
            EventKind::ParticipantsChanged {
                added: added.clone(),
                removed: Vec::new(),
                changed_by: by.clone(),
                participants,
            },
        );
        for user in added {
            state
                .activity
                .entry(user)
                .or_default()
                .insert(id, event.create_time);
        }
        let conversation = state.conversations[&id].conversation.clone();
        Ok(ChangeOutcome::Changed(conversation, event))
    }

    async fn remove_participant(
        &self,
        id: ConversationId,
        by: &UserId,
        user: &UserId,
    ) -> StoreResult<ChangeOutcome> {
        let mut state = self.lock();
        let current = &mut state.participating(id, by)?.conversation;
        if by != user && *by != current.created_by {
            return Err(Rejection::NotCreator.into());
        }
        if !current.has_participant(user) {
            return Err(Rejection::ParticipantNotFound.into());
        }
        current
            .participants
            .retain(|participant| participant != user);
        let participants = current.participants.clone();
        let event = self.append_event(
            &mut state,
            id,
            EventKind::ParticipantsChanged {
                added: Vec::new(),
                removed: vec![user.clone()],
                changed_by: by.clone(),
                participants,
            },
        );
        if let Some(conversations) = state.activity.get_mut(user) {
            conversations.remove(&id);
        }
        let conversation = state.conversations[&id].conversation.clone();
        Ok(ChangeOutcome::Changed(conversation, event))
    }

    async fn append_message(&self, new: NewMessage) -> StoreResult<AppendOutcome> {
        let mut state = self.lock();
        let id = new.conversation_id;
        let sender = new.record.sender.clone();
        let conversation = state.participating(id, &sender)?;
        if let Some(file_id) = new.record.file_id()
            && conversation
                .deleted_files
                .get(file_id)
                .is_some_and(|until| *until > now_millis())
        {
            return Err(Rejection::FileDeleted.into());
        }
        let key = (sender, new.record.client_message_id.clone());
        let now = Instant::now();
        if let Some(sent) = conversation.sent.get(&key)
            && sent.expires > now
            && let Some(message) = conversation.message(id, sent.message_id)
        {
            return Ok(AppendOutcome::Duplicate {
                message,
                fingerprint: sent.fingerprint.clone(),
            });
        }
        conversation.sent.retain(|_, sent| sent.expires > now);
        conversation.sent.insert(
            key,
            SentRecord {
                message_id: new.record.id,
                fingerprint: new.fingerprint,
                expires: now + Duration::from_secs(new.idempotency_window_secs),
            },
        );
        let record = new.record.clone();
        let event = self.append_event(&mut state, id, EventKind::MessageCreated(new.record));
        Ok(AppendOutcome::Appended(Message {
            conversation_id: id,
            sequence: event.sequence,
            create_time: event.create_time,
            record,
        }))
    }

    async fn delete_message(
        &self,
        id: ConversationId,
        message_id: MessageId,
        by: &UserId,
    ) -> StoreResult<DeleteOutcome> {
        let mut state = self.lock();
        let conversation = state.participating(id, by)?;
        let (sequence, create_time, record) = conversation
            .messages
            .get(&message_id)
            .cloned()
            .ok_or(Rejection::MessageNotFound)?;
        if record.sender != *by {
            return Err(Rejection::NotSender.into());
        }
        let tombstone = record.tombstone();
        let message = Message {
            conversation_id: id,
            sequence,
            create_time,
            record: tombstone.clone(),
        };
        if record.is_deleted() {
            return Ok(DeleteOutcome::AlreadyDeleted(message));
        }
        conversation
            .messages
            .insert(message_id, (sequence, create_time, tombstone.clone()));
        if let Some((_, kind)) = conversation.events.get_mut(&sequence) {
            *kind = EventKind::MessageCreated(tombstone);
        }
        let event = self.append_event(
            &mut state,
            id,
            EventKind::MessageDeleted {
                message_id,
                deleted_by: by.clone(),
            },
        );
        Ok(DeleteOutcome::Deleted(message, event))
    }

    async fn delete_file_messages(
        &self,
        id: ConversationId,
        file_id: &FileId,
        by: &UserId,
        file_expire_time: UnixMillis,
    ) -> StoreResult<Vec<Event>> {
        let mut state = self.lock();
        let conversation = state.participating(id, by)?;
        let now = now_millis();
        conversation.deleted_files.retain(|_, until| *until > now);
        conversation
            .deleted_files
            .insert(file_id.to_owned(), file_expire_time);
        let mut carriers: Vec<(u64, MessageId)> = conversation
            .messages
            .iter()
            .filter(|(_, (_, _, record))| record.file_id() == Some(file_id))
            .map(|(message_id, (sequence, _, _))| (*sequence, *message_id))
            .collect();
        carriers.sort_unstable();
        let mut events = Vec::with_capacity(carriers.len());
        for (sequence, message_id) in carriers {
            let conversation = state
                .conversations
                .get_mut(&id)
                .expect("checked above, under the same lock");
            // Trimming while earlier carriers got their events may have removed this one.
            let Some((_, create_time, record)) = conversation.messages.get(&message_id).cloned()
            else {
                continue;
            };
            let tombstone = record.tombstone();
            conversation
                .messages
                .insert(message_id, (sequence, create_time, tombstone.clone()));
            if let Some((_, kind)) = conversation.events.get_mut(&sequence) {
                *kind = EventKind::MessageCreated(tombstone);
            }
            events.push(self.append_event(
                &mut state,
                id,
                EventKind::MessageDeleted {
                    message_id,
                    deleted_by: by.clone(),
                },
            ));
        }
        Ok(events)
    }

    async fn mark_read(
        &self,
        id: ConversationId,
        user: &UserId,
        sequence: u64,
    ) -> StoreResult<ReadOutcome> {
        let mut state = self.lock();
        let conversation = state.participating(id, user)?;
        if sequence > conversation.conversation.last_sequence {
            return Err(Rejection::SequenceAhead.into());
        }
        let current = conversation.reads.get(user).copied().unwrap_or(0);
        if sequence <= current {
            return Ok(ReadOutcome::Unchanged {
                read_sequence: current,
            });
        }
        conversation.reads.insert(user.clone(), sequence);
        let event = self.append_event(
            &mut state,
            id,
            EventKind::ReadReceipt {
                user_id: user.clone(),
                read_sequence: sequence,
            },
        );
        Ok(ReadOutcome::Advanced(event))
    }

    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: usize,
    ) -> StoreResult<EventPage> {
        let state = self.lock();
        let Some(conversation) = state.conversations.get(&id) else {
            return Ok(EventPage::default());
        };
        let events = conversation
            .events
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(sequence, (create_time, kind))| Event {
                conversation_id: id,
                sequence: *sequence,
                create_time: *create_time,
                kind: kind.clone(),
            })
            .collect();
        Ok(EventPage {
            events,
            trimmed_through: conversation.trimmed_through,
        })
    }

    async fn messages_before(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let state = self.lock();
        let Some(conversation) = state.conversations.get(&id) else {
            return Ok(Vec::new());
        };
        let upper = before.unwrap_or(u64::MAX);
        Ok(conversation
            .history
            .range(..upper)
            .rev()
            .take(limit)
            .filter_map(|(_, message_id)| conversation.message(id, *message_id))
            .collect())
    }

    async fn message(
        &self,
        id: ConversationId,
        message_id: MessageId,
    ) -> StoreResult<Option<Message>> {
        let state = self.lock();
        Ok(state
            .conversations
            .get(&id)
            .and_then(|conversation| conversation.message(id, message_id)))
    }

    async fn conversations_of(
        &self,
        user: &UserId,
        cursor: Option<&ActivityCursor>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationEntry>> {
        let state = self.lock();
        let Some(conversations) = state.activity.get(user) else {
            return Ok(Vec::new());
        };
        // Newest activity first; ties by id, descending, to match the Redis store.
        let mut ordered: Vec<(UnixMillis, ConversationId)> = conversations
            .iter()
            .map(|(id, activity)| (*activity, *id))
            .collect();
        ordered.sort_unstable_by(|a, b| b.cmp(a));
        Ok(ordered
            .into_iter()
            .filter(|(activity, id)| {
                cursor.is_none_or(|cursor| {
                    (*activity, *id) < (cursor.activity, cursor.conversation_id)
                })
            })
            .filter_map(|(activity, id)| {
                let conversation = &state.conversations.get(&id)?.conversation;
                conversation
                    .has_participant(user)
                    .then(|| ConversationEntry {
                        conversation: conversation.clone(),
                        activity,
                    })
            })
            .take(limit)
            .collect())
    }

    async fn read_state(&self, id: ConversationId, user: &UserId) -> StoreResult<ReadState> {
        let state = self.lock();
        let Some(conversation) = state.conversations.get(&id) else {
            return Ok(ReadState::default());
        };
        let read_sequence = conversation.reads.get(user).copied().unwrap_or(0);
        let unread_count = conversation
            .history
            .range(read_sequence.saturating_add(1)..)
            .filter(|(_, message_id)| {
                conversation
                    .messages
                    .get(message_id)
                    .is_some_and(|(_, _, record)| !record.is_deleted() && record.sender != *user)
            })
            .count() as u64;
        let last_message = conversation
            .history
            .values()
            .next_back()
            .and_then(|message_id| conversation.message(id, *message_id));
        Ok(ReadState {
            read_sequence,
            unread_count,
            last_message,
        })
    }

    fn live_events(&self) -> broadcast::Receiver<LiveSignal> {
        self.live.subscribe()
    }

    async fn watch(&self, _id: ConversationId) -> StoreResult<LiveWatch> {
        // The in-process feed carries every event anyway.
        Ok(LiveWatch::unneeded())
    }
}

/// The in-process file metadata store.
#[derive(Default)]
pub struct MemoryFileRecordStore {
    records: Mutex<HashMap<FileId, crate::store::file_records::FileRecord>>,
    /// `(create_time, file id)` of records the orphan janitor has not checked.
    unchecked: Mutex<std::collections::BTreeSet<(UnixMillis, FileId)>>,
}

impl MemoryFileRecordStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<FileId, crate::store::file_records::FileRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl crate::store::file_records::FileRecordStore for MemoryFileRecordStore {
    async fn put(&self, record: &crate::store::file_records::FileRecord) -> StoreResult<()> {
        let now = now_millis();
        let mut records = self.lock();
        // Expired records go the way Redis TTLs would.
        records.retain(|_, record| record.file.expire_time > now);
        let replaced = records.insert(record.file.file_id.clone(), record.clone());
        if replaced.is_none() {
            self.unchecked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((record.file.create_time, record.file.file_id.clone()));
        }
        Ok(())
    }

    async fn get(
        &self,
        file_id: &FileId,
    ) -> StoreResult<Option<crate::store::file_records::FileRecord>> {
        let now = now_millis();
        Ok(self
            .lock()
            .get(file_id)
            .filter(|record| record.file.expire_time > now)
            .cloned())
    }

    async fn delete(&self, file_id: &FileId) -> StoreResult<()> {
        self.lock().remove(file_id);
        Ok(())
    }

    async fn unchecked(&self, before: UnixMillis, limit: usize) -> StoreResult<Vec<FileId>> {
        Ok(self
            .unchecked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .take_while(|(created, _)| *created <= before)
            .take(limit)
            .map(|(_, file_id)| file_id.clone())
            .collect())
    }

    async fn mark_checked(&self, file_ids: &[FileId]) -> StoreResult<()> {
        self.unchecked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(_, file_id)| !file_ids.contains(file_id));
        Ok(())
    }
}
