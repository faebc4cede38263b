//! Offline messages (XEP-0160): kept for a user with no available resource and handed
//! over, oldest first, at the next initial presence.

use sqlx::Row as _;

use crate::{Result, Store, now_unix};

/// A stored message: its serialized stanza and when it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    pub id: i64,
    pub stanza: String,
    pub stored_at: i64,
}

impl Store {
    /// Stores a message unless the user already has `limit` waiting; returns whether it was
    /// stored. Count and insert run in one transaction so the limit holds under races.
    pub async fn store_offline(&self, owner: &str, stanza: &str, limit: u32) -> Result<bool> {
        let _timer = self.latency.start("store_offline");
        let mut tx = self.write().await?;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM offline_messages WHERE owner = $1")
            .bind(owner)
            .fetch_one(&mut *tx)
            .await?;
        let count: i64 = row.try_get("n")?;
        if count >= i64::from(limit) {
            return Ok(false);
        }
        sqlx::query("INSERT INTO offline_messages (owner, stanza, created_at) VALUES ($1, $2, $3)")
            .bind(owner)
            .bind(stanza)
            .bind(now_unix())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The waiting messages, oldest first, without removing them.
    pub async fn offline_messages(&self, owner: &str) -> Result<Vec<OfflineMessage>> {
        let _timer = self.latency.start("offline_messages");
        let rows = sqlx::query(
            "SELECT id, stanza, created_at FROM offline_messages WHERE owner = $1 ORDER BY id",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OfflineMessage {
                    id: r.try_get("id")?,
                    stanza: r.try_get("stanza")?,
                    stored_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Removes messages up to and including `last_id` once they were handed to a session.
    pub async fn delete_offline_through(&self, owner: &str, last_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM offline_messages WHERE owner = $1 AND id <= $2")
            .bind(owner)
            .bind(last_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    #[tokio::test]
    async fn offline_store_limit_and_drain() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "bob",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n",
                })
                .await
                .unwrap();
            assert!(store.store_offline("bob", "<m1/>", 2).await.unwrap());
            assert!(store.store_offline("bob", "<m2/>", 2).await.unwrap());
            assert!(!store.store_offline("bob", "<m3/>", 2).await.unwrap());
            let msgs = store.offline_messages("bob").await.unwrap();
            assert_eq!(
                msgs.iter().map(|m| m.stanza.as_str()).collect::<Vec<_>>(),
                ["<m1/>", "<m2/>"]
            );
            store
                .delete_offline_through("bob", msgs[0].id)
                .await
                .unwrap();
            assert_eq!(store.offline_messages("bob").await.unwrap().len(), 1);
            // Storing for an unknown user violates the foreign key: nothing is written.
            assert!(store.store_offline("nobody", "<m/>", 10).await.is_err());
        }
    }
}
