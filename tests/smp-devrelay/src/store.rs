//! Queues, their messages and who is subscribed to them (spec §5.1–§5.4).
//!
//! One [`Store`] is shared by every connection of a relay behind a single mutex: every
//! operation is short and synchronous (a lookup, a push, at most one crypto_box of a MSG
//! body), so a connection never holds the lock across an await. Events for *other*
//! connections (END, DELD, pushed MSGs) go out through each connection's event channel while
//! the lock is held, which keeps them ordered with the state change that caused them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use muxd_smp::command::{QueueIds, QueueMode, Response};
use muxd_smp::e2e::{RcvMsgBody, encrypt_msg_body};
use muxd_smp::error::{CmdError, ErrorType};
use muxd_smp::keys::{DhSecret, PublicKey, X25519PublicKey, X25519SecretKey};
use rand_core::{CryptoRng, RngCore};
use tokio::sync::mpsc;

use crate::store_log::{Record, StoreLog};

/// Length of the queue, notifier and message ids this relay generates (as default servers).
pub(crate) const ID_LEN: usize = 24;

/// A server event for one connection: `(entityId, response)`, sent with an empty corrId.
///
/// Unbounded on purpose: per subscribed queue at most one MSG (one unacknowledged message at
/// a time) plus one END/DELD can be queued, so the backlog is bounded by the connection's
/// subscriptions, and the store never has to wait under its lock.
pub(crate) type EventTx = mpsc::UnboundedSender<(Vec<u8>, Response)>;

/// Identifies one client connection inside the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnId(u64);

/// How a connection holds a queue: SUB (pushed delivery) or GET (polling); never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubKind {
    Sub,
    Get,
}

#[derive(Debug)]
struct ConnSub {
    kind: SubKind,
    /// The message delivered on this connection and not acknowledged yet.
    delivered: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct StoredMsg {
    msg_id: Vec<u8>,
    body: RcvMsgBody,
}

#[derive(Debug)]
struct Notifier {
    id: Vec<u8>,
    key: PublicKey,
}

#[derive(Debug)]
struct Queue {
    rcv_id: Vec<u8>,
    snd_id: Vec<u8>,
    rcv_key: PublicKey,
    /// X25519(srvDhPriv, rcvDhPub): the MSG body secret (§5.4).
    rcv_dh_secret: DhSecret,
    snd_key: Option<PublicKey>,
    mode: Option<QueueMode>,
    active: bool,
    notifier: Option<Notifier>,
    msgs: VecDeque<StoredMsg>,
    /// Cleared when the quota marker is written; set again once the queue is drained.
    can_write: bool,
    subs: BTreeMap<ConnId, ConnSub>,
}

impl Queue {
    fn subscriber(&self) -> Option<ConnId> {
        self.subs
            .iter()
            .find(|(_, s)| s.kind == SubKind::Sub)
            .map(|(c, _)| *c)
    }
}

#[derive(Debug)]
struct ConnEntry {
    events: EventTx,
    /// Queues with an entry for this connection in their `subs`.
    queues: BTreeSet<Vec<u8>>,
}

/// What NEW asks for, after its keys were parsed.
#[derive(Debug)]
pub(crate) struct NewQueueRequest {
    pub(crate) rcv_key: PublicKey,
    pub(crate) rcv_dh_key: X25519PublicKey,
    pub(crate) mode: Option<QueueMode>,
    pub(crate) subscribe: bool,
    pub(crate) ntf: Option<(PublicKey, X25519PublicKey)>,
}

/// Who may authorize commands on a queue, as seen by the sender side.
#[derive(Debug, Clone)]
pub(crate) struct SenderView {
    pub(crate) snd_key: Option<PublicKey>,
    pub(crate) active: bool,
}

/// The shared queue store.
#[derive(Debug)]
pub(crate) struct Store {
    inner: Mutex<StoreInner>,
}

impl Store {
    pub(crate) fn new(quota: usize, log: Option<StoreLog>) -> Self {
        Self {
            inner: Mutex::new(StoreInner {
                queues: BTreeMap::new(),
                by_snd: BTreeMap::new(),
                by_ntf: BTreeMap::new(),
                conns: BTreeMap::new(),
                next_conn: 0,
                quota: quota.max(1),
                log,
            }),
        }
    }

