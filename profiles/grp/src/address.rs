//! Relay addresses (§3): `grp[+quic|+ws|+wss]://<key>@<host>[:<port>][<path>]`.
//!
//! The parser follows §3.2 step by step and returns the first error met, with the normative
//! error names. The key is the relay's identity; host and port only say where to find it.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;

/// The carrier named by the scheme (§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Carrier {
    /// `grp`: TCP, default port 7443.
    Tcp,
    /// `grp+quic`: QUIC on UDP, default port 7443.
    Quic,
    /// `grp+ws`: WebSocket, default port 80.
    Ws,
    /// `grp+wss`: WebSocket over TLS, default port 443.
    Wss,
}

impl Carrier {
    /// The lower-case scheme.
    pub const fn scheme(self) -> &'static str {
        match self {
            Self::Tcp => "grp",
            Self::Quic => "grp+quic",
            Self::Ws => "grp+ws",
            Self::Wss => "grp+wss",
        }
    }

    /// The port used when the address has none.
    pub const fn default_port(self) -> u16 {
        match self {
            Self::Tcp | Self::Quic => 7443,
            Self::Ws => 80,
            Self::Wss => 443,
        }
    }

    /// Whether the carrier starts with the 4-byte preamble (TCP and QUIC).
    pub const fn has_preamble(self) -> bool {
        matches!(self, Self::Tcp | Self::Quic)
    }

    /// Whether the address may carry a path (WebSocket only).
    const fn takes_path(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
}

/// The host part of an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Host {
    /// A lower-case DNS name (punycode for internationalized names).
    Dns(String),
    /// A dotted-quad IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address (written in brackets).
    Ipv6(Ipv6Addr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(d) => f.write_str(d),
            Self::Ipv4(a) => write!(f, "{a}"),
            Self::Ipv6(a) => write!(f, "{a}"),
        }
    }
}

/// The normative parse errors of §3.2, in the order the steps check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// No `://`, or a scheme other than the four GRP schemes.
    #[error("unknown scheme (expected grp, grp+quic, grp+ws or grp+wss)")]
    UnknownScheme,
    /// The address contains `?` or `#`.
    #[error("queries and fragments are not allowed")]
    QueryOrFragment,
    /// No `@`, so no key.
    #[error("missing relay key (expected <key>@<host>)")]
    MissingKey,
    /// The key is not the canonical 44-character base64url spelling of a non-zero 32-byte key.
    #[error("bad relay key (44 base64url characters ending in '=', canonical, not all zero)")]
    BadKey,
    /// Not a DNS name, a dotted-quad IPv4 address or a bracketed IPv6 address without zone.
    #[error("bad host")]
    BadHost,
    /// A port that is empty, has a leading zero or is outside 1..=65535.
    #[error("bad port (1..65535, no leading zero)")]
    BadPort,
    /// A path on a `grp` or `grp+quic` address.
    #[error("a path is only allowed for grp+ws and grp+wss")]
    PathNotAllowed,
    /// A WebSocket path that is not `1*("/" 1*pchar)` with unreserved characters.
    #[error("bad path")]
    BadPath,
}

impl AddressError {
    /// The normative name (as used by the vectors).
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownScheme => "UnknownScheme",
            Self::QueryOrFragment => "QueryOrFragment",
            Self::MissingKey => "MissingKey",
            Self::BadKey => "BadKey",
            Self::BadHost => "BadHost",
            Self::BadPort => "BadPort",
            Self::PathNotAllowed => "PathNotAllowed",
            Self::BadPath => "BadPath",
        }
    }
}

/// The WebSocket path used when a `grp+ws`/`grp+wss` address has none.
pub const DEFAULT_WS_PATH: &str = "/grp";

/// A parsed relay address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayAddress {
    /// The carrier.
    pub carrier: Carrier,
    /// The relay's static X25519 public key: its identity.
    pub key: [u8; 32],
    /// Where to connect.
    pub host: Host,
    /// The port (the scheme's default when none was given).
    pub port: u16,
    /// The WebSocket path (`/grp` by default); `None` for TCP and QUIC.
    pub path: Option<String>,
}

impl RelayAddress {
    /// Whether two addresses name the same relay: their keys are equal (§3.1).
    pub fn same_relay(&self, other: &Self) -> bool {
        self.key == other.key
    }

    /// The key in its one canonical spelling.
    pub fn key_text(&self) -> String {
        URL_SAFE.encode(self.key)
    }
}

impl FromStr for RelayAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        // Step 1: scheme.
        let (scheme, rest) = s.split_once("://").ok_or(AddressError::UnknownScheme)?;
        let carrier = match scheme.to_ascii_lowercase().as_str() {
            "grp" => Carrier::Tcp,
            "grp+quic" => Carrier::Quic,
            "grp+ws" => Carrier::Ws,
            "grp+wss" => Carrier::Wss,
            _ => return Err(AddressError::UnknownScheme),
        };
        // Step 2.
        if rest.contains(['?', '#']) {
            return Err(AddressError::QueryOrFragment);
        }
        // Steps 3–4.
        let (key_text, after) = rest.split_once('@').ok_or(AddressError::MissingKey)?;
        let key = parse_key(key_text)?;
        // Step 5.
        let (authority, path) = match after.find('/') {
            Some(i) => (&after[..i], Some(&after[i..])),
            None => (after, None),
        };
        // Steps 6–7.
        let (host, port_text) = split_host_port(authority)?;
        let port = match port_text {
            Some(p) => parse_port(p)?,
            None => carrier.default_port(),
        };
        // Step 8.
        let path = match (carrier.takes_path(), path) {
            (false, Some(_)) => return Err(AddressError::PathNotAllowed),
            (false, None) => None,
            (true, None) => Some(DEFAULT_WS_PATH.to_owned()),
            (true, Some(p)) if valid_path(p) => Some(p.to_owned()),
            (true, Some(_)) => return Err(AddressError::BadPath),
        };
        Ok(Self {
            carrier,
            key,
            host,
            port,
            path,
        })
    }
}

