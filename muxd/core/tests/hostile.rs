//! The pool against hostile or careless apps and servers: floods, made-up addresses,
//! backlogs, absurd durations, takeover attempts. Each must end in a clear error or a bounded
//! wait; nothing may be lost, nothing may panic, and no app may hurt another.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use muxd_core::{
    Action, ConnState, Pool, PoolConfig, PoolError, PoolReply, PoolRequest, RequestToken,
};
use muxd_smp::address::QueueUri;
use muxd_smp::e2e::{ClientMessage, ClientMsgEnvelope, PrivHeader};
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use support::Net;

fn send_request(uri: &str, body: &[u8]) -> PoolRequest {
    PoolRequest::Send {
        queue_uri: uri.to_owned(),
        body: body.to_vec(),
        wait: true,
    }
}

fn is_sent(net: &Net, token: RequestToken) -> bool {
    matches!(net.replies.get(&token), Some(Ok(PoolReply::Sent { .. })))
}

fn create_request(net: &Net) -> PoolRequest {
    PoolRequest::CreateQueue {
        server: net.server.address(),
        websocket: false,
    }
}

/// `uri` with its sender id replaced: a queue that does not exist.
fn made_up_queue(uri: &str, rng: &mut ChaCha20Rng) -> String {
    let mut uri: QueueUri = uri.parse().unwrap();
    let mut id = vec![0u8; 24];
    rng.fill_bytes(&mut id);
    uri.sender_id = id;
    uri.to_string()
}

/// The app reads and acknowledges everything waiting; returns the bodies.
fn drain(net: &mut Net, app: &str, queue_id: &str) -> Vec<Vec<u8>> {
    let msgs = net.pool.messages(app, queue_id, None).unwrap();
    for m in &msgs {
        net.pool.ack(app, queue_id, &m.msg_id).unwrap();
    }
    msgs.into_iter().map(|m| m.body).collect()
}

