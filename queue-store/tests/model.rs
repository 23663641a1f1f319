//! Model-based property test: random operation sequences applied to the real store and to the
//! in-memory reference model must give identical results, and the store must keep its
//! invariants (FIFO per queue, nothing lost, no duplicates) across close and reopen.
//!
//! Some steps are whole [`Batch`]es of random operations (outbound, inbound and small state);
//! a batch the model refuses must fail to commit and leave the store exactly as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use muxd_queue_store::model::MemOutbound;
use muxd_queue_store::{
    Batch, MessageState, NewOutbound, OutboundId, Passphrase, QueueRef, Store, StoreError, Unlock,
};
use proptest::prelude::*;

const SERVERS: [&str; 2] = ["smp://a", "smp://b"];
const QUEUES: usize = 3;

fn queue(i: usize) -> QueueRef {
    QueueRef::new(SERVERS[i % 2], vec![b'q', i as u8])
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        q: usize,
        len: usize,
        ttl: Option<u64>,
    },
    Lease {
        q: usize,
        max: usize,
    },
    Ack {
        pick: usize,
    },
    Requeue {
        pick: usize,
        delay: u64,
    },
    Quota {
        pick: usize,
        delay: u64,
    },
    Expire,
    Advance {
        ms: u64,
    },
    Reopen,
    Prune,
    Batch(Vec<BatchOp>),
}

/// One operation inside a [`Batch`].
#[derive(Debug, Clone)]
enum BatchOp {
    /// Enqueue under `next + gap`, or under an id already used when `stale` (fails the batch).
    Enqueue {
        q: usize,
        len: usize,
        gap: u64,
        stale: bool,
    },
    SetState {
        pick: usize,
        state: usize,
        reason: Option<&'static str>,
    },
    Deliver {
        q: usize,
        app: usize,
        msg: u8,
    },
    AckInbound {
        q: usize,
        app: usize,
        msg: u8,
    },
    ForgetInbound {
        q: usize,
    },
    PutState {
        key: u8,
        value: u8,
    },
    DeleteState {
        key: u8,
    },
}

const STATES: [MessageState; 4] = [
    MessageState::Queued,
    MessageState::Sending,
    MessageState::Sent,
    MessageState::Failed,
];

fn batch_op() -> impl Strategy<Value = BatchOp> {
    prop_oneof![
        4 => (0..QUEUES, 0..20usize, prop_oneof![4 => Just(0u64), 1 => 1..4u64], prop::bool::weighted(0.04))
            .prop_map(|(q, len, gap, stale)| BatchOp::Enqueue { q, len, gap, stale }),
        4 => (any::<usize>(), 0..STATES.len(), prop::option::of(prop_oneof![Just("timeout"), Just("")]))
            .prop_map(|(pick, state, reason)| BatchOp::SetState { pick, state, reason }),
        3 => (0..QUEUES, 0..2usize, 0..6u8).prop_map(|(q, app, msg)| BatchOp::Deliver { q, app, msg }),
        2 => (0..QUEUES, 0..2usize, 0..6u8).prop_map(|(q, app, msg)| BatchOp::AckInbound { q, app, msg }),
        1 => (0..QUEUES).prop_map(|q| BatchOp::ForgetInbound { q }),
        2 => (0..4u8, any::<u8>()).prop_map(|(key, value)| BatchOp::PutState { key, value }),
        1 => (0..4u8).prop_map(|key| BatchOp::DeleteState { key }),
    ]
}

fn inbound_queue(i: usize) -> QueueRef {
    QueueRef::new(SERVERS[i % 2], vec![b'r', i as u8])
}

fn state_key(k: u8) -> Vec<u8> {
    // Two prefixes, so that the prefix scan has something to exclude.
    if k.is_multiple_of(2) {
        vec![b's', b'/', k]
    } else {
        vec![b't', b'/', k]
    }
}

