//! The binary as operators run it: config validation (exit code 2 and one line naming the key),
//! `check-config`, SIGTERM handling, and secrets kept out of the logs.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::support::{ServiceProcess, as_user};
use futures::StreamExt;
use svc_messaging::grpc::pb::{self, file_relay_service_client::FileRelayServiceClient};
use tonic::Request;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Runs the binary to completion; one that is still running after 15 s (a config that should
/// have been refused started the service) is killed and fails the test.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
        .env_clear()
        .env("SVC_MESSAGING__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("SVC_MESSAGING__SERVER__HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run svc-messaging");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output().expect("wait for svc-messaging");
        let _ = done_tx.send(());
        output
    });
    if done_rx.recv_timeout(Duration::from_secs(15)).is_err() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        let output = waiter.join().unwrap();
        panic!(
            "svc-messaging {args:?} with {env:?} did not exit: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    waiter.join().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_configs_exit_2_with_one_line_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "SVC_MESSAGING__SERVER__GRPC_ADDR",
            "not-an-address",
            "server.grpc_addr",
        ),
        (
            "SVC_MESSAGING__SERVER__HTTP_ADDR",
            "127.0.0.1:99999",
            "server.http_addr",
        ),
        (
            "SVC_MESSAGING__SERVER__SHUTDOWN_GRACE",
            "ten seconds",
            "server.shutdown_grace",
        ),
        (
            "SVC_MESSAGING__SERVER__HEALTH_CHECK_INTERVAL",
            "0s",
            "server.health_check_interval",
        ),
        (
            "SVC_MESSAGING__UPLOADS__MEMORY_BUDGET",
            "lots",
            "uploads.memory_budget",
        ),
        (
            "SVC_MESSAGING__UPLOADS__MEMORY_BUDGET",
            "1MiB",
            "uploads.memory_budget",
        ),
        (
            "SVC_MESSAGING__UPLOADS__MAX_CHUNK_BYTES",
            "64MiB",
            "uploads.max_chunk_bytes",
        ),
        (
            "SVC_MESSAGING__UPLOADS__ORPHAN_AGE",
            "500ms",
            "uploads.orphan_age",
        ),
        (
            "SVC_MESSAGING__UPLOADS__ORPHAN_SWEEP_INTERVAL",
            "10ms",
            "uploads.orphan_sweep_interval",
        ),
        (
            "SVC_MESSAGING__UPLOADS__DOCUMENT_TYPES",
            "application/x-msdownload",
            "uploads.document_types",
        ),
        (
            "SVC_MESSAGING__STORAGE__MESSAGES",
            "postgres",
            "storage.messages",
        ),
        ("SVC_MESSAGING__AUTH__MODE", "jwt", "auth.jwt_secret"),
        ("SVC_MESSAGING__AUTH__JWT_SECRET", "x", "auth.jwt_secret"),
        (
            "SVC_MESSAGING__SERVER__GRPC_PORT",
            "50051",
            "server.grpc_port",
        ),
        (
            "SVC_MESSAGING__REDIS__URL",
            "redis://default:ci/pa55=word@127.0.0.1:6379/0",
            "redis.url",
        ),
        (
            "SVC_MESSAGING__REDIS__URL",
            "redis://default:p@ss@127.0.0.1:6379/0",
            "redis.url",
        ),
        (
            "SVC_MESSAGING__S3__ENDPOINT",
            "ftp://s3.local",
            "s3.endpoint",
        ),
        (
            "SVC_MESSAGING__THUMBNAILS__JPEG_QUALITY",
            "101",
            "thumbnails.jpeg_quality",
        ),
        ("SVC_MESSAGING__LOG__LEVEL", "[[[", "log.level"),
    ];
    for (var, value, key) in cases {
        let env = [(*var, *value)];
        // Start-up itself must refuse: no subcommand, so a valid config would start serving.
        let output = run(&[], &env);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{var}={value}: {}",
            stderr(&output)
        );
        let message = stderr(&output);
        assert_eq!(
            message.trim_end().lines().count(),
            1,
            "{var}={value}: one line, got {message}"
        );
        assert!(
            message.contains(&format!("{key}: ")),
            "{var}={value}: {key} not named in {message}"
        );
        assert!(!message.contains("panicked"), "{message}");
    }
}

#[test]
fn the_redis_password_never_appears_in_its_error() {
    let output = run(
        &["check-config"],
        &[(
            "SVC_MESSAGING__REDIS__URL",
            "redis://default:s3cr3t/pw=x@127.0.0.1:6379/0",
        )],
    );
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("percent-encode"), "{message}");
    assert!(!message.contains("s3cr3t"), "{message}");
}

