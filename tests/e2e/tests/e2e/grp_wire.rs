//! What a GRP link looks like on the wire when the real daemon drives it (issue 7, grp.md §1
//! and §4.1): a 4-byte preamble, one 2500-byte handshake message each way, then only
//! 16400-byte records, and nothing an observer could read. Recording TCP proxies sit in front
//! of both relays; every connection through them is checked: the daemon's links to relay 1
//! (app A's queue) and to relay 2 (the proxy), and relay 2's relay link to relay 1, which
//! reaches relay 1 at the address in the queue URI, i.e. through the recorder as well.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use muxd_e2e::{Daemon, GrpRelay};

use crate::smp::{create_queue, muxctl_ok, muxctl_recv};

const PREAMBLE: [u8; 4] = [0x47, 0x52, 0x50, 0x01];
const HS_LEN: usize = 2500;
const RECORD: usize = 16_400;

/// The bytes of one proxied connection, per direction, in order.
#[derive(Debug, Default)]
struct Conn {
    to_relay: Vec<u8>,
    to_client: Vec<u8>,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` that keeps every byte it forwards.
struct Recorder {
    addr: String,
    conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>>,
}

impl Recorder {
    fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Conn>>>>> = Arc::default();
        let upstream = upstream.to_owned();
        let all = Arc::clone(&conns);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(relay) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let conn: Arc<Mutex<Conn>> = Arc::default();
                all.lock().unwrap().push(Arc::clone(&conn));
                let (c2, r2) = (client.try_clone().unwrap(), relay.try_clone().unwrap());
                let up = Arc::clone(&conn);
                std::thread::spawn(move || pump(client, relay, &up, true));
                std::thread::spawn(move || pump(r2, c2, &conn, false));
            }
        });
        Self { addr, conns }
    }

    /// Each connection's two byte streams, as recorded so far.
    fn streams(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                let c = c.lock().unwrap();
                (c.to_relay.clone(), c.to_client.clone())
            })
            .collect()
    }
}

/// Copies `from` → `to`, recording, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, conn: &Mutex<Conn>, to_relay: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut c = conn.lock().unwrap();
            let stream = if to_relay {
                &mut c.to_relay
            } else {
                &mut c.to_client
            };
            stream.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Checks one direction of a finished GRP/1-over-TCP connection and returns its record
/// count: the preamble (client side only), one handshake message, then whole records.
fn records(bytes: &[u8], from_client: bool, what: &str) -> usize {
    let rest = if from_client {
        assert_eq!(
            bytes.get(..4),
            Some(&PREAMBLE[..]),
            "{what}: no GRP/1 preamble"
        );
        &bytes[4..]
    } else {
        bytes
    };
    assert!(
        rest.len() >= HS_LEN,
        "{what}: {} bytes, shorter than a handshake message",
        bytes.len()
    );
    let after = rest.len() - HS_LEN;
    assert_eq!(
        after % RECORD,
        0,
        "{what}: {after} bytes after the handshake, not whole 16400-byte records"
    );
    after / RECORD
}

#[test]
fn daemon_links_carry_only_preambles_handshakes_and_fixed_records() {
    let mut proxy = GrpRelay::start(&[]);
    let mut dest = GrpRelay::start(&[proxy.key()]);
    let tcp_port = |url: &str| url.rsplit(':').next().unwrap().to_owned();
    let rec_dest = Recorder::start(&format!("127.0.0.1:{}", tcp_port(dest.url("grp"))));
    let rec_proxy = Recorder::start(&format!("127.0.0.1:{}", tcp_port(proxy.url("grp"))));
    let via = |relay: &GrpRelay, rec: &Recorder| format!("grp://{}@{}", relay.key(), rec.addr);
    let (dest_url, proxy_url) = (via(&dest, &rec_dest), via(&proxy, &rec_proxy));
    let mut daemon = Daemon::builder()
        .config(format!(
            "[grp]\nproxy = \"{proxy_url}\"\nrelays = [\"{dest_url}\"]\nmax_delay_ms = 20\n"
        ))
        .start();
    let socket = daemon.socket().to_owned();

    let q = create_queue(&socket, "app-a", &dest_url, false);
    // Short bodies, and one larger than a record's payload share would allow to pad freely.
    let mut bodies: Vec<String> = (0..5).map(|i| format!("wire-check-{i}")).collect();
    bodies.push(format!("wire-check-big-{}", "x".repeat(6000)));
    for body in &bodies {
        muxctl_ok(&socket, "app-b", &["send", "--wait", &q.uri, body]);
    }
    assert_eq!(muxctl_recv(&socket, "app-a", &q, bodies.len()), bodies);

    // A clean stop: goodbye records, then the daemon closes its links; the relays close the
    // relay link when they stop. Afterwards every stream is complete.
    daemon.stop();
    proxy.terminate();
    dest.terminate();
    std::thread::sleep(Duration::from_millis(300));

    let rcv_id = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(q.id.trim_end_matches('='))
        .unwrap();
    let dest_conns = rec_dest.streams();
    let proxy_conns = rec_proxy.streams();
    // Relay 1: the daemon's link for app A's queue and relay 2's relay link.
    assert!(
        dest_conns.len() >= 2,
        "{} connections to relay 1",
        dest_conns.len()
    );
    assert!(!proxy_conns.is_empty(), "no connection to relay 2");
    let mut total = (0, 0);
    for (i, (up, down)) in dest_conns.iter().chain(&proxy_conns).enumerate() {
        let what = format!("connection {i}");
        let (u, d) = (records(up, true, &what), records(down, false, &what));
        total = (total.0 + u, total.1 + d);
        // Nothing readable: no body, no queue id in the clear.
        for needle in [b"wire-check".as_slice(), &rcv_id] {
            for bytes in [up, down] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{what}: {needle:?} on the wire"
                );
            }
        }
    }
    // NEW, SUB, the proxied SKEY and SENDs, the ACKs and the goodbyes at least.
    assert!(
        total.0 >= bodies.len() * 2 && total.1 >= bodies.len() * 2,
        "records up {} down {}",
        total.0,
        total.1
    );
}
