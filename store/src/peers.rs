//! Intercluster peers: who they are, the credentials of each peering, the directory
//! of their users, and where each peer's sync stands. Every page of a sync is applied
//! in one transaction together with the position it reached, so a crash leaves the
//! previous consistent state and the sync resumes where it stopped.

use sqlx::Row as _;

use crate::directory::DirectoryEntry;
use crate::room_directory::RoomEntry;
use crate::{Backend, ClusterName, NodeName, Result, Store, StoreError, UserName, now_unix};

/// Whether we sync from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Our admin added or accepted it: we sync from it and trust its users.
    Active,
    /// It added us; our admin has not accepted it yet. Nothing is synced from it.
    Pending,
    /// It removed this cluster (it told us so): nothing is synced from it, its users
    /// are gone from the directory; kept so that admins see it, until `peer del`.
    Removed,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Active => "active",
            PeerState::Pending => "pending",
            PeerState::Removed => "removed",
        }
    }
}

/// A peer cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    pub cluster: ClusterName,
    /// host:port of its AXL endpoint.
    pub address: String,
    /// The TLS server name to ask for.
    pub server_name: String,
    pub state: PeerState,
    /// True when our admin added it, false when it added us.
    pub added_here: bool,
    /// The credential we call it with (it issued it to us).
    pub our_token: Option<String>,
    /// SHA-256 (hex) of the credential it calls us with (we issued it).
    pub their_token_hash: Option<String>,
    pub added_at: i64,
    pub accepted_at: Option<i64>,
}

/// Where a peer's sync stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerSync {
    /// Every change up to this USN of the peer is in our directory.
    pub applied_usn: i64,
    pub full_gen: i64,
    /// A full listing in progress: its snapshot and the last USN applied from it.
    pub full_snapshot_usn: Option<i64>,
    pub full_after_usn: Option<i64>,
    pub last_full_at: Option<i64>,
    pub last_full_usn: Option<i64>,
    pub last_full_ms: Option<i64>,
    pub last_full_users: Option<i64>,
    pub last_incr_at: Option<i64>,
    pub last_incr_usn: Option<i64>,
    pub last_incr_ms: Option<i64>,
    pub last_incr_changes: Option<i64>,
    /// Whether the applied USN covers the peer's rooms too (both announced `rooms`).
    pub rooms: bool,
}

/// A user homed in a peer cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RemoteUser {
    /// The peer that announced it.
    pub peer: ClusterName,
    pub username: UserName,
    pub home_cluster: ClusterName,
    pub home_node: NodeName,
    pub usn: i64,
}

/// A user name homed in more than one cluster (here and at a peer, or at two peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateUser {
    pub user: UserName,
    /// Every home claimed for it, as (cluster, node), sorted.
    pub homes: Vec<(ClusterName, NodeName)>,
}

/// The `home_cluster` and `home_node` of a row.
fn home_of_row(row: &sqlx::any::AnyRow) -> Result<(ClusterName, NodeName)> {
    Ok((
        ClusterName::new(row.try_get::<String, _>("home_cluster")?),
        NodeName::new(row.try_get::<String, _>("home_node")?),
    ))
}

/// Where a user name lives, as [`Store::home_of`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Home {
    /// An account of this cluster, homed on `node`.
    Local {
        cluster: ClusterName,
        node: NodeName,
    },
    /// Homed on `node` of the peer cluster `cluster` (the only claim).
    Remote {
        cluster: ClusterName,
        node: NodeName,
    },
    /// Claimed by two or more peers (sorted): routed to none of them.
    Quarantined { clusters: Vec<ClusterName> },
    /// Nobody has this name.
    Unknown,
}

impl Home {
    /// The cluster the user is homed in, when there is exactly one.
    pub fn cluster(&self) -> Option<&ClusterName> {
        match self {
            Home::Local { cluster, .. } | Home::Remote { cluster, .. } => Some(cluster),
            Home::Quarantined { .. } | Home::Unknown => None,
        }
    }
}

/// A summary of a directory slice for anti-entropy: equal digests at the same USN mean
/// equal slices.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Digest {
    /// The USN the digest is valid at.
    pub usn: i64,
    pub count: i64,
    /// SHA-256, hex.
    pub sha256: String,
    /// The rooms' count and SHA-256, when asked for.
    pub rooms: Option<(i64, String)>,
}

/// Count and SHA-256 (hex) over every (name, home cluster, home node, USN) of `rows`,
/// whose name column is `name`, in the names' byte order. Sorted here, not by an
/// `ORDER BY` that would follow PostgreSQL's collation (which may skip punctuation),
/// so that a cluster on SQLite and one on PostgreSQL agree.
fn digest_of(rows: &[sqlx::any::AnyRow], name: &str) -> Result<(i64, String)> {
    let lines = rows
        .iter()
        .map(|row| {
            let name: String = row.try_get(name)?;
            let cluster: String = row.try_get("home_cluster")?;
            let node: String = row.try_get("home_node")?;
            let usn: i64 = row.try_get("usn")?;
            Ok(format!("{name}\0{cluster}\0{node}\0{usn}\n"))
        })
        .collect::<Result<Vec<String>>>()?;
    Ok(digest_lines(lines))
}

