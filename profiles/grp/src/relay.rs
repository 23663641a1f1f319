//! The relay's per-link state machine (§15.2): responder handshake, record layer and cover.
//!
//! One [`RelayLink`] per accepted carrier, same driving pattern as
//! [`crate::connection::Connection`]. It never executes commands: batches come out as
//! [`RelayEvent::Transmissions`], and the relay server answers through [`RelayLink::send`].
//! Before the handshake completes nothing is ever sent: a failed message 1, whatever the
//! cause, leads to the same silence and the same close 1 s after message 1 arrived (§5.7).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use muxd_smp::handshake::VersionRange;
use muxd_smp::keys::X25519SecretKey;
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use tracing::debug;

use crate::block::{GoodbyeReason, TooLarge};
use crate::cover::CoverConfig;
use crate::error::{BlockFault, GrpError};
use crate::handshake::{Reject, ResponderConfig, respond};
use crate::link::{Incoming, Link, SendStop};
use crate::{
    CLOSING_LINGER, FAIL_DELAY, HS_LEN, HS_TIMEOUT, IDLE_TIMEOUT, MAX_AGE, PREAMBLE, RECORD, Role,
};

/// Per-link relay parameters (the shared handshake config is separate).
#[derive(Debug, Clone, Copy)]
pub struct RelayLinkConfig {
    /// Whether the carrier starts with the 4-byte preamble (TCP, QUIC) or not (WebSocket,
    /// where the link starts at message 1 after the upgrade).
    pub preamble: bool,
    /// Cover scheduler parameters; `None` = the default for the initiator's role.
    pub cover: Option<CoverConfig>,
    /// Record limit per direction, for tests of §6.4; `None` = 2^48.
    pub record_limit: Option<u64>,
}

impl Default for RelayLinkConfig {
    fn default() -> Self {
        Self {
            preamble: true,
            cover: None,
            record_limit: None,
        }
    }
}

/// Why a relay link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayCloseReason {
    /// The carrier started with something other than the GRP/1 preamble.
    BadPreamble,
    /// Message 1 was refused (the reason is for logs only; nothing reached the wire).
    Rejected(Reject),
    /// No valid message 1 within the handshake deadline.
    HandshakeTimeout,
    /// The version ranges do not meet; record 2 was sent, then the link closed.
    NoCommonVersion,
    /// The peer said goodbye.
    Goodbye(GoodbyeReason),
    /// We said goodbye with this reason (idle, age, shutdown, overload, protocol, ...).
    Local(GoodbyeReason),
    /// The carrier ended without a goodbye.
    Eof,
    /// The link failed (bad record).
    Error(GrpError),
}

/// What a relay link reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// Record 2 was queued: the session is up.
    Established {
        /// The session id (handshake hash).
        session_id: [u8; 32],
        /// Client link or relay link.
        role: Role,
        /// The initiator's static key (fresh per connection for clients; the allow-listed
        /// relay key for relay links).
        peer_static: [u8; 32],
        /// The negotiated inner version.
        inner_version: u16,
        /// The negotiated cover rate, milli-records/s.
        cover_rate: u16,
    },
    /// The transmissions of one batch, in order.
    Transmissions(Vec<Vec<u8>>),
    /// A batch that did not parse: answer `ERR BLOCK` with empty corrId; the link stays open.
    MalformedBatch,
    /// The link is over; flush transmits and close the carrier.
    Closed(RelayCloseReason),
}

#[derive(Debug)]
struct Session {
    link: Link,
    session_id: [u8; 32],
    auth_secret: Option<X25519SecretKey>,
    peer_inner: VersionRange,
    established: Instant,
    last_rx: Instant,
}

#[derive(Debug)]
enum State {
    AwaitPreamble,
    AwaitMsg1,
    /// Message 1 failed: discard input, close at the instant given.
    FailDelay(Instant, Reject),
    Established(Box<Session>),
    Closing(Instant, RelayCloseReason),
    Closed,
}

/// One accepted GRP carrier on the relay.
#[derive(Debug)]
pub struct RelayLink {
    state: State,
    responder: Arc<ResponderConfig>,
    cfg: RelayLinkConfig,
    deadline: Instant,
    rng: ChaCha20Rng,
    inbuf: Vec<u8>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<RelayEvent>,
}

