//! Executes the §9 commands of one established link, with the §8.5 authorization rules and
//! the §9.3 table of what is allowed on which kind of link.
//!
//! Everything here is synchronous: a transmission goes in, [`Action`]s come out. Queue
//! commands are answered at once; PRXY and PFWD need the network (a relay link to D), so they
//! come out as actions that the link driver hands to [`crate::proxy`].

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muxd_grp::Role;
use muxd_grp::proxy::{ForwardKey, ProxyCryptoError};
use muxd_smp::command::{Command, QueueMode, QueueRequest, Response, SubscriptionMode};
use muxd_smp::crypto::{cb_nonce, ed25519_verify, verify_x25519_authenticator};
use muxd_smp::encoding::Parser;
use muxd_smp::error::{BrokerError, CmdError, ErrorType, ProxyError, TransportError};
use muxd_smp::keys::{PublicKey, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use rand_core::OsRng;

use crate::RelayShared;
use crate::stats::Counter;
use crate::store::{ConnId, NewQueue};

/// GRP/1 defines one inner version (§9.4).
pub(crate) const VERSION: u16 = muxd_grp::INNER_VERSION;

/// `MAX_SEND_BODY`: the largest SEND body.
const MAX_SEND_BODY: usize = 16048;

/// Authorization lengths GRP accepts: none, Ed25519, X25519 authenticator (§8.1).
const AUTH_LENGTHS: [usize; 3] = [0, 64, 80];

/// The tags a client link takes (§9.3); SMP tags GRP/1 does not define get `ERR CMD UNKNOWN`.
const ALLOWED_CLIENT: [&[u8]; 10] = [
    b"NEW", b"SUB", b"KEY", b"GET", b"ACK", b"OFF", b"DEL", b"PING", b"PRXY", b"PFWD",
];

/// One transmission to send back: corrId, entity and the encoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) corr_id: Vec<u8>,
    pub(crate) entity_id: Vec<u8>,
    pub(crate) command: Vec<u8>,
}

impl Reply {
    /// A response echoing `corr_id` and `entity_id`.
    pub(crate) fn new(corr_id: &[u8], entity_id: &[u8], response: &Response) -> Self {
        let mut command = Vec::new();
        if let Err(e) = response.encode(VERSION, &mut command) {
            // Every response this relay builds is encodable at v18; keep the link usable.
            tracing::error!(error = %e, tag = response.tag(), "response not encodable");
            command = b"ERR INTERNAL".to_vec();
        }
        Self {
            corr_id: corr_id.to_vec(),
            entity_id: entity_id.to_vec(),
            command,
        }
    }

    /// A relay event (END, DELD, pushed MSG): empty corrId.
    pub(crate) fn event(entity_id: &[u8], response: Response) -> Self {
        Self::new(b"", entity_id, &response)
    }

    /// `ERR e` echoing the request.
    pub(crate) fn err(corr_id: &[u8], entity_id: &[u8], e: ErrorType) -> Self {
        Self::new(corr_id, entity_id, &Response::Err(e))
    }

    /// The transmission bytes (no auth; the session id is implied, not on the wire).
    pub(crate) fn encode(&self, session_id: &[u8]) -> Option<Vec<u8>> {
        let a = Authorized::new(session_id, &self.corr_id, &self.entity_id, &self.command).ok()?;
        let mut t = Vec::with_capacity(self.command.len() + 60);
        encode_transmission(VERSION, b"", &a, &mut t).ok()?;
        Some(t)
    }
}

/// What the driver does with a transmission's outcome.
#[derive(Debug)]
pub(crate) enum Action {
    /// Queue this transmission on the link.
    Reply(Reply),
    /// PRXY: open or reuse a relay link to D, then answer PKEY.
    Prxy {
        corr_id: Vec<u8>,
        d_key: [u8; 32],
        host: String,
        port: u16,
    },
    /// PFWD: forward as RFWD over the relay link named by `h_pd`.
    PFwd {
        corr_id: Vec<u8>,
        h_pd: Vec<u8>,
        version: u16,
        cmd_key: Vec<u8>,
        enc_t: Vec<u8>,
    },
}

