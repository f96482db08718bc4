//! Subscriptions that resubscribe after the last sequence delivered, so the consumer sees every
//! event once and in order across disconnects and service restarts.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::{Client, error::Error, pb};

/// Called before each resubscription: the error that ended the stream and the sequence the
/// next stream continues after.
pub type ReconnectReport = Arc<dyn Fn(&Error, u64) + Send + Sync>;

/// Where a subscription starts and who hears about its reconnects.
#[derive(Clone, Default)]
pub struct SubscribeOptions {
    /// Deliver events with a sequence above this (0: the whole retained history).
    pub after_sequence: u64,
    /// Told about each reconnect (e.g. to show "reconnecting" to a person).
    pub on_reconnect: Option<ReconnectReport>,
}

impl std::fmt::Debug for SubscribeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeOptions")
            .field("after_sequence", &self.after_sequence)
            .finish_non_exhaustive()
    }
}

/// The events of a conversation, in sequence order, each once. Ends with an `Err` item when the
/// subscription cannot go on: the caller left the conversation (`NOT_A_PARTICIPANT`), the
/// history it would continue from is gone (`HISTORY_TRUNCATED`), or the service stayed
/// unreachable beyond the client's [`ReconnectPolicy`](crate::ReconnectPolicy). Dropping it
/// ends the subscription.
pub struct Subscription {
    events: mpsc::Receiver<Result<pb::ConversationEvent, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for Subscription {
    type Item = Result<pb::ConversationEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Subscribes to a conversation's events after `options.after_sequence`. When the stream
    /// breaks (the connection, a service restart, `SLOW_CONSUMER`), it resubscribes with
    /// backoff after the last sequence it delivered, and drops any event it already delivered:
    /// the consumer sees every event exactly once, in order.
    ///
    /// ```no_run
    /// # async fn example(client: svcmsg_client::Client) -> Result<(), svcmsg_client::Error> {
    /// use futures::StreamExt;
    /// use svcmsg_client::SubscribeOptions;
    ///
    /// let latest = client.conversation("CONVERSATION_ID").await?.last_sequence;
    /// let options = SubscribeOptions { after_sequence: latest, ..Default::default() };
    /// let mut events = client.subscribe("CONVERSATION_ID", options);
    /// while let Some(event) = events.next().await {
    ///     let event = event?;
    ///     println!("#{}", event.sequence);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self, conversation_id: &str, options: SubscribeOptions) -> Subscription {
        // Small: a consumer that does not keep up slows the stream down (and, past the
        // service's buffer, gets resubscribed after SLOW_CONSUMER) instead of filling memory.
        let (sender, events) = mpsc::channel(16);
        let client = self.clone();
        let conversation_id = conversation_id.to_owned();
        let task = tokio::spawn(async move {
            client
                .run_subscription(conversation_id, options, sender)
                .await;
        });
        Subscription { events, task }
    }

    async fn run_subscription(
        &self,
        conversation_id: String,
        options: SubscribeOptions,
        sender: mpsc::Sender<Result<pb::ConversationEvent, Error>>,
    ) {
        let reconnect = self.reconnect_policy().clone();
        let mut delivered = options.after_sequence;
        let mut failures = 0;
        loop {
            let error = match self.subscribe_once(&conversation_id, delivered).await {
                Ok(mut stream) => loop {
                    match stream.next().await {
                        Some(Ok(message)) => {
                            let Some(event) = message.event else { continue };
                            // A replay after a reconnect may repeat what was delivered.
                            if event.sequence <= delivered {
                                continue;
                            }
                            delivered = event.sequence;
                            failures = 0;
                            if sender.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(status)) => break Error::from(status),
                        None => {
                            break Error::from(tonic::Status::unavailable(
                                "the subscription stream ended",
                            ));
                        }
                    }
                },
                Err(error) => error,
            };
            if !resubscribes(&error) {
                let _ = sender.send(Err(error)).await;
                return;
            }
            failures += 1;
            if reconnect.gives_up_after(failures) {
                let _ = sender.send(Err(error)).await;
                return;
            }
            if let Some(report) = &options.on_reconnect {
                report(&error, delivered);
            }
            let pause = reconnect.backoff(failures);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = sender.closed() => return,
            }
        }
    }

    async fn subscribe_once(
        &self,
        conversation_id: &str,
        after_sequence: u64,
    ) -> Result<tonic::Streaming<pb::SubscribeMessagesResponse>, Error> {
        let request = self.request(pb::SubscribeMessagesRequest {
            conversation_id: conversation_id.to_owned(),
            after_sequence,
        })?;
        Ok(self
            .messaging
            .clone()
            .subscribe_messages(request)
            .await?
            .into_inner())
    }
}

/// Whether a subscription continues after `error`.
fn resubscribes(error: &Error) -> bool {
    let Some(status) = error.status() else {
        return false;
    };
    status.is_transport_failure() || status.reason.as_deref() == Some("SLOW_CONSUMER")
}
