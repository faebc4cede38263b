//! Node identity and TLS configuration.
//!
//! Each node has one identity certificate for all its services (the seeds' advice: one
//! certificate per node, its SANs naming the node, the cluster and the XMPP domain). At
//! first start a key pair and a self-signed certificate are generated into the data
//! directory; later starts load them. Importing CA-signed certificates, CSRs and the trust
//! store come with the HTTPS/certificates work.

#![forbid(unsafe_code)]

mod import;
mod verify;

pub use import::{ImportError, check_identity};
pub use verify::{
    FirstContactVerifier, LinkClientVerifier, PeerVerifier, TrustAnchors, within_validity,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;

/// Errors of the certificate layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration refused the identity: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot parse the certificate: {0}")]
    Parse(String),
    #[error("certificate refused: {0}")]
    Import(#[from] ImportError),
    #[error("{0:?} is not a host name (letters, digits and hyphens per label) or an IP address")]
    InvalidName(String),
}

/// How long a generated self-signed node certificate is valid: two years, after which
/// `impmesh cert regenerate` (or a CA-signed import) replaces it.
pub const SELF_SIGNED_VALIDITY: time::Duration = time::Duration::days(730);

/// File names of the identity inside the certificate directory.
/// The node certificate chain (PEM) in the identity directory.
pub const CERT_FILE: &str = "node.crt";
/// The node key (PEM, mode 0600) in the identity directory.
pub const KEY_FILE: &str = "node.key";

/// A node's certificate chain and private key.
#[derive(Debug)]
pub struct NodeIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeIdentity {
    /// Loads the identity from `dir`, or generates a self-signed one naming `names`
    /// (first name is the CN; all are DNS SANs) when none is there yet.
    pub fn load_or_generate(dir: &Path, names: &[String]) -> Result<NodeIdentity, CertError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        Self::regenerate(dir, names)
    }

    /// Replaces the identity in `dir` with a new key and a new self-signed certificate
    /// naming `names` (`impmesh cert regenerate`; also the first start).
    pub fn regenerate(dir: &Path, names: &[String]) -> Result<NodeIdentity, CertError> {
        let (cert_pem, key_pem) = generate_self_signed(names)?;
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_owned(),
            source,
        })?;
        install(dir, &cert_pem, Some(&key_pem))?;
        tracing::info!(dir = %dir.display(), ?names, "generated a self-signed node certificate");
        Self::load(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
    }

    /// Loads a PEM chain and key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<NodeIdentity, CertError> {
        let chain = CertificateDer::pem_file_iter(cert_path)
            .map_err(|_| CertError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
            })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CertError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
            })?;
        if chain.is_empty() {
            return Err(CertError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|_| CertError::Pem {
            path: key_path.to_owned(),
            what: "private key",
        })?;
        Ok(NodeIdentity { chain, key })
    }

    /// A PKCS#10 certificate signing request for this node's key (PEM), with `cn` as the
    /// subject's common name and `sans` as DNS names (or IP addresses), for a CA to sign.
    pub fn csr(&self, cn: &str, sans: &[String]) -> Result<String, CertError> {
        let key = rcgen::KeyPair::try_from(&self.key)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
                Err(_) if is_dns_name(san) => Ok(rcgen::SanType::DnsName(
                    san.clone().try_into().map_err(CertError::Generate)?,
                )),
                Err(_) => Err(CertError::InvalidName(san.clone())),
            })
            .collect::<Result<_, CertError>>()?;
        if !is_dns_name(cn) {
            return Err(CertError::InvalidName(cn.to_owned()));
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_owned());
        Ok(params.serialize_request(&key)?.pem()?)
    }

    /// SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// A rustls server configuration serving this identity (TLS 1.2 and 1.3, no client
    /// certificates), with `alpn` protocols if any.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, CertError> {
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // TLS 1.3 resumption by stateless tickets (the session rides in the ticket,
        // encrypted under a key this process rotates): a client may resume, and the
        // server keeps nothing per ticket. rustls' default, a cache of 256 sessions
        // fed two tickets by every handshake, kept long-lived entries spread over the
        // heap after a login storm and held its pages resident (docs/benchmarks.md).
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
        Ok(Arc::new(config))
    }
}

