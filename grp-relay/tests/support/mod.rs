//! Test support: a tokio driver for the `muxd-grp` client [`Connection`] over real carriers,
//! helpers to build and authorize commands, and a recording TCP proxy.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::print_stderr)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grp_relay::carrier::Carrier;
use grp_relay::carrier::quic::QuicCarrier;
use grp_relay::carrier::tcp::TcpCarrier;
use grp_relay::carrier::ws::WsCarrier;
use grp_relay::config::{Config, StaticKey};
use grp_relay::{Relay, RelayHandle};
use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::cover::CoverConfig;
use muxd_grp::handshake::InitiatorConfig;
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::keys::X25519PublicKey;
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_core::{OsRng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

pub const V: u16 = 18;

/// Fast scheduling for tests: data goes out 20 ms after it is queued.
pub const FAST: CoverConfig = CoverConfig {
    max_delay: Duration::from_millis(20),
    credit_max: 8,
};

pub fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    OsRng.fill_bytes(&mut k);
    k
}

pub fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    *muxd_smp::keys::X25519SecretKey::from_bytes(*secret)
        .public_key()
        .as_bytes()
}

/// A loopback config on ephemeral ports with fast scheduling.
pub fn test_config(secret: [u8; 32]) -> Config {
    let mut c = Config::default();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    c.listen.tcp = Some(any);
    c.listen.quic = Some(any);
    c.listen.ws = Some(any);
    c.listen.wss = Some(any);
    c.static_key = Some(StaticKey(Zeroizing::new(secret)));
    c.cover.max_delay_ms = Some(20);
    c.cover.relay_link_max_delay_ms = Some(20);
    c
}

pub async fn start(config: Config) -> RelayHandle {
    Relay::start(config).await.expect("relay starts")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Quic,
    Ws,
    Wss,
}

pub async fn open_carrier(relay: &RelayHandle, via: Via) -> (Carrier, SocketAddr) {
    let a = relay.addresses();
    match via {
        Via::Tcp => {
            let s = TcpStream::connect(a.tcp).await.unwrap();
            let local = s.local_addr().unwrap();
            (Carrier::Tcp(TcpCarrier::new(s)), local)
        }
        Via::Quic => {
            let ep =
                muxd_transport::grp::quic_client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .unwrap();
            let local = ep.local_addr().unwrap();
            let c = QuicCarrier::connect(&ep, a.quic.unwrap()).await.unwrap();
            // Keep the endpoint alive as long as the process: tests are short.
            std::mem::forget(ep);
            (Carrier::Quic(c), local)
        }
        Via::Ws => {
            let c = WsCarrier::connect(a.ws.unwrap(), "/grp").await.unwrap();
            (
                Carrier::Ws(Box::new(c)),
                SocketAddr::from(([0, 0, 0, 0], 0)),
            )
        }
        Via::Wss => {
            let c = WsCarrier::connect_tls(a.wss.unwrap(), "localhost", "/grp")
                .await
                .unwrap();
            (
                Carrier::Ws(Box::new(c)),
                SocketAddr::from(([0, 0, 0, 0], 0)),
            )
        }
    }
}

enum Input {
    Send(Vec<u8>),
    Close,
}

/// One client link, driven by its own task.
pub struct Client {
    pub session_id: [u8; 32],
    pub auth_key: X25519PublicKey,
    pub cover_rate: u16,
    pub local: SocketAddr,
    input: mpsc::UnboundedSender<Input>,
    events: mpsc::UnboundedReceiver<Event>,
    backlog: VecDeque<Vec<u8>>,
    pub closed: Option<CloseReason>,
    pub records: Arc<Mutex<(u64, u64)>>,
}

impl Client {
    pub async fn connect(relay: &RelayHandle, via: Via) -> Self {
        let (carrier, local) = open_carrier(relay, via).await;
        let mut cfg = ConnectionConfig::client(relay.public_key());
        cfg.preamble = !matches!(via, Via::Ws | Via::Wss);
        cfg.cover = Some(FAST);
        Self::over(carrier, local, cfg).await.expect("handshake")
    }

