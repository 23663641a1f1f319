//! The sender side of a queue: securing it, the first-message confirmation, and the ordered
//! outbox of messages waiting for the server's OK.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::Instant;

use muxd_smp::address::QueueUri;
use muxd_smp::command::QueueMode;
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::{ClientMessage, ClientMsgEnvelope, E2eError, PrivHeader};
use muxd_smp::keys::{DhSecret, Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::version::SND_AUTH_KEY;
use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use crate::envelope::Envelope;
use crate::error::PoolError;
use crate::persist::{Reader, SavedSender, Writer};
use crate::request::RequestToken;
use crate::server::ServerKey;

/// The highest SMP client version we speak in envelopes (§1.2: 4 = short links).
const CLIENT_VERSION: u16 = 4;
/// The SMP client version from which the sender may secure the queue itself (SKEY).
const SND_SECURE_CLIENT_VERSION: u16 = 3;

/// Identifies a destination queue: its server connection and sender id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct DestKey {
    pub(crate) server: ServerKey,
    pub(crate) sender_id: Vec<u8>,
}

/// Whether the queue is secured with our sender key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secured {
    No,
    /// SKEY sent, answer pending.
    InFlight,
    Yes,
}

/// Whether the recipient has our e2e key (the confirmation was accepted by the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Confirmation {
    NotSent,
    /// Sent, but the connection died before the answer: it may have arrived.
    Unknown,
    Confirmed,
}

/// How a message in flight was sent; decides what an error means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendKind {
    /// The confirmation, signed (fast flow) or not (legacy flow). `after_unknown` is set when
    /// an earlier confirmation may already have arrived.
    Confirmation { signed: bool, after_unknown: bool },
    /// A normal message, signed with the sender key.
    Message,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutState {
    Queued,
    InFlight(SendKind),
}

/// A message waiting for the server's OK. `Debug` shows the body's length, not the body.
pub(crate) struct OutMsg {
    /// The pool's id of the message (unique in the pool, the `message_id` of the reply).
    pub(crate) seq: u64,
    /// The seq in the app envelope, per destination queue: fixed when the app handed the
    /// message over, so that every resend carries it again.
    pub(crate) envelope_seq: u64,
    /// An earlier attempt's outcome is unknown (the connection died or the command timed
    /// out before the answer): the server may hold a copy.
    pub(crate) maybe_stored: bool,
    /// The request to answer when the server accepted it, when the app asked to wait for
    /// that; otherwise the app got `queued` at once and learns the outcome from events.
    pub(crate) token: Option<RequestToken>,
    /// The app that sent it; its budget on the server pays for it.
    pub(crate) app: String,
    /// The plaintext, wiped when the message is dropped.
    pub(crate) body: Zeroizing<Vec<u8>>,
    pub(crate) state: OutState,
    pub(crate) retries: u32,
    /// When the app asked; bounds the wait with [`crate::PoolConfig::send_timeout`].
    pub(crate) queued_at: Instant,
}

impl fmt::Debug for OutMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutMsg")
            .field("seq", &self.seq)
            .field("envelope_seq", &self.envelope_seq)
            .field("maybe_stored", &self.maybe_stored)
            .field("token", &self.token)
            .field("app", &self.app)
            .field("body_len", &self.body.len())
            .field("state", &self.state)
            .field("retries", &self.retries)
            .field("queued_at", &self.queued_at)
            .finish()
    }
}

/// Sender state for one destination queue, shared by every app that sends to it: the queue
/// accepts one sender key, so apps sending to the same URI must use the same one.
///
/// That is also why the table is keyed by queue (server and sender id) and not by the URI's
/// e2e key: a second entry with another key could never send once the first secured the
/// queue. A URI with another e2e key replaces this one's while nothing can have reached the
/// recipient yet ([`Self::rekey`]); after that it is refused.
#[derive(Debug)]
pub(crate) struct SndQueue {
    recipient_e2e: X25519PublicKey,
    client_version: u16,
    messaging: bool,
    pub(crate) auth: QueueAuthKey,
    e2e: X25519SecretKey,
    e2e_secret: DhSecret,
    pub(crate) secured: Secured,
    pub(crate) confirmation: Confirmation,
    pub(crate) outbox: VecDeque<OutMsg>,
    /// Send one message at a time until the next OK (after an error that may recur).
    pub(crate) cautious: bool,
    pub(crate) retry_at: Option<Instant>,
    /// The next envelope seq to hand out; starts at 1.
    next_envelope_seq: u64,
    /// The apps that sent through this entry; each counts it against
    /// [`crate::PoolConfig::max_senders_per_app`].
    pub(crate) apps: BTreeSet<String>,
}

