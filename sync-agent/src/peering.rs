//! Peering: the channel-bound first contact, accepting and removing peers, a
//! forced resync, certificate announcements, change notifications, and connecting
//! to a peer as it is pinned.

use std::sync::Arc;
use std::time::Duration;

use impmesh_axl::client::{AxlClient, ClientError, OurSide, ServerTrust};
use impmesh_axl::soap::{ClusterInfo, NodeCertificate, Request, Response};
use impmesh_certs::PeerVerifier;
use impmesh_store::{ClusterName, PeerRecord, PeerState, TrustKind};

use crate::task::SyncError;
use crate::{Agent, AgentError, DuplicateScope, lock};

impl Agent {
    /// Announces this node's new certificate to `cluster` over the channel it already
    /// trusts (its pinned certificate, the credential it issued to us), presenting the
    /// new certificate as the TLS client certificate so that the peer can pin it
    /// (make-before-break: the peer keeps the old pin). The peering's credentials are
    /// renewed on the way. Ok means the peer pinned it.
    pub async fn announce_certificate(
        &self,
        cluster: &str,
        new: &impmesh_certs::NodeIdentity,
    ) -> Result<(), AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        };
        let token = peer
            .our_token
            .clone()
            .ok_or_else(|| AgentError::NoCredential(ClusterName::new(cluster)))?;
        let contact = |source| AgentError::Contact {
            addr: peer.address.clone(),
            source,
        };
        let anchors = self.store.trust_anchors(Some(cluster)).await?;
        let verifier = PeerVerifier::new(&anchors)?;
        let mut client = self
            .connect_to_as(
                &peer.address,
                &peer.server_name,
                ServerTrust::Verified(verifier),
                Some(new),
            )
            .await
            .map_err(contact)?;
        client
            .use_peer_token(&self.ours.cluster, &token)
            .map_err(contact)?;
        let (chain, _) = new.client_auth();
        let leaf = chain.first().ok_or(AgentError::EmptyChain)?;
        let issued = impmesh_axl::auth::random_token();
        let request = Request::ExchangeCertificates {
            cluster: self.ours.cluster.to_string(),
            address: self.ours.address.clone(),
            server_name: self.ours.server_name.clone(),
            token: issued.clone(),
            certificates: vec![NodeCertificate {
                node: self.ours.server_name.clone(),
                fingerprint: new.fingerprint(),
                pem: impmesh_certs::pem_encode("CERTIFICATE", leaf.as_ref()),
            }],
        };
        let Response::Exchanged { token, .. } = client.call(&request).await.map_err(contact)?
        else {
            return Err(AgentError::UnexpectedAnswer("exchangeCertificates"));
        };
        self.store
            .upsert_peer(&PeerRecord {
                our_token: Some(token),
                their_token_hash: Some(impmesh_axl::auth::token_hash(&issued)),
                ..peer
            })
            .await?;
        tracing::info!(peer = %cluster, sha256 = %new.fingerprint(), "the peer pinned our new certificate");
        Ok(())
    }

    /// `peer add`: the channel-bound first contact with the AXL endpoint at `address`
    /// (host or host:port, default port 8443) as `user`, then syncing from it. The peer
    /// records us as a pending peer until its admin accepts.
    pub async fn add_peer(
        self: &Arc<Self>,
        address: &str,
        user: &str,
        password: &str,
    ) -> Result<PeerRecord, AgentError> {
        let (addr, server_name) = normalize_address(address)?;
        let peers = self.store.peers().await?;
        if peers.len() >= self.settings.max_peers && !peers.iter().any(|p| p.address == addr) {
            return Err(AgentError::TooManyPeers(peers.len()));
        }
        let peering = self
            .first_contact(&addr, &server_name, user, password, None)
            .await?;
        let cluster = peering.0.cluster.clone();
        let now = impmesh_store::now_unix();
        let record = PeerRecord {
            cluster: cluster.as_str().into(),
            address: addr,
            server_name,
            state: PeerState::Active,
            added_here: true,
            our_token: Some(peering.1),
            their_token_hash: Some(peering.2),
            added_at: now,
            accepted_at: Some(now),
        };
        self.store.upsert_peer(&record).await?;
        // An earlier pending record keeps its origin; make it active.
        self.store.accept_peer(&cluster).await?;
        self.clear_alarm(
            impmesh_store::alarms::PEER_PENDING,
            &cluster,
            "added here too",
        )
        .await;
        self.spawn_peer(&record.cluster, false);
        tracing::info!(peer = %cluster, address = %record.address, "peer added");
        Ok(self.store.peer(&cluster).await?.unwrap_or(record))
    }

    /// Runs the first contact (as the existing peering when `peer_token` is given);
    /// returns the peer's cluster info, the token to call it with, the hash of the
    /// token we issued to it, and the certificates the peer listed.
    async fn first_contact(
        &self,
        addr: &str,
        server_name: &str,
        user: &str,
        password: &str,
        peer_token: Option<&str>,
    ) -> Result<(ClusterInfo, String, String, Vec<NodeCertificate>), AgentError> {
        let issued = impmesh_axl::auth::random_token();
        let identity = self.identity()?;
        let ours = OurSide {
            domain: self.ours.domain.clone(),
            cluster: self.ours.cluster.to_string(),
            address: self.ours.address.clone(),
            server_name: self.ours.server_name.clone(),
            token: issued.clone(),
            certificates: self.our_certificates().await?,
        };
        let contact = |source| AgentError::Contact {
            addr: addr.to_owned(),
            source,
        };
        let (host, port) =
            split_host_port(addr).ok_or_else(|| AgentError::Address(addr.to_owned()))?;
        let resolved = self.dns.resolve(host).await;
        let target = resolved
            .addresses
            .first()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| std::net::SocketAddr::new(ip, port).to_string())
            .ok_or_else(|| {
                contact(ClientError::Unresolved {
                    host: host.to_owned(),
                    reason: resolved.error.clone().unwrap_or_default(),
                })
            })?;
        let def = impmesh_store::alarms::CERT_EXCHANGE_FAILED;
        let peering = match impmesh_axl::client::exchange_certificates(
            &self.store,
            &target,
            server_name,
            (user, password),
            ours,
            &identity,
            peer_token,
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                let message = format!("with {addr} as {user}: {e}");
                self.set_alarm(def, addr, Some(&message)).await;
                return Err(contact(e));
            }
        };
        self.clear_alarm(def, addr, "an exchange succeeded").await;
        Ok((
            peering.info,
            peering.token,
            impmesh_axl::auth::token_hash(&issued),
            peering.certificates,
        ))
    }

    /// `peer accept`: starts syncing from a peer that added us.
    pub async fn accept_peer(self: &Arc<Self>, cluster: &str) -> Result<(), AgentError> {
        if !self.store.accept_peer(cluster).await? {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        }
        self.clear_alarm(impmesh_store::alarms::PEER_PENDING, cluster, "accepted")
            .await;
        self.spawn_peer(&ClusterName::new(cluster), false);
        tracing::info!(peer = %cluster, "peer accepted");
        Ok(())
    }

    /// `peer del`: stops syncing and removes the peer, its users and its pinned
    /// certificates at once.
    ///
    /// A peer that announces `peer-removal` is told first (with its own credential,
    /// so that it shows us as removed at once); one that does not (an older release,
    /// or the feature turned off there) finds out at its next sync, as an
    /// authentication alarm. Returns whether the peer was told.
    pub async fn delete_peer(&self, cluster: &str) -> Result<bool, AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        };
        let speaks_removal = lock(&self.peers).get(cluster).is_some_and(|h| {
            lock(&h.status)
                .peer_features
                .iter()
                .any(|f| f == impmesh_axl::features::PEER_REMOVAL)
        }) && self
            .settings
            .features
            .iter()
            .any(|f| f == impmesh_axl::features::PEER_REMOVAL);
        let told = if speaks_removal && peer.state != PeerState::Removed {
            let call = async {
                let mut client = self.connect(cluster).await?;
                client
                    .call(&Request::RemovePeer {
                        cluster: self.ours.cluster.to_string(),
                    })
                    .await
                    .map_err(SyncError::Client)
            };
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %cluster, error = %e, "could not tell the peer it was removed; it finds out at its next sync");
                    false
                }
                Err(_) => {
                    tracing::warn!(peer = %cluster, "the peer did not answer removePeer in time; it finds out at its next sync");
                    false
                }
            }
        } else {
            false
        };
        self.stop_peer(cluster);
        lock(&self.watchdog).forget(cluster);
        if !self.store.delete_peer(cluster).await? {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        }
        for def in [
            impmesh_store::alarms::PEER_PENDING,
            impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
            impmesh_store::alarms::PEER_SYNC_STALLED,
            impmesh_store::alarms::PEER_UNREACHABLE,
            impmesh_store::alarms::PEER_AUTH_FAILED,
            impmesh_store::alarms::PEER_DNS_FAILURE,
            impmesh_store::alarms::PEER_CLOCK_SKEW,
            impmesh_store::alarms::DIRECTORY_MISMATCH,
        ] {
            self.clear_alarm(def, cluster, "the peer was removed").await;
        }
        self.clear_alarm(
            impmesh_store::alarms::PEER_REMOVED_US,
            cluster,
            "removed here too",
        )
        .await;
        self.request_duplicate_check(DuplicateScope::All);
        tracing::info!(peer = %cluster, told, "peer deleted");
        Ok(told)
    }

    /// A peer told us (authenticated as itself) that it removed this cluster: its
    /// sync stops, its users leave the directory, it shows as `removed`, and
    /// `InterClusterPeerRemoved` says what to do.
    pub async fn peer_removed_us(&self, cluster: &str) -> Result<(), AgentError> {
        self.stop_peer(cluster);
        lock(&self.watchdog).forget(cluster);
        if !self.store.mark_peer_removed(cluster).await? {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        }
        for def in [
            impmesh_store::alarms::PEER_PENDING,
            impmesh_store::alarms::PEER_SYNC_STALLED,
            impmesh_store::alarms::PEER_UNREACHABLE,
            impmesh_store::alarms::PEER_AUTH_FAILED,
        ] {
            self.clear_alarm(def, cluster, "the peer removed this cluster")
                .await;
        }
        let message = format!(
            "{cluster} removed this cluster as a peer: its users are no longer reachable from \
             here; remove it here too with `impmesh peer del {cluster}`, or peer again \
             (`impmesh peer add` on either side)"
        );
        self.set_alarm(
            impmesh_store::alarms::PEER_REMOVED_US,
            cluster,
            Some(&message),
        )
        .await;
        self.request_duplicate_check(DuplicateScope::All);
        Ok(())
    }

    /// `peer sync`: a full resync at once; with `credential`, the certificates are
    /// exchanged again first through a new channel-bound first contact (the repair for
    /// a peer that changed its certificate).
    pub async fn force_sync(
        self: &Arc<Self>,
        cluster: &str,
        credential: Option<(&str, &str)>,
    ) -> Result<(), AgentError> {
        let Some(peer) = self.store.peer(cluster).await? else {
            return Err(AgentError::UnknownPeer(ClusterName::new(cluster)));
        };
        if let Some((user, password)) = credential {
            // Make-before-break: the old pins stay until the exchange pinned what the
            // peer presents now; a failed exchange changes nothing.
            let (info, token, hash, listed) = self
                .first_contact(
                    &peer.address,
                    &peer.server_name,
                    user,
                    password,
                    peer.our_token.as_deref(),
                )
                .await?;
            if info.cluster != cluster {
                return Err(AgentError::ClusterChanged {
                    address: peer.address,
                    cluster: ClusterName::new(cluster),
                    now: ClusterName::new(info.cluster),
                });
            }
            self.stop_peer(cluster);
            self.store
                .upsert_peer(&PeerRecord {
                    our_token: Some(token),
                    their_token_hash: Some(hash),
                    ..peer.clone()
                })
                .await?;
            // Then the pins of certificates the peer no longer lists go.
            for entry in self.store.trust_entries().await? {
                if entry.kind == TrustKind::Pinned
                    && entry.peer.as_deref() == Some(cluster)
                    && !listed
                        .iter()
                        .any(|c| c.fingerprint.eq_ignore_ascii_case(&entry.fingerprint))
                {
                    self.store.remove_trust(&entry.fingerprint).await?;
                }
            }
        }
        self.store.restart_full_sync(cluster).await?;
        if peer.state == PeerState::Active {
            self.spawn_peer(&peer.cluster, false);
            self.nudge(cluster);
        }
        Ok(())
    }

    /// Tells every peer that this cluster changed (after a local user change), so it
    /// pulls at once instead of at its next period. Pending peers too: they added us
    /// and pull from us, whether or not we accepted them.
    pub fn notify_peers(self: &Arc<Self>, usn: i64) {
        let agent = self.clone();
        self.tracker.spawn(async move {
            let peers = match agent.store.peers().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list peers to notify");
                    return;
                }
            };
            for peer in peers {
                agent.notify_peer(peer.cluster, usn);
            }
        });
    }

    fn notify_peer(self: &Arc<Self>, cluster: ClusterName, usn: i64) {
        let agent = self.clone();
        self.tracker.spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(10), async {
                let mut client = agent.connect(&cluster).await?;
                client
                    .call(&Request::NotifyChange {
                        cluster: agent.ours.cluster.to_string(),
                        usn,
                    })
                    .await
                    .map_err(SyncError::Client)
            })
            .await;
            match result {
                Ok(Ok(_)) => tracing::debug!(peer = %cluster, usn, "peer notified"),
                Ok(Err(e)) => {
                    tracing::info!(peer = %cluster, error = %e, "cannot notify peer; it pulls at its next period")
                }
                Err(_) => tracing::info!(peer = %cluster, "notifying the peer timed out"),
            }
        });
    }

    /// A verified, authenticated connection to a peer.
    pub(crate) async fn connect(&self, cluster: &str) -> Result<AxlClient, SyncError> {
        let peer = self
            .store
            .peer(cluster)
            .await?
            .ok_or_else(|| SyncError::Gone(ClusterName::new(cluster)))?;
        let token = peer.our_token.clone().ok_or(SyncError::NoCredential)?;
        let anchors = impmesh_axl::trust::anchors_for(&self.store, cluster).await?;
        if anchors.pinned.is_empty() && anchors.cas.is_empty() {
            return Err(SyncError::NothingTrusted);
        }
        let verifier = PeerVerifier::new(&anchors)?;
        let mut client = match self
            .connect_to(
                &peer.address,
                &peer.server_name,
                ServerTrust::Verified(verifier),
            )
            .await
        {
            Ok(c) => c,
            Err(ClientError::Tls(_, error)) => {
                return Err(SyncError::CertificateChanged {
                    cluster: ClusterName::new(cluster),
                    error,
                });
            }
            Err(e) => return Err(SyncError::Client(e)),
        };
        client.use_peer_token(&self.ours.cluster, &token)?;
        Ok(client)
    }

    /// Connects to `address` (host:port): the host resolved through [`dns::Dns`] (the
    /// last good answer during a DNS outage), each address tried in turn.
    async fn connect_to(
        &self,
        address: &str,
        server_name: &str,
        trust: ServerTrust,
    ) -> Result<AxlClient, ClientError> {
        self.connect_to_as(address, server_name, trust, None).await
    }

    /// [`Agent::connect_to`] presenting `identity` as the TLS client certificate.
    async fn connect_to_as(
        &self,
        address: &str,
        server_name: &str,
        trust: ServerTrust,
        identity: Option<&impmesh_certs::NodeIdentity>,
    ) -> Result<AxlClient, ClientError> {
        let Some((host, port)) = split_host_port(address) else {
            return Err(ClientError::Address(address.to_owned()));
        };
        let name = self.dns.resolve(host).await;
        if name.addresses.is_empty() {
            return Err(ClientError::Unresolved {
                host: host.to_owned(),
                reason: name.error.unwrap_or_default(),
            });
        }
        if let Some(e) = &name.error {
            tracing::info!(%host, error = %e, addresses = ?name.addresses, "DNS failed; using the last good addresses");
        }
        let mut last = None;
        for ip in &name.addresses {
            let target = match ip.parse::<std::net::IpAddr>() {
                Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
                Err(_) => continue,
            };
            match AxlClient::connect_as(&target, server_name, trust.clone(), identity).await {
                Ok(c) => return Ok(c),
                Err(e @ ClientError::Connect(..)) | Err(e @ ClientError::Timeout(_)) => {
                    last = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unresolved {
            host: host.to_owned(),
            reason: "no usable address".to_owned(),
        }))
    }

    /// This cluster's node certificates, as published in the store.
    async fn our_certificates(&self) -> Result<Vec<NodeCertificate>, AgentError> {
        Ok(self
            .store
            .cluster_nodes(&self.ours.cluster)
            .await?
            .into_iter()
            .filter(|n| !n.cert_pem.is_empty())
            .map(|n| NodeCertificate {
                node: n.name,
                fingerprint: n.fingerprint,
                pem: n.cert_pem,
            })
            .collect())
    }
}

