//! Socket hygiene: a private directory, a stale-socket sweep, a live-daemon probe, a 0600
//! socket, and the peer-credential rule.

use std::io;
use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::Listener;

/// Why the IPC socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Another daemon accepts connections on the path.
    #[error("another muxd is already serving {}", path.display())]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket directory belongs to another user, so that user could swap the socket.
    #[error(
        "socket directory {} is owned by uid {owner}, not by this user (uid {euid}); refusing to use it",
        dir.display()
    )]
    ForeignDirectory {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        euid: u32,
    },
    /// Something that is not a socket sits at the socket path; it is left alone.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An OS call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError + use<> {
    let path = path.to_owned();
    move |source| SocketError::Io { what, path, source }
}

/// The process's effective uid (0 where the notion does not exist).
pub(crate) fn effective_uid() -> u32 {
    #[cfg(unix)]
    {
        nix::unistd::geteuid().as_raw()
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// Whether a peer may use the daemon: only our own effective uid. A peer whose credentials
/// cannot be read is refused, since we cannot tell who it is.
pub(crate) fn peer_allowed(own_euid: u32, peer_euid: Option<u32>) -> bool {
    peer_euid == Some(own_euid)
}

/// Makes the socket's directory ready.
///
/// A missing directory is created with mode 0700. For the default path the directory is the
/// daemon's own (`…/muxd` or `<tmp>/muxd-<uid>`): if it already exists it must belong to us, and
/// its mode is tightened to 0700, because in a shared `/tmp` another user could have created it
/// first to intercept clients. An explicit `--socket` directory that exists is the user's choice
/// and is left as it is.
#[cfg(unix)]
pub(crate) fn prepare_dir(socket: &Path, managed: bool, euid: u32) -> Result<(), SocketError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};

    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("cannot create socket directory", dir))?;
            // `recursive` applies the mode subject to umask; make sure of the leaf.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("cannot set mode of socket directory", dir))?;
            Ok(())
        }
        Err(e) => Err(io_err("cannot inspect socket directory", dir)(e)),
        Ok(meta) if managed => {
            if !meta.is_dir() {
                return Err(io_err("socket directory is not a directory:", dir)(
                    io::Error::from(io::ErrorKind::InvalidInput),
                ));
            }
            if meta.uid() != euid {
                return Err(SocketError::ForeignDirectory {
                    dir: dir.to_owned(),
                    owner: meta.uid(),
                    euid,
                });
            }
            if meta.mode() & 0o777 != 0o700 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err("cannot set mode of socket directory", dir))?;
            }
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

/// Clears the way for binding: fails if a live daemon answers at `path`, removes a stale
/// socket file nobody accepts on.
#[cfg(unix)]
pub(crate) fn sweep_stale(path: &Path) -> Result<(), SocketError> {
    use std::os::unix::fs::FileTypeExt;

    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot inspect socket path", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::AlreadyRunning {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("cannot remove stale socket", path)(e)),
            }
        }
        Err(e) => Err(io_err("cannot probe existing socket", path)(e)),
    }
}

/// Binds the listener with mode 0600. Must run inside a tokio runtime.
#[cfg(unix)]
pub(crate) fn bind(path: &Path) -> Result<Listener, SocketError> {
    use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
    use interprocess::os::unix::local_socket::ListenerOptionsExt;

    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(io_err("invalid socket path", path))?;
    // Mode is applied with fchmod before bind, so there is no window with a wider mode.
    ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .create_tokio()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                // Another daemon bound between our probe and our bind.
                SocketError::AlreadyRunning {
                    path: path.to_owned(),
                }
            } else {
                io_err("cannot bind", path)(e)
            }
        })
}

/// Windows: named pipes have no directory or stale file to manage.
#[cfg(not(unix))]
pub(crate) fn prepare_dir(_socket: &Path, _managed: bool, _euid: u32) -> Result<(), SocketError> {
    Ok(())
}

/// Windows: nothing to sweep.
#[cfg(not(unix))]
pub(crate) fn sweep_stale(_path: &Path) -> Result<(), SocketError> {
    Ok(())
}

/// Windows: the path names a pipe in the `\\.\pipe\` namespace.
#[cfg(not(unix))]
pub(crate) fn bind(path: &Path) -> Result<Listener, SocketError> {
    use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};

    let name = path
        .as_os_str()
        .to_ns_name::<GenericNamespaced>()
        .map_err(io_err("invalid pipe name", path))?;
    ListenerOptions::new()
        .name(name)
        .create_tokio()
        .map_err(io_err("cannot bind", path))
}

/// Tells systemd the daemon is ready (`sd_notify` `READY=1`), by hand: one datagram.
#[cfg(unix)]
pub(crate) fn notify_ready(notify_socket: &Path) -> io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = notify_socket.as_os_str().as_encoded_bytes();
    // A leading '@' names a Linux abstract-namespace socket.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "android")]
        use std::os::android::net::SocketAddrExt;
        #[cfg(target_os = "linux")]
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(b"READY=1", &addr)?;
        return Ok(());
    }
    let _ = bytes;
    sock.send_to(b"READY=1", notify_socket)?;
    Ok(())
}

/// No systemd on Windows.
#[cfg(not(unix))]
pub(crate) fn notify_ready(_notify_socket: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_euid_is_allowed() {
        assert!(peer_allowed(1000, Some(1000)));
        assert!(peer_allowed(0, Some(0)));
        assert!(!peer_allowed(1000, Some(1001)));
        // root may not use another user's daemon either: the rule is equality, not privilege.
        assert!(!peer_allowed(1000, Some(0)));
        assert!(!peer_allowed(1000, None));
    }

    #[cfg(unix)]
    #[test]
    fn managed_dir_is_created_private_and_foreign_dir_refused() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};

        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("muxd-1").join("muxd.sock");
        let euid = effective_uid();
        prepare_dir(&sock, true, euid).unwrap();
        let dir = sock.parent().unwrap();
        assert_eq!(std::fs::metadata(dir).unwrap().mode() & 0o777, 0o700);

        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&sock, true, euid).unwrap();
        assert_eq!(std::fs::metadata(dir).unwrap().mode() & 0o777, 0o700);

        let err = prepare_dir(&sock, true, euid + 1).unwrap_err();
        assert!(matches!(err, SocketError::ForeignDirectory { .. }), "{err}");
        assert!(err.to_string().contains(&dir.display().to_string()));
    }

    #[cfg(unix)]
    #[test]
    fn stale_socket_is_removed_but_a_regular_file_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        sweep_stale(&path).unwrap();
        assert!(!path.exists());

        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            sweep_stale(&path),
            Err(SocketError::NotASocket { .. })
        ));
        assert!(path.exists());
    }

    #[cfg(unix)]
    #[test]
    fn live_socket_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = sweep_stale(&path).unwrap_err();
        assert!(matches!(err, SocketError::AlreadyRunning { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
