//! The trust store as admins and peers fill it (CA certificates, pinned peer
//! certificates), and the verifier inputs built from it.

use impmesh_certs::TrustAnchors;
use impmesh_store::{Store, StoreError, TrustEntry, TrustKind};
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
) -> Result<Vec<TrustEntry>, TrustFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(TrustFileError::NotPem)?;
    if certs.is_empty() {
        return Err(TrustFileError::Empty);
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
pub async fn anchors(store: &Store) -> Result<TrustAnchors, StoreError> {
    store.trust_anchors(None).await
}

/// What verifies one peer: its own pinned certificates and the trusted CAs (a
/// certificate pinned for another peer does not vouch for this one).
pub async fn anchors_for(store: &Store, peer: &str) -> Result<TrustAnchors, StoreError> {
    store.trust_anchors(Some(peer)).await
}

/// Why a PEM file could not be added to the trust store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustFileError {
    #[error("not a PEM certificate file: {0}")]
    NotPem(rustls_pki_types::pem::Error),
    #[error("no certificate found in the file")]
    Empty,
    #[error(transparent)]
    Certificate(#[from] impmesh_certs::CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a certificate cannot be pinned for a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    #[error("{0:?} is not a cluster name")]
    BadCluster(String),
    #[error(
        "certificate {fingerprint} is already pinned for {owner}: one certificate belongs to one peer"
    )]
    OwnedByAnother { fingerprint: String, owner: String },
    #[error("certificate {0} is trusted as a CA here, not as a node")]
    IsCa(String),
    #[error("{0}")]
    Certificate(#[from] impmesh_certs::CertError),
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
}

/// Pins for `cluster` the certificate a node of it proved it holds the key of (it
/// presented it on a TLS connection with us). A certificate pinned for another peer
/// is refused rather than skipped: pinning a victim's public certificate under a
/// made-up name must not block the victim's own peering, and the victim's must not
/// look successful while pinning nothing. Returns whether it was new.
pub async fn pin_proven(
    store: &Store,
    cluster: &str,
    cert: &CertificateDer<'_>,
) -> Result<bool, PinError> {
    if !impmesh_certs::is_dns_name(cluster) {
        return Err(PinError::BadCluster(cluster.to_owned()));
    }
    let info = impmesh_certs::describe(cert)?;
    if let Some(existing) = store
        .trust_entries()
        .await?
        .into_iter()
        .find(|e| e.fingerprint == info.sha256)
    {
        return match (existing.kind, existing.peer) {
            (TrustKind::Pinned, Some(owner)) if owner == cluster => Ok(false),
            (TrustKind::Pinned, owner) => Err(PinError::OwnedByAnother {
                fingerprint: info.sha256,
                owner: owner.unwrap_or_else(|| "nobody".into()),
            }),
            _ => Err(PinError::IsCa(info.sha256)),
        };
    }
    let entry = TrustEntry {
        fingerprint: info.sha256,
        kind: TrustKind::Pinned,
        subject: info.subject,
        pem: impmesh_certs::pem_encode("CERTIFICATE", cert.as_ref()),
        source: "exchanged".into(),
        peer: Some(cluster.to_owned()),
        added_at: 0,
    };
    Ok(store.add_trust(&entry).await?)
}
