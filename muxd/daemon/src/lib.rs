//! The muxd daemon as a library, so tests can run it in-process; `main.rs` is a thin shell.
//!
//! [`run`] binds the IPC socket and serves until a shutdown future completes, a client asks for
//! shutdown, or an error occurs. [`bind`] and [`serve`] split that for callers that want the
//! socket bound before they start serving.
//!
//! Inside, one driver task (`driver.rs`) owns the daemon state, including the upstream pool
//! (`muxd_core::Pool`); each IPC client has a reader and a writer task (`ipc/session.rs`) and a
//! bounded outbound queue, and each upstream server connection has one transport task
//! (`upstream.rs`); one more task (`netwatch.rs`) reports network changes. The driver never waits on a client or a socket, so a client that stops
//! reading is disconnected and a slow server only delays its own traffic.

mod config;
mod driver;
mod grp_config;
mod grp_upstream;
mod ipc;
mod journal;
mod netwatch;
mod setup;
mod shutdown;
mod upstream;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use interprocess::local_socket::tokio::Listener;
use rand_core::SeedableRng as _;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::{
    Config, ConfigError, Environment, LogFormat, PASSPHRASE_VAR, RunArgs, SecretPassphrase,
    StoreArgs, default_config_path, default_data_dir, generate_default_toml,
};
pub use crate::grp_config::GrpSettings;
pub use crate::ipc::socket::SocketError;
pub use crate::journal::{RestoreError, Restored};
pub use crate::setup::{InitReport, RestoreReport, SetupError, init, open_store, restore};
pub use crate::shutdown::{ShutdownReason, os_signal};

/// Sessions' commands waiting for the driver. Sessions wait for room (they only slow their own
/// client down); the driver never waits on sessions.
const COMMAND_QUEUE: usize = 256;

/// Events from upstream transport tasks waiting for the driver. Tasks wait for room, which only
/// slows the reading of their own socket.
const UPSTREAM_EVENT_QUEUE: usize = 256;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The IPC socket could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The store could not be opened or read back (the message names the file).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The store's contents could not be restored into the pool.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The store failed while running; the daemon stopped without answering what was not
    /// durable. A restart resumes from the last commit.
    #[error("the store failed; stopped (restart resumes from the last commit)")]
    StoreFailed,
}

impl Error {
    /// The process exit code for this error: 2 for configuration, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Setup(e) => e.exit_code(),
            Self::Socket(_) | Self::Restore(_) | Self::StoreFailed => 1,
        }
    }
}

/// The IPC socket, bound and ready to serve. Dropping it without serving removes the socket.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Listener,
    path: PathBuf,
}

impl BoundSocket {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Prepares the socket directory, clears a stale socket, refuses to start over a live daemon,
/// and binds with mode 0600. Must be called inside a tokio runtime.
pub fn bind(config: &Config) -> Result<BoundSocket, Error> {
    let euid = ipc::socket::effective_uid();
    ipc::socket::prepare_dir(&config.socket, config.socket_is_default, euid)?;
    ipc::socket::sweep_stale(&config.socket)?;
    let listener = ipc::socket::bind(&config.socket)?;
    Ok(BoundSocket {
        listener,
        path: config.socket.clone(),
    })
}

/// Binds the socket, then serves until shutdown. See [`bind`] and [`serve`].
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ShutdownReason>,
) -> Result<(), Error> {
    let socket = bind(&config)?;
    serve(socket, config, shutdown).await
}

