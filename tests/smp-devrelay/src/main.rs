//! `smp-devrelay`: runs the dev SMP relay until SIGINT/SIGTERM, after printing its address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use muxd_smp::cert::SignatureAlgorithm;
use smp_devrelay::{Relay, RelayConfig};
use tokio::signal::unix::{SignalKind, signal};

/// A faithful SMP server for tests and the demo (not for production).
#[derive(Debug, Parser)]
#[command(version)]
#[deny(missing_docs)]
struct Args {
    /// TLS listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5223", env = "SMP_DEVRELAY_LISTEN")]
    listen: SocketAddr,
    /// Optional WebSocket-over-TLS listen address.
    #[arg(long, env = "SMP_DEVRELAY_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
    /// Certificate algorithm for a newly generated identity.
    #[arg(long, value_enum, default_value_t = Algorithm::Ed25519)]
    sign_algorithm: Algorithm,
    /// Append-only log of queues and messages, replayed on start.
    #[arg(long, env = "SMP_DEVRELAY_STORE_LOG")]
    store_log: Option<PathBuf>,
    /// Highest SMP version offered (6..=18), to test older servers.
    #[arg(long, default_value_t = muxd_smp::version::MAX,
          value_parser = clap::value_parser!(u16).range(6..=18))]
    max_version: u16,
    /// Messages a queue holds before ERR QUOTA.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    quota: u64,
    /// Close connections without subscriptions after this many idle seconds.
    #[arg(long, default_value_t = 6 * 3600)]
    idle_timeout_secs: u64,
    /// Keep the identity here so the address survives restarts.
    #[arg(long, env = "SMP_DEVRELAY_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    /// Host name to print in the address (default: the listen IP).
    #[arg(long)]
    host: Option<String>,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `smp_devrelay=debug`.
    #[arg(long, default_value = "info", env = "SMP_DEVRELAY_LOG")]
    log_level: String,
}

/// `--sign-algorithm` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Algorithm {
    /// Ed25519 (the `smp-server init` default).
    Ed25519,
    /// Ed448 (older servers and the upstream test fixtures).
    Ed448,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level)?)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

#[allow(clippy::print_stdout)] // Printing the address is how scripts learn it.
async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = RelayConfig::default();
    config.listen = args.listen;
    config.ws_listen = args.ws_listen;
    config.sign_algorithm = match args.sign_algorithm {
        Algorithm::Ed25519 => SignatureAlgorithm::Ed25519,
        Algorithm::Ed448 => SignatureAlgorithm::Ed448,
    };
    config.store_log = args.store_log;
    config.max_version = args.max_version;
    config.quota = usize::try_from(args.quota).context("--quota")?;
    config.idle_timeout = Duration::from_secs(args.idle_timeout_secs);
    config.cert_dir = args.cert_dir;
    config.host = args.host;
    let relay = Relay::start(config).await.context("starting the relay")?;
    println!("{}", relay.address());
    if let Some(ws) = relay.ws_address() {
        println!("ws: {ws}");
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}
