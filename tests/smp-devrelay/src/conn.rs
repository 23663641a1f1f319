//! One client connection: the SMP handshake, then blocks in, batched responses and events out.
//!
//! [`Session`] turns a block into transmissions, store operations and response blocks; only
//! the proxy commands make it wait (for the other relay). [`serve`] is the thin tokio loop
//! around it that reads blocks, forwards events other connections caused, enforces the idle
//! timeout and writes what `Session` produced.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use muxd_smp::block::{BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::cert::{CertPublicKey, SignatureAlgorithm};
use muxd_smp::command::{Command, QueueMode, QueueRequest, Response};
use muxd_smp::crypto::{BlockCipher, cb_nonce, ed25519_verify, verify_x25519_authenticator};
use muxd_smp::error::{BrokerError, CmdError, ErrorType, ProxyError, TransportError};
use muxd_smp::keys::{KeyAlgorithm, PublicKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, TransmissionError, encode_transmission};
use muxd_smp::version;
use muxd_transport::BlockStream;
use rand_core::OsRng;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Shared;
use crate::handshake::{ServerHandshake, ServerSession, offered_versions};
use crate::proxy::{self, ProxyState};
use crate::server::Trigger;
use crate::stats::Counters;
use crate::store::{ConnId, NewQueueRequest};

/// Every tag a client may send; anything else is `CMD UNKNOWN` rather than `CMD SYNTAX`.
const COMMAND_TAGS: [&[u8]; 24] = [
    b"NEW", b"SUB", b"SUBS", b"KEY", b"RKEY", b"LSET", b"LDEL", b"NKEY", b"NDEL", b"GET", b"ACK",
    b"OFF", b"DEL", b"QUE", b"SKEY", b"SEND", b"PING", b"LKEY", b"LGET", b"NSUB", b"NSUBS",
    b"PRXY", b"PFWD", b"RFWD",
];

/// Runs one accepted connection until the client leaves, it idles out, or the relay stops.
pub(crate) async fn serve<S>(mut blocks: BlockStream<S>, shared: Arc<Shared>, mut cancel: Trigger)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let session = tokio::select! {
        () = cancel.fired() => return,
        s = handshake(&mut blocks, &shared) => s,
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            Counters::inc(&shared.counters.handshake_failures);
            tracing::debug!(error = %e, "SMP handshake refused");
            let _ = blocks.close().await;
            return;
        }
    };
    Counters::inc(&shared.counters.handshakes);
    Counters::inc(&shared.counters.open);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let conn = shared.store.lock().register(tx);
    tracing::debug!(
        ?conn,
        version = session.version,
        encrypted = session.cipher.is_some(),
        "SMP session up"
    );
    let mut session = Session::new(conn, session, shared.clone());
    let idle = shared.config.idle_timeout;
    let mut last_activity = Instant::now();
    loop {
        tokio::select! {
            () = cancel.fired() => break,
            block = blocks.read_block() => match block {
                Ok(block) => {
                    last_activity = Instant::now();
                    session.handle_block(&block[..]).await;
                }
                Err(e) => {
                    tracing::debug!(?conn, error = %e, "client connection ended");
                    break;
                }
            },
            Some((entity, response)) = rx.recv() => {
                session.handle_event(&entity, response);
                // Drain what is already queued so events share blocks.
                while let Ok((entity, response)) = rx.try_recv() {
                    session.handle_event(&entity, response);
                }
            }
            () = tokio::time::sleep_until(last_activity + idle) => {
                if shared.store.lock().has_subscriptions(conn) {
                    last_activity = Instant::now();
                } else {
                    tracing::debug!(?conn, "closing idle connection without subscriptions");
                    Counters::inc(&shared.counters.idle_closed);
                    break;
                }
            }
        }
        if let Err(e) = session.write_to(&mut blocks).await {
            tracing::debug!(?conn, error = %e, "write to client failed");
            break;
        }
    }
    shared.store.lock().unregister(conn);
    Counters::dec(&shared.counters.open);
    let _ = blocks.close().await;
}

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Handshake(#[from] crate::handshake::HandshakeError),
    #[error(transparent)]
    Transport(#[from] muxd_transport::TransportError),
    #[error("no ClientHello within the handshake timeout")]
    Timeout,
}

async fn handshake<S>(
    blocks: &mut BlockStream<S>,
    shared: &Shared,
) -> Result<ServerSession, SetupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let versions = offered_versions(blocks.alpn().is_some(), shared.config.max_version);
    let (hs, hello) = ServerHandshake::start(&shared.identity, versions, &mut OsRng)?;
    blocks.write_block(&hello).await?;
    let block = tokio::time::timeout(shared.config.handshake_timeout, blocks.read_block())
        .await
        .map_err(|_| SetupError::Timeout)??;
    Ok(hs.finish(&block[..])?)
}

