//! Upstream sockets: one tokio task per server connection that only connects and moves blocks.
//!
//! The pool (`muxd_core::Pool`, driven by `driver.rs`) decides when to connect, what to write
//! and when to close; a task here dials (DNS, TCP with keep-alive, TLS pinned to the keyHash,
//! optionally WebSocket), then copies 16384-byte blocks between the socket and the driver. It
//! reports `connected`, every block read, and `disconnected(reason)` back over one bounded
//! channel shared by all tasks. While connected it also samples the kernel's TCP round-trip
//! estimate every few seconds for the server's lag history.
//!
//! The driver never awaits a socket (STYLE practice 2): [`Upstreams::execute`] hands a block
//! to the task's bounded channel with `try_send`, and a block the channel refuses is kept in
//! that server's backlog and offered again once [`Upstreams::poll_writable`] sees room, in
//! order (quinn's `drive_transmit`). A slow server therefore only grows its own backlog, and
//! only up to [`UpstreamOptions::max_backlog_blocks`]: a server that keeps sending but stops
//! reading is then cut off, and the pool hears `disconnected("write backlog full")` through
//! [`Upstreams::poll_local_event`] (it backs off and reconnects as after any loss).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use muxd_core::{Action, ServerKey, TransportInfo};
use muxd_smp::cert::KeyHash;
use muxd_transport::tokio_rustls::client::TlsStream;
use muxd_transport::{
    BLOCK_SIZE, BlockStream, ConnectOptions, TransportError, connect_tls, tcp_rtt,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Blocks the driver may hand one task before that server's backlog starts to grow. A few
/// blocks keep the socket busy; more would only hide a stalled server from the backlog.
const OUTBOUND_BLOCKS: usize = 8;

/// Blocks one server's backlog may hold before the connection is given up (1 MiB).
pub(crate) const DEFAULT_MAX_BACKLOG_BLOCKS: usize = 64;

/// The reason the pool sees when a server's backlog overflowed.
const BACKLOG_FULL: &str = "write backlog full";

/// How long a task spends closing politely (TLS close_notify, WebSocket close) when stopped.
const CLOSE_BUDGET: Duration = Duration::from_secs(1);

/// The SMP port when an address names none (spec §2.1).
pub(crate) const DEFAULT_PORT: u16 = 5223;

/// What a task tells the driver.
#[derive(Debug)]
pub(crate) struct UpstreamEvent {
    /// Which task: events of a task the driver already replaced are stale.
    pub(crate) conn: u64,
    /// The server the task serves.
    pub(crate) server: ServerKey,
    /// What happened.
    pub(crate) kind: UpstreamEventKind,
}

/// The things a task reports.
#[derive(Debug)]
pub(crate) enum UpstreamEventKind {
    /// TLS (and WebSocket) is up; the SMP handshake may start.
    Connected(TransportInfo),
    /// One block read from the server.
    Block(Box<[u8; BLOCK_SIZE]>),
    /// The connection could not be set up, or broke; the task has ended.
    Disconnected(String),
    /// The kernel's smoothed TCP round-trip time of the connection (never zero).
    Rtt(Duration),
    /// A GRP link finished its handshake (`grp_upstream.rs`).
    GrpConnected(muxd_core::GrpSession),
    /// A GRP link's record counters changed.
    GrpCounters(muxd_core::GrpCounters),
}

/// How the tasks dial and watch their sockets.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamOptions {
    /// TCP and TLS settings for every dial.
    pub(crate) connect: ConnectOptions,
    /// How often a connected task reports the kernel's RTT; `None` never.
    pub(crate) rtt_interval: Option<Duration>,
    /// Blocks a server's backlog may hold (beyond the task's channel) before the connection
    /// is dropped as stalled.
    pub(crate) max_backlog_blocks: usize,
    /// GRP link settings.
    pub(crate) grp: crate::grp_upstream::GrpOptions,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            connect: ConnectOptions::default(),
            rtt_interval: None,
            max_backlog_blocks: DEFAULT_MAX_BACKLOG_BLOCKS,
            grp: crate::grp_upstream::GrpOptions::default(),
        }
    }
}

