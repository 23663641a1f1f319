//! The pool: every upstream server connection, every app's queues, and the rules that tie
//! them together. See [`Pool`] for the call order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use muxd_profile_core::{LagHistory, LagSource};
use muxd_smp::address::{QueueUri, SmpServer, VersionRange};
use muxd_smp::block::BLOCK_SIZE;
use muxd_smp::cert::KeyHash;
use muxd_smp::command::{Command, NewQueue, QueueIds, QueueRequest, Response, SubscriptionMode};
use muxd_smp::connection::{
    CommandError, Connection, ConnectionConfig, ConnectionError, CorrId, Event, ServerIdentity,
};
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::E2E_CONFIRMATION_PAD;
use muxd_smp::encoding::base64url_encode;
use muxd_smp::error::{ErrorType, ReconnectAction};
use muxd_smp::keys::{Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use crate::config::PoolConfig;
use crate::deadline::later;
use crate::envelope::{ENVELOPE_OVERHEAD, Envelope, EnvelopeError, SeqWindow};
use crate::error::PoolError;
use crate::mailbox::{Delivery, Mailbox, MemoryMailbox, ReceivedMessage};
use crate::persist::{MessageOutcome, SavedMessage, SavedQueue, SavedSender};
use crate::queue::{NewQueueKeys, Opened, RcvQueue};
use crate::request::{
    Action, PoolEvent, PoolReply, PoolRequest, QueueInfo, RequestToken, Subscription,
};
use crate::sender::{Confirmation, DestKey, OutMsg, OutState, Secured, SendKind, SndQueue};
use crate::server::{
    Budget, ConnState, Deferred, Flight, Pending, Server, ServerKey, ServerStatus, Transport,
    TransportInfo,
};

/// GRP/1 relays and two-hop sending (`pool/grp.rs`): a child module, so the hooks below stay
/// one line each.
pub(crate) mod grp;

/// The longest message body an app may send.
///
/// The first message to a queue travels as the confirmation, whose envelope is padded to
/// 15904 bytes: less the 2-byte padding length, in the legacy flow the private header
/// `'K' ss(44-byte key)`, and muxd's 10-byte app envelope (`docs/envelope.md`), that leaves
/// 15846 bytes. Later messages could be a little longer, but one limit for every message
/// keeps a send from failing only because it happened to be first.
pub const MAX_BODY_LEN: usize = E2E_CONFIRMATION_PAD - 2 - (1 + 1 + 44) - ENVELOPE_OVERHEAD;

/// The SMP client versions our queue URIs offer (`v=2-4`: every host in the authority,
/// sender may secure, short-link aware).
const URI_CLIENT_VERSIONS: VersionRange = VersionRange { min: 2, max: 4 };

/// The profile's own keep-alive is switched off by setting its interval this far out: the
/// pool runs keep-alive itself (PONG deadline, missed-PONG count, lag watch). Ten years
/// stays far from `Instant` overflow.
const PROFILE_PING_OFF: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The range a lag-watch interval is clamped to: faster PINGs would only load the server,
/// and an app may ask for any `u64` of milliseconds.
const LAG_WATCH_MIN: Duration = Duration::from_millis(10);
const LAG_WATCH_MAX: Duration = Duration::from_secs(24 * 3600);

/// The longest timeout handed to the profile's connection, which adds it to `Instant`s
/// unchecked.
const PROFILE_TIMEOUT_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// The configuration handed to a profile connection: the pool's, with the profile's own
/// keep-alive off (the pool runs it) and every timeout within [`PROFILE_TIMEOUT_MAX`].
fn profile_config(base: &ConnectionConfig) -> ConnectionConfig {
    let mut config = base.clone();
    config.ping_interval = PROFILE_PING_OFF;
    config.handshake_timeout = config.handshake_timeout.min(PROFILE_TIMEOUT_MAX);
    config.command_timeout = config.command_timeout.min(PROFILE_TIMEOUT_MAX);
    config.silence_limit = config.silence_limit.min(PROFILE_TIMEOUT_MAX);
    config
}

/// A request the pool has accepted and not yet answered, and the budget it is charged to.
#[derive(Debug)]
struct Charge {
    server: ServerKey,
    app: String,
    budget: Budget,
}

/// Received messages an app holds over all its queues.
#[derive(Debug, Clone, Copy, Default)]
struct Waiting {
    messages: usize,
    bytes: usize,
}

/// How a connection loss is to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Reconnecting may help: back off and try again if anything needs the server.
    Transient,
    /// Reconnecting will not help (identity mismatch, no common version): `lost` at once.
    Permanent,
}

/// Whether a transport failure reported as text is one retrying cannot fix. The transport
/// reports certificate problems with these prefixes (`muxd_transport::Error::Identity`).
fn permanent_transport_failure(reason: &str) -> bool {
    reason.starts_with("server identity mismatch") || reason.starts_with("untrusted chain")
}

/// Whether a queue in this state needs the server's connection.
fn live(subscription: Subscription) -> bool {
    matches!(
        subscription,
        Subscription::Subscribed | Subscription::Pending
    )
}

/// The upstream pool (sans-IO): one SMP connection per server carries the queues of every app.
///
/// Methods fall into four groups, as in quinn's `Connection`:
/// - input: [`handle_request`](Self::handle_request) for app requests,
///   [`handle_connected`](Self::handle_connected) once a transport asked for by
///   [`Action::Connect`] is up, [`handle_block`](Self::handle_block) for every block read
///   from it, [`handle_disconnected`](Self::handle_disconnected) when it fails or closes, and
///   [`handle_timeout`](Self::handle_timeout) when the deadline from `poll_timeout` passes;
/// - local app operations answered at once: [`queues`](Self::queues),
///   [`messages`](Self::messages), [`ack`](Self::ack);
/// - getters: [`status`](Self::status), [`mailbox`](Self::mailbox);
/// - output: [`poll_action`](Self::poll_action) and [`poll_timeout`](Self::poll_timeout).
///
/// After any input the driver calls `poll_action` until it returns `None`, carrying out each
/// action in order (blocks of one server must be written in the order given), then re-arms
/// its timer from `poll_timeout`. `now` must not go backwards between calls. Time and
/// randomness come in as arguments; the pool reads no clock and does no IO.
///
/// Requests that need a server that is not connected ask for [`Action::Connect`] and wait,
/// bounded per app and server by [`PoolConfig::max_pending_per_server`] (messages) and
/// [`PoolConfig::max_pending_requests_per_server`] (queue creations and deletions).
///
/// Every table is bounded, so a hostile or broken app or server can neither grow the pool's
/// memory without end nor starve other apps: received messages per queue and per app (at
/// the limit the pool holds back the server `ACK`, and the server's quota makes senders
/// wait), tracked servers ([`PoolConfig::max_servers`]; unused ones are forgotten after
/// [`PoolConfig::server_linger`]) and destination queues per app
/// ([`PoolConfig::max_senders_per_app`]). A limit that is reached fails the request with a
/// clear error and loses nothing already accepted.
///
/// Each server goes through idle → connecting → handshaking → up, and on a failure either
/// to `failed` (nothing needs it) or to backing-off → connecting … until the handshake and
/// the resubscription of every queue succeed; after the backoff's last attempt it is `lost`
/// until [`reconnect`](Self::reconnect) or [`handle_network_change`](Self::handle_network_change).
/// Every transition is a [`PoolEvent::ServerChanged`]. A loss fails queue creations and
/// deletions that waited for the connection; messages to send wait (up to
/// [`PoolConfig::send_timeout`]) and go out after the reconnect in per-queue order. A
/// message whose OK was lost with the connection is sent again with the same envelope seq
/// (`docs/envelope.md`): the server may store it twice, and the receiving pool drops the
/// second copy ([`duplicates_suppressed`](Self::duplicates_suppressed)), so apps see every
/// message exactly once and in order. Identity mismatches and version gaps go to `lost` at once
/// (no retry loop) and fail what waits. Keep-alive, lag history and idle disconnect follow
/// each server's [`crate::ServerPolicy`].
#[derive(Debug)]
pub struct Pool<M: Mailbox = MemoryMailbox> {
    config: PoolConfig,
    servers: BTreeMap<ServerKey, Server>,
    /// The apps' queues by queue id.
    queues: BTreeMap<String, RcvQueue>,
    /// Sender state per destination queue.
    senders: BTreeMap<DestKey, SndQueue>,
    mailbox: M,
    actions: VecDeque<Action>,
    next_seq: u64,
    /// Totals over every queue the pool ever had (deleted ones included).
    duplicates_suppressed: u64,
    malformed_rejected: u64,
    confirmations_rejected: u64,
    /// Accepted requests not yet answered, by token; each holds a budget on its server
    /// until [`Self::reply`] releases it.
    charges: BTreeMap<RequestToken, Charge>,
    /// Per app: the received messages it holds, against the per-app limits.
    waiting: BTreeMap<String, Waiting>,
    /// Per app: the sender entries it sent through, against `max_senders_per_app`.
    app_senders: BTreeMap<String, usize>,
    /// Queues whose `ACK` is held back, as (app, queue id).
    held: BTreeSet<(String, String)>,
    /// Apps that acknowledged messages while some of their queues held an `ACK`: the next
    /// `handle_timeout` (due at once) sees whether it can go out.
    release: BTreeSet<String>,
    /// Servers whose connection may have events or blocks to send.
    touched: BTreeSet<ServerKey>,
    /// The latest `now` the pool was given; [`Self::ack`] has none, and what it sets off
    /// runs in a `handle_timeout` due at this instant.
    last_now: Option<Instant>,
    /// GRP links, proxied destinations and the PRXY/PFWD in flight.
    grp: grp::GrpState,
}

impl Pool<MemoryMailbox> {
    /// A pool with no servers whose received messages wait in memory.
    pub fn new(config: PoolConfig) -> Self {
        Self::with_mailbox(config, MemoryMailbox::new())
    }
}

impl<M: Mailbox> Pool<M> {
    /// A pool storing received messages in `mailbox`.
    pub fn with_mailbox(config: PoolConfig, mailbox: M) -> Self {
        Self {
            config,
            servers: BTreeMap::new(),
            queues: BTreeMap::new(),
            senders: BTreeMap::new(),
            mailbox,
            actions: VecDeque::new(),
            next_seq: 1,
            duplicates_suppressed: 0,
            malformed_rejected: 0,
            confirmations_rejected: 0,
            charges: BTreeMap::new(),
            waiting: BTreeMap::new(),
            app_senders: BTreeMap::new(),
            held: BTreeSet::new(),
            release: BTreeSet::new(),
            touched: BTreeSet::new(),
            last_now: None,
            grp: grp::GrpState::default(),
        }
    }

    /// The message store.
    pub fn mailbox(&self) -> &M {
        &self.mailbox
    }

    /// The mailbox, to commit what it staged (see the journal methods of [`Mailbox`]).
    pub fn mailbox_mut(&mut self) -> &mut M {
        &mut self.mailbox
    }

    /// Received messages dropped because they were already delivered (a resent copy, or a
    /// re-delivery after a lost ACK), over all queues since the pool started. Per queue:
    /// [`QueueInfo::duplicates_suppressed`].
    pub fn duplicates_suppressed(&self) -> u64 {
        self.duplicates_suppressed
    }

