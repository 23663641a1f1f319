//! Daemon configuration, parsed once at the edge.
//!
//! Sources merge as built-in defaults < TOML file < `MUXD_*` environment < command-line flags.
//! Flags and environment arrive together through clap (each flag names its variable); the file
//! is read here. Everything is checked while parsing, so the rest of the daemon only sees a
//! valid [`Config`].

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use muxd_ipc_proto::default_socket_path;
use muxd_transport::{DEFAULT_USER_TIMEOUT, KeepAlive};

/// Bounds on the numeric keys. They keep a typo (an extra zero) from turning into a daemon that
/// reserves gigabytes or never finishes shutting down.
const MAX_CLIENTS_RANGE: (u64, u64) = (1, 65_536);
const CLIENT_BUFFER_FRAMES_RANGE: (u64, u64) = (1, 65_536);
const SHUTDOWN_GRACE_MS_RANGE: (u64, u64) = (0, 600_000);
const WATCH_INTERVAL_MS_RANGE: (u64, u64) = (10, 86_400_000);
// The kernel counts keep-alive times in whole seconds and caps them at 32767 s.
const TCP_KEEPALIVE_IDLE_S_RANGE: (u64, u64) = (1, 32_767);
const TCP_KEEPALIVE_INTERVAL_S_RANGE: (u64, u64) = (1, 32_767);
const TCP_KEEPALIVE_PROBES_RANGE: (u64, u64) = (1, 127);
const TCP_USER_TIMEOUT_MS_RANGE: (u64, u64) = (0, 3_600_000);
// Below 100 ms the samples would only repeat the kernel's own smoothing at a cost.
const RTT_SAMPLE_INTERVAL_MS_RANGE: (u64, u64) = (100, 3_600_000);

/// Defaults, also printed by `muxd gen-config`.
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_MAX_CLIENTS: u32 = 256;
const DEFAULT_CLIENT_BUFFER_FRAMES: u32 = 128;
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 2_000;
const DEFAULT_WATCH_INTERVAL_MS: u64 = 1_000;
const DEFAULT_RTT_SAMPLE_INTERVAL_MS: u64 = 5_000;

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Path of the IPC socket.
    pub socket: PathBuf,
    /// Whether `socket` is the computed default; the daemon then owns its directory and
    /// enforces that it is private (see `ipc::socket`).
    pub socket_is_default: bool,
    /// A `tracing` filter directive such as `info` or `muxd=debug,info` (already checked).
    pub log_level: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The most IPC clients served at once.
    pub max_clients: u32,
    /// How many frames may wait for one client before it counts as a slow consumer.
    pub client_buffer_frames: u32,
    /// How long shutdown waits for clients to receive their last frames.
    pub shutdown_grace: Duration,
    /// Default longest gap between two status events for a `watch`.
    pub watch_interval: Duration,
    /// systemd's notification socket (`NOTIFY_SOCKET`), told `READY=1` once bound.
    pub notify_socket: Option<PathBuf>,
    /// TCP keep-alive on upstream sockets.
    pub tcp_keepalive: KeepAlive,
    /// `TCP_USER_TIMEOUT` on upstream sockets (Linux); `None` keeps the OS default.
    pub tcp_user_timeout: Option<Duration>,
    /// How often a connected upstream reports the kernel's RTT estimate; `None` never.
    pub rtt_sample_interval: Option<Duration>,
    /// GRP/1 relays: the `[grp]` table (`grp_config.rs`).
    pub grp: crate::grp_config::GrpSettings,
}

