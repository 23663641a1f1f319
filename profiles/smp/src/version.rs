//! SMP protocol ("relay") versions that change the wire format (§1.1).
//!
//! Versions are plain `u16`s, as on the wire (`W16`); these constants name the gates.

/// Lowest version current servers accept; NEW carries a subscribe mode.
pub const MIN: u16 = 6;
/// Implied session id, X25519 authenticators, certKey in ServerHello.
pub const AUTH_CMDS: u16 = 7;
/// SMP proxy commands (PRXY/PFWD).
pub const SENDING_PROXY: u16 = 8;
/// SKEY; `sndSecure` in NEW and IDS.
pub const SND_AUTH_KEY: u16 = 9;
/// DELD event (older clients get END).
pub const DELETED_EVENT: u16 = 10;
/// Transport block encryption.
pub const ENCRYPTED_BLOCK: u16 = 11;
/// `ERR BLOCKED` (older clients get `ERR AUTH`).
pub const BLOCKED_ENTITY: u16 = 12;
/// ClientHello gains `proxyServer`.
pub const PROXY_SERVER_HANDSHAKE: u16 = 14;
/// Short links: QueueReqData in NEW, queue mode and link id in IDS, LSET/LDEL/LKEY/LGET/RKEY.
pub const SHORT_LINKS: u16 = 15;
/// Service certificates: the service-signature slot after a non-empty auth, SOK, SUBS/NSUBS.
pub const SERVICE_CERTS: u16 = 16;
/// Notifier credentials in NEW and IDS.
pub const NEW_NTF_CREDS: u16 = 17;
/// Client notices in `ERR BLOCKED`.
pub const CLIENT_NOTICES: u16 = 18;
/// Newest version this crate speaks.
pub const MAX: u16 = 18;
