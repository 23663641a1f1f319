//! The daemon's handle on one connected client: a bounded outbound queue and a close switch.
//!
//! Everyone who talks to a client (its own session, the driver) goes through
//! [`ClientHandle::send`], which never waits: a full queue is reported to the caller, who then
//! disconnects the client as a slow consumer. So one client that stops reading cannot stall the
//! driver or any other client, and what the daemon buffers per client is bounded twice: by
//! `client_buffer_frames` frames and by [`CLIENT_BUFFER_BYTES`] bytes. The byte bound matters
//! because a frame may be up to 1 MiB: 128 of them would be 128 MiB for a single client.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use muxd_ipc_proto::{ErrorCode, ErrorFrame, ServerMessage, encode_frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Identifies a connection for the daemon's lifetime; also the `client` field in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ClientId(pub(crate) u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Bytes the daemon queues for one client before it counts as a slow consumer (with the
/// frame count bound, whichever is reached first).
pub(crate) const CLIENT_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The sending side of a client connection. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct ClientHandle {
    id: ClientId,
    tx: mpsc::Sender<Bytes>,
    /// Bytes queued and not yet taken by the writer (shared with [`WriterEnd`]).
    queued: Arc<AtomicUsize>,
    budget_bytes: usize,
    close: Arc<CloseSwitch>,
}

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The client's queue is full: it is not reading fast enough.
    Full,
    /// The connection is gone.
    Closed,
    /// The message could not be encoded (a bug, or a report over the frame limit).
    Encode,
}

impl ClientHandle {
    /// A handle and the end its writer task drains. The writer end holds no sender, so the
    /// queue closes once every handle is dropped.
    pub(crate) fn new(id: ClientId, buffer_frames: usize) -> (Self, WriterEnd) {
        Self::with_byte_budget(id, buffer_frames, CLIENT_BUFFER_BYTES)
    }

    /// Like [`new`](Self::new) with a chosen byte bound (tests use small ones).
    pub(crate) fn with_byte_budget(
        id: ClientId,
        buffer_frames: usize,
        budget_bytes: usize,
    ) -> (Self, WriterEnd) {
        let (tx, rx) = mpsc::channel(buffer_frames.max(1));
        let close = Arc::new(CloseSwitch::default());
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Self {
                id,
                tx,
                queued: queued.clone(),
                budget_bytes,
                close: close.clone(),
            },
            WriterEnd {
                id,
                queue: rx,
                queued,
                close: close.token.clone(),
                switch: close,
            },
        )
    }

    pub(crate) fn id(&self) -> ClientId {
        self.id
    }

    /// Queues `msg` without waiting.
    pub(crate) fn send(&self, msg: &ServerMessage) -> Result<(), SendError> {
        let frame = encode(msg).ok_or(SendError::Encode)?;
        self.send_frame(frame)
    }

    /// Queues an already encoded frame (shared by every watcher of one broadcast).
    ///
    /// `Full` when either the frame count or the byte budget is used up. A single frame is
    /// always taken into an empty queue, whatever its size (frames are at most 1 MiB anyway).
    pub(crate) fn send_frame(&self, frame: Bytes) -> Result<(), SendError> {
        let len = frame.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before.saturating_add(len) > self.budget_bytes {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(SendError::Full);
        }
        self.tx.try_send(frame).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            }
        })
    }

    /// Asks the session to end. The first call's `last` wins; later calls only re-cancel.
    pub(crate) fn close(&self, last: LastWords) {
        if let Ok(mut slot) = self.close.last.lock()
            && slot.is_none()
            && !self.close.token.is_cancelled()
        {
            *slot = Some(last);
        }
        self.close.token.cancel();
    }

    /// Closes with a connection-level error frame.
    pub(crate) fn close_with_error(&self, code: ErrorCode, message: impl Into<String>, how: Flush) {
        let frame = encode(&ServerMessage::Error(ErrorFrame {
            id: None,
            code,
            message: message.into(),
        }));
        self.close(LastWords { frame, flush: how });
    }

    /// Completes when [`close`](Self::close) has been called.
    pub(crate) fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.token.cancelled()
    }
}

/// What the writer task owns: the queue's receiving end and a view of the close switch.
#[derive(Debug)]
pub(crate) struct WriterEnd {
    pub(crate) id: ClientId,
    /// The frames; the writer takes them through [`recv`](Self::recv) and
    /// [`try_recv`](Self::try_recv), which keep the byte count right.
    pub(crate) queue: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
    /// Cancelled when the session is closed (a clone of the switch's token, so the writer can
    /// wait on it while borrowing `queue`).
    pub(crate) close: CancellationToken,
    switch: Arc<CloseSwitch>,
}

impl WriterEnd {
    /// The next queued frame; `None` once every handle is gone and the queue is empty.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.queue.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// A queued frame if there is one, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.queue.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// Closes the session from the writer's side (the socket failed); nothing more is sent.
    pub(crate) fn close_silently(&self) {
        if let Ok(mut slot) = self.switch.last.lock()
            && slot.is_none()
            && !self.switch.token.is_cancelled()
        {
            *slot = Some(LastWords {
                frame: None,
                flush: Flush::Discard(Duration::ZERO),
            });
        }
        self.switch.token.cancel();
    }

