//! Where received messages wait until their app acknowledges them.
//!
//! The pool only needs the small [`Mailbox`] interface, so the durable store of a later step
//! can take the place of the in-memory [`MemoryMailbox`] without touching the pool.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use zeroize::Zeroize;

use crate::envelope::SeqWindow;
use crate::persist::{MessageOutcome, SavedMessage, SavedQueue, SavedSender};
use crate::server::ServerKey;

/// How many ids of already acknowledged messages a [`MemoryMailbox`] remembers per queue.
///
/// A server re-delivers a message when our ACK got lost (a disconnect between storing it and
/// the ACK reaching the server); only the most recent ids can come back that way, so a short
/// window is enough to keep such a message from reaching the app twice.
pub const REMEMBERED_ACKS: usize = 256;

/// A decrypted message waiting for its app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The queue it arrived on (the pool's queue id).
    pub queue_id: String,
    /// The server's message id, base64url; unique per queue.
    pub msg_id: String,
    /// The server's receive time, unix seconds.
    pub ts: i64,
    /// The app's message.
    pub body: Vec<u8>,
}

/// What [`Mailbox::deliver`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Stored for the app, and its seq recorded.
    New,
    /// Already delivered (a seq the queue's [`SeqWindow`] knows, or a known msgId): nothing
    /// stored, the pool only ACKs it.
    Duplicate,
}

/// Storage for received messages, per queue, oldest first.
///
/// For exactly-once delivery the store also keeps, per queue, which sender seqs it delivered
/// (a [`SeqWindow`], see `docs/envelope.md`). A durable store must write the window in the
/// same commit as the message ([`Self::deliver`]): a crash between the two would either lose
/// the message or let its resent copy through.
pub trait Mailbox {
    /// Stores `message` at the end of its queue. Returns `false` (and stores nothing) when a
    /// message with the same `msg_id` is already stored or was recently removed: servers
    /// re-deliver a message whose ACK was lost.
    fn insert(&mut self, message: ReceivedMessage) -> bool;

    /// Up to `max` messages of `queue_id`, oldest first, without removing them.
    fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage>;

    /// Removes one message; `false` when there was none with that id.
    fn remove(&mut self, queue_id: &str, msg_id: &str) -> bool;

    /// How many messages of `queue_id` are waiting.
    fn count(&self, queue_id: &str) -> usize;

    /// The body bytes of the messages of `queue_id` that are waiting; the pool bounds it
    /// with [`crate::PoolConfig::max_waiting_bytes_per_queue`]. The default adds up
    /// [`Self::peek`]; stores that can should keep a running total.
    fn waiting_bytes(&self, queue_id: &str) -> usize {
        self.peek(queue_id, usize::MAX)
            .iter()
            .map(|m| m.body.len())
            .sum()
    }

    /// Forgets a queue and all its messages.
    fn remove_queue(&mut self, queue_id: &str);

    /// Stores `message`, which carried the sender's sequence number `seq`, unless it was
    /// already delivered: the queue's [`SeqWindow`] knows `seq` (the sender resent a message
    /// whose OK was lost), or its `msg_id` is known (the server re-delivered a message whose
    /// ACK was lost). On [`Delivery::New`] the window records `seq`.
    ///
    /// The default only checks the `msg_id` (through [`Self::insert`]) and keeps no window;
    /// the pool keeps one in memory in front of it, so that suffices while the daemon runs. A
    /// store that must stay exactly-once across restarts overrides this and
    /// [`Self::delivered_seqs`], checking and writing both in one transaction.
    fn deliver(&mut self, message: ReceivedMessage, seq: u64) -> Delivery {
        let _ = seq;
        if self.insert(message) {
            Delivery::New
        } else {
            Delivery::Duplicate
        }
    }

    /// The seqs [`Self::deliver`] stored for the queue; `None` when the store keeps none.
    fn delivered_seqs(&self, queue_id: &str) -> Option<SeqWindow> {
        let _ = queue_id;
        None
    }

