//! Who may run `exchangeCertificates` for which cluster (docs/peering.md, "What a
//! peer may do").
//!
//! The intercluster application user is one login that every new peer uses, so it
//! proves only that the caller was given the password, not which cluster it is. It
//! therefore authorizes exactly one thing: a first contact that creates a peer whose
//! cluster name is not known here yet. An existing peer's pins, address and
//! credentials change only when the call is authenticated *as that peer* (the peer
//! credential we issued to it, or a client certificate already pinned for it), or by
//! a local admin (`impmesh peer del`, `impmesh trust`).
//!
//! A certificate is pinned only if the caller proves it holds its key: it must be the
//! client certificate presented on this very TLS connection (rustls checked the
//! handshake signature). Nobody can pin a victim's public certificate under a made-up
//! name, and a certificate pinned for one peer is never pinned for another.
//!
//! Every refusal is logged, counted as an authentication failure of the caller's
//! address (the usual throttle then applies) and raises
//! `InterClusterPeerExchangeRefused` for the caller: one alarm per caller however
//! often it tries (the history records a raise, not every attempt), cleared after an
//! hour without another refusal.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use impmesh_store::{PeerState, TrustKind};
use rustls_pki_types::CertificateDer;

use crate::NodeControl;
use crate::server::{ConnInfo, Https};
use crate::soap::{Fault, NodeCertificate};

/// How long a refused caller's alarm stays after its last refused attempt.
pub const REFUSAL_ALARM_HOLD: Duration = Duration::from_secs(3600);
/// Callers tracked at most; beyond it the oldest is forgotten (its alarm then clears
/// at the next sweep), so a caller with many addresses cannot grow the map.
const MAX_TRACKED_CALLERS: usize = 1024;

/// What an authorized exchange may pin and change.
pub(crate) struct Proven {
    /// The certificate the caller presented and listed: the only one pinned.
    pub cert: CertificateDer<'static>,
    /// The state of the peer before this call (`None`: a first contact).
    pub existing: Option<PeerState>,
}

/// Why an exchange was refused: what the caller reads (as a SOAP fault) and what the
/// alarm says.
#[derive(Debug)]
pub(crate) struct Refusal {
    code: &'static str,
    reason: String,
}

fn refusal(code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// Decides whether the caller (`user` on connection `conn`) may exchange certificates
/// as `cluster`, and which certificate is proven.
pub(crate) async fn authorize<C: NodeControl>(
    https: &Https<C>,
    conn: &ConnInfo,
    user: &str,
    cluster: &str,
    listed: &[NodeCertificate],
) -> Result<Proven, Refusal> {
    let store = &https.store;
    let internal = |e: impmesh_store::StoreError| refusal("storeUnavailable", e.to_string());
    if let Some(other) = user.strip_prefix("peer:")
        && !other.eq_ignore_ascii_case(cluster)
    {
        return Err(refusal(
            "forbidden",
            format!("authenticated as the peer {other}, which cannot speak for {cluster}"),
        ));
    }
    let Some(cert) = conn.client_cert.clone() else {
        return Err(refusal(
            "proofOfPossession",
            "no client certificate on this TLS connection: a certificate is pinned only \
             when the caller presents it (proving it holds the key)",
        ));
    };
    let fingerprint = impmesh_certs::fingerprint(&cert);
    if !listed
        .iter()
        .any(|c| c.fingerprint.eq_ignore_ascii_case(&fingerprint))
    {
        return Err(refusal(
            "proofOfPossession",
            format!(
                "the certificate presented on this connection ({fingerprint}) is not among those listed"
            ),
        ));
    }
    let trust = store.trust_entries().await.map_err(internal)?;
    let pinned_for = trust
        .iter()
        .find(|e| e.fingerprint == fingerprint)
        .and_then(|e| {
            (e.kind == TrustKind::Pinned)
                .then(|| e.peer.clone())
                .flatten()
        });
    if let Some(owner) = &pinned_for
        && !owner.eq_ignore_ascii_case(cluster)
    {
        return Err(refusal(
            "certificateInUse",
            format!("certificate {fingerprint} is pinned here for {owner}, not {cluster}"),
        ));
    }
    if store
        .cluster_nodes(&https.identity.cluster)
        .await
        .map_err(internal)?
        .iter()
        .any(|n| n.fingerprint == fingerprint)
    {
        return Err(refusal(
            "certificateInUse",
            format!("certificate {fingerprint} is this cluster's own"),
        ));
    }
    let existing = store.peer(cluster).await.map_err(internal)?;
    if existing.is_some() {
        let as_that_peer = user.eq_ignore_ascii_case(&format!("peer:{cluster}"));
        let by_pin = pinned_for.is_some();
        if !as_that_peer && !by_pin {
            return Err(refusal(
                "forbidden",
                format!(
                    "{cluster} is already a peer of this cluster: its certificates, address \
                     and credentials change only when it calls with its own peer credential \
                     or a certificate pinned for it, or by an admin here"
                ),
            ));
        }
    } else if user.starts_with("peer:") {
        // A peer credential for a cluster that is gone (deleted meanwhile).
        return Err(refusal("forbidden", format!("{cluster} is not a peer")));
    } else {
        let peers = store.peers().await.map_err(internal)?.len();
        if peers >= https.limits.max_peers {
            return Err(refusal(
                "tooManyPeers",
                format!(
                    "this cluster already has {peers} peers, the most it takes ([sync] max_peers; a mesh is at most 30 clusters)"
                ),
            ));
        }
    }
    Ok(Proven {
        cert,
        existing: existing.map(|p| p.state),
    })
}

/// The callers refused lately, by alarm subject, with when they last were.
#[derive(Debug, Default)]
pub struct Refusals {
    last: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// The alarm subject of a caller: its address, an IPv6 caller's /64 (one host gets a
/// whole /64, so one alarm per host).
fn caller_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

impl Refusals {
    /// Notes a refusal; true when the caller's alarm is not raised yet.
    fn note(&self, subject: &str) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let new = !last.contains_key(subject);
        if new && last.len() >= MAX_TRACKED_CALLERS {
            let oldest = last.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                last.remove(&k);
            }
        }
        last.insert(subject.to_owned(), tokio::time::Instant::now());
        new
    }

    /// The callers whose last refusal is older than the hold, forgotten.
    fn expired(&self) -> Vec<String> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = last
            .iter()
            .filter(|(_, t)| t.elapsed() >= REFUSAL_ALARM_HOLD)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            last.remove(k);
        }
        gone
    }

    fn tracks(&self, subject: &str) -> bool {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(subject)
    }
}

