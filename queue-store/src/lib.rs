//! Durable storage for muxd: the outbound queue, the inbound mailbox and queue records.
//!
//! The store is a single redb file. It is synchronous and has no async runtime: the daemon owns
//! one [`Store`] on a dedicated thread and talks to it over channels (an actor, like mini-redis's
//! `BufferedClient`). Such an actor gets group commit by draining every enqueue command waiting
//! in its channel into one [`Store::enqueue_batch`] and answering each reply channel after that
//! single commit; [`GroupCommitter`] does the same for callers on many threads sharing an
//! `Arc<Store>`. `Store` is `Send + Sync`; redb serialises write transactions internally.
//!
//! The daemon's driver instead stages every durable change of one loop turn into a [`Batch`]
//! and calls [`Store::commit`] once before any effect others can see: one fsync for all of
//! them. At start it rebuilds its state from [`Store::unfinished`], [`Store::all_pending`],
//! [`Store::records`] and [`Store::states`], and continues ids at [`Store::next_outbound_id`].
//!
//! Leases are not expiry-aware: call [`Store::expire`] before leasing (and periodically) so that
//! expired messages fail instead of being sent.
//!
//! What the store guarantees:
//!
//! - **Outbound** ([`Store::enqueue`] and friends): a message is durably committed before the
//!   call returns, leased in FIFO order per queue, and removed from the queue only when the
//!   server has accepted it ([`Store::ack_sent`]) or it expired ([`Store::expire`]). A lease does
//!   not survive a restart: messages in flight when the process stopped are queued again on open.
//! - **Inbound** ([`Store::deliver`]): a received message is committed before the caller ACKs it
//!   to the server, kept until the owning app acknowledges it, and deduplicated by
//!   `(queue, message id)`, so a redelivery after a reconnect is recognised.
//! - **Secrets at rest** ([`QueueRecord::secret`], message payloads and bodies): sealed with a
//!   data key, itself wrapped by a key file or a passphrase ([`Unlock`]).
//!
//! What it does not do: it knows nothing about SMP (payloads and ids are opaque bytes), reads no
//! clock (every call that needs time takes `now` as unix milliseconds), and decides no retry
//! policy (the pool passes the `not_before` of each retry in).

mod batch;
mod codec;
mod error;
mod export;
mod group_commit;
mod mailbox;
pub mod model;
mod outbound;
mod records;
mod schema;
mod seal;
mod state;

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Durability, ReadableDatabase};
use tracing::{info, warn};

use crate::error::{DbResultExt, io_err};
use crate::seal::DataKey;

pub use crate::batch::Batch;
pub use crate::error::{DatabaseError, StoreError};
pub use crate::group_commit::GroupCommitter;
pub use crate::mailbox::{Delivered, InboundMessage};
pub use crate::outbound::{
    DEFAULT_EXPIRY_MS, Expired, Leased, MessageState, MessageStatus, NewOutbound, OutboundId,
    QueueSummary, Unfinished,
};
pub use crate::records::QueueRecord;
pub use crate::schema::SCHEMA_VERSION;
pub use crate::seal::{Passphrase, SecretBytes, Unlock, create_key_file};

/// The first bytes of every redb file; checked before handing a file to redb so that a file of
/// another kind is reported as foreign rather than as a damaged database.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Identifies one SMP queue: the server it lives on and its id there. Both are opaque to the
/// store; the server string is whatever the pool uses to name a server.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueRef {
    /// The server, e.g. `smp://fingerprint@host:port`.
    pub server: String,
    /// The queue id on that server (sender or recipient id, as the caller chooses).
    pub queue_id: Vec<u8>,
}

impl QueueRef {
    /// Builds a queue reference.
    pub fn new(server: impl Into<String>, queue_id: Vec<u8>) -> Self {
        Self {
            server: server.into(),
            queue_id,
        }
    }
}

/// Tunables for a [`Store`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoreOptions {
    /// How many acknowledged inbound message ids are remembered per queue for deduplication.
    /// Messages the app has not acknowledged yet are always remembered on top of these.
    pub dedup_window: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        // A server redelivers only what it has not seen ACKed, which is at most the messages of
        // one reconnect window; 1024 per queue is far beyond that and costs ~50 KiB per queue.
        Self { dedup_window: 1024 }
    }
}

impl StoreOptions {
    /// Sets [`Self::dedup_window`].
    pub fn with_dedup_window(mut self, n: u32) -> Self {
        self.dedup_window = n;
        self
    }
}

