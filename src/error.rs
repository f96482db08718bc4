//! The service's error vocabulary: what went wrong (an [`ErrorKind`], which decides the gRPC code)
//! and a machine-readable [`Reason`] that clients can branch on. The only translation into
//! `tonic::Status` lives in `grpc::status`.

use std::fmt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure this is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed; retrying it unchanged cannot help.
    InvalidArgument,
    /// The caller did not prove who they are.
    Unauthenticated,
    /// The caller is known but may not do this.
    PermissionDenied,
    NotFound,
    /// The request conflicts with an earlier one (e.g. an idempotency key reused).
    AlreadyExists,
    /// The state does not allow this right now.
    FailedPrecondition,
    /// A position outside what is kept (e.g. truncated history).
    OutOfRange,
    /// Another call is working on the same thing (a resumable upload's other writer); retry
    /// once it is done.
    Aborted,
    /// A limit was hit (memory, a slow consumer); retrying later may help.
    ResourceExhausted,
    /// A dependency is down or the server is shutting down; retrying may help.
    Unavailable,
    /// A dependency did not answer in time.
    DeadlineExceeded,
    /// A bug or a broken invariant; details are logged, never sent.
    Internal,
}

/// Machine-readable reasons, sent as `google.rpc.ErrorInfo.reason` with domain `messaging.v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidField,
    CredentialsMissing,
    CredentialsMalformed,
    TokenExpired,
    TokenInvalid,
    NotAParticipant,
    NotConversationCreator,
    NotMessageSender,
    NotFileUploader,
    ConversationNotFound,
    MessageNotFound,
    FileNotFound,
    ParticipantNotFound,
    TooManyParticipants,
    TooManyConversations,
    ClientMessageIdReused,
    RequestIdReused,
    HistoryTruncated,
    SlowConsumer,
    TooManySubscriptions,
    MetadataFirst,
    UnsupportedType,
    FileTooLarge,
    ContentTypeMismatch,
    ImageTooLarge,
    ImageUndecodable,
    ImageTooComplex,
    ImageTooLargeToDecode,
    ImageDecodeTimeout,
    ThumbnailWorkersBusy,
    SizeMismatch,
    ChecksumMismatch,
    MalformedDocument,
    UploadMemoryBusy,
    TooManyChunks,
    UploadIdleTimeout,
    UploadTooLong,
    TooManyUploads,
    UploadNotFound,
    UploadInProgress,
    WriteOffsetAhead,
    TooManyUploadSessions,
    BackendUnavailable,
    BackendTimeout,
    /// The caller's own deadline (`grpc-timeout`) ran out before the call was over.
    DeadlineExceeded,
    /// The call's connection outlived `server.max_connection_age` and its grace.
    ConnectionMaxAge,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::CredentialsMissing => "CREDENTIALS_MISSING",
            Reason::CredentialsMalformed => "CREDENTIALS_MALFORMED",
            Reason::TokenExpired => "TOKEN_EXPIRED",
            Reason::TokenInvalid => "TOKEN_INVALID",
            Reason::NotAParticipant => "NOT_A_PARTICIPANT",
            Reason::NotConversationCreator => "NOT_CONVERSATION_CREATOR",
            Reason::NotMessageSender => "NOT_MESSAGE_SENDER",
            Reason::NotFileUploader => "NOT_FILE_UPLOADER",
            Reason::ConversationNotFound => "CONVERSATION_NOT_FOUND",
            Reason::MessageNotFound => "MESSAGE_NOT_FOUND",
            Reason::FileNotFound => "FILE_NOT_FOUND",
            Reason::ParticipantNotFound => "PARTICIPANT_NOT_FOUND",
            Reason::TooManyParticipants => "TOO_MANY_PARTICIPANTS",
            Reason::TooManyConversations => "TOO_MANY_CONVERSATIONS",
            Reason::ClientMessageIdReused => "CLIENT_MESSAGE_ID_REUSED",
            Reason::RequestIdReused => "REQUEST_ID_REUSED",
            Reason::HistoryTruncated => "HISTORY_TRUNCATED",
            Reason::SlowConsumer => "SLOW_CONSUMER",
            Reason::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            Reason::MetadataFirst => "METADATA_FIRST",
            Reason::UnsupportedType => "UNSUPPORTED_TYPE",
            Reason::FileTooLarge => "FILE_TOO_LARGE",
            Reason::ContentTypeMismatch => "CONTENT_TYPE_MISMATCH",
            Reason::ImageTooLarge => "IMAGE_TOO_LARGE",
            Reason::ImageUndecodable => "IMAGE_UNDECODABLE",
            Reason::ImageTooComplex => "IMAGE_TOO_COMPLEX",
            Reason::ImageTooLargeToDecode => "IMAGE_TOO_LARGE_TO_DECODE",
            Reason::ImageDecodeTimeout => "IMAGE_DECODE_TIMEOUT",
            Reason::ThumbnailWorkersBusy => "THUMBNAIL_WORKERS_BUSY",
            Reason::SizeMismatch => "SIZE_MISMATCH",
            Reason::ChecksumMismatch => "CHECKSUM_MISMATCH",
            Reason::MalformedDocument => "MALFORMED_DOCUMENT",
            Reason::UploadMemoryBusy => "UPLOAD_MEMORY_BUSY",
            Reason::TooManyChunks => "TOO_MANY_CHUNKS",
            Reason::UploadIdleTimeout => "UPLOAD_IDLE_TIMEOUT",
            Reason::UploadTooLong => "UPLOAD_TOO_LONG",
            Reason::TooManyUploads => "TOO_MANY_UPLOADS",
            Reason::UploadNotFound => "UPLOAD_NOT_FOUND",
            Reason::UploadInProgress => "UPLOAD_IN_PROGRESS",
            Reason::WriteOffsetAhead => "WRITE_OFFSET_AHEAD",
            Reason::TooManyUploadSessions => "TOO_MANY_UPLOAD_SESSIONS",
            Reason::BackendUnavailable => "BACKEND_UNAVAILABLE",
            Reason::BackendTimeout => "BACKEND_TIMEOUT",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::ConnectionMaxAge => "CONNECTION_MAX_AGE",
            Reason::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with a message that is safe to show the caller. Internal detail travels in
