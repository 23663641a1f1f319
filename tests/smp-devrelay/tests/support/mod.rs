//! Test clients for the relay, built from the real client pieces: the `muxd_transport` TLS
//! client and the `muxd_smp` connection state machine and codecs.

#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muxd_smp::block::{BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::cert::{CertPublicKey, KeyHash};
use muxd_smp::command::{Command, NewQueue, QueueIds, QueueRequest, Response, SubscriptionMode};
use muxd_smp::connection::{
    CommandError, Connection, ConnectionConfig, CorrId, Event, ServerIdentity,
};
use muxd_smp::crypto::QueueAuthKey;
use muxd_smp::e2e::{RcvMsgBody, decrypt_msg_body};
use muxd_smp::handshake::{HandshakeParams, Session, VersionRange, client_handshake};
use muxd_smp::keys::{Ed25519SecretKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use muxd_transport::tls::client_config;
use muxd_transport::tokio_rustls::TlsConnector;
use muxd_transport::tokio_rustls::client::TlsStream;
use muxd_transport::tokio_rustls::rustls::pki_types::ServerName;
use muxd_transport::{Alpn, BlockStream, ConnectOptions, TransportError, connect_tls};
use rand_core::OsRng;
use smp_devrelay::RelayHandle;
use tokio::net::TcpStream;

/// How long a test waits for anything.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub type Blocks = BlockStream<TlsStream<TcpStream>>;

/// TLS to the relay as muxd dials it (pinned keyHash, ALPN `smp/1`), optionally WebSocket.
pub async fn dial(
    addr: SocketAddr,
    key_hash: &KeyHash,
    websocket: bool,
) -> (Blocks, CertPublicKey) {
    let tls = connect_tls(addr, key_hash, &ConnectOptions::with_alpn(Alpn::Smp))
        .await
        .unwrap();
    let leaf = CertPublicKey::from_certificate(tls.peer_certificates()[0]).unwrap();
    let blocks = if websocket {
        tls.into_websocket().await.unwrap()
    } else {
        tls.into_blocks()
    };
    (blocks, leaf)
}

/// TLS with no ALPN at all: the relay must then offer only v6.
pub async fn dial_without_alpn(addr: SocketAddr, key_hash: &KeyHash) -> (Blocks, CertPublicKey) {
    let mut config = (*client_config(*key_hash, Alpn::Smp).unwrap()).clone();
    config.alpn_protocols.clear();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let ip = ServerName::IpAddress(addr.ip().into());
    let stream = TlsConnector::from(Arc::new(config))
        .connect(ip, tcp)
        .await
        .unwrap();
    let leaf = {
        let certs = stream.get_ref().1.peer_certificates().unwrap();
        CertPublicKey::from_certificate(certs[0].as_ref()).unwrap()
    };
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    (BlockStream::tls(stream, None), leaf)
}

/// A client driven by `muxd_smp::connection::Connection` over a real socket.
pub struct Client {
    pub conn: Connection,
    io: Blocks,
    events: Vec<Event>,
    pub version: u16,
    pub encrypted: bool,
}

impl Client {
    pub async fn connect(relay: &RelayHandle) -> Self {
        Self::connect_with(relay, ConnectionConfig::default(), false).await
    }

    pub async fn connect_with(
        relay: &RelayHandle,
        config: ConnectionConfig,
        websocket: bool,
    ) -> Self {
        let addr = if websocket {
            relay.ws_local_addr().unwrap()
        } else {
            relay.local_addr()
        };
        let (io, leaf) = dial(addr, &relay.key_hash(), websocket).await;
        Self::handshake(io, leaf, relay.key_hash(), config).await
    }

    pub async fn handshake(
        io: Blocks,
        leaf: CertPublicKey,
        key_hash: KeyHash,
        config: ConnectionConfig,
    ) -> Self {
        let identity = ServerIdentity {
            key_hash,
            tls_leaf_key: leaf,
            tls_session_id: None,
        };
        let conn = Connection::new(Instant::now(), config, identity, &mut OsRng);
        let mut c = Self {
            conn,
            io,
            events: Vec::new(),
            version: 0,
            encrypted: false,
        };
        loop {
            c.read_one().await;
            if let Some(i) = c
                .events
                .iter()
                .position(|e| matches!(e, Event::Connected { .. }))
            {
                if let Event::Connected {
                    version,
                    block_encryption,
                } = c.events.remove(i)
                {
                    c.version = version;
                    c.encrypted = block_encryption;
                }
                c.flush().await;
                return c;
            }
            assert!(!c.conn.is_closed(), "handshake failed: {:?}", c.events);
        }
    }

    async fn flush(&mut self) {
        let mut buf = Vec::new();
        while self.conn.poll_transmit(Instant::now(), &mut buf).is_some() {
            self.io.write_block(&buf).await.unwrap();
            buf.clear();
        }
    }

    async fn read_one(&mut self) {
        let block = tokio::time::timeout(PATIENCE, self.io.read_block())
            .await
            .expect("timed out waiting for a block")
            .unwrap();
        self.conn.handle_input(Instant::now(), &block[..]);
        while let Some(e) = self.conn.poll_event() {
            self.events.push(e);
        }
        self.flush().await;
    }

    /// Queues commands without waiting (they go out batched in one block).
    pub fn queue(&mut self, entity: &[u8], cmd: &Command, key: Option<&QueueAuthKey>) -> CorrId {
        self.conn
            .send_command(Instant::now(), &mut OsRng, entity, cmd, key)
            .unwrap()
    }

    /// Sends everything queued and waits for the answer to `corr`.
    pub async fn wait(&mut self, corr: CorrId) -> Result<Response, CommandError> {
        self.flush().await;
        loop {
            let found = self
                .events
                .iter()
                .position(|e| matches!(e, Event::Response { corr_id, .. } if *corr_id == corr));
            if let Some(i) = found {
                let Event::Response { result, .. } = self.events.remove(i) else {
                    unreachable!()
                };
                return result;
            }
            self.read_one().await;
        }
    }

    pub async fn cmd(
        &mut self,
        entity: &[u8],
        cmd: &Command,
        key: Option<&QueueAuthKey>,
    ) -> Result<Response, CommandError> {
        let corr = self.queue(entity, cmd, key);
        self.wait(corr).await
    }

    /// The next server event (empty corrId), reading blocks as needed.
    pub async fn event(&mut self) -> (Vec<u8>, Response) {
        loop {
            let found = self
                .events
                .iter()
                .position(|e| matches!(e, Event::ServerEvent { .. }));
            if let Some(i) = found {
                let Event::ServerEvent {
                    entity_id,
                    response,
                } = self.events.remove(i)
                else {
                    unreachable!()
                };
                return (entity_id, response);
            }
            self.read_one().await;
        }
    }

    /// Asserts that no event arrives within `d`.
    pub async fn no_event_within(&mut self, d: Duration) {
        assert!(
            !self
                .events
                .iter()
                .any(|e| matches!(e, Event::ServerEvent { .. })),
            "unexpected event: {:?}",
            self.events
        );
        if let Ok(block) = tokio::time::timeout(d, self.io.read_block()).await {
            let block = block.unwrap();
            self.conn.handle_input(Instant::now(), &block[..]);
            let events: Vec<_> = std::iter::from_fn(|| self.conn.poll_event()).collect();
            panic!("unexpected block: {events:?}");
        }
    }

    /// Writes a raw block, bypassing the state machine (only valid without block encryption).
    pub async fn write_raw(&mut self, block: &[u8]) {
        self.io.write_block(block).await.unwrap();
    }

    /// Reads the next block and reports whether the server closed the connection.
    pub async fn closed_by_server(&mut self) -> bool {
        match tokio::time::timeout(PATIENCE, self.io.read_block()).await {
            Ok(Err(TransportError::Closed)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("neither data nor close within {PATIENCE:?}"),
        }
    }
}

/// A recipient's keys and, after NEW, the queue ids.
pub struct Recipient {
    pub auth: QueueAuthKey,
    pub dh: X25519SecretKey,
    pub ids: Option<QueueIds>,
}

impl Recipient {
    pub fn new() -> Self {
        Self {
            auth: QueueAuthKey::Ed25519(Ed25519SecretKey::generate(&mut OsRng)),
            dh: X25519SecretKey::generate(&mut OsRng),
            ids: None,
        }
    }

    pub fn new_command(&self, sub_mode: SubscriptionMode) -> Command {
        Command::New(NewQueue {
            rcv_auth_key: self.auth.public_key().to_spki(),
            rcv_dh_key: self.dh.public_key().to_spki(),
            basic_auth: None,
            sub_mode,
            queue_request: Some(QueueRequest::Messaging(None)),
            ntf_creds: None,
        })
    }

    /// NEW on `client`; stores and returns the ids.
    pub async fn create(&mut self, client: &mut Client, sub_mode: SubscriptionMode) -> QueueIds {
        match client
            .cmd(b"", &self.new_command(sub_mode), Some(&self.auth))
            .await
        {
            Ok(Response::Ids(ids)) => {
                self.ids = Some(ids.clone());
                ids
            }
            other => panic!("NEW answered {other:?}"),
        }
    }

    pub fn rcv_id(&self) -> Vec<u8> {
        self.ids.as_ref().unwrap().rcv_id.clone()
    }

    pub fn snd_id(&self) -> Vec<u8> {
        self.ids.as_ref().unwrap().snd_id.clone()
    }

    /// Opens a MSG body with X25519(rcvDhPriv, srvDhKey) and nonce = msgId.
    pub fn open(&self, msg_id: &[u8], body: &[u8]) -> RcvMsgBody {
        assert_eq!(body.len(), 16122, "MSG bodies are constant-size");
        let srv = X25519PublicKey::from_spki(&self.ids.as_ref().unwrap().srv_dh_key).unwrap();
        decrypt_msg_body(&self.dh.diffie_hellman(&srv), msg_id, body).unwrap()
    }
}

pub fn send(body: &[u8]) -> Command {
    Command::Send {
        notification: true,
        body: body.to_vec(),
    }
}

/// Unpacks a MSG into `(msgId, sentBody)` after decrypting it; panics on anything else.
pub fn message(r: &Recipient, resp: &Response) -> (Vec<u8>, Vec<u8>) {
    let Response::Msg { msg_id, body } = resp else {
        panic!("expected MSG, got {resp:?}")
    };
    match r.open(msg_id, body) {
        RcvMsgBody::Message { body, .. } => (msg_id.clone(), body),
        other => panic!("expected a message body, got {other:?}"),
    }
}

/// A hand-driven client: the profile's handshake and codecs without the state machine, to
/// send what a correct client never would.
pub struct RawClient {
    pub io: Blocks,
    pub session: Session,
}

impl RawClient {
    /// Reads ServerHello and answers with the profile's ClientHello.
    pub async fn connect(
        mut io: Blocks,
        leaf: &CertPublicKey,
        key_hash: KeyHash,
        versions: VersionRange,
        client_key: bool,
    ) -> Self {
        let hello = io.read_block().await.unwrap();
        let params = HandshakeParams {
            key_hash,
            versions,
            tls_session_id: None,
            tls_leaf_key: leaf,
        };
        let key = client_key.then(|| X25519SecretKey::generate(&mut OsRng));
        let (reply, session) = client_handshake(&hello[..], &params, key.as_ref()).unwrap();
        io.write_block(&reply).await.unwrap();
        Self { io, session }
    }

    /// Frames a batch content as this session does (encrypted or padded) and writes it.
    pub async fn write_content(&mut self, content: &[u8]) {
        let block = match &mut self.session.block_cipher {
            Some(c) => c.encrypt_block(content).unwrap(),
            None => {
                let mut b = Vec::new();
                pad_block(content, &mut b).unwrap();
                b
            }
        };
        self.io.write_block(&block).await.unwrap();
    }

    /// One unauthorized transmission as a single-item batch.
    pub fn batch(&self, corr: &[u8], entity: &[u8], cmd: &Command) -> Vec<u8> {
        let mut bytes = Vec::new();
        cmd.encode(self.session.version, &mut bytes).unwrap();
        let a = Authorized::new(&self.session.session_id, corr, entity, &bytes).unwrap();
        let mut t = Vec::new();
        encode_transmission(self.session.version, b"", &a, &mut t).unwrap();
        let mut b = BatchBuilder::new();
        assert!(b.push(&t));
        b.take()
    }

    /// Reads one block and decodes every `(corrId, entityId, response)` in it.
    pub async fn read(&mut self) -> Vec<(Vec<u8>, Vec<u8>, Response)> {
        let block = tokio::time::timeout(PATIENCE, self.io.read_block())
            .await
            .unwrap()
            .unwrap();
        let content = match &mut self.session.block_cipher {
            Some(c) => c.decrypt_block(&block[..]).unwrap(),
            None => unpad_block(&block[..]).unwrap().to_vec(),
        };
        decode_batch(&content)
            .unwrap()
            .into_iter()
            .map(|t| {
                let t = Transmission::decode(self.session.version, &self.session.session_id, t)
                    .unwrap();
                let r = Response::decode(self.session.version, t.command).unwrap();
                (t.corr_id.to_vec(), t.entity_id.to_vec(), r)
            })
            .collect()
    }
}
