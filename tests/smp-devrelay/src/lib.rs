//! `smp-devrelay`: an SMP server (relay) that behaves like simplexmq's `smp-server` on the
//! wire, for muxd's tests and demo.
//!
//! It speaks TLS 1.3 with a 2-certificate identity chain (Ed25519 or Ed448), the SMP
//! handshake at versions 6..18 (6..6 without ALPN), transport block encryption, strict batch
//! parsing with authorization checks, and the recipient/sender commands with the reference
//! delivery rules (one unacknowledged message per subscription, END/DELD, quota marker).
//!
//! It also proxies: PRXY/PFWD from clients (this relay as the proxy) and RFWD from another
//! relay (this relay as the destination), see the `proxy` module notes.
//!
//! What it does **not** do: short links (LSET/LGET/…), service certificates (SUBS/NSUBS),
//! push notification delivery (NMSG), message expiry, basic-auth passwords (ignored). Those
//! commands are answered with `ERR CMD PROHIBITED`. Its session id is 32 random bytes per
//! connection sent in ServerHello, not tls-unique (rustls does not expose the Finished
//! message); clients take the session id from ServerHello. It is not hardened for public
//! deployment.
//!
//! Tests start it in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), smp_devrelay::RelayError> {
//! let relay = smp_devrelay::Relay::start(smp_devrelay::RelayConfig::default()).await?;
//! let address = relay.address(); // smp://<keyHash>@127.0.0.1:<port>
//! # let _ = address;
//! relay.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use muxd_smp::cert::{KeyHash, SignatureAlgorithm};
use muxd_transport::server::ServerIdentity;
use tokio::sync::{mpsc, watch};

mod conn;
mod handshake;
mod identity;
mod proxy;
mod server;
mod stats;
mod store;
mod store_log;

pub use stats::RelayStats;

/// How a relay is set up. Start from [`RelayConfig::default`] and change fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// TLS listener address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Optional WebSocket-over-TLS listener (§3).
    pub ws_listen: Option<SocketAddr>,
    /// Certificate algorithm when a new identity is generated.
    pub sign_algorithm: SignatureAlgorithm,
    /// Use this identity (takes precedence over `cert_dir`).
    pub identity: Option<ServerIdentity>,
    /// Keep the identity in `DIR/identity.pem` (created on first start) so that the address
    /// survives restarts.
    pub cert_dir: Option<PathBuf>,
    /// Append-only log of queues and messages, replayed on start.
    pub store_log: Option<PathBuf>,
    /// Highest SMP version offered (6..=18).
    pub max_version: u16,
    /// Messages a queue holds before `ERR QUOTA`.
    pub quota: usize,
    /// Connections without subscriptions are closed after this long without a block from
    /// the client.
    pub idle_timeout: Duration,
    /// Deadline for the TLS handshake plus ClientHello.
    pub handshake_timeout: Duration,
    /// Host written in the printed address; defaults to the listener's IP.
    pub host: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ws_listen: None,
            sign_algorithm: SignatureAlgorithm::Ed25519,
            identity: None,
            cert_dir: None,
            store_log: None,
            max_version: muxd_smp::version::MAX,
            quota: 128,
            // The reference server's default: 6 hours, checked hourly.
            idle_timeout: Duration::from_secs(6 * 3600),
            handshake_timeout: Duration::from_secs(120),
            host: None,
        }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A listener could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The identity could not be generated, loaded or saved, or TLS could not be set up.
    #[error("server identity: {0}")]
    Identity(#[from] muxd_transport::TransportError),
    /// Reading or writing the cert dir or the store log failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
}

/// State shared by the listeners and every connection.
#[derive(Debug)]
struct Shared {
    identity: ServerIdentity,
    config: RelayConfig,
    store: store::Store,
    counters: stats::Counters,
}

/// Entry point: [`Relay::start`].
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Binds the listeners and starts serving in the background on the current tokio
    /// runtime. The relay stops on [`RelayHandle::shutdown`] or when the handle is dropped.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        if !(muxd_smp::version::MIN..=muxd_smp::version::MAX).contains(&config.max_version) {
            return Err(RelayError::Config("max_version must be within 6..=18"));
        }
        if config.quota == 0 {
            return Err(RelayError::Config("quota must be at least 1"));
        }
        let identity = identity::resolve(&config)?;
        let store = store::Store::new(config.quota, None);
        if let Some(path) = &config.store_log {
            let (log, records) =
                store_log::StoreLog::open(path).map_err(|source| RelayError::File {
                    path: path.clone(),
                    source,
                })?;
            let mut inner = store.lock();
            inner.replay(records);
            inner.set_log(log);
        }
        let shared = Arc::new(Shared {
            identity,
            config,
            store,
            counters: stats::Counters::default(),
        });
        server::start(shared).await
    }
}

/// A running relay. Dropping it stops the relay (without waiting); prefer
/// [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    /// Stops the accept loops (on send, or when dropped).
    stop: watch::Sender<u64>,
    /// Bumped to drop every connection open at that moment.
    kick: watch::Sender<u64>,
    /// Every task holds a sender; `recv` returns `None` once all have ended.
    done: mpsc::Receiver<()>,
}

impl RelayHandle {
    /// The server address clients use: `smp://<keyHash>@<host>:<port>`.
    pub fn address(&self) -> String {
        self.address_for(self.local_addr)
    }

    /// The address of the WebSocket listener, in the same form, if enabled.
    pub fn ws_address(&self) -> Option<String> {
        self.ws_addr.map(|a| self.address_for(a))
    }

    fn address_for(&self, addr: SocketAddr) -> String {
        let host = match &self.shared.config.host {
            Some(h) => h.clone(),
            None if addr.is_ipv6() => format!("[{}]", addr.ip()),
            None => addr.ip().to_string(),
        };
        format!("smp://{}@{host}:{}", self.key_hash(), addr.port())
    }

    /// The bound TLS listener address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound WebSocket listener address.
    pub fn ws_local_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// The keyHash of the identity certificate.
    pub fn key_hash(&self) -> KeyHash {
        self.shared.identity.key_hash()
    }

    /// The server identity (to start another relay with the same address).
    pub fn identity(&self) -> &ServerIdentity {
        &self.shared.identity
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        let (subs, queues) = {
            let store = self.shared.store.lock();
            (store.subscriber_count(), store.queue_count())
        };
        self.shared.counters.snapshot(subs, queues)
    }

    /// Drops every client connection now (the listeners keep accepting): a server-side
    /// network failure for reconnection tests.
    pub fn disconnect_all(&self) {
        self.kick.send_modify(|n| *n += 1);
    }

    /// Stops accepting, closes every connection and waits (up to 5 s) for the tasks to end.
    pub async fn shutdown(mut self) {
        self.stop.send_modify(|n| *n += 1);
        self.kick.send_modify(|n| *n += 1);
        if tokio::time::timeout(Duration::from_secs(5), self.done.recv())
            .await
            .is_err()
        {
            tracing::warn!("relay tasks did not stop within 5 s");
        }
    }
}
