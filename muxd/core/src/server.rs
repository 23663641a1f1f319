//! One upstream server: its key, its connection and what waits for it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use muxd_profile_core::{Backoff, LagHistory, LagSummary};

use muxd_smp::address::SmpServer;
use muxd_smp::cert::{CertPublicKey, KeyHash};
use muxd_smp::connection::{Connection, CorrId};

use zeroize::Zeroizing;

use crate::config::ServerPolicy;
use crate::deadline::later;
use crate::error::PoolError;
use crate::request::RequestToken;

/// How the transport reaches a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// SMP blocks over TLS.
    Tls,
    /// SMP blocks as WebSocket messages inside TLS.
    WebSocket,
    /// GRP/1 records over TCP (`grp://`).
    GrpTcp,
    /// GRP/1 records on one QUIC stream (`grp+quic://`).
    GrpQuic,
    /// GRP/1 records as WebSocket messages (`grp+ws://`).
    GrpWs,
    /// GRP/1 records as WebSocket messages inside TLS (`grp+wss://`).
    GrpWss,
    /// A GRP destination relay reached only through a proxy relay (two-hop sending, §10):
    /// no socket of its own, its commands travel in PFWD on the proxy's connection.
    GrpProxied,
}

impl Transport {
    /// `"tls"` or `"websocket"`, as status reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::WebSocket => "websocket",
            Self::GrpTcp => "tcp",
            Self::GrpQuic => "quic",
            Self::GrpWs => "ws",
            Self::GrpWss => "wss",
            Self::GrpProxied => "proxy",
        }
    }

    /// The protocol profile: `"smp"` or `"grp"`.
    pub fn profile(self) -> &'static str {
        match self {
            Self::Tls | Self::WebSocket => "smp",
            Self::GrpTcp | Self::GrpQuic | Self::GrpWs | Self::GrpWss | Self::GrpProxied => "grp",
        }
    }
}

/// Identifies one upstream connection: the server address and the transport.
///
/// The address is normalised to `smp://<keyHash>@<host>:<port>` (first host, explicit port,
/// no password), so a server written with or without its default port, or reached through
/// a sender's queue URI, shares one connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerKey {
    address: String,
    transport: Transport,
}

impl ServerKey {
    pub(crate) fn new(server: &SmpServer, transport: Transport) -> Self {
        Self {
            address: format!(
                "smp://{}@{}:{}",
                muxd_smp::encoding::base64url_encode(&server.key_hash),
                dial_host(server),
                server.port_or_default()
            ),
            transport,
        }
    }

    /// A GRP relay (its canonical address) or a proxied GRP destination.
    pub(crate) fn grp(address: String, transport: Transport) -> Self {
        Self { address, transport }
    }

    /// The normalised server address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }
}

impl fmt::Display for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Transport::Tls => f.write_str(&self.address),
            Transport::WebSocket => write!(f, "{} (websocket)", self.address),
            Transport::GrpProxied => write!(f, "{} (via proxy)", self.address),
            Transport::GrpTcp | Transport::GrpQuic | Transport::GrpWs | Transport::GrpWss => {
                f.write_str(&self.address)
            }
        }
    }
}

/// The host to dial: the first one that is not an onion address (those need a SOCKS proxy,
/// which the transport does not have), else the first.
pub(crate) fn dial_host(server: &SmpServer) -> &str {
    server
        .hosts
        .iter()
        .find(|h| !h.ends_with(".onion"))
        .or(server.hosts.first())
        .map_or("", String::as_str)
}

/// Where a server's connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnState {
    /// No connection and none wanted.
    Idle,
    /// The transport (TCP, TLS) is being set up.
    Connecting,
    /// The transport is up; the SMP handshake runs.
    Handshaking,
    /// Commands flow.
    Up,
    /// The last attempt or connection failed and nothing needs the server now; see the last
    /// error. A later request that needs the server connects again.
    Failed,
    /// The connection failed while queues or messages need it: the pool waits out its
    /// backoff delay, then connects again by itself.
    BackingOff,
    /// The pool gave up: the backoff ran out of attempts, or the server's identity did not
    /// match its address. No more tries until [`crate::Pool::reconnect`] or
    /// [`crate::Pool::handle_network_change`].
    Lost,
}

