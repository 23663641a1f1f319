//! The upstream task of one GRP/1 relay link (issue 7): dials the carrier the address names,
//! drives `muxd-grp`'s sans-IO client [`Connection`] (handshake, records, cover traffic,
//! GRP's own PING schedule of §13) and hands the pool the inner SMP v18 transmissions.
//!
//! The pool speaks plain SMP blocks to every upstream. Outbound, this task splits each block
//! into its transmissions and queues them on the connection, which packs them into records at
//! its cover ticks (§12.2). Inbound, every transmission becomes a block of its own. The GRP
//! session (handshake hash, the relay's session auth key, versions, cover rate) goes to the
//! pool as `GrpConnected`, and the record counters whenever they changed, at most every
//! [`COUNTER_EVERY`] (summed over the link's sessions, so they keep counting across a
//! renewal).
//!
//! **Session renewal, make-before-break (§6.5).** The task owns every GRP connection of its
//! link; the pool sees one link. When the current session says [`Event::RenewDue`] (23–23.5 h
//! after Split, or earlier with `[grp] renew_after_s`), the task dials a successor while the
//! current session keeps carrying traffic both ways. Only when the successor's handshake is
//! done does it report `GrpConnected` again: the pool takes that as a renewal (see
//! `muxd_core::pool::grp`), re-sends every subscription on the new session (signed with its
//! session id) and makes all new commands there. The pool marks that switch in its block
//! stream with an empty block: blocks before it were made (and signed) for the old session
//! and still go there, blocks after it go to the new session. The old session still delivers what the relay sends
//! on it (answers to commands in flight there, MSGs until the relay moves the subscription)
//! except END, the relay's expected answer to the re-SUB, which is not news for the pool.
//! Once the resubscription is answered and nothing is in flight on the old session, the pool
//! writes a second empty block: the task sends goodbye 0x00 on the old session and closes it after
//! the relay's EOF or the linger time. A successor that fails to dial or to complete its
//! handshake is dropped and tried again after a growing delay ([`RENEW_RETRY_FIRST`] doubling
//! up to [`RENEW_RETRY_MAX`]) while the current session carries on; the current session still
//! closes itself at 24 h + 60 s, and the pool then reconnects as after any loss.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use muxd_core::{GrpCounters, GrpSession, ServerKey};
use muxd_grp::address::{Carrier, RelayAddress};
use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::cover::CoverConfig;
use muxd_grp::error::Reconnect;
use muxd_smp::block::{decode_batch, pad_block, unpad_block};
use muxd_smp::encoding::put_large;
use muxd_smp::transmission::Transmission;
use muxd_transport::BLOCK_SIZE;
use muxd_transport::grp::{GrpCarrier, GrpCarrierKind};
use rand_core::OsRng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::upstream::{UpstreamEvent, UpstreamEventKind};

/// How often at most the record counters are reported while they change.
const COUNTER_EVERY: Duration = Duration::from_millis(250);

/// The first wait before dialing a successor again after a failed renewal attempt.
const RENEW_RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between renewal attempts: the window from 23.5 h to the forced close at
/// 24 h + 60 s still holds many attempts.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);

/// Tunables of GRP links.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpOptions {
    /// The cover scheduler's `max_delay` on client links; `None` = the spec's 1 s.
    pub(crate) max_delay: Option<Duration>,
    /// Start of the make-before-break window; `None` = the spec's 23 h (see
    /// [`Connection::with_renewal_from`], which never lets it end later than the spec's).
    pub(crate) renew_after: Option<Duration>,
}

/// The dial of a successor session: the carrier and the parsed address, or why not.
type Dialing = Pin<Box<dyn Future<Output = Result<(GrpCarrier, RelayAddress), String>> + Send>>;

/// One GRP connection of the link and its carrier.
struct Leg {
    conn: Connection,
    carrier: GrpCarrier,
    /// The negotiated inner version, once established.
    inner_version: Option<u16>,
    /// The session's record counters as last seen while it was established.
    counters: GrpCounters,
    /// Set when the carrier broke the framing rules (WebSocket message size): close with a
    /// protocol error.
    protocol_error: bool,
}

