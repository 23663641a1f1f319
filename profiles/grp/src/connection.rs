//! The initiator's per-connection state machine (§15.1): client links, and relay links seen
//! from the initiating relay.
//!
//! Quinn-style and sans-IO: the driver calls [`Connection::handle_carrier_up`] once the
//! carrier is open, feeds received bytes to [`Connection::handle_input`], writes whatever
//! [`Connection::poll_transmit`] returns, sleeps until [`Connection::poll_timeout`] and then
//! calls [`Connection::handle_timeout`], and reads [`Connection::poll_event`]. When
//! [`Connection::is_closed`] turns true it flushes the remaining transmits and closes the
//! carrier. WebSocket drivers must also check that every message is [`Connection::expected_len`]
//! bytes, since messages are records there.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use muxd_smp::crypto::{AUTHENTICATOR_LEN, x25519_authenticator};
use muxd_smp::handshake::VersionRange;
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use tracing::debug;

use crate::block::{GoodbyeReason, TooLarge};
use crate::cover::CoverConfig;
use crate::error::{BlockFault, GrpError};
use crate::handshake::{Initiator, InitiatorConfig};
use crate::link::{Incoming, Link, SendStop};
use crate::{CLOSING_LINGER, HS_LEN, HS_TIMEOUT, MAX_AGE, MAX_AGE_GRACE, PREAMBLE, RECORD};

/// PING interval bounds (`PING_INTERVAL`, uniform in [25 s, 30 s]).
const PING_MIN: Duration = Duration::from_secs(25);
const PING_SPREAD_MS: u64 = 5_000;

/// How long a PING may wait for its PONG before it counts as missed.
const PONG_TIMEOUT: Duration = Duration::from_secs(30);

/// Consecutive missed PONGs that declare the link dead.
const DEAD_AFTER_MISSES: u32 = 2;

/// Make-before-break starts uniformly in [23 h, 23 h 30 min] after Split.
pub const RENEW_FROM: Duration = Duration::from_secs(23 * 3600);
/// The spread of the renewal window is this fraction of its start (30 min of 23 h).
const RENEW_SPREAD_DIVISOR: u32 = 46;

/// Connection parameters.
#[derive(Debug)]
pub struct ConnectionConfig {
    /// The handshake inputs.
    pub handshake: InitiatorConfig,
    /// Whether the carrier starts with the 4-byte preamble (TCP, QUIC) or not (WebSocket).
    pub preamble: bool,
    /// Cover scheduler parameters; `None` = the role's default.
    pub cover: Option<CoverConfig>,
    /// Record limit per direction, for tests of §6.4; `None` = 2^48.
    pub record_limit: Option<u64>,
}