#[test]
fn a_flooded_queue_holds_its_ack_and_loses_nothing() {
    let mut config = PoolConfig::default();
    config.max_waiting_per_queue = 5;
    config.quota_retry_delay = Duration::from_secs(5);
    let mut net = Net::with_config(18, 40, config);
    net.server.quota = 8;
    let (queue_id, uri) = net.create_queue("alice");
    let tokens: Vec<_> = (0..30u32)
        .map(|i| net.submit("bob", send_request(&uri, &i.to_be_bytes())))
        .collect();
    net.run();
    net.advance(Duration::from_secs(20));

    // The app reads nothing: five messages wait in the pool, the fifth one's ACK is held,
    // and the server keeps the rest under its own quota.
    assert_eq!(net.pool.queues("alice")[0].waiting, 5);
    assert_eq!(net.server.count("ACK"), 4, "the fifth ACK is held back");
    let rcv_id = Net::rcv_id(&queue_id);
    assert!(!net.server.queues[&rcv_id].msgs.is_empty());
    // Senders beyond the server's quota wait and retry; none failed.
    assert!(
        tokens
            .iter()
            .all(|t| !matches!(net.replies.get(t), Some(Err(_))))
    );
    assert!(
        !tokens.iter().all(|t| is_sent(&net, *t)),
        "ERR QUOTA reached the sender"
    );

    // The app catches up: every held ACK goes out once it acknowledges below the limit.
    let mut got = Vec::new();
    for _ in 0..200 {
        got.extend(drain(&mut net, "alice", &queue_id));
        net.advance(Duration::from_secs(1));
        if got.len() == 30 {
            break;
        }
        assert!(net.pool.queues("alice")[0].waiting <= 5);
    }
    let want: Vec<Vec<u8>> = (0..30u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(got, want, "every message, once, in order");
    assert!(tokens.iter().all(|t| is_sent(&net, *t)));
    assert!(net.server.queues[&rcv_id].msgs.is_empty());
}

#[test]
fn the_per_app_limit_holds_one_apps_queues_only() {
    let mut config = PoolConfig::default();
    config.max_waiting_per_app = 3;
    let mut net = Net::with_config(18, 41, config);
    let (q1, uri1) = net.create_queue("alice");
    let (q2, uri2) = net.create_queue("alice");
    let (q3, uri3) = net.create_queue("carol");
    for i in 0..3u8 {
        net.send("bob", &uri1, &[i]);
    }
    // Alice is at her limit: her other queue stores what arrived, but its ACK is held.
    net.send("bob", &uri2, b"a");
    net.send("bob", &uri2, b"b");
    assert_eq!(
        net.pool.queues("alice")[1].waiting + net.pool.queues("alice")[0].waiting,
        4
    );
    assert_eq!(net.server.queues[&Net::rcv_id(&q2)].msgs.len(), 2);
    // Carol has her own limit, untouched by alice's.
    for i in 0..3u8 {
        net.send("bob", &uri3, &[i]);
    }
    assert_eq!(net.pool.queues("carol")[0].waiting, 3);
    assert!(
        net.server.queues[&Net::rcv_id(&q3)].msgs.len() == 1,
        "the third is held"
    );
    // Alice reads one queue; the other's held ACK goes out and its next message arrives.
    assert_eq!(drain(&mut net, "alice", &q1).len(), 3);
    net.advance(Duration::ZERO);
    assert_eq!(
        drain(&mut net, "alice", &q2),
        [b"a".to_vec(), b"b".to_vec()]
    );
    net.advance(Duration::ZERO);
    assert!(net.server.queues[&Net::rcv_id(&q2)].msgs.is_empty());
    assert_eq!(drain(&mut net, "carol", &q3).len(), 3);
}

#[test]
fn one_apps_backlog_does_not_use_up_anothers_budget() {
    let mut config = PoolConfig::default();
    config.max_pending_per_server = 5;
    config.max_pending_requests_per_server = 2;
    let mut net = Net::with_config(18, 42, config);
    let (_, uri) = net.create_queue("carol");
    // The server stops answering: everything waits.
    net.server.stalled = true;
    let spam: Vec<_> = (0..5u8)
        .map(|i| net.submit("spam", send_request(&uri, &[i])))
        .collect();
    let over = net.request("spam", send_request(&uri, b"one too many"));
    let reason = match net.reply(over) {
        Err(PoolError::Upstream { reason, .. }) => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(reason.contains("too many pending requests"), "{reason}");
    let create = create_request(&net);
    let c1 = net.submit("spam", create.clone());
    let c2 = net.submit("spam", create.clone());
    let c3 = net.request("spam", create.clone());
    assert!(matches!(net.reply(c3), Err(PoolError::Upstream { .. })));
    // Another app's sends and creations are accepted.
    let bob = net.request("bob", send_request(&uri, b"bob"));
    let bob_create = net.request("bob", create);
    assert!(!net.replies.contains_key(&bob));
    assert!(!net.replies.contains_key(&bob_create));

    // The server answers again: the budgets are given back with the replies.
    net.server.stalled = false;
    net.break_link("reset");
    net.advance(Duration::from_secs(2));
    for t in spam.iter().chain([&bob]) {
        assert!(is_sent(&net, *t), "{t:?}");
    }
    for t in [c1, c2, bob_create] {
        assert!(
            net.reply(t).is_err(),
            "creations in flight fail with the link"
        );
    }
    let again = net.request("spam", send_request(&uri, b"later"));
    assert!(is_sent(&net, again));
}

#[test]
fn sends_to_made_up_queues_leave_no_entries_behind() {
    let mut config = PoolConfig::default();
    config.max_senders_per_app = 3;
    let mut net = Net::with_config(18, 43, config);
    let (queue_id, uri) = net.create_queue("alice");
    let mut rng = ChaCha20Rng::seed_from_u64(43);
    for _ in 0..50 {
        let t = net.send("spam", &made_up_queue(&uri, &mut rng), b"x");
        assert!(net.reply(t).is_err(), "no such queue");
    }
    // Only alice's own queue is routed through the server: the failed entries are gone.
    assert_eq!(net.pool.status()[0].queues, 1);

    // While entries are in progress, an app may hold only so many.
    net.server.stalled = true;
    let held: Vec<_> = (0..3)
        .map(|_| net.send("spam", &made_up_queue(&uri, &mut rng), b"x"))
        .collect();
    let over = net.send("spam", &made_up_queue(&uri, &mut rng), b"x");
    assert!(matches!(net.reply(over), Err(PoolError::LimitReached(_))));
    assert!(held.iter().all(|t| !net.replies.contains_key(t)));
    // Another app is not limited by it.
    let bob = net.send("bob", &uri, b"hello");
    assert!(!net.replies.contains_key(&bob));
    net.server.stalled = false;
    net.break_link("reset");
    net.advance(Duration::from_secs(2));
    assert!(is_sent(&net, bob));
    assert_eq!(drain(&mut net, "alice", &queue_id), [b"hello".to_vec()]);
    // Bob's entry secured the queue and stays; the made-up ones are gone.
    assert_eq!(net.pool.status()[0].queues, 2);
}

/// A bare pool whose connects the test answers by hand.
fn connects(pool: &mut Pool) -> Vec<muxd_core::ServerKey> {
    let mut out = Vec::new();
    while let Some(action) = pool.poll_action() {
        if let Action::Connect { server, .. } = action {
            out.push(server);
        }
    }
    out
}

#[test]
fn made_up_servers_are_bounded_and_forgotten() {
    let mut config = PoolConfig::default();
    config.max_servers = 3;
    config.server_linger = Duration::from_secs(60);
    let mut pool = Pool::new(config);
    let mut rng = ChaCha20Rng::seed_from_u64(44);
    let mut now = Instant::now();
    let address = |i: u32| {
        let hash = muxd_smp::encoding::base64url_encode(&[i as u8; 32]);
        format!("smp://{hash}@relay{i}.test")
    };
    let mut token = 0;
    let mut create = |pool: &mut Pool, now: Instant, rng: &mut ChaCha20Rng, i: u32| {
        token += 1;
        let request = PoolRequest::CreateQueue {
            server: address(i),
            websocket: false,
        };
        pool.handle_request(now, rng, "spam", RequestToken(token), request);
        connects(pool)
    };
    // Each made-up server fails its identity check; the table never grows past the limit.
    for i in 0..100 {
        for key in create(&mut pool, now, &mut rng, i) {
            pool.handle_disconnected(now, &key, "server identity mismatch: nope".to_owned());
        }
        assert!(pool.status().len() <= 3);
        now += Duration::from_millis(10);
    }
    // Lost servers linger for a while, then are forgotten.
    assert!(pool.status().iter().all(|s| s.state == ConnState::Lost));
    now += Duration::from_secs(61);
    pool.handle_timeout(now, &mut rng);
    assert!(pool.status().is_empty());

    // Servers in use are never evicted: the fourth one is refused with a clear error.
    for i in 200..203 {
        assert_eq!(create(&mut pool, now, &mut rng, i).len(), 1);
    }
    token += 1;
    let request = PoolRequest::CreateQueue {
        server: address(203),
        websocket: false,
    };
    pool.handle_request(now, &mut rng, "spam", RequestToken(token), request);
    let mut refused = false;
    while let Some(action) = pool.poll_action() {
        if let Action::Reply { result, .. } = action {
            refused = matches!(result, Err(PoolError::LimitReached(_)));
        }
    }
    assert!(refused);
    assert_eq!(pool.status().len(), 3);
}

#[test]
fn absurd_durations_do_not_panic() {
    let mut config = PoolConfig::default();
    config.connect_timeout = Duration::MAX;
    config.auth_retry_delay = Duration::MAX;
    config.quota_retry_delay = Duration::MAX;
    config.send_timeout = Some(Duration::MAX);
    config.server_linger = Duration::MAX;
    config.connection.command_timeout = Duration::MAX;
    config.connection.handshake_timeout = Duration::MAX;
    config.connection.silence_limit = Duration::MAX;
    config.policy.ping_idle = Duration::MAX;
    config.policy.pong_timeout = Duration::MAX;
    config.policy.stall_probe_after = Duration::MAX;
    config.policy.idle_disconnect = Some(Duration::MAX);
    config.policy.lag_watch_interval = Duration::MAX;
    config.policy.reconnect.base = Duration::from_secs(1);
    config.policy.reconnect.cap = Duration::MAX;
    config.policy.reconnect.max_hint = Duration::MAX;
    let mut net = Net::with_config(18, 45, config);
    let (queue_id, uri) = net.create_queue("alice");
    let t = net.send("bob", &uri, b"still works");
    assert!(is_sent(&net, t));
    let key = net.pool.status()[0].server.clone();
    // `Op::Lag { interval_ms: u64::MAX }` from an app.
    assert!(net.pool.set_lag_watch(&key, true, Some(Duration::MAX)));
    assert!(
        net.pool
            .set_lag_watch(&key, true, Some(Duration::from_millis(u64::MAX)))
    );
    let _ = net.pool.poll_timeout();
    net.advance(Duration::from_secs(3600));
    // The watch was clamped to one PING a day, not switched off.
    net.advance(Duration::from_secs(24 * 3600));
    assert!(net.server.count("PING") >= 1);
    net.break_link("reset");
    net.advance(Duration::from_secs(10));
    let _ = net.pool.poll_timeout();
    assert_eq!(net.pool.status()[0].state, ConnState::Up);
    assert_eq!(
        drain(&mut net, "alice", &queue_id),
        [b"still works".to_vec()]
    );
}

/// A confirmation from a sender with e2e key `sender`, carrying app envelope `seq`/`body`.
fn confirmation(
    rng: &mut ChaCha20Rng,
    sender: &X25519SecretKey,
    uri: &str,
    body: &[u8],
) -> Vec<u8> {
    let uri: QueueUri = uri.parse().unwrap();
    let recipient = X25519PublicKey::from_spki(&uri.dh_key).unwrap();
    let payload = muxd_core::Envelope {
        seq: 1,
        payload: body,
    }
    .to_bytes();
    let msg = ClientMessage {
        header: PrivHeader::Empty,
        body: payload,
    };
    ClientMsgEnvelope::seal_confirmation(rng, 4, sender, &recipient, &msg)
        .unwrap()
        .encode()
        .unwrap()
}

#[test]
fn a_second_confirmation_cannot_take_the_queue_from_the_first_sender() {
    let mut net = Net::new(18, 46);
    let (queue_id, uri) = net.create_queue("alice");
    let first = net.send("bob", &uri, b"one");
    assert!(is_sent(&net, first));
    // Someone else with the URI sends a confirmation of their own.
    let mut rng = ChaCha20Rng::seed_from_u64(46);
    let mallory = X25519SecretKey::generate(&mut rng);
    let sealed = confirmation(&mut rng, &mallory, &uri, b"let me in");
    let out = net.server.inject(&Net::rcv_id(&queue_id), sealed);
    net.route(out);
    net.run();
    // Bob's next message still opens.
    let second = net.send("bob", &uri, b"two");
    assert!(is_sent(&net, second));
    assert_eq!(
        drain(&mut net, "alice", &queue_id),
        [b"one".to_vec(), b"two".to_vec()]
    );
    let info = &net.pool.queues("alice")[0];
    assert_eq!(info.confirmations_rejected, 1);
    assert!(
        info.last_error
            .as_deref()
            .unwrap()
            .contains("second sender")
    );
    assert_eq!(net.pool.confirmations_rejected(), 1);
    assert!(
        net.server.queues[&Net::rcv_id(&queue_id)].msgs.is_empty(),
        "it was ACKed"
    );
}

#[test]
fn a_stale_dh_key_does_not_block_the_right_uri() {
    let mut config = PoolConfig::default();
    config.send_timeout = Some(Duration::from_secs(10));
    let mut net = Net::with_config(18, 47, config);
    let (queue_id, uri) = net.create_queue("alice");
    let mut stale: QueueUri = uri.parse().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(47);
    stale.dh_key = X25519SecretKey::generate(&mut rng).public_key().to_spki();
    let stale = stale.to_string();
    // The stale URI is used first, while the server is unreachable; that send times out.
    net.refuse_connect = Some("connection refused".to_owned());
    net.break_link("reset");
    let t = net.send("mallory", &stale, b"stale");
    net.advance(Duration::from_secs(11));
    assert!(net.reply(t).is_err());
    // The right URI, from another app, works once the server is back.
    net.refuse_connect = None;
    net.advance(Duration::from_secs(60));
    let t = net.send("bob", &uri, b"right");
    assert!(is_sent(&net, t), "{:?}", net.replies.get(&t));
    assert_eq!(drain(&mut net, "alice", &queue_id), [b"right".to_vec()]);
}

#[test]
fn debug_output_hides_passwords_and_bodies() {
    let mut net = Net::new(18, 48);
    let address = net.server.address().replace('@', ":hunter2@");
    let request = PoolRequest::CreateQueue {
        server: address,
        websocket: false,
    };
    assert!(!format!("{request:?}").contains("hunter2"));
    // Waiting for the connection, the request sits in the pool.
    net.submit("alice", request);
    let shown = format!("{:?}", net.pool);
    assert!(!shown.contains("hunter2"), "{shown}");
    let send = send_request("smp://x", b"secret words");
    assert!(!format!("{send:?}").contains(&format!("{:?}", b"secret words")));
}
