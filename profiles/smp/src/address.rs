//! Server addresses, queue URIs and connection links (§7.1–7.3), parsed and printed exactly.

use std::fmt;
use std::str::FromStr;

use crate::command::QueueMode;
use crate::encoding::{base64url_decode, base64url_encode};

/// Port used when an address has none.
pub const DEFAULT_PORT: u16 = 5223;

/// SMP client version from which a queue URI lists every host in its authority (`v=2-…`).
const SRV_HOSTNAMES_CLIENT_VERSION: u16 = 2;

/// SMP client version from which `k=s` is no longer written (short links).
const SHORT_LINKS_CLIENT_VERSION: u16 = 4;

/// Why an address, URI or link did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// The scheme was not the expected one.
    #[error("expected scheme {0}")]
    Scheme(&'static str),
    /// A required part was missing or malformed.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A queue URI or connection link carried a server password: passwords belong only in the
    /// user's own server configuration, never in links that are shared (§7.1).
    #[error("queue URI must not contain a server password (basic auth)")]
    BasicAuthInLink,
}

/// An SMP server address: `smp://<keyHash>[:<basicAuth>]@<host>[,<host>…][:<port>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmpServer {
    /// SHA-256 of the server's identity certificate (32 bytes).
    pub key_hash: Vec<u8>,
    /// Server password (only in a user's configuration, never in links).
    pub basic_auth: Option<String>,
    /// Hosts as written (domain, IPv4, `[IPv6]` or onion), at least one.
    pub hosts: Vec<String>,
    /// Port, when given.
    pub port: Option<u16>,
}

impl SmpServer {
    /// The port to dial: the explicit one or [`DEFAULT_PORT`].
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_PORT)
    }

    /// Writes the authority. `with_auth` is false for queue URIs: a password is part of the
    /// user's own server configuration only and must never end up in a shared link (§7.1).
    fn write_with_hosts(
        &self,
        f: &mut fmt::Formatter<'_>,
        hosts: &[String],
        with_auth: bool,
    ) -> fmt::Result {
        write!(f, "smp://{}", base64url_encode(&self.key_hash))?;
        if let Some(a) = self.basic_auth.as_ref().filter(|_| with_auth) {
            write!(f, ":{a}")?;
        }
        write!(f, "@{}", hosts.join(","))?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }

    /// Parses the authority part and returns the rest of the input after it.
    fn parse_prefix(s: &str) -> Result<(Self, &str), AddressError> {
        let rest = s
            .strip_prefix("smp://")
            .ok_or(AddressError::Scheme("smp://"))?;
        let at = rest
            .find('@')
            .ok_or(AddressError::Invalid("server address: no '@'"))?;
        let (user, rest) = (&rest[..at], &rest[at + 1..]);
        let (hash, basic_auth) = match user.split_once(':') {
            Some((h, a)) => (h, Some(a)),
            None => (user, None),
        };
        let key_hash = base64url_decode(hash).map_err(|_| AddressError::Invalid("key hash"))?;
        if key_hash.is_empty() {
            return Err(AddressError::Invalid("key hash"));
        }
        if let Some(a) = basic_auth
            && (a.is_empty()
                || !a
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"@:/".contains(&b)))
        {
            return Err(AddressError::Invalid("basic auth"));
        }
        let end = rest.find(['/', '#', '?']).unwrap_or(rest.len());
        let (authority, tail) = (&rest[..end], &rest[end..]);
        let (hosts_str, port) = split_port(authority)?;
        let hosts: Vec<String> = hosts_str.split(',').map(str::to_owned).collect();
        if hosts.iter().any(|h| !valid_host(h)) {
            return Err(AddressError::Invalid("host"));
        }
        Ok((
            Self {
                key_hash,
                basic_auth: basic_auth.map(str::to_owned),
                hosts,
                port,
            },
            tail,
        ))
    }
}

/// A domain, IPv4 or onion name, a bracketed IPv6 address, or a bare IPv6 address (at least
/// two colons). A single colon is a port separator, so `a:1` is not a host: without this,
/// `a:1,b` would pass as the two hosts `a:1` and `b`.
fn valid_host(h: &str) -> bool {
    let ipv6 = |s: &str| {
        s.matches(':').count() >= 2
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b))
    };
    if let Some(inner) = h.strip_prefix('[') {
        return inner.strip_suffix(']').is_some_and(ipv6);
    }
    if h.contains(':') {
        return ipv6(h);
    }
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// A decimal port: digits only (`str::parse` alone would also take a leading `+`).
fn parse_port(s: &str) -> Result<u16, AddressError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddressError::Invalid("port"));
    }
    s.parse::<u16>().map_err(|_| AddressError::Invalid("port"))
}