    /// Received messages acknowledged and dropped because they did not carry a muxd app
    /// envelope this pool reads, over all queues since the pool started. Per queue:
    /// [`QueueInfo::malformed_rejected`].
    pub fn malformed_rejected(&self) -> u64 {
        self.malformed_rejected
    }

    /// Confirmations refused because another sender's confirmation had already set the
    /// queue's e2e key, over all queues since the pool started. Per queue:
    /// [`QueueInfo::confirmations_rejected`].
    pub fn confirmations_rejected(&self) -> u64 {
        self.confirmations_rejected
    }

    /// One entry per server the pool knows, in a stable order.
    pub fn status(&self) -> Vec<ServerStatus> {
        self.servers
            .iter()
            .map(|(key, s)| ServerStatus {
                server: key.clone(),
                profile: key.transport().profile(),
                state: s.state,
                since: s.since,
                last_error: s.last_error.clone(),
                queues: s.queues + self.senders_of(key).count(),
                attempt: s.backoff.attempt(),
                next_retry_at: s.retry_at.filter(|_| s.state == ConnState::BackingOff),
                pending_sends: self.senders_of(key).map(|(_, q)| q.outbox.len()).sum(),
                lag: s.lag.summary(),
                grp: self.grp.status(key),
            })
            .collect()
    }

    /// The round-trip samples of one server, oldest first.
    pub fn lag(&self, server: &ServerKey) -> Option<&LagHistory> {
        self.servers.get(server).map(|s| &s.lag)
    }

