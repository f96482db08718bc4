//! The live feed: one subscriber connection on `P:events` turned into [`LiveSignal`]s.
//!
//! Every replica publishes from inside its write scripts, so the channel carries all commits in
//! commit order. Whenever the subscriber reconnects it subscribes again and then sends
//! [`LiveSignal::Resync`], because whatever was published while it was away is lost.

use std::sync::Arc;

use fred::{clients::SubscriberClient, interfaces::EventInterface, prelude::PubsubInterface};
use tokio::{
    sync::broadcast::{self, error::RecvError},
    task::JoinHandle,
};

use super::codec;
use crate::store::messages::LiveSignal;

/// Subscribes to `channel` and spawns the task feeding `live`; the task ends when the subscriber
/// quits (when the store is dropped).
pub(super) async fn start(
    subscriber: SubscriberClient,
    channel: String,
    live: broadcast::Sender<LiveSignal>,
) -> Result<JoinHandle<()>, fred::error::Error> {
    let mut messages = subscriber.message_rx();
    subscriber.subscribe(channel.as_str()).await?;
    // Created after the first connection, so it only reports re-connections.
    let mut reconnects = subscriber.reconnect_rx();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                message = messages.recv() => match message {
                    Ok(message) => {
                        if message.channel != channel.as_str() {
                            continue;
                        }
                        forward(&live, message.value.as_str().as_deref());
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "live feed fell behind redis; resyncing subscribers");
                        let _ = live.send(LiveSignal::Resync);
                    }
                    Err(RecvError::Closed) => return,
                },
                reconnected = reconnects.recv() => match reconnected {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        // A failure here shows up again as the next re-connection.
                        if let Err(error) = subscriber.subscribe(channel.as_str()).await {
                            tracing::warn!(%error, "resubscribing to the redis event channel failed");
                        } else {
                            tracing::info!("redis event channel resubscribed after reconnecting");
                        }
                        let _ = live.send(LiveSignal::Resync);
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }))
}

fn forward(live: &broadcast::Sender<LiveSignal>, payload: Option<&str>) {
    let signal = match payload.map(codec::published_event) {
        Some(Ok(event)) => LiveSignal::Event(Arc::new(event)),
        Some(Err(error)) => {
            // Subscribers cannot be given this event: make them re-read the store instead.
            tracing::error!(%error, "undecodable event on the redis event channel");
            LiveSignal::Resync
        }
        None => {
            tracing::error!("non-text payload on the redis event channel");
            LiveSignal::Resync
        }
    };
    // No receivers is fine: nobody is subscribed right now.
    let _ = live.send(signal);
}
