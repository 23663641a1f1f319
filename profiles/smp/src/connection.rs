//! The client side of one SMP connection as a sans-IO state machine.
//!
//! See [`Connection`] for the call order. The connection owns the handshake, block framing
//! and encryption, batching, correlation of responses to commands, command timeouts and the
//! PING keep-alive. It never touches a socket or a clock.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use rand_core::{CryptoRng, RngCore};

use crate::block::{BLOCK_SIZE, BatchBuilder, decode_batch, pad_block, unpad_block};
use crate::block::{BlockError, MAX_TRANSMISSION_LEN};
use crate::cert::{CertPublicKey, KeyHash};
use crate::command::{Command, Response, SubscriptionMode};
use crate::crypto::{BlockCipher, CryptoError, QueueAuthKey};
use crate::encoding::{DecodeError, EncodeError};
use crate::error::{ErrorType, ReconnectAction};
use crate::handshake::{self, CLIENT_VERSIONS, HandshakeError, HandshakeParams, VersionRange};
use crate::keys::{X25519PublicKey, X25519SecretKey};
use crate::proxy::{ForwardError, PendingForward, ProxiedRelay};
use crate::transmission::{
    Authorized, CORR_ID_LEN, Transmission, TransmissionError, encode_transmission, transmission_len,
};

/// Tunables. The defaults follow the reference client's background-mode values (§9); the
/// pool may tighten them for interactive use.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// Versions offered in the handshake.
    pub versions: VersionRange,
    /// How long to wait for ServerHello after the transport connected.
    pub handshake_timeout: Duration,
    /// How long to wait for the response to a command.
    pub command_timeout: Duration,
    /// Silence after which a PING is sent (only while keep-alive is active).
    pub ping_interval: Duration,
    /// Consecutive command timeouts that, together with [`Self::silence_limit`] of silence,
    /// drop the connection.
    pub max_timeouts: u32,
    /// Silence that, together with [`Self::max_timeouts`] timeouts, drops the connection.
    pub silence_limit: Duration,
    /// Send PINGs even before the first subscription. The reference client only pings
    /// connections that carry subscriptions; servers close idle unsubscribed ones after 6 h.
    pub ping_without_subscriptions: bool,
    /// Send a client X25519 key in ClientHello, which enables block encryption at v11+.
    pub block_encryption: bool,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            versions: CLIENT_VERSIONS,
            handshake_timeout: Duration::from_secs(45),
            command_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(600),
            max_timeouts: 3,
            silence_limit: Duration::from_secs(15 * 60),
            ping_without_subscriptions: false,
            block_encryption: true,
        }
    }
}

/// What the transport layer knows about the server, needed by the handshake.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// The pinned identity from the server address.
    pub key_hash: KeyHash,
    /// Public key of the TLS peer's leaf certificate (from the validated chain).
    pub tls_leaf_key: CertPublicKey,
    /// The TLS channel binding, if the TLS stack exposes it; otherwise the server's is used.
    pub tls_session_id: Option<Vec<u8>>,
}

/// A 24-byte correlation id, random per command and never reused within a connection.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CorrId([u8; CORR_ID_LEN]);

impl CorrId {
    /// Draws a fresh id.
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut b = [0u8; CORR_ID_LEN];
        rng.fill_bytes(&mut b);
        Self(b)
    }

    /// Wraps raw bytes (tests and fake servers).
    pub const fn from_bytes(b: [u8; CORR_ID_LEN]) -> Self {
        Self(b)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; CORR_ID_LEN] {
        &self.0
    }
}

