//! The relay against the real client pieces, over real sockets on 127.0.0.1.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use muxd_smp::address::SmpServer;
use muxd_smp::block::pad_block;
use muxd_smp::cert::SignatureAlgorithm;
use muxd_smp::command::{Command, Response, SubscriptionMode};
use muxd_smp::connection::{CommandError, ConnectionConfig};
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::RcvMsgBody;
use muxd_smp::error::{CmdError, ErrorType};
use muxd_smp::handshake::{ClientHello, VersionRange};
use muxd_smp::keys::{Ed25519SecretKey, X25519SecretKey};
use rand_core::OsRng;
use smp_devrelay::{Relay, RelayConfig, RelayHandle};
use support::{Client, RawClient, Recipient, dial, dial_without_alpn, message, send};

async fn relay_with(f: impl FnOnce(&mut RelayConfig)) -> RelayHandle {
    let mut config = RelayConfig::default();
    f(&mut config);
    Relay::start(config).await.unwrap()
}

async fn relay() -> RelayHandle {
    relay_with(|_| {}).await
}

fn ed25519() -> QueueAuthKey {
    QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut OsRng))
}

fn server_err(r: Result<Response, CommandError>) -> ErrorType {
    match r {
        Err(CommandError::Server(e)) => e,
        other => panic!("expected ERR, got {other:?}"),
    }
}

#[tokio::test]
async fn v18_handshake_with_block_encryption_and_printed_address() {
    let relay = relay().await;
    let addr: SmpServer = relay.address().parse().unwrap();
    assert_eq!(addr.key_hash, relay.key_hash().as_bytes());
    assert_eq!(addr.hosts, ["127.0.0.1"]);
    assert_eq!(addr.port, Some(relay.local_addr().port()));

    let mut c = Client::connect(&relay).await;
    assert_eq!((c.version, c.encrypted), (18, true));
    assert_eq!(c.cmd(b"", &Command::Ping, None).await, Ok(Response::Pong));
    let stats = relay.stats();
    assert_eq!(stats.handshakes_completed, 1);
    assert_eq!(stats.open_connections, 1);
    assert_eq!(stats.command_count("PING"), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn without_alpn_only_v6_is_offered_and_works() {
    let relay = relay().await;
    let (io, leaf) = dial_without_alpn(relay.local_addr(), &relay.key_hash()).await;
    let mut c = Client::handshake(io, leaf, relay.key_hash(), ConnectionConfig::default()).await;
    assert_eq!((c.version, c.encrypted), (6, false));

    // v6: session id on the wire, legacy NEW/IDS, SUB answered by OK.
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    assert_eq!(
        c.cmd(&r.snd_id(), &send(b"old"), None).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Ok)
    );
    let (entity, msg) = c.event().await;
    assert_eq!(entity, r.rcv_id());
    assert_eq!(message(&r, &msg).1, b"old");
}

#[tokio::test]
async fn new_key_send_sub_msg_ack_round_trip() {
    let relay = relay().await;
    let mut rcv = Client::connect(&relay).await;
    let mut snd = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut rcv, SubscriptionMode::OnlyCreate).await;
    assert_eq!(r.rcv_id().len(), 24);
    assert_ne!(r.rcv_id(), r.snd_id());

    // Unsecured queue: an unsigned SEND is accepted.
    assert_eq!(
        snd.cmd(&r.snd_id(), &send(b"hello"), None).await,
        Ok(Response::Ok)
    );
    // The recipient secures it (KEY); the same key again is fine, another one is AUTH.
    let sender_key = ed25519();
    let key_cmd = Command::Key(sender_key.public_key().to_spki());
    assert_eq!(
        rcv.cmd(&r.rcv_id(), &key_cmd, Some(&r.auth)).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        rcv.cmd(&r.rcv_id(), &key_cmd, Some(&r.auth)).await,
        Ok(Response::Ok)
    );
    let other = Command::Key(ed25519().public_key().to_spki());
    assert_eq!(
        server_err(rcv.cmd(&r.rcv_id(), &other, Some(&r.auth)).await),
        ErrorType::Auth
    );
    // Secured: unsigned SEND is AUTH, signed SEND is OK.
    assert_eq!(
        server_err(snd.cmd(&r.snd_id(), &send(b"x"), None).await),
        ErrorType::Auth
    );
    assert_eq!(
        snd.cmd(&r.snd_id(), &send(b"second"), Some(&sender_key))
            .await,
        Ok(Response::Ok)
    );

    // SUB: SOK, then the waiting message as a separate MSG with an empty corrId.
    assert_eq!(
        rcv.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Sok(None))
    );
    let (entity, msg) = rcv.event().await;
    assert_eq!(entity, r.rcv_id());
    let Response::Msg { msg_id, body } = &msg else {
        panic!("{msg:?}")
    };
    match r.open(msg_id, body) {
        RcvMsgBody::Message {
            notification,
            body,
            ts,
        } => {
            assert!(notification);
            assert_eq!(body, b"hello");
            assert!(ts > 1_700_000_000);
        }
        other => panic!("{other:?}"),
    }
    // One unacknowledged message at a time: nothing else arrives before the ACK.
    rcv.no_event_within(Duration::from_millis(200)).await;
    // ACK is answered by the next MSG (with the ACK's corrId), then by OK.
    let next = rcv
        .cmd(&r.rcv_id(), &Command::Ack(msg_id.clone()), Some(&r.auth))
        .await
        .unwrap();
    let (second_id, second) = message(&r, &next);
    assert_eq!(second, b"second");
    // A stale msgId is NO_MSG.
    assert_eq!(
        server_err(
            rcv.cmd(&r.rcv_id(), &Command::Ack(msg_id.clone()), Some(&r.auth))
                .await
        ),
        ErrorType::NoMsg
    );
    assert_eq!(
        rcv.cmd(&r.rcv_id(), &Command::Ack(second_id), Some(&r.auth))
            .await,
        Ok(Response::Ok)
    );

    // A message sent while subscribed and idle is pushed at once.
    snd.cmd(&r.snd_id(), &send(b"pushed"), Some(&sender_key))
        .await
        .unwrap();
    let (_, msg) = rcv.event().await;
    assert_eq!(message(&r, &msg).1, b"pushed");
    assert_eq!(relay.stats().subscribers, 1);
    assert_eq!(relay.stats().command_count("SEND"), 4);
}

