//! SMP binary encoding primitives (§6.1–6.3 of the spec digest).
//!
//! Decoding goes through [`Parser`], a cursor over a borrowed slice that returns
//! [`DecodeError`] instead of panicking, whatever the input. Encoding functions append to a
//! caller-owned `Vec<u8>` so the hot path does not allocate per field.

use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};

/// The pad byte of [`pad`]: `'#'`.
pub const PAD_BYTE: u8 = b'#';

/// Largest payload a `ss()` (shortString) can carry: its length is one byte.
pub const MAX_SHORT_STRING: usize = u8::MAX as usize;

/// Largest payload a `L()` (Large) can carry: its length is a big-endian `u16`.
pub const MAX_LARGE: usize = u16::MAX as usize;

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before a field was complete.
    #[error("input ended while reading {what}: need {needed} more bytes")]
    UnexpectedEnd {
        /// The field being read.
        what: &'static str,
        /// How many bytes were still needed.
        needed: usize,
    },
    /// A strict parse found bytes after the last field.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A byte did not match any allowed value for the field.
    #[error("invalid {what}: byte 0x{byte:02x}")]
    InvalidByte {
        /// The field being read.
        what: &'static str,
        /// The offending byte.
        byte: u8,
    },
    /// A field was well-formed bytes but not an acceptable value.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Why an encode failed (only length limits can be violated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field is longer than its length prefix can express, or than the pad target allows.
    #[error("{what} too long: {len} bytes, at most {max}")]
    TooLong {
        /// The field being written.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The item does not exist at the negotiated protocol version.
    #[error("{what} is not available at version {version}")]
    Unsupported {
        /// The item.
        what: &'static str,
        /// The negotiated version.
        version: u16,
    },
}

