//! Async client for the muxd daemon's local IPC socket.
//!
//! [`Client::connect`] opens the Unix socket, exchanges `hello` frames and checks the protocol
//! version. [`Client::request`] sends one request and waits for the response or error with the
//! same id. Events the daemon pushes in the meantime (after `watch`) are kept, in order, and
//! returned by [`Client::next_event`].
//!
//! The client uses tokio's `UnixStream` directly (features `net` and `io-util` only) rather
//! than `interprocess`, whose tokio support pulls in the runtime, timers and macros. It runs
//! on any tokio runtime the caller provides. It sets no timeouts: wrap calls in
//! `tokio::time::timeout` where a bound is needed.
//!
//! Every method is cancel-safe in the sense that matters for a request/response protocol: if
//! a future is dropped half-way, the bytes already encoded are still sent by the next call, and
//! the late answer to the abandoned request is discarded by id.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures_util::Stream;
use muxd_ipc_proto::{
    ClientHello, ClientMessage, DecodeError, EncodeError, ErrorCode, ErrorFrame, Event,
    FrameDecoder, Op, PROTO_VERSION, QueueInfo, ReceivedMessage, Reply, Request, ServerHello,
    ServerMessage, StatusReport, encode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Size of each socket read. Frames larger than this are assembled over several reads.
const READ_CHUNK: usize = 16 * 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon listens on the socket: the file is missing or the connection was refused
    /// (a stale socket left by a daemon that died).
    #[error("muxd is not running (no socket at {})", path.display())]
    NotRunning {
        /// The socket path that was tried.
        path: PathBuf,
    },
    /// The daemon answered with an error frame.
    #[error("daemon error {code}: {message}")]
    Daemon {
        /// The stable error code.
        code: ErrorCode,
        /// The daemon's explanation, for people.
        message: String,
    },
    /// The daemon speaks another protocol version.
    #[error("daemon speaks IPC protocol version {daemon}, this client speaks {PROTO_VERSION}")]
    UnsupportedVersion {
        /// The version in the daemon's hello.
        daemon: u32,
    },
    /// The daemon sent something this client cannot make sense of.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A request could not be encoded (for example it is larger than a frame may be).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Reading from or writing to the socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The daemon closed the connection before answering.
    #[error("the daemon closed the connection")]
    Closed,
}

impl ClientError {
    /// The daemon's error code, if the daemon sent an error frame.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Daemon { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl From<ErrorFrame> for ClientError {
    fn from(e: ErrorFrame) -> Self {
        Self::Daemon {
            code: e.code,
            message: e.message,
        }
    }
}

/// One connection to the daemon, after a successful hello exchange.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Encoded bytes not yet written; kept across calls so a dropped future cannot leave half
    /// a frame on the wire.
    out: Vec<u8>,
    next_id: u64,
    /// Events read while waiting for a response, oldest first.
    events: VecDeque<Event>,
    hello: ServerHello,
    /// Set once the connection is unusable (EOF, decode error, connection-level error frame).
    done: bool,
}

