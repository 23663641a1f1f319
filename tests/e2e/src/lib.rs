//! End-to-end test support: the real `muxd`, `muxctl` and `smp-devrelay` binaries, a [`Daemon`]
//! guard that runs one in a private temp directory, a [`Relay`] guard for the dev SMP relay, and
//! [`RawClient`], a small synchronous frame-level client.
//!
//! Everything here panics on failure: it is only used from tests.

#![allow(clippy::unwrap_used, clippy::print_stderr, clippy::missing_panics_doc)]

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use muxd_ipc_proto::{
    ClientHello, ClientMessage, ErrorCode, FrameDecoder, Op, PROTO_VERSION, Reply, Request,
    Response, ServerHello, ServerMessage, encode_frame,
};
use tempfile::TempDir;

/// How long helpers wait for the daemon to do something before failing the test.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The `muxd` binary, built (once per test process) if needed.
pub fn muxd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("muxd", "muxd"))
}

/// The `muxctl` binary, built (once per test process) if needed.
pub fn muxctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("muxctl", "muxctl"))
}

/// The `smp-devrelay` binary, built (once per test process) if needed.
pub fn devrelay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("smp-devrelay", "smp-devrelay"))
}

/// The `grp-relay` binary, built (once per test process) if needed.
pub fn grp_relay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("grp-relay", "grp-relay"))
}

/// The `faultproxy` binary, built (once per test process) if needed.
pub fn faultproxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("muxd-faultproxy", "faultproxy"))
}

/// `target/<profile>/`: the test executable lives in its `deps/` subdirectory.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent()
    } else {
        Some(deps)
    };
    dir.unwrap().to_owned()
}

/// Runs `cargo build` for one binary so tests never use a stale one, then returns its path.
///
/// Cargo releases its build lock before it runs test binaries, so this nested build does not
/// deadlock under `cargo test`; when the sources are unchanged it is a quick no-op. Without
/// `CARGO` (the test binary run by hand) the existing binary is used as is.
fn build_bin(package: &str, bin: &str) -> PathBuf {
    let profile_dir = profile_dir();
    let path = profile_dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        let target_dir = profile_dir.parent().unwrap();
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace_root());
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building {bin} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

/// The workspace root (this crate is `tests/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Options for starting a [`Daemon`].
#[derive(Debug, Default)]
pub struct DaemonBuilder {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    config: Option<String>,
    socket: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    no_init: bool,
}

impl DaemonBuilder {
    /// Adds command-line arguments after `muxd run --socket <path> --data-dir <dir>`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the daemon (and for `muxd init`, if it is
    /// `MUXD_PASSPHRASE`).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes this text as the daemon's default config file (`$XDG_CONFIG_HOME/muxd/muxd.toml`).
    pub fn config(mut self, toml: impl Into<String>) -> Self {
        self.config = Some(toml.into());
        self
    }

    /// Uses this socket path instead of `<tmp>/muxd.sock`.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Runs on this existing data directory (e.g. one `muxd restore` made) instead of a fresh
    /// one, without `muxd init`.
    pub fn data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(path.into());
        self.no_init = true;
        self
    }

    /// Skips `muxd init`: the data directory (`<tmp>/data`) does not exist at the first start.
    pub fn no_init(mut self) -> Self {
        self.no_init = true;
        self
    }

    /// Spawns the daemon and waits until it logs that it is listening.
    pub fn start(self) -> Daemon {
        let mut daemon = self.spawn();
        daemon.wait_ready();
        daemon
    }

    /// Spawns the daemon without waiting for it (for tests of startup failures).
    pub fn spawn(self) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("muxd-e2e-")
            .tempdir()
            .unwrap();
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("muxd.sock"));
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let config_home = dir.path().join("config");
        std::fs::create_dir_all(config_home.join("muxd")).unwrap();
        let mut daemon = Daemon {
            child: None,
            exited: None,
            socket,
            data_dir,
            runs: 0,
            args: self.args,
            env: self.env,
            dir,
        };
        if !self.no_init {
            // Before the config file exists: these tests of `muxd run` do not configure init.
            let out = daemon
                .command("init")
                .arg("--data-dir")
                .arg(&daemon.data_dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "muxd init --data-dir {} failed ({}):\n{}{}",
                daemon.data_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(text) = &self.config {
            std::fs::write(config_home.join("muxd").join("muxd.toml"), text).unwrap();
        }
        daemon.spawn_run();
        daemon
    }
}

