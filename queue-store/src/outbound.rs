//! The outbound queue: messages apps handed to the daemon, kept until a server accepts them.
//!
//! Life of a message: [`MessageState::Queued`] → (lease) → [`MessageState::Sending`] → either
//! [`MessageState::Sent`] on the server's OK, or back to `Queued` with a `not_before` chosen by
//! the pool's retry policy. A queued message whose expiry passes becomes
//! [`MessageState::Failed`]. Finished messages keep a small status row (no payload) so the app
//! can still ask about them, until [`Store::prune_finished`] removes it.
//!
//! Ordering: leases hand out each queue's messages in enqueue order. A queued message that is
//! not yet due (waiting for a retry) blocks the messages behind it, so a retry cannot be
//! overtaken by a later message that happens to be ready. Messages already in flight are
//! skipped, which allows pipelining when the pool leases more than one at a time.

use std::collections::BTreeMap;
use std::fmt;

use redb::{ReadableTable, Table, WriteTransaction};
use tracing::debug;

use crate::codec::{Reader, Writer, queue_key, server_prefix, split_queue_key};
use crate::error::{DbResultExt, StoreError};
use crate::schema::{META, NEXT_OUTBOUND_KEY, OUT_EXPIRY, OUT_FIFO, OUT_HOLD, OUT_MSGS};
use crate::{QueueRef, Store, schema};

/// Messages expire after seven days unless the caller says otherwise, as the SimpleX agent's
/// default message TTL does.
pub const DEFAULT_EXPIRY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

const RECORD_VERSION: u8 = 1;
const PAYLOAD_AAD: &[u8] = b"outbound_messages/";

/// The id of an outbound message; ids increase with enqueue order (whether the store or the
/// caller picks them, see [`crate::Batch::enqueue`]) and are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutboundId(pub u64);

impl fmt::Display for OutboundId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A message to enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutbound {
    /// The queue it is sent to.
    pub queue: QueueRef,
    /// The app that sent it, which gets its `sent`/`failed` events.
    pub app: String,
    /// The opaque payload; sealed at rest.
    pub payload: Vec<u8>,
    /// Time to live from enqueue; `None` means [`DEFAULT_EXPIRY_MS`].
    pub ttl_ms: Option<u64>,
}

/// Where a message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageState {
    /// Waiting to be leased (possibly not before some time).
    Queued,
    /// Leased to a connection; the server has not answered yet.
    Sending,
    /// The server accepted it.
    Sent,
    /// It expired before a server accepted it.
    Failed,
}

impl MessageState {
    fn to_byte(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Sending => 1,
            Self::Sent => 2,
            Self::Failed => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Queued,
            1 => Self::Sending,
            2 => Self::Sent,
            3 => Self::Failed,
            _ => return None,
        })
    }
}

/// What the app can learn about one of its messages.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessageStatus {
    /// The current state.
    pub state: MessageState,
    /// How many times it has been leased.
    pub attempts: u32,
    /// Unix ms before which it will not be leased (0: any time).
    pub not_before: u64,
    /// Unix ms at which it fails if still queued.
    pub expires_at: u64,
    /// The reason given with the last retry, if any.
    pub last_error: Option<String>,
    /// The owning app.
    pub app: String,
    /// The destination queue.
    pub queue: QueueRef,
}

/// A message handed to a connection for sending.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leased {
    /// Its id, for [`Store::ack_sent`] / [`Store::requeue`].
    pub id: OutboundId,
    /// The destination queue.
    pub queue: QueueRef,
    /// The owning app.
    pub app: String,
    /// The payload, decrypted.
    pub payload: Vec<u8>,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// Unix ms at which it fails if not sent.
    pub expires_at: u64,
}

/// A message that expired; the daemon tells its app with a `failed` event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Expired {
    /// The message.
    pub id: OutboundId,
    /// Its destination.
    pub queue: QueueRef,
    /// The app to notify.
    pub app: String,
    /// The reason given with its last retry, if any.
    pub last_error: Option<String>,
}

/// The pending work of one queue, for the pool to plan leases after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSummary {
    /// The queue.
    pub queue: QueueRef,
    /// Messages waiting to be leased.
    pub queued: u64,
    /// Messages leased and not yet answered.
    pub in_flight: u64,
    /// Unix ms at which [`Store::lease`] will next return a message, if any is queued.
    pub ready_at: Option<u64>,
}

