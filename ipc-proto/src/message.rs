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
    /// Create a receiving queue on an upstream server, owned by this app.
    QueueCreate {
        /// The server's address, e.g. `smp://<keyHash>@host:port`.
        server: String,
        /// Reach the server over WebSocket instead of plain TLS.
        #[serde(default)]
        websocket: bool,
    },
    /// This app's queues.
    QueueList,
    /// Delete one of this app's queues on its server and forget it.
    QueueDelete {
        /// The id `queue_create` returned.
        queue_id: String,
    },
    /// Send a message to a queue given by its URI (from the recipient). Securing the queue on
    /// first use and the per-queue end-to-end encryption are the daemon's job.
    Send {
        /// The recipient's queue URI (`smp://…/<senderId>#/?v=…&dh=…`).
        queue_uri: String,
        /// The message, base64 (RFC 4648 standard alphabet, padded).
        body_b64: String,
        /// Answer `sent` only once the server accepted the message. By default the answer
        /// is `queued` as soon as the message is durably stored: it goes out (in order)
        /// whenever the server is reachable, and its outcome arrives as a `message` event.
        #[serde(default, skip_serializing_if = "is_false")]
        wait: bool,
    },
    /// Where one of this app's messages is: `queued`, `sending`, `sent` or `failed`.
    MessageStatus {
        /// The `message_id` that `send` returned.
        message_id: String,
    },
    /// Write a sealed backup of the daemon's store to `path` (a new file, mode 0600),
    /// protected like the store (key file or passphrase). See `docs/store.md`.
    Export {
        /// Where to write it; must not exist. Relative paths are relative to the daemon's
        /// working directory, so clients send absolute paths.
        path: String,
    },
    /// Messages received on one of this app's queues and not yet acknowledged by the app,
    /// oldest first.
    Recv {
        /// The id `queue_create` returned.
        queue_id: String,
        /// At most this many messages (default: all waiting).
        #[serde(default)]
        max: Option<u32>,
        /// When none is waiting, wait up to this many milliseconds for one (default 0).
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// The app has the message: the daemon may forget it.
    Ack {
        /// The queue the message came from.
        queue_id: String,
        /// The message's `msg_id` as `recv` gave it.
        msg_id: String,
    },
    /// Drop and re-dial upstream connections now, resetting their backoff (also revives a
    /// server that was given up as `lost`).
    Reconnect {
        /// The server's address; absent means every server.
        #[serde(default)]
        server: Option<String>,
    },
    /// Measure one server's round-trip lag at a high rate while this connection stays open:
    /// `watching`, then a `lag` event per sample.
    Lag {
        /// The server's address as `status` shows it.
        server: String,
        /// Milliseconds between end-to-end pings (default 1000).
        #[serde(default)]
        interval_ms: Option<u64>,
    },
}

/// A frame sent by the daemon to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
// A frame lives only between decode and use; boxing `Event` would change the public API for
// a few hundred bytes on the stack.
#[allow(clippy::large_enum_variant)]
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
    /// Answer to `queue_create`.
    QueueCreated(QueueInfo),
    /// Answer to `queue_list`.
    Queues {
        /// This app's queues.
        queues: Vec<QueueInfo>,
    },
    /// Answer to a request that has nothing to return (`queue_delete`, `ack`).
    Done,
    /// Answer to `send`.
    Sent {
        /// The daemon's id for this outbound message.
        message_id: String,
        /// `"sent"` (the server accepted it) or `"queued"` (it goes out when the server can
        /// be reached).
        state: String,
    },
    /// Answer to `message_status`.
    MessageStatus {
        /// The message.
        message_id: String,
        /// `"queued"`, `"sending"`, `"sent"` or `"failed"`.
        state: String,
        /// Why it failed, or the last retry's reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Answer to `export`: the backup is written and synced.
    Exported {
        /// Where.
        path: String,
    },
    /// Answer to `recv`.
    Messages {
        /// The messages, oldest first.
        messages: Vec<ReceivedMessage>,
    },
}

