//! What the peer tasks show: `peer status` and the mesh in `/metrics`, read from
//! memory (no store query per scrape).

use impmesh_store::{ClusterName, PeerState, TrustKind};

use crate::{Agent, AgentError, CertificateStatus, LiveStatus, PeerStatus, SyncState, lock};

impl Agent {
    /// The mesh in the Prometheus text format, from what the peer tasks keep in
    /// memory (no store query per scrape): per peer its sync state, USN lag, seconds
    /// since the last good sync, users, failures, stall restarts, certificate status,
    /// and the DNS state of each of its names.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let now = impmesh_store::now_unix();
        let peers: Vec<(ClusterName, LiveStatus, u32)> = {
            let handles = lock(&self.peers);
            let dog = lock(&self.watchdog);
            handles
                .iter()
                .map(|(c, h)| (c.clone(), lock(&h.status).clone(), dog.restarts(c)))
                .collect()
        };
        /// One family: its samples for a peer, as (extra labels, value).
        type Samples = fn(&LiveStatus, u32, i64) -> Vec<(String, i64)>;
        let families: [(&str, &str, &str, Samples); 9] = [
            (
                "impmesh_peer_sync_state",
                "gauge",
                "The sync task's state per peer (1 for the current state).",
                |s, _, _| vec![(format!(",state=\"{}\"", s.state.as_str()), 1)],
            ),
            (
                "impmesh_peer_usn_lag",
                "gauge",
                "The peer's last USN minus the one applied here (0: in step).",
                |s, _, _| match (s.peer_usn, s.applied_usn) {
                    (Some(theirs), Some(ours)) => vec![(String::new(), (theirs - ours).max(0))],
                    _ => vec![],
                },
            ),
            (
                "impmesh_peer_last_sync_age_seconds",
                "gauge",
                "Seconds since the last sync with the peer completed.",
                |s, _, now| {
                    s.last_success_at
                        .map(|t| (String::new(), (now - t).max(0)))
                        .into_iter()
                        .collect()
                },
            ),
            (
                "impmesh_peer_users",
                "gauge",
                "The peer's users in this directory.",
                |s, _, _| {
                    s.users_here
                        .map(|n| (String::new(), n))
                        .into_iter()
                        .collect()
                },
            ),
            (
                "impmesh_peer_consecutive_failures",
                "gauge",
                "Failed sync attempts in a row with the peer.",
                |s, _, _| vec![(String::new(), i64::from(s.consecutive_failures))],
            ),
            (
                "impmesh_peer_stall_restarts_total",
                "counter",
                "Times the stall watchdog restarted the peer's sync.",
                |_, restarts, _| vec![(String::new(), i64::from(restarts))],
            ),
            (
                "impmesh_peer_certificates_in_sync",
                "gauge",
                "Whether the peer's announced certificates are all pinned here (1) or not (0).",
                |s, _, _| match s.certificate_status {
                    CertificateStatus::Unknown => vec![],
                    status => vec![(
                        String::new(),
                        i64::from(status == CertificateStatus::InSync),
                    )],
                },
            ),
            (
                "impmesh_peer_refused_entries_total",
                "counter",
                "Directory entries of the peer refused (homed elsewhere, invalid names).",
                |s, _, _| vec![(String::new(), s.refused_entries as i64)],
            ),
            (
                "impmesh_peer_dns_ok",
                "gauge",
                "Whether each DNS name of the peer resolves now (0: the last good addresses are in use).",
                |s, _, _| {
                    s.dns
                        .iter()
                        .map(|n| (format!(",name=\"{}\"", n.name), i64::from(n.ok)))
                        .collect()
                },
            ),
        ];
        // Each family whole (HELP, TYPE, then every peer's samples), as the text
        // format requires.
        for (name, kind, help, samples) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (cluster, s, restarts) in &peers {
                for (labels, value) in samples(s, *restarts, now) {
                    let _ = writeln!(out, "{name}{{peer=\"{cluster}\"{labels}}} {value}");
                }
            }
        }
    }

    /// The status of every peer.
    pub async fn status(&self) -> Result<Vec<PeerStatus>, AgentError> {
        let trust = self.store.trust_entries().await?;
        let mut out = vec![];
        for peer in self.store.peers().await? {
            let live = lock(&self.peers)
                .get(peer.cluster.as_str())
                .map(|h| lock(&h.status).clone())
                .unwrap_or_else(|| LiveStatus {
                    state: match peer.state {
                        PeerState::Pending => SyncState::Pending,
                        PeerState::Active => SyncState::Stopped,
                        PeerState::Removed => SyncState::Removed,
                    },
                    ..LiveStatus::default()
                });
            let stall_restarts = lock(&self.watchdog).restarts(&peer.cluster);
            out.push(PeerStatus {
                stall_restarts,
                associated_users: self.store.remote_user_count(&peer.cluster).await?,
                sync: self.store.peer_sync(&peer.cluster).await?,
                pinned: trust
                    .iter()
                    .filter(|t| {
                        t.kind == TrustKind::Pinned && t.peer.as_deref() == Some(&peer.cluster)
                    })
                    .map(|t| t.fingerprint.clone())
                    .collect(),
                cluster: peer.cluster.into(),
                address: peer.address,
                state: peer.state,
                added_here: peer.added_here,
                added_at: peer.added_at,
                accepted_at: peer.accepted_at,
                live,
            });
        }
        Ok(out)
    }
}