pub(crate) fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

/// `host`, `host:port` or `[v6]:port` → (`host:port`, server name); port 8443 by default.
fn normalize_address(address: &str) -> Result<(String, String), AgentError> {
    let address = address.trim();
    let bad = || AgentError::Address(address.to_owned());
    if address.is_empty() || address.contains(['/', ' ', '@']) {
        return Err(bad());
    }
    if let Ok(sock) = address.parse::<std::net::SocketAddr>() {
        return Ok((sock.to_string(), sock.ip().to_string()));
    }
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        let sock = std::net::SocketAddr::new(ip, 8443);
        return Ok((sock.to_string(), ip.to_string()));
    }
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (address, 8443),
    };
    if !impmesh_certs::is_dns_name(host) {
        return Err(bad());
    }
    Ok((format!("{host}:{port}"), host.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(
            normalize_address("node1.b.example.com").unwrap(),
            (
                "node1.b.example.com:8443".into(),
                "node1.b.example.com".into()
            )
        );
        assert_eq!(
            normalize_address("10.0.0.2:9443").unwrap(),
            ("10.0.0.2:9443".into(), "10.0.0.2".into())
        );
        assert_eq!(
            normalize_address("::1").unwrap(),
            ("[::1]:8443".into(), "::1".into())
        );
        assert!(normalize_address("http://x").is_err());
        assert!(normalize_address("bad name:1").is_err());
        assert!(normalize_address("x:99999").is_err());
    }
}
