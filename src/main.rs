//! The `gatekeeper` binary: parse the command line, set up logging, dispatch, map errors to an
//! exit status. Every behaviour lives in the library.

use std::collections::BTreeMap;
use std::io::{BufWriter, IsTerminal};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gatekeeper::cli::{self, Cli, Command, LogFormat};
use gatekeeper::{daemon, policy};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let log_writer = init_logging(cli.log_format);
    let location = cli.location(&env);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&location, &env),
        Command::Check => match cli::check(&location, &env) {
            Ok(summary) => {
                print!("{summary}");
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Command::Labels { url, proxy } => cli::labels(&location, &env, url.as_deref(), &proxy)
            .map(|text| print!("{text}"))
            .map_err(Into::into),
        Command::Render => cli::render(&location, &env).map(|(yaml, dropped)| {
            for why in dropped {
                eprintln!("note: state entry not restored: {why}");
            }
            print!("{yaml}");
        }),
        command @ (Command::List { .. }
        | Command::Grant { .. }
        | Command::Revoke { .. }
        | Command::Health) => operator(&command, &location, &env),
    };
    // Every log line is out before the error line.
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(location: &policy::Location, env: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let policy = policy::load(location, env)?;
    for w in &policy.warnings {
        tracing::warn!(key = %w.key, from = w.from.as_deref(), "{}", w.message);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listeners = daemon::Listeners::bind(&policy).await?;
        let source = daemon::PolicySource {
            location: location.clone(),
            env: env.clone(),
        };
        daemon::run(policy, listeners, source, daemon::shutdown_signal()).await
    })
}

/// `list`, `grant`, `revoke`, `health`: one request to the admin API, on a single thread.
fn operator(
    command: &Command,
    location: &policy::Location,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(result) = runtime.block_on(cli::operate(command, location, env)) {
        print!("{}", result?);
    }
    Ok(())
}

/// Log lines are written by a thread of their own, in batches: under churn every request logs
/// a grant and an eviction, and writing each line from the request's thread cost a seventh of
/// the churn throughput. Nothing is dropped: a full queue (a few thousand lines, so it stays
/// small in memory) makes the logger wait. The returned guard writes what is queued when dropped.
fn init_logging(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(4096)
        .finish(BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
