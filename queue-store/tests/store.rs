//! Behaviour of the real store on real files: durability, group commit, the mailbox, damaged
//! and foreign files, secrets at rest, key files, backups.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};

use muxd_queue_store::{
    Batch, Delivered, GroupCommitter, MessageState, NewOutbound, QueueRecord, QueueRef,
    SecretBytes, Store, StoreError, StoreOptions, Unlock, create_key_file,
};

mod common;

use common::{NOW, msg, new_store, pass};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

mod durability {
    use super::*;

    #[test]
    fn queue_survives_reopen_and_in_flight_is_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let qa = QueueRef::new("smp://a", b"qa".to_vec());
        let qb = QueueRef::new("smp://b", b"qb".to_vec());
        let a1 = store.enqueue(&msg(&qa, b"a1"), NOW).unwrap();
        let a2 = store.enqueue(&msg(&qa, b"a2"), NOW).unwrap();
        let b1 = store.enqueue(&msg(&qb, b"b1"), NOW).unwrap();
        let leased = store.lease(&qa, 1, NOW).unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(
            (leased[0].id, leased[0].payload.as_slice()),
            (a1, &b"a1"[..])
        );
        assert_eq!(
            store.state(a1).unwrap().unwrap().state,
            MessageState::Sending
        );
        drop(store);

        let store = Store::open(&path, &pass("pw")).unwrap();
        let s = store.state(a1).unwrap().unwrap();
        assert_eq!((s.state, s.attempts), (MessageState::Queued, 1));
        assert_eq!(store.pending_count("smp://a").unwrap(), 2);
        assert_eq!(store.pending_count("smp://b").unwrap(), 1);
        let leased = store.lease(&qa, 10, NOW).unwrap();
        let got: Vec<_> = leased
            .iter()
            .map(|l| (l.id, l.attempt, l.payload.clone()))
            .collect();
        assert_eq!(got, vec![(a1, 2, b"a1".to_vec()), (a2, 1, b"a2".to_vec())]);
        store.ack_sent(a1, NOW).unwrap();
        drop(store);

        let store = Store::open(&path, &pass("pw")).unwrap();
        assert_eq!(store.state(a1).unwrap().unwrap().state, MessageState::Sent);
        assert_eq!(
            store.state(a2).unwrap().unwrap().state,
            MessageState::Queued
        );
        assert_eq!(
            store.state(b1).unwrap().unwrap().state,
            MessageState::Queued
        );
        assert!(matches!(
            store.ack_sent(a1, NOW),
            Err(StoreError::InvalidTransition {
                state: MessageState::Sent,
                ..
            })
        ));
    }

    #[test]
    fn quota_holds_the_queue_and_a_retry_blocks_later_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        let m1 = store.enqueue(&msg(&q, b"1"), NOW).unwrap();
        let m2 = store.enqueue(&msg(&q, b"2"), NOW).unwrap();
        let leased = store.lease(&q, 2, NOW).unwrap();
        assert_eq!(leased.len(), 2);
        let later = NOW + 5 * 60_000;
        store.mark_quota(m1, later).unwrap();
        // m2 is still in flight and may still be accepted.
        store.ack_sent(m2, NOW).unwrap();
        let m3 = store.enqueue(&msg(&q, b"3"), NOW).unwrap();
        assert!(store.lease(&q, 5, later - 1).unwrap().is_empty());
        let s = store.state(m1).unwrap().unwrap();
        assert_eq!(s.last_error.as_deref(), Some("quota exceeded"));
        let ids: Vec<_> = store
            .lease(&q, 5, later)
            .unwrap()
            .iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, vec![m1, m3]);

        // A plain retry of m1 blocks m3 until m1 is due (FIFO), without holding other queues.
        store.requeue(m1, later + 1_000, "timeout").unwrap();
        store.requeue(m3, later, "timeout").unwrap();
        assert!(store.lease(&q, 5, later + 999).unwrap().is_empty());
        let ids: Vec<_> = store
            .lease(&q, 5, later + 1_000)
            .unwrap()
            .iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, vec![m1, m3]);
    }

    #[test]
    fn expiry_fails_queued_messages_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        let short = NewOutbound {
            ttl_ms: Some(1_000),
            ..msg(&q, b"short")
        };
        let m1 = store.enqueue(&short, NOW).unwrap();
        let m2 = store.enqueue(&short, NOW).unwrap();
        let m3 = store.enqueue(&msg(&q, b"default ttl"), NOW).unwrap();
        let leased = store.lease(&q, 1, NOW).unwrap();
        assert_eq!(leased[0].id, m1);
        assert!(store.expire(NOW + 999).unwrap().is_empty());
        let expired = store.expire(NOW + 1_000).unwrap();
        assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), vec![m2]);
        assert_eq!(expired[0].app, "app");
        assert_eq!(
            store.state(m2).unwrap().unwrap().state,
            MessageState::Failed
        );
        assert_eq!(
            store.state(m1).unwrap().unwrap().state,
            MessageState::Sending
        );
        // The default expiry is seven days.
        let s3 = store.state(m3).unwrap().unwrap();
        assert_eq!(s3.expires_at, NOW + 7 * 24 * 3600 * 1000);
        assert_eq!(store.prune_finished(NOW + 1_001).unwrap(), 1);
        assert_eq!(store.state(m2).unwrap(), None);
    }
}