impl fmt::Debug for CorrId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits are enough to tell ids apart in logs.
        write!(f, "CorrId(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake finished; commands may be sent.
    Connected {
        /// The negotiated version.
        version: u16,
        /// Whether blocks are encrypted inside TLS.
        block_encryption: bool,
    },
    /// The answer to a command sent with [`Connection::send_command`].
    Response {
        /// The command's id.
        corr_id: CorrId,
        /// The entity id of the response.
        entity_id: Vec<u8>,
        /// The response (`ERR` becomes [`CommandError::Server`]).
        result: Result<Response, CommandError>,
    },
    /// A server-initiated message (empty corrId): MSG, END, DELD, NMSG, or an ERR about a block.
    ServerEvent {
        /// The queue (or other entity) it concerns.
        entity_id: Vec<u8>,
        /// The message.
        response: Response,
    },
    /// A response whose corrId matches no command in flight (late after a timeout, or bogus).
    Unexpected {
        /// The corrId it carried.
        corr_id: Vec<u8>,
        /// The entity id.
        entity_id: Vec<u8>,
        /// The response, if it parsed.
        response: Option<Response>,
    },
    /// A received block or transmission could not be used (the `BLOCK` error); the connection
    /// carries on.
    BadBlock(BlockFault),
    /// The connection is over; the driver should close the transport.
    Closed(Option<ConnectionError>),
}

/// Why a block or transmission was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockFault {
    /// Decryption failed (the chain has advanced anyway).
    #[error("block decryption failed")]
    Decrypt,
    /// The block or batch framing did not parse.
    #[error(transparent)]
    Framing(#[from] BlockError),
    /// A transmission did not parse.
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
}

/// Why one command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The server answered `ERR`.
    #[error("server error: {0}")]
    Server(ErrorType),
    /// No response within [`ConnectionConfig::command_timeout`].
    #[error("response timeout")]
    Timeout,
    /// The connection closed before a response arrived.
    #[error("connection closed")]
    ConnectionClosed,
    /// The response did not parse, or had an entity id it must not have.
    #[error("invalid response: {0}")]
    InvalidResponse(DecodeError),
}

impl CommandError {
    /// What to do about it.
    pub fn reconnect(&self) -> ReconnectAction {
        match self {
            Self::Server(e) => e.reconnect(),
            Self::Timeout => ReconnectAction::Retry,
            Self::ConnectionClosed => ReconnectAction::Rehandshake,
            // A server that answers garbage is unlikely to do better on this connection.
            Self::InvalidResponse(_) => ReconnectAction::Rehandshake,
        }
    }
}

/// Why a command could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The handshake has not finished; wait for [`Event::Connected`].
    #[error("connection not established")]
    NotEstablished,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// The command cannot be encoded at the negotiated version, or is too long.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The command could not be authorized (e.g. X25519 key without a server session key).
    #[error("authorization failed: {0}")]
    Auth(#[from] CryptoError),
    /// The transmission does not fit in one block.
    #[error("transmission of {0} bytes exceeds one block")]
    TooLarge(usize),
    /// The command to forward through a proxy could not be built.
    #[error("cannot forward: {0}")]
    Forward(#[from] ForwardError),
}

impl SendError {
    /// What to do about it.
    pub fn reconnect(&self) -> ReconnectAction {
        match self {
            Self::NotEstablished => ReconnectAction::Retry,
            Self::Closed => ReconnectAction::Rehandshake,
            Self::Encode(_) | Self::Auth(_) | Self::TooLarge(_) | Self::Forward(_) => {
                ReconnectAction::GiveUp
            }
        }
    }
}

/// Why the connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// No ServerHello within [`ConnectionConfig::handshake_timeout`].
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Too many command timeouts with too long a silence from the server.
    #[error("server unresponsive")]
    Unresponsive,
    /// The ClientHello could not be built.
    #[error("ClientHello encoding failed: {0}")]
    Encode(#[from] EncodeError),
}

impl ConnectionError {
    /// What the pool should do next.
    pub fn reconnect(&self) -> ReconnectAction {
        match self {
            Self::Handshake(e) => e.reconnect(),
            Self::HandshakeTimeout | Self::Unresponsive => ReconnectAction::Rehandshake,
            Self::Encode(_) => ReconnectAction::GiveUp,
        }
    }
}

/// Outcome of a [`Connection::poll_transmit`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Transmissions packed into the block (0 for the ClientHello).
    pub transmissions: usize,
}

