//! Two-hop sending crypto and the GRP-specific proxy encodings (§10).
//!
//! The inner box of PFWD/RFWD is keyed by both D's session auth key `K_PD` and D's static key
//! from its address, so a proxy that substitutes `K_PD` still cannot read the command.
//! PRXY, PFWD, PRES and RRES use SMP's layout and `muxd_smp::command`'s codec; PKEY and the
//! RFWD body differ from SMP and are encoded here.

use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::{Tag, XSalsa20Poly1305};
use hkdf::Hkdf;
use muxd_smp::encoding::{
    DecodeError, EncodeError, Parser, pad, put_large, put_short_string, unpad,
};
use muxd_smp::keys::{X25519PublicKey, X25519SecretKey};
use sha2::Sha256;
use zeroize::Zeroizing;

/// `PROXY_PAD`: the padded size of a proxied inner batch.
pub const PROXY_PAD: usize = 16226;

/// `encT` / `encR` size: tag plus the padded batch.
pub const PROXY_ENC_LEN: usize = PROXY_PAD + 16;

/// The 24-byte corrId `N` that doubles as the inner box nonce.
pub type Nonce = [u8; 24];

/// The info prefix of the PFWD key derivation.
const PFWD_INFO: &[u8] = b"GRP/1 PFWD";

/// Why a proxied box could not be built or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyCryptoError {
    /// One of the two X25519 results is all zero (a low-order point).
    #[error("X25519 result is all zero")]
    ZeroDh,
    /// `N` reads the same reversed, so request and response nonces would collide.
    #[error("palindromic nonce")]
    Palindrome,
    /// The box did not authenticate, or is not [`PROXY_ENC_LEN`] bytes.
    #[error("proxied box did not open")]
    Open,
    /// The inner batch does not fit [`PROXY_PAD`] or is malformed.
    #[error("inner batch: {0}")]
    Batch(&'static str),
}

/// The symmetric key `k` of one proxied command (§10.3 step 4).
pub struct ForwardKey(Zeroizing<[u8; 32]>);

