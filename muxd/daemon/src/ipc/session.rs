//! One client connection: a reader task that parses frames and forwards requests to the
//! driver, and a writer task that drains the client's bounded queue into the socket.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use muxd_ipc_proto::{
    ClientMessage, DecodeError, ErrorCode, ErrorFrame, PROTO_VERSION, ServerHello, ServerMessage,
    decode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use crate::driver::Command;
use crate::ipc::client::{ClientHandle, ERROR_FLUSH_BUDGET, Flush, WriterEnd};

/// Bytes asked of the socket per read. The decode buffer grows past this only while a large
/// frame (at most `MAX_FRAME_LEN`) is arriving.
const READ_CHUNK: usize = 16 * 1024;

/// What the reader needs besides the socket.
#[derive(Debug)]
pub(crate) struct ReaderCtx {
    pub(crate) handle: ClientHandle,
    pub(crate) commands: mpsc::Sender<Command>,
    /// Cancelled when the daemon starts shutting down: stop taking requests.
    pub(crate) stopping: CancellationToken,
    /// Held for the whole session; frees a `max_clients` slot when both tasks end.
    pub(crate) _permit: Arc<OwnedSemaphorePermit>,
}

/// A connection-level failure: the client gets an error frame and is disconnected.
struct Fatal {
    code: ErrorCode,
    message: String,
}

impl Fatal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

enum Phase {
    AwaitingHello,
    Ready,
}

/// Reads frames until the client leaves, breaks the protocol, or the daemon stops.
pub(crate) async fn read_loop<R: AsyncRead + Unpin>(mut reader: R, ctx: ReaderCtx) {
    let client = ctx.handle.id();
    let mut phase = Phase::AwaitingHello;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let outcome: Result<(), Fatal> = 'session: loop {
        // Decode everything already buffered before reading more.
        loop {
            match decode_frame::<serde_json::Value>(&buf) {
                Ok(None) => break,
                Ok(Some((value, used))) => {
                    buf.drain(..used);
                    match handle_frame(value, &mut phase, &ctx).await {
                        Ok(true) => {}
                        Ok(false) => break 'session Ok(()),
                        Err(fatal) => break 'session Err(fatal),
                    }
                }
                // The header alone decides this, before any of the body is buffered.
                Err(DecodeError::TooLarge(n)) => {
                    break 'session Err(Fatal::new(
                        ErrorCode::FrameTooLarge,
                        format!(
                            "frame of {n} bytes exceeds the maximum of {}",
                            muxd_ipc_proto::MAX_FRAME_LEN
                        ),
                    ));
                }
                Err(e) => break 'session Err(Fatal::new(ErrorCode::MalformedFrame, e.to_string())),
            }
        }
        tokio::select! {
            () = ctx.stopping.cancelled() => break Ok(()),
            () = ctx.handle.closed() => break Ok(()),
            read = reader.read(&mut chunk) => match read {
                Ok(0) => {
                    if !buf.is_empty() {
                        tracing::debug!(%client, bytes = buf.len(), "client left mid-frame");
                    }
                    break Ok(());
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    tracing::debug!(%client, error = %e, "read failed");
                    break Ok(());
                }
            },
        }
    };
    if let Err(fatal) = outcome {
        tracing::info!(%client, code = ?fatal.code, reason = %fatal.message, "closing client after protocol error");
        ctx.handle.close_with_error(
            fatal.code,
            fatal.message,
            Flush::Pending(ERROR_FLUSH_BUDGET),
        );
    }
    // On a plain EOF nothing is closed: once this sender and the driver's are dropped the
    // writer delivers what is still queued and ends by itself.
    if matches!(phase, Phase::Ready) {
        // Sent even during shutdown; fails harmlessly once the driver is gone.
        let _ = ctx.commands.send(Command::Disconnect { client }).await;
    }
    drop(ctx);
}

/// Handles one decoded frame. `Ok(false)` ends the session quietly (daemon stopping).
async fn handle_frame(
    value: serde_json::Value,
    phase: &mut Phase,
    ctx: &ReaderCtx,
) -> Result<bool, Fatal> {
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    let parsed = serde_json::from_value::<ClientMessage>(value);
    match phase {
        Phase::AwaitingHello => {
            if kind.as_deref() != Some("hello") {
                if parsed.is_err() && kind.as_deref() != Some("request") {
                    return Err(Fatal::new(ErrorCode::MalformedFrame, "not a known message"));
                }
                return Err(Fatal::new(
                    ErrorCode::HelloRequired,
                    "the first frame must be a hello",
                ));
            }
            let hello = match parsed {
                Ok(ClientMessage::Hello(h)) => h,
                Ok(_) => {
                    return Err(Fatal::new(
                        ErrorCode::HelloRequired,
                        "the first frame must be a hello",
                    ));
                }
                Err(e) => {
                    return Err(Fatal::new(
                        ErrorCode::MalformedFrame,
                        format!("bad hello: {e}"),
                    ));
                }
            };
            if hello.proto_version != PROTO_VERSION {
                return Err(Fatal::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {} is not supported; this daemon speaks {PROTO_VERSION}",
                        hello.proto_version
                    ),
                ));
            }
            if let Err(why) = check_app_name(&hello.app) {
                return Err(Fatal::new(ErrorCode::InvalidArgument, why));
            }
            let reply = ServerMessage::Hello(ServerHello {
                proto_version: PROTO_VERSION,
                daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
            });
            // The queue is empty this early, so this only fails if the client is already gone.
            if ctx.handle.send(&reply).is_err() {
                return Ok(false);
            }
            tracing::debug!(client = %ctx.handle.id(), app = %hello.app, "hello");
            let cmd = Command::Connect {
                handle: ctx.handle.clone(),
                app: hello.app,
            };
            if !forward(ctx, cmd).await {
                return Ok(false);
            }
            *phase = Phase::Ready;
            Ok(true)
        }
        Phase::Ready => match parsed {
            Ok(ClientMessage::Request(request)) => {
                let cmd = Command::Request {
                    client: ctx.handle.id(),
                    request,
                };
                Ok(forward(ctx, cmd).await)
            }
            Ok(ClientMessage::Hello(_)) => Err(Fatal::new(
                ErrorCode::HelloRequired,
                "hello was already exchanged",
            )),
            Ok(_) => Err(Fatal::new(
                ErrorCode::MalformedFrame,
                "not a client message",
            )),
            // A well-formed request this daemon does not understand (an unknown op or a bad
            // argument) fails alone; the connection stays usable.
            Err(e) if kind.as_deref() == Some("request") && id.is_some() => {
                let err = ServerMessage::Error(ErrorFrame {
                    id,
                    code: ErrorCode::InvalidArgument,
                    message: format!("invalid request: {e}"),
                });
                // A full queue here means a slow consumer; the driver will notice on its next
                // send, so the failure needs no handling of its own.
                let _ = ctx.handle.send(&err);
                Ok(true)
            }
            Err(e) => Err(Fatal::new(ErrorCode::MalformedFrame, e.to_string())),
        },
    }
}

