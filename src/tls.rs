//! TLS of the gRPC port (rustls with the ring provider): the server certificate, optional client
//! certificates (mTLS), and reloading both without a restart.
//!
//! The files are read and checked at start-up ([`crate::startup::check`]), so a missing,
//! unreadable or mismatched file stops the process with the config key that names it. While
//! serving, [`ServerTls::reload_on_change`] reads them again every `server.tls.reload_interval`:
//! when their contents changed and still make a valid configuration, new connections get it
//! (connections already open keep the one they shook hands with); when they do not, the previous
//! configuration stays and a warning says why. Reading the contents (not the modification time)
//! follows Kubernetes, which swaps a mounted Secret's files through a symlink.
//!
//! The handshake itself runs in [`crate::transport::LimitedIncoming`], within the connection
//! limits and `server.handshake_timeout`.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use prometheus_client::metrics::counter::Counter;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientCertPolicy, ConfigError, TlsSettings};

/// ALPN: gRPC is HTTP/2 only, and clients (gRPC-Go among them) require the server to say so.
const ALPN_H2: &[u8] = b"h2";

/// Certificate reloads for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    /// Changed files that now serve new connections.
    pub reloads: Counter,
    /// Changed files that could not be used (the previous configuration stayed).
    pub reload_failures: Counter,
}

/// The TLS configuration of the gRPC port, loaded from `server.tls.*`.
pub struct ServerTls {
    settings: TlsSettings,
    /// What the current configuration was built from, to notice changes.
    loaded: PemFiles,
    acceptors: TlsAcceptors,
}

/// Hands each new connection the current configuration; cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptors {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsAcceptors {
    /// An acceptor with the configuration in force now.
    pub fn current(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        TlsAcceptor::from(config)
    }

    fn replace(&self, config: ServerConfig) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
    }
}

impl ServerTls {
    /// Loads the files named by `settings`; `None` when TLS is off (no certificate configured).
    pub fn load(settings: &TlsSettings) -> Result<Option<Self>, ConfigError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let loaded = PemFiles::read(settings)?;
        let config = loaded.server_config(settings)?;
        Ok(Some(Self {
            settings: settings.clone(),
            loaded,
            acceptors: TlsAcceptors {
                current: Arc::new(RwLock::new(Arc::new(config))),
            },
        }))
    }

    pub fn acceptors(&self) -> TlsAcceptors {
        self.acceptors.clone()
    }

    /// Whether clients are asked for certificates.
    pub fn verifies_clients(&self) -> bool {
        self.settings.client_ca_file.is_some()
    }

    /// Reads the files every `server.tls.reload_interval` until `stop`, and serves new
    /// connections with what they hold once it changed and is valid (see the module docs).
    pub async fn reload_on_change(self, metrics: TlsMetrics, stop: CancellationToken) {
        let Self {
            settings,
            mut loaded,
            acceptors,
        } = self;
        // Each problem is reported once, not at every interval while it lasts.
        let mut last_read_error: Option<ConfigError> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(settings.reload_interval) => {}
            }
            let reading = settings.clone();
            let read = tokio::task::spawn_blocking(move || PemFiles::read(&reading)).await;
            let files = match read {
                Ok(Ok(files)) => files,
                Ok(Err(error)) => {
                    if last_read_error.as_ref() != Some(&error) {
                        metrics.reload_failures.inc();
                        tracing::warn!(%error, "cannot read the TLS files; keeping the current certificate");
                        last_read_error = Some(error);
                    }
                    continue;
                }
                Err(join_error) => {
                    tracing::warn!(%join_error, "reading the TLS files failed");
                    continue;
                }
            };
            last_read_error = None;
            if files == loaded {
                continue;
            }
            match files.server_config(&settings) {
                Ok(config) => {
                    acceptors.replace(config);
                    metrics.reloads.inc();
                    tracing::info!("TLS files changed; new connections use the new certificate");
                }
                Err(error) => {
                    metrics.reload_failures.inc();
                    tracing::warn!(%error, "the changed TLS files cannot be used; keeping the current certificate");
                }
            }
            // A broken change is not retried until the files change again.
            loaded = files;
        }
    }
}

/// The contents of the configured files.
#[derive(Clone, PartialEq, Eq)]
struct PemFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl PemFiles {
    fn read(settings: &TlsSettings) -> Result<Self, ConfigError> {
        let (Some(cert_file), Some(key_file)) = (&settings.cert_file, &settings.key_file) else {
            return Err(config_error(
                "server.tls.cert_file",
                "TLS needs server.tls.cert_file and server.tls.key_file".to_owned(),
            ));
        };
        Ok(Self {
            cert: read_file("server.tls.cert_file", cert_file)?,
            key: read_file("server.tls.key_file", key_file)?,
            client_ca: settings
                .client_ca_file
                .as_deref()
                .map(|path| read_file("server.tls.client_ca_file", path))
                .transpose()?,
        })
    }

    /// The rustls configuration these files make, or the key of the first unusable file.
    fn server_config(&self, settings: &TlsSettings) -> Result<ServerConfig, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates("server.tls.cert_file", &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|error| {
            config_error(
                "server.tls.key_file",
                format!("no usable PEM private key: {error}"),
            )
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| config_error("server.tls", error.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                builder.with_client_cert_verifier(client_verifier(pem, settings, provider)?)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|error| match error {
                rustls::Error::InconsistentKeys(_) => config_error(
                    "server.tls.key_file",
                    "does not match the certificate in server.tls.cert_file".to_owned(),
                ),
                rustls::Error::InvalidCertificate(_) => {
                    config_error("server.tls.cert_file", format!("unusable: {error}"))
                }
                _ => config_error("server.tls.key_file", format!("unusable: {error}")),
            })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

fn client_verifier(
    pem: &[u8],
    settings: &TlsSettings,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ConfigError> {
    const KEY: &str = "server.tls.client_ca_file";
    let mut roots = RootCertStore::empty();
    for certificate in certificates(KEY, pem)? {
        roots
            .add(certificate)
            .map_err(|error| config_error(KEY, format!("not a usable CA certificate: {error}")))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = match settings.client_cert {
        ClientCertPolicy::Required => builder,
        ClientCertPolicy::Optional => builder.allow_unauthenticated(),
    };
    builder
        .build()
        .map_err(|error| config_error(KEY, error.to_string()))
}

/// Every certificate of a PEM file; at least one.
fn certificates(key: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| config_error(key, format!("not a PEM certificate file: {error}")))?;
    if certificates.is_empty() {
        return Err(config_error(key, "holds no PEM certificate".to_owned()));
    }
    Ok(certificates)
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|error| config_error(key, format!("cannot read {}: {error}", path.display())))
}

fn config_error(key: &str, message: String) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message,
    }
}
