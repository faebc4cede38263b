//! The task of one peer: it pulls on a period and when nudged, with jittered
//! backoff after failures, and shows what it is doing in the peer's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder as _;
use impmesh_axl::client::ClientError;
use impmesh_axl::soap::{Request, Response};
use impmesh_store::{ClusterName, PeerState};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    Agent, CertificateStatus, LiveStatus, MAX_CLOCK_SKEW, PeerHandle, Progress, SyncState, lock,
};

/// Why one sync attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error("no certificate of this peer is trusted")]
    NothingTrusted,
    #[error(
        "the peer's certificate does not verify against the pinned ones ({error}); \
         if it replaced its certificate, run `impmesh peer sync {cluster} --with-certificates`"
    )]
    CertificateChanged {
        cluster: ClusterName,
        error: std::io::Error,
    },
    #[error("no credential for this peer")]
    NoCredential,
    #[error("cannot check the peer's certificates: {0}")]
    Trust(#[from] impmesh_certs::CertError),
    #[error("{0} answered with something else")]
    UnexpectedAnswer(&'static str),
    #[error(
        "the peer serves the XMPP domain {theirs}, this cluster {ours}: a mesh serves one domain"
    )]
    DomainMismatch { theirs: String, ours: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] impmesh_store::StoreError),
    #[error("the peer {0} was removed")]
    Gone(ClusterName),
}

pub(crate) struct PeerTask {
    pub(crate) agent: Arc<Agent>,
    pub(crate) cluster: ClusterName,
    pub(crate) nudge: Arc<Notify>,
    pub(crate) cancel: CancellationToken,
    pub(crate) status: Arc<Mutex<LiveStatus>>,
    pub(crate) progress: Arc<Mutex<Progress>>,
    /// Which per-peer alarms this task knows to be raised (absent: unknown, so the
    /// first report always reaches the store).
    pub(crate) alarms: Arc<Mutex<HashMap<&'static str, bool>>>,
}

impl Agent {
    /// Starts the task of `cluster` unless it runs.
    pub(crate) fn spawn_peer(self: &Arc<Self>, cluster: &ClusterName, alarmed: bool) {
        let mut peers = lock(&self.peers);
        if peers.contains_key(cluster) {
            return;
        }
        let handle = PeerHandle {
            nudge: Arc::new(Notify::new()),
            cancel: self.shutdown.child_token(),
            status: Arc::new(Mutex::new(LiveStatus::default())),
            progress: Arc::new(Mutex::new(Progress {
                last_completed: tokio::time::Instant::now(),
                last_activity: tokio::time::Instant::now(),
                alarmed,
                last_dns_check: None,
                last_compared: None,
                mismatched: false,
            })),
        };
        let task = PeerTask {
            agent: self.clone(),
            cluster: cluster.clone(),
            nudge: handle.nudge.clone(),
            cancel: handle.cancel.clone(),
            status: handle.status.clone(),
            progress: handle.progress.clone(),
            alarms: Arc::new(Mutex::new(HashMap::new())),
        };
        // Sync at once.
        handle.nudge.notify_one();
        peers.insert(cluster.clone(), handle);
        self.tracker.spawn(task.run());
    }

    pub(crate) fn stop_peer(&self, cluster: &str) {
        if let Some(handle) = lock(&self.peers).remove(cluster) {
            handle.cancel.cancel();
        }
    }

    /// Replaces a peer's task with a fresh one, keeping whether the alarm is raised.
    pub(crate) fn restart_peer(self: &Arc<Self>, cluster: &str) {
        let (cluster, alarmed) = match lock(&self.peers).remove_entry(cluster) {
            Some((cluster, handle)) => {
                handle.cancel.cancel();
                (cluster, lock(&handle.progress).alarmed)
            }
            None => return,
        };
        self.spawn_peer(&cluster, alarmed);
    }

    /// Asks the task of `cluster` to pull now (a `notifyChange` from it).
    pub fn nudge(&self, cluster: &str) {
        if let Some(handle) = lock(&self.peers).get(cluster) {
            handle.nudge.notify_one();
        }
    }
}

impl PeerTask {
    /// Raises (`Some(message)`) or clears (`None`) a per-peer alarm, touching the store
    /// only when the state changes.
    async fn flag(&self, def: &'static impmesh_store::alarms::AlarmDef, on: Option<&str>) {
        flag(&self.agent, &self.alarms, &self.cluster, def, on).await;
    }
}

pub(crate) async fn flag(
    agent: &Agent,
    known: &Mutex<HashMap<&'static str, bool>>,
    cluster: &str,
    def: &'static impmesh_store::alarms::AlarmDef,
    on: Option<&str>,
) {
    if lock(known).get(def.name) == Some(&on.is_some()) {
        return;
    }
    agent.set_alarm(def, cluster, on).await;
    lock(known).insert(def.name, on.is_some());
}

