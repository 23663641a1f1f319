//! GRP make-before-break renewal (§6.5) in the sans-IO pool, with virtual time: a scripted
//! relay answers the inner SMP v18 transmissions of two sessions, and the test checks the
//! order the upstream task relies on: switch mark → SUBs signed for the new session →
//! retire mark only after the old session's commands are answered; the link never leaves
//! `Up`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use muxd_core::{
    Action, ConnState, GrpSession, Pool, PoolConfig, PoolEvent, PoolRequest, RequestToken,
    ServerKey,
};
use muxd_smp::block::{decode_batch, pad_block, unpad_block};
use muxd_smp::command::{Command, QueueIds, Response};
use muxd_smp::crypto::ed25519_verify;
use muxd_smp::encoding::put_large;
use muxd_smp::keys::{Ed25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const V: u16 = 18;

/// A transmission the pool wrote: corrId, entity, command, and whether its signature holds
/// for `session` with `key`.
struct Seen {
    corr: Vec<u8>,
    entity: Vec<u8>,
    command: Command,
    signed_for: Option<bool>,
}

fn session(n: u8) -> GrpSession {
    GrpSession {
        session_id: [n; 32],
        auth_key: *X25519SecretKey::generate(&mut ChaCha20Rng::seed_from_u64(u64::from(n)))
            .public_key()
            .as_bytes(),
        inner_version: V,
        cover_rate: 200,
    }
}

fn parse(block: &[u8], session_id: &[u8], key: Option<&Ed25519PublicKey>) -> Vec<Seen> {
    decode_batch(unpad_block(block).unwrap())
        .unwrap()
        .into_iter()
        .map(|t| {
            let d = Transmission::decode(V, session_id, t).unwrap();
            let authorized = d.authorized(session_id).unwrap();
            Seen {
                corr: d.corr_id.to_vec(),
                entity: d.entity_id.to_vec(),
                command: Command::decode(V, d.command).unwrap(),
                signed_for: key.map(|k| ed25519_verify(k, &authorized, d.auth).is_ok()),
            }
        })
        .collect()
}

/// A relay's answer as a block of one transmission.
fn answer(corr: &[u8], entity: &[u8], r: &Response) -> Vec<u8> {
    let mut cmd = Vec::new();
    r.encode(V, &mut cmd).unwrap();
    let a = Authorized::new(&[], corr, entity, &cmd).unwrap();
    let mut t = Vec::new();
    encode_transmission(V, b"", &a, &mut t).unwrap();
    let mut content = vec![1u8];
    put_large(&mut content, &t).unwrap();
    let mut block = Vec::new();
    pad_block(&content, &mut block).unwrap();
    block
}

fn drain(pool: &mut Pool) -> Vec<Action> {
    std::iter::from_fn(|| pool.poll_action()).collect()
}

#[test]
fn renewal_switches_resubscribes_then_retires_without_going_down() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut pool = Pool::new(PoolConfig::default());
    let mut now = Instant::now();
    let key_text = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    let address = format!("grp://{key_text}@127.0.0.1:7443");
    pool.handle_request(
        now,
        &mut rng,
        "app",
        RequestToken(1),
        PoolRequest::CreateQueue {
            server: address,
            websocket: false,
        },
    );
    let server: ServerKey = drain(&mut pool)
        .into_iter()
        .find_map(|a| match a {
            Action::Connect { server, .. } => Some(server),
            _ => None,
        })
        .expect("a connect");
    let s1 = session(1);
    pool.handle_grp_connected(now, &mut rng, &server, s1);
    // NEW on session 1; the relay answers IDS.
    let new_block = drain(&mut pool)
        .into_iter()
        .find_map(|a| match a {
            Action::Transmit { block, .. } => Some(block),
            _ => None,
        })
        .expect("NEW");
    let seen = parse(&new_block, &s1.session_id, None);
    let Command::New(n) = &seen[0].command else {
        panic!("expected NEW");
    };
    let rcv_key = Ed25519PublicKey::from_spki(&n.rcv_auth_key).unwrap();
    let rcv_id = vec![9u8; 24];
    let ids = QueueIds {
        rcv_id: rcv_id.clone(),
        snd_id: vec![8u8; 24],
        srv_dh_key: X25519SecretKey::generate(&mut rng).public_key().to_spki(),
        queue_mode: None,
        link_id: None,
        service_id: None,
        ntf_creds: None,
    };
    now += Duration::from_millis(10);
    pool.handle_block(
        now,
        &mut rng,
        &server,
        &answer(&seen[0].corr, b"", &Response::Ids(ids)),
    );
    let created = drain(&mut pool);
    assert!(
        created
            .iter()
            .any(|a| matches!(a, Action::Reply { result: Ok(_), .. })),
        "{created:?}"
    );
    assert_eq!(pool.status()[0].state, ConnState::Up);

    // An ACK-like command in flight on session 1 when the renewal happens: a PING probe
    // would do, but a DEL is one whose answer must not be lost or failed.
    let queue_id = pool.queues("app")[0].queue_id.clone();
    pool.handle_request(
        now,
        &mut rng,
        "app",
        RequestToken(2),
        PoolRequest::DeleteQueue { queue_id },
    );
    let del = drain(&mut pool)
        .into_iter()
        .find_map(|a| match a {
            Action::Transmit { block, .. } => Some(block),
            _ => None,
        })
        .expect("DEL on session 1");
    let del = parse(&del, &s1.session_id, Some(&rcv_key));
    assert!(matches!(del[0].command, Command::Del), "DEL");
    assert_eq!(del[0].signed_for, Some(true));

    // The successor session is up: renewal.
    now += Duration::from_secs(23 * 3600);
    let s2 = session(2);
    pool.handle_grp_connected(now, &mut rng, &server, s2);
    let actions = drain(&mut pool);
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Event(PoolEvent::ServerChanged { .. }) | Action::Disconnect { .. }
        )),
        "the link did not go down: {actions:?}"
    );
    let blocks: Vec<&Vec<u8>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Transmit { block, .. } => Some(block),
            _ => None,
        })
        .collect();
    assert!(
        blocks[0].is_empty(),
        "the switch mark comes first: {actions:?}"
    );
    let sub = parse(blocks[1], &s2.session_id, Some(&rcv_key));
    assert!(matches!(sub[0].command, Command::Sub), "then the SUB");
    assert_eq!(sub[0].entity, rcv_id);
    assert_eq!(sub[0].signed_for, Some(true), "signed for the new session");
    assert!(
        blocks.iter().skip(2).all(|b| !b.is_empty()),
        "no retire mark while the SUB and the DEL are unanswered"
    );
    assert_eq!(pool.status()[0].state, ConnState::Up);

    // The relay answers the SUB on the new session: the old one still has the DEL.
    now += Duration::from_millis(10);
    pool.handle_block(
        now,
        &mut rng,
        &server,
        &answer(&sub[0].corr, &rcv_id, &Response::Ok),
    );
    let actions = drain(&mut pool);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Transmit { block, .. } if block.is_empty())),
        "the DEL on the old session is still unanswered: {actions:?}"
    );
    // The old session answers its DEL: once, to the app, and only then the retire mark.
    pool.handle_block(
        now,
        &mut rng,
        &server,
        &answer(&del[0].corr, &rcv_id, &Response::Ok),
    );
    let actions = drain(&mut pool);
    let replies: Vec<_> = actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Reply {
                    token: RequestToken(2),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(replies.len(), 1, "{actions:?}");
    assert!(matches!(replies[0], Action::Reply { result: Ok(_), .. }));
    let marks = actions
        .iter()
        .filter(|a| matches!(a, Action::Transmit { block, .. } if block.is_empty()))
        .count();
    assert_eq!(marks, 1, "the retire mark: {actions:?}");
    assert_eq!(pool.status()[0].state, ConnState::Up);
    // Later traffic is plain: no more marks.
    now += Duration::from_secs(60);
    pool.handle_timeout(now, &mut rng);
    assert!(
        !drain(&mut pool)
            .iter()
            .any(|a| matches!(a, Action::Transmit { block, .. } if block.is_empty()))
    );
}
