//! Deterministic pair harness: a client [`Connection`] and a [`RelayLink`] wired back to back
//! with virtual time and seeded RNGs. Bytes move instantly; time only moves when both sides
//! are idle, to the earlier of their timeouts.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muxd_grp::block::GoodbyeReason;
use muxd_grp::connection::{CloseReason, Connection, ConnectionConfig, Event};
use muxd_grp::cover::{CoverConfig, CoverScheduler, gap};
use muxd_grp::error::{BlockFault, GrpError, Reconnect};
use muxd_grp::handshake::{InitiatorConfig, Reject, ResponderConfig};
use muxd_grp::relay::{RelayCloseReason, RelayEvent, RelayLink, RelayLinkConfig};
use muxd_grp::{HS_LEN, MAX_AGE, PREAMBLE, RECORD, Role};
use muxd_smp::keys::X25519SecretKey;
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use zeroize::Zeroizing;

const RELAY_STATIC: [u8; 32] = [0x42; 32];

fn relay_public() -> [u8; 32] {
    *X25519SecretKey::from_bytes(RELAY_STATIC)
        .public_key()
        .as_bytes()
}

fn transmission(sid: &[u8; 32], corr: &[u8], cmd: &[u8]) -> Vec<u8> {
    let a = Authorized::new(sid, corr, b"", cmd).unwrap();
    let mut t = Vec::new();
    encode_transmission(18, b"", &a, &mut t).unwrap();
    t
}

/// What crossed the wire in one direction, for tampering and inspection.
type Tamper = Box<dyn FnMut(usize, &mut Vec<u8>)>;

struct Pair {
    now: Instant,
    client: Connection,
    relay: RelayLink,
    client_events: Vec<(Instant, Event)>,
    relay_events: Vec<(Instant, RelayEvent)>,
    /// Every client→relay and relay→client write, with its time.
    c2r: Vec<(Instant, usize)>,
    r2c: Vec<(Instant, usize)>,
    tamper_c2r: Option<Tamper>,
    tamper_r2c: Option<Tamper>,
    /// Whether the relay's "server" answers PING with PONG.
    answer_pings: bool,
    pings_answered: usize,
}

impl Pair {
    fn new(seed: u64, client_cfg: ConnectionConfig, responder: ResponderConfig) -> Self {
        Self::with_relay_cfg(seed, client_cfg, responder, RelayLinkConfig::default())
    }

    fn with_relay_cfg(
        seed: u64,
        client_cfg: ConnectionConfig,
        responder: ResponderConfig,
        relay_cfg: RelayLinkConfig,
    ) -> Self {
        let now = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let client = Connection::new(client_cfg, now, &mut rng);
        let relay = RelayLink::new(Arc::new(responder), relay_cfg, now, &mut rng);
        Self {
            now,
            client,
            relay,
            client_events: Vec::new(),
            relay_events: Vec::new(),
            c2r: Vec::new(),
            r2c: Vec::new(),
            tamper_c2r: None,
            tamper_r2c: None,
            answer_pings: true,
            pings_answered: 0,
        }
    }

    fn client_default(seed: u64) -> Self {
        Self::new(
            seed,
            ConnectionConfig::client(relay_public()),
            ResponderConfig::new(Zeroizing::new(RELAY_STATIC)),
        )
    }

