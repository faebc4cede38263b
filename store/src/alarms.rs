//! The alarm catalogue and its persistence. An alarm has a name, a severity, a
//! meaning and a recommended action ([`CATALOGUE`]); the code that detects a condition
//! raises it for a subject (a certificate, a peer, …) and clears it when the condition
//! ends. Active alarms and the history of every raise and clear live in the store.
//! Adding an alarm is one entry in [`CATALOGUE`] (and a line in ops/alarms.md and a
//! rule in ops/prometheus/alerts.yml; a test checks both).

use sqlx::Row as _;

use crate::{Result, Store, now_unix};

/// How bad an alarm is, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One entry of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlarmDef {
    pub name: &'static str,
    pub severity: Severity,
    pub meaning: &'static str,
    pub action: &'static str,
}

/// The node certificate expires within 30 days.
pub const CERT_EXPIRING_SOON: &AlarmDef = &CATALOGUE[0];
/// The node certificate expires within 7 days.
pub const CERT_EXPIRING: &AlarmDef = &CATALOGUE[1];
/// The node certificate has expired.
pub const CERT_EXPIRED: &AlarmDef = &CATALOGUE[2];
/// A peer's periodic sync has not completed within the stall threshold.
pub const PEER_SYNC_STALLED: &AlarmDef = &CATALOGUE[3];
/// A peer cluster added this cluster and waits for our admin.
pub const PEER_PENDING: &AlarmDef = &CATALOGUE[4];
/// A peer's certificates no longer match the pinned ones.
pub const PEER_CERT_OUT_OF_SYNC: &AlarmDef = &CATALOGUE[5];
/// A user is homed in more than one cluster.
pub const DUPLICATE_USER: &AlarmDef = &CATALOGUE[6];
/// Our copy of a peer's users differs from the peer's directory.
pub const DIRECTORY_MISMATCH: &AlarmDef = &CATALOGUE[7];
/// A peer does not answer.
pub const PEER_UNREACHABLE: &AlarmDef = &CATALOGUE[8];
/// A peer refuses the credential it issued to this cluster.
pub const PEER_AUTH_FAILED: &AlarmDef = &CATALOGUE[9];
/// A channel-bound certificate exchange failed.
pub const CERT_EXCHANGE_FAILED: &AlarmDef = &CATALOGUE[10];
/// A DNS name of a peer does not resolve.
pub const PEER_DNS_FAILURE: &AlarmDef = &CATALOGUE[11];
/// A peer's clock differs from ours by more than 60 s.
pub const PEER_CLOCK_SKEW: &AlarmDef = &CATALOGUE[12];

/// A caller was refused a certificate exchange (it spoke for a peer it is not).
pub const PEER_EXCHANGE_REFUSED: &AlarmDef = &CATALOGUE[13];
/// A peer presented a pinned certificate that has expired.
pub const PEER_CERT_EXPIRED: &AlarmDef = &CATALOGUE[14];
/// The outbox for a remote node reached its cap: messages for it are bounced.
pub const OUTBOX_FULL: &AlarmDef = &CATALOGUE[15];
/// A peer removed this cluster and said so.
pub const PEER_REMOVED_US: &AlarmDef = &CATALOGUE[16];
/// A new node certificate waits for peers to pin it.
pub const CERT_ROTATION_PENDING: &AlarmDef = &CATALOGUE[17];
/// This node's TURN relay holds all the allocations it may.
pub const RELAY_AT_CAPACITY: &AlarmDef = &CATALOGUE[18];
/// This node's TURN relay cannot bind relayed ports.
pub const RELAY_PORTS_UNAVAILABLE: &AlarmDef = &CATALOGUE[19];