#[tokio::test]
async fn skey_flow_and_subscribe_on_create() {
    let relay = relay().await;
    let mut rcv = Client::connect(&relay).await;
    let mut snd = Client::connect(&relay).await;
    let mut r = Recipient::new();
    // subMode S: subscribed on this connection by NEW itself.
    r.create(&mut rcv, SubscriptionMode::Subscribe).await;

    let k = ed25519();
    let skey = Command::SKey(k.public_key().to_spki());
    assert_eq!(
        snd.cmd(&r.snd_id(), &skey, Some(&k)).await,
        Ok(Response::Ok)
    );
    // Retry-safe: the same key again is OK.
    assert_eq!(
        snd.cmd(&r.snd_id(), &skey, Some(&k)).await,
        Ok(Response::Ok)
    );
    // SKEY must be signed by the key it sets.
    let k2 = ed25519();
    let skey2 = Command::SKey(k2.public_key().to_spki());
    assert_eq!(
        server_err(snd.cmd(&r.snd_id(), &skey2, Some(&k)).await),
        ErrorType::Auth
    );
    // A different key, properly self-signed, is still refused once secured.
    assert_eq!(
        server_err(snd.cmd(&r.snd_id(), &skey2, Some(&k2)).await),
        ErrorType::Auth
    );

    assert_eq!(
        snd.cmd(&r.snd_id(), &send(b"fast"), Some(&k)).await,
        Ok(Response::Ok)
    );
    let (entity, msg) = rcv.event().await;
    assert_eq!(entity, r.rcv_id());
    assert_eq!(message(&r, &msg).1, b"fast");
}

#[tokio::test]
async fn x25519_authenticator_queue_key() {
    let relay = relay().await;
    let mut c = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.auth = QueueAuthKey::X25519(X25519SecretKey::generate(&mut OsRng));
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Sok(None))
    );
    // Signed by some other key: AUTH.
    assert_eq!(
        server_err(c.cmd(&r.rcv_id(), &Command::Off, Some(&ed25519())).await),
        ErrorType::Auth
    );
}

