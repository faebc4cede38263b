//! HTTP file upload (XEP-0363): the slots handed out and the files they became. The
//! router decides sizes and names; this keeps the rows and the quota.

use sqlx::Row as _;

use crate::{Result, Store};

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Given, waiting for its PUT.
    Open,
    /// A PUT is writing its file.
    Uploading,
    /// The file is there.
    Stored,
}

impl SlotState {
    fn code(self) -> i64 {
        match self {
            SlotState::Open => 0,
            SlotState::Stored => 1,
            SlotState::Uploading => 2,
        }
    }

    fn from_code(code: i64) -> SlotState {
        match code {
            1 => SlotState::Stored,
            2 => SlotState::Uploading,
            _ => SlotState::Open,
        }
    }
}

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
    /// The type the slot request named; '' when it named none (the PUT's is kept).
    pub content_type: String,
    /// SHA-256 of the PUT's bearer token, hex.
    pub token_sha256: String,
    /// Unix seconds.
    pub created: i64,
    /// The PUT must come before this (Unix seconds).
    pub put_before: i64,
    pub state: SlotState,
}

/// What reserving a slot came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    Reserved,
    /// The owner's slots and files already hold `used` bytes: this one does not fit.
    QuotaFull {
        used: u64,
    },
    /// The owner has as many slots and files as one account may.
    TooMany,
    /// The owner is gone.
    NoAccount,
}

/// What claiming a slot for a PUT came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This PUT writes the file; it stores or releases the slot.
    Claimed,
    /// Another PUT is writing it.
    Busy,
    /// The file is there already.
    Stored,
    /// The time for the PUT is over, or the slot is gone.
    Expired,
}

/// When slots and files are over, for the expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub now: i64,
    /// Files stored before this go (`i64::MIN`: files never expire).
    pub stored_before: i64,
    /// Uploads whose PUT time ended before this are left over from a crash.
    pub stale_before: i64,
}

const COLUMNS: &str =
    "id, owner, node, filename, size, content_type, token_sha256, created, put_before, stored";

/// The condition of a slot that is over, with `$2`, `$3`, `$4` the times of an
/// [`Expiry`].
const OVER: &str = "((stored = 1 AND created < $2) OR (stored = 0 AND put_before < $3)
    OR (stored = 2 AND put_before < $4))";

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
        state: SlotState::from_code(r.try_get("stored")?),
    })
}

impl Store {
    /// Records a new slot unless the owner's slots and files, with it, would hold more
    /// than `quota` bytes or number more than `max_files`. Serialized per owner (the
    /// owner's row is locked).
    pub async fn upload_reserve(
        &self,
        slot: &Upload,
        quota: u64,
        max_files: u64,
    ) -> Result<Reserved> {
        let _timer = self.latency.start("upload_reserve");
        let mut tx = self.write().await?;
        if !self.lock_owner(&mut tx, &slot.owner).await? {
            return Ok(Reserved::NoAccount);
        }
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS used, COUNT(*) AS files
             FROM uploads WHERE owner = $1",
        )
        .bind(&slot.owner)
        .fetch_one(&mut *tx)
        .await?;
        let used = u64::try_from(row.try_get::<i64, _>("used")?).unwrap_or(0);
        let files = u64::try_from(row.try_get::<i64, _>("files")?).unwrap_or(0);
        if files >= max_files {
            return Ok(Reserved::TooMany);
        }
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
        .bind(slot.state.code())
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