impl Leg {
    fn new(
        carrier: GrpCarrier,
        address: &RelayAddress,
        options: &GrpOptions,
        started: Instant,
    ) -> Self {
        let mut cfg = ConnectionConfig::client(address.key);
        cfg.preamble = address.carrier.has_preamble();
        cfg.cover = options.max_delay.map(|max_delay| CoverConfig {
            max_delay,
            ..CoverConfig::CLIENT_LINK
        });
        // The handshake deadline runs from the start of the carrier connection (§5.7).
        let mut conn = Connection::new(cfg, started, &mut OsRng);
        if let Some(from) = options.renew_after {
            conn = conn.with_renewal_from(from);
        }
        conn.handle_carrier_up(Instant::now());
        Self {
            conn,
            carrier,
            inner_version: None,
            counters: GrpCounters::default(),
            protocol_error: false,
        }
    }

    /// Writes what the connection wants to send.
    async fn flush(&mut self) {
        while let Some(t) = self.conn.poll_transmit() {
            if let Err(e) = self.carrier.send(&t).await {
                tracing::debug!(error = %e, "GRP carrier write failed");
                self.conn.handle_eof(Instant::now());
            }
        }
    }

    /// Feeds what the carrier read.
    fn handle_read(&mut self, r: std::io::Result<Option<Vec<u8>>>) {
        let now = Instant::now();
        match r {
            Ok(Some(d)) => {
                if self.carrier.is_message_framed() && self.conn.expected_len() != Some(d.len()) {
                    // Each WebSocket message must be exactly one record (§4.3).
                    self.protocol_error = true;
                    self.conn.handle_eof(now);
                    return;
                }
                self.conn.handle_input(now, &d);
            }
            Ok(None) => self.conn.handle_eof(now),
            Err(e) => {
                tracing::debug!(error = %e, "GRP carrier read failed");
                self.conn.handle_eof(now);
            }
        }
    }

    /// Refreshes [`Self::counters`] while the session is established.
    fn update_counters(&mut self) {
        if let (Some((sent, received)), Some((cover_sent, cover_received))) =
            (self.conn.record_counts(), self.conn.cover_counts())
        {
            self.counters = GrpCounters {
                real_sent: sent.saturating_sub(cover_sent),
                cover_sent,
                real_received: received.saturating_sub(cover_received),
                cover_received,
            };
        }
    }

    /// Says goodbye (if established) and closes the carrier, for a task that stops.
    async fn shut(mut self) {
        self.conn.close(Instant::now());
        while let Some(t) = self.conn.poll_transmit() {
            let _ = self.carrier.send(&t).await;
        }
        self.carrier.close(self.protocol_error).await;
    }
}

fn add(a: GrpCounters, b: GrpCounters) -> GrpCounters {
    GrpCounters {
        real_sent: a.real_sent + b.real_sent,
        cover_sent: a.cover_sent + b.cover_sent,
        real_received: a.real_received + b.real_received,
        cover_received: a.cover_received + b.cover_received,
    }
}