/// The command state of one established link.
#[derive(Debug)]
pub(crate) struct LinkCommands {
    role: Role,
    session_id: [u8; 32],
    auth_secret: X25519SecretKey,
    /// Client links only: the link's entry in the store.
    conn: Option<ConnId>,
    /// NEW rate limit: when the recent NEWs arrived.
    recent_new: VecDeque<Instant>,
    /// Relay links: RFWD nonces already used on this link (§10.4 step 2).
    used_nonces: HashSet<[u8; 24]>,
}

impl LinkCommands {
    pub(crate) fn new(
        role: Role,
        session_id: [u8; 32],
        auth_secret: X25519SecretKey,
        conn: Option<ConnId>,
    ) -> Self {
        Self {
            role,
            session_id,
            auth_secret,
            conn,
            recent_new: VecDeque::new(),
            used_nonces: HashSet::new(),
        }
    }

    /// Handles one transmission of a received batch.
    pub(crate) fn handle(&mut self, shared: &RelayShared, bytes: &[u8], now: Instant) -> Action {
        let t = match Transmission::decode(VERSION, &self.session_id, bytes) {
            Ok(t) => t,
            Err(_) => return Action::Reply(Reply::err(b"", b"", ErrorType::Block)),
        };
        let (corr, entity) = (t.corr_id, t.entity_id);
        let err = |e| Action::Reply(Reply::err(corr, entity, e));
        if !AUTH_LENGTHS.contains(&t.auth.len()) {
            return err(ErrorType::Block);
        }
        if t.service_sig.is_some() {
            return err(ErrorType::Cmd(CmdError::Prohibited));
        }
        if corr.len() != 24 {
            return err(ErrorType::Cmd(CmdError::Syntax));
        }
        let tag = tag_of(t.command);
        if let Err(e) = self.allowed(tag) {
            return err(ErrorType::Cmd(e));
        }
        let cmd = match Command::decode(VERSION, t.command) {
            Ok(c) => c,
            Err(_) => return err(ErrorType::Cmd(CmdError::Syntax)),
        };
        shared.counters.command(cmd.tag());
        if self.role == Role::Client && entity.len() == crate::store::ID_LEN {
            shared.counters.queue_id(false, entity);
        }
        if let Err(e) = check_credentials(&cmd, !t.auth.is_empty(), !entity.is_empty()) {
            return err(ErrorType::Cmd(e));
        }
        match cmd {
            Command::Ping => Action::Reply(Reply::new(corr, entity, &Response::Pong)),
            Command::Prxy { server, basic_auth } => {
                match prxy_target(&server, basic_auth.as_deref(), shared) {
                    Ok((d_key, host, port)) => Action::Prxy {
                        corr_id: corr.to_vec(),
                        d_key,
                        host,
                        port,
                    },
                    Err(e) => err(e),
                }
            }
            Command::PFwd { version, key, enc } => Action::PFwd {
                corr_id: corr.to_vec(),
                h_pd: entity.to_vec(),
                version,
                cmd_key: key,
                enc_t: enc,
            },
            Command::RFwd(body) => match self.relay_forward(shared, &body) {
                Ok(r) => {
                    shared.counters.add(Counter::RresSent, 1);
                    Action::Reply(Reply::new(corr, b"", &Response::RRes(r)))
                }
                Err(e) => Action::Reply(Reply::err(corr, b"", e)),
            },
            cmd => match self.execute(shared, cmd, &t, now) {
                Ok(replies) => Action::Reply(replies),
                Err(e) => err(e),
            },
        }
    }

    /// §9.3: which tags this kind of link takes.
    fn allowed(&self, tag: &[u8]) -> Result<(), CmdError> {
        let client_only = ALLOWED_CLIENT.contains(&tag) && tag != b"PING";
        let sender = tag == b"SKEY" || tag == b"SEND";
        match self.role {
            Role::Client if ALLOWED_CLIENT.contains(&tag) => Ok(()),
            // Direct SEND/SKEY are refused so two-hop routing cannot be skipped by mistake.
            Role::Client if sender || tag == b"RFWD" => Err(CmdError::Prohibited),
            Role::Relay if tag == b"PING" || tag == b"RFWD" => Ok(()),
            Role::Relay if client_only || sender => Err(CmdError::Prohibited),
            _ => Err(CmdError::Unknown),
        }
    }

