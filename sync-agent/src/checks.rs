//! What each sync checks besides users: the peer's certificates against the pinned
//! ones, its announced nodes, and its DNS names.

use std::sync::Arc;
use std::time::Instant;

use impmesh_axl::soap::ClusterInfo;
use impmesh_store::{ClusterName, NodeName, TrustKind};

use crate::peering::split_host_port;
use crate::task::{PeerTask, SyncError, flag};
use crate::{Agent, CertificateStatus, dns, lock};

/// Nodes a peer may announce, at most (a cluster has 1 to 6 nodes; room to grow).
pub const MAX_PEER_NODES: usize = 16;

/// Splits `host:port` (or `[v6]:port`).
/// Whether our node may connect to `host`, announced by a peer: a DNS name, or an IP
/// address that is not unspecified, multicast or broadcast; loopback and link-local
/// addresses (and `localhost`) only when the peer's own AXL address is one too
/// (`peer_is_local`: a test mesh on one machine), so a peer cannot point our node at
/// our own loopback services.
pub fn announced_host_ok(host: &str, peer_is_local: bool) -> bool {
    use std::net::IpAddr;
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => {
            let odd = ip.is_unspecified()
                || ip.is_multicast()
                || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
            !odd && (!is_local(&ip) || peer_is_local)
        }
        Err(_) => {
            impmesh_certs::is_dns_name(host)
                && (!host.eq_ignore_ascii_case("localhost") || peer_is_local)
        }
    }
}

/// Whether a peer's announced upload URL may be where this node redirects clients:
/// '' (none), or `https://HOST[:PORT]` with nothing after it, in printable ASCII.
/// The client follows the redirect, not this node, so any host will do.
pub fn announced_upload_url_ok(url: &str) -> bool {
    if url.is_empty() {
        return true;
    }
    let Some(authority) = url.strip_prefix("https://") else {
        return false;
    };
    url.len() <= 255
        && !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

/// Loopback or link-local.
fn is_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local(),
    }
}

impl PeerTask {
    pub(crate) async fn check_certificates(&self, info: &ClusterInfo) -> Result<(), SyncError> {
        let entries: Vec<impmesh_store::TrustEntry> = self
            .agent
            .store
            .trust_entries()
            .await?
            .into_iter()
            .filter(|t| t.kind == TrustKind::Pinned && t.peer.as_deref() == Some(&self.cluster))
            .collect();
        let pinned: Vec<String> = entries.iter().map(|t| t.fingerprint.clone()).collect();
        let announced: Vec<String> = info.nodes.iter().map(|n| n.fingerprint.clone()).collect();
        let missing: Vec<&String> = announced.iter().filter(|f| !pinned.contains(f)).collect();
        // Make-before-break, second half: once every certificate the peer announces is
        // pinned, the pins of certificates it no longer announces and that are older
        // than those it does (rotated away) are dropped. A pin newer than what it
        // announces is a rotation under way (announced to us, not in use yet): kept.
        if missing.is_empty() && !announced.is_empty() {
            let oldest_in_use = entries
                .iter()
                .filter(|t| announced.contains(&t.fingerprint))
                .map(|t| t.added_at)
                .min()
                .unwrap_or(0);
            for old in entries
                .iter()
                .filter(|t| !announced.contains(&t.fingerprint) && t.added_at < oldest_in_use)
            {
                self.agent.store.remove_trust(&old.fingerprint).await?;
                tracing::info!(peer = %self.cluster, sha256 = %old.fingerprint, "dropped the pin of a certificate the peer no longer uses");
            }
        }
        let reason = (!missing.is_empty()).then(|| {
            format!(
                "the peer announces certificates that are not pinned here: {}; run \
                 `impmesh peer sync {} --with-certificates` to exchange them again",
                missing
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.cluster
            )
        });
        let changed = {
            let mut s = lock(&self.status);
            s.peer_fingerprints = announced.clone();
            s.peer_usn = Some(info.usn);
            let status = if reason.is_some() {
                CertificateStatus::OutOfSync
            } else {
                CertificateStatus::InSync
            };
            let changed = s.certificate_status != status;
            s.certificate_status = status;
            s.certificate_reason = reason.clone();
            changed
        };
        if changed {
            self.agent
                .set_alarm(
                    impmesh_store::alarms::PEER_CERT_OUT_OF_SYNC,
                    &self.cluster,
                    reason.as_deref(),
                )
                .await;
        }
        Ok(())
    }

