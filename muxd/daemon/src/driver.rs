//! The central task: one loop owns the daemon state and serves every session's commands.
//!
//! Sessions only parse frames and forward requests here over a bounded channel; the answers go
//! back through each client's non-blocking [`ClientHandle`]. [`Hub`] holds the state and the
//! decisions with time passed in, so it is tested without a runtime; [`drive`] is the thin
//! async loop around it (STYLE practice 2). Its inputs are IPC commands, events from the
//! upstream transport tasks and one timer; after each input it drains the pool's socket
//! actions into [`Upstreams`] and re-arms the timer from [`Hub::poll_timeout`].
//!
//! The upstream pool (`muxd_core::Pool`) lives inside the hub: queue requests go to it with a
//! [`RequestToken`] that maps back to the client and request id, its replies become IPC
//! responses, and `recv` long-polls wait here (not in the pool) until a message arrives or
//! their `wait_ms` passes.
//!
//! Keeping the pool alive is split the same way: the pool decides (backoff, keep-alive, lag
//! pings); the hub feeds it the kernel's TCP RTT samples and network-change wake-ups, turns
//! `reconnect` and `lag` requests into pool calls, and tells `watch` clients about every
//! connection state change and `lag` clients about every new round-trip sample.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_core::{
    Action, ConnState, LagSample, LagSource, Pool, PoolError, PoolEvent, PoolReply, PoolRequest,
    RequestToken, ServerKey, ServerStatus,
};
use muxd_ipc_proto::{
    ErrorCode, ErrorFrame, Event, LagEvent, LagSummary, MessageEvent, Op, QueueInfo,
    ReceivedMessage, Reply, Request, Response, ServerMessage, StatusReport, UpstreamStatus,
};
use rand_chacha::ChaCha20Rng;
use tokio::sync::mpsc;

use crate::ipc::client::{ClientHandle, ClientId, Flush, SLOW_CONSUMER_BUDGET, SendError, encode};
use crate::journal::Journal;
use crate::shutdown::{ShutdownReason, ShutdownSignal};
use crate::upstream::{UpstreamEvent, UpstreamEventKind, Upstreams};

/// Bound on a client-chosen `watch` interval. Below it a single watcher could keep the driver
/// busy serialising status reports; above it the value is surely a mistake.
const WATCH_INTERVAL_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(86_400));

/// Longest `recv` long-poll: clients re-ask, and a forgotten waiter should not live for days.
const MAX_RECV_WAIT: Duration = Duration::from_secs(300);

/// `recv` long-polls one client may have waiting at once; more are answered `busy`. An app
/// needs about one per queue it follows; the bound keeps a client from piling up timers.
const MAX_RECV_WAITERS_PER_CLIENT: usize = 32;

/// Encoded bytes of messages one `recv` reply carries at most; the rest stay waiting for the
/// next `recv`. Well under `MAX_FRAME_LEN` (1 MiB), leaving room for the reply's envelope.
const RECV_REPLY_BUDGET: usize = 768 * 1024;

/// Commands the drive loop takes per turn at most; they share the turn's one store commit.
const COMMANDS_PER_TURN: usize = 64;

/// The `lag` ping interval when the client names none (`ipc-proto` documents 1000 ms).
const DEFAULT_LAG_INTERVAL: Duration = Duration::from_secs(1);

/// Bounds on a client-chosen `lag` interval: below it the pings would crowd out the
/// server's real work; above it `lag` is no longer live.
const LAG_INTERVAL_BOUNDS: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));

/// What sessions ask of the driver.
#[derive(Debug)]
pub(crate) enum Command {
    /// A client finished its hello.
    Connect { handle: ClientHandle, app: String },
    /// A client's session ended.
    Disconnect { client: ClientId },
    /// A client's request.
    Request { client: ClientId, request: Request },
}

/// The daemon state that IPC requests see.
#[derive(Debug)]
pub(crate) struct Hub {
    started: Instant,
    /// Wall time at `started`, so status can give Unix times without reading a clock.
    started_unix_ms: u64,
    pid: u32,
    default_watch_interval: Duration,
    clients: BTreeMap<ClientId, Client>,
    pool: Pool<Journal>,
    /// Frames for clients held back until the journal's staged changes are committed: no
    /// app hears of a change (`queued`, `done` of an ack) before it is durable.
    held: VecDeque<(ClientId, bytes::Bytes)>,
    /// How the store is unlocked, for `export` (the backup is protected the same way).
    unlock: Option<muxd_queue_store::Unlock>,
    rng: ChaCha20Rng,
    next_token: u64,
    /// Pool requests in flight: who asked, and the id to answer with.
    pending: BTreeMap<RequestToken, (ClientId, u64)>,
    /// `recv` requests waiting for a message.
    waiters: Waiters,
    /// The pool's socket actions, for the drive loop to carry out.
    socket_actions: VecDeque<Action>,
    /// Set when the client count or an upstream changed and watchers have not been told yet.
    status_dirty: bool,
    /// Upstream state changes (in order) that watchers have not been told about yet; the
    /// state is the one of the transition, which a later one in the same step may replace.
    upstream_changes: Vec<(ServerKey, Option<ConnState>)>,
    /// Servers someone runs `lag` on, with the newest sample those clients have seen.
    lag_seen: BTreeMap<ServerKey, Option<LagSample>>,
    shutdown_requested: bool,
}

#[derive(Debug)]
struct Client {
    handle: ClientHandle,
    app: String,
    watch: Option<Watch>,
    /// Servers this client runs `lag` on, with the ping interval it asked for.
    lags: BTreeMap<ServerKey, Duration>,
}

#[derive(Debug)]
struct Watch {
    interval: Duration,
    next_due: Instant,
}

/// A `recv` that found nothing waiting and may wait.
#[derive(Debug, Clone)]
struct RecvWaiter {
    client: ClientId,
    id: u64,
    app: String,
    queue_id: String,
    max: Option<usize>,
    deadline: Instant,
}

/// The waiting `recv`s, indexed so that an arrival, a timer and a leaving client each touch
/// only the waiters concerned (a client can have at most [`MAX_RECV_WAITERS_PER_CLIENT`]).
#[derive(Debug, Default)]
struct Waiters {
    next_seq: u64,
    all: BTreeMap<u64, RecvWaiter>,
    /// (app, queue id) → waiters on it, in arrival order.
    by_queue: BTreeMap<(String, String), BTreeSet<u64>>,
    by_client: BTreeMap<ClientId, BTreeSet<u64>>,
    /// Earliest first; the first entry is [`Hub::poll_timeout`]'s candidate.
    by_deadline: BTreeSet<(Instant, u64)>,
}

impl Waiters {
    fn count_for(&self, client: ClientId) -> usize {
        self.by_client.get(&client).map_or(0, BTreeSet::len)
    }

