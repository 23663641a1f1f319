//! The dependency-free Python client (`clients/python/muxd_client.py`) against a real daemon:
//! the protocol needs nothing Rust-specific.

use std::path::PathBuf;
use std::process::{Command, Output};

use muxd_e2e::{Daemon, workspace_root};

fn script() -> PathBuf {
    workspace_root().join("clients/python/muxd_client.py")
}

/// `python3` with the client's directory importable. Panics if there is no python3: a skipped
/// language-neutrality check should be loud, not a silent pass.
fn python() -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", workspace_root().join("clients/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MUXD_SOCKET");
    cmd
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run python3 (is it installed?): {e}"))
}

fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn python_status() {
    let daemon = Daemon::start();
    let out = output(
        python()
            .arg(script())
            .arg("--socket")
            .arg(daemon.socket())
            .arg("status"),
    );
    let v: serde_json::Value = serde_json::from_str(ok_stdout(&out).trim()).unwrap();
    assert_eq!(v["pid"], daemon.pid());
    assert_eq!(v["clients"], 1);
    assert_eq!(v["upstreams"], serde_json::json!([]));
    assert!(v["daemon_version"].is_string());
}

#[test]
fn python_ping() {
    let daemon = Daemon::start();
    let out = output(
        python()
            .arg(script())
            .arg("--socket")
            .arg(daemon.socket())
            .args(["ping", "-c", "3"]),
    );
    let text = ok_stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (i, line) in lines.iter().enumerate() {
        let t: f64 = line
            .strip_prefix(&format!("seq={} time=", i + 1))
            .and_then(|r| r.strip_suffix(" ms"))
            .unwrap_or_else(|| panic!("bad line {line:?}"))
            .parse()
            .unwrap();
        assert!(t > 0.0);
    }
}

#[test]
fn python_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("muxd.sock");
    let out = output(
        python()
            .arg(script())
            .arg("--socket")
            .arg(&sock)
            .arg("status"),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("muxd is not running"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
}

/// The library API: watch, a request while events flow, shutdown, events until close.
#[test]
fn python_watch_events_and_shutdown() {
    let mut daemon = Daemon::start();
    let program = r#"
import json, sys
from muxd_client import MuxdClient, ProtocolError
with MuxdClient.connect(sys.argv[1], app="e2e") as c:
    assert c.request("watch", interval_ms=20)["reply"] == "watching"
    events = c.events()
    first = next(events)
    pong = c.request("ping", data="mid-watch")
    assert pong["reply"] == "pong" and pong["data"] == "mid-watch", pong
    try:
        assert c.request("shutdown")["reply"] == "shutting_down"
    except ProtocolError:
        # The daemon may close right after its shutting_down event, before the response
        # gets out; the event (checked below) must still have arrived.
        pass
    names = [first["event"]] + [e["event"] for e in events]
    print(json.dumps({"pid": c.hello["pid"], "events": names}))
"#;
    let out = output(python().arg("-c").arg(program).arg(daemon.socket()));
    let v: serde_json::Value = serde_json::from_str(ok_stdout(&out).trim()).unwrap();
    assert_eq!(v["pid"], daemon.pid());
    let names: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"status"));
    assert_eq!(names.last(), Some(&"shutting_down"), "{names:?}");
    assert!(
        names[..names.len() - 1].iter().all(|n| *n == "status"),
        "{names:?}"
    );
    assert!(daemon.wait_exit().success());
}
