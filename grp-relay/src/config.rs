//! Relay configuration: a TOML file, overridden by command-line flags, plus the static key file.
//!
//! Every listener defaults to loopback: an operator exposes a relay on purpose, by writing a
//! public address into the config, never by accident. The static X25519 key is the relay's
//! identity (it is the key in every `grp://` address), so it lives in its own file created
//! with mode 0600 and is never written into the config.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use muxd_grp::cover::{COVER_MAX, COVER_MIN, CoverConfig};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why the configuration or the key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`Config`].
    #[error("{path}: {source}")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or malformed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Listener addresses, one per carrier; `None` disables that carrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// TCP (`grp://`). Every relay serves TCP because relay links use it (§4.1).
    pub tcp: Option<SocketAddr>,
    /// QUIC on UDP (`grp+quic://`).
    pub quic: Option<SocketAddr>,
    /// Plain WebSocket (`grp+ws://`).
    pub ws: Option<SocketAddr>,
    /// WebSocket over TLS (`grp+wss://`), served with `tls_cert`/`tls_key`, or with a
    /// self-signed certificate generated at start when neither is set (GRP clients do not
    /// verify it: the relay's identity is its Noise key, §4.3). Off by default.
    pub wss: Option<SocketAddr>,
    /// The WebSocket path (both `ws` and `wss`).
    pub ws_path: String,
    /// PEM certificate chain for `wss`, leaf first; requires `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `wss`; requires `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 7443))),
            quic: Some(SocketAddr::from(([127, 0, 0, 1], 7443))),
            // Port 80 needs privileges; 7480 keeps the default runnable as a normal user.
            ws: Some(SocketAddr::from(([127, 0, 0, 1], 7480))),
            // Off by default: an operator who serves TLS chooses its port and certificate.
            wss: None,
            ws_path: muxd_grp::address::DEFAULT_WS_PATH.to_owned(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Cover-traffic policy (§12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoverPolicy {
    /// Lowest rate the relay accepts, milli-records/s (clamped into [50, 2000]).
    pub min_rate: u16,
    /// Highest rate the relay accepts, milli-records/s (clamped into [50, 2000]).
    pub max_rate: u16,
    /// `max_delay` on accepted links, milliseconds; absent = the role's default
    /// (1 s on client links, 250 ms on relay links).
    pub max_delay_ms: Option<u64>,
    /// `max_delay` on the relay links this relay opens as a proxy, milliseconds.
    pub relay_link_max_delay_ms: Option<u64>,
}

impl Default for CoverPolicy {
    fn default() -> Self {
        Self {
            min_rate: COVER_MIN,
            max_rate: COVER_MAX,
            max_delay_ms: None,
            relay_link_max_delay_ms: None,
        }
    }
}

impl CoverPolicy {
    /// The operator bounds, clamped into the protocol range and ordered.
    pub fn bounds(&self) -> (u16, u16) {
        let lo = self.min_rate.clamp(COVER_MIN, COVER_MAX);
        let hi = self.max_rate.clamp(COVER_MIN, COVER_MAX);
        (lo.min(hi), lo.max(hi))
    }

    /// Scheduler parameters for accepted links (`None` = the initiator role's default).
    pub fn accepted(&self) -> Option<CoverConfig> {
        self.max_delay_ms.map(|ms| CoverConfig {
            max_delay: Duration::from_millis(ms),
            credit_max: CoverConfig::CLIENT_LINK.credit_max,
        })
    }

    /// Scheduler parameters for relay links this relay opens.
    pub fn outgoing(&self) -> Option<CoverConfig> {
        self.relay_link_max_delay_ms.map(|ms| CoverConfig {
            max_delay: Duration::from_millis(ms),
            credit_max: CoverConfig::RELAY_LINK.credit_max,
        })
    }
}

/// Resource limits (§13).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Accepted connections over all carriers; beyond it, new handshakes are refused as in
    /// §5.7 (silence, then a close).
    pub max_connections: usize,
    /// Subscribed queues per client connection (`ERR QUOTA` beyond).
    pub max_subscriptions: usize,
    /// NEW commands per minute per connection (`ERR QUOTA` beyond).
    pub new_per_minute: u32,
    /// Distinct destination relays per client connection (PRXY, `ERR QUOTA` beyond).
    pub proxy_destinations: usize,
    /// Messages stored per queue (`ERR QUOTA` beyond).
    pub queue_quota: usize,
    /// Seconds after which an undelivered message expires.
    pub message_ttl_secs: u64,
    /// Seconds after Split at which a relay link this relay opened is renewed,
    /// make-before-break (§6.5); absent = the spec's 23 h–23.5 h. Earlier values are for tests
    /// and drills; anything above 23 h is treated as 23 h.
    pub relay_link_renew_after_secs: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_subscriptions: 100_000,
            new_per_minute: 100,
            proxy_destinations: 32,
            queue_quota: 128,
            message_ttl_secs: 21 * 24 * 3600,
            relay_link_renew_after_secs: None,
        }
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the static key lives (created 0600 on first start when missing).
    pub key_file: PathBuf,
    /// Host name printed in the relay's addresses (defaults to the listen IP).
    pub public_host: Option<String>,
    /// Listeners.
    pub listen: ListenConfig,
    /// Static keys (base64url, as in addresses) of relays allowed to open relay links here.
    pub allow_relays: Vec<String>,
    /// Operator password for NEW (`basicAuth`); absent = anyone may create queues.
    pub queue_password: Option<String>,
    /// Cover traffic.
    pub cover: CoverPolicy,
    /// Limits.
    pub limits: Limits,
    /// The static key itself, for embedding the relay in tests; takes precedence over
    /// `key_file` and is never serialized.
    #[serde(skip)]
    pub static_key: Option<StaticKey>,
}