/// Reads from a leg that may not exist (never ready without one).
async fn recv_opt(leg: Option<&mut Leg>) -> std::io::Result<Option<Vec<u8>>> {
    match leg {
        Some(l) => l.carrier.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for a successor's dial that may not be under way.
async fn dial_opt(dialing: Option<&mut Dialing>) -> Result<(GrpCarrier, RelayAddress), String> {
    match dialing {
        Some(d) => d.await,
        None => std::future::pending().await,
    }
}

/// Dials `server` with the handshake's 30 s carrier limit.
fn dial(server: &ServerKey) -> Dialing {
    let server = server.clone();
    Box::pin(async move {
        match tokio::time::timeout(muxd_grp::HS_TIMEOUT, open(&server)).await {
            Ok(r) => r,
            Err(_) => Err("GRP carrier not connected within 30s".to_owned()),
        }
    })
}

fn session_of(ev: &Event) -> Option<GrpSession> {
    match ev {
        Event::Connected {
            session_id,
            inner_version,
            cover_rate,
            auth_key,
        } => Some(GrpSession {
            session_id: *session_id,
            auth_key: *auth_key,
            inner_version: *inner_version,
            cover_rate: *cover_rate,
        }),
        _ => None,
    }
}

/// Whether a transmission is END (the relay moved a subscription elsewhere).
fn is_end(t: &[u8], version: Option<u16>) -> bool {
    let version = version.unwrap_or(muxd_grp::INNER_VERSION);
    // The session id is implied from v7 on, so any value decodes the same.
    Transmission::decode(version, &[], t).is_ok_and(|d| d.command == b"END")
}

/// One link's task. Reports `GrpConnected` (again after each renewal), blocks, counters, and
/// finally `Disconnected` unless it was cancelled (the pool already forgot the link then).
#[allow(clippy::too_many_lines)]
pub(crate) async fn run(
    conn_id: u64,
    server: ServerKey,
    events: mpsc::Sender<UpstreamEvent>,
    options: GrpOptions,
    mut outbound: mpsc::Receiver<Vec<u8>>,
    cancel: CancellationToken,
) {
    let report = |kind| {
        let events = events.clone();
        let server = server.clone();
        async move {
            let event = UpstreamEvent {
                conn: conn_id,
                server,
                kind,
            };
            events.send(event).await.is_ok()
        }
    };
    let started = Instant::now();
    let opened = tokio::select! {
        () = cancel.cancelled() => return,
        r = tokio::time::timeout(muxd_grp::HS_TIMEOUT, open(&server)) => r,
    };
    let (carrier, address) = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(reason)) => {
            report(UpstreamEventKind::Disconnected(reason)).await;
            return;
        }
        Err(_) => {
            let reason = "GRP carrier not connected within 30s".to_owned();
            report(UpstreamEventKind::Disconnected(reason)).await;
            return;
        }
    };
    let mut cur = Leg::new(carrier, &address, &options, started);
    // During a renewal: the successor being dialed, then handshaking (`next`), and after the
    // switch the previous session until it is closed (`old`).
    let mut dialing: Option<Dialing> = None;
    let mut dial_started = Instant::now();
    let mut next: Option<Leg> = None;
    let mut old: Option<Leg> = None;
    // The pool's first empty block after a renewal was seen: its blocks are for `cur`.
    let mut switched = true;
    let mut retry_at: Option<Instant> = None;
    let mut retry_delay = RENEW_RETRY_FIRST;
    // Counters of the sessions already over.
    let mut base = GrpCounters::default();
    let mut closed: Option<String> = None;
    let mut counters = GrpCounters::default();
    let mut counters_at = Instant::now();
    loop {
        cur.flush().await;
        if let Some(l) = next.as_mut() {
            l.flush().await;
        }
        if let Some(l) = old.as_mut() {
            l.flush().await;
        }
        while let Some(ev) = cur.conn.poll_event() {
            let kind = match ev {
                Event::Connected {
                    inner_version,
                    cover_rate,
                    ..
                } => {
                    tracing::debug!(cover_rate, inner_version, "GRP session up");
                    cur.inner_version = Some(inner_version);
                    match session_of(&ev) {
                        Some(s) => UpstreamEventKind::GrpConnected(s),
                        None => continue,
                    }
                }
                Event::Transmission(t) => match single_block(&t) {
                    Some(block) => UpstreamEventKind::Block(block),
                    None => continue,
                },
                Event::RenewDue => {
                    if dialing.is_none() && next.is_none() && old.is_none() {
                        tracing::info!("GRP session renewal due: dialing its successor");
                        dial_started = Instant::now();
                        dialing = Some(dial(&server));
                        retry_delay = RENEW_RETRY_FIRST;
                    }
                    continue;
                }
                Event::Closed(reason) => {
                    closed = Some(close_text(&reason));
                    cur.protocol_error |= matches!(reason, CloseReason::Error(_));
                    continue;
                }
                other => {
                    tracing::debug!(?other, "GRP event ignored");
                    continue;
                }
            };
            if !report(kind).await {
                return;
            }
        }
        let mut promoted = None;
        if let Some(l) = next.as_mut() {
            while let Some(ev) = l.conn.poll_event() {
                match ev {
                    Event::Connected { inner_version, .. } => {
                        l.inner_version = Some(inner_version);
                        promoted = session_of(&ev);
                    }
                    Event::Closed(reason) => {
                        let wait = retry_delay;
                        tracing::info!(
                            ?reason,
                            ?wait,
                            "GRP renewal failed; the session carries on"
                        );
                        retry_at = Some(Instant::now() + wait);
                        retry_delay = (retry_delay * 2).min(RENEW_RETRY_MAX);
                    }
                    // Nothing else comes before Connected.
                    other => tracing::debug!(?other, "GRP successor event ignored"),
                }
            }
            if l.conn.is_closed()
                && let Some(l) = next.take()
            {
                l.shut().await;
            }
        }
        if let Some(session) = promoted
            && let Some(new) = next.take()
        {
            // From here on the pool's blocks go to the new session; the old one stays open
            // for what the relay still sends on it, until the pool's empty block.
            cur.update_counters();
            old = Some(std::mem::replace(&mut cur, new));
            switched = false;
            retry_at = None;
            tracing::info!("GRP successor session up; moving the link to it");
            if !report(UpstreamEventKind::GrpConnected(session)).await {
                return;
            }
        }
        if let Some(l) = old.as_mut() {
            while let Some(ev) = l.conn.poll_event() {
                match ev {
                    // The relay's END for a queue re-subscribed on the new session.
                    Event::Transmission(t) if is_end(&t, l.inner_version) => {
                        tracing::debug!("END on the old GRP session dropped");
                    }
                    Event::Transmission(t) => {
                        if let Some(block) = single_block(&t)
                            && !report(UpstreamEventKind::Block(block)).await
                        {
                            return;
                        }
                    }
                    Event::Closed(reason) => {
                        tracing::debug!(?reason, "old GRP session closed");
                    }
                    other => tracing::debug!(?other, "old GRP session event ignored"),
                }
            }
            l.update_counters();
            if l.conn.is_closed()
                && let Some(mut l) = old.take()
            {
                base = add(base, l.counters);
                l.carrier.close(l.protocol_error).await;
            }
        }
        let now = Instant::now();
        cur.update_counters();
        let total = [old.as_ref().map(|l| l.counters), Some(cur.counters)]
            .into_iter()
            .flatten()
            .fold(base, add);
        if total != counters && now.saturating_duration_since(counters_at) >= COUNTER_EVERY {
            counters = total;
            counters_at = now;
            report(UpstreamEventKind::GrpCounters(total)).await;
        }
        if cur.conn.is_closed() {
            break;
        }
        // Counters that changed since the last report go out at the next allowed instant.
        let counters_due = (total != counters).then(|| counters_at + COUNTER_EVERY);
        let wake = [
            cur.conn.poll_timeout(),
            next.as_ref().and_then(|l| l.conn.poll_timeout()),
            old.as_ref().and_then(|l| l.conn.poll_timeout()),
            counters_due,
            retry_at,
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(tokio::time::Instant::from_std(w)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => {
                // The pool forgot this link: say goodbye and close, without reporting.
                for l in [Some(cur), next, old].into_iter().flatten() {
                    l.shut().await;
                }
                return;
            }
            r = cur.carrier.recv() => cur.handle_read(r),
            r = recv_opt(next.as_mut()) => {
                if let Some(l) = next.as_mut() {
                    l.handle_read(r);
                }
            }
            r = recv_opt(old.as_mut()) => {
                if let Some(l) = old.as_mut() {
                    l.handle_read(r);
                }
            }
            r = dial_opt(dialing.as_mut()) => {
                dialing = None;
                match r {
                    Ok((carrier, address)) => {
                        next = Some(Leg::new(carrier, &address, &options, dial_started));
                    }
                    Err(reason) => {
                        let wait = retry_delay;
                        tracing::info!(%reason, ?wait, "GRP renewal dial failed; the session carries on");
                        retry_at = Some(Instant::now() + wait);
                        retry_delay = (retry_delay * 2).min(RENEW_RETRY_MAX);
                    }
                }
            }
            block = outbound.recv() => match block {
                // The pool's renewal marks (see the module docs): first the switch to the
                // new session, then the old session's work is done: goodbye 0x00 on it.
                Some(block) if block.is_empty() => match old.as_mut() {
                    Some(_) if !switched => switched = true,
                    Some(l) => {
                        tracing::info!("GRP renewal done: goodbye on the old session");
                        l.conn.close(Instant::now());
                    }
                    None => {}
                },
                Some(block) => match old.as_mut() {
                    // Made for the old session before the pool heard of the new one.
                    Some(l) if !switched => enqueue(&mut l.conn, &block),
                    _ => enqueue(&mut cur.conn, &block),
                },
                None => cur.conn.close(Instant::now()),
            },
            () = sleep => {
                let now = Instant::now();
                cur.conn.handle_timeout(now);
                if let Some(l) = next.as_mut() {
                    l.conn.handle_timeout(now);
                }
                if let Some(l) = old.as_mut() {
                    l.conn.handle_timeout(now);
                }
                if retry_at.is_some_and(|t| t <= now) {
                    retry_at = None;
                    if next.is_none() && dialing.is_none() && old.is_none() {
                        dial_started = now;
                        dialing = Some(dial(&server));
                    }
                }
            }
        }
    }
    for l in [next, old].into_iter().flatten() {
        l.shut().await;
    }
    cur.carrier.close(cur.protocol_error).await;
    let reason = closed.unwrap_or_else(|| "GRP link closed".to_owned());
    report(UpstreamEventKind::Disconnected(reason)).await;
}

/// Resolves the relay's host and opens the carrier its scheme names.
async fn open(server: &ServerKey) -> Result<(GrpCarrier, RelayAddress), String> {
    let address =
        RelayAddress::from_str(server.address()).map_err(|e| format!("GRP relay address: {e}"))?;
    let kind = match address.carrier {
        Carrier::Tcp => GrpCarrierKind::Tcp,
        Carrier::Quic => GrpCarrierKind::Quic,
        Carrier::Ws => GrpCarrierKind::Ws,
        Carrier::Wss => GrpCarrierKind::Wss,
        // `Carrier` is non-exhaustive: a form added later is refused until it is dialled.
        other => {
            return Err(format!(
                "{} is not supported by this daemon",
                other.scheme()
            ));
        }
    };
    let host = address.host.to_string();
    let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), address.port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolving {host}: no address"))?;
    let path = address.path.as_deref().unwrap_or("/grp");
    // The host as written (not the resolved IP) is the SNI and `Host` header of grp+wss, so
    // that a CDN or reverse proxy in front of the relay can route the connection.
    let carrier = GrpCarrier::connect_named(kind, addr, &host, path)
        .await
        .map_err(|e| format!("GRP {} connect to {addr}: {e}", address.carrier.scheme()))?;
    Ok((carrier, address))
}

