//! The durable outbox of router links: messages waiting for a remote node.

use sqlx::Row as _;

use crate::{Backend, Result, Store, now_unix};

/// A message waiting for a remote node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub node: String,
    pub cluster: String,
    pub stanza: String,
    pub queued_at: i64,
}

fn entry(r: &sqlx::any::AnyRow) -> Result<OutboxEntry> {
    Ok(OutboxEntry {
        id: r.try_get("id")?,
        node: r.try_get("node")?,
        cluster: r.try_get("cluster")?,
        stanza: r.try_get("stanza")?,
        queued_at: r.try_get("queued_at")?,
    })
}

impl Store {
    /// Appends messages for `node` of `cluster`, in the given order, with their queue
    /// times (unix seconds; 0: now).
    pub async fn outbox_push(
        &self,
        node: &str,
        cluster: &str,
        stanzas: &[(String, i64)],
    ) -> Result<()> {
        let _timer = self.latency.start("outbox_push");
        let mut tx = self.write().await?;
        for (stanza, queued_at) in stanzas {
            sqlx::query(
                "INSERT INTO outbox (node, cluster, stanza, queued_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(node)
            .bind(cluster)
            .bind(stanza)
            .bind(if *queued_at == 0 {
                now_unix()
            } else {
                *queued_at
            })
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` messages for `node` after `after_id`, oldest first.
    pub async fn outbox_page(
        &self,
        node: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT id, node, cluster, stanza, queued_at FROM outbox
             WHERE node = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(node)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry).collect()
    }

    /// Removes delivered (or bounced) messages.
    pub async fn outbox_delete(&self, ids: &[i64]) -> Result<()> {
        let mut tx = self.write().await?;
        for id in ids {
            sqlx::query("DELETE FROM outbox WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Messages for `node` queued before `before` (unix seconds), oldest first, at most
    /// `limit`.
    pub async fn outbox_expired(
        &self,
        node: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT id, node, cluster, stanza, queued_at FROM outbox
             WHERE node = $1 AND queued_at < $2 ORDER BY id LIMIT $3",
        )
        .bind(node)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry).collect()
    }

    /// How many messages wait for `node`, and their bytes (what the per-node cap
    /// counts).
    pub async fn outbox_size(&self, node: &str) -> Result<(u64, u64)> {
        let bytes = match self.backend {
            Backend::Sqlite => "LENGTH(CAST(stanza AS BLOB))",
            Backend::Postgres => "OCTET_LENGTH(stanza)",
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS n, COALESCE(SUM({bytes}), 0) AS b FROM outbox WHERE node = $1"
        )))
        .bind(node)
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        // SUM is a BIGINT on SQLite, a NUMERIC on PostgreSQL: read it as text there.
        let b: i64 = match self.backend {
            Backend::Sqlite => row.try_get("b")?,
            Backend::Postgres => row.try_get::<i64, _>("b").or_else(|_| {
                row.try_get::<String, _>("b")
                    .map(|t| t.parse().unwrap_or(i64::MAX))
            })?,
        };
        Ok((n.max(0) as u64, b.max(0) as u64))
    }

    /// The nodes with messages waiting, with their clusters and counts.
    pub async fn outbox_nodes(&self) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT node, MIN(cluster) AS cluster, COUNT(*) AS n FROM outbox
             GROUP BY node ORDER BY node",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("node")?, r.try_get("cluster")?, r.try_get("n")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;

    #[tokio::test]
    async fn the_outbox_keeps_order_per_node_and_finds_what_expired() {
        for (store, _dir) in stores().await {
            store
                .outbox_push("n1", "c1", &[("<m1/>".into(), 100), ("<m2/>".into(), 200)])
                .await
                .unwrap();
            store
                .outbox_push("n2", "c2", &[("<x/>".into(), 0)])
                .await
                .unwrap();
            store
                .outbox_push("n1", "c1", &[("<m3/>".into(), 300)])
                .await
                .unwrap();
            let page = store.outbox_page("n1", 0, 10).await.unwrap();
            let texts: Vec<&str> = page.iter().map(|e| e.stanza.as_str()).collect();
            assert_eq!(texts, ["<m1/>", "<m2/>", "<m3/>"]);
            let rest = store.outbox_page("n1", page[0].id, 1).await.unwrap();
            assert_eq!(rest[0].stanza, "<m2/>");
            assert_eq!(
                store.outbox_nodes().await.unwrap(),
                vec![("n1".into(), "c1".into(), 3), ("n2".into(), "c2".into(), 1)]
            );
            assert!(
                store
                    .outbox_expired("n2", 250, 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            let old = store.outbox_expired("n1", 250, 10).await.unwrap();
            assert_eq!(old.len(), 2);
            store
                .outbox_delete(&old.iter().map(|e| e.id).collect::<Vec<_>>())
                .await
                .unwrap();
            let page = store.outbox_page("n1", 0, 10).await.unwrap();
            assert_eq!(page.len(), 1);
            assert_eq!(page[0].stanza, "<m3/>");
            // Bytes, not characters.
            store
                .outbox_push("n1", "c1", &[("<é/>".into(), 0)])
                .await
                .unwrap();
            assert_eq!(store.outbox_size("n1").await.unwrap(), (2, 5 + 5));
            assert_eq!(store.outbox_size("nobody").await.unwrap(), (0, 0));
        }
    }
}
