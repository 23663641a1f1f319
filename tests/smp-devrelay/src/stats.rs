//! Counters the tests and the demo read from a running relay.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by the accept loops and the connection tasks.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) handshakes: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) websocket: AtomicU64,
    pub(crate) open: AtomicU64,
    pub(crate) bad_blocks: AtomicU64,
    pub(crate) idle_closed: AtomicU64,
    commands: Mutex<BTreeMap<&'static str, u64>>,
}

impl Counters {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn command(&self, tag: &'static str) {
        let mut map = self
            .commands
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(tag).or_default() += 1;
    }

    pub(crate) fn snapshot(&self, subscribers: usize, queues: usize) -> RelayStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            connections_accepted: load(&self.accepted),
            handshakes_completed: load(&self.handshakes),
            handshakes_failed: load(&self.handshake_failures),
            websocket_connections: load(&self.websocket),
            open_connections: load(&self.open),
            bad_blocks: load(&self.bad_blocks),
            idle_closed: load(&self.idle_closed),
            commands: self
                .commands
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            subscribers,
            queues,
        }
    }
}

/// A snapshot of a relay's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// TCP connections accepted (TLS and WebSocket listeners together).
    pub connections_accepted: u64,
    /// SMP handshakes that completed.
    pub handshakes_completed: u64,
    /// TLS or SMP handshakes that failed (wrong keyHash, bad version, garbage, timeout).
    pub handshakes_failed: u64,
    /// Connections that came through the WebSocket listener.
    pub websocket_connections: u64,
    /// Connections currently past the SMP handshake.
    pub open_connections: u64,
    /// Blocks answered with `ERR BLOCK` (undecryptable or malformed).
    pub bad_blocks: u64,
    /// Connections closed for being idle without subscriptions.
    pub idle_closed: u64,
    /// Commands seen, by tag (`"NEW"`, `"SEND"`, …), after authorization checks passed the
    /// parser (so unauthorized commands count too).
    pub commands: BTreeMap<String, u64>,
    /// Queues that currently have a SUB subscriber.
    pub subscribers: usize,
    /// Queues that exist.
    pub queues: usize,
}

impl RelayStats {
    /// How many commands with this tag were seen.
    pub fn command_count(&self, tag: &str) -> u64 {
        self.commands.get(tag).copied().unwrap_or(0)
    }
}
