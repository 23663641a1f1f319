//! Sending through an SMP proxy (§5.5), client side: validating PKEY, building PFWD and
//! opening PRES.
//!
//! The proxy only relays sealed bytes; everything here is between the client and the
//! destination relay:
//!
//! ```text
//! PRXY relay       → PKEY ss(sessionId) minV maxV certCount 1*L(cert) L(signedKey)
//! PFWD v ss(cmdKey) encT,  encT = crypto_box(X25519(cmdPriv, relayKey), N, pad(0x01 L(t), 16226))
//! PRES encR,               encR = crypto_box(same secret, reverse(N), pad(0x01 L(r), 16226))
//! ```
//!
//! `N` is the PFWD's corrId; the inner transmission `t` reuses it as its own corrId and as the
//! nonce of an X25519 authenticator made with the relay's key. Nothing here does IO or reads a
//! clock: the caller passes the unix time for certificate validity and an RNG for keys.

use std::fmt;

use rand_core::{CryptoRng, RngCore};

use crate::block::{BlockError, decode_batch};
use crate::cert::{CertError, KeyHash, validate_chain};
use crate::command::{Command, ProxyKey, Response};
use crate::connection::CorrId;
use crate::crypto::{CryptoError, QueueAuthKey, TAG_LEN, cb_decrypt, cb_encrypt};
use crate::encoding::{DecodeError, EncodeError, put_large};
use crate::error::ReconnectAction;
use crate::handshake::{HandshakeError, VersionRange, negotiate};
use crate::keys::{DhSecret, X25519PublicKey, X25519SecretKey};
use crate::transmission::{
    Authorized, Transmission, TransmissionError, encode_transmission, transmission_len,
};

/// Pad target of the one-item batch inside PFWD and PRES (`paddedProxiedTLength`).
pub const PADDED_PROXIED_LEN: usize = 16226;

/// Size of the sealed batch in PFWD and PRES: the tag plus [`PADDED_PROXIED_LEN`].
pub const ENCRYPTED_PROXIED_LEN: usize = TAG_LEN + PADDED_PROXIED_LEN;

/// Largest inner transmission: the batch `0x01 L(t)` must fit the pad's payload.
pub const MAX_PROXIED_TRANSMISSION_LEN: usize = PADDED_PROXIED_LEN - 2 - 3;

/// Why a PKEY was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyKeyError {
    /// The relay's chain is not trustworthy, belongs to another server, or did not sign the
    /// session key.
    #[error("relay not authenticated: {0}")]
    Cert(#[from] CertError),
    /// The signed session key is not an X25519 key.
    #[error("relay session key is not X25519")]
    SessionKey,
    /// PKEY's version range has its minimum above its maximum.
    #[error("invalid relay version range {min}..{max}")]
    VersionRange {
        /// The minimum sent.
        min: u16,
        /// The maximum sent.
        max: u16,
    },
    /// The relay's versions (as capped by the proxy) and ours do not overlap.
    #[error("no common relay version: relay offers {relay}, client {client}")]
    Version {
        /// What PKEY offered.
        relay: VersionRange,
        /// What the client supports.
        client: VersionRange,
    },
}

impl ProxyKeyError {
    /// What to do about it: the relay will present the same identity and versions again, so
    /// asking the same proxy again does not help.
    pub fn reconnect(&self) -> ReconnectAction {
        ReconnectAction::GiveUp
    }
}

