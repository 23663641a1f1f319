//! Errors: the SMP `ERR` grammar (§5.4) as types, and this crate's own error enums.
//!
//! Every error that can end a command or a connection says what the pool should do next through
//! `reconnect()`, so the caller never has to pattern-match on protocol details to pick a policy.

use std::fmt;
use std::time::Duration;

use crate::encoding::{DecodeError, EncodeError, Parser, put_short_string};

/// What the caller should do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReconnectAction {
    /// Try the same thing again on this connection (transient server-side condition).
    Retry,
    /// Try again, but not before this delay (the server asked us to back off).
    RetryAfter(Duration),
    /// Drop this connection and connect with a fresh handshake, then retry.
    Rehandshake,
    /// Retrying will not help: the request or the configuration is wrong.
    GiveUp,
}

/// How long to wait after `ERR QUOTA` before sending to that queue again: the reference agent
/// switches to a 5-minute "slow" retry once a recipient's queue is full (§9).
pub const QUOTA_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The body of an SMP `ERR` response (`errorType` in §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorType {
    /// `BLOCK`: the server could not parse our block, or an authorization had a bad size.
    Block,
    /// `SESSION`: the session id in a transmission did not match.
    Session,
    /// `CMD …`: the command was unknown, malformed or lacked credentials.
    Cmd(CmdError),
    /// `PROXY …`: an error from or about a proxied relay.
    Proxy(ProxyError),
    /// `AUTH`: bad authorization, or no such queue.
    Auth,
    /// `BLOCKED …` (v12+): the entity was blocked by the operator.
    Blocked(BlockingInfo),
    /// `SERVICE`: a service signature was not allowed.
    Service,
    /// `CRYPTO`: encryption failed in the proxy protocol.
    Crypto,
    /// `QUOTA`: the queue is full.
    Quota,
    /// `STORE text`: a server storage error; the text is the rest of the response.
    Store(String),
    /// `NO_MSG`: ACK without a delivered message, or with the wrong id.
    NoMsg,
    /// `LARGE_MSG`: the message body was too large.
    LargeMsg,
    /// `EXPIRED`: the relay key has expired.
    Expired,
    /// `INTERNAL`: internal server error.
    Internal,
    /// `DUPLICATE_`: internal to the reference implementation; parsed for completeness.
    Duplicate,
}

/// `cmdErr` in `ERR CMD …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CmdError {
    /// `UNKNOWN`: unknown command tag.
    Unknown,
    /// `SYNTAX`: the command did not parse.
    Syntax,
    /// `PROHIBITED`: not allowed here (e.g. SUB and GET on one queue and connection).
    Prohibited,
    /// `NO_AUTH`: authorization or entity id missing.
    NoAuth,
    /// `HAS_AUTH`: authorization or entity id present where not allowed.
    HasAuth,
    /// `NO_ENTITY` (legacy spelling `NO_QUEUE` is accepted): entity id missing.
    NoEntity,
}

/// `proxyErr` in `ERR PROXY …`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyError {
    /// `PROTOCOL errorType`: the relay answered with this error.
    Protocol(Box<ErrorType>),
    /// `BROKER brokerErr`: the proxy could not talk to the relay.
    Broker(BrokerError),
    /// `BASIC_AUTH`: the basic auth given to the proxy was wrong.
    BasicAuth,
    /// `NO_SESSION`: the proxy has no session with that relay; redo PRXY.
    NoSession,
}

/// `brokerErr` in `ERR PROXY BROKER …`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerError {
    /// `RESPONSE ss(text)`: the relay's response did not parse.
    Response(String),
    /// `UNEXPECTED ss(text)`: the relay sent an unexpected response.
    Unexpected(String),
    /// `TRANSPORT transportErr`.
    Transport(TransportError),
    /// `NETWORK` optionally followed by `' ' netErr` (current servers send it bare).
    Network(Option<NetworkError>),
    /// `TIMEOUT`.
    Timeout,
    /// `HOST`: no compatible host.
    Host,
    /// `NO_SERVICE`.
    NoService,
}

