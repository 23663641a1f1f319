//! The daemon run in-process through the library API, as embedding programs and tests do.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use muxd::{Config, Environment, ShutdownReason};
use muxd_ipc_proto::{
    ClientHello, ClientMessage, Event, FrameDecoder, Op, PROTO_VERSION, Reply, Request, Response,
    ServerMessage, encode_frame,
};

fn send(stream: &mut UnixStream, msg: &ClientMessage) {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf).unwrap();
    stream.write_all(&buf).unwrap();
}

fn recv(stream: &mut UnixStream, dec: &mut FrameDecoder) -> Option<ServerMessage> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(msg) = dec.next().unwrap() {
            return Some(msg);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => dec.extend(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_until_the_shutdown_future_completes() {
    let dir = tempfile::tempdir().unwrap();
    let env = Environment {
        xdg_runtime_dir: Some(dir.path().into()),
        xdg_config_home: None,
        home: None,
        tmp_dir: dir.path().into(),
        euid: 0,
        xdg_state_home: Some(dir.path().join("state").into()),
        passphrase: None,
    };
    let mut config = Config::defaults(&env);
    config.socket = dir.path().join("in-process.sock");
    config.socket_is_default = false;
    muxd::init(&config).unwrap();
    let socket = muxd::bind(&config).unwrap();
    let path = socket.path().to_owned();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(muxd::serve(socket, config, async move {
        let _ = stop_rx.await;
        ShutdownReason::Signal
    }));

    // A blocking client on its own thread, so the runtime keeps serving.
    let client_path = path.clone();
    let client = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&client_path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut dec = FrameDecoder::new();
        send(
            &mut s,
            &ClientMessage::Hello(ClientHello {
                proto_version: PROTO_VERSION,
                app: "t".into(),
            }),
        );
        assert!(matches!(
            recv(&mut s, &mut dec),
            Some(ServerMessage::Hello(_))
        ));
        send(
            &mut s,
            &ClientMessage::Request(Request {
                id: 1,
                op: Op::Ping { data: "hi".into() },
            }),
        );
        assert_eq!(
            recv(&mut s, &mut dec),
            Some(ServerMessage::Response(Response {
                id: 1,
                reply: Reply::Pong { data: "hi".into() }
            }))
        );
        (s, dec)
    });
    let (mut s, mut dec) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();

    stop_tx.send(()).unwrap();
    let rest = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        while let Some(msg) = recv(&mut s, &mut dec) {
            got.push(msg);
        }
        got
    })
    .await
    .unwrap();
    assert_eq!(
        rest,
        [ServerMessage::Event(Event::ShuttingDown {
            reason: "signal".into()
        })]
    );
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists());
}