/// Why a PFWD could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// Relays accept only SEND, SKEY, LKEY and LGET through a proxy (others get
    /// `CMD PROHIBITED`), so the rest are refused before anything is sent.
    #[error("{0} cannot be sent through a proxy")]
    NotForwardable(&'static str),
    /// The inner command cannot be encoded at the relay version.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The inner command could not be authorized.
    #[error("authorization failed: {0}")]
    Auth(#[from] CryptoError),
    /// The inner transmission does not fit [`MAX_PROXIED_TRANSMISSION_LEN`].
    #[error("forwarded transmission of {0} bytes is too large")]
    TooLarge(usize),
}

impl ForwardError {
    /// What to do about it: the command itself is at fault.
    pub fn reconnect(&self) -> ReconnectAction {
        ReconnectAction::GiveUp
    }
}

/// Why a PRES could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxiedResponseError {
    /// Authentication or unpadding failed: not sealed for this command.
    #[error("PRES did not decrypt")]
    Decrypt,
    /// The batch framing did not parse.
    #[error("malformed PRES batch: {0}")]
    Batch(#[from] BlockError),
    /// The batch did not hold exactly one transmission.
    #[error("PRES carried {0} transmissions, expected 1")]
    Count(usize),
    /// The relay's transmission did not parse.
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
    /// The relay's response did not parse, or had an entity it must not have.
    #[error("relay response did not parse: {0}")]
    Response(DecodeError),
    /// The relay's answer carried another corrId or entity than the forwarded command.
    #[error("relay response belongs to another command")]
    Mismatch,
}

impl ProxiedResponseError {
    /// What to do about it: a garbled answer says nothing about whether the relay acted on
    /// the command, so the caller retries (SMP commands sent by a sender are idempotent
    /// enough for that: SKEY with the same key is OK, a repeated SEND is a duplicate the
    /// recipient's agent drops).
    pub fn reconnect(&self) -> ReconnectAction {
        ReconnectAction::Retry
    }
}

/// A relay reached through a proxy, from a validated PKEY (`ProxiedRelay` upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRelay {
    session_id: Vec<u8>,
    version: u16,
    relay_versions: VersionRange,
    relay_key: X25519PublicKey,
}

impl ProxiedRelay {
    /// Validates PKEY as a direct handshake would (§2.3, §2.6): the chain has 2–4
    /// certificates, its identity certificate (index 1) hashes to `expected`, it validates
    /// with the last certificate as anchor at `now_unix`, and the leaf signed the relay's
    /// X25519 session key. The version is the highest both sides support, i.e.
    /// `min(client max, relay max)` when that is not below either minimum.
    pub fn from_proxy_key(
        pkey: &ProxyKey,
        expected: &KeyHash,
        client_versions: VersionRange,
        now_unix: i64,
    ) -> Result<Self, ProxyKeyError> {
        // The decoder already refuses min > max; a hand-built ProxyKey might not.
        let relay_versions = VersionRange::new(pkey.min_version, pkey.max_version).ok_or(
            ProxyKeyError::VersionRange {
                min: pkey.min_version,
                max: pkey.max_version,
            },
        )?;
        let version = negotiate(relay_versions, client_versions).map_err(|e| match e {
            HandshakeError::Version { server, client } => ProxyKeyError::Version {
                relay: server,
                client,
            },
            // `negotiate` fails with nothing else.
            _ => ProxyKeyError::Version {
                relay: relay_versions,
                client: client_versions,
            },
        })?;
        let chain: Vec<&[u8]> = pkey.cert_chain.iter().map(Vec::as_slice).collect();
        let validated = validate_chain(&chain, expected, now_unix)?;
        let spki = validated.verify_signed_key(&pkey.signed_key)?;
        let relay_key = X25519PublicKey::from_spki(&spki).map_err(|_| ProxyKeyError::SessionKey)?;
        Ok(Self {
            session_id: pkey.session_id.clone(),
            version,
            relay_versions,
            relay_key,
        })
    }

    /// The proxy↔relay session id: the entity of every PFWD, and the implied session id of
    /// the inner transmissions.
    pub fn session_id(&self) -> &[u8] {
        &self.session_id
    }

    /// The relay version the inner transmissions are encoded at.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The relay's range as the proxy advertised it.
    pub fn relay_versions(&self) -> VersionRange {
        self.relay_versions
    }

    /// The relay's verified X25519 session key.
    pub fn relay_key(&self) -> &X25519PublicKey {
        &self.relay_key
    }

