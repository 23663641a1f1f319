//! One-transaction write batches and the whole-store reads the daemon rebuilds its pool from,
//! on real files; and the schema 1 → 2 migration on files written by the schema-1 code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use muxd_queue_store::{
    Batch, Delivered, MessageState, NewOutbound, OutboundId, QueueRecord, QueueRef, SCHEMA_VERSION,
    SecretBytes, Store, StoreError,
};

mod common;

use common::{NOW, msg, new_store, pass};

fn record(queue: &QueueRef, secret: &[u8]) -> QueueRecord {
    QueueRecord {
        queue: queue.clone(),
        app: "app".into(),
        public: b"pub".to_vec(),
        secret: SecretBytes::new(secret.to_vec()),
    }
}

fn ids(store: &Store) -> Vec<(OutboundId, MessageState)> {
    store
        .unfinished()
        .unwrap()
        .iter()
        .map(|u| (u.id, u.state))
        .collect()
}

fn pending_ids(store: &Store) -> Vec<(String, Vec<u8>)> {
    store
        .all_pending()
        .unwrap()
        .into_iter()
        .map(|(app, m)| (app, m.msg_id))
        .collect()
}

mod commit {
    use super::*;

    #[test]
    fn a_bad_op_applies_nothing_and_a_good_batch_is_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let sq = QueueRef::new("smp://a", b"sq".to_vec());
        let rq = QueueRef::new("smp://b", b"rq".to_vec());
        let mut first = Batch::new();
        first.enqueue(OutboundId(1), msg(&sq, b"one"), NOW);
        store.commit(first).unwrap();

        let before = store.commit_count();
        let mut bad = Batch::new();
        bad.put_record(record(&rq, b"secret"));
        bad.enqueue(OutboundId(2), msg(&sq, b"two"), NOW);
        bad.deliver(
            "app".into(),
            rq.clone(),
            b"m1".to_vec(),
            b"hi".to_vec(),
            NOW,
        );
        bad.put_state(b"seq/x".to_vec(), b"7".to_vec());
        bad.set_state(OutboundId(1), MessageState::Sent, None, NOW);
        bad.enqueue(OutboundId(1), msg(&sq, b"dup"), NOW);
        assert_eq!(bad.len(), 6);
        let err = store.commit(bad).unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
        assert_eq!(store.commit_count(), before, "a failed commit counted");
        assert_eq!(store.record(&rq).unwrap(), None);
        assert_eq!(ids(&store), vec![(OutboundId(1), MessageState::Queued)]);
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(2));
        assert!(store.all_pending().unwrap().is_empty());
        assert!(store.states(b"").unwrap().is_empty());
        // The dedup entry was rolled back too: the same message is new afterwards.
        assert!(matches!(
            store.deliver("app", &rq, b"m1", b"hi", NOW).unwrap(),
            Delivered::New { .. }
        ));

        let before = store.commit_count();
        let mut good = Batch::new();
        good.put_record(record(&rq, b"secret"));
        for i in 2..12u64 {
            good.enqueue(OutboundId(i), msg(&sq, &[i as u8]), NOW);
        }
        good.set_state(OutboundId(1), MessageState::Sending, None, NOW);
        good.set_state(OutboundId(1), MessageState::Sent, None, NOW);
        good.put_state(b"seq/x".to_vec(), b"7".to_vec());
        store.commit(good).unwrap();
        assert_eq!(store.commit_count(), before + 1);
        assert_eq!(store.record(&rq).unwrap(), Some(record(&rq, b"secret")));
        assert_eq!(store.unfinished().unwrap().len(), 10);
        assert_eq!(
            store.state(OutboundId(1)).unwrap().unwrap().state,
            MessageState::Sent
        );

        // An empty batch costs no transaction.
        store.commit(Batch::new()).unwrap();
        assert_eq!(store.commit_count(), before + 1);

        // Deleting through a batch.
        let mut del = Batch::new();
        del.delete_record(rq.clone());
        del.delete_record(QueueRef::new("smp://b", b"never".to_vec()));
        store.commit(del).unwrap();
        assert_eq!(store.record(&rq).unwrap(), None);
    }

    #[test]
    fn debug_shows_counts_not_contents() {
        let q = QueueRef::new("smp://a", b"q".to_vec());
        let mut batch = Batch::new();
        assert!(batch.is_empty());
        batch.put_record(record(&q, b"PRIVATE-KEY-BYTES"));
        batch.enqueue(OutboundId(1), msg(&q, b"PAYLOAD-BYTES"), NOW);
        batch.enqueue(OutboundId(2), msg(&q, b"PAYLOAD-BYTES"), NOW);
        batch.deliver("app".into(), q, b"m".to_vec(), b"BODY-BYTES".to_vec(), NOW);
        let shown = format!("{batch:?}");
        assert_eq!(
            shown,
            "Batch { ops: 4, put_record: 1, enqueue: 2, deliver: 1 }"
        );
        assert!(!batch.is_empty());
    }
}

