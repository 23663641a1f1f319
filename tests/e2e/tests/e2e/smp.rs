//! The whole path app → muxd → SMP relay → muxd → app, with the real `muxd`, `muxctl` and
//! `smp-devrelay` binaries over real sockets.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_e2e::{Daemon, FaultProxy, RawClient, RecvError, Relay, muxctl_bin};
use muxd_ipc_proto::{Op, Reply, Response, ServerMessage};

/// Messages each app sends the other in the volume tests.
const MESSAGES: usize = 1000;

/// Requests one client keeps in flight: enough to keep the pool's send window full.
const SEND_WINDOW: usize = 64;

/// Messages a sender lets the recipient fall behind by. The relay holds at most 128 (its
/// default quota) per queue and answers more with `ERR QUOTA`, after which a sender waits
/// minutes (spec: 5 min) before trying again; real apps pace on the peer's receipts the same
/// way.
const MAX_UNREAD: usize = 100;

/// How long a whole exchange may take before the test fails (it takes seconds).
const EXCHANGE_PATIENCE: Duration = Duration::from_secs(120);

/// `muxctl --socket <daemon> --app <app> <args…>`, run to completion.
pub(crate) fn muxctl(socket: &Path, app: &str, args: &[&str]) -> Output {
    Command::new(muxctl_bin())
        .env_remove("MUXD_SOCKET")
        .env_remove("MUXD_APP")
        .arg("--socket")
        .arg(socket)
        .args(["--app", app])
        .args(args)
        .output()
        .unwrap()
}