    /// Locks the store. A panic in another connection while holding the lock leaves the
    /// data consistent enough for a dev relay, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The store's state; all queue operations are methods here, called under the lock.
#[derive(Debug)]
pub(crate) struct StoreInner {
    queues: BTreeMap<Vec<u8>, Queue>,
    by_snd: BTreeMap<Vec<u8>, Vec<u8>>,
    by_ntf: BTreeMap<Vec<u8>, Vec<u8>>,
    conns: BTreeMap<ConnId, ConnEntry>,
    next_conn: u64,
    quota: usize,
    log: Option<StoreLog>,
}

impl StoreInner {
    pub(crate) fn register(&mut self, events: EventTx) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.conns.insert(
            id,
            ConnEntry {
                events,
                queues: BTreeSet::new(),
            },
        );
        id
    }

    /// Forgets a closed connection: its subscriptions end and delivered messages stay in the
    /// queue for the next subscriber.
    pub(crate) fn unregister(&mut self, conn: ConnId) {
        if let Some(entry) = self.conns.remove(&conn) {
            for rcv_id in entry.queues {
                if let Some(q) = self.queues.get_mut(&rcv_id) {
                    q.subs.remove(&conn);
                }
            }
        }
    }

    /// Starts logging changes (after a replay).
    pub(crate) fn set_log(&mut self, log: StoreLog) {
        self.log = Some(log);
    }

    /// Number of queues with a SUB subscriber on some connection.
    pub(crate) fn subscriber_count(&self) -> usize {
        self.queues
            .values()
            .filter(|q| q.subscriber().is_some())
            .count()
    }

    /// Number of queues.
    pub(crate) fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether `conn` holds any SUB subscription (connections without one may be closed when
    /// idle).
    pub(crate) fn has_subscriptions(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|e| {
            e.queues.iter().any(|id| {
                self.queues
                    .get(id)
                    .and_then(|q| q.subs.get(&conn))
                    .is_some_and(|s| s.kind == SubKind::Sub)
            })
        })
    }

    pub(crate) fn recipient_key(&self, rcv_id: &[u8]) -> Option<PublicKey> {
        self.queues.get(rcv_id).map(|q| q.rcv_key.clone())
    }

    pub(crate) fn sender_view(&self, snd_id: &[u8]) -> Option<SenderView> {
        let q = self.queues.get(self.by_snd.get(snd_id)?)?;
        Some(SenderView {
            snd_key: q.snd_key.clone(),
            active: q.active,
        })
    }

    pub(crate) fn notifier_key(&self, ntf_id: &[u8]) -> Option<PublicKey> {
        let q = self.queues.get(self.by_ntf.get(ntf_id)?)?;
        q.notifier.as_ref().map(|n| n.key.clone())
    }

    /// NEW: creates the queue with fresh random ids and server DH key(s).
    pub(crate) fn create<R: RngCore + CryptoRng>(
        &mut self,
        conn: ConnId,
        req: NewQueueRequest,
        rng: &mut R,
    ) -> QueueIds {
        let rcv_id = self.fresh_id(rng);
        let snd_id = self.fresh_id(rng);
        let srv_dh = X25519SecretKey::generate(rng);
        let rcv_dh_secret = srv_dh.diffie_hellman(&req.rcv_dh_key);
        let queue = Queue {
            rcv_id: rcv_id.clone(),
            snd_id: snd_id.clone(),
            rcv_key: req.rcv_key,
            rcv_dh_secret,
            snd_key: None,
            mode: req.mode,
            active: true,
            notifier: None,
            msgs: VecDeque::new(),
            can_write: true,
            subs: BTreeMap::new(),
        };
        self.append(|| Record::new_queue(&queue));
        self.by_snd.insert(snd_id.clone(), rcv_id.clone());
        self.queues.insert(rcv_id.clone(), queue);
        let ntf_creds = req
            .ntf
            .map(|(key, dh)| self.set_notifier(&rcv_id, key, &dh, rng));
        if req.subscribe {
            self.attach(conn, &rcv_id, SubKind::Sub);
        }
        QueueIds {
            rcv_id,
            snd_id,
            srv_dh_key: srv_dh.public_key().to_spki(),
            queue_mode: req.mode,
            link_id: None,
            service_id: None,
            ntf_creds,
        }
    }

