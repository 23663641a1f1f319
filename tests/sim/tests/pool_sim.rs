//! Virtual-time simulations of the pool: flapping links, dead links, backoff bounds,
//! resubscription at scale, isolation between servers, random fault sequences. Wherever
//! messages flow, apps must see each exactly once and in per-queue order.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use muxd_core::{ConnState, LagSource, PoolConfig, PoolEvent, PoolReply, ServerStatus};
use muxd_sim::sim::Sim;
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const LATENCY: Duration = Duration::from_millis(20);
const BASE: Duration = Duration::from_millis(500);
const CAP: Duration = Duration::from_secs(30);

fn status(sim: &Sim, idx: usize) -> ServerStatus {
    let key = sim.key(idx);
    sim.pool
        .status()
        .into_iter()
        .find(|s| s.server == key)
        .unwrap()
}

/// Every copy the server stored beyond `distinct` messages was dropped by the receiving
/// pool (at least once: a re-delivery after a lost ACK is dropped too), and nothing was
/// malformed.
fn assert_copies_suppressed(sim: &Sim, distinct: usize) {
    let stored: usize = sim.servers.iter().map(|s| s.fake.stored).sum();
    let suppressed = sim.pool.duplicates_suppressed() as usize;
    assert!(
        suppressed >= stored - distinct,
        "{stored} copies stored for {distinct} messages, {suppressed} suppressed"
    );
    assert_eq!(sim.pool.malformed_rejected(), 0);
}

fn body(i: u32) -> Vec<u8> {
    format!("message {i}").into_bytes()
}

fn all_sent(sim: &Sim, tokens: &[muxd_core::RequestToken]) -> bool {
    tokens
        .iter()
        .all(|t| matches!(sim.replies.get(t), Some((_, Ok(PoolReply::Sent { .. })))))
}

/// Sends 150 messages while the link is cut every 0.3–3 s, to a queue that holds `quota`
/// messages; returns the sim for assertions.
fn flapping_run(seed: u64, quota: usize) -> (Sim, String, Vec<muxd_core::RequestToken>) {
    let mut config = PoolConfig::default();
    config.quota_retry_delay = Duration::from_secs(1);
    let mut sim = Sim::new(seed, config);
    let a = sim.add_server(18, LATENCY);
    sim.servers[a].fake.quota = quota;
    let (queue_id, uri) = sim.create_queue("alice", a);
    let mut flaps = ChaCha20Rng::seed_from_u64(seed ^ 0xf1a9);
    let mut next_cut = sim.now + Duration::from_millis(300 + flaps.next_u64() % 2700);
    let mut tokens = Vec::new();
    for i in 0..150u32 {
        tokens.push(sim.send("bob", &uri, &body(i)));
        let end = sim.now + Duration::from_millis(100);
        while next_cut <= end {
            sim.run_until(next_cut);
            sim.cut(a, "connection reset by peer");
            next_cut = sim.now + Duration::from_millis(300 + flaps.next_u64() % 2700);
        }
        sim.run_until(end);
    }
    // The link settles; everything that waited goes out.
    assert!(sim.run_while(Duration::from_secs(120), |s| all_sent(s, &tokens)));
    sim.run_for(Duration::from_secs(5));
    (sim, queue_id, tokens)
}

#[test]
fn flapping_link_delivers_every_message_in_order() {
    let (sim, queue_id, tokens) = flapping_run(7, 10_000);
    let cuts = sim
        .events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                PoolEvent::ServerChanged {
                    state: ConnState::BackingOff,
                    ..
                }
            )
        })
        .count();
    assert!(cuts >= 4, "the link flapped ({cuts} losses)");
    assert!(all_sent(&sim, &tokens));
    // Replies come in submission order (per queue).
    let mut times: Vec<(Instant, u64)> = tokens.iter().map(|t| (sim.replies[t].0, t.0)).collect();
    times.sort();
    let order: Vec<u64> = times.iter().map(|(_, t)| *t).collect();
    assert_eq!(order, tokens.iter().map(|t| t.0).collect::<Vec<_>>());

    let want: Vec<Vec<u8>> = (0..150).map(body).collect();
    assert_eq!(
        sim.received[&queue_id], want,
        "every message arrived exactly once, in order"
    );
    // The server did store second copies (SENDs whose OK was lost with the link and that
    // were sent again); the receiving pool dropped each of them.
    let stored = sim.servers[0].fake.stored;
    assert!(stored > 150, "the flapping caused resent copies ({stored})");
    assert_copies_suppressed(&sim, 150);
    let info = &sim.pool.queues("alice")[0];
    assert_eq!(info.duplicates_suppressed, sim.pool.duplicates_suppressed());
    // The mailbox never shows the same server message twice; the apps read everything.
    assert!(
        sim.servers[0]
            .fake
            .queues
            .values()
            .all(|q| q.msgs.is_empty())
    );
}

