//! Known-answer tests: every value in `tests/vectors/grp-vectors.json` (a verbatim copy of
//! `shared/spec/grp-vectors.json`, set A) is reproduced or checked byte for byte.
//!
//! The walker records every leaf it reads, and the final assertion fails if any leaf of the
//! file (other than prose such as `description` and `kind`) was never read, so a vector added
//! to the file cannot be skipped silently.

use std::cell::RefCell;
use std::collections::BTreeSet;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use muxd_smp::command::{
    Command, NewQueue, QueueIds, QueueMode, QueueRequest, Response, ServerRef, SubscriptionMode,
};
use muxd_smp::crypto::{cb_decrypt, cb_encrypt, x25519_authenticator};
use muxd_smp::keys::{Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, encode_transmission};
use rand_core::{CryptoRng, RngCore};
use serde_json::Value;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::address::{Carrier, Host, RelayAddress};
use crate::block::{GoodbyeReason, batch_block, cover_block, goodbye_block};
use crate::cover::{gap_seconds, negotiate_rate};
use crate::handshake::{
    Established, Initiator, InitiatorConfig, Payload1, Payload2, ResponderConfig, respond,
};
use crate::kem::{CheckedEncapsulationKey, KemKeyPair};
use crate::proxy::{ForwardKey, ProxyKey, inner_padded, rfwd_body};
use crate::{NOISE_PARAMS, PREAMBLE, PROLOGUE, Role};

const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/grp-vectors.json"
);

/// Leaves that are prose or provenance, not values to reproduce.
const PROSE: &[&str] = &["description", "kind", "client_to_relay_note", "note"];
const METADATA: &[&str] = &["spec", "format", "computed_with", "cross_checks", "set"];

/// A JSON node that remembers which leaves were read.
#[derive(Clone, Copy)]
struct V<'a> {
    path: &'a str,
    val: &'a Value,
    seen: &'a RefCell<BTreeSet<String>>,
}

struct Owned<'a> {
    path: String,
    val: &'a Value,
    seen: &'a RefCell<BTreeSet<String>>,
}

impl<'a> Owned<'a> {
    fn v(&self) -> V<'_> {
        V {
            path: &self.path,
            val: self.val,
            seen: self.seen,
        }
    }
}

impl<'a> V<'a> {
    fn get(&self, k: &str) -> Owned<'a> {
        let val = self
            .val
            .get(k)
            .unwrap_or_else(|| panic!("{}.{k} missing", self.path));
        Owned {
            path: format!("{}.{k}", self.path),
            val,
            seen: self.seen,
        }
    }

    fn has(&self, k: &str) -> bool {
        self.val.get(k).is_some()
    }

    fn items(&self) -> Vec<Owned<'a>> {
        let arr = self.val.as_array().expect("array");
        arr.iter()
            .enumerate()
            .map(|(i, val)| Owned {
                path: format!("{}[{i}]", self.path),
                val,
                seen: self.seen,
            })
            .collect()
    }

    fn mark(&self) {
        self.seen.borrow_mut().insert(self.path.to_owned());
    }

    fn hex(&self) -> Vec<u8> {
        self.mark();
        hex::decode(self.val.as_str().expect("hex string")).expect("valid hex")
    }

    fn hex32(&self) -> [u8; 32] {
        self.hex().try_into().expect("32 bytes")
    }

    fn str(&self) -> &'a str {
        self.mark();
        self.val.as_str().expect("string")
    }

    fn u64(&self) -> u64 {
        self.mark();
        self.val.as_u64().expect("integer")
    }

    fn f64(&self) -> f64 {
        self.mark();
        self.val.as_f64().expect("number")
    }

    fn range(&self) -> (u16, u16) {
        let items = self.items();
        (items[0].v().u64() as u16, items[1].v().u64() as u16)
    }

    /// Asserts that `actual` equals this hex leaf.
    fn eq_hex(&self, actual: &[u8]) {
        assert_eq!(
            hex::encode(actual),
            hex::encode(self.hex()),
            "{}",
            self.path
        );
    }

    /// Asserts that SHA-256 of `actual` equals this hex leaf.
    fn eq_sha256(&self, actual: &[u8]) {
        self.eq_hex(&Sha256::digest(actual));
    }
}

