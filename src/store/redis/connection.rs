//! Connecting to Redis: one client configuration (timeouts, reconnects, keepalive) for the
//! command and the subscriber client, and following a URL that names one node of a cluster to
//! the whole cluster.

use std::time::Duration;

use fred::{
    clients::{Client, SubscriberClient},
    prelude::{Builder, ClientLike, Config, ConnectionConfig, PerformanceConfig, ReconnectPolicy},
    types::{
        ConnectHandle, InfoKind,
        config::{ClusterDiscoveryPolicy, ServerConfig, TcpConfig, UnresponsiveConfig},
    },
};
use secrecy::ExposeSecret;
use socket2::TcpKeepalive;

use crate::{config::RedisSettings, store::messages::StoreError};

/// Signals buffered for live subscribers before a slow one gets a resync instead.
pub(super) const LIVE_CAPACITY: usize = 4096;
/// Longest wait for any one command (the answer to a script included).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a TCP connection (and its AUTH/SELECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may leave a command unanswered before it is replaced.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(10);

/// Connects the command client to `redis.url`, with `redis.password` (raw, no
/// percent-encoding) taking precedence over the URL's. A `redis://` URL naming one node of a
/// Redis Cluster is followed to the whole cluster. Returns the configuration the subscriber
/// client is built from too.
pub(super) async fn command_client(
    settings: &RedisSettings,
) -> Result<(Config, Client, ConnectHandle), StoreError> {
    let mut config = client_config(settings)?;
    let (mut client, mut connection) = start_client(&config, settings).await?;
    if let ServerConfig::Centralized { server } = &config.server
        && is_cluster_node(&client).await
    {
        tracing::info!("redis.url names a cluster node; connecting to the cluster");
        config.server = ServerConfig::Clustered {
            hosts: vec![server.clone()],
            policy: ClusterDiscoveryPolicy::UseCache,
        };
        config.database = None;
        let _ = client.quit().await;
        (client, connection) = start_client(&config, settings).await?;
    }
    Ok((config, client, connection))
}

/// Builds the subscriber client (for the live feed); it connects when initialised.
pub(super) fn subscriber_client(
    config: &Config,
    settings: &RedisSettings,
) -> Result<SubscriberClient, StoreError> {
    Ok(builder(config, settings).build_subscriber_client()?)
}

fn builder(config: &Config, settings: &RedisSettings) -> Builder {
    let mut builder = Builder::from_config(config.clone());
    // While it reconnects a client sends nothing (commands wait, then time out), and during a
    // cluster failover every attempt fails until the new master is elected: the cap is how
    // late after the failover the service notices it (5 s made a 3 s failover cost 6.5 s).
    let max_delay = u32::try_from(settings.reconnect_max_delay.as_millis()).unwrap_or(u32::MAX);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, max_delay, 2))
        .set_performance_config(PerformanceConfig {
            default_command_timeout: COMMAND_TIMEOUT,
            // fred hands pub/sub messages to the live feed task through a broadcast channel;
            // its default of 32 would turn a burst into a Resync.
            broadcast_channel_capacity: LIVE_CAPACITY,
            ..PerformanceConfig::default()
        })
        .set_connection_config(ConnectionConfig {
            connection_timeout: CONNECT_TIMEOUT,
            internal_command_timeout: CONNECT_TIMEOUT,
            // A script in flight when the connection drops is not sent again: it may have run,
            // and the caller decides whether to retry.
            max_command_attempts: 1,
            // A connection that leaves a command unanswered this long is closed and
            // re-established instead of hanging every later command.
            unresponsive: UnresponsiveConfig {
                max_timeout: Some(UNRESPONSIVE_AFTER),
                interval: Duration::from_secs(1),
            },
            tcp: TcpConfig {
                nodelay: Some(true),
                // The subscriber connection is idle between events: keepalive probes notice
                // a peer that vanished without closing it.
                keepalive: Some(
                    TcpKeepalive::new()
                        .with_time(Duration::from_secs(30))
                        .with_interval(Duration::from_secs(10))
                        .with_retries(3),
                ),
                ..TcpConfig::default()
            },
            ..ConnectionConfig::default()
        });
    builder
}

async fn start_client(
    config: &Config,
    settings: &RedisSettings,
) -> Result<(Client, ConnectHandle), StoreError> {
    let client = builder(config, settings).build()?;
    let connection = client.init().await?;
    Ok((client, connection))
}

/// Whether the server is a Redis Cluster node. A server that refuses `INFO` (an ACL, say) is
/// taken for a standalone one.
async fn is_cluster_node(client: &Client) -> bool {
    match client.info::<String>(Some(InfoKind::Cluster)).await {
        Ok(info) => info.lines().any(|line| line.trim() == "cluster_enabled:1"),
        Err(error) => {
            tracing::warn!(%error, "redis INFO cluster failed; assuming a standalone server");
            false
        }
    }
}

fn client_config(settings: &RedisSettings) -> Result<Config, StoreError> {
    let url = settings.url.as_ref().ok_or_else(|| {
        StoreError::Unavailable("redis.url is required for the redis message store".into())
    })?;
    // fred's URL errors name the part at fault, never the URL itself (it may hold a password).
    let mut config = Config::from_url(url.expose_secret()).map_err(|error| {
        StoreError::Unavailable(format!("redis.url is not usable: {}", error.details()).into())
    })?;
    if let Some(password) = &settings.password {
        config.password = Some(password.expose_secret().to_owned());
    }
    // Rediscover the cluster through every master it last knew, not only the configured
    // ones: fred rediscovers from the configured nodes alone by default, and when the node
    // `redis.url` names is the master that died, that leaves it nobody to ask.
    if let ServerConfig::Clustered { policy, .. } = &mut config.server {
        *policy = ClusterDiscoveryPolicy::UseCache;
    }
    Ok(config)
}
