//! Group commit: concurrent enqueues share one durable commit.
//!
//! A durable commit costs an fsync, which dominates the cost of an enqueue. Callers that arrive
//! while a commit is running queue up; when it finishes, one of them becomes the *leader*, takes
//! everything queued so far, writes it in one transaction and wakes the rest. Under load a batch
//! therefore holds everything that arrived during the previous fsync, and the throughput grows
//! with the number of concurrent senders instead of being capped at one fsync per message.
//!
//! Every caller still returns only after the commit that holds its message.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::outbound::{NewOutbound, OutboundId};
use crate::{Store, StoreError};

/// Batches concurrent [`Store::enqueue`] calls from many threads into shared commits.
pub struct GroupCommitter {
    store: Arc<Store>,
    state: Mutex<State>,
    done: Condvar,
    batches: AtomicU64,
}

#[derive(Default)]
struct State {
    next_ticket: u64,
    waiting: Vec<(u64, NewOutbound, u64)>,
    results: BTreeMap<u64, Result<OutboundId, StoreError>>,
    leader_active: bool,
}

impl GroupCommitter {
    /// Wraps a store. Other handles to the same store may keep using it directly.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            batches: AtomicU64::new(0),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// How many commits this committer has made (each holding one or more messages).
    pub fn batch_count(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Enqueues `msg` durably, sharing the commit with concurrent callers; blocks until the
    /// commit holding it is on disk.
    pub fn enqueue(&self, msg: NewOutbound, now: u64) -> Result<OutboundId, StoreError> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push((ticket, msg, now));
        loop {
            if let Some(result) = state.results.remove(&ticket) {
                return result;
            }
            if state.leader_active {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // Become the leader for everything queued so far (which includes our own ticket,
            // since results are only ever published by a leader that took it).
            state.leader_active = true;
            let batch = std::mem::take(&mut state.waiting);
            drop(state);
            // A panic in the leader must not leave the followers waiting for a leader that
            // is gone, so it is turned into an error for the whole batch.
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.store.write(|txn| {
                    self.store
                        .enqueue_in(txn, batch.iter().map(|(_, msg, now)| (msg, *now)))
                })
            }))
            .unwrap_or_else(|_| Err(StoreError::GroupCommit("commit panicked".to_owned())));
            self.batches.fetch_add(1, Ordering::Relaxed);
            state = self.lock();
            match result {
                Ok(ids) => {
                    for ((ticket, _, _), id) in batch.iter().zip(ids) {
                        state.results.insert(*ticket, Ok(id));
                    }
                }
                Err(e) => {
                    // The error itself is not Clone (it may hold an io::Error), so each
                    // caller gets its rendering.
                    let text = e.to_string();
                    for (ticket, _, _) in &batch {
                        state
                            .results
                            .insert(*ticket, Err(StoreError::GroupCommit(text.clone())));
                    }
                }
            }
            state.leader_active = false;
            self.done.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every mutation is a
        // single push/insert/remove), so poisoning is ignored rather than propagated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fmt::Debug for GroupCommitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupCommitter")
            .field("store", &self.store)
            .field("batches", &self.batch_count())
            .finish_non_exhaustive()
    }
}
