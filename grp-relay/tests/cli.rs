//! The `grp-relay` binary: gen-config, init, and a run that ends on SIGTERM with goodbyes.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use grp_relay::carrier::Carrier;
use grp_relay::carrier::tcp::TcpCarrier;
use grp_relay::config::Config;
use muxd_grp::address::{Carrier as Scheme, Host, RelayAddress};
use muxd_grp::block::GoodbyeReason;
use muxd_grp::connection::{CloseReason, ConnectionConfig};
use support::{Client, FAST};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_grp-relay");

#[tokio::test]
async fn gen_config_prints_the_defaults() {
    let out = Command::new(BIN).arg("gen-config").output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: Config = toml::from_str(&text).unwrap();
    assert_eq!(parsed, Config::default());
}

#[tokio::test]
async fn runs_until_sigterm_and_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("relay.key");
    let out = Command::new(BIN)
        .args(["init", "--key-file"])
        .arg(&key_file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let init_key = String::from_utf8(out.stdout).unwrap();
    let init_key = init_key.trim().strip_prefix("key ").unwrap().to_owned();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let mut child = Command::new(BIN)
        .arg("--key-file")
        .arg(&key_file)
        .args([
            "--listen-tcp",
            "127.0.0.1:0",
            "--listen-quic",
            "127.0.0.1:0",
            "--listen-ws",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = Vec::new();
    while addrs.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        addrs.push(line.parse::<RelayAddress>().unwrap());
    }
    let schemes: Vec<Scheme> = addrs.iter().map(|a| a.carrier).collect();
    assert_eq!(schemes, [Scheme::Tcp, Scheme::Quic, Scheme::Ws]);
    for a in &addrs {
        assert_eq!(a.key_text(), init_key, "the key from init is the identity");
        assert_eq!(a.host, Host::Ipv4([127, 0, 0, 1].into()));
    }

    let tcp = SocketAddr::from(([127, 0, 0, 1], addrs[0].port));
    let s = TcpStream::connect(tcp).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut cfg = ConnectionConfig::client(addrs[0].key);
    cfg.cover = Some(FAST);
    let mut c = Client::over(Carrier::Tcp(TcpCarrier::new(s)), local, cfg)
        .await
        .unwrap();
    let (_, pong) = c.call(b"", b"PING", None).await;
    assert_eq!(pong, b"PONG");

    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    assert_eq!(
        c.wait_closed(Duration::from_secs(10)).await,
        Some(CloseReason::Goodbye(GoodbyeReason::Shutdown))
    );
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