/// `source`, which is logged at the edge and never sent.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub reason: Reason,
    pub message: String,
    /// The request field at fault, reported as a `google.rpc.BadRequest` field violation.
    pub field: Option<&'static str>,
    /// Extra `ErrorInfo` metadata (e.g. the supported types), never secrets.
    pub metadata: Vec<(&'static str, String)>,
    /// When a retry may succeed, sent as `google.rpc.RetryInfo`.
    pub retry_delay: Option<std::time::Duration>,
    /// The quota the caller exhausted, sent as a `google.rpc.QuotaFailure` violation (boxed:
    /// rare, and errors stay small).
    pub quota_violation: Option<Box<QuotaViolation>>,
    #[source]
    pub source: Option<BoxError>,
}

impl Error {
    pub fn new(kind: ErrorKind, reason: Reason, message: impl Into<String>) -> Self {
        Self {
            kind,
            reason,
            message: message.into(),
            field: None,
            metadata: Vec::new(),
            retry_delay: None,
            quota_violation: None,
            source: None,
        }
    }

    /// A malformed field; `field` is its name in the request message.
    pub fn invalid_field(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, Reason::InvalidField, message).with_field(field)
    }

    pub fn invalid(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, reason, message)
    }

    pub fn not_found(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, reason, message)
    }

    pub fn permission_denied(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, reason, message)
    }

    pub fn internal(source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Internal, Reason::Internal, "internal error").with_source(source)
    }

    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    pub fn with_metadata(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.metadata.push((key, value.into()));
        self
    }

    pub fn with_retry_delay(mut self, delay: std::time::Duration) -> Self {
        self.retry_delay = Some(delay);
        self
    }

    pub fn with_quota_violation(
        mut self,
        subject: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.quota_violation = Some(Box::new(QuotaViolation {
            subject: subject.into(),
            description: description.into(),
        }));
        self
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }
}

/// One exhausted quota: what it limits (`subject`) and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaViolation {
    pub subject: String,
    pub description: String,
}