/// The canonical form: lower-case scheme and host, the port only if not the default, the
/// path only if not `/grp`.
impl fmt::Display for RelayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}@", self.carrier.scheme(), self.key_text())?;
        match &self.host {
            Host::Ipv6(a) => write!(f, "[{a}]")?,
            h => write!(f, "{h}")?,
        }
        if self.port != self.carrier.default_port() {
            write!(f, ":{}", self.port)?;
        }
        match &self.path {
            Some(p) if p != DEFAULT_WS_PATH => f.write_str(p),
            _ => Ok(()),
        }
    }
}

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

fn parse_key(text: &str) -> Result<[u8; 32], AddressError> {
    let b = text.as_bytes();
    // 42 b64, one `last` (two low bits zero), '='.
    const LAST: &[u8] = b"AEIMQUYcgkosw048";
    if b.len() != 44
        || b[43] != b'='
        || !b[..42].iter().all(|&c| is_b64(c))
        || !LAST.contains(&b[42])
    {
        return Err(AddressError::BadKey);
    }
    let bytes = URL_SAFE.decode(text).map_err(|_| AddressError::BadKey)?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| AddressError::BadKey)?;
    if key == [0u8; 32] {
        return Err(AddressError::BadKey);
    }
    Ok(key)
}

fn split_host_port(authority: &str) -> Result<(Host, Option<&str>), AddressError> {
    if let Some(inner) = authority.strip_prefix('[') {
        let (addr, after) = inner.split_once(']').ok_or(AddressError::BadHost)?;
        // A zone identifier (`%eth0`) fails the Ipv6Addr parse, as §3.2 requires.
        let ip: Ipv6Addr = addr.parse().map_err(|_| AddressError::BadHost)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(AddressError::BadHost)?),
        };
        return Ok((Host::Ipv6(ip), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host = host.to_ascii_lowercase();
    if host.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return parse_ipv4(&host).map(|a| (Host::Ipv4(a), port));
    }
    if valid_dns(&host) {
        Ok((Host::Dns(host), port))
    } else {
        Err(AddressError::BadHost)
    }
}

fn parse_ipv4(host: &str) -> Result<Ipv4Addr, AddressError> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() != 4 {
        return Err(AddressError::BadHost);
    }
    let mut octets = [0u8; 4];
    for (o, part) in octets.iter_mut().zip(&parts) {
        let leading_zero = part.len() > 1 && part.starts_with('0');
        if part.is_empty() || part.len() > 3 || leading_zero {
            return Err(AddressError::BadHost);
        }
        *o = part.parse().map_err(|_| AddressError::BadHost)?;
    }
    Ok(Ipv4Addr::from(octets))
}

fn valid_dns(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 || host.ends_with('.') {
        return false;
    }
    let labels_ok = host.split('.').all(|l| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    let last_not_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| !l.bytes().all(|c| c.is_ascii_digit()));
    labels_ok && last_not_numeric
}

fn parse_port(p: &str) -> Result<u16, AddressError> {
    let ok =
        (1..=5).contains(&p.len()) && p.bytes().all(|c| c.is_ascii_digit()) && !p.starts_with('0');
    if !ok {
        return Err(AddressError::BadPort);
    }
    match p.parse::<u32>() {
        Ok(v) if (1..=65535).contains(&v) => u16::try_from(v).map_err(|_| AddressError::BadPort),
        _ => Err(AddressError::BadPort),
    }
}

fn valid_path(p: &str) -> bool {
    let Some(rest) = p.strip_prefix('/') else {
        return false;
    };
    rest.split('/').all(|seg| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "pQhhs2RNw_hjEuUKWEIb2t57muwWZCO3a7_hIJItfSs=";

    #[test]
    fn edge_cases_beyond_the_vectors() {
        let a: RelayAddress = format!("grp+ws://{KEY}@[::1]:8080/a/b-c").parse().unwrap();
        assert_eq!(a.host, Host::Ipv6(Ipv6Addr::LOCALHOST));
        assert_eq!(a.port, 8080);
        assert_eq!(a.to_string(), format!("grp+ws://{KEY}@[::1]:8080/a/b-c"));
        let err = |s: String| s.parse::<RelayAddress>().unwrap_err();
        assert_eq!(err(format!("grp://{KEY}@[::1]x")), AddressError::BadHost);
        assert_eq!(err(format!("grp://{KEY}@01.2.3.4")), AddressError::BadHost);
        assert_eq!(err(format!("grp://{KEY}@a.123")), AddressError::BadHost);
        assert_eq!(err(format!("grp://{KEY}@")), AddressError::BadHost);
        assert_eq!(
            err(format!("grp+ws://{KEY}@h.example//x")),
            AddressError::BadPath
        );
        assert_eq!(
            err(format!("grp://{KEY}@h.example:1x")),
            AddressError::BadPort
        );
        // Trailing whitespace is not trimmed.
        assert_eq!(
            err(format!("grp://{KEY}@h.example ")),
            AddressError::BadHost
        );
        let b: RelayAddress = format!("grp://{KEY}@other.example:1").parse().unwrap();
        assert!(a.same_relay(&b));
    }
}