/// Count and SHA-256 (hex) of digest lines, in byte order whatever order they come in.
fn digest_lines(mut lines: Vec<String>) -> (i64, String) {
    use sha2::Digest as _;
    // Names are unique and end at the first NUL: the lines sort as the names do.
    lines.sort_unstable();
    let mut hash = sha2::Sha256::new();
    for line in &lines {
        hash.update(line.as_bytes());
    }
    let hex = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (lines.len() as i64, hex)
}

impl Digest {
    fn of(
        usn: i64,
        users: &[sqlx::any::AnyRow],
        rooms: Option<&[sqlx::any::AnyRow]>,
    ) -> Result<Digest> {
        let (count, sha256) = digest_of(users, "username")?;
        Ok(Digest {
            usn,
            count,
            sha256,
            rooms: rooms.map(|r| digest_of(r, "name")).transpose()?,
        })
    }
}

const PEER_COLUMNS: &str = "cluster, address, server_name, state, origin, our_token, \
                            their_token_hash, added_at, accepted_at";

fn peer_from_row(row: &sqlx::any::AnyRow) -> Result<PeerRecord> {
    let cluster: String = row.try_get("cluster")?;
    let state: String = row.try_get("state")?;
    let origin: String = row.try_get("origin")?;
    Ok(PeerRecord {
        state: match state.as_str() {
            "active" => PeerState::Active,
            "pending" => PeerState::Pending,
            "removed" => PeerState::Removed,
            _ => return Err(StoreError::Corrupt(format!("state of peer {cluster}"))),
        },
        added_here: origin == "local",
        address: row.try_get("address")?,
        server_name: row.try_get("server_name")?,
        our_token: row.try_get("our_token")?,
        their_token_hash: row.try_get("their_token_hash")?,
        added_at: row.try_get("added_at")?,
        accepted_at: row.try_get("accepted_at")?,
        cluster: cluster.into(),
    })
}

/// Rows per multi-row statement (at most 6 parameters each: well under SQLite's and
/// PostgreSQL's limits).
const ROWS_PER_STATEMENT: usize = 500;

/// Writes the placeholders of `rows` rows of `width` parameters each, numbered from
/// `first`: `(?, ?), (?, ?)` on SQLite, `($1, $2), ($3, $4)` on PostgreSQL. SQLite gets
/// anonymous ones because looking up a numbered parameter's name is linear in the
/// number of parameters, which made a 3,000-parameter statement spend most of its time
/// binding (sqlx asks for every parameter's name).
fn placeholders(backend: Backend, first: usize, rows: usize, width: usize) -> String {
    let mut out = String::with_capacity(rows * width * 6);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        if width > 1 {
            out.push('(');
        }
        for col in 0..width {
            if col > 0 {
                out.push_str(", ");
            }
            match backend {
                Backend::Sqlite => out.push('?'),
                Backend::Postgres => {
                    out.push('$');
                    out.push_str(&(first + row * width + col).to_string());
                }
            }
        }
        if width > 1 {
            out.push(')');
        }
    }
    out
}