mod outbound {
    use super::*;

    #[test]
    fn caller_chosen_ids_advance_the_counter_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(1));
        let mut b = Batch::new();
        b.enqueue(OutboundId(5), msg(&q, b"five"), NOW);
        b.enqueue(OutboundId(9), msg(&q, b"nine"), NOW);
        store.commit(b).unwrap();
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(10));
        drop(store);

        let store = Store::open(&path, &pass("pw")).unwrap();
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(10));
        // The store's own ids continue after the caller's.
        assert_eq!(
            store.enqueue(&msg(&q, b"ten"), NOW).unwrap(),
            OutboundId(10)
        );
        // Below the counter is refused even when the id was never used (it might have been
        // pruned), and so is an id used earlier in the same batch.
        for bad in [OutboundId(7), OutboundId(0)] {
            let mut b = Batch::new();
            b.enqueue(bad, msg(&q, b"x"), NOW);
            let err = store.commit(b).unwrap_err();
            assert!(matches!(err, StoreError::InvalidInput(_)), "{bad}: {err}");
        }
        let mut b = Batch::new();
        b.enqueue(OutboundId(20), msg(&q, b"x"), NOW);
        b.enqueue(OutboundId(20), msg(&q, b"y"), NOW);
        assert!(matches!(store.commit(b), Err(StoreError::InvalidInput(_))));
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(11));
        let got: Vec<_> = store
            .unfinished()
            .unwrap()
            .into_iter()
            .map(|u| (u.id, u.payload))
            .collect();
        assert_eq!(
            got,
            vec![
                (OutboundId(5), b"five".to_vec()),
                (OutboundId(9), b"nine".to_vec()),
                (OutboundId(10), b"ten".to_vec()),
            ]
        );
    }

    #[test]
    fn sending_is_requeued_by_reopen_and_sent_leaves_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        let id = OutboundId(1);
        let mut b = Batch::new();
        b.enqueue(id, msg(&q, b"payload"), NOW);
        b.set_state(id, MessageState::Sending, None, NOW);
        store.commit(b).unwrap();
        assert_eq!(ids(&store), vec![(id, MessageState::Sending)]);
        drop(store);

        let store = Store::open(&path, &pass("pw")).unwrap();
        let u = store.unfinished().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(
            (u[0].id, u[0].state, u[0].attempts),
            (id, MessageState::Queued, 1)
        );
        assert_eq!(u[0].payload, b"payload");
        assert_eq!(u[0].queue, q);
        assert_eq!(u[0].expires_at, NOW + muxd_queue_store::DEFAULT_EXPIRY_MS);
        let shown = format!("{:?}", u[0]);
        assert!(shown.contains("payload_len: 7"), "{shown}");
        assert!(
            !shown.contains(&format!("{:?}", b"payload".to_vec())),
            "{shown}"
        );

        let mut b = Batch::new();
        b.set_state(
            id,
            MessageState::Queued,
            Some("connection lost".into()),
            NOW,
        );
        b.set_state(id, MessageState::Sending, None, NOW);
        store.commit(b).unwrap();
        let u = store.unfinished().unwrap();
        assert_eq!(
            (u[0].attempts, u[0].last_error.as_deref()),
            (2, Some("connection lost"))
        );

        let mut b = Batch::new();
        b.set_state(id, MessageState::Sent, None, NOW + 5);
        store.commit(b).unwrap();
        assert!(store.unfinished().unwrap().is_empty());
        assert_eq!(store.pending_count("smp://a").unwrap(), 0);
        assert!(store.lease(&q, 5, NOW).unwrap().is_empty());
        let s = store.state(id).unwrap().unwrap();
        assert_eq!((s.state, s.attempts), (MessageState::Sent, 2));

        // Finishing twice, reviving a finished message and unknown ids are all ignored.
        let mut b = Batch::new();
        b.set_state(id, MessageState::Sent, None, NOW + 6);
        b.set_state(id, MessageState::Failed, Some("late".into()), NOW + 6);
        b.set_state(id, MessageState::Queued, None, NOW + 6);
        b.set_state(OutboundId(999), MessageState::Sent, None, NOW + 6);
        store.commit(b).unwrap();
        let s = store.state(id).unwrap().unwrap();
        assert_eq!(s.state, MessageState::Sent);
        assert_eq!(s.last_error.as_deref(), Some("connection lost"));
        assert_eq!(store.state(OutboundId(999)).unwrap(), None);
        // The status row stays until pruned, which counts from the finishing time.
        assert_eq!(store.prune_finished(NOW + 5).unwrap(), 0);
        assert_eq!(store.prune_finished(NOW + 6).unwrap(), 1);
        assert_eq!(store.state(id).unwrap(), None);
    }

    #[test]
    fn failed_records_the_reason_and_is_not_expired_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"q".to_vec());
        let short = NewOutbound {
            ttl_ms: Some(10),
            ..msg(&q, b"x")
        };
        let mut b = Batch::new();
        b.enqueue(OutboundId(1), short.clone(), NOW);
        b.enqueue(OutboundId(2), short, NOW);
        b.set_state(
            OutboundId(1),
            MessageState::Failed,
            Some("AUTH".into()),
            NOW,
        );
        store.commit(b).unwrap();
        let s = store.state(OutboundId(1)).unwrap().unwrap();
        assert_eq!(
            (s.state, s.last_error.as_deref()),
            (MessageState::Failed, Some("AUTH"))
        );
        // Only the message still queued expires: the failed one left the expiry index.
        let expired: Vec<_> = store
            .expire(NOW + 10)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(expired, vec![OutboundId(2)]);
    }
}

