//! Sealing secrets at rest.
//!
//! Every secret field is encrypted with a random 256-bit *data key* using XChaCha20-Poly1305
//! (random 192-bit nonces, so no nonce bookkeeping is needed). The associated data binds each
//! ciphertext to the table and key it is stored under, so a sealed value copied to another row
//! fails to open instead of being accepted as that row's secret.
//!
//! The data key itself is stored in the database wrapped by a *key-encryption key* (KEK), which
//! comes either from a key file readable only by its owner, or from a passphrase through
//! Argon2id. Wrapping (rather than using the KEK directly) means a wrong passphrase is detected
//! by one AEAD check at open, and lets a restore re-protect the same data under a new KEK.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use crate::codec::{Reader, Writer};
use crate::error::{StoreError, io_err};

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const SALT_LEN: usize = 16;
const KEY_FILE_MAGIC: &[u8; 8] = b"MUXDKEY1";
const WRAP_AAD: &[u8] = b"muxd-queue-store/data-key/v1";

const KIND_KEY_FILE: u8 = 1;
const KIND_PASSPHRASE: u8 = 2;

/// Argon2id cost: 19 MiB, 2 passes, 1 lane (the OWASP baseline for Argon2id). The parameters
/// are stored next to the wrapped key, so they can be raised later without breaking old files.
const ARGON_M_KIB: u32 = 19 * 1024;
const ARGON_T: u32 = 2;
const ARGON_P: u32 = 1;

/// A passphrase that protects the data key. Zeroized on drop; never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps a passphrase; the caller's `String` is moved in and zeroized with it.
    pub fn new(passphrase: String) -> Self {
        Self(Zeroizing::new(passphrase))
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// How the data key of a store (or a backup) is protected and unlocked.
#[derive(Debug)]
#[non_exhaustive]
pub enum Unlock {
    /// A key file created by [`create_key_file`], which must have mode 0600 (no group/other
    /// access). The default set up by `muxd init`.
    KeyFile(PathBuf),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Passphrase),
}

impl Unlock {
    fn kind_name(&self) -> &'static str {
        match self {
            Self::KeyFile(_) => "key file",
            Self::Passphrase(_) => "passphrase",
        }
    }
}

/// Creates a new key file holding a fresh random key-encryption key, with mode 0600.
///
/// Refuses to overwrite an existing file: replacing a key file would make every store it
/// protects unreadable.
pub fn create_key_file(path: &Path) -> Result<(), StoreError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(key.as_mut());
    let mut file = fs::OpenOptions::new()
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
    let mut contents = Zeroizing::new(Vec::with_capacity(KEY_FILE_MAGIC.len() + KEY_LEN));
    contents.extend_from_slice(KEY_FILE_MAGIC);
    contents.extend_from_slice(key.as_ref());
    file.write_all(&contents).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Reads a key file, refusing one that group or others can access.
fn read_key_file(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, StoreError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let contents = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
    let bad = || StoreError::BadKeyFile {
        path: path.to_path_buf(),
    };
    let key = contents
        .strip_prefix(KEY_FILE_MAGIC.as_slice())
        .ok_or_else(bad)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if key.len() != KEY_LEN {
        return Err(bad());
    }
    out.copy_from_slice(key);
    Ok(out)
}

/// The random key that seals every secret in one store. Zeroized on drop; never printed.
pub(crate) struct DataKey {
    cipher: XChaCha20Poly1305,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl DataKey {
    pub(crate) fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(bytes.as_mut());
        Self::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let cipher = XChaCha20Poly1305::new(bytes.as_ref().into());
        Self { cipher, bytes }
    }

    /// Encrypts `plaintext`; the output is `nonce ‖ ciphertext ‖ tag`.
    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| StoreError::InvalidInput("plaintext too large to seal"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts what [`Self::seal`] produced with the same `aad`. Failure means the value was
    /// damaged, moved to another row, or sealed under a different key.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
            .map(Zeroizing::new)
    }

