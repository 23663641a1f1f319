//! Commands and responses (§5.1–5.5), version-gated encoding and strict decoding.
//!
//! Both directions are implemented so the same codec can drive the client and the scripted
//! server of the test harness. Keys are carried as SPKI DER bytes (§6.5); the connection and
//! crypto layers turn them into typed keys where they are used.

use crate::encoding::{
    DecodeError, EncodeError, Parser, put_bool, put_int64, put_large, put_maybe, put_short_string,
    put_w16,
};
use crate::error::ErrorType;
use crate::version;

/// Length of the raw nonce in NMSG (a `CbNonce`, no length prefix).
pub const NONCE_LEN: usize = 24;

/// Subscription mode of NEW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionMode {
    /// `'S'`: create and subscribe on this connection.
    Subscribe,
    /// `'C'`: only create.
    OnlyCreate,
}

/// Queue mode (v9+ as the `sndSecure` Bool, v15+ explicitly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueMode {
    /// `'M'`: messaging queue; the sender may secure it with SKEY.
    Messaging,
    /// `'C'`: contact-address queue.
    Contact,
}

/// Encrypted link data of a short link: `L(encFixed) L(encUser)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkData {
    /// Encrypted immutable data.
    pub fixed: Vec<u8>,
    /// Encrypted user data.
    pub user: Vec<u8>,
}

/// `queueReqData` of NEW (v15+; at v9–14 only its mode is sent, as `sndSecure`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueRequest {
    /// `'M'`, optionally with `ss(senderId)` and link data.
    Messaging(Option<(Vec<u8>, LinkData)>),
    /// `'C'`, optionally with `ss(linkId) ss(senderId)` and link data.
    Contact(Option<(Vec<u8>, Vec<u8>, LinkData)>),
}

impl QueueRequest {
    fn mode(&self) -> QueueMode {
        match self {
            Self::Messaging(_) => QueueMode::Messaging,
            Self::Contact(_) => QueueMode::Contact,
        }
    }
}

/// Notifier credentials: an auth key and an X25519 DH key (SPKI DER each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtfKeys {
    /// The notifier's auth key.
    pub auth_key: Vec<u8>,
    /// The X25519 DH key.
    pub dh_key: Vec<u8>,
}

/// The parameters of NEW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewQueue {
    /// Recipient auth key (SPKI DER; Ed25519 recommended).
    pub rcv_auth_key: Vec<u8>,
    /// Recipient X25519 DH key (SPKI DER) for server→recipient encryption.
    pub rcv_dh_key: Vec<u8>,
    /// Server password, where the operator set one.
    pub basic_auth: Option<Vec<u8>>,
    /// Whether to subscribe on creation.
    pub sub_mode: SubscriptionMode,
    /// Queue request data (v9+; at v9–14 only the mode survives).
    pub queue_request: Option<QueueRequest>,
    /// Notifier credentials (v17+).
    pub ntf_creds: Option<NtfKeys>,
}

/// An SMP server as encoded in PRXY: `count 1*ss(host) ss(port) ss(keyHash)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRef {
    /// Host names (at least one).
    pub hosts: Vec<String>,
    /// Port as text, empty for the default.
    pub port: String,
    /// SHA-256 of the identity certificate.
    pub key_hash: Vec<u8>,
}

/// A client command (the bytes after entity id in a client transmission).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// `NEW`: create a queue (entity empty, authorized by the new recipient key).
    New(NewQueue),
    /// `SUB`: subscribe.
    Sub,
    /// `SUBS` (v16+): subscribe all queues of a service.
    Subs,
    /// `KEY ss(senderKey)`: recipient secures the queue.
    Key(Vec<u8>),
    /// `RKEY` (v15+): replace recipient keys.
    RKey(Vec<Vec<u8>>),
    /// `LSET` (v15+): set link id and data.
    LSet {
        /// Link id.
        link_id: Vec<u8>,
        /// Link data.
        data: LinkData,
    },
    /// `LDEL` (v15+): delete link data.
    LDel,
    /// `NKEY`: enable notifications.
    NKey(NtfKeys),
    /// `NDEL`: disable notifications.
    NDel,
    /// `GET`: fetch one message without subscribing.
    Get,
    /// `ACK ss(msgId)`.
    Ack(Vec<u8>),
    /// `OFF`: suspend the queue.
    Off,
    /// `DEL`: delete the queue.
    Del,
    /// `QUE`: debug info.
    Que,
    /// `SKEY` (v9+): the sender secures the queue.
    SKey(Vec<u8>),
    /// `SEND flags ' ' body`.
    Send {
        /// The notification flag (`'T'`/`'F'`).
        notification: bool,
        /// The message body (tail of the transmission).
        body: Vec<u8>,
    },
    /// `PING`.
    Ping,
    /// `LKEY` (v15+): secure a one-time link queue and fetch its data.
    LKey(Vec<u8>),
    /// `LGET` (v15+): fetch link data.
    LGet,
    /// `NSUB`: notifier subscription.
    NSub,
    /// `NSUBS` (v16+): notifier service subscription.
    NSubs,
    /// `PRXY` (v8+): ask a proxy for a relay session.
    Prxy {
        /// The relay.
        server: ServerRef,
        /// Relay password.
        basic_auth: Option<Vec<u8>>,
    },
    /// `PFWD` (v8+): a transmission forwarded through a proxy.
    PFwd {
        /// Relay version for the inner transmission.
        version: u16,
        /// Per-command X25519 key (SPKI DER).
        key: Vec<u8>,
        /// The encrypted inner transmission (tail).
        enc: Vec<u8>,
    },
    /// `RFWD` (proxy→relay only; parsed for completeness).
    RFwd(Vec<u8>),
}