impl Config {
    /// The built-in defaults for this environment.
    pub fn defaults(env: &Environment) -> Self {
        Self {
            socket: default_socket_path(
                env.xdg_runtime_dir.as_deref(),
                env.tmp_dir.clone(),
                env.euid,
            ),
            socket_is_default: true,
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
            log_format: LogFormat::Text,
            max_clients: DEFAULT_MAX_CLIENTS,
            client_buffer_frames: DEFAULT_CLIENT_BUFFER_FRAMES,
            shutdown_grace: Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS),
            watch_interval: Duration::from_millis(DEFAULT_WATCH_INTERVAL_MS),
            notify_socket: None,
            tcp_keepalive: KeepAlive::default(),
            tcp_user_timeout: Some(DEFAULT_USER_TIMEOUT),
            rtt_sample_interval: Some(Duration::from_millis(DEFAULT_RTT_SAMPLE_INTERVAL_MS)),
            grp: crate::grp_config::GrpSettings::default(),
        }
    }

    /// Builds the configuration from the command line (which includes `MUXD_*` variables) and
    /// the config file it names, or the default file if that exists.
    pub fn load(args: &RunArgs, env: &Environment) -> Result<Self, ConfigError> {
        let file_layer = match &args.config {
            Some(path) => Some(read_file(path)?),
            None => match default_config_path(env) {
                Some(path) if path.exists() => Some(read_file(&path)?),
                _ => None,
            },
        };
        let mut config = Self::defaults(env);
        if let Some(layer) = file_layer {
            config.apply(layer)?;
        }
        config.apply(args.layer())?;
        config.notify_socket = args
            .notify_socket
            .clone()
            .filter(|p| !p.as_os_str().is_empty());
        Ok(config)
    }

    /// Parses a whole config file's text on top of the defaults (used by `gen-config` tests).
    pub fn from_toml(text: &str, env: &Environment) -> Result<Self, ConfigError> {
        let layer = parse_toml(text, Path::new("<inline>"))?;
        let mut config = Self::defaults(env);
        config.apply(layer)?;
        Ok(config)
    }

    /// Overrides fields with those `layer` sets, checking each value.
    fn apply(&mut self, layer: Layer) -> Result<(), ConfigError> {
        let origin = layer.origin;
        if let Some(grp) = layer.grp {
            self.grp = grp;
        }
        if let Some(socket) = layer.socket {
            if socket.as_os_str().is_empty() {
                return Err(ConfigError::invalid("socket", &origin, "must not be empty"));
            }
            self.socket = socket;
            self.socket_is_default = false;
        }
        if let Some(level) = layer.log_level {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                return Err(ConfigError::invalid("log_level", &origin, e));
            }
            self.log_level = level;
        }
        if let Some(format) = layer.log_format {
            self.log_format = LogFormat::parse(&format).ok_or_else(|| {
                ConfigError::invalid("log_format", &origin, "expected `text` or `json`")
            })?;
        }
        if let Some(n) = layer.max_clients {
            self.max_clients = in_range("max_clients", &origin, n, MAX_CLIENTS_RANGE)? as u32;
        }
        if let Some(n) = layer.client_buffer_frames {
            self.client_buffer_frames = in_range(
                "client_buffer_frames",
                &origin,
                n,
                CLIENT_BUFFER_FRAMES_RANGE,
            )? as u32;
        }
        if let Some(ms) = layer.shutdown_grace_ms {
            let ms = in_range("shutdown_grace_ms", &origin, ms, SHUTDOWN_GRACE_MS_RANGE)?;
            self.shutdown_grace = Duration::from_millis(ms);
        }
        if let Some(ms) = layer.watch_interval_ms {
            let ms = in_range("watch_interval_ms", &origin, ms, WATCH_INTERVAL_MS_RANGE)?;
            self.watch_interval = Duration::from_millis(ms);
        }
        if let Some(s) = layer.tcp_keepalive_idle_s {
            let s = in_range(
                "tcp_keepalive_idle_s",
                &origin,
                s,
                TCP_KEEPALIVE_IDLE_S_RANGE,
            )?;
            self.tcp_keepalive.idle = Duration::from_secs(s);
        }
        if let Some(s) = layer.tcp_keepalive_interval_s {
            let key = "tcp_keepalive_interval_s";
            let s = in_range(key, &origin, s, TCP_KEEPALIVE_INTERVAL_S_RANGE)?;
            self.tcp_keepalive.interval = Duration::from_secs(s);
        }
        if let Some(n) = layer.tcp_keepalive_probes {
            let key = "tcp_keepalive_probes";
            self.tcp_keepalive.retries =
                in_range(key, &origin, n, TCP_KEEPALIVE_PROBES_RANGE)? as u32;
        }
        if let Some(ms) = layer.tcp_user_timeout_ms {
            let ms = in_range(
                "tcp_user_timeout_ms",
                &origin,
                ms,
                TCP_USER_TIMEOUT_MS_RANGE,
            )?;
            self.tcp_user_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(ms) = layer.rtt_sample_interval_ms {
            self.rtt_sample_interval = if ms == 0 {
                None
            } else {
                let key = "rtt_sample_interval_ms";
                let ms = in_range(key, &origin, ms, RTT_SAMPLE_INTERVAL_MS_RANGE)?;
                Some(Duration::from_millis(ms))
            };
        }
        Ok(())
    }
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The process environment the configuration depends on, read once by `main` (tests build
/// their own).
#[derive(Clone, Debug)]
pub struct Environment {
    /// `XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<OsString>,
    /// `XDG_CONFIG_HOME`.
    pub xdg_config_home: Option<OsString>,
    /// `HOME`.
    pub home: Option<OsString>,
    /// The system temporary directory.
    pub tmp_dir: PathBuf,
    /// The effective user id.
    pub euid: u32,
}

impl Environment {
    /// Reads the variables of this process.
    pub fn from_process() -> Self {
        Self {
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR"),
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME"),
            home: std::env::var_os("HOME"),
            tmp_dir: std::env::temp_dir(),
            euid: crate::ipc::socket::effective_uid(),
        }
    }
}

/// `$XDG_CONFIG_HOME/muxd/muxd.toml`, else `~/.config/muxd/muxd.toml`.
pub fn default_config_path(env: &Environment) -> Option<PathBuf> {
    let base = match &env.xdg_config_home {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env.home.as_ref().filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(base.join("muxd").join("muxd.toml"))
}

/// Flags of `muxd run`. Each has an environment fallback, so the environment layer sits
/// between the file and the flags.
#[derive(Clone, Debug, Default, clap::Args)]
#[deny(missing_docs)]
pub struct RunArgs {
    /// Config file (TOML). Default: $XDG_CONFIG_HOME/muxd/muxd.toml or ~/.config/muxd/muxd.toml.
    #[arg(long, env = "MUXD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Path of the IPC socket.
    #[arg(long, env = "MUXD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Log filter, e.g. `info` or `muxd=debug,info`.
    #[arg(long, env = "MUXD_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format: `text` or `json`.
    #[arg(long, env = "MUXD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// The most IPC clients served at once.
    #[arg(long, env = "MUXD_MAX_CLIENTS", value_name = "N")]
    pub max_clients: Option<u64>,
    /// Frames that may wait for one client before it is disconnected as too slow.
    #[arg(long, env = "MUXD_CLIENT_BUFFER_FRAMES", value_name = "N")]
    pub client_buffer_frames: Option<u64>,
    /// How long shutdown waits for clients to receive their last frames, in milliseconds.
    #[arg(long, env = "MUXD_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Default longest gap between two status events of a `watch`, in milliseconds.
    #[arg(long, env = "MUXD_WATCH_INTERVAL_MS", value_name = "MS")]
    pub watch_interval_ms: Option<u64>,
    /// systemd readiness socket; set by systemd for `Type=notify` units.
    #[arg(long, env = "NOTIFY_SOCKET", hide = true, value_name = "PATH")]
    pub notify_socket: Option<PathBuf>,
}

impl RunArgs {
    fn layer(&self) -> Layer {
        Layer {
            origin: "(flag or MUXD_* environment)".to_owned(),
            socket: self.socket.clone(),
            log_level: self.log_level.clone(),
            log_format: self.log_format.clone(),
            max_clients: self.max_clients,
            client_buffer_frames: self.client_buffer_frames,
            shutdown_grace_ms: self.shutdown_grace_ms,
            watch_interval_ms: self.watch_interval_ms,
            ..Layer::default()
        }
    }
}

/// One source's settings, each optional; values are checked when applied.
#[derive(Debug, Default)]
struct Layer {
    /// Where the values came from, for error messages.
    origin: String,
    socket: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    max_clients: Option<u64>,
    client_buffer_frames: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    watch_interval_ms: Option<u64>,
    tcp_keepalive_idle_s: Option<u64>,
    tcp_keepalive_interval_s: Option<u64>,
    tcp_keepalive_probes: Option<u64>,
    tcp_user_timeout_ms: Option<u64>,
    rtt_sample_interval_ms: Option<u64>,
    grp: Option<crate::grp_config::GrpSettings>,
}

/// Why the configuration could not be built. The daemon exits with code 2 on any of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's description, with line and column.
        message: String,
    },
    /// The config file has a key this version does not know.
    #[error("config file {}: unknown key `{key}` (known keys: {})", path.display(), KNOWN_KEYS.join(", "))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The unknown key.
        key: String,
    },
    /// A value is of the wrong type or out of range.
    #[error("config key `{key}` {origin}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Where the value came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: &'static str, origin: &str, reason: impl ToString) -> Self {
        Self::Invalid {
            key,
            origin: origin.to_owned(),
            reason: reason.to_string(),
        }
    }
}

