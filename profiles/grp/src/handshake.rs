//! The hybrid handshake (§5): Noise `IKpsk2` whose `psk2` is an ML-KEM-768 secret.
//!
//! ```text
//! client → relay   message 1 (2500) = e(32) ‖ enc s(48) ‖ enc payload 1 (2404 + 16)
//! relay → client   record 2  (2500) = ct(1088) ‖ e(32) ‖ enc payload 2 (1364 + 16)
//! ```
//!
//! The ciphertext travels in clear before Noise message 2 because the client needs the KEM
//! secret to process the `psk` token. [`Initiator`] and [`respond`] are pure functions of their
//! inputs and the RNG: ephemerals, the client's fresh static key, ML-KEM seeds and the session
//! auth key are all drawn from the RNG passed in. Snow gets its ephemeral through a resolver
//! whose "RNG" only hands out those pre-drawn bytes, so snow never reads OS randomness.

use std::collections::BTreeSet;
use std::fmt;

use muxd_smp::handshake::VersionRange;
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use rand_core::{CryptoRng, RngCore};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{Builder, HandshakeState};
use zeroize::Zeroizing;

use crate::cover::negotiate_rate;
use crate::error::GrpError;
use crate::kem::{CT_LEN, CheckedEncapsulationKey, EK_LEN, KemError, KemKeyPair};
use crate::record::RecordLayer;
use crate::{HS_LEN, INNER_VERSION, NOISE_PARAMS, PROLOGUE, Role};

/// `P1_LEN`: payload 1 before its AEAD tag.
pub const P1_LEN: usize = 2404;

/// `P2_LEN`: payload 2 before its AEAD tag.
pub const P2_LEN: usize = 1364;

/// Noise message 2 inside record 2: `e` (32) and the encrypted payload 2.
pub const MSG2_LEN: usize = HS_LEN - CT_LEN;

/// The only inner version range GRP/1 defines: 18..=18.
pub const INNER_VERSIONS: VersionRange = match VersionRange::new(INNER_VERSION, INNER_VERSION) {
    Some(r) => r,
    None => panic!("18..=18 is a valid range"),
};

/// Offset of `role` in payload 1 (after `W16(1184) ‖ ek`).
const P1_ROLE: usize = 2 + EK_LEN;

/// Payload 1: what the initiator asks for (§5.3).
#[derive(Clone, PartialEq, Eq)]
pub struct Payload1 {
    /// The ML-KEM-768 encapsulation key.
    pub ek: Box<[u8; EK_LEN]>,
    /// Client link or relay link.
    pub role: Role,
    /// The initiator's inner version range.
    pub inner: VersionRange,
    /// Requested cover rate in milli-records/s; 0 = no preference.
    pub cover_rate_req: u16,
}

impl Payload1 {
    /// The 2404-byte plaintext, reserved bytes zero.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(P1_LEN);
        out.extend_from_slice(&(EK_LEN as u16).to_be_bytes());
        out.extend_from_slice(self.ek.as_slice());
        out.push(self.role.to_byte());
        out.extend_from_slice(&self.inner.min().to_be_bytes());
        out.extend_from_slice(&self.inner.max().to_be_bytes());
        out.extend_from_slice(&self.cover_rate_req.to_be_bytes());
        out.resize(P1_LEN, 0);
        out
    }

    /// Parses a decrypted payload 1; reserved bytes are ignored. The `ek` modulus check is
    /// separate ([`CheckedEncapsulationKey::new`]).
    pub fn decode(p: &[u8]) -> Result<Self, Reject> {
        if p.len() != P1_LEN {
            return Err(Reject::Payload("payload 1 length"));
        }
        if p[..2] != (EK_LEN as u16).to_be_bytes() {
            return Err(Reject::Payload("ek_len"));
        }
        let mut ek = Box::new([0u8; EK_LEN]);
        ek.copy_from_slice(&p[2..P1_ROLE]);
        let role = Role::from_byte(p[P1_ROLE]).ok_or(Reject::Payload("role"))?;
        let w16 = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
        let inner = VersionRange::new(w16(P1_ROLE + 1), w16(P1_ROLE + 3))
            .ok_or(Reject::Payload("inner_min > inner_max"))?;
        Ok(Self {
            ek,
            role,
            inner,
            cover_rate_req: w16(P1_ROLE + 5),
        })
    }
}

