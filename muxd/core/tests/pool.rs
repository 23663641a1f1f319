//! The pool against a scripted SMP server, in memory, on a virtual clock.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use muxd_core::{
    ConnState, Envelope, Jitter, MAX_BODY_LEN, PoolConfig, PoolError, PoolEvent, PoolReply,
    PoolRequest, ServerPolicy, Subscription,
};
use muxd_smp::address::QueueUri;
use muxd_smp::e2e::{ClientMessage, ClientMsgEnvelope, PrivHeader};
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use support::Net;

fn sent(net: &Net, token: muxd_core::RequestToken) -> String {
    match net.reply(token) {
        Ok(PoolReply::Sent { message_id }) => message_id.clone(),
        other => panic!("send: {other:?}"),
    }
}

fn send_request(uri: &str, body: &[u8]) -> PoolRequest {
    PoolRequest::Send {
        queue_uri: uri.to_owned(),
        body: body.to_vec(),
        wait: true,
    }
}

fn upstream_reason(result: &Result<PoolReply, PoolError>) -> String {
    match result {
        Err(PoolError::Upstream { reason, .. }) => reason.clone(),
        other => panic!("expected an upstream error, got {other:?}"),
    }
}

fn bodies(net: &Net, app: &str, queue_id: &str) -> Vec<Vec<u8>> {
    net.pool
        .messages(app, queue_id, None)
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect()
}

#[test]
fn fast_flow_create_send_receive_ack() {
    for version in [9, 11, 16, 18] {
        let mut net = Net::new(version, u64::from(version));
        let (queue_id, uri) = net.create_queue("alice");
        assert!(uri.contains("&q=m"), "v{version}: {uri}");
        assert_eq!(queue_id, Net::b64(net.server.queues.keys().next().unwrap()));

        let first = net.send("bob", &uri, b"hello");
        let second = net.send("bob", &uri, b"again");
        sent(&net, first);
        sent(&net, second);

        // SKEY once, signed; then two signed SENDs.
        assert_eq!(net.server.count("SKEY"), 1, "v{version}");
        let sends: Vec<_> = net.server.seen.iter().filter(|s| s.tag == "SEND").collect();
        assert_eq!(sends.len(), 2);
        assert!(
            sends.iter().all(|s| s.signed),
            "v{version}: fast flow signs every SEND"
        );
        assert_eq!(net.server.version(1), version);

        assert_eq!(
            bodies(&net, "alice", &queue_id),
            [b"hello".to_vec(), b"again".to_vec()]
        );
        let arrived = net
            .events
            .iter()
            .filter(|e| matches!(e, PoolEvent::MessageArrived { app, .. } if app == "alice"))
            .count();
        assert_eq!(arrived, 2);
        // The pool ACKed both to the server, which holds nothing more.
        assert_eq!(net.server.count("ACK"), 2);
        assert!(net.server.queues.values().all(|q| q.msgs.is_empty()));

        let msgs = net.pool.messages("alice", &queue_id, Some(1)).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, b"hello");
        assert!(msgs[0].ts > 1_700_000_000);
        net.pool.ack("alice", &queue_id, &msgs[0].msg_id).unwrap();
        assert_eq!(bodies(&net, "alice", &queue_id), [b"again".to_vec()]);
        assert!(matches!(
            net.pool.ack("alice", &queue_id, &msgs[0].msg_id),
            Err(PoolError::NotFound(_))
        ));
        // One connection carried both apps.
        assert_eq!(net.connects, 1);
    }
}

