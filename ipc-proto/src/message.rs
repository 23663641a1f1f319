//! The messages, as serde data. Every frame body is one JSON object with a `"type"` field.

use serde::{Deserialize, Serialize};

/// A frame sent by a client (a UI process, `muxctl`) to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientMessage {
    /// Must be the first frame on a connection.
    Hello(ClientHello),
    /// A request; the daemon answers with a `response` or an `error` carrying the same id.
    Request(Request),
}

/// The client's opening frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// The IPC protocol version the client speaks; must equal [`crate::PROTO_VERSION`].
    pub proto_version: u32,
    /// The application's name. It scopes the queues and keys the client can see.
    pub app: String,
}

/// A request with the id the client chose for it. Ids are the client's to pick; the daemon
/// echoes them and never interprets them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the matching `response` or `error`.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations a client can ask for. The JSON field `"op"` names the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Op {
    /// The daemon's status: version, pid, uptime, clients, upstream connections.
    Status,
    /// An IPC round trip; `data` comes back unchanged in the `pong`.
    Ping {
        /// Opaque bytes to echo (lets a benchmark choose the message size).
        #[serde(default)]
        data: String,
    },
    /// Subscribe this connection to `status` events: one at once, then on every change and at
    /// least every `interval_ms` (default 1000).
    Watch {
        /// The longest gap between two status events, in milliseconds.
        #[serde(default)]
        interval_ms: Option<u64>,
    },
    /// Ask the daemon to shut down gracefully.
    Shutdown,
}

/// A frame sent by the daemon to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerMessage {
    /// The answer to the client's hello; the first frame the daemon sends.
    Hello(ServerHello),
    /// A successful answer to a request.
    Response(Response),
    /// A failed request (with its id), or a connection-level error (without an id) after which
    /// the daemon closes the connection.
    Error(ErrorFrame),
    /// Something the client subscribed to happened.
    Event(Event),
}

/// The daemon's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// The IPC protocol version the daemon speaks.
    pub proto_version: u32,
    /// The daemon's own version (its crate version).
    pub daemon_version: String,
    /// The daemon's process id.
    pub pid: u32,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The answer; the JSON field `"reply"` names the variant.
    #[serde(flatten)]
    pub reply: Reply,
}

/// The answers, one per [`Op`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reply {
    /// Answer to `status`.
    Status(StatusReport),
    /// Answer to `ping`.
    Pong {
        /// The request's `data`, unchanged.
        #[serde(default)]
        data: String,
    },
    /// Answer to `watch`: `status` events follow.
    Watching,
    /// Answer to `shutdown`: a `shutting_down` event follows, then the daemon closes.
    ShuttingDown,
}

/// An error, with a stable machine-readable code and a human-readable message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The failed request's id; absent for a connection-level error, which is followed by the
    /// daemon closing the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people. Not stable: match on `code`.
    pub message: String,
}

/// Stable error codes. New codes may be added; a client that does not know a code sees
/// [`ErrorCode::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame was not valid JSON or not a known message.
    MalformedFrame,
    /// A frame's length exceeded [`crate::MAX_FRAME_LEN`].
    FrameTooLarge,
    /// The hello named a protocol version the daemon does not speak.
    UnsupportedVersion,
    /// The first frame was not a hello, or a second hello came.
    HelloRequired,
    /// The client did not read its frames fast enough and was disconnected.
    SlowConsumer,
    /// The daemon is shutting down.
    ShuttingDown,
    /// The peer is not allowed to connect (another uid).
    PermissionDenied,
    /// A request's argument was invalid.
    InvalidArgument,
    /// A queue, server or message that the request names does not exist (for this app).
    NotFound,
    /// Too many clients are connected.
    Busy,
    /// The daemon hit an internal error; the request may be retried.
    Internal,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

/// Events pushed by the daemon. The JSON field `"event"` names the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A status snapshot (after `watch`).
    Status(StatusReport),
    /// The daemon is shutting down; the connection closes next.
    ShuttingDown {
        /// Why: `"signal"`, `"request"`.
        reason: String,
    },
}

/// The daemon's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's version.
    pub daemon_version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// IPC clients connected now (including the one asking).
    pub clients: u32,
    /// One entry per upstream server connection.
    #[serde(default)]
    pub upstreams: Vec<UpstreamStatus>,
}

/// One upstream server connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// The server's address as the user gave it (e.g. `smp://<keyHash>@host:port`).
    pub server: String,
    /// `"smp"` or `"grp"`.
    pub profile: String,
    /// `"tls"`, `"websocket"`, `"tcp"`, `"quic"`.
    pub transport: String,
    /// `"idle"`, `"connecting"`, `"handshaking"`, `"up"`, `"backing_off"`, `"lost"`, `"failed"`.
    pub state: String,
    /// Unix time in milliseconds at which the connection entered `state`.
    pub state_since_unix_ms: u64,
    /// The last error seen on this connection, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Queues routed through this connection.
    #[serde(default)]
    pub queues: u32,
}
