//! `muxctl`: inspect and control a running muxd daemon over its IPC socket.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use muxd_ipc_client::{Client, ClientError};
use muxd_ipc_proto::{
    Event, LagSummary, Op, Reply, StatusReport, UpstreamStatus, default_socket_path,
};
use serde::Serialize;

mod top;

/// How long to wait for the daemon's hello before giving up: a live daemon answers at once,
/// so a long wait means something else holds the socket.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `shutdown` waits for the daemon to close the connection after agreeing to stop.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// The application name muxctl announces in its hello unless `--app` says otherwise.
const DEFAULT_APP: &str = "muxctl";

/// How long one `recv` long-poll waits at the daemon before asking again.
const RECV_POLL_MS: u64 = 5_000;

/// Inspect and control the muxd daemon.
#[derive(Debug, Parser)]
#[command(name = "muxctl", version)]
#[deny(missing_docs)]
struct Cli {
    /// Path of the daemon's IPC socket [default: $XDG_RUNTIME_DIR/muxd/muxd.sock]
    ///
    /// When XDG_RUNTIME_DIR is unset the default is <tmp>/muxd-<uid>/muxd.sock.
    #[arg(long, global = true, env = "MUXD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Print JSON (one object per line) instead of text
    #[arg(long, global = true)]
    json: bool,

    /// The application name to act as; queues belong to the app that created them
    #[arg(long, global = true, env = "MUXD_APP", value_name = "NAME", default_value = DEFAULT_APP)]
    app: String,

    /// What to do
    #[command(subcommand)]
    command: Command,
}

/// `muxctl queue …`.
#[derive(Debug, Subcommand)]
#[deny(missing_docs)]
enum QueueCommand {
    /// Create a queue on an SMP server or GRP relay and print its id and the URI to give a sender
    Create {
        /// The server address: smp://<keyHash>@host[:port], or a GRP relay:
        /// grp[+quic|+ws]://<key>@host[:port]
        server: String,
        /// Reach the server over WebSocket instead of plain TLS
        #[arg(long)]
        ws: bool,
    },
    /// List this app's queues
    List,
    /// Delete one of this app's queues on its server
    Delete {
        /// The queue id printed by `queue create` (it may begin with `-`)
        #[arg(allow_hyphen_values = true)]
        queue_id: String,
    },
}