#[test]
fn a_send_whose_ok_is_lost_is_stored_twice_and_delivered_once() {
    let mut sim = Sim::new(21, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let (queue_id, uri) = sim.create_queue("alice", a);
    let first = sim.send("bob", &uri, b"first");
    sim.wait_reply(first, Duration::from_secs(5)).unwrap();
    sim.run_for(Duration::from_secs(1));
    let stored = sim.servers[a].fake.stored;
    assert_eq!(stored, 1);

    // The server stores the SEND; the link breaks while its OK (and the MSG for alice, who
    // shares the connection) are on the way back.
    let t = sim.send("bob", &uri, b"once");
    assert!(
        sim.run_while(Duration::from_secs(1), |s| s.servers[a].fake.stored
            == stored + 1)
    );
    assert!(!sim.replies.contains_key(&t), "the OK has not arrived");
    sim.cut(a, "connection reset by peer");

    // The pool reconnects by itself and sends the message again: the server keeps both.
    assert!(matches!(
        sim.wait_reply(t, Duration::from_secs(60)),
        Ok(PoolReply::Sent { .. })
    ));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.servers[a].fake.stored, stored + 2, "two copies stored");
    let rcv_id = muxd_sim::harness::Net::rcv_id(&queue_id);
    assert!(
        sim.servers[a].fake.queues[&rcv_id].msgs.is_empty(),
        "both copies were ACKed"
    );
    // The app sees it once.
    assert_eq!(
        sim.received[&queue_id],
        [b"first".to_vec(), b"once".to_vec()]
    );
    assert_eq!(sim.pool.duplicates_suppressed(), 1);
    assert_eq!(sim.pool.queues("alice")[0].duplicates_suppressed, 1);
    assert_eq!(sim.pool.malformed_rejected(), 0);
}

/// A small queue makes the server refuse SENDs (QUOTA) while later ones are pipelined behind
/// them and the recipient drains it: refusals, lost OKs and resends all mix, and every
/// message still arrives exactly once, in order. (Order could only suffer where the server
/// itself stored a refused message after later ones; the receiver then delivers it late
/// rather than drop it. The sender's one-at-a-time rules keep that from happening here.)
#[test]
fn flapping_link_and_a_full_queue_still_deliver_exactly_once_in_order() {
    let mut refused = 0;
    for seed in 0..8 {
        let (sim, queue_id, _) = flapping_run(seed, 4);
        refused += sim.servers[0].fake.count("SEND") - sim.servers[0].fake.stored;
        let want: Vec<Vec<u8>> = (0..150).map(body).collect();
        assert_eq!(sim.received[&queue_id], want, "seed {seed}");
        assert_copies_suppressed(&sim, 150);
    }
    assert!(
        refused > 100,
        "the queue kept filling up ({refused} refusals)"
    );
}

#[test]
fn simulations_replay_exactly() {
    let (one, q1, _) = flapping_run(11, 10_000);
    let (two, q2, _) = flapping_run(11, 10_000);
    assert_eq!(q1, q2);
    assert_eq!(one.connects.len(), two.connects.len());
    let rel = |s: &Sim| -> Vec<Duration> { s.connects.iter().map(|(t, _)| *t - s.start).collect() };
    assert_eq!(rel(&one), rel(&two));
    assert_eq!(one.received, two.received);
}

