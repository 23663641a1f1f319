//! The inbound mailbox: messages received from servers, kept until their app acknowledges them.
//!
//! The daemon commits a received message here *before* it ACKs it to the server, so a crash
//! between the two means the server redelivers a message the store already has. The dedup set
//! (keyed by queue and server message id) recognises that redelivery and outlives the app's
//! acknowledgement, so an app never sees a message twice. It is bounded: per queue, the most
//! recent [`crate::StoreOptions::dedup_window`] acknowledged ids are kept, plus every id whose
//! message is still waiting for its app.

use redb::{ReadableTable, WriteTransaction};

use crate::codec::{
    Reader, Writer, app_key, queue_key, split_app_key, split_queue_key, trailing_u64,
};
use crate::error::{DbResultExt, StoreError};
use crate::schema::{MBX_COUNT, MBX_MSGS, MBX_ORDER, MBX_SEEN, META, NEXT_MAILBOX_SEQ_KEY};
use crate::{QueueRef, Store, schema};

const RECORD_VERSION: u8 = 1;
const BODY_AAD: &[u8] = b"mailbox_messages/";

/// The outcome of [`Store::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivered {
    /// A new message, now stored durably; pass it to the app. `seq` orders arrivals.
    New {
        /// Store-wide arrival number.
        seq: u64,
    },
    /// The store has seen this message id on this queue before; do not pass it on again (but
    /// do ACK it to the server).
    Duplicate,
}

/// A received message waiting for its app's acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboundMessage {
    /// The queue it arrived on.
    pub queue: QueueRef,
    /// The server's message id.
    pub msg_id: Vec<u8>,
    /// The body, decrypted from its at-rest seal.
    pub body: Vec<u8>,
    /// Unix ms when it was stored.
    pub received_at: u64,
    /// Store-wide arrival number.
    pub seq: u64,
}

fn body_aad(seq: u64) -> Vec<u8> {
    [BODY_AAD, &seq.to_be_bytes()].concat()
}

fn msg_key(akey: &[u8], qkey: &[u8], seq: u64) -> Vec<u8> {
    [akey, qkey, &seq.to_be_bytes()].concat()
}

/// Decodes a dedup entry's value: `seq ‖ app`.
fn decode_seen(v: &[u8]) -> Result<(u64, String), StoreError> {
    let mut r = Reader::new(v, "mailbox dedup entry");
    let seq = r.u64()?;
    let app = r.string()?;
    r.finish()?;
    Ok((seq, app))
}

impl Store {
    /// Durably stores a message received on `queue` for `app`, unless this `(queue, msg_id)`
    /// was stored before. Call it before ACKing the message to the server.
    pub fn deliver(
        &self,
        app: &str,
        queue: &QueueRef,
        msg_id: &[u8],
        body: &[u8],
        now: u64,
    ) -> Result<Delivered, StoreError> {
        self.write(|txn| self.deliver_in(txn, app, queue, msg_id, body, now))
    }

    /// [`Self::deliver`] inside an open transaction (shared with [`crate::Batch`]); it sees
    /// deliveries made earlier in the same transaction.
    pub(crate) fn deliver_in(
        &self,
        txn: &WriteTransaction,
        app: &str,
        queue: &QueueRef,
        msg_id: &[u8],
        body: &[u8],
        now: u64,
    ) -> Result<Delivered, StoreError> {
        let akey = app_key(app)?;
        let qkey = queue_key(queue)?;
        let seen_key = [qkey.as_slice(), msg_id].concat();
        let mut seen = txn.open_table(MBX_SEEN).db()?;
        if seen.get(seen_key.as_slice()).db()?.is_some() {
            return Ok(Delivered::Duplicate);
        }
        let mut meta = txn.open_table(META).db()?;
        let seq = schema::read_counter(&meta, NEXT_MAILBOX_SEQ_KEY)?.max(1);
        meta.insert(NEXT_MAILBOX_SEQ_KEY, (seq + 1).to_be_bytes().as_slice())
            .db()?;
        let value = Writer::new()
            .u8(RECORD_VERSION)
            .u64(now)
            .bytes(msg_id)?
            .bytes(&self.key.seal(&body_aad(seq), body)?)?
            .finish();
        txn.open_table(MBX_MSGS)
            .db()?
            .insert(msg_key(&akey, &qkey, seq).as_slice(), value.as_slice())
            .db()?;
        let seen_value = Writer::new().u64(seq).bytes(app.as_bytes())?.finish();
        seen.insert(seen_key.as_slice(), seen_value.as_slice())
            .db()?;
        drop(seen);
        let order_key = [qkey.as_slice(), &seq.to_be_bytes()].concat();
        txn.open_table(MBX_ORDER)
            .db()?
            .insert(order_key.as_slice(), msg_id)
            .db()?;
        let mut count = txn.open_table(MBX_COUNT).db()?;
        let n = match count.get(qkey.as_slice()).db()? {
            Some(v) => trailing_u64(v.value(), "mailbox dedup count")?,
            None => 0,
        };
        count
            .insert(qkey.as_slice(), (n + 1).to_be_bytes().as_slice())
            .db()?;
        drop(count);
        self.prune_seen(txn, &qkey)?;
        Ok(Delivered::New { seq })
    }

