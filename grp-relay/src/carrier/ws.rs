//! WebSocket (§4.3): `GET <path>` with subprotocol `grp.1`, no extensions, no preamble, and
//! exactly one binary message per record. Any other request gets a bare 404.
//!
//! `grp+ws` and `grp+wss` share all of it: `grp+wss` only puts a TLS layer ([`WssTls`])
//! between TCP and the WebSocket. The certificate is not an identity (the relay proves its
//! Noise key in the handshake), so a generated self-signed one serves GRP clients as well as a
//! real one; a real one matters only to a CDN or reverse proxy that checks its origin.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The GRP/1 subprotocol.
pub const SUBPROTOCOL: &str = "grp.1";

/// TLS ALPN: the WebSocket upgrade is HTTP/1.1.
const ALPN: &[u8] = b"http/1.1";

/// A WebSocket carrying GRP records, over TCP (`grp+ws`) or TLS (`grp+wss`).
#[derive(Debug)]
pub struct WsCarrier {
    ws: WebSocketStream<Box<dyn WsIo>>,
}

/// The byte stream under a WebSocket: plain TCP or TLS over TCP.
trait WsIo: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug> WsIo for T {}

/// The TLS side of a `grp+wss` listener.
#[derive(Clone)]
pub struct WssTls {
    acceptor: TlsAcceptor,
    generated: bool,
}

impl std::fmt::Debug for WssTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WssTls")
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl WssTls {
    /// Loads the certificate chain and key from PEM files (`listen.tls_cert`,
    /// `listen.tls_key`), or, when `files` is `None`, generates a self-signed certificate for
    /// `name`. Errors name the config key and the file.
    pub fn new(files: Option<(&Path, &Path)>, name: &str) -> Result<Self, String> {
        let (chain, key, generated) = match files {
            Some((cert_path, key_path)) => {
                let chain = CertificateDer::pem_file_iter(cert_path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("listen.tls_cert {}: {e}", cert_path.display()))?;
                if chain.is_empty() {
                    return Err(format!(
                        "listen.tls_cert {}: no PEM certificate in the file",
                        cert_path.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_file(key_path)
                    .map_err(|e| format!("listen.tls_key {}: {e}", key_path.display()))?;
                (chain, key, false)
            }
            None => {
                let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()])
                    .map_err(|e| format!("generating a self-signed certificate: {e}"))?;
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                    cert.signing_key.serialize_der(),
                ));
                (vec![cert.cert.der().clone()], key, true)
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            // rustls checks that the key matches the leaf certificate.
            .map_err(|e| format!("listen.tls_cert/listen.tls_key: {e}"))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // Resumption would let the relay link a client's connections (as for QUIC, §4.2).
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            generated,
        })
    }

    /// Whether the certificate was generated (no files configured).
    pub fn is_generated(&self) -> bool {
        self.generated
    }
}

fn config() -> WebSocketConfig {
    // A message over one record is a protocol violation; refuse to buffer more.
    WebSocketConfig::default()
        .max_message_size(Some(muxd_grp::RECORD))
        .max_frame_size(Some(muxd_grp::RECORD))
}

fn not_found() -> ErrorResponse {
    let mut r = ErrorResponse::new(None);
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

fn offers_grp(req: &Request) -> bool {
    req.headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

impl WsCarrier {
    /// Relay side: runs the upgrade on `stream` within `deadline`. A wrong path or a missing
    /// subprotocol is answered 404 with an empty body; cookies and `Origin` are ignored.
    pub async fn accept(stream: TcpStream, path: &str, deadline: Duration) -> Option<Self> {
        Self::accept_over(stream, None, path, deadline).await
    }

    /// Relay side, with TLS below the WebSocket when `tls` is set (`grp+wss`): the TLS
    /// handshake and the upgrade together must finish within `deadline`.
    pub async fn accept_over(
        stream: TcpStream,
        tls: Option<&WssTls>,
        path: &str,
        deadline: Duration,
    ) -> Option<Self> {
        let _ = stream.set_nodelay(true);
        let setup = async {
            let io: Box<dyn WsIo> = match tls {
                None => Box::new(stream),
                Some(t) => match t.acceptor.accept(stream).await {
                    Ok(s) => Box::new(s),
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return None;
                    }
                },
            };
            Self::upgrade(io, path).await
        };
        tokio::time::timeout(deadline, setup).await.ok().flatten()
    }

    // The callback's error type is tungstenite's `ErrorResponse`, an HTTP response by value.
    #[allow(clippy::result_large_err)]
    async fn upgrade(io: Box<dyn WsIo>, path: &str) -> Option<Self> {
        let check = |req: &Request, mut resp: Response| {
            if req.uri().path() != path || !offers_grp(req) {
                return Err(not_found());
            }
            resp.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
            Ok(resp)
        };
        match tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(config())).await {
            Ok(ws) => Some(Self { ws }),
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade refused");
                None
            }
        }
    }

    /// Client side: connects to `ws://addr{path}` asking for `grp.1`.
    pub async fn connect(addr: SocketAddr, path: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Self::client_upgrade(&format!("ws://{addr}{path}"), Box::new(stream)).await
    }

    /// Client side over TLS: connects to `wss://addr{path}` asking for `grp.1`, with SNI
    /// `server_name` (when it is a DNS name) and any certificate accepted (§4.3): the daemon's
    /// own TLS handshake for `grp+wss`.
    pub async fn connect_tls(addr: SocketAddr, server_name: &str, path: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let stream = muxd_transport::grp::wss_handshake(stream, addr, server_name).await?;
        Self::client_upgrade(&format!("wss://{addr}{path}"), Box::new(stream)).await
    }

    async fn client_upgrade(url: &str, io: Box<dyn WsIo>) -> io::Result<Self> {
        let mut req = url.into_client_request().map_err(io::Error::other)?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(config()))
            .await
            .map_err(io::Error::other)?;
        Ok(Self { ws })
    }

    pub(crate) async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            // `StreamExt::next` is cancel-safe; tungstenite answers Ping frames itself.
            match self.ws.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Binary(b))) => return Ok(Some(b.to_vec())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "text message"));
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
            }
        }
    }

    pub(crate) async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(io::Error::other)
    }

    pub(crate) async fn finish(&mut self) {
        self.close_with(CloseCode::Normal).await;
    }

    pub(crate) async fn close(&mut self, protocol_error: bool) {
        if protocol_error {
            self.close_with(CloseCode::Protocol).await;
        } else {
            let _ = self.ws.get_mut().shutdown().await;
        }
    }

    async fn close_with(&mut self, code: CloseCode) {
        let frame = CloseFrame {
            code,
            reason: "".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }
}
