//! The Redis message store, shared by every replica of the service.
//!
//! Each write is one Lua script over one conversation's keys, so checking participation, applying
//! the change, taking the next sequence (`HINCRBY last_seq`), recording the event, trimming
//! history and publishing the event happen atomically, in one place, with the server's clock.
//!
//! # Key layout (`P` = `redis.key_prefix`, `C` = conversation id)
//!
//! | key                               | type   | contents                                                    |
//! |-----------------------------------|--------|-------------------------------------------------------------|
//! | `P:{c:C}:meta`                    | HASH   | title, created_by, create_time, last_seq, trimmed_through, fingerprint, joins, active (time of the newest message, ms) |
//! | `P:{c:C}:members`                 | ZSET   | participants, score = join order                            |
//! | `P:{c:C}:events`                  | ZSET   | every event but MessageCreated: score = seq, member = `<seq>:<create_time_ms>:<json EventKind>` |
//! | `P:{c:C}:msgs`                    | ZSET   | message ids incl. tombstones, score = seq                   |
//! | `P:{c:C}:msg`                     | HASH   | message id -> `<seq>:<create_time_ms>:<json MessageRecord>` |
//! | `P:{c:C}:dead`                    | ZSET   | sequences of deleted messages (member and score)            |
//! | `P:{c:C}:by:<user>`               | ZSET   | sequences of that sender's non-deleted messages (member and score) |
//! | `P:{c:C}:senders`                 | SET    | users with a `by:` ZSET                                     |
//! | `P:{c:C}:read`                    | HASH   | user -> read sequence                                       |
//! | `P:{c:C}:idem:<n>`                | HASH   | `<len>:<sender>:<client_message_id>` -> `<seq>\|<time_ms>\|<fingerprint>` for the sends of window-long time bucket n = floor(time / window); expires one window after the bucket ends |
//! | `P:{c:C}:file:<file_id>`          | HASH   | `m:<message_id>` -> seq per message carrying the file; `gone` once deleted; expires with the file |
//! | `P:{u:USER}:convs`                | ZSET   | conversation ids, score = when the user joined (ms)         |
//! | `P:{u:USER}:req:<digest>`         | STRING | conversation id a `request_id` created, expires with the window |
//! | `P:{u:USER}:upload:<digest>`      | HASH   | an upload session; see [`upload_sessions`]                  |
//! | `P:{u:USER}:uploads`              | ZSET   | the user's unfinished upload sessions, score = expire_time  |
//! | `P:upload-expiry`                 | ZSET   | unfinished upload session keys, score = expire_time         |
//! | `P:{c:C}:live`                    | channel | pub/sub channel of the conversation's committed events (no key) |
//!
//! All keys of a conversation share the hash tag `{c:C}`, so every script stays in one slot and
//! the layout works on Redis Cluster. Scripts declare the fixed keys in `KEYS` but build the
//! per-sender (`by:`) and per-bucket (`idem:`) names from `P:{c:C}:` themselves (which senders
//! a trim visits is known only inside). Redis runs that fine in the conversation's slot; while
//! an operator *migrates* that slot to another node, a write whose built key has already moved
//! fails (internal error) and succeeds once the slot has moved: reshard in a quiet hour. Unread = `ZCOUNT msgs (read +inf` minus
//! `ZCOUNT dead (read +inf` minus `ZCOUNT by:<user> (read +inf` (deletions are rare, so counting
//! them costs less memory than listing every live message once more).
//!
//! Client message ids are remembered per window-long time bucket (`idem:<n>`), so the cost is
//! one HASH entry per send rather than a key with an expiry; a lookup reads the current and the
//! previous bucket and checks the entry's time against the window. Changing
//! `messaging.idempotency_window` renumbers the buckets: ids remembered before the change are
//! forgotten (a retry across a deploy that changes the window may append again).
//!
//! A message record is stored once, in `msg` (the tombstone replaces it on deletion). Its
//! MessageCreated event is not stored apart: it is the message's entry in `msgs` (its sequence)
//! and `msg` (its time and record); `events_after.lua` merges those with the other events by
//! sequence, so a replayed event shows a deletion too. Trimming drops a prefix of sequences: by count from
//! `last_seq - trimmed_through`, by age from the oldest events' own times.
//!
//! A send writes nothing per participant. A user's activity in a conversation is the later of
//! their `P:{u:USER}:convs` score (when they joined) and the conversation's `active` (its newest
//! message): exactly what updating every participant's index on every send used to store.
//! `conversations_of` reads the index, one `active` per listed conversation (pipelined), sorts
//! and then loads the page; a page thus costs one `HGET` per conversation of the user instead
//! of a send costing one `ZADD` per participant. That is why a user may be in at most
//! `messaging.max_conversations_per_user` conversations ([`ConversationCap`]): anyone can add
//! anyone, and without a cap one caller could make another's every list page arbitrarily dear. Cursor semantics are unchanged: a conversation
//! that gets a message moves above a cursor already handed out, as it did before.
//!
//! `P:{u:USER}:convs` lives in the user's slot, so a create or add first *reserves* each new
//! member's entry there (`reserve_conversation.lua`: refused once the user is in the cap's
//! worth; atomic per user, so concurrent requests cannot overshoot it), then runs the
//! conversation's script, then sets the entries to the join time (`ZADD GT`); a refused change
//! takes its reservations back. It is derived data: it may lag briefly, and if an update fails
//! the write still stands (logged). Readers check participation against the conversation
//! itself, so a stale entry is never shown, and a listing drops entries it finds stale for
//! over a minute (`forget_stale_conversation.lua`, unless a join changed them meanwhile).
//!
//! `P:{u:USER}:req:<digest>` maps a creator's `request_id` to the conversation it created. It
//! lives in the creator's slot, so `create_conversation` claims it (`claim_request.lua`: the
//! existing id, or the fresh candidate with a `PX` of the idempotency window) before the
//! conversation's own script runs. Conversation ids are random (UUIDv7), not derived from
//! `(user, request_id)`: storing the mapping needs no server secret shared by every replica,
//! and it makes the window exact. A crash between the two steps leaves a claim whose retry
//! creates the conversation under the claimed id.
//!
//! Every committed event is published on its conversation's channel `P:{c:C}:live` as
//! `<conversation_id>:<seq>:<create_time_ms>:<json EventKind>` from inside the script, so the
//! publish order is the commit order; a replica subscribes to the channels of the conversations
//! it serves live streams of ([`MessageStore::watch`]); see [`live`].