impl ConnectionConfig {
    /// A client link over TCP or QUIC with the defaults.
    pub fn client(relay_key: [u8; 32]) -> Self {
        Self {
            handshake: InitiatorConfig::client(relay_key),
            preamble: true,
            cover: None,
            record_limit: None,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The relay said goodbye (not an error; see [`GoodbyeReason::reconnect`]).
    Goodbye(GoodbyeReason),
    /// We closed it ([`Connection::close`]).
    Local,
    /// It failed.
    Error(GrpError),
}

/// What the connection reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Record 2 checked: the session is up and [`Connection::send`] accepts transmissions.
    Connected {
        /// The session id (handshake hash), implied in every authorization.
        session_id: [u8; 32],
        /// The negotiated inner (SMP) version.
        inner_version: u16,
        /// The negotiated cover rate, milli-records/s.
        cover_rate: u16,
        /// The relay's session auth key (for X25519 authenticators and PKEY).
        auth_key: [u8; 32],
    },
    /// One transmission from the relay, in arrival order (our own PINGs' PONGs are consumed).
    Transmission(Vec<u8>),
    /// The session is 23–23.5 h old: open a successor, move subscriptions and work, then
    /// [`Connection::close`] this one (make-before-break, §6.5).
    RenewDue,
    /// The connection is over; flush transmits and close the carrier.
    Closed(CloseReason),
}

/// Why [`Connection::send`] refused a transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The session is not (or no longer) established.
    #[error("connection is not established")]
    NotEstablished,
    /// No block can carry it.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

#[derive(Debug)]
struct Session {
    link: Link,
    session_id: [u8; 32],
    auth_key: X25519PublicKey,
    inner_version: u16,
    peer_inner: VersionRange,
    established: Instant,
    renew_at: Instant,
    renew_reported: bool,
    next_ping: Instant,
    /// Our unanswered PINGs, oldest first: corrId and when each counts as missed. PINGs go
    /// out every 25–30 s and may wait 30 s, so two can be outstanding at once.
    pings: VecDeque<([u8; 24], Instant)>,
    missed: u32,
}

#[derive(Debug)]
enum State {
    Connecting,
    AwaitRecord2(Box<Initiator>),
    Established(Box<Session>),
    /// We sent a goodbye; waiting for EOF or the linger deadline.
    Closing(Instant, CloseReason),
    Closed,
}

/// One initiator connection (§15.1).
#[derive(Debug)]
pub struct Connection {
    state: State,
    handshake: Option<InitiatorConfig>,
    preamble: bool,
    cover: Option<CoverConfig>,
    record_limit: Option<u64>,
    renew_from: Duration,
    deadline: Instant,
    rng: ChaCha20Rng,
    inbuf: Vec<u8>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl Connection {
    /// A connection whose carrier is being opened at `now` (the 30 s handshake deadline runs
    /// from here). `rng` seeds the connection's private ChaCha20 generator once.
    pub fn new(cfg: ConnectionConfig, now: Instant, rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::with_rng(cfg, now, ChaCha20Rng::from_seed(seed))
    }

    fn with_rng(cfg: ConnectionConfig, now: Instant, rng: ChaCha20Rng) -> Self {
        Self {
            state: State::Connecting,
            handshake: Some(cfg.handshake),
            preamble: cfg.preamble,
            cover: cfg.cover,
            record_limit: cfg.record_limit,
            renew_from: RENEW_FROM,
            deadline: now + HS_TIMEOUT,
            rng,
            inbuf: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Moves the make-before-break window earlier: [`Event::RenewDue`] comes uniformly in
    /// `[from, from + from/46]` after Split instead of 23 h–23.5 h (the same proportion), for
    /// tests and operators' drills. `from` is capped at [`RENEW_FROM`], so the window never
    /// ends later than the spec's (§6.5); the 24 h + 60 s close is unchanged.
    #[must_use]
    pub fn with_renewal_from(mut self, from: Duration) -> Self {
        self.renew_from = from.min(RENEW_FROM);
        self
    }

    /// The carrier is open: generate the keys and queue `PREAMBLE ‖ message 1` as one write.
    pub fn handle_carrier_up(&mut self, now: Instant) {
        if !matches!(self.state, State::Connecting) {
            return;
        }
        let Some(cfg) = self.handshake.take() else {
            return;
        };
        if now >= self.deadline {
            self.fail(GrpError::Timeout);
            return;
        }
        match Initiator::start(cfg, &mut self.rng) {
            Ok((init, msg1)) => {
                let mut first = Vec::with_capacity(PREAMBLE.len() + HS_LEN);
                if self.preamble {
                    first.extend_from_slice(&PREAMBLE);
                }
                first.extend_from_slice(&msg1);
                self.transmits.push_back(first);
                self.state = State::AwaitRecord2(Box::new(init));
            }
            // Only reachable through a snow regression; report it as a network failure.
            Err(_) => self.fail(GrpError::Network),
        }
    }

    /// Bytes received from the carrier, in order.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        if matches!(self.state, State::Closed | State::Connecting) {
            return;
        }
        self.inbuf.extend_from_slice(data);
        while let Some(need) = self.expected_len() {
            if self.inbuf.len() < need {
                break;
            }
            let chunk: Vec<u8> = self.inbuf.drain(..need).collect();
            self.handle_chunk(now, &chunk);
        }
    }

    /// The carrier reached EOF or failed.
    pub fn handle_eof(&mut self, _now: Instant) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Closing(_, reason) => self.events.push_back(Event::Closed(reason)),
            State::Closed => {}
            State::Connecting | State::AwaitRecord2(_) | State::Established(_) => {
                self.transmits.clear();
                self.events
                    .push_back(Event::Closed(CloseReason::Error(GrpError::Network)));
            }
        }
    }

