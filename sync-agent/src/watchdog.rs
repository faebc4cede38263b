//! The stall watchdog's decisions, without I/O: which peers get the stall alarm
//! (`InterClusterSyncAgentPeerPeriodicSyncingFailure`), whose sync is restarted, and
//! when the whole agent is.
//!
//! A peer is *stalled* when no sync with it completed within the threshold (default
//! 7,200 s). It gets the alarm, and with auto-recovery a fresh task for that peer
//! only: the other peers' syncs are never touched for it. A stalled peer's task is
//! either *active* (it keeps attempting: the peer is unreachable, refuses us, …) or
//! *hung* (no attempt started or ended within the threshold: stuck inside an await).
//! Restarting an active task again and again helps nobody, so it is restarted at most
//! once per threshold. Only a task that is hung again after its own restart (so the
//! per-peer restart did not help) restarts every peer's task, the whole agent, in
//! process; a peer that is merely unreachable never does.
//!
//! Time is tokio's: a test with paused time runs the real two-hour default in
//! milliseconds (see the tests below).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Agent, lock};
use impmesh_store::ClusterName;
use std::sync::Arc;

/// What the watchdog sees of one peer's task.
#[derive(Debug, Clone)]
pub(crate) struct PeerView {
    pub cluster: ClusterName,
    /// When a sync last completed (or the task started).
    pub last_completed: Instant,
    /// When an attempt last started or ended (or the task started).
    pub last_activity: Instant,
    /// Whether the stall alarm is raised.
    pub alarmed: bool,
}

/// What the watchdog decided for one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Raise the stall alarm for the peer; it has been `idle` without a completed sync.
    Alarm {
        cluster: ClusterName,
        idle: Duration,
    },
    /// Replace the peer's task with a fresh one.
    RestartPeer(ClusterName),
    /// Replace every peer's task (the whole agent, in process).
    RestartAll,
}

/// The watchdog's memory: per peer, when its task was last restarted and how often.
#[derive(Debug, Default)]
pub(crate) struct Watchdog {
    restarts: HashMap<ClusterName, (Instant, u32)>,
}

impl Watchdog {
    /// Times the watchdog restarted `cluster`'s task.
    pub fn restarts(&self, cluster: &str) -> u32 {
        self.restarts.get(cluster).map_or(0, |r| r.1)
    }

    /// Forgets a peer (removed).
    pub fn forget(&mut self, cluster: &str) {
        self.restarts.remove(cluster);
    }

    /// Decides what to do at `now` for `peers`.
    pub fn tick(
        &mut self,
        now: Instant,
        peers: &[PeerView],
        threshold: Duration,
        auto_recovery: bool,
    ) -> Vec<Action> {
        let mut actions = vec![];
        let mut restart_all = false;
        for p in peers {
            let idle = now.saturating_duration_since(p.last_completed);
            if idle <= threshold {
                continue;
            }
            if !p.alarmed {
                actions.push(Action::Alarm {
                    cluster: p.cluster.clone(),
                    idle,
                });
            }
            if !auto_recovery {
                continue;
            }
            let hung = now.saturating_duration_since(p.last_activity) > threshold;
            let restarted = self.restarts.get(&p.cluster).map(|r| r.0);
            let since_restart = restarted.map(|t| now.saturating_duration_since(t));
            match since_restart {
                // A fresh task gets a whole threshold to show progress.
                Some(d) if d <= threshold => {}
                // Restarted before, and hung again: the per-peer restart did not help.
                Some(_) if hung => restart_all = true,
                _ => {
                    let entry = self.restarts.entry(p.cluster.clone()).or_insert((now, 0));
                    *entry = (now, entry.1 + 1);
                    actions.push(Action::RestartPeer(p.cluster.clone()));
                }
            }
        }
        if restart_all {
            for p in peers {
                let entry = self.restarts.entry(p.cluster.clone()).or_insert((now, 0));
                *entry = (now, entry.1 + 1);
            }
            actions.retain(|a| !matches!(a, Action::RestartPeer(_)));
            actions.push(Action::RestartAll);
        }
        actions
    }
}

