//! muxd's app envelope: what muxd puts in the SMP per-queue e2e message after the private
//! header (`clientMessage = privHeader body`, spec §8.2), and what it expects there.
//!
//! ```text
//! appEnvelope = 'M' version:1byte seq:Word64(big-endian) payload(Tail)
//! ```
//!
//! SMP has no idempotent SEND: a SEND whose OK was lost with the connection is sent again and
//! the server stores a second copy under a fresh msgId. The sender's `seq`, fixed once when
//! the app handed the message over and reused by every resend, lets the receiving pool drop
//! that copy. See `docs/envelope.md` for the format and its rules.

/// The first byte of every muxd app envelope.
pub const ENVELOPE_TAG: u8 = b'M';

/// The envelope version this pool writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

/// Bytes the envelope adds in front of the app's payload: tag, version and seq.
pub const ENVELOPE_OVERHEAD: usize = 1 + 1 + 8;

/// One decoded app envelope; the payload borrows from the decrypted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The sender's sequence number for this destination queue, from 1.
    pub seq: u64,
    /// The app's message.
    pub payload: &'a [u8],
}

/// Why a decrypted message is not a muxd app envelope this pool can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Shorter than tag, version and seq.
    #[error("envelope truncated: {0} bytes, need at least {ENVELOPE_OVERHEAD}")]
    Truncated(usize),
    /// The first byte is not [`ENVELOPE_TAG`]: not written by muxd (e.g. a SimpleX agent).
    #[error("not a muxd envelope (tag byte {0:#04x})")]
    UnknownTag(u8),
    /// A version this pool does not read.
    #[error("unsupported envelope version {0} (this pool reads {ENVELOPE_VERSION})")]
    UnsupportedVersion(u8),
    /// `seq` 0 is never assigned (numbering starts at 1).
    #[error("envelope seq 0")]
    ZeroSeq,
}

impl<'a> Envelope<'a> {
    /// Appends the encoded envelope to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(ENVELOPE_OVERHEAD + self.payload.len());
        out.push(ENVELOPE_TAG);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(self.payload);
    }

    /// The encoded envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Parses an envelope. Versions other than [`ENVELOPE_VERSION`] are refused rather than
    /// guessed at: a later version may give `seq` another meaning.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        let Some((&tag, rest)) = bytes.split_first() else {
            return Err(EnvelopeError::Truncated(0));
        };
        if tag != ENVELOPE_TAG {
            return Err(EnvelopeError::UnknownTag(tag));
        }
        let Some((&version, rest)) = rest.split_first() else {
            return Err(EnvelopeError::Truncated(bytes.len()));
        };
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(version));
        }
        let Some((seq, payload)) = rest.split_first_chunk::<8>() else {
            return Err(EnvelopeError::Truncated(bytes.len()));
        };
        let seq = u64::from_be_bytes(*seq);
        if seq == 0 {
            return Err(EnvelopeError::ZeroSeq);
        }
        Ok(Self { seq, payload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_has_the_documented_bytes() {
        let env = Envelope {
            seq: 0x0102_0304_0506_0708,
            payload: b"hi",
        };
        let bytes = env.to_bytes();
        assert_eq!(bytes, b"M\x01\x01\x02\x03\x04\x05\x06\x07\x08hi");
        assert_eq!(bytes.len(), ENVELOPE_OVERHEAD + 2);
        assert_eq!(Envelope::decode(&bytes), Ok(env));
        // An empty payload and the largest seq survive too.
        let edge = Envelope {
            seq: u64::MAX,
            payload: b"",
        };
        assert_eq!(Envelope::decode(&edge.to_bytes()), Ok(edge));
    }

    #[test]
    fn rejects_malformed_envelopes() {
        assert_eq!(Envelope::decode(b""), Err(EnvelopeError::Truncated(0)));
        assert_eq!(Envelope::decode(b"M"), Err(EnvelopeError::Truncated(1)));
        assert_eq!(
            Envelope::decode(b"M\x01\0\0\0\0\0\0\0"),
            Err(EnvelopeError::Truncated(9))
        );
        assert_eq!(
            Envelope::decode(b"hello, agent"),
            Err(EnvelopeError::UnknownTag(b'h'))
        );
        assert_eq!(
            Envelope::decode(b"M\x01\0\0\0\0\0\0\0\0payload"),
            Err(EnvelopeError::ZeroSeq)
        );
    }

    #[test]
    fn refuses_other_versions() {
        let mut bytes = Envelope {
            seq: 7,
            payload: b"x",
        }
        .to_bytes();
        for version in [0u8, 2, 255] {
            bytes[1] = version;
            assert_eq!(
                Envelope::decode(&bytes),
                Err(EnvelopeError::UnsupportedVersion(version))
            );
        }
    }
}
