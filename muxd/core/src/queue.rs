//! The recipient side of a queue: its keys, and opening what arrives on it.

use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::{self, ClientMsgEnvelope, PrivHeader, RcvMsgBody};
use muxd_smp::keys::{DhSecret, Ed25519SecretKey, PublicKey, X25519SecretKey};

use crate::envelope::SeqWindow;
use crate::error::PoolError;
use crate::persist::{Reader, SavedQueue, Writer};
use crate::request::{RequestToken, Subscription};
use crate::server::ServerKey;

/// The keys of a queue being created, kept until IDS arrives.
#[derive(Debug)]
pub(crate) struct NewQueueKeys {
    pub(crate) app: String,
    pub(crate) token: RequestToken,
    /// Authorizes the recipient's commands (registered in NEW).
    pub(crate) rcv_auth: Ed25519SecretKey,
    /// With the server's DH key from IDS, decrypts the server→recipient layer.
    pub(crate) rcv_dh: X25519SecretKey,
    /// The e2e key published as `dh=` in the queue URI.
    pub(crate) e2e: X25519SecretKey,
}

/// A queue owned by an app.
#[derive(Debug)]
pub(crate) struct RcvQueue {
    pub(crate) app: String,
    pub(crate) server: ServerKey,
    pub(crate) rcv_id: Vec<u8>,
    pub(crate) rcv_auth: QueueAuthKey,
    pub(crate) rcv_dh_secret: DhSecret,
    pub(crate) e2e: X25519SecretKey,
    /// Known once the sender's confirmation arrived.
    pub(crate) e2e_secret: Option<DhSecret>,
    /// The key a legacy sender asked us to secure the queue with (KEY).
    pub(crate) sender_key: Option<PublicKey>,
    /// Whether the server confirmed our KEY.
    pub(crate) secured: bool,
    pub(crate) uri: String,
    pub(crate) subscription: Subscription,
    pub(crate) last_error: Option<String>,
    /// The envelope seqs delivered to the mailbox. The queue is secured by one sender key
    /// (or, legacy and contact queues, meant for one sender), so one window per queue is one
    /// window per sender.
    pub(crate) delivered: SeqWindow,
    pub(crate) duplicates_suppressed: u64,
    pub(crate) malformed_rejected: u64,
    /// Confirmations refused because another sender's was accepted first.
    pub(crate) confirmations_rejected: u64,
    /// The msgId whose `ACK` is held back while the queue or its app is at its
    /// waiting-message limit (the server sends nothing more on the queue until it comes).
    pub(crate) held_ack: Option<Vec<u8>>,
}

/// What a `MSG` on a queue turned out to be.
#[derive(Debug)]
pub(crate) enum Opened {
    /// The "queue was full" marker: acknowledged, not shown to the app.
    Quota,
    /// A message for the app.
    Message {
        ts: i64,
        body: Vec<u8>,
        /// A legacy confirmation: the recipient must secure the queue with this key.
        secure_with: Option<Box<PublicKey>>,
    },
    /// Nothing usable; the reason is recorded on the queue.
    Undecryptable(String),
    /// A confirmation from a sender other than the one whose confirmation set the queue's
    /// e2e secret: refused, so it cannot take the queue from the first sender.
    SecondConfirmation,
}

impl RcvQueue {
    /// Decrypts the server layer, then the e2e envelope. A confirmation (sender key in the
    /// clear header) sets the queue's e2e secret, but only once it has opened correctly and
    /// only the first time: anyone holding the URI can send a confirmation, and a later one
    /// replacing the secret would make the first sender's messages undecryptable. A copy of
    /// the accepted confirmation (the sender resent it after a lost OK) yields the same
    /// secret and is opened as usual (the envelope seq then drops it).
    pub(crate) fn open(&mut self, msg_id: &[u8], enc_body: &[u8]) -> Opened {
        let (ts, sent) = match e2e::decrypt_msg_body(&self.rcv_dh_secret, msg_id, enc_body) {
            Ok(RcvMsgBody::Quota { .. }) => return Opened::Quota,
            Ok(RcvMsgBody::Message { ts, body, .. }) => (ts, body),
            Ok(other) => return Opened::Undecryptable(format!("unknown message body {other:?}")),
            Err(e) => return Opened::Undecryptable(format!("message body: {e}")),
        };
        let envelope = match ClientMsgEnvelope::decode(&sent) {
            Ok(env) => env,
            Err(e) => return Opened::Undecryptable(format!("message envelope: {e}")),
        };
        let message = if envelope.header.sender_e2e_key.is_some() {
            match envelope.open_confirmation(&self.e2e) {
                Ok((secret, msg)) => match &self.e2e_secret {
                    None => {
                        self.e2e_secret = Some(secret);
                        msg
                    }
                    Some(known) if *known == secret => msg,
                    Some(_) => return Opened::SecondConfirmation,
                },
                Err(e) => return Opened::Undecryptable(format!("confirmation: {e}")),
            }
        } else {
            let Some(secret) = &self.e2e_secret else {
                return Opened::Undecryptable(
                    "message before the sender's confirmation".to_owned(),
                );
            };
            match envelope.open(secret) {
                Ok(msg) => msg,
                Err(e) => return Opened::Undecryptable(format!("message: {e}")),
            }
        };
        let secure_with = match message.header {
            PrivHeader::Confirmation(k) => Some(Box::new(k)),
            _ => None,
        };
        Opened::Message {
            ts,
            body: message.body,
            secure_with,
        }
    }
}

impl RcvQueue {
    /// The queue as a store keeps it ([`crate::Mailbox::save_queue`]).
    pub(crate) fn save(&self, queue_id: &str) -> SavedQueue {
        let w = Writer::new()
            .auth(&self.rcv_auth)
            .key(self.rcv_dh_secret.as_bytes())
            .key(&self.e2e.to_bytes());
        let w = match &self.e2e_secret {
            Some(s) => w.u8(1).key(s.as_bytes()),
            None => w.u8(0),
        };
        let w = match &self.sender_key {
            Some(k) => w.u8(1).bytes(&k.to_spki()),
            None => w.u8(0),
        };
        let secret = w
            .u8(u8::from(self.secured))
            .bytes(self.uri.as_bytes())
            .finish();
        SavedQueue {
            queue_id: queue_id.to_owned(),
            app: self.app.clone(),
            server: self.server.clone(),
            rcv_id: self.rcv_id.clone(),
            secret,
        }
    }

    /// A queue read back from a store; its subscription waits for the connection.
    pub(crate) fn restore(saved: &SavedQueue) -> Result<Self, PoolError> {
        let mut r = Reader::new(&saved.secret)?;
        let rcv_auth = r.auth()?;
        let rcv_dh_secret = r.dh()?;
        let e2e = r.x25519()?;
        let e2e_secret = if r.bool()? { Some(r.dh()?) } else { None };
        let sender_key = if r.bool()? {
            Some(r.public_key()?)
        } else {
            None
        };
        let secured = r.bool()?;
        let uri = r.string()?;
        r.finish()?;
        Ok(Self {
            app: saved.app.clone(),
            server: saved.server.clone(),
            rcv_id: saved.rcv_id.clone(),
            rcv_auth,
            rcv_dh_secret,
            e2e,
            e2e_secret,
            sender_key,
            secured,
            uri,
            subscription: Subscription::Pending,
            last_error: None,
            delivered: SeqWindow::new(),
            duplicates_suppressed: 0,
            malformed_rejected: 0,
            confirmations_rejected: 0,
            held_ack: None,
        })
    }
}
