//! The transport's error type.

use std::io;

use muxd_smp::cert::CertError;

/// Why a connection could not be set up or carried a bad block.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// TCP connect plus TLS handshake did not finish in time.
    #[error("connection setup timed out")]
    Timeout,
    /// The server is not the one the address pins, or its chain is not trustworthy.
    /// The message starts with "server identity mismatch" or "untrusted chain".
    #[error(transparent)]
    Identity(#[from] CertError),
    /// The TLS handshake failed for another reason (alert, no common parameters, …).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    /// A TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The WebSocket upgrade or a WebSocket frame failed.
    #[error("WebSocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// A block of the wrong size: a WebSocket message or a caller's buffer not of 16384 bytes.
    #[error("bad block: {0} bytes, 16384 expected")]
    BadBlockSize(usize),
    /// A WebSocket message that is not binary (text, or a raw frame).
    #[error("bad block: unexpected WebSocket {0} message")]
    UnexpectedMessage(&'static str),
    /// The peer closed the connection between blocks.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a block.
    #[error("connection closed after {0} bytes of a block")]
    Truncated(usize),
    /// Any other socket error.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// Generating or loading a server certificate failed.
    #[error("server certificate: {0}")]
    Certificate(String),
}

impl TransportError {
    /// True when the failure is about *who* the server is (wrong keyHash or an untrusted
    /// chain). Retrying soon will not help; the address or the server is wrong.
    pub fn is_identity(&self) -> bool {
        matches!(self, Self::Identity(_))
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for TransportError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::WebSocket(Box::new(e))
    }
}

impl From<openssl::error::ErrorStack> for TransportError {
    fn from(e: openssl::error::ErrorStack) -> Self {
        Self::Certificate(e.to_string())
    }
}
