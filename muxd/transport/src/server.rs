//! The server half of the SMP transport, for the dev relay and for tests.
//!
//! A [`ServerIdentity`] is what `smp-server init` creates: an offline identity CA (whose
//! certificate's SHA-256 is the address keyHash) and an online leaf signed by it, both Ed25519
//! by default or Ed448 by option. openssl builds and signs them, since rcgen and ring cannot
//! do Ed448; the same openssl key signs TLS CertificateVerify through a rustls [`SigningKey`]
//! and ServerHello's session key.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use muxd_smp::cert::{self, KeyHash, SignatureAlgorithm};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509Builder, X509Name, X509NameBuilder};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{
    CipherSuite, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::TransportError;
use crate::block::BlockStream;
use crate::tls::crypto_provider;
use crate::websocket;

/// The ALPN list `smp-server` offers, in its order.
pub const SERVER_ALPN: [&[u8]; 3] = [b"smp/1", b"h2", b"http/1.1"];

/// A server's certificate chain `[leaf, identity CA]` and the leaf's private key.
#[derive(Clone)]
pub struct ServerIdentity {
    chain: Vec<Vec<u8>>,
    leaf_key: PKey<Private>,
    algorithm: SignatureAlgorithm,
    key_hash: KeyHash,
}

impl ServerIdentity {
    /// Generates a fresh identity valid from an hour ago for ten years.
    pub fn generate(algorithm: SignatureAlgorithm) -> Result<Self, TransportError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self::generate_valid(algorithm, now - 3600, now + 10 * 365 * 86400)
    }

    /// Generates a fresh identity whose two certificates are valid between the given unix
    /// times (tests use this to make expired or not-yet-valid servers).
    pub fn generate_valid(
        algorithm: SignatureAlgorithm,
        not_before: i64,
        not_after: i64,
    ) -> Result<Self, TransportError> {
        let ca_key = generate_key(algorithm)?;
        let leaf_key = generate_key(algorithm)?;
        let ca_name = name("SMP server CA", Some("muxd"))?;
        let ca = build_cert(CertSpec {
            subject: &ca_name,
            issuer: &ca_name,
            subject_key: &ca_key,
            issuer_key: &ca_key,
            issuer_cert: None,
            is_ca: true,
            not_before,
            not_after,
        })?;
        let leaf = build_cert(CertSpec {
            subject: &name("localhost", None)?,
            issuer: &ca_name,
            subject_key: &leaf_key,
            issuer_key: &ca_key,
            issuer_cert: Some(&ca),
            is_ca: false,
            not_before,
            not_after,
        })?;
        let chain = vec![leaf.to_der()?, ca.to_der()?];
        Ok(Self::assemble(chain, leaf_key, algorithm))
    }

    /// Loads an identity from PEM: the certificates leaf first, then the leaf's PKCS#8 key
    /// (the format [`ServerIdentity::to_pem`] writes).
    pub fn from_pem(pem: &str) -> Result<Self, TransportError> {
        let certs = X509::stack_from_pem(pem.as_bytes())?;
        let leaf_key = PKey::private_key_from_pem(pem.as_bytes())?;
        let algorithm = match leaf_key.id() {
            openssl::pkey::Id::ED25519 => SignatureAlgorithm::Ed25519,
            openssl::pkey::Id::ED448 => SignatureAlgorithm::Ed448,
            _ => {
                return Err(TransportError::Certificate(
                    "leaf key is not Ed25519/Ed448".into(),
                ));
            }
        };
        if !(cert::MIN_CHAIN_LEN..=cert::MAX_CHAIN_LEN).contains(&certs.len()) {
            return Err(TransportError::Certificate(format!(
                "{} certificates, 2 to 4 expected",
                certs.len()
            )));
        }
        let leaf_pub = certs[0].public_key()?;
        if !leaf_pub.public_eq(&leaf_key) {
            return Err(TransportError::Certificate(
                "private key does not match the leaf certificate".into(),
            ));
        }
        let chain = certs
            .iter()
            .map(|c| c.to_der())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::assemble(chain, leaf_key, algorithm))
    }

    /// Writes the chain and the leaf's private key (PKCS#8) as PEM. Keep it secret.
    pub fn to_pem(&self) -> Result<String, TransportError> {
        let mut out = Vec::new();
        for der in &self.chain {
            out.extend_from_slice(&X509::from_der(der)?.to_pem()?);
        }
        out.extend_from_slice(&self.leaf_key.private_key_to_pem_pkcs8()?);
        String::from_utf8(out).map_err(|e| TransportError::Certificate(e.to_string()))
    }

    fn assemble(
        chain: Vec<Vec<u8>>,
        leaf_key: PKey<Private>,
        algorithm: SignatureAlgorithm,
    ) -> Self {
        let key_hash = cert::key_hash(&chain[1]);
        Self {
            chain,
            leaf_key,
            algorithm,
            key_hash,
        }
    }

    /// The keyHash clients put in this server's address.
    pub fn key_hash(&self) -> KeyHash {
        self.key_hash
    }

    /// The signature algorithm of the certificates and the leaf key.
    pub fn algorithm(&self) -> SignatureAlgorithm {
        self.algorithm
    }

    /// The DER chain, leaf first, as sent in TLS and repeated in ServerHello.
    pub fn chain_der(&self) -> Vec<&[u8]> {
        self.chain.iter().map(Vec::as_slice).collect()
    }

    /// Signs the server's per-connection X25519 session key for ServerHello: returns the DER
    /// `SignedExact PubKey` of §2.6 over `SEQUENCE { spki }`, signed by the leaf key.
    pub fn sign_session_key(&self, x25519_spki: &[u8]) -> Result<Vec<u8>, TransportError> {
        let object = cert::signed_key_object(x25519_spki);
        let signature = openssl::sign::Signer::new_without_digest(&self.leaf_key)?
            .sign_oneshot_to_vec(&object)?;
        Ok(cert::encode_signed_key(&object, self.algorithm, &signature))
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("algorithm", &self.algorithm)
            .field("key_hash", &self.key_hash)
            .finish_non_exhaustive()
    }
}

