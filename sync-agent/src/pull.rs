//! Pulling a peer's directory: a full listing, the changes since the last USN
//! applied, and digest comparisons (anti-entropy). A peer speaks only for its own
//! users on its own nodes: every entry is checked against who the peer is.

use std::sync::Mutex;
use std::time::Instant;

use impmesh_axl::client::AxlClient;
use impmesh_axl::soap::{Cursor, Request, Response, UserEntry};
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

/// A peer's directory entry as we keep it, or why it is refused: a peer speaks only
/// for its own users, homed on its own announced nodes, with valid names. A
/// tombstone only ever removes the peer's own entry, so only its name is checked.
fn entry(peer: &str, nodes: &[NodeName], u: UserEntry) -> Result<DirectoryEntry, String> {
    if !is_localpart(&u.name) {
        return Err(format!("{:?} is not a valid user name", u.name));
    }
    if !u.deleted {
        if !u.home_cluster.eq_ignore_ascii_case(peer) {
            return Err(format!(
                "{} is said to be homed in {:?}, not in the peer that lists it",
                u.name, u.home_cluster
            ));
        }
        if !nodes.iter().any(|n| n.eq_ignore_ascii_case(&u.home_node)) {
            return Err(format!(
                "{} is said to be homed on {:?}, which is not one of the peer's nodes",
                u.name, u.home_node
            ));
        }
    }
    // Checked above: the names may now be typed as what they are.
    Ok(DirectoryEntry {
        username: UserName::new(u.name),
        home_cluster: ClusterName::new(peer),
        home_node: NodeName::new(u.home_node.to_ascii_lowercase()),
        usn: u.usn,
        deleted: u.deleted,
    })
}

/// The entries of a page that may be applied; the refused ones are logged (first few
/// reasons) and counted in the peer's status.
fn checked_entries(
    peer: &str,
    nodes: &[NodeName],
    users: Vec<UserEntry>,
    status: &Mutex<LiveStatus>,
) -> Vec<DirectoryEntry> {
    let mut refused = 0u64;
    let mut out = Vec::with_capacity(users.len());
    for u in users {
        match entry(peer, nodes, u) {
            Ok(e) => out.push(e),
            Err(why) => {
                if refused < 5 {
                    tracing::warn!(%peer, %why, "directory entry refused");
                }
                refused += 1;
            }
        }
    }
    if refused > 0 {
        tracing::warn!(%peer, refused, "directory entries refused in one page");
        lock(status).refused_entries += refused;
    }
    out
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
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::UnexpectedAnswer("listUsers"));
            };
            if generation == 0 {
                generation = store
                    .begin_full_sync(&self.cluster, page.snapshot_usn)
                    .await?;
            }
            let after = page.users.last().map(|u| u.usn).unwrap_or(0);
            let entries = checked_entries(&self.cluster, nodes, page.users, &self.status);
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_full_page(&self.cluster, generation, &entries, after)
                    .await?;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    let users = store
                        .finish_full_sync(&self.cluster, generation, page.snapshot_usn, ms)
                        .await?;
                    lock(&self.status).peer_users = Some(users);
                    lock(&self.progress).last_compared = Some(Instant::now());
                    tracing::info!(peer = %self.cluster, users, usn = page.snapshot_usn, ms, "full sync done");
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
            };
            let Response::Users(page) = client.call(&request).await? else {
                return Err(SyncError::UnexpectedAnswer("listUsers"));
            };
            changes += page.users.len() as i64;
            let last = page.users.last().map(|u| u.usn);
            let entries = checked_entries(&self.cluster, nodes, page.users, &self.status);
            changed.extend(entries.iter().map(|e| e.username.clone()));
            let applied_to = match page.next_cursor {
                Some(_) => last.unwrap_or(since),
                None => page.snapshot_usn,
            };
            {
                let _writer = self.agent.apply_lock.lock().await;
                store
                    .apply_changes(&self.cluster, &entries, applied_to)
                    .await?;
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => {
                    let ms = started.elapsed().as_millis() as i64;
                    store
                        .finish_incremental(&self.cluster, page.snapshot_usn, ms, changes)
                        .await?;
                    if changes > 0 {
                        tracing::info!(peer = %self.cluster, changes, usn = page.snapshot_usn, ms, "changes applied");
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
    pub(crate) async fn anti_entropy(&self, client: &mut AxlClient) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let Response::Digest { usn, count, sha256 } =
            client.call(&Request::GetDirectoryDigest).await?
        else {
            return Err(SyncError::UnexpectedAnswer("getDirectoryDigest"));
        };
        let ours = store.peer_digest(&self.cluster).await?;
        if usn != ours.usn {
            // Changes in flight: compare at the next quiet sync.
            return Ok(());
        }
        let def = impmesh_store::alarms::DIRECTORY_MISMATCH;
        let equal = count == ours.count && sha256 == ours.sha256;
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
        let message = format!(
            "at USN {usn} the peer has {count} users (digest {}…), this directory {} ({}…); resyncing in full",
            short_digest(&sha256),
            ours.count,
            short_digest(&ours.sha256)
        );
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

    /// A digest from a peer is text it chose: never sliced by bytes (L1).
    #[test]
    fn a_peers_digest_is_shortened_by_characters() {
        assert_eq!(short_digest("ééééééééééééééé"), "éééééééééééé");
        assert_eq!(short_digest("abc"), "abc");
    }
}