/// An RNG that replays the given byte strings in order and panics when it runs out, so a
/// state machine that draws more or in another order than documented fails the test.
struct Replay {
    bytes: Vec<u8>,
    pos: usize,
}

impl Replay {
    fn new(parts: &[&[u8]]) -> Self {
        Self {
            bytes: parts.concat(),
            pos: 0,
        }
    }

    fn exhausted(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

impl RngCore for Replay {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.pos + dest.len();
        assert!(end <= self.bytes.len(), "replay RNG exhausted");
        dest.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for Replay {}

fn x25519_pub(private: &[u8; 32]) -> [u8; 32] {
    *X25519SecretKey::from_bytes(*private)
        .public_key()
        .as_bytes()
}

fn spki_x25519(public: [u8; 32]) -> Vec<u8> {
    X25519PublicKey::from_bytes(public).to_spki()
}

fn transmission(auth: &[u8], sid: &[u8], corr: &[u8], entity: &[u8], cmd: &[u8]) -> Vec<u8> {
    let a = Authorized::new(sid, corr, entity, cmd).unwrap();
    let mut t = Vec::new();
    encode_transmission(18, auth, &a, &mut t).unwrap();
    t
}

fn single_batch(t: &[u8]) -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&(t.len() as u16).to_be_bytes());
    b.extend_from_slice(t);
    b
}

/// The two ends of a vector handshake, for the record vectors.
struct Sessions {
    client: Established,
    relay: Established,
}

/// Runs one handshake vector (client link or relay link) through [`Initiator`] and
/// [`respond`] with replayed randomness and checks every value.
fn handshake(v: V<'_>, relay_link: bool) -> Sessions {
    let i = v.get("inputs");
    let i = i.v();
    let (init_prefix, resp_prefix) = if relay_link {
        ("p", "d")
    } else {
        ("client", "relay")
    };
    let init_static = i.get(&format!("{init_prefix}_static_private")).v().hex32();
    let init_eph = i
        .get(&format!("{init_prefix}_ephemeral_private"))
        .v()
        .hex32();
    let resp_static = i.get(&format!("{resp_prefix}_static_private")).v().hex32();
    let resp_eph = i
        .get(&format!("{resp_prefix}_ephemeral_private"))
        .v()
        .hex32();
    let auth_private = i
        .get(&format!("{resp_prefix}_session_auth_private"))
        .v()
        .hex32();
    let (d, z, m) = (
        i.get("mlkem_d").v().hex32(),
        i.get("mlkem_z").v().hex32(),
        i.get("mlkem_m").v().hex32(),
    );
    i.get(&format!("{init_prefix}_static_public"))
        .v()
        .eq_hex(&x25519_pub(&init_static));
    i.get(&format!("{resp_prefix}_static_public"))
        .v()
        .eq_hex(&x25519_pub(&resp_static));
    if i.has(&format!("{init_prefix}_ephemeral_public")) {
        i.get(&format!("{init_prefix}_ephemeral_public"))
            .v()
            .eq_hex(&x25519_pub(&init_eph));
    }
    if i.has(&format!("{resp_prefix}_ephemeral_public")) {
        i.get(&format!("{resp_prefix}_ephemeral_public"))
            .v()
            .eq_hex(&x25519_pub(&resp_eph));
    }
    i.get(&format!("{resp_prefix}_session_auth_public"))
        .v()
        .eq_hex(&x25519_pub(&auth_private));
    let addr_key = if relay_link {
        "d_address"
    } else {
        "relay_address"
    };
    let addr: RelayAddress = i.get(addr_key).v().str().parse().unwrap();
    assert_eq!(
        addr.key,
        x25519_pub(&resp_static),
        "address names the responder"
    );

    let role = match i.get("role").v().str() {
        "C" => Role::Client,
        "R" => Role::Relay,
        other => panic!("role {other}"),
    };
    let (imin, imax) = i.get(&format!("{init_prefix}_inner_range")).v().range();
    let (rmin, rmax) = i.get(&format!("{resp_prefix}_inner_range")).v().range();
    let cover_req = i.get(&format!("{init_prefix}_cover_rate_req")).v().u64() as u16;
    let cover_default = i.get(&format!("{resp_prefix}_cover_default")).v().u64() as u16;
    let bounds = i.get(&format!("{resp_prefix}_cover_bounds")).v().range();
    assert_eq!(negotiate_rate(0, role, bounds), cover_default);

    if !relay_link {
        v.get("preamble").v().eq_hex(&PREAMBLE);
        v.get("prologue").v().eq_hex(PROLOGUE);
        assert_eq!(v.get("protocol_name").v().str(), NOISE_PARAMS);
    }

    // Initiator: draws (fresh static,) ephemeral, d, z.
    let cfg = InitiatorConfig {
        relay_key: addr.key,
        role,
        static_key: relay_link.then(|| Zeroizing::new(init_static)),
        inner: muxd_smp::handshake::VersionRange::new(imin, imax).unwrap(),
        cover_rate_req: cover_req,
    };
    let mut rng = if relay_link {
        Replay::new(&[&init_eph, &d, &z])
    } else {
        Replay::new(&[&init_static, &init_eph, &d, &z])
    };
    let (initiator, msg1) = Initiator::start(cfg, &mut rng).unwrap();
    assert!(rng.exhausted());
    let kem = KemKeyPair::from_seeds(&d, &z);
    let p1 = Payload1 {
        ek: Box::new(*kem.encapsulation_key()),
        role,
        inner: muxd_smp::handshake::VersionRange::new(imin, imax).unwrap(),
        cover_rate_req: cover_req,
    };
    v.get("message1_payload").v().eq_hex(&p1.encode());
    assert_eq!(Payload1::decode(&p1.encode()).unwrap(), p1);
    v.get("message1").v().eq_hex(&msg1);

    // Responder: draws ephemeral, m, auth key.
    let mut resp = ResponderConfig::new(Zeroizing::new(resp_static));
    resp.inner = muxd_smp::handshake::VersionRange::new(rmin, rmax).unwrap();
    resp.cover_bounds = bounds;
    if relay_link {
        resp.allow_list.insert(x25519_pub(&init_static));
    }
    let mut rng = Replay::new(&[&resp_eph, &m, &auth_private]);
    let (record2, relay) = respond(&resp, &msg1, &mut rng).unwrap();
    assert!(rng.exhausted());
    let (_, ss) = CheckedEncapsulationKey::new(kem.encapsulation_key())
        .unwrap()
        .encapsulate_with(&m);
    v.get("psk").v().eq_hex(ss.as_slice());
    let negotiated = v.get("negotiated");
    let negotiated = negotiated.v();
    let version = negotiated.get("inner_version").v().u64() as u16;
    let rate = negotiated.get("cover_rate_milli").v().u64() as u16;
    let p2 = Payload2 {
        auth_key: x25519_pub(&auth_private),
        inner_min: rmin,
        inner_max: rmax,
        cover_rate: rate,
    };
    v.get("message2_payload").v().eq_hex(&p2.encode());
    if v.has("message2") {
        v.get("message2").v().eq_hex(&record2[crate::kem::CT_LEN..]);
    }
    v.get("record2").v().eq_hex(&record2);

    let client = initiator.finish(&record2).unwrap();
    assert_eq!(client.inner_version, Some(version));
    assert_eq!(relay.inner_version, Some(version));
    assert_eq!((client.cover_rate, relay.cover_rate), (rate, rate));
    assert_eq!(relay.peer_static, x25519_pub(&init_static));
    assert_eq!(client.auth_key.as_bytes(), &p2.auth_key);
    v.get("handshake_hash").v().eq_hex(&client.session_id);
    assert_eq!(client.session_id, relay.session_id);
    let (c2r, r2c) = if relay_link {
        ("transport_key_p_to_d", "transport_key_d_to_p")
    } else {
        (
            "transport_key_client_to_relay",
            "transport_key_relay_to_client",
        )
    };
    v.get(c2r).v().eq_hex(&client.raw_keys.0);
    v.get(r2c).v().eq_hex(&client.raw_keys.1);
    assert_eq!(client.raw_keys, relay.raw_keys);
    Sessions { client, relay }
}

fn mlkem(v: V<'_>) {
    let kp = KemKeyPair::from_seeds(&v.get("d").v().hex32(), &v.get("z").v().hex32());
    v.get("ek").v().eq_hex(kp.encapsulation_key());
    v.get("dk_sha256")
        .v()
        .eq_sha256(&kp.decapsulation_key_bytes());
    let ek = CheckedEncapsulationKey::new(kp.encapsulation_key()).unwrap();
    let (ct, ss) = ek.encapsulate_with(&v.get("m").v().hex32());
    v.get("ct").v().eq_hex(ct.as_slice());
    v.get("shared_secret").v().eq_hex(ss.as_slice());
    assert_eq!(*kp.decapsulate(&ct), *ss);
}

/// `ENCRYPT(k, n, empty, plain)` with the Noise ChaChaPoly nonce, independent of snow.
fn chacha(key: &[u8; 32], n: u64, plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_le_bytes());
    let mut buf = plain.to_vec();
    let tag = ChaCha20Poly1305::new(key.into())
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut buf)
        .unwrap();
    buf.extend_from_slice(&tag);
    buf
}

