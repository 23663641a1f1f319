//! The pool's tunables.

use std::collections::BTreeMap;
use std::time::Duration;

use muxd_profile_core::BackoffConfig;
use muxd_profile_core::LagHistory;
use muxd_smp::connection::ConnectionConfig;
use muxd_smp::error::QUOTA_RETRY_DELAY;

/// Tunables of a [`crate::Pool`]. The defaults suit a desktop daemon.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Settings of every SMP connection (versions, timeouts). Its keep-alive
    /// (`ping_interval`) is switched off: the pool runs its own, see [`ServerPolicy`].
    pub connection: ConnectionConfig,
    /// How long the transport may take to connect (TCP + TLS) before the waiting requests
    /// fail. The SMP handshake after it has its own timeout in [`Self::connection`].
    pub connect_timeout: Duration,
    /// Requests (queue creations and deletions, messages to send) one server may hold while
    /// it is not up or still sending. Beyond it requests fail at once instead of piling up
    /// out of sight.
    pub max_pending_per_server: usize,
    /// SENDs to one queue that may be in flight together. The server processes one
    /// connection's commands in order, so pipelining keeps per-queue order.
    pub send_window: usize,
    /// Wait before re-sending after `ERR AUTH` while the recipient has not yet secured the
    /// queue (legacy flow), or after a command timeout.
    pub auth_retry_delay: Duration,
    /// How many such retries one message gets before it fails.
    pub max_auth_retries: u32,
    /// Wait before re-sending after `ERR QUOTA` (the recipient's queue is full).
    pub quota_retry_delay: Duration,
    /// How long a message may wait for its server (offline, backing off, lost) before it
    /// fails; `None` waits for ever. Being offline alone never fails a send before this.
    pub send_timeout: Option<Duration>,
    /// The lifecycle policy of every server without an entry in [`Self::server_policies`].
    pub policy: ServerPolicy,
    /// Per-server policies, keyed by server address (any form the pool accepts:
    /// with or without port or password). Looked up when the pool first meets a server.
    pub server_policies: BTreeMap<String, ServerPolicy>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connection: ConnectionConfig::default(),
            connect_timeout: Duration::from_secs(45),
            max_pending_per_server: 4096,
            send_window: 16,
            // The reference agent retries its "fast" sends after 2 s; a recipient that has not
            // secured its queue within ~2 minutes is unlikely to do so soon.
            auth_retry_delay: Duration::from_secs(2),
            max_auth_retries: 60,
            quota_retry_delay: QUOTA_RETRY_DELAY,
            // Two days: long enough to ride out a relay's maintenance or a laptop's weekend,
            // short enough that an app learns about a message that will never go.
            send_timeout: Some(Duration::from_secs(2 * 24 * 3600)),
            policy: ServerPolicy::default(),
            server_policies: BTreeMap::new(),
        }
    }
}

/// How the pool keeps one server's connection alive: reconnection, keep-alive, lag, idling.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerPolicy {
    /// Backoff while the server has never been reached (or not since its policy was reset).
    pub first_connect: BackoffConfig,
    /// Backoff after a working connection (handshake and resubscription done) was lost.
    pub reconnect: BackoffConfig,
    /// Silence (nothing received) after which a background PING goes out.
    pub ping_idle: Duration,
    /// How long a PING may wait for its PONG before it counts as missed.
    pub pong_timeout: Duration,
    /// Missed PONGs in a row that declare the link dead (the pool then disconnects and
    /// reconnects). Each miss is followed at once by another PING.
    pub max_missed_pongs: u32,
    /// PING interval of [`crate::Pool::set_lag_watch`] when the caller gives none.
    pub lag_watch_interval: Duration,
    /// Round-trip samples kept per server.
    pub lag_history: usize,
    /// A connection with no queues, nothing to send and nothing in flight is closed after
    /// this long; `None` keeps it open.
    pub idle_disconnect: Option<Duration>,
    /// SUBs sent per round when (re)subscribing; the next round starts when every SUB of
    /// the previous one has been answered.
    pub resubscribe_chunk: usize,
}

impl Default for ServerPolicy {
    fn default() -> Self {
        Self {
            first_connect: BackoffConfig::default(),
            reconnect: BackoffConfig::default(),
            // The reference agent pings after 600 s without traffic (§9).
            ping_idle: Duration::from_secs(600),
            pong_timeout: Duration::from_secs(10),
            max_missed_pongs: 2,
            lag_watch_interval: Duration::from_secs(1),
            lag_history: LagHistory::DEFAULT_CAPACITY,
            idle_disconnect: Some(Duration::from_secs(60)),
            // The reference agent's `subsBatchSize`.
            resubscribe_chunk: 1350,
        }
    }
}
