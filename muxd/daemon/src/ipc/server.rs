//! The accept loop: credentials and capacity are checked here, before a session starts.

use std::sync::Arc;
use std::time::Duration;

use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::StreamCommon as _;
use interprocess::local_socket::traits::tokio::Listener as _;
use muxd_ipc_proto::{ErrorCode, ErrorFrame, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::Command;
use crate::ipc::client::{ClientHandle, ClientId, encode};
use crate::ipc::session::{ReaderCtx, read_loop, write_loop};
use crate::ipc::socket::peer_allowed;

/// How long a refused peer gets to take its error frame and finish sending.
const REJECT_BUDGET: Duration = Duration::from_millis(200);

/// The most a refused peer may make us read (and discard) before we close.
const REJECT_DISCARD_LIMIT: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Everything the accept loop hands to new sessions.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) euid: u32,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) buffer_frames: usize,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) tracker: TaskTracker,
    /// Daemon shutdown has started: stop accepting and reading.
    pub(crate) stopping: CancellationToken,
    /// The grace period is over: abandon any write still in progress.
    pub(crate) abort: CancellationToken,
}

impl Server {
    /// Accepts until `stopping` is cancelled; the listener is dropped on return, which stops
    /// the kernel from queueing further connections.
    pub(crate) async fn accept_loop(self, listener: Listener) {
        let mut next_id = 0u64;
        loop {
            let stream = tokio::select! {
                () = self.stopping.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            next_id += 1;
            self.admit(ClientId(next_id), stream);
        }
        drop(listener);
    }

    fn admit(&self, id: ClientId, stream: Stream) {
        let (peer_uid, peer_pid) = peer_identity(&stream);
        if !peer_allowed(self.euid, peer_uid) {
            tracing::warn!(
                client = %id,
                peer_uid = ?peer_uid,
                peer_pid = ?peer_pid,
                "refused a connection from another user"
            );
            self.tracker.spawn(reject(
                stream,
                ErrorCode::PermissionDenied,
                "only the daemon's own user may connect",
            ));
            return;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(client = %id, peer_pid = ?peer_pid, "refused a client: max_clients reached");
            self.tracker.spawn(reject(
                stream,
                ErrorCode::Busy,
                "too many clients are connected",
            ));
            return;
        };
        tracing::debug!(client = %id, peer_pid = ?peer_pid, "client connected");
        let permit = Arc::new(permit);
        let (handle, end) = ClientHandle::new(id, self.buffer_frames);
        // Both tasks use the same socket; `&Stream` reads and writes, so an `Arc` splits it
        // (interprocess deprecates its own `split`).
        let stream = Arc::new(stream);
        let (reader, writer) = (SharedStream(stream.clone()), SharedStream(stream));
        self.tracker
            .spawn(write_loop(writer, end, self.abort.clone(), permit.clone()));
        self.tracker.spawn(read_loop(
            reader,
            ReaderCtx {
                handle,
                commands: self.commands.clone(),
                stopping: self.stopping.clone(),
                _permit: permit,
            },
        ));
    }
}

/// The peer's effective uid and pid, where the platform tells them.
fn peer_identity(stream: &Stream) -> (Option<u32>, Option<i64>) {
    match stream.peer_creds() {
        #[cfg(unix)]
        Ok(creds) => (creds.euid(), creds.pid().map(i64::from)),
        #[cfg(not(unix))]
        Ok(creds) => (Some(0), creds.pid().map(i64::from)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials");
            (None, None)
        }
    }
}

/// Sends a connection-level error, then briefly reads and discards what the peer sends before
/// closing. Closing at once would make a client that is still writing its hello see a broken
/// pipe (or a reset) instead of the error frame.
async fn reject(mut stream: Stream, code: ErrorCode, message: &str) {
    let msg = ServerMessage::Error(ErrorFrame {
        id: None,
        code,
        message: message.to_owned(),
    });
    let Some(frame) = encode(&msg) else { return };
    let _ = tokio::time::timeout(REJECT_BUDGET, async {
        stream.write_all(&frame).await?;
        stream.flush().await?;
        let mut sink = [0u8; 4096];
        let mut discarded = 0;
        while discarded < REJECT_DISCARD_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// One task's share of a client socket. The socket closes when both shares are dropped.
#[derive(Debug)]
struct SharedStream(Arc<Stream>);

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_shutdown(cx)
    }
}
