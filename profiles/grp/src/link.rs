//! The established part of a link that both sides share: record layer, outbox and cover
//! scheduler. [`crate::connection`] and [`crate::relay`] add their own timers around it.

use std::collections::VecDeque;
use std::time::Instant;

use rand_core::RngCore;

use crate::block::{Block, GoodbyeReason, Outbox, cover_block, goodbye_block, split_batch};
use crate::cover::{CoverAction, CoverConfig, CoverScheduler};
use crate::error::{BlockFault, GrpError};
use crate::record::{RecordError, RecordLayer};

/// What one received record carried.
#[derive(Debug)]
pub(crate) enum Incoming {
    Cover,
    Batch(Vec<Vec<u8>>),
    /// A batch that did not split (count, lengths or trailing bytes wrong).
    BadBatch,
    Goodbye(GoodbyeReason),
}

/// Why sending stopped: the caller turns this into a goodbye or a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendStop {
    /// The next record is the last allowed: it must be goodbye 0x05.
    LastRecord,
}

#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) records: RecordLayer,
    pub(crate) outbox: Outbox,
    pub(crate) cover: CoverScheduler,
    /// Cover records sealed and opened, for the owner's traffic statistics (real records are
    /// the rest of [`RecordLayer`]'s counts).
    pub(crate) cover_sent: u64,
    pub(crate) cover_received: u64,
}

impl Link {
    pub(crate) fn new(
        records: RecordLayer,
        rate: u16,
        cfg: CoverConfig,
        now: Instant,
        rng: &mut impl RngCore,
    ) -> Self {
        Self {
            records,
            outbox: Outbox::new(),
            cover: CoverScheduler::new(rate, cfg, now, rng),
            cover_sent: 0,
            cover_received: 0,
        }
    }

    /// Runs the cover scheduler at `now` and seals every record it wants sent.
    pub(crate) fn flush_due(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
        out: &mut VecDeque<Vec<u8>>,
    ) -> Result<(), SendStop> {
        while let Some(action) = self.cover.poll(now, self.outbox.head_enqueued(), rng) {
            if self.records.is_last_send() {
                return Err(SendStop::LastRecord);
            }
            let block = match action {
                CoverAction::Data => self.outbox.pack_block(),
                CoverAction::Cover => None,
            };
            let block = block.unwrap_or_else(|| {
                self.cover_sent += 1;
                cover_block()
            });
            // Sealing a full block below the limit cannot fail.
            if let Ok(r) = self.records.seal(&block) {
                out.push_back(r);
            }
        }
        Ok(())
    }

    /// Seals a goodbye (sent at once, bypassing the scheduler) and drops queued data.
    pub(crate) fn seal_goodbye(&mut self, reason: GoodbyeReason) -> Option<Vec<u8>> {
        self.outbox.clear();
        self.records.seal(&goodbye_block(reason)).ok()
    }

    /// Decrypts and classifies one record.
    pub(crate) fn open(&mut self, record: &[u8]) -> Result<Incoming, GrpError> {
        let plain = self.records.open(record).map_err(|e| match e {
            RecordError::Limit => GrpError::RecordLimit,
            RecordError::Decrypt | RecordError::Size(_) | RecordError::Encrypt => {
                GrpError::Block(BlockFault::Decrypt)
            }
        })?;
        Ok(match Block::decode(&plain).map_err(GrpError::Block)? {
            Block::Cover => {
                self.cover_received += 1;
                Incoming::Cover
            }
            Block::Goodbye(r) => Incoming::Goodbye(r),
            Block::Batch(b) => match split_batch(b) {
                Some(items) => Incoming::Batch(items.into_iter().map(<[u8]>::to_vec).collect()),
                None => Incoming::BadBatch,
            },
        })
    }

    pub(crate) fn next_wakeup(&self) -> Instant {
        self.cover.next_wakeup(self.outbox.head_enqueued())
    }
}
