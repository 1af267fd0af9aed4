//! TLS 1.3 for TCP connections: libp2p's TLS handshake (`/tls/1.0.0`), asking for AES-GCM first.
//!
//! The handshake is the one the libp2p TLS spec and `libp2p-tls` define, so any libp2p peer
//! speaks it: each side presents one self-signed certificate whose libp2p extension carries the
//! node's identity key and its signature over the certificate's key; ALPN is `libp2p`; no SNI.
//! The checks of the peer's certificate are those of the spec, made with `libp2p-tls`'s own
//! certificate parser.
//!
//! What differs is the order of the cipher suites a dialing node offers. `libp2p-tls` offers
//! ChaCha20-Poly1305 first; this offers AES-GCM first on a CPU that has AES instructions, where
//! it costs a fraction of ChaCha20's CPU per byte (measured in `tests/bench/RESULTS.md`, "TLS with AES-GCM on
//! TCP"). The listening side takes the
//! dialer's order, as TLS 1.3 servers do by default, so a dialer without AES instructions still
//! gets ChaCha20.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::PeerId;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedCipherSuite,
};

/// The protocol name of libp2p's TLS handshake.
const PROTOCOL: &str = "/tls/1.0.0";
/// The ALPN token libp2p's TLS handshake requires.
const ALPN: &[u8] = b"libp2p";
/// The signature schemes a peer's certificate key may sign the handshake with (those
/// `libp2p-tls` verifies, most preferred first).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// Why a TLS upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The node's certificate could not be made.
    #[error("making the node's TLS certificate")]
    Certificate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The handshake failed (the peer's certificate was refused, or the connection broke).
    #[error("TLS handshake")]
    Handshake(#[source] std::io::Error),
    /// The peer's certificate is not a valid libp2p certificate.
    #[error("the peer's TLS certificate")]
    PeerCertificate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The handshake completed without exactly one certificate from the peer.
    #[error("the peer presented {0} certificates, not one")]
    CertificateCount(usize),
}

/// The TLS security upgrade for libp2p connections (see the module docs).
#[derive(Clone)]
pub struct Config {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Config {
    /// A config presenting a fresh certificate for `keypair`, with the cipher suites in the
    /// order this CPU runs fastest.
    pub fn new(keypair: &Keypair) -> Result<Config, TlsError> {
        Config::with_suites(keypair, preferred_suites(has_aes_instructions()))
    }

    fn with_suites(
        keypair: &Keypair,
        suites: Vec<SupportedCipherSuite>,
    ) -> Result<Config, TlsError> {
        fn setup(e: impl std::error::Error + Send + Sync + 'static) -> TlsError {
            TlsError::Certificate(Box::new(e))
        }
        let (cert, key) = certificate::generate(keypair).map_err(setup)?;
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        // Not `with_single_cert`: its check of the certificate refuses the critical libp2p
        // extension, which is the point of the certificate.
        let signer = provider.key_provider.load_private_key(key).map_err(setup)?;
        let mine = Arc::new(SingleCertAndKey::from(CertifiedKey::new(
            vec![cert],
            signer,
        )));
        let verifier = Arc::new(PeerCertificate);
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(mine.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(setup)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(mine);
        server.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Config {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// Whether this CPU has the instructions that make AES-GCM fast.
fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The TLS 1.3 suites in the order to offer them: AES-GCM first where the CPU accelerates it,
/// ChaCha20-Poly1305 first where it does not.
fn preferred_suites(aes: bool) -> Vec<SupportedCipherSuite> {
    if aes {
        vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_id(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The spec: no Server Name Indication; an unspecified address sends none.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_id(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The peer id in the one certificate the peer presented (already verified in the handshake).
fn peer_id(state: &CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| TlsError::PeerCertificate(Box::new(e))),
        other => Err(TlsError::CertificateCount(other.map_or(0, <[_]>::len))),
    }
}

/// The spec's checks of a peer's certificate, on either side of the handshake: exactly one,
/// self-signed, with a libp2p extension whose signature by the identity key is valid; and the
/// handshake signed by the certificate's key. Which peer it must be is the swarm's check (the
/// dialed address's `/p2p/` id against the id the upgrade returns).
#[derive(Debug)]
struct PeerCertificate;

impl PeerCertificate {
    fn check_chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity)
            .map(|_| ())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))
    }

    fn check_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let bad = |_| rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        certificate::parse(cert)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(bad)?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn no_tls12() -> rustls::Error {
        rustls::Error::General("TLS 1.2 is not offered".into())
    }
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        PeerCertificate::check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(PeerCertificate::no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        PeerCertificate::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for PeerCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        PeerCertificate::check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(PeerCertificate::no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        PeerCertificate::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    /// Two ends of a loopback TCP connection.
    async fn socket_pair() -> (Compat<tokio::net::TcpStream>, Compat<tokio::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (dialed.unwrap().compat(), accepted.unwrap().0.compat())
    }

    /// Runs a handshake between a dialer and a listener; returns the id each learned of the
    /// other and the suite they agreed on, after checking bytes cross both ways.
    async fn handshake<D, L>(dialer: D, listener: L) -> (PeerId, PeerId, &'static str)
    where
        D: OutboundConnectionUpgrade<
                Compat<tokio::net::TcpStream>,
                Info = &'static str,
                Output = (PeerId, TlsStream<Compat<tokio::net::TcpStream>>),
            >,
        L: InboundConnectionUpgrade<
                Compat<tokio::net::TcpStream>,
                Info = &'static str,
                Output = (PeerId, TlsStream<Compat<tokio::net::TcpStream>>),
            >,
        D::Error: std::fmt::Debug,
        L::Error: std::fmt::Debug,
    {
        let (a, b) = socket_pair().await;
        let (out, inb) = tokio::join!(
            dialer.upgrade_outbound(a, PROTOCOL),
            listener.upgrade_inbound(b, PROTOCOL)
        );
        let ((listener_id, mut a), (dialer_id, mut b)) = (out.unwrap(), inb.unwrap());
        let suite = a.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        a.write_all(b"ping").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").await.unwrap();
        b.flush().await.unwrap();
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        let name = match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => "aes128",
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => "aes256",
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "chacha20",
            other => panic!("unexpected suite {other:?}"),
        };
        (listener_id, dialer_id, name)
    }

    #[tokio::test]
    async fn both_sides_learn_the_other_and_agree_on_the_dialers_first_suite() {
        let (d, l) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        for (aes, want) in [(true, "aes128"), (false, "chacha20")] {
            let dialer = Config::with_suites(&d, preferred_suites(aes)).unwrap();
            // The listener's own order is the other one: the dialer's wins.
            let listener = Config::with_suites(&l, preferred_suites(!aes)).unwrap();
            let (lid, did, suite) = handshake(dialer, listener).await;
            assert_eq!(lid, l.public().to_peer_id());
            assert_eq!(did, d.public().to_peer_id());
            assert_eq!(suite, want);
        }
    }

    #[tokio::test]
    async fn speaks_the_libp2p_tls_handshake_both_ways() {
        let (ours, theirs) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let stock = libp2p::tls::Config::new(&theirs).unwrap();
        let mine = Config::with_suites(&ours, preferred_suites(true)).unwrap();
        let (lid, did, suite) = handshake(mine.clone(), stock.clone()).await;
        assert_eq!(
            (lid, did),
            (theirs.public().to_peer_id(), ours.public().to_peer_id())
        );
        assert_eq!(suite, "aes128", "a stock listener takes our order");
        let (lid, did, suite) = handshake(stock, mine).await;
        assert_eq!(
            (lid, did),
            (ours.public().to_peer_id(), theirs.public().to_peer_id())
        );
        assert_eq!(suite, "chacha20", "we take a stock dialer's order");
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_an_error_not_a_panic() {
        let config = Config::new(&Keypair::generate_ed25519()).unwrap();
        for junk in [&b""[..], b"\x16\x03\x01\x00\x05hello", &[0xff; 4096]] {
            let (mut a, b) = socket_pair().await;
            a.write_all(junk).await.unwrap();
            a.close().await.unwrap();
            let inbound = config.clone().upgrade_inbound(b, PROTOCOL).await;
            assert!(matches!(inbound, Err(TlsError::Handshake(_))), "{junk:?}");
        }
        // And a listener that answers garbage fails the dialer.
        let (a, mut b) = socket_pair().await;
        let answer = async {
            let mut hello = [0u8; 5];
            b.read_exact(&mut hello).await.unwrap();
            b.write_all(&[0x15; 64]).await.unwrap();
            b.close().await.unwrap();
        };
        let (outbound, ()) = tokio::join!(config.upgrade_outbound(a, PROTOCOL), answer);
        assert!(matches!(outbound, Err(TlsError::Handshake(_))));
    }
}
