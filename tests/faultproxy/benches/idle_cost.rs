//! Idle cost of keeping one SMP server connection alive, in bytes per hour.
//!
//! Run with `cargo bench -p muxd-faultproxy --bench idle_cost`.
//!
//! MEASURED: the TCP payload (TLS records) of one real SMP PING/PONG exchange between the
//! `muxd_smp` client state machine (over `muxd_transport` TLS) and the in-process dev relay,
//! counted by the fault proxy's byte counters; likewise the bytes of one connection setup
//! (TLS handshake + SMP handshake).
//!
//! DERIVED: everything below TCP (segment headers, ACKs, keep-alive probes) and the
//! schedules. Loopback has a 64 KiB MTU and segmentation offload, so segment counts there say
//! nothing about a real path; they are computed for a 1500-byte MTU instead.

#![allow(clippy::print_stdout, clippy::unwrap_used)] // a bench binary prints its table

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use muxd_faultproxy::{FaultProxy, ProxyCounters, ProxyHandle};
use muxd_smp::cert::CertPublicKey;
use muxd_smp::command::{Command, Response};
use muxd_smp::connection::{Connection, ConnectionConfig, Event, ServerIdentity};
use muxd_transport::tokio_rustls::client::TlsStream;
use muxd_transport::{Alpn, BlockStream, ConnectOptions, connect_tls};
use rand_core::OsRng;
use smp_devrelay::{Relay, RelayConfig, RelayHandle};
use tokio::net::TcpStream;

/// Bytes on the wire per segment besides payload: Ethernet 14 + IPv4 20 + TCP 20 + the
/// timestamp option 12 (Linux default). A bare ACK or a keep-alive probe is exactly this.
const SEGMENT_OVERHEAD: u64 = 66;
/// TCP payload per segment with a 1500-byte MTU and timestamps: 1500 - 20 - 20 - 12.
const MSS: u64 = 1448;
/// PING/PONG exchanges measured.
const ROUNDS: usize = 20;

type Blocks = BlockStream<TlsStream<TcpStream>>;

struct Client {
    conn: Connection,
    io: Blocks,
}

impl Client {
    async fn connect(addr: SocketAddr, relay: &RelayHandle) -> Self {
        // Keep-alive off: the bench accounts for probes itself, and they carry no payload.
        let mut opts = ConnectOptions::with_alpn(Alpn::Smp);
        opts.keepalive = None;
        let tls = connect_tls(addr, &relay.key_hash(), &opts).await.unwrap();
        let leaf = CertPublicKey::from_certificate(tls.peer_certificates()[0]).unwrap();
        let identity = ServerIdentity {
            key_hash: relay.key_hash(),
            tls_leaf_key: leaf,
            tls_session_id: None,
        };
        let conn = Connection::new(
            Instant::now(),
            ConnectionConfig::default(),
            identity,
            &mut OsRng,
        );
        let mut c = Self {
            conn,
            io: tls.into_blocks(),
        };
        loop {
            let events = c.read_one().await;
            if events.iter().any(|e| matches!(e, Event::Connected { .. })) {
                c.flush().await;
                return c;
            }
            assert!(!c.conn.is_closed(), "handshake failed: {events:?}");
        }
    }

    async fn flush(&mut self) {
        let mut buf = Vec::new();
        while self.conn.poll_transmit(Instant::now(), &mut buf).is_some() {
            self.io.write_block(&buf).await.unwrap();
            buf.clear();
        }
    }

