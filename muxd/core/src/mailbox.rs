//! Where received messages wait until their app acknowledges them.
//!
//! The pool only needs the small [`Mailbox`] interface, so the durable store of a later step
//! can take the place of the in-memory [`MemoryMailbox`] without touching the pool.

use std::collections::{BTreeMap, VecDeque};

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

/// Storage for received messages, per queue, oldest first.
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

    /// Forgets a queue and all its messages.
    fn remove_queue(&mut self, queue_id: &str);
}

/// A [`Mailbox`] in memory: lost when the daemon stops.
#[derive(Debug, Default)]
pub struct MemoryMailbox {
    queues: BTreeMap<String, Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    waiting: VecDeque<ReceivedMessage>,
    removed: VecDeque<String>,
}

impl MemoryMailbox {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Mailbox for MemoryMailbox {
    fn insert(&mut self, message: ReceivedMessage) -> bool {
        let slot = self.queues.entry(message.queue_id.clone()).or_default();
        let known = slot.waiting.iter().any(|m| m.msg_id == message.msg_id)
            || slot.removed.contains(&message.msg_id);
        if !known {
            slot.waiting.push_back(message);
        }
        !known
    }

    fn peek(&self, queue_id: &str, max: usize) -> Vec<ReceivedMessage> {
        self.queues
            .get(queue_id)
            .map(|s| s.waiting.iter().take(max).cloned().collect())
            .unwrap_or_default()
    }

    fn remove(&mut self, queue_id: &str, msg_id: &str) -> bool {
        let Some(slot) = self.queues.get_mut(queue_id) else {
            return false;
        };
        let Some(pos) = slot.waiting.iter().position(|m| m.msg_id == msg_id) else {
            return false;
        };
        slot.waiting.remove(pos);
        if slot.removed.len() == REMEMBERED_ACKS {
            slot.removed.pop_front();
        }
        slot.removed.push_back(msg_id.to_owned());
        true
    }

    fn count(&self, queue_id: &str) -> usize {
        self.queues.get(queue_id).map_or(0, |s| s.waiting.len())
    }

    fn remove_queue(&mut self, queue_id: &str) {
        self.queues.remove(queue_id);
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
}
