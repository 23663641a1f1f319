//! Link errors (§14.3) and what the caller should do after each (§14.2).
//!
//! A goodbye from the peer is not an error: it arrives as
//! [`CloseReason::Goodbye`](crate::connection::CloseReason) with its [`GoodbyeReason`].

use muxd_smp::error::{BrokerError, HandshakeFailure, TransportError};

use crate::block::GoodbyeReason;

/// What the caller should do after a link ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reconnect {
    /// Reconnect at once (session age, record limit).
    Now,
    /// Reconnect with the caller's backoff policy (network trouble, relay shutdown, overload,
    /// protocol violations).
    Backoff,
    /// Reconnect only when there is work for this relay (normal close, idle).
    IfWork,
    /// Reconnecting to the same address will fail the same way: the configuration is wrong
    /// (wrong relay key, no common version).
    Never,
}

/// Why a record or block was rejected (category BLOCK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockFault {
    /// The record did not authenticate: the stream can no longer be trusted.
    Decrypt,
    /// The block's `W16` length is neither 0, 1..=16382 nor 0xFFFF.
    Length(u16),
}

/// Why a link ended with an error (the local categories of §14.3, plus client-side liveness).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrpError {
    /// The carrier closed (or failed) before record 2 was checked.
    #[error("carrier closed before the handshake completed")]
    Network,
    /// The handshake deadline (30 s) passed.
    #[error("handshake deadline passed")]
    Timeout,
    /// Message 2 did not authenticate: wrong relay key, or record 2 was tampered with.
    #[error("relay failed to prove its identity (message 2 did not authenticate)")]
    HandshakeIdentity,
    /// Payload 2 authenticated but is malformed or out of range.
    #[error("invalid payload 2: {0}")]
    HandshakeParse(&'static str),
    /// The relay's inner version range does not meet ours.
    #[error("no common inner version: ours {ours:?}, relay's {theirs:?}")]
    Version {
        /// Our `(min, max)`.
        ours: (u16, u16),
        /// The relay's `(min, max)`.
        theirs: (u16, u16),
    },
    /// A record failed to decrypt, or a block had an invalid length.
    #[error("bad record: {0:?}")]
    Block(BlockFault),
    /// The peer violated the protocol in a way that ends the link (a malformed batch from a
    /// relay; data after a goodbye).
    #[error("protocol violation by the peer: {0}")]
    Protocol(&'static str),
    /// Two consecutive PINGs went unanswered.
    #[error("no PONG to two consecutive PINGs")]
    DeadLink,
    /// The session outlived `MAX_AGE` plus the grace period without the caller replacing it.
    #[error("session reached its maximum age")]
    SessionAge,
    /// The record counter reached the configured limit (§6.4).
    #[error("record limit reached")]
    RecordLimit,
}

impl GrpError {
    /// What to do next.
    pub fn reconnect(&self) -> Reconnect {
        match self {
            Self::HandshakeIdentity | Self::Version { .. } | Self::HandshakeParse(_) => {
                Reconnect::Never
            }
            Self::SessionAge | Self::RecordLimit => Reconnect::Now,
            Self::Network | Self::Timeout | Self::Block(_) | Self::Protocol(_) | Self::DeadLink => {
                Reconnect::Backoff
            }
        }
    }

    /// The SMP `transportErr` this category is reported as, when it has one.
    pub fn transport_error(&self) -> Option<TransportError> {
        match self {
            Self::HandshakeIdentity => Some(TransportError::Handshake(HandshakeFailure::Identity)),
            Self::HandshakeParse(_) => Some(TransportError::Handshake(HandshakeFailure::Parse)),
            Self::Version { .. } => Some(TransportError::Version),
            Self::Block(_) => Some(TransportError::Block),
            Self::Network
            | Self::Timeout
            | Self::Protocol(_)
            | Self::DeadLink
            | Self::SessionAge
            | Self::RecordLimit => None,
        }
    }

    /// The `brokerErr` a proxy answers PRXY with when its relay link failed this way (§10.2).
    pub fn broker_error(&self) -> BrokerError {
        match (self, self.transport_error()) {
            (Self::Timeout, _) => BrokerError::Timeout,
            (_, Some(t)) => BrokerError::Transport(t),
            (_, None) => BrokerError::Network(None),
        }
    }
}

impl GoodbyeReason {
    /// What the receiver of this goodbye should do (§14.2).
    pub fn reconnect(&self) -> Reconnect {
        match self {
            Self::SessionAge | Self::RecordLimit => Reconnect::Now,
            Self::Shutdown | Self::Protocol | Self::Overload => Reconnect::Backoff,
            Self::Normal | Self::Idle | Self::Other(_) => Reconnect::IfWork,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(GrpError::HandshakeIdentity.reconnect(), Reconnect::Never);
        assert_eq!(
            GrpError::Block(BlockFault::Decrypt).broker_error(),
            BrokerError::Transport(TransportError::Block)
        );
        assert_eq!(GrpError::Timeout.broker_error(), BrokerError::Timeout);
        assert_eq!(GrpError::Network.broker_error(), BrokerError::Network(None));
        assert_eq!(
            GrpError::HandshakeParse("x").broker_error(),
            BrokerError::Transport(TransportError::Handshake(HandshakeFailure::Parse))
        );
        assert_eq!(GoodbyeReason::SessionAge.reconnect(), Reconnect::Now);
        assert_eq!(GoodbyeReason::Other(9).reconnect(), Reconnect::IfWork);
        assert_eq!(GoodbyeReason::Overload.reconnect(), Reconnect::Backoff);
    }
}