    /// Builds the PFWD carrying `command` for `entity_id` (a sender or link id), authorized
    /// with `auth` when given. `corr_id` must be the corrId the PFWD is sent with: it is the
    /// nonce of the sealing and of an X25519 authenticator, so it must never be reused. A
    /// fresh command key is drawn from `rng` for every call.
    ///
    /// Returns the PFWD command (entity = [`Self::session_id`], no authorization) and what
    /// is needed to open its PRES.
    pub fn forward<R: RngCore + CryptoRng>(
        &self,
        rng: &mut R,
        corr_id: &CorrId,
        entity_id: &[u8],
        command: &Command,
        auth: Option<&QueueAuthKey>,
    ) -> Result<(Command, PendingForward), ForwardError> {
        match command {
            Command::Send { .. } | Command::SKey(_) | Command::LKey(_) | Command::LGet => {}
            other => return Err(ForwardError::NotForwardable(other.tag())),
        }
        let nonce = corr_id.as_bytes();
        let mut cmd = Vec::new();
        command.encode(self.version, &mut cmd)?;
        let authorized = Authorized::new(&self.session_id, nonce, entity_id, &cmd)?;
        let auth_bytes = match auth {
            Some(k) => k.authorize(authorized.as_bytes(), nonce, Some(&self.relay_key))?,
            None => Vec::new(),
        };
        let len = transmission_len(self.version, auth_bytes.len(), &authorized);
        if len > MAX_PROXIED_TRANSMISSION_LEN {
            return Err(ForwardError::TooLarge(len));
        }
        let mut t = Vec::with_capacity(len);
        encode_transmission(self.version, &auth_bytes, &authorized, &mut t)?;
        // A one-item batch, as the relay parses a forwarded block.
        let mut batch = Vec::with_capacity(3 + t.len());
        batch.push(1);
        put_large(&mut batch, &t)?;

        let cmd_key = X25519SecretKey::generate(rng);
        let secret = cmd_key.diffie_hellman(&self.relay_key);
        // The length check above keeps the batch within the pad, so this cannot fail.
        let enc = cb_encrypt(&secret, nonce, &batch, PADDED_PROXIED_LEN)
            .map_err(|_| ForwardError::TooLarge(len))?;
        let pfwd = Command::PFwd {
            version: self.version,
            key: cmd_key.public_key().to_spki(),
            enc,
        };
        let pending = PendingForward {
            corr_id: *corr_id,
            secret,
            version: self.version,
            session_id: self.session_id.clone(),
            entity_id: entity_id.to_vec(),
        };
        Ok((pfwd, pending))
    }
}

/// What is kept between sending a PFWD and opening its PRES.
#[derive(Clone)]
pub struct PendingForward {
    corr_id: CorrId,
    secret: DhSecret,
    version: u16,
    session_id: Vec<u8>,
    entity_id: Vec<u8>,
}

impl PendingForward {
    /// Rebuilds the state from its parts, for fake relays, fuzzing, or a caller that stores
    /// pending forwards itself. `secret` is X25519(command key, relay key); `version` and
    /// `session_id` are the relay's, as in [`ProxiedRelay`].
    pub fn from_parts(
        corr_id: CorrId,
        secret: DhSecret,
        version: u16,
        session_id: Vec<u8>,
        entity_id: Vec<u8>,
    ) -> Self {
        Self {
            corr_id,
            secret,
            version,
            session_id,
            entity_id,
        }
    }

    /// The PFWD's corrId, which its PRES (or `ERR PROXY …`) carries.
    pub fn corr_id(&self) -> CorrId {
        self.corr_id
    }

    /// The entity the inner command was sent for.
    pub fn entity_id(&self) -> &[u8] {
        &self.entity_id
    }

    /// Opens the `encR` of a PRES: decrypt with nonce = reverse(N) (Trap 17, not corrId + 1),
    /// unpad, then exactly one transmission from the relay. `ERR` from the relay comes back as
    /// [`Response::Err`], like any other response.
    pub fn open(&self, enc: &[u8]) -> Result<ProxiedResponse, ProxiedResponseError> {
        let mut nonce = *self.corr_id.as_bytes();
        nonce.reverse();
        let batch =
            cb_decrypt(&self.secret, &nonce, enc).map_err(|_| ProxiedResponseError::Decrypt)?;
        let items = decode_batch(&batch)?;
        let [item] = items[..] else {
            return Err(ProxiedResponseError::Count(items.len()));
        };
        let t = Transmission::decode(self.version, &self.session_id, item)?;
        let response =
            Response::decode(self.version, t.command).map_err(ProxiedResponseError::Response)?;
        if !response.entity_ok(t.entity_id) {
            return Err(ProxiedResponseError::Response(DecodeError::Invalid(
                "entity id",
            )));
        }
        // The relay echoes our corrId and entity. An ERR is let through whatever it carries
        // (the relay may fail before reading them), as on a direct connection.
        let ours = t.corr_id == self.corr_id.as_bytes() && t.entity_id == self.entity_id;
        if !ours && !matches!(response, Response::Err(_)) {
            return Err(ProxiedResponseError::Mismatch);
        }
        Ok(ProxiedResponse {
            entity_id: t.entity_id.to_vec(),
            response,
        })
    }
}

