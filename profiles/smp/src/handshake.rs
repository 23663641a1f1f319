//! The SMP transport handshake (§2.6): ServerHello, ClientHello, version negotiation and the
//! setup of transport block encryption (§2.8).
//!
//! The server speaks first. Both hello blocks are plain padded blocks, and their contents are
//! parsed leniently: trailing bytes are ignored so that newer peers can add fields.

use std::fmt;

use crate::block::BLOCK_SIZE;
use crate::cert::{self, CertError, CertPublicKey, KeyHash, SignedKey};
use crate::crypto::BlockCipher;
use crate::encoding::{self, DecodeError, EncodeError, Parser};
use crate::error::{HandshakeFailure, ReconnectAction, TransportError};
use crate::keys::{X25519PublicKey, X25519SecretKey};
use crate::version::{self, AUTH_CMDS, ENCRYPTED_BLOCK, PROXY_SERVER_HANDSHAKE, SERVICE_CERTS};

/// The server's identity certificate chain has 2 to 4 certificates.
const CHAIN_LEN: std::ops::RangeInclusive<usize> = 2..=4;

/// An inclusive range of SMP protocol versions (`min ≤ max`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    min: u16,
    max: u16,
}

impl VersionRange {
    /// The range `min..=max`, or `None` when `min > max`.
    pub const fn new(min: u16, max: u16) -> Option<Self> {
        if min <= max {
            Some(Self { min, max })
        } else {
            None
        }
    }

    /// Lowest version.
    pub const fn min(&self) -> u16 {
        self.min
    }

    /// Highest version.
    pub const fn max(&self) -> u16 {
        self.max
    }

    /// Whether `v` is in the range.
    pub const fn contains(&self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }

    /// The common sub-range, if any.
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        Self::new(self.min.max(other.min), self.max.min(other.max))
    }
}

impl fmt::Debug for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.min, self.max)
    }
}

/// The versions this client offers: everything current servers accept (6) up to the newest (18).
pub const CLIENT_VERSIONS: VersionRange = VersionRange {
    min: version::MIN,
    max: version::MAX,
};

/// Why the handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The ServerHello block did not parse (`TEHandshake PARSE`).
    #[error("malformed ServerHello: {0}")]
    Parse(#[from] DecodeError),
    /// ServerHello's session id differs from the TLS channel binding (`TEBadSession`).
    #[error("ServerHello session id does not match the TLS session")]
    BadSession,
    /// The version ranges do not overlap (`TEVersion`).
    #[error("no common SMP version: server offers {server}, client {client}")]
    Version {
        /// What the server offered.
        server: VersionRange,
        /// What the client offered.
        client: VersionRange,
    },
    /// The server's certKey did not match the pinned identity or its session key did not
    /// verify with the TLS leaf key (`TEHandshake BAD_AUTH`).
    #[error("server authentication failed: {0}")]
    BadAuth(#[source] CertError),
    /// ClientHello could not be encoded (only with an oversized key hash; not reachable with
    /// the types used here, kept so the encoder never panics).
    #[error("ClientHello encoding failed: {0}")]
    Encode(#[from] EncodeError),
}

impl HandshakeError {
    /// The upstream transport error this corresponds to.
    pub fn transport_error(&self) -> TransportError {
        match self {
            Self::Parse(_) | Self::Encode(_) => TransportError::Handshake(HandshakeFailure::Parse),
            Self::BadSession => TransportError::Session,
            Self::Version { .. } => TransportError::Version,
            Self::BadAuth(_) => TransportError::Handshake(HandshakeFailure::BadAuth),
        }
    }

    /// What the pool should do: a garbled hello or session mismatch may be transient
    /// (middlebox, restart), while a version gap or a failed identity check will not fix
    /// itself by reconnecting.
    pub fn reconnect(&self) -> ReconnectAction {
        match self {
            Self::Parse(_) | Self::BadSession | Self::Encode(_) => ReconnectAction::Rehandshake,
            Self::Version { .. } | Self::BadAuth(_) => ReconnectAction::GiveUp,
        }
    }
}

/// Picks the version: the **maximum** of the intersection of both ranges.
pub fn negotiate(server: VersionRange, client: VersionRange) -> Result<u16, HandshakeError> {
    server
        .intersect(&client)
        .map(|r| r.max)
        .ok_or(HandshakeError::Version { server, client })
}

/// ServerHello's `certKey`: the TLS chain again and the server's X25519 session key signed by
/// the TLS leaf key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertKey {
    /// DER certificates, leaf first (normally 2).
    pub chain: Vec<Vec<u8>>,
    /// DER `SignedExact PubKey` with the X25519 session key.
    pub signed_key: Vec<u8>,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("chain_len", &self.chain.len())
            .field("signed_key_len", &self.signed_key.len())
            .finish()
    }
}