    // ---- the journal: what a durable store must keep besides received messages ----
    //
    // The pool calls these as its state changes, inside the same call that produces the
    // actions depending on them. A durable store may stage them and commit once per call;
    // the driver must commit before it carries out the actions the pool returned after that
    // call (a reply to an app, a block to a server): the pool's write-ahead rule. An
    // in-memory mailbox ignores them (the defaults).

    /// A queue was created or its keys or e2e state changed: keep this version. Forgotten
    /// with [`Self::remove_queue`].
    fn save_queue(&mut self, queue: &SavedQueue) {
        let _ = queue;
    }

    /// A destination's sender state changed (created, secured, confirmed, a seq handed out).
    fn save_sender(&mut self, sender: &SavedSender) {
        let _ = sender;
    }

    /// A destination's sender state is no longer needed.
    fn forget_sender(&mut self, server: &ServerKey, sender_id: &[u8]) {
        let _ = (server, sender_id);
    }

    /// An app handed over a message to send; it must survive until
    /// [`Self::message_finished`].
    fn enqueue(&mut self, message: &SavedMessage) {
        let _ = message;
    }

    /// A message was accepted by the server or failed for good.
    fn message_finished(&mut self, id: u64, outcome: &MessageOutcome) {
        let _ = (id, outcome);
    }

    /// The pool dropped a copy of a message already delivered on `queue_id`; `total` is the
    /// queue's count so far. Kept so the count survives restarts (the crash test reports it).
    fn duplicate_dropped(&mut self, queue_id: &str, total: u64) {
        let _ = (queue_id, total);
    }

    /// The count [`Self::duplicate_dropped`] kept for `queue_id`; 0 when none is kept.
    fn duplicates_dropped(&self, queue_id: &str) -> u64 {
        let _ = queue_id;
        0
    }
}

/// A [`Mailbox`] in memory: lost when the daemon stops.
///
/// Lookups by msgId are logarithmic, so a queue holding many messages costs no more per
/// message than a short one. Bodies are wiped from memory when their message is removed.
/// `Debug` shows counts, not message bodies.
#[derive(Default)]
pub struct MemoryMailbox {
    queues: BTreeMap<String, Slot>,
}

impl fmt::Debug for MemoryMailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts: BTreeMap<&str, usize> = self
            .queues
            .iter()
            .map(|(id, s)| (id.as_str(), s.waiting.len()))
            .collect();
        f.debug_struct("MemoryMailbox")
            .field("waiting", &counts)
            .finish()
    }
}

#[derive(Default)]
struct Slot {
    /// Waiting messages by arrival number, oldest first.
    waiting: BTreeMap<u64, ReceivedMessage>,
    /// The arrival number of each waiting msgId.
    index: BTreeMap<String, u64>,
    next: u64,
    /// Body bytes of the waiting messages.
    bytes: usize,
    /// Recently removed msgIds, oldest first, and the same as a set for lookups.
    removed: VecDeque<String>,
    removed_set: BTreeSet<String>,
    /// The seqs delivered.
    seqs: SeqWindow,
}

impl Slot {
    fn known(&self, msg_id: &str) -> bool {
        self.index.contains_key(msg_id) || self.removed_set.contains(msg_id)
    }

    /// Appends `message` unless its msgId is waiting or was recently removed.
    fn push(&mut self, message: ReceivedMessage) -> bool {
        if self.known(&message.msg_id) {
            return false;
        }
        let n = self.next;
        self.next += 1;
        self.bytes += message.body.len();
        self.index.insert(message.msg_id.clone(), n);
        self.waiting.insert(n, message);
        true
    }

    fn remove(&mut self, msg_id: &str) -> bool {
        let Some(n) = self.index.remove(msg_id) else {
            return false;
        };
        if let Some(mut message) = self.waiting.remove(&n) {
            self.bytes = self.bytes.saturating_sub(message.body.len());
            message.body.zeroize();
        }
        if self.removed.len() >= REMEMBERED_ACKS
            && let Some(old) = self.removed.pop_front()
        {
            self.removed_set.remove(&old);
        }
        self.removed.push_back(msg_id.to_owned());
        self.removed_set.insert(msg_id.to_owned());
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        for message in self.waiting.values_mut() {
            message.body.zeroize();
        }
    }
}

