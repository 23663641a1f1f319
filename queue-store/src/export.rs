//! Sealed backups (`muxctl export`) and restore.
//!
//! A backup is one file:
//!
//! ```text
//! "MUXDBAK1" ‖ u32 wrap length ‖ backup key wrapped by a key file or passphrase
//!            ‖ XChaCha20-Poly1305(backup key, aad = everything before, dump)
//! ```
//!
//! The dump holds the store's data key, the schema version and every table's raw rows, taken
//! from one read snapshot. Secret fields inside stay sealed under the data key, which travels
//! inside the encrypted dump; the backup key and its wrap are fresh, so a backup can be
//! protected differently from the store it came from.
//!
//! Restore path: `Store::restore(backup, how the backup is protected, new db path, how the new
//! db is to be protected)` writes a new database file (never over an existing one) and then
//! opens it normally, which runs schema migrations if the backup came from an older build.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableHandle};
use tracing::info;
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::error::{DbResultExt, StoreError, io_err};
use crate::schema::{self, ALL_TABLES, KEY_WRAP_KEY, META, SCHEMA_VERSION};
use crate::seal::{DataKey, Unlock};
use crate::{Store, StoreOptions};

const BACKUP_MAGIC: &[u8; 8] = b"MUXDBAK1";

impl Store {
    /// Writes a sealed backup of the whole store to `dest` (mode 0600; must not exist),
    /// protected by `unlock`. Consistent: it is taken from one read snapshot.
    pub fn export(&self, dest: &Path, unlock: &Unlock) -> Result<(), StoreError> {
        let mut dump = Zeroizing::new(Vec::new());
        {
            let txn = self.db.begin_read().db()?;
            let mut w = Writer::new()
                .bytes(self.key.bytes())?
                .u32(SCHEMA_VERSION)
                .u32(ALL_TABLES.len() as u32);
            for def in ALL_TABLES {
                let table = txn.open_table(def).db()?;
                let mut rows = Vec::new();
                for entry in table.iter().db()? {
                    let (k, v) = entry.db()?;
                    // The wrap belongs to the source store's unlock method, not the backup's.
                    if def.name() == META.name() && k.value() == KEY_WRAP_KEY {
                        continue;
                    }
                    rows.push((k.value().to_vec(), v.value().to_vec()));
                }
                w = w.bytes(def.name().as_bytes())?.u64(rows.len() as u64);
                for (k, v) in &rows {
                    w = w.bytes(k)?.bytes(v)?;
                }
            }
            dump.extend_from_slice(&w.finish());
        }
        let backup_key = DataKey::generate();
        let wrap = backup_key.wrap(unlock)?;
        let wrap_len = u32::try_from(wrap.len()).map_err(|_| StoreError::InvalidInput("wrap"))?;
        let header = Writer::new()
            .raw(BACKUP_MAGIC)
            .u32(wrap_len)
            .raw(&wrap)
            .finish();
        let body = backup_key.seal(&header, &dump)?;

        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
                    path: dest.to_path_buf(),
                },
                _ => io_err(dest)(e),
            })?;
        file.write_all(&header).map_err(io_err(dest))?;
        file.write_all(&body).map_err(io_err(dest))?;
        file.sync_all().map_err(io_err(dest))?;
        info!(dest = %dest.display(), "exported store backup");
        Ok(())
    }

    /// Restores a backup written by [`Self::export`] into a new database at `db_path`,
    /// protected by `db_unlock`, and opens it.
    pub fn restore(
        backup: &Path,
        backup_unlock: &Unlock,
        db_path: &Path,
        db_unlock: &Unlock,
    ) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::BadBackup {
            path: backup.to_path_buf(),
            reason: reason.to_owned(),
        };
        let raw = fs::read(backup).map_err(io_err(backup))?;
        let mut r = Reader::new(&raw, "backup");
        let magic: [u8; 8] = r.fixed().map_err(|_| bad("truncated header"))?;
        if &magic != BACKUP_MAGIC {
            return Err(bad("not a muxd backup file"));
        }
        let wrap_len = r.u32().map_err(|_| bad("truncated header"))? as usize;
        let header_len = BACKUP_MAGIC.len() + 4 + wrap_len;
        let header = raw
            .get(..header_len)
            .ok_or_else(|| bad("truncated header"))?;
        let wrap = &header[BACKUP_MAGIC.len() + 4..];
        let backup_key = DataKey::unwrap(wrap, backup_unlock, backup)?;
        let dump = backup_key
            .open(header, &raw[header_len..])
            .ok_or_else(|| bad("contents failed authentication"))?;

        let mut r = Reader::new(&dump, "backup");
        let data_key = DataKey::from_slice(r.bytes().map_err(|_| bad("truncated"))?)
            .ok_or_else(|| bad("bad data key"))?;
        let schema = r.u32().map_err(|_| bad("truncated"))?;
        if schema > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: backup.to_path_buf(),
                found: schema,
                supported: SCHEMA_VERSION,
            });
        }
        let wrap = data_key.wrap(db_unlock)?;
        let store = Self::create_raw(db_path, data_key, StoreOptions::default())?;
        let filled = store.write(|txn| {
            for def in ALL_TABLES {
                txn.open_table(def).db()?;
            }
            let tables = r.u32()?;
            for _ in 0..tables {
                let name = r.string()?;
                let def = ALL_TABLES
                    .into_iter()
                    .find(|d| d.name() == name)
                    .ok_or_else(|| bad("unknown table"))?;
                let mut table = txn.open_table(def).db()?;
                for _ in 0..r.u64()? {
                    let k = r.bytes()?;
                    let v = r.bytes()?;
                    table.insert(k, v).db()?;
                }
            }
            // The dump may come from an older schema; the normal open below migrates it.
            let mut meta = txn.open_table(META).db()?;
            meta.insert(KEY_WRAP_KEY, wrap.as_slice()).db()?;
            meta.insert(schema::SCHEMA_KEY, schema.to_be_bytes().as_slice())
                .db()?;
            Ok(())
        });
        drop(store);
        if let Err(e) = filled {
            // The file is ours and half-written; leaving it would block a retry.
            let _ = fs::remove_file(db_path);
            return Err(match e {
                StoreError::CorruptRecord { .. } => bad("malformed contents"),
                other => other,
            });
        }
        info!(backup = %backup.display(), db = %db_path.display(), "restored store backup");
        Self::open(db_path, db_unlock)
    }
}