/// The server's first handshake block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The versions the server accepts.
    pub versions: VersionRange,
    /// The server's view of the TLS channel binding (the client's Finished).
    pub session_id: Vec<u8>,
    /// Present when the server's range max is ≥ 7 and it could be parsed.
    pub cert_key: Option<CertKey>,
}

impl ServerHello {
    /// Parses a ServerHello block content (already un-padded).
    ///
    /// Lenient, as upstream: trailing bytes are ignored, and a certKey that does not parse is
    /// treated as absent (the server then simply gets no X25519 authorization or block
    /// encryption) rather than failing the connection. Never panics.
    pub fn decode(content: &[u8]) -> Result<Self, DecodeError> {
        let mut p = Parser::new(content);
        let min = p.w16()?;
        let max = p.w16()?;
        let versions = VersionRange::new(min, max).ok_or(DecodeError::Invalid("version range"))?;
        let session_id = p.short_string()?.to_vec();
        // certKey is keyed on the server's advertised max, not on the version we will pick.
        let cert_key = if max >= AUTH_CMDS {
            parse_cert_key(&mut p)
        } else {
            None
        };
        Ok(Self {
            versions,
            session_id,
            cert_key,
        })
    }

    /// Un-pads a 16384-byte handshake block and parses it; any other size is refused.
    pub fn decode_block(block: &[u8]) -> Result<Self, DecodeError> {
        if block.len() != BLOCK_SIZE {
            return Err(DecodeError::Invalid("handshake block size"));
        }
        Self::decode(encoding::unpad(block)?)
    }

    /// Encodes the content (for fake servers in tests). The certKey is written only when the
    /// range max is ≥ 7, as the server does.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        encoding::put_w16(&mut out, self.versions.min);
        encoding::put_w16(&mut out, self.versions.max);
        encoding::put_short_string(&mut out, &self.session_id)?;
        if let Some(ck) = self
            .cert_key
            .as_ref()
            .filter(|_| self.versions.max >= AUTH_CMDS)
        {
            let count = u8::try_from(ck.chain.len()).map_err(|_| EncodeError::TooLong {
                what: "certificate chain",
                len: ck.chain.len(),
                max: 255,
            })?;
            out.push(count);
            for cert in &ck.chain {
                encoding::put_large(&mut out, cert)?;
            }
            encoding::put_large(&mut out, &ck.signed_key)?;
        }
        Ok(out)
    }
}

/// `certCount 1*L(cert) L(signedKey)`, with the certificates and the signed key checked to be
/// single DER elements (upstream decodes both as X.509 and drops the certKey otherwise).
fn parse_cert_key(p: &mut Parser<'_>) -> Option<CertKey> {
    let count = p.u8().ok()?;
    if count == 0 {
        return None;
    }
    let chain = (0..count)
        .map(|_| {
            p.large()
                .ok()
                .filter(|c| is_der_sequence(c))
                .map(<[u8]>::to_vec)
        })
        .collect::<Option<Vec<_>>>()?;
    let signed_key = p.large().ok()?;
    SignedKey::parse(signed_key).ok()?;
    Some(CertKey {
        chain,
        signed_key: signed_key.to_vec(),
    })
}

/// True when `der` is exactly one DER SEQUENCE (definite length, up to 4 length bytes).
fn is_der_sequence(der: &[u8]) -> bool {
    let (Some(&0x30), Some(&first)) = (der.first(), der.get(1)) else {
        return false;
    };
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return false;
        }
        let Some(bytes) = der.get(2..2 + n) else {
            return false;
        };
        (
            2 + n,
            bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)),
        )
    };
    header.checked_add(len) == Some(der.len())
}

