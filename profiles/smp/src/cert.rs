//! Server identity: the TLS certificate chain of an SMP server (spec §2.3, §2.6).
//!
//! An SMP server address pins the server by `keyHash` = SHA-256 over the full DER of the
//! *identity* certificate, which is always chain index 1 (the second certificate the server
//! sends). The chain (2 to 4 certificates, leaf first) is validated with its **last**
//! certificate as the only trust anchor: signatures along the chain, validity against a unix
//! time passed in by the caller, CA basicConstraints on every non-leaf certificate and an
//! X.509 v3 leaf. Host names are never checked. The leaf (online) key then authenticates the
//! TLS CertificateVerify and ServerHello's signed session key.
//!
//! Library choices:
//! * X.509 parsing uses `x509-parser` (rusticata, widely used, zero-copy): it gives the raw
//!   TBS bytes, names, validity and parsed basicConstraints without any crypto backend, so it
//!   stays sans-IO and pulls no TLS stack into this crate. `x509-cert` would do as well but needs
//!   hand-decoding of extensions; openssl's `X509` exposes no basicConstraints accessor.
//! * Signatures (Ed25519 and Ed448, pure EdDSA) are verified through the `openssl` crate: no
//!   mature pure-Rust Ed448 verifier exists, and using one path for both algorithms keeps the
//!   behaviour identical for the two certificate kinds a server may have.
//!
//! Nothing here reads the clock or does IO.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE};
use openssl::pkey::{Id, PKey};
use openssl::sign::Verifier;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_SIG_ED448, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, X509Version};

/// Fewest certificates a server may send (`[leaf, identity]`).
pub const MIN_CHAIN_LEN: usize = 2;
/// Most certificates a server may send (`[leaf, identity, _, ca]`).
pub const MAX_CHAIN_LEN: usize = 4;

/// DER of the Ed25519 AlgorithmIdentifier (OID 1.3.101.112, no parameters).
const ALG_ID_ED25519: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER of the Ed448 AlgorithmIdentifier (OID 1.3.101.113, no parameters).
const ALG_ID_ED448: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x71];

/// The base64url alphabet as SMP prints it (padded) and parses it (padding optional, §6.2).
const B64_URL_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// SHA-256 fingerprint of a server's identity certificate: the `keyHash` of an SMP address.
///
/// Displayed as padded base64url (44 characters), as in `smp://<keyHash>@host`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Wraps 32 raw fingerprint bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw fingerprint bytes (what ClientHello carries as `ss(keyHash)`).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE.encode(self.0))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

impl FromStr for KeyHash {
    type Err = KeyHashParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64_URL_LENIENT
            .decode(s)
            .map_err(|_| KeyHashParseError::Base64)?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| KeyHashParseError::Length(v.len()))?;
        Ok(Self(bytes))
    }
}

impl From<[u8; 32]> for KeyHash {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// Why a string is not a keyHash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyHashParseError {
    /// Not base64url.
    #[error("keyHash is not base64url")]
    Base64,
    /// Decoded to the wrong number of bytes.
    #[error("keyHash must be 32 bytes, got {0}")]
    Length(usize),
}

/// Computes the keyHash of one DER certificate: SHA-256 over its whole encoding (not the SPKI).
pub fn key_hash(cert_der: &[u8]) -> KeyHash {
    KeyHash(Sha256::digest(cert_der).into())
}

/// The signature algorithms SMP servers use, for certificates, TLS and ServerHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureAlgorithm {
    /// Pure Ed25519 (RFC 8032), 32-byte keys, 64-byte signatures.
    Ed25519,
    /// Pure Ed448 with an empty context, 57-byte keys, 114-byte signatures.
    Ed448,
}

impl SignatureAlgorithm {
    /// Length of a raw public key.
    pub const fn public_key_len(self) -> usize {
        match self {
            Self::Ed25519 => 32,
            Self::Ed448 => 57,
        }
    }

    /// Length of a signature.
    pub const fn signature_len(self) -> usize {
        match self {
            Self::Ed25519 => 64,
            Self::Ed448 => 114,
        }
    }