impl ForwardKey {
    /// `HKDF-SHA256(salt = h_PD, ikm = dh1 ‖ dh2, info = "GRP/1 PFWD" ‖ cmdPub ‖ K_PD ‖
    /// D_static, L = 32)`.
    pub fn derive(
        h_pd: &[u8; 32],
        dh1: &[u8; 32],
        dh2: &[u8; 32],
        cmd_pub: &[u8; 32],
        k_pd: &[u8; 32],
        d_static: &[u8; 32],
    ) -> Result<Self, ProxyCryptoError> {
        if *dh1 == [0u8; 32] || *dh2 == [0u8; 32] {
            return Err(ProxyCryptoError::ZeroDh);
        }
        let mut ikm = Zeroizing::new([0u8; 64]);
        ikm[..32].copy_from_slice(dh1);
        ikm[32..].copy_from_slice(dh2);
        let mut info = Vec::with_capacity(PFWD_INFO.len() + 96);
        info.extend_from_slice(PFWD_INFO);
        info.extend_from_slice(cmd_pub);
        info.extend_from_slice(k_pd);
        info.extend_from_slice(d_static);
        let mut k = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(h_pd), ikm.as_slice())
            .expand(&info, k.as_mut())
            .map_err(|_| ProxyCryptoError::Open)?;
        Ok(Self(k))
    }

    /// The client side: `cmd` is the fresh per-command key.
    pub fn for_client(
        cmd: &X25519SecretKey,
        h_pd: &[u8; 32],
        k_pd: &[u8; 32],
        d_static: &[u8; 32],
    ) -> Result<Self, ProxyCryptoError> {
        let dh1 = cmd.diffie_hellman(&X25519PublicKey::from_bytes(*k_pd));
        let dh2 = cmd.diffie_hellman(&X25519PublicKey::from_bytes(*d_static));
        let cmd_pub = *cmd.public_key().as_bytes();
        Self::derive(
            h_pd,
            dh1.as_bytes(),
            dh2.as_bytes(),
            &cmd_pub,
            k_pd,
            d_static,
        )
    }

    /// D's side: its session auth key and its static key against the client's `cmdPub`.
    pub fn for_destination(
        auth_secret: &X25519SecretKey,
        static_secret: &X25519SecretKey,
        h_pd: &[u8; 32],
        cmd_pub: &[u8; 32],
    ) -> Result<Self, ProxyCryptoError> {
        let peer = X25519PublicKey::from_bytes(*cmd_pub);
        let dh1 = auth_secret.diffie_hellman(&peer);
        let dh2 = static_secret.diffie_hellman(&peer);
        let k_pd = *auth_secret.public_key().as_bytes();
        let d_static = *static_secret.public_key().as_bytes();
        Self::derive(
            h_pd,
            dh1.as_bytes(),
            dh2.as_bytes(),
            cmd_pub,
            &k_pd,
            &d_static,
        )
    }

    /// The raw key (known-answer tests).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `encT`: the padded inner batch `01 ‖ L(transmission)` boxed with nonce `N`.
    pub fn seal_command(
        &self,
        n: &Nonce,
        transmission: &[u8],
    ) -> Result<Vec<u8>, ProxyCryptoError> {
        if is_palindrome(n) {
            return Err(ProxyCryptoError::Palindrome);
        }
        self.seal(n, transmission)
    }

    /// Opens `encT` (D side) and returns the single inner transmission's bytes, checking that
    /// the batch holds exactly one. The caller still checks its corrId equals `N`.
    pub fn open_command(&self, n: &Nonce, enc_t: &[u8]) -> Result<Vec<u8>, ProxyCryptoError> {
        if is_palindrome(n) {
            return Err(ProxyCryptoError::Palindrome);
        }
        self.open(n, enc_t)
    }

    /// `encR`: the response batch boxed with nonce `reverse(N)`.
    pub fn seal_response(
        &self,
        n: &Nonce,
        transmission: &[u8],
    ) -> Result<Vec<u8>, ProxyCryptoError> {
        self.seal(&reversed(n), transmission)
    }

    /// Opens `encR` (client side) and returns the response transmission.
    pub fn open_response(&self, n: &Nonce, enc_r: &[u8]) -> Result<Vec<u8>, ProxyCryptoError> {
        self.open(&reversed(n), enc_r)
    }

    fn seal(&self, nonce: &Nonce, transmission: &[u8]) -> Result<Vec<u8>, ProxyCryptoError> {
        let padded = inner_padded(transmission)?;
        let mut out = vec![0u8; 16];
        out.extend_from_slice(&padded);
        let cipher = XSalsa20Poly1305::new(self.0.as_slice().into());
        let tag = cipher
            .encrypt_in_place_detached(nonce.into(), b"", &mut out[16..])
            .map_err(|_| ProxyCryptoError::Open)?;
        out[..16].copy_from_slice(&tag);
        Ok(out)
    }

    fn open(&self, nonce: &Nonce, boxed: &[u8]) -> Result<Vec<u8>, ProxyCryptoError> {
        if boxed.len() != PROXY_ENC_LEN {
            return Err(ProxyCryptoError::Open);
        }
        let tag = Tag::clone_from_slice(&boxed[..16]);
        let mut body = Zeroizing::new(boxed[16..].to_vec());
        XSalsa20Poly1305::new(self.0.as_slice().into())
            .decrypt_in_place_detached(nonce.into(), b"", &mut body, &tag)
            .map_err(|_| ProxyCryptoError::Open)?;
        let batch = unpad(&body).map_err(|_| ProxyCryptoError::Batch("padding"))?;
        match muxd_smp::block::decode_batch(batch) {
            Ok(items) if items.len() == 1 => Ok(items[0].to_vec()),
            _ => Err(ProxyCryptoError::Batch("not exactly one transmission")),
        }
    }
}

impl std::fmt::Debug for ForwardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardKey(..)")
    }
}

