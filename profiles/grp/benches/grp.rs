//! GRP handshake cost next to a classical Noise IK handshake, and record throughput.

#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use muxd_grp::block::cover_block;
use muxd_grp::handshake::{Established, Initiator, InitiatorConfig, ResponderConfig, respond};
use muxd_grp::{BLOCK, RECORD};
use muxd_smp::keys::X25519SecretKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use zeroize::Zeroizing;

const RELAY_STATIC: [u8; 32] = [0x42; 32];

fn grp_handshake(rng: &mut ChaCha20Rng, responder: &ResponderConfig) -> (Established, Established) {
    let (init, msg1) =
        Initiator::start(InitiatorConfig::client(responder.public_key()), rng).unwrap();
    let (record2, relay) = respond(responder, &msg1, rng).unwrap();
    (init.finish(&record2).unwrap(), relay)
}

/// The same Noise handshake without the KEM: `Noise_IK_25519_ChaChaPoly_BLAKE2s`, same
/// payload sizes, snow's default resolver.
fn classical_ik(relay_public: &[u8; 32], relay_private: &[u8; 32], client_private: &[u8; 32]) {
    let params: snow::params::NoiseParams = "Noise_IK_25519_ChaChaPoly_BLAKE2s".parse().unwrap();
    let mut i = snow::Builder::new(params.clone())
        .local_private_key(client_private)
        .unwrap()
        .remote_public_key(relay_public)
        .unwrap()
        .prologue(b"GRP/1")
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = snow::Builder::new(params)
        .local_private_key(relay_private)
        .unwrap()
        .prologue(b"GRP/1")
        .unwrap()
        .build_responder()
        .unwrap();
    let mut m1 = [0u8; 2500];
    let mut m2 = [0u8; 1412];
    let mut buf = [0u8; 2500];
    let n = i.write_message(&[0u8; 2404], &mut m1).unwrap();
    r.read_message(&m1[..n], &mut buf).unwrap();
    let n = r.write_message(&[0u8; 1364], &mut m2).unwrap();
    i.read_message(&m2[..n], &mut buf).unwrap();
    let _ = (
        i.into_transport_mode().unwrap(),
        r.into_transport_mode().unwrap(),
    );
}

fn handshakes(c: &mut Criterion) {
    let responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    let relay_public = responder.public_key();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("handshake");
    g.bench_function("grp_ikpsk2_mlkem768 (client+relay)", |b| {
        b.iter(|| grp_handshake(&mut rng, &responder))
    });
    let client_private = [7u8; 32];
    g.bench_function("noise_ik_classical (client+relay)", |b| {
        b.iter(|| classical_ik(&relay_public, &RELAY_STATIC, &client_private))
    });
    g.finish();
    let _ = X25519SecretKey::from_bytes(client_private);
}

fn records(c: &mut Criterion) {
    let responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let (mut client, mut relay) = grp_handshake(&mut rng, &responder);
    let block = cover_block();
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    // Seal and open in lockstep so the counters stay aligned (and rekeys are included).
    g.bench_function("seal+open 16400", |b| {
        b.iter(|| {
            let r = client.records.seal(&block).unwrap();
            assert_eq!(r.len(), RECORD);
            relay.records.open(&r).unwrap()
        })
    });
    g.bench_function("seal 16400", |b| {
        b.iter(|| relay.records.seal(&block).unwrap())
    });
    g.finish();
}

/// A TCP pair on loopback: a reader thread takes `n` units of `unit` bytes per request
/// (opening each as a GRP record when `open` is given) and reports when done.
fn loopback_reader(
    unit: usize,
    mut open: Option<Established>,
) -> (
    std::net::TcpStream,
    std::sync::mpsc::Sender<u64>,
    std::sync::mpsc::Receiver<()>,
) {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let writer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    writer.set_nodelay(true).unwrap();
    let (mut reader, _) = listener.accept().unwrap();
    let (req_tx, req_rx) = std::sync::mpsc::channel::<u64>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; unit];
        while let Ok(n) = req_rx.recv() {
            for _ in 0..n {
                reader.read_exact(&mut buf).unwrap();
                if let Some(e) = open.as_mut() {
                    let block = e.records.open(&buf).unwrap();
                    assert_eq!(block.len(), BLOCK);
                }
            }
            done_tx.send(()).unwrap();
        }
    });
    (writer, req_tx, done_rx)
}

/// Raw TCP loopback next to GRP records over TCP loopback (seal, write, read, open), in the
/// same run: the same 16384-byte blocks end to end.
fn loopback(c: &mut Criterion) {
    use std::io::Write as _;
    let responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let (mut client, relay) = grp_handshake(&mut rng, &responder);
    let block = cover_block();
    let mut g = c.benchmark_group("loopback");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    let (mut raw, raw_req, raw_done) = loopback_reader(BLOCK, None);
    g.bench_function("raw tcp 16384-byte blocks", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            raw_req.send(iters).unwrap();
            for _ in 0..iters {
                raw.write_all(&block).unwrap();
            }
            raw_done.recv().unwrap();
            start.elapsed()
        })
    });
    let (mut tcp, grp_req, grp_done) = loopback_reader(RECORD, Some(relay));
    g.bench_function("grp records over tcp (seal+write+read+open)", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            grp_req.send(iters).unwrap();
            for _ in 0..iters {
                let r = client.records.seal(&block).unwrap();
                tcp.write_all(&r).unwrap();
            }
            grp_done.recv().unwrap();
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, handshakes, records, loopback);
criterion_main!(benches);