#[test]
fn bad_config_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\ngrpc_address = \"127.0.0.1:1\"\n").unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[server\n").unwrap();
    let missing = dir.path().join("missing.toml");
    for (path, key) in [
        (&unknown, "server.grpc_address"),
        (&broken, "config"),
        (&missing, "config"),
    ] {
        let output = run(&["--config", path.to_str().unwrap(), "check-config"], &[]);
        assert_eq!(output.status.code(), Some(2), "{}", path.display());
        let message = stderr(&output);
        assert!(message.contains(&format!("{key}: ")), "{message}");
        assert_eq!(message.trim_end().lines().count(), 1, "{message}");
    }
    // The environment variable names the file too.
    let output = run(
        &["check-config"],
        &[("SVC_MESSAGING_CONFIG", unknown.to_str().unwrap())],
    );
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad-port.toml");
    std::fs::write(&file, "[uploads]\nparts_in_flight = 0\n").unwrap();
    let path = file.to_str().unwrap();
    assert_eq!(
        run(&["--config", path, "check-config"], &[]).status.code(),
        Some(2)
    );
    let fixed = run(
        &["--config", path, "check-config"],
        &[("SVC_MESSAGING__UPLOADS__PARTS_IN_FLIGHT", "3")],
    );
    assert_eq!(fixed.status.code(), Some(0), "{}", stderr(&fixed));
}

