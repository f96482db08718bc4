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

/// The descriptors of every message a status of this service carries: `google.rpc.Status` and
/// the details (`ErrorInfo`, `BadRequest`, `RetryInfo`, `QuotaFailure`), for reflection, so
/// grpcurl and `buf curl` print the details decoded. They are tonic-types' own descriptors (the
/// encoder of the details), under their googleapis file names: tonic-types names them
/// `status.proto` and `error_details.proto`, and a client that already knows
/// `google/rpc/error_details.proto` (Python's googleapis-common-protos) would otherwise see the
/// same messages defined twice. No services: they add nothing to `list` or to metric labels.
pub fn status_detail_descriptors() -> prost_types::FileDescriptorSet {
    use prost::Message;
    let mut set = prost_types::FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .expect("tonic-types ships a valid descriptor set");
    for file in &mut set.file {
        if file.package() == "google.rpc" && !file.name().contains('/') {
            file.name = Some(format!("google/rpc/{}", file.name()));
        }
    }
    set
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
    fn every_detail_sent_is_described() {
        use prost::Message;
        let status = Status::from(
            Error::new(ErrorKind::ResourceExhausted, Reason::TooManyUploads, "busy")
                .with_field("chunk")
                .with_retry_delay(std::time::Duration::from_secs(1))
                .with_quota_violation("uploads.max_concurrent_per_caller", "at most 16"),
        );
        let sent = tonic_types::pb::Status::decode(status.details()).expect("a google.rpc.Status");
        let descriptors = status_detail_descriptors();
        let described: Vec<String> = descriptors
            .file
            .iter()
            .flat_map(|file| {
                file.message_type
                    .iter()
                    .map(move |message| format!("{}.{}", file.package(), message.name()))
            })
            .collect();
        assert_eq!(sent.details.len(), 4, "{sent:?}");
        for detail in sent.details.iter().map(|any| any.type_url.as_str()) {
            let name = detail.trim_start_matches("type.googleapis.com/");
            assert!(described.iter().any(|d| d == name), "{name} not described");
        }
        assert!(described.iter().any(|d| d == "google.rpc.Status"));
        let names: Vec<&str> = descriptors.file.iter().map(|file| file.name()).collect();
        assert!(
            names.contains(&"google/rpc/error_details.proto"),
            "{names:?}"
        );
        assert!(names.contains(&"google/rpc/status.proto"), "{names:?}");
        assert!(descriptors.file.iter().all(|file| file.service.is_empty()));
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