/// A running `muxd run` in its own temp directory, with its own data directory (store and
/// key file) that survives [`Daemon::restart`]; killed when dropped.
///
/// Each run logs (at debug level) to its own file, `muxd-<run>.log`: [`Daemon::log`] is the
/// current run's, [`Daemon::logs`] all of them.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// How the last run ended, once it has been reaped.
    exited: Option<ExitStatus>,
    socket: PathBuf,
    data_dir: PathBuf,
    runs: u32,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: TempDir,
}

impl Daemon {
    /// Options for a daemon.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// A daemon with default options, ready to accept clients.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A `muxd <subcommand>` with this daemon's private environment (home, config, runtime
    /// and state directories in its temp dir; debug logs). Only `MUXD_PASSPHRASE` of the
    /// builder's environment is passed, so a subcommand other than `run` does not trip over
    /// settings meant for `run`.
    pub fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(muxd_bin());
        cmd.arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("runtime"))
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("MUXD_LOG", "debug")
            .envs(
                self.env
                    .iter()
                    .filter(|(k, _)| k == "MUXD_PASSPHRASE")
                    .map(|(k, v)| (k, v)),
            )
            .stdin(Stdio::null());
        cmd
    }

    fn log_path_of(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("muxd-{run}.log"))
    }

    /// Starts `muxd run` again on the same socket and data directory (the previous run must
    /// have ended).
    fn spawn_run(&mut self) {
        assert!(self.child.is_none(), "muxd is still running");
        self.runs += 1;
        self.exited = None;
        let log = File::create(self.log_path_of(self.runs)).unwrap();
        let mut cmd = self.command("run");
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's private temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's data directory (`muxd run --data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The store's database file in the data directory.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("muxd.redb")
    }

    /// The key file in the data directory.
    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join("muxd.key")
    }

    /// How many times `muxd run` was started.
    pub fn runs(&self) -> u32 {
        self.runs
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("muxd is not running").id()
    }

    /// Everything the current run wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path_of(self.runs)).unwrap_or_default()
    }

    /// The logs of every run so far, oldest first.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|run| std::fs::read_to_string(self.log_path_of(run)).unwrap_or_default())
            .collect()
    }

    /// Waits until the log contains `needle`; panics (with the log) after [`PATIENCE`].
    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "muxd exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "muxd never logged {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the current run listens.
    pub fn wait_ready(&mut self) {
        self.wait_for_log("listening on");
    }

    /// The exit status, if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().unwrap()
        {
            self.child = None;
            self.exited = Some(status);
        }
        self.exited
    }

    /// Waits for the daemon to exit; panics after [`PATIENCE`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "muxd did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    /// Stops the daemon gracefully (SIGTERM) and waits for it; panics unless it exits
    /// successfully.
    pub fn stop(&mut self) {
        self.terminate();
        let status = self.wait_exit();
        assert!(
            status.success(),
            "muxd exited with {status}:\n{}",
            self.log()
        );
    }

    /// Kills the daemon at once (SIGKILL) and reaps it: no goodbye, no flush, whatever it was
    /// doing. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.exited = Some(child.wait().unwrap());
        }
    }

    /// Kills the daemon if it runs (SIGKILL) and starts it again on the same socket and data
    /// directory, without waiting for it.
    pub fn respawn(&mut self) {
        self.kill();
        self.spawn_run();
    }

    /// Kills the daemon if it runs (SIGKILL) and starts it again on the same socket and data
    /// directory; returns once it listens.
    pub fn restart(&mut self) {
        self.respawn();
        self.wait_ready();
    }

    /// Resident set size from `/proc/<pid>/status`, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A raw connection, before any hello.
    pub fn connect(&self) -> RawClient {
        RawClient::connect(&self.socket)
    }

    /// A connection that has exchanged hellos.
    pub fn client(&self, app: &str) -> RawClient {
        let mut c = self.connect();
        c.hello(app);
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The daemon's side of a failed test; MUXD_E2E_KEEP=1 keeps the whole directory.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!("--- last lines of muxd run {} ---\n{tail}", self.runs);
            if std::env::var_os("MUXD_E2E_KEEP").is_some() {
                let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
                eprintln!("kept {}", dir.keep().display());
            }
        }
    }
}

/// Options for starting a [`Relay`].
#[derive(Debug, Default)]
pub struct RelayBuilder {
    args: Vec<OsString>,
    websocket: bool,
}

impl RelayBuilder {
    /// Adds command-line arguments (e.g. `--sign-algorithm ed448`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Also listens for WebSocket-over-TLS on a free port.
    pub fn websocket(mut self) -> Self {
        self.websocket = true;
        self
    }

    /// Spawns the relay and waits for it to print its address(es).
    pub fn start(self) -> Relay {
        let dir = tempfile::Builder::new()
            .prefix("muxd-e2e-relay-")
            .tempdir()
            .unwrap();
        let mut relay = Relay {
            child: None,
            stdout: None,
            address: String::new(),
            ws_address: None,
            runs: 0,
            args: self.args,
            websocket: self.websocket,
            dir,
        };
        relay.spawn(SocketAddrArg::Any, SocketAddrArg::Any);
        relay
    }
}

/// Which port a (re)started relay listens on.
#[derive(Debug, Clone, Copy)]
enum SocketAddrArg {
    Any,
    Port(u16),
}

impl SocketAddrArg {
    fn arg(self) -> String {
        match self {
            Self::Any => "127.0.0.1:0".to_owned(),
            Self::Port(p) => format!("127.0.0.1:{p}"),
        }
    }
}

/// A running `smp-devrelay` in its own temp directory (identity in `cert/`, queues and messages
/// in `store.log`, so a restart keeps its address and queues); killed when dropped.
///
/// Its debug log tells what the relay saw: one `SMP session up` line per client connection
/// that completed the SMP handshake, one `TLS setup failed` / `SMP handshake refused` line per
/// connection it refused.
#[derive(Debug)]
pub struct Relay {
    child: Option<Child>,
    /// Kept open so the relay never writes into a closed pipe.
    stdout: Option<BufReader<ChildStdout>>,
    address: String,
    ws_address: Option<String>,
    runs: u32,
    args: Vec<OsString>,
    websocket: bool,
    dir: TempDir,
}

impl Relay {
    /// Options for a relay.
    pub fn builder() -> RelayBuilder {
        RelayBuilder::default()
    }

    /// A relay with default options (TLS only, Ed25519).
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// `smp://<keyHash>@127.0.0.1:<port>` of the TLS listener.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The WebSocket listener's address, if enabled.
    pub fn ws_address(&self) -> Option<&str> {
        self.ws_address.as_deref()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("relay-{}.log", self.runs))
    }

    /// What the current run of the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Client connections of the current run that completed the SMP handshake.
    pub fn sessions(&self) -> usize {
        self.log().matches("SMP session up").count()
    }

    /// Client connections of the current run refused in the TLS or SMP handshake.
    pub fn refused(&self) -> usize {
        let log = self.log();
        [
            "TLS setup failed",
            "TLS setup timed out",
            "SMP handshake refused",
        ]
        .iter()
        .map(|needle| log.matches(needle).count())
        .sum()
    }

    /// Kills the relay at once (SIGKILL): connections break without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdout = None;
    }

    /// Stops the relay with SIGTERM (its graceful path) and waits for it to exit, killing it
    /// after [`PATIENCE`].
    pub fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            terminate_child(child, PATIENCE);
        }
        self.stdout = None;
    }

    /// Starts the relay again on the same ports, with the same identity and store.
    pub fn restart(&mut self) {
        self.kill();
        let port = |a: &str| -> u16 { a.rsplit(':').next().unwrap().parse().unwrap() };
        let tls = SocketAddrArg::Port(port(&self.address));
        let ws = self
            .ws_address
            .as_deref()
            .map_or(SocketAddrArg::Any, |a| SocketAddrArg::Port(port(a)));
        self.spawn(tls, ws);
    }

    fn spawn(&mut self, tls: SocketAddrArg, ws: SocketAddrArg) {
        self.runs += 1;
        let log = File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(devrelay_bin());
        cmd.arg("--listen")
            .arg(tls.arg())
            .arg("--cert-dir")
            .arg(self.dir.path().join("cert"))
            .arg("--store-log")
            .arg(self.dir.path().join("store.log"))
            .args(["--log-level", "smp_devrelay=debug"]);
        if self.websocket {
            cmd.arg("--ws-listen").arg(ws.arg());
        }
        cmd.args(&self.args)
            .env_remove("SMP_DEVRELAY_LISTEN")
            .env_remove("SMP_DEVRELAY_WS_LISTEN")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        self.child = Some(child);
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "smp-devrelay printed no address:\n{}",
            self.log()
        );
        let address = line.trim().to_owned();
        assert!(
            address.starts_with("smp://"),
            "unexpected address line {line:?}"
        );
        if !self.address.is_empty() {
            assert_eq!(
                address, self.address,
                "the restarted relay has another address"
            );
        }
        self.address = address;
        if self.websocket {
            line.clear();
            stdout.read_line(&mut line).unwrap();
            let ws = line.trim().strip_prefix("ws: ").unwrap_or_else(|| {
                panic!("expected the ws address, got {line:?}:\n{}", self.log())
            });
            self.ws_address = Some(ws.to_owned());
        }
        self.stdout = Some(stdout);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM to `child`, then waits for it to exit; SIGKILL after `patience`.