    fn fresh_id<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Vec<u8> {
        loop {
            let mut id = vec![0u8; ID_LEN];
            rng.fill_bytes(&mut id);
            if !self.queues.contains_key(&id)
                && !self.by_snd.contains_key(&id)
                && !self.by_ntf.contains_key(&id)
            {
                return id;
            }
        }
    }

    fn attach(&mut self, conn: ConnId, rcv_id: &[u8], kind: SubKind) {
        if let Some(q) = self.queues.get_mut(rcv_id) {
            q.subs.insert(
                conn,
                ConnSub {
                    kind,
                    delivered: None,
                },
            );
        }
        if let Some(e) = self.conns.get_mut(&conn) {
            e.queues.insert(rcv_id.to_vec());
        }
    }

    fn detach(&mut self, conn: ConnId, rcv_id: &[u8]) {
        if let Some(q) = self.queues.get_mut(rcv_id) {
            q.subs.remove(&conn);
        }
        if let Some(e) = self.conns.get_mut(&conn) {
            e.queues.remove(rcv_id);
        }
    }

    fn notify(&self, conn: ConnId, entity: &[u8], response: Response) {
        if let Some(e) = self.conns.get(&conn) {
            // A closed receiver means the connection is going away; its subscriptions are
            // dropped by `unregister`, so losing the event is correct.
            let _ = e.events.send((entity.to_vec(), response));
        }
    }

    /// SUB: makes `conn` the queue's only subscriber; the previous one gets END. Returns the
    /// message to push after the SOK, if one is waiting.
    pub(crate) fn subscribe(
        &mut self,
        conn: ConnId,
        rcv_id: &[u8],
    ) -> Result<Option<Response>, ErrorType> {
        let q = self.queues.get(rcv_id).ok_or(ErrorType::Auth)?;
        match q.subs.get(&conn).map(|s| s.kind) {
            Some(SubKind::Get) => return Err(ErrorType::Cmd(CmdError::Prohibited)),
            Some(SubKind::Sub) => {}
            None => {
                if let Some(previous) = q.subscriber() {
                    self.detach(previous, rcv_id);
                    self.notify(previous, rcv_id, Response::End);
                }
                self.attach(conn, rcv_id, SubKind::Sub);
            }
        }
        // A re-SUB re-delivers the unacknowledged message, as the reference server does.
        Ok(self.deliver_head(conn, rcv_id))
    }

    /// Marks the queue's first message delivered to `conn` and returns it as MSG.
    fn deliver_head(&mut self, conn: ConnId, rcv_id: &[u8]) -> Option<Response> {
        let q = self.queues.get_mut(rcv_id)?;
        let head = q.msgs.front()?.clone();
        let sub = q.subs.get_mut(&conn)?;
        sub.delivered = Some(head.msg_id.clone());
        match encrypt_msg_body(&q.rcv_dh_secret, &head.msg_id, &head.body) {
            Ok(body) => Some(Response::Msg {
                msg_id: head.msg_id,
                body,
            }),
            Err(e) => {
                // Bodies are limited on SEND, so this is unreachable in practice.
                tracing::error!(error = %e, "MSG body encryption failed");
                None
            }
        }
    }