    /// The sender queues whose server is `key` (the table is ordered by server first).
    fn senders_of<'a>(
        &'a self,
        key: &'a ServerKey,
    ) -> impl Iterator<Item = (&'a DestKey, &'a SndQueue)> + 'a {
        let start = DestKey {
            server: key.clone(),
            sender_id: Vec::new(),
        };
        self.senders
            .range(start..)
            .take_while(move |(d, _)| d.server == *key)
    }

    /// The queues `app` owns, by queue id.
    pub fn queues(&self, app: &str) -> Vec<QueueInfo> {
        self.queues
            .iter()
            .filter(|(_, q)| q.app == app)
            .map(|(id, q)| self.info(id, q))
            .collect()
    }

    /// Up to `max` (all when `None`) messages waiting in one of `app`'s queues, oldest first.
    /// They stay until [`ack`](Self::ack)ed.
    pub fn messages(
        &self,
        app: &str,
        queue_id: &str,
        max: Option<usize>,
    ) -> Result<Vec<ReceivedMessage>, PoolError> {
        self.owned(app, queue_id)?;
        Ok(self.mailbox.peek(queue_id, max.unwrap_or(usize::MAX)))
    }

    /// The app has message `msg_id`: forget it.
    ///
    /// When the app's queues were at a waiting-message limit, an `ACK` held back from the
    /// server may now go out: [`poll_timeout`](Self::poll_timeout) then asks for a
    /// [`handle_timeout`](Self::handle_timeout) at once, which sends it.
    pub fn ack(&mut self, app: &str, queue_id: &str, msg_id: &str) -> Result<(), PoolError> {
        self.owned(app, queue_id)?;
        let before = self.usage(queue_id);
        if !self.mailbox.remove(queue_id, msg_id) {
            return Err(PoolError::NotFound(format!("message {msg_id}")));
        }
        let after = self.usage(queue_id);
        self.account(app, before, after);
        let start = (app.to_owned(), String::new());
        if self
            .held
            .range(start..)
            .next()
            .is_some_and(|(a, _)| a == app)
        {
            self.release.insert(app.to_owned());
        }
        Ok(())
    }

    /// Where one of `app`'s messages is while the pool still has it: `"queued"` (waiting
    /// for its turn or its server) or `"sending"` (on the wire, no answer yet). `None` once
    /// it was sent or failed (the journal knows), or when it is not the app's.
    pub fn message_state(&self, app: &str, message_id: u64) -> Option<&'static str> {
        self.senders
            .values()
            .flat_map(|s| s.outbox.iter())
            .find(|m| m.seq == message_id && m.app == app)
            .map(|m| match m.state {
                OutState::Queued => "queued",
                OutState::InFlight(_) => "sending",
            })
    }

    // ---- restart ----

    /// After a restart: a queue the journal kept ([`Mailbox::save_queue`]). The mailbox
    /// must already hold its waiting messages and seq window. Its subscription is pending
    /// until [`Self::resume`] connects its server.
    pub fn restore_queue(&mut self, now: Instant, saved: &SavedQueue) -> Result<(), PoolError> {
        let mut queue = RcvQueue::restore(saved)?;
        if self.queues.contains_key(&saved.queue_id) {
            return Err(PoolError::InvalidArgument(format!(
                "queue {} restored twice",
                saved.queue_id
            )));
        }
        let key = self.restored_server(now, &saved.server)?;
        if let Some(window) = self.mailbox.delivered_seqs(&saved.queue_id) {
            queue.delivered = window;
        }
        queue.duplicates_suppressed = self.mailbox.duplicates_dropped(&saved.queue_id);
        self.duplicates_suppressed += queue.duplicates_suppressed;
        let usage = self.usage(&saved.queue_id);
        self.account(&queue.app, Waiting::default(), usage);
        if let Some(s) = self.servers.get_mut(&key) {
            s.queues += 1;
            s.live_queues += 1;
        }
        self.queues.insert(saved.queue_id.clone(), queue);
        Ok(())
    }

    /// After a restart: a destination's sender state ([`Mailbox::save_sender`]).
    pub fn restore_sender(&mut self, now: Instant, saved: &SavedSender) -> Result<(), PoolError> {
        let sender = SndQueue::restore(saved)?;
        let server = self.restored_server(now, &saved.server)?;
        let dest = DestKey {
            server,
            sender_id: saved.sender_id.clone(),
        };
        for app in &sender.apps {
            *self.app_senders.entry(app.clone()).or_default() += 1;
        }
        // A destination the journal named twice counts once.
        if let Some(old) = self.senders.insert(dest, sender) {
            self.uncount_sender(&old);
        }
        Ok(())
    }

    /// After a restart: a message the journal kept ([`Mailbox::enqueue`]) and that had not
    /// finished, in the order they were handed over. Its sender must be restored first.
    /// `queued_at` bounds its wait with [`PoolConfig::send_timeout`] as before the restart.
    pub fn restore_message(
        &mut self,
        now: Instant,
        saved: SavedMessage,
        queued_at: Instant,
    ) -> Result<(), PoolError> {
        let server = self.restored_server(now, &saved.server)?;
        let dest = DestKey {
            server: server.clone(),
            sender_id: saved.sender_id.clone(),
        };
        let Some(sender) = self.senders.get_mut(&dest) else {
            return Err(PoolError::InvalidArgument(format!(
                "message {} has no sender state",
                saved.id
            )));
        };
        // Only the first `send_window` messages of a destination can have been on the wire
        // when the daemon stopped: those may have reached the server, so each travels alone
        // (the recipient drops a copy by its envelope seq); the rest go out as usual.
        let maybe_stored = sender.outbox.len() < self.config.send_window.max(1);
        sender.restore_message(OutMsg {
            seq: saved.id,
            envelope_seq: saved.envelope_seq,
            maybe_stored,
            token: None,
            app: saved.app.clone(),
            body: saved.body,
            state: OutState::Queued,
            retries: 0,
            queued_at,
        });
        if let Some(s) = self.servers.get_mut(&server) {
            s.charge(&saved.app, Budget::Send);
        }
        self.next_seq = self.next_seq.max(saved.id + 1);
        Ok(())
    }

    /// Message ids continue from `next` (the journal's next id), so none is reused.
    pub fn set_next_message_id(&mut self, next: u64) {
        self.next_seq = self.next_seq.max(next);
    }

    /// After restoring: connects every server that has queues to subscribe or messages to
    /// send.
    pub fn resume(&mut self, now: Instant) {
        self.tick(now);
        let keys: Vec<ServerKey> = self.servers.keys().cloned().collect();
        for key in keys {
            let idle = self
                .servers
                .get(&key)
                .is_some_and(|s| matches!(s.state, ConnState::Idle | ConnState::Failed));
            if idle && self.needs_connection(&key) {
                self.connect(now, &key);
            }
        }
    }

    /// The entry of a server named in the journal.
    fn restored_server(&mut self, now: Instant, key: &ServerKey) -> Result<ServerKey, PoolError> {
        if key.transport().profile() == "grp" {
            return self.grp_restored_entry(now, key);
        }
        let address: SmpServer = key
            .address()
            .parse()
            .map_err(|e| PoolError::InvalidArgument(format!("stored server address: {e}")))?;
        self.server_entry(now, &address, key.transport())
    }

    /// Messages and body bytes waiting in one queue.
    fn usage(&self, queue_id: &str) -> Waiting {
        Waiting {
            messages: self.mailbox.count(queue_id),
            bytes: self.mailbox.waiting_bytes(queue_id),
        }
    }

    /// Moves `app`'s running total from a queue's `before` to its `after`.
    fn account(&mut self, app: &str, before: Waiting, after: Waiting) {
        let total = self.waiting.entry(app.to_owned()).or_default();
        total.messages = (total.messages + after.messages).saturating_sub(before.messages);
        total.bytes = (total.bytes + after.bytes).saturating_sub(before.bytes);
        if total.messages == 0 && total.bytes == 0 {
            self.waiting.remove(app);
        }
    }

    /// Whether the queue or its app is at a waiting-message limit: the next `ACK` is held.
    fn at_limit(&self, app: &str, queue_id: &str) -> bool {
        let c = &self.config;
        let queue = self.usage(queue_id);
        let total = self.waiting.get(app).copied().unwrap_or_default();
        queue.messages >= c.max_waiting_per_queue
            || queue.bytes >= c.max_waiting_bytes_per_queue
            || total.messages >= c.max_waiting_per_app
            || total.bytes >= c.max_waiting_bytes_per_app
    }

    fn owned(&self, app: &str, queue_id: &str) -> Result<&RcvQueue, PoolError> {
        self.queues
            .get(queue_id)
            .filter(|q| q.app == app)
            .ok_or_else(|| PoolError::NotFound(format!("queue {queue_id}")))
    }

    fn info(&self, id: &str, q: &RcvQueue) -> QueueInfo {
        QueueInfo {
            queue_id: id.to_owned(),
            server: q.server.clone(),
            queue_uri: q.uri.clone(),
            waiting: self.mailbox.count(id),
            subscription: q.subscription,
            last_error: q.last_error.clone(),
            duplicates_suppressed: q.duplicates_suppressed,
            malformed_rejected: q.malformed_rejected,
            confirmations_rejected: q.confirmations_rejected,
        }
    }

    /// The next thing for the driver to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let servers = self.servers.values().flat_map(|s| {
            let up = s.state == ConnState::Up;
            let ping = match s.ping {
                Some((_, deadline)) => Some(deadline),
                None => up.then(|| s.next_ping()),
            };
            let retry = match s.state {
                // The delay is still to be drawn: as soon as possible.
                ConnState::BackingOff => Some(s.retry_at.unwrap_or(s.since)),
                _ => None,
            };
            let idle = s
                .idle_since
                .zip(s.policy.idle_disconnect)
                .filter(|_| up)
                .map(|(t, d)| later(t, d));
            [
                s.connect_deadline,
                s.conn.as_ref().and_then(Connection::poll_timeout),
                ping.filter(|_| up),
                retry,
                idle,
            ]
        });
        let senders = self.senders.values().flat_map(|s| {
            let expiry = self.config.send_timeout.and_then(|t| {
                s.outbox
                    .iter()
                    .find(|m| m.state == OutState::Queued)
                    .map(|m| later(m.queued_at, t))
            });
            [s.retry_at, expiry]
        });
        let gc = self
            .servers
            .iter()
            .filter(|(key, s)| self.collectable(key, s))
            .map(|(_, s)| Some(later(s.since, self.config.server_linger)));
        // An ack may have freed room for a held ACK: look at once.
        let release = self.last_now.filter(|_| !self.release.is_empty());
        servers
            .chain(senders)
            .chain(gc)
            .chain([release, self.grp_retiring_poll_timeout()])
            .flatten()
            .min()
    }

    /// Takes a request from `app`; its answer comes as [`Action::Reply`] with `token`.
    pub fn handle_request<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        app: &str,
        token: RequestToken,
        request: PoolRequest,
    ) {
        self.tick(now);
        let result = match request {
            PoolRequest::CreateQueue { server, websocket } => {
                self.create_queue(now, rng, app, token, &server, websocket)
            }
            PoolRequest::DeleteQueue { queue_id } => {
                self.delete_queue(now, rng, app, token, queue_id)
            }
            PoolRequest::Send {
                queue_uri,
                body,
                wait,
            } => self.send(now, rng, app, token, &queue_uri, Zeroizing::new(body), wait),
        };
        if let Err(e) = result {
            self.reply(token, Err(e));
        }
        self.drive_all(now, rng);
    }

    /// The transport asked for by [`Action::Connect`] is up: the SMP handshake starts (the
    /// server speaks first, so nothing is sent until its first block arrives).
    pub fn handle_connected<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        server: &ServerKey,
        transport: TransportInfo,
    ) {
        self.tick(now);
        let Some(s) = self.servers.get_mut(server) else {
            self.actions.push_back(Action::Disconnect {
                server: server.clone(),
            });
            return;
        };
        if s.state != ConnState::Connecting {
            // The attempt was given up (timeout) before the transport came up.
            self.actions.push_back(Action::Disconnect {
                server: server.clone(),
            });
            return;
        }
        let identity = ServerIdentity {
            key_hash: s.key_hash,
            tls_leaf_key: transport.tls_leaf_key,
            tls_session_id: transport.tls_session_id,
        };
        let config = profile_config(&self.config.connection);
        s.start_connection(now, Connection::new(now, config, identity, rng));
        self.set_state(now, server, ConnState::Handshaking);
        self.touched.insert(server.clone());
        self.drive_all(now, rng);
    }

    /// One 16384-byte block read from `server`'s transport.
    pub fn handle_block<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        server: &ServerKey,
        block: &[u8],
    ) {
        self.tick(now);
        // Answers to PRXY and PFWD are the GRP proxy's, not the SMP connection's.
        let block = self.grp_intercept(now, server, block);
        // During a GRP renewal, answers to the old session's commands go to it.
        let block = block.and_then(|b| self.grp_route_retiring(now, rng, server, b));
        if let Some(block) = block.as_deref()
            && let Some(s) = self.servers.get_mut(server)
            && let Some(conn) = s.conn.as_mut()
        {
            s.last_received = now;
            conn.handle_input(now, block);
            self.touched.insert(server.clone());
        }
        self.drive_all(now, rng);
    }

    /// `server`'s transport failed to connect, or broke: everything that waited for it fails
    /// with `reason`. After the pool itself asked for [`Action::Disconnect`] the connection is
    /// already forgotten and a late report is ignored.
    pub fn handle_disconnected(&mut self, now: Instant, server: &ServerKey, reason: String) {
        self.tick(now);
        let live = self.servers.get(server).is_some_and(|s| {
            matches!(
                s.state,
                ConnState::Connecting | ConnState::Handshaking | ConnState::Up
            )
        });
        if live {
            let loss = if permanent_transport_failure(&reason) {
                Loss::Permanent
            } else {
                Loss::Transient
            };
            self.lost(now, server, reason, loss);
        }
    }

    /// The kernel's RTT estimate for `server`'s socket (or any other sample the driver
    /// measured), for the lag history.
    pub fn handle_rtt_sample(
        &mut self,
        now: Instant,
        server: &ServerKey,
        rtt: Duration,
        source: LagSource,
    ) {
        if let Some(s) = self.servers.get_mut(server) {
            s.lag.push(now, rtt, source);
        }
    }

    /// PING `server` every `interval` (its policy's `lag_watch_interval` when `None`) while
    /// someone watches its lag; `watch = false` goes back to background keep-alive only.
    /// The interval is clamped to 10 ms – 1 day. Returns whether the server is known.
    pub fn set_lag_watch(
        &mut self,
        server: &ServerKey,
        watch: bool,
        interval: Option<Duration>,
    ) -> bool {
        let Some(s) = self.servers.get_mut(server) else {
            return false;
        };
        s.lag_watch = watch.then(|| {
            interval
                .unwrap_or(s.policy.lag_watch_interval)
                .clamp(LAG_WATCH_MIN, LAG_WATCH_MAX)
        });
        true
    }

    /// `muxctl reconnect`: connect `server` (every server when `None`) again now. A server
    /// that is up is closed and reopened; one that is backing off or lost starts a fresh
    /// backoff schedule. Idle and failed servers with nothing to do are left alone.
    /// Returns how many servers were (re)connected.
    pub fn reconnect(&mut self, now: Instant, server: Option<&ServerKey>) -> usize {
        self.tick(now);
        let keys: Vec<ServerKey> = match server {
            Some(k) => self
                .servers
                .contains_key(k)
                .then(|| k.clone())
                .into_iter()
                .collect(),
            None => self.servers.keys().cloned().collect(),
        };
        let mut count = 0;
        for key in &keys {
            let Some(state) = self.servers.get(key).map(|s| s.state) else {
                continue;
            };
            match state {
                ConnState::Up | ConnState::Handshaking | ConnState::Connecting => {
                    self.lost(now, key, "reconnect requested".to_owned(), Loss::Transient);
                    self.actions.push_back(Action::Disconnect {
                        server: key.clone(),
                    });
                }
                ConnState::Idle | ConnState::Failed if !self.needs_connection(key) => continue,
                _ => {}
            }
            self.wake(now, key);
            count += 1;
        }
        count
    }

    /// The network changed (interface up, new address, resume from sleep): servers that are
    /// backing off or lost are tried again at once with a fresh backoff, and connections that
    /// look up are probed with a PING (two missed PONGs and they are replaced).
    pub fn handle_network_change(&mut self, now: Instant) {
        self.tick(now);
        let keys: Vec<ServerKey> = self.servers.keys().cloned().collect();
        for key in &keys {
            let Some(state) = self.servers.get(key).map(|s| s.state) else {
                continue;
            };
            match state {
                ConnState::Up => {
                    if let Some(s) = self.servers.get_mut(key) {
                        s.probe = true;
                    }
                }
                ConnState::BackingOff | ConnState::Lost => self.wake(now, key),
                ConnState::Failed if self.needs_connection(key) => self.wake(now, key),
                _ => {}
            }
        }
    }

    /// A fresh backoff schedule and a connection attempt now.
    fn wake(&mut self, now: Instant, key: &ServerKey) {
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        s.backoff.wake();
        s.permanent = false;
        s.retry_at = None;
        self.connect(now, key);
    }

    /// Fires what is due at `now`: connect and command timeouts, keep-alives, send retries.
    pub fn handle_timeout<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        self.tick(now);
        let keys: Vec<ServerKey> = self.servers.keys().cloned().collect();
        for key in &keys {
            let Some(s) = self.servers.get_mut(key) else {
                continue;
            };
            if s.connect_deadline.is_some_and(|d| d <= now) {
                let reason = format!(
                    "connection not established within {}s",
                    self.config.connect_timeout.as_secs()
                );
                self.lost(now, key, reason, Loss::Transient);
                self.actions.push_back(Action::Disconnect {
                    server: key.clone(),
                });
                continue;
            }
            if let Some(conn) = s.conn.as_mut()
                && conn.poll_timeout().is_some_and(|t| t <= now)
            {
                conn.handle_timeout(now, rng);
                self.touched.insert(key.clone());
            }
            match s.state {
                ConnState::Up => self.keepalive(now, rng, key),
                ConnState::BackingOff => self.backoff_step(now, rng, key),
                _ => {}
            }
            self.idle_check(now, key);
        }
        self.expire_sends(now);
        let due: Vec<DestKey> = self
            .senders
            .iter_mut()
            .filter(|(_, s)| s.retry_at.is_some_and(|t| t <= now))
            .map(|(k, s)| {
                s.retry_at = None;
                k.clone()
            })
            .collect();
        for dest in &due {
            self.pump(now, rng, dest);
        }
        self.release_held(now, rng);
        self.grp_retiring_timeout(now, rng);
        self.drive_all(now, rng);
        self.collect_garbage(now);
    }

    /// Remembers the latest `now`, for what [`Self::ack`] sets off.
    fn tick(&mut self, now: Instant) {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
    }

    /// Sends the `ACK`s held back for apps that acknowledged messages since, on queues that
    /// are below their limits now. A held `ACK` whose connection is gone is dropped: the
    /// server delivers the message again after the re-SUB, and the decision is taken anew.
    fn release_held<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        for app in std::mem::take(&mut self.release) {
            let start = (app.clone(), String::new());
            let held: Vec<String> = self
                .held
                .range(start..)
                .take_while(|(a, _)| *a == app)
                .map(|(_, q)| q.clone())
                .collect();
            for queue_id in held {
                if self.at_limit(&app, &queue_id) {
                    continue;
                }
                self.held.remove(&(app.clone(), queue_id.clone()));
                let Some(q) = self.queues.get_mut(&queue_id) else {
                    continue;
                };
                let Some(msg_id) = q.held_ack.take() else {
                    continue;
                };
                let key = q.server.clone();
                let up = self
                    .servers
                    .get(&key)
                    .is_some_and(|s| s.state == ConnState::Up);
                if up && q.subscription == Subscription::Subscribed {
                    tracing::debug!(server = %key, %queue_id, "sending a held ACK");
                    self.queue_command(now, rng, &key, &queue_id, &Command::Ack(msg_id));
                }
            }
        }
    }

    /// Whether a server can be forgotten once it has lingered: no connection wanted, and
    /// nothing refers to it (queues, senders, requests, commands, lag watch).
    fn collectable(&self, key: &ServerKey, s: &Server) -> bool {
        matches!(
            s.state,
            ConnState::Idle | ConnState::Failed | ConnState::Lost
        ) && s.queues == 0
            && s.deferred.is_empty()
            && s.commands.is_empty()
            && s.lag_watch.is_none()
            && s.load.is_empty()
            && self.senders_of(key).next().is_none()
    }

    /// Forgets servers that had nothing to do for `server_linger`.
    fn collect_garbage(&mut self, now: Instant) {
        let linger = self.config.server_linger;
        let expired: Vec<ServerKey> = self
            .servers
            .iter()
            .filter(|(key, s)| self.collectable(key, s) && later(s.since, linger) <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in expired {
            tracing::debug!(server = %key, "forgetting an unused server");
            self.servers.remove(&key);
            self.touched.remove(&key);
        }
    }

    // ---- requests ----

    fn create_queue<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        app: &str,
        token: RequestToken,
        server: &str,
        websocket: bool,
    ) -> Result<(), PoolError> {
        if grp::is_grp(server) {
            return self.grp_create_queue(now, rng, app, token, server);
        }
        let mut address: SmpServer = server
            .parse()
            .map_err(|e| PoolError::InvalidArgument(format!("server address {server:?}: {e}")))?;
        let basic_auth = address.basic_auth.take().map(Zeroizing::new);
        let transport = if websocket {
            Transport::WebSocket
        } else {
            Transport::Tls
        };
        let key = self.server_entry(now, &address, transport)?;
        let create = Deferred::Create {
            app: app.to_owned(),
            token,
            basic_auth,
        };
        self.defer(now, rng, &key, app, token, create)
    }

    fn delete_queue<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        app: &str,
        token: RequestToken,
        queue_id: String,
    ) -> Result<(), PoolError> {
        let q = self.owned(app, &queue_id)?;
        if q.subscription == Subscription::Gone {
            // The server already deleted it; there is nothing to tell the server.
            self.forget(&queue_id);
            self.reply(token, Ok(PoolReply::Deleted));
            return Ok(());
        }
        let key = q.server.clone();
        let delete = Deferred::Delete {
            app: app.to_owned(),
            token,
            queue_id,
        };
        self.defer(now, rng, &key, app, token, delete)
    }

    /// Queues a create or delete for `key` once it is admitted (server not lost, the app's
    /// request budget there not spent), and connects or runs it.
    fn defer<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        app: &str,
        token: RequestToken,
        deferred: Deferred,
    ) -> Result<(), PoolError> {
        self.check_not_lost(key)?;
        self.check_capacity(key, app, Budget::Request)?;
        self.charge(token, key, app, Budget::Request)?;
        if let Some(s) = self.servers.get_mut(key) {
            s.deferred.push_back(deferred);
        }
        self.connect_or_run(now, rng, key);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn send<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        app: &str,
        token: RequestToken,
        queue_uri: &str,
        body: Zeroizing<Vec<u8>>,
        wait: bool,
    ) -> Result<(), PoolError> {
        if body.len() > MAX_BODY_LEN {
            return Err(PoolError::InvalidArgument(format!(
                "message of {} bytes exceeds {MAX_BODY_LEN}",
                body.len()
            )));
        }
        // A GRP destination is only ever reached through a proxy relay (two-hop, §10).
        let grp_dest = self.grp_send_route(now, queue_uri)?;
        let mut uri: QueueUri = match &grp_dest {
            Some((uri, _)) => uri.clone(),
            None => queue_uri
                .parse()
                .map_err(|e| PoolError::InvalidArgument(format!("queue URI: {e}")))?,
        };
        let recipient = X25519PublicKey::from_spki(&uri.dh_key)
            .map_err(|e| PoolError::InvalidArgument(format!("queue URI dh key: {e}")))?;
        uri.server.basic_auth = None;
        // A sender's URI does not say how to reach the server: reuse a WebSocket connection
        // when that is the only one the pool has to it, else TLS.
        let tls = ServerKey::new(&uri.server, Transport::Tls);
        let ws = ServerKey::new(&uri.server, Transport::WebSocket);
        let transport = if !self.servers.contains_key(&tls) && self.servers.contains_key(&ws) {
            Transport::WebSocket
        } else {
            Transport::Tls
        };
        let key = match grp_dest {
            Some((_, key)) => key,
            None => self.server_entry(now, &uri.server, transport)?,
        };
        self.check_capacity(&key, app, Budget::Send)?;
        let dest = DestKey {
            server: key.clone(),
            sender_id: uri.sender_id.clone(),
        };
        let existing = self.senders.get(&dest);
        let new_for_app = existing.is_none_or(|s| !s.apps.contains(app));
        let app_count = self.app_senders.get(app).copied().unwrap_or(0);
        if new_for_app && app_count >= self.config.max_senders_per_app {
            return Err(PoolError::LimitReached(format!(
                "sending to too many queues at once (limit {})",
                self.config.max_senders_per_app
            )));
        }
        if let Some(sender) = existing
            && !sender.matches(&recipient)
            && !sender.rekeyable()
        {
            return Err(PoolError::InvalidArgument(
                "queue URI has a different dh key than the earlier sends to this queue that \
                 are still in progress or were delivered"
                    .to_owned(),
            ));
        }
        if wait && self.charges.contains_key(&token) {
            return Err(PoolError::InvalidArgument(format!(
                "request token {} is already in use",
                token.0
            )));
        }
        // A message is charged to its app's budget on the server until it is sent or fails,
        // whether or not the app waits for that.
        if let Some(s) = self.servers.get_mut(&key) {
            s.charge(app, Budget::Send);
        }
        let sender = self
            .senders
            .entry(dest.clone())
            .or_insert_with(|| SndQueue::new(rng, &uri, recipient));
        if !sender.matches(&recipient) {
            // A stale or wrong URI was used first, and nothing of it reached the recipient.
            tracing::info!(server = %key, "queue URI with a new dh key replaces the old one");
            sender.rekey(rng, &uri, recipient);
        }
        if sender.apps.insert(app.to_owned()) {
            *self.app_senders.entry(app.to_owned()).or_default() += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let envelope_seq = sender.next_envelope_seq();
        // Write-ahead: the sender's keys and seq counter and the message reach the journal
        // before the reply and before anything of them reaches the server.
        self.mailbox.save_sender(&sender.save(&dest));
        self.mailbox.enqueue(&SavedMessage {
            id: seq,
            server: key.clone(),
            sender_id: dest.sender_id.clone(),
            app: app.to_owned(),
            envelope_seq,
            body: body.clone(),
        });
        sender.outbox.push_back(OutMsg {
            seq,
            envelope_seq,
            maybe_stored: false,
            token: wait.then_some(token),
            app: app.to_owned(),
            body,
            state: OutState::Queued,
            retries: 0,
            queued_at: now,
        });
        if !wait {
            self.actions.push_back(Action::Reply {
                token,
                result: Ok(PoolReply::Queued {
                    message_id: seq.to_string(),
                }),
            });
        }
        self.connect_or_run(now, rng, &key);
        Ok(())
    }

    /// A message left its outbox: the server accepted it, or it failed for good. Frees its
    /// budget, records the outcome in the journal and tells the app.
    fn finish_message(&mut self, server: &ServerKey, msg: OutMsg, result: Result<(), PoolError>) {
        if let Some(s) = self.servers.get_mut(server) {
            s.release(&msg.app, Budget::Send);
        }
        let message_id = msg.seq.to_string();
        let outcome = match &result {
            Ok(()) => MessageOutcome::Sent,
            Err(e) => MessageOutcome::Failed(e.to_string()),
        };
        self.mailbox.message_finished(msg.seq, &outcome);
        let event = match outcome {
            MessageOutcome::Sent => PoolEvent::MessageSent {
                app: msg.app.clone(),
                message_id: message_id.clone(),
            },
            MessageOutcome::Failed(reason) => PoolEvent::MessageFailed {
                app: msg.app.clone(),
                message_id: message_id.clone(),
                reason,
            },
        };
        self.actions.push_back(Action::Event(event));
        if let Some(token) = msg.token {
            let result = result.map(|()| PoolReply::Sent { message_id });
            self.actions.push_back(Action::Reply { token, result });
        }
    }

    /// Journals a sender entry whose durable state (secured, confirmation) may have changed.
    fn journal_sender(&mut self, dest: &DestKey, before: (bool, u8)) {
        if let Some(s) = self.senders.get(dest)
            && s.journal_state() != before
        {
            self.mailbox.save_sender(&s.save(dest));
        }
    }

    /// The durable state of a sender entry, to see whether it changed.
    fn sender_state(&self, dest: &DestKey) -> (bool, u8) {
        self.senders
            .get(dest)
            .map_or((false, 0), SndQueue::journal_state)
    }

    /// Charges a request the pool accepted to `app`'s budget on `key`, until its reply.
    fn charge(
        &mut self,
        token: RequestToken,
        key: &ServerKey,
        app: &str,
        budget: Budget,
    ) -> Result<(), PoolError> {
        if self.charges.contains_key(&token) {
            // The driver reused the token of a request still running: its reply could not
            // be told apart.
            return Err(PoolError::InvalidArgument(format!(
                "request token {} is already in use",
                token.0
            )));
        }
        if let Some(s) = self.servers.get_mut(key) {
            s.charge(app, budget);
        }
        self.charges.insert(
            token,
            Charge {
                server: key.clone(),
                app: app.to_owned(),
                budget,
            },
        );
        Ok(())
    }

    /// The server's entry, created (idle) on first use.
    fn server_entry(
        &mut self,
        now: Instant,
        address: &SmpServer,
        transport: Transport,
    ) -> Result<ServerKey, PoolError> {
        let key_hash: [u8; 32] = address.key_hash.as_slice().try_into().map_err(|_| {
            PoolError::InvalidArgument(format!(
                "server keyHash must be 32 bytes, got {}",
                address.key_hash.len()
            ))
        })?;
        let key = ServerKey::new(address, transport);
        if !self.servers.contains_key(&key) {
            self.make_room(&key)?;
            let policy = self.policy_for(&key);
            let server = Server::new(now, address, KeyHash::from_bytes(key_hash), policy);
            self.servers.insert(key.clone(), server);
        }
        Ok(key)
    }

    /// The configured policy of a server: its entry in `server_policies` (matched on the
    /// normalised address), else the default.
    fn policy_for(&self, key: &ServerKey) -> crate::config::ServerPolicy {
        self.config
            .server_policies
            .iter()
            .find(|(address, _)| {
                address
                    .parse::<SmpServer>()
                    .is_ok_and(|a| ServerKey::new(&a, key.transport()).address() == key.address())
            })
            .map_or_else(|| self.config.policy.clone(), |(_, p)| p.clone())
    }

    /// Queue creations and deletions fail at once on a server the pool gave up on, rather
    /// than wait for a connection that will not come by itself.
    fn check_not_lost(&self, key: &ServerKey) -> Result<(), PoolError> {
        match self.servers.get(key) {
            Some(s) if s.state == ConnState::Lost => Err(PoolError::upstream(
                key,
                format!(
                    "server lost ({}); waiting for a reconnect request or a network change",
                    s.last_error.as_deref().unwrap_or("unreachable")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A new server entry needs room: at `max_servers`, the unused server that has been
    /// unused longest is forgotten early; when every one is in use the request fails.
    fn make_room(&mut self, key: &ServerKey) -> Result<(), PoolError> {
        if self.servers.len() < self.config.max_servers {
            return Ok(());
        }
        let oldest = self
            .servers
            .iter()
            .filter(|(k, s)| self.collectable(k, s))
            .min_by_key(|(_, s)| s.since)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(old) => {
                tracing::debug!(server = %old, "forgetting an unused server for a new one");
                self.servers.remove(&old);
                self.touched.remove(&old);
                Ok(())
            }
            None => Err(PoolError::LimitReached(format!(
                "too many servers in use (limit {}); not adding {key}",
                self.config.max_servers
            ))),
        }
    }

    /// Each app has its own budget per server, one for messages and one for queue creations
    /// and deletions, so one app's backlog cannot make another's requests fail.
    fn check_capacity(&self, key: &ServerKey, app: &str, budget: Budget) -> Result<(), PoolError> {
        let Some(s) = self.servers.get(key) else {
            return Ok(());
        };
        let load = s.load(app);
        let (used, limit, what) = match budget {
            Budget::Send => (
                load.sends,
                self.config.max_pending_per_server,
                "messages waiting",
            ),
            Budget::Request => (
                load.requests,
                self.config.max_pending_requests_per_server,
                "queue requests waiting",
            ),
        };
        if used >= limit {
            return Err(PoolError::upstream(
                key,
                format!("too many pending requests: {used} {what} for this app (limit {limit})"),
            ));
        }
        Ok(())
    }

    /// Works off the server's waiting requests when it is up, else asks for a connection.
    fn connect_or_run<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
    ) {
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        match s.state {
            ConnState::Up => self.run_waiting(now, rng, key),
            // Sends wait for the next attempt (or a reconnect request when lost).
            ConnState::Connecting
            | ConnState::Handshaking
            | ConnState::BackingOff
            | ConnState::Lost => {}
            ConnState::Idle | ConnState::Failed => self.connect(now, key),
        }
    }

    /// Asks the driver for a transport to `key`.
    fn connect(&mut self, now: Instant, key: &ServerKey) {
        if key.transport() == Transport::GrpProxied {
            return self.grp_connect_route(now, key);
        }
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        s.connect_deadline = Some(later(now, self.config.connect_timeout));
        s.retry_at = None;
        self.actions.push_back(Action::Connect {
            server: key.clone(),
            host: s.host.clone(),
            port: s.port,
            key_hash: s.key_hash,
            websocket: key.transport() == Transport::WebSocket,
        });
        self.set_state(now, key, ConnState::Connecting);
    }

    /// Whether anything needs `key`'s connection: queues to receive on, messages to send,
    /// requests waiting for it.
    fn needs_connection(&self, key: &ServerKey) -> bool {
        let Some(s) = self.servers.get(key) else {
            return false;
        };
        s.live_queues > 0
            || !s.deferred.is_empty()
            || self.senders_of(key).any(|(_, q)| !q.outbox.is_empty())
            || self.grp_proxy_needed(key)
    }

    /// Keep-alive of an established connection: PONG deadline, then the next PING (after
    /// `ping_idle` of silence, every `lag_watch` interval, after `stall_probe_after` of
    /// silence while commands wait for answers, or at once after a miss).
    fn keepalive<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, key: &ServerKey) {
        if self.grp_skip_keepalive(key) {
            return;
        }
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        if let Some((corr_id, deadline)) = s.ping {
            if deadline > now {
                return;
            }
            // A late PONG will find no command and be ignored.
            s.ping = None;
            s.untrack(&corr_id);
            // Blocks that came after the PING show the link carries data: the server is
            // busy, and its PONG waits behind its other answers. Only silence is a miss.
            let heard = s.last_ping.is_some_and(|sent| s.last_received > sent);
            if heard {
                s.missed_pongs = 0;
            } else {
                s.missed_pongs += 1;
            }
            if s.missed_pongs >= s.policy.max_missed_pongs.max(1) {
                let reason = format!(
                    "no PONG within {}s, {} times in a row",
                    s.policy.pong_timeout.as_secs(),
                    s.missed_pongs
                );
                tracing::info!(server = %key, %reason, "dead link");
                self.lost(now, key, reason, Loss::Transient);
                self.actions.push_back(Action::Disconnect {
                    server: key.clone(),
                });
                return;
            }
        }
        if s.next_ping() > now {
            return;
        }
        let deadline = later(now, s.policy.pong_timeout);
        match command_on(
            &mut self.servers,
            &mut self.touched,
            now,
            rng,
            key,
            b"",
            &Command::Ping,
            None,
            Pending::Ping,
        ) {
            Ok(corr_id) => {
                if let Some(s) = self.servers.get_mut(key) {
                    s.ping = Some((corr_id, deadline));
                    s.last_ping = Some(now);
                    s.probe = false;
                }
            }
            Err(e) => tracing::warn!(server = %key, error = %e, "could not queue PING"),
        }
    }

    /// Backing off: draw the delay (once per failure), then connect when it has passed, or
    /// give up when the policy has no attempts left.
    fn backoff_step<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, key: &ServerKey) {
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let retry_at = match s.retry_at {
            Some(t) => t,
            None => match s.backoff.next_delay(rng) {
                Some(delay) => {
                    let at = later(s.since, delay);
                    s.retry_at = Some(at);
                    let attempt = s.backoff.attempt();
                    tracing::debug!(server = %key, ?delay, attempt, "reconnecting later");
                    self.actions
                        .push_back(Action::Event(PoolEvent::Reconnecting {
                            server: key.clone(),
                            delay,
                            attempt,
                        }));
                    at
                }
                None => {
                    tracing::info!(server = %key, attempts = s.backoff.attempt(), "giving up");
                    self.set_state(now, key, ConnState::Lost);
                    return;
                }
            },
        };
        if retry_at <= now {
            self.connect(now, key);
        }
    }

    /// Starts, clears or fires the idle timer of an established connection.
    fn idle_check(&mut self, now: Instant, key: &ServerKey) {
        let busy = self.needs_connection(key);
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let Some(after) = s
            .policy
            .idle_disconnect
            .filter(|_| s.state == ConnState::Up)
        else {
            s.idle_since = None;
            return;
        };
        if busy || !s.commands.is_empty() || s.lag_watch.is_some() || s.resubscribing {
            s.idle_since = None;
            return;
        }
        let since = *s.idle_since.get_or_insert(now);
        if later(since, after) <= now {
            tracing::debug!(server = %key, "closing an idle connection");
            s.conn = None;
            s.idle_since = None;
            s.ping = None;
            self.actions.push_back(Action::Disconnect {
                server: key.clone(),
            });
            self.set_state(now, key, ConnState::Idle);
        }
    }

    /// Fails messages that waited longer than `send_timeout` without being sent.
    fn expire_sends(&mut self, now: Instant) {
        let Some(timeout) = self.config.send_timeout else {
            return;
        };
        let expired: Vec<(DestKey, u64)> = self
            .senders
            .iter()
            .flat_map(|(d, q)| {
                q.outbox
                    .iter()
                    .filter(|m| m.state == OutState::Queued && later(m.queued_at, timeout) <= now)
                    .map(|m| (d.clone(), m.seq))
            })
            .collect();
        for (dest, seq) in expired {
            let state = self
                .servers
                .get(&dest.server)
                .map_or("unknown", |s| s.state.as_str());
            let reason = format!("not sent within {}s (server {state})", timeout.as_secs());
            let error = PoolError::upstream(&dest.server, reason);
            self.fail_message(&dest, seq, error);
        }
    }

    /// Sends what waited for the server: queue creations and deletions, then messages.
    fn run_waiting<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, key: &ServerKey) {
        while let Some(d) = self
            .servers
            .get_mut(key)
            .and_then(|s| s.deferred.pop_front())
        {
            match d {
                Deferred::Create {
                    app,
                    token,
                    basic_auth,
                } => self.send_new(now, rng, key, app, token, basic_auth),
                Deferred::Delete {
                    token, queue_id, ..
                } => {
                    self.send_del(now, rng, key, token, queue_id);
                }
            }
        }
        let dests: Vec<DestKey> = self.senders_of(key).map(|(d, _)| d.clone()).collect();
        for dest in &dests {
            self.pump(now, rng, dest);
        }
    }

    fn send_new<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        app: String,
        token: RequestToken,
        basic_auth: Option<Zeroizing<String>>,
    ) {
        let keys = NewQueueKeys {
            app,
            token,
            rcv_auth: Ed25519SecretKey::generate(rng),
            rcv_dh: X25519SecretKey::generate(rng),
            e2e: X25519SecretKey::generate(rng),
        };
        let mut command = Command::New(NewQueue {
            rcv_auth_key: keys.rcv_auth.public_key().to_spki(),
            rcv_dh_key: keys.rcv_dh.public_key().to_spki(),
            basic_auth: basic_auth.map(|p| p.as_bytes().to_vec()),
            sub_mode: SubscriptionMode::Subscribe,
            // A messaging queue lets the sender secure it (SKEY) at v9+; older servers
            // ignore the field.
            queue_request: Some(QueueRequest::Messaging(None)),
            ntf_creds: None,
        });
        let auth = QueueAuthKey::Ed25519(keys.rcv_auth.clone());
        let sent = command_on(
            &mut self.servers,
            &mut self.touched,
            now,
            rng,
            key,
            b"",
            &command,
            Some(&auth),
            Pending::New(Box::new(keys)),
        );
        // The password is in the encoded block now; wipe this copy.
        if let Command::New(n) = &mut command
            && let Some(p) = n.basic_auth.as_mut()
        {
            p.zeroize();
        }
        if let Err(e) = sent {
            self.reply(token, Err(PoolError::upstream(key, format!("NEW: {e}"))));
        }
    }

    fn send_del<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        token: RequestToken,
        queue_id: String,
    ) {
        let Some(q) = self.queues.get(&queue_id) else {
            self.reply(token, Err(PoolError::NotFound(format!("queue {queue_id}"))));
            return;
        };
        let result = command_on(
            &mut self.servers,
            &mut self.touched,
            now,
            rng,
            key,
            &q.rcv_id,
            &Command::Del,
            Some(&q.rcv_auth),
            Pending::Del { token, queue_id },
        );
        if let Err(e) = result {
            self.reply(token, Err(PoolError::upstream(key, format!("DEL: {e}"))));
        }
    }

    /// Sends what the destination's window allows: SKEY first in the fast flow, then the
    /// confirmation alone, then messages in order.
    fn pump<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, dest: &DestKey) {
        let Some(version) = self
            .servers
            .get(&dest.server)
            .filter(|s| s.state == ConnState::Up)
            .and_then(|s| s.conn.as_ref())
            .and_then(Connection::version)
        else {
            return;
        };
        let Some(s) = self.senders.get_mut(dest) else {
            return;
        };
        if s.outbox.is_empty() || s.retry_at.is_some_and(|t| t > now) {
            return;
        }
        let fast = s.fast_flow(version);
        if s.confirmation != Confirmation::Confirmed && fast {
            match s.secured {
                Secured::Yes => {}
                Secured::InFlight => return,
                Secured::No => {
                    let command = Command::SKey(s.auth.public_key().to_spki());
                    let pending = Pending::SKey { dest: dest.clone() };
                    let sent = command_on(
                        &mut self.servers,
                        &mut self.touched,
                        now,
                        rng,
                        &dest.server,
                        &dest.sender_id,
                        &command,
                        Some(&s.auth),
                        pending,
                    );
                    match sent {
                        Ok(_) => s.secured = Secured::InFlight,
                        Err(e) => {
                            let error = PoolError::upstream(&dest.server, format!("SKEY: {e}"));
                            self.fail_outbox(dest, &error);
                        }
                    }
                    return;
                }
            }
        }
        // A message the server may already hold travels alone, so that a refusal (QUOTA)
        // cannot let the ones behind it overtake it: the recipient would still get it once,
        // but late. Refusals of fresh messages are covered by `cautious`.
        if s.outbox
            .iter()
            .any(|m| m.maybe_stored && matches!(m.state, OutState::InFlight(_)))
        {
            return;
        }
        // One message at a time while the outcome of the previous one decides how the next
        // is sent (confirmation, recipient not yet secured, retry after an error). In the
        // legacy flow a message refused before the recipient's KEY would otherwise be
        // overtaken by the ones behind it once the KEY lands, and arrive out of order.
        let window =
            if s.confirmation != Confirmation::Confirmed || s.cautious || s.secured != Secured::Yes
            {
                1
            } else {
                self.config.send_window.max(1)
            };
        let mut in_flight = s.in_flight();
        let mut failed = Vec::new();
        for i in 0..s.outbox.len() {
            if in_flight >= window {
                break;
            }
            if s.outbox[i].state != OutState::Queued {
                continue;
            }
            let alone = s.outbox[i].maybe_stored;
            if alone && in_flight > 0 {
                break;
            }
            let msg = &s.outbox[i];
            let (body, kind) = match s.seal(rng, fast, msg.envelope_seq, &msg.body) {
                Ok(sealed) => sealed,
                Err(e) => {
                    failed.push((msg.seq, format!("sealing the message: {e}")));
                    continue;
                }
            };
            let signed = !matches!(kind, SendKind::Confirmation { signed: false, .. });
            let command = Command::Send {
                notification: true,
                body,
            };
            let pending = Pending::Send {
                dest: dest.clone(),
                seq: msg.seq,
            };
            let sent = command_on(
                &mut self.servers,
                &mut self.touched,
                now,
                rng,
                &dest.server,
                &dest.sender_id,
                &command,
                signed.then_some(&s.auth),
                pending,
            );
            match sent {
                Ok(_) => {
                    s.outbox[i].state = OutState::InFlight(kind);
                    in_flight += 1;
                    if matches!(kind, SendKind::Confirmation { .. }) {
                        // From now on a restart must assume the recipient may have our key:
                        // the journal hears of it before the block leaves.
                        self.mailbox.save_sender(&s.save(dest));
                        break;
                    }
                    if alone {
                        break;
                    }
                }
                Err(e) => failed.push((s.outbox[i].seq, format!("SEND: {e}"))),
            }
        }
        for (seq, reason) in failed {
            let error = PoolError::upstream(&dest.server, reason);
            self.fail_message(dest, seq, error);
        }
    }

    // ---- connection events ----

    /// Processes the events of every connection that had input or commands since the last
    /// call, then collects the blocks they want to send. Servers nothing happened to are not
    /// visited, so the work follows the traffic rather than the size of the server table.
    fn drive_all<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        while let Some(key) = self.touched.pop_first() {
            let key = &key;
            while let Some(event) = self
                .servers
                .get_mut(key)
                .and_then(|s| s.conn.as_mut())
                .and_then(Connection::poll_event)
            {
                self.on_event(now, rng, key, event);
            }
            // Commands the events caused go out with the blocks collected next.
            self.touched.remove(key);
            let Some(conn) = self.servers.get_mut(key).and_then(|s| s.conn.as_mut()) else {
                continue;
            };
            let mut blocks = Vec::new();
            loop {
                let mut block = Vec::with_capacity(BLOCK_SIZE);
                if conn.poll_transmit(now, &mut block).is_none() {
                    break;
                }
                blocks.push(block);
            }
            for block in blocks {
                self.grp_transmit(now, rng, key, block);
            }
            self.idle_check(now, key);
        }
        self.grp_drive(now, rng);
        self.grp_retire_done();
    }

    fn on_event<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        event: Event,
    ) {
        match event {
            Event::Connected { version, .. } => {
                tracing::debug!(server = %key, version, "SMP connection up");
                self.set_state(now, key, ConnState::Up);
                self.on_up(now, rng, key);
            }
            Event::Response {
                corr_id, result, ..
            } => {
                // A closing connection answers its commands with ConnectionClosed first; what
                // they were for is failed once, by `lost`, from the command table.
                if matches!(result, Err(CommandError::ConnectionClosed)) {
                    return;
                }
                let Some(s) = self.servers.get_mut(key) else {
                    return;
                };
                let Some(flight) = s.untrack(&corr_id) else {
                    return;
                };
                // Every answer is a free lag sample; a timeout is our own verdict, not one.
                let timed_out = matches!(result, Err(CommandError::Timeout));
                if timed_out {
                    s.command_timeouts += 1;
                } else {
                    s.command_timeouts = 0;
                    let source = match flight.pending {
                        Pending::Ping => LagSource::Ping,
                        _ => LagSource::Command,
                    };
                    s.lag
                        .push(now, now.saturating_duration_since(flight.sent), source);
                }
                let dead = timed_out && s.command_timeouts >= s.policy.max_command_timeouts.max(1);
                let timeouts = s.command_timeouts;
                self.on_response(now, rng, key, flight.pending, result);
                let connected = self.servers.get(key).is_some_and(|s| s.conn.is_some());
                if dead && connected {
                    // Traffic may still arrive (so keep-alive sees a live link), but the
                    // server answers nothing: it stopped reading, or its half of the link is
                    // gone. Writing on would only pile up blocks in the driver.
                    let reason = format!("{timeouts} commands in a row timed out");
                    tracing::info!(server = %key, %reason, "dead link");
                    self.lost(now, key, reason, Loss::Transient);
                    self.actions.push_back(Action::Disconnect {
                        server: key.clone(),
                    });
                }
            }
            Event::ServerEvent {
                entity_id,
                response,
            } => match response {
                Response::Msg { msg_id, body } => {
                    self.on_msg(now, rng, key, &entity_id, &msg_id, &body);
                }
                Response::End => self.set_subscription(key, &entity_id, Subscription::Ended, None),
                Response::Deld => {
                    let reason = Some("deleted on the server".to_owned());
                    self.set_subscription(key, &entity_id, Subscription::Gone, reason);
                }
                other => tracing::debug!(server = %key, ?other, "ignored server event"),
            },
            Event::Unexpected { response, .. } => {
                tracing::debug!(server = %key, ?response, "response to no command in flight");
            }
            Event::BadBlock(fault) => tracing::warn!(server = %key, %fault, "bad block"),
            Event::Closed(error) => {
                let loss = match &error {
                    Some(e) if e.reconnect() == ReconnectAction::GiveUp => Loss::Permanent,
                    _ => Loss::Transient,
                };
                let reason = error.as_ref().map_or_else(
                    || "connection closed".to_owned(),
                    ConnectionError::to_string,
                );
                self.lost(now, key, reason, loss);
                self.actions.push_back(Action::Disconnect {
                    server: key.clone(),
                });
            }
            other => tracing::debug!(server = %key, ?other, "ignored connection event"),
        }
    }

    /// The handshake is done: restore subscriptions (in rounds of `resubscribe_chunk`) and
    /// pending KEYs, then run what waited. A GRP session taking over from one being renewed
    /// re-subscribes every live queue: they are subscribed on the old session only.
    fn on_up<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, key: &ServerKey) {
        let mut keys = Vec::new();
        let mut subs = VecDeque::new();
        let renewing = self.grp_renewing(key);
        for (id, q) in self.queues.iter().filter(|(_, q)| q.server == *key) {
            let resubscribe = match q.subscription {
                Subscription::Pending => true,
                Subscription::Subscribed => renewing,
                _ => false,
            };
            if resubscribe {
                subs.push_back(id.clone());
            }
            if let Some(k) = q.sender_key.as_ref().filter(|_| !q.secured) {
                keys.push((id.clone(), Command::Key(k.to_spki())));
            }
        }
        for (queue_id, command) in keys {
            self.queue_command(now, rng, key, &queue_id, &command);
        }
        if let Some(s) = self.servers.get_mut(key) {
            tracing::debug!(server = %key, queues = subs.len(), "resubscribing");
            s.resub_queue = subs;
            s.resub_in_flight = 0;
            s.resub_failed = false;
            s.resubscribing = true;
        }
        self.resub_round(now, rng, key);
        self.run_waiting(now, rng, key);
    }

    /// Sends the next round of SUBs once the previous one is fully answered; when none are
    /// left the connection has succeeded and the backoff starts over.
    fn resub_round<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R, key: &ServerKey) {
        loop {
            let Some(s) = self.servers.get_mut(key) else {
                return;
            };
            if s.resub_in_flight > 0 || !s.resubscribing {
                return;
            }
            if s.resub_queue.is_empty() {
                if s.resub_failed {
                    // Some SUB went unanswered: not a success, the backoff keeps counting.
                    s.resubscribing = false;
                } else {
                    tracing::debug!(server = %key, "connection ready");
                    s.ready();
                }
                return;
            }
            let n = s.policy.resubscribe_chunk.max(1).min(s.resub_queue.len());
            let round: Vec<String> = s.resub_queue.drain(..n).collect();
            let mut sent = 0;
            for queue_id in round {
                if self.send_sub(now, rng, key, &queue_id) {
                    sent += 1;
                }
            }
            if let Some(s) = self.servers.get_mut(key) {
                s.resub_in_flight = sent;
            }
        }
    }

    /// Sends the SUB of a (re)subscription round; `false` when it could not be queued.
    fn send_sub<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        queue_id: &str,
    ) -> bool {
        // A subscribed queue is in a round only when a GRP session is renewed.
        let Some(q) = self
            .queues
            .get_mut(queue_id)
            .filter(|q| live(q.subscription))
        else {
            return false;
        };
        let pending = Pending::Sub {
            queue_id: queue_id.to_owned(),
            resub: true,
        };
        match command_on(
            &mut self.servers,
            &mut self.touched,
            now,
            rng,
            key,
            &q.rcv_id,
            &Command::Sub,
            Some(&q.rcv_auth),
            pending,
        ) {
            Ok(_) => true,
            Err(e) => {
                q.last_error = Some(format!("SUB: {e}"));
                false
            }
        }
    }

    /// Sends a recipient command (SUB, KEY, ACK) for one of the apps' queues.
    fn queue_command<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        queue_id: &str,
        command: &Command,
    ) {
        let Some(q) = self.queues.get_mut(queue_id) else {
            return;
        };
        let queue_id = queue_id.to_owned();
        let pending = match command {
            Command::Sub => Pending::Sub {
                queue_id,
                resub: false,
            },
            Command::Key(_) => Pending::Key { queue_id },
            _ => Pending::Ack { queue_id },
        };
        if let Err(e) = command_on(
            &mut self.servers,
            &mut self.touched,
            now,
            rng,
            key,
            &q.rcv_id,
            command,
            Some(&q.rcv_auth),
            pending,
        ) {
            q.last_error = Some(format!("{}: {e}", command.tag()));
        }
    }

    fn on_response<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        pending: Pending,
        result: Result<Response, CommandError>,
    ) {
        match pending {
            Pending::New(keys) => {
                let token = keys.token;
                let reply = match result {
                    Ok(Response::Ids(ids)) => self.queue_created(key, *keys, ids),
                    Ok(other) => Err(PoolError::upstream(
                        key,
                        format!("unexpected answer to NEW: {other:?}"),
                    )),
                    Err(e) => Err(PoolError::upstream(key, format!("NEW: {e}"))),
                };
                self.reply(token, reply);
            }
            Pending::Sub { queue_id, resub } => {
                if resub && let Some(s) = self.servers.get_mut(key) {
                    s.resub_in_flight = s.resub_in_flight.saturating_sub(1);
                    if matches!(
                        result,
                        Err(CommandError::Timeout | CommandError::InvalidResponse(_))
                    ) {
                        s.resub_failed = true;
                    }
                }
                self.on_sub(now, rng, key, &queue_id, result);
                if resub {
                    self.resub_round(now, rng, key);
                }
            }
            Pending::Ping => {
                if let Some(s) = self.servers.get_mut(key) {
                    s.ping = None;
                    if matches!(result, Ok(Response::Pong)) {
                        s.missed_pongs = 0;
                    }
                }
            }
            Pending::Ack { queue_id } => match result {
                // The server may answer an ACK with the next message.
                Ok(Response::Msg { msg_id, body }) => {
                    let rcv_id = self.queues.get(&queue_id).map(|q| q.rcv_id.clone());
                    if let Some(rcv_id) = rcv_id {
                        self.on_msg(now, rng, key, &rcv_id, &msg_id, &body);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(server = %key, %queue_id, %e, "ACK failed"),
            },
            Pending::Key { queue_id } => {
                if let Some(q) = self.queues.get_mut(&queue_id) {
                    match result {
                        Ok(_) => {
                            q.secured = true;
                            self.mailbox.save_queue(&q.save(&queue_id));
                        }
                        Err(e) => q.last_error = Some(format!("KEY: {e}")),
                    }
                }
            }
            Pending::Del { token, queue_id } => match result {
                // AUTH: it is already gone, which is what the app wanted.
                Ok(_) | Err(CommandError::Server(ErrorType::Auth)) => {
                    self.forget(&queue_id);
                    self.reply(token, Ok(PoolReply::Deleted));
                }
                Err(e) => self.reply(token, Err(PoolError::upstream(key, format!("DEL: {e}")))),
            },
            Pending::SKey { dest } => self.on_skey(now, rng, &dest, result),
            Pending::Send { dest, seq } => self.on_send(now, rng, &dest, seq, result),
        }
    }

    fn on_sub<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        queue_id: &str,
        result: Result<Response, CommandError>,
    ) {
        match result {
            Ok(Response::Msg { msg_id, body }) => {
                self.subscribed(key, queue_id);
                let rcv_id = self.queues.get(queue_id).map(|q| q.rcv_id.clone());
                if let Some(rcv_id) = rcv_id {
                    self.on_msg(now, rng, key, &rcv_id, &msg_id, &body);
                }
            }
            Ok(_) => self.subscribed(key, queue_id),
            Err(CommandError::Server(ErrorType::Auth)) => {
                // The queue no longer exists on the server (or its keys are not ours).
                let reason = Some("SUB: ERR AUTH (queue no longer on the server)".to_owned());
                self.set_queue_subscription(queue_id, Subscription::Gone, reason);
            }
            Err(e) => {
                if let Some(q) = self.queues.get_mut(queue_id) {
                    q.last_error = Some(format!("SUB: {e}"));
                }
            }
        }
    }

    fn queue_created(
        &mut self,
        key: &ServerKey,
        keys: NewQueueKeys,
        ids: QueueIds,
    ) -> Result<PoolReply, PoolError> {
        let server_dh = X25519PublicKey::from_spki(&ids.srv_dh_key)
            .map_err(|e| PoolError::upstream(key, format!("IDS: server DH key: {e}")))?;
        let queue_id = base64url_encode(&ids.rcv_id);
        if self.queues.contains_key(&queue_id) {
            return Err(PoolError::upstream(key, "IDS: recipient id already in use"));
        }
        let server = self
            .servers
            .get(key)
            .ok_or_else(|| PoolError::upstream(key, "server forgotten"))?;
        let uri = QueueUri {
            server: SmpServer {
                key_hash: server.key_hash.as_bytes().to_vec(),
                basic_auth: None,
                hosts: vec![server.host.clone()],
                port: Some(server.port),
            },
            sender_id: ids.snd_id,
            client_versions: URI_CLIENT_VERSIONS,
            dh_key: keys.e2e.public_key().to_spki(),
            // Servers before v9 do not say; their senders use the legacy flow.
            queue_mode: ids.queue_mode,
        };
        let queue = RcvQueue {
            app: keys.app,
            server: key.clone(),
            rcv_id: ids.rcv_id,
            rcv_auth: QueueAuthKey::Ed25519(keys.rcv_auth),
            rcv_dh_secret: keys.rcv_dh.diffie_hellman(&server_dh),
            e2e: keys.e2e,
            e2e_secret: None,
            sender_key: None,
            secured: false,
            uri: self
                .grp_queue_uri(key, &uri)
                .unwrap_or_else(|| uri.to_string()),
            subscription: Subscription::Subscribed,
            last_error: None,
            delivered: SeqWindow::new(),
            duplicates_suppressed: 0,
            malformed_rejected: 0,
            confirmations_rejected: 0,
            held_ack: None,
        };
        let info = self.info(&queue_id, &queue);
        tracing::debug!(server = %key, %queue_id, app = %queue.app, "queue created");
        self.mailbox.save_queue(&queue.save(&queue_id));
        self.queues.insert(queue_id, queue);
        if let Some(s) = self.servers.get_mut(key) {
            s.live_queues += 1;
            s.queues += 1;
        }
        Ok(PoolReply::QueueCreated(info))
    }

    /// A message arrived on one of the apps' queues: store it for the app, then ACK it so the
    /// server delivers the next one.
    fn on_msg<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        rcv_id: &[u8],
        msg_id: &[u8],
        body: &[u8],
    ) {
        let queue_id = base64url_encode(rcv_id);
        let Some(q) = self.queues.get_mut(&queue_id).filter(|q| q.server == *key) else {
            tracing::debug!(server = %key, %queue_id, "MSG for an unknown queue");
            return;
        };
        let mut secure_with = None;
        let before = self.mailbox.count(&queue_id);
        let before_bytes = self.mailbox.waiting_bytes(&queue_id);
        let had_secret = q.e2e_secret.is_some();
        let opened = q.open(msg_id, body);
        if !had_secret && q.e2e_secret.is_some() {
            // The sender's confirmation set the e2e secret: without it the messages after a
            // restart could not be opened. Journaled before this MSG is ACKed.
            self.mailbox.save_queue(&q.save(&queue_id));
        }
        match opened {
            Opened::Quota => {}
            Opened::SecondConfirmation => {
                tracing::warn!(
                    server = %key,
                    %queue_id,
                    "refusing a second sender's confirmation"
                );
                q.last_error = Some(
                    "dropped a confirmation from a second sender (the queue already has one)"
                        .to_owned(),
                );
                q.confirmations_rejected += 1;
                self.confirmations_rejected += 1;
            }
            Opened::Message {
                ts,
                mut body,
                secure_with: k,
            } => {
                // A legacy confirmation is honoured even when its copy is dropped below: the
                // queue still has to be secured with the sender's key.
                if !q.secured {
                    secure_with = k;
                }
                let id = base64url_encode(msg_id);
                let admitted = admit(&mut self.mailbox, q, &queue_id, id, ts, &body);
                // The mailbox has its own copy; this one is plaintext.
                body.zeroize();
                match admitted {
                    Admitted::New { late } => {
                        if late {
                            // Possible only when the server refused it while later messages
                            // got through; delivered out of order rather than lost.
                            tracing::info!(server = %key, %queue_id, "a message arrived late");
                        }
                        self.actions
                            .push_back(Action::Event(PoolEvent::MessageArrived {
                                app: q.app.clone(),
                                queue_id: queue_id.clone(),
                            }));
                    }
                    Admitted::Duplicate { seq } => {
                        tracing::debug!(server = %key, %queue_id, seq, "dropping a copy");
                        q.duplicates_suppressed += 1;
                        self.duplicates_suppressed += 1;
                        self.mailbox
                            .duplicate_dropped(&queue_id, q.duplicates_suppressed);
                    }
                    Admitted::Malformed(e) => {
                        tracing::warn!(server = %key, %queue_id, error = %e, "dropping a message");
                        q.last_error = Some(format!("dropped a message: {e}"));
                        q.malformed_rejected += 1;
                        self.malformed_rejected += 1;
                    }
                }
            }
            Opened::Undecryptable(reason) => {
                tracing::warn!(server = %key, %queue_id, %reason, "dropping a message");
                q.last_error = Some(format!("dropped a message: {reason}"));
            }
        }
        let app = q.app.clone();
        if let Some(k) = secure_with {
            let command = Command::Key(k.to_spki());
            q.sender_key = Some(*k);
            self.mailbox.save_queue(&q.save(&queue_id));
            self.queue_command(now, rng, key, &queue_id, &command);
        }
        let after = self.usage(&queue_id);
        let before = Waiting {
            messages: before,
            bytes: before_bytes,
        };
        self.account(&app, before, after);
        if self.at_limit(&app, &queue_id) {
            // The server sends the next message of this queue only after our ACK: holding it
            // keeps the rest on the server, under its quota, until the app catches up.
            tracing::debug!(server = %key, %queue_id, %app, "queue full; holding its ACK");
            if let Some(q) = self.queues.get_mut(&queue_id) {
                q.held_ack = Some(msg_id.to_vec());
            }
            self.held.insert((app, queue_id));
            return;
        }
        self.queue_command(now, rng, key, &queue_id, &Command::Ack(msg_id.to_vec()));
    }

    fn on_skey<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        dest: &DestKey,
        result: Result<Response, CommandError>,
    ) {
        let before = self.sender_state(dest);
        let Some(s) = self.senders.get_mut(dest) else {
            return;
        };
        match result {
            Ok(_) => s.secured = Secured::Yes,
            Err(CommandError::Timeout) => {
                s.secured = Secured::No;
                s.retry_at = Some(later(now, self.config.auth_retry_delay));
            }
            Err(e) => {
                s.secured = Secured::No;
                let error =
                    PoolError::upstream(&dest.server, format!("could not secure the queue: {e}"));
                self.fail_outbox(dest, &error);
            }
        }
        self.journal_sender(dest, before);
        self.pump(now, rng, dest);
    }

    fn on_send<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        dest: &DestKey,
        seq: u64,
        result: Result<Response, CommandError>,
    ) {
        let before = self.sender_state(dest);
        let Some(s) = self.senders.get_mut(dest) else {
            return;
        };
        let Some(pos) = s.position(seq) else {
            return;
        };
        let OutState::InFlight(kind) = s.outbox[pos].state else {
            return;
        };
        let error = match result {
            Ok(Response::Ok) => {
                match kind {
                    SendKind::Confirmation { .. } => s.confirmation = Confirmation::Confirmed,
                    // In the legacy flow the first signed OK shows the recipient secured it.
                    SendKind::Message => s.secured = Secured::Yes,
                }
                s.cautious = false;
                if let Some(msg) = s.outbox.remove(pos) {
                    self.finish_message(&dest.server, msg, Ok(()));
                }
                None
            }
            Ok(other) => Some(format!("unexpected answer to SEND: {other:?}")),
            Err(CommandError::Server(ErrorType::Quota)) => {
                // The recipient's queue is full: wait, then resend in order.
                s.outbox[pos].state = OutState::Queued;
                s.cautious = true;
                s.retry_at = Some(later(now, self.config.quota_retry_delay));
                None
            }
            Err(CommandError::Server(ErrorType::Auth)) => match kind {
                // Legacy flow: the recipient has not processed our confirmation (KEY) yet.
                SendKind::Message if s.secured != Secured::Yes => {
                    let msg = &mut s.outbox[pos];
                    msg.retries += 1;
                    if msg.retries > self.config.max_auth_retries {
                        Some("the recipient did not secure the queue (ERR AUTH)".to_owned())
                    } else {
                        msg.state = OutState::Queued;
                        s.cautious = true;
                        s.retry_at = Some(later(now, self.config.auth_retry_delay));
                        None
                    }
                }
                // An unsigned confirmation is refused once the queue is secured: the one sent
                // before the connection died did arrive. This message goes out signed.
                SendKind::Confirmation {
                    signed: false,
                    after_unknown: true,
                } => {
                    s.confirmation = Confirmation::Confirmed;
                    s.outbox[pos].state = OutState::Queued;
                    s.cautious = true;
                    None
                }
                _ => Some("SEND: ERR AUTH (queue secured by another sender or deleted)".to_owned()),
            },
            Err(CommandError::Timeout) => {
                // The server may or may not have it; resending risks a duplicate, not a loss.
                if matches!(kind, SendKind::Confirmation { .. }) {
                    s.confirmation = Confirmation::Unknown;
                }
                s.outbox[pos].maybe_stored = true;
                s.outbox[pos].state = OutState::Queued;
                s.cautious = true;
                s.retry_at = Some(later(now, self.config.auth_retry_delay));
                None
            }
            Err(e) => Some(format!("SEND: {e}")),
        };
        if let Some(reason) = error {
            let error = PoolError::upstream(&dest.server, reason);
            self.fail_message(dest, seq, error);
        }
        self.journal_sender(dest, before);
        self.pump(now, rng, dest);
    }

    /// The connection is gone: fail the queue creations and deletions that waited for it,
    /// put messages back in line, mark subscriptions pending, then back off (or give up).
    fn lost(&mut self, now: Instant, key: &ServerKey, reason: String, loss: Loss) {
        tracing::debug!(server = %key, %reason, ?loss, "connection lost");
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        s.conn = None;
        s.connect_deadline = None;
        s.last_error = Some(reason.clone());
        s.ping = None;
        s.missed_pongs = 0;
        s.probe = false;
        s.idle_since = None;
        s.retry_at = None;
        s.resub_queue.clear();
        s.resub_in_flight = 0;
        s.resub_failed = false;
        s.resubscribing = false;
        s.permanent = loss == Loss::Permanent;
        let commands = s.untrack_all();
        let deferred = std::mem::take(&mut s.deferred);
        let error = s.error(key);
        for flight in commands.into_values() {
            match flight.pending {
                Pending::New(keys) => self.reply(keys.token, Err(error.clone())),
                Pending::Del { token, .. } => self.reply(token, Err(error.clone())),
                Pending::Sub { .. }
                | Pending::Ping
                | Pending::Ack { .. }
                | Pending::Key { .. }
                | Pending::SKey { .. }
                | Pending::Send { .. } => {}
            }
        }
        for d in deferred {
            match d {
                Deferred::Create { token, .. } | Deferred::Delete { token, .. } => {
                    self.reply(token, Err(error.clone()));
                }
            }
        }
        let dests: Vec<DestKey> = self.senders_of(key).map(|(d, _)| d.clone()).collect();
        for dest in &dests {
            if let Some(s) = self.senders.get_mut(dest) {
                s.reset_after_loss();
            }
            // Messages wait for the reconnect, unless there will be none by itself.
            if loss == Loss::Permanent {
                self.fail_outbox(dest, &error);
            }
        }
        let subscribed: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.server == *key && q.subscription == Subscription::Subscribed)
            .map(|(id, _)| id.clone())
            .collect();
        for queue_id in subscribed {
            let reason = Some(format!("connection lost: {reason}"));
            self.set_queue_subscription(&queue_id, Subscription::Pending, reason);
        }
        self.grp_on_lost(now, key, &reason);
        let state = if loss == Loss::Permanent {
            ConnState::Lost
        } else if self.needs_connection(key) {
            // The delay is drawn by the next `handle_timeout` (this call has no RNG);
            // `poll_timeout` asks for it at once.
            ConnState::BackingOff
        } else {
            ConnState::Failed
        };
        self.set_state(now, key, state);
    }

    // ---- bookkeeping ----

    fn fail_outbox(&mut self, dest: &DestKey, error: &PoolError) {
        let Some(s) = self.senders.get_mut(dest) else {
            return;
        };
        for msg in std::mem::take(&mut s.outbox) {
            self.finish_message(&dest.server, msg, Err(error.clone()));
        }
        self.drop_sender_if_unused(dest);
    }

    fn fail_message(&mut self, dest: &DestKey, seq: u64, error: PoolError) {
        let Some(s) = self.senders.get_mut(dest) else {
            return;
        };
        if let Some(msg) = s.position(seq).and_then(|p| s.outbox.remove(p)) {
            self.finish_message(&dest.server, msg, Err(error));
        }
        self.drop_sender_if_unused(dest);
    }

    /// Forgets a sender entry that has nothing to send and never tied the queue to its keys
    /// (sends to made-up or dead queues would otherwise pile up entries for ever).
    fn drop_sender_if_unused(&mut self, dest: &DestKey) {
        if !self.senders.get(dest).is_some_and(SndQueue::disposable) {
            return;
        }
        if let Some(s) = self.senders.remove(dest) {
            self.mailbox.forget_sender(&dest.server, &dest.sender_id);
            self.uncount_sender(&s);
        }
    }

    /// Takes a sender entry that is gone off its apps' `max_senders_per_app` counts.
    fn uncount_sender(&mut self, s: &SndQueue) {
        for app in &s.apps {
            if let Some(n) = self.app_senders.get_mut(app) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.app_senders.remove(app);
                }
            }
        }
    }

    fn forget(&mut self, queue_id: &str) {
        let before = self.usage(queue_id);
        if let Some(q) = self.queues.remove(queue_id) {
            if let Some(s) = self.servers.get_mut(&q.server) {
                s.queues = s.queues.saturating_sub(1);
                if live(q.subscription) {
                    s.live_queues = s.live_queues.saturating_sub(1);
                }
            }
            self.account(&q.app, before, Waiting::default());
            self.held.remove(&(q.app, queue_id.to_owned()));
        }
        self.mailbox.remove_queue(queue_id);
    }

    fn subscribed(&mut self, key: &ServerKey, queue_id: &str) {
        let ok = self.queues.get(queue_id).is_some_and(|q| q.server == *key);
        if ok {
            self.set_queue_subscription(queue_id, Subscription::Subscribed, None);
        }
    }

    fn set_subscription(
        &mut self,
        key: &ServerKey,
        rcv_id: &[u8],
        subscription: Subscription,
        reason: Option<String>,
    ) {
        let queue_id = base64url_encode(rcv_id);
        if self.queues.get(&queue_id).is_some_and(|q| q.server == *key) {
            self.set_queue_subscription(&queue_id, subscription, reason);
        }
    }

    fn set_queue_subscription(
        &mut self,
        queue_id: &str,
        subscription: Subscription,
        reason: Option<String>,
    ) {
        let Some(q) = self.queues.get_mut(queue_id) else {
            return;
        };
        if reason.is_some() {
            q.last_error = reason;
        }
        if q.subscription != subscription {
            if live(q.subscription) != live(subscription)
                && let Some(s) = self.servers.get_mut(&q.server)
            {
                if live(subscription) {
                    s.live_queues += 1;
                } else {
                    s.live_queues = s.live_queues.saturating_sub(1);
                }
            }
            q.subscription = subscription;
            self.actions
                .push_back(Action::Event(PoolEvent::SubscriptionChanged {
                    app: q.app.clone(),
                    queue_id: queue_id.to_owned(),
                    subscription,
                }));
        }
    }

    fn set_state(&mut self, now: Instant, key: &ServerKey, state: ConnState) {
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        if s.state != state {
            s.set_state(now, state);
            self.actions
                .push_back(Action::Event(PoolEvent::ServerChanged {
                    server: key.clone(),
                    state,
                }));
        }
    }

    /// Answers a request, which frees what it was charged to its app's budget.
    fn reply(&mut self, token: RequestToken, result: Result<PoolReply, PoolError>) {
        if let Some(c) = self.charges.remove(&token)
            && let Some(s) = self.servers.get_mut(&c.server)
        {
            s.release(&c.app, c.budget);
        }
        self.actions.push_back(Action::Reply { token, result });
    }
}

