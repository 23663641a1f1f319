//! A tiny length-prefixed binary encoding for keys and values.
//!
//! Every table stores raw bytes; the layouts are defined here rather than by a serialization
//! crate so that the on-disk format is explicit and versioned by the schema number alone.

use crate::QueueRef;
use crate::error::StoreError;

/// Appends fixed-width big-endian integers and length-prefixed byte strings.
#[derive(Debug, Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn new() -> Self {
        Self(Vec::new())
    }

    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A byte string with a u32 length prefix. Callers bound their inputs far below 4 GiB (redb
    /// itself refuses values over 3 GiB), so the conversion saturating would only corrupt a value
    /// redb would reject anyway; it is checked regardless.
    pub(crate) fn bytes(mut self, v: &[u8]) -> Result<Self, StoreError> {
        let len =
            u32::try_from(v.len()).map_err(|_| StoreError::InvalidInput("value too large"))?;
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(v);
        Ok(self)
    }

    pub(crate) fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads what [`Writer`] wrote; any shortfall is a [`StoreError::CorruptRecord`].
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::CorruptRecord {
            what: self.what,
            detail: detail.to_owned(),
        }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, StoreError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, StoreError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt("invalid UTF-8"))
    }

    pub(crate) fn fixed<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}

/// Appends a u16-length-prefixed component. Key components are self-delimiting so that
/// concatenated keys sort by their first component, then the next, and a key's prefix
/// identifies exactly one (app, queue) group.
fn push_component(out: &mut Vec<u8>, v: &[u8]) -> Result<(), StoreError> {
    let len = u16::try_from(v.len())
        .map_err(|_| StoreError::InvalidInput("key component over 64 KiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v);
    Ok(())
}

/// `server ‖ queue_id`, each length-prefixed.
pub(crate) fn queue_key(queue: &QueueRef) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(4 + queue.server.len() + queue.queue_id.len());
    push_component(&mut out, queue.server.as_bytes())?;
    push_component(&mut out, &queue.queue_id)?;
    Ok(out)
}

/// The prefix shared by every queue key of one server.
pub(crate) fn server_prefix(server: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(2 + server.len());
    push_component(&mut out, server.as_bytes())?;
    Ok(out)
}

/// A length-prefixed app id, the first component of mailbox keys.
pub(crate) fn app_key(app: &str) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(2 + app.len());
    push_component(&mut out, app.as_bytes())?;
    Ok(out)
}

/// Decodes a queue key, returning the queue and the bytes after it.
pub(crate) fn split_queue_key<'a>(
    key: &'a [u8],
    what: &'static str,
) -> Result<(QueueRef, &'a [u8]), StoreError> {
    let mut r = Reader::new(key, what);
    let slen = r.u16()? as usize;
    let server = r.take(slen)?;
    let server = String::from_utf8(server.to_vec()).map_err(|_| r.corrupt("server not UTF-8"))?;
    let qlen = r.u16()? as usize;
    let queue_id = r.take(qlen)?.to_vec();
    Ok((QueueRef { server, queue_id }, r.rest()))
}

/// Decodes a length-prefixed app id, returning it and the bytes after it.
pub(crate) fn split_app_key<'a>(
    key: &'a [u8],
    what: &'static str,
) -> Result<(String, &'a [u8]), StoreError> {
    let mut r = Reader::new(key, what);
    let len = r.u16()? as usize;
    let app = r.take(len)?;
    let app = String::from_utf8(app.to_vec()).map_err(|_| r.corrupt("app id not UTF-8"))?;
    Ok((app, r.rest()))
}

/// Reads a trailing big-endian u64 (sequence numbers and ids at the end of keys).
pub(crate) fn trailing_u64(rest: &[u8], what: &'static str) -> Result<u64, StoreError> {
    let mut r = Reader::new(rest, what);
    let v = r.u64()?;
    r.finish()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_round_trip_and_group_by_server() {
        let a = QueueRef::new("smp://a", b"q1".to_vec());
        let key = queue_key(&a).unwrap();
        let (back, rest) = split_queue_key(&key, "t").unwrap();
        assert_eq!(back, a);
        assert!(rest.is_empty());
        assert!(key.starts_with(&server_prefix("smp://a").unwrap()));
        // "smp://a" must not be treated as a prefix of "smp://ab".
        let b = QueueRef::new("smp://ab", b"q1".to_vec());
        assert!(
            !queue_key(&b)
                .unwrap()
                .starts_with(&server_prefix("smp://a").unwrap())
        );
    }

    #[test]
    fn reader_reports_truncation() {
        let buf = Writer::new().u32(7).finish();
        let mut r = Reader::new(&buf[..3], "t");
        assert!(matches!(r.u32(), Err(StoreError::CorruptRecord { .. })));
    }
}