#[tokio::test]
async fn second_subscriber_ends_the_first() {
    let relay = relay().await;
    let mut a = Client::connect(&relay).await;
    let mut b = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut a, SubscriptionMode::Subscribe).await;
    assert_eq!(
        b.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Sok(None))
    );
    let (entity, end) = a.event().await;
    assert_eq!((entity, end), (r.rcv_id(), Response::End));
    assert_eq!(relay.stats().subscribers, 1);

    // Messages now go to the new subscriber only.
    b.cmd(&r.snd_id(), &send(b"to b"), None).await.unwrap();
    let (_, msg) = b.event().await;
    assert_eq!(message(&r, &msg).1, b"to b");
    a.no_event_within(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn delete_notifies_the_subscriber_with_deld_or_end_below_v10() {
    for (max, expected) in [(18, Response::Deld), (9, Response::End)] {
        let relay = relay().await;
        let mut config = ConnectionConfig::default();
        config.versions = VersionRange::new(6, max).unwrap();
        let mut a = Client::connect_with(&relay, config, false).await;
        assert_eq!(a.version, max);
        let mut b = Client::connect(&relay).await;
        let mut r = Recipient::new();
        r.create(&mut a, SubscriptionMode::Subscribe).await;
        assert_eq!(
            b.cmd(&r.rcv_id(), &Command::Del, Some(&r.auth)).await,
            Ok(Response::Ok)
        );
        assert_eq!(a.event().await, (r.rcv_id(), expected));
        // The queue is gone.
        assert_eq!(
            server_err(b.cmd(&r.snd_id(), &send(b"x"), None).await),
            ErrorType::Auth
        );
        assert_eq!(relay.stats().queues, 0);
    }
}

#[tokio::test]
async fn quota_then_quota_marker_after_the_stored_messages() {
    let relay = relay_with(|c| c.quota = 3).await;
    let mut c = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    for i in 0..3u8 {
        assert_eq!(
            c.cmd(&r.snd_id(), &send(&[i]), None).await,
            Ok(Response::Ok)
        );
    }
    assert_eq!(
        server_err(c.cmd(&r.snd_id(), &send(b"4"), None).await),
        ErrorType::Quota
    );
    assert_eq!(
        server_err(c.cmd(&r.snd_id(), &send(b"5"), None).await),
        ErrorType::Quota
    );

    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Sok(None))
    );
    let (_, mut msg) = c.event().await;
    for i in 0..3u8 {
        let (id, body) = message(&r, &msg);
        assert_eq!(body, [i]);
        msg = c
            .cmd(&r.rcv_id(), &Command::Ack(id), Some(&r.auth))
            .await
            .unwrap();
    }
    let Response::Msg { msg_id, body } = &msg else {
        panic!("{msg:?}")
    };
    assert!(matches!(r.open(msg_id, body), RcvMsgBody::Quota { .. }));
    // The marker is ACKed like a message; the drained queue accepts messages again.
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Ack(msg_id.clone()), Some(&r.auth))
            .await,
        Ok(Response::Ok)
    );
    assert_eq!(
        c.cmd(&r.snd_id(), &send(b"again"), None).await,
        Ok(Response::Ok)
    );
}