/// Longest app name, in bytes.
const MAX_APP_NAME: usize = 64;

/// Checks a hello's `app`: 1 to 64 bytes of `[A-Za-z0-9._-]`. The name ends up in logs,
/// status and the pool's per-app tables, so it must be short and printable; it is a routing
/// label among one user's apps, not a security boundary (the peer uid check is).
fn check_app_name(app: &str) -> Result<(), String> {
    if app.is_empty() || app.len() > MAX_APP_NAME {
        return Err(format!(
            "app name must be 1 to {MAX_APP_NAME} bytes, got {}",
            app.len()
        ));
    }
    if let Some(c) = app
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "app name may only contain A-Z, a-z, 0-9, '.', '_' and '-'; found {c:?}"
        ));
    }
    Ok(())
}

/// Hands a command to the driver, waiting for room; gives up if the daemon stops.
async fn forward(ctx: &ReaderCtx, cmd: Command) -> bool {
    tokio::select! {
        () = ctx.stopping.cancelled() => false,
        () = ctx.handle.closed() => false,
        sent = ctx.commands.send(cmd) => sent.is_ok(),
    }
}

/// Writes queued frames until the queue closes (every sender gone) or the session is closed,
/// then delivers the last words within their budget. `abort` ends everything at once (the
/// shutdown grace period ran out).
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut end: WriterEnd,
    abort: CancellationToken,
    permit: Arc<OwnedSemaphorePermit>,
) {
    let client = end.id;
    // A frame taken off the queue but interrupted by the close, with how much of it was
    // written (possibly nothing).
    let mut interrupted: Option<(Bytes, usize)> = None;
    let closed = end.close.clone();
    loop {
        let frame = tokio::select! {
            biased;
            () = abort.cancelled() => return,
            () = closed.cancelled() => break,
            frame = end.recv() => match frame {
                Some(frame) => frame,
                None => {
                    // Every handle is gone: the session ended normally and all is written.
                    let _ = tokio::time::timeout(ERROR_FLUSH_BUDGET, writer.shutdown()).await;
                    return;
                }
            },
        };
        let mut written = 0;
        let result = tokio::select! {
            () = abort.cancelled() => return,
            () = closed.cancelled() => Ok(false),
            r = write_tracked(&mut writer, &frame, &mut written) => r.map(|()| true),
        };
        match result {
            Ok(true) => {}
            Ok(false) => {
                interrupted = Some((frame, written));
                break;
            }
            Err(e) => {
                tracing::debug!(%client, error = %e, "write failed");
                end.close_silently();
                return;
            }
        }
    }
    let last = end.take_last_words();
    let budget = last.flush.budget();
    let finish = async {
        let flush_pending = matches!(last.flush, Flush::Pending(_));
        // Finish a half-written frame first, or the last frame would be unparseable. A frame
        // already dequeued but not started still belongs before the pending ones when they
        // are flushed; otherwise (a slow consumer) it is dropped with the rest.
        if let Some((frame, written)) = interrupted
            && (written > 0 || flush_pending)
        {
            writer.write_all(&frame[written..]).await?;
        }
        if flush_pending {
            while let Some(frame) = end.try_recv() {
                writer.write_all(&frame).await?;
            }
        }
        if let Some(frame) = &last.frame {
            writer.write_all(frame).await?;
        }
        writer.flush().await?;
        writer.shutdown().await
    };
    tokio::select! {
        () = abort.cancelled() => tracing::debug!(%client, "abandoned closing frames at the deadline"),
        r = tokio::time::timeout(budget, finish) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%client, error = %e, "closing write failed"),
            Err(_) => tracing::debug!(%client, "closing frames not taken within {budget:?}"),
        },
    }
    drop(permit);
}

/// `write_all` that records progress, so a cancelled write can be completed later.
async fn write_tracked<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &[u8],
    written: &mut usize,
) -> io::Result<()> {
    while *written < frame.len() {
        let n = writer.write(&frame[*written..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *written += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_short_printable_labels() {
        for ok in ["chat", "a", "org.example.Chat-2_x", &"x".repeat(64)] {
            assert_eq!(check_app_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "has space",
            "slash/",
            "new\nline",
            "ünï",
            &"x".repeat(65),
        ] {
            assert!(check_app_name(bad).is_err(), "{bad:?}");
        }
    }
}