/// Every alarm the node can raise.
pub const CATALOGUE: &[AlarmDef] = &[
    AlarmDef {
        name: "NodeCertificateExpiringSoon",
        severity: Severity::Warning,
        meaning: "The node's certificate expires within 30 days.",
        action: "Get a new certificate (impmesh cert csr, then impmesh cert import) or regenerate the self-signed one (impmesh cert regenerate); a running node uses it at once.",
    },
    AlarmDef {
        name: "NodeCertificateExpiring",
        severity: Severity::Critical,
        meaning: "The node's certificate expires within 7 days; clients and peers will then refuse the node.",
        action: "Replace the certificate now (impmesh cert import or impmesh cert regenerate); a running node uses it at once.",
    },
    AlarmDef {
        name: "NodeCertificateExpired",
        severity: Severity::Critical,
        meaning: "The node's certificate has expired; TLS clients and peers refuse the node.",
        action: "Replace the certificate (impmesh cert import or impmesh cert regenerate); a running node uses it at once.",
    },
    AlarmDef {
        name: "InterClusterSyncAgentPeerPeriodicSyncingFailure",
        severity: Severity::Major,
        meaning: "The directory sync with a peer cluster (the subject) has not completed within the stall threshold ([sync] stall_threshold, 2 hours by default); its users' home nodes may be stale here.",
        action: "Check `impmesh peer status PEER` for the reason (unreachable, credential, certificate). With [sync] auto_recovery on, the agent has already restarted that peer's sync, and the whole agent if it stalled again right after. The alarm clears when a sync completes.",
    },
    AlarmDef {
        name: "InterClusterPeerPending",
        severity: Severity::Minor,
        meaning: "A peer cluster (the subject) added this cluster; this cluster does not sync its users until an admin accepts it, so the peering is one-sided.",
        action: "Accept it with `impmesh peer accept PEER` if it is expected, or remove it with `impmesh peer del PEER`.",
    },
    AlarmDef {
        name: "InterClusterPeerCertificateOutOfSync",
        severity: Severity::Major,
        meaning: "A peer cluster (the subject) presents or announces a certificate that is not pinned here (it regenerated or replaced one); syncing with it fails or is incomplete.",
        action: "Check the new certificate with the peer's admin, then run `impmesh peer sync PEER --with-certificates --user NAME` to exchange certificates again through the channel-bound first contact.",
    },
    AlarmDef {
        name: "InterClusterDuplicateUser",
        severity: Severity::Major,
        meaning: "A user name (the subject) is claimed by more than one cluster of the mesh. A cluster that has the account itself keeps serving it locally and never accepts another cluster's claim to it; every other cluster quarantines the name: stanzas to it are bounced with service-unavailable and a text naming the claiming clusters, and no cluster may speak for it over a link.",
        action: "Delete the account in every cluster where it should not be (`impmesh user del NAME` there; docs/peering.md says how to move a user between clusters). The quarantine and the alarm clear by themselves on every cluster once a single claim is left; `impmesh troubleshoot` lists every duplicate.",
    },
    AlarmDef {
        name: "InterClusterDirectoryMismatch",
        severity: Severity::Major,
        meaning: "The anti-entropy check found that this cluster's copy of a peer's users (the subject) differs from the peer's own directory at the same USN: a lost write or a bug. The agent resyncs that peer in full at once.",
        action: "Nothing if it clears within a sync; if it comes back, report it with the logs of both clusters (`directory mismatch` lines).",
    },
    AlarmDef {
        name: "InterClusterPeerUnreachable",
        severity: Severity::Major,
        meaning: "A peer cluster (the subject) has not answered three sync attempts in a row (connection refused, reset or timed out); its users' directory entries here are getting stale.",
        action: "Check that the peer runs and that its HTTPS port (8443) is reachable from this node; `impmesh peer status PEER` shows the error. The alarm clears at the next successful sync.",
    },
    AlarmDef {
        name: "InterClusterPeerAuthenticationFailed",
        severity: Severity::Major,
        meaning: "A peer cluster (the subject) refuses the credential it issued to this cluster (the peering was removed or reset on its side).",
        action: "Re-run the exchange: `impmesh peer sync PEER --with-certificates --user NAME` with the peer's AXL user, or remove and add the peer again.",
    },
    AlarmDef {
        name: "InterClusterCertificateExchangeFailed",
        severity: Severity::Major,
        meaning: "A channel-bound first contact (peer add, or peer sync --with-certificates) with the subject failed: a wrong AXL user or password, a man in the middle, or an unreachable peer. Nothing was sent that could reveal the password, and nothing was pinned.",
        action: "Check the AXL user and password with the peer's admin (`impmesh axl-user set` there) and the network path, then run the command again. The alarm clears when an exchange with the subject succeeds.",
    },
    AlarmDef {
        name: "InterClusterPeerDnsFailure",
        severity: Severity::Minor,
        meaning: "A DNS name of a peer cluster (the subject: its address or a SAN of its certificates) does not resolve. Syncing goes on with the last good addresses.",
        action: "Fix the DNS records named in the message (`impmesh troubleshoot` lists them); the alarm clears when every name resolves.",
    },
    AlarmDef {
        name: "InterClusterPeerClockSkew",
        severity: Severity::Minor,
        meaning: "A peer cluster's clock (the subject) differs from this node's by more than 60 seconds; certificate validity checks and sync timestamps become unreliable.",
        action: "Run NTP on both clusters' nodes; the alarm clears when the difference is back under 60 s.",
    },
    AlarmDef {
        name: "InterClusterPeerExchangeRefused",
        severity: Severity::Major,
        meaning: "A caller (the subject: its address) tried to exchange certificates for a cluster it cannot speak for: an existing peer without that peer's credential or pinned certificate, a certificate it does not hold the key of, or one pinned for another peer. Nothing was changed. One alarm per caller, however often it tries.",
        action: "Find out who runs the caller (the message names the cluster it claimed and the AXL user it logged in as); if it is not a legitimate peer, change the AXL user's password (`impmesh axl-user set`). The alarm clears after an hour without another refused attempt.",
    },
    AlarmDef {
        name: "InterClusterPeerCertificateExpired",
        severity: Severity::Critical,
        meaning: "A node of a peer cluster (the subject) presented a pinned certificate that has expired: its router links and syncs are refused until it has a valid one.",
        action: "The peer's admin renews the node certificate (`impmesh cert regenerate` or `cert import` there); the alarm clears when that node connects with a valid certificate.",
    },
    AlarmDef {
        name: "InterClusterOutboxFull",
        severity: Severity::Major,
        meaning: "The durable outbox for a remote node (the subject) holds [limits] outbox_max_rows messages or outbox_max_bytes bytes: its link has been down long, and new messages for that node's users are bounced to their senders with resource-constraint.",
        action: "Find out why the link is down (`impmesh peer status`; the peer's admin); raise the caps only if the disk allows. The alarm clears when the outbox is below half its caps.",
    },
    AlarmDef {
        name: "InterClusterPeerRemoved",
        severity: Severity::Major,
        meaning: "A peer cluster (the subject) removed this cluster and told it so: nothing is synced from it any more, its users are gone from the directory here, and messages for them are bounced with service-unavailable. The peer shows as `removed` in `impmesh peer status`.",
        action: "If it was meant, remove it here too (`impmesh peer del PEER`, which clears the alarm); if not, peer again (`impmesh peer add` on either side).",
    },
    AlarmDef {
        name: "InterClusterCertificateRotationPending",
        severity: Severity::Warning,
        meaning: "This node has a new certificate (the subject: the node) that some active peers (named in the message) have not pinned yet: it is announced to them again and again, and the old one is still served to peers until they all have it or [sync] certificate_overlap ends.",
        action: "Usually nothing: a peer that is down gets it when it is back. If a peer will not come back, remove it (`impmesh peer del`); for a compromised old key, `impmesh cert end-overlap` puts the new one in use for peers at once (peers that have not pinned it then need `impmesh peer sync NODE --with-certificates` on their side).",
    },
    AlarmDef {
        name: "MediaRelayAtCapacity",
        severity: Severity::Major,
        meaning: "This node's TURN relay (the subject: the node) holds [media] max_allocations allocations: new ones get 508 Insufficient Capacity, and calls of this cluster's users may fail to connect, unless another relay of the cluster with room takes them (300 Try Alternate).",
        action: "Add a node with a relay to the cluster, or raise [media] max_allocations if the machine has the bandwidth (`impmesh_relay_bytes_total`); look for one user holding many (`[media] user_allocations`). Clears below 90 % of the capacity, or at the next start when the relay is not full.",
    },
    AlarmDef {
        name: "MediaRelayPortsUnavailable",
        severity: Severity::Major,
        meaning: "This node's TURN relay (the subject: the node) could not bind a relayed port for an allocation: the range [media] port_min..port_max is used up (by the relay or other programs), or the system refuses the address (relay_ip not on this machine). Those allocations got 508.",
        action: "Check that [media] relay_ip is an address of this machine and that nothing else takes ports of the range (`ss -uan`); widen the range if the relay uses it all. Clears after 5 minutes without another failure.",
    },
];

