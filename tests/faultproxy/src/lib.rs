//! A small TCP proxy for fault tests on loopback, where `tc netem` is not available.
//!
//! [`FaultProxy::start`] listens (usually on `127.0.0.1:0`) and forwards every accepted
//! connection to one upstream address. A [`ProxyHandle`] changes faults at runtime:
//!
//! * [`ProxyHandle::set_delay`]: a fixed one-way delay added in each direction. Every chunk
//!   read is stamped with `arrival + delay` and written once that time has come, in order.
//!   Reading continues meanwhile, so throughput is not limited to one chunk per delay.
//! * [`ProxyHandle::blackhole`]: stop moving bytes in both directions without closing
//!   anything. The proxy neither reads nor writes, so the kernel keeps both connections
//!   established (and answers TCP keep-alive probes): only an end-to-end check notices.
//!   Held bytes flow again, in order, when the blackhole is lifted, as after a real outage
//!   that TCP survived.
//! * [`ProxyHandle::reset_all`]: abort every current connection with an RST on both sides.
//! * [`ProxyHandle::pause_accept`] leaves new connections in the kernel's backlog (the client's
//!   connect completes, nothing answers); [`ProxyHandle::refuse_new`] accepts and resets them.
//! * [`ProxyHandle::counters`]: connections and bytes forwarded each way.
//!
//! What it does **not** do: packet loss, reordering, bandwidth limits, or anything below TCP
//! (the kernel still ACKs). It is a test tool, not hardened for untrusted peers.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest read per chunk.
const CHUNK: usize = 64 * 1024;

/// Chunks held per direction (delayed or blackholed) before the proxy stops reading: at most
/// `CHUNK * MAX_QUEUED` = 64 MiB, far above what a test sends, while still bounded.
const MAX_QUEUED: usize = 1024;

/// A running proxy. Dropping it stops accepting and aborts every connection.
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    handle: ProxyHandle,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds `listen` and forwards each accepted connection to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        Self::from_listener(listener, upstream)
    }

    /// Serves on a listener the caller bound (so the address is known before the proxy runs).
    pub fn from_listener(listener: TcpListener, upstream: SocketAddr) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            delay_nanos: AtomicU64::new(0),
            blackhole: watch::Sender::new(false),
            pause_accept: watch::Sender::new(false),
            refuse: AtomicBool::new(false),
            generation: Mutex::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            counters: AtomicCounters::default(),
        });
        // Tracked, so that `shutdown` returns only once the listener is closed.
        let accept_task = shared.tracker.spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            local_addr,
            handle: ProxyHandle { shared },
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The upstream every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.handle.shared.upstream
    }

    /// A cloneable handle to change faults and read counters.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Stops accepting, resets every connection and waits for their tasks to end.
    pub async fn shutdown(self) {
        let shared = self.handle.shared.clone();
        shared.shutdown.cancel();
        shared.tracker.close();
        shared.tracker.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.handle.shared.shutdown.cancel();
        self.accept_task.abort();
    }
}

/// Controls a running [`FaultProxy`]. Cheap to clone; all methods take effect immediately.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Sets the one-way delay added in each direction (a round trip gains twice this).
    /// Applies to bytes read from now on; bytes already queued keep their release time,
    /// and order is always preserved.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.shared.delay_nanos.load(Ordering::Relaxed))
    }

    /// Starts (`true`) or ends (`false`) a blackhole: no bytes move in either direction, and
    /// no connection is closed.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Whether a blackhole is in effect.
    pub fn is_blackholed(&self) -> bool {
        *self.shared.blackhole.borrow()
    }

    /// Aborts every current connection with an RST towards the client and the upstream.
    /// Connections accepted afterwards are unaffected.
    pub fn reset_all(&self) {
        let old = {
            let mut generation = self
                .shared
                .generation
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *generation, CancellationToken::new())
        };
        old.cancel();
        self.shared.counters.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops (`true`) or resumes (`false`) calling `accept`. While paused, new connections
    /// complete in the kernel backlog but nothing is forwarded, like an overloaded server.
    pub fn pause_accept(&self, paused: bool) {
        self.shared.pause_accept.send_replace(paused);
    }

    /// Accepts new connections and immediately resets them (`true`), or forwards them
    /// normally again (`false`). Existing connections are unaffected.
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> ProxyCounters {
        let c = &self.shared.counters;
        ProxyCounters {
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }
}

/// Counter snapshot; see [`ProxyHandle::counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyCounters {
    /// Connections accepted and forwarded (refused ones not included).
    pub accepted: u64,
    /// Connections accepted and reset because of [`ProxyHandle::refuse_new`].
    pub refused: u64,
    /// Accepted connections reset because the upstream could not be reached.
    pub upstream_failures: u64,
    /// Connections currently open.
    pub active: u64,
    /// Calls to [`ProxyHandle::reset_all`].
    pub resets: u64,
    /// Bytes written to the upstream (client → server).
    pub bytes_up: u64,
    /// Bytes written to the client (server → client).
    pub bytes_down: u64,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    accepted: AtomicU64,
    refused: AtomicU64,
    upstream_failures: AtomicU64,
    active: AtomicU64,
    resets: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    delay_nanos: AtomicU64,
    blackhole: watch::Sender<bool>,
    pause_accept: watch::Sender<bool>,
    refuse: AtomicBool,
    /// Parent token of the current connections; [`ProxyHandle::reset_all`] cancels it and
    /// installs a fresh one so later connections live on.
    generation: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    counters: AtomicCounters,
}

