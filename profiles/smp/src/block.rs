//! Transport blocks (§2.5) and batch framing (§2.7).
//!
//! A block is always [`BLOCK_SIZE`] bytes. Its content (after un-padding or decryption) is a
//! batch: `count:1byte 1*L(transmission)`, parsed strictly.

use crate::encoding::{DecodeError, EncodeError, Parser, pad, put_large, unpad};

/// Size of every transport read and write.
pub const BLOCK_SIZE: usize = 16384;

/// Pad target inside block encryption: the 16-byte tag makes up the rest of [`BLOCK_SIZE`].
pub const ENCRYPTED_PADDED_SIZE: usize = BLOCK_SIZE - 16;

/// Budget for the sum of `L(t)` encodings in one block, as the reference sender packs:
/// 16384 − 2 (pad length) − 1 (count) − 16 (encryption tag), so a batch fits either block kind.
pub const BATCH_BUDGET: usize = BLOCK_SIZE - 19;

/// Most transmissions in one batch: the count is one byte.
pub const MAX_BATCH_COUNT: usize = 255;

/// Largest transmission that fits a block on its own under [`BATCH_BUDGET`].
pub const MAX_TRANSMISSION_LEN: usize = BATCH_BUDGET - 2;

/// Why a block or batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The block was not exactly [`BLOCK_SIZE`] bytes.
    #[error("block of {0} bytes, expected {BLOCK_SIZE}")]
    Size(usize),
    /// A batch with a count of zero.
    #[error("empty batch")]
    EmptyBatch,
    /// The framing did not parse.
    #[error("malformed block: {0}")]
    Decode(#[from] DecodeError),
}

/// Appends a plain (unencrypted) block: `W16(len) || content || '#'…`, exactly [`BLOCK_SIZE`].
pub fn pad_block(content: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    pad(content, BLOCK_SIZE, out)
}

/// The content of a plain block.
pub fn unpad_block(block: &[u8]) -> Result<&[u8], BlockError> {
    if block.len() != BLOCK_SIZE {
        return Err(BlockError::Size(block.len()));
    }
    Ok(unpad(block)?)
}

/// Splits a batch into its transmissions, strictly: exactly `count` (≥ 1) Large items and
/// nothing after them.
pub fn decode_batch(content: &[u8]) -> Result<Vec<&[u8]>, BlockError> {
    let mut p = Parser::new(content);
    let count = usize::from(p.u8()?);
    if count == 0 {
        return Err(BlockError::EmptyBatch);
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(p.large()?);
    }
    p.end()?;
    Ok(items)
}

/// Packs transmissions into one batch within [`BATCH_BUDGET`] and [`MAX_BATCH_COUNT`].
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    /// `count || L(t)…`, with the count byte patched in `finish`.
    buf: Vec<u8>,
    count: usize,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(BLOCK_SIZE);
        buf.push(0);
        Self { buf, count: 0 }
    }

    /// Number of transmissions added so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a transmission of `len` bytes still fits.
    pub fn fits(&self, len: usize) -> bool {
        let used = self.buf.len() - 1;
        self.count < MAX_BATCH_COUNT && used + 2 + len <= BATCH_BUDGET
    }

    /// Adds a transmission if it fits; returns whether it was added.
    pub fn push(&mut self, transmission: &[u8]) -> bool {
        if !self.fits(transmission.len()) {
            return false;
        }
        // Cannot fail: `fits` bounds the length well below 65535.
        if put_large(&mut self.buf, transmission).is_err() {
            return false;
        }
        self.count += 1;
        true
    }

    /// The batch content (`count || L(t)…`), leaving the builder empty for reuse.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK_SIZE));
        self.buf.push(0);
        // `count` never exceeds MAX_BATCH_COUNT (255), so it fits the byte.
        out[0] = u8::try_from(self.count).unwrap_or(u8::MAX);
        self.count = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_and_strictness() {
        let mut b = BatchBuilder::new();
        assert!(b.push(b"one"));
        assert!(b.push(b""));
        assert!(b.push(b"three"));
        let content = b.take();
        assert_eq!(content, b"\x03\x00\x03one\x00\x00\x00\x05three");
        assert!(b.is_empty());
        let items = decode_batch(&content).unwrap();
        assert_eq!(items, [&b"one"[..], b"", b"three"]);

        let mut extra = content.clone();
        extra.push(0);
        assert!(decode_batch(&extra).is_err());
        assert!(decode_batch(&content[..content.len() - 1]).is_err());
        assert_eq!(decode_batch(b"\x00"), Err(BlockError::EmptyBatch));
        assert!(decode_batch(b"").is_err());
    }

    #[test]
    fn plain_block_layout() {
        let mut block = Vec::new();
        pad_block(b"\x01\x00\x01x", &mut block).unwrap();
        assert_eq!(block.len(), BLOCK_SIZE);
        assert_eq!(&block[..6], b"\x00\x04\x01\x00\x01x");
        assert!(block[6..].iter().all(|&b| b == b'#'));
        assert_eq!(unpad_block(&block).unwrap(), b"\x01\x00\x01x");
        assert_eq!(
            unpad_block(&block[1..]),
            Err(BlockError::Size(BLOCK_SIZE - 1))
        );
    }

    #[test]
    fn packing_limits() {
        let mut b = BatchBuilder::new();
        for _ in 0..255 {
            assert!(b.push(b"x"));
        }
        assert!(!b.push(b"x"), "count is capped at 255");
        let mut b = BatchBuilder::new();
        assert!(b.fits(MAX_TRANSMISSION_LEN));
        assert!(!b.fits(MAX_TRANSMISSION_LEN + 1));
        assert!(b.push(&vec![0u8; MAX_TRANSMISSION_LEN]));
        let content = b.take();
        // The largest single batch still fits inside an encrypted block's padding.
        assert!(content.len() + 2 <= ENCRYPTED_PADDED_SIZE);
    }
}
