//! The upstream task of one GRP/1 relay link (issue 7): dials the carrier the address names,
//! drives `muxd-grp`'s sans-IO client [`Connection`] (handshake, records, cover traffic,
//! GRP's own PING schedule of §13) and hands the pool the inner SMP v18 transmissions.
//!
//! The pool speaks plain SMP blocks to every upstream. Outbound, this task splits each block
//! into its transmissions and queues them on the connection, which packs them into records at
//! its cover ticks (§12.2). Inbound, every transmission becomes a block of its own. The GRP
//! session (handshake hash, the relay's session auth key, versions, cover rate) goes to the
//! pool once (`GrpConnected`), and the record counters whenever they changed, at most every
//! [`COUNTER_EVERY`].

use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use muxd_core::{GrpCounters, GrpSession, ServerKey};
use muxd_grp::address::{Carrier, RelayAddress};
use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::cover::CoverConfig;
use muxd_grp::error::Reconnect;
use muxd_smp::block::{decode_batch, pad_block, unpad_block};
use muxd_smp::encoding::put_large;
use muxd_transport::BLOCK_SIZE;
use muxd_transport::grp::{GrpCarrier, GrpCarrierKind};
use rand_core::OsRng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::upstream::{UpstreamEvent, UpstreamEventKind};

/// How often at most the record counters are reported while they change.
const COUNTER_EVERY: Duration = Duration::from_millis(250);

/// Tunables of GRP links.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpOptions {
    /// The cover scheduler's `max_delay` on client links; `None` = the spec's 1 s.
    pub(crate) max_delay: Option<Duration>,
}

/// One link's task. Reports `GrpConnected`, blocks, counters, and finally `Disconnected`
/// unless it was cancelled (the pool already forgot the link then).
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
    let (mut carrier, address) = match opened {
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
    let mut cfg = ConnectionConfig::client(address.key);
    cfg.preamble = address.carrier.has_preamble();
    cfg.cover = options.max_delay.map(|max_delay| CoverConfig {
        max_delay,
        ..CoverConfig::CLIENT_LINK
    });
    // The handshake deadline runs from the start of the carrier connection (§5.7).
    let mut conn = Connection::new(cfg, started, &mut OsRng);
    conn.handle_carrier_up(Instant::now());
    let mut closed: Option<String> = None;
    let mut protocol_error = false;
    let mut counters = GrpCounters::default();
    let mut counters_at = Instant::now();
    loop {
        while let Some(t) = conn.poll_transmit() {
            if let Err(e) = carrier.send(&t).await {
                tracing::debug!(error = %e, "GRP carrier write failed");
                conn.handle_eof(Instant::now());
            }
        }
        while let Some(ev) = conn.poll_event() {
            let kind = match ev {
                Event::Connected {
                    session_id,
                    inner_version,
                    cover_rate,
                    auth_key,
                } => {
                    tracing::debug!(cover_rate, inner_version, "GRP session up");
                    UpstreamEventKind::GrpConnected(GrpSession {
                        session_id,
                        auth_key,
                        inner_version,
                        cover_rate,
                    })
                }
                Event::Transmission(t) => match single_block(&t) {
                    Some(block) => UpstreamEventKind::Block(block),
                    None => continue,
                },
                Event::RenewDue => {
                    // Make-before-break is not implemented: close at 23–23.5 h and let the
                    // pool reconnect (it resubscribes on the new session).
                    conn.close(Instant::now());
                    continue;
                }
                Event::Closed(reason) => {
                    closed = Some(close_text(&reason));
                    protocol_error = matches!(reason, CloseReason::Error(_));
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
        let now = Instant::now();
        if let (Some((sent, received)), Some((cover_sent, cover_received))) =
            (conn.record_counts(), conn.cover_counts())
        {
            let c = GrpCounters {
                real_sent: sent.saturating_sub(cover_sent),
                cover_sent,
                real_received: received.saturating_sub(cover_received),
                cover_received,
            };
            if c != counters && now.saturating_duration_since(counters_at) >= COUNTER_EVERY {
                counters = c;
                counters_at = now;
                report(UpstreamEventKind::GrpCounters(c)).await;
            }
        }
        if conn.is_closed() {
            break;
        }
        // Counters that changed since the last report go out at the next allowed instant.
        let counters_due = conn
            .record_counts()
            .is_some()
            .then(|| counters_at + COUNTER_EVERY);
        let wake = [conn.poll_timeout(), counters_due]
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
                conn.close(Instant::now());
                while let Some(t) = conn.poll_transmit() {
                    let _ = carrier.send(&t).await;
                }
                carrier.close(false).await;
                return;
            }
            r = carrier.recv() => match r {
                Ok(Some(d)) => {
                    let framed = carrier.is_message_framed();
                    if framed && conn.expected_len() != Some(d.len()) {
                        // Each WebSocket message must be exactly one record (§4.3).
                        closed = Some("WebSocket message of the wrong size".to_owned());
                        protocol_error = true;
                        break;
                    }
                    conn.handle_input(Instant::now(), &d);
                }
                Ok(None) => conn.handle_eof(Instant::now()),
                Err(e) => {
                    tracing::debug!(error = %e, "GRP carrier read failed");
                    conn.handle_eof(Instant::now());
                }
            },
            block = outbound.recv() => match block {
                Some(block) => enqueue(&mut conn, &block),
                None => conn.close(Instant::now()),
            },
            () = sleep => conn.handle_timeout(Instant::now()),
        }
    }
    carrier.close(protocol_error).await;
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
