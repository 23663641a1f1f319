//! One shutdown handle for the whole daemon, and the OS signals that pull it.

use std::fmt;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Why the daemon is shutting down; sent to clients in `Event::ShuttingDown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// SIGINT or SIGTERM (or the embedding program's own shutdown future).
    Signal,
    /// A client sent the `shutdown` request.
    Request,
    /// The store could not commit: the daemon stops rather than answer without durability
    /// (a restart resumes from the last commit).
    StoreFailed,
}

impl ShutdownReason {
    /// The wire spelling used in `Event::ShuttingDown { reason }`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Request => "request",
            Self::StoreFailed => "store_failed",
        }
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cancelled once, by whoever asks first; remembers the first reason given.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShutdownSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<ShutdownReason>>,
}

impl ShutdownSignal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Starts shutdown. Later calls keep the first reason.
    pub(crate) fn trigger(&self, reason: ShutdownReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Completes once shutdown has started.
    pub(crate) async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    pub(crate) fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The token, for tasks that only need to notice shutdown.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The first reason given; `Signal` if shutdown has not started (callers only ask after).
    pub(crate) fn reason(&self) -> ShutdownReason {
        self.reason.get().copied().unwrap_or(ShutdownReason::Signal)
    }
}

/// Completes on the first SIGINT or SIGTERM (Ctrl-C on Windows).
///
/// If the handlers cannot be installed the future never completes: the daemon keeps running and
/// can still be stopped with the `shutdown` request. The failure is logged.
pub async fn os_signal() -> ShutdownReason {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot install the Ctrl-C handler");
            std::future::pending::<()>().await;
        }
    }
    ShutdownReason::Signal
}