fn terminate_child(mut child: Child, patience: Duration) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + patience;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `faultproxy` forwarding to one upstream, steered through its stdin commands
/// (`blackhole on`, `reset`, …); killed when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    child: Child,
    stdin: ChildStdin,
    /// Kept open so the proxy never writes into a closed pipe.
    _stdout: BufReader<ChildStdout>,
    addr: String,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let mut child = Command::new(faultproxy_bin())
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .env_remove("FAULTPROXY_LISTEN")
            .env_remove("FAULTPROXY_DELAY_MS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // "listening on 127.0.0.1:PORT -> UPSTREAM"
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected faultproxy output {line:?}"))
            .to_owned();
        Self {
            child,
            stdin,
            _stdout: stdout,
            addr,
        }
    }

    /// `127.0.0.1:<port>` clients connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one command line, e.g. `blackhole on`.
    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a [`RawClient::recv`] ended without a message.
#[derive(Debug)]
pub enum RecvError {
    /// The daemon closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived within the timeout.
    Timeout,
    /// The bytes were not a valid frame.
    Decode(String),
}

/// A synchronous client that speaks frames and lets tests send anything at all.
#[derive(Debug)]
pub struct RawClient {
    stream: UnixStream,
    decoder: FrameDecoder,
    next_id: u64,
}

