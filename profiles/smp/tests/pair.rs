//! Deterministic in-memory harness: the client [`Connection`] against a scripted server built
//! from the same codecs (server side), with virtual time.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use muxd_smp::block::{BLOCK_SIZE, BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::cert::{self, CertPublicKey, SignatureAlgorithm};
use muxd_smp::command::{Command, Response};
use muxd_smp::connection::{
    BlockFault, CommandError, Connection, ConnectionConfig, ConnectionError, CorrId, Event,
    ServerIdentity,
};
use muxd_smp::crypto::{BlockCipher, QueueAuthKey, ed25519_verify, verify_x25519_authenticator};
use muxd_smp::error::{
    BlockingInfo, BlockingReason, BrokerError, CmdError, ErrorType, HandshakeFailure, NetworkError,
    ProxyError, ReconnectAction, TransportError,
};
use muxd_smp::handshake::{CertKey, ClientHello, HandshakeError, ServerHello, VersionRange};
use muxd_smp::keys::{Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

const CA_PEM: &str = include_str!("fixtures/ed25519/ca.crt");
const LEAF_PEM: &str = include_str!("fixtures/ed25519/server.crt");

fn der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// A received client command, decoded by the fake server.
#[derive(Debug)]
struct Received {
    auth: Vec<u8>,
    corr_id: Vec<u8>,
    entity_id: Vec<u8>,
    command: Command,
    authorized: Vec<u8>,
}

/// The scripted server: speaks the server side of the handshake and the block layer.
struct FakeServer {
    max_version: u16,
    session_id: Vec<u8>,
    session_key: X25519SecretKey,
    tls_leaf: Ed25519SecretKey,
    version: u16,
    cipher: Option<BlockCipher>,
}

impl FakeServer {
    fn new(max_version: u16, rng: &mut ChaCha20Rng) -> Self {
        Self {
            max_version,
            session_id: (1..=32).collect(),
            session_key: X25519SecretKey::generate(rng),
            tls_leaf: Ed25519SecretKey::generate(rng),
            version: 0,
            cipher: None,
        }
    }

    fn identity(&self) -> ServerIdentity {
        ServerIdentity {
            key_hash: cert::key_hash(&der(CA_PEM)),
            tls_leaf_key: CertPublicKey::from_raw(
                SignatureAlgorithm::Ed25519,
                self.tls_leaf.public_key().as_bytes(),
            )
            .unwrap(),
            tls_session_id: Some(self.session_id.clone()),
        }
    }

    fn server_hello(&self) -> Vec<u8> {
        let object = cert::signed_key_object(&self.session_key.public_key().to_spki());
        let sig = self.tls_leaf.sign(&object);
        let hello = ServerHello {
            versions: VersionRange::new(6, self.max_version).unwrap(),
            session_id: self.session_id.clone(),
            cert_key: Some(CertKey {
                chain: vec![der(LEAF_PEM), der(CA_PEM)],
                signed_key: cert::encode_signed_key(&object, SignatureAlgorithm::Ed25519, &sig),
            }),
        };
        let mut block = Vec::new();
        pad_block(&hello.encode().unwrap(), &mut block).unwrap();
        block
    }

    /// A v7+ ServerHello whose signed key is not valid DER: the client treats the certKey
    /// as absent.
    fn server_hello_with_garbled_cert_key(&self) -> Vec<u8> {
        let hello = ServerHello {
            versions: VersionRange::new(6, self.max_version).unwrap(),
            session_id: self.session_id.clone(),
            cert_key: Some(CertKey {
                chain: vec![der(LEAF_PEM), der(CA_PEM)],
                signed_key: vec![0x30, 0x03, 0xde, 0xad, 0x00],
            }),
        };
        let mut block = Vec::new();
        pad_block(&hello.encode().unwrap(), &mut block).unwrap();
        block
    }

    fn client_hello(&mut self, block: &[u8]) -> ClientHello {
        let hello = ClientHello::decode(unpad_block(block).unwrap()).unwrap();
        self.version = hello.version;
        if hello.version >= 11
            && let Some(k) = &hello.client_key
        {
            let dh = self.session_key.diffie_hellman(k);
            self.cipher = Some(BlockCipher::server(&self.session_id, &dh));
        }
        hello
    }

    fn open(&mut self, block: &[u8]) -> Vec<u8> {
        assert_eq!(block.len(), BLOCK_SIZE);
        match &mut self.cipher {
            Some(c) => c.decrypt_block(block).unwrap(),
            None => unpad_block(block).unwrap().to_vec(),
        }
    }

    fn recv(&mut self, block: &[u8]) -> Vec<Received> {
        let content = self.open(block);
        decode_batch(&content)
            .unwrap()
            .into_iter()
            .map(|t| {
                let t = Transmission::decode(self.version, &self.session_id, t).unwrap();
                Received {
                    auth: t.auth.to_vec(),
                    corr_id: t.corr_id.to_vec(),
                    entity_id: t.entity_id.to_vec(),
                    command: Command::decode(self.version, t.command).unwrap(),
                    authorized: t.authorized(&self.session_id).unwrap(),
                }
            })
            .collect()
    }

    /// One block carrying these `(corrId, entityId, response)` transmissions.
    fn send(&mut self, items: &[(&[u8], &[u8], Response)]) -> Vec<u8> {
        let mut batch = BatchBuilder::new();
        for (corr, entity, resp) in items {
            let mut cmd = Vec::new();
            resp.encode(self.version, &mut cmd).unwrap();
            let a = Authorized::new(&self.session_id, corr, entity, &cmd).unwrap();
            let mut t = Vec::new();
            encode_transmission(self.version, b"", &a, &mut t).unwrap();
            assert!(batch.push(&t));
        }
        self.seal(&batch.take())
    }

    fn seal(&mut self, content: &[u8]) -> Vec<u8> {
        match &mut self.cipher {
            Some(c) => c.encrypt_block(content).unwrap(),
            None => {
                let mut b = Vec::new();
                pad_block(content, &mut b).unwrap();
                b
            }
        }
    }
}

/// Client, server, virtual clock and a seeded RNG.
struct Pair {
    now: Instant,
    rng: ChaCha20Rng,
    client: Connection,
    server: FakeServer,
}

impl Pair {
    fn new(max_version: u16) -> Self {
        Self::with_config(max_version, ConnectionConfig::default())
    }

    fn with_config(max_version: u16, config: ConnectionConfig) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(u64::from(max_version));
        let now = Instant::now();
        let server = FakeServer::new(max_version, &mut rng);
        let client = Connection::new(now, config, server.identity(), &mut rng);
        Self {
            now,
            rng,
            client,
            server,
        }
    }

    /// Runs the handshake and returns the Connected event.
    fn connect(&mut self) -> Event {
        let hello = self.server.server_hello();
        self.client.handle_input(self.now, &hello);
        let block = self.transmit().expect("ClientHello");
        self.server.client_hello(&block);
        assert!(self.transmit().is_none());
        self.client.poll_event().expect("Connected")
    }

    fn transmit(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        self.client.poll_transmit(self.now, &mut buf)?;
        assert_eq!(buf.len(), BLOCK_SIZE);
        Some(buf)
    }

    fn send(&mut self, entity: &[u8], cmd: &Command, key: Option<&QueueAuthKey>) -> CorrId {
        self.client
            .send_command(self.now, &mut self.rng, entity, cmd, key)
            .unwrap()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.client.poll_event()).collect()
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
            self.client.handle_timeout(self.now, &mut self.rng);
        }
    }

    fn deliver(&mut self, block: &[u8]) -> Vec<Event> {
        self.client.handle_input(self.now, block);
        self.events()
    }
}