impl MemoryMailbox {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// After a restart: the window of seqs a durable store delivered for `queue_id` before.
    /// Messages still waiting go back with [`Mailbox::insert`].
    pub fn restore_window(&mut self, queue_id: &str, window: SeqWindow) {
        self.queues.entry(queue_id.to_owned()).or_default().seqs = window;
    }
}

impl Mailbox for MemoryMailbox {
    fn insert(&mut self, message: ReceivedMessage) -> bool {
        let slot = self.queues.entry(message.queue_id.clone()).or_default();
        slot.push(message)
    }

    fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage> {
        self.queues
            .get(queue_id)
            .map(|s| s.waiting.values().take(max).cloned().collect())
            .unwrap_or_default()
    }

    fn remove(&mut self, queue_id: &str, msg_id: &str) -> bool {
        self.queues
            .get_mut(queue_id)
            .is_some_and(|slot| slot.remove(msg_id))
    }

    fn count(&self, queue_id: &str) -> usize {
        self.queues.get(queue_id).map_or(0, |s| s.waiting.len())
    }

    fn waiting_bytes(&self, queue_id: &str) -> usize {
        self.queues.get(queue_id).map_or(0, |s| s.bytes)
    }

    fn remove_queue(&mut self, queue_id: &str) {
        self.queues.remove(queue_id);
    }

    fn deliver(&mut self, message: ReceivedMessage, seq: u64) -> Delivery {
        let slot = self.queues.entry(message.queue_id.clone()).or_default();
        // The window and the message change together, as a durable store commits them.
        if !slot.seqs.is_new(seq) || !slot.push(message) {
            return Delivery::Duplicate;
        }
        slot.seqs.record(seq);
        Delivery::New
    }

    fn delivered_seqs(&self, queue_id: &str) -> Option<SeqWindow> {
        self.queues.get(queue_id).map(|s| s.seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> ReceivedMessage {
        ReceivedMessage {
            queue_id: "q".into(),
            msg_id: id.into(),
            ts: 1,
            body: id.as_bytes().to_vec(),
        }
    }

    #[test]
    fn dedups_waiting_and_recently_removed_ids() {
        let mut m = MemoryMailbox::new();
        assert!(m.insert(msg("a")));
        assert!(m.insert(msg("b")));
        assert!(!m.insert(msg("a")));
        assert_eq!(m.count("q"), 2);
        assert!(m.remove("q", "a"));
        assert!(!m.remove("q", "a"));
        assert!(!m.insert(msg("a")), "a re-delivery after the app's ack");
        assert_eq!(m.peek("q", 10), vec![msg("b")]);
        m.remove_queue("q");
        assert_eq!(m.count("q"), 0);
    }

    #[test]
    fn remembers_a_bounded_number_of_removed_ids() {
        let mut m = MemoryMailbox::new();
        for i in 0..=REMEMBERED_ACKS {
            let id = i.to_string();
            assert!(m.insert(msg(&id)));
            assert!(m.remove("q", &id));
        }
        // The oldest id fell out of the window; the newest is still known.
        assert!(m.insert(msg("0")));
        assert!(!m.insert(msg(&REMEMBERED_ACKS.to_string())));
    }

    #[test]
    fn counts_bytes_and_stays_fast_with_many_waiting() {
        let mut m = MemoryMailbox::new();
        // A linear msgId scan per insert would make this quadratic (~10^9 comparisons).
        let n = 50_000;
        for i in 0..n {
            assert!(m.insert(msg(&i.to_string())));
        }
        assert!(!m.insert(msg("0")));
        assert!(!m.insert(msg(&(n - 1).to_string())));
        let bytes: usize = (0..n).map(|i| i.to_string().len()).sum();
        assert_eq!(m.waiting_bytes("q"), bytes);
        for i in (0..n).rev() {
            assert!(m.remove("q", &i.to_string()));
        }
        assert_eq!(m.count("q"), 0);
        assert_eq!(m.waiting_bytes("q"), 0);
        // The newest removed ids are remembered, the oldest forgotten.
        assert!(!m.insert(msg("0")));
        assert!(m.insert(msg(&(n - 1).to_string())));
        let order: Vec<String> = {
            for id in ["b", "a"] {
                m.insert(msg(id));
            }
            m.peek("q", 10).into_iter().map(|x| x.msg_id).collect()
        };
        assert_eq!(order, [(n - 1).to_string(), "b".into(), "a".into()]);
        // The trait's default sums what `peek` shows.
        #[derive(Debug)]
        struct Plain<'a>(&'a MemoryMailbox);
        impl Mailbox for Plain<'_> {
            fn insert(&mut self, _: ReceivedMessage) -> bool {
                false
            }
            fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage> {
                self.0.peek(queue_id, max)
            }
            fn remove(&mut self, _: &str, _: &str) -> bool {
                false
            }
            fn count(&self, queue_id: &str) -> usize {
                self.0.count(queue_id)
            }
            fn remove_queue(&mut self, _: &str) {}
        }
        assert_eq!(Plain(&m).waiting_bytes("q"), m.waiting_bytes("q"));
        assert_eq!(m.waiting_bytes("q"), (n - 1).to_string().len() + 2);
    }

