//! Real-socket tests of the SMP TLS and WebSocket transports on 127.0.0.1.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt as _;
use muxd_smp::cert::{KeyHash, SignatureAlgorithm};
use muxd_transport::server::{AcceptedTls, Acceptor, ServerIdentity, ServerOptions};
use muxd_transport::{
    Alpn, BLOCK_SIZE, CarrierKind, ConnectOptions, KeepAlive, TransportError, connect_tls,
};
use rustls::CipherSuite;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Starts a one-connection TLS server; the handle yields the accepted connection (or the
/// handshake error) together with the acceptor, for its ClientHello counters.
async fn serve_once(
    identity: &ServerIdentity,
) -> (
    SocketAddr,
    JoinHandle<(Result<AcceptedTls, TransportError>, Acceptor)>,
) {
    let acceptor = Acceptor::new(identity, &ServerOptions::default()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        (acceptor.accept(tcp).await, acceptor)
    });
    (addr, handle)
}

fn block(seed: u8) -> Vec<u8> {
    (0..BLOCK_SIZE)
        .map(|i| seed.wrapping_add(i as u8))
        .collect()
}

async fn handshake_ok(algorithm: SignatureAlgorithm) {
    let identity = ServerIdentity::generate(algorithm).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let (accepted, acceptor) = server.await.unwrap();
    let accepted = accepted.unwrap();

    assert_eq!(conn.alpn(), Some(&b"smp/1"[..]));
    assert_eq!(accepted.alpn(), Some(&b"smp/1"[..]));
    assert_eq!(
        conn.cipher_suite(),
        Some(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
    );
    assert_eq!(
        accepted.cipher_suite(),
        Some(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
    );
    // No SNI, seen both in the resolver callback and on the connection.
    assert_eq!(accepted.sni(), None);
    assert_eq!(acceptor.client_hellos(), (1, 0));
    // The server asked for a client certificate; the client answered with none.
    assert!(!accepted.client_sent_certificate());

    assert_eq!(conn.server_identity().key_hash(), &identity.key_hash());
    assert_eq!(conn.server_identity().leaf_key().algorithm(), algorithm);
    assert_eq!(conn.peer_certificates(), identity.chain_der());

    // ServerHello's signed session key verifies with the leaf key of the TLS chain.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(&[0x5a; 32]);
    let signed = identity.sign_session_key(&spki).unwrap();
    assert_eq!(
        conn.server_identity().verify_signed_key(&signed).unwrap(),
        spki
    );
}

#[tokio::test]
async fn ed25519_chain_accepted() {
    handshake_ok(SignatureAlgorithm::Ed25519).await;
}

#[tokio::test]
async fn ed448_chain_accepted() {
    handshake_ok(SignatureAlgorithm::Ed448).await;
}

#[tokio::test]
async fn wrong_key_hash_is_refused_before_any_data() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let wrong = KeyHash::from_bytes([9; 32]);
    let err = connect_tls(addr, &wrong, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_identity(), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "server identity mismatch: expected keyHash {wrong}, server presented {}",
            identity.key_hash()
        )
    );
    // The server's handshake fails too (bad_certificate alert): no block was ever exchanged.
    let (accepted, _) = server.await.unwrap();
    assert!(accepted.is_err());
}

#[tokio::test]
async fn expired_chain_is_untrusted() {
    let identity =
        ServerIdentity::generate_valid(SignatureAlgorithm::Ed448, 1_000_000_000, 1_100_000_000)
            .unwrap();
    let (addr, server) = serve_once(&identity).await;
    let err = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_identity());
    assert!(
        err.to_string()
            .starts_with("untrusted chain: certificate 0 is not valid"),
        "{err}"
    );
    assert!(server.await.unwrap().0.is_err());
}

#[tokio::test]
async fn web_port_mode_negotiates_http11() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let conn = connect_tls(
        addr,
        &identity.key_hash(),
        &ConnectOptions::with_alpn(Alpn::Http11),
    )
    .await
    .unwrap();
    assert_eq!(conn.alpn(), Some(&b"http/1.1"[..]));
    let (accepted, acceptor) = server.await.unwrap();
    assert_eq!(accepted.unwrap().alpn(), Some(&b"http/1.1"[..]));
    assert_eq!(acceptor.client_hellos(), (1, 0));
}

#[tokio::test]
async fn keepalive_is_set_on_the_socket() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, _server) = serve_once(&identity).await;
    let mut opts = ConnectOptions::default();
    opts.keepalive = Some(KeepAlive {
        idle: Duration::from_secs(41),
        interval: Duration::from_secs(7),
        retries: 3,
    });
    let conn = connect_tls(addr, &identity.key_hash(), &opts)
        .await
        .unwrap();
    let sock = socket2::SockRef::from(conn.tcp_stream());
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(41));
    assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(7));
    assert_eq!(sock.keepalive_retries().unwrap(), 3);
    #[cfg(target_os = "linux")]
    assert_eq!(
        sock.tcp_user_timeout().unwrap(),
        Some(muxd_transport::DEFAULT_USER_TIMEOUT)
    );
}

#[test]
fn default_keepalive_notices_a_dead_peer_within_half_a_minute() {
    let ka = KeepAlive::default();
    assert_eq!(
        (ka.idle, ka.interval, ka.retries),
        (Duration::from_secs(15), Duration::from_secs(5), 3)
    );
    assert!(ka.idle + ka.interval * ka.retries <= Duration::from_secs(30));
    assert_eq!(
        ConnectOptions::default().user_timeout,
        Some(Duration::from_secs(30))
    );
}

