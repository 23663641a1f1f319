//! The pool's tunables.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use muxd_profile_core::BackoffConfig;
use muxd_profile_core::LagHistory;
use muxd_smp::connection::ConnectionConfig;
use muxd_smp::error::QUOTA_RETRY_DELAY;

/// Tunables of a [`crate::Pool`]. The defaults suit a desktop daemon.
///
/// `Debug` hides server passwords in [`Self::server_policies`] keys.
#[derive(Clone)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Settings of every SMP connection (versions, timeouts). Its keep-alive
    /// (`ping_interval`) is switched off: the pool runs its own, see [`ServerPolicy`].
    pub connection: ConnectionConfig,
    /// How long the transport may take to connect (TCP + TLS) before the waiting requests
    /// fail. The SMP handshake after it has its own timeout in [`Self::connection`].
    pub connect_timeout: Duration,
    /// Messages to send that one app may have waiting for one server or in flight to it.
    /// Beyond it the app's sends to that server fail at once instead of piling up out of
    /// sight; other apps keep their own budget, so one app's backlog cannot block another.
    pub max_pending_per_server: usize,
    /// Queue creations and deletions that one app may have waiting for one server or in
    /// flight to it; a budget separate from [`Self::max_pending_per_server`] so a backlog of
    /// messages does not block queue management, nor the other way round.
    pub max_pending_requests_per_server: usize,
    /// Received messages one queue may hold until its app acknowledges them. At the limit
    /// the pool keeps the message that reached it but holds back its `ACK` to the server,
    /// which then delivers nothing more on that queue: further messages wait on the server,
    /// whose own quota makes senders retry (`ERR QUOTA`). Nothing is lost; the held `ACK`
    /// goes out once the app acknowledges below the limit.
    pub max_waiting_per_queue: usize,
    /// Bytes of received message bodies one queue may hold; like
    /// [`Self::max_waiting_per_queue`] (the message that crosses it is kept, so a queue
    /// holds at most this plus one message).
    pub max_waiting_bytes_per_queue: usize,
    /// Received messages one app may hold over all its queues; at the limit every queue of
    /// the app holds back its next `ACK`, as with [`Self::max_waiting_per_queue`].
    pub max_waiting_per_app: usize,
    /// Bytes of received message bodies one app may hold over all its queues.
    pub max_waiting_bytes_per_app: usize,
    /// Upstream servers the pool keeps track of. Servers with nothing to do are forgotten
    /// after [`Self::server_linger`], or at once when a new server needs the room; when
    /// every tracked server is busy, requests naming a new server fail at once.
    pub max_servers: usize,
    /// How long a server with nothing left to do (no queues, no messages to send, no
    /// requests, no lag watch) stays in the status list, and remembers that it was lost,
    /// before the pool forgets it.
    pub server_linger: Duration,
    /// Destination queues one app may be sending to at once (each keeps sender keys and an
    /// outbox). Entries are dropped once their outbox is empty unless the queue was secured
    /// with their key; beyond the limit the app's sends to new queues fail at once.
    pub max_senders_per_app: usize,
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
    /// GRP/1: which relay proxies sends to GRP destinations, and known relays.
    pub grp: crate::GrpConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connection: ConnectionConfig::default(),
            connect_timeout: Duration::from_secs(45),
            max_pending_per_server: 4096,
            max_pending_requests_per_server: 256,
            // 1024 messages of at most ~16 KiB each: the byte limit only bites on large ones.
            max_waiting_per_queue: 1024,
            max_waiting_bytes_per_queue: 16 << 20,
            max_waiting_per_app: 16 * 1024,
            max_waiting_bytes_per_app: 64 << 20,
            max_servers: 1024,
            server_linger: Duration::from_secs(600),
            max_senders_per_app: 10_000,
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
            grp: crate::GrpConfig::default(),
        }
    }
}

