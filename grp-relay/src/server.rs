//! Accept loops (one per carrier) and the per-link driver.
//!
//! Each accepted carrier gets one task that owns a [`RelayLink`] and does only IO: bytes from
//! the carrier into `handle_input`, `poll_transmit` out to the carrier, one timer re-armed
//! from `poll_timeout`, and the link's events into [`LinkCommands`]. Replies produced
//! elsewhere (END/DELD/MSG from other links, PKEY/PRES from the proxy) arrive on the link's
//! channel and are queued like any other transmission.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muxd_grp::relay::{RelayCloseReason, RelayEvent, RelayLink, RelayLinkConfig};
use muxd_grp::{FAIL_DELAY, HS_LEN, HS_TIMEOUT, PREAMBLE, RECORD, Role};
use muxd_smp::error::ErrorType;
use rand_core::OsRng;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::carrier::Carrier;
use crate::carrier::quic::QuicCarrier;
use crate::carrier::tcp::TcpCarrier;
use crate::carrier::ws::{WsCarrier, WssTls};
use crate::commands::{Action, LinkCommands, Reply};
use crate::proxy::{self, ClientProxy};
use crate::shadow::Shadow;
use crate::stats::{CarrierKind, Counter};
use crate::{Addresses, RelayShared, StartError};

/// A record not accepted by the carrier within this long closes the link (§13).
const WRITE_STALL: Duration = Duration::from_secs(30);

/// Binds every configured listener and spawns its accept loop.
pub(crate) async fn listen(shared: &Arc<RelayShared>) -> Result<Addresses, StartError> {
    let listen = &shared.config.listen;
    let bind_err = |carrier, addr| {
        move |source| StartError::Bind {
            carrier,
            addr,
            source,
        }
    };
    // `validate` guarantees TCP is configured; a missing one is still not a panic.
    let tcp_addr = listen
        .tcp
        .ok_or_else(|| StartError::Quic("no TCP listener configured".into()))?;
    let tcp = TcpListener::bind(tcp_addr)
        .await
        .map_err(bind_err("tcp", tcp_addr))?;
    let tcp_local = tcp.local_addr().map_err(bind_err("tcp", tcp_addr))?;
    shared.tracker.spawn(accept_tcp(shared.clone(), tcp));

    let quic = match listen.quic {
        Some(addr) => {
            let cfg = crate::carrier::quic::server_config().map_err(StartError::Quic)?;
            let endpoint = quinn::Endpoint::server(cfg, addr).map_err(bind_err("quic", addr))?;
            let local = endpoint.local_addr().map_err(bind_err("quic", addr))?;
            shared.tracker.spawn(accept_quic(shared.clone(), endpoint));
            Some(local)
        }
        None => None,
    };
    let ws = match listen.ws {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind_err("ws", addr))?;
            let local = l.local_addr().map_err(bind_err("ws", addr))?;
            shared.tracker.spawn(accept_ws(shared.clone(), l, None));
            Some(local)
        }
        None => None,
    };
    let wss = match listen.wss {
        Some(addr) => {
            let files = listen.tls_cert.as_deref().zip(listen.tls_key.as_deref());
            let name = shared
                .config
                .public_host
                .as_deref()
                .unwrap_or("grp-relay.invalid");
            let tls = WssTls::new(files, name).map_err(StartError::Tls)?;
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind_err("wss", addr))?;
            let local = l.local_addr().map_err(bind_err("wss", addr))?;
            if tls.is_generated() {
                // Fine for GRP clients (they verify the Noise key, not the certificate); a
                // CDN or reverse proxy that checks its origin needs the operator's own.
                tracing::warn!(
                    %local,
                    "wss: no listen.tls_cert/listen.tls_key configured; serving a generated \
                     self-signed certificate"
                );
            }
            shared
                .tracker
                .spawn(accept_ws(shared.clone(), l, Some(tls)));
            Some(local)
        }
        None => None,
    };
    Ok(Addresses {
        tcp: tcp_local,
        quic,
        ws,
        wss,
    })
}

async fn accept_tcp(shared: Arc<RelayShared>, listener: TcpListener) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        shared.counters.accepted(CarrierKind::Tcp);
        let carrier = Carrier::Tcp(TcpCarrier::new(stream));
        shared
            .tracker
            .spawn(serve_link(shared.clone(), carrier, peer));
    }
}

async fn accept_quic(shared: Arc<RelayShared>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        let s = shared.clone();
        shared.tracker.spawn(async move {
            let accepted = tokio::select! {
                () = s.shutdown.cancelled() => None,
                c = QuicCarrier::accept(incoming, HS_TIMEOUT) => c,
            };
            if let Some(c) = accepted {
                s.counters.accepted(CarrierKind::Quic);
                serve_link(s, Carrier::Quic(c), peer).await;
            }
        });
    }
    // Let the CONNECTION_CLOSE frames of the links go out before the socket is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// The WebSocket accept loop, for `grp+ws` (`tls` unset) and `grp+wss`.