    /// Compares the fingerprints the peer announces with the pinned ones.
    /// Keeps where the peer's nodes are (router links, client redirects); writes only
    /// when the announcement changed. A peer announces at most [`MAX_PEER_NODES`]
    /// nodes, each with a host name or address as checked as the peer's own address
    /// (see [`announced_host_ok`]); a node name that another peer (or this cluster)
    /// owns stays with its owner. Returns the names of the peer's nodes as kept.
    pub(crate) async fn remember_nodes(
        &self,
        info: &ClusterInfo,
        peer_address: &str,
    ) -> Result<Vec<NodeName>, SyncError> {
        let store = &self.agent.store;
        let ours = store.cluster_nodes(&self.agent.ours.cluster).await?;
        // Where the admin's address for the peer leads (the DNS cache answers).
        let peer_is_local = match split_host_port(peer_address) {
            Some((host, _)) => match host.parse::<std::net::IpAddr>() {
                Ok(ip) => is_local(&ip),
                Err(_) => self
                    .agent
                    .dns
                    .resolve(host)
                    .await
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                    .any(|ip| is_local(&ip)),
            },
            None => false,
        };
        let mut announced: Vec<impmesh_store::PeerNode> = vec![];
        for n in &info.nodes {
            let name = n.name.to_ascii_lowercase();
            let why = if announced.len() >= MAX_PEER_NODES {
                Some(format!("more than {MAX_PEER_NODES} nodes"))
            } else if !impmesh_certs::is_dns_name(&name) {
                Some("not a DNS name".to_owned())
            } else if announced.iter().any(|a| a.name == name) {
                Some("announced twice".to_owned())
            } else if ours.iter().any(|o| o.name.eq_ignore_ascii_case(&name))
                || name.eq_ignore_ascii_case(&self.agent.ours.cluster)
            {
                Some("a node of this cluster".to_owned())
            } else if let Some(other) = store
                .peer_node(&name)
                .await?
                .filter(|o| o.peer != self.cluster)
            {
                Some(format!("a node of {}", other.peer))
            } else if !announced_host_ok(&n.host, peer_is_local) {
                Some(format!("host {:?} is not allowed", n.host))
            } else {
                None
            };
            if let Some(why) = why {
                tracing::warn!(peer = %self.cluster, node = %n.name, %why, "announced node refused");
                continue;
            }
            announced.push(impmesh_store::PeerNode {
                name: NodeName::new(name),
                peer: ClusterName::new(self.cluster.as_str()),
                host: n.host.clone(),
                c2s_port: n.c2s_port,
                c2s_tls_port: n.c2s_tls_port,
                link_port: n.link_port,
                upload_url: if announced_upload_url_ok(&n.upload_url) {
                    n.upload_url.clone()
                } else {
                    tracing::warn!(peer = %self.cluster, node = %n.name, url = %n.upload_url, "announced upload URL ignored");
                    String::new()
                },
                fingerprint: n.fingerprint.clone(),
                updated_at: 0,
            });
        }
        let mut known = store.peer_nodes(&self.cluster).await?;
        known.iter_mut().for_each(|n| n.updated_at = 0);
        announced.sort_by(|a, b| a.name.cmp(&b.name));
        if known != announced {
            store.set_peer_nodes(&self.cluster, &announced).await?;
        }
        Ok(announced.into_iter().map(|n| n.name).collect())
    }

