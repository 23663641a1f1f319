//! Arbitrary bytes as one transmission at every version gate; decoded ones must re-derive
//! their authorized bytes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_smp::transmission::Transmission;

fuzz_target!(|data: &[u8]| {
    let Some((&v, rest)) = data.split_first() else {
        return;
    };
    let version = 6 + u16::from(v % 13);
    if let Ok(t) = Transmission::decode(version, &[7u8; 32], rest) {
        let _ = t.authorized(&[7u8; 32]);
    }
});