impl RawClient {
    /// Connects; panics if the connection is refused.
    pub fn connect(path: &Path) -> Self {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Self {
            stream,
            decoder: FrameDecoder::new(),
            next_id: 1,
        }
    }

    /// Connects, or says why not (for clients that outlive a daemon's restarts).
    pub fn try_connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        Ok(Self {
            stream,
            decoder: FrameDecoder::new(),
            next_id: 1,
        })
    }

    /// Like [`Self::hello`], but a daemon that goes away (or answers something else) is an
    /// error rather than a panic.
    pub fn try_hello(&mut self, app: &str) -> Result<ServerHello, RecvError> {
        self.send(&ClientMessage::Hello(ClientHello {
            proto_version: PROTO_VERSION,
            app: app.to_owned(),
        }))
        .map_err(|_| RecvError::Closed)?;
        match self.recv()? {
            ServerMessage::Hello(h) => Ok(h),
            other => Err(RecvError::Decode(format!("expected hello, got {other:?}"))),
        }
    }

    /// The socket, for tests that need lower-level control.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends one message as a frame.
    pub fn send(&mut self, msg: &ClientMessage) -> io::Result<()> {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).unwrap();
        self.send_raw(&buf)
    }

    /// Sends a JSON value as a frame (for messages the typed API cannot express).
    pub fn send_json(&mut self, value: &serde_json::Value) -> io::Result<()> {
        let body = serde_json::to_vec(value).unwrap();
        let mut buf = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        self.send_raw(&buf)
    }

    /// Sends a hello with the current protocol version and returns the daemon's hello.
    pub fn hello(&mut self, app: &str) -> ServerHello {
        self.send(&ClientMessage::Hello(ClientHello {
            proto_version: PROTO_VERSION,
            app: app.to_owned(),
        }))
        .unwrap();
        match self.recv() {
            Ok(ServerMessage::Hello(h)) => h,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    /// Sends a request with a fresh id and returns that id.
    pub fn send_request(&mut self, op: Op) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientMessage::Request(Request { id, op }))?;
        Ok(id)
    }

    /// Sends a request and waits for its answer (a response or an error with its id), skipping
    /// events that arrive in between.
    pub fn request(&mut self, op: Op) -> ServerMessage {
        let id = self.send_request(op).unwrap();
        loop {
            match self.recv() {
                Ok(msg @ ServerMessage::Response(_)) if response_id(&msg) == Some(id) => {
                    return msg;
                }
                Ok(msg @ ServerMessage::Error(_)) => return msg,
                Ok(_) => {}
                Err(e) => panic!("no answer to request {id}: {e:?}"),
            }
        }
    }

    /// One `recv` on `queue_id` (waiting up to `wait_ms` for a message), then an `ack` for
    /// each message received, pipelined and all answered before returning; the bodies as
    /// UTF-8, oldest first. Because every ack is answered before the next call, a later call
    /// sees a message again only if the daemon delivered it twice. `who` names the app in
    /// panic messages.
    pub fn recv_and_ack(&mut self, who: &str, queue_id: &str, wait_ms: u64) -> Vec<String> {
        let messages = match self.request(Op::Recv {
            queue_id: queue_id.to_owned(),
            max: None,
            wait_ms: Some(wait_ms),
        }) {
            ServerMessage::Response(Response {
                reply: Reply::Messages { messages },
                ..
            }) => messages,
            other => panic!("{who}: recv failed: {other:?}"),
        };
        let mut bodies = Vec::with_capacity(messages.len());
        for m in &messages {
            let body = base64::engine::general_purpose::STANDARD
                .decode(&m.body_b64)
                .unwrap();
            bodies.push(String::from_utf8(body).unwrap());
            self.send_request(Op::Ack {
                queue_id: m.queue_id.clone(),
                msg_id: m.msg_id.clone(),
            })
            .unwrap();
        }
        for _ in &messages {
            match self.recv() {
                Ok(ServerMessage::Response(Response {
                    reply: Reply::Done, ..
                })) => {}
                other => panic!("{who}: ack failed: {other:?}"),
            }
        }
        bodies
    }

    /// The next message, waiting at most [`PATIENCE`].
    pub fn recv(&mut self) -> Result<ServerMessage, RecvError> {
        self.recv_timeout(PATIENCE)
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<ServerMessage, RecvError> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.decoder.next::<ServerMessage>() {
                Ok(Some(msg)) => return Ok(msg),
                Ok(None) => {}
                Err(e) => return Err(RecvError::Decode(e.to_string())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(RecvError::Closed),
                Ok(n) => self.decoder.extend(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(RecvError::Timeout);
                }
                Err(_) => return Err(RecvError::Closed),
            }
        }
    }

    /// Reads until the daemon closes the connection; returns what arrived. Panics if the
    /// connection stays open past [`PATIENCE`].
    pub fn recv_until_closed(&mut self) -> Vec<ServerMessage> {
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Ok(msg) => got.push(msg),
                Err(RecvError::Closed) => return got,
                Err(e) => panic!("connection not closed ({e:?}); got {got:?}"),
            }
        }
    }

    /// Expects a connection-level error with `code`, then the close.
    pub fn expect_error_and_close(&mut self, code: ErrorCode) {
        let got = self.recv_until_closed();
        let errors: Vec<_> = got
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Error(e) => Some(e),
                _ => None,
            })
            .collect();
        assert!(
            errors.iter().any(|e| e.code == code && e.id.is_none()),
            "expected a {code:?} error frame, got {got:?}"
        );
    }
}