mod inbound {
    use super::*;

    #[test]
    fn deliver_dedups_against_earlier_commits_and_the_same_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let q = QueueRef::new("smp://a", b"rq".to_vec());
        store.deliver("app", &q, b"m1", b"one", NOW).unwrap();
        let mut b = Batch::new();
        b.deliver(
            "app".into(),
            q.clone(),
            b"m1".to_vec(),
            b"again".to_vec(),
            NOW,
        );
        b.deliver(
            "app".into(),
            q.clone(),
            b"m2".to_vec(),
            b"two".to_vec(),
            NOW,
        );
        b.deliver(
            "app".into(),
            q.clone(),
            b"m2".to_vec(),
            b"two again".to_vec(),
            NOW,
        );
        // Another app cannot take over a known message either.
        b.deliver(
            "other".into(),
            q.clone(),
            b"m2".to_vec(),
            b"x".to_vec(),
            NOW,
        );
        store.commit(b).unwrap();
        let pending = store.pending("app", Some(&q), 10).unwrap();
        let got: Vec<_> = pending
            .iter()
            .map(|m| (m.msg_id.clone(), m.body.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (b"m1".to_vec(), b"one".to_vec()),
                (b"m2".to_vec(), b"two".to_vec())
            ]
        );
        assert!(store.pending("other", None, 10).unwrap().is_empty());
        drop(store);

