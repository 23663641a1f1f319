//! Queues in memory: ids, keys, messages, and which client link is subscribed (§9.1, §9.5).
//!
//! One [`Store`] per relay behind a mutex. Every operation is short and synchronous, so no
//! link holds the lock across an await. Events for *other* links (END, DELD, pushed MSG) are
//! sent into that link's channel while the lock is held, which keeps them in order with the
//! state change that caused them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use muxd_smp::command::{QueueIds, QueueMode, Response};
use muxd_smp::e2e::{RcvMsgBody, encrypt_msg_body};
use muxd_smp::error::{CmdError, ErrorType};
use muxd_smp::keys::{DhSecret, PublicKey, X25519PublicKey, X25519SecretKey};
use rand_core::{CryptoRng, RngCore};
use tokio::sync::mpsc;

use crate::commands::Reply;

/// Queue and message ids are 24 random bytes (§8.1).
pub(crate) const ID_LEN: usize = 24;

/// Where a link receives replies produced outside its own command loop.
pub(crate) type ReplyTx = mpsc::UnboundedSender<Reply>;

/// One accepted client link inside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnId(u64);

/// How a link holds a queue: pushed delivery (SUB) or polling (GET), never both (§9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Sub,
    Get,
}

#[derive(Debug)]
struct Holder {
    hold: Hold,
    /// The message delivered on this link and not acknowledged yet.
    delivered: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct StoredMsg {
    msg_id: Vec<u8>,
    body: RcvMsgBody,
}

#[derive(Debug)]
struct Queue {
    snd_id: Vec<u8>,
    rcv_key: PublicKey,
    /// X25519(srvDhPriv, rcvDhPub): the MSG body secret.
    rcv_dh_secret: DhSecret,
    snd_key: Option<PublicKey>,
    mode: QueueMode,
    active: bool,
    msgs: VecDeque<StoredMsg>,
    /// Cleared when the QUOTA marker was stored; set again once the queue is drained.
    can_write: bool,
    holders: BTreeMap<ConnId, Holder>,
}

impl Queue {
    fn subscriber(&self) -> Option<ConnId> {
        self.holders
            .iter()
            .find(|(_, h)| h.hold == Hold::Sub)
            .map(|(c, _)| *c)
    }
}

#[derive(Debug)]
struct ConnEntry {
    tx: ReplyTx,
    /// Queues this link holds (SUB or GET).
    queues: BTreeSet<Vec<u8>>,
    subscriptions: usize,
}

/// What NEW asks for, after its keys were parsed.
#[derive(Debug)]
pub(crate) struct NewQueue {
    pub(crate) rcv_key: PublicKey,
    pub(crate) rcv_dh_key: X25519PublicKey,
    pub(crate) mode: QueueMode,
    pub(crate) subscribe: bool,
}

/// The sender's view of a queue: who may authorize SEND.
#[derive(Debug, Clone)]
pub(crate) struct SenderView {
    pub(crate) rcv_id: Vec<u8>,
    pub(crate) snd_key: Option<PublicKey>,
    pub(crate) mode: QueueMode,
    pub(crate) active: bool,
}

/// The shared queue store.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<StoreInner>,
}

impl Store {
    pub(crate) fn new(quota: usize, max_subscriptions: usize, ttl_secs: i64) -> Self {
        Self {
            inner: Mutex::new(StoreInner {
                queues: BTreeMap::new(),
                by_snd: BTreeMap::new(),
                conns: BTreeMap::new(),
                next_conn: 0,
                quota: quota.max(1),
                max_subscriptions,
                ttl_secs,
            }),
        }
    }

    /// Locks the store. A panic elsewhere while holding the lock cannot leave a queue half
    /// updated in a way later operations trip over, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The store's state; operations are methods here, called under the lock.
#[derive(Debug)]
pub(crate) struct StoreInner {
    queues: BTreeMap<Vec<u8>, Queue>,
    by_snd: BTreeMap<Vec<u8>, Vec<u8>>,
    conns: BTreeMap<ConnId, ConnEntry>,
    next_conn: u64,
    quota: usize,
    max_subscriptions: usize,
    ttl_secs: i64,
}

impl StoreInner {
    /// A client link came up.
    pub(crate) fn register(&mut self, tx: ReplyTx) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.conns.insert(
            id,
            ConnEntry {
                tx,
                queues: BTreeSet::new(),
                subscriptions: 0,
            },
        );
        id
    }

