//! The relay over real sockets on 127.0.0.1, driven by the `muxd-grp` client.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use muxd_grp::block::GoodbyeReason;
use muxd_grp::connection::{CloseReason, ConnectionConfig};
use muxd_grp::error::GrpError;
use muxd_grp::proxy::{ForwardKey, ProxyKey, is_palindrome};
use muxd_grp::{HS_LEN, PREAMBLE, RECORD};
use muxd_smp::command::{Command, NewQueue, QueueRequest, Response, ServerRef, SubscriptionMode};
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::{RcvMsgBody, decrypt_msg_body};
use muxd_smp::error::{BrokerError, CmdError, ErrorType, ProxyError};
use muxd_smp::keys::{Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use rand_core::{OsRng, RngCore};
use rustls::pki_types::pem::PemObject as _;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn encode(cmd: &Command) -> Vec<u8> {
    let mut out = Vec::new();
    cmd.encode(V, &mut out).unwrap();
    out
}

fn response(cmd: &[u8]) -> Response {
    Response::decode(V, cmd).unwrap()
}

/// A recipient's queue: keys and ids.
struct Queue {
    rcv_key: QueueAuthKey,
    dh: X25519SecretKey,
    rcv_id: Vec<u8>,
    snd_id: Vec<u8>,
    srv_dh: X25519PublicKey,
}

async fn new_queue(c: &mut Client, subscribe: bool) -> Queue {
    let rcv_key = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut OsRng));
    let dh = X25519SecretKey::generate(&mut OsRng);
    let cmd = Command::New(NewQueue {
        rcv_auth_key: rcv_key.public_key().to_spki(),
        rcv_dh_key: dh.public_key().to_spki(),
        basic_auth: None,
        sub_mode: if subscribe {
            SubscriptionMode::Subscribe
        } else {
            SubscriptionMode::OnlyCreate
        },
        queue_request: Some(QueueRequest::Messaging(None)),
        ntf_creds: None,
    });
    let (_, r) = c.call(b"", &encode(&cmd), Some(&rcv_key)).await;
    let Response::Ids(ids) = response(&r) else {
        panic!("expected IDS, got {:?}", String::from_utf8_lossy(&r))
    };
    assert_eq!(ids.rcv_id.len(), 24);
    assert_eq!(ids.snd_id.len(), 24);
    assert_ne!(ids.rcv_id, ids.snd_id);
    Queue {
        rcv_key,
        dh,
        rcv_id: ids.rcv_id,
        snd_id: ids.snd_id,
        srv_dh: X25519PublicKey::from_spki(&ids.srv_dh_key).unwrap(),
    }
}

fn prxy(dest: &grp_relay::RelayHandle) -> Vec<u8> {
    prxy_at(dest, dest.addresses().tcp.port())
}

/// PRXY naming `dest`'s key but reached at `port` on loopback (a recording proxy, say).
fn prxy_at(dest: &grp_relay::RelayHandle, port: u16) -> Vec<u8> {
    encode(&Command::Prxy {
        server: ServerRef {
            hosts: vec!["127.0.0.1".into()],
            port: port.to_string(),
            key_hash: dest.public_key().to_vec(),
        },
        basic_auth: None,
    })
}