impl SndQueue {
    pub(crate) fn new<R: RngCore + CryptoRng>(
        rng: &mut R,
        uri: &QueueUri,
        recipient_e2e: X25519PublicKey,
    ) -> Self {
        let e2e = X25519SecretKey::generate(rng);
        let e2e_secret = e2e.diffie_hellman(&recipient_e2e);
        Self {
            recipient_e2e,
            client_version: uri.client_versions.max.min(CLIENT_VERSION),
            messaging: uri.queue_mode == Some(QueueMode::Messaging),
            auth: QueueAuthKey::Ed25519(Ed25519SecretKey::generate(rng)),
            e2e,
            e2e_secret,
            secured: Secured::No,
            confirmation: Confirmation::NotSent,
            outbox: VecDeque::new(),
            cautious: false,
            retry_at: None,
            next_envelope_seq: 1,
            apps: BTreeSet::new(),
        }
    }

    /// Whether a URI with another recipient e2e key may replace this entry's: nothing is
    /// waiting to go and no confirmation went out, so the recipient cannot have our e2e key
    /// yet. The auth key stays: the queue may already be secured with it (SKEY).
    pub(crate) fn rekeyable(&self) -> bool {
        self.confirmation == Confirmation::NotSent && self.outbox.is_empty()
    }

    /// Switches to the recipient e2e key of a newer URI; see [`Self::rekeyable`].
    pub(crate) fn rekey<R: RngCore + CryptoRng>(
        &mut self,
        rng: &mut R,
        uri: &QueueUri,
        recipient_e2e: X25519PublicKey,
    ) {
        self.e2e = X25519SecretKey::generate(rng);
        self.e2e_secret = self.e2e.diffie_hellman(&recipient_e2e);
        self.recipient_e2e = recipient_e2e;
        self.client_version = uri.client_versions.max.min(CLIENT_VERSION);
        self.messaging = uri.queue_mode == Some(QueueMode::Messaging);
    }

    /// Whether the entry can be forgotten: nothing to send, and nothing that ties the queue
    /// to its keys (not secured, no confirmation sent). A secured queue accepts only this
    /// entry's key, so such entries are kept.
    pub(crate) fn disposable(&self) -> bool {
        self.outbox.is_empty()
            && self.secured == Secured::No
            && self.confirmation == Confirmation::NotSent
    }

    /// The envelope seq for a message the app just handed over.
    pub(crate) fn next_envelope_seq(&mut self) -> u64 {
        let seq = self.next_envelope_seq;
        self.next_envelope_seq += 1;
        seq
    }

    /// Whether a later URI names the same queue keys.
    pub(crate) fn matches(&self, recipient_e2e: &X25519PublicKey) -> bool {
        self.recipient_e2e == *recipient_e2e
    }

    /// The fast flow (SKEY, then a signed confirmation) needs a v9+ server and a messaging
    /// queue whose recipient speaks client v3+; otherwise the recipient secures it (KEY).
    pub(crate) fn fast_flow(&self, server_version: u16) -> bool {
        server_version >= SND_AUTH_KEY
            && self.messaging
            && self.client_version >= SND_SECURE_CLIENT_VERSION
    }

    /// Seals the next message: the confirmation until the server accepted one, then normal
    /// messages. Returns the SEND body and how it is sent.
    pub(crate) fn seal<R: RngCore + CryptoRng>(
        &self,
        rng: &mut R,
        fast: bool,
        envelope_seq: u64,
        body: &[u8],
    ) -> Result<(Vec<u8>, SendKind), E2eError> {
        let body = Envelope {
            seq: envelope_seq,
            payload: body,
        }
        .to_bytes();
        if self.confirmation == Confirmation::Confirmed {
            let mut msg = ClientMessage {
                header: PrivHeader::Empty,
                body,
            };
            let env =
                ClientMsgEnvelope::seal(rng, self.client_version, None, &self.e2e_secret, &msg);
            // The plaintext copy is no longer needed, whatever the outcome.
            msg.body.zeroize();
            return Ok((env?.encode()?, SendKind::Message));
        }
        // In the legacy flow the confirmation carries our auth key so the recipient can KEY.
        let header = if fast {
            PrivHeader::Empty
        } else {
            PrivHeader::Confirmation(self.auth.public_key())
        };
        let mut msg = ClientMessage { header, body };
        let env = ClientMsgEnvelope::seal_confirmation(
            rng,
            self.client_version,
            &self.e2e,
            &self.recipient_e2e,
            &msg,
        );
        msg.body.zeroize();
        let env = env?;
        let kind = SendKind::Confirmation {
            signed: fast,
            after_unknown: self.confirmation == Confirmation::Unknown,
        };
        Ok((env.encode()?, kind))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.outbox
            .iter()
            .filter(|m| matches!(m.state, OutState::InFlight(_)))
            .count()
    }

