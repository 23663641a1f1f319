//! Keys as SMP puts them on the wire (§6.5): X.509 `SubjectPublicKeyInfo` DER for Ed25519,
//! X25519, Ed448 and X448, and the secret-key types the client holds.
//!
//! Secrets live in types that zeroize on drop and whose `Debug` never prints the secret, so a
//! stray `?key` in a tracing field cannot leak it.

use std::fmt;

use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// DER prefix of an Ed25519 SPKI (RFC 8410); the 32 raw key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an X25519 SPKI; the 32 raw key bytes follow.
const X25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];
/// DER prefix of an Ed448 SPKI; the 57 raw key bytes follow.
const ED448_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x43, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x71, 0x03, 0x3a, 0x00,
];
/// DER prefix of an X448 SPKI; the 56 raw key bytes follow.
const X448_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x42, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6f, 0x03, 0x39, 0x00,
];

/// Length of an Ed25519 or X25519 SPKI: 12-byte prefix + 32-byte key.
pub const SPKI_25519_LEN: usize = 44;

/// The four public-key algorithms SMP encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// Ed25519 signatures (RFC 8032).
    Ed25519,
    /// X25519 Diffie-Hellman (RFC 7748).
    X25519,
    /// Ed448 signatures.
    Ed448,
    /// X448 Diffie-Hellman (only in double-ratchet link keys).
    X448,
}

/// Why a key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not one of the four SPKI encodings (unknown OID, bad length, trailing data).
    #[error("not a supported SubjectPublicKeyInfo")]
    UnknownSpki,
    /// The SPKI is well-formed but the key bytes are not a valid key of that algorithm.
    #[error("invalid {0:?} public key")]
    InvalidKey(KeyAlgorithm),
    /// A key of one algorithm was given where another was required.
    #[error("expected a {expected:?} key, got {got:?}")]
    WrongAlgorithm {
        /// The algorithm the caller needs.
        expected: KeyAlgorithm,
        /// The algorithm that was decoded.
        got: KeyAlgorithm,
    },
}

/// Writes bytes as lowercase hex; public keys print this way in `Debug`.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct X25519PublicKey([u8; 32]);

impl X25519PublicKey {
    /// Wraps 32 raw key bytes (every 32-byte string is a valid X25519 public key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 44-byte SPKI DER, as sent inside `ss()`.
    pub fn to_spki(&self) -> Vec<u8> {
        spki(&X25519_SPKI_PREFIX, &self.0)
    }

    /// Decodes an X25519 SPKI; any other algorithm is an error.
    pub fn from_spki(der: &[u8]) -> Result<Self, KeyError> {
        match PublicKey::from_spki(der)? {
            PublicKey::X25519(k) => Ok(k),
            other => Err(KeyError::WrongAlgorithm {
                expected: KeyAlgorithm::X25519,
                got: other.algorithm(),
            }),
        }
    }
}

impl fmt::Debug for X25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X25519PublicKey({})", Hex(&self.0))
    }
}

/// An Ed25519 public (verifying) key; decoding checks that it is a valid curve point.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ed25519PublicKey(ed25519_dalek::VerifyingKey);

impl Ed25519PublicKey {
    /// Decodes 32 raw key bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidKey(KeyAlgorithm::Ed25519))
    }

    /// The 32 raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The 44-byte SPKI DER.
    pub fn to_spki(&self) -> Vec<u8> {
        spki(&ED25519_SPKI_PREFIX, self.0.as_bytes())
    }

    /// Decodes an Ed25519 SPKI; any other algorithm is an error.
    pub fn from_spki(der: &[u8]) -> Result<Self, KeyError> {
        match PublicKey::from_spki(der)? {
            PublicKey::Ed25519(k) => Ok(k),
            other => Err(KeyError::WrongAlgorithm {
                expected: KeyAlgorithm::Ed25519,
                got: other.algorithm(),
            }),
        }
    }

    pub(crate) fn dalek(&self) -> &ed25519_dalek::VerifyingKey {
        &self.0
    }
}

impl std::hash::Hash for Ed25519PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ed25519PublicKey({})", Hex(self.as_bytes()))
    }
}

/// A public key of any algorithm SMP encodes, as carried in `ss(SPKI)` fields.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublicKey {
    /// Ed25519 (queue authorization, certificates).
    Ed25519(Ed25519PublicKey),
    /// X25519 (DH keys, X25519 queue authorization).
    X25519(X25519PublicKey),
    /// Ed448, raw 57 bytes (certificates of older servers). Not checked to be on the curve.
    Ed448([u8; 57]),
    /// X448, raw 56 bytes (ratchet link keys).
    X448([u8; 56]),
}

