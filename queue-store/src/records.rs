//! Queue records: what the daemon must remember about each SMP queue it manages.
//!
//! The store does not know SMP, so a record is split by sensitivity rather than by meaning:
//! `public` holds what may be read by anyone with the file (server, other queue ids, public
//! keys, flags), `secret` holds every private key and all E2E state and is sealed with the data
//! key, bound to the queue it belongs to.

use redb::{ReadableTable, WriteTransaction};

use crate::codec::{Reader, Writer, queue_key, split_queue_key};
use crate::error::{DbResultExt, StoreError};
use crate::schema::RECORDS;
use crate::seal::SecretBytes;
use crate::{QueueRef, Store};

const RECORD_VERSION: u8 = 1;
const SECRET_AAD: &[u8] = b"queue_records/";

/// One queue's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRecord {
    /// The queue (server and primary id); the record's key.
    pub queue: QueueRef,
    /// The app that owns the queue.
    pub app: String,
    /// Non-secret fields, encoded by the caller (stored in the clear).
    pub public: Vec<u8>,
    /// Private keys and E2E state, encoded by the caller (sealed at rest).
    pub secret: SecretBytes,
}

fn secret_aad(qkey: &[u8]) -> Vec<u8> {
    [SECRET_AAD, qkey].concat()
}

/// [`Store::delete_record`] inside an open transaction (shared with [`crate::Batch`]).
pub(crate) fn delete_record_in(
    txn: &WriteTransaction,
    queue: &QueueRef,
) -> Result<bool, StoreError> {
    let qkey = queue_key(queue)?;
    let mut table = txn.open_table(RECORDS).db()?;
    Ok(table.remove(qkey.as_slice()).db()?.is_some())
}

impl Store {
    /// Inserts or replaces the record of `record.queue`.
    pub fn put_record(&self, record: &QueueRecord) -> Result<(), StoreError> {
        self.write(|txn| self.put_record_in(txn, record))
    }

    /// [`Self::put_record`] inside an open transaction (shared with [`crate::Batch`]).
    pub(crate) fn put_record_in(
        &self,
        txn: &WriteTransaction,
        record: &QueueRecord,
    ) -> Result<(), StoreError> {
        let qkey = queue_key(&record.queue)?;
        let sealed = self.key.seal(&secret_aad(&qkey), record.secret.expose())?;
        let value = Writer::new()
            .u8(RECORD_VERSION)
            .bytes(record.app.as_bytes())?
            .bytes(&record.public)?
            .bytes(&sealed)?
            .finish();
        txn.open_table(RECORDS)
            .db()?
            .insert(qkey.as_slice(), value.as_slice())
            .db()?;
        Ok(())
    }

    /// The record of `queue`, if any.
    pub fn record(&self, queue: &QueueRef) -> Result<Option<QueueRecord>, StoreError> {
        let qkey = queue_key(queue)?;
        let txn = self.read()?;
        let table = txn.open_table(RECORDS).db()?;
        let value = table.get(qkey.as_slice()).db()?;
        value
            .map(|v| self.decode_record(queue.clone(), &qkey, v.value()))
            .transpose()
    }

    /// Every record, or only those owned by `app`.
    pub fn records(&self, app: Option<&str>) -> Result<Vec<QueueRecord>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(RECORDS).db()?;
        let mut out = Vec::new();
        for entry in table.iter().db()? {
            let (k, v) = entry.db()?;
            let (queue, rest) = split_queue_key(k.value(), "queue record key")?;
            if !rest.is_empty() {
                return Err(StoreError::CorruptRecord {
                    what: "queue record key",
                    detail: "trailing bytes".to_owned(),
                });
            }
            let record = self.decode_record(queue, k.value(), v.value())?;
            if app.is_none_or(|a| a == record.app) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Deletes the record of `queue`; returns whether there was one.
    pub fn delete_record(&self, queue: &QueueRef) -> Result<bool, StoreError> {
        self.write(|txn| delete_record_in(txn, queue))
    }

    fn decode_record(
        &self,
        queue: QueueRef,
        qkey: &[u8],
        value: &[u8],
    ) -> Result<QueueRecord, StoreError> {
        let mut r = Reader::new(value, "queue record");
        if r.u8()? != RECORD_VERSION {
            return Err(r.corrupt("unknown record version"));
        }
        let app = r.string()?;
        let public = r.bytes()?.to_vec();
        let sealed = r.bytes()?;
        r.finish()?;
        let secret = self
            .key
            .open_record(&secret_aad(qkey), sealed, "queue record secret")?;
        Ok(QueueRecord {
            queue,
            app,
            public,
            secret: SecretBytes::new(secret.to_vec()),
        })
    }
}
