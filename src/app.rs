//! The application: stores built from config, gRPC and HTTP served on bound listeners, a health
//! monitor, and a graceful shutdown. Binding is separate from running so tests can bind port 0
//! and read the real addresses before the service starts.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{
    service::{Routes, interceptor::InterceptedService},
    transport::Server,
};

use crate::{
    auth::Authenticator,
    budget::MemoryBudget,
    config::{BlobBackend, ConfigError, MessageBackend, Settings},
    deadline::DeadlineLayer,
    drain::DrainLayer,
    files::{policy::UploadPolicy, service::FileService},
    grpc::{
        file_relay::FileRelayApi,
        messaging::MessagingApi,
        pb::{
            self, file_relay_service_server::FileRelayServiceServer,
            messaging_service_server::MessagingServiceServer,
        },
        status::status_detail_descriptors,
    },
    health::{self, DependencyCheck, HealthBoard},
    http,
    messaging::service::ConversationService,
    metrics::{GrpcMetricsLayer, Metrics, ServedMethods},
    startup,
    store::{
        blobs::{BlobError, BlobStore},
        file_records::FileRecordStore,
        fs::{FsBlobStore, UrlSigner},
        fs_sessions::{FsUploadSessionStore, SESSIONS_DIR},
        memory::{MemoryFileRecordStore, MemoryMessageStore},
        messages::{ConversationCap, MessageStore, Retention, StoreError},
        redis::RedisMessageStore,
        s3::{LifecycleOutcome, S3BlobStore},
        upload_sessions::UploadSessionStore,
    },
    thumbnails::ThumbnailPool,
    tls::ServerTls,
    transport::{ConnectionDeadlines, LimitedIncoming},
};