/// Splits `hosts[:port]`. A bare IPv6 host (several colons, no brackets) has no port.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), AddressError> {
    let last = authority.rsplit(',').next().unwrap_or(authority);
    let colon = if last.starts_with('[') {
        last.find("]:").map(|i| i + 1)
    } else if last.matches(':').count() == 1 {
        last.find(':')
    } else {
        None
    };
    match colon {
        None => Ok((authority, None)),
        Some(i) => {
            let split = authority.len() - last.len() + i;
            let port = parse_port(&authority[split + 1..])?;
            Ok((&authority[..split], Some(port)))
        }
    }
}

impl fmt::Display for SmpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_with_hosts(f, &self.hosts, true)
    }
}

impl FromStr for SmpServer {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (srv, rest) = Self::parse_prefix(s)?;
        if !rest.is_empty() {
            return Err(AddressError::Invalid(
                "trailing characters after server address",
            ));
        }
        Ok(srv)
    }
}

/// `application/x-www-form-urlencoded` escaping as SMP links use it: unreserved
/// `A-Za-z0-9-_.~` stay, everything else becomes `%XX`.
pub fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`url_escape`] (and decodes `+` as a space, as form decoding does).
pub fn url_unescape(s: &str) -> Result<String, AddressError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Two hex digits exactly: `from_str_radix` alone would accept `%+1`.
                let digit = |j: usize| {
                    bytes
                        .get(j)
                        .and_then(|&b| char::from(b).to_digit(16))
                        .ok_or(AddressError::Invalid("percent escape"))
                };
                let (hi, lo) = (digit(i + 1)?, digit(i + 2)?);
                out.push(
                    u8::try_from(hi * 16 + lo)
                        .map_err(|_| AddressError::Invalid("percent escape"))?,
                );
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| AddressError::Invalid("escaped text"))
}

/// A version range in URI form: `a-b`, or `a` when both ends are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    /// Lowest version.
    pub min: u16,
    /// Highest version.
    pub max: u16,
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl FromStr for VersionRange {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |x: &str| {
            if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AddressError::Invalid("version"));
            }
            x.parse::<u16>()
                .map_err(|_| AddressError::Invalid("version"))
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(s)?, num(s)?),
        };
        if min > max {
            return Err(AddressError::Invalid("version range"));
        }
        Ok(Self { min, max })
    }
}

/// A queue URI (§7.2): the server, the sender id and what a sender needs to reach the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUri {
    /// The server (every host, including those given in a legacy `srv=`). Its `basic_auth`
    /// is never printed, and parsing refuses a URI that carries one.
    pub server: SmpServer,
    /// The sender id.
    pub sender_id: Vec<u8>,
    /// SMP client version range (`v=`).
    pub client_versions: VersionRange,
    /// Recipient's e2e X25519 public key, SPKI DER (`dh=`).
    pub dh_key: Vec<u8>,
    /// Queue mode (`q=`, or `k=s` in the legacy form).
    pub queue_mode: Option<QueueMode>,
}

impl fmt::Display for QueueUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let legacy = self.client_versions.min < SRV_HOSTNAMES_CLIENT_VERSION;
        let authority_hosts = if legacy {
            &self.server.hosts[..self.server.hosts.len().min(1)]
        } else {
            &self.server.hosts[..]
        };
        self.server.write_with_hosts(f, authority_hosts, false)?;
        write!(
            f,
            "/{}#/?v={}&dh={}",
            base64url_encode(&self.sender_id),
            self.client_versions,
            url_escape(&base64url_encode(&self.dh_key))
        )?;
        match self.queue_mode {
            Some(QueueMode::Messaging) => f.write_str("&q=m")?,
            Some(QueueMode::Contact) => f.write_str("&q=c")?,
            None => {}
        }
        if self.queue_mode == Some(QueueMode::Messaging)
            && self.client_versions.min < SHORT_LINKS_CLIENT_VERSION
        {
            f.write_str("&k=s")?;
        }
        if legacy && self.server.hosts.len() > 1 {
            write!(f, "&srv={}", url_escape(&self.server.hosts[1..].join(",")))?;
        }
        Ok(())
    }
}