mod group_commit {
    use super::*;

    #[test]
    fn eight_threads_share_commits_and_nothing_is_lost() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 40;
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let store = Arc::new(store);
        let commits_before = store.commit_count();
        let committer = Arc::new(GroupCommitter::new(store.clone()));
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let committer = committer.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let q = QueueRef::new("smp://a", vec![t as u8]);
                    barrier.wait();
                    (0..PER_THREAD)
                        .map(|i| {
                            committer
                                .enqueue(msg(&q, &[t as u8, i as u8]), NOW)
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let per_thread: Vec<Vec<_>> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        let total = THREADS * PER_THREAD;
        let mut all: Vec<_> = per_thread.iter().flatten().copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "duplicate ids");
        let commits = store.commit_count() - commits_before;
        assert_eq!(commits, committer.batch_count());
        assert!(
            commits < total as u64,
            "{commits} commits for {total} sends: no batching"
        );
        println!("{total} sends in {commits} commits");

        // Every acknowledged send is durable: reopen and lease each queue in full.
        drop(committer);
        drop(store);
        let store = Store::open(&path, &pass("pw")).unwrap();
        assert_eq!(store.pending_count("smp://a").unwrap(), total as u64);
        for (t, ids) in per_thread.iter().enumerate() {
            let q = QueueRef::new("smp://a", vec![t as u8]);
            let leased = store.lease(&q, usize::MAX, NOW).unwrap();
            assert_eq!(leased.iter().map(|l| l.id).collect::<Vec<_>>(), *ids);
            for (i, l) in leased.iter().enumerate() {
                assert_eq!(l.payload, vec![t as u8, i as u8]);
            }
        }
    }
}

mod mailbox {
    use super::*;

