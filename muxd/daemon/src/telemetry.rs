//! Tracing setup for the `muxd` binary: one subscriber, to stderr, text or JSON.
//!
//! Lines are written by a background thread (`tracing_appender::non_blocking`, lossy): the
//! driver formats a line and hands it over without touching stderr, so a log reader that
//! stalls (a full pipe, a suspended terminal) can never stall the daemon. When the hand-over
//! buffer is full, lines are dropped rather than waited for.

use std::io::IsTerminal as _;

use muxd::LogFormat;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `filter` was checked when the config was parsed.
///
/// The returned guard flushes the lines still buffered when dropped: keep it alive for the
/// life of the process.
pub(crate) fn init(filter: &str, format: LogFormat) -> anyhow::Result<WorkerGuard> {
    let filter = EnvFilter::try_new(filter)?;
    // Colour only for a terminal: logs in files and journald must stay plain text.
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("muxd-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(guard)
}
