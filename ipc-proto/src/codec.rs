//! tokio-util [`Encoder`]/[`Decoder`] pairs over the frame format of [`crate::encode_frame`].
//!
//! Each side gets its own codec so the type system keeps the directions straight: a client
//! writes [`ClientMessage`]s and reads [`ServerMessage`]s, the daemon the reverse.

use std::io;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::HEADER_LEN;
use crate::{ClientMessage, DecodeError, EncodeError, MAX_FRAME_LEN, ServerMessage, encode_frame};

/// Why a codec could not read or write a frame. Any of these ends the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The underlying stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer sent a frame that could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// The codec a client uses: encodes [`ClientMessage`], decodes [`ServerMessage`].
#[derive(Debug, Default)]
pub struct ClientCodec(FrameCodec<ClientMessage, ServerMessage>);

/// The codec the daemon uses: encodes [`ServerMessage`], decodes [`ClientMessage`].
#[derive(Debug, Default)]
pub struct ServerCodec(FrameCodec<ServerMessage, ClientMessage>);

impl ClientCodec {
    /// A fresh codec.
    pub fn new() -> Self {
        Self::default()
    }
}

impl ServerCodec {
    /// A fresh codec.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The shared implementation, generic over the two directions.
#[derive(Debug)]
struct FrameCodec<E, D> {
    /// Set once the header of an oversize frame was seen: the stream is unusable after that,
    /// and re-reporting the error on every call keeps a caller from resynchronising on garbage.
    failed: Option<usize>,
    _types: PhantomData<fn(E) -> D>,
}

impl<E, D> Default for FrameCodec<E, D> {
    fn default() -> Self {
        Self {
            failed: None,
            _types: PhantomData,
        }
    }
}

impl<E: Serialize, D: DeserializeOwned> FrameCodec<E, D> {
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<D>, CodecError> {
        if let Some(len) = self.failed {
            return Err(DecodeError::TooLarge(len).into());
        }
        let Some(header) = src.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len > MAX_FRAME_LEN {
            // Refuse before buffering any of the body.
            self.failed = Some(len);
            return Err(DecodeError::TooLarge(len).into());
        }
        let total = HEADER_LEN + len;
        if src.len() < total {
            // Reserve once so a large frame does not grow the buffer in many steps.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let msg = serde_json::from_slice(&src[HEADER_LEN..total])
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        src.advance(total);
        Ok(Some(msg))
    }

    fn encode(&mut self, item: &E, dst: &mut BytesMut) -> Result<(), CodecError> {
        // encode_frame writes into a Vec; reusing its size check keeps one definition of a
        // valid frame.
        let mut buf = Vec::new();
        encode_frame(item, &mut buf)?;
        dst.put_slice(&buf);
        Ok(())
    }
}

macro_rules! impl_codec {
    ($codec:ty, $enc:ty, $dec:ty) => {
        impl Decoder for $codec {
            type Item = $dec;
            type Error = CodecError;

            fn decode(&mut self, src: &mut BytesMut) -> Result<Option<$dec>, CodecError> {
                self.0.decode(src)
            }
        }

        impl Encoder<$enc> for $codec {
            type Error = CodecError;

            fn encode(&mut self, item: $enc, dst: &mut BytesMut) -> Result<(), CodecError> {
                self.0.encode(&item, dst)
            }
        }

        impl Encoder<&$enc> for $codec {
            type Error = CodecError;

            fn encode(&mut self, item: &$enc, dst: &mut BytesMut) -> Result<(), CodecError> {
                self.0.encode(item, dst)
            }
        }
    };
}

impl_codec!(ClientCodec, ClientMessage, ServerMessage);
impl_codec!(ServerCodec, ServerMessage, ClientMessage);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientHello, Event, Op, PROTO_VERSION, Request};

    #[test]
    fn client_to_server_round_trip_in_pieces() {
        let msgs = vec![
            ClientMessage::Hello(ClientHello {
                proto_version: PROTO_VERSION,
                app: "app".into(),
            }),
            ClientMessage::Request(Request {
                id: 1,
                op: Op::Ping {
                    data: "x".repeat(5000),
                },
            }),
        ];
        let mut wire = BytesMut::new();
        let mut client = ClientCodec::new();
        for m in &msgs {
            client.encode(m, &mut wire).unwrap();
        }
        let mut server = ServerCodec::new();
        let mut got = Vec::new();
        let mut src = BytesMut::new();
        // Feed in uneven chunks to exercise the partial-frame path.
        for chunk in wire.chunks(7) {
            src.extend_from_slice(chunk);
            while let Some(m) = server.decode(&mut src).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert!(src.is_empty());
    }

    #[test]
    fn oversize_header_is_refused_without_the_body() {
        let mut server = ClientCodec::new();
        let mut src = BytesMut::new();
        src.put_u32(MAX_FRAME_LEN as u32 + 1);
        let err = server.decode(&mut src).unwrap_err();
        assert!(
            matches!(err, CodecError::Decode(DecodeError::TooLarge(n)) if n == MAX_FRAME_LEN + 1)
        );
        // Nothing was reserved for the body, and the codec stays failed.
        assert!(src.capacity() < 1024);
        src.extend_from_slice(&[0, 0, 0, 2, b'{', b'}']);
        assert!(server.decode(&mut src).is_err());
    }

    #[test]
    fn server_encodes_what_client_decodes() {
        let ev = ServerMessage::Event(Event::ShuttingDown {
            reason: "request".into(),
        });
        let mut wire = BytesMut::new();
        ServerCodec::new().encode(ev.clone(), &mut wire).unwrap();
        let mut client = ClientCodec::new();
        assert_eq!(client.decode(&mut wire).unwrap(), Some(ev));
        assert_eq!(client.decode(&mut wire).unwrap(), None);
    }
}