    /// Messages waiting for `app`'s acknowledgement, oldest first within each queue; all of the
    /// app's queues when `queue` is `None`. At most `max`.
    pub fn pending(
        &self,
        app: &str,
        queue: Option<&QueueRef>,
        max: usize,
    ) -> Result<Vec<InboundMessage>, StoreError> {
        let mut prefix = app_key(app)?;
        if let Some(q) = queue {
            prefix.extend_from_slice(&queue_key(q)?);
        }
        let txn = self.read()?;
        let msgs = txn.open_table(MBX_MSGS).db()?;
        let mut out = Vec::new();
        for entry in msgs.range::<&[u8]>(prefix.as_slice()..).db()? {
            if out.len() >= max {
                break;
            }
            let (k, v) = entry.db()?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push(self.decode_message(k.value(), v.value())?.1);
        }
        Ok(out)
    }

    /// Every message waiting for any app, as `(app, message)`, in arrival order: what the
    /// pool reloads at start.
    pub fn all_pending(&self) -> Result<Vec<(String, InboundMessage)>, StoreError> {
        let txn = self.read()?;
        let msgs = txn.open_table(MBX_MSGS).db()?;
        let mut out = Vec::new();
        for entry in msgs.iter().db()? {
            let (k, v) = entry.db()?;
            out.push(self.decode_message(k.value(), v.value())?);
        }
        // Keys sort by app and queue first; seq is the store-wide arrival number.
        out.sort_by_key(|(_, m)| m.seq);
        Ok(out)
    }

