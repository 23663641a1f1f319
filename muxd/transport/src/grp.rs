//! GRP/1 carriers, client side (GRP §4): TCP, QUIC (one bidirectional stream, ALPN `grp/1`,
//! any certificate) and WebSocket (`grp.1` subprotocol, one binary message per record).
//!
//! A carrier only moves bytes: the GRP handshake, records, cover traffic and liveness are
//! `muxd-grp`'s sans-IO `Connection`, driven by the daemon. The QUIC certificate is not
//! verified because it is not an identity: the relay proves its key in the Noise handshake.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
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
    /// `grp+ws://` (plain WebSocket; `grp+wss://` is not supported by this dialer yet).
    Ws,
}

/// QUIC ALPN (§4.2).
const ALPN: &[u8] = b"grp/1";

/// WebSocket subprotocol (§4.3).
const SUBPROTOCOL: &str = "grp.1";

/// QUIC idle timeout, above GRP's own 90 s idle rule so that GRP governs (§4.2).
const QUIC_IDLE: Duration = Duration::from_secs(120);

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
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl GrpCarrier {
    /// Opens the carrier to `addr` (`path` is the WebSocket path).
    pub async fn connect(kind: GrpCarrierKind, addr: SocketAddr, path: &str) -> io::Result<Self> {
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
                let endpoint = quic_endpoint(bind)?;
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
                let mut req = format!("ws://{addr}{path}")
                    .into_client_request()
                    .map_err(io::Error::other)?;
                req.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(SUBPROTOCOL),
                );
                // A message over one record is a protocol violation: buffer no more.
                let config = WebSocketConfig::default()
                    .max_message_size(Some(muxd_smp::block::BLOCK_SIZE + 16))
                    .max_frame_size(Some(muxd_smp::block::BLOCK_SIZE + 16));
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(req, stream, Some(config))
                        .await
                        .map_err(io::Error::other)?;
                Inner::Ws(Box::new(ws))
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

/// A client endpoint: ALPN `grp/1`, no SNI, no resumption or 0-RTT, any certificate (§4.2).
fn quic_endpoint(bind: SocketAddr) -> io::Result<quinn::Endpoint> {
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

/// Accepts every certificate: the QUIC certificate is not an identity in GRP (§4.2).
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
