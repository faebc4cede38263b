//! The directory of chat rooms: which cluster and node each room of the domain's chat
//! service lives on. A kind of its own beside users (room `team` does not block user
//! `team`), synced to peers in the same listing as users: each change to a room homed
//! here takes the next USN of the one counter, and a room that goes leaves a
//! tombstone, pruned with the users' (docs/muc.md, "Rooms across the mesh").
//!
//! Two clusters may create the same name before either has learnt of the other's
//! room. Every cluster then applies the same rule to the same entries: **the room
//! created first wins; at the same microsecond, the smaller cluster name**. The loser
//! sees it at its next sync and destroys its room, naming the winner as the venue.

use sqlx::Row as _;

use crate::directory::next_usn;
use crate::{AccountChange, ClusterName, NodeName, Result, Store};

/// One room (or tombstone) of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomEntry {
    /// The room's name: the localpart of its address at the chat service.
    pub name: String,
    pub home_cluster: ClusterName,
    pub home_node: NodeName,
    /// When the room was created (microseconds since the epoch; 0 in tombstones).
    pub created_at: i64,
    pub usn: i64,
    /// A tombstone: the room went at this USN.
    pub deleted: bool,
}

/// Where a room lives, by the rule of the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomHome {
    /// On a node of this cluster.
    Local { node: NodeName },
    /// On a node of a peer cluster.
    Remote {
        cluster: ClusterName,
        node: NodeName,
    },
    /// Nowhere: a new room of that name may be created.
    Unknown,
}

/// One claim on a room's name: (created_at, cluster, node).
type Claim = (i64, ClusterName, NodeName);

/// The claim that wins (the module doc's rule); `None` for no claim.
fn winner(mut claims: Vec<Claim>) -> Option<Claim> {
    claims.sort_by(|a, b| (a.0, a.1.as_str()).cmp(&(b.0, b.1.as_str())));
    claims.into_iter().next()
}

/// A room of this cluster that a peer's older claim outranks: it must go, and its
/// occupants be sent to the winner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRoom {
    pub name: String,
    /// The node here that homes it.
    pub node: NodeName,
    /// The cluster whose room of that name wins.
    pub winner: ClusterName,
}

