//! The pool's mailbox and journal, backed by the durable store.
//!
//! The pool reports every change that must survive a restart through the [`Mailbox`] trait
//! (received messages, app acknowledgements, queue records, sender state, outbound messages
//! and their outcomes). [`Journal`] answers reads from memory and stages every write into one
//! [`Batch`]; the driver calls [`Journal::commit`] before it lets any effect of those changes
//! out — a reply to an app, a block to a server (the server `ACK` of a stored message above
//! all). That is write-ahead logging with group commit for free: everything staged during one
//! turn of the driver loop costs one redb transaction and one fsync.
//!
//! Layout in the store (`docs/store.md`): queue records keyed by `(server, recipient id)` with
//! public part `"R"`, sender records keyed by `(server, sender id)` with public part `"S"`;
//! inbound bodies are `ts (8 bytes BE) ‖ body`; per-queue seq windows as state
//! `"seqwin/<queue id>"` → `high ‖ below` (16 bytes BE); per-queue counts of dropped duplicate
//! copies as state `"dups/<queue id>"` → count (8 bytes BE).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muxd_core::{
    Delivery, Mailbox, MemoryMailbox, MessageOutcome, Pool, PoolConfig, PoolError, ReceivedMessage,
    SavedMessage, SavedQueue, SavedSender, SeqWindow, ServerKey,
};
use muxd_queue_store::{
    Batch, MessageState, NewOutbound, OutboundId, QueueRecord, QueueRef, SecretBytes, Store,
    StoreError,
};
use muxd_smp::encoding::base64url_encode;
use zeroize::{Zeroize, Zeroizing};

const RECEIVER: &[u8] = b"R";
const SENDER: &[u8] = b"S";
const SEQ_WINDOW: &str = "seqwin/";
const DUPLICATES: &str = "dups/";

/// Why the store could not be read back into a pool at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The store failed (its message names the file).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record the store returned does not make sense to the pool.
    #[error("{path}: {what}: {error}")]
    Record {
        /// The database file.
        path: String,
        /// Which record.
        what: String,
        /// What is wrong with it.
        error: PoolError,
    },
}

/// What [`Journal::restore`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Queues of the apps.
    pub queues: usize,
    /// Destinations with sender state.
    pub senders: usize,
    /// Messages still to send.
    pub outbound: usize,
    /// Received messages waiting for their apps.
    pub inbound: usize,
}

/// The pool's [`Mailbox`]: messages in memory, every change journaled to the store.
pub(crate) struct Journal {
    memory: MemoryMailbox,
    batch: Batch,
    /// `None` only in the driver's unit tests, which run without a store.
    store: Option<Arc<Store>>,
    /// Each queue's store key and owner, by the pool's queue id.
    queues: BTreeMap<String, (QueueRef, String)>,
    /// How long an outbound message may wait; recorded with it as its expiry.
    ttl: Duration,
    /// Copies dropped by the dedup, per queue id, as restored and as since counted.
    duplicates: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("memory", &self.memory)
            .field("staged", &self.batch.len())
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn window_key(queue_id: &str) -> Vec<u8> {
    format!("{SEQ_WINDOW}{queue_id}").into_bytes()
}

fn duplicates_key(queue_id: &str) -> Vec<u8> {
    format!("{DUPLICATES}{queue_id}").into_bytes()
}

impl Journal {
    /// A journal writing to `store`.
    pub(crate) fn new(store: Arc<Store>, ttl: Duration) -> Self {
        Self {
            memory: MemoryMailbox::new(),
            batch: Batch::new(),
            store: Some(store),
            queues: BTreeMap::new(),
            ttl,
            duplicates: BTreeMap::new(),
        }
    }

    /// A journal that keeps nothing (the driver's unit tests).
    #[cfg(test)]
    pub(crate) fn in_memory() -> Self {
        Self {
            memory: MemoryMailbox::new(),
            batch: Batch::new(),
            store: None,
            queues: BTreeMap::new(),
            ttl: Duration::from_secs(7 * 24 * 3600),
            duplicates: BTreeMap::new(),
        }
    }

    /// Whether changes wait for [`Self::commit`].
    /// Without a store (unit tests) nothing is ever waiting: there is nothing to commit to.
    pub(crate) fn dirty(&self) -> bool {
        self.store.is_some() && !self.batch.is_empty()
    }