/// Queues the transmissions of one pool block on the connection.
fn enqueue(conn: &mut Connection, block: &[u8]) {
    let Ok(items) = unpad_block(block).and_then(decode_batch) else {
        tracing::warn!("pool block did not decode; dropped");
        return;
    };
    for t in items {
        if let Err(e) = conn.send(t.to_vec(), Instant::now()) {
            // Not established (closing): the pool hears `Disconnected` and sends again.
            tracing::debug!(error = %e, "GRP send refused");
        }
    }
}

/// One transmission as a plain SMP block (a batch of one).
fn single_block(t: &[u8]) -> Option<Box<[u8; BLOCK_SIZE]>> {
    let mut content = vec![1u8];
    put_large(&mut content, t).ok()?;
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    pad_block(&content, &mut block).ok()?;
    block.into_boxed_slice().try_into().ok()
}

fn close_text(reason: &CloseReason) -> String {
    match reason {
        CloseReason::Goodbye(g) => format!("relay said goodbye ({g:?})"),
        CloseReason::Local => "closed".to_owned(),
        // The pool treats this prefix as permanent: retrying cannot fix a wrong key.
        CloseReason::Error(e) if e.reconnect() == Reconnect::Never => {
            format!("server identity mismatch or no common version (GRP: {e})")
        }
        CloseReason::Error(e) => format!("GRP: {e}"),
        other => format!("GRP: {other:?}"),
    }
}