/// An alarm that is on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActiveAlarm {
    pub name: String,
    pub subject: String,
    pub severity: String,
    pub message: String,
    pub since: i64,
}

/// One raise or clear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlarmEvent {
    pub name: String,
    pub subject: String,
    pub severity: String,
    pub raised: bool,
    pub message: String,
    pub at: i64,
}

impl Store {
    /// Raises an alarm for a subject; true when it was not already on (only then is an
    /// event recorded and logged).
    pub async fn raise_alarm(&self, def: &AlarmDef, subject: &str, message: &str) -> Result<bool> {
        let now = now_unix();
        let mut tx = self.write().await?;
        let inserted = sqlx::query(
            "INSERT INTO alarms_active (name, subject, severity, message, since)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name, subject) DO NOTHING",
        )
        .bind(def.name)
        .bind(subject)
        .bind(def.severity.as_str())
        .bind(message)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            record(
                &mut tx,
                def.name,
                subject,
                def.severity.as_str(),
                true,
                message,
                now,
            )
            .await?;
        }
        tx.commit().await?;
        if inserted {
            tracing::warn!(
                alarm = def.name,
                severity = def.severity.as_str(),
                subject,
                message,
                "alarm raised"
            );
        }
        Ok(inserted)
    }

    /// Clears an alarm for a subject; true when it was on.
    pub async fn clear_alarm(&self, def: &AlarmDef, subject: &str, message: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let removed = sqlx::query("DELETE FROM alarms_active WHERE name = $1 AND subject = $2")
            .bind(def.name)
            .bind(subject)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if removed {
            record(
                &mut tx,
                def.name,
                subject,
                def.severity.as_str(),
                false,
                message,
                now_unix(),
            )
            .await?;
        }
        tx.commit().await?;
        if removed {
            tracing::info!(alarm = def.name, subject, message, "alarm cleared");
        }
        Ok(removed)
    }

    /// The alarms that are on, oldest first.
    pub async fn active_alarms(&self) -> Result<Vec<ActiveAlarm>> {
        let rows = sqlx::query(
            "SELECT name, subject, severity, message, since FROM alarms_active ORDER BY since, name, subject",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ActiveAlarm {
                    name: r.try_get("name")?,
                    subject: r.try_get("subject")?,
                    severity: r.try_get("severity")?,
                    message: r.try_get("message")?,
                    since: r.try_get("since")?,
                })
            })
            .collect()
    }

    /// The latest `limit` raises and clears, newest first.
    pub async fn alarm_history(&self, limit: i64) -> Result<Vec<AlarmEvent>> {
        let rows = sqlx::query(
            "SELECT name, subject, severity, raised, message, at FROM alarm_events ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let raised: i64 = r.try_get("raised")?;
                Ok(AlarmEvent {
                    name: r.try_get("name")?,
                    subject: r.try_get("subject")?,
                    severity: r.try_get("severity")?,
                    raised: raised != 0,
                    message: r.try_get("message")?,
                    at: r.try_get("at")?,
                })
            })
            .collect()
    }
}

