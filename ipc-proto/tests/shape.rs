use muxd_ipc_proto::*;

#[test]
fn json_shapes_are_flat() {
    let m = ClientMessage::Request(Request {
        id: 7,
        op: Op::Ping { data: "x".into() },
    });
    let s = serde_json::to_string(&m).unwrap();
    assert_eq!(s, r#"{"type":"request","id":7,"op":"ping","data":"x"}"#);
    let back: ClientMessage = serde_json::from_str(&s).unwrap();
    assert_eq!(back, m);
    let r = ServerMessage::Response(Response {
        id: 7,
        reply: Reply::Pong { data: "x".into() },
    });
    let s = serde_json::to_string(&r).unwrap();
    assert_eq!(s, r#"{"type":"response","id":7,"reply":"pong","data":"x"}"#);
    assert_eq!(serde_json::from_str::<ServerMessage>(&s).unwrap(), r);
    let e = ServerMessage::Event(Event::ShuttingDown {
        reason: "signal".into(),
    });
    let s = serde_json::to_string(&e).unwrap();
    assert_eq!(
        s,
        r#"{"type":"event","event":"shutting_down","reason":"signal"}"#
    );
    assert_eq!(serde_json::from_str::<ServerMessage>(&s).unwrap(), e);
    let st: ClientMessage =
        serde_json::from_str(r#"{"type":"request","id":1,"op":"status"}"#).unwrap();
    assert_eq!(
        st,
        ClientMessage::Request(Request {
            id: 1,
            op: Op::Status
        })
    );
}

#[test]
fn error_code_as_str_matches_serde() {
    for code in [
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HelloRequired,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::PermissionDenied,
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::Busy,
        ErrorCode::Upstream,
        ErrorCode::Internal,
        ErrorCode::Unknown,
    ] {
        assert_eq!(
            serde_json::to_string(&code).unwrap(),
            format!("\"{}\"", code.as_str())
        );
        assert_eq!(code.to_string(), code.as_str());
    }
}
