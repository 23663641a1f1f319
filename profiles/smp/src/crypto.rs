//! SMP crypto primitives (§6.6), transport block encryption (§2.8) and command
//! authorization (§4.3).
//!
//! Upstream's `crypto_box` and its `secret_box` are the same operation: XSalsa20-Poly1305 under
//! the key `HSalsa20(k, 0¹⁶)`, where `k` is either a raw X25519 output (crypto_box) or a
//! 32-byte symmetric key (secret_box). So a single helper serves both; note that this is *not*
//! standard `crypto_secretbox(k)` for the symmetric case. Output layout is always
//! `tag(16) || ciphertext`.

use std::fmt;

use crypto_secretbox::aead::{AeadInPlace as _, KeyInit as _};
use crypto_secretbox::{Tag, XSalsa20Poly1305};
use hkdf::Hkdf;
use salsa20::cipher::consts::U10;
use sha2::{Digest as _, Sha512};
use zeroize::{Zeroize as _, Zeroizing};

use crate::block::{BLOCK_SIZE, ENCRYPTED_PADDED_SIZE};
use crate::encoding;
use crate::keys::{
    DhSecret, Ed25519PublicKey, Ed25519SecretKey, PublicKey, X25519PublicKey, X25519SecretKey,
};

/// Length of the Poly1305 tag that precedes every ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of an XSalsa20 nonce.
pub const NONCE_LEN: usize = 24;
/// Length of an X25519 command authenticator: tag + encrypted SHA-512.
pub const AUTHENTICATOR_LEN: usize = TAG_LEN + 64;
/// Length of an Ed25519 signature.
pub const ED25519_SIGNATURE_LEN: usize = 64;

/// Crypto failures. Decryption failures deliberately carry no detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The message does not fit the pad target.
    #[error("message of {len} bytes does not fit a {pad_to}-byte padded plaintext")]
    TooLarge {
        /// Message length.
        len: usize,
        /// Pad target.
        pad_to: usize,
    },
    /// Authentication failed (wrong key, tampered data, or input shorter than a tag).
    #[error("decryption failed")]
    Decrypt,
    /// The plaintext authenticated but its padding length is inconsistent.
    #[error("invalid padding")]
    Unpad,
    /// An X25519 authenticator was needed but the server sent no session key (`TENoServerAuth`).
    #[error("no server session key to authorize with an X25519 queue key")]
    NoServerKey,
    /// A signature did not verify.
    #[error("signature verification failed")]
    BadSignature,
}

/// Upstream's `cbNonce`: a byte string made into a 24-byte nonce by truncating or zero-padding.
///
/// Message ids and correlation ids are normally exactly 24 bytes; the rule matters only for
/// servers configured with other id lengths.
pub fn cb_nonce(bytes: &[u8]) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    let n = bytes.len().min(NONCE_LEN);
    nonce[..n].copy_from_slice(&bytes[..n]);
    nonce
}

/// A 32-byte symmetric `secret_box` key. Zeroized on drop; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct SbKey(Zeroizing<[u8; 32]>);

impl SbKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SbKey(<redacted>)")
    }
}

/// XSalsa20-Poly1305 keyed with `HSalsa20(k, 0¹⁶)`, i.e. `crypto_box_beforenm` applied to `k`.
fn box_cipher(k: &[u8; 32]) -> XSalsa20Poly1305 {
    let mut derived = salsa20::hsalsa::<U10>(k.into(), &Default::default());
    let cipher = XSalsa20Poly1305::new(&derived);
    // The cipher keeps its own copy (zeroized on its drop); wipe this one.
    derived.as_mut_slice().zeroize();
    cipher
}

/// Seals `buf[TAG_LEN..]` in place and writes the tag into `buf[..TAG_LEN]`.
fn seal_in_place(k: &[u8; 32], nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
    let (tag_out, body) = buf.split_at_mut(TAG_LEN);
    // Encryption cannot fail for XSalsa20-Poly1305 below 256 GiB; the error arm is unreachable
    // with SMP sizes, and a zero tag would simply fail verification on the other side.
    if let Ok(tag) = box_cipher(k).encrypt_in_place_detached(nonce.into(), b"", body) {
        tag_out.copy_from_slice(&tag);
    }
}

