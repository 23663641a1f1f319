//! The carriers (§4: TCP, QUIC, WebSocket plain or over TLS) behind one interface: bytes in, bytes out, graceful and silent
//! closes. GRP's own timers govern liveness, so no carrier keep-alive is relied on.

pub mod quic;
pub mod tcp;
pub mod ws;

use std::io;

/// One open carrier, relay side or client side.
#[derive(Debug)]
#[non_exhaustive]
pub enum Carrier {
    /// A TCP stream.
    Tcp(tcp::TcpCarrier),
    /// QUIC's single bidirectional stream.
    Quic(quic::QuicCarrier),
    /// A WebSocket (`grp+ws` or `grp+wss`); every message is exactly one record.
    Ws(Box<ws::WsCarrier>),
}

impl Carrier {
    /// The next bytes received; `None` at EOF. Cancel-safe (it is raced against timers).
    /// On WebSocket one call returns one whole message.
    pub async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Self::Tcp(c) => c.recv().await,
            Self::Quic(c) => c.recv().await,
            Self::Ws(c) => c.recv().await,
        }
    }

    /// Writes one unit (preamble + message 1, record 2, or a record).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(c) => c.send(data).await,
            Self::Quic(c) => c.send(data).await,
            Self::Ws(c) => c.send(data).await,
        }
    }

    /// Graceful close after a goodbye: TCP FIN, QUIC stream FIN, WebSocket close 1000. The
    /// read side stays open so the peer's EOF can be awaited.
    pub async fn finish(&mut self) {
        match self {
            Self::Tcp(c) => c.finish().await,
            Self::Quic(c) => c.finish(),
            Self::Ws(c) => c.finish().await,
        }
    }

    /// Closes without sending anything more of GRP (failed handshakes, bad records, end of
    /// the linger). WebSocket `protocol_error` closes with 1002 (§4.3).
    pub async fn close(&mut self, protocol_error: bool) {
        match self {
            Self::Tcp(c) => c.close().await,
            Self::Quic(c) => c.close(),
            Self::Ws(c) => c.close(protocol_error).await,
        }
    }

    /// Whether messages are records (WebSocket): the driver checks each message's size.
    pub fn is_message_framed(&self) -> bool {
        matches!(self, Self::Ws(_))
    }

    /// Whether the carrier starts with the 4-byte preamble (TCP and QUIC).
    pub fn has_preamble(&self) -> bool {
        !self.is_message_framed()
    }
}