/// The reference for everything a batch does besides the outbound queue.
#[derive(Debug, Clone, Default)]
struct MemRest {
    /// `(queue, msg id)` ever delivered and not forgotten (the dedup window is never reached).
    seen: BTreeSet<(usize, u8)>,
    /// Waiting messages in arrival order: (app, queue, msg id, body, received at).
    pending: Vec<(String, usize, u8, Vec<u8>, u64)>,
    states: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..QUEUES, 0..40usize, prop::option::of(1..5_000u64))
            .prop_map(|(q, len, ttl)| Op::Enqueue { q, len, ttl }),
        3 => (0..QUEUES, 0..4usize).prop_map(|(q, max)| Op::Lease { q, max }),
        3 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        2 => (any::<usize>(), 0..3_000u64).prop_map(|(pick, delay)| Op::Requeue { pick, delay }),
        1 => (any::<usize>(), 0..3_000u64).prop_map(|(pick, delay)| Op::Quota { pick, delay }),
        1 => Just(Op::Expire),
        2 => (0..2_000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Prune),
        3 => prop::collection::vec(batch_op(), 0..8).prop_map(Op::Batch),
    ]
}

fn unlock() -> Unlock {
    Unlock::Passphrase(Passphrase::new("model".into()))
}

/// Errors are compared by kind, since `StoreError` is not `PartialEq`.
fn kind(r: &Result<(), StoreError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(StoreError::UnknownMessage(id)) => format!("unknown {id}"),
        Err(StoreError::InvalidTransition { id, state, action }) => {
            format!("invalid {id} {state:?} {action}")
        }
        Err(e) => panic!("unexpected store error: {e}"),
    }
}

struct Harness {
    store: Option<Store>,
    model: MemOutbound,
    rest: MemRest,
    path: std::path::PathBuf,
    now: u64,
    /// Ids ever handed out, to pick targets for ack/requeue (including stale ones).
    ids: Vec<OutboundId>,
    /// Order in which each queue's messages were first leased.
    first_leases: BTreeMap<usize, Vec<OutboundId>>,
    leased_once: BTreeSet<OutboundId>,
}

