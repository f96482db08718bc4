//! Connecting ([`ClientBuilder`]), identity, and the unary calls with the service config's
//! timeouts and retries.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{
    Code, Request, Response, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    error::{Error, ServiceError},
    pb::{
        self, file_relay_service_client::FileRelayServiceClient,
        messaging_service_client::MessagingServiceClient,
    },
    service_config::{MethodPolicy, RetryPolicy, ServiceConfig},
};

pub(crate) const MESSAGING: &str = "messaging.v1.MessagingService";
pub(crate) const FILE_RELAY: &str = "messaging.v1.FileRelayService";

/// Who the caller is, sent with every call.
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    /// `authorization: Bearer <JWT>` (the service's `jwt` auth mode).
    Bearer(String),
    /// `x-user-id: <id>`, for a service behind a trusted gateway (`trusted-header` mode).
    UserId(String),
    /// No credentials (only health and reflection answer).
    Anonymous,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A token is a credential: never in a log line.
            Identity::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Identity::UserId(user) => f.debug_tuple("UserId").field(user).finish(),
            Identity::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// How streams broken by the network or a server restart are continued: uploads (through
/// `GetUploadStatus`), downloads (from the offset reached) and subscriptions (after the last
/// sequence delivered).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// Pause ceiling before the first reconnect; doubles per failed attempt (with full jitter).
    pub initial_backoff: Duration,
    /// The largest pause ceiling.
    pub max_backoff: Duration,
    /// Failed attempts in a row (without any progress in between) before giving up; `None`
    /// never gives up (a `tail` that waits for the service to come back).
    pub max_attempts_without_progress: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_attempts_without_progress: Some(12),
        }
    }
}

impl ReconnectPolicy {
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let ceiling = RetryPolicy {
            max_attempts: 2,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            backoff_multiplier: 2.0,
            retryable_codes: Vec::new(),
        }
        .backoff_ceiling(failures);
        // Half fixed, half random: a reconnect never comes back immediately.
        ceiling / 2 + crate::service_config::jittered(ceiling / 2)
    }

    pub(crate) fn gives_up_after(&self, failures: u32) -> bool {
        self.max_attempts_without_progress
            .is_some_and(|limit| failures >= limit)
    }
}

/// Builds a [`Client`].
///
/// ```no_run
/// # async fn example() -> Result<(), svcmsg_client::Error> {
/// use std::time::Duration;
/// use svcmsg_client::{Client, Identity};
///
/// let client = Client::builder("https://messaging.example.com")
///     .identity(Identity::Bearer(std::env::var("TOKEN").unwrap()))
///     .timeout(Duration::from_secs(5))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    address: String,
    identity: Identity,
    ca_certificate: Option<Vec<u8>>,
    tls_domain: Option<String>,
    service_config: Option<ServiceConfig>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    reconnect: ReconnectPolicy,
}

impl ClientBuilder {
    /// The caller's identity (default: [`Identity::Anonymous`]).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// Trusts this PEM CA certificate (in addition to the system's roots) for `https://`.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_certificate = Some(pem.into());
        self
    }

    /// The name to check the server's certificate against, if not the address's host.
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }

    /// Replaces the shipped service config (`proto/service_config.json`).
    pub fn service_config(mut self, config: ServiceConfig) -> Self {
        self.service_config = Some(config);
        self
    }

    /// A deadline for every unary call (retries included); the service config's timeout of a
    /// method still applies when it is shorter. See also [`Client::with_timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long establishing a connection may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How broken uploads, downloads and subscriptions are continued.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Builds the client. Nothing is connected yet: the connection is made by the first call
    /// (an unreachable service shows as [`Code::Unavailable`] there), and made again after it
    /// breaks.
    pub fn build(self) -> Result<Client, Error> {
        let mut endpoint = Endpoint::from_shared(self.address.clone())
            .map_err(|error| Error::Endpoint(format!("{:?}: {error}", self.address)))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // A server that vanished without closing the connection (a network partition, a
            // frozen host) is noticed within about half a minute, also on an idle subscription.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.address.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &self.ca_certificate {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| Error::Endpoint(format!("TLS: {error}")))?;
        } else if self.ca_certificate.is_some() {
            return Err(Error::Endpoint(
                "a CA certificate needs an https:// address".to_owned(),
            ));
        }
        let channel = endpoint.connect_lazy();
        Ok(Client {
            messaging: MessagingServiceClient::new(channel.clone()),
            files: FileRelayServiceClient::new(channel),
            shared: Arc::new(Shared {
                identity: self.identity,
                service_config: self.service_config.unwrap_or_else(ServiceConfig::shipped),
                reconnect: self.reconnect,
            }),
            timeout: self.timeout,
        })
    }
}

struct Shared {
    identity: Identity,
    service_config: ServiceConfig,
    reconnect: ReconnectPolicy,
}