impl FromStr for QueueUri {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut server, rest) = SmpServer::parse_prefix(s)?;
        if server.basic_auth.is_some() {
            return Err(AddressError::BasicAuthInLink);
        }
        let rest = rest
            .strip_prefix('/')
            .ok_or(AddressError::Invalid("queue URI: no sender id"))?;
        let hash = rest
            .find('#')
            .ok_or(AddressError::Invalid("queue URI: no '#'"))?;
        let sender = rest[..hash].trim_end_matches('/');
        let sender_id = base64url_decode(sender).map_err(|_| AddressError::Invalid("sender id"))?;
        let frag = &rest[hash + 1..];
        let (dh_direct, query) = match frag.find('?') {
            Some(q) => (frag[..q].trim_end_matches('/'), Some(&frag[q + 1..])),
            None => (frag, None),
        };
        let dh_direct = (!dh_direct.is_empty()).then_some(dh_direct);
        let Some(query) = query else {
            // Unversioned legacy form: the dh key directly after '#', client version 1.
            let dh = dh_direct.ok_or(AddressError::Invalid("dh key"))?;
            return Ok(Self {
                server,
                sender_id,
                client_versions: VersionRange { min: 1, max: 1 },
                dh_key: base64url_decode(dh).map_err(|_| AddressError::Invalid("dh key"))?,
                queue_mode: None,
            });
        };
        let params = parse_query(query)?;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let client_versions: VersionRange = get("v").ok_or(AddressError::Invalid("v"))?.parse()?;
        let dh = match dh_direct {
            Some(d) => d.to_owned(),
            None => get("dh").ok_or(AddressError::Invalid("dh"))?.to_owned(),
        };
        let dh_key = base64url_decode(&dh).map_err(|_| AddressError::Invalid("dh key"))?;
        if let Some(srv) = get("srv") {
            for h in srv.split(',') {
                if !valid_host(h) {
                    return Err(AddressError::Invalid("srv host"));
                }
                server.hosts.push(h.to_owned());
            }
        }
        let queue_mode = match (get("q"), get("k")) {
            (Some("m"), _) => Some(QueueMode::Messaging),
            (Some("c"), _) => Some(QueueMode::Contact),
            (Some(_), _) => return Err(AddressError::Invalid("q")),
            (None, Some("s")) => Some(QueueMode::Messaging),
            (None, _) => None,
        };
        Ok(Self {
            server,
            sender_id,
            client_versions,
            dh_key,
            queue_mode,
        })
    }
}

/// Splits `a=b&c=d`, unescaping values; unknown parameters are kept (and ignored by callers).
fn parse_query(q: &str) -> Result<Vec<(String, String)>, AddressError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or(AddressError::Invalid("query parameter"))?;
            Ok((k.to_owned(), url_unescape(v)?))
        })
        .collect()
}

/// The kind of a full connection link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkKind {
    /// `/invitation`: a one-time invitation.
    Invitation,
    /// `/contact`: a contact address.
    Contact,
}

/// A full (agent-level) connection link (§7.3). Only its SMP parts are interpreted: the `e2e`
/// and `data` parameters are kept as their unescaped text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLink {
    /// Invitation or contact.
    pub kind: LinkKind,
    /// Agent version range (`v=`).
    pub agent_versions: VersionRange,
    /// The queues (`smp=`, `;`-separated before escaping).
    pub queues: Vec<QueueUri>,
    /// Ratchet parameters (`e2e=`), unescaped.
    pub e2e: Option<String>,
    /// Extra data (`data=`), unescaped.
    pub data: Option<String>,
}

impl fmt::Display for ConnectionLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            LinkKind::Invitation => "invitation",
            LinkKind::Contact => "contact",
        };
        let queues: Vec<String> = self.queues.iter().map(ToString::to_string).collect();
        write!(
            f,
            "simplex:/{kind}#/?v={}&smp={}",
            self.agent_versions,
            url_escape(&queues.join(";"))
        )?;
        if let Some(e) = &self.e2e {
            write!(f, "&e2e={}", url_escape(e))?;
        }
        if let Some(d) = &self.data {
            write!(f, "&data={}", url_escape(d))?;
        }
        Ok(())
    }
}