impl ConnState {
    /// `"idle"`, `"connecting"`, `"handshaking"`, `"up"`, `"failed"`, `"backing-off"` or
    /// `"lost"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Connecting => "connecting",
            Self::Handshaking => "handshaking",
            Self::Up => "up",
            Self::Failed => "failed",
            Self::BackingOff => "backing-off",
            Self::Lost => "lost",
        }
    }
}

/// A snapshot of one upstream connection, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// The server.
    pub server: ServerKey,
    /// The protocol profile, `"smp"` or `"grp"`.
    pub profile: &'static str,
    /// The connection state.
    pub state: ConnState,
    /// When the connection entered `state`.
    pub since: Instant,
    /// The last error seen on this server, if any.
    pub last_error: Option<String>,
    /// Queues routed through this connection: the apps' own queues on this server plus the
    /// queues they send to.
    pub queues: usize,
    /// Failed attempts since the last success (handshake and resubscription done).
    pub attempt: u32,
    /// When the pool connects again by itself, while backing off.
    pub next_retry_at: Option<Instant>,
    /// Messages waiting for this server or in flight to it.
    pub pending_sends: usize,
    /// Round-trip statistics over the server's lag history (every source).
    pub lag: Option<LagSummary>,
    /// GRP facts (cover rate, record counters, proxy); `None` for SMP servers.
    pub grp: Option<crate::GrpStatus>,
}

/// What the transport learned while connecting that the SMP handshake needs.
#[derive(Debug, Clone)]
pub struct TransportInfo {
    /// The public key of the TLS peer's leaf certificate, from the chain the transport
    /// validated against the address's keyHash. It must have signed ServerHello's session key.
    pub tls_leaf_key: CertPublicKey,
    /// The TLS channel binding, when the TLS stack exposes it (rustls does not).
    pub tls_session_id: Option<Vec<u8>>,
}

/// A request that waits for the server to come up. `Debug` hides the server password.
pub(crate) enum Deferred {
    /// Create a queue for `app`.
    Create {
        app: String,
        token: RequestToken,
        basic_auth: Option<Zeroizing<String>>,
    },
    /// Delete a queue of `app`.
    Delete {
        app: String,
        token: RequestToken,
        queue_id: String,
    },
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Create {
                app,
                token,
                basic_auth,
            } => f
                .debug_struct("Create")
                .field("app", app)
                .field("token", token)
                .field("basic_auth", &basic_auth.as_ref().map(|_| "<redacted>"))
                .finish(),
            Self::Delete {
                app,
                token,
                queue_id,
            } => f
                .debug_struct("Delete")
                .field("app", app)
                .field("token", token)
                .field("queue_id", queue_id)
                .finish(),
        }
    }
}

/// What one app has waiting for a server or in flight to it, against its budgets there
/// ([`crate::PoolConfig::max_pending_per_server`] and
/// [`crate::PoolConfig::max_pending_requests_per_server`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AppLoad {
    /// Messages to send.
    pub(crate) sends: usize,
    /// Queue creations and deletions.
    pub(crate) requests: usize,
}

/// Which budget a request is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    Send,
    Request,
}

/// A command in flight: what it was for and when it was sent (for the lag history).
#[derive(Debug)]
pub(crate) struct Flight {
    pub(crate) pending: Pending,
    pub(crate) sent: Instant,
}

/// What a command in flight was for, so its response can be routed.
#[derive(Debug)]
pub(crate) enum Pending {
    /// NEW; the keys wait here for IDS.
    New(Box<crate::queue::NewQueueKeys>),
    /// SUB of a queue; `resub` when it belongs to a (re)subscription round.
    Sub { queue_id: String, resub: bool },
    /// A keep-alive or lag PING.
    Ping,
    /// ACK of a delivered message.
    Ack { queue_id: String },
    /// KEY: the recipient secures its queue with the sender's key.
    Key { queue_id: String },
    /// DEL requested by an app.
    Del {
        token: RequestToken,
        queue_id: String,
    },
    /// SKEY of a sender queue.
    SKey { dest: crate::sender::DestKey },
    /// SEND of one message.
    Send {
        dest: crate::sender::DestKey,
        seq: u64,
    },
}