/// `transportErr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// `BLOCK`.
    Block,
    /// `VERSION`.
    Version,
    /// `LARGE_MSG`.
    LargeMsg,
    /// `SESSION`.
    Session,
    /// `NO_AUTH`.
    NoAuth,
    /// `HANDSHAKE …`.
    Handshake(HandshakeFailure),
}

/// The argument of `TRANSPORT HANDSHAKE …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// `PARSE`.
    Parse,
    /// `IDENTITY`.
    Identity,
    /// `BAD_AUTH`.
    BadAuth,
    /// `BAD_SERVICE`.
    BadService,
}

/// `netErr`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetworkError {
    /// `CONNECT ss(text)`.
    Connect(String),
    /// `TLS ss(text)`.
    Tls(String),
    /// `UNKNOWNCA`.
    UnknownCa,
    /// `FAILED`.
    Failed,
    /// `TIMEOUT`.
    Timeout,
    /// `SUBSCRIBE ss(text)`.
    Subscribe(String),
}

/// `blockInfo` of `ERR BLOCKED`: `reason=spam|content[,notice=JSON]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingInfo {
    /// Why the entity was blocked.
    pub reason: BlockingReason,
    /// The operator's notice (v18+), kept as the raw JSON text; this crate does not interpret it.
    pub notice: Option<String>,
}

/// The `reason=` of a [`BlockingInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockingReason {
    /// `spam`.
    Spam,
    /// `content`.
    Content,
}

/// Reads up to (not including) the next space, like upstream's `takeTill (== ' ')`.
fn word<'a>(p: &mut Parser<'a>) -> &'a [u8] {
    let rest = p.peek_rest();
    let n = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    // `n` bytes are available by construction, so this cannot fail.
    p.bytes(n).unwrap_or_default()
}

/// Text from the wire; invalid UTF-8 is replaced, as upstream's `safeDecodeUtf8` does.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn short_text(p: &mut Parser<'_>) -> Result<String, DecodeError> {
    p.space()?;
    Ok(text(p.short_string()?))
}

fn put_short_text(out: &mut Vec<u8>, tag: &[u8], s: &str) -> Result<(), EncodeError> {
    out.extend_from_slice(tag);
    out.push(b' ');
    put_short_string(out, s.as_bytes())
}