/// Builds the block of one record entry from its parts with this crate's block functions.
fn entry_block(e: V<'_>, sid: &[u8; 32]) -> Vec<u8> {
    if !e.has("block_content") {
        let block = cover_block();
        if e.has("block_sha256") {
            e.get("block_sha256").v().eq_sha256(&block);
        }
        return block;
    }
    let content = e.get("block_content").v().hex();
    if content.starts_with(&[0xff, 0xff]) {
        let block = goodbye_block(GoodbyeReason::from_byte(content[2]));
        assert_eq!(&block[..3], content.as_slice());
        return block;
    }
    if e.has("transmission") {
        let t = e.get("transmission").v().hex();
        let corr = if e.has("corr_id") {
            e.get("corr_id").v().hex()
        } else {
            t[2..26].to_vec()
        };
        let cmd = &t[t.len() - 4..];
        assert_eq!(t, transmission(b"", sid, &corr, b"", cmd));
        assert_eq!(&content[2..], single_batch(&t).as_slice());
    }
    let block = batch_block(&content[2..]).unwrap();
    assert_eq!(&block[..content.len()], content.as_slice());
    if e.has("block_sha256") {
        e.get("block_sha256").v().eq_sha256(&block);
    }
    block
}

fn records(v: V<'_>, s: &mut Sessions) {
    let sid = s.client.session_id;
    let k0 = s.client.raw_keys.0;
    let mut k1 = [0u8; 32];
    k1.copy_from_slice(&chacha(&k0, u64::MAX, &[0u8; 32])[..32]);
    v.get("client_to_relay_key_epoch1").v().eq_hex(&k1);
    for e in v.get("client_to_relay").v().items() {
        let e = e.v();
        let n = e.get("n").v().u64();
        s.client.records.skip_sent_to(n);
        s.relay.records.skip_received_to(n);
        let block = entry_block(e, &sid);
        let record = s.client.records.seal(&block).unwrap();
        e.get("record").v().eq_hex(&record);
        let key = if n < 1024 { k0 } else { k1 };
        assert_eq!(
            record,
            chacha(&key, n, &block),
            "record {n} under the right key"
        );
        assert_eq!(s.relay.records.open(&record).unwrap(), block);
    }
    for e in v.get("relay_to_client").v().items() {
        let e = e.v();
        let n = e.get("n").v().u64();
        let block = entry_block(e, &sid);
        assert_eq!(s.relay.records.sent(), n);
        let record = s.relay.records.seal(&block).unwrap();
        e.get("record").v().eq_hex(&record);
        assert_eq!(record, chacha(&s.client.raw_keys.1, n, &block));
        assert_eq!(s.client.records.open(&record).unwrap(), block);
    }
}

