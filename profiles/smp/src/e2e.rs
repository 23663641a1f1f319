//! The two per-queue encryption layers above the transport.
//!
//! * **Server → recipient** (§5.4): the body of every `MSG` is a constant-size crypto_box under
//!   `X25519(rcvDhPriv, srvDhKey)` with the message id as nonce; inside are the server's
//!   timestamp, the sender's flags and the SEND body, or the `QUOTA` marker.
//! * **Sender → recipient** (§8.2): the SEND body is a `ClientMsgEnvelope`, a crypto_box under
//!   the queue's e2e secret with a random nonce. The first message (confirmation) carries the
//!   sender's e2e public key in the clear so the recipient can derive that secret.
//!
//! The agent protocol inside the envelope (double ratchet etc.) is out of scope.

use rand_core::{CryptoRng, RngCore};

use crate::crypto::{self, CryptoError, NONCE_LEN, TAG_LEN};
use crate::encoding::{self, DecodeError, Parser};
use crate::keys::{DhSecret, KeyError, PublicKey, X25519PublicKey, X25519SecretKey};

/// The server pads every `MSG` plaintext to this size (`MaxRcvMessageLen` 16104 + 2).
pub const MSG_BODY_PADDED_LEN: usize = 16106;
/// Size of every encrypted `MSG` body: tag + padded plaintext.
pub const MSG_BODY_ENCRYPTED_LEN: usize = TAG_LEN + MSG_BODY_PADDED_LEN;
/// Pad target of a normal message inside the e2e envelope (`e2eEncMessageLength`).
pub const E2E_MESSAGE_PAD: usize = 16000;
/// Pad target of a confirmation or invitation (`e2eEncConfirmationLength`).
pub const E2E_CONFIRMATION_PAD: usize = 15904;
/// Size of a sealed normal-message envelope: 3 + 24 + 16 + 16000.
pub const E2E_MESSAGE_LEN: usize = 3 + NONCE_LEN + TAG_LEN + E2E_MESSAGE_PAD;
/// Size of a sealed confirmation envelope: 2 + 1 + 45 + 24 + 16 + 15904.
pub const E2E_CONFIRMATION_LEN: usize = 3 + 45 + NONCE_LEN + TAG_LEN + E2E_CONFIRMATION_PAD;

// Both envelope kinds must fit the smallest SEND limit of the versions that can carry them
// (16048 bytes from v11 on, when block encryption took 16 bytes of the block).
const _: () = assert!(E2E_MESSAGE_LEN <= 16048 && E2E_CONFIRMATION_LEN <= 16048);

/// Failures of the e2e layers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2eError {
    /// Decryption or padding failed (wrong secret, tampering, or a too-long plaintext).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The decrypted (or cleartext) structure is malformed.
    #[error("malformed e2e structure: {0}")]
    Decode(#[from] DecodeError),
    /// A key field did not hold a usable key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A field is too long for its length prefix.
    #[error("e2e field too long: {0}")]
    Encode(#[from] encoding::EncodeError),
}

/// The decrypted body of a `MSG` (upstream `ClientRcvMsgBody`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RcvMsgBody {
    /// A message sent with SEND.
    Message {
        /// Server receive time, unix seconds.
        ts: i64,
        /// The sender's notification flag (`'T'`).
        notification: bool,
        /// The SEND body, normally a [`ClientMsgEnvelope`].
        body: Vec<u8>,
    },
    /// The queue was full: messages sent after this were rejected with `ERR QUOTA`.
    /// It must be ACKed like a message.
    Quota {
        /// When the queue filled up, unix seconds.
        ts: i64,
    },
}

impl RcvMsgBody {
    /// Encodes the plaintext: `ts flag ' ' body` or `"QUOTA " ts`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Message {
                ts,
                notification,
                body,
            } => {
                let mut out = Vec::with_capacity(10 + body.len());
                encoding::put_int64(&mut out, *ts);
                encoding::put_bool(&mut out, *notification);
                out.push(b' ');
                out.extend_from_slice(body);
                out
            }
            Self::Quota { ts } => {
                let mut out = b"QUOTA ".to_vec();
                encoding::put_int64(&mut out, *ts);
                out
            }
        }
    }

    /// Parses the plaintext. Like upstream, a flags field may be followed by reserved flag
    /// characters up to the space, which are skipped.
    pub fn decode(plain: &[u8]) -> Result<Self, DecodeError> {
        // The QUOTA form is tried first, as upstream does. A real timestamp cannot start with
        // "QUOTA " (that would be a date around 10^17 years from now).
        if let Some(rest) = plain.strip_prefix(b"QUOTA ") {
            let mut p = Parser::new(rest);
            let ts = p.int64()?;
            p.end()?;
            return Ok(Self::Quota { ts });
        }
        let mut p = Parser::new(plain);
        let ts = p.int64()?;
        let notification = p.bool()?;
        let rest = p.tail();
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or(DecodeError::Invalid("message flags without space"))?;
        Ok(Self::Message {
            ts,
            notification,
            body: rest[space + 1..].to_vec(),
        })
    }
}