/// The driver's side of every upstream task.
#[derive(Debug)]
pub(crate) struct Upstreams {
    links: BTreeMap<ServerKey, Link>,
    next_conn: u64,
    events: mpsc::Sender<UpstreamEvent>,
    options: UpstreamOptions,
    tracker: TaskTracker,
    /// The daemon's main runtime: socket tasks run there, not on the driver's own thread.
    runtime: tokio::runtime::Handle,
    /// Disconnects decided here (not by a task), for the driver to hand to the pool.
    local_events: VecDeque<UpstreamEvent>,
}

/// One live task.
#[derive(Debug)]
struct Link {
    conn: u64,
    tx: PollSender<Vec<u8>>,
    /// Blocks the channel refused, oldest first; they go out before any newer block.
    backlog: VecDeque<Vec<u8>>,
    cancel: CancellationToken,
}

/// Where and how to dial.
#[derive(Debug, Clone)]
struct Dial {
    host: String,
    port: u16,
    key_hash: KeyHash,
    websocket: bool,
}

impl Upstreams {
    /// Tasks report on `events`; `tracker` lets shutdown wait for them to close.
    /// Must be called inside the runtime the socket tasks are to run on.
    pub(crate) fn new(
        events: mpsc::Sender<UpstreamEvent>,
        tracker: TaskTracker,
        options: UpstreamOptions,
    ) -> Self {
        Self {
            links: BTreeMap::new(),
            next_conn: 1,
            events,
            options,
            tracker,
            runtime: tokio::runtime::Handle::current(),
            local_events: VecDeque::new(),
        }
    }

    /// A disconnect decided here (a backlog overflowed) that the pool has not heard of yet.
    /// The link is already forgotten, so the event needs no [`accept`](Self::accept).
    pub(crate) fn poll_local_event(&mut self) -> Option<UpstreamEvent> {
        self.local_events.pop_front()
    }

    /// Whether `event` comes from the task currently serving its server. A `Disconnected`
    /// from it also forgets the task (it has ended).
    pub(crate) fn accept(&mut self, event: &UpstreamEvent) -> bool {
        let current = self
            .links
            .get(&event.server)
            .is_some_and(|l| l.conn == event.conn);
        if current && matches!(event.kind, UpstreamEventKind::Disconnected(_)) {
            self.links.remove(&event.server);
        }
        current
    }

    /// Carries out one of the pool's socket actions; other actions are ignored.
    pub(crate) fn execute(&mut self, action: Action) {
        match action {
            Action::Connect {
                server,
                host,
                port,
                key_hash,
                websocket,
            } => {
                let dial = Dial {
                    host,
                    port: if port == 0 { DEFAULT_PORT } else { port },
                    key_hash,
                    websocket,
                };
                self.connect(server, dial);
            }
            Action::Transmit { server, block } => self.transmit(&server, block),
            Action::Disconnect { server } => {
                if let Some(link) = self.links.remove(&server) {
                    link.cancel.cancel();
                }
            }
            other => tracing::warn!(?other, "not a socket action"),
        }
    }

