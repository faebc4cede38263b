//! Pulling a peer's directory: a full listing, the changes since the last USN
//! applied, and digest comparisons (anti-entropy). A peer speaks only for its own
//! users on its own nodes: every entry is checked against who the peer is.

use std::sync::Mutex;
use std::time::Instant;

use impmesh_axl::client::AxlClient;
use impmesh_axl::soap::{Cursor, Request, Response, RoomEntry, UserEntry, UserPage};
use impmesh_store::{ClusterName, DirectoryEntry, NodeName, UserName};

use crate::task::{PeerTask, SyncError};
use crate::{DuplicateScope, LiveStatus, lock};

/// Whether `name` is a user name as a cluster stores it: an RFC 7622 localpart,
/// already normalised (nodeprep), at most 1023 bytes.
pub fn is_localpart(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1023
        && jid::NodePart::new(name).is_ok_and(|n| n.as_str() == name)
}

/// Whether an entry a peer lists may be its: a valid name (`what`: user or room),
/// homed in the peer on one of its announced nodes. A tombstone only ever removes the
/// peer's own entry, so only its name is checked.
fn check(
    peer: &str,
    nodes: &[NodeName],
    what: &str,
    (name, cluster, node): (&str, &str, &str),
    deleted: bool,
) -> Result<(), String> {
    if !is_localpart(name) {
        return Err(format!("{name:?} is not a valid {what} name"));
    }
    if !deleted {
        if !cluster.eq_ignore_ascii_case(peer) {
            return Err(format!(
                "{what} {name} is said to be homed in {cluster:?}, not in the peer that lists it"
            ));
        }
        if !nodes.iter().any(|n| n.eq_ignore_ascii_case(node)) {
            return Err(format!(
                "{what} {name} is said to be homed on {node:?}, which is not one of the peer's nodes"
            ));
        }
    }
    Ok(())
}

/// A peer's directory entry as we keep it, or why it is refused: a peer speaks only
/// for its own users, homed on its own announced nodes, with valid names.
fn entry(peer: &str, nodes: &[NodeName], u: UserEntry) -> Result<DirectoryEntry, String> {
    let home = (
        u.name.as_str(),
        u.home_cluster.as_str(),
        u.home_node.as_str(),
    );
    check(peer, nodes, "user", home, u.deleted)?;
    // Checked above: the names may now be typed as what they are.
    Ok(DirectoryEntry {
        username: UserName::new(u.name),
        home_cluster: ClusterName::new(peer),
        home_node: NodeName::new(u.home_node.to_ascii_lowercase()),
        usn: u.usn,
        deleted: u.deleted,
    })
}

/// How far in the future a peer's room may say it was made (its clock may run ahead
/// of ours by up to the skew the clock alarm tolerates).
const MAX_CREATED_AHEAD_MICROS: i64 = 60_000_000;

/// A peer's room entry as we keep it, or why it is refused: by the same rules as
/// users (room entries only from the room's home cluster), and with a creation time
/// that could be true: the older room of a name wins (docs/muc.md), so a time of 0
/// would let a peer take every name.
fn room(
    peer: &str,
    nodes: &[NodeName],
    r: RoomEntry,
    now_micros: i64,
) -> Result<impmesh_store::RoomEntry, String> {
    let home = (
        r.name.as_str(),
        r.home_cluster.as_str(),
        r.home_node.as_str(),
    );
    check(peer, nodes, "room", home, r.deleted)?;
    // Rooms made before this feature existed (2026) are impossible.
    const EARLIEST: i64 = 1_767_225_600_000_000;
    if !r.deleted && !(EARLIEST..=now_micros + MAX_CREATED_AHEAD_MICROS).contains(&r.created_at) {
        return Err(format!(
            "room {} says it was made at {} µs, which cannot be true",
            r.name, r.created_at
        ));
    }
    Ok(impmesh_store::RoomEntry {
        name: r.name,
        home_cluster: ClusterName::new(peer),
        home_node: NodeName::new(r.home_node.to_ascii_lowercase()),
        created_at: r.created_at,
        usn: r.usn,
        deleted: r.deleted,
    })
}