fn seal_padded(
    k: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    msg: &[u8],
    pad_to: usize,
) -> Result<Vec<u8>, CryptoError> {
    let mut buf = Vec::with_capacity(TAG_LEN + pad_to);
    buf.resize(TAG_LEN, 0);
    encoding::pad(msg, pad_to, &mut buf).map_err(|_| CryptoError::TooLarge {
        len: msg.len(),
        pad_to,
    })?;
    seal_in_place(k, nonce, &mut buf);
    Ok(buf)
}

fn seal_no_pad(k: &[u8; 32], nonce: &[u8; NONCE_LEN], msg: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(TAG_LEN + msg.len());
    buf.resize(TAG_LEN, 0);
    buf.extend_from_slice(msg);
    seal_in_place(k, nonce, &mut buf);
    buf
}

fn open_no_pad(
    k: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    packet: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let (tag, ct) = packet
        .split_at_checked(TAG_LEN)
        .ok_or(CryptoError::Decrypt)?;
    let mut buf = ct.to_vec();
    box_cipher(k)
        .decrypt_in_place_detached(nonce.into(), b"", &mut buf, Tag::from_slice(tag))
        .map_err(|_| CryptoError::Decrypt)?;
    Ok(buf)
}

/// Strips `W16(len) || msg || pad` down to `msg` without another allocation.
fn unpad_owned(mut padded: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
    let len = encoding::unpad(&padded)
        .map_err(|_| CryptoError::Unpad)?
        .len();
    padded.drain(..2);
    padded.truncate(len);
    Ok(padded)
}

fn open_padded(
    k: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    packet: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    unpad_owned(open_no_pad(k, nonce, packet)?)
}

/// `cbEncrypt`: NaCl crypto_box over `pad(msg, pad_to)` with a raw X25519 shared secret.
/// The output is `TAG_LEN + pad_to` bytes.
pub fn cb_encrypt(
    secret: &DhSecret,
    nonce: &[u8; NONCE_LEN],
    msg: &[u8],
    pad_to: usize,
) -> Result<Vec<u8>, CryptoError> {
    seal_padded(secret.as_bytes(), nonce, msg, pad_to)
}

/// `cbEncryptNoPad`: NaCl crypto_box over `msg` as is.
pub fn cb_encrypt_no_pad(secret: &DhSecret, nonce: &[u8; NONCE_LEN], msg: &[u8]) -> Vec<u8> {
    seal_no_pad(secret.as_bytes(), nonce, msg)
}

/// `cbDecrypt`: opens a crypto_box and removes the padding.
pub fn cb_decrypt(
    secret: &DhSecret,
    nonce: &[u8; NONCE_LEN],
    packet: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    open_padded(secret.as_bytes(), nonce, packet)
}

/// `cbDecryptNoPad`: opens a crypto_box without unpadding.
pub fn cb_decrypt_no_pad(
    secret: &DhSecret,
    nonce: &[u8; NONCE_LEN],
    packet: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    open_no_pad(secret.as_bytes(), nonce, packet)
}

/// `sbEncrypt`: upstream's secret_box over `pad(msg, pad_to)` (HSalsa20 of the key first).
pub fn sb_encrypt(
    key: &SbKey,
    nonce: &[u8; NONCE_LEN],
    msg: &[u8],
    pad_to: usize,
) -> Result<Vec<u8>, CryptoError> {
    seal_padded(key.as_bytes(), nonce, msg, pad_to)
}

/// `sbDecrypt`: opens an upstream secret_box and removes the padding.
pub fn sb_decrypt(
    key: &SbKey,
    nonce: &[u8; NONCE_LEN],
    packet: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    open_padded(key.as_bytes(), nonce, packet)
}