impl fmt::Debug for Payload1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload1")
            .field("role", &self.role)
            .field("inner", &self.inner)
            .field("cover_rate_req", &self.cover_rate_req)
            .finish_non_exhaustive()
    }
}

/// Payload 2: what the relay answers (§5.4). Fields are raw; [`Payload2::check`] applies the
/// client's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload2 {
    /// The relay's per-connection session auth key `A`.
    pub auth_key: [u8; 32],
    /// The relay's lowest inner version.
    pub inner_min: u16,
    /// The relay's highest inner version.
    pub inner_max: u16,
    /// The negotiated cover rate, milli-records/s.
    pub cover_rate: u16,
}

impl Payload2 {
    /// The 1364-byte plaintext, reserved bytes zero.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(P2_LEN);
        out.extend_from_slice(&self.auth_key);
        out.extend_from_slice(&self.inner_min.to_be_bytes());
        out.extend_from_slice(&self.inner_max.to_be_bytes());
        out.extend_from_slice(&self.cover_rate.to_be_bytes());
        out.resize(P2_LEN, 0);
        out
    }

    /// Parses a decrypted payload 2 without judging its values.
    pub fn decode(p: &[u8]) -> Result<Self, GrpError> {
        if p.len() != P2_LEN {
            return Err(GrpError::HandshakeParse("payload 2 length"));
        }
        let w16 = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
        let mut auth_key = [0u8; 32];
        auth_key.copy_from_slice(&p[..32]);
        Ok(Self {
            auth_key,
            inner_min: w16(32),
            inner_max: w16(34),
            cover_rate: w16(36),
        })
    }

    /// Client step 4: non-zero auth key, an ordered range, a rate in [50, 2000].
    pub fn check(&self) -> Result<VersionRange, GrpError> {
        if self.auth_key == [0u8; 32] {
            return Err(GrpError::HandshakeParse("auth_key is all zero"));
        }
        if !(crate::cover::COVER_MIN..=crate::cover::COVER_MAX).contains(&self.cover_rate) {
            return Err(GrpError::HandshakeParse("cover_rate out of range"));
        }
        VersionRange::new(self.inner_min, self.inner_max)
            .ok_or(GrpError::HandshakeParse("inner_min > inner_max"))
    }
}

/// Step 5 of the client: `v = min(maxes)`, valid only if `v ≥ max(mins)`.
pub fn negotiate_version(ours: VersionRange, theirs: VersionRange) -> Option<u16> {
    ours.intersect(&theirs).map(|r| r.max())
}

/// Why the relay refused message 1. Callers log it; nothing about it reaches the wire (§5.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    /// Message 1 had the wrong size or did not decrypt.
    #[error("message 1 did not decrypt")]
    Decrypt,
    /// Payload 1 is malformed.
    #[error("malformed payload 1: {0}")]
    Payload(&'static str),
    /// The encapsulation key failed the FIPS 203 checks.
    #[error("bad encapsulation key: {0}")]
    EncapsulationKey(KemError),
    /// A relay link from a key that is not on the allow-list.
    #[error("relay-link initiator not on the allow-list")]
    NotAllowed,
    /// Snow failed while writing message 2 (cannot happen with valid sizes).
    #[error("internal handshake failure")]
    Internal,
}

/// What the initiator brings to a handshake.
pub struct InitiatorConfig {
    /// The relay's static X25519 public key (from its address).
    pub relay_key: [u8; 32],
    /// Client link (fresh static key) or relay link.
    pub role: Role,
    /// Relay links: the initiating relay's long-term static private key. Client links: `None`,
    /// and a fresh key is drawn for this connection.
    pub static_key: Option<Zeroizing<[u8; 32]>>,
    /// Our inner version range.
    pub inner: VersionRange,
    /// Cover rate to ask for; 0 = no preference.
    pub cover_rate_req: u16,
}

