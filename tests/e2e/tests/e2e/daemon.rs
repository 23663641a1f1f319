//! The daemon binary over its real socket: concurrency, backpressure, socket hygiene, shutdown,
//! protocol errors and configuration.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use muxd_e2e::{Daemon, RawClient, RecvError, muxd_bin};
use muxd_ipc_proto::{
    ClientHello, ClientMessage, ErrorCode, ErrorFrame, Event, MAX_FRAME_LEN, Op, Reply, Response,
    ServerMessage,
};

fn pong_data(msg: &ServerMessage) -> Option<&str> {
    match msg {
        ServerMessage::Response(Response {
            reply: Reply::Pong { data },
            ..
        }) => Some(data),
        _ => None,
    }
}

fn is_status_event(msg: &ServerMessage) -> bool {
    matches!(msg, ServerMessage::Event(Event::Status(_)))
}

fn ping(c: &mut RawClient, data: &str) {
    let reply = c.request(Op::Ping {
        data: data.to_owned(),
    });
    assert_eq!(pong_data(&reply), Some(data), "{reply:?}");
}

#[test]
fn twenty_clients_and_one_garbage_sender() {
    const CLIENTS: usize = 20;
    let daemon = Daemon::start();
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let socket = daemon.socket().to_owned();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(&socket);
                let hello = c.hello(&format!("app{i}"));
                assert_eq!(hello.proto_version, muxd_ipc_proto::PROTO_VERSION);
                let ServerMessage::Response(Response {
                    reply: Reply::Status(s),
                    ..
                }) = c.request(Op::Status)
                else {
                    panic!("status failed");
                };
                assert!(s.clients >= 1 && s.upstreams.is_empty());
                ping(&mut c, &format!("before-{i}"));
                // Everyone is connected and has been served once.
                barrier.wait();
                if i == 0 {
                    c.send_raw(&[0, 0, 0, 9]).unwrap();
                    c.send_raw(b"not json!").unwrap();
                    c.expect_error_and_close(ErrorCode::MalformedFrame);
                    barrier.wait();
                    return;
                }
                // The garbage sender is gone by now; the rest keep working.
                barrier.wait();
                let id = c
                    .send_request(Op::Watch {
                        interval_ms: Some(20),
                    })
                    .unwrap();
                let mut events = 0;
                let mut watching = false;
                while events < 3 {
                    match c.recv().unwrap() {
                        ServerMessage::Response(Response {
                            id: rid,
                            reply: Reply::Watching,
                        }) => {
                            assert_eq!(rid, id);
                            watching = true;
                        }
                        msg if is_status_event(&msg) => {
                            assert!(watching, "status event before `watching`");
                            events += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                for n in 0..5 {
                    ping(&mut c, &format!("after-{i}-{n}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(daemon.log().contains("MalformedFrame"), "{}", daemon.log());
    // The daemon itself is still fine.
    ping(&mut daemon.client("late"), "still here");
}

#[test]
fn slow_consumer_is_cut_off_and_memory_stays_bounded() {
    const PING_BYTES: usize = 16 * 1024;
    const MAX_SENT: usize = 64 << 20;
    let daemon = Daemon::builder()
        .args(["--client-buffer-frames", "64"])
        .start();
    let mut good = daemon.client("good");
    ping(&mut good, "warm-up");
    let rss_before = daemon.rss_kib();

    let mut slow = daemon.client("slow");
    slow.stream()
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = "x".repeat(PING_BYTES);
    let mut sent_pings = 0usize;
    // Never read; keep sending until the daemon hangs up (or far past any sane buffer).
    while sent_pings * PING_BYTES < MAX_SENT {
        if slow.send_request(Op::Ping { data: data.clone() }).is_err() {
            break;
        }
        sent_pings += 1;
    }
    assert!(
        sent_pings * PING_BYTES < MAX_SENT,
        "the daemon never disconnected the slow client"
    );
    // Another client is served normally.
    ping(&mut good, "during");

    let rss_after = daemon.rss_kib();
    let grown_kib = rss_after.saturating_sub(rss_before);
    eprintln!("slow consumer: {sent_pings} pings sent, RSS {rss_before} -> {rss_after} KiB");
    assert!(
        grown_kib < 24 * 1024,
        "daemon RSS grew by {grown_kib} KiB ({rss_before} -> {rss_after}) after {sent_pings} pings"
    );

    // Now read what the slow client got: some pongs, then (at best) slow_consumer, then close.
    let mut pongs = 0;
    let mut errors = Vec::new();
    loop {
        match slow.recv() {
            Ok(msg) if pong_data(&msg).is_some() => pongs += 1,
            Ok(ServerMessage::Error(e)) => errors.push(e.code),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(RecvError::Closed) => break,
            Err(e) => panic!("slow client not disconnected: {e:?}"),
        }
    }
    assert!(pongs < sent_pings, "all {sent_pings} pings were answered");
    assert!(
        errors.iter().all(|c| *c == ErrorCode::SlowConsumer),
        "{errors:?}"
    );
    assert!(daemon.log().contains("slow consumer"), "{}", daemon.log());
    ping(&mut good, "after");
}

#[test]
fn second_daemon_on_the_same_socket_fails_clearly() {
    let first = Daemon::start();
    let mut second = Daemon::builder().socket(first.socket()).spawn();
    let status = second.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", second.log());
    let log = second.log();
    assert!(log.contains("already serving"), "{log}");
    assert!(log.contains(&first.socket().display().to_string()), "{log}");
    assert!(first.socket().exists());
    ping(&mut first.client("still"), "first still serves");
}

#[test]
fn sigterm_drains_clients_and_removes_the_socket() {
    let mut daemon = Daemon::start();
    let mut watcher = daemon.client("watcher");
    let reply = watcher.request(Op::Watch {
        interval_ms: Some(60_000),
    });
    assert!(matches!(
        reply,
        ServerMessage::Response(Response {
            reply: Reply::Watching,
            ..
        })
    ));
    daemon.terminate();
    let got = watcher.recv_until_closed();
    assert!(
        got.contains(&ServerMessage::Event(Event::ShuttingDown {
            reason: "signal".into()
        })),
        "{got:?}"
    );
    let status = daemon.wait_exit();
    assert!(status.success(), "{status}: {}", daemon.log());
    assert!(!daemon.socket().exists(), "socket left behind");
}

#[test]
fn shutdown_request_stops_the_daemon() {
    let mut daemon = Daemon::start();
    let mut watcher = daemon.client("watcher");
    watcher.request(Op::Watch { interval_ms: None });
    let mut admin = daemon.client("admin");
    let reply = admin.request(Op::Shutdown);
    assert!(
        matches!(
            reply,
            ServerMessage::Response(Response {
                reply: Reply::ShuttingDown,
                ..
            })
        ),
        "{reply:?}"
    );
    let bye = ServerMessage::Event(Event::ShuttingDown {
        reason: "request".into(),
    });
    assert!(admin.recv_until_closed().contains(&bye));
    assert!(watcher.recv_until_closed().contains(&bye));
    assert!(daemon.wait_exit().success(), "{}", daemon.log());
    assert!(!daemon.socket().exists());
}

/// Run as uid 65534 by `another_uid_is_refused`; does nothing in a normal test run.
#[test]
#[ignore = "helper: run in a child process by another_uid_is_refused"]
fn peer_probe_helper() {
    let Some(socket) = std::env::var_os("MUXD_E2E_PROBE_SOCKET") else {
        return;
    };
    let mut c = RawClient::connect(std::path::Path::new(&socket));
    // The daemon may refuse before the hello is written; what it sent is still readable.
    let _ = c.send(&ClientMessage::Hello(ClientHello {
        proto_version: muxd_ipc_proto::PROTO_VERSION,
        app: "intruder".into(),
    }));
    for msg in c.recv_until_closed() {
        println!("PROBE_GOT {}", serde_json::to_string(&msg).unwrap());
    }
    println!("PROBE_CLOSED");
}

#[test]
fn another_uid_is_refused() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test needs root to switch uid"
    );
    let daemon = Daemon::start();
    // Let uid 65534 through the file system, so only the daemon's own check can stop it.
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    // A copy of this test binary that uid 65534 can surely execute.
    let probe = daemon.dir().join("probe");
    std::fs::copy(std::env::current_exe().unwrap(), &probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_probe = || {
        Command::new(&probe)
            .args([
                "daemon::peer_probe_helper",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("MUXD_E2E_PROBE_SOCKET", daemon.socket())
            .uid(65534)
            .gid(65534)
            .output()
    };
    // A child forked by a parallel test may briefly hold the copy's write handle (ETXTBSY).
    let mut attempts = 0;
    let out = loop {
        match run_probe() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other.unwrap(),
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PROBE_CLOSED"), "{stdout}");
    let got: Vec<ServerMessage> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE_GOT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    // Refused with an error frame and never greeted.
    assert!(
        matches!(
            &got[..],
            [ServerMessage::Error(ErrorFrame {
                code: ErrorCode::PermissionDenied,
                id: None,
                ..
            })]
        ),
        "{got:?}"
    );
    let log = daemon.log();
    assert!(
        log.contains("refused a connection from another user"),
        "{log}"
    );
    assert!(log.contains("peer_uid=Some(65534)"), "{log}");
    // The daemon's own user is still welcome.
    ping(&mut daemon.client("owner"), "ok");
}

#[test]
fn protocol_violations_get_the_right_codes() {
    let daemon = Daemon::start();

    // Only the header of an oversize frame is sent: the daemon must judge it by the header.
    let mut c = daemon.connect();
    c.send_raw(&u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes())
        .unwrap();
    c.expect_error_and_close(ErrorCode::FrameTooLarge);

    let mut c = daemon.connect();
    c.send(&ClientMessage::Hello(ClientHello {
        proto_version: 999,
        app: "future".into(),
    }))
    .unwrap();
    c.expect_error_and_close(ErrorCode::UnsupportedVersion);

    let mut c = daemon.connect();
    c.send_request(Op::Status).unwrap();
    c.expect_error_and_close(ErrorCode::HelloRequired);

    let mut c = daemon.client("twice");
    c.send(&ClientMessage::Hello(ClientHello {
        proto_version: muxd_ipc_proto::PROTO_VERSION,
        app: "twice".into(),
    }))
    .unwrap();
    c.expect_error_and_close(ErrorCode::HelloRequired);

    let mut c = daemon.connect();
    c.send_raw(&[0, 0, 0, 2, b'{', b'{']).unwrap();
    c.expect_error_and_close(ErrorCode::MalformedFrame);

    // An unknown op fails alone; the connection stays usable.
    let mut c = daemon.client("newer");
    c.send_json(&serde_json::json!({"type": "request", "id": 77, "op": "teleport"}))
        .unwrap();
    match c.recv().unwrap() {
        ServerMessage::Error(e) => {
            assert_eq!(
                (e.id, e.code),
                (Some(77), ErrorCode::InvalidArgument),
                "{e:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    ping(&mut c, "still usable");
}

#[test]
fn max_clients_turns_extra_clients_away_with_busy() {
    let daemon = Daemon::builder().env("MUXD_MAX_CLIENTS", "2").start();
    let mut a = daemon.client("a");
    let _b = daemon.client("b");
    let mut c = daemon.connect();
    c.expect_error_and_close(ErrorCode::Busy);
    ping(&mut a, "a still served");
}

fn muxd_output(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(muxd_bin())
        .args(args)
        .env_clear()
        .env("HOME", "/nonexistent")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn bad_config_exits_2_and_names_the_key() {
    for (toml, key) in [
        ("max_clients = 0\n", "`max_clients`"),
        (
            "client_buffer_frames = \"many\"\n",
            "`client_buffer_frames`",
        ),
        ("colour = \"blue\"\n", "`colour`"),
        ("log_format = \"xml\"\n", "`log_format`"),
        ("this is not toml", "not valid TOML"),
    ] {
        let mut d = Daemon::builder().config(toml).spawn();
        let status = d.wait_exit();
        assert_eq!(status.code(), Some(2), "{toml}: {}", d.log());
        assert!(d.log().contains(key), "{toml}: {}", d.log());
        assert!(!d.socket().exists());
    }
    // Environment and flags are checked too.
    let mut d = Daemon::builder()
        .env("MUXD_SHUTDOWN_GRACE_MS", "9999999")
        .spawn();
    assert_eq!(d.wait_exit().code(), Some(2));
    assert!(d.log().contains("`shutdown_grace_ms`"), "{}", d.log());
    let mut d = Daemon::builder().args(["--max-clients", "lots"]).spawn();
    assert_eq!(d.wait_exit().code(), Some(2));
    assert!(d.log().contains("--max-clients"), "{}", d.log());
}

#[test]
fn gen_config_round_trips() {
    let out = muxd_output(&["gen-config"], &[("XDG_RUNTIME_DIR", "/run/user/4242")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "socket",
        "log_level",
        "log_format",
        "max_clients",
        "client_buffer_frames",
        "shutdown_grace_ms",
        "watch_interval_ms",
    ] {
        assert!(
            text.contains(&format!("{key} = ")),
            "{key} missing:\n{text}"
        );
    }
    assert!(text.contains("/run/user/4242/muxd/muxd.sock"), "{text}");
    // The defaults, fed back as a config file, start a daemon; an edited value takes effect.
    assert!(text.contains("max_clients = 256\n"), "{text}");
    let edited = text.replace("max_clients = 256\n", "max_clients = 1\n");
    let daemon = Daemon::builder().config(edited).start();
    let _only = daemon.client("only");
    daemon.connect().expect_error_and_close(ErrorCode::Busy);
}

#[test]
fn stale_socket_file_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("muxd.sock");
    // A socket file with nobody behind it, as a crashed daemon leaves.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let daemon = Daemon::builder().socket(&path).start();
    assert!(
        daemon.log().contains("removing stale socket"),
        "{}",
        daemon.log()
    );
    ping(&mut daemon.client("fresh"), "works");
}

#[test]
fn socket_is_private() {
    let daemon = Daemon::start();
    let mode = std::fs::metadata(daemon.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
}

#[test]
fn default_socket_dir_is_created_private() {
    // No --socket: the path comes from XDG_RUNTIME_DIR, and the daemon creates its directory.
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    // The store at its default place too (`~/.local/state/muxd`), which `run` requires.
    let init = Command::new(muxd_bin())
        .arg("init")
        .env_clear()
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "muxd init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut child = Command::new(muxd_bin())
        .arg("run")
        .env_clear()
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", &runtime)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = runtime.join("muxd").join("muxd.sock");
    let deadline = std::time::Instant::now() + muxd_e2e::PATIENCE;
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(dir_mode & 0o777, 0o700, "dir mode {dir_mode:o}");
}

#[test]
fn json_logs_and_systemd_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(muxd_e2e::PATIENCE)).unwrap();
    let daemon = Daemon::builder()
        .args(["--log-format", "json"])
        .env("NOTIFY_SOCKET", &notify_path)
        .start();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Readiness comes after the bind: the socket answers now.
    ping(&mut daemon.client("json"), "ok");
    let log = daemon.log();
    let listening = log.lines().find(|l| l.contains("listening on")).unwrap();
    let line: serde_json::Value = serde_json::from_str(listening).unwrap();
    assert_eq!(line["level"], "INFO");
    for l in log.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}