fn response(ev: &Event) -> (&CorrId, &Result<Response, CommandError>) {
    match ev {
        Event::Response {
            corr_id, result, ..
        } => (corr_id, result),
        other => panic!("expected a response, got {other:?}"),
    }
}

#[test]
fn handshakes_negotiate_each_version_and_ping() {
    for v in [6u16, 7, 9, 11, 16, 18] {
        let mut p = Pair::new(v);
        assert_eq!(
            p.connect(),
            Event::Connected {
                version: v,
                block_encryption: v >= 11
            },
            "v{v}"
        );
        assert_eq!(p.client.version(), Some(v));
        assert_eq!(p.server.version, v);
        assert_eq!(p.client.server_session_key().is_some(), v >= 7, "v{v}");

        let id = p.send(b"", &Command::Ping, None);
        let block = p.transmit().unwrap();
        let got = p.server.recv(&block);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].command, Command::Ping);
        assert_eq!(got[0].corr_id, id.as_bytes());
        assert!(got[0].auth.is_empty());
        let reply = p.server.send(&[(id.as_bytes(), b"", Response::Pong)]);
        let ev = p.deliver(&reply);
        assert_eq!(ev.len(), 1);
        assert_eq!(response(&ev[0]), (&id, &Ok(Response::Pong)));
        assert_eq!(p.client.in_flight(), 0);
    }
}

