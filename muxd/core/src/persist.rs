//! What the pool hands a durable store, and takes back after a restart.
//!
//! The pool reports every change that must survive a restart through the [`crate::Mailbox`]
//! journal methods, as the values below. Keys and e2e state travel as opaque, versioned bytes
//! (`secret`) that only this module encodes and decodes: a store seals them and never looks
//! inside. Everything that holds key material is wiped on drop and hidden from `Debug`.

use std::fmt;

use muxd_smp::address::SmpServer;
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::keys::{DhSecret, Ed25519SecretKey, PublicKey, X25519PublicKey, X25519SecretKey};
use zeroize::Zeroizing;

use crate::error::PoolError;
use crate::server::{ServerKey, Transport};

/// The layout version of the secret bytes of [`SavedQueue`] and [`SavedSender`].
const FORMAT: u8 = 1;

/// One of the apps' receiving queues, as a store keeps it.
#[derive(Clone)]
pub struct SavedQueue {
    /// The pool's queue id (base64url of `rcv_id`).
    pub queue_id: String,
    /// The owning app.
    pub app: String,
    /// The server connection it lives on.
    pub server: ServerKey,
    /// The server's recipient id.
    pub rcv_id: Vec<u8>,
    /// Keys, e2e state and the queue URI, encoded by the pool; seal it at rest.
    pub secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SavedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedQueue")
            .field("queue_id", &self.queue_id)
            .field("app", &self.app)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Sender state for one destination queue (shared by the apps that send to it).
#[derive(Clone)]
pub struct SavedSender {
    /// The destination's server connection.
    pub server: ServerKey,
    /// The destination's sender id.
    pub sender_id: Vec<u8>,
    /// Keys, flags and the next envelope seq, encoded by the pool; seal it at rest.
    pub secret: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SavedSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedSender")
            .field("server", &self.server)
            .field("sender_id_len", &self.sender_id.len())
            .finish_non_exhaustive()
    }
}

/// A message an app handed over that the server has not accepted yet.
#[derive(Clone)]
pub struct SavedMessage {
    /// The pool's message id (the `message_id` apps see); unique, never reused.
    pub id: u64,
    /// The destination's server connection.
    pub server: ServerKey,
    /// The destination's sender id.
    pub sender_id: Vec<u8>,
    /// The app that sent it.
    pub app: String,
    /// The seq in muxd's app envelope, fixed when the app handed it over.
    pub envelope_seq: u64,
    /// The plaintext.
    pub body: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SavedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedMessage")
            .field("id", &self.id)
            .field("server", &self.server)
            .field("app", &self.app)
            .field("envelope_seq", &self.envelope_seq)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl SavedMessage {
    /// The payload a store keeps (and seals): `envelope_seq (8 bytes BE) ‖ body`.
    pub fn payload(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(8 + self.body.len()));
        out.extend_from_slice(&self.envelope_seq.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Rebuilds a message from its [`Self::payload`].
    pub fn from_payload(
        id: u64,
        server: ServerKey,
        sender_id: Vec<u8>,
        app: String,
        payload: &[u8],
    ) -> Result<Self, PoolError> {
        let (seq, body) = payload
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("message payload shorter than its seq"))?;
        Ok(Self {
            id,
            server,
            sender_id,
            app,
            envelope_seq: u64::from_be_bytes(*seq),
            body: Zeroizing::new(body.to_vec()),
        })
    }
}

/// How a message the app handed over ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageOutcome {
    /// The server accepted it.
    Sent,
    /// It will never be sent; the reason is for the app.
    Failed(String),
}

impl ServerKey {
    /// The key as one line for a store: `"<transport> <address>"`; read back with
    /// [`Self::from_stored`].
    pub fn to_stored(&self) -> String {
        format!("{} {}", self.transport().as_str(), self.address())
    }

