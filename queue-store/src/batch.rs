//! Write batches: every durable change the pool staged since its last commit, applied in one
//! transaction.
//!
//! The daemon's driver stages queue records, outbound enqueues and state changes, inbound
//! deliveries and acks, and small state into one [`Batch`], and calls [`Store::commit`] once
//! before it carries out any effect another party can see (a reply to an app, a block to a
//! server). That is write-ahead logging with natural group commit: one fsync covers everything
//! that happened in one turn of the loop, however many operations that was.

use std::fmt;

use tracing::trace;

use crate::outbound::{EnqueueTables, MessageState, NewOutbound, OutboundId};
use crate::records::{QueueRecord, delete_record_in};
use crate::{QueueRef, Store, StoreError, mailbox, state};

/// Writes staged for one durable commit ([`Store::commit`]), applied in the order staged.
///
/// Holds no database handle, so it can be built anywhere and sent to the thread that owns the
/// store. `Debug` shows how many operations of each kind it holds, never payloads, bodies or
/// secrets.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

/// One staged operation.
enum Op {
    PutRecord(QueueRecord),
    DeleteRecord(QueueRef),
    Enqueue {
        id: OutboundId,
        msg: NewOutbound,
        now: u64,
    },
    SetState {
        id: OutboundId,
        state: MessageState,
        reason: Option<String>,
        now: u64,
    },
    Deliver {
        app: String,
        queue: QueueRef,
        msg_id: Vec<u8>,
        body: Vec<u8>,
        now: u64,
    },
    AckInbound {
        app: String,
        queue: QueueRef,
        msg_id: Vec<u8>,
    },
    ForgetInbound(QueueRef),
    PutState {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteState(Vec<u8>),
}

/// Names of the operation kinds, indexed by [`Op::kind`], for `Debug`.
const KINDS: [&str; 9] = [
    "put_record",
    "delete_record",
    "enqueue",
    "set_state",
    "deliver",
    "ack_inbound",
    "forget_inbound",
    "put_state",
    "delete_state",
];

impl Op {
    fn kind(&self) -> usize {
        match self {
            Self::PutRecord(_) => 0,
            Self::DeleteRecord(_) => 1,
            Self::Enqueue { .. } => 2,
            Self::SetState { .. } => 3,
            Self::Deliver { .. } => 4,
            Self::AckInbound { .. } => 5,
            Self::ForgetInbound(_) => 6,
            Self::PutState { .. } => 7,
            Self::DeleteState(_) => 8,
        }
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing is staged; committing an empty batch costs nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// How many operations are staged.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Inserts or replaces a queue record, like [`Store::put_record`].
    pub fn put_record(&mut self, record: QueueRecord) {
        self.ops.push(Op::PutRecord(record));
    }

    /// Deletes a queue record, like [`Store::delete_record`]; deleting a missing one is a no-op.
    pub fn delete_record(&mut self, queue: QueueRef) {
        self.ops.push(Op::DeleteRecord(queue));
    }

    /// Enqueues an outbound message under a caller-chosen id (`now` is unix ms). Ids must be
    /// unique and at least the store's next id ([`Store::next_outbound_id`]); the store's
    /// counter becomes `max(counter, id + 1)`. An id below the counter at its turn in the batch
    /// (already present, or used and pruned) fails the commit with
    /// [`StoreError::InvalidInput`], as does `u64::MAX`.
    pub fn enqueue(&mut self, id: OutboundId, msg: NewOutbound, now: u64) {
        self.ops.push(Op::Enqueue { id, msg, now });
    }

    /// Sets an outbound message's state:
    ///
    /// - [`MessageState::Queued`]: ready to send at once (`not_before` 0); `reason`, if given,
    ///   becomes its `last_error` (otherwise the previous one is kept).
    /// - [`MessageState::Sending`]: one more attempt (`attempts += 1`).
    /// - [`MessageState::Sent`] or [`MessageState::Failed`]: final. The payload is deleted and
    ///   the message leaves the FIFO and expiry indexes; its status stays for [`Store::state`]
    ///   until [`Store::prune_finished`]. `Failed` records `reason` as `last_error`.
    ///
    /// Unknown ids and changes out of a final state are ignored (logged at debug level), never
    /// an error: a commit must not fail because a message finished twice.
    pub fn set_state(
        &mut self,
        id: OutboundId,
        state: MessageState,
        reason: Option<String>,
        now: u64,
    ) {
        self.ops.push(Op::SetState {
            id,
            state,
            reason,
            now,
        });
    }

    /// Stores a message received on `queue` for `app`, like [`Store::deliver`], unless this
    /// `(queue, msg_id)` is known, from an earlier commit or earlier in this batch (then it is
    /// a no-op).
    pub fn deliver(
        &mut self,
        app: String,
        queue: QueueRef,
        msg_id: Vec<u8>,
        body: Vec<u8>,
        now: u64,
    ) {
        self.ops.push(Op::Deliver {
            app,
            queue,
            msg_id,
            body,
            now,
        });
    }

    /// Records `app`'s acknowledgement of an inbound message, like [`Store::ack`]; a message
    /// that is not waiting for this app is a no-op.
    pub fn ack_inbound(&mut self, app: String, queue: QueueRef, msg_id: Vec<u8>) {
        self.ops.push(Op::AckInbound { app, queue, msg_id });
    }

    /// Forgets a deleted queue's inbound side: its waiting messages (for any app) and its
    /// dedup entries.
    pub fn forget_inbound(&mut self, queue: QueueRef) {
        self.ops.push(Op::ForgetInbound(queue));
    }

    /// Inserts or replaces a small opaque state entry (e.g. `seqwin/<queue id>`). Stored
    /// **unsealed**: for counters and windows, never for secrets. Read back with
    /// [`Store::states`].
    pub fn put_state(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::PutState { key, value });
    }