impl InitiatorConfig {
    /// A client link to `relay_key` with the GRP/1 defaults.
    pub fn client(relay_key: [u8; 32]) -> Self {
        Self {
            relay_key,
            role: Role::Client,
            static_key: None,
            inner: INNER_VERSIONS,
            cover_rate_req: 0,
        }
    }

    /// A relay link from the relay whose static key is `own_static` to `relay_key`, asking for
    /// the relay-link default cover rate.
    pub fn relay_link(relay_key: [u8; 32], own_static: Zeroizing<[u8; 32]>) -> Self {
        Self {
            relay_key,
            role: Role::Relay,
            static_key: Some(own_static),
            inner: INNER_VERSIONS,
            cover_rate_req: crate::cover::COVER_DEFAULT_RELAY,
        }
    }
}

impl fmt::Debug for InitiatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitiatorConfig")
            .field("relay_key", &X25519PublicKey::from_bytes(self.relay_key))
            .field("role", &self.role)
            .field("inner", &self.inner)
            .field("cover_rate_req", &self.cover_rate_req)
            .finish_non_exhaustive()
    }
}

/// A finished handshake, on either side.
pub struct Established {
    /// The record layer, both directions at record 0.
    pub records: RecordLayer,
    /// The handshake hash `h` after message 2: the implied SMP session id.
    pub session_id: [u8; 32],
    /// The negotiated inner version; `None` when the ranges do not meet (the relay closes
    /// after record 2; the client reports VERSION instead of returning this).
    pub inner_version: Option<u16>,
    /// The negotiated cover rate, milli-records/s.
    pub cover_rate: u16,
    /// The peer's inner version range.
    pub peer_inner: VersionRange,
    /// The peer's static public key (the relay's on the client; the initiator's on the relay).
    pub peer_static: [u8; 32],
    /// Client side: the relay's session auth key from payload 2.
    pub auth_key: X25519PublicKey,
    /// Relay side: the private half of `auth_key` (for checking authenticators); `None` on
    /// the client.
    pub auth_secret: Option<X25519SecretKey>,
    /// Relay side: the initiator's role.
    pub role: Role,
    /// Raw Split output, only for known-answer tests.
    #[cfg(test)]
    pub(crate) raw_keys: ([u8; 32], [u8; 32]),
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("inner_version", &self.inner_version)
            .field("cover_rate", &self.cover_rate)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The client side between message 1 and record 2.
pub struct Initiator {
    hs: HandshakeState,
    kem: KemKeyPair,
    inner: VersionRange,
    relay_key: [u8; 32],
    role: Role,
}

impl Initiator {
    /// Builds message 1 (2500 bytes, without the preamble). RNG draws, in order: the fresh
    /// static key (client links only), the ephemeral key, ML-KEM `d`, ML-KEM `z`.
    pub fn start(
        cfg: InitiatorConfig,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Self, Vec<u8>), Reject> {
        let static_key = match cfg.static_key {
            Some(k) => k,
            None => draw32(rng),
        };
        let ephemeral = draw32(rng);
        let kem = KemKeyPair::generate(rng);
        let mut hs = builder(ephemeral)
            .local_private_key(static_key.as_slice())
            .and_then(|b| b.remote_public_key(&cfg.relay_key))
            .and_then(|b| b.build_initiator())
            .map_err(|_| Reject::Internal)?;
        let payload = Payload1 {
            ek: Box::new(*kem.encapsulation_key()),
            role: cfg.role,
            inner: cfg.inner,
            cover_rate_req: cfg.cover_rate_req,
        };
        let mut msg1 = vec![0u8; HS_LEN];
        let n = hs
            .write_message(&payload.encode(), &mut msg1)
            .map_err(|_| Reject::Internal)?;
        if n != HS_LEN {
            return Err(Reject::Internal);
        }
        let init = Self {
            hs,
            kem,
            inner: cfg.inner,
            relay_key: cfg.relay_key,
            role: cfg.role,
        };
        Ok((init, msg1))
    }