#[test]
fn client_without_key_gets_plain_blocks_at_v18() {
    let mut config = ConnectionConfig::default();
    config.block_encryption = false;
    let mut p = Pair::with_config(18, config);
    assert_eq!(
        p.connect(),
        Event::Connected {
            version: 18,
            block_encryption: false
        }
    );
    assert!(p.server.cipher.is_none());
}

#[test]
fn handshake_rejects_wrong_identity_and_times_out() {
    let mut p = Pair::new(18);
    // Pin a different identity: the certKey chain's keyHash no longer matches.
    let mut identity = p.server.identity();
    identity.key_hash = cert::key_hash(&der(LEAF_PEM));
    p.client = Connection::new(p.now, ConnectionConfig::default(), identity, &mut p.rng);
    let hello = p.server.server_hello();
    let ev = p.deliver(&hello);
    match &ev[..] {
        [Event::Closed(Some(ConnectionError::Handshake(HandshakeError::BadAuth(_))))] => {}
        other => panic!("{other:?}"),
    }
    assert!(p.client.is_closed());
    assert!(p.transmit().is_none());

    let mut p = Pair::new(18);
    assert_eq!(
        p.client
            .send_command(p.now, &mut p.rng, b"", &Command::Ping, None),
        Err(muxd_smp::connection::SendError::NotEstablished)
    );
    p.advance(Duration::from_secs(44));
    assert!(p.events().is_empty());
    p.advance(Duration::from_secs(1));
    let ev = p.events();
    assert_eq!(ev, [Event::Closed(Some(ConnectionError::HandshakeTimeout))]);
    assert_eq!(
        ConnectionError::HandshakeTimeout.reconnect(),
        ReconnectAction::Rehandshake
    );
}

#[test]
fn signed_subs_pack_135_per_block_and_verify() {
    let mut p = Pair::new(18);
    p.connect();
    let key = Ed25519SecretKey::generate(&mut p.rng);
    let public = key.public_key();
    let auth = QueueAuthKey::Ed25519(key);
    let ids: Vec<CorrId> = (0..136u8)
        .map(|i| p.send(&[i; 24], &Command::Sub, Some(&auth)))
        .collect();
    let first = p.transmit().unwrap();
    let second = p.transmit().unwrap();
    assert!(p.transmit().is_none());
    let got = p.server.recv(&first);
    assert_eq!(got.len(), 135);
    assert_eq!(p.server.recv(&second).len(), 1);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.command, Command::Sub);
        assert_eq!(r.corr_id, ids[i].as_bytes());
        assert_eq!(r.entity_id, [u8::try_from(i).unwrap(); 24]);
        assert_eq!(r.auth.len(), 64);
        ed25519_verify(&public, &r.authorized, &r.auth).unwrap();
    }
    // Unique corrIds.
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len());
}

#[test]
fn x25519_authenticator_verifies_on_the_server() {
    let mut p = Pair::new(18);
    p.connect();
    let key = X25519SecretKey::generate(&mut p.rng);
    let public = key.public_key();
    let auth = QueueAuthKey::X25519(key);
    p.send(&[9; 24], &Command::Get, Some(&auth));
    let block = p.transmit().unwrap();
    let got = p.server.recv(&block);
    assert_eq!(got[0].auth.len(), 80);
    let nonce: [u8; 24] = got[0].corr_id.clone().try_into().unwrap();
    assert!(verify_x25519_authenticator(
        &p.server.session_key,
        &public,
        &nonce,
        &got[0].auth,
        &got[0].authorized
    ));
}