    /// DER of this algorithm's X.509 AlgorithmIdentifier (OID, no parameters).
    pub const fn algorithm_identifier_der(self) -> &'static [u8] {
        match self {
            Self::Ed25519 => &ALG_ID_ED25519,
            Self::Ed448 => &ALG_ID_ED448,
        }
    }

    fn openssl_id(self) -> Id {
        match self {
            Self::Ed25519 => Id::ED25519,
            Self::Ed448 => Id::ED448,
        }
    }

    /// Maps an AlgorithmIdentifier; RFC 8410 forbids parameters for EdDSA.
    fn from_algorithm_identifier(alg: &AlgorithmIdentifier<'_>) -> Option<Self> {
        if alg.parameters.is_some() {
            return None;
        }
        if alg.algorithm == OID_SIG_ED25519 {
            Some(Self::Ed25519)
        } else if alg.algorithm == OID_SIG_ED448 {
            Some(Self::Ed448)
        } else {
            None
        }
    }
}

impl fmt::Display for SignatureAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ed25519 => "Ed25519",
            Self::Ed448 => "Ed448",
        })
    }
}

/// Why a certificate chain or a signature made with the server's key was refused.
///
/// Every variant except [`CertError::IdentityMismatch`] and [`CertError::BadSignature`] means
/// the chain itself is not trustworthy; their messages start with "untrusted chain".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The chain is well formed but belongs to another server.
    #[error("server identity mismatch: expected keyHash {expected}, server presented {actual}")]
    IdentityMismatch {
        /// The keyHash from the server address.
        expected: KeyHash,
        /// SHA-256 of the identity certificate (index 1) the server sent.
        actual: KeyHash,
    },
    /// Fewer than 2 or more than 4 certificates.
    #[error("untrusted chain: {0} certificates, 2 to 4 expected")]
    ChainLength(usize),
    /// A certificate is not valid DER X.509.
    #[error("untrusted chain: certificate {index} does not parse: {reason}")]
    Malformed {
        /// Position in the chain, leaf = 0.
        index: usize,
        /// Parser message.
        reason: String,
    },
    /// A certificate uses a key or signature algorithm other than Ed25519/Ed448.
    #[error("untrusted chain: certificate {index} uses an unsupported algorithm")]
    UnsupportedAlgorithm {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// A certificate's issuer name is not the subject of the next certificate.
    #[error("untrusted chain: certificate {index} is not issued by certificate {}", index + 1)]
    IssuerMismatch {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// A certificate's signature does not verify with the next certificate's key.
    #[error("untrusted chain: signature of certificate {index} does not verify")]
    ChainSignature {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// The passed-in time is outside a certificate's validity period.
    #[error("untrusted chain: certificate {index} is not valid at unix time {now_unix}")]
    Expired {
        /// Position in the chain, leaf = 0.
        index: usize,
        /// The time validation was done for.
        now_unix: i64,
    },
    /// A certificate that signs another lacks basicConstraints CA, or exceeds its path length.
    #[error("untrusted chain: certificate {index} is not a CA")]
    NotCa {
        /// Position in the chain, leaf = 0.
        index: usize,
    },
    /// The leaf is not an X.509 v3 certificate.
    #[error("untrusted chain: leaf certificate is not X.509 v3")]
    LeafNotV3,
    /// A signature made with the server's leaf key (TLS CertificateVerify, ServerHello's
    /// signed session key) does not verify.
    #[error("signature by the server's leaf key does not verify")]
    BadSignature,
    /// The signed session key structure is not the DER `SignedExact` of §2.6.
    #[error("malformed signed key: {0}")]
    MalformedSignedKey(&'static str),
}

/// An Ed25519 or Ed448 public key taken from a certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPublicKey {
    algorithm: SignatureAlgorithm,
    raw: Vec<u8>,
}

impl CertPublicKey {
    /// Extracts the subject public key of one DER certificate (no validation of the certificate).
    pub fn from_certificate(cert_der: &[u8]) -> Result<Self, CertError> {
        let cert = parse_cert(0, cert_der)?;
        Self::from_parsed(0, &cert)
    }

    /// Builds a key from its algorithm and raw bytes (32 for Ed25519, 57 for Ed448).
    pub fn from_raw(algorithm: SignatureAlgorithm, raw: &[u8]) -> Option<Self> {
        (raw.len() == algorithm.public_key_len()).then(|| Self {
            algorithm,
            raw: raw.to_vec(),
        })
    }

    /// The key's algorithm.
    pub const fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    /// The raw public key bytes.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Verifies a pure EdDSA signature over `msg`.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), CertError> {
        if verify_raw(self.algorithm, &self.raw, msg, signature) {
            Ok(())
        } else {
            Err(CertError::BadSignature)
        }
    }

    fn from_parsed(index: usize, cert: &X509Certificate<'_>) -> Result<Self, CertError> {
        let spki = cert.public_key();
        let algorithm = SignatureAlgorithm::from_algorithm_identifier(&spki.algorithm)
            .ok_or(CertError::UnsupportedAlgorithm { index })?;
        let data = &spki.subject_public_key;
        Self::from_raw(algorithm, &data.data)
            .filter(|_| data.unused_bits == 0)
            .ok_or(CertError::UnsupportedAlgorithm { index })
    }
}

impl fmt::Debug for CertPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CertPublicKey({}, {} bytes)",
            self.algorithm,
            self.raw.len()
        )
    }
}

