//! `grp-relay`: the reference GRP/1 relay (`shared/spec/grp.md`).
//!
//! The protocol state machines live in `muxd-grp` (sans-IO). This crate is the IO shell an
//! operator runs: accept loops for the carriers (TCP, QUIC, WebSocket plain and over TLS) ([`carrier`]), one task per link that
//! drives a [`muxd_grp::relay::RelayLink`] with tokio time (`server`), the in-memory queue
//! store and the §9 command rules, and the proxy side of two-hop sending, which opens relay
//! links to destination relays with this relay's own static key ([`proxy`]).
//!
//! Tests and embedders start a relay with [`Relay::start`] and get a [`RelayHandle`]: its
//! addresses, its counters, and a graceful [`RelayHandle::shutdown`] that says goodbye on
//! every link.

pub mod carrier;
mod commands;
pub mod config;
mod proxy;
mod server;
mod shadow;
pub mod stats;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use muxd_grp::CLOSING_LINGER;
use muxd_grp::handshake::ResponderConfig;
use muxd_smp::keys::X25519SecretKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, StaticKey};
use crate::stats::{Counters, Snapshot};

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration or key file is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({carrier}): {source}")]
    Bind {
        /// The carrier.
        carrier: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The QUIC TLS setup failed.
    #[error("QUIC setup: {0}")]
    Quic(String),
    /// The `grp+wss` TLS setup failed (unreadable or mismatched certificate and key).
    #[error("wss setup: {0}")]
    Tls(String),
}

/// State shared by every task of one relay.
#[derive(Debug)]
pub(crate) struct RelayShared {
    pub(crate) config: Config,
    pub(crate) responder: Arc<ResponderConfig>,
    /// The static key as a DH key (D's side of the PFWD key, §10.4).
    pub(crate) static_secret: X25519SecretKey,
    /// The static key as raw bytes (the initiator key of our relay links, §11).
    pub(crate) static_raw: StaticKey,
    pub(crate) public_key: [u8; 32],
    pub(crate) store: store::Store,
    pub(crate) counters: Arc<Counters>,
    pub(crate) proxy: proxy::Manager,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// Accepted carriers currently open (for the connection limit).
    pub(crate) open_links: AtomicUsize,
}

/// The bound listener addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Addresses {
    /// TCP.
    pub tcp: SocketAddr,
    /// QUIC (UDP), if enabled.
    pub quic: Option<SocketAddr>,
    /// WebSocket, if enabled.
    pub ws: Option<SocketAddr>,
    /// WebSocket over TLS, if enabled.
    pub wss: Option<SocketAddr>,
}

/// The relay entry point.
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Binds every configured listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<RelayHandle, StartError> {
        config.validate()?;
        let static_raw = config.load_static_key()?;
        let static_secret = X25519SecretKey::from_bytes(*static_raw);
        let public_key = *static_secret.public_key().as_bytes();
        let mut responder = ResponderConfig::new(static_raw.clone());
        responder.cover_bounds = config.cover.bounds();
        responder.allow_list = config.allow_list()?;
        let shared = Arc::new(RelayShared {
            store: store::Store::new(
                config.limits.queue_quota,
                config.limits.max_subscriptions,
                i64::try_from(config.limits.message_ttl_secs).unwrap_or(i64::MAX / 4),
            ),
            config,
            responder: Arc::new(responder),
            static_secret,
            static_raw: StaticKey(static_raw),
            public_key,
            counters: Arc::new(Counters::default()),
            proxy: proxy::Manager::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            open_links: AtomicUsize::new(0),
        });
        let addresses = server::listen(&shared).await?;
        Ok(RelayHandle {
            addresses,
            public_key,
            shared,
        })
    }
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    addresses: Addresses,
    public_key: [u8; 32],
    shared: Arc<RelayShared>,
}

impl RelayHandle {
    /// The bound addresses (useful with port 0).
    pub fn addresses(&self) -> Addresses {
        self.addresses
    }

    /// The relay's static public key: its identity.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// The relay's addresses in `grp://` form, one per enabled carrier (§3.1).
    pub fn urls(&self) -> Vec<String> {
        let key = URL_SAFE.encode(self.public_key);
        let host = |a: SocketAddr| match &self.shared.config.public_host {
            Some(h) => h.clone(),
            None if a.is_ipv6() => format!("[{}]", a.ip()),
            None => a.ip().to_string(),
        };
        let a = self.addresses;
        let mut out = vec![format!("grp://{key}@{}:{}", host(a.tcp), a.tcp.port())];
        if let Some(q) = a.quic {
            out.push(format!("grp+quic://{key}@{}:{}", host(q), q.port()));
        }
        let path = &self.shared.config.listen.ws_path;
        let path = if path == muxd_grp::address::DEFAULT_WS_PATH {
            ""
        } else {
            path.as_str()
        };
        if let Some(w) = a.ws {
            out.push(format!("grp+ws://{key}@{}:{}{path}", host(w), w.port()));
        }
        if let Some(w) = a.wss {
            out.push(format!("grp+wss://{key}@{}:{}{path}", host(w), w.port()));
        }
        out
    }

    /// The live counters (they stay readable after [`Self::shutdown`]).
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, says goodbye (0x02 SHUTDOWN) on every accepted link and 0x00 on
    /// every relay link this relay opened, and waits for the links to close (at most the
    /// closing linger plus a margin).
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        let wait = CLOSING_LINGER + Duration::from_secs(2);
        if tokio::time::timeout(wait, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("links still open after the closing linger; dropping them");
        }
    }
}
