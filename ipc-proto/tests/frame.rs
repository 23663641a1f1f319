//! Frame encoding, decoding and rejection, through the public API only.

use muxd_ipc_proto::*;

fn hello() -> ClientMessage {
    ClientMessage::Hello(ClientHello {
        proto_version: PROTO_VERSION,
        app: "chat".into(),
    })
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn hello_frame_bytes_are_exact() {
    let mut out = Vec::new();
    encode_frame(&hello(), &mut out).unwrap();
    let body = br#"{"type":"hello","proto_version":1,"app":"chat"}"#;
    assert_eq!(&out[..4], &(body.len() as u32).to_be_bytes());
    assert_eq!(&out[4..], body);
}

#[test]
fn encode_appends_and_decode_reports_bytes_used() {
    let mut out = vec![0xaa];
    encode_frame(&hello(), &mut out).unwrap();
    let first_len = out.len() - 1;
    let req = ClientMessage::Request(Request {
        id: u64::MAX,
        op: Op::Watch {
            interval_ms: Some(250),
        },
    });
    encode_frame(&req, &mut out).unwrap();
    assert_eq!(out[0], 0xaa, "existing bytes are kept");
    let (m, used) = decode_frame::<ClientMessage>(&out[1..]).unwrap().unwrap();
    assert_eq!(m, hello());
    assert_eq!(used, first_len);
    let (m, used2) = decode_frame::<ClientMessage>(&out[1 + used..])
        .unwrap()
        .unwrap();
    assert_eq!(m, req);
    assert_eq!(1 + used + used2, out.len());
}

#[test]
fn truncated_frames_are_incomplete_not_errors() {
    let mut out = Vec::new();
    encode_frame(&hello(), &mut out).unwrap();
    for cut in 0..out.len() {
        assert!(
            decode_frame::<ClientMessage>(&out[..cut])
                .unwrap()
                .is_none(),
            "prefix of {cut} bytes must be incomplete"
        );
    }
    assert!(decode_frame::<ClientMessage>(&out).unwrap().is_some());
}

#[test]
fn oversize_header_is_rejected_from_the_header_alone() {
    // Only the 4 header bytes are present: the decoder must refuse without waiting for a body.
    let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    match decode_frame::<ClientMessage>(&header) {
        Err(DecodeError::TooLarge(n)) => assert_eq!(n, MAX_FRAME_LEN + 1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        decode_frame::<ServerMessage>(&u32::MAX.to_be_bytes()),
        Err(DecodeError::TooLarge(_))
    ));
    let mut dec = FrameDecoder::new();
    dec.extend(&header);
    assert!(matches!(
        dec.next::<ClientMessage>(),
        Err(DecodeError::TooLarge(_))
    ));
}

#[test]
fn max_len_header_is_waited_for() {
    // Exactly MAX_FRAME_LEN is allowed: with only the header it is incomplete.
    let header = (MAX_FRAME_LEN as u32).to_be_bytes();
    assert!(decode_frame::<ClientMessage>(&header).unwrap().is_none());
}

#[test]
fn encoding_an_oversize_message_fails_and_leaves_the_buffer() {
    let big = ClientMessage::Request(Request {
        id: 1,
        op: Op::Ping {
            data: "x".repeat(MAX_FRAME_LEN),
        },
    });
    let mut out = vec![1, 2, 3];
    assert!(matches!(
        encode_frame(&big, &mut out),
        Err(EncodeError::TooLarge(n)) if n > MAX_FRAME_LEN
    ));
    assert_eq!(out, [1, 2, 3]);
}

fn assert_malformed<T: serde::de::DeserializeOwned + std::fmt::Debug>(body: &[u8]) {
    match decode_frame::<T>(&frame_of(body)) {
        Err(DecodeError::Malformed(_)) => {}
        other => panic!(
            "expected Malformed for {:?}, got {other:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

#[test]
fn unknown_variants_are_malformed() {
    assert_malformed::<ClientMessage>(br#"{"type":"bogus"}"#);
    assert_malformed::<ClientMessage>(br#"{"type":"request","id":1,"op":"bogus"}"#);
    assert_malformed::<ClientMessage>(br#"{"id":1,"op":"status"}"#);
    assert_malformed::<ClientMessage>(br#"{"type":"request","op":"status"}"#);
    assert_malformed::<ServerMessage>(br#"{"type":"response","id":1,"reply":"bogus"}"#);
    assert_malformed::<ServerMessage>(br#"{"type":"event","event":"bogus"}"#);
    // A client message is not a server message.
    assert_malformed::<ServerMessage>(br#"{"type":"request","id":1,"op":"status"}"#);
}

#[test]
fn garbage_is_malformed() {
    assert_malformed::<ClientMessage>(b"");
    assert_malformed::<ClientMessage>(b"not json");
    assert_malformed::<ClientMessage>(b"{\"type\":\"hello\"");
    assert_malformed::<ClientMessage>(b"[1,2,3]");
    assert_malformed::<ClientMessage>(b"\xff\xfe\x00");
    assert_malformed::<ClientMessage>(br#"{"type":"hello","proto_version":-1,"app":"a"}"#);
    assert_malformed::<ClientMessage>(br#"{"type":"request","id":"7","op":"status"}"#);
}

#[test]
fn wrong_version_hello_is_representable() {
    // The daemon must be able to read it to answer `unsupported_version`.
    let m: ClientMessage = decode_frame(&frame_of(
        br#"{"type":"hello","proto_version":99,"app":"a"}"#,
    ))
    .unwrap()
    .unwrap()
    .0;
    assert_eq!(
        m,
        ClientMessage::Hello(ClientHello {
            proto_version: 99,
            app: "a".into()
        })
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let (m, _) = decode_frame::<ClientMessage>(&frame_of(
        br#"{"type":"request","id":3,"op":"ping","data":"d","future":{"x":1}}"#,
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        m,
        ClientMessage::Request(Request {
            id: 3,
            op: Op::Ping { data: "d".into() }
        })
    );
    let (m, _) = decode_frame::<ServerMessage>(&frame_of(
        br#"{"type":"hello","proto_version":1,"daemon_version":"0.1.0","pid":5,"features":[]}"#,
    ))
    .unwrap()
    .unwrap();
    assert!(matches!(m, ServerMessage::Hello(h) if h.pid == 5));
}

#[test]
fn unknown_error_codes_map_to_unknown() {
    let (m, _) = decode_frame::<ServerMessage>(&frame_of(
        br#"{"type":"error","id":4,"code":"quota_exceeded","message":"m"}"#,
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        m,
        ServerMessage::Error(ErrorFrame {
            id: Some(4),
            code: ErrorCode::Unknown,
            message: "m".into()
        })
    );
}

#[test]
fn connection_level_error_has_no_id_field() {
    let e = ServerMessage::Error(ErrorFrame {
        id: None,
        code: ErrorCode::UnsupportedVersion,
        message: "speak 1".into(),
    });
    let mut out = Vec::new();
    encode_frame(&e, &mut out).unwrap();
    assert_eq!(
        &out[4..],
        br#"{"type":"error","code":"unsupported_version","message":"speak 1"}"#
    );
}

#[test]
fn frame_decoder_byte_by_byte_matches_whole() {
    let msgs = vec![
        hello(),
        ClientMessage::Request(Request {
            id: 1,
            op: Op::Status,
        }),
        ClientMessage::Request(Request {
            id: 2,
            op: Op::Ping {
                data: "héllo ✓".into(),
            },
        }),
        ClientMessage::Request(Request {
            id: 3,
            op: Op::Shutdown,
        }),
    ];
    let mut wire = Vec::new();
    for m in &msgs {
        encode_frame(m, &mut wire).unwrap();
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for b in &wire {
        dec.extend(std::slice::from_ref(b));
        while let Some(m) = dec.next::<ClientMessage>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);
}
