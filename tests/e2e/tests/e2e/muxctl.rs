//! `muxctl` against a real daemon: status, ping, watch, shutdown, and "not running".

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use muxd_e2e::{Daemon, PATIENCE, muxctl_bin};

/// A muxctl command aimed at `socket`, isolated from the caller's environment.
fn muxctl(socket: &Path) -> Command {
    let mut cmd = Command::new(muxctl_bin());
    cmd.env_remove("MUXD_SOCKET").arg("--socket").arg(socket);
    cmd
}

fn run(socket: &Path, args: &[&str]) -> Output {
    let out = muxctl(socket).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "muxctl {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Waits for a child to exit, killing it and failing after [`PATIENCE`].
fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns `muxctl watch` and forwards its stdout lines over a channel.
fn spawn_watch(socket: &Path, json: bool) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = muxctl(socket);
    if json {
        cmd.arg("--json");
    }
    let mut child = cmd
        .args(["watch", "--interval", "0.05"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn next_line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(PATIENCE)
        .expect("muxctl watch printed nothing")
}

#[test]
fn status_text_and_json() {
    let daemon = Daemon::start();
    let text = stdout(&run(daemon.socket(), &["status"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("daemon:   muxd "), "{text}");
    assert_eq!(lines[1], format!("pid:      {}", daemon.pid()), "{text}");
    assert!(lines[2].starts_with("uptime:   "), "{text}");
    assert_eq!(lines[3], "clients:  1", "{text}");
    assert_eq!(lines.last(), Some(&"no upstream connections"), "{text}");

    let json = stdout(&run(daemon.socket(), &["status", "--json"]));
    assert_eq!(json.lines().count(), 1, "one JSON object: {json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["clients", "daemon_version", "pid", "upstreams", "uptime_ms"]
    );
    assert_eq!(v["pid"], daemon.pid());
    assert_eq!(v["clients"], 1);
    assert_eq!(v["upstreams"], serde_json::json!([]));
    assert!(v["uptime_ms"].is_u64());
}

/// Parses `a/b/c/d` out of `rtt min/avg/max/mdev = a/b/c/d ms`.
fn rtt_summary(line: &str) -> [f64; 4] {
    let nums = line
        .strip_prefix("rtt min/avg/max/mdev = ")
        .and_then(|r| r.strip_suffix(" ms"))
        .unwrap_or_else(|| panic!("not a summary line: {line:?}"));
    let v: Vec<f64> = nums.split('/').map(|n| n.parse().unwrap()).collect();
    [v[0], v[1], v[2], v[3]]
}

#[test]
fn ping_prints_round_trips_and_summary() {
    let daemon = Daemon::start();
    let text = stdout(&run(
        daemon.socket(),
        &["ping", "-c", "3", "-i", "0.01", "-s", "64"],
    ));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PING muxd "), "{text}");
    assert!(
        lines[0].contains(&format!("(pid {})", daemon.pid())),
        "{text}"
    );
    assert!(lines[0].ends_with(": 64 data bytes"), "{text}");
    let mut times = Vec::new();
    for (i, line) in lines[1..4].iter().enumerate() {
        let rest = line
            .strip_prefix(&format!("seq={} time=", i + 1))
            .and_then(|r| r.strip_suffix(" ms"))
            .unwrap_or_else(|| panic!("bad reply line {line:?}"));
        let (_, frac) = rest.split_once('.').unwrap();
        assert_eq!(frac.len(), 3, "three decimals like ping(8): {line:?}");
        let t: f64 = rest.parse().unwrap();
        assert!(t > 0.0 && t < 10_000.0, "{line:?}");
        times.push(t);
    }
    assert_eq!(lines[4], "");
    assert_eq!(lines[5], "--- muxd ping statistics ---");
    assert_eq!(lines[6], "3 round trips");
    let [min, avg, max, mdev] = rtt_summary(lines[7]);
    assert_eq!(lines.len(), 8, "{text}");
    // The summary is computed from unrounded times: compare within the printed precision.
    let tmin = times.iter().copied().fold(f64::INFINITY, f64::min);
    let tmax = times.iter().copied().fold(0.0, f64::max);
    assert!((min - tmin).abs() <= 0.0011, "{min} vs {tmin}");
    assert!((max - tmax).abs() <= 0.0011, "{max} vs {tmax}");
    assert!(min <= avg && avg <= max && mdev >= 0.0, "{text}");
}

#[test]
fn ping_json_lines() {
    let daemon = Daemon::start();
    let text = stdout(&run(
        daemon.socket(),
        &["--json", "ping", "-c", "3", "-i", "0"],
    ));
    let objs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), 4, "{text}");
    for (i, o) in objs[..3].iter().enumerate() {
        assert_eq!(o["type"], "reply");
        assert_eq!(o["seq"], i as u64 + 1);
        assert!(o["time_ms"].as_f64().unwrap() > 0.0);
    }
    let s = &objs[3];
    assert_eq!(s["type"], "summary");
    assert_eq!(s["count"], 3);
    let (min, avg, max) = (
        s["min_ms"].as_f64().unwrap(),
        s["avg_ms"].as_f64().unwrap(),
        s["max_ms"].as_f64().unwrap(),
    );
    assert!(min <= avg && avg <= max && s["mdev_ms"].as_f64().unwrap() >= 0.0);
}

#[test]
fn watch_json_ends_on_muxctl_shutdown() {
    let mut daemon = Daemon::start();
    let (mut watch, rx) = spawn_watch(daemon.socket(), true);
    let first: serde_json::Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(first["event"], "status", "{first}");
    assert_eq!(first["pid"], daemon.pid());
    // With a 50 ms interval more snapshots follow.
    let second: serde_json::Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(second["event"], "status");

    let out = run(daemon.socket(), &["shutdown"]);
    assert_eq!(stdout(&out), "muxd shut down\n");
    let status = wait_child(&mut watch);
    assert!(status.success(), "watch exited with {status}");
    let rest: Vec<String> = rx.iter().collect();
    let last: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(
        last,
        serde_json::json!({"event": "shutting_down", "reason": "request"})
    );
    assert!(daemon.wait_exit().success());
}

#[test]
fn watch_text_ends_on_sigterm() {
    let mut daemon = Daemon::start();
    let (mut watch, rx) = spawn_watch(daemon.socket(), false);
    let first = next_line(&rx);
    assert!(first.starts_with("status uptime="), "{first}");
    assert!(first.contains(" clients=1 upstreams=0"), "{first}");
    daemon.terminate();
    let status = wait_child(&mut watch);
    assert!(status.success(), "watch exited with {status}");
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("shutting_down reason=signal")
    );
    daemon.wait_exit();
}

fn assert_not_running(out: &Output, socket: &Path) {
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(
        err,
        format!(
            "muxctl: muxd is not running (no socket at {s}); start it with: muxd run --socket {s}\n",
            s = socket.display()
        )
    );
}

#[test]
fn not_running_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("muxd.sock");
    for args in [
        &["status"][..],
        &["ping", "-c", "1"],
        &["watch"],
        &["shutdown"],
    ] {
        let out = muxctl(&missing).args(args).output().unwrap();
        assert_not_running(&out, &missing);
    }
    // A socket file nobody listens on (a daemon that died) counts as not running too.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let out = muxctl(&stale).arg("status").output().unwrap();
    assert_not_running(&out, &stale);
}

#[test]
fn socket_from_environment() {
    let daemon = Daemon::start();
    let out = Command::new(muxctl_bin())
        .env("MUXD_SOCKET", daemon.socket())
        .args(["--json", "status"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pid"], daemon.pid());
}
