//! GRP records after the handshake: arbitrary ciphertext at the client, and arbitrary (but
//! correctly encrypted) plaintext blocks, so the block, batch and transmission decoders behind
//! the AEAD are reached too.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use muxd_grp::block::{Block, split_batch};
use muxd_grp::connection::{Connection, ConnectionConfig};
use muxd_grp::handshake::{Initiator, InitiatorConfig, ResponderConfig, respond};
use muxd_grp::relay::{RelayLink, RelayLinkConfig};
use muxd_grp::{BLOCK, RECORD};
use muxd_smp::transmission::Transmission;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use zeroize::Zeroizing;

fuzz_target!(|data: &[u8]| {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let responder = ResponderConfig::new(Zeroizing::new([0x42; 32]));

    // 1. Arbitrary plaintext blocks, sealed by the relay and opened by the client.
    let (init, msg1) =
        Initiator::start(InitiatorConfig::client(responder.public_key()), &mut rng).unwrap();
    let (record2, mut relay) = respond(&responder, &msg1, &mut rng).unwrap();
    let mut client = init.finish(&record2).unwrap();
    for piece in data.chunks(BLOCK) {
        let mut block = piece.to_vec();
        block.resize(BLOCK, b'#');
        let record = relay.records.seal(&block).unwrap();
        let plain = client.records.open(&record).unwrap();
        assert_eq!(plain, block);
        if let Ok(Block::Batch(b)) = Block::decode(&plain) {
            for t in split_batch(b).unwrap_or_default() {
                let _ = Transmission::decode(18, &client.session_id, t);
            }
        }
    }

    // 2. The client state machine after a real handshake, fed arbitrary bytes as records.
    let t0 = Instant::now();
    let mut conn = Connection::new(ConnectionConfig::client(responder.public_key()), t0, &mut rng);
    let mut link = RelayLink::new(
        std::sync::Arc::new(responder),
        RelayLinkConfig::default(),
        t0,
        &mut rng,
    );
    conn.handle_carrier_up(t0);
    while let Some(b) = conn.poll_transmit() {
        link.handle_input(t0, &b);
    }
    while let Some(b) = link.poll_transmit() {
        conn.handle_input(t0, &b);
    }
    assert!(conn.is_established());
    conn.handle_input(t0 + Duration::from_millis(1), data);
    if data.len() >= RECORD {
        // A forged record can never authenticate: the session must be dead.
        assert!(conn.is_closed());
    }
    while conn.poll_event().is_some() {}
    let _ = conn.poll_timeout();
});
