//! HTTP file upload (XEP-0363): the slots handed out and the files they became. The
//! router decides sizes and names; this keeps the rows and the quota.

use sqlx::Row as _;

use crate::{Result, Store};

/// A slot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// Random, the slot's and the file's name (hex).
    pub id: String,
    pub owner: String,
    /// The node that keeps the file.
    pub node: String,
    pub filename: String,
    pub size: u64,
    pub content_type: String,
    /// SHA-256 of the PUT's bearer token, hex.
    pub token_sha256: String,
    /// Unix seconds.
    pub created: i64,
    /// The PUT must come before this (Unix seconds).
    pub put_before: i64,
    pub stored: bool,
}

/// What reserving a slot came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    Reserved,
    /// The owner's slots and files already hold `used` bytes: this one does not fit.
    QuotaFull {
        used: u64,
    },
    /// The owner is gone.
    NoAccount,
}

const COLUMNS: &str =
    "id, owner, node, filename, size, content_type, token_sha256, created, put_before, stored";

fn upload(r: &sqlx::any::AnyRow) -> Result<Upload> {
    Ok(Upload {
        id: r.try_get("id")?,
        owner: r.try_get("owner")?,
        node: r.try_get("node")?,
        filename: r.try_get("filename")?,
        size: u64::try_from(r.try_get::<i64, _>("size")?).unwrap_or(0),
        content_type: r.try_get("content_type")?,
        token_sha256: r.try_get("token_sha256")?,
        created: r.try_get("created")?,
        put_before: r.try_get("put_before")?,
        stored: r.try_get::<i64, _>("stored")? != 0,
    })
}

impl Store {
    /// Records a new slot unless the owner's slots and files, with it, would hold more
    /// than `quota` bytes. Serialized per owner (the owner's row is locked).
    pub async fn upload_reserve(&self, slot: &Upload, quota: u64) -> Result<Reserved> {
        let _timer = self.latency.start("upload_reserve");
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, &slot.owner).await? {
            return Ok(Reserved::NoAccount);
        }
        let used: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS used FROM uploads WHERE owner = $1",
        )
        .bind(&slot.owner)
        .fetch_one(&mut *tx)
        .await?
        .try_get("used")?;
        let used = u64::try_from(used).unwrap_or(0);
        if used.saturating_add(slot.size) > quota {
            return Ok(Reserved::QuotaFull { used });
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO uploads ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )))
        .bind(&slot.id)
        .bind(&slot.owner)
        .bind(&slot.node)
        .bind(&slot.filename)
        .bind(i64::try_from(slot.size).unwrap_or(i64::MAX))
        .bind(&slot.content_type)
        .bind(&slot.token_sha256)
        .bind(slot.created)
        .bind(slot.put_before)
        .bind(i64::from(slot.stored))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Reserved::Reserved)
    }

    /// The slot `id`, if any.
    pub async fn upload(&self, id: &str) -> Result<Option<Upload>> {
        let _timer = self.latency.start("upload");
        let sql = format!("SELECT {COLUMNS} FROM uploads WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(upload).transpose()
    }

    /// Marks slot `id` as holding its file; false when it is gone or already did.
    pub async fn upload_stored(&self, id: &str) -> Result<bool> {
        let _timer = self.latency.start("upload_stored");
        let done = sqlx::query("UPDATE uploads SET stored = 1 WHERE id = $1 AND stored = 0")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(done == 1)
    }

    /// Up to `limit` slots of `node` that are over: files stored before
    /// `stored_before` (`None`: files never expire), and slots whose PUT did not come
    /// before `now`.
    pub async fn uploads_expired(
        &self,
        node: &str,
        stored_before: Option<i64>,
        now: i64,
        limit: usize,
    ) -> Result<Vec<String>> {
        let _timer = self.latency.start("uploads_expired");
        let rows = sqlx::query(
            "SELECT id FROM uploads WHERE node = $1
               AND ((stored = 1 AND created < $2) OR (stored = 0 AND put_before < $3))
             LIMIT $4",
        )
        .bind(node)
        .bind(stored_before.unwrap_or(i64::MIN))
        .bind(now)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get("id")?))
            .collect::<Result<Vec<String>>>()
    }

    /// Forgets slot `id`.
    pub async fn upload_delete(&self, id: &str) -> Result<()> {
        let _timer = self.latency.start("upload_delete");
        sqlx::query("DELETE FROM uploads WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn slot(id: &str, size: u64, created: i64) -> Upload {
        Upload {
            id: id.into(),
            owner: "erin".into(),
            node: "n1".into(),
            filename: "a.png".into(),
            size,
            content_type: "image/png".into(),
            token_sha256: "00".into(),
            created,
            put_before: created + 300,
            stored: false,
        }
    }

    #[tokio::test]
    async fn slots_count_against_the_quota_and_expire() {
        for (store, _dir) in stores().await {
            store
                .add_user(NewUser {
                    username: "erin",
                    password: "pw",
                    home_cluster: "c",
                    home_node: "n1",
                })
                .await
                .unwrap();
            assert_eq!(
                store
                    .upload_reserve(&slot("a", 600, 1000), 1000)
                    .await
                    .unwrap(),
                Reserved::Reserved
            );
            assert_eq!(
                store
                    .upload_reserve(&slot("b", 500, 1000), 1000)
                    .await
                    .unwrap(),
                Reserved::QuotaFull { used: 600 }
            );
            assert!(store.upload("b").await.unwrap().is_none());
            let mut ghost = slot("g", 1, 1000);
            ghost.owner = "nobody".into();
            assert_eq!(
                store.upload_reserve(&ghost, 1000).await.unwrap(),
                Reserved::NoAccount
            );
            assert_eq!(
                store
                    .upload_reserve(&slot("c", 400, 2000), 1000)
                    .await
                    .unwrap(),
                Reserved::Reserved
            );
            assert!(store.upload_stored("a").await.unwrap());
            assert!(!store.upload_stored("a").await.unwrap());
            let a = store.upload("a").await.unwrap().unwrap();
            assert!(a.stored);
            assert_eq!((a.size, a.content_type.as_str()), (600, "image/png"));
            // At 1500: a's file is older than 1200, c's slot still open.
            let over = store
                .uploads_expired("n1", Some(1200), 1500, 10)
                .await
                .unwrap();
            assert_eq!(over, vec!["a".to_owned()]);
            // Without file expiry, at 2400: only c, whose PUT never came.
            let over = store.uploads_expired("n1", None, 2400, 10).await.unwrap();
            assert_eq!(over, vec!["c".to_owned()]);
            assert!(
                store
                    .uploads_expired("n2", Some(i64::MAX), i64::MAX, 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            store.upload_delete("a").await.unwrap();
            assert!(store.upload("a").await.unwrap().is_none());
            // Deleting the account forgets its slots.
            store.delete_user("erin").await.unwrap();
            assert!(store.upload("c").await.unwrap().is_none());
        }
    }
}