    #[test]
    fn dedup_survives_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"rq".to_vec());
        assert!(matches!(
            store.deliver("app", &q, b"m1", b"one", NOW).unwrap(),
            Delivered::New { .. }
        ));
        assert!(matches!(
            store.deliver("app", &q, b"m2", b"two", NOW).unwrap(),
            Delivered::New { .. }
        ));
        assert_eq!(
            store.deliver("app", &q, b"m1", b"one", NOW).unwrap(),
            Delivered::Duplicate
        );
        let pending = store.pending("app", Some(&q), 10).unwrap();
        let bodies: Vec<_> = pending
            .iter()
            .map(|m| (m.msg_id.clone(), m.body.clone()))
            .collect();
        assert_eq!(
            bodies,
            vec![
                (b"m1".to_vec(), b"one".to_vec()),
                (b"m2".to_vec(), b"two".to_vec())
            ]
        );
        assert!(!store.ack("other-app", &q, b"m1").unwrap());
        assert!(store.ack("app", &q, b"m1").unwrap());
        assert!(!store.ack("app", &q, b"m1").unwrap());
        drop(store);

        // After a daemon restart: m2 is redelivered to the app, m1 is not, and the server
        // redelivering either one is recognised.
        let store = Store::open(&path, &pass("pw")).unwrap();
        let pending = store.pending("app", None, 10).unwrap();
        assert_eq!(
            pending.iter().map(|m| m.msg_id.clone()).collect::<Vec<_>>(),
            vec![b"m2".to_vec()]
        );
        assert_eq!(
            store.deliver("app", &q, b"m1", b"one", NOW).unwrap(),
            Delivered::Duplicate
        );
        assert_eq!(
            store.deliver("app", &q, b"m2", b"two", NOW).unwrap(),
            Delivered::Duplicate
        );
        // Same message id on another queue is a different message.
        let q2 = QueueRef::new("smp://a", b"rq2".to_vec());
        assert!(matches!(
            store.deliver("app", &q2, b"m1", b"x", NOW).unwrap(),
            Delivered::New { .. }
        ));
        assert!(store.pending("other-app", None, 10).unwrap().is_empty());
    }

    #[test]
    fn dedup_window_is_bounded_but_keeps_unacked_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let opts = StoreOptions::default().with_dedup_window(2);
        let store = Store::create_with(&path, &pass("pw"), opts).unwrap();
        let q = QueueRef::new("smp://a", b"rq".to_vec());
        for i in 0..5u8 {
            store.deliver("app", &q, &[i], b"b", NOW).unwrap();
        }
        // Nothing acked yet: every id is still remembered.
        for i in 0..5u8 {
            assert_eq!(
                store.deliver("app", &q, &[i], b"b", NOW).unwrap(),
                Delivered::Duplicate
            );
        }
        for i in 0..5u8 {
            assert!(store.ack("app", &q, &[i]).unwrap());
        }
        // Only the last two acked ids are kept.
        assert_eq!(
            store.deliver("app", &q, &[4], b"b", NOW).unwrap(),
            Delivered::Duplicate
        );
        assert_eq!(
            store.deliver("app", &q, &[3], b"b", NOW).unwrap(),
            Delivered::Duplicate
        );
        assert!(matches!(
            store.deliver("app", &q, &[0], b"b", NOW).unwrap(),
            Delivered::New { .. }
        ));
    }
}

mod bad_files {
    use super::*;

    fn open_err(path: &Path) -> StoreError {
        Store::open(path, &pass("pw")).expect_err("open must fail")
    }

    fn assert_names(err: &StoreError, path: &Path) {
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "error does not name the file: {err}"
        );
    }

    #[test]
    fn missing_file_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.redb");
        let err = open_err(&path);
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        assert_names(&err, &path);
        assert!(!path.exists());
    }

    #[test]
    fn random_bytes_are_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("random.redb");
        let bytes: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(&path, &bytes).unwrap();
        let err = open_err(&path);
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        assert_names(&err, &path);
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "the file must not be touched"
        );
    }

    #[test]
    fn truncated_and_damaged_stores_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        for i in 0..50u8 {
            store.enqueue(&msg(&q, &[i; 100]), NOW).unwrap();
        }
        drop(store);
        let full = fs::read(&path).unwrap();

        for (name, bytes) in [
            ("truncated", full[..full.len() / 3].to_vec()),
            ("header only", full[..600].to_vec()),
            ("damaged header", {
                let mut b = full.clone();
                for x in &mut b[9..200] {
                    *x ^= 0x5A;
                }
                b
            }),
        ] {
            let p = dir.path().join(format!("{}.redb", name.replace(' ', "_")));
            fs::write(&p, &bytes).unwrap();
            let err = open_err(&p);
            println!("{name}: {err}");
            assert!(
                matches!(err, StoreError::Corrupt { .. } | StoreError::Foreign { .. }),
                "{name}: {err}"
            );
            assert_names(&err, &p);
        }
    }

    #[test]
    fn foreign_redb_file_and_newer_schema_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("foreign.redb");
        {
            let db = redb::Database::create(&foreign).unwrap();
            let txn = db.begin_write().unwrap();
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other_app");
            txn.open_table(def).unwrap().insert("k", &1).unwrap();
            txn.commit().unwrap();
        }
        let err = open_err(&foreign);
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        assert_names(&err, &foreign);

        let (path, store) = new_store(dir.path());
        drop(store);
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("muxd_meta");
            txn.open_table(meta)
                .unwrap()
                .insert(b"schema_version".as_slice(), 99u32.to_be_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = open_err(&path);
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
        assert_names(&err, &path);
    }

    #[test]
    fn unknown_old_schema_is_corrupt_not_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        store.enqueue(&msg(&q, b"keep me"), NOW).unwrap();
        drop(store);
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("muxd_meta");
            txn.open_table(meta)
                .unwrap()
                .insert(b"schema_version".as_slice(), 0u32.to_be_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = open_err(&path);
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains("unknown schema version 0"),
            "{err}"
        );
        // The failed migration rolled back: the data is still there.
        let db = redb::Database::open(&path).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let msgs: redb::TableDefinition<&[u8], &[u8]> =
            redb::TableDefinition::new("outbound_messages");
        let table = txn.open_table(msgs).unwrap();
        assert_eq!(redb::ReadableTableMetadata::len(&table).unwrap(), 1);
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _store) = new_store(dir.path());
        let err = open_err(&path);
        assert!(matches!(err, StoreError::AlreadyOpen { .. }), "{err}");
        assert!(matches!(
            Store::create(&path, &pass("pw")),
            Err(StoreError::AlreadyExists { .. })
        ));
    }
}