/// The durable store. `Sync`: share it behind an `Arc` for [`GroupCommitter`], or own it in a
/// single store thread.
pub struct Store {
    db: redb::Database,
    path: PathBuf,
    key: DataKey,
    commits: AtomicU64,
    options: StoreOptions,
}

impl Store {
    /// Creates a new store at `path`, protected by `unlock`. Fails if the file exists: creating
    /// is never a way to reset a store.
    pub fn create(path: &Path, unlock: &Unlock) -> Result<Self, StoreError> {
        Self::create_with(path, unlock, StoreOptions::default())
    }

    /// [`Self::create`] with explicit options.
    pub fn create_with(
        path: &Path,
        unlock: &Unlock,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let key = DataKey::generate();
        let wrap = key.wrap(unlock)?;
        let store = Self::create_raw(path, key, options)?;
        store.write(|txn| schema::initialize(txn, &wrap))?;
        info!(path = %path.display(), "created store");
        Ok(store)
    }

    /// Creates the file and the handle, without any tables.
    fn create_raw(path: &Path, key: DataKey, options: StoreOptions) -> Result<Self, StoreError> {
        // create_new, so that a file that appeared since the caller looked is not overwritten;
        // mode 0600 because routing metadata (servers, queue ids) is not sealed.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists {
                    path: path.to_path_buf(),
                },
                _ => io_err(path)(e),
            })?;
        // redb initialises an empty file in place, keeping the mode set above.
        let db = redb::Builder::new()
            .create(path)
            .map_err(|e| open_error(path, e))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
            key,
            commits: AtomicU64::new(0),
            options,
        })
    }

    /// Opens an existing store. A missing, foreign, corrupt or newer-schema file is an error
    /// naming the file; nothing is ever recreated or reset.
    ///
    /// Messages that were in flight when the store was last closed are queued again.
    pub fn open(path: &Path, unlock: &Unlock) -> Result<Self, StoreError> {
        Self::open_with(path, unlock, StoreOptions::default())
    }

    /// [`Self::open`] with explicit options.
    pub fn open_with(
        path: &Path,
        unlock: &Unlock,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        check_redb_magic(path)?;
        // redb checks some invariants with debug assertions; on a damaged file those panic in
        // debug builds where release builds return an error. Either way it is a corrupt file.
        let db = catch_unwind(AssertUnwindSafe(|| redb::Builder::new().open(path)))
            .map_err(|_| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "storage engine failed while reading the file".to_owned(),
            })?
            .map_err(|e| open_error(path, e))?;
        let meta =
            catch_unwind(AssertUnwindSafe(|| schema::check(&db, path))).map_err(|_| {
                StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: "storage engine failed while reading the meta table".to_owned(),
                }
            })??;
        let key = DataKey::unwrap(&meta.key_wrap, unlock, path)?;
        let store = Self {
            db,
            path: path.to_path_buf(),
            key,
            commits: AtomicU64::new(0),
            options,
        };
        if meta.schema < SCHEMA_VERSION {
            store.write(|txn| schema::migrate(txn, meta.schema, path))?;
        }
        let recovered = store.recover_in_flight()?;
        if recovered > 0 {
            warn!(
                recovered,
                "requeued messages that were in flight at last shutdown"
            );
        }
        info!(path = %path.display(), schema = SCHEMA_VERSION, "opened store");
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many write transactions this handle has committed; with group commit this is lower
    /// than the number of messages enqueued.
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `f` in one write transaction and commits it durably (fsync before returning). On
    /// error the transaction is dropped, which aborts it.
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write().db()?;
        // Immediate is redb's default; it is set explicitly because every acknowledgement the
        // daemon gives an app depends on it.
        txn.set_durability(Durability::Immediate).db()?;
        let out = f(&txn)?;
        txn.commit().db()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.db.begin_read().db()
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("commits", &self.commit_count())
            .finish_non_exhaustive()
    }
}

// The daemon moves the store into its own thread and the group committer shares it.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    send_sync::<GroupCommitter>();
};

/// Rejects files that are not redb files at all before redb sees them.
fn check_redb_magic(path: &Path) -> Result<(), StoreError> {
    let mut file = fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::NotFound {
            path: path.to_path_buf(),
        },
        _ => io_err(path)(e),
    })?;
    let mut head = [0u8; REDB_MAGIC.len()];
    match file.read_exact(&mut head) {
        Ok(()) if head == REDB_MAGIC => Ok(()),
        Ok(()) => Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: "not a redb database file".to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: "file too short to be a database".to_owned(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(source)) => StoreError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}
