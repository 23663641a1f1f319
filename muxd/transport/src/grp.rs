//! GRP/1 carriers, client side (GRP §4): TCP, QUIC (one bidirectional stream, ALPN `grp/1`,
//! any certificate) and WebSocket (`grp.1` subprotocol, one binary message per record), the
//! latter either plain (`grp+ws`) or over TLS (`grp+wss`).
//!
//! A carrier only moves bytes: the GRP handshake, records, cover traffic and liveness are
//! `muxd-grp`'s sans-IO `Connection`, driven by the daemon.
//!
//! No carrier verifies a certificate. The relay's identity is the Noise key in its address,
//! proved in the GRP handshake (§5); a TLS certificate is not an identity in GRP, and §4.3
//! lets native clients skip its verification for `grp+wss`. Skipping it costs nothing: a
//! party that terminates the TLS (a CDN, a reverse proxy, or an attacker with a bogus
//! certificate) sees only the Noise handshake and sealed records, and cannot complete the
//! handshake without the relay's static key. Verifying instead would need a root store that
//! this workspace does not carry (SMP pins certificates by key hash, never by WebPKI), and it
//! would make a relay with a self-signed certificate unreachable while protecting nothing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// How a relay is reached (the scheme of its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrpCarrierKind {
    /// `grp://`.
    Tcp,
    /// `grp+quic://`.
    Quic,
    /// `grp+ws://` (plain WebSocket).
    Ws,
    /// `grp+wss://`: WebSocket over TLS (ALPN `http/1.1`, SNI = the address's DNS name, any
    /// certificate; see the module docs for why the certificate is not verified).
    Wss,
}

/// QUIC ALPN (§4.2).
const ALPN: &[u8] = b"grp/1";

/// WebSocket subprotocol (§4.3).
const SUBPROTOCOL: &str = "grp.1";

/// QUIC idle timeout, above GRP's own 90 s idle rule so that GRP governs (§4.2).
const QUIC_IDLE: Duration = Duration::from_secs(120);

/// TLS ALPN for `grp+wss`: the WebSocket upgrade is HTTP/1.1 (§4.3).
const WSS_ALPN: &[u8] = b"http/1.1";

/// The largest WebSocket message (and frame) accepted: one record. Anything larger is a
/// protocol violation, so it is refused rather than buffered.
const WS_MAX_MESSAGE: usize = muxd_smp::block::BLOCK_SIZE + 16;

/// Read size for stream carriers; records are reassembled by the connection.
const READ_CHUNK: usize = 32 * 1024;

/// One open GRP carrier.
#[derive(Debug)]
pub struct GrpCarrier {
    inner: Inner,
    buf: Vec<u8>,
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpStream),
    Quic {
        // Dropping the endpoint would close the connection; it lives as long as the carrier.
        _endpoint: quinn::Endpoint,
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    /// `grp+ws` and `grp+wss`: the same WebSocket handling over either byte stream.
    Ws(Box<WebSocketStream<Box<dyn WsIo>>>),
}

/// The byte stream under a WebSocket: plain TCP or TLS over TCP.
trait WsIo: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> WsIo for T {}

impl GrpCarrier {
    /// Opens the carrier to `addr` (`path` is the WebSocket path), naming the relay by its IP
    /// address: no SNI, and the IP in the WebSocket `Host` header. Use [`Self::connect_named`]
    /// when the address has a host name.
    pub async fn connect(kind: GrpCarrierKind, addr: SocketAddr, path: &str) -> io::Result<Self> {
        Self::connect_named(kind, addr, &addr.ip().to_string(), path).await
    }