    /// Parses [`Self::to_stored`].
    pub fn from_stored(s: &str) -> Result<Self, PoolError> {
        let (transport, address) = s
            .split_once(' ')
            .ok_or_else(|| corrupt("server key without a transport"))?;
        let transport = match transport {
            "tls" => Transport::Tls,
            "websocket" => Transport::WebSocket,
            // GRP keys carry the relay's canonical address; the pool parses it on restore.
            grp => {
                let transport = match grp {
                    "tcp" => Transport::GrpTcp,
                    "quic" => Transport::GrpQuic,
                    "ws" => Transport::GrpWs,
                    "wss" => Transport::GrpWss,
                    "proxy" => Transport::GrpProxied,
                    other => return Err(corrupt(&format!("unknown transport {other:?}"))),
                };
                return Ok(Self::grp(address.to_owned(), transport));
            }
        };
        let server: SmpServer = address
            .parse()
            .map_err(|e| corrupt(&format!("server address: {e}")))?;
        Ok(Self::new(&server, transport))
    }
}

fn corrupt(what: &str) -> PoolError {
    PoolError::InvalidArgument(format!("stored state: {what}"))
}

/// Appends length-prefixed and fixed fields to a buffer that is wiped on drop.
pub(crate) struct Writer(Zeroizing<Vec<u8>>);

impl Writer {
    pub(crate) fn new() -> Self {
        Self(Zeroizing::new(vec![FORMAT]))
    }

    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub(crate) fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn key(mut self, k: &[u8; 32]) -> Self {
        self.0.extend_from_slice(k);
        self
    }

    /// A field of at most 65535 bytes (ids, SPKIs, URIs and app names are far shorter; the
    /// pool bounds them before they get here).
    pub(crate) fn bytes(mut self, b: &[u8]) -> Self {
        let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&b[..usize::from(len)]);
        self
    }

    /// An auth key: kind byte, then the 32-byte secret. Kinds added to `QueueAuthKey` later
    /// are written as a kind [`Reader::auth`] refuses, so they fail loudly at restore.
    pub(crate) fn auth(self, k: &QueueAuthKey) -> Self {
        match k {
            QueueAuthKey::Ed25519(k) => self.u8(0).key(&k.to_seed()),
            QueueAuthKey::X25519(k) => self.u8(1).key(&k.to_bytes()),
            _ => self.u8(0xff).key(&[0; 32]),
        }
    }

    pub(crate) fn finish(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

/// Reads what [`Writer`] wrote; every shortfall is an error, never a panic.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Result<Self, PoolError> {
        let mut r = Self { rest: bytes };
        match r.u8()? {
            FORMAT => Ok(r),
            v => Err(corrupt(&format!("unknown format version {v}"))),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PoolError> {
        if self.rest.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, PoolError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, PoolError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, PoolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn key(&mut self) -> Result<Zeroizing<[u8; 32]>, PoolError> {
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(self.take(32)?);
        Ok(k)
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], PoolError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    pub(crate) fn string(&mut self) -> Result<String, PoolError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("text is not UTF-8"))
    }

    pub(crate) fn bool(&mut self) -> Result<bool, PoolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(corrupt("bad flag")),
        }
    }

    pub(crate) fn x25519(&mut self) -> Result<X25519SecretKey, PoolError> {
        Ok(X25519SecretKey::from_bytes(*self.key()?))
    }

    pub(crate) fn x25519_public(&mut self) -> Result<X25519PublicKey, PoolError> {
        Ok(X25519PublicKey::from_bytes(*self.key()?))
    }

    pub(crate) fn dh(&mut self) -> Result<DhSecret, PoolError> {
        Ok(DhSecret::from_bytes(*self.key()?))
    }

    pub(crate) fn auth(&mut self) -> Result<QueueAuthKey, PoolError> {
        match self.u8()? {
            0 => Ok(QueueAuthKey::Ed25519(Ed25519SecretKey::from_seed(
                &*self.key()?,
            ))),
            1 => Ok(QueueAuthKey::X25519(self.x25519()?)),
            _ => Err(corrupt("unknown auth key kind")),
        }
    }

    pub(crate) fn public_key(&mut self) -> Result<PublicKey, PoolError> {
        PublicKey::from_spki(self.bytes()?).map_err(|e| corrupt(&format!("public key: {e}")))
    }

    pub(crate) fn finish(self) -> Result<(), PoolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}