    /// Resolves every DNS name of the peer in the background (a slow or failing DNS
    /// never holds up a sync), at most every `dns_check_interval`.
    pub(crate) fn check_dns(&self, address: &str) {
        {
            let mut p = lock(&self.progress);
            if p.last_dns_check
                .is_some_and(|t| t.elapsed() < self.agent.settings.dns_check_interval)
            {
                return;
            }
            p.last_dns_check = Some(Instant::now());
        }
        let (agent, cluster, address, status, alarms) = (
            self.agent.clone(),
            self.cluster.clone(),
            address.to_owned(),
            self.status.clone(),
            self.alarms.clone(),
        );
        self.agent.tracker.spawn(async move {
            let names = agent.resolve_peer_names(&cluster, &address).await;
            let failed: Vec<String> = names
                .iter()
                .filter(|n| !n.ok)
                .map(|n| format!("{} ({})", n.name, n.error.as_deref().unwrap_or("no answer")))
                .collect();
            for f in &failed {
                tracing::warn!(peer = %cluster, name = %f, "a DNS name of the peer does not resolve");
            }
            lock(&status).dns = names;
            let message = (!failed.is_empty()).then(|| format!("does not resolve: {}", failed.join(", ")));
            flag(
                &agent,
                &alarms,
                &cluster,
                impmesh_store::alarms::PEER_DNS_FAILURE,
                message.as_deref(),
            )
            .await;
        });
    }
}
impl Agent {
    /// The addresses of `host` as the agent resolves peers' names: DNS, or during an
    /// outage the last good answer (what router links use too).
    pub async fn resolve_host(&self, host: &str) -> Vec<std::net::IpAddr> {
        self.dns
            .resolve(host)
            .await
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Uses another name resolver from now on (tests, embedding).
    pub fn set_resolver(&self, resolver: Arc<dyn dns::NameResolver>) {
        self.dns.set_resolver(resolver);
    }

    /// Resolves every DNS name of a peer: its address's host and the SANs of its
    /// pinned certificates.
    async fn resolve_peer_names(&self, cluster: &str, address: &str) -> Vec<dns::NameStatus> {
        let mut names: Vec<String> = vec![];
        if let Some((host, _)) = split_host_port(address)
            && host.parse::<std::net::IpAddr>().is_err()
        {
            names.push(host.to_owned());
        }
        if let Ok(entries) = self.store.trust_entries().await {
            for entry in entries
                .iter()
                .filter(|e| e.kind == TrustKind::Pinned && e.peer.as_deref() == Some(cluster))
            {
                let pem = entry.pem.as_bytes();
                let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem);
                let Ok(der): Result<rustls_pki_types::CertificateDer<'static>, _> = der else {
                    continue;
                };
                if let Ok(info) = impmesh_certs::describe(&der) {
                    for san in info.sans.iter().filter_map(|s| s.strip_prefix("DNS:")) {
                        if impmesh_certs::is_dns_name(san)
                            && !san.starts_with("*.")
                            && !names.iter().any(|n| n == san)
                        {
                            names.push(san.to_owned());
                        }
                    }
                }
            }
        }
        let mut out = vec![];
        for name in names {
            out.push(self.dns.resolve(&name).await);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_upload_urls_are_bare_https_origins() {
        for ok in [
            "",
            "https://n1.b.example.com",
            "https://[2001:db8::1]:5443",
            "https://127.0.0.1:5443",
        ] {
            assert!(announced_upload_url_ok(ok), "{ok}");
        }
        for bad in [
            "http://n1.b.example.com",
            "https://",
            "https://n1.example.com/evil",
            "https://n1.example.com?x",
            "https://user@n1.example.com",
            "javascript:alert(1)",
            "https://n1.example.com\r\nSet-Cookie: x",
        ] {
            assert!(!announced_upload_url_ok(bad), "{bad}");
        }
    }

    #[test]
    fn announced_hosts_are_checked_like_the_peers_address() {
        assert!(announced_host_ok("node1.b.example.com", false));
        assert!(announced_host_ok("192.0.2.10", false));
        assert!(announced_host_ok("2001:db8::1", false));
        for bad in [
            "127.0.0.1",
            "::1",
            "169.254.1.1",
            "localhost",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "not a host",
            "",
        ] {
            assert!(!announced_host_ok(bad, false), "{bad}");
        }
        // A mesh on one machine (the peer's own address is loopback).
        assert!(announced_host_ok("127.0.0.1", true));
        assert!(announced_host_ok("localhost", true));
        assert!(!announced_host_ok("0.0.0.0", true));
    }
}
