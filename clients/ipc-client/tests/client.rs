//! The client against scripted fake daemons on real Unix sockets in a temp dir.

#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::path::PathBuf;

use muxd_ipc_client::{Client, ClientError};
use muxd_ipc_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The far end of one accepted connection, speaking raw frames.
struct Peer {
    stream: UnixStream,
    dec: FrameDecoder,
}

impl Peer {
    async fn recv(&mut self) -> Option<ClientMessage> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.dec.next().unwrap() {
                return Some(m);
            }
            let n = self.stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return None;
            }
            self.dec.extend(&buf[..n]);
        }
    }

    async fn send(&mut self, m: &ServerMessage) {
        let mut out = Vec::new();
        encode_frame(m, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    async fn recv_request(&mut self) -> Request {
        match self.recv().await {
            Some(ClientMessage::Request(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    /// Reads the client's hello and answers with `version`.
    async fn accept_hello(&mut self, version: u32) -> ClientHello {
        let Some(ClientMessage::Hello(h)) = self.recv().await else {
            panic!("first frame must be a hello");
        };
        self.send(&ServerMessage::Hello(ServerHello {
            proto_version: version,
            daemon_version: "9.9.9".into(),
            pid: 4242,
        }))
        .await;
        h
    }
}

fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("muxd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

async fn accept(listener: &UnixListener) -> Peer {
    let (stream, _) = listener.accept().await.unwrap();
    Peer {
        stream,
        dec: FrameDecoder::new(),
    }
}

fn status_report(uptime_ms: u64) -> StatusReport {
    StatusReport {
        daemon_version: "9.9.9".into(),
        pid: 4242,
        uptime_ms,
        clients: 1,
        upstreams: vec![],
    }
}

#[tokio::test]
async fn missing_socket_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    match Client::connect(&path, "t").await {
        Err(ClientError::NotRunning { path: p }) => assert_eq!(p, path),
        other => panic!("expected NotRunning, got {other:?}"),
    }
}

#[tokio::test]
async fn stale_socket_file_is_not_running() {
    let (_dir, path, listener) = socket();
    drop(listener); // the file stays, nobody listens: connect is refused
    assert!(path.exists());
    assert!(matches!(
        Client::connect(&path, "t").await,
        Err(ClientError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn hello_exchange_and_request_correlation() {
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        let mut p = accept(&listener).await;
        let h = p.accept_hello(PROTO_VERSION).await;
        assert_eq!(h.app, "myapp");
        assert_eq!(h.proto_version, PROTO_VERSION);
        let r1 = p.recv_request().await;
        assert_eq!(r1.op, Op::Status);
        p.send(&ServerMessage::Response(Response {
            id: r1.id,
            reply: Reply::Status(status_report(5)),
        }))
        .await;
        let r2 = p.recv_request().await;
        assert_ne!(r1.id, r2.id, "ids must be fresh");
        let Op::Ping { data } = r2.op else {
            panic!("expected ping")
        };
        p.send(&ServerMessage::Response(Response {
            id: r2.id,
            reply: Reply::Pong { data },
        }))
        .await;
    });
    let mut c = Client::connect(&path, "myapp").await.unwrap();
    assert_eq!(c.server_hello().pid, 4242);
    assert_eq!(c.server_hello().daemon_version, "9.9.9");
    assert_eq!(c.status().await.unwrap().uptime_ms, 5);
    assert_eq!(c.ping("abc".into()).await.unwrap(), "abc");
    server.await.unwrap();
}

#[tokio::test]
async fn wrong_daemon_version_is_refused() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION + 1).await;
        let _ = p.recv().await;
    });
    match Client::connect(&path, "t").await {
        Err(ClientError::UnsupportedVersion { daemon }) => assert_eq!(daemon, PROTO_VERSION + 1),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_refused_with_error_frame() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        let _ = p.recv().await;
        p.send(&ServerMessage::Error(ErrorFrame {
            id: None,
            code: ErrorCode::Busy,
            message: "too many clients".into(),
        }))
        .await;
    });
    let err = Client::connect(&path, "t").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy));
}