#[tokio::test]
async fn authorization_rules() {
    let relay = relay().await;
    let mut c = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    // Signed SEND to a queue that is not secured yet: AUTH.
    assert_eq!(
        server_err(c.cmd(&r.snd_id(), &send(b"x"), Some(&ed25519())).await),
        ErrorType::Auth
    );
    // Missing credentials are caught before any lookup.
    let new = r.new_command(SubscriptionMode::OnlyCreate);
    assert_eq!(
        server_err(c.cmd(b"", &new, None).await),
        ErrorType::Cmd(CmdError::NoAuth)
    );
    assert_eq!(
        server_err(c.cmd(&r.rcv_id(), &Command::Sub, None).await),
        ErrorType::Cmd(CmdError::NoAuth)
    );
    assert_eq!(
        server_err(c.cmd(b"", &Command::Sub, Some(&r.auth)).await),
        ErrorType::Cmd(CmdError::NoEntity)
    );
    assert_eq!(
        server_err(c.cmd(b"", &send(b"x"), None).await),
        ErrorType::Cmd(CmdError::NoEntity)
    );
    assert_eq!(
        server_err(c.cmd(b"q", &Command::Ping, None).await),
        ErrorType::Cmd(CmdError::HasAuth)
    );
    // Unknown queue, and a recipient command signed by the wrong key: AUTH.
    assert_eq!(
        server_err(c.cmd(&[7; 24], &Command::Sub, Some(&r.auth)).await),
        ErrorType::Auth
    );
    assert_eq!(
        server_err(c.cmd(&r.rcv_id(), &Command::Sub, Some(&ed25519())).await),
        ErrorType::Auth
    );
    // Too large for v18.
    let big = send(&vec![0u8; 16049]);
    assert_eq!(
        server_err(c.cmd(&r.snd_id(), &big, None).await),
        ErrorType::LargeMsg
    );
    assert_eq!(
        c.cmd(&r.snd_id(), &send(&vec![0u8; 16048]), None).await,
        Ok(Response::Ok)
    );
}

#[tokio::test]
async fn get_ack_and_sub_get_exclusion() {
    let relay = relay().await;
    let mut c = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Get, Some(&r.auth)).await,
        Ok(Response::Ok)
    );
    c.cmd(&r.snd_id(), &send(b"polled"), None).await.unwrap();
    let got = c
        .cmd(&r.rcv_id(), &Command::Get, Some(&r.auth))
        .await
        .unwrap();
    let (id, body) = message(&r, &got);
    assert_eq!(body, b"polled");
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Ack(id), Some(&r.auth)).await,
        Ok(Response::Ok)
    );
    assert_eq!(
        server_err(c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await),
        ErrorType::Cmd(CmdError::Prohibited)
    );
    let info = c
        .cmd(&r.rcv_id(), &Command::Que, Some(&r.auth))
        .await
        .unwrap();
    let Response::Info(json) = info else {
        panic!("{info:?}")
    };
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["qiSize"], 0);
    assert_eq!(json["qiSnd"], false);
}

#[tokio::test]
async fn wrong_key_hash_in_client_hello_closes_the_connection() {
    let relay = relay().await;
    let (mut io, _leaf) = dial(relay.local_addr(), &relay.key_hash(), false).await;
    let _server_hello = io.read_block().await.unwrap();
    let hello = ClientHello {
        version: 18,
        key_hash: muxd_smp::cert::KeyHash::from_bytes([9; 32]),
        client_key: None,
        proxy_server: false,
    };
    io.write_block(&hello.encode_block().unwrap())
        .await
        .unwrap();
    let next = tokio::time::timeout(support::PATIENCE, io.read_block())
        .await
        .unwrap();
    assert!(next.is_err(), "the relay must close, not answer");
    // The failure is counted once the connection task has ended.
    for _ in 0..100 {
        if relay.stats().handshakes_failed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.stats().handshakes_failed, 1);
    assert_eq!(relay.stats().handshakes_completed, 0);
}

#[tokio::test]
async fn ed448_identity_works() {
    let relay = relay_with(|c| c.sign_algorithm = SignatureAlgorithm::Ed448).await;
    assert_eq!(relay.identity().algorithm(), SignatureAlgorithm::Ed448);
    let mut c = Client::connect(&relay).await;
    assert_eq!((c.version, c.encrypted), (18, true));
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::Subscribe).await;
    c.cmd(&r.snd_id(), &send(b"448"), None).await.unwrap();
    assert_eq!(message(&r, &c.event().await.1).1, b"448");
}

#[tokio::test]
async fn websocket_listener_carries_the_same_protocol() {
    let relay = relay_with(|c| c.ws_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let ws: SmpServer = relay.ws_address().unwrap().parse().unwrap();
    assert_eq!(ws.port, Some(relay.ws_local_addr().unwrap().port()));
    let mut c = Client::connect_with(&relay, ConnectionConfig::default(), true).await;
    assert_eq!((c.version, c.encrypted), (18, true));
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::Subscribe).await;
    c.cmd(&r.snd_id(), &send(b"over ws"), None).await.unwrap();
    assert_eq!(message(&r, &c.event().await.1).1, b"over ws");
    assert_eq!(relay.stats().websocket_connections, 1);
}