/// Room for a protobuf envelope around the largest accepted upload chunk.
const MESSAGE_OVERHEAD: usize = 64 * 1024;
/// HTTP/2 flow-control windows; see where the server is built.
const STREAM_WINDOW: u32 = 512 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Streams a client may open and reset before they are accepted, per connection (h2's default).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for a client's errors before it ends the connection with GOAWAY
/// (hyper's default).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How long cancelled streams get to send their final status after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("storage.data_dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("no randomness for the download signing key: {0}")]
    Randomness(String),
    #[error("redis: {0}")]
    Redis(#[from] StoreError),
    #[error("s3: {0}")]
    S3(#[source] BlobError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A service bound to its listeners, ready to run.
pub struct App {
    settings: Settings,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
}

impl App {
    /// Binds the gRPC and HTTP listeners (port 0 picks a free port).
    pub async fn bind(settings: Settings) -> Result<Self, StartupError> {
        let grpc_listener = bind(settings.server.grpc_addr).await?;
        let http_listener = bind(settings.server.http_addr).await?;
        Ok(Self {
            settings,
            grpc_listener,
            http_listener,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains: NOT_SERVING at once, no new connections,
    /// in-flight RPCs get `server.shutdown_grace` to finish before the rest are cancelled, along
    /// with any image decode still running.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let Self {
            settings,
            grpc_listener,
            http_listener,
        } = self;
        let grpc_addr = local_addr(&grpc_listener, settings.server.grpc_addr)?;
        let http_addr = local_addr(&http_listener, settings.server.http_addr)?;
        let startup::Checked { authenticator, tls } = startup::check(&settings)?;
        let backends = Backends::build(&settings, http_addr).await?;
        let services = Services::build(&settings, &backends, authenticator).await?;
        let running = Running::serve(
            &settings,
            backends,
            services,
            grpc_listener,
            http_listener,
            tls,
        );
        tracing::info!(%grpc_addr, %http_addr, "serving");
        running
            .drain_after(shutdown, settings.server.shutdown_grace)
            .await
    }
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> Result<SocketAddr, StartupError> {
    listener.local_addr().map_err(|source| StartupError::Bind {
        addr: configured,
        source,
    })
}

/// Everything the gRPC port serves, built from the settings and the backends.
struct Services {
    metrics: Arc<Metrics>,
    served_methods: ServedMethods,
    board: HealthBoard,
    routes: Routes,
    /// Closed when the drain gives up on running calls, which stops every image decode.
    thumbnails: Arc<ThumbnailPool>,
    /// For the janitor of expired upload sessions.
    files: Arc<FileService>,
}

impl Services {
    async fn build(
        settings: &Settings,
        backends: &Backends,
        authenticator: Authenticator,
    ) -> Result<Self, StartupError> {
        if authenticator.is_trusted_header() {
            tracing::warn!(
                "auth.mode = trusted-header: the x-user-id metadata is believed as-is; expose this port only behind an authenticating gateway"
            );
        }

        let metrics = Metrics::new();
        let served_methods = ServedMethods::from_descriptor_sets(&SERVED_DESCRIPTOR_SETS)
            .expect("the compiled-in descriptor sets decode");
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let max_request =
            usize::try_from(settings.server.max_request_bytes.as_u64()).unwrap_or(usize::MAX);
        let health_service = health_service.max_decoding_message_size(max_request);
        let board = HealthBoard::new(health_reporter).await;

        let reflection_v1 = reflection_builder()
            .build_v1()?
            .max_decoding_message_size(max_request);
        let reflection_v1alpha = reflection_builder()
            .build_v1alpha()?
            .max_decoding_message_size(max_request);

        let max_message = usize::try_from(settings.uploads.max_chunk_bytes.as_u64())
            .unwrap_or(usize::MAX)
            + MESSAGE_OVERHEAD;
        let policy = Arc::new(UploadPolicy::from_settings(&settings.uploads));
        let conversations = Arc::new(ConversationService::new(
            backends.messages.clone(),
            backends.file_records.clone(),
            settings.messaging.clone(),
        ));
        let messaging = InterceptedService::new(
            MessagingServiceServer::new(MessagingApi::new(conversations.clone()))
                .max_decoding_message_size(max_request),
            authenticator.clone(),
        );
        let thumbnails = Arc::new(
            ThumbnailPool::new(
                &settings.thumbnails,
                settings.uploads.max_image_pixels,
                backends.budget.clone(),
            )
            .with_metrics(metrics.thumbnails.clone()),
        );
        let file_service = Arc::new(FileService::new(
            conversations,
            backends.blobs.clone(),
            backends.file_records.clone(),
            backends.upload_sessions.clone(),
            policy,
            thumbnails.clone(),
            settings.downloads.url_ttl,
            backends.budget.clone(),
        ));
        let file_relay = InterceptedService::new(
            FileRelayServiceServer::new(FileRelayApi::new(file_service.clone()))
                .max_decoding_message_size(max_message),
            authenticator,
        );
        let routes = Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(messaging)
            .add_service(file_relay);
        Ok(Self {
            metrics,
            served_methods,
            board,
            routes,
            thumbnails,
            files: file_service,
        })
    }
}

/// The served ports and background tasks, and the tokens that stop them.
struct Running {
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
    http_task: JoinHandle<io::Result<()>>,
    monitor_task: JoinHandle<()>,
    board: HealthBoard,
    thumbnails: Arc<ThumbnailPool>,
    stop_accepting: CancellationToken,
    stop_monitor: CancellationToken,
    cancel_calls: CancellationToken,
}

impl Running {
    /// Starts serving gRPC and HTTP, the health monitor and (for the filesystem store) the
    /// sweep of expired files.
    fn serve(
        settings: &Settings,
        backends: Backends,
        services: Services,
        grpc_listener: TcpListener,
        http_listener: TcpListener,
        tls: Option<ServerTls>,
    ) -> Self {
        let Services {
            metrics,
            served_methods,
            board,
            routes,
            thumbnails,
            files,
        } = services;
        let stop_accepting = CancellationToken::new();
        let stop_monitor = CancellationToken::new();
        let cancel_calls = CancellationToken::new();

        let connection_deadlines = ConnectionDeadlines::default();
        let grpc_incoming = LimitedIncoming::new(
            grpc_listener,
            settings.server.max_connections,
            settings.server.handshake_timeout,
            metrics.connections.clone(),
        )
        .with_max_age(
            settings.server.max_connection_age,
            settings.server.max_connection_age_grace,
            connection_deadlines.clone(),
        )
        .with_tls(tls.map(|tls| {
            tracing::info!(
                client_certificates = tls.verifies_clients(),
                "gRPC port serves TLS"
            );
            let acceptors = tls.acceptors();
            tokio::spawn(tls.reload_on_change(metrics.tls.clone(), stop_monitor.clone()));
            acceptors
        }));
        let grpc_server = Server::builder()
            .max_concurrent_streams(Some(settings.server.max_concurrent_streams))
            // tonic hands hyper `None` for these unless set, which turns the local-reset limit
            // off: rapid-reset and "made you reset" floods would then cost nothing to send.
            .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
            .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .http2_max_header_list_size(Some(
                u32::try_from(settings.server.max_header_list_size.as_u64()).unwrap_or(u32::MAX),
            ))
            .http2_keepalive_interval(Some(settings.server.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(settings.server.http2_keepalive_timeout))
            // GOAWAY at this age; the grace after it is enforced by LimitedIncoming and the drain
            // layer (tonic's own `max_connection_age_grace` would skip the GOAWAY and cut the
            // connection at age + grace instead).
            .max_connection_age(settings.server.max_connection_age)
            // A stream whose upload waits for memory stops reading; its unread bytes hold the
            // connection's window. A connection window many times the stream window keeps one
            // such stream from stalling the other uploads multiplexed on the connection (which
            // would hold their memory and never release it).
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .layer(GrpcMetricsLayer::new(metrics.clone(), served_methods))
            // Inside the metrics layer, so calls past their deadline are counted as such.
            .layer(DeadlineLayer::new())
            .layer(DrainLayer::with_connection_deadlines(
                cancel_calls.clone(),
                connection_deadlines,
            ))
            .add_routes(routes)
            .serve_with_incoming_shutdown(grpc_incoming, stop_accepting.clone().cancelled_owned());
        let grpc_task = tokio::spawn(grpc_server);

        let http_router = http::router(board.clone(), metrics, backends.fs_blobs.clone());
        let http_stop = stop_accepting.clone();
        let http_task = tokio::spawn(async move {
            axum::serve(http_listener, http_router)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        });

        tokio::spawn(return_idle_memory(
            backends.budget.clone(),
            stop_monitor.clone(),
        ));
        tokio::spawn(crate::files::janitor::run(
            files.clone(),
            settings.uploads.orphan_age,
            settings.uploads.orphan_sweep_interval,
            crate::files::janitor::SweepScope {
                objects_without_records: matches!(settings.storage.messages, MessageBackend::Redis)
                    || matches!(settings.storage.blobs, BlobBackend::Fs),
                records_without_objects: matches!(settings.storage.blobs, BlobBackend::S3)
                    || matches!(settings.storage.messages, MessageBackend::Memory),
            },
            stop_monitor.clone(),
        ));
        tokio::spawn(expire_upload_sessions(
            files,
            settings.uploads.session_ttl.min(settings.uploads.retention),
            stop_monitor.clone(),
        ));
        if let Some(store) = backends.fs_blobs {
            tokio::spawn(sweep_expired_files(
                store,
                settings.uploads.retention,
                stop_monitor.clone(),
            ));
        }
        let monitor_task = tokio::spawn(health::monitor(
            board.clone(),
            backends.dependencies,
            settings.server.health_check_interval,
            settings.server.health_check_timeout,
            stop_monitor.clone(),
        ));
        Self {
            grpc_task,
            http_task,
            monitor_task,
            board,
            thumbnails,
            stop_accepting,
            stop_monitor,
            cancel_calls,
        }
    }

    /// Serves until `shutdown` resolves (or the gRPC server ends by itself), then drains: the
    /// health turns NOT_SERVING, no new connections are accepted, running calls get `grace` to
    /// finish and the rest are cancelled.
    async fn drain_after(
        mut self,
        shutdown: impl Future<Output = ()> + Send,
        grace: Duration,
    ) -> Result<(), StartupError> {
        let early_exit = tokio::select! {
            () = shutdown => None,
            result = &mut self.grpc_task => Some(result),
        };
        if let Some(result) = early_exit {
            self.stop_monitor.cancel();
            self.stop_accepting.cancel();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.into()),
                Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
            };
        }

        tracing::info!(grace = %humantime::format_duration(grace), "shutting down");
        self.stop_monitor.cancel();
        let _ = self.monitor_task.await;
        self.board.set_serving(false).await;
        self.stop_accepting.cancel();

        let drained = tokio::time::timeout(grace, &mut self.grpc_task)
            .await
            .is_ok();
        if !drained {
            tracing::warn!("shutdown grace elapsed; cancelling the RPCs still running");
            self.cancel_calls.cancel();
            // Dropping an upload's future cancels its decode too, but only once the drained
            // connection lets go of it; this stops every decode now.
            self.thumbnails.close();
            if tokio::time::timeout(CANCEL_FLUSH, &mut self.grpc_task)
                .await
                .is_err()
            {
                self.grpc_task.abort();
            }
        }
        self.http_task.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

/// Both reflection versions describe every service, each other included: grpcurl 1.8 and
/// Python's client only speak v1alpha, newer clients v1. They describe the messages of status
/// details too (not among the served sets: they have no methods to label).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    SERVED_DESCRIPTOR_SETS
        .iter()
        .fold(
            tonic_reflection::server::Builder::configure().include_reflection_service(false),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
        .register_file_descriptor_set(status_detail_descriptors())
}

/// The descriptors of every service the gRPC port serves: reflection describes them and the
/// metrics layer labels only their methods.
const SERVED_DESCRIPTOR_SETS: [&[u8]; 4] = [
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    pb::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
];

/// The storage backends chosen by `storage.*`, and the dependencies whose health they report.
struct Backends {
    messages: Arc<dyn MessageStore>,
    file_records: Arc<dyn FileRecordStore>,
    /// Redis for the shared deployment (Redis and S3), else files in the data directory.
    upload_sessions: Arc<dyn UploadSessionStore>,
    blobs: Arc<dyn BlobStore>,
    /// Set for the filesystem store, whose signed URLs the HTTP port serves.
    fs_blobs: Option<FsBlobStore>,
    /// Bytes uploads (part buffers) and image decodes may hold together.
    budget: Arc<MemoryBudget>,
    dependencies: Vec<Arc<dyn DependencyCheck>>,
}

impl Backends {
    async fn build(settings: &Settings, http_addr: SocketAddr) -> Result<Self, StartupError> {
        let retention = Retention {
            max_events: settings.messaging.history_max_events,
            max_age: settings.messaging.history_max_age,
        };
        let cap = ConversationCap(settings.messaging.max_conversations_per_user);
        let mut dependencies: Vec<Arc<dyn DependencyCheck>> = Vec::new();
        let mut redis_sessions: Option<Arc<dyn UploadSessionStore>> = None;
        let (messages, file_records): (Arc<dyn MessageStore>, Arc<dyn FileRecordStore>) =
            match settings.storage.messages {
                MessageBackend::Memory => (
                    Arc::new(MemoryMessageStore::new(retention).with_conversation_cap(cap)),
                    Arc::new(MemoryFileRecordStore::new()),
                ),
                MessageBackend::Redis => {
                    let redis = Arc::new(
                        RedisMessageStore::connect(&settings.redis, retention)
                            .await?
                            .with_conversation_cap(cap),
                    );
                    dependencies.push(redis.clone());
                    redis_sessions = Some(redis.clone());
                    (redis.clone(), redis)
                }
            };
        // Sessions must be seen wherever their staged bytes can be continued: by every replica
        // when both are shared, else by this process, across its restarts.
        let upload_sessions: Arc<dyn UploadSessionStore> =
            match (redis_sessions, settings.storage.blobs) {
                (Some(redis), BlobBackend::S3) => redis,
                _ => {
                    let dir = settings.storage.data_dir.join(SESSIONS_DIR);
                    Arc::new(FsUploadSessionStore::open(&dir).await.map_err(|source| {
                        StartupError::DataDir {
                            path: dir.display().to_string(),
                            source,
                        }
                    })?)
                }
            };
        let budget = MemoryBudget::new(
            settings.uploads.memory_budget.as_u64(),
            settings.uploads.memory_wait_timeout,
        );
        let (blobs, fs_blobs): (Arc<dyn BlobStore>, Option<FsBlobStore>) = match settings
            .storage
            .blobs
        {
            BlobBackend::Fs => {
                let store = open_fs_store(settings, http_addr).await?;
                dependencies.push(Arc::new(store.clone()));
                (Arc::new(store.clone()), Some(store))
            }
            BlobBackend::S3 => {
                let store = Arc::new(
                    S3BlobStore::connect(
                        &settings.s3,
                        settings.uploads.part_size.as_u64(),
                        settings.uploads.parts_in_flight as usize,
                        budget.clone(),
                    )
                    .await
                    .map_err(StartupError::S3)?,
                );
                if settings.s3.manage_lifecycle {
                    match store.install_lifecycle(settings.uploads.retention).await {
                        Ok(LifecycleOutcome::Installed) => {
                            tracing::info!("bucket lifecycle rule installed");
                        }
                        Ok(LifecycleOutcome::Unsupported) => tracing::warn!(
                            "the S3 server does not implement bucket lifecycle; expired files stay until deleted"
                        ),
                        Err(error) => {
                            tracing::warn!(%error, "could not install the bucket lifecycle rule");
                        }
                    }
                }
                dependencies.push(store.clone());
                (store, None)
            }
        };
        tracing::info!(
            messages = ?settings.storage.messages,
            blobs = ?settings.storage.blobs,
            data_dir = %settings.storage.data_dir.display(),
            "storage backends"
        );
        Ok(Self {
            messages,
            file_records,
            upload_sessions,
            blobs,
            fs_blobs,
            budget,
            dependencies,
        })
    }
}

async fn open_fs_store(
    settings: &Settings,
    http_addr: SocketAddr,
) -> Result<FsBlobStore, StartupError> {
    let signing_key = match &settings.downloads.signing_key {
        Some(key) => key.expose_secret().as_bytes().to_vec(),
        // Only this process verifies its URLs, so a random key is enough for one replica.
        None => {
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|error| StartupError::Randomness(error.to_string()))?;
            key
        }
    };
    let base_url = settings
        .downloads
        .public_base_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    FsBlobStore::open(
        &settings.storage.data_dir,
        UrlSigner::new(signing_key, &base_url),
    )
    .await
    .map_err(|source| StartupError::DataDir {
        path: settings.storage.data_dir.display().to_string(),
        source,
    })
}

/// Gives the memory of freed upload buffers back to the operating system once no upload holds
/// any. glibc keeps freed 8 MiB part buffers in its arenas (its mmap threshold rises after the
/// first one is freed), so without this the process stays hundreds of MiB larger after a burst of
/// uploads; `malloc_trim` releases them (`madvise` of the free pages), at most once per period and
/// only after buffers were returned.
async fn return_idle_memory(budget: Arc<MemoryBudget>, stop: CancellationToken) {
    const PERIOD: Duration = Duration::from_millis(500);
    let mut trimmed_at = budget.releases();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PERIOD) => {}
        }
        let releases = budget.releases();
        if releases == trimmed_at || !budget.is_idle() {
            continue;
        }
        trimmed_at = releases;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own state.
            unsafe { libc::malloc_trim(0) }
        })
        .await;
    }
}