/// A cursor over borrowed bytes. Every read either returns a value and advances, or returns an
/// error; after an error the position is unspecified and the parser should be dropped.
#[derive(Debug, Clone)]
pub struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    /// Starts a parser at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// True when every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The unconsumed bytes, without consuming them.
    pub fn peek_rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// The next byte, without consuming it.
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Takes exactly `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.take(n, "bytes")
    }

    /// Takes exactly `N` raw bytes as an array (nonces, ids of fixed size).
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, "fixed-size field")?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "byte")?[0])
    }

    /// A big-endian `Word16`.
    pub fn w16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2, "Word16")?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    /// A big-endian `Word32`.
    pub fn w32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }

    /// A big-endian two's complement `Int64`.
    pub fn int64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array::<8>()?))
    }

    /// `ss(x)`: one length byte and that many bytes.
    pub fn short_string(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.u8()?);
        self.take(n, "shortString")
    }

    /// `L(x)`: a `Word16` length and that many bytes.
    pub fn large(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::from(self.w16()?);
        self.take(n, "Large")
    }

    /// The raw rest of the input (`Tail`); never fails.
    pub fn tail(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    /// `'T'` or `'F'`.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            b'T' => Ok(true),
            b'F' => Ok(false),
            byte => Err(DecodeError::InvalidByte { what: "Bool", byte }),
        }
    }

    /// Consumes `expected` exactly, or fails.
    pub fn literal(&mut self, expected: &'static [u8]) -> Result<(), DecodeError> {
        let got = self.take(expected.len(), "literal")?;
        if got == expected {
            Ok(())
        } else {
            Err(DecodeError::Invalid("literal"))
        }
    }

    /// One ASCII space, the separator between a tag and its parameters.
    pub fn space(&mut self) -> Result<(), DecodeError> {
        match self.u8()? {
            b' ' => Ok(()),
            byte => Err(DecodeError::InvalidByte {
                what: "space",
                byte,
            }),
        }
    }

    /// `Maybe a`: `'0'` is `None`, `'1'` is followed by `a` as read by `f`.
    pub fn maybe<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        match self.u8()? {
            b'0' => Ok(None),
            b'1' => f(self).map(Some),
            byte => Err(DecodeError::InvalidByte {
                what: "Maybe",
                byte,
            }),
        }
    }

    /// Strict end: fails when bytes remain.
    pub fn end(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rem = self.remaining();
        if n > rem {
            return Err(DecodeError::UnexpectedEnd {
                what,
                needed: n - rem,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

/// Appends `ss(bytes)`; fails when `bytes` is longer than 255.
pub fn put_short_string(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), EncodeError> {
    let len = u8::try_from(bytes.len()).map_err(|_| EncodeError::TooLong {
        what: "shortString",
        len: bytes.len(),
        max: MAX_SHORT_STRING,
    })?;
    out.push(len);
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends `L(bytes)`; fails when `bytes` is longer than 65535.
pub fn put_large(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::TooLong {
        what: "Large",
        len: bytes.len(),
        max: MAX_LARGE,
    })?;
    put_w16(out, len);
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends a big-endian `Word16`.
pub fn put_w16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends a big-endian `Int64`.
pub fn put_int64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends `'T'` or `'F'`.
pub fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { b'T' } else { b'F' });
}

/// Appends `Maybe a`: `'0'`, or `'1'` followed by whatever `f` writes.
pub fn put_maybe<T>(
    out: &mut Vec<u8>,
    v: Option<T>,
    f: impl FnOnce(&mut Vec<u8>, T) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    match v {
        None => {
            out.push(b'0');
            Ok(())
        }
        Some(x) => {
            out.push(b'1');
            f(out, x)
        }
    }
}

/// Appends `W16(len) || msg || '#'×(n−2−len)`, exactly `n` bytes; fails when `msg` does not fit.
pub fn pad(msg: &[u8], n: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let max = n.saturating_sub(2).min(MAX_LARGE);
    if n < 2 || msg.len() > max {
        return Err(EncodeError::TooLong {
            what: "padded message",
            len: msg.len(),
            max,
        });
    }
    put_large(out, msg)?;
    out.resize(out.len() + (n - 2 - msg.len()), PAD_BYTE);
    Ok(())
}

/// Reads the `W16` length of a padded message and returns that many bytes.
///
/// The pad bytes themselves are not checked: upstream ignores them too, and a peer's choice of
/// filler does not change the meaning.
pub fn unpad(padded: &[u8]) -> Result<&[u8], DecodeError> {
    let mut p = Parser::new(padded);
    let n = usize::from(p.w16()?);
    p.bytes(n)
}

/// base64url (RFC 4648 §5) with `=` padding, as SMP writes it in URIs.
pub fn base64url_encode(bytes: &[u8]) -> String {
    URL_SAFE.encode(bytes)
}

/// Decodes base64url, with or without `=` padding (short links are written unpadded).
pub fn base64url_decode(s: &str) -> Result<Vec<u8>, DecodeError> {
    let trimmed = s.trim_end_matches('=');
    // Reject padding that is longer than any valid encoding could have.
    if s.len() - trimmed.len() > 2 {
        return Err(DecodeError::Invalid("base64url padding"));
    }
    URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| DecodeError::Invalid("base64url"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int64_vector_t2() {
        let mut out = Vec::new();
        put_int64(&mut out, 1_234_567_890_123_456_789);
        assert_eq!(out, [0x11, 0x22, 0x10, 0xf4, 0x7d, 0xe9, 0x81, 0x15]);
        assert_eq!(
            Parser::new(&out).int64().unwrap(),
            1_234_567_890_123_456_789
        );
        // 2022-01-01T10:24:05Z as SystemTime: whole seconds only.
        let mut ts = Vec::new();
        put_int64(&mut ts, 1_641_032_645);
        assert_eq!(ts, 1_641_032_645i64.to_be_bytes());
        let mut neg = Vec::new();
        put_int64(&mut neg, -2);
        assert_eq!(neg, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
    }

    #[test]
    fn short_string_limits() {
        let mut out = Vec::new();
        put_short_string(&mut out, &[7u8; 255]).unwrap();
        assert_eq!(out.len(), 256);
        assert_eq!(out[0], 255);
        assert!(put_short_string(&mut out, &[0u8; 256]).is_err());
        let mut p = Parser::new(&out);
        assert_eq!(p.short_string().unwrap(), &[7u8; 255][..]);
        p.end().unwrap();
        assert!(matches!(
            Parser::new(&[3, 1, 2]).short_string(),
            Err(DecodeError::UnexpectedEnd { needed: 1, .. })
        ));
    }

    #[test]
    fn large_and_maybe_and_bool() {
        let mut out = Vec::new();
        put_large(&mut out, b"abc").unwrap();
        put_maybe(&mut out, Some(b"xy".as_slice()), put_short_string).unwrap();
        put_maybe::<&[u8]>(&mut out, None, put_short_string).unwrap();
        put_bool(&mut out, true);
        assert_eq!(out, b"\x00\x03abc1\x02xy0T");
        let mut p = Parser::new(&out);
        assert_eq!(p.large().unwrap(), b"abc");
        assert_eq!(p.maybe(|p| p.short_string()).unwrap(), Some(&b"xy"[..]));
        assert_eq!(p.maybe(|p| p.short_string()).unwrap(), None);
        assert!(p.bool().unwrap());
        p.end().unwrap();
        assert!(Parser::new(b"2").maybe(|p| p.u8()).is_err());
        assert!(Parser::new(b"t").bool().is_err());
        assert_eq!(Parser::new(b"ab").end(), Err(DecodeError::TrailingBytes(2)));
    }

    #[test]
    fn pad_unpad() {
        let mut out = Vec::new();
        pad(b"hello", 16, &mut out).unwrap();
        assert_eq!(out, b"\x00\x05hello#########");
        assert_eq!(unpad(&out).unwrap(), b"hello");
        let mut full = Vec::new();
        pad(&[1u8; 14], 16, &mut full).unwrap();
        assert_eq!(full.len(), 16);
        assert!(pad(&[1u8; 15], 16, &mut Vec::new()).is_err());
        assert!(unpad(b"\x00\x09short").is_err());
    }

    #[test]
    fn base64url() {
        assert_eq!(base64url_encode(&[0xd7, 0x6d, 0xf8, 0xfb]), "1234-w==");
        assert_eq!(
            base64url_decode("1234-w==").unwrap(),
            [0xd7, 0x6d, 0xf8, 0xfb]
        );
        assert_eq!(
            base64url_decode("1234-w").unwrap(),
            [0xd7, 0x6d, 0xf8, 0xfb]
        );
        assert!(base64url_decode("12+4").is_err());
        assert!(base64url_decode("1234-w===").is_err());
    }
}