/// `muxctl message …`.
#[derive(Debug, Subcommand)]
#[deny(missing_docs)]
enum MessageCommand {
    /// Show where a sent message is: queued, sending, sent or failed (and why)
    Status {
        /// The message id printed by `send`
        message_id: String,
    },
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[deny(missing_docs)]
enum Command {
    /// Show the daemon's version, uptime, clients and upstream connections
    Status,
    /// Measure IPC round trips to the daemon, like ping(8)
    Ping {
        /// Stop after this many round trips [default: until interrupted]
        #[arg(short = 'c', long, value_name = "N")]
        count: Option<u64>,
        /// Seconds to wait between round trips
        #[arg(short = 'i', long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// Bytes of payload the daemon echoes back
        #[arg(short = 's', long, value_name = "BYTES", default_value_t = 0)]
        size: usize,
    },
    /// Print daemon events as they arrive, one per line, until the daemon shuts down
    Watch {
        /// Ask for a status event at least this often, in seconds [default: the daemon's]
        #[arg(short = 'i', long, value_name = "SECONDS")]
        interval: Option<f64>,
    },
    /// Ask the daemon to shut down gracefully and wait until it has closed the connection
    Shutdown,
    /// Create, list and delete this app's receiving queues
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Send a message to a queue URI (securing the queue on first use)
    ///
    /// Prints `queued <id>` as soon as the daemon has stored the message durably; it goes out,
    /// in order, whenever the server is reachable (`muxctl message status <id>`, or a `message`
    /// event in `muxctl watch`, tells the outcome). With --wait, prints `sent <id>` once the
    /// server has accepted it.
    Send {
        /// The recipient's queue URI (smp://…/<senderId>#/?v=…&dh=…)
        queue_uri: String,
        /// The message text (or use --file); it may begin with `-`
        #[arg(
            required_unless_present = "file",
            conflicts_with = "file",
            allow_hyphen_values = true
        )]
        text: Option<String>,
        /// Send the contents of this file instead of TEXT
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Wait until the server has accepted the message (the daemon keeps it queued, and
        /// retries, for as long as the server is unreachable)
        #[arg(long)]
        wait: bool,
    },
    /// Ask about messages sent earlier
    #[command(subcommand)]
    Message(MessageCommand),
    /// Write a sealed backup of the daemon's store to a new file
    ///
    /// The backup is protected like the store (its key file or passphrase). Restore it with
    /// `muxd restore --from FILE` while the daemon is stopped.
    Export {
        /// The backup file to create; it must not exist
        file: PathBuf,
    },
    /// Print messages received on one of this app's queues, acknowledging each once printed
    Recv {
        /// The queue id printed by `queue create` (it may begin with `-`)
        #[arg(allow_hyphen_values = true)]
        queue_id: String,
        /// Keep waiting for new messages until interrupted
        #[arg(short = 'f', long)]
        follow: bool,
        /// Stop after this many messages, waiting for them if needed
        #[arg(short = 'n', long, value_name = "N")]
        count: Option<u64>,
        /// With --count or --follow: give up (exit 1) after this many seconds without a message
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Drop and re-dial upstream connections now, resetting their backoff
    Reconnect {
        /// The server's address as `status` shows it
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        server: Option<String>,
        /// Every server
        #[arg(long)]
        all: bool,
    },
    /// Show a server's round-trip lag: the current summary, or live samples with --watch
    Lag {
        /// The server's address as `status` shows it
        server: String,
        /// Ping the server end to end and print each sample as it comes, like ping(8)
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: seconds between pings
        #[arg(short = 'i', long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// With --watch: stop after this many samples
        #[arg(short = 'c', long, value_name = "N")]
        count: Option<u64>,
    },
    /// Live dashboard of upstream connections: state and lag sparklines; q quits
    Top {
        /// Seconds between refreshes
        #[arg(short = 'i', long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
    },
    /// Print a shell completion script to standard output
    Completions {
        /// The shell to generate completions for
        #[arg(value_enum)]
        shell: Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let explicit_socket = cli.socket.clone();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`muxctl watch | head`): not an error worth reporting.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let line = match e.downcast_ref::<ClientError>() {
                Some(ClientError::NotRunning { path }) => format!(
                    "muxd is not running (no socket at {}); start it with: {}",
                    path.display(),
                    start_hint(explicit_socket.as_deref())
                ),
                _ => format!("{e:#}"),
            };
            // One line, so scripts can show it as is.
            let _ = writeln!(io::stderr(), "muxctl: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// How to start a daemon that listens where muxctl looked. `muxd run` reads `MUXD_SOCKET`
/// too, so only a path given with `--socket` needs repeating.
fn start_hint(socket: Option<&std::path::Path>) -> String {
    let from_env = std::env::var_os("MUXD_SOCKET");
    match socket {
        Some(p) if from_env.as_deref() != Some(p.as_os_str()) => {
            format!("muxd run --socket {}", p.display())
        }
        _ => "muxd run".to_owned(),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions { shell } = cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "muxctl", &mut io::stdout());
        return Ok(());
    }
    let socket = cli.socket.unwrap_or_else(|| {
        default_socket_path(
            std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
            std::env::temp_dir(),
            nix::unistd::geteuid().as_raw(),
        )
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut client = connect(&socket, &cli.app).await?;
        let mut out = Output::new(cli.json);
        match cli.command {
            Command::Status => status(&mut client, &mut out).await,
            Command::Ping {
                count,
                interval,
                size,
            } => ping(&mut client, &mut out, &socket, count, interval, size).await,
            Command::Watch { interval } => watch(client, &mut out, interval).await,
            Command::Shutdown => shutdown(client, &mut out).await,
            Command::Queue(q) => queue(&mut client, &mut out, q).await,
            Command::Send {
                queue_uri,
                text,
                file,
                wait,
            } => send(&mut client, &mut out, queue_uri, text, file, wait).await,
            Command::Message(MessageCommand::Status { message_id }) => {
                message_status(&mut client, &mut out, message_id).await
            }
            Command::Export { file } => export(&mut client, &mut out, &file).await,
            Command::Recv {
                queue_id,
                follow,
                count,
                timeout,
            } => recv(&mut client, &mut out, queue_id, follow, count, timeout).await,
            Command::Reconnect { server, all: _ } => reconnect(&mut client, &mut out, server).await,
            Command::Lag {
                server,
                watch,
                interval,
                count,
            } => lag(client, &mut out, server, watch, interval, count).await,
            Command::Top { interval } => top::run(client, interval).await,
            Command::Completions { .. } => Ok(()),
        }
    })
}

async fn connect(socket: &std::path::Path, app: &str) -> anyhow::Result<Client> {
    match tokio::time::timeout(HELLO_TIMEOUT, Client::connect(socket, app)).await {
        Ok(Ok(c)) => Ok(c),
        // Kept as a ClientError so main can recognise "not running".
        Ok(Err(e @ ClientError::NotRunning { .. })) => Err(e.into()),
        Ok(Err(e)) => {
            Err(anyhow::Error::new(e)
                .context(format!("cannot talk to muxd at {}", socket.display())))
        }
        Err(_) => bail!(
            "no hello from {} within {}s; is it a muxd socket?",
            socket.display(),
            HELLO_TIMEOUT.as_secs()
        ),
    }
}

async fn status(client: &mut Client, out: &mut Output) -> anyhow::Result<()> {
    let report = client.status().await.context("status request failed")?;
    if out.json {
        return out.json_line(&report);
    }
    out.text(&render_status(&report, unix_ms_now()))
}

async fn ping(
    client: &mut Client,
    out: &mut Output,
    socket: &std::path::Path,
    count: Option<u64>,
    interval: f64,
    size: usize,
) -> anyhow::Result<()> {
    if !interval.is_finite() || interval < 0.0 {
        bail!("invalid interval {interval}: must be a number of seconds >= 0");
    }
    let interval = Duration::from_secs_f64(interval);
    let data = "x".repeat(size);
    if !out.json {
        let hello = client.server_hello();
        out.text(&format!(
            "PING muxd {} (pid {}) at {}: {size} data bytes",
            hello.daemon_version,
            hello.pid,
            socket.display()
        ))?;
    }
    let mut stats = RttStats::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seq = 0u64;
    loop {
        if count.is_some_and(|c| seq >= c) {
            break;
        }
        if seq > 0 {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = &mut ctrl_c => break,
            }
        }
        seq += 1;
        let start = Instant::now();
        let echoed = tokio::select! {
            r = client.ping(data.clone()) => r.with_context(|| format!("ping seq={seq} failed"))?,
            _ = &mut ctrl_c => break,
        };
        let rtt = start.elapsed();
        if echoed != data {
            bail!("ping seq={seq}: the daemon echoed different data");
        }
        stats.add(rtt);
        let ms = rtt.as_secs_f64() * 1e3;
        if out.json {
            out.json_line(&PingLine::Reply { seq, time_ms: ms })?;
        } else {
            out.text(&format!("seq={seq} time={ms:.3} ms"))?;
        }
    }
    let s = stats.summary();
    if out.json {
        out.json_line(&PingLine::Summary {
            count: s.count,
            min_ms: s.min_ms,
            avg_ms: s.avg_ms,
            max_ms: s.max_ms,
            mdev_ms: s.mdev_ms,
        })
    } else {
        out.text(&format!(
            "\n--- muxd ping statistics ---\n{} round trips\nrtt min/avg/max/mdev = {:.3}/{:.3}/{:.3}/{:.3} ms",
            s.count, s.min_ms, s.avg_ms, s.max_ms, s.mdev_ms
        ))
    }
}

async fn watch(mut client: Client, out: &mut Output, interval: Option<f64>) -> anyhow::Result<()> {
    let interval_ms = match interval {
        Some(s) if s.is_finite() && s > 0.0 => Some((s * 1e3).round() as u64),
        Some(s) => bail!("invalid interval {s}: must be a positive number of seconds"),
        None => None,
    };
    client
        .watch(interval_ms)
        .await
        .context("watch request failed")?;
    // Ends with Ok(None) when the daemon closes the connection (it shuts down).
    while let Some(ev) = client.next_event().await.context("watching failed")? {
        if out.json {
            out.json_line(&ev)?;
        } else {
            out.text(&render_event(&ev))?;
        }
    }
    Ok(())
}

async fn shutdown(mut client: Client, out: &mut Output) -> anyhow::Result<()> {
    match client.shutdown().await {
        Ok(()) => {}
        // The daemon may close the connection right after its `shutting_down` event without the
        // response getting through; the event says the same thing.
        Err(ClientError::Closed) if saw_shutting_down(&mut client).await => {}
        Err(e) => return Err(anyhow::Error::new(e).context("shutdown request failed")),
    }
    // Wait for the daemon to hang up so a script can rely on it having stopped serving.
    let closed = tokio::time::timeout(SHUTDOWN_WAIT, async {
        while let Ok(Some(_)) = client.next_event().await {}
    })
    .await
    .is_ok();
    if out.json {
        out.json_line(&ShutdownLine {
            shutting_down: true,
            closed,
        })
    } else if closed {
        out.text("muxd shut down")
    } else {
        out.text("muxd is shutting down (still draining)")
    }
}

async fn queue(client: &mut Client, out: &mut Output, cmd: QueueCommand) -> anyhow::Result<()> {
    match cmd {
        QueueCommand::Create { server, ws } => {
            let q = client
                .queue_create(server.clone(), ws)
                .await
                .with_context(|| format!("cannot create a queue on {server}"))?;
            if out.json {
                out.json_line(&q)
            } else {
                out.text(&format!(
                    "queue id:  {}\nqueue uri: {}",
                    q.queue_id, q.queue_uri
                ))
            }
        }
        QueueCommand::List => {
            let queues = client.queue_list().await.context("queue list failed")?;
            if out.json {
                return out.json_line(&queues);
            }
            if queues.is_empty() {
                return out.text("no queues");
            }
            let mut text = format!(
                "{:<34} {:>7} {:>6}  {}",
                "QUEUE ID", "WAITING", "DUPS", "SERVER"
            );
            for q in &queues {
                text.push_str(&format!(
                    "\n{:<34} {:>7} {:>6}  {}",
                    q.queue_id, q.waiting, q.duplicates_suppressed, q.server
                ));
            }
            out.text(&text)
        }
        QueueCommand::Delete { queue_id } => {
            client
                .queue_delete(queue_id.clone())
                .await
                .with_context(|| format!("cannot delete queue {queue_id}"))?;
            if out.json {
                out.json_line(&serde_json::json!({ "deleted": queue_id }))
            } else {
                out.text(&format!("deleted {queue_id}"))
            }
        }
    }
}

async fn send(
    client: &mut Client,
    out: &mut Output,
    queue_uri: String,
    text: Option<String>,
    file: Option<PathBuf>,
    wait: bool,
) -> anyhow::Result<()> {
    let body = match (text, file) {
        (Some(t), _) => t.into_bytes(),
        (None, Some(f)) => {
            std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?
        }
        (None, None) => bail!("nothing to send: give TEXT or --file"),
    };
    let (message_id, state) = if wait {
        client.send_wait(queue_uri, &body).await
    } else {
        client.send(queue_uri, &body).await
    }
    .context("send failed")?;
    if out.json {
        out.json_line(&serde_json::json!({ "message_id": message_id, "state": state }))
    } else {
        out.text(&format!("{state} {message_id}"))
    }
}

async fn message_status(
    client: &mut Client,
    out: &mut Output,
    message_id: String,
) -> anyhow::Result<()> {
    let st = client
        .message_status(message_id.clone())
        .await
        .with_context(|| format!("cannot get the status of message {message_id}"))?;
    if out.json {
        out.json_line(&serde_json::json!({
            "message_id": st.message_id,
            "state": st.state,
            "error": st.error,
        }))
    } else {
        out.text(&render_message_state(
            &st.message_id,
            &st.state,
            st.error.as_deref(),
        ))
    }
}

/// `<state> <id>` like `send` prints, with the error quoted after it.
fn render_message_state(message_id: &str, state: &str, error: Option<&str>) -> String {
    match error {
        Some(e) => format!("{state} {message_id} error=\"{e}\""),
        None => format!("{state} {message_id}"),
    }
}

async fn export(
    client: &mut Client,
    out: &mut Output,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let written = client
        .export(file)
        .await
        .with_context(|| format!("export to {} failed", file.display()))?;
    if out.json {
        out.json_line(&serde_json::json!({ "exported": written }))
    } else {
        out.text(&format!("exported the store to {}", written.display()))
    }
}

async fn recv(
    client: &mut Client,
    out: &mut Output,
    queue_id: String,
    follow: bool,
    count: Option<u64>,
    timeout: Option<f64>,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let timeout = match timeout {
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => bail!("invalid timeout {s}: must be a positive number of seconds"),
        None => None,
    };
    // Without --follow or --count: what is waiting now, then exit.
    let waits = follow || count.is_some();
    let mut received = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let max = count.map(|c| u32::try_from(c - received).unwrap_or(u32::MAX));
        let wait_ms = waits.then_some(RECV_POLL_MS);
        let messages = client
            .recv(queue_id.clone(), max, wait_ms)
            .await
            .with_context(|| format!("recv on queue {queue_id} failed"))?;
        if !messages.is_empty() {
            last_progress = Instant::now();
        }
        for m in messages {
            let body = base64::engine::general_purpose::STANDARD
                .decode(&m.body_b64)
                .context("the daemon sent a body that is not base64")?;
            if out.json {
                out.json_line(&serde_json::json!({
                    "queue_id": m.queue_id,
                    "msg_id": m.msg_id,
                    "ts": m.ts,
                    "body": String::from_utf8_lossy(&body),
                    "body_b64": m.body_b64,
                }))?;
            } else {
                out.text(&String::from_utf8_lossy(&body))?;
            }
            // Acknowledge only once the message has been written out.
            client
                .ack(m.queue_id.clone(), m.msg_id.clone())
                .await
                .with_context(|| format!("ack of {} failed", m.msg_id))?;
            received += 1;
        }
        if count.is_some_and(|c| received >= c) || !waits {
            return Ok(());
        }
        if timeout.is_some_and(|t| last_progress.elapsed() >= t) {
            bail!("timed out after {received} messages");
        }
    }
}

