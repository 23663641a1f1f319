//! The durable store with the real binaries: nothing an app handed over is lost or repeated
//! when the daemon is killed, sends work while the server is down, secrets never reach the
//! disk or the log in the clear, backups restore, and a damaged store stops the daemon.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_e2e::{Daemon, RawClient, RecvError, Relay};
use muxd_ipc_proto::{Op, QueueInfo, ReceivedMessage, Reply, Response, ServerMessage};

use crate::smp::{Queue, create_queue, expected, muxctl_ok, upstreams};

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn unb64(body: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap(),
    )
    .unwrap()
}

fn send_op(uri: &str, body: &str, wait: bool) -> Op {
    Op::Send {
        queue_uri: uri.to_owned(),
        body_b64: b64(body),
        wait,
    }
}

/// Sends one message and returns `(message_id, state)` from the reply.
fn send(client: &mut RawClient, uri: &str, body: &str, wait: bool) -> (String, String) {
    match client.request(send_op(uri, body, wait)) {
        ServerMessage::Response(Response {
            reply: Reply::Sent { message_id, state },
            ..
        }) => (message_id, state),
        other => panic!("send {body:?} failed: {other:?}"),
    }
}

fn queue_list(client: &mut RawClient) -> Vec<QueueInfo> {
    match client.request(Op::QueueList) {
        ServerMessage::Response(Response {
            reply: Reply::Queues { queues },
            ..
        }) => queues,
        other => panic!("queue_list failed: {other:?}"),
    }
}

fn message_state(client: &mut RawClient, message_id: &str) -> String {
    match client.request(Op::MessageStatus {
        message_id: message_id.to_owned(),
    }) {
        ServerMessage::Response(Response {
            reply: Reply::MessageStatus { state, .. },
            ..
        }) => state,
        other => panic!("message_status {message_id} failed: {other:?}"),
    }
}

/// What is waiting on `queue_id`, without acknowledging it.
fn peek(client: &mut RawClient, queue_id: &str) -> Vec<ReceivedMessage> {
    match client.request(Op::Recv {
        queue_id: queue_id.to_owned(),
        max: None,
        wait_ms: None,
    }) {
        ServerMessage::Response(Response {
            reply: Reply::Messages { messages },
            ..
        }) => messages,
        other => panic!("recv failed: {other:?}"),
    }
}