    pub(crate) fn position(&self, seq: u64) -> Option<usize> {
        self.outbox.iter().position(|m| m.seq == seq)
    }

    /// Forgets everything in flight after the connection died. The messages go back to the
    /// queue, in their order, to be sent again on the next connection with the same envelope
    /// seq: the server may store a second copy of one whose OK was lost, and the recipient
    /// drops it; none is lost. What may have reached the server (SKEY, the confirmation) is
    /// re-checked next time.
    pub(crate) fn reset_after_loss(&mut self) {
        let confirmation_in_flight = self
            .outbox
            .iter()
            .any(|m| matches!(m.state, OutState::InFlight(SendKind::Confirmation { .. })));
        if confirmation_in_flight {
            self.confirmation = Confirmation::Unknown;
        }
        if self.secured == Secured::InFlight {
            // SKEY with the same key is idempotent, so it is simply sent again.
            self.secured = Secured::No;
        }
        for m in &mut self.outbox {
            if matches!(m.state, OutState::InFlight(_)) {
                m.maybe_stored = true;
            }
            m.state = OutState::Queued;
        }
        self.cautious = false;
        self.retry_at = None;
    }
}

impl SndQueue {
    /// The entry as a store keeps it ([`crate::Mailbox::save_sender`]). A confirmation or
    /// SKEY on the wire is saved as what a restart must assume: the confirmation may have
    /// arrived (`Unknown`), the SKEY is simply sent again (it is idempotent).
    pub(crate) fn save(&self, dest: &DestKey) -> SavedSender {
        let (secured, confirmation) = self.journal_state();
        let mut w = Writer::new()
            .key(self.recipient_e2e.as_bytes())
            .u16(self.client_version)
            .u8(u8::from(self.messaging))
            .auth(&self.auth)
            .key(&self.e2e.to_bytes())
            .u8(u8::from(secured))
            .u8(confirmation)
            .u64(self.next_envelope_seq)
            .u16(u16::try_from(self.apps.len()).unwrap_or(u16::MAX));
        for app in self.apps.iter().take(usize::from(u16::MAX)) {
            w = w.bytes(app.as_bytes());
        }
        SavedSender {
            server: dest.server.clone(),
            sender_id: dest.sender_id.clone(),
            secret: w.finish(),
        }
    }

    /// What of the entry's state a restart must know (secured, confirmation), as
    /// [`Self::save`] writes it: a change means the entry must be saved again.
    pub(crate) fn journal_state(&self) -> (bool, u8) {
        let confirmation = match self.confirmation {
            Confirmation::Confirmed => 2,
            Confirmation::Unknown => 1,
            Confirmation::NotSent
                if self.outbox.iter().any(|m| {
                    matches!(m.state, OutState::InFlight(SendKind::Confirmation { .. }))
                }) =>
            {
                1
            }
            Confirmation::NotSent => 0,
        };
        (self.secured == Secured::Yes, confirmation)
    }

    /// An entry read back from a store, with an empty outbox.
    pub(crate) fn restore(saved: &SavedSender) -> Result<Self, PoolError> {
        let mut r = Reader::new(&saved.secret)?;
        let recipient_e2e = r.x25519_public()?;
        let client_version = r.u16()?;
        let messaging = r.bool()?;
        let auth = r.auth()?;
        let e2e = r.x25519()?;
        let secured = if r.bool()? { Secured::Yes } else { Secured::No };
        let confirmation = match r.u8()? {
            0 => Confirmation::NotSent,
            1 => Confirmation::Unknown,
            2 => Confirmation::Confirmed,
            _ => {
                return Err(PoolError::InvalidArgument(
                    "stored state: bad confirmation state".to_owned(),
                ));
            }
        };
        let next_envelope_seq = r.u64()?;
        let n = r.u16()?;
        let mut apps = BTreeSet::new();
        for _ in 0..n {
            apps.insert(r.string()?);
        }
        r.finish()?;
        let e2e_secret = e2e.diffie_hellman(&recipient_e2e);
        Ok(Self {
            recipient_e2e,
            client_version,
            messaging,
            auth,
            e2e,
            e2e_secret,
            secured,
            confirmation,
            outbox: VecDeque::new(),
            cautious: false,
            retry_at: None,
            next_envelope_seq: next_envelope_seq.max(1),
            apps,
        })
    }

