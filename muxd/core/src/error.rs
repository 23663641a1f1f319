//! The pool's error type: what a request failed with, classified for the daemon.

/// Why a request to the pool failed.
///
/// The variants are the classes the daemon maps to IPC error codes; the text says what
/// exactly went wrong and is meant for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The queue (or message) does not exist for this app. Another app's queue is reported
    /// the same way, so apps cannot probe each other's ids.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request itself is wrong: an unparsable address or URI, a body that is too long.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A limit of the pool was reached for this app (tracked servers, destination queues);
    /// the text names it. Retrying once the app has less going on can succeed.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The server refused the request or could not be reached.
    #[error("{server}: {reason}")]
    Upstream {
        /// The server, as [`crate::ServerKey`] prints it.
        server: String,
        /// What happened, e.g. "server identity mismatch: expected keyHash …".
        reason: String,
    },
    /// Something of the daemon's own failed (its store); not the request's fault.
    #[error("internal: {0}")]
    Internal(String),
}

impl PoolError {
    pub(crate) fn upstream(server: impl ToString, reason: impl ToString) -> Self {
        Self::Upstream {
            server: server.to_string(),
            reason: reason.to_string(),
        }
    }
}