    fn connect(&mut self, server: ServerKey, dial: Dial) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_BLOCKS);
        let cancel = CancellationToken::new();
        let span = tracing::debug_span!("upstream", server = %server, conn);
        let task = Task {
            conn,
            server: server.clone(),
            events: self.events.clone(),
        };
        if server.transport().profile() == "grp" {
            let run = crate::grp_upstream::run(
                conn,
                server.clone(),
                self.events.clone(),
                self.options.grp.clone(),
                rx,
                cancel.clone(),
            );
            self.tracker.spawn_on(run.instrument(span), &self.runtime);
        } else {
            self.tracker.spawn_on(
                task.run(dial, self.options.clone(), rx, cancel.clone())
                    .instrument(span),
                &self.runtime,
            );
        }
        let link = Link {
            conn,
            tx: PollSender::new(tx),
            backlog: VecDeque::new(),
            cancel,
        };
        // The pool asks for a new connection only after it forgot the old one; a task still
        // running for the server is stale and is stopped.
        if let Some(old) = self.links.insert(server, link) {
            old.cancel.cancel();
        }
    }

    fn transmit(&mut self, server: &ServerKey, block: Vec<u8>) {
        let Some(link) = self.links.get_mut(server) else {
            // The task ended; its `Disconnected` is on the way to the pool.
            return;
        };
        link.backlog.push_back(block);
        link.flush();
        if link.backlog.len() > self.options.max_backlog_blocks {
            // The server sends but does not read: holding more would only grow memory.
            tracing::warn!(%server, blocks = link.backlog.len(), "upstream not reading; dropping the connection");
            if let Some(link) = self.links.remove(server) {
                link.cancel.cancel();
                self.local_events.push_back(UpstreamEvent {
                    conn: link.conn,
                    server: server.clone(),
                    kind: UpstreamEventKind::Disconnected(BACKLOG_FULL.to_owned()),
                });
            }
        }
    }

    /// Moves backlogged blocks into channels that have room again. Ready when some block
    /// moved (the caller loops back here); pending, with wakers registered, otherwise.
    pub(crate) fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut moved = false;
        for link in self.links.values_mut() {
            let Some(first) = link.backlog.pop_front() else {
                continue;
            };
            match link.tx.poll_reserve(cx) {
                Poll::Ready(Ok(())) => {
                    // A reserved slot cannot refuse the item.
                    let _ = link.tx.send_item(first);
                    link.flush();
                    moved = true;
                }
                Poll::Ready(Err(_)) => {
                    // The task is gone; its `Disconnected` follows.
                    link.backlog.clear();
                }
                Poll::Pending => link.backlog.push_front(first),
            }
        }
        if moved {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether some server has blocks waiting for room.
    pub(crate) fn has_backlog(&self) -> bool {
        self.links.values().any(|l| !l.backlog.is_empty())
    }

    /// Stops every task (they close their sockets politely within [`CLOSE_BUDGET`]).
    pub(crate) fn close_all(&mut self) {
        for (_, link) in std::mem::take(&mut self.links) {
            link.cancel.cancel();
        }
    }
}

