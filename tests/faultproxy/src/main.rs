//! `faultproxy`: forward TCP connections to an upstream with injectable faults, for manual
//! fault testing of muxd on loopback.
//!
//! Faults can be changed while it runs by typing commands on stdin (`help` lists them).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use muxd_faultproxy::{FaultProxy, ProxyHandle};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Forward TCP connections to an upstream with injectable faults (delay, blackhole, reset).
#[derive(Debug, Parser)]
#[command(version)]
#[deny(missing_docs)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, default_value = "127.0.0.1:0", env = "FAULTPROXY_LISTEN")]
    listen: SocketAddr,
    /// Address every connection is forwarded to, e.g. the dev relay's 127.0.0.1:5223.
    #[arg(long, env = "FAULTPROXY_UPSTREAM")]
    upstream: SocketAddr,
    /// One-way delay added in each direction, in milliseconds.
    #[arg(long, default_value_t = 0, env = "FAULTPROXY_DELAY_MS")]
    delay_ms: u64,
    /// Start with the blackhole on.
    #[arg(long)]
    blackhole: bool,
}

const HELP: &str =
    "commands: delay <ms> | blackhole on|off | reset | pause on|off | refuse on|off | stats | quit";

#[allow(clippy::print_stdout)] // printing the address and stats is the point of the CLI
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let proxy = FaultProxy::start(args.listen, args.upstream)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let handle = proxy.handle();
    handle.set_delay(Duration::from_millis(args.delay_ms));
    handle.blackhole(args.blackhole);
    println!("listening on {} -> {}", proxy.local_addr(), args.upstream);
    println!("{HELP}");

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("wait for Ctrl-C")?;
                break;
            }
            line = lines.next_line() => {
                // EOF on stdin (e.g. run in the background) keeps serving until Ctrl-C.
                let Some(line) = line.context("read stdin")? else {
                    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
                    break;
                };
                match command(&handle, line.trim()) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(msg) => println!("{msg}\n{HELP}"),
                }
            }
        }
    }
    proxy.shutdown().await;
    Ok(())
}

/// Applies one stdin command; `Ok(true)` means quit.
#[allow(clippy::print_stdout)]
fn command(handle: &ProxyHandle, line: &str) -> Result<bool, String> {
    let mut words = line.split_whitespace();
    let on_off = |w: Option<&str>| match w {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        other => Err(format!("expected on|off, got {other:?}")),
    };
    match words.next() {
        None => {}
        Some("delay") => {
            let ms: u64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or("delay needs milliseconds")?;
            handle.set_delay(Duration::from_millis(ms));
        }
        Some("blackhole") => handle.blackhole(on_off(words.next())?),
        Some("reset") => handle.reset_all(),
        Some("pause") => handle.pause_accept(on_off(words.next())?),
        Some("refuse") => handle.refuse_new(on_off(words.next())?),
        Some("stats") => println!("{:?}", handle.counters()),
        Some("quit" | "exit") => return Ok(true),
        Some("help") => println!("{HELP}"),
        Some(other) => return Err(format!("unknown command {other:?}")),
    }
    Ok(false)
}