/// The response to NEW.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueIds {
    /// Recipient id.
    pub rcv_id: Vec<u8>,
    /// Sender id.
    pub snd_id: Vec<u8>,
    /// Server X25519 DH key (SPKI DER) for the recipient body secret.
    pub srv_dh_key: Vec<u8>,
    /// Queue mode (v9+; from `sndSecure` at v9–14).
    pub queue_mode: Option<QueueMode>,
    /// Link id (v15+).
    pub link_id: Option<Vec<u8>>,
    /// Service id (v16+).
    pub service_id: Option<Vec<u8>>,
    /// Notifier id and server notifier DH key (v17+).
    pub ntf_creds: Option<(Vec<u8>, Vec<u8>)>,
}

/// Parameters of PKEY (response to PRXY).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyKey {
    /// Proxy-relay session id.
    pub session_id: Vec<u8>,
    /// Relay version range minimum.
    pub min_version: u16,
    /// Relay version range maximum.
    pub max_version: u16,
    /// Relay certificate chain, leaf first (DER each).
    pub cert_chain: Vec<Vec<u8>>,
    /// Signed X25519 key (DER).
    pub signed_key: Vec<u8>,
}

/// A server message (the bytes after entity id in a server transmission).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// `IDS`: queue created.
    Ids(QueueIds),
    /// `LNK` (v15+): link data.
    Lnk {
        /// Sender id.
        sender_id: Vec<u8>,
        /// Link data.
        data: LinkData,
    },
    /// `SOK maybe(serviceId)` (v16+ answer to SUB/NSUB).
    Sok(Option<Vec<u8>>),
    /// `SOKS n`: service subscription count.
    Soks(i64),
    /// `MSG ss(msgId) encBody`.
    Msg {
        /// Message id (also the body nonce).
        msg_id: Vec<u8>,
        /// Encrypted body (16122 bytes from current servers).
        body: Vec<u8>,
    },
    /// `NID`: notifier id and server notifier DH key.
    Nid {
        /// Notifier id.
        notifier_id: Vec<u8>,
        /// Server notifier DH key (SPKI DER).
        srv_ntf_dh_key: Vec<u8>,
    },
    /// `NMSG nonce ss(encMeta)`.
    NMsg {
        /// Raw 24-byte nonce.
        nonce: [u8; NONCE_LEN],
        /// Encrypted metadata.
        enc_meta: Vec<u8>,
    },
    /// `PKEY` (v8+).
    PKey(ProxyKey),
    /// `RRES` (relay→proxy only).
    RRes(Vec<u8>),
    /// `PRES` (v8+): proxied response, encrypted.
    PRes(Vec<u8>),
    /// `END`: subscribed elsewhere.
    End,
    /// `ENDS n`: service subscriptions ended.
    Ends(i64),
    /// `DELD` (v10+): deleted elsewhere.
    Deld,
    /// `INFO json`: queue info (raw JSON).
    Info(Vec<u8>),
    /// `OK`.
    Ok,
    /// `ERR errorType`.
    Err(ErrorType),
    /// `PONG`.
    Pong,
}

fn too_old(what: &'static str, need: u16, version: u16) -> Result<(), EncodeError> {
    if version < need {
        Err(EncodeError::Unsupported { what, version })
    } else {
        Ok(())
    }
}

fn put_link_data(out: &mut Vec<u8>, d: &LinkData) -> Result<(), EncodeError> {
    put_large(out, &d.fixed)?;
    put_large(out, &d.user)
}

fn link_data(p: &mut Parser<'_>) -> Result<LinkData, DecodeError> {
    Ok(LinkData {
        fixed: p.large()?.to_vec(),
        user: p.large()?.to_vec(),
    })
}

fn ss_vec(p: &mut Parser<'_>) -> Result<Vec<u8>, DecodeError> {
    Ok(p.short_string()?.to_vec())
}

fn put_queue_mode(out: &mut Vec<u8>, m: QueueMode) -> Result<(), EncodeError> {
    out.push(match m {
        QueueMode::Messaging => b'M',
        QueueMode::Contact => b'C',
    });
    Ok(())
}