impl Harness {
    fn new(dir: &Path) -> Self {
        let path = dir.join("store.redb");
        let store = Store::create(&path, &unlock()).unwrap();
        Self {
            store: Some(store),
            model: MemOutbound::new(),
            rest: MemRest::default(),
            path,
            now: 1_000_000,
            ids: Vec::new(),
            first_leases: BTreeMap::new(),
            leased_once: BTreeSet::new(),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn pick(&self, pick: usize) -> Option<OutboundId> {
        (!self.ids.is_empty()).then(|| self.ids[pick % self.ids.len()])
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Enqueue { q, len, ttl } => {
                let msg = NewOutbound {
                    queue: queue(q),
                    app: format!("app{}", q % 2),
                    payload: (0..len)
                        .map(|i| (i as u8) ^ (self.ids.len() as u8))
                        .collect(),
                    ttl_ms: ttl,
                };
                let got = self.store().enqueue(&msg, self.now).unwrap();
                let want = self.model.enqueue(&msg, self.now);
                assert_eq!(got, want);
                self.ids.push(got);
            }
            Op::Lease { q, max } => {
                let got = self.store().lease(&queue(q), max, self.now).unwrap();
                let want = self.model.lease(&queue(q), max, self.now);
                assert_eq!(got, want);
                for l in &got {
                    if self.leased_once.insert(l.id) {
                        self.first_leases.entry(q).or_default().push(l.id);
                    }
                }
            }
            Op::Ack { pick } => {
                if let Some(id) = self.pick(pick) {
                    let got = self.store().ack_sent(id, self.now);
                    let want = self.model.ack_sent(id, self.now);
                    assert_eq!(kind(&got), kind(&want));
                }
            }
            Op::Requeue { pick, delay } => {
                if let Some(id) = self.pick(pick) {
                    let got = self.store().requeue(id, self.now + delay, "timeout");
                    let want = self.model.requeue(id, self.now + delay, "timeout");
                    assert_eq!(kind(&got), kind(&want));
                }
            }
            Op::Quota { pick, delay } => {
                if let Some(id) = self.pick(pick) {
                    let got = self.store().mark_quota(id, self.now + delay);
                    let want = self.model.mark_quota(id, self.now + delay);
                    assert_eq!(kind(&got), kind(&want));
                }
            }
            Op::Expire => {
                let got = self.store().expire(self.now).unwrap();
                let want = self.model.expire(self.now);
                assert_eq!(got, want);
            }
            Op::Advance { ms } => self.now += ms,
            Op::Reopen => {
                drop(self.store.take());
                self.store = Some(Store::open(&self.path, &unlock()).unwrap());
                self.model.restart();
            }
            Op::Prune => {
                let got = self
                    .store()
                    .prune_finished(self.now.saturating_sub(1_000))
                    .unwrap();
                let want = self.model.prune_finished(self.now.saturating_sub(1_000));
                assert_eq!(got, want);
            }
            Op::Batch(ref ops) => self.apply_batch(ops),
        }
    }

    /// Builds the batch and applies it to copies of the models; commits it; keeps the copies
    /// only if the models accepted every op, and checks the store agreed.
    fn apply_batch(&mut self, ops: &[BatchOp]) {
        let mut batch = Batch::new();
        let mut model = self.model.clone();
        let mut rest = self.rest.clone();
        let mut new_ids = Vec::new();
        // Messages the batch sends without a lease (the pool leases in memory).
        let mut sent_directly = Vec::new();
        let mut refused = false;
        let now = self.now;
        for op in ops {
            match *op {
                BatchOp::Enqueue { q, len, gap, stale } => {
                    let next = model.next_outbound_id().0;
                    let id = OutboundId(if stale { next - 1 } else { next + gap });
                    let msg = NewOutbound {
                        queue: queue(q),
                        app: format!("app{}", q % 2),
                        payload: (0..len).map(|i| (i as u8) ^ (id.0 as u8)).collect(),
                        ttl_ms: None,
                    };
                    match model.enqueue_with_id(id, &msg, now) {
                        Ok(()) => new_ids.push(id),
                        Err(StoreError::InvalidInput(_)) => refused = true,
                        Err(e) => panic!("model: {e}"),
                    }
                    batch.enqueue(id, msg, now);
                }
                BatchOp::SetState {
                    pick,
                    state,
                    reason,
                } => {
                    // Also ids enqueued earlier in this batch, and one never used.
                    let known: Vec<_> = self.ids.iter().chain(&new_ids).copied().collect();
                    let id = known
                        .get(pick % (known.len() + 1))
                        .copied()
                        .unwrap_or(OutboundId(u64::MAX - 1));
                    if matches!(STATES[state], MessageState::Sending | MessageState::Sent) {
                        sent_directly.push(id);
                    }
                    model.set_state(id, STATES[state], reason, now);
                    batch.set_state(id, STATES[state], reason.map(str::to_owned), now);
                }
                BatchOp::Deliver { q, app, msg } => {
                    let app = format!("app{app}");
                    let body = vec![msg, q as u8, (now % 251) as u8];
                    if rest.seen.insert((q, msg)) {
                        rest.pending.push((app.clone(), q, msg, body.clone(), now));
                    }
                    batch.deliver(app, inbound_queue(q), vec![msg], body, now);
                }
                BatchOp::AckInbound { q, app, msg } => {
                    let app = format!("app{app}");
                    rest.pending
                        .retain(|p| !(p.0 == app && p.1 == q && p.2 == msg));
                    batch.ack_inbound(app, inbound_queue(q), vec![msg]);
                }
                BatchOp::ForgetInbound { q } => {
                    rest.seen.retain(|&(sq, _)| sq != q);
                    rest.pending.retain(|p| p.1 != q);
                    batch.forget_inbound(inbound_queue(q));
                }
                BatchOp::PutState { key, value } => {
                    rest.states
                        .insert(state_key(key), vec![value; key as usize]);
                    batch.put_state(state_key(key), vec![value; key as usize]);
                }
                BatchOp::DeleteState { key } => {
                    rest.states.remove(&state_key(key));
                    batch.delete_state(state_key(key));
                }
            }
        }
        assert_eq!(batch.len(), ops.len());
        let commits = self.store().commit_count();
        let got = self.store().commit(batch);
        let committed = u64::from(!ops.is_empty() && !refused);
        if refused {
            assert!(
                matches!(got, Err(StoreError::InvalidInput(_))),
                "a batch with a stale id committed: {got:?}"
            );
        } else {
            got.unwrap();
            self.model = model;
            self.rest = rest;
            self.ids.extend(new_ids);
            self.leased_once.extend(sent_directly);
        }
        assert_eq!(self.store().commit_count(), commits + committed);
    }

    fn check_invariants(&self) {
        // Every state agrees with the model, so nothing was lost or invented.
        for &id in &self.ids {
            assert_eq!(
                self.store().state(id).unwrap(),
                self.model.state(id),
                "state of {id}"
            );
        }
        for server in SERVERS {
            assert_eq!(
                self.store().pending_count(server).unwrap(),
                self.model.pending_count(server)
            );
        }
        assert_eq!(self.store().queues().unwrap(), self.model.queues());
        assert_eq!(self.store().unfinished().unwrap(), self.model.unfinished());
        assert_eq!(
            self.store().next_outbound_id().unwrap(),
            self.model.next_outbound_id()
        );
        let pending = self.store().all_pending().unwrap();
        assert!(pending.windows(2).all(|w| w[0].1.seq < w[1].1.seq));
        let got: Vec<_> = pending
            .into_iter()
            .map(|(app, m)| (app, m.queue, m.msg_id, m.body, m.received_at))
            .collect();
        let want: Vec<_> = self
            .rest
            .pending
            .iter()
            .map(|(app, q, msg, body, at)| {
                (
                    app.clone(),
                    inbound_queue(*q),
                    vec![*msg],
                    body.clone(),
                    *at,
                )
            })
            .collect();
        assert_eq!(got, want);
        let want: Vec<_> = self
            .rest
            .states
            .iter()
            .filter(|(k, _)| k.starts_with(b"s/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(self.store().states(b"s/").unwrap(), want);
        // FIFO per queue: first leases happen in enqueue (id) order, without duplicates.
        for ids in self.first_leases.values() {
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "first leases out of order: {ids:?}"
            );
        }
        // A message can only have been sent after it was leased.
        for &id in &self.ids {
            if self
                .model
                .state(id)
                .is_some_and(|s| s.state == MessageState::Sent)
            {
                assert!(self.leased_once.contains(&id));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(dir.path());
        for op in &ops {
            h.apply(op);
            h.check_invariants();
        }
        // Drain: everything not expired is eventually sent exactly once, in FIFO order.
        h.apply(&Op::Reopen);
        h.now += 10_000_000;
        let mut sent = BTreeSet::new();
        for q in 0..QUEUES {
            let mut last = None;
            loop {
                let got = h.store().lease(&queue(q), 2, h.now).unwrap();
                let want = h.model.lease(&queue(q), 2, h.now);
                prop_assert_eq!(&got, &want);
                if got.is_empty() {
                    break;
                }
                for l in got {
                    prop_assert!(last < Some(l.id), "drain out of order");
                    last = Some(l.id);
                    prop_assert!(sent.insert(l.id), "duplicate lease in drain");
                    h.leased_once.insert(l.id);
                    h.store().ack_sent(l.id, h.now).unwrap();
                    h.model.ack_sent(l.id, h.now).unwrap();
                }
            }
        }
        h.check_invariants();
        for s in SERVERS {
            prop_assert_eq!(h.store().pending_count(s).unwrap(), 0);
        }
    }
}