fn x25519_auth(v: V<'_>, sid: &[u8; 32]) {
    v.get("session_id").v().eq_hex(sid);
    let qpriv = v.get("queue_auth_private").v().hex32();
    v.get("queue_auth_public").v().eq_hex(&x25519_pub(&qpriv));
    v.get("queue_auth_public_spki")
        .v()
        .eq_hex(&spki_x25519(x25519_pub(&qpriv)));
    let relay_auth = X25519PublicKey::from_bytes(v.get("relay_session_auth_public").v().hex32());
    let corr: [u8; 24] = v.get("corr_id").v().hex().try_into().unwrap();
    let entity = v.get("entity_id").v().hex();
    let cmd = v.get("command").v().hex();
    let mut sub = Vec::new();
    Command::Sub.encode(18, &mut sub).unwrap();
    assert_eq!(cmd, sub);
    let a = Authorized::new(sid, &corr, &entity, &cmd).unwrap();
    v.get("authorized").v().eq_hex(a.as_bytes());
    let auth = x25519_authenticator(
        &X25519SecretKey::from_bytes(qpriv),
        &relay_auth,
        &corr,
        a.as_bytes(),
    );
    v.get("authenticator").v().eq_hex(&auth);
    let t = transmission(&auth, sid, &corr, &entity, &cmd);
    v.get("transmission").v().eq_hex(&t);
    // Here `block_content` is the batch itself (no W16 prefix, unlike the record vectors).
    v.get("block_content").v().eq_hex(&single_batch(&t));
}