/// A chain that passed [`validate_chain`]: the server is who the address says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedChain {
    key_hash: KeyHash,
    leaf: CertPublicKey,
    len: usize,
}

impl ValidatedChain {
    /// The identity fingerprint (equal to the expected one).
    pub const fn key_hash(&self) -> &KeyHash {
        &self.key_hash
    }

    /// The leaf (online) key, which signs TLS CertificateVerify and ServerHello's session key.
    pub const fn leaf_key(&self) -> &CertPublicKey {
        &self.leaf
    }

    /// Number of certificates in the chain.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Always false: a validated chain has at least two certificates.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Verifies `signature` over `msg` with the leaf key.
    pub fn verify_with_leaf(&self, msg: &[u8], signature: &[u8]) -> Result<(), CertError> {
        self.leaf.verify(msg, signature)
    }

    /// Verifies ServerHello's `signedKey` (DER `SignedExact PubKey`, §2.6) with the leaf key
    /// and returns the DER SubjectPublicKeyInfo it carries (the server's X25519 session key,
    /// 44 bytes; decoding it is the caller's business).
    pub fn verify_signed_key(&self, signed_key_der: &[u8]) -> Result<Vec<u8>, CertError> {
        let signed = SignedKey::parse(signed_key_der)?;
        if signed.algorithm != self.leaf.algorithm {
            return Err(CertError::BadSignature);
        }
        self.leaf.verify(signed.object, signed.signature)?;
        Ok(signed.spki()?.to_vec())
    }
}

/// Validates a server's certificate chain (leaf first) against the pinned keyHash.
///
/// `now_unix` is the current wall-clock time in seconds; the caller reads the clock.
pub fn validate_chain(
    chain: &[&[u8]],
    expected: &KeyHash,
    now_unix: i64,
) -> Result<ValidatedChain, CertError> {
    if !(MIN_CHAIN_LEN..=MAX_CHAIN_LEN).contains(&chain.len()) {
        return Err(CertError::ChainLength(chain.len()));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(index, der)| parse_cert(index, der))
        .collect::<Result<Vec<_>, _>>()?;

    // Identity first: a wrong server is the common failure and deserves the precise error.
    let actual = key_hash(chain[1]);
    if actual != *expected {
        return Err(CertError::IdentityMismatch {
            expected: *expected,
            actual,
        });
    }

    if certs[0].version() != X509Version::V3 {
        return Err(CertError::LeafNotV3);
    }
    for (index, cert) in certs.iter().enumerate() {
        let validity = cert.validity();
        if now_unix < validity.not_before.timestamp() || now_unix > validity.not_after.timestamp() {
            return Err(CertError::Expired { index, now_unix });
        }
        if index > 0 {
            check_ca(index, cert)?;
        }
    }
    // Each certificate must be signed by the next one; the last is the trust anchor and its
    // own (self-)signature is not checked, as with any anchor.
    for (index, pair) in certs.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], &pair[1]);
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(CertError::IssuerMismatch { index });
        }
        let issuer_key = CertPublicKey::from_parsed(index + 1, issuer)?;
        let sig_alg = SignatureAlgorithm::from_algorithm_identifier(&cert.signature_algorithm)
            .ok_or(CertError::UnsupportedAlgorithm { index })?;
        // The outer and the TBS algorithm must agree (RFC 5280 §4.1.1.2), and match the key.
        if cert.signature_algorithm != cert.tbs_certificate.signature
            || sig_alg != issuer_key.algorithm
            || cert.signature_value.unused_bits != 0
        {
            return Err(CertError::ChainSignature { index });
        }
        let tbs: &[u8] = cert.tbs_certificate.as_ref();
        issuer_key
            .verify(tbs, &cert.signature_value.data)
            .map_err(|_| CertError::ChainSignature { index })?;
    }
    let leaf = CertPublicKey::from_parsed(0, &certs[0])?;
    Ok(ValidatedChain {
        key_hash: actual,
        leaf,
        len: chain.len(),
    })
}

