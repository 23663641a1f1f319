//! One transmission inside a batch (§4): authorization, correlation id, entity id, command.
//!
//! ```text
//! v >= 7:  ss(auth) [serviceSig] ss(corrId) ss(entityId) command
//! v = 6:   ss(auth)              ss(sessionId) ss(corrId) ss(entityId) command
//! serviceSig = '0' | '1' ss(sig), present iff v >= 16 and auth is non-empty
//! ```
//! The authorization always covers `ss(sessionId) ss(corrId) ss(entityId) command`; from v7 on
//! the session id is implied (not on the wire but still authorized).

use crate::encoding::{DecodeError, EncodeError, Parser, put_short_string};
use crate::version;

/// Length of the correlation ids this client generates (they double as crypto_box nonces).
pub const CORR_ID_LEN: usize = 24;

/// Authorization lengths a server accepts: none, Ed25519 signature, X25519 authenticator, Ed448
/// signature. Anything else is `ERR BLOCK` upstream.
pub const AUTH_LENGTHS: [usize; 4] = [0, 64, 80, 114];

/// Why a transmission could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransmissionError {
    /// The framing did not parse.
    #[error("malformed transmission: {0}")]
    Decode(#[from] DecodeError),
    /// The authorization had a length no algorithm produces.
    #[error("authorization of {0} bytes")]
    AuthLength(usize),
    /// A v6 transmission carried a different session id than this connection's.
    #[error("session id mismatch")]
    SessionMismatch,
}

/// The bytes an authorization covers: `ss(sessionId) ss(corrId) ss(entityId) command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    bytes: Vec<u8>,
    /// Length of `ss(sessionId)`, the part left off the wire from v7 on.
    session_len: usize,
}

impl Authorized {
    /// Builds the authorized bytes; fails when an id is longer than 255 bytes.
    pub fn new(
        session_id: &[u8],
        corr_id: &[u8],
        entity_id: &[u8],
        command: &[u8],
    ) -> Result<Self, EncodeError> {
        let mut bytes = Vec::with_capacity(
            3 + session_id.len() + corr_id.len() + entity_id.len() + command.len(),
        );
        put_short_string(&mut bytes, session_id)?;
        let session_len = bytes.len();
        put_short_string(&mut bytes, corr_id)?;
        put_short_string(&mut bytes, entity_id)?;
        bytes.extend_from_slice(command);
        Ok(Self { bytes, session_len })
    }

    /// What the queue key signs or authenticates.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The on-wire part at `version`: everything at v6, without the session id from v7.
    pub fn wire_part(&self, version: u16) -> &[u8] {
        if version >= version::AUTH_CMDS {
            &self.bytes[self.session_len..]
        } else {
            &self.bytes
        }
    }
}

/// Appends one transmission (without its `L()` prefix) for `version`.
///
/// `auth` is the signature or authenticator over [`Authorized::as_bytes`], or empty.
pub fn encode_transmission(
    version: u16,
    auth: &[u8],
    authorized: &Authorized,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    put_short_string(out, auth)?;
    if version >= version::SERVICE_CERTS && !auth.is_empty() {
        // Trap 1: the empty service-signature slot, only after a non-empty auth.
        out.push(b'0');
    }
    out.extend_from_slice(authorized.wire_part(version));
    Ok(())
}

/// Encoded length of a transmission, to check the batch budget before building it.
pub fn transmission_len(version: u16, auth_len: usize, authorized: &Authorized) -> usize {
    let slot = usize::from(version >= version::SERVICE_CERTS && auth_len > 0);
    1 + auth_len + slot + authorized.wire_part(version).len()
}

