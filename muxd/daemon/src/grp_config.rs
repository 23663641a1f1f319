//! The `[grp]` table of the daemon config (GRP/1 relays, issue 7).
//!
//! ```toml
//! [grp]
//! # The relay every send to a GRP queue goes through (two-hop sending, GRP §10). It must be
//! # a different relay from the destination. Unset: another GRP relay the daemon already
//! # uses, else the first of `relays` that is not the destination.
//! proxy = "grp+quic://<key>@relay2.example:7443"
//! # Known relays: candidate proxies, and the TCP address of relays whose queues are created
//! # over QUIC or WebSocket (senders' proxies reach a destination over TCP).
//! relays = ["grp://<key>@relay1.example:7443"]
//! # Cover scheduling: the longest a queued command waits for a cover tick, milliseconds
//! # (GRP §12.2; default 1000).
//! max_delay_ms = 1000
//! # Session renewal drill: start make-before-break this many seconds after a session's
//! # handshake instead of at 23 h–23.5 h (GRP §6.5); the window keeps the spec's shape
//! # (uniform in [n, n + n/46]). 1..=82800: never later than the spec. For tests and
//! # operators' drills; leave unset in production.
//! # renew_after_s = 30
//! ```

use std::str::FromStr as _;
use std::time::Duration;

use muxd_grp::address::RelayAddress;

use crate::config::ConfigError;

/// The longest `max_delay_ms` accepted: beyond a minute commands would time out first.
const MAX_DELAY_MS_RANGE: (i64, i64) = (0, 60_000);

/// `renew_after_s` bounds: at most 23 h, so the renewal never comes later than §6.5 allows.
const RENEW_AFTER_S_RANGE: (i64, i64) = (1, 23 * 3600);

/// GRP settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrpSettings {
    /// Proxy choice and known relays, for the pool.
    pub pool: muxd_core::GrpConfig,
    /// `max_delay` of the cover scheduler on client links; `None` = GRP's 1 s.
    pub max_delay: Option<Duration>,
    /// Start of the make-before-break window of client links; `None` = GRP's 23 h.
    pub renew_after: Option<Duration>,
}

/// Parses the `[grp]` table, checking every address.
pub(crate) fn parse(value: toml::Value, origin: &str) -> Result<GrpSettings, ConfigError> {
    let toml::Value::Table(table) = value else {
        return Err(ConfigError::invalid("grp", origin, "expected a table"));
    };
    let mut out = GrpSettings::default();
    for (key, value) in table {
        match (key.as_str(), value) {
            ("proxy", toml::Value::String(s)) => {
                check_address("grp.proxy", origin, &s)?;
                out.pool.proxy = Some(s);
            }
            ("relays", toml::Value::Array(items)) => {
                for item in items {
                    let toml::Value::String(s) = item else {
                        return Err(ConfigError::invalid(
                            "grp.relays",
                            origin,
                            "expected strings",
                        ));
                    };
                    check_address("grp.relays", origin, &s)?;
                    out.pool.relays.push(s);
                }
            }
            ("max_delay_ms", toml::Value::Integer(n)) => {
                let (lo, hi) = MAX_DELAY_MS_RANGE;
                if !(lo..=hi).contains(&n) {
                    let reason = format!("{n} is out of range {lo}..={hi}");
                    return Err(ConfigError::invalid("grp.max_delay_ms", origin, reason));
                }
                out.max_delay = Some(Duration::from_millis(n.unsigned_abs()));
            }
            ("renew_after_s", toml::Value::Integer(n)) => {
                let (lo, hi) = RENEW_AFTER_S_RANGE;
                if !(lo..=hi).contains(&n) {
                    let reason =
                        format!("{n} is out of range {lo}..={hi} (GRP §6.5: 23 h at most)");
                    return Err(ConfigError::invalid("grp.renew_after_s", origin, reason));
                }
                out.renew_after = Some(Duration::from_secs(n.unsigned_abs()));
            }
            (name @ ("proxy" | "relays" | "max_delay_ms" | "renew_after_s"), other) => {
                let reason = format!("wrong type {}", other.type_str());
                return Err(ConfigError::invalid(static_name(name), origin, reason));
            }
            (other, _) => {
                let reason = format!(
                    "unknown key `{other}` (known: proxy, relays, max_delay_ms, renew_after_s)"
                );
                return Err(ConfigError::invalid("grp", origin, reason));
            }
        }
    }
    Ok(out)
}

fn static_name(name: &str) -> &'static str {
    match name {
        "proxy" => "grp.proxy",
        "relays" => "grp.relays",
        "renew_after_s" => "grp.renew_after_s",
        _ => "grp.max_delay_ms",
    }
}

fn check_address(key: &'static str, origin: &str, s: &str) -> Result<(), ConfigError> {
    RelayAddress::from_str(s)
        .map(|_| ())
        .map_err(|e| ConfigError::invalid(key, origin, format!("{s:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

    #[test]
    fn parses_and_checks() {
        let v: toml::Table = format!(
            "proxy = \"grp+quic://{KEY}@127.0.0.1:9\"\nrelays = [\"grp://{KEY}@h.example\"]\nmax_delay_ms = 20"
        )
        .parse()
        .unwrap();
        let g = parse(toml::Value::Table(v), "in test").unwrap();
        assert_eq!(g.max_delay, Some(Duration::from_millis(20)));
        assert_eq!(g.pool.relays.len(), 1);
        assert!(g.pool.proxy.unwrap().starts_with("grp+quic://"));
        let bad: toml::Table = "proxy = \"grp://nokey@h\"".parse().unwrap();
        let e = parse(toml::Value::Table(bad), "in test").unwrap_err();
        assert!(e.to_string().contains("grp.proxy"), "{e}");
        let drill: toml::Table = "renew_after_s = 5".parse().unwrap();
        let g = parse(toml::Value::Table(drill), "in test").unwrap();
        assert_eq!(g.renew_after, Some(Duration::from_secs(5)));
        // Later than the spec's window, or zero, is refused.
        for n in [0, 23 * 3600 + 1] {
            let t: toml::Table = format!("renew_after_s = {n}").parse().unwrap();
            let e = parse(toml::Value::Table(t), "in test").unwrap_err();
            assert!(e.to_string().contains("grp.renew_after_s"), "{e}");
        }
        let unknown: toml::Table = "prxy = \"x\"".parse().unwrap();
        assert!(parse(toml::Value::Table(unknown), "in test").is_err());
    }
}
