//! The CLI's way to a running node: the admin API on the node's admin listener
//! (`[listen] admin`), over a
//! TLS connection pinned to the node's own certificate, with the admin token from the
//! data directory. When nothing listens there, the CLI works on the files and the
//! store directly.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use impmesh_axl::client::{AxlClient, ClientError, ServerTrust};
use impmesh_certs::{PeerVerifier, TrustAnchors};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::Config;
use crate::files::ADMIN_TOKEN_FILE;

/// A client of the running node's admin API, or `None` when the node does not run.
pub async fn connect(config: &Config) -> anyhow::Result<Option<AxlClient>> {
    let token_path = config.data_dir.join(ADMIN_TOKEN_FILE);
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) => t.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", token_path.display()),
    };
    let cert_path = config.data_dir.join("certs").join(impmesh_certs::CERT_FILE);
    let leaf = match std::fs::read(&cert_path) {
        Ok(pem) => CertificateDer::from_pem_slice(&pem)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", cert_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", cert_path.display()),
    };
    let anchors = TrustAnchors {
        cas: vec![],
        pinned: HashSet::from([impmesh_certs::fingerprint(&leaf)]),
    };
    let verifier = PeerVerifier::new(&anchors)?;
    let mut addr = config.listen.admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let name = config.node_name();
    match AxlClient::connect(&addr.to_string(), &name, ServerTrust::Verified(verifier)).await {
        Ok(mut client) => {
            client.use_bearer(&token)?;
            Ok(Some(client))
        }
        Err(ClientError::Connect(_, e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Ok(None)
        }
        Err(ClientError::Tls(_, e)) => anyhow::bail!(
            "something answers on {addr} but it is not this node (its certificate is not the \
             one in {}): {e}",
            cert_path.display()
        ),
        Err(e) => Err(e.into()),
    }
}
