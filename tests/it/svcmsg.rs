//! `svcmsg`, the command line (issue 12), run as a person would: a process against the real
//! service. Create, send, tail, a 40 MB upload and download, the policy, JSON output, exit codes,
//! the progress bar under a pseudo-terminal and its plain lines without one, and Ctrl-C during
//! an upload leaving an upload that `--request-id` completes.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::support::cloud::{MIB, free_port, pdf};
use crate::support::{ServiceProcess, TestServer, required_tool, sha256_hex};

/// `svcmsg` as the user `user` of the service at `addr`, settings from the environment.
fn svcmsg(addr: &str, user: &str) -> Command {
    let mut command = Command::new(required_tool("SVC_TEST_SVCMSG"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SVCMSG_ADDR", format!("http://{addr}"))
        .env("SVCMSG_USER", user)
        .stdin(Stdio::null());
    command
}

/// Runs to completion (killed after 120 s).
fn run(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run svcmsg");
    wait_output(child, Duration::from_secs(120))
}

fn wait_output(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output().expect("wait for svcmsg");
        let _ = done_tx.send(());
        output
    });
    if done_rx.recv_timeout(limit).is_err() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("svcmsg did not finish within {limit:?}");
    }
    waiter.join().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs and expects success; returns stdout parsed as JSON.
fn json(command: Command) -> Value {
    let output = run(command);
    assert!(
        output.status.success(),
        "svcmsg failed: {:?}\n{}",
        output.status,
        stderr(&output)
    );
    serde_json::from_str(stdout(&output).trim()).unwrap_or_else(|error| {
        panic!(
            "stdout is not one JSON document ({error}): {}",
            stdout(&output)
        )
    })
}

fn with_args<'a>(mut command: Command, args: impl IntoIterator<Item = &'a str>) -> Command {
    command.args(args);
    command
}