#[test]
fn legacy_key_flow_at_v6_to_v8() {
    for version in [6, 7, 8] {
        let mut net = Net::new(version, 100 + u64::from(version));
        let (queue_id, uri) = net.create_queue("alice");
        assert!(!uri.contains("q=m"), "v{version}: {uri}");
        let first = net.submit("bob", send_request(&uri, b"one"));
        let second = net.submit("bob", send_request(&uri, b"two"));
        net.run();
        sent(&net, first);
        // The second, signed SEND raced the recipient's KEY and got ERR AUTH; it is retried.
        assert!(!net.replies.contains_key(&second), "v{version}");
        net.advance(Duration::from_secs(3));
        sent(&net, second);

        assert_eq!(net.server.count("SKEY"), 0);
        assert_eq!(
            net.server.count("KEY"),
            1,
            "the recipient secured the queue"
        );
        let sends: Vec<bool> = net
            .server
            .seen
            .iter()
            .filter(|s| s.tag == "SEND")
            .map(|s| s.signed)
            .collect();
        assert_eq!(
            sends,
            [false, true, true],
            "v{version}: unsigned confirmation, retried SEND"
        );
        assert_eq!(
            bodies(&net, "alice", &queue_id),
            [b"one".to_vec(), b"two".to_vec()]
        );
        assert_eq!(net.reply_order, {
            let mut o = net.reply_order.clone();
            o.sort();
            o
        });
    }
}

#[test]
fn legacy_flow_when_the_uri_does_not_allow_sender_securing() {
    let mut net = Net::new(18, 7);
    let (queue_id, uri) = net.create_queue("alice");
    let uri = uri.replace("&q=m", "").replace("&k=s", "");
    for i in 0..3u8 {
        net.send("bob", &uri, &[i]);
    }
    net.advance(Duration::from_secs(10));
    assert_eq!(net.server.count("SKEY"), 0);
    assert_eq!(net.server.count("KEY"), 1);
    assert_eq!(
        bodies(&net, "alice", &queue_id),
        [vec![0], vec![1], vec![2]]
    );
}

#[test]
fn longest_body_fits_the_legacy_confirmation() {
    let mut net = Net::new(6, 8);
    let (queue_id, uri) = net.create_queue("alice");
    let body: Vec<u8> = (0..MAX_BODY_LEN).map(|i| (i % 251) as u8).collect();
    let token = net.send("bob", &uri, &body);
    sent(&net, token);
    assert_eq!(
        bodies(&net, "alice", &queue_id),
        std::slice::from_ref(&body)
    );
    let too_long = net.send("bob", &uri, &[0; MAX_BODY_LEN + 1]);
    assert!(matches!(
        net.reply(too_long),
        Err(PoolError::InvalidArgument(_))
    ));
}

#[test]
fn a_thousand_messages_keep_their_order() {
    let mut net = Net::new(18, 9);
    // Room for the whole burst: the pipeline outruns one-at-a-time delivery.
    net.server.quota = 1000;
    let (queue_id, uri) = net.create_queue("alice");
    let tokens: Vec<_> = (0..1000u32)
        .map(|i| net.submit("bob", send_request(&uri, &i.to_be_bytes())))
        .collect();
    net.run();
    assert_eq!(
        net.reply_order[1..],
        tokens[..],
        "Sent replies in submission order"
    );
    for t in &tokens {
        sent(&net, *t);
    }
    let got = bodies(&net, "alice", &queue_id);
    let want: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, want);
    assert_eq!(net.server.count("SEND"), 1000, "no retries");
}

