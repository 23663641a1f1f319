//! IPC round-trip benchmark: `ping` through a real `muxd run` versus a raw Unix-socket echo of
//! frames of the same size, so the ratio shows what the daemon (JSON, the driver hop, the
//! per-client writer) adds on top of the kernel's socket round trip.
//!
//! Run with `cargo bench -p muxd-ipc-client --bench ipc_rtt`. It builds `muxd` in the same
//! profile first; set `MUXD_BIN` to use another binary and `IPC_RTT_N` to change the count.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use muxd_ipc_client::Client;
use muxd_ipc_proto::{ClientMessage, Op, Request, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const DEFAULT_N: usize = 5000;
const WARMUP: usize = 200;
/// `n` is split over this many rounds.
const ROUNDS: usize = 5;
const SIZES: [usize; 2] = [64, 4096];

/// Kills the daemon when the benchmark ends, however it ends.
struct DaemonGuard(Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The muxd binary next to this bench executable (`target/<profile>/deps/ipc_rtt-*`), built
/// first through cargo when the bench runs under it.
fn muxd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MUXD_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
    if let Some(cargo) = std::env::var_os("CARGO") {
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "muxd",
            "--bin",
            "muxd",
            "--target-dir",
        ])
        .arg(profile_dir.parent().unwrap());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        assert!(cmd.status().unwrap().success(), "building muxd failed");
    }
    profile_dir.join("muxd")
}

fn start_daemon(dir: &Path) -> (DaemonGuard, PathBuf) {
    let socket = dir.join("muxd.sock");
    let data_dir = dir.join("state");
    // `muxd run` needs a store; a fresh one per run, in the bench's temp dir.
    let init = Command::new(muxd_bin())
        .arg("init")
        .arg("--data-dir")
        .arg(&data_dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(init.success(), "muxd init failed");
    let child = Command::new(muxd_bin())
        .arg("run")
        .arg("--socket")
        .arg(&socket)
        .arg("--data-dir")
        .arg(&data_dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("MUXD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = DaemonGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "muxd did not start listening");
        std::thread::sleep(Duration::from_millis(10));
    }
    (guard, socket)
}

/// A thread per connection that echoes every byte back (the client sends length-prefixed
/// frames and reads the same frame back).
fn start_echo(dir: &Path) -> PathBuf {
    let path = dir.join("echo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                // The client waits for the whole frame it sent, so echoing bytes as they come
                // is enough: one read and one write per chunk, the least a server can do.
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    path
}

/// The size of the `ping` request frame carrying `data_len` bytes, so the echo moves the same.
fn ping_frame_len(data_len: usize) -> usize {
    let mut out = Vec::new();
    let msg = ClientMessage::Request(Request {
        id: 1000,
        op: Op::Ping {
            data: "x".repeat(data_len),
        },
    });
    encode_frame(&msg, &mut out).unwrap();
    out.len()
}

/// `n` IPC pings of `data_len` bytes on a fresh connection.
async fn bench_ipc(daemon: &Path, data_len: usize, n: usize) -> Vec<Duration> {
    let mut c = Client::connect(daemon, "bench").await.unwrap();
    let data = "x".repeat(data_len);
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let start = Instant::now();
        let echoed = c.ping(data.clone()).await.unwrap();
        let rtt = start.elapsed();
        assert_eq!(echoed.len(), data_len);
        if i >= WARMUP {
            samples.push(rtt);
        }
    }
    samples
}

/// `n` raw echoes of a `frame_len`-byte frame on a fresh connection.
async fn bench_raw(echo: &Path, frame_len: usize, n: usize) -> Vec<Duration> {
    let mut s = UnixStream::connect(echo).await.unwrap();
    let mut frame = ((frame_len - 4) as u32).to_be_bytes().to_vec();
    frame.resize(frame_len, b'x');
    let mut back = vec![0u8; frame_len];
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let start = Instant::now();
        s.write_all(&frame).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        let rtt = start.elapsed();
        if i >= WARMUP {
            samples.push(rtt);
        }
    }
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported, so ignore args.
    let n: usize = std::env::var("IPC_RTT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_N);
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, socket) = start_daemon(dir.path());
    let echo = start_echo(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "IPC round trip, N={n} per size in {ROUNDS} rounds (each after {WARMUP} warm-up), microseconds"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "data", "frame", "ipc p50", "ipc p99", "raw p50", "raw p99", "x p50", "x p99"
    );
    for size in SIZES {
        // Alternating rounds on fresh connections, pooled: on a small shared machine one round
        // can land in a bad scheduling pattern for its whole duration, and alternating spreads
        // load drift over both paths. Not interleaved per ping: the daemon's idle workers
        // still spinning after a pong would steal the CPU from the echo thread.
        let (mut ipc, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ipc.extend(rt.block_on(bench_ipc(&socket, size, n / ROUNDS)));
            raw.extend(rt.block_on(bench_raw(&echo, ping_frame_len(size), n / ROUNDS)));
        }
        ipc.sort_unstable();
        raw.sort_unstable();
        let (i50, i99) = (percentile(&ipc, 0.50), percentile(&ipc, 0.99));
        let (r50, r99) = (percentile(&raw, 0.50), percentile(&raw, 0.99));
        println!(
            "{:>10} {:>10} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>9.2}",
            format!("{size} B"),
            format!("{} B", ping_frame_len(size)),
            us(i50),
            us(i99),
            us(r50),
            us(r99),
            us(i50) / us(r50),
            us(i99) / us(r99)
        );
    }
}
