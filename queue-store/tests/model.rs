//! Model-based property test: random operation sequences applied to the real store and to the
//! in-memory reference model must give identical results, and the store must keep its
//! invariants (FIFO per queue, nothing lost, no duplicates) across close and reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use muxd_queue_store::model::MemOutbound;
use muxd_queue_store::{
    MessageState, NewOutbound, OutboundId, Passphrase, QueueRef, Store, StoreError, Unlock,
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
        }
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
