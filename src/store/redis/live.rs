//! The live feed: one subscriber connection, subscribed to the channels of the conversations
//! this replica has live streams for, turned into [`LiveSignal`]s.
//!
//! Each conversation has its own channel, `P:{c:C}:live`, published on from inside the write
//! scripts, so a channel carries its conversation's commits in commit order. A replica receives
//! (and decodes) only the events of conversations it [watches](LiveFeed::watch), not every
//! event of every replica: with one shared channel each replica paid for all traffic, and Redis
//! wrote every event to every replica's connection.
//!
//! Watching is counted per conversation. The first watch subscribes and returns once Redis
//! confirmed it, so whatever a caller reads from the store afterwards overlaps with what the
//! feed delivers (no gap); the last release unsubscribes. Subscribing and unsubscribing happen
//! under one lock, so an unsubscribe can never overtake a newer subscribe of the same channel.
//! Whenever the subscriber reconnects it subscribes again to every watched channel and then
//! sends [`LiveSignal::Resync`], because whatever was published while it was away is lost.

use std::{collections::HashMap, sync::Arc, time::Duration};

use fred::{
    clients::SubscriberClient,
    interfaces::{ClientLike, EventInterface},
    prelude::PubsubInterface,
    types::{
        ClusterHash, Message, Value,
        config::{Options, Server},
    },
    util::redis_keyslot,
};
use tokio::{
    sync::{
        Mutex,
        broadcast::{self, error::RecvError},
        mpsc,
    },
    task::JoinHandle,
};

use super::{codec, connection::COMMAND_TIMEOUT, keys::Keys};
use crate::{
    ids::ConversationId,
    store::messages::{LiveSignal, LiveWatch, StoreError},
};

/// Most channels named in one `SUBSCRIBE` when subscribing again after a reconnect.
const RESUBSCRIBE_BATCH: usize = 1000;
/// Backoff between attempts to subscribe again after a reconnect.
const RESUBSCRIBE_FIRST_DELAY: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX_DELAY: Duration = Duration::from_secs(1);

/// Which conversations' channels this replica is subscribed to; see the module docs.
pub(super) struct LiveFeed {
    subscriber: SubscriberClient,
    keys: Keys,
    /// Held across the `SUBSCRIBE` / `UNSUBSCRIBE` round trips.
    watched: Mutex<HashMap<ConversationId, Watched>>,
    releases: mpsc::UnboundedSender<ConversationId>,
}

/// One watched conversation.
#[derive(Default)]
struct Watched {
    /// Live watches (each a [`Release`] not yet handled).
    count: usize,
    /// A round trip confirmed Redis has the subscription (since the last reconnect).
    confirmed: bool,
}

/// Given back through [`LiveFeed`]'s release task when a [`LiveWatch`] is dropped.
struct Release {
    id: ConversationId,
    releases: mpsc::UnboundedSender<ConversationId>,
}

impl Drop for Release {
    fn drop(&mut self) {
        // The feed is gone when this fails, and its subscriptions with it.
        let _ = self.releases.send(self.id);
    }
}