mod secrets {
    use super::*;

    /// A `MakeWriter` that appends all log output to a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    #[test]
    fn private_key_bytes_never_reach_the_file_or_the_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let backup = dir.path().join("backup.bin");
        // A recognisable 32-byte "private key".
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(capture.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let store = Store::create(&path, &pass("pw")).unwrap();
            let q = QueueRef::new("smp://a", b"rq".to_vec());
            let record = QueueRecord {
                queue: q.clone(),
                app: "app".into(),
                public: b"public key material".to_vec(),
                secret: SecretBytes::new(key.clone()),
            };
            store.put_record(&record).unwrap();
            // Log the way careless daemon code might.
            tracing::info!(?record, "stored record");
            store.enqueue(&msg(&q, &key), NOW).unwrap();
            store.deliver("app", &q, b"m1", &key, NOW).unwrap();
            // The same secrets through the daemon's path: one batch, logged whole.
            let q2 = QueueRef::new("smp://a", b"rq2".to_vec());
            let mut batch = Batch::new();
            batch.put_record(QueueRecord {
                queue: q2.clone(),
                ..record.clone()
            });
            batch.enqueue(store.next_outbound_id().unwrap(), msg(&q2, &key), NOW);
            batch.deliver("app".into(), q2.clone(), b"m2".to_vec(), key.clone(), NOW);
            tracing::info!(?batch, "committing");
            store.commit(batch).unwrap();
            store.export(&backup, &pass("backup")).unwrap();
            drop(store);
            let store = Store::open(&path, &pass("pw")).unwrap();
            let back = store.record(&q).unwrap().unwrap();
            tracing::info!(?back, "loaded record");
            assert_eq!(back.secret.expose(), key.as_slice());
            assert_eq!(back, record);
            let back2 = store.record(&q2).unwrap().unwrap();
            assert_eq!(back2.secret.expose(), key.as_slice());
            tracing::info!(unfinished = ?store.unfinished().unwrap(), "reloaded");
        });
        let logs = capture.0.lock().unwrap().clone();
        assert!(
            contains(&logs, b"stored record"),
            "logging was not captured"
        );
        for (what, bytes) in [
            ("database", fs::read(&path).unwrap()),
            ("backup", fs::read(&backup).unwrap()),
            ("logs", logs),
        ] {
            assert!(!contains(&bytes, &key), "raw key bytes found in {what}");
            assert!(!contains(&bytes, hex.as_bytes()), "hex key found in {what}");
            assert!(
                !contains(&bytes, format!("{key:?}").as_bytes()),
                "debug key in {what}"
            );
        }
        // The public part is stored in the clear, which shows the search would find the key if
        // it were stored the same way.
        assert!(contains(&fs::read(&path).unwrap(), b"public key material"));
    }

    #[test]
    fn wrong_passphrase_and_wrong_method_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        drop(store);
        let err = Store::open(&path, &pass("not it")).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("wrong passphrase"));
        assert!(err.to_string().contains(&path.display().to_string()));

        let keyfile = dir.path().join("key");
        create_key_file(&keyfile).unwrap();
        let err = Store::open(&path, &Unlock::KeyFile(keyfile)).unwrap_err();
        assert!(matches!(err, StoreError::WrongUnlockKind { .. }), "{err}");
        Store::open(&path, &pass("pw")).unwrap();
    }

    #[test]
    fn key_file_permissions_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let keyfile = dir.path().join("muxd.key");
        create_key_file(&keyfile).unwrap();
        assert_eq!(
            fs::metadata(&keyfile).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            create_key_file(&keyfile),
            Err(StoreError::AlreadyExists { .. })
        ));
        let path = dir.path().join("store.redb");
        let unlock = Unlock::KeyFile(keyfile.clone());
        drop(Store::create(&path, &unlock).unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&keyfile, fs::Permissions::from_mode(mode)).unwrap();
            let err = Store::open(&path, &unlock).unwrap_err();
            assert!(
                matches!(err, StoreError::KeyFilePermissions { .. }),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains(&keyfile.display().to_string()));
        }
        fs::set_permissions(&keyfile, fs::Permissions::from_mode(0o400)).unwrap();
        Store::open(&path, &unlock).unwrap();

        // Another key file (same permissions) does not unlock it.
        let other = dir.path().join("other.key");
        create_key_file(&other).unwrap();
        let err = Store::open(&path, &Unlock::KeyFile(other)).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");

        // A 0600 file with the wrong contents is not a key file.
        let junk = dir.path().join("junk.key");
        fs::write(&junk, b"not a key").unwrap();
        fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
        let err = Store::open(&path, &Unlock::KeyFile(junk)).unwrap_err();
        assert!(matches!(err, StoreError::BadKeyFile { .. }), "{err}");
    }
}