/// Decrypts a `MSG` body with the queue's `rcvDhSecret` (= X25519(rcvDhPriv, srvDhKey)).
/// The nonce is the message id (made 24 bytes by [`crypto::cb_nonce`]).
pub fn decrypt_msg_body(
    rcv_dh_secret: &DhSecret,
    msg_id: &[u8],
    enc_body: &[u8],
) -> Result<RcvMsgBody, E2eError> {
    let plain = crypto::cb_decrypt(rcv_dh_secret, &crypto::cb_nonce(msg_id), enc_body)?;
    Ok(RcvMsgBody::decode(&plain)?)
}

/// Encrypts a `MSG` body the way a server does (for fake servers in tests): always
/// [`MSG_BODY_ENCRYPTED_LEN`] bytes.
pub fn encrypt_msg_body(
    rcv_dh_secret: &DhSecret,
    msg_id: &[u8],
    body: &RcvMsgBody,
) -> Result<Vec<u8>, E2eError> {
    Ok(crypto::cb_encrypt(
        rcv_dh_secret,
        &crypto::cb_nonce(msg_id),
        &body.encode(),
        MSG_BODY_PADDED_LEN,
    )?)
}

/// The cleartext header of an envelope (upstream `PubHeader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubHeader {
    /// The agreed SMP *client* version (1..4; 4 against current peers).
    pub client_version: u16,
    /// The sender's e2e X25519 key: present in confirmations and invitations only.
    pub sender_e2e_key: Option<X25519PublicKey>,
}

/// The private header inside the encrypted envelope (upstream `PrivHeader`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrivHeader {
    /// `'_'`: nothing.
    Empty,
    /// `'K' ss(senderAuthKey)`: a confirmation in the legacy flow, where the recipient then
    /// secures the queue with KEY using this key.
    Confirmation(PublicKey),
}

/// The decrypted envelope content: a private header and the agent payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// The private header.
    pub header: PrivHeader,
    /// The agent-level payload (opaque here).
    pub body: Vec<u8>,
}

impl ClientMessage {
    /// `privHeader body`.
    pub fn encode(&self) -> Result<Vec<u8>, E2eError> {
        let mut out = Vec::with_capacity(self.body.len() + 46);
        match &self.header {
            PrivHeader::Empty => out.push(b'_'),
            PrivHeader::Confirmation(k) => {
                out.push(b'K');
                encoding::put_short_string(&mut out, &k.to_spki())?;
            }
        }
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Parses `privHeader body`.
    pub fn decode(plain: &[u8]) -> Result<Self, E2eError> {
        let mut p = Parser::new(plain);
        let header = match p.u8()? {
            b'_' => PrivHeader::Empty,
            b'K' => PrivHeader::Confirmation(PublicKey::from_spki(p.short_string()?)?),
            byte => {
                return Err(DecodeError::InvalidByte {
                    what: "PrivHeader",
                    byte,
                }
                .into());
            }
        };
        Ok(Self {
            header,
            body: p.tail().to_vec(),
        })
    }
}

/// The SEND body (upstream `ClientMsgEnvelope`): `pubHeader nonce(24) encBody`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMsgEnvelope {
    /// The cleartext header.
    pub header: PubHeader,
    /// The crypto_box nonce of `enc_body`.
    pub nonce: [u8; NONCE_LEN],
    /// `tag || ciphertext` of the padded [`ClientMessage`].
    pub enc_body: Vec<u8>,
}

