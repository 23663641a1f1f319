//! The server side of the SMP handshake (spec §2.6, §2.8).
//!
//! The server speaks first with ServerHello, reads ClientHello, and on any problem closes the
//! connection without an error block, as the reference server does.
//!
//! **Session id.** The reference server uses the TLS client's Finished (tls-unique). rustls
//! does not expose it, so this relay draws 32 random bytes per connection and sends them in
//! ServerHello; clients that cannot compute tls-unique take it from there (§2.4), and every
//! signature and authenticator is checked against it.

use muxd_smp::block::BLOCK_SIZE;
use muxd_smp::cert::KeyHash;
use muxd_smp::crypto::BlockCipher;
use muxd_smp::encoding::{self, DecodeError, EncodeError};
use muxd_smp::handshake::{CertKey, ClientHello, ServerHello, VersionRange};
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use muxd_smp::version;
use muxd_transport::server::ServerIdentity;
use rand_core::{CryptoRng, RngCore};

/// Length of the random session id.
pub(crate) const SESSION_ID_LEN: usize = 32;

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// ClientHello did not parse (`TEHandshake PARSE`).
    #[error("malformed ClientHello: {0}")]
    Parse(#[from] DecodeError),
    /// The client asked for a version outside the offered range (`TEVersion`).
    #[error("client chose version {chosen}, server offers {offered}")]
    Version { chosen: u16, offered: VersionRange },
    /// The client's keyHash is not this server's (`TEHandshake IDENTITY`).
    #[error("ClientHello keyHash {0} is not this server's identity")]
    Identity(KeyHash),
    /// ServerHello could not be built.
    #[error("ServerHello: {0}")]
    Encode(#[from] EncodeError),
    /// Signing the session key failed.
    #[error("signing the session key: {0}")]
    Sign(#[from] muxd_transport::TransportError),
}

/// The versions offered on one connection: the full range with ALPN, 6..6 without (trap 7).
pub(crate) fn offered_versions(alpn_negotiated: bool, max_version: u16) -> VersionRange {
    let max = if alpn_negotiated {
        max_version
    } else {
        version::MIN
    };
    VersionRange::new(version::MIN, max.max(version::MIN)).unwrap_or(LEGACY)
}

const LEGACY: VersionRange = match VersionRange::new(version::MIN, version::MIN) {
    Some(r) => r,
    None => panic!("6..6 is a valid range"),
};

/// A handshake in progress: ServerHello built, ClientHello awaited.
#[derive(Debug)]
pub(crate) struct ServerHandshake {
    versions: VersionRange,
    session_id: Vec<u8>,
    session_key: X25519SecretKey,
    key_hash: KeyHash,
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub(crate) struct ServerSession {
    pub(crate) version: u16,
    pub(crate) session_id: Vec<u8>,
    /// Present from v7: verifies X25519 authenticators.
    pub(crate) session_key: Option<X25519SecretKey>,
    /// The client's X25519 key from ClientHello (a proxy's p2r key).
    pub(crate) client_key: Option<X25519PublicKey>,
    pub(crate) cipher: Option<BlockCipher>,
}

impl ServerHandshake {
    /// Draws the session id and key and returns the ServerHello block to send first.
    pub(crate) fn start<R: RngCore + CryptoRng>(
        identity: &ServerIdentity,
        versions: VersionRange,
        rng: &mut R,
    ) -> Result<(Self, Vec<u8>), HandshakeError> {
        let mut session_id = vec![0u8; SESSION_ID_LEN];
        rng.fill_bytes(&mut session_id);
        let session_key = X25519SecretKey::generate(rng);
        // certKey accompanies every range whose max is >= 7 (trap 22).
        let cert_key = if versions.max() >= version::AUTH_CMDS {
            Some(CertKey {
                chain: identity
                    .chain_der()
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect(),
                signed_key: identity.sign_session_key(&session_key.public_key().to_spki())?,
            })
        } else {
            None
        };
        let hello = ServerHello {
            versions,
            session_id: session_id.clone(),
            cert_key,
        };
        let mut block = Vec::with_capacity(BLOCK_SIZE);
        encoding::pad(&hello.encode()?, BLOCK_SIZE, &mut block)?;
        Ok((
            Self {
                versions,
                session_id,
                session_key,
                key_hash: identity.key_hash(),
            },
            block,
        ))
    }

    /// Checks ClientHello: the version must be offered and the keyHash must be ours. Block
    /// encryption starts at v11 when the client sent its key and is not a proxy.
    pub(crate) fn finish(self, client_hello_block: &[u8]) -> Result<ServerSession, HandshakeError> {
        let hello = ClientHello::decode(encoding::unpad(client_hello_block)?)?;
        if !self.versions.contains(hello.version) {
            return Err(HandshakeError::Version {
                chosen: hello.version,
                offered: self.versions,
            });
        }
        if hello.key_hash != self.key_hash {
            return Err(HandshakeError::Identity(hello.key_hash));
        }
        let cipher = match &hello.client_key {
            Some(client) if hello.version >= version::ENCRYPTED_BLOCK && !hello.proxy_server => {
                Some(BlockCipher::server(
                    &self.session_id,
                    &self.session_key.diffie_hellman(client),
                ))
            }
            _ => None,
        };
        let session_key = (hello.version >= version::AUTH_CMDS).then_some(self.session_key);
        Ok(ServerSession {
            version: hello.version,
            session_id: self.session_id,
            session_key,
            client_key: hello.client_key,
            cipher,
        })
    }
}
