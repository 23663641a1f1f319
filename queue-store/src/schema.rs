//! Table layout, the meta table (magic and schema version) and migrations.
//!
//! Every table maps raw bytes to raw bytes; layouts are in `codec.rs` and the module that owns
//! each table. That keeps the export and restore code generic over tables and keeps the
//! on-disk format independent of redb's typed-table encodings.

use std::path::Path;

use redb::{ReadableDatabase, TableDefinition, TableError};
use tracing::info;

use crate::error::{DbResultExt, StoreError};

/// One store table: raw key bytes to raw value bytes.
pub(crate) type Table = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// Magic, schema version, the wrapped data key and id counters.
pub(crate) const META: Table = TableDefinition::new("muxd_meta");
/// Outbound message id → record.
pub(crate) const OUT_MSGS: Table = TableDefinition::new("outbound_messages");
/// `queue key ‖ id` → empty, for every message not yet sent or failed: the per-queue FIFO.
pub(crate) const OUT_FIFO: Table = TableDefinition::new("outbound_fifo");
/// `expires_at ‖ id` → empty, for every message not yet sent or failed: the expiry index.
pub(crate) const OUT_EXPIRY: Table = TableDefinition::new("outbound_expiry");
/// Queue key → unix ms before which nothing is leased from that queue (after ERR QUOTA).
pub(crate) const OUT_HOLD: Table = TableDefinition::new("outbound_hold");
/// `app key ‖ queue key ‖ seq` → inbound message awaiting the app's ack.
pub(crate) const MBX_MSGS: Table = TableDefinition::new("mailbox_messages");
/// `queue key ‖ msg id` → `seq ‖ app`: the dedup set.
pub(crate) const MBX_SEEN: Table = TableDefinition::new("mailbox_seen");
/// `queue key ‖ seq` → msg id: dedup entries in arrival order, for pruning the oldest.
pub(crate) const MBX_ORDER: Table = TableDefinition::new("mailbox_seen_order");
/// Queue key → number of dedup entries kept for it.
pub(crate) const MBX_COUNT: Table = TableDefinition::new("mailbox_seen_count");
/// Queue key → queue record (secrets sealed).
pub(crate) const RECORDS: Table = TableDefinition::new("queue_records");
/// Caller-chosen key → small opaque value, unsealed (schema 2).
pub(crate) const STATE: Table = TableDefinition::new("small_state");

/// Every table, in the order they are exported.
pub(crate) const ALL_TABLES: [Table; 11] = [
    META, OUT_MSGS, OUT_FIFO, OUT_EXPIRY, OUT_HOLD, MBX_MSGS, MBX_SEEN, MBX_ORDER, MBX_COUNT,
    RECORDS, STATE,
];

pub(crate) const MAGIC_KEY: &[u8] = b"magic";
pub(crate) const MAGIC: &[u8] = b"muxd-queue-store";
pub(crate) const SCHEMA_KEY: &[u8] = b"schema_version";
pub(crate) const KEY_WRAP_KEY: &[u8] = b"key_wrap";
pub(crate) const NEXT_OUTBOUND_KEY: &[u8] = b"next_outbound_id";
pub(crate) const NEXT_MAILBOX_SEQ_KEY: &[u8] = b"next_mailbox_seq";

/// The schema this build writes and the newest it can read. Older files are migrated on open.
pub const SCHEMA_VERSION: u32 = 2;

/// What [`check`] learned from a database's meta table.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) schema: u32,
    pub(crate) key_wrap: Vec<u8>,
}

/// Verifies that an opened redb file is a muxd store this build can read.
pub(crate) fn check(db: &redb::Database, path: &Path) -> Result<Meta, StoreError> {
    let foreign = |reason: &str| StoreError::Foreign {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let txn = db.begin_read().db()?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Err(foreign("no muxd meta table")),
        Err(TableError::TableTypeMismatch { .. }) => {
            return Err(foreign("meta table has unexpected types"));
        }
        Err(e) => return Err(e).db(),
    };
    let get = |k: &[u8]| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(redb::ReadableTable::get(&meta, k)
            .db()?
            .map(|g| g.value().to_vec()))
    };
    if get(MAGIC_KEY)?.as_deref() != Some(MAGIC) {
        return Err(foreign("wrong magic in meta table"));
    }
    let schema = get(SCHEMA_KEY)?
        .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "missing or malformed schema version".to_owned(),
        })?;
    if schema > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: schema,
            supported: SCHEMA_VERSION,
        });
    }
    let key_wrap = get(KEY_WRAP_KEY)?.ok_or_else(|| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: "missing wrapped data key".to_owned(),
    })?;
    Ok(Meta { schema, key_wrap })
}

/// Creates every table and writes the meta entries of a fresh store.
pub(crate) fn initialize(txn: &redb::WriteTransaction, key_wrap: &[u8]) -> Result<(), StoreError> {
    for def in ALL_TABLES {
        txn.open_table(def).db()?;
    }
    let mut meta = txn.open_table(META).db()?;
    meta.insert(MAGIC_KEY, MAGIC).db()?;
    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())
        .db()?;
    meta.insert(KEY_WRAP_KEY, key_wrap).db()?;
    Ok(())
}

/// One migration step: upgrades the tables in `txn` by exactly one schema version.
type Migration = fn(&redb::WriteTransaction) -> Result<(), StoreError>;

/// `MIGRATIONS[i]` upgrades schema `i + 1` to `i + 2`; a change to the layout appends a step and
/// bumps [`SCHEMA_VERSION`].
const MIGRATIONS: &[Migration] = &[v1_to_v2];

const _: () = assert!(MIGRATIONS.len() as u32 + 1 == SCHEMA_VERSION);

/// Schema 2 adds the small-state table; nothing else changed, so no row is rewritten.
fn v1_to_v2(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(STATE).db()?;
    Ok(())
}

/// Brings a database from schema `from` up to [`SCHEMA_VERSION`] inside `txn`.
///
/// The new version is written in the same transaction as the steps, so a crash mid-migration
/// leaves the old schema intact and the migration simply runs again at the next open.
pub(crate) fn migrate(
    txn: &redb::WriteTransaction,
    from: u32,
    path: &Path,
) -> Result<(), StoreError> {
    let mut version = from;
    while version < SCHEMA_VERSION {
        // No schema before 1 was ever written, so a lower number is damage, not history.
        let step = version
            .checked_sub(1)
            .and_then(|i| MIGRATIONS.get(i as usize))
            .ok_or_else(|| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("unknown schema version {version}"),
            })?;
        info!(from = version, to = version + 1, "migrating store schema");
        step(txn)?;
        version += 1;
    }
    let mut meta = txn.open_table(META).db()?;
    meta.insert(SCHEMA_KEY, version.to_be_bytes().as_slice())
        .db()?;
    Ok(())
}

/// Reads a big-endian u64 counter from the meta table (0 when absent).
pub(crate) fn read_counter(
    meta: &impl redb::ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<u64, StoreError> {
    match meta.get(key).db()? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.value())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::CorruptRecord {
                what: "meta counter",
                detail: "not 8 bytes".to_owned(),
            }),
    }
}

/// Every row whose key starts with `prefix`, in key order, copied out so the caller may then
/// modify the table.
#[allow(clippy::type_complexity)] // raw key/value pairs; house style avoids a type alias
pub(crate) fn scan_prefix(
    table: &impl redb::ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.range::<&[u8]>(prefix..).db()? {
        let (k, v) = entry.db()?;
        if !k.value().starts_with(prefix) {
            break;
        }
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}