#[test]
fn dead_link_is_detected_by_the_pong_deadline() {
    let mut sim = Sim::new(3, PoolConfig::default());
    let dead = sim.add_server(18, LATENCY);
    let live = sim.add_server(18, LATENCY);
    sim.create_queue("alice", dead);
    sim.create_queue("alice", live);
    sim.run_for(Duration::from_secs(1));
    // Blackholed: no reset, no FIN; the pool is told nothing.
    let t0 = sim.now;
    sim.set_blackhole(dead, true);
    let dead_key = sim.key(dead);
    assert!(sim.run_while(Duration::from_secs(3600), |s| {
        s.disconnects.iter().any(|(_, k)| *k == dead_key)
    }));
    let (at, _) = *sim
        .disconnects
        .iter()
        .find(|(_, k)| *k == dead_key)
        .unwrap();
    let took = at - t0;
    // Silence since the last block (just before t0): 600 s idle, then two 10 s deadlines.
    assert!(
        took >= Duration::from_secs(598) && took <= Duration::from_secs(620),
        "{took:?}"
    );
    let st = status(&sim, dead);
    assert_eq!(st.state, ConnState::BackingOff);
    assert!(
        st.last_error
            .unwrap()
            .contains("no PONG within 10s, 2 times")
    );
    // The other server answered its PINGs all along and stayed up, with lag samples.
    let other = status(&sim, live);
    assert_eq!(other.state, ConnState::Up);
    let pings = sim
        .pool
        .lag(&sim.key(live))
        .unwrap()
        .summary_for(LagSource::Ping);
    assert_eq!(pings.unwrap().min, LATENCY * 2);
    assert!(!sim.disconnects.iter().any(|(_, k)| *k == sim.key(live)));

    // The path heals: the pool reconnects by itself and resubscribes.
    sim.set_blackhole(dead, false);
    assert!(sim.run_while(Duration::from_secs(600), |s| {
        let st = status(s, dead);
        st.state == ConnState::Up && st.attempt == 0
    }));
    let q = &sim.pool.queues("alice")[0];
    assert_eq!(q.subscription, muxd_core::Subscription::Subscribed);
}

#[test]
fn a_server_that_sends_but_stops_reading_is_a_dead_link() {
    let mut sim = Sim::new(5, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let queues: Vec<String> = (0..20).map(|_| sim.create_queue("alice", a).0).collect();
    sim.run_for(Duration::from_secs(1));
    // The server no longer reads (nothing it is sent is answered), but other clients'
    // messages keep arriving, one queue every 3 s: keep-alive sees traffic all along.
    sim.servers[a].fake.stalled = true;
    let key = sim.key(a);
    let t0 = sim.now;
    let mut detected = None;
    for (i, queue_id) in queues.iter().enumerate() {
        let rcv_id = muxd_smp::encoding::base64url_decode(queue_id).unwrap();
        sim.inject(a, &rcv_id, format!("noise {i}").into_bytes());
        // Stop right at the verdict: the fake server drops what it is sent while stalled,
        // so a reconnect before it recovers would leave the new connection's cipher chain
        // broken.
        let gone = |s: &Sim| s.disconnects.iter().any(|(_, k)| *k == key);
        if sim.run_while(Duration::from_secs(3), gone) {
            detected = sim.disconnects.iter().find(|(_, k)| *k == key).map(|d| d.0);
            break;
        }
    }
    // The first ACK went out at once and timed out after 30 s; the next two, sent 3 s
    // apart, followed: three in a row, with MSGs arriving all the while.
    let at = detected.expect("the pool never gave up on the link");
    let took = at - t0;
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(40),
        "{took:?}"
    );
    let st = status(&sim, a);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("3 commands in a row timed out"),
        "{st:?}"
    );
    // A fresh connection works again: backoff, reconnect, resubscribe.
    sim.servers[a].fake.stalled = false;
    assert!(sim.run_while(Duration::from_secs(60), |s| {
        let st = status(s, a);
        st.state == ConnState::Up && st.attempt == 0
    }));
    let subscribed = sim
        .pool
        .queues("alice")
        .iter()
        .filter(|q| q.subscription == muxd_core::Subscription::Subscribed)
        .count();
    assert_eq!(subscribed, 20);
}

