//! Reconnect storm: 1,000 clients lose their relay at the same instant (a relay restart) and
//! come back through their own `Backoff`, in virtual time.
//!
//! The relay is down for 10 s, then accepts at most 100 handshakes per 100 ms (1,000/s); an
//! attempt it cannot take fails after one round trip (50 ms), like one that meets a
//! stopped relay. Each client runs the pool's default policy (500 ms base, ×2, 30 s cap,
//! 12 attempts) with a seeded RNG, once with the default multiplicative jitter in
//! [50%, 100%] and once without jitter. Printed: the peak number of connection attempts in
//! any 100 ms window, when the last client was back, and how many gave up (`lost`).
//!
//! Run: `cargo bench -p muxd-sim --bench reconnect_storm`

// A bench binary reports on stdout.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::Duration;

use muxd_profile_core::{Backoff, BackoffConfig, Jitter};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const CLIENTS: usize = 1000;
const RESTART: Duration = Duration::from_secs(10);
const CAPACITY_PER_WINDOW: usize = 100;
const WINDOW_MS: u128 = 100;
const RTT: Duration = Duration::from_millis(50);

/// The outcome of one storm.
#[derive(Debug)]
struct Storm {
    peak_attempts_per_window: usize,
    attempts: usize,
    all_back_after: Option<Duration>,
    last_back_after: Duration,
    lost: usize,
}

fn storm(jitter: Jitter, seed: u64) -> Storm {
    let mut config = BackoffConfig::default();
    config.jitter = jitter;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    // Next attempt time (virtual, since the restart) per client; None once back or lost.
    let mut clients: Vec<(Backoff, Option<Duration>)> = (0..CLIENTS)
        .map(|_| {
            let mut b = Backoff::new(config.clone()).expect("valid default policy");
            let first = b.next_delay(&mut rng);
            (b, first)
        })
        .collect();
    let mut attempts_per_window: BTreeMap<u128, usize> = BTreeMap::new();
    let mut accepted_per_window: BTreeMap<u128, usize> = BTreeMap::new();
    let mut attempts = 0;
    let mut back = 0;
    let mut lost = 0;
    let mut last_back = Duration::ZERO;
    // The earliest pending attempt (ties by client index: deterministic).
    while let Some((i, at)) = clients
        .iter()
        .enumerate()
        .filter_map(|(i, (_, t))| t.map(|t| (i, t)))
        .min_by_key(|&(i, t)| (t, i))
    {
        attempts += 1;
        let window = at.as_millis() / WINDOW_MS;
        *attempts_per_window.entry(window).or_default() += 1;
        let accepted = accepted_per_window.entry(window).or_default();
        let (backoff, next) = &mut clients[i];
        if at >= RESTART && *accepted < CAPACITY_PER_WINDOW {
            *accepted += 1;
            back += 1;
            last_back = last_back.max(at);
            *next = None;
            continue;
        }
        *next = backoff.next_delay(&mut rng).map(|d| at + RTT + d);
        if next.is_none() {
            lost += 1;
        }
    }
    Storm {
        peak_attempts_per_window: attempts_per_window.values().copied().max().unwrap_or(0),
        attempts,
        all_back_after: (back == CLIENTS).then_some(last_back),
        last_back_after: last_back,
        lost,
    }
}

fn main() {
    println!(
        "reconnect storm: {CLIENTS} clients, relay down {}s, then {CAPACITY_PER_WINDOW} handshakes/{WINDOW_MS}ms",
        RESTART.as_secs()
    );
    println!(
        "{:<28} {:>14} {:>9} {:>16} {:>6}",
        "policy", "peak/100ms", "attempts", "all back after", "lost"
    );
    let runs = [
        (
            "jitter [50%,100%] (default)",
            Jitter::Multiplicative { min_fraction: 0.5 },
        ),
        ("no jitter", Jitter::None),
    ];
    for (name, jitter) in runs {
        // Three seeds show the spread; the policy without jitter is the same every time.
        for seed in [1u64, 2, 3] {
            let s = storm(jitter, seed);
            let back = match s.all_back_after {
                Some(d) => format!("{:.2}s", d.as_secs_f64()),
                None => format!("never (last {:.2}s)", s.last_back_after.as_secs_f64()),
            };
            println!(
                "{:<28} {:>14} {:>9} {:>16} {:>6}",
                format!("{name} seed {seed}"),
                s.peak_attempts_per_window,
                s.attempts,
                back,
                s.lost
            );
        }
    }
}
