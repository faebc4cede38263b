//! The node's TURN relay (the bridged media plane, docs/media.md): started with the
//! node on `[listen] turn`, its credentials checked against the cluster's TURN
//! secrets (in the store, rotated every `[media] secret_rotation_hours`), and handed
//! to users through XEP-0215. Each relay registers its address and load in the store
//! every `[media] heartbeat_secs`; one above its load sends new allocations to the
//! least loaded healthy one, and its alarms (at capacity, ports unavailable) follow.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use impmesh_media::core::{Config as CoreConfig, Relay};
use impmesh_media::policy::PeerPolicy;
use impmesh_media::relay::{RelayConfig, RelayHandle, TlsSource};
use impmesh_router::core::extdisco::{Credential, Kind, Service};
use impmesh_store::{RelayLoad, Store, TurnSecret};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// How often the node re-reads the cluster's secrets (a rotation made by another
/// node is seen within this).
const SECRETS_REFRESH: Duration = Duration::from_secs(60);

/// Credentials are minted with the newest secret that every node of the cluster has
/// had time to read (older than two refreshes), so that a relay on another node knows
/// it; relays accept all the secrets in use.
fn minting_secret(secrets: &[TurnSecret], now: i64) -> Option<&TurnSecret> {
    let settled = now - 2 * SECRETS_REFRESH.as_secs() as i64;
    secrets
        .iter()
        .find(|s| s.created <= settled)
        .or_else(|| secrets.first())
}

/// A relay's heartbeats missed before it is no longer sent clients.
const MISSED_HEARTBEATS: i64 = 3;
/// How long MediaRelayPortsUnavailable stays after the last failure.
const PORT_ALARM_CLEARS_AFTER: Duration = Duration::from_secs(300);

/// Where a relay at its load sends new allocations: the healthy relay of the cluster
/// (another node's, heard from since `since`) that is itself below the load, with the
/// smallest share of its capacity in use. Never this relay's own address, nor one a
/// client cannot reach (unspecified; loopback unless this relay's is too).
fn alternate(me: &Registry, relays: &[RelayLoad], since: i64) -> Option<SocketAddr> {
    let percent = i64::from(me.percent);
    let reachable = |a: &SocketAddr| {
        *a != me.address
            && !a.ip().is_unspecified()
            && (!a.ip().is_loopback() || me.address.ip().is_loopback())
    };
    relays
        .iter()
        .filter(|r| r.node != me.node && r.heartbeat >= since && r.capacity > 0)
        .filter(|r| r.allocations.saturating_mul(100) < r.capacity.saturating_mul(percent))
        .filter_map(|r| Some((r, r.address.parse::<SocketAddr>().ok()?)))
        .filter(|(_, a)| reachable(a))
        .min_by(|(a, _), (b, _)| {
            // a.allocations / a.capacity against b's, without division.
            (i128::from(a.allocations) * i128::from(b.capacity))
                .cmp(&(i128::from(b.allocations) * i128::from(a.capacity)))
        })
        .map(|(_, address)| address)
}

/// XEP-0215's view of the relay.
struct Turn {
    secrets: Arc<RwLock<Vec<TurnSecret>>>,
    host: String,
    port: u16,
    /// The TLS port and the host name to reach it by.
    tls: Option<(String, u16)>,
    lifetime: u64,
}

impl impmesh_router::TurnServices for Turn {
    fn services(&self, user: &str) -> Vec<Service> {
        let now = impmesh_store::now_unix();
        let secrets = self.secrets.read().unwrap_or_else(|e| e.into_inner());
        let credential = minting_secret(&secrets, now).map(|s| {
            let c = impmesh_media::auth::mint(&s.secret, user, now.max(0) as u64, self.lifetime);
            Credential {
                username: c.username,
                password: c.password,
                expires: i64::try_from(c.expires).unwrap_or(i64::MAX),
            }
        });
        let service = |kind, transport, credential: Option<Credential>| Service {
            kind,
            host: self.host.clone(),
            port: self.port,
            transport,
            credential,
        };
        let mut services = vec![
            service(Kind::Stun, "udp", None),
            service(Kind::Turn, "udp", credential.clone()),
            service(Kind::Turn, "tcp", credential.clone()),
        ];
        if let Some((host, port)) = &self.tls {
            services.push(Service {
                kind: Kind::Turns,
                host: host.clone(),
                port: *port,
                transport: "tcp",
                credential,
            });
        }
        services
    }
}