/// A server and its connection, as the pool tracks them.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) key_hash: KeyHash,
    pub(crate) state: ConnState,
    pub(crate) since: Instant,
    pub(crate) last_error: Option<String>,
    pub(crate) conn: Option<Connection>,
    pub(crate) connect_deadline: Option<Instant>,
    pub(crate) deferred: VecDeque<Deferred>,
    /// Commands in flight. Change it only through [`Self::track`], [`Self::untrack`] and
    /// [`Self::untrack_all`], which keep [`Self::waiting`] in step.
    pub(crate) commands: BTreeMap<CorrId, Flight>,
    /// The commands in flight other than PING, oldest first: the oldest one dates a stall
    /// (see [`Self::stall_probe_at`]) without a walk over every command in flight.
    pub(crate) waiting: BTreeSet<(Instant, CorrId)>,
    pub(crate) policy: ServerPolicy,
    /// The current reconnect policy: `first_connect` until the first success, then
    /// `reconnect`.
    pub(crate) backoff: Backoff,
    /// A success (handshake and resubscription) happened at least once.
    pub(crate) ever_ready: bool,
    /// Backing off: when to connect again; `None` while the delay is still to be drawn
    /// (the loss was reported through a call without an RNG).
    pub(crate) retry_at: Option<Instant>,
    /// The last loss cannot be fixed by retrying (identity mismatch, no common version).
    pub(crate) permanent: bool,
    /// Queues still to (re)subscribe on this connection, and SUBs of the round in flight.
    pub(crate) resub_queue: VecDeque<String>,
    pub(crate) resub_in_flight: usize,
    /// A SUB of this connection's resubscription timed out: do not count it as success.
    pub(crate) resub_failed: bool,
    /// Resubscription is running (or has not yet confirmed success).
    pub(crate) resubscribing: bool,
    pub(crate) lag: LagHistory,
    /// Last block received (or when the transport came up).
    pub(crate) last_received: Instant,
    /// The outstanding PING and its PONG deadline.
    pub(crate) ping: Option<(CorrId, Instant)>,
    pub(crate) last_ping: Option<Instant>,
    pub(crate) missed_pongs: u32,
    /// PING interval while someone watches this server's lag.
    pub(crate) lag_watch: Option<Duration>,
    /// A liveness probe was asked for (network change).
    pub(crate) probe: bool,
    /// Apps' queues on this server that are subscribed or waiting to be.
    pub(crate) live_queues: usize,
    /// Since when the connection has had nothing to do.
    pub(crate) idle_since: Option<Instant>,
    /// Apps' queues on this server, whatever their subscription.
    pub(crate) queues: usize,
    /// Commands in a row that timed out, with no answer to any command in between.
    pub(crate) command_timeouts: u32,
    /// Per app: what it has waiting for this server or in flight to it.
    pub(crate) load: BTreeMap<String, AppLoad>,
}

impl Server {
    /// A new profile connection takes over: keep-alive and timeout bookkeeping start afresh.
    pub(crate) fn start_connection(&mut self, now: Instant, conn: Connection) {
        self.conn = Some(conn);
        self.command_timeouts = 0;
        self.connect_deadline = None;
        self.last_received = now;
        self.ping = None;
        self.missed_pongs = 0;
        self.probe = false;
    }