impl PublicKey {
    /// The algorithm of this key.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            Self::Ed25519(_) => KeyAlgorithm::Ed25519,
            Self::X25519(_) => KeyAlgorithm::X25519,
            Self::Ed448(_) => KeyAlgorithm::Ed448,
            Self::X448(_) => KeyAlgorithm::X448,
        }
    }

    /// The SPKI DER (44 bytes for the 25519 keys, 69 for Ed448, 68 for X448).
    pub fn to_spki(&self) -> Vec<u8> {
        match self {
            Self::Ed25519(k) => k.to_spki(),
            Self::X25519(k) => k.to_spki(),
            Self::Ed448(raw) => spki(&ED448_SPKI_PREFIX, raw),
            Self::X448(raw) => spki(&X448_SPKI_PREFIX, raw),
        }
    }

    /// Decodes an SPKI DER. The encoding of these four key types is fixed, so the decoder
    /// matches the exact prefix and length; anything else (other OIDs, parameters, trailing
    /// ASN.1) is rejected, as upstream does.
    pub fn from_spki(der: &[u8]) -> Result<Self, KeyError> {
        let (prefix, raw) = der.split_at_checked(12).ok_or(KeyError::UnknownSpki)?;
        let prefix: [u8; 12] = prefix.try_into().map_err(|_| KeyError::UnknownSpki)?;
        if prefix == ED25519_SPKI_PREFIX {
            let raw: &[u8; 32] = raw.try_into().map_err(|_| KeyError::UnknownSpki)?;
            Ed25519PublicKey::from_bytes(raw).map(Self::Ed25519)
        } else if prefix == X25519_SPKI_PREFIX {
            let raw: [u8; 32] = raw.try_into().map_err(|_| KeyError::UnknownSpki)?;
            Ok(Self::X25519(X25519PublicKey(raw)))
        } else if prefix == ED448_SPKI_PREFIX {
            raw.try_into()
                .map(Self::Ed448)
                .map_err(|_| KeyError::UnknownSpki)
        } else if prefix == X448_SPKI_PREFIX {
            raw.try_into()
                .map(Self::X448)
                .map_err(|_| KeyError::UnknownSpki)
        } else {
            Err(KeyError::UnknownSpki)
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ed25519(k) => k.fmt(f),
            Self::X25519(k) => k.fmt(f),
            Self::Ed448(raw) => write!(f, "Ed448PublicKey({})", Hex(raw)),
            Self::X448(raw) => write!(f, "X448PublicKey({})", Hex(raw)),
        }
    }
}

impl From<Ed25519PublicKey> for PublicKey {
    fn from(k: Ed25519PublicKey) -> Self {
        Self::Ed25519(k)
    }
}

impl From<X25519PublicKey> for PublicKey {
    fn from(k: X25519PublicKey) -> Self {
        Self::X25519(k)
    }
}

fn spki(prefix: &[u8; 12], raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + raw.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(raw);
    out
}

/// An X25519 private key. Zeroized on drop; `Debug` shows only the public half.
#[derive(Clone)]
pub struct X25519SecretKey(x25519_dalek::StaticSecret);

impl X25519SecretKey {
    /// Draws a fresh key from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(rng))
    }

    /// Restores a key from its 32 secret bytes (clamping happens inside the scalar multiply).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    /// The 32 secret bytes, for the caller's encrypted storage.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> X25519PublicKey {
        X25519PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// Raw X25519 with `peer`. Like upstream, low-order peer points are not rejected: the
    /// output then is all-zero and authenticates nothing useful, which is the peer's loss.
    pub fn diffie_hellman(&self, peer: &X25519PublicKey) -> DhSecret {
        let shared = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer.0));
        DhSecret(Zeroizing::new(shared.to_bytes()))
    }
}

impl fmt::Debug for X25519SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X25519SecretKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// An Ed25519 signing key. Zeroized on drop; `Debug` shows only the public half.
#[derive(Clone)]
pub struct Ed25519SecretKey(ed25519_dalek::SigningKey);

impl Ed25519SecretKey {
    /// Draws a fresh key from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(ed25519_dalek::SigningKey::generate(rng))
    }

    /// Restores a key from its 32-byte seed (the RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for the caller's encrypted storage.
    pub fn to_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public_key(&self) -> Ed25519PublicKey {
        Ed25519PublicKey(self.0.verifying_key())
    }

    /// Pure Ed25519 signature (no prehash, no context) over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.0.sign(msg).to_bytes()
    }
}