    fn insert(&mut self, w: RecvWaiter) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_queue
            .entry((w.app.clone(), w.queue_id.clone()))
            .or_default()
            .insert(seq);
        self.by_client.entry(w.client).or_default().insert(seq);
        self.by_deadline.insert((w.deadline, seq));
        self.all.insert(seq, w);
    }

    fn remove(&mut self, seq: u64) -> Option<RecvWaiter> {
        let w = self.all.remove(&seq)?;
        let key = (w.app.clone(), w.queue_id.clone());
        if let Some(set) = self.by_queue.get_mut(&key) {
            set.remove(&seq);
            if set.is_empty() {
                self.by_queue.remove(&key);
            }
        }
        if let Some(set) = self.by_client.get_mut(&w.client) {
            set.remove(&seq);
            if set.is_empty() {
                self.by_client.remove(&w.client);
            }
        }
        self.by_deadline.remove(&(w.deadline, seq));
        Some(w)
    }

    /// Takes every waiter on one queue of one app.
    fn take_queue(&mut self, app: &str, queue_id: &str) -> Vec<RecvWaiter> {
        let key = (app.to_owned(), queue_id.to_owned());
        let seqs = self.by_queue.get(&key).cloned().unwrap_or_default();
        seqs.into_iter().filter_map(|s| self.remove(s)).collect()
    }

    /// Takes the waiters whose deadline is at or before `now`.
    fn take_expired(&mut self, now: Instant) -> Vec<RecvWaiter> {
        let mut out = Vec::new();
        while let Some(&(deadline, seq)) = self.by_deadline.first() {
            if deadline > now {
                break;
            }
            out.extend(self.remove(seq));
        }
        out
    }

    fn remove_client(&mut self, client: ClientId) {
        let seqs = self.by_client.get(&client).cloned().unwrap_or_default();
        for seq in seqs {
            self.remove(seq);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Hub {
    /// A hub without a store (the unit tests).
    #[cfg(test)]
    pub(crate) fn new(
        now: Instant,
        now_unix_ms: u64,
        pid: u32,
        default_watch_interval: Duration,
        pool_config: muxd_core::PoolConfig,
        rng: ChaCha20Rng,
    ) -> Self {
        let pool = Pool::with_mailbox(pool_config, Journal::in_memory());
        Self::with_pool(now, now_unix_ms, pid, default_watch_interval, pool, rng)
    }

    /// A hub around a pool restored from the store.
    pub(crate) fn with_pool(
        now: Instant,
        now_unix_ms: u64,
        pid: u32,
        default_watch_interval: Duration,
        pool: Pool<Journal>,
        rng: ChaCha20Rng,
    ) -> Self {
        Self {
            started: now,
            started_unix_ms: now_unix_ms,
            pid,
            default_watch_interval,
            clients: BTreeMap::new(),
            pool,
            held: VecDeque::new(),
            unlock: None,
            rng,
            next_token: 1,
            pending: BTreeMap::new(),
            waiters: Waiters::default(),
            socket_actions: VecDeque::new(),
            status_dirty: false,
            upstream_changes: Vec::new(),
            lag_seen: BTreeMap::new(),
            shutdown_requested: false,
        }
    }

    /// Clients that completed their hello and are still connected.
    pub(crate) fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn handle_command(&mut self, now: Instant, cmd: Command) {
        match cmd {
            Command::Connect { handle, app } => {
                tracing::debug!(client = %handle.id(), %app, "client registered");
                self.clients.insert(
                    handle.id(),
                    Client {
                        handle,
                        app,
                        watch: None,
                        lags: BTreeMap::new(),
                    },
                );
                self.status_dirty = true;
            }
            Command::Disconnect { client } => {
                if let Some(c) = self.clients.get(&client) {
                    tracing::debug!(%client, app = %c.app, "client unregistered");
                }
                self.drop_client(client);
            }
            Command::Request { client, request } => self.handle_request(now, client, request),
        }
        self.drain_pool();
        self.publish_changes(now);
    }

    /// An upstream task's news (the caller has checked it is not stale).
    pub(crate) fn handle_upstream(&mut self, now: Instant, event: UpstreamEvent) {
        let server = event.server;
        match event.kind {
            UpstreamEventKind::Connected(info) => {
                self.pool
                    .handle_connected(now, &mut self.rng, &server, info);
            }
            UpstreamEventKind::Block(block) => {
                self.pool
                    .handle_block(now, &mut self.rng, &server, &block[..]);
            }
            UpstreamEventKind::Disconnected(reason) => {
                tracing::info!(%server, %reason, "upstream disconnected");
                self.pool.handle_disconnected(now, &server, reason);
            }
            UpstreamEventKind::Rtt(rtt) => {
                self.pool
                    .handle_rtt_sample(now, &server, rtt, LagSource::Tcp);
            }
            UpstreamEventKind::GrpConnected(session) => {
                self.pool
                    .handle_grp_connected(now, &mut self.rng, &server, session);
            }
            UpstreamEventKind::GrpCounters(counters) => {
                self.pool.handle_grp_counters(&server, counters);
                self.status_dirty = true;
            }
        }
        self.drain_pool();
        self.publish_changes(now);
    }

    /// Addresses or routes changed: servers waiting to retry are tried at once, and links
    /// that look up are probed.
    pub(crate) fn handle_network_change(&mut self, now: Instant) {
        self.pool.handle_network_change(now);
        self.drain_pool();
        self.publish_changes(now);
    }

    /// Fires what is due: status events, the pool's timers, `recv` waits that ran out.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.watch.as_ref().is_some_and(|w| w.next_due <= now))
            .map(|(id, _)| *id)
            .collect();
        if !due.is_empty() {
            let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
            for id in due {
                self.send_status(now, id, frame.clone());
            }
        }
        if self.pool.poll_timeout().is_some_and(|t| t <= now) {
            self.pool.handle_timeout(now, &mut self.rng);
        }
        for w in self.waiters.take_expired(now) {
            self.answer_recv(&w);
        }
        self.drain_pool();
        self.publish_changes(now);
    }

    /// The earliest moment [`handle_timeout`](Self::handle_timeout) has work.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let watches = self
            .clients
            .values()
            .filter_map(|c| c.watch.as_ref().map(|w| w.next_due));
        watches
            .chain(self.waiters.next_deadline())
            .chain(self.pool.poll_timeout())
            .min()
    }

    /// The next socket action of the pool (connect, transmit, disconnect). None while the
    /// journal has changes to commit: [`Self::flush`] first.
    pub(crate) fn poll_socket_action(&mut self) -> Option<Action> {
        if self.pool.mailbox().dirty() {
            return None;
        }
        self.socket_actions.pop_front()
    }

    /// Commits what the journal staged (one durable transaction), then sends the frames
    /// held back for it. On error nothing staged is durable and the held frames are
    /// dropped: the caller stops the daemon, which resumes from the last commit.
    pub(crate) fn flush(&mut self) -> Result<(), muxd_queue_store::StoreError> {
        if self.pool.mailbox().dirty()
            && let Err(e) = self.pool.mailbox_mut().commit()
        {
            self.held.clear();
            self.socket_actions.clear();
            return Err(e);
        }
        for (client, frame) in std::mem::take(&mut self.held) {
            self.send_frame_now(client, frame);
        }
        Ok(())
    }

    /// Whether a client asked for shutdown since the last call.
    pub(crate) fn poll_shutdown_request(&mut self) -> bool {
        std::mem::take(&mut self.shutdown_requested)
    }

    /// Tells every client the daemon is going away and closes them after their queued frames.
    pub(crate) fn close_all(&mut self, reason: ShutdownReason, budget: Duration) {
        let frame = encode(&ServerMessage::Event(Event::ShuttingDown {
            reason: reason.as_str().to_owned(),
        }));
        self.waiters.clear();
        for (_, c) in std::mem::take(&mut self.clients) {
            c.handle.close(crate::ipc::client::LastWords {
                frame: frame.clone(),
                flush: Flush::Pending(budget),
            });
        }
    }

    fn handle_request(&mut self, now: Instant, client: ClientId, request: Request) {
        let Some(c) = self.clients.get_mut(&client) else {
            // Raced with its own disconnect (e.g. dropped as a slow consumer).
            return;
        };
        let app = c.app.clone();
        let id = request.id;
        let reply = match request.op {
            Op::Status => Reply::Status(self.status(now)),
            Op::Ping { data } => Reply::Pong { data },
            Op::Watch { interval_ms } => {
                let interval = interval_ms.map_or(self.default_watch_interval, |ms| {
                    Duration::from_millis(ms)
                        .clamp(WATCH_INTERVAL_BOUNDS.0, WATCH_INTERVAL_BOUNDS.1)
                });
                c.watch = Some(Watch {
                    interval,
                    next_due: now,
                });
                if self.reply(
                    client,
                    Response {
                        id,
                        reply: Reply::Watching,
                    },
                ) {
                    // The first snapshot goes out at once, right behind `watching`.
                    let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
                    self.send_status(now, client, frame);
                }
                return;
            }
            Op::Shutdown => {
                tracing::info!(%client, app = %c.app, "shutdown requested by a client");
                self.shutdown_requested = true;
                Reply::ShuttingDown
            }
            Op::QueueCreate { server, websocket } => {
                let request = PoolRequest::CreateQueue { server, websocket };
                self.ask_pool(now, client, id, &app, request);
                return;
            }
            Op::QueueDelete { queue_id } => {
                self.ask_pool(now, client, id, &app, PoolRequest::DeleteQueue { queue_id });
                return;
            }
            Op::Send {
                queue_uri,
                body_b64,
                wait,
            } => {
                let body = match base64::engine::general_purpose::STANDARD.decode(&body_b64) {
                    Ok(body) => body,
                    Err(e) => {
                        let e = PoolError::InvalidArgument(format!("body_b64: {e}"));
                        self.fail(client, id, &e);
                        return;
                    }
                };
                let request = PoolRequest::Send {
                    queue_uri,
                    body,
                    wait,
                };
                self.ask_pool(now, client, id, &app, request);
                return;
            }
            Op::MessageStatus { message_id } => match self.message_status(&app, &message_id) {
                Ok(reply) => reply,
                Err(e) => {
                    self.fail(client, id, &e);
                    return;
                }
            },
            Op::Export { path } => match self.export(&path) {
                Ok(()) => Reply::Exported { path },
                Err(e) => {
                    self.fail(client, id, &e);
                    return;
                }
            },
            Op::QueueList => Reply::Queues {
                queues: self.pool.queues(&app).iter().map(queue_info).collect(),
            },
            Op::Recv {
                queue_id,
                max,
                wait_ms,
            } => {
                let waiter = RecvWaiter {
                    client,
                    id,
                    app,
                    queue_id,
                    max: max.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
                    deadline: now + Duration::from_millis(wait_ms.unwrap_or(0)).min(MAX_RECV_WAIT),
                };
                let waiting = self
                    .pool
                    .messages(&waiter.app, &waiter.queue_id, Some(1))
                    .is_ok_and(|m| m.is_empty());
                if waiting && waiter.deadline > now {
                    if self.waiters.count_for(client) >= MAX_RECV_WAITERS_PER_CLIENT {
                        let err = ErrorFrame {
                            id: Some(id),
                            code: ErrorCode::Busy,
                            message: format!(
                                "this connection already has {MAX_RECV_WAITERS_PER_CLIENT} \
                                 recv requests waiting; wait for one to return first"
                            ),
                        };
                        self.deliver(client, &ServerMessage::Error(err));
                    } else {
                        self.waiters.insert(waiter);
                    }
                } else {
                    self.answer_recv(&waiter);
                }
                return;
            }
            Op::Ack { queue_id, msg_id } => match self.pool.ack(&app, &queue_id, &msg_id) {
                Ok(()) => Reply::Done,
                Err(e) => {
                    self.fail(client, id, &e);
                    return;
                }
            },
            Op::Reconnect { server } => {
                let key = match server.as_deref().map(|s| self.server_key(s)) {
                    None => None,
                    Some(Ok(key)) => Some(key),
                    Some(Err(e)) => {
                        self.fail(client, id, &e);
                        return;
                    }
                };
                let count = self.pool.reconnect(now, key.as_ref());
                tracing::info!(%client, server = ?server, count, "reconnect requested");
                Reply::Done
            }
            Op::Lag {
                server,
                interval_ms,
            } => {
                let key = match self.server_key(&server) {
                    Ok(key) => key,
                    Err(e) => {
                        self.fail(client, id, &e);
                        return;
                    }
                };
                let interval = interval_ms.map_or(DEFAULT_LAG_INTERVAL, |ms| {
                    Duration::from_millis(ms).clamp(LAG_INTERVAL_BOUNDS.0, LAG_INTERVAL_BOUNDS.1)
                });
                if let Some(c) = self.clients.get_mut(&client) {
                    c.lags.insert(key.clone(), interval);
                }
                // Only samples from now on: the history so far is in `status`.
                let newest = self.pool.lag(&key).and_then(|h| h.last().copied());
                self.lag_seen.entry(key.clone()).or_insert(newest);
                self.update_lag_watch(&key);
                Reply::Watching
            }
            // `Op` may grow; an older daemon answers the new op with an error, not a hang.
            _ => {
                let err = ErrorFrame {
                    id: Some(id),
                    code: ErrorCode::InvalidArgument,
                    message: "operation not supported by this daemon".to_owned(),
                };
                self.deliver(client, &ServerMessage::Error(err));
                return;
            }
        };
        self.reply(client, Response { id, reply });
    }

    /// Hands a request to the pool; its answer comes back through [`Self::drain_pool`].
    fn ask_pool(
        &mut self,
        now: Instant,
        client: ClientId,
        id: u64,
        app: &str,
        request: PoolRequest,
    ) {
        let token = RequestToken(self.next_token);
        self.next_token += 1;
        self.pending.insert(token, (client, id));
        self.pool
            .handle_request(now, &mut self.rng, app, token, request);
    }

    /// Carries out the pool's actions: replies and events here, socket actions queued for
    /// the drive loop.
    fn drain_pool(&mut self) {
        while let Some(action) = self.pool.poll_action() {
            match action {
                Action::Reply { token, result } => {
                    let Some((client, id)) = self.pending.remove(&token) else {
                        continue;
                    };
                    match result {
                        Ok(reply) => {
                            self.reply(
                                client,
                                Response {
                                    id,
                                    reply: ipc_reply(reply),
                                },
                            );
                        }
                        Err(e) => self.fail(client, id, &e),
                    }
                }
                Action::Event(event) => self.handle_pool_event(event),
                other => self.socket_actions.push_back(other),
            }
        }
    }

    fn handle_pool_event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::MessageArrived { app, queue_id } => {
                for w in self.waiters.take_queue(&app, &queue_id) {
                    self.answer_recv(&w);
                }
            }
            PoolEvent::ServerChanged { server, state } => {
                tracing::debug!(%server, state = state.as_str(), "upstream state");
                self.upstream_changes.push((server, Some(state)));
                self.status_dirty = true;
            }
            PoolEvent::Reconnecting {
                server,
                delay,
                attempt,
            } => {
                tracing::debug!(%server, ?delay, attempt, "upstream reconnecting later");
                self.upstream_changes.push((server, None));
            }
            PoolEvent::SubscriptionChanged {
                app,
                queue_id,
                subscription,
            } => {
                tracing::debug!(%app, %queue_id, subscription = subscription.as_str(), "queue subscription");
            }
            PoolEvent::MessageSent { app, message_id } => {
                self.message_event(&app, message_id, "sent", None);
            }
            PoolEvent::MessageFailed {
                app,
                message_id,
                reason,
            } => {
                tracing::info!(%app, %message_id, %reason, "message failed");
                self.message_event(&app, message_id, "failed", Some(reason));
            }
            other => tracing::debug!(?other, "pool event"),
        }
    }

    /// Tells the app's watching connections what became of one of its messages.
    fn message_event(&mut self, app: &str, message_id: String, state: &str, error: Option<String>) {
        let watching: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.app == app && c.watch.is_some())
            .map(|(id, _)| *id)
            .collect();
        if watching.is_empty() {
            return;
        }
        let msg = ServerMessage::Event(Event::Message(MessageEvent {
            message_id,
            state: state.to_owned(),
            error,
        }));
        for client in watching {
            self.deliver(client, &msg);
        }
    }

    /// Where one of the app's messages is: the pool knows those it still has, the store
    /// those that finished.
    fn message_status(&self, app: &str, message_id: &str) -> Result<Reply, PoolError> {
        let not_found = || PoolError::NotFound(format!("message {message_id}"));
        let id: u64 = message_id.parse().map_err(|_| not_found())?;
        if let Some(state) = self.pool.message_state(app, id) {
            return Ok(Reply::MessageStatus {
                message_id: message_id.to_owned(),
                state: state.to_owned(),
                error: None,
            });
        }
        let store = self.pool.mailbox().store().ok_or_else(not_found)?;
        let status = store
            .state(muxd_queue_store::OutboundId(id))
            .map_err(|e| PoolError::Internal(format!("store: {e}")))?
            .filter(|s| s.app == app)
            .ok_or_else(not_found)?;
        let state = match status.state {
            muxd_queue_store::MessageState::Queued => "queued",
            muxd_queue_store::MessageState::Sending => "sending",
            muxd_queue_store::MessageState::Sent => "sent",
            _ => "failed",
        };
        Ok(Reply::MessageStatus {
            message_id: message_id.to_owned(),
            state: state.to_owned(),
            error: status.last_error,
        })
    }

    /// How the store is unlocked; `export` protects backups the same way.
    pub(crate) fn set_unlock(&mut self, unlock: muxd_queue_store::Unlock) {
        self.unlock = Some(unlock);
    }

    /// Writes a sealed backup of the store (`muxctl export`).
    fn export(&mut self, path: &str) -> Result<(), PoolError> {
        let path = std::path::Path::new(path);
        if !path.is_absolute() {
            return Err(PoolError::InvalidArgument(
                "export path must be absolute".to_owned(),
            ));
        }
        // The backup must include what this turn staged.
        self.flush()
            .map_err(|e| PoolError::Internal(format!("store: {e}")))?;
        let (Some(store), Some(unlock)) = (self.pool.mailbox().store(), self.unlock.as_ref())
        else {
            return Err(PoolError::InvalidArgument(
                "this daemon runs without a store".to_owned(),
            ));
        };
        store
            .export(path, unlock)
            .map_err(|e| PoolError::InvalidArgument(e.to_string()))
    }

    /// Answers a `recv` with what waits now (possibly nothing), oldest first, as many as fit
    /// [`RECV_REPLY_BUDGET`] (at least one): the rest stay waiting for the next `recv`.
    fn answer_recv(&mut self, w: &RecvWaiter) {
        match self.pool.messages(&w.app, &w.queue_id, w.max) {
            Ok(waiting) => {
                let mut messages = Vec::new();
                let mut used = 0usize;
                for m in waiting {
                    let m = ReceivedMessage {
                        queue_id: m.queue_id,
                        msg_id: m.msg_id,
                        ts: m.ts,
                        body_b64: base64::engine::general_purpose::STANDARD.encode(&m.body),
                    };
                    // Its exact JSON size plus a separating comma.
                    let size = serde_json::to_vec(&m).map_or(usize::MAX, |v| v.len() + 1);
                    if !messages.is_empty() && used.saturating_add(size) > RECV_REPLY_BUDGET {
                        break;
                    }
                    used = used.saturating_add(size);
                    messages.push(m);
                }
                self.reply(
                    w.client,
                    Response {
                        id: w.id,
                        reply: Reply::Messages { messages },
                    },
                );
            }
            Err(e) => self.fail(w.client, w.id, &e),
        }
    }

    fn fail(&mut self, client: ClientId, id: u64, e: &PoolError) {
        let err = ErrorFrame {
            id: Some(id),
            code: error_code(e),
            message: e.to_string(),
        };
        self.deliver(client, &ServerMessage::Error(err));
    }

    fn reply(&mut self, client: ClientId, response: Response) -> bool {
        self.deliver(client, &ServerMessage::Response(response))
    }

    /// Queues `msg` for `client`, dropping the client if it cannot take it. Returns whether the
    /// client is still connected.
    ///
    /// A response that cannot be encoded (over `MAX_FRAME_LEN`: a `status` of thousands of
    /// upstreams, a `ping` echoing nearly 1 MiB) is answered with an error frame for its id,
    /// so the request fails instead of hanging.
    fn deliver(&mut self, client: ClientId, msg: &ServerMessage) -> bool {
        let frame = match encode(msg) {
            Some(frame) => frame,
            None => {
                let ServerMessage::Response(Response { id, reply }) = msg else {
                    // Not an answer to anything (encode logged it); nobody waits for it.
                    return true;
                };
                let (code, message) = match reply {
                    Reply::Pong { .. } => (
                        ErrorCode::InvalidArgument,
                        "ping data too long: the pong would exceed the 1 MiB frame limit",
                    ),
                    _ => (
                        ErrorCode::Internal,
                        "the reply would exceed the 1 MiB frame limit",
                    ),
                };
                let err = ServerMessage::Error(ErrorFrame {
                    id: Some(*id),
                    code,
                    message: message.to_owned(),
                });
                let Some(frame) = encode(&err) else {
                    return true;
                };
                frame
            }
        };
        self.deliver_frame(client, frame)
    }

    fn deliver_frame(&mut self, client: ClientId, frame: bytes::Bytes) -> bool {
        if !self.clients.contains_key(&client) {
            return false;
        }
        if self.pool.mailbox().dirty() || !self.held.is_empty() {
            // Behind the commit, in order (see `flush`).
            self.held.push_back((client, frame));
            return true;
        }
        self.send_frame_now(client, frame)
    }

    /// Hands a frame to the client's writer now (the journal is committed).
    fn send_frame_now(&mut self, client: ClientId, frame: bytes::Bytes) -> bool {
        let Some(c) = self.clients.get(&client) else {
            return false;
        };
        match c.handle.send_frame(frame) {
            Ok(()) => true,
            Err(SendError::Full) => {
                tracing::warn!(%client, app = %c.app, "client not reading; disconnecting slow consumer");
                c.handle.close_with_error(
                    ErrorCode::SlowConsumer,
                    "outbound buffer full: the client did not read its frames fast enough",
                    Flush::Discard(SLOW_CONSUMER_BUDGET),
                );
                self.drop_client(client);
                false
            }
            Err(SendError::Closed | SendError::Encode) => {
                self.drop_client(client);
                false
            }
        }
    }

    fn drop_client(&mut self, client: ClientId) {
        let Some(c) = self.clients.remove(&client) else {
            return;
        };
        self.waiters.remove_client(client);
        for key in c.lags.keys() {
            self.update_lag_watch(key);
        }
        self.status_dirty = true;
    }

    /// The pool's key for a server address as `status` shows it.
    fn server_key(&self, address: &str) -> Result<ServerKey, PoolError> {
        self.pool
            .status()
            .into_iter()
            .map(|s| s.server)
            .find(|k| k.address() == address)
            .ok_or_else(|| PoolError::NotFound(format!("server {address}")))
    }

    /// Points the pool's lag pings for `key` at the fastest interval any client still asks
    /// for, or stops them when nobody does.
    fn update_lag_watch(&mut self, key: &ServerKey) {
        let fastest = self
            .clients
            .values()
            .filter_map(|c| c.lags.get(key))
            .min()
            .copied();
        self.pool.set_lag_watch(key, fastest.is_some(), fastest);
        if fastest.is_none() {
            self.lag_seen.remove(key);
        }
    }

    /// Sends every `lag` client the samples its servers got since the last call.
    fn publish_lag(&mut self) {
        let servers: Vec<ServerKey> = self.lag_seen.keys().cloned().collect();
        for key in servers {
            let Some(history) = self.pool.lag(&key) else {
                continue;
            };
            let seen = self.lag_seen.get(&key).copied().flatten();
            let mut fresh: Vec<LagSample> = history
                .iter()
                .rev()
                .take_while(|s| Some(**s) != seen)
                .copied()
                .collect();
            let Some(newest) = fresh.first().copied() else {
                continue;
            };
            fresh.reverse();
            // Each sample comes with the summary of its own source: kernel RTTs on a proxied
            // or local hop are far below end-to-end pings, and a mix of both says little.
            let frames: Vec<bytes::Bytes> = fresh
                .iter()
                .filter_map(|sample| {
                    let summary = history.summary_for(sample.source)?;
                    let event = LagEvent {
                        server: key.address().to_owned(),
                        source: source_name(sample.source).to_owned(),
                        rtt_us: micros(sample.rtt),
                        at_unix_ms: self.unix_ms(sample.at),
                        summary: ipc_lag_summary(&summary),
                    };
                    encode(&ServerMessage::Event(Event::Lag(event)))
                })
                .collect();
            self.lag_seen.insert(key.clone(), Some(newest));
            let watchers: Vec<ClientId> = self
                .clients
                .iter()
                .filter(|(_, c)| c.lags.contains_key(&key))
                .map(|(id, _)| *id)
                .collect();
            for id in watchers {
                for frame in &frames {
                    if !self.deliver_frame(id, frame.clone()) {
                        break;
                    }
                }
            }
        }
    }

    /// Tells every watcher about each upstream state change since the last call.
    fn publish_upstream_changes(&mut self, now: Instant) {
        let changes = std::mem::take(&mut self.upstream_changes);
        if changes.is_empty() {
            return;
        }
        let watchers: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.watch.is_some())
            .map(|(id, _)| *id)
            .collect();
        if watchers.is_empty() {
            return;
        }
        let status = self.pool.status();
        for (key, state) in changes {
            let Some(s) = status.iter().find(|s| s.server == key) else {
                continue;
            };
            let mut up = self.upstream_status(now, s);
            if let Some(state) = state {
                up.state = state_name(state).to_owned();
            }
            let Some(frame) = encode(&ServerMessage::Event(Event::Upstream(up))) else {
                continue;
            };
            for id in &watchers {
                self.deliver_frame(*id, frame.clone());
            }
        }
    }

    /// Unix milliseconds of a monotonic instant (relative to the daemon's start).
    fn unix_ms(&self, at: Instant) -> u64 {
        self.started_unix_ms
            .saturating_add(millis(at.saturating_duration_since(self.started)))
    }

    fn send_status(&mut self, now: Instant, client: ClientId, frame: Option<bytes::Bytes>) {
        // The deadline moves on even if encoding failed, or the timer would fire in a loop.
        if let Some(w) = self.clients.get_mut(&client).and_then(|c| c.watch.as_mut()) {
            w.next_due = now + w.interval;
        }
        if let Some(frame) = frame {
            self.deliver_frame(client, frame);
        }
    }

    /// Tells every watcher about a changed client count or upstream. Dropping a slow watcher
    /// changes the count again, so this repeats until nothing changes (each round removes a
    /// client or ends).
    fn publish_changes(&mut self, now: Instant) {
        self.publish_upstream_changes(now);
        self.publish_lag();
        while std::mem::take(&mut self.status_dirty) {
            let watchers: Vec<ClientId> = self
                .clients
                .iter()
                .filter(|(_, c)| c.watch.is_some())
                .map(|(id, _)| *id)
                .collect();
            if watchers.is_empty() {
                continue;
            }
            let frame = encode(&ServerMessage::Event(Event::Status(self.status(now))));
            for id in watchers {
                self.send_status(now, id, frame.clone());
            }
        }
    }

    fn status(&self, now: Instant) -> StatusReport {
        StatusReport {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: self.pid,
            uptime_ms: millis(now.saturating_duration_since(self.started)),
            clients: u32::try_from(self.clients.len()).unwrap_or(u32::MAX),
            upstreams: self
                .pool
                .status()
                .iter()
                .map(|s| self.upstream_status(now, s))
                .collect(),
        }
    }

    fn upstream_status(&self, now: Instant, s: &ServerStatus) -> UpstreamStatus {
        UpstreamStatus {
            server: s.server.address().to_owned(),
            profile: s.profile.to_owned(),
            transport: s.server.transport().as_str().to_owned(),
            state: state_name(s.state).to_owned(),
            state_since_unix_ms: self.unix_ms(s.since),
            last_error: s.last_error.clone(),
            queues: u32::try_from(s.queues).unwrap_or(u32::MAX),
            pending: u32::try_from(s.pending_sends).unwrap_or(u32::MAX),
            attempt: s.attempt,
            next_retry_ms: s
                .next_retry_at
                .map(|t| millis(t.saturating_duration_since(now))),
            rtt_last_us: s.lag.as_ref().map(|l| micros(l.last_rtt)),
            lag: s.lag.as_ref().map(ipc_lag_summary),
            grp: s.grp.as_ref().map(|g| {
                Box::new(muxd_ipc_proto::GrpUpstream {
                    cover_rate: g.cover_rate,
                    real_sent: g.counters.real_sent,
                    cover_sent: g.counters.cover_sent,
                    real_received: g.counters.real_received,
                    cover_received: g.counters.cover_received,
                    proxy: g.proxy.clone(),
                })
            }),
        }
    }
}