async fn reconnect(
    client: &mut Client,
    out: &mut Output,
    server: Option<String>,
) -> anyhow::Result<()> {
    match client
        .request(Op::Reconnect {
            server: server.clone(),
        })
        .await
    {
        Ok(Reply::Done) => {}
        Ok(other) => bail!("unexpected reply to reconnect: {other:?}"),
        Err(e) => return Err(anyhow::Error::new(e).context("reconnect failed")),
    }
    let what = server.unwrap_or_else(|| "all servers".into());
    if out.json {
        out.json_line(&serde_json::json!({ "reconnecting": what }))
    } else {
        out.text(&format!("reconnecting {what}"))
    }
}

async fn lag(
    mut client: Client,
    out: &mut Output,
    server: String,
    watch: bool,
    interval: f64,
    count: Option<u64>,
) -> anyhow::Result<()> {
    if !watch {
        let report = client.status().await.context("status request failed")?;
        let Some(u) = report.upstreams.iter().find(|u| u.server == server) else {
            bail!("no upstream connection to {server} (see `muxctl status`)");
        };
        if out.json {
            return out.json_line(&serde_json::json!({
                "server": u.server,
                "rtt_last_us": u.rtt_last_us,
                "lag": u.lag,
            }));
        }
        return out.text(&render_lag_summary(&u.server, u.lag.as_ref()));
    }
    if !interval.is_finite() || interval <= 0.0 {
        bail!("invalid interval {interval}: must be a positive number of seconds");
    }
    let interval_ms = Some((interval * 1e3).round().max(1.0) as u64);
    match client
        .request(Op::Lag {
            server: server.clone(),
            interval_ms,
        })
        .await
    {
        Ok(Reply::Watching) => {}
        Ok(other) => bail!("unexpected reply to lag: {other:?}"),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("lag on {server} failed"))),
    }
    if !out.json {
        out.text(&format!(
            "LAG {server}: one end-to-end ping every {interval} s"
        ))?;
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seq = 0u64;
    let mut last: Option<LagSummary> = None;
    while count.is_none_or(|c| seq < c) {
        let ev = tokio::select! {
            ev = client.next_event() => ev.context("lag stream failed")?,
            _ = &mut ctrl_c => break,
        };
        let Some(ev) = ev else { break };
        let Event::Lag(sample) = ev else { continue };
        if sample.server != server {
            continue;
        }
        seq += 1;
        if out.json {
            out.json_line(&sample)?;
        } else {
            out.text(&format!(
                "seq={seq} source={} time={:.3} ms",
                sample.source,
                sample.rtt_us as f64 / 1e3
            ))?;
        }
        last = Some(sample.summary);
    }
    if !out.json {
        out.text(&format!("\n{}", render_lag_summary(&server, last.as_ref())))?;
    }
    Ok(())
}