impl fmt::Debug for Ed25519SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519SecretKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// The raw 32-byte X25519 output shared by two parties (upstream's `DhSecretX25519`).
///
/// It is the key input of `crypto_box` ([`crate::crypto::cb_encrypt`]) and of the block
/// encryption chain. Zeroized on drop; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct DhSecret(Zeroizing<[u8; 32]>);

impl DhSecret {
    /// Restores a stored secret (e.g. a queue's `rcvDhSecret`).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes, for the caller's encrypted storage.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DhSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DhSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn seq(start: u8) -> [u8; 32] {
        std::array::from_fn(|i| start + i as u8)
    }

    #[test]
    fn spki_prefixes_match_the_spec_table() {
        let ed = Ed25519SecretKey::from_seed(&seq(0)).public_key();
        // V2 public key.
        assert_eq!(
            hex::encode(ed.to_spki()),
            "302a300506032b657003210003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        let x = X25519SecretKey::from_bytes(seq(0x60)).public_key();
        // V3 recipient DH public key.
        assert_eq!(
            hex::encode(x.to_spki()),
            "302a300506032b656e032100675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52f"
        );
        let ed448 = PublicKey::Ed448([7; 57]).to_spki();
        assert_eq!(ed448.len(), 69);
        assert_eq!(hex::encode(&ed448[..12]), "3043300506032b6571033a00");
        let x448 = PublicKey::X448([9; 56]).to_spki();
        assert_eq!(x448.len(), 68);
        assert_eq!(hex::encode(&x448[..12]), "3042300506032b656f033900");
    }

    #[test]
    fn spki_round_trips_for_all_algorithms() {
        let keys = [
            PublicKey::Ed25519(Ed25519SecretKey::from_seed(&seq(1)).public_key()),
            PublicKey::X25519(X25519PublicKey::from_bytes(seq(2))),
            PublicKey::Ed448([3; 57]),
            PublicKey::X448([4; 56]),
        ];
        for k in keys {
            let der = k.to_spki();
            assert_eq!(PublicKey::from_spki(&der).unwrap(), k);
        }
    }

    #[test]
    fn spki_decoder_rejects_malformed_input() {
        let good = X25519PublicKey::from_bytes(seq(5)).to_spki();
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(PublicKey::from_spki(&trailing), Err(KeyError::UnknownSpki));
        assert_eq!(
            PublicKey::from_spki(&good[..43]),
            Err(KeyError::UnknownSpki)
        );
        assert_eq!(PublicKey::from_spki(&[]), Err(KeyError::UnknownSpki));
        let mut bad_oid = good.clone();
        bad_oid[8] = 0x71;
        assert_eq!(PublicKey::from_spki(&bad_oid), Err(KeyError::UnknownSpki));
        assert_eq!(
            Ed25519PublicKey::from_spki(&good),
            Err(KeyError::WrongAlgorithm {
                expected: KeyAlgorithm::Ed25519,
                got: KeyAlgorithm::X25519
            })
        );
        // y = 2 is not the y-coordinate of any Ed25519 point.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        let der = spki(&ED25519_SPKI_PREFIX, &not_a_point);
        assert_eq!(
            PublicKey::from_spki(&der),
            Err(KeyError::InvalidKey(KeyAlgorithm::Ed25519))
        );
    }

    #[test]
    fn dh_is_symmetric_and_matches_v4_public_keys() {
        let server = X25519SecretKey::from_bytes(seq(0x80));
        let queue = X25519SecretKey::from_bytes(seq(0xc0));
        assert_eq!(
            server.public_key().as_bytes(),
            &hex32("493e82fc74464a59268817623d2053c5eb8e2cc4a988b4fee179ec6b010d531d")
        );
        assert_eq!(
            queue.public_key().as_bytes(),
            &hex32("dc2cca31e8e43bbd91dff7e475cca3347eb478107d5bd765aba4ae4a30c35d44")
        );
        assert_eq!(
            server.diffie_hellman(&queue.public_key()),
            queue.diffie_hellman(&server.public_key())
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let x = X25519SecretKey::from_bytes(seq(0x60));
        let ed = Ed25519SecretKey::from_seed(&seq(0));
        let dh = x.diffie_hellman(&X25519PublicKey::from_bytes(seq(1)));
        let secret_hexes = [hex::encode(*x.to_bytes()), hex::encode(*ed.to_seed())];
        for out in [format!("{x:?}"), format!("{ed:?}"), format!("{dh:?}")] {
            for s in &secret_hexes {
                assert!(!out.contains(s.as_str()), "{out}");
            }
            assert!(!out.contains(&hex::encode(dh.as_bytes())), "{out}");
        }
        // The public half is shown, which helps debugging.
        assert!(format!("{x:?}").contains("675dd574"));
    }
}