    /// Decodes one mailbox row into its app and message, unsealing the body.
    fn decode_message(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<(String, InboundMessage), StoreError> {
        let (app, rest) = split_app_key(key, "mailbox key")?;
        let (queue, rest) = split_queue_key(rest, "mailbox key")?;
        let seq = trailing_u64(rest, "mailbox key")?;
        let mut r = Reader::new(value, "mailbox message");
        if r.u8()? != RECORD_VERSION {
            return Err(r.corrupt("unknown record version"));
        }
        let received_at = r.u64()?;
        let msg_id = r.bytes()?.to_vec();
        let sealed = r.bytes()?;
        r.finish()?;
        let body = self
            .key
            .open_record(&body_aad(seq), sealed, "mailbox body")?;
        let msg = InboundMessage {
            queue,
            msg_id,
            body: body.to_vec(),
            received_at,
            seq,
        };
        Ok((app, msg))
    }

    /// Records that `app` has taken message `msg_id` of `queue`: its body is deleted, its id
    /// stays in the dedup set. Returns `false` if no such message was waiting for this app.
    pub fn ack(&self, app: &str, queue: &QueueRef, msg_id: &[u8]) -> Result<bool, StoreError> {
        self.write(|txn| self.ack_in(txn, app, queue, msg_id))
    }

    /// [`Self::ack`] inside an open transaction (shared with [`crate::Batch`]).
    pub(crate) fn ack_in(
        &self,
        txn: &WriteTransaction,
        app: &str,
        queue: &QueueRef,
        msg_id: &[u8],
    ) -> Result<bool, StoreError> {
        let akey = app_key(app)?;
        let qkey = queue_key(queue)?;
        let seen_key = [qkey.as_slice(), msg_id].concat();
        let found = {
            let seen = txn.open_table(MBX_SEEN).db()?;
            let found = seen.get(seen_key.as_slice()).db()?;
            match found {
                Some(v) => Some(decode_seen(v.value())?),
                None => None,
            }
        };
        let Some((seq, owner)) = found else {
            return Ok(false);
        };
        if owner != app {
            return Ok(false);
        }
        let removed = txn
            .open_table(MBX_MSGS)
            .db()?
            .remove(msg_key(&akey, &qkey, seq).as_slice())
            .db()?
            .is_some();
        // Acked entries may now be prunable if pending ones had held the set over its bound.
        self.prune_seen(txn, &qkey)?;
        Ok(removed)
    }

    /// Drops the oldest acknowledged dedup entries of one queue beyond the window.
    fn prune_seen(&self, txn: &WriteTransaction, qkey: &[u8]) -> Result<(), StoreError> {
        let window = u64::from(self.options.dedup_window);
        let mut count = txn.open_table(MBX_COUNT).db()?;
        let mut n = match count.get(qkey).db()? {
            Some(v) => trailing_u64(v.value(), "mailbox dedup count")?,
            None => return Ok(()),
        };
        if n <= window {
            return Ok(());
        }
        let mut order = txn.open_table(MBX_ORDER).db()?;
        let mut seen = txn.open_table(MBX_SEEN).db()?;
        let msgs = txn.open_table(MBX_MSGS).db()?;
        let mut doomed = Vec::new();
        for entry in order.range::<&[u8]>(qkey..).db()? {
            if n <= window {
                break;
            }
            let (k, v) = entry.db()?;
            let Some(rest) = k.value().strip_prefix(qkey) else {
                break;
            };
            let seq = trailing_u64(rest, "mailbox order key")?;
            let seen_key = [qkey, v.value()].concat();
            let (_, owner) = match seen.get(seen_key.as_slice()).db()? {
                Some(s) => decode_seen(s.value())?,
                None => {
                    return Err(StoreError::CorruptRecord {
                        what: "mailbox dedup entry",
                        detail: "order entry without dedup entry".to_owned(),
                    });
                }
            };
            // A message the app has not acknowledged keeps its id: dropping it could let a
            // redelivery through as new while the original is still pending.
            let still_pending = msgs
                .get(msg_key(&app_key(&owner)?, qkey, seq).as_slice())
                .db()?
                .is_some();
            if !still_pending {
                doomed.push((k.value().to_vec(), seen_key));
                n -= 1;
            }
        }
        for (order_key, seen_key) in &doomed {
            order.remove(order_key.as_slice()).db()?;
            seen.remove(seen_key.as_slice()).db()?;
        }
        count.insert(qkey, n.to_be_bytes().as_slice()).db()?;
        Ok(())
    }
}

/// Forgets the inbound side of a deleted queue inside an open transaction (for
/// [`crate::Batch::forget_inbound`]): its waiting messages, whichever app they were for, and
/// every dedup entry. A queue that is gone cannot be redelivered from, so nothing is lost.
pub(crate) fn forget_inbound_in(
    txn: &WriteTransaction,
    queue: &QueueRef,
) -> Result<(), StoreError> {
    let qkey = queue_key(queue)?;
    let mut seen = txn.open_table(MBX_SEEN).db()?;
    let mut msgs = txn.open_table(MBX_MSGS).db()?;
    // The dedup set names every message of the queue, pending or not, with its owner and seq;
    // queue keys are self-delimiting, so the prefix matches this queue only.
    for (seen_key, value) in schema::scan_prefix(&seen, &qkey)? {
        let (seq, owner) = decode_seen(&value)?;
        seen.remove(seen_key.as_slice()).db()?;
        msgs.remove(msg_key(&app_key(&owner)?, &qkey, seq).as_slice())
            .db()?;
    }
    let mut order = txn.open_table(MBX_ORDER).db()?;
    for (order_key, _) in schema::scan_prefix(&order, &qkey)? {
        order.remove(order_key.as_slice()).db()?;
    }
    txn.open_table(MBX_COUNT)
        .db()?
        .remove(qkey.as_slice())
        .db()?;
    Ok(())
}
