//! Where the daemon's socket lives by default. Pure: the caller passes the environment in.

use std::ffi::OsStr;
use std::path::PathBuf;

/// The socket's file name inside its directory.
pub const SOCKET_FILE_NAME: &str = "muxd.sock";

/// The default socket path: `$XDG_RUNTIME_DIR/muxd/muxd.sock`, or, when that variable is unset
/// or empty, the private fallback `<tmp>/muxd-<uid>/muxd.sock` (the daemon creates the
/// directory with mode 0700 and refuses one owned by another user).
///
/// `xdg_runtime_dir` is the value of `XDG_RUNTIME_DIR`, `tmp_dir` the system temporary
/// directory, `uid` the effective user id.
pub fn default_socket_path(xdg_runtime_dir: Option<&OsStr>, tmp_dir: PathBuf, uid: u32) -> PathBuf {
    match xdg_runtime_dir {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("muxd").join(SOCKET_FILE_NAME),
        _ => tmp_dir.join(format!("muxd-{uid}")).join(SOCKET_FILE_NAME),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdg_runtime_dir_wins() {
        let p = default_socket_path(Some(OsStr::new("/run/user/1000")), "/tmp".into(), 1000);
        assert_eq!(p, PathBuf::from("/run/user/1000/muxd/muxd.sock"));
    }

    #[test]
    fn fallback_is_per_uid() {
        assert_eq!(
            default_socket_path(None, "/tmp".into(), 1000),
            PathBuf::from("/tmp/muxd-1000/muxd.sock")
        );
        assert_eq!(
            default_socket_path(Some(OsStr::new("")), "/tmp".into(), 7),
            PathBuf::from("/tmp/muxd-7/muxd.sock")
        );
    }
}
