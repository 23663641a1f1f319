//! The daemon's handle on one connected client: a bounded outbound queue and a close switch.
//!
//! Everyone who talks to a client (its own session, the driver) goes through
//! [`ClientHandle::send`], which never waits: a full queue is reported to the caller, who then
//! disconnects the client as a slow consumer. So one client that stops reading cannot stall the
//! driver or any other client, and what the daemon buffers per client is bounded by
//! `client_buffer_frames` frames.

use std::fmt;
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

/// The sending side of a client connection. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct ClientHandle {
    id: ClientId,
    tx: mpsc::Sender<Bytes>,
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
        let (tx, rx) = mpsc::channel(buffer_frames.max(1));
        let close = Arc::new(CloseSwitch::default());
        (
            Self {
                id,
                tx,
                close: close.clone(),
            },
            WriterEnd {
                id,
                queue: rx,
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
    pub(crate) fn send_frame(&self, frame: Bytes) -> Result<(), SendError> {
        self.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
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
    pub(crate) queue: mpsc::Receiver<Bytes>,
    /// Cancelled when the session is closed (a clone of the switch's token, so the writer can
    /// wait on it while borrowing `queue`).
    pub(crate) close: CancellationToken,
    switch: Arc<CloseSwitch>,
}

impl WriterEnd {
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