/// A message not yet sent or failed, as [`Store::unfinished`] returns it to rebuild the pool.
/// `Debug` shows the payload's length, not its bytes.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unfinished {
    /// Its id.
    pub id: OutboundId,
    /// The destination queue.
    pub queue: QueueRef,
    /// The owning app.
    pub app: String,
    /// The payload, decrypted.
    pub payload: Vec<u8>,
    /// [`MessageState::Queued`] or [`MessageState::Sending`].
    pub state: MessageState,
    /// How many times it has been sent (leased or set to `Sending`).
    pub attempts: u32,
    /// Unix ms before which it should not be sent (0: any time); set only by
    /// [`Store::requeue`] and [`Store::mark_quota`].
    pub not_before: u64,
    /// Unix ms at which it fails if still queued.
    pub expires_at: u64,
    /// The reason given with the last retry, if any.
    pub last_error: Option<String>,
}

impl fmt::Debug for Unfinished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unfinished")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .field("app", &self.app)
            .field("payload_len", &self.payload.len())
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("last_error", &self.last_error)
            .finish()
    }
}

/// The stored form of a message.
#[derive(Debug)]
struct Record {
    state: MessageState,
    attempts: u32,
    not_before: u64,
    expires_at: u64,
    finished_at: u64,
    app: String,
    queue: QueueRef,
    last_error: String,
    /// Sealed payload; empty once the message is finished.
    sealed: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        Ok(Writer::new()
            .u8(RECORD_VERSION)
            .u8(self.state.to_byte())
            .u32(self.attempts)
            .u64(self.not_before)
            .u64(self.expires_at)
            .u64(self.finished_at)
            .bytes(self.app.as_bytes())?
            .bytes(&queue_key(&self.queue)?)?
            .bytes(self.last_error.as_bytes())?
            .bytes(&self.sealed)?
            .finish())
    }

    fn decode(buf: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader::new(buf, "outbound message");
        if r.u8()? != RECORD_VERSION {
            return Err(r.corrupt("unknown record version"));
        }
        let state = MessageState::from_byte(r.u8()?).ok_or_else(|| r.corrupt("bad state"))?;
        let attempts = r.u32()?;
        let not_before = r.u64()?;
        let expires_at = r.u64()?;
        let finished_at = r.u64()?;
        let app = r.string()?;
        let (queue, rest) = split_queue_key(r.bytes()?, "outbound message")?;
        if !rest.is_empty() {
            return Err(r.corrupt("trailing bytes in queue key"));
        }
        let last_error = r.string()?;
        let sealed = r.bytes()?.to_vec();
        r.finish()?;
        Ok(Self {
            state,
            attempts,
            not_before,
            expires_at,
            finished_at,
            app,
            queue,
            last_error,
            sealed,
        })
    }

    fn status(&self) -> MessageStatus {
        MessageStatus {
            state: self.state,
            attempts: self.attempts,
            not_before: self.not_before,
            expires_at: self.expires_at,
            last_error: (!self.last_error.is_empty()).then(|| self.last_error.clone()),
            app: self.app.clone(),
            queue: self.queue.clone(),
        }
    }
}

fn id_key(id: OutboundId) -> [u8; 8] {
    id.0.to_be_bytes()
}

fn fifo_key(qkey: &[u8], id: OutboundId) -> Vec<u8> {
    [qkey, &id.0.to_be_bytes()].concat()
}

fn expiry_key(expires_at: u64, id: OutboundId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&expires_at.to_be_bytes());
    k[8..].copy_from_slice(&id.0.to_be_bytes());
    k
}

fn payload_aad(id: OutboundId) -> Vec<u8> {
    [PAYLOAD_AAD, &id.0.to_be_bytes()].concat()
}

fn load(
    msgs: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: OutboundId,
) -> Result<Record, StoreError> {
    let raw = msgs.get(id_key(id).as_slice()).db()?;
    let raw = raw.ok_or(StoreError::UnknownMessage(id))?;
    Record::decode(raw.value())
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::CorruptRecord {
            what: "outbound hold",
            detail: "not 8 bytes".to_owned(),
        })
}

fn decode_id(bytes: &[u8]) -> Result<OutboundId, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(|b| OutboundId(u64::from_be_bytes(b)))
        .map_err(|_| StoreError::CorruptRecord {
            what: "outbound index",
            detail: "bad id".to_owned(),
        })
}

