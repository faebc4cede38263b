//! Offline messages (XEP-0160): kept for a user with no available resource and handed
//! over, oldest first and a page at a time, at the next initial presence. A row leaves
//! the store only when the client has acknowledged it (the router decides when).
//!
//! Quotas per owner, by count and by bytes, and a share of each per sender: one sender
//! cannot fill another user's storage and so lock out everyone else's messages.

use sqlx::Row as _;

use crate::{Backend, Result, Store, now_unix};

/// A stored message: its serialized stanza and when it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    pub id: i64,
    pub stanza: String,
    pub stored_at: i64,
}

/// How much one owner may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineQuota {
    /// Messages kept per owner.
    pub messages: u32,
    /// Bytes of stanzas kept per owner.
    pub bytes: u64,
    /// Messages one sender may hold for one owner; its byte share is the same fraction
    /// of `bytes`.
    pub per_sender: u32,
}

/// What became of a message offered to offline storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offline {
    Stored,
    /// The owner's quota (count or bytes) is used up.
    Full,
    /// This sender's share of the owner's quota is used up.
    SenderShareFull,
    /// No such local account.
    NoSuchUser,
}

impl Store {
    /// Stores a message from `sender` (a bare JID) within `quota`. The owner's row is
    /// locked first, so the quota holds under concurrent senders on both backends
    /// (SQLite's write transaction is exclusive; PostgreSQL takes the row lock).
    pub async fn store_offline(
        &self,
        owner: &str,
        sender: &str,
        stanza: &str,
        quota: OfflineQuota,
    ) -> Result<Offline> {
        let _timer = self.latency.start("store_offline");
        let mut tx = self.write().await?;
        let lock = match self.backend {
            Backend::Sqlite => "SELECT 1 AS one FROM users WHERE username = $1",
            Backend::Postgres => "SELECT 1 AS one FROM users WHERE username = $1 FOR UPDATE",
        };
        if sqlx::query(lock)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(Offline::NoSuchUser);
        }
        let size = stanza.len() as i64;
        let row = sqlx::query(
            // PostgreSQL's SUM of BIGINT is NUMERIC: cast back.
            "SELECT COUNT(*) AS n,
                    CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes,
                    CAST(COALESCE(SUM(CASE WHEN sender = $2 THEN 1 ELSE 0 END), 0) AS BIGINT)
                        AS sender_n,
                    CAST(COALESCE(SUM(CASE WHEN sender = $2 THEN size ELSE 0 END), 0) AS BIGINT)
                        AS sender_bytes
             FROM offline_messages WHERE owner = $1",
        )
        .bind(owner)
        .bind(sender)
        .fetch_one(&mut *tx)
        .await?;
        let count: i64 = row.try_get("n")?;
        let bytes: i64 = row.try_get("bytes")?;
        let sender_count: i64 = row.try_get("sender_n")?;
        let sender_bytes: i64 = row.try_get("sender_bytes")?;
        let max_bytes = i64::try_from(quota.bytes).unwrap_or(i64::MAX);
        if count >= i64::from(quota.messages) || bytes.saturating_add(size) > max_bytes {
            return Ok(Offline::Full);
        }
        let share_bytes = max_bytes / i64::from(quota.messages.max(1))
            * i64::from(quota.per_sender.min(quota.messages));
        if sender_count >= i64::from(quota.per_sender)
            || sender_bytes.saturating_add(size) > share_bytes
        {
            return Ok(Offline::SenderShareFull);
        }
        sqlx::query(
            "INSERT INTO offline_messages (owner, sender, stanza, size, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(owner)
        .bind(sender)
        .bind(stanza)
        .bind(size)
        .bind(now_unix())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Offline::Stored)
    }

    /// Up to `limit` waiting messages after row `after`, oldest first, without removing
    /// them.
    pub async fn offline_page(
        &self,
        owner: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OfflineMessage>> {
        let _timer = self.latency.start("offline_page");
        let rows = sqlx::query(
            "SELECT id, stanza, created_at FROM offline_messages
             WHERE owner = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(owner)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message).collect()
    }

    /// How many messages wait for `owner`.
    pub async fn offline_count(&self, owner: &str) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM offline_messages WHERE owner = $1")
            .bind(owner)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every waiting message, oldest first (for tests and the admin view).
    pub async fn offline_messages(&self, owner: &str) -> Result<Vec<OfflineMessage>> {
        self.offline_page(owner, i64::MIN, usize::MAX).await
    }

    /// Removes messages the client acknowledged. By id, not "up to an id": rows that
    /// commit out of id order on PostgreSQL may not have been handed over yet.
    pub async fn delete_offline(&self, owner: &str, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _timer = self.latency.start("delete_offline");
        let mut tx = self.write().await?;
        for id in ids {
            sqlx::query("DELETE FROM offline_messages WHERE owner = $1 AND id = $2")
                .bind(owner)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn message(r: &sqlx::any::AnyRow) -> Result<OfflineMessage> {
    Ok(OfflineMessage {
        id: r.try_get("id")?,
        stanza: r.try_get("stanza")?,
        stored_at: r.try_get("created_at")?,
    })
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    const QUOTA: OfflineQuota = OfflineQuota {
        messages: 4,
        bytes: 1000,
        per_sender: 2,
    };

    async fn bob(store: &Store) {
        store
            .add_user(NewUser {
                username: "bob",
                password: "pw",
                home_cluster: "c",
                home_node: "n",
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn offline_quota_by_count_bytes_and_sender_share() {
        for (store, _dir) in stores().await {
            bob(&store).await;
            let put = |sender: &'static str, stanza: String| {
                let store = store.clone();
                async move {
                    store
                        .store_offline("bob", sender, &stanza, QUOTA)
                        .await
                        .unwrap()
                }
            };
            assert_eq!(put("a@d", "<m1/>".into()).await, Offline::Stored);
            assert_eq!(put("a@d", "<m2/>".into()).await, Offline::Stored);
            // A third from the same sender exceeds its share; others still get in.
            assert_eq!(put("a@d", "<m3/>".into()).await, Offline::SenderShareFull);
            assert_eq!(put("c@d", "<m4/>".into()).await, Offline::Stored);
            // A share in bytes too: half of 1000 bytes per sender.
            assert_eq!(
                put("e@d", "x".repeat(501)).await,
                Offline::SenderShareFull,
                "over the byte share"
            );
            assert_eq!(put("e@d", "x".repeat(400)).await, Offline::Stored);
            // The owner's bytes: 5 + 5 + 5 + 400 stored; 600 more do not fit.
            assert_eq!(put("f@d", "y".repeat(600)).await, Offline::Full);
            assert_eq!(put("g@d", "<m5/>".into()).await, Offline::Full, "4 stored");
            assert_eq!(
                store
                    .store_offline("nobody", "a@d", "<m/>", QUOTA)
                    .await
                    .unwrap(),
                Offline::NoSuchUser
            );
            let all = store.offline_messages("bob").await.unwrap();
            assert_eq!(all.len(), 4);
            let page = store.offline_page("bob", all[0].id, 2).await.unwrap();
            assert_eq!(page, all[1..3]);
            // Deleting by id leaves the rest, whatever their order.
            store
                .delete_offline("bob", &[all[0].id, all[2].id])
                .await
                .unwrap();
            let left: Vec<i64> = store
                .offline_messages("bob")
                .await
                .unwrap()
                .iter()
                .map(|m| m.id)
                .collect();
            assert_eq!(left, [all[1].id, all[3].id]);
        }
    }

    /// Concurrent senders never push an owner over the quota (L11: count-then-insert
    /// raced at READ COMMITTED on PostgreSQL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn offline_quota_holds_under_concurrent_senders() {
        for (store, _dir) in stores().await {
            bob(&store).await;
            let quota = OfflineQuota {
                messages: 10,
                bytes: 1 << 20,
                per_sender: 10,
            };
            // Open the pool's connections first, so that the senders below do run at
            // once rather than one per connection as it is opened.
            let mut warm = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let store = store.clone();
                warm.spawn(async move { store.offline_messages("bob").await });
            }
            while let Some(r) = warm.join_next().await {
                r.unwrap().unwrap();
            }
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..40 {
                let store = store.clone();
                tasks.spawn(async move {
                    store
                        .store_offline("bob", &format!("s{i}@d"), "<m/>", quota)
                        .await
                });
            }
            let mut stored = 0;
            while let Some(r) = tasks.join_next().await {
                if r.unwrap().unwrap() == Offline::Stored {
                    stored += 1;
                }
            }
            assert_eq!(stored, 10);
            assert_eq!(store.offline_messages("bob").await.unwrap().len(), 10);
        }
    }
}