/// `pad(01 ‖ L(transmission), 16226)`.
pub fn inner_padded(transmission: &[u8]) -> Result<Vec<u8>, ProxyCryptoError> {
    let mut batch = vec![1u8];
    put_large(&mut batch, transmission).map_err(|_| ProxyCryptoError::Batch("too long"))?;
    let mut out = Vec::with_capacity(PROXY_PAD);
    pad(&batch, PROXY_PAD, &mut out).map_err(|_| ProxyCryptoError::Batch("too long"))?;
    Ok(out)
}

/// Whether `N` reads the same reversed (such an `N` is redrawn by clients, refused by D).
pub fn is_palindrome(n: &Nonce) -> bool {
    reversed(n) == *n
}

fn reversed(n: &Nonce) -> Nonce {
    let mut r = *n;
    r.reverse();
    r
}

/// PKEY's parameters (GRP layout: `ss(h_PD) W16(min) W16(max) ss(SPKI25519(K_PD))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyKey {
    /// The P–D relay link's session id.
    pub session_id: [u8; 32],
    /// D's lowest inner version.
    pub min_version: u16,
    /// D's highest inner version.
    pub max_version: u16,
    /// D's session auth key on that link.
    pub auth_key: [u8; 32],
}

impl ProxyKey {
    /// Appends the full command, `"PKEY " …`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(b"PKEY ");
        put_short_string(out, &self.session_id)?;
        out.extend_from_slice(&self.min_version.to_be_bytes());
        out.extend_from_slice(&self.max_version.to_be_bytes());
        put_short_string(out, &X25519PublicKey::from_bytes(self.auth_key).to_spki())
    }

    /// Parses `"PKEY " …` strictly, with the client's checks (§10.2): a 32-byte session id,
    /// an ordered range and a non-zero key.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut p = Parser::new(bytes);
        p.literal(b"PKEY ")?;
        let session_id: [u8; 32] = p
            .short_string()?
            .try_into()
            .map_err(|_| DecodeError::Invalid("PKEY session id"))?;
        let min_version = p.w16()?;
        let max_version = p.w16()?;
        let key = X25519PublicKey::from_spki(p.short_string()?)
            .map_err(|_| DecodeError::Invalid("PKEY key"))?;
        p.end()?;
        if min_version > max_version || *key.as_bytes() == [0u8; 32] {
            return Err(DecodeError::Invalid("PKEY range or key"));
        }
        Ok(Self {
            session_id,
            min_version,
            max_version,
            auth_key: *key.as_bytes(),
        })
    }
}

/// The RFWD body after `"RFWD "`: `ss(N) W16(v) ss(SPKI25519(cmdPub)) encT`, for
/// [`muxd_smp::command::Command::RFwd`].
pub fn rfwd_body(
    n: &Nonce,
    version: u16,
    cmd_pub: &[u8; 32],
    enc_t: &[u8],
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(1 + 24 + 2 + 45 + enc_t.len());
    put_short_string(&mut out, n)?;
    out.extend_from_slice(&version.to_be_bytes());
    put_short_string(&mut out, &X25519PublicKey::from_bytes(*cmd_pub).to_spki())?;
    out.extend_from_slice(enc_t);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palindromes_and_zero_dh() {
        let mut n = [7u8; 24];
        assert!(is_palindrome(&n));
        n[0] = 1;
        assert!(!is_palindrome(&n));
        assert_eq!(
            ForwardKey::derive(&[1; 32], &[0; 32], &[1; 32], &[1; 32], &[1; 32], &[1; 32]).err(),
            Some(ProxyCryptoError::ZeroDh)
        );
        let k =
            ForwardKey::derive(&[1; 32], &[2; 32], &[3; 32], &[4; 32], &[5; 32], &[6; 32]).unwrap();
        assert_eq!(
            k.seal_command(&[9; 24], b"x").err(),
            Some(ProxyCryptoError::Palindrome)
        );
        let enc = k.seal_command(&n, b"hello").unwrap();
        assert_eq!(enc.len(), PROXY_ENC_LEN);
        assert_eq!(k.open_command(&n, &enc).unwrap(), b"hello");
        // The response direction uses reverse(N): a command box does not open as a response.
        assert!(k.open_response(&n, &enc).is_err());
    }
}