/// Sends `inner_cmd` on `snd_id` through the proxy session `pkey`; returns the inner answer.
async fn proxied(
    sender: &mut Client,
    pkey: &ProxyKey,
    d_static: [u8; 32],
    snd_id: &[u8],
    inner_cmd: &[u8],
    key: Option<&QueueAuthKey>,
) -> Result<Response, ErrorType> {
    let mut n = [0u8; 24];
    while {
        OsRng.fill_bytes(&mut n);
        is_palindrome(&n)
    } {}
    let k_pd = X25519PublicKey::from_bytes(pkey.auth_key);
    let inner = transmission(&pkey.session_id, &k_pd, n, snd_id, inner_cmd, key);
    let cmd_key = X25519SecretKey::generate(&mut OsRng);
    let k = ForwardKey::for_client(&cmd_key, &pkey.session_id, &pkey.auth_key, &d_static).unwrap();
    let enc = k.seal_command(&n, &inner).unwrap();
    let pfwd = encode(&Command::PFwd {
        version: V,
        key: cmd_key.public_key().to_spki(),
        enc,
    });
    sender.send_with(n, &pkey.session_id, &pfwd, None);
    let (entity, r) = sender.wait_for(&n).await;
    assert_eq!(entity, pkey.session_id, "PRES/ERR carry h_PD");
    match response(&r) {
        Response::PRes(enc_r) => {
            let t = k.open_response(&n, &enc_r).unwrap();
            let (corr, e, c) = decode(&t);
            assert_eq!(corr, n);
            assert_eq!(e, snd_id);
            Ok(response(&c))
        }
        Response::Err(e) => Err(e),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn handshake_over_each_carrier() {
    let relay = start(test_config(random_key())).await;
    for via in [Via::Tcp, Via::Quic, Via::Ws, Via::Wss] {
        let mut c = Client::connect(&relay, via).await;
        assert_eq!(c.cover_rate, 200, "client-link default rate");
        let (e, r) = c.call(b"", b"PING", None).await;
        assert!(e.is_empty());
        assert_eq!(response(&r), Response::Pong, "{via:?}");
        c.close();
        assert_eq!(
            c.wait_closed(Duration::from_secs(10)).await,
            Some(CloseReason::Local)
        );
    }
    let s = relay.snapshot();
    assert_eq!(
        (
            s.accepted_tcp,
            s.accepted_quic,
            s.accepted_ws,
            s.accepted_wss
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(s.client_links, 4);
    assert_eq!(s.commands.get("PING"), Some(&4));
    assert_eq!(s.handshake_failures, 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn command_rules_on_a_client_link() {
    let relay = start(test_config(random_key())).await;
    let mut c = Client::connect(&relay, Via::Tcp).await;
    let q = new_queue(&mut c, false).await;
    let err = |r: &[u8]| match response(r) {
        Response::Err(e) => e,
        other => panic!("expected ERR, got {other:?}"),
    };
    // Direct SEND is refused: two-hop routing cannot be skipped (§9.3).
    let (_, r) = c.call(&q.snd_id, b"SEND F hi", None).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::Prohibited));
    let (_, r) = c.call(b"", b"NKEY x", None).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::Unknown));
    let (_, r) = c.call(b"", b"RFWD x", None).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::Prohibited));
    // SUB without auth, and with a foreign key.
    let (_, r) = c.call(&q.rcv_id, b"SUB", None).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::NoAuth));
    let other = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut OsRng));
    let (_, r) = c.call(&q.rcv_id, b"SUB", Some(&other)).await;
    assert_eq!(err(&r), ErrorType::Auth);
    // GET then SUB on one connection is prohibited; GET on an empty queue is OK.
    let (_, r) = c.call(&q.rcv_id, b"GET", Some(&q.rcv_key)).await;
    assert_eq!(response(&r), Response::Ok);
    let (_, r) = c.call(&q.rcv_id, b"SUB", Some(&q.rcv_key)).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::Prohibited));
    let (_, r) = c.call(&q.rcv_id, b"ACK \x00", Some(&q.rcv_key)).await;
    assert_eq!(err(&r), ErrorType::NoMsg);
    let (_, r) = c.call(b"", b"PING", Some(&q.rcv_key)).await;
    assert_eq!(err(&r), ErrorType::Cmd(CmdError::HasAuth));
    // PRXY to ourselves is refused.
    let (_, r) = c.call(b"", &prxy(&relay), None).await;
    assert_eq!(
        err(&r),
        ErrorType::Proxy(ProxyError::Broker(BrokerError::Host))
    );
    // PFWD naming no session.
    let (_, r) = c.call(&[7u8; 32], b"PFWD \x00\x12\x00", None).await;
    assert_eq!(err(&r), ErrorType::Proxy(ProxyError::NoSession));
    let (_, r) = c.call(&q.rcv_id, b"DEL", Some(&q.rcv_key)).await;
    assert_eq!(response(&r), Response::Ok);
    let (_, r) = c.call(&q.rcv_id, b"DEL", Some(&q.rcv_key)).await;
    assert_eq!(err(&r), ErrorType::Auth);
    relay.shutdown().await;
}