/// The entries of a page that may be applied, users and rooms; the refused ones are
/// logged (first few reasons) and counted in the peer's status.
fn checked_entries(
    peer: &str,
    nodes: &[NodeName],
    page: UserPage,
    rooms_asked: bool,
    status: &Mutex<LiveStatus>,
) -> (Vec<DirectoryEntry>, Vec<impmesh_store::RoomEntry>) {
    let mut refused = 0u64;
    let mut refuse = |why: String| {
        if refused < 5 {
            tracing::warn!(%peer, %why, "directory entry refused");
        }
        refused += 1;
    };
    let mut users = Vec::with_capacity(page.users.len());
    for u in page.users {
        match entry(peer, nodes, u) {
            Ok(e) => users.push(e),
            Err(why) => refuse(why),
        }
    }
    let mut rooms = Vec::with_capacity(page.rooms.len());
    let now = impmesh_store::now_micros();
    for r in page.rooms {
        if !rooms_asked {
            // Rooms we did not ask for (the feature is off here): none of them count.
            refuse(format!("room {} listed unasked", r.name));
            continue;
        }
        match room(peer, nodes, r, now) {
            Ok(r) => rooms.push(r),
            Err(why) => refuse(why),
        }
    }
    if refused > 0 {
        tracing::warn!(%peer, refused, "directory entries refused in one page");
        lock(status).refused_entries += refused;
    }
    (users, rooms)
}

/// The USN of a page's last entry, user or room.
fn last_usn(page: &UserPage) -> Option<i64> {
    let users = page.users.last().map(|u| u.usn);
    users.max(page.rooms.last().map(|r| r.usn))
}

/// The first 12 characters of a digest, for a message (it may come from a peer: by
/// characters, not bytes, so no input can split a character).
fn short_digest(digest: &str) -> String {
    digest.chars().take(12).collect()
}

