//! The client side of SMP proxying: PKEY parsing and validation, and PRES opening.
//!
//! The first byte picks the input: even → the parameters of a `PKEY` response, validated as a
//! relay identity (with the pinned hash taken from the input's own chain so the fuzzer can get
//! past the identity check); odd → the plaintext of a PRES, sealed here with the command
//! secret so it gets past authentication and reaches unpadding, batch, transmission and
//! response parsing (the raw input is also opened as is). Nothing may panic, and whatever
//! opens must be a response with an acceptable entity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_smp::cert::{KeyHash, key_hash};
use muxd_smp::command::Response;
use muxd_smp::connection::CorrId;
use muxd_smp::crypto::cb_encrypt_no_pad;
use muxd_smp::handshake::CLIENT_VERSIONS;
use muxd_smp::keys::DhSecret;
use muxd_smp::proxy::{PendingForward, ProxiedRelay};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut pkey = b"PKEY ".to_vec();
        pkey.extend_from_slice(rest);
        let version = 8 + u16::from(mode / 2 % 11);
        if let Ok(Response::PKey(k)) = Response::decode(version, &pkey) {
            let pinned = k
                .cert_chain
                .get(1)
                .map_or(KeyHash::from_bytes([0; 32]), |c| key_hash(c));
            let _ = ProxiedRelay::from_proxy_key(&k, &pinned, CLIENT_VERSIONS, 1_750_000_000);
        }
    } else {
        let corr = CorrId::from_bytes(std::array::from_fn(|i| i as u8));
        let secret = DhSecret::from_bytes([0x5a; 32]);
        let version = 8 + u16::from(mode / 2 % 11);
        let pending =
            PendingForward::from_parts(corr, secret.clone(), version, vec![7; 32], vec![1; 24]);
        let mut nonce = *corr.as_bytes();
        nonce.reverse();
        let sealed = cb_encrypt_no_pad(&secret, &nonce, rest);
        for input in [&sealed[..], rest] {
            if let Ok(r) = pending.open(input) {
                assert!(r.response.entity_ok(&r.entity_id));
            }
        }
    }
});
