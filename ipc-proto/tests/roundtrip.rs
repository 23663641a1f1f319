//! Property tests: every message survives encode → decode, whole or split at any point.

use muxd_ipc_proto::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Arbitrary Unicode, including quotes, backslashes and control characters JSON must escape.
    prop_oneof![any::<String>(), "[a-z\"\\\\\u{0}-\u{1f}]{0,12}"]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Status),
        text().prop_map(|data| Op::Ping { data }),
        option::of(any::<u64>()).prop_map(|interval_ms| Op::Watch { interval_ms }),
        Just(Op::Shutdown),
        (text(), any::<bool>())
            .prop_map(|(server, websocket)| Op::QueueCreate { server, websocket }),
        Just(Op::QueueList),
        text().prop_map(|queue_id| Op::QueueDelete { queue_id }),
        (text(), text(), any::<bool>()).prop_map(|(queue_uri, body_b64, wait)| Op::Send {
            queue_uri,
            body_b64,
            wait
        }),
        text().prop_map(|message_id| Op::MessageStatus { message_id }),
        text().prop_map(|path| Op::Export { path }),
        (text(), option::of(any::<u32>()), option::of(any::<u64>())).prop_map(
            |(queue_id, max, wait_ms)| Op::Recv {
                queue_id,
                max,
                wait_ms
            }
        ),
        (text(), text()).prop_map(|(queue_id, msg_id)| Op::Ack { queue_id, msg_id }),
        option::of(text()).prop_map(|server| Op::Reconnect { server }),
        (text(), option::of(any::<u64>())).prop_map(|(server, interval_ms)| Op::Lag {
            server,
            interval_ms
        }),
    ]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(proto_version, app)| {
            ClientMessage::Hello(ClientHello { proto_version, app })
        }),
        (any::<u64>(), op()).prop_map(|(id, op)| ClientMessage::Request(Request { id, op })),
    ]
}

fn upstream() -> impl Strategy<Value = UpstreamStatus> {
    (
        text(),
        text(),
        text(),
        text(),
        any::<u64>(),
        option::of(text()),
        any::<u32>(),
    )
        .prop_map(
            |(server, profile, transport, state, state_since_unix_ms, last_error, queues)| {
                UpstreamStatus {
                    server,
                    profile,
                    transport,
                    state,
                    state_since_unix_ms,
                    last_error,
                    queues,
                    ..UpstreamStatus::default()
                }
            },
        )
        .prop_flat_map(|u| {
            (
                Just(u),
                any::<(u32, u32)>(),
                option::of(any::<u64>()),
                option::of(any::<u64>()),
                option::of(lag_summary()),
            )
        })
        .prop_map(
            |(u, (pending, attempt), next_retry_ms, rtt_last_us, lag)| UpstreamStatus {
                pending,
                attempt,
                next_retry_ms,
                rtt_last_us,
                lag,
                ..u
            },
        )
}

fn lag_summary() -> impl Strategy<Value = LagSummary> {
    vec(any::<u64>(), 6).prop_map(|v| LagSummary {
        count: v[0] as u32,
        min_us: v[0],
        p50_us: v[1],
        p95_us: v[2],
        max_us: v[3],
        mean_us: v[4],
        jitter_us: v[5],
    })
}

fn status() -> impl Strategy<Value = StatusReport> {
    (
        text(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        vec(upstream(), 0..4),
    )
        .prop_map(
            |(daemon_version, pid, uptime_ms, clients, upstreams)| StatusReport {
                daemon_version,
                pid,
                uptime_ms,
                clients,
                upstreams,
            },
        )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::MalformedFrame),
        Just(ErrorCode::FrameTooLarge),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::HelloRequired),
        Just(ErrorCode::SlowConsumer),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::PermissionDenied),
        Just(ErrorCode::InvalidArgument),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Upstream),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Unknown),
    ]
}

fn queue_info() -> impl Strategy<Value = QueueInfo> {
    (text(), text(), text(), any::<u32>(), any::<u64>()).prop_map(
        |(queue_id, server, queue_uri, waiting, duplicates_suppressed)| QueueInfo {
            queue_id,
            server,
            queue_uri,
            waiting,
            duplicates_suppressed,
        },
    )
}

fn received() -> impl Strategy<Value = ReceivedMessage> {
    (text(), text(), any::<i64>(), text()).prop_map(|(queue_id, msg_id, ts, body_b64)| {
        ReceivedMessage {
            queue_id,
            msg_id,
            ts,
            body_b64,
        }
    })
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        status().prop_map(Reply::Status),
        text().prop_map(|data| Reply::Pong { data }),
        Just(Reply::Watching),
        Just(Reply::ShuttingDown),
        queue_info().prop_map(Reply::QueueCreated),
        vec(queue_info(), 0..3).prop_map(|queues| Reply::Queues { queues }),
        Just(Reply::Done),
        (text(), text()).prop_map(|(message_id, state)| Reply::Sent { message_id, state }),
        vec(received(), 0..3).prop_map(|messages| Reply::Messages { messages }),
        (text(), text(), option::of(text())).prop_map(|(message_id, state, error)| {
            Reply::MessageStatus {
                message_id,
                state,
                error,
            }
        }),
        text().prop_map(|path| Reply::Exported { path }),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (any::<u32>(), text(), any::<u32>()).prop_map(|(proto_version, daemon_version, pid)| {
            ServerMessage::Hello(ServerHello {
                proto_version,
                daemon_version,
                pid,
            })
        }),
        (any::<u64>(), reply())
            .prop_map(|(id, reply)| ServerMessage::Response(Response { id, reply })),
        (option::of(any::<u64>()), error_code(), text()).prop_map(|(id, code, message)| {
            ServerMessage::Error(ErrorFrame { id, code, message })
        }),
        status().prop_map(|s| ServerMessage::Event(Event::Status(s))),
        text().prop_map(|reason| ServerMessage::Event(Event::ShuttingDown { reason })),
        upstream().prop_map(|u| ServerMessage::Event(Event::Upstream(u))),
        (text(), text(), any::<u64>(), any::<u64>(), lag_summary()).prop_map(
            |(server, source, rtt_us, at_unix_ms, summary)| {
                ServerMessage::Event(Event::Lag(LagEvent {
                    server,
                    source,
                    rtt_us,
                    at_unix_ms,
                    summary,
                }))
            }
        ),
        (text(), text(), option::of(text())).prop_map(|(message_id, state, error)| {
            ServerMessage::Event(Event::Message(MessageEvent {
                message_id,
                state,
                error,
            }))
        }),
    ]
}

fn round_trip<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let decoded = decode_frame::<T>(&buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (back, used) = decoded.ok_or_else(|| TestCaseError::fail("incomplete"))?;
    prop_assert_eq!(used, buf.len());
    prop_assert_eq!(&back, msg);
    Ok(())
}

proptest! {
    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        round_trip(&msg)?;
    }

    #[test]
    fn server_messages_round_trip(msg in server_message()) {
        round_trip(&msg)?;
    }

    #[test]
    fn split_streams_decode_the_same(
        msgs in vec(server_message(), 1..6),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut wire = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut wire).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            dec.extend(&wire[at..p]);
            at = p;
            while let Some(m) = dec.next::<ServerMessage>().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..64)) {
        let _ = decode_frame::<ClientMessage>(&bytes);
        let _ = decode_frame::<ServerMessage>(&bytes);
    }
}