/// SKEY through the proxy session `pkey`: secures `q` with a new sender key, returned.
async fn secure_via(
    b: &mut Client,
    pkey: &ProxyKey,
    d: &grp_relay::RelayHandle,
    q: &Queue,
) -> QueueAuthKey {
    let snd_key = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut OsRng));
    let skey = encode(&Command::SKey(snd_key.public_key().to_spki()));
    let r = proxied(b, pkey, d.public_key(), &q.snd_id, &skey, Some(&snd_key)).await;
    assert_eq!(r, Ok(Response::Ok));
    snd_key
}

#[tokio::test]
async fn two_hop_send_round_trip() {
    let d_secret = random_key();
    let p_secret = random_key();
    let mut d_cfg = test_config(d_secret);
    d_cfg.allow_relays = vec![URL_SAFE.encode(public_of(&p_secret))];
    let d = start(d_cfg).await;
    let p = start(test_config(p_secret)).await;

    // App A: a subscribed queue on D.
    let mut a = Client::connect(&d, Via::Tcp).await;
    let q = new_queue(&mut a, true).await;

    // App B: only connected to P.
    let mut b = Client::connect(&p, Via::Quic).await;
    let (e, r) = b.call(b"", &prxy(&d), None).await;
    assert!(e.is_empty());
    let pkey = ProxyKey::decode(&r).unwrap();
    assert_eq!((pkey.min_version, pkey.max_version), (18, 18));

    // SKEY through P secures the queue; then a signed SEND.
    let snd_key = secure_via(&mut b, &pkey, &d, &q).await;
    // An unsigned SEND to a secured queue is refused inside the box.
    let r = proxied(&mut b, &pkey, d.public_key(), &q.snd_id, b"SEND F x", None).await;
    assert_eq!(r, Ok(Response::Err(ErrorType::Auth)));
    let body = b"hello over two hops".to_vec();
    let mut send = b"SEND T ".to_vec();
    send.extend_from_slice(&body);
    let r = proxied(
        &mut b,
        &pkey,
        d.public_key(),
        &q.snd_id,
        &send,
        Some(&snd_key),
    )
    .await;
    assert_eq!(r, Ok(Response::Ok));

    // App A gets MSG (empty corrId) and opens it.
    let t = a.next().await.expect("MSG pushed");
    let (corr, entity, cmd) = decode(&t);
    assert!(corr.is_empty());
    assert_eq!(entity, q.rcv_id);
    let Response::Msg { msg_id, body: enc } = response(&cmd) else {
        panic!("expected MSG")
    };
    assert_eq!(enc.len(), 16122);
    let secret = q.dh.diffie_hellman(&q.srv_dh);
    match decrypt_msg_body(&secret, &msg_id, &enc).unwrap() {
        RcvMsgBody::Message {
            notification,
            body: got,
            ..
        } => {
            assert!(notification);
            assert_eq!(got, body);
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut ack = b"ACK ".to_vec();
    ack.push(24);
    ack.extend_from_slice(&msg_id);
    let (_, r) = a.call(&q.rcv_id, &ack, Some(&q.rcv_key)).await;
    assert_eq!(response(&r), Response::Ok);

    // A replayed RFWD nonce would be a duplicate; a wrong D static key fails at D.
    let r = proxied(&mut b, &pkey, random_key(), &q.snd_id, b"SEND F x", None).await;
    assert_eq!(
        r,
        Err(ErrorType::Proxy(ProxyError::Protocol(Box::new(
            ErrorType::Crypto
        ))))
    );

    let ds = d.snapshot();
    let ps = p.snapshot();
    // D never saw app B: one client link (app A), one relay link (P).
    assert_eq!(ds.client_links, 1);
    assert_eq!(ds.client_peers, vec![a.local]);
    assert!(!ds.client_peers.contains(&b.local));
    assert_eq!(ds.relay_links_in, 1);
    assert_eq!(ds.accepted_quic, 0, "app B's QUIC carrier went to P only");
    assert!(ds.relay_queue_ids.contains(&q.snd_id));
    assert!(!ds.client_queue_ids.contains(&q.snd_id));
    assert_eq!(ds.rfwd_received, 4);
    // P never learned the queue ids or the commands inside.
    assert!(!ps.client_queue_ids.contains(&q.snd_id));
    assert!(!ps.relay_queue_ids.contains(&q.snd_id));
    assert!(!ps.client_queue_ids.contains(&q.rcv_id));
    assert!(!ps.commands.contains_key("SEND") && !ps.commands.contains_key("SKEY"));
    assert_eq!(ps.commands.get("PFWD"), Some(&4));
    assert_eq!((ps.pfwd, ps.rfwd_sent), (4, 4));
    assert_eq!(
        ps.relay_links_out, 1,
        "one link to D shared by every forward"
    );
    p.shutdown().await;
    d.shutdown().await;
}

/// Relay-link renewal (§6.5, "relay-link initiators follow the same rules"), with P's
/// renewal moved to 3 s: a successor link is up before the old one goes; the old `h_PD` then
/// answers NO_SESSION (the client redoes PRXY), never a lost forward, and P says goodbye on
/// the old link. Sends made across renewals all arrive, once.
#[tokio::test]
async fn relay_link_is_renewed_make_before_break() {
    let d_secret = random_key();
    let p_secret = random_key();
    let mut d_cfg = test_config(d_secret);
    d_cfg.allow_relays = vec![URL_SAFE.encode(public_of(&p_secret))];
    let d = start(d_cfg).await;
    let mut p_cfg = test_config(p_secret);
    p_cfg.limits.relay_link_renew_after_secs = Some(3);
    let p = start(p_cfg).await;

    let mut a = Client::connect(&d, Via::Tcp).await;
    let q = new_queue(&mut a, true).await;
    let mut b = Client::connect(&p, Via::Tcp).await;
    async fn prxy_d(b: &mut Client, d: &grp_relay::RelayHandle) -> ProxyKey {
        let (_, r) = b.call(b"", &prxy(d), None).await;
        ProxyKey::decode(&r).unwrap()
    }
    let first = prxy_d(&mut b, &d).await;
    let snd_key = secure_via(&mut b, &first, &d, &q).await;

    // The renewal: a second link from P to D, while the first still stands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while p.snapshot().relay_links_out < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no successor link");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(d.snapshot().relay_links_in >= 2);
    let r = proxied(&mut b, &first, d.public_key(), &q.snd_id, b"SEND F x", None).await;
    assert_eq!(
        r,
        Err(ErrorType::Proxy(ProxyError::NoSession)),
        "the renewed link's h_PD must stop taking forwards"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while p.snapshot().relay_links_renewed < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old link was not closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Sends across further renewals: NO_SESSION means PRXY again, nothing else may fail.
    let mut pkey = prxy_d(&mut b, &d).await;
    assert_ne!(pkey.session_id, first.session_id);
    let mut no_session = 0;
    for i in 0..8u8 {
        let mut send = b"SEND F renewal ".to_vec();
        send.push(b'0' + i);
        loop {
            let r = proxied(
                &mut b,
                &pkey,
                d.public_key(),
                &q.snd_id,
                &send,
                Some(&snd_key),
            )
            .await;
            match r {
                Ok(Response::Ok) => break,
                Err(ErrorType::Proxy(ProxyError::NoSession)) => {
                    no_session += 1;
                    pkey = prxy_d(&mut b, &d).await;
                }
                other => panic!("send {i}: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut got = Vec::new();
    while got.len() < 8 {
        let t = tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .expect("MSG")
            .expect("MSG pushed");
        let (_, _, cmd) = decode(&t);
        let Response::Msg { msg_id, body: enc } = response(&cmd) else {
            continue;
        };
        let secret = q.dh.diffie_hellman(&q.srv_dh);
        if let RcvMsgBody::Message { body, .. } = decrypt_msg_body(&secret, &msg_id, &enc).unwrap()
        {
            got.push(body);
        }
        let mut ack = b"ACK ".to_vec();
        ack.push(24);
        ack.extend_from_slice(&msg_id);
        a.send_with([7; 24], &q.rcv_id, &ack, Some(&q.rcv_key));
    }
    let want: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            let mut b = b"renewal ".to_vec();
            b.push(b'0' + i);
            b
        })
        .collect();
    assert_eq!(got, want, "in order, once");
    eprintln!(
        "relay links out: {}, NO_SESSION re-PRXYs: {no_session}",
        p.snapshot().relay_links_out
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn relay_link_from_unlisted_key_is_refused_silently() {
    let d = start(test_config(random_key())).await;
    // A P that is not on D's allow-list: PRXY fails with BROKER NETWORK.
    let p = start(test_config(random_key())).await;
    let mut b = Client::connect(&p, Via::Tcp).await;
    let (_, r) = b.call(b"", &prxy(&d), None).await;
    assert_eq!(
        response(&r),
        Response::Err(ErrorType::Proxy(ProxyError::Broker(BrokerError::Network(
            None
        ))))
    );

    // Byte level: preamble + message 1 with role 'R' from an unlisted key gets no byte back,
    // and the close comes FAIL_DELAY after message 1, the same as for garbage.
    let unlisted = relay_link_config(&d, random_key());
    let (_, msg1) = muxd_grp::handshake::Initiator::start(unlisted.handshake, &mut OsRng).unwrap();
    let mut garbage = vec![0u8; HS_LEN];
    OsRng.fill_bytes(&mut garbage);
    let mut timings = Vec::new();
    for m1 in [msg1, garbage] {
        let mut s = TcpStream::connect(d.addresses().tcp).await.unwrap();
        s.write_all(&PREAMBLE).await.unwrap();
        s.write_all(&m1).await.unwrap();
        let sent = Instant::now();
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "nothing is sent before the handshake completes");
        timings.push(sent.elapsed());
    }
    for t in &timings {
        assert!(
            *t >= Duration::from_millis(900) && *t < Duration::from_millis(2500),
            "{t:?}"
        );
    }
    // Through the client state machine: the initiator sees the carrier close (NETWORK).
    let (carrier, local) = open_carrier(&d, Via::Tcp).await;
    let r = Client::over(carrier, local, relay_link_config(&d, random_key())).await;
    assert_eq!(r.err(), Some(CloseReason::Error(GrpError::Network)));
    let s = d.snapshot();
    assert_eq!(s.relay_links_in, 0);
    assert!(s.handshake_failures >= 4, "{}", s.handshake_failures);
    p.shutdown().await;
    d.shutdown().await;
}

/// Checks one direction of a recorded TCP stream: optional preamble, one 2500-byte
/// handshake record, then whole 16400-byte records only. Returns the record count.
fn check_shape(bytes: &[u8], preamble: bool) -> usize {
    let mut rest = bytes;
    if preamble {
        assert_eq!(&rest[..4], &PREAMBLE);
        rest = &rest[4..];
    }
    assert!(rest.len() >= HS_LEN, "{} bytes", bytes.len());
    let after = rest.len() - HS_LEN;
    assert_eq!(after % RECORD, 0, "{} bytes after the handshake", after);
    after / RECORD
}

#[tokio::test]
async fn wire_carries_only_fixed_size_units() {
    let p_secret = random_key();
    let mut d_cfg = test_config(random_key());
    d_cfg.allow_relays = vec![URL_SAFE.encode(public_of(&p_secret))];
    let d = start(d_cfg).await;
    let p = start(test_config(p_secret)).await;

    // A client link through a recording proxy.
    let (proxy_addr, rec) = recording_proxy(d.addresses().tcp).await;
    let s = TcpStream::connect(proxy_addr).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut cfg = ConnectionConfig::client(d.public_key());
    cfg.cover = Some(FAST);
    let mut c = Client::over(
        grp_relay::carrier::Carrier::Tcp(grp_relay::carrier::tcp::TcpCarrier::new(s)),
        local,
        cfg,
    )
    .await
    .unwrap();
    let q = new_queue(&mut c, true).await;
    let (_, r) = c.call(b"", b"PING", None).await;
    assert_eq!(response(&r), Response::Pong);
    // A larger transmission (an unknown tag) still travels in one fixed-size record.
    let big = vec![b'X'; 3000];
    let (_, r) = c.call(&q.rcv_id, &big, None).await;
    assert_eq!(
        response(&r),
        Response::Err(ErrorType::Cmd(CmdError::Unknown))
    );

    // A relay link (P → D) through another recording proxy: PRXY names D's key and the
    // proxy's port, so P's link carries its traffic through the recorder.
    let (link_addr, link_rec) = recording_proxy(d.addresses().tcp).await;
    let mut b = Client::connect(&p, Via::Tcp).await;
    let (_, r) = b.call(b"", &prxy_at(&d, link_addr.port()), None).await;
    ProxyKey::decode(&r).unwrap();
    // Relay links default to 2 cover records/s each way.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.close();
    c.wait_closed(Duration::from_secs(10)).await;
    p.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (up, down) = {
        let g = rec.lock().unwrap();
        (
            check_shape(&g.to_relay, true),
            check_shape(&g.to_client, false),
        )
    };
    // NEW, PING, the big one and the goodbye at least; IDS, PONG, ERR each in its record.
    assert!(up >= 4, "{up} records up");
    assert!(down >= 3, "{down} records down");
    let (up, down) = {
        let g = link_rec.lock().unwrap();
        (
            check_shape(&g.to_relay, true),
            check_shape(&g.to_client, false),
        )
    };
    // P's goodbye at shutdown, and cover (2/s each way for 2.5 s: P(none at all) ≈ e^-10).
    assert!(
        up >= 1 && up + down >= 2,
        "relay link: {up} up, {down} down"
    );
    assert_eq!(d.snapshot().relay_links_in, 1);
    d.shutdown().await;
}

#[tokio::test]
async fn cover_records_flow_when_idle() {
    let mut cfg = test_config(random_key());
    // 2 records/s in both directions.
    cfg.cover.min_rate = 2000;
    cfg.cover.max_rate = 2000;
    let relay = start(cfg).await;
    let c = Client::connect(&relay, Via::Tcp).await;
    assert_eq!(c.cover_rate, 2000, "clamped up to the operator minimum");
    let before = relay.snapshot();
    let secs = 5.0;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let after = relay.snapshot();
    let sent = after.cover_sent - before.cover_sent;
    let received = after.cover_received - before.cover_received;
    // Each direction is Poisson with mean 10 over 5 s; both together mean 20. The bounds
    // fail with probability below 1e-4.
    for n in [sent, received] {
        assert!((1..=30).contains(&n), "sent {sent}, received {received}");
    }
    assert!(
        (5..=45).contains(&(sent + received)),
        "sent {sent}, received {received}"
    );
    assert_eq!(after.real_sent, before.real_sent, "idle: nothing but cover");
    relay.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_says_goodbye() {
    let relay = start(test_config(random_key())).await;
    let mut tcp = Client::connect(&relay, Via::Tcp).await;
    let mut ws = Client::connect(&relay, Via::Ws).await;
    let mut quic = Client::connect(&relay, Via::Quic).await;
    let mut wss = Client::connect(&relay, Via::Wss).await;
    let counters = relay.counters();
    let t = Instant::now();
    relay.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for c in [&mut tcp, &mut ws, &mut quic, &mut wss] {
        assert_eq!(
            c.wait_closed(Duration::from_secs(5)).await,
            Some(CloseReason::Goodbye(GoodbyeReason::Shutdown))
        );
    }
    assert_eq!(counters.snapshot().goodbyes_sent, 4);
}

#[tokio::test]
async fn websocket_refuses_other_requests_with_404() {
    let relay = start(test_config(random_key())).await;
    let ws = relay.addresses().ws.unwrap();
    for (path, proto) in [("/other", "grp.1"), ("/grp", "grp.2")] {
        let mut s = TcpStream::connect(ws).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {proto}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn overload_is_refused_like_a_bad_handshake() {
    let mut cfg = test_config(random_key());
    cfg.limits.max_connections = 1;
    let relay = start(cfg).await;
    let first = Client::connect(&relay, Via::Tcp).await;
    let (carrier, local) = open_carrier(&relay, Via::Tcp).await;
    let mut cfg = ConnectionConfig::client(relay.public_key());
    cfg.cover = Some(FAST);
    let t = Instant::now();
    let r = Client::over(carrier, local, cfg).await;
    assert_eq!(r.err(), Some(CloseReason::Error(GrpError::Network)));
    // Closed FAIL_DELAY after message 1, as for any refused handshake (§5.7).
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let s = relay.snapshot();
    assert_eq!((s.client_links, s.handshake_failures), (1, 1));
    drop(first);
    relay.shutdown().await;
}

/// A self-signed certificate for `name` as (certificate PEM, PKCS#8 key PEM).
fn pem_pair(name: &str) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (
        pem("CERTIFICATE", c.cert.der()),
        pem("PRIVATE KEY", &c.signing_key.serialize_der()),
    )
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn wss_serves_the_operators_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pem_pair("relay.example");
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let mut cfg = test_config(random_key());
    cfg.listen.tls_cert = Some(dir.path().join("cert.pem"));
    cfg.listen.tls_key = Some(dir.path().join("key.pem"));
    let relay = start(cfg).await;
    let wss = relay.addresses().wss.unwrap();
    assert!(
        relay.urls().contains(&format!(
            "grp+wss://{}@127.0.0.1:{}",
            URL_SAFE.encode(relay.public_key()),
            wss.port()
        )),
        "{:?}",
        relay.urls()
    );

    // A verifying client (as a CDN in front of the relay would be) that trusts only the
    // operator's certificate accepts what the listener serves, and gets ALPN http/1.1.
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    roots.add(der.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(wss).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("relay.example").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("the operator's certificate verifies");
    let (_, conn) = stream.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(conn.peer_certificates().unwrap()[0], der);
    drop(stream);

    // And GRP runs over it.
    let mut c = Client::connect(&relay, Via::Wss).await;
    let (_, r) = c.call(b"", b"PING", None).await;
    assert_eq!(response(&r), Response::Pong);
    assert_eq!(relay.snapshot().accepted_wss, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn wss_certificate_errors_name_the_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = pem_pair("relay.example");
    let (_, other_key) = pem_pair("relay.example");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, &cert).unwrap();
    let start_err = |cert: &std::path::Path, key: &std::path::Path| {
        let mut cfg = test_config(random_key());
        cfg.listen.tls_cert = Some(cert.to_owned());
        cfg.listen.tls_key = Some(key.to_owned());
        async move {
            grp_relay::Relay::start(cfg)
                .await
                .expect_err("the relay refuses to start")
                .to_string()
        }
    };
    // The key file is missing.
    let e = start_err(&cert_path, &key_path).await;
    assert!(e.contains("listen.tls_key") && e.contains("key.pem"), "{e}");
    // The certificate file holds no certificate.
    std::fs::write(&key_path, &other_key).unwrap();
    let e = start_err(&key_path, &key_path).await;
    assert!(e.contains("listen.tls_cert"), "{e}");
    // The key does not belong to the certificate.
    let e = start_err(&cert_path, &key_path).await;
    assert!(e.contains("listen.tls_key"), "{e}");
}

#[tokio::test]
async fn wss_and_ws_listeners_do_not_speak_each_other() {
    let relay = start(test_config(random_key())).await;
    let a = relay.addresses();
    // TLS to the plain port and plain HTTP to the TLS port both fail quickly.
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        grp_relay::carrier::ws::WsCarrier::connect_tls(a.ws.unwrap(), "localhost", "/grp"),
    )
    .await
    .expect("no hang");
    assert!(tls.is_err());
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        grp_relay::carrier::ws::WsCarrier::connect(a.wss.unwrap(), "/grp"),
    )
    .await
    .expect("no hang");
    assert!(plain.is_err());
    let s = relay.snapshot();
    assert_eq!((s.accepted_ws, s.accepted_wss), (0, 0));
    relay.shutdown().await;
}