/// The id of a response or error.
pub fn response_id(msg: &ServerMessage) -> Option<u64> {
    match msg {
        ServerMessage::Response(r) => Some(r.id),
        ServerMessage::Error(e) => e.id,
        _ => None,
    }
}

/// A running reference `grp-relay` on loopback (TCP, QUIC, WebSocket and WebSocket over TLS
/// with a generated self-signed certificate, on free ports) in its
/// own temp directory: static key in `key`, counters in `stats-<run>.txt` (its
/// `--stats-file`), log in `relay-<run>.log`. A restart keeps the key and the ports. Killed
/// when dropped.
#[derive(Debug)]
pub struct GrpRelay {
    child: Option<Child>,
    stdout: Option<BufReader<ChildStdout>>,
    /// `grp://…`, `grp+quic://…`, `grp+ws://…`, `grp+wss://…` as printed by the relay.
    urls: Vec<String>,
    allow: Vec<String>,
    runs: u32,
    dir: TempDir,
}

impl GrpRelay {
    /// Starts a relay that accepts relay links from the relays with these keys.
    pub fn start(allow: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("muxd-e2e-grp-")
            .tempdir()
            .unwrap();
        // Fast cover scheduling: commands wait 20 ms for a tick, not the spec's 1 s.
        let config = format!(
            "key_file = {:?}\n[cover]\nmax_delay_ms = 20\nrelay_link_max_delay_ms = 20\n",
            dir.path().join("key")
        );
        std::fs::write(dir.path().join("relay.toml"), config).unwrap();
        let mut relay = Self {
            child: None,
            stdout: None,
            urls: Vec::new(),
            allow: allow.iter().map(|s| (*s).to_owned()).collect(),
            runs: 0,
            dir,
        };
        relay.spawn();
        relay
    }