#[test]
fn shipped_example_configs_are_valid() {
    let examples = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap();
    let mut checked = 0;
    for entry in examples {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            let output = run(
                &["--config", path.to_str().unwrap(), "check-config"],
                // Secrets come from the environment in every example.
                &[
                    (
                        "SVC_MESSAGING__AUTH__JWT_SECRET",
                        "an-example-secret-of-at-least-32-bytes",
                    ),
                    ("SVC_MESSAGING__REDIS__PASSWORD", "example/pa55=word"),
                    (
                        "SVC_MESSAGING__S3__ACCESS_KEY_ID",
                        "GK0123456789abcdef01234567",
                    ),
                    (
                        "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
                        "an-example-s3-secret",
                    ),
                ],
            );
            assert_eq!(
                output.status.code(),
                Some(0),
                "{}: {}",
                path.display(),
                stderr(&output)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected the example configs, found {checked}"
    );
}

#[tokio::test]
async fn sigterm_drains_streams_and_exits_zero() {
    let data = tempfile::tempdir().unwrap();
    let mut service = ServiceProcess::spawn(&[
        ("SVC_MESSAGING__SERVER__SHUTDOWN_GRACE", "1s"),
        ("SVC_MESSAGING__SERVER__HEALTH_CHECK_INTERVAL", "100ms"),
        (
            "SVC_MESSAGING__STORAGE__DATA_DIR",
            data.path().to_str().unwrap(),
        ),
    ]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", service.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut status = watch.next().await.unwrap().unwrap().status;
    if status != ServingStatus::Serving as i32 {
        status = watch.next().await.unwrap().unwrap().status;
    }
    assert_eq!(status, ServingStatus::Serving as i32);

    // A unary call in the meantime still works.
    let mut files = FileRelayServiceClient::new(channel);
    files
        .get_upload_policy(as_user("alice", pb::GetUploadPolicyRequest {}))
        .await
        .unwrap();

    service.signal("TERM");
    let update = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(update.status, ServingStatus::NotServing as i32);
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("stream ended after the grace period");
    match end {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    let exit = tokio::task::spawn_blocking(move || {
        let exit = service.wait_exit(Duration::from_secs(10));
        (exit, service.output())
    })
    .await
    .unwrap();
    let (exit, output) = exit;
    assert_eq!(exit.and_then(|status| status.code()), Some(0), "{output}");
    assert!(output.contains("shutting down"), "{output}");
    assert!(output.contains("\"stopped\""), "{output}");
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    const JWT_SECRET: &str = "jwt-secret-value-never-logged-0123456789";
    const REDIS_PASSWORD: &str = "redis-password-never-logged";
    const URL_PASSWORD: &str = "url-password-never-logged";
    const S3_SECRET: &str = "s3-secret-never-logged";
    const SIGNING_KEY: &str = "signing-key-never-logged-0123456789abcdef";
    let data = tempfile::tempdir().unwrap();
    let url = format!("redis://default:{URL_PASSWORD}@127.0.0.1:6379/0");
    let mut service = ServiceProcess::spawn(&[
        ("SVC_MESSAGING__LOG__LEVEL", "trace"),
        ("SVC_MESSAGING__AUTH__MODE", "jwt"),
        ("SVC_MESSAGING__AUTH__JWT_SECRET", JWT_SECRET),
        ("SVC_MESSAGING__REDIS__URL", &url),
        ("SVC_MESSAGING__REDIS__PASSWORD", REDIS_PASSWORD),
        (
            "SVC_MESSAGING__S3__ACCESS_KEY_ID",
            "GK0123456789abcdef01234567",
        ),
        ("SVC_MESSAGING__S3__SECRET_ACCESS_KEY", S3_SECRET),
        ("SVC_MESSAGING__DOWNLOADS__SIGNING_KEY", SIGNING_KEY),
        ("SVC_MESSAGING__SERVER__SHUTDOWN_GRACE", "1s"),
        (
            "SVC_MESSAGING__STORAGE__DATA_DIR",
            data.path().to_str().unwrap(),
        ),
    ]);
    // Bad tokens exercise the error paths that log.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", service.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut files = FileRelayServiceClient::new(channel);
    for bearer in ["Bearer garbage", "Bearer a.b.c"] {
        let mut request = Request::new(pb::GetUploadPolicyRequest {});
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().unwrap());
        assert!(files.get_upload_policy(request).await.is_err());
    }
    service.signal("TERM");
    let output = tokio::task::spawn_blocking(move || {
        service.wait_exit(Duration::from_secs(10));
        service.output()
    })
    .await
    .unwrap();
    assert!(
        output.contains("effective settings"),
        "debug settings were logged: {output}"
    );
    for secret in [
        JWT_SECRET,
        REDIS_PASSWORD,
        URL_PASSWORD,
        S3_SECRET,
        SIGNING_KEY,
    ] {
        assert!(
            !output.contains(secret),
            "{secret} leaked into the logs:\n{output}"
        );
    }
}

/// Sets the password of the private Redis (from `old`) to `new` with redis-cli.
fn set_redis_password(redis: &crate::support::PrivateRedis, old: &str, new: &str) {
    let output = Command::new(crate::support::required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", old)
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(["config", "set", "requirepass", new])
        .output()
        .expect("run redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "OK",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The service, configured from the environment only, works against a real Redis whose password
/// is a value that a type-guessing config parser would have changed: from an environment
/// variable, and from a mounted file.
#[tokio::test]
async fn redis_passwords_arrive_byte_for_byte_from_env_and_files() {
    let redis = crate::support::PrivateRedis::start();
    let secrets = tempfile::tempdir().unwrap();
    let url = format!("redis://default@127.0.0.1:{}/0", redis.port);
    let mut current = redis.password.clone();
    for (index, password) in ["0123", "1e3", "TRUE", "00", " 0.50 "].iter().enumerate() {
        set_redis_password(&redis, &current, password);
        current = (*password).to_owned();
        let password_file = secrets.path().join(format!("password-{index}"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let password_file = password_file.display().to_string();
        for source in ["env", "file"] {
            let (key, value) = if source == "env" {
                ("SVC_MESSAGING__REDIS__PASSWORD", *password)
            } else {
                (
                    "SVC_MESSAGING__REDIS__PASSWORD_FILE",
                    password_file.as_str(),
                )
            };
            let mut service = ServiceProcess::spawn(&[
                ("SVC_MESSAGING__STORAGE__MESSAGES", "redis"),
                ("SVC_MESSAGING__REDIS__URL", &url),
                ("SVC_MESSAGING__REDIS__KEY_PREFIX", "byte-for-byte"),
                (key, value),
            ]);
            let channel =
                tonic::transport::Channel::from_shared(format!("http://{}", service.grpc_addr))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
            let mut messaging = pb::messaging_service_client::MessagingServiceClient::new(channel);
            let created = messaging
                .create_conversation(as_user(
                    "alice",
                    pb::CreateConversationRequest {
                        title: format!("{source} {password:?}"),
                        participant_ids: vec!["bob".to_owned()],
                        ..Default::default()
                    },
                ))
                .await;
            assert!(
                created.is_ok(),
                "password {password:?} from {source}: {created:?}\n{}",
                service.output()
            );
            service.signal("TERM");
            tokio::task::spawn_blocking(move || service.wait_exit(Duration::from_secs(10)))
                .await
                .unwrap()
                .expect("the service exits");
        }
    }
}
