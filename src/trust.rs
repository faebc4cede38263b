//! `impmesh trust …`: the trust store as admins see it (CA certificates and pinned
//! peer certificates), and the verifier inputs the node builds from it.

use impmesh_certs::TrustAnchors;
use impmesh_store::{Store, TrustEntry, TrustKind};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Adds every certificate of a PEM file, as CAs or pinned for `peer`. Returns the
/// entries added (a certificate already trusted is skipped).
pub async fn add(
    store: &Store,
    pem: &[u8],
    kind: TrustKind,
    peer: Option<&str>,
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
            source: "imported".into(),
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
    let mut anchors = TrustAnchors::default();
    for entry in store.trust_entries().await? {
        match entry.kind {
            TrustKind::Pinned => {
                anchors.pinned.insert(entry.fingerprint);
            }
            _ => anchors.cas.push(
                CertificateDer::from_pem_slice(entry.pem.as_bytes()).map_err(|e| {
                    anyhow::anyhow!("damaged trust entry {}: {e}", entry.fingerprint)
                })?,
            ),
        }
    }
    Ok(anchors)
}
