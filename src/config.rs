//! Settings, layered as built-in defaults < config file < environment variables.
//!
//! The file comes from `--config PATH` or `SVC_MESSAGING_CONFIG`; environment variables are
//! `SVC_MESSAGING__SECTION__KEY` (for example `SVC_MESSAGING__SERVER__GRPC_ADDR`). Everything is
//! deserialized strictly (an unknown key is an error, durations are `"15m"`, sizes `"8MiB"`) and
//! then checked as a whole, so start-up fails with one line naming the key instead of at the
//! first request. Secrets are `SecretString`s: their `Debug` output is redacted.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::files::kind::{FileCategory, FileKind, FileKindError};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "SVC_MESSAGING";
/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "SVC_MESSAGING_CONFIG";

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["uploads.document_types", "uploads.image_types"];

/// A config that cannot be used: `key` names the offending setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The validated settings of one service process.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub storage: StorageSettings,
    pub redis: RedisSettings,
    pub s3: S3Settings,
    pub uploads: UploadSettings,
    pub downloads: DownloadSettings,
    pub messaging: MessagingSettings,
    pub thumbnails: ThumbnailSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the HTTP probes and metrics listen.
    pub http_addr: SocketAddr,
    /// How long in-flight RPCs and streams may run on after SIGTERM before they are cancelled.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often every configured dependency is checked for health.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// How long one dependency check may take before it counts as down.
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
    /// gRPC connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a new gRPC connection may take to send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// HTTP/2 streams (calls) open at once on one connection; more are refused (REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// Largest HTTP/2 header block (request metadata) accepted.
    pub max_header_list_size: ByteSize,
    /// Largest request message of every RPC but UploadFile (whose chunks follow
    /// `uploads.max_chunk_bytes`).
    pub max_request_bytes: ByteSize,
    /// Age at which a gRPC connection is sent GOAWAY, so its client reconnects (through the
    /// balancer, perhaps to another replica) and no connection holds a slot forever.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// How long the calls still open on a connection past its age may run on before they are
    /// ended with `UNAVAILABLE` and the connection is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// How often the server pings an HTTP/2 connection, so idle ones (a quiet live stream) stay
    /// open through load balancers and NATs, and dead peers are found.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_timeout: Duration,
    /// TLS of the gRPC port (the HTTP probe port stays plaintext).
    pub tls: TlsSettings,
}

/// TLS of the gRPC port: off unless a certificate and its key are configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM certificate chain, the server's own certificate first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates; set, clients are verified (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client must present a certificate when `client_ca_file` is set.
    pub client_cert: ClientCertPolicy,
    /// How often the files are read again; changed files take effect for new connections.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_cert: ClientCertPolicy::Required,
            reload_interval: Duration::from_secs(30),
        }
    }
}