/// A connection to svc-messaging. Cheap to clone; clones share the connection.
///
/// Unary calls follow the service config (`proto/service_config.json`): its timeout bounds each
/// call, and reads and idempotent writes are retried on `UNAVAILABLE` with exponential backoff.
/// Uploads, downloads and subscriptions continue on their own after the connection breaks or
/// the service restarts (see [`Client::upload`], [`Client::download`], [`Client::subscribe`]).
///
/// ```no_run
/// # async fn example() -> Result<(), svcmsg_client::Error> {
/// use svcmsg_client::{Client, Identity};
///
/// let client = Client::builder("http://127.0.0.1:50051")
///     .identity(Identity::UserId("alice".into()))
///     .build()?;
/// let conversation = client.create_conversation("team", &["bob"]).await?;
/// let message = client.send_text(&conversation.conversation_id, "hello").await?;
/// println!("sent #{}", message.sequence);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) messaging: MessagingServiceClient<Channel>,
    pub(crate) files: FileRelayServiceClient<Channel>,
    shared: Arc<Shared>,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("identity", &self.shared.identity)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts building a client of the service at `address`: `http://host:port` (plaintext) or
    /// `https://host:port` (TLS, trusting the system's roots).
    pub fn builder(address: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            address: address.into(),
            identity: Identity::Anonymous,
            ca_certificate: None,
            tls_domain: None,
            service_config: None,
            timeout: None,
            connect_timeout: Duration::from_secs(5),
            reconnect: ReconnectPolicy::default(),
        }
    }

    /// A client sharing this one's connection whose unary calls have the deadline `timeout`
    /// (retries included): a per-call deadline.
    ///
    /// ```no_run
    /// # async fn example(client: svcmsg_client::Client) -> Result<(), svcmsg_client::Error> {
    /// use std::time::Duration;
    /// let policy = client.with_timeout(Duration::from_millis(300)).upload_policy().await?;
    /// # Ok(()) }
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// The service config this client follows.
    pub fn service_config(&self) -> &ServiceConfig {
        &self.shared.service_config
    }

    pub(crate) fn reconnect_policy(&self) -> &ReconnectPolicy {
        &self.shared.reconnect
    }

    /// A request carrying the caller's identity.
    pub(crate) fn request<T>(&self, message: T) -> Result<Request<T>, Error> {
        let mut request = Request::new(message);
        match &self.shared.identity {
            Identity::Bearer(token) => {
                let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    Error::InvalidInput("the token has characters a header cannot carry".into())
                })?;
                request.metadata_mut().insert("authorization", value);
            }
            Identity::UserId(user) => {
                let value = MetadataValue::try_from(user.as_str()).map_err(|_| {
                    Error::InvalidInput("the user id has characters a header cannot carry".into())
                })?;
                request.metadata_mut().insert("x-user-id", value);
            }
            Identity::Anonymous => {}
        }
        Ok(request)
    }

    /// One unary call under its method's policy: the shorter of the client's and the config's
    /// timeout bounds all attempts together; a code the retry policy lists is retried after a
    /// jittered exponential pause (or the service's `RetryInfo` delay, when longer).
    pub(crate) async fn unary<Req, Resp, Call, Fut>(
        &self,
        service: &str,
        method: &str,
        message: Req,
        mut call: Call,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        Call: FnMut(Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let MethodPolicy { timeout, retry } = self.shared.service_config.policy(service, method);
        let timeout = match (timeout, self.timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self.request(message.clone())?;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                request.set_timeout(left);
            }
            let outcome = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, call(request)).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(deadline_exceeded(timeout, attempt)),
                },
                None => call(request).await,
            };
            let status = match outcome {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            // tonic answers a call whose grpc-timeout ran out with CANCELLED "Timeout expired":
            // to the caller that is its deadline.
            if status.code() == Code::Cancelled
                && deadline.is_some_and(|deadline| Instant::now() >= deadline)
            {
                return Err(deadline_exceeded(timeout, attempt));
            }
            let error = ServiceError::from_status(&status, attempt);
            let Some(policy) = retry
                .as_ref()
                .filter(|policy| policy.retries(status.code()) && attempt < policy.max_attempts)
            else {
                return Err(error.into());
            };
            let pause = match error.retry_delay {
                Some(asked) => asked.max(policy.backoff(attempt)),
                None => policy.backoff(attempt),
            };
            if let Some(deadline) = deadline
                && Instant::now() + pause >= deadline
            {
                return Err(error.into());
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Lists the caller's conversations, most recent activity first (all pages).
    pub async fn conversations(&self) -> Result<Vec<pb::Conversation>, Error> {
        let mut conversations = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .unary(
                    MESSAGING,
                    "ListConversations",
                    pb::ListConversationsRequest {
                        page_size: 200,
                        page_token,
                    },
                    |request| {
                        let mut client = self.messaging.clone();
                        async move { client.list_conversations(request).await }
                    },
                )
                .await?;
            conversations.extend(page.conversations);
            if page.next_page_token.is_empty() {
                return Ok(conversations);
            }
            page_token = page.next_page_token;
        }
    }

    /// Returns a conversation with the caller's unread count and its last message.
    pub async fn conversation(&self, conversation_id: &str) -> Result<pb::Conversation, Error> {
        let response = self
            .unary(
                MESSAGING,
                "GetConversation",
                pb::GetConversationRequest {
                    conversation_id: conversation_id.to_owned(),
                },
                |request| {
                    let mut client = self.messaging.clone();
                    async move { client.get_conversation(request).await }
                },
            )
            .await?;
        response.conversation.ok_or_else(missing("conversation"))
    }

    /// Creates a conversation of the caller and `participants` (with a fresh idempotency key).
    pub async fn create_conversation(
        &self,
        title: &str,
        participants: &[&str],
    ) -> Result<pb::Conversation, Error> {
        let response = self
            .unary(
                MESSAGING,
                "CreateConversation",
                pb::CreateConversationRequest {
                    title: title.to_owned(),
                    participant_ids: participants.iter().map(|id| (*id).to_owned()).collect(),
                    request_id: uuid::Uuid::new_v4().to_string(),
                },
                |request| {
                    let mut client = self.messaging.clone();
                    async move { client.create_conversation(request).await }
                },
            )
            .await?;
        response.conversation.ok_or_else(missing("conversation"))
    }

    /// Posts a text message. The message gets a fresh `client_message_id`, so the retries of
    /// the service config never post it twice.
    pub async fn send_text(&self, conversation_id: &str, text: &str) -> Result<pb::Message, Error> {
        let response = self
            .unary(
                MESSAGING,
                "SendMessage",
                pb::SendMessageRequest {
                    conversation_id: conversation_id.to_owned(),
                    client_message_id: uuid::Uuid::new_v4().to_string(),
                    content: Some(pb::send_message_request::Content::Text(text.to_owned())),
                },
                |request| {
                    let mut client = self.messaging.clone();
                    async move { client.send_message(request).await }
                },
            )
            .await?;
        response.message.ok_or_else(missing("message"))
    }

    /// The first page (newest first, up to `page_size`) of a conversation's messages.
    pub async fn recent_messages(
        &self,
        conversation_id: &str,
        page_size: i32,
    ) -> Result<Vec<pb::Message>, Error> {
        let response = self
            .unary(
                MESSAGING,
                "ListMessages",
                pb::ListMessagesRequest {
                    conversation_id: conversation_id.to_owned(),
                    page_size,
                    page_token: String::new(),
                },
                |request| {
                    let mut client = self.messaging.clone();
                    async move { client.list_messages(request).await }
                },
            )
            .await?;
        Ok(response.messages)
    }

    /// The allowed file types, size limits, retention and chunk sizes.
    pub async fn upload_policy(&self) -> Result<pb::GetUploadPolicyResponse, Error> {
        self.unary(
            FILE_RELAY,
            "GetUploadPolicy",
            pb::GetUploadPolicyRequest {},
            |request| {
                let mut client = self.files.clone();
                async move { client.get_upload_policy(request).await }
            },
        )
        .await
    }

    /// A file's metadata.
    pub async fn file(&self, file_id: &str) -> Result<pb::FileInfo, Error> {
        let response = self
            .unary(
                FILE_RELAY,
                "GetFile",
                pb::GetFileRequest {
                    file_id: file_id.to_owned(),
                },
                |request| {
                    let mut client = self.files.clone();
                    async move { client.get_file(request).await }
                },
            )
            .await?;
        response.file.ok_or_else(missing("file"))
    }

    /// How far a resumable upload of the caller's has got.
    pub async fn upload_status(
        &self,
        request_id: &str,
    ) -> Result<pb::GetUploadStatusResponse, Error> {
        self.unary(
            FILE_RELAY,
            "GetUploadStatus",
            pb::GetUploadStatusRequest {
                request_id: request_id.to_owned(),
            },
            |request| {
                let mut client = self.files.clone();
                async move { client.get_upload_status(request).await }
            },
        )
        .await
    }
}

fn deadline_exceeded(timeout: Option<Duration>, attempts: u32) -> Error {
    let timeout = timeout.unwrap_or_default();
    ServiceError::local(
        Code::DeadlineExceeded,
        format!(
            "no answer within the deadline of {:.3}s (client side)",
            timeout.as_secs_f64()
        ),
        attempts,
    )
    .into()
}

fn missing(what: &'static str) -> impl FnOnce() -> Error {
    move || {
        ServiceError::local(
            Code::Internal,
            format!("the service's answer has no {what}"),
            1,
        )
        .into()
    }
}