impl ErrorType {
    /// Appends the wire form (without the `ERR ` prefix).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let tag: &[u8] = match self {
            Self::Block => b"BLOCK",
            Self::Session => b"SESSION",
            Self::Cmd(e) => {
                out.extend_from_slice(b"CMD ");
                out.extend_from_slice(e.as_bytes());
                return Ok(());
            }
            Self::Proxy(e) => {
                out.extend_from_slice(b"PROXY ");
                return e.encode(out);
            }
            Self::Auth => b"AUTH",
            Self::Blocked(info) => {
                out.extend_from_slice(b"BLOCKED ");
                info.encode(out);
                return Ok(());
            }
            Self::Service => b"SERVICE",
            Self::Crypto => b"CRYPTO",
            Self::Quota => b"QUOTA",
            Self::Store(s) => {
                out.extend_from_slice(b"STORE ");
                out.extend_from_slice(s.as_bytes());
                return Ok(());
            }
            Self::NoMsg => b"NO_MSG",
            Self::LargeMsg => b"LARGE_MSG",
            Self::Expired => b"EXPIRED",
            Self::Internal => b"INTERNAL",
            Self::Duplicate => b"DUPLICATE_",
        };
        out.extend_from_slice(tag);
        Ok(())
    }

    /// Parses an error type; the caller checks that the input ends afterwards.
    ///
    /// `PROXY PROTOCOL` wraps the relay's own error exactly once (§5.4), and relays never
    /// send `PROXY` errors, so a `PROXY` inside `PROXY PROTOCOL` is refused. Without that
    /// limit one block could nest ~1,000 levels and every recursive walk (parse, Display,
    /// Debug, Drop) could overflow the stack.
    pub fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Self::parse_within(p, false)
    }

    fn parse_within(p: &mut Parser<'_>, in_proxy: bool) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"BLOCK" => Self::Block,
            b"SESSION" => Self::Session,
            b"CMD" => {
                p.space()?;
                Self::Cmd(CmdError::parse(p)?)
            }
            b"PROXY" if in_proxy => return Err(DecodeError::Invalid("nested PROXY error")),
            b"PROXY" => {
                p.space()?;
                Self::Proxy(ProxyError::parse(p)?)
            }
            b"AUTH" => Self::Auth,
            b"BLOCKED" => {
                p.space()?;
                Self::Blocked(BlockingInfo::parse(p)?)
            }
            b"SERVICE" => Self::Service,
            b"CRYPTO" => Self::Crypto,
            b"QUOTA" => Self::Quota,
            b"STORE" => {
                p.space()?;
                Self::Store(text(p.tail()))
            }
            b"NO_MSG" => Self::NoMsg,
            b"LARGE_MSG" => Self::LargeMsg,
            b"EXPIRED" => Self::Expired,
            b"INTERNAL" => Self::Internal,
            b"DUPLICATE_" => Self::Duplicate,
            _ => return Err(DecodeError::Invalid("ERR type")),
        })
    }

    /// What to do after the server answered a command with this error.
    pub fn reconnect(&self) -> ReconnectAction {
        match self {
            // The server could not read our framing or binding: this connection is suspect.
            Self::Block | Self::Session => ReconnectAction::Rehandshake,
            Self::Quota => ReconnectAction::RetryAfter(QUOTA_RETRY_DELAY),
            Self::Internal | Self::Store(_) | Self::Expired => ReconnectAction::Retry,
            Self::Proxy(e) => e.reconnect(),
            Self::Cmd(_)
            | Self::Auth
            | Self::Blocked(_)
            | Self::Service
            | Self::Crypto
            | Self::NoMsg
            | Self::LargeMsg
            | Self::Duplicate => ReconnectAction::GiveUp,
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        // Only over-long ss() texts can fail; show the variant then.
        match self.encode(&mut out) {
            Ok(()) => f.write_str(&String::from_utf8_lossy(&out)),
            Err(_) => write!(f, "{self:?}"),
        }
    }
}

impl std::error::Error for ErrorType {}

impl CmdError {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Unknown => b"UNKNOWN",
            Self::Syntax => b"SYNTAX",
            Self::Prohibited => b"PROHIBITED",
            Self::NoAuth => b"NO_AUTH",
            Self::HasAuth => b"HAS_AUTH",
            Self::NoEntity => b"NO_ENTITY",
        }
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"UNKNOWN" => Self::Unknown,
            b"SYNTAX" => Self::Syntax,
            b"PROHIBITED" => Self::Prohibited,
            b"NO_AUTH" => Self::NoAuth,
            b"HAS_AUTH" => Self::HasAuth,
            b"NO_ENTITY" | b"NO_QUEUE" => Self::NoEntity,
            _ => return Err(DecodeError::Invalid("CMD error")),
        })
    }
}