/// A parsed X.509 `SignedExact` structure: `SEQUENCE { object, AlgorithmIdentifier, BIT STRING }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedKey<'a> {
    /// Raw DER of the signed object, the exact bytes the signature covers.
    pub object: &'a [u8],
    /// The signature algorithm.
    pub algorithm: SignatureAlgorithm,
    /// The signature bytes.
    pub signature: &'a [u8],
}

impl<'a> SignedKey<'a> {
    /// Parses the DER structure, rejecting trailing bytes and unknown algorithms.
    pub fn parse(der: &'a [u8]) -> Result<Self, CertError> {
        let (outer, rest) = der_tlv(der, 0x30).ok_or(CertError::MalformedSignedKey("outer"))?;
        if !rest.is_empty() {
            return Err(CertError::MalformedSignedKey("trailing bytes"));
        }
        let (_, body) = header_split(outer).ok_or(CertError::MalformedSignedKey("outer"))?;
        let (object, rest) = der_tlv(body, 0x30).ok_or(CertError::MalformedSignedKey("object"))?;
        let (alg, rest) = der_tlv(rest, 0x30).ok_or(CertError::MalformedSignedKey("algorithm"))?;
        let algorithm = if alg == ALG_ID_ED25519 {
            SignatureAlgorithm::Ed25519
        } else if alg == ALG_ID_ED448 {
            SignatureAlgorithm::Ed448
        } else {
            return Err(CertError::MalformedSignedKey("algorithm"));
        };
        let (bits, rest) = der_tlv(rest, 0x03).ok_or(CertError::MalformedSignedKey("signature"))?;
        if !rest.is_empty() {
            return Err(CertError::MalformedSignedKey("trailing elements"));
        }
        let (_, bits) = header_split(bits).ok_or(CertError::MalformedSignedKey("signature"))?;
        let signature = match bits.split_first() {
            Some((0, sig)) => sig,
            _ => return Err(CertError::MalformedSignedKey("signature bits")),
        };
        Ok(Self {
            object,
            algorithm,
            signature,
        })
    }

    /// The SubjectPublicKeyInfo inside the object.
    ///
    /// Haskell's `objectToSignedExact` wraps the object in one more SEQUENCE
    /// (`SEQUENCE { SPKI }`), while other encoders put the SPKI itself; both are accepted.
    pub fn spki(&self) -> Result<&'a [u8], CertError> {
        let (_, content) =
            header_split(self.object).ok_or(CertError::MalformedSignedKey("object"))?;
        // A bare SPKI's content starts with its AlgorithmIdentifier SEQUENCE, which itself
        // starts with an OID; a wrapper's content is one SEQUENCE holding such an SPKI.
        match der_tlv(content, 0x30) {
            Some((inner, [])) if inner.len() > 2 && is_spki(inner) => Ok(inner),
            _ if is_spki(self.object) => Ok(self.object),
            _ => Err(CertError::MalformedSignedKey("object")),
        }
    }
}

/// Builds the signed object for a session key the way Haskell servers do: `SEQUENCE { spki }`.
/// The leaf key signs exactly these bytes.
pub fn signed_key_object(spki_der: &[u8]) -> Vec<u8> {
    der_wrap(0x30, &[spki_der])
}

/// Encodes a `SignedExact` structure from the object (see [`signed_key_object`]), the
/// algorithm and the signature.
pub fn encode_signed_key(
    object: &[u8],
    algorithm: SignatureAlgorithm,
    signature: &[u8],
) -> Vec<u8> {
    let mut bits = Vec::with_capacity(signature.len() + 1);
    bits.push(0);
    bits.extend_from_slice(signature);
    let bit_string = der_wrap(0x03, &[&bits]);
    der_wrap(
        0x30,
        &[object, algorithm.algorithm_identifier_der(), &bit_string],
    )
}

fn parse_cert(index: usize, der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((_, _)) => Err(CertError::Malformed {
            index,
            reason: "trailing bytes after the certificate".to_owned(),
        }),
        Err(e) => Err(CertError::Malformed {
            index,
            reason: e.to_string(),
        }),
    }
}

