//! `grp+wss` from the dialer's side against the real reference relay on loopback: the GRP
//! handshake and records over TLS + WebSocket, and a TLS failure that is an error, not a hang.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grp_relay::config::Config;
use grp_relay::{Relay, RelayHandle};
use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::cover::CoverConfig;
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use muxd_transport::grp::{GrpCarrier, GrpCarrierKind};
use rand_core::OsRng;

/// The inner (SMP) version the relay speaks.
const V: u16 = 18;

async fn relay(dir: &tempfile::TempDir) -> RelayHandle {
    let mut c = Config::default();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    c.key_file = dir.path().join("key");
    c.listen.tcp = Some(any);
    c.listen.quic = None;
    c.listen.ws = Some(any);
    // No certificate files: the relay serves a generated self-signed certificate, which the
    // dialer accepts (the relay is authenticated by its Noise key).
    c.listen.wss = Some(any);
    c.cover.max_delay_ms = Some(20);
    Relay::start(c).await.unwrap()
}

/// Drives a client connection over `carrier` until `until` says stop (or 10 s pass);
/// returns every event seen.
async fn drive(
    carrier: &mut GrpCarrier,
    conn: &mut Connection,
    mut until: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        while let Some(t) = conn.poll_transmit() {
            carrier.send(&t).await.unwrap();
        }
        while let Some(ev) = conn.poll_event() {
            let stop = until(&ev);
            seen.push(ev);
            if stop {
                return seen;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out; events so far: {seen:?}"
        );
        let wake = conn.poll_timeout().map_or(deadline, |w| w.min(deadline));
        tokio::select! {
            r = carrier.recv() => match r {
                Ok(Some(d)) => conn.handle_input(Instant::now(), &d),
                // The relay ends a link by closing the stream, with or without a close frame.
                Ok(None) | Err(_) => conn.handle_eof(Instant::now()),
            },
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                conn.handle_timeout(Instant::now());
            }
        }
    }
}

#[tokio::test]
async fn handshake_and_records_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir).await;
    let addr = relay.addresses().wss.unwrap();
    let mut carrier = GrpCarrier::connect_named(GrpCarrierKind::Wss, addr, "localhost", "/grp")
        .await
        .unwrap();
    assert!(carrier.is_message_framed(), "one record per message");

    let mut cfg = ConnectionConfig::client(relay.public_key());
    cfg.preamble = false;
    cfg.cover = Some(CoverConfig {
        max_delay: Duration::from_millis(20),
        credit_max: 8,
    });
    let mut conn = Connection::new(cfg, Instant::now(), &mut OsRng);
    conn.handle_carrier_up(Instant::now());
    let events = drive(&mut carrier, &mut conn, |e| {
        matches!(e, Event::Connected { .. } | Event::Closed(_))
    })
    .await;
    let Some(Event::Connected { session_id, .. }) = events.last() else {
        panic!("no session: {events:?}");
    };

    // A PING goes out in a record and its PONG comes back in one.
    let corr = [7u8; 24];
    let a = Authorized::new(session_id, &corr, b"", b"PING").unwrap();
    let mut t = Vec::new();
    encode_transmission(V, &[], &a, &mut t).unwrap();
    conn.send(t, Instant::now()).unwrap();
    let events = drive(&mut carrier, &mut conn, |e| {
        matches!(e, Event::Transmission(_) | Event::Closed(_))
    })
    .await;
    let Some(Event::Transmission(reply)) = events.last() else {
        panic!("no reply: {events:?}");
    };
    let d = Transmission::decode(V, &[], reply).unwrap();
    assert_eq!(d.corr_id, &corr[..]);
    assert_eq!(d.command, b"PONG");

    conn.close(Instant::now());
    let events = drive(&mut carrier, &mut conn, |e| matches!(e, Event::Closed(_))).await;
    assert!(
        matches!(events.last(), Some(Event::Closed(CloseReason::Local))),
        "{events:?}"
    );
    carrier.close(false).await;

    let s = relay.snapshot();
    assert_eq!((s.accepted_wss, s.accepted_ws, s.accepted_tcp), (1, 0, 0));
    assert_eq!(s.client_links, 1);
    assert_eq!(s.commands.get("PING"), Some(&1));
    relay.shutdown().await;
}

#[tokio::test]
async fn wss_to_a_plain_port_fails_with_a_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir).await;
    // The plain WebSocket port reads the ClientHello as HTTP and closes.
    let ws = relay.addresses().ws.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        GrpCarrier::connect_named(GrpCarrierKind::Wss, ws, "localhost", "/grp"),
    )
    .await
    .expect("fails instead of hanging");
    let e = r.err().unwrap().to_string();
    assert!(e.contains("TLS handshake failed"), "{e}");
    // And plain WebSocket to the TLS port is no WebSocket either.
    let wss = relay.addresses().wss.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        GrpCarrier::connect(GrpCarrierKind::Ws, wss, "/grp"),
    )
    .await
    .expect("fails instead of hanging");
    assert!(r.is_err());
    relay.shutdown().await;
}
