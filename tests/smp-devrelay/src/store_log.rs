//! The optional append-only store log (`--store-log`): one JSON object per line for every
//! queue creation, securing, suspension, deletion, message and acknowledgement, replayed on
//! start so queues and undelivered messages survive a restart.
//!
//! Like the reference server's store log it holds queue secrets in the clear: it is a dev and
//! test tool. Writes are synchronous and unbuffered (one `write` per record) so a killed relay
//! loses at most the record being written; a torn last line is skipped on replay.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One logged change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Record {
    New {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
        #[serde(with = "b64")]
        snd_id: Vec<u8>,
        #[serde(with = "b64")]
        rcv_key: Vec<u8>,
        #[serde(with = "b64")]
        rcv_dh_secret: Vec<u8>,
        #[serde(with = "b64_opt", default)]
        snd_key: Option<Vec<u8>>,
        mode: Option<char>,
    },
    Secure {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
        #[serde(with = "b64")]
        snd_key: Vec<u8>,
    },
    Off {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
    },
    Del {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
    },
    Msg {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
        #[serde(with = "b64")]
        msg_id: Vec<u8>,
        ts: i64,
        /// `None` marks the QUOTA marker.
        notification: Option<bool>,
        #[serde(with = "b64")]
        body: Vec<u8>,
    },
    Ack {
        #[serde(with = "b64")]
        rcv_id: Vec<u8>,
        #[serde(with = "b64")]
        msg_id: Vec<u8>,
    },
}

/// An open store log.
#[derive(Debug)]
pub(crate) struct StoreLog {
    file: File,
    path: PathBuf,
}

impl StoreLog {
    /// Reads every intact record of `path` (missing file: none) and opens it for appending.
    pub(crate) fn open(path: &Path) -> io::Result<(Self, Vec<Record>)> {
        let mut records = Vec::new();
        match File::open(path) {
            Ok(f) => {
                for (n, line) in BufReader::new(f).lines().enumerate() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str(&line) {
                        Ok(r) => records.push(r),
                        Err(e) => {
                            tracing::warn!(line = n + 1, error = %e, "store log: record skipped")
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok((
            Self {
                file,
                path: path.to_owned(),
            },
            records,
        ))
    }

    /// Appends one record. A failed write is logged, not fatal: the relay keeps serving from
    /// memory, as losing durability is better than dropping clients in a test setup.
    pub(crate) fn append(&mut self, record: &Record) {
        let result = serde_json::to_vec(record)
            .map_err(io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                self.file.write_all(&line)
            });
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), error = %e, "store log write failed");
        }
    }
}

mod b64 {
    use muxd_smp::encoding::{base64url_decode, base64url_encode};
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64url_encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64url_decode(&s).map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use muxd_smp::encoding::{base64url_decode, base64url_encode};
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&base64url_encode(v)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| base64url_decode(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}