/// PINGs server `idx` has taken in.
fn pings(sim: &Sim, idx: usize) -> usize {
    sim.servers[idx].fake.count("PING")
}

#[test]
fn a_blackholed_link_with_a_send_in_flight_is_probed_and_dropped_within_31_s() {
    let mut sim = Sim::new(23, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let (queue_id, uri) = sim.create_queue("alice", a);
    // The first message secures the queue (SKEY, confirmation); the next is one SEND.
    let first = sim.send("bob", &uri, &body(0));
    sim.wait_reply(first, Duration::from_secs(5)).unwrap();
    sim.run_for(Duration::from_secs(1));
    let key = sim.key(a);
    sim.set_blackhole(a, true);
    let t0 = sim.now;
    let second = sim.send("bob", &uri, &body(1));
    let gone = |s: &Sim| s.disconnects.iter().any(|(_, k)| *k == key);
    assert!(sim.run_while(Duration::from_secs(120), gone));
    let (at, _) = sim.disconnects.iter().find(|(_, k)| *k == key).unwrap();
    let took = *at - t0;
    // stall_probe_after (10 s), then two PONG deadlines (10 s each); one tick of slack.
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(31),
        "{took:?}"
    );
    let st = status(&sim, a);
    assert_eq!(st.state, ConnState::BackingOff);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("no PONG within 10s, 2 times"),
        "{st:?}"
    );
    // The reconnect starts well within 40 s of the blackhole.
    let connects_before = sim.connect_times(a).len();
    sim.run_until(t0 + Duration::from_secs(40));
    let retries: Vec<Duration> = sim.connect_times(a)[connects_before..]
        .iter()
        .map(|t| *t - t0)
        .collect();
    assert!(!retries.is_empty(), "no reconnect within 40 s");

    // The path heals: the message waited and arrives exactly once.
    sim.set_blackhole(a, false);
    assert!(sim.run_while(Duration::from_secs(300), |s| all_sent(s, &[second])));
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.received[&queue_id], vec![body(0), body(1)]);
    assert_copies_suppressed(&sim, 2);
}