    async fn read_one(&mut self) -> Vec<Event> {
        let block = tokio::time::timeout(Duration::from_secs(10), self.io.read_block())
            .await
            .unwrap()
            .unwrap();
        self.conn.handle_input(Instant::now(), &block[..]);
        self.flush().await;
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    async fn ping(&mut self) -> Duration {
        let t = Instant::now();
        let corr = self
            .conn
            .send_command(Instant::now(), &mut OsRng, b"", &Command::Ping, None)
            .unwrap();
        self.flush().await;
        loop {
            for e in self.read_one().await {
                if let Event::Response {
                    corr_id, result, ..
                } = e
                    && corr_id == corr
                {
                    assert!(matches!(result, Ok(Response::Pong)), "{result:?}");
                    return t.elapsed();
                }
            }
        }
    }
}

/// Counters once they stop changing (the proxy counts a chunk when it has written it).
async fn settled(h: &ProxyHandle) -> ProxyCounters {
    let mut last = h.counters();
    loop {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let now = h.counters();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Wire bytes for `payload` bytes of TCP payload sent one way: data segments plus one
/// delayed ACK per two segments coming back.
fn wire(payload: u64) -> u64 {
    if payload == 0 {
        return 0;
    }
    let segments = payload.div_ceil(MSS);
    payload + segments * SEGMENT_OVERHEAD + segments.div_ceil(2) * SEGMENT_OVERHEAD
}

/// Keep-alive probes in one silent gap of `gap` seconds: a probe after `idle` s of silence,
/// then every `idle` s again, because each answered probe counts as received traffic.
fn probes_per_gap(gap: u64, idle: u64) -> u64 {
    // A probe due exactly when the PING goes out is not sent.
    (gap - 1) / idle
}

struct Row {
    name: String,
    pings_per_hour: u64,
    probes_per_hour: u64,
    ping_wire: u64,
}

impl Row {
    fn bytes_per_hour(&self) -> u64 {
        self.pings_per_hour * self.ping_wire + self.probes_per_hour * 2 * SEGMENT_OVERHEAD
    }
}

#[tokio::main]
async fn main() {
    let relay = Relay::start(RelayConfig::default()).await.unwrap();
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), relay.local_addr())
        .await
        .unwrap();
    let h = proxy.handle();

    let mut client = Client::connect(proxy.local_addr(), &relay).await;
    let setup = settled(&h).await;

    let mut ups = Vec::new();
    let mut downs = Vec::new();
    let mut rtts = Vec::new();
    for _ in 0..ROUNDS {
        let before = settled(&h).await;
        rtts.push(client.ping().await);
        let after = settled(&h).await;
        ups.push(after.bytes_up - before.bytes_up);
        downs.push(after.bytes_down - before.bytes_down);
    }
    ups.sort_unstable();
    downs.sort_unstable();
    rtts.sort_unstable();
    let (up, down) = (ups[ROUNDS / 2], downs[ROUNDS / 2]);
    let ping_wire = wire(up) + wire(down);

    println!(
        "## Measured (TCP payload through the fault proxy, TLS 1.3 + SMP v{:?})",
        client.conn.version()
    );
    println!();
    println!("| what | client→server | server→client |");
    println!("|---|---:|---:|");
    println!(
        "| connection setup (TLS + SMP handshake) | {} B | {} B |",
        setup.bytes_up, setup.bytes_down
    );
    println!(
        "| one PING/PONG, median of {ROUNDS} (min..max) | {up} B ({}..{}) | {down} B ({}..{}) |",
        ups[0],
        ups[ROUNDS - 1],
        downs[0],
        downs[ROUNDS - 1]
    );
    println!();
    println!(
        "PING/PONG loopback RTT median {:?}. Block 16384 B; TLS overhead per block measured: {} B up, {} B down.",
        rtts[ROUNDS / 2],
        up.saturating_sub(16384),
        down.saturating_sub(16384)
    );
    println!();
    println!(
        "## Derived: bytes per hour per idle server (1500 MTU: {MSS} B MSS, {SEGMENT_OVERHEAD} B per segment, delayed ACKs)"
    );
    println!();
    println!(
        "One PING/PONG on the wire: {ping_wire} B. One keep-alive probe + ACK: {} B.",
        2 * SEGMENT_OVERHEAD
    );
    println!();

    let rows = [
        Row {
            name:
                "(a) muxd: TCP keep-alive idle 15 s (5 s × 3 only on loss) + PING after 600 s idle"
                    .into(),
            pings_per_hour: 3600 / 600,
            probes_per_hour: 3600 / 600 * probes_per_gap(600, 15),
            ping_wire,
        },
        Row {
            name: "(a') same, keep-alive idle 30 s (muxd_transport default today)".into(),
            pings_per_hour: 3600 / 600,
            probes_per_hour: 3600 / 600 * probes_per_gap(600, 30),
            ping_wire,
        },
        Row {
            name: "(a'') PING every 600 s only, no TCP keep-alive".into(),
            pings_per_hour: 3600 / 600,
            probes_per_hour: 0,
            ping_wire,
        },
        Row {
            name: "(b) naive PING/PONG every 30 s, no TCP keep-alive".into(),
            pings_per_hour: 3600 / 30,
            probes_per_hour: 0,
            ping_wire,
        },
    ];
    println!("| schedule | PINGs/h | probes/h | bytes/h | KiB/day | vs (a) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let base = rows[0].bytes_per_hour() as f64;
    for r in &rows {
        let b = r.bytes_per_hour();
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2}× |",
            r.name,
            r.pings_per_hour,
            r.probes_per_hour,
            b,
            b as f64 * 24.0 / 1024.0,
            b as f64 / base
        );
    }
    println!();
    println!(
        "Probe accounting: Linux sends the first probe after `idle` s without received data and, \
         while probes are answered, the next one `idle` s after the answer; the 5 s interval and \
         3 retries only apply to unanswered probes (a dead path), so they add nothing while idle."
    );

    drop(client);
    proxy.shutdown().await;
    relay.shutdown().await;
}