impl Agent {
    /// The stall watchdog: every tick, [`Watchdog`] decides from each peer
    /// task's progress which peers get the stall alarm and whose task is restarted (see
    /// the module for the rules); this loop carries it out.
    pub(crate) async fn watch_stalls(self: Arc<Self>) {
        let threshold = self.settings.stall_threshold;
        let tick = (threshold / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let views: Vec<PeerView> = lock(&self.peers)
                .iter()
                .map(|(cluster, h)| {
                    let p = lock(&h.progress);
                    PeerView {
                        cluster: cluster.clone(),
                        last_completed: p.last_completed,
                        last_activity: p.last_activity,
                        alarmed: p.alarmed,
                    }
                })
                .collect();
            let actions = lock(&self.watchdog).tick(
                tokio::time::Instant::now(),
                &views,
                threshold,
                self.settings.auto_recovery,
            );
            for action in actions {
                match action {
                    Action::Alarm { cluster, idle } => {
                        let reason = lock(&self.peers)
                            .get(&cluster)
                            .and_then(|h| lock(&h.status).reason.clone());
                        let message = format!(
                            "no sync with {cluster} completed for {} s{}",
                            idle.as_secs(),
                            reason.map(|r| format!(": {r}")).unwrap_or_default()
                        );
                        if let Err(e) = self
                            .store
                            .raise_alarm(
                                impmesh_store::alarms::PEER_SYNC_STALLED,
                                &cluster,
                                &message,
                            )
                            .await
                        {
                            tracing::error!(error = %e, "cannot raise the stall alarm");
                        }
                        if let Some(h) = lock(&self.peers).get(&cluster) {
                            lock(&h.progress).alarmed = true;
                        }
                    }
                    Action::RestartPeer(cluster) => {
                        tracing::warn!(peer = %cluster, "the peer's sync stalled: restarting its task (only)");
                        self.restart_peer(&cluster);
                    }
                    Action::RestartAll => {
                        tracing::warn!(
                            "a peer's task hung again after its own restart: restarting the whole sync agent"
                        );
                        let all: Vec<ClusterName> = lock(&self.peers).keys().cloned().collect();
                        for c in all {
                            self.restart_peer(&c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: Duration = Duration::from_secs(7200);
    /// The agent's tick for the default threshold: threshold / 4, at most 30 s.
    const TICK: Duration = Duration::from_secs(30);

    /// Three peers over five hours of simulated time with the real two-hour default: one
    /// syncs every minute, one is unreachable (its task keeps attempting), one task
    /// hangs and hangs again after its restart. Only the hung one ever restarts the
    /// whole agent; the unreachable one is restarted alone, once per threshold; the
    /// healthy one is never touched.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_peer_is_restarted_alone_and_only_a_hung_task_restarts_all() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        let mut views = vec![
            PeerView {
                cluster: ClusterName::new("healthy"),
                last_completed: start,
                last_activity: start,
                alarmed: false,
            },
            PeerView {
                cluster: ClusterName::new("unreachable"),
                last_completed: start,
                last_activity: start,
                alarmed: false,
            },
            PeerView {
                cluster: ClusterName::new("hung"),
                last_completed: start,
                last_activity: start,
                alarmed: false,
            },
        ];
        let mut log: Vec<(u64, Action)> = vec![];
        while start.elapsed() < Duration::from_secs(5 * 3600) {
            tokio::time::advance(TICK).await;
            let now = Instant::now();
            // The healthy peer completes a sync every minute; the unreachable one
            // attempts (and fails) every minute; the hung one does nothing.
            if now.duration_since(start).as_secs().is_multiple_of(60) {
                views[0].last_completed = now;
                views[0].last_activity = now;
                views[1].last_activity = now;
            }
            for action in dog.tick(now, &views, THRESHOLD, true) {
                match &action {
                    Action::Alarm { cluster, .. } => {
                        views
                            .iter_mut()
                            .find(|v| &v.cluster == cluster)
                            .unwrap()
                            .alarmed = true;
                    }
                    // A fresh task: completed and active "now" as far as the
                    // watchdog knows (spawn_peer resets its progress).
                    Action::RestartPeer(cluster) => {
                        let v = views.iter_mut().find(|v| &v.cluster == cluster).unwrap();
                        v.last_completed = now;
                        v.last_activity = now;
                    }
                    Action::RestartAll => {
                        for v in views.iter_mut() {
                            v.last_completed = now;
                            v.last_activity = now;
                        }
                    }
                }
                log.push((now.duration_since(start).as_secs(), action));
            }
        }
        let first_stall = THRESHOLD.as_secs() + TICK.as_secs();
        // Both stalled peers alarmed and restarted alone just after two hours.
        assert!(log.contains(&(
            first_stall,
            Action::Alarm {
                cluster: ClusterName::new("unreachable"),
                idle: THRESHOLD + TICK
            }
        )));
        assert!(log.contains(&(first_stall, Action::RestartPeer("unreachable".into()))));
        assert!(log.contains(&(first_stall, Action::RestartPeer("hung".into()))));
        // The hung task hung again: the whole agent, once, two hours later.
        let all: Vec<u64> = log
            .iter()
            .filter(|(_, a)| *a == Action::RestartAll)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(all, [2 * first_stall]);
        // The healthy peer was never alarmed nor restarted by itself.
        assert!(!log.iter().any(|(_, a)| matches!(a,
            Action::Alarm { cluster, .. } | Action::RestartPeer(cluster) if cluster == "healthy")));
        assert!(!views[0].alarmed);
    }

    /// An unreachable peer never restarts the whole agent, however long it lasts.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_peer_never_restarts_the_others() {
        let start = Instant::now();
        let mut dog = Watchdog::default();
        let mut views = vec![PeerView {
            cluster: "away".into(),
            last_completed: start,
            last_activity: start,
            alarmed: true,
        }];
        for _ in 0..(24 * 3600 / TICK.as_secs()) {
            tokio::time::advance(TICK).await;
            let now = Instant::now();
            views[0].last_activity = now;
            let actions = dog.tick(now, &views, THRESHOLD, true);
            assert!(!actions.contains(&Action::RestartAll));
            if actions.contains(&Action::RestartPeer("away".into())) {
                views[0].last_completed = now;
            }
        }
        // Once per threshold (and its first tick past it) in a day.
        assert!(
            (10..=12).contains(&dog.restarts("away")),
            "{}",
            dog.restarts("away")
        );
        // Without auto-recovery: the alarm only.
        let mut dog = Watchdog::default();
        let actions = dog.tick(
            Instant::now(),
            &[PeerView {
                alarmed: false,
                last_completed: start,
                ..views[0].clone()
            }],
            THRESHOLD,
            false,
        );
        assert!(matches!(actions.as_slice(), [Action::Alarm { .. }]));
    }
}
