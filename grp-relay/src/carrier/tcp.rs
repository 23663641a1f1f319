//! TCP (§4.1): the default carrier, and the one relay links use.

use std::io;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Read buffer size: one record, so a record usually arrives in one `recv`.
const READ_CHUNK: usize = muxd_grp::RECORD;

/// A TCP stream carrying GRP.
#[derive(Debug)]
pub struct TcpCarrier {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl TcpCarrier {
    /// Wraps a connected stream (sets TCP_NODELAY: records are written whole anyway).
    pub fn new(stream: TcpStream) -> Self {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        Self {
            stream,
            buf: vec![0u8; READ_CHUNK],
        }
    }

    pub(crate) async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        // `read` is cancel-safe: no bytes are lost if the future is dropped.
        let n = self.stream.read(&mut self.buf).await?;
        Ok((n > 0).then(|| self.buf[..n].to_vec()))
    }

    pub(crate) async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    pub(crate) async fn finish(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    pub(crate) async fn close(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}