/// The ping(8)-like summary of a lag history.
fn render_lag_summary(server: &str, lag: Option<&LagSummary>) -> String {
    let ms = |us: u64| us as f64 / 1e3;
    match lag {
        Some(l) if l.count > 0 => format!(
            "--- {server} lag statistics ---\n{} samples\nrtt min/p50/p95/max/mean/jitter = {:.3}/{:.3}/{:.3}/{:.3}/{:.3}/{:.3} ms",
            l.count,
            ms(l.min_us),
            ms(l.p50_us),
            ms(l.p95_us),
            ms(l.max_us),
            ms(l.mean_us),
            ms(l.jitter_us)
        ),
        _ => format!("--- {server} lag statistics ---\nno samples yet"),
    }
}

/// Whether a `shutting_down` event is among the events still queued on a closed connection.
async fn saw_shutting_down(client: &mut Client) -> bool {
    while let Ok(Some(ev)) = client.next_event().await {
        if matches!(ev, Event::ShuttingDown { .. }) {
            return true;
        }
    }
    false
}

/// Writes to stdout, surfacing errors (a closed pipe in particular) instead of panicking
/// as `println!` would.
#[derive(Debug)]
struct Output {
    json: bool,
    stdout: io::Stdout,
}

impl Output {
    fn new(json: bool) -> Self {
        Self {
            json,
            stdout: io::stdout(),
        }
    }