    /// Queue commands on a client link, and SKEY/SEND inside RFWD.
    fn execute(
        &mut self,
        shared: &RelayShared,
        cmd: Command,
        t: &Transmission<'_>,
        now: Instant,
    ) -> Result<Reply, ErrorType> {
        let authorized = t
            .authorized(&self.session_id)
            .map_err(|_| ErrorType::Internal)?;
        let (corr, entity) = (t.corr_id, t.entity_id);
        let ok = |r: Response| Ok(Reply::new(corr, entity, &r));
        let now_unix = unix_now();
        match cmd {
            Command::New(n) => {
                let rcv_key = auth_key(&n.rcv_auth_key)?;
                let rcv_dh_key = x25519_key(&n.rcv_dh_key)?;
                if let Some(pw) = &shared.config.queue_password
                    && n.basic_auth.as_deref() != Some(pw.as_bytes())
                {
                    return Err(ErrorType::Auth);
                }
                let mode = match &n.queue_request {
                    Some(QueueRequest::Messaging(None)) => QueueMode::Messaging,
                    Some(QueueRequest::Contact(None)) => QueueMode::Contact,
                    // No short links, no "no queue request", no notifiers in GRP/1 (§9.1).
                    _ => return Err(ErrorType::Cmd(CmdError::Prohibited)),
                };
                if n.ntf_creds.is_some() {
                    return Err(ErrorType::Cmd(CmdError::Prohibited));
                }
                if !self.verify(&rcv_key, t, &authorized) {
                    return Err(ErrorType::Auth);
                }
                self.rate_limit_new(shared, now)?;
                let conn = self.conn.ok_or(ErrorType::Internal)?;
                let req = NewQueue {
                    rcv_key,
                    rcv_dh_key,
                    mode,
                    subscribe: n.sub_mode == SubscriptionMode::Subscribe,
                };
                let ids = shared.store.lock().create(conn, req, &mut OsRng)?;
                shared.counters.queue_id(false, &ids.rcv_id);
                ok(Response::Ids(ids))
            }
            Command::Send { notification, body } => {
                if body.len() > MAX_SEND_BODY {
                    return Err(ErrorType::LargeMsg);
                }
                let view = shared
                    .store
                    .lock()
                    .sender_view(entity)
                    .ok_or(ErrorType::Auth)?;
                // An unsecured queue takes only unsigned SENDs, a secured one only signed ones.
                let authorized_ok = match &view.snd_key {
                    None => t.auth.is_empty(),
                    Some(k) => !t.auth.is_empty() && self.verify(k, t, &authorized),
                };
                if !authorized_ok || !view.active {
                    return Err(ErrorType::Auth);
                }
                shared
                    .store
                    .lock()
                    .send(entity, notification, body, now_unix, &mut OsRng)?;
                ok(Response::Ok)
            }
            Command::SKey(k) => {
                let key = auth_key(&k)?;
                // SKEY is authorized by the very key it registers.
                if !self.verify(&key, t, &authorized) {
                    return Err(ErrorType::Auth);
                }
                let mut store = shared.store.lock();
                let view = store.sender_view(entity).ok_or(ErrorType::Auth)?;
                if view.mode != QueueMode::Messaging {
                    return Err(ErrorType::Cmd(CmdError::Prohibited));
                }
                store.secure(&view.rcv_id, key)?;
                ok(Response::Ok)
            }
            cmd => {
                let key = shared
                    .store
                    .lock()
                    .recipient_key(entity)
                    .ok_or(ErrorType::Auth)?;
                if !self.verify(&key, t, &authorized) {
                    return Err(ErrorType::Auth);
                }
                let conn = self.conn.ok_or(ErrorType::Internal)?;
                let mut store = shared.store.lock();
                match cmd {
                    Command::Sub => {
                        let msg = store.subscribe(conn, entity, now_unix)?;
                        drop(store);
                        // SOK first, then the waiting message as an event (§9.1).
                        if let Some(m) = msg {
                            self.push_later(shared, Reply::event(entity, m));
                        }
                        ok(Response::Sok(None))
                    }
                    Command::Key(k) => {
                        store.secure(entity, auth_key(&k)?)?;
                        ok(Response::Ok)
                    }
                    Command::Get => ok(store.get(conn, entity, now_unix)?),
                    Command::Ack(id) => ok(store.ack(conn, entity, &id, now_unix)?),
                    Command::Off => {
                        store.suspend(entity)?;
                        ok(Response::Ok)
                    }
                    Command::Del => {
                        store.delete(conn, entity)?;
                        ok(Response::Ok)
                    }
                    _ => Err(ErrorType::Cmd(CmdError::Prohibited)),
                }
            }
        }
    }

