//! WebSocket (§4.3): `GET <path>` with subprotocol `grp.1`, no extensions, no preamble, and
//! exactly one binary message per record. Any other request gets a bare 404.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The GRP/1 subprotocol.
pub const SUBPROTOCOL: &str = "grp.1";

/// A WebSocket carrying GRP records.
#[derive(Debug)]
pub struct WsCarrier {
    ws: WebSocketStream<TcpStream>,
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
    // The callback's error type is tungstenite's `ErrorResponse`, an HTTP response by value.
    #[allow(clippy::result_large_err)]
    pub async fn accept(stream: TcpStream, path: &str, deadline: Duration) -> Option<Self> {
        let _ = stream.set_nodelay(true);
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
        let upgrade =
            tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config()));
        match tokio::time::timeout(deadline, upgrade).await {
            Ok(Ok(ws)) => Some(Self { ws }),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket upgrade refused");
                None
            }
            Err(_) => None,
        }
    }

    /// Client side: connects to `ws://addr{path}` asking for `grp.1`.
    pub async fn connect(addr: SocketAddr, path: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let mut req = format!("ws://{addr}{path}")
            .into_client_request()
            .map_err(io::Error::other)?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config()))
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