impl fmt::Debug for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let policies: BTreeMap<String, &ServerPolicy> = self
            .server_policies
            .iter()
            .map(|(address, p)| (redact_address(address), p))
            .collect();
        f.debug_struct("PoolConfig")
            .field("connection", &self.connection)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_pending_per_server", &self.max_pending_per_server)
            .field(
                "max_pending_requests_per_server",
                &self.max_pending_requests_per_server,
            )
            .field("max_waiting_per_queue", &self.max_waiting_per_queue)
            .field(
                "max_waiting_bytes_per_queue",
                &self.max_waiting_bytes_per_queue,
            )
            .field("max_waiting_per_app", &self.max_waiting_per_app)
            .field("max_waiting_bytes_per_app", &self.max_waiting_bytes_per_app)
            .field("max_servers", &self.max_servers)
            .field("server_linger", &self.server_linger)
            .field("max_senders_per_app", &self.max_senders_per_app)
            .field("send_window", &self.send_window)
            .field("auth_retry_delay", &self.auth_retry_delay)
            .field("max_auth_retries", &self.max_auth_retries)
            .field("quota_retry_delay", &self.quota_retry_delay)
            .field("send_timeout", &self.send_timeout)
            .field("policy", &self.policy)
            .field("server_policies", &policies)
            .finish()
    }
}

/// A server address with its password (`smp://<keyHash>:<password>@host`) replaced, for
/// logs and `Debug` output.
pub(crate) fn redact_address(address: &str) -> String {
    let start = address.find("://").map_or(0, |i| i + 3);
    let Some(at) = address[start..].rfind('@').map(|i| start + i) else {
        return address.to_owned();
    };
    match address[start..at].find(':') {
        Some(colon) => format!("{}:<redacted>{}", &address[..start + colon], &address[at..]),
        None => address.to_owned(),
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
    /// reconnects). Each miss is followed at once by another PING. A PING counts as missed
    /// only when nothing at all arrived before its deadline: a server whose PONG waits
    /// behind its other answers is busy, not gone.
    pub max_missed_pongs: u32,
    /// How long a command (anything but PING) may wait for its answer, with nothing at all
    /// received meanwhile, before a PING probes the link. A link blackholed by a middlebox
    /// that still ACKs TCP is then declared dead after this plus `max_missed_pongs` PONG
    /// deadlines (30 s with the defaults) instead of after `max_command_timeouts` command
    /// timeouts. Any block received restarts the wait, and a link with no command in
    /// flight is never probed this way. `Duration::MAX` switches the probe off.
    pub stall_probe_after: Duration,
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
    /// Command timeouts in a row (no answer to any command in between) that declare the
    /// link dead: the pool disconnects and reconnects with backoff. Catches a server that
    /// still sends (so keep-alive sees traffic) but no longer reads.
    pub max_command_timeouts: u32,
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
            // Well above a healthy round trip, even over Tor, and short enough that a probe
            // plus two PONG deadlines finds a blackholed link within half a minute.
            stall_probe_after: Duration::from_secs(10),
            lag_watch_interval: Duration::from_secs(1),
            lag_history: LagHistory::DEFAULT_CAPACITY,
            idle_disconnect: Some(Duration::from_secs(60)),
            // The reference agent's `subsBatchSize`.
            resubscribe_chunk: 1350,
            max_command_timeouts: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_address("smp://abc:hunter2@relay.test:5223"),
            "smp://abc:<redacted>@relay.test:5223"
        );
        assert_eq!(
            redact_address("smp://abc@relay.test"),
            "smp://abc@relay.test"
        );
        assert_eq!(
            redact_address("smp://abc:p@ss@relay.test"),
            "smp://abc:<redacted>@relay.test"
        );
        assert_eq!(redact_address("no address"), "no address");
        let mut config = PoolConfig::default();
        config.server_policies.insert(
            "smp://abc:hunter2@relay.test".to_owned(),
            ServerPolicy::default(),
        );
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("smp://abc:<redacted>@relay.test"));
    }
}