impl LiveFeed {
    /// Starts the feed and its release task; both run until aborted with the returned handles
    /// (when the store is dropped).
    pub(super) fn start(
        subscriber: SubscriberClient,
        keys: Keys,
        live: broadcast::Sender<LiveSignal>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let (releases, released) = mpsc::unbounded_channel();
        // Taken before any watch can subscribe, so no message of a watched channel is missed.
        // The subscriber is connected already: `reconnects` reports only re-connections.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        let feed = Arc::new(Self {
            subscriber,
            keys,
            watched: Mutex::new(HashMap::new()),
            releases,
        });
        let tasks = vec![
            tokio::spawn(feed.clone().forward(messages, reconnects, live)),
            tokio::spawn(feed.clone().release(released)),
        ];
        (feed, tasks)
    }

    /// Makes the feed carry conversation `id`'s events until the returned watch is dropped;
    /// returns once Redis confirmed the subscription.
    pub(super) async fn watch(&self, id: ConversationId) -> Result<LiveWatch, StoreError> {
        // Others' round trips happen under this lock: an unresponsive Redis must not queue
        // every new stream behind one command timeout each.
        let mut watched = tokio::time::timeout(COMMAND_TIMEOUT, self.watched.lock())
            .await
            .map_err(|_| StoreError::Timeout)?;
        // Counted before the round trip: if it fails, or the caller goes away meanwhile (the
        // SUBSCRIBE may still reach Redis), dropping the release unsubscribes again once no
        // one else watches. Until a round trip confirmed it, every watch makes its own.
        let release = Release {
            id,
            releases: self.releases.clone(),
        };
        let entry = watched.entry(id).or_default();
        entry.count += 1;
        if !entry.confirmed {
            self.subscribe(vec![self.keys.conversation(id).channel()])
                .await?;
            entry.confirmed = true;
        }
        Ok(LiveWatch::releasing(release))
    }

    /// Subscribes to `channels` and returns once Redis has acted on it. fred answers a
    /// SUBSCRIBE as soon as it is queued, before it is even written; a PING behind it on the
    /// same connection (in a cluster, fred sends every plain SUBSCRIBE to the node of its
    /// client id's slot) is answered only after Redis has run the SUBSCRIBE.
    async fn subscribe(&self, channels: Vec<String>) -> Result<(), StoreError> {
        self.subscriber.subscribe(channels).await?;
        let options = Options {
            cluster_hash: Some(ClusterHash::Custom(redis_keyslot(
                self.subscriber.id().as_bytes(),
            ))),
            ..Options::default()
        };
        let _: Value = self.subscriber.with_options(&options).ping(None).await?;
        Ok(())
    }

    async fn release(self: Arc<Self>, mut released: mpsc::UnboundedReceiver<ConversationId>) {
        while let Some(id) = released.recv().await {
            let mut watched = self.watched.lock().await;
            let Some(entry) = watched.get_mut(&id) else {
                continue;
            };
            entry.count -= 1;
            if entry.count > 0 {
                continue;
            }
            watched.remove(&id);
            // A failure leaves a subscription nobody reads: its events are dropped by the hub,
            // and it ends with the connection.
            if let Err(error) = self
                .subscriber
                .unsubscribe(self.keys.conversation(id).channel())
                .await
            {
                tracing::warn!(%error, conversation_id = %id, "unsubscribing from a conversation's live channel failed");
            }
        }
    }

    async fn forward(
        self: Arc<Self>,
        mut messages: broadcast::Receiver<Message>,
        mut reconnects: broadcast::Receiver<Server>,
        live: broadcast::Sender<LiveSignal>,
    ) {
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => forward(&live, message.value.as_str().as_deref()),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "live feed fell behind redis; resyncing subscribers");
                        let _ = live.send(LiveSignal::Resync);
                    }
                    Err(RecvError::Closed) => return,
                },
                reconnected = reconnects.recv() => match reconnected {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        self.resubscribe().await;
                        // Only now: streams re-read the store once the subscriptions hold
                        // again, so nothing published in between is missed.
                        let _ = live.send(LiveSignal::Resync);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Subscribes again to every watched channel, holding the lock so no watch or release
    /// interleaves, and tries until Redis confirmed it: no later re-connection event need come
    /// (in a cluster fred reports each node's reconnection while the others may still be down).
    async fn resubscribe(&self) {
        let mut delay = RESUBSCRIBE_FIRST_DELAY;
        loop {
            let mut watched = self.watched.lock().await;
            // None holds any more; a watch made meanwhile subscribes on its own.
            for entry in watched.values_mut() {
                entry.confirmed = false;
            }
            let channels: Vec<String> = watched
                .keys()
                .map(|id| self.keys.conversation(*id).channel())
                .collect();
            let mut failed = None;
            for batch in channels.chunks(RESUBSCRIBE_BATCH) {
                if let Err(error) = self.subscribe(batch.to_vec()).await {
                    failed = Some(error);
                    break;
                }
            }
            if failed.is_none() {
                for entry in watched.values_mut() {
                    entry.confirmed = true;
                }
            }
            drop(watched);
            match failed {
                None => {
                    tracing::info!(
                        channels = channels.len(),
                        "live channels resubscribed after reconnecting"
                    );
                    return;
                }
                Some(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "resubscribing to the conversations' live channels failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RESUBSCRIBE_MAX_DELAY);
                }
            }
        }
    }
}

fn forward(live: &broadcast::Sender<LiveSignal>, payload: Option<&str>) {
    let signal = match payload.map(codec::published_event) {
        Some(Ok(event)) => LiveSignal::Event(Arc::new(event)),
        Some(Err(error)) => {
            // Subscribers cannot be given this event: make them re-read the store instead.
            tracing::error!(%error, "undecodable event on a conversation's live channel");
            LiveSignal::Resync
        }
        None => {
            tracing::error!("non-text payload on a conversation's live channel");
            LiveSignal::Resync
        }
    };
    // No receivers is fine: nobody is subscribed right now.
    let _ = live.send(signal);
}