    /// Makes everything staged durable in one transaction. On error nothing staged is
    /// durable, and the caller must not let any effect of it out.
    pub(crate) fn commit(&mut self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut self.batch);
        match &self.store {
            Some(store) => store.commit(batch),
            None => Ok(()),
        }
    }

    /// The store, for queries the pool cannot answer (a finished message's state, export).
    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Builds the pool from what the store kept: queues (with their waiting messages and seq
    /// windows), sender state, and the messages still to send, which go out in their order
    /// once [`Pool::resume`] has connected their servers.
    pub(crate) fn restore(
        store: Arc<Store>,
        config: PoolConfig,
        ttl: Duration,
        now: Instant,
    ) -> Result<(Pool<Self>, Restored), RestoreError> {
        let path = store.path().display().to_string();
        let bad = |what: String, error: PoolError| RestoreError::Record {
            path: path.clone(),
            what,
            error,
        };
        let mut journal = Self::new(Arc::clone(&store), ttl);
        let mut report = Restored::default();
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for record in store.records(None)? {
            let server = ServerKey::from_stored(&record.queue.server)
                .map_err(|e| bad(format!("queue record on {}", record.queue.server), e))?;
            let secret = Zeroizing::new(record.secret.expose().to_vec());
            match record.public.as_slice() {
                RECEIVER => {
                    let queue_id = base64url_encode(&record.queue.queue_id);
                    journal
                        .queues
                        .insert(queue_id.clone(), (record.queue.clone(), record.app.clone()));
                    receivers.push(SavedQueue {
                        queue_id,
                        app: record.app,
                        server,
                        rcv_id: record.queue.queue_id,
                        secret,
                    });
                }
                SENDER => senders.push(SavedSender {
                    server,
                    sender_id: record.queue.queue_id,
                    secret,
                }),
                other => {
                    return Err(bad(
                        "queue record".to_owned(),
                        PoolError::InvalidArgument(format!("unknown record kind {other:?}")),
                    ));
                }
            }
        }
        for (key, value) in store.states(SEQ_WINDOW.as_bytes())? {
            let queue_id = String::from_utf8_lossy(&key[SEQ_WINDOW.len()..]).into_owned();
            let window: [u8; 16] = value.as_slice().try_into().map_err(|_| {
                bad(
                    format!("seq window of {queue_id}"),
                    PoolError::InvalidArgument("not 16 bytes".to_owned()),
                )
            })?;
            let (high, below) = window.split_at(8);
            let high = u64::from_be_bytes(high.try_into().unwrap_or_default());
            let below = u64::from_be_bytes(below.try_into().unwrap_or_default());
            journal
                .memory
                .restore_window(&queue_id, SeqWindow::from_parts(high, below));
        }
        for (key, value) in store.states(DUPLICATES.as_bytes())? {
            let queue_id = String::from_utf8_lossy(&key[DUPLICATES.len()..]).into_owned();
            let count: [u8; 8] = value.as_slice().try_into().map_err(|_| {
                bad(
                    format!("duplicate count of {queue_id}"),
                    PoolError::InvalidArgument("not 8 bytes".to_owned()),
                )
            })?;
            journal
                .duplicates
                .insert(queue_id, u64::from_be_bytes(count));
        }
        for (_app, message) in store.all_pending()? {
            let queue_id = base64url_encode(&message.queue.queue_id);
            let what = || format!("received message on {queue_id}");
            let msg_id = String::from_utf8(message.msg_id.clone()).map_err(|_| {
                bad(
                    what(),
                    PoolError::InvalidArgument("msg id not UTF-8".to_owned()),
                )
            })?;
            let Some((ts, body)) = message.body.split_first_chunk::<8>() else {
                return Err(bad(
                    what(),
                    PoolError::InvalidArgument("body shorter than its timestamp".to_owned()),
                ));
            };
            journal.memory.insert(ReceivedMessage {
                queue_id,
                msg_id,
                ts: i64::from_be_bytes(*ts),
                body: body.to_vec(),
            });
            report.inbound += 1;
        }
        let unfinished = store.unfinished()?;
        let next_id = store.next_outbound_id()?;
        let mut pool = Pool::with_mailbox(config, journal);
        for q in &receivers {
            pool.restore_queue(now, q)
                .map_err(|e| bad(format!("queue {}", q.queue_id), e))?;
            report.queues += 1;
        }
        for s in &senders {
            pool.restore_sender(now, s)
                .map_err(|e| bad(format!("sender state on {}", s.server), e))?;
            report.senders += 1;
        }
        let now_ms = unix_ms();
        for m in unfinished {
            let what = format!("outbound message {}", m.id);
            let server =
                ServerKey::from_stored(&m.queue.server).map_err(|e| bad(what.clone(), e))?;
            let saved = SavedMessage::from_payload(
                m.id.0,
                server,
                m.queue.queue_id.clone(),
                m.app.clone(),
                &m.payload,
            )
            .map_err(|e| bad(what.clone(), e))?;
            // Its wait before the restart counts against the same timeout.
            let enqueued_ms = m.expires_at.saturating_sub(millis(ttl));
            let age = Duration::from_millis(now_ms.saturating_sub(enqueued_ms));
            let queued_at = now.checked_sub(age).unwrap_or(now);
            pool.restore_message(now, saved, queued_at)
                .map_err(|e| bad(what, e))?;
            report.outbound += 1;
        }
        pool.set_next_message_id(next_id.0);
        Ok((pool, report))
    }

    fn queue_ref(&self, queue_id: &str) -> Option<&(QueueRef, String)> {
        self.queues.get(queue_id)
    }
}

impl Mailbox for Journal {
    fn insert(&mut self, message: ReceivedMessage) -> bool {
        // The pool delivers through `deliver`, which journals; a plain insert is only the
        // trait's default path and is journaled the same way (without a seq).
        let staged = self.queue_ref(&message.queue_id).cloned();
        let mut copy = staged.as_ref().map(|_| message.clone());
        let new = self.memory.insert(message);
        if new && let (Some((queue, app)), Some(m)) = (staged, &copy) {
            self.stage_delivery(app, queue, m);
        }
        if let Some(m) = copy.as_mut() {
            m.body.zeroize();
        }
        new
    }

    fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage> {
        self.memory.peek(queue_id, max)
    }

    fn remove(&mut self, queue_id: &str, msg_id: &str) -> bool {
        if !self.memory.remove(queue_id, msg_id) {
            return false;
        }
        if let Some((queue, app)) = self.queue_ref(queue_id).cloned() {
            self.batch
                .ack_inbound(app, queue, msg_id.as_bytes().to_vec());
        }
        true
    }

    fn count(&self, queue_id: &str) -> usize {
        self.memory.count(queue_id)
    }

    fn waiting_bytes(&self, queue_id: &str) -> usize {
        self.memory.waiting_bytes(queue_id)
    }

    fn remove_queue(&mut self, queue_id: &str) {
        self.memory.remove_queue(queue_id);
        if let Some((queue, _)) = self.queues.remove(queue_id) {
            self.batch.forget_inbound(queue.clone());
            self.batch.delete_record(queue);
            self.batch.delete_state(window_key(queue_id));
            self.batch.delete_state(duplicates_key(queue_id));
        }
        self.duplicates.remove(queue_id);
    }

    fn deliver(&mut self, message: ReceivedMessage, seq: u64) -> Delivery {
        let mut copy = message.clone();
        let delivery = self.memory.deliver(message, seq);
        if delivery == Delivery::New
            && let Some((queue, app)) = self.queue_ref(&copy.queue_id).cloned()
        {
            self.stage_delivery(app, queue, &copy);
            if let Some(w) = self.memory.delivered_seqs(&copy.queue_id) {
                let mut value = Vec::with_capacity(16);
                value.extend_from_slice(&w.high().to_be_bytes());
                value.extend_from_slice(&w.below().to_be_bytes());
                self.batch.put_state(window_key(&copy.queue_id), value);
            }
        }
        copy.body.zeroize();
        delivery
    }

    fn delivered_seqs(&self, queue_id: &str) -> Option<SeqWindow> {
        self.memory.delivered_seqs(queue_id)
    }

    fn duplicate_dropped(&mut self, queue_id: &str, total: u64) {
        if self.queues.contains_key(queue_id) {
            self.duplicates.insert(queue_id.to_owned(), total);
            self.batch
                .put_state(duplicates_key(queue_id), total.to_be_bytes().to_vec());
        }
    }

