//! The upstream pool of muxd (sans-IO).
//!
//! [`Pool`] holds one SMP connection per server and carries every app's queues over it:
//! creating and deleting queues, securing and sending to other apps' queues with the
//! per-queue end-to-end encryption, receiving, decrypting and keeping messages until the
//! app acknowledges them.
//!
//! Inside the e2e envelope every message carries muxd's app [`Envelope`]: a per-queue
//! sender seq that turns SMP's at-least-once SEND (a resend after a lost OK stores a second
//! copy) into exactly-once, in-order delivery to apps (`docs/envelope.md`).
//!
//! This crate does **no** IO, reads **no** clock and draws **no** randomness by itself. The
//! daemon passes in app requests, transport events and blocks, the current `Instant` and an
//! RNG, and carries out the [`Action`]s the pool asks for (connect, write a block, close,
//! reply). It does not know the IPC wire types either: the daemon maps [`PoolRequest`],
//! [`PoolReply`] and [`PoolError`] to and from them.

#![warn(missing_docs)]

mod config;
mod deadline;
mod envelope;
mod error;
mod mailbox;
mod persist;
mod pool;
mod queue;
mod request;
mod sender;
mod server;

pub use config::{PoolConfig, ServerPolicy};
pub use envelope::{
    ENVELOPE_OVERHEAD, ENVELOPE_TAG, ENVELOPE_VERSION, Envelope, EnvelopeError, SeqWindow,
};
pub use error::PoolError;
pub use mailbox::{Delivery, Mailbox, MemoryMailbox, REMEMBERED_ACKS, ReceivedMessage};
pub use persist::{MessageOutcome, SavedMessage, SavedQueue, SavedSender};
pub use pool::grp::{GrpConfig, GrpCounters, GrpSession, GrpStatus};
pub use pool::{MAX_BODY_LEN, Pool};
pub use request::{
    Action, PoolEvent, PoolReply, PoolRequest, QueueInfo, RequestToken, Subscription,
};
pub use server::{ConnState, ServerKey, ServerStatus, Transport, TransportInfo};

/// The lag types of [`Pool::lag`] and [`ServerStatus::lag`], re-exported for drivers.
pub use muxd_profile_core::{BackoffConfig, Jitter, LagHistory, LagSample, LagSource, LagSummary};