impl NodeIdentity {
    /// The HTTPS service's configuration: this identity, HTTP/1.1, and a client
    /// certificate asked for but not required. A peer node presents its own, which
    /// proves it holds that certificate's key (the handshake signature is checked):
    /// `exchangeCertificates` pins only a certificate proven that way. Admin tools and
    /// browsers send none.
    pub fn https_server_config(&self) -> Result<Arc<ServerConfig>, CertError> {
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(LinkClientVerifier::optional())
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// This identity as a TLS client certificate: the chain and a copy of the key.
    pub fn client_auth(
        &self,
    ) -> (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ) {
        (self.chain.clone(), self.key.clone_key())
    }

    /// The server side of router links: this identity, and a certificate required of
    /// the connecting node (checked against the trust store after the handshake).
    pub fn link_server_config(&self) -> Result<Arc<ServerConfig>, CertError> {
        let config = ServerConfig::builder()
            .with_client_cert_verifier(LinkClientVerifier::new())
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// The client side of a router link to a node that `verifier` trusts, presenting
    /// this identity.
    pub fn link_client_config(
        &self,
        verifier: Arc<PeerVerifier>,
    ) -> Result<Arc<rustls::ClientConfig>, CertError> {
        let config = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// What `impmesh cert show` tells about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Subject alternative names, as `DNS:name` or `IP:address`.
    pub sans: Vec<String>,
    /// Validity, as RFC 2822 dates (UTC).
    pub not_before: String,
    pub not_after: String,
    /// End of validity in seconds since the Unix epoch (for scripts and expiry checks).
    pub not_after_unix: i64,
    /// SHA-256 of the DER certificate, colon-separated hex.
    pub sha256: String,
    pub self_signed: bool,
}

/// Reads the facts of a DER certificate.
pub fn describe(cert: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let sans = parsed
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => format!("DNS:{d}"),
                    x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                        4 => format!("IP:{}", std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
                        16 => {
                            let mut b = [0u8; 16];
                            b.copy_from_slice(ip);
                            format!("IP:{}", std::net::Ipv6Addr::from(b))
                        }
                        _ => "IP:?".to_owned(),
                    },
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let time = |t: &x509_parser::time::ASN1Time| {
        t.to_rfc2822().unwrap_or_else(|_| t.timestamp().to_string())
    };
    let subject = parsed.subject().to_string();
    let issuer = parsed.issuer().to_string();
    // Same names are not enough (two certificates can share a subject): it is
    // self-signed when its own key verifies its signature.
    let self_signed = subject == issuer && parsed.verify_signature(None).is_ok();
    Ok(CertInfo {
        self_signed,
        subject,
        issuer,
        sans,
        not_before: time(&parsed.validity().not_before),
        not_after: time(&parsed.validity().not_after),
        not_after_unix: parsed.validity().not_after.timestamp(),
        sha256: fingerprint(cert),
    })
}

/// A host name for a certificate: dot-separated labels of letters, digits and hyphens
/// (RFC 1123), each 1–63 bytes and not starting or ending with a hyphen, 253 bytes at
/// most; a leading `*.` label is allowed (wildcard).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Generates a self-signed certificate and key (ECDSA P-256) as PEM.
pub fn generate_self_signed(names: &[String]) -> Result<(String, String), CertError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    // rcgen's default validity runs from 1975 to the year 4096: nothing would ever
    // expire or warn. A node certificate lives SELF_SIGNED_VALIDITY from now (an hour of
    // slack for clocks that run behind), like a CA-issued one would.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    if let Some(cn) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.clone());
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// PEM text (RFC 7468) of DER data under `label`, e.g. `CERTIFICATE`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    sha2::Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Replaces the identity files in `dir`, each atomically (written beside, then renamed),
/// the key first so that a crash never pairs a new certificate with an old key.
fn install(dir: &Path, cert_pem: &str, key_pem: Option<&str>) -> Result<(), CertError> {
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| CertError::Io {
            path: to.to_owned(),
            source,
        })
    };
    if let Some(key_pem) = key_pem {
        let tmp = dir.join(format!("{KEY_FILE}.new"));
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, key_pem.as_bytes())?;
        rename(&tmp, &dir.join(KEY_FILE))?;
    }
    let tmp = dir.join(format!("{CERT_FILE}.new"));
    std::fs::write(&tmp, cert_pem).map_err(|source| CertError::Io {
        path: tmp.clone(),
        source,
    })?;
    rename(&tmp, &dir.join(CERT_FILE))
}