    /// Claims open slot `id` for one PUT, if its time (`put_before`) is not over at
    /// `now`: two PUTs never write one slot.
    pub async fn upload_claim(&self, id: &str, now: i64) -> Result<Claim> {
        let _timer = self.latency.start("upload_claim");
        let claimed = sqlx::query(
            "UPDATE uploads SET stored = 2 WHERE id = $1 AND stored = 0 AND put_before >= $2",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if claimed == 1 {
            return Ok(Claim::Claimed);
        }
        Ok(match self.upload(id).await?.map(|u| u.state) {
            Some(SlotState::Uploading) => Claim::Busy,
            Some(SlotState::Stored) => Claim::Stored,
            Some(SlotState::Open) | None => Claim::Expired,
        })
    }

    /// Gives a claimed slot back: its PUT failed.
    pub async fn upload_release(&self, id: &str) -> Result<()> {
        let _timer = self.latency.start("upload_release");
        sqlx::query("UPDATE uploads SET stored = 0 WHERE id = $1 AND stored = 2")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks claimed slot `id` as holding its file, of `content_type`; false when the
    /// slot is gone.
    pub async fn upload_stored(&self, id: &str, content_type: &str) -> Result<bool> {
        let _timer = self.latency.start("upload_stored");
        let done = sqlx::query(
            "UPDATE uploads SET stored = 1, content_type = $2 WHERE id = $1 AND stored = 2",
        )
        .bind(id)
        .bind(content_type)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// Up to `limit` slots of `node` that are over at `at`: stored files past their
    /// time, open slots whose PUT did not come, uploads a crash left.
    pub async fn uploads_expired(
        &self,
        node: &str,
        at: Expiry,
        limit: usize,
    ) -> Result<Vec<String>> {
        let _timer = self.latency.start("uploads_expired");
        let sql = format!("SELECT id FROM uploads WHERE node = $1 AND {OVER} LIMIT $5");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(node)
            .bind(at.stored_before)
            .bind(at.now)
            .bind(at.stale_before)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get("id")?))
            .collect::<Result<Vec<String>>>()
    }

    /// Forgets slot `id` if it is still over at `at` (a PUT may have completed since
    /// it was listed); true when it went, and its file may be removed.
    pub async fn upload_delete_expired(&self, id: &str, at: Expiry) -> Result<bool> {
        let _timer = self.latency.start("upload_delete");
        let sql = format!("DELETE FROM uploads WHERE id = $1 AND {OVER}");
        let gone = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(at.stored_before)
            .bind(at.now)
            .bind(at.stale_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(gone == 1)
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
            state: SlotState::Open,
        }
    }

    fn at(now: i64, stored_before: i64) -> Expiry {
        Expiry {
            now,
            stored_before,
            stale_before: now - 3600,
        }
    }

    #[tokio::test]
    async fn slots_count_against_the_quota_are_claimed_once_and_expire() {
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
            let reserve = |s: Upload| {
                let store = store.clone();
                async move { store.upload_reserve(&s, 1000, 3).await.unwrap() }
            };
            assert_eq!(reserve(slot("a", 600, 1000)).await, Reserved::Reserved);
            assert_eq!(
                reserve(slot("b", 500, 1000)).await,
                Reserved::QuotaFull { used: 600 }
            );
            assert!(store.upload("b").await.unwrap().is_none());
            let mut ghost = slot("g", 1, 1000);
            ghost.owner = "nobody".into();
            assert_eq!(reserve(ghost).await, Reserved::NoAccount);
            assert_eq!(reserve(slot("c", 300, 2000)).await, Reserved::Reserved);
            assert_eq!(reserve(slot("d", 1, 2000)).await, Reserved::Reserved);
            assert_eq!(reserve(slot("e", 1, 2000)).await, Reserved::TooMany);

            // One PUT at a time, within the slot's time.
            assert_eq!(store.upload_claim("a", 1200).await.unwrap(), Claim::Claimed);
            assert_eq!(store.upload_claim("a", 1200).await.unwrap(), Claim::Busy);
            store.upload_release("a").await.unwrap();
            assert_eq!(store.upload_claim("a", 1301).await.unwrap(), Claim::Expired);
            assert_eq!(store.upload_claim("a", 1300).await.unwrap(), Claim::Claimed);
            assert!(store.upload_stored("a", "image/png").await.unwrap());
            assert!(!store.upload_stored("a", "image/png").await.unwrap());
            assert_eq!(store.upload_claim("a", 1300).await.unwrap(), Claim::Stored);
            assert_eq!(
                store.upload_claim("zz", 1300).await.unwrap(),
                Claim::Expired
            );
            let a = store.upload("a").await.unwrap().unwrap();
            assert_eq!((a.state, a.size), (SlotState::Stored, 600));

            // At 1500: a's file is older than 1200; c and d still open.
            let over = store
                .uploads_expired("n1", at(1500, 1200), 10)
                .await
                .unwrap();
            assert_eq!(over, vec!["a".to_owned()]);
            // Without file expiry, at 2400: c and d, whose PUT never came; an upload
            // under way is left alone until it is stale.
            assert_eq!(store.upload_claim("d", 2200).await.unwrap(), Claim::Claimed);
            let mut over = store
                .uploads_expired("n1", at(2400, i64::MIN), 10)
                .await
                .unwrap();
            over.sort();
            assert_eq!(over, vec!["c".to_owned()]);
            let mut stale = store
                .uploads_expired("n1", at(6000, i64::MIN), 10)
                .await
                .unwrap();
            stale.sort();
            assert_eq!(stale, vec!["c".to_owned(), "d".to_owned()]);
            assert!(
                store
                    .uploads_expired("n2", at(i64::MAX, i64::MAX), 10)
                    .await
                    .unwrap()
                    .is_empty()
            );
            // The delete checks again: a file stored meanwhile stays.
            assert!(
                !store
                    .upload_delete_expired("a", at(1500, 1000))
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .upload_delete_expired("a", at(1500, 1200))
                    .await
                    .unwrap()
            );
            assert!(store.upload("a").await.unwrap().is_none());
            // Deleting the account forgets its slots.
            store.delete_user("erin").await.unwrap();
            assert!(store.upload("c").await.unwrap().is_none());
        }
    }
}