impl Shared {
    fn connection_token(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .child_token()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut paused = shared.pause_accept.subscribe();
    loop {
        // Wait out a pause without touching the listener, so connections queue in the backlog.
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = paused.wait_for(|p| !*p) => if r.is_err() { return },
        }
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            // A pause that starts while we wait must take effect before the next accept.
            _ = paused.changed() => continue,
            a = listener.accept() => a,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "faultproxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.refuse.load(Ordering::Relaxed) {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            abort(&client);
            continue;
        }
        let token = shared.connection_token();
        let shutdown = shared.shutdown.clone();
        shared
            .tracker
            .spawn(connection(client, shared.clone(), token, shutdown));
    }
}

/// Closes with an RST instead of a FIN: `SO_LINGER` with a zero timeout makes `close` abort.
fn abort(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "faultproxy could not set SO_LINGER 0");
    }
}

/// Decrements `active` however the connection task ends.
struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    client: TcpStream,
    shared: Arc<Shared>,
    token: CancellationToken,
    shutdown: CancellationToken,
) {
    let upstream = tokio::select! {
        () = token.cancelled() => { abort(&client); return; }
        () = shutdown.cancelled() => { abort(&client); return; }
        u = TcpStream::connect(shared.upstream) => u,
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "faultproxy upstream connect failed");
            shared
                .counters
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            abort(&client);
            return;
        }
    };
    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
    shared.counters.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(&shared.counters.active);
    // Small writes (handshakes, pings) must not wait for Nagle on top of the injected delay.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    // One token per connection: a reset, a shutdown, or a failure in either direction
    // aborts both.
    let conn = token.child_token();
    let (client_r, client_w) = client.into_split();
    let (upstream_r, upstream_w) = upstream.into_split();
    let up = Pump {
        from: client_r,
        to: upstream_w,
        bytes: &shared.counters.bytes_up,
        shared: &shared,
        cancel: conn.clone(),
    };
    let down = Pump {
        from: upstream_r,
        to: client_w,
        bytes: &shared.counters.bytes_down,
        shared: &shared,
        cancel: conn.clone(),
    };
    let mut pumps = std::pin::pin!(async {
        tokio::join!(up.run(), down.run());
    });
    tokio::select! {
        () = &mut pumps => return,
        () = shutdown.cancelled() => conn.cancel(),
    }
    // Let both directions see the cancel and close with an RST.
    pumps.await;
}

/// One direction of a connection.
struct Pump<'a> {
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    bytes: &'a AtomicU64,
    shared: &'a Shared,
    cancel: CancellationToken,
}

struct Chunk {
    release: Instant,
    data: Vec<u8>,
    written: usize,
}

impl Pump<'_> {
    async fn run(mut self) {
        match self.forward().await {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(error = %e, "faultproxy direction failed; aborting connection");
                self.cancel.cancel();
            }
        }
        if self.cancel.is_cancelled() {
            // Both halves share their socket with the other direction; setting linger here
            // makes whichever half is dropped last close with an RST.
            abort(self.from.as_ref());
            abort(self.to.as_ref());
            // Dropping a write half sends a FIN, which the peer would read as a clean EOF
            // before the RST; `forget` leaves the close to the final drop.
            self.to.forget();
        }
    }

    /// Moves bytes until EOF has been forwarded (`Ok`), the connection is cancelled (`Ok`,
    /// with the token set) or an IO error happens.
    async fn forward(&mut self) -> io::Result<()> {
        let mut blackhole = self.shared.blackhole.subscribe();
        let mut queue: VecDeque<Chunk> = VecDeque::new();
        let mut buf = vec![0u8; CHUNK];
        let mut eof = false;
        // The second cancel handle lets the select borrow it while `self` is borrowed mutably
        // by the IO branches.
        let cancel = self.cancel.clone();
        loop {
            let holding = *blackhole.borrow_and_update();
            // A blackhole holds the FIN as well as the data.
            if eof && queue.is_empty() && !holding {
                self.to.shutdown().await?;
                return Ok(());
            }
            let front_release = queue.front().map(|c| c.release);
            let now = Instant::now();
            let can_read = !holding && !eof && queue.len() < MAX_QUEUED;
            let can_write = !holding && front_release.is_some_and(|r| r <= now);
            let wait_until = front_release.filter(|r| !holding && *r > now);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                changed = blackhole.changed() => {
                    if changed.is_err() {
                        // The proxy is gone; shutdown cancels us next.
                        return Ok(());
                    }
                }
                n = write_front(&mut self.to, &queue), if can_write => {
                    let n = n?;
                    self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(front) = queue.front_mut() {
                        front.written += n;
                        if front.written == front.data.len() {
                            queue.pop_front();
                        }
                    }
                }
                () = sleep_until_opt(wait_until), if wait_until.is_some() => {}
                n = self.from.read(&mut buf), if can_read => {
                    let n = n?;
                    if n == 0 {
                        eof = true;
                    } else {
                        let delay = Duration::from_nanos(
                            self.shared.delay_nanos.load(Ordering::Relaxed),
                        );
                        // A delay too large for the clock means "never": park far ahead.
                        let arrived = Instant::now();
                        let release = arrived
                            .checked_add(delay)
                            .unwrap_or(arrived + Duration::from_secs(86_400 * 365));
                        queue.push_back(Chunk { release, data: buf[..n].to_vec(), written: 0 });
                    }
                }
            }
        }
    }
}

/// Writes (part of) the front chunk. Cancel-safe: a cancelled `write` wrote nothing.
async fn write_front(to: &mut OwnedWriteHalf, queue: &VecDeque<Chunk>) -> io::Result<usize> {
    match queue.front() {
        Some(c) => {
            let n = to.write(&c.data[c.written..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            Ok(n)
        }
        // Guarded by `can_write`; never polled without a front chunk.
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