/// How the server side of TLS behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Ask clients for an (optional) certificate, as `smp-server` does by default.
    pub request_client_cert: bool,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            request_client_cert: true,
            alpn: SERVER_ALPN.iter().map(|p| p.to_vec()).collect(),
        }
    }
}

/// Accepts TLS connections with one [`ServerIdentity`].
#[derive(Clone)]
pub struct Acceptor {
    acceptor: TlsAcceptor,
    resolver: Arc<RecordingResolver>,
}

impl Acceptor {
    /// Builds the rustls server config: TLS 1.3, ChaCha20-Poly1305 only, no tickets.
    pub fn new(identity: &ServerIdentity, opts: &ServerOptions) -> Result<Self, TransportError> {
        let resolver = Arc::new(RecordingResolver::new(identity));
        let verifier: Arc<dyn ClientCertVerifier> = Arc::new(NoClientCerts {
            offer: opts.request_client_cert,
        });
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = opts.alpn.clone();
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
        })
    }

    /// Runs the TLS handshake on an accepted socket.
    pub async fn accept(&self, tcp: TcpStream) -> Result<AcceptedTls, TransportError> {
        let stream = self
            .acceptor
            .accept(tcp)
            .await
            .map_err(TransportError::Handshake)?;
        Ok(AcceptedTls { stream })
    }

    /// How many ClientHellos this acceptor has seen, and how many of them carried SNI.
    pub fn client_hellos(&self) -> (u64, u64) {
        (
            self.resolver.hellos.load(Ordering::Relaxed),
            self.resolver.with_sni.load(Ordering::Relaxed),
        )
    }
}

impl fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("resolver", &self.resolver)
            .finish_non_exhaustive()
    }
}

/// A server-side TLS connection after the handshake.
#[derive(Debug)]
pub struct AcceptedTls {
    stream: TlsStream<TcpStream>,
}

impl AcceptedTls {
    /// The SNI the client sent (SMP clients send none).
    pub fn sni(&self) -> Option<&str> {
        self.stream.get_ref().1.server_name()
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.stream.get_ref().1.alpn_protocol()
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        self.stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite())
    }

    /// Whether the client presented a certificate.
    pub fn client_sent_certificate(&self) -> bool {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty())
    }

    /// Carries blocks directly over TLS.
    pub fn into_blocks(self) -> BlockStream<TlsStream<TcpStream>> {
        let alpn = self.alpn().map(<[u8]>::to_vec);
        BlockStream::tls(self.stream, alpn)
    }

    /// Accepts a WebSocket upgrade inside the TLS session and carries blocks over it.
    pub async fn accept_websocket(
        self,
    ) -> Result<BlockStream<TlsStream<TcpStream>>, TransportError> {
        let alpn = self.alpn().map(<[u8]>::to_vec);
        let ws = websocket::server_accept(self.stream).await?;
        Ok(BlockStream::websocket(ws, alpn))
    }

    /// The raw TLS stream.
    pub fn into_inner(self) -> TlsStream<TcpStream> {
        self.stream
    }
}