        // A delivery and its ack in one batch; acks of unknown or foreign messages are no-ops.
        let store = Store::open(&path, &pass("pw")).unwrap();
        let mut b = Batch::new();
        b.deliver(
            "app".into(),
            q.clone(),
            b"m3".to_vec(),
            b"three".to_vec(),
            NOW,
        );
        b.ack_inbound("app".into(), q.clone(), b"m3".to_vec());
        b.ack_inbound("app".into(), q.clone(), b"m1".to_vec());
        b.ack_inbound("other".into(), q.clone(), b"m2".to_vec());
        b.ack_inbound("app".into(), q.clone(), b"never".to_vec());
        store.commit(b).unwrap();
        assert_eq!(pending_ids(&store), vec![("app".into(), b"m2".to_vec())]);
        // Acked ids stay known for dedup.
        for id in [&b"m1"[..], b"m3"] {
            assert_eq!(
                store.deliver("app", &q, id, b"x", NOW).unwrap(),
                Delivered::Duplicate
            );
        }
    }

    #[test]
    fn all_pending_is_in_arrival_order_across_apps_and_queues() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let qa = QueueRef::new("smp://a", b"qa".to_vec());
        let qb = QueueRef::new("smp://b", b"qb".to_vec());
        // Key order (app, queue) differs from arrival order on purpose.
        let arrivals = [
            ("zed", &qb, "1"),
            ("alpha", &qa, "2"),
            ("zed", &qa, "3"),
            ("alpha", &qb, "4"),
            ("alpha", &qa, "5"),
        ];
        let mut b = Batch::new();
        for (i, (app, q, id)) in arrivals.iter().enumerate() {
            if i == 3 {
                // Half in an earlier commit, half in a batch.
                store.commit(std::mem::take(&mut b)).unwrap();
            }
            b.deliver(
                app.to_string(),
                (*q).clone(),
                id.as_bytes().to_vec(),
                vec![i as u8],
                NOW + i as u64,
            );
        }
        store.commit(b).unwrap();
        let all = store.all_pending().unwrap();
        let got: Vec<_> = all
            .iter()
            .map(|(app, m)| {
                (
                    app.as_str(),
                    m.queue.clone(),
                    m.msg_id.clone(),
                    m.body.clone(),
                    m.received_at,
                )
            })
            .collect();
        let want: Vec<_> = arrivals
            .iter()
            .enumerate()
            .map(|(i, (app, q, id))| {
                (
                    *app,
                    (*q).clone(),
                    id.as_bytes().to_vec(),
                    vec![i as u8],
                    NOW + i as u64,
                )
            })
            .collect();
        assert_eq!(got, want);
        assert!(all.windows(2).all(|w| w[0].1.seq < w[1].1.seq));
    }

    #[test]
    fn forget_inbound_drops_waiting_messages_and_dedup_of_that_queue_only() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let gone = QueueRef::new("smp://a", b"gone".to_vec());
        // Shares a prefix with "gone" in its id, and lives on the same server.
        let kept = QueueRef::new("smp://a", b"gone2".to_vec());
        let mut b = Batch::new();
        for (app, q, id) in [
            ("app", &gone, "m1"),
            ("other", &gone, "m2"),
            ("app", &kept, "m1"),
            ("app", &gone, "m3"),
        ] {
            b.deliver(
                app.into(),
                q.clone(),
                id.as_bytes().to_vec(),
                b"b".to_vec(),
                NOW,
            );
        }
        b.ack_inbound("app".into(), gone.clone(), b"m3".to_vec());
        store.commit(b).unwrap();
        let mut b = Batch::new();
        b.forget_inbound(gone.clone());
        store.commit(b).unwrap();
        assert_eq!(pending_ids(&store), vec![("app".into(), b"m1".to_vec())]);
        assert_eq!(store.all_pending().unwrap()[0].1.queue, kept);
        drop(store);
        let store = Store::open(&path, &pass("pw")).unwrap();
        // Every id of the forgotten queue, acked or not, is new again; the other queue's is not.
        for id in [&b"m1"[..], b"m2", b"m3"] {
            assert!(matches!(
                store.deliver("app", &gone, id, b"b", NOW).unwrap(),
                Delivered::New { .. }
            ));
        }
        assert_eq!(
            store.deliver("app", &kept, b"m1", b"b", NOW).unwrap(),
            Delivered::Duplicate
        );
    }
}

mod state {
    use super::*;

    #[test]
    fn prefix_scan_survives_reopen_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = new_store(dir.path());
        let mut b = Batch::new();
        b.put_state(b"seqwin/q2".to_vec(), b"w2".to_vec());
        b.put_state(b"seqwin/q1".to_vec(), b"w1".to_vec());
        b.put_state(b"seq/q1".to_vec(), b"s1".to_vec());
        b.put_state(b"seqwin/q1".to_vec(), b"w1'".to_vec());
        b.put_state(b"seqwio".to_vec(), b"after the prefix".to_vec());
        store.commit(b).unwrap();
        drop(store);

        let store = Store::open(&path, &pass("pw")).unwrap();
        let kv = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
        assert_eq!(
            store.states(b"seqwin/").unwrap(),
            vec![kv(b"seqwin/q1", b"w1'"), kv(b"seqwin/q2", b"w2")]
        );
        assert_eq!(store.states(b"seq/").unwrap(), vec![kv(b"seq/q1", b"s1")]);
        assert_eq!(store.states(b"").unwrap().len(), 4);
        assert!(store.states(b"nothing").unwrap().is_empty());
        let mut b = Batch::new();
        b.delete_state(b"seqwin/q1".to_vec());
        b.delete_state(b"never".to_vec());
        store.commit(b).unwrap();
        assert_eq!(
            store.states(b"seqwin/").unwrap(),
            vec![kv(b"seqwin/q2", b"w2")]
        );
    }

    #[test]
    fn export_and_restore_carry_the_state_table() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = new_store(dir.path());
        let mut b = Batch::new();
        b.put_state(b"seq/q".to_vec(), 42u64.to_be_bytes().to_vec());
        store.commit(b).unwrap();
        let backup = dir.path().join("backup");
        store.export(&backup, &pass("b")).unwrap();
        let restored =
            Store::restore(&backup, &pass("b"), &dir.path().join("r.redb"), &pass("r")).unwrap();
        assert_eq!(restored.states(b"").unwrap(), store.states(b"").unwrap());
        assert_eq!(restored.states(b"").unwrap().len(), 1);
    }
}

