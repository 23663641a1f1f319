//! Counters an operator (and the tests) can read: connections, records, commands, forwards,
//! and which queue ids each kind of link has carried.
//!
//! The queue-id sets exist so that tests can check the two-hop property from the relay's own
//! point of view (§10.5): a proxy must never have seen a sender id, and a destination must
//! never have had a client link from the sender. They hold ids only, never content.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The carrier a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum CarrierKind {
    /// TCP.
    Tcp,
    /// QUIC (one bidirectional stream).
    Quic,
    /// WebSocket.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

/// Live counters, shared by every task of one relay.
#[derive(Debug, Default)]
pub struct Counters {
    accepted_tcp: AtomicU64,
    accepted_quic: AtomicU64,
    accepted_ws: AtomicU64,
    accepted_wss: AtomicU64,
    client_links: AtomicU64,
    relay_links_in: AtomicU64,
    relay_links_out: AtomicU64,
    relay_links_renewed: AtomicU64,
    handshake_failures: AtomicU64,
    cover_sent: AtomicU64,
    real_sent: AtomicU64,
    goodbyes_sent: AtomicU64,
    cover_received: AtomicU64,
    real_received: AtomicU64,
    pfwd: AtomicU64,
    rfwd_sent: AtomicU64,
    rfwd_received: AtomicU64,
    rres_sent: AtomicU64,
    sets: Mutex<Sets>,
}

#[derive(Debug, Default)]
struct Sets {
    commands: BTreeMap<String, u64>,
    client_queue_ids: BTreeSet<Vec<u8>>,
    relay_queue_ids: BTreeSet<Vec<u8>>,
    client_peers: Vec<SocketAddr>,
    relay_peers: Vec<SocketAddr>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Carriers accepted over TCP.
    pub accepted_tcp: u64,
    /// Carriers accepted over QUIC.
    pub accepted_quic: u64,
    /// Carriers accepted over WebSocket.
    pub accepted_ws: u64,
    /// Carriers accepted over WebSocket over TLS.
    pub accepted_wss: u64,
    /// Accepted links that completed a role-`'C'` handshake.
    pub client_links: u64,
    /// Accepted links that completed a role-`'R'` handshake (allow-listed relays).
    pub relay_links_in: u64,
    /// Relay links this relay opened as a proxy.
    pub relay_links_out: u64,
    /// Relay links this relay opened that were replaced make-before-break at their renewal
    /// time and closed with goodbye 0x00 (§6.5).
    pub relay_links_renewed: u64,
    /// Accepted carriers whose handshake failed or timed out (silently, §5.7).
    pub handshake_failures: u64,
    /// Cover records sent on accepted links.
    pub cover_sent: u64,
    /// Records carrying batches sent on accepted links.
    pub real_sent: u64,
    /// Goodbye records sent on accepted links.
    pub goodbyes_sent: u64,
    /// Cover records received on accepted links.
    pub cover_received: u64,
    /// Records carrying batches received on accepted links.
    pub real_received: u64,
    /// PFWD commands received from clients (this relay as P).
    pub pfwd: u64,
    /// RFWD commands sent to destinations (this relay as P).
    pub rfwd_sent: u64,
    /// RFWD commands received on relay links (this relay as D).
    pub rfwd_received: u64,
    /// RRES answers sent (this relay as D).
    pub rres_sent: u64,
    /// Commands by tag (inner commands of RFWD included).
    pub commands: BTreeMap<String, u64>,
    /// Queue ids named by transmissions on client links.
    pub client_queue_ids: BTreeSet<Vec<u8>>,
    /// Queue ids named by inner transmissions that arrived over relay links.
    pub relay_queue_ids: BTreeSet<Vec<u8>>,
    /// Peer addresses of established client links.
    pub client_peers: Vec<SocketAddr>,
    /// Peer addresses of established incoming relay links.
    pub relay_peers: Vec<SocketAddr>,
}

