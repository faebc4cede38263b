//! Users homed in two clusters: the checks that raise and clear
//! `InterClusterDuplicateUser`, one at a time, scoped to what changed.

use std::sync::Arc;
use std::time::Duration;

use impmesh_store::{ClusterName, DuplicateUser, UserName};

use crate::{Agent, lock};

/// The shortest time between two duplicate checks.
pub const DUPLICATE_CHECK_SPACING: Duration = Duration::from_secs(1);

/// What a duplicate check must look at.
#[derive(Debug, Clone)]
pub enum DuplicateScope {
    /// The whole directory.
    All,
    /// The users of this peer's slice (after a full sync of it).
    Peer(ClusterName),
    /// These user names (after changes to them, here or at a peer).
    Users(Vec<UserName>),
}

/// The scopes asked for since the last check, merged.
#[derive(Debug, Default)]
pub(crate) struct PendingDuplicateCheck {
    all: bool,
    peers: std::collections::BTreeSet<ClusterName>,
    names: std::collections::BTreeSet<UserName>,
}

impl Agent {
    /// Asks for a duplicate check of `scope` soon. Checks run one at a time, at most
    /// one per [`DUPLICATE_CHECK_SPACING`]; requests made meanwhile fold into the next
    /// one. A check looks only at what the scope could have changed (one peer's slice,
    /// a few names) plus the duplicates already alarmed, so a cold start's 29 full
    /// syncs cost 29 probes of 15,000 names, not 29 scans of the whole directory.
    pub fn request_duplicate_check(&self, scope: DuplicateScope) {
        {
            let mut pending = lock(&self.duplicate_scope);
            match scope {
                DuplicateScope::All => pending.all = true,
                DuplicateScope::Peer(p) => {
                    pending.peers.insert(p);
                }
                DuplicateScope::Users(names) => pending.names.extend(names),
            }
        }
        self.duplicates.notify_one();
    }

    pub(crate) async fn check_duplicates_when_asked(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.duplicates.notified() => {}
            }
            let pending = std::mem::take(&mut *lock(&self.duplicate_scope));
            if pending.all {
                self.check_duplicates().await;
            } else {
                self.check_duplicates_among(pending).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(DUPLICATE_CHECK_SPACING) => {}
            }
        }
    }

    /// Raises `InterClusterDuplicateUser` for every user homed in more than one cluster
    /// and clears it for those fixed, over the whole directory. Runs at start, after a
    /// peer is removed, and when asked with [`DuplicateScope::All`].
    pub async fn check_duplicates(&self) {
        match self.store.duplicate_users().await {
            Ok(dups) => self.alarm_duplicates(&dups, None).await,
            Err(e) => tracing::error!(error = %e, "cannot check for duplicate users"),
        }
    }

    /// The scoped check: the users of the peers whose slice was replaced that someone
    /// else claims too, the names that changed, and the duplicates already alarmed.
    async fn check_duplicates_among(&self, pending: PendingDuplicateCheck) {
        let mut names = pending.names;
        for peer in &pending.peers {
            match self.store.claimed_elsewhere(peer).await {
                Ok(claimed) => names.extend(claimed),
                Err(e) => {
                    tracing::error!(error = %e, "cannot check for duplicate users");
                    return;
                }
            }
        }
        let def = impmesh_store::alarms::DUPLICATE_USER;
        match self.store.active_alarms().await {
            Ok(active) => names.extend(
                active
                    .into_iter()
                    .filter(|a| a.name == def.name)
                    .map(|a| UserName::new(a.subject)),
            ),
            Err(e) => {
                tracing::error!(error = %e, "cannot check for duplicate users");
                return;
            }
        }
        let names: Vec<UserName> = names.into_iter().collect();
        match self.store.duplicates_among(&names).await {
            Ok(dups) => self.alarm_duplicates(&dups, Some(&names)).await,
            Err(e) => tracing::error!(error = %e, "cannot check for duplicate users"),
        }
    }

    /// Raises the alarm for `dups` and clears it for every alarmed user not among them
    /// (of those `checked`, or of all when the whole directory was checked).
    async fn alarm_duplicates(&self, dups: &[DuplicateUser], checked: Option<&[UserName]>) {
        let def = impmesh_store::alarms::DUPLICATE_USER;
        let active = match self.store.active_alarms().await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot check for duplicate users");
                return;
            }
        };
        for DuplicateUser { user, homes } in dups {
            let list: Vec<String> = homes.iter().map(|(c, n)| format!("{c} ({n})")).collect();
            let first = homes.first().map_or("", |(c, _)| c.as_str());
            let message = format!(
                "{user} is homed in {}; routed to {first} (the first cluster name) until fixed",
                list.join(" and "),
            );
            self.set_alarm(def, user, Some(&message)).await;
        }
        for alarm in active.iter().filter(|a| a.name == def.name) {
            let in_scope = checked.is_none_or(|names| names.iter().any(|n| *n == alarm.subject));
            if in_scope && !dups.iter().any(|d| d.user == alarm.subject) {
                self.clear_alarm(def, &alarm.subject, "no longer homed twice")
                    .await;
            }
        }
    }
}
