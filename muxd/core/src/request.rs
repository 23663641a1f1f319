//! What apps ask of the pool, and what the pool asks of its driver.

use std::fmt;

use muxd_smp::cert::KeyHash;

use crate::config::redact_address;
use crate::error::PoolError;
use crate::server::ServerKey;

/// The driver's handle for one request; the pool returns it with the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestToken(pub u64);

/// A request from an app that needs an upstream server.
///
/// Local questions (an app's queues, its waiting messages, acknowledging one) are answered
/// at once by [`crate::Pool::queues`], [`crate::Pool::messages`] and [`crate::Pool::ack`].
///
/// `Debug` hides server passwords and message bodies (it shows their length).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolRequest {
    /// Create a receiving queue on `server` (`smp://<keyHash>[:<password>]@host[:port]`).
    CreateQueue {
        /// The server address.
        server: String,
        /// Reach the server over WebSocket instead of plain TLS.
        websocket: bool,
    },
    /// Delete one of the app's queues on its server and forget it.
    DeleteQueue {
        /// The id [`PoolReply::QueueCreated`] gave.
        queue_id: String,
    },
    /// Send `body` to the queue a recipient handed out as `queue_uri`.
    Send {
        /// The recipient's queue URI.
        queue_uri: String,
        /// The message; at most [`crate::MAX_BODY_LEN`] bytes.
        body: Vec<u8>,
        /// Answer only once the server accepted the message ([`PoolReply::Sent`]) instead
        /// of as soon as the pool has it ([`PoolReply::Queued`]).
        wait: bool,
    },
}

impl fmt::Debug for PoolRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateQueue { server, websocket } => f
                .debug_struct("CreateQueue")
                .field("server", &redact_address(server))
                .field("websocket", websocket)
                .finish(),
            Self::DeleteQueue { queue_id } => f
                .debug_struct("DeleteQueue")
                .field("queue_id", queue_id)
                .finish(),
            Self::Send {
                queue_uri,
                body,
                wait,
            } => f
                .debug_struct("Send")
                .field("queue_uri", &redact_address(queue_uri))
                .field("body_len", &body.len())
                .field("wait", wait)
                .finish(),
        }
    }
}

/// A successful answer to a [`PoolRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolReply {
    /// The queue exists on the server and is subscribed on this connection.
    QueueCreated(QueueInfo),
    /// The queue was deleted.
    Deleted,
    /// The server accepted the message.
    Sent {
        /// The pool's id for the message.
        message_id: String,
    },
    /// The pool has the message (and the journal has it, see [`crate::Mailbox::enqueue`]);
    /// it goes out when the server is reachable. Its outcome arrives as
    /// [`PoolEvent::MessageSent`] or [`PoolEvent::MessageFailed`].
    Queued {
        /// The pool's id for the message.
        message_id: String,
    },
}

/// Whether the pool receives a queue's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Subscription {
    /// Messages arrive on this connection.
    Subscribed,
    /// The connection is down; the pool subscribes again when it is back.
    Pending,
    /// Another connection subscribed the queue (`END`); messages go there now.
    Ended,
    /// The queue was deleted on the server (`DELD`, or `ERR AUTH` on SUB).
    Gone,
}

impl Subscription {
    /// `"subscribed"`, `"pending"`, `"ended"` or `"gone"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribed => "subscribed",
            Self::Pending => "pending",
            Self::Ended => "ended",
            Self::Gone => "gone",
        }
    }
}

/// One of an app's queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The pool's id: base64url of the server's recipient id.
    pub queue_id: String,
    /// The server it lives on.
    pub server: ServerKey,
    /// The URI to give a sender.
    pub queue_uri: String,
    /// Messages received and not yet acknowledged by the app.
    pub waiting: usize,
    /// Whether messages arrive.
    pub subscription: Subscription,
    /// The last problem with this queue (a lost connection, an undecryptable message).
    pub last_error: Option<String>,
    /// Messages dropped because they were already delivered: a copy the sender resent after
    /// its OK was lost, or a re-delivery after our ACK was lost.
    pub duplicates_suppressed: u64,
    /// Messages acknowledged and dropped because they carried no muxd app envelope this pool
    /// reads (`docs/envelope.md`).
    pub malformed_rejected: u64,
    /// Confirmations acknowledged and dropped because another sender's confirmation was
    /// accepted first (someone else with the URI tried to take the queue over).
    pub confirmations_rejected: u64,
}

/// Something the driver must do, or pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Open a transport to the server, then call [`crate::Pool::handle_connected`] (or
    /// [`crate::Pool::handle_disconnected`] if it fails).
    Connect {
        /// The connection's key, to pass back.
        server: ServerKey,
        /// Host to dial.
        host: String,
        /// Port to dial.
        port: u16,
        /// The identity the TLS layer must pin.
        key_hash: KeyHash,
        /// Upgrade to WebSocket after TLS.
        websocket: bool,
    },
    /// Write this 16384-byte block to the server's transport.
    Transmit {
        /// The connection.
        server: ServerKey,
        /// The block.
        block: Vec<u8>,
    },
    /// Close the server's transport; the pool has already forgotten the connection.
    Disconnect {
        /// The connection.
        server: ServerKey,
    },
    /// The answer to a request.
    Reply {
        /// The request's token.
        token: RequestToken,
        /// The outcome.
        result: Result<PoolReply, PoolError>,
    },
    /// Something apps may want to know.
    Event(PoolEvent),
}

/// News for apps (the daemon wakes waiting `recv`s and refreshes status watchers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A new message waits in one of the app's queues.
    MessageArrived {
        /// The queue's owner.
        app: String,
        /// The queue.
        queue_id: String,
    },
    /// A queue's subscription changed (ended elsewhere, deleted on the server, lost with its
    /// connection or restored).
    SubscriptionChanged {
        /// The queue's owner.
        app: String,
        /// The queue.
        queue_id: String,
        /// The new state.
        subscription: Subscription,
    },
    /// The server accepted a message an app handed over.
    MessageSent {
        /// The sender.
        app: String,
        /// The pool's id for the message.
        message_id: String,
    },
    /// A message will never be sent (it expired, or the destination refused it for good).
    MessageFailed {
        /// The sender.
        app: String,
        /// The pool's id for the message.
        message_id: String,
        /// Why.
        reason: String,
    },
    /// A server's connection changed state.
    ServerChanged {
        /// The server.
        server: ServerKey,
        /// Its new state.
        state: crate::server::ConnState,
    },
    /// The pool will connect to a server again by itself after `delay`.
    Reconnecting {
        /// The server.
        server: ServerKey,
        /// The backoff delay (jitter included).
        delay: std::time::Duration,
        /// Which retry this is since the last success, from 1.
        attempt: u32,
    },
}