const KNOWN_KEYS: [&str; 13] = [
    "socket",
    "log_level",
    "log_format",
    "max_clients",
    "client_buffer_frames",
    "shutdown_grace_ms",
    "watch_interval_ms",
    "tcp_keepalive_idle_s",
    "tcp_keepalive_interval_s",
    "tcp_keepalive_probes",
    "tcp_user_timeout_ms",
    "rtt_sample_interval_ms",
    "grp",
];

fn in_range(
    key: &'static str,
    origin: &str,
    n: u64,
    (lo, hi): (u64, u64),
) -> Result<u64, ConfigError> {
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(ConfigError::invalid(
            key,
            origin,
            format!("{n} is out of range {lo}..={hi}"),
        ))
    }
}

fn read_file(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses the file key by key (rather than through a derived struct) so that every error names
/// the offending key in words, not only as a line/column.
fn parse_toml(text: &str, path: &Path) -> Result<Layer, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let origin = format!("in {}", path.display());
    let mut layer = Layer {
        origin: origin.clone(),
        ..Layer::default()
    };
    for (key, value) in table {
        match key.as_str() {
            "socket" => layer.socket = Some(PathBuf::from(string_value("socket", &origin, value)?)),
            "log_level" => layer.log_level = Some(string_value("log_level", &origin, value)?),
            "log_format" => layer.log_format = Some(string_value("log_format", &origin, value)?),
            "max_clients" => layer.max_clients = Some(int_value("max_clients", &origin, value)?),
            "client_buffer_frames" => {
                layer.client_buffer_frames =
                    Some(int_value("client_buffer_frames", &origin, value)?);
            }
            "shutdown_grace_ms" => {
                layer.shutdown_grace_ms = Some(int_value("shutdown_grace_ms", &origin, value)?);
            }
            "watch_interval_ms" => {
                layer.watch_interval_ms = Some(int_value("watch_interval_ms", &origin, value)?);
            }
            "tcp_keepalive_idle_s" => {
                layer.tcp_keepalive_idle_s =
                    Some(int_value("tcp_keepalive_idle_s", &origin, value)?);
            }
            "tcp_keepalive_interval_s" => {
                layer.tcp_keepalive_interval_s =
                    Some(int_value("tcp_keepalive_interval_s", &origin, value)?);
            }
            "tcp_keepalive_probes" => {
                layer.tcp_keepalive_probes =
                    Some(int_value("tcp_keepalive_probes", &origin, value)?);
            }
            "tcp_user_timeout_ms" => {
                layer.tcp_user_timeout_ms = Some(int_value("tcp_user_timeout_ms", &origin, value)?);
            }
            "rtt_sample_interval_ms" => {
                layer.rtt_sample_interval_ms =
                    Some(int_value("rtt_sample_interval_ms", &origin, value)?);
            }
            "grp" => layer.grp = Some(crate::grp_config::parse(value, &origin)?),
            _ => {
                return Err(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    key,
                });
            }
        }
    }
    Ok(layer)
}

