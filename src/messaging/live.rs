//! Live fan-out inside one replica. The store's feed carries the committed events (from any
//! replica) of the conversations this replica watches for its streams (`MessageStore::watch`);
//! one dispatcher routes each to the local subscribers of its conversation through a
//! bounded channel per subscriber. A subscriber whose channel is full is cut off and told so
//! (it resumes from its last sequence), so one slow client never holds up the others and no
//! event is ever dropped silently.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::sync::{broadcast, mpsc};

use crate::{ids::ConversationId, store::messages::LiveSignal};

/// Routes the store's live feed to per-conversation subscribers.
#[derive(Default)]
pub struct LiveHub {
    subscribers: Mutex<HashMap<ConversationId, Vec<Subscriber>>>,
    next_id: AtomicU64,
}

struct Subscriber {
    id: u64,
    sender: mpsc::Sender<LiveSignal>,
    overflowed: Arc<AtomicBool>,
}

/// One subscriber's end: signals for its conversation, in commit order.
pub struct LiveReceiver {
    hub: Arc<LiveHub>,
    conversation_id: ConversationId,
    id: u64,
    receiver: mpsc::Receiver<LiveSignal>,
    overflowed: Arc<AtomicBool>,
}

/// Why a live receiver stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveEnd {
    /// Its buffer filled up: the client reads too slowly.
    Overflowed,
    /// The feed itself ended (the store went away).
    Closed,
}

impl LiveHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts routing `feed` until it closes.
    pub fn spawn_dispatcher(
        self: &Arc<Self>,
        mut feed: broadcast::Receiver<LiveSignal>,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                match feed.recv().await {
                    Ok(LiveSignal::Event(event)) => {
                        hub.deliver(Some(event.conversation_id), &LiveSignal::Event(event));
                    }
                    Ok(LiveSignal::Resync) => hub.deliver(None, &LiveSignal::Resync),
                    // The dispatcher fell behind the feed: some events were skipped here, so
                    // every subscriber must re-read from the store.
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "live feed lagged; resyncing subscribers");
                        hub.deliver(None, &LiveSignal::Resync);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    /// Registers a subscriber for `conversation_id` with room for `buffer` signals.
    pub fn register(
        self: &Arc<Self>,
        conversation_id: ConversationId,
        buffer: usize,
    ) -> LiveReceiver {
        let (sender, receiver) = mpsc::channel(buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let overflowed = Arc::new(AtomicBool::new(false));
        self.lock()
            .entry(conversation_id)
            .or_default()
            .push(Subscriber {
                id,
                sender,
                overflowed: overflowed.clone(),
            });
        LiveReceiver {
            hub: self.clone(),
            conversation_id,
            id,
            receiver,
            overflowed,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Vec<Subscriber>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `signal` to the subscribers of one conversation (or all, for `None`), cutting off
    /// those whose buffer is full.
    fn deliver(&self, conversation_id: Option<ConversationId>, signal: &LiveSignal) {
        let mut subscribers = self.lock();
        let mut deliver_to = |list: &mut Vec<Subscriber>| {
            list.retain(
                |subscriber| match subscriber.sender.try_send(signal.clone()) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        subscriber.overflowed.store(true, Ordering::Release);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                },
            );
        };
        match conversation_id {
            Some(id) => {
                if let Some(list) = subscribers.get_mut(&id) {
                    deliver_to(list);
                    if list.is_empty() {
                        subscribers.remove(&id);
                    }
                }
            }
            None => {
                subscribers.values_mut().for_each(&mut deliver_to);
                subscribers.retain(|_, list| !list.is_empty());
            }
        }
    }

    fn deregister(&self, conversation_id: ConversationId, id: u64) {
        let mut subscribers = self.lock();
        if let Some(list) = subscribers.get_mut(&conversation_id) {
            list.retain(|subscriber| subscriber.id != id);
            if list.is_empty() {
                subscribers.remove(&conversation_id);
            }
        }
    }
}

impl LiveReceiver {
    /// The next signal, or why there will be none.
    pub async fn recv(&mut self) -> Result<LiveSignal, LiveEnd> {
        match self.receiver.recv().await {
            Some(signal) => Ok(signal),
            None if self.overflowed.load(Ordering::Acquire) => Err(LiveEnd::Overflowed),
            None => Err(LiveEnd::Closed),
        }
    }
}

impl Drop for LiveReceiver {
    fn drop(&mut self) {
        self.hub.deregister(self.conversation_id, self.id);
    }
}
