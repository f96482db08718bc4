//! How store failures read to callers: a rejection is the caller's mistake, infrastructure
//! trouble stays retryable.

use super::model::MAX_PARTICIPANTS;
use crate::{
    error::{Error, ErrorKind, Reason},
    store::messages::{Rejection, StoreError},
};

/// Maps store failures to the error vocabulary; retryable infrastructure trouble stays
/// retryable.
pub fn store_error(error: StoreError) -> Error {
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
