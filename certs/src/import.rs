//! Installing a CA-signed node certificate (`impmesh cert import`), after checking that
//! it can serve this node: the key matches, the chain links up, it is valid now, and
//! its SANs cover every name the node answers to.

use std::path::Path;

use rcgen::PublicKeyData as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

use crate::{CERT_FILE, CertError, KEY_FILE, NodeIdentity};

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("no certificate found in the PEM input")]
    NoCertificate,
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("the certificate is not valid now (valid from {not_before} until {not_after})")]
    NotValidNow {
        not_before: String,
        not_after: String,
    },
    #[error("the chain is broken: certificate {0} is not signed by the next one")]
    ChainBroken(usize),
    #[error("the certificate's SANs do not cover {0:?}")]
    NamesNotCovered(Vec<String>),
    #[error("cannot parse a certificate: {0}")]
    Parse(String),
    #[error("cannot read the PKCS#12 archive (wrong password or damaged file): {0}")]
    Pkcs12(String),
    #[error("the PKCS#12 archive holds no private key with its certificate")]
    Pkcs12NoKeyChain,
}

impl NodeIdentity {
    /// Checks a new certificate (PEM, optionally followed by its chain) and, when it
    /// passes, installs it in `dir` and returns the new identity. Without `key_pem` the
    /// node's current key is kept (the CSR flow). Nothing is written when a check fails.
    pub fn import(
        &self,
        dir: &Path,
        cert_pem: &[u8],
        key_pem: Option<&[u8]>,
        chain_pem: Option<&[u8]>,
        required_names: &[String],
    ) -> Result<NodeIdentity, CertError> {
        let mut chain = parse_pem_certs(cert_pem)?;
        if let Some(extra) = chain_pem {
            chain.extend(parse_pem_certs(extra)?);
        }
        if chain.is_empty() {
            return Err(ImportError::NoCertificate.into());
        }
        let key = match key_pem {
            Some(pem) => PrivateKeyDer::from_pem_slice(pem).map_err(|_| CertError::Pem {
                path: "key input".into(),
                what: "private key",
            })?,
            None => self.key.clone_key(),
        };
        self.install_checked(dir, &chain, &key, key_pem.is_some(), required_names)
    }

    /// Like [`Self::import`], for a PKCS#12 archive holding the key and its chain
    /// (`openssl pkcs12 -export`, a Java/Tomcat keystore). Refused when the archive
    /// does not decrypt with `password` or holds no key with a certificate.
    pub fn import_pkcs12(
        &self,
        dir: &Path,
        archive: &[u8],
        password: &str,
        required_names: &[String],
    ) -> Result<NodeIdentity, CertError> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            archive,
            password,
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|e| ImportError::Pkcs12(e.to_string()))?;
        let (_, entry) = store
            .private_key_chain()
            .ok_or(ImportError::Pkcs12NoKeyChain)?;
        let chain: Vec<CertificateDer<'static>> = entry
            .certs()
            .iter()
            .map(|c| CertificateDer::from(c.as_der().to_vec()))
            .collect();
        if chain.is_empty() {
            return Err(ImportError::Pkcs12NoKeyChain.into());
        }
        let key = PrivateKeyDer::Pkcs8(entry.key().as_der().to_vec().into());
        self.install_checked(dir, &chain, &key, true, required_names)
    }

    fn install_checked(
        &self,
        dir: &Path,
        chain: &[CertificateDer<'static>],
        key: &PrivateKeyDer<'_>,
        new_key: bool,
        required_names: &[String],
    ) -> Result<NodeIdentity, CertError> {
        check(chain, key, required_names)?;
        let mut cert_text = String::new();
        for cert in chain {
            cert_text.push_str(&crate::pem_encode("CERTIFICATE", cert.as_ref()));
        }
        let key_text = new_key.then(|| pem_key(key));
        crate::install(dir, &cert_text, key_text.as_deref())?;
        NodeIdentity::load(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
    }
}

fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ImportError::Parse(e.to_string()).into())
}

/// The checks of [`NodeIdentity::import`] on an identity already loaded (a
/// certificate kept in files the admin manages, such as a client-facing one).
pub fn check_identity(identity: &NodeIdentity, required_names: &[String]) -> Result<(), CertError> {
    check(&identity.chain, &identity.key, required_names)
}