    /// The relay's address for `scheme` (`grp`, `grp+quic`, `grp+ws` or `grp+wss`).
    pub fn url(&self, scheme: &str) -> &str {
        let prefix = format!("{scheme}://");
        self.urls
            .iter()
            .find(|u| u.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {scheme} address in {:?}", self.urls))
    }

    /// The relay's static key (base64url, as in its addresses).
    pub fn key(&self) -> &str {
        let u = self.url("grp");
        &u["grp://".len()..u.find('@').unwrap()]
    }

    /// The counters the current run last wrote, as `name value` lines.
    pub fn stats(&self) -> String {
        std::fs::read_to_string(self.stats_path()).unwrap_or_default()
    }

    /// One numeric counter of the current run (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        self.stat_values(name)
            .first()
            .map_or(0, |v| v.parse().unwrap())
    }

    /// Every value of a repeated stats line (`client_queue_id`, `relay_peer`, …).
    pub fn stat_values(&self, name: &str) -> Vec<String> {
        self.stats()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.to_owned())
            .collect()
    }

    /// What the current run logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("relay-{}.log", self.runs)))
            .unwrap_or_default()
    }

    fn stats_path(&self) -> PathBuf {
        self.dir.path().join(format!("stats-{}.txt", self.runs))
    }

    /// Stops the relay with SIGTERM (goodbye 0x02 on every link) and waits for it to exit,
    /// so that its stats file is final.
    pub fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            terminate_child(child, PATIENCE * 2);
        }
        self.stdout = None;
    }

    /// Kills the relay (SIGKILL): links break without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdout = None;
    }

    /// Kills the relay (if running) and starts it again with the same key and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        self.runs += 1;
        let port = |scheme: &str| -> String {
            let p = self
                .urls
                .iter()
                .find(|u| u.starts_with(&format!("{scheme}://")))
                .map_or("0", |u| u.rsplit(':').next().unwrap());
            format!("127.0.0.1:{p}")
        };
        let log = File::create(self.dir.path().join(format!("relay-{}.log", self.runs))).unwrap();
        let mut cmd = Command::new(grp_relay_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(self.dir.path().join("relay.toml"))
            .arg("--listen-tcp")
            .arg(port("grp"))
            .arg("--listen-quic")
            .arg(port("grp+quic"))
            .arg("--listen-ws")
            .arg(port("grp+ws"))
            .arg("--listen-wss")
            .arg(port("grp+wss"))
            .arg("--stats-file")
            .arg(self.stats_path());
        for k in &self.allow {
            // `=`: a base64url key may start with '-', which would read as a flag.
            cmd.arg(format!("--allow-relay={k}"));
        }
        cmd.env("RUST_LOG", "grp_relay=debug,info")
            .env_remove("GRP_RELAY_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        self.child = Some(child);
        let mut urls = Vec::new();
        // One line per listener: TCP, QUIC, WebSocket, WebSocket over TLS.
        for _ in 0..4 {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "grp-relay printed no address:\n{}",
                self.log()
            );
            urls.push(line.trim().to_owned());
        }
        if !self.urls.is_empty() {
            assert_eq!(urls, self.urls, "the restarted relay has other addresses");
        }
        self.urls = urls;
        self.stdout = Some(stdout);
    }
}

impl Drop for GrpRelay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