fn string_value(
    key: &'static str,
    origin: &str,
    value: toml::Value,
) -> Result<String, ConfigError> {
    match value {
        toml::Value::String(s) => Ok(s),
        other => Err(ConfigError::invalid(
            key,
            origin,
            format!("expected a string, found {}", other.type_str()),
        )),
    }
}

fn int_value(key: &'static str, origin: &str, value: toml::Value) -> Result<u64, ConfigError> {
    match value {
        toml::Value::Integer(n) => u64::try_from(n)
            .map_err(|_| ConfigError::invalid(key, origin, format!("{n} is negative"))),
        other => Err(ConfigError::invalid(
            key,
            origin,
            format!("expected an integer, found {}", other.type_str()),
        )),
    }
}

/// The text `muxd gen-config` prints: every key with its default and a comment. It parses back
/// into the defaults.
///
/// `socket` is printed commented out: its default is computed per user and machine, and a
/// config file that pinned it would stop following `XDG_RUNTIME_DIR`.
pub fn generate_default_toml(env: &Environment) -> String {
    let d = Config::defaults(env);
    let socket = toml::Value::String(d.socket.display().to_string());
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "\
# muxd configuration. Every key is optional; each is shown with its default.
# Precedence: built-in defaults < this file < MUXD_* environment < command-line flags.

# Path of the local IPC socket. The default is computed: $XDG_RUNTIME_DIR/muxd/muxd.sock, or
# <tmp>/muxd-<uid>/muxd.sock when XDG_RUNTIME_DIR is unset (shown here as resolved for this
# user). Uncomment to pin it. Env MUXD_SOCKET, flag --socket.
# socket = {socket}

# Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
# \"muxd=debug,info\". Env MUXD_LOG, flag --log-level.
log_level = \"{log_level}\"

# Log line format on stderr: \"text\" or \"json\". Env MUXD_LOG_FORMAT, flag --log-format.
log_format = \"{log_format}\"

# The most IPC clients served at once ({mc_lo}..={mc_hi}); more get a `busy` error.
# Env MUXD_MAX_CLIENTS, flag --max-clients.
max_clients = {max_clients}

# Frames that may wait for one client ({cb_lo}..={cb_hi}); a client that falls this far behind
# is disconnected with `slow_consumer`. Env MUXD_CLIENT_BUFFER_FRAMES.
client_buffer_frames = {client_buffer_frames}

# How long shutdown waits for clients to receive their last frames, in milliseconds
# ({sg_lo}..={sg_hi}). Env MUXD_SHUTDOWN_GRACE_MS.
shutdown_grace_ms = {shutdown_grace_ms}

# Longest gap between two status events of a `watch` that names no interval, in milliseconds
# ({wi_lo}..={wi_hi}). Env MUXD_WATCH_INTERVAL_MS.
watch_interval_ms = {watch_interval_ms}

# Upstream sockets (file only). TCP keep-alive: seconds of silence before the first probe,
# seconds between probes, and unanswered probes before the kernel drops the connection.
tcp_keepalive_idle_s = {ka_idle}
tcp_keepalive_interval_s = {ka_interval}
tcp_keepalive_probes = {ka_probes}

# Linux TCP_USER_TIMEOUT: milliseconds sent data may stay unacknowledged before the kernel
# drops the connection ({ut_lo}..={ut_hi}; 0 keeps the OS default of ~15 minutes).
tcp_user_timeout_ms = {user_timeout_ms}

# Milliseconds between samples of the kernel's TCP round-trip estimate for the lag history
# ({rtt_lo}..={rtt_hi}, or 0 for none).
rtt_sample_interval_ms = {rtt_sample_interval_ms}
",
        log_level = d.log_level,
        log_format = d.log_format.as_str(),
        max_clients = d.max_clients,
        client_buffer_frames = d.client_buffer_frames,
        shutdown_grace_ms = d.shutdown_grace.as_millis(),
        watch_interval_ms = d.watch_interval.as_millis(),
        ka_idle = d.tcp_keepalive.idle.as_secs(),
        ka_interval = d.tcp_keepalive.interval.as_secs(),
        ka_probes = d.tcp_keepalive.retries,
        user_timeout_ms = d.tcp_user_timeout.map_or(0, |t| t.as_millis()),
        rtt_sample_interval_ms = d.rtt_sample_interval.map_or(0, |t| t.as_millis()),
        ut_lo = TCP_USER_TIMEOUT_MS_RANGE.0,
        ut_hi = TCP_USER_TIMEOUT_MS_RANGE.1,
        rtt_lo = RTT_SAMPLE_INTERVAL_MS_RANGE.0,
        rtt_hi = RTT_SAMPLE_INTERVAL_MS_RANGE.1,
        mc_lo = MAX_CLIENTS_RANGE.0,
        mc_hi = MAX_CLIENTS_RANGE.1,
        cb_lo = CLIENT_BUFFER_FRAMES_RANGE.0,
        cb_hi = CLIENT_BUFFER_FRAMES_RANGE.1,
        sg_lo = SHUTDOWN_GRACE_MS_RANGE.0,
        sg_hi = SHUTDOWN_GRACE_MS_RANGE.1,
        wi_lo = WATCH_INTERVAL_MS_RANGE.0,
        wi_hi = WATCH_INTERVAL_MS_RANGE.1,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment {
            xdg_runtime_dir: Some("/run/user/1000".into()),
            xdg_config_home: None,
            home: Some("/home/u".into()),
            tmp_dir: "/tmp".into(),
            euid: 1000,
        }
    }

    #[test]
    fn generated_config_parses_back_to_defaults() {
        let text = generate_default_toml(&env());
        assert_eq!(
            Config::from_toml(&text, &env()).unwrap(),
            Config::defaults(&env())
        );
        // Every key is mentioned.
        for key in KNOWN_KEYS {
            assert!(text.contains(&format!("{key} = ")), "{key} missing");
        }
    }

    #[test]
    fn file_then_flags_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muxd.toml");
        std::fs::write(
            &path,
            "max_clients = 5\nlog_format = \"json\"\nsocket = \"/x/s.sock\"\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path),
            max_clients: Some(7),
            ..RunArgs::default()
        };
        let c = Config::load(&args, &env()).unwrap();
        assert_eq!(c.max_clients, 7);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.socket, PathBuf::from("/x/s.sock"));
        assert!(!c.socket_is_default);
        assert_eq!(c.client_buffer_frames, DEFAULT_CLIENT_BUFFER_FRAMES);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("max_clients = 0", "max_clients"),
            ("max_clients = \"ten\"", "max_clients"),
            ("shutdown_grace_ms = -1", "shutdown_grace_ms"),
            ("log_format = \"xml\"", "log_format"),
            ("log_level = \"[[[\"", "log_level"),
            ("bogus = 1", "bogus"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, &env()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
        }
        assert!(matches!(
            Config::from_toml("x = ", &env()),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn upstream_socket_keys_take_effect() {
        let d = Config::defaults(&env());
        assert_eq!(d.tcp_keepalive.idle, Duration::from_secs(15));
        assert_eq!(d.tcp_user_timeout, Some(Duration::from_secs(30)));
        let c = Config::from_toml(
            "tcp_keepalive_idle_s = 60\ntcp_keepalive_interval_s = 10\ntcp_keepalive_probes = 5\n\
             tcp_user_timeout_ms = 0\nrtt_sample_interval_ms = 0\n",
            &env(),
        )
        .unwrap();
        assert_eq!(
            c.tcp_keepalive,
            KeepAlive {
                idle: Duration::from_secs(60),
                interval: Duration::from_secs(10),
                retries: 5
            }
        );
        assert_eq!((c.tcp_user_timeout, c.rtt_sample_interval), (None, None));
        for bad in [
            "tcp_keepalive_idle_s = 0",
            "tcp_keepalive_probes = 1000",
            "rtt_sample_interval_ms = 5",
        ] {
            let err = Config::from_toml(bad, &env()).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(&format!("`{key}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn default_config_path_follows_xdg() {
        let mut e = env();
        assert_eq!(
            default_config_path(&e),
            Some("/home/u/.config/muxd/muxd.toml".into())
        );
        e.xdg_config_home = Some("/cfg".into());
        assert_eq!(default_config_path(&e), Some("/cfg/muxd/muxd.toml".into()));
    }
}