/// The checks of [`NodeIdentity::import`], without touching any file.
pub fn check(
    chain: &[CertificateDer<'_>],
    key: &PrivateKeyDer<'_>,
    required_names: &[String],
) -> Result<(), CertError> {
    let parsed = chain
        .iter()
        .map(|c| {
            parse_x509_certificate(c.as_ref())
                .map(|(_, cert)| cert)
                .map_err(|e| CertError::from(ImportError::Parse(e.to_string())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = parsed.first().ok_or(ImportError::NoCertificate)?;
    let key_pair = rcgen::KeyPair::try_from(key)?;
    if key_pair.der_bytes() != leaf.public_key().subject_public_key.data.as_ref() {
        return Err(ImportError::KeyMismatch.into());
    }
    if !leaf.validity().is_valid() {
        return Err(ImportError::NotValidNow {
            not_before: leaf.validity().not_before.to_string(),
            not_after: leaf.validity().not_after.to_string(),
        }
        .into());
    }
    for (i, pair) in parsed.windows(2).enumerate() {
        if pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .is_err()
        {
            return Err(ImportError::ChainBroken(i).into());
        }
    }
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<String> = required_names
        .iter()
        .filter(|name| !sans.iter().any(|san| san_matches(san, name)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(ImportError::NamesNotCovered(missing).into());
    }
    Ok(())
}

/// RFC 6125 matching of a DNS SAN against a name: exact, or a wildcard standing for
/// exactly one leftmost label.
fn san_matches(san: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match san.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => san == name,
    }
}

fn pem_key(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    crate::pem_encode(label, key.secret_der())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "example.com";
    const NODE: &str = "node1.cluster-a.example.com";

    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        cert: rcgen::Certificate,
    }

    fn ca(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { params, key, cert }
    }

    /// A certificate for `public_key` with `sans`, signed by `ca`.
    fn issue(
        ca: &Ca,
        public_key: &impl rcgen::PublicKeyData,
        sans: &[&str],
        expired: bool,
    ) -> String {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        params.signed_by(public_key, &issuer).unwrap().pem()
    }

    fn node() -> (tempfile::TempDir, NodeIdentity, rcgen::KeyPair) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let id = NodeIdentity::load_or_generate(dir.path(), &[DOMAIN.into(), NODE.into()]).unwrap();
        let key = rcgen::KeyPair::try_from(&id.key).unwrap();
        (dir, id, key)
    }

    fn names() -> Vec<String> {
        vec![DOMAIN.into(), NODE.into()]
    }

    #[test]
    fn a_ca_signed_certificate_for_the_node_key_is_installed() {
        let (dir, id, key) = node();
        let ca = ca("Test CA");
        let cert = issue(&ca, &key, &[DOMAIN, "*.cluster-a.example.com"], false);
        let new = id
            .import(
                dir.path(),
                cert.as_bytes(),
                None,
                Some(ca.cert.pem().as_bytes()),
                &names(),
            )
            .unwrap();
        assert_ne!(new.fingerprint(), id.fingerprint());
        assert_eq!(new.chain.len(), 2);
        new.server_config(&[]).unwrap();
        // What is on disk is what was checked.
        let reloaded = NodeIdentity::load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(reloaded.fingerprint(), new.fingerprint());
        assert!(!crate::describe(&reloaded.chain[0]).unwrap().self_signed);
    }

    #[test]
    fn a_new_key_can_come_with_the_certificate() {
        let (dir, id, _) = node();
        let ca = ca("Test CA");
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = issue(&ca, &other, &[DOMAIN, NODE], false);
        let new = id
            .import(
                dir.path(),
                cert.as_bytes(),
                Some(other.serialize_pem().as_bytes()),
                None,
                &names(),
            )
            .unwrap();
        new.server_config(&[]).unwrap();
    }

    /// A PKCS#12 archive made by `openssl pkcs12 -export`, as an admin would make one.
    fn openssl_p12(dir: &Path, key: &rcgen::KeyPair, cert: &str, chain: &str, pw: &str) -> Vec<u8> {
        std::fs::write(dir.join("in.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("in.crt"), cert).unwrap();
        std::fs::write(dir.join("ca.crt"), chain).unwrap();
        let status = std::process::Command::new("openssl")
            .args(["pkcs12", "-export", "-name", "tomcat", "-passout"])
            .arg(format!("pass:{pw}"))
            .arg("-inkey")
            .arg(dir.join("in.key"))
            .arg("-in")
            .arg(dir.join("in.crt"))
            .arg("-certfile")
            .arg(dir.join("ca.crt"))
            .arg("-out")
            .arg(dir.join("out.p12"))
            .status()
            .expect("the PKCS#12 test needs the openssl command");
        assert!(status.success());
        std::fs::read(dir.join("out.p12")).unwrap()
    }

    #[test]
    fn a_pkcs12_archive_from_openssl_is_installed() {
        let (dir, id, _) = node();
        let work = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = issue(&ca, &key, &[DOMAIN, NODE], false);
        let p12 = openssl_p12(work.path(), &key, &cert, &ca.cert.pem(), "changeit");

        let err = id
            .import_pkcs12(dir.path(), &p12, "wrong", &names())
            .unwrap_err();
        assert!(
            matches!(err, CertError::Import(ImportError::Pkcs12(_))),
            "{err}"
        );
        let unchanged = NodeIdentity::load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(unchanged.fingerprint(), id.fingerprint());

        let new = id
            .import_pkcs12(dir.path(), &p12, "changeit", &names())
            .unwrap();
        assert_eq!(new.chain.len(), 2);
        assert_eq!(new.chain[1].as_ref(), ca.cert.der().as_ref());
        let reloaded = NodeIdentity::load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(reloaded.fingerprint(), new.fingerprint());
        reloaded.server_config(&[]).unwrap();
        assert_eq!(
            rcgen::KeyPair::try_from(&reloaded.key).unwrap().der_bytes(),
            key.der_bytes()
        );
    }

    #[test]
    fn a_pkcs12_archive_is_checked_like_pem() {
        let (dir, id, _) = node();
        let work = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = issue(&ca, &key, &[DOMAIN], false);
        let p12 = openssl_p12(work.path(), &key, &cert, &ca.cert.pem(), "pw");
        let err = id
            .import_pkcs12(dir.path(), &p12, "pw", &names())
            .unwrap_err();
        assert!(
            matches!(&err, CertError::Import(ImportError::NamesNotCovered(n)) if *n == [NODE]),
            "{err}"
        );
        assert!(matches!(
            id.import_pkcs12(dir.path(), b"not an archive", "pw", &names()),
            Err(CertError::Import(ImportError::Pkcs12(_)))
        ));
    }

    #[test]
    fn bad_certificates_are_refused_and_nothing_is_written() {
        let (dir, id, key) = node();
        let ca = ca("Test CA");
        let stranger = rcgen::KeyPair::generate().unwrap();
        let cases: Vec<(&str, String, Option<String>, ImportError)> = vec![
            (
                "key mismatch",
                issue(&ca, &stranger, &[DOMAIN, NODE], false),
                Some(ca.cert.pem()),
                ImportError::KeyMismatch,
            ),
            (
                "names not covered",
                issue(&ca, &key, &[DOMAIN], false),
                Some(ca.cert.pem()),
                ImportError::NamesNotCovered(vec![NODE.into()]),
            ),
            (
                "a wildcard covers one label only",
                issue(&ca, &key, &[DOMAIN, "*.example.com"], false),
                Some(ca.cert.pem()),
                ImportError::NamesNotCovered(vec![NODE.into()]),
            ),
            (
                "broken chain",
                issue(&ca, &key, &[DOMAIN, NODE], false),
                Some(self::ca("Another CA").cert.pem()),
                ImportError::ChainBroken(0),
            ),
        ];
        for (what, cert, chain, expected) in cases {
            let err = id
                .import(
                    dir.path(),
                    cert.as_bytes(),
                    None,
                    chain.as_deref().map(str::as_bytes),
                    &names(),
                )
                .unwrap_err();
            assert!(
                matches!(&err, CertError::Import(e) if *e == expected),
                "{what}: {err}"
            );
        }
        let expired = issue(&ca, &key, &[DOMAIN, NODE], true);
        let err = id
            .import(dir.path(), expired.as_bytes(), None, None, &names())
            .unwrap_err();
        assert!(
            matches!(err, CertError::Import(ImportError::NotValidNow { .. })),
            "{err}"
        );
        assert!(matches!(
            id.import(dir.path(), b"nothing", None, None, &names()),
            Err(CertError::Import(ImportError::NoCertificate))
        ));
        let unchanged = NodeIdentity::load_or_generate(dir.path(), &names()).unwrap();
        assert_eq!(unchanged.fingerprint(), id.fingerprint());
    }
}