/// The tables an enqueue writes, opened once for a run of enqueues (a group commit holds
/// dozens; reopening per message would cost a table lookup and write-back each time).
pub(crate) struct EnqueueTables<'txn> {
    meta: Table<'txn, &'static [u8], &'static [u8]>,
    msgs: Table<'txn, &'static [u8], &'static [u8]>,
    fifo: Table<'txn, &'static [u8], &'static [u8]>,
    expiry: Table<'txn, &'static [u8], &'static [u8]>,
}

impl<'txn> EnqueueTables<'txn> {
    /// Opens the four tables in `txn`.
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            meta: txn.open_table(META).db()?,
            msgs: txn.open_table(OUT_MSGS).db()?,
            fifo: txn.open_table(OUT_FIFO).db()?,
            expiry: txn.open_table(OUT_EXPIRY).db()?,
        })
    }
}

impl Store {
    /// Durably enqueues one message; returns only after the commit. `now` is unix ms.
    pub fn enqueue(&self, msg: &NewOutbound, now: u64) -> Result<OutboundId, StoreError> {
        let ids = self.write(|txn| self.enqueue_in(txn, std::iter::once((msg, now))))?;
        ids.into_iter()
            .next()
            .ok_or(StoreError::InvalidInput("enqueue produced no id"))
    }

    /// Durably enqueues several messages in one commit, in order.
    pub fn enqueue_batch(
        &self,
        msgs: &[NewOutbound],
        now: u64,
    ) -> Result<Vec<OutboundId>, StoreError> {
        self.write(|txn| self.enqueue_in(txn, msgs.iter().map(|m| (m, now))))
    }

    /// Inserts messages inside an open transaction (shared with the group committer).
    pub(crate) fn enqueue_in<'a>(
        &self,
        txn: &WriteTransaction,
        items: impl Iterator<Item = (&'a NewOutbound, u64)>,
    ) -> Result<Vec<OutboundId>, StoreError> {
        let mut tables = EnqueueTables::open(txn)?;
        items
            .map(|(msg, now)| self.enqueue_one(&mut tables, None, msg, now))
            .collect()
    }

    /// Inserts one message under `id`, or under the next free id when `id` is `None`, and
    /// advances the id counter past it. A caller-chosen id below the counter is refused: it is
    /// either present or was pruned, and an id must never name two messages.
    pub(crate) fn enqueue_one(
        &self,
        tables: &mut EnqueueTables<'_>,
        id: Option<OutboundId>,
        msg: &NewOutbound,
        now: u64,
    ) -> Result<OutboundId, StoreError> {
        let next = schema::read_counter(&tables.meta, NEXT_OUTBOUND_KEY)?.max(1);
        let id = id.unwrap_or(OutboundId(next));
        if id.0 < next {
            return Err(StoreError::InvalidInput("outbound id already used"));
        }
        let after =
            id.0.checked_add(1)
                .ok_or(StoreError::InvalidInput("outbound id out of range"))?;
        let qkey = queue_key(&msg.queue)?;
        let expires_at = now.saturating_add(msg.ttl_ms.unwrap_or(DEFAULT_EXPIRY_MS));
        let rec = Record {
            state: MessageState::Queued,
            attempts: 0,
            not_before: 0,
            expires_at,
            finished_at: 0,
            app: msg.app.clone(),
            queue: msg.queue.clone(),
            last_error: String::new(),
            sealed: self.key.seal(&payload_aad(id), &msg.payload)?,
        };
        tables
            .msgs
            .insert(id_key(id).as_slice(), rec.encode()?.as_slice())
            .db()?;
        tables
            .fifo
            .insert(fifo_key(&qkey, id).as_slice(), [].as_slice())
            .db()?;
        tables
            .expiry
            .insert(expiry_key(expires_at, id).as_slice(), [].as_slice())
            .db()?;
        tables
            .meta
            .insert(NEXT_OUTBOUND_KEY, after.to_be_bytes().as_slice())
            .db()?;
        Ok(id)
    }