/// Serves IPC clients on `socket` until `shutdown` completes or a client asks for shutdown.
///
/// Shutdown stops accepting, sends every client `shutting_down`, waits up to
/// `config.shutdown_grace` for clients to receive their last frames, then removes the socket.
pub async fn serve(
    socket: BoundSocket,
    config: Config,
    shutdown: impl Future<Output = ShutdownReason>,
) -> Result<(), Error> {
    let BoundSocket { listener, path } = socket;
    tracing::info!(path = %path.display(), "listening on {}", path.display());
    if let Some(notify) = &config.notify_socket
        && let Err(e) = ipc::socket::notify_ready(notify)
    {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }

    let signal = shutdown::ShutdownSignal::new();
    let abort = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_EVENT_QUEUE);
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Everything the apps handed over before a restart comes back before the socket serves:
    // queues, their waiting messages, sender state and the messages still to send.
    let started = std::time::Instant::now();
    let opened = open_store(&config).map_err(Error::from).and_then(|store| {
        let store = Arc::new(store);
        let mut pool_config = muxd_core::PoolConfig::default();
        pool_config.send_timeout = Some(config.message_ttl);
        pool_config.grp = config.grp.pool.clone();
        let restored = journal::Journal::restore(
            Arc::clone(&store),
            pool_config,
            config.message_ttl,
            started,
        )?;
        Ok((store, restored))
    });
    let (store, (mut pool, restored)) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            // Nothing was served: leave no socket behind for clients to find.
            remove_socket(&path);
            return Err(e);
        }
    };
    tracing::info!(
        store = %store.path().display(),
        queues = restored.queues,
        senders = restored.senders,
        outbound = restored.outbound,
        inbound = restored.inbound,
        "store opened"
    );
    pool.resume(started);
    let mut hub = driver::Hub::with_pool(
        started,
        now_unix_ms,
        std::process::id(),
        config.watch_interval,
        pool,
        // Queue keys and nonces: seeded once from the OS CSPRNG.
        rand_chacha::ChaCha20Rng::from_entropy(),
    );
    hub.set_unlock(config.unlock());
    let options = upstream::UpstreamOptions {
        connect: {
            let mut c = muxd_transport::ConnectOptions::default();
            c.keepalive = Some(config.tcp_keepalive);
            c.user_timeout = config.tcp_user_timeout;
            c
        },
        rtt_interval: config.rtt_sample_interval,
        max_backlog_blocks: upstream::DEFAULT_MAX_BACKLOG_BLOCKS,
        grp: grp_upstream::GrpOptions {
            max_delay: config.grp.max_delay,
            renew_after: config.grp.renew_after,
        },
    };
    let upstreams = upstream::Upstreams::new(upstream_tx, tracker.clone(), options);
    // One pending change is enough: later ones merge into it.
    let (net_tx, net_rx) = mpsc::channel(1);
    tracker.spawn(netwatch::run(net_tx, signal.token().clone()));
    // The driver commits to the store (fsync) in its loop, so it gets a thread of its own:
    // a slow disk delays the driver, never the sessions' or the sockets' tasks.
    let driver = {
        let driver_signal = signal.clone();
        let grace = config.shutdown_grace;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("muxd-driver".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build();
                let failed = match runtime {
                    Ok(rt) => rt.block_on(driver::drive(
                        hub,
                        command_rx,
                        upstreams,
                        upstream_rx,
                        net_rx,
                        driver_signal,
                        grace,
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the driver's runtime");
                        driver_signal.trigger(ShutdownReason::StoreFailed);
                        true
                    }
                };
                let _ = done_tx.send(failed);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the driver thread");
            signal.trigger(ShutdownReason::StoreFailed);
        }
        done_rx
    };
    let server = ipc::server::Server {
        euid: ipc::socket::effective_uid(),
        slots: Arc::new(Semaphore::new(config.max_clients as usize)),
        buffer_frames: config.client_buffer_frames as usize,
        commands,
        tracker: tracker.clone(),
        stopping: signal.token().clone(),
        abort: abort.clone(),
    };

    tokio::select! {
        () = server.accept_loop(listener) => {}
        reason = shutdown => signal.trigger(reason),
    }
    // Either branch may have ended first; make sure everything sees the shutdown, and that the
    // accept loop (and with it the listener) is gone: the select above dropped it.
    if !signal.is_triggered() {
        signal.trigger(ShutdownReason::Signal);
    }
    let reason = signal.reason();
    tracing::info!(%reason, "shutting down");
    // The driver sends every client its `shutting_down` event as it exits.
    let store_failed = match driver.await {
        Ok(failed) => failed,
        Err(_) => {
            tracing::error!("driver thread ended without a result");
            true
        }
    };
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tracker.len(),
            "clients did not drain within {:?}; closing them",
            config.shutdown_grace
        );
        abort.cancel();
        // Every task now ends at its next await point.
        tracker.wait().await;
    }
    remove_socket(&path);
    tracing::info!("stopped");
    if store_failed {
        return Err(Error::StoreFailed);
    }
    Ok(())
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove socket"),
    }
}