    /// Moves bytes and events until both sides are quiet.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(mut bytes) = self.client.poll_transmit() {
                if let Some(t) = &mut self.tamper_c2r {
                    t(self.c2r.len(), &mut bytes);
                }
                self.c2r.push((self.now, bytes.len()));
                self.relay.handle_input(self.now, &bytes);
                moved = true;
            }
            while let Some(mut bytes) = self.relay.poll_transmit() {
                if let Some(t) = &mut self.tamper_r2c {
                    t(self.r2c.len(), &mut bytes);
                }
                self.r2c.push((self.now, bytes.len()));
                self.client.handle_input(self.now, &bytes);
                moved = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push((self.now, e));
                moved = true;
            }
            while let Some(e) = self.relay.poll_event() {
                if let RelayEvent::Transmissions(items) = &e {
                    self.serve(items.clone());
                }
                self.relay_events.push((self.now, e));
                moved = true;
            }
            if self.client.is_closed() && !self.relay.is_closed() {
                self.relay.handle_eof(self.now);
                moved = true;
            }
            if self.relay.is_closed() && !self.client.is_closed() {
                self.client.handle_eof(self.now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    /// The relay "server": PING → PONG.
    fn serve(&mut self, items: Vec<Vec<u8>>) {
        if !self.answer_pings {
            return;
        }
        let sid = self.relay.session_id().unwrap();
        for t in items {
            let d = Transmission::decode(18, &sid, &t).unwrap();
            if d.command == b"PING" {
                let pong = transmission(&sid, d.corr_id, b"PONG");
                self.relay.send(pong, self.now).unwrap();
                self.pings_answered += 1;
            }
        }
    }

    fn start(&mut self) {
        self.client.handle_carrier_up(self.now);
        self.pump();
    }

    /// Advances virtual time to the next timeout of either side; false when none is left.
    fn step(&mut self) -> bool {
        let next = [self.client.poll_timeout(), self.relay.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let Some(t) = next else { return false };
        self.now = self.now.max(t);
        self.client.handle_timeout(self.now);
        self.relay.handle_timeout(self.now);
        self.pump();
        true
    }

    fn run_until(&mut self, deadline: Instant) {
        while self.now < deadline && self.step() {}
    }

    fn client_closed(&self) -> Option<&CloseReason> {
        self.client_events.iter().find_map(|(_, e)| match e {
            Event::Closed(r) => Some(r),
            _ => None,
        })
    }

    fn relay_closed(&self) -> Option<(Instant, &RelayCloseReason)> {
        self.relay_events.iter().find_map(|(t, e)| match e {
            RelayEvent::Closed(r) => Some((*t, r)),
            _ => None,
        })
    }
}

#[test]
fn full_handshake_and_traffic() {
    let mut p = Pair::client_default(1);
    let t0 = p.now;
    p.start();
    // Exactly PREAMBLE ‖ message 1, then record 2.
    assert_eq!(p.c2r, [(t0, PREAMBLE.len() + HS_LEN)]);
    assert_eq!(p.r2c, [(t0, HS_LEN)]);
    let Some((
        _,
        Event::Connected {
            session_id,
            inner_version,
            cover_rate,
            auth_key,
        },
    )) = p.client_events.first().cloned()
    else {
        panic!("not connected: {:?}", p.client_events)
    };
    assert_eq!((inner_version, cover_rate), (18, 200));
    assert_eq!(Some(session_id), p.relay.session_id());
    assert_eq!(
        Some(auth_key),
        p.relay.auth_secret().map(|k| *k.public_key().as_bytes())
    );
    assert!(matches!(
        p.relay_events.first(),
        Some((
            _,
            RelayEvent::Established {
                role: Role::Client,
                inner_version: 18,
                ..
            }
        ))
    ));

    // A command goes out within max_delay (1 s) and the relay sees it.
    let corr = [7u8; 24];
    p.client
        .send(transmission(&session_id, &corr, b"PING"), p.now)
        .unwrap();
    p.run_until(t0 + Duration::from_secs(3));
    assert!(p.pings_answered >= 1);
    let pongs: Vec<_> = p
        .client_events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Transmission(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(pongs, [transmission(&session_id, &corr, b"PONG")]);
    // Every write after the handshake is exactly one record.
    assert!(
        p.c2r[1..]
            .iter()
            .chain(&p.r2c[1..])
            .all(|(_, n)| *n == RECORD)
    );

    // Keepalive PINGs are answered and consumed; the link survives 10 minutes of idling.
    p.run_until(t0 + Duration::from_secs(600));
    assert!(p.client.is_established());
    assert!(p.pings_answered >= 20, "{} pings", p.pings_answered);
    let extra = p
        .client_events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Transmission(_)))
        .count();
    assert_eq!(extra, 1, "our own PONGs are not surfaced");

    // Graceful close: goodbye 0x00 reaches the relay.
    p.client.close(p.now);
    p.pump();
    assert_eq!(
        p.relay_closed().map(|(_, r)| r.clone()),
        Some(RelayCloseReason::Goodbye(GoodbyeReason::Normal))
    );
    assert_eq!(p.client_closed(), Some(&CloseReason::Local));
}

#[test]
fn dead_link_after_two_missed_pongs() {
    let mut p = Pair::client_default(2);
    p.answer_pings = false;
    let t0 = p.now;
    p.start();
    p.run_until(t0 + Duration::from_secs(200));
    let (at, reason) = p
        .client_events
        .iter()
        .find_map(|(t, e)| match e {
            Event::Closed(r) => Some((*t, r.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(reason, CloseReason::Error(GrpError::DeadLink));
    // First PING at 25–30 s, missed at +30 s; second missed 25–30 s later: 80–90 s.
    let secs = (at - t0).as_secs_f64();
    assert!((80.0..=90.0).contains(&secs), "dead after {secs} s");
    assert_eq!(GrpError::DeadLink.reconnect(), Reconnect::Backoff);
}

/// The observable behaviour of the relay after a message 1 that fails for `tamper`'s reason:
/// what it sent, and when it closed relative to message 1.
fn relay_failure(
    responder: ResponderConfig,
    cfg: ConnectionConfig,
    tamper: Option<Tamper>,
) -> (usize, Duration, Reject) {
    let mut p = Pair::new(3, cfg, responder);
    p.tamper_c2r = tamper;
    p.start();
    let msg1_at = p.now;
    // The client keeps sending nothing; the relay must stay silent and close at +1 s.
    p.run_until(msg1_at + Duration::from_secs(5));
    let (closed_at, reason) = p.relay_closed().unwrap();
    let RelayCloseReason::Rejected(r) = reason else {
        panic!("{reason:?}")
    };
    (p.r2c.len(), closed_at - msg1_at, *r)
}

#[test]
fn failed_message1_has_no_oracle() {
    let responder = || ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    let flip = |offset: usize| -> Tamper {
        Box::new(move |i, b: &mut Vec<u8>| {
            if i == 0 {
                b[offset] ^= 1;
            }
        })
    };
    // Noise ciphertext tampered (payload 1 region) → decrypt failure.
    let bad_noise = relay_failure(
        responder(),
        ConnectionConfig::client(relay_public()),
        Some(flip(4 + 500)),
    );
    // Wrong relay key in the client's address → decrypt failure on the relay.
    let wrong_key = relay_failure(responder(), ConnectionConfig::client([9u8; 32]), None);
    // A relay link from a key that is not allow-listed.
    let mut relay_link = ConnectionConfig::client(relay_public());
    relay_link.handshake = InitiatorConfig::relay_link(relay_public(), Zeroizing::new([5u8; 32]));
    let not_allowed = relay_failure(responder(), relay_link, None);

    assert_eq!(bad_noise.2, Reject::Decrypt);
    assert_eq!(wrong_key.2, Reject::Decrypt);
    assert_eq!(not_allowed.2, Reject::NotAllowed);
    // Same observable behaviour: nothing sent, closed exactly FAIL_DELAY after message 1.
    for (sent, after, _) in [bad_noise, wrong_key, not_allowed] {
        assert_eq!(sent, 0);
        assert_eq!(after, Duration::from_secs(1));
    }
}

#[test]
fn allow_listed_relay_link_succeeds() {
    let own = [5u8; 32];
    let mut responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    responder
        .allow_list
        .insert(*X25519SecretKey::from_bytes(own).public_key().as_bytes());
    let mut cfg = ConnectionConfig::client(relay_public());
    cfg.handshake = InitiatorConfig::relay_link(relay_public(), Zeroizing::new(own));
    let mut p = Pair::new(4, cfg, responder);
    p.start();
    assert!(matches!(
        p.client_events.first(),
        Some((
            _,
            Event::Connected {
                cover_rate: 2000,
                ..
            }
        ))
    ));
    assert!(matches!(
        p.relay_events.first(),
        Some((
            _,
            RelayEvent::Established {
                role: Role::Relay,
                ..
            }
        ))
    ));
}

#[test]
fn bad_preamble_closes_at_once() {
    let mut p = Pair::client_default(5);
    p.tamper_c2r = Some(Box::new(|i, b| {
        if i == 0 {
            b[3] = 2;
        }
    }));
    p.start();
    assert!(p.r2c.is_empty());
    assert_eq!(
        p.relay_closed().map(|(t, r)| (t, r.clone())),
        Some((p.now, RelayCloseReason::BadPreamble))
    );
}

#[test]
fn tampered_record2_fails_with_identity() {
    // A flipped bit in the KEM ciphertext, and one in Noise message 2: both give HANDSHAKE
    // IDENTITY and the client sends nothing more.
    for offset in [10, 1088 + 40, HS_LEN - 1] {
        let mut p = Pair::client_default(6);
        p.tamper_r2c = Some(Box::new(move |i, b| {
            if i == 0 {
                b[offset] ^= 0x80;
            }
        }));
        p.start();
        assert_eq!(
            p.client_closed(),
            Some(&CloseReason::Error(GrpError::HandshakeIdentity)),
            "offset {offset}"
        );
        assert_eq!(p.c2r.len(), 1, "nothing after message 1");
        assert_eq!(GrpError::HandshakeIdentity.reconnect(), Reconnect::Never);
    }
}

#[test]
fn handshake_deadline() {
    let mut p = Pair::client_default(7);
    let t0 = p.now;
    // Record 2 never arrives.
    p.tamper_r2c = Some(Box::new(|_, b| b.clear()));
    p.start();
    p.run_until(t0 + Duration::from_secs(60));
    assert_eq!(
        p.client_closed(),
        Some(&CloseReason::Error(GrpError::Timeout))
    );
    let at = p
        .client_events
        .iter()
        .find(|(_, e)| matches!(e, Event::Closed(_)))
        .unwrap()
        .0;
    assert_eq!(at - t0, Duration::from_secs(30));
}

#[test]
fn tampered_record_kills_the_session() {
    let mut p = Pair::client_default(8);
    // Corrupt the third relay→client write (the second record after record 2).
    p.tamper_r2c = Some(Box::new(|i, b| {
        if i == 2 {
            b[100] ^= 1;
        }
    }));
    let t0 = p.now;
    p.start();
    p.run_until(t0 + Duration::from_secs(600));
    assert_eq!(
        p.client_closed(),
        Some(&CloseReason::Error(GrpError::Block(BlockFault::Decrypt)))
    );
    assert_eq!(
        GrpError::Block(BlockFault::Decrypt).transport_error(),
        Some(muxd_smp::error::TransportError::Block)
    );
    // Client-side tampering kills the relay side the same way.
    let mut p = Pair::client_default(9);
    p.tamper_c2r = Some(Box::new(|i, b| {
        if i == 3 {
            b[RECORD - 1] ^= 1;
        }
    }));
    p.start();
    p.run_until(t0 + Duration::from_secs(600));
    assert_eq!(
        p.relay_closed().map(|(_, r)| r.clone()),
        Some(RelayCloseReason::Error(GrpError::Block(
            BlockFault::Decrypt
        )))
    );
}

#[test]
fn rekey_across_the_1024_record_boundary() {
    // Relay-link rates (2 records/s each way) over 10 virtual minutes: > 1024 records per
    // direction, all through the real rekey path with no skipping.
    let own = [5u8; 32];
    let mut responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    responder
        .allow_list
        .insert(*X25519SecretKey::from_bytes(own).public_key().as_bytes());
    let mut cfg = ConnectionConfig::client(relay_public());
    cfg.handshake = InitiatorConfig::relay_link(relay_public(), Zeroizing::new(own));
    let mut p = Pair::new(10, cfg, responder);
    let t0 = p.now;
    p.start();
    p.run_until(t0 + Duration::from_secs(700));
    let (sent, received) = p.client.record_counts().unwrap();
    assert!(sent > 1100 && received > 1100, "{sent} / {received}");
    assert!(p.client.is_established(), "{:?}", p.client_closed());
    assert!(p.pings_answered > 20);

    // The boundary itself, with a command in record 1023 and one in 1024 each way.
    let mut p = Pair::client_default(11);
    p.start();
    p.client.skip_records_for_testing(1023);
    p.relay.skip_records_for_testing(1023);
    let sid = p.client.session_id().unwrap();
    for i in 0..3u8 {
        p.client
            .send(transmission(&sid, &[i; 24], b"PING"), p.now)
            .unwrap();
        let until = p.now + Duration::from_secs(2);
        p.run_until(until);
    }
    let (sent, received) = p.client.record_counts().unwrap();
    assert!(sent >= 1026 && received >= 1026, "{sent} / {received}");
    let pongs = p
        .client_events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Transmission(_)))
        .count();
    assert_eq!(pongs, 3);
    assert!(p.client.is_established());
}

#[test]
fn session_age_limit() {
    let mut p = Pair::client_default(12);
    let t0 = p.now;
    p.start();
    p.run_until(t0 + MAX_AGE + Duration::from_secs(120));
    // The client was told to renew between 23 h and 23.5 h.
    let renew = p
        .client_events
        .iter()
        .find(|(_, e)| matches!(e, Event::RenewDue))
        .map(|(t, _)| *t - t0)
        .unwrap();
    assert!(
        renew >= Duration::from_secs(23 * 3600) && renew <= Duration::from_secs(23 * 3600 + 1800),
        "{renew:?}"
    );
    // It did not act on it, so the relay said goodbye 0x01 at exactly 24 h.
    assert_eq!(
        p.client_closed(),
        Some(&CloseReason::Goodbye(GoodbyeReason::SessionAge))
    );
    let (at, reason) = p.relay_closed().unwrap();
    assert_eq!(reason, &RelayCloseReason::Local(GoodbyeReason::SessionAge));
    assert!(at - t0 >= MAX_AGE && at - t0 <= MAX_AGE + Duration::from_secs(6));
    assert_eq!(GoodbyeReason::SessionAge.reconnect(), Reconnect::Now);
}

#[test]
fn record_limit_ends_with_goodbye_0x05() {
    let mut cfg = ConnectionConfig::client(relay_public());
    cfg.record_limit = Some(20);
    let mut p = Pair::new(13, cfg, ResponderConfig::new(Zeroizing::new(RELAY_STATIC)));
    let t0 = p.now;
    p.start();
    p.run_until(t0 + Duration::from_secs(3600));
    assert_eq!(
        p.client_closed(),
        Some(&CloseReason::Error(GrpError::RecordLimit))
    );
    assert_eq!(
        p.relay_closed().map(|(_, r)| r.clone()),
        Some(RelayCloseReason::Goodbye(GoodbyeReason::RecordLimit))
    );
    // 20 records: 19 ordinary ones and the goodbye.
    assert_eq!(p.c2r.len(), 1 + 20);
}

#[test]
fn relay_idle_timeout() {
    // After the handshake the client goes silent: only the relay is driven from here on.
    let mut p = Pair::client_default(14);
    let t0 = p.now;
    p.start();
    let mut writes = 0;
    let mut closed = None;
    while let Some(t) = p.relay.poll_timeout() {
        p.relay.handle_timeout(t);
        while p.relay.poll_transmit().is_some() {
            writes += 1;
        }
        if let Some(RelayEvent::Closed(r)) = p.relay.poll_event() {
            closed = Some((t - t0, r));
            break;
        }
    }
    assert!(writes > 5, "cover kept flowing");
    // Goodbye 0x03 at 90 s, then the 5 s linger without a peer EOF.
    assert_eq!(
        closed,
        Some((
            Duration::from_secs(95),
            RelayCloseReason::Local(GoodbyeReason::Idle)
        ))
    );
}

#[test]
fn version_mismatch_is_reported_after_record2() {
    let mut responder = ResponderConfig::new(Zeroizing::new(RELAY_STATIC));
    responder.inner = muxd_smp::handshake::VersionRange::new(19, 20).unwrap();
    let mut p = Pair::new(15, ConnectionConfig::client(relay_public()), responder);
    p.start();
    assert_eq!(p.r2c.len(), 1, "record 2 is still sent");
    assert_eq!(
        p.client_closed(),
        Some(&CloseReason::Error(GrpError::Version {
            ours: (18, 18),
            theirs: (19, 20)
        }))
    );
    assert_eq!(
        p.relay_closed().map(|(_, r)| r.clone()),
        Some(RelayCloseReason::NoCommonVersion)
    );
}

/// Kolmogorov–Smirnov distance between `samples` and Exp(rate).
fn ks_exponential(samples: &mut [f64], rate: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    samples
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let cdf = 1.0 - (-rate * x).exp();
            let lo = cdf - i as f64 / n;
            let hi = (i + 1) as f64 / n - cdf;
            lo.max(hi)
        })
        .fold(0.0, f64::max)
}

#[test]
fn cover_gaps_are_exponential() {
    let mut rng = ChaCha20Rng::seed_from_u64(16);
    for rate_milli in [50u16, 200, 2000] {
        let rate = f64::from(rate_milli) / 1000.0;
        let mut gaps: Vec<f64> = (0..20_000)
            .map(|_| gap(rate_milli, &mut rng).as_secs_f64())
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!(
            ((mean * rate) - 1.0).abs() < 0.03,
            "rate {rate_milli}: mean {mean}"
        );
        let d = ks_exponential(&mut gaps, rate);
        // 1% critical value for n = 20000 is 1.63 / sqrt(n) ≈ 0.0115.
        assert!(d < 0.0115, "rate {rate_milli}: KS D = {d}");
        // And a wrong rate is clearly rejected, so the test has power.
        assert!(ks_exponential(&mut gaps, rate * 1.1) > 0.0115);
    }
}

#[test]
fn idle_link_records_follow_the_negotiated_rate() {
    // With no data, every tick sends one cover record: inter-arrival times of the client's
    // records are Exp(0.2/s), apart from PINGs which replace ticks without adding records.
    let mut p = Pair::client_default(17);
    let t0 = p.now;
    p.start();
    p.run_until(t0 + Duration::from_secs(40_000));
    let times: Vec<f64> = p.c2r[1..]
        .iter()
        .map(|(t, _)| (*t - t0).as_secs_f64())
        .collect();
    let mut gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let n = gaps.len();
    assert!(n > 7000, "{n} records");
    let mean = gaps.iter().sum::<f64>() / n as f64;
    // PINGs (one per ~27.5 s) go out after max_delay and earn a credit that cancels a tick,
    // so the long-run rate stays at 0.2/s.
    assert!((mean - 5.0).abs() < 0.25, "mean gap {mean}");
    let d = ks_exponential(&mut gaps, 0.2);
    assert!(d < 0.05, "KS D = {d}");
}

#[test]
fn scheduler_credit_keeps_the_rate() {
    // Data arriving faster than max_delay each time earns credits; over a long run the number
    // of records equals the number of ticks (rate × time), not ticks + early sends.
    let mut rng = ChaCha20Rng::seed_from_u64(18);
    let t0 = Instant::now();
    let mut s = CoverScheduler::new(200, CoverConfig::CLIENT_LINK, t0, &mut rng);
    let mut now = t0;
    let mut sent = 0u32;
    let mut pending: Option<Instant> = None;
    let mut arrivals = BTreeSet::new();
    // One transmission every 60 s (well below the rate).
    for k in 1..=1000u64 {
        arrivals.insert(t0 + Duration::from_secs(60 * k));
    }
    let end = t0 + Duration::from_secs(60_000);
    while now < end {
        let next_arrival = arrivals.iter().next().copied();
        let wake = s.next_wakeup(pending);
        now = match next_arrival {
            Some(a) if a < wake => a,
            _ => wake,
        };
        if next_arrival == Some(now) {
            arrivals.remove(&now);
            pending.get_or_insert(now);
        }
        while let Some(a) = s.poll(now, pending, &mut rng) {
            sent += 1;
            if a == muxd_grp::cover::CoverAction::Data {
                pending = None;
            }
        }
    }
    let expected = 0.2 * 60_000.0;
    let ratio = f64::from(sent) / expected;
    assert!((ratio - 1.0).abs() < 0.03, "{sent} records vs {expected}");
    let _ = rng.next_u32();
}
