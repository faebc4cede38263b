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

use std::time::Duration;

use impmesh_store::{PeerState, TrustKind};
use rustls_pki_types::CertificateDer;

use crate::NodeControl;
use crate::refusals::caller_subject;
use crate::soap::{Fault, NodeCertificate};
use crate::state::{ConnInfo, Https};

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

    /// Clears the refusal alarms of callers quiet for [`crate::refusals::REFUSAL_ALARM_HOLD`], once a
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
