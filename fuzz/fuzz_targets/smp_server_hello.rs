//! Arbitrary bytes into the ServerHello parser, both as a block content and as a padded block.
//! It must never panic; when it parses, re-encoding and parsing again must give the same value
//! (trailing bytes are ignored by design, so only that direction round-trips).
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_smp::handshake::ServerHello;

fuzz_target!(|data: &[u8]| {
    let _ = ServerHello::decode_block(data);
    if let Ok(hello) = ServerHello::decode(data) {
        let encoded = hello.encode().expect("a parsed ServerHello re-encodes");
        assert_eq!(ServerHello::decode(&encoded).ok(), Some(hello));
    }
});
