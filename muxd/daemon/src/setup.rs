//! Setting up, opening and restoring the durable store: `muxd init`, the first thing
//! `muxd run` does, and `muxd restore`.
//!
//! The rule throughout: nothing here ever replaces an existing store or key file. A missing
//! store at start is an error that says to run `muxd init`, never an empty store created in
//! its place, because that would silently drop every queued message and queue key.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use muxd_queue_store::{Store, StoreError, create_key_file};

use crate::config::Config;

/// Why the store could not be set up, opened or restored. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// `muxd run` found no store: `muxd init` has not been run for this data directory.
    #[error("no store at {}; run `muxd init` (or point --store / --data-dir at the existing one)", path.display())]
    NoStore {
        /// Where the store was expected.
        path: PathBuf,
    },
    /// `muxd init` or `muxd restore` found a store already there; it is left untouched.
    #[error(
        "a store already exists at {}; refusing to {action} over it (muxd never resets a store; move it away first if you really mean to)",
        path.display()
    )]
    StoreExists {
        /// The existing store.
        path: PathBuf,
        /// `"initialise"` or `"restore"`.
        action: &'static str,
    },
    /// The store is protected by a key file that is not there.
    #[error(
        "key file {} not found; the store {} cannot be unlocked without it (restore the key file, or set MUXD_PASSPHRASE if the store is protected by a passphrase)",
        key_file.display(),
        store.display()
    )]
    NoKeyFile {
        /// The missing key file.
        key_file: PathBuf,
        /// The store it protects.
        store: PathBuf,
    },
    /// The data directory could not be created or is not usable.
    #[error("data directory {}: {reason}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store refused: corrupt, foreign or newer file, wrong key, key file with loose
    /// permissions, already open, I/O. Its message names the file.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SetupError {
    /// The process exit code: 2 when the setup or configuration must be fixed by the operator
    /// (no store yet, a store in the way, a missing or unusable key file, a wrong passphrase,
    /// a file that is not a muxd store), 1 for everything else (a damaged file, I/O, another
    /// process holding the store).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoStore { .. }
            | Self::StoreExists { .. }
            | Self::NoKeyFile { .. }
            | Self::DataDir { .. } => 2,
            Self::Store(e) => match e {
                StoreError::NotFound { .. }
                | StoreError::AlreadyExists { .. }
                | StoreError::Foreign { .. }
                | StoreError::WrongKey { .. }
                | StoreError::WrongUnlockKind { .. }
                | StoreError::KeyFilePermissions { .. }
                | StoreError::BadKeyFile { .. } => 2,
                _ => 1,
            },
        }
    }
}

/// What [`init`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InitReport {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Whether `init` created the data directory (mode 0700) rather than finding it.
    pub created_data_dir: bool,
    /// The new store.
    pub store: PathBuf,
    /// The key file protecting the store; `None` in passphrase mode.
    pub key_file: Option<PathBuf>,
    /// Whether `init` created the key file rather than reusing one already there.
    pub created_key_file: bool,
}

/// What [`restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// The backup read.
    pub backup: PathBuf,
    /// The store written.
    pub store: PathBuf,
}

/// `muxd init`: creates the data directory (0700), the key file (0600, unless in passphrase
/// mode; an existing one is reused) and a new, empty store protected by it.
///
/// Refuses when a store already exists at `config.store`, before touching anything.
pub fn init(config: &Config) -> Result<InitReport, SetupError> {
    refuse_existing(&config.store, "initialise")?;
    let created_data_dir = ensure_data_dir(&config.data_dir)?;
    let mut created_key_file = false;
    let key_file = if config.uses_passphrase() {
        None
    } else {
        // Reused when present: it may protect a store elsewhere, and an earlier init that
        // failed after making it should not block the next attempt.
        if !exists(&config.key_file)? {
            create_key_file(&config.key_file)?;
            created_key_file = true;
        }
        Some(config.key_file.clone())
    };
    match Store::create(&config.store, &config.unlock()) {
        Ok(store) => drop(store),
        Err(e) => {
            // A key file made for this store only would be left unused; if the store appeared
            // meanwhile (AlreadyExists) the key may be protecting it, so it stays.
            if created_key_file && !matches!(e, StoreError::AlreadyExists { .. }) {
                let _ = fs::remove_file(&config.key_file);
            }
            return Err(match e {
                StoreError::AlreadyExists { path } if path == config.store => {
                    SetupError::StoreExists {
                        path,
                        action: "initialise",
                    }
                }
                other => other.into(),
            });
        }
    }
    Ok(InitReport {
        data_dir: config.data_dir.clone(),
        created_data_dir,
        store: config.store.clone(),
        key_file,
        created_key_file,
    })
}