impl ClientMsgEnvelope {
    /// Seals `msg` for a queue.
    ///
    /// With `sender_e2e_key` set (confirmations, contact invitations) the plaintext is padded
    /// to [`E2E_CONFIRMATION_PAD`], else to [`E2E_MESSAGE_PAD`], so every envelope of a kind
    /// has the same size. The nonce is drawn from `rng`.
    pub fn seal<R: RngCore + CryptoRng>(
        rng: &mut R,
        client_version: u16,
        sender_e2e_key: Option<X25519PublicKey>,
        e2e_secret: &DhSecret,
        msg: &ClientMessage,
    ) -> Result<Self, E2eError> {
        let pad_to = if sender_e2e_key.is_some() {
            E2E_CONFIRMATION_PAD
        } else {
            E2E_MESSAGE_PAD
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let enc_body = crypto::cb_encrypt(e2e_secret, &nonce, &msg.encode()?, pad_to)?;
        Ok(Self {
            header: PubHeader {
                client_version,
                sender_e2e_key,
            },
            nonce,
            enc_body,
        })
    }

    /// Seals the first message to a queue: the sender's e2e public key goes in the header and
    /// the secret is `X25519(sender e2e priv, recipient's dh= key from the queue URI)`.
    pub fn seal_confirmation<R: RngCore + CryptoRng>(
        rng: &mut R,
        client_version: u16,
        sender_e2e: &X25519SecretKey,
        recipient_e2e: &X25519PublicKey,
        msg: &ClientMessage,
    ) -> Result<Self, E2eError> {
        let secret = sender_e2e.diffie_hellman(recipient_e2e);
        Self::seal(
            rng,
            client_version,
            Some(sender_e2e.public_key()),
            &secret,
            msg,
        )
    }

    /// Opens the envelope with the queue's e2e secret.
    pub fn open(&self, e2e_secret: &DhSecret) -> Result<ClientMessage, E2eError> {
        let plain = crypto::cb_decrypt(e2e_secret, &self.nonce, &self.enc_body)?;
        ClientMessage::decode(&plain)
    }

    /// The recipient's side of [`Self::seal_confirmation`]: derives the e2e secret from the
    /// header key and the recipient's own e2e key, opens, and returns both so the caller can
    /// store the secret for later messages. Fails with a decode error when the header has
    /// no key.
    pub fn open_confirmation(
        &self,
        recipient_e2e: &X25519SecretKey,
    ) -> Result<(DhSecret, ClientMessage), E2eError> {
        let sender = self
            .header
            .sender_e2e_key
            .as_ref()
            .ok_or(DecodeError::Invalid("confirmation without sender e2e key"))?;
        let secret = recipient_e2e.diffie_hellman(sender);
        let msg = self.open(&secret)?;
        Ok((secret, msg))
    }

    /// `W16(version) maybe(ss(key)) nonce encBody`.
    pub fn encode(&self) -> Result<Vec<u8>, E2eError> {
        let mut out = Vec::with_capacity(3 + 45 + NONCE_LEN + self.enc_body.len());
        encoding::put_w16(&mut out, self.header.client_version);
        encoding::put_maybe(&mut out, self.header.sender_e2e_key.as_ref(), |o, k| {
            encoding::put_short_string(o, &k.to_spki())
        })?;
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.enc_body);
        Ok(out)
    }

