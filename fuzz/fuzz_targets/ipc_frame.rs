//! Arbitrary bytes into the IPC frame decoder, as a stream cut into chunks of a size the input
//! chooses, in both directions. It must never panic, must not depend on how the stream is cut,
//! and every message it yields must survive encode → decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muxd_ipc_proto::{ClientMessage, FrameDecoder, ServerMessage, decode_frame, encode_frame};

// A macro rather than generic functions: the serde trait bounds would need a direct serde
// dependency in this crate just to be named.
macro_rules! drain {
    ($t:ty, $stream:expr, $chunk:expr) => {{
        // Decodes the stream fed `chunk` bytes at a time; returns the messages and whether it
        // ended in an error (decoding stops at the first one, as a connection would).
        let mut dec = FrameDecoder::new();
        let mut out: Vec<$t> = Vec::new();
        let mut failed = false;
        'feed: for piece in $stream.chunks($chunk) {
            dec.extend(piece);
            loop {
                match dec.next::<$t>() {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break 'feed;
                    }
                }
            }
        }
        (out, failed)
    }};
}

macro_rules! check {
    ($t:ty, $stream:expr, $chunk:expr) => {{
        let stream: &[u8] = $stream;
        let (whole, whole_err) = drain!($t, stream, stream.len().max(1));
        let (cut, cut_err) = drain!($t, stream, $chunk);
        assert_eq!(whole, cut, "chunking changed the decoded messages");
        assert_eq!(
            whole_err, cut_err,
            "chunking changed whether decoding failed"
        );
        for m in whole {
            let mut buf = Vec::new();
            // Re-encoding drops unknown fields, whitespace and needless escapes, so it is never
            // longer than the input frame; the size check is skipped rather than asserted
            // because only the decoder's promises are under test here.
            if encode_frame(&m, &mut buf).is_ok() {
                let (back, used) = decode_frame::<$t>(&buf)
                    .expect("a re-encoded message decodes")
                    .expect("a re-encoded frame is complete");
                assert_eq!(used, buf.len());
                assert_eq!(back, m);
            }
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 32) + 1;
    check!(ClientMessage, stream, chunk);
    check!(ServerMessage, stream, chunk);
});
