//! The proxy side of two-hop sending (§10, §11, §15.3): PRXY opens or reuses a relay link to
//! D, PFWD becomes RFWD on it, and RRES comes back as PRES.
//!
//! One relay link per destination key, shared by every client of this relay. A link is a
//! GRP initiator ([`Connection`], role `'R'`, this relay's own static key) over TCP, driven
//! by its own task; forwards reach it through a channel and their answers come back on
//! oneshots. P never opens `encT`: it only sees D's address and the timing of forwards.
//!
//! Renewal (§6.5, "relay-link initiators follow the same rules"): at the link's `RenewDue`
//! the link leaves its slot and a successor is opened while the old link keeps forwarding.
//! Once the successor is up, the old `h_PD` stops taking new PFWDs (`NO_SESSION`: clients
//! redo PRXY and get the successor's `h_PD`), the RFWDs already on the old link are answered,
//! and then it says goodbye 0x00. If the successor cannot be opened, the old link carries on
//! until D closes it at 24 h; the next PRXY opens a new one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::error::GrpError;
use muxd_grp::handshake::InitiatorConfig;
use muxd_grp::proxy::{PROXY_ENC_LEN, ProxyKey, rfwd_body};
use muxd_smp::command::Response;
use muxd_smp::error::{BrokerError, CmdError, ErrorType, ProxyError, TransportError};
use muxd_smp::keys::X25519PublicKey;
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_core::{OsRng, RngCore};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::RelayShared;
use crate::carrier::Carrier;
use crate::carrier::tcp::TcpCarrier;
use crate::commands::{Reply, VERSION};
use crate::stats::Counter;
use crate::store::ReplyTx;

/// 30 s to open a relay link, and 30 s for each RRES (§13).
const PROXY_TIMEOUT: Duration = Duration::from_secs(30);

/// P closes a relay link that carried no RFWD for this long (§11).
const LINK_IDLE: Duration = Duration::from_secs(15 * 60);

/// What a forward comes back as: `encR`, or the error for the client.
type ForwardResult = Result<Vec<u8>, ErrorType>;

/// The live relay links, by destination key.
#[derive(Debug, Default)]
pub(crate) struct Manager {
    slots: Mutex<HashMap<[u8; 32], Slot>>,
}

#[derive(Debug)]
enum Slot {
    /// Opening; these PRXYs wait for the outcome.
    Connecting(Vec<oneshot::Sender<Result<Arc<OutLink>, BrokerError>>>),
    Up(Arc<OutLink>),
}

/// One relay link this relay opened, as seen by the client links that use it.
#[derive(Debug)]
pub(crate) struct OutLink {
    /// `h_PD`.
    session_id: [u8; 32],
    /// D's inner version range (payload 2).
    range: (u16, u16),
    /// `K_PD`: D's session auth key on this link.
    auth_key: [u8; 32],
    tx: mpsc::UnboundedSender<Forward>,
    alive: AtomicBool,
}