#[tokio::test]
async fn events_interleaved_with_responses_stay_in_order() {
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        let w = p.recv_request().await;
        // Events may come before the response that starts them.
        p.send(&ServerMessage::Event(Event::Status(status_report(1))))
            .await;
        p.send(&ServerMessage::Response(Response {
            id: w.id,
            reply: Reply::Watching,
        }))
        .await;
        p.send(&ServerMessage::Event(Event::Status(status_report(2))))
            .await;
        let ping = p.recv_request().await;
        p.send(&ServerMessage::Event(Event::Status(status_report(3))))
            .await;
        // A stale answer to an id nobody waits for must be skipped.
        p.send(&ServerMessage::Response(Response {
            id: 9999,
            reply: Reply::Pong { data: "old".into() },
        }))
        .await;
        p.send(&ServerMessage::Response(Response {
            id: ping.id,
            reply: Reply::Pong { data: "new".into() },
        }))
        .await;
        p.send(&ServerMessage::Event(Event::Status(status_report(4))))
            .await;
        p.send(&ServerMessage::Event(Event::ShuttingDown {
            reason: "request".into(),
        }))
        .await;
        // dropping the stream closes the connection
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    c.watch(Some(100)).await.unwrap();
    assert_eq!(c.ping("new".into()).await.unwrap(), "new");
    let mut uptimes = Vec::new();
    let mut last = None;
    while let Some(ev) = c.next_event().await.unwrap() {
        match ev {
            Event::Status(s) => uptimes.push(s.uptime_ms),
            other => last = Some(other),
        }
    }
    assert_eq!(uptimes, [1, 2, 3, 4]);
    assert_eq!(
        last,
        Some(Event::ShuttingDown {
            reason: "request".into()
        })
    );
    assert!(matches!(c.status().await, Err(ClientError::Closed)));
    server.await.unwrap();
}

#[tokio::test]
async fn request_error_frame_is_a_daemon_error_and_connection_survives() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        let r = p.recv_request().await;
        p.send(&ServerMessage::Error(ErrorFrame {
            id: Some(r.id),
            code: ErrorCode::NotFound,
            message: "no such queue".into(),
        }))
        .await;
        let r = p.recv_request().await;
        p.send(&ServerMessage::Response(Response {
            id: r.id,
            reply: Reply::Done,
        }))
        .await;
        let _ = p.recv().await;
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    match c
        .request(Op::QueueDelete {
            queue_id: "q".into(),
        })
        .await
    {
        Err(ClientError::Daemon { code, message }) => {
            assert_eq!(code, ErrorCode::NotFound);
            assert_eq!(message, "no such queue");
        }
        other => panic!("expected a daemon error, got {other:?}"),
    }
    assert_eq!(c.request(Op::QueueList).await.unwrap(), Reply::Done);
}

#[tokio::test]
async fn connection_level_error_ends_the_event_stream() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        p.send(&ServerMessage::Error(ErrorFrame {
            id: None,
            code: ErrorCode::SlowConsumer,
            message: "too slow".into(),
        }))
        .await;
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    let err = c.next_event().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::SlowConsumer));
    assert!(c.next_event().await.unwrap().is_none());
}

#[tokio::test]
async fn close_before_answer_is_closed_and_mid_frame_is_protocol() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        let _ = p.recv_request().await;
        drop(p);
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        let _ = p.recv_request().await;
        // Half a frame, then close.
        p.stream.write_all(&[0, 0, 0, 50, b'{']).await.unwrap();
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    assert!(matches!(c.status().await, Err(ClientError::Closed)));
    let mut c = Client::connect(&path, "t").await.unwrap();
    assert!(matches!(c.status().await, Err(ClientError::Protocol(_))));
}

#[tokio::test]
async fn garbage_from_daemon_is_protocol_error() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        let _ = p.recv().await;
        let body = br#"{"type":"nonsense"}"#;
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        p.stream.write_all(&f).await.unwrap();
        let _ = p.recv().await;
    });
    assert!(matches!(
        Client::connect(&path, "t").await,
        Err(ClientError::Protocol(_))
    ));
}