/// Starts the relay on `[listen] turn` and gives its services to the router; the
/// relay's handle and bound address.
pub async fn start(
    config: &Config,
    (listen, listen_tls): (SocketAddr, Option<SocketAddr>),
    store: &Store,
    server: &Arc<impmesh_router::Server>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<RelayHandle> {
    let m = &config.media;
    let period = (m.secret_rotation_hours * 3600) as i64;
    let secrets = store
        .turn_secrets(impmesh_store::now_unix(), period)
        .await
        .context("cannot read the cluster's TURN secrets")?;
    let relay_ip = m.relay_ip.unwrap_or(listen.ip());
    let mut own: Vec<IpAddr> = vec![listen.ip(), relay_ip];
    own.extend(m.external_ip);
    let policy = PeerPolicy {
        allow: m
            .allow_peers
            .iter()
            .filter_map(|b| b.parse().ok())
            .collect(),
        own,
        relay_ports: Some(m.port_min..=m.port_max),
    };
    let core = Relay::new(
        CoreConfig {
            realm: config.domain.clone(),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            user_quota: m.user_allocations,
            max_allocations: m.max_allocations,
            // At least one: a relay redirects only once it holds something.
            redirect_above: (m
                .max_allocations
                .saturating_mul(usize::from(m.redirect_above_percent))
                / 100)
                .max(1),
            bandwidth: m.bandwidth_kbps.saturating_mul(125),
            policy,
        },
        secrets.iter().map(|s| s.secret.clone()).collect(),
    );
    let tls = listen_tls.map(|addr| {
        let server = server.clone();
        let source: TlsSource = Arc::new(move || server.client_tls());
        (addr, source)
    });
    let relay = RelayHandle::start(
        RelayConfig {
            listen,
            tls,
            relay_ip,
            external_ip: m.external_ip,
            ports: m.port_min..=m.port_max,
            dscp: m.dscp,
        },
        core,
        shutdown.clone(),
        tasks,
    )
    .await
    .with_context(|| match listen_tls {
        Some(tls) => format!("cannot listen on {listen} (turn) or {tls} (turns)"),
        None => format!("cannot listen on {listen} (turn)"),
    })?;
    let host = m
        .host
        .clone()
        .unwrap_or_else(|| m.external_ip.unwrap_or(relay_ip).to_string());
    let shared = Arc::new(RwLock::new(secrets));
    server.set_turn_services(Arc::new(Turn {
        secrets: shared.clone(),
        port: relay.udp_addr().port(),
        // TLS clients check the certificate: the name it covers.
        tls: relay.tls_addr().map(|a| {
            (
                m.host.clone().unwrap_or_else(|| config.domain.clone()),
                a.port(),
            )
        }),
        host,
        lifetime: m.credential_lifetime,
    }));
    tasks.spawn(registry(
        Registry {
            node: config.node_name(),
            address: SocketAddr::new(m.external_ip.unwrap_or(relay_ip), relay.udp_addr().port()),
            capacity: m.max_allocations,
            percent: m.redirect_above_percent,
            heartbeat: Duration::from_secs(m.heartbeat_secs),
        },
        relay.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    // The secrets rotate: re-read them every minute, for the relay and for minting.
    let (store, handle) = (store.clone(), relay.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(SECRETS_REFRESH);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match store.turn_secrets(impmesh_store::now_unix(), period).await {
                Ok(secrets) => {
                    handle.set_secrets(secrets.iter().map(|s| s.secret.clone()).collect());
                    *shared.write().unwrap_or_else(|e| e.into_inner()) = secrets;
                }
                Err(e) => tracing::error!(error = %e, "cannot read the cluster's TURN secrets; the ones in use stay"),
            }
        }
    });
    tracing::info!(udp = %relay.udp_addr(), tcp = %relay.tcp_addr(), tls = ?relay.tls_addr(), "TURN relay listening");
    Ok(relay)
}

/// Clears the relay's alarms for `node` (when the node runs no relay).
pub async fn clear_alarms(store: &Store, node: &str) {
    use impmesh_store::alarms::{RELAY_AT_CAPACITY, RELAY_PORTS_UNAVAILABLE};
    for def in [RELAY_AT_CAPACITY, RELAY_PORTS_UNAVAILABLE] {
        if let Err(e) = store.clear_alarm(def, node, "the relay is off").await {
            tracing::warn!(error = %e, alarm = def.name, "cannot clear a relay alarm");
        }
    }
}

/// This relay in the cluster's registry.
struct Registry {
    node: String,
    address: SocketAddr,
    capacity: usize,
    percent: u8,
    heartbeat: Duration,
}

/// Every heartbeat: publishes this relay's load, picks where to send allocations
/// above it, and raises or clears the relay's alarms. At shutdown, leaves the
/// registry so that no relay sends clients here meanwhile.
async fn registry(me: Registry, relay: RelayHandle, store: Store, shutdown: CancellationToken) {
    use impmesh_store::alarms::{RELAY_AT_CAPACITY, RELAY_PORTS_UNAVAILABLE};
    let mut tick = tokio::time::interval(me.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut failures_seen, mut last_failure) = (0, None::<tokio::time::Instant>);
    // As if both were on: the first heartbeat clears what an earlier run of the node
    // left raised (alarms outlive the process).
    let (mut at_capacity, mut ports_alarm) = (true, true);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => break,
        }
        let now = impmesh_store::now_unix();
        let allocations = relay.load();
        let load = RelayLoad {
            node: me.node.clone(),
            address: me.address.to_string(),
            allocations: i64::try_from(allocations).unwrap_or(i64::MAX),
            capacity: i64::try_from(me.capacity).unwrap_or(i64::MAX),
            heartbeat: now,
        };
        if let Err(e) = store.publish_relay(&load).await {
            tracing::warn!(error = %e, "cannot publish the relay's load");
        }
        let since = now - MISSED_HEARTBEATS * me.heartbeat.as_secs() as i64;
        match store.relays(since).await {
            Ok(relays) => relay.set_alternate(alternate(&me, &relays, since)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's relays; allocations stay here")
            }
        }
        // The alarms: raised and cleared on a change only. At capacity until the load
        // is below 90 % of it, so that churn at the edge does not flap.
        let full = if at_capacity {
            allocations.saturating_mul(10) >= me.capacity.saturating_mul(9)
        } else {
            allocations >= me.capacity
        };
        if full != at_capacity {
            let message = format!("{allocations} allocations of {}", me.capacity);
            let done = if full {
                store
                    .raise_alarm(RELAY_AT_CAPACITY, &me.node, &message)
                    .await
            } else {
                store
                    .clear_alarm(RELAY_AT_CAPACITY, &me.node, &message)
                    .await
            };
            at_capacity = if done.is_ok() { full } else { at_capacity };
        }
        let failures = relay.port_failures();
        if failures > failures_seen {
            last_failure = Some(tokio::time::Instant::now());
        }
        let failing = last_failure.is_some_and(|t| t.elapsed() < PORT_ALARM_CLEARS_AFTER);
        if failing != ports_alarm {
            let done = if failing {
                let message = format!(
                    "{} allocations refused for want of a relayed port",
                    failures - failures_seen
                );
                store
                    .raise_alarm(RELAY_PORTS_UNAVAILABLE, &me.node, &message)
                    .await
            } else {
                store
                    .clear_alarm(
                        RELAY_PORTS_UNAVAILABLE,
                        &me.node,
                        "relayed ports bind again",
                    )
                    .await
            };
            ports_alarm = if done.is_ok() { failing } else { ports_alarm };
        }
        failures_seen = failures;
    }
    if let Err(e) = store.remove_relay(&me.node).await {
        tracing::warn!(error = %e, "cannot take the relay out of the cluster's registry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_above_the_load_go_to_the_least_loaded_healthy_relay() {
        let r = |node: &str, allocations, capacity, heartbeat, port| RelayLoad {
            node: node.into(),
            address: format!("192.0.2.1:{port}"),
            allocations,
            capacity,
            heartbeat,
        };
        let at = |port: u16| Some(SocketAddr::from(([192, 0, 2, 1], port)));
        let me = Registry {
            node: "me".into(),
            address: SocketAddr::from(([192, 0, 2, 1], 1)),
            capacity: 100,
            percent: 80,
            heartbeat: Duration::from_secs(10),
        };
        let relays = vec![
            r("me", 90, 100, 100, 1),
            r("busy", 85, 100, 100, 2),
            r("half", 500, 1000, 100, 3),
            r("quiet", 30, 100, 100, 4),
            r("silent", 0, 100, 50, 5),
        ];
        // Not itself, not one above the load (80 %), not one silent since 90: the
        // smallest share in use.
        assert_eq!(alternate(&me, &relays, 90), at(4));
        assert_eq!(alternate(&me, &relays[..3], 90), at(3));
        // By share, not by count: 50 of 100 is more than 400 of 1000.
        let two = [r("a", 50, 100, 100, 6), r("b", 400, 1000, 100, 7)];
        assert_eq!(alternate(&me, &two, 90), at(7));
        // Nobody with room: allocations stay here.
        assert_eq!(alternate(&me, &relays[..2], 90), None);
        let mut unparsable = r("x", 0, 100, 100, 9);
        unparsable.address = "nowhere".into();
        assert_eq!(alternate(&me, &[unparsable], 90), None);
        // Never an address a client cannot use: this relay's own under another name,
        // an unspecified one, loopback seen from a relay that is not on loopback.
        let mut unusable = vec![r("alias", 0, 100, 100, 1)];
        for address in ["0.0.0.0:3478", "127.0.0.1:3478"] {
            let mut row = r("y", 0, 100, 100, 0);
            row.address = address.into();
            unusable.push(row);
        }
        assert_eq!(alternate(&me, &unusable, 90), None);
        // Relays all on loopback (one machine) may send clients to each other.
        let local = Registry {
            address: "127.0.0.1:3478".parse().unwrap(),
            ..me
        };
        let mut other = r("z", 0, 100, 100, 0);
        other.address = "127.0.0.1:3479".into();
        assert_eq!(
            alternate(&local, &[other], 90),
            Some("127.0.0.1:3479".parse().unwrap())
        );
    }

    #[test]
    fn credentials_use_a_secret_every_node_has_read() {
        let s = |created| TurnSecret {
            secret: vec![created as u8],
            created,
        };
        // Just rotated: the previous secret mints until the new one has settled.
        let secrets = vec![s(1000), s(0)];
        assert_eq!(minting_secret(&secrets, 1010).unwrap().created, 0);
        assert_eq!(minting_secret(&secrets, 1120).unwrap().created, 1000);
        // A fresh cluster has only the new one.
        assert_eq!(minting_secret(&[s(1000)], 1010).unwrap().created, 1000);
        assert_eq!(minting_secret(&[], 1010), None);
    }
}
