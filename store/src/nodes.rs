//! The nodes of this cluster as peers see them, and the admin accounts.

use sqlx::Row as _;

use crate::scram::{DEFAULT_ITERATIONS, ScramHash, ScramVerifier};
use crate::{Result, Store, StoreError, now_unix};

/// A node's published endpoints and certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRecord {
    pub name: String,
    pub cluster: String,
    /// The host name or address peers and clients reach the node at.
    pub host: String,
    pub c2s_port: u16,
    pub c2s_tls_port: u16,
    pub link_port: u16,
    pub https_port: u16,
    /// Where the node serves uploaded files (`https://host[:port]`); '' without.
    pub upload_url: String,
    /// The node's certificate chain (PEM).
    pub cert_pem: String,
    /// SHA-256 fingerprint of the node certificate.
    pub fingerprint: String,
    pub updated_at: i64,
}

impl Store {
    /// Publishes this node's endpoints and certificate (at start and after a
    /// certificate change).
    pub async fn publish_node(&self, node: &NodeRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (name, cluster, created_at, host, c2s_port, c2s_tls_port, link_port,
                 https_port, cert_pem, fingerprint, updated_at, upload_url)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $3, $11)
             ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, host = excluded.host,
                 c2s_port = excluded.c2s_port, c2s_tls_port = excluded.c2s_tls_port,
                 link_port = excluded.link_port, https_port = excluded.https_port,
                 cert_pem = excluded.cert_pem, fingerprint = excluded.fingerprint,
                 updated_at = excluded.updated_at, upload_url = excluded.upload_url",
        )
        .bind(&node.name)
        .bind(&node.cluster)
        .bind(now_unix())
        .bind(&node.host)
        .bind(i32::from(node.c2s_port))
        .bind(i32::from(node.c2s_tls_port))
        .bind(i32::from(node.link_port))
        .bind(i32::from(node.https_port))
        .bind(&node.cert_pem)
        .bind(&node.fingerprint)
        .bind(&node.upload_url)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The nodes of `cluster`, by name.
    pub async fn cluster_nodes(&self, cluster: &str) -> Result<Vec<NodeRecord>> {
        let rows = sqlx::query(
            "SELECT name, cluster, host, c2s_port, c2s_tls_port, link_port, https_port, cert_pem,
                 fingerprint, updated_at, upload_url
             FROM nodes WHERE cluster = $1 ORDER BY name",
        )
        .bind(cluster)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let port = |col: &str| -> Result<u16> {
                    let v: i32 = row.try_get(col)?;
                    u16::try_from(v).map_err(|_| StoreError::Corrupt(format!("nodes.{col}")))
                };
                Ok(NodeRecord {
                    name: row.try_get("name")?,
                    cluster: row.try_get("cluster")?,
                    host: row.try_get("host")?,
                    c2s_port: port("c2s_port")?,
                    c2s_tls_port: port("c2s_tls_port")?,
                    link_port: port("link_port")?,
                    https_port: port("https_port")?,
                    upload_url: row.try_get("upload_url")?,
                    cert_pem: row.try_get("cert_pem")?,
                    fingerprint: row.try_get("fingerprint")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// Creates an admin account or changes its password.
    pub async fn set_admin_user(&self, username: &str, password: &str) -> Result<()> {
        let verifier = ScramVerifier::new(ScramHash::Sha256, password, DEFAULT_ITERATIONS)?;
        sqlx::query(
            "INSERT INTO admin_users (username, scram_sha256, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (username) DO UPDATE SET scram_sha256 = excluded.scram_sha256",
        )
        .bind(username)
        .bind(verifier.encode())
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An admin account's verifier, or `None`.
    pub async fn admin_user(&self, username: &str) -> Result<Option<ScramVerifier>> {
        let row = sqlx::query("SELECT scram_sha256 FROM admin_users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let text: String = row.try_get("scram_sha256")?;
            ScramVerifier::decode(ScramHash::Sha256, &text)
                .ok_or_else(|| StoreError::Corrupt(format!("admin user {username}")))
        })
        .transpose()
    }

    /// Admin account names.
    pub async fn admin_users(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT username FROM admin_users ORDER BY username")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("username")?)).collect()
    }

    /// Deletes an admin account; false when there was none.
    pub async fn delete_admin_user(&self, username: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM admin_users WHERE username = $1")
            .bind(username)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    #[tokio::test]
    async fn published_nodes_and_admin_users() {
        for (store, _dir) in stores().await {
            store.register_node("n1", "c").await.unwrap();
            let mut rec = NodeRecord {
                name: "n1".into(),
                cluster: "c".into(),
                host: "127.0.0.1".into(),
                c2s_port: 5222,
                c2s_tls_port: 5223,
                link_port: 7400,
                https_port: 8443,
                upload_url: "https://n1.c.example:5443".into(),
                cert_pem: "PEM".into(),
                fingerprint: "AA".into(),
                updated_at: 0,
            };
            store.publish_node(&rec).await.unwrap();
            rec.name = "n2".into();
            rec.https_port = 65535;
            store.publish_node(&rec).await.unwrap();
            let nodes = store.cluster_nodes("c").await.unwrap();
            assert_eq!(nodes.len(), 2);
            assert_eq!(nodes[0].c2s_tls_port, 5223);
            assert_eq!(nodes[1].https_port, 65535);
            assert_eq!(nodes[1].upload_url, "https://n1.c.example:5443");
            assert!(store.cluster_nodes("other").await.unwrap().is_empty());
            assert_eq!(
                store.upload_url_of("n2").await.unwrap().as_deref(),
                Some("https://n1.c.example:5443")
            );
            assert_eq!(store.upload_url_of("n9").await.unwrap(), None);

            store.set_admin_user("root", "pw").await.unwrap();
            assert!(
                store
                    .admin_user("root")
                    .await
                    .unwrap()
                    .unwrap()
                    .verify_password("pw")
            );
            assert_eq!(store.admin_users().await.unwrap(), ["root"]);
            assert!(store.delete_admin_user("root").await.unwrap());
            assert!(store.admin_user("root").await.unwrap().is_none());
        }
    }
}