#[test]
fn long_runs_keep_their_order_through_quota_retries() {
    let mut net = Net::new(18, 21);
    let (queue_id, uri) = net.create_queue("alice");
    let tokens: Vec<_> = (0..400u32)
        .map(|i| net.submit("bob", send_request(&uri, &i.to_be_bytes())))
        .collect();
    net.run();
    let mut rounds = 0;
    while net.replies.len() < 401 {
        rounds += 1;
        assert!(rounds < 100, "stuck at {} replies", net.replies.len());
        net.advance(Duration::from_secs(301));
    }
    assert!(rounds > 1, "the default 128-message quota was hit");
    assert!(net.server.count("SEND") > 400);
    assert_eq!(
        net.reply_order[1..],
        tokens[..],
        "Sent replies in submission order"
    );
    let want: Vec<Vec<u8>> = (0..400u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(bodies(&net, "alice", &queue_id), want);
}

/// What a sender other than the pool would SEND to the queue of `uri`: a confirmation whose
/// private body is exactly `body` (so it may carry any app envelope, or none).
/// The sender's e2e key is `sender`: a queue accepts confirmations from one sender only.
fn foreign_send(
    rng: &mut ChaCha20Rng,
    sender: &X25519SecretKey,
    uri: &str,
    body: Vec<u8>,
) -> Vec<u8> {
    let uri: QueueUri = uri.parse().unwrap();
    let recipient = X25519PublicKey::from_spki(&uri.dh_key).unwrap();
    let msg = ClientMessage {
        header: PrivHeader::Empty,
        body,
    };
    ClientMsgEnvelope::seal_confirmation(rng, 4, sender, &recipient, &msg)
        .unwrap()
        .encode()
        .unwrap()
}

#[test]
fn envelopes_are_checked_and_copies_dropped_by_seq() {
    let mut net = Net::new(18, 30);
    let (queue_id, uri) = net.create_queue("alice");
    let rcv_id = Net::rcv_id(&queue_id);
    let mut rng = ChaCha20Rng::seed_from_u64(30);
    let sender = X25519SecretKey::generate(&mut rng);
    let env = |seq: u64, payload: &[u8]| Envelope { seq, payload }.to_bytes();
    let mut version_2 = env(2, b"from the future");
    version_2[1] = 2;
    let arrivals = [
        env(1, b"one"),
        b"a SimpleX agent message".to_vec(),
        env(1, b"one, resent"),
        version_2,
        // 2 was overtaken by 3 (refused, then resent): late, but once.
        env(3, b"three"),
        env(2, b"two, late"),
        env(2, b"two, resent"),
        env(4, b""),
        // A gap (the sender gave up on 5..99); then something older than the window.
        env(100, b"hundred"),
        env(20, b"too old to tell"),
    ];
    for body in arrivals {
        let sealed = foreign_send(&mut rng, &sender, &uri, body);
        let out = net.server.inject(&rcv_id, sealed);
        net.route(out);
        net.run();
    }
    assert_eq!(
        bodies(&net, "alice", &queue_id),
        [
            b"one".to_vec(),
            b"three".to_vec(),
            b"two, late".to_vec(),
            Vec::new(),
            b"hundred".to_vec()
        ]
    );
    let arrived = net
        .events
        .iter()
        .filter(|e| matches!(e, PoolEvent::MessageArrived { .. }))
        .count();
    assert_eq!(arrived, 5);
    let info = &net.pool.queues("alice")[0];
    assert_eq!(info.duplicates_suppressed, 3);
    assert_eq!(info.malformed_rejected, 2);
    assert!(
        info.last_error.as_ref().unwrap().contains("version 2"),
        "{info:?}"
    );
    assert_eq!(net.pool.duplicates_suppressed(), 3);
    assert_eq!(net.pool.malformed_rejected(), 2);
    // Every one was ACKed, the dropped ones too: nothing blocks the queue.
    assert_eq!(net.server.count("ACK"), 10);
    assert!(net.server.queues[&rcv_id].msgs.is_empty());
}

#[test]
fn apps_cannot_see_or_touch_each_others_queues() {
    let mut net = Net::new(18, 10);
    let (queue_id, uri) = net.create_queue("alice");
    net.send("bob", &uri, b"for alice");
    assert_eq!(net.pool.queues("alice").len(), 1);
    assert_eq!(net.pool.queues("alice")[0].waiting, 1);
    assert!(net.pool.queues("bob").is_empty());
    assert!(matches!(
        net.pool.messages("bob", &queue_id, None),
        Err(PoolError::NotFound(_))
    ));
    let msg_id = net.pool.messages("alice", &queue_id, None).unwrap()[0]
        .msg_id
        .clone();
    assert!(matches!(
        net.pool.ack("bob", &queue_id, &msg_id),
        Err(PoolError::NotFound(_))
    ));
    let delete = net.request(
        "bob",
        PoolRequest::DeleteQueue {
            queue_id: queue_id.clone(),
        },
    );
    assert!(matches!(net.reply(delete), Err(PoolError::NotFound(_))));
    assert_eq!(net.server.count("DEL"), 0);
    assert_eq!(bodies(&net, "alice", &queue_id), [b"for alice".to_vec()]);
}

#[test]
fn redelivered_message_is_stored_once() {
    let mut net = Net::new(18, 11);
    let (queue_id, uri) = net.create_queue("alice");
    // The ACK of the first message is lost, then the connection breaks.
    net.server.ignore_acks = true;
    net.send("bob", &uri, b"x");
    assert_eq!(bodies(&net, "alice", &queue_id), [b"x".to_vec()]);
    net.break_link("connection reset by peer");
    net.server.ignore_acks = false;

    // The pool reconnects by itself after its first backoff delay (at most 500 ms); the
    // re-SUB makes the server deliver "x" again.
    net.advance(Duration::from_millis(500));
    let token = net.send("bob", &uri, b"y");
    sent(&net, token);
    assert_eq!(net.connects, 2);
    assert_eq!(
        net.server
            .seen
            .iter()
            .filter(|s| s.tag == "SUB" && s.conn == 2)
            .count(),
        1
    );
    assert_eq!(
        bodies(&net, "alice", &queue_id),
        [b"x".to_vec(), b"y".to_vec()]
    );
    let arrived = net
        .events
        .iter()
        .filter(|e| matches!(e, PoolEvent::MessageArrived { .. }))
        .count();
    assert_eq!(arrived, 2);
    assert_eq!(net.pool.duplicates_suppressed(), 1, "the re-delivered x");
    assert!(
        net.server.queues.values().all(|q| q.msgs.is_empty()),
        "both ACKed"
    );
}

#[test]
fn quota_is_retried_in_order() {
    let mut config = PoolConfig::default();
    config.quota_retry_delay = Duration::from_secs(60);
    let mut net = Net::with_config(18, 12, config);
    net.server.quota = 3;
    let (queue_id, uri) = net.create_queue("alice");
    // The recipient is not reading: the queue fills after three messages.
    net.server.hold_deliveries = true;
    let tokens: Vec<_> = (0..8u8)
        .map(|i| net.submit("bob", send_request(&uri, &[i])))
        .collect();
    net.run();
    for t in &tokens[..3] {
        sent(&net, *t);
    }
    assert!(tokens[3..].iter().all(|t| !net.replies.contains_key(t)));
    let sends_before = net.server.count("SEND");
    assert!(sends_before > 4, "the window ran into the full queue");

    // Nothing is retried before the delay.
    net.advance(Duration::from_secs(30));
    assert_eq!(net.server.count("SEND"), sends_before);

    // The recipient drains the queue (QUOTA marker included); the retry goes out in order.
    let rcv_id = Net::rcv_id(&queue_id);
    let resumed = net.server.resume_deliveries(&rcv_id);
    net.route(resumed);
    net.run();
    assert!(net.server.queues[&rcv_id].msgs.is_empty());
    assert_eq!(
        bodies(&net, "alice", &queue_id).len(),
        3,
        "the marker is not shown"
    );
    // With a 3-message quota the pipelined rest may fill it again; each round drains.
    let mut rounds = 0;
    while net.replies.len() < 9 {
        rounds += 1;
        assert!(rounds < 10, "stuck at {} replies", net.replies.len());
        net.advance(Duration::from_secs(61));
    }
    for t in &tokens {
        sent(&net, *t);
    }
    assert_eq!(
        net.reply_order[1..],
        tokens[..],
        "Sent replies in submission order"
    );
    let want: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i]).collect();
    assert_eq!(bodies(&net, "alice", &queue_id), want);
}