    /// Like [`Self::open`], but a failure is reported as a corrupt record of kind `what`.
    pub(crate) fn open_record(
        &self,
        aad: &[u8],
        sealed: &[u8],
        what: &'static str,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.open(aad, sealed).ok_or(StoreError::CorruptRecord {
            what,
            detail: "sealed value failed authentication".to_owned(),
        })
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return None;
        }
        out.copy_from_slice(bytes);
        Some(Self::from_bytes(out))
    }

    /// Wraps this key under a KEK derived from `unlock`, returning the bytes to store.
    pub(crate) fn wrap(&self, unlock: &Unlock) -> Result<Vec<u8>, StoreError> {
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        let header = WrapHeader {
            kind: match unlock {
                Unlock::KeyFile(_) => KIND_KEY_FILE,
                Unlock::Passphrase(_) => KIND_PASSPHRASE,
            },
            salt,
            m_kib: ARGON_M_KIB,
            t: ARGON_T,
            p: ARGON_P,
        };
        let kek = header.derive_kek(unlock)?;
        let header_bytes = header.encode();
        let aad = [WRAP_AAD, &header_bytes].concat();
        let sealed = kek.seal(&aad, self.bytes.as_ref())?;
        Ok(Writer::new().raw(&header_bytes).raw(&sealed).finish())
    }

    /// Recovers a data key from [`Self::wrap`]'s output. `path` names the file in errors.
    pub(crate) fn unwrap(wrapped: &[u8], unlock: &Unlock, path: &Path) -> Result<Self, StoreError> {
        let mut r = Reader::new(wrapped, "key wrap");
        let header = WrapHeader::decode(&mut r)?;
        let expected = match header.kind {
            KIND_KEY_FILE => "key file",
            KIND_PASSPHRASE => "passphrase",
            _ => return Err(r.corrupt("unknown protection kind")),
        };
        if expected != unlock.kind_name() {
            return Err(StoreError::WrongUnlockKind {
                path: path.to_path_buf(),
                expected,
                given: unlock.kind_name(),
            });
        }
        let kek = header.derive_kek(unlock)?;
        let aad = [WRAP_AAD, &header.encode()].concat();
        let plain = kek
            .open(&aad, r.rest())
            .ok_or_else(|| StoreError::WrongKey {
                path: path.to_path_buf(),
            })?;
        Self::from_slice(&plain).ok_or(StoreError::CorruptRecord {
            what: "key wrap",
            detail: "bad data key length".to_owned(),
        })
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The unencrypted part of a wrapped data key: how to derive the KEK.
struct WrapHeader {
    kind: u8,
    salt: [u8; SALT_LEN],
    m_kib: u32,
    t: u32,
    p: u32,
}

impl WrapHeader {
    fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u8(self.kind)
            .raw(&self.salt)
            .u32(self.m_kib)
            .u32(self.t)
            .u32(self.p)
            .finish()
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, StoreError> {
        Ok(Self {
            kind: r.u8()?,
            salt: r.fixed()?,
            m_kib: r.u32()?,
            t: r.u32()?,
            p: r.u32()?,
        })
    }

    fn derive_kek(&self, unlock: &Unlock) -> Result<DataKey, StoreError> {
        match unlock {
            Unlock::KeyFile(path) => Ok(DataKey::from_bytes(read_key_file(path)?)),
            Unlock::Passphrase(pass) => {
                // Parameters come from disk; absurd ones are reported as corruption rather
                // than attempted (a huge m_kib would exhaust memory).
                let params = Params::new(self.m_kib, self.t, self.p, Some(KEY_LEN))
                    .ok()
                    .filter(|_| self.m_kib <= 4 * 1024 * 1024 && self.t <= 64)
                    .ok_or(StoreError::CorruptRecord {
                        what: "key wrap",
                        detail: "invalid Argon2id parameters".to_owned(),
                    })?;
                let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
                let mut out = Zeroizing::new([0u8; KEY_LEN]);
                argon
                    .hash_password_into(pass.0.as_bytes(), &self.salt, out.as_mut())
                    .map_err(|_| StoreError::InvalidInput("passphrase rejected by Argon2id"))?;
                Ok(DataKey::from_bytes(out))
            }
        }
    }
}

/// Secret bytes (private keys, E2E ratchet state) held in memory. Zeroized on drop and
/// redacted in `Debug`, so they cannot leak through logs.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret itself. Named so that every use is easy to find in review.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_associated_data() {
        let key = DataKey::generate();
        let sealed = key.seal(b"row-1", b"secret").unwrap();
        assert_eq!(key.open(b"row-1", &sealed).unwrap().as_slice(), b"secret");
        assert!(key.open(b"row-2", &sealed).is_none());
        assert!(DataKey::generate().open(b"row-1", &sealed).is_none());
    }

    #[test]
    fn debug_output_is_redacted() {
        let key = DataKey::generate();
        let s = format!("{key:?} {:?}", Passphrase::new("hunter2".into()));
        assert!(!s.contains("hunter2"));
        let secret = SecretBytes::new(vec![0xAB; 4]);
        assert_eq!(format!("{secret:?}"), "SecretBytes(<4 bytes redacted>)");
    }

    #[test]
    fn passphrase_wrap_round_trips_and_rejects_wrong_passphrase() {
        let key = DataKey::generate();
        let wrapped = key
            .wrap(&Unlock::Passphrase(Passphrase::new("right".into())))
            .unwrap();
        let path = Path::new("/x/store.redb");
        let back = DataKey::unwrap(
            &wrapped,
            &Unlock::Passphrase(Passphrase::new("right".into())),
            path,
        )
        .unwrap();
        assert_eq!(back.bytes(), key.bytes());
        let err = DataKey::unwrap(
            &wrapped,
            &Unlock::Passphrase(Passphrase::new("wrong".into())),
            path,
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("/x/store.redb"));
    }
}
