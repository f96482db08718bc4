//! The generated client SDKs (sdk/buf.gen.yaml, local plugins only) work first time: the Python
//! SDK is generated and its example run against the service (create a conversation, subscribe,
//! upload a file, receive the FILE message); the TypeScript SDK is generated, type-checked with
//! its example, and the example run too. Each side is checked against the service's own view.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::support::{TestServer, as_user, history, required_tool};
use svc_messaging::grpc::pb;
use tonic::transport::Channel;

type Messaging = pb::messaging_service_client::MessagingServiceClient<Channel>;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `buf generate --template sdk/buf.gen.yaml -o <out>` from the repository root, with the
/// Python that has grpcio-tools and the npm tools first on PATH.
fn generate(out: &Path) {
    let python = PathBuf::from(required_tool("SVC_TEST_SDK_PYTHON"));
    let node_modules = PathBuf::from(required_tool("SVC_TEST_NODE_MODULES"));
    let path = std::env::join_paths(
        [
            python.parent().unwrap().to_path_buf(),
            node_modules.join(".bin"),
        ]
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .unwrap();
    let output = Command::new(required_tool("SVC_TEST_BUF"))
        .current_dir(repository())
        .env("PATH", path)
        .args(["generate", "--template", "sdk/buf.gen.yaml", "-o"])
        .arg(out)
        .output()
        .expect("run buf generate");
    assert!(
        output.status.success(),
        "buf generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run the example");
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The conversation's FILE messages, as the service lists them: (file id, sha256).
async fn files_posted(server: &TestServer, conversation_id: &str) -> Vec<(String, String)> {
    let mut messaging = Messaging::new(server.channel().await);
    history(&mut messaging, "alice", conversation_id)
        .await
        .into_iter()
        .filter_map(|message| message.file.map(|file| (file.file_id, file.sha256)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_python_sdk_runs_its_example() {
    let server = TestServer::start().await;
    let out = tempfile::tempdir().unwrap();
    generate(out.path());
    let package = out.path().join("sdk/python");
    assert!(
        package
            .join("generated/messaging/v1/file_relay_pb2_grpc.py")
            .exists()
    );
    std::fs::copy(
        repository().join("sdk/python/example.py"),
        package.join("example.py"),
    )
    .unwrap();

    let stdout = run(Command::new(required_tool("SVC_TEST_SDK_PYTHON"))
        .arg(package.join("example.py"))
        .args([
            "--address",
            &server.grpc_addr.to_string(),
            "--user",
            "alice",
        ]));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let conversation_id = report["conversation_id"].as_str().unwrap();
    let file_id = report["file_id"].as_str().unwrap();
    let content = "hello from Python\n".repeat(1000);
    assert_eq!(
        report["sha256"].as_str().unwrap(),
        crate::support::sha256_hex(content.as_bytes())
    );
    assert_eq!(report["size_bytes"].as_i64(), Some(content.len() as i64));
    assert_eq!(report["caption"], "sent from the Python SDK");
    // The event the example received is the message the service stored.
    assert_eq!(
        files_posted(&server, conversation_id).await,
        vec![(
            file_id.to_owned(),
            crate::support::sha256_hex(content.as_bytes())
        )]
    );
    let mut messaging = Messaging::new(server.channel().await);
    let stored = history(&mut messaging, "bob", conversation_id).await;
    let message = stored
        .iter()
        .find(|message| message.file.is_some())
        .unwrap();
    assert_eq!(report["message_id"], message.message_id);
    assert_eq!(report["event_sequence"].as_u64(), Some(message.sequence));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_typescript_sdk_type_checks_and_runs_its_example() {
    let server = TestServer::start().await;
    let out = tempfile::tempdir().unwrap();
    generate(out.path());
    let package = out.path().join("sdk/typescript");
    for file in ["example.ts", "tsconfig.json", "package.json"] {
        std::fs::copy(
            repository().join("sdk/typescript").join(file),
            package.join(file),
        )
        .unwrap();
    }
    let node_modules = PathBuf::from(required_tool("SVC_TEST_NODE_MODULES"));
    std::os::unix::fs::symlink(&node_modules, package.join("node_modules")).unwrap();

    // Type-checked (strict) and compiled together with the generated code.
    run(Command::new(node_modules.join(".bin/tsc"))
        .current_dir(&package)
        .args(["-p", "."]));
    let stdout = run(Command::new("node")
        .current_dir(&package)
        .arg("dist/example.js")
        .args([&server.grpc_addr.to_string(), "alice"]));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let file_id = report["fileId"].as_str().unwrap();
    let mut files =
        pb::file_relay_service_client::FileRelayServiceClient::new(server.channel().await);
    let file = files
        .get_file(as_user(
            "alice",
            pb::GetFileRequest {
                file_id: file_id.to_owned(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .file
        .unwrap();
    assert_eq!(
        file.sha256,
        crate::support::sha256_hex("hello from TypeScript\n".repeat(1000).as_bytes())
    );
    assert_eq!(
        files_posted(&server, &file.conversation_id).await,
        vec![(file.file_id.clone(), file.sha256.clone())]
    );
}