#[test]
fn sub_answered_by_sok_then_separate_msg() {
    for v in [15u16, 18] {
        let mut p = Pair::new(v);
        p.connect();
        let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut p.rng));
        let q = [5u8; 24];
        let id = p.send(&q, &Command::Sub, Some(&auth));
        p.transmit().unwrap();
        let msg = Response::Msg {
            msg_id: vec![1; 24],
            body: vec![0xab; 16122],
        };
        let sok = p.server.send(&[(id.as_bytes(), &q, Response::Sok(None))]);
        let push = p.server.send(&[(b"", &q, msg.clone())]);
        let ev = p.deliver(&sok);
        // Below v16 the server answers OK instead of SOK.
        let expected = if v >= 16 {
            Response::Sok(None)
        } else {
            Response::Ok
        };
        assert_eq!(response(&ev[0]), (&id, &Ok(expected)));
        let ev = p.deliver(&push);
        assert_eq!(
            ev,
            [Event::ServerEvent {
                entity_id: q.to_vec(),
                response: msg
            }]
        );
    }
}

#[test]
fn ack_answered_by_next_msg_and_events_kept_apart() {
    let mut p = Pair::new(18);
    p.connect();
    let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut p.rng));
    let q = [7u8; 24];
    let id = p.send(&q, &Command::Ack(vec![1; 24]), Some(&auth));
    p.transmit().unwrap();
    let next = Response::Msg {
        msg_id: vec![2; 24],
        body: vec![1; 16122],
    };
    // One block: the ACK's answer (next MSG with the ACK's corrId), END for another queue,
    // DELD for a third, and a response to a corrId the client never used.
    let block = p.server.send(&[
        (id.as_bytes(), &q, next.clone()),
        (b"", &[8u8; 24], Response::End),
        (b"", &[9u8; 24], Response::Deld),
        (&[0xee; 24], &q, Response::Ok),
    ]);
    let ev = p.deliver(&block);
    assert_eq!(ev.len(), 4);
    assert_eq!(response(&ev[0]), (&id, &Ok(next)));
    assert_eq!(
        ev[1],
        Event::ServerEvent {
            entity_id: vec![8; 24],
            response: Response::End
        }
    );
    assert_eq!(
        ev[2],
        Event::ServerEvent {
            entity_id: vec![9; 24],
            response: Response::Deld
        }
    );
    assert_eq!(
        ev[3],
        Event::Unexpected {
            corr_id: vec![0xee; 24],
            entity_id: q.to_vec(),
            response: Some(Response::Ok)
        }
    );
}

#[test]
fn response_for_another_entity_does_not_complete_the_command() {
    let mut p = Pair::new(18);
    p.connect();
    let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut p.rng));
    let q = [7u8; 24];
    let other = [8u8; 24];
    let ack = p.send(&q, &Command::Ack(vec![1; 24]), Some(&auth));
    let get = p.send(&q, &Command::Get, Some(&auth));
    let ping = p.send(b"", &Command::Ping, None);
    let err = p.send(&q, &Command::Get, Some(&auth));
    p.transmit().unwrap();
    // A short body so that all four answers share one block.
    let msg = Response::Msg {
        msg_id: vec![2; 24],
        body: vec![1; 100],
    };
    // The ACK's corrId on a MSG for another queue, the GET's on an OK for it too, the PING's
    // PONG on a queue id; an ERR about another entity (ERR may carry any entity).
    let block = p.server.send(&[
        (ack.as_bytes(), &other, msg.clone()),
        (get.as_bytes(), &other, Response::Ok),
        (ping.as_bytes(), &q, Response::Pong),
        (err.as_bytes(), &other, Response::Err(ErrorType::Auth)),
    ]);
    let ev = p.deliver(&block);
    assert_eq!(ev.len(), 4, "{ev:?}");
    for (e, id) in ev.iter().zip([&ack, &get, &ping]) {
        let (got, result) = response(e);
        assert_eq!(got, id);
        assert!(
            matches!(result, Err(CommandError::InvalidResponse(_))),
            "{result:?}"
        );
    }
    assert_eq!(
        response(&ev[3]),
        (&err, &Err(CommandError::Server(ErrorType::Auth)))
    );
    assert_eq!(p.client.in_flight(), 0);
    // The right answer arriving later is no longer matched to the command.
    let block = p.server.send(&[(ack.as_bytes(), &q, msg.clone())]);
    assert_eq!(
        p.deliver(&block),
        [Event::Unexpected {
            corr_id: ack.as_bytes().to_vec(),
            entity_id: q.to_vec(),
            response: Some(msg),
        }]
    );
}

