//! Errors of the client: what the service refused (with its `google.rpc.ErrorInfo` reason and
//! retry advice), what never reached it, and what went wrong locally.

use std::{collections::HashMap, fmt, time::Duration};

use tonic::Code;
use tonic_types::StatusExt;

/// The domain of the service's `ErrorInfo` details.
pub const ERROR_DOMAIN: &str = "messaging.v1";

/// Anything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call ended with a gRPC status: refused by the service, or the service could not be
    /// reached ([`Code::Unavailable`]) or did not answer in time ([`Code::DeadlineExceeded`]).
    #[error(transparent)]
    Status(Box<ServiceError>),
    /// The address or TLS settings cannot be used.
    #[error("cannot use the endpoint: {0}")]
    Endpoint(String),
    /// An argument was refused before anything was sent.
    #[error("{0}")]
    InvalidInput(String),
    /// Reading the file to upload or writing the download failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes received do not hash to the file's SHA-256 (or the service stored different
    /// bytes than were read).
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    /// An interrupted upload of a non-seekable reader needs bytes it no longer holds.
    #[error(
        "cannot resume the upload at byte {offset}: the reader cannot seek and only bytes from \
         {kept_from} on are kept"
    )]
    NotResumable { offset: u64, kept_from: u64 },
}

impl Error {
    /// The gRPC code, if the call got as far as a status.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status(status) => Some(status.code),
            _ => None,
        }
    }

    /// The `ErrorInfo` reason the service gave (e.g. `"NOT_A_PARTICIPANT"`).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Status(status) => status.reason.as_deref(),
            _ => None,
        }
    }

    /// The service status, if there is one.
    pub fn status(&self) -> Option<&ServiceError> {
        match self {
            Error::Status(status) => Some(status),
            _ => None,
        }
    }

    /// Whether the service could not be reached or did not answer in time (as opposed to a
    /// refusal): trying again later may work.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.code(),
            Some(Code::Unavailable | Code::DeadlineExceeded)
        )
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        ServiceError::from_status(&status, 1).into()
    }
}

impl From<ServiceError> for Error {
    fn from(status: ServiceError) -> Self {
        Error::Status(Box::new(status))
    }
}

/// A gRPC status, with the machine-readable details the service attaches.
#[derive(Debug, Clone)]
pub struct ServiceError {
    /// The gRPC status code.
    pub code: Code,
    /// The human-readable message.
    pub message: String,
    /// `ErrorInfo.reason` (e.g. `"FILE_TOO_LARGE"`); `None` for statuses without one (e.g. the
    /// transport's own `UNAVAILABLE`).
    pub reason: Option<String>,
    /// `ErrorInfo.metadata` (e.g. `"field"` for `INVALID_FIELD`).
    pub metadata: HashMap<String, String>,
    /// `RetryInfo.retry_delay`: how long the service asks the caller to wait before retrying.
    pub retry_delay: Option<Duration>,
    /// `QuotaFailure` violations: `(subject, description)`.
    pub quota_violations: Vec<(String, String)>,
    /// `BadRequest` field violations: `(field, description)`.
    pub field_violations: Vec<(String, String)>,
    /// How many attempts were made (retries of the service config included).
    pub attempts: u32,
}

impl ServiceError {
    pub(crate) fn from_status(status: &tonic::Status, attempts: u32) -> Self {
        let details = status.get_error_details();
        let (reason, metadata) = match details.error_info() {
            Some(info) => (Some(info.reason.clone()), info.metadata.clone()),
            None => (None, HashMap::new()),
        };
        ServiceError {
            code: status.code(),
            message: status.message().to_owned(),
            reason,
            metadata,
            retry_delay: details.retry_info().and_then(|info| info.retry_delay),
            quota_violations: details
                .quota_failure()
                .map(|quota| {
                    quota
                        .violations
                        .iter()
                        .map(|v| (v.subject.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            field_violations: details
                .bad_request()
                .map(|bad| {
                    bad.field_violations
                        .iter()
                        .map(|v| (v.field.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            attempts,
        }
    }

    /// A status the client itself produced (its own deadline ran out).
    pub(crate) fn local(code: Code, message: impl Into<String>, attempts: u32) -> Self {
        ServiceError {
            code,
            message: message.into(),
            reason: None,
            metadata: HashMap::new(),
            retry_delay: None,
            quota_violations: Vec::new(),
            field_violations: Vec::new(),
            attempts,
        }
    }

    /// Whether the stream or connection broke rather than the service refusing: no `ErrorInfo`,
    /// and a code the transport produces. Resumable operations (uploads with a request id,
    /// downloads from an offset, subscriptions after a sequence) continue after these.
    pub fn is_transport_failure(&self) -> bool {
        match self.code {
            Code::Unavailable => true,
            Code::Unknown | Code::Cancelled | Code::Internal => self.reason.is_none(),
            _ => false,
        }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", code_name(self.code))?;
        if let Some(reason) = &self.reason {
            write!(f, " {reason}")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(delay) = self.retry_delay {
            write!(f, " (retry after {:.1}s)", delay.as_secs_f64())?;
        }
        Ok(())
    }
}

impl std::error::Error for ServiceError {}

/// The canonical name of a gRPC code (`UNAVAILABLE`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
