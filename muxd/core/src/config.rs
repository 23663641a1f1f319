//! The pool's tunables.

use std::time::Duration;

use muxd_smp::connection::ConnectionConfig;
use muxd_smp::error::QUOTA_RETRY_DELAY;

/// Tunables of a [`crate::Pool`]. The defaults suit a desktop daemon.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Settings of every SMP connection (versions, timeouts, keep-alive).
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
        }
    }
}