impl Store {
    /// Claims `name` for a room homed on `node` of `cluster` (this cluster), created
    /// at `created_at` (microseconds). Returns where the room lives afterwards: here
    /// on `node` when the claim took (or the room already lived there), or the home
    /// that another node or a peer already holds (nothing changes then).
    pub async fn claim_room(
        &self,
        name: &str,
        cluster: &str,
        node: &str,
        created_at: i64,
    ) -> Result<RoomHome> {
        let mut tx = self.write().await?;
        let mine = sqlx::query("SELECT home_node FROM room_directory WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = mine {
            return Ok(RoomHome::Local {
                node: row.try_get("home_node")?,
            });
        }
        let theirs = sqlx::query(
            "SELECT created_at, home_cluster, home_node FROM remote_rooms WHERE name = $1",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        let claims = theirs
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("created_at")?,
                    r.try_get("home_cluster")?,
                    r.try_get("home_node")?,
                ))
            })
            .collect::<Result<Vec<Claim>>>()?;
        if let Some((_, cluster, node)) = winner(claims) {
            return Ok(RoomHome::Remote { cluster, node });
        }
        let usn = next_usn(&mut tx).await?;
        sqlx::query(
            "INSERT INTO room_directory (name, home_cluster, home_node, created_at, usn)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(name)
        .bind(cluster)
        .bind(node)
        .bind(created_at)
        .bind(usn)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM room_tombstones WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.rooms_changed();
        self.account_changed(AccountChange::Room(name.to_owned()));
        Ok(RoomHome::Local {
            node: NodeName::new(node),
        })
    }

    /// Withdraws the room `name` homed on `node` (it is gone): a tombstone tells the
    /// peers. Returns whether there was such a room.
    pub async fn release_room(&self, name: &str, node: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let Some(row) = sqlx::query(
            "SELECT home_cluster FROM room_directory WHERE name = $1 AND home_node = $2",
        )
        .bind(name)
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let cluster: String = row.try_get("home_cluster")?;
        let usn = next_usn(&mut tx).await?;
        sqlx::query("DELETE FROM room_directory WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        crate::directory::bury(
            &mut tx,
            crate::directory::Kind::Room,
            name,
            &cluster,
            node,
            usn,
        )
        .await?;
        tx.commit().await?;
        self.rooms_changed();
        self.account_changed(AccountChange::Room(name.to_owned()));
        Ok(true)
    }

    /// The rooms homed on `node`, in name order.
    pub async fn node_rooms(&self, node: &str) -> Result<Vec<RoomEntry>> {
        let rows = sqlx::query(
            "SELECT name, home_cluster, home_node, created_at, usn FROM room_directory
             WHERE home_node = $1 ORDER BY name",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| room_entry(r, false)).collect()
    }

    /// Where the room `name` lives: the winning claim among this cluster's and the
    /// peers' (the module doc's rule).
    pub async fn room_home(&self, name: &str) -> Result<RoomHome> {
        let _timer = self.latency.start("room_home");
        let rows = sqlx::query(
            "SELECT 1 AS here, created_at, home_cluster, home_node FROM room_directory
             WHERE name = $1
             UNION ALL
             SELECT 0 AS here, created_at, home_cluster, home_node FROM remote_rooms
             WHERE name = $1",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        let mut here = None;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let claim: Claim = (
                row.try_get("created_at")?,
                row.try_get("home_cluster")?,
                row.try_get("home_node")?,
            );
            if row.try_get::<i32, _>("here")? == 1 {
                here = Some(claim.1.clone());
            }
            claims.push(claim);
        }
        Ok(match winner(claims) {
            None => RoomHome::Unknown,
            Some((_, cluster, node)) if Some(&cluster) == here.as_ref() => RoomHome::Local { node },
            Some((_, cluster, node)) => RoomHome::Remote { cluster, node },
        })
    }

    /// The rooms of this cluster that a peer's claim outranks (the module doc's rule),
    /// in name order.
    pub async fn lost_rooms(&self) -> Result<Vec<LostRoom>> {
        let rows = sqlx::query(
            "SELECT d.name AS name, d.home_node AS node, r.home_cluster AS winner,
                 d.created_at AS ours, d.home_cluster AS cluster, r.created_at AS theirs
             FROM room_directory d JOIN remote_rooms r ON r.name = d.name
             ORDER BY d.name",
        )
        .fetch_all(&self.pool)
        .await?;
        // Each room of ours with the peers' claims on its name, rows grouped by name.
        let mut lost: Vec<LostRoom> = vec![];
        let mut i = 0;
        while i < rows.len() {
            let name: String = rows[i].try_get("name")?;
            let cluster: ClusterName = rows[i].try_get("cluster")?;
            let mut claims: Vec<Claim> = vec![(
                rows[i].try_get("ours")?,
                cluster.clone(),
                NodeName::default(),
            )];
            let node: NodeName = rows[i].try_get("node")?;
            while i < rows.len() && rows[i].try_get::<String, _>("name")? == name {
                claims.push((
                    rows[i].try_get("theirs")?,
                    rows[i].try_get("winner")?,
                    NodeName::default(),
                ));
                i += 1;
            }
            if let Some((_, winner, _)) = winner(claims)
                && winner != cluster
            {
                lost.push(LostRoom { name, node, winner });
            }
        }
        Ok(lost)
    }
}

