//! The node's TURN relay (the bridged media plane, docs/media.md): started with the
//! node on `[listen] turn`, its credentials checked against the cluster's TURN
//! secrets (in the store, rotated every `[media] secret_rotation_hours`), and handed
//! to users through XEP-0215.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use impmesh_media::core::{Config as CoreConfig, Relay};
use impmesh_media::policy::PeerPolicy;
use impmesh_media::relay::{RelayConfig, RelayHandle, TlsSource};
use impmesh_router::core::extdisco::{Credential, Kind, Service};
use impmesh_store::{Store, TurnSecret};
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

#[cfg(test)]
mod tests {
    use super::*;

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
