//! An in-memory twin of the outbound queue.
//!
//! It implements the same operations with the same results as [`crate::Store`], in the most
//! direct way possible (linear scans over a map), so that it can serve as the reference model
//! in property tests of the real store, and as the queue in simulations that run without a
//! disk. It is not durable and not meant for production use.

use std::collections::BTreeMap;

use crate::outbound::{
    DEFAULT_EXPIRY_MS, Expired, Leased, MessageState, MessageStatus, NewOutbound, OutboundId,
    QueueSummary, Unfinished,
};
use crate::{QueueRef, StoreError};

/// The in-memory outbound queue.
#[derive(Debug, Default, Clone)]
pub struct MemOutbound {
    /// The highest id handed out so far (0: none).
    last_id: u64,
    msgs: BTreeMap<OutboundId, Msg>,
    holds: BTreeMap<QueueRef, u64>,
}

#[derive(Debug, Clone)]
struct Msg {
    queue: QueueRef,
    app: String,
    payload: Vec<u8>,
    state: MessageState,
    attempts: u32,
    not_before: u64,
    expires_at: u64,
    finished_at: u64,
    last_error: Option<String>,
}

impl Msg {
    fn pending(&self) -> bool {
        matches!(self.state, MessageState::Queued | MessageState::Sending)
    }
}

impl MemOutbound {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// See [`crate::Store::enqueue`].
    pub fn enqueue(&mut self, msg: &NewOutbound, now: u64) -> OutboundId {
        let id = OutboundId(self.last_id + 1);
        self.insert(id, msg, now);
        id
    }

    /// See [`crate::Batch::enqueue`]: an id below [`Self::next_outbound_id`] is refused.
    pub fn enqueue_with_id(
        &mut self,
        id: OutboundId,
        msg: &NewOutbound,
        now: u64,
    ) -> Result<(), StoreError> {
        if id.0 <= self.last_id {
            return Err(StoreError::InvalidInput("outbound id already used"));
        }
        if id.0 == u64::MAX {
            return Err(StoreError::InvalidInput("outbound id out of range"));
        }
        self.insert(id, msg, now);
        Ok(())
    }

    /// See [`crate::Store::next_outbound_id`].
    pub fn next_outbound_id(&self) -> OutboundId {
        OutboundId(self.last_id + 1)
    }

    fn insert(&mut self, id: OutboundId, msg: &NewOutbound, now: u64) {
        self.last_id = id.0;
        self.msgs.insert(
            id,
            Msg {
                queue: msg.queue.clone(),
                app: msg.app.clone(),
                payload: msg.payload.clone(),
                state: MessageState::Queued,
                attempts: 0,
                not_before: 0,
                expires_at: now.saturating_add(msg.ttl_ms.unwrap_or(DEFAULT_EXPIRY_MS)),
                finished_at: 0,
                last_error: None,
            },
        );
    }

    /// See [`crate::Store::lease`].
    pub fn lease(&mut self, queue: &QueueRef, max: usize, now: u64) -> Vec<Leased> {
        if max == 0 {
            return Vec::new();
        }
        match self.holds.get(queue) {
            Some(&until) if until > now => return Vec::new(),
            Some(_) => {
                self.holds.remove(queue);
            }
            None => {}
        }
        let mut out = Vec::new();
        for (&id, msg) in self.msgs.iter_mut() {
            if msg.queue != *queue || !msg.pending() {
                continue;
            }
            if msg.state == MessageState::Sending {
                continue;
            }
            if msg.not_before > now {
                break;
            }
            msg.state = MessageState::Sending;
            msg.attempts += 1;
            out.push(Leased {
                id,
                queue: msg.queue.clone(),
                app: msg.app.clone(),
                payload: msg.payload.clone(),
                attempt: msg.attempts,
                expires_at: msg.expires_at,
            });
            if out.len() == max {
                break;
            }
        }
        out
    }

    fn in_flight(&mut self, id: OutboundId, action: &'static str) -> Result<&mut Msg, StoreError> {
        let msg = self
            .msgs
            .get_mut(&id)
            .ok_or(StoreError::UnknownMessage(id))?;
        if msg.state != MessageState::Sending {
            return Err(StoreError::InvalidTransition {
                id,
                state: msg.state,
                action,
            });
        }
        Ok(msg)
    }

    /// See [`crate::Store::ack_sent`].
    pub fn ack_sent(&mut self, id: OutboundId, now: u64) -> Result<(), StoreError> {
        let msg = self.in_flight(id, "acknowledge as sent")?;
        msg.state = MessageState::Sent;
        msg.finished_at = now;
        msg.payload.clear();
        Ok(())
    }

    /// See [`crate::Store::requeue`].
    pub fn requeue(
        &mut self,
        id: OutboundId,
        not_before: u64,
        reason: &str,
    ) -> Result<(), StoreError> {
        let msg = self.in_flight(id, "requeue")?;
        msg.state = MessageState::Queued;
        msg.not_before = not_before;
        msg.last_error = (!reason.is_empty()).then(|| reason.to_owned());
        Ok(())
    }