    fn duplicates_dropped(&self, queue_id: &str) -> u64 {
        self.duplicates.get(queue_id).copied().unwrap_or(0)
    }

    fn save_queue(&mut self, queue: &SavedQueue) {
        let key = QueueRef::new(queue.server.to_stored(), queue.rcv_id.clone());
        self.queues
            .insert(queue.queue_id.clone(), (key.clone(), queue.app.clone()));
        self.batch.put_record(QueueRecord {
            queue: key,
            app: queue.app.clone(),
            public: RECEIVER.to_vec(),
            secret: SecretBytes::new(queue.secret.to_vec()),
        });
    }

    fn save_sender(&mut self, sender: &SavedSender) {
        self.batch.put_record(QueueRecord {
            queue: QueueRef::new(sender.server.to_stored(), sender.sender_id.clone()),
            app: String::new(),
            public: SENDER.to_vec(),
            secret: SecretBytes::new(sender.secret.to_vec()),
        });
    }

    fn forget_sender(&mut self, server: &ServerKey, sender_id: &[u8]) {
        self.batch
            .delete_record(QueueRef::new(server.to_stored(), sender_id.to_vec()));
    }

    fn enqueue(&mut self, message: &SavedMessage) {
        self.batch.enqueue(
            OutboundId(message.id),
            NewOutbound {
                queue: QueueRef::new(message.server.to_stored(), message.sender_id.clone()),
                app: message.app.clone(),
                payload: message.payload().to_vec(),
                ttl_ms: Some(millis(self.ttl)),
            },
            unix_ms(),
        );
    }

    fn message_finished(&mut self, id: u64, outcome: &MessageOutcome) {
        let (state, reason) = match outcome {
            MessageOutcome::Sent => (MessageState::Sent, None),
            MessageOutcome::Failed(reason) => (MessageState::Failed, Some(reason.clone())),
            _ => (MessageState::Failed, Some("unknown outcome".to_owned())),
        };
        self.batch
            .set_state(OutboundId(id), state, reason, unix_ms());
    }
}

impl Journal {
    fn stage_delivery(&mut self, app: String, queue: QueueRef, message: &ReceivedMessage) {
        // The batch takes its own copy; the store seals it and the batch wipes it (its
        // owner's contract), this one is plain.
        let mut body = Zeroizing::new(Vec::with_capacity(8 + message.body.len()));
        body.extend_from_slice(&message.ts.to_be_bytes());
        body.extend_from_slice(&message.body);
        self.batch.deliver(
            app,
            queue,
            message.msg_id.as_bytes().to_vec(),
            body.to_vec(),
            unix_ms(),
        );
    }
}

/// Crash consistency of the write-ahead rule, on a virtual network: the pool with this journal
/// and a real store, a scripted SMP server that stays up, and "crashes" (drop everything not
/// committed, reopen the store, restore) at random points — before a commit, and between the
/// actions that follow one. Every accepted message must reach the receiving app exactly once
/// and in order.
#[cfg(test)]
mod crash_tests {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};

    use muxd_core::{Action, PoolReply, PoolRequest, RequestToken};
    use muxd_queue_store::{Unlock, create_key_file};
    use muxd_sim::server::FakeServer;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{RngCore, SeedableRng};

    use super::*;

    struct World {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        key: std::path::PathBuf,
        server: FakeServer,
        now: Instant,
        rng: ChaCha20Rng,
        chaos: ChaCha20Rng,
        pool: Option<Pool<Journal>>,
        links: BTreeMap<ServerKey, u64>,
        inbox: VecDeque<(ServerKey, Vec<u8>)>,
        /// Replies the app saw (they leave only after a commit).
        replies: BTreeMap<RequestToken, Result<PoolReply, PoolError>>,
        crashes: usize,
        /// Chance in 1000 of a crash at each crash point.
        crash_rate: u32,
    }

    impl World {
        fn new(seed: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("muxd.redb");
            let key = dir.path().join("muxd.key");
            create_key_file(&key).unwrap();
            drop(Store::create(&path, &Unlock::KeyFile(key.clone())).unwrap());
            let mut w = Self {
                _dir: dir,
                path,
                key,
                server: FakeServer::new(18, seed),
                now: Instant::now(),
                rng: ChaCha20Rng::seed_from_u64(seed),
                chaos: ChaCha20Rng::seed_from_u64(seed ^ 0xc4a5),
                pool: None,
                links: BTreeMap::new(),
                inbox: VecDeque::new(),
                replies: BTreeMap::new(),
                crashes: 0,
                crash_rate: 0,
            };
            w.boot();
            w
        }