/// What became of a decrypted message on one of the apps' queues.
#[derive(Debug)]
enum Admitted {
    /// Delivered; `late` when a higher seq came first (it was overtaken).
    New {
        late: bool,
    },
    /// A seq already delivered: a copy.
    Duplicate {
        seq: u64,
    },
    Malformed(EnvelopeError),
}

/// Unwraps the app envelope and hands the payload to the mailbox unless it is a copy. The
/// pool's own window catches copies even with a mailbox that keeps none; the mailbox's
/// covers what it persisted before a restart.
fn admit<M: Mailbox>(
    mailbox: &mut M,
    q: &mut RcvQueue,
    queue_id: &str,
    msg_id: String,
    ts: i64,
    body: &[u8],
) -> Admitted {
    let env = match Envelope::decode(body) {
        Ok(env) => env,
        Err(e) => return Admitted::Malformed(e),
    };
    let stored = mailbox.delivered_seqs(queue_id);
    if !q.delivered.is_new(env.seq) || stored.is_some_and(|w| !w.is_new(env.seq)) {
        return Admitted::Duplicate { seq: env.seq };
    }
    let late = env.seq < q.delivered.high().max(stored.map_or(0, |w| w.high()));
    let message = ReceivedMessage {
        queue_id: queue_id.to_owned(),
        msg_id,
        ts,
        body: env.payload.to_vec(),
    };
    match mailbox.deliver(message, env.seq) {
        Delivery::New => {
            q.delivered.record(env.seq);
            Admitted::New { late }
        }
        // The mailbox knew the msgId (a re-delivery after a lost ACK).
        Delivery::Duplicate => Admitted::Duplicate { seq: env.seq },
    }
}

/// Queues `command` on `key`'s connection and remembers what it was for. A free function so
/// callers can lend a key from `queues` or `senders` while the server table is borrowed.
#[allow(clippy::too_many_arguments)]
fn command_on<R: RngCore + CryptoRng>(
    servers: &mut BTreeMap<ServerKey, Server>,
    touched: &mut BTreeSet<ServerKey>,
    now: Instant,
    rng: &mut R,
    key: &ServerKey,
    entity_id: &[u8],
    command: &Command,
    auth: Option<&QueueAuthKey>,
    pending: Pending,
) -> Result<CorrId, String> {
    let s = servers.get_mut(key).ok_or("server forgotten")?;
    let conn = s.conn.as_mut().ok_or("not connected")?;
    let corr_id = conn
        .send_command(now, rng, entity_id, command, auth)
        .map_err(|e| e.to_string())?;
    s.track(corr_id, Flight { pending, sent: now });
    touched.insert(key.clone());
    Ok(corr_id)
}
