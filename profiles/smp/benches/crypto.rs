//! Crypto hot paths of the SMP client: MSG body decryption, the per-queue e2e envelope, plain
//! crypto_box of 16 KiB (compare with `pynacl_box.py`, libsodium) and transport blocks.
//!
//! Run: `cargo bench -p muxd-smp --bench crypto`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use muxd_smp::crypto::{self, BlockCipher};
use muxd_smp::e2e::{self, ClientMessage, ClientMsgEnvelope, PrivHeader, RcvMsgBody};
use muxd_smp::keys::{DhSecret, X25519SecretKey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

/// Same size as the PyNaCl comparison script.
const BOX_LEN: usize = 16 * 1024;

fn msg_body(c: &mut Criterion) {
    let rcv = X25519SecretKey::from_bytes([0x60; 32]);
    let srv = X25519SecretKey::from_bytes([0x80; 32]);
    let secret = rcv.diffie_hellman(&srv.public_key());
    let msg_id = [0x10; 24];
    let body = RcvMsgBody::Message {
        ts: 1_700_000_000,
        notification: false,
        body: vec![0xab; e2e::E2E_MESSAGE_LEN],
    };
    let enc = e2e::encrypt_msg_body(&secret, &msg_id, &body).expect("fits");
    let mut g = c.benchmark_group("msg_body");
    g.throughput(Throughput::Bytes(enc.len() as u64));
    g.bench_function("decrypt_16122", |b| {
        b.iter(|| e2e::decrypt_msg_body(&secret, black_box(&msg_id), black_box(&enc)))
    });
    g.finish();
}

fn e2e_envelope(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let secret = DhSecret::from_bytes([0x21; 32]);
    let msg = ClientMessage {
        header: PrivHeader::Empty,
        body: vec![0xcd; e2e::E2E_MESSAGE_PAD - 3],
    };
    let wire = ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, &msg)
        .and_then(|e| e.encode())
        .expect("fits");
    let mut g = c.benchmark_group("e2e_envelope");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("seal_16043", |b| {
        b.iter(|| {
            ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, black_box(&msg))
                .and_then(|e| e.encode())
        })
    });
    g.bench_function("open_16043", |b| {
        b.iter(|| ClientMsgEnvelope::decode(black_box(&wire)).and_then(|e| e.open(&secret)))
    });
    g.finish();
}

fn crypto_box(c: &mut Criterion) {
    // Precomputed shared key on both sides, like PyNaCl's `Box` (crypto_box_afternm).
    let a = X25519SecretKey::from_bytes([1; 32]);
    let b_key = X25519SecretKey::from_bytes([2; 32]);
    let secret = a.diffie_hellman(&b_key.public_key());
    let nonce = [7u8; 24];
    let msg = vec![0x5a; BOX_LEN];
    let sealed = crypto::cb_encrypt_no_pad(&secret, &nonce, &msg);
    let mut g = c.benchmark_group("crypto_box");
    g.throughput(Throughput::Bytes(BOX_LEN as u64));
    g.bench_function("seal_16384", |b| {
        b.iter(|| crypto::cb_encrypt_no_pad(&secret, black_box(&nonce), black_box(&msg)))
    });
    g.bench_function("open_16384", |b| {
        b.iter(|| crypto::cb_decrypt_no_pad(&secret, black_box(&nonce), black_box(&sealed)))
    });
    g.finish();
}

fn transport_block(c: &mut Criterion) {
    let dh = DhSecret::from_bytes([3; 32]);
    let content = vec![0x01; 16000];
    let mut client = BlockCipher::client(b"session", &dh);
    let mut server = BlockCipher::server(b"session", &dh);
    let mut g = c.benchmark_group("transport_block");
    g.throughput(Throughput::Bytes(16384));
    // Encrypt and decrypt together: the chains must stay in step.
    g.bench_function("encrypt_decrypt_16384", |b| {
        b.iter(|| {
            client
                .encrypt_block(black_box(&content))
                .and_then(|blk| server.decrypt_block(&blk))
        })
    });
    g.finish();
}

criterion_group!(benches, msg_body, e2e_envelope, crypto_box, transport_block);
criterion_main!(benches);