    /// The SOK-then-MSG order needs a second transmission; it goes through the link's own
    /// reply channel, which the driver drains right after this batch.
    fn push_later(&self, shared: &RelayShared, reply: Reply) {
        if let Some(conn) = self.conn {
            shared.store.lock().push_to(conn, reply);
        }
    }

    fn rate_limit_new(&mut self, shared: &RelayShared, now: Instant) -> Result<(), ErrorType> {
        let window = Duration::from_secs(60);
        while self
            .recent_new
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            self.recent_new.pop_front();
        }
        let limit = usize::try_from(shared.config.limits.new_per_minute).unwrap_or(usize::MAX);
        if self.recent_new.len() >= limit {
            return Err(ErrorType::Quota);
        }
        self.recent_new.push_back(now);
        Ok(())
    }

    fn verify(&self, key: &PublicKey, t: &Transmission<'_>, authorized: &[u8]) -> bool {
        match key {
            PublicKey::Ed25519(k) => {
                t.auth.len() == 64 && ed25519_verify(k, authorized, t.auth).is_ok()
            }
            PublicKey::X25519(k) => {
                t.auth.len() == 80
                    && verify_x25519_authenticator(
                        &self.auth_secret,
                        k,
                        &cb_nonce(t.corr_id),
                        t.auth,
                        authorized,
                    )
            }
            _ => false,
        }
    }

    /// D's side of RFWD (§10.4): open `encT`, run the one inner SKEY/SEND as if it arrived on
    /// this link (session id `h_PD`, auth key `K_PD`), and seal the answer as `encR`.
    fn relay_forward(&mut self, shared: &RelayShared, body: &[u8]) -> Result<Vec<u8>, ErrorType> {
        shared.counters.add(Counter::RfwdReceived, 1);
        let syntax = ErrorType::Cmd(CmdError::Syntax);
        let mut p = Parser::new(body);
        let n: [u8; 24] = p
            .short_string()
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(syntax.clone())?;
        let v = p.w16().map_err(|_| syntax.clone())?;
        let cmd_pub = p
            .short_string()
            .ok()
            .and_then(|k| X25519PublicKey::from_spki(k).ok())
            .ok_or(syntax.clone())?;
        let enc_t = p.tail();
        if v != VERSION {
            return Err(ErrorType::Proxy(ProxyError::Broker(
                BrokerError::Transport(TransportError::Version),
            )));
        }
        let k = ForwardKey::for_destination(
            &self.auth_secret,
            &shared.static_secret,
            &self.session_id,
            cmd_pub.as_bytes(),
        )
        .map_err(|_| ErrorType::Crypto)?;
        let inner = match k.open_command(&n, enc_t) {
            Ok(inner) => Some(inner),
            Err(ProxyCryptoError::Batch(_)) => None,
            Err(_) => return Err(ErrorType::Crypto),
        };
        if !self.used_nonces.insert(n) {
            return Err(ErrorType::Duplicate);
        }
        let reply = match inner {
            Some(inner) => self.inner_command(shared, &n, &inner),
            None => Reply::err(&n, b"", ErrorType::Block),
        };
        let t = reply.encode(&self.session_id).ok_or(ErrorType::Internal)?;
        k.seal_response(&n, &t).map_err(|_| ErrorType::Internal)
    }

    fn inner_command(&mut self, shared: &RelayShared, n: &[u8; 24], inner: &[u8]) -> Reply {
        let t = match Transmission::decode(VERSION, &self.session_id, inner) {
            Ok(t) if t.corr_id == n => t,
            _ => return Reply::err(n, b"", ErrorType::Block),
        };
        let entity = t.entity_id;
        let err = |e| Reply::err(n, entity, e);
        if !AUTH_LENGTHS.contains(&t.auth.len()) {
            return err(ErrorType::Block);
        }
        if t.service_sig.is_some() {
            return err(ErrorType::Cmd(CmdError::Prohibited));
        }
        let tag = tag_of(t.command);
        if tag != b"SKEY" && tag != b"SEND" {
            return err(ErrorType::Cmd(CmdError::Prohibited));
        }
        let cmd = match Command::decode(VERSION, t.command) {
            Ok(c) => c,
            Err(_) => return err(ErrorType::Cmd(CmdError::Syntax)),
        };
        shared.counters.command(cmd.tag());
        if !entity.is_empty() {
            shared.counters.queue_id(true, entity);
        }
        if let Err(e) = check_credentials(&cmd, !t.auth.is_empty(), !entity.is_empty()) {
            return err(ErrorType::Cmd(e));
        }
        match self.execute(shared, cmd, &t, Instant::now()) {
            Ok(r) => r,
            Err(e) => err(e),
        }
    }
}

