//! GRP blocks (§7.1), batch packing (§7.3) and the outbound transmission FIFO.
//!
//! The batch format is SMP's (`count L(t)…`) and is decoded with
//! [`muxd_smp::block::decode_batch`]. Packing is GRP's own: a GRP block spends its whole
//! 16382-byte body on the batch, while an SMP block keeps 16 bytes back for its inner
//! encryption tag, so `muxd_smp::block::BatchBuilder`'s budget is too small by 17 bytes.

use std::collections::VecDeque;
use std::time::Instant;

use muxd_smp::block::decode_batch;
use muxd_smp::encoding::{PAD_BYTE, put_large};

use crate::BLOCK;
use crate::error::BlockFault;

/// Largest batch in a block: everything after the `W16` length.
pub const MAX_BATCH_LEN: usize = BLOCK - 2;

/// Largest transmission: one per batch, `1 + 2 + len ≤ 16382`.
pub const MAX_TRANSMISSION_LEN: usize = MAX_BATCH_LEN - 3;

/// Most transmissions in one batch.
pub const MAX_BATCH_COUNT: usize = 255;

/// The `W16` that marks a goodbye block.
const GOODBYE_MARK: u16 = 0xFFFF;

/// The reason byte of a goodbye block (§14.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GoodbyeReason {
    /// 0x00: done, or relay-link idle.
    Normal,
    /// 0x01: the relay ends a 24-hour-old session.
    SessionAge,
    /// 0x02: the relay is restarting.
    Shutdown,
    /// 0x03: the relay saw no record for 90 s.
    Idle,
    /// 0x04: the peer violated this spec.
    Protocol,
    /// 0x05: the record counter reached its limit.
    RecordLimit,
    /// 0x06: the relay sheds load.
    Overload,
    /// Any other byte; treated as [`Self::Normal`].
    Other(u8),
}

impl GoodbyeReason {
    /// The wire byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Normal => 0x00,
            Self::SessionAge => 0x01,
            Self::Shutdown => 0x02,
            Self::Idle => 0x03,
            Self::Protocol => 0x04,
            Self::RecordLimit => 0x05,
            Self::Overload => 0x06,
            Self::Other(b) => b,
        }
    }

    /// Parses the wire byte; unknown values are kept as [`Self::Other`].
    pub const fn from_byte(b: u8) -> Self {
        match b {
            0x00 => Self::Normal,
            0x01 => Self::SessionAge,
            0x02 => Self::Shutdown,
            0x03 => Self::Idle,
            0x04 => Self::Protocol,
            0x05 => Self::RecordLimit,
            0x06 => Self::Overload,
            other => Self::Other(other),
        }
    }
}

/// A decoded block, borrowing the batch from the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Block<'a> {
    /// Length 0: cover, to be discarded.
    Cover,
    /// A batch (not yet split; see [`split_batch`]).
    Batch(&'a [u8]),
    /// Length 0xFFFF: the peer is closing.
    Goodbye(GoodbyeReason),
}

impl<'a> Block<'a> {
    /// Decodes a 16384-byte plaintext block. Padding bytes are not inspected (§7.1: receivers
    /// must not act on them).
    pub fn decode(block: &'a [u8]) -> Result<Self, BlockFault> {
        let (Some(&hi), Some(&lo)) = (block.first(), block.get(1)) else {
            return Err(BlockFault::Length(0));
        };
        if block.len() != BLOCK {
            return Err(BlockFault::Length(u16::from_be_bytes([hi, lo])));
        }
        match u16::from_be_bytes([hi, lo]) {
            0 => Ok(Self::Cover),
            GOODBYE_MARK => Ok(Self::Goodbye(GoodbyeReason::from_byte(block[2]))),
            n if usize::from(n) <= MAX_BATCH_LEN => Ok(Self::Batch(&block[2..2 + usize::from(n)])),
            n => Err(BlockFault::Length(n)),
        }
    }
}

/// A cover block: `00 00` then `'#'` × 16382.
pub fn cover_block() -> Vec<u8> {
    let mut b = vec![PAD_BYTE; BLOCK];
    b[0] = 0;
    b[1] = 0;
    b
}

/// A goodbye block: `ff ff reason` then `'#'` × 16381.
pub fn goodbye_block(reason: GoodbyeReason) -> Vec<u8> {
    let mut b = vec![PAD_BYTE; BLOCK];
    b[..2].copy_from_slice(&GOODBYE_MARK.to_be_bytes());
    b[2] = reason.to_byte();
    b
}

/// A batch block: `W16(len) batch '#'…`; `None` when the batch is empty or too long.
pub fn batch_block(batch: &[u8]) -> Option<Vec<u8>> {
    if batch.is_empty() || batch.len() > MAX_BATCH_LEN {
        return None;
    }
    let mut b = Vec::with_capacity(BLOCK);
    put_large(&mut b, batch).ok()?;
    b.resize(BLOCK, PAD_BYTE);
    Some(b)
}

