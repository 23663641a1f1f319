//! Upstream transports for muxd: the IO side of reaching an SMP server.
//!
//! * [`tls`]: a rustls client fitted to SMP (TLS 1.3, ChaCha20-Poly1305 only, no SNI, no
//!   resumption, ALPN `smp/1`) whose certificate verifier pins the server by keyHash through
//!   [`muxd_smp::cert`] and verifies Ed25519 **and Ed448** CertificateVerify signatures.
//! * [`block`]: [`BlockStream`] moves exactly-16384-byte SMP blocks over that TLS stream,
//!   either raw or as one WebSocket binary message per block.
//! * [`tcp_info`]: the kernel's RTT estimate for a connected socket, for the lag history.
//! * [`server`]: the server half (identity generation, rustls `ServerConfig` with an openssl
//!   Ed448/Ed25519 signing key, session-key signing, WebSocket accept) for the dev relay and
//!   for tests. It is real code, not a mock.
//!
//! Nothing here installs a process-global crypto provider: every config is built from
//! [`tls::crypto_provider`], which is ring restricted to what SMP servers speak. See
//! `docs/tls.md` for the design and its deviations from the Haskell client.

pub mod block;
mod error;
pub mod grp;
pub mod server;
pub mod tcp_info;
pub mod tls;
mod websocket;

pub use block::{BLOCK_SIZE, BlockStream, CarrierKind};
pub use error::TransportError;
pub use tcp_info::tcp_rtt;
pub use tls::{Alpn, ConnectOptions, DEFAULT_USER_TIMEOUT, KeepAlive, TlsConnection, connect_tls};
// Callers name the stream types in `BlockStream<…>`.
pub use tokio_rustls;