impl PeerTask {
    pub(crate) async fn full_sync(
        &self,
        client: &mut AxlClient,
        nodes: &[NodeName],
        sync: impmesh_store::PeerSync,
    ) -> Result<(), SyncError> {
        let rooms = sync.rooms;
        let store = &self.agent.store;
        let started = Instant::now();
        let page_size = self.agent.settings.page_size;
        // Resume a listing in progress, or start one.
        let (mut generation, mut cursor) = match (sync.full_snapshot_usn, sync.full_after_usn) {
            (Some(snapshot_usn), Some(after_usn)) if after_usn > 0 => (
                sync.full_gen,
                Some(Cursor {
                    snapshot_usn,
                    after_usn,
                }),
            ),
            _ => (0, None),
        };
        loop {
            let request = Request::ListUsers {
                since_usn: 0,
                cursor,
                page_size,
                rooms,
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::UnexpectedAnswer("listUsers"));
            };
            if generation == 0 {
                generation = store
                    .begin_full_sync(&self.cluster, page.snapshot_usn)
                    .await?;
            }
            let after = last_usn(&page).unwrap_or(0);
            let (snapshot_usn, next_cursor) = (page.snapshot_usn, page.next_cursor);
            let (users, room_entries) =
                checked_entries(&self.cluster, nodes, page, rooms, &self.status);
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_full_page(&self.cluster, generation, &users, &room_entries, after)
                    .await?;
            }
            match next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    let users = store
                        .finish_full_sync(&self.cluster, generation, snapshot_usn, ms)
                        .await?;
                    lock(&self.status).peer_users = Some(users);
                    lock(&self.progress).last_compared = Some(Instant::now());
                    tracing::info!(peer = %self.cluster, users, rooms, usn = snapshot_usn, ms, "full sync done");
                    self.agent
                        .request_duplicate_check(DuplicateScope::Peer(self.cluster.clone()));
                    return Ok(());
                }
            }
        }
    }

    /// Pulls the changes since `since`; returns how many there were.
    pub(crate) async fn incremental(
        &self,
        client: &mut AxlClient,
        nodes: &[NodeName],
        since: i64,
        rooms: bool,
    ) -> Result<i64, SyncError> {
        let store = &self.agent.store;
        let started = Instant::now();
        let mut cursor = None;
        let mut changes = 0i64;
        let mut changed = vec![];
        loop {
            let request = Request::ListUsers {
                since_usn: since,
                cursor,
                page_size: self.agent.settings.page_size,
                rooms,
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::UnexpectedAnswer("listUsers"));
            };
            changes += (page.users.len() + page.rooms.len()) as i64;
            let last = last_usn(&page);
            let (snapshot_usn, next_cursor) = (page.snapshot_usn, page.next_cursor);
            let (users, room_entries) =
                checked_entries(&self.cluster, nodes, page, rooms, &self.status);
            changed.extend(users.iter().map(|e| e.username.clone()));
            let applied_to = match next_cursor {
                Some(_) => last.unwrap_or(since),
                None => snapshot_usn,
            };
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_changes(&self.cluster, &users, &room_entries, applied_to)
                    .await?;
            }
            match next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    store
                        .finish_incremental(&self.cluster, snapshot_usn, ms, changes)
                        .await?;
                    if changes > 0 {
                        tracing::info!(peer = %self.cluster, changes, usn = snapshot_usn, ms, "changes applied");
                        self.agent
                            .request_duplicate_check(DuplicateScope::Users(changed));
                    }
                    return Ok(changes);
                }
            }
        }
    }

    /// Compares the digest of the peer's users in our directory with the peer's own,
    /// when both are at the same USN. A difference (a lost write, a bug) raises
    /// InterClusterDirectoryMismatch and resyncs this peer's slice in full at once; the
    /// alarm clears when the digests match again.
    pub(crate) async fn anti_entropy(
        &self,
        client: &mut AxlClient,
        rooms: bool,
    ) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let Response::Digest {
            usn,
            count,
            sha256,
            rooms: room_digest,
        } = client.call(&Request::GetDirectoryDigest { rooms }).await?
        else {
            return Err(SyncError::UnexpectedAnswer("getDirectoryDigest"));
        };
        let ours = store.peer_digest(&self.cluster, rooms).await?;
        if usn != ours.usn {
            // Changes in flight: compare at the next quiet sync.
            return Ok(());
        }
        let def = impmesh_store::alarms::DIRECTORY_MISMATCH;
        // Rooms are compared when the peer gave their digest (it may have turned them
        // off since: the next sync notices and resyncs without them).
        let rooms_equal = room_digest.is_none() || room_digest == ours.rooms;
        let equal = count == ours.count && sha256 == ours.sha256 && rooms_equal;
        {
            let mut p = lock(&self.progress);
            p.last_compared = Some(Instant::now());
            p.mismatched = !equal;
        }
        if equal {
            self.agent
                .clear_alarm(def, &self.cluster, "the digests match")
                .await;
            return Ok(());
        }
        let mut message = format!(
            "at USN {usn} the peer has {count} users (digest {}…), this directory {} ({}…)",
            short_digest(&sha256),
            ours.count,
            short_digest(&ours.sha256)
        );
        if let (Some((theirs, their_sha)), Some((mine, my_sha))) = (&room_digest, &ours.rooms) {
            message.push_str(&format!(
                "; rooms {theirs} ({}…) and {mine} ({}…)",
                short_digest(their_sha),
                short_digest(my_sha)
            ));
        }
        message.push_str("; resyncing in full");
        tracing::warn!(peer = %self.cluster, %message, "directory mismatch");
        self.agent
            .set_alarm(def, &self.cluster, Some(&message))
            .await;
        store.restart_full_sync(&self.cluster).await?;
        self.nudge.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, cluster: &str, node: &str, deleted: bool) -> UserEntry {
        UserEntry {
            name: name.into(),
            home_cluster: cluster.into(),
            home_node: node.into(),
            usn: 1,
            deleted,
        }
    }

    /// A peer speaks only for its own users on its own nodes, with valid names.
    #[test]
    fn a_peers_entries_are_checked_against_who_the_peer_is() {
        let nodes = [NodeName::new("n1.b.example"), NodeName::new("n2.b.example")];
        let ok = entry(
            "b.example",
            &nodes,
            user("bea", "b.example", "N2.b.example", false),
        )
        .unwrap();
        assert_eq!(
            (ok.home_cluster.as_str(), ok.home_node.as_str()),
            ("b.example", "n2.b.example")
        );
        for (bad, why) in [
            (
                user("bea", "a.example", "n1.b.example", false),
                "another cluster",
            ),
            (user("bea", "0", "n1.b.example", false), "a made-up cluster"),
            (
                user("bea", "b.example", "n9.b.example", false),
                "an unannounced node",
            ),
            (
                user("Bea", "b.example", "n1.b.example", false),
                "not normalised",
            ),
            (
                user("a@b", "b.example", "n1.b.example", false),
                "not a localpart",
            ),
            (user("", "b.example", "n1.b.example", false), "empty"),
            (
                user("a b\u{0}", "b.example", "n1.b.example", true),
                "bad tombstone",
            ),
        ] {
            assert!(entry("b.example", &nodes, bad).is_err(), "{why}");
        }
        // A tombstone removes only the peer's own entry: its home is not checked.
        assert!(entry("b.example", &nodes, user("gone", "", "", true)).is_ok());
        assert!(is_localpart("ünïcode"));
        assert!(!is_localpart(&"x".repeat(1024)));
    }

    /// Room entries are held to the same rules: only the peer's own rooms, on its
    /// own nodes, with valid names.
    #[test]
    fn a_peers_rooms_are_checked_like_its_users() {
        let nodes = [NodeName::new("n1.b.example")];
        let now = impmesh_store::now_micros();
        let room_entry = |name: &str, cluster: &str, node: &str, deleted| RoomEntry {
            name: name.into(),
            home_cluster: cluster.into(),
            home_node: node.into(),
            created_at: now - 7,
            usn: 3,
            deleted,
        };
        let ok = room(
            "b.example",
            &nodes,
            room_entry("team", "b.example", "N1.b.example", false),
            now,
        )
        .unwrap();
        assert_eq!(ok.home_node.as_str(), "n1.b.example");
        assert_eq!(ok.created_at, now - 7);
        for (bad, why) in [
            (
                room_entry("team", "a.example", "n1.b.example", false),
                "another cluster's room",
            ),
            (
                room_entry("team", "b.example", "n2.b.example", false),
                "an unannounced node",
            ),
            (
                room_entry("Team", "b.example", "n1.b.example", false),
                "not normalised",
            ),
            (
                room_entry("a@b", "b.example", "n1.b.example", true),
                "not a localpart",
            ),
            (
                RoomEntry {
                    created_at: 0,
                    ..room_entry("team", "b.example", "n1.b.example", false)
                },
                "made at the epoch: it would win every name",
            ),
            (
                RoomEntry {
                    created_at: now + 61_000_000,
                    ..room_entry("team", "b.example", "n1.b.example", false)
                },
                "made in the future",
            ),
        ] {
            assert!(room("b.example", &nodes, bad, now).is_err(), "{why}");
        }
        let status = Mutex::new(LiveStatus::default());
        let page = UserPage {
            snapshot_usn: 5,
            users: vec![user("bea", "b.example", "n1.b.example", false)],
            rooms: vec![
                room_entry("ok", "b.example", "n1.b.example", false),
                room_entry("theirs", "c.example", "n1.b.example", false),
            ],
            next_cursor: None,
        };
        assert_eq!(last_usn(&page), Some(3));
        let (users, rooms) = checked_entries("b.example", &nodes, page.clone(), true, &status);
        assert_eq!((users.len(), rooms.len()), (1, 1));
        assert_eq!(lock(&status).refused_entries, 1);
        // Rooms nobody asked for (the feature is off here) are not taken.
        let (users, rooms) = checked_entries("b.example", &nodes, page, false, &status);
        assert_eq!((users.len(), rooms.len()), (1, 0));
        assert_eq!(lock(&status).refused_entries, 3);
    }

    /// A digest from a peer is text it chose: never sliced by bytes (L1).
    #[test]
    fn a_peers_digest_is_shortened_by_characters() {
        assert_eq!(short_digest("ééééééééééééééé"), "éééééééééééé");
        assert_eq!(short_digest("abc"), "abc");
    }
}