/// Splits a batch strictly (exactly `count` ≥ 1 items, no trailing bytes).
pub fn split_batch(batch: &[u8]) -> Option<Vec<&[u8]>> {
    decode_batch(batch).ok()
}

/// A transmission that cannot be sent because no block can hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("transmission of {0} bytes exceeds the {MAX_TRANSMISSION_LEN}-byte limit")]
pub struct TooLarge(pub usize);

/// The sender's FIFO of transmissions with their enqueue times (§7.3, §12.2).
#[derive(Debug, Default)]
pub struct Outbox {
    fifo: VecDeque<(Vec<u8>, Instant)>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one encoded transmission.
    pub fn push(&mut self, transmission: Vec<u8>, now: Instant) -> Result<(), TooLarge> {
        if transmission.len() > MAX_TRANSMISSION_LEN {
            return Err(TooLarge(transmission.len()));
        }
        self.fifo.push_back((transmission, now));
        Ok(())
    }

    /// When the head was queued, if there is one (drives `max_delay`).
    pub fn head_enqueued(&self) -> Option<Instant> {
        self.fifo.front().map(|(_, t)| *t)
    }

    /// Number of queued transmissions.
    pub fn len(&self) -> usize {
        self.fifo.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.fifo.is_empty()
    }

    /// Drops everything queued (after a goodbye).
    pub fn clear(&mut self) {
        self.fifo.clear();
    }

    /// Takes transmissions from the head while `1 + Σ(2 + len) ≤ 16382` and count ≤ 255,
    /// and returns the full block; `None` when the FIFO is empty.
    pub fn pack_block(&mut self) -> Option<Vec<u8>> {
        let mut batch = Vec::with_capacity(MAX_BATCH_LEN);
        batch.push(0u8);
        let mut count = 0usize;
        while let Some((t, _)) = self.fifo.front() {
            if count == MAX_BATCH_COUNT || batch.len() + 2 + t.len() > MAX_BATCH_LEN {
                break;
            }
            // Cannot fail: `push` bounds every transmission far below 65535 bytes.
            if put_large(&mut batch, t).is_err() {
                break;
            }
            count += 1;
            self.fifo.pop_front();
        }
        if count == 0 {
            return None;
        }
        batch[0] = u8::try_from(count).unwrap_or(u8::MAX);
        batch_block(&batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_kinds() {
        let c = cover_block();
        assert_eq!(Block::decode(&c), Ok(Block::Cover));
        let g = goodbye_block(GoodbyeReason::SessionAge);
        assert_eq!(&g[..4], b"\xff\xff\x01#");
        assert_eq!(
            Block::decode(&g),
            Ok(Block::Goodbye(GoodbyeReason::SessionAge))
        );
        let b = batch_block(b"\x01\x00\x01x").unwrap();
        assert_eq!(Block::decode(&b), Ok(Block::Batch(&b"\x01\x00\x01x"[..])));
        let mut bad = cover_block();
        bad[0] = 0x40;
        bad[1] = 0x00;
        assert_eq!(Block::decode(&bad), Err(BlockFault::Length(16384)));
        bad[0] = 0xff;
        bad[1] = 0xfe;
        assert_eq!(Block::decode(&bad), Err(BlockFault::Length(0xfffe)));
        assert!(Block::decode(&c[..100]).is_err());
    }

    #[test]
    fn packing_limits_and_order() {
        let now = Instant::now();
        let mut o = Outbox::new();
        assert_eq!(
            o.push(vec![0; MAX_TRANSMISSION_LEN + 1], now),
            Err(TooLarge(MAX_TRANSMISSION_LEN + 1))
        );
        o.push(vec![1; MAX_TRANSMISSION_LEN], now).unwrap();
        o.push(vec![2; 1], now).unwrap();
        let first = o.pack_block().unwrap();
        let Ok(Block::Batch(batch)) = Block::decode(&first) else {
            panic!("not a batch")
        };
        assert_eq!(
            batch.len(),
            MAX_BATCH_LEN,
            "the largest transmission fills a block"
        );
        assert_eq!(
            split_batch(batch).unwrap(),
            [&[1u8; MAX_TRANSMISSION_LEN][..]]
        );
        let second = o.pack_block().unwrap();
        let Ok(Block::Batch(batch)) = Block::decode(&second) else {
            panic!("not a batch")
        };
        assert_eq!(split_batch(batch).unwrap(), [&[2u8][..]]);
        assert!(o.pack_block().is_none());

        for i in 0..300u16 {
            o.push(i.to_be_bytes().to_vec(), now).unwrap();
        }
        let b = o.pack_block().unwrap();
        let Ok(Block::Batch(batch)) = Block::decode(&b) else {
            panic!("not a batch")
        };
        let items = split_batch(batch).unwrap();
        assert_eq!(items.len(), 255);
        assert_eq!(items[254], 254u16.to_be_bytes());
        assert_eq!(o.len(), 45);
    }
}