impl Link {
    /// Hands over backlogged blocks while the channel takes them.
    fn flush(&mut self) {
        let Some(tx) = self.tx.get_ref() else {
            self.backlog.clear();
            return;
        };
        while let Some(block) = self.backlog.pop_front() {
            match tx.try_send(block) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(block)) => {
                    self.backlog.push_front(block);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }
}

/// What one task knows to report.
struct Task {
    conn: u64,
    server: ServerKey,
    events: mpsc::Sender<UpstreamEvent>,
}

/// One turn of the connected loop.
enum Step {
    Stop,
    Write(Vec<u8>),
    Read(Result<Box<[u8; BLOCK_SIZE]>, TransportError>),
    SampleRtt,
}

impl Task {
    async fn run(
        self,
        dial: Dial,
        options: UpstreamOptions,
        mut outbound: mpsc::Receiver<Vec<u8>>,
        cancel: CancellationToken,
    ) {
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            r = connect(&dial, &options.connect) => r,
        };
        let (mut blocks, info) = match connected {
            Ok(c) => c,
            Err(reason) => {
                tracing::debug!(%reason, "connect failed");
                self.report(UpstreamEventKind::Disconnected(reason)).await;
                return;
            }
        };
        tracing::debug!("transport up");
        if !self.report(UpstreamEventKind::Connected(info)).await {
            return;
        }
        // The first tick is immediate: the handshake already gave the kernel an estimate.
        let mut rtt_timer = options.rtt_interval.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            // Writes first: a reply the pool is waiting for should not queue behind reads.
            // Reading is cancel-safe, so losing the race to a write loses nothing.
            let step = tokio::select! {
                biased;
                () = cancel.cancelled() => Step::Stop,
                b = outbound.recv() => b.map_or(Step::Stop, Step::Write),
                r = blocks.read_block() => Step::Read(r),
                _ = tick(rtt_timer.as_mut()) => Step::SampleRtt,
            };
            match step {
                Step::Stop => break,
                Step::Write(block) => {
                    let written = tokio::select! {
                        // Cutting a write short breaks the stream, but it is being dropped.
                        () = cancel.cancelled() => break,
                        r = blocks.write_block(&block) => r,
                    };
                    if let Err(e) = written {
                        self.report(UpstreamEventKind::Disconnected(e.to_string()))
                            .await;
                        return;
                    }
                }
                Step::Read(Ok(block)) => {
                    if !self.report(UpstreamEventKind::Block(block)).await {
                        break;
                    }
                }
                Step::SampleRtt => self.sample_rtt(&blocks),
                Step::Read(Err(e)) => {
                    tracing::debug!(error = %e, "transport lost");
                    self.report(UpstreamEventKind::Disconnected(loss_reason(&e)))
                        .await;
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(CLOSE_BUDGET, blocks.close()).await;
        tracing::debug!("transport closed");
    }

    /// Reports the kernel's RTT estimate. Lossy on purpose: a sample the full channel cannot
    /// take is dropped rather than holding up the socket.
    fn sample_rtt(&self, blocks: &BlockStream<TlsStream<TcpStream>>) {
        let tcp = blocks.get_ref().get_ref().0;
        match tcp_rtt(tcp) {
            Ok(Some(rtt)) => {
                let event = UpstreamEvent {
                    conn: self.conn,
                    server: self.server.clone(),
                    kind: UpstreamEventKind::Rtt(rtt),
                };
                let _ = self.events.try_send(event);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read TCP_INFO"),
        }
    }

    /// Sends an event to the driver; `false` once the driver is gone.
    async fn report(&self, kind: UpstreamEventKind) -> bool {
        let event = UpstreamEvent {
            conn: self.conn,
            server: self.server.clone(),
            kind,
        };
        self.events.send(event).await.is_ok()
    }
}

/// The next tick of an optional timer; never, without one.
async fn tick(timer: Option<&mut tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The text status shows for a broken connection. rustls reports a peer that vanished (a
/// killed server, a dropped route) as an EOF without close_notify, with a link to its manual;
/// people want the plain fact.
fn loss_reason(e: &TransportError) -> String {
    match e {
        TransportError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "connection closed by peer (no TLS close_notify)".to_owned()
        }
        other => other.to_string(),
    }
}

/// Resolves the host and dials its addresses in turn until one completes TLS (and the
/// WebSocket upgrade when asked). The error is the reason the pool reports.
async fn connect(
    dial: &Dial,
    options: &ConnectOptions,
) -> Result<(BlockStream<TlsStream<TcpStream>>, TransportInfo), String> {
    // `[::1]` in an address is a literal, which the resolver wants without brackets.
    let host = dial.host.trim_start_matches('[').trim_end_matches(']');
    // With no network at all, resolving and dialing would only fail (or hang on DNS); the
    // pool backs off and the network watcher wakes it when an interface comes up. Loopback
    // servers are always dialed.
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && !crate::netwatch::has_network() {
        return Err(format!(
            "no network (no interface is up with an address); not dialing {host} until the \
             network changes"
        ));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, dial.port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} has no addresses");
    for addr in addrs {
        match connect_tls(addr, &dial.key_hash, options).await {
            Ok(tls) => {
                let info = TransportInfo {
                    tls_leaf_key: tls.server_identity().leaf_key().clone(),
                    // rustls does not expose the TLS channel binding.
                    tls_session_id: None,
                };
                let blocks = if dial.websocket {
                    tls.into_websocket().await.map_err(|e| e.to_string())?
                } else {
                    tls.into_blocks()
                };
                return Ok((blocks, info));
            }
            // This address reached a server that is not the one pinned; another address of
            // the same name will not be a better answer.
            Err(e) if e.is_identity() => return Err(e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use muxd_core::{Pool, PoolConfig, PoolRequest, RequestToken};
    use rand_core::SeedableRng as _;

    use super::*;

    /// A server key as the pool makes them (its constructor is the pool's).
    fn server_key() -> ServerKey {
        let mut pool = Pool::new(PoolConfig::default());
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let server = format!("smp://{}=@127.0.0.1", "A".repeat(43));
        let request = PoolRequest::CreateQueue {
            server,
            websocket: false,
        };
        pool.handle_request(Instant::now(), &mut rng, "app", RequestToken(1), request);
        match pool.poll_action() {
            Some(Action::Connect { server, .. }) => server,
            other => panic!("expected a connect, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_blocks_wait_in_order_and_move_when_there_is_room() {
        let (events, _events_rx) = mpsc::channel(1);
        let mut up = Upstreams::new(events, TaskTracker::new(), UpstreamOptions::default());
        let key = server_key();
        let (tx, mut rx) = mpsc::channel(2);
        up.links.insert(
            key.clone(),
            Link {
                conn: 7,
                tx: PollSender::new(tx),
                backlog: VecDeque::new(),
                cancel: CancellationToken::new(),
            },
        );
        for i in 0..5u8 {
            up.execute(Action::Transmit {
                server: key.clone(),
                block: vec![i],
            });
        }
        // Two fit the channel; the driver did not wait for the other three.
        assert!(up.has_backlog());
        let mut got = Vec::new();
        while got.len() < 5 {
            let block = rx.recv().await.unwrap();
            got.push(block[0]);
            if up.has_backlog() {
                std::future::poll_fn(|cx| up.poll_writable(cx)).await;
            }
        }
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert!(!up.has_backlog());

        // Events of a replaced task are stale; a disconnect of the current one forgets it.
        let stale = UpstreamEvent {
            conn: 6,
            server: key.clone(),
            kind: UpstreamEventKind::Disconnected("old".into()),
        };
        assert!(!up.accept(&stale));
        let current = UpstreamEvent {
            conn: 7,
            server: key.clone(),
            kind: UpstreamEventKind::Disconnected("gone".into()),
        };
        assert!(up.accept(&current));
        assert!(!up.accept(&current));
    }

    #[tokio::test]
    async fn a_backlog_over_the_cap_drops_the_link_and_reports_it() {
        let (events, _events_rx) = mpsc::channel(1);
        let options = UpstreamOptions {
            max_backlog_blocks: 3,
            ..UpstreamOptions::default()
        };
        let mut up = Upstreams::new(events, TaskTracker::new(), options);
        let key = server_key();
        // A task that never takes anything: one block fits its channel.
        let (tx, _rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        up.links.insert(
            key.clone(),
            Link {
                conn: 9,
                tx: PollSender::new(tx),
                backlog: VecDeque::new(),
                cancel: cancel.clone(),
            },
        );
        for i in 0..4u8 {
            up.execute(Action::Transmit {
                server: key.clone(),
                block: vec![i],
            });
        }
        // One in the channel, three waiting: at the cap, not over it.
        assert!(up.has_backlog());
        assert!(up.poll_local_event().is_none());
        assert!(!cancel.is_cancelled());
        up.execute(Action::Transmit {
            server: key.clone(),
            block: vec![4],
        });
        assert!(cancel.is_cancelled(), "the task is stopped");
        assert!(!up.has_backlog(), "the backlog is freed");
        let ev = up.poll_local_event().expect("a disconnect for the pool");
        assert_eq!((ev.conn, &ev.server), (9, &key));
        assert!(
            matches!(&ev.kind, UpstreamEventKind::Disconnected(r) if r == BACKLOG_FULL),
            "{ev:?}"
        );
        assert!(up.poll_local_event().is_none());
        // Blocks for the dropped link go nowhere until the pool reconnects.
        up.execute(Action::Transmit {
            server: key.clone(),
            block: vec![5],
        });
        assert!(!up.has_backlog());
    }
}
