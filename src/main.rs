//! The `dbproxy` binary: parses the command line, loads and validates the
//! configuration, and runs the proxy until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use dbproxy::config::MAX_WORKERS;
use dbproxy::{Config, Proxy};
use tokio::signal::unix::{SignalKind, signal};

/// PostgreSQL connection pooler with read/write splitting.
#[derive(Parser, Debug)]
#[command(name = "dbproxy", version, about)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration, print every problem, and exit.
    #[arg(long)]
    check: bool,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr through `dbproxy::logging`'s queue; the returned handle
/// flushes it at exit.
fn init_logging(format: LogFormat) -> std::io::Result<dbproxy::logging::Flusher> {
    let (writer, flusher) = dbproxy::logging::start(std::io::stderr())?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal (not in files and collectors)
    // who did not ask for none (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(flusher)
}

/// `TOKIO_WORKER_THREADS`, which sets the number of workers when
/// `proxy.workers` does not, must be a number in the range `proxy.workers` takes.
fn check_worker_threads_env() -> Result<(), String> {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Err(std::env::VarError::NotPresent) => Ok(()),
        Ok(v) if v.parse::<usize>().is_ok_and(|n| (1..=MAX_WORKERS).contains(&n)) => Ok(()),
        Ok(v) => Err(format!("must be an integer from 1 to {MAX_WORKERS}, not {v:?}")),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("must be an integer from 1 to {MAX_WORKERS}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{}: {} problem(s):", args.config.display(), problems.len());
            for p in &problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(2);
        }
    };
    if config.proxy.workers.is_none()
        && let Err(problem) = check_worker_threads_env()
    {
        // tokio would panic on it when building the runtime.
        eprintln!("TOKIO_WORKER_THREADS: {problem}");
        return ExitCode::from(2);
    }
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let flusher = match init_logging(args.log_format) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot start the log writer: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One worker: tokio's single-threaded scheduler on this thread, which
    // spends less CPU per wake-up than the work-stealing one (no queues shared
    // between workers, no searching for work; docs/benchmarks.md, entry 16).
    let mut builder = match config.proxy.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        workers => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = workers {
                builder.worker_threads(n);
            }
            builder
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config, args.config));
    // Stop the runtime first, so that its threads' last lines are in the queue.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    flusher.flush(std::time::Duration::from_secs(2));
    code
}

async fn run(config: Config, path: PathBuf) -> ExitCode {
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            eprintln!("cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let proxy = match Proxy::start(config).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    proxy.shared().set_config_path(path);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = proxy.shutdown_requested() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = proxy.shared().reload_off_thread().await;
            }
        }
    }
    tracing::info!("shutting down: draining clients (a second SIGTERM/SIGINT exits at once)");
    tokio::select! {
        drained = proxy.shutdown() => {
            if drained {
                tracing::info!("all clients gone; bye");
            }
        }
        _ = term.recv() => tracing::warn!("second signal: exiting without waiting for clients"),
        _ = int.recv() => tracing::warn!("second signal: exiting without waiting for clients"),
    }
    ExitCode::SUCCESS
}