/// Returns the NEW corrId and the recipient DH private key for `queue_flow`.
fn ed25519_new(v: V<'_>, sid: &[u8; 32]) -> ([u8; 24], [u8; 32]) {
    v.get("session_id").v().eq_hex(sid);
    let seed = v.get("recipient_ed25519_seed").v().hex32();
    let key = Ed25519SecretKey::from_seed(&seed);
    v.get("recipient_ed25519_public")
        .v()
        .eq_hex(key.public_key().as_bytes());
    let dh_priv = v.get("recipient_dh_private").v().hex32();
    v.get("recipient_dh_public")
        .v()
        .eq_hex(&x25519_pub(&dh_priv));
    let corr: [u8; 24] = v.get("corr_id").v().hex().try_into().unwrap();
    let new = Command::New(NewQueue {
        rcv_auth_key: key.public_key().to_spki(),
        rcv_dh_key: spki_x25519(x25519_pub(&dh_priv)),
        basic_auth: None,
        sub_mode: SubscriptionMode::Subscribe,
        queue_request: Some(QueueRequest::Messaging(None)),
        ntf_creds: None,
    });
    let mut cmd = Vec::new();
    new.encode(18, &mut cmd).unwrap();
    v.get("command").v().eq_hex(&cmd);
    let a = Authorized::new(sid, &corr, b"", &cmd).unwrap();
    v.get("authorized").v().eq_hex(a.as_bytes());
    let sig = key.sign(a.as_bytes());
    v.get("signature").v().eq_hex(&sig);
    v.get("transmission")
        .v()
        .eq_hex(&transmission(&sig, sid, &corr, b"", &cmd));
    (corr, dh_priv)
}

fn queue_flow(v: V<'_>, new_corr: &[u8; 24], recipient_dh_priv: &[u8; 32]) {
    let rcv = v.get("recipient_id").v().hex();
    let snd = v.get("sender_id").v().hex();
    let srv_priv = v.get("relay_queue_dh_private").v().hex32();
    v.get("relay_queue_dh_public")
        .v()
        .eq_hex(&x25519_pub(&srv_priv));
    v.get("recipient_dh_public")
        .v()
        .eq_hex(&x25519_pub(recipient_dh_priv));
    let ids = Response::Ids(QueueIds {
        rcv_id: rcv.clone(),
        snd_id: snd,
        srv_dh_key: spki_x25519(x25519_pub(&srv_priv)),
        queue_mode: Some(QueueMode::Messaging),
        link_id: None,
        service_id: None,
        ntf_creds: None,
    });
    let mut cmd = Vec::new();
    ids.encode(18, &mut cmd).unwrap();
    v.get("ids_transmission")
        .v()
        .eq_hex(&transmission(b"", &[], new_corr, b"", &cmd));

    let msg_id: [u8; 24] = v.get("msg_id").v().hex().try_into().unwrap();
    let ts = v.get("timestamp").v().u64() as i64;
    let body = v.get("body").v().hex();
    let mut rcv_body = ts.to_be_bytes().to_vec();
    rcv_body.extend_from_slice(b"T ");
    rcv_body.extend_from_slice(&body);
    v.get("rcv_msg_body").v().eq_hex(&rcv_body);
    let srv = X25519SecretKey::from_bytes(srv_priv);
    let dh = srv.diffie_hellman(&X25519PublicKey::from_bytes(x25519_pub(recipient_dh_priv)));
    let enc = cb_encrypt(&dh, &msg_id, &rcv_body, 16106).unwrap();
    v.get("enc_body").v().eq_hex(&enc);
    // The recipient opens it with its own DH key.
    let rdh = X25519SecretKey::from_bytes(*recipient_dh_priv)
        .diffie_hellman(&X25519PublicKey::from_bytes(x25519_pub(&srv_priv)));
    assert_eq!(cb_decrypt(&rdh, &msg_id, &enc).unwrap(), rcv_body);
    let msg = Response::Msg {
        msg_id: msg_id.to_vec(),
        body: enc,
    };
    let mut cmd = Vec::new();
    msg.encode(18, &mut cmd).unwrap();
    let t = transmission(b"", &[], b"", &rcv, &cmd);
    let head = v.get("msg_transmission_head").v().hex();
    assert_eq!(&t[..head.len()], head.as_slice());
    v.get("msg_transmission_sha256").v().eq_sha256(&t);
    assert_eq!(t.len() as u64, v.get("msg_transmission_length").v().u64());
}