    /// Moves a message to `state` for [`crate::Batch::set_state`]. Lenient where the single-op
    /// calls are strict: the pool replays its own view of each message, and a commit carrying
    /// an app's reply must not fail because a message finished twice.
    pub(crate) fn set_state_in(
        &self,
        txn: &WriteTransaction,
        id: OutboundId,
        state: MessageState,
        reason: Option<&str>,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut msgs = txn.open_table(OUT_MSGS).db()?;
        let mut rec = match load(&msgs, id) {
            Ok(rec) => rec,
            Err(StoreError::UnknownMessage(_)) => {
                debug!(%id, ?state, "ignoring state change of unknown outbound message");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if matches!(rec.state, MessageState::Sent | MessageState::Failed) {
            debug!(%id, from = ?rec.state, to = ?state, "ignoring state change of finished message");
            return Ok(());
        }
        match state {
            MessageState::Queued => {
                rec.state = MessageState::Queued;
                rec.not_before = 0;
                if let Some(reason) = reason {
                    rec.last_error = reason.to_owned();
                }
            }
            MessageState::Sending => {
                rec.state = MessageState::Sending;
                rec.attempts = rec.attempts.saturating_add(1);
            }
            MessageState::Sent => self.finish(txn, &mut rec, id, MessageState::Sent, now)?,
            MessageState::Failed => {
                if let Some(reason) = reason {
                    rec.last_error = reason.to_owned();
                }
                self.finish(txn, &mut rec, id, MessageState::Failed, now)?;
            }
        }
        msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
            .db()?;
        Ok(())
    }

    /// Leases up to `max` messages of `queue` that are due at `now`, in FIFO order, and marks
    /// them in flight. Returns nothing while the queue is held after ERR QUOTA.
    pub fn lease(&self, queue: &QueueRef, max: usize, now: u64) -> Result<Vec<Leased>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let qkey = queue_key(queue)?;
        self.write(|txn| {
            let mut hold = txn.open_table(OUT_HOLD).db()?;
            let held = match hold.get(qkey.as_slice()).db()? {
                Some(v) => Some(decode_u64(v.value())?),
                None => None,
            };
            match held {
                Some(until) if until > now => return Ok(Vec::new()),
                Some(_) => {
                    hold.remove(qkey.as_slice()).db()?;
                }
                None => {}
            }
            let fifo = txn.open_table(OUT_FIFO).db()?;
            let mut msgs = txn.open_table(OUT_MSGS).db()?;
            let mut out = Vec::new();
            for entry in fifo.range::<&[u8]>(qkey.as_slice()..).db()? {
                let (k, _) = entry.db()?;
                let Some(rest) = k.value().strip_prefix(qkey.as_slice()) else {
                    break;
                };
                let id = decode_id(rest)?;
                let mut rec = load(&msgs, id)?;
                match rec.state {
                    MessageState::Sending => continue,
                    MessageState::Queued if rec.not_before > now => break,
                    MessageState::Queued => {}
                    MessageState::Sent | MessageState::Failed => {
                        return Err(StoreError::CorruptRecord {
                            what: "outbound index",
                            detail: format!("finished message {id} still queued"),
                        });
                    }
                }
                let payload = self
                    .key
                    .open_record(&payload_aad(id), &rec.sealed, "payload")?;
                rec.state = MessageState::Sending;
                rec.attempts = rec.attempts.saturating_add(1);
                msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
                    .db()?;
                out.push(Leased {
                    id,
                    queue: rec.queue,
                    app: rec.app,
                    payload: payload.to_vec(),
                    attempt: rec.attempts,
                    expires_at: rec.expires_at,
                });
                if out.len() == max {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Records the server's OK for an in-flight message: it is sent, its payload is deleted.
    pub fn ack_sent(&self, id: OutboundId, now: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut msgs = txn.open_table(OUT_MSGS).db()?;
            let mut rec = load(&msgs, id)?;
            if rec.state != MessageState::Sending {
                return Err(StoreError::InvalidTransition {
                    id,
                    state: rec.state,
                    action: "acknowledge as sent",
                });
            }
            self.finish(txn, &mut rec, id, MessageState::Sent, now)?;
            msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
                .db()?;
            Ok(())
        })
    }

    /// Returns an in-flight message to the queue after a failed attempt; it will not be leased
    /// before `not_before` (unix ms, from the pool's retry policy).
    pub fn requeue(&self, id: OutboundId, not_before: u64, reason: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            self.requeue_in(txn, id, not_before, reason, "requeue")
                .map(|_| ())
        })
    }

    /// Like [`Self::requeue`] after ERR QUOTA: also holds the whole queue until `not_before`,
    /// so no message of that queue is leased before then (the server refuses them all). The
    /// caller picks a slow retry, minutes as the SimpleX agent does.
    pub fn mark_quota(&self, id: OutboundId, not_before: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            let queue = self.requeue_in(txn, id, not_before, "quota exceeded", "mark quota")?;
            let qkey = queue_key(&queue)?;
            let mut hold = txn.open_table(OUT_HOLD).db()?;
            let current = match hold.get(qkey.as_slice()).db()? {
                Some(v) => decode_u64(v.value())?,
                None => 0,
            };
            let until = current.max(not_before);
            hold.insert(qkey.as_slice(), until.to_be_bytes().as_slice())
                .db()?;
            Ok(())
        })
    }