async fn accept_ws(shared: Arc<RelayShared>, listener: TcpListener, tls: Option<WssTls>) {
    let kind = if tls.is_some() {
        CarrierKind::Wss
    } else {
        CarrierKind::Ws
    };
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "WebSocket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let s = shared.clone();
        let tls = tls.clone();
        shared.tracker.spawn(async move {
            let path = s.config.listen.ws_path.clone();
            let upgraded = tokio::select! {
                () = s.shutdown.cancelled() => None,
                c = WsCarrier::accept_over(stream, tls.as_ref(), &path, HS_TIMEOUT) => c,
            };
            if let Some(c) = upgraded {
                s.counters.accepted(kind);
                serve_link(s, Carrier::Ws(Box::new(c)), peer).await;
            }
        });
    }
}

/// Counts the link against the connection limit for as long as it lives.
struct OpenGuard(Arc<RelayShared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_links.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_link(shared: Arc<RelayShared>, mut carrier: Carrier, peer: SocketAddr) {
    let open = shared.open_links.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(shared.clone());
    if open >= shared.config.limits.max_connections {
        // Overload is a handshake failure like any other: silence, then a close (§5.7).
        shared.counters.add(Counter::HandshakeFailures, 1);
        refuse_silently(&mut carrier).await;
        return;
    }
    LinkDriver::new(shared, peer, &carrier).run(carrier).await;
}

/// Reads and discards message 1 (and anything after it), then closes `FAIL_DELAY` after the
/// last byte of message 1, or at the handshake deadline if it never arrives.
async fn refuse_silently(carrier: &mut Carrier) {
    let deadline = tokio::time::Instant::now() + HS_TIMEOUT;
    let want = HS_LEN
        + if carrier.has_preamble() {
            PREAMBLE.len()
        } else {
            0
        };
    let mut got = 0usize;
    while got < want {
        match tokio::time::timeout_at(deadline, carrier.recv()).await {
            Ok(Ok(Some(d))) => got += d.len(),
            _ => {
                carrier.close(false).await;
                return;
            }
        }
    }
    discard_until(carrier, tokio::time::Instant::now() + FAIL_DELAY).await;
    carrier.close(false).await;
}

async fn discard_until(carrier: &mut Carrier, until: tokio::time::Instant) {
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(until, carrier.recv()).await {}
}

/// The per-link task state around one [`RelayLink`].
struct LinkDriver {
    shared: Arc<RelayShared>,
    peer: SocketAddr,
    link: RelayLink,
    tx: mpsc::UnboundedSender<Reply>,
    rx: mpsc::UnboundedReceiver<Reply>,
    cmds: Option<LinkCommands>,
    conn: Option<crate::store::ConnId>,
    client_proxy: Arc<Mutex<ClientProxy>>,
    session_id: [u8; 32],
    /// Mirror of the link's outbox, to tell data records from cover records in the counters.
    shadow: Shadow,
    /// Bytes received since Split, to count received records.
    rx_bytes: u64,
    rx_records_counted: u64,
    finished: bool,
    shutting_down: bool,
}

impl LinkDriver {
    fn new(shared: Arc<RelayShared>, peer: SocketAddr, carrier: &Carrier) -> Self {
        let cfg = RelayLinkConfig {
            preamble: carrier.has_preamble(),
            cover: shared.config.cover.accepted(),
            record_limit: None,
        };
        let link = RelayLink::new(shared.responder.clone(), cfg, Instant::now(), &mut OsRng);
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            shared,
            peer,
            link,
            tx,
            rx,
            cmds: None,
            conn: None,
            client_proxy: Arc::new(Mutex::new(ClientProxy::default())),
            session_id: [0u8; 32],
            shadow: Shadow::default(),
            rx_bytes: 0,
            rx_records_counted: 0,
            finished: false,
            shutting_down: false,
        }
    }

    async fn run(mut self, mut carrier: Carrier) {
        let mut protocol_error = false;
        loop {
            let was_established = self.link.session_id().is_some();
            if !self.flush(&mut carrier, false).await {
                break;
            }
            if self.link.is_closed() {
                break;
            }
            let deadline = self.link.poll_timeout().map(tokio::time::Instant::from_std);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.shared.shutdown.cancelled(), if !self.shutting_down => {
                    self.shutting_down = true;
                    self.link.goodbye(Instant::now(), muxd_grp::block::GoodbyeReason::Shutdown);
                }
                r = carrier.recv() => {
                    let now = Instant::now();
                    match r {
                        Ok(Some(data)) => {
                            if carrier.is_message_framed() && !self.message_fits(data.len()) {
                                if was_established {
                                    protocol_error = true;
                                    break;
                                }
                                // Before Split a bad message is a failed message 1 (§4.3, §5.7).
                                self.shared.counters.add(Counter::HandshakeFailures, 1);
                                discard_until(&mut carrier, tokio::time::Instant::now() + FAIL_DELAY).await;
                                break;
                            }
                            if was_established {
                                self.rx_bytes += data.len() as u64;
                            }
                            self.link.handle_input(now, &data);
                        }
                        Ok(None) | Err(_) => self.link.handle_eof(now),
                    }
                }
                Some(reply) = self.rx.recv() => self.queue(reply),
                () = sleep => self.link.handle_timeout(Instant::now()),
            }
            self.handle_events();
            if was_established && self.link.session_id().is_none() {
                // The step ended the session: if it produced a record, that is the goodbye.
                self.shadow.expect_goodbye();
            }
        }
        // Flush what the last step produced (record 2 before a version mismatch close, say).
        let _ = self.flush(&mut carrier, true).await;
        carrier.close(protocol_error).await;
        if let Some(conn) = self.conn.take() {
            self.shared.store.lock().unregister(conn);
        }
    }

    /// WebSocket: each message must be exactly the next unit (§4.3).
    fn message_fits(&self, len: usize) -> bool {
        match self.link.expected_len() {
            Some(n) => n == len,
            // In the fail delay everything is discarded anyway.
            None => true,
        }
    }

    /// Writes everything the link produced. Returns false when the carrier failed.
    async fn flush(&mut self, carrier: &mut Carrier, closing: bool) -> bool {
        let mut out = Vec::new();
        while let Some(t) = self.link.poll_transmit() {
            out.push(t);
        }
        let n_records = out.iter().filter(|t| t.len() == RECORD).count();
        let kinds = self.shadow.classify(n_records);
        self.shared.counters.add(Counter::CoverSent, kinds.cover);
        self.shared.counters.add(Counter::RealSent, kinds.real);
        self.shared
            .counters
            .add(Counter::GoodbyesSent, kinds.goodbye);
        for t in &out {
            match tokio::time::timeout(WRITE_STALL, carrier.send(t)).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
        if kinds.goodbye > 0 && !self.finished && !closing {
            // After a goodbye the sender half-closes and waits for the peer's EOF (§4).
            self.finished = true;
            carrier.finish().await;
        }
        true
    }

    /// Queues a reply produced outside this link's batch loop.
    fn queue(&mut self, reply: Reply) {
        if let Some(t) = reply.encode(&self.session_id) {
            let len = t.len();
            if self.link.send(t, Instant::now()).is_ok() && self.link.session_id().is_some() {
                self.shadow.push(len);
            }
        }
    }

    fn handle_events(&mut self) {
        while let Some(ev) = self.link.poll_event() {
            match ev {
                RelayEvent::Established {
                    session_id, role, ..
                } => self.established(session_id, role),
                RelayEvent::Transmissions(items) => {
                    self.shared.counters.add(Counter::RealReceived, 1);
                    self.rx_records_counted += 1;
                    for item in items {
                        self.transmission(&item);
                    }
                }
                RelayEvent::MalformedBatch => {
                    self.shared.counters.add(Counter::RealReceived, 1);
                    self.rx_records_counted += 1;
                    self.queue(Reply::err(b"", b"", ErrorType::Block));
                }
                RelayEvent::Closed(reason) => {
                    if matches!(reason, RelayCloseReason::Goodbye(_)) {
                        self.rx_records_counted += 1;
                    }
                    if matches!(
                        reason,
                        RelayCloseReason::BadPreamble
                            | RelayCloseReason::Rejected(_)
                            | RelayCloseReason::HandshakeTimeout
                    ) {
                        self.shared.counters.add(Counter::HandshakeFailures, 1);
                    }
                    tracing::debug!(peer = %self.peer, ?reason, "GRP link closed");
                }
                _ => {}
            }
        }
        // Records received and not yet attributed to a batch or goodbye were cover.
        let records = self.rx_bytes / RECORD as u64;
        if records > self.rx_records_counted {
            self.shared
                .counters
                .add(Counter::CoverReceived, records - self.rx_records_counted);
            self.rx_records_counted = records;
        }
    }

    fn established(&mut self, session_id: [u8; 32], role: Role) {
        let Some(auth) = self.link.auth_secret().cloned() else {
            return;
        };
        self.session_id = session_id;
        let relay_link = role == Role::Relay;
        self.shared.counters.established(relay_link, self.peer);
        tracing::debug!(peer = %self.peer, ?role, "GRP link established");
        if !relay_link {
            self.conn = Some(self.shared.store.lock().register(self.tx.clone()));
        }
        self.cmds = Some(LinkCommands::new(role, session_id, auth, self.conn));
    }

    fn transmission(&mut self, item: &[u8]) {
        let Some(cmds) = self.cmds.as_mut() else {
            return;
        };
        match cmds.handle(&self.shared, item, Instant::now()) {
            Action::Reply(r) => self.queue(r),
            Action::Prxy {
                corr_id,
                d_key,
                host,
                port,
            } => proxy::handle_prxy(
                &self.shared,
                &self.client_proxy,
                self.tx.clone(),
                corr_id,
                d_key,
                host,
                port,
            ),
            Action::PFwd {
                corr_id,
                h_pd,
                version,
                cmd_key,
                enc_t,
            } => proxy::handle_pfwd(
                &self.shared,
                &self.client_proxy,
                self.tx.clone(),
                proxy::Pfwd {
                    corr_id,
                    h_pd,
                    version,
                    cmd_key,
                    enc_t,
                },
            ),
        }
    }
}