/// Which counter [`Counters::add`] increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Counter {
    /// See [`Snapshot::relay_links_out`].
    RelayLinksOut,
    /// See [`Snapshot::relay_links_renewed`].
    RelayLinksRenewed,
    /// See [`Snapshot::handshake_failures`].
    HandshakeFailures,
    /// See [`Snapshot::cover_sent`].
    CoverSent,
    /// See [`Snapshot::real_sent`].
    RealSent,
    /// See [`Snapshot::goodbyes_sent`].
    GoodbyesSent,
    /// See [`Snapshot::cover_received`].
    CoverReceived,
    /// See [`Snapshot::real_received`].
    RealReceived,
    /// See [`Snapshot::pfwd`].
    Pfwd,
    /// See [`Snapshot::rfwd_sent`].
    RfwdSent,
    /// See [`Snapshot::rfwd_received`].
    RfwdReceived,
    /// See [`Snapshot::rres_sent`].
    RresSent,
}

impl Counters {
    /// Adds `n` to one counter.
    pub fn add(&self, c: Counter, n: u64) {
        let a = match c {
            Counter::RelayLinksOut => &self.relay_links_out,
            Counter::RelayLinksRenewed => &self.relay_links_renewed,
            Counter::HandshakeFailures => &self.handshake_failures,
            Counter::CoverSent => &self.cover_sent,
            Counter::RealSent => &self.real_sent,
            Counter::GoodbyesSent => &self.goodbyes_sent,
            Counter::CoverReceived => &self.cover_received,
            Counter::RealReceived => &self.real_received,
            Counter::Pfwd => &self.pfwd,
            Counter::RfwdSent => &self.rfwd_sent,
            Counter::RfwdReceived => &self.rfwd_received,
            Counter::RresSent => &self.rres_sent,
        };
        a.fetch_add(n, Ordering::Relaxed);
    }

    /// A carrier was accepted.
    pub fn accepted(&self, kind: CarrierKind) {
        let a = match kind {
            CarrierKind::Tcp => &self.accepted_tcp,
            CarrierKind::Quic => &self.accepted_quic,
            CarrierKind::Ws => &self.accepted_ws,
            CarrierKind::Wss => &self.accepted_wss,
        };
        a.fetch_add(1, Ordering::Relaxed);
    }

    /// An accepted link finished its handshake.
    pub fn established(&self, relay_link: bool, peer: SocketAddr) {
        if relay_link {
            self.relay_links_in.fetch_add(1, Ordering::Relaxed);
            self.sets().relay_peers.push(peer);
        } else {
            self.client_links.fetch_add(1, Ordering::Relaxed);
            self.sets().client_peers.push(peer);
        }
    }

    /// A command was parsed (counted by tag).
    pub fn command(&self, tag: &str) {
        *self.sets().commands.entry(tag.to_owned()).or_default() += 1;
    }

    /// A transmission named a queue id; `relay_link` for inner transmissions of RFWD.
    pub fn queue_id(&self, relay_link: bool, id: &[u8]) {
        let mut s = self.sets();
        let set = if relay_link {
            &mut s.relay_queue_ids
        } else {
            &mut s.client_queue_ids
        };
        if !set.contains(id) {
            set.insert(id.to_vec());
        }
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = self.sets();
        Snapshot {
            accepted_tcp: get(&self.accepted_tcp),
            accepted_quic: get(&self.accepted_quic),
            accepted_ws: get(&self.accepted_ws),
            accepted_wss: get(&self.accepted_wss),
            client_links: get(&self.client_links),
            relay_links_in: get(&self.relay_links_in),
            relay_links_out: get(&self.relay_links_out),
            relay_links_renewed: get(&self.relay_links_renewed),
            handshake_failures: get(&self.handshake_failures),
            cover_sent: get(&self.cover_sent),
            real_sent: get(&self.real_sent),
            goodbyes_sent: get(&self.goodbyes_sent),
            cover_received: get(&self.cover_received),
            real_received: get(&self.real_received),
            pfwd: get(&self.pfwd),
            rfwd_sent: get(&self.rfwd_sent),
            rfwd_received: get(&self.rfwd_received),
            rres_sent: get(&self.rres_sent),
            commands: s.commands.clone(),
            client_queue_ids: s.client_queue_ids.clone(),
            relay_queue_ids: s.relay_queue_ids.clone(),
            client_peers: s.client_peers.clone(),
            relay_peers: s.relay_peers.clone(),
        }
    }

    fn sets(&self) -> MutexGuard<'_, Sets> {
        // Counters stay usable after a panicking holder: they are statistics, not state.
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
