//! `svcmsg`: svc-messaging from the command line, on the `svcmsg_client` library.
//!
//! Exit codes: 0 done; 1 a local failure (reading or writing a file, a checksum mismatch);
//! 2 a usage error (bad arguments or settings); 3 refused by the service (the error names the
//! gRPC code and the ErrorInfo reason); 4 the service is unreachable or did not answer in time;
//! 130 interrupted (Ctrl-C).

mod output;
mod progress;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use svcmsg_client::{Client, Error, Identity, ReconnectPolicy, SubscribeOptions, UploadOptions};

use crate::{output::Output, progress::TransferProgress};

const EXIT_LOCAL: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_REFUSED: u8 = 3;
const EXIT_UNAVAILABLE: u8 = 4;
const EXIT_INTERRUPTED: u8 = 130;

/// svc-messaging from the command line: conversations, messages, live tail, file transfers.
///
/// Exit codes: 0 done, 1 local failure (file I/O, checksum), 2 usage error, 3 refused by the
/// service, 4 service unavailable or too slow, 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "svcmsg", version)]
struct Cli {
    /// The service's gRPC address: http://HOST:PORT (plaintext) or https://HOST:PORT (TLS).
    #[arg(
        long,
        env = "SVCMSG_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,

    /// Act as this user (the `x-user-id` header of a service behind a trusted gateway); a
    /// token, when given too, wins.
    #[arg(long, env = "SVCMSG_USER", global = true)]
    user: Option<String>,

    /// A JWT sent as `authorization: Bearer` (a service in `jwt` auth mode).
    #[arg(long, env = "SVCMSG_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,

    /// A PEM CA certificate to trust for https:// (besides the system's roots).
    #[arg(long, env = "SVCMSG_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,

    /// Deadline of each call, e.g. `5s`, `500ms` (transfers and `tail` are not bounded).
    #[arg(long, env = "SVCMSG_TIMEOUT", global = true, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,