/// Largest SEND body at `v` (§8.1).
fn max_message_len(v: u16) -> usize {
    if v >= version::ENCRYPTED_BLOCK {
        16048
    } else if v >= version::SENDING_PROXY {
        16064
    } else {
        16088
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The NO_AUTH / HAS_AUTH / NO_ENTITY rules (§4.3), checked before any lookup.
fn check_credentials(cmd: &Command, has_auth: bool, has_entity: bool) -> Result<(), CmdError> {
    match cmd {
        Command::New(_) if !has_auth => Err(CmdError::NoAuth),
        Command::New(_) if has_entity => Err(CmdError::HasAuth),
        Command::New(_) => Ok(()),
        Command::Ping | Command::Prxy { .. } | Command::RFwd(_) if has_auth || has_entity => {
            Err(CmdError::HasAuth)
        }
        Command::Ping | Command::Prxy { .. } | Command::RFwd(_) => Ok(()),
        Command::PFwd { .. } | Command::LGet if has_auth => Err(CmdError::HasAuth),
        Command::PFwd { .. } | Command::LGet | Command::Send { .. } if !has_entity => {
            Err(CmdError::NoEntity)
        }
        Command::PFwd { .. } | Command::LGet | Command::Send { .. } => Ok(()),
        _ if !has_auth => Err(CmdError::NoAuth),
        _ if !has_entity => Err(CmdError::NoEntity),
        _ => Ok(()),
    }
}

/// A queue key from `ss(SPKI)`: Ed25519, Ed448 or X25519 (v7+ authenticators).
fn auth_key(spki: &[u8]) -> Result<PublicKey, ErrorType> {
    match PublicKey::from_spki(spki) {
        Ok(k) if k.algorithm() != KeyAlgorithm::X448 => Ok(k),
        _ => Err(ErrorType::Cmd(CmdError::Syntax)),
    }
}

fn x25519_key(spki: &[u8]) -> Result<X25519PublicKey, ErrorType> {
    X25519PublicKey::from_spki(spki).map_err(|_| ErrorType::Cmd(CmdError::Syntax))
}

/// Transmissions waiting to be packed into blocks, and the blocks ready to write.
#[derive(Debug)]
struct Outbox {
    batch: BatchBuilder,
    blocks: Vec<Vec<u8>>,
}

/// The synchronous state of one established connection.
#[derive(Debug)]
pub(crate) struct Session {
    conn: ConnId,
    version: u16,
    session_id: Vec<u8>,
    session_key: Option<X25519SecretKey>,
    /// The client's ClientHello key; with `session_key` it makes a proxy's RFWD secret.
    client_key: Option<X25519PublicKey>,
    cipher: Option<BlockCipher>,
    shared: Arc<Shared>,
    out: Outbox,
    proxy: ProxyState,
}

impl Session {
    fn new(conn: ConnId, s: ServerSession, shared: Arc<Shared>) -> Self {
        Self {
            conn,
            version: s.version,
            session_id: s.session_id,
            session_key: s.session_key,
            client_key: s.client_key,
            cipher: s.cipher,
            shared,
            out: Outbox {
                batch: BatchBuilder::new(),
                blocks: Vec::new(),
            },
            proxy: ProxyState::default(),
        }
    }

    /// Writes every completed response block.
    async fn write_to<S>(
        &mut self,
        blocks: &mut BlockStream<S>,
    ) -> Result<(), muxd_transport::TransportError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.seal();
        for block in std::mem::take(&mut self.out.blocks) {
            blocks.write_block(&block).await?;
        }
        Ok(())
    }

    /// Turns the pending batch into a block (encrypted when block encryption is on).
    fn seal(&mut self) {
        if self.out.batch.is_empty() {
            return;
        }
        let content = self.out.batch.take();
        let block = match &mut self.cipher {
            Some(c) => c.encrypt_block(&content).map_err(|e| e.to_string()),
            None => {
                let mut b = Vec::with_capacity(muxd_smp::block::BLOCK_SIZE);
                pad_block(&content, &mut b)
                    .map(|()| b)
                    .map_err(|e| e.to_string())
            }
        };
        match block {
            Ok(b) => self.out.blocks.push(b),
            // The batch builder keeps content within the budget, so this does not happen.
            Err(e) => tracing::error!(error = %e, "response block dropped"),
        }
    }

    /// Queues one response transmission (empty auth) for the client.
    fn push(&mut self, corr_id: &[u8], entity_id: &[u8], response: &Response) {
        let mut cmd = Vec::new();
        let t = response
            .encode(self.version, &mut cmd)
            .and_then(|()| Authorized::new(&self.session_id, corr_id, entity_id, &cmd))
            .and_then(|a| {
                let mut t = Vec::new();
                encode_transmission(self.version, b"", &a, &mut t).map(|()| t)
            });
        let t = match t {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, tag = response.tag(), "response not encodable");
                return;
            }
        };
        if !self.out.batch.push(&t) {
            self.seal();
            if !self.out.batch.push(&t) {
                tracing::error!(len = t.len(), "response larger than a block dropped");
            }
        }
    }

    fn push_err(&mut self, corr_id: &[u8], entity_id: &[u8], e: ErrorType) {
        self.push(corr_id, entity_id, &Response::Err(e));
    }

    /// An event caused elsewhere (END, DELD, a pushed MSG): sent with an empty corrId.
    fn handle_event(&mut self, entity_id: &[u8], response: Response) {
        self.push(b"", entity_id, &response);
    }

    /// Handles one received block: a bad block is answered with `ERR BLOCK` and the
    /// connection carries on (the decryption chain has advanced anyway).
    async fn handle_block(&mut self, block: &[u8]) {
        let content = match &mut self.cipher {
            Some(c) => c.decrypt_block(block).ok(),
            None => unpad_block(block).ok().map(<[u8]>::to_vec),
        };
        let Some(items) = content.as_deref().and_then(|c| decode_batch(c).ok()) else {
            Counters::inc(&self.shared.counters.bad_blocks);
            self.push_err(b"", b"", ErrorType::Block);
            return;
        };
        let now = now_unix();
        for item in items {
            match Transmission::decode(self.version, &self.session_id, item) {
                Ok(t) => self.handle_transmission(&t, now).await,
                Err(TransmissionError::SessionMismatch) => {
                    self.push_err(b"", b"", ErrorType::Session);
                }
                Err(_) => self.push_err(b"", b"", ErrorType::Block),
            }
        }
    }

    fn verify(&self, key: &PublicKey, t: &Transmission<'_>, authorized: &[u8]) -> bool {
        if t.service_sig.is_some() {
            // No service certificate was presented, so no service signature can be valid.
            return false;
        }
        match key {
            PublicKey::Ed25519(k) => ed25519_verify(k, authorized, t.auth).is_ok(),
            PublicKey::X25519(k) => self.session_key.as_ref().is_some_and(|sk| {
                verify_x25519_authenticator(sk, k, &cb_nonce(t.corr_id), t.auth, authorized)
            }),
            PublicKey::Ed448(raw) => CertPublicKey::from_raw(SignatureAlgorithm::Ed448, raw)
                .is_some_and(|k| k.verify(authorized, t.auth).is_ok()),
            _ => false,
        }
    }

    async fn handle_transmission(&mut self, t: &Transmission<'_>, now: i64) {
        let (corr, entity) = (t.corr_id, t.entity_id);
        let result = match self.parse(t, self.version) {
            Ok(Command::Prxy { server, .. }) => {
                proxy::connect(&mut self.proxy, &self.shared, &server)
                    .await
                    .map(Pushed::from)
            }
            Ok(Command::PFwd { version, key, enc }) => {
                let fwd = proxy::Forward {
                    corr_id: corr,
                    session_id: entity,
                    version,
                    key: &key,
                    enc: &enc,
                };
                proxy::forward(&mut self.proxy, &fwd)
                    .await
                    .map(Pushed::from)
            }
            Ok(Command::RFwd(enc)) => self.relay_forward(t, &enc, now).map(Pushed::from),
            Ok(cmd) => self.execute(cmd, t, now, self.version),
            Err(e) => Err(e),
        };
        match result {
            Ok(Pushed { response, event }) => {
                self.push(corr, entity, &response);
                if let Some(ev) = event {
                    self.push(b"", entity, &ev);
                }
            }
            Err(e) => self.push_err(corr, entity, e),
        }
    }

    /// Parses a command strictly at `version` and applies the credential rules.
    fn parse(&self, t: &Transmission<'_>, version: u16) -> Result<Command, ErrorType> {
        let tag = t.command.split(|&b| b == b' ').next().unwrap_or_default();
        if !COMMAND_TAGS.contains(&tag) {
            return Err(ErrorType::Cmd(CmdError::Unknown));
        }
        let cmd = match Command::decode(version, t.command) {
            Ok(c) if c.min_version() <= version => c,
            Ok(_) => return Err(ErrorType::Cmd(CmdError::Unknown)),
            Err(_) => return Err(ErrorType::Cmd(CmdError::Syntax)),
        };
        self.shared.counters.command(cmd.tag());
        check_credentials(&cmd, !t.auth.is_empty(), !t.entity_id.is_empty())
            .map_err(ErrorType::Cmd)?;
        Ok(cmd)
    }

    /// Runs a queue command (everything but the proxy commands).
    fn execute(
        &mut self,
        cmd: Command,
        t: &Transmission<'_>,
        now: i64,
        version: u16,
    ) -> Result<Pushed, ErrorType> {
        let authorized = t
            .authorized(&self.session_id)
            .map_err(|_| ErrorType::Internal)?;
        match cmd {
            Command::Ping => Ok(Response::Pong.into()),
            Command::Send { notification, body } => {
                if body.len() > max_message_len(version) {
                    return Err(ErrorType::LargeMsg);
                }
                self.send(t, &authorized, notification, body, now)
            }
            Command::SKey(key) => self.skey(t, &authorized, &key),
            Command::New(_) | Command::NSub => self.no_queue_command(&cmd, t, &authorized),
            // Proxy commands are handled before; inside RFWD they are not allowed.
            Command::Prxy { .. } | Command::PFwd { .. } | Command::RFwd(_) => {
                Err(ErrorType::Cmd(CmdError::Prohibited))
            }
            cmd => self.recipient_command(cmd, t, &authorized),
        }
    }

    /// RFWD from a proxy (this relay is the destination): opens the forwarded transmission,
    /// runs it as if the client had sent it on this connection, and seals the answer.
    fn relay_forward(
        &mut self,
        t: &Transmission<'_>,
        enc: &[u8],
        now: i64,
    ) -> Result<Response, ErrorType> {
        let (Some(session_key), Some(proxy_key)) = (&self.session_key, &self.client_key) else {
            return Err(ErrorType::Crypto);
        };
        let p2r = session_key.diffie_hellman(proxy_key);
        let fwd = proxy::open_rfwd(session_key, &p2r, t.corr_id, enc)?;
        let v = fwd.version;
        if !(version::SENDING_PROXY..=self.shared.config.max_version).contains(&v) {
            return Err(ErrorType::Proxy(ProxyError::Broker(
                BrokerError::Transport(TransportError::Version),
            )));
        }
        let (corr, entity, result) = match decode_batch(&fwd.batch).as_deref() {
            Ok([item]) => match Transmission::decode(v, &self.session_id, item) {
                Ok(inner) => {
                    let result = self.parse(&inner, v).and_then(|cmd| match cmd {
                        // Only sender commands may travel through a proxy.
                        Command::Send { .. }
                        | Command::SKey(_)
                        | Command::LKey(_)
                        | Command::LGet => self.execute(cmd, &inner, now, v),
                        _ => Err(ErrorType::Cmd(CmdError::Prohibited)),
                    });
                    (inner.corr_id.to_vec(), inner.entity_id.to_vec(), result)
                }
                Err(_) => (Vec::new(), Vec::new(), Err(ErrorType::Block)),
            },
            _ => (Vec::new(), Vec::new(), Err(ErrorType::Block)),
        };
        let response = match result {
            Ok(p) => p.response,
            Err(e) => Response::Err(e),
        };
        let mut cmd = Vec::new();
        let mut inner = Vec::new();
        response
            .encode(v, &mut cmd)
            .and_then(|()| Authorized::new(&self.session_id, &corr, &entity, &cmd))
            .and_then(|a| encode_transmission(v, b"", &a, &mut inner))
            .map_err(|_| ErrorType::Internal)?;
        let mut batch = BatchBuilder::new();
        if !batch.push(&inner) {
            return Err(ErrorType::Internal);
        }
        proxy::seal_rres(&p2r, t.corr_id, &fwd, &batch.take()).map(Response::RRes)
    }

    fn send(
        &mut self,
        t: &Transmission<'_>,
        authorized: &[u8],
        notification: bool,
        body: Vec<u8>,
        now: i64,
    ) -> Result<Pushed, ErrorType> {
        let view = self
            .shared
            .store
            .lock()
            .sender_view(t.entity_id)
            .ok_or(ErrorType::Auth)?;
        // An unsecured queue takes only unsigned SENDs, a secured one only signed ones.
        let authorized_ok = match &view.snd_key {
            None => t.auth.is_empty(),
            Some(k) => !t.auth.is_empty() && self.verify(k, t, authorized),
        };
        if !authorized_ok || !view.active {
            return Err(ErrorType::Auth);
        }
        self.shared
            .store
            .lock()
            .send(t.entity_id, notification, body, now, &mut OsRng)?;
        Ok(Response::Ok.into())
    }

    fn skey(
        &mut self,
        t: &Transmission<'_>,
        authorized: &[u8],
        key: &[u8],
    ) -> Result<Pushed, ErrorType> {
        let key = auth_key(key)?;
        // SKEY is authorized by the very key it sets.
        if !self.verify(&key, t, authorized) {
            return Err(ErrorType::Auth);
        }
        let mut store = self.shared.store.lock();
        let (rcv_id, mode) = store.by_sender(t.entity_id).ok_or(ErrorType::Auth)?;
        if mode != Some(QueueMode::Messaging) {
            return Err(ErrorType::Cmd(CmdError::Prohibited));
        }
        store.secure(&rcv_id, key)?;
        Ok(Response::Ok.into())
    }

    /// NEW (authorized by the key it registers) and NSUB (by the notifier key).
    fn no_queue_command(
        &mut self,
        cmd: &Command,
        t: &Transmission<'_>,
        authorized: &[u8],
    ) -> Result<Pushed, ErrorType> {
        match cmd {
            Command::New(n) => {
                let rcv_key = auth_key(&n.rcv_auth_key)?;
                let rcv_dh_key = x25519_key(&n.rcv_dh_key)?;
                if !self.verify(&rcv_key, t, authorized) {
                    return Err(ErrorType::Auth);
                }
                let mode = match &n.queue_request {
                    None => None,
                    Some(QueueRequest::Messaging(None)) => Some(QueueMode::Messaging),
                    Some(QueueRequest::Contact(None)) => Some(QueueMode::Contact),
                    // Short-link data (client-chosen sender ids) is not supported here.
                    Some(_) => return Err(ErrorType::Cmd(CmdError::Prohibited)),
                };
                let ntf = match &n.ntf_creds {
                    Some(c) => Some((auth_key(&c.auth_key)?, x25519_key(&c.dh_key)?)),
                    None => None,
                };
                let req = NewQueueRequest {
                    rcv_key,
                    rcv_dh_key,
                    mode,
                    subscribe: n.sub_mode == muxd_smp::command::SubscriptionMode::Subscribe,
                    ntf,
                };
                let ids = self.shared.store.lock().create(self.conn, req, &mut OsRng);
                Ok(Response::Ids(ids).into())
            }
            _ => {
                let key = self
                    .shared
                    .store
                    .lock()
                    .notifier_key(t.entity_id)
                    .ok_or(ErrorType::Auth)?;
                if !self.verify(&key, t, authorized) {
                    return Err(ErrorType::Auth);
                }
                // Notifications are not delivered by this relay; NSUB only subscribes.
                Ok(Response::Sok(None).into())
            }
        }
    }

    /// Commands authorized by the recipient key of the queue named by the entity id.
    fn recipient_command(
        &mut self,
        cmd: Command,
        t: &Transmission<'_>,
        authorized: &[u8],
    ) -> Result<Pushed, ErrorType> {
        let rcv_id = t.entity_id;
        let key = self
            .shared
            .store
            .lock()
            .recipient_key(rcv_id)
            .ok_or(ErrorType::Auth)?;
        if !self.verify(&key, t, authorized) {
            return Err(ErrorType::Auth);
        }
        let conn = self.conn;
        let mut store = self.shared.store.lock();
        match cmd {
            Command::Sub => {
                let msg = store.subscribe(conn, rcv_id)?;
                Ok(Pushed {
                    response: Response::Sok(None),
                    event: msg,
                })
            }
            Command::Key(k) => {
                store.secure(rcv_id, auth_key(&k)?)?;
                Ok(Response::Ok.into())
            }
            Command::Get => store.get(conn, rcv_id).map(Pushed::from),
            Command::Ack(msg_id) => store.ack(conn, rcv_id, &msg_id).map(Pushed::from),
            Command::Off => store.suspend(rcv_id).map(|()| Response::Ok.into()),
            Command::Del => store.delete(conn, rcv_id).map(|()| Response::Ok.into()),
            Command::Que => store.info(conn, rcv_id).map(|j| Response::Info(j).into()),
            Command::NKey(k) => {
                let key = auth_key(&k.auth_key)?;
                let dh = x25519_key(&k.dh_key)?;
                let (notifier_id, srv_ntf_dh_key) =
                    store.set_notifier(rcv_id, key, &dh, &mut OsRng);
                Ok(Response::Nid {
                    notifier_id,
                    srv_ntf_dh_key,
                }
                .into())
            }
            Command::NDel => store.delete_notifier(rcv_id).map(|()| Response::Ok.into()),
            // SUBS/NSUBS need service certificates; RKEY and the link commands need short
            // links. Neither is implemented by this relay.
            _ => Err(ErrorType::Cmd(CmdError::Prohibited)),
        }
    }
}

/// A command's response, and for SUB the message pushed right after it (empty corrId).
#[derive(Debug)]
struct Pushed {
    response: Response,
    event: Option<Response>,
}

impl From<Response> for Pushed {
    fn from(response: Response) -> Self {
        Self {
            response,
            event: None,
        }
    }
}
