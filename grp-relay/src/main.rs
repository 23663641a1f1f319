//! `grp-relay`: runs the reference GRP/1 relay.
//!
//! ```text
//! grp-relay [run] [--config FILE] [--listen-tcp ADDR] ...   serve until SIGINT/SIGTERM
//! grp-relay init [--config FILE] [--key-file FILE]          create the static key, print addresses
//! grp-relay gen-config                                       print the default configuration
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use clap::{Args, Parser, Subcommand};
use grp_relay::Relay;
use grp_relay::config::{Config, load_or_create_key};
use muxd_smp::keys::X25519SecretKey;

#[derive(Debug, Parser)]
#[command(name = "grp-relay", version, about = "The reference GRP/1 relay")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve (the default).
    Run,
    /// Create the static key file if it is missing and print the relay's addresses.
    Init,
    /// Print the default configuration file.
    GenConfig,
}

#[derive(Debug, Args)]
struct Opts {
    /// TOML configuration file.
    #[arg(long, short, global = true, env = "GRP_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Static key file (overrides the config).
    #[arg(long, global = true)]
    key_file: Option<PathBuf>,
    /// TCP listen address.
    #[arg(long, global = true)]
    listen_tcp: Option<SocketAddr>,
    /// QUIC (UDP) listen address.
    #[arg(long, global = true)]
    listen_quic: Option<SocketAddr>,
    /// WebSocket listen address.
    #[arg(long, global = true)]
    listen_ws: Option<SocketAddr>,
    /// WebSocket-over-TLS listen address (`grp+wss`; see `listen.tls_cert`/`tls_key`).
    #[arg(long, global = true)]
    listen_wss: Option<SocketAddr>,
    /// Disable the QUIC listener.
    #[arg(long, global = true)]
    no_quic: bool,
    /// Disable the WebSocket listener.
    #[arg(long, global = true)]
    no_ws: bool,
    /// Disable the WebSocket-over-TLS listener.
    #[arg(long, global = true)]
    no_wss: bool,
    /// Allow relay links from this relay key (base64url); repeatable.
    #[arg(long = "allow-relay", global = true)]
    allow_relays: Vec<String>,
    /// Host name to print in addresses.
    #[arg(long, global = true)]
    public_host: Option<String>,
    /// Write the relay's counters to this file (rewritten every 200 ms and at shutdown):
    /// one `name value` line each, queue ids and peers in base64url/text.
    #[arg(long, global = true)]
    stats_file: Option<PathBuf>,
}

impl Opts {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(k) = &self.key_file {
            c.key_file.clone_from(k);
        }
        if let Some(a) = self.listen_tcp {
            c.listen.tcp = Some(a);
        }
        if let Some(a) = self.listen_quic {
            c.listen.quic = Some(a);
        }
        if let Some(a) = self.listen_ws {
            c.listen.ws = Some(a);
        }
        if let Some(a) = self.listen_wss {
            c.listen.wss = Some(a);
        }
        if self.no_quic {
            c.listen.quic = None;
        }
        if self.no_ws {
            c.listen.ws = None;
        }
        if self.no_wss {
            c.listen.wss = None;
        }
        c.allow_relays.extend(self.allow_relays.iter().cloned());
        if self.public_host.is_some() {
            c.public_host.clone_from(&self.public_host);
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::GenConfig => {
            print_out(&Config::default_toml());
            Ok(())
        }
        Cmd::Init => {
            let c = cli.opts.config()?;
            let (key, created) = load_or_create_key(&c.key_file)?;
            let public = X25519SecretKey::from_bytes(*key).public_key();
            if created {
                tracing::info!(file = %c.key_file.display(), "static key created (mode 0600)");
            }
            print_out(&format!("key {}\n", URL_SAFE.encode(public.as_bytes())));
            Ok(())
        }
        Cmd::Run => {
            let c = cli.opts.config()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(run(c, cli.opts.stats_file))
        }
    }
}

async fn run(config: Config, stats_file: Option<PathBuf>) -> anyhow::Result<()> {
    let relay = Relay::start(config).await.context("starting the relay")?;
    for url in relay.urls() {
        print_out(&format!("{url}\n"));
        tracing::info!(%url, "listening");
    }
    let counters = relay.counters();
    let writer = stats_file.clone().map(|path| {
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                write_stats(&path, &counters.snapshot());
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    });
    wait_for_signal().await?;
    tracing::info!("shutting down: goodbye to every link");
    relay.shutdown().await;
    if let Some(w) = writer {
        w.abort();
    }
    if let Some(path) = &stats_file {
        write_stats(path, &counters.snapshot());
    }
    Ok(())
}

/// Writes the counters as `name value` lines, atomically (temp file + rename), so a reader
/// never sees half a file. Failures are logged, not fatal: statistics are not service.
fn write_stats(path: &std::path::Path, s: &grp_relay::stats::Snapshot) {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (name, v) in [
        ("accepted_tcp", s.accepted_tcp),
        ("accepted_quic", s.accepted_quic),
        ("accepted_ws", s.accepted_ws),
        ("accepted_wss", s.accepted_wss),
        ("client_links", s.client_links),
        ("relay_links_in", s.relay_links_in),
        ("relay_links_out", s.relay_links_out),
        ("relay_links_renewed", s.relay_links_renewed),
        ("handshake_failures", s.handshake_failures),
        ("cover_sent", s.cover_sent),
        ("real_sent", s.real_sent),
        ("cover_received", s.cover_received),
        ("real_received", s.real_received),
        ("pfwd", s.pfwd),
        ("rfwd_sent", s.rfwd_sent),
        ("rfwd_received", s.rfwd_received),
        ("rres_sent", s.rres_sent),
    ] {
        let _ = writeln!(out, "{name} {v}");
    }
    for (tag, n) in &s.commands {
        let _ = writeln!(out, "command.{tag} {n}");
    }
    for id in &s.client_queue_ids {
        let _ = writeln!(out, "client_queue_id {}", URL_SAFE.encode(id));
    }
    for id in &s.relay_queue_ids {
        let _ = writeln!(out, "relay_queue_id {}", URL_SAFE.encode(id));
    }
    for p in &s.client_peers {
        let _ = writeln!(out, "client_peer {p}");
    }
    for p in &s.relay_peers {
        let _ = writeln!(out, "relay_peer {p}");
    }
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, out).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::warn!(file = %path.display(), error = %e, "could not write the stats file");
    }
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("SIGINT handler")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("SIGINT handler")
}

/// Printing the addresses and the config is this binary's output.
#[allow(clippy::print_stdout)]
fn print_out(s: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}
