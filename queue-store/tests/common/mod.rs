//! Helpers shared by the integration tests that use real store files.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use muxd_queue_store::{NewOutbound, Passphrase, QueueRef, Store, Unlock};

/// A fixed "now" in unix ms.
pub const NOW: u64 = 1_700_000_000_000;

pub fn pass(p: &str) -> Unlock {
    Unlock::Passphrase(Passphrase::new(p.into()))
}

/// A message for `queue` from app `app` with the default expiry.
pub fn msg(queue: &QueueRef, payload: &[u8]) -> NewOutbound {
    NewOutbound {
        queue: queue.clone(),
        app: "app".into(),
        payload: payload.to_vec(),
        ttl_ms: None,
    }
}

/// A fresh store `store.redb` in `dir`, protected by the passphrase `pw`.
pub fn new_store(dir: &Path) -> (PathBuf, Store) {
    let path = dir.join("store.redb");
    let store = Store::create(&path, &pass("pw")).unwrap();
    (path, store)
}