mod backup {
    use super::*;

    #[test]
    fn export_restore_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"sq".to_vec());
        let rq = QueueRef::new("smp://b", b"rq".to_vec());
        let record = QueueRecord {
            queue: rq.clone(),
            app: "app".into(),
            public: b"pub".to_vec(),
            secret: SecretBytes::new(b"dh private key + ratchet".to_vec()),
        };
        store.put_record(&record).unwrap();
        let m1 = store.enqueue(&msg(&q, b"first"), NOW).unwrap();
        let m2 = store.enqueue(&msg(&q, b"second"), NOW).unwrap();
        store.lease(&q, 1, NOW).unwrap();
        store.ack_sent(m1, NOW).unwrap();
        store.deliver("app", &rq, b"in1", b"hello", NOW).unwrap();
        store.deliver("app", &rq, b"in2", b"acked", NOW).unwrap();
        store.ack("app", &rq, b"in2").unwrap();

        let backup = dir.path().join("backup.muxd");
        store.export(&backup, &pass("backup pw")).unwrap();
        assert_eq!(
            fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            store.export(&backup, &pass("backup pw")),
            Err(StoreError::AlreadyExists { .. })
        ));

        // Restore under a different protection (key file).
        let keyfile = dir.path().join("new.key");
        create_key_file(&keyfile).unwrap();
        let restored_path = dir.path().join("restored.redb");
        let new_unlock = Unlock::KeyFile(keyfile);
        let restored =
            Store::restore(&backup, &pass("backup pw"), &restored_path, &new_unlock).unwrap();
        assert_eq!(restored.records(None).unwrap(), vec![record.clone()]);
        assert_eq!(restored.state(m1).unwrap(), store.state(m1).unwrap());
        assert_eq!(restored.state(m2).unwrap(), store.state(m2).unwrap());
        let leased = restored.lease(&q, 5, NOW).unwrap();
        assert_eq!(
            leased
                .iter()
                .map(|l| (l.id, l.payload.clone()))
                .collect::<Vec<_>>(),
            vec![(m2, b"second".to_vec())]
        );
        let pending = restored.pending("app", None, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].body, b"hello");
        assert_eq!(
            restored.deliver("app", &rq, b"in2", b"acked", NOW).unwrap(),
            Delivered::Duplicate
        );
        // New ids continue after the restored ones.
        let m3 = restored.enqueue(&msg(&q, b"third"), NOW).unwrap();
        assert!(m3 > m2);
        drop(restored);
        Store::open(&restored_path, &new_unlock).unwrap();

        // Restoring never overwrites, and a wrong passphrase or tampering is a clear error.
        let err =
            Store::restore(&backup, &pass("backup pw"), &restored_path, &new_unlock).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
        let other = dir.path().join("other.redb");
        let err = Store::restore(&backup, &pass("nope"), &other, &new_unlock).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains(&backup.display().to_string()));
        let mut bytes = fs::read(&backup).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = dir.path().join("tampered.muxd");
        fs::write(&tampered, &bytes).unwrap();
        let err = Store::restore(&tampered, &pass("backup pw"), &other, &new_unlock).unwrap_err();
        assert!(matches!(err, StoreError::BadBackup { .. }), "{err}");
        assert!(!other.exists());
    }
}