/// The shortest time between two syncs of one peer started by nudges.
pub const NUDGE_SPACING: Duration = Duration::from_millis(500);

/// How long a nudge waits so that syncs started by nudges are [`NUDGE_SPACING`] apart.
fn nudge_wait(last_start: Option<tokio::time::Instant>, now: tokio::time::Instant) -> Duration {
    last_start.map_or(Duration::ZERO, |t| {
        NUDGE_SPACING.saturating_sub(now.saturating_duration_since(t))
    })
}

impl PeerTask {
    async fn run(self) {
        let period = self.agent.settings.period;
        let new_backoff = || {
            backon::ExponentialBuilder::new()
                .with_jitter()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(period.max(Duration::from_secs(1)))
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        let mut delay = period;
        let mut last_start: Option<tokio::time::Instant> = None;
        loop {
            let nudged = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.nudge.notified() => true,
                _ = tokio::time::sleep(delay) => false,
            };
            // Nudges (a peer's notifyChange, our own changes) start a sync at most every
            // NUDGE_SPACING: a peer that calls notifyChange in a loop gets a pull twice a
            // second, not one per call. Nudges meanwhile fold into the one waiting.
            if nudged {
                let wait = nudge_wait(last_start, tokio::time::Instant::now());
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            last_start = Some(tokio::time::Instant::now());
            lock(&self.progress).last_activity = tokio::time::Instant::now();
            let now = impmesh_store::now_unix();
            {
                let mut s = lock(&self.status);
                s.last_attempt_at = Some(now);
                // A routine pull of a peer that is in sync leaves it shown in sync;
                // "syncing" is the first sync, or the one after a failure.
                if s.state != SyncState::InSync {
                    s.state = SyncState::Syncing;
                }
            }
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = self.sync_once() => r,
            };
            lock(&self.progress).last_activity = tokio::time::Instant::now();
            match result {
                Ok(()) => {
                    use impmesh_store::alarms::{PEER_AUTH_FAILED, PEER_UNREACHABLE};
                    self.flag(PEER_UNREACHABLE, None).await;
                    self.flag(PEER_AUTH_FAILED, None).await;
                    let was_alarmed = {
                        let mut p = lock(&self.progress);
                        p.last_completed = tokio::time::Instant::now();
                        std::mem::replace(&mut p.alarmed, false)
                    };
                    if was_alarmed
                        && let Err(e) = self
                            .agent
                            .store
                            .clear_alarm(
                                impmesh_store::alarms::PEER_SYNC_STALLED,
                                &self.cluster,
                                "a sync completed",
                            )
                            .await
                    {
                        tracing::error!(error = %e, "cannot clear the stall alarm");
                    }
                    lock(&self.agent.failures).remove(&self.cluster);
                    let applied = self.agent.store.peer_sync(&self.cluster).await.ok();
                    let users = self.agent.store.remote_user_count(&self.cluster).await.ok();
                    let mut s = lock(&self.status);
                    s.applied_usn = applied.map(|p| p.applied_usn);
                    s.users_here = users;
                    s.state = SyncState::InSync;
                    s.reason = None;
                    s.last_success_at = Some(impmesh_store::now_unix());
                    s.consecutive_failures = 0;
                    backoff = new_backoff();
                    delay = period;
                }
                Err(SyncError::Gone(_)) => return,
                Err(e) => {
                    let failures = {
                        let mut all = lock(&self.agent.failures);
                        let n = all.entry(self.cluster.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let certificate_failed = {
                        let mut s = lock(&self.status);
                        s.state = SyncState::Failed;
                        s.reason = Some(e.to_string());
                        s.consecutive_failures = failures;
                        match &e {
                            SyncError::NothingTrusted | SyncError::CertificateChanged { .. } => {
                                let why = e.to_string();
                                let newly = s.certificate_status != CertificateStatus::Failed;
                                s.certificate_status = CertificateStatus::Failed;
                                s.certificate_reason = Some(why.clone());
                                newly.then_some(why)
                            }
                            _ => None,
                        }
                    };
                    delay = backoff.next().unwrap_or(period);
                    match &e {
                        SyncError::Client(
                            ClientError::Connect(..)
                            | ClientError::Timeout(_)
                            | ClientError::Http(_),
                        ) if failures >= 3 => {
                            let why = format!("{failures} attempts in a row failed; last: {e}");
                            self.flag(impmesh_store::alarms::PEER_UNREACHABLE, Some(&why))
                                .await;
                        }
                        SyncError::Client(ClientError::Status { status, .. })
                            if status.as_u16() == 401 =>
                        {
                            self.flag(
                                impmesh_store::alarms::PEER_AUTH_FAILED,
                                Some(&e.to_string()),
                            )
                            .await;
                        }
                        _ => {}
                    }
                    if let Some(why) = certificate_failed {
                        self.agent
                            .set_alarm(
                                impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
                                &self.cluster,
                                Some(&why),
                            )
                            .await;
                    }
                    tracing::warn!(peer = %self.cluster, error = %e, retry_in = ?delay, "sync failed");
                }
            }
        }
    }

    async fn sync_once(&self) -> Result<(), SyncError> {
        let store = &self.agent.store;
        let peer = store
            .peer(&self.cluster)
            .await?
            .ok_or_else(|| SyncError::Gone(self.cluster.clone()))?;
        if peer.state != PeerState::Active {
            lock(&self.status).state = SyncState::Pending;
            return Ok(());
        }
        let mut client = self.agent.connect(&self.cluster).await?;
        let Response::ClusterInfo(info) = client.call(&Request::GetClusterInfo).await? else {
            return Err(SyncError::UnexpectedAnswer("getClusterInfo"));
        };
        let skew = client.clock_skew();
        lock(&self.status).clock_skew_secs = skew;
        let skewed = skew
            .filter(|s| s.abs() > MAX_CLOCK_SKEW)
            .map(|s| format!("the peer's clock is {s:+} s from this node's"));
        self.flag(impmesh_store::alarms::PEER_CLOCK_SKEW, skewed.as_deref())
            .await;
        if !info.domain.eq_ignore_ascii_case(&self.agent.ours.domain) {
            return Err(SyncError::DomainMismatch {
                theirs: info.domain,
                ours: self.agent.ours.domain.clone(),
            });
        }
        let missing: Vec<String> = self
            .agent
            .settings
            .features
            .iter()
            .filter(|f| !info.features.contains(f))
            .cloned()
            .collect();
        {
            let mut s = lock(&self.status);
            if s.missing_features != missing && !missing.is_empty() {
                tracing::info!(peer = %self.cluster, protocol = info.protocol, missing = ?missing, "the peer does not announce some features; they are not used with it");
            }
            s.peer_protocol = Some(info.protocol);
            s.peer_features = info.features.clone();
            s.missing_features = missing;
        }
        self.check_dns(&peer.address);
        self.check_certificates(&info).await?;
        let nodes = self.remember_nodes(&info, &peer.address).await?;
        let mut sync = store.peer_sync(&self.cluster).await?;
        // Rooms are listed when both sides announce them; when that changes, what we
        // applied no longer says what we have of the peer's rooms: a full sync.
        let rooms = [&self.agent.settings.features, &info.features]
            .iter()
            .all(|f| f.iter().any(|f| f == impmesh_axl::features::ROOMS));
        if sync.rooms != rooms {
            tracing::info!(peer = %self.cluster, rooms, "rooms listed with the directory or no longer; full sync");
            store.resync_with_rooms(&self.cluster, rooms).await?;
            sync = store.peer_sync(&self.cluster).await?;
        }
        let full = sync.full_snapshot_usn.is_some() || sync.applied_usn == 0;
        // A full sync leaves our copy equal to the listing; a sync that found nothing
        // new is the moment to check that it still is (anti-entropy), at most every
        // anti_entropy_interval.
        let quiet = if full {
            self.full_sync(&mut client, &nodes, sync).await?;
            false
        } else {
            match self
                .incremental(&mut client, &nodes, sync.applied_usn, rooms)
                .await
            {
                Err(SyncError::Client(ClientError::Fault(f))) if f.code == "usnTooOld" => {
                    tracing::info!(peer = %self.cluster, "changes no longer kept by the peer; full sync");
                    self.full_sync(&mut client, &nodes, store.peer_sync(&self.cluster).await?)
                        .await?;
                    false
                }
                other => other? == 0,
            }
        };
        let (due, mismatched) = {
            let p = lock(&self.progress);
            let due = p
                .last_compared
                .is_none_or(|t| t.elapsed() >= self.agent.settings.anti_entropy_interval);
            (due, p.mismatched)
        };
        // After a mismatch, the resync is checked at once (and the alarm cleared).
        if (quiet && due) || mismatched {
            self.anti_entropy(&mut client, rooms).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn nudges_start_syncs_at_most_every_spacing() {
        let t0 = tokio::time::Instant::now();
        assert_eq!(nudge_wait(None, t0), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(100)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(
            nudge_wait(Some(t0), now),
            NUDGE_SPACING - Duration::from_millis(100)
        );
        tokio::time::advance(NUDGE_SPACING).await;
        assert_eq!(
            nudge_wait(Some(t0), tokio::time::Instant::now()),
            Duration::ZERO
        );
    }
}
