//! The `gatekeeper` binary: parse the command line, set up logging, dispatch, map errors to an
//! exit status. Every behaviour lives in the library.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gatekeeper::cli::{self, Cli, Command, LogFormat};
use gatekeeper::{daemon, policy};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    init_logging(cli.log_format);
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
    };
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
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listeners = daemon::Listeners::bind(&policy).await?;
        daemon::run(policy, listeners, daemon::shutdown_signal()).await
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
