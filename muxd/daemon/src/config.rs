//! Daemon configuration, parsed once at the edge.
//!
//! Sources merge as built-in defaults < TOML file < `MUXD_*` environment < command-line flags.
//! Flags and environment arrive together through clap (each flag names its variable); the file
//! is read here. Everything is checked while parsing, so the rest of the daemon only sees a
//! valid [`Config`].
//!
//! One setting is deliberately environment-only: `MUXD_PASSPHRASE`. A flag would leave the
//! passphrase in shell history and `ps` output, a file key would leave it on disk next to the
//! store it protects.

use std::ffi::OsString;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use muxd_ipc_proto::default_socket_path;
use muxd_queue_store::{DEFAULT_EXPIRY_MS, Passphrase, Unlock};
use muxd_transport::{DEFAULT_USER_TIMEOUT, KeepAlive};
use zeroize::Zeroizing;

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
// At least a second, so a unit typo (`7` meaning days, read as ms) fails loudly; at most a
// year, past which an undelivered message is better reported failed than kept.
const MESSAGE_TTL_MS_RANGE: (u64, u64) = (1_000, 365 * DAY_MS);
const DAY_MS: u64 = 86_400_000;

/// File names inside `data_dir` when `store` / `key_file` are not set.
const STORE_FILE_NAME: &str = "muxd.redb";
const KEY_FILE_NAME: &str = "muxd.key";

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
    /// The daemon's state directory (`muxd init` creates it with mode 0700). Empty when
    /// neither `XDG_STATE_HOME` nor `HOME` gives a default and none was configured; [`Config::load`]
    /// refuses that.
    pub data_dir: PathBuf,
    /// The store's database file; default `<data_dir>/muxd.redb`.
    pub store: PathBuf,
    /// The key file protecting the store's data key; default `<data_dir>/muxd.key`. Unused in
    /// passphrase mode.
    pub key_file: PathBuf,
    /// How long an outbound message may wait for its server before it fails.
    pub message_ttl: Duration,
    /// From `MUXD_PASSPHRASE`; when set, it unlocks the store instead of the key file.
    passphrase: Option<SecretPassphrase>,
    /// Whether `store` / `key_file` were set explicitly, rather than following `data_dir`.
    store_is_explicit: bool,
    key_file_is_explicit: bool,
    /// GRP/1 relays: the `[grp]` table (`grp_config.rs`).
    pub grp: crate::grp_config::GrpSettings,
}

impl Config {
    /// The built-in defaults for this environment.
    pub fn defaults(env: &Environment) -> Self {
        let mut config = Self {
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
            data_dir: default_data_dir(env).unwrap_or_default(),
            store: PathBuf::new(),
            key_file: PathBuf::new(),
            message_ttl: Duration::from_millis(DEFAULT_EXPIRY_MS),
            passphrase: None,
            store_is_explicit: false,
            key_file_is_explicit: false,
            grp: crate::grp_config::GrpSettings::default(),
        };
        config.derive_paths();
        config
    }

    /// Points `store` and `key_file` into `data_dir` unless they were set explicitly.
    fn derive_paths(&mut self) {
        // With no data directory the derived paths stay empty; `load` reports that.
        let dir = &self.data_dir;
        let in_dir = |name: &str| {
            if dir.as_os_str().is_empty() {
                PathBuf::new()
            } else {
                dir.join(name)
            }
        };
        if !self.store_is_explicit {
            self.store = in_dir(STORE_FILE_NAME);
        }
        if !self.key_file_is_explicit {
            self.key_file = in_dir(KEY_FILE_NAME);
        }
    }

    /// How the store is unlocked: the passphrase from `MUXD_PASSPHRASE` (Argon2id) if one was
    /// given, else the key file.
    pub fn unlock(&self) -> Unlock {
        match &self.passphrase {
            // A fresh copy per call: `Unlock` owns its passphrase and zeroizes it on drop.
            Some(p) => Unlock::Passphrase(Passphrase::new(p.0.as_str().to_owned())),
            None => Unlock::KeyFile(self.key_file.clone()),
        }
    }

    /// Whether the store is unlocked with a passphrase rather than the key file.
    pub fn uses_passphrase(&self) -> bool {
        self.passphrase.is_some()
    }

    /// Sets (or with `None` clears) the passphrase that unlocks the store, as `MUXD_PASSPHRASE`
    /// does; for programs that embed the daemon and for tests. An empty passphrase is refused.
    pub fn set_passphrase(&mut self, passphrase: Option<String>) -> Result<(), ConfigError> {
        self.passphrase = match passphrase {
            Some(p) => Some(SecretPassphrase::new(p)?),
            None => None,
        };
        Ok(())
    }