/// PRXY's checks (§9.2, §10.2 step 2) and its target.
fn prxy_target(
    server: &muxd_smp::command::ServerRef,
    basic_auth: Option<&[u8]>,
    shared: &RelayShared,
) -> Result<([u8; 32], String, u16), ErrorType> {
    let prohibited = ErrorType::Cmd(CmdError::Prohibited);
    let ([host], Ok(d_key), None) = (
        server.hosts.as_slice(),
        <[u8; 32]>::try_from(server.key_hash.as_slice()),
        basic_auth,
    ) else {
        return Err(prohibited);
    };
    let port = match server.port.as_str() {
        "" => muxd_grp::address::Carrier::Tcp.default_port(),
        p if p.starts_with('0') || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(prohibited);
        }
        p => p.parse::<u16>().ok().filter(|&p| p > 0).ok_or(prohibited)?,
    };
    if d_key == shared.public_key || d_key == [0u8; 32] {
        return Err(ErrorType::Proxy(ProxyError::Broker(BrokerError::Host)));
    }
    Ok((d_key, host.clone(), port))
}

/// §8.5: who must, and who must not, carry auth and an entity.
fn check_credentials(cmd: &Command, has_auth: bool, has_entity: bool) -> Result<(), CmdError> {
    match cmd {
        Command::New(_) if !has_auth => Err(CmdError::NoAuth),
        Command::New(_) if has_entity => Err(CmdError::HasAuth),
        Command::Ping | Command::Prxy { .. } | Command::RFwd(_) if has_auth || has_entity => {
            Err(CmdError::HasAuth)
        }
        Command::PFwd { .. } if has_auth => Err(CmdError::HasAuth),
        Command::PFwd { .. } | Command::Send { .. } if !has_entity => Err(CmdError::NoEntity),
        Command::New(_)
        | Command::Ping
        | Command::Prxy { .. }
        | Command::RFwd(_)
        | Command::PFwd { .. }
        | Command::Send { .. } => Ok(()),
        _ if !has_auth => Err(CmdError::NoAuth),
        _ if !has_entity => Err(CmdError::NoEntity),
        _ => Ok(()),
    }
}

fn tag_of(command: &[u8]) -> &[u8] {
    command.split(|&b| b == b' ').next().unwrap_or_default()
}

/// A queue key from `ss(SPKI)`: Ed25519 or X25519 (§9.1).
fn auth_key(spki: &[u8]) -> Result<PublicKey, ErrorType> {
    match PublicKey::from_spki(spki) {
        Ok(k @ (PublicKey::Ed25519(_) | PublicKey::X25519(_))) => Ok(k),
        _ => Err(ErrorType::Cmd(CmdError::Syntax)),
    }
}

fn x25519_key(spki: &[u8]) -> Result<X25519PublicKey, ErrorType> {
    X25519PublicKey::from_spki(spki).map_err(|_| ErrorType::Cmd(CmdError::Syntax))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_rules() {
        assert_eq!(
            check_credentials(&Command::Ping, true, false),
            Err(CmdError::HasAuth)
        );
        assert_eq!(
            check_credentials(&Command::Sub, false, true),
            Err(CmdError::NoAuth)
        );
        assert_eq!(
            check_credentials(&Command::Sub, true, false),
            Err(CmdError::NoEntity)
        );
        assert_eq!(check_credentials(&Command::Sub, true, true), Ok(()));
        let send = Command::Send {
            notification: false,
            body: vec![],
        };
        assert_eq!(check_credentials(&send, false, true), Ok(()));
        assert_eq!(
            check_credentials(&send, false, false),
            Err(CmdError::NoEntity)
        );
        assert_eq!(tag_of(b"SEND T hello"), b"SEND");
        assert_eq!(tag_of(b"PING"), b"PING");
    }
}