fn queue_mode(p: &mut Parser<'_>) -> Result<QueueMode, DecodeError> {
    match p.u8()? {
        b'M' => Ok(QueueMode::Messaging),
        b'C' => Ok(QueueMode::Contact),
        byte => Err(DecodeError::InvalidByte {
            what: "queue mode",
            byte,
        }),
    }
}

fn put_queue_request(out: &mut Vec<u8>, q: &QueueRequest) -> Result<(), EncodeError> {
    match q {
        QueueRequest::Messaging(d) => {
            out.push(b'M');
            put_maybe(out, d.as_ref(), |o, (sid, data)| {
                put_short_string(o, sid)?;
                put_link_data(o, data)
            })
        }
        QueueRequest::Contact(d) => {
            out.push(b'C');
            put_maybe(out, d.as_ref(), |o, (lid, sid, data)| {
                put_short_string(o, lid)?;
                put_short_string(o, sid)?;
                put_link_data(o, data)
            })
        }
    }
}

fn queue_request(p: &mut Parser<'_>) -> Result<QueueRequest, DecodeError> {
    match p.u8()? {
        b'M' => Ok(QueueRequest::Messaging(
            p.maybe(|p| Ok((ss_vec(p)?, link_data(p)?)))?,
        )),
        b'C' => Ok(QueueRequest::Contact(
            p.maybe(|p| Ok((ss_vec(p)?, ss_vec(p)?, link_data(p)?)))?,
        )),
        byte => Err(DecodeError::InvalidByte {
            what: "queue request",
            byte,
        }),
    }
}

fn put_ss_pair(out: &mut Vec<u8>, a: &[u8], b: &[u8]) -> Result<(), EncodeError> {
    put_short_string(out, a)?;
    put_short_string(out, b)
}

/// Splits `TAG` or `TAG ' ' params` at the first space; the tag must be uppercase ASCII.
fn split_tag(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    match bytes.iter().position(|&b| b == b' ') {
        Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
        None => (bytes, None),
    }
}

