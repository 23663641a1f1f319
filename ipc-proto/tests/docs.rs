//! Keeps the byte-level examples in `docs/ipc.md` true: every ```hexdump block must decode to
//! one message that re-encodes to exactly the same bytes.

#![allow(clippy::unwrap_used)] // a malformed doc should fail the test loudly

use muxd_ipc_proto::*;

/// Parses `hexdump -C` style lines: offset, up to 16 hex bytes, then `|ascii|`.
fn parse_hexdump(block: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in block.lines() {
        let hex = line.split('|').next().unwrap();
        let mut words = hex.split_whitespace();
        words.next(); // offset
        bytes.extend(words.map(|w| u8::from_str_radix(w, 16).unwrap()));
    }
    bytes
}

fn doc_blocks() -> Vec<Vec<u8>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ipc.md"))
        .expect("docs/ipc.md exists");
    doc.split("```hexdump\n")
        .skip(1)
        .map(|rest| parse_hexdump(rest.split("```").next().unwrap()))
        .collect()
}

#[test]
fn hexdumps_in_docs_are_real_frames() {
    let blocks = doc_blocks();
    assert_eq!(
        blocks.len(),
        6,
        "docs/ipc.md should hold six hexdump examples"
    );
    let mut kinds = Vec::new();
    for bytes in blocks {
        // Client and server hellos share `"type":"hello"`; try both directions.
        let mut out = Vec::new();
        if let Ok(Some((m, used))) = decode_frame::<ClientMessage>(&bytes) {
            assert_eq!(used, bytes.len());
            encode_frame(&m, &mut out).unwrap();
            kinds.push(format!("client {m:?}"));
        } else {
            let (m, used) = decode_frame::<ServerMessage>(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            encode_frame(&m, &mut out).unwrap();
            kinds.push(format!("server {m:?}"));
        }
        assert_eq!(out, bytes, "re-encoding must give the documented bytes");
    }
    assert!(kinds[0].starts_with("client Hello"), "{kinds:?}");
    assert!(kinds[1].starts_with("server Hello"), "{kinds:?}");
    assert!(kinds[2].starts_with("client Request"), "{kinds:?}");
    assert!(kinds[3].starts_with("server Response"), "{kinds:?}");
    assert!(kinds[4].starts_with("server Response"), "{kinds:?}");
    assert!(kinds[4].contains("state: \"queued\""), "{kinds:?}");
    assert!(kinds[5].starts_with("server Event(Message"), "{kinds:?}");
}
