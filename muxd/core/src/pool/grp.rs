//! GRP/1 relays in the pool (issue 7): recipient links and two-hop sending (§10).
//!
//! A GRP relay the apps keep queues on is an ordinary server entry. The daemon runs the GRP
//! handshake, records and cover traffic in its upstream task and hands the pool the inner
//! SMP v18 transmissions as plain blocks; [`Pool::handle_grp_connected`] then gives the entry
//! an SMP [`Connection`] that is already established, with the handshake hash as its session
//! id and the relay's session auth key for X25519 authenticators (§8). NEW, SUB, ACK, KEY and
//! DEL, keep-alive, lag history, backoff and resubscription are the SMP code paths.
//!
//! A GRP *destination* is never contacted for sending. A send to it creates a second entry,
//! the **route** ([`Transport::GrpProxied`]), that has no socket: "connecting" it sends PRXY
//! on a proxy relay P's link, and PKEY gives the route its own established [`Connection`]
//! (session id `h_PD`, auth key `K_PD`, version `v`). Every block that connection writes is
//! split into its transmissions, each sealed into a PFWD on P's link (corrId `N` = the inner
//! corrId); PRES is opened and fed back to the route's connection as its answer. So the
//! sender logic (SKEY, confirmations, windows, retries, exactly-once seqs) is unchanged, and
//! a route that fails (P lost, `ERR PROXY …`) backs off and reconnects like a server, which
//! resends what was in flight with the same envelope seq.
//!
//! **Session renewal** (make-before-break, §6.5). The upstream task owns both GRP
//! connections of a renewal: it dials the successor while the old session keeps carrying
//! traffic, and once the successor's handshake is done it reports `GrpConnected` again for
//! the same link, then writes the pool's blocks on the new session only. Here that second
//! `GrpConnected` on a link that is up is a renewal, handled like a reconnect without the
//! loss ([`Pool::handle_grp_connected`]): the entry stays `Up` (no backoff, no
//! `ServerChanged`, lag history and counters kept), the previous SMP connection is kept aside
//! as *retiring* with the corrIds it has in flight, and a new established connection (new
//! session id, so every command is signed anew) takes over. Its `Connected` event runs the
//! usual start-up: every live subscription is re-sent as a SUB, KEYs and waiting work run,
//! and from then on all new commands go to the new session. An empty [`Action::Transmit`]
//! for the link comes first: it tells the task that the blocks after it are for the new
//! session (those before were signed for the old one, which carries them). Answers to the commands still
//! in flight on the old session reach the pool through the same block stream and are routed
//! to the retiring connection by corrId, so none is failed, resent or answered twice. When
//! the resubscription round is over and the retiring connection has nothing left in flight,
//! the pool emits a second empty [`Action::Transmit`] for the link: the task's signal to send
//! goodbye 0x00 on the old session and close it. (The task drops the old session's END, the
//! relay's expected answer to the re-SUB; an un-ACKed MSG comes again on the new
//! subscription and the inbound de-duplication drops the copy.)
//!
//! Which relay proxies: [`GrpConfig::proxy`] when set, else another GRP relay the pool
//! already has an entry for (one that is up first), else the first of [`GrpConfig::relays`]
//! whose key differs from the destination's. With none, the send fails with an error that
//! names the config key.

use std::borrow::Cow;
use std::str::FromStr;

use muxd_grp::address::{Carrier, Host, RelayAddress};
use muxd_grp::proxy::{ForwardKey, ProxyKey, is_palindrome};
use muxd_smp::address::QueueUri;
use muxd_smp::block::{decode_batch, pad_block, unpad_block};
use muxd_smp::command::ServerRef;
use muxd_smp::encoding::put_large;
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};

use super::*;

/// The only inner version GRP/1 defines (§9.4).
const INNER_VERSION: u16 = muxd_grp::INNER_VERSION;

/// Effectively never: routes have no keep-alive of their own (D refuses PING inside RFWD,
/// and P's link has its own).
const NEVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// GRP settings of the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrpConfig {
    /// The relay every send to a GRP destination goes through (any `grp…://` form). `None`:
    /// another GRP relay the pool knows (see the module docs).
    pub proxy: Option<String>,
    /// GRP relays known besides the apps' queues: candidate proxies, and where a relay's TCP
    /// address is found for the queue URIs of queues created over QUIC or WebSocket (proxies
    /// reach destinations over TCP, §11).
    pub relays: Vec<String>,
}

/// What the GRP handshake established (payload 2, §5.4), as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpSession {
    /// The handshake hash: the implied session id of every transmission.
    pub session_id: [u8; 32],
    /// The relay's session auth key, for X25519 authenticators.
    pub auth_key: [u8; 32],
    /// The negotiated inner (SMP) version.
    pub inner_version: u16,
    /// The negotiated cover rate, milli-records per second.
    pub cover_rate: u16,
}

