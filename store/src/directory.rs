//! The user directory as peers see it: every change to a user (creation, new home,
//! deletion) gets the next update sequence number (USN); deletions leave tombstones.
//! Also the intercluster application (AXL) users and cluster-wide secrets.

use sqlx::Row as _;

use crate::room_directory::{RoomEntry, room_entry};
use crate::{ClusterName, NodeName, Result, Store, StoreError, UserName, now_unix};

/// One user (or tombstone) of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectoryEntry {
    pub username: UserName,
    pub home_cluster: ClusterName,
    pub home_node: NodeName,
    pub usn: i64,
    /// A tombstone: the user was deleted at this USN.
    pub deleted: bool,
}

/// A page of a directory listing, in USN order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryPage {
    pub entries: Vec<DirectoryEntry>,
    /// The rooms among the page's entries (when the listing asked for them).
    pub rooms: Vec<RoomEntry>,
    /// The listing's snapshot: every change up to this USN is in this listing (this page
    /// or the next ones); a reader that has read the last page has applied it all.
    pub snapshot_usn: i64,
    /// Whether more entries follow (ask again with `after_usn` = the last entry's USN).
    pub more: bool,
}

impl DirectoryPage {
    /// The USN of the page's last entry, user or room.
    pub fn last_usn(&self) -> Option<i64> {
        let users = self.entries.last().map(|e| e.usn);
        let rooms = self.rooms.last().map(|r| r.usn);
        users.max(rooms)
    }
}

/// An intercluster application user.
#[derive(Debug, Clone)]
pub struct AxlUser {
    pub username: String,
    /// SCRAM-SHA-256 verifier, for HTTP Basic over a trusted channel.
    pub scram_sha256: crate::scram::ScramVerifier,
    /// The OPAQUE registration record (for the channel-bound first contact).
    pub opaque_record: Vec<u8>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Takes the next USN inside `tx`. The counter row stays locked until `tx` ends, so
/// USNs commit in order.
pub(crate) async fn next_usn(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<i64> {
    let row = sqlx::query("UPDATE usn_counter SET value = value + 1 WHERE id = 1 RETURNING value")
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("value")?)
}

/// The kinds of names in the directory, each with its table of tombstones.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    User,
    Room,
}

/// Records that `name` (of `kind`, homed on `cluster`'s `node`) left the directory,
/// under `usn`, so that peers learn of it; replaces an older tombstone of the name.
pub(crate) async fn bury(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: Kind,
    name: &str,
    cluster: &str,
    node: &str,
    usn: i64,
) -> Result<()> {
    let (table, key) = match kind {
        Kind::User => ("user_tombstones", "username"),
        Kind::Room => ("room_tombstones", "name"),
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {table} ({key}, home_cluster, home_node, usn, deleted_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT ({key}) DO UPDATE SET home_cluster = excluded.home_cluster,
             home_node = excluded.home_node, usn = excluded.usn, deleted_at = excluded.deleted_at"
    )))
    .bind(name)
    .bind(cluster)
    .bind(node)
    .bind(usn)
    .bind(now_unix())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const PRUNED_BELOW: &str = "tombstones_pruned_below";