/// A decoded transmission borrowing from the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission<'a> {
    /// The authorization; empty in server responses.
    pub auth: &'a [u8],
    /// The service signature (v16+, only after a non-empty auth); `None` for `'0'`.
    pub service_sig: Option<&'a [u8]>,
    /// The correlation id; empty for server-initiated events.
    pub corr_id: &'a [u8],
    /// The queue, link, session or service id; may be empty.
    pub entity_id: &'a [u8],
    /// The command or response, to be parsed by [`crate::command`].
    pub command: &'a [u8],
    /// The wire bytes that follow the authorization fields (see [`Self::authorized`]).
    signed_tail: &'a [u8],
    implied_session: bool,
}

impl<'a> Transmission<'a> {
    /// Decodes one transmission negotiated at `version` on the connection with `session_id`.
    pub fn decode(
        version: u16,
        session_id: &[u8],
        bytes: &'a [u8],
    ) -> Result<Self, TransmissionError> {
        let mut p = Parser::new(bytes);
        let auth = p.short_string()?;
        if !AUTH_LENGTHS.contains(&auth.len()) {
            return Err(TransmissionError::AuthLength(auth.len()));
        }
        let service_sig = if version >= version::SERVICE_CERTS && !auth.is_empty() {
            p.maybe(|p| p.short_string())?
        } else {
            None
        };
        let signed_tail = p.peek_rest();
        let implied_session = version >= version::AUTH_CMDS;
        if !implied_session && p.short_string()? != session_id {
            return Err(TransmissionError::SessionMismatch);
        }
        let corr_id = p.short_string()?;
        let entity_id = p.short_string()?;
        let command = p.tail();
        Ok(Self {
            auth,
            service_sig,
            corr_id,
            entity_id,
            command,
            signed_tail,
            implied_session,
        })
    }

    /// The bytes the authorization covers (the server side verifies against these).
    pub fn authorized(&self, session_id: &[u8]) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(1 + session_id.len() + self.signed_tail.len());
        if self.implied_session {
            put_short_string(&mut out, session_id)?;
        }
        out.extend_from_slice(self.signed_tail);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;
    use crate::block::{BatchBuilder, pad_block};

    fn seq(start: u8, n: u8) -> Vec<u8> {
        (start..start + n).collect()
    }

    #[test]
    fn v1_ping() {
        let sid = seq(1, 32);
        let corr = seq(0x40, 24);
        let a = Authorized::new(&sid, &corr, b"", b"PING").unwrap();
        let mut t = Vec::new();
        encode_transmission(18, b"", &a, &mut t).unwrap();
        assert_eq!(
            hex::encode(&t),
            "0018404142434445464748494a4b4c4d4e4f50515253545556570050494e47"
        );
        assert_eq!(t.len(), 31);
        let mut b = BatchBuilder::new();
        assert!(b.push(&t));
        let mut block = Vec::new();
        pad_block(&b.take(), &mut block).unwrap();
        assert_eq!(
            hex::encode(&block[..40]),
            "002201001f0018404142434445464748494a4b4c4d4e4f50515253545556570050494e4723232323"
        );
        assert_eq!(block.len(), 16384);
        let d = Transmission::decode(18, &sid, &t).unwrap();
        assert_eq!(
            (d.auth, d.corr_id, d.entity_id, d.command),
            (&b""[..], &corr[..], &b""[..], &b"PING"[..])
        );
        assert_eq!(d.authorized(&sid).unwrap(), a.as_bytes());
    }