impl FromStr for ConnectionLink {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path = if let Some(r) = s.strip_prefix("simplex:") {
            r
        } else if let Some(r) = s.strip_prefix("https://") {
            // `https://<host>/invitation#…` is a synonym (e.g. simplex.chat).
            &r[r.find('/').ok_or(AddressError::Invalid("link path"))?..]
        } else {
            return Err(AddressError::Scheme("simplex: or https://"));
        };
        let (kind, rest) = if let Some(r) = path.strip_prefix("/invitation") {
            (LinkKind::Invitation, r)
        } else if let Some(r) = path.strip_prefix("/contact") {
            (LinkKind::Contact, r)
        } else {
            return Err(AddressError::Invalid("link kind"));
        };
        let query = rest
            .strip_prefix("#/?")
            .or_else(|| rest.strip_prefix("#?"))
            .ok_or(AddressError::Invalid("link fragment"))?;
        let params = parse_query(query)?;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let agent_versions = get("v").ok_or(AddressError::Invalid("v"))?.parse()?;
        let smp = get("smp").ok_or(AddressError::Invalid("smp"))?;
        let queues = smp
            .split(';')
            .map(str::parse)
            .collect::<Result<Vec<QueueUri>, _>>()?;
        Ok(Self {
            kind,
            agent_versions,
            queues,
            e2e: get("e2e"),
            data: get("data"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUE: &str = "smp://1234-w==@smp.simplex.im,jjbyvoemxysm7qxap7m5d5m35jzv5qq6gnlv7s4rsn7tdwwmuqciwpid.onion:5223/3456-w==#/?v=2-4&dh=MCowBQYDK2VuAyEAjiswwI3O_NlS8Fk3HJUW870EY2bAwmttMBsvRB9eV3o%3D&q=m&k=s";
    const LINK: &str = "simplex:/invitation#/?v=2-7&smp=smp%3A%2F%2F1234-w%3D%3D%40smp.simplex.im%2Cjjbyvoemxysm7qxap7m5d5m35jzv5qq6gnlv7s4rsn7tdwwmuqciwpid.onion%3A5223%2F3456-w%3D%3D%23%2F%3Fv%3D2-4%26dh%3DMCowBQYDK2VuAyEAjiswwI3O_NlS8Fk3HJUW870EY2bAwmttMBsvRB9eV3o%253D%26q%3Dm%26k%3Ds&e2e=v%3D1%26x3dh%3DMEIwBQYDK2VvAzkAmKuSYeQ_m0SixPDS8Wq8VBaTS1cW-Lp0n0h4Diu-kUpR-qXx4SDJ32YGEFoGFGSbGPry5Ychr6U%3D%2CMEIwBQYDK2VvAzkAmKuSYeQ_m0SixPDS8Wq8VBaTS1cW-Lp0n0h4Diu-kUpR-qXx4SDJ32YGEFoGFGSbGPry5Ychr6U%3D";

    #[test]
    fn t4_queue_uri() {
        let q: QueueUri = QUEUE.parse().unwrap();
        assert_eq!(q.server.key_hash, [0xd7, 0x6d, 0xf8, 0xfb]);
        assert_eq!(q.sender_id, [0xdf, 0x8e, 0x7a, 0xfb]);
        assert_eq!(q.server.hosts.len(), 2);
        assert_eq!(q.server.port, Some(5223));
        assert_eq!(q.client_versions, VersionRange { min: 2, max: 4 });
        assert_eq!(q.queue_mode, Some(QueueMode::Messaging));
        assert_eq!(q.dh_key.len(), 44);
        assert_eq!(
            &q.dh_key[..12],
            b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x6e\x03\x21\x00"
        );
        assert_eq!(q.to_string(), QUEUE);
        // From client version 4 on, `k=s` is no longer written.
        let mut v4 = q.clone();
        v4.client_versions = VersionRange { min: 4, max: 4 };
        assert!(v4.to_string().ends_with(
            "#/?v=4&dh=MCowBQYDK2VuAyEAjiswwI3O_NlS8Fk3HJUW870EY2bAwmttMBsvRB9eV3o%3D&q=m"
        ));
        // Legacy min version 1: only the first host in the authority, the rest in srv=.
        let mut legacy = q.clone();
        legacy.client_versions = VersionRange { min: 1, max: 4 };
        let s = legacy.to_string();
        assert!(
            s.starts_with("smp://1234-w==@smp.simplex.im:5223/3456-w==#/?v=1-4&"),
            "{s}"
        );
        assert!(s.ends_with("&srv=jjbyvoemxysm7qxap7m5d5m35jzv5qq6gnlv7s4rsn7tdwwmuqciwpid.onion"));
        assert_eq!(s.parse::<QueueUri>().unwrap(), legacy);
    }

    #[test]
    fn t4_connection_link() {
        let l: ConnectionLink = LINK.parse().unwrap();
        assert_eq!(l.kind, LinkKind::Invitation);
        assert_eq!(l.agent_versions, VersionRange { min: 2, max: 7 });
        assert_eq!(l.queues, vec![QUEUE.parse::<QueueUri>().unwrap()]);
        assert!(l.e2e.as_deref().unwrap().starts_with("v=1&x3dh=MEIw"));
        assert_eq!(l.to_string(), LINK);
        let https = LINK.replacen("simplex:", "https://simplex.chat", 1);
        assert_eq!(https.parse::<ConnectionLink>().unwrap(), l);
    }

    #[test]
    fn server_addresses() {
        let s: SmpServer = "smp://LcJUMfVhwD8yxjAiSaDzzGF3-kLG4Uh0Fl_ZIjrRwjI=@localhost"
            .parse()
            .unwrap();
        assert_eq!(s.key_hash.len(), 32);
        assert_eq!(s.port_or_default(), 5223);
        assert_eq!(
            s.to_string(),
            "smp://LcJUMfVhwD8yxjAiSaDzzGF3-kLG4Uh0Fl_ZIjrRwjI=@localhost"
        );
        let with_auth =
            "smp://LcJUMfVhwD8yxjAiSaDzzGF3-kLG4Uh0Fl_ZIjrRwjI=:secret@a.example,[::1]:443";
        let s: SmpServer = with_auth.parse().unwrap();
        assert_eq!(s.basic_auth.as_deref(), Some("secret"));
        assert_eq!(s.hosts, ["a.example", "[::1]"]);
        assert_eq!(s.port, Some(443));
        assert_eq!(s.to_string(), with_auth);
        let v4: SmpServer = "smp://AAAA@127.0.0.1:5223".parse().unwrap();
        assert_eq!((v4.hosts[0].as_str(), v4.port), ("127.0.0.1", Some(5223)));
        for bad in [
            "http://AAAA@host",
            "smp://host",
            "smp://@host",
            "smp://AAAA@",
            "smp://AAAA@host:99999",
            "smp://AAAA@host:x",
            "smp://AAAA@ho st",
            "smp://AAAA@host/extra",
        ] {
            assert!(bad.parse::<SmpServer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_uri_never_carries_basic_auth() {
        let mut q: QueueUri = QUEUE.parse().unwrap();
        q.server.basic_auth = Some("hunter2".into());
        let s = q.to_string();
        assert!(!s.contains("hunter2"), "{s}");
        assert_eq!(s, QUEUE);
        let with_auth = QUEUE.replacen("1234-w==@", "1234-w==:hunter2@", 1);
        assert_eq!(
            with_auth.parse::<QueueUri>(),
            Err(AddressError::BasicAuthInLink)
        );
        let link = LINK.replacen("1234-w%3D%3D%40", "1234-w%3D%3D%3Ahunter2%40", 1);
        assert_ne!(link, LINK);
        assert_eq!(
            link.parse::<ConnectionLink>(),
            Err(AddressError::BasicAuthInLink)
        );
        let shown = ConnectionLink {
            kind: LinkKind::Contact,
            agent_versions: VersionRange { min: 2, max: 7 },
            queues: vec![q],
            e2e: None,
            data: None,
        }
        .to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        // A server address in the user's configuration keeps its password.
        let cfg: SmpServer = "smp://AAAA:hunter2@host".parse().unwrap();
        assert_eq!(cfg.to_string(), "smp://AAAA:hunter2@host");
    }

    #[test]
    fn hosts_and_ports_are_strict() {
        for bad in [
            "smp://AAAA@a:1,b",
            "smp://AAAA@a:1,b:2",
            "smp://AAAA@a]b",
            "smp://AAAA@[::1",
            "smp://AAAA@::1]:5",
            "smp://AAAA@[]",
            "smp://AAAA@[a:b:zz]",
            "smp://AAAA@host:+5",
        ] {
            assert!(bad.parse::<SmpServer>().is_err(), "{bad}");
        }
        for (good, hosts, port) in [
            ("smp://AAAA@a,b:2", &["a", "b"][..], Some(2)),
            ("smp://AAAA@[::1]:443", &["[::1]"][..], Some(443)),
            ("smp://AAAA@::1", &["::1"][..], None),
            ("smp://AAAA@fe80::1:2", &["fe80::1:2"][..], None),
            (
                "smp://AAAA@a.b_c-d,1.2.3.4",
                &["a.b_c-d", "1.2.3.4"][..],
                None,
            ),
        ] {
            let s: SmpServer = good.parse().unwrap();
            assert_eq!(s.hosts, hosts, "{good}");
            assert_eq!(s.port, port, "{good}");
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(url_escape("a=b&c/d~_.-"), "a%3Db%26c%2Fd~_.-");
        assert_eq!(url_unescape("a%3Db%26c%2Fd").unwrap(), "a=b&c/d");
        assert_eq!(url_unescape("%3d%3D").unwrap(), "==");
        assert!(url_unescape("%4").is_err());
        assert!(url_unescape("%zz").is_err());
        assert!(url_unescape("%+1").is_err());
        assert!(url_unescape("%-1").is_err());
        assert!(url_unescape("% 1").is_err());
    }
}
