//! Shared test helpers: spawn the real service (in-process on port 0, or the binary), and the
//! environment of real servers that `scripts/test` starts.

pub mod cloud;
mod env;
pub mod messages;

pub use env::{as_user, required_tool, test_s3_settings, wait_ready};

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use svc_messaging::{
    app::{App, StartupError},
    config::Settings,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// The service running inside the test process.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), StartupError>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with test-friendly defaults (port 0, a fresh data dir, fast health checks), which
    /// `customize` may change.
    pub async fn start_with(customize: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        settings.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
        settings.server.http_addr = "127.0.0.1:0".parse().unwrap();
        settings.server.health_check_interval = Duration::from_millis(100);
        settings.server.shutdown_grace = Duration::from_secs(1);
        settings.storage.data_dir = data_dir.path().join("blobs");
        customize(&mut settings);
        settings.validate().expect("test settings are valid");
        let app = App::bind(settings).await.expect("bind");
        let grpc_addr = app.grpc_addr();
        let http_addr = app.http_addr();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = shutdown_rx.await;
        }));
        let server = Self {
            grpc_addr,
            http_addr,
            data_dir,
            shutdown: Some(shutdown),
            task: Some(task),
        };
        wait_ready(http_addr).await;
        server
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the test server")
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    /// Asks the server to shut down and returns its run task, to await or time.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), StartupError>> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.take().expect("server still running")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// The `google.rpc.ErrorInfo` reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The `svc-messaging` binary running as a child process, logging JSON lines.
pub struct ServiceProcess {
    pub child: Child,
    pub grpc_addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
}

impl ServiceProcess {
    /// Starts the binary with `env` (on top of port-0 listeners and JSON logs) and waits until it
    /// logs its addresses.
    pub fn spawn(env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_svc-messaging"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SVC_MESSAGING__SERVER__GRPC_ADDR", "127.0.0.1:0")
            .env("SVC_MESSAGING__SERVER__HTTP_ADDR", "127.0.0.1:0")
            .env("SVC_MESSAGING__LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn svc-messaging");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                        && json["message"] == "serving"
                    {
                        let grpc = json["grpc_addr"].as_str().unwrap().parse().unwrap();
                        let _ = addr_tx.send(grpc);
                    }
                    output.lock().unwrap().push(line);
                }
            });
        }
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            });
        }
        let grpc_addr = addr_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "the service did not start; output:\n{}",
                    output.lock().unwrap().join("\n")
                )
            });
        Self {
            child,
            grpc_addr,
            output,
        }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Points `settings` at the real Redis that scripts/test started, under a key prefix of its own
/// so tests can share the server in parallel.
pub fn use_test_redis(settings: &mut Settings, key_prefix: &str) {
    use svc_messaging::config::MessageBackend;
    let url = required_tool("SVC_TEST_REDIS_URL");
    settings.storage.messages = MessageBackend::Redis;
    settings.redis.url = Some(secrecy::SecretString::from(url));
    settings.redis.key_prefix = key_prefix.to_owned();
}

/// A key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{}", uuid::Uuid::now_v7().simple())
}

/// A Redis server of the test's own (for tests that stop and restart it), on a free port.
pub struct PrivateRedis {
    pub port: u16,
    pub password: String,
    /// Whether a restart keeps the data (an append-only file synced on every write).
    persistent: bool,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// A server that keeps its data across restarts, as a real deployment would.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// A server that comes back empty after a restart.
    pub fn start_volatile() -> Self {
        Self::start_with(false)
    }

    fn start_with(persistent: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            password: "private/pa55=word".to_owned(),
            persistent,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        redis
    }

    /// redis://default:<percent-encoded password>@127.0.0.1:<port>/0
    pub fn url(&self) -> String {
        format!(
            "redis://default:private%2Fpa55%3Dword@127.0.0.1:{}/0",
            self.port
        )
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let binary = required_tool("SVC_TEST_REDIS_SERVER_BIN");
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"].as_slice()
            } else {
                ["--appendonly", "no"].as_slice()
            })
            .args(["--requirepass", &self.password])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("private redis did not start on port {}", self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates a conversation as `creator` with `others` and returns its id.
pub async fn create_conversation(
    messaging: &mut svc_messaging::grpc::pb::messaging_service_client::MessagingServiceClient<
        Channel,
    >,
    creator: &str,
    others: &[&str],
) -> String {
    use svc_messaging::grpc::pb;
    messaging
        .create_conversation(as_user(
            creator,
            pb::CreateConversationRequest {
                title: "test".to_owned(),
                participant_ids: others.iter().map(|s| (*s).to_owned()).collect(),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create a conversation")
        .into_inner()
        .conversation
        .expect("a conversation")
        .conversation_id
}

/// A SendMessage request of `text` under `client_message_id`.
pub fn text_request(
    conversation_id: &str,
    client_message_id: &str,
    text: &str,
) -> svc_messaging::grpc::pb::SendMessageRequest {
    use svc_messaging::grpc::pb;
    pb::SendMessageRequest {
        conversation_id: conversation_id.to_owned(),
        client_message_id: client_message_id.to_owned(),
        content: Some(pb::send_message_request::Content::Text(text.to_owned())),
    }
}

/// The first page (up to 100) of a conversation's messages, as `user` sees them.
pub async fn history(
    messaging: &mut svc_messaging::grpc::pb::messaging_service_client::MessagingServiceClient<
        Channel,
    >,
    user: &str,
    conversation_id: &str,
) -> Vec<svc_messaging::grpc::pb::Message> {
    messaging
        .list_messages(as_user(
            user,
            svc_messaging::grpc::pb::ListMessagesRequest {
                conversation_id: conversation_id.to_owned(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Instantiates a conformance suite once per backend: a module per backend, in it one
/// `#[tokio::test]` per listed suite function, named after it, that runs `super::<test>(backend)`.
/// `runtime` gives every test's `tokio::test` arguments (default: the current-thread runtime); a
/// test may give its own after its name.
///
/// ```ignore
/// suite! {
///     backends: memory = super::Backend::Memory, redis = super::Backend::Redis;
///     runtime: (flavor = "multi_thread", worker_threads = 2);
///     tests: [create_is_idempotent, concurrent_sends(flavor = "multi_thread")]
/// }
/// ```
macro_rules! suite {
    (
        backends: $($module:ident = $backend:expr),+ $(,)?;
        tests: $tests:tt $(;)?
    ) => {
        $crate::support::suite! {
            backends: $($module = $backend),+;
            runtime: (flavor = "current_thread");
            tests: $tests
        }
    };
    (
        backends: $($module:ident = $backend:expr),+ $(,)?;
        runtime: $runtime:tt;
        tests: $tests:tt $(;)?
    ) => {
        $(
            mod $module {
                $crate::support::suite!(@tests $backend, $runtime, $tests);
            }
        )+
    };
    (@tests $backend:expr, $runtime:tt, [$($test:ident $(($($own:tt)*))?),+ $(,)?]) => {
        $(
            $crate::support::suite!(@test $backend, $test, $runtime $(($($own)*))?);
        )+
    };
    (@test $backend:expr, $test:ident, $runtime:tt) => {
        #[tokio::test $runtime]
        async fn $test() {
            super::$test($backend).await;
        }
    };
    (@test $backend:expr, $test:ident, $runtime:tt $own:tt) => {
        #[tokio::test $own]
        async fn $test() {
            super::$test($backend).await;
        }
    };
}
pub(crate) use suite;
