//! The SMP client side of TLS (spec §2.1–§2.4).
//!
//! Parameters match what `smp-server` accepts and what the Haskell client sends: TLS 1.3 only,
//! `TLS_CHACHA20_POLY1305_SHA256` only, X25519 key exchange, no SNI, no session resumption,
//! ALPN `smp/1` (or `http/1.1` in web-port mode). The TLS 1.2 suite
//! `ECDHE-ECDSA-CHACHA20-POLY1305` that servers also accept is deliberately not offered: every
//! server that speaks SMP v7+ speaks TLS 1.3, and a 1.2 fallback would only widen the
//! downgrade surface.
//!
//! The server is authenticated by the keyHash pinned in its address, never by a web PKI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muxd_smp::cert::{self, CertError, CertPublicKey, KeyHash, SignatureAlgorithm, ValidatedChain};
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, CipherSuite, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme,
};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::TransportError;
use crate::block::BlockStream;
use crate::websocket;

/// The ALPN protocol to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Alpn {
    /// `smp/1`: the normal choice. Without any ALPN servers fall back to SMP v6 only.
    #[default]
    Smp,
    /// `http/1.1`: "web port" mode, which makes the connection look like HTTPS on port 443.
    Http11,
}

impl Alpn {
    /// The protocol name as sent on the wire.
    pub const fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Smp => b"smp/1",
            Self::Http11 => b"http/1.1",
        }
    }
}

/// TCP keep-alive settings for the upstream socket.
///
/// The defaults (15 s idle, then a probe every 5 s, 3 probes) notice a dead peer or path
/// within about 30 s of silence, where the Haskell client's 30 s / 15 s / 4 needs 90 s. A
/// probe is a bare ACK, so the tighter schedule costs next to nothing on an idle link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the kernel drops the connection.
    pub retries: u32,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(15),
            interval: Duration::from_secs(5),
            retries: 3,
        }
    }
}

/// The default [`ConnectOptions::user_timeout`]: as long as keep-alive takes to give up on a
/// silent peer, so a dead path is noticed equally fast whether we were writing or not.
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// How to dial a server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// ALPN to offer.
    pub alpn: Alpn,
    /// TCP keep-alive; `None` leaves the OS default (off).
    pub keepalive: Option<KeepAlive>,
    /// `TCP_USER_TIMEOUT` (Linux, Android): how long sent data may stay unacknowledged before
    /// the kernel drops the connection. Keep-alive only probes an idle socket; this covers
    /// the case where we are writing into a path that died. `None` leaves the OS default
    /// (retransmit for ~15 minutes). Ignored on other systems.
    pub user_timeout: Option<Duration>,
    /// Deadline for TCP connect plus the TLS handshake.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            alpn: Alpn::Smp,
            keepalive: Some(KeepAlive::default()),
            user_timeout: Some(DEFAULT_USER_TIMEOUT),
            // The Haskell background tcpConnectTimeout (it also covers the SMP handshake).
            timeout: Duration::from_secs(45),
        }
    }
}

impl ConnectOptions {
    /// Options with the given ALPN and defaults otherwise.
    pub fn with_alpn(alpn: Alpn) -> Self {
        Self {
            alpn,
            ..Self::default()
        }
    }
}

/// The crypto provider every muxd TLS config is built from: ring, restricted to
/// `TLS13_CHACHA20_POLY1305_SHA256` and X25519 (the only suite SMP servers accept, and the
/// group they prefer after X448, which ring lacks).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites =
        vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    Arc::new(provider)
}

/// Builds the client config for one server identity.
pub fn client_config(key_hash: KeyHash, alpn: Alpn) -> Result<Arc<ClientConfig>, TransportError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier { key_hash }))
        // Servers request a client certificate by default (for services); answering with an
        // empty Certificate message is what normal clients do.
        .with_no_client_auth();
    // On a port shared with HTTPS, SNI selects the web certificate instead of the SMP one.
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    Ok(Arc::new(config))
}

/// An established, verified TLS connection to an SMP server.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    identity: ValidatedChain,
    alpn: Option<Vec<u8>>,
    peer: SocketAddr,
}

impl TlsConnection {
    /// The validated server chain; its leaf key verifies ServerHello's signed session key.
    pub fn server_identity(&self) -> &ValidatedChain {
        &self.identity
    }