impl fmt::Debug for PendingForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of logs; DhSecret's Debug redacts it anyway.
        f.debug_struct("PendingForward")
            .field("corr_id", &self.corr_id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// The relay's answer to a forwarded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedResponse {
    /// The entity the relay answered for.
    pub entity_id: Vec<u8>,
    /// The response (`OK`, `LNK`, or `ERR` from the relay).
    pub response: Response,
}

#[cfg(test)]
mod tests {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::hash::MessageDigest;
    use openssl::pkey::{Id, PKey, Private};
    use openssl::x509::extension::BasicConstraints;
    use openssl::x509::{X509Builder, X509NameBuilder};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng as _;

    use super::*;
    use crate::block::BatchBuilder;
    use crate::cert::{self, SignatureAlgorithm};
    use crate::crypto::{ed25519_verify, verify_x25519_authenticator};
    use crate::handshake::CLIENT_VERSIONS;
    use crate::keys::{Ed25519SecretKey, PublicKey};

    /// Inside the test certificates' validity (2023-11-14 .. 2033-05-18).
    const NOW: i64 = 1_750_000_000;

    fn range(min: u16, max: u16) -> VersionRange {
        VersionRange::new(min, max).unwrap()
    }

    fn cert(
        subject: &str,
        key: &PKey<Private>,
        issuer: (&str, &PKey<Private>),
        ca: bool,
    ) -> Vec<u8> {
        let name = |cn: &str| {
            let mut n = X509NameBuilder::new().unwrap();
            n.append_entry_by_text("CN", cn).unwrap();
            n.build()
        };
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let serial = BigNum::from_u32(7).unwrap().to_asn1_integer().unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name(subject)).unwrap();
        b.set_issuer_name(&name(issuer.0)).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::from_unix(1_700_000_000).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(2_000_000_000).unwrap())
            .unwrap();
        if ca {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
        }
        b.sign(issuer.1, MessageDigest::null()).unwrap();
        b.build().to_der().unwrap()
    }

    /// The destination relay: an Ed25519 `[leaf, ca]` chain, and the X25519 session key
    /// signed by the leaf, as a proxy passes them on in PKEY.
    struct Relay {
        chain: Vec<Vec<u8>>,
        leaf: Ed25519SecretKey,
        session: X25519SecretKey,
        session_id: Vec<u8>,
    }

    impl Relay {
        fn new(rng: &mut ChaCha20Rng) -> Self {
            let leaf = Ed25519SecretKey::generate(rng);
            let leaf_pkey =
                PKey::private_key_from_raw_bytes(&*leaf.to_seed(), Id::ED25519).unwrap();
            let ca = PKey::generate_ed25519().unwrap();
            let chain = vec![
                cert("relay", &leaf_pkey, ("relay ca", &ca), false),
                cert("relay ca", &ca, ("relay ca", &ca), true),
            ];
            let mut session_id = vec![0u8; 32];
            rng.fill_bytes(&mut session_id);
            Self {
                chain,
                leaf,
                session: X25519SecretKey::generate(rng),
                session_id,
            }
        }

        fn key_hash(&self) -> KeyHash {
            cert::key_hash(&self.chain[1])
        }

        fn signed(&self, spki: &[u8], by: &Ed25519SecretKey) -> Vec<u8> {
            let object = cert::signed_key_object(spki);
            cert::encode_signed_key(&object, SignatureAlgorithm::Ed25519, &by.sign(&object))
        }

        /// PKEY as the proxy sends it (relay range capped at 8..17).
        fn pkey(&self) -> ProxyKey {
            ProxyKey {
                session_id: self.session_id.clone(),
                min_version: 8,
                max_version: 17,
                cert_chain: self.chain.clone(),
                signed_key: self.signed(&self.session.public_key().to_spki(), &self.leaf),
            }
        }

        fn proxied(&self) -> ProxiedRelay {
            ProxiedRelay::from_proxy_key(&self.pkey(), &self.key_hash(), CLIENT_VERSIONS, NOW)
                .unwrap()
        }

        /// The relay's side of RFWD after the proxy unwrapped it: opens `encT` and returns
        /// the secret and the one transmission's bytes.
        fn open(&self, pfwd: &Command, corr: &CorrId) -> (DhSecret, u16, Vec<u8>) {
            let Command::PFwd { version, key, enc } = pfwd else {
                panic!("{pfwd:?}")
            };
            assert_eq!(enc.len(), ENCRYPTED_PROXIED_LEN);
            let cmd_key = X25519PublicKey::from_spki(key).unwrap();
            let secret = self.session.diffie_hellman(&cmd_key);
            let batch = cb_decrypt(&secret, corr.as_bytes(), enc).unwrap();
            let items = decode_batch(&batch).unwrap();
            assert_eq!(items.len(), 1);
            (secret, *version, items[0].to_vec())
        }

        /// Seals the relay's answer to the client: `crypto_box(secret, reverse(N),
        /// pad(0x01 L(t), 16226))`.
        fn seal(
            &self,
            secret: &DhSecret,
            version: u16,
            corr: &[u8],
            items: &[(&[u8], Response)],
        ) -> Vec<u8> {
            self.seal_as(secret, version, corr, corr, items)
        }

        /// As `seal`, with `inner_corr` in the transmissions and `corr` as the nonce source.
        fn seal_as(
            &self,
            secret: &DhSecret,
            version: u16,
            corr: &[u8],
            inner_corr: &[u8],
            items: &[(&[u8], Response)],
        ) -> Vec<u8> {
            let mut batch = BatchBuilder::new();
            for (entity, r) in items {
                let mut cmd = Vec::new();
                r.encode(version, &mut cmd).unwrap();
                let a = Authorized::new(&self.session_id, inner_corr, entity, &cmd).unwrap();
                let mut t = Vec::new();
                encode_transmission(version, b"", &a, &mut t).unwrap();
                assert!(batch.push(&t));
            }
            let mut nonce: [u8; 24] = corr.try_into().unwrap();
            nonce.reverse();
            let enc = cb_encrypt(secret, &nonce, &batch.take(), PADDED_PROXIED_LEN).unwrap();
            assert_eq!(enc.len(), ENCRYPTED_PROXIED_LEN);
            enc
        }
    }

    fn send(body: &[u8]) -> Command {
        Command::Send {
            notification: false,
            body: body.to_vec(),
        }
    }

    #[test]
    fn pkey_validates_and_picks_the_highest_common_version() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let relay = Relay::new(&mut rng);
        let r = relay.proxied();
        assert_eq!(r.version(), 17);
        assert_eq!(r.relay_versions(), range(8, 17));
        assert_eq!(r.session_id(), relay.session_id);
        assert_eq!(r.relay_key(), &relay.session.public_key());
        // min(client max, relay max), as long as both minimums allow it.
        let pkey = relay.pkey();
        let kh = relay.key_hash();
        let v = |client| ProxiedRelay::from_proxy_key(&pkey, &kh, client, NOW).map(|r| r.version());
        assert_eq!(v(range(6, 12)), Ok(12));
        assert_eq!(v(range(17, 30)), Ok(17));
        assert_eq!(
            v(range(6, 7)),
            Err(ProxyKeyError::Version {
                relay: range(8, 17),
                client: range(6, 7)
            })
        );
        assert!(matches!(
            v(range(18, 18)),
            Err(ProxyKeyError::Version { .. })
        ));
        let mut inverted = relay.pkey();
        inverted.min_version = 18;
        assert_eq!(
            ProxiedRelay::from_proxy_key(&inverted, &kh, CLIENT_VERSIONS, NOW),
            Err(ProxyKeyError::VersionRange { min: 18, max: 17 })
        );
    }

    #[test]
    fn pkey_rejections() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let relay = Relay::new(&mut rng);
        let kh = relay.key_hash();
        let check = |pkey: &ProxyKey, kh: &KeyHash, now| {
            ProxiedRelay::from_proxy_key(pkey, kh, CLIENT_VERSIONS, now)
        };
        // Another server's identity.
        let other = cert::key_hash(&relay.chain[0]);
        assert!(matches!(
            check(&relay.pkey(), &other, NOW),
            Err(ProxyKeyError::Cert(CertError::IdentityMismatch { .. }))
        ));
        // Outside the validity period.
        assert!(matches!(
            check(&relay.pkey(), &kh, 2_100_000_000),
            Err(ProxyKeyError::Cert(CertError::Expired { .. }))
        ));
        // Session key signed by the CA-less impostor rather than the chain leaf.
        let mut forged = relay.pkey();
        let impostor = Ed25519SecretKey::generate(&mut rng);
        forged.signed_key = relay.signed(&relay.session.public_key().to_spki(), &impostor);
        assert_eq!(
            check(&forged, &kh, NOW),
            Err(ProxyKeyError::Cert(CertError::BadSignature))
        );
        // A correctly signed key that is not X25519.
        let mut ed = relay.pkey();
        ed.signed_key = relay.signed(
            &PublicKey::Ed25519(impostor.public_key()).to_spki(),
            &relay.leaf,
        );
        assert_eq!(check(&ed, &kh, NOW), Err(ProxyKeyError::SessionKey));
        // One certificate, five certificates, garbage.
        let mut one = relay.pkey();
        one.cert_chain.truncate(1);
        assert_eq!(
            check(&one, &kh, NOW),
            Err(ProxyKeyError::Cert(CertError::ChainLength(1)))
        );
        let mut five = relay.pkey();
        five.cert_chain = vec![relay.chain[0].clone(); 5];
        assert_eq!(
            check(&five, &kh, NOW),
            Err(ProxyKeyError::Cert(CertError::ChainLength(5)))
        );
        let mut junk = relay.pkey();
        junk.signed_key = vec![0x30, 0x00];
        assert!(matches!(
            check(&junk, &kh, NOW),
            Err(ProxyKeyError::Cert(CertError::MalformedSignedKey(_)))
        ));
        assert_eq!(
            ProxyKeyError::SessionKey.reconnect(),
            ReconnectAction::GiveUp
        );
    }

    #[test]
    fn forwarded_send_round_trips_through_the_relay() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let relay = Relay::new(&mut rng);
        let proxied = relay.proxied();
        let snd_id = [0x5a; 24];
        let ed = Ed25519SecretKey::generate(&mut rng);
        let x = X25519SecretKey::generate(&mut rng);
        let keys = [
            None,
            Some(QueueAuthKey::Ed25519(ed.clone())),
            Some(QueueAuthKey::X25519(x.clone())),
        ];
        let mut seen_cmd_keys = Vec::new();
        for auth in &keys {
            let corr = CorrId::random(&mut rng);
            let (pfwd, pending) = proxied
                .forward(
                    &mut rng,
                    &corr,
                    &snd_id,
                    &send(b"hello relay"),
                    auth.as_ref(),
                )
                .unwrap();
            assert_eq!(pending.corr_id(), corr);
            let Command::PFwd { key, .. } = &pfwd else {
                panic!()
            };
            seen_cmd_keys.push(key.clone());
            // The relay's view: version 17, corrId = N, the sender id, SEND, and an
            // authorization over the relay's (implied) session id.
            let (secret, version, t) = relay.open(&pfwd, &corr);
            assert_eq!(version, 17);
            let t = Transmission::decode(version, &relay.session_id, &t).unwrap();
            assert_eq!(t.corr_id, corr.as_bytes());
            assert_eq!(t.entity_id, snd_id);
            assert_eq!(
                Command::decode(version, t.command).unwrap(),
                send(b"hello relay")
            );
            let authorized = t.authorized(&relay.session_id).unwrap();
            match auth {
                None => assert!(t.auth.is_empty()),
                Some(QueueAuthKey::Ed25519(_)) => {
                    ed25519_verify(&ed.public_key(), &authorized, t.auth).unwrap();
                }
                Some(_) => assert!(verify_x25519_authenticator(
                    &relay.session,
                    &x.public_key(),
                    corr.as_bytes(),
                    t.auth,
                    &authorized
                )),
            }
            // OK and ERR AUTH come back through PRES.
            for answer in [Response::Ok, Response::Err(crate::error::ErrorType::Auth)] {
                let pres = relay.seal(
                    &secret,
                    version,
                    corr.as_bytes(),
                    &[(&snd_id, answer.clone())],
                );
                assert_eq!(
                    pending.open(&pres),
                    Ok(ProxiedResponse {
                        entity_id: snd_id.to_vec(),
                        response: answer
                    })
                );
            }
        }
        // A fresh command key every time.
        seen_cmd_keys.dedup();
        assert_eq!(seen_cmd_keys.len(), 3);
    }

    #[test]
    fn pres_failures_are_typed() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let relay = Relay::new(&mut rng);
        let proxied = relay.proxied();
        let snd_id = [1u8; 24];
        let corr = CorrId::random(&mut rng);
        let (pfwd, pending) = proxied
            .forward(&mut rng, &corr, &snd_id, &send(b"x"), None)
            .unwrap();
        let (secret, v, _) = relay.open(&pfwd, &corr);
        let ok = relay.seal(&secret, v, corr.as_bytes(), &[(&snd_id, Response::Ok)]);
        assert!(pending.open(&ok).is_ok());

        // Trap 17: sealed with nonce N itself (or corrId + 1) does not open.
        let mut t = Vec::new();
        let a = Authorized::new(&relay.session_id, corr.as_bytes(), &snd_id, b"OK").unwrap();
        encode_transmission(v, b"", &a, &mut t).unwrap();
        let mut batch = vec![1];
        put_large(&mut batch, &t).unwrap();
        let same_nonce = cb_encrypt(&secret, corr.as_bytes(), &batch, PADDED_PROXIED_LEN).unwrap();
        assert_eq!(
            pending.open(&same_nonce),
            Err(ProxiedResponseError::Decrypt)
        );
        // Tampered, truncated, empty.
        let mut tampered = ok.clone();
        tampered[500] ^= 1;
        assert_eq!(pending.open(&tampered), Err(ProxiedResponseError::Decrypt));
        assert_eq!(pending.open(&ok[..15]), Err(ProxiedResponseError::Decrypt));
        assert_eq!(pending.open(&[]), Err(ProxiedResponseError::Decrypt));
        // Two transmissions.
        let two = relay.seal(
            &secret,
            v,
            corr.as_bytes(),
            &[(&snd_id, Response::Ok), (&snd_id, Response::Ok)],
        );
        assert_eq!(pending.open(&two), Err(ProxiedResponseError::Count(2)));
        // Another corrId or entity (ERR is accepted whatever it carries).
        let other = relay.seal_as(
            &secret,
            v,
            corr.as_bytes(),
            &[9; 24],
            &[(&snd_id, Response::Ok)],
        );
        assert_eq!(pending.open(&other), Err(ProxiedResponseError::Mismatch));
        let wrong_entity = relay.seal(&secret, v, corr.as_bytes(), &[(&[2u8; 24], Response::Ok)]);
        assert_eq!(
            pending.open(&wrong_entity),
            Err(ProxiedResponseError::Mismatch)
        );
        let err = relay.seal(
            &secret,
            v,
            corr.as_bytes(),
            &[(b"", Response::Err(crate::error::ErrorType::Block))],
        );
        assert!(matches!(
            pending.open(&err),
            Ok(ProxiedResponse {
                response: Response::Err(_),
                ..
            })
        ));
        // PONG may not carry an entity; a garbage command does not parse.
        let pong = relay.seal(&secret, v, corr.as_bytes(), &[(&snd_id, Response::Pong)]);
        assert!(matches!(
            pending.open(&pong),
            Err(ProxiedResponseError::Response(_))
        ));
        // Not a batch at all.
        let mut n = *corr.as_bytes();
        n.reverse();
        let junk = cb_encrypt(&secret, &n, b"\x00", PADDED_PROXIED_LEN).unwrap();
        assert!(matches!(
            pending.open(&junk),
            Err(ProxiedResponseError::Batch(_))
        ));
        let bad_t = cb_encrypt(&secret, &n, b"\x01\x00\x02\x05\x01", PADDED_PROXIED_LEN).unwrap();
        assert!(matches!(
            pending.open(&bad_t),
            Err(ProxiedResponseError::Transmission(_))
        ));
    }

    #[test]
    fn only_sender_commands_fit_and_size_is_bounded() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let relay = Relay::new(&mut rng);
        let proxied = relay.proxied();
        let corr = CorrId::random(&mut rng);
        for cmd in [Command::Sub, Command::Ping, Command::Get, Command::Del] {
            assert_eq!(
                proxied
                    .forward(&mut rng, &corr, &[1; 24], &cmd, None)
                    .unwrap_err(),
                ForwardError::NotForwardable(cmd.tag())
            );
        }
        let key = X25519SecretKey::generate(&mut rng).public_key().to_spki();
        for cmd in [
            Command::SKey(key.clone()),
            Command::LKey(key),
            Command::LGet,
        ] {
            assert!(
                proxied
                    .forward(&mut rng, &corr, &[1; 24], &cmd, None)
                    .is_ok()
            );
        }
        // The largest SEND that fits, and one byte more.
        let overhead = {
            let a =
                Authorized::new(&relay.session_id, corr.as_bytes(), &[1; 24], b"SEND F ").unwrap();
            transmission_len(17, 0, &a)
        };
        let max = MAX_PROXIED_TRANSMISSION_LEN - overhead;
        assert!(
            proxied
                .forward(&mut rng, &corr, &[1; 24], &send(&vec![0; max]), None)
                .is_ok()
        );
        assert_eq!(
            proxied
                .forward(&mut rng, &corr, &[1; 24], &send(&vec![0; max + 1]), None)
                .unwrap_err(),
            ForwardError::TooLarge(MAX_PROXIED_TRANSMISSION_LEN + 1)
        );
        // SKEY does not exist below v9.
        let mut old = relay.pkey();
        old.max_version = 8;
        let old =
            ProxiedRelay::from_proxy_key(&old, &relay.key_hash(), CLIENT_VERSIONS, NOW).unwrap();
        let key = X25519SecretKey::generate(&mut rng).public_key().to_spki();
        assert!(matches!(
            old.forward(&mut rng, &corr, &[1; 24], &Command::SKey(key), None),
            Err(ForwardError::Encode(EncodeError::Unsupported { .. }))
        ));
    }

    /// The bytes equal what `tests/smp-devrelay/tests/relay.rs` builds by hand for its proxied
    /// SEND (encode at v, implied relay session id, one-item batch, crypto_box with a fresh
    /// command key and nonce = corrId, padded to 16226).
    #[test]
    fn pfwd_matches_a_hand_built_one() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let relay = Relay::new(&mut rng);
        let proxied = relay.proxied();
        let snd_id = [0x33; 24];
        let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut rng));
        let corr = CorrId::from_bytes([7; 24]);
        let mut twin = rng.clone();
        let (pfwd, _) = proxied
            .forward(&mut rng, &corr, &snd_id, &send(b"via proxy"), Some(&auth))
            .unwrap();

        let v = 17;
        let mut cmd = Vec::new();
        send(b"via proxy").encode(v, &mut cmd).unwrap();
        let a = Authorized::new(&relay.session_id, corr.as_bytes(), &snd_id, &cmd).unwrap();
        let sig = auth
            .authorize(
                a.as_bytes(),
                corr.as_bytes(),
                Some(&relay.session.public_key()),
            )
            .unwrap();
        let mut t = Vec::new();
        encode_transmission(v, &sig, &a, &mut t).unwrap();
        let mut batch = BatchBuilder::new();
        assert!(batch.push(&t));
        let cmd_key = X25519SecretKey::generate(&mut twin);
        let secret = cmd_key.diffie_hellman(&relay.session.public_key());
        let enc = cb_encrypt(&secret, corr.as_bytes(), &batch.take(), 16226).unwrap();
        let expected = Command::PFwd {
            version: v,
            key: cmd_key.public_key().to_spki(),
            enc,
        };
        assert_eq!(pfwd, expected);
        let mut wire = Vec::new();
        pfwd.encode(18, &mut wire).unwrap();
        assert_eq!(&wire[..7], b"PFWD \x00\x11");
        assert_eq!(wire.len(), 5 + 2 + 45 + ENCRYPTED_PROXIED_LEN);
    }
}