#[derive(Debug)]
struct Established {
    version: u16,
    session_id: Vec<u8>,
    server_session_key: Option<X25519PublicKey>,
    cipher: Option<BlockCipher>,
}

#[derive(Debug)]
enum State {
    AwaitingServerHello { deadline: Instant },
    Established(Established),
    Closed,
}

#[derive(Debug)]
struct InFlight {
    /// PINGs sent by the keep-alive are answered internally, not as events.
    keepalive: bool,
    /// The entity the command was sent for; its answer must carry the same one.
    entity_id: Vec<u8>,
}

/// An SMP client connection, driven by the caller (sans-IO).
///
/// Methods fall into four groups, as in quinn's `Connection`:
/// - getters: [`version`](Self::version), [`session_id`](Self::session_id),
///   [`is_established`](Self::is_established), [`is_closed`](Self::is_closed),
///   [`in_flight`](Self::in_flight);
/// - input: [`handle_input`](Self::handle_input) for every 16384-byte block read from the
///   transport, [`handle_timeout`](Self::handle_timeout) when the deadline from
///   `poll_timeout` passes;
/// - application commands: [`send_command`](Self::send_command), [`close`](Self::close);
/// - output: [`poll_transmit`](Self::poll_transmit), [`poll_event`](Self::poll_event),
///   [`poll_timeout`](Self::poll_timeout).
///
/// After any input or command, the driver calls `poll_transmit` until it returns `None`
/// (writing each block to the transport), then `poll_event` until `None`, then re-arms its
/// timer from `poll_timeout`. `now` must not go backwards between calls. The server speaks
/// first: the connection waits for ServerHello and answers with ClientHello; commands are
/// accepted after [`Event::Connected`]. On [`Event::Closed`] the driver closes the transport.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    /// What the handshake checks; `None` for sessions set up by another layer.
    identity: Option<ServerIdentity>,
    /// The per-connection key for block encryption; dropped after the handshake.
    client_key: Option<X25519SecretKey>,
    state: State,
    /// Encoded transmissions waiting for a block, in send order.
    queued: VecDeque<(CorrId, Vec<u8>)>,
    /// Whole blocks waiting to be written (the ClientHello).
    blocks: VecDeque<Vec<u8>>,
    in_flight: BTreeMap<CorrId, InFlight>,
    /// Command deadlines in send order; all share one timeout, so they are sorted. Entries of
    /// answered commands are skipped lazily.
    deadlines: VecDeque<(Instant, CorrId)>,
    events: VecDeque<Event>,
    last_received: Instant,
    last_ping: Option<Instant>,
    consecutive_timeouts: u32,
    keepalive: bool,
    batch: BatchBuilder,
}

impl Connection {
    /// A connection whose transport (TCP + TLS) has just been established at `now`.
    pub fn new<R: RngCore + CryptoRng>(
        now: Instant,
        config: ConnectionConfig,
        identity: ServerIdentity,
        rng: &mut R,
    ) -> Self {
        let client_key = config
            .block_encryption
            .then(|| X25519SecretKey::generate(rng));
        Self {
            state: State::AwaitingServerHello {
                deadline: now + config.handshake_timeout,
            },
            keepalive: config.ping_without_subscriptions,
            config,
            identity: Some(identity),
            client_key,
            queued: VecDeque::new(),
            blocks: VecDeque::new(),
            in_flight: BTreeMap::new(),
            deadlines: VecDeque::new(),
            events: VecDeque::new(),
            last_received: now,
            last_ping: None,
            consecutive_timeouts: 0,
            batch: BatchBuilder::new(),
        }
    }