#[test]
fn quota_marker_is_acked_and_not_shown() {
    let mut net = Net::new(18, 13);
    net.server.quota = 2;
    let (queue_id, uri) = net.create_queue("alice");
    net.server.ignore_acks = true;
    let a = net.send("bob", &uri, b"a");
    let b = net.send("bob", &uri, b"b");
    let c = net.send("bob", &uri, b"c");
    sent(&net, a);
    sent(&net, b);
    assert!(!net.replies.contains_key(&c), "c hit the quota");
    // Reconnect so the server re-delivers, this time with working ACKs.
    net.server.ignore_acks = false;
    net.break_link("reset");
    assert!(!net.replies.contains_key(&c), "c waits through the loss");
    net.advance(Duration::from_millis(500));
    assert_eq!(net.connects, 2, "reconnected by itself");
    // c went out again right after the reconnect, raced the ACKs and met the full queue
    // once more; the quota retry delivers it.
    net.advance(Duration::from_secs(301));
    sent(&net, c);
    assert_eq!(
        bodies(&net, "alice", &queue_id),
        [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    let rcv_id = Net::rcv_id(&queue_id);
    assert!(
        net.server.queues[&rcv_id].msgs.is_empty(),
        "the marker was ACKed too"
    );
}

#[test]
fn disconnect_fails_creates_keeps_sends_and_reconnects_by_itself() {
    let mut net = Net::new(18, 14);
    let (queue_id, uri) = net.create_queue("alice");
    net.server.stalled = true;
    let send = net.send("bob", &uri, b"waits");
    let create = net.request(
        "carol",
        PoolRequest::CreateQueue {
            server: net.server.address(),
            websocket: false,
        },
    );
    assert!(!net.replies.contains_key(&send) && !net.replies.contains_key(&create));
    let events_before = net.events.len();
    net.break_link("connection reset by peer");

    let reason = upstream_reason(net.reply(create));
    assert!(reason.contains("connection reset by peer"), "{reason}");
    assert!(
        !net.replies.contains_key(&send),
        "a send waits for the reconnect"
    );
    // The backoff delay is drawn at the next timer call (the loss report carries no RNG).
    net.advance(Duration::ZERO);
    let status = net.pool.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].state, ConnState::BackingOff);
    assert_eq!(status[0].pending_sends, 1);
    assert_eq!(status[0].attempt, 1);
    let retry_in = status[0].next_retry_at.unwrap() - net.now;
    assert!(
        retry_in >= Duration::from_millis(250) && retry_in <= Duration::from_millis(500),
        "{retry_in:?}"
    );
    assert_eq!(
        status[0].last_error.as_deref(),
        Some("connection reset by peer")
    );
    let info = &net.pool.queues("alice")[0];
    assert_eq!(info.subscription, Subscription::Pending);
    assert!(
        info.last_error
            .as_deref()
            .unwrap()
            .contains("connection reset by peer")
    );

    // After the backoff delay the pool reconnects, resubscribes and sends what waited.
    net.server.stalled = false;
    net.advance(Duration::from_millis(500));
    sent(&net, send);
    assert_eq!(net.connects, 2);
    assert_eq!(
        net.server
            .seen
            .iter()
            .filter(|s| s.tag == "SUB" && s.conn == 2)
            .count(),
        1
    );
    let status = net.pool.status();
    assert_eq!(status[0].state, ConnState::Up);
    assert_eq!(status[0].attempt, 0, "reset after resubscription");
    assert_eq!(status[0].pending_sends, 0);
    assert_eq!(
        net.pool.queues("alice")[0].subscription,
        Subscription::Subscribed
    );
    assert_eq!(bodies(&net, "alice", &queue_id), [b"waits".to_vec()]);
    // Every transition was an event, in order.
    let states: Vec<ConnState> = net.events[events_before..]
        .iter()
        .filter_map(|e| match e {
            PoolEvent::ServerChanged { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            ConnState::BackingOff,
            ConnState::Connecting,
            ConnState::Handshaking,
            ConnState::Up
        ]
    );
    assert!(
        net.events[events_before..]
            .iter()
            .any(|e| matches!(e, PoolEvent::Reconnecting { attempt: 1, .. }))
    );
}

#[test]
fn identity_mismatch_is_lost_at_once_without_retrying() {
    // Caught by the transport's certificate pinning.
    let mut net = Net::new(18, 15);
    let expected = net.server.key_hash().to_string();
    net.refuse_connect = Some(format!(
        "server identity mismatch: expected keyHash {expected}, server presented AAAA"
    ));
    let t = net.request(
        "alice",
        PoolRequest::CreateQueue {
            server: net.server.address(),
            websocket: false,
        },
    );
    assert!(upstream_reason(net.reply(t)).contains(&format!("expected keyHash {expected}")));
    let status = net.pool.status();
    assert_eq!(status[0].state, ConnState::Lost);
    assert!(
        status[0]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("server identity mismatch")
    );
    // No retry loop, and new requests fail at once (while the pool remembers the server:
    // `server_linger`, 10 minutes by default).
    net.advance(Duration::from_secs(300));
    let t = net.request(
        "alice",
        PoolRequest::CreateQueue {
            server: net.server.address(),
            websocket: false,
        },
    );
    assert!(upstream_reason(net.reply(t)).contains("server lost"));
    assert_eq!(net.connects, 1);

    // Caught by the SMP handshake (ServerHello's certificate chain), after an explicit
    // reconnect request.
    net.refuse_connect = None;
    net.server.wrong_identity = true;
    assert_eq!(net.pool.reconnect(net.now, None), 1);
    net.run();
    assert_eq!(net.connects, 2);
    assert_eq!(
        net.disconnects, 1,
        "the pool closed the transport it rejected"
    );
    let status = net.pool.status();
    assert_eq!(status[0].state, ConnState::Lost);
    let reason = status[0].last_error.clone().unwrap();
    assert!(
        reason.contains(&format!(
            "server identity mismatch: expected keyHash {expected}"
        )),
        "{reason}"
    );
    net.advance(Duration::from_secs(300));
    assert_eq!(net.connects, 2);

    // The right server again: a reconnect request brings it back.
    net.server.wrong_identity = false;
    net.pool.reconnect(net.now, None);
    net.run();
    assert_eq!(net.pool.status()[0].state, ConnState::Up);
    net.create_queue("alice");
}

#[test]
fn end_and_deld_and_delete() {
    let mut net = Net::new(18, 16);
    let (ended, _) = net.create_queue("alice");
    let (gone, _) = net.create_queue("alice");
    let (live, _) = net.create_queue("alice");

    let end = net.server.end_subscription(&Net::rcv_id(&ended));
    net.route(end);
    let deld = net.server.delete_elsewhere(&Net::rcv_id(&gone));
    net.route(deld);
    net.run();
    let state = |net: &Net, id: &str| {
        net.pool
            .queues("alice")
            .into_iter()
            .find(|q| q.queue_id == id)
            .map(|q| q.subscription)
    };
    assert_eq!(state(&net, &ended), Some(Subscription::Ended));
    assert_eq!(state(&net, &gone), Some(Subscription::Gone));
    assert_eq!(state(&net, &live), Some(Subscription::Subscribed));
    assert!(net.events.contains(&PoolEvent::SubscriptionChanged {
        app: "alice".into(),
        queue_id: ended.clone(),
        subscription: Subscription::Ended,
    }));

    // A queue already gone is forgotten without asking the server.
    let t = net.request(
        "alice",
        PoolRequest::DeleteQueue {
            queue_id: gone.clone(),
        },
    );
    assert_eq!(net.reply(t), &Ok(PoolReply::Deleted));
    assert_eq!(net.server.count("DEL"), 0);

    let t = net.request(
        "alice",
        PoolRequest::DeleteQueue {
            queue_id: live.clone(),
        },
    );
    assert_eq!(net.reply(t), &Ok(PoolReply::Deleted));
    assert_eq!(net.server.count("DEL"), 1);
    assert!(!net.server.queues.contains_key(&Net::rcv_id(&live)));
    let left: Vec<String> = net
        .pool
        .queues("alice")
        .into_iter()
        .map(|q| q.queue_id)
        .collect();
    assert_eq!(left, [ended]);
}

#[test]
fn one_connection_per_server_for_all_apps() {
    let mut net = Net::new(18, 17);
    net.create_queue("alice");
    net.create_queue("bob");
    let with_port = format!("{}:5223", net.server.address());
    let t = net.request(
        "carol",
        PoolRequest::CreateQueue {
            server: with_port,
            websocket: false,
        },
    );
    assert!(net.reply(t).is_ok());
    assert_eq!(net.connects, 1);
    let status = net.pool.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].queues, 3);
    assert_eq!(status[0].profile, "smp");
    assert_eq!(status[0].server.transport().as_str(), "tls");
}