/// Records of one GRP link by kind, as counted by the daemon's upstream task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrpCounters {
    /// Records that carried batches (or a goodbye), sent.
    pub real_sent: u64,
    /// Cover records sent.
    pub cover_sent: u64,
    /// Records that carried batches (or a goodbye), received.
    pub real_received: u64,
    /// Cover records received.
    pub cover_received: u64,
}

/// The GRP part of a [`ServerStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpStatus {
    /// The negotiated cover rate of the current session (links only).
    pub cover_rate: Option<u16>,
    /// Record counters of the current or last session (links only; zero for routes).
    pub counters: GrpCounters,
    /// For a proxied destination: the proxy relay in use.
    pub proxy: Option<String>,
}

/// One GRP link (a relay the daemon has a socket to).
#[derive(Debug, Default)]
struct LinkInfo {
    cover_rate: Option<u16>,
    counters: GrpCounters,
}

/// A link's previous session during a renewal: its SMP connection and the corrIds of the
/// commands sent on it that are still unanswered.
#[derive(Debug)]
struct Retiring {
    conn: Connection,
    corr: BTreeSet<CorrId>,
}

/// A proxied destination D.
#[derive(Debug)]
struct Route {
    /// D's static key, host and TCP port (what PRXY names).
    key: [u8; 32],
    host: String,
    port: u16,
    /// The proxy chosen by the current connection attempt.
    proxy: Option<ServerKey>,
    /// PKEY's `h_PD`, `K_PD` and the chosen inner version.
    session: Option<([u8; 32], [u8; 32], u16)>,
    /// A PRXY is in flight for this attempt.
    prxy_sent: bool,
}

/// A PFWD in flight: its route and the key that opens the PRES.
#[derive(Debug)]
struct Forward {
    route: ServerKey,
    key: ForwardKey,
}

/// The pool's GRP tables.
#[derive(Debug, Default)]
pub(crate) struct GrpState {
    links: BTreeMap<ServerKey, LinkInfo>,
    routes: BTreeMap<ServerKey, Route>,
    /// PRXY in flight by corrId (on the route's proxy link).
    prxy: BTreeMap<[u8; 24], ServerKey>,
    /// PFWD in flight by corrId `N`.
    pfwd: BTreeMap<[u8; 24], Forward>,
    /// Links being renewed: the previous session, until it is retired.
    retiring: BTreeMap<ServerKey, Retiring>,
}

impl GrpState {
    pub(super) fn status(&self, key: &ServerKey) -> Option<GrpStatus> {
        if let Some(l) = self.links.get(key) {
            return Some(GrpStatus {
                cover_rate: l.cover_rate,
                counters: l.counters,
                proxy: None,
            });
        }
        self.routes.get(key).map(|r| GrpStatus {
            cover_rate: None,
            counters: GrpCounters::default(),
            proxy: r.proxy.as_ref().map(|p| p.address().to_owned()),
        })
    }
}

/// Whether an address or queue URI is a GRP one (`grp://`, `grp+quic://`, …).
pub(super) fn is_grp(s: &str) -> bool {
    s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("grp")) && s[3..].starts_with(['+', ':'])
}

fn transport_of(carrier: Carrier) -> Transport {
    match carrier {
        Carrier::Tcp => Transport::GrpTcp,
        Carrier::Quic => Transport::GrpQuic,
        Carrier::Ws => Transport::GrpWs,
        // `Carrier` is non-exhaustive; WSS is the only other form today.
        _ => Transport::GrpWss,
    }
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Ipv6(a) => format!("[{a}]"),
        h => h.to_string(),
    }
}

/// One transmission as a plain block (a batch of one), as the SMP connection reads them.
fn single_block(transmission: &[u8]) -> Option<Vec<u8>> {
    let mut content = vec![1u8];
    put_large(&mut content, transmission).ok()?;
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    pad_block(&content, &mut block).ok()?;
    Some(block)
}

/// Transmissions as one plain block (a batch), as the SMP connection reads them.
fn rebatch(items: &[&[u8]]) -> Option<Vec<u8>> {
    let mut content = vec![u8::try_from(items.len()).ok()?];
    for t in items {
        put_large(&mut content, t).ok()?;
    }
    let mut out = Vec::with_capacity(BLOCK_SIZE);
    pad_block(&content, &mut out).ok()?;
    Some(out)
}

/// An unauthorized transmission (PRXY, PFWD): auth and session id play no part.
fn plain_transmission(corr: &[u8; 24], entity: &[u8], command: &[u8]) -> Option<Vec<u8>> {
    let a = Authorized::new(&[], corr, entity, command).ok()?;
    let mut t = Vec::with_capacity(command.len() + 64);
    encode_transmission(INNER_VERSION, &[], &a, &mut t).ok()?;
    Some(t)
}