    #[test]
    fn deliver_keeps_the_delivered_seqs_per_queue() {
        let mut m = MemoryMailbox::new();
        assert_eq!(m.delivered_seqs("q"), None);
        assert_eq!(m.deliver(msg("a"), 1), Delivery::New);
        assert_eq!(m.deliver(msg("b"), 2), Delivery::New);
        // The sender resent seq 2 (its OK was lost): a new msgId, the same seq.
        assert_eq!(m.deliver(msg("b2"), 2), Delivery::Duplicate);
        assert_eq!(m.deliver(msg("old"), 1), Delivery::Duplicate);
        // 3 was overtaken by 5: it comes late, once.
        assert_eq!(m.deliver(msg("e"), 5), Delivery::New);
        assert_eq!(m.deliver(msg("c"), 3), Delivery::New);
        assert_eq!(m.deliver(msg("c2"), 3), Delivery::Duplicate);
        assert_eq!(m.delivered_seqs("q").map(|w| w.high()), Some(5));
        // The server re-delivered a msgId with a higher seq: still one copy, no seq recorded.
        assert_eq!(m.deliver(msg("e"), 6), Delivery::Duplicate);
        assert!(m.delivered_seqs("q").unwrap().is_new(6));
        let ids: Vec<String> = m.peek("q", 10).into_iter().map(|x| x.msg_id).collect();
        assert_eq!(ids, ["a", "b", "e", "c"]);
        // Another queue has its own seqs.
        let mut other = msg("a");
        other.queue_id = "r".into();
        assert_eq!(m.deliver(other, 1), Delivery::New);
        // The seqs outlive the app's acks, and go with the queue.
        for id in ["a", "b", "e", "c"] {
            assert!(m.remove("q", id));
        }
        assert_eq!(m.deliver(msg("f"), 5), Delivery::Duplicate);
        m.remove_queue("q");
        assert_eq!(m.delivered_seqs("q"), None);
    }

    /// A store that does not override `deliver` still refuses a known msgId.
    #[test]
    fn default_deliver_falls_back_to_msg_id_dedup() {
        #[derive(Debug, Default)]
        struct Plain(MemoryMailbox);
        impl Mailbox for Plain {
            fn insert(&mut self, message: ReceivedMessage) -> bool {
                self.0.insert(message)
            }
            fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage> {
                self.0.peek(queue_id, max)
            }
            fn remove(&mut self, queue_id: &str, msg_id: &str) -> bool {
                self.0.remove(queue_id, msg_id)
            }
            fn count(&self, queue_id: &str) -> usize {
                self.0.count(queue_id)
            }
            fn remove_queue(&mut self, queue_id: &str) {
                self.0.remove_queue(queue_id);
            }
        }
        let mut p = Plain::default();
        assert_eq!(p.deliver(msg("a"), 1), Delivery::New);
        assert_eq!(p.deliver(msg("a"), 1), Delivery::Duplicate);
        assert_eq!(p.deliver(msg("b"), 1), Delivery::New, "no seqs kept");
        assert_eq!(p.delivered_seqs("q"), None);
    }
}