/// A relay's static private key, with a `Debug` that does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticKey(..)")
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            key_file: PathBuf::from("grp-relay.key"),
            public_host: None,
            listen: ListenConfig::default(),
            allow_relays: Vec::new(),
            queue_password: None,
            cover: CoverPolicy::default(),
            limits: Limits::default(),
            static_key: None,
        }
    }
}

impl Config {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Toml {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// The default configuration as commented TOML (`grp-relay gen-config`).
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Self::default())
            .unwrap_or_else(|e| format!("# could not render defaults: {e}\n"));
        format!(
            "# grp-relay configuration (GRP/1 reference relay).\n\
             # Listeners default to loopback; set public addresses explicitly to serve others.\n\
             # allow_relays: base64url static keys of relays that may open relay links here.\n\
             # grp+wss (off by default): under [listen], wss = \"0.0.0.0:443\" and, for a\n\
             # certificate of your own, tls_cert/tls_key = PEM file paths; without them the relay\n\
             # generates a self-signed one (GRP clients verify the relay's key, not the certificate).\n\n{body}"
        )
    }

    /// The allow-list as raw keys.
    pub fn allow_list(&self) -> Result<BTreeSet<[u8; 32]>, ConfigError> {
        self.allow_relays.iter().map(|k| parse_key(k)).collect()
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.allow_list()?;
        if self.listen.tcp.is_none() {
            return Err(ConfigError::Invalid(
                "a relay must serve TCP (relay links use it, §4.1)".into(),
            ));
        }
        let p = &self.listen.ws_path;
        let valid_path = p.starts_with('/')
            && p[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            });
        if !valid_path {
            return Err(ConfigError::Invalid(format!("bad WebSocket path {p:?}")));
        }
        match (&self.listen.tls_cert, &self.listen.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "listen.tls_cert is set but listen.tls_key is not (both or neither)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "listen.tls_key is set but listen.tls_cert is not (both or neither)".into(),
                ));
            }
            _ => {}
        }
        if self.limits.max_subscriptions < 10_000 {
            return Err(ConfigError::Invalid(
                "max_subscriptions must be at least 10000 (§9.5)".into(),
            ));
        }
        Ok(())
    }

    /// The static key: the embedded one, or the key file (created when missing).
    pub fn load_static_key(&self) -> Result<Zeroizing<[u8; 32]>, ConfigError> {
        match &self.static_key {
            Some(k) => Ok(k.0.clone()),
            None => load_or_create_key(&self.key_file).map(|(k, _)| k),
        }
    }
}

/// Parses a base64url static key as it appears in addresses.
pub fn parse_key(text: &str) -> Result<[u8; 32], ConfigError> {
    URL_SAFE
        .decode(text.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .filter(|k| *k != [0u8; 32])
        .ok_or_else(|| ConfigError::Invalid(format!("bad relay key {text:?}")))
}

/// Reads the key file (base64url of the 32-byte private key), or creates it with mode 0600.
/// Returns the key and whether it was created.
pub fn load_or_create_key(path: &Path) -> Result<(Zeroizing<[u8; 32]>, bool), ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let raw = Zeroizing::new(text);
            let key = parse_key(&raw)
                .map_err(|_| ConfigError::Invalid(format!("{}: not a key file", path.display())))?;
            Ok((Zeroizing::new(key), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = Zeroizing::new([0u8; 32]);
            OsRng.fill_bytes(key.as_mut());
            let text = Zeroizing::new(format!("{}\n", URL_SAFE.encode(key.as_slice())));
            write_private(path, text.as_bytes()).map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // create_new: never overwrite an identity that appeared in the meantime.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_round_trip() {
        let c = Config::default();
        for a in [c.listen.tcp, c.listen.quic, c.listen.ws]
            .into_iter()
            .flatten()
        {
            assert!(a.ip().is_loopback(), "{a}");
        }
        let text = Config::default_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        c.validate().unwrap();
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let (k1, created) = load_or_create_key(&path).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (k2, created) = load_or_create_key(&path).unwrap();
        assert!(!created);
        assert_eq!(*k1, *k2);
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create_key(&path).is_err());
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut c = Config::default();
        c.allow_relays.push("nope".into());
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.ws_path = "/".into();
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.tcp = None;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.wss = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.validate().unwrap();
        c.listen.tls_cert = Some("cert.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("listen.tls_key"), "{e}");
        c.listen.tls_cert = None;
        c.listen.tls_key = Some("key.pem".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("listen.tls_cert"), "{e}");
        c.listen.tls_cert = Some("cert.pem".into());
        c.validate().unwrap();
        let bounds = CoverPolicy {
            min_rate: 5000,
            max_rate: 10,
            ..CoverPolicy::default()
        }
        .bounds();
        assert_eq!(bounds, (COVER_MIN, COVER_MAX));
    }
}