    /// GET: the first message (marked delivered) or `None` for an empty queue.
    pub(crate) fn get(&mut self, conn: ConnId, rcv_id: &[u8]) -> Result<Response, ErrorType> {
        let q = self.queues.get(rcv_id).ok_or(ErrorType::Auth)?;
        match q.subs.get(&conn).map(|s| s.kind) {
            Some(SubKind::Sub) => return Err(ErrorType::Cmd(CmdError::Prohibited)),
            Some(SubKind::Get) => {}
            None => self.attach(conn, rcv_id, SubKind::Get),
        }
        Ok(self.deliver_head(conn, rcv_id).unwrap_or(Response::Ok))
    }

    /// ACK: removes the delivered message; a subscriber gets the next one as the answer.
    pub(crate) fn ack(
        &mut self,
        conn: ConnId,
        rcv_id: &[u8],
        msg_id: &[u8],
    ) -> Result<Response, ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        let sub = q.subs.get_mut(&conn).ok_or(ErrorType::NoMsg)?;
        let delivered = sub.delivered.clone().ok_or(ErrorType::NoMsg)?;
        // An empty msgId acknowledges whatever was delivered.
        if !msg_id.is_empty() && msg_id != delivered.as_slice() {
            return Err(ErrorType::NoMsg);
        }
        sub.delivered = None;
        let kind = sub.kind;
        if q.msgs.front().is_some_and(|m| m.msg_id == delivered) {
            q.msgs.pop_front();
            if q.msgs.is_empty() {
                q.can_write = true;
            }
            let rcv = q.rcv_id.clone();
            self.append(|| Record::Ack {
                rcv_id: rcv,
                msg_id: delivered,
            });
        }
        Ok(match kind {
            SubKind::Sub => self.deliver_head(conn, rcv_id).unwrap_or(Response::Ok),
            SubKind::Get => Response::Ok,
        })
    }

