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

/// The envelope seqs one queue has delivered: the highest, and which of the
/// [`SeqWindow::SPAN`] seqs below it.
///
/// A seq above the highest is new. One at or below it is a copy when it was delivered or is
/// too old to tell; one in the window that was never delivered is a message that was
/// overtaken (the server refused it while later ones got through) and is delivered late
/// rather than lost. Sixteen bytes per queue, for a store to persist with the messages:
/// [`Self::from_parts`] and [`Self::high`], [`Self::below`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqWindow {
    high: u64,
    /// Bit `k` is seq `high - 1 - k`.
    below: u64,
}

impl SeqWindow {
    /// How many seqs below the highest the window remembers. The sender keeps at most its
    /// send window (16 by default) in flight, which bounds how far a message can be
    /// overtaken.
    pub const SPAN: u64 = 64;

    /// Nothing delivered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A window restored from [`Self::high`] and [`Self::below`].
    pub fn from_parts(high: u64, below: u64) -> Self {
        Self { high, below }
    }

    /// The highest seq delivered; 0 before the first.
    pub fn high(&self) -> u64 {
        self.high
    }

    /// Which of the [`Self::SPAN`] seqs below [`Self::high`] were delivered: bit `k` stands
    /// for seq `high - 1 - k`.
    pub fn below(&self) -> u64 {
        self.below
    }

    /// Whether `seq` was not delivered yet (and is recent enough to tell).
    pub fn is_new(&self, seq: u64) -> bool {
        if seq > self.high {
            return true;
        }
        let k = self.high - seq;
        // k == 0 is the highest itself; beyond the window everything counts as delivered.
        k > 0 && k <= Self::SPAN && self.below & (1 << (k - 1)) == 0
    }

    /// Records `seq` as delivered; `false` (and no change) when it was not new.
    pub fn record(&mut self, seq: u64) -> bool {
        if !self.is_new(seq) {
            return false;
        }
        if seq > self.high {
            let shift = u32::try_from(seq - self.high).unwrap_or(u32::MAX);
            // The old highest moves into the window at `shift - 1` (seq 0, before the first
            // message, is never a seq and is left out).
            let old_high = if self.high > 0 {
                1u64.checked_shl(shift - 1).unwrap_or(0)
            } else {
                0
            };
            self.below = self.below.checked_shl(shift).unwrap_or(0) | old_high;
            self.high = seq;
        } else {
            self.below |= 1 << (self.high - seq - 1);
        }
        true
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
    fn seq_window_tells_new_from_copies() {
        let mut w = SeqWindow::new();
        assert!(!w.is_new(0), "seq 0 is never a message");
        assert!(w.record(1) && w.record(2));
        assert!(!w.record(2) && !w.record(1), "copies");
        // 3 and 4 are overtaken by 5: delivered late, each once.
        assert!(w.record(5));
        assert_eq!((w.high(), w.below()), (5, 0b1100));
        assert!(w.is_new(3) && w.is_new(4));
        assert!(w.record(4));
        assert!(!w.record(4));
        assert_eq!(SeqWindow::from_parts(w.high(), w.below()), w);
        // A jump of exactly the span keeps the old highest at the window's edge.
        assert!(w.record(5 + SeqWindow::SPAN));
        assert!(!w.is_new(5) && w.is_new(6));
        assert!(!w.is_new(4), "beyond the window counts as delivered");
        // A far jump forgets the window.
        assert!(w.record(1000));
        assert_eq!(w.below(), 0);
        assert!(!w.is_new(1000 - SeqWindow::SPAN - 1));
        assert!(w.is_new(1000 - SeqWindow::SPAN) && w.is_new(999));
        assert!(w.record(u64::MAX) && !w.is_new(u64::MAX));
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