impl OutLink {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Forward {
    /// The complete RFWD command (`"RFWD " …`).
    command: Vec<u8>,
    reply: oneshot::Sender<ForwardResult>,
}

/// Per client link: the destinations asked for and the `h_PD`s handed out (§10.2 step 4).
#[derive(Debug, Default)]
pub(crate) struct ClientProxy {
    destinations: HashSet<[u8; 32]>,
    sessions: HashMap<[u8; 32], Arc<OutLink>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn broker(e: BrokerError) -> ErrorType {
    ErrorType::Proxy(ProxyError::Broker(e))
}

/// PRXY: answers PKEY once a link to D is up, or the §10.2 error.
pub(crate) fn handle_prxy(
    shared: &Arc<RelayShared>,
    client: &Arc<Mutex<ClientProxy>>,
    tx: ReplyTx,
    corr_id: Vec<u8>,
    d_key: [u8; 32],
    host: String,
    port: u16,
) {
    {
        let mut c = lock(client);
        if !c.destinations.contains(&d_key)
            && c.destinations.len() >= shared.config.limits.proxy_destinations
        {
            let _ = tx.send(Reply::err(&corr_id, b"", ErrorType::Quota));
            return;
        }
        c.destinations.insert(d_key);
    }
    let (shared, client) = (shared.clone(), client.clone());
    let tracker = shared.tracker.clone();
    tracker.spawn(async move {
        let got = tokio::time::timeout(PROXY_TIMEOUT, link_to(&shared, d_key, host, port)).await;
        let reply = match got {
            Ok(Ok(link)) => {
                lock(&client).sessions.insert(link.session_id, link.clone());
                let key = ProxyKey {
                    session_id: link.session_id,
                    min_version: link.range.0,
                    max_version: link.range.1,
                    auth_key: link.auth_key,
                };
                let mut command = Vec::new();
                match key.encode(&mut command) {
                    Ok(()) => Reply {
                        corr_id,
                        entity_id: Vec::new(),
                        command,
                    },
                    Err(_) => Reply::err(&corr_id, b"", ErrorType::Internal),
                }
            }
            Ok(Err(e)) => Reply::err(&corr_id, b"", broker(e)),
            Err(_) => Reply::err(&corr_id, b"", broker(BrokerError::Timeout)),
        };
        let _ = tx.send(reply);
    });
}

/// The parameters of one PFWD.
#[derive(Debug)]
pub(crate) struct Pfwd {
    pub(crate) corr_id: Vec<u8>,
    pub(crate) h_pd: Vec<u8>,
    pub(crate) version: u16,
    pub(crate) cmd_key: Vec<u8>,
    pub(crate) enc_t: Vec<u8>,
}

/// PFWD: checks it (§10.4), sends RFWD, and answers PRES or the error.
pub(crate) fn handle_pfwd(
    shared: &Arc<RelayShared>,
    client: &Arc<Mutex<ClientProxy>>,
    tx: ReplyTx,
    f: Pfwd,
) {
    shared.counters.add(Counter::Pfwd, 1);
    let (corr, entity) = (f.corr_id.clone(), f.h_pd.clone());
    let fail = |e| {
        let _ = tx.send(Reply::err(&corr, &entity, e));
    };
    let link = <[u8; 32]>::try_from(f.h_pd.as_slice())
        .ok()
        .and_then(|h| lock(client).sessions.get(&h).cloned())
        .filter(|l| l.is_alive());
    let Some(link) = link else {
        return fail(ErrorType::Proxy(ProxyError::NoSession));
    };
    if !(link.range.0..=link.range.1).contains(&f.version) {
        return fail(broker(BrokerError::Transport(TransportError::Version)));
    }
    let syntax = ErrorType::Cmd(CmdError::Syntax);
    if f.enc_t.len() != PROXY_ENC_LEN {
        return fail(syntax);
    }
    let (Ok(n), Ok(cmd_pub)) = (
        <[u8; 24]>::try_from(f.corr_id.as_slice()),
        X25519PublicKey::from_spki(&f.cmd_key),
    ) else {
        return fail(syntax);
    };
    let mut command = b"RFWD ".to_vec();
    match rfwd_body(&n, f.version, cmd_pub.as_bytes(), &f.enc_t) {
        Ok(body) => command.extend_from_slice(&body),
        Err(_) => return fail(syntax),
    }
    let (reply_tx, reply_rx) = oneshot::channel();
    if link
        .tx
        .send(Forward {
            command,
            reply: reply_tx,
        })
        .is_err()
    {
        return fail(broker(BrokerError::Network(None)));
    }
    shared.tracker.spawn(async move {
        let reply = match tokio::time::timeout(PROXY_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(enc_r))) => Reply::new(&corr, &entity, &Response::PRes(enc_r)),
            Ok(Ok(Err(e))) => Reply::err(&corr, &entity, e),
            // The link task ended without answering: the link is gone.
            Ok(Err(_)) => Reply::err(&corr, &entity, broker(BrokerError::Network(None))),
            Err(_) => Reply::err(&corr, &entity, broker(BrokerError::Timeout)),
        };
        let _ = tx.send(reply);
    });
}

