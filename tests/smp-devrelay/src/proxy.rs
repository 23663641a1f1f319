//! SMP proxying (spec §5.5): this relay as a proxy (PRXY → PKEY, PFWD → PRES) and as the
//! destination relay (RFWD → RRES).
//!
//! As a proxy, each client connection keeps its own relay links (the reference server shares
//! them between clients); a link is an SMP client connection made with the profile's
//! handshake and `proxyServer = 'T'`, so from v14 its blocks are not encrypted. A PFWD waits
//! for its RRES before the client's next block is read: simple, and enough for tests.
//!
//! The client-facing formats follow the digest. RFWD/RRES run only between two relays; their
//! layout here (`ss(fwdCorrId) W16(v) ss(cmdKey) encT` / `ss(fwdCorrId) encR`, crypto_box
//! with the proxy↔relay secret, nonce = the RFWD corrId and its reverse) is this
//! implementation's reading of the digest and has not been checked against a Haskell relay.

use std::collections::BTreeMap;
use std::time::Duration;

use muxd_smp::block::{BatchBuilder, decode_batch, pad_block, unpad_block};
use muxd_smp::cert::{CertPublicKey, KeyHash};
use muxd_smp::command::{Command, ProxyKey, Response, ServerRef};
use muxd_smp::crypto::{
    BlockCipher, cb_decrypt, cb_decrypt_no_pad, cb_encrypt, cb_encrypt_no_pad, cb_nonce,
};
use muxd_smp::encoding::{Parser, put_short_string, put_w16};
use muxd_smp::error::{
    BrokerError, CmdError, ErrorType, HandshakeFailure, NetworkError, ProxyError,
};
use muxd_smp::handshake::{
    ClientHello, HandshakeParams, ServerHello, VersionRange, client_handshake,
};
use muxd_smp::keys::{DhSecret, X25519PublicKey, X25519SecretKey};
use muxd_smp::transmission::{Authorized, Transmission, encode_transmission};
use muxd_smp::version;
use muxd_transport::tokio_rustls::client::TlsStream;
use muxd_transport::{Alpn, BlockStream, ConnectOptions, TransportError, connect_tls};
use rand_core::{OsRng, RngCore as _};
use tokio::net::TcpStream;

use crate::Shared;

/// Pad target of the forwarded transmission inside PFWD and PRES (`paddedProxiedTLength`).
pub(crate) const PADDED_PROXIED_LEN: usize = 16226;
/// The highest relay version a proxy advertises in PKEY (`proxiedSMPRelayVersion`).
const PROXIED_RELAY_MAX: u16 = 17;
/// How long the proxy waits for the relay (connect + handshake, or one RRES).
const RELAY_TIMEOUT: Duration = Duration::from_secs(30);
/// The default SMP port, used when PRXY names none.
const DEFAULT_PORT: u16 = 5223;

/// One proxy→relay connection.
struct RelayLink {
    io: BlockStream<TlsStream<TcpStream>>,
    version: u16,
    session_id: Vec<u8>,
    /// X25519(proxy ClientHello key, relay session key): seals RFWD and opens RRES.
    p2r: DhSecret,
    cipher: Option<BlockCipher>,
}

impl std::fmt::Debug for RelayLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayLink")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// This connection's relay links, by relay session id.
#[derive(Debug, Default)]
pub(crate) struct ProxyState {
    links: BTreeMap<Vec<u8>, RelayLink>,
}

fn broker(e: BrokerError) -> ErrorType {
    ErrorType::Proxy(ProxyError::Broker(e))
}

fn transport_broker(e: &TransportError) -> ErrorType {
    if e.is_identity() {
        broker(BrokerError::Network(Some(NetworkError::UnknownCa)))
    } else {
        broker(BrokerError::Network(None))
    }
}