    /// Drives `cfg` over `carrier`; returns the close reason if the handshake fails.
    pub async fn over(
        carrier: Carrier,
        local: SocketAddr,
        cfg: ConnectionConfig,
    ) -> Result<Self, CloseReason> {
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let records = Arc::new(Mutex::new((0, 0)));
        tokio::spawn(drive(carrier, cfg, in_rx, ev_tx, records.clone()));
        loop {
            match tokio::time::timeout(Duration::from_secs(35), ev_rx.recv()).await {
                Ok(Some(Event::Connected {
                    session_id,
                    auth_key,
                    cover_rate,
                    ..
                })) => {
                    return Ok(Self {
                        session_id,
                        auth_key: X25519PublicKey::from_bytes(auth_key),
                        cover_rate,
                        local,
                        input: in_tx,
                        events: ev_rx,
                        backlog: VecDeque::new(),
                        closed: None,
                        records,
                    });
                }
                Ok(Some(Event::Closed(r))) => return Err(r),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Err(CloseReason::Local),
            }
        }
    }

    /// Sends `command` on `entity`, authorized with `key` when given; returns the corrId.
    pub fn send(&self, entity: &[u8], command: &[u8], key: Option<&QueueAuthKey>) -> [u8; 24] {
        let mut corr = [0u8; 24];
        OsRng.fill_bytes(&mut corr);
        self.send_with(corr, entity, command, key);
        corr
    }

    pub fn send_with(
        &self,
        corr: [u8; 24],
        entity: &[u8],
        command: &[u8],
        key: Option<&QueueAuthKey>,
    ) {
        let t = transmission(&self.session_id, &self.auth_key, corr, entity, command, key);
        self.input.send(Input::Send(t)).unwrap();
    }

