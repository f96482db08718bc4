//! Shared bench helpers: the in-process service, clients, the environment `scripts/bench`
//! prepares (the same `SVC_TEST_*` variables as the tests), and small statistics.
#![allow(dead_code)]

// Shared with the tests: the SVC_TEST_* servers, the caller header, readiness.
#[path = "../../tests/it/support/env.rs"]
mod env;
pub use env::{
    as_user, required_tool as required_env, test_s3_settings as s3_settings, wait_ready,
};

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use svc_messaging::{
    app::{App, StartupError},
    config::{BlobBackend, MessageBackend, Settings},
    grpc::pb::{CreateConversationRequest, messaging_service_client::MessagingServiceClient},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// `cargo bench` passes `--bench` to a `harness = false` target; `cargo test --benches` (or
/// `--all-targets`) runs the same binary without it. Returns false (after saying so) in the
/// latter case, so a benchmark never runs as a test.
pub fn invoked_by_cargo_bench(name: &str) -> bool {
    if std::env::args().any(|arg| arg == "--bench") {
        return true;
    }
    println!("{name}: benchmark skipped (not run by `cargo bench`; use scripts/bench {name})");
    false
}

/// An optional numeric knob (e.g. `SVC_BENCH_ROUNDS`), with a default.
pub fn knob<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A key prefix no other run uses.
pub fn unique_prefix(bench: &str) -> String {
    format!("bench-{bench}-{}", uuid::Uuid::now_v7().simple())
}

/// Settings of an in-process service: port 0, Redis messages under `key_prefix`, blobs on the
/// filesystem under `data_dir` (switch to S3 with [`use_s3`]).
pub fn redis_settings(key_prefix: &str, data_dir: &std::path::Path) -> Settings {
    let mut settings = Settings::default();
    settings.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    settings.server.http_addr = "127.0.0.1:0".parse().unwrap();
    settings.server.shutdown_grace = Duration::from_secs(1);
    settings.storage.data_dir = data_dir.join("blobs");
    settings.storage.messages = MessageBackend::Redis;
    settings.redis.url = Some(secrecy::SecretString::from(required_env(
        "SVC_TEST_REDIS_URL",
    )));
    settings.redis.key_prefix = key_prefix.to_owned();
    settings
}

pub fn use_s3(settings: &mut Settings) {
    settings.storage.blobs = BlobBackend::S3;
    settings.s3 = s3_settings();
}

/// The service running inside the bench process (as `tests/it/support` TestServer does).
pub struct Server {
    pub grpc_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartupError>>>,
    _data_dir: tempfile::TempDir,
}

impl Server {
    /// Runs the service on port 0 with [`redis_settings`] under `key_prefix` (then
    /// `customize`), and waits until it is ready.
    pub async fn start(key_prefix: &str, customize: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = redis_settings(key_prefix, data_dir.path());
        customize(&mut settings);
        settings.validate().expect("bench settings are valid");
        let app = App::bind(settings).await.expect("bind");
        let grpc_addr = app.grpc_addr();
        let http_addr = app.http_addr();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = shutdown_rx.await;
        }));
        wait_ready(http_addr).await;
        Self {
            grpc_addr,
            shutdown: Some(shutdown),
            task: Some(task),
            _data_dir: data_dir,
        }
    }

    pub async fn channel(&self) -> Channel {
        connect(self.grpc_addr).await
    }

    /// Shuts the service down and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
}

pub async fn connect(addr: SocketAddr) -> Channel {
    endpoint(addr)
        .connect()
        .await
        .expect("connect to the service")
}