/// Runs `f` over the parameters, which must be present, and requires it to consume them all.
fn params<T>(
    rest: Option<&[u8]>,
    f: impl FnOnce(&mut Parser<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let bytes = rest.ok_or(DecodeError::Invalid("missing parameters"))?;
    let mut p = Parser::new(bytes);
    let v = f(&mut p)?;
    p.end()?;
    Ok(v)
}

/// A tag without parameters: nothing may follow, not even a space.
fn bare<T>(rest: Option<&[u8]>, v: T) -> Result<T, DecodeError> {
    match rest {
        None => Ok(v),
        Some(_) => Err(DecodeError::Invalid("unexpected parameters")),
    }
}

impl Command {
    /// The command's tag, for logs.
    pub fn tag(&self) -> &'static str {
        match self {
            Self::New(_) => "NEW",
            Self::Sub => "SUB",
            Self::Subs => "SUBS",
            Self::Key(_) => "KEY",
            Self::RKey(_) => "RKEY",
            Self::LSet { .. } => "LSET",
            Self::LDel => "LDEL",
            Self::NKey(_) => "NKEY",
            Self::NDel => "NDEL",
            Self::Get => "GET",
            Self::Ack(_) => "ACK",
            Self::Off => "OFF",
            Self::Del => "DEL",
            Self::Que => "QUE",
            Self::SKey(_) => "SKEY",
            Self::Send { .. } => "SEND",
            Self::Ping => "PING",
            Self::LKey(_) => "LKEY",
            Self::LGet => "LGET",
            Self::NSub => "NSUB",
            Self::NSubs => "NSUBS",
            Self::Prxy { .. } => "PRXY",
            Self::PFwd { .. } => "PFWD",
            Self::RFwd(_) => "RFWD",
        }
    }

    /// The lowest SMP version at which the server knows this command.
    pub fn min_version(&self) -> u16 {
        match self {
            Self::Prxy { .. } | Self::PFwd { .. } | Self::RFwd(_) => version::SENDING_PROXY,
            Self::SKey(_) => version::SND_AUTH_KEY,
            Self::RKey(_) | Self::LSet { .. } | Self::LDel | Self::LKey(_) | Self::LGet => {
                version::SHORT_LINKS
            }
            Self::Subs | Self::NSubs => version::SERVICE_CERTS,
            _ => version::MIN,
        }
    }

    /// Appends the command as sent at `version`.
    pub fn encode(&self, version: u16, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        too_old(self.tag(), self.min_version(), version)?;
        out.extend_from_slice(self.tag().as_bytes());
        match self {
            Self::New(n) => {
                out.push(b' ');
                put_short_string(out, &n.rcv_auth_key)?;
                put_short_string(out, &n.rcv_dh_key)?;
                if version >= version::SND_AUTH_KEY {
                    put_maybe(out, n.basic_auth.as_deref(), put_short_string)?;
                } else if let Some(a) = &n.basic_auth {
                    out.push(b'A');
                    put_short_string(out, a)?;
                }
                out.push(match n.sub_mode {
                    SubscriptionMode::Subscribe => b'S',
                    SubscriptionMode::OnlyCreate => b'C',
                });
                if version >= version::SHORT_LINKS {
                    put_maybe(out, n.queue_request.as_ref(), put_queue_request)?;
                } else if version >= version::SND_AUTH_KEY {
                    let secure = matches!(
                        n.queue_request.as_ref().map(QueueRequest::mode),
                        Some(QueueMode::Messaging)
                    );
                    put_bool(out, secure);
                }
                if version >= version::NEW_NTF_CREDS {
                    put_maybe(out, n.ntf_creds.as_ref(), |o, k| {
                        put_ss_pair(o, &k.auth_key, &k.dh_key)
                    })?;
                }
            }
            Self::Key(k) | Self::SKey(k) | Self::LKey(k) => {
                out.push(b' ');
                put_short_string(out, k)?;
            }
            Self::RKey(keys) => {
                out.push(b' ');
                let n = u8::try_from(keys.len()).ok().filter(|&n| n > 0).ok_or(
                    EncodeError::TooLong {
                        what: "RKEY key list (1..=255)",
                        len: keys.len(),
                        max: 255,
                    },
                )?;
                out.push(n);
                for k in keys {
                    put_short_string(out, k)?;
                }
            }
            Self::LSet { link_id, data } => {
                out.push(b' ');
                put_short_string(out, link_id)?;
                put_link_data(out, data)?;
            }
            Self::NKey(k) => {
                out.push(b' ');
                put_ss_pair(out, &k.auth_key, &k.dh_key)?;
            }
            Self::Ack(id) => {
                out.push(b' ');
                put_short_string(out, id)?;
            }
            Self::Send { notification, body } => {
                out.push(b' ');
                put_bool(out, *notification);
                out.push(b' ');
                out.extend_from_slice(body);
            }
            Self::Prxy { server, basic_auth } => {
                out.push(b' ');
                let n = u8::try_from(server.hosts.len())
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(EncodeError::TooLong {
                        what: "PRXY host list (1..=255)",
                        len: server.hosts.len(),
                        max: 255,
                    })?;
                out.push(n);
                for h in &server.hosts {
                    put_short_string(out, h.as_bytes())?;
                }
                put_short_string(out, server.port.as_bytes())?;
                put_short_string(out, &server.key_hash)?;
                put_maybe(out, basic_auth.as_deref(), put_short_string)?;
            }
            Self::PFwd {
                version: v,
                key,
                enc,
            } => {
                out.push(b' ');
                put_w16(out, *v);
                put_short_string(out, key)?;
                out.extend_from_slice(enc);
            }
            Self::RFwd(enc) => {
                out.push(b' ');
                out.extend_from_slice(enc);
            }
            Self::Sub
            | Self::Subs
            | Self::LDel
            | Self::NDel
            | Self::Get
            | Self::Off
            | Self::Del
            | Self::Que
            | Self::Ping
            | Self::LGet
            | Self::NSub
            | Self::NSubs => {}
        }
        Ok(())
    }

    /// Parses a command received at `version` (server side; used by the test harness).
    pub fn decode(version: u16, bytes: &[u8]) -> Result<Self, DecodeError> {
        let (tag, rest) = split_tag(bytes);
        let cmd = match tag {
            b"NEW" => params(rest, |p| {
                let rcv_auth_key = ss_vec(p)?;
                let rcv_dh_key = ss_vec(p)?;
                let basic_auth = if version >= version::SND_AUTH_KEY {
                    p.maybe(ss_vec)?
                } else if p.peek() == Some(b'A') {
                    p.u8()?;
                    Some(ss_vec(p)?)
                } else {
                    None
                };
                let sub_mode = match p.u8()? {
                    b'S' => SubscriptionMode::Subscribe,
                    b'C' => SubscriptionMode::OnlyCreate,
                    byte => {
                        return Err(DecodeError::InvalidByte {
                            what: "subscription mode",
                            byte,
                        });
                    }
                };
                let queue_request = if version >= version::SHORT_LINKS {
                    p.maybe(queue_request)?
                } else if version >= version::SND_AUTH_KEY {
                    Some(if p.bool()? {
                        QueueRequest::Messaging(None)
                    } else {
                        QueueRequest::Contact(None)
                    })
                } else {
                    None
                };
                let ntf_creds = if version >= version::NEW_NTF_CREDS {
                    p.maybe(|p| {
                        Ok(NtfKeys {
                            auth_key: ss_vec(p)?,
                            dh_key: ss_vec(p)?,
                        })
                    })?
                } else {
                    None
                };
                Ok(Self::New(NewQueue {
                    rcv_auth_key,
                    rcv_dh_key,
                    basic_auth,
                    sub_mode,
                    queue_request,
                    ntf_creds,
                }))
            })?,
            b"SUB" => bare(rest, Self::Sub)?,
            b"SUBS" => bare(rest, Self::Subs)?,
            b"KEY" => params(rest, |p| ss_vec(p).map(Self::Key))?,
            b"RKEY" => params(rest, |p| {
                let n = p.u8()?;
                if n == 0 {
                    return Err(DecodeError::Invalid("empty RKEY"));
                }
                (0..n)
                    .map(|_| ss_vec(p))
                    .collect::<Result<_, _>>()
                    .map(Self::RKey)
            })?,
            b"LSET" => params(rest, |p| {
                Ok(Self::LSet {
                    link_id: ss_vec(p)?,
                    data: link_data(p)?,
                })
            })?,
            b"LDEL" => bare(rest, Self::LDel)?,
            b"NKEY" => params(rest, |p| {
                Ok(Self::NKey(NtfKeys {
                    auth_key: ss_vec(p)?,
                    dh_key: ss_vec(p)?,
                }))
            })?,
            b"NDEL" => bare(rest, Self::NDel)?,
            b"GET" => bare(rest, Self::Get)?,
            b"ACK" => params(rest, |p| ss_vec(p).map(Self::Ack))?,
            b"OFF" => bare(rest, Self::Off)?,
            b"DEL" => bare(rest, Self::Del)?,
            b"QUE" => bare(rest, Self::Que)?,
            b"SKEY" => params(rest, |p| ss_vec(p).map(Self::SKey))?,
            b"SEND" => params(rest, |p| {
                let notification = p.bool()?;
                // Up to six reserved flag characters may follow; skip to the space.
                while p.peek().is_some_and(|b| b != b' ') {
                    p.u8()?;
                }
                p.space()?;
                Ok(Self::Send {
                    notification,
                    body: p.tail().to_vec(),
                })
            })?,
            b"PING" => bare(rest, Self::Ping)?,
            b"LKEY" => params(rest, |p| ss_vec(p).map(Self::LKey))?,
            b"LGET" => bare(rest, Self::LGet)?,
            b"NSUB" => bare(rest, Self::NSub)?,
            b"NSUBS" => bare(rest, Self::NSubs)?,
            b"PRXY" => params(rest, |p| {
                let n = p.u8()?;
                if n == 0 {
                    return Err(DecodeError::Invalid("empty host list"));
                }
                let hosts = (0..n)
                    .map(|_| {
                        let h = p.short_string()?;
                        String::from_utf8(h.to_vec()).map_err(|_| DecodeError::Invalid("host"))
                    })
                    .collect::<Result<_, _>>()?;
                let port = String::from_utf8(p.short_string()?.to_vec())
                    .map_err(|_| DecodeError::Invalid("port"))?;
                let key_hash = ss_vec(p)?;
                let basic_auth = p.maybe(ss_vec)?;
                Ok(Self::Prxy {
                    server: ServerRef {
                        hosts,
                        port,
                        key_hash,
                    },
                    basic_auth,
                })
            })?,
            b"PFWD" => params(rest, |p| {
                Ok(Self::PFwd {
                    version: p.w16()?,
                    key: ss_vec(p)?,
                    enc: p.tail().to_vec(),
                })
            })?,
            b"RFWD" => params(rest, |p| Ok(Self::RFwd(p.tail().to_vec())))?,
            _ => return Err(DecodeError::Invalid("unknown command")),
        };
        Ok(cmd)
    }
}