    /// Output format of results on stdout.
    #[arg(
        long,
        env = "SVCMSG_OUTPUT",
        value_enum,
        default_value = "text",
        global = true
    )]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists your conversations, most recent activity first.
    Conversations,
    /// Creates a conversation with you and the given users.
    Create {
        /// Display title.
        #[arg(long, default_value = "")]
        title: String,
        /// A user to add (repeatable).
        #[arg(long = "with", value_name = "USER")]
        with: Vec<String>,
    },
    /// Sends a text message.
    Send { conversation: String, text: String },
    /// Prints a conversation's events as they happen; reconnects on its own.
    Tail {
        conversation: String,
        /// Start after this sequence instead of at the newest event (0: the whole history).
        #[arg(long)]
        after: Option<u64>,
    },
    /// Uploads a file and posts it to the conversation, with a progress bar; Ctrl-C leaves a
    /// resumable upload.
    Upload {
        conversation: String,
        file: PathBuf,
        /// The caption posted with the file.
        #[arg(long, default_value = "")]
        caption: String,
        /// The MIME type (default: from the file name's extension and the upload policy).
        #[arg(long)]
        content_type: Option<String>,
        /// The upload's request id; the id of an interrupted upload continues it.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Downloads a file, with a progress bar.
    Download {
        file_id: String,
        /// Where to write it (default: the file's name, in the current directory).
        #[arg(short = 'o', long = "output-file", value_name = "PATH")]
        path: Option<PathBuf>,
    },
    /// Shows the upload policy: allowed types, size limits, retention.
    Policy,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("svcmsg: cannot start: {error}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let out = Output::new(cli.output == Format::Json);
    match runtime.block_on(run(cli, &out)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            out.error(&error);
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &Error) -> u8 {
    match error {
        Error::Status(status) if error.is_unavailable() || status.is_transport_failure() => {
            EXIT_UNAVAILABLE
        }
        Error::Status(_) => EXIT_REFUSED,
        Error::Endpoint(_) | Error::InvalidInput(_) => EXIT_USAGE,
        Error::Io { .. } | Error::ChecksumMismatch { .. } | Error::NotResumable { .. } => {
            EXIT_LOCAL
        }
        // A future variant: the generic failure.
        #[allow(unreachable_patterns)]
        _ => EXIT_LOCAL,
    }
}

fn connect(cli: &Cli, reconnect: ReconnectPolicy) -> Result<Client, Error> {
    let identity = match (&cli.token, &cli.user) {
        (Some(token), _) => Identity::Bearer(token.clone()),
        (None, Some(user)) => Identity::UserId(user.clone()),
        (None, None) => Identity::Anonymous,
    };
    let mut builder = Client::builder(cli.addr.clone())
        .identity(identity)
        .reconnect(reconnect);
    if let Some(path) = &cli.ca_cert {
        let pem = std::fs::read(path).map_err(|source| Error::Io {
            context: format!("cannot read {}", path.display()),
            source,
        })?;
        builder = builder.ca_certificate(pem);
    }
    if let Some(timeout) = cli.timeout {
        builder = builder.timeout(timeout);
    }
    builder.build()
}

async fn run(cli: Cli, out: &Output) -> Result<u8, Error> {
    let reconnect = match cli.command {
        // A tail waits for the service to come back, however long that takes.
        Command::Tail { .. } => ReconnectPolicy {
            max_attempts_without_progress: None,
            ..ReconnectPolicy::default()
        },
        _ => ReconnectPolicy::default(),
    };
    let client = connect(&cli, reconnect)?;
    match &cli.command {
        Command::Conversations => out.conversations(&client.conversations().await?),
        Command::Create { title, with } => {
            let with: Vec<&str> = with.iter().map(String::as_str).collect();
            out.conversation(&client.create_conversation(title, &with).await?);
        }
        Command::Send { conversation, text } => {
            out.message(&client.send_text(conversation, text).await?);
        }
        Command::Tail {
            conversation,
            after,
        } => return tail(&client, conversation, *after, out).await,
        Command::Upload {
            conversation,
            file,
            caption,
            content_type,
            request_id,
        } => {
            let request = UploadRequest {
                conversation,
                file,
                caption,
                content_type: content_type.as_deref(),
                request_id: request_id.clone(),
            };
            return upload(&client, request, out).await;
        }
        Command::Download { file_id, path } => {
            return download(&client, file_id, path.as_deref(), out).await;
        }
        Command::Policy => out.policy(&client.upload_policy().await?),
    }
    Ok(0)
}

async fn tail(
    client: &Client,
    conversation: &str,
    after: Option<u64>,
    out: &Output,
) -> Result<u8, Error> {
    let after_sequence = match after {
        Some(after) => after,
        None => client.conversation(conversation).await?.last_sequence,
    };
    let options = SubscribeOptions {
        after_sequence,
        on_reconnect: Some(Arc::new(|error: &Error, after: u64| {
            eprintln!("svcmsg: stream interrupted ({error}); resuming after #{after}");
        })),
    };
    let mut events = client.subscribe(conversation, options);
    out.ready(&format!("tailing {conversation} after #{after_sequence}"));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => out.event(&event?),
                None => return Ok(0),
            },
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

struct UploadRequest<'a> {
    conversation: &'a str,
    file: &'a std::path::Path,
    caption: &'a str,
    content_type: Option<&'a str>,
    request_id: Option<String>,
}

async fn upload(client: &Client, request: UploadRequest<'_>, out: &Output) -> Result<u8, Error> {
    // Chosen here, not by the library, so an interrupted upload can say how to continue.
    let request_id = request
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let progress = Arc::new(TransferProgress::new("upload"));
    let mut options = UploadOptions::new(request.conversation, "")
        .caption(request.caption)
        .request_id(request_id.clone());
    if let Some(content_type) = request.content_type {
        options = options.content_type(content_type);
    }
    let reporter = progress.clone();
    options = options.on_progress(move |sent, total| reporter.update(sent, total));
    let outcome = tokio::select! {
        outcome = client.upload_path(request.file, options) => outcome,
        _ = tokio::signal::ctrl_c() => {
            progress.abandon();
            interrupted_upload(client, &request, &request_id).await;
            return Ok(EXIT_INTERRUPTED);
        }
    };
    match outcome {
        Ok(outcome) => {
            progress.finish();
            out.uploaded(&outcome);
            Ok(0)
        }
        Err(error) => {
            progress.abandon();
            Err(error)
        }
    }
}

/// Says how far an interrupted upload got and how to continue it.
async fn interrupted_upload(client: &Client, request: &UploadRequest<'_>, request_id: &str) {
    let durable = match settled_status(client, request_id).await {
        Some(status) => format!(
            "{} of {} bytes are",
            status.committed_size, status.size_bytes
        ),
        None => "what the service received is".to_owned(),
    };
    let mut command = vec![
        "svcmsg".to_owned(),
        "upload".to_owned(),
        request.conversation.to_owned(),
        request.file.display().to_string(),
        "--request-id".to_owned(),
        request_id.to_owned(),
    ];
    if !request.caption.is_empty() {
        command.extend(["--caption".to_owned(), request.caption.to_owned()]);
    }
    if let Some(content_type) = request.content_type {
        command.extend(["--content-type".to_owned(), content_type.to_owned()]);
    }
    let command: Vec<String> = command.iter().map(|word| shell_quote(word)).collect();
    eprintln!(
        "svcmsg: upload interrupted; {durable} kept by the service (for its upload session \
         lifetime, 24 h by default).\nResume with: {}",
        command.join(" ")
    );
}

/// The upload's status once the service has recorded the parts that were in flight when the
/// stream was dropped (it finishes them first): asked until two answers agree, for at most 2 s.
async fn settled_status(
    client: &Client,
    request_id: &str,
) -> Option<svcmsg_client::pb::GetUploadStatusResponse> {
    let client = client.with_timeout(Duration::from_millis(500));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut last = client.upload_status(request_id).await.ok()?;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(current) = client.upload_status(request_id).await else {
            break;
        };
        if current.committed_size == last.committed_size {
            return Some(current);
        }
        last = current;
    }
    Some(last)
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

async fn download(
    client: &Client,
    file_id: &str,
    path: Option<&std::path::Path>,
    out: &Output,
) -> Result<u8, Error> {
    let path = match path {
        Some(path) => path.to_owned(),
        None => {
            let name = client.file(file_id).await?.file_name;
            // The service refuses names with separators; never write outside the directory.
            PathBuf::from(
                std::path::Path::new(&name)
                    .file_name()
                    .ok_or_else(|| Error::InvalidInput(format!("unusable file name {name:?}")))?,
            )
        }
    };
    let progress = Arc::new(TransferProgress::new("download"));
    let reporter = progress.clone();
    let report: svcmsg_client::DownloadProgress =
        Arc::new(move |received, total| reporter.update(received, total));
    let outcome = tokio::select! {
        outcome = client.download_to_path(file_id, &path, Some(report)) => outcome,
        _ = tokio::signal::ctrl_c() => {
            progress.abandon();
            eprintln!("svcmsg: download interrupted");
            return Ok(EXIT_INTERRUPTED);
        }
    };
    match outcome {
        Ok(outcome) => {
            progress.finish();
            out.downloaded(&outcome, &path);
            Ok(0)
        }
        Err(error) => {
            progress.abandon();
            Err(error)
        }
    }
}