mod codec;
mod connection;
/// Entry points for the fuzz targets in `fuzz/`; compiled only under `cargo fuzz`.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use crate::ids::ConversationId;

    /// Runs every stored-form parser on `text`; each may fail, none may panic.
    pub fn decode_all(text: &str) {
        let id = ConversationId::generate();
        let _ = super::codec::event(id, text);
        let _ = super::codec::message(id, text);
        let _ = super::codec::published_event(text);
        let fields: Vec<String> = text.split('\u{0}').map(str::to_owned).collect();
        let _ = super::codec::conversation(id, &fields);
    }
}
mod error;
mod file_records;
mod keys;
mod live;
mod scripts;
pub mod upload_sessions;

use std::sync::Arc;

use async_trait::async_trait;
use fred::{
    clients::{Client, SubscriberClient},
    prelude::{ClientLike, HashesInterface, SortedSetsInterface},
    types::{ConnectHandle, sorted_sets::Ordering},
};
use futures::future::{join_all, try_join_all};
use tokio::{sync::broadcast, task::JoinHandle};

use self::{
    connection::LIVE_CAPACITY,
    keys::{ConversationKeys, Keys},
    live::LiveFeed,
    scripts::Scripts,
};
use super::messages::{
    ActivityCursor, AppendOutcome, ChangeOutcome, ConversationCap, ConversationEntry,
    CreateOutcome, CreateRequest, DeleteOutcome, EventPage, LiveSignal, LiveWatch, MessageStore,
    NewConversation, NewMessage, ReadOutcome, ReadState, Rejection, Retention, StoreError,
    StoreResult,
};
use crate::{
    config::RedisSettings,
    error::BoxError,
    health::DependencyCheck,
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::{
        Conversation, Event, EventKind, MAX_PARTICIPANTS, Message, UnixMillis, now_millis,
    },
};

/// Most conversations one `conversations_of` round trip loads.
const INDEX_PAGE: usize = 500;
/// Longest idempotency window Redis can hold as an expiry (100 years).
const MAX_IDEMPOTENCY_WINDOW_SECS: u64 = 100 * 365 * 24 * 3600;
/// An index entry whose user is not a participant is dropped by a listing once it is this old:
/// far longer than a reservation waits for its change (one script call).
const STALE_INDEX_ENTRY: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a delete re-reads a message that changed between its read and its script.
const DELETE_ATTEMPTS: usize = 3;

/// The Redis-backed [`MessageStore`]; see the module docs for the data layout.
pub struct RedisMessageStore {
    client: Client,
    subscriber: SubscriberClient,
    keys: Keys,
    scripts: Scripts,
    retention: Retention,
    cap: ConversationCap,
    live: broadcast::Sender<LiveSignal>,
    feed: Arc<LiveFeed>,
    /// The live feed's tasks; aborted when the store is dropped.
    tasks: Vec<JoinHandle<()>>,
    /// The clients' connection tasks; they end when the clients quit on drop.
    connections: Vec<ConnectHandle>,
}