impl Response {
    /// The response's tag, for logs.
    pub fn tag(&self) -> &'static str {
        match self {
            Self::Ids(_) => "IDS",
            Self::Lnk { .. } => "LNK",
            Self::Sok(_) => "SOK",
            Self::Soks(_) => "SOKS",
            Self::Msg { .. } => "MSG",
            Self::Nid { .. } => "NID",
            Self::NMsg { .. } => "NMSG",
            Self::PKey(_) => "PKEY",
            Self::RRes(_) => "RRES",
            Self::PRes(_) => "PRES",
            Self::End => "END",
            Self::Ends(_) => "ENDS",
            Self::Deld => "DELD",
            Self::Info(_) => "INFO",
            Self::Ok => "OK",
            Self::Err(_) => "ERR",
            Self::Pong => "PONG",
        }
    }

    /// Appends the response as a server sends it at `version`, including the server's
    /// down-grades for old clients (SOK→OK below v16, DELD→END below v10, BLOCKED→AUTH below
    /// v12, the notice stripped below v18). Used by the test harness's scripted server.
    pub fn encode(&self, version: u16, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Self::Sok(_) if version < version::SERVICE_CERTS => {
                out.extend_from_slice(b"OK");
                return Ok(());
            }
            Self::Deld if version < version::DELETED_EVENT => {
                out.extend_from_slice(b"END");
                return Ok(());
            }
            _ => {}
        }
        out.extend_from_slice(self.tag().as_bytes());
        match self {
            Self::Ids(ids) => {
                out.push(b' ');
                put_short_string(out, &ids.rcv_id)?;
                put_short_string(out, &ids.snd_id)?;
                put_short_string(out, &ids.srv_dh_key)?;
                if version >= version::SHORT_LINKS {
                    put_maybe(out, ids.queue_mode, put_queue_mode)?;
                    put_maybe(out, ids.link_id.as_deref(), put_short_string)?;
                } else if version >= version::SND_AUTH_KEY {
                    put_bool(out, ids.queue_mode == Some(QueueMode::Messaging));
                }
                if version >= version::SERVICE_CERTS {
                    put_maybe(out, ids.service_id.as_deref(), put_short_string)?;
                }
                if version >= version::NEW_NTF_CREDS {
                    put_maybe(out, ids.ntf_creds.as_ref(), |o, (a, b)| {
                        put_ss_pair(o, a, b)
                    })?;
                }
            }
            Self::Lnk { sender_id, data } => {
                out.push(b' ');
                put_short_string(out, sender_id)?;
                put_link_data(out, data)?;
            }
            Self::Sok(id) => {
                out.push(b' ');
                put_maybe(out, id.as_deref(), put_short_string)?;
            }
            Self::Soks(n) | Self::Ends(n) => {
                out.push(b' ');
                put_int64(out, *n);
            }
            Self::Msg { msg_id, body } => {
                out.push(b' ');
                put_short_string(out, msg_id)?;
                out.extend_from_slice(body);
            }
            Self::Nid {
                notifier_id,
                srv_ntf_dh_key,
            } => {
                out.push(b' ');
                put_ss_pair(out, notifier_id, srv_ntf_dh_key)?;
            }
            Self::NMsg { nonce, enc_meta } => {
                out.push(b' ');
                out.extend_from_slice(nonce);
                put_short_string(out, enc_meta)?;
            }
            Self::PKey(k) => {
                out.push(b' ');
                put_short_string(out, &k.session_id)?;
                put_w16(out, k.min_version);
                put_w16(out, k.max_version);
                let n = u8::try_from(k.cert_chain.len())
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(EncodeError::TooLong {
                        what: "certificate chain (1..=255)",
                        len: k.cert_chain.len(),
                        max: 255,
                    })?;
                out.push(n);
                for c in &k.cert_chain {
                    put_large(out, c)?;
                }
                put_large(out, &k.signed_key)?;
            }
            Self::RRes(b) | Self::PRes(b) | Self::Info(b) => {
                out.push(b' ');
                out.extend_from_slice(b);
            }
            Self::Err(e) => {
                out.push(b' ');
                downgrade_error(e, version).encode(out)?;
            }
            Self::End | Self::Deld | Self::Ok | Self::Pong => {}
        }
        Ok(())
    }

    /// Parses a server message received at `version`, strictly.
    pub fn decode(version: u16, bytes: &[u8]) -> Result<Self, DecodeError> {
        let (tag, rest) = split_tag(bytes);
        Ok(match tag {
            b"IDS" => params(rest, |p| {
                let rcv_id = ss_vec(p)?;
                let snd_id = ss_vec(p)?;
                let srv_dh_key = ss_vec(p)?;
                let (queue_mode, link_id) = if version >= version::SHORT_LINKS {
                    (p.maybe(queue_mode)?, p.maybe(ss_vec)?)
                } else if version >= version::SND_AUTH_KEY {
                    let m = if p.bool()? {
                        QueueMode::Messaging
                    } else {
                        QueueMode::Contact
                    };
                    (Some(m), None)
                } else {
                    (None, None)
                };
                let service_id = if version >= version::SERVICE_CERTS {
                    p.maybe(ss_vec)?
                } else {
                    None
                };
                let ntf_creds = if version >= version::NEW_NTF_CREDS {
                    p.maybe(|p| Ok((ss_vec(p)?, ss_vec(p)?)))?
                } else {
                    None
                };
                Ok(Self::Ids(QueueIds {
                    rcv_id,
                    snd_id,
                    srv_dh_key,
                    queue_mode,
                    link_id,
                    service_id,
                    ntf_creds,
                }))
            })?,
            b"LNK" => params(rest, |p| {
                Ok(Self::Lnk {
                    sender_id: ss_vec(p)?,
                    data: link_data(p)?,
                })
            })?,
            b"SOK" => params(rest, |p| p.maybe(ss_vec).map(Self::Sok))?,
            b"SOKS" => params(rest, |p| p.int64().map(Self::Soks))?,
            b"MSG" => params(rest, |p| {
                Ok(Self::Msg {
                    msg_id: ss_vec(p)?,
                    body: p.tail().to_vec(),
                })
            })?,
            b"NID" => params(rest, |p| {
                Ok(Self::Nid {
                    notifier_id: ss_vec(p)?,
                    srv_ntf_dh_key: ss_vec(p)?,
                })
            })?,
            b"NMSG" => params(rest, |p| {
                Ok(Self::NMsg {
                    nonce: p.array()?,
                    enc_meta: ss_vec(p)?,
                })
            })?,
            b"PKEY" => params(rest, |p| {
                let session_id = ss_vec(p)?;
                let min_version = p.w16()?;
                let max_version = p.w16()?;
                if min_version > max_version {
                    return Err(DecodeError::Invalid("version range"));
                }
                let n = p.u8()?;
                if n == 0 {
                    return Err(DecodeError::Invalid("empty certificate chain"));
                }
                let cert_chain = (0..n)
                    .map(|_| p.large().map(<[u8]>::to_vec))
                    .collect::<Result<_, _>>()?;
                Ok(Self::PKey(ProxyKey {
                    session_id,
                    min_version,
                    max_version,
                    cert_chain,
                    signed_key: p.large()?.to_vec(),
                }))
            })?,
            b"RRES" => params(rest, |p| Ok(Self::RRes(p.tail().to_vec())))?,
            b"PRES" => params(rest, |p| Ok(Self::PRes(p.tail().to_vec())))?,
            b"END" => bare(rest, Self::End)?,
            b"ENDS" => params(rest, |p| p.int64().map(Self::Ends))?,
            b"DELD" => bare(rest, Self::Deld)?,
            b"INFO" => params(rest, |p| Ok(Self::Info(p.tail().to_vec())))?,
            b"OK" => bare(rest, Self::Ok)?,
            b"ERR" => params(rest, |p| ErrorType::parse(p).map(Self::Err))?,
            b"PONG" => bare(rest, Self::Pong)?,
            _ => return Err(DecodeError::Invalid("unknown response")),
        })
    }

    /// Whether the entity id of a transmission carrying this response is acceptable, as the
    /// reference client checks: PONG, PKEY and RRES need an empty entity; IDS and ERR may have
    /// any; all others need a non-empty one.
    pub fn entity_ok(&self, entity_id: &[u8]) -> bool {
        match self {
            Self::Pong | Self::PKey(_) | Self::RRes(_) => entity_id.is_empty(),
            Self::Ids(_) | Self::Err(_) => true,
            _ => !entity_id.is_empty(),
        }
    }
}