#[test]
fn a_slow_server_that_keeps_sending_is_not_declared_dead() {
    let mut sim = Sim::new(29, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let queues: Vec<(String, String)> = (0..4).map(|_| sim.create_queue("alice", a)).collect();
    let first = sim.send("bob", &queues[0].1, &body(0));
    sim.wait_reply(first, Duration::from_secs(5)).unwrap();
    sim.run_for(Duration::from_secs(1));
    // Every command now takes 15 s to be answered, PINGs included (one per-client thread
    // works through them in order), while other clients' messages to the subscribed
    // queues keep arriving every 5 s.
    sim.servers[a].processing = Duration::from_secs(15);
    let t0 = sim.now;
    let slow = sim.send("bob", &queues[0].1, &body(1));
    for i in 0..12u32 {
        let (queue_id, _) = &queues[i as usize % queues.len()];
        let rcv_id = muxd_smp::encoding::base64url_decode(queue_id).unwrap();
        sim.inject(a, &rcv_id, format!("noise {i}").into_bytes());
        sim.run_for(Duration::from_secs(5));
    }
    let (at, result) = &sim.replies[&slow];
    assert!(result.is_ok(), "{result:?}");
    let took = *at - t0;
    assert!(
        took >= Duration::from_secs(15) && took <= Duration::from_secs(16),
        "{took:?}"
    );
    // The messages stop. One more SEND: 10 s of silence later the link is probed, and
    // the PONG takes 15 s too, past its 10 s deadline; the SEND's answer (and the MSG it
    // makes) arrive before that deadline, which shows the link alive: no miss counts.
    sim.run_for(Duration::from_secs(30));
    let pings_before = pings(&sim, a);
    let t1 = sim.now;
    let last = sim.send("bob", &queues[0].1, &body(2));
    sim.run_for(Duration::from_secs(120));
    assert!(
        pings(&sim, a) > pings_before,
        "the silent link was not probed"
    );
    let (at, result) = &sim.replies[&last];
    assert!(result.is_ok(), "{result:?}");
    assert!(*at - t1 <= Duration::from_secs(16), "{:?}", *at - t1);
    assert!(
        sim.disconnects.is_empty(),
        "a slow server was dropped: {:?}",
        status(&sim, a)
    );
    assert_eq!(status(&sim, a).state, ConnState::Up);
    assert_eq!(sim.received[&queues[0].0], vec![body(0), body(1), body(2)]);
    // The noise is no message of ours, but every piece arrived and was acknowledged.
    assert!(
        sim.servers[a]
            .fake
            .queues
            .values()
            .all(|q| q.msgs.is_empty())
    );
}

#[test]
fn an_idle_link_is_not_probed_before_600_s() {
    let mut sim = Sim::new(31, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let (_, uri) = sim.create_queue("alice", a);
    let t = sim.send("bob", &uri, &body(0));
    sim.wait_reply(t, Duration::from_secs(5)).unwrap();
    // Every command has been answered; the last block came just now.
    sim.run_for(Duration::from_secs(1));
    let quiet_from = sim.now;
    assert_eq!(pings(&sim, a), 0);
    sim.run_until(quiet_from + Duration::from_secs(598));
    assert_eq!(pings(&sim, a), 0, "no PING before 600 s of silence");
    assert!(sim.transmits.iter().all(|(t, _)| *t < quiet_from));
    sim.run_until(quiet_from + Duration::from_secs(601));
    assert_eq!(pings(&sim, a), 1);
    assert_eq!(status(&sim, a).state, ConnState::Up);
}

/// The un-jittered delay before retry `n` (1-based).
fn nominal(n: u32) -> Duration {
    BASE.saturating_mul(1 << (n - 1).min(20)).min(CAP)
}

/// Backoff delays observed through the connect times after a loss at `lost_at`: the first
/// retry waits from the loss, each later one from the failure of the previous attempt,
/// which takes `failure` after its connect.
fn observed_delays(times: &[Instant], lost_at: Instant, failure: Duration) -> Vec<Duration> {
    let mut delays = vec![times[0] - lost_at];
    delays.extend(times.windows(2).map(|w| w[1] - w[0] - failure));
    delays
}

#[test]
fn backoff_bounds_give_up_after_twelve_and_wake_on_network_change() {
    let mut jittered = 0;
    for seed in 0..10u64 {
        let mut sim = Sim::new(seed, PoolConfig::default());
        let a = sim.add_server(18, LATENCY);
        let (_, uri) = sim.create_queue("alice", a);
        let before = sim.connect_times(a).len();
        let lost_at = sim.now;
        sim.set_down(a, true);
        let t = sim.send("bob", &uri, b"waits");
        sim.run_for(Duration::from_secs(3600));
        // A refused attempt fails after the transport setup (two one-way trips).
        let delays = observed_delays(&sim.connect_times(a)[before..], lost_at, LATENCY * 2);
        assert_eq!(delays.len(), 12, "seed {seed}: 12 retries, then lost");
        for (i, d) in delays.iter().enumerate() {
            let n = nominal(i as u32 + 1);
            assert!(*d <= CAP, "never above the cap");
            assert!(
                *d <= n && *d >= n / 2,
                "seed {seed} retry {}: {d:?} vs {n:?}",
                i + 1
            );
            if *d < n {
                jittered += 1;
            }
        }
        let st = status(&sim, a);
        assert_eq!(st.state, ConnState::Lost);
        assert_eq!(st.attempt, 12);
        assert!(!sim.replies.contains_key(&t), "the send still waits");
        assert_eq!(st.pending_sends, 1);

        // A network change revives it: an immediate attempt, then a fresh schedule.
        sim.set_down(a, false);
        let n = sim.connect_times(a).len();
        sim.pool.handle_network_change(sim.now);
        sim.drain();
        assert_eq!(sim.connect_times(a).len(), n + 1, "at once");
        sim.run_for(Duration::from_secs(5));
        assert_eq!(sim.connect_times(a).len(), n + 1);
        assert!(matches!(sim.replies[&t].1, Ok(PoolReply::Sent { .. })));
        let st = status(&sim, a);
        assert_eq!((st.state, st.attempt), (ConnState::Up, 0));
    }
    assert!(
        jittered > 100,
        "jitter actually spreads the delays ({jittered}/120)"
    );
}

#[test]
fn a_handshake_that_fails_after_tcp_connects_does_not_reset_the_backoff() {
    let mut sim = Sim::new(5, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let (_, _) = sim.create_queue("alice", a);
    let before = sim.connect_times(a).len();
    // TCP and TLS connect fine, but ServerHello is garbage every time.
    sim.servers[a].fake.garbled_hello = true;
    let lost_at = sim.now;
    sim.cut(a, "connection reset by peer");
    sim.run_for(Duration::from_secs(3600));
    let times = sim.connect_times(a);
    assert_eq!(times.len() - before, 12, "12 retries, then lost");
    let st = status(&sim, a);
    assert_eq!(st.state, ConnState::Lost);
    assert!(
        st.last_error.unwrap().contains("ServerHello"),
        "handshake failures"
    );
    // The delays kept growing: a handshake failure is not a success. An attempt fails after
    // the transport setup and the ServerHello trip (three one-way trips).
    let gaps = observed_delays(&times[before..], lost_at, LATENCY * 3);
    assert_eq!(gaps.len(), 12);
    for (i, d) in gaps.iter().enumerate() {
        let n = nominal(i as u32 + 1);
        assert!(*d <= n && *d >= n / 2, "retry {}: {d:?} vs {n:?}", i + 1);
    }

    // Healthy again: after the handshake the attempt counter holds until every SUB is
    // answered, then resets.
    sim.servers[a].fake.garbled_hello = false;
    sim.pool.reconnect(sim.now, None);
    sim.drain();
    assert!(sim.run_while(Duration::from_secs(5), |s| status(s, a).state
        == ConnState::Up));
    assert_eq!(status(&sim, a).attempt, 0, "wake restarts the schedule");
    sim.cut(a, "reset");
    assert!(sim.run_while(Duration::from_secs(5), |s| status(s, a).state
        == ConnState::Up));
    assert_eq!(
        status(&sim, a).attempt,
        1,
        "up, but the SUBs are not answered yet"
    );
    sim.run_for(Duration::from_secs(1));
    assert_eq!(status(&sim, a).attempt, 0, "reset after resubscription");
}

#[test]
fn ten_thousand_queues_are_resubscribed_in_chunks_of_1350() {
    let mut config = PoolConfig::default();
    // Creations and deletions have their own per-app budget (256 by default).
    config.max_pending_requests_per_server = 20_000;
    let mut sim = Sim::new(9, config);
    let a = sim.add_server(18, LATENCY);
    let server = sim.servers[a].fake.address();
    let tokens: Vec<_> = (0..10_000)
        .map(|i| {
            sim.submit(
                &format!("app{}", i % 7),
                muxd_core::PoolRequest::CreateQueue {
                    server: server.clone(),
                    websocket: false,
                },
            )
        })
        .collect();
    assert!(sim.run_while(Duration::from_secs(60), |s| {
        tokens.iter().all(|t| s.replies.contains_key(t))
    }));
    assert!(tokens.iter().all(|t| sim.replies[t].1.is_ok()));
    let first_conn_seen = sim.servers[a].fake.seen.len();

    sim.cut(a, "connection reset by peer");
    assert!(sim.run_while(Duration::from_secs(60), |s| {
        let st = status(s, a);
        st.state == ConnState::Up && st.attempt == 0
    }));

    // The server's view: SUBs on the new connection, grouped by arrival time.
    let fake = &sim.servers[a].fake;
    let at = &sim.servers[a].seen_at;
    let mut rounds: Vec<(Instant, usize)> = Vec::new();
    for (seen, t) in fake.seen[first_conn_seen..]
        .iter()
        .zip(&at[first_conn_seen..])
    {
        if seen.tag != "SUB" {
            continue;
        }
        match rounds.last_mut() {
            Some((rt, n)) if rt == t => *n += 1,
            _ => rounds.push((*t, 1)),
        }
    }
    let sizes: Vec<usize> = rounds.iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, [1350, 1350, 1350, 1350, 1350, 1350, 1350, 550]);
    let distinct: BTreeSet<&Vec<u8>> = fake.seen[first_conn_seen..]
        .iter()
        .filter(|s| s.tag == "SUB")
        .map(|s| &s.entity)
        .collect();
    assert_eq!(distinct.len(), 10_000, "every queue once");
    // Every round waited for the previous one's answers: one round trip apart.
    for w in rounds.windows(2) {
        assert_eq!(w[1].0 - w[0].0, LATENCY * 2);
    }
    // All subscribed on the server, to the new connection.
    let conn = fake.seen.last().unwrap().conn;
    assert!(fake.queues.values().all(|q| q.subscriber == Some(conn)));
    let pending = (0..7)
        .flat_map(|i| sim.pool.queues(&format!("app{i}")))
        .filter(|q| q.subscription != muxd_core::Subscription::Subscribed)
        .count();
    assert_eq!(pending, 0);
    // SEND→OK and SUB→SOK round trips fed the lag history.
    let lag = sim.pool.lag(&sim.key(a)).unwrap();
    assert_eq!(
        lag.summary_for(LagSource::Command).unwrap().min,
        LATENCY * 2
    );
}

#[test]
fn a_dead_server_does_not_stall_another() {
    let mut sim = Sim::new(13, PoolConfig::default());
    let dead = sim.add_server(18, LATENCY);
    let live = sim.add_server(18, LATENCY);
    let (dq, duri) = sim.create_queue("alice", dead);
    let (lq, luri) = sim.create_queue("alice", live);
    sim.set_blackhole(dead, true);
    let stuck: Vec<_> = (0..20u32)
        .map(|i| sim.send("bob", &duri, &body(i)))
        .collect();
    for i in 0..50u32 {
        let t = sim.send("bob", &luri, &body(i));
        let sent_at = sim.now;
        sim.run_while(Duration::from_secs(1), |s| s.replies.contains_key(&t));
        let (at, result) = &sim.replies[&t];
        assert!(result.is_ok());
        // SKEY and the confirmation go one round trip each; later messages one.
        assert!(
            *at - sent_at <= LATENCY * 4,
            "send {i} took {:?}",
            *at - sent_at
        );
        sim.run_for(Duration::from_secs(10));
    }
    assert_eq!(sim.received[&lq], (0..50).map(body).collect::<Vec<_>>());
    assert!(stuck.iter().all(|t| !sim.replies.contains_key(t)));
    // The blackholed server comes back: what waited goes out, in order.
    sim.set_blackhole(dead, false);
    assert!(sim.run_while(Duration::from_secs(1200), |s| all_sent(s, &stuck)));
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.received[&dq], (0..20).map(body).collect::<Vec<_>>());
    assert_copies_suppressed(&sim, 70);
}

#[test]
fn idle_servers_are_disconnected_and_lag_watch_pings() {
    let mut sim = Sim::new(17, PoolConfig::default());
    let a = sim.add_server(18, LATENCY);
    let b = sim.add_server(18, LATENCY);
    sim.create_queue("alice", a);
    let (qb, _) = sim.create_queue("alice", b);
    // Server b's only queue is deleted: nothing needs it any more.
    let t = sim.submit(
        "alice",
        muxd_core::PoolRequest::DeleteQueue { queue_id: qb },
    );
    sim.wait_reply(t, Duration::from_secs(5)).unwrap();
    let deleted_at = sim.now;
    sim.run_for(Duration::from_secs(120));
    let kb = sim.key(b);
    let (at, _) = sim.disconnects.iter().find(|(_, k)| *k == kb).unwrap();
    assert_eq!(*at - deleted_at, Duration::from_secs(60));
    assert_eq!(status(&sim, b).state, ConnState::Idle);
    // Server a keeps its queue's connection.
    assert_eq!(status(&sim, a).state, ConnState::Up);

    // `muxctl lag --watch`: one PING a second while watched, background only afterwards.
    let ka = sim.key(a);
    let pings = |s: &Sim| {
        s.pool
            .lag(&ka)
            .unwrap()
            .iter()
            .filter(|x| x.source == LagSource::Ping)
            .count()
    };
    let before = pings(&sim);
    assert!(sim.pool.set_lag_watch(&ka, true, None));
    sim.run_for(Duration::from_secs(30));
    let watched = pings(&sim) - before;
    assert!((29..=31).contains(&watched), "{watched} PINGs in 30 s");
    let summary = status(&sim, a).lag.unwrap();
    assert_eq!(summary.last_rtt, LATENCY * 2);
    sim.pool.set_lag_watch(&ka, false, None);
    // The last watch PING's PONG may still be on the way.
    sim.run_for(Duration::from_secs(1));
    let before = pings(&sim);
    sim.run_for(Duration::from_secs(597));
    assert_eq!(pings(&sim), before, "no PING before 600 s of silence");
    sim.run_for(Duration::from_secs(5));
    assert_eq!(pings(&sim), before + 1);
}

/// A fault the random walk applies.
#[derive(Debug, Clone)]
enum Op {
    Cut(usize),
    Blackhole(usize, bool),
    Down(usize, bool),
    Send(usize),
    NetworkChange,
    Reconnect,
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2usize).prop_map(Op::Cut),
        (0..2usize, any::<bool>()).prop_map(|(i, b)| Op::Blackhole(i, b)),
        (0..2usize, any::<bool>()).prop_map(|(i, b)| Op::Down(i, b)),
        (0..2usize).prop_map(Op::Send),
        Just(Op::NetworkChange),
        Just(Op::Reconnect),
        (1..120_000u64).prop_map(Op::Wait),
    ]
}