    /// A connection whose session was set up by another layer, at `now`: GRP (`muxd-grp`)
    /// runs its own handshake and carries SMP v18 transmissions with the handshake hash as
    /// the implied session id and the relay's session auth key for X25519 authenticators.
    /// Blocks are plain padded batches (the outer layer encrypts). [`Event::Connected`] is
    /// the first event, as after a ServerHello.
    pub fn established(
        now: Instant,
        config: ConnectionConfig,
        version: u16,
        session_id: Vec<u8>,
        server_session_key: Option<X25519PublicKey>,
    ) -> Self {
        let mut events = VecDeque::new();
        events.push_back(Event::Connected {
            version,
            block_encryption: false,
        });
        Self {
            state: State::Established(Established {
                version,
                session_id,
                server_session_key,
                cipher: None,
            }),
            keepalive: config.ping_without_subscriptions,
            config,
            // There is no ServerHello to check: the outer layer authenticated the peer.
            identity: None,
            client_key: None,
            queued: VecDeque::new(),
            blocks: VecDeque::new(),
            in_flight: BTreeMap::new(),
            deadlines: VecDeque::new(),
            events,
            last_received: now,
            last_ping: None,
            consecutive_timeouts: 0,
            batch: BatchBuilder::new(),
        }
    }

    /// The negotiated version, once established.
    pub fn version(&self) -> Option<u16> {
        match &self.state {
            State::Established(e) => Some(e.version),
            _ => None,
        }
    }

    /// The session id, once established.
    pub fn session_id(&self) -> Option<&[u8]> {
        match &self.state {
            State::Established(e) => Some(&e.session_id),
            _ => None,
        }
    }

    /// The server's X25519 session key (v7+ with certKey), once established.
    pub fn server_session_key(&self) -> Option<&X25519PublicKey> {
        match &self.state {
            State::Established(e) => e.server_session_key.as_ref(),
            _ => None,
        }
    }

    /// Whether commands can be sent.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Commands sent (or queued) and not yet answered, keep-alive PINGs included.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Handles one block read from the transport.
    pub fn handle_input(&mut self, now: Instant, block: &[u8]) {
        match &mut self.state {
            State::Closed => {}
            State::AwaitingServerHello { .. } => {
                self.last_received = now;
                self.handle_server_hello(block);
            }
            State::Established(est) => {
                self.last_received = now;
                self.consecutive_timeouts = 0;
                let content = match &mut est.cipher {
                    Some(c) => match c.decrypt_block(block) {
                        Ok(c) => c,
                        Err(_) => {
                            self.events.push_back(Event::BadBlock(BlockFault::Decrypt));
                            return;
                        }
                    },
                    None => match unpad_block(block) {
                        Ok(c) => c.to_vec(),
                        Err(e) => {
                            self.events.push_back(Event::BadBlock(e.into()));
                            return;
                        }
                    },
                };
                let (version, session_id) = (est.version, est.session_id.clone());
                let items = match decode_batch(&content) {
                    Ok(items) => items,
                    Err(e) => {
                        self.events.push_back(Event::BadBlock(e.into()));
                        return;
                    }
                };
                tracing::trace!(target: "wire::smp::recv", transmissions = items.len(), "block");
                for t in items {
                    match Transmission::decode(version, &session_id, t) {
                        Ok(t) => self.handle_transmission(version, &t),
                        Err(e) => self.events.push_back(Event::BadBlock(e.into())),
                    }
                }
                // Drop deadlines of answered commands at the front so `poll_timeout` stays cheap.
                while self
                    .deadlines
                    .front()
                    .is_some_and(|(_, id)| !self.in_flight.contains_key(id))
                {
                    self.deadlines.pop_front();
                }
            }
        }
    }