/// A live link to `d_key`: reused when one is up, otherwise opened (once, however many
/// PRXYs wait for it).
async fn link_to(
    shared: &Arc<RelayShared>,
    d_key: [u8; 32],
    host: String,
    port: u16,
) -> Result<Arc<OutLink>, BrokerError> {
    let rx = {
        let mut slots = lock(&shared.proxy.slots);
        match slots.get_mut(&d_key) {
            Some(Slot::Up(l)) if l.is_alive() => return Ok(l.clone()),
            Some(Slot::Connecting(waiters)) => {
                let (t, r) = oneshot::channel();
                waiters.push(t);
                r
            }
            _ => {
                let (t, r) = oneshot::channel();
                slots.insert(d_key, Slot::Connecting(vec![t]));
                let s = shared.clone();
                shared
                    .tracker
                    .spawn(async move { run_link(s, d_key, host, port).await });
                r
            }
        }
    };
    rx.await.unwrap_or(Err(BrokerError::Network(None)))
}

/// Settles a `Connecting` slot: every waiting PRXY gets the outcome.
fn settle(shared: &RelayShared, d_key: [u8; 32], outcome: Result<Arc<OutLink>, BrokerError>) {
    let mut slots = lock(&shared.proxy.slots);
    let waiters = match slots.remove(&d_key) {
        Some(Slot::Connecting(w)) => w,
        Some(other) => {
            slots.insert(d_key, other);
            Vec::new()
        }
        None => Vec::new(),
    };
    if let Ok(l) = &outcome {
        slots.insert(d_key, Slot::Up(l.clone()));
    }
    drop(slots);
    for w in waiters {
        let _ = w.send(outcome.clone());
    }
}

/// Forgets `link` if it is still the one registered for `d_key`.
fn forget(shared: &RelayShared, d_key: [u8; 32], link: &Arc<OutLink>) {
    let mut slots = lock(&shared.proxy.slots);
    if matches!(slots.get(&d_key), Some(Slot::Up(l)) if Arc::ptr_eq(l, link)) {
        slots.remove(&d_key);
    }
}

/// Maps a failed link opening to PRXY's error (§10.2 table).
fn open_error(e: &GrpError) -> BrokerError {
    e.broker_error()
}

/// Resolves D, connects over TCP and runs the relay link until it closes.
async fn run_link(shared: Arc<RelayShared>, d_key: [u8; 32], host: String, port: u16) {
    let started = tokio::time::Instant::now();
    let addr = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(mut addrs) => addrs.next(),
        Err(_) => None,
    };
    let Some(addr) = addr else {
        return settle(&shared, d_key, Err(BrokerError::Host));
    };
    let deadline = started + PROXY_TIMEOUT;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return settle(&shared, d_key, Err(BrokerError::Network(None))),
        Err(_) => return settle(&shared, d_key, Err(BrokerError::Timeout)),
    };
    let carrier = Carrier::Tcp(TcpCarrier::new(stream));
    let cfg = ConnectionConfig {
        handshake: InitiatorConfig::relay_link(d_key, shared.static_raw.0.clone()),
        preamble: true,
        cover: shared.config.cover.outgoing(),
        record_limit: None,
    };
    OutDriver::new(shared, d_key, addr, cfg, host, port)
        .run(carrier)
        .await;
}

/// The task state of one relay link this relay opened.
struct OutDriver {
    shared: Arc<RelayShared>,
    d_key: [u8; 32],
    addr: SocketAddr,
    conn: Connection,
    link: Option<Arc<OutLink>>,
    rx: mpsc::UnboundedReceiver<Forward>,
    tx: Option<mpsc::UnboundedSender<Forward>>,
    /// RFWDs waiting for their answer, by P's corrId `M`.
    pending: BTreeMap<[u8; 24], (oneshot::Sender<ForwardResult>, Instant)>,
    last_rfwd: Instant,
    closing: bool,
    /// D's address as PRXY named it, to open a successor at renewal.
    host: String,
    port: u16,
    /// Renewal under way: the successor's outcome (`true` = up).
    successor: Option<oneshot::Receiver<bool>>,
    /// The successor is up: answer what is pending, then goodbye.
    retiring: bool,
}

impl OutDriver {
    fn new(
        shared: Arc<RelayShared>,
        d_key: [u8; 32],
        addr: SocketAddr,
        cfg: ConnectionConfig,
        host: String,
        port: u16,
    ) -> Self {
        let now = Instant::now();
        let mut conn = Connection::new(cfg, now, &mut OsRng);
        if let Some(s) = shared.config.limits.relay_link_renew_after_secs {
            conn = conn.with_renewal_from(Duration::from_secs(s));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            shared,
            d_key,
            addr,
            conn,
            link: None,
            rx,
            tx: Some(tx),
            pending: BTreeMap::new(),
            last_rfwd: now,
            closing: false,
            host,
            port,
            successor: None,
            retiring: false,
        }
    }