        fn pool(&mut self) -> &mut Pool<Journal> {
            self.pool.as_mut().unwrap()
        }

        fn boot(&mut self) {
            let store = Store::open(&self.path, &Unlock::KeyFile(self.key.clone())).unwrap();
            let ttl = Duration::from_secs(7 * 24 * 3600);
            let (mut pool, _) =
                Journal::restore(Arc::new(store), PoolConfig::default(), ttl, self.now).unwrap();
            pool.resume(self.now);
            self.pool = Some(pool);
        }

        /// The process dies: what was not committed is gone, so are its connections.
        fn crash(&mut self) {
            self.crashes += 1;
            self.pool = None;
            for (_, conn) in std::mem::take(&mut self.links) {
                self.server.close(conn);
            }
            self.inbox.clear();
            self.boot();
        }

        fn maybe_crash(&mut self) -> bool {
            if self.chaos.next_u32() % 1000 < self.crash_rate {
                self.crash();
                return true;
            }
            false
        }

        /// The driver's rule: commit, then carry out actions; crash points in between.
        fn run(&mut self) {
            'outer: loop {
                if self.maybe_crash() {
                    continue;
                }
                self.pool().mailbox_mut().commit().unwrap();
                while let Some(action) = self.pool().poll_action() {
                    if self.maybe_crash() {
                        continue 'outer;
                    }
                    self.act(action);
                    if self.pool().mailbox().dirty() {
                        // An action's handling (a connect) staged more: commit first.
                        continue 'outer;
                    }
                }
                let Some((key, block)) = self.inbox.pop_front() else {
                    break;
                };
                if self.links.contains_key(&key) {
                    let (now, mut rng) = (self.now, self.rng.clone());
                    self.pool().handle_block(now, &mut rng, &key, &block);
                    self.rng = rng;
                }
            }
        }

        fn act(&mut self, action: Action) {
            match action {
                Action::Connect { server, .. } => {
                    let (conn, hello, info) = self.server.accept();
                    self.links.insert(server.clone(), conn);
                    let (now, mut rng) = (self.now, self.rng.clone());
                    self.pool().handle_connected(now, &mut rng, &server, info);
                    self.rng = rng;
                    self.inbox.push_back((server, hello));
                }
                Action::Transmit { server, block } => {
                    let Some(&conn) = self.links.get(&server) else {
                        return;
                    };
                    for (c, b) in self.server.handle_block(conn, &block) {
                        if let Some((k, _)) = self.links.iter().find(|(_, x)| **x == c) {
                            self.inbox.push_back((k.clone(), b));
                        }
                    }
                }
                Action::Disconnect { server } => {
                    if let Some(conn) = self.links.remove(&server) {
                        self.server.close(conn);
                    }
                }
                Action::Reply { token, result } => {
                    self.replies.insert(token, result);
                }
                _ => {}
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            let (now, mut rng) = (self.now, self.rng.clone());
            self.pool().handle_timeout(now, &mut rng);
            self.rng = rng;
            self.run();
        }

        fn request(&mut self, app: &str, token: u64, request: PoolRequest) -> RequestToken {
            let token = RequestToken(token);
            let (now, mut rng) = (self.now, self.rng.clone());
            self.pool()
                .handle_request(now, &mut rng, app, token, request);
            self.rng = rng;
            self.run();
            token
        }
    }

