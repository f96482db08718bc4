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

use std::{collections::HashMap, sync::Arc};

use fred::{clients::SubscriberClient, interfaces::EventInterface, prelude::PubsubInterface};
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

/// Which conversations' channels this replica is subscribed to; see the module docs.
pub(super) struct LiveFeed {
    subscriber: SubscriberClient,
    keys: Keys,
    /// Live watches per conversation. Held across the `SUBSCRIBE` / `UNSUBSCRIBE` round trips.
    watched: Mutex<HashMap<ConversationId, usize>>,
    releases: mpsc::UnboundedSender<ConversationId>,
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
    /// Starts the feed and its release task; both end when the subscriber quits (when the
    /// store is dropped) or are aborted with the returned handles.
    pub(super) fn start(
        subscriber: SubscriberClient,
        keys: Keys,
        live: broadcast::Sender<LiveSignal>,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
        let (releases, released) = mpsc::unbounded_channel();
        let feed = Arc::new(Self {
            subscriber,
            keys,
            watched: Mutex::new(HashMap::new()),
            releases,
        });
        let tasks = vec![
            tokio::spawn(feed.clone().forward(live)),
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
        match watched.get_mut(&id) {
            Some(count) => *count += 1,
            None => {
                self.subscriber
                    .subscribe(self.keys.conversation(id).channel())
                    .await?;
                watched.insert(id, 1);
            }
        }
        Ok(LiveWatch::releasing(Release {
            id,
            releases: self.releases.clone(),
        }))
    }

    async fn release(self: Arc<Self>, mut released: mpsc::UnboundedReceiver<ConversationId>) {
        while let Some(id) = released.recv().await {
            let mut watched = self.watched.lock().await;
            let Some(count) = watched.get_mut(&id) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
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

    async fn forward(self: Arc<Self>, live: broadcast::Sender<LiveSignal>) {
        let mut messages = self.subscriber.message_rx();
        // Created after the first connection, so it only reports re-connections.
        let mut reconnects = self.subscriber.reconnect_rx();
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
                        let _ = live.send(LiveSignal::Resync);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Subscribes again to every watched channel, holding the lock so no watch or release
    /// interleaves. A failure here shows up again as the next re-connection.
    async fn resubscribe(&self) {
        let watched = self.watched.lock().await;
        let channels: Vec<String> = watched
            .keys()
            .map(|id| self.keys.conversation(*id).channel())
            .collect();
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            if let Err(error) = self.subscriber.subscribe(batch.to_vec()).await {
                tracing::warn!(%error, "resubscribing to the conversations' live channels failed");
                return;
            }
        }
        tracing::info!(
            channels = channels.len(),
            "live channels resubscribed after reconnecting"
        );
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