    fn text(&mut self, s: &str) -> anyhow::Result<()> {
        let mut lock = self.stdout.lock();
        writeln!(lock, "{s}")?;
        lock.flush()?;
        Ok(())
    }

    fn json_line<T: Serialize>(&mut self, v: &T) -> anyhow::Result<()> {
        let s = serde_json::to_string(v).context("cannot encode JSON output")?;
        self.text(&s)
    }
}

/// `ping --json` output lines.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum PingLine {
    Reply {
        seq: u64,
        time_ms: f64,
    },
    Summary {
        count: u64,
        min_ms: f64,
        avg_ms: f64,
        max_ms: f64,
        mdev_ms: f64,
    },
}

/// `shutdown --json` output.
#[derive(Debug, Serialize)]
struct ShutdownLine {
    shutting_down: bool,
    closed: bool,
}

/// Round-trip statistics in the manner of ping(8).
#[derive(Debug, Default)]
struct RttStats {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    sum_sq: f64,
}

/// The computed summary, in milliseconds.
#[derive(Debug, PartialEq)]
struct RttSummary {
    count: u64,
    min_ms: f64,
    avg_ms: f64,
    max_ms: f64,
    mdev_ms: f64,
}

impl RttStats {
    fn add(&mut self, rtt: Duration) {
        let ms = rtt.as_secs_f64() * 1e3;
        if self.count == 0 || ms < self.min {
            self.min = ms;
        }
        if ms > self.max {
            self.max = ms;
        }
        self.count += 1;
        self.sum += ms;
        self.sum_sq += ms * ms;
    }

