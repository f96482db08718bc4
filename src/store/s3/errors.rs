//! The one translation of S3 SDK failures into [`BlobError`], decided by whether a retry can help.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::{error::BoxError, store::blobs::BlobError};

/// What a request was about, which decides what a bare `404` means: HEAD answers carry no body,
/// hence no error code, so "no such key" and "no such bucket" look alike there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// A `404` is the object missing: `NotFound`.
    Object,
    /// A `404` is the bucket missing: an operator must create it or fix `s3.bucket`.
    Bucket,
    /// A `404` is the multipart upload missing: it was aborted under us (a lifecycle rule, an
    /// operator), so this write is lost, but starting the upload again can succeed.
    Upload,
}

/// Error codes S3 answers when the credentials or their permissions are wrong.
const CREDENTIAL_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
];

/// Maps a failed `operation` (e.g. `"UploadPart"`) to the blob store's vocabulary. The message
/// names the operation and S3's code and message; it never contains credentials.
pub(super) fn map_sdk_error<E>(
    operation: &'static str,
    scope: Scope,
    error: SdkError<E>,
) -> BlobError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = |error: &SdkError<E>| -> BoxError {
        format!("{operation}: {}", DisplayErrorContext(error)).into()
    };
    match &error {
        // The request could not even be built (a header value that is not valid HTTP, an
        // unusable endpoint): the same request fails the same way again.
        SdkError::ConstructionFailure(_) => BlobError::Misconfigured(detail(&error)),
        // No answer in time: the server or the network is slow right now; a retry may help.
        SdkError::TimeoutError(_) => BlobError::Unavailable(detail(&error)),
        // Our side refused to send it (e.g. a malformed endpoint URL): config, not weather.
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            BlobError::Misconfigured(detail(&error))
        }
        // Connection refused or reset, DNS, TLS handshake, I/O: the server is unreachable right
        // now; a retry may help.
        SdkError::DispatchFailure(_) => BlobError::Unavailable(detail(&error)),
        // An answer that is not S3 speaking (a proxy's error page, a cut-off body): usually
        // transient.
        SdkError::ResponseError(_) => BlobError::Unavailable(detail(&error)),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            match (service.err().code(), status) {
                // The bucket is not there: a retry cannot help, an operator must.
                (Some("NoSuchBucket"), _) => BlobError::Misconfigured(detail(&error)),
                // Wrong key id, wrong secret, a clock far off, or missing permissions: a retry
                // cannot help, an operator must fix the credentials or the bucket policy.
                (Some(code), _) if CREDENTIAL_CODES.contains(&code) => {
                    BlobError::Misconfigured(detail(&error))
                }
                (_, 403) => BlobError::Misconfigured(detail(&error)),
                // Something is missing (NoSuchKey, NoSuchUpload, or a bare 404 from a HEAD):
                // what that means depends on what was asked for (see `Scope`).
                (_, 404) => match scope {
                    Scope::Object => BlobError::NotFound,
                    Scope::Bucket => BlobError::Misconfigured(detail(&error)),
                    Scope::Upload => BlobError::Unavailable(detail(&error)),
                },
                // Throttled (503 SlowDown, 429): backing off and retrying helps.
                (Some("SlowDown"), _) | (_, 429 | 503) => BlobError::Unavailable(detail(&error)),
                // The server does not implement this operation: retrying cannot help.
                (Some("NotImplemented"), _) | (_, 501) => BlobError::Misconfigured(detail(&error)),
                // Any other server-side failure (500 InternalError, 502, 504): may be transient.
                (_, 500..=599) => BlobError::Unavailable(detail(&error)),
                // We were too slow sending the body: a retry may help.
                (Some("RequestTimeout"), _) => BlobError::Unavailable(detail(&error)),
                // Any other refusal (400, 409, 411, ...): the same request will be refused
                // again; it takes a fix, not a retry.
                _ => BlobError::Misconfigured(detail(&error)),
            }
        }
        // Kinds the SDK may add later: assume the weather, not the config.
        _ => BlobError::Unavailable(detail(&error)),
    }
}

/// Whether S3 answered `code` (e.g. `NoSuchUpload`) to the request.
pub(super) fn has_code<E: ProvideErrorMetadata>(error: &SdkError<E>, code: &str) -> bool {
    error
        .as_service_error()
        .is_some_and(|service| service.code() == Some(code))
}

/// The HTTP status S3 answered with, if it answered at all.
pub(super) fn status<E>(error: &SdkError<E>) -> Option<u16> {
    error
        .raw_response()
        .map(|response| response.status().as_u16())
}
