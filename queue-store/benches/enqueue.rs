//! Durable enqueue throughput and latency: the store (redb, group commit) against SQLite doing
//! the same inserts in the same run.
//!
//! Run with `cargo bench -p muxd-queue-store --bench enqueue`. Environment:
//! `MUXD_BENCH_SECS` (seconds per case, default 3), `MUXD_BENCH_DIR` (where the database files
//! go; default the target's tmp dir, which should be on the same disk as real data would be).
//!
//! SQLite setup: WAL, `synchronous=FULL`, one connection shared by all threads behind a mutex,
//! one autocommit INSERT (so one durable commit) per message. SQLite allows one writer at a
//! time anyway; a connection per thread would only add busy-wait retries.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use muxd_queue_store::{GroupCommitter, NewOutbound, Passphrase, QueueRef, Store, Unlock};

const PAYLOAD_LEN: usize = 256;
const THREADS: [usize; 3] = [1, 8, 64];

#[derive(Debug)]
struct Outcome {
    ops: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Outcome {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `op(thread, i)` on `threads` threads until `dur` has passed; records each latency.
fn drive(
    threads: usize,
    dur: Duration,
    op: impl Fn(usize, usize) + Send + Sync + 'static,
) -> Outcome {
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let op = op.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let deadline = Instant::now() + dur;
                let mut lat = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let start = Instant::now();
                    op(t, i);
                    lat.push(start.elapsed());
                    i += 1;
                }
                lat
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = start.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Outcome {
        ops: all.len(),
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn bench_store(dir: &Path, threads: usize, dur: Duration) -> Outcome {
    let path = dir.join(format!("store-{threads}.redb"));
    let _ = std::fs::remove_file(&path);
    let store = Store::create(&path, &Unlock::Passphrase(Passphrase::new("bench".into()))).unwrap();
    let committer = Arc::new(GroupCommitter::new(Arc::new(store)));
    let c = committer.clone();
    let out = drive(threads, dur, move |t, i| {
        let msg = NewOutbound {
            queue: QueueRef::new("smp://bench", vec![t as u8]),
            app: "bench".into(),
            payload: vec![(i % 251) as u8; PAYLOAD_LEN],
            ttl_ms: None,
        };
        c.enqueue(msg, 1_700_000_000_000).unwrap();
    });
    println!(
        "    redb: {} sends in {} commits ({:.1} per commit)",
        out.ops,
        committer.batch_count(),
        out.ops as f64 / committer.batch_count().max(1) as f64
    );
    drop(committer);
    let _ = std::fs::remove_file(&path);
    out
}

fn bench_sqlite(dir: &Path, threads: usize, dur: Duration) -> Outcome {
    let path = dir.join(format!("sqlite-{threads}.db"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch(
        "CREATE TABLE outbound (
            id INTEGER PRIMARY KEY, server TEXT, queue BLOB, app TEXT, payload BLOB,
            state INTEGER, attempts INTEGER, expires_at INTEGER)",
    )
    .unwrap();
    let conn = Arc::new(Mutex::new(conn));
    let out = drive(threads, dur, move |t, i| {
        let payload = vec![(i % 251) as u8; PAYLOAD_LEN];
        let conn = conn.lock().unwrap();
        conn.prepare_cached(
            "INSERT INTO outbound (server, queue, app, payload, state, attempts, expires_at)
             VALUES (?1, ?2, ?3, ?4, 0, 0, ?5)",
        )
        .unwrap()
        .execute(rusqlite::params![
            "smp://bench",
            vec![t as u8],
            "bench",
            payload,
            1_700_604_800_000i64
        ])
        .unwrap();
    });
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported by this harness.
    let secs: u64 = std::env::var("MUXD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let dir: PathBuf = std::env::var_os("MUXD_BENCH_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir)
        .join("muxd-queue-store-bench");
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "durable enqueue, {PAYLOAD_LEN}-byte payloads, {secs} s per case, files in {}",
        dir.display()
    );
    println!(
        "sqlite: WAL, synchronous=FULL, one mutex-serialized connection, one INSERT per commit"
    );
    let mut rows = Vec::new();
    for threads in THREADS {
        println!("  {threads} sender thread(s)");
        let redb = bench_store(&dir, threads, dur);
        let sqlite = bench_sqlite(&dir, threads, dur);
        rows.push((threads, redb, sqlite));
    }
    println!();
    println!(
        "| senders | store ops/s | store p50 | store p99 | sqlite ops/s | sqlite p50 | sqlite p99 | throughput ratio (store/sqlite) | p99 ratio (store/sqlite) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (threads, r, s) in rows {
        println!(
            "| {threads} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {:.2}x |",
            r.throughput(),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            s.throughput(),
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3,
            r.throughput() / s.throughput(),
            r.p99.as_secs_f64() / s.p99.as_secs_f64(),
        );
    }
}
