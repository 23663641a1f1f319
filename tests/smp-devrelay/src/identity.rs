//! Where the relay's identity comes from: given, kept in a cert dir, or generated.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use muxd_transport::server::ServerIdentity;

use crate::{RelayConfig, RelayError};

/// File name of the PEM (chain, then the leaf's PKCS#8 key) inside the cert dir.
const IDENTITY_FILE: &str = "identity.pem";

/// The configured identity, the one stored in the cert dir (created on first use), or a
/// fresh one.
pub(crate) fn resolve(config: &RelayConfig) -> Result<ServerIdentity, RelayError> {
    if let Some(id) = &config.identity {
        return Ok(id.clone());
    }
    match &config.cert_dir {
        Some(dir) => load_or_create(dir, config),
        None => Ok(ServerIdentity::generate(config.sign_algorithm)?),
    }
}

fn load_or_create(dir: &Path, config: &RelayConfig) -> Result<ServerIdentity, RelayError> {
    let path = dir.join(IDENTITY_FILE);
    let file_err = |source| RelayError::File {
        path: path.clone(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(pem) => {
            let id = ServerIdentity::from_pem(&pem)?;
            if id.algorithm() != config.sign_algorithm {
                tracing::warn!(
                    stored = %id.algorithm(),
                    requested = %config.sign_algorithm,
                    "cert dir identity kept; its algorithm differs from --sign-algorithm"
                );
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|source| RelayError::File {
                path: dir.to_owned(),
                source,
            })?;
            let id = ServerIdentity::generate(config.sign_algorithm)?;
            let pem = id.to_pem()?;
            // The file holds the online private key: owner-only, never overwritten.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(file_err)?;
            f.write_all(pem.as_bytes()).map_err(file_err)?;
            Ok(id)
        }
        Err(e) => Err(file_err(e)),
    }
}
