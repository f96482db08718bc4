//! The fault-injection suite (issue 15), run by `scripts/chaos` (never by a plain `cargo test`:
//! the test is `#[ignore]`d and needs the servers that script starts).
//!
//! Each scenario starts three replicas of the service binary (A takes the sends, B the
//! subscriptions, C the uploads and is everyone's fallback) on a key prefix of its own, puts a
//! load on them (one sender and one subscriber per conversation; uploads in the upload
//! scenarios), injects one fault, stops the load, lets the subscribers catch up and audits:
//! every acknowledged send must be in the history and delivered, once, in order, without gaps;
//! after the orphan janitor's threshold nothing an upload left may remain in the bucket.
//!
//! Clients behave as the README asks callers to: a sender retries a failed send with the same
//! `client_message_id` (on the next replica), a subscriber resubscribes from the last sequence
//! it received, a resumable upload is sent again under its `request_id`, a one-shot upload is
//! started again.
//!
//! Environment (set by scripts/chaos): the `SVC_TEST_*` servers (Redis with AOF, Garage, a Redis
//! Cluster with replicas), `SVC_CHAOS_SECONDS` (load per scenario), `SVC_CHAOS_FAULT_SECONDS`
//! (how long a pause, stall or partition lasts), `SVC_CHAOS_ORPHAN_AGE_SECONDS`,
//! `SVC_CHAOS_SCENARIOS` (comma-separated names, default all) and `SVC_CHAOS_REPORT` (a file the
//! Markdown tables are written to).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use svc_messaging::{
    grpc::pb::{self, conversation_event::Event, upload_file_request::Payload},
    store::blobs::BlobStore,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::cloud::*;
use crate::support::{
    ServiceProcess, as_user, create_conversation, reason, required_tool, test_s3_settings,
    text_request, unique_prefix,
};

const CONVERSATIONS: usize = 4;
/// Pause between two sends of one sender (each sender sends one message at a time).
const SEND_PACE: Duration = Duration::from_millis(20);
const SEND_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
const UPLOAD_BYTES: usize = 10 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    RedisPause,
    RedisRestart,
    ClusterFailover,
    KillSubscribersReplica,
    KillSendersReplica,
    S3Stall,
    KillMidUpload,
    Partition,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::RedisPause,
        Scenario::RedisRestart,
        Scenario::ClusterFailover,
        Scenario::KillSubscribersReplica,
        Scenario::KillSendersReplica,
        Scenario::S3Stall,
        Scenario::KillMidUpload,
        Scenario::Partition,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::RedisPause => "redis-pause",
            Scenario::RedisRestart => "redis-restart",
            Scenario::ClusterFailover => "cluster-failover",
            Scenario::KillSubscribersReplica => "kill-subscribers-replica",
            Scenario::KillSendersReplica => "kill-senders-replica",
            Scenario::S3Stall => "s3-stall",
            Scenario::KillMidUpload => "kill-mid-upload",
            Scenario::Partition => "partition",
        }
    }

    fn describe(self, fault: Duration) -> String {
        let secs = fault.as_secs_f64();
        match self {
            Scenario::RedisPause => format!("Redis `CLIENT PAUSE {}` (all commands)", fault.as_millis()),
            Scenario::RedisRestart => "Redis SIGKILLed, started again 1 s later (AOF, appendfsync always)".to_owned(),
            Scenario::ClusterFailover => "Redis Cluster (3 masters with a replica each): the master the replicas' `redis.url` names SIGKILLed once its replica is in sync; the replica takes over".to_owned(),
            Scenario::KillSubscribersReplica => "replica B (subscriptions) SIGKILLed, started again 1 s later".to_owned(),
            Scenario::KillSendersReplica => "replica A (sends) SIGKILLed, started again 1 s later".to_owned(),
            Scenario::S3Stall => format!("Garage SIGSTOPped for {secs:.0} s during uploads, then SIGCONT"),
            Scenario::KillMidUpload => "replica C SIGKILLed while one-shot and resumable uploads stream to it, started again 1 s later".to_owned(),
            Scenario::Partition => format!("replicas A and B cut from Redis for {secs:.0} s (a proxy that stops forwarding: a blackhole, no resets)"),
        }
    }

    fn uploads(self) -> bool {
        matches!(self, Scenario::S3Stall | Scenario::KillMidUpload)
    }
}

/// The knobs scripts/chaos sets.
struct Knobs {
    load: Duration,
    fault: Duration,
    orphan_age: Duration,
    scenarios: Vec<Scenario>,
}