/// Opens the store `muxd run` serves from. A missing store is [`SetupError::NoStore`]; a
/// corrupt, foreign or newer file, a wrong key or a key file readable by others is the
/// store's error naming the file. Nothing is created or reset.
pub fn open_store(config: &Config) -> Result<Store, SetupError> {
    if !exists(&config.store)? {
        return Err(SetupError::NoStore {
            path: config.store.clone(),
        });
    }
    Store::open(&config.store, &config.unlock()).map_err(|e| store_error(config, e))
}

/// `muxd restore --from BACKUP`: writes the backup's contents into a new store at
/// `config.store`, protected like the store is configured to be (key file or passphrase).
///
/// The backup must be protected the same way: `muxctl export` seals it with the daemon's own
/// key file or passphrase. Offline only: the store must not exist (a running daemon holds it),
/// so a restore never overwrites anything.
pub fn restore(config: &Config, backup: &Path) -> Result<RestoreReport, SetupError> {
    refuse_existing(&config.store, "restore")?;
    ensure_data_dir(&config.data_dir)?;
    let unlock = config.unlock();
    let store = Store::restore(backup, &unlock, &config.store, &unlock)
        .map_err(|e| store_error(config, e))?;
    drop(store);
    Ok(RestoreReport {
        backup: backup.to_path_buf(),
        store: config.store.clone(),
    })
}

/// Turns the store's errors into the clearer setup ones where there is one.
fn store_error(config: &Config, e: StoreError) -> SetupError {
    match e {
        StoreError::NotFound { path } if path == config.store => SetupError::NoStore { path },
        StoreError::Io { path, source }
            if path == config.key_file
                && !config.uses_passphrase()
                && source.kind() == io::ErrorKind::NotFound =>
        {
            SetupError::NoKeyFile {
                key_file: path,
                store: config.store.clone(),
            }
        }
        StoreError::AlreadyExists { path } if path == config.store => SetupError::StoreExists {
            path,
            action: "restore",
        },
        other => other.into(),
    }
}

fn refuse_existing(store: &Path, action: &'static str) -> Result<(), SetupError> {
    if exists(store)? {
        return Err(SetupError::StoreExists {
            path: store.to_path_buf(),
            action,
        });
    }
    Ok(())
}

/// Whether anything (a file, a directory, a dangling symlink) is at `path`.
fn exists(path: &Path) -> Result<bool, SetupError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

/// Creates the data directory with mode 0700 (parents too), or checks the existing one is a
/// directory of this user. Returns whether it was created.
fn ensure_data_dir(dir: &Path) -> Result<bool, SetupError> {
    let err = |reason: String| SetupError::DataDir {
        path: dir.to_path_buf(),
        reason,
    };
    if dir.as_os_str().is_empty() {
        return Err(err("not configured".to_owned()));
    }
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(err("exists and is not a directory".to_owned())),
        Ok(meta) => {
            let euid = crate::ipc::socket::effective_uid();
            if meta.uid() != euid {
                return Err(err(format!(
                    "owned by uid {}, not by this user ({euid})",
                    meta.uid()
                )));
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| err(format!("cannot create it: {e}")))?;
            Ok(true)
        }
        Err(e) => Err(err(e.to_string())),
    }
}
