//! The one place where domain errors become `tonic::Status`: the code comes from the error's kind,
//! `google.rpc.ErrorInfo` carries the reason, and a `BadRequest` violation names the faulty
//! field. Internal detail is logged here, once, and never sent.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{Error, ErrorKind};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "messaging.v1";

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match error.kind {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Aborted => Code::Aborted,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Internal => Code::Internal,
        };
        if let Some(source) = &error.source {
            let chain = error_chain(source.as_ref());
            match error.kind {
                ErrorKind::Internal => {
                    tracing::error!(reason = %error.reason, error = %chain, "request failed");
                }
                _ => tracing::warn!(reason = %error.reason, error = %chain, "request failed"),
            }
        }
        let metadata: HashMap<String, String> = error
            .metadata
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect();
        let mut details = ErrorDetails::new();
        details.set_error_info(error.reason.as_str(), ERROR_DOMAIN, metadata);
        if let Some(field) = error.field {
            details.add_bad_request_violation(field, error.message.clone());
        }
        if let Some(delay) = error.retry_delay {
            details.set_retry_info(Some(delay));
        }
        if let Some(quota) = &error.quota_violation {
            details.add_quota_failure_violation(quota.subject.clone(), quota.description.clone());
        }
        Status::with_error_details(code, error.message, details)
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    #[test]
    fn errors_carry_reason_and_field() {
        let status = Status::from(Error::invalid_field("text", "text must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "text must not be empty");
        let info = status.get_details_error_info().expect("ErrorInfo attached");
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.domain, ERROR_DOMAIN);
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest attached");
        assert_eq!(bad_request.field_violations[0].field, "text");
    }

    #[test]
    fn quota_violations_are_sent_as_quota_failure() {
        let status = Status::from(
            Error::new(
                ErrorKind::ResourceExhausted,
                Reason::TooManySubscriptions,
                "too many",
            )
            .with_quota_violation("messaging.max_subscriptions_per_caller", "at most 2"),
        );
        assert_eq!(status.code(), Code::ResourceExhausted);
        let quota = status.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(
            quota.violations[0].subject,
            "messaging.max_subscriptions_per_caller"
        );
        assert_eq!(quota.violations[0].description, "at most 2");
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let status = Status::from(Error::internal("disk /secret/path exploded"));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            Reason::Internal.as_str()
        );
    }
}