/// Hands out the one certified key and counts ClientHellos with SNI, so tests and the dev
/// relay's logs can show that clients send none.
#[derive(Debug)]
struct RecordingResolver {
    key: Arc<CertifiedKey>,
    hellos: AtomicU64,
    with_sni: AtomicU64,
}

impl RecordingResolver {
    fn new(identity: &ServerIdentity) -> Self {
        let chain = identity
            .chain
            .iter()
            .map(|der| CertificateDer::from(der.clone()))
            .collect();
        let key = Arc::new(OpensslSigningKey {
            key: identity.leaf_key.clone(),
            algorithm: identity.algorithm,
        });
        Self {
            key: Arc::new(CertifiedKey::new(chain, key)),
            hellos: AtomicU64::new(0),
            with_sni: AtomicU64::new(0),
        }
    }
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.hellos.fetch_add(1, Ordering::Relaxed);
        if let Some(sni) = client_hello.server_name() {
            self.with_sni.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sni, "ClientHello carried SNI");
        }
        Some(self.key.clone())
    }
}

/// A rustls signing key backed by openssl, so that Ed448 works (ring has no Ed448).
struct OpensslSigningKey {
    key: PKey<Private>,
    algorithm: SignatureAlgorithm,
}

impl OpensslSigningKey {
    fn scheme(&self) -> SignatureScheme {
        match self.algorithm {
            SignatureAlgorithm::Ed448 => SignatureScheme::ED448,
            _ => SignatureScheme::ED25519,
        }
    }
}

impl fmt::Debug for OpensslSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpensslSigningKey({})", self.algorithm)
    }
}

impl SigningKey for OpensslSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(OpensslSigner {
                key: self.key.clone(),
                scheme,
            }) as Box<dyn Signer>
        })
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.algorithm {
            SignatureAlgorithm::Ed448 => rustls::SignatureAlgorithm::ED448,
            _ => rustls::SignatureAlgorithm::ED25519,
        }
    }
}

struct OpensslSigner {
    key: PKey<Private>,
    scheme: SignatureScheme,
}

impl fmt::Debug for OpensslSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpensslSigner({:?})", self.scheme)
    }
}

impl Signer for OpensslSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        openssl::sign::Signer::new_without_digest(&self.key)
            .and_then(|mut s| s.sign_oneshot_to_vec(message))
            .map_err(|e| rustls::Error::General(format!("openssl signing: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Requests a client certificate (optionally) but accepts none: muxd's servers have no
/// service clients, and the point is to exercise the client's empty answer.
#[derive(Debug)]
struct NoClientCerts {
    offer: bool,
}

impl ClientCertVerifier for NoClientCerts {
    fn offer_client_auth(&self) -> bool {
        self.offer
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "client certificates are not supported".into(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "client certificates are not supported".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "client certificates are not supported".into(),
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519, SignatureScheme::ED448]
    }
}

fn generate_key(algorithm: SignatureAlgorithm) -> Result<PKey<Private>, TransportError> {
    Ok(match algorithm {
        SignatureAlgorithm::Ed448 => PKey::generate_ed448()?,
        _ => PKey::generate_ed25519()?,
    })
}

fn name(common_name: &str, org: Option<&str>) -> Result<X509Name, TransportError> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_text("CN", common_name)?;
    if let Some(org) = org {
        b.append_entry_by_text("O", org)?;
    }
    Ok(b.build())
}

struct CertSpec<'a> {
    subject: &'a X509Name,
    issuer: &'a X509Name,
    subject_key: &'a PKey<Private>,
    issuer_key: &'a PKey<Private>,
    issuer_cert: Option<&'a X509>,
    is_ca: bool,
    not_before: i64,
    not_after: i64,
}

fn build_cert(spec: CertSpec<'_>) -> Result<X509, TransportError> {
    let mut b = X509Builder::new()?;
    b.set_version(2)?; // X.509 v3
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(spec.subject)?;
    b.set_issuer_name(spec.issuer)?;
    b.set_pubkey(spec.subject_key)?;
    let not_before = Asn1Time::from_unix(spec.not_before as _)?;
    let not_after = Asn1Time::from_unix(spec.not_after as _)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    if spec.is_ca {
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
    } else {
        b.append_extension(BasicConstraints::new().build()?)?;
        b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(spec.issuer_cert.map(|c| &**c), None))?;
    b.append_extension(ski)?;
    // EdDSA signs the message itself: openssl wants the null digest here.
    b.sign(spec.issuer_key, MessageDigest::null())?;
    Ok(b.build())
}