#[test]
fn requests_wait_for_the_handshake_then_run() {
    let mut net = Net::new(18, 18);
    // Three requests before the connection exists: one Connect, all answered after it.
    let server = net.server.address();
    let tokens: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|app| {
            net.submit(
                app,
                PoolRequest::CreateQueue {
                    server: server.clone(),
                    websocket: false,
                },
            )
        })
        .collect();
    net.run();
    assert_eq!(net.connects, 1);
    for t in tokens {
        assert!(matches!(net.reply(t), Ok(PoolReply::QueueCreated(_))));
    }
}

#[test]
fn connect_timeout_fails_waiting_requests() {
    let mut config = PoolConfig::default();
    config.connect_timeout = Duration::from_secs(5);
    let mut net = Net::with_config(18, 19, config);
    // The driver never reports the transport: the pool gives up on its own.
    let t = net.submit(
        "alice",
        PoolRequest::CreateQueue {
            server: net.server.address(),
            websocket: false,
        },
    );
    let connect = net.pool.poll_action();
    assert!(matches!(connect, Some(muxd_core::Action::Connect { .. })));
    net.advance(Duration::from_secs(6));
    assert!(upstream_reason(net.reply(t)).contains("not established within 5s"));
    assert_eq!(net.pool.status()[0].state, ConnState::Failed);
}