/// Like [`muxctl`], failing the test unless it succeeds; returns stdout.
pub(crate) fn muxctl_ok(socket: &Path, app: &str, args: &[&str]) -> String {
    let out = muxctl(socket, app, args);
    assert!(
        out.status.success(),
        "muxctl --app {app} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A queue as `muxctl queue create --json` prints it.
#[derive(Debug)]
pub(crate) struct Queue {
    pub(crate) id: String,
    pub(crate) uri: String,
}

pub(crate) fn create_queue(socket: &Path, app: &str, server: &str, ws: bool) -> Queue {
    let mut args = vec!["--json", "queue", "create", server];
    if ws {
        args.push("--ws");
    }
    let out = muxctl_ok(socket, app, &args);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    Queue {
        id: v["queue_id"].as_str().unwrap().to_owned(),
        uri: v["queue_uri"].as_str().unwrap().to_owned(),
    }
}

/// `muxctl recv --count n --json`: the bodies, in order.
pub(crate) fn muxctl_recv(socket: &Path, app: &str, queue: &Queue, n: usize) -> Vec<String> {
    let out = muxctl_ok(
        socket,
        app,
        &[
            "--json",
            "recv",
            &queue.id,
            "--count",
            &n.to_string(),
            "--timeout",
            "20",
        ],
    );
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["body"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Sends `prefix-0` … `prefix-(n-1)` to `uri` as `app`, keeping [`SEND_WINDOW`] in flight and
/// at most [`MAX_UNREAD`] ahead of what the recipient has `received`. Each send is answered
/// `queued` once durable; the recipient's side checks that it arrived.
fn send_all(socket: &Path, app: &str, uri: &str, prefix: &str, n: usize, received: &AtomicUsize) {
    let mut client = RawClient::connect(socket);
    client.hello(app);
    let deadline = Instant::now() + EXCHANGE_PATIENCE;
    let mut in_flight = 0;
    let expect_sent = |client: &mut RawClient| match client.recv() {
        Ok(ServerMessage::Response(Response {
            reply: Reply::Sent { state, .. },
            ..
        })) => assert_eq!(state, "queued"),
        other => panic!("{app}: expected `queued`, got {other:?}"),
    };
    for i in 0..n {
        loop {
            let ahead = i.saturating_sub(received.load(Ordering::Acquire));
            if in_flight >= SEND_WINDOW || (ahead >= MAX_UNREAD && in_flight > 0) {
                expect_sent(&mut client);
                in_flight -= 1;
            } else if ahead >= MAX_UNREAD {
                // The recipient stalled (or its thread failed): give up rather than hang.
                assert!(
                    Instant::now() < deadline,
                    "{app}: the recipient stopped at {i}"
                );
                std::thread::sleep(Duration::from_millis(1));
            } else {
                break;
            }
        }
        let body = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}-{i}"));
        client
            .send_request(Op::Send {
                queue_uri: uri.to_owned(),
                body_b64: body,
                wait: false,
            })
            .unwrap();
        in_flight += 1;
    }
    for _ in 0..in_flight {
        expect_sent(&mut client);
    }
}

/// Long-polls `queue` as `app` until `n` messages arrived, acknowledging each and counting
/// them in `received`; the bodies in arrival order.
fn recv_all(
    socket: &Path,
    app: &str,
    queue_id: &str,
    n: usize,
    received: &AtomicUsize,
) -> Vec<String> {
    let mut client = RawClient::connect(socket);
    client.hello(app);
    let deadline = Instant::now() + EXCHANGE_PATIENCE;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "{app}: only {} of {n} messages arrived",
            got.len()
        );
        got.extend(client.recv_and_ack(app, queue_id, 2_000));
        received.store(got.len(), Ordering::Release);
    }
    got
}

pub(crate) fn expected(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The `upstreams` of `muxctl status --json`.
pub(crate) fn upstreams(socket: &Path) -> Vec<serde_json::Value> {
    let out = muxctl_ok(socket, "muxctl", &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["upstreams"].as_array().cloned().unwrap_or_default()
}

/// Two apps, two queues, one server: a message each way through `muxctl` processes, then
/// [`MESSAGES`] each way through long-lived clients. Everything arrives exactly once, in
/// order, over one relay connection.
fn exchange(ws: bool) {
    let relay = if ws {
        Relay::builder().websocket().start()
    } else {
        Relay::start()
    };
    let server = if ws {
        relay.ws_address().unwrap().to_owned()
    } else {
        relay.address().to_owned()
    };
    let daemon = Daemon::start();
    let socket = daemon.socket();

    let alice_q = create_queue(socket, "alice", &server, ws);
    let bob_q = create_queue(socket, "bob", &server, ws);
    assert_ne!(alice_q.id, bob_q.id);
    assert!(alice_q.uri.starts_with(&server), "{alice_q:?}");

    // Queues belong to the app that created them.
    let listed = muxctl_ok(socket, "alice", &["--json", "queue", "list"]);
    assert!(
        listed.contains(&alice_q.id) && !listed.contains(&bob_q.id),
        "{listed}"
    );
    let out = muxctl(socket, "bob", &["recv", &alice_q.id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    muxctl_ok(socket, "bob", &["send", &alice_q.uri, "hello alice"]);
    muxctl_ok(socket, "alice", &["send", &bob_q.uri, "hello bob"]);
    assert_eq!(muxctl_recv(socket, "alice", &alice_q, 1), ["hello alice"]);
    assert_eq!(muxctl_recv(socket, "bob", &bob_q, 1), ["hello bob"]);

    let started = Instant::now();
    let (alice_got, bob_got) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (got_alice, got_bob) = std::thread::scope(|s| {
        s.spawn(|| send_all(socket, "bob", &alice_q.uri, "bob", MESSAGES, &alice_got));
        s.spawn(|| send_all(socket, "alice", &bob_q.uri, "alice", MESSAGES, &bob_got));
        let alice = s.spawn(|| recv_all(socket, "alice", &alice_q.id, MESSAGES, &alice_got));
        let bob = s.spawn(|| recv_all(socket, "bob", &bob_q.id, MESSAGES, &bob_got));
        (alice.join().unwrap(), bob.join().unwrap())
    });
    eprintln!(
        "{} messages over {} in {:?}",
        2 * MESSAGES,
        if ws { "websocket" } else { "tls" },
        started.elapsed()
    );
    assert_eq!(got_alice, expected("bob", MESSAGES));
    assert_eq!(got_bob, expected("alice", MESSAGES));

    // Nothing left over: every message was delivered once and acknowledged.
    for (app, q) in [("alice", &alice_q), ("bob", &bob_q)] {
        let out = muxctl_ok(socket, app, &["--json", "recv", &q.id]);
        assert!(out.trim().is_empty(), "{app} has leftovers: {out}");
    }

    let ups = upstreams(socket);
    assert_eq!(ups.len(), 1, "{ups:?}");
    assert_eq!(ups[0]["state"], "up");
    assert_eq!(ups[0]["transport"], if ws { "websocket" } else { "tls" });
    assert_eq!(ups[0]["queues"], 4, "two own queues and two destinations");
    assert_eq!(relay.sessions(), 1, "relay log:\n{}", relay.log());
    assert_eq!(relay.refused(), 0, "relay log:\n{}", relay.log());
}

#[test]
fn two_apps_exchange_a_thousand_messages_each_way_over_tls() {
    exchange(false);
}

#[test]
fn two_apps_exchange_a_thousand_messages_each_way_over_websocket() {
    exchange(true);
}

#[test]
fn wrong_key_hash_is_refused_with_a_clear_error() {
    let relay = Relay::start();
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let (_, host_port) = relay.address().split_once('@').unwrap();
    let wrong = format!("smp://{}=@{host_port}", "A".repeat(43));

    let out = muxctl(socket, "alice", &["queue", "create", &wrong]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstream") && stderr.contains("server identity mismatch"),
        "{stderr}"
    );

    let ups = upstreams(socket);
    assert_eq!(ups.len(), 1, "{ups:?}");
    assert_eq!(ups[0]["server"], wrong.as_str());
    // Retrying cannot fix an identity mismatch: the pool gives up on the server at once.
    let state = ups[0]["state"].as_str().unwrap();
    assert!(matches!(state, "lost" | "failed"), "{ups:?}");
    let err = ups[0]["last_error"].as_str().unwrap();
    assert!(err.starts_with("server identity mismatch"), "{err}");
    // The text table shows it too.
    let text = muxctl_ok(socket, "alice", &["status"]);
    assert!(text.contains("server identity mismatch"), "{text}");

    // The relay refused the TLS handshake and never saw an SMP session, so no command.
    // The relay logs the refusal as it sees the client's alert; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.refused() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(relay.refused() >= 1, "relay log:\n{}", relay.log());
    assert_eq!(relay.sessions(), 0, "relay log:\n{}", relay.log());
    // The daemon is unharmed.
    assert!(muxctl_ok(socket, "alice", &["--json", "queue", "list"]).contains("[]"));
}

#[test]
fn ed448_relay_is_accepted() {
    let relay = Relay::builder().args(["--sign-algorithm", "ed448"]).start();
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let q = create_queue(socket, "alice", relay.address(), false);
    muxctl_ok(socket, "bob", &["send", &q.uri, "over ed448"]);
    assert_eq!(muxctl_recv(socket, "alice", &q, 1), ["over ed448"]);
    assert_eq!(relay.sessions(), 1, "relay log:\n{}", relay.log());
}

/// The relay dies and comes back (same identity, store and port). The daemon survives,
/// status shows the loss with its reason, and a send made during the outage is not lost: it
/// waits while the pool backs off and reconnects by itself, and is answered `sent` once the
/// relay is back; alice's queue is subscribed again on the new connection.
#[test]
fn relay_restart_is_reported_and_a_send_during_the_outage_goes_out_after_it() {
    let mut relay = Relay::start();
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let q = create_queue(socket, "alice", relay.address(), false);
    muxctl_ok(socket, "bob", &["send", &q.uri, "before"]);
    assert_eq!(muxctl_recv(socket, "alice", &q, 1), ["before"]);

    relay.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    let up = loop {
        let ups = upstreams(socket);
        assert_eq!(ups.len(), 1, "{ups:?}");
        if ups[0]["state"] != "up" && ups[0]["last_error"].is_string() {
            break ups[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the loss was not noticed: {ups:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("after the kill: {up}");

    // During the outage: the send is accepted and waits for the server.
    let mut bob = RawClient::connect(socket);
    bob.hello("bob");
    let id = bob
        .send_request(Op::Send {
            queue_uri: q.uri.clone(),
            body_b64: base64::engine::general_purpose::STANDARD.encode("during"),
            // Answered only once the server has it: the point of this test.
            wait: true,
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let up = &upstreams(socket)[0];
    assert_ne!(up["state"], "up", "{up:?}");
    assert!(up["pending"].as_u64().unwrap() >= 1, "{up:?}");
    // The reason is the refused reconnection attempt (or the lost connection before it).
    let err = up["last_error"].as_str().unwrap();
    assert!(err.contains("connect") || err.contains("closed"), "{up:?}");

    relay.restart();
    let reply = loop {
        match bob.recv_timeout(Duration::from_secs(60)) {
            Ok(msg) if muxd_e2e::response_id(&msg) == Some(id) => break msg,
            Ok(_) => {}
            Err(e) => panic!("no answer to the send made during the outage: {e:?}"),
        }
    };
    assert!(
        matches!(
            &reply,
            ServerMessage::Response(Response {
                reply: Reply::Sent { state, .. },
                ..
            }) if state == "sent"
        ),
        "{reply:?}"
    );
    muxctl_ok(socket, "bob", &["send", &q.uri, "after"]);
    assert_eq!(muxctl_recv(socket, "alice", &q, 2), ["during", "after"]);
    let ups = upstreams(socket);
    assert_eq!(ups[0]["state"], "up", "{ups:?}");
    assert_eq!(relay.sessions(), 1, "relay log:\n{}", relay.log());
    assert!(daemon.log().contains("upstream disconnected"));
}

/// One server stops answering (a blackhole: nothing moves, nothing closes). Sends to it stay
/// unanswered, while a full exchange through another server on the same daemon goes on at
/// full speed; once the stalled server answers again its sends complete, in order.
#[test]
fn a_stalled_server_does_not_hold_up_another() {
    let fast = Relay::start();
    let slow = Relay::start();
    let (slow_key, slow_host) = slow.address().split_once('@').unwrap();
    let mut proxy = FaultProxy::start(slow_host);
    let slow_server = format!("{slow_key}@{}", proxy.addr());
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let fast_q = create_queue(socket, "alice", fast.address(), false);
    let slow_q = create_queue(socket, "alice", &slow_server, false);

    proxy.command("blackhole on");
    // Give the proxy a moment to read the command before anything is sent.
    std::thread::sleep(Duration::from_millis(200));
    let mut bob = RawClient::connect(socket);
    bob.hello("bob");
    let stalled = 20;
    for i in 0..stalled {
        bob.send_request(Op::Send {
            queue_uri: slow_q.uri.clone(),
            body_b64: base64::engine::general_purpose::STANDARD.encode(format!("slow-{i}")),
            // Answered only once the server has it, so the blackhole shows as no answer.
            wait: true,
        })
        .unwrap();
    }

    let started = Instant::now();
    let received = AtomicUsize::new(0);
    let got = std::thread::scope(|s| {
        s.spawn(|| send_all(socket, "bob", &fast_q.uri, "fast", 200, &received));
        s.spawn(|| recv_all(socket, "alice", &fast_q.id, 200, &received))
            .join()
            .unwrap()
    });
    let took = started.elapsed();
    assert_eq!(got, expected("fast", 200));
    assert!(
        took < Duration::from_secs(10),
        "the fast exchange took {took:?}"
    );
    assert!(
        matches!(
            bob.recv_timeout(Duration::from_millis(100)),
            Err(RecvError::Timeout)
        ),
        "a send through the blackhole was answered"
    );

    proxy.command("blackhole off");
    for _ in 0..stalled {
        match bob.recv_timeout(Duration::from_secs(30)) {
            Ok(ServerMessage::Response(Response {
                reply: Reply::Sent { state, .. },
                ..
            })) if state == "sent" => {}
            other => panic!("expected `sent` after the blackhole, got {other:?}"),
        }
    }
    assert_eq!(
        muxctl_recv(socket, "alice", &slow_q, stalled),
        expected("slow", stalled)
    );
}
