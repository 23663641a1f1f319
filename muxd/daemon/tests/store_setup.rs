//! `muxd init`, `muxd run` and `muxd restore` as real processes on real files: the store is set
//! up once, never reset, and every failure to open it names the file and exits non-zero.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use muxd::{Config, Environment, SecretPassphrase};

/// A temp directory with a private config home, so no user config file leaks in.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("state").join("muxd")
    }

    fn store(&self) -> PathBuf {
        self.data_dir().join("muxd.redb")
    }

    fn key_file(&self) -> PathBuf {
        self.data_dir().join("muxd.key")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("muxd.sock")
    }

    /// `muxd <args>` with only the environment this test chooses.
    fn muxd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_muxd"));
        cmd.args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env("MUXD_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    }

    fn init(&self) -> Output {
        self.muxd(&["init"]).output().unwrap()
    }

    /// `muxd run`, which must exit by itself (these tests only start it where it fails).
    fn run_expecting_exit(&self, extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = self.muxd(&["run", "--socket"]);
        cmd.arg(self.socket());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("muxd run kept running; expected it to refuse to start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// The configuration these processes see, for calling the library directly.
    fn config(&self, passphrase: Option<&str>) -> Config {
        let env = Environment {
            xdg_runtime_dir: Some(self.dir.path().into()),
            xdg_config_home: Some(self.dir.path().join("config").into()),
            home: Some(self.dir.path().into()),
            tmp_dir: self.dir.path().into(),
            euid: 0,
            xdg_state_home: Some(self.dir.path().join("state").into()),
            passphrase: passphrase.map(|p| SecretPassphrase::new(p.into()).unwrap()),
        };
        Config::load(&muxd::RunArgs::default(), &env).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_private_files_and_a_second_init_changes_nothing() {
    let sb = Sandbox::new();
    let first = sb.init();
    assert!(first.status.success(), "{}", stderr(&first));
    let out = stdout(&first);
    assert!(out.contains(&sb.store().display().to_string()), "{out}");
    assert!(out.contains(&sb.key_file().display().to_string()), "{out}");
    assert_eq!(mode(&sb.data_dir()), 0o700);
    assert_eq!(mode(&sb.key_file()), 0o600);
    assert_eq!(mode(&sb.store()), 0o600);

    let store_before = std::fs::read(sb.store()).unwrap();
    let key_before = std::fs::read(sb.key_file()).unwrap();
    let second = sb.init();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(err.contains(&sb.store().display().to_string()), "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(sb.store()).unwrap(), store_before);
    assert_eq!(std::fs::read(sb.key_file()).unwrap(), key_before);
    // And the store still opens with its key.
    muxd::open_store(&sb.config(None)).unwrap();
}

#[test]
fn run_without_init_says_to_run_init() {
    let sb = Sandbox::new();
    let out = sb.run_expecting_exit(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "no store at {}; run `muxd init`",
            sb.store().display()
        )),
        "{err}"
    );
    // Nothing was created in its place, and no socket is left for clients to find.
    assert!(!sb.store().exists());
    assert!(!sb.socket().exists());
}

#[test]
fn garbage_at_the_store_path_is_named_and_kept() {
    let sb = Sandbox::new();
    assert!(sb.init().status.success());
    let garbage = b"this is not a database, but it is somebody's file".repeat(100);
    std::fs::write(sb.store(), &garbage).unwrap();
    let out = sb.run_expecting_exit(&[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&sb.store().display().to_string()), "{err}");
    assert!(err.contains("not a muxd store"), "{err}");
    assert_eq!(std::fs::read(sb.store()).unwrap(), garbage, "never reset");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let sb = Sandbox::new();
    assert!(sb.init().status.success());
    std::fs::set_permissions(sb.key_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = sb.run_expecting_exit(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&sb.key_file().display().to_string()), "{err}");
    assert!(err.contains("644") && err.contains("chmod 600"), "{err}");
}

#[test]
fn a_missing_key_file_is_named() {
    let sb = Sandbox::new();
    assert!(sb.init().status.success());
    std::fs::remove_file(sb.key_file()).unwrap();
    let out = sb.run_expecting_exit(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("key file {} not found", sb.key_file().display())),
        "{err}"
    );
}

#[test]
fn passphrase_mode_uses_no_key_file_and_checks_the_passphrase() {
    let sb = Sandbox::new();
    let out = sb
        .muxd(&["init"])
        .env("MUXD_PASSPHRASE", "correct horse")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!sb.key_file().exists());
    assert!(stdout(&out).contains("MUXD_PASSPHRASE"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("horse"));

    let wrong = sb.run_expecting_exit(&[("MUXD_PASSPHRASE", "wrong horse")]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    assert!(
        stderr(&wrong).contains("wrong passphrase"),
        "{}",
        stderr(&wrong)
    );
    assert!(!stderr(&wrong).contains("horse"));

    let none = sb.run_expecting_exit(&[]);
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    let err = stderr(&none);
    assert!(err.contains("protected by a passphrase"), "{err}");

    let empty = sb.run_expecting_exit(&[("MUXD_PASSPHRASE", "")]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(stderr(&empty).contains("MUXD_PASSPHRASE is set but empty"));

    muxd::open_store(&sb.config(Some("correct horse"))).unwrap();
}

#[test]
fn restore_recreates_the_store_from_an_export_and_never_overwrites() {
    let sb = Sandbox::new();
    assert!(sb.init().status.success());
    let backup = sb.dir.path().join("backup.muxd");
    {
        let store = muxd::open_store(&sb.config(None)).unwrap();
        store.export(&backup, &sb.config(None).unlock()).unwrap();
    }
    let from = backup.display().to_string();

    // With the store still there, restore refuses and leaves it alone.
    let before = std::fs::read(sb.store()).unwrap();
    let out = sb.muxd(&["restore", "--from", &from]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&sb.store().display().to_string()));
    assert_eq!(std::fs::read(sb.store()).unwrap(), before);

    // The store lost: restore brings it back, readable with the same key file.
    std::fs::remove_file(sb.store()).unwrap();
    let out = sb.muxd(&["restore", "--from", &from]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&sb.store().display().to_string()));
    assert_eq!(mode(&sb.store()), 0o600);
    muxd::open_store(&sb.config(None)).unwrap();

    // A file that is not a backup is named.
    let junk = sb.dir.path().join("junk");
    std::fs::write(&junk, b"nope nope nope").unwrap();
    std::fs::remove_file(sb.store()).unwrap();
    let out = sb
        .muxd(&["restore", "--from", &junk.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&junk.display().to_string()),
        "{}",
        stderr(&out)
    );
    assert!(
        !sb.store().exists(),
        "a failed restore leaves no store behind"
    );
}

#[test]
fn init_honours_data_dir_flag() {
    let sb = Sandbox::new();
    let elsewhere = sb.dir.path().join("elsewhere");
    let out = sb
        .muxd(&["init", "--data-dir"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(elsewhere.join("muxd.redb").exists());
    assert!(elsewhere.join("muxd.key").exists());
    assert!(!sb.store().exists());
}
