//! The application: stores built from config, gRPC and HTTP served on bound listeners, a health
//! monitor, and a graceful shutdown. Binding is separate from running so tests can bind port 0
//! and read the real addresses before the service starts.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};

use crate::{
    auth::Authenticator,
    config::{ConfigError, Settings},
    drain::DrainLayer,
    files::policy::UploadPolicy,
    grpc::{
        file_relay::FileRelayApi,
        messaging::MessagingApi,
        pb::{
            self, file_relay_service_server::FileRelayServiceServer,
            messaging_service_server::MessagingServiceServer,
        },
    },
    health::{self, DependencyCheck, HealthBoard},
    http,
    messaging::service::ConversationService,
    metrics::{GrpcMetricsLayer, Metrics},
    store::{
        fs::{FsBlobStore, UrlSigner},
        memory::MemoryMessageStore,
        messages::{MessageStore, Retention},
    },
};

/// Room for a protobuf envelope around the largest accepted upload chunk.
const MESSAGE_OVERHEAD: usize = 64 * 1024;
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
    /// in-flight RPCs get `server.shutdown_grace` to finish before the rest are cancelled.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let Self {
            settings,
            grpc_listener,
            http_listener,
        } = self;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: settings.server.grpc_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: settings.server.http_addr,
                source,
            })?;

        let signing_key = match &settings.downloads.signing_key {
            Some(key) => key.expose_secret().as_bytes().to_vec(),
            // Only this process verifies its URLs, so a random key is enough for one replica.
            None => {
                let mut key = vec![0u8; 32];
                getrandom::fill(&mut key).map_err(|error| StartupError::DataDir {
                    path: "random signing key".to_owned(),
                    source: io::Error::other(error.to_string()),
                })?;
                key
            }
        };
        let base_url = settings
            .downloads
            .public_base_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let blob_store = FsBlobStore::open(
            &settings.storage.data_dir,
            UrlSigner::new(signing_key, &base_url),
        )
        .await
        .map_err(|source| StartupError::DataDir {
            path: settings.storage.data_dir.display().to_string(),
            source,
        })?;
        tracing::info!(
            messages = "memory",
            blobs = "fs",
            data_dir = %blob_store.root().display(),
            "storage backends"
        );
        let dependencies: Vec<Arc<dyn DependencyCheck>> = vec![Arc::new(blob_store.clone())];

        let authenticator = Authenticator::from_settings(&settings.auth)?;
        if authenticator.is_trusted_header() {
            tracing::warn!(
                "auth.mode = trusted-header: the x-user-id metadata is believed as-is; expose this port only behind an authenticating gateway"
            );
        }

        let metrics = Metrics::new();
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let board = HealthBoard::new(health_reporter).await;

        let reflection_v1 = reflection_builder().build_v1()?;
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;

        let max_message = usize::try_from(settings.uploads.max_chunk_bytes.as_u64())
            .unwrap_or(usize::MAX)
            + MESSAGE_OVERHEAD;
        let policy = Arc::new(UploadPolicy::from_settings(&settings.uploads));
        let message_store: Arc<dyn MessageStore> = Arc::new(MemoryMessageStore::new(Retention {
            max_events: settings.messaging.history_max_events,
            max_age: settings.messaging.history_max_age,
        }));
        let conversations = Arc::new(ConversationService::new(
            message_store,
            settings.messaging.clone(),
        ));
        let messaging = InterceptedService::new(
            MessagingServiceServer::new(MessagingApi::new(conversations)),
            authenticator.clone(),
        );
        let file_relay = InterceptedService::new(
            FileRelayServiceServer::new(FileRelayApi::new(policy))
                .max_decoding_message_size(max_message),
            authenticator,
        );

        let stop_accepting = CancellationToken::new();
        let stop_monitor = CancellationToken::new();
        let cancel_calls = CancellationToken::new();

        let grpc_incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let grpc_server = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(GrpcMetricsLayer::new(metrics.clone()))
            .layer(DrainLayer::new(cancel_calls.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(messaging)
            .add_service(file_relay)
            .serve_with_incoming_shutdown(grpc_incoming, stop_accepting.clone().cancelled_owned());
        let mut grpc_task: JoinHandle<Result<(), tonic::transport::Error>> =
            tokio::spawn(grpc_server);

        let http_router = http::router(board.clone(), metrics, Some(blob_store));
        let http_stop = stop_accepting.clone();
        let http_task = tokio::spawn(async move {
            axum::serve(http_listener, http_router)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
        });

        let monitor_task = tokio::spawn(health::monitor(
            board.clone(),
            dependencies,
            settings.server.health_check_interval,
            settings.server.health_check_timeout,
            stop_monitor.clone(),
        ));

        tracing::info!(%grpc_addr, %http_addr, "serving");

        let early_exit = tokio::select! {
            () = shutdown => None,
            result = &mut grpc_task => Some(result),
        };
        if let Some(result) = early_exit {
            stop_monitor.cancel();
            stop_accepting.cancel();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.into()),
                Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
            };
        }

        let grace = settings.server.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down");
        stop_monitor.cancel();
        let _ = monitor_task.await;
        board.set_serving(false).await;
        stop_accepting.cancel();

        let drained = tokio::time::timeout(grace, &mut grpc_task).await.is_ok();
        if !drained {
            tracing::warn!("shutdown grace elapsed; cancelling the RPCs still running");
            cancel_calls.cancel();
            if tokio::time::timeout(CANCEL_FLUSH, &mut grpc_task)
                .await
                .is_err()
            {
                grpc_task.abort();
            }
        }
        http_task.abort();
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
/// Python's client only speak v1alpha, newer clients v1.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