#[test]
fn invalid_arguments_are_rejected_at_once() {
    let mut net = Net::new(18, 20);
    let t = net.request(
        "alice",
        PoolRequest::CreateQueue {
            server: "not a server".into(),
            websocket: false,
        },
    );
    assert!(matches!(net.reply(t), Err(PoolError::InvalidArgument(_))));
    let t = net.send("alice", "smp://nope", b"x");
    assert!(matches!(net.reply(t), Err(PoolError::InvalidArgument(_))));
    assert_eq!(net.connects, 0);
}

#[test]
fn websocket_connection_is_its_own_and_reused_by_senders() {
    let mut net = Net::new(18, 22);
    let t = net.request(
        "alice",
        PoolRequest::CreateQueue {
            server: net.server.address(),
            websocket: true,
        },
    );
    let Ok(PoolReply::QueueCreated(info)) = net.reply(t).clone() else {
        panic!("create over websocket");
    };
    assert_eq!(info.server.transport(), muxd_core::Transport::WebSocket);
    // A sender's URI does not name a transport: the existing WebSocket connection carries it.
    let s = net.send("bob", &info.queue_uri, b"via ws");
    sent(&net, s);
    assert_eq!(net.connects, 1);
    let status = net.pool.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].server.transport().as_str(), "websocket");
    assert_eq!(bodies(&net, "alice", &info.queue_id), [b"via ws".to_vec()]);
}