    #[test]
    fn v2_signed_sub() {
        let sid = seq(1, 32);
        let corr = seq(0x40, 24);
        let rcv = seq(0xa0, 24);
        let key = SigningKey::from_bytes(&seq(0, 32).try_into().unwrap());
        assert_eq!(
            hex::encode(key.verifying_key().as_bytes()),
            "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        );
        let a = Authorized::new(&sid, &corr, &rcv, b"SUB").unwrap();
        let mut expected_signed = vec![0x20];
        expected_signed.extend(&sid);
        expected_signed.push(0x18);
        expected_signed.extend(&corr);
        expected_signed.push(0x18);
        expected_signed.extend(&rcv);
        expected_signed.extend(b"SUB");
        assert_eq!(a.as_bytes(), expected_signed);
        let sig = key.sign(a.as_bytes()).to_bytes();
        assert_eq!(
            hex::encode(sig),
            "5d0c905ee6adb05e614ee6a6bb7234b31550f5fded21c6542489b4473fbe42370327432fdf4d6a36e496fccf5666ee6577b16ce67abb94226d90b2cc616b3a0f"
        );
        let tail = format!("18{}18{}535542", hex::encode(&corr), hex::encode(&rcv));
        let mut v16 = Vec::new();
        encode_transmission(16, &sig, &a, &mut v16).unwrap();
        assert_eq!(hex::encode(&v16), format!("40{}30{tail}", hex::encode(sig)));
        assert_eq!(v16.len(), 119);
        assert_eq!(transmission_len(16, 64, &a), 119);
        let mut v15 = Vec::new();
        encode_transmission(15, &sig, &a, &mut v15).unwrap();
        assert_eq!(hex::encode(&v15), format!("40{}{tail}", hex::encode(sig)));
        let mut v6 = Vec::new();
        encode_transmission(6, &sig, &a, &mut v6).unwrap();
        assert_eq!(v6.len(), 151);

        for (v, t) in [(16, &v16), (15, &v15), (6, &v6)] {
            let d = Transmission::decode(v, &sid, t).unwrap();
            assert_eq!(d.auth, sig);
            assert_eq!(d.service_sig, None);
            assert_eq!(d.entity_id, rcv);
            assert_eq!(d.command, b"SUB");
            assert_eq!(d.authorized(&sid).unwrap(), a.as_bytes());
        }
        assert_eq!(
            Transmission::decode(6, &seq(2, 32), &v6),
            Err(TransmissionError::SessionMismatch)
        );
        // Read at v15, a v16 transmission's '0' slot shifts the corrId length byte.
        assert_ne!(
            Transmission::decode(15, &sid, &v16).map(|d| d.corr_id.to_vec()),
            Ok(corr.clone())
        );
    }

    #[test]
    fn bad_auth_length() {
        let a = Authorized::new(b"s", b"c", b"e", b"SUB").unwrap();
        let mut t = Vec::new();
        encode_transmission(18, &[1u8; 63], &a, &mut t).unwrap();
        assert_eq!(
            Transmission::decode(18, b"s", &t),
            Err(TransmissionError::AuthLength(63))
        );
    }

    #[test]
    fn t3_batch_capacity() {
        let sid = [7u8; 32];
        let count = |version: u16, auth_len: usize, entity: &[u8], cmd: &[u8]| {
            // Events carry an empty corrId; client commands a 24-byte one.
            let corr: &[u8] = if auth_len == 0 { b"" } else { &[1u8; 24] };
            let a = Authorized::new(&sid, corr, entity, cmd).unwrap();
            let mut t = Vec::new();
            encode_transmission(version, &vec![9u8; auth_len], &a, &mut t).unwrap();
            let mut b = BatchBuilder::new();
            while b.push(&t) {}
            (t.len(), b.len())
        };
        assert_eq!(count(16, 64, &[2u8; 24], b"SUB"), (119, 135));
        assert_eq!(count(18, 64, &[2u8; 24], b"SUB"), (119, 135));
        assert_eq!(count(6, 64, &[2u8; 24], b"SUB"), (151, 106));
        // Server responses: empty auth, empty corrId for events.
        assert_eq!(count(18, 0, &[2u8; 24], b"END"), (30, 255));
        let mut nmsg = b"NMSG ".to_vec();
        nmsg.extend([0u8; 24]);
        nmsg.push(144);
        nmsg.extend([0u8; 144]);
        let a = Authorized::new(&sid, b"", &[3u8; 24], &nmsg).unwrap();
        let mut t = Vec::new();
        encode_transmission(18, b"", &a, &mut t).unwrap();
        let mut b = BatchBuilder::new();
        while b.push(&t) {}
        assert_eq!((t.len(), b.len()), (201, 80));
    }
}
