//! The nodes of peer clusters, as their `getClusterInfo` announced them: where router
//! links and redirected clients reach them.

use sqlx::Row as _;

use crate::{ClusterName, NodeName, Result, Store, StoreError, now_unix};

/// One node of a peer cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerNode {
    pub name: NodeName,
    /// The peer cluster the node belongs to.
    pub peer: ClusterName,
    /// The host name or address the node is reached at.
    pub host: String,
    pub c2s_port: u16,
    pub c2s_tls_port: u16,
    /// Router links; 0 when the node does not accept them.
    pub link_port: u16,
    /// Where the node serves uploaded files (`https://host[:port]`); '' without.
    pub upload_url: String,
    pub fingerprint: String,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "name, peer, host, c2s_port, c2s_tls_port, link_port, fingerprint, updated_at, upload_url";

fn row_to_node(row: &sqlx::any::AnyRow) -> Result<PeerNode> {
    let port = |col: &str| -> Result<u16> {
        let v: i32 = row.try_get(col)?;
        u16::try_from(v).map_err(|_| StoreError::Corrupt(format!("peer_nodes.{col}")))
    };
    Ok(PeerNode {
        name: row.try_get("name")?,
        peer: row.try_get("peer")?,
        host: row.try_get("host")?,
        c2s_port: port("c2s_port")?,
        c2s_tls_port: port("c2s_tls_port")?,
        link_port: port("link_port")?,
        upload_url: row.try_get("upload_url")?,
        fingerprint: row.try_get("fingerprint")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// Replaces what is known of `peer`'s nodes (after a `getClusterInfo`). A node
    /// name another peer announced already is left to that peer.
    pub async fn set_peer_nodes(&self, peer: &str, nodes: &[PeerNode]) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("DELETE FROM peer_nodes WHERE peer = $1")
            .bind(peer)
            .execute(&mut *tx)
            .await?;
        for node in nodes {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO peer_nodes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (name) DO NOTHING"
            )))
            .bind(&node.name)
            .bind(peer)
            .bind(&node.host)
            .bind(i32::from(node.c2s_port))
            .bind(i32::from(node.c2s_tls_port))
            .bind(i32::from(node.link_port))
            .bind(&node.fingerprint)
            .bind(now_unix())
            .bind(&node.upload_url)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A node of a peer cluster, by name.
    pub async fn peer_node(&self, name: &str) -> Result<Option<PeerNode>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM peer_nodes WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_node).transpose()
    }

    /// Where node `name`, of this cluster or a peer's, serves uploaded files; `None`
    /// for a node this cluster does not know, '' for one without uploads.
    pub async fn upload_url_of(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT upload_url FROM nodes WHERE name = $1
             UNION ALL SELECT upload_url FROM peer_nodes WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("upload_url")).transpose()?)
    }

    /// The known nodes of `peer`, by name.
    pub async fn peer_nodes(&self, peer: &str) -> Result<Vec<PeerNode>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM peer_nodes WHERE peer = $1 ORDER BY name"
        )))
        .bind(peer)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_node).collect()
    }
}