#[test]
fn per_server_policy_applies_to_its_server_only() {
    let mut net = Net::new(18, 23);
    let mut policy = ServerPolicy::default();
    // The connection will have been up once, so the reconnect policy applies.
    policy.reconnect.max_attempts = Some(2);
    policy.reconnect.jitter = Jitter::None;
    let mut config = PoolConfig::default();
    // Written with an explicit port: matched on the normalised address.
    config
        .server_policies
        .insert(format!("{}:5223", net.server.address()), policy);
    let mut net2 = Net::with_config(18, 23, config);
    for (net, retries) in [(&mut net, 12), (&mut net2, 2)] {
        let (_, uri) = net.create_queue("alice");
        net.refuse_connect = Some("connection refused".to_owned());
        net.break_link("reset");
        let t = net.send("bob", &uri, b"x");
        net.advance(Duration::from_secs(3600));
        assert!(!net.replies.contains_key(&t), "the send waits");
        // One connect at first plus one per retry.
        assert_eq!(net.connects, 1 + retries, "{retries} retries");
        assert_eq!(net.pool.status()[0].state, ConnState::Lost);
    }
    // Without jitter the delays of the 2-attempt policy are exactly 500 ms and 1 s.
    let lost_events = net2
        .events
        .iter()
        .filter_map(|e| match e {
            PoolEvent::Reconnecting { delay, attempt, .. } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect::<Vec<_>>();
    assert_eq!(
        lost_events,
        [(1, Duration::from_millis(500)), (2, Duration::from_secs(1))]
    );
}
