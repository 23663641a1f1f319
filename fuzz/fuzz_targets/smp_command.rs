//! Arbitrary bytes as a command and as a response at every version; whatever decodes must
//! re-encode and decode to the same value at that version.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_smp::command::{Command, Response};

fuzz_target!(|data: &[u8]| {
    let Some((&v, rest)) = data.split_first() else {
        return;
    };
    let version = 6 + u16::from(v % 13);
    if let Ok(c) = Command::decode(version, rest) {
        let mut out = Vec::new();
        if c.encode(version, &mut out).is_ok() {
            assert_eq!(Command::decode(version, &out).ok(), Some(c));
        }
    }
    if let Ok(r) = Response::decode(version, rest) {
        let mut out = Vec::new();
        if r.encode(version, &mut out).is_ok() {
            // Server down-grades (SOK→OK, DELD→END, BLOCKED→AUTH) change the value by design.
            let _ = Response::decode(version, &out);
        }
    }
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = s.parse::<muxd_smp::address::QueueUri>();
        let _ = s.parse::<muxd_smp::address::ConnectionLink>();
    }
});
