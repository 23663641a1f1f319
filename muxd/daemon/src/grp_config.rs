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
//! ```

use std::str::FromStr as _;
use std::time::Duration;

use muxd_grp::address::RelayAddress;

use crate::config::ConfigError;

/// The longest `max_delay_ms` accepted: beyond a minute commands would time out first.
const MAX_DELAY_MS_RANGE: (i64, i64) = (0, 60_000);

/// GRP settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GrpSettings {
    /// Proxy choice and known relays, for the pool.
    pub pool: muxd_core::GrpConfig,
    /// `max_delay` of the cover scheduler on client links; `None` = GRP's 1 s.
    pub max_delay: Option<Duration>,
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
            (name @ ("proxy" | "relays" | "max_delay_ms"), other) => {
                let reason = format!("wrong type {}", other.type_str());
                return Err(ConfigError::invalid(static_name(name), origin, reason));
            }
            (other, _) => {
                let reason = format!("unknown key `{other}` (known: proxy, relays, max_delay_ms)");
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
        let unknown: toml::Table = "prxy = \"x\"".parse().unwrap();
        assert!(parse(toml::Value::Table(unknown), "in test").is_err());
    }
}