/// Creates a conversation of `creator` with `others`; returns its id.
pub async fn create_conversation(channel: &Channel, creator: &str, others: &[&str]) -> String {
    let mut client = MessagingServiceClient::new(channel.clone());
    let response = client
        .create_conversation(as_user(
            creator,
            CreateConversationRequest {
                title: "bench".to_owned(),
                participant_ids: others.iter().map(|user| (*user).to_owned()).collect(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create a conversation");
    response.into_inner().conversation.unwrap().conversation_id
}

/// Runs a command with `input` on its stdin, returning its stdout; panics if it fails.
pub fn run_with_stdin(mut command: Command, input: &str) -> String {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ------------------------------------------------------------------------------ statistics ---

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// (max - min) / median, in percent: how far apart the repeats were.
pub fn spread_percent(values: &[f64]) -> f64 {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (max - min) / median(values) * 100.0
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time counters from `/proc/stat`, to tell how busy (and how stolen) the machine was.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    busy: u64,
    steal: u64,
    total: u64,
}

impl CpuSample {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        let get = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let idle = get(3) + get(4);
        let steal = get(7);
        let total: u64 = fields.iter().take(8).sum();
        Self {
            busy: total - idle - steal,
            steal,
            total,
        }
    }

    /// "busy X% steal Y%" of all cores since `earlier`.
    pub fn since(&self, earlier: &CpuSample) -> String {
        let total = (self.total - earlier.total).max(1) as f64;
        format!(
            "cpu busy {:.0}%, steal {:.1}% (all cores)",
            (self.busy - earlier.busy) as f64 / total * 100.0,
            (self.steal - earlier.steal) as f64 / total * 100.0
        )
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints a plain-text table (also valid Markdown).
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|row| row[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.iter().map(|cell| (*cell).to_owned()).collect());
    line(widths.iter().map(|width| "-".repeat(*width)).collect());
    for row in rows {
        line(row.clone());
    }
}

// ------------------------------------------------------------------------------------ redis ---

/// `redis-cli` against the Redis `scripts/bench` started (password through `REDISCLI_AUTH`).
pub struct RedisCli {
    pub cli: String,
    pub host: String,
    pub port: String,
    pub password: String,
}

impl RedisCli {
    /// Another Redis on loopback (a cluster node) through the same `redis-cli`.
    pub fn at(port: &str, password: &str) -> Self {
        Self {
            cli: required_env("SVC_TEST_REDIS_CLI"),
            host: "127.0.0.1".to_owned(),
            port: port.to_owned(),
            password: password.to_owned(),
        }
    }

    /// The server's CPU seconds so far (user + sys, `INFO cpu`).
    pub async fn cpu_seconds(&self) -> f64 {
        self.call(&["INFO", "cpu"], None)
            .await
            .lines()
            .filter_map(|line| {
                let (name, value) = line.trim().split_once(':')?;
                matches!(name, "used_cpu_sys" | "used_cpu_user")
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    pub fn from_env() -> Self {
        Self {
            cli: required_env("SVC_TEST_REDIS_CLI"),
            host: required_env("SVC_TEST_REDIS_HOST"),
            port: required_env("SVC_TEST_REDIS_PORT"),
            password: required_env("SVC_TEST_REDIS_PASSWORD"),
        }
    }

    /// Runs one command (`--raw` output); `stdin` feeds `-x` (the last argument from stdin).
    pub async fn call(&self, args: &[&str], stdin: Option<&str>) -> String {
        use tokio::io::AsyncWriteExt;
        let mut command = tokio::process::Command::new(&self.cli);
        command
            .env("REDISCLI_AUTH", &self.password)
            .args(["-h", &self.host, "-p", &self.port, "--raw"])
            .args(stdin.map(|_| "-x"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("run redis-cli");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(input.as_bytes()).await.unwrap();
            drop(pipe);
        }
        let output = child.wait_with_output().await.expect("redis-cli output");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success() && !stdout.starts_with("ERR"),
            "redis-cli {:?} failed: {stdout} {}",
            args.first(),
            String::from_utf8_lossy(&output.stderr)
        );
        stdout.trim_end_matches('\n').to_owned()
    }
}

// ------------------------------------------------------------------------ service process ---

/// The service binary as a child process on the bench's Redis (messages), configured only
/// through SVC_MESSAGING__* variables (`env` adds or overrides some), for measuring its memory.
pub struct ServiceProcess {
    child: std::process::Child,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

impl ServiceProcess {
    pub fn spawn(key_prefix: &str, env: &[(&str, String)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs([
                ("SVC_MESSAGING__SERVER__GRPC_ADDR", "127.0.0.1:0".to_owned()),
                ("SVC_MESSAGING__SERVER__HTTP_ADDR", "127.0.0.1:0".to_owned()),
                ("SVC_MESSAGING__LOG__FORMAT", "json".to_owned()),
                (
                    "SVC_MESSAGING__LOG__LEVEL",
                    "warn,svc_messaging::app=info".to_owned(),
                ),
                ("SVC_MESSAGING__STORAGE__MESSAGES", "redis".to_owned()),
                (
                    "SVC_MESSAGING__REDIS__URL",
                    required_env("SVC_TEST_REDIS_URL"),
                ),
                ("SVC_MESSAGING__REDIS__KEY_PREFIX", key_prefix.to_owned()),
            ])
            .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn svc-messaging");
        let stdout = child.stdout.take().unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                    && json["message"] == "serving"
                {
                    let addr = |field: &str| -> SocketAddr {
                        json[field].as_str().unwrap().parse().unwrap()
                    };
                    let _ = addr_tx.send((addr("grpc_addr"), addr("http_addr")));
                }
            }
        });
        let Ok((grpc_addr, http_addr)) = addr_rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("svc-messaging did not log \"serving\" within 30 s");
        };
        Self {
            child,
            grpc_addr,
            http_addr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }

    /// Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux >= 4.0).
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5").is_ok()
    }

    /// CPU seconds (user + system) the process used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_ticks(&self.child.id().to_string()) as f64 / 100.0
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process' CPU time so far (user + sys), in clock ticks (100 per second on Linux); `pid` may
/// be `self`. 0 if the process is gone.
pub fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields.get(11..13).map_or(0, |times| {
        times.iter().filter_map(|t| t.parse::<u64>().ok()).sum()
    })
}

/// Sends text messages as `sender` into `conversation_id` until `deadline`, one at a time, with
/// client_message_ids `<id_prefix>-<n>`; counts acknowledgements and failures (printing the
/// first failure of the run).
pub async fn send_texts_until(
    mut client: MessagingServiceClient<Channel>,
    sender: &str,
    conversation_id: String,
    id_prefix: String,
    deadline: std::time::Instant,
    sent: &std::sync::atomic::AtomicU64,
    errors: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    use svc_messaging::grpc::pb::{SendMessageRequest, send_message_request::Content};
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        n += 1;
        let request = SendMessageRequest {
            conversation_id: conversation_id.clone(),
            client_message_id: format!("{id_prefix}-{n}"),
            content: Some(Content::Text(format!("hello from the benchmark, #{n}"))),
        };
        match client.send_message(as_user(sender, request)).await {
            Ok(_) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("SendMessage failed: {status}");
                }
            }
        }
    }
}