    pub(crate) fn new(
        now: Instant,
        server: &SmpServer,
        key_hash: KeyHash,
        policy: ServerPolicy,
    ) -> Self {
        let backoff = Backoff::new(policy.first_connect.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "invalid first-connect backoff; using the default");
            Backoff::default()
        });
        Self {
            backoff,
            ever_ready: false,
            retry_at: None,
            permanent: false,
            resub_queue: VecDeque::new(),
            resub_in_flight: 0,
            resub_failed: false,
            resubscribing: false,
            lag: LagHistory::with_capacity(policy.lag_history),
            last_received: now,
            ping: None,
            last_ping: None,
            missed_pongs: 0,
            lag_watch: None,
            probe: false,
            live_queues: 0,
            idle_since: None,
            queues: 0,
            command_timeouts: 0,
            load: BTreeMap::new(),
            policy,
            host: dial_host(server).to_owned(),
            port: server.port_or_default(),
            key_hash,
            state: ConnState::Idle,
            since: now,
            last_error: None,
            conn: None,
            connect_deadline: None,
            deferred: VecDeque::new(),
            commands: BTreeMap::new(),
            waiting: BTreeSet::new(),
        }
    }

    pub(crate) fn set_state(&mut self, now: Instant, state: ConnState) {
        if self.state != state {
            self.state = state;
            self.since = now;
        }
    }

    /// Success: the handshake is done and every queue is subscribed again. From now on
    /// losses follow the reconnect policy, starting from its first delay.
    pub(crate) fn ready(&mut self) {
        if !self.ever_ready {
            self.ever_ready = true;
            self.backoff = Backoff::new(self.policy.reconnect.clone()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "invalid reconnect backoff; using the default");
                Backoff::default()
            });
        }
        self.backoff.reset();
        self.resubscribing = false;
    }

    /// When the next PING is due on an established connection without one outstanding.
    pub(crate) fn next_ping(&self) -> Instant {
        if self.probe || self.missed_pongs > 0 {
            // Right away: `since` is in the past.
            return self.since.min(self.last_received);
        }
        let idle = later(self.last_received, self.policy.ping_idle);
        let scheduled = match (self.lag_watch, self.last_ping) {
            (Some(every), Some(last)) => idle.min(later(last, every)),
            (Some(_), None) => self.last_received,
            (None, _) => idle,
        };
        self.stall_probe_at()
            .map_or(scheduled, |stall| scheduled.min(stall))
    }

    /// When a stalled link is to be probed: once the oldest command in flight (PINGs aside)
    /// has waited `stall_probe_after`, counted from the last block received when that came
    /// later, since any block shows the link still carries data. So a server that answers
    /// slowly but keeps sending is left alone, while one that went silent after answering
    /// a probe is probed again. `None` while no such command is in flight: an idle link
    /// costs nothing beyond the `ping_idle` keep-alive.
    pub(crate) fn stall_probe_at(&self) -> Option<Instant> {
        let &(oldest, _) = self.waiting.first()?;
        Some(later(
            oldest.max(self.last_received),
            self.policy.stall_probe_after,
        ))
    }

    /// Remembers a command sent on the connection.
    pub(crate) fn track(&mut self, corr_id: CorrId, flight: Flight) {
        // A PING is the probe itself; waiting on it is what the PONG deadline measures.
        if !matches!(flight.pending, Pending::Ping) {
            self.waiting.insert((flight.sent, corr_id));
        }
        if let Some(old) = self.commands.insert(corr_id, flight) {
            // Correlation ids are never reused within a connection; should one be, the
            // older command is forgotten in both tables.
            self.waiting.remove(&(old.sent, corr_id));
        }
    }

    /// Forgets a command that was answered or given up; returns what it was for.
    pub(crate) fn untrack(&mut self, corr_id: &CorrId) -> Option<Flight> {
        let flight = self.commands.remove(corr_id)?;
        self.waiting.remove(&(flight.sent, *corr_id));
        Some(flight)
    }

    /// Forgets every command in flight (the connection is gone) and returns them.
    pub(crate) fn untrack_all(&mut self) -> BTreeMap<CorrId, Flight> {
        self.waiting.clear();
        std::mem::take(&mut self.commands)
    }

    /// What `app` has waiting for this server or in flight to it.
    pub(crate) fn load(&self, app: &str) -> AppLoad {
        self.load.get(app).copied().unwrap_or_default()
    }

    /// Counts one more request of `app` against `budget`.
    pub(crate) fn charge(&mut self, app: &str, budget: Budget) {
        let load = self.load.entry(app.to_owned()).or_default();
        match budget {
            Budget::Send => load.sends += 1,
            Budget::Request => load.requests += 1,
        }
    }

    /// A request of `app` charged to `budget` was answered.
    pub(crate) fn release(&mut self, app: &str, budget: Budget) {
        if let Some(load) = self.load.get_mut(app) {
            match budget {
                Budget::Send => load.sends = load.sends.saturating_sub(1),
                Budget::Request => load.requests = load.requests.saturating_sub(1),
            }
            if *load == AppLoad::default() {
                self.load.remove(app);
            }
        }
    }

    /// The error that requests waiting for this server fail with.
    pub(crate) fn error(&self, key: &ServerKey) -> PoolError {
        let reason = self
            .last_error
            .clone()
            .unwrap_or_else(|| "connection lost".to_owned());
        PoolError::upstream(key, reason)
    }
}
