//! The `svc-messaging` binary: load config, start logging, serve until SIGTERM or SIGINT.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use svc_messaging::{
    app::App,
    config::{CONFIG_PATH_ENV, Settings},
    startup, telemetry,
};

/// Chat conversations over gRPC: messages, live subscriptions and file relay.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); settings from SVC_MESSAGING__SECTION__KEY variables override it.
    #[arg(long, global = true, env = CONFIG_PATH_ENV)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Load and validate the config exactly as start-up does; exit 0 when valid, 2 when not.
    CheckConfig,
}

/// Exit code for a config that cannot be used.
const EXIT_CONFIG: u8 = 2;

/// How long the runtime waits at exit for blocking threads. Every image decode has been told to
/// stop by then and does so within a row; this only bounds one that cannot be interrupted (a
/// WEBP frame), which would otherwise hold the process past the shutdown grace.
const BLOCKING_THREADS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref())
        .and_then(|settings| startup::check(&settings).map(|_| settings))
    {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("svc-messaging: invalid config: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        println!("svc-messaging: config is valid");
        return ExitCode::SUCCESS;
    }
    telemetry::init(&settings.log);
    tracing::debug!(?settings, "effective settings");

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("svc-messaging: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let app = App::bind(settings).await?;
        app.run_until(shutdown_signal()).await
    });
    runtime.shutdown_timeout(BLOCKING_THREADS_GRACE);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "service failed");
            eprintln!("svc-messaging: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