    /// Builds the configuration from the command line (which includes `MUXD_*` variables) and
    /// the config file it names, or the default file if that exists.
    pub fn load(args: &RunArgs, env: &Environment) -> Result<Self, ConfigError> {
        let file_layer = match &args.store_args.config {
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
        config.passphrase = env.passphrase.clone();
        config.check_paths()?;
        Ok(config)
    }

    /// The checks that need every layer applied: a data directory must be known.
    fn check_paths(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty()
            && (!self.store_is_explicit || !self.key_file_is_explicit)
        {
            return Err(ConfigError::invalid(
                "data_dir",
                "(default)",
                "neither XDG_STATE_HOME nor HOME is set; set data_dir (--data-dir, MUXD_DATA_DIR)",
            ));
        }
        Ok(())
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
        if let Some(dir) = layer.data_dir {
            if dir.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    "data_dir",
                    &origin,
                    "must not be empty",
                ));
            }
            self.data_dir = dir;
        }
        if let Some(store) = layer.store {
            if store.as_os_str().is_empty() {
                return Err(ConfigError::invalid("store", &origin, "must not be empty"));
            }
            self.store = store;
            self.store_is_explicit = true;
        }
        if let Some(key_file) = layer.key_file {
            if key_file.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    "key_file",
                    &origin,
                    "must not be empty",
                ));
            }
            self.key_file = key_file;
            self.key_file_is_explicit = true;
        }
        if let Some(ttl) = layer.message_ttl {
            let ms = parse_duration_ms(&ttl)
                .map_err(|reason| ConfigError::invalid("message_ttl", &origin, reason))?;
            let ms = in_range("message_ttl", &origin, ms, MESSAGE_TTL_MS_RANGE)?;
            self.message_ttl = Duration::from_millis(ms);
        }
        self.derive_paths();
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

/// The store passphrase while it sits in the configuration: zeroized when the last copy is
/// dropped, shared rather than copied when the `Config` is cloned, and never printed.
#[derive(Clone)]
pub struct SecretPassphrase(Arc<Zeroizing<String>>);

impl SecretPassphrase {
    /// Wraps a passphrase; refuses an empty one (an unset-looking `MUXD_PASSPHRASE=` would
    /// otherwise protect the store with nothing).
    pub fn new(passphrase: String) -> Result<Self, ConfigError> {
        let passphrase = Zeroizing::new(passphrase);
        if passphrase.is_empty() {
            return Err(ConfigError::Passphrase {
                reason: "is set but empty",
            });
        }
        Ok(Self(Arc::new(passphrase)))
    }

    /// Reads `MUXD_PASSPHRASE`: `Ok(None)` when unset.
    fn from_process() -> Result<Option<Self>, ConfigError> {
        match std::env::var_os(PASSPHRASE_VAR) {
            None => Ok(None),
            Some(value) => {
                let value = value.into_string().map_err(|mut raw| {
                    // Not kept: it may still be most of a secret.
                    raw.clear();
                    ConfigError::Passphrase {
                        reason: "is not valid UTF-8",
                    }
                })?;
                Self::new(value).map(Some)
            }
        }
    }
}

impl fmt::Debug for SecretPassphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPassphrase(<redacted>)")
    }
}

impl PartialEq for SecretPassphrase {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for SecretPassphrase {}

/// The environment variable holding the store passphrase.
pub const PASSPHRASE_VAR: &str = "MUXD_PASSPHRASE";

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
    /// `XDG_STATE_HOME`.
    pub xdg_state_home: Option<OsString>,
    /// `MUXD_PASSPHRASE` (see [`PASSPHRASE_VAR`]).
    pub passphrase: Option<SecretPassphrase>,
}

impl Environment {
    /// Reads the variables of this process. Fails only on an empty or non-UTF-8
    /// `MUXD_PASSPHRASE`.
    pub fn from_process() -> Result<Self, ConfigError> {
        Ok(Self {
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR"),
            xdg_config_home: std::env::var_os("XDG_CONFIG_HOME"),
            home: std::env::var_os("HOME"),
            tmp_dir: std::env::temp_dir(),
            euid: crate::ipc::socket::effective_uid(),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            passphrase: SecretPassphrase::from_process()?,
        })
    }
}