#[test]
fn garbled_cert_key_at_v18_means_plain_blocks_both_ways() {
    let mut p = Pair::new(18);
    let hello = p.server.server_hello_with_garbled_cert_key();
    p.client.handle_input(p.now, &hello);
    let block = p.transmit().expect("ClientHello");
    let client_hello = p.server.client_hello(&block);
    assert_eq!(client_hello.version, 18);
    assert_eq!(client_hello.client_key, None);
    assert!(p.server.cipher.is_none());
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Connected {
            version: 18,
            block_encryption: false
        })
    );
    assert!(p.client.server_session_key().is_none());
    // Client → server: a plain padded block the server can read.
    let id = p.send(b"", &Command::Ping, None);
    let block = p.transmit().unwrap();
    assert!(unpad_block(&block).is_ok());
    assert_eq!(p.server.recv(&block)[0].command, Command::Ping);
    // Server → client: plain as well.
    let reply = p.server.send(&[(id.as_bytes(), b"", Response::Pong)]);
    assert!(unpad_block(&reply).is_ok());
    let ev = p.deliver(&reply);
    assert_eq!(response(&ev[0]), (&id, &Ok(Response::Pong)));
}

/// An Ed25519 certificate made with openssl (a dependency of the crate already).
fn openssl_cert(
    subject: &str,
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
    issuer: (&str, &openssl::pkey::PKey<openssl::pkey::Private>),
    ca: bool,
) -> Vec<u8> {
    use openssl::x509::{X509Builder, X509NameBuilder, extension::BasicConstraints};
    let name = |cn: &str| {
        let mut n = X509NameBuilder::new().unwrap();
        n.append_entry_by_text("CN", cn).unwrap();
        n.build()
    };
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    let serial = openssl::bn::BigNum::from_u32(1).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name(subject)).unwrap();
    b.set_issuer_name(&name(issuer.0)).unwrap();
    b.set_pubkey(key).unwrap();
    let t = |s| openssl::asn1::Asn1Time::from_unix(s).unwrap();
    b.set_not_before(&t(1_700_000_000)).unwrap();
    b.set_not_after(&t(2_000_000_000)).unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
    }
    b.sign(issuer.1, openssl::hash::MessageDigest::null())
        .unwrap();
    b.build().to_der().unwrap()
}

