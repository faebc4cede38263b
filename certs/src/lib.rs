//! Node identity and TLS configuration.
//!
//! Each node has one identity certificate for all its services (the seeds' advice: one
//! certificate per node, its SANs naming the node, the cluster and the XMPP domain). At
//! first start a key pair and a self-signed certificate are generated into the data
//! directory; later starts load them. Importing CA-signed certificates, CSRs and the trust
//! store come with the HTTPS/certificates work.

#![forbid(unsafe_code)]

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
}

/// File names of the identity inside the certificate directory.
const CERT_FILE: &str = "node.crt";
const KEY_FILE: &str = "node.key";

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
        let (cert_pem, key_pem) = generate_self_signed(names)?;
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_private(&key_path, key_pem.as_bytes())?;
        std::fs::write(&cert_path, cert_pem.as_bytes()).map_err(|source| CertError::Io {
            path: cert_path.clone(),
            source,
        })?;
        tracing::info!(path = %cert_path.display(), ?names, "generated a self-signed node certificate");
        Self::load(&cert_path, &key_path)
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
        Ok(Arc::new(config))
    }
}

/// Generates a self-signed certificate and key (ECDSA P-256) as PEM.
pub fn generate_self_signed(names: &[String]) -> Result<(String, String), CertError> {
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    if let Some(cn) = names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn.clone());
    }
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    sha2::Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
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

    #[test]
    fn damaged_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), "not pem").unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "not pem").unwrap();
        let err = NodeIdentity::load_or_generate(dir.path(), &["x".into()]).unwrap_err();
        assert!(err.to_string().contains("node.crt"), "{err}");
    }
}