impl Knobs {
    fn from_env() -> Self {
        let seconds = |var: &str, default: f64| {
            Duration::from_secs_f64(
                std::env::var(var)
                    .ok()
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(default),
            )
        };
        let scenarios = match std::env::var("SVC_CHAOS_SCENARIOS") {
            Ok(list) if !list.is_empty() && list != "all" => list
                .split(',')
                .map(|name| {
                    *Scenario::ALL
                        .iter()
                        .find(|scenario| scenario.name() == name.trim())
                        .unwrap_or_else(|| panic!("no scenario named {name:?}"))
                })
                .collect(),
            _ => Scenario::ALL.to_vec(),
        };
        Self {
            load: seconds("SVC_CHAOS_SECONDS", 20.0),
            fault: seconds("SVC_CHAOS_FAULT_SECONDS", 5.0),
            orphan_age: seconds("SVC_CHAOS_ORPHAN_AGE_SECONDS", 10.0),
            scenarios,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replicas and the clients' view of them.

/// The replicas' current channels by name; a restarted replica gets a new port.
#[derive(Clone, Default)]
struct Directory {
    channels: Arc<Mutex<HashMap<&'static str, Channel>>>,
}

impl Directory {
    fn set(&self, name: &'static str, addr: SocketAddr) {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        self.channels.lock().unwrap().insert(name, channel);
    }

    fn get(&self, name: &str) -> Channel {
        self.channels.lock().unwrap()[name].clone()
    }
}

struct Replica {
    name: &'static str,
    env: Vec<(String, String)>,
    process: Option<ServiceProcess>,
}

impl Replica {
    async fn spawn(name: &'static str, env: Vec<(String, String)>, directory: &Directory) -> Self {
        let mut replica = Self {
            name,
            env,
            process: None,
        };
        replica.start(directory).await;
        replica
    }

    async fn start(&mut self, directory: &Directory) {
        let env = self.env.clone();
        let process = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            ServiceProcess::spawn(&env)
        })
        .await
        .unwrap();
        directory.set(self.name, process.grpc_addr);
        self.process = Some(process);
    }

    fn kill(&mut self) {
        self.save_log();
        if let Some(mut process) = self.process.take() {
            process.signal("KILL");
            process.wait_exit(Duration::from_secs(10)).expect("killed");
        }
    }
}

impl Replica {
    /// Writes the replica's output to `$SVC_CHAOS_LOG_DIR/<key prefix>-<name>-<pid>.log`, when
    /// set (to read what a replica did during a fault).
    fn save_log(&self) {
        let (Ok(dir), Some(process)) = (std::env::var("SVC_CHAOS_LOG_DIR"), &self.process) else {
            return;
        };
        let prefix = self
            .env
            .iter()
            .find(|(key, _)| key == "SVC_MESSAGING__REDIS__KEY_PREFIX")
            .map_or("chaos", |(_, value)| value.as_str());
        let path = std::path::Path::new(&dir).join(format!(
            "{}-{}-{}.log",
            prefix.trim_end_matches(':'),
            self.name,
            process.child.id()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(path, process.output());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.save_log();
    }
}

/// The environment of a replica on `redis_url` under `key_prefix`, with blobs in the test bucket.
fn replica_env(redis_url: &str, key_prefix: &str, knobs: &Knobs) -> Vec<(String, String)> {
    let s3 = test_s3_settings();
    [
        ("SVC_MESSAGING__STORAGE__MESSAGES", "redis".to_owned()),
        ("SVC_MESSAGING__REDIS__URL", redis_url.to_owned()),
        ("SVC_MESSAGING__REDIS__KEY_PREFIX", key_prefix.to_owned()),
        ("SVC_MESSAGING__STORAGE__BLOBS", "s3".to_owned()),
        (
            "SVC_MESSAGING__S3__ENDPOINT",
            s3.endpoint.clone().unwrap_or_default(),
        ),
        (
            "SVC_MESSAGING__S3__REGION",
            required_tool("SVC_TEST_S3_REGION"),
        ),
        ("SVC_MESSAGING__S3__BUCKET", s3.bucket.clone().unwrap()),
        (
            "SVC_MESSAGING__S3__ACCESS_KEY_ID",
            required_tool("SVC_TEST_S3_ACCESS_KEY_ID"),
        ),
        (
            "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
            required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY"),
        ),
        ("SVC_MESSAGING__S3__FORCE_PATH_STYLE", "true".to_owned()),
        (
            "SVC_MESSAGING__SERVER__HEALTH_CHECK_INTERVAL",
            "200ms".to_owned(),
        ),
        (
            "SVC_MESSAGING__SERVER__HEALTH_CHECK_TIMEOUT",
            "500ms".to_owned(),
        ),
        ("SVC_MESSAGING__SERVER__SHUTDOWN_GRACE", "1s".to_owned()),
        ("SVC_MESSAGING__UPLOADS__IDLE_TIMEOUT", "3s".to_owned()),
        (
            "SVC_MESSAGING__UPLOADS__ORPHAN_AGE",
            format!("{}ms", knobs.orphan_age.as_millis()),
        ),
        (
            "SVC_MESSAGING__UPLOADS__ORPHAN_SWEEP_INTERVAL",
            "1s".to_owned(),
        ),
        // The harness reads the "serving" line (info); the rest is quiet unless
        // SVC_CHAOS_REPLICA_LOG asks for more (e.g. `fred=debug` to follow the Redis client).
        (
            "SVC_MESSAGING__LOG__LEVEL",
            match std::env::var("SVC_CHAOS_REPLICA_LOG") {
                Ok(extra) if !extra.is_empty() => format!("warn,svc_messaging::app=info,{extra}"),
                _ => "warn,svc_messaging::app=info".to_owned(),
            },
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy that can black-hole its traffic (a partition without privileges).

struct Proxy {
    port: u16,
    blocked: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (blocked, watch_blocked) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let blocked = watch_blocked.clone();
                tokio::spawn(async move {
                    wait_open(&blocked).await;
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, blocked.clone()) => {}
                        () = pump(server_read, client_write, blocked) => {}
                    }
                });
            }
        });
        Self {
            port,
            blocked,
            task,
        }
    }

    fn cut(&self) {
        self.blocked.send_replace(true);
    }