    /// A client link ended: its subscriptions end with it (§9.5); a delivered but
    /// unacknowledged message stays at the head for the next subscriber.
    pub(crate) fn unregister(&mut self, conn: ConnId) {
        if let Some(entry) = self.conns.remove(&conn) {
            for rcv_id in entry.queues {
                if let Some(q) = self.queues.get_mut(&rcv_id) {
                    q.holders.remove(&conn);
                }
            }
        }
    }

    /// The recipient key of a queue, for authorizing recipient commands.
    pub(crate) fn recipient_key(&self, rcv_id: &[u8]) -> Option<PublicKey> {
        self.queues.get(rcv_id).map(|q| q.rcv_key.clone())
    }

    /// The sender side of the queue named by `snd_id`.
    pub(crate) fn sender_view(&self, snd_id: &[u8]) -> Option<SenderView> {
        let rcv_id = self.by_snd.get(snd_id)?;
        let q = self.queues.get(rcv_id)?;
        Some(SenderView {
            rcv_id: rcv_id.clone(),
            snd_key: q.snd_key.clone(),
            mode: q.mode,
            active: q.active,
        })
    }

    /// Whether `conn` may take one more subscription.
    pub(crate) fn can_subscribe(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|e| e.subscriptions < self.max_subscriptions)
    }

    /// NEW: fresh, uncorrelated random ids and a fresh server DH key.
    pub(crate) fn create(
        &mut self,
        conn: ConnId,
        req: NewQueue,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<QueueIds, ErrorType> {
        if req.subscribe && !self.can_subscribe(conn) {
            return Err(ErrorType::Quota);
        }
        let rcv_id = self.fresh_id(rng);
        let snd_id = self.fresh_id(rng);
        let srv_dh = X25519SecretKey::generate(rng);
        let queue = Queue {
            snd_id: snd_id.clone(),
            rcv_key: req.rcv_key,
            rcv_dh_secret: srv_dh.diffie_hellman(&req.rcv_dh_key),
            snd_key: None,
            mode: req.mode,
            active: true,
            msgs: VecDeque::new(),
            can_write: true,
            holders: BTreeMap::new(),
        };
        self.by_snd.insert(snd_id.clone(), rcv_id.clone());
        self.queues.insert(rcv_id.clone(), queue);
        if req.subscribe {
            self.attach(conn, &rcv_id, Hold::Sub);
        }
        Ok(QueueIds {
            rcv_id,
            snd_id,
            srv_dh_key: srv_dh.public_key().to_spki(),
            queue_mode: Some(req.mode),
            link_id: None,
            service_id: None,
            ntf_creds: None,
        })
    }

    fn fresh_id(&self, rng: &mut (impl RngCore + CryptoRng)) -> Vec<u8> {
        loop {
            let mut id = vec![0u8; ID_LEN];
            rng.fill_bytes(&mut id);
            if !self.queues.contains_key(&id) && !self.by_snd.contains_key(&id) {
                return id;
            }
        }
    }

    fn attach(&mut self, conn: ConnId, rcv_id: &[u8], hold: Hold) {
        if let Some(q) = self.queues.get_mut(rcv_id) {
            q.holders.insert(
                conn,
                Holder {
                    hold,
                    delivered: None,
                },
            );
        }
        if let Some(e) = self.conns.get_mut(&conn) {
            e.queues.insert(rcv_id.to_vec());
            if hold == Hold::Sub {
                e.subscriptions += 1;
            }
        }
    }

    fn detach(&mut self, conn: ConnId, rcv_id: &[u8]) {
        let hold = self
            .queues
            .get_mut(rcv_id)
            .and_then(|q| q.holders.remove(&conn))
            .map(|h| h.hold);
        if let Some(e) = self.conns.get_mut(&conn) {
            e.queues.remove(rcv_id);
            if hold == Some(Hold::Sub) {
                e.subscriptions = e.subscriptions.saturating_sub(1);
            }
        }
    }

    /// Queues a transmission for a link outside its own batch (SUB's waiting message).
    pub(crate) fn push_to(&self, conn: ConnId, reply: Reply) {
        if let Some(e) = self.conns.get(&conn) {
            let _ = e.tx.send(reply);
        }
    }

    fn notify(&self, conn: ConnId, rcv_id: &[u8], response: Response) {
        if let Some(e) = self.conns.get(&conn) {
            // A closed receiver is a link going away; `unregister` drops its holds.
            let _ = e.tx.send(Reply::event(rcv_id, response));
        }
    }

    /// SUB: `conn` becomes the only subscriber and the previous one gets END (§9.5).
    /// Returns the MSG to push after `SOK`, if a message is waiting.
    pub(crate) fn subscribe(
        &mut self,
        conn: ConnId,
        rcv_id: &[u8],
        now_unix: i64,
    ) -> Result<Option<Response>, ErrorType> {
        let q = self.queues.get(rcv_id).ok_or(ErrorType::Auth)?;
        match q.holders.get(&conn).map(|h| h.hold) {
            Some(Hold::Get) => return Err(ErrorType::Cmd(CmdError::Prohibited)),
            Some(Hold::Sub) => {}
            None => {
                if !self.can_subscribe(conn) {
                    return Err(ErrorType::Quota);
                }
                if let Some(previous) = q.subscriber() {
                    self.detach(previous, rcv_id);
                    self.notify(previous, rcv_id, Response::End);
                }
                self.attach(conn, rcv_id, Hold::Sub);
            }
        }
        // A repeated SUB re-delivers the unacknowledged message, as SMP servers do.
        Ok(self.deliver_head(conn, rcv_id, now_unix))
    }

    /// Marks the head message delivered to `conn` and returns it as MSG; expired messages at
    /// the head are dropped first.
    fn deliver_head(&mut self, conn: ConnId, rcv_id: &[u8], now_unix: i64) -> Option<Response> {
        let ttl = self.ttl_secs;
        let q = self.queues.get_mut(rcv_id)?;
        while q
            .msgs
            .front()
            .is_some_and(|m| msg_ts(&m.body) + ttl < now_unix)
        {
            q.msgs.pop_front();
        }
        if q.msgs.is_empty() {
            q.can_write = true;
        }
        let head = q.msgs.front()?.clone();
        let holder = q.holders.get_mut(&conn)?;
        holder.delivered = Some(head.msg_id.clone());
        match encrypt_msg_body(&q.rcv_dh_secret, &head.msg_id, &head.body) {
            Ok(body) => Some(Response::Msg {
                msg_id: head.msg_id,
                body,
            }),
            Err(e) => {
                // SEND bounds bodies, so this is unreachable short of a codec bug.
                tracing::error!(error = %e, "MSG body encryption failed");
                None
            }
        }
    }

    /// GET: the head message (marked delivered), or OK for an empty queue.
    pub(crate) fn get(
        &mut self,
        conn: ConnId,
        rcv_id: &[u8],
        now_unix: i64,
    ) -> Result<Response, ErrorType> {
        let q = self.queues.get(rcv_id).ok_or(ErrorType::Auth)?;
        match q.holders.get(&conn).map(|h| h.hold) {
            Some(Hold::Sub) => return Err(ErrorType::Cmd(CmdError::Prohibited)),
            Some(Hold::Get) => {}
            None => self.attach(conn, rcv_id, Hold::Get),
        }
        Ok(self
            .deliver_head(conn, rcv_id, now_unix)
            .unwrap_or(Response::Ok))
    }

    /// ACK: drops the delivered message; a subscriber gets the next one as the answer.
    pub(crate) fn ack(
        &mut self,
        conn: ConnId,
        rcv_id: &[u8],
        msg_id: &[u8],
        now_unix: i64,
    ) -> Result<Response, ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        let holder = q.holders.get_mut(&conn).ok_or(ErrorType::NoMsg)?;
        let delivered = holder.delivered.clone().ok_or(ErrorType::NoMsg)?;
        // An empty msgId acknowledges whatever was delivered (§9.1).
        if !msg_id.is_empty() && msg_id != delivered.as_slice() {
            return Err(ErrorType::NoMsg);
        }
        holder.delivered = None;
        let hold = holder.hold;
        if q.msgs.front().is_some_and(|m| m.msg_id == delivered) {
            q.msgs.pop_front();
            if q.msgs.is_empty() {
                q.can_write = true;
            }
        }
        Ok(match hold {
            Hold::Sub => self
                .deliver_head(conn, rcv_id, now_unix)
                .unwrap_or(Response::Ok),
            Hold::Get => Response::Ok,
        })
    }

    /// SEND: stores the message (or the QUOTA marker) and pushes it to an idle subscriber.
    pub(crate) fn send(
        &mut self,
        snd_id: &[u8],
        notification: bool,
        body: Vec<u8>,
        now_unix: i64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), ErrorType> {
        let rcv_id = self.by_snd.get(snd_id).cloned().ok_or(ErrorType::Auth)?;
        let quota = self.quota;
        let mut msg_id = vec![0u8; ID_LEN];
        rng.fill_bytes(&mut msg_id);
        let q = self.queues.get_mut(&rcv_id).ok_or(ErrorType::Auth)?;
        if !q.active {
            return Err(ErrorType::Auth);
        }
        let was_empty = q.msgs.is_empty();
        if !(q.can_write || was_empty) {
            return Err(ErrorType::Quota);
        }
        // The write that would exceed the quota stores a QUOTA marker instead, so the
        // recipient learns that messages were refused (SMP semantics).
        let (body, result) = if q.msgs.len() < quota {
            let b = RcvMsgBody::Message {
                ts: now_unix,
                notification,
                body,
            };
            (b, Ok(()))
        } else {
            q.can_write = false;
            (RcvMsgBody::Quota { ts: now_unix }, Err(ErrorType::Quota))
        };
        q.msgs.push_back(StoredMsg { msg_id, body });
        let idle_subscriber = q
            .subscriber()
            .filter(|c| q.holders.get(c).is_some_and(|h| h.delivered.is_none()));
        if was_empty
            && let Some(conn) = idle_subscriber
            && let Some(msg) = self.deliver_head(conn, &rcv_id, now_unix)
        {
            self.notify(conn, &rcv_id, msg);
        }
        result
    }

    /// KEY / SKEY: sets the sender key; the same key again is fine, another one is AUTH.
    pub(crate) fn secure(&mut self, rcv_id: &[u8], key: PublicKey) -> Result<(), ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        match &q.snd_key {
            Some(k) if *k == key => Ok(()),
            Some(_) => Err(ErrorType::Auth),
            None => {
                q.snd_key = Some(key);
                Ok(())
            }
        }
    }

    /// OFF: suspends the queue (senders get AUTH); idempotent.
    pub(crate) fn suspend(&mut self, rcv_id: &[u8]) -> Result<(), ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        q.active = false;
        Ok(())
    }

    /// DEL: removes the queue; a subscriber on another link gets DELD.
    pub(crate) fn delete(&mut self, conn: ConnId, rcv_id: &[u8]) -> Result<(), ErrorType> {
        let q = self.queues.remove(rcv_id).ok_or(ErrorType::Auth)?;
        self.by_snd.remove(&q.snd_id);
        for (other, h) in &q.holders {
            if let Some(e) = self.conns.get_mut(other) {
                e.queues.remove(rcv_id);
                if h.hold == Hold::Sub {
                    e.subscriptions = e.subscriptions.saturating_sub(1);
                }
            }
            if *other != conn && h.hold == Hold::Sub {
                self.notify(*other, rcv_id, Response::Deld);
            }
        }
        Ok(())
    }
}

fn msg_ts(b: &RcvMsgBody) -> i64 {
    match b {
        RcvMsgBody::Message { ts, .. } | RcvMsgBody::Quota { ts } => *ts,
        // Unknown future kinds never expire here; they are not produced by this relay.
        _ => i64::MAX / 2,
    }
}