    /// After a restart: a message read back from the store goes to the end of the outbox.
    /// Its seq was handed out before the restart, so the counter must already be past it.
    pub(crate) fn restore_message(&mut self, msg: OutMsg) {
        self.next_envelope_seq = self.next_envelope_seq.max(msg.envelope_seq + 1);
        self.outbox.push_back(msg);
    }
}

#[cfg(test)]
mod tests {
    use muxd_smp::address::{SmpServer, VersionRange};
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::SeedableRng;

    use super::*;

    fn queue() -> SndQueue {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let recipient = X25519SecretKey::generate(&mut rng).public_key();
        let uri = QueueUri {
            server: SmpServer {
                key_hash: vec![0; 32],
                basic_auth: None,
                hosts: vec!["relay.test".into()],
                port: None,
            },
            sender_id: vec![1],
            client_versions: VersionRange { min: 2, max: 4 },
            dh_key: recipient.to_spki(),
            queue_mode: Some(QueueMode::Messaging),
        };
        SndQueue::new(&mut rng, &uri, recipient)
    }

    fn push(q: &mut SndQueue) {
        let envelope_seq = q.next_envelope_seq();
        q.outbox.push_back(OutMsg {
            seq: 100 + envelope_seq,
            envelope_seq,
            maybe_stored: false,
            token: Some(RequestToken(envelope_seq)),
            app: "app".to_owned(),
            body: Zeroizing::new(Vec::new()),
            state: OutState::Queued,
            retries: 0,
            queued_at: Instant::now(),
        });
    }

    #[test]
    fn seqs_count_from_one_and_a_loss_marks_what_was_in_flight() {
        let mut q = queue();
        for _ in 0..3 {
            push(&mut q);
        }
        let seqs: Vec<u64> = q.outbox.iter().map(|m| m.envelope_seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        q.outbox[0].state = OutState::InFlight(SendKind::Message);
        q.outbox[1].state = OutState::InFlight(SendKind::Message);
        q.reset_after_loss();
        let marks: Vec<bool> = q.outbox.iter().map(|m| m.maybe_stored).collect();
        assert_eq!(marks, [true, true, false], "only what was on the wire");
        assert!(q.outbox.iter().all(|m| m.state == OutState::Queued));
    }

    #[test]
    fn a_new_dh_key_replaces_the_old_only_before_the_confirmation() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut q = queue();
        q.secured = Secured::Yes;
        let auth = q.auth.public_key();
        assert!(
            q.rekeyable() && !q.disposable(),
            "secured: kept, but re-keyable"
        );
        let newer = X25519SecretKey::generate(&mut rng).public_key();
        assert!(!q.matches(&newer));
        let uri = QueueUri {
            server: SmpServer {
                key_hash: vec![0; 32],
                basic_auth: None,
                hosts: vec!["relay.test".into()],
                port: None,
            },
            sender_id: vec![1],
            client_versions: VersionRange { min: 2, max: 4 },
            dh_key: newer.to_spki(),
            queue_mode: Some(QueueMode::Messaging),
        };
        q.rekey(&mut rng, &uri, newer);
        assert!(q.matches(&newer));
        assert_eq!(q.auth.public_key(), auth, "the queue only accepts this key");
        push(&mut q);
        assert!(!q.rekeyable(), "a message waits");
        q.outbox.clear();
        q.confirmation = Confirmation::Unknown;
        assert!(!q.rekeyable(), "the recipient may have our key");
    }

    #[test]
    fn the_seq_travels_inside_the_sealed_message() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut q = queue();
        q.confirmation = Confirmation::Confirmed;
        let (sealed, kind) = q.seal(&mut rng, true, 7, b"hi").unwrap();
        assert_eq!(kind, SendKind::Message);
        let env = ClientMsgEnvelope::decode(&sealed).unwrap();
        let msg = env.open(&q.e2e_secret).unwrap();
        assert_eq!(
            msg.body,
            Envelope {
                seq: 7,
                payload: b"hi"
            }
            .to_bytes()
        );
    }
}
