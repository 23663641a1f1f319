//! A scripted SMP server built from the profile's own codecs (server side).
//!
//! It keeps queues, messages and subscriptions like a real relay, answers in batches, and
//! has switches for the misbehaviour tests need (silence, lost ACKs, a wrong identity, a
//! garbled ServerHello). It does no IO: the harness moves its blocks.

use std::collections::{BTreeMap, VecDeque};

use muxd_core::TransportInfo;
use muxd_smp::block::{BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::cert::{self, CertPublicKey, KeyHash, SignatureAlgorithm};
use muxd_smp::command::{Command, QueueIds, QueueMode, QueueRequest, Response, SubscriptionMode};
use muxd_smp::crypto::{BlockCipher, ed25519_verify};
use muxd_smp::e2e::{RcvMsgBody, encrypt_msg_body};
use muxd_smp::error::{CmdError, ErrorType};
use muxd_smp::handshake::{CertKey, ClientHello, ServerHello, VersionRange};
use muxd_smp::keys::{
    DhSecret, Ed25519PublicKey, Ed25519SecretKey, X25519PublicKey, X25519SecretKey,
};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// The host every test server answers for.
pub const HOST: &str = "relay.test";

/// A command the server received, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The server-side connection it came on.
    pub conn: u64,
    /// The command tag (`NEW`, `SEND`, ...).
    pub tag: &'static str,
    /// Its entity id.
    pub entity: Vec<u8>,
    /// Whether it carried an authorization.
    pub signed: bool,
}

#[derive(Debug)]
struct SConn {
    session_id: Vec<u8>,
    version: u16,
    cipher: Option<BlockCipher>,
    hello_done: bool,
    open: bool,
}

/// One queue as the server stores it.
#[derive(Debug)]
pub struct SQueue {
    rcv_key: Ed25519PublicKey,
    dh_secret: DhSecret,
    /// The sender id.
    pub snd_id: Vec<u8>,
    /// The key the queue is secured with.
    pub snd_key: Option<Ed25519PublicKey>,
    messaging: bool,
    /// `(msgId, body)`, oldest first.
    pub msgs: VecDeque<(Vec<u8>, RcvMsgBody)>,
    /// The head has been sent to the subscriber and not ACKed.
    delivered: bool,
    /// The connection subscribed to it.
    pub subscriber: Option<u64>,
    /// The "queue full" marker is stored.
    pub quota_marked: bool,
}

/// The scripted server.
#[derive(Debug)]
pub struct FakeServer {
    /// The highest version offered in ServerHello.
    pub max_version: u16,
    /// The host name its address names.
    pub host: String,
    rng: ChaCha20Rng,
    tls_leaf: Ed25519SecretKey,
    session_key: X25519SecretKey,
    chain: Vec<Vec<u8>>,
    conns: BTreeMap<u64, SConn>,
    next_conn: u64,
    pub queues: BTreeMap<Vec<u8>, SQueue>,
    /// Every command received, in order.
    pub seen: Vec<Seen>,
    /// SENDs stored (answered `OK`), copies of a resent message included.
    pub stored: usize,
    /// Messages a queue holds before `ERR QUOTA`.
    pub quota: usize,
    /// While set, blocks are taken in but not processed (a server that went silent).
    pub stalled: bool,
    /// While set, messages are stored but not delivered (the recipient is not reading).
    pub hold_deliveries: bool,
    /// While set, ACKs are ignored and not answered (as if lost on the way).
    pub ignore_acks: bool,
    /// Present a certificate chain whose identity is not the address's keyHash.
    pub wrong_identity: bool,
    /// Send a ServerHello that does not parse (a transient handshake failure).
    pub garbled_hello: bool,
    ts: i64,
}