impl<M: Mailbox> Pool<M> {
    /// The daemon's GRP upstream finished the handshake to `server`: the entry gets an
    /// established SMP connection for the inner protocol and comes up (resubscribing and
    /// running what waited, as after an SMP handshake).
    ///
    /// On a link that is already up this is a make-before-break renewal (§6.5, see the
    /// module docs): an empty [`Action::Transmit`] marks the switch, the new session takes
    /// over without the entry going down, and once the old session has nothing left to do
    /// a second empty [`Action::Transmit`] tells the upstream task to say goodbye on it.
    pub fn handle_grp_connected<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        server: &ServerKey,
        session: GrpSession,
    ) {
        self.tick(now);
        let renewal = self.grp.links.contains_key(server)
            && self.servers.get(server).is_some_and(|s| {
                matches!(s.state, ConnState::Up | ConnState::Handshaking) && s.conn.is_some()
            });
        if renewal {
            self.grp_renewed(now, rng, server, session);
            return;
        }
        if self
            .servers
            .get(server)
            .is_none_or(|s| s.state != ConnState::Connecting)
        {
            // Given up (timeout) or forgotten while the handshake ran.
            self.actions.push_back(Action::Disconnect {
                server: server.clone(),
            });
            return;
        }
        let key = X25519PublicKey::from_bytes(session.auth_key);
        self.grp.links.entry(server.clone()).or_default().cover_rate = Some(session.cover_rate);
        let session_id = session.session_id.to_vec();
        self.start_established(now, server, session.inner_version, session_id, key);
        self.drive_all(now, rng);
    }

    /// A renewal: the current connection retires, one for `session` takes over.
    fn grp_renewed<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        server: &ServerKey,
        session: GrpSession,
    ) {
        // The task renews again only after the previous old session closed, and that
        // waited for this retirement; an overlap means that session is gone.
        self.grp_abandon_retiring(server);
        let config = profile_config(&self.config.connection);
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let Some(old) = s.conn.take() else {
            return;
        };
        // Everything in flight was sent on the old session (commands go out as they are
        // made), so it is answered there.
        let corr: BTreeSet<CorrId> = s.commands.keys().copied().collect();
        tracing::info!(
            server = %server,
            in_flight = corr.len(),
            "GRP session renewed (make-before-break)"
        );
        s.conn = Some(Connection::established(
            now,
            config,
            session.inner_version,
            session.session_id.to_vec(),
            Some(X25519PublicKey::from_bytes(session.auth_key)),
        ));
        s.last_received = now;
        self.grp.links.entry(server.clone()).or_default().cover_rate = Some(session.cover_rate);
        self.grp
            .retiring
            .insert(server.clone(), Retiring { conn: old, corr });
        // Everything written from here on is for the new session.
        self.actions.push_back(Action::Transmit {
            server: server.clone(),
            block: Vec::new(),
        });
        self.touched.insert(server.clone());
        self.drive_all(now, rng);
    }

    /// Whether `key`'s link is being renewed (its start-up resubscribes every live queue,
    /// not only the pending ones).
    pub(super) fn grp_renewing(&self, key: &ServerKey) -> bool {
        self.grp.retiring.contains_key(key)
    }

    /// Forgets a retiring session without its answers: what was in flight on it fails as
    /// on a loss (requests get an error; sends, SUBs and ACKs are redone by their owners).
    fn grp_abandon_retiring(&mut self, key: &ServerKey) {
        let Some(r) = self.grp.retiring.remove(key) else {
            return;
        };
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let error = s.error(key);
        let flights: Vec<Flight> = r.corr.iter().filter_map(|c| s.untrack(c)).collect();
        for flight in flights {
            match flight.pending {
                Pending::New(keys) => self.reply(keys.token, Err(error.clone())),
                Pending::Del { token, .. } => self.reply(token, Err(error.clone())),
                _ => {}
            }
        }
    }

    /// Takes the answers meant for `server`'s retiring session out of a block and feeds
    /// them to it; the rest is for the current connection (`None` when nothing is left).
    pub(super) fn grp_route_retiring<'b, R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        server: &ServerKey,
        block: Cow<'b, [u8]>,
    ) -> Option<Cow<'b, [u8]>> {
        let Some(r) = self.grp.retiring.get_mut(server) else {
            return Some(block);
        };
        let Ok(items) = unpad_block(&block).and_then(decode_batch) else {
            return Some(block);
        };
        let mut kept = Vec::new();
        let mut old = Vec::new();
        for t in items {
            let corr = Transmission::decode(INNER_VERSION, &[], t)
                .ok()
                .and_then(|d| <[u8; 24]>::try_from(d.corr_id).ok())
                .map(CorrId::from_bytes);
            if corr.is_some_and(|c| r.corr.contains(&c)) {
                old.push(t);
            } else {
                kept.push(t);
            }
        }
        if old.is_empty() {
            return Some(block);
        }
        for t in &old {
            if let Some(b) = single_block(t) {
                r.conn.handle_input(now, &b);
            }
        }
        let rest = (!kept.is_empty()).then(|| rebatch(&kept)).flatten();
        self.grp_drive_retiring(now, rng, server);
        rest.map(Cow::Owned)
    }

    /// Processes the retiring session's events: answers to its commands (or their
    /// timeouts) go where the current connection's would.
    fn grp_drive_retiring<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
    ) {
        while let Some(event) = self
            .grp
            .retiring
            .get_mut(key)
            .and_then(|r| r.conn.poll_event())
        {
            match event {
                Event::Response { corr_id, .. } => {
                    if let Some(r) = self.grp.retiring.get_mut(key) {
                        r.corr.remove(&corr_id);
                    }
                    self.on_event(now, rng, key, event);
                }
                // Server events reach the current connection (the task drops the old
                // session's END); a close of the old session is the task's business.
                other => tracing::debug!(server = %key, ?other, "retiring session event"),
            }
        }
        if let Some(r) = self.grp.retiring.get_mut(key) {
            // It sends nothing: no keep-alive, and no command is made on it any more.
            let mut buf = Vec::new();
            while r.conn.poll_transmit(now, &mut buf).is_some() {
                buf.clear();
            }
        }
    }

    /// Timers of retiring sessions: their commands time out as they would have.
    pub(super) fn grp_retiring_timeout<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) {
        let due: Vec<ServerKey> = self
            .grp
            .retiring
            .iter_mut()
            .filter(|(_, r)| r.conn.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, r)| {
                r.conn.handle_timeout(now, rng);
                k.clone()
            })
            .collect();
        for key in &due {
            self.grp_drive_retiring(now, rng, key);
        }
    }

    /// The earliest timer of a retiring session.
    pub(super) fn grp_retiring_poll_timeout(&self) -> Option<Instant> {
        self.grp
            .retiring
            .values()
            .filter_map(|r| r.conn.poll_timeout())
            .min()
    }

    /// Retires the old sessions whose work is done: every live queue is subscribed on the
    /// new session and nothing is in flight on the old one. The empty block tells the
    /// upstream task to say goodbye 0x00 on the old session (§6.5).
    pub(super) fn grp_retire_done(&mut self) {
        let mut done = Vec::new();
        for (key, r) in &mut self.grp.retiring {
            let Some(s) = self.servers.get(key) else {
                done.push((key.clone(), false));
                continue;
            };
            // Commands given up by other means (a loss) are no longer waited for.
            r.corr.retain(|c| s.commands.contains_key(c));
            if r.corr.is_empty() && !s.resubscribing {
                done.push((key.clone(), s.conn.is_some()));
            }
        }
        for (key, signal) in done {
            self.grp.retiring.remove(&key);
            if signal {
                tracing::debug!(server = %key, "old GRP session retired");
                self.actions.push_back(Action::Transmit {
                    server: key,
                    block: Vec::new(),
                });
            }
        }
    }

    /// The record counters of `server`'s GRP link (the daemon reports them as they change).
    pub fn handle_grp_counters(&mut self, server: &ServerKey, counters: GrpCounters) {
        if let Some(l) = self.grp.links.get_mut(server) {
            l.counters = counters;
        }
    }

    /// Gives `key` an SMP connection established by GRP (a link's handshake or a PKEY).
    fn start_established(
        &mut self,
        now: Instant,
        key: &ServerKey,
        version: u16,
        session_id: Vec<u8>,
        auth_key: X25519PublicKey,
    ) {
        let config = profile_config(&self.config.connection);
        let Some(s) = self.servers.get_mut(key) else {
            return;
        };
        let conn = Connection::established(now, config, version, session_id, Some(auth_key));
        s.start_connection(now, conn);
        self.set_state(now, key, ConnState::Handshaking);
        self.touched.insert(key.clone());
    }

    /// `queue create grp…://…`: a queue on a GRP relay, created over the carrier it names.
    pub(super) fn grp_create_queue<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        app: &str,
        token: RequestToken,
        server: &str,
    ) -> Result<(), PoolError> {
        let address = RelayAddress::from_str(server).map_err(|e| {
            PoolError::InvalidArgument(format!("GRP relay address {server:?}: {e}"))
        })?;
        let key = self.grp_link_entry(now, &address)?;
        let create = Deferred::Create {
            app: app.to_owned(),
            token,
            basic_auth: None,
        };
        self.defer(now, rng, &key, app, token, create)
    }

    /// The entry of a GRP relay link, created (idle) on first use.
    fn grp_link_entry(
        &mut self,
        now: Instant,
        address: &RelayAddress,
    ) -> Result<ServerKey, PoolError> {
        let key = ServerKey::grp(address.to_string(), transport_of(address.carrier));
        if !self.servers.contains_key(&key) {
            self.make_room(&key)?;
            let server = SmpServer {
                key_hash: address.key.to_vec(),
                basic_auth: None,
                hosts: vec![host_text(&address.host)],
                port: Some(address.port),
            };
            let policy = self.config.policy.clone();
            let entry = Server::new(now, &server, KeyHash::from_bytes(address.key), policy);
            self.servers.insert(key.clone(), entry);
            self.grp.links.insert(key.clone(), LinkInfo::default());
        }
        Ok(key)
    }

    /// The sender URI of a queue created on a GRP relay: SMP's queue URI with the relay's
    /// TCP address (`grp://<key>@<host>:<port>`) as the server, since a proxy reaches the
    /// destination over TCP whatever carrier the recipient uses.
    pub(super) fn grp_queue_uri(&self, key: &ServerKey, uri: &QueueUri) -> Option<String> {
        if !self.grp.links.contains_key(key) {
            return None;
        }
        let address = RelayAddress::from_str(key.address()).ok()?;
        let port = if address.carrier == Carrier::Tcp {
            address.port
        } else {
            self.config
                .grp
                .relays
                .iter()
                .filter_map(|r| RelayAddress::from_str(r).ok())
                .find(|r| r.key == address.key && r.carrier == Carrier::Tcp)
                .map_or(Carrier::Tcp.default_port(), |r| r.port)
        };
        let text = uri.to_string();
        // Everything from the path on (`/<sndId>#/?v=…&dh=…`) is SMP's.
        let rest = &text[text.get(6..)?.find('/')? + 6..];
        Some(format!(
            "grp://{}@{}:{port}{rest}",
            address.key_text(),
            host_text(&address.host)
        ))
    }

    /// For a GRP queue URI: the parsed URI and the destination's route (created on first
    /// use, after checking that some relay can proxy). `None` for other URIs.
    pub(super) fn grp_send_route(
        &mut self,
        now: Instant,
        queue_uri: &str,
    ) -> Result<Option<(QueueUri, ServerKey)>, PoolError> {
        if !is_grp(queue_uri) {
            return Ok(None);
        }
        let bad = |e: String| PoolError::InvalidArgument(format!("GRP queue URI: {e}"));
        let after = queue_uri
            .split_once("://")
            .map(|(_, a)| a)
            .ok_or_else(|| bad("no scheme".into()))?;
        let (authority, rest) = after
            .find('/')
            .map(|i| after.split_at(i))
            .ok_or_else(|| bad("no sender id".into()))?;
        let address = RelayAddress::from_str(&format!("grp://{authority}"))
            .map_err(|e| bad(e.to_string()))?;
        // The rest is SMP's queue URI syntax; reuse its parser with the key as keyHash.
        let smp = format!(
            "smp://{}@{}:{}{rest}",
            base64url_encode(&address.key),
            host_text(&address.host),
            address.port
        );
        let uri: QueueUri = smp.parse().map_err(|e| bad(format!("{e}")))?;
        let key = ServerKey::grp(
            format!(
                "grp://{}@{}:{}",
                address.key_text(),
                host_text(&address.host),
                address.port
            ),
            Transport::GrpProxied,
        );
        if !self.servers.contains_key(&key) {
            // Fail now, with what to configure, rather than let the message wait for ever.
            let proxy = self.grp_pick_proxy(now, &address.key);
            proxy.map_err(|e| PoolError::upstream(&key, e))?;
            self.grp_route_entry(now, &address, &key)?;
        }
        Ok(Some((uri, key)))
    }

    /// After a restart: the entry of a GRP link or route named in the journal.
    pub(super) fn grp_restored_entry(
        &mut self,
        now: Instant,
        key: &ServerKey,
    ) -> Result<ServerKey, PoolError> {
        let address = RelayAddress::from_str(key.address()).map_err(|e| {
            PoolError::InvalidArgument(format!("stored GRP address {}: {e}", key.address()))
        })?;
        if key.transport() != Transport::GrpProxied {
            return self.grp_link_entry(now, &address);
        }
        if !self.servers.contains_key(key) {
            // The proxy is picked when the route connects; a configuration that lost its
            // proxies shows there, not as a daemon that cannot start.
            self.grp_route_entry(now, &address, key)?;
        }
        Ok(key.clone())
    }

    /// Creates the entry of a two-hop route to `address`.
    fn grp_route_entry(
        &mut self,
        now: Instant,
        address: &RelayAddress,
        key: &ServerKey,
    ) -> Result<(), PoolError> {
        self.make_room(key)?;
        let mut policy = self.config.policy.clone();
        policy.ping_idle = NEVER;
        policy.stall_probe_after = NEVER;
        policy.idle_disconnect = None;
        let server = SmpServer {
            key_hash: address.key.to_vec(),
            basic_auth: None,
            hosts: vec![host_text(&address.host)],
            port: Some(address.port),
        };
        let entry = Server::new(now, &server, KeyHash::from_bytes(address.key), policy);
        self.servers.insert(key.clone(), entry);
        let route = Route {
            key: address.key,
            host: address.host.to_string(),
            port: address.port,
            proxy: None,
            session: None,
            prxy_sent: false,
        };
        self.grp.routes.insert(key.clone(), route);
        Ok(())
    }

    /// The proxy for destination `dest` (see the module docs), its link entry created.
    fn grp_pick_proxy(&mut self, now: Instant, dest: &[u8; 32]) -> Result<ServerKey, String> {
        if let Some(p) = self.config.grp.proxy.clone() {
            let address =
                RelayAddress::from_str(&p).map_err(|e| format!("config grp proxy {p:?}: {e}"))?;
            if address.key == *dest {
                return Err(format!(
                    "the configured GRP proxy {p} is the destination relay itself; two-hop \
                     sending needs a different relay (set `grp.proxy` to another one)"
                ));
            }
            return self
                .grp_link_entry(now, &address)
                .map_err(|e| e.to_string());
        }
        let key_of = |k: &ServerKey| RelayAddress::from_str(k.address()).ok().map(|a| a.key);
        let mut known: Vec<(bool, ServerKey)> = self
            .grp
            .links
            .keys()
            .filter(|k| key_of(k).is_some_and(|key| key != *dest))
            .map(|k| {
                let up = self
                    .servers
                    .get(k)
                    .is_some_and(|s| s.state == ConnState::Up);
                (!up, k.clone())
            })
            .collect();
        known.sort();
        if let Some((_, k)) = known.into_iter().next() {
            return Ok(k);
        }
        let configured = self
            .config
            .grp
            .relays
            .iter()
            .filter_map(|r| RelayAddress::from_str(r).ok())
            .find(|a| a.key != *dest);
        match configured {
            Some(a) => self.grp_link_entry(now, &a).map_err(|e| e.to_string()),
            None => Err(
                "no GRP proxy relay: sends to a GRP relay go through a second, different GRP \
                 relay (two-hop, GRP §10); set `proxy = \"grp://…\"` (or list relays in \
                 `relays`) in the daemon config's [grp] table"
                    .to_owned(),
            ),
        }
    }

    /// "Connecting" a route: pick its proxy; PRXY goes out once the proxy is up
    /// ([`Self::grp_drive`]).
    pub(super) fn grp_connect_route(&mut self, now: Instant, key: &ServerKey) {
        let Some(dest) = self.grp.routes.get(key).map(|r| r.key) else {
            return;
        };
        if let Some(s) = self.servers.get_mut(key) {
            s.connect_deadline = Some(later(now, self.config.connect_timeout));
            s.retry_at = None;
        }
        self.set_state(now, key, ConnState::Connecting);
        let proxy = self.grp_pick_proxy(now, &dest);
        if let Some(r) = self.grp.routes.get_mut(key) {
            r.session = None;
            r.prxy_sent = false;
            r.proxy = proxy.as_ref().ok().cloned();
        }
        if let Err(reason) = proxy {
            self.lost(now, key, reason, Loss::Permanent);
        }
    }

    /// Sends the PRXY of every route waiting for one, and connects their proxies.
    pub(super) fn grp_drive<R: RngCore + CryptoRng>(&mut self, now: Instant, rng: &mut R) {
        let waiting: Vec<(ServerKey, ServerKey)> = self
            .grp
            .routes
            .iter()
            .filter(|(_, r)| r.session.is_none() && !r.prxy_sent)
            .filter_map(|(k, r)| Some((k.clone(), r.proxy.clone()?)))
            .filter(|(k, _)| {
                self.servers
                    .get(k)
                    .is_some_and(|s| s.state == ConnState::Connecting)
            })
            .collect();
        for (route, proxy) in waiting {
            let Some(state) = self.servers.get(&proxy).map(|s| s.state) else {
                continue;
            };
            match state {
                ConnState::Up => self.send_prxy(now, rng, &route, &proxy),
                ConnState::Idle | ConnState::Failed => self.connect(now, &proxy),
                ConnState::Lost => {
                    let reason = format!("proxy relay {proxy} is lost");
                    self.lost(now, &route, reason, Loss::Transient);
                }
                _ => {}
            }
        }
    }

    fn send_prxy<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        route: &ServerKey,
        proxy: &ServerKey,
    ) {
        let Some(r) = self.grp.routes.get_mut(route) else {
            return;
        };
        let command = Command::Prxy {
            server: ServerRef {
                hosts: vec![r.host.clone()],
                port: r.port.to_string(),
                key_hash: r.key.to_vec(),
            },
            basic_auth: None,
        };
        let mut corr = [0u8; 24];
        rng.fill_bytes(&mut corr);
        let mut bytes = Vec::new();
        let block = command
            .encode(INNER_VERSION, &mut bytes)
            .ok()
            .and_then(|()| plain_transmission(&corr, b"", &bytes))
            .and_then(|t| single_block(&t));
        let Some(block) = block else {
            let reason = "could not encode PRXY".to_owned();
            return self.lost(now, route, reason, Loss::Permanent);
        };
        tracing::debug!(%route, %proxy, "PRXY");
        r.prxy_sent = true;
        self.grp.prxy.insert(corr, route.clone());
        self.actions.push_back(Action::Transmit {
            server: proxy.clone(),
            block,
        });
    }

    /// A block a connection wrote: to the transport, or for a route sealed into PFWDs.
    pub(super) fn grp_transmit<R: RngCore + CryptoRng>(
        &mut self,
        now: Instant,
        rng: &mut R,
        key: &ServerKey,
        block: Vec<u8>,
    ) {
        if key.transport() != Transport::GrpProxied {
            self.actions.push_back(Action::Transmit {
                server: key.clone(),
                block,
            });
            return;
        }
        let Some(r) = self.grp.routes.get(key) else {
            return;
        };
        let (Some(proxy), Some((h_pd, k_pd, version))) = (r.proxy.clone(), r.session) else {
            return;
        };
        let dest = r.key;
        let items: Vec<Vec<u8>> = unpad_block(&block)
            .ok()
            .and_then(|c| decode_batch(c).ok())
            .map(|items| items.into_iter().map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        for t in items {
            // The inner corrId is N: the PFWD's corrId and the box nonce (§10.3).
            let Some(n) = Transmission::decode(version, &[], &t)
                .ok()
                .and_then(|d| <[u8; 24]>::try_from(d.corr_id).ok())
            else {
                continue;
            };
            if is_palindrome(&n) {
                // 2^-96 per command; the command times out and is sent again with a new N.
                tracing::warn!(route = %key, "palindromic corrId; command dropped");
                continue;
            }
            let cmd = X25519SecretKey::generate(rng);
            let sealed = ForwardKey::for_client(&cmd, &h_pd, &k_pd, &dest).and_then(|fk| {
                let enc = fk.seal_command(&n, &t)?;
                Ok((fk, enc))
            });
            let Ok((fk, enc)) = sealed else {
                tracing::warn!(route = %key, "PFWD: inner box could not be sealed");
                continue;
            };
            let command = Command::PFwd {
                version,
                key: cmd.public_key().to_spki(),
                enc,
            };
            let mut bytes = Vec::with_capacity(16_400);
            let block = command
                .encode(INNER_VERSION, &mut bytes)
                .ok()
                .and_then(|()| plain_transmission(&n, &h_pd, &bytes))
                .and_then(|t| single_block(&t));
            let Some(block) = block else {
                continue;
            };
            self.grp.pfwd.insert(
                n,
                Forward {
                    route: key.clone(),
                    key: fk,
                },
            );
            self.actions.push_back(Action::Transmit {
                server: proxy.clone(),
                block,
            });
        }
        let _ = now;
    }

    /// Takes the answers to our PRXYs and PFWDs out of a block from a GRP link; the rest is
    /// for the link's own connection (`None` when nothing is left).
    pub(super) fn grp_intercept<'b>(
        &mut self,
        now: Instant,
        server: &ServerKey,
        block: &'b [u8],
    ) -> Option<Cow<'b, [u8]>> {
        let ours = self.grp.links.contains_key(server)
            && !(self.grp.prxy.is_empty() && self.grp.pfwd.is_empty());
        if !ours {
            return Some(Cow::Borrowed(block));
        }
        let Ok(items) = unpad_block(block).and_then(decode_batch) else {
            return Some(Cow::Borrowed(block));
        };
        let mut kept = Vec::new();
        let mut taken = false;
        for t in items {
            let Ok(d) = Transmission::decode(INNER_VERSION, &[], t) else {
                kept.push(t);
                continue;
            };
            let corr = <[u8; 24]>::try_from(d.corr_id).ok();
            if let Some(route) = corr.and_then(|c| self.grp.prxy.remove(&c)) {
                taken = true;
                self.on_pkey(now, &route, d.command);
            } else if let Some(fwd) = corr.and_then(|c| self.grp.pfwd.remove(&c)) {
                taken = true;
                if let Some(n) = corr {
                    self.on_pres(now, &n, fwd, d.command);
                }
            } else {
                kept.push(t);
            }
        }
        if taken && let Some(s) = self.servers.get_mut(server) {
            s.last_received = now;
        }
        if !taken {
            return Some(Cow::Borrowed(block));
        }
        if kept.is_empty() {
            return None;
        }
        rebatch(&kept).map(Cow::Owned)
    }

    /// The proxy's answer to PRXY: PKEY brings the route up, anything else fails it.
    fn on_pkey(&mut self, now: Instant, route: &ServerKey, command: &[u8]) {
        let connecting = self
            .servers
            .get(route)
            .is_some_and(|s| s.state == ConnState::Connecting);
        if !connecting {
            return;
        }
        let pkey = match ProxyKey::decode(command) {
            Ok(p) => p,
            Err(e) => {
                let reason = match Response::decode(INNER_VERSION, command) {
                    Ok(Response::Err(err)) => format!("PRXY refused: ERR {err}"),
                    _ => format!("PRXY: bad answer ({e})"),
                };
                return self.lost(now, route, reason, Loss::Transient);
            }
        };
        let version = pkey.max_version.min(INNER_VERSION);
        if version < pkey.min_version.max(INNER_VERSION) {
            let reason = format!(
                "destination relay speaks inner versions {}-{}, not {INNER_VERSION}",
                pkey.min_version, pkey.max_version
            );
            return self.lost(now, route, reason, Loss::Permanent);
        }
        if let Some(r) = self.grp.routes.get_mut(route) {
            r.session = Some((pkey.session_id, pkey.auth_key, version));
        }
        tracing::debug!(%route, "PKEY: proxied session up");
        let auth_key = X25519PublicKey::from_bytes(pkey.auth_key);
        self.start_established(now, route, version, pkey.session_id.to_vec(), auth_key);
    }

    /// The proxy's answer to a PFWD: PRES carries the destination's answer for the route's
    /// connection; `ERR PROXY …` means the proxied session is gone or broken, and the route
    /// reconnects (what was in flight is sent again).
    fn on_pres(&mut self, now: Instant, n: &[u8; 24], fwd: Forward, command: &[u8]) {
        let route = fwd.route;
        let Some(version) = self
            .grp
            .routes
            .get(&route)
            .and_then(|r| r.session.map(|s| s.2))
        else {
            return;
        };
        let inner = match Response::decode(INNER_VERSION, command) {
            Ok(Response::PRes(enc)) => fwd.key.open_response(n, &enc).map_err(|e| e.to_string()),
            Ok(Response::Err(e)) => Err(format!("PFWD: ERR {e}")),
            Ok(other) => Err(format!("PFWD: unexpected answer {}", other.tag())),
            Err(e) => Err(format!("PFWD: bad answer ({e})")),
        };
        let block = inner.and_then(|t| {
            // The response must answer this very command (§10.4).
            let ok = Transmission::decode(version, &[], &t).is_ok_and(|d| d.corr_id == n);
            if !ok {
                return Err("PRES does not answer its PFWD".to_owned());
            }
            single_block(&t).ok_or_else(|| "PRES too large".to_owned())
        });
        match block {
            Ok(block) => {
                if let Some(conn) = self.servers.get_mut(&route).and_then(|s| s.conn.as_mut()) {
                    conn.handle_input(now, &block);
                    self.touched.insert(route);
                }
            }
            Err(reason) => {
                tracing::info!(%route, %reason, "proxied session failed");
                self.lost(now, &route, reason, Loss::Transient);
            }
        }
    }

    /// Routes have no keep-alive (the proxy link has its own); a probe or lag watch asked for
    /// one is dropped so that no PING comes due.
    pub(super) fn grp_skip_keepalive(&mut self, key: &ServerKey) -> bool {
        if key.transport() != Transport::GrpProxied {
            return false;
        }
        if let Some(s) = self.servers.get_mut(key) {
            s.probe = false;
            s.missed_pongs = 0;
            s.lag_watch = None;
        }
        true
    }

    /// A proxy link is needed while a route through it has messages to send.
    pub(super) fn grp_proxy_needed(&self, key: &ServerKey) -> bool {
        self.grp.routes.iter().any(|(route, r)| {
            r.proxy.as_ref() == Some(key)
                && self.senders_of(route).any(|(_, q)| !q.outbox.is_empty())
        })
    }

    /// `key` lost its connection: a route forgets its proxied session; a proxy link takes
    /// every route through it down with it.
    pub(super) fn grp_on_lost(&mut self, now: Instant, key: &ServerKey, reason: &str) {
        // The task ended both sessions; what was in flight was failed with the rest.
        self.grp.retiring.remove(key);
        if let Some(r) = self.grp.routes.get_mut(key) {
            r.session = None;
            r.prxy_sent = false;
            self.grp.pfwd.retain(|_, f| f.route != *key);
            self.grp.prxy.retain(|_, route| route != key);
            return;
        }
        if !self.grp.links.contains_key(key) {
            return;
        }
        let through: Vec<ServerKey> = self
            .grp
            .routes
            .iter()
            .filter(|(_, r)| r.proxy.as_ref() == Some(key))
            .map(|(k, _)| k.clone())
            .collect();
        for route in through {
            let live = self.servers.get(&route).is_some_and(|s| {
                matches!(
                    s.state,
                    ConnState::Connecting | ConnState::Handshaking | ConnState::Up
                )
            });
            if live {
                let why = format!("proxy relay {key}: {reason}");
                self.lost(now, &route, why, Loss::Transient);
            }
        }
    }
}
