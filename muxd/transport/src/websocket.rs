//! The WebSocket carrier (spec §3): HTTP/1.1 upgrade inside TLS, one binary message per block.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::HOST;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::TransportError;
use crate::block::BLOCK_SIZE;

/// Largest message the Haskell server's WebSocket layer accepts; blocks are exactly 16384.
const MAX_MESSAGE: usize = 65536;

/// Frame and message limits of §3. No extension is negotiated (tungstenite offers none
/// unless asked, so no permessage-deflate).
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(BLOCK_SIZE))
        .max_message_size(Some(MAX_MESSAGE))
        .read_buffer_size(2 * BLOCK_SIZE)
        .write_buffer_size(0)
}

/// Client upgrade over an established TLS stream: `GET /` with an empty `Host`, as the
/// Haskell websockets client sends it (the TLS layer already pinned the server).
pub(crate) async fn client_upgrade<S>(
    stream: S,
    peer: SocketAddr,
) -> Result<WebSocketStream<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = format!("wss://{peer}/").into_client_request()?;
    request
        .headers_mut()
        .insert(HOST, HeaderValue::from_static(""));
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config())).await?;
    Ok(ws)
}

/// Server side of the upgrade.
pub(crate) async fn server_accept<S>(stream: S) -> Result<WebSocketStream<S>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    Ok(tokio_tungstenite::accept_async_with_config(stream, Some(config())).await?)
}