/// Checks a transmission against a `{head, transmission_sha256, length}` object.
fn head_hash_len(o: V<'_>, t: &[u8]) {
    let head = o.get("head").v().hex();
    assert_eq!(
        hex::encode(&t[..head.len()]),
        hex::encode(&head),
        "{}",
        o.path
    );
    o.get("transmission_sha256").v().eq_sha256(t);
    assert_eq!(t.len() as u64, o.get("length").v().u64(), "{}", o.path);
}

fn proxy_send(v: V<'_>, client_link: &Sessions, relay_link: &Sessions, d_static: &[u8; 32]) {
    let h_pd = relay_link.client.session_id;
    let k_pd = *relay_link.client.auth_key.as_bytes();
    let d_static_pub = x25519_pub(d_static);

    // PRXY and PKEY on the client link (P's session; no auth).
    let prxy = v.get("prxy");
    let prxy = prxy.v();
    let corr = prxy.get("corr_id").v().hex();
    let mut cmd = Vec::new();
    Command::Prxy {
        server: ServerRef {
            hosts: vec!["relay-d.example.net".into()],
            port: String::new(),
            key_hash: d_static_pub.to_vec(),
        },
        basic_auth: None,
    }
    .encode(18, &mut cmd)
    .unwrap();
    let sid = client_link.client.session_id;
    prxy.get("transmission")
        .v()
        .eq_hex(&transmission(b"", &sid, &corr, b"", &cmd));
    let pkey = v.get("pkey");
    let pkey = pkey.v();
    pkey.get("relay_session_id").v().eq_hex(&h_pd);
    pkey.get("relay_session_auth_public").v().eq_hex(&k_pd);
    let pk = ProxyKey {
        session_id: h_pd,
        min_version: 18,
        max_version: 18,
        auth_key: k_pd,
    };
    let mut cmd = Vec::new();
    pk.encode(&mut cmd).unwrap();
    assert_eq!(ProxyKey::decode(&cmd).unwrap(), pk);
    pkey.get("transmission")
        .v()
        .eq_hex(&transmission(b"", &sid, &corr, b"", &cmd));

    // The inner SEND, signed for D over h_PD.
    let seed = v.get("sender_ed25519_seed").v().hex32();
    let skey = Ed25519SecretKey::from_seed(&seed);
    v.get("sender_ed25519_public")
        .v()
        .eq_hex(skey.public_key().as_bytes());
    let snd = v.get("sender_id").v().hex();
    let n: [u8; 24] = v.get("nonce_N").v().hex().try_into().unwrap();
    let body = v.get("body").v().hex();
    let mut send = Vec::new();
    Command::Send {
        notification: true,
        body,
    }
    .encode(18, &mut send)
    .unwrap();
    v.get("inner_command").v().eq_hex(&send);
    let a = Authorized::new(&h_pd, &n, &snd, &send).unwrap();
    v.get("inner_authorized").v().eq_hex(a.as_bytes());
    let sig = skey.sign(a.as_bytes());
    v.get("inner_signature").v().eq_hex(&sig);
    let inner = transmission(&sig, &h_pd, &n, &snd, &send);
    v.get("inner_transmission").v().eq_hex(&inner);
    v.get("inner_batch").v().eq_hex(&single_batch(&inner));
    v.get("inner_padded_sha256")
        .v()
        .eq_sha256(&inner_padded(&inner).unwrap());

    // The PFWD box, client side, then D's side.
    let cmd_priv = v.get("cmd_private").v().hex32();
    let cmd_pub = x25519_pub(&cmd_priv);
    v.get("cmd_public").v().eq_hex(&cmd_pub);
    let cmd_key = X25519SecretKey::from_bytes(cmd_priv);
    let dh1 = cmd_key.diffie_hellman(&X25519PublicKey::from_bytes(k_pd));
    let dh2 = cmd_key.diffie_hellman(&X25519PublicKey::from_bytes(d_static_pub));
    v.get("dh1").v().eq_hex(dh1.as_bytes());
    v.get("dh2").v().eq_hex(dh2.as_bytes());
    let k = ForwardKey::for_client(&cmd_key, &h_pd, &k_pd, &d_static_pub).unwrap();
    v.get("k").v().eq_hex(k.as_bytes());
    let enc_t = k.seal_command(&n, &inner).unwrap();
    v.get("enc_t").v().eq_hex(&enc_t);
    let d_auth = relay_link.relay.auth_secret.as_ref().unwrap();
    let kd = ForwardKey::for_destination(
        d_auth,
        &X25519SecretKey::from_bytes(*d_static),
        &h_pd,
        &cmd_pub,
    )
    .unwrap();
    assert_eq!(kd.as_bytes(), k.as_bytes());
    assert_eq!(kd.open_command(&n, &enc_t).unwrap(), inner);

    let mut pfwd = Vec::new();
    Command::PFwd {
        version: 18,
        key: spki_x25519(cmd_pub),
        enc: enc_t.clone(),
    }
    .encode(18, &mut pfwd)
    .unwrap();
    head_hash_len(
        v.get("pfwd").v(),
        &transmission(b"", &sid, &n, &h_pd, &pfwd),
    );

    let rfwd_o = v.get("rfwd");
    let rfwd_o = rfwd_o.v();
    let m = rfwd_o.get("corr_id").v().hex();
    let mut rfwd = Vec::new();
    Command::RFwd(rfwd_body(&n, 18, &cmd_pub, &enc_t).unwrap())
        .encode(18, &mut rfwd)
        .unwrap();
    head_hash_len(rfwd_o, &transmission(b"", &h_pd, &m, b"", &rfwd));

    // D's answer: OK on corrId N, entity sndId, boxed with reverse(N).
    let mut ok = Vec::new();
    Response::Ok.encode(18, &mut ok).unwrap();
    let resp = transmission(b"", &h_pd, &n, &snd, &ok);
    v.get("response_transmission").v().eq_hex(&resp);
    v.get("response_padded_sha256")
        .v()
        .eq_sha256(&inner_padded(&resp).unwrap());
    let enc_r = kd.seal_response(&n, &resp).unwrap();
    v.get("enc_r").v().eq_hex(&enc_r);
    assert_eq!(k.open_response(&n, &enc_r).unwrap(), resp);
    let mut rres = Vec::new();
    Response::RRes(enc_r.clone()).encode(18, &mut rres).unwrap();
    head_hash_len(v.get("rres").v(), &transmission(b"", &h_pd, &m, b"", &rres));
    let mut pres = Vec::new();
    Response::PRes(enc_r).encode(18, &mut pres).unwrap();
    head_hash_len(
        v.get("pres").v(),
        &transmission(b"", &sid, &n, &h_pd, &pres),
    );
}

