//! The muxd local IPC protocol.
//!
//! This crate holds the messages that UI processes and the daemon exchange, as plain serde
//! data, and the frame codec. It does no IO, knows nothing of tokio (except for the optional
//! `codec` feature) and nothing of the upstream protocols: wire stability here is not tied to
//! profile internals.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON holding one
//! message object. The first frame in each direction is a `hello`. See `docs/ipc.md` for the
//! byte-level description.

#[cfg(feature = "codec")]
mod codec;
mod frame;
mod message;
mod path;

#[cfg(feature = "codec")]
pub use codec::{ClientCodec, CodecError, ServerCodec};
pub use frame::{
    DecodeError, EncodeError, FrameDecoder, MAX_FRAME_LEN, decode_frame, encode_frame,
};
pub use message::*;
pub use path::{SOCKET_FILE_NAME, default_socket_path};

/// The protocol version this crate speaks. A daemon refuses a `hello` with another version.
pub const PROTO_VERSION: u32 = 1;