    fn requeue_in(
        &self,
        txn: &WriteTransaction,
        id: OutboundId,
        not_before: u64,
        reason: &str,
        action: &'static str,
    ) -> Result<QueueRef, StoreError> {
        let mut msgs = txn.open_table(OUT_MSGS).db()?;
        let mut rec = load(&msgs, id)?;
        if rec.state != MessageState::Sending {
            return Err(StoreError::InvalidTransition {
                id,
                state: rec.state,
                action,
            });
        }
        rec.state = MessageState::Queued;
        rec.not_before = not_before;
        rec.last_error = reason.to_owned();
        msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
            .db()?;
        Ok(rec.queue)
    }

    /// Fails every queued message whose expiry is at or before `now`, and returns them so the
    /// daemon can tell their apps. In-flight messages are left to the server's answer.
    pub fn expire(&self, now: u64) -> Result<Vec<Expired>, StoreError> {
        // Look first with a read transaction: expire runs periodically and usually finds
        // nothing, which should not cost a durable commit.
        let due = {
            let txn = self.read()?;
            let expiry = txn.open_table(OUT_EXPIRY).db()?;
            let mut due = Vec::new();
            for entry in expiry
                .range::<&[u8]>(..=expiry_key(now, OutboundId(u64::MAX)).as_slice())
                .db()?
            {
                let (k, _) = entry.db()?;
                due.push(decode_id(k.value().get(8..).unwrap_or_default())?);
            }
            due
        };
        if due.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|txn| {
            let mut msgs = txn.open_table(OUT_MSGS).db()?;
            let mut out = Vec::new();
            for id in due {
                let mut rec = load(&msgs, id)?;
                if rec.state != MessageState::Queued || rec.expires_at > now {
                    continue;
                }
                self.finish(txn, &mut rec, id, MessageState::Failed, now)?;
                msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
                    .db()?;
                out.push(Expired {
                    id,
                    queue: rec.queue,
                    app: rec.app,
                    last_error: (!rec.last_error.is_empty()).then_some(rec.last_error),
                });
            }
            Ok(out)
        })
    }

    /// Moves a record to a final state and drops it from the queue indexes.
    fn finish(
        &self,
        txn: &WriteTransaction,
        rec: &mut Record,
        id: OutboundId,
        state: MessageState,
        now: u64,
    ) -> Result<(), StoreError> {
        let qkey = queue_key(&rec.queue)?;
        txn.open_table(OUT_FIFO)
            .db()?
            .remove(fifo_key(&qkey, id).as_slice())
            .db()?;
        txn.open_table(OUT_EXPIRY)
            .db()?
            .remove(expiry_key(rec.expires_at, id).as_slice())
            .db()?;
        rec.state = state;
        rec.finished_at = now;
        rec.sealed = Vec::new();
        Ok(())
    }

    /// The status of a message, or `None` if the id is unknown (or was pruned).
    pub fn state(&self, id: OutboundId) -> Result<Option<MessageStatus>, StoreError> {
        let txn = self.read()?;
        let msgs = txn.open_table(OUT_MSGS).db()?;
        match load(&msgs, id) {
            Ok(rec) => Ok(Some(rec.status())),
            Err(StoreError::UnknownMessage(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// How many messages for `server` are queued or in flight.
    pub fn pending_count(&self, server: &str) -> Result<u64, StoreError> {
        let prefix = server_prefix(server)?;
        let txn = self.read()?;
        let fifo = txn.open_table(OUT_FIFO).db()?;
        let mut n = 0;
        for entry in fifo.range::<&[u8]>(prefix.as_slice()..).db()? {
            let (k, _) = entry.db()?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Every queue with queued or in-flight messages.
    pub fn queues(&self) -> Result<Vec<QueueSummary>, StoreError> {
        let txn = self.read()?;
        let fifo = txn.open_table(OUT_FIFO).db()?;
        let msgs = txn.open_table(OUT_MSGS).db()?;
        let hold = txn.open_table(OUT_HOLD).db()?;
        let mut by_queue: BTreeMap<QueueRef, QueueSummary> = BTreeMap::new();
        for entry in fifo.iter().db()? {
            let (k, _) = entry.db()?;
            let (queue, rest) = split_queue_key(k.value(), "outbound index")?;
            let rec = load(&msgs, decode_id(rest)?)?;
            let summary = by_queue
                .entry(queue.clone())
                .or_insert_with(|| QueueSummary {
                    queue,
                    queued: 0,
                    in_flight: 0,
                    ready_at: None,
                });
            match rec.state {
                MessageState::Sending => summary.in_flight += 1,
                _ => {
                    // Only the first queued message matters: it blocks the rest (FIFO).
                    if summary.queued == 0 {
                        summary.ready_at = Some(rec.not_before);
                    }
                    summary.queued += 1;
                }
            }
        }
        let mut out = Vec::with_capacity(by_queue.len());
        for (_, mut summary) in by_queue {
            if let Some(at) = summary.ready_at {
                let qkey = queue_key(&summary.queue)?;
                if let Some(v) = hold.get(qkey.as_slice()).db()? {
                    summary.ready_at = Some(at.max(decode_u64(v.value())?));
                }
            }
            out.push(summary);
        }
        Ok(out)
    }

    /// The id the next enqueue should use (>= 1, never reused): one past the highest id ever
    /// enqueued, whether by the store or by a caller.
    pub fn next_outbound_id(&self) -> Result<OutboundId, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).db()?;
        Ok(OutboundId(
            schema::read_counter(&meta, NEXT_OUTBOUND_KEY)?.max(1),
        ))
    }

    /// Every outbound message not yet sent or failed, in id order, payload unsealed: what the
    /// pool reloads at start. Messages in flight at the last shutdown were queued again on open.
    pub fn unfinished(&self) -> Result<Vec<Unfinished>, StoreError> {
        let txn = self.read()?;
        let msgs = txn.open_table(OUT_MSGS).db()?;
        let mut out = Vec::new();
        for entry in msgs.iter().db()? {
            let (k, v) = entry.db()?;
            let rec = Record::decode(v.value())?;
            if matches!(rec.state, MessageState::Sent | MessageState::Failed) {
                continue;
            }
            let id = decode_id(k.value())?;
            let payload = self
                .key
                .open_record(&payload_aad(id), &rec.sealed, "payload")?;
            out.push(Unfinished {
                id,
                payload: payload.to_vec(),
                state: rec.state,
                attempts: rec.attempts,
                not_before: rec.not_before,
                expires_at: rec.expires_at,
                last_error: (!rec.last_error.is_empty()).then_some(rec.last_error),
                queue: rec.queue,
                app: rec.app,
            });
        }
        Ok(out)
    }

    /// Deletes the status rows of messages that finished (sent or failed) before `before`
    /// (unix ms); after this, [`Self::state`] returns `None` for them.
    pub fn prune_finished(&self, before: u64) -> Result<usize, StoreError> {
        self.write(|txn| {
            let mut msgs = txn.open_table(OUT_MSGS).db()?;
            let mut doomed = Vec::new();
            for entry in msgs.iter().db()? {
                let (k, v) = entry.db()?;
                let rec = Record::decode(v.value())?;
                let finished = matches!(rec.state, MessageState::Sent | MessageState::Failed);
                if finished && rec.finished_at < before {
                    doomed.push(k.value().to_vec());
                }
            }
            for k in &doomed {
                msgs.remove(k.as_slice()).db()?;
            }
            Ok(doomed.len())
        })
    }

    /// Puts messages that were in flight when the store was closed back in the queue: their
    /// leases died with the connections that held them. Returns how many.
    pub(crate) fn recover_in_flight(&self) -> Result<usize, StoreError> {
        let in_flight = {
            let txn = self.read()?;
            let fifo = txn.open_table(OUT_FIFO).db()?;
            let msgs = txn.open_table(OUT_MSGS).db()?;
            let mut ids = Vec::new();
            for entry in fifo.iter().db()? {
                let (k, _) = entry.db()?;
                let (_, rest) = split_queue_key(k.value(), "outbound index")?;
                let id = decode_id(rest)?;
                if load(&msgs, id)?.state == MessageState::Sending {
                    ids.push(id);
                }
            }
            ids
        };
        if in_flight.is_empty() {
            return Ok(0);
        }
        self.write(|txn| {
            let mut msgs = txn.open_table(OUT_MSGS).db()?;
            for &id in &in_flight {
                let mut rec = load(&msgs, id)?;
                rec.state = MessageState::Queued;
                msgs.insert(id_key(id).as_slice(), rec.encode()?.as_slice())
                    .db()?;
            }
            Ok(in_flight.len())
        })
    }
}
