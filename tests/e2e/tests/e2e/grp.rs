//! GRP/1 end to end (issue 7): the real `muxd`, `muxctl` and two `grp-relay`s on loopback.
//! App A's queue lives on relay 1 (D); app B sends to it through relay 2 (P), over each
//! carrier. What the relays saw is read from their own counters (`--stats-file`).

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_e2e::{Daemon, GrpRelay};

use crate::smp::{create_queue, muxctl, muxctl_ok, muxctl_recv};

/// Messages app B sends per carrier.
const MESSAGES: usize = 5;

/// The daemon config: relay 2 proxies; relay 1's TCP address is known (for the queue URI
/// when the queue is created over QUIC or WebSocket); commands wait 20 ms for a cover tick.
fn daemon_for(proxy: &GrpRelay, dest: &GrpRelay, carrier: &str) -> Daemon {
    Daemon::builder()
        .config(format!(
            "[grp]\nproxy = \"{}\"\nrelays = [\"{}\"]\nmax_delay_ms = 20\n",
            proxy.url(carrier),
            dest.url("grp")
        ))
        .start()
}

fn upstreams(socket: &Path) -> Vec<serde_json::Value> {
    let out = muxctl_ok(socket, "watcher", &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["upstreams"].as_array().unwrap().clone()
}

/// The raw sender id in a `grp://…/<sndId>#/?…` queue URI.
fn sender_id(uri: &str) -> Vec<u8> {
    let after = &uri["grp://".len()..];
    let path = &after[after.find('/').unwrap() + 1..];
    let id = &path[..path.find('#').unwrap()];
    decode(id)
}

fn decode(b64: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64.trim_end_matches('='))
        .unwrap()
}