    /// The size of the next unit the connection reads: 2500 before the handshake, 16400
    /// after; `None` when it reads nothing more.
    pub fn expected_len(&self) -> Option<usize> {
        match self.state {
            State::AwaitRecord2(_) => Some(HS_LEN),
            State::Established(_) | State::Closing(..) => Some(RECORD),
            State::Connecting | State::Closed => None,
        }
    }

    /// Queues an encoded transmission (see [`Self::authorized`]); it goes out in a block at
    /// the next cover tick or after `max_delay`, whichever comes first.
    pub fn send(&mut self, transmission: Vec<u8>, now: Instant) -> Result<(), SendError> {
        match &mut self.state {
            State::Established(s) => Ok(s.link.outbox.push(transmission, now)?),
            _ => Err(SendError::NotEstablished),
        }
    }

    /// Says goodbye (0x00) and closes after the peer's EOF or the linger time.
    pub fn close(&mut self, now: Instant) {
        match &self.state {
            State::Established(_) => self.goodbye(now, GoodbyeReason::Normal, CloseReason::Local),
            State::Connecting | State::AwaitRecord2(_) => {
                // Nothing may be sent before Split: just drop the carrier.
                self.transmits.clear();
                self.state = State::Closed;
                self.events.push_back(Event::Closed(CloseReason::Local));
            }
            State::Closing(..) | State::Closed => {}
        }
    }