fn write_pdf(dir: &Path, name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let body = pdf(len);
    let path = dir.join(name);
    std::fs::write(&path, &body).unwrap();
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_creates_sends_tails_and_exchanges_a_40_mb_file() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();

    let created = json(with_args(
        svcmsg(&addr, "alice"),
        [
            "--output", "json", "create", "--title", "launch", "--with", "bob",
        ],
    ));
    let conversation_id = created["conversation_id"].as_str().unwrap().to_owned();
    assert_eq!(created["title"], "launch");
    assert_eq!(created["participant_ids"].as_array().unwrap().len(), 2);

    // Bob tails in a second terminal; the line on stderr says it is ready.
    let mut tail = svcmsg(&addr, "bob")
        .args(["--output", "json", "tail", &conversation_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let tail_stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(tail_stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let mut tail_stderr = BufReader::new(tail.stderr.take().unwrap());
    let mut ready = String::new();
    tail_stderr.read_line(&mut ready).unwrap();
    assert!(ready.contains("tailing"), "{ready}");

    let sent = json(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json", "send", &conversation_id, "hello bob"],
    ));
    assert_eq!(sent["text"], "hello bob");
    let event: Value =
        serde_json::from_str(&line_rx.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert_eq!(event["sequence"], sent["sequence"]);
    assert_eq!(event["message_created"]["message"]["text"], "hello bob");
    assert_eq!(event["message_created"]["message"]["sender_id"], "alice");

    // Text output, for people.
    let listed = run(with_args(svcmsg(&addr, "bob"), ["conversations"]));
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains(&conversation_id));
    assert!(stdout(&listed).contains("\"launch\""));

    // A 40 MB file up and down again.
    let (path, body) = write_pdf(dir.path(), "slides.pdf", 40 * 1000 * 1000);
    let uploaded = json(with_args(
        svcmsg(&addr, "alice"),
        [
            "--output",
            "json",
            "upload",
            &conversation_id,
            path.to_str().unwrap(),
            "--caption",
            "the deck",
        ],
    ));
    let file_id = uploaded["file"]["file_id"].as_str().unwrap().to_owned();
    assert_eq!(uploaded["file"]["sha256"], sha256_hex(&body));
    assert_eq!(uploaded["file"]["size_bytes"], body.len());
    assert_eq!(uploaded["file"]["content_type"], "application/pdf");
    assert_eq!(uploaded["message"]["text"], "the deck");
    let event: Value =
        serde_json::from_str(&line_rx.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert_eq!(
        event["message_created"]["message"]["file"]["file_id"],
        file_id
    );

    let target = dir.path().join("copy.pdf");
    let downloaded = run(with_args(
        svcmsg(&addr, "bob"),
        ["download", &file_id, "-o", target.to_str().unwrap()],
    ));
    assert!(downloaded.status.success(), "{}", stderr(&downloaded));
    assert!(stdout(&downloaded).contains(&file_id));
    assert!(std::fs::read(&target).unwrap() == body, "the copy differs");
    assert!(!dir.path().join("copy.pdf.part").exists());

    let policy = json(with_args(
        svcmsg(&addr, "bob"),
        ["policy", "--output", "json"],
    ));
    let pdf_type = policy["file_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kind| kind["mime_type"] == "application/pdf")
        .expect("pdf is allowed");
    assert_eq!(pdf_type["max_size_bytes"], 50 * MIB);
    let policy_text = run(with_args(svcmsg(&addr, "bob"), ["policy"]));
    assert!(stdout(&policy_text).contains("application/pdf"));

    let _ = tail.kill();
    let _ = tail.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_usage_errors_refusals_and_unavailability_apart() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();

    // 2: usage errors, found before anything is sent.
    for args in [
        vec!["send"],
        vec!["bogus"],
        vec!["--output", "yaml", "policy"],
    ] {
        let output = run(with_args(svcmsg(&addr, "alice"), args.clone()));
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let mut bad_env = svcmsg(&addr, "alice");
    bad_env.env("SVCMSG_TIMEOUT", "soon").arg("policy");
    assert_eq!(run(bad_env).status.code(), Some(2));

    // 3: refused by the service, with the reason.
    let created = json(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json", "create"],
    ));
    let conversation_id = created["conversation_id"].as_str().unwrap();
    let refused = run(with_args(
        svcmsg(&addr, "mallory"),
        ["send", conversation_id, "hi"],
    ));
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("NOT_A_PARTICIPANT"),
        "{}",
        stderr(&refused)
    );
    let refused = run(with_args(
        svcmsg(&addr, "mallory"),
        ["--output", "json", "send", conversation_id, "hi"],
    ));
    assert_eq!(refused.status.code(), Some(3));
    let error: Value = serde_json::from_str(stderr(&refused).trim()).unwrap();
    assert_eq!(error["error"]["code"], "PERMISSION_DENIED");
    assert_eq!(error["error"]["reason"], "NOT_A_PARTICIPANT");
    let mut anonymous = svcmsg(&addr, "x");
    anonymous.env_remove("SVCMSG_USER").arg("conversations");
    assert_eq!(run(anonymous).status.code(), Some(3));

    // 4: nothing listens there.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let unreachable = run(with_args(svcmsg(&nowhere, "alice"), ["conversations"]));
    assert_eq!(
        unreachable.status.code(),
        Some(4),
        "{}",
        stderr(&unreachable)
    );
    assert!(stderr(&unreachable).contains("UNAVAILABLE"));
}

/// The `svcmsg upload` of a `len`-byte PDF under a pseudo-terminal (util-linux `script`):
/// everything it drew.
fn upload_under_a_terminal(addr: &str, conversation_id: &str, path: &Path) -> (Output, String) {
    let command = [
        required_tool("SVC_TEST_SVCMSG"),
        "upload".to_owned(),
        conversation_id.to_owned(),
        path.display().to_string(),
    ]
    .join(" ");
    let mut script = Command::new("script");
    script
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SVCMSG_ADDR", format!("http://{addr}"))
        .env("SVCMSG_USER", "alice")
        .env("TERM", "xterm")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .stdin(Stdio::null());
    let output = run(script);
    let drawn = stdout(&output);
    (output, drawn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_bar_shows_bytes_and_rate_on_a_terminal_and_plain_lines_elsewhere() {
    let server = TestServer::start().await;
    let addr = server.grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let created = json(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json", "create"],
    ));
    let conversation_id = created["conversation_id"].as_str().unwrap().to_owned();
    let (path, _) = write_pdf(dir.path(), "terminal.pdf", 12 * MIB);

    let (output, drawn) = upload_under_a_terminal(&addr, &conversation_id, &path);
    assert!(output.status.success(), "{drawn}");
    // The bar's last frame: all bytes, a rate and an ETA.
    assert!(drawn.contains("12.00 MiB/12.00 MiB"), "{drawn}");
    assert!(drawn.contains("/s"), "{drawn}");
    assert!(drawn.contains("ETA"), "{drawn}");
    assert!(drawn.contains("uploaded terminal.pdf"), "{drawn}");

    // Without a terminal: one plain line per 10 %.
    let output = run(with_args(
        svcmsg(&addr, "alice"),
        ["upload", &conversation_id, path.to_str().unwrap()],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<String> = stderr(&output)
        .lines()
        .filter(|line| line.starts_with("upload:"))
        .map(str::to_owned)
        .collect();
    let percents: Vec<String> = lines
        .iter()
        .map(|line| {
            line.split('%')
                .next()
                .unwrap()
                .trim_start_matches("upload:")
                .trim()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (1..=10).map(|tenth| (tenth * 10).to_string()).collect();
    assert_eq!(percents, expected, "{lines:#?}");
    assert!(
        lines.last().unwrap().contains("12.00 MiB of 12.00 MiB"),
        "{lines:#?}"
    );
    assert!(lines.iter().all(|line| line.ends_with("/s)")), "{lines:#?}");
    assert!(
        !stderr(&output).contains('\r'),
        "no bar drawn without a terminal"
    );

    // Downloads too.
    let file_id = stdout(&output)
        .split_whitespace()
        .skip_while(|word| *word != "file")
        .nth(1)
        .unwrap()
        .to_owned();
    let output = run(with_args(
        svcmsg(&addr, "alice"),
        [
            "download",
            &file_id,
            "-o",
            dir.path().join("copy.pdf").to_str().unwrap(),
        ],
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    let downloads = stderr(&output)
        .lines()
        .filter(|line| line.starts_with("download:"))
        .count();
    assert_eq!(downloads, 10, "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_an_upload_leaves_an_upload_that_request_id_completes() {
    let data_dir = tempfile::tempdir().unwrap();
    let data_dir_value = data_dir.path().display().to_string();
    let service = ServiceProcess::spawn(&[
        ("SVC_MESSAGING__STORAGE__DATA_DIR", data_dir_value.as_str()),
        ("SVC_MESSAGING__UPLOADS__IDLE_TIMEOUT", "2s"),
    ]);
    let addr = service.grpc_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let created = json(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json", "create"],
    ));
    let conversation_id = created["conversation_id"].as_str().unwrap().to_owned();
    let (path, body) = write_pdf(dir.path(), "interrupted.pdf", 40 * 1000 * 1000);

    let mut upload = svcmsg(&addr, "alice")
        .args(["upload", &conversation_id, path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(upload.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(progress.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
        if line.starts_with("upload:  50%") {
            break;
        }
    }
    // The service stops reading (frozen), so the upload cannot finish before the Ctrl-C.
    service.signal("STOP");
    let status = Command::new("kill")
        .args(["-INT", &upload.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut progress, &mut rest).unwrap();
    let interrupted = wait_output(upload, Duration::from_secs(30));
    service.signal("CONT");
    assert_eq!(interrupted.status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("upload interrupted"), "{rest}");
    let resume = rest
        .lines()
        .find_map(|line| line.strip_prefix("Resume with: "))
        .unwrap_or_else(|| panic!("no resume command in: {rest}"))
        .to_owned();
    let words: Vec<&str> = resume.split_whitespace().collect();
    assert_eq!(
        words[..4],
        [
            "svcmsg",
            "upload",
            conversation_id.as_str(),
            path.to_str().unwrap()
        ]
    );
    assert_eq!(words[4], "--request-id");
    let request_id = words[5].to_owned();

    // The service kept the upload open for a resume.
    let client = svcmsg_client::Client::builder(format!("http://{addr}"))
        .identity(svcmsg_client::Identity::UserId("alice".into()))
        .build()
        .unwrap();
    let status = client.upload_status(&request_id).await.unwrap();
    assert!(!status.complete);
    assert_eq!(status.size_bytes as usize, body.len());
    // Half the file was sent: whole parts of it (at least 8 MiB) were durable before the freeze.
    assert!(status.committed_size >= 8 * MIB as i64, "{status:?}");

    // The printed command completes it.
    let output = run(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json"]
            .into_iter()
            .chain(words[1..].iter().copied()),
    ));
    assert!(output.status.success(), "{}", stderr(&output));
    // It continued from the durable bytes instead of starting over.
    assert!(
        stderr(&output).contains("upload: resuming at"),
        "{}",
        stderr(&output)
    );
    let uploaded: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(uploaded["request_id"], request_id);
    assert_eq!(uploaded["file"]["sha256"], sha256_hex(&body));
    let status = client.upload_status(&request_id).await.unwrap();
    assert!(status.complete);
    let messages = client.recent_messages(&conversation_id, 100).await.unwrap();
    let files: Vec<&str> = messages
        .iter()
        .filter_map(|message| message.file.as_ref().map(|file| file.file_id.as_str()))
        .collect();
    assert_eq!(files, vec![uploaded["file"]["file_id"].as_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_can_be_a_jwt_from_the_environment() {
    use crate::auth::{SECRET, claims, jwt_server, now, token};
    let server = jwt_server().await;
    let addr = server.grpc_addr.to_string();
    let mut create = svcmsg(&addr, "ignored");
    create
        .env("SVCMSG_TOKEN", token(claims("carol", now() + 300), SECRET))
        .env("SVCMSG_OUTPUT", "json")
        .arg("create");
    let created = json(create);
    assert_eq!(created["created_by"], "carol");
    let mut expired = svcmsg(&addr, "ignored");
    expired
        .args(["--token", &token(claims("carol", now() - 10), SECRET)])
        .arg("conversations");
    let output = run(expired);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("TOKEN_EXPIRED"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_carries_on_by_itself_across_a_restart_of_the_service() {
    let mut service = crate::client::RestartableService::start("svcmsg-tail-restart");
    let addr = service.addr();
    let created = json(with_args(
        svcmsg(&addr, "alice"),
        ["--output", "json", "create", "--with", "bob"],
    ));
    let conversation_id = created["conversation_id"].as_str().unwrap().to_owned();
    let mut tail = svcmsg(&addr, "bob")
        .args(["tail", &conversation_id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, line_rx) = mpsc::channel::<String>();
    let tail_stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(tail_stdout).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let (note_tx, note_rx) = mpsc::channel::<String>();
    let tail_stderr = tail.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(tail_stderr).lines().map_while(Result::ok) {
            let _ = note_tx.send(line);
        }
    });
    assert!(
        note_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap()
            .contains("tailing")
    );
    let send = |text: &str| {
        let output = run(with_args(
            svcmsg(&addr, "alice"),
            ["send", &conversation_id, text],
        ));
        assert!(output.status.success(), "{}", stderr(&output));
    };
    send("before the restart");
    let line = line_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(line.ends_with("alice: before the restart"), "{line}");

    service.kill();
    let note = note_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(note.contains("resuming after #"), "{note}");
    service.restart();
    send("after the restart");
    let line = line_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(line.ends_with("alice: after the restart"), "{line}");
    // Nothing twice.
    assert!(line_rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert!(tail.try_wait().unwrap().is_none(), "tail is still running");
    let _ = tail.kill();
    let _ = tail.wait();
}