    /// What to do now that the session is closing.
    pub(crate) fn take_last_words(&self) -> LastWords {
        self.switch
            .last
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .unwrap_or(LastWords {
                frame: None,
                flush: Flush::Pending(ERROR_FLUSH_BUDGET),
            })
    }
}

/// How long a session closed for a protocol error may take to deliver its queued frames and
/// the error frame.
pub(crate) const ERROR_FLUSH_BUDGET: Duration = Duration::from_secs(1);

/// How long the daemon tries to hand a slow consumer its `slow_consumer` frame. Short: the
/// client is by definition not reading, and the attempt must not hold a task for long.
pub(crate) const SLOW_CONSUMER_BUDGET: Duration = Duration::from_millis(100);

/// The final frame of a session and how hard to try delivering what is queued before it.
#[derive(Debug)]
pub(crate) struct LastWords {
    /// Written after the queue (if flushed); `None` just closes.
    pub(crate) frame: Option<Bytes>,
    /// Whether to deliver queued frames first, and the time allowed for all of it.
    pub(crate) flush: Flush,
}

/// Whether queued frames are delivered before the last frame.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Flush {
    /// Deliver what is queued, then the last frame, within the given time.
    Pending(Duration),
    /// Drop what is queued; only try the last frame, within the given time.
    Discard(Duration),
}

impl Flush {
    pub(crate) fn budget(self) -> Duration {
        match self {
            Self::Pending(d) | Self::Discard(d) => d,
        }
    }
}

#[derive(Debug, Default)]
struct CloseSwitch {
    token: CancellationToken,
    last: Mutex<Option<LastWords>>,
}

/// Encodes one server message as a frame; `None` (logged) if it cannot be.
pub(crate) fn encode(msg: &ServerMessage) -> Option<Bytes> {
    let mut buf = Vec::new();
    match encode_frame(msg, &mut buf) {
        Ok(()) => Some(Bytes::from(buf)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a frame");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use muxd_ipc_proto::{Event, decode_frame};

    use super::*;

    #[test]
    fn full_queue_is_reported_not_waited_on() {
        let (h, w) = ClientHandle::new(ClientId(1), 2);
        let mut rx = w.queue;
        let msg = ServerMessage::Event(Event::ShuttingDown { reason: "x".into() });
        assert_eq!(h.send(&msg), Ok(()));
        assert_eq!(h.send(&msg), Ok(()));
        assert_eq!(h.send(&msg), Err(SendError::Full));
        let frame = rx.try_recv().unwrap();
        let (back, _): (ServerMessage, usize) = decode_frame(&frame).unwrap().unwrap();
        assert_eq!(back, msg);
        drop(rx);
        assert_eq!(h.send(&msg), Err(SendError::Closed));
    }

    #[test]
    fn byte_budget_is_reported_like_a_full_queue_and_freed_by_the_writer() {
        let (h, mut w) = ClientHandle::with_byte_budget(ClientId(1), 64, 100);
        let frame = Bytes::from(vec![b'x'; 60]);
        // The first frame always fits; a second would exceed 100 bytes.
        assert_eq!(h.send_frame(frame.clone()), Ok(()));
        assert_eq!(h.send_frame(frame.clone()), Err(SendError::Full));
        assert_eq!(h.send_frame(Bytes::from(vec![b'y'; 40])), Ok(()));
        assert_eq!(
            h.send_frame(Bytes::from(vec![b'z'; 1])),
            Err(SendError::Full)
        );
        // Once the writer took the first, there is room again.
        assert_eq!(w.try_recv().as_deref(), Some(&frame[..]));
        assert_eq!(h.send_frame(frame.clone()), Ok(()));
        assert_eq!(w.try_recv().map(|f| f.len()), Some(40));
        assert_eq!(w.try_recv().map(|f| f.len()), Some(60));
        assert!(w.try_recv().is_none());
        assert_eq!(w.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn first_close_wins() {
        let (h, w) = ClientHandle::new(ClientId(1), 1);
        h.close_with_error(
            ErrorCode::SlowConsumer,
            "slow",
            Flush::Discard(SLOW_CONSUMER_BUDGET),
        );
        h.close_with_error(
            ErrorCode::ShuttingDown,
            "bye",
            Flush::Pending(ERROR_FLUSH_BUDGET),
        );
        assert!(h.close.token.is_cancelled());
        let last = w.take_last_words();
        assert!(matches!(last.flush, Flush::Discard(_)));
        let (msg, _): (ServerMessage, usize) = decode_frame(last.frame.as_deref().unwrap())
            .unwrap()
            .unwrap();
        assert!(matches!(
            msg,
            ServerMessage::Error(ErrorFrame {
                code: ErrorCode::SlowConsumer,
                ..
            })
        ));
    }
}