/// PRXY → PKEY → PFWD(SEND) → PRES over the connection, the fake server playing both the
/// proxy and the destination relay.
#[test]
fn send_through_a_proxy() {
    use muxd_smp::crypto::{cb_decrypt, cb_encrypt};
    use muxd_smp::proxy::{PADDED_PROXIED_LEN, ProxiedRelay, ProxiedResponse};

    let mut p = Pair::new(18);
    p.connect();
    // The destination relay's identity and session key.
    let leaf = Ed25519SecretKey::generate(&mut p.rng);
    let leaf_pkey = openssl::pkey::PKey::private_key_from_raw_bytes(
        &*leaf.to_seed(),
        openssl::pkey::Id::ED25519,
    )
    .unwrap();
    let ca = openssl::pkey::PKey::generate_ed25519().unwrap();
    let chain = vec![
        openssl_cert("relay", &leaf_pkey, ("ca", &ca), false),
        openssl_cert("ca", &ca, ("ca", &ca), true),
    ];
    let relay_session = X25519SecretKey::generate(&mut p.rng);
    let object = cert::signed_key_object(&relay_session.public_key().to_spki());
    let relay_sid = vec![0x42; 32];
    let pkey = muxd_smp::command::ProxyKey {
        session_id: relay_sid.clone(),
        min_version: 8,
        max_version: 17,
        cert_chain: chain.clone(),
        signed_key: cert::encode_signed_key(
            &object,
            SignatureAlgorithm::Ed25519,
            &leaf.sign(&object),
        ),
    };

    let prxy = Command::Prxy {
        server: muxd_smp::command::ServerRef {
            hosts: vec!["relay.example".into()],
            port: String::new(),
            key_hash: cert::key_hash(&chain[1]).as_bytes().to_vec(),
        },
        basic_auth: None,
    };
    let id = p.send(b"", &prxy, None);
    let block = p.transmit().unwrap();
    let got = p.server.recv(&block);
    assert_eq!(got[0].command, prxy);
    let reply = p.server.send(&[(id.as_bytes(), b"", Response::PKey(pkey))]);
    let ev = p.deliver(&reply);
    let Ok(Response::PKey(pkey)) = response(&ev[0]).1.clone() else {
        panic!("{ev:?}")
    };
    let relay = ProxiedRelay::from_proxy_key(
        &pkey,
        &cert::key_hash(&chain[1]),
        muxd_smp::handshake::CLIENT_VERSIONS,
        1_750_000_000,
    )
    .unwrap();
    assert_eq!(relay.version(), 17);

    let snd_id = [0x77u8; 24];
    let body = Command::Send {
        notification: true,
        body: b"proxied".to_vec(),
    };
    let (fwd_id, pending) = p
        .client
        .send_forwarded(p.now, &mut p.rng, &relay, &snd_id, &body, None)
        .unwrap();
    let block = p.transmit().unwrap();
    let got = p.server.recv(&block);
    // The proxy sees PFWD for the relay session, unauthorized, corrId = N.
    assert_eq!(
        (
            &got[0].corr_id[..],
            &got[0].entity_id[..],
            got[0].auth.len()
        ),
        (&fwd_id.as_bytes()[..], &relay_sid[..], 0)
    );
    let Command::PFwd { version, key, enc } = &got[0].command else {
        panic!("{:?}", got[0].command)
    };
    // The relay opens it...
    let secret = relay_session.diffie_hellman(&X25519PublicKey::from_spki(key).unwrap());
    let inner = cb_decrypt(&secret, fwd_id.as_bytes(), enc).unwrap();
    let items = decode_batch(&inner).unwrap();
    let t = Transmission::decode(*version, &relay_sid, items[0]).unwrap();
    assert_eq!(
        (t.corr_id, t.entity_id),
        (&fwd_id.as_bytes()[..], &snd_id[..])
    );
    assert_eq!(Command::decode(*version, t.command).unwrap(), body);
    // ...and answers OK under the reversed nonce, which the proxy returns as PRES.
    let mut ok = Vec::new();
    Response::Ok.encode(*version, &mut ok).unwrap();
    let a = Authorized::new(&relay_sid, fwd_id.as_bytes(), &snd_id, &ok).unwrap();
    let mut rt = Vec::new();
    encode_transmission(*version, b"", &a, &mut rt).unwrap();
    let mut batch = BatchBuilder::new();
    assert!(batch.push(&rt));
    let mut nonce = *fwd_id.as_bytes();
    nonce.reverse();
    let enc_r = cb_encrypt(&secret, &nonce, &batch.take(), PADDED_PROXIED_LEN).unwrap();
    let reply = p
        .server
        .send(&[(fwd_id.as_bytes(), &relay_sid, Response::PRes(enc_r))]);
    let ev = p.deliver(&reply);
    let (got_id, Ok(Response::PRes(enc_r))) = response(&ev[0]) else {
        panic!("{ev:?}")
    };
    assert_eq!(got_id, &fwd_id);
    assert_eq!(
        pending.open(enc_r),
        Ok(ProxiedResponse {
            entity_id: snd_id.to_vec(),
            response: Response::Ok
        })
    );

    // A proxy-level failure arrives as ERR PROXY on the PFWD's corrId.
    let (fwd2, _) = p
        .client
        .send_forwarded(p.now, &mut p.rng, &relay, &snd_id, &body, None)
        .unwrap();
    let block = p.transmit().unwrap();
    p.server.recv(&block);
    let reply = p.server.send(&[(
        fwd2.as_bytes(),
        &relay_sid,
        Response::Err(ErrorType::Proxy(ProxyError::NoSession)),
    )]);
    let ev = p.deliver(&reply);
    assert_eq!(
        response(&ev[0]),
        (
            &fwd2,
            &Err(CommandError::Server(ErrorType::Proxy(
                ProxyError::NoSession
            )))
        )
    );
    // Commands relays refuse through a proxy are refused here.
    assert!(matches!(
        p.client
            .send_forwarded(p.now, &mut p.rng, &relay, &snd_id, &Command::Sub, None),
        Err(muxd_smp::connection::SendError::Forward(_))
    ));
}

