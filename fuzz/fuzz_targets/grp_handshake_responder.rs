//! Arbitrary bytes from an unauthenticated GRP peer, as the relay's responder sees them.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use muxd_grp::handshake::{P1_LEN, Payload1, ResponderConfig, respond};
use muxd_grp::kem::CheckedEncapsulationKey;
use muxd_grp::relay::{RelayEvent, RelayLink, RelayLinkConfig};
use muxd_grp::{FAIL_DELAY, HS_LEN};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use zeroize::Zeroizing;

fn responder() -> Arc<ResponderConfig> {
    static CFG: OnceLock<Arc<ResponderConfig>> = OnceLock::new();
    CFG.get_or_init(|| Arc::new(ResponderConfig::new(Zeroizing::new([0x42; 32]))))
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut rng = ChaCha20Rng::seed_from_u64(1);

    // Payload 1 parsing and the FIPS 203 key checks, reachable only after decryption.
    let mut p1 = data.to_vec();
    p1.resize(P1_LEN, 0);
    if let Ok(p) = Payload1::decode(&p1) {
        assert_eq!(p.encode()[..1193], p1[..1193]);
        let _ = CheckedEncapsulationKey::new(p.ek.as_slice());
    }
    let _ = CheckedEncapsulationKey::new(data);

    // The handshake function itself: forged input never yields a session.
    let mut msg1 = data.to_vec();
    msg1.resize(HS_LEN, 0);
    assert!(respond(&responder(), &msg1, &mut rng).is_err());

    // The state machine fed in chunks (first byte picks the chunk size, second the carrier):
    // it must send nothing, and close by the handshake deadline or FAIL_DELAY.
    let (Some(&chunk), Some(&carrier)) = (data.first(), data.get(1)) else {
        return;
    };
    let cfg = RelayLinkConfig {
        preamble: carrier & 1 == 0,
        ..RelayLinkConfig::default()
    };
    let t0 = Instant::now();
    let mut link = RelayLink::new(responder(), cfg, t0, &mut rng);
    let mut now = t0;
    for part in data[2..].chunks(usize::from(chunk).max(1) * 64) {
        now += Duration::from_millis(10);
        link.handle_input(now, part);
        assert!(link.poll_transmit().is_none(), "nothing is sent before a valid message 1");
    }
    let input_end = now;
    while let Some(t) = link.poll_timeout() {
        now = t;
        link.handle_timeout(now);
        assert!(link.poll_transmit().is_none());
    }
    assert!(link.is_closed());
    assert!(now <= (t0 + muxd_grp::HS_TIMEOUT).max(input_end + FAIL_DELAY));
    let closed = std::iter::from_fn(|| link.poll_event())
        .filter(|e| matches!(e, RelayEvent::Closed(_)))
        .count();
    assert_eq!(closed, 1);
});
