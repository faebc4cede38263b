//! The node side of the HTTPS service ([`impmesh_axl::NodeControl`]): what the admin
//! API does to the running router, its configuration and its certificate.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Instant;

use impmesh_axl::{CertSource, ControlError, Https, NodeControl, api};
use impmesh_certs::{CertError, NodeIdentity};
use impmesh_router::Server;
use impmesh_store::NodeRecord;
use impmesh_sync_agent::{Agent, AgentError};

use crate::config::Config;
use crate::files;
use crate::users::{self, UserError};

/// The running node as the HTTPS service sees it.
/// The addresses the node's listeners are bound to.
#[derive(Debug, Clone)]
pub struct Bound {
    pub c2s: Vec<SocketAddr>,
    pub c2s_direct_tls: Vec<SocketAddr>,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// HTTPS for clients (file upload), when on.
    pub client_https: Option<SocketAddr>,
    /// The TURN relay, when on.
    pub relay: Option<impmesh_media::relay::RelayHandle>,
}

pub struct Control {
    pub config: Config,
    pub server: Arc<Server>,
    identity: RwLock<NodeIdentity>,
    /// The separate client-facing certificate, when configured.
    client: RwLock<Option<NodeIdentity>>,
    https: OnceLock<Weak<Https<Control>>>,
    agent: OnceLock<Arc<Agent>>,
    /// The bound listeners.
    listeners: OnceLock<Bound>,
    /// The bound router-link listener, if any.
    links: OnceLock<SocketAddr>,
    started: Instant,
    /// Certificate changes one at a time.
    cert_lock: tokio::sync::Mutex<()>,
    /// A new node certificate announced to the peers and not in use on the
    /// peer-facing listeners yet (make-before-break), with its generation and the
    /// signal that ends its overlap at once.
    rotation: std::sync::Mutex<Option<Rotation>>,
    /// Bumped by every certificate change: a rotation that a newer change replaced
    /// stops.
    rotation_gen: std::sync::atomic::AtomicU64,
    me: Weak<Control>,
}

/// A certificate rotation under way.
#[derive(Clone)]
struct Rotation {
    new: NodeIdentity,
    generation: u64,
    end_now: Arc<tokio::sync::Notify>,
}