    /// Processes record 2 (§5.5 client steps 3–6). Consumes the initiator, so `dk`, the
    /// ephemeral and the client static are erased whatever the outcome.
    pub fn finish(mut self, record2: &[u8]) -> Result<Established, GrpError> {
        if record2.len() != HS_LEN {
            return Err(GrpError::HandshakeParse("record 2 size"));
        }
        let mut ct = [0u8; CT_LEN];
        ct.copy_from_slice(&record2[..CT_LEN]);
        let ss = self.kem.decapsulate(&ct);
        self.hs
            .set_psk(2, ss.as_slice())
            .map_err(|_| GrpError::HandshakeIdentity)?;
        let mut payload = Zeroizing::new(vec![0u8; HS_LEN]);
        let n = self
            .hs
            .read_message(&record2[CT_LEN..], &mut payload)
            .map_err(|_| GrpError::HandshakeIdentity)?;
        let p2 = Payload2::decode(&payload[..n])?;
        let theirs = p2.check()?;
        let version = negotiate_version(self.inner, theirs).ok_or(GrpError::Version {
            ours: (self.inner.min(), self.inner.max()),
            theirs: (theirs.min(), theirs.max()),
        })?;
        let session_id = hash32(self.hs.get_handshake_hash());
        #[cfg(test)]
        let raw_keys = self.hs.dangerously_get_raw_split();
        let transport = self
            .hs
            .into_stateless_transport_mode()
            .map_err(|_| GrpError::HandshakeIdentity)?;
        Ok(Established {
            records: RecordLayer::new(transport),
            session_id,
            inner_version: Some(version),
            cover_rate: p2.cover_rate,
            peer_inner: theirs,
            peer_static: self.relay_key,
            auth_key: X25519PublicKey::from_bytes(p2.auth_key),
            auth_secret: None,
            role: self.role,
            #[cfg(test)]
            raw_keys,
        })
    }
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What the relay brings to every handshake it answers.
pub struct ResponderConfig {
    /// The relay's static X25519 private key `S_r`.
    pub static_key: Zeroizing<[u8; 32]>,
    /// The relay's inner version range.
    pub inner: VersionRange,
    /// The operator's cover-rate bounds `(relay_min, relay_max)`, clamped into [50, 2000].
    pub cover_bounds: (u16, u16),
    /// Static keys of relays allowed to open relay links (role `'R'`).
    pub allow_list: BTreeSet<[u8; 32]>,
}

impl ResponderConfig {
    /// A relay with static key `static_key`, GRP/1 defaults and an empty allow-list.
    pub fn new(static_key: Zeroizing<[u8; 32]>) -> Self {
        Self {
            static_key,
            inner: INNER_VERSIONS,
            cover_bounds: (crate::cover::COVER_MIN, crate::cover::COVER_MAX),
            allow_list: BTreeSet::new(),
        }
    }

    /// The relay's static public key (the key in its address).
    pub fn public_key(&self) -> [u8; 32] {
        *X25519SecretKey::from_bytes(*self.static_key)
            .public_key()
            .as_bytes()
    }
}

impl fmt::Debug for ResponderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponderConfig")
            .field("inner", &self.inner)
            .field("cover_bounds", &self.cover_bounds)
            .field("allow_list", &self.allow_list.len())
            .finish_non_exhaustive()
    }
}

