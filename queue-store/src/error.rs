//! The store's error type. redb's own errors are wrapped in an opaque [`DatabaseError`] so that no
//! redb type appears in the public API (h2's opaque error pattern).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::outbound::{MessageState, OutboundId};

/// Everything that can go wrong in the store.
///
/// Variants that concern a file name the file, so an operator can tell which one is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// [`crate::Store::open`] was pointed at a file that does not exist. The store never creates a
    /// database on open: a missing file after `muxd init` means something is wrong, and silently
    /// starting empty would lose every queued message.
    #[error("store database {path} does not exist (run `muxd init` to create one)")]
    NotFound {
        /// The database file.
        path: PathBuf,
    },
    /// [`crate::Store::create`] (or a restore) found a file already at the path.
    #[error("refusing to overwrite existing file {path}")]
    AlreadyExists {
        /// The file that is in the way.
        path: PathBuf,
    },
    /// The file is not a muxd store: another program's redb file, or not a redb file at all.
    #[error("{path} is not a muxd store database: {reason}")]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// What gave it away.
        reason: String,
    },
    /// The file looks like a database but cannot be read: truncated, overwritten or damaged.
    #[error("store database {path} is corrupt: {detail}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What the storage engine reported.
        detail: String,
    },
    /// The database was written by a newer muxd with a schema this build does not understand.
    #[error(
        "store database {path} has schema version {found}, newer than the supported {supported}"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version stored in the file.
        found: u32,
        /// The newest version this build can read.
        supported: u32,
    },
    /// The database is already open, in this process or another one.
    #[error("store database {path} is already open by another process or handle")]
    AlreadyOpen {
        /// The database file.
        path: PathBuf,
    },
    /// The passphrase or key file does not unlock the data key.
    #[error("cannot unlock {path}: wrong passphrase or key file")]
    WrongKey {
        /// The database (or backup) file that could not be unlocked.
        path: PathBuf,
    },
    /// The database (or backup) is protected one way and was opened the other way.
    #[error("{path} is protected by a {expected}, not a {given}")]
    WrongUnlockKind {
        /// The database (or backup) file.
        path: PathBuf,
        /// How the file is protected.
        expected: &'static str,
        /// How the caller tried to unlock it.
        given: &'static str,
    },
    /// A key file is readable or writable by group or others, so the data key it protects
    /// cannot be trusted to be secret.
    #[error(
        "key file {path} has mode {mode:o}; it must not be accessible by group or others (chmod 600)"
    )]
    KeyFilePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file exists but does not hold a muxd key.
    #[error("{path} is not a muxd key file")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// A backup file is damaged or not a muxd backup.
    #[error("{path} is not a valid muxd store backup: {reason}")]
    BadBackup {
        /// The backup file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A stored record could not be decoded or its seal did not verify: the database was
    /// modified behind the store's back or damaged on disk.
    #[error("corrupt {what} in the store: {detail}")]
    CorruptRecord {
        /// Which kind of record.
        what: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The storage engine failed during an operation.
    #[error("database operation failed")]
    Database(#[source] DatabaseError),
    /// No outbound message has this id.
    #[error("unknown outbound message {0}")]
    UnknownMessage(OutboundId),
    /// The requested change does not apply to a message in its current state (for example
    /// acknowledging a message that is not in flight).
    #[error("outbound message {id} is {state:?}; cannot {action}")]
    InvalidTransition {
        /// The message.
        id: OutboundId,
        /// Its current state.
        state: MessageState,
        /// What was attempted.
        action: &'static str,
    },
    /// An argument is out of the range the store can encode.
    #[error("invalid argument: {0}")]
    InvalidInput(&'static str),
    /// A batched commit failed; every caller in the batch gets this with the cause rendered.
    #[error("group commit failed: {0}")]
    GroupCommit(String),
}

/// An error from the embedded database engine, kept opaque so its type is not part of this
/// crate's API. Its [`std::error::Error::source`] chain carries the details.
pub struct DatabaseError(redb::Error);

impl fmt::Debug for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for DatabaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Converts any redb error into a [`StoreError`] without a public `From` impl (which would put
/// redb types into our API).
pub(crate) trait DbResultExt<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> DbResultExt<T> for Result<T, E> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Database(DatabaseError(e.into())))
    }
}

/// Attaches a path to an I/O error.
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}
