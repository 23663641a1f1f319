//! GRP session renewal, make-before-break (§6.5), with the real binaries: the daemon's
//! `[grp] renew_after_s` drill knob moves the renewal window from 23 h to seconds, so a
//! short run sees several renewals of both relay links while messages flow.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use muxd_e2e::{Daemon, GrpRelay};

use crate::smp::{create_queue, muxctl_ok, muxctl_recv, upstreams};

/// Renewal starts 2 s (to 2.04 s) after each session's handshake.
const RENEW_AFTER_S: u64 = 2;

/// Messages app B sends, one every 300 ms: the sends span several renewals.
const MESSAGES: usize = 24;

#[test]
fn messages_keep_flowing_across_renewals_and_the_link_never_goes_down() {
    let proxy = GrpRelay::start(&[]);
    let dest = GrpRelay::start(&[proxy.key()]);
    let mut daemon = Daemon::builder()
        .config(format!(
            "[grp]\nproxy = \"{}\"\nrelays = [\"{}\"]\nmax_delay_ms = 20\nrenew_after_s = {RENEW_AFTER_S}\n",
            proxy.url("grp"),
            dest.url("grp")
        ))
        .start();
    let socket = daemon.socket().to_owned();
    let q = create_queue(&socket, "app-a", dest.url("grp"), false);

    // A watcher samples the daemon's status all along: the link to relay 1 must show up in
    // every sample (no disconnect, no backoff while renewing).
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let socket = socket.clone();
        let dest_key = dest.key().to_owned();
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            let mut samples = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for u in upstreams(&socket) {
                    let server = u["server"].as_str().unwrap_or_default().to_owned();
                    if server.starts_with("grp://")
                        && server.contains(&dest_key)
                        && u["transport"] == "tcp"
                        && u["state"] != "up"
                    {
                        bad.push(u.clone());
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, bad)
        })
    };

    let expected: Vec<String> = (0..MESSAGES)
        .map(|i| format!("renewal message {i}"))
        .collect();
    let started = Instant::now();
    for body in &expected {
        muxctl_ok(&socket, "app-b", &["send", &q.uri, body]);
        std::thread::sleep(Duration::from_millis(300));
    }
    // In order and exactly once, although every session in between was renewed.
    assert_eq!(muxctl_recv(&socket, "app-a", &q, MESSAGES), expected);
    let more = muxctl_ok(
        &socket,
        "app-a",
        &["--json", "recv", &q.id, "--timeout", "1"],
    );
    assert!(more.trim().is_empty(), "a duplicate arrived: {more}");
    assert!(
        started.elapsed() > Duration::from_secs(3 * RENEW_AFTER_S),
        "the run spans several renewal windows"
    );

    stop.store(true, Ordering::Relaxed);
    let (samples, bad) = watcher.join().unwrap();
    assert!(samples > 20, "the watcher sampled the status ({samples})");
    assert!(bad.is_empty(), "the link to relay 1 was not up: {bad:#?}");

    // Relay 1 saw more than one client link from the daemon (the successors), and the old
    // sessions ended with the client's goodbye 0x00 (NORMAL), not the relay's 0x01 (age).
    assert!(dest.stat("client_links") >= 2, "{}", dest.stats());
    let log = dest.log();
    assert!(
        log.contains("Goodbye(Normal)"),
        "no goodbye 0x00 in relay 1's log:\n{log}"
    );
    assert!(!log.contains("Goodbye(SessionAge)"), "{log}");
    daemon.wait_for_log("GRP renewal done: goodbye on the old session");
    let logs = daemon.logs();
    assert!(
        !logs.contains("upstream disconnected"),
        "an upstream went down during renewals:\n{logs}"
    );
    let ups = upstreams(&socket);
    assert!(ups.iter().all(|u| u["state"] == "up"), "{ups:#?}");
}