/// The client's handshake block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The chosen version.
    pub version: u16,
    /// The pinned server identity (`keyHash`).
    pub key_hash: KeyHash,
    /// The client's per-connection X25519 key (v ≥ 7); without it there is no block encryption.
    pub client_key: Option<X25519PublicKey>,
    /// `'T'` only between an SMP proxy and a relay (v ≥ 14); normal clients send `'F'`.
    pub proxy_server: bool,
}

impl ClientHello {
    /// Encodes the content for `self.version`:
    /// `W16(v) ss(keyHash) [ss(key)] [proxyServer] ['0' service]`.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(82);
        encoding::put_w16(&mut out, self.version);
        encoding::put_short_string(&mut out, self.key_hash.as_bytes())?;
        if self.version >= AUTH_CMDS {
            // An absent key is simply not written (no Maybe tag); the parser backtracks.
            if let Some(k) = &self.client_key {
                encoding::put_short_string(&mut out, &k.to_spki())?;
            }
        }
        if self.version >= PROXY_SERVER_HANDSHAKE {
            encoding::put_bool(&mut out, self.proxy_server);
        }
        if self.version >= SERVICE_CERTS {
            // Maybe service: normal clients are not services.
            out.push(b'0');
        }
        Ok(out)
    }

    /// Encodes and pads to a 16384-byte block.
    pub fn encode_block(&self) -> Result<Vec<u8>, EncodeError> {
        let mut block = Vec::with_capacity(BLOCK_SIZE);
        encoding::pad(&self.encode()?, BLOCK_SIZE, &mut block)?;
        Ok(block)
    }

    /// Parses a ClientHello content as a server does (for fake servers in tests). Lenient:
    /// trailing bytes are ignored. Service clients (`'1'`) are not supported.
    pub fn decode(content: &[u8]) -> Result<Self, DecodeError> {
        let mut p = Parser::new(content);
        let version = p.w16()?;
        let key_hash: [u8; 32] = p
            .short_string()?
            .try_into()
            .map_err(|_| DecodeError::Invalid("keyHash length"))?;
        let client_key = if version >= AUTH_CMDS {
            // Optional without a tag: try ss(X25519 SPKI) and rewind when it is not one.
            let mut attempt = p.clone();
            match attempt.short_string().map(X25519PublicKey::from_spki) {
                Ok(Ok(k)) => {
                    p = attempt;
                    Some(k)
                }
                _ => None,
            }
        } else {
            None
        };
        let proxy_server = if version >= PROXY_SERVER_HANDSHAKE {
            p.bool()?
        } else {
            false
        };
        if version >= SERVICE_CERTS && p.u8()? != b'0' {
            return Err(DecodeError::Invalid("service ClientHello"));
        }
        Ok(Self {
            version,
            key_hash: KeyHash::from_bytes(key_hash),
            client_key,
            proxy_server,
        })
    }
}

/// What the client brings to the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeParams<'a> {
    /// The pinned identity from the server address.
    pub key_hash: KeyHash,
    /// The versions to offer (normally [`CLIENT_VERSIONS`]).
    pub versions: VersionRange,
    /// The TLS channel binding (client Finished), when the TLS stack exposes it. When `None`
    /// the server's value is trusted (rustls cannot supply it, §2.4).
    pub tls_session_id: Option<&'a [u8]>,
    /// The public key of the TLS peer's leaf certificate (from the chain the TLS layer
    /// validated). It must have signed ServerHello's session key.
    pub tls_leaf_key: &'a CertPublicKey,
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub struct Session {
    /// The negotiated version.
    pub version: u16,
    /// The server's full range (informational).
    pub server_versions: VersionRange,
    /// The session id used in every signature and authenticator.
    pub session_id: Vec<u8>,
    /// The server's verified X25519 session key (v ≥ 7 with certKey): needed for X25519 queue
    /// authorization.
    pub server_session_key: Option<X25519PublicKey>,
    /// Block encryption, when v ≥ 11 and both sides sent a key; `None` means plain blocks.
    pub block_cipher: Option<BlockCipher>,
}