    async fn run(mut self, mut carrier: Carrier) {
        self.conn.handle_carrier_up(Instant::now());
        let mut settled = false;
        'run: loop {
            while let Some(t) = self.conn.poll_transmit() {
                if tokio::time::timeout(PROXY_TIMEOUT, carrier.send(&t))
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    self.conn.handle_eof(Instant::now());
                }
            }
            while let Some(ev) = self.conn.poll_event() {
                match ev {
                    Event::Connected {
                        session_id,
                        auth_key,
                        ..
                    } => {
                        let range = self
                            .conn
                            .inner_version()
                            .map_or((VERSION, VERSION), |(_, r)| (r.min(), r.max()));
                        let Some(tx) = self.tx.take() else { continue };
                        let link = Arc::new(OutLink {
                            session_id,
                            range,
                            auth_key,
                            tx,
                            alive: AtomicBool::new(true),
                        });
                        self.shared.counters.add(Counter::RelayLinksOut, 1);
                        tracing::debug!(addr = %self.addr, "relay link up");
                        self.link = Some(link.clone());
                        self.last_rfwd = Instant::now();
                        settled = true;
                        settle(&self.shared, self.d_key, Ok(link));
                    }
                    Event::Transmission(t) => self.answer(&t),
                    Event::RenewDue => self.renew(),
                    Event::Closed(reason) => {
                        tracing::debug!(addr = %self.addr, ?reason, "relay link closed");
                        if !settled {
                            settled = true;
                            let e = match &reason {
                                CloseReason::Error(e) => open_error(e),
                                _ => BrokerError::Network(None),
                            };
                            settle(&self.shared, self.d_key, Err(e));
                        }
                        break 'run;
                    }
                    _ => {}
                }
            }
            if self.conn.is_closed() {
                break;
            }
            let now = Instant::now();
            self.expire(now);
            if self.retiring && !self.closing && self.pending.is_empty() {
                // Make-before-break done: every RFWD of the old link is answered.
                tracing::debug!(addr = %self.addr, "relay link renewed; closing the old one");
                self.closing = true;
                self.conn.close(now);
                self.shared.counters.add(Counter::RelayLinksRenewed, 1);
                continue;
            }
            if !self.closing && self.link.is_some() && now >= self.last_rfwd + LINK_IDLE {
                // 15 min without RFWD: goodbye 0x00 (§11); clients redo PRXY later.
                self.closing = true;
                self.mark_dead();
                self.conn.close(now);
                continue;
            }
            let mut wake = self.conn.poll_timeout();
            if self.link.is_some() && !self.closing {
                wake = Some(wake.map_or(self.last_rfwd + LINK_IDLE, |w| {
                    w.min(self.last_rfwd + LINK_IDLE)
                }));
            }
            if let Some(first) = self.pending.values().map(|(_, d)| *d).min() {
                wake = Some(wake.map_or(first, |w| w.min(first)));
            }
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(tokio::time::Instant::from_std(w)).await,
                    None => std::future::pending().await,
                }
            };
            let successor = self.successor.as_mut();
            tokio::select! {
                () = self.shared.shutdown.cancelled(), if !self.closing => {
                    self.closing = true;
                    self.mark_dead();
                    self.conn.close(Instant::now());
                }
                r = carrier.recv() => match r {
                    Ok(Some(data)) => self.conn.handle_input(Instant::now(), &data),
                    Ok(None) | Err(_) => self.conn.handle_eof(Instant::now()),
                },
                Some(f) = self.rx.recv() => self.forward(f),
                up = async move {
                    match successor {
                        Some(rx) => rx.await.unwrap_or(false),
                        None => std::future::pending().await,
                    }
                } => {
                    self.successor = None;
                    if up {
                        // New PFWDs go to the successor (clients redo PRXY on NO_SESSION).
                        if let Some(l) = &self.link {
                            l.alive.store(false, Ordering::Relaxed);
                        }
                        self.retiring = true;
                    }
                }
                () = sleep => self.conn.handle_timeout(Instant::now()),
            }
        }
        while let Some(t) = self.conn.poll_transmit() {
            let _ = tokio::time::timeout(Duration::from_secs(1), carrier.send(&t)).await;
        }
        carrier.close(false).await;
        if !settled {
            settle(&self.shared, self.d_key, Err(BrokerError::Network(None)));
        }
        self.mark_dead();
        // Every PFWD still waiting on this link fails (§11).
        for (_, (reply, _)) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(broker(BrokerError::Network(None))));
        }
        // Forwards that raced the close.
        self.rx.close();
        while let Ok(f) = self.rx.try_recv() {
            let _ = f.reply.send(Err(broker(BrokerError::Network(None))));
        }
    }

    /// `RenewDue`: leave the slot so the next PRXY waits for a successor, and open that
    /// successor now; this link keeps forwarding until it is up.
    fn renew(&mut self) {
        let Some(link) = self.link.clone() else {
            return;
        };
        if self.closing || self.retiring || self.successor.is_some() {
            return;
        }
        tracing::debug!(addr = %self.addr, "relay link renewal: opening a successor");
        forget(&self.shared, self.d_key, &link);
        let (tx, rx) = oneshot::channel();
        self.successor = Some(rx);
        let (shared, d_key) = (self.shared.clone(), self.d_key);
        let (host, port) = (self.host.clone(), self.port);
        self.shared.tracker.spawn(async move {
            let up = tokio::time::timeout(PROXY_TIMEOUT, link_to(&shared, d_key, host, port))
                .await
                .is_ok_and(|r| r.is_ok());
            let _ = tx.send(up);
        });
    }

    /// Later PFWDs naming this link's `h_PD` get NO_SESSION; a new PRXY opens a new link.
    fn mark_dead(&mut self) {
        if let Some(l) = &self.link {
            l.alive.store(false, Ordering::Relaxed);
            forget(&self.shared, self.d_key, l);
        }
    }

    fn forward(&mut self, f: Forward) {
        let Some(session_id) = self.conn.session_id() else {
            let _ = f.reply.send(Err(broker(BrokerError::Network(None))));
            return;
        };
        let mut m = [0u8; 24];
        OsRng.fill_bytes(&mut m);
        let t = Authorized::new(&session_id, &m, b"", &f.command).and_then(|a| {
            let mut t = Vec::with_capacity(f.command.len() + 32);
            encode_transmission(VERSION, b"", &a, &mut t).map(|()| t)
        });
        let now = Instant::now();
        match t.ok().map(|t| self.conn.send(t, now)) {
            Some(Ok(())) => {
                self.shared.counters.add(Counter::RfwdSent, 1);
                self.last_rfwd = now;
                self.pending.insert(m, (f.reply, now + PROXY_TIMEOUT));
            }
            _ => {
                let _ = f.reply.send(Err(ErrorType::Internal));
            }
        }
    }

    /// A transmission from D: RRES or a plain ERR for one of our RFWDs.
    fn answer(&mut self, t: &[u8]) {
        let Ok(d) = Transmission::decode(VERSION, &[], t) else {
            return;
        };
        let Some((reply, _)) = <[u8; 24]>::try_from(d.corr_id)
            .ok()
            .and_then(|m| self.pending.remove(&m))
        else {
            return;
        };
        let result = match Response::decode(VERSION, d.command) {
            Ok(Response::RRes(enc_r)) => Ok(enc_r),
            Ok(Response::Err(e)) => Err(ErrorType::Proxy(ProxyError::Protocol(Box::new(e)))),
            Ok(other) => Err(broker(BrokerError::Unexpected(other.tag().to_owned()))),
            Err(e) => Err(broker(BrokerError::Response(e.to_string()))),
        };
        let _ = reply.send(result);
    }

    /// RFWDs unanswered for 30 s: `ERR PROXY BROKER TIMEOUT`.
    fn expire(&mut self, now: Instant) {
        let late: Vec<[u8; 24]> = self
            .pending
            .iter()
            .filter(|(_, (_, d))| now >= *d)
            .map(|(m, _)| *m)
            .collect();
        for m in late {
            if let Some((reply, _)) = self.pending.remove(&m) {
                let _ = reply.send(Err(broker(BrokerError::Timeout)));
            }
        }
    }
}