#[test]
fn deld_is_end_below_v10() {
    let mut p = Pair::new(9);
    p.connect();
    let block = p.server.send(&[(b"", &[1u8; 24], Response::Deld)]);
    assert_eq!(
        p.deliver(&block),
        [Event::ServerEvent {
            entity_id: vec![1; 24],
            response: Response::End
        }]
    );
}

fn all_errors() -> Vec<ErrorType> {
    use ErrorType as E;
    let mut v = vec![
        E::Block,
        E::Session,
        E::Auth,
        E::Service,
        E::Crypto,
        E::Quota,
        E::Store("x".into()),
        E::NoMsg,
        E::LargeMsg,
        E::Expired,
        E::Internal,
        E::Duplicate,
        E::Blocked(BlockingInfo {
            reason: BlockingReason::Content,
            notice: Some(r#"{"ttl":86400}"#.into()),
        }),
        E::Proxy(ProxyError::BasicAuth),
        E::Proxy(ProxyError::NoSession),
        E::Proxy(ProxyError::Protocol(Box::new(E::Auth))),
    ];
    for c in [
        CmdError::Unknown,
        CmdError::Syntax,
        CmdError::Prohibited,
        CmdError::NoAuth,
        CmdError::HasAuth,
        CmdError::NoEntity,
    ] {
        v.push(E::Cmd(c));
    }
    let mut broker = vec![
        BrokerError::Response("r".into()),
        BrokerError::Unexpected("u".into()),
        BrokerError::Timeout,
        BrokerError::Host,
        BrokerError::NoService,
        BrokerError::Network(None),
    ];
    for n in [
        NetworkError::Connect("c".into()),
        NetworkError::Tls("t".into()),
        NetworkError::UnknownCa,
        NetworkError::Failed,
        NetworkError::Timeout,
        NetworkError::Subscribe("s".into()),
    ] {
        broker.push(BrokerError::Network(Some(n)));
    }
    for t in [
        TransportError::Block,
        TransportError::Version,
        TransportError::LargeMsg,
        TransportError::Session,
        TransportError::NoAuth,
        TransportError::Handshake(HandshakeFailure::Parse),
        TransportError::Handshake(HandshakeFailure::Identity),
        TransportError::Handshake(HandshakeFailure::BadAuth),
        TransportError::Handshake(HandshakeFailure::BadService),
    ] {
        broker.push(BrokerError::Transport(t));
    }
    v.extend(broker.into_iter().map(|b| E::Proxy(ProxyError::Broker(b))));
    v
}

#[test]
fn every_err_variant_reaches_the_command() {
    let mut p = Pair::new(18);
    p.connect();
    let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut p.rng));
    let errors = all_errors();
    assert_eq!(errors.len(), 43);
    let ids: Vec<CorrId> = errors
        .iter()
        .map(|_| p.send(&[1; 24], &Command::Get, Some(&auth)))
        .collect();
    p.transmit().unwrap();
    let items: Vec<(&[u8], &[u8], Response)> = ids
        .iter()
        .zip(&errors)
        .map(|(id, e)| (&id.as_bytes()[..], &[1u8; 24][..], Response::Err(e.clone())))
        .collect();
    let block = p.server.send(&items);
    let ev = p.deliver(&block);
    assert_eq!(ev.len(), errors.len());
    for ((ev, id), e) in ev.iter().zip(&ids).zip(&errors) {
        assert_eq!(response(ev), (id, &Err(CommandError::Server(e.clone()))));
    }
    // ERR with an empty corrId (e.g. about a malformed block) is an event.
    let block = p
        .server
        .send(&[(b"", b"", Response::Err(ErrorType::Block))]);
    assert_eq!(
        p.deliver(&block),
        [Event::ServerEvent {
            entity_id: vec![],
            response: Response::Err(ErrorType::Block)
        }]
    );
}