/// PRXY: connects to the relay, runs the SMP handshake as a proxy and answers PKEY with the
/// relay's session id, version range (capped at 17) and signed session key.
pub(crate) async fn connect(
    state: &mut ProxyState,
    shared: &Shared,
    server: &ServerRef,
) -> Result<Response, ErrorType> {
    let key_hash: [u8; 32] = server
        .key_hash
        .as_slice()
        .try_into()
        .map_err(|_| ErrorType::Cmd(CmdError::Syntax))?;
    let key_hash = KeyHash::from_bytes(key_hash);
    let host = server
        .hosts
        .first()
        .ok_or(ErrorType::Cmd(CmdError::Syntax))?;
    let port = if server.port.is_empty() {
        DEFAULT_PORT
    } else {
        server
            .port
            .parse()
            .map_err(|_| ErrorType::Cmd(CmdError::Syntax))?
    };
    let setup = link(host, port, key_hash, shared.config.max_version);
    let (link, pkey) = tokio::time::timeout(RELAY_TIMEOUT, setup)
        .await
        .map_err(|_| broker(BrokerError::Timeout))??;
    state.links.insert(link.session_id.clone(), link);
    Ok(Response::PKey(pkey))
}

async fn link(
    host: &str,
    port: u16,
    key_hash: KeyHash,
    max_version: u16,
) -> Result<(RelayLink, ProxyKey), ErrorType> {
    let addr = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or(broker(BrokerError::Host))?;
    let tls = connect_tls(addr, &key_hash, &ConnectOptions::with_alpn(Alpn::Smp))
        .await
        .map_err(|e| transport_broker(&e))?;
    let leaf = tls
        .peer_certificates()
        .first()
        .and_then(|c| CertPublicKey::from_certificate(c).ok())
        .ok_or(broker(BrokerError::Network(Some(NetworkError::UnknownCa))))?;
    let mut io = tls.into_blocks();
    let hello_block = io.read_block().await.map_err(|e| transport_broker(&e))?;
    let handshake_err = |f| {
        broker(BrokerError::Transport(
            muxd_smp::error::TransportError::Handshake(f),
        ))
    };
    let hello = ServerHello::decode_block(&hello_block[..])
        .map_err(|_| handshake_err(HandshakeFailure::Parse))?;
    let key = X25519SecretKey::generate(&mut OsRng);
    let params = HandshakeParams {
        key_hash,
        versions: VersionRange::new(
            version::SENDING_PROXY,
            max_version.max(version::SENDING_PROXY),
        )
        .ok_or(ErrorType::Internal)?,
        tls_session_id: None,
        tls_leaf_key: &leaf,
    };
    let (_, session) = client_handshake(&hello_block[..], &params, Some(&key))
        .map_err(|_| handshake_err(HandshakeFailure::BadAuth))?;
    let (Some(relay_key), Some(cert_key)) = (session.server_session_key, hello.cert_key) else {
        return Err(handshake_err(HandshakeFailure::BadAuth));
    };
    // Our own ClientHello rather than the profile's: it says we are a proxy (v14+).
    let proxy_server = session.version >= version::PROXY_SERVER_HANDSHAKE;
    let client_hello = ClientHello {
        version: session.version,
        key_hash,
        client_key: Some(key.public_key()),
        proxy_server,
    }
    .encode_block()
    .map_err(|_| ErrorType::Internal)?;
    io.write_block(&client_hello)
        .await
        .map_err(|e| transport_broker(&e))?;
    let pkey = ProxyKey {
        session_id: session.session_id.clone(),
        min_version: hello.versions.min().max(version::SENDING_PROXY),
        max_version: hello.versions.max().min(PROXIED_RELAY_MAX),
        cert_chain: cert_key.chain,
        signed_key: cert_key.signed_key,
    };
    let link = RelayLink {
        io,
        version: session.version,
        session_id: session.session_id,
        p2r: key.diffie_hellman(&relay_key),
        cipher: if proxy_server {
            None
        } else {
            session.block_cipher
        },
    };
    Ok((link, pkey))
}

/// A client's PFWD.
#[derive(Debug)]
pub(crate) struct Forward<'a> {
    /// The PFWD corrId: the nonce of the client's encryption.
    pub(crate) corr_id: &'a [u8],
    /// The relay session id from PKEY (the PFWD entity).
    pub(crate) session_id: &'a [u8],
    pub(crate) version: u16,
    pub(crate) key: &'a [u8],
    pub(crate) enc: &'a [u8],
}