impl<C: NodeControl> Https<C> {
    /// Records a refused exchange (log, throttle, alarm) and turns it into the fault
    /// the caller gets.
    pub(crate) async fn refuse_exchange(
        &self,
        conn: &ConnInfo,
        user: &str,
        cluster: &str,
        refusal: Refusal,
    ) -> Fault {
        let ip = conn.peer.ip();
        match refusal.code {
            "storeUnavailable" => {
                tracing::error!(error = %refusal.reason, "store error in exchangeCertificates");
                return Fault::server("storeUnavailable", "the store failed; retry later");
            }
            // Not an attempt to speak for someone else: no alarm, no throttle.
            "tooManyPeers" => {
                tracing::warn!(%ip, claimed = %cluster, reason = %refusal.reason, "exchangeCertificates refused");
                return Fault::client(refusal.code, refusal.reason);
            }
            _ => {}
        }
        tracing::warn!(%ip, %user, claimed = %cluster, reason = %refusal.reason, "exchangeCertificates refused");
        let subject = caller_subject(ip);
        if self.refusals.note(&subject) {
            let message = format!(
                "{ip} (AXL user {user}) asked to exchange certificates as {cluster}: {}",
                refusal.reason
            );
            if let Err(e) = self
                .store
                .raise_alarm(
                    impmesh_store::alarms::PEER_EXCHANGE_REFUSED,
                    &subject,
                    &message,
                )
                .await
            {
                tracing::error!(error = %e, "cannot raise an alarm");
            }
        }
        // Counted like a wrong password: a caller that keeps trying is throttled.
        let _ = self.auth.fail(ip, "exchangeCertificates refused").await;
        Fault::client(refusal.code, refusal.reason)
    }

    /// Clears the refusal alarms of callers quiet for [`REFUSAL_ALARM_HOLD`], once a
    /// minute until shutdown. Alarms left from before a restart get a full hold.
    pub(crate) async fn sweep_refusals(&self) {
        let def = impmesh_store::alarms::PEER_EXCHANGE_REFUSED;
        if let Ok(active) = self.store.active_alarms().await {
            for a in active.iter().filter(|a| a.name == def.name) {
                if !self.refusals.tracks(&a.subject) {
                    self.refusals.note(&a.subject);
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = self.shutdown_token().cancelled() => return,
                _ = tick.tick() => {}
            }
            for subject in self.refusals.expired() {
                if let Err(e) = self
                    .store
                    .clear_alarm(def, &subject, "no refused attempt for an hour")
                    .await
                {
                    tracing::error!(error = %e, "cannot clear an alarm");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_caller_is_one_subject_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(caller_subject(a), caller_subject(b));
        assert_eq!(caller_subject("192.0.2.7".parse().unwrap()), "192.0.2.7");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_caller_is_one_alarm_until_an_hour_of_quiet() {
        let r = Refusals::default();
        assert!(r.note("192.0.2.7"), "the first refusal raises");
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(!r.note("192.0.2.7"), "a second one does not");
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert!(
            r.expired().is_empty(),
            "an hour since the first, not the last"
        );
        tokio::time::advance(Duration::from_secs(1801)).await;
        assert_eq!(r.expired(), ["192.0.2.7"]);
        assert!(r.note("192.0.2.7"), "raised again after the clear");
    }

    #[test]
    fn the_tracked_callers_are_bounded() {
        let r = Refusals::default();
        for i in 0..(MAX_TRACKED_CALLERS + 10) {
            r.note(&format!("caller{i}"));
        }
        assert_eq!(r.last.lock().unwrap().len(), MAX_TRACKED_CALLERS);
    }
}