/// Runs the client's side: parses the ServerHello block, checks it, and returns the
/// ClientHello block to send and the session parameters.
///
/// `client_key` is a fresh per-connection X25519 key (the reference client always sends one);
/// `None` omits it and thereby disables block encryption. It is also left out when the server
/// gave no usable session key, so that both sides agree on plain blocks.
pub fn client_handshake(
    server_hello_block: &[u8],
    params: &HandshakeParams<'_>,
    client_key: Option<&X25519SecretKey>,
) -> Result<(Vec<u8>, Session), HandshakeError> {
    let hello = ServerHello::decode_block(server_hello_block)?;
    if params
        .tls_session_id
        .is_some_and(|tls| tls != hello.session_id.as_slice())
    {
        return Err(HandshakeError::BadSession);
    }
    let version = negotiate(hello.versions, params.versions)?;
    let server_session_key = hello
        .cert_key
        .as_ref()
        .map(|ck| verify_cert_key(ck, &params.key_hash, params.tls_leaf_key))
        .transpose()
        .map_err(HandshakeError::BadAuth)?;

    // Send our key only when we hold the server's: the server turns on block encryption at
    // v11+ as soon as it receives a client key, so sending one after a certKey was dropped
    // (unparseable, hence absent) would leave the server encrypting and us not.
    let client_key = client_key.filter(|_| version >= AUTH_CMDS && server_session_key.is_some());
    let client_hello = ClientHello {
        version,
        key_hash: params.key_hash,
        client_key: client_key.map(X25519SecretKey::public_key),
        proxy_server: false,
    };
    let block = client_hello.encode_block()?;

    let block_cipher = match (client_key, &server_session_key) {
        (Some(ck), Some(sk)) if version >= ENCRYPTED_BLOCK => Some(BlockCipher::client(
            &hello.session_id,
            &ck.diffie_hellman(sk),
        )),
        _ => None,
    };
    Ok((
        block,
        Session {
            version,
            server_versions: hello.versions,
            session_id: hello.session_id,
            server_session_key,
            block_cipher,
        },
    ))
}