/// The relay side of the handshake (§5.5 relay steps 2–4): checks message 1 and builds
/// record 2. RNG draws, in order: the ephemeral key, ML-KEM `m`, the session auth key (all
/// drawn up front, so a refused message 1 costs the same draws as an accepted one).
pub fn respond(
    cfg: &ResponderConfig,
    msg1: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(Vec<u8>, Established), Reject> {
    let ephemeral = draw32(rng);
    let m = draw32(rng);
    let auth_secret = X25519SecretKey::from_bytes(*draw32(rng));
    if msg1.len() != HS_LEN {
        return Err(Reject::Decrypt);
    }
    let mut hs = builder(ephemeral)
        .local_private_key(cfg.static_key.as_slice())
        .and_then(|b| b.build_responder())
        .map_err(|_| Reject::Internal)?;
    let mut p1 = Zeroizing::new(vec![0u8; HS_LEN]);
    let n = hs
        .read_message(msg1, &mut p1)
        .map_err(|_| Reject::Decrypt)?;
    let payload = Payload1::decode(&p1[..n])?;
    let ek =
        CheckedEncapsulationKey::new(payload.ek.as_slice()).map_err(Reject::EncapsulationKey)?;
    let mut peer_static = [0u8; 32];
    match hs.get_remote_static() {
        Some(k) if k.len() == 32 => peer_static.copy_from_slice(k),
        _ => return Err(Reject::Decrypt),
    }
    if payload.role == Role::Relay && !cfg.allow_list.contains(&peer_static) {
        return Err(Reject::NotAllowed);
    }

    let (ct, ss) = ek.encapsulate_with(&m);
    hs.set_psk(2, ss.as_slice()).map_err(|_| Reject::Internal)?;
    let cover_rate = negotiate_rate(payload.cover_rate_req, payload.role, cfg.cover_bounds);
    let p2 = Payload2 {
        auth_key: *auth_secret.public_key().as_bytes(),
        inner_min: cfg.inner.min(),
        inner_max: cfg.inner.max(),
        cover_rate,
    };
    let mut record2 = vec![0u8; HS_LEN];
    record2[..CT_LEN].copy_from_slice(ct.as_slice());
    let written = hs
        .write_message(&p2.encode(), &mut record2[CT_LEN..])
        .map_err(|_| Reject::Internal)?;
    if written != MSG2_LEN {
        return Err(Reject::Internal);
    }
    let session_id = hash32(hs.get_handshake_hash());
    #[cfg(test)]
    let raw_keys = hs.dangerously_get_raw_split();
    let transport = hs
        .into_stateless_transport_mode()
        .map_err(|_| Reject::Internal)?;
    let est = Established {
        records: RecordLayer::new(transport),
        session_id,
        inner_version: negotiate_version(cfg.inner, payload.inner),
        cover_rate,
        peer_inner: payload.inner,
        peer_static,
        auth_key: auth_secret.public_key(),
        auth_secret: Some(auth_secret),
        role: payload.role,
        #[cfg(test)]
        raw_keys,
    };
    Ok((record2, est))
}

fn draw32(rng: &mut (impl RngCore + CryptoRng)) -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(k.as_mut());
    k
}

fn hash32(h: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // BLAKE2s hashes are exactly 32 bytes; a shorter slice would leave zeros, never panic.
    let n = h.len().min(32);
    out[..n].copy_from_slice(&h[..n]);
    out
}

/// A snow builder for GRP with the PSK placeholder of §18 and our pre-drawn ephemeral.
fn builder(ephemeral: Zeroizing<[u8; 32]>) -> Builder<'static> {
    // The protocol name is a constant that snow parses; a failure would be a build bug, and
    // the unit tests run every path through here.
    let params = NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("GRP's Noise name parses"));
    let b = Builder::with_resolver(params, Box::new(PredrawnResolver { ephemeral }));
    let b = match b.prologue(PROLOGUE) {
        Ok(b) => b,
        Err(_) => unreachable!("the prologue is set once"),
    };
    match b.psk(2, &[0u8; 32]) {
        Ok(b) => b,
        Err(_) => unreachable!("psk2 is a valid location for IKpsk2"),
    }
}

/// Snow's default crypto, but an "RNG" that only yields the ephemeral key we drew: the one
/// thing snow would otherwise take from the OS.
struct PredrawnResolver {
    ephemeral: Zeroizing<[u8; 32]>,
}

impl CryptoResolver for PredrawnResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(PredrawnRandom {
            bytes: self.ephemeral.clone(),
            used: false,
        }))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

struct PredrawnRandom {
    bytes: Zeroizing<[u8; 32]>,
    used: bool,
}

impl Random for PredrawnRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        // Exactly one 32-byte draw (the ephemeral) is expected; anything else is refused so a
        // change in snow cannot silently reuse key material.
        if self.used || dest.len() != 32 {
            return Err(snow::Error::Rng);
        }
        dest.copy_from_slice(self.bytes.as_slice());
        self.used = true;
        Ok(())
    }
}