/// A queue owned by an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// The daemon's id for the queue (base64url of the server's recipient id).
    pub queue_id: String,
    /// The server's address.
    pub server: String,
    /// The URI to hand to a sender.
    pub queue_uri: String,
    /// Messages received and not yet acknowledged by the app.
    #[serde(default)]
    pub waiting: u32,
    /// Copies of already delivered messages the daemon dropped on this queue (a server
    /// re-delivery after a lost ACK, a sender's resend after a lost OK), kept across restarts.
    #[serde(default)]
    pub duplicates_suppressed: u64,
}

/// A message received on a queue, decrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedMessage {
    /// The queue it arrived on.
    pub queue_id: String,
    /// The server's message id, base64url; pass it to `ack`.
    pub msg_id: String,
    /// The server's timestamp (Unix seconds).
    pub ts: i64,
    /// The message, base64 (standard alphabet, padded).
    pub body_b64: String,
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
    /// The upstream server refused the request or could not be reached; the message says
    /// which server and why.
    Upstream,
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
    /// An upstream connection changed state (after `watch`).
    Upstream(UpstreamStatus),
    /// A round-trip sample for a server under `lag`.
    Lag(LagEvent),
    /// One of this app's messages was sent or failed (after `watch`; sent to every
    /// watching connection of the app).
    Message(MessageEvent),
}

/// What became of a message `send` answered with `queued`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// The `message_id` that `send` returned.
    pub message_id: String,
    /// `"sent"` or `"failed"`.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// For `skip_serializing_if` of flags that default to `false`.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !*b
}

/// One lag sample and the server's lag summary after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagEvent {
    /// The server's address.
    pub server: String,
    /// Where the sample came from: `"ping"`, `"command"` or `"tcp"`.
    pub source: String,
    /// The round-trip time, in microseconds.
    pub rtt_us: u64,
    /// Unix time of the sample, in milliseconds.
    pub at_unix_ms: u64,
    /// The summary of the server's recent samples from the same `source`, this one included.
    pub summary: LagSummary,
}

/// Statistics over a server's recent round-trip samples, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagSummary {
    /// Samples in the history.
    pub count: u32,
    /// Smallest sample.
    pub min_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 95th percentile.
    pub p95_us: u64,
    /// Largest sample.
    pub max_us: u64,
    /// Mean.
    pub mean_us: u64,
    /// Mean absolute difference of consecutive samples.
    pub jitter_us: u64,
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Outbound messages waiting for this server.
    #[serde(default)]
    pub pending: u32,
    /// Failed connection attempts since the last success.
    #[serde(default)]
    pub attempt: u32,
    /// Milliseconds until the next connection attempt, while backing off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<u64>,
    /// The latest round-trip sample, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_last_us: Option<u64>,
    /// Summary of recent round-trip samples, when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagSummary>,
    /// GRP facts, for `profile == "grp"` (absent for SMP, so older frames still decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grp: Option<Box<GrpUpstream>>,
}

/// The GRP part of an [`UpstreamStatus`]: cover and real record counters of a relay link,
/// or the proxy of a proxied destination (`transport == "proxy"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpUpstream {
    /// The negotiated cover rate in milli-records per second (links only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cover_rate: Option<u16>,
    /// Records that carried commands, sent (links only).
    #[serde(default)]
    pub real_sent: u64,
    /// Cover records sent.
    #[serde(default)]
    pub cover_sent: u64,
    /// Records that carried responses or events, received.
    #[serde(default)]
    pub real_received: u64,
    /// Cover records received.
    #[serde(default)]
    pub cover_received: u64,
    /// The proxy relay of a proxied destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

impl ErrorCode {
    /// The code as it appears on the wire (`"slow_consumer"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedFrame => "malformed_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::HelloRequired => "hello_required",
            Self::SlowConsumer => "slow_consumer",
            Self::ShuttingDown => "shutting_down",
            Self::PermissionDenied => "permission_denied",
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