    #[test]
    fn every_accepted_message_arrives_once_in_order_across_crashes() {
        let mut dropped_total = 0;
        for seed in 1..=3u64 {
            let mut w = World::new(seed);
            let address = w.server.address();
            let create = PoolRequest::CreateQueue {
                server: address,
                websocket: false,
            };
            let token = w.request("rx", 1, create);
            let (queue_id, uri) = match &w.replies[&token] {
                Ok(PoolReply::QueueCreated(info)) => {
                    (info.queue_id.clone(), info.queue_uri.clone())
                }
                other => panic!("create: {other:?}"),
            };
            w.crash_rate = 40;
            let total = 300u64;
            let mut accepted = BTreeSet::new();
            let mut unknown = BTreeSet::new();
            let mut got: Vec<u64> = Vec::new();
            // msg ids whose ack was not confirmed: the app may see them again.
            let mut unconfirmed: BTreeSet<String> = BTreeSet::new();
            let mut redelivered = 0;
            let mut seen_ids: BTreeMap<String, u64> = BTreeMap::new();
            let mut next = 0u64;
            let mut rounds = 0;
            while (next < total || got.len() < accepted.len()) && rounds < 20_000 {
                rounds += 1;
                if next < total {
                    let crashes = w.crashes;
                    let send = PoolRequest::Send {
                        queue_uri: uri.clone(),
                        body: next.to_be_bytes().to_vec(),
                        wait: false,
                    };
                    let token = w.request("tx", 1000 + next, send);
                    match w.replies.get(&token) {
                        Some(Ok(PoolReply::Queued { .. })) => {
                            accepted.insert(next);
                        }
                        None if w.crashes > crashes => {
                            unknown.insert(next);
                        }
                        other => panic!("send {next}: {other:?}"),
                    }
                    next += 1;
                }
                // The app reads what a commit made visible, then acknowledges.
                w.pool().mailbox_mut().commit().unwrap();
                let waiting = w.pool().messages("rx", &queue_id, None).unwrap();
                for m in waiting {
                    let n = u64::from_be_bytes(m.body.as_slice().try_into().unwrap());
                    match seen_ids.get(&m.msg_id) {
                        Some(&k) => {
                            assert_eq!(k, n, "one msg id, two bodies");
                            assert!(
                                unconfirmed.contains(&m.msg_id),
                                "seed {seed}: {n} came back after its ack was confirmed"
                            );
                            redelivered += 1;
                        }
                        None => {
                            assert!(!got.contains(&n), "seed {seed}: {n} delivered twice");
                            if let Some(&last) = got.last() {
                                assert!(n > last, "seed {seed}: {n} after {last}");
                            }
                            got.push(n);
                            seen_ids.insert(m.msg_id.clone(), n);
                        }
                    }
                    let crashes = w.crashes;
                    w.pool().ack("rx", &queue_id, &m.msg_id).unwrap();
                    unconfirmed.insert(m.msg_id.clone());
                    w.run();
                    if w.crashes == crashes {
                        // The ack's commit happened (run commits before anything else).
                        unconfirmed.remove(&m.msg_id);
                    }
                }
                w.advance(Duration::from_millis(200));
            }
            w.crash_rate = 0;
            for _ in 0..600 {
                w.advance(Duration::from_secs(1));
                w.pool().mailbox_mut().commit().unwrap();
                let waiting = w.pool().messages("rx", &queue_id, None).unwrap();
                for m in waiting {
                    let n = u64::from_be_bytes(m.body.as_slice().try_into().unwrap());
                    if !seen_ids.contains_key(&m.msg_id) {
                        assert!(!got.contains(&n), "seed {seed}: {n} delivered twice");
                        got.push(n);
                        seen_ids.insert(m.msg_id.clone(), n);
                    }
                    w.pool().ack("rx", &queue_id, &m.msg_id).unwrap();
                    w.run();
                }
            }
            let delivered: BTreeSet<u64> = got.iter().copied().collect();
            assert!(
                accepted.is_subset(&delivered),
                "seed {seed}: lost {:?}",
                accepted.difference(&delivered).collect::<Vec<_>>()
            );
            assert!(delivered.is_subset(&accepted.union(&unknown).copied().collect()));
            assert!(w.crashes >= 20, "seed {seed}: only {} crashes", w.crashes);
            // The dedup's count is journaled with what it dropped: a restart keeps it.
            w.pool().mailbox_mut().commit().unwrap();
            let dropped = w.pool().duplicates_suppressed();
            w.crash();
            assert_eq!(w.pool().duplicates_suppressed(), dropped, "seed {seed}");
            dropped_total += dropped;
            eprintln!(
                "seed {seed}: {} crashes, {} accepted, {} unknown, {} delivered, {} redelivered, \
                 {dropped} copies dropped",
                w.crashes,
                accepted.len(),
                unknown.len(),
                got.len(),
                redelivered
            );
        }
        // Crashes between a send and its commit make senders resend: copies must have come.
        assert!(dropped_total > 0, "no copy was dropped in any seed");
    }
}
