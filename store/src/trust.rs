//! The trust store: CA certificates that vouch for peers, and peer certificates pinned
//! exactly as they are (self-signed peers). Each entry says where it came from.

use sqlx::Row as _;

use crate::{Result, Store, StoreError, now_unix};

/// One trusted certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustEntry {
    /// SHA-256 of the DER certificate, colon-separated hex; the entry's identity.
    pub fingerprint: String,
    pub kind: TrustKind,
    pub subject: String,
    pub pem: String,
    /// `imported` (by an admin) or `exchanged` (by the sync agent with a peer).
    pub source: String,
    /// The peer a pinned certificate belongs to.
    pub peer: Option<String>,
    pub added_at: i64,
}

/// What a trust entry vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TrustKind {
    /// A CA: certificates it signs are trusted for the names they carry.
    Ca,
    /// This exact certificate, for its peer.
    Pinned,
}

impl TrustKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustKind::Ca => "ca",
            TrustKind::Pinned => "pinned",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ca" => Some(TrustKind::Ca),
            "pinned" => Some(TrustKind::Pinned),
            _ => None,
        }
    }
}

impl Store {
    /// Adds an entry; false when that certificate is already trusted.
    pub async fn add_trust(&self, entry: &TrustEntry) -> Result<bool> {
        let result = sqlx::query(
            "INSERT INTO trust_entries (fingerprint, kind, subject, pem, source, peer, added_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(&entry.fingerprint)
        .bind(entry.kind.as_str())
        .bind(&entry.subject)
        .bind(&entry.pem)
        .bind(&entry.source)
        .bind(entry.peer.as_deref())
        .bind(if entry.added_at == 0 {
            now_unix()
        } else {
            entry.added_at
        })
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Every entry, oldest first.
    pub async fn trust_entries(&self) -> Result<Vec<TrustEntry>> {
        let rows = sqlx::query(
            "SELECT fingerprint, kind, subject, pem, source, peer, added_at
             FROM trust_entries ORDER BY added_at, fingerprint",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(TrustEntry {
                    fingerprint: r.try_get("fingerprint")?,
                    kind: TrustKind::parse(&kind)
                        .ok_or_else(|| StoreError::Corrupt(format!("trust kind {kind:?}")))?,
                    subject: r.try_get("subject")?,
                    pem: r.try_get("pem")?,
                    source: r.try_get("source")?,
                    peer: r.try_get("peer")?,
                    added_at: r.try_get("added_at")?,
                })
            })
            .collect()
    }

    /// Removes an entry by fingerprint; false when there was none.
    pub async fn remove_trust(&self, fingerprint: &str) -> Result<bool> {
        let result = sqlx::query("DELETE FROM trust_entries WHERE fingerprint = $1")
            .bind(fingerprint)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }
}

impl Store {
    /// What verifies a node of `peer`: the certificates pinned for that peer and the
    /// trusted CAs (a certificate pinned for another peer does not vouch for this one).
    /// `None`: every pinned certificate and CA (no peer in particular).
    pub async fn trust_anchors(&self, peer: Option<&str>) -> Result<impmesh_certs::TrustAnchors> {
        use rustls_pki_types::pem::PemObject as _;
        let mut anchors = impmesh_certs::TrustAnchors::default();
        for entry in self.trust_entries().await? {
            match entry.kind {
                TrustKind::Pinned => {
                    if peer.is_none() || entry.peer.as_deref() == peer {
                        anchors.pinned.insert(entry.fingerprint);
                    }
                }
                _ => anchors.cas.push(
                    rustls_pki_types::CertificateDer::from_pem_slice(entry.pem.as_bytes())
                        .map_err(|e| {
                            StoreError::Corrupt(format!(
                                "damaged trust entry {}: {e}",
                                entry.fingerprint
                            ))
                        })?,
                ),
            }
        }
        Ok(anchors)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    #[tokio::test]
    async fn add_list_remove() {
        for (store, _dir) in stores().await {
            let ca = TrustEntry {
                fingerprint: "AA:BB".into(),
                kind: TrustKind::Ca,
                subject: "CN=Test CA".into(),
                pem: "-----BEGIN CERTIFICATE-----".into(),
                source: "imported".into(),
                peer: None,
                added_at: 100,
            };
            let pin = TrustEntry {
                fingerprint: "CC:DD".into(),
                kind: TrustKind::Pinned,
                peer: Some("cluster-b.example.com".into()),
                source: "exchanged".into(),
                added_at: 200,
                ..ca.clone()
            };
            assert!(store.add_trust(&ca).await.unwrap());
            assert!(!store.add_trust(&ca).await.unwrap(), "added twice");
            assert!(store.add_trust(&pin).await.unwrap());
            assert_eq!(store.trust_entries().await.unwrap(), [ca.clone(), pin]);
            assert!(store.remove_trust("CC:DD").await.unwrap());
            assert!(!store.remove_trust("CC:DD").await.unwrap());
            assert_eq!(store.trust_entries().await.unwrap(), [ca]);
        }
    }
}
