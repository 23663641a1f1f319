//! `muxd`: parse the command line, set up logging and the runtime, run the daemon.

mod telemetry;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use muxd::{Config, Environment, RunArgs};

/// muxd: one process holds the upstream connections, many apps share them.
#[derive(Debug, Parser)]
#[command(version, about)]
#[deny(missing_docs)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
#[deny(missing_docs)]
enum Command {
    /// Run the daemon in the foreground.
    Run(RunArgs),
    /// Print the default configuration file, every key with a comment.
    GenConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Environment::from_process();
    match cli.command {
        Command::GenConfig => {
            #[allow(clippy::print_stdout)]
            {
                print!("{}", muxd::generate_default_toml(&env));
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            let config = match Config::load(&args, &env) {
                Ok(config) => config,
                Err(e) => return fail(&anyhow::Error::new(e), 2),
            };
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let code = e
                        .downcast_ref::<muxd::Error>()
                        .map_or(1, muxd::Error::exit_code);
                    fail(&e, code)
                }
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    // Held to the end: dropping it flushes the log lines still buffered.
    let _log = telemetry::init(&config.log_level, config.log_format)?;
    let result = (|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(muxd::run(config, muxd::os_signal()))?;
        Ok(())
    })();
    if let Err(e) = &result {
        // Logged here, while the log writer still runs; `fail` only prints to stderr.
        tracing::error!(error = format!("{e:#}"), "muxd failed");
    }
    result
}

/// Reports a fatal error on stderr and picks the exit code (`run` has logged it already).
fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("muxd: error: {e:#}");
    }
    ExitCode::from(code)
}