/// `pending` of `server` in `muxctl status --json` (0 when the daemon has no entry for it).
fn pending(socket: &Path, server: &str) -> u64 {
    upstreams(socket)
        .iter()
        .find(|u| u["server"] == server)
        .and_then(|u| u["pending"].as_u64())
        .unwrap_or(0)
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `patience`.
fn wait_until(patience: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {patience:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Receives (and acknowledges) exactly `n` messages on `queue_id`, then checks that nothing
/// more is waiting; the bodies in arrival order.
fn receive_exactly(
    client: &mut RawClient,
    queue_id: &str,
    n: usize,
    patience: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + patience;
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived on {queue_id}",
            got.len()
        );
        got.extend(client.recv_and_ack("receiver", queue_id, 1_000));
    }
    got.extend(client.recv_and_ack("receiver", queue_id, 300));
    got
}

/// splitmix64: enough randomness for kill timing, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Connects and says hello, retrying while the daemon is down or restarting.
fn reconnect(socket: &Path, app: &str, deadline: Instant) -> RawClient {
    loop {
        assert!(
            Instant::now() < deadline,
            "{app}: could not reconnect to muxd"
        );
        if let Ok(mut c) = RawClient::try_connect(socket)
            && c.try_hello(app).is_ok()
        {
            return c;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

mod crash {
    //! The crash test's sending and receiving apps.

    use super::*;

    /// Queues of the receiving app; the sender spreads its messages over them.
    pub(super) const QUEUES: usize = 4;
    /// Messages sent in total.
    pub(super) const TOTAL: u64 = 10_000;
    /// Messages per queue.
    pub(super) const PER_QUEUE: u64 = TOTAL / QUEUES as u64;
    /// Sends one connection keeps in flight (each may become `unknown` at a kill).
    const WINDOW: usize = 16;
    /// How far a queue's sender may run ahead of the newest message its receiver has seen:
    /// what the relay holds for one queue stays far below its quota.
    const MAX_AHEAD: u64 = 400;

    pub(super) fn body(queue: usize, seq: u64) -> String {
        format!("{queue}#{seq}")
    }

    fn parse(body: &str) -> (usize, u64) {
        let (q, s) = body
            .split_once('#')
            .unwrap_or_else(|| panic!("unexpected body {body:?}"));
        (q.parse().unwrap(), s.parse().unwrap())
    }

    /// What the threads share with the test.
    pub(super) struct Shared {
        /// Per queue: one more than the highest seq its receiver has seen (0: none yet).
        pub(super) seen_upto: [AtomicU64; QUEUES],
        pub(super) accepted: AtomicUsize,
        pub(super) received: AtomicUsize,
        pub(super) senders_done: AtomicUsize,
        /// Set once everything is drained: receivers stop at their next empty `recv`.
        pub(super) stop_receivers: AtomicBool,
        pub(super) deadline: Instant,
    }

    impl Shared {
        pub(super) fn new(deadline: Instant) -> Self {
            Self {
                seen_upto: std::array::from_fn(|_| AtomicU64::new(0)),
                accepted: AtomicUsize::new(0),
                received: AtomicUsize::new(0),
                senders_done: AtomicUsize::new(0),
                stop_receivers: AtomicBool::new(false),
                deadline,
            }
        }

        pub(super) fn progress(&self) -> usize {
            self.accepted.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
        }
    }

    /// One queue's sends, by outcome.
    #[derive(Debug, Default)]
    pub(super) struct Sent {
        /// Answered `queued`: durable, must arrive exactly once.
        pub(super) accepted: BTreeSet<u64>,
        /// The connection died before the answer: may arrive, at most once.
        pub(super) unknown: BTreeSet<u64>,
        /// Answered with an error.
        pub(super) refused: Vec<(u64, String)>,
        pub(super) reconnects: usize,
    }

    /// Sends `queue#0` … `queue#(PER_QUEUE-1)` to `uri` over one connection at a time
    /// (so their order is the order the daemon takes them in), reconnecting after kills.
    /// A send whose answer was lost with its connection is not retried: it is `unknown`.
    pub(super) fn send(socket: &Path, uri: &str, queue: usize, shared: &Shared) -> Sent {
        let mut out = Sent::default();
        let mut next = 0u64;
        let mut outstanding: VecDeque<(u64, u64)> = VecDeque::new();
        let mut client: Option<RawClient> = None;
        while next < PER_QUEUE || !outstanding.is_empty() {
            assert!(
                Instant::now() < shared.deadline,
                "sender {queue} stuck at {next} ({} outstanding)",
                outstanding.len()
            );
            let Some(c) = client.as_mut() else {
                client = Some(reconnect(socket, "tx", shared.deadline));
                out.reconnects += 1;
                continue;
            };
            let ahead = next - shared.seen_upto[queue].load(Ordering::Acquire).min(next);
            if next < PER_QUEUE && outstanding.len() < WINDOW && ahead < MAX_AHEAD {
                if let Ok(id) = c.send_request(send_op(uri, &body(queue, next), false)) {
                    outstanding.push_back((id, next));
                } else {
                    // Perhaps written whole before the daemon died: unknown as well.
                    out.unknown.insert(next);
                    out.unknown
                        .extend(outstanding.drain(..).map(|(_, seq)| seq));
                    client = None;
                }
                next += 1;
                continue;
            }
            if outstanding.is_empty() {
                // Waiting for the receiver to catch up.
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match c.recv_timeout(Duration::from_secs(30)) {
                Ok(ServerMessage::Response(Response { id, reply })) => {
                    let (want, seq) = outstanding.pop_front().unwrap();
                    assert_eq!(id, want, "sender {queue}: answers out of order");
                    match reply {
                        Reply::Sent { state, .. } => {
                            assert_eq!(state, "queued", "sender {queue}, seq {seq}");
                            out.accepted.insert(seq);
                            shared.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("sender {queue}: unexpected answer {other:?}"),
                    }
                }
                Ok(ServerMessage::Error(e)) if e.id.is_some() => {
                    let (want, seq) = outstanding.pop_front().unwrap();
                    assert_eq!(e.id, Some(want), "sender {queue}: answers out of order");
                    out.refused
                        .push((seq, format!("{:?}: {}", e.code, e.message)));
                }
                Ok(ServerMessage::Event(_)) => {}
                Ok(_) | Err(RecvError::Closed | RecvError::Decode(_)) => {
                    out.unknown
                        .extend(outstanding.drain(..).map(|(_, seq)| seq));
                    client = None;
                }
                Err(RecvError::Timeout) => {
                    panic!("sender {queue}: a live daemon did not answer a send in 30 s")
                }
            }
        }
        shared.senders_done.fetch_add(1, Ordering::Release);
        out
    }

    /// What one queue's receiver saw.
    #[derive(Debug, Default)]
    pub(super) struct Received {
        /// Seqs in the order they first arrived.
        pub(super) order: Vec<u64>,
        /// Each seq's `msg_id`, and whether its `ack` was answered.
        seen: HashMap<u64, (String, bool)>,
        /// Arrived again with the same `msg_id` after its ack went unanswered (a crash).
        pub(super) redelivered: usize,
        /// Arrived again although acknowledged, or under another `msg_id`.
        pub(super) duplicates: Vec<String>,
        /// First arrivals that were not in seq order.
        pub(super) out_of_order: Vec<String>,
        /// Acks answered with an error.
        pub(super) ack_errors: Vec<String>,
        pub(super) reconnects: usize,
    }

    impl Received {
        fn arrived(&mut self, queue: usize, m: &ReceivedMessage, shared: &Shared) {
            let body = unb64(&m.body_b64);
            let (q, seq) = parse(&body);
            assert_eq!(q, queue, "{body:?} arrived on queue {queue}");
            match self.seen.get(&seq) {
                None => {
                    if let Some(&last) = self.order.last()
                        && seq <= last
                    {
                        self.out_of_order
                            .push(format!("{body} after {queue}#{last}"));
                    }
                    self.order.push(seq);
                    self.seen.insert(seq, (m.msg_id.clone(), false));
                    shared.seen_upto[queue].fetch_max(seq + 1, Ordering::AcqRel);
                    shared.received.fetch_add(1, Ordering::Relaxed);
                }
                Some((msg_id, false)) if *msg_id == m.msg_id => self.redelivered += 1,
                Some((msg_id, acked)) => self.duplicates.push(format!(
                    "{body}: msg_id {} again as {} (ack answered: {acked})",
                    msg_id, m.msg_id
                )),
            }
        }
    }

    /// Receives and acknowledges on `queue_id` until told to stop, reconnecting after kills.
    pub(super) fn receive(
        socket: &Path,
        queue_id: &str,
        queue: usize,
        shared: &Shared,
    ) -> Received {
        let mut out = Received::default();
        let mut client: Option<RawClient> = None;
        loop {
            assert!(
                Instant::now() < shared.deadline,
                "receiver {queue} stuck after {} messages",
                out.order.len()
            );
            let stop = shared.stop_receivers.load(Ordering::Acquire);
            let Some(c) = client.as_mut() else {
                client = Some(reconnect(socket, "rx", shared.deadline));
                out.reconnects += 1;
                continue;
            };
            let Some(messages) = recv_once(c, queue, queue_id) else {
                client = None;
                continue;
            };
            for m in &messages {
                out.arrived(queue, m, shared);
            }
            if messages.is_empty() && stop {
                return out;
            }
            // Acks pipelined, then every answer read before the next `recv`.
            let mut acks = VecDeque::new();
            for m in &messages {
                let op = Op::Ack {
                    queue_id: queue_id.to_owned(),
                    msg_id: m.msg_id.clone(),
                };
                match c.send_request(op) {
                    Ok(id) => acks.push_back((id, m)),
                    Err(_) => break,
                }
            }
            while let Some((id, m)) = acks.front().copied() {
                match c.recv_timeout(Duration::from_secs(30)) {
                    Ok(ServerMessage::Response(r)) => {
                        assert_eq!(r.id, id, "receiver {queue}: answers out of order");
                        assert_eq!(r.reply, Reply::Done, "receiver {queue}");
                        let (_, seq) = parse(&unb64(&m.body_b64));
                        if let Some(entry) = out.seen.get_mut(&seq) {
                            entry.1 = true;
                        }
                        acks.pop_front();
                    }
                    Ok(ServerMessage::Error(e)) if e.id == Some(id) => {
                        out.ack_errors.push(format!(
                            "{}: {:?} {}",
                            unb64(&m.body_b64),
                            e.code,
                            e.message
                        ));
                        acks.pop_front();
                    }
                    Ok(ServerMessage::Event(_)) => {}
                    Ok(_) | Err(RecvError::Closed | RecvError::Decode(_)) => break,
                    Err(RecvError::Timeout) => {
                        panic!("receiver {queue}: a live daemon did not answer an ack in 30 s")
                    }
                }
            }
            if !acks.is_empty() {
                client = None;
            }
        }
    }

    /// One long-poll `recv`; `None` if the connection died.
    fn recv_once(c: &mut RawClient, queue: usize, queue_id: &str) -> Option<Vec<ReceivedMessage>> {
        let op = Op::Recv {
            queue_id: queue_id.to_owned(),
            max: Some(64),
            wait_ms: Some(300),
        };
        let id = c.send_request(op).ok()?;
        loop {
            match c.recv_timeout(Duration::from_secs(30)) {
                Ok(ServerMessage::Response(Response {
                    id: rid,
                    reply: Reply::Messages { messages },
                })) if rid == id => return Some(messages),
                Ok(ServerMessage::Event(_)) => {}
                Ok(ServerMessage::Error(e)) if e.id.is_none() => return None,
                Ok(other) => panic!("receiver {queue}: unexpected answer to recv: {other:?}"),
                Err(RecvError::Closed | RecvError::Decode(_)) => return None,
                Err(RecvError::Timeout) => {
                    panic!("receiver {queue}: a live daemon did not answer a recv in 30 s")
                }
            }
        }
    }
}

/// Kills at least this many times in the crash test.
const MIN_KILLS: usize = 50;

/// The crash test: 10,000 messages from one app to four queues of another, from
/// concurrent connections, while the daemon is killed with SIGKILL at random moments (seeded,
/// `MUXD_E2E_SEED` to repeat) at least 50 times and restarted on the same data dir. Every
/// message answered `queued` arrives exactly once, one whose answer was lost at most once,
/// each queue in order; a redelivery of a message whose ack went unanswered is counted
/// separately. Prints the numbers, including the copies the daemon's dedup dropped.
#[test]
fn crash_test_ten_thousand_messages_fifty_kills() {
    use crash::{PER_QUEUE, QUEUES};
    let seed = std::env::var("MUXD_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test seed: {seed} (MUXD_E2E_SEED={seed} repeats the kill pattern)");
    let mut rng = Rng(seed);
    let started = Instant::now();

    // A generous quota: the relay is not what is under test, and an `ERR QUOTA` means a
    // minutes-long back-off.
    let relay = Relay::builder().args(["--quota", "10000"]).start();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let queues: Vec<Queue> = (0..QUEUES)
        .map(|_| create_queue(&socket, "rx", relay.address(), false))
        .collect();

    let shared = crash::Shared::new(started + Duration::from_secs(400));
    let mut kills = 0usize;
    let mut kills_while_starting = 0usize;
    let (sent, received, dropped) = std::thread::scope(|s| {
        let senders: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (socket, shared) = (&socket, &shared);
                s.spawn(move || crash::send(socket, &q.uri, i, shared))
            })
            .collect();
        let receivers: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (socket, shared) = (&socket, &shared);
                s.spawn(move || crash::receive(socket, &q.id, i, shared))
            })
            .collect();

        // Kill after a random amount of progress (sends accepted plus messages received),
        // or after a random idle time once the senders are done.
        while kills < MIN_KILLS || shared.senders_done.load(Ordering::Acquire) < QUEUES {
            assert!(
                Instant::now() < shared.deadline,
                "the crash test ran out of time after {kills} kills"
            );
            let from = shared.progress();
            let need = 100 + usize::try_from(rng.below(400)).unwrap();
            let idle = Duration::from_millis(100 + rng.below(900));
            let since = Instant::now();
            while shared.progress() - from < need && since.elapsed() < idle {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_micros(rng.below(20_000)));
            daemon.kill();
            kills += 1;
            if rng.below(8) == 0 {
                // Also while it restores and reconnects.
                daemon.respawn();
                std::thread::sleep(Duration::from_micros(rng.below(60_000)));
                daemon.kill();
                kills += 1;
                kills_while_starting += 1;
            }
            daemon.restart();
        }
        let sent: Vec<crash::Sent> = senders.into_iter().map(|t| t.join().unwrap()).collect();

        // Drained: everything accepted arrived, nothing is pending for the server or waiting
        // for the app, and nothing new arrives for a while.
        let accepted: usize = sent.iter().map(|s| s.accepted.len()).sum();
        let mut admin = daemon.client("rx");
        let mut quiet_since = (Instant::now(), shared.received.load(Ordering::Acquire));
        loop {
            assert!(
                Instant::now() < shared.deadline,
                "not drained: {} received, {accepted} accepted, upstreams {:?}",
                shared.received.load(Ordering::Acquire),
                upstreams(&socket)
            );
            let received = shared.received.load(Ordering::Acquire);
            if received != quiet_since.1 {
                quiet_since = (Instant::now(), received);
            }
            let pending: u64 = upstreams(&socket)
                .iter()
                .map(|u| u["pending"].as_u64().unwrap_or(0))
                .sum();
            let waiting: u32 = queue_list(&mut admin).iter().map(|q| q.waiting).sum();
            if received >= accepted
                && pending == 0
                && waiting == 0
                && quiet_since.0.elapsed() > Duration::from_secs(2)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        shared.stop_receivers.store(true, Ordering::Release);
        let received: Vec<crash::Received> =
            receivers.into_iter().map(|t| t.join().unwrap()).collect();
        // The daemon's own count, journaled with each dropped copy, over every run.
        let dropped: u64 = queue_list(&mut admin)
            .iter()
            .map(|q| q.duplicates_suppressed)
            .sum();
        (sent, received, dropped)
    });

    let logs = daemon.logs();
    let logged = logs.matches("dropping a copy").count();
    let accepted: usize = sent.iter().map(|s| s.accepted.len()).sum();
    let unknown: usize = sent.iter().map(|s| s.unknown.len()).sum();
    let unknown_arrived: usize = sent
        .iter()
        .zip(&received)
        .map(|(s, r)| r.order.iter().filter(|seq| s.unknown.contains(seq)).count())
        .sum();
    let redelivered: usize = received.iter().map(|r| r.redelivered).sum();
    let duplicates: usize = received.iter().map(|r| r.duplicates.len()).sum();
    let delivered: usize = received.iter().map(|r| r.order.len()).sum();
    eprintln!(
        "crash test (seed {seed}): {kills} SIGKILLs ({kills_while_starting} while starting), \
         {} daemon runs; {accepted} sends accepted, {unknown} unknown ({unknown_arrived} of \
         them arrived), {delivered} delivered; {redelivered} redelivered after a crash (ack \
         unanswered); {duplicates} duplicates; dedup dropped {dropped} copies (the queues' \
         duplicates_suppressed; {logged} debug log lines); sender reconnects {}, receiver \
         reconnects {}; {:?}",
        daemon.runs(),
        sent.iter().map(|s| s.reconnects).sum::<usize>(),
        received.iter().map(|r| r.reconnects).sum::<usize>(),
        started.elapsed()
    );

    assert!(kills >= MIN_KILLS, "only {kills} kills");
    for (i, (s, r)) in sent.iter().zip(&received).enumerate() {
        assert!(
            s.refused.is_empty(),
            "queue {i}: sends refused: {:?}",
            s.refused
        );
        assert_eq!(
            s.accepted.len() + s.unknown.len(),
            usize::try_from(PER_QUEUE).unwrap(),
            "queue {i}"
        );
        assert!(
            r.duplicates.is_empty(),
            "queue {i}: duplicates: {:?}",
            r.duplicates
        );
        assert!(
            r.out_of_order.is_empty(),
            "queue {i}: out of order: {:?}",
            r.out_of_order
        );
        assert!(
            r.ack_errors.is_empty(),
            "queue {i}: ack errors: {:?}",
            r.ack_errors
        );
        let arrived: BTreeSet<u64> = r.order.iter().copied().collect();
        let lost: Vec<u64> = s.accepted.difference(&arrived).copied().collect();
        assert!(
            lost.is_empty(),
            "queue {i}: accepted but never delivered: {lost:?}"
        );
        let foreign: Vec<u64> = arrived
            .iter()
            .filter(|seq| !s.accepted.contains(seq) && !s.unknown.contains(seq))
            .copied()
            .collect();
        assert!(foreign.is_empty(), "queue {i}: never sent: {foreign:?}");
    }
    assert!(
        !logs.contains("panicked"),
        "a daemon run panicked:\n{}",
        logs.lines()
            .filter(|l| l.contains("panicked"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The offline test: the relay is down (its identity and queues kept on disk), 1,000
/// sends are all answered `queued` at once, status shows them pending for that server, and
/// `muxctl send` says `queued` too; the daemon is stopped and started again, then the relay
/// comes back on the same address: everything arrives, in order, exactly once.
#[test]
fn offline_thousand_sends_survive_a_daemon_restart_and_arrive_in_order() {
    const N: usize = 1000;
    let mut relay = Relay::builder().args(["--quota", "10000"]).start();
    let server = relay.address().to_owned();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let q = create_queue(&socket, "rx", &server, false);
    relay.terminate();

    let mut tx = daemon.client("tx");
    let started = Instant::now();
    // Pipelined (up to 64 unanswered, as a client that reads its answers): none may wait
    // for the server.
    let mut ids = Vec::with_capacity(N);
    let mut next = 0;
    while ids.len() < N {
        if next < N && next - ids.len() < 64 {
            tx.send_request(send_op(&q.uri, &format!("m-{next}"), false))
                .unwrap();
            next += 1;
            continue;
        }
        let i = ids.len();
        match tx.recv_timeout(Duration::from_secs(30)) {
            Ok(ServerMessage::Response(Response {
                reply: Reply::Sent { message_id, state },
                ..
            })) => {
                assert_eq!(state, "queued", "send {i}");
                ids.push(message_id);
            }
            other => panic!("send {i} while the relay is down: {other:?}"),
        }
    }
    eprintln!(
        "{N} sends queued in {:?} with the relay down",
        started.elapsed()
    );
    // The real CLI says so too.
    let out = muxctl_ok(&socket, "tx", &["send", &q.uri, &format!("m-{N}")]);
    assert!(out.starts_with("queued "), "muxctl send printed {out:?}");
    let out = muxctl_ok(
        &socket,
        "tx",
        &["--json", "send", &q.uri, &format!("m-{}", N + 1)],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"], "queued", "{out}");
    let total = N + 2;
    assert!(
        pending(&socket, &server) >= total as u64,
        "{:?}",
        upstreams(&socket)
    );
    assert_eq!(message_state(&mut tx, &ids[0]), "queued");
    drop(tx);

    daemon.stop();
    daemon.restart();
    daemon.wait_for_log("store opened");
    // Still pending after the restart, before the relay is back.
    wait_until(Duration::from_secs(10), "pending restored", || {
        pending(&socket, &server) >= total as u64
    });
    let mut tx = daemon.client("tx");
    assert_eq!(message_state(&mut tx, &ids[N - 1]), "queued");

    relay.restart();
    let mut rx = daemon.client("rx");
    let got = receive_exactly(&mut rx, &q.id, total, Duration::from_secs(120));
    assert_eq!(got, expected("m", total));
    wait_until(Duration::from_secs(10), "nothing pending", || {
        pending(&socket, &server) == 0
    });
    for id in [&ids[0], &ids[N - 1]] {
        assert_eq!(message_state(&mut tx, id), "sent", "{id}");
    }
}

/// `(name, bytes)` of every 32-byte private key and secret in the store's queue records,
/// read through the store's own API (layout: muxd-core's `queue.rs` / `sender.rs` `save`).
fn record_secrets(store: &Path, key_file: &Path, queues: &[&Queue]) -> Vec<(String, Vec<u8>)> {
    use muxd_queue_store::{Store, Unlock};
    let store = Store::open(store, &Unlock::KeyFile(key_file.to_owned())).unwrap();
    let records = store.records(None).unwrap();
    let mut secrets = Vec::new();
    let (mut receivers, mut senders) = (0, 0);
    for r in &records {
        let s = r.secret.expose();
        assert_eq!(s[0], 1, "secret format version");
        match r.public.as_slice() {
            b"R" => {
                // auth kind, auth secret, rcv DH secret, e2e secret key, [flag, e2e shared
                // secret], …, the queue URI last.
                receivers += 1;
                let uri = queues
                    .iter()
                    .find(|q| s.ends_with(q.uri.as_bytes()))
                    .unwrap_or_else(|| panic!("receiver record of no known queue"));
                secrets.push((format!("{} rcv auth", uri.id), s[2..34].to_vec()));
                secrets.push((format!("{} rcv dh", uri.id), s[34..66].to_vec()));
                secrets.push((format!("{} e2e secret", uri.id), s[66..98].to_vec()));
                if s[98] == 1 {
                    secrets.push((format!("{} e2e shared", uri.id), s[99..131].to_vec()));
                }
            }
            b"S" => {
                // Recipient e2e public key, client version, flag, auth kind, auth secret, e2e
                // secret key, ….
                senders += 1;
                let recipient_pub = &s[1..33];
                assert!(
                    queues.iter().any(|q| uri_has_key(&q.uri, recipient_pub)),
                    "sender record for no known queue"
                );
                secrets.push((format!("sender {senders} auth"), s[37..69].to_vec()));
                secrets.push((format!("sender {senders} e2e secret"), s[69..101].to_vec()));
            }
            other => panic!("unknown record kind {other:?}"),
        }
    }
    assert_eq!(
        (receivers, senders),
        (queues.len(), queues.len()),
        "one receiver and one sender record per queue"
    );
    for (name, bytes) in &secrets {
        assert!(bytes.iter().any(|b| *b != 0), "{name} is all zeros");
    }
    secrets
}

/// Whether the URI's `dh=` parameter (an X25519 SPKI, base64url) ends in `key`.
fn uri_has_key(uri: &str, key: &[u8]) -> bool {
    let Some(dh) = uri.split(['?', '&']).find_map(|p| p.strip_prefix("dh=")) else {
        return false;
    };
    let dh = dh.replace("%3D", "=").trim_end_matches('=').to_owned();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(dh)
        .is_ok_and(|spki| spki.ends_with(key))
}

/// Every way a test looks for `bytes` in a file: raw, hex and base64 (both alphabets; the
/// unpadded prefix also matches padded text).
fn encodings(bytes: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        ("raw", bytes.to_vec()),
        ("hex", hex.clone().into_bytes()),
        ("HEX", hex.to_uppercase().into_bytes()),
        (
            "base64",
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(bytes)
                .into_bytes(),
        ),
        (
            "base64url",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(bytes)
                .into_bytes(),
        ),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The "no key bytes at rest": after queues exist and messages went both ways (one
/// still waiting in the mailbox, one still queued for a server that is down), no private key
/// or e2e secret of any queue record appears in the database file or the daemon's debug log,
/// raw or hex or base64; neither do the key file's key or a message body.
#[test]
fn no_key_bytes_in_the_store_or_the_log() {
    let relay = Relay::start();
    let mut down = Relay::start();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let alice_q = create_queue(&socket, "alice", relay.address(), false);
    let bob_q = create_queue(&socket, "bob", relay.address(), false);
    let far_q = create_queue(&socket, "alice", down.address(), false);
    let mut alice = daemon.client("alice");
    let mut bob = daemon.client("bob");
    let bodies = [
        "plaintext-marker-bob-to-alice-1",
        "plaintext-marker-alice-to-bob-1",
        "plaintext-marker-bob-to-alice-unread",
        "plaintext-marker-bob-to-far-queued",
    ];
    send(&mut bob, &alice_q.uri, bodies[0], true);
    send(&mut alice, &bob_q.uri, bodies[1], true);
    send(&mut bob, &alice_q.uri, bodies[2], true);
    // Sender state for the far queue too, then a message that stays queued.
    send(&mut bob, &far_q.uri, "first", true);
    assert_eq!(
        receive_exactly(&mut alice, &far_q.id, 1, Duration::from_secs(20)),
        ["first"]
    );
    down.terminate();
    let (_, state) = send(&mut bob, &far_q.uri, bodies[3], false);
    assert_eq!(state, "queued");
    assert_eq!(
        alice.recv_and_ack("alice", &alice_q.id, 5_000),
        [bodies[0], bodies[2]]
    );
    assert_eq!(bob.recv_and_ack("bob", &bob_q.id, 5_000), [bodies[1]]);
    // One more that alice has not read: it stays in the mailbox.
    send(
        &mut bob,
        &alice_q.uri,
        "plaintext-marker-in-the-mailbox",
        true,
    );
    wait_until(
        Duration::from_secs(10),
        "the message reaches alice's mailbox",
        || {
            queue_list(&mut alice)
                .iter()
                .any(|q| q.queue_id == alice_q.id && q.waiting == 1)
        },
    );
    drop((alice, bob));
    daemon.stop();

    let secrets = record_secrets(
        &daemon.store_path(),
        &daemon.key_file(),
        &[&alice_q, &bob_q, &far_q],
    );
    let key_file = std::fs::read(daemon.key_file()).unwrap();
    let mut needles = secrets.clone();
    needles.push((
        "key file's key".to_owned(),
        key_file[key_file.len() - 32..].to_vec(),
    ));

    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(daemon.data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| *p != daemon.key_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(
        files
            .iter()
            .any(|(p, _)| Path::new(p) == daemon.store_path()),
        "no database file in {}",
        daemon.data_dir().display()
    );
    files.push(("daemon log".to_owned(), daemon.logs().into_bytes()));
    let mut hits = Vec::new();
    for (file, contents) in &files {
        for (name, secret) in &needles {
            for (encoding, needle) in encodings(secret) {
                if contains(contents, &needle) {
                    hits.push(format!("{name} ({encoding}) in {file}"));
                }
            }
        }
        for body in bodies.iter().chain(&["plaintext-marker-in-the-mailbox"]) {
            if file != "daemon log" && contains(contents, body.as_bytes()) {
                hits.push(format!("message body {body:?} in {file}"));
            }
        }
    }
    eprintln!(
        "searched {} files for {} secrets: {} hits",
        files.len(),
        needles.len(),
        hits.len()
    );
    assert!(
        hits.is_empty(),
        "secrets at rest in the clear:\n{}",
        hits.join("\n")
    );
}

/// Queues, received messages the app has not acknowledged, and sends still waiting for a
/// server all survive a SIGKILL; the restarted daemon resubscribes, delivers what waited,
/// sends what was queued once its server is back, and knows which messages were sent.
#[test]
fn sigkill_and_restart_keep_queues_mailbox_and_pending_sends() {
    let relay = Relay::start();
    let mut far = Relay::start();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let q1 = create_queue(&socket, "rx", relay.address(), false);
    let q2 = create_queue(&socket, "rx", relay.address(), false);
    let q3 = create_queue(&socket, "rx", far.address(), false);
    let mut tx = daemon.client("tx");
    let (sent_id, state) = send(&mut tx, &q1.uri, "a1", true);
    assert_eq!(state, "sent");
    send(&mut tx, &q1.uri, "a2", true);
    send(&mut tx, &q3.uri, "f0", true);
    let mut rx = daemon.client("rx");
    wait_until(
        Duration::from_secs(10),
        "both messages in the mailbox",
        || {
            queue_list(&mut rx)
                .iter()
                .any(|q| q.queue_id == q1.id && q.waiting == 2)
        },
    );
    // Read but not acknowledged: it must come back.
    let first = peek(&mut rx, &q1.id);
    assert_eq!(first.len(), 2);
    assert_eq!(
        receive_exactly(&mut rx, &q3.id, 1, Duration::from_secs(20)),
        ["f0"]
    );
    far.terminate();
    let (p1, state) = send(&mut tx, &q3.uri, "p1", false);
    assert_eq!(state, "queued");
    send(&mut tx, &q3.uri, "p2", false);
    let before = queue_list(&mut rx);
    assert_eq!(before.len(), 3);
    drop((tx, rx));

    daemon.kill();
    daemon.restart();
    let mut rx = daemon.client("rx");
    let mut tx = daemon.client("tx");
    let after = queue_list(&mut rx);
    let key = |qs: &[QueueInfo]| {
        let mut v: Vec<_> = qs
            .iter()
            .map(|q| (q.queue_id.clone(), q.server.clone(), q.queue_uri.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&after), key(&before), "queues after the restart");
    assert_eq!(
        after.iter().find(|q| q.queue_id == q1.id).unwrap().waiting,
        2,
        "{after:?}"
    );
    assert_eq!(message_state(&mut tx, &sent_id), "sent");
    let p1_state = message_state(&mut tx, &p1);
    assert!(
        p1_state == "queued" || p1_state == "sending",
        "p1 is {p1_state}"
    );
    assert!(
        pending(&socket, far.address()) >= 2,
        "{:?}",
        upstreams(&socket)
    );

    // The waiting messages, with the msg_ids they had before.
    let again = peek(&mut rx, &q1.id);
    assert_eq!(again, first);
    assert_eq!(
        receive_exactly(&mut rx, &q1.id, 2, Duration::from_secs(10)),
        ["a1", "a2"]
    );
    // The queue is subscribed again: a new message arrives.
    send(&mut tx, &q1.uri, "a3", false);
    assert_eq!(
        receive_exactly(&mut rx, &q1.id, 1, Duration::from_secs(20)),
        ["a3"]
    );
    assert!(
        queue_list(&mut rx)
            .iter()
            .all(|q| q.queue_id != q2.id || q.waiting == 0)
    );

    far.restart();
    assert_eq!(
        receive_exactly(&mut rx, &q3.id, 2, Duration::from_secs(60)),
        ["p1", "p2"]
    );
    wait_until(Duration::from_secs(10), "p1 sent", || {
        message_state(&mut tx, &p1) == "sent"
    });
}

/// `muxctl export` writes a sealed backup of a running daemon's store; `muxd restore --from`
/// makes a new data dir of it, and a daemon on that dir has the same queues and delivers what
/// was waiting.
#[test]
fn export_then_restore_into_a_new_data_dir() {
    let relay = Relay::start();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    let q1 = create_queue(&socket, "rx", relay.address(), false);
    let q2 = create_queue(&socket, "rx", relay.address(), false);
    let mut tx = daemon.client("tx");
    send(&mut tx, &q1.uri, "kept-in-the-backup", true);
    let mut rx = daemon.client("rx");
    wait_until(
        Duration::from_secs(10),
        "the message in the mailbox",
        || {
            queue_list(&mut rx)
                .iter()
                .any(|q| q.queue_id == q1.id && q.waiting == 1)
        },
    );
    let before = queue_list(&mut rx);
    drop((tx, rx));

    let backup = daemon.dir().join("backup.muxd");
    let out = muxctl_ok(&socket, "rx", &["export", backup.to_str().unwrap()]);
    assert!(out.contains("exported"), "{out}");
    let meta = std::fs::metadata(&backup).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "backup mode");
    }
    let contents = std::fs::read(&backup).unwrap();
    assert!(
        !contains(&contents, b"kept-in-the-backup"),
        "the backup holds a body in the clear"
    );
    daemon.stop();

    // The new dir needs the key file that protects the backup (key file mode).
    let new_dir = daemon.dir().join("restored");
    std::fs::create_dir(&new_dir).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&new_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::copy(daemon.key_file(), new_dir.join("muxd.key")).unwrap();
    let out = daemon
        .command("restore")
        .arg("--from")
        .arg(&backup)
        .arg("--data-dir")
        .arg(&new_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "muxd restore failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = Daemon::builder().data_dir(&new_dir).start();
    let mut rx = restored.client("rx");
    let after = queue_list(&mut rx);
    let ids = |qs: &[QueueInfo]| {
        qs.iter()
            .map(|q| (q.queue_id.clone(), q.queue_uri.clone(), q.waiting))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(ids(&after), ids(&before));
    assert!(after.iter().any(|q| q.queue_id == q2.id));
    assert_eq!(
        receive_exactly(&mut rx, &q1.id, 1, Duration::from_secs(10)),
        ["kept-in-the-backup"]
    );
}

/// A damaged store stops `muxd run` with an error naming the file, and the file is left as
/// it was: a foreign file, garbage over the database, a truncated database.
#[test]
fn a_corrupt_store_stops_the_daemon_and_is_left_alone() {
    let relay = Relay::start();
    let mut daemon = Daemon::start();
    let socket = daemon.socket().to_owned();
    create_queue(&socket, "rx", relay.address(), false);
    daemon.stop();
    let path = daemon.store_path();
    let good = std::fs::read(&path).unwrap();
    assert!(good.len() > 4096, "store of {} bytes", good.len());

    let mut garbage = good.clone();
    let mut rng = Rng(7);
    for b in &mut garbage[..good.len() / 2] {
        *b = rng.next() as u8;
    }
    let variants: [(&str, Vec<u8>); 3] = [
        (
            "a text file",
            b"these are not the bytes you are looking for\n".to_vec(),
        ),
        ("garbage over the first half", garbage),
        ("truncated to a quarter", good[..good.len() / 4].to_vec()),
    ];
    for (what, bytes) in variants {
        std::fs::write(&path, &bytes).unwrap();
        daemon.respawn();
        let status = daemon.wait_exit();
        let log = daemon.log();
        assert!(!status.success(), "{what}: muxd run started:\n{log}");
        assert!(
            log.contains(&path.display().to_string()),
            "{what}: the error does not name {}:\n{log}",
            path.display()
        );
        assert!(
            !socket.exists() || RawClient::try_connect(&socket).is_err(),
            "{what}"
        );
        assert!(
            std::fs::read(&path).unwrap() == bytes,
            "{what}: the file was changed"
        );
        eprintln!(
            "{what}: {status}, {}",
            log.lines().last().unwrap_or_default()
        );
    }

    // Back to the good file: the daemon starts and has its queue.
    std::fs::write(&path, &good).unwrap();
    daemon.restart();
    let mut rx = daemon.client("rx");
    assert_eq!(queue_list(&mut rx).len(), 1);
}

/// `muxd run` refuses to start without `muxd init`, and says how to fix it.
#[test]
fn run_without_init_refuses_to_start() {
    let mut daemon = Daemon::builder().no_init().spawn();
    let status = daemon.wait_exit();
    let log = daemon.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("muxd init"), "{log}");
    assert!(!daemon.store_path().exists());
}
