//! Verifying a peer's certificate against the trust store: an exact pinned certificate
//! (a self-signed peer whose certificate was exchanged or imported), or a chain to a
//! trusted CA with the usual host-name check.

use std::collections::HashSet;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{CertError, fingerprint};

/// What a verifier trusts.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors {
    /// CA certificates: what they sign is trusted for the names it carries.
    pub cas: Vec<CertificateDer<'static>>,
    /// Fingerprints (SHA-256, colon hex) of certificates trusted exactly as they are.
    pub pinned: HashSet<String>,
}

/// A rustls verifier for a peer's server certificate: pinned first, then CAs.
#[derive(Debug)]
pub struct PeerVerifier {
    pinned: HashSet<String>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    pub fn new(anchors: &TrustAnchors) -> Result<Arc<PeerVerifier>, CertError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let webpki = if anchors.cas.is_empty() {
            None
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for ca in &anchors.cas {
                roots.add(ca.clone())?;
            }
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| CertError::Parse(e.to_string()))?,
            )
        };
        Ok(Arc::new(PeerVerifier {
            pinned: anchors.pinned.clone(),
            webpki,
            provider,
        }))
    }
}

/// Whether `cert` is valid at `now` (Unix seconds): what a pinned certificate must
/// still be, since pinning replaces the chain checks but not the dates.
pub fn within_validity(cert: &CertificateDer<'_>, now: i64) -> Result<(), CertificateError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| CertificateError::BadEncoding)?;
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYet);
    }
    if now > validity.not_after.timestamp() {
        return Err(CertificateError::Expired);
    }
    Ok(())
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pinned.contains(&fingerprint(end_entity)) {
            // Pinned: this exact certificate, as long as it is within its validity.
            within_validity(end_entity, now.as_secs() as i64)
                .map_err(rustls::Error::InvalidCertificate)?;
            return Ok(ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(webpki) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verifier of a first contact with a peer that is not trusted yet: any
/// certificate is accepted (the handshake signature is still checked), because what
/// authenticates the server is the channel-bound password exchange that follows; the
/// caller pins the certificate only after that exchange succeeds. Never use it to send
/// anything secret before then.
#[derive(Debug)]
pub struct FirstContactVerifier {
    /// Trusts nothing; used only for its handshake-signature checks.
    signatures: Arc<PeerVerifier>,
}

impl FirstContactVerifier {
    pub fn new() -> Arc<FirstContactVerifier> {
        let signatures = PeerVerifier::new(&TrustAnchors::default())
            .expect("a verifier without anchors cannot fail to build");
        Arc::new(FirstContactVerifier { signatures })
    }
}

impl ServerCertVerifier for FirstContactVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // A first contact needs the TLS 1.3 exporter; TLS 1.2 is not offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// The client-certificate verifier of router links: every link must present a
/// certificate and prove it holds its key (the handshake signature is checked here);
/// whether that certificate belongs to a peer is decided right after the handshake,
/// against the trust store, before anything is read from the link.
#[derive(Debug)]
pub struct LinkClientVerifier {
    signatures: Arc<PeerVerifier>,
    /// Whether a client without a certificate is refused (links) or let in (HTTPS).
    mandatory: bool,
}

impl LinkClientVerifier {
    /// A certificate is required (router links).
    pub fn new() -> Arc<LinkClientVerifier> {
        Self::with(true)
    }

    /// A certificate is asked for, not required (the HTTPS service).
    pub fn optional() -> Arc<LinkClientVerifier> {
        Self::with(false)
    }

    fn with(mandatory: bool) -> Arc<LinkClientVerifier> {
        let signatures = PeerVerifier::new(&TrustAnchors::default())
            .expect("a verifier without anchors cannot fail to build");
        Arc::new(LinkClientVerifier {
            signatures,
            mandatory,
        })
    }
}

impl rustls::server::danger::ClientCertVerifier for LinkClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeIdentity;

    /// A full TLS handshake in memory between `server` and a client using `verifier`.
    fn handshake(
        server: &NodeIdentity,
        verifier: Arc<PeerVerifier>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let server_config = server.server_config(&[]).unwrap();
        let client_config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from(name.to_owned()).unwrap(),
        )?;
        let mut srv = rustls::ServerConnection::new(server_config)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            srv.read_tls(&mut buf.as_slice()).unwrap();
            srv.process_new_packets()?;
            let mut buf = Vec::new();
            while srv.wants_write() {
                srv.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !srv.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish")
    }

    fn self_signed(name: &str) -> (tempfile::TempDir, NodeIdentity) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let id = NodeIdentity::load_or_generate(dir.path(), &[name.to_owned()]).unwrap();
        (dir, id)
    }

    #[test]
    fn a_pinned_self_signed_peer_is_accepted_and_an_unpinned_one_is_not() {
        let (_d, peer) = self_signed("cluster-b.example.com");
        let (_d2, impostor) = self_signed("cluster-b.example.com");
        let anchors = TrustAnchors {
            pinned: [peer.fingerprint()].into(),
            ..Default::default()
        };
        let verifier = PeerVerifier::new(&anchors).unwrap();
        handshake(&peer, verifier.clone(), "cluster-b.example.com").unwrap();
        // Same names, different certificate: refused before any application data.
        let err = handshake(&impostor, verifier, "cluster-b.example.com").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
            ),
            "{err}"
        );
    }

    #[test]
    fn a_ca_signed_peer_is_accepted_for_its_names_only() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let (dir, node) = self_signed("node1.cluster-b.example.com");
        let key = rcgen::KeyPair::try_from(&node.key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = rcgen::CertificateParams::new(vec!["node1.cluster-b.example.com".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let node = node
            .import(
                dir.path(),
                cert.pem().as_bytes(),
                None,
                Some(ca_cert.pem().as_bytes()),
                &["node1.cluster-b.example.com".to_owned()],
            )
            .unwrap();
        let anchors = TrustAnchors {
            cas: vec![ca_cert.der().clone()],
            ..Default::default()
        };
        let verifier = PeerVerifier::new(&anchors).unwrap();
        handshake(&node, verifier.clone(), "node1.cluster-b.example.com").unwrap();
        let err = handshake(&node, verifier, "node2.cluster-b.example.com").unwrap_err();
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
        // Without the CA: refused.
        let none = PeerVerifier::new(&TrustAnchors::default()).unwrap();
        assert!(handshake(&node, none, "node1.cluster-b.example.com").is_err());
    }
}
