//! The messaging domain: conversations, messages, read positions and live subscriptions.
//!
//! - [`model`]: conversations, messages, events, idempotency keys (also the stores' storage
//!   form); their ids are in [`crate::ids`].
//! - [`service`]: the rules ([`service::ConversationService`]).
//! - [`live`]: in-replica fan-out of the store's live feed.
//! - [`paging`]: page sizes and opaque page tokens.
//! - [`subscription`]: the event stream of one live subscription.

pub mod live;
pub mod model;
pub mod paging;
pub mod service;
pub mod subscription;
