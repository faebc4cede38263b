//! The trust store as admins and peers fill it (CA certificates, pinned peer
//! certificates), and the verifier inputs built from it.

use impmesh_certs::TrustAnchors;
use impmesh_store::{Store, TrustEntry, TrustKind};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Adds every certificate of a PEM file, as CAs or pinned for `peer`, with `source`
/// ("imported" by an admin, "exchanged" with a peer). Returns the entries added (a
/// certificate already trusted is skipped).
pub async fn add(
    store: &Store,
    pem: &[u8],
    kind: TrustKind,
    peer: Option<&str>,
    source: &str,
) -> anyhow::Result<Vec<TrustEntry>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate found in the file");
    }
    let mut added = vec![];
    for cert in certs {
        let info = impmesh_certs::describe(&cert)?;
        let entry = TrustEntry {
            fingerprint: info.sha256,
            kind,
            subject: info.subject,
            pem: impmesh_certs::pem_encode("CERTIFICATE", cert.as_ref()),
            source: source.into(),
            peer: peer.map(String::from),
            added_at: 0,
        };
        if store.add_trust(&entry).await? {
            added.push(entry);
        }
    }
    Ok(added)
}

/// What verifiers trust, from the store.
pub async fn anchors(store: &Store) -> anyhow::Result<TrustAnchors> {
    Ok(store.trust_anchors(None).await?)
}

/// What verifies one peer: its own pinned certificates and the trusted CAs (a
/// certificate pinned for another peer does not vouch for this one).
pub async fn anchors_for(store: &Store, peer: &str) -> anyhow::Result<TrustAnchors> {
    Ok(store.trust_anchors(Some(peer)).await?)
}

/// Pins the node certificates a peer cluster presented (each chain's first certificate,
/// whose fingerprint must match the one announced). Returns how many were new.
pub async fn pin_exchanged(
    store: &Store,
    cluster: &str,
    certificates: &[crate::soap::NodeCertificate],
) -> anyhow::Result<usize> {
    if !impmesh_certs::is_dns_name(cluster) {
        anyhow::bail!("{cluster:?} is not a cluster name");
    }
    let mut leaves = vec![];
    for c in certificates {
        let leaf = CertificateDer::pem_slice_iter(c.pem.as_bytes())
            .next()
            .ok_or_else(|| anyhow::anyhow!("no certificate for node {}", c.node))?
            .map_err(|e| anyhow::anyhow!("bad PEM for node {}: {e}", c.node))?;
        let fp = impmesh_certs::fingerprint(&leaf);
        if !fp.eq_ignore_ascii_case(&c.fingerprint) {
            anyhow::bail!(
                "node {}: the certificate's fingerprint is {fp}, not {}",
                c.node,
                c.fingerprint
            );
        }
        leaves.push(impmesh_certs::pem_encode("CERTIFICATE", leaf.as_ref()));
    }
    let mut added = 0;
    for pem in leaves {
        added += add(
            store,
            pem.as_bytes(),
            TrustKind::Pinned,
            Some(cluster),
            "exchanged",
        )
        .await?
        .len();
    }
    Ok(added)
}