/// Applies entries with one statement per 500 rows: deletions for tombstones, one
/// multi-row upsert per run of users with the same home for the rest. Short
/// statements keep the write lock briefly, which matters when many peers sync into
/// one SQLite file.
async fn upsert_entries(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    peer: &str,
    generation: i64,
    entries: &[DirectoryEntry],
) -> Result<()> {
    let (gone, live): (Vec<&DirectoryEntry>, Vec<&DirectoryEntry>) =
        entries.iter().partition(|e| e.deleted);
    for chunk in gone.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "DELETE FROM remote_users WHERE peer = {} AND username IN ({})",
            placeholders(backend, 1, 1, 1),
            placeholders(backend, 2, chunk.len(), 1)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(peer);
        for e in chunk {
            query = query.bind(&e.username);
        }
        query.execute(&mut **tx).await?;
    }
    // Runs of users with the same home share one statement with the peer, home and
    // generation bound once: two parameters a row instead of six.
    let mut rest = live.as_slice();
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take(ROWS_PER_STATEMENT)
            .take_while(|e| e.home_cluster == first.home_cluster && e.home_node == first.home_node)
            .count();
        let (chunk, tail) = rest.split_at(run);
        rest = tail;
        // The four shared values come first; SQLite names the VALUES columns itself.
        let (head, first_row_param, alias) = match backend {
            Backend::Sqlite => ("?, column1, ?, ?, column2, ?", 1, ""),
            Backend::Postgres => ("$1, v.u, $2, $3, v.s, $4", 5, " AS v(u, s)"),
        };
        let rows = placeholders(backend, first_row_param, chunk.len(), 2);
        let sql = format!(
            "INSERT INTO remote_users (peer, username, home_cluster, home_node, usn, full_gen)
             SELECT {head} FROM (VALUES {rows}){alias} WHERE true
             ON CONFLICT (peer, username) DO UPDATE SET home_cluster = excluded.home_cluster,
                 home_node = excluded.home_node, usn = excluded.usn, full_gen = excluded.full_gen"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(peer)
            .bind(&first.home_cluster)
            .bind(&first.home_node)
            .bind(generation);
        for e in chunk {
            query = query.bind(&e.username).bind(e.usn);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Applies room entries: rooms are few (at most a node's `max_rooms` each), so one
/// statement a room.
async fn upsert_rooms(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    peer: &str,
    generation: i64,
    rooms: &[RoomEntry],
) -> Result<()> {
    for r in rooms {
        if r.deleted {
            sqlx::query("DELETE FROM remote_rooms WHERE peer = $1 AND name = $2")
                .bind(peer)
                .bind(&r.name)
                .execute(&mut **tx)
                .await?;
            continue;
        }
        sqlx::query(
            "INSERT INTO remote_rooms (peer, name, home_cluster, home_node, created_at, usn, full_gen)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (peer, name) DO UPDATE SET home_cluster = excluded.home_cluster,
                 home_node = excluded.home_node, created_at = excluded.created_at,
                 usn = excluded.usn, full_gen = excluded.full_gen",
        )
        .bind(peer)
        .bind(&r.name)
        .bind(&r.home_cluster)
        .bind(&r.home_node)
        .bind(r.created_at)
        .bind(r.usn)
        .bind(generation)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Creates a peer, or updates its address, credentials and (never downgrading an
    /// accepted peer) state.
    pub async fn upsert_peer(&self, peer: &PeerRecord) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO peers (cluster, address, server_name, state, origin, our_token,
                 their_token_hash, added_at, accepted_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (cluster) DO UPDATE SET address = excluded.address,
                 server_name = excluded.server_name,
                 our_token = COALESCE(excluded.our_token, peers.our_token),
                 their_token_hash = COALESCE(excluded.their_token_hash, peers.their_token_hash),
                 state = CASE WHEN peers.state = 'active' THEN 'active' ELSE excluded.state END,
                 origin = CASE WHEN peers.origin = 'local' THEN 'local' ELSE excluded.origin END,
                 accepted_at = COALESCE(peers.accepted_at, excluded.accepted_at)",
        )
        .bind(&peer.cluster)
        .bind(&peer.address)
        .bind(&peer.server_name)
        .bind(peer.state.as_str())
        .bind(if peer.added_here { "local" } else { "remote" })
        .bind(&peer.our_token)
        .bind(&peer.their_token_hash)
        .bind(peer.added_at)
        .bind(peer.accepted_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO peer_sync (peer) VALUES ($1) ON CONFLICT (peer) DO NOTHING")
            .bind(&peer.cluster)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One peer, or `None`.
    pub async fn peer(&self, cluster: &str) -> Result<Option<PeerRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PEER_COLUMNS} FROM peers WHERE cluster = $1"
        )))
        .bind(cluster)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| peer_from_row(&r)).transpose()
    }

    /// Every peer, by name.
    pub async fn peers(&self) -> Result<Vec<PeerRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PEER_COLUMNS} FROM peers ORDER BY cluster"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(peer_from_row).collect()
    }

    /// Makes a pending peer active; false when there is no such peer.
    pub async fn accept_peer(&self, cluster: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE peers SET state = 'active', accepted_at = COALESCE(accepted_at, $1)
             WHERE cluster = $2",
        )
        .bind(now_unix())
        .bind(cluster)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Removes a peer with its users, its sync state and its pinned certificates, in
    /// one transaction; false when there was none.
    pub async fn delete_peer(&self, cluster: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        for sql in [
            "DELETE FROM remote_users WHERE peer = $1",
            "DELETE FROM peer_sync WHERE peer = $1",
            "DELETE FROM trust_entries WHERE peer = $1 AND kind = 'pinned'",
        ] {
            sqlx::query(sql).bind(cluster).execute(&mut *tx).await?;
        }
        let gone = sqlx::query("DELETE FROM peers WHERE cluster = $1")
            .bind(cluster)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        tx.commit().await?;
        self.directory_changed();
        Ok(gone)
    }

    /// Marks a peer as having removed this cluster: its users leave the directory at
    /// once (they are no longer reachable), the record stays, as `removed`, for the
    /// admins to see. False when there is no such peer.
    pub async fn mark_peer_removed(&self, cluster: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let found = sqlx::query("UPDATE peers SET state = 'removed' WHERE cluster = $1")
            .bind(cluster)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if found {
            sqlx::query("DELETE FROM remote_users WHERE peer = $1")
                .bind(cluster)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE peer_sync SET applied_usn = 0, full_snapshot_usn = NULL,
                     full_after_usn = NULL WHERE peer = $1",
            )
            .bind(cluster)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.directory_changed();
        Ok(found)
    }

    /// Where a peer's sync stands (defaults when it never ran).
    pub async fn peer_sync(&self, cluster: &str) -> Result<PeerSync> {
        let row = sqlx::query(
            "SELECT applied_usn, full_gen, full_snapshot_usn, full_after_usn, last_full_at,
                 last_full_usn, last_full_ms, last_full_users, last_incr_at, last_incr_usn,
                 last_incr_ms, last_incr_changes, rooms
             FROM peer_sync WHERE peer = $1",
        )
        .bind(cluster)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(PeerSync::default());
        };
        Ok(PeerSync {
            applied_usn: row.try_get("applied_usn")?,
            full_gen: row.try_get("full_gen")?,
            full_snapshot_usn: row.try_get("full_snapshot_usn")?,
            full_after_usn: row.try_get("full_after_usn")?,
            last_full_at: row.try_get("last_full_at")?,
            last_full_usn: row.try_get("last_full_usn")?,
            last_full_ms: row.try_get("last_full_ms")?,
            last_full_users: row.try_get("last_full_users")?,
            last_incr_at: row.try_get("last_incr_at")?,
            last_incr_usn: row.try_get("last_incr_usn")?,
            last_incr_ms: row.try_get("last_incr_ms")?,
            last_incr_changes: row.try_get("last_incr_changes")?,
            rooms: row.try_get::<i64, _>("rooms")? != 0,
        })
    }

    /// Starts (or restarts) a full sync of `peer` at `snapshot_usn`; returns its
    /// generation. Nothing in the directory changes yet.
    pub async fn begin_full_sync(&self, peer: &str, snapshot_usn: i64) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE peer_sync SET full_gen = full_gen + 1, full_snapshot_usn = $1,
                 full_after_usn = 0 WHERE peer = $2 RETURNING full_gen",
        )
        .bind(snapshot_usn)
        .bind(peer)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(r.try_get("full_gen")?),
            None => Err(StoreError::Corrupt(format!(
                "no sync state for peer {peer}"
            ))),
        }
    }

    /// Makes the next sync of `peer` a full one that lists its rooms too, or not: when
    /// both sides come to announce `rooms` (or one stops), the applied USN no longer
    /// says what we have of the peer's rooms.
    pub async fn resync_with_rooms(&self, peer: &str, rooms: bool) -> Result<()> {
        sqlx::query(
            "UPDATE peer_sync SET applied_usn = 0, full_snapshot_usn = NULL,
                 full_after_usn = NULL, full_gen = full_gen + 1, rooms = $1 WHERE peer = $2",
        )
        .bind(i64::from(rooms))
        .bind(peer)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes the next sync of `peer` a full one (Force Sync); the directory keeps the
    /// peer's users until that full sync replaces them.
    pub async fn restart_full_sync(&self, peer: &str) -> Result<()> {
        sqlx::query(
            "UPDATE peer_sync SET applied_usn = 0, full_snapshot_usn = NULL,
                 full_after_usn = NULL WHERE peer = $1",
        )
        .bind(peer)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Applies one page of a full listing, and the position it reached, atomically.
    pub async fn apply_full_page(
        &self,
        peer: &str,
        generation: i64,
        entries: &[DirectoryEntry],
        rooms: &[RoomEntry],
        after_usn: i64,
    ) -> Result<()> {
        let _timer = self.latency.start("apply_full_page");
        let mut tx = self.write().await?;
        upsert_entries(&mut tx, self.backend, peer, generation, entries).await?;
        upsert_rooms(&mut tx, peer, generation, rooms).await?;
        sqlx::query("UPDATE peer_sync SET full_after_usn = $1 WHERE peer = $2 AND full_gen = $3")
            .bind(after_usn)
            .bind(peer)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.directory_changed();
        Ok(())
    }

    /// Ends a full sync: the users it did not see are removed, and the peer counts as
    /// synced up to the listing's snapshot.
    pub async fn finish_full_sync(
        &self,
        peer: &str,
        generation: i64,
        snapshot_usn: i64,
        millis: i64,
    ) -> Result<i64> {
        let mut tx = self.write().await?;
        for table in ["remote_users", "remote_rooms"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE peer = $1 AND full_gen < $2"
            )))
            .bind(peer)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        }
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM remote_users WHERE peer = $1")
            .bind(peer)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        // Only the listing of this generation ends here: a late finish of an older one
        // (a task cancelled while this write was under way) leaves a newer listing be.
        sqlx::query(
            "UPDATE peer_sync SET applied_usn = $1, full_snapshot_usn = NULL, full_after_usn = NULL,
                 last_full_at = $2, last_full_usn = $1, last_full_ms = $3, last_full_users = $4
             WHERE peer = $5 AND full_gen = $6",
        )
        .bind(snapshot_usn)
        .bind(now_unix())
        .bind(millis)
        .bind(count)
        .bind(peer)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.directory_changed();
        Ok(count)
    }

    /// Applies one page of changes and moves the applied USN to `applied_usn`,
    /// atomically.
    pub async fn apply_changes(
        &self,
        peer: &str,
        entries: &[DirectoryEntry],
        rooms: &[RoomEntry],
        applied_usn: i64,
    ) -> Result<()> {
        let _timer = self.latency.start("apply_changes");
        let mut tx = self.write().await?;
        let generation: i64 = sqlx::query("SELECT full_gen FROM peer_sync WHERE peer = $1")
            .bind(peer)
            .fetch_one(&mut *tx)
            .await?
            .try_get("full_gen")?;
        upsert_entries(&mut tx, self.backend, peer, generation, entries).await?;
        upsert_rooms(&mut tx, peer, generation, rooms).await?;
        sqlx::query("UPDATE peer_sync SET applied_usn = $1 WHERE peer = $2 AND applied_usn < $1")
            .bind(applied_usn)
            .bind(peer)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.directory_changed();
        Ok(())
    }

    /// Records a completed incremental sync.
    pub async fn finish_incremental(
        &self,
        peer: &str,
        usn: i64,
        millis: i64,
        changes: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE peer_sync SET last_incr_at = $1, last_incr_usn = $2, last_incr_ms = $3,
                 last_incr_changes = $4 WHERE peer = $5",
        )
        .bind(now_unix())
        .bind(usn)
        .bind(millis)
        .bind(changes)
        .bind(peer)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many users a peer contributed to the directory.
    pub async fn remote_user_count(&self, peer: &str) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) AS n FROM remote_users WHERE peer = $1")
                .bind(peer)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?,
        )
    }

    /// User names homed in more than one cluster (here and at a peer, or at two peers),
    /// each with its homes as (cluster, node), sorted.
    pub async fn duplicate_users(&self) -> Result<Vec<DuplicateUser>> {
        let _timer = self.latency.start("duplicate_users");
        // Both halves of `dup` walk indexes (remote_users_username in order, the
        // users' primary key by lookup); nothing sorts the whole directory.
        let rows = sqlx::query(
            "WITH dup(username) AS (
                 SELECT username FROM remote_users GROUP BY username HAVING COUNT(*) > 1
                 UNION SELECT u.username FROM users u
                     WHERE EXISTS (SELECT 1 FROM remote_users r WHERE r.username = u.username)
             )
             SELECT username, home_cluster, home_node FROM users
                 WHERE username IN (SELECT username FROM dup)
             UNION ALL SELECT username, home_cluster, home_node FROM remote_users
                 WHERE username IN (SELECT username FROM dup)
             ORDER BY username, home_cluster, home_node",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<DuplicateUser> = vec![];
        for row in rows {
            let user = UserName::new(row.try_get::<String, _>("username")?);
            let home = home_of_row(&row)?;
            match out.last_mut() {
                Some(dup) if dup.user == user => dup.homes.push(home),
                _ => out.push(DuplicateUser {
                    user,
                    homes: vec![home],
                }),
            }
        }
        Ok(out)
    }

    /// The users of `peer`'s slice that another peer or this cluster also claims: what
    /// a full sync of `peer` may have made duplicates (one index probe per user).
    pub async fn claimed_elsewhere(&self, peer: &ClusterName) -> Result<Vec<UserName>> {
        let _timer = self.latency.start("claimed_elsewhere");
        let rows = sqlx::query(
            "SELECT r.username FROM remote_users r WHERE r.peer = $1 AND (
                 EXISTS (SELECT 1 FROM remote_users o
                         WHERE o.username = r.username AND o.peer <> r.peer)
                 OR EXISTS (SELECT 1 FROM users u WHERE u.username = r.username))",
        )
        .bind(peer.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(UserName::new(r.try_get::<String, _>("username")?)))
            .collect()
    }

    /// Of `names`, those homed in more than one cluster, as [`Store::duplicate_users`]
    /// gives them: the scoped check run after a sync or a local change.
    pub async fn duplicates_among(&self, names: &[UserName]) -> Result<Vec<DuplicateUser>> {
        let _timer = self.latency.start("duplicates_among");
        let mut homes: std::collections::BTreeMap<UserName, Vec<(ClusterName, NodeName)>> =
            Default::default();
        for chunk in names.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT username, home_cluster, home_node FROM users WHERE username IN ({})
                 UNION ALL SELECT username, home_cluster, home_node FROM remote_users
                     WHERE username IN ({})",
                placeholders(self.backend, 1, chunk.len(), 1),
                placeholders(self.backend, chunk.len() + 1, chunk.len(), 1)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for name in chunk.iter().chain(chunk) {
                query = query.bind(name.as_str());
            }
            for row in query.fetch_all(&self.pool).await? {
                homes
                    .entry(UserName::new(row.try_get::<String, _>("username")?))
                    .or_default()
                    .push(home_of_row(&row)?);
            }
        }
        Ok(homes
            .into_iter()
            .filter(|(_, h)| h.len() > 1)
            .map(|(user, mut homes)| {
                homes.sort();
                DuplicateUser { user, homes }
            })
            .collect())
    }

    /// Where a user of the domain lives, by the mesh-wide rule (docs/peering.md): an
    /// account of this cluster always wins over a peer's claim; a name that exactly one
    /// peer claims lives there; a name that two or more peers claim, and this cluster
    /// does not, is quarantined (routed to none of them) until every claim but one is
    /// withdrawn. The rule is decided here in Rust, not by an `ORDER BY` that would
    /// follow the database's collation, so SQLite and PostgreSQL agree.
    pub async fn home_of(&self, username: &str) -> Result<Home> {
        let _timer = self.latency.start("home_of");
        let rows = sqlx::query(
            "SELECT 1 AS here, home_cluster, home_node FROM users WHERE username = $1
             UNION ALL
             SELECT 0 AS here, home_cluster, home_node FROM remote_users WHERE username = $1",
        )
        .bind(username)
        .fetch_all(&self.pool)
        .await?;
        let mut remote = vec![];
        for row in &rows {
            let here: i32 = row.try_get("here")?;
            let cluster = ClusterName::new(row.try_get::<String, _>("home_cluster")?);
            let node = NodeName::new(row.try_get::<String, _>("home_node")?);
            if here == 1 {
                return Ok(Home::Local { cluster, node });
            }
            remote.push((cluster, node));
        }
        Ok(match remote.len() {
            0 => Home::Unknown,
            1 => {
                let (cluster, node) = remote.remove(0);
                Home::Remote { cluster, node }
            }
            _ => {
                let mut clusters: Vec<ClusterName> = remote.into_iter().map(|(c, _)| c).collect();
                clusters.sort();
                Home::Quarantined { clusters }
            }
        })
    }

    /// The digest of this cluster's live users (what a peer's copy must match), with
    /// the USN it is valid at: a count and SHA-256 over every (name, home cluster,
    /// home node, USN) in the byte order of the names; with `rooms`, the same over this cluster's rooms.
    pub async fn directory_digest(&self, rooms: bool) -> Result<Digest> {
        let _timer = self.latency.start("directory_digest");
        // The USN and the rows from one snapshot: no retry loop that a steady stream of
        // changes could keep going.
        let mut tx = self.snapshot().await?;
        let usn: i64 = sqlx::query("SELECT value FROM usn_counter WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("value")?;
        let rows = sqlx::query("SELECT username, home_cluster, home_node, usn FROM users")
            .fetch_all(&mut *tx)
            .await?;
        let room_rows = if rooms {
            Some(
                sqlx::query("SELECT name, home_cluster, home_node, usn FROM room_directory")
                    .fetch_all(&mut *tx)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Digest::of(usn, &rows, room_rows.as_deref())
    }

    /// The digest of the users a peer contributed, comparable with that peer's
    /// [`Store::directory_digest`] taken at our applied USN (with its rooms, when
    /// `rooms`).
    pub async fn peer_digest(&self, peer: &str, rooms: bool) -> Result<Digest> {
        let _timer = self.latency.start("peer_digest");
        // One snapshot for the USN and the rows (an apply may run meanwhile).
        let mut tx = self.snapshot().await?;
        let usn: i64 = sqlx::query("SELECT applied_usn FROM peer_sync WHERE peer = $1")
            .bind(peer)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get("applied_usn"))
            .transpose()?
            .unwrap_or(0);
        let rows = sqlx::query(
            "SELECT username, home_cluster, home_node, usn FROM remote_users WHERE peer = $1",
        )
        .bind(peer)
        .fetch_all(&mut *tx)
        .await?;
        let room_rows = if rooms {
            Some(
                sqlx::query(
                    "SELECT name, home_cluster, home_node, usn FROM remote_rooms WHERE peer = $1",
                )
                .bind(peer)
                .fetch_all(&mut *tx)
                .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Digest::of(usn, &rows, room_rows.as_deref())
    }

    /// Remembers the last good DNS answer for `name` (addresses as text).
    pub async fn remember_addresses(&self, name: &str, addresses: &[String]) -> Result<()> {
        sqlx::query(
            "INSERT INTO dns_cache (name, addresses, resolved_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET addresses = excluded.addresses,
                 resolved_at = excluded.resolved_at",
        )
        .bind(name)
        .bind(addresses.join(","))
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last good DNS answer for `name` and when it came, if any.
    pub async fn last_addresses(&self, name: &str) -> Result<Option<(Vec<String>, i64)>> {
        let row = sqlx::query("SELECT addresses, resolved_at FROM dns_cache WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let text: String = r.try_get("addresses")?;
            Ok((
                text.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                r.try_get("resolved_at")?,
            ))
        })
        .transpose()
    }

    /// The peers' entries for a user name (more than one: a duplicate).
    pub async fn remote_user(&self, username: &str) -> Result<Vec<RemoteUser>> {
        let _timer = self.latency.start("remote_user");
        let rows = sqlx::query(
            "SELECT peer, username, home_cluster, home_node, usn FROM remote_users
             WHERE username = $1 ORDER BY peer",
        )
        .bind(username)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RemoteUser {
                    peer: r.try_get("peer")?,
                    username: r.try_get("username")?,
                    home_cluster: r.try_get("home_cluster")?,
                    home_node: r.try_get("home_node")?,
                    usn: r.try_get("usn")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::stores;
    use crate::*;

    fn peer(name: &str, state: PeerState) -> PeerRecord {
        PeerRecord {
            cluster: name.into(),
            address: "127.0.0.1:8443".into(),
            server_name: "localhost".into(),
            state,
            added_here: state == PeerState::Active,
            our_token: Some("tok".into()),
            their_token_hash: None,
            added_at: 1,
            accepted_at: None,
        }
    }

    fn entry(name: &str, usn: i64, deleted: bool) -> DirectoryEntry {
        DirectoryEntry {
            username: name.into(),
            home_cluster: "b".into(),
            home_node: "b1".into(),
            usn,
            deleted,
        }
    }

    /// The digest does not follow the order rows come in (a database's collation):
    /// the names' byte order, the same on every backend.
    #[test]
    fn a_digest_is_taken_in_the_byte_order_of_the_names() {
        let line = |n: &str| format!("{n}\0a\0n1\01\n");
        let sorted = ["a-c", "a.b", "a_d", "ab"].map(line).to_vec();
        let mut collated = ["ab", "a.b", "a-c", "a_d"].map(line).to_vec();
        assert_eq!(
            super::digest_lines(collated.clone()),
            super::digest_lines(sorted)
        );
        collated.pop();
        assert_eq!(super::digest_lines(collated).0, 3);
    }

    #[tokio::test]
    async fn peers_are_added_accepted_and_never_downgraded() {
        for (store, _dir) in stores().await {
            store
                .upsert_peer(&peer("b", PeerState::Pending))
                .await
                .unwrap();
            assert_eq!(
                store.peer("b").await.unwrap().unwrap().state,
                PeerState::Pending
            );
            assert!(store.accept_peer("b").await.unwrap());
            // The peer calling again (as pending) does not undo the acceptance.
            store
                .upsert_peer(&peer("b", PeerState::Pending))
                .await
                .unwrap();
            let b = store.peer("b").await.unwrap().unwrap();
            assert_eq!(b.state, PeerState::Active);
            assert!(b.accepted_at.is_some());
            assert!(!store.accept_peer("nobody").await.unwrap());
            assert_eq!(store.peers().await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn a_page_with_several_homes_keeps_each_users_home() {
        for (store, _dir) in stores().await {
            store
                .upsert_peer(&peer("b", PeerState::Active))
                .await
                .unwrap();
            // Runs of homes, and a run longer than one statement.
            let entries: Vec<DirectoryEntry> = (0..1200)
                .map(|i| DirectoryEntry {
                    home_node: match i {
                        0..3 => "b1",
                        3..4 => "b2",
                        4..1100 => "b1",
                        _ => "b3",
                    }
                    .into(),
                    ..entry(&format!("u{i:04}"), i + 1, false)
                })
                .collect();
            let generation = store.begin_full_sync("b", 1200).await.unwrap();
            store
                .apply_full_page("b", generation, &entries, &[], 1200)
                .await
                .unwrap();
            assert_eq!(
                store
                    .finish_full_sync("b", generation, 1200, 1)
                    .await
                    .unwrap(),
                1200
            );
            for e in &entries {
                let users = store.remote_user(&e.username).await.unwrap();
                assert_eq!(
                    (users[0].home_node.as_str(), users[0].usn),
                    (e.home_node.as_str(), e.usn),
                    "{}",
                    e.username
                );
            }
        }
    }

    #[tokio::test]
    async fn a_full_sync_replaces_the_slice_and_changes_apply_atomically() {
        for (store, _dir) in stores().await {
            store
                .upsert_peer(&peer("b", PeerState::Active))
                .await
                .unwrap();
            // Old state: x and y.
            let generation = store.begin_full_sync("b", 2).await.unwrap();
            store
                .apply_full_page(
                    "b",
                    generation,
                    &[entry("x", 1, false), entry("y", 2, false)],
                    &[],
                    2,
                )
                .await
                .unwrap();
            assert_eq!(
                store.finish_full_sync("b", generation, 2, 5).await.unwrap(),
                2
            );
            // A new full sync sees only y and z: x goes at the end, not before.
            let generation = store.begin_full_sync("b", 9).await.unwrap();
            store
                .apply_full_page("b", generation, &[entry("y", 2, false)], &[], 2)
                .await
                .unwrap();
            assert_eq!(store.remote_user_count("b").await.unwrap(), 2);
            let state = store.peer_sync("b").await.unwrap();
            assert_eq!(
                (state.full_snapshot_usn, state.full_after_usn),
                (Some(9), Some(2))
            );
            store
                .apply_full_page("b", generation, &[entry("z", 9, false)], &[], 9)
                .await
                .unwrap();
            assert_eq!(
                store.finish_full_sync("b", generation, 9, 5).await.unwrap(),
                2
            );
            assert!(store.remote_user("x").await.unwrap().is_empty());
            let state = store.peer_sync("b").await.unwrap();
            assert_eq!(state.applied_usn, 9);
            assert_eq!(state.full_snapshot_usn, None);
            assert_eq!(state.last_full_users, Some(2));
            // Changes: a tombstone and a move.
            let mut moved = entry("z", 11, false);
            moved.home_node = "b2".into();
            let generation = store.directory_generation();
            store
                .apply_changes("b", &[entry("y", 10, true), moved], &[], 11)
                .await
                .unwrap();
            // Caches of directory lookups see that something moved.
            assert!(store.directory_generation() > generation);
            assert!(store.remote_user("y").await.unwrap().is_empty());
            assert_eq!(store.remote_user("z").await.unwrap()[0].home_node, "b2");
            assert_eq!(store.peer_sync("b").await.unwrap().applied_usn, 11);
            // A user homed here that the peer then claims too is a duplicate; the
            // local account wins.
            store
                .add_user(NewUser {
                    username: "w",
                    password: "pw",
                    home_cluster: "a",
                    home_node: "a1",
                })
                .await
                .unwrap();
            store
                .apply_changes("b", &[entry("w", 12, false)], &[], 12)
                .await
                .unwrap();
            let dups = store.duplicate_users().await.unwrap();
            assert_eq!(dups.len(), 1);
            assert_eq!(dups[0].user, "w");
            assert_eq!(
                dups[0].homes,
                [("a".into(), "a1".into()), ("b".into(), "b1".into())]
            );
            // The scoped checks find the same.
            assert_eq!(store.claimed_elsewhere(&"b".into()).await.unwrap(), ["w"]);
            let names = ["w".into(), "y".into(), "nobody".into()];
            assert_eq!(store.duplicates_among(&names).await.unwrap(), dups);
            assert!(store.duplicates_among(&[]).await.unwrap().is_empty());
            assert_eq!(
                store.home_of("w").await.unwrap(),
                Home::Local {
                    cluster: "a".into(),
                    node: "a1".into()
                }
            );
            assert_eq!(
                store.home_of("z").await.unwrap(),
                Home::Remote {
                    cluster: "b".into(),
                    node: "b2".into()
                }
            );
            assert_eq!(store.home_of("nobody").await.unwrap(), Home::Unknown);
            // A late finish of an older listing leaves a newer one in progress.
            let older = store.begin_full_sync("b", 20).await.unwrap();
            let newer = store.begin_full_sync("b", 21).await.unwrap();
            assert!(newer > older);
            store.finish_full_sync("b", older, 20, 1).await.unwrap();
            assert_eq!(
                store.peer_sync("b").await.unwrap().full_snapshot_usn,
                Some(21)
            );
            // Deleting the peer removes its users, state and pinned certificates.
            store
                .add_trust(&TrustEntry {
                    fingerprint: "AA".into(),
                    kind: TrustKind::Pinned,
                    subject: "CN=b".into(),
                    pem: "PEM".into(),
                    source: "exchanged".into(),
                    peer: Some("b".into()),
                    added_at: 0,
                })
                .await
                .unwrap();
            assert!(store.delete_peer("b").await.unwrap());
            assert_eq!(store.remote_user_count("b").await.unwrap(), 0);
            assert!(store.trust_entries().await.unwrap().is_empty());
            assert!(store.peer("b").await.unwrap().is_none());
        }
    }

    /// The mesh-wide rule: a local account wins over any claim whatever the names'
    /// order; one peer's claim routes there; two peers' claims are quarantined until one
    /// is withdrawn. Same answers on both backends (no collation involved).
    #[tokio::test]
    async fn a_local_account_wins_and_two_peer_claims_are_quarantined() {
        for (store, _dir) in stores().await {
            for p in ["0-first.example", "eu-west.example", "eu.example"] {
                store
                    .upsert_peer(&peer(p, PeerState::Active))
                    .await
                    .unwrap();
            }
            let claim = |cluster: &str, name: &str| DirectoryEntry {
                username: name.into(),
                home_cluster: cluster.into(),
                home_node: format!("n1.{cluster}").into(),
                usn: 1,
                deleted: false,
            };
            for p in ["0-first.example", "eu-west.example", "eu.example"] {
                store
                    .apply_changes(p, &[claim(p, "ceo")], &[], 1)
                    .await
                    .unwrap();
            }
            store
                .apply_changes("eu.example", &[claim("eu.example", "solo")], &[], 2)
                .await
                .unwrap();
            assert_eq!(
                store.home_of("ceo").await.unwrap(),
                Home::Quarantined {
                    clusters: vec![
                        "0-first.example".into(),
                        "eu-west.example".into(),
                        "eu.example".into()
                    ]
                }
            );
            assert_eq!(
                store.home_of("solo").await.unwrap(),
                Home::Remote {
                    cluster: "eu.example".into(),
                    node: "n1.eu.example".into()
                }
            );
            // A name a peer homes cannot be created here.
            let refused = store
                .add_user(NewUser {
                    username: "solo",
                    password: "pw",
                    home_cluster: "zz.example",
                    home_node: "n1.zz.example",
                })
                .await;
            assert!(
                matches!(&refused, Err(StoreError::HomedAtPeer { cluster, .. }) if cluster == "eu.example"),
                "{refused:?}"
            );
            // Our own account that peers claim later: ours, though "z…" sorts last.
            store
                .add_user(NewUser {
                    username: "boss",
                    password: "pw",
                    home_cluster: "zz.example",
                    home_node: "n1.zz.example",
                })
                .await
                .unwrap();
            for p in ["0-first.example", "eu.example"] {
                store
                    .apply_changes(p, &[claim(p, "boss")], &[], 2)
                    .await
                    .unwrap();
            }
            assert_eq!(
                store.home_of("boss").await.unwrap(),
                Home::Local {
                    cluster: "zz.example".into(),
                    node: "n1.zz.example".into()
                }
            );
            // Withdrawing all claims but one ends the quarantine.
            for p in ["0-first.example", "eu-west.example"] {
                let mut gone = claim(p, "ceo");
                gone.deleted = true;
                store.apply_changes(p, &[gone], &[], 3).await.unwrap();
            }
            assert_eq!(
                store.home_of("ceo").await.unwrap().cluster(),
                Some(&ClusterName::new("eu.example"))
            );
        }
    }
}