/// `$XDG_STATE_HOME/muxd`, else `~/.local/state/muxd`. A relative `XDG_STATE_HOME` is ignored,
/// as the XDG base directory specification requires.
pub fn default_data_dir(env: &Environment) -> Option<PathBuf> {
    let base = match &env.xdg_state_home {
        Some(dir) if Path::new(dir).is_absolute() => PathBuf::from(dir),
        _ => PathBuf::from(env.home.as_ref().filter(|h| !h.is_empty())?)
            .join(".local")
            .join("state"),
    };
    Some(base.join("muxd"))
}

/// `$XDG_CONFIG_HOME/muxd/muxd.toml`, else `~/.config/muxd/muxd.toml`.
pub fn default_config_path(env: &Environment) -> Option<PathBuf> {
    let base = match &env.xdg_config_home {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env.home.as_ref().filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(base.join("muxd").join("muxd.toml"))
}

/// Flags that say where the config file and the store are: all that `muxd init` and
/// `muxd restore` need, and part of `muxd run`'s flags.
#[derive(Clone, Debug, Default, clap::Args)]
#[deny(missing_docs)]
pub struct StoreArgs {
    /// Config file (TOML). Default: $XDG_CONFIG_HOME/muxd/muxd.toml or ~/.config/muxd/muxd.toml.
    #[arg(long, env = "MUXD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// State directory. Default: $XDG_STATE_HOME/muxd or ~/.local/state/muxd.
    #[arg(long, env = "MUXD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store's database file. Default: <data-dir>/muxd.redb.
    #[arg(long, env = "MUXD_STORE", value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// The key file that protects the store (unless MUXD_PASSPHRASE is set). Default:
    /// <data-dir>/muxd.key.
    #[arg(long, env = "MUXD_KEY_FILE", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
}

impl StoreArgs {
    /// These flags as `muxd run`'s, the others unset, for [`Config::load`].
    pub fn to_run_args(&self) -> RunArgs {
        RunArgs {
            store_args: self.clone(),
            ..RunArgs::default()
        }
    }
}

/// Flags of `muxd run`. Each has an environment fallback, so the environment layer sits
/// between the file and the flags.
#[derive(Clone, Debug, Default, clap::Args)]
#[deny(missing_docs)]
pub struct RunArgs {
    /// Config file and store location.
    #[command(flatten)]
    pub store_args: StoreArgs,
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
    /// How long an outbound message may wait for its server before it fails: e.g. `7d`,
    /// `12h`, `30m`, `90s`, or milliseconds.
    #[arg(long, env = "MUXD_MESSAGE_TTL", value_name = "DURATION")]
    pub message_ttl: Option<String>,
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
            data_dir: self.store_args.data_dir.clone(),
            store: self.store_args.store.clone(),
            key_file: self.store_args.key_file.clone(),
            message_ttl: self.message_ttl.clone(),
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
    data_dir: Option<PathBuf>,
    store: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// A duration with a unit, or milliseconds (a TOML integer arrives as its digits).
    message_ttl: Option<String>,
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
    /// `MUXD_PASSPHRASE` is unusable. The value itself is never part of the message.
    #[error("{PASSPHRASE_VAR} {reason}")]
    Passphrase {
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ConfigError {
    /// The process exit code for a configuration error: always 2.
    pub fn exit_code(&self) -> u8 {
        2
    }

    pub(crate) fn invalid(key: &'static str, origin: &str, reason: impl ToString) -> Self {
        Self::Invalid {
            key,
            origin: origin.to_owned(),
            reason: reason.to_string(),
        }
    }
}

const KNOWN_KEYS: [&str; 17] = [
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
    "data_dir",
    "store",
    "key_file",
    "message_ttl",
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

/// Parses `7d`, `12h`, `30m`, `90s`, `250ms` or bare digits (milliseconds) into milliseconds.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("`{text}` is not a duration (e.g. `7d`, `12h`, `30m`, `90s`, `250ms`)");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => DAY_MS,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// The inverse of [`parse_duration_ms`], in the largest unit that is exact.
fn format_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    for (unit, scale) in [("d", DAY_MS), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= scale && ms % scale == 0 {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
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
            "data_dir" => {
                layer.data_dir = Some(PathBuf::from(string_value("data_dir", &origin, value)?));
            }
            "store" => layer.store = Some(PathBuf::from(string_value("store", &origin, value)?)),
            "key_file" => {
                layer.key_file = Some(PathBuf::from(string_value("key_file", &origin, value)?));
            }
            "message_ttl" => {
                layer.message_ttl = Some(match value {
                    toml::Value::Integer(_) => {
                        int_value("message_ttl", &origin, value)?.to_string()
                    }
                    other => string_value("message_ttl", &origin, other)?,
                });
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
/// `socket`, `data_dir`, `store` and `key_file` are printed commented out: their defaults are
/// computed per user and machine, and a config file that pinned them would stop following
/// `XDG_RUNTIME_DIR` / `XDG_STATE_HOME`.
pub fn generate_default_toml(env: &Environment) -> String {
    let d = Config::defaults(env);
    let quoted = |p: &Path| toml::Value::String(p.display().to_string());
    let socket = quoted(&d.socket);
    let data_dir = quoted(&d.data_dir);
    let store = quoted(&d.store);
    let key_file = quoted(&d.key_file);
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

# The state directory: the store and its key file live here. `muxd init` creates it with mode
# 0700. Default $XDG_STATE_HOME/muxd, else ~/.local/state/muxd (shown as resolved for this
# user). Env MUXD_DATA_DIR, flag --data-dir.
# data_dir = {data_dir}

# The store's database file (queued and received messages, queue records with sealed keys).
# Default <data_dir>/muxd.redb. Env MUXD_STORE, flag --store.
# store = {store}

# The key file (mode 0600) that protects the store's secrets; `muxd init` creates it. Without
# it the store cannot be opened: back it up, apart from the store. Default <data_dir>/muxd.key.
# Env MUXD_KEY_FILE, flag --key-file.
# Passphrase mode instead: set MUXD_PASSPHRASE in the environment of `muxd init`, `muxd run`
# and `muxd restore` (it is never read from this file or a flag); the store is then protected
# by the passphrase through Argon2id and no key file is used.
# key_file = {key_file}

# How long an outbound message may wait for its server before it fails with a `failed` event:
# a number with a unit (d, h, m, s, ms) or plain milliseconds ({ttl_lo}..={ttl_hi}).
# Env MUXD_MESSAGE_TTL, flag --message-ttl.
message_ttl = \"{message_ttl}\"
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
        message_ttl = format_duration(d.message_ttl),
        ttl_lo = format_duration(Duration::from_millis(MESSAGE_TTL_MS_RANGE.0)),
        ttl_hi = format_duration(Duration::from_millis(MESSAGE_TTL_MS_RANGE.1)),
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
    // A table must follow every top-level key; it is all optional (docs/grp.md).
    out.push_str(
        "\n# GRP/1 relays (docs/grp.md). Sends to GRP queues always go through a proxy relay.\n\
         # [grp]\n\
         # proxy = \"grp://<key>@relay2.example:7443\"\n\
         # relays = [\"grp://<key>@relay1.example:7443\"]\n\
         # max_delay_ms = 1000\n",
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
            xdg_state_home: None,
            passphrase: None,
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
            assert!(
                text.contains(&format!("{key} = ")) || text.contains(&format!("[{key}]")),
                "{key} missing"
            );
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
            store_args: StoreArgs {
                config: Some(path),
                ..StoreArgs::default()
            },
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

    #[test]
    fn store_paths_follow_the_data_dir() {
        let d = Config::defaults(&env());
        assert_eq!(d.data_dir, PathBuf::from("/home/u/.local/state/muxd"));
        assert_eq!(
            d.store,
            PathBuf::from("/home/u/.local/state/muxd/muxd.redb")
        );
        assert_eq!(
            d.key_file,
            PathBuf::from("/home/u/.local/state/muxd/muxd.key")
        );
        assert_eq!(d.message_ttl, Duration::from_secs(7 * 86_400));
        assert!(!d.uses_passphrase());
        assert!(matches!(d.unlock(), Unlock::KeyFile(p) if p == d.key_file));

        let mut e = env();
        e.xdg_state_home = Some("/state".into());
        assert_eq!(
            Config::defaults(&e).store,
            PathBuf::from("/state/muxd/muxd.redb")
        );
        // The XDG spec says a relative value is to be ignored.
        e.xdg_state_home = Some("rel/state".into());
        assert_eq!(
            Config::defaults(&e).data_dir,
            PathBuf::from("/home/u/.local/state/muxd")
        );

        // The file moves the data dir and pins the key file; a flag moves the data dir again:
        // the store follows the last data dir, the pinned key file stays.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("muxd.toml");
        std::fs::write(&path, "data_dir = \"/a\"\nkey_file = \"/keys/k\"\n").unwrap();
        let mut args = StoreArgs {
            config: Some(path),
            ..StoreArgs::default()
        }
        .to_run_args();
        let c = Config::load(&args, &env()).unwrap();
        assert_eq!(
            (c.store.as_path(), c.key_file.as_path()),
            (Path::new("/a/muxd.redb"), Path::new("/keys/k"))
        );
        args.store_args.data_dir = Some("/b".into());
        let c = Config::load(&args, &env()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(
            (c.store.as_path(), c.key_file.as_path()),
            (Path::new("/b/muxd.redb"), Path::new("/keys/k"))
        );
        args.store_args.store = Some("/c/s.redb".into());
        assert_eq!(
            Config::load(&args, &env()).unwrap().store,
            PathBuf::from("/c/s.redb")
        );
    }

    #[test]
    fn no_home_and_no_data_dir_is_an_error() {
        let mut e = env();
        e.home = None;
        let args = RunArgs::default();
        let err = Config::load(&args, &e).unwrap_err().to_string();
        assert!(err.contains("`data_dir`"), "{err}");
        let mut args = RunArgs::default();
        args.store_args.data_dir = Some("/d".into());
        assert_eq!(
            Config::load(&args, &e).unwrap().store,
            PathBuf::from("/d/muxd.redb")
        );
    }

    #[test]
    fn message_ttl_takes_units_or_milliseconds() {
        for (text, ms) in [
            ("message_ttl = \"2d\"", 2 * DAY_MS),
            ("message_ttl = \"12h\"", 12 * 3_600_000),
            ("message_ttl = \"30m\"", 1_800_000),
            ("message_ttl = \"90s\"", 90_000),
            ("message_ttl = \"1500ms\"", 1_500),
            ("message_ttl = 60000", 60_000),
            ("message_ttl = \"60000\"", 60_000),
        ] {
            let c = Config::from_toml(text, &env()).unwrap();
            assert_eq!(c.message_ttl, Duration::from_millis(ms), "{text}");
        }
        for bad in [
            "message_ttl = \"7 days\"",
            "message_ttl = \"d\"",
            "message_ttl = \"\"",
            "message_ttl = 5",
            "message_ttl = \"366d\"",
            "message_ttl = -1",
            "message_ttl = \"99999999999999999999d\"",
            "message_ttl = true",
        ] {
            let err = Config::from_toml(bad, &env()).unwrap_err().to_string();
            assert!(err.contains("`message_ttl`"), "{bad}: {err}");
        }
        // The flag / environment layer parses the same way and names its origin.
        let args = RunArgs {
            message_ttl: Some("3h".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            Config::load(&args, &env()).unwrap().message_ttl,
            Duration::from_secs(3 * 3600)
        );
        let args = RunArgs {
            message_ttl: Some("3 weeks".into()),
            ..RunArgs::default()
        };
        let err = Config::load(&args, &env()).unwrap_err().to_string();
        assert!(
            err.contains("`message_ttl` (flag or MUXD_* environment)"),
            "{err}"
        );
        assert_eq!(format_duration(Duration::from_millis(90_000)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1500ms");
    }

    #[test]
    fn empty_paths_are_refused() {
        for key in ["data_dir", "store", "key_file"] {
            let err = Config::from_toml(&format!("{key} = \"\""), &env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
    }

    #[test]
    fn passphrase_comes_from_the_environment_and_is_never_printed() {
        let mut e = env();
        e.passphrase = Some(SecretPassphrase::new("correct horse battery".into()).unwrap());
        let c = Config::load(&RunArgs::default(), &e).unwrap();
        assert!(c.uses_passphrase());
        assert!(matches!(c.unlock(), Unlock::Passphrase(_)));
        for text in [
            format!("{c:?}"),
            format!("{e:?}"),
            format!("{:?}", c.unlock()),
        ] {
            assert!(!text.contains("horse"), "{text}");
        }
        assert!(format!("{c:?}").contains("redacted"));
        // A file cannot set it.
        let err = Config::from_toml("passphrase = \"x\"", &env()).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
        let err = SecretPassphrase::new(String::new())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "MUXD_PASSPHRASE is set but empty");
        let mut c = Config::defaults(&env());
        c.set_passphrase(Some("p".into())).unwrap();
        assert!(c.uses_passphrase());
        c.set_passphrase(None).unwrap();
        assert!(matches!(c.unlock(), Unlock::KeyFile(_)));
    }
}