    /// The ALPN the server selected. `None` means the server will offer SMP v6 only.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        self.stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite())
    }

    /// The DER certificates the server sent, leaf first (the same chain ServerHello repeats).
    pub fn peer_certificates(&self) -> Vec<&[u8]> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.as_ref())
            .collect()
    }

    /// The server's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The underlying TCP socket (for socket options).
    pub fn tcp_stream(&self) -> &TcpStream {
        self.stream.get_ref().0
    }

    /// Carries SMP blocks directly over TLS (the normal transport).
    pub fn into_blocks(self) -> BlockStream<TlsStream<TcpStream>> {
        BlockStream::tls(self.stream, self.alpn)
    }

    /// Upgrades to WebSocket inside this TLS session (`GET /`, no extensions) and carries one
    /// block per binary message. Only test/self-hosted servers offer this (§3).
    pub async fn into_websocket(self) -> Result<BlockStream<TlsStream<TcpStream>>, TransportError> {
        let ws = websocket::client_upgrade(self.stream, self.peer).await?;
        Ok(BlockStream::websocket(ws, self.alpn))
    }

    /// The raw TLS stream, for callers that frame data themselves.
    pub fn into_inner(self) -> TlsStream<TcpStream> {
        self.stream
    }
}

/// Dials `addr`, sets TCP keep-alive, and runs the TLS handshake pinned to `key_hash`.
///
/// The caller resolves host names; the TLS `ServerName` is the IP, so no SNI can leak.
pub async fn connect_tls(
    addr: SocketAddr,
    key_hash: &KeyHash,
    opts: &ConnectOptions,
) -> Result<TlsConnection, TransportError> {
    let config = client_config(*key_hash, opts.alpn)?;
    tokio::time::timeout(opts.timeout, connect_inner(addr, key_hash, config, opts))
        .await
        .map_err(|_| TransportError::Timeout)?
}

async fn connect_inner(
    addr: SocketAddr,
    key_hash: &KeyHash,
    config: Arc<ClientConfig>,
    opts: &ConnectOptions,
) -> Result<TlsConnection, TransportError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| TransportError::Connect { addr, source })?;
    tcp.set_nodelay(true)?;
    if let Some(ka) = opts.keepalive {
        set_keepalive(&tcp, &ka)?;
    }
    set_user_timeout(&tcp, opts.user_timeout)?;
    let server_name = ServerName::IpAddress(addr.ip().into());
    let stream = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(handshake_error)?;
    let conn = &stream.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    // The verifier already accepted this chain; validating again yields the owned summary
    // (leaf key) without smuggling state out of the shared verifier.
    let chain: Vec<&[u8]> = conn
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.as_ref())
        .collect();
    let identity = cert::validate_chain(&chain, key_hash, unix_now())?;
    tracing::debug!(%addr, alpn = ?alpn.as_deref().map(String::from_utf8_lossy), "TLS established");
    Ok(TlsConnection {
        identity,
        alpn,
        peer: addr,
        stream,
    })
}

fn set_keepalive(tcp: &TcpStream, ka: &KeepAlive) -> std::io::Result<()> {
    let params = TcpKeepalive::new()
        .with_time(ka.idle)
        .with_interval(ka.interval)
        .with_retries(ka.retries);
    SockRef::from(tcp).set_tcp_keepalive(&params)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_user_timeout(tcp: &TcpStream, timeout: Option<Duration>) -> std::io::Result<()> {
    match timeout {
        Some(t) => SockRef::from(tcp).set_tcp_user_timeout(Some(t)),
        None => Ok(()),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_user_timeout(_tcp: &TcpStream, _timeout: Option<Duration>) -> std::io::Result<()> {
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Turns a failed handshake into the precise identity error when our verifier refused it.
fn handshake_error(e: std::io::Error) -> TransportError {
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        && let Some(cert_err) = other.0.downcast_ref::<CertError>()
    {
        return TransportError::Identity(cert_err.clone());
    }
    TransportError::Handshake(e)
}

/// Verifies the server chain against the keyHash of the address and the TLS 1.3
/// CertificateVerify with the leaf key (Ed25519 or Ed448, through openssl).
#[derive(Debug)]
struct PinnedServerVerifier {
    key_hash: KeyHash,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<&[u8]> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.as_ref())
            .collect();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match cert::validate_chain(&chain, &self.key_hash, now) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                tracing::warn!(error = %e, "server certificate refused");
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(e)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled, so rustls never gets here.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithm = match dss.scheme {
            SignatureScheme::ED25519 => SignatureAlgorithm::Ed25519,
            SignatureScheme::ED448 => SignatureAlgorithm::Ed448,
            _ => {
                return Err(rustls::Error::PeerMisbehaved(
                    rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
                ));
            }
        };
        let key = CertPublicKey::from_certificate(cert.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if key.algorithm() != algorithm {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ));
        }
        key.verify(message, dss.signature())
            .map(|()| HandshakeSignatureValid::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519, SignatureScheme::ED448]
    }
}