    fn heal(&self) {
        self.blocked.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_open(blocked: &watch::Receiver<bool>) {
    let mut blocked = blocked.clone();
    let _ = blocked.wait_for(|blocked| !*blocked).await;
}

/// Copies bytes one way; while blocked, holds them (neither reads nor writes).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blocked: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        wait_open(&blocked).await;
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        wait_open(&blocked).await;
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis and Garage, as scripts/chaos started them.

fn redis_cli(port: &str, password: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", password)
        .args(["-h", "127.0.0.1", "-p", port, "--raw"])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The PID a Redis server reports (`INFO server`).
fn redis_pid(port: &str, password: &str) -> u32 {
    redis_cli(port, password, &["info", "server"])
        .lines()
        .find_map(|line| line.trim().strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id from the redis on port {port}"))
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGKILLs the standalone Redis and starts it again as scripts/chaos did (AOF, appendfsync
/// always), on the same port and directory; scripts/chaos stops it by its password at the end.
async fn kill_and_restart_redis(down: Duration, killed_at: &mut Instant) {
    let port = required_tool("SVC_TEST_REDIS_PORT");
    let password = required_tool("SVC_TEST_REDIS_PASSWORD");
    let pid = redis_pid(&port, &password);
    let dir = redis_cli(&port, &password, &["config", "get", "dir"])
        .lines()
        .nth(1)
        .expect("redis dir")
        .trim()
        .to_owned();
    signal(pid, "KILL");
    *killed_at = Instant::now();
    tokio::time::sleep(down).await;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(std::path::Path::new(&dir).join("redis-restarted.log"))
        .unwrap();
    let redis = std::process::Command::new(required_tool("SVC_TEST_REDIS_SERVER_BIN"))
        .args(["--bind", "127.0.0.1", "--port", &port, "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .args([
            "--requirepass",
            &password,
            "--dir",
            &dir,
            "--daemonize",
            "no",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("restart redis");
    // It outlives the scenario (scripts/chaos shuts it down); reap it whenever it exits.
    std::thread::spawn(move || {
        let mut redis = redis;
        let _ = redis.wait();
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_cli(&port, &password, &["ping"]).trim() != "PONG" {
        assert!(Instant::now() < deadline, "redis did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster's URL, password and node ports (scripts/chaos: 3 masters with a replica each).
fn cluster() -> (String, String, Vec<String>) {
    let url = required_tool("SVC_TEST_REDIS_CLUSTER_URL");
    let parsed = url::Url::parse(&url).unwrap();
    let password = percent_encoding::percent_decode_str(parsed.password().unwrap())
        .decode_utf8_lossy()
        .into_owned();
    let ports = required_tool("SVC_CHAOS_CLUSTER_PORTS")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    (url, password, ports)
}

/// SIGKILLs a master of the cluster whose replica is in sync, the one the replicas were seeded
/// with (`redis.url` names the first node, a master) when it qualifies; returns its port. A
/// replica that has not completed its initial sync is never promoted, so killing its master
/// would take a third of the slots down for good instead of testing a failover.
async fn kill_a_cluster_master() -> String {
    let (_, password, ports) = cluster();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for port in &ports {
            let replication = redis_cli(port, &password, &["info", "replication"]);
            let is_master = replication.lines().any(|line| line.trim() == "role:master");
            let replica_in_sync = replication
                .lines()
                .any(|line| line.starts_with("slave") && line.contains("state=online"));
            if is_master && replica_in_sync {
                // Replication is asynchronous: under load the replica trails its master by the
                // last few writes, and a write the master acknowledged just before dying is
                // lost with it (Redis does not promise otherwise; RELIABILITY.md). Writes are
                // held until the replica has every acknowledged one, so the scenario tests the
                // service through a failover rather than that race. A write held here fails
                // with the connection and is retried like any other.
                redis_cli(port, &password, &["client", "pause", "5000", "write"]);
                let synced_by = Instant::now() + Duration::from_secs(3);
                while !replica_has_everything(&redis_cli(port, &password, &["info", "replication"]))
                    && Instant::now() < synced_by
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                signal(redis_pid(port, &password), "KILL");
                return port.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no cluster master with a replica in sync within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `INFO replication` of a master shows a replica at the master's own offset.
fn replica_has_everything(replication: &str) -> bool {
    let field = |line: &str, key: &str| {
        line.split(',')
            .find_map(|pair| pair.strip_prefix(key))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let Some(master) = replication
        .lines()
        .find_map(|line| line.trim().strip_prefix("master_repl_offset:"))
        .and_then(|value| value.parse::<u64>().ok())
    else {
        return false;
    };
    replication
        .lines()
        .filter(|line| line.starts_with("slave"))
        .any(|line| field(line, "offset=").is_some_and(|offset| offset >= master))
}

// ---------------------------------------------------------------------------------------------
// The load and what it observed.

#[derive(Default)]
struct SendLog {
    /// client_message_id -> every message id an acknowledgement carried (retries included).
    acked: BTreeMap<String, Vec<String>>,
    /// (sender, index) order of acknowledgements, with their sequence.
    sequences: Vec<(usize, u64, u64)>,
    failures: BTreeMap<String, u64>,
    retried_then_acked: u64,
    /// (first attempt, ack) of every acknowledged send.
    attempts: Vec<(Instant, Instant)>,
    /// Start and end of successful attempts.
    successes: Vec<(Instant, Instant)>,
}

#[derive(Default)]
struct Delivery {
    /// (sequence, message id, client message id) in delivery order.
    events: Vec<(u64, String, String)>,
    resubscriptions: u64,
    stream_errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct UploadLog {
    succeeded: u64,
    /// From an upload's first attempt to its success.
    longest: Duration,
    attempt_failures: BTreeMap<String, u64>,
    abandoned: u64,
}

struct Load {
    deliveries: Vec<Arc<Mutex<Delivery>>>,
    tasks: Vec<JoinHandle<()>>,
    subscriber_tasks: Vec<JoinHandle<()>>,
}

fn status_label(status: &tonic::Status) -> String {
    let reason = reason(status);
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        // tonic's client channel enforces the call's own grpc-timeout and reports it so.
        "client deadline (tonic: CANCELLED \"Timeout expired\")".to_owned()
    } else if status.code() == tonic::Code::Cancelled {
        format!("Cancelled \"{}\"", status.message())
    } else if reason.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}/{reason}", status.code())
    }
}

/// The next replica of `preference` after `current`.
fn next_of(preference: &[&'static str], current: usize) -> usize {
    (current + 1) % preference.len()
}

async fn sender(
    index: usize,
    conversation_id: String,
    directory: Directory,
    preference: Vec<&'static str>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<SendLog>>,
) {
    let user = format!("s{index}");
    let mut current = 0;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let client_message_id = format!("{user}-{n}");
        let first_attempt = Instant::now();
        let mut failed_before = false;
        loop {
            let mut client = pb::messaging_service_client::MessagingServiceClient::new(
                directory.get(preference[current]),
            );
            let mut request = as_user(
                &user,
                text_request(&conversation_id, &client_message_id, &client_message_id),
            );
            request.set_timeout(SEND_DEADLINE);
            let started = Instant::now();
            let answer = tokio::time::timeout(
                SEND_DEADLINE + Duration::from_secs(1),
                client.send_message(request),
            )
            .await;
            match answer {
                Ok(Ok(response)) => {
                    let message = response.into_inner().message.unwrap();
                    let mut log = log.lock().unwrap();
                    let now = Instant::now();
                    log.acked
                        .entry(client_message_id.clone())
                        .or_default()
                        .push(message.message_id);
                    log.sequences.push((index, n, message.sequence));
                    log.attempts.push((first_attempt, now));
                    log.successes.push((started, now));
                    if failed_before {
                        log.retried_then_acked += 1;
                    }
                    break;
                }
                Ok(Err(status)) => {
                    *log.lock()
                        .unwrap()
                        .failures
                        .entry(status_label(&status))
                        .or_default() += 1;
                }
                Err(_) => {
                    *log.lock()
                        .unwrap()
                        .failures
                        .entry("client timeout".to_owned())
                        .or_default() += 1;
                }
            }
            failed_before = true;
            current = next_of(&preference, current);
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
        tokio::time::sleep(SEND_PACE).await;
    }
}

async fn subscriber(
    index: usize,
    conversation_id: String,
    directory: Directory,
    preference: Vec<&'static str>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Delivery>>,
) {
    let user = format!("r{index}");
    let mut current = 0;
    let mut last = 0u64;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if !first {
            log.lock().unwrap().resubscriptions += 1;
        }
        first = false;
        let mut client = pb::messaging_service_client::MessagingServiceClient::new(
            directory.get(preference[current]),
        );
        let request = as_user(
            &user,
            pb::SubscribeMessagesRequest {
                conversation_id: conversation_id.clone(),
                after_sequence: last,
            },
        );
        let stream =
            tokio::time::timeout(Duration::from_secs(2), client.subscribe_messages(request)).await;
        let mut stream = match stream {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                *log.lock()
                    .unwrap()
                    .stream_errors
                    .entry(status_label(&status))
                    .or_default() += 1;
                current = next_of(&preference, current);
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
            Err(_) => {
                *log.lock()
                    .unwrap()
                    .stream_errors
                    .entry("client timeout".to_owned())
                    .or_default() += 1;
                current = next_of(&preference, current);
                continue;
            }
        };
        loop {
            // A stream silent for 3 s while messages are sent is presumed dead (a replica cut
            // from Redis may never end it): resubscribe elsewhere, as a client with a liveness
            // check would.
            let next = tokio::time::timeout(Duration::from_secs(3), stream.message()).await;
            match next {
                Ok(Ok(Some(response))) => {
                    let Some(event) = response.event else {
                        continue;
                    };
                    if let Some(Event::MessageCreated(created)) = event.event {
                        let message = created.message.unwrap();
                        log.lock().unwrap().events.push((
                            event.sequence,
                            message.message_id,
                            message.client_message_id,
                        ));
                    }
                    last = last.max(event.sequence);
                }
                Ok(Ok(None)) => {
                    *log.lock()
                        .unwrap()
                        .stream_errors
                        .entry("ended".to_owned())
                        .or_default() += 1;
                    break;
                }
                Ok(Err(status)) => {
                    *log.lock()
                        .unwrap()
                        .stream_errors
                        .entry(status_label(&status))
                        .or_default() += 1;
                    current = next_of(&preference, current);
                    break;
                }
                Err(_) => {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    *log.lock()
                        .unwrap()
                        .stream_errors
                        .entry("silent 3 s".to_owned())
                        .or_default() += 1;
                    current = next_of(&preference, current);
                    break;
                }
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// Uploads `UPLOAD_BYTES` PDFs one after another (resumable ones, with a `request_id`, or
/// one-shot ones), each chunk paced so that a fault finds uploads mid-stream.
async fn uploader(
    index: usize,
    resumable: bool,
    conversation_id: String,
    directory: Directory,
    preference: Vec<&'static str>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<UploadLog>>,
) {
    let user = format!("s{index}");
    let body = Bytes::from(pdf(UPLOAD_BYTES));
    let mut current = 0;
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let request_id = if resumable {
            format!("chaos-{user}-{n}-{}", uuid::Uuid::now_v7().simple())
        } else {
            String::new()
        };
        let mut attempts = 0;
        let first_attempt = Instant::now();
        loop {
            attempts += 1;
            let mut files = Files::new(directory.get(preference[current]));
            let mut meta = metadata(
                &conversation_id,
                "chaos.pdf",
                "application/pdf",
                &body,
                false,
            );
            meta.request_id = request_id.clone();
            let mut messages = vec![pb::UploadFileRequest {
                payload: Some(Payload::Metadata(meta)),
            }];
            messages.extend(
                (0..body.len())
                    .step_by(MIB)
                    .map(|start| pb::UploadFileRequest {
                        payload: Some(Payload::Chunk(
                            body.slice(start..(start + MIB).min(body.len())),
                        )),
                    }),
            );
            let paced =
                futures::StreamExt::then(futures::stream::iter(messages), |message| async {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    message
                });
            let answer = tokio::time::timeout(
                Duration::from_secs(30),
                files.upload_file(as_user(&user, Box::pin(paced))),
            )
            .await;
            let failure = match answer {
                Ok(Ok(_)) => {
                    let mut log = log.lock().unwrap();
                    log.succeeded += 1;
                    log.longest = log.longest.max(first_attempt.elapsed());
                    break;
                }
                Ok(Err(status)) => status_label(&status),
                Err(_) => "client timeout".to_owned(),
            };
            *log.lock()
                .unwrap()
                .attempt_failures
                .entry(failure.clone())
                .or_default() += 1;
            if attempts >= 10 || (stop.load(Ordering::Relaxed) && !resumable) {
                log.lock().unwrap().abandoned += 1;
                break;
            }
            // The lease of a killed writer runs out within the idle timeout; meanwhile the
            // answer is UPLOAD_IN_PROGRESS: same replica or another, wait and retry.
            if !failure.contains("UPLOAD_IN_PROGRESS") {
                current = next_of(&preference, current);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

async fn health_poller(
    directory: Directory,
    names: Vec<&'static str>,
    stop: Arc<AtomicBool>,
    not_serving_ms: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) {
    const EVERY: Duration = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        for name in &names {
            let mut health = HealthClient::new(directory.get(name));
            let answer = tokio::time::timeout(
                Duration::from_millis(150),
                health.check(HealthCheckRequest {
                    service: String::new(),
                }),
            )
            .await;
            if let Ok(Ok(response)) = answer
                && response.into_inner().status() == ServingStatus::NotServing
            {
                *not_serving_ms.lock().unwrap().entry(name).or_default() +=
                    EVERY.as_millis() as u64;
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------------
// One scenario.

#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
    violations: Vec<String>,
}

impl Report {
    fn row(&mut self, metric: &str, value: impl ToString) {
        self.rows.push((metric.to_owned(), value.to_string()));
    }

    /// A delivery guarantee: must be 0.
    fn guarantee(&mut self, scenario: Scenario, metric: &str, value: usize) {
        self.row(metric, value);
        if value != 0 {
            self.violations
                .push(format!("{}: {metric} = {value}", scenario.name()));
        }
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_owned();
    }
    map.iter()
        .map(|(label, count)| format!("{label} ×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

async fn run_scenario(scenario: Scenario, knobs: &Knobs) -> Report {
    let key_prefix = unique_prefix(&format!("chaos-{}", scenario.name()));
    let directory = Directory::default();
    let clustered = scenario == Scenario::ClusterFailover;
    // Replicas A and B reach the standalone Redis through proxies (the partition cuts them).
    let redis_port: u16 = required_tool("SVC_TEST_REDIS_PORT").parse().unwrap();
    let proxies = [
        Proxy::start(redis_port).await,
        Proxy::start(redis_port).await,
    ];
    let redis_url = |port: u16| {
        required_tool("SVC_TEST_REDIS_URL")
            .replace(&format!(":{redis_port}/"), &format!(":{port}/"))
    };
    let urls = if clustered {
        let (url, _, _) = cluster();
        [url.clone(), url.clone(), url]
    } else {
        [
            redis_url(proxies[0].port),
            redis_url(proxies[1].port),
            redis_url(redis_port),
        ]
    };
    let names = ["A", "B", "C"];
    let mut replicas = Vec::new();
    for (name, url) in names.iter().zip(&urls) {
        replicas.push(Replica::spawn(name, replica_env(url, &key_prefix, knobs), &directory).await);
    }

    let mut conversations = Vec::new();
    {
        let mut messaging = Messaging::new(directory.get("C"));
        for i in 0..CONVERSATIONS {
            let others = [format!("r{i}")];
            let others: Vec<&str> = others.iter().map(String::as_str).collect();
            conversations
                .push(create_conversation(&mut messaging, &format!("s{i}"), &others).await);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let subscribers_stop = Arc::new(AtomicBool::new(false));
    let sends = Arc::new(Mutex::new(SendLog::default()));
    let uploads = Arc::new(Mutex::new(UploadLog::default()));
    let not_serving = Arc::new(Mutex::new(BTreeMap::new()));
    let mut load = Load {
        deliveries: Vec::new(),
        tasks: Vec::new(),
        subscriber_tasks: Vec::new(),
    };
    for (i, conversation_id) in conversations.iter().enumerate() {
        let delivery = Arc::new(Mutex::new(Delivery::default()));
        load.deliveries.push(delivery.clone());
        load.subscriber_tasks.push(tokio::spawn(subscriber(
            i,
            conversation_id.clone(),
            directory.clone(),
            vec!["B", "C"],
            subscribers_stop.clone(),
            delivery,
        )));
    }
    for (i, conversation_id) in conversations.iter().enumerate() {
        load.tasks.push(tokio::spawn(sender(
            i,
            conversation_id.clone(),
            directory.clone(),
            vec!["A", "C"],
            stop.clone(),
            sends.clone(),
        )));
    }
    if scenario.uploads() {
        for (i, conversation_id) in conversations.iter().take(2).enumerate() {
            load.tasks.push(tokio::spawn(uploader(
                i,
                i == 1,
                conversation_id.clone(),
                directory.clone(),
                vec!["C", "A"],
                stop.clone(),
                uploads.clone(),
            )));
        }
    }
    let health_stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(health_poller(
        directory.clone(),
        names.to_vec(),
        health_stop.clone(),
        not_serving.clone(),
    ));

    // The fault, a third of the way in.
    let started = Instant::now();
    tokio::time::sleep(knobs.load / 3).await;
    // Set again once the fault is in place (the injection itself takes a moment).
    let mut fault_at = Instant::now();
    let mut notes = Vec::new();
    match scenario {
        Scenario::RedisPause => {
            redis_cli(
                &required_tool("SVC_TEST_REDIS_PORT"),
                &required_tool("SVC_TEST_REDIS_PASSWORD"),
                &[
                    "client",
                    "pause",
                    &knobs.fault.as_millis().to_string(),
                    "all",
                ],
            );
            // `redis-cli` returns once the pause is in force: a send started before it
            // answered may still have got through, and must not count as the recovery.
            fault_at = Instant::now();
            tokio::time::sleep(knobs.fault).await;
        }
        Scenario::RedisRestart => {
            kill_and_restart_redis(Duration::from_secs(1), &mut fault_at).await;
        }
        Scenario::ClusterFailover => {
            let port = kill_a_cluster_master().await;
            fault_at = Instant::now();
            notes.push(format!("killed the master on port {port}"));
        }
        Scenario::KillSubscribersReplica
        | Scenario::KillSendersReplica
        | Scenario::KillMidUpload => {
            let victim = match scenario {
                Scenario::KillSubscribersReplica => 1,
                Scenario::KillSendersReplica => 0,
                _ => 2,
            };
            if scenario == Scenario::KillMidUpload {
                // Kill only once both kinds of upload have bytes in flight on C.
                let s3 = s3_store(&test_s3_settings());
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let one_shot = s3
                        .open_multipart_uploads(&format!("files/{}/", conversations[0]))
                        .await
                        .unwrap()
                        .len();
                    let resumable = s3
                        .open_multipart_uploads(&format!("files/{}/", conversations[1]))
                        .await
                        .unwrap()
                        .len();
                    if (one_shot > 0 && resumable > 0) || Instant::now() > deadline {
                        notes.push(format!(
                            "multipart uploads open at the kill: {one_shot} one-shot, \
                             {resumable} resumable"
                        ));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            replicas[victim].kill();
            fault_at = Instant::now();
            tokio::time::sleep(Duration::from_secs(1)).await;
            replicas[victim].start(&directory).await;
            if scenario == Scenario::KillMidUpload {
                let s3 = s3_store(&test_s3_settings());
                let mut open = 0;
                for conversation_id in &conversations[..2] {
                    open += s3
                        .open_multipart_uploads(&format!("files/{conversation_id}/"))
                        .await
                        .unwrap()
                        .len();
                }
                notes.push(format!(
                    "{open} multipart uploads open 1 s after the kill (the killed one-shot's \
                     until the janitor's threshold; the resumable one's until it completes)"
                ));
            }
        }
        Scenario::S3Stall => {
            let garage = required_tool("SVC_TEST_GARAGE_PID").parse().unwrap();
            signal(garage, "STOP");
            fault_at = Instant::now();
            tokio::time::sleep(knobs.fault).await;
            signal(garage, "CONT");
        }
        Scenario::Partition => {
            for proxy in &proxies {
                proxy.cut();
            }
            fault_at = Instant::now();
            tokio::time::sleep(knobs.fault).await;
            for proxy in &proxies {
                proxy.heal();
            }
        }
    }
    let remaining = knobs.load.saturating_sub(started.elapsed());
    tokio::time::sleep(remaining.max(Duration::from_secs(2))).await;

    // Stop sending, let in-flight retries finish and subscribers catch up.
    stop.store(true, Ordering::Relaxed);
    for task in load.tasks.drain(..) {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    let expected: Vec<u64> = {
        let log = sends.lock().unwrap();
        (0..CONVERSATIONS)
            .map(|i| {
                log.sequences
                    .iter()
                    .filter(|(sender, _, _)| *sender == i)
                    .map(|(_, _, sequence)| *sequence)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    };
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < drain_deadline {
        let caught_up = load
            .deliveries
            .iter()
            .zip(&expected)
            .all(|(delivery, max)| {
                delivery
                    .lock()
                    .unwrap()
                    .events
                    .iter()
                    .map(|e| e.0)
                    .max()
                    .unwrap_or(0)
                    >= *max
            });
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    subscribers_stop.store(true, Ordering::Relaxed);
    for task in load.subscriber_tasks.drain(..) {
        task.abort();
    }
    health_stop.store(true, Ordering::Relaxed);
    let _ = poller.await;

    // Audit.
    let mut report = Report::default();
    for note in notes {
        report.row("fault", note);
    }
    let log = std::mem::take(&mut *sends.lock().unwrap());
    let mut messaging = Messaging::new(directory.get("C"));
    let mut history: Vec<pb::Message> = Vec::new();
    let mut history_gaps = 0;
    for (i, conversation_id) in conversations.iter().enumerate() {
        let mut page_token = String::new();
        let mut messages = Vec::new();
        loop {
            // The audit reads like any caller: UNAVAILABLE (a store still settling after the
            // fault, e.g. a cluster client picking up a new master) is retried.
            let mut attempts = 0;
            let page = loop {
                match messaging
                    .list_messages(as_user(
                        &format!("s{i}"),
                        pb::ListMessagesRequest {
                            conversation_id: conversation_id.clone(),
                            page_size: 100,
                            page_token: page_token.clone(),
                        },
                    ))
                    .await
                {
                    Ok(page) => break page.into_inner(),
                    Err(status) if status.code() == tonic::Code::Unavailable && attempts < 40 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(status) => panic!("list messages: {status:?}"),
                }
            };
            messages.extend(page.messages);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let mut sequences: Vec<u64> = messages.iter().map(|m| m.sequence).collect();
        sequences.sort_unstable();
        history_gaps += sequences
            .windows(2)
            .filter(|pair| pair[1] != pair[0] + 1)
            .count();
        history.extend(messages);
    }
    let mut history_ids: HashMap<&str, Vec<&str>> = HashMap::new();
    for message in &history {
        if !message.client_message_id.is_empty() {
            history_ids
                .entry(message.client_message_id.as_str())
                .or_default()
                .push(message.message_id.as_str());
        }
    }
    let delivered: HashSet<String> = load
        .deliveries
        .iter()
        .flat_map(|delivery| {
            delivery
                .lock()
                .unwrap()
                .events
                .iter()
                .map(|event| event.1.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let acked = log.acked.len();
    let lost = log
        .acked
        .iter()
        .filter(|(client_id, ids)| {
            let id = &ids[0];
            !history_ids
                .get(client_id.as_str())
                .is_some_and(|found| found.contains(&id.as_str()))
                || !delivered.contains(id)
        })
        .count();
    let duplicated_acks = log
        .acked
        .values()
        .filter(|ids| ids.iter().collect::<HashSet<_>>().len() > 1)
        .count();
    let duplicated_history = history_ids.values().filter(|ids| ids.len() > 1).count();
    let mut duplicated_deliveries = 0;
    let mut reordered = 0;
    let mut stream_gaps = 0;
    let mut resubscriptions = 0;
    let mut stream_errors = BTreeMap::new();
    for delivery in &load.deliveries {
        let delivery = delivery.lock().unwrap();
        resubscriptions += delivery.resubscriptions;
        for (label, count) in &delivery.stream_errors {
            *stream_errors.entry(label.clone()).or_insert(0) += count;
        }
        let mut seen = HashSet::new();
        let mut previous = None;
        for (sequence, message_id, _) in &delivery.events {
            if !seen.insert(message_id.clone()) {
                duplicated_deliveries += 1;
            }
            if let Some(previous) = previous {
                if *sequence <= previous {
                    reordered += 1;
                } else if *sequence != previous + 1 {
                    stream_gaps += 1;
                }
            }
            previous = Some(*sequence);
        }
    }
    // Each sender's acknowledged messages carry increasing sequences.
    let mut sender_reordered = 0;
    for i in 0..CONVERSATIONS {
        let mut mine: Vec<(u64, u64)> = log
            .sequences
            .iter()
            .filter(|(sender, _, _)| *sender == i)
            .map(|(_, n, sequence)| (*n, *sequence))
            .collect();
        mine.sort_unstable();
        sender_reordered += mine
            .windows(2)
            .filter(|pair| pair[1].1 <= pair[0].1)
            .count();
    }
    let recovery = log
        .successes
        .iter()
        .filter(|(started, _)| *started >= fault_at)
        .map(|(_, done)| done.duration_since(fault_at))
        .min();
    let mut acks: Vec<Instant> = log
        .successes
        .iter()
        .map(|(_, done)| *done)
        .filter(|done| *done + Duration::from_secs(1) >= fault_at)
        .collect();
    acks.sort_unstable();
    let longest_silence = acks
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    let longest_wait = log
        .attempts
        .iter()
        .map(|(first, acked)| acked.duration_since(*first))
        .max()
        .unwrap_or_default();

    report.row("sends acknowledged", acked);
    report.row("send attempts failed (retried)", counts(&log.failures));
    report.row("sends acknowledged after a retry", log.retried_then_acked);
    report.guarantee(
        scenario,
        "lost (acked, not in history or not delivered)",
        lost,
    );
    report.guarantee(
        scenario,
        "duplicated (one client_message_id, two message ids; or delivered twice)",
        duplicated_acks + duplicated_history + duplicated_deliveries,
    );
    report.guarantee(
        scenario,
        "reordered (streams; a sender's sends)",
        reordered + sender_reordered,
    );
    report.guarantee(scenario, "sequence gaps on streams", stream_gaps);
    report.guarantee(scenario, "sequence gaps in history", history_gaps);
    report.row(
        "fault → first successful send (started after the fault)",
        recovery.map_or("none".to_owned(), secs),
    );
    report.row("longest wait for an acknowledgement", secs(longest_wait));
    report.row(
        "longest stretch without any acknowledgement",
        secs(longest_silence),
    );
    report.row("resubscriptions", resubscriptions);
    report.row("stream ends seen by subscribers", counts(&stream_errors));
    let not_serving = not_serving.lock().unwrap().clone();
    report.row(
        "NOT_SERVING per replica",
        names
            .iter()
            .map(|name| {
                format!(
                    "{name} {:.1} s",
                    *not_serving.get(name).unwrap_or(&0) as f64 / 1000.0
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    drop(log);

    if scenario.uploads() {
        let uploads = std::mem::take(&mut *uploads.lock().unwrap());
        report.row("uploads succeeded", uploads.succeeded);
        report.row(
            "upload attempts failed (retried)",
            counts(&uploads.attempt_failures),
        );
        report.row("uploads given up", uploads.abandoned);
        report.row(
            "longest upload (first attempt to success)",
            secs(uploads.longest),
        );
    }
    if !clustered {
        audit_bucket(
            scenario,
            &key_prefix,
            &conversations,
            knobs,
            fault_at,
            &mut report,
        )
        .await;
    }
    for replica in &mut replicas {
        replica.kill();
    }
    drop(proxies);
    report
}

/// Objects, open multipart uploads, records without objects and objects without records of the
/// scenario's conversations: at the end of the load, and once the janitor's threshold passed.
async fn audit_bucket(
    scenario: Scenario,
    key_prefix: &str,
    conversations: &[String],
    knobs: &Knobs,
    fault_at: Instant,
    report: &mut Report,
) {
    let s3 = s3_store(&test_s3_settings());
    let orphans = async || {
        let mut open = 0;
        let mut objects = Vec::new();
        for conversation_id in conversations {
            for area in ["files", "thumbs"] {
                let prefix = format!("{area}/{conversation_id}/");
                open += s3.open_multipart_uploads(&prefix).await.unwrap().len();
                objects.extend(s3.list(&prefix).await.unwrap());
            }
        }
        let records = file_records(key_prefix);
        let objects_without_records = objects
            .iter()
            .filter(|key| !records.iter().any(|id| key.ends_with(&format!("/{id}"))))
            .count();
        let mut records_without_objects = 0;
        for id in &records {
            let found = objects.iter().any(|key| key.ends_with(&format!("/{id}")));
            if !found {
                records_without_objects += 1;
            }
        }
        (
            objects.len(),
            open,
            objects_without_records,
            records_without_objects,
        )
    };
    let at_end = orphans().await;
    report.row(
        "bucket at the end: objects / open multipart uploads / objects without records / records without objects",
        format!("{} / {} / {} / {}", at_end.0, at_end.1, at_end.2, at_end.3),
    );
    if at_end.1 + at_end.2 + at_end.3 == 0 {
        report.guarantee(scenario, "orphans after the janitor's threshold", 0);
        return;
    }
    let waited = Instant::now();
    // Capped, so that a run with the janitor effectively off fails in a minute.
    let deadline = waited + knobs.orphan_age.min(Duration::from_secs(60)) + Duration::from_secs(10);
    let mut last = at_end;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = orphans().await;
        if last.1 + last.2 + last.3 == 0 {
            break;
        }
    }
    report.row(
        "orphans gone (janitor threshold + sweep), after the fault",
        if last.1 + last.2 + last.3 == 0 {
            secs(fault_at.elapsed())
        } else {
            "not within the threshold + 10 s".to_owned()
        },
    );
    report.guarantee(
        scenario,
        "orphans after the janitor's threshold",
        last.1 + last.2 + last.3,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by scripts/chaos, which starts the servers it needs"]
async fn suite() {
    let knobs = Knobs::from_env();
    let mut markdown = String::new();
    let mut violations = Vec::new();
    for scenario in &knobs.scenarios {
        eprintln!("==> chaos: {} ...", scenario.name());
        let started = Instant::now();
        let report = run_scenario(*scenario, &knobs).await;
        let mut section = String::new();
        let _ = writeln!(
            section,
            "\n### {}\n\nFault: {}. Load {} (fault after a third), scenario took {}.\n\n| metric | value |\n|---|---|",
            scenario.name(),
            scenario.describe(knobs.fault),
            secs(knobs.load),
            secs(started.elapsed()),
        );
        for (metric, value) in &report.rows {
            let _ = writeln!(section, "| {metric} | {value} |");
        }
        println!("{section}");
        markdown.push_str(&section);
        violations.extend(report.violations);
    }
    if let Ok(path) = std::env::var("SVC_CHAOS_REPORT") {
        std::fs::write(path, &markdown).expect("write the report");
    }
    assert!(
        violations.is_empty(),
        "delivery guarantees broken:\n{}",
        violations.join("\n")
    );
}
