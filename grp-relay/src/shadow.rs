//! Tells data records from cover records for the counters.
//!
//! `RelayLink` seals cover and data blocks alike (that is the point of cover traffic), so the
//! driver mirrors the link's outbox: it knows the size of every transmission it queued, packs
//! them with the same §7.3 rule, and attributes each sealed record to the head of that mirror
//! or, when the mirror is empty, to cover.

use std::collections::VecDeque;

use muxd_grp::block::{MAX_BATCH_COUNT, MAX_BATCH_LEN};

/// How the records of one flush divide up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kinds {
    pub(crate) cover: u64,
    pub(crate) real: u64,
    pub(crate) goodbye: u64,
}

/// The mirror of one link's outbox.
#[derive(Debug, Default)]
pub(crate) struct Shadow {
    pending: VecDeque<usize>,
    goodbye_next: bool,
}

impl Shadow {
    /// A transmission of `len` bytes was queued on the link.
    pub(crate) fn push(&mut self, len: usize) {
        self.pending.push_back(len);
    }

    /// The last step ended the session: its last record, if any, is a goodbye, and the
    /// link dropped its queued data.
    pub(crate) fn expect_goodbye(&mut self) {
        self.goodbye_next = true;
    }

    /// Attributes `records` freshly sealed records, in order.
    pub(crate) fn classify(&mut self, records: usize) -> Kinds {
        let mut k = Kinds::default();
        let mut n = records;
        if self.goodbye_next && n > 0 {
            n -= 1;
            k.goodbye = 1;
        }
        for _ in 0..n {
            if self.pop_block() {
                k.real += 1;
            } else {
                k.cover += 1;
            }
        }
        if self.goodbye_next {
            self.pending.clear();
            self.goodbye_next = false;
        }
        k
    }

    /// Removes one block's worth from the head (`1 + Σ(2 + len) ≤ 16382`, ≤ 255 items).
    fn pop_block(&mut self) -> bool {
        let mut used = 1usize;
        let mut count = 0usize;
        while let Some(&len) = self.pending.front() {
            if count == MAX_BATCH_COUNT || used + 2 + len > MAX_BATCH_LEN {
                break;
            }
            used += 2 + len;
            count += 1;
            self.pending.pop_front();
        }
        count > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_like_the_outbox() {
        let mut s = Shadow::default();
        // Two near-full transmissions need two blocks; then one cover.
        s.push(16000);
        s.push(16000);
        assert_eq!(
            s.classify(3),
            Kinds {
                cover: 1,
                real: 2,
                goodbye: 0
            }
        );
        for _ in 0..300 {
            s.push(10);
        }
        assert_eq!(s.classify(1).real, 1);
        assert_eq!(s.pending.len(), 45, "255 per block");
        s.expect_goodbye();
        assert_eq!(
            s.classify(1),
            Kinds {
                cover: 0,
                real: 0,
                goodbye: 1
            }
        );
        assert!(s.pending.is_empty());
    }
}