/// Upstream's certKey check: the chain has 2–4 certificates, its identity certificate
/// (index 1) hashes to the pinned keyHash, and the session key is signed by the TLS leaf key.
fn verify_cert_key(
    ck: &CertKey,
    expected: &KeyHash,
    tls_leaf_key: &CertPublicKey,
) -> Result<X25519PublicKey, CertError> {
    if !CHAIN_LEN.contains(&ck.chain.len()) {
        return Err(CertError::ChainLength(ck.chain.len()));
    }
    let actual = ck
        .chain
        .get(1)
        .map(|c| cert::key_hash(c))
        .ok_or(CertError::ChainLength(ck.chain.len()))?;
    if actual != *expected {
        return Err(CertError::IdentityMismatch {
            expected: *expected,
            actual,
        });
    }
    let signed = SignedKey::parse(&ck.signed_key)?;
    if signed.algorithm != tls_leaf_key.algorithm() {
        return Err(CertError::BadSignature);
    }
    tls_leaf_key.verify(signed.object, signed.signature)?;
    X25519PublicKey::from_spki(signed.spki()?)
        .map_err(|_| CertError::MalformedSignedKey("session key is not X25519"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BLOCK_SIZE;
    use crate::cert::SignatureAlgorithm;
    use crate::keys::Ed25519SecretKey;

    fn seq<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start.wrapping_add(i as u8))
    }

    fn t1_key_hash() -> KeyHash {
        KeyHash::from_bytes(
            hex::decode("2dc25431f561c03f32c6302249a0f3cc6177fa42c6e14874165fd9223ad1c232")
                .unwrap()
                .try_into()
                .unwrap(),
        )
    }

    fn range(min: u16, max: u16) -> VersionRange {
        VersionRange::new(min, max).unwrap()
    }

    /// A fake server: leaf signing key, a 2-element "chain" whose index 1 defines the key
    /// hash, and the X25519 session key.
    struct FakeServer {
        leaf: Ed25519SecretKey,
        chain: Vec<Vec<u8>>,
        session: X25519SecretKey,
    }

    impl FakeServer {
        fn new() -> Self {
            Self {
                leaf: Ed25519SecretKey::from_seed(&seq(0x11)),
                // Structurally valid DER SEQUENCEs; only their hashes matter here.
                chain: vec![
                    vec![0x30, 0x03, 0x02, 0x01, 0x01],
                    vec![0x30, 0x03, 0x02, 0x01, 0x02],
                ],
                session: X25519SecretKey::from_bytes(seq(0x80)),
            }
        }

        fn key_hash(&self) -> KeyHash {
            cert::key_hash(&self.chain[1])
        }

        fn leaf_key(&self) -> CertPublicKey {
            CertPublicKey::from_raw(
                SignatureAlgorithm::Ed25519,
                self.leaf.public_key().as_bytes(),
            )
            .unwrap()
        }

        fn cert_key(&self) -> CertKey {
            let object = cert::signed_key_object(&self.session.public_key().to_spki());
            let sig = self.leaf.sign(&object);
            CertKey {
                chain: self.chain.clone(),
                signed_key: cert::encode_signed_key(&object, SignatureAlgorithm::Ed25519, &sig),
            }
        }

        fn hello_block(&self, versions: VersionRange, with_key: bool) -> Vec<u8> {
            let hello = ServerHello {
                versions,
                session_id: seq::<32>(1).to_vec(),
                cert_key: with_key.then(|| self.cert_key()),
            };
            let mut block = Vec::new();
            encoding::pad(&hello.encode().unwrap(), BLOCK_SIZE, &mut block).unwrap();
            block
        }
    }

    #[test]
    fn v7_client_hello_v18() {
        let client = X25519SecretKey::from_bytes(seq(0xe0));
        let hello = ClientHello {
            version: 18,
            key_hash: t1_key_hash(),
            client_key: Some(client.public_key()),
            proxy_server: false,
        };
        let content = hello.encode().unwrap();
        assert_eq!(content.len(), 82);
        assert_eq!(
            hex::encode(&content),
            "0012202dc25431f561c03f32c6302249a0f3cc6177fa42c6e14874165fd9223ad1c2322c302a3005\
             06032b656e032100736845d54e87de09d6bb114aa7042c50a4a015bd9901d1a0026f5956533a1519\
             4630"
        );
        let block = hello.encode_block().unwrap();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert_eq!(&block[..2], &[0x00, 0x52]);
        assert_eq!(&block[2..84], content.as_slice());
        assert!(block[84..].iter().all(|&b| b == b'#'));
        assert_eq!(ClientHello::decode(&content).unwrap(), hello);
    }

    #[test]
    fn client_hello_layouts_by_version() {
        let key = X25519SecretKey::from_bytes(seq(0xe0)).public_key();
        let kh = t1_key_hash();
        let hello = |version, client_key| ClientHello {
            version,
            key_hash: kh,
            client_key,
            proxy_server: false,
        };
        let prefix = |v: u16| {
            let mut p = v.to_be_bytes().to_vec();
            p.push(32);
            p.extend_from_slice(kh.as_bytes());
            p
        };
        // v6: no key even if one is given, no flags.
        assert_eq!(hello(6, Some(key)).encode().unwrap(), prefix(6));
        // v7: the key, nothing else.
        let mut v7 = prefix(7);
        v7.push(44);
        v7.extend_from_slice(&key.to_spki());
        assert_eq!(hello(7, Some(key)).encode().unwrap(), v7);
        // v14: key and proxyServer.
        let mut v14 = prefix(14);
        v14.push(44);
        v14.extend_from_slice(&key.to_spki());
        v14.push(b'F');
        assert_eq!(hello(14, Some(key)).encode().unwrap(), v14);
        // v16 without a key: proxyServer then the service '0'.
        let mut v16 = prefix(16);
        v16.extend_from_slice(b"F0");
        assert_eq!(hello(16, None).encode().unwrap(), v16);
        // All of them parse back (the absent key is found by backtracking).
        for h in [
            hello(6, None),
            hello(7, Some(key)),
            hello(7, None),
            hello(14, Some(key)),
            hello(16, None),
        ] {
            assert_eq!(ClientHello::decode(&h.encode().unwrap()).unwrap(), h);
        }
    }

    #[test]
    fn negotiation_picks_the_max_of_the_intersection() {
        assert_eq!(CLIENT_VERSIONS, range(6, 18));
        assert_eq!(negotiate(range(6, 18), CLIENT_VERSIONS), Ok(18));
        assert_eq!(negotiate(range(6, 6), CLIENT_VERSIONS), Ok(6));
        assert_eq!(negotiate(range(6, 12), CLIENT_VERSIONS), Ok(12));
        assert_eq!(negotiate(range(6, 25), CLIENT_VERSIONS), Ok(18));
        assert_eq!(
            negotiate(range(19, 20), CLIENT_VERSIONS),
            Err(HandshakeError::Version {
                server: range(19, 20),
                client: CLIENT_VERSIONS
            })
        );
        assert_eq!(
            negotiate(range(1, 5), CLIENT_VERSIONS).map_err(|e| e.transport_error()),
            Err(TransportError::Version)
        );
        assert!(VersionRange::new(7, 6).is_none());
    }

    #[test]
    fn server_hello_with_and_without_cert_key() {
        let server = FakeServer::new();
        let with = ServerHello::decode_block(&server.hello_block(range(6, 18), true)).unwrap();
        assert_eq!(with.versions, range(6, 18));
        assert_eq!(with.session_id, seq::<32>(1));
        assert_eq!(with.cert_key, Some(server.cert_key()));

        // v7+ server that sends no certKey.
        let without = ServerHello::decode_block(&server.hello_block(range(6, 18), false)).unwrap();
        assert_eq!(without.cert_key, None);

        // Legacy 6..6 (no ALPN): certKey is never parsed, whatever follows.
        let mut legacy = vec![0, 6, 0, 6, 2, 0xaa, 0xbb];
        legacy.extend_from_slice(&server.hello_block(range(6, 18), true)[4..200]);
        let l = ServerHello::decode(&legacy).unwrap();
        assert_eq!(
            (l.versions, l.session_id.as_slice(), l.cert_key),
            (range(6, 6), &[0xaa, 0xbb][..], None)
        );
    }

    #[test]
    fn server_hello_is_lenient() {
        let server = FakeServer::new();
        let hello = ServerHello {
            versions: range(6, 18),
            session_id: vec![9; 32],
            cert_key: Some(server.cert_key()),
        };
        let mut content = hello.encode().unwrap();
        // Trailing bytes (a future field) are ignored.
        content.extend_from_slice(b"future extension");
        assert_eq!(ServerHello::decode(&content).unwrap(), hello);

        // A certKey whose signed key is not DER is treated as absent.
        let mut garbled = hello.clone();
        if let Some(ck) = garbled.cert_key.as_mut() {
            ck.signed_key = vec![1, 2, 3];
        }
        assert_eq!(
            ServerHello::decode(&garbled.encode().unwrap())
                .unwrap()
                .cert_key,
            None
        );
        // So is a chain element that is not a DER SEQUENCE, and a truncated certKey.
        let mut bad_cert = hello.clone();
        if let Some(ck) = bad_cert.cert_key.as_mut() {
            ck.chain[0] = vec![0x30, 0x05, 0x00];
        }
        assert_eq!(
            ServerHello::decode(&bad_cert.encode().unwrap())
                .unwrap()
                .cert_key,
            None
        );
        let enc = hello.encode().unwrap();
        let truncated = ServerHello::decode(&enc[..enc.len() - 5]).unwrap();
        assert_eq!(
            (truncated.session_id, truncated.cert_key),
            (vec![9; 32], None)
        );
        // Zero certificates: absent.
        let mut zero = enc[..37].to_vec();
        zero.push(0);
        assert_eq!(ServerHello::decode(&zero).unwrap().cert_key, None);

        // But the fixed fields are required.
        assert!(ServerHello::decode(&[0, 6, 0]).is_err());
        assert!(ServerHello::decode(&[0, 6, 0, 7, 5, 1]).is_err());
        assert_eq!(
            ServerHello::decode(&[0, 9, 0, 7, 0]),
            Err(DecodeError::Invalid("version range"))
        );
        assert!(ServerHello::decode_block(&[0xff, 0xff, 1]).is_err());
    }

    fn params<'a>(server: &FakeServer, leaf: &'a CertPublicKey) -> HandshakeParams<'a> {
        HandshakeParams {
            key_hash: server.key_hash(),
            versions: CLIENT_VERSIONS,
            tls_session_id: None,
            tls_leaf_key: leaf,
        }
    }

    #[test]
    fn full_handshake_sets_up_block_encryption_at_v11_plus() {
        let server = FakeServer::new();
        let leaf = server.leaf_key();
        let client_key = X25519SecretKey::from_bytes(seq(0xe0));
        let sid = seq::<32>(1);
        let mut p = params(&server, &leaf);
        p.tls_session_id = Some(&sid);
        let (block, mut session) = client_handshake(
            &server.hello_block(range(6, 18), true),
            &p,
            Some(&client_key),
        )
        .unwrap();
        assert_eq!(session.version, 18);
        assert_eq!(
            session.server_session_key,
            Some(server.session.public_key())
        );

        // The server reads our hello and derives the same chains.
        let hello = ClientHello::decode(encoding::unpad(&block).unwrap()).unwrap();
        assert_eq!(hello.version, 18);
        assert_eq!(hello.key_hash, server.key_hash());
        assert_eq!(hello.client_key, Some(client_key.public_key()));
        let client_pub = hello.client_key.unwrap();
        let mut srv = BlockCipher::server(&sid, &server.session.diffie_hellman(&client_pub));
        let cipher = session.block_cipher.as_mut().unwrap();
        let up = cipher.encrypt_block(b"\x01ping").unwrap();
        assert_eq!(srv.decrypt_block(&up).unwrap(), b"\x01ping");
        let down = srv.encrypt_block(b"\x01pong").unwrap();
        assert_eq!(cipher.decrypt_block(&down).unwrap(), b"\x01pong");
    }

    #[test]
    fn block_encryption_needs_both_keys_and_v11() {
        let server = FakeServer::new();
        let leaf = server.leaf_key();
        let ck = X25519SecretKey::from_bytes(seq(0xe0));
        let p = params(&server, &leaf);
        // No client key: v18 but plain blocks, and no key in the hello.
        let (block, s) =
            client_handshake(&server.hello_block(range(6, 18), true), &p, None).unwrap();
        assert!(s.block_cipher.is_none());
        assert!(s.server_session_key.is_some());
        assert_eq!(
            ClientHello::decode(encoding::unpad(&block).unwrap())
                .unwrap()
                .client_key,
            None
        );
        // No server key.
        let (_, s) =
            client_handshake(&server.hello_block(range(6, 18), false), &p, Some(&ck)).unwrap();
        assert!(s.block_cipher.is_none() && s.server_session_key.is_none());
        // v10 server: keys exchanged, but no block encryption.
        let (_, s) =
            client_handshake(&server.hello_block(range(6, 10), true), &p, Some(&ck)).unwrap();
        assert_eq!(s.version, 10);
        assert!(s.block_cipher.is_none() && s.server_session_key.is_some());
        // Legacy 6..6: v6, no key sent.
        let (block, s) =
            client_handshake(&server.hello_block(range(6, 6), true), &p, Some(&ck)).unwrap();
        assert_eq!(s.version, 6);
        assert!(s.block_cipher.is_none() && s.server_session_key.is_none());
        assert_eq!(encoding::unpad(&block).unwrap().len(), 2 + 33);
    }

    #[test]
    fn dropped_cert_key_sends_no_client_key() {
        // A v18 server whose certKey does not parse: it is treated as absent, so the client
        // has no server session key. Were the client key still sent, the server would switch
        // to encrypted blocks while the client stays plain.
        let server = FakeServer::new();
        let leaf = server.leaf_key();
        let ck = X25519SecretKey::from_bytes(seq(0xe0));
        let mut garbled = server.cert_key();
        garbled.signed_key = vec![0x30, 0x03, 0xde, 0xad, 0x00];
        let hello = ServerHello {
            versions: range(6, 18),
            session_id: seq::<32>(1).to_vec(),
            cert_key: Some(garbled),
        };
        let mut block = Vec::new();
        encoding::pad(&hello.encode().unwrap(), BLOCK_SIZE, &mut block).unwrap();
        let (out, s) = client_handshake(&block, &params(&server, &leaf), Some(&ck)).unwrap();
        assert_eq!(s.version, 18);
        assert!(s.server_session_key.is_none() && s.block_cipher.is_none());
        let sent = ClientHello::decode(encoding::unpad(&out).unwrap()).unwrap();
        assert_eq!(sent.client_key, None);
    }

    #[test]
    fn server_hello_block_must_be_exactly_one_block() {
        let server = FakeServer::new();
        let block = server.hello_block(range(6, 18), true);
        assert!(ServerHello::decode_block(&block).is_ok());
        let mut long = block.clone();
        long.push(b'#');
        assert!(ServerHello::decode_block(&long).is_err());
        assert!(ServerHello::decode_block(&block[..BLOCK_SIZE - 1]).is_err());
        let content = server.hello_block(range(6, 18), true);
        let n = usize::from(u16::from_be_bytes([content[0], content[1]]));
        assert!(ServerHello::decode_block(&content[..2 + n]).is_err());
    }

    #[test]
    fn handshake_failures() {
        let server = FakeServer::new();
        let leaf = server.leaf_key();
        let ck = X25519SecretKey::from_bytes(seq(0xe0));
        let good = server.hello_block(range(6, 18), true);

        // Session id mismatch.
        let other_sid = [7u8; 32];
        let mut p = params(&server, &leaf);
        p.tls_session_id = Some(&other_sid);
        let err = client_handshake(&good, &p, Some(&ck)).unwrap_err();
        assert_eq!(err, HandshakeError::BadSession);
        assert_eq!(err.transport_error(), TransportError::Session);

        // Wrong pinned identity.
        let mut p = params(&server, &leaf);
        p.key_hash = t1_key_hash();
        let err = client_handshake(&good, &p, Some(&ck)).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::BadAuth(CertError::IdentityMismatch { .. })
        ));
        assert_eq!(err.reconnect(), ReconnectAction::GiveUp);

        // Session key signed by a key other than the TLS leaf.
        let impostor = CertPublicKey::from_raw(
            SignatureAlgorithm::Ed25519,
            Ed25519SecretKey::from_seed(&[0x99; 32])
                .public_key()
                .as_bytes(),
        )
        .unwrap();
        let p = params(&server, &impostor);
        let err = client_handshake(&good, &p, Some(&ck)).unwrap_err();
        assert_eq!(err, HandshakeError::BadAuth(CertError::BadSignature));
        assert_eq!(
            err.transport_error(),
            TransportError::Handshake(HandshakeFailure::BadAuth)
        );

        // Chain of one certificate.
        let mut one = server.cert_key();
        one.chain.truncate(1);
        let hello = ServerHello {
            versions: range(6, 18),
            session_id: vec![1; 32],
            cert_key: Some(one),
        };
        let mut block = Vec::new();
        encoding::pad(&hello.encode().unwrap(), BLOCK_SIZE, &mut block).unwrap();
        assert_eq!(
            client_handshake(&block, &params(&server, &leaf), Some(&ck)).unwrap_err(),
            HandshakeError::BadAuth(CertError::ChainLength(1))
        );

        // Disjoint versions.
        let err = client_handshake(
            &server.hello_block(range(19, 30), true),
            &params(&server, &leaf),
            Some(&ck),
        )
        .unwrap_err();
        assert!(matches!(err, HandshakeError::Version { .. }));

        // Garbage.
        let err =
            client_handshake(&[0u8; BLOCK_SIZE], &params(&server, &leaf), Some(&ck)).unwrap_err();
        assert!(matches!(err, HandshakeError::Parse(_)));
        assert_eq!(err.reconnect(), ReconnectAction::Rehandshake);
    }
}
