//! The record layer (§6): one Noise transport message per 16384-byte block.
//!
//! Nonces are explicit (snow's stateless transport) so that the record number `n` is ours:
//! it drives the rekey schedule (before record `n` with `n > 0` and `n mod 1024 = 0`, never
//! reset) and the record limit. Snow's `rekey_*` replaces the key with `REKEY(k)` and drops
//! the old one.

use std::fmt;

use snow::StatelessTransportState;

use crate::{BLOCK, RECORD, RECORD_LIMIT, REKEY_EVERY};

/// Why a record could not be sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record did not authenticate (fatal: close at once, report BLOCK).
    #[error("record failed to authenticate")]
    Decrypt,
    /// A record or block of the wrong size was handed in.
    #[error("wrong size: {0} bytes")]
    Size(usize),
    /// The direction's record numbers are used up.
    #[error("record limit reached")]
    Limit,
    /// Snow refused to encrypt (cannot happen with a valid state and size).
    #[error("encryption failed")]
    Encrypt,
}

/// Both directions' cipher states and record counters of one session.
pub struct RecordLayer {
    state: StatelessTransportState,
    send_n: u64,
    recv_n: u64,
    limit: u64,
}

impl RecordLayer {
    pub(crate) fn new(state: StatelessTransportState) -> Self {
        Self {
            state,
            send_n: 0,
            recv_n: 0,
            limit: RECORD_LIMIT,
        }
    }

    /// Lowers the record limit so tests can reach it (§6.4 asks for this knob).
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.clamp(1, RECORD_LIMIT);
    }

    /// Moves both counters to `n` as if `n` records had flowed each way, rekeying as the
    /// schedule would have (tests of the rekey boundary and the limit use it).
    pub fn skip_to(&mut self, n: u64) {
        self.skip_sent_to(n);
        self.skip_received_to(n);
    }

    /// Moves the sending counter to `n` (see [`Self::skip_to`]).
    pub fn skip_sent_to(&mut self, n: u64) {
        // The rekey before record k happens when k is sealed, so skipping records 0..n
        // performs the rekeys for every boundary k < n.
        while self.send_n < n {
            if rekey_before(self.send_n) {
                self.state.rekey_outgoing();
            }
            self.send_n += 1;
        }
    }

    /// Moves the receiving counter to `n` (see [`Self::skip_to`]).
    pub fn skip_received_to(&mut self, n: u64) {
        while self.recv_n < n {
            if rekey_before(self.recv_n) {
                self.state.rekey_incoming();
            }
            self.recv_n += 1;
        }
    }

    /// Records sent so far (the next record's `n`).
    pub fn sent(&self) -> u64 {
        self.send_n
    }

    /// Records received so far.
    pub fn received(&self) -> u64 {
        self.recv_n
    }

    /// True when the next record sent is the last one allowed, which must be goodbye 0x05.
    pub fn is_last_send(&self) -> bool {
        self.send_n + 1 >= self.limit
    }

    /// Encrypts one block as record `n = sent()`.
    pub fn seal(&mut self, block: &[u8]) -> Result<Vec<u8>, RecordError> {
        if block.len() != BLOCK {
            return Err(RecordError::Size(block.len()));
        }
        if self.send_n >= self.limit {
            return Err(RecordError::Limit);
        }
        let n = self.send_n;
        if rekey_before(n) {
            self.state.rekey_outgoing();
        }
        let mut out = vec![0u8; RECORD];
        let len = self
            .state
            .write_message(n, block, &mut out)
            .map_err(|_| RecordError::Encrypt)?;
        out.truncate(len);
        self.send_n += 1;
        Ok(out)
    }

    /// Decrypts record `n = received()`.
    pub fn open(&mut self, record: &[u8]) -> Result<Vec<u8>, RecordError> {
        if record.len() != RECORD {
            return Err(RecordError::Size(record.len()));
        }
        if self.recv_n >= self.limit {
            return Err(RecordError::Limit);
        }
        let n = self.recv_n;
        if rekey_before(n) {
            self.state.rekey_incoming();
        }
        // The counter advances even on failure: the session is dead then anyway, and a retry
        // must not be able to probe the same nonce twice.
        self.recv_n += 1;
        let mut out = vec![0u8; BLOCK];
        let len = self
            .state
            .read_message(n, record, &mut out)
            .map_err(|_| RecordError::Decrypt)?;
        out.truncate(len);
        Ok(out)
    }
}

/// §6.3: the key changes before record `n` when `n > 0` and `n mod 1024 = 0`.
fn rekey_before(n: u64) -> bool {
    n > 0 && n.is_multiple_of(REKEY_EVERY)
}

impl fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordLayer")
            .field("sent", &self.send_n)
            .field("received", &self.recv_n)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}