    /// Removes a state entry; removing a missing one is a no-op.
    pub fn delete_state(&mut self, key: Vec<u8>) {
        self.ops.push(Op::DeleteState(key));
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts = [0usize; KINDS.len()];
        for op in &self.ops {
            counts[op.kind()] += 1;
        }
        let mut s = f.debug_struct("Batch");
        s.field("ops", &self.ops.len());
        for (name, n) in KINDS.iter().zip(counts) {
            if n > 0 {
                s.field(name, &n);
            }
        }
        s.finish()
    }
}

// The driver builds batches on its own thread and hands them to the store's.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Batch>();
};

impl Store {
    /// Applies every operation of `batch`, in order, in one durable write transaction (fsync
    /// before returning). An empty batch is a no-op without a transaction. On error nothing of
    /// the batch is applied.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        trace!(?batch, "committing batch");
        self.write(|txn| {
            for op in &batch.ops {
                match op {
                    Op::PutRecord(record) => self.put_record_in(txn, record)?,
                    Op::DeleteRecord(queue) => {
                        delete_record_in(txn, queue)?;
                    }
                    Op::Enqueue { id, msg, now } => {
                        let mut tables = EnqueueTables::open(txn)?;
                        self.enqueue_one(&mut tables, Some(*id), msg, *now)?;
                    }
                    Op::SetState {
                        id,
                        state,
                        reason,
                        now,
                    } => self.set_state_in(txn, *id, *state, reason.as_deref(), *now)?,
                    Op::Deliver {
                        app,
                        queue,
                        msg_id,
                        body,
                        now,
                    } => {
                        self.deliver_in(txn, app, queue, msg_id, body, *now)?;
                    }
                    Op::AckInbound { app, queue, msg_id } => {
                        self.ack_in(txn, app, queue, msg_id)?;
                    }
                    Op::ForgetInbound(queue) => mailbox::forget_inbound_in(txn, queue)?,
                    Op::PutState { key, value } => state::put_state_in(txn, key, value)?,
                    Op::DeleteState(key) => state::delete_state_in(txn, key)?,
                }
            }
            Ok(())
        })
    }
}