    fn handle_server_hello(&mut self, block: &[u8]) {
        // Only `new` starts in AwaitingServerHello, and it always has an identity.
        let Some(identity) = self.identity.as_ref() else {
            return;
        };
        let params = HandshakeParams {
            key_hash: identity.key_hash,
            versions: self.config.versions,
            tls_session_id: identity.tls_session_id.as_deref(),
            tls_leaf_key: &identity.tls_leaf_key,
        };
        // The key is only needed for the handshake; dropping it here zeroizes it.
        let client_key = self.client_key.take();
        match handshake::client_handshake(block, &params, client_key.as_ref()) {
            Ok((hello, session)) => {
                tracing::debug!(
                    version = session.version,
                    encrypted = session.block_cipher.is_some(),
                    "SMP handshake done"
                );
                self.blocks.push_back(hello);
                self.events.push_back(Event::Connected {
                    version: session.version,
                    block_encryption: session.block_cipher.is_some(),
                });
                self.state = State::Established(Established {
                    version: session.version,
                    session_id: session.session_id,
                    server_session_key: session.server_session_key,
                    cipher: session.block_cipher,
                });
            }
            Err(e) => self.fail(ConnectionError::Handshake(e)),
        }
    }

    fn handle_transmission(&mut self, version: u16, t: &Transmission<'_>) {
        let parsed = Response::decode(version, t.command).and_then(|r| {
            if r.entity_ok(t.entity_id) {
                Ok(r)
            } else {
                Err(DecodeError::Invalid("entity id"))
            }
        });
        if t.corr_id.is_empty() {
            match parsed {
                Ok(response) => self.events.push_back(Event::ServerEvent {
                    entity_id: t.entity_id.to_vec(),
                    response,
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "unparseable server event");
                    self.events
                        .push_back(Event::BadBlock(BlockFault::Transmission(e.into())));
                }
            }
            return;
        }
        let known = <[u8; CORR_ID_LEN]>::try_from(t.corr_id)
            .ok()
            .map(CorrId)
            .and_then(|id| self.in_flight.remove(&id).map(|f| (id, f)));
        let Some((corr_id, flight)) = known else {
            self.events.push_back(Event::Unexpected {
                corr_id: t.corr_id.to_vec(),
                entity_id: t.entity_id.to_vec(),
                response: parsed.ok(),
            });
            return;
        };
        if flight.keepalive {
            // Any answer to our PING proves liveness; there is nothing to report.
            return;
        }
        // As the reference client: an answer about another entity is not this command's
        // answer (e.g. a MSG for another queue on an ACK's corrId). The command still ends,
        // as the server will not answer it again. ERR and IDS are exempt, as in `entity_ok`.
        let result = match parsed {
            Ok(Response::Err(e)) => Err(CommandError::Server(e)),
            Ok(r @ Response::Ids(_)) => Ok(r),
            Ok(_) if t.entity_id != flight.entity_id.as_slice() => Err(
                CommandError::InvalidResponse(DecodeError::Invalid("response entity id")),
            ),
            Ok(r) => Ok(r),
            Err(e) => Err(CommandError::InvalidResponse(e)),
        };
        self.events.push_back(Event::Response {
            corr_id,
            entity_id: t.entity_id.to_vec(),
            result,
        });
    }