/// HKDF-SHA512 (RFC 5869) filling `out`. An empty `salt` is the same as no salt.
///
/// Fails only when `out` is longer than 255 × 64 bytes, which no SMP derivation asks for.
pub fn hkdf_sha512(
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoError> {
    Hkdf::<Sha512>::new(Some(salt), ikm)
        .expand(info, out)
        .map_err(|_| CryptoError::TooLarge {
            len: out.len(),
            pad_to: 255 * 64,
        })
}

/// One direction's key chain of transport block encryption (upstream `SbChainKey`).
#[derive(Clone, PartialEq, Eq)]
pub struct SbChainKey(Zeroizing<[u8; 32]>);

impl SbChainKey {
    /// Wraps a chain key.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The current chain key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Derives the two initial chains `(ck1, ck2)` from the session DH secret:
    /// `HKDF-SHA512(salt = sessionId, ikm = dh, info = "SimpleXSbChainInit", 64)`.
    /// `ck1` carries server→client blocks, `ck2` client→server.
    pub fn init(session_id: &[u8], dh: &DhSecret) -> (Self, Self) {
        let mut out = Zeroizing::new([0u8; 64]);
        // 64 bytes is far below the HKDF limit.
        let _ = hkdf_sha512(
            session_id,
            dh.as_bytes(),
            b"SimpleXSbChainInit",
            &mut out[..],
        );
        let mut ck1 = Zeroizing::new([0u8; 32]);
        let mut ck2 = Zeroizing::new([0u8; 32]);
        ck1.copy_from_slice(&out[..32]);
        ck2.copy_from_slice(&out[32..]);
        (Self(ck1), Self(ck2))
    }

    /// Advances the chain one block: `HKDF-SHA512("", ck, "SimpleXSbChain", 88)` split into the
    /// next chain key, this block's key and this block's nonce.
    pub fn step(&mut self) -> (SbKey, [u8; NONCE_LEN]) {
        let mut out = Zeroizing::new([0u8; 88]);
        let _ = hkdf_sha512(b"", &self.0[..], b"SimpleXSbChain", &mut out[..]);
        self.0.copy_from_slice(&out[..32]);
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&out[32..64]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&out[64..88]);
        (SbKey(key), nonce)
    }
}

impl fmt::Debug for SbChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SbChainKey(<redacted>)")
    }
}

/// Transport block encryption for one connection (§2.8, v ≥ 11 with both DH keys exchanged).
///
/// Each direction has its own chain, advanced once per block starting with the first block
/// after ClientHello.
#[derive(Debug, Clone)]
pub struct BlockCipher {
    snd: SbChainKey,
    rcv: SbChainKey,
}

impl BlockCipher {
    /// The client's side: it sends on `ck2` and receives on `ck1`.
    pub fn client(session_id: &[u8], dh: &DhSecret) -> Self {
        let (ck1, ck2) = SbChainKey::init(session_id, dh);
        Self { snd: ck2, rcv: ck1 }
    }

    /// The server's side (for fake servers in tests): it sends on `ck1`, receives on `ck2`.
    pub fn server(session_id: &[u8], dh: &DhSecret) -> Self {
        let (ck1, ck2) = SbChainKey::init(session_id, dh);
        Self { snd: ck1, rcv: ck2 }
    }

    /// Encrypts a block content (`count 1*L(t)`) into a full 16384-byte block.
    ///
    /// A content that does not fit fails *before* the chain advances, so the caller may drop
    /// it and carry on without desynchronising the peer.
    pub fn encrypt_block(&mut self, content: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if content.len() > ENCRYPTED_PADDED_SIZE - 2 {
            return Err(CryptoError::TooLarge {
                len: content.len(),
                pad_to: ENCRYPTED_PADDED_SIZE,
            });
        }
        let (key, nonce) = self.snd.step();
        sb_encrypt(&key, &nonce, content, ENCRYPTED_PADDED_SIZE)
    }

    /// Decrypts a received 16384-byte block into its content.
    ///
    /// The chain advances even when decryption fails, exactly as the server's does, so one
    /// corrupt block (reported as a `BLOCK` error) does not break the blocks after it.
    pub fn decrypt_block(&mut self, block: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (key, nonce) = self.rcv.step();
        if block.len() != BLOCK_SIZE {
            return Err(CryptoError::Decrypt);
        }
        sb_decrypt(&key, &nonce, block)
    }
}

/// The X25519 command authenticator (§4.3):
/// `crypto_box(SHA-512(authorized), nonce, X25519(queuePriv, serverSessionPub))`, 80 bytes.
pub fn x25519_authenticator(
    queue_key: &X25519SecretKey,
    server_session_key: &X25519PublicKey,
    nonce: &[u8; NONCE_LEN],
    authorized: &[u8],
) -> [u8; AUTHENTICATOR_LEN] {
    let dh = queue_key.diffie_hellman(server_session_key);
    let digest = Sha512::digest(authorized);
    let mut out = [0u8; AUTHENTICATOR_LEN];
    out[TAG_LEN..].copy_from_slice(&digest);
    seal_in_place(dh.as_bytes(), nonce, &mut out);
    out
}