    /// The next transmission from the relay.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        if let Some(t) = self.backlog.pop_front() {
            return Some(t);
        }
        self.next_raw(Duration::from_secs(10)).await
    }

    async fn next_raw(&mut self, wait: Duration) -> Option<Vec<u8>> {
        loop {
            match tokio::time::timeout(wait, self.events.recv()).await {
                Ok(Some(Event::Transmission(t))) => return Some(t),
                Ok(Some(Event::Closed(r))) => {
                    self.closed = Some(r);
                    return None;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Sends and waits for the answer with the same corrId: `(entity, command)`.
    pub async fn call(
        &mut self,
        entity: &[u8],
        command: &[u8],
        key: Option<&QueueAuthKey>,
    ) -> (Vec<u8>, Vec<u8>) {
        let corr = self.send(entity, command, key);
        self.wait_for(&corr).await
    }

    pub async fn wait_for(&mut self, corr: &[u8]) -> (Vec<u8>, Vec<u8>) {
        if let Some(i) = self.backlog.iter().position(|t| decode(t).0 == corr) {
            let t = self.backlog.remove(i).unwrap();
            let (_, e, c) = decode(&t);
            return (e, c);
        }
        loop {
            let t = self
                .next_raw(Duration::from_secs(40))
                .await
                .expect("answer before close");
            let (c, e, cmd) = decode(&t);
            if c == corr {
                return (e, cmd);
            }
            self.backlog.push_back(t);
        }
    }

    /// Waits for the link to end and returns why.
    pub async fn wait_closed(&mut self, wait: Duration) -> Option<CloseReason> {
        let until = tokio::time::Instant::now() + wait;
        while self.closed.is_none() {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(Event::Closed(r))) => self.closed = Some(r),
                Ok(Some(Event::Transmission(t))) => self.backlog.push_back(t),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.closed.clone()
    }

    pub fn close(&self) {
        let _ = self.input.send(Input::Close);
    }
}

/// `(corrId, entityId, command)` of a relay transmission.
pub fn decode(t: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let d = Transmission::decode(V, &[], t).expect("transmission decodes");
    (d.corr_id.to_vec(), d.entity_id.to_vec(), d.command.to_vec())
}

/// An encoded transmission, authorized with `key` against `session_id` (and `server_key`
/// for X25519 authenticators).
pub fn transmission(
    session_id: &[u8],
    server_key: &X25519PublicKey,
    corr: [u8; 24],
    entity: &[u8],
    command: &[u8],
    key: Option<&QueueAuthKey>,
) -> Vec<u8> {
    let a = Authorized::new(session_id, &corr, entity, command).unwrap();
    let auth = match key {
        Some(k) => k.authorize(a.as_bytes(), &corr, Some(server_key)).unwrap(),
        None => Vec::new(),
    };
    let mut t = Vec::new();
    encode_transmission(V, &auth, &a, &mut t).unwrap();
    t
}

async fn drive(
    mut carrier: Carrier,
    cfg: ConnectionConfig,
    mut input: mpsc::UnboundedReceiver<Input>,
    events: mpsc::UnboundedSender<Event>,
    records: Arc<Mutex<(u64, u64)>>,
) {
    let mut conn = Connection::new(cfg, Instant::now(), &mut OsRng);
    conn.handle_carrier_up(Instant::now());
    loop {
        while let Some(t) = conn.poll_transmit() {
            if carrier.send(&t).await.is_err() {
                conn.handle_eof(Instant::now());
            }
        }
        if let Some(c) = conn.record_counts() {
            *records.lock().unwrap() = c;
        }
        while let Some(ev) = conn.poll_event() {
            let _ = events.send(ev);
        }
        if conn.is_closed() {
            break;
        }
        let wake = conn.poll_timeout();
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(tokio::time::Instant::from_std(w)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = carrier.recv() => match r {
                Ok(Some(d)) => conn.handle_input(Instant::now(), &d),
                _ => conn.handle_eof(Instant::now()),
            },
            i = input.recv() => match i {
                Some(Input::Send(t)) => { let _ = conn.send(t, Instant::now()); }
                Some(Input::Close) | None => conn.close(Instant::now()),
            },
            () = sleep => conn.handle_timeout(Instant::now()),
        }
    }
    carrier.close(false).await;
}

/// A relay link initiator with an arbitrary static key (to test the allow-list).
pub fn relay_link_config(relay: &RelayHandle, own_secret: [u8; 32]) -> ConnectionConfig {
    ConnectionConfig {
        handshake: InitiatorConfig::relay_link(relay.public_key(), Zeroizing::new(own_secret)),
        preamble: true,
        cover: Some(FAST),
        record_limit: None,
    }
}

/// What a recording proxy saw, per direction.
#[derive(Debug, Default)]
pub struct Recording {
    pub to_relay: Vec<u8>,
    pub to_client: Vec<u8>,
    /// Write sizes as read from each side (chunk boundaries as the proxy saw them).
    pub to_relay_chunks: Vec<usize>,
    pub to_client_chunks: Vec<usize>,
}

/// A TCP proxy on 127.0.0.1 that forwards to `target` and records both directions.
pub async fn recording_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Recording>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let rec = Arc::new(Mutex::new(Recording::default()));
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let relay = TcpStream::connect(target).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut rr, mut rw) = relay.into_split();
            let r1 = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = cr.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        let _ = rw.shutdown().await;
                        break;
                    }
                    {
                        let mut g = r1.lock().unwrap();
                        g.to_relay.extend_from_slice(&buf[..n]);
                        g.to_relay_chunks.push(n);
                    }
                    if rw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let r2 = r.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = rr.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        let _ = cw.shutdown().await;
                        break;
                    }
                    {
                        let mut g = r2.lock().unwrap();
                        g.to_client.extend_from_slice(&buf[..n]);
                        g.to_client_chunks.push(n);
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rec)
}