/// Invariants that must hold after every step.
fn check(sim: &Sim) {
    for idx in 0..sim.servers.len() {
        let st = status(sim, idx);
        assert!(st.attempt <= 12, "{st:?}");
        if st.state == ConnState::Up {
            assert!(sim.linked(idx), "up without a transport: {st:?}");
        }
        if sim.linked(idx) {
            assert!(
                matches!(st.state, ConnState::Handshaking | ConnState::Up),
                "a transport the pool forgot: {st:?}"
            );
        }
        if st.state == ConnState::BackingOff
            && let Some(at) = st.next_retry_at
        {
            assert!(at - st.since <= CAP, "{st:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_fault_sequences_keep_the_invariants(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..30)) {
        let mut sim = Sim::new(seed, PoolConfig::default());
        let servers = [sim.add_server(18, LATENCY), sim.add_server(16, LATENCY)];
        let uris: Vec<(String, String)> = servers.iter().map(|&i| sim.create_queue("alice", i)).collect();
        let mut sent: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 2];
        let mut tokens = Vec::new();
        for op in ops {
            match op {
                Op::Cut(i) => sim.cut(i, "reset"),
                Op::Blackhole(i, on) => sim.set_blackhole(i, on),
                Op::Down(i, down) => sim.set_down(i, down),
                Op::Send(i) => {
                    let b = format!("m{}", tokens.len()).into_bytes();
                    tokens.push(sim.send("bob", &uris[i].1, &b));
                    sent[i].push(b);
                }
                Op::NetworkChange => {
                    sim.pool.handle_network_change(sim.now);
                    sim.drain();
                }
                Op::Reconnect => {
                    sim.pool.reconnect(sim.now, None);
                    sim.drain();
                }
                Op::Wait(ms) => {
                    let end = sim.now + Duration::from_millis(ms);
                    while sim.step(end) { check(&sim); }
                }
            }
            check(&sim);
        }
        // Heal everything; a network change wakes what gave up. Every message arrives.
        for &i in &servers {
            sim.set_blackhole(i, false);
            sim.set_down(i, false);
        }
        sim.pool.handle_network_change(sim.now);
        sim.drain();
        prop_assert!(sim.run_while(Duration::from_secs(3600), |s| all_sent(s, &tokens)));
        sim.run_for(Duration::from_secs(2));
        check(&sim);
        for (i, (queue_id, _)) in uris.iter().enumerate() {
            let got = sim.received.get(queue_id).cloned().unwrap_or_default();
            prop_assert_eq!(&got, &sent[i], "exactly once, in order");
        }
        assert_copies_suppressed(&sim, tokens.len());
    }
}