#[tokio::test]
async fn garbage_plain_block_is_err_block_and_the_connection_continues() {
    let relay = relay().await;
    let mut config = ConnectionConfig::default();
    config.block_encryption = false;
    let mut c = Client::connect_with(&relay, config, false).await;
    assert_eq!((c.version, c.encrypted), (18, false));
    let mut junk = Vec::new();
    pad_block(b"\x05junk", &mut junk).unwrap();
    c.write_raw(&junk).await;
    assert_eq!(
        c.event().await,
        (Vec::new(), Response::Err(ErrorType::Block))
    );
    assert_eq!(c.cmd(b"", &Command::Ping, None).await, Ok(Response::Pong));
    assert_eq!(relay.stats().bad_blocks, 1);
}

#[tokio::test]
async fn undecryptable_block_is_err_block_and_the_chain_survives() {
    let relay = relay().await;
    let (io, leaf) = dial(relay.local_addr(), &relay.key_hash(), false).await;
    let versions = VersionRange::new(6, 18).unwrap();
    let mut c = RawClient::connect(io, &leaf, relay.key_hash(), versions, true).await;
    assert!(c.session.block_cipher.is_some());
    // A block encrypted with the right chain step but corrupted: both chains advance.
    let ping = c.batch(&[1; 24], b"", &Command::Ping);
    let mut bad = c
        .session
        .block_cipher
        .as_mut()
        .unwrap()
        .encrypt_block(&ping)
        .unwrap();
    bad[100] ^= 0xff;
    c.io.write_block(&bad).await.unwrap();
    let got = c.read().await;
    assert_eq!(
        got,
        [(Vec::new(), Vec::new(), Response::Err(ErrorType::Block))]
    );
    // The next block decrypts fine.
    c.write_content(&ping).await;
    assert_eq!(c.read().await, [(vec![1; 24], Vec::new(), Response::Pong)]);
}

#[tokio::test]
async fn a_batch_of_commands_gets_a_batch_of_responses() {
    let relay = relay().await;
    let (io, leaf) = dial(relay.local_addr(), &relay.key_hash(), false).await;
    let versions = VersionRange::new(6, 18).unwrap();
    let mut c = RawClient::connect(io, &leaf, relay.key_hash(), versions, true).await;
    let mut content = vec![3u8];
    for i in 1..=3u8 {
        let one = c.batch(&[i; 24], b"", &Command::Ping);
        content.extend_from_slice(&one[1..]);
    }
    c.write_content(&content).await;
    let got = c.read().await;
    assert_eq!(got.len(), 3, "all three answers in one block");
    for (i, (corr, _, r)) in got.iter().enumerate() {
        assert_eq!(
            (corr.as_slice(), r),
            (&[i as u8 + 1; 24][..], &Response::Pong)
        );
    }
    // Bad command syntax inside a good block: CMD errors with the corrId.
    let mut unknown = c.batch(&[4; 24], b"", &Command::Ping);
    let n = unknown.len();
    unknown[n - 4..].copy_from_slice(b"PUNG");
    c.write_content(&unknown).await;
    assert_eq!(
        c.read().await,
        [(
            vec![4; 24],
            Vec::new(),
            Response::Err(ErrorType::Cmd(CmdError::Unknown))
        )]
    );
}

#[tokio::test]
async fn max_version_limits_the_offer() {
    let relay = relay_with(|c| c.max_version = 10).await;
    let mut c = Client::connect(&relay).await;
    // v10 has no block encryption; SUB is answered by OK below v16.
    assert_eq!((c.version, c.encrypted), (10, false));
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Ok)
    );
}

