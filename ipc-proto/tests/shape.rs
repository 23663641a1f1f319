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

#[test]
fn store_messages_have_flat_shapes_and_old_senders_stay_valid() {
    // `wait` defaults to false and is left out when false, so a client written before it
    // existed sends exactly what it always did.
    let old = r#"{"type":"request","id":3,"op":"send","queue_uri":"u","body_b64":"aGk="}"#;
    let parsed: ClientMessage = serde_json::from_str(old).unwrap();
    let send = ClientMessage::Request(Request {
        id: 3,
        op: Op::Send {
            queue_uri: "u".into(),
            body_b64: "aGk=".into(),
            wait: false,
        },
    });
    assert_eq!(parsed, send);
    assert_eq!(serde_json::to_string(&send).unwrap(), old);
    let waiting = ClientMessage::Request(Request {
        id: 3,
        op: Op::Send {
            queue_uri: "u".into(),
            body_b64: "aGk=".into(),
            wait: true,
        },
    });
    assert_eq!(
        serde_json::to_string(&waiting).unwrap(),
        r#"{"type":"request","id":3,"op":"send","queue_uri":"u","body_b64":"aGk=","wait":true}"#
    );

    let cases: [(ServerMessage, &str); 4] = [
        (
            ServerMessage::Response(Response {
                id: 4,
                reply: Reply::MessageStatus {
                    message_id: "9".into(),
                    state: "queued".into(),
                    error: None,
                },
            }),
            r#"{"type":"response","id":4,"reply":"message_status","message_id":"9","state":"queued"}"#,
        ),
        (
            ServerMessage::Response(Response {
                id: 4,
                reply: Reply::MessageStatus {
                    message_id: "9".into(),
                    state: "failed".into(),
                    error: Some("expired".into()),
                },
            }),
            r#"{"type":"response","id":4,"reply":"message_status","message_id":"9","state":"failed","error":"expired"}"#,
        ),
        (
            ServerMessage::Response(Response {
                id: 5,
                reply: Reply::Exported {
                    path: "/b/x.muxd".into(),
                },
            }),
            r#"{"type":"response","id":5,"reply":"exported","path":"/b/x.muxd"}"#,
        ),
        (
            ServerMessage::Event(Event::Message(MessageEvent {
                message_id: "9".into(),
                state: "sent".into(),
                error: None,
            })),
            r#"{"type":"event","event":"message","message_id":"9","state":"sent"}"#,
        ),
    ];
    for (msg, json) in cases {
        assert_eq!(serde_json::to_string(&msg).unwrap(), json);
        assert_eq!(serde_json::from_str::<ServerMessage>(json).unwrap(), msg);
    }
    let requests = [
        (
            Op::MessageStatus {
                message_id: "9".into(),
            },
            r#"{"type":"request","id":6,"op":"message_status","message_id":"9"}"#,
        ),
        (
            Op::Export {
                path: "/b/x.muxd".into(),
            },
            r#"{"type":"request","id":6,"op":"export","path":"/b/x.muxd"}"#,
        ),
    ];
    for (op, json) in requests {
        let msg = ClientMessage::Request(Request { id: 6, op });
        assert_eq!(serde_json::to_string(&msg).unwrap(), json);
        assert_eq!(serde_json::from_str::<ClientMessage>(json).unwrap(), msg);
    }
}