/// The server's rewrite of `ERR BLOCKED` for older clients.
fn downgrade_error(e: &ErrorType, version: u16) -> ErrorType {
    match e {
        ErrorType::Blocked(_) if version < version::BLOCKED_ENTITY => ErrorType::Auth,
        ErrorType::Blocked(info) if version < version::CLIENT_NOTICES => {
            let mut info = info.clone();
            info.notice = None;
            ErrorType::Blocked(info)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BlockingInfo, BlockingReason};

    fn seq(start: u8, n: u8) -> Vec<u8> {
        (start..start + n).collect()
    }

    fn ed_spki() -> Vec<u8> {
        let mut k = hex::decode("302a300506032b6570032100").unwrap();
        k.extend(
            hex::decode("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
                .unwrap(),
        );
        k
    }

    fn x_spki() -> Vec<u8> {
        let mut k = hex::decode("302a300506032b656e032100").unwrap();
        k.extend(
            hex::decode("675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52f")
                .unwrap(),
        );
        k
    }

    fn v3_new() -> NewQueue {
        NewQueue {
            rcv_auth_key: ed_spki(),
            rcv_dh_key: x_spki(),
            basic_auth: None,
            sub_mode: SubscriptionMode::Subscribe,
            queue_request: Some(QueueRequest::Messaging(None)),
            ntf_creds: None,
        }
    }

    fn enc(c: &Command, v: u16) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode(v, &mut out).unwrap();
        out
    }

    #[test]
    fn v3_new_per_version() {
        let keys = format!(
            "4e4557202c{}2c{}",
            hex::encode(ed_spki()),
            hex::encode(x_spki())
        );
        let new = Command::New(v3_new());
        assert_eq!(hex::encode(enc(&new, 18)), format!("{keys}3053314d3030"));
        assert_eq!(hex::encode(enc(&new, 17)), format!("{keys}3053314d3030"));
        assert_eq!(hex::encode(enc(&new, 16)), format!("{keys}3053314d30"));
        assert_eq!(hex::encode(enc(&new, 15)), format!("{keys}3053314d30"));
        assert_eq!(hex::encode(enc(&new, 14)), format!("{keys}305354"));
        assert_eq!(hex::encode(enc(&new, 9)), format!("{keys}305354"));
        assert_eq!(hex::encode(enc(&new, 8)), format!("{keys}53"));
        assert_eq!(hex::encode(enc(&new, 6)), format!("{keys}53"));
        for v in [6, 8, 9, 14, 15, 16, 17, 18] {
            let decoded = Command::decode(v, &enc(&new, v)).unwrap();
            let mut expected = v3_new();
            if v < 9 {
                expected.queue_request = None;
            }
            assert_eq!(decoded, Command::New(expected), "v{v}");
        }
        // v6..8 legacy basic auth.
        let mut with_auth = v3_new();
        with_auth.basic_auth = Some(b"pw".to_vec());
        let bytes = enc(&Command::New(with_auth.clone()), 7);
        assert!(bytes.ends_with(b"A\x02pwS"));
        with_auth.queue_request = None;
        assert_eq!(Command::decode(7, &bytes).unwrap(), Command::New(with_auth));
    }

    #[test]
    fn v3_full_transmission() {
        use crate::transmission::{Authorized, encode_transmission};
        use ed25519_dalek::{Signer, SigningKey};
        let key = SigningKey::from_bytes(&seq(0, 32).try_into().unwrap());
        let cmd = enc(&Command::New(v3_new()), 18);
        let a = Authorized::new(&seq(1, 32), &seq(0x40, 24), b"", &cmd).unwrap();
        let sig = key.sign(a.as_bytes()).to_bytes();
        let mut t = Vec::new();
        encode_transmission(18, &sig, &a, &mut t).unwrap();
        let expected = format!(
            "40{}3018{}00{}",
            "8806583ce85007e98e7d99c0fcc63d8ccd4989e150cdae5ace5688a0619e855dcbde9474931e57823c6262a07800bab07b311a3de27fc89cce7b9340942ee905",
            hex::encode(seq(0x40, 24)),
            hex::encode(&cmd)
        );
        assert_eq!(hex::encode(t), expected);
    }

    #[test]
    fn version_gated_commands() {
        assert!(matches!(
            Command::SKey(ed_spki()).encode(8, &mut Vec::new()),
            Err(EncodeError::Unsupported { .. })
        ));
        assert!(Command::LGet.encode(14, &mut Vec::new()).is_err());
        assert_eq!(enc(&Command::LGet, 15), b"LGET");
        assert_eq!(enc(&Command::Ping, 6), b"PING");
        assert_eq!(
            enc(
                &Command::Send {
                    notification: true,
                    body: b"hi there".to_vec()
                },
                18
            ),
            b"SEND T hi there"
        );
        // Reserved flag characters are skipped when parsing.
        assert_eq!(
            Command::decode(18, b"SEND Fxyz body").unwrap(),
            Command::Send {
                notification: false,
                body: b"body".to_vec()
            }
        );
    }

    #[test]
    fn strict_decoding() {
        for bad in [
            &b"SUB "[..],
            b"SUBX",
            b"PING x",
            b"ACK",
            b"ACK \x03ab",
            b"ACK \x01abc",
            b"KEY",
            b"sub",
        ] {
            assert!(Command::decode(18, bad).is_err(), "{bad:?}");
        }
        for bad in [
            &b"OK "[..],
            b"PONGX",
            b"SOK",
            b"SOK 2",
            b"SOK 0x",
            b"ERR",
            b"ERR AUTH ",
            b"END x",
            b"IDS \x00\x00\x00",
        ] {
            assert!(Response::decode(18, bad).is_err(), "{bad:?}");
        }
        // v16 IDS is not a valid v17 IDS (missing ntf creds slot) and vice versa.
        let ids = Response::Ids(QueueIds {
            rcv_id: seq(1, 24),
            snd_id: seq(2, 24),
            srv_dh_key: x_spki(),
            queue_mode: Some(QueueMode::Messaging),
            link_id: None,
            service_id: None,
            ntf_creds: None,
        });
        let mut v16 = Vec::new();
        ids.encode(16, &mut v16).unwrap();
        assert!(Response::decode(17, &v16).is_err());
        assert_eq!(Response::decode(16, &v16).unwrap(), ids);
        let mut v17 = Vec::new();
        ids.encode(17, &mut v17).unwrap();
        assert!(Response::decode(16, &v17).is_err());
    }

    #[test]
    fn server_downgrades() {
        let r = |resp: &Response, v: u16| {
            let mut out = Vec::new();
            resp.encode(v, &mut out).unwrap();
            out
        };
        assert_eq!(r(&Response::Sok(None), 16), b"SOK 0");
        assert_eq!(r(&Response::Sok(None), 15), b"OK");
        assert_eq!(r(&Response::Deld, 10), b"DELD");
        assert_eq!(r(&Response::Deld, 9), b"END");
        let blocked = Response::Err(ErrorType::Blocked(BlockingInfo {
            reason: BlockingReason::Spam,
            notice: Some("{}".into()),
        }));
        assert_eq!(r(&blocked, 18), b"ERR BLOCKED reason=spam,notice={}");
        assert_eq!(r(&blocked, 12), b"ERR BLOCKED reason=spam");
        assert_eq!(r(&blocked, 11), b"ERR AUTH");
        assert_eq!(Response::decode(18, b"SOK 0").unwrap(), Response::Sok(None));
    }

    #[test]
    fn entity_rules() {
        assert!(Response::Pong.entity_ok(b""));
        assert!(!Response::Pong.entity_ok(b"q"));
        assert!(!Response::Ok.entity_ok(b""));
        assert!(Response::Err(ErrorType::Block).entity_ok(b""));
    }
}