/// PFWD: wraps the client's transmission in RFWD to the relay and returns its RRES content
/// as PRES.
pub(crate) async fn forward(
    state: &mut ProxyState,
    fwd: &Forward<'_>,
) -> Result<Response, ErrorType> {
    let link = state
        .links
        .get_mut(fwd.session_id)
        .ok_or(ErrorType::Proxy(ProxyError::NoSession))?;
    let result = tokio::time::timeout(RELAY_TIMEOUT, exchange(link, fwd)).await;
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(Failure::Protocol(e))) => Err(e),
        Ok(Err(Failure::Link(e))) => {
            // The link is unusable; the client must PRXY again.
            state.links.remove(fwd.session_id);
            Err(e)
        }
        Err(_) => {
            state.links.remove(fwd.session_id);
            Err(broker(BrokerError::Timeout))
        }
    }
}

enum Failure {
    /// An answer to this command; the link is fine.
    Protocol(ErrorType),
    /// The link broke.
    Link(ErrorType),
}

async fn exchange(link: &mut RelayLink, fwd: &Forward<'_>) -> Result<Response, Failure> {
    let internal = |_| Failure::Protocol(ErrorType::Internal);
    let mut plain = Vec::new();
    put_short_string(&mut plain, fwd.corr_id).map_err(internal)?;
    put_w16(&mut plain, fwd.version);
    put_short_string(&mut plain, fwd.key).map_err(internal)?;
    plain.extend_from_slice(fwd.enc);
    let mut rfwd_corr = [0u8; 24];
    OsRng.fill_bytes(&mut rfwd_corr);
    let sealed = cb_encrypt_no_pad(&link.p2r, &rfwd_corr, &plain);
    let mut cmd = Vec::new();
    Command::RFwd(sealed)
        .encode(link.version, &mut cmd)
        .map_err(internal)?;
    let a = Authorized::new(&link.session_id, &rfwd_corr, b"", &cmd).map_err(internal)?;
    let mut t = Vec::new();
    encode_transmission(link.version, b"", &a, &mut t).map_err(internal)?;
    let mut batch = BatchBuilder::new();
    if !batch.push(&t) {
        return Err(Failure::Protocol(ErrorType::LargeMsg));
    }
    let content = batch.take();
    let block = match &mut link.cipher {
        Some(c) => c
            .encrypt_block(&content)
            .map_err(|_| Failure::Protocol(ErrorType::Internal))?,
        None => {
            let mut b = Vec::new();
            pad_block(&content, &mut b).map_err(internal)?;
            b
        }
    };
    let link_err = |e: TransportError| Failure::Link(transport_broker(&e));
    link.io.write_block(&block).await.map_err(link_err)?;
    loop {
        let block = link.io.read_block().await.map_err(link_err)?;
        let content = match &mut link.cipher {
            Some(c) => c.decrypt_block(&block[..]).ok(),
            None => unpad_block(&block[..]).ok().map(<[u8]>::to_vec),
        };
        let Some(items) = content.as_deref().and_then(|c| decode_batch(c).ok()) else {
            continue;
        };
        for item in items {
            let Ok(t) = Transmission::decode(link.version, &link.session_id, item) else {
                continue;
            };
            if t.corr_id != rfwd_corr {
                continue;
            }
            let unexpected =
                |what: &str| Failure::Protocol(broker(BrokerError::Unexpected(what.to_owned())));
            return match Response::decode(link.version, t.command) {
                Ok(Response::RRes(enc)) => open_rres(&link.p2r, &rfwd_corr, fwd.corr_id, &enc)
                    .map(Response::PRes)
                    .map_err(Failure::Protocol),
                Ok(Response::Err(e)) => Err(Failure::Protocol(ErrorType::Proxy(
                    ProxyError::Protocol(Box::new(e)),
                ))),
                Ok(other) => Err(unexpected(other.tag())),
                Err(_) => Err(Failure::Protocol(broker(BrokerError::Response(
                    "unparseable relay response".to_owned(),
                )))),
            };
        }
    }
}