impl ProxyError {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Self::Protocol(e) => {
                out.extend_from_slice(b"PROTOCOL ");
                e.encode(out)
            }
            Self::Broker(e) => {
                out.extend_from_slice(b"BROKER ");
                e.encode(out)
            }
            Self::BasicAuth => {
                out.extend_from_slice(b"BASIC_AUTH");
                Ok(())
            }
            Self::NoSession => {
                out.extend_from_slice(b"NO_SESSION");
                Ok(())
            }
        }
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"PROTOCOL" => {
                p.space()?;
                Self::Protocol(Box::new(ErrorType::parse_within(p, true)?))
            }
            b"BROKER" => {
                p.space()?;
                Self::Broker(BrokerError::parse(p)?)
            }
            b"BASIC_AUTH" => Self::BasicAuth,
            b"NO_SESSION" => Self::NoSession,
            _ => return Err(DecodeError::Invalid("PROXY error")),
        })
    }

    fn reconnect(&self) -> ReconnectAction {
        match self {
            Self::Protocol(e) => e.reconnect(),
            // The proxy lost its relay session: a new PRXY on this connection fixes it.
            Self::NoSession => ReconnectAction::Retry,
            Self::Broker(BrokerError::Network(_) | BrokerError::Timeout) => ReconnectAction::Retry,
            Self::Broker(_) | Self::BasicAuth => ReconnectAction::GiveUp,
        }
    }
}

impl BrokerError {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Self::Response(s) => put_short_text(out, b"RESPONSE", s),
            Self::Unexpected(s) => put_short_text(out, b"UNEXPECTED", s),
            Self::Transport(e) => {
                out.extend_from_slice(b"TRANSPORT ");
                e.encode(out);
                Ok(())
            }
            Self::Network(None) => {
                out.extend_from_slice(b"NETWORK");
                Ok(())
            }
            Self::Network(Some(e)) => {
                out.extend_from_slice(b"NETWORK ");
                e.encode(out)
            }
            Self::Timeout => {
                out.extend_from_slice(b"TIMEOUT");
                Ok(())
            }
            Self::Host => {
                out.extend_from_slice(b"HOST");
                Ok(())
            }
            Self::NoService => {
                out.extend_from_slice(b"NO_SERVICE");
                Ok(())
            }
        }
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"RESPONSE" => Self::Response(short_text(p)?),
            b"UNEXPECTED" => Self::Unexpected(short_text(p)?),
            b"TRANSPORT" => {
                p.space()?;
                Self::Transport(TransportError::parse(p)?)
            }
            b"NETWORK" => {
                if p.is_empty() {
                    Self::Network(None)
                } else {
                    p.space()?;
                    Self::Network(Some(NetworkError::parse(p)?))
                }
            }
            b"TIMEOUT" => Self::Timeout,
            b"HOST" => Self::Host,
            b"NO_SERVICE" => Self::NoService,
            _ => return Err(DecodeError::Invalid("BROKER error")),
        })
    }
}

impl TransportError {
    fn encode(self, out: &mut Vec<u8>) {
        let tag: &[u8] = match self {
            Self::Block => b"BLOCK",
            Self::Version => b"VERSION",
            Self::LargeMsg => b"LARGE_MSG",
            Self::Session => b"SESSION",
            Self::NoAuth => b"NO_AUTH",
            Self::Handshake(h) => {
                out.extend_from_slice(b"HANDSHAKE ");
                match h {
                    HandshakeFailure::Parse => b"PARSE",
                    HandshakeFailure::Identity => b"IDENTITY",
                    HandshakeFailure::BadAuth => b"BAD_AUTH",
                    HandshakeFailure::BadService => b"BAD_SERVICE",
                }
            }
        };
        out.extend_from_slice(tag);
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"BLOCK" => Self::Block,
            b"VERSION" => Self::Version,
            b"LARGE_MSG" => Self::LargeMsg,
            b"SESSION" => Self::Session,
            b"NO_AUTH" => Self::NoAuth,
            b"HANDSHAKE" => {
                p.space()?;
                Self::Handshake(match word(p) {
                    b"PARSE" => HandshakeFailure::Parse,
                    b"IDENTITY" => HandshakeFailure::Identity,
                    b"BAD_AUTH" => HandshakeFailure::BadAuth,
                    b"BAD_SERVICE" => HandshakeFailure::BadService,
                    _ => return Err(DecodeError::Invalid("HANDSHAKE error")),
                })
            }
            _ => return Err(DecodeError::Invalid("TRANSPORT error")),
        })
    }
}