    fn summary(&self) -> RttSummary {
        if self.count == 0 {
            return RttSummary {
                count: 0,
                min_ms: 0.0,
                avg_ms: 0.0,
                max_ms: 0.0,
                mdev_ms: 0.0,
            };
        }
        let n = self.count as f64;
        let avg = self.sum / n;
        // ping(8)'s mdev: the standard deviation, sqrt(E[x²] - E[x]²); rounding can push
        // the difference just below zero.
        let var = (self.sum_sq / n - avg * avg).max(0.0);
        RttSummary {
            count: self.count,
            min_ms: self.min,
            avg_ms: avg,
            max_ms: self.max,
            mdev_ms: var.sqrt(),
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `1h02m03s`-style durations, coarse enough to read at a glance.
fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

fn since(up: &UpstreamStatus, now_ms: u64) -> String {
    if up.state_since_unix_ms == 0 || up.state_since_unix_ms > now_ms {
        return "-".into();
    }
    format!("{} ago", human_duration(now_ms - up.state_since_unix_ms))
}

/// `last/p50/p95` in milliseconds, or `-` before the first sample.
fn rtt_cell(u: &UpstreamStatus) -> String {
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);
    match (&u.lag, u.rtt_last_us) {
        (Some(l), Some(last)) if l.count > 0 => {
            format!("{}/{}/{} ms", ms(last), ms(l.p50_us), ms(l.p95_us))
        }
        _ => "-".into(),
    }
}

fn render_status(r: &StatusReport, now_ms: u64) -> String {
    let mut s = format!(
        "daemon:   muxd {}\npid:      {}\nuptime:   {}\nclients:  {}\n\n",
        r.daemon_version,
        r.pid,
        human_duration(r.uptime_ms),
        r.clients
    );
    if r.upstreams.is_empty() {
        s.push_str("no upstream connections");
        return s;
    }
    let header = [
        "SERVER",
        "PROFILE",
        "TRANSPORT",
        "STATE",
        "SINCE",
        "RTT LAST/P50/P95",
        "ATTEMPT",
        "RETRY IN",
        "QUEUES",
        "PENDING",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 11]> = r
        .upstreams
        .iter()
        .map(|u| {
            [
                u.server.clone(),
                u.profile.clone(),
                u.transport.clone(),
                u.state.clone(),
                since(u, now_ms),
                rtt_cell(u),
                u.attempt.to_string(),
                u.next_retry_ms
                    .map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1e3)),
                u.queues.to_string(),
                u.pending.to_string(),
                u.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                // No padding after the last column.
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    // GRP links: cover and real records (cover hides real traffic, GRP §12).
    let grp: Vec<String> = r.upstreams.iter().filter_map(grp_line).collect();
    if !grp.is_empty() {
        s.push_str("\nGRP:\n");
        for l in grp {
            s.push_str(&l);
            s.push('\n');
        }
    }
    s.pop();
    s
}

/// One line of GRP facts for an upstream, or `None` for SMP.
fn grp_line(u: &UpstreamStatus) -> Option<String> {
    let g = u.grp.as_ref()?;
    Some(match &g.proxy {
        Some(p) => format!("  {} ({}): via proxy {p}", u.server, u.transport),
        None => format!(
            "  {} ({}): cover rate {}, records sent real={} cover={}, received real={} cover={}",
            u.server,
            u.transport,
            g.cover_rate
                .map_or_else(|| "-".into(), |r| format!("{:.2}/s", f64::from(r) / 1e3)),
            g.real_sent,
            g.cover_sent,
            g.real_received,
            g.cover_received
        ),
    })
}

fn render_event(ev: &Event) -> String {
    match ev {
        Event::Status(r) => {
            let mut states: Vec<(&str, usize)> = Vec::new();
            for u in &r.upstreams {
                match states.iter_mut().find(|(s, _)| *s == u.state) {
                    Some((_, n)) => *n += 1,
                    None => states.push((&u.state, 1)),
                }
            }
            states.sort_unstable();
            let mut line = format!(
                "status uptime={} clients={} upstreams={}",
                human_duration(r.uptime_ms),
                r.clients,
                r.upstreams.len()
            );
            for (state, n) in states {
                line.push_str(&format!(" {state}={n}"));
            }
            line
        }
        Event::ShuttingDown { reason } => format!("shutting_down reason={reason}"),
        Event::Upstream(u) => format!(
            "upstream {} state={} attempt={}{}",
            u.server,
            u.state,
            u.attempt,
            u.last_error
                .as_deref()
                .map_or_else(String::new, |e| format!(" error=\"{e}\""))
        ),
        Event::Lag(l) => format!(
            "lag {} source={} time={:.3} ms",
            l.server,
            l.source,
            l.rtt_us as f64 / 1e3
        ),
        Event::Message(m) => format!(
            "message {}",
            render_message_state(&m.message_id, &m.state, m.error.as_deref())
        ),
        // A newer daemon may send events this muxctl does not know by name.
        other => format!("event {other:?}"),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_and_text_may_begin_with_a_hyphen() {
        // Queue ids are base64url and begin with '-' one time in 64.
        let cli = Cli::try_parse_from(["muxctl", "recv", "-i4Lx9", "--count", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Recv { ref queue_id, count: Some(2), .. } if queue_id == "-i4Lx9"
        ));
        let cli = Cli::try_parse_from(["muxctl", "queue", "delete", "-abc"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Queue(QueueCommand::Delete { ref queue_id }) if queue_id == "-abc"
        ));
        let cli =
            Cli::try_parse_from(["muxctl", "send", "smp://k@h/s#/?v=2-4", "-1 degrees"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Send { text: Some(ref t), .. } if t == "-1 degrees"
        ));
    }

    use super::*;

    #[test]
    fn store_commands_parse() {
        let cli = Cli::try_parse_from(["muxctl", "send", "--wait", "smp://q", "hi"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Send { wait: true, text: Some(ref t), .. } if t == "hi"
        ));
        let cli = Cli::try_parse_from(["muxctl", "send", "smp://q", "hi"]).unwrap();
        assert!(matches!(cli.command, Command::Send { wait: false, .. }));
        let cli = Cli::try_parse_from(["muxctl", "--json", "message", "status", "42"]).unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Message(MessageCommand::Status { ref message_id }) if message_id == "42"
        ));
        let cli = Cli::try_parse_from(["muxctl", "export", "b.muxd"]).unwrap();
        assert!(
            matches!(cli.command, Command::Export { ref file } if file == std::path::Path::new("b.muxd"))
        );
        assert!(Cli::try_parse_from(["muxctl", "export"]).is_err());
        assert!(Cli::try_parse_from(["muxctl", "message", "status"]).is_err());
    }

    #[test]
    fn message_events_and_states_render() {
        let ev = Event::Message(muxd_ipc_proto::MessageEvent {
            message_id: "7".into(),
            state: "failed".into(),
            error: Some("expired after 7d".into()),
        });
        assert_eq!(
            render_event(&ev),
            "message failed 7 error=\"expired after 7d\""
        );
        assert_eq!(render_message_state("8", "sent", None), "sent 8");
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mdev_matches_ping8() {
        let mut s = RttStats::default();
        for ms in [1u64, 2, 3, 4] {
            s.add(Duration::from_millis(ms));
        }
        let sum = s.summary();
        assert_eq!(sum.count, 4);
        assert!((sum.min_ms - 1.0).abs() < 1e-9);
        assert!((sum.max_ms - 4.0).abs() < 1e-9);
        assert!((sum.avg_ms - 2.5).abs() < 1e-9);
        // population standard deviation of 1,2,3,4 = sqrt(1.25)
        assert!((sum.mdev_ms - 1.25f64.sqrt()).abs() < 1e-9);
        assert_eq!(RttStats::default().summary().count, 0);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(999), "0s");
        assert_eq!(human_duration(61_000), "1m01s");
        assert_eq!(human_duration(3_723_000), "1h02m03s");
        assert_eq!(human_duration(90_061_000), "1d01h01m");
    }

    fn report(upstreams: Vec<UpstreamStatus>) -> StatusReport {
        StatusReport {
            daemon_version: "0.1.0".into(),
            pid: 77,
            uptime_ms: 61_000,
            clients: 2,
            upstreams,
        }
    }

    #[test]
    fn empty_status_says_so() {
        let s = render_status(&report(vec![]), 0);
        assert_eq!(
            s,
            "daemon:   muxd 0.1.0\npid:      77\nuptime:   1m01s\nclients:  2\n\nno upstream connections"
        );
    }

    #[test]
    fn status_table_aligns_columns() {
        let ups = vec![
            UpstreamStatus {
                server: "smp://k@a.example:5223".into(),
                profile: "smp".into(),
                transport: "tls".into(),
                state: "up".into(),
                state_since_unix_ms: 1_000_000,
                last_error: None,
                queues: 3,
                pending: 1,
                rtt_last_us: Some(1_500),
                lag: Some(LagSummary {
                    count: 3,
                    min_us: 900,
                    p50_us: 1_200,
                    p95_us: 2_250,
                    max_us: 2_250,
                    mean_us: 1_450,
                    jitter_us: 700,
                }),
                ..UpstreamStatus::default()
            },
            UpstreamStatus {
                server: "smp://k@b:443".into(),
                profile: "smp".into(),
                transport: "websocket".into(),
                state: "backing_off".into(),
                state_since_unix_ms: 1_055_000,
                last_error: Some("connection refused".into()),
                queues: 0,
                attempt: 4,
                next_retry_ms: Some(3_250),
                ..UpstreamStatus::default()
            },
        ];
        let s = render_status(&report(ups), 1_060_000);
        let lines: Vec<&str> = s.lines().skip(5).collect();
        assert_eq!(
            lines,
            [
                "SERVER                  PROFILE  TRANSPORT  STATE        SINCE      RTT LAST/P50/P95  ATTEMPT  RETRY IN  QUEUES  PENDING  LAST ERROR",
                "smp://k@a.example:5223  smp      tls        up           1m00s ago  1.5/1.2/2.2 ms    0        -         3       1        -",
                "smp://k@b:443           smp      websocket  backing_off  5s ago     -                 4        3.2s      0       0        connection refused",
            ]
        );
    }
}
