//! The event stream of one live subscription: history from the store, then the live feed,
//! back to the store whenever the feed has a gap, with no gap and no duplicate.

use std::sync::Arc;

use futures::Stream;

use super::{
    live::{LiveEnd, LiveReceiver},
    model::{Event, EventKind},
};
use crate::{
    error::{Error, ErrorKind, Reason, Result},
    ids::{ConversationId, UserId},
    quota::CallerSlot,
    store::messages::{LiveSignal, LiveWatch, MessageStore},
};

/// Events read from the store per round trip while a subscription catches up.
const BACKFILL_BATCH: usize = 500;

/// The events of conversation `id` after `after_sequence` for `user`, holding `slot` and
/// `watch` while the stream lives; it ends with an error when `user` is removed from the conversation.
pub(super) fn events(
    store: Arc<dyn MessageStore>,
    slot: CallerSlot,
    mut live: LiveReceiver,
    watch: LiveWatch,
    id: ConversationId,
    user: UserId,
    after_sequence: u64,
) -> impl Stream<Item = Result<Event>> + Send + 'static {
    async_stream::try_stream! {
        // Held for as long as the stream lives: dropped when it ends or is dropped unfinished.
        let _slot = slot;
        let _watch = watch;
        let mut last = after_sequence;
        loop {
            // Catch up from the store.
            loop {
                let page = store
                    .events_after(id, last, BACKFILL_BATCH)
                    .await?;
                if last < page.trimmed_through {
                    Err(Error::new(
                        ErrorKind::OutOfRange,
                        Reason::HistoryTruncated,
                        format!(
                            "events up to sequence {} were trimmed; re-sync with ListMessages and subscribe from its newest sequence",
                            page.trimmed_through
                        ),
                    ))?;
                }
                let full = page.events.len() == BACKFILL_BATCH;
                for event in page.events {
                    last = event.sequence;
                    let removed = removes(&event, &user);
                    yield event;
                    if removed {
                        Err(removed_error())?;
                    }
                }
                if !full {
                    break;
                }
            }
            // Follow the live feed until it has a gap.
            loop {
                match live.recv().await {
                    Ok(LiveSignal::Event(event)) => {
                        if event.sequence <= last {
                            continue;
                        }
                        if event.sequence != last + 1 {
                            break;
                        }
                        last = event.sequence;
                        let removed = removes(&event, &user);
                        yield Event::clone(&event);
                        if removed {
                            Err(removed_error())?;
                        }
                    }
                    Ok(LiveSignal::Resync) => break,
                    Err(LiveEnd::Overflowed) => Err(Error::new(
                        ErrorKind::ResourceExhausted,
                        Reason::SlowConsumer,
                        format!("the stream fell too far behind; resubscribe with after_sequence = {last}"),
                    ))?,
                    Err(LiveEnd::Closed) => Err(Error::new(
                        ErrorKind::Unavailable,
                        Reason::BackendUnavailable,
                        format!("the live feed ended; resubscribe with after_sequence = {last}"),
                    ))?,
                }
            }
        }
    }
}

fn removes(event: &Event, user: &UserId) -> bool {
    matches!(&event.kind, EventKind::ParticipantsChanged { removed, .. } if removed.contains(user))
}

fn removed_error() -> Error {
    Error::permission_denied(
        Reason::NotAParticipant,
        "you were removed from this conversation",
    )
}