#[tokio::test]
async fn idle_connections_without_subscriptions_are_closed() {
    let relay = relay_with(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut idle = Client::connect(&relay).await;
    let mut busy = Client::connect(&relay).await;
    let mut r = Recipient::new();
    r.create(&mut busy, SubscriptionMode::Subscribe).await;
    assert!(idle.closed_by_server().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The subscribed connection survives the idle timeout.
    assert_eq!(
        busy.cmd(b"", &Command::Ping, None).await,
        Ok(Response::Pong)
    );
    assert_eq!(relay.stats().idle_closed, 1);
}

#[tokio::test]
async fn restart_keeps_address_queues_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = dir.path().join("certs");
    let log = dir.path().join("store.log");
    let config = |port: u16| {
        let (cert_dir, log) = (cert_dir.clone(), log.clone());
        move |c: &mut RelayConfig| {
            c.listen.set_port(port);
            c.cert_dir = Some(cert_dir);
            c.store_log = Some(log);
        }
    };
    let first = relay_with(config(0)).await;
    let port = first.local_addr().port();
    let address = first.address();
    let mut c = Client::connect(&first).await;
    let mut r = Recipient::new();
    r.create(&mut c, SubscriptionMode::OnlyCreate).await;
    c.cmd(&r.snd_id(), &send(b"kept"), None).await.unwrap();
    c.cmd(&r.snd_id(), &send(b"acked"), None).await.unwrap();
    drop(c);
    first.shutdown().await;

    let second = relay_with(config(port)).await;
    assert_eq!(second.address(), address);
    let mut c = Client::connect(&second).await;
    assert_eq!(
        c.cmd(&r.rcv_id(), &Command::Sub, Some(&r.auth)).await,
        Ok(Response::Sok(None))
    );
    let (id, body) = message(&r, &c.event().await.1);
    assert_eq!(body, b"kept");
    let next = c
        .cmd(&r.rcv_id(), &Command::Ack(id), Some(&r.auth))
        .await
        .unwrap();
    assert_eq!(message(&r, &next).1, b"acked");
    second.shutdown().await;
}

#[tokio::test]
async fn disconnect_all_drops_clients_but_keeps_listening() {
    let relay = relay().await;
    let mut c = Client::connect(&relay).await;
    relay.disconnect_all();
    assert!(c.closed_by_server().await);
    let mut again = Client::connect(&relay).await;
    assert_eq!(
        again.cmd(b"", &Command::Ping, None).await,
        Ok(Response::Pong)
    );
}

#[tokio::test]
async fn binary_prints_its_addresses_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smp-devrelay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--ws-listen",
            "127.0.0.1:0",
            "--quota",
            "5",
        ])
        .arg("--cert-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let address: SmpServer = lines.next().unwrap().unwrap().parse().unwrap();
    let ws_line = lines.next().unwrap().unwrap();
    let ws: SmpServer = ws_line.strip_prefix("ws: ").unwrap().parse().unwrap();
    assert_eq!(ws.key_hash, address.key_hash);
    assert!(dir.path().join("identity.pem").exists());

    // A real client gets through to the printed address.
    let key_hash =
        muxd_smp::cert::KeyHash::from_bytes(address.key_hash.clone().try_into().unwrap());
    let addr = format!("127.0.0.1:{}", address.port.unwrap())
        .parse()
        .unwrap();
    let (io, leaf) = dial(addr, &key_hash, false).await;
    let mut c = Client::handshake(io, leaf, key_hash, ConnectionConfig::default()).await;
    assert_eq!(c.cmd(b"", &Command::Ping, None).await, Ok(Response::Pong));

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// PRXY through relay P to relay R, then SEND to R's queue via PFWD → RFWD → RRES → PRES.
#[tokio::test]
async fn proxied_send_through_a_second_relay() {
    use muxd_smp::block::{BatchBuilder, decode_batch};
    use muxd_smp::cert::{CertPublicKey, SignedKey, key_hash};
    use muxd_smp::command::ServerRef;
    use muxd_smp::crypto::{cb_decrypt, cb_encrypt};
    use muxd_smp::keys::X25519PublicKey;
    use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};

    let dest = relay().await;
    let proxy = relay().await;
    let mut rcv = Client::connect(&dest).await;
    let mut r = Recipient::new();
    r.create(&mut rcv, SubscriptionMode::Subscribe).await;

    let (io, leaf) = dial(proxy.local_addr(), &proxy.key_hash(), false).await;
    let versions = VersionRange::new(6, 18).unwrap();
    let mut c = RawClient::connect(io, &leaf, proxy.key_hash(), versions, true).await;
    let prxy = Command::Prxy {
        server: ServerRef {
            hosts: vec!["127.0.0.1".into()],
            port: dest.local_addr().port().to_string(),
            key_hash: dest.key_hash().as_bytes().to_vec(),
        },
        basic_auth: None,
    };
    c.write_content(&c.batch(&[1; 24], b"", &prxy)).await;
    let mut got = c.read().await;
    let (corr, entity, Response::PKey(pkey)) = got.remove(0) else {
        panic!("{got:?}")
    };
    assert_eq!((corr, entity), (vec![1; 24], Vec::new()));
    assert_eq!((pkey.min_version, pkey.max_version), (8, 17));
    // The client checks the relay's identity and signed key, as for a direct connection.
    assert_eq!(key_hash(&pkey.cert_chain[1]), dest.key_hash());
    let signed = SignedKey::parse(&pkey.signed_key).unwrap();
    let dest_leaf = CertPublicKey::from_certificate(&pkey.cert_chain[0]).unwrap();
    dest_leaf.verify(signed.object, signed.signature).unwrap();
    let relay_key = X25519PublicKey::from_spki(signed.spki().unwrap()).unwrap();

    // The forwarded SEND, encoded for the relay (its session id implied, corrId = nonce).
    let forwarded = |body: &[u8], corr: [u8; 24], auth: Option<&QueueAuthKey>| {
        let v = pkey.max_version;
        let mut cmd = Vec::new();
        send(body).encode(v, &mut cmd).unwrap();
        let a = Authorized::new(&pkey.session_id, &corr, &r.snd_id(), &cmd).unwrap();
        let auth = auth.map(|k| k.authorize(a.as_bytes(), &corr, Some(&relay_key)).unwrap());
        let mut t = Vec::new();
        encode_transmission(v, auth.as_deref().unwrap_or_default(), &a, &mut t).unwrap();
        let mut batch = BatchBuilder::new();
        assert!(batch.push(&t));
        let cmd_key = X25519SecretKey::generate(&mut OsRng);
        let secret = cmd_key.diffie_hellman(&relay_key);
        let enc = cb_encrypt(&secret, &corr, &batch.take(), 16226).unwrap();
        let pfwd = Command::PFwd {
            version: v,
            key: cmd_key.public_key().to_spki(),
            enc,
        };
        (pfwd, secret)
    };
    for (corr, auth, expected) in [
        ([7u8; 24], Some(ed25519()), Response::Err(ErrorType::Auth)),
        ([8u8; 24], None, Response::Ok),
    ] {
        let (pfwd, secret) = forwarded(b"via proxy", corr, auth.as_ref());
        c.write_content(&c.batch(&corr, &pkey.session_id, &pfwd))
            .await;
        let mut got = c.read().await;
        let (got_corr, _, Response::PRes(enc)) = got.remove(0) else {
            panic!("{got:?}")
        };
        assert_eq!(got_corr, corr);
        let mut nonce = corr;
        nonce.reverse();
        let inner = cb_decrypt(&secret, &nonce, &enc).unwrap();
        let items = decode_batch(&inner).unwrap();
        let t = Transmission::decode(pkey.max_version, &pkey.session_id, items[0]).unwrap();
        assert_eq!(t.corr_id, corr);
        assert_eq!(
            Response::decode(pkey.max_version, t.command).unwrap(),
            expected
        );
    }
    let (_, msg) = rcv.event().await;
    assert_eq!(message(&r, &msg).1, b"via proxy");
    assert_eq!(dest.stats().command_count("RFWD"), 2);

    // An unknown relay session: ERR PROXY NO_SESSION.
    let (pfwd, _) = forwarded(b"x", [9; 24], None);
    c.write_content(&c.batch(&[9; 24], &[0; 32], &pfwd)).await;
    let got = c.read().await;
    assert_eq!(
        got[0].2,
        Response::Err(ErrorType::Proxy(muxd_smp::error::ProxyError::NoSession))
    );
}