    /// See [`crate::Store::mark_quota`].
    pub fn mark_quota(&mut self, id: OutboundId, not_before: u64) -> Result<(), StoreError> {
        let msg = self.in_flight(id, "mark quota")?;
        msg.state = MessageState::Queued;
        msg.not_before = not_before;
        msg.last_error = Some("quota exceeded".to_owned());
        let queue = msg.queue.clone();
        let hold = self.holds.entry(queue).or_insert(0);
        *hold = (*hold).max(not_before);
        Ok(())
    }

    /// See [`crate::Batch::set_state`]: unknown ids and finished messages are left alone.
    pub fn set_state(
        &mut self,
        id: OutboundId,
        state: MessageState,
        reason: Option<&str>,
        now: u64,
    ) {
        let Some(msg) = self.msgs.get_mut(&id).filter(|m| m.pending()) else {
            return;
        };
        let reason = reason.map(|r| (!r.is_empty()).then(|| r.to_owned()));
        match state {
            MessageState::Queued => {
                msg.state = MessageState::Queued;
                msg.not_before = 0;
                if let Some(r) = reason {
                    msg.last_error = r;
                }
            }
            MessageState::Sending => {
                msg.state = MessageState::Sending;
                msg.attempts = msg.attempts.saturating_add(1);
            }
            MessageState::Sent | MessageState::Failed => {
                if state == MessageState::Failed
                    && let Some(r) = reason
                {
                    msg.last_error = r;
                }
                msg.state = state;
                msg.finished_at = now;
                msg.payload.clear();
            }
        }
    }

    /// See [`crate::Store::expire`]; results are in order of expiry time, then id.
    pub fn expire(&mut self, now: u64) -> Vec<Expired> {
        let mut due: Vec<(u64, OutboundId)> = self
            .msgs
            .iter()
            .filter(|(_, m)| m.state == MessageState::Queued && m.expires_at <= now)
            .map(|(&id, m)| (m.expires_at, id))
            .collect();
        due.sort();
        let mut out = Vec::new();
        for (_, id) in due {
            if let Some(msg) = self.msgs.get_mut(&id) {
                msg.state = MessageState::Failed;
                msg.finished_at = now;
                msg.payload.clear();
                out.push(Expired {
                    id,
                    queue: msg.queue.clone(),
                    app: msg.app.clone(),
                    last_error: msg.last_error.clone(),
                });
            }
        }
        out
    }

    /// See [`crate::Store::state`].
    pub fn state(&self, id: OutboundId) -> Option<MessageStatus> {
        self.msgs.get(&id).map(|m| MessageStatus {
            state: m.state,
            attempts: m.attempts,
            not_before: m.not_before,
            expires_at: m.expires_at,
            last_error: m.last_error.clone(),
            app: m.app.clone(),
            queue: m.queue.clone(),
        })
    }

    /// See [`crate::Store::unfinished`].
    pub fn unfinished(&self) -> Vec<Unfinished> {
        self.msgs
            .iter()
            .filter(|(_, m)| m.pending())
            .map(|(&id, m)| Unfinished {
                id,
                queue: m.queue.clone(),
                app: m.app.clone(),
                payload: m.payload.clone(),
                state: m.state,
                attempts: m.attempts,
                not_before: m.not_before,
                expires_at: m.expires_at,
                last_error: m.last_error.clone(),
            })
            .collect()
    }

    /// See [`crate::Store::pending_count`].
    pub fn pending_count(&self, server: &str) -> u64 {
        self.msgs
            .values()
            .filter(|m| m.pending() && m.queue.server == server)
            .count() as u64
    }

    /// See [`crate::Store::queues`].
    pub fn queues(&self) -> Vec<QueueSummary> {
        let mut by_queue: BTreeMap<QueueRef, QueueSummary> = BTreeMap::new();
        for m in self.msgs.values().filter(|m| m.pending()) {
            let s = by_queue
                .entry(m.queue.clone())
                .or_insert_with(|| QueueSummary {
                    queue: m.queue.clone(),
                    queued: 0,
                    in_flight: 0,
                    ready_at: None,
                });
            if m.state == MessageState::Sending {
                s.in_flight += 1;
            } else {
                if s.queued == 0 {
                    let hold = self.holds.get(&m.queue).copied().unwrap_or(0);
                    s.ready_at = Some(m.not_before.max(hold));
                }
                s.queued += 1;
            }
        }
        by_queue.into_values().collect()
    }

    /// See [`crate::Store::prune_finished`].
    pub fn prune_finished(&mut self, before: u64) -> usize {
        let n = self.msgs.len();
        self.msgs
            .retain(|_, m| m.pending() || m.finished_at >= before);
        n - self.msgs.len()
    }

    /// What a close and reopen of the real store does: leases are forgotten.
    pub fn restart(&mut self) {
        for m in self.msgs.values_mut() {
            if m.state == MessageState::Sending {
                m.state = MessageState::Queued;
            }
        }
    }
}
