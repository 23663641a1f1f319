//! Real-socket tests of the fault proxy on 127.0.0.1.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use muxd_faultproxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

/// An upstream that echoes every byte back, for any number of connections.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn proxy_to(upstream: SocketAddr) -> FaultProxy {
    FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Median round trip of a 1-byte ping over an echo connection.
async fn median_rtt(s: &mut TcpStream, rounds: usize) -> Duration {
    let mut rtts = Vec::with_capacity(rounds);
    let mut b = [0u8; 1];
    for i in 0..rounds {
        let t = Instant::now();
        s.write_all(&[i as u8]).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i as u8);
        rtts.push(t.elapsed());
    }
    rtts.sort();
    rtts[rounds / 2]
}

#[tokio::test]
async fn bytes_pass_through_unchanged_both_ways_and_are_counted() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    let mut s = connect(proxy.local_addr()).await;

    // 1 MiB of a non-repeating pattern, written and read concurrently.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = async { r.read_to_end(&mut back).await.unwrap() };
    let ((), n) = timeout(Duration::from_secs(10), async { tokio::join!(send, recv) })
        .await
        .unwrap();
    assert_eq!(n, data.len());
    assert!(back == data, "echoed bytes differ");

    let c = handle.counters();
    assert_eq!(c.accepted, 1);
    assert_eq!(c.bytes_up, data.len() as u64);
    assert_eq!(c.bytes_down, data.len() as u64);
    drop(s);
    // The client's close propagates; the connection is no longer active.
    timeout(Duration::from_secs(5), async {
        while handle.counters().active != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn added_delay_shows_in_the_round_trip() {
    const DELAY: Duration = Duration::from_millis(80);
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    proxy.handle().set_delay(DELAY);
    assert_eq!(proxy.handle().delay(), DELAY);

    let direct = median_rtt(&mut connect(upstream).await, 5).await;
    let via = median_rtt(&mut connect(proxy.local_addr()).await, 5).await;
    let added = via.saturating_sub(direct);
    // The delay applies once per direction, so a round trip gains twice the delay.
    assert!(
        added >= 2 * DELAY,
        "added {added:?}, direct {direct:?}, via {via:?}"
    );
    assert!(
        added < 2 * DELAY + Duration::from_millis(150),
        "added {added:?}"
    );

    // Lowered at runtime, new bytes see the new delay.
    proxy.handle().set_delay(Duration::ZERO);
    let mut s = connect(proxy.local_addr()).await;
    let fast = median_rtt(&mut s, 5).await;
    assert!(fast < DELAY, "{fast:?}");
}

#[tokio::test]
async fn delay_does_not_serialise_chunks() {
    const DELAY: Duration = Duration::from_millis(100);
    const CHUNKS: usize = 40;
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    proxy.handle().set_delay(DELAY);
    let mut s = connect(proxy.local_addr()).await;
    let (mut r, mut w) = s.split();

    let t0 = Instant::now();
    let send = async {
        for i in 0..CHUNKS {
            w.write_all(&[i as u8; 100]).await.unwrap();
            // Separate writes so the proxy reads separate chunks.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let recv = async {
        let mut got = vec![0u8; CHUNKS * 100];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, recv);
    let elapsed = t0.elapsed();
    // Order preserved.
    for (i, c) in got.chunks(100).enumerate() {
        assert!(c.iter().all(|b| *b == i as u8), "chunk {i} out of order");
    }
    // ~200 ms of send time + 2 × 100 ms; one chunk per delay would take 40 × 200 ms = 8 s.
    assert!(elapsed >= 2 * DELAY, "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn blackhole_stops_traffic_without_closing_then_recovers() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    let mut s = connect(proxy.local_addr()).await;
    median_rtt(&mut s, 1).await;
    let before = handle.counters();

    handle.blackhole(true);
    assert!(handle.is_blackholed());
    s.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    // Neither data nor EOF nor an error arrives: the read just times out.
    let r = timeout(Duration::from_millis(700), s.read(&mut buf)).await;
    assert!(r.is_err(), "expected silence, got {r:?}");
    let during = handle.counters();
    assert_eq!(during.bytes_up, before.bytes_up);
    assert_eq!(during.bytes_down, before.bytes_down);
    assert_eq!(during.active, 1);
    // The kernel still considers the socket connected.
    assert!(s.peer_addr().is_ok());
    s.write_all(b"more").await.unwrap();

    // Lifting it delivers what was held, in order.
    handle.blackhole(false);
    let mut back = [0u8; 8];
    timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"heldmore");
}

#[tokio::test]
async fn blackhole_holds_the_fin_too() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    let mut s = connect(proxy.local_addr()).await;
    median_rtt(&mut s, 1).await;
    handle.blackhole(true);
    s.shutdown().await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(500), s.read(&mut buf))
            .await
            .is_err(),
        "EOF must not get through a blackhole"
    );
    handle.blackhole(false);
    let n = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "the FIN arrives after the blackhole lifts");
}

#[tokio::test]
async fn reset_all_aborts_current_connections_only() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    let mut a = connect(proxy.local_addr()).await;
    let mut b = connect(proxy.local_addr()).await;
    median_rtt(&mut a, 1).await;
    median_rtt(&mut b, 1).await;
    // Even a blackholed connection is reset.
    handle.blackhole(true);
    handle.reset_all();

    for s in [&mut a, &mut b] {
        let mut buf = [0u8; 1];
        let r = timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("reset must be seen promptly");
        let err = r.expect_err("a reset connection reads an error, not EOF");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    }
    assert_eq!(handle.counters().resets, 1);

    // A connection made after the reset works.
    handle.blackhole(false);
    let mut c = connect(proxy.local_addr()).await;
    median_rtt(&mut c, 2).await;
    assert_eq!(handle.counters().accepted, 3);
}

#[tokio::test]
async fn refuse_new_resets_fresh_connections() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    let mut existing = connect(proxy.local_addr()).await;
    median_rtt(&mut existing, 1).await;

    handle.refuse_new(true);
    let mut s = connect(proxy.local_addr()).await;
    let mut buf = [0u8; 1];
    let r = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert_eq!(handle.counters().refused, 1);
    // The existing connection is untouched.
    median_rtt(&mut existing, 1).await;

    handle.refuse_new(false);
    median_rtt(&mut connect(proxy.local_addr()).await, 1).await;
    assert_eq!(handle.counters().accepted, 2);
}

#[tokio::test]
async fn paused_accept_leaves_clients_waiting_until_resumed() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let handle = proxy.handle();
    handle.pause_accept(true);
    // Let the accept loop observe the pause before connecting.
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The kernel completes the handshake from the backlog, but nothing is forwarded.
    let mut s = connect(proxy.local_addr()).await;
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(400), s.read(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(handle.counters().accepted, 0);

    handle.pause_accept(false);
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"x");
    assert_eq!(handle.counters().accepted, 1);
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    // Bind and drop a listener to get a port with nothing behind it.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = proxy_to(dead).await;
    let mut s = connect(proxy.local_addr()).await;
    let mut buf = [0u8; 1];
    let r = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert_eq!(proxy.handle().counters().upstream_failures, 1);
}

#[tokio::test]
async fn shutdown_resets_connections_and_stops_listening() {
    let upstream = echo_server().await;
    let proxy = proxy_to(upstream).await;
    let addr = proxy.local_addr();
    let mut s = connect(addr).await;
    median_rtt(&mut s, 1).await;
    timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let r = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open"
    );
}
