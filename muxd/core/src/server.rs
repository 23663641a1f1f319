//! One upstream server: its key, its connection and what waits for it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Instant;

use muxd_smp::address::SmpServer;
use muxd_smp::cert::{CertPublicKey, KeyHash};
use muxd_smp::connection::{Connection, CorrId};

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
}

impl Transport {
    /// `"tls"` or `"websocket"`, as status reports name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::WebSocket => "websocket",
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
    /// The last attempt or connection failed; see the last error. A later request that
    /// needs the server connects again.
    Failed,
}

impl ConnState {
    /// `"idle"`, `"connecting"`, `"handshaking"`, `"up"` or `"failed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Connecting => "connecting",
            Self::Handshaking => "handshaking",
            Self::Up => "up",
            Self::Failed => "failed",
        }
    }
}

/// A snapshot of one upstream connection, for status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// The server.
    pub server: ServerKey,
    /// The protocol profile, `"smp"`.
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

/// A request that waits for the server to come up.
#[derive(Debug)]
pub(crate) enum Deferred {
    /// Create a queue for `app`.
    Create {
        app: String,
        token: RequestToken,
        basic_auth: Option<String>,
    },
    /// Delete a queue of `app`.
    Delete {
        token: RequestToken,
        queue_id: String,
    },
}

/// What a command in flight was for, so its response can be routed.
#[derive(Debug)]
pub(crate) enum Pending {
    /// NEW; the keys wait here for IDS.
    New(Box<crate::queue::NewQueueKeys>),
    /// SUB of a queue.
    Sub { queue_id: String },
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
    pub(crate) commands: BTreeMap<CorrId, Pending>,
}

impl Server {
    pub(crate) fn new(now: Instant, server: &SmpServer, key_hash: KeyHash) -> Self {
        Self {
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
        }
    }

    pub(crate) fn set_state(&mut self, now: Instant, state: ConnState) {
        if self.state != state {
            self.state = state;
            self.since = now;
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