impl FakeServer {
    /// A server for [`HOST`] offering versions 6 to `max_version`; `seed` fixes its keys
    /// and ids.
    pub fn new(max_version: u16, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x5e_4e_e4);
        Self {
            max_version,
            tls_leaf: Ed25519SecretKey::generate(&mut rng),
            session_key: X25519SecretKey::generate(&mut rng),
            // Structurally valid DER SEQUENCEs: only their hashes matter to the client.
            chain: vec![
                vec![0x30, 0x03, 0x02, 0x01, 0x01],
                vec![0x30, 0x03, 0x02, 0x01, 0x02],
            ],
            rng,
            conns: BTreeMap::new(),
            next_conn: 1,
            queues: BTreeMap::new(),
            seen: Vec::new(),
            stored: 0,
            quota: 128,
            stalled: false,
            ignore_acks: false,
            hold_deliveries: false,
            wrong_identity: false,
            garbled_hello: false,
            host: HOST.to_owned(),
            ts: 1_700_000_000,
        }
    }

    /// The identity its address pins.
    pub fn key_hash(&self) -> KeyHash {
        cert::key_hash(&self.chain[1])
    }

    /// The server's address as an app would configure it.
    pub fn address(&self) -> String {
        format!("smp://{}@{}", self.key_hash(), self.host)
    }

    /// A new transport connection: its id, the ServerHello block and what TLS would tell
    /// the client.
    pub fn accept(&mut self) -> (u64, Vec<u8>, TransportInfo) {
        let id = self.next_conn;
        self.next_conn += 1;
        let mut session_id = vec![0u8; 32];
        self.rng.fill_bytes(&mut session_id);
        let object = cert::signed_key_object(&self.session_key.public_key().to_spki());
        let sig = self.tls_leaf.sign(&object);
        let mut chain = self.chain.clone();
        if self.wrong_identity {
            chain[1] = vec![0x30, 0x03, 0x02, 0x01, 0x07];
        }
        let hello = ServerHello {
            versions: VersionRange::new(6, self.max_version).unwrap(),
            session_id: session_id.clone(),
            cert_key: Some(CertKey {
                chain,
                signed_key: cert::encode_signed_key(&object, SignatureAlgorithm::Ed25519, &sig),
            }),
        };
        let mut block = Vec::new();
        if self.garbled_hello {
            pad_block(b"not a ServerHello", &mut block).unwrap();
        } else {
            pad_block(&hello.encode().unwrap(), &mut block).unwrap();
        }
        let info = TransportInfo {
            tls_leaf_key: CertPublicKey::from_raw(
                SignatureAlgorithm::Ed25519,
                self.tls_leaf.public_key().as_bytes(),
            )
            .unwrap(),
            tls_session_id: Some(session_id.clone()),
        };
        self.conns.insert(
            id,
            SConn {
                session_id,
                version: 0,
                cipher: None,
                hello_done: false,
                open: true,
            },
        );
        (id, block, info)
    }

    /// The client closed the connection: its subscriptions end.
    pub fn close(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.open = false;
        }
        for q in self.queues.values_mut() {
            if q.subscriber == Some(conn) {
                q.subscriber = None;
                q.delivered = false;
            }
        }
    }

    /// The negotiated version of a connection.
    pub fn version(&self, conn: u64) -> u16 {
        self.conns[&conn].version
    }

    /// Handles one block from the client; returns the blocks to send, per connection.
    pub fn handle_block(&mut self, conn: u64, block: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let key_hash = self.key_hash();
        let Some(c) = self.conns.get_mut(&conn) else {
            return Vec::new();
        };
        if !c.open || self.stalled {
            return Vec::new();
        }
        if !c.hello_done {
            let hello = ClientHello::decode(unpad_block(block).unwrap()).unwrap();
            assert_eq!(hello.key_hash, key_hash, "ClientHello keyHash");
            c.version = hello.version;
            c.hello_done = true;
            if hello.version >= 11
                && let Some(k) = &hello.client_key
            {
                let dh = self.session_key.diffie_hellman(k);
                c.cipher = Some(BlockCipher::server(&c.session_id, &dh));
            }
            return Vec::new();
        }
        let content = match &mut c.cipher {
            Some(cipher) => cipher.decrypt_block(block).unwrap(),
            None => unpad_block(block).unwrap().to_vec(),
        };
        let (version, session_id) = (c.version, c.session_id.clone());
        let mut out = Vec::new();
        for t in decode_batch(&content).unwrap() {
            let t = Transmission::decode(version, &session_id, t).unwrap();
            let command = Command::decode(version, t.command).unwrap();
            let authorized = t.authorized(&session_id).unwrap();
            self.seen.push(Seen {
                conn,
                tag: command.tag(),
                entity: t.entity_id.to_vec(),
                signed: !t.auth.is_empty(),
            });
            let corr = t.corr_id.to_vec();
            let entity = t.entity_id.to_vec();
            self.command(
                conn,
                version,
                &corr,
                &entity,
                t.auth,
                &authorized,
                command,
                &mut out,
            );
        }
        self.pack(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn command(
        &mut self,
        conn: u64,
        version: u16,
        corr: &[u8],
        entity: &[u8],
        auth: &[u8],
        authorized: &[u8],
        command: Command,
        out: &mut Vec<(u64, Vec<u8>, Vec<u8>, Response)>,
    ) {
        let err = |e: ErrorType| Response::Err(e);
        let verify = |key: &Ed25519PublicKey| ed25519_verify(key, authorized, auth).is_ok();
        let mut reply =
            |entity: &[u8], r: Response| out.push((conn, corr.to_vec(), entity.to_vec(), r));
        match command {
            Command::New(n) => {
                let key = Ed25519PublicKey::from_spki(&n.rcv_auth_key).unwrap();
                if !verify(&key) {
                    return reply(entity, err(ErrorType::Auth));
                }
                let rcv_dh = X25519PublicKey::from_spki(&n.rcv_dh_key).unwrap();
                let srv_dh = X25519SecretKey::generate(&mut self.rng);
                let (mut rcv_id, mut snd_id) = (vec![0u8; 24], vec![0u8; 24]);
                self.rng.fill_bytes(&mut rcv_id);
                self.rng.fill_bytes(&mut snd_id);
                let messaging =
                    version >= 9 && matches!(n.queue_request, Some(QueueRequest::Messaging(_)));
                let subscribe = n.sub_mode == SubscriptionMode::Subscribe;
                self.queues.insert(
                    rcv_id.clone(),
                    SQueue {
                        rcv_key: key,
                        dh_secret: srv_dh.diffie_hellman(&rcv_dh),
                        snd_id: snd_id.clone(),
                        snd_key: None,
                        messaging,
                        msgs: VecDeque::new(),
                        delivered: false,
                        subscriber: subscribe.then_some(conn),
                        quota_marked: false,
                    },
                );
                let ids = QueueIds {
                    rcv_id,
                    snd_id,
                    srv_dh_key: srv_dh.public_key().to_spki(),
                    queue_mode: (version >= 9).then_some(if messaging {
                        QueueMode::Messaging
                    } else {
                        QueueMode::Contact
                    }),
                    link_id: None,
                    service_id: None,
                    ntf_creds: None,
                };
                reply(b"", Response::Ids(ids));
            }
            Command::Sub => {
                let Some(q) = self.queues.get_mut(entity).filter(|q| verify(&q.rcv_key)) else {
                    return reply(entity, err(ErrorType::Auth));
                };
                if let Some(old) = q.subscriber.filter(|&c| c != conn) {
                    out.push((old, Vec::new(), entity.to_vec(), Response::End));
                }
                q.subscriber = Some(conn);
                // A re-SUB re-delivers the unacknowledged message.
                q.delivered = false;
                out.push((conn, corr.to_vec(), entity.to_vec(), Response::Sok(None)));
                self.deliver(entity, None, out);
            }
            Command::Key(k) => {
                let Some(q) = self.queues.get_mut(entity).filter(|q| verify(&q.rcv_key)) else {
                    return reply(entity, err(ErrorType::Auth));
                };
                let key = Ed25519PublicKey::from_spki(&k).unwrap();
                match q.snd_key {
                    Some(existing) if existing != key => reply(entity, err(ErrorType::Auth)),
                    _ => {
                        q.snd_key = Some(key);
                        reply(entity, Response::Ok);
                    }
                }
            }
            Command::SKey(k) => {
                let key = Ed25519PublicKey::from_spki(&k).unwrap();
                let q = self.by_sender(entity);
                let ok = q.is_some_and(|q| {
                    q.messaging && verify(&key) && q.snd_key.is_none_or(|e| e == key)
                });
                if ok && let Some(q) = self.by_sender(entity) {
                    q.snd_key = Some(key);
                    return reply(entity, Response::Ok);
                }
                reply(entity, err(ErrorType::Auth));
            }
            Command::Send { notification, body } => {
                let quota = self.quota;
                self.ts += 1;
                let ts = self.ts;
                let mut msg_id = vec![0u8; 24];
                self.rng.fill_bytes(&mut msg_id);
                let mut marker_id = vec![0u8; 24];
                self.rng.fill_bytes(&mut marker_id);
                let Some(q) = self.by_sender(entity) else {
                    return reply(entity, err(ErrorType::Auth));
                };
                // A secured queue needs a signature by the sender key; an unsecured one
                // refuses signed SENDs.
                let authorized_ok = match &q.snd_key {
                    Some(k) => verify(k),
                    None => auth.is_empty(),
                };
                if !authorized_ok {
                    return reply(entity, err(ErrorType::Auth));
                }
                if q.msgs.len() >= quota || q.quota_marked {
                    if !q.quota_marked {
                        q.quota_marked = true;
                        q.msgs.push_back((marker_id, RcvMsgBody::Quota { ts }));
                    }
                    return reply(entity, err(ErrorType::Quota));
                }
                q.msgs.push_back((
                    msg_id,
                    RcvMsgBody::Message {
                        ts,
                        notification,
                        body,
                    },
                ));
                self.stored += 1;
                reply(entity, Response::Ok);
                let rcv_id = self.rcv_id_of(entity).unwrap();
                self.deliver(&rcv_id, None, out);
            }
            Command::Ack(id) => {
                if self.ignore_acks {
                    return;
                }
                let Some(q) = self.queues.get_mut(entity).filter(|q| verify(&q.rcv_key)) else {
                    return reply(entity, err(ErrorType::Auth));
                };
                let head = q.msgs.front().map(|(m, _)| m.clone());
                if !q.delivered || head.as_deref() != Some(id.as_slice()) {
                    return reply(entity, err(ErrorType::NoMsg));
                }
                q.msgs.pop_front();
                q.delivered = false;
                if q.msgs.is_empty() {
                    q.quota_marked = false;
                }
                if !self.deliver(entity, Some(corr), out) {
                    out.push((conn, corr.to_vec(), entity.to_vec(), Response::Ok));
                }
            }
            Command::Del => {
                let Some(q) = self.queues.get(entity).filter(|q| verify(&q.rcv_key)) else {
                    return reply(entity, err(ErrorType::Auth));
                };
                let _ = q;
                self.queues.remove(entity);
                reply(entity, Response::Ok);
            }
            _ => reply(entity, err(ErrorType::Cmd(CmdError::Unknown))),
        }
    }

    fn by_sender(&mut self, snd_id: &[u8]) -> Option<&mut SQueue> {
        self.queues.values_mut().find(|q| q.snd_id == snd_id)
    }

    fn rcv_id_of(&self, snd_id: &[u8]) -> Option<Vec<u8>> {
        self.queues
            .iter()
            .find(|(_, q)| q.snd_id == snd_id)
            .map(|(r, _)| r.clone())
    }

    /// Sends the head message to the subscriber if none is outstanding; `corr` answers an
    /// ACK with it. Returns whether a MSG went out.
    fn deliver(
        &mut self,
        rcv_id: &[u8],
        corr: Option<&[u8]>,
        out: &mut Vec<(u64, Vec<u8>, Vec<u8>, Response)>,
    ) -> bool {
        let Some(q) = self
            .queues
            .get_mut(rcv_id)
            .filter(|_| !self.hold_deliveries)
        else {
            return false;
        };
        let (Some(sub), false, Some((msg_id, body))) = (q.subscriber, q.delivered, q.msgs.front())
        else {
            return false;
        };
        let enc = encrypt_msg_body(&q.dh_secret, msg_id, body).unwrap();
        q.delivered = true;
        let msg = Response::Msg {
            msg_id: msg_id.clone(),
            body: enc,
        };
        out.push((sub, corr.unwrap_or_default().to_vec(), rcv_id.to_vec(), msg));
        true
    }

    /// Whether a server-side connection is still open.
    pub fn is_open(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.open)
    }

    /// Ends [`Self::hold_deliveries`] and sends the queue's head message.
    pub fn resume_deliveries(&mut self, rcv_id: &[u8]) -> Vec<(u64, Vec<u8>)> {
        self.hold_deliveries = false;
        let mut out = Vec::new();
        self.deliver(rcv_id, None, &mut out);
        self.pack(out)
    }

    /// Stores a SEND body (an encoded `ClientMsgEnvelope`) some other client sent, as if by a
    /// SEND on another connection, and delivers it if the subscriber is free.
    pub fn inject(&mut self, rcv_id: &[u8], body: Vec<u8>) -> Vec<(u64, Vec<u8>)> {
        self.ts += 1;
        let mut msg_id = vec![0u8; 24];
        self.rng.fill_bytes(&mut msg_id);
        let msg = RcvMsgBody::Message {
            ts: self.ts,
            notification: true,
            body,
        };
        self.queues
            .get_mut(rcv_id)
            .unwrap()
            .msgs
            .push_back((msg_id, msg));
        let mut out = Vec::new();
        self.deliver(rcv_id, None, &mut out);
        self.pack(out)
    }

    /// Server-initiated `END` to the queue's subscriber (another client took it).
    pub fn end_subscription(&mut self, rcv_id: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let q = self.queues.get_mut(rcv_id).unwrap();
        let sub = q.subscriber.take().unwrap();
        q.delivered = false;
        self.pack(vec![(sub, Vec::new(), rcv_id.to_vec(), Response::End)])
    }

    /// The queue is deleted through another connection: `DELD` to the subscriber.
    pub fn delete_elsewhere(&mut self, rcv_id: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let q = self.queues.remove(rcv_id).unwrap();
        self.pack(vec![(
            q.subscriber.unwrap(),
            Vec::new(),
            rcv_id.to_vec(),
            Response::Deld,
        )])
    }

    /// Packs responses into blocks per connection, in order.
    fn pack(&mut self, items: Vec<(u64, Vec<u8>, Vec<u8>, Response)>) -> Vec<(u64, Vec<u8>)> {
        let mut blocks = Vec::new();
        let mut current: Option<(u64, BatchBuilder)> = None;
        for (conn, corr, entity, resp) in items {
            let Some(c) = self.conns.get(&conn).filter(|c| c.open) else {
                continue;
            };
            let mut cmd = Vec::new();
            resp.encode(c.version, &mut cmd).unwrap();
            let a = Authorized::new(&c.session_id, &corr, &entity, &cmd).unwrap();
            let mut t = Vec::new();
            encode_transmission(c.version, b"", &a, &mut t).unwrap();
            let same = current.as_ref().is_some_and(|(id, _)| *id == conn);
            if !same || !current.as_ref().is_some_and(|(_, b)| b.fits(t.len())) {
                if let Some((id, mut b)) = current.take() {
                    let content = b.take();
                    blocks.push((id, self.seal(id, &content)));
                }
                current = Some((conn, BatchBuilder::new()));
            }
            if let Some((_, b)) = current.as_mut() {
                assert!(b.push(&t));
            }
        }
        if let Some((id, mut b)) = current {
            let content = b.take();
            blocks.push((id, self.seal(id, &content)));
        }
        blocks
    }

    fn seal(&mut self, conn: u64, content: &[u8]) -> Vec<u8> {
        let c = self.conns.get_mut(&conn).unwrap();
        match &mut c.cipher {
            Some(cipher) => cipher.encrypt_block(content).unwrap(),
            None => {
                let mut b = Vec::new();
                pad_block(content, &mut b).unwrap();
                b
            }
        }
    }

    /// Commands with this tag seen so far.
    pub fn count(&self, tag: &str) -> usize {
        self.seen.iter().filter(|s| s.tag == tag).count()
    }
}