    /// Parses an envelope (the `sentBody` of a received message).
    pub fn decode(bytes: &[u8]) -> Result<Self, E2eError> {
        let mut p = Parser::new(bytes);
        let client_version = p.w16()?;
        let key = p.maybe(|p| p.short_string())?;
        let sender_e2e_key = key.map(X25519PublicKey::from_spki).transpose()?;
        let nonce = p.array::<NONCE_LEN>()?;
        Ok(Self {
            header: PubHeader {
                client_version,
                sender_e2e_key,
            },
            nonce,
            enc_body: p.tail().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng as _;
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::keys::Ed25519SecretKey;

    fn seq<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start.wrapping_add(i as u8))
    }

    fn v5_secret() -> DhSecret {
        let rcv = X25519SecretKey::from_bytes(seq(0x60));
        let srv = X25519SecretKey::from_bytes(seq(0x80));
        rcv.diffie_hellman(&srv.public_key())
    }

    #[test]
    fn v5_msg_body_encrypts_and_decrypts() {
        let secret = v5_secret();
        assert_eq!(
            hex::encode(secret.as_bytes()),
            "fbfb11adeb1d6f71c0571bc1b5dd87519f9a6620b10a5ebc314cbd420c43ba43"
        );
        let msg_id = seq::<24>(0x10);
        let body = RcvMsgBody::Message {
            ts: 1_700_000_000,
            notification: false,
            body: b"hello".to_vec(),
        };
        assert_eq!(hex::encode(body.encode()), "000000006553f100462068656c6c6f");
        let enc = encrypt_msg_body(&secret, &msg_id, &body).unwrap();
        assert_eq!(enc.len(), 16122);
        assert_eq!(
            hex::encode(Sha256::digest(&enc)),
            "8e1ef514d44ae48ea9364df6f04d3a23674a0a9aaf3d64dd7418c793dcd56f10"
        );
        assert_eq!(
            hex::encode(&enc[..48]),
            "d283dac94c9bb4df05b1456051a3279498579c027a3725fe7d92dbf10538830502a86e0a6825e47d\
             5c6aeb853748681c"
        );
        assert_eq!(decrypt_msg_body(&secret, &msg_id, &enc).unwrap(), body);
        // The receiver's side is derived from its own private key and the server's public key.
        let rcv = X25519SecretKey::from_bytes(seq(0x60));
        let srv_pub = X25519SecretKey::from_bytes(seq(0x80)).public_key();
        assert_eq!(
            decrypt_msg_body(&rcv.diffie_hellman(&srv_pub), &msg_id, &enc).unwrap(),
            body
        );
    }

    #[test]
    fn msg_body_with_wrong_secret_or_id_fails() {
        let secret = v5_secret();
        let body = RcvMsgBody::Message {
            ts: 1,
            notification: true,
            body: vec![1, 2, 3],
        };
        let enc = encrypt_msg_body(&secret, &seq::<24>(0x10), &body).unwrap();
        assert!(matches!(
            decrypt_msg_body(&DhSecret::from_bytes([1; 32]), &seq::<24>(0x10), &enc),
            Err(E2eError::Crypto(CryptoError::Decrypt))
        ));
        assert!(matches!(
            decrypt_msg_body(&secret, &seq::<24>(0x11), &enc),
            Err(E2eError::Crypto(CryptoError::Decrypt))
        ));
    }

    #[test]
    fn quota_marker_round_trips() {
        let secret = v5_secret();
        let quota = RcvMsgBody::Quota { ts: 1_700_000_000 };
        assert_eq!(hex::encode(quota.encode()), "51554f544120000000006553f100");
        let enc = encrypt_msg_body(&secret, b"short-id", &quota).unwrap();
        assert_eq!(enc.len(), MSG_BODY_ENCRYPTED_LEN);
        assert_eq!(decrypt_msg_body(&secret, b"short-id", &enc).unwrap(), quota);
        // Strict: nothing may follow the timestamp.
        let mut long = quota.encode();
        long.push(0);
        assert!(RcvMsgBody::decode(&long).is_err());
        assert!(RcvMsgBody::decode(b"QUOTA 1234").is_err());
    }

    #[test]
    fn msg_flags_skip_reserved_characters() {
        let mut plain = 5i64.to_be_bytes().to_vec();
        plain.extend_from_slice(b"TXYZ body with spaces");
        assert_eq!(
            RcvMsgBody::decode(&plain).unwrap(),
            RcvMsgBody::Message {
                ts: 5,
                notification: true,
                body: b"body with spaces".to_vec()
            }
        );
        let mut no_space = 5i64.to_be_bytes().to_vec();
        no_space.extend_from_slice(b"F");
        assert!(RcvMsgBody::decode(&no_space).is_err());
        let mut bad_flag = 5i64.to_be_bytes().to_vec();
        bad_flag.extend_from_slice(b"X ");
        assert!(RcvMsgBody::decode(&bad_flag).is_err());
        assert!(RcvMsgBody::decode(b"short").is_err());
    }

    #[test]
    fn confirmation_envelope_is_15992_bytes_and_opens() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let sender = X25519SecretKey::generate(&mut rng);
        let recipient = X25519SecretKey::generate(&mut rng);
        let sender_auth = Ed25519SecretKey::generate(&mut rng).public_key();
        let msg = ClientMessage {
            header: PrivHeader::Confirmation(PublicKey::Ed25519(sender_auth)),
            body: b"agent confirmation".to_vec(),
        };
        let env = ClientMsgEnvelope::seal_confirmation(
            &mut rng,
            4,
            &sender,
            &recipient.public_key(),
            &msg,
        )
        .unwrap();
        let wire = env.encode().unwrap();
        assert_eq!(wire.len(), 15992);
        assert_eq!(wire.len(), E2E_CONFIRMATION_LEN);
        // W16 version, then Maybe '1' and ss(44-byte X25519 SPKI).
        assert_eq!(&wire[..4], &[0x00, 0x04, b'1', 44]);
        assert_eq!(&wire[4..48], sender.public_key().to_spki().as_slice());

        let parsed = ClientMsgEnvelope::decode(&wire).unwrap();
        assert_eq!(parsed, env);
        let (secret, opened) = parsed.open_confirmation(&recipient).unwrap();
        assert_eq!(opened, msg);
        assert_eq!(secret, sender.diffie_hellman(&recipient.public_key()));
        // A third party's key cannot open it.
        let stranger = X25519SecretKey::generate(&mut rng);
        assert!(matches!(
            parsed.open_confirmation(&stranger),
            Err(E2eError::Crypto(CryptoError::Decrypt))
        ));
    }