#[test]
fn corrupted_encrypted_block_is_reported_and_chain_survives() {
    let mut p = Pair::new(18);
    p.connect();
    let id = p.send(b"", &Command::Ping, None);
    p.transmit().unwrap();
    let mut bad = p.server.send(&[(b"", &[1u8; 24], Response::End)]);
    bad[100] ^= 1;
    assert_eq!(p.deliver(&bad), [Event::BadBlock(BlockFault::Decrypt)]);
    let good = p.server.send(&[(id.as_bytes(), b"", Response::Pong)]);
    let ev = p.deliver(&good);
    assert_eq!(response(&ev[0]), (&id, &Ok(Response::Pong)));
    // A garbled transmission inside a valid block is reported too, without closing.
    let block = p.server.seal(b"\x01\x00\x03\x01\x02\x03");
    let ev = p.deliver(&block);
    assert!(
        matches!(ev[..], [Event::BadBlock(BlockFault::Transmission(_))]),
        "{ev:?}"
    );
    assert!(p.client.is_established());
}

#[test]
fn command_timeout_and_keepalive() {
    let mut p = Pair::new(18);
    p.connect();
    // No subscriptions yet: no keep-alive, so no timer at all.
    assert_eq!(p.client.poll_timeout(), None);
    let auth = QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut p.rng));
    let id = p.send(&[3; 24], &Command::Sub, Some(&auth));
    let sub = p.transmit().unwrap();
    // The server reads it (advancing its receive chain) but never answers.
    p.server.recv(&sub);
    assert_eq!(
        p.client.poll_timeout(),
        Some(p.now + Duration::from_secs(30))
    );
    p.advance(Duration::from_secs(30));
    let ev = p.events();
    assert_eq!(response(&ev[0]), (&id, &Err(CommandError::Timeout)));
    assert_eq!(CommandError::Timeout.reconnect(), ReconnectAction::Retry);

    // The SUB turned on keep-alive: after 600 s of silence a PING goes out.
    let start = p.now - Duration::from_secs(30);
    assert_eq!(
        p.client.poll_timeout(),
        Some(start + Duration::from_secs(600))
    );
    p.advance(Duration::from_secs(570));
    let block = p.transmit().expect("PING");
    let got = p.server.recv(&block);
    assert_eq!(got[0].command, Command::Ping);
    // The PONG is consumed internally.
    let pong = p.server.send(&[(&got[0].corr_id, b"", Response::Pong)]);
    assert!(p.deliver(&pong).is_empty());
    assert_eq!(p.client.in_flight(), 0);

    // Silence: PINGs time out; after 3 timeouts and 15 min of silence the connection drops.
    let mut closed = None;
    for _ in 0..200 {
        p.advance(Duration::from_secs(10));
        while let Some(b) = p.transmit() {
            p.server.recv(&b);
        }
        if let Some(Event::Closed(e)) = p
            .events()
            .into_iter()
            .find(|e| matches!(e, Event::Closed(_)))
        {
            closed = Some((p.now, e));
            break;
        }
    }
    let (at, err) = closed.expect("connection dropped");
    assert_eq!(err, Some(ConnectionError::Unresponsive));
    // Last receive was the PONG at start+600 s; pings at +1200, +1800, +2400 time out 30 s later.
    let silence = at - (start + Duration::from_secs(600));
    assert!(silence >= Duration::from_secs(15 * 60), "{silence:?}");
    assert!(silence <= Duration::from_secs(1830 + 10), "{silence:?}");
    assert!(p.client.is_closed());
}

#[test]
fn close_fails_in_flight_commands() {
    let mut p = Pair::new(16);
    p.connect();
    let id = p.send(b"", &Command::Ping, None);
    p.client.close();
    let ev = p.events();
    assert_eq!(
        response(&ev[0]),
        (&id, &Err(CommandError::ConnectionClosed))
    );
    assert_eq!(ev[1], Event::Closed(None));
    assert!(p.transmit().is_none());
    assert_eq!(p.client.poll_timeout(), None);
}

#[test]
fn version_gated_command_is_refused() {
    let mut p = Pair::new(8);
    p.connect();
    let key = X25519SecretKey::generate(&mut p.rng).public_key();
    let err = p
        .client
        .send_command(
            p.now,
            &mut p.rng,
            &[1; 24],
            &Command::SKey(key.to_spki()),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(err, muxd_smp::connection::SendError::Encode(_)),
        "{err:?}"
    );
    let _unused: Option<X25519PublicKey> = None;
}