fn blocks(v: V<'_>) {
    let c = cover_block();
    v.get("cover_block_head").v().eq_hex(&c[..4]);
    v.get("cover_block_sha256").v().eq_sha256(&c);
    let g = goodbye_block(GoodbyeReason::SessionAge);
    v.get("goodbye_block_head_reason_01").v().eq_hex(&g[..4]);
    v.get("goodbye_block_sha256_reason_01").v().eq_sha256(&g);
}

fn uris(v: V<'_>) {
    for case in v.get("valid").v().items() {
        let c = case.v();
        let a: RelayAddress = c.get("uri").v().str().parse().unwrap();
        let carrier = match a.carrier {
            Carrier::Tcp => "tcp",
            Carrier::Quic => "quic",
            Carrier::Ws => "ws",
            Carrier::Wss => "wss",
        };
        assert_eq!(c.get("carrier").v().str(), carrier);
        c.get("key_hex").v().eq_hex(&a.key);
        assert_eq!(c.get("host").v().str(), a.host.to_string());
        let kind = match a.host {
            Host::Dns(_) => "dns",
            Host::Ipv4(_) => "ipv4",
            Host::Ipv6(_) => "ipv6",
        };
        assert_eq!(c.get("host_kind").v().str(), kind);
        assert_eq!(c.get("port").v().u64(), u64::from(a.port));
        let path = c.get("path");
        path.v().mark();
        assert_eq!(path.val.as_str(), a.path.as_deref());
        let canonical = c.get("canonical").v().str().to_owned();
        assert_eq!(a.to_string(), canonical);
        // The canonical form parses to the same address.
        assert_eq!(canonical.parse::<RelayAddress>().unwrap(), a);
    }
    for case in v.get("invalid").v().items() {
        let c = case.v();
        let uri = c.get("uri").v().str().to_owned();
        let err = uri.parse::<RelayAddress>().unwrap_err();
        assert_eq!(err.name(), c.get("error").v().str(), "{uri}");
    }
}

