//! Apps that push the daemon's limits: replies that would not fit one frame, piles of
//! long-polls, names that are not names.

use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_e2e::{Daemon, RawClient, Relay};
use muxd_ipc_proto::{
    ClientHello, ClientMessage, ErrorCode, Op, PROTO_VERSION, Reply, Response, ServerMessage,
};

use crate::smp::create_queue;

/// Messages waiting in one queue, per `queue_list`.
fn waiting(client: &mut RawClient, queue_id: &str) -> u32 {
    match client.request(Op::QueueList) {
        ServerMessage::Response(Response {
            reply: Reply::Queues { queues },
            ..
        }) => queues
            .iter()
            .find(|q| q.queue_id == queue_id)
            .map_or(0, |q| q.waiting),
        other => panic!("queue_list failed: {other:?}"),
    }
}

/// 60 waiting messages of ~15 KB are ~1.2 MB of base64: more than one 1 MiB frame. A `recv`
/// without `max` gets as many as fit, the next `recv` the rest; nothing is lost or doubled.
#[test]
fn a_recv_of_more_than_a_frame_holds_is_split_across_recvs() {
    const COUNT: usize = 60;
    let relay = Relay::start();
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let q = create_queue(socket, "alice", relay.address(), false);

    let mut bob = daemon.client("bob");
    let body = |i: usize| format!("{i:04}-{}", "m".repeat(15_000));
    for i in 0..COUNT {
        bob.send_request(Op::Send {
            queue_uri: q.uri.clone(),
            body_b64: base64::engine::general_purpose::STANDARD.encode(body(i)),
            wait: false,
        })
        .unwrap();
    }
    for _ in 0..COUNT {
        match bob.recv() {
            Ok(ServerMessage::Response(Response {
                reply: Reply::Sent { .. },
                ..
            })) => {}
            other => panic!("send failed: {other:?}"),
        }
    }

    let mut alice = daemon.client("alice");
    let deadline = Instant::now() + Duration::from_secs(30);
    while waiting(&mut alice, &q.id) < u32::try_from(COUNT).unwrap() {
        assert!(Instant::now() < deadline, "the messages did not all arrive");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut got = Vec::new();
    let mut replies = Vec::new();
    while got.len() < COUNT {
        assert!(replies.len() < 4, "too many recvs: {replies:?}");
        let id = alice
            .send_request(Op::Recv {
                queue_id: q.id.clone(),
                max: None,
                wait_ms: None,
            })
            .unwrap();
        // Before the fix the reply was dropped as too large and this timed out.
        let messages = match alice.recv_timeout(Duration::from_secs(10)) {
            Ok(ServerMessage::Response(Response {
                id: rid,
                reply: Reply::Messages { messages },
            })) if rid == id => messages,
            other => panic!("recv {id} failed: {other:?}"),
        };
        assert!(
            !messages.is_empty(),
            "a recv with messages waiting got none"
        );
        replies.push(messages.len());
        for m in &messages {
            let b = base64::engine::general_purpose::STANDARD
                .decode(&m.body_b64)
                .unwrap();
            got.push(String::from_utf8(b).unwrap());
            match alice.request(Op::Ack {
                queue_id: m.queue_id.clone(),
                msg_id: m.msg_id.clone(),
            }) {
                ServerMessage::Response(Response {
                    reply: Reply::Done, ..
                }) => {}
                other => panic!("ack failed: {other:?}"),
            }
        }
    }
    assert!(replies[0] < COUNT, "one reply held them all: {replies:?}");
    assert!(replies.len() >= 2, "{replies:?}");
    let want: Vec<String> = (0..COUNT).map(body).collect();
    assert_eq!(got.len(), COUNT);
    assert!(got == want, "messages lost, doubled or reordered");
    assert_eq!(waiting(&mut alice, &q.id), 0);
}

/// One connection may keep 32 `recv`s waiting; the next is refused `busy` at once, and the
/// connection stays usable.
#[test]
fn waiting_recvs_per_connection_are_capped() {
    let relay = Relay::start();
    let daemon = Daemon::start();
    let q = create_queue(daemon.socket(), "alice", relay.address(), false);
    let mut alice = daemon.client("alice");
    let ids: Vec<u64> = (0..33)
        .map(|_| {
            alice
                .send_request(Op::Recv {
                    queue_id: q.id.clone(),
                    max: None,
                    wait_ms: Some(60_000),
                })
                .unwrap()
        })
        .collect();
    match alice.recv_timeout(Duration::from_secs(5)) {
        Ok(ServerMessage::Error(e)) => {
            assert_eq!((e.id, e.code), (Some(ids[32]), ErrorCode::Busy), "{e:?}");
        }
        other => panic!("expected busy for the 33rd recv, got {other:?}"),
    }
    match alice.request(Op::Ping {
        data: "still here".into(),
    }) {
        ServerMessage::Response(Response {
            reply: Reply::Pong { data },
            ..
        }) => assert_eq!(data, "still here"),
        other => panic!("ping failed: {other:?}"),
    }
    // The waiting ones are still there: a message answers the oldest.
    let mut bob = daemon.client("bob");
    let sent = bob.request(Op::Send {
        queue_uri: q.uri.clone(),
        body_b64: base64::engine::general_purpose::STANDARD.encode("hi"),
        wait: false,
    });
    assert!(matches!(sent, ServerMessage::Response(_)), "{sent:?}");
    match alice.recv() {
        Ok(ServerMessage::Response(Response {
            id,
            reply: Reply::Messages { messages },
        })) => {
            assert_eq!(id, ids[0]);
            assert_eq!(messages.len(), 1);
        }
        other => panic!("expected the first recv's answer, got {other:?}"),
    }
}

/// App names are 1..=64 bytes of `[A-Za-z0-9._-]`; others are refused in the hello.
#[test]
fn hello_with_a_bad_app_name_is_refused() {
    let daemon = Daemon::start();
    let long = "a".repeat(65);
    for bad in ["", "two words", "../etc", "\u{e9}t\u{e9}", long.as_str()] {
        let mut c = daemon.connect();
        c.send(&ClientMessage::Hello(ClientHello {
            proto_version: PROTO_VERSION,
            app: bad.to_owned(),
        }))
        .unwrap();
        c.expect_error_and_close(ErrorCode::InvalidArgument);
    }
    let longest = "a".repeat(64);
    for name in ["org.example.Chat-2_x", longest.as_str()] {
        let mut c = daemon.connect();
        c.hello(name);
        assert!(matches!(c.request(Op::Status), ServerMessage::Response(_)));
    }
}