impl RelayLink {
    /// A link whose carrier was accepted at `now`. `rng` seeds the link's private ChaCha20
    /// generator once.
    pub fn new(
        responder: Arc<ResponderConfig>,
        cfg: RelayLinkConfig,
        now: Instant,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self {
            state: if cfg.preamble {
                State::AwaitPreamble
            } else {
                State::AwaitMsg1
            },
            responder,
            cfg,
            deadline: now + HS_TIMEOUT,
            rng: ChaCha20Rng::from_seed(seed),
            inbuf: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Bytes received from the carrier, in order.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        match self.state {
            State::Closed => return,
            // Read and discard: the failure path must look like any other wait.
            State::FailDelay(..) => return,
            _ => {}
        }
        self.inbuf.extend_from_slice(data);
        while let Some(need) = self.expected_len() {
            if self.inbuf.len() < need {
                break;
            }
            let chunk: Vec<u8> = self.inbuf.drain(..need).collect();
            self.handle_chunk(now, &chunk);
        }
        if matches!(self.state, State::FailDelay(..) | State::Closed) {
            self.inbuf.clear();
        }
    }

    /// The carrier reached EOF or failed.
    pub fn handle_eof(&mut self, _now: Instant) {
        let reason = match std::mem::replace(&mut self.state, State::Closed) {
            State::Closed => return,
            State::Closing(_, r) => r,
            // A client that gives up during the fail delay still gets no early close signal
            // from us; the link is simply gone.
            State::FailDelay(_, r) => RelayCloseReason::Rejected(r),
            State::AwaitPreamble | State::AwaitMsg1 | State::Established(_) => {
                RelayCloseReason::Eof
            }
        };
        self.transmits.clear();
        self.events.push_back(RelayEvent::Closed(reason));
    }

    /// The size of the next unit the link reads: 4, 2500, then 16400.
    pub fn expected_len(&self) -> Option<usize> {
        match self.state {
            State::AwaitPreamble => Some(PREAMBLE.len()),
            State::AwaitMsg1 => Some(HS_LEN),
            State::Established(_) | State::Closing(..) => Some(RECORD),
            State::FailDelay(..) | State::Closed => None,
        }
    }

    /// Queues a response or event transmission for the next block.
    pub fn send(&mut self, transmission: Vec<u8>, now: Instant) -> Result<(), TooLarge> {
        match &mut self.state {
            State::Established(s) => s.link.outbox.push(transmission, now),
            // Nothing can be sent outside a session; dropping mirrors a closed carrier.
            _ => Ok(()),
        }
    }

    /// Says goodbye with `reason` (shutdown 0x02, overload 0x06, normal 0x00, ...).
    pub fn goodbye(&mut self, now: Instant, reason: GoodbyeReason) {
        match &self.state {
            State::Established(_) => self.say_goodbye(now, reason),
            State::AwaitPreamble | State::AwaitMsg1 | State::FailDelay(..) => {
                self.close_now(RelayCloseReason::Local(reason));
            }
            State::Closing(..) | State::Closed => {}
        }
    }

    /// Advances timers: handshake deadline, fail delay, cover, idle, session age, linger.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.state {
            State::AwaitPreamble | State::AwaitMsg1 => {
                if now >= self.deadline {
                    self.close_now(RelayCloseReason::HandshakeTimeout);
                }
            }
            State::FailDelay(until, r) => {
                if now >= *until {
                    let r = *r;
                    self.close_now(RelayCloseReason::Rejected(r));
                }
            }
            State::Closing(until, reason) => {
                if now >= *until {
                    let reason = reason.clone();
                    self.state = State::Closed;
                    self.events.push_back(RelayEvent::Closed(reason));
                }
            }
            State::Closed => {}
            State::Established(s) => {
                if now >= s.established + MAX_AGE {
                    self.say_goodbye(now, GoodbyeReason::SessionAge);
                    return;
                }
                if now >= s.last_rx + IDLE_TIMEOUT {
                    self.say_goodbye(now, GoodbyeReason::Idle);
                    return;
                }
                if s.link.flush_due(now, &mut self.rng, &mut self.transmits)
                    == Err(SendStop::LastRecord)
                {
                    self.say_goodbye(now, GoodbyeReason::RecordLimit);
                }
            }
        }
    }

    /// The next instant [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitPreamble | State::AwaitMsg1 => Some(self.deadline),
            State::FailDelay(until, _) | State::Closing(until, _) => Some(*until),
            State::Closed => None,
            State::Established(s) => Some(
                s.link
                    .next_wakeup()
                    .min(s.established + MAX_AGE)
                    .min(s.last_rx + IDLE_TIMEOUT),
            ),
        }
    }

    /// Bytes to write to the carrier, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// True once the link is over; the driver closes the carrier after flushing.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The session's auth private key (to check X25519 authenticators, and as `K_PD` on relay
    /// links used for proxying), once established.
    pub fn auth_secret(&self) -> Option<&X25519SecretKey> {
        match &self.state {
            State::Established(s) => s.auth_secret.as_ref(),
            _ => None,
        }
    }

    /// The session id, once established.
    pub fn session_id(&self) -> Option<[u8; 32]> {
        match &self.state {
            State::Established(s) => Some(s.session_id),
            _ => None,
        }
    }

    /// The initiator's inner version range, once established.
    pub fn peer_inner(&self) -> Option<VersionRange> {
        match &self.state {
            State::Established(s) => Some(s.peer_inner),
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
            State::AwaitPreamble => {
                if chunk == PREAMBLE {
                    self.state = State::AwaitMsg1;
                } else {
                    // Close at once, send nothing.
                    self.close_now(RelayCloseReason::BadPreamble);
                }
            }
            State::AwaitMsg1 => self.handshake(now, chunk),
            State::Established(mut s) => {
                s.last_rx = now;
                let res = s.link.open(chunk);
                self.state = State::Established(s);
                match res {
                    Ok(Incoming::Cover) => {}
                    Ok(Incoming::Batch(items)) => {
                        self.events.push_back(RelayEvent::Transmissions(items));
                    }
                    Ok(Incoming::BadBatch) => self.events.push_back(RelayEvent::MalformedBatch),
                    Ok(Incoming::Goodbye(r)) => self.close_now(RelayCloseReason::Goodbye(r)),
                    Err(GrpError::Block(BlockFault::Length(_))) => {
                        self.say_goodbye(now, GoodbyeReason::Protocol);
                    }
                    Err(e) => self.close_now(RelayCloseReason::Error(e)),
                }
            }
            other => self.state = other,
        }
    }

    fn handshake(&mut self, now: Instant, msg1: &[u8]) {
        let (record2, est) = match respond(&self.responder, msg1, &mut self.rng) {
            Ok(ok) => ok,
            Err(r) => {
                debug!(reason = %r, "GRP message 1 refused");
                // The delay runs from the arrival of message 1's last byte, i.e. now.
                self.state = State::FailDelay(now + FAIL_DELAY, r);
                return;
            }
        };
        self.transmits.push_back(record2);
        let Some(inner_version) = est.inner_version else {
            // Payload 2 tells the client why; the relay sends nothing else.
            self.state = State::Closed;
            self.events
                .push_back(RelayEvent::Closed(RelayCloseReason::NoCommonVersion));
            return;
        };
        let mut records = est.records;
        if let Some(limit) = self.cfg.record_limit {
            records.set_limit(limit);
        }
        let cover = self.cfg.cover.unwrap_or(CoverConfig::for_role(est.role));
        let link = Link::new(records, est.cover_rate, cover, now, &mut self.rng);
        self.events.push_back(RelayEvent::Established {
            session_id: est.session_id,
            role: est.role,
            peer_static: est.peer_static,
            inner_version,
            cover_rate: est.cover_rate,
        });
        self.state = State::Established(Box::new(Session {
            link,
            session_id: est.session_id,
            auth_secret: est.auth_secret,
            peer_inner: est.peer_inner,
            established: now,
            last_rx: now,
        }));
    }

    fn say_goodbye(&mut self, now: Instant, reason: GoodbyeReason) {
        if let State::Established(s) = &mut self.state
            && let Some(r) = s.link.seal_goodbye(reason)
        {
            self.transmits.push_back(r);
        }
        self.state = State::Closing(now + CLOSING_LINGER, RelayCloseReason::Local(reason));
    }

    fn close_now(&mut self, reason: RelayCloseReason) {
        self.transmits.clear();
        self.state = State::Closed;
        self.events.push_back(RelayEvent::Closed(reason));
    }
}