/// Verifies an X25519 authenticator the way a server does (for fake servers and tests).
pub fn verify_x25519_authenticator(
    server_session_key: &X25519SecretKey,
    queue_public: &X25519PublicKey,
    nonce: &[u8; NONCE_LEN],
    authenticator: &[u8],
    authorized: &[u8],
) -> bool {
    let dh = server_session_key.diffie_hellman(queue_public);
    match open_no_pad(dh.as_bytes(), nonce, authenticator) {
        Ok(digest) => digest.as_slice() == Sha512::digest(authorized).as_slice(),
        Err(_) => false,
    }
}

/// Verifies a pure Ed25519 signature.
pub fn ed25519_verify(key: &Ed25519PublicKey, msg: &[u8], sig: &[u8]) -> Result<(), CryptoError> {
    let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| CryptoError::BadSignature)?;
    key.dalek()
        .verify_strict(msg, &sig)
        .map_err(|_| CryptoError::BadSignature)
}

/// The private key a queue was registered with, which authorizes its commands.
///
/// The reference agent uses Ed25519 for both recipient and sender keys; X25519 ("deniable")
/// needs a server session key from a v7+ handshake.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum QueueAuthKey {
    /// Authorize by Ed25519 signature (64 bytes).
    Ed25519(Ed25519SecretKey),
    /// Authorize by X25519 authenticator (80 bytes).
    X25519(X25519SecretKey),
}

impl QueueAuthKey {
    /// The public key to register on the server (NEW, KEY, SKEY).
    pub fn public_key(&self) -> PublicKey {
        match self {
            Self::Ed25519(k) => PublicKey::Ed25519(k.public_key()),
            Self::X25519(k) => PublicKey::X25519(k.public_key()),
        }
    }

