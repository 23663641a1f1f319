//! Small per-key state: sender sequence counters, receiver sequence windows and the like.
//!
//! Keys and values are opaque to the store and are stored **unsealed**: they are meant for
//! counters and windows, which reveal no more than the routing metadata that is already in the
//! clear. Anything secret belongs in a [`crate::QueueRecord`]'s `secret` instead.

use redb::WriteTransaction;

use crate::Store;
use crate::error::{DbResultExt, StoreError};
use crate::schema::{self, STATE};

/// Inserts or replaces one entry inside an open transaction (for [`crate::Batch::put_state`]).
pub(crate) fn put_state_in(
    txn: &WriteTransaction,
    key: &[u8],
    value: &[u8],
) -> Result<(), StoreError> {
    txn.open_table(STATE).db()?.insert(key, value).db()?;
    Ok(())
}

/// Removes one entry, if present, inside an open transaction.
pub(crate) fn delete_state_in(txn: &WriteTransaction, key: &[u8]) -> Result<(), StoreError> {
    txn.open_table(STATE).db()?.remove(key).db()?;
    Ok(())
}

impl Store {
    /// Every state entry whose key starts with `prefix`, in key order (all of them for an
    /// empty prefix).
    #[allow(clippy::type_complexity)] // the contract's raw key/value pairs; no type alias
    pub fn states(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        let txn = self.read()?;
        schema::scan_prefix(&txn.open_table(STATE).db()?, prefix)
    }
}
