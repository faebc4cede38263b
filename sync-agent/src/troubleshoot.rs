//! The System Troubleshooter: every check of the mesh with pass or fail and what
//! it found (`impmesh troubleshoot`).

use impmesh_store::PeerState;

use crate::{Agent, AgentError, CertificateStatus, Check, PeerStatus, SyncState};

/// Clock skew beyond which the troubleshooter complains, seconds.
pub const MAX_CLOCK_SKEW: i64 = 60;

impl Agent {
    /// The System Troubleshooter: every check with pass/fail and what it found.
    pub async fn troubleshoot(&self) -> Result<Vec<Check>, AgentError> {
        fn check(name: &str, problems: Vec<String>, fine: String) -> Check {
            Check {
                name: name.to_owned(),
                ok: problems.is_empty(),
                detail: if problems.is_empty() {
                    fine
                } else {
                    problems.into_iter().take(20).collect::<Vec<_>>().join("; ")
                },
            }
        }
        let mut checks = vec![];
        let dups = self.store.duplicate_users().await?;
        checks.push(check(
            "no user is homed in two clusters",
            dups.iter()
                .map(|d| {
                    let list: Vec<&str> = d.homes.iter().map(|h| h.0.as_str()).collect();
                    format!("{}: {}", d.user, list.join(", "))
                })
                .collect(),
            "none".into(),
        ));
        let nodes: Vec<String> = self
            .store
            .cluster_nodes(&self.ours.cluster)
            .await?
            .into_iter()
            .map(|n| n.name)
            .collect();
        checks.push(check(
            "every local user has a valid home node",
            self.store
                .list_users()
                .await?
                .into_iter()
                .filter(|u| {
                    u.home_cluster != self.ours.cluster || !nodes.iter().any(|n| *n == u.home_node)
                })
                .map(|u| {
                    format!(
                        "{}: no node {} in {}",
                        u.username, u.home_node, u.home_cluster
                    )
                })
                .collect(),
            format!(
                "all on nodes of {} ({})",
                self.ours.cluster,
                nodes.join(", ")
            ),
        ));
        let status = self.status().await?;
        checks.push(check(
            "no peer is configured on one side only",
            status
                .iter()
                .filter(|p| p.state == PeerState::Pending)
                .map(|p| {
                    format!(
                        "{} added us and is not accepted here (impmesh peer accept)",
                        p.cluster
                    )
                })
                .collect(),
            "none".into(),
        ));
        let active: Vec<&PeerStatus> = status
            .iter()
            .filter(|p| p.state == PeerState::Active)
            .collect();
        let reason =
            |r: &Option<String>| r.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        checks.push(check(
            "every peer is in sync",
            active
                .iter()
                .filter(|p| {
                    p.live.state != SyncState::InSync
                        || p.live.peer_users.is_some_and(|n| n != p.associated_users)
                })
                .map(|p| {
                    format!(
                        "{}: {}{}",
                        p.cluster,
                        p.live.state.as_str(),
                        reason(&p.live.reason)
                    )
                })
                .collect(),
            format!("{} peer(s) in sync", active.len()),
        ));
        checks.push(check(
            "peer certificates match the pinned ones",
            active
                .iter()
                .filter(|p| p.live.certificate_status != CertificateStatus::InSync)
                .map(|p| {
                    format!(
                        "{}: {}{}",
                        p.cluster,
                        p.live.certificate_status.as_str(),
                        reason(&p.live.certificate_reason)
                    )
                })
                .collect(),
            "all in sync".into(),
        ));
        checks.push(check(
            "every DNS name of every peer resolves",
            active
                .iter()
                .flat_map(|p| {
                    p.live.dns.iter().filter(|n| !n.ok).map(|n| {
                        format!(
                            "{}: {} does not resolve ({}){}",
                            p.cluster,
                            n.name,
                            n.error.as_deref().unwrap_or("no answer"),
                            if n.addresses.is_empty() {
                                String::new()
                            } else {
                                format!("; still using {}", n.addresses.join(", "))
                            }
                        )
                    })
                })
                .collect(),
            "all resolve".into(),
        ));
        checks.push(check(
            "peer clocks within 60 s of ours",
            active
                .iter()
                .filter_map(|p| {
                    p.live
                        .clock_skew_secs
                        .filter(|s| s.abs() > MAX_CLOCK_SKEW)
                        .map(|s| format!("{}: {s:+} s", p.cluster))
                })
                .collect(),
            "all within 60 s".into(),
        ));
        checks.push(check(
            "this node's certificates are valid for more than 30 days",
            self.store
                .active_alarms()
                .await?
                .into_iter()
                .filter(|a| a.name.starts_with("NodeCertificate"))
                .map(|a| format!("{}: {}", a.name, a.message))
                .collect(),
            "yes".into(),
        ));
        Ok(checks)
    }
}