fn reversed(bytes: &[u8]) -> [u8; 24] {
    let mut n = cb_nonce(bytes);
    n.reverse();
    n
}

fn open_rres(
    p2r: &DhSecret,
    rfwd_corr: &[u8],
    pfwd_corr: &[u8],
    enc: &[u8],
) -> Result<Vec<u8>, ErrorType> {
    let plain = cb_decrypt_no_pad(p2r, &reversed(rfwd_corr), enc).map_err(|_| ErrorType::Crypto)?;
    let mut p = Parser::new(&plain);
    let corr = p.short_string().map_err(|_| ErrorType::Crypto)?;
    if corr != pfwd_corr {
        return Err(broker(BrokerError::Unexpected(
            "RRES for another command".to_owned(),
        )));
    }
    Ok(p.tail().to_vec())
}

/// An opened RFWD, at the destination relay.
#[derive(Debug)]
pub(crate) struct Forwarded {
    /// The client's PFWD corrId (nonce of the client's encryption).
    corr_id: Vec<u8>,
    /// The version the client encoded the transmission at.
    pub(crate) version: u16,
    /// X25519(relay session key, client's per-command key).
    cmd_secret: DhSecret,
    /// The client's batch (one transmission).
    pub(crate) batch: Vec<u8>,
}

/// Opens RFWD: `crypto_box(p2r, rfwdCorrId, ss(fwdCorrId) W16(v) ss(cmdKey) encT)`, then
/// `encT` with X25519(session key, cmdKey) and nonce fwdCorrId.
pub(crate) fn open_rfwd(
    session_key: &X25519SecretKey,
    p2r: &DhSecret,
    rfwd_corr: &[u8],
    enc: &[u8],
) -> Result<Forwarded, ErrorType> {
    let plain = cb_decrypt_no_pad(p2r, &cb_nonce(rfwd_corr), enc).map_err(|_| ErrorType::Crypto)?;
    let mut p = Parser::new(&plain);
    let parsed = (|| {
        let corr = p.short_string()?.to_vec();
        let v = p.w16()?;
        let key = p.short_string()?;
        Ok::<_, muxd_smp::encoding::DecodeError>((corr, v, key, p.tail()))
    })();
    let (corr_id, version, key, enc_t) = parsed.map_err(|_| ErrorType::Cmd(CmdError::Syntax))?;
    let cmd_key = X25519PublicKey::from_spki(key).map_err(|_| ErrorType::Cmd(CmdError::Syntax))?;
    let cmd_secret = session_key.diffie_hellman(&cmd_key);
    let batch =
        cb_decrypt(&cmd_secret, &cb_nonce(&corr_id), enc_t).map_err(|_| ErrorType::Crypto)?;
    Ok(Forwarded {
        corr_id,
        version,
        cmd_secret,
        batch,
    })
}

/// Seals the relay's answer: `encR = crypto_box(cmdSecret, reverse(fwdCorrId),
/// pad(batch, 16226))`, then `crypto_box(p2r, reverse(rfwdCorrId), ss(fwdCorrId) encR)`.
pub(crate) fn seal_rres(
    p2r: &DhSecret,
    rfwd_corr: &[u8],
    fwd: &Forwarded,
    batch: &[u8],
) -> Result<Vec<u8>, ErrorType> {
    let enc_r = cb_encrypt(
        &fwd.cmd_secret,
        &reversed(&fwd.corr_id),
        batch,
        PADDED_PROXIED_LEN,
    )
    .map_err(|_| ErrorType::Internal)?;
    let mut plain = Vec::with_capacity(1 + fwd.corr_id.len() + enc_r.len());
    put_short_string(&mut plain, &fwd.corr_id).map_err(|_| ErrorType::Internal)?;
    plain.extend_from_slice(&enc_r);
    Ok(cb_encrypt_no_pad(p2r, &reversed(rfwd_corr), &plain))
}
