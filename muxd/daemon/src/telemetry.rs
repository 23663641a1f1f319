//! Tracing setup for the `muxd` binary: one subscriber, to stderr, text or JSON.

use std::io::IsTerminal as _;

use muxd::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `filter` was checked when the config was parsed.
pub(crate) fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    // Colour only for a terminal: logs in files and journald must stay plain text.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        _ => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