/// The first wait between two announcements to a peer that has not pinned the new
/// certificate yet (doubling up to a minute): a peer that was down gets it soon
/// after it is back.
const ANNOUNCE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Control {
    pub fn new(
        config: Config,
        server: Arc<Server>,
        identity: NodeIdentity,
        client: Option<NodeIdentity>,
    ) -> Arc<Control> {
        Arc::new_cyclic(|me| Control {
            config,
            server,
            identity: RwLock::new(identity),
            client: RwLock::new(client),
            https: OnceLock::new(),
            agent: OnceLock::new(),
            listeners: OnceLock::new(),
            links: OnceLock::new(),
            started: Instant::now(),
            cert_lock: tokio::sync::Mutex::new(()),
            rotation: std::sync::Mutex::new(None),
            rotation_gen: std::sync::atomic::AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// The new node certificate being announced to peers, if a rotation is under way.
    pub fn rotating_to(&self) -> Option<String> {
        self.rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|r| r.new.fingerprint())
    }

    /// Completes the wiring once the listeners are bound.
    pub fn attach(&self, https: &Arc<Https<Control>>, bound: Bound) {
        let _ = self.https.set(Arc::downgrade(https));
        let _ = self.listeners.set(bound);
    }

    /// The bound listeners (the configured addresses before they are bound).
    fn bound(&self) -> Bound {
        self.listeners.get().cloned().unwrap_or_else(|| Bound {
            c2s: vec![],
            c2s_direct_tls: vec![],
            https: self.config.listen.https,
            admin: self.config.listen.admin,
            client_https: None,
            relay: None,
        })
    }

    /// Records the bound router-link listener (published to peers).
    pub fn attach_links(&self, addr: SocketAddr) {
        let _ = self.links.set(addr);
    }

    /// Hands the running sync agent to the admin API.
    pub fn set_agent(&self, agent: Arc<Agent>) {
        let _ = self.agent.set(agent);
    }

    fn agent(&self) -> Result<&Arc<Agent>, ControlError> {
        self.agent
            .get()
            .ok_or_else(|| ControlError::Internal("the sync agent is not running".into()))
    }

    /// The identity in use.
    pub fn identity(&self) -> NodeIdentity {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The client-facing certificate in use, when one is configured.
    pub fn client_identity(&self) -> Option<NodeIdentity> {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes this node's endpoints and certificate to the cluster (the store),
    /// where getClusterInfo and getCertificates read them.
    pub async fn publish(&self) -> anyhow::Result<()> {
        let identity = self.identity();
        let Bound {
            c2s,
            c2s_direct_tls: direct,
            https,
            ..
        } = self.bound();
        let mut cert_pem = String::new();
        for cert in &identity.chain {
            cert_pem.push_str(&impmesh_certs::pem_encode("CERTIFICATE", cert.as_ref()));
        }
        self.server
            .store
            .publish_node(&NodeRecord {
                name: self.config.node_name(),
                cluster: self.config.cluster_name(),
                host: self.config.advertised_host(),
                c2s_port: c2s.first().map(|a| a.port()).unwrap_or(0),
                c2s_tls_port: direct.first().map(|a| a.port()).unwrap_or(0),
                // 0 means "not listening".
                link_port: self.links.get().map(|a| a.port()).unwrap_or(0),
                https_port: https.port(),
                upload_url: self.server.upload_url().unwrap_or_default().to_owned(),
                cert_pem,
                fingerprint: identity.fingerprint(),
                updated_at: 0,
            })
            .await?;
        Ok(())
    }

    /// Loads the certificates again (the node identity from the data directory, the
    /// client-facing one from `[tls]`) and uses them for every new TLS handshake;
    /// connections already up keep theirs. On an error nothing changes. Returns the node
    /// certificate's fingerprint.
    ///
    /// A new node certificate while active peers pin the old one is rolled out
    /// make-before-break: clients get it at once; it is announced to every active peer
    /// over the channel they already trust (each pins it, keeping the old pin); the
    /// peer-facing listeners (HTTPS, router links) and this node's calls keep the old
    /// one until every active peer has pinned the new one, or `[sync]
    /// certificate_overlap` ends, or an admin ends the overlap
    /// ([`Control::end_certificate_overlap`]). Peers then drop the old pin when they see
    /// it is no longer announced. Links and syncs never drop; nobody retypes a password.
    pub async fn reload_certificates(&self) -> anyhow::Result<String> {
        let identity = files::identity(&self.config)?;
        let client = files::client_identity(&self.config)?;
        let in_use: Vec<&NodeIdentity> =
            std::iter::once(&identity).chain(client.as_ref()).collect();
        files::check_certificates(&self.server.store, &in_use).await?;
        let for_clients = client.as_ref().unwrap_or(&identity);
        self.server.set_tls(
            for_clients.server_config(&[])?,
            for_clients.server_config(&[b"xmpp-client"])?,
        );
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        let fingerprint = identity.fingerprint();
        let generation = self
            .rotation_gen
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let changed = self.identity().fingerprint() != fingerprint;
        let overlap = std::time::Duration::from_secs(self.config.sync.certificate_overlap);
        let active_peers = match self.agent.get() {
            Some(_) => self
                .server
                .store
                .peers()
                .await?
                .iter()
                .any(|p| p.state == impmesh_store::PeerState::Active),
            None => false,
        };
        if changed && active_peers && !overlap.is_zero() {
            let end_now = Arc::new(tokio::sync::Notify::new());
            let rotation = Rotation {
                new: identity,
                generation,
                end_now,
            };
            *self.rotation.lock().unwrap_or_else(|e| e.into_inner()) = Some(rotation.clone());
            if let Some(me) = self.me.upgrade() {
                tokio::spawn(async move { me.rotate(rotation, overlap).await });
            }
            tracing::info!(sha256 = %fingerprint, "new certificate in use for clients; announcing it to the peers before the peer-facing listeners switch");
            return Ok(fingerprint);
        }
        *self.rotation.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.use_for_peers(identity).await?;
        tracing::info!(sha256 = %fingerprint, "certificate in use");
        Ok(fingerprint)
    }

    /// Puts `identity` in use on the peer-facing side: HTTPS, router links, the sync
    /// agent's calls, and what getClusterInfo announces.
    async fn use_for_peers(&self, identity: NodeIdentity) -> anyhow::Result<()> {
        if let Some(https) = self.https.get().and_then(Weak::upgrade) {
            https.set_tls(identity.https_server_config()?);
        }
        self.server.set_link_identity(identity.clone())?;
        if let Some(agent) = self.agent.get() {
            agent.set_identity(identity.clone());
        }
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = identity;
        self.publish().await?;
        Ok(())
    }

    /// Announces `rotation.new` to every active peer until all have pinned it (retrying
    /// those that fail, with a backoff up to a minute), the overlap ends, or an admin
    /// ends it; then puts it in use for peers. The alarm
    /// `InterClusterCertificateRotationPending` names the peers that have not pinned it.
    async fn rotate(self: Arc<Self>, rotation: Rotation, overlap: std::time::Duration) {
        let Some(agent) = self.agent.get().cloned() else {
            return;
        };
        let def = impmesh_store::alarms::CERT_ROTATION_PENDING;
        let subject = self.config.node_name();
        let deadline = tokio::time::Instant::now() + overlap;
        let current =
            || self.rotation_gen.load(std::sync::atomic::Ordering::SeqCst) == rotation.generation;
        let mut confirmed = std::collections::BTreeSet::new();
        let mut wait = ANNOUNCE_RETRY;
        let why = loop {
            if !current() {
                return;
            }
            let active: Vec<String> = match self.server.store.peers().await {
                Ok(peers) => peers
                    .into_iter()
                    .filter(|p| p.state == impmesh_store::PeerState::Active)
                    .map(|p| p.cluster.into())
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "cannot list peers");
                    vec![]
                }
            };
            let unconfirmed: Vec<&String> =
                active.iter().filter(|p| !confirmed.contains(*p)).collect();
            for peer in unconfirmed {
                match agent.announce_certificate(peer, &rotation.new).await {
                    Ok(()) => {
                        confirmed.insert(peer.clone());
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "the peer has not pinned our new certificate yet; retrying")
                    }
                }
            }
            let pending: Vec<&String> = active.iter().filter(|p| !confirmed.contains(*p)).collect();
            if pending.is_empty() {
                break "every active peer pinned the new certificate";
            }
            let message = format!(
                "peers that have not pinned the new certificate {} yet: {}; the old one is \
                 served to peers until they do, or until the overlap ends \
                 (`impmesh cert end-overlap` ends it now)",
                rotation.new.fingerprint(),
                pending
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = self.server.store.raise_alarm(def, &subject, &message).await;
            tokio::select! {
                _ = self.server.shutdown.cancelled() => return,
                _ = rotation.end_now.notified() => break "an admin ended the overlap",
                _ = tokio::time::sleep_until(deadline) => break "the overlap ended",
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(std::time::Duration::from_secs(60));
        };
        let _guard = self.cert_lock.lock().await;
        if !current() {
            return;
        }
        let fingerprint = rotation.new.fingerprint();
        match self.use_for_peers(rotation.new).await {
            Ok(()) => {
                *self.rotation.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let _ = self.server.store.clear_alarm(def, &subject, why).await;
                tracing::info!(sha256 = %fingerprint, why, "the new certificate is in use for peers too");
            }
            Err(e) => tracing::error!(error = %e, "cannot put the new certificate in use"),
        }
    }

    /// Ends the overlap of a certificate rotation at once (a compromised old key): the
    /// new certificate goes in use for peers now, pinned or not. False when none runs.
    pub fn end_overlap(&self) -> bool {
        match self
            .rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(r) => {
                r.end_now.notify_one();
                true
            }
            None => false,
        }
    }

    async fn change_certificate(
        &self,
        change: impl FnOnce(&Config) -> anyhow::Result<String>,
    ) -> Result<String, ControlError> {
        let _guard = self.cert_lock.lock().await;
        change(&self.config).map_err(cert_error)?;
        self.reload_certificates()
            .await
            .map_err(|e| ControlError::Internal(format!("{e:#}").into()))
    }
}

fn user_error(e: UserError) -> ControlError {
    match e {
        UserError::BadName(_) | UserError::EmptyPassword => ControlError::Invalid(e.into()),
        UserError::Exists(_) | UserError::HomedAtPeer(_) => ControlError::Conflict(e.into()),
        UserError::NotFound(_) => ControlError::NotFound(e.into()),
        UserError::Store(_) => ControlError::Internal(e.into()),
    }
}

/// A router link as the admin API shows it.
fn link_status(l: &impmesh_router::LinkStatus) -> api::LinkStatus {
    api::LinkStatus {
        node: l.node.clone(),
        direction: match l.direction {
            impmesh_router::LinkDirection::Out => api::LinkDirection::Out,
            impmesh_router::LinkDirection::In => api::LinkDirection::In,
        },
        up: l.up,
        since: l.since,
        stanzas: l.stanzas,
        queued: l.queued,
        outbox_rows: l.outbox_rows,
        outbox_bytes: l.outbox_bytes,
        in_flight: l.in_flight,
        peak_in_flight: l.peak_in_flight,
        peer_protocol: l.peer_protocol,
        peer_features: l.peer_features.clone(),
        last_error: l.last_error.clone(),
    }
}

fn agent_error(e: AgentError) -> ControlError {
    match e {
        AgentError::UnknownPeer(_) => ControlError::NotFound(e.into()),
        AgentError::Address(_)
        | AgentError::TooManyPeers(_)
        | AgentError::ClusterChanged { .. }
        | AgentError::NoCredential(_)
        | AgentError::UnexpectedAnswer(_)
        | AgentError::Contact { .. } => ControlError::Invalid(e.into()),
        AgentError::NoCertificate
        | AgentError::EmptyChain
        | AgentError::Trust(_)
        | AgentError::Store(_) => ControlError::Internal(e.into()),
    }
}

fn cert_error(e: anyhow::Error) -> ControlError {
    match e.downcast_ref::<CertError>() {
        Some(CertError::Io { .. }) | None => ControlError::Internal(format!("{e:#}").into()),
        Some(_) => ControlError::Invalid(format!("{e:#}").into()),
    }
}

/// A room as the admin API shows it.
fn room(r: impmesh_router::RoomInfo) -> api::Room {
    let c = r.config;
    api::Room {
        jid: r.jid,
        name: c.name,
        description: c.description,
        subject: r.subject,
        persistent: c.persistent,
        public: c.public,
        members_only: c.members_only,
        moderated: c.moderated,
        password_protected: c.password.is_some(),
        non_anonymous: c.whois_anyone,
        max_users: c.max_users,
        history_length: c.history_length,
        locked: r.locked,
        occupants: r
            .occupants
            .into_iter()
            .map(
                |(nick, jid, role, affiliation, sessions)| api::RoomOccupant {
                    nick,
                    jid,
                    role: role.as_str().to_owned(),
                    affiliation: affiliation.as_str().to_owned(),
                    sessions,
                },
            )
            .collect(),
        affiliations: r
            .affiliations
            .into_iter()
            .map(|(jid, a)| api::RoomAffiliation {
                jid,
                affiliation: a.as_str().to_owned(),
            })
            .collect(),
    }
}

fn room_error(e: impmesh_router::RoomAdminError) -> ControlError {
    use impmesh_router::RoomAdminError as E;
    match e {
        E::BadVenue(..) => ControlError::Invalid(e.into()),
        E::NoSuchRoom(_) => ControlError::NotFound(e.into()),
        E::Off => ControlError::Conflict(e.into()),
    }
}

impl NodeControl for Control {
    fn rooms(&self) -> Result<Vec<api::Room>, ControlError> {
        let rooms = self.server.muc_room_list().map_err(room_error)?;
        Ok(rooms.into_iter().map(room).collect())
    }

    fn room(&self, name: &str) -> Result<api::Room, ControlError> {
        self.server
            .muc_room_show(name)
            .map(room)
            .map_err(room_error)
    }

    fn destroy_room(
        &self,
        name: &str,
        destroy: &api::RoomDestroy,
    ) -> Result<api::RoomDestroyed, ControlError> {
        let jid = self.server.muc_room_show(name).map_err(room_error)?.jid;
        let told = self
            .server
            .muc_room_destroy(name, destroy.venue.as_deref(), destroy.reason.as_deref())
            .map_err(room_error)?;
        Ok(api::RoomDestroyed { jid, told })
    }

    fn status(&self) -> api::NodeRuntime {
        let identity = self.identity();
        let cert = impmesh_certs::describe(&identity.chain[0]).ok();
        let bound = self.bound();
        let addrs = |a: &[SocketAddr]| a.iter().map(ToString::to_string).collect();
        api::NodeRuntime {
            uptime_secs: self.started.elapsed().as_secs(),
            sessions: self.server.hub.session_count(),
            listeners: api::Listeners {
                c2s: addrs(&bound.c2s),
                c2s_direct_tls: addrs(&bound.c2s_direct_tls),
                https: bound.https.to_string(),
                admin: bound.admin.to_string(),
                links: self.links.get().map(ToString::to_string),
                client_https: bound.client_https.map(|a| a.to_string()),
                turn: bound.relay.as_ref().map(|r| r.udp_addr().to_string()),
                turns: bound
                    .relay
                    .as_ref()
                    .and_then(|r| r.tls_addr())
                    .map(|a| a.to_string()),
            },
            certificate: api::CertificateSummary {
                sha256: identity.fingerprint(),
                subject: cert.as_ref().map(|c| c.subject.clone()),
                not_after: cert.as_ref().map(|c| c.not_after.clone()),
                self_signed: cert.as_ref().map(|c| c.self_signed),
            },
            client_certificate: self.client_identity().map(|c| c.fingerprint()),
            store: format!("{:?}", self.server.store.backend()).to_lowercase(),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str("# HELP impmesh_sessions Client sessions bound now.\n");
        out.push_str("# TYPE impmesh_sessions gauge\n");
        let _ = writeln!(out, "impmesh_sessions {}", self.server.hub.session_count());
        out.push_str("# HELP impmesh_uptime_seconds Seconds since the node started.\n");
        out.push_str("# TYPE impmesh_uptime_seconds gauge\n");
        let _ = writeln!(
            out,
            "impmesh_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        if self.server.config.muc.is_some() {
            let (rooms, occupants) = self.server.muc_counts();
            out.push_str("# HELP impmesh_muc_rooms Chat rooms (XEP-0045) on this node now.\n");
            out.push_str("# TYPE impmesh_muc_rooms gauge\n");
            let _ = writeln!(out, "impmesh_muc_rooms {rooms}");
            out.push_str(
                "# HELP impmesh_muc_occupants Occupants (nicks) of this node's chat rooms now.\n",
            );
            out.push_str("# TYPE impmesh_muc_occupants gauge\n");
            let _ = writeln!(out, "impmesh_muc_occupants {occupants}");
        }
        self.server.stats.render(out);
        self.server.store.latency().render(out);
        self.server.render_link_metrics(out);
        if let Some(relay) = self.listeners.get().and_then(|b| b.relay.as_ref()) {
            relay.render_metrics(out);
        }
        if let Some(agent) = self.agent.get() {
            agent.render_metrics(out);
        }
    }

    fn ready(&self) -> bool {
        !self.server.shutdown.is_cancelled()
    }

    async fn add_user(&self, name: &str, password: &str) -> Result<String, ControlError> {
        let user = users::add(&self.server.store, &self.config, name, password)
            .await
            .map_err(user_error)?;
        // Peers are told by the node's account listener (`node.rs`).
        Ok(user)
    }

    async fn delete_user(&self, name: &str) -> Result<String, ControlError> {
        let user = users::delete(&self.server.store, &self.config, name)
            .await
            .map_err(user_error)?;
        // Its sessions are closed, and peers told, by the node's account listener.
        Ok(user)
    }

    async fn set_password(&self, name: &str, password: &str) -> Result<String, ControlError> {
        users::passwd(&self.server.store, &self.config, name, password)
            .await
            .map_err(user_error)
    }

    async fn fast_tokens(&self, name: &str) -> Result<api::Tokens, ControlError> {
        let (username, tokens) = users::tokens(&self.server.store, &self.config, name)
            .await
            .map_err(user_error)?;
        Ok(api::Tokens { username, tokens })
    }

    async fn revoke_fast_tokens(
        &self,
        name: &str,
        client: Option<&str>,
    ) -> Result<api::TokensRevoked, ControlError> {
        let (username, revoked) =
            users::revoke_tokens(&self.server.store, &self.config, name, client)
                .await
                .map_err(user_error)?;
        Ok(api::TokensRevoked { username, revoked })
    }

    fn certificates(&self) -> Result<Vec<impmesh_certs::CertInfo>, ControlError> {
        self.identity()
            .chain
            .iter()
            .map(impmesh_certs::describe)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ControlError::Internal(e.into()))
    }

    fn csr(&self, cn: &str, sans: &[String]) -> Result<String, ControlError> {
        self.identity()
            .csr(cn, sans)
            .map_err(|e| ControlError::Invalid(e.into()))
    }

    async fn import_certificate(&self, source: CertSource) -> Result<String, ControlError> {
        self.change_certificate(|config| match source {
            CertSource::Pem { cert, key, chain } => files::import_certificate(
                config,
                cert.as_bytes(),
                key.as_deref().map(str::as_bytes),
                chain.as_deref().map(str::as_bytes),
            ),
            CertSource::Pkcs12 { archive, password } => {
                files::import_pkcs12(config, &archive, &password)
            }
        })
        .await
    }

    async fn regenerate_certificate(&self) -> Result<String, ControlError> {
        self.change_certificate(files::regenerate_certificate).await
    }

    async fn reload_certificates(&self) -> Result<String, ControlError> {
        let _guard = self.cert_lock.lock().await;
        Control::reload_certificates(self).await.map_err(cert_error)
    }

    async fn end_certificate_overlap(&self) -> Result<bool, ControlError> {
        Ok(self.end_overlap())
    }

    async fn troubleshoot(&self) -> Result<Vec<api::Check>, ControlError> {
        self.agent()?.troubleshoot().await.map_err(agent_error)
    }

    async fn peers(&self) -> Result<Vec<api::Peer>, ControlError> {
        let status = self.agent()?.status().await.map_err(agent_error)?;
        // Each peer's router links, as the router sees them.
        let links = self.server.link_status();
        Ok(status
            .into_iter()
            .map(|status| api::Peer {
                links: links
                    .iter()
                    .filter(|l| l.cluster == status.cluster)
                    .map(link_status)
                    .collect(),
                status,
            })
            .collect())
    }

    async fn peer_add(
        &self,
        address: &str,
        user: &str,
        password: &str,
    ) -> Result<api::PeerAdded, ControlError> {
        let peer = self
            .agent()?
            .add_peer(address, user, password)
            .await
            .map_err(agent_error)?;
        Ok(api::PeerAdded {
            cluster: peer.cluster.into(),
            address: peer.address,
            state: peer.state,
        })
    }

    async fn peer_accept(&self, cluster: &str) -> Result<(), ControlError> {
        self.agent()?
            .accept_peer(cluster)
            .await
            .map_err(agent_error)
    }

    async fn peer_delete(&self, cluster: &str) -> Result<(), ControlError> {
        self.agent()?
            .delete_peer(cluster)
            .await
            .map_err(agent_error)?;
        self.server.forget_peer(cluster);
        Ok(())
    }

    async fn peer_removed_us(&self, cluster: &str) -> Result<(), ControlError> {
        self.agent()?
            .peer_removed_us(cluster)
            .await
            .map_err(agent_error)?;
        self.server.forget_peer(cluster);
        Ok(())
    }

    async fn peer_sync(
        &self,
        cluster: &str,
        credential: Option<(String, String)>,
    ) -> Result<(), ControlError> {
        let credential = credential.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        self.agent()?
            .force_sync(cluster, credential)
            .await
            .map_err(agent_error)
    }
}
