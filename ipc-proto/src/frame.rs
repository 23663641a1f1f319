//! Length-delimited JSON frames.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame body either side accepts, in bytes (the 4-byte header not included).
///
/// The largest legitimate message carries one SMP message body (at most 16 KiB, base64-encoded
/// inside JSON) plus metadata, or a status report for a few thousand upstream servers; 1 MiB
/// leaves ample room for both while bounding what a hostile peer can make us buffer.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Length of the frame header: a big-endian `u32` body length.
pub(crate) const HEADER_LEN: usize = 4;

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// serde_json refused the value.
    #[error("cannot encode message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Why bytes could not be decoded into a message. Any of these ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header announces a body larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The body is not valid JSON, or not a message this version knows.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Appends one frame holding `msg` to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = serde_json::to_writer(&mut *out, msg) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge(len));
    }
    // len <= MAX_FRAME_LEN < u32::MAX
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more; this is not an
/// error), or the message and the number of bytes it used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge(len));
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(Some((msg, HEADER_LEN + len)))
}

/// Accumulates bytes from a stream and yields whole messages.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the peer.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole message out of the buffer, if there is one.
    // Not an Iterator: it is generic over the message type and fallible.
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        match decode_frame(&self.buf)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
