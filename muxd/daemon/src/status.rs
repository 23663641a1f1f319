//! What `status` reports about upstream connections.
//!
//! The IPC side only needs a snapshot of the upstream list. The connection pool that later
//! fills it will live next to the IPC server inside the driver; until then the daemon runs
//! with [`NoUpstreams`].

use std::fmt;

use muxd_ipc_proto::UpstreamStatus;

/// A view of the upstream connections, asked for a fresh snapshot on every status report.
pub trait UpstreamSource: fmt::Debug + Send {
    /// One entry per upstream connection, in a stable order.
    fn snapshot(&self) -> Vec<UpstreamStatus>;
}

/// No upstream connections: the daemon before the pool exists.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoUpstreams;

impl UpstreamSource for NoUpstreams {
    fn snapshot(&self) -> Vec<UpstreamStatus> {
        Vec::new()
    }
}
