//! Arbitrary bytes as a received block: un-padding, batch framing, and everything inside.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_smp::block::{BLOCK_SIZE, decode_batch, unpad_block};
use muxd_smp::command::Response;
use muxd_smp::transmission::Transmission;

fuzz_target!(|data: &[u8]| {
    // Both as a whole block (padded to size so the length check passes) and as raw content.
    let mut block = data.to_vec();
    block.resize(BLOCK_SIZE, b'#');
    for content in [unpad_block(&block).ok(), Some(data)].into_iter().flatten() {
        if let Ok(items) = decode_batch(content) {
            for t in items {
                for v in [6u16, 7, 16, 18] {
                    if let Ok(t) = Transmission::decode(v, &[0u8; 32], t) {
                        let _ = Response::decode(v, t.command);
                    }
                }
            }
        }
    }
});