    /// SEND: stores the message (or the quota marker) and pushes it to an idle subscriber.
    pub(crate) fn send<R: RngCore + CryptoRng>(
        &mut self,
        snd_id: &[u8],
        notification: bool,
        body: Vec<u8>,
        now_unix: i64,
        rng: &mut R,
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
        // The reference server writes while `canWrite || empty`; the write that would exceed
        // the quota stores the QUOTA marker instead and turns writing off until drained.
        if !(q.can_write || was_empty) {
            return Err(ErrorType::Quota);
        }
        let (stored, result) = if q.msgs.len() < quota {
            let body = RcvMsgBody::Message {
                ts: now_unix,
                notification,
                body,
            };
            (StoredMsg { msg_id, body }, Ok(()))
        } else {
            q.can_write = false;
            let body = RcvMsgBody::Quota { ts: now_unix };
            (StoredMsg { msg_id, body }, Err(ErrorType::Quota))
        };
        q.msgs.push_back(stored.clone());
        let subscriber = q.subscriber();
        self.append(|| Record::message(&rcv_id, &stored));
        if was_empty && let Some(conn) = subscriber {
            let idle = self
                .queues
                .get(&rcv_id)
                .and_then(|q| q.subs.get(&conn))
                .is_some_and(|s| s.delivered.is_none());
            if idle && let Some(msg) = self.deliver_head(conn, &rcv_id) {
                self.notify(conn, &rcv_id, msg);
            }
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
                q.snd_key = Some(key.clone());
                let rcv = q.rcv_id.clone();
                self.append(|| Record::secure(rcv, &key));
                Ok(())
            }
        }
    }

    /// Maps a sender id to its recipient id and queue mode.
    pub(crate) fn by_sender(&self, snd_id: &[u8]) -> Option<(Vec<u8>, Option<QueueMode>)> {
        let rcv_id = self.by_snd.get(snd_id)?;
        let q = self.queues.get(rcv_id)?;
        Some((rcv_id.clone(), q.mode))
    }

    /// OFF: suspends the queue (senders get AUTH); idempotent.
    pub(crate) fn suspend(&mut self, rcv_id: &[u8]) -> Result<(), ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        if q.active {
            q.active = false;
            let rcv = q.rcv_id.clone();
            self.append(|| Record::Off { rcv_id: rcv });
        }
        Ok(())
    }

    /// DEL: removes the queue; a subscriber on another connection gets DELD (END below v10,
    /// by the encoder's down-grade).
    pub(crate) fn delete(&mut self, conn: ConnId, rcv_id: &[u8]) -> Result<(), ErrorType> {
        let q = self.queues.remove(rcv_id).ok_or(ErrorType::Auth)?;
        self.by_snd.remove(&q.snd_id);
        if let Some(n) = &q.notifier {
            self.by_ntf.remove(&n.id);
        }
        for (other, sub) in &q.subs {
            if let Some(e) = self.conns.get_mut(other) {
                e.queues.remove(rcv_id);
            }
            if *other != conn && sub.kind == SubKind::Sub {
                self.notify(*other, rcv_id, Response::Deld);
            }
        }
        self.append(|| Record::Del {
            rcv_id: rcv_id.to_vec(),
        });
        Ok(())
    }

    /// NKEY: sets (or replaces) the notifier credentials; returns `(notifierId, srvNtfDhKey)`.
    pub(crate) fn set_notifier<R: RngCore + CryptoRng>(
        &mut self,
        rcv_id: &[u8],
        key: PublicKey,
        _dh: &X25519PublicKey,
        rng: &mut R,
    ) -> (Vec<u8>, Vec<u8>) {
        // NMSG is not sent by this relay, so the notifier DH secret is not kept.
        let id = self.fresh_id(rng);
        let srv = X25519SecretKey::generate(rng);
        if let Some(q) = self.queues.get_mut(rcv_id) {
            if let Some(old) = q.notifier.take() {
                self.by_ntf.remove(&old.id);
            }
            q.notifier = Some(Notifier {
                id: id.clone(),
                key,
            });
            self.by_ntf.insert(id.clone(), rcv_id.to_vec());
        }
        (id, srv.public_key().to_spki())
    }

    /// NDEL: removes the notifier credentials.
    pub(crate) fn delete_notifier(&mut self, rcv_id: &[u8]) -> Result<(), ErrorType> {
        let q = self.queues.get_mut(rcv_id).ok_or(ErrorType::Auth)?;
        if let Some(old) = q.notifier.take() {
            self.by_ntf.remove(&old.id);
        }
        Ok(())
    }

    /// QUE: the reference server's debug JSON (`qiSnd`, `qiNtf`, `qiSub`, `qiSize`, `qiMsg`).
    pub(crate) fn info(&self, conn: ConnId, rcv_id: &[u8]) -> Result<Vec<u8>, ErrorType> {
        let q = self.queues.get(rcv_id).ok_or(ErrorType::Auth)?;
        let sub = q.subs.get(&conn).map(|s| {
            serde_json::json!({
                "qSubThread": match s.kind { SubKind::Sub => "subscribed", SubKind::Get => "prohibited" },
                "qDelivered": s.delivered.as_deref().map(muxd_smp::encoding::base64url_encode),
            })
        });
        let msg = q.msgs.front().map(|m| {
            let (ts, kind) = match &m.body {
                RcvMsgBody::Quota { ts } => (*ts, "quota"),
                RcvMsgBody::Message { ts, .. } => (*ts, "message"),
                _ => (0, "message"),
            };
            serde_json::json!({
                "msgId": muxd_smp::encoding::base64url_encode(&m.msg_id),
                "msgTs": ts,
                "msgType": kind,
            })
        });
        let info = serde_json::json!({
            "qiSnd": q.snd_key.is_some(),
            "qiNtf": q.notifier.is_some(),
            "qiSub": sub,
            "qiSize": q.msgs.len(),
            "qiMsg": msg,
        });
        serde_json::to_vec(&info).map_err(|_| ErrorType::Internal)
    }

    fn append(&mut self, record: impl FnOnce() -> Record) {
        if let Some(log) = &mut self.log {
            log.append(&record());
        }
    }

    /// Rebuilds the state from a store log (before any connection exists).
    pub(crate) fn replay(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::New {
                    rcv_id,
                    snd_id,
                    rcv_key,
                    rcv_dh_secret,
                    snd_key,
                    mode,
                } => {
                    let (Ok(rcv_key), Ok(secret)) = (
                        PublicKey::from_spki(&rcv_key),
                        <[u8; 32]>::try_from(rcv_dh_secret.as_slice()),
                    ) else {
                        tracing::warn!("store log: unusable queue record skipped");
                        continue;
                    };
                    self.by_snd.insert(snd_id.clone(), rcv_id.clone());
                    self.queues.insert(
                        rcv_id.clone(),
                        Queue {
                            rcv_id,
                            snd_id,
                            rcv_key,
                            rcv_dh_secret: DhSecret::from_bytes(secret),
                            snd_key: snd_key.and_then(|k| PublicKey::from_spki(&k).ok()),
                            mode: mode.map(|m| {
                                if m == 'C' {
                                    QueueMode::Contact
                                } else {
                                    QueueMode::Messaging
                                }
                            }),
                            active: true,
                            notifier: None,
                            msgs: VecDeque::new(),
                            can_write: true,
                            subs: BTreeMap::new(),
                        },
                    );
                }
                Record::Secure { rcv_id, snd_key } => {
                    if let Some(q) = self.queues.get_mut(&rcv_id) {
                        q.snd_key = PublicKey::from_spki(&snd_key).ok();
                    }
                }
                Record::Off { rcv_id } => {
                    if let Some(q) = self.queues.get_mut(&rcv_id) {
                        q.active = false;
                    }
                }
                Record::Del { rcv_id } => {
                    if let Some(q) = self.queues.remove(&rcv_id) {
                        self.by_snd.remove(&q.snd_id);
                    }
                }
                Record::Msg {
                    rcv_id,
                    msg_id,
                    ts,
                    notification,
                    body,
                } => {
                    if let Some(q) = self.queues.get_mut(&rcv_id) {
                        let body = match notification {
                            Some(notification) => RcvMsgBody::Message {
                                ts,
                                notification,
                                body,
                            },
                            None => {
                                q.can_write = false;
                                RcvMsgBody::Quota { ts }
                            }
                        };
                        q.msgs.push_back(StoredMsg { msg_id, body });
                    }
                }
                Record::Ack { rcv_id, msg_id } => {
                    if let Some(q) = self.queues.get_mut(&rcv_id) {
                        q.msgs.retain(|m| m.msg_id != msg_id);
                        if q.msgs.is_empty() {
                            q.can_write = true;
                        }
                    }
                }
            }
        }
    }
}

impl Record {
    fn new_queue(q: &Queue) -> Self {
        Self::New {
            rcv_id: q.rcv_id.clone(),
            snd_id: q.snd_id.clone(),
            rcv_key: q.rcv_key.to_spki(),
            rcv_dh_secret: q.rcv_dh_secret.as_bytes().to_vec(),
            snd_key: q.snd_key.as_ref().map(PublicKey::to_spki),
            mode: q.mode.map(|m| match m {
                QueueMode::Contact => 'C',
                _ => 'M',
            }),
        }
    }

    fn secure(rcv_id: Vec<u8>, key: &PublicKey) -> Self {
        Self::Secure {
            rcv_id,
            snd_key: key.to_spki(),
        }
    }

    fn message(rcv_id: &[u8], m: &StoredMsg) -> Self {
        let (ts, notification, body) = match &m.body {
            RcvMsgBody::Message {
                ts,
                notification,
                body,
            } => (*ts, Some(*notification), body.clone()),
            RcvMsgBody::Quota { ts } => (*ts, None, Vec::new()),
            _ => (0, None, Vec::new()),
        };
        Self::Msg {
            rcv_id: rcv_id.to_vec(),
            msg_id: m.msg_id.clone(),
            ts,
            notification,
            body,
        }
    }
}