/// Discards resumable uploads whose session expired unfinished: their staged bytes (an S3
/// multipart upload, a staging file) and their session. Every replica runs it; discarding is
/// idempotent. The bucket lifecycle rule stays the backstop for a session Redis forgot.
async fn expire_upload_sessions(files: Arc<FileService>, ttl: Duration, stop: CancellationToken) {
    const BATCH: usize = 100;
    const MAX_BATCHES: usize = 10;
    let period = (ttl / 8).clamp(Duration::from_millis(200), Duration::from_secs(60));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        // A bounded number of batches per round: sessions whose removal keeps failing are
        // listed again and must not keep the janitor spinning.
        for _ in 0..MAX_BATCHES {
            match files.expire_sessions(BATCH).await {
                Ok(0) => break,
                Ok(discarded) => {
                    tracing::info!(discarded, "discarded expired unfinished uploads");
                    if discarded < BATCH {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "could not list expired upload sessions");
                    break;
                }
            }
        }
    }
}

/// Removes expired files from the filesystem store (S3 has its lifecycle rule for this). The
/// metadata stores already hide them; this reclaims the disk.
async fn sweep_expired_files(store: FsBlobStore, retention: Duration, stop: CancellationToken) {
    let period = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        match store
            .remove_expired(&["files/", "thumbs/"], retention)
            .await
        {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed expired files"),
            Err(error) => tracing::warn!(%error, "could not sweep expired files"),
        }
    }
}