    /// Advances timers: handshake deadline, cover ticks, PINGs, session age, linger.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::Connecting | State::AwaitRecord2(_) => {
                if now >= self.deadline {
                    self.fail(GrpError::Timeout);
                }
            }
            State::Closing(until, reason) => {
                if now >= *until {
                    let reason = reason.clone();
                    self.state = State::Closed;
                    self.events.push_back(Event::Closed(reason));
                }
            }
            State::Closed => {}
            State::Established(s) => {
                if now >= s.established + MAX_AGE + MAX_AGE_GRACE {
                    let reason = CloseReason::Error(GrpError::SessionAge);
                    self.goodbye(now, GoodbyeReason::Normal, reason);
                    return;
                }
                if !s.renew_reported && now >= s.renew_at {
                    s.renew_reported = true;
                    self.events.push_back(Event::RenewDue);
                }
                while s
                    .pings
                    .front()
                    .is_some_and(|(_, missed_at)| now >= *missed_at)
                {
                    s.pings.pop_front();
                    s.missed += 1;
                }
                if s.missed >= DEAD_AFTER_MISSES {
                    debug!("GRP link dead: {} PINGs unanswered", s.missed);
                    self.fail(GrpError::DeadLink);
                    return;
                }
                if now >= s.next_ping {
                    let mut corr = [0u8; 24];
                    self.rng.fill_bytes(&mut corr);
                    s.next_ping = now + ping_interval(&mut self.rng);
                    if let Some(t) = ping_transmission(&s.session_id, &corr) {
                        let _ = s.link.outbox.push(t, now);
                        s.pings.push_back((corr, now + PONG_TIMEOUT));
                    }
                }
                self.flush(now);
            }
        }
    }

    /// The next instant [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting | State::AwaitRecord2(_) => Some(self.deadline),
            State::Closing(until, _) => Some(*until),
            State::Closed => None,
            State::Established(s) => {
                let mut t = s
                    .link
                    .next_wakeup()
                    .min(s.next_ping)
                    .min(s.established + MAX_AGE + MAX_AGE_GRACE);
                if !s.renew_reported {
                    t = t.min(s.renew_at);
                }
                if let Some((_, missed_at)) = s.pings.front() {
                    t = t.min(*missed_at);
                }
                Some(t)
            }
        }
    }

    /// Bytes to write to the carrier, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True once the connection is over; the driver closes the carrier after flushing.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True between record 2 and the start of closing.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// The session id (handshake hash), once established.
    pub fn session_id(&self) -> Option<[u8; 32]> {
        match &self.state {
            State::Established(s) => Some(s.session_id),
            _ => None,
        }
    }

    /// The negotiated inner version and the relay's range, once established.
    pub fn inner_version(&self) -> Option<(u16, VersionRange)> {
        match &self.state {
            State::Established(s) => Some((s.inner_version, s.peer_inner)),
            _ => None,
        }
    }

    /// Records sent and received so far in this session.
    pub fn record_counts(&self) -> Option<(u64, u64)> {
        match &self.state {
            State::Established(s) => Some((s.link.records.sent(), s.link.records.received())),
            _ => None,
        }
    }

    /// Cover records sent and received so far in this session; the rest of
    /// [`Self::record_counts`] carried batches (or a goodbye).
    pub fn cover_counts(&self) -> Option<(u64, u64)> {
        match &self.state {
            State::Established(s) => Some((s.link.cover_sent, s.link.cover_received)),
            _ => None,
        }
    }

    /// `ss(sessionId) ss(corrId) ss(entityId) command` for this session (§8.2).
    pub fn authorized(
        &self,
        corr_id: &[u8; 24],
        entity_id: &[u8],
        command: &[u8],
    ) -> Option<Authorized> {
        let sid = self.session_id()?;
        Authorized::new(&sid, corr_id, entity_id, command).ok()
    }

    /// The X25519 authenticator (§8.4) of `authorized` with this link's session auth key.
    pub fn x25519_authenticator(
        &self,
        queue_key: &X25519SecretKey,
        corr_id: &[u8; 24],
        authorized: &Authorized,
    ) -> Option<[u8; AUTHENTICATOR_LEN]> {
        match &self.state {
            State::Established(s) => Some(x25519_authenticator(
                queue_key,
                &s.auth_key,
                corr_id,
                authorized.as_bytes(),
            )),
            _ => None,
        }
    }

    /// Test hook: moves both record counters to `n` (rekeying as the schedule would have).
    #[doc(hidden)]
    pub fn skip_records_for_testing(&mut self, n: u64) {
        if let State::Established(s) = &mut self.state {
            s.link.records.skip_to(n);
        }
    }

    fn handle_chunk(&mut self, now: Instant, chunk: &[u8]) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::AwaitRecord2(init) => self.finish_handshake(now, *init, chunk),
            State::Established(mut s) => {
                let res = s.link.open(chunk);
                self.state = State::Established(s);
                match res {
                    Ok(incoming) => self.handle_incoming(now, incoming),
                    Err(e @ GrpError::Block(BlockFault::Length(_))) => {
                        self.goodbye(now, GoodbyeReason::Protocol, CloseReason::Error(e));
                    }
                    Err(e) => self.fail(e),
                }
            }
            // After our goodbye, records are read and dropped until EOF or the linger ends.
            other @ State::Closing(..) => self.state = other,
            other @ (State::Connecting | State::Closed) => self.state = other,
        }
    }

    fn finish_handshake(&mut self, now: Instant, init: Initiator, record2: &[u8]) {
        let est = match init.finish(record2) {
            Ok(e) => e,
            Err(e) => return self.fail(e),
        };
        let Some(inner_version) = est.inner_version else {
            return self.fail(GrpError::Network);
        };
        let mut records = est.records;
        if let Some(limit) = self.record_limit {
            records.set_limit(limit);
        }
        let cover = self.cover.unwrap_or(CoverConfig::for_role(est.role));
        let link = Link::new(records, est.cover_rate, cover, now, &mut self.rng);
        let spread_ms =
            u64::try_from((self.renew_from / RENEW_SPREAD_DIVISOR).as_millis()).unwrap_or(u64::MAX);
        let renew = Duration::from_millis(self.rng.next_u64() % spread_ms.saturating_add(1));
        let session = Session {
            link,
            session_id: est.session_id,
            auth_key: est.auth_key,
            inner_version,
            peer_inner: est.peer_inner,
            established: now,
            renew_at: now + self.renew_from + renew,
            renew_reported: false,
            next_ping: now + ping_interval(&mut self.rng),
            pings: VecDeque::new(),
            missed: 0,
        };
        self.events.push_back(Event::Connected {
            session_id: est.session_id,
            inner_version,
            cover_rate: est.cover_rate,
            auth_key: *est.auth_key.as_bytes(),
        });
        self.state = State::Established(Box::new(session));
    }

    fn handle_incoming(&mut self, now: Instant, incoming: Incoming) {
        match incoming {
            Incoming::Cover => {}
            Incoming::Goodbye(reason) => {
                // The receiver of a goodbye stops sending and drops everything queued.
                self.transmits.clear();
                self.state = State::Closed;
                self.events
                    .push_back(Event::Closed(CloseReason::Goodbye(reason)));
            }
            Incoming::BadBatch => {
                let e = GrpError::Protocol("malformed batch from the relay");
                self.goodbye(now, GoodbyeReason::Protocol, CloseReason::Error(e));
            }
            Incoming::Batch(items) => {
                let State::Established(s) = &mut self.state else {
                    return;
                };
                for t in items {
                    if is_pong(&s.session_id, &t, s.inner_version) {
                        // Any PONG resets the miss count; one answering our own PING also
                        // settles the PINGs sent before it, and is not surfaced.
                        s.missed = 0;
                        let ours = corr_id(&t, s.inner_version)
                            .and_then(|c| s.pings.iter().position(|(p, _)| *p == c));
                        if let Some(i) = ours {
                            s.pings.drain(..=i);
                            continue;
                        }
                    }
                    self.events.push_back(Event::Transmission(t));
                }
            }
        }
    }

    /// Runs the cover scheduler; at the record limit the last record is goodbye 0x05.
    fn flush(&mut self, now: Instant) {
        let State::Established(s) = &mut self.state else {
            return;
        };
        if s.link.flush_due(now, &mut self.rng, &mut self.transmits) == Err(SendStop::LastRecord) {
            let reason = CloseReason::Error(GrpError::RecordLimit);
            self.goodbye(now, GoodbyeReason::RecordLimit, reason);
        }
    }

    fn goodbye(&mut self, now: Instant, why: GoodbyeReason, reason: CloseReason) {
        if let State::Established(s) = &mut self.state
            && let Some(r) = s.link.seal_goodbye(why)
        {
            self.transmits.push_back(r);
        }
        self.state = State::Closing(now + CLOSING_LINGER, reason);
    }

    /// Closes at once without sending anything more.
    fn fail(&mut self, e: GrpError) {
        debug!(error = %e, "GRP connection failed");
        self.transmits.clear();
        self.state = State::Closed;
        self.events.push_back(Event::Closed(CloseReason::Error(e)));
    }
}

fn ping_interval(rng: &mut impl RngCore) -> Duration {
    PING_MIN + Duration::from_millis(rng.next_u64() % (PING_SPREAD_MS + 1))
}

fn ping_transmission(session_id: &[u8; 32], corr: &[u8; 24]) -> Option<Vec<u8>> {
    let a = Authorized::new(session_id, corr, b"", b"PING").ok()?;
    let mut t = Vec::with_capacity(32);
    encode_transmission(crate::INNER_VERSION, b"", &a, &mut t).ok()?;
    Some(t)
}

fn is_pong(session_id: &[u8; 32], t: &[u8], version: u16) -> bool {
    Transmission::decode(version, session_id, t).is_ok_and(|d| d.command == b"PONG")
}

fn corr_id(t: &[u8], version: u16) -> Option<[u8; 24]> {
    // The session id is implied from v7 on, so any value decodes the same.
    let d = Transmission::decode(version, &[], t).ok()?;
    d.corr_id.try_into().ok()
}