    #[test]
    fn normal_envelope_is_16043_bytes_and_opens() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let secret = DhSecret::from_bytes(seq(0x21));
        let msg = ClientMessage {
            header: PrivHeader::Empty,
            body: vec![0xaa; 15000],
        };
        let env = ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, &msg).unwrap();
        let wire = env.encode().unwrap();
        assert_eq!(wire.len(), 16043);
        assert_eq!(wire.len(), E2E_MESSAGE_LEN);
        assert_eq!(&wire[..3], b"\x00\x040");
        let parsed = ClientMsgEnvelope::decode(&wire).unwrap();
        assert_eq!(parsed.header.sender_e2e_key, None);
        assert_eq!(parsed.open(&secret).unwrap(), msg);
        // Tampering with the ciphertext or using another secret fails cleanly.
        let mut tampered = wire.clone();
        tampered[100] ^= 1;
        let t = ClientMsgEnvelope::decode(&tampered).unwrap();
        assert!(matches!(
            t.open(&secret),
            Err(E2eError::Crypto(CryptoError::Decrypt))
        ));
        assert!(matches!(
            parsed.open(&DhSecret::from_bytes([0; 32])),
            Err(E2eError::Crypto(CryptoError::Decrypt))
        ));
        // A confirmation-only call on a normal envelope is a clean error.
        let k = X25519SecretKey::generate(&mut rng);
        assert!(matches!(
            parsed.open_confirmation(&k),
            Err(E2eError::Decode(_))
        ));
        // Two seals of the same message use different nonces.
        let env2 = ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, &msg).unwrap();
        assert_ne!(env2.nonce, env.nonce);
    }

    #[test]
    fn envelope_size_limits() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let secret = DhSecret::from_bytes(seq(1));
        // privHeader '_' takes one byte of the 16000 - 2 available.
        let max = ClientMessage {
            header: PrivHeader::Empty,
            body: vec![0; E2E_MESSAGE_PAD - 3],
        };
        assert!(ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, &max).is_ok());
        let over = ClientMessage {
            header: PrivHeader::Empty,
            body: vec![0; E2E_MESSAGE_PAD - 2],
        };
        assert!(matches!(
            ClientMsgEnvelope::seal(&mut rng, 4, None, &secret, &over),
            Err(E2eError::Crypto(CryptoError::TooLarge { .. }))
        ));
    }

    #[test]
    fn malformed_envelopes_and_headers_are_errors() {
        assert!(ClientMsgEnvelope::decode(&[]).is_err());
        assert!(ClientMsgEnvelope::decode(b"\x00\x04").is_err());
        assert!(ClientMsgEnvelope::decode(b"\x00\x042").is_err());
        // Maybe '1' with an Ed25519 key where X25519 is required.
        let ed = Ed25519SecretKey::from_seed(&[0; 32]).public_key().to_spki();
        let mut wrong = b"\x00\x041".to_vec();
        wrong.push(44);
        wrong.extend_from_slice(&ed);
        wrong.extend_from_slice(&[0; 40]);
        assert!(matches!(
            ClientMsgEnvelope::decode(&wrong),
            Err(E2eError::Key(_))
        ));
        // Short nonce.
        assert!(ClientMsgEnvelope::decode(b"\x00\x040abc").is_err());
        assert!(ClientMessage::decode(b"").is_err());
        assert!(ClientMessage::decode(b"Xbody").is_err());
        assert!(ClientMessage::decode(b"K\x05abcde").is_err());
        assert_eq!(
            ClientMessage::decode(b"_hi").unwrap(),
            ClientMessage {
                header: PrivHeader::Empty,
                body: b"hi".to_vec()
            }
        );
    }
}