pub(crate) fn room_entry(row: &sqlx::any::AnyRow, deleted: bool) -> Result<RoomEntry> {
    Ok(RoomEntry {
        name: row.try_get("name")?,
        home_cluster: row.try_get("home_cluster")?,
        home_node: row.try_get("home_node")?,
        created_at: if deleted {
            0
        } else {
            row.try_get("created_at")?
        },
        usn: row.try_get("usn")?,
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::stores;
    use crate::{PeerRecord, PeerState, now_unix};

    fn peer(name: &str) -> PeerRecord {
        PeerRecord {
            cluster: name.into(),
            address: "127.0.0.1:8443".into(),
            server_name: "localhost".into(),
            state: PeerState::Active,
            added_here: true,
            our_token: Some("tok".into()),
            their_token_hash: None,
            added_at: 1,
            accepted_at: None,
        }
    }

    fn room(name: &str, cluster: &str, created_at: i64, usn: i64, deleted: bool) -> RoomEntry {
        RoomEntry {
            name: name.into(),
            home_cluster: cluster.into(),
            home_node: format!("n1.{cluster}").into(),
            created_at,
            usn,
            deleted,
        }
    }

    /// A room claimed here is listed to peers (only when they ask for rooms), with
    /// the users in one USN order; releasing it leaves a tombstone; a user of the
    /// same name is no obstacle.
    #[tokio::test]
    async fn rooms_are_listed_beside_users_and_leave_tombstones() {
        for (store, _dir) in stores().await {
            store
                .add_user(crate::NewUser {
                    username: "team",
                    password: "pw",
                    home_cluster: "a",
                    home_node: "n1.a",
                })
                .await
                .unwrap();
            let (users, rooms) = (store.directory_generation(), store.room_generation());
            let home = store.claim_room("team", "a", "n1.a", 10).await.unwrap();
            assert_eq!(
                home,
                RoomHome::Local {
                    node: "n1.a".into()
                }
            );
            // A room made here changes where rooms live, not where users do.
            assert_eq!(store.directory_generation(), users);
            assert!(store.room_generation() > rooms);
            // A second claim (another node of the cluster) finds it.
            assert_eq!(
                store.claim_room("team", "a", "n2.a", 11).await.unwrap(),
                RoomHome::Local {
                    node: "n1.a".into()
                }
            );
            assert_eq!(store.node_rooms("n1.a").await.unwrap().len(), 1);
            let without = store
                .directory_page(0, None, None, 10, false)
                .await
                .unwrap();
            assert!(without.rooms.is_empty());
            assert_eq!(without.entries.len(), 1);
            let with = store.directory_page(0, None, None, 10, true).await.unwrap();
            assert_eq!(with.rooms.len(), 1);
            assert_eq!(with.rooms[0].created_at, 10);
            assert_eq!(with.last_usn(), Some(2));
            // Paging goes through both kinds in USN order.
            let first = store.directory_page(0, None, None, 1, true).await.unwrap();
            assert!(first.more && first.rooms.is_empty());
            let second = store
                .directory_page(0, first.last_usn(), Some(first.snapshot_usn), 1, true)
                .await
                .unwrap();
            assert!(!second.more && second.rooms.len() == 1);
            // A page that ends with a room while users follow: the next page starts
            // after the room.
            store
                .add_user(crate::NewUser {
                    username: "zed",
                    password: "pw",
                    home_cluster: "a",
                    home_node: "n1.a",
                })
                .await
                .unwrap();
            let page = store.directory_page(0, None, None, 2, true).await.unwrap();
            assert!(page.more && page.rooms.len() == 1 && page.last_usn() == Some(2));
            let rest = store
                .directory_page(0, page.last_usn(), Some(page.snapshot_usn), 2, true)
                .await
                .unwrap();
            assert_eq!(rest.entries.len(), 1);
            assert_eq!(rest.entries[0].username.as_str(), "zed");

            assert!(store.release_room("team", "n1.a").await.unwrap());
            assert!(!store.release_room("team", "n1.a").await.unwrap());
            assert_eq!(store.room_home("team").await.unwrap(), RoomHome::Unknown);
            let changes = store.directory_page(2, None, None, 10, true).await.unwrap();
            assert_eq!(changes.rooms.len(), 1);
            assert!(changes.rooms[0].deleted && changes.rooms[0].usn == 4);
            // Tombstones of rooms are pruned with the users'.
            assert_eq!(store.prune_tombstones(now_unix() + 1).await.unwrap(), 1);
            assert!(store.directory_page(2, None, None, 10, true).await.is_err());
        }
    }

    /// Peers' rooms: applied with their sync, removed by a full sync that no longer
    /// lists them, outranking or outranked by ours by the rule, and in the digests.
    #[tokio::test]
    async fn peers_rooms_are_synced_and_collisions_resolved_alike() {
        for (store, _dir) in stores().await {
            for p in ["b", "c"] {
                store.upsert_peer(&peer(p)).await.unwrap();
            }
            store.claim_room("old", "a", "n1.a", 100).await.unwrap();
            store.claim_room("new", "a", "n1.a", 300).await.unwrap();
            let generation = store.begin_full_sync("b", 5).await.unwrap();
            store
                .apply_full_page(
                    "b",
                    generation,
                    &[],
                    &[
                        room("old", "b", 200, 1, false),
                        room("new", "b", 200, 2, false),
                        room("theirs", "b", 1, 3, false),
                    ],
                    3,
                )
                .await
                .unwrap();
            store.finish_full_sync("b", generation, 5, 1).await.unwrap();
            // Ours is older for "old", theirs for "new".
            assert_eq!(
                store.room_home("old").await.unwrap(),
                RoomHome::Local {
                    node: "n1.a".into()
                }
            );
            assert_eq!(
                store.room_home("new").await.unwrap(),
                RoomHome::Remote {
                    cluster: "b".into(),
                    node: "n1.b".into()
                }
            );
            // A peer's room is not claimed here again.
            assert_eq!(
                store.claim_room("theirs", "a", "n1.a", 0).await.unwrap(),
                RoomHome::Remote {
                    cluster: "b".into(),
                    node: "n1.b".into()
                }
            );
            // c made "new" in the same microsecond as b: b wins (the smaller name).
            store
                .apply_changes("c", &[], &[room("new", "c", 200, 1, false)], 1)
                .await
                .unwrap();
            assert_eq!(
                store.lost_rooms().await.unwrap(),
                vec![LostRoom {
                    name: "new".into(),
                    node: "n1.a".into(),
                    winner: "b".into()
                }],
                "same microsecond: the smaller cluster name"
            );
            // Our digest and the peer's copy, rooms included.
            let digest = store.peer_digest("b", true).await.unwrap();
            assert_eq!(digest.rooms.as_ref().map(|r| r.0), Some(3));
            assert!(store.peer_digest("b", false).await.unwrap().rooms.is_none());
            assert_eq!(
                store
                    .directory_digest(true)
                    .await
                    .unwrap()
                    .rooms
                    .map(|r| r.0),
                Some(2)
            );
            // A tombstone removes the peer's room; a full sync without it too.
            store
                .apply_changes("b", &[], &[room("theirs", "b", 0, 6, true)], 6)
                .await
                .unwrap();
            assert_eq!(store.room_home("theirs").await.unwrap(), RoomHome::Unknown);
            let generation = store.begin_full_sync("b", 7).await.unwrap();
            store.finish_full_sync("b", generation, 7, 1).await.unwrap();
            assert_eq!(
                store.room_home("new").await.unwrap(),
                RoomHome::Remote {
                    cluster: "c".into(),
                    node: "n1.c".into()
                }
            );
            assert!(store.lost_rooms().await.unwrap().len() == 1);
            // Resyncing with rooms is remembered.
            store.resync_with_rooms("b", true).await.unwrap();
            let sync = store.peer_sync("b").await.unwrap();
            assert!(sync.rooms && sync.applied_usn == 0);
        }
    }

    fn claim(at: i64, cluster: &str) -> Claim {
        (at, cluster.into(), format!("n1.{cluster}").into())
    }

    /// The older room wins; at the same microsecond, the smaller cluster name: the
    /// same answer whatever order the claims come in.
    #[test]
    fn the_older_claim_wins_then_the_smaller_cluster() {
        let a = claim(5, "b.example");
        let b = claim(7, "a.example");
        let c = claim(5, "c.example");
        for claims in [
            vec![a.clone(), b.clone(), c.clone()],
            vec![c.clone(), b.clone(), a.clone()],
            vec![b.clone(), c.clone(), a.clone()],
        ] {
            assert_eq!(winner(claims), Some(a.clone()));
        }
        assert_eq!(winner(vec![]), None);
    }
}
