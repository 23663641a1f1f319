//! Property tests: encode → decode round trips for commands and responses at every version,
//! and batch packing.

// Strategies and helpers unwrap: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use muxd_smp::block::{BATCH_BUDGET, BatchBuilder, MAX_BATCH_COUNT, decode_batch};
use muxd_smp::command::{
    Command, LinkData, NewQueue, NtfKeys, QueueIds, QueueMode, QueueRequest, Response, ServerRef,
    SubscriptionMode,
};
use muxd_smp::error::{BlockingInfo, BlockingReason, CmdError, ErrorType};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

fn link_data() -> impl Strategy<Value = LinkData> {
    (bytes(300), bytes(300)).prop_map(|(fixed, user)| LinkData { fixed, user })
}

fn queue_request() -> impl Strategy<Value = QueueRequest> {
    prop_oneof![
        proptest::option::of((bytes(24), link_data())).prop_map(QueueRequest::Messaging),
        proptest::option::of((bytes(24), bytes(24), link_data())).prop_map(QueueRequest::Contact),
    ]
}

fn basic_auth() -> impl Strategy<Value = Vec<u8>> {
    "[a-z0-9]{1,20}".prop_map(String::into_bytes)
}

fn new_queue() -> impl Strategy<Value = NewQueue> {
    (
        bytes(44),
        bytes(44),
        proptest::option::of(basic_auth()),
        any::<bool>(),
        proptest::option::of(queue_request()),
        proptest::option::of((bytes(44), bytes(44))),
    )
        .prop_map(|(a, d, auth, sub, q, ntf)| NewQueue {
            rcv_auth_key: a,
            rcv_dh_key: d,
            basic_auth: auth,
            sub_mode: if sub {
                SubscriptionMode::Subscribe
            } else {
                SubscriptionMode::OnlyCreate
            },
            queue_request: q,
            ntf_creds: ntf.map(|(auth_key, dh_key)| NtfKeys { auth_key, dh_key }),
        })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        new_queue().prop_map(Command::New),
        Just(Command::Sub),
        Just(Command::Subs),
        bytes(44).prop_map(Command::Key),
        proptest::collection::vec(bytes(44), 1..4).prop_map(Command::RKey),
        (bytes(24), link_data()).prop_map(|(link_id, data)| Command::LSet { link_id, data }),
        Just(Command::LDel),
        (bytes(44), bytes(44))
            .prop_map(|(auth_key, dh_key)| Command::NKey(NtfKeys { auth_key, dh_key })),
        Just(Command::NDel),
        Just(Command::Get),
        bytes(24).prop_map(Command::Ack),
        Just(Command::Off),
        Just(Command::Del),
        Just(Command::Que),
        bytes(44).prop_map(Command::SKey),
        (any::<bool>(), bytes(2000))
            .prop_map(|(notification, body)| Command::Send { notification, body }),
        Just(Command::Ping),
        bytes(44).prop_map(Command::LKey),
        Just(Command::LGet),
        Just(Command::NSub),
        Just(Command::NSubs),
        (
            proptest::collection::vec("[a-z0-9.]{1,30}", 1..4),
            "[0-9]{0,5}",
            bytes(32),
            proptest::option::of(basic_auth())
        )
            .prop_map(|(hosts, port, key_hash, basic_auth)| Command::Prxy {
                server: ServerRef {
                    hosts,
                    port,
                    key_hash
                },
                basic_auth,
            }),
        (any::<u16>(), bytes(44), bytes(500)).prop_map(|(version, key, enc)| Command::PFwd {
            version,
            key,
            enc
        }),
        bytes(500).prop_map(Command::RFwd),
    ]
}

/// What a command looks like after travelling at `v`: fields the version cannot carry are lost.
fn at_version(c: &Command, v: u16) -> Command {
    match c {
        Command::New(n) => {
            let mut n = n.clone();
            if v < 17 {
                n.ntf_creds = None;
            }
            if v < 9 {
                n.queue_request = None;
            } else if v < 15 {
                n.queue_request = Some(match n.queue_request {
                    Some(QueueRequest::Messaging(_)) => QueueRequest::Messaging(None),
                    _ => QueueRequest::Contact(None),
                });
            }
            Command::New(n)
        }
        other => other.clone(),
    }
}