#[tokio::test]
async fn connect_times_out_when_server_never_answers() {
    // A listener that accepts TCP but never speaks TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let conn = listener.accept().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(conn);
    });
    let mut opts = ConnectOptions::default();
    opts.timeout = Duration::from_millis(300);
    let err = connect_tls(addr, &KeyHash::from_bytes([1; 32]), &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Timeout), "{err}");
}

#[tokio::test]
async fn blocks_round_trip_over_tls() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed448).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let mut client = conn.into_blocks();
    assert_eq!(client.kind(), CarrierKind::Tls);
    assert_eq!(client.alpn(), Some(&b"smp/1"[..]));

    let echo = tokio::spawn(async move {
        let mut srv = server.await.unwrap().0.unwrap().into_blocks();
        // Echo until the client closes, counting blocks.
        let mut n = 0;
        loop {
            match srv.read_block().await {
                Ok(b) => {
                    srv.write_block(&b[..]).await.unwrap();
                    n += 1;
                }
                Err(TransportError::Closed) => return n,
                Err(e) => panic!("server read: {e}"),
            }
        }
    });

    for seed in [1u8, 2, 3] {
        client.write_block(&block(seed)).await.unwrap();
    }
    for seed in [1u8, 2, 3] {
        assert_eq!(&client.read_block().await.unwrap()[..], &block(seed)[..]);
    }
    // A buffer that is not a block is refused before touching the socket.
    assert!(matches!(
        client.write_block(&[0; 100]).await,
        Err(TransportError::BadBlockSize(100))
    ));
    client.close().await.unwrap();
    assert_eq!(echo.await.unwrap(), 3);
}

#[tokio::test]
async fn truncated_block_is_reported() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let mut client = conn.into_blocks();
    let mut raw = server.await.unwrap().0.unwrap().into_inner();
    use tokio::io::AsyncWriteExt as _;
    raw.write_all(&[0x23; 1000]).await.unwrap();
    raw.shutdown().await.unwrap();
    assert!(matches!(
        client.read_block().await,
        Err(TransportError::Truncated(1000))
    ));
}

#[tokio::test]
async fn blocks_round_trip_over_websocket() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let echo = tokio::spawn(async move {
        let mut srv = server
            .await
            .unwrap()
            .0
            .unwrap()
            .accept_websocket()
            .await
            .unwrap();
        assert_eq!(srv.kind(), CarrierKind::WebSocket);
        for _ in 0..2 {
            let b = srv.read_block().await.unwrap();
            srv.write_block(&b[..]).await.unwrap();
        }
        srv.read_block().await
    });
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let mut client = conn.into_websocket().await.unwrap();
    assert_eq!(client.kind(), CarrierKind::WebSocket);
    assert_eq!(client.alpn(), Some(&b"smp/1"[..]));
    for seed in [7u8, 8] {
        client.write_block(&block(seed)).await.unwrap();
        assert_eq!(&client.read_block().await.unwrap()[..], &block(seed)[..]);
    }
    client.close().await.unwrap();
    assert!(matches!(echo.await.unwrap(), Err(TransportError::Closed)));
}

#[tokio::test]
async fn websocket_message_of_wrong_size_is_rejected() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let sender = tokio::spawn(async move {
        // A raw WebSocket server that sends messages of the wrong size.
        let tls = server.await.unwrap().0.unwrap().into_inner();
        let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
        ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
        ws.send(Message::binary(block(4))).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        ws.send(Message::binary(vec![0u8; BLOCK_SIZE + 1]))
            .await
            .unwrap();
        ws
    });
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let mut client = conn.into_websocket().await.unwrap();
    assert!(matches!(
        client.read_block().await,
        Err(TransportError::BadBlockSize(100))
    ));
    // A correct block after it is still delivered intact.
    assert_eq!(&client.read_block().await.unwrap()[..], &block(4)[..]);
    assert!(matches!(
        client.read_block().await,
        Err(TransportError::UnexpectedMessage("text"))
    ));
    // Larger than the 16384-byte frame limit: refused by the WebSocket layer itself.
    assert!(matches!(
        client.read_block().await,
        Err(TransportError::WebSocket(_))
    ));
    drop(sender.await.unwrap());
}

#[tokio::test]
async fn identity_survives_pem_round_trip() {
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed448).unwrap();
    let loaded = ServerIdentity::from_pem(&identity.to_pem().unwrap()).unwrap();
    assert_eq!(loaded.key_hash(), identity.key_hash());
    assert_eq!(loaded.algorithm(), SignatureAlgorithm::Ed448);
    let (addr, server) = serve_once(&loaded).await;
    connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    assert!(server.await.unwrap().0.is_ok());
}

#[tokio::test]
async fn cancelled_read_keeps_the_partial_block() {
    use tokio::io::AsyncWriteExt as _;
    let identity = ServerIdentity::generate(SignatureAlgorithm::Ed25519).unwrap();
    let (addr, server) = serve_once(&identity).await;
    let conn = connect_tls(addr, &identity.key_hash(), &ConnectOptions::default())
        .await
        .unwrap();
    let mut client = conn.into_blocks();
    let mut raw = server.await.unwrap().0.unwrap().into_inner();
    let data = block(42);
    raw.write_all(&data[..5000]).await.unwrap();
    raw.flush().await.unwrap();
    // The read is cancelled after the first 5000 bytes have arrived...
    let timed_out = tokio::time::timeout(Duration::from_millis(200), client.read_block()).await;
    assert!(timed_out.is_err());
    raw.write_all(&data[5000..]).await.unwrap();
    raw.flush().await.unwrap();
    // ...and the next read still returns the whole block.
    assert_eq!(&client.read_block().await.unwrap()[..], &data[..]);
}