#[tokio::test]
async fn abandoned_request_does_not_confuse_the_next() {
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        let first = p.recv_request().await;
        let second = p.recv_request().await;
        // Answer the abandoned one late, then the live one.
        for r in [first, second] {
            let Op::Ping { data } = r.op else { panic!() };
            p.send(&ServerMessage::Response(Response {
                id: r.id,
                reply: Reply::Pong { data },
            }))
            .await;
        }
        let _ = p.recv().await;
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    // Give up on the first ping before it is answered (it is answered only after the second).
    let abandoned =
        tokio::time::timeout(std::time::Duration::from_millis(50), c.ping("one".into())).await;
    assert!(abandoned.is_err());
    assert_eq!(c.ping("two".into()).await.unwrap(), "two");
}

#[tokio::test]
async fn into_events_is_a_stream() {
    use futures_util::StreamExt;
    let (_dir, path, listener) = socket();
    tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        for i in 0..3 {
            p.send(&ServerMessage::Event(Event::Status(status_report(i))))
                .await;
        }
    });
    let c = Client::connect(&path, "t").await.unwrap();
    let got: Vec<u64> = c
        .into_events()
        .map(|e| match e.unwrap() {
            Event::Status(s) => s.uptime_ms,
            other => panic!("{other:?}"),
        })
        .collect()
        .await;
    assert_eq!(got, [0, 1, 2]);
}

#[tokio::test]
async fn send_status_and_export_carry_the_right_ops() {
    let (_dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        let mut p = accept(&listener).await;
        p.accept_hello(PROTO_VERSION).await;
        // A plain send asks for no wait and is answered `queued`.
        let r = p.recv_request().await;
        let Op::Send {
            queue_uri,
            body_b64,
            wait,
        } = r.op
        else {
            panic!("expected send, got {:?}", r.op)
        };
        assert_eq!(
            (queue_uri.as_str(), body_b64.as_str(), wait),
            ("smp://q", "aGk=", false)
        );
        p.send(&ServerMessage::Response(Response {
            id: r.id,
            reply: Reply::Sent {
                message_id: "m1".into(),
                state: "queued".into(),
            },
        }))
        .await;
        // A status event arrives before the next answer; it must be kept for next_event.
        p.send(&ServerMessage::Event(Event::Message(MessageEvent {
            message_id: "m1".into(),
            state: "sent".into(),
            error: None,
        })))
        .await;
        let r = p.recv_request().await;
        assert!(matches!(r.op, Op::Send { wait: true, .. }), "{:?}", r.op);
        p.send(&ServerMessage::Response(Response {
            id: r.id,
            reply: Reply::Sent {
                message_id: "m2".into(),
                state: "sent".into(),
            },
        }))
        .await;
        let r = p.recv_request().await;
        assert_eq!(
            r.op,
            Op::MessageStatus {
                message_id: "m3".into()
            }
        );
        p.send(&ServerMessage::Response(Response {
            id: r.id,
            reply: Reply::MessageStatus {
                message_id: "m3".into(),
                state: "failed".into(),
                error: Some("expired".into()),
            },
        }))
        .await;
        let r = p.recv_request().await;
        let Op::Export { path } = r.op else {
            panic!("expected export, got {:?}", r.op)
        };
        p.send(&ServerMessage::Response(Response {
            id: r.id,
            reply: Reply::Exported { path: path.clone() },
        }))
        .await;
        path
    });
    let mut c = Client::connect(&path, "t").await.unwrap();
    assert_eq!(
        c.send("smp://q".into(), b"hi").await.unwrap(),
        ("m1".to_owned(), "queued".to_owned())
    );
    assert_eq!(
        c.send_wait("smp://q".into(), b"hi").await.unwrap(),
        ("m2".to_owned(), "sent".to_owned())
    );
    let st = c.message_status("m3".into()).await.unwrap();
    assert_eq!(
        (
            st.message_id.as_str(),
            st.state.as_str(),
            st.error.as_deref()
        ),
        ("m3", "failed", Some("expired"))
    );
    assert_eq!(
        c.next_event().await.unwrap(),
        Some(Event::Message(MessageEvent {
            message_id: "m1".into(),
            state: "sent".into(),
            error: None,
        }))
    );
    // A relative path is made absolute against this process's working directory.
    let written = c.export(std::path::Path::new("backup.muxd")).await.unwrap();
    let sent = server.await.unwrap();
    let expected = std::env::current_dir().unwrap().join("backup.muxd");
    assert_eq!(PathBuf::from(&sent), expected);
    assert_eq!(written, expected);
}