fn error_type() -> impl Strategy<Value = ErrorType> {
    prop_oneof![
        Just(ErrorType::Block),
        Just(ErrorType::Auth),
        Just(ErrorType::Quota),
        Just(ErrorType::Cmd(CmdError::Syntax)),
        "[ -~]{0,40}".prop_map(ErrorType::Store),
        (
            any::<bool>(),
            proptest::option::of("\\{[a-z:0-9\"]{0,20}\\}")
        )
            .prop_map(|(spam, notice)| {
                ErrorType::Blocked(BlockingInfo {
                    reason: if spam {
                        BlockingReason::Spam
                    } else {
                        BlockingReason::Content
                    },
                    notice,
                })
            }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let mode = proptest::option::of(prop_oneof![
        Just(QueueMode::Messaging),
        Just(QueueMode::Contact)
    ]);
    prop_oneof![
        (
            bytes(24),
            bytes(24),
            bytes(44),
            mode,
            proptest::option::of(bytes(24)),
            proptest::option::of(bytes(24)),
            proptest::option::of((bytes(24), bytes(44)))
        )
            .prop_map(
                |(rcv_id, snd_id, srv_dh_key, queue_mode, link_id, service_id, ntf_creds)| {
                    Response::Ids(QueueIds {
                        rcv_id,
                        snd_id,
                        srv_dh_key,
                        queue_mode,
                        link_id,
                        service_id,
                        ntf_creds,
                    })
                }
            ),
        (bytes(24), link_data()).prop_map(|(sender_id, data)| Response::Lnk { sender_id, data }),
        proptest::option::of(bytes(24)).prop_map(Response::Sok),
        any::<i64>().prop_map(Response::Soks),
        (bytes(24), bytes(3000)).prop_map(|(msg_id, body)| Response::Msg { msg_id, body }),
        (bytes(24), bytes(44)).prop_map(|(notifier_id, srv_ntf_dh_key)| Response::Nid {
            notifier_id,
            srv_ntf_dh_key
        }),
        (any::<[u8; 24]>(), bytes(144))
            .prop_map(|(nonce, enc_meta)| Response::NMsg { nonce, enc_meta }),
        bytes(500).prop_map(Response::PRes),
        Just(Response::End),
        any::<i64>().prop_map(Response::Ends),
        Just(Response::Deld),
        bytes(100).prop_map(Response::Info),
        Just(Response::Ok),
        error_type().prop_map(Response::Err),
        Just(Response::Pong),
    ]
}

/// What a response looks like after a server sent it at `v`.
fn response_at_version(r: &Response, v: u16) -> Response {
    match r {
        Response::Ids(ids) => {
            let mut ids = ids.clone();
            if v < 17 {
                ids.ntf_creds = None;
            }
            if v < 16 {
                ids.service_id = None;
            }
            if v < 15 {
                ids.link_id = None;
                ids.queue_mode =
                    (v >= 9).then_some(if ids.queue_mode == Some(QueueMode::Messaging) {
                        QueueMode::Messaging
                    } else {
                        QueueMode::Contact
                    });
            }
            Response::Ids(ids)
        }
        Response::Sok(_) if v < 16 => Response::Ok,
        Response::Deld if v < 10 => Response::End,
        Response::Err(ErrorType::Blocked(_)) if v < 12 => Response::Err(ErrorType::Auth),
        Response::Err(ErrorType::Blocked(info)) if v < 18 => {
            Response::Err(ErrorType::Blocked(BlockingInfo {
                reason: info.reason,
                notice: None,
            }))
        }
        other => other.clone(),
    }
}

proptest! {
    #[test]
    fn commands_round_trip_at_every_version(c in command(), v in 6u16..=18) {
        let mut out = Vec::new();
        match c.encode(v, &mut out) {
            Ok(()) => prop_assert_eq!(Command::decode(v, &out).unwrap(), at_version(&c, v)),
            Err(_) => prop_assert!(v < c.min_version()),
        }
    }

    #[test]
    fn responses_round_trip_at_every_version(r in response(), v in 6u16..=18) {
        let mut out = Vec::new();
        r.encode(v, &mut out).unwrap();
        prop_assert_eq!(Response::decode(v, &out).unwrap(), response_at_version(&r, v));
    }

    #[test]
    fn transmissions_round_trip(
        v in 6u16..=18,
        auth_len in prop_oneof![Just(0usize), Just(64), Just(80), Just(114)],
        corr in bytes(24),
        entity in bytes(24),
        cmd in bytes(200),
    ) {
        let sid = [5u8; 32];
        let a = Authorized::new(&sid, &corr, &entity, &cmd).unwrap();
        let mut t = Vec::new();
        encode_transmission(v, &vec![1; auth_len], &a, &mut t).unwrap();
        let d = Transmission::decode(v, &sid, &t).unwrap();
        prop_assert_eq!(d.auth.len(), auth_len);
        prop_assert_eq!(d.corr_id, &corr[..]);
        prop_assert_eq!(d.entity_id, &entity[..]);
        prop_assert_eq!(d.command, &cmd[..]);
        prop_assert_eq!(d.authorized(&sid).unwrap(), a.as_bytes());
    }

    #[test]
    fn batches_pack_within_budget(lens in proptest::collection::vec(0usize..3000, 1..400)) {
        let mut b = BatchBuilder::new();
        let mut pushed = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let t = vec![u8::try_from(i % 256).unwrap(); *len];
            if !b.push(&t) {
                break;
            }
            pushed.push(t);
        }
        let content = b.take();
        prop_assert!(pushed.len() <= MAX_BATCH_COUNT);
        prop_assert!(content.len() - 1 <= BATCH_BUDGET);
        if pushed.is_empty() {
            return Ok(());
        }
        let items = decode_batch(&content).unwrap();
        prop_assert_eq!(items.len(), pushed.len());
        for (a, b) in items.iter().zip(&pushed) {
            prop_assert_eq!(*a, &b[..]);
        }
    }
}