    /// The `authBytes` of a transmission over `authorized` = `ss(sessionId) ss(corrId)
    /// ss(entityId) command`. `corr_id` is the authenticator nonce (made 24 bytes with
    /// [`cb_nonce`]); `server_session_key` is ServerHello's key (or a relay's key from PKEY).
    pub fn authorize(
        &self,
        authorized: &[u8],
        corr_id: &[u8],
        server_session_key: Option<&X25519PublicKey>,
    ) -> Result<Vec<u8>, CryptoError> {
        match self {
            Self::Ed25519(k) => Ok(k.sign(authorized).to_vec()),
            Self::X25519(k) => {
                let server = server_session_key.ok_or(CryptoError::NoServerKey)?;
                Ok(x25519_authenticator(k, server, &cb_nonce(corr_id), authorized).to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng as _;
    use sha2::Sha256;

    use super::*;

    fn seq<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start.wrapping_add(i as u8))
    }

    /// `ss(sessionId) ss(corrId) ss(rcvId) "SUB"` of vector V2.
    fn v2_authorized() -> Vec<u8> {
        let mut v = vec![0x20];
        v.extend_from_slice(&seq::<32>(0x01));
        v.push(0x18);
        v.extend_from_slice(&seq::<24>(0x40));
        v.push(0x18);
        v.extend_from_slice(&seq::<24>(0xa0));
        v.extend_from_slice(b"SUB");
        v
    }

    #[test]
    fn v4_x25519_authenticator() {
        let server = X25519SecretKey::from_bytes(seq(0x80));
        let queue = X25519SecretKey::from_bytes(seq(0xc0));
        let corr_id = seq::<24>(0x40);
        let auth = QueueAuthKey::X25519(queue.clone())
            .authorize(&v2_authorized(), &corr_id, Some(&server.public_key()))
            .unwrap();
        assert_eq!(
            hex::encode(&auth),
            "40990fc67b3a8da35eab5ef1b4ebf5975a05a5723181ad0796acb08518cf23eb9322a9f8a6de8d32\
             25d90c83c93d61d8c7d03f75aaaddb2b72922c245de008a85d3dce8843c59a0042521c8c8bdc9355"
        );
        assert!(verify_x25519_authenticator(
            &server,
            &queue.public_key(),
            &corr_id,
            &auth,
            &v2_authorized()
        ));
        // A different command, or a different nonce, does not verify.
        let mut other = v2_authorized();
        *other.last_mut().unwrap() = b'C';
        assert!(!verify_x25519_authenticator(
            &server,
            &queue.public_key(),
            &corr_id,
            &auth,
            &other
        ));
        assert!(!verify_x25519_authenticator(
            &server,
            &queue.public_key(),
            &seq::<24>(0x41),
            &auth,
            &v2_authorized()
        ));
    }

    #[test]
    fn x25519_authorization_needs_a_server_key() {
        let key = QueueAuthKey::X25519(X25519SecretKey::from_bytes(seq(0xc0)));
        assert_eq!(
            key.authorize(b"x", &seq::<24>(0), None),
            Err(CryptoError::NoServerKey)
        );
    }

    #[test]
    fn v2_ed25519_signature_and_verification() {
        let key = QueueAuthKey::Ed25519(Ed25519SecretKey::from_seed(&seq(0)));
        let sig = key
            .authorize(&v2_authorized(), &seq::<24>(0x40), None)
            .unwrap();
        assert_eq!(
            hex::encode(&sig),
            "5d0c905ee6adb05e614ee6a6bb7234b31550f5fded21c6542489b4473fbe4237\
             0327432fdf4d6a36e496fccf5666ee6577b16ce67abb94226d90b2cc616b3a0f"
        );
        let PublicKey::Ed25519(public) = key.public_key() else {
            panic!("Ed25519 key expected");
        };
        assert_eq!(ed25519_verify(&public, &v2_authorized(), &sig), Ok(()));
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert_eq!(
            ed25519_verify(&public, &v2_authorized(), &bad),
            Err(CryptoError::BadSignature)
        );
        assert_eq!(
            ed25519_verify(&public, &v2_authorized(), &sig[..63]),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn v5_msg_body_secret_and_ciphertext() {
        let rcv = X25519SecretKey::from_bytes(seq(0x60));
        let srv = X25519SecretKey::from_bytes(seq(0x80));
        let secret = rcv.diffie_hellman(&srv.public_key());
        assert_eq!(
            hex::encode(secret.as_bytes()),
            "fbfb11adeb1d6f71c0571bc1b5dd87519f9a6620b10a5ebc314cbd420c43ba43"
        );
        let msg = hex::decode("000000006553f1004620").unwrap();
        let mut msg = msg;
        msg.extend_from_slice(b"hello");
        let nonce = seq::<24>(0x10);
        let ct = cb_encrypt(&secret, &nonce, &msg, 16106).unwrap();
        assert_eq!(ct.len(), 16122);
        assert_eq!(
            hex::encode(Sha256::digest(&ct)),
            "8e1ef514d44ae48ea9364df6f04d3a23674a0a9aaf3d64dd7418c793dcd56f10"
        );
        assert_eq!(
            hex::encode(&ct[..48]),
            "d283dac94c9bb4df05b1456051a3279498579c027a3725fe7d92dbf10538830502a86e0a6825e47d\
             5c6aeb853748681c"
        );
        assert_eq!(cb_decrypt(&secret, &nonce, &ct).unwrap(), msg);
    }

    #[test]
    fn v6_block_encryption_chain() {
        let client = X25519SecretKey::from_bytes(seq(0xe0));
        let server = X25519SecretKey::from_bytes(seq(0x80));
        assert_eq!(
            hex::encode(client.public_key().as_bytes()),
            "736845d54e87de09d6bb114aa7042c50a4a015bd9901d1a0026f5956533a1519"
        );
        let dh = client.diffie_hellman(&server.public_key());
        assert_eq!(
            hex::encode(dh.as_bytes()),
            "3d32bc4770abd1fe0a5d702604ad952017952492e7eb8391b79ccea3964f652b"
        );
        let session_id = seq::<32>(0x01);
        let (ck1, ck2) = SbChainKey::init(&session_id, &dh);
        assert_eq!(
            hex::encode(ck1.as_bytes()),
            "dbbf86f8be806656d4070273756b3f298289754b0f6bf6f59c31ee2385f4fdb1"
        );
        assert_eq!(
            hex::encode(ck2.as_bytes()),
            "880ede86a89148f18d19c82b360051b233822a8f1e92b60cc54eba0ee2631582"
        );
        let mut chain = ck2.clone();
        let (sb_key, nonce) = chain.step();
        assert_eq!(
            hex::encode(chain.as_bytes()),
            "d52c2f485f8c094d2c413b074db4d0d11d58f6f86641190194450b30e8224a26"
        );
        assert_eq!(
            hex::encode(sb_key.as_bytes()),
            "6e3db93f2b3ccd5905ebdb87593926b0144eab664e49445429feb176e27fd867"
        );
        assert_eq!(
            hex::encode(nonce),
            "08caf5f528985173b20d76af8d46e7d813c9e285cc357332"
        );

        // V1 PING block content: one transmission.
        let content =
            hex::decode("01001f0018404142434445464748494a4b4c4d4e4f50515253545556570050494e47")
                .unwrap();
        let mut client_cipher = BlockCipher::client(&session_id, &dh);
        let block = client_cipher.encrypt_block(&content).unwrap();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert_eq!(
            hex::encode(Sha256::digest(&block)),
            "e39957b34f06dbb77191193b52cb39e35a349e25c10b0d2e338448c5c1606e75"
        );
        assert_eq!(
            hex::encode(&block[..32]),
            "bceba0ddda240e94d06961a5aca99d481bd107b1681b28839ee2f559f927501a"
        );

        // Plain crypto_secretbox(sbKey) — the wrong construction — gives other bytes.
        let mut padded = Vec::new();
        encoding::pad(&content, ENCRYPTED_PADDED_SIZE, &mut padded).unwrap();
        let plain = XSalsa20Poly1305::new(sb_key.as_bytes().into())
            .encrypt_in_place_detached((&nonce).into(), b"", &mut padded)
            .unwrap();
        assert_eq!(hex::encode(&plain[..8]), "3c97578b0062ac19");
        assert_ne!(&plain[..], &block[..16]);

        // The server decrypts it with its receive chain.
        let mut server_cipher =
            BlockCipher::server(&session_id, &server.diffie_hellman(&client.public_key()));
        assert_eq!(server_cipher.decrypt_block(&block).unwrap(), content);
    }

    #[test]
    fn block_chains_advance_even_on_failure() {
        let dh = DhSecret::from_bytes(seq(7));
        let sid = seq::<32>(1);
        let mut client = BlockCipher::client(&sid, &dh);
        let mut server = BlockCipher::server(&sid, &dh);
        let b1 = server.encrypt_block(b"\x01first").unwrap();
        let b2 = server.encrypt_block(b"\x01second").unwrap();
        let mut corrupt = b1.clone();
        corrupt[100] ^= 0x80;
        assert_eq!(client.decrypt_block(&corrupt), Err(CryptoError::Decrypt));
        // Block 2 still decrypts: the failed block consumed its chain step.
        assert_eq!(client.decrypt_block(&b2).unwrap(), b"\x01second");
        // Replaying block 1 now fails: its key is gone.
        assert_eq!(client.decrypt_block(&b1), Err(CryptoError::Decrypt));
        // Both directions are independent and the client→server direction works too.
        let up = client.encrypt_block(b"\x01up").unwrap();
        assert_eq!(server.decrypt_block(&up).unwrap(), b"\x01up");
        // Wrong-length input is a decrypt failure, not a panic, and advances the chain.
        assert_eq!(client.decrypt_block(&up[..100]), Err(CryptoError::Decrypt));
    }

    #[test]
    fn oversized_block_content_does_not_advance_the_chain() {
        let dh = DhSecret::from_bytes(seq(9));
        let mut client = BlockCipher::client(b"sid", &dh);
        let mut server = BlockCipher::server(b"sid", &dh);
        let too_big = vec![1u8; ENCRYPTED_PADDED_SIZE - 1];
        assert!(matches!(
            client.encrypt_block(&too_big),
            Err(CryptoError::TooLarge { .. })
        ));
        let max = vec![2u8; ENCRYPTED_PADDED_SIZE - 2];
        let block = client.encrypt_block(&max).unwrap();
        assert_eq!(server.decrypt_block(&block).unwrap(), max);
    }

    #[test]
    fn cb_matches_crypto_box_salsabox_and_is_tag_first() {
        use crypto_box::aead::Aead as _;
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = X25519SecretKey::generate(&mut rng);
        let b = X25519SecretKey::generate(&mut rng);
        let salsa = crypto_box::SalsaBox::new(
            &crypto_box::PublicKey::from(*b.public_key().as_bytes()),
            &crypto_box::SecretKey::from(*a.to_bytes()),
        );
        let nonce = seq::<24>(3);
        let msg = b"attack at dawn".to_vec();
        let reference = salsa.encrypt((&nonce).into(), msg.as_slice()).unwrap();
        let ours = cb_encrypt_no_pad(&a.diffie_hellman(&b.public_key()), &nonce, &msg);
        assert_eq!(ours, reference);
        // And the other party opens it with its own DH.
        assert_eq!(
            cb_decrypt_no_pad(&b.diffie_hellman(&a.public_key()), &nonce, &ours).unwrap(),
            msg
        );
    }

    #[test]
    fn cb_and_sb_round_trip_and_fail_cleanly() {
        let secret = DhSecret::from_bytes(seq(0x33));
        let other = DhSecret::from_bytes(seq(0x34));
        let nonce = seq::<24>(0x10);
        let ct = cb_encrypt(&secret, &nonce, b"payload", 100).unwrap();
        assert_eq!(ct.len(), 116);
        assert_eq!(cb_decrypt(&secret, &nonce, &ct).unwrap(), b"payload");
        assert_eq!(cb_decrypt(&other, &nonce, &ct), Err(CryptoError::Decrypt));
        assert_eq!(
            cb_decrypt(&secret, &seq::<24>(0x11), &ct),
            Err(CryptoError::Decrypt)
        );
        for i in [0, 15, 16, 115] {
            let mut t = ct.clone();
            t[i] ^= 1;
            assert_eq!(
                cb_decrypt(&secret, &nonce, &t),
                Err(CryptoError::Decrypt),
                "byte {i}"
            );
        }
        assert_eq!(
            cb_decrypt(&secret, &nonce, &ct[..15]),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            cb_decrypt(&secret, &nonce, &ct[..115]),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(
            cb_encrypt(&secret, &nonce, &[0; 99], 100),
            Err(CryptoError::TooLarge {
                len: 99,
                pad_to: 100
            })
        );
        // An authentic plaintext whose length field overruns is an unpad error.
        let bad_pad = cb_encrypt_no_pad(&secret, &nonce, &[0x00, 0x09, 1, 2]);
        assert_eq!(
            cb_decrypt(&secret, &nonce, &bad_pad),
            Err(CryptoError::Unpad)
        );

        let key = SbKey::from_bytes(seq(0x44));
        let ct = sb_encrypt(&key, &nonce, b"block", 64).unwrap();
        assert_eq!(sb_decrypt(&key, &nonce, &ct).unwrap(), b"block");
        let wrong = SbKey::from_bytes(seq(0x45));
        assert_eq!(sb_decrypt(&wrong, &nonce, &ct), Err(CryptoError::Decrypt));
        let mut t = ct.clone();
        t[3] ^= 0x40;
        assert_eq!(sb_decrypt(&key, &nonce, &t), Err(CryptoError::Decrypt));
    }

    #[test]
    fn cb_nonce_pads_and_truncates() {
        assert_eq!(cb_nonce(&seq::<24>(5)), seq::<24>(5));
        let mut short = [0u8; 24];
        short[..3].copy_from_slice(&[1, 2, 3]);
        assert_eq!(cb_nonce(&[1, 2, 3]), short);
        assert_eq!(cb_nonce(&seq::<30>(0)), seq::<24>(0));
    }

    #[test]
    fn debug_hides_symmetric_secrets() {
        let k = SbKey::from_bytes([0xab; 32]);
        let ck = SbChainKey::from_bytes([0xab; 32]);
        let bc = BlockCipher::client(b"s", &DhSecret::from_bytes([0xab; 32]));
        for s in [format!("{k:?}"), format!("{ck:?}"), format!("{bc:?}")] {
            assert!(!s.contains("ab"), "{s}");
            assert!(!s.contains("171"), "{s}");
        }
    }
}
