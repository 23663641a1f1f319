//! GRP/1 profile: the post-quantum relay transport, client and relay side (sans-IO).
//!
//! GRP/1 runs a hybrid Noise `IKpsk2` handshake (X25519 plus an ML-KEM-768 secret in the
//! `psk2` slot), then carries SMP v18 batches in fixed 16400-byte records mixed with Poisson
//! cover records. The inner encodings (transmissions, commands, authorizations) are
//! `muxd-smp`'s; this crate adds the handshake, the record layer, the GRP block format,
//! the cover scheduler and the two per-link state machines ([`connection::Connection`] for the
//! initiator, [`relay::RelayLink`] for the responder).
//!
//! What this crate does **not** do: no IO (the driver moves bytes between the carrier and
//! `handle_input`/`poll_transmit`), no clock (every method that needs time takes an
//! `Instant`), and no OS randomness (every RNG is passed in; state machines seed a private
//! ChaCha20 generator from it once). It also does not parse the carrier (TCP, QUIC stream,
//! WebSocket messages) or execute SMP commands: relays decide what to answer.

pub mod address;
pub mod block;
pub mod connection;
pub mod cover;
pub mod error;
pub mod handshake;
pub mod kem;
mod link;
pub mod proxy;
pub mod record;
pub mod relay;

#[cfg(test)]
mod vectors;

use std::time::Duration;

/// `PREAMBLE`: "GRP" and version 1, sent before message 1 on TCP and QUIC.
pub const PREAMBLE: [u8; 4] = *b"GRP\x01";

/// `PROLOGUE`: the Noise prologue, "GRP/1".
pub const PROLOGUE: &[u8] = b"GRP/1";

/// The Noise protocol name (§5.2).
pub const NOISE_PARAMS: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";

/// `HS_LEN`: message 1 and record 2 are both exactly this long.
pub const HS_LEN: usize = 2500;

/// `BLOCK`: the plaintext size of every transport record.
pub const BLOCK: usize = 16384;

/// `RECORD`: a block plus the 16-byte ChaChaPoly tag.
pub const RECORD: usize = BLOCK + 16;

/// `REKEY_EVERY`: records per key, per direction.
pub const REKEY_EVERY: u64 = 1024;

/// `RECORD_LIMIT`: record numbers per direction stay below this (§6.4).
pub const RECORD_LIMIT: u64 = 1 << 48;

/// `INNER_VERSION`: the only inner (SMP) version GRP/1 defines.
pub const INNER_VERSION: u16 = 18;

/// `HS_TIMEOUT`: the whole handshake, on both sides.
pub const HS_TIMEOUT: Duration = Duration::from_secs(30);

/// `FAIL_DELAY`: the relay closes this long after the last byte of a failed message 1.
pub const FAIL_DELAY: Duration = Duration::from_secs(1);

/// `IDLE_TIMEOUT`: a relay says goodbye 0x03 when no record arrived for this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `MAX_AGE`: a session's lifetime, counted from Split.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// A client closes a session this long after [`MAX_AGE`] at the latest.
pub const MAX_AGE_GRACE: Duration = Duration::from_secs(60);

/// After a goodbye, the carrier is hard-closed this long later if the peer has not closed.
pub const CLOSING_LINGER: Duration = Duration::from_secs(5);

/// The side of a link, and the `role` byte of payload 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// `'C'`: a client link (fresh static key per connection).
    Client,
    /// `'R'`: a relay link (the initiating relay's long-term static key).
    Relay,
}

impl Role {
    /// The `role` byte of payload 1.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Client => b'C',
            Self::Relay => b'R',
        }
    }

    /// Parses the `role` byte; anything but `'C'` and `'R'` is `None`.
    pub const fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'C' => Some(Self::Client),
            b'R' => Some(Self::Relay),
            _ => None,
        }
    }
}
