//! Where the S3 client's credentials come from (`s3.credentials`): the static keys of the
//! settings, or the AWS default chain, which a deployment on AWS uses instead of long-lived keys.
//!
//! The chain is aws-config's, in its order: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the
//! shared profile (`~/.aws/credentials`, `AWS_PROFILE`), web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`
//! and `AWS_ROLE_ARN`, which EKS sets for IRSA, exchanged at STS), container credentials
//! (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`/`_FULL_URI`: ECS task roles, EKS Pod Identity) and
//! EC2 instance metadata. Its requests go through the service's own HTTP client (rustls + ring):
//! aws-config is built without its default client, SSO and `credential_process`. The S3 client
//! caches what the chain returns and asks again before temporary credentials expire.

use aws_config::{
    default_provider::credentials::DefaultCredentialsChain, provider_config::ProviderConfig,
};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::{
    config::{
        Credentials, ProvideCredentials, Region, SharedCredentialsProvider, SharedHttpClient,
    },
    error::DisplayErrorContext,
};
use secrecy::ExposeSecret;

use crate::{
    config::{S3Credentials, S3Settings},
    store::blobs::BlobError,
};

/// What the chain looks at, in order, for the error that says it found nothing.
const CHAIN_SOURCES: &str = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the shared profile \
(~/.aws/credentials, AWS_PROFILE), web identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN), \
container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI), EC2 instance metadata";

/// The static keys of `settings`, or `None` when `s3.credentials = "chain"`.
pub(super) fn static_keys(settings: &S3Settings) -> Result<Option<Credentials>, BlobError> {
    if settings.credentials == S3Credentials::Chain {
        return Ok(None);
    }
    let (Some(access_key_id), Some(secret_access_key)) =
        (&settings.access_key_id, &settings.secret_access_key)
    else {
        return Err(BlobError::Misconfigured(
            "s3.access_key_id and s3.secret_access_key are required with s3.credentials = \"static\" (s3.credentials = \"chain\" uses the AWS default credential chain instead)".into(),
        ));
    };
    Ok(Some(Credentials::new(
        access_key_id,
        secret_access_key.expose_secret(),
        None,
        None,
        "svc-messaging-settings",
    )))
}

/// The AWS default chain, asked once now so that a deployment without any credentials fails at
/// start-up naming what was looked at. Credentials that exist but cannot be fetched right now
/// (STS or the metadata endpoint failing, slow) are only logged: the S3 health check reports
/// them until they can be, the way an S3 outage at start-up is reported.
pub(super) async fn default_chain(
    region: &str,
    http_client: SharedHttpClient,
) -> Result<SharedCredentialsProvider, BlobError> {
    let region = Region::new(region.to_owned());
    let provider_config = ProviderConfig::without_region()
        .with_http_client(http_client)
        .with_region(Some(region.clone()));
    let chain = DefaultCredentialsChain::builder()
        .configure(provider_config)
        .region(region)
        .build()
        .await;
    match chain.provide_credentials().await {
        Ok(credentials) => {
            let expires = credentials.expiry().map_or_else(
                || "never".to_owned(),
                |expiry| humantime::format_rfc3339_seconds(expiry).to_string(),
            );
            tracing::info!(
                temporary = credentials.session_token().is_some(),
                %expires,
                "s3 credentials from the AWS default chain"
            );
        }
        Err(CredentialsError::CredentialsNotLoaded(_)) => {
            return Err(BlobError::Misconfigured(
                format!(
                    "s3.credentials = \"chain\" found no credentials; it looked at: {CHAIN_SOURCES}"
                )
                .into(),
            ));
        }
        // A source is set but unusable as set (e.g. a container credentials URL to a host
        // other than loopback or the ECS/EKS agents): a restart cannot fix that.
        Err(error @ CredentialsError::InvalidConfiguration(_)) => {
            return Err(BlobError::Misconfigured(
                format!(
                    "s3.credentials = \"chain\": {}",
                    DisplayErrorContext(&error)
                )
                .into(),
            ));
        }
        Err(error) => {
            tracing::warn!(
                error = %DisplayErrorContext(&error),
                "s3 credentials from the AWS default chain are not available yet"
            );
        }
    }
    Ok(SharedCredentialsProvider::new(chain))
}