    /// Opens the carrier to `addr`, a resolved address of `host` (the host of the relay's
    /// address, as written there but without IPv6 brackets). On `grp+wss`, `host` is the TLS
    /// SNI when it is a DNS name, and on both WebSocket kinds it is the `Host` header, so
    /// that a reverse proxy or CDN in front of the relay can route the connection. `path` is
    /// the WebSocket path.
    pub async fn connect_named(
        kind: GrpCarrierKind,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> io::Result<Self> {
        let inner = match kind {
            GrpCarrierKind::Tcp => {
                let s = TcpStream::connect(addr).await?;
                // Records are written whole; Nagle would only delay them (§4.1).
                let _ = s.set_nodelay(true);
                Inner::Tcp(s)
            }
            GrpCarrierKind::Quic => {
                let bind = if addr.is_ipv4() {
                    SocketAddr::from(([0, 0, 0, 0], 0))
                } else {
                    SocketAddr::from(([0u16; 8], 0))
                };
                let endpoint = quic_client_endpoint(bind)?;
                let conn = endpoint
                    .connect(addr, "grp")
                    .map_err(io::Error::other)?
                    .await
                    .map_err(io::Error::other)?;
                let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
                Inner::Quic {
                    _endpoint: endpoint,
                    conn,
                    send,
                    recv,
                }
            }
            GrpCarrierKind::Ws => {
                let stream = TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                let authority = authority(host, addr.port(), 80);
                let url = format!("ws://{authority}{path}");
                Inner::Ws(Box::new(ws_upgrade(&url, Box::new(stream)).await?))
            }
            GrpCarrierKind::Wss => {
                let stream = TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                let tls = wss_handshake(stream, addr, host).await?;
                let authority = authority(host, addr.port(), 443);
                let url = format!("wss://{authority}{path}");
                Inner::Ws(Box::new(ws_upgrade(&url, Box::new(tls)).await?))
            }
        };
        Ok(Self {
            inner,
            buf: vec![0u8; READ_CHUNK],
        })
    }

    /// Whether every message is one record (WebSocket): the driver checks the sizes.
    pub fn is_message_framed(&self) -> bool {
        matches!(self.inner, Inner::Ws(_))
    }

    /// The next bytes received (one whole message on WebSocket); `None` at EOF. Cancel-safe.
    pub async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match &mut self.inner {
            Inner::Tcp(s) => {
                let n = s.read(&mut self.buf).await?;
                Ok((n > 0).then(|| self.buf[..n].to_vec()))
            }
            Inner::Quic { recv, .. } => match recv.read(&mut self.buf).await {
                Ok(Some(n)) => Ok(Some(self.buf[..n].to_vec())),
                Ok(None) | Err(quinn::ReadError::ConnectionLost(_)) => Ok(None),
                Err(e) => Err(io::Error::other(e)),
            },
            Inner::Ws(ws) => loop {
                match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(None),
                    Some(Ok(Message::Binary(b))) => return Ok(Some(b.to_vec())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "text message"));
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                }
            },
        }
    }

    /// Writes one unit (preamble + message 1, or a record).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.inner {
            Inner::Tcp(s) => s.write_all(data).await,
            Inner::Quic { send, .. } => send.write_all(data).await.map_err(io::Error::other),
            Inner::Ws(ws) => ws
                .send(Message::Binary(Bytes::copy_from_slice(data)))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Closes: FIN (TCP, QUIC stream, then CONNECTION_CLOSE 0) or a WebSocket close frame
    /// (1000 after a goodbye, 1002 after a protocol error).
    pub async fn close(&mut self, protocol_error: bool) {
        match &mut self.inner {
            Inner::Tcp(s) => {
                let _ = s.shutdown().await;
            }
            Inner::Quic { conn, send, .. } => {
                let _ = send.finish();
                // Code 0 and no reason: a close says nothing about its cause (§4.2).
                conn.close(0u32.into(), b"");
            }
            Inner::Ws(ws) => {
                let code = if protocol_error {
                    CloseCode::Protocol
                } else {
                    CloseCode::Normal
                };
                let frame = CloseFrame {
                    code,
                    reason: "".into(),
                };
                let _ = WebSocketStream::close(ws, Some(frame)).await;
            }
        }
    }
}

/// The WebSocket upgrade over `stream`: subprotocol `grp.1`, no extensions (tungstenite
/// offers none), messages and frames capped at one record (§4.3).
async fn ws_upgrade(
    url: &str,
    stream: Box<dyn WsIo>,
) -> io::Result<WebSocketStream<Box<dyn WsIo>>> {
    let mut req = url.into_client_request().map_err(io::Error::other)?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(WS_MAX_MESSAGE))
        .max_frame_size(Some(WS_MAX_MESSAGE));
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| io::Error::other(format!("WebSocket upgrade failed: {e}")))?;
    Ok(ws)
}

/// `host[:port]` for a URL, the port left out when it is the scheme's default and IPv6
/// literals bracketed.
fn authority(host: &str, port: u16, default_port: u16) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// The TLS handshake of `grp+wss` over `stream` to `addr`, named `host`: ALPN `http/1.1`, SNI
/// only for a DNS name, no session resumption (a ticket would let the TLS terminator link a
/// client's connections), and any certificate (see the module docs). Also the reference
/// relay's test client.
pub async fn wss_handshake(
    stream: TcpStream,
    addr: SocketAddr,
    host: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    tls.alpn_protocols = vec![WSS_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    // rustls sends no SNI for an IP address; a name that is neither (cannot come from a
    // parsed address) falls back to the resolved IP.
    let name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
    TlsConnector::from(Arc::new(tls))
        .connect(name, stream)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))
}

/// A GRP client QUIC endpoint bound to `bind`: ALPN `grp/1`, no SNI, no resumption or 0-RTT,
/// any certificate (§4.2). Also the reference relay's test client.
pub fn quic_client_endpoint(bind: SocketAddr) -> io::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_sni = false;
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into());
    if let Ok(idle) = quinn::IdleTimeout::try_from(QUIC_IDLE) {
        transport.max_idle_timeout(Some(idle));
    }
    cfg.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// Accepts every certificate: a certificate is not an identity in GRP (§4.2, §4.3).
#[derive(Debug)]
struct AnyCertificate;

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_leaves_out_the_default_port_and_brackets_ipv6() {
        assert_eq!(authority("relay.example", 443, 443), "relay.example");
        assert_eq!(authority("relay.example", 8443, 443), "relay.example:8443");
        assert_eq!(authority("127.0.0.1", 80, 80), "127.0.0.1");
        assert_eq!(authority("::1", 7480, 80), "[::1]:7480");
    }
}
