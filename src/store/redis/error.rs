//! How Redis failures become [`StoreError`]s: by whether a retry can help, never as the caller's
//! fault (a failover is `Unavailable`, not an invalid argument).

use fred::error::{Error as RedisError, ErrorKind};

use crate::store::messages::StoreError;

/// Server error prefixes that mean "not now" rather than "never".
const TRANSIENT_REPLIES: &[&str] = &[
    "LOADING",
    "MASTERDOWN",
    "READONLY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "NOREPLICAS",
    "MISCONF",
    "OOM",
    "NOSCRIPT",
];

impl From<RedisError> for StoreError {
    fn from(error: RedisError) -> Self {
        match error.kind() {
            // The connection broke or was closed under the command; the client reconnects on its
            // own, so a retry helps.
            ErrorKind::IO | ErrorKind::Canceled => StoreError::Unavailable(Box::new(error)),
            // No answer within the command timeout; a retry may help (a write may or may not
            // have been applied; appends and creations recognise their own retries).
            ErrorKind::Timeout => StoreError::Timeout,
            // Failover or resharding in progress (MOVED/ASK exhausted, CLUSTERDOWN), or no node
            // to route to; a retry helps once the topology settles.
            ErrorKind::Cluster | ErrorKind::Routing | ErrorKind::Sentinel => {
                StoreError::Unavailable(Box::new(error))
            }
            // The client's command queue is full; a retry after a pause helps.
            ErrorKind::Backpressure => StoreError::Unavailable(Box::new(error)),
            // Wrong credentials or settings: no retry helps until an operator fixes them, but
            // to the caller the backend is simply unavailable.
            ErrorKind::Auth | ErrorKind::Config | ErrorKind::Url => {
                StoreError::Unavailable(Box::new(error))
            }
            // A reply we could not decode, a nil where data must be, or a key of the wrong type
            // (WRONGTYPE): the stored data or our code is broken; a retry does not help.
            ErrorKind::Protocol
            | ErrorKind::Parse
            | ErrorKind::NotFound
            | ErrorKind::InvalidArgument
            | ErrorKind::InvalidCommand => StoreError::Corrupt(format!("redis: {error}")),
            // Any other server error reply: classified by its prefix below.
            ErrorKind::Unknown => classify_reply(error),
            // TLS failures (handshake, an untrusted certificate) and other feature-gated kinds:
            // the connection is unusable; a retry helps only for transient causes.
            #[allow(unreachable_patterns)]
            _ => StoreError::Unavailable(Box::new(error)),
        }
    }
}

fn classify_reply(error: RedisError) -> StoreError {
    let details = error.details().trim_start();
    let details = details.strip_prefix("ERR ").unwrap_or(details);
    if TRANSIENT_REPLIES
        .iter()
        .any(|prefix| details.starts_with(prefix))
    {
        // Loading a dataset, a replica that lost its primary, a write to a demoted primary, a
        // script cache flushed by a failover: all pass, so a retry helps.
        return StoreError::Unavailable(Box::new(error));
    }
    if details.starts_with("user_script")
        || details.starts_with("Error running script")
        || details.contains("corrupt")
    {
        // A script failed at run time (e.g. stored JSON it could not decode): retrying runs into
        // the same data.
        return StoreError::Corrupt(format!("redis script failed: {}", error.details()));
    }
    // Some other refusal by the server; it may be momentary.
    StoreError::Unavailable(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kind: ErrorKind, details: &str) -> StoreError {
        StoreError::from(RedisError::new(kind, details.to_owned()))
    }

    #[test]
    fn infrastructure_failures_are_retryable() {
        for (kind, details) in [
            (ErrorKind::IO, "connection reset"),
            (ErrorKind::Canceled, "canceled"),
            (ErrorKind::Cluster, "CLUSTERDOWN The cluster is down"),
            (
                ErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory",
            ),
            (ErrorKind::Unknown, "MASTERDOWN Link with MASTER is down"),
            (
                ErrorKind::Unknown,
                "READONLY You can't write against a read only replica.",
            ),
            (ErrorKind::Unknown, "NOSCRIPT No matching script."),
            (ErrorKind::Auth, "WRONGPASS invalid username-password pair"),
        ] {
            assert!(
                matches!(map(kind.clone(), details), StoreError::Unavailable(_)),
                "{kind:?} {details}"
            );
        }
        assert!(matches!(
            map(ErrorKind::Timeout, "Request timed out."),
            StoreError::Timeout
        ));
    }

    #[test]
    fn unreadable_replies_are_corrupt() {
        for (kind, details) in [
            (ErrorKind::Protocol, "invalid frame"),
            (ErrorKind::Parse, "not a number"),
            (
                ErrorKind::InvalidArgument,
                "WRONGTYPE Operation against a key holding the wrong kind of value",
            ),
            (
                ErrorKind::Unknown,
                "ERR user_script:12: Expected value but found invalid token",
            ),
        ] {
            assert!(
                matches!(map(kind.clone(), details), StoreError::Corrupt(_)),
                "{kind:?} {details}"
            );
        }
    }
}