impl TlsSettings {
    /// Whether the gRPC port serves TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "server.tls.key_file",
                    "must be set along with server.tls.cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "server.tls.cert_file",
                    "must be set along with server.tls.key_file",
                ));
            }
            _ => {}
        }
        if self.client_ca_file.is_some() && !self.enabled() {
            return Err(ConfigError::new(
                "server.tls.client_ca_file",
                "client certificates need TLS: set server.tls.cert_file and server.tls.key_file",
            ));
        }
        if self.reload_interval.is_zero() {
            return Err(ConfigError::new(
                "server.tls.reload_interval",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Client certificates under mTLS (`server.tls.client_ca_file` set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientCertPolicy {
    /// A client without a certificate signed by the CA is refused in the handshake.
    Required,
    /// A client may present no certificate; one it presents must be signed by the CA.
    Optional,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_grace: Duration::from_secs(20),
            health_check_interval: Duration::from_secs(5),
            health_check_timeout: Duration::from_secs(2),
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 256,
            max_header_list_size: ByteSize::kib(16),
            max_request_bytes: ByteSize::kib(256),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(5 * 60),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            tls: TlsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Verify `authorization: Bearer <JWT>`; the `sub` claim is the user id.
    Jwt,
    /// Take the user id from `x-user-id` metadata set by an authenticating gateway.
    TrustedHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub mode: AuthMode,
    pub jwt_algorithm: JwtAlgorithm,
    /// Shared secret for HS256.
    pub jwt_secret: Option<SecretString>,
    /// File holding `jwt_secret` (a mounted Secret).
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256 / ES256, inline.
    pub jwt_public_key: Option<String>,
    /// PEM public key for RS256 / ES256, read from a file (a mounted Secret, say).
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim, when set.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::TrustedHeader,
            jwt_algorithm: JwtAlgorithm::HS256,
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_public_key: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageBackend {
    /// In-process: zero setup, one replica, lost on restart.
    Memory,
    /// Redis: shared by all replicas.
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlobBackend {
    /// Files under `storage.data_dir`, downloads signed by this service.
    Fs,
    /// An S3-compatible object store.
    S3,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    pub messages: MessageBackend,
    pub blobs: BlobBackend,
    /// Root of the filesystem blob store.
    pub data_dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            messages: MessageBackend::Memory,
            blobs: BlobBackend::Fs,
            data_dir: PathBuf::from("./data"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://[user[:password]@]host:port[/db]`; a secret because it may hold a password.
    pub url: Option<SecretString>,
    /// File holding `url`.
    pub url_file: Option<PathBuf>,
    /// Password kept apart from the URL, so it needs no percent-encoding.
    pub password: Option<SecretString>,
    /// File holding `password` (a mounted Secret).
    pub password_file: Option<PathBuf>,
    /// Prefix of every key this service writes.
    pub key_prefix: String,
    /// Longest pause between two attempts to reconnect (the pauses grow from 100 ms up to
    /// this). While a client reconnects it sends nothing, so after a cluster failover this
    /// bounds how long the service stays unavailable once the new master is elected.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            password: None,
            password_file: None,
            key_prefix: "svcmsg".to_owned(),
            reconnect_max_delay: Duration::from_secs(1),
        }
    }
}

/// Where the S3 client's credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum S3Credentials {
    /// `s3.access_key_id` and `s3.secret_access_key` (S3-compatible servers, or AWS user keys).
    #[default]
    Static,
    /// The AWS default chain: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the shared profile,
    /// web identity (EKS IRSA), container credentials (ECS task role, EKS Pod Identity), EC2
    /// instance metadata; temporary credentials are refreshed before they expire.
    Chain,
}

/// When the S3 client sends a checksum of what it uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum S3RequestChecksums {
    /// On every upload request that supports one (a CRC32: a header for whole bodies, an
    /// `aws-chunked` trailer for parts streamed as they arrive). The trailer costs a third of
    /// the upload throughput against Garage (BENCHMARKS.md) and some S3-compatible servers
    /// reject it.
    WhenSupported,
    /// Only where S3 requires one. Whole bodies are still covered by SigV4's payload hash;
    /// streamed parts (`UNSIGNED-PAYLOAD`) rely on TLS to the S3 endpoint in transit.
    #[default]
    WhenRequired,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// Custom endpoint of an S3-compatible server; unset means AWS.
    pub endpoint: Option<String>,
    /// The endpoint download URLs are presigned for (what callers can reach, e.g. an HTTPS
    /// ingress in front of the server); unset means `endpoint`.
    pub public_endpoint: Option<String>,
    pub credentials: S3Credentials,
    pub region: String,
    pub bucket: Option<String>,
    pub access_key_id: Option<String>,
    /// File holding `access_key_id`.
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key: Option<SecretString>,
    /// File holding `secret_access_key` (a mounted Secret).
    pub secret_access_key_file: Option<PathBuf>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub force_path_style: bool,
    /// Install the bucket lifecycle rule (expiry, aborting stale multipart uploads) at start-up.
    pub manage_lifecycle: bool,
    /// Per-part checksums: only where S3 requires them (streamed parts rely on TLS in transit)
    /// or wherever the SDK supports them (an `aws-chunked` CRC trailer on every part).
    pub request_checksums: S3RequestChecksums,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            public_endpoint: None,
            credentials: S3Credentials::Static,
            region: "us-east-1".to_owned(),
            bucket: None,
            access_key_id: None,
            access_key_id_file: None,
            secret_access_key: None,
            secret_access_key_file: None,
            force_path_style: false,
            manage_lifecycle: false,
            request_checksums: S3RequestChecksums::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSettings {
    /// Largest `chunk` accepted in one UploadFile message.
    pub max_chunk_bytes: ByteSize,
    /// Largest document (PDF, Office, TXT, CSV).
    pub document_max_size: ByteSize,
    /// Largest image.
    pub image_max_size: ByteSize,
    /// Document MIME types accepted.
    pub document_types: Vec<String>,
    /// Image MIME types accepted.
    pub image_types: Vec<String>,
    /// Images with more pixels than this are refused from their header, before any decode.
    pub max_image_pixels: u64,
    /// Size of one multipart part sent to S3.
    pub part_size: ByteSize,
    /// Parts of one upload in flight to S3 at once.
    pub parts_in_flight: u32,
    /// Bytes all uploads together may hold in memory.
    pub memory_budget: ByteSize,
    /// How long a new upload waits for memory before `RESOURCE_EXHAUSTED`.
    #[serde(with = "humantime_serde")]
    pub memory_wait_timeout: Duration,
    /// How long files are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// The average chunk size an upload may not go below: it may be sent in at most
    /// `size / min_chunk_bytes + 16` chunks (empty ones included).
    pub min_chunk_bytes: ByteSize,
    /// An upload stream that sends nothing for this long is ended and its resources released.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Uploads one caller may have open at once.
    pub max_concurrent_per_caller: u32,
    /// The longest one upload stream may last, however steadily it trickles (a resumable upload
    /// continues in a new stream).
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// How long a resumable upload (one with a `request_id`) can be continued, and its result
    /// found again, from its start; an unfinished one is discarded after it. Never longer than
    /// `retention` (staged bytes are swept with expired files).
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Unfinished resumable uploads one caller may have at once.
    pub max_sessions_per_caller: u32,
    /// The part size resumable uploads become durable in: what a broken stream may have to
    /// send again, and what a resume costs in pipeline start-up. S3's minimum by default.
    pub resume_part_size: ByteSize,
    /// Age after which the orphan janitor removes what an interrupted upload left: multipart
    /// uploads no unfinished session owns, objects without a file record, records without an
    /// object. Must exceed the longest one-shot upload.
    #[serde(with = "humantime_serde")]
    pub orphan_age: Duration,
    /// How often the orphan janitor runs (and once at start-up).
    #[serde(with = "humantime_serde")]
    pub orphan_sweep_interval: Duration,
}

impl Default for UploadSettings {
    fn default() -> Self {
        let of_category = |category| {
            FileKind::ALL
                .iter()
                .filter(|kind| kind.category() == category)
                .map(|kind| kind.mime_type().to_owned())
                .collect()
        };
        Self {
            max_chunk_bytes: ByteSize::mib(1),
            document_max_size: ByteSize::mib(50),
            image_max_size: ByteSize::mib(10),
            document_types: of_category(FileCategory::Document),
            image_types: of_category(FileCategory::Image),
            max_image_pixels: 40_000_000,
            part_size: ByteSize::mib(5),
            parts_in_flight: 2,
            memory_budget: ByteSize::mib(256),
            memory_wait_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            min_chunk_bytes: ByteSize::kib(1),
            idle_timeout: Duration::from_secs(30),
            max_concurrent_per_caller: 16,
            max_duration: Duration::from_secs(3600),
            session_ttl: Duration::from_secs(24 * 3600),
            max_sessions_per_caller: 32,
            resume_part_size: ByteSize::mib(5),
            orphan_age: Duration::from_secs(3600),
            orphan_sweep_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadSettings {
    /// Lifetime of a minted download URL (never past the file's expiry).
    #[serde(with = "humantime_serde")]
    pub url_ttl: Duration,
    /// HMAC key of the filesystem backend's download URLs; random per process when unset.
    pub signing_key: Option<SecretString>,
    /// File holding `signing_key` (a mounted Secret).
    pub signing_key_file: Option<PathBuf>,
    /// Base of the filesystem backend's download URLs; `http://{server.http_addr}` when unset.
    pub public_base_url: Option<String>,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            url_ttl: Duration::from_secs(15 * 60),
            signing_key: None,
            signing_key_file: None,
            public_base_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagingSettings {
    /// Events older than this are trimmed from history (conversations stay).
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    /// At most this many events are kept per conversation.
    pub history_max_events: u64,
    /// Events buffered per live subscriber before it is ended as a slow consumer.
    pub subscriber_buffer: usize,
    /// How long `client_message_id` and `request_id` retries are recognised.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Live subscriptions (SubscribeMessages streams) one caller may hold on one replica.
    pub max_subscriptions_per_caller: usize,
    /// Conversations one user may be in (bounds what one ListConversations page reads).
    pub max_conversations_per_user: usize,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        Self {
            history_max_age: Duration::from_secs(30 * 24 * 3600),
            history_max_events: 100_000,
            subscriber_buffer: 256,
            idempotency_window: Duration::from_secs(24 * 3600),
            max_subscriptions_per_caller: 100,
            // The stores' own default, `ConversationCap::DEFAULT`.
            max_conversations_per_user: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThumbnailSettings {
    /// Longest edge of a thumbnail, in pixels.
    pub max_edge: u32,
    /// JPEG quality of opaque thumbnails, 1..=100.
    pub jpeg_quality: u8,
    /// Decode workers; 0 means one per core.
    pub workers: usize,
    /// Longest a decode may take before the upload fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest an image waits for a free worker before the upload fails with
    /// `RESOURCE_EXHAUSTED`.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Most scans a JPEG may have (a progressive one has about ten); more is refused.
    pub max_jpeg_scans: u32,
    /// Memory all decodes following image uploads as they arrive may hold together (from
    /// `uploads.memory_budget`, half of whose default it is: a 12 MP progressive JPEG needs
    /// about 40 MiB; never more than half the budget's main pool, whatever is set); an image
    /// beyond is decoded after its last byte. 0: never.
    pub max_streaming_bytes: ByteSize,
    /// A decode following an upload that brings less than a step (64 KiB) or its end for this
    /// long drops its memory; the image is decoded after its last byte.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
}

impl Default for ThumbnailSettings {
    fn default() -> Self {
        Self {
            max_edge: 320,
            jpeg_quality: 80,
            workers: 0,
            timeout: Duration::from_secs(10),
            queue_timeout: Duration::from_secs(5),
            max_jpeg_scans: 256,
            max_streaming_bytes: ByteSize::mib(128),
            stream_idle_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter such as `info` or `svc_messaging=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Settings {
    /// Loads settings exactly as start-up does: defaults, then the file, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not mutate the process.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "config",
                    format!("file {} does not exist or is not a file", path.display()),
                ));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let prefix = format!("{ENV_PREFIX}__");
        let mut env_vars = config::Map::new();
        let mut env_lists = Vec::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(&prefix) else {
                continue;
            };
            let key = path.to_lowercase().replace("__", ".");
            if LIST_KEYS.contains(&key.as_str()) {
                env_lists.push((key, value));
            } else {
                env_vars.insert(name, value);
            }
        }
        // Every value stays the string it was: no guessing of numbers or booleans (the
        // config crate's `try_parsing` turns a password `0123` into `123` and `TRUE` into
        // `true`). Typed settings parse their string when deserialized.
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(env_vars));
        builder = builder.add_source(environment);
        for (key, value) in env_lists {
            let items: Vec<String> = value.split(',').map(str::to_owned).collect();
            builder = builder
                .set_override(key.as_str(), items)
                .map_err(config_crate_error)?;
        }
        let layered = builder.build().map_err(config_crate_error)?;
        let mut settings: Settings =
            serde_path_to_error::deserialize(layered).map_err(|error| {
                let path = error.path().to_string();
                deserialize_error(&path, &error.into_inner().to_string())
            })?;
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Fills each secret whose `<key>_file` is set from that file (the way Kubernetes mounts a
    /// Secret). The file's bytes are the value, except one trailing line break (`echo` and
    /// editors add it; no secret ends in one), and must be UTF-8.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file(
            "auth.jwt_secret",
            &mut self.auth.jwt_secret,
            self.auth.jwt_secret_file.as_deref(),
        )?;
        read_secret_file(
            "redis.url",
            &mut self.redis.url,
            self.redis.url_file.as_deref(),
        )?;
        read_secret_file(
            "redis.password",
            &mut self.redis.password,
            self.redis.password_file.as_deref(),
        )?;
        read_secret_file(
            "s3.secret_access_key",
            &mut self.s3.secret_access_key,
            self.s3.secret_access_key_file.as_deref(),
        )?;
        read_secret_file(
            "downloads.signing_key",
            &mut self.downloads.signing_key,
            self.downloads.signing_key_file.as_deref(),
        )?;
        let mut access_key_id = self.s3.access_key_id.take().map(SecretString::from);
        read_secret_file(
            "s3.access_key_id",
            &mut access_key_id,
            self.s3.access_key_id_file.as_deref(),
        )?;
        self.s3.access_key_id = access_key_id.map(|id| id.expose_secret().to_owned());
        Ok(())
    }

    /// Checks what types alone cannot: ranges, combinations and well-formed secrets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.auth.validate()?;
        self.storage.validate()?;
        self.redis.validate(self.storage.messages)?;
        self.s3.validate(self.storage.blobs)?;
        self.uploads.validate()?;
        self.downloads.validate()?;
        self.messaging.validate()?;
        self.thumbnails.validate()?;
        self.log.validate()
    }
}

impl ServerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc_addr == self.http_addr && self.grpc_addr.port() != 0 {
            return Err(ConfigError::new(
                "server.http_addr",
                "must differ from server.grpc_addr",
            ));
        }
        if self.health_check_interval.is_zero() {
            return Err(ConfigError::new(
                "server.health_check_interval",
                "must be greater than zero",
            ));
        }
        if self.health_check_timeout.is_zero() {
            return Err(ConfigError::new(
                "server.health_check_timeout",
                "must be greater than zero",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "server.handshake_timeout",
                "must be greater than zero",
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err(ConfigError::new(
                "server.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if !(ByteSize::kib(1)..=ByteSize::mib(1)).contains(&self.max_header_list_size) {
            return Err(ConfigError::new(
                "server.max_header_list_size",
                "must be between 1KiB and 1MiB",
            ));
        }
        if !(ByteSize::kib(16)..=ByteSize::mib(16)).contains(&self.max_request_bytes) {
            return Err(ConfigError::new(
                "server.max_request_bytes",
                "must be between 16KiB and 16MiB",
            ));
        }
        if self.max_connection_age < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "server.max_connection_age",
                "must be at least 100ms",
            ));
        }
        if self.http2_keepalive_interval.is_zero() {
            return Err(ConfigError::new(
                "server.http2_keepalive_interval",
                "must be greater than zero",
            ));
        }
        if self.http2_keepalive_timeout.is_zero() {
            return Err(ConfigError::new(
                "server.http2_keepalive_timeout",
                "must be greater than zero",
            ));
        }
        self.tls.validate()
    }
}

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
const HS256_MIN_SECRET_BYTES: usize = 32;

impl AuthSettings {
    /// The rules of the auth section alone; the keys themselves are parsed by
    /// [`crate::startup::check`], which builds the authenticator.
    fn validate(&self) -> Result<(), ConfigError> {
        // A weak secret is refused even while unused, so switching the mode cannot expose it.
        if let Some(secret) = &self.jwt_secret {
            check_hs256_secret(secret)?;
        }
        Ok(())
    }

    /// The PEM public key for RS256 / ES256, inline or from its file.
    pub fn public_key_pem(&self) -> Result<String, ConfigError> {
        match (&self.jwt_public_key, &self.jwt_public_key_file) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "auth.jwt_public_key",
                "set either auth.jwt_public_key or auth.jwt_public_key_file, not both",
            )),
            (Some(pem), None) => Ok(pem.clone()),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|error| {
                ConfigError::new(
                    "auth.jwt_public_key_file",
                    format!("cannot read {}: {error}", path.display()),
                )
            }),
            (None, None) => Err(ConfigError::new(
                "auth.jwt_public_key",
                format!(
                    "required when auth.mode = \"jwt\" and auth.jwt_algorithm = \"{:?}\" (or set auth.jwt_public_key_file)",
                    self.jwt_algorithm
                ),
            )),
        }
    }
}

/// Refuses an HS256 secret shorter than the hash output (the one place this rule is written).
pub fn check_hs256_secret(secret: &SecretString) -> Result<(), ConfigError> {
    if secret.expose_secret().len() < HS256_MIN_SECRET_BYTES {
        return Err(ConfigError::new(
            "auth.jwt_secret",
            format!("must be at least {HS256_MIN_SECRET_BYTES} bytes for HS256"),
        ));
    }
    Ok(())
}

impl StorageSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.data_dir", "must not be empty"));
        }
        Ok(())
    }
}

impl RedisSettings {
    fn validate(&self, backend: MessageBackend) -> Result<(), ConfigError> {
        match &self.url {
            Some(url) => check_redis_url(url.expose_secret())
                .map_err(|message| ConfigError::new("redis.url", message))?,
            None if backend == MessageBackend::Redis => {
                return Err(ConfigError::new(
                    "redis.url",
                    "required when storage.messages = \"redis\"",
                ));
            }
            None => {}
        }
        if self.key_prefix.is_empty()
            || !self
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(ConfigError::new(
                "redis.key_prefix",
                "must be non-empty and use only letters, digits, '-', '_', '.', ':'",
            ));
        }
        if self.reconnect_max_delay < Duration::from_millis(10)
            || self.reconnect_max_delay > Duration::from_secs(60)
        {
            return Err(ConfigError::new(
                "redis.reconnect_max_delay",
                "must be between 10ms and 60s",
            ));
        }
        Ok(())
    }
}

/// Characters that end a URL's user-info early or that broke the previous service's deployment
/// when they appeared raw in a Redis password.
const RAW_PASSWORD_BREAKERS: &[char] = &['/', '=', '@', '#', '?'];

/// Checks a Redis URL, giving an actionable message for the classic mistake of a password with
/// `/`, `=`, `@` or `#` pasted into the URL without percent-encoding.
pub fn check_redis_url(raw: &str) -> Result<(), String> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Err("must look like redis://[user[:password]@]host:port[/db]".to_owned());
    };
    if !matches!(scheme, "redis" | "rediss") {
        return Err(format!(
            "scheme must be redis or rediss, not {scheme:?}; for a cluster list one node's redis:// URL"
        ));
    }
    // The user-info runs to the last '@': a raw '@' inside the password would otherwise be
    // taken for the end of it.
    if let Some(at) = rest.rfind('@') {
        let user_info = &rest[..at];
        let password = user_info
            .split_once(':')
            .map_or("", |(_, password)| password);
        if password.contains(RAW_PASSWORD_BREAKERS) || user_info.contains(['/', '#', '?']) {
            return Err(
                "the password contains a raw '/', '=', '@', '#' or '?': percent-encode it (e.g. '/' as %2F, '=' as %3D) or put it in redis.password instead"
                    .to_owned(),
            );
        }
        if password.is_empty() && user_info.starts_with(':') {
            return Err("an empty password after ':' is not valid".to_owned());
        }
    }
    let parsed = url::Url::parse(raw).map_err(|error| format!("not a valid URL: {error}"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".to_owned());
    }
    let db = parsed.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u8>().is_err() {
        return Err(format!("the path must be a database number, not {db:?}"));
    }
    if let Some(password) = parsed.password() {
        percent_encoding::percent_decode_str(password)
            .decode_utf8()
            .map_err(|_| "the percent-encoded password is not valid UTF-8".to_owned())?;
    }
    Ok(())
}

impl S3Settings {
    fn validate(&self, backend: BlobBackend) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.endpoint {
            let parsed = url::Url::parse(endpoint).map_err(|error| {
                ConfigError::new("s3.endpoint", format!("not a valid URL: {error}"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::new(
                    "s3.endpoint",
                    "scheme must be http or https",
                ));
            }
        }
        if backend == BlobBackend::S3 && self.bucket.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                "s3.bucket",
                "required when storage.blobs = \"s3\"",
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(ConfigError::new(
                "s3.secret_access_key",
                "set both s3.access_key_id and s3.secret_access_key",
            ));
        }
        if let Some(public_endpoint) = &self.public_endpoint {
            validate_public_endpoint(public_endpoint)
                .map_err(|message| ConfigError::new("s3.public_endpoint", message))?;
        }
        match self.credentials {
            S3Credentials::Static => {
                if backend == BlobBackend::S3 && self.access_key_id.is_none() {
                    return Err(ConfigError::new(
                        "s3.access_key_id",
                        "required when storage.blobs = \"s3\" with s3.credentials = \"static\" (the default; s3.credentials = \"chain\" uses the AWS default credential chain instead)",
                    ));
                }
            }
            // Keys next to the chain would be ignored silently, or win silently: neither is what
            // an operator who set both meant.
            S3Credentials::Chain => {
                if self.access_key_id.is_some() {
                    return Err(ConfigError::new(
                        "s3.access_key_id",
                        "set with s3.credentials = \"chain\", which ignores static keys: remove the keys or set s3.credentials = \"static\"",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A presigned URL's signature covers the scheme-less host, the path and the query: the public
/// endpoint may only differ from the server's own endpoint by scheme, host and port, and the
/// proxy in front must pass the path and query through unchanged.
fn validate_public_endpoint(raw: &str) -> Result<(), String> {
    let parsed = url::Url::parse(raw).map_err(|error| format!("not a valid URL: {error}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".to_owned());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not hold credentials (user:password@)".to_owned());
    }
    if parsed.path() != "/" {
        return Err(format!(
            "must have no path (got {:?}): the signature covers the path the S3 server sees, so a proxy that adds or strips a prefix breaks every URL",
            parsed.path()
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("must have no query or fragment".to_owned());
    }
    Ok(())
}

impl UploadSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let chunk = self.max_chunk_bytes.as_u64();
        if !(1024..=16 * 1024 * 1024).contains(&chunk) {
            return Err(ConfigError::new(
                "uploads.max_chunk_bytes",
                "must be between 1KiB and 16MiB",
            ));
        }
        for (key, size) in [
            ("uploads.document_max_size", self.document_max_size),
            ("uploads.image_max_size", self.image_max_size),
        ] {
            if size.as_u64() == 0 {
                return Err(ConfigError::new(key, "must be greater than zero"));
            }
        }
        for (key, types, category) in [
            (
                "uploads.document_types",
                &self.document_types,
                FileCategory::Document,
            ),
            (
                "uploads.image_types",
                &self.image_types,
                FileCategory::Image,
            ),
        ] {
            for mime in types {
                let kind = FileKind::from_mime_type(mime).map_err(|FileKindError(_)| {
                    ConfigError::new(
                        key,
                        format!(
                            "unknown type {mime:?}; known: {}",
                            FileKind::ALL
                                .iter()
                                .filter(|kind| kind.category() == category)
                                .map(|kind| kind.mime_type())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
                if kind.category() != category {
                    return Err(ConfigError::new(
                        key,
                        format!("{mime} is not of this category"),
                    ));
                }
            }
        }
        if self.max_image_pixels == 0 {
            return Err(ConfigError::new(
                "uploads.max_image_pixels",
                "must be greater than zero",
            ));
        }
        // S3 refuses multipart parts under 5 MiB (all but the last).
        if self.part_size.as_u64() < 5 * 1024 * 1024 || self.part_size.as_u64() > 512 * 1024 * 1024
        {
            return Err(ConfigError::new(
                "uploads.part_size",
                "must be between 5MiB (the S3 minimum) and 512MiB",
            ));
        }
        // Resumable uploads checkpoint their SHA-256 at part boundaries, which must fall on
        // its 64-byte blocks.
        if !self.part_size.as_u64().is_multiple_of(1024) {
            return Err(ConfigError::new(
                "uploads.part_size",
                "must be a whole number of KiB",
            ));
        }
        if self.parts_in_flight == 0 || self.parts_in_flight > 64 {
            return Err(ConfigError::new(
                "uploads.parts_in_flight",
                "must be between 1 and 64",
            ));
        }
        let one_upload = self.part_size.as_u64() * (u64::from(self.parts_in_flight) + 1);
        if self.memory_budget.as_u64() < one_upload {
            return Err(ConfigError::new(
                "uploads.memory_budget",
                format!(
                    "must hold at least one upload: (parts_in_flight + 1) x part_size = {}",
                    ByteSize::b(one_upload).display().iec()
                ),
            ));
        }
        // An image upload holds its body (kept for the thumbnail) and, at most as much again,
        // its part buffer.
        let one_image = 2 * self.image_max_size.as_u64();
        if self.memory_budget.as_u64() < one_image {
            return Err(ConfigError::new(
                "uploads.memory_budget",
                format!(
                    "must hold at least one image upload: 2 x image_max_size = {}",
                    ByteSize::b(one_image).display().iec()
                ),
            ));
        }
        if self.retention < Duration::from_secs(1) {
            return Err(ConfigError::new("uploads.retention", "must be at least 1s"));
        }
        if self.min_chunk_bytes.as_u64() == 0 || self.min_chunk_bytes > self.max_chunk_bytes {
            return Err(ConfigError::new(
                "uploads.min_chunk_bytes",
                "must be between 1 byte and uploads.max_chunk_bytes",
            ));
        }
        if self.idle_timeout < Duration::from_millis(10)
            || self.idle_timeout > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(
                "uploads.idle_timeout",
                "must be between 10ms and 1h",
            ));
        }
        if self.max_concurrent_per_caller == 0 {
            return Err(ConfigError::new(
                "uploads.max_concurrent_per_caller",
                "must be greater than zero",
            ));
        }
        if self.max_duration < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "uploads.max_duration",
                "must be at least 1s",
            ));
        }
        if self.session_ttl < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "uploads.session_ttl",
                "must be at least 1s",
            ));
        }
        let resume_part = self.resume_part_size.as_u64();
        if !(5 * 1024 * 1024..=self.part_size.as_u64()).contains(&resume_part)
            || !resume_part.is_multiple_of(1024)
        {
            return Err(ConfigError::new(
                "uploads.resume_part_size",
                "must be a whole number of KiB between 5MiB (the S3 minimum) and uploads.part_size",
            ));
        }
        if self.max_sessions_per_caller == 0 {
            return Err(ConfigError::new(
                "uploads.max_sessions_per_caller",
                "must be greater than zero",
            ));
        }
        if self.orphan_age < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "uploads.orphan_age",
                "must be at least 1s",
            ));
        }
        if self.orphan_sweep_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "uploads.orphan_sweep_interval",
                "must be at least 100ms",
            ));
        }
        Ok(())
    }
}

impl DownloadSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.url_ttl < Duration::from_secs(1)
            || self.url_ttl > Duration::from_secs(7 * 24 * 3600)
        {
            return Err(ConfigError::new(
                "downloads.url_ttl",
                "must be between 1s and 7d (the SigV4 maximum)",
            ));
        }
        if let Some(key) = &self.signing_key
            && key.expose_secret().len() < 32
        {
            return Err(ConfigError::new(
                "downloads.signing_key",
                "must be at least 32 bytes",
            ));
        }
        if let Some(base) = &self.public_base_url {
            url::Url::parse(base).map_err(|error| {
                ConfigError::new(
                    "downloads.public_base_url",
                    format!("not a valid URL: {error}"),
                )
            })?;
        }
        Ok(())
    }
}

impl MessagingSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.history_max_events == 0 {
            return Err(ConfigError::new(
                "messaging.history_max_events",
                "must be greater than zero",
            ));
        }
        if self.history_max_age.is_zero() {
            return Err(ConfigError::new(
                "messaging.history_max_age",
                "must be greater than zero",
            ));
        }
        if self.subscriber_buffer == 0 {
            return Err(ConfigError::new(
                "messaging.subscriber_buffer",
                "must be greater than zero",
            ));
        }
        if self.idempotency_window < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "messaging.idempotency_window",
                "must be at least 1m",
            ));
        }
        if self.max_subscriptions_per_caller == 0 {
            return Err(ConfigError::new(
                "messaging.max_subscriptions_per_caller",
                "must be greater than zero",
            ));
        }
        if !(1..=100_000).contains(&self.max_conversations_per_user) {
            return Err(ConfigError::new(
                "messaging.max_conversations_per_user",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

impl ThumbnailSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(16..=4096).contains(&self.max_edge) {
            return Err(ConfigError::new(
                "thumbnails.max_edge",
                "must be between 16 and 4096",
            ));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(ConfigError::new(
                "thumbnails.jpeg_quality",
                "must be between 1 and 100",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new(
                "thumbnails.timeout",
                "must be greater than zero",
            ));
        }
        if self.queue_timeout.is_zero() {
            return Err(ConfigError::new(
                "thumbnails.queue_timeout",
                "must be greater than zero",
            ));
        }
        if !(1..=65_535).contains(&self.max_jpeg_scans) {
            return Err(ConfigError::new(
                "thumbnails.max_jpeg_scans",
                "must be between 1 and 65535",
            ));
        }
        if self.stream_idle_timeout.is_zero() {
            return Err(ConfigError::new(
                "thumbnails.stream_idle_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl LogSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|error| ConfigError::new("log.level", format!("not a valid filter: {error}")))
    }
}

/// Reads the secret `key` from `file` into `value`, refusing both at once.
fn read_secret_file(
    key: &str,
    value: &mut Option<SecretString>,
    file: Option<&Path>,
) -> Result<(), ConfigError> {
    let Some(path) = file else {
        return Ok(());
    };
    let file_key = format!("{key}_file");
    if value.is_some() {
        return Err(ConfigError::new(
            file_key,
            format!("set either {key} or {key}_file, not both"),
        ));
    }
    let mut bytes = std::fs::read(path).map_err(|error| {
        ConfigError::new(
            &file_key,
            format!("cannot read {}: {error}", path.display()),
        )
    })?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(&file_key, format!("{} is not UTF-8 text", path.display()))
    })?;
    *value = Some(SecretString::from(text));
    Ok(())
}

/// Maps a serde error at `path` into a [`ConfigError`] whose key names the setting itself, also
/// for unknown keys (serde reports those at their parent).
fn deserialize_error(path: &str, message: &str) -> ConfigError {
    let parent = if path == "." { "" } else { path };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        // serde_path_to_error usually names the unknown key itself; be robust if it does not.
        let key = if parent.is_empty() {
            field.to_owned()
        } else if parent == field || parent.ends_with(&format!(".{field}")) {
            parent.to_owned()
        } else {
            format!("{parent}.{field}")
        };
        return ConfigError::new(key, "unknown key");
    }
    let key = if parent.is_empty() { "config" } else { parent };
    // The config crate appends where a value came from; the key is named already.
    let message = message
        .split(" for key `")
        .next()
        .unwrap_or(message)
        .to_owned();
    ConfigError::new(key, message)
}

fn config_crate_error(error: config::ConfigError) -> ConfigError {
    match error {
        config::ConfigError::At { error, key, .. } => ConfigError::new(
            key.unwrap_or_else(|| "config".to_owned()),
            error.to_string(),
        ),
        config::ConfigError::FileParse { uri, cause } => ConfigError::new(
            "config",
            format!(
                "cannot parse {}: {}",
                uri.unwrap_or_default(),
                cause.to_string().replace('\n', " ")
            ),
        ),
        other => ConfigError::new("config", other.to_string().replace('\n', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            None,
            pairs
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned())),
        )
    }

    #[test]
    fn the_spelled_out_local_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/local.toml");
        let file = Settings::load_from(Some(&path), std::iter::empty()).expect("config/local.toml");
        let defaults = load(&[]).unwrap();
        // Settings has no PartialEq (it holds secrets); its Debug output redacts them alike.
        assert_eq!(format!("{file:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn defaults_are_the_zero_setup_local_service() {
        let settings = load(&[]).expect("defaults are valid");
        assert_eq!(settings.server.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(settings.server.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.storage.messages, MessageBackend::Memory);
        assert_eq!(settings.storage.blobs, BlobBackend::Fs);
        assert_eq!(settings.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(settings.auth.mode, AuthMode::TrustedHeader);
        assert_eq!(settings.uploads.document_types.len(), 9);
        assert_eq!(settings.uploads.image_types.len(), 6);
    }

    #[test]
    fn environment_overrides_with_typed_values() {
        let settings = load(&[
            ("SVC_MESSAGING__SERVER__SHUTDOWN_GRACE", "3s"),
            ("SVC_MESSAGING__UPLOADS__PART_SIZE", "16MiB"),
            ("SVC_MESSAGING__UPLOADS__PARTS_IN_FLIGHT", "4"),
            (
                "SVC_MESSAGING__UPLOADS__IMAGE_TYPES",
                "image/png,image/jpeg",
            ),
            ("UNRELATED__SERVER__GRPC_ADDR", "nonsense"),
        ])
        .expect("valid");
        assert_eq!(settings.server.shutdown_grace, Duration::from_secs(3));
        assert_eq!(settings.uploads.part_size, ByteSize::mib(16));
        assert_eq!(settings.uploads.parts_in_flight, 4);
        assert_eq!(settings.uploads.image_types, ["image/png", "image/jpeg"]);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "SVC_MESSAGING__SERVER__GRPC_ADDR",
                "localhost",
                "server.grpc_addr",
            ),
            (
                "SVC_MESSAGING__SERVER__SHUTDOWN_GRACE",
                "soon",
                "server.shutdown_grace",
            ),
            (
                "SVC_MESSAGING__SERVER__GRPC_ADR",
                "127.0.0.1:1",
                "server.grpc_adr",
            ),
            (
                "SVC_MESSAGING__UPLOADS__PART_SIZE",
                "huge",
                "uploads.part_size",
            ),
            (
                "SVC_MESSAGING__UPLOADS__PART_SIZE",
                "1MiB",
                "uploads.part_size",
            ),
            (
                "SVC_MESSAGING__UPLOADS__PARTS_IN_FLIGHT",
                "-1",
                "uploads.parts_in_flight",
            ),
            (
                "SVC_MESSAGING__UPLOADS__IMAGE_TYPES",
                "image/tiff",
                "uploads.image_types",
            ),
            ("SVC_MESSAGING__AUTH__MODE", "magic", "auth.mode"),
            ("SVC_MESSAGING__NOPE__KEY", "1", "nope"),
            (
                "SVC_MESSAGING__REDIS__URL",
                "redis://default:a/b=c@127.0.0.1:6379/0",
                "redis.url",
            ),
            ("SVC_MESSAGING__LOG__FORMAT", "xml", "log.format"),
            (
                "SVC_MESSAGING__DOWNLOADS__URL_TTL",
                "30d",
                "downloads.url_ttl",
            ),
            (
                "SVC_MESSAGING__MESSAGING__MAX_SUBSCRIPTIONS_PER_CALLER",
                "0",
                "messaging.max_subscriptions_per_caller",
            ),
            (
                "SVC_MESSAGING__MESSAGING__MAX_CONVERSATIONS_PER_USER",
                "0",
                "messaging.max_conversations_per_user",
            ),
            (
                "SVC_MESSAGING__THUMBNAILS__STREAM_IDLE_TIMEOUT",
                "0s",
                "thumbnails.stream_idle_timeout",
            ),
        ];
        for (var, value, key) in cases {
            let error = load(&[(var, value)]).expect_err(&format!("{var}={value} must fail"));
            assert_eq!(&error.key, key, "{var}={value}: {error}");
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn redis_url_password_cases() {
        // Percent-encoded special characters are the documented way; they must pass.
        assert_eq!(
            check_redis_url("redis://default:ci%2Fpa55%3Dword@127.0.0.1:6379/0"),
            Ok(())
        );
        assert_eq!(check_redis_url("redis://127.0.0.1:6379"), Ok(()));
        assert_eq!(
            check_redis_url("rediss://user:plain@redis.example:6380/2"),
            Ok(())
        );
        for raw in [
            "redis://default:ci/pa55@127.0.0.1:6379/0",
            "redis://default:pa55=word@127.0.0.1:6379/0",
            "redis://default:p@ss@127.0.0.1:6379/0",
            "redis://default:pa#ss@127.0.0.1:6379/0",
        ] {
            let message = check_redis_url(raw).expect_err(raw);
            assert!(message.contains("percent-encode"), "{raw}: {message}");
            assert!(message.contains("redis.password"), "{raw}: {message}");
            assert!(
                !message.contains("pa55"),
                "the message must not echo the password"
            );
        }
        assert!(check_redis_url("http://127.0.0.1:6379").is_err());
        assert!(check_redis_url("redis://127.0.0.1:6379/zero").is_err());
    }

    /// Values that a type-guessing parser would change: numbers with leading zeros, exponents,
    /// booleans in any case, padding, and the characters that break URLs.
    const SHAPE_SHIFTERS: &[&str] = &[
        "0123",
        "00",
        "1e3",
        "1.50",
        "-0",
        "TRUE",
        "False",
        "yes",
        "null",
        "0x1F",
        " padded ",
        "a,b",
        "[1]",
        "pa55/w=rd@#?",
        "ünï ćødé",
    ];

    #[test]
    fn string_settings_arrive_byte_for_byte_from_the_environment() {
        for value in SHAPE_SHIFTERS {
            // The signing key must be 32 bytes long: the shape-shifter leads it.
            let signing_key = format!("{value}{}", "0".repeat(32));
            let settings = load(&[
                ("SVC_MESSAGING__STORAGE__DATA_DIR", value),
                ("SVC_MESSAGING__REDIS__PASSWORD", value),
                ("SVC_MESSAGING__S3__ACCESS_KEY_ID", value),
                ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", value),
                ("SVC_MESSAGING__S3__BUCKET", value),
                ("SVC_MESSAGING__AUTH__ISSUER", value),
                ("SVC_MESSAGING__DOWNLOADS__SIGNING_KEY", &signing_key),
            ])
            .unwrap_or_else(|error| panic!("{value:?}: {error}"));
            assert_eq!(settings.storage.data_dir, PathBuf::from(value));
            let password = settings.redis.password.as_ref().unwrap();
            assert_eq!(password.expose_secret(), *value);
            assert_eq!(settings.s3.access_key_id.as_deref(), Some(*value));
            assert_eq!(
                settings
                    .s3
                    .secret_access_key
                    .as_ref()
                    .unwrap()
                    .expose_secret(),
                *value
            );
            assert_eq!(settings.s3.bucket.as_deref(), Some(*value));
            assert_eq!(settings.auth.issuer.as_deref(), Some(*value));
            assert_eq!(
                settings
                    .downloads
                    .signing_key
                    .as_ref()
                    .unwrap()
                    .expose_secret(),
                signing_key
            );
        }
    }

    #[test]
    fn string_settings_arrive_byte_for_byte_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for value in SHAPE_SHIFTERS {
            let path = dir.path().join("config.toml");
            let quoted = serde_json::to_string(value).unwrap();
            std::fs::write(
                &path,
                format!("[storage]\ndata_dir = {quoted}\n[redis]\npassword = {quoted}\n"),
            )
            .unwrap();
            let settings = Settings::load_from(Some(&path), Vec::new())
                .unwrap_or_else(|error| panic!("{value:?}: {error}"));
            assert_eq!(settings.storage.data_dir, PathBuf::from(value));
            let password = settings.redis.password.as_ref().unwrap();
            assert_eq!(password.expose_secret(), *value);
        }
    }

    #[test]
    fn typed_settings_still_parse_from_the_environment() {
        let settings = load(&[
            ("SVC_MESSAGING__S3__FORCE_PATH_STYLE", "TRUE"),
            ("SVC_MESSAGING__UPLOADS__MAX_CHUNK_BYTES", "65536"),
            ("SVC_MESSAGING__MESSAGING__SUBSCRIBER_BUFFER", "0064"),
            (
                "SVC_MESSAGING__UPLOADS__DOCUMENT_TYPES",
                "application/pdf,text/csv",
            ),
        ])
        .expect("valid");
        assert!(settings.s3.force_path_style);
        assert_eq!(settings.uploads.max_chunk_bytes, ByteSize::b(65536));
        assert_eq!(settings.messaging.subscriber_buffer, 64);
        assert_eq!(
            settings.uploads.document_types,
            ["application/pdf", "text/csv"]
        );
    }

    #[test]
    fn secrets_come_from_files_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path.display().to_string()
        };
        let password = file("password", b"0123\n");
        let jwt = file("jwt", b"  a-secret-that-is-long-enough-0123456789  \r\n");
        let key = file("key", b"1e3");
        let id = file("id", b"GK00123\n");
        let url = file("url", b"redis://default@127.0.0.1:6379/0\n");
        let signing = file("signing", b"TRUE-and-32-bytes-0123456789abcdef\n\n");
        let settings = load(&[
            ("SVC_MESSAGING__REDIS__PASSWORD_FILE", &password),
            ("SVC_MESSAGING__REDIS__URL_FILE", &url),
            ("SVC_MESSAGING__AUTH__JWT_SECRET_FILE", &jwt),
            ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY_FILE", &key),
            ("SVC_MESSAGING__S3__ACCESS_KEY_ID_FILE", &id),
            ("SVC_MESSAGING__DOWNLOADS__SIGNING_KEY_FILE", &signing),
        ])
        .expect("valid");
        let exposed =
            |secret: &Option<SecretString>| secret.as_ref().unwrap().expose_secret().to_owned();
        assert_eq!(exposed(&settings.redis.password), "0123");
        assert_eq!(
            exposed(&settings.redis.url),
            "redis://default@127.0.0.1:6379/0"
        );
        // Only one trailing line break goes; inner and leading bytes stay.
        assert_eq!(
            exposed(&settings.auth.jwt_secret),
            "  a-secret-that-is-long-enough-0123456789  "
        );
        assert_eq!(exposed(&settings.s3.secret_access_key), "1e3");
        assert_eq!(settings.s3.access_key_id.as_deref(), Some("GK00123"));
        assert_eq!(
            exposed(&settings.downloads.signing_key),
            "TRUE-and-32-bytes-0123456789abcdef\n"
        );

        let error = load(&[
            ("SVC_MESSAGING__REDIS__PASSWORD_FILE", &password),
            ("SVC_MESSAGING__REDIS__PASSWORD", "inline"),
        ])
        .unwrap_err();
        assert_eq!(error.key, "redis.password_file", "{error}");
        let missing = dir.path().join("missing").display().to_string();
        let error = load(&[("SVC_MESSAGING__S3__SECRET_ACCESS_KEY_FILE", &missing)]).unwrap_err();
        assert_eq!(error.key, "s3.secret_access_key_file", "{error}");
        let binary = file("binary", &[0xff, 0xfe, 0x00]);
        let error = load(&[("SVC_MESSAGING__AUTH__JWT_SECRET_FILE", &binary)]).unwrap_err();
        assert_eq!(error.key, "auth.jwt_secret_file", "{error}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let settings = load(&[
            (
                "SVC_MESSAGING__AUTH__JWT_SECRET",
                "top-secret-value-that-is-long-enough-0123",
            ),
            ("SVC_MESSAGING__REDIS__PASSWORD", "hunter2-redis"),
            (
                "SVC_MESSAGING__REDIS__URL",
                "redis://default:urlpass@127.0.0.1:6379/0",
            ),
            ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
            ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "s3-secret-key"),
        ])
        .expect("valid");
        let debug = format!("{settings:?}");
        for secret in [
            "top-secret-value",
            "hunter2-redis",
            "urlpass",
            "s3-secret-key",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
    }

    /// An S3 deployment's settings in `SVC_MESSAGING__S3__*` form, plus `extra`.
    fn load_s3(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut pairs = vec![
            ("SVC_MESSAGING__STORAGE__BLOBS", "s3"),
            ("SVC_MESSAGING__S3__BUCKET", "files"),
            ("SVC_MESSAGING__S3__ENDPOINT", "http://garage:3900"),
        ];
        pairs.extend_from_slice(extra);
        load(&pairs)
    }

    #[test]
    fn the_public_endpoint_is_optional_and_checked() {
        let settings = load_s3(&[
            ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
            ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "secret"),
        ])
        .expect("valid");
        assert_eq!(settings.s3.public_endpoint, None);
        for good in ["https://files.example.com", "http://127.0.0.1:3900/"] {
            let settings = load_s3(&[
                ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
                ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "secret"),
                ("SVC_MESSAGING__S3__PUBLIC_ENDPOINT", good),
            ])
            .unwrap_or_else(|error| panic!("{good}: {error}"));
            assert_eq!(settings.s3.public_endpoint.as_deref(), Some(good));
        }
        for (bad, says) in [
            ("files.example.com", "not a valid URL"),
            ("ftp://files.example.com", "scheme"),
            ("https://user:pw@files.example.com", "credentials"),
            ("https://files.example.com/s3", "no path"),
            ("https://files.example.com/?x=1", "no query"),
            ("https://files.example.com/#top", "no query or fragment"),
        ] {
            let error = load_s3(&[
                ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
                ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "secret"),
                ("SVC_MESSAGING__S3__PUBLIC_ENDPOINT", bad),
            ])
            .expect_err(bad);
            assert_eq!(error.key, "s3.public_endpoint", "{bad}: {error}");
            assert!(error.message.contains(says), "{bad}: {error}");
            assert!(!error.message.contains("pw@"), "{bad}: {error}");
        }
    }

    #[test]
    fn request_checksums_default_to_when_required_and_parse_by_name() {
        let keys = [
            ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
            ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "secret"),
        ];
        let settings = load_s3(&keys).unwrap();
        assert_eq!(
            settings.s3.request_checksums,
            S3RequestChecksums::WhenRequired
        );
        let mut chosen = keys.to_vec();
        chosen.push(("SVC_MESSAGING__S3__REQUEST_CHECKSUMS", "when-supported"));
        let settings = load_s3(&chosen).unwrap();
        assert_eq!(
            settings.s3.request_checksums,
            S3RequestChecksums::WhenSupported
        );
        chosen.pop();
        chosen.push(("SVC_MESSAGING__S3__REQUEST_CHECKSUMS", "always"));
        assert!(load_s3(&chosen).is_err());
    }

    #[test]
    fn credentials_are_static_keys_unless_the_chain_is_chosen() {
        let error = load_s3(&[]).expect_err("no keys");
        assert_eq!(error.key, "s3.access_key_id", "{error}");
        assert!(
            error.message.contains("s3.credentials = \"chain\""),
            "{error}"
        );

        let settings = load_s3(&[("SVC_MESSAGING__S3__CREDENTIALS", "chain")]).expect("valid");
        assert_eq!(settings.s3.credentials, S3Credentials::Chain);

        let error = load_s3(&[
            ("SVC_MESSAGING__S3__CREDENTIALS", "chain"),
            ("SVC_MESSAGING__S3__ACCESS_KEY_ID", "GK0123"),
            ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", "secret"),
        ])
        .expect_err("keys and chain");
        assert_eq!(error.key, "s3.access_key_id", "{error}");
        assert!(error.message.contains("ignores static keys"), "{error}");

        let error = load_s3(&[("SVC_MESSAGING__S3__CREDENTIALS", "instance-profile")])
            .expect_err("unknown mode");
        assert_eq!(error.key, "s3.credentials", "{error}");
    }

    #[test]
    fn connection_age_and_keepalive_are_validated() {
        let settings = load(&[
            ("SVC_MESSAGING__SERVER__MAX_CONNECTION_AGE", "10m"),
            ("SVC_MESSAGING__SERVER__MAX_CONNECTION_AGE_GRACE", "0s"),
            ("SVC_MESSAGING__SERVER__HTTP2_KEEPALIVE_INTERVAL", "15s"),
        ])
        .expect("valid");
        assert_eq!(settings.server.max_connection_age, Duration::from_secs(600));
        assert_eq!(settings.server.max_connection_age_grace, Duration::ZERO);
        assert_eq!(
            settings.server.http2_keepalive_interval,
            Duration::from_secs(15)
        );
        assert_eq!(
            settings.server.http2_keepalive_timeout,
            Duration::from_secs(20)
        );
        for (var, value, key) in [
            (
                "SVC_MESSAGING__SERVER__MAX_CONNECTION_AGE",
                "0s",
                "server.max_connection_age",
            ),
            (
                "SVC_MESSAGING__SERVER__HTTP2_KEEPALIVE_INTERVAL",
                "0s",
                "server.http2_keepalive_interval",
            ),
            (
                "SVC_MESSAGING__SERVER__HTTP2_KEEPALIVE_TIMEOUT",
                "0s",
                "server.http2_keepalive_timeout",
            ),
        ] {
            let error = load(&[(var, value)]).expect_err(var);
            assert_eq!(error.key, key, "{error}");
        }
    }

    #[test]
    fn redis_reconnect_max_delay_defaults_to_a_second_and_is_bounded() {
        let settings = load(&[]).expect("defaults are valid");
        assert_eq!(settings.redis.reconnect_max_delay, Duration::from_secs(1));
        let settings =
            load(&[("SVC_MESSAGING__REDIS__RECONNECT_MAX_DELAY", "250ms")]).expect("valid");
        assert_eq!(
            settings.redis.reconnect_max_delay,
            Duration::from_millis(250)
        );
        for value in ["0s", "5ms", "61s"] {
            let error =
                load(&[("SVC_MESSAGING__REDIS__RECONNECT_MAX_DELAY", value)]).expect_err(value);
            assert_eq!(error.key, "redis.reconnect_max_delay", "{error}");
        }
    }
}