    /// Queues a command for `entity_id`, authorized with `auth` when given, and returns its
    /// corrId. The command goes out with the next [`poll_transmit`](Self::poll_transmit),
    /// batched with others.
    pub fn send_command<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        entity_id: &[u8],
        command: &Command,
        auth: Option<&QueueAuthKey>,
    ) -> Result<CorrId, SendError> {
        let corr_id = self.fresh_corr_id(rng)?;
        self.queue_command(now, corr_id, entity_id, command, auth)?;
        let subscribes = match command {
            Command::Sub | Command::NSub | Command::Subs | Command::NSubs => true,
            Command::New(n) => n.sub_mode == SubscriptionMode::Subscribe,
            _ => false,
        };
        self.keepalive |= subscribes;
        Ok(corr_id)
    }

    /// Sends `command` for `entity_id` on `relay` through the proxy at the other end of this
    /// connection (PFWD, §5.5). `relay` comes from the PKEY answering a PRXY sent with
    /// [`send_command`](Self::send_command). The PRES arrives as an [`Event::Response`] with
    /// the returned corrId; open it with the returned [`PendingForward`]. Proxy-level
    /// failures arrive there as `ERR PROXY …`.
    pub fn send_forwarded<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        relay: &ProxiedRelay,
        entity_id: &[u8],
        command: &Command,
        auth: Option<&QueueAuthKey>,
    ) -> Result<(CorrId, PendingForward), SendError> {
        let corr_id = self.fresh_corr_id(rng)?;
        let (pfwd, pending) = relay.forward(rng, &corr_id, entity_id, command, auth)?;
        self.queue_command(now, corr_id, relay.session_id(), &pfwd, None)?;
        Ok((corr_id, pending))
    }

    /// A corrId not in flight, once the connection is established.
    fn fresh_corr_id<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Result<CorrId, SendError> {
        match &self.state {
            State::Established(_) => {}
            State::AwaitingServerHello { .. } => return Err(SendError::NotEstablished),
            State::Closed => return Err(SendError::Closed),
        }
        // 192 random bits make a collision practically impossible; the loop only guards
        // against a broken RNG handing out the id of a command still in flight.
        let mut corr_id = CorrId::random(rng);
        while self.in_flight.contains_key(&corr_id) {
            corr_id = CorrId::random(rng);
        }
        Ok(corr_id)
    }

    fn queue_command(
        &mut self,
        now: Instant,
        corr_id: CorrId,
        entity_id: &[u8],
        command: &Command,
        auth: Option<&QueueAuthKey>,
    ) -> Result<(), SendError> {
        let State::Established(est) = &self.state else {
            return Err(SendError::NotEstablished);
        };
        let mut cmd = Vec::new();
        command.encode(est.version, &mut cmd)?;
        let authorized = Authorized::new(&est.session_id, corr_id.as_bytes(), entity_id, &cmd)?;
        let auth_bytes = match auth {
            Some(k) => k.authorize(
                authorized.as_bytes(),
                corr_id.as_bytes(),
                est.server_session_key.as_ref(),
            )?,
            None => Vec::new(),
        };
        let len = transmission_len(est.version, auth_bytes.len(), &authorized);
        if len > MAX_TRANSMISSION_LEN {
            return Err(SendError::TooLarge(len));
        }
        let mut t = Vec::with_capacity(len);
        encode_transmission(est.version, &auth_bytes, &authorized, &mut t)?;
        self.enqueue(now, corr_id, entity_id, t, false);
        Ok(())
    }

    fn enqueue(
        &mut self,
        now: Instant,
        corr_id: CorrId,
        entity_id: &[u8],
        t: Vec<u8>,
        keepalive: bool,
    ) {
        let entity_id = entity_id.to_vec();
        self.in_flight.insert(
            corr_id,
            InFlight {
                keepalive,
                entity_id,
            },
        );
        self.deadlines
            .push_back((now + self.config.command_timeout, corr_id));
        self.queued.push_back((corr_id, t));
    }

    /// Ends the connection: commands in flight fail with [`CommandError::ConnectionClosed`]
    /// and [`Event::Closed`] is emitted. SMP has no goodbye message; the driver just closes
    /// the transport after draining `poll_transmit`.
    pub fn close(&mut self) {
        self.shutdown(None);
    }

    fn fail(&mut self, error: ConnectionError) {
        tracing::debug!(%error, "SMP connection failed");
        self.shutdown(Some(error));
    }

    fn shutdown(&mut self, error: Option<ConnectionError>) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        self.queued.clear();
        self.blocks.clear();
        self.deadlines.clear();
        for (corr_id, f) in std::mem::take(&mut self.in_flight) {
            if !f.keepalive {
                self.events.push_back(Event::Response {
                    corr_id,
                    entity_id: Vec::new(),
                    result: Err(CommandError::ConnectionClosed),
                });
            }
        }
        self.events.push_back(Event::Closed(error));
    }

    /// Appends the next 16384-byte block to send to `buf`, if any.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let _ = now;
        if let Some(b) = self.blocks.pop_front() {
            buf.extend_from_slice(&b);
            return Some(Transmit { transmissions: 0 });
        }
        let State::Established(est) = &mut self.state else {
            return None;
        };
        while let Some((_, t)) = self.queued.front() {
            if !self.batch.push(t) {
                break;
            }
            self.queued.pop_front();
        }
        if self.batch.is_empty() {
            return None;
        }
        let transmissions = self.batch.len();
        let content = self.batch.take();
        let start = buf.len();
        let ok = match &mut est.cipher {
            Some(c) => c
                .encrypt_block(&content)
                .map(|b| buf.extend_from_slice(&b))
                .is_ok(),
            None => pad_block(&content, buf).is_ok(),
        };
        // The batch budget keeps every content within both pad targets, so this only guards
        // against a broken invariant rather than silently sending a short block.
        if !ok || buf.len() - start != BLOCK_SIZE {
            buf.truncate(start);
            tracing::error!("batch did not fit a block");
            return None;
        }
        tracing::trace!(target: "wire::smp::send", transmissions, "block");
        Some(Transmit { transmissions })
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Closed => None,
            State::AwaitingServerHello { deadline } => Some(*deadline),
            State::Established(_) => {
                let command = self
                    .deadlines
                    .iter()
                    .find(|(_, id)| self.in_flight.contains_key(id))
                    .map(|(d, _)| *d);
                let ping = self.keepalive.then(|| self.next_ping());
                match (command, ping) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    fn next_ping(&self) -> Instant {
        let last = match self.last_ping {
            Some(p) if p > self.last_received => p,
            _ => self.last_received,
        };
        last + self.config.ping_interval
    }

    /// Fires the timers that are due at `now`: handshake timeout, command timeouts, keep-alive.
    /// The RNG draws the corrId of a keep-alive PING.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        match &self.state {
            State::Closed => return,
            State::AwaitingServerHello { deadline } => {
                if now >= *deadline {
                    self.fail(ConnectionError::HandshakeTimeout);
                }
                return;
            }
            State::Established(_) => {}
        }
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(flight) = self.in_flight.remove(&id) else {
                continue;
            };
            self.consecutive_timeouts += 1;
            self.queued.retain(|(q, _)| *q != id);
            if !flight.keepalive {
                self.events.push_back(Event::Response {
                    corr_id: id,
                    entity_id: Vec::new(),
                    result: Err(CommandError::Timeout),
                });
            }
        }
        if self.consecutive_timeouts >= self.config.max_timeouts
            && now.saturating_duration_since(self.last_received) >= self.config.silence_limit
        {
            self.fail(ConnectionError::Unresponsive);
            return;
        }
        if self.keepalive && now >= self.next_ping() {
            self.last_ping = Some(now);
            if let Err(e) = self.send_ping(now, rng) {
                tracing::warn!(error = %e, "could not queue keep-alive PING");
            }
        }
    }

    fn send_ping<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Result<(), SendError> {
        let State::Established(est) = &self.state else {
            return Err(SendError::NotEstablished);
        };
        let mut corr_id = CorrId::random(rng);
        while self.in_flight.contains_key(&corr_id) {
            corr_id = CorrId::random(rng);
        }
        let mut cmd = Vec::new();
        Command::Ping.encode(est.version, &mut cmd)?;
        let authorized = Authorized::new(&est.session_id, corr_id.as_bytes(), b"", &cmd)?;
        let mut t = Vec::new();
        encode_transmission(est.version, b"", &authorized, &mut t)?;
        self.enqueue(now, corr_id, b"", t, true);
        Ok(())
    }
}