/// `index` signs certificate `index - 1`, so it must be a CA whose path length allows the
/// `index - 1` CA certificates below it (the leaf does not count).
fn check_ca(index: usize, cert: &X509Certificate<'_>) -> Result<(), CertError> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => match bc.value.path_len_constraint {
            Some(max) if (index - 1) as u64 > u64::from(max) => Err(CertError::NotCa { index }),
            _ => Ok(()),
        },
        _ => Err(CertError::NotCa { index }),
    }
}

fn verify_raw(algorithm: SignatureAlgorithm, raw: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    if raw.len() != algorithm.public_key_len() || signature.len() != algorithm.signature_len() {
        return false;
    }
    let Ok(key) = PKey::public_key_from_raw_bytes(raw, algorithm.openssl_id()) else {
        return false;
    };
    let Ok(mut verifier) = Verifier::new_without_digest(&key) else {
        return false;
    };
    // openssl reports a bad signature either as Ok(false) or as an error stack.
    verifier.verify_oneshot(signature, msg).unwrap_or(false)
}

fn is_spki(der: &[u8]) -> bool {
    let Some((_, content)) = header_split(der) else {
        return false;
    };
    // SPKI = SEQUENCE { AlgorithmIdentifier SEQUENCE { OID … }, BIT STRING }
    match der_tlv(content, 0x30) {
        Some((alg, rest)) => {
            matches!(header_split(alg), Some((_, [0x06, ..])))
                && matches!(der_tlv(rest, 0x03), Some((_, [])))
        }
        None => false,
    }
}

/// Splits off one DER element with tag `tag`: returns (the whole element, the rest).
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let (header_len, content_len) = der_length(input.get(1..)?)?;
    let total = 1usize.checked_add(header_len)?.checked_add(content_len)?;
    if total > input.len() {
        return None;
    }
    Some(input.split_at(total))
}

/// Splits a whole element into (header, content).
fn header_split(element: &[u8]) -> Option<(&[u8], &[u8])> {
    let (header_len, content_len) = der_length(element.get(1..)?)?;
    let header = 1 + header_len;
    (element.len() == header + content_len).then(|| element.split_at(header))
}