impl Store {
    /// The last USN handed out (0 when nothing ever changed).
    pub async fn current_usn(&self) -> Result<i64> {
        let row = sqlx::query("SELECT value FROM usn_counter WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// A page of the directory in USN order.
    ///
    /// `since_usn` 0 is a full listing (live users only); above 0 it lists the changes
    /// after that USN, tombstones included, and fails with [`StoreError::UsnTooOld`] when
    /// tombstones it would need were pruned. `snapshot_usn` is `None` for a first page;
    /// later pages pass the page's `snapshot_usn` and the last entry's USN as
    /// `after_usn`, so every page belongs to the same snapshot. With `rooms`, the
    /// listing holds the rooms homed here too (and their tombstones), in the same USN
    /// order.
    pub async fn directory_page(
        &self,
        since_usn: i64,
        after_usn: Option<i64>,
        snapshot_usn: Option<i64>,
        limit: u32,
        rooms: bool,
    ) -> Result<DirectoryPage> {
        let _timer = self.latency.start("directory_page");
        if since_usn > 0 {
            let row = sqlx::query("SELECT value FROM directory_state WHERE name = $1")
                .bind(PRUNED_BELOW)
                .fetch_one(&self.pool)
                .await?;
            let pruned_below: i64 = row.try_get("value")?;
            if since_usn < pruned_below {
                return Err(StoreError::UsnTooOld {
                    since: since_usn,
                    pruned_below,
                });
            }
        }
        // Read the snapshot before the rows: a USN the counter shows was committed, and
        // so were all smaller ones.
        let snapshot = match snapshot_usn {
            Some(s) => s,
            None => self.current_usn().await?,
        };
        let lower = after_usn.unwrap_or(since_usn).max(since_usn);
        let limit = i64::from(limit.max(1));
        let mut parts = vec![
            "SELECT 0 AS kind, username AS name, home_cluster, home_node, usn, 0 AS created_at,
                 0 AS deleted FROM users WHERE usn > $1 AND usn <= $2",
        ];
        if since_usn > 0 {
            parts.push(
                "SELECT 0, username, home_cluster, home_node, usn, 0, 1 FROM user_tombstones
                 WHERE usn > $1 AND usn <= $2",
            );
        }
        if rooms {
            parts.push(
                "SELECT 1, name, home_cluster, home_node, usn, created_at, 0 FROM room_directory
                 WHERE usn > $1 AND usn <= $2",
            );
            if since_usn > 0 {
                parts.push(
                    "SELECT 1, name, home_cluster, home_node, usn, 0, 1 FROM room_tombstones
                     WHERE usn > $1 AND usn <= $2",
                );
            }
        }
        let sql = format!("{} ORDER BY usn LIMIT $3", parts.join(" UNION ALL "));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lower)
            .bind(snapshot)
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let more = rows.len() as i64 > limit;
        let (mut entries, mut room_entries) = (vec![], vec![]);
        for row in rows.iter().take(limit as usize) {
            let deleted = row.try_get::<i32, _>("deleted")? != 0;
            if row.try_get::<i32, _>("kind")? == 1 {
                room_entries.push(room_entry(row, deleted)?);
            } else {
                entries.push(DirectoryEntry {
                    username: row.try_get("name")?,
                    home_cluster: row.try_get("home_cluster")?,
                    home_node: row.try_get("home_node")?,
                    usn: row.try_get("usn")?,
                    deleted,
                });
            }
        }
        Ok(DirectoryPage {
            entries,
            rooms: room_entries,
            snapshot_usn: snapshot,
            more,
        })
    }

    /// Removes tombstones of users and rooms deleted before `before_unix`; peers
    /// further behind than the newest pruned tombstone must then do a full sync.
    /// Returns how many went.
    pub async fn prune_tombstones(&self, before_unix: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let row = sqlx::query(
            "SELECT MAX(usn) AS m FROM (
                 SELECT usn FROM user_tombstones WHERE deleted_at < $1
                 UNION ALL SELECT usn FROM room_tombstones WHERE deleted_at < $1) t",
        )
        .bind(before_unix)
        .fetch_one(&mut *tx)
        .await?;
        let Some(max_usn) = row.try_get::<Option<i64>, _>("m")? else {
            return Ok(0);
        };
        let mut gone = 0;
        for table in ["user_tombstones", "room_tombstones"] {
            gone += sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE usn <= $1"
            )))
            .bind(max_usn)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query(
            "UPDATE directory_state SET value = CASE WHEN value > $1 THEN value ELSE $1 END
             WHERE name = $2",
        )
        .bind(max_usn)
        .bind(PRUNED_BELOW)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(gone)
    }

    /// Creates or replaces an intercluster application user.
    pub async fn set_axl_user(
        &self,
        username: &str,
        scram_sha256: &crate::scram::ScramVerifier,
        opaque_record: &[u8],
    ) -> Result<()> {
        use base64::Engine as _;
        let now = now_unix();
        sqlx::query(
            "INSERT INTO axl_users (username, scram_sha256, opaque_record, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (username) DO UPDATE SET scram_sha256 = excluded.scram_sha256,
                 opaque_record = excluded.opaque_record, updated_at = excluded.updated_at",
        )
        .bind(username)
        .bind(scram_sha256.encode())
        .bind(base64::engine::general_purpose::STANDARD.encode(opaque_record))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One intercluster application user, or `None`.
    pub async fn axl_user(&self, username: &str) -> Result<Option<AxlUser>> {
        let row = sqlx::query(
            "SELECT username, scram_sha256, opaque_record, created_at, updated_at
             FROM axl_users WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| axl_user_from_row(&row)).transpose()
    }

    /// Every intercluster application user, by name.
    pub async fn axl_users(&self) -> Result<Vec<AxlUser>> {
        let rows = sqlx::query(
            "SELECT username, scram_sha256, opaque_record, created_at, updated_at
             FROM axl_users ORDER BY username",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(axl_user_from_row).collect()
    }

    /// Deletes an intercluster application user; false when there was none.
    pub async fn delete_axl_user(&self, username: &str) -> Result<bool> {
        let result = sqlx::query("DELETE FROM axl_users WHERE username = $1")
            .bind(username)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The cluster secret `name`, created from `make` the first time it is asked for.
    /// Every node of the cluster gets the same value, even when two ask at once.
    pub async fn cluster_secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let select = "SELECT value FROM cluster_secrets WHERE name = $1";
        if let Some(row) = sqlx::query(select)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
        {
            let text: String = row.try_get("value")?;
            return engine
                .decode(text)
                .map_err(|_| StoreError::Corrupt(format!("cluster secret {name}")));
        }
        sqlx::query(
            "INSERT INTO cluster_secrets (name, value, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(engine.encode(make()))
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(select).bind(name).fetch_one(&self.pool).await?;
        let text: String = row.try_get("value")?;
        engine
            .decode(text)
            .map_err(|_| StoreError::Corrupt(format!("cluster secret {name}")))
    }
}

fn axl_user_from_row(row: &sqlx::any::AnyRow) -> Result<AxlUser> {
    use base64::Engine as _;
    let username: String = row.try_get("username")?;
    let scram: String = row.try_get("scram_sha256")?;
    let record: String = row.try_get("opaque_record")?;
    let corrupt = || StoreError::Corrupt(format!("axl user {username}"));
    Ok(AxlUser {
        scram_sha256: crate::scram::ScramVerifier::decode(crate::scram::ScramHash::Sha256, &scram)
            .ok_or_else(corrupt)?,
        opaque_record: base64::engine::general_purpose::STANDARD
            .decode(record)
            .map_err(|_| corrupt())?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        username,
    })
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn user(name: &str) -> NewUser<'_> {
        NewUser {
            username: name,
            password: "pw",
            home_cluster: "cluster-a",
            home_node: "node1",
        }
    }

    /// Reads a whole listing page by page, as a peer would.
    async fn read_all(store: &Store, since: i64, page: u32) -> (Vec<DirectoryEntry>, i64) {
        let (mut all, mut after, mut snapshot) = (vec![], None, None);
        loop {
            let p = store
                .directory_page(since, after, snapshot, page, false)
                .await
                .unwrap();
            after = p.entries.last().map(|e| e.usn).or(after);
            snapshot = Some(p.snapshot_usn);
            all.extend(p.entries);
            if !p.more {
                return (all, p.snapshot_usn);
            }
        }
    }

    #[tokio::test]
    async fn changes_get_increasing_usns_and_deletions_leave_tombstones() {
        for (store, _dir) in stores().await {
            assert_eq!(store.current_usn().await.unwrap(), 0);
            for name in ["alice", "bob", "carol", "dave", "erin"] {
                store.add_user(user(name)).await.unwrap();
            }
            assert_eq!(store.current_usn().await.unwrap(), 5);
            // A failed change takes no USN.
            assert!(store.add_user(user("alice")).await.is_err());
            assert!(store.delete_user("nobody").await.is_err());
            assert_eq!(store.current_usn().await.unwrap(), 5);

            let (full, snap) = read_all(&store, 0, 2).await;
            assert_eq!(snap, 5);
            let names: Vec<_> = full.iter().map(|e| e.username.as_str()).collect();
            assert_eq!(names, ["alice", "bob", "carol", "dave", "erin"]);
            assert!(full.windows(2).all(|w| w[0].usn < w[1].usn));

            store.delete_user("bob").await.unwrap();
            store.set_home("carol", "cluster-a", "node2").await.unwrap();
            let (changes, snap) = read_all(&store, 5, 1).await;
            assert_eq!(snap, 7);
            assert_eq!(changes.len(), 2);
            assert_eq!(
                (
                    changes[0].username.as_str(),
                    changes[0].deleted,
                    changes[0].usn
                ),
                ("bob", true, 6)
            );
            assert_eq!(
                (changes[1].username.as_str(), changes[1].home_node.as_str()),
                ("carol", "node2")
            );
            // A full listing has no tombstones.
            let (full, _) = read_all(&store, 0, 100).await;
            assert_eq!(full.len(), 4);
            assert!(full.iter().all(|e| !e.deleted));
            // Re-creating a user removes its tombstone.
            store.add_user(user("bob")).await.unwrap();
            let (changes, _) = read_all(&store, 5, 100).await;
            assert_eq!(changes.iter().filter(|e| e.username == "bob").count(), 1);
            assert!(changes.iter().all(|e| !e.deleted));
        }
    }

    #[tokio::test]
    async fn a_page_sequence_keeps_its_snapshot() {
        for (store, _dir) in stores().await {
            for name in ["a", "b", "c"] {
                store.add_user(user(name)).await.unwrap();
            }
            let first = store.directory_page(0, None, None, 2, false).await.unwrap();
            assert!(first.more);
            // A change after the first page is not in this listing; the next one sees it.
            store.add_user(user("d")).await.unwrap();
            let second = store
                .directory_page(
                    0,
                    Some(first.entries[1].usn),
                    Some(first.snapshot_usn),
                    2,
                    false,
                )
                .await
                .unwrap();
            assert!(!second.more);
            assert_eq!(second.entries.len(), 1);
            let (changes, snap) = read_all(&store, first.snapshot_usn, 10).await;
            assert_eq!((changes.len(), snap), (1, 4));
        }
    }

    #[tokio::test]
    async fn pruned_tombstones_force_a_full_sync() {
        for (store, _dir) in stores().await {
            for name in ["a", "b", "c"] {
                store.add_user(user(name)).await.unwrap();
            }
            store.delete_user("a").await.unwrap();
            assert_eq!(store.prune_tombstones(now_unix() + 1).await.unwrap(), 1);
            assert!(matches!(
                store.directory_page(2, None, None, 10, false).await,
                Err(StoreError::UsnTooOld {
                    since: 2,
                    pruned_below: 4
                })
            ));
            assert!(store.directory_page(4, None, None, 10, false).await.is_ok());
            assert!(store.directory_page(0, None, None, 10, false).await.is_ok());
            assert_eq!(store.prune_tombstones(now_unix() + 1).await.unwrap(), 0);
        }
    }

    #[tokio::test]
    async fn axl_users_and_cluster_secrets() {
        for (store, _dir) in stores().await {
            let v = scram::ScramVerifier::new(scram::ScramHash::Sha256, "pw", 4096).unwrap();
            store.set_axl_user("icsync", &v, b"record-1").await.unwrap();
            store.set_axl_user("icsync", &v, b"record-2").await.unwrap();
            let u = store.axl_user("icsync").await.unwrap().unwrap();
            assert_eq!(u.opaque_record, b"record-2");
            assert!(u.scram_sha256.verify_password("pw"));
            assert_eq!(store.axl_users().await.unwrap().len(), 1);
            assert!(store.delete_axl_user("icsync").await.unwrap());
            assert!(!store.delete_axl_user("icsync").await.unwrap());
            let first = store.cluster_secret("s", || vec![1, 2, 3]).await.unwrap();
            let again = store.cluster_secret("s", || vec![9]).await.unwrap();
            assert_eq!((first, again), (vec![1, 2, 3], vec![1, 2, 3]));
        }
    }
}