impl std::fmt::Debug for RedisMessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMessageStore")
            .field("keys", &self.keys)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl RedisMessageStore {
    /// Connects a command client and a subscriber client (for the live feed) to `redis.url`,
    /// with `redis.password` (raw, no percent-encoding) taking precedence over the URL's.
    /// A `redis://` URL naming one node of a Redis Cluster is followed to the whole cluster;
    /// `rediss://` uses TLS, trusting the system's roots (or `SSL_CERT_FILE`).
    /// Fails if Redis cannot be reached now; afterwards both clients reconnect on their own.
    pub async fn connect(
        settings: &RedisSettings,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        let (config, client, connection) = connection::command_client(settings).await?;
        let scripts = Scripts::new();
        if let Err(error) = scripts.load(&client).await {
            let _ = client.quit().await;
            return Err(error);
        }
        let subscriber = match connection::subscriber_client(&config, settings) {
            Ok(subscriber) => subscriber,
            Err(error) => {
                let _ = client.quit().await;
                return Err(error);
            }
        };
        let mut connections = vec![connection];
        match subscriber.init().await {
            Ok(handle) => connections.push(handle),
            Err(error) => {
                let _ = client.quit().await;
                return Err(error.into());
            }
        }

        let keys = Keys::new(&settings.key_prefix);
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        let (feed, tasks) = LiveFeed::start(subscriber.clone(), keys.clone(), live.clone());
        tracing::info!(key_prefix = %settings.key_prefix, "connected to redis");
        Ok(Self {
            client,
            subscriber,
            keys,
            scripts,
            retention,
            cap: ConversationCap::DEFAULT,
            live,
            feed,
            tasks,
            connections,
        })
    }

    /// Caps the conversations one user may be in (default [`ConversationCap::DEFAULT`]).
    pub fn with_conversation_cap(mut self, cap: ConversationCap) -> Self {
        self.cap = cap;
        self
    }

    /// Reserves a place in each of `users`' conversation index for `id` (in their slots, one
    /// script each, so the cap holds against any number of concurrent requests). Returns the
    /// users newly reserved, and the refusal (`TooManyConversations`, one of `users` is already
    /// in the cap's worth) or error, if any: the caller then takes the reservations back with
    /// [`Self::undo_reservations`], which it may know the participants for.
    async fn reserve_room(
        &self,
        id: ConversationId,
        users: &[UserId],
    ) -> (Vec<UserId>, StoreResult<()>) {
        let member = id.to_string();
        let cap = self.cap.0.to_string();
        let replies = join_all(users.iter().map(|user| {
            self.scripts.reserve_conversation.run(
                &self.client,
                vec![self.keys.user_conversations(user)],
                vec![member.clone(), cap.clone()],
            )
        }))
        .await;
        let mut reserved = Vec::new();
        let mut outcome = Ok(());
        for (user, reply) in users.iter().zip(replies) {
            let refusal = match reply {
                Ok(reply) => match reply.status() {
                    "reserved" => {
                        reserved.push(user.clone());
                        continue;
                    }
                    "present" => continue,
                    "full" => Rejection::TooManyConversations.into(),
                    _ => reply.unexpected(),
                },
                Err(error) => error,
            };
            if outcome.is_ok() {
                outcome = Err(refusal);
            }
        }
        (reserved, outcome)
    }

    /// Takes back the places [`Self::reserve_room`] reserved for a change that did not happen,
    /// except for users who are `participants` after all (a concurrent request added them; read
    /// from the conversation when not given). A reservation this cannot take back (Redis
    /// unreachable) is dropped by a later listing.
    async fn undo_reservations(
        &self,
        id: ConversationId,
        reserved: &[UserId],
        participants: Option<&[UserId]>,
    ) {
        if reserved.is_empty() {
            return;
        }
        let loaded;
        let participants = match participants {
            Some(participants) => participants,
            None => match self.load_conversation(id).await {
                Ok(found) => {
                    loaded = found.map(|(conversation, _)| conversation.participants);
                    loaded.as_deref().unwrap_or_default()
                }
                Err(error) => {
                    tracing::warn!(%error, conversation_id = %id, "conversation reservations left for a later listing to drop");
                    return;
                }
            },
        };
        for user in reserved.iter().filter(|user| !participants.contains(user)) {
            self.forget_conversation(id, user).await;
        }
    }

    /// Drops index entries a listing found stale (see `forget_stale_conversation.lua`); a
    /// failure only leaves them for the next listing.
    async fn forget_stale(&self, user: &UserId, stale: &[(ConversationId, UnixMillis)]) {
        let index = self.keys.user_conversations(user);
        let forgotten = try_join_all(stale.iter().map(|(id, joined)| {
            self.scripts.forget_stale_conversation.run(
                &self.client,
                vec![index.clone()],
                vec![id.to_string(), joined.to_string()],
            )
        }))
        .await;
        if let Err(error) = forgotten {
            tracing::warn!(%error, "dropping stale conversation index entries failed");
        }
    }

    /// The ARGV every write script starts with (see `prelude.lua`).
    fn write_args(&self, id: ConversationId, base: &str) -> Vec<String> {
        let max_age_ms = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
        vec![
            base.to_owned(),
            id.to_string(),
            self.keys.conversation(id).channel(),
            self.retention.max_events.to_string(),
            max_age_ms.to_string(),
        ]
    }

    /// The conversation id `request` maps to: the one it created within its window, else
    /// `candidate`, now remembered for the window.
    async fn claim_request(
        &self,
        creator: &UserId,
        request: &CreateRequest,
        candidate: ConversationId,
    ) -> StoreResult<ConversationId> {
        let window_ms = u64::try_from(request.window.as_millis())
            .unwrap_or(u64::MAX)
            .min(MAX_IDEMPOTENCY_WINDOW_SECS * 1000);
        // A zero window remembers nothing (and PX refuses 0).
        if window_ms == 0 {
            return Ok(candidate);
        }
        let reply = self
            .scripts
            .claim_request
            .run(
                &self.client,
                vec![
                    self.keys
                        .create_request(creator, request.request_id.as_str()),
                ],
                vec![candidate.to_string(), window_ms.to_string()],
            )
            .await?;
        ConversationId::parse(reply.status())
            .map_err(|error| StoreError::Corrupt(format!("request claim: {error}")))
    }

    async fn load_conversation(
        &self,
        id: ConversationId,
    ) -> StoreResult<Option<(Conversation, String)>> {
        let keys = self.keys.conversation(id);
        let reply = self
            .scripts
            .load_conversation
            .run(&self.client, vec![keys.meta(), keys.members()], Vec::new())
            .await?;
        match reply.status() {
            "" => Ok(None),
            "found" => codec::conversation(id, reply.rest()).map(Some),
            _ => Err(reply.rejection()),
        }
    }

    /// Records in each user's conversation index that they joined `id` at `joined` (never
    /// backwards). Sends do not come here: a conversation's message activity is its meta's
    /// `active`, read when listing. The write already committed, so a failure here is logged,
    /// not returned.
    async fn record_joins(&self, id: ConversationId, users: &[UserId], joined: UnixMillis) {
        if users.is_empty() {
            return;
        }
        let pipeline = self.client.pipeline();
        let member = id.to_string();
        for user in users {
            let queued: Result<(), _> = pipeline
                .zadd(
                    self.keys.user_conversations(user),
                    None,
                    Some(Ordering::GreaterThan),
                    false,
                    false,
                    (joined as f64, member.as_str()),
                )
                .await;
            if let Err(error) = queued {
                tracing::warn!(%error, conversation_id = %id, "could not queue a conversation index update");
            }
        }
        let failed = pipeline
            .try_all::<i64>()
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect::<Vec<_>>();
        if let Some(error) = failed.first() {
            tracing::warn!(
                %error,
                failed = failed.len(),
                conversation_id = %id,
                "conversation index update failed; lists may lag until the next message"
            );
        }
    }

    async fn forget_conversation(&self, id: ConversationId, user: &UserId) {
        let removed: Result<i64, _> = self
            .client
            .zrem(self.keys.user_conversations(user), id.to_string())
            .await;
        if let Err(error) = removed {
            tracing::warn!(%error, conversation_id = %id, "conversation index removal failed");
        }
    }
}