/// Waits until `f` holds (relay stats are written every 200 ms).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn two_hop(carrier: &str, transport: &str) {
    let proxy = GrpRelay::start(&[]);
    let dest = GrpRelay::start(&[proxy.key()]);
    let daemon = daemon_for(&proxy, &dest, carrier);
    let socket = daemon.socket();

    let q = create_queue(socket, "app-a", dest.url(carrier), false);
    assert!(
        q.uri.starts_with(&format!("grp://{}@", dest.key())),
        "{}",
        q.uri
    );
    let expected: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{carrier} message {i}"))
        .collect();
    for body in &expected {
        muxctl_ok(socket, "app-b", &["send", &q.uri, body]);
    }
    // In order, exactly once: the next recv finds nothing more.
    assert_eq!(muxctl_recv(socket, "app-a", &q, MESSAGES), expected);
    let more = muxctl(
        socket,
        "app-a",
        &["--json", "recv", &q.id, "--timeout", "1"],
    );
    assert!(
        String::from_utf8_lossy(&more.stdout).trim().is_empty(),
        "a duplicate arrived"
    );

    // Status: the link to relay 1 (profile, carrier, counters) and the proxied route. The
    // daemon reports record counters at most every 250 ms: wait for the latest.
    let link_of = |ups: &[serde_json::Value]| {
        ups.iter()
            .find(|u| {
                let server = u["server"].as_str().unwrap();
                server.starts_with(carrier)
                    && server.contains(dest.key())
                    && u["transport"] == transport
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {carrier} link to relay 1 in {ups:#?}"))
    };
    eventually("the link's record counters", || {
        let g = &link_of(&upstreams(socket))["grp"];
        g["real_sent"].as_u64().unwrap() >= 2 && g["real_received"].as_u64().unwrap() >= 2
    });
    let ups = upstreams(socket);
    let link = link_of(&ups);
    assert_eq!(link["profile"], "grp");
    assert_eq!(link["state"], "up");
    let g = &link["grp"];
    assert_eq!(g["cover_rate"], 200, "client-link default rate: {g}");
    assert!(
        g["real_sent"].as_u64().unwrap() >= 2,
        "NEW and ACKs went out: {g}"
    );
    assert!(g["real_received"].as_u64().unwrap() >= 2, "{g}");
    let route = ups
        .iter()
        .find(|u| u["transport"] == "proxy")
        .unwrap_or_else(|| panic!("no proxied route in {ups:#?}"));
    assert_eq!(route["profile"], "grp");
    assert!(
        route["grp"]["proxy"]
            .as_str()
            .unwrap()
            .contains(proxy.key()),
        "{route}"
    );
    let text = muxctl_ok(socket, "watcher", &["status"]);
    assert!(text.contains("via proxy"), "{text}");
    assert!(text.contains("records sent real="), "{text}");

    // What the relays saw, from their own counters.
    let snd = sender_id(&q.uri);
    let rcv = decode(&q.id);
    let sends = u64::try_from(MESSAGES).unwrap();
    eventually("the forwards in relay 1's stats", || {
        dest.stat("rfwd_received") > sends
    });
    // Relay 1: one client link (app A's recipient connection); every SKEY/SEND came over
    // the relay link from relay 2, so the sender id was never named on a client link.
    assert_eq!(dest.stat("client_links"), 1, "{}", dest.stats());
    assert!(dest.stat("relay_links_in") >= 1, "{}", dest.stats());
    let client_ids: Vec<Vec<u8>> = dest
        .stat_values("client_queue_id")
        .iter()
        .map(|s| decode(s))
        .collect();
    let relay_ids: Vec<Vec<u8>> = dest
        .stat_values("relay_queue_id")
        .iter()
        .map(|s| decode(s))
        .collect();
    assert!(client_ids.contains(&rcv), "{}", dest.stats());
    assert!(
        !client_ids.contains(&snd),
        "relay 1 saw the sender id on a client link"
    );
    assert_eq!(relay_ids, vec![snd.clone()], "{}", dest.stats());
    // Relay 2: forwarded every command but never learned a queue id.
    assert!(proxy.stat("pfwd") > sends, "{}", proxy.stats());
    assert_eq!(proxy.stat("relay_links_out"), 1, "{}", proxy.stats());
    assert_eq!(proxy.stat("client_links"), 1, "{}", proxy.stats());
    assert!(
        proxy
            .stat_values("client_queue_id")
            .iter()
            .all(|s| decode(s) != snd && decode(s) != rcv),
        "{}",
        proxy.stats()
    );
    assert!(
        proxy.stat_values("relay_queue_id").is_empty(),
        "{}",
        proxy.stats()
    );
    assert_eq!(proxy.stat("command.NEW"), 0);
    assert_eq!(proxy.stat("command.SEND"), 0);
}

#[test]
fn two_hop_over_tcp() {
    two_hop("grp", "tcp");
}

#[test]
fn two_hop_over_quic() {
    two_hop("grp+quic", "quic");
}

#[test]
fn two_hop_over_websocket() {
    two_hop("grp+ws", "ws");
}

/// WebSocket over TLS: the relays serve generated self-signed certificates, which the daemon
/// accepts because it authenticates each relay by the Noise key in its address (§4.3).
#[test]
fn two_hop_over_wss() {
    two_hop("grp+wss", "wss");
}

/// A `grp+wss` address whose port speaks no TLS (the relay's plain WebSocket port): the
/// queue creation fails promptly and status names the TLS failure, and nothing hangs.
#[test]
fn wss_to_a_plain_port_reports_the_tls_failure() {
    let relay = GrpRelay::start(&[]);
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let ws = relay.url("grp+ws");
    let wrong = ws.replacen("grp+ws://", "grp+wss://", 1);

    let t = Instant::now();
    let out = muxctl(socket, "app-a", &["queue", "create", &wrong]);
    assert!(!out.status.success());
    // The daemon gives up opening a carrier after the 30 s handshake timeout (§5.7); a
    // refused TLS handshake must be reported long before that, not waited out.
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}: it waited for a timeout instead of failing",
        t.elapsed()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");

    eventually("the failed wss upstream in status", || {
        upstreams(socket).iter().any(|u| {
            u["server"] == wrong.as_str()
                && u["transport"] == "wss"
                && u["state"] != "up"
                && u["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("grp+wss") && e.contains("TLS handshake failed"))
        })
    });
    let text = muxctl_ok(socket, "watcher", &["status"]);
    assert!(text.contains("TLS handshake failed"), "{text}");
    // The relay never saw a GRP link.
    eventually("the relay's stats", || {
        relay.stats().contains("client_links")
    });
    assert_eq!(relay.stat("client_links"), 0, "{}", relay.stats());
    assert_eq!(relay.stat("accepted_ws"), 0, "{}", relay.stats());
}

/// The proxy relay dies: the daemon reports the loss, a send made during the outage waits,
/// and once relay 2 is back (same key and ports) the daemon reconnects to it, asks it for a new
/// proxied session (PRXY), relay 2 opens a new relay link to relay 1, and the message arrives.
/// (The reference relay keeps queues in memory, so it is the proxy that restarts here: a
/// restarted destination would have forgotten app A's queue.)
#[test]
fn relay_restart_reconnects_and_queued_sends_go_through() {
    let mut proxy = GrpRelay::start(&[]);
    let dest = GrpRelay::start(&[proxy.key()]);
    let daemon = daemon_for(&proxy, &dest, "grp");
    let socket = daemon.socket();
    let q = create_queue(socket, "app-a", dest.url("grp"), false);
    muxctl_ok(socket, "app-b", &["send", &q.uri, "before"]);
    assert_eq!(muxctl_recv(socket, "app-a", &q, 1), ["before"]);

    proxy.kill();
    eventually("the daemon to notice relay 2 is gone", || {
        upstreams(socket).iter().any(|u| {
            u["server"].as_str().unwrap().contains(proxy.key())
                && u["transport"] == "tcp"
                && u["state"] != "up"
                && u["last_error"].is_string()
        })
    });
    let uri = q.uri.clone();
    let sock = socket.to_owned();
    let sender =
        std::thread::spawn(move || muxctl(&sock, "app-b", &["send", "--wait", &uri, "during"]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !sender.is_finished(),
        "the send cannot go out while relay 2 is down"
    );
    proxy.restart();
    let out = sender.join().unwrap();
    assert!(
        out.status.success(),
        "send during the outage failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(muxctl_recv(socket, "app-a", &q, 1), ["during"]);
    eventually("relay 2's new relay link", || {
        proxy.stat("relay_links_out") == 1
    });
    eventually("relay 1 saw the second relay link", || {
        dest.stat("relay_links_in") >= 2
    });
    let ups = upstreams(socket);
    assert!(ups.iter().all(|u| u["state"] == "up"), "{ups:#?}");
}

/// Without a second relay, a send to a GRP queue fails at once and says what to configure.
#[test]
fn send_without_a_proxy_names_the_config_key() {
    let dest = GrpRelay::start(&[]);
    let daemon = Daemon::start();
    let socket = daemon.socket();
    let q = create_queue(socket, "app-a", dest.url("grp"), false);
    let out = muxctl(socket, "app-b", &["send", &q.uri, "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxy") && err.contains("[grp]"), "{err}");
}