/// Reads a DER length: returns (bytes used by the length, the length). Definite form only,
/// minimal encoding not enforced beyond rejecting lengths over 4 bytes.
fn der_length(input: &[u8]) -> Option<(usize, usize)> {
    let first = *input.first()?;
    if first < 0x80 {
        return Some((1, usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let bytes = input.get(1..=n)?;
    let len = bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Some((1 + n, len))
}

fn der_wrap(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + 4);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        // Session-key structures are far below 64 KiB.
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use openssl::sign::Signer;

    use super::*;

    const CA_448: &str = include_str!("../tests/fixtures/ca.crt");
    const SERVER_448: &str = include_str!("../tests/fixtures/server.crt");
    const CA_25519: &str = include_str!("../tests/fixtures/ed25519/ca.crt");
    const SERVER_25519: &str = include_str!("../tests/fixtures/ed25519/server.crt");

    /// 2026-11-01, inside the validity of every fixture.
    const NOW: i64 = 1_793_491_200;

    fn der(pem: &str) -> Vec<u8> {
        openssl::x509::X509::from_pem(pem.as_bytes())
            .unwrap()
            .to_der()
            .unwrap()
    }

    fn hash(s: &str) -> KeyHash {
        s.parse().unwrap()
    }

    #[test]
    fn t1_key_hash_of_upstream_fixtures() {
        assert_eq!(
            key_hash(&der(CA_448)).to_string(),
            "LcJUMfVhwD8yxjAiSaDzzGF3-kLG4Uh0Fl_ZIjrRwjI="
        );
        assert_eq!(
            key_hash(&der(CA_25519)).to_string(),
            "evk6yvqIaOtOVWfFhXQTdQRtlKeDy_4MXsJDYh2agys="
        );
    }

    #[test]
    fn key_hash_text_round_trip() {
        let h = KeyHash::from_bytes([0xfb; 32]);
        let s = h.to_string();
        assert_eq!(s.len(), 44);
        assert!(s.ends_with('='));
        assert_eq!(s.parse::<KeyHash>().unwrap(), h);
        // Unpadded input is accepted (Haskell's decoder tolerates it too).
        assert_eq!(s.trim_end_matches('=').parse::<KeyHash>().unwrap(), h);
        assert_eq!("AAAA".parse::<KeyHash>(), Err(KeyHashParseError::Length(3)));
        assert_eq!("a+b/".parse::<KeyHash>(), Err(KeyHashParseError::Base64));
    }

    #[test]
    fn upstream_ed448_chain_validates() {
        let (leaf, ca) = (der(SERVER_448), der(CA_448));
        let v = validate_chain(
            &[&leaf, &ca],
            &hash("LcJUMfVhwD8yxjAiSaDzzGF3-kLG4Uh0Fl_ZIjrRwjI="),
            NOW,
        )
        .unwrap();
        assert_eq!(v.leaf_key().algorithm(), SignatureAlgorithm::Ed448);
        assert_eq!(v.leaf_key().raw().len(), 57);
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn upstream_ed25519_chain_validates() {
        let (leaf, ca) = (der(SERVER_25519), der(CA_25519));
        let v = validate_chain(
            &[&leaf, &ca],
            &hash("evk6yvqIaOtOVWfFhXQTdQRtlKeDy_4MXsJDYh2agys="),
            NOW,
        )
        .unwrap();
        assert_eq!(v.leaf_key().algorithm(), SignatureAlgorithm::Ed25519);
    }

    #[test]
    fn wrong_key_hash_is_identity_mismatch() {
        let (leaf, ca) = (der(SERVER_448), der(CA_448));
        let expected = KeyHash::from_bytes([7; 32]);
        let err = validate_chain(&[&leaf, &ca], &expected, NOW).unwrap_err();
        assert!(matches!(err, CertError::IdentityMismatch { .. }));
        let msg = err.to_string();
        assert!(msg.starts_with("server identity mismatch: expected keyHash "));
        assert!(msg.contains(&expected.to_string()));
    }

    #[test]
    fn chain_length_limits() {
        let (leaf, ca) = (der(SERVER_448), der(CA_448));
        let h = key_hash(&ca);
        assert_eq!(
            validate_chain(&[&leaf], &h, NOW),
            Err(CertError::ChainLength(1))
        );
        assert_eq!(validate_chain(&[], &h, NOW), Err(CertError::ChainLength(0)));
        let five: Vec<&[u8]> = vec![&leaf, &ca, &ca, &ca, &ca];
        assert_eq!(
            validate_chain(&five, &h, NOW),
            Err(CertError::ChainLength(5))
        );
    }

    #[test]
    fn mixed_chain_is_rejected() {
        // Ed25519 leaf presented with the Ed448 CA: identity matches, signature cannot.
        let (leaf, ca) = (der(SERVER_25519), der(CA_448));
        let err = validate_chain(&[&leaf, &ca], &key_hash(&ca), NOW).unwrap_err();
        assert!(
            matches!(
                err,
                CertError::IssuerMismatch { index: 0 } | CertError::ChainSignature { index: 0 }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("untrusted chain: "));
    }

    #[test]
    fn tampered_leaf_signature_is_rejected() {
        let (mut leaf, ca) = (der(SERVER_448), der(CA_448));
        let last = leaf.len() - 1;
        leaf[last] ^= 1;
        assert_eq!(
            validate_chain(&[&leaf, &ca], &key_hash(&ca), NOW),
            Err(CertError::ChainSignature { index: 0 })
        );
    }

    #[test]
    fn validity_period_is_checked() {
        let (leaf, ca) = (der(SERVER_25519), der(CA_25519));
        let h = key_hash(&ca);
        // The Ed25519 fixtures start on 2026-02-02.
        let before = 1_760_000_000;
        assert_eq!(
            validate_chain(&[&leaf, &ca], &h, before),
            Err(CertError::Expired {
                index: 0,
                now_unix: before
            })
        );
        let after = 4_900_000_000; // 2125-04, before notAfter (2126-01-09)
        assert!(validate_chain(&[&leaf, &ca], &h, after).is_ok());
        let far = 4_924_000_000; // 2126-01-13
        assert!(matches!(
            validate_chain(&[&leaf, &ca], &h, far),
            Err(CertError::Expired { .. })
        ));
    }

    #[test]
    fn leaf_as_ca_is_rejected() {
        // [leaf, leaf]: identity = the leaf, which is CA:FALSE and cannot sign.
        let leaf = der(SERVER_448);
        assert_eq!(
            validate_chain(&[&leaf, &leaf], &key_hash(&leaf), NOW),
            Err(CertError::NotCa { index: 1 })
        );
    }

    #[test]
    fn garbage_certificate_is_malformed() {
        let ca = der(CA_448);
        let err = validate_chain(&[b"not a cert", &ca], &key_hash(&ca), NOW).unwrap_err();
        assert!(matches!(err, CertError::Malformed { index: 0, .. }));
    }

    #[test]
    fn signed_key_round_trip_and_forms() {
        for (key, alg) in [
            (
                PKey::generate_ed25519().unwrap(),
                SignatureAlgorithm::Ed25519,
            ),
            (PKey::generate_ed448().unwrap(), SignatureAlgorithm::Ed448),
        ] {
            let pub_raw = key.raw_public_key().unwrap();
            let leaf = CertPublicKey::from_raw(alg, &pub_raw).unwrap();
            let chain = ValidatedChain {
                key_hash: KeyHash::from_bytes([0; 32]),
                leaf,
                len: 2,
            };
            let mut spki = vec![
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
            ];
            spki.extend_from_slice(&[0x42; 32]);
            // Wrapped form (what Haskell servers send) and bare form (accepted too).
            for object in [signed_key_object(&spki), spki.clone()] {
                let sig = Signer::new_without_digest(&key)
                    .unwrap()
                    .sign_oneshot_to_vec(&object)
                    .unwrap();
                assert_eq!(sig.len(), alg.signature_len());
                let der = encode_signed_key(&object, alg, &sig);
                assert_eq!(chain.verify_signed_key(&der).unwrap(), spki);
                // Any flipped bit in the signed object breaks it.
                let mut bad = der.clone();
                let pos = der.len() - sig.len() - 12;
                bad[pos] ^= 0x01;
                assert!(chain.verify_signed_key(&bad).is_err());
                // Trailing garbage is refused.
                let mut long = der.clone();
                long.push(0);
                assert!(chain.verify_signed_key(&long).is_err());
            }
        }
    }

    #[test]
    fn ed25519_signed_key_layout_matches_spec() {
        let key = PKey::generate_ed25519().unwrap();
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(&[1; 32]);
        let object = signed_key_object(&spki);
        let sig = Signer::new_without_digest(&key)
            .unwrap()
            .sign_oneshot_to_vec(&object)
            .unwrap();
        let der = encode_signed_key(&object, SignatureAlgorithm::Ed25519, &sig);
        // SEQUENCE(46 + 7 + 67 = 120) { SEQUENCE { SPKI }, AlgId Ed25519, BIT STRING(65) }
        assert_eq!(&der[..4], &[0x30, 0x78, 0x30, 0x2c]);
        assert_eq!(&der[4..48], &spki[..]);
        assert_eq!(&der[48..55], &ALG_ID_ED25519);
        assert_eq!(&der[55..58], &[0x03, 0x41, 0x00]);
        assert_eq!(der.len(), 122);
    }

    #[test]
    fn verify_rejects_wrong_lengths_and_keys() {
        let key = PKey::generate_ed448().unwrap();
        let other = PKey::generate_ed448().unwrap();
        let msg = b"CertificateVerify content";
        let sig = Signer::new_without_digest(&key)
            .unwrap()
            .sign_oneshot_to_vec(msg)
            .unwrap();
        let good =
            CertPublicKey::from_raw(SignatureAlgorithm::Ed448, &key.raw_public_key().unwrap())
                .unwrap();
        let wrong =
            CertPublicKey::from_raw(SignatureAlgorithm::Ed448, &other.raw_public_key().unwrap())
                .unwrap();
        assert_eq!(good.verify(msg, &sig), Ok(()));
        assert_eq!(wrong.verify(msg, &sig), Err(CertError::BadSignature));
        assert_eq!(good.verify(b"other", &sig), Err(CertError::BadSignature));
        assert_eq!(good.verify(msg, &sig[..64]), Err(CertError::BadSignature));
        assert!(CertPublicKey::from_raw(SignatureAlgorithm::Ed448, &[0; 32]).is_none());
    }

    #[test]
    fn public_key_from_upstream_leaf() {
        let k = CertPublicKey::from_certificate(&der(SERVER_25519)).unwrap();
        assert_eq!(k.algorithm(), SignatureAlgorithm::Ed25519);
        assert_eq!(k.raw().len(), 32);
    }
}
