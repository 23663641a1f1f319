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