/// The outcome of add_participants / remove_participant from their script's reply.
fn change_outcome(id: ConversationId, reply: &scripts::Reply) -> StoreResult<ChangeOutcome> {
    match reply.status() {
        "unchanged" => Ok(ChangeOutcome::Unchanged(
            codec::conversation(id, reply.rest())?.0,
        )),
        "changed" => {
            let event = codec::event(id, reply.field(0)?)?;
            let (conversation, _) = codec::conversation(id, &reply.rest()[1..])?;
            Ok(ChangeOutcome::Changed(conversation, event))
        }
        _ => Err(reply.rejection()),
    }
}

impl Drop for RedisMessageStore {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // QUIT ends both connection tasks (and their reconnect loops) gracefully.
                let client = self.client.clone();
                let subscriber = self.subscriber.clone();
                runtime.spawn(async move {
                    let _ = client.quit().await;
                    let _ = subscriber.quit().await;
                });
            }
            Err(_) => {
                for connection in &self.connections {
                    connection.abort();
                }
            }
        }
    }
}

#[async_trait]
impl MessageStore for RedisMessageStore {
    async fn create_conversation(&self, mut new: NewConversation) -> StoreResult<CreateOutcome> {
        if let Some(request) = &new.request {
            new.id = self.claim_request(&new.created_by, request, new.id).await?;
        }
        let reserved = match self.reserve_room(new.id, &new.participants).await {
            (reserved, Ok(())) => reserved,
            // A retry of a create that happened answers as before, whatever the lists hold now.
            (reserved, Err(full @ StoreError::Rejected(Rejection::TooManyConversations))) => {
                let existing = match self.load_conversation(new.id).await {
                    Ok(existing) => existing,
                    Err(error) => {
                        self.undo_reservations(new.id, &reserved, None).await;
                        return Err(error);
                    }
                };
                let participants = existing
                    .as_ref()
                    .map_or(&[][..], |(conversation, _)| &conversation.participants[..]);
                self.undo_reservations(new.id, &reserved, Some(participants))
                    .await;
                if existing.is_none() {
                    return Err(full);
                }
                Vec::new()
            }
            (reserved, Err(error)) => {
                self.undo_reservations(new.id, &reserved, None).await;
                return Err(error);
            }
        };
        let keys = self.keys.conversation(new.id);
        let mut args = self.write_args(new.id, keys.base());
        args.extend([
            new.title,
            new.created_by.as_str().to_owned(),
            new.fingerprint,
        ]);
        args.extend(new.participants.iter().map(|user| user.as_str().to_owned()));
        let reply = match self
            .scripts
            .create_conversation
            .run(&self.client, keys.for_write(), args)
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                self.undo_reservations(new.id, &reserved, None).await;
                return Err(error);
            }
        };
        let created = match reply.status() {
            "created" => true,
            "existing" => false,
            _ => {
                self.undo_reservations(new.id, &reserved, None).await;
                return Err(reply.rejection());
            }
        };
        let (conversation, fingerprint) = codec::conversation(new.id, reply.rest())?;
        if !created {
            // A retry naming other users (a reused request_id) reserved places it did not use.
            self.undo_reservations(new.id, &reserved, Some(&conversation.participants))
                .await;
        }
        // Also on `existing`: a retry repairs an index update its first attempt did not finish.
        self.record_joins(new.id, &conversation.participants, conversation.create_time)
            .await;
        Ok(if created {
            CreateOutcome::Created(conversation)
        } else {
            CreateOutcome::Existing {
                conversation,
                fingerprint,
            }
        })
    }

    async fn conversation(&self, id: ConversationId) -> StoreResult<Option<Conversation>> {
        Ok(self
            .load_conversation(id)
            .await?
            .map(|(conversation, _)| conversation))
    }

    async fn add_participants(
        &self,
        id: ConversationId,
        by: &UserId,
        users: &[UserId],
    ) -> StoreResult<ChangeOutcome> {
        let keys = self.keys.conversation(id);
        let mut args = self.write_args(id, keys.base());
        // Participation first: who is full is no business of a non-participant, and an
        // outsider's request should not even reserve.
        let conversation = match self.load_conversation(id).await? {
            None => return Err(Rejection::ConversationNotFound.into()),
            Some((conversation, _)) if !conversation.has_participant(by) => {
                return Err(Rejection::NotParticipant.into());
            }
            Some((conversation, _)) => conversation,
        };
        // Also checked by the script; here first so a conversation that is full is reported
        // as such (as the in-process store does), not as a full user.
        let mut added: Vec<UserId> = users
            .iter()
            .filter(|user| !conversation.has_participant(user))
            .cloned()
            .collect();
        // The store does not rely on its caller having dropped repeats.
        added.sort_unstable();
        added.dedup();
        if conversation.participants.len() + added.len() > MAX_PARTICIPANTS {
            return Err(Rejection::TooManyParticipants.into());
        }
        let (reserved, room) = self.reserve_room(id, &added).await;
        if let Err(refused) = room {
            self.undo_reservations(id, &reserved, Some(&conversation.participants))
                .await;
            return Err(refused);
        }
        args.extend([by.as_str().to_owned(), MAX_PARTICIPANTS.to_string()]);
        args.extend(users.iter().map(|user| user.as_str().to_owned()));
        let outcome = match self
            .scripts
            .add_participants
            .run(&self.client, keys.for_write(), args)
            .await
            .and_then(|reply| change_outcome(id, &reply))
        {
            Ok(outcome) => outcome,
            Err(error) => {
                self.undo_reservations(id, &reserved, None).await;
                return Err(error);
            }
        };
        if let ChangeOutcome::Changed(_, event) = &outcome
            && let EventKind::ParticipantsChanged { added, .. } = &event.kind
        {
            self.record_joins(id, added, event.create_time).await;
        }
        Ok(outcome)
    }

    async fn remove_participant(
        &self,
        id: ConversationId,
        by: &UserId,
        user: &UserId,
    ) -> StoreResult<ChangeOutcome> {
        let keys = self.keys.conversation(id);
        let mut args = self.write_args(id, keys.base());
        args.extend([by.as_str().to_owned(), user.as_str().to_owned()]);
        let reply = self
            .scripts
            .remove_participant
            .run(&self.client, keys.for_write(), args)
            .await?;
        let outcome = change_outcome(id, &reply)?;
        if matches!(outcome, ChangeOutcome::Changed(..)) {
            self.forget_conversation(id, user).await;
        }
        Ok(outcome)
    }

    async fn append_message(&self, new: NewMessage) -> StoreResult<AppendOutcome> {
        let id = new.conversation_id;
        let keys = self.keys.conversation(id);
        let record = serde_json::to_string(&new.record)
            .map_err(|error| StoreError::Corrupt(format!("message record: {error}")))?;
        let sender = &new.record.sender;
        let mut script_keys = keys.for_write();
        script_keys.push(keys.sent_by(sender));
        let mut args = self.write_args(id, keys.base());
        args.extend([
            sender.as_str().to_owned(),
            new.record.id.to_string(),
            record,
            new.fingerprint,
            new.idempotency_window_secs
                .min(MAX_IDEMPOTENCY_WINDOW_SECS)
                .to_string(),
            ConversationKeys::idempotency_field(sender, new.record.client_message_id.as_str()),
        ]);
        if let Some(file) = new
            .record
            .content
            .as_ref()
            .and_then(|content| content.file.as_ref())
        {
            script_keys.push(keys.file_messages(&file.file_id));
            args.push(file.expire_time.to_string());
        }
        let reply = self
            .scripts
            .append_message
            .run(&self.client, script_keys, args)
            .await?;
        match reply.status() {
            "appended" => {
                let message = codec::event(id, reply.field(0)?)?
                    .created_message()
                    .ok_or_else(|| {
                        StoreError::Corrupt("append_message recorded no MessageCreated".to_owned())
                    })?;
                Ok(AppendOutcome::Appended(message))
            }
            "duplicate" => Ok(AppendOutcome::Duplicate {
                fingerprint: reply.field(0)?.to_owned(),
                message: codec::message(id, reply.field(1)?)?,
            }),
            _ => Err(reply.rejection()),
        }
    }

    async fn delete_message(
        &self,
        id: ConversationId,
        message_id: MessageId,
        by: &UserId,
    ) -> StoreResult<DeleteOutcome> {
        let keys = self.keys.conversation(id);
        let deleted = serde_json::to_string(&EventKind::MessageDeleted {
            message_id,
            deleted_by: by.clone(),
        })
        .map_err(|error| StoreError::Corrupt(format!("deleted event: {error}")))?;
        for _ in 0..DELETE_ATTEMPTS {
            // The tombstone is built here from what is stored; the script checks that nothing
            // changed in between. Missing messages still go through the script, which decides
            // which rejection applies.
            let stored: Option<String> = self
                .client
                .hget(keys.messages(), message_id.to_string())
                .await?;
            let (stored, tombstone) = match stored {
                Some(stored) => {
                    let message = codec::message(id, &stored)?;
                    let tombstone = serde_json::to_string(&message.record.tombstone())
                        .map_err(|error| StoreError::Corrupt(format!("tombstone: {error}")))?;
                    (stored, tombstone)
                }
                None => (String::new(), String::new()),
            };
            let mut script_keys = keys.for_write();
            script_keys.push(keys.sent_by(by));
            let mut args = self.write_args(id, keys.base());
            args.extend([
                by.as_str().to_owned(),
                message_id.to_string(),
                stored,
                tombstone,
                deleted.clone(),
            ]);
            let reply = self
                .scripts
                .delete_message
                .run(&self.client, script_keys, args)
                .await?;
            return match reply.status() {
                "retry" => continue,
                "already_deleted" => Ok(DeleteOutcome::AlreadyDeleted(codec::message(
                    id,
                    reply.field(0)?,
                )?)),
                "deleted" => Ok(DeleteOutcome::Deleted(
                    codec::message(id, reply.field(0)?)?,
                    codec::event(id, reply.field(1)?)?,
                )),
                _ => Err(reply.rejection()),
            };
        }
        Err(StoreError::Unavailable(
            "the message kept changing while it was being deleted".into(),
        ))
    }

    async fn delete_file_messages(
        &self,
        id: ConversationId,
        file_id: &FileId,
        by: &UserId,
        file_expire_time: UnixMillis,
    ) -> StoreResult<Vec<Event>> {
        let keys = self.keys.conversation(id);
        let file_key = keys.file_messages(file_id);
        for _ in 0..DELETE_ATTEMPTS {
            // Tombstones are built here from what is stored (Lua would re-encode large numbers
            // as floats); the script checks that nothing changed in between.
            let listed = self
                .scripts
                .file_messages
                .run(
                    &self.client,
                    vec![file_key.clone(), keys.messages()],
                    Vec::new(),
                )
                .await?
                .into_fields();
            let mut args = self.write_args(id, keys.base());
            args.extend([by.as_str().to_owned(), file_expire_time.to_string()]);
            for pair in listed.chunks_exact(2) {
                let [message_id, stored] = pair else {
                    unreachable!("chunks_exact(2)")
                };
                let message = codec::message(id, stored)?;
                let (tombstone, deleted) = if message.record.is_deleted() {
                    (String::new(), String::new())
                } else {
                    let tombstone = serde_json::to_string(&message.record.tombstone())
                        .map_err(|error| StoreError::Corrupt(format!("tombstone: {error}")))?;
                    let deleted = serde_json::to_string(&EventKind::MessageDeleted {
                        message_id: message.record.id,
                        deleted_by: by.clone(),
                    })
                    .map_err(|error| StoreError::Corrupt(format!("deleted event: {error}")))?;
                    (tombstone, deleted)
                };
                args.extend([message_id.clone(), stored.clone(), tombstone, deleted]);
            }
            let mut script_keys = keys.for_write();
            script_keys.push(file_key.clone());
            let reply = self
                .scripts
                .delete_file_messages
                .run(&self.client, script_keys, args)
                .await?;
            return match reply.status() {
                "retry" => continue,
                "deleted" => reply
                    .rest()
                    .iter()
                    .map(|member| codec::event(id, member))
                    .collect(),
                _ => Err(reply.rejection()),
            };
        }
        Err(StoreError::Unavailable(
            "the file's messages kept changing while they were being deleted".into(),
        ))
    }

    async fn mark_read(
        &self,
        id: ConversationId,
        user: &UserId,
        sequence: u64,
    ) -> StoreResult<ReadOutcome> {
        let keys = self.keys.conversation(id);
        let receipt = serde_json::to_string(&EventKind::ReadReceipt {
            user_id: user.clone(),
            read_sequence: sequence,
        })
        .map_err(|error| StoreError::Corrupt(format!("read receipt: {error}")))?;
        let mut args = self.write_args(id, keys.base());
        args.extend([user.as_str().to_owned(), sequence.to_string(), receipt]);
        let reply = self
            .scripts
            .mark_read
            .run(&self.client, keys.for_write(), args)
            .await?;
        match reply.status() {
            "advanced" => Ok(ReadOutcome::Advanced(codec::event(id, reply.field(0)?)?)),
            "unchanged" => Ok(ReadOutcome::Unchanged {
                read_sequence: parse_number("read sequence", reply.field(0)?)?,
            }),
            _ => Err(reply.rejection()),
        }
    }

    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: usize,
    ) -> StoreResult<EventPage> {
        let keys = self.keys.conversation(id);
        let fields = self
            .scripts
            .events_after
            .run(
                &self.client,
                vec![keys.meta(), keys.events(), keys.messages(), keys.history()],
                vec![after.to_string(), limit_arg(limit)],
            )
            .await?
            .into_fields();
        let Some((trimmed_through, members)) = fields.split_first() else {
            return Err(StoreError::Corrupt("events_after: empty reply".to_owned()));
        };
        Ok(EventPage {
            events: members
                .iter()
                .map(|member| codec::event(id, member))
                .collect::<Result<_, _>>()?,
            trimmed_through: parse_number("trimmed_through", trimmed_through)?,
        })
    }

    async fn messages_before(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let keys = self.keys.conversation(id);
        let upper = before.map_or_else(|| "+inf".to_owned(), |before| format!("({before}"));
        self.scripts
            .messages_before
            .run(
                &self.client,
                vec![keys.history(), keys.messages()],
                vec![upper, limit_arg(limit)],
            )
            .await?
            .into_fields()
            .iter()
            .map(|stored| codec::message(id, stored))
            .collect()
    }

    async fn message(
        &self,
        id: ConversationId,
        message_id: MessageId,
    ) -> StoreResult<Option<Message>> {
        let stored: Option<String> = self
            .client
            .hget(
                self.keys.conversation(id).messages(),
                message_id.to_string(),
            )
            .await?;
        stored.map(|stored| codec::message(id, &stored)).transpose()
    }

    async fn conversations_of(
        &self,
        user: &UserId,
        cursor: Option<&ActivityCursor>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Fan-out on read: the index holds when the user joined each conversation, and each
        // conversation's meta holds when its newest message was sent; a conversation's activity
        // for this user is the later of the two (what updating every member's index on every
        // send used to store). Sends thus cost the same at 2 or 1000 participants, and a page
        // costs one HGET per conversation of the user (pipelined; in the conversations' slots).
        let joined: Vec<(String, f64)> = self
            .client
            .zrange(
                self.keys.user_conversations(user),
                0,
                -1,
                None,
                false,
                None,
                true,
            )
            .await?;
        // (activity, id, joined): ordered by activity, then id (ids are unique).
        let mut ranked = Vec::with_capacity(joined.len());
        for (raw, score) in &joined {
            let id = ConversationId::parse(raw)
                .map_err(|error| StoreError::Corrupt(format!("conversation index: {error}")))?;
            let joined = score.round() as UnixMillis;
            ranked.push((joined, id, joined));
        }
        // In batches: a user in very many conversations never has all their reads in flight.
        for batch in ranked.chunks_mut(INDEX_PAGE) {
            let active: Vec<Option<String>> = try_join_all(batch.iter().map(|(_, id, _)| {
                self.client
                    .hget::<Option<String>, _, _>(self.keys.conversation(*id).meta(), "active")
            }))
            .await?;
            for ((activity, _, _), active) in batch.iter_mut().zip(active) {
                if let Some(active) = active {
                    *activity = (*activity).max(parse_score(&active)?);
                }
            }
        }
        // Newest first, ties by id descending; strictly after the cursor.
        ranked.retain(|(activity, id, _)| {
            cursor.is_none_or(|cursor| (*activity, *id) < (cursor.activity, cursor.conversation_id))
        });
        ranked.sort_unstable_by_key(|&(activity, id, _)| std::cmp::Reverse((activity, id)));
        let mut entries = Vec::new();
        let mut stale = Vec::new();
        let stale_before = now_millis() - STALE_INDEX_ENTRY.as_millis() as UnixMillis;
        'page: for chunk in ranked.chunks(limit.min(INDEX_PAGE)) {
            let loaded =
                try_join_all(chunk.iter().map(|(_, id, _)| self.load_conversation(*id))).await?;
            for ((activity, id, joined), conversation) in chunk.iter().zip(loaded) {
                // Entries the index still lists although the user left (the index lags), is
                // only about to join (a reservation) or the conversation is gone are skipped;
                // long-standing ones are dropped, so they stop counting against the cap.
                if let Some((conversation, _)) = conversation
                    && conversation.has_participant(user)
                {
                    entries.push(ConversationEntry {
                        conversation,
                        activity: *activity,
                    });
                    if entries.len() == limit {
                        break 'page;
                    }
                } else if *joined < stale_before {
                    stale.push((*id, *joined));
                }
            }
        }
        self.forget_stale(user, &stale).await;
        Ok(entries)
    }

    async fn read_state(&self, id: ConversationId, user: &UserId) -> StoreResult<ReadState> {
        let keys = self.keys.conversation(id);
        let fields = self
            .scripts
            .read_state
            .run(
                &self.client,
                vec![
                    keys.reads(),
                    keys.deleted(),
                    keys.sent_by(user),
                    keys.history(),
                    keys.messages(),
                ],
                vec![user.as_str().to_owned()],
            )
            .await?
            .into_fields();
        let [read_sequence, unread_count, last] = fields.as_slice() else {
            return Err(StoreError::Corrupt(format!(
                "read_state: {} fields",
                fields.len()
            )));
        };
        Ok(ReadState {
            read_sequence: parse_number("read sequence", read_sequence)?,
            unread_count: parse_number("unread count", unread_count)?,
            last_message: if last.is_empty() {
                None
            } else {
                Some(codec::message(id, last)?)
            },
        })
    }

    fn live_events(&self) -> broadcast::Receiver<LiveSignal> {
        self.live.subscribe()
    }

    async fn watch(&self, id: ConversationId) -> StoreResult<LiveWatch> {
        self.feed.watch(id).await
    }
}

#[async_trait]
impl DependencyCheck for RedisMessageStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), BoxError> {
        if !self.client.is_connected() {
            return Err("not connected to redis".into());
        }
        if !self.subscriber.is_connected() {
            return Err("the redis live-feed subscriber is not connected".into());
        }
        let _: String = self.client.ping(None).await?;
        Ok(())
    }
}

/// A `LIMIT` count Redis accepts (it reads a signed 64-bit number).
fn limit_arg(limit: usize) -> String {
    limit.min(i64::MAX as usize).to_string()
}

fn parse_number(what: &str, raw: &str) -> StoreResult<u64> {
    raw.parse()
        .map_err(|error| StoreError::Corrupt(format!("{what} {raw:?}: {error}")))
}

/// A ZSET score holding milliseconds (Redis may print large scores in exponent form).
fn parse_score(raw: &str) -> StoreResult<UnixMillis> {
    raw.parse::<i64>().or_else(|_| {
        raw.parse::<f64>()
            .map(|score| score as i64)
            .map_err(|error| StoreError::Corrupt(format!("activity score {raw:?}: {error}")))
    })
}