/// The IPC error code of a pool error.
fn error_code(e: &PoolError) -> ErrorCode {
    match e {
        PoolError::NotFound(_) => ErrorCode::NotFound,
        PoolError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        // A per-app limit: the app can retry once it has less going on.
        PoolError::LimitReached(_) => ErrorCode::Busy,
        PoolError::Upstream { .. } => ErrorCode::Upstream,
        _ => ErrorCode::Internal,
    }
}

fn ipc_lag_summary(l: &muxd_core::LagSummary) -> LagSummary {
    LagSummary {
        count: u32::try_from(l.count).unwrap_or(u32::MAX),
        min_us: micros(l.min),
        p50_us: micros(l.p50),
        p95_us: micros(l.p95),
        max_us: micros(l.max),
        mean_us: micros(l.mean),
        jitter_us: micros(l.jitter),
    }
}

/// The IPC name of a lag sample's source (`ipc-proto` documents these three).
fn source_name(source: LagSource) -> &'static str {
    match source {
        LagSource::Tcp => "tcp",
        LagSource::Ping => "ping",
        LagSource::Command => "command",
        _ => "other",
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The IPC name of a connection state (`backing_off` on the wire, as `ipc-proto` documents).
fn state_name(state: ConnState) -> &'static str {
    match state {
        ConnState::BackingOff => "backing_off",
        other => other.as_str(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn queue_info(q: &muxd_core::QueueInfo) -> QueueInfo {
    QueueInfo {
        queue_id: q.queue_id.clone(),
        server: q.server.to_string(),
        queue_uri: q.queue_uri.clone(),
        waiting: u32::try_from(q.waiting).unwrap_or(u32::MAX),
        duplicates_suppressed: q.duplicates_suppressed,
    }
}

fn ipc_reply(reply: PoolReply) -> Reply {
    match reply {
        PoolReply::QueueCreated(info) => Reply::QueueCreated(queue_info(&info)),
        PoolReply::Deleted => Reply::Done,
        // The pool answers a send once the server accepted it.
        PoolReply::Sent { message_id } => Reply::Sent {
            message_id,
            state: "sent".to_owned(),
        },
        // Durably queued (the reply waited for the journal's commit); it goes out when the
        // server is reachable.
        PoolReply::Queued { message_id } => Reply::Sent {
            message_id,
            state: "queued".to_owned(),
        },
        other => {
            tracing::error!(?other, "pool reply this daemon does not know");
            Reply::Done
        }
    }
}

/// What woke the drive loop.
enum Wake {
    Shutdown,
    Timer,
    NetworkChange(Option<()>),
    Upstream(Option<UpstreamEvent>),
    Writable,
    Command(Option<Command>),
}

/// Runs the hub until shutdown starts (or every session sender is gone), then sends every
/// client its `shutting_down` event and stops the upstream tasks. Returns whether it stopped
/// because the store could not commit.
pub(crate) async fn drive(
    mut hub: Hub,
    mut commands: mpsc::Receiver<Command>,
    mut upstreams: Upstreams,
    mut upstream_events: mpsc::Receiver<UpstreamEvent>,
    mut net_changes: mpsc::Receiver<()>,
    shutdown: ShutdownSignal,
    grace: Duration,
) -> bool {
    let mut net_watch = true;
    let mut store_failed = false;
    loop {
        let deadline = hub.poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        let backlog = upstreams.has_backlog();
        let wake = tokio::select! {
            biased;
            () = shutdown.cancelled() => Wake::Shutdown,
            // Timers before other input, so a flood of requests cannot starve the watchers.
            () = sleep => Wake::Timer,
            change = net_changes.recv(), if net_watch => Wake::NetworkChange(change),
            ev = upstream_events.recv() => Wake::Upstream(ev),
            () = std::future::poll_fn(|cx| upstreams.poll_writable(cx)), if backlog => Wake::Writable,
            cmd = commands.recv() => Wake::Command(cmd),
        };
        let wake_was_command = matches!(wake, Wake::Command(_));
        match wake {
            Wake::Shutdown | Wake::Command(None) => break,
            // The async timer may wake a little early or late; the hub checks `now` itself.
            Wake::Timer => hub.handle_timeout(Instant::now()),
            Wake::NetworkChange(Some(())) => hub.handle_network_change(Instant::now()),
            // The watcher gave up (it logged why); the pool's own retries go on.
            Wake::NetworkChange(None) => net_watch = false,
            Wake::Upstream(Some(ev)) => {
                if upstreams.accept(&ev) {
                    hub.handle_upstream(Instant::now(), ev);
                }
            }
            // `upstreams` keeps a sender of this channel, so it never closes.
            Wake::Upstream(None) | Wake::Writable => {}
            Wake::Command(Some(cmd)) => hub.handle_command(Instant::now(), cmd),
        }
        // The biased select above prefers upstream traffic; a busy server must not starve
        // the apps, so every turn also takes waiting commands: up to a batch of them, which
        // then share the turn's one commit (group commit of concurrent sends).
        let extra = if wake_was_command {
            COMMANDS_PER_TURN - 1
        } else {
            COMMANDS_PER_TURN
        };
        for _ in 0..extra {
            let Ok(cmd) = commands.try_recv() else {
                break;
            };
            hub.handle_command(Instant::now(), cmd);
        }
        // A backlog that overflowed while carrying out the actions is news for the pool,
        // whose answer may be more actions.
        loop {
            // Write-ahead: what the pool journaled becomes durable before any reply or
            // block that depends on it leaves.
            if let Err(e) = hub.flush() {
                tracing::error!(error = %e, "cannot commit to the store; stopping");
                store_failed = true;
                break;
            }
            while let Some(action) = hub.poll_socket_action() {
                upstreams.execute(action);
            }
            let Some(ev) = upstreams.poll_local_event() else {
                break;
            };
            hub.handle_upstream(Instant::now(), ev);
        }
        if store_failed {
            shutdown.trigger(ShutdownReason::StoreFailed);
            break;
        }
        if hub.poll_shutdown_request() {
            shutdown.trigger(ShutdownReason::Request);
        }
    }
    if !store_failed && let Err(e) = hub.flush() {
        tracing::error!(error = %e, "cannot commit to the store at shutdown");
        store_failed = true;
    }
    tracing::debug!(
        clients = hub.client_count(),
        "telling clients about shutdown"
    );
    hub.close_all(shutdown.reason(), grace);
    upstreams.close_all();
    store_failed
}

#[cfg(test)]
mod tests {
    use muxd_ipc_proto::decode_frame;
    use rand_core::SeedableRng as _;

    use super::*;

    fn hub(now: Instant) -> Hub {
        Hub::new(
            now,
            1_000_000,
            42,
            Duration::from_secs(1),
            muxd_core::PoolConfig::default(),
            ChaCha20Rng::seed_from_u64(7),
        )
    }

    fn connect(hub: &mut Hub, now: Instant, id: u64, buf: usize) -> mpsc::Receiver<bytes::Bytes> {
        let (handle, end) = ClientHandle::new(ClientId(id), buf);
        hub.handle_command(
            now,
            Command::Connect {
                handle,
                app: format!("app{id}"),
            },
        );
        end.queue
    }

    fn request(hub: &mut Hub, now: Instant, client: u64, id: u64, op: Op) {
        hub.handle_command(
            now,
            Command::Request {
                client: ClientId(client),
                request: Request { id, op },
            },
        );
    }

    fn drain(rx: &mut mpsc::Receiver<bytes::Bytes>) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        while let Ok(frame) = rx.try_recv() {
            out.push(decode_frame::<ServerMessage>(&frame).unwrap().unwrap().0);
        }
        out
    }

    fn status_clients(msg: &ServerMessage) -> Option<u32> {
        match msg {
            ServerMessage::Event(Event::Status(s)) => Some(s.clients),
            _ => None,
        }
    }

    #[test]
    fn ping_and_status_answer_with_the_request_id() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 8);
        request(&mut hub, t0, 1, 7, Op::Ping { data: "abc".into() });
        request(&mut hub, t0 + Duration::from_millis(1500), 1, 8, Op::Status);
        let got = drain(&mut rx);
        assert_eq!(
            got[0],
            ServerMessage::Response(Response {
                id: 7,
                reply: Reply::Pong { data: "abc".into() }
            })
        );
        let ServerMessage::Response(Response {
            id: 8,
            reply: Reply::Status(s),
        }) = &got[1]
        else {
            panic!("{got:?}")
        };
        assert_eq!((s.pid, s.clients, s.uptime_ms), (42, 1, 1500));
        assert!(s.upstreams.is_empty());
    }

    #[test]
    fn watch_sends_snapshot_then_on_change_and_on_interval() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 16);
        request(
            &mut hub,
            t0,
            1,
            1,
            Op::Watch {
                interval_ms: Some(500),
            },
        );
        let got = drain(&mut rx);
        assert!(matches!(
            got[0],
            ServerMessage::Response(Response {
                id: 1,
                reply: Reply::Watching
            })
        ));
        assert_eq!(status_clients(&got[1]), Some(1));
        assert_eq!(hub.poll_timeout(), Some(t0 + Duration::from_millis(500)));

        // A second client connects: the watcher hears about it at once.
        let t1 = t0 + Duration::from_millis(100);
        let _rx2 = connect(&mut hub, t1, 2, 16);
        assert_eq!(
            drain(&mut rx)
                .iter()
                .map(status_clients)
                .collect::<Vec<_>>(),
            [Some(2)]
        );
        assert_eq!(hub.poll_timeout(), Some(t1 + Duration::from_millis(500)));

        // Nothing before the deadline, one event at it.
        hub.handle_timeout(t1 + Duration::from_millis(499));
        assert!(drain(&mut rx).is_empty());
        hub.handle_timeout(t1 + Duration::from_millis(500));
        assert_eq!(drain(&mut rx).len(), 1);

        hub.handle_command(
            t1,
            Command::Disconnect {
                client: ClientId(2),
            },
        );
        assert_eq!(
            drain(&mut rx)
                .iter()
                .map(status_clients)
                .collect::<Vec<_>>(),
            [Some(1)]
        );
    }

    #[test]
    fn slow_consumer_is_dropped_without_affecting_others() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let slow = connect(&mut hub, t0, 1, 2);
        let mut fast = connect(&mut hub, t0, 2, 64);
        request(&mut hub, t0, 2, 1, Op::Watch { interval_ms: None });
        for i in 0..3 {
            request(
                &mut hub,
                t0,
                1,
                i,
                Op::Ping {
                    data: String::new(),
                },
            );
        }
        assert_eq!(hub.client_count(), 1);
        // The watcher saw the count drop to 1 once the slow client was gone.
        let counts: Vec<_> = drain(&mut fast).iter().filter_map(status_clients).collect();
        assert_eq!(counts.last(), Some(&1));
        request(&mut hub, t0, 2, 9, Op::Ping { data: "x".into() });
        assert!(matches!(
            drain(&mut fast)[..],
            [ServerMessage::Response(Response { id: 9, .. })]
        ));
        drop(slow);
    }

    #[test]
    fn a_reply_too_large_to_encode_fails_its_request_instead_of_vanishing() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 8);
        // The request frame itself could carry this; the pong's envelope pushes it over.
        let data = "x".repeat(muxd_ipc_proto::MAX_FRAME_LEN - 20);
        request(&mut hub, t0, 1, 5, Op::Ping { data });
        request(&mut hub, t0, 1, 6, Op::Ping { data: "ok".into() });
        let got = drain(&mut rx);
        assert_eq!(got.len(), 2, "{got:?}");
        let (id, code, message) = error_of(&got[0]);
        assert_eq!((id, code), (Some(5), ErrorCode::InvalidArgument));
        assert!(message.contains("1 MiB"), "{message}");
        assert!(matches!(
            got[1],
            ServerMessage::Response(Response { id: 6, .. })
        ));
        assert_eq!(hub.client_count(), 1);
    }

    #[test]
    fn a_limit_of_the_pool_is_busy_not_internal() {
        let e = PoolError::LimitReached("too many servers for this app".into());
        assert_eq!(error_code(&e), ErrorCode::Busy);
        assert_eq!(
            error_code(&PoolError::NotFound("q".into())),
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_client_over_its_byte_budget_is_a_slow_consumer() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        // Plenty of frames allowed, but only 4 KiB of them.
        let (handle, end) = ClientHandle::with_byte_budget(ClientId(1), 128, 4096);
        hub.handle_command(
            t0,
            Command::Connect {
                handle,
                app: "big".into(),
            },
        );
        let data = "y".repeat(1500);
        for id in 0..2 {
            let op = Op::Ping { data: data.clone() };
            request(&mut hub, t0, 1, id, op);
        }
        assert_eq!(hub.client_count(), 1, "3 KiB queued: within budget");
        request(&mut hub, t0, 1, 2, Op::Ping { data });
        assert_eq!(hub.client_count(), 0, "the third frame would pass 4 KiB");
        drop(end);
    }

    #[test]
    fn shutdown_request_is_reported_once() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 4);
        request(&mut hub, t0, 1, 3, Op::Shutdown);
        assert!(hub.poll_shutdown_request());
        assert!(!hub.poll_shutdown_request());
        assert!(matches!(
            drain(&mut rx)[..],
            [ServerMessage::Response(Response {
                id: 3,
                reply: Reply::ShuttingDown
            })]
        ));
    }

    fn error_of(msg: &ServerMessage) -> (Option<u64>, ErrorCode, String) {
        match msg {
            ServerMessage::Error(e) => (e.id, e.code, e.message.clone()),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn queue_ops_map_pool_errors_to_ipc_codes() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 16);
        let recv = Op::Recv {
            queue_id: "nope".into(),
            max: None,
            wait_ms: Some(5_000),
        };
        request(&mut hub, t0, 1, 1, recv);
        let ack = Op::Ack {
            queue_id: "nope".into(),
            msg_id: "m".into(),
        };
        request(&mut hub, t0, 1, 2, ack);
        let send = Op::Send {
            queue_uri: "smp://x".into(),
            body_b64: "not base64!".into(),
            wait: false,
        };
        request(&mut hub, t0, 1, 3, send);
        let create = Op::QueueCreate {
            server: "not an address".into(),
            websocket: false,
        };
        request(&mut hub, t0, 1, 4, create);
        let got: Vec<_> = drain(&mut rx).iter().map(error_of).collect();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!((got[0].0, got[0].1), (Some(1), ErrorCode::NotFound));
        assert_eq!((got[1].0, got[1].1), (Some(2), ErrorCode::NotFound));
        assert_eq!((got[2].0, got[2].1), (Some(3), ErrorCode::InvalidArgument));
        assert!(got[2].2.contains("body_b64"), "{}", got[2].2);
        assert_eq!((got[3].0, got[3].1), (Some(4), ErrorCode::InvalidArgument));
        // A recv that failed does not linger as a waiter.
        assert_eq!(hub.poll_timeout(), None);
        assert!(hub.poll_socket_action().is_none());
    }

    #[test]
    fn queue_create_connects_and_a_refused_identity_fails_it_and_shows_in_status() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 16);
        let key_hash = "A".repeat(43) + "=";
        let server = format!("smp://{key_hash}@127.0.0.1");
        let create = Op::QueueCreate {
            server,
            websocket: true,
        };
        request(&mut hub, t0, 1, 9, create);
        // Nothing answered yet: the pool waits for the connection it asked for.
        assert!(drain(&mut rx).is_empty());
        let Some(Action::Connect {
            server,
            host,
            port,
            websocket,
            ..
        }) = hub.poll_socket_action()
        else {
            panic!("expected a connect")
        };
        assert_eq!((host.as_str(), port, websocket), ("127.0.0.1", 5223, true));
        assert!(hub.poll_timeout().is_some(), "the connect timeout is armed");

        let t1 = t0 + Duration::from_millis(250);
        request(&mut hub, t1, 1, 10, Op::Status);
        let ServerMessage::Response(Response {
            reply: Reply::Status(report),
            ..
        }) = &drain(&mut rx)[0]
        else {
            panic!("expected a status")
        };
        let up = &report.upstreams[0];
        assert_eq!(up.server, format!("smp://{key_hash}@127.0.0.1:5223"));
        assert_eq!(
            (up.transport.as_str(), up.state.as_str()),
            ("websocket", "connecting")
        );
        assert_eq!(up.state_since_unix_ms, 1_000_000, "entered at t0");

        let reason = "server identity mismatch: expected keyHash X, server presented Y";
        hub.handle_upstream(
            t1,
            UpstreamEvent {
                conn: 1,
                server,
                kind: UpstreamEventKind::Disconnected(reason.to_owned()),
            },
        );
        let got = drain(&mut rx);
        let (id, code, message) = error_of(&got[0]);
        assert_eq!((id, code), (Some(9), ErrorCode::Upstream));
        assert!(message.contains(reason), "{message}");

        request(&mut hub, t1, 1, 11, Op::Status);
        let ServerMessage::Response(Response {
            reply: Reply::Status(report),
            ..
        }) = &drain(&mut rx)[0]
        else {
            panic!("expected a status")
        };
        let up = &report.upstreams[0];
        assert_eq!(up.last_error.as_deref(), Some(reason));
        assert_ne!(up.state, "connecting");
        assert_eq!(up.state_since_unix_ms, 1_000_250);
    }

    /// A hub with client 1 whose `queue_create` made the pool dial `server`; the connect
    /// action is taken. Returns the server's key and its address as `status` shows it.
    fn hub_with_server(
        now: Instant,
        rx_buf: usize,
    ) -> (Hub, mpsc::Receiver<bytes::Bytes>, ServerKey, String) {
        let mut hub = hub(now);
        let rx = connect(&mut hub, now, 1, rx_buf);
        let key_hash = "A".repeat(43) + "=";
        let create = Op::QueueCreate {
            server: format!("smp://{key_hash}@127.0.0.1"),
            websocket: false,
        };
        request(&mut hub, now, 1, 1, create);
        let Some(Action::Connect { server, .. }) = hub.poll_socket_action() else {
            panic!("expected a connect")
        };
        let address = server.address().to_owned();
        (hub, rx, server, address)
    }

    fn rtt(hub: &mut Hub, now: Instant, server: &ServerKey, ms: u64) {
        hub.handle_upstream(
            now,
            UpstreamEvent {
                conn: 1,
                server: server.clone(),
                kind: UpstreamEventKind::Rtt(Duration::from_millis(ms)),
            },
        );
    }

    fn lag_events(msgs: &[ServerMessage]) -> Vec<&LagEvent> {
        msgs.iter()
            .filter_map(|m| match m {
                ServerMessage::Event(Event::Lag(l)) => Some(l),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reconnect_and_lag_name_known_servers_only() {
        let t0 = Instant::now();
        let (mut hub, mut rx, _, address) = hub_with_server(t0, 16);
        drain(&mut rx);
        for (id, op) in [
            (
                2,
                Op::Reconnect {
                    server: Some("smp://nobody@example.org".into()),
                },
            ),
            (
                3,
                Op::Lag {
                    server: "smp://nobody@example.org".into(),
                    interval_ms: None,
                },
            ),
        ] {
            request(&mut hub, t0, 1, id, op);
            let got = drain(&mut rx);
            assert_eq!(error_of(&got[0]).0, Some(id));
            assert_eq!(error_of(&got[0]).1, ErrorCode::NotFound);
        }
        request(&mut hub, t0, 1, 4, Op::Reconnect { server: None });
        request(
            &mut hub,
            t0,
            1,
            5,
            Op::Reconnect {
                server: Some(address),
            },
        );
        let got = drain(&mut rx);
        let done: Vec<u64> = got
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Response(Response {
                    id,
                    reply: Reply::Done,
                }) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(done, [4, 5], "{got:?}");
    }

    #[test]
    fn lag_streams_each_new_sample_to_its_clients_until_they_leave() {
        let t0 = Instant::now();
        let (mut hub, mut rx, server, address) = hub_with_server(t0, 64);
        let mut other = connect(&mut hub, t0, 2, 64);
        // A sample before `lag` is history, not news.
        rtt(&mut hub, t0, &server, 9);
        drain(&mut rx);
        let lag = Op::Lag {
            server: address.clone(),
            interval_ms: Some(250),
        };
        request(&mut hub, t0, 1, 2, lag);
        assert!(matches!(
            drain(&mut rx)[..],
            [ServerMessage::Response(Response {
                id: 2,
                reply: Reply::Watching
            })]
        ));
        let t1 = t0 + Duration::from_millis(1500);
        rtt(&mut hub, t1, &server, 3);
        rtt(&mut hub, t1, &server, 5);
        let got = drain(&mut rx);
        let lags = lag_events(&got);
        assert_eq!(lags.len(), 2, "{got:?}");
        assert_eq!(lags[0].server, address);
        assert_eq!(lags[0].source, "tcp");
        assert_eq!((lags[0].rtt_us, lags[1].rtt_us), (3_000, 5_000));
        assert_eq!(lags[1].at_unix_ms, 1_001_500);
        // The summary is the server's history of that source, this sample included.
        assert_eq!(lags[1].summary.count, 3);
        assert_eq!(lags[1].summary.min_us, 3_000);
        assert_eq!(lags[1].summary.max_us, 9_000);
        assert!(lag_events(&drain(&mut other)).is_empty());

        // A second client on the same server gets the samples too; when both are gone the
        // hub stops following the server.
        request(
            &mut hub,
            t1,
            2,
            1,
            Op::Lag {
                server: address.clone(),
                interval_ms: None,
            },
        );
        rtt(&mut hub, t1, &server, 4);
        assert_eq!(lag_events(&drain(&mut rx)).len(), 1);
        assert_eq!(lag_events(&drain(&mut other)).len(), 1);
        hub.handle_command(
            t1,
            Command::Disconnect {
                client: ClientId(1),
            },
        );
        assert!(hub.lag_seen.contains_key(&server));
        hub.handle_command(
            t1,
            Command::Disconnect {
                client: ClientId(2),
            },
        );
        assert!(hub.lag_seen.is_empty());
    }

    #[test]
    fn watchers_get_an_upstream_event_per_state_change() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 64);
        request(&mut hub, t0, 1, 1, Op::Watch { interval_ms: None });
        drain(&mut rx);
        let key_hash = "A".repeat(43) + "=";
        let create = Op::QueueCreate {
            server: format!("smp://{key_hash}@127.0.0.1"),
            websocket: false,
        };
        request(&mut hub, t0, 1, 2, create);
        let Some(Action::Connect { server, .. }) = hub.poll_socket_action() else {
            panic!("expected a connect")
        };
        hub.handle_upstream(
            t0,
            UpstreamEvent {
                conn: 1,
                server: server.clone(),
                kind: UpstreamEventKind::Disconnected("connection refused".into()),
            },
        );
        let got = drain(&mut rx);
        let states: Vec<&str> = got
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Event(Event::Upstream(u)) => Some(u.state.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(states.first(), Some(&"connecting"), "{got:?}");
        assert!(states.len() >= 2, "{got:?}");
        assert_ne!(states.last(), Some(&"connecting"), "{got:?}");
        // Status snapshots still follow the changes.
        assert!(got.iter().any(|m| status_clients(m).is_some()));
    }

    #[test]
    fn a_network_change_retries_a_backing_off_server_at_once() {
        let t0 = Instant::now();
        let mut hub = hub(t0);
        let mut rx = connect(&mut hub, t0, 1, 64);
        // A send waits for its server while it is down, so the pool keeps retrying it.
        let key_hash = "A".repeat(43) + "=";
        let send = Op::Send {
            queue_uri: format!(
                "smp://{key_hash}@127.0.0.1/3456-w==#/?v=2-4&dh=\
                 MCowBQYDK2VuAyEAjiswwI3O_NlS8Fk3HJUW870EY2bAwmttMBsvRB9eV3o%3D"
            ),
            body_b64: "aGk=".into(),
            wait: false,
        };
        request(&mut hub, t0, 1, 1, send);
        let Some(Action::Connect { server, .. }) = hub.poll_socket_action() else {
            panic!("expected a connect: {:?}", drain(&mut rx))
        };
        hub.handle_upstream(
            t0,
            UpstreamEvent {
                conn: 1,
                server: server.clone(),
                kind: UpstreamEventKind::Disconnected("connection refused".into()),
            },
        );
        hub.handle_timeout(t0);
        assert!(hub.poll_socket_action().is_none());
        let status = &hub.pool.status()[0];
        assert_eq!(status.state, ConnState::BackingOff);
        let retry_at = status.next_retry_at.unwrap();

        let t1 = t0 + Duration::from_millis(10);
        assert!(retry_at > t1, "the backoff is still running");
        hub.handle_network_change(t1);
        assert!(
            matches!(hub.poll_socket_action(), Some(Action::Connect { server: s, .. }) if s == server),
            "a network change dials at once"
        );
        assert_eq!(hub.pool.status()[0].state, ConnState::Connecting);
        // The send is still waiting, not failed.
        assert!(
            !drain(&mut rx)
                .iter()
                .any(|m| matches!(m, ServerMessage::Error(_)))
        );
    }
}