impl NetworkError {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let tag: &[u8] = match self {
            Self::Connect(s) => return put_short_text(out, b"CONNECT", s),
            Self::Tls(s) => return put_short_text(out, b"TLS", s),
            Self::Subscribe(s) => return put_short_text(out, b"SUBSCRIBE", s),
            Self::UnknownCa => b"UNKNOWNCA",
            Self::Failed => b"FAILED",
            Self::Timeout => b"TIMEOUT",
        };
        out.extend_from_slice(tag);
        Ok(())
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        Ok(match word(p) {
            b"CONNECT" => Self::Connect(short_text(p)?),
            b"TLS" => Self::Tls(short_text(p)?),
            b"UNKNOWNCA" => Self::UnknownCa,
            b"FAILED" => Self::Failed,
            b"TIMEOUT" => Self::Timeout,
            b"SUBSCRIBE" => Self::Subscribe(short_text(p)?),
            _ => return Err(DecodeError::Invalid("NETWORK error")),
        })
    }
}

impl BlockingInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"reason=");
        out.extend_from_slice(match self.reason {
            BlockingReason::Spam => b"spam",
            BlockingReason::Content => b"content",
        });
        if let Some(n) = &self.notice {
            out.extend_from_slice(b",notice=");
            out.extend_from_slice(n.as_bytes());
        }
    }

    fn parse(p: &mut Parser<'_>) -> Result<Self, DecodeError> {
        p.literal(b"reason=")?;
        let rest = p.peek_rest();
        let reason = if rest.starts_with(b"spam") {
            p.bytes(4)?;
            BlockingReason::Spam
        } else if rest.starts_with(b"content") {
            p.bytes(7)?;
            BlockingReason::Content
        } else {
            return Err(DecodeError::Invalid("blocking reason"));
        };
        let notice = if p.is_empty() {
            None
        } else {
            p.literal(b",notice=")?;
            // The notice is JSON to the end of the response; upstream rejects invalid JSON, we
            // keep the text and only insist it is UTF-8 and non-empty so it can be shown.
            let raw = p.tail();
            let s = std::str::from_utf8(raw).map_err(|_| DecodeError::Invalid("notice"))?;
            if s.is_empty() {
                return Err(DecodeError::Invalid("notice"));
            }
            Some(s.to_owned())
        };
        Ok(Self { reason, notice })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(e: &ErrorType, wire: &[u8]) {
        let mut out = Vec::new();
        e.encode(&mut out).unwrap();
        assert_eq!(out, wire, "encode {e:?}");
        let mut p = Parser::new(wire);
        assert_eq!(&ErrorType::parse(&mut p).unwrap(), e, "parse {wire:?}");
        p.end().unwrap();
    }

    /// Every variant of the grammar, with its exact wire text.
    pub(crate) fn all_error_types() -> Vec<(ErrorType, Vec<u8>)> {
        use ErrorType as E;
        let mut v: Vec<(ErrorType, Vec<u8>)> = vec![
            (E::Block, b"BLOCK".to_vec()),
            (E::Session, b"SESSION".to_vec()),
            (E::Auth, b"AUTH".to_vec()),
            (E::Service, b"SERVICE".to_vec()),
            (E::Crypto, b"CRYPTO".to_vec()),
            (E::Quota, b"QUOTA".to_vec()),
            (E::Store("disk full".into()), b"STORE disk full".to_vec()),
            (E::NoMsg, b"NO_MSG".to_vec()),
            (E::LargeMsg, b"LARGE_MSG".to_vec()),
            (E::Expired, b"EXPIRED".to_vec()),
            (E::Internal, b"INTERNAL".to_vec()),
            (E::Duplicate, b"DUPLICATE_".to_vec()),
            (
                E::Blocked(BlockingInfo {
                    reason: BlockingReason::Spam,
                    notice: None,
                }),
                b"BLOCKED reason=spam".to_vec(),
            ),
            (
                E::Blocked(BlockingInfo {
                    reason: BlockingReason::Content,
                    notice: Some(r#"{"ttl":86400}"#.into()),
                }),
                br#"BLOCKED reason=content,notice={"ttl":86400}"#.to_vec(),
            ),
        ];
        for (c, w) in [
            (CmdError::Unknown, "UNKNOWN"),
            (CmdError::Syntax, "SYNTAX"),
            (CmdError::Prohibited, "PROHIBITED"),
            (CmdError::NoAuth, "NO_AUTH"),
            (CmdError::HasAuth, "HAS_AUTH"),
            (CmdError::NoEntity, "NO_ENTITY"),
        ] {
            v.push((E::Cmd(c), format!("CMD {w}").into_bytes()));
        }
        let p = |e: ProxyError| E::Proxy(e);
        v.push((p(ProxyError::BasicAuth), b"PROXY BASIC_AUTH".to_vec()));
        v.push((p(ProxyError::NoSession), b"PROXY NO_SESSION".to_vec()));
        v.push((
            p(ProxyError::Protocol(Box::new(E::Cmd(CmdError::Syntax)))),
            b"PROXY PROTOCOL CMD SYNTAX".to_vec(),
        ));
        let b = |e: BrokerError| E::Proxy(ProxyError::Broker(e));
        v.push((
            b(BrokerError::Response("bad".into())),
            b"PROXY BROKER RESPONSE \x03bad".to_vec(),
        ));
        v.push((
            b(BrokerError::Unexpected("x y".into())),
            b"PROXY BROKER UNEXPECTED \x03x y".to_vec(),
        ));
        v.push((b(BrokerError::Timeout), b"PROXY BROKER TIMEOUT".to_vec()));
        v.push((b(BrokerError::Host), b"PROXY BROKER HOST".to_vec()));
        v.push((
            b(BrokerError::NoService),
            b"PROXY BROKER NO_SERVICE".to_vec(),
        ));
        v.push((
            b(BrokerError::Network(None)),
            b"PROXY BROKER NETWORK".to_vec(),
        ));
        for (n, w) in [
            (
                NetworkError::Connect("refused".into()),
                &b"CONNECT \x07refused"[..],
            ),
            (NetworkError::Tls("alert".into()), b"TLS \x05alert"),
            (NetworkError::UnknownCa, b"UNKNOWNCA"),
            (NetworkError::Failed, b"FAILED"),
            (NetworkError::Timeout, b"TIMEOUT"),
            (NetworkError::Subscribe("s".into()), b"SUBSCRIBE \x01s"),
        ] {
            let mut wire = b"PROXY BROKER NETWORK ".to_vec();
            wire.extend_from_slice(w);
            v.push((b(BrokerError::Network(Some(n))), wire));
        }
        for (t, w) in [
            (TransportError::Block, "BLOCK"),
            (TransportError::Version, "VERSION"),
            (TransportError::LargeMsg, "LARGE_MSG"),
            (TransportError::Session, "SESSION"),
            (TransportError::NoAuth, "NO_AUTH"),
            (
                TransportError::Handshake(HandshakeFailure::Parse),
                "HANDSHAKE PARSE",
            ),
            (
                TransportError::Handshake(HandshakeFailure::Identity),
                "HANDSHAKE IDENTITY",
            ),
            (
                TransportError::Handshake(HandshakeFailure::BadAuth),
                "HANDSHAKE BAD_AUTH",
            ),
            (
                TransportError::Handshake(HandshakeFailure::BadService),
                "HANDSHAKE BAD_SERVICE",
            ),
        ] {
            v.push((
                b(BrokerError::Transport(t)),
                format!("PROXY BROKER TRANSPORT {w}").into_bytes(),
            ));
        }
        v
    }

    #[test]
    fn every_variant_round_trips() {
        let all = all_error_types();
        assert_eq!(all.len(), 44);
        for (e, wire) in &all {
            roundtrip(e, wire);
        }
    }

    #[test]
    fn legacy_and_malformed() {
        let mut p = Parser::new(b"CMD NO_QUEUE");
        assert_eq!(
            ErrorType::parse(&mut p).unwrap(),
            ErrorType::Cmd(CmdError::NoEntity)
        );
        for bad in [
            &b"NOPE"[..],
            b"CMD",
            b"CMD FOO",
            b"BLOCKED reason=eggs",
            b"BLOCKED reason=spam,notice=",
            b"PROXY BROKER RESPONSE \x05ab",
            b"PROXY BROKER TRANSPORT HANDSHAKE WHAT",
            b"",
        ] {
            let r = ErrorType::parse(&mut Parser::new(bad));
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
        }
        // Trailing bytes are left for the caller's strict end check.
        let mut p = Parser::new(b"AUTH x");
        ErrorType::parse(&mut p).unwrap();
        assert!(p.end().is_err());
    }

    /// `PROXY PROTOCOL ` repeated `depth` times around `AUTH`.
    fn nested(depth: usize) -> Vec<u8> {
        let mut wire = b"PROXY PROTOCOL ".repeat(depth);
        wire.extend_from_slice(b"AUTH");
        wire
    }

    #[test]
    fn hostile_proxy_nesting_is_rejected() {
        // As much nesting as one block can carry (~1090 levels): before the depth limit this
        // recursed once per level in parse, Display, Debug and Drop.
        let wire = nested((16382 - 8) / 15);
        // A small stack proves the parser no longer recurses per level.
        let r = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || ErrorType::parse(&mut Parser::new(&wire)))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(r, Err(DecodeError::Invalid("nested PROXY error")));
        // The same through the response decoder.
        let mut resp = b"ERR ".to_vec();
        resp.extend_from_slice(&nested(1000));
        assert!(crate::command::Response::decode(18, &resp).is_err());
    }

    #[test]
    fn only_a_single_proxy_wrap_is_accepted() {
        let start = std::time::Instant::now();
        for depth in 0..2000 {
            let wire = nested(depth);
            let r = ErrorType::parse(&mut Parser::new(&wire));
            match depth {
                0 => assert_eq!(r, Ok(ErrorType::Auth)),
                1 => assert_eq!(
                    r,
                    Ok(ErrorType::Proxy(ProxyError::Protocol(Box::new(
                        ErrorType::Auth
                    ))))
                ),
                _ => assert_eq!(
                    r,
                    Err(DecodeError::Invalid("nested PROXY error")),
                    "{depth}"
                ),
            }
            // Any other PROXY error inside PROTOCOL is refused as well.
            let mut other = b"PROXY PROTOCOL ".repeat(depth.min(3));
            other.extend_from_slice(b"PROXY NO_SESSION");
            let r = ErrorType::parse(&mut Parser::new(&other));
            assert_eq!(r.is_ok(), depth == 0, "{depth}");
        }
        // ~4 MB of input in total; without per-level work this takes milliseconds.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn classification() {
        assert_eq!(ErrorType::Auth.reconnect(), ReconnectAction::GiveUp);
        assert_eq!(
            ErrorType::Quota.reconnect(),
            ReconnectAction::RetryAfter(QUOTA_RETRY_DELAY)
        );
        assert_eq!(ErrorType::Internal.reconnect(), ReconnectAction::Retry);
        assert_eq!(ErrorType::Block.reconnect(), ReconnectAction::Rehandshake);
        assert_eq!(
            ErrorType::Proxy(ProxyError::NoSession).reconnect(),
            ReconnectAction::Retry
        );
    }
}
