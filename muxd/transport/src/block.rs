//! Fixed-size SMP blocks over a byte stream or over WebSocket messages (spec §2.5, §3).

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::TransportError;

/// Every SMP transport read and write is exactly this many bytes.
pub const BLOCK_SIZE: usize = 16384;

/// Which carrier a [`BlockStream`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CarrierKind {
    /// Blocks are written back to back on the TLS stream.
    Tls,
    /// Each block is one binary WebSocket message inside TLS.
    WebSocket,
}

/// A connection that reads and writes whole SMP blocks.
///
/// [`BlockStream::read_block`] is cancel-safe (a partly read block is kept for the next
/// call), so a driver may `select!` on it. [`BlockStream::write_block`] is not: a cancelled
/// write leaves the stream mid-block and the connection must be dropped.
#[derive(Debug)]
pub struct BlockStream<S> {
    carrier: Carrier<S>,
    alpn: Option<Vec<u8>>,
}

#[derive(Debug)]
enum Carrier<S> {
    Tls {
        io: S,
        buf: Box<[u8; BLOCK_SIZE]>,
        filled: usize,
    },
    WebSocket(Box<WebSocketStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> BlockStream<S> {
    /// Blocks directly on a (TLS) byte stream; `alpn` is what the TLS layer negotiated.
    pub fn tls(io: S, alpn: Option<Vec<u8>>) -> Self {
        Self {
            carrier: Carrier::Tls {
                io,
                buf: Box::new([0; BLOCK_SIZE]),
                filled: 0,
            },
            alpn,
        }
    }

    /// Blocks as binary messages on an established WebSocket.
    pub fn websocket(ws: WebSocketStream<S>, alpn: Option<Vec<u8>>) -> Self {
        Self {
            carrier: Carrier::WebSocket(Box::new(ws)),
            alpn,
        }
    }

    /// The carrier in use.
    pub fn kind(&self) -> CarrierKind {
        match self.carrier {
            Carrier::Tls { .. } => CarrierKind::Tls,
            Carrier::WebSocket(_) => CarrierKind::WebSocket,
        }
    }

    /// The ALPN protocol negotiated by TLS (`None`: the server offers SMP v6 only).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The underlying stream (for socket options or TLS details).
    pub fn get_ref(&self) -> &S {
        match &self.carrier {
            Carrier::Tls { io, .. } => io,
            Carrier::WebSocket(ws) => ws.get_ref(),
        }
    }

    /// Reads the next block. EOF between blocks is [`TransportError::Closed`]; EOF inside a
    /// block is [`TransportError::Truncated`]; a WebSocket message of another size is
    /// [`TransportError::BadBlockSize`].
    pub async fn read_block(&mut self) -> Result<Box<[u8; BLOCK_SIZE]>, TransportError> {
        match &mut self.carrier {
            Carrier::Tls { io, buf, filled } => {
                while *filled < BLOCK_SIZE {
                    // `filled` is updated after every completed read, which keeps this
                    // future cancel-safe.
                    let n = io.read(&mut buf[*filled..]).await?;
                    if n == 0 {
                        return Err(match *filled {
                            0 => TransportError::Closed,
                            partial => TransportError::Truncated(partial),
                        });
                    }
                    *filled += n;
                }
                *filled = 0;
                Ok(Box::new(**buf))
            }
            Carrier::WebSocket(ws) => loop {
                let msg = match ws.next().await {
                    None => return Err(TransportError::Closed),
                    Some(msg) => msg?,
                };
                match msg {
                    Message::Binary(data) => {
                        let block: [u8; BLOCK_SIZE] = data
                            .as_ref()
                            .try_into()
                            .map_err(|_| TransportError::BadBlockSize(data.len()))?;
                        return Ok(Box::new(block));
                    }
                    // tungstenite answers pings itself; neither kind carries SMP data.
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => return Err(TransportError::Closed),
                    Message::Text(_) => return Err(TransportError::UnexpectedMessage("text")),
                    Message::Frame(_) => {
                        return Err(TransportError::UnexpectedMessage("raw frame"));
                    }
                }
            },
        }
    }

    /// Writes one block and flushes it. `block` must be exactly [`BLOCK_SIZE`] bytes.
    pub async fn write_block(&mut self, block: &[u8]) -> Result<(), TransportError> {
        if block.len() != BLOCK_SIZE {
            return Err(TransportError::BadBlockSize(block.len()));
        }
        match &mut self.carrier {
            Carrier::Tls { io, .. } => {
                io.write_all(block).await?;
                io.flush().await?;
            }
            Carrier::WebSocket(ws) => ws.send(Message::binary(block.to_vec())).await?,
        }
        Ok(())
    }

    /// Closes the connection politely (TLS close_notify, or a WebSocket close frame).
    pub async fn close(&mut self) -> Result<(), TransportError> {
        match &mut self.carrier {
            Carrier::Tls { io, .. } => io.shutdown().await?,
            Carrier::WebSocket(ws) => WebSocketStream::close(ws, None).await?,
        }
        Ok(())
    }
}
