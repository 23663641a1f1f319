//! `muxd`: parse the command line, set up logging and the runtime, run the daemon.

mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use muxd::{Config, Environment, RunArgs, StoreArgs};

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
    /// Create the data directory, key file and an empty store, once before the first `run`
    ///
    /// With MUXD_PASSPHRASE set, the store is protected by that passphrase (Argon2id) instead
    /// of a key file. Never overwrites an existing store.
    Init(StoreArgs),
    /// Run the daemon in the foreground.
    Run(RunArgs),
    /// Recreate the store from a backup written by `muxctl export`, with the daemon stopped
    ///
    /// The store must not exist. The backup is unlocked like the store is configured to be:
    /// with the key file, or with MUXD_PASSPHRASE.
    Restore(RestoreArgs),
    /// Print the default configuration file, every key with a comment.
    GenConfig,
}

/// Flags of `muxd restore`.
#[derive(Debug, clap::Args)]
#[deny(missing_docs)]
struct RestoreArgs {
    /// The backup file to restore.
    #[arg(long, value_name = "BACKUP")]
    from: PathBuf,
    /// Config file and store location.
    #[command(flatten)]
    store_args: StoreArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = match Environment::from_process() {
        Ok(env) => env,
        Err(e) => return fail(&anyhow::Error::new(e), 2),
    };
    match cli.command {
        Command::GenConfig => {
            #[allow(clippy::print_stdout)]
            {
                print!("{}", muxd::generate_default_toml(&env));
            }
            ExitCode::SUCCESS
        }
        Command::Init(args) => match Config::load(&args.to_run_args(), &env) {
            Ok(config) => offline(muxd::init(&config).map(|r| init_lines(&config, &r))),
            Err(e) => fail(&anyhow::Error::new(e), 2),
        },
        Command::Restore(args) => match Config::load(&args.store_args.to_run_args(), &env) {
            Ok(config) => offline(muxd::restore(&config, &args.from).map(|r| {
                vec![
                    format!("restored store {}", r.store.display()),
                    format!("from backup     {}", r.backup.display()),
                ]
            })),
            Err(e) => fail(&anyhow::Error::new(e), 2),
        },
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
                        .map(muxd::Error::exit_code)
                        .or_else(|| {
                            e.downcast_ref::<muxd::SetupError>()
                                .map(muxd::SetupError::exit_code)
                        })
                        .unwrap_or(1);
                    fail(&e, code)
                }
            }
        }
    }
}

/// Prints the outcome of `init` or `restore`, which run without logging or a runtime.
fn offline(result: Result<Vec<String>, muxd::SetupError>) -> ExitCode {
    match result {
        Ok(lines) => {
            #[allow(clippy::print_stdout)]
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = e.exit_code();
            fail(&anyhow::Error::new(e), code)
        }
    }
}

/// What `muxd init` tells the operator: where everything is, and what to keep safe.
fn init_lines(config: &Config, r: &muxd::InitReport) -> Vec<String> {
    let mut lines = vec![format!(
        "data directory {}{}",
        r.data_dir.display(),
        if r.created_data_dir {
            " (created, mode 0700)"
        } else {
            ""
        }
    )];
    match &r.key_file {
        Some(key) => lines.push(format!(
            "key file       {}{}",
            key.display(),
            if r.created_key_file {
                " (created, mode 0600)"
            } else {
                " (existing, reused)"
            }
        )),
        None => lines.push(format!(
            "key            the passphrase in {} (Argon2id); no key file",
            muxd::PASSPHRASE_VAR
        )),
    }
    lines.push(format!("store          {} (created)", r.store.display()));
    if config.uses_passphrase() {
        lines.push(format!(
            "keep the passphrase safe: {} must hold it for every `muxd run`",
            muxd::PASSPHRASE_VAR
        ));
    } else {
        lines.push(
            "keep a copy of the key file apart from the store and its backups: \
             without it neither can be opened"
                .to_owned(),
        );
    }
    lines
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