fn cover_gap(v: V<'_>) {
    for case in v.get("cases").v().items() {
        let c = case.v();
        let rate = c.get("rate_milli").v().u64() as u16;
        let r53 = c.get("r53").v().u64();
        let want = c.get("gap_seconds").v().f64();
        let got = gap_seconds(rate, r53);
        assert!((got - want).abs() < 1e-6, "{}: {got} vs {want}", c.path);
    }
}

fn leaves(path: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if !PROSE.contains(&k.as_str()) {
                    leaves(&format!("{path}.{k}"), x, out);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(&format!("{path}[{i}]"), x, out);
            }
        }
        _ => out.push(path.to_owned()),
    }
}

#[test]
fn every_vector_reproduced() {
    let text = std::fs::read_to_string(FILE).expect("vector file");
    let root: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(root["spec"], "GRP/1");
    let seen = RefCell::new(BTreeSet::new());
    let vectors = V {
        path: "vectors",
        val: &root["vectors"],
        seen: &seen,
    };
    let names: BTreeSet<&str> = root["vectors"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let known: BTreeSet<&str> = [
        "mlkem768",
        "handshake_client_link",
        "records_client_link",
        "x25519_authenticator",
        "ed25519_new",
        "queue_flow",
        "handshake_relay_link",
        "proxy_send",
        "blocks",
        "uris",
        "cover_gap",
    ]
    .into_iter()
    .collect();
    assert_eq!(names, known, "a vector group was added or removed");

    mlkem(vectors.get("mlkem768").v());
    let mut client = handshake(vectors.get("handshake_client_link").v(), false);
    let sid = client.client.session_id;
    x25519_auth(vectors.get("x25519_authenticator").v(), &sid);
    let (new_corr, rdh) = ed25519_new(vectors.get("ed25519_new").v(), &sid);
    queue_flow(vectors.get("queue_flow").v(), &new_corr, &rdh);
    let relay = handshake(vectors.get("handshake_relay_link").v(), true);
    let d_static: [u8; 32] = hex::decode(
        root["vectors"]["handshake_relay_link"]["inputs"]["d_static_private"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .try_into()
    .unwrap();
    proxy_send(vectors.get("proxy_send").v(), &client, &relay, &d_static);
    records(vectors.get("records_client_link").v(), &mut client);
    blocks(vectors.get("blocks").v());
    uris(vectors.get("uris").v());
    cover_gap(vectors.get("cover_gap").v());

    let mut all = Vec::new();
    for (k, x) in root.as_object().unwrap() {
        if k == "vectors" {
            leaves("vectors", x, &mut all);
        } else {
            assert!(METADATA.contains(&k.as_str()), "unknown top-level key {k}");
        }
    }
    let seen = seen.borrow();
    let missed: Vec<&String> = all.iter().filter(|p| !seen.contains(*p)).collect();
    assert!(missed.is_empty(), "vector leaves never checked: {missed:?}");
    assert!(all.len() > 200, "walked {} leaves", all.len());
}