async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &str,
    subject: &str,
    severity: &str,
    raised: bool,
    message: &str,
    at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO alarm_events (name, subject, severity, raised, message, at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(name)
    .bind(subject)
    .bind(severity)
    .bind(i64::from(raised))
    .bind(message)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::stores;

    #[tokio::test]
    async fn raise_clear_and_history() {
        for (store, _dir) in stores().await {
            assert!(
                store
                    .raise_alarm(CERT_EXPIRING_SOON, "AA:BB", "expires in 20 days")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .raise_alarm(CERT_EXPIRING_SOON, "AA:BB", "again")
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .raise_alarm(CERT_EXPIRED, "CC:DD", "expired")
                    .await
                    .unwrap()
            );
            let active = store.active_alarms().await.unwrap();
            assert_eq!(active.len(), 2);
            let soon = active
                .iter()
                .find(|a| a.name == CERT_EXPIRING_SOON.name)
                .unwrap();
            assert_eq!(
                (soon.severity.as_str(), soon.subject.as_str()),
                ("warning", "AA:BB")
            );
            assert!(
                store
                    .clear_alarm(CERT_EXPIRING_SOON, "AA:BB", "replaced")
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .clear_alarm(CERT_EXPIRING_SOON, "AA:BB", "replaced")
                    .await
                    .unwrap()
            );
            assert_eq!(store.active_alarms().await.unwrap().len(), 1);
            let history = store.alarm_history(10).await.unwrap();
            let seen: Vec<(&str, bool)> = history
                .iter()
                .map(|e| (e.name.as_str(), e.raised))
                .collect();
            assert_eq!(
                seen,
                [
                    ("NodeCertificateExpiringSoon", false),
                    ("NodeCertificateExpired", true),
                    ("NodeCertificateExpiringSoon", true)
                ]
            );
        }
    }

    #[test]
    fn catalogue_names_are_unique_and_documented() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|a| a.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
        let doc = include_str!("../../ops/alarms.md");
        let rules = include_str!("../../ops/prometheus/alerts.yml");
        for alarm in CATALOGUE {
            assert!(
                doc.contains(alarm.name),
                "{} is missing from ops/alarms.md",
                alarm.name
            );
            assert!(
                rules.contains(&format!("alert: {}\n", alarm.name))
                    && rules.contains(&format!("impmesh_alarm_active{{name=\"{}\"}}", alarm.name)),
                "{} has no rule in ops/prometheus/alerts.yml",
                alarm.name
            );
            assert!(!alarm.meaning.is_empty() && !alarm.action.is_empty());
        }
    }
}