/// Fixtures written by the schema-1 code (commit 523b5ef); see `tests/fixtures/README.md` for
/// what they hold.
mod migration {
    use super::*;

    const FIXTURE_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-v1.redb");
    const FIXTURE_BACKUP: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/backup-v1.muxdbak"
    );
    const FIXTURE_NOW: u64 = 1_700_000_000_000;

    fn schema_on_disk(path: &Path) -> u32 {
        let db = redb::Database::open(path).unwrap();
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let meta: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("muxd_meta");
        let table = txn.open_table(meta).unwrap();
        let v = redb::ReadableTable::get(&table, b"schema_version".as_slice())
            .unwrap()
            .unwrap();
        u32::from_be_bytes(v.value().try_into().unwrap())
    }

    /// What the schema-1 fixture holds must all be readable after the migration.
    fn assert_fixture_data(store: &Store) {
        let sq = QueueRef::new("smp://a", b"sq".to_vec());
        let rq = QueueRef::new("smp://b", b"rq".to_vec());
        let rec = store.record(&rq).unwrap().unwrap();
        assert_eq!(
            (rec.app.as_str(), rec.public.as_slice()),
            ("app", &b"pub"[..])
        );
        assert_eq!(rec.secret.expose(), b"v1 secret");
        assert_eq!(
            store.state(OutboundId(1)).unwrap().unwrap().state,
            MessageState::Sent
        );
        let u = store.unfinished().unwrap();
        let got: Vec<_> = u
            .iter()
            .map(|u| {
                (
                    u.id,
                    u.state,
                    u.attempts,
                    u.not_before,
                    u.last_error.as_deref(),
                    u.payload.as_slice(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    OutboundId(2),
                    MessageState::Queued,
                    1,
                    FIXTURE_NOW + 1000,
                    Some("timeout"),
                    &b"second"[..]
                ),
                (
                    OutboundId(3),
                    MessageState::Queued,
                    0,
                    0,
                    None,
                    &b"third"[..]
                ),
            ]
        );
        assert!(u.iter().all(|u| u.queue == sq));
        assert_eq!(store.next_outbound_id().unwrap(), OutboundId(4));
        let pending = store.all_pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (
                pending[0].0.as_str(),
                pending[0].1.msg_id.as_slice(),
                pending[0].1.body.as_slice()
            ),
            ("app", &b"in1"[..], &b"hello"[..])
        );
        assert_eq!(
            store
                .deliver("app", &rq, b"in2", b"x", FIXTURE_NOW)
                .unwrap(),
            Delivered::Duplicate
        );
        assert!(store.states(b"").unwrap().is_empty());
    }

    #[test]
    fn a_schema_1_file_is_migrated_with_its_data_intact() {
        assert_eq!(SCHEMA_VERSION, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        fs::copy(FIXTURE_DB, &path).unwrap();
        assert_eq!(schema_on_disk(&path), 1);

        let store = Store::open(&path, &pass("fixture-v1")).unwrap();
        assert_fixture_data(&store);
        // The new table works, and the ids continue.
        let mut b = Batch::new();
        b.put_state(b"seq/sq".to_vec(), b"1".to_vec());
        b.enqueue(
            OutboundId(4),
            msg(&QueueRef::new("smp://a", b"sq".to_vec()), b"fourth"),
            FIXTURE_NOW,
        );
        store.commit(b).unwrap();
        drop(store);
        assert_eq!(schema_on_disk(&path), 2);

        let store = Store::open(&path, &pass("fixture-v1")).unwrap();
        assert_eq!(
            store.states(b"seq/").unwrap(),
            vec![(b"seq/sq".to_vec(), b"1".to_vec())]
        );
        assert_eq!(store.unfinished().unwrap().len(), 3);
    }

    #[test]
    fn a_schema_1_backup_restores_into_schema_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restored.redb");
        let store = Store::restore(
            Path::new(FIXTURE_BACKUP),
            &pass("fixture-v1-backup"),
            &path,
            &pass("new"),
        )
        .unwrap();
        assert_fixture_data(&store);
        drop(store);
        assert_eq!(schema_on_disk(&path), 2);
    }
}