impl Client {
    /// Connects to the daemon at `path` as application `app` and performs the hello exchange.
    ///
    /// Fails with [`ClientError::NotRunning`] when nothing listens at `path`, with
    /// [`ClientError::UnsupportedVersion`] when the daemon's hello names another version, and
    /// with [`ClientError::Daemon`] when the daemon refuses the hello.
    pub async fn connect(path: impl AsRef<Path>, app: &str) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning {
                        path: path.to_owned(),
                    }
                }
                _ => ClientError::Io(e),
            })?;
        Self::handshake(stream, app).await
    }

    /// Performs the hello exchange over an already connected stream.
    pub async fn handshake(stream: UnixStream, app: &str) -> Result<Self, ClientError> {
        let mut client = Self {
            stream,
            decoder: FrameDecoder::new(),
            out: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            hello: ServerHello {
                proto_version: 0,
                daemon_version: String::new(),
                pid: 0,
            },
            done: false,
        };
        let hello = ClientMessage::Hello(ClientHello {
            proto_version: PROTO_VERSION,
            app: app.to_owned(),
        });
        encode_frame(&hello, &mut client.out)?;
        client.flush().await?;
        match client.read_message().await? {
            Some(ServerMessage::Hello(h)) if h.proto_version == PROTO_VERSION => {
                client.hello = h;
                Ok(client)
            }
            Some(ServerMessage::Hello(h)) => Err(ClientError::UnsupportedVersion {
                daemon: h.proto_version,
            }),
            Some(ServerMessage::Error(e)) => Err(e.into()),
            Some(other) => Err(ClientError::Protocol(format!(
                "expected hello, got {other:?}"
            ))),
            None => Err(ClientError::Closed),
        }
    }

    /// The daemon's hello: its version and pid.
    pub fn server_hello(&self) -> &ServerHello {
        &self.hello
    }

    /// Sends `op` and waits for its answer. Events that arrive first are queued for
    /// [`Client::next_event`].
    pub async fn request(&mut self, op: Op) -> Result<Reply, ClientError> {
        self.ensure_open()?;
        self.flush().await?;
        let id = self.next_id;
        self.next_id += 1;
        encode_frame(&ClientMessage::Request(Request { id, op }), &mut self.out)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Some(ServerMessage::Response(r)) if r.id == id => return Ok(r.reply),
                Some(ServerMessage::Error(e)) if e.id == Some(id) => return Err(e.into()),
                Some(ServerMessage::Event(ev)) => self.events.push_back(ev),
                Some(other) => self.unsolicited(other)?,
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// The next event the daemon pushed, or `None` once the daemon closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(Some(ev));
        }
        if self.done {
            return Ok(None);
        }
        // A request abandoned mid-write must still be completed before reading on.
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Some(ServerMessage::Event(ev)) => return Ok(Some(ev)),
                Some(other) => self.unsolicited(other)?,
                None => return Ok(None),
            }
        }
    }

    /// Turns the client into a stream of events that ends when the daemon closes the
    /// connection. An error ends the stream after it is yielded.
    pub fn into_events(self) -> impl Stream<Item = Result<Event, ClientError>> {
        futures_util::stream::unfold(Some(self), |client| async move {
            let mut client = client?;
            match client.next_event().await {
                Ok(Some(ev)) => Some((Ok(ev), Some(client))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// The daemon's status.
    pub async fn status(&mut self) -> Result<StatusReport, ClientError> {
        match self.request(Op::Status).await? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected("status", &other)),
        }
    }

    /// One IPC round trip; returns the data the daemon echoed.
    pub async fn ping(&mut self, data: String) -> Result<String, ClientError> {
        match self.request(Op::Ping { data }).await? {
            Reply::Pong { data } => Ok(data),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Subscribes to status events; read them with [`Client::next_event`].
    pub async fn watch(&mut self, interval_ms: Option<u64>) -> Result<(), ClientError> {
        match self.request(Op::Watch { interval_ms }).await? {
            Reply::Watching => Ok(()),
            other => Err(unexpected("watching", &other)),
        }
    }

    /// Asks the daemon to shut down. A `shutting_down` event and the end of the connection
    /// follow.
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        match self.request(Op::Shutdown).await? {
            Reply::ShuttingDown => Ok(()),
            other => Err(unexpected("shutting_down", &other)),
        }
    }

    /// Creates a receiving queue on `server` (an `smp://…` address), owned by this app.
    pub async fn queue_create(
        &mut self,
        server: String,
        websocket: bool,
    ) -> Result<QueueInfo, ClientError> {
        match self.request(Op::QueueCreate { server, websocket }).await? {
            Reply::QueueCreated(q) => Ok(q),
            other => Err(unexpected("queue_created", &other)),
        }
    }

    /// This app's queues.
    pub async fn queue_list(&mut self) -> Result<Vec<QueueInfo>, ClientError> {
        match self.request(Op::QueueList).await? {
            Reply::Queues { queues } => Ok(queues),
            other => Err(unexpected("queues", &other)),
        }
    }

    /// Deletes one of this app's queues.
    pub async fn queue_delete(&mut self, queue_id: String) -> Result<(), ClientError> {
        match self.request(Op::QueueDelete { queue_id }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }

    /// Sends `body` to the queue named by `queue_uri`; returns the daemon's message id and its
    /// state, normally `"queued"`: the daemon has stored the message durably and sends it
    /// whenever the server is reachable. Its outcome arrives later as an [`Event::Message`]
    /// (after [`Client::watch`]) and can be asked for with [`Client::message_status`].
    pub async fn send(
        &mut self,
        queue_uri: String,
        body: &[u8],
    ) -> Result<(String, String), ClientError> {
        self.send_op(queue_uri, body, false).await
    }

    /// Like [`Client::send`], but answers only once the server accepted the message, with
    /// state `"sent"`. While the server is unreachable this waits; bound it with
    /// `tokio::time::timeout` if needed (the message stays queued either way).
    pub async fn send_wait(
        &mut self,
        queue_uri: String,
        body: &[u8],
    ) -> Result<(String, String), ClientError> {
        self.send_op(queue_uri, body, true).await
    }

    async fn send_op(
        &mut self,
        queue_uri: String,
        body: &[u8],
        wait: bool,
    ) -> Result<(String, String), ClientError> {
        let body_b64 = base64::engine::general_purpose::STANDARD.encode(body);
        let op = Op::Send {
            queue_uri,
            body_b64,
            wait,
        };
        match self.request(op).await? {
            Reply::Sent { message_id, state } => Ok((message_id, state)),
            other => Err(unexpected("sent", &other)),
        }
    }

    /// Where one of this app's messages is: `"queued"`, `"sending"`, `"sent"` or `"failed"`.
    pub async fn message_status(
        &mut self,
        message_id: String,
    ) -> Result<MessageStatus, ClientError> {
        match self.request(Op::MessageStatus { message_id }).await? {
            Reply::MessageStatus {
                message_id,
                state,
                error,
            } => Ok(MessageStatus {
                message_id,
                state,
                error,
            }),
            other => Err(unexpected("message_status", &other)),
        }
    }

    /// Asks the daemon to write a sealed backup of its store to `path`, a file that must not
    /// exist yet. The daemon resolves a relative path against its own working directory, so
    /// this makes `path` absolute (against the caller's) first. Returns where the daemon
    /// wrote it.
    pub async fn export(&mut self, path: &Path) -> Result<PathBuf, ClientError> {
        let path = std::path::absolute(path)?;
        let path = path
            .to_str()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("backup path {} is not UTF-8", path.display()),
                )
            })?
            .to_owned();
        match self.request(Op::Export { path }).await? {
            Reply::Exported { path } => Ok(PathBuf::from(path)),
            other => Err(unexpected("exported", &other)),
        }
    }

    /// Messages waiting on one of this app's queues, oldest first: at most `max`, waiting up
    /// to `wait_ms` for one when none is there.
    pub async fn recv(
        &mut self,
        queue_id: String,
        max: Option<u32>,
        wait_ms: Option<u64>,
    ) -> Result<Vec<ReceivedMessage>, ClientError> {
        let op = Op::Recv {
            queue_id,
            max,
            wait_ms,
        };
        match self.request(op).await? {
            Reply::Messages { messages } => Ok(messages),
            other => Err(unexpected("messages", &other)),
        }
    }

    /// Tells the daemon the app has message `msg_id` of `queue_id`; the daemon forgets it.
    pub async fn ack(&mut self, queue_id: String, msg_id: String) -> Result<(), ClientError> {
        match self.request(Op::Ack { queue_id, msg_id }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }

    fn ensure_open(&self) -> Result<(), ClientError> {
        if self.done {
            Err(ClientError::Closed)
        } else {
            Ok(())
        }
    }

    /// Handles a frame nobody is waiting for.
    fn unsolicited(&mut self, msg: ServerMessage) -> Result<(), ClientError> {
        match msg {
            // The answer to a request whose future was dropped: nobody wants it any more.
            ServerMessage::Response(_) | ServerMessage::Error(ErrorFrame { id: Some(_), .. }) => {
                Ok(())
            }
            // A connection-level error; the daemon closes the connection after it.
            ServerMessage::Error(e) => {
                self.done = true;
                Err(e.into())
            }
            ServerMessage::Event(ev) => {
                self.events.push_back(ev);
                Ok(())
            }
            other => {
                self.done = true;
                Err(ClientError::Protocol(format!("unexpected {other:?}")))
            }
        }
    }

    /// Writes everything in `out`. Cancel-safe: written bytes are removed as they go.
    async fn flush(&mut self) -> Result<(), ClientError> {
        while !self.out.is_empty() {
            let n = self.stream.write(&self.out).await?;
            if n == 0 {
                self.done = true;
                return Err(ClientError::Closed);
            }
            self.out.drain(..n);
        }
        Ok(())
    }

    /// Reads the next whole frame; `None` on a clean end of stream. Cancel-safe: bytes read
    /// are kept in the decoder.
    async fn read_message(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match self.decoder.next::<ServerMessage>() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Err(e.into());
                }
            }
            if self.done {
                return Ok(None);
            }
            let n = match self.stream.read(&mut chunk).await {
                Ok(n) => n,
                // The daemon may reset the connection right after its last frame (for
                // example when it drops a slow consumer); that is an end, not an IO failure.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                self.done = true;
                if self.decoder.buffered() > 0 {
                    return Err(ClientError::Protocol(
                        "connection closed in the middle of a frame".into(),
                    ));
                }
                return Ok(None);
            }
            self.decoder.extend(&chunk[..n]);
        }
    }
}

/// The answer to [`Client::message_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MessageStatus {
    /// The message.
    pub message_id: String,
    /// `"queued"`, `"sending"`, `"sent"` or `"failed"`.
    pub state: String,
    /// Why it failed, or the reason of the last retry.
    pub error: Option<String>,
}

fn unexpected(wanted: &str, got: &Reply) -> ClientError {
    ClientError::Protocol(format!("expected a {wanted} reply, got {got:?}"))
}
