//! QUIC (§4.2): one bidirectional stream per connection, ALPN `grp/1`, a throwaway
//! self-signed certificate that is not an identity (Noise proves the relay's key), no 0-RTT,
//! no session tickets, and every close with application code 0 and an empty reason.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The ALPN protocol id.
pub const ALPN: &[u8] = b"grp/1";

/// QUIC's idle timeout: above GRP's 90 s so that GRP's own idle rule governs (§4.2).
const QUIC_IDLE: Duration = Duration::from_secs(120);

/// Read buffer size: one record.
const READ_CHUNK: usize = muxd_grp::RECORD;

/// The one GRP stream of a QUIC connection.
#[derive(Debug)]
pub struct QuicCarrier {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
}

impl QuicCarrier {
    /// Relay side: completes the QUIC handshake and waits (up to `deadline`) for the client's
    /// stream. A second stream of any kind closes the connection (§4.2).
    pub async fn accept(incoming: quinn::Incoming, deadline: Duration) -> Option<Self> {
        let setup = async {
            let conn = incoming.await.ok()?;
            let (send, recv) = conn.accept_bi().await.ok()?;
            Some((conn, send, recv))
        };
        let (conn, send, recv) = tokio::time::timeout(deadline, setup).await.ok()??;
        let watch = conn.clone();
        tokio::spawn(async move {
            // Flow control already allows only one stream; this catches a peer that opens
            // another after the first one finished.
            tokio::select! {
                r = watch.accept_bi() => if r.is_ok() { close_silently(&watch) },
                r = watch.accept_uni() => if r.is_ok() { close_silently(&watch) },
            }
        });
        Some(Self::from_parts(conn, send, recv))
    }

    /// Client side: connects to `addr` through `endpoint` (from
    /// `muxd_transport::grp::quic_client_endpoint`, which verifies no certificate: GRP
    /// authenticates the relay with Noise, not TLS) and opens stream 0.
    pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> io::Result<Self> {
        let conn = endpoint
            .connect(addr, "grp")
            .map_err(io::Error::other)?
            .await
            .map_err(io::Error::other)?;
        let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        Ok(Self::from_parts(conn, send, recv))
    }

    fn from_parts(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Self {
        Self {
            conn,
            send,
            recv,
            buf: vec![0u8; READ_CHUNK],
        }
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    pub(crate) async fn recv(&mut self) -> io::Result<Option<Vec<u8>>> {
        // quinn documents `RecvStream::read` as cancel-safe.
        match self.recv.read(&mut self.buf).await {
            Ok(Some(n)) => Ok(Some(self.buf[..n].to_vec())),
            Ok(None) => Ok(None),
            Err(quinn::ReadError::ConnectionLost(_)) => Ok(None),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    pub(crate) async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.send.write_all(data).await.map_err(io::Error::other)
    }

    pub(crate) fn finish(&mut self) {
        let _ = self.send.finish();
    }

    pub(crate) fn close(&mut self) {
        close_silently(&self.conn);
    }
}

/// CONNECTION_CLOSE with code 0 and no reason: a close says nothing about its cause.
fn close_silently(conn: &quinn::Connection) {
    conn.close(0u32.into(), b"");
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None);
    if let Ok(idle) = quinn::IdleTimeout::try_from(QUIC_IDLE) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The relay's QUIC server configuration with a fresh self-signed certificate.
pub fn server_config() -> Result<quinn::ServerConfig, String> {
    let cert = rcgen::generate_simple_self_signed(vec!["grp-relay.invalid".to_owned()])
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Resumption would let a relay link a client's connections (§4.2).
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Ok(cfg)
}