/// Writes a secret file readable by its owner only.
fn write_private(path: &Path, data: &[u8]) -> Result<(), CertError> {
    use std::io::Write as _;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(data).map_err(io)
}

/// The RFC 9266 `tls-exporter` channel binding of a TLS 1.3 connection; `None` for
/// older versions, where it is not defined safely.
pub fn tls_exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Option<[u8; 32]> {
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return None;
    }
    let mut out = [0u8; 32];
    let ok = conn
        .export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
        .is_ok();
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads_the_same_identity() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "node1.example".to_owned()];
        let a = NodeIdentity::load_or_generate(dir.path(), &names).unwrap();
        let b = NodeIdentity::load_or_generate(dir.path(), &names).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 32 * 3 - 1);
        let (_, parsed) = x509_parser::parse_x509_certificate(a.chain[0].as_ref()).unwrap();
        let sans: Vec<String> = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, ["DNSName(localhost)", "DNSName(node1.example)"]);
        a.server_config(&[b"xmpp-client"]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key must not be readable by others");
        }
    }

    /// Client TLS resumes with stateless tickets: the server keeps no session cache
    /// that a login storm would fill with long-lived entries.
    #[test]
    fn client_tls_resumes_by_stateless_tickets() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let id = NodeIdentity::load_or_generate(dir.path(), &["localhost".to_owned()]).unwrap();
        let config = id.server_config(&[]).unwrap();
        assert!(
            config.ticketer.enabled(),
            "TLS 1.3 tickets carry the session"
        );
    }

    #[test]
    fn describe_and_csr_carry_the_names() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let names = vec![
            "example.com".to_owned(),
            "node1.cluster-a.example.com".to_owned(),
        ];
        let id = NodeIdentity::load_or_generate(dir.path(), &names).unwrap();
        let info = describe(&id.chain[0]).unwrap();
        assert_eq!(
            info.sans,
            ["DNS:example.com", "DNS:node1.cluster-a.example.com"]
        );
        assert!(info.subject.contains("CN=example.com"), "{}", info.subject);
        assert!(info.self_signed);
        assert_eq!(info.sha256, id.fingerprint());
        // Valid for about two years from now, not rcgen's default of 1975 to 4096.
        let years = (info.not_after_unix - time::OffsetDateTime::now_utc().unix_timestamp()) as f64
            / (365.25 * 86_400.0);
        assert!((1.9..2.1).contains(&years), "{years} years");

        let pem = id
            .csr(
                "node1.cluster-a.example.com",
                &[
                    "node1.cluster-a.example.com".into(),
                    "example.com".into(),
                    "192.0.2.7".into(),
                ],
            )
            .unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        // Parse it back: the CN, the SANs and the node's own public key.
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, csr) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(der.as_ref())
                .unwrap();
        csr.verify_signature().unwrap();
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.to_string(), "CN=node1.cluster-a.example.com");
        let mut sans = vec![];
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                sans.extend(san.general_names.iter().map(|n| n.to_string()));
            }
        }
        assert_eq!(
            sans,
            [
                "DNSName(node1.cluster-a.example.com)",
                "DNSName(example.com)",
                "IPAddress(c0:00:02:07)"
            ]
        );
        let (_, cert) = x509_parser::parse_x509_certificate(id.chain[0].as_ref()).unwrap();
        assert_eq!(
            info.subject_pki.subject_public_key.data,
            cert.public_key().subject_public_key.data,
            "the CSR is for the node's own key"
        );
        assert!(matches!(
            id.csr("x", &["not a name!".into()]),
            Err(CertError::InvalidName(_))
        ));
        assert!(matches!(
            id.csr("bad..cn", &[]),
            Err(CertError::InvalidName(_))
        ));
        assert!(is_dns_name("*.example.com") && is_dns_name("a-b.c1"));
        assert!(!is_dns_name("-a.com") && !is_dns_name("a.com.") && !is_dns_name(""));
    }

    #[test]
    fn damaged_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), "not pem").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "not pem").unwrap();
        let err = NodeIdentity::load_or_generate(dir.path(), &["x".into()]).unwrap_err();
        assert!(err.to_string().contains("node.crt"), "{err}");
    }
}
