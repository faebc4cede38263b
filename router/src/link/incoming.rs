//! The receiving side of router links: mutual TLS with the certificates pinned for
//! accepted peers, the stream headers, then stanzas, each checked against who the
//! sending cluster is before the router gets it, and acknowledged once handled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use impmesh_store::{Home, RoomHome, TrustKind};
use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{FrameReader, ack, announced, header, write_within};
use super::{LinkCounters, LinkError, LinkSender, Links};
use crate::core::envelope::Envelope;
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::xml::Frame;

/// The current incoming link from one remote node.
pub(super) struct Inlink {
    pub(super) cluster: String,
    pub(super) counters: Arc<LinkCounters>,
    /// Cancelled when the peer is removed: the link closes.
    pub(super) closed: tokio_util::sync::CancellationToken,
    /// Which accepted link this is: a stale link's late end must not touch a newer
    /// link's state.
    pub(super) generation: u64,
}

impl Links {
    /// Accepts router links on `addr` until shutdown; returns the bound address.
    pub(super) async fn listen(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        if let Err(e) = impmesh_limits::set_dscp(&listener, self.config.dscp) {
            tracing::debug!(error = %e, "cannot set the DSCP class of a listener");
        }
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "listening for router links");
        let Some(links) = self.me.upgrade() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        // An admission limit before any TLS work, and a few handshakes per address at
        // a time (security review M10: unlimited concurrent handshakes shared the
        // process's file descriptors with the client ports).
        let admission = Arc::new(tokio::sync::Semaphore::new(
            self.config.limits.link_connections,
        ));
        let handshakes =
            impmesh_limits::PerAddress::new(self.config.limits.link_handshakes_per_address);
        self.tasks.spawn(async move {
            while let Some((permit, tcp, peer)) =
                crate::admit(&links.shutdown, &listener, &admission, "links").await
            {
                let Some(slot) = handshakes.acquire(peer.ip()) else {
                    tracing::debug!(%peer, "too many link handshakes from one address");
                    continue;
                };
                let links2 = links.clone();
                links.tasks.spawn(async move {
                    if let Err(e) = links2.serve_inlink(tcp, slot).await {
                        tracing::warn!(%peer, error = %e, "router link refused or closed");
                    }
                    drop(permit);
                });
            }
        });
        Ok(local)
    }

    /// One incoming link: mutual TLS, the certificate checked against the pinned
    /// certificates of accepted peers, headers, then stanzas until it closes.
    async fn serve_inlink(
        self: Arc<Self>,
        tcp: TcpStream,
        handshake_slot: impmesh_limits::AddressSlot,
    ) -> Result<(), LinkError> {
        let config = self
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, c)| c.clone())
            .ok_or(LinkError::NoIdentity)?;
        let _ = tcp.set_nodelay(true);
        let handshake = async {
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
            let cluster = self.link_peer(&tls).await?;
            let mut reader = FrameReader::new();
            let Frame::Header(opened) = reader.next(&mut tls).await? else {
                return Err(LinkError::Closed);
            };
            let remote = announced(&opened);
            let from = opened.from.unwrap_or_default();
            let epoch = opened.id.unwrap_or_default();
            // The node named in the header must be one of the authenticated peer's:
            // counters and presence bookkeeping are kept per node.
            match self.store.peer_node(&from).await {
                Ok(Some(n)) if n.peer == cluster => {}
                Ok(_) => {
                    return Err(LinkError::NotItsNode {
                        cluster,
                        node: from,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            // Stanzas of this epoch already handled: the sender resends only the rest.
            let h = {
                let mut received = lock(&self.received);
                let entry = received
                    .entry(from.clone())
                    .or_insert_with(|| (epoch.clone(), 0));
                if entry.0 != epoch {
                    *entry = (epoch.clone(), 0);
                }
                entry.1
            };
            let mut answer = header(
                &self.config.node_name,
                &from,
                &epoch,
                &self.config.link_features,
            );
            answer.push_str(&ack(h));
            tls.write_all(answer.as_bytes()).await?;
            tls.flush().await?;
            Ok::<_, LinkError>((tls, reader, cluster, from, epoch, remote))
        };
        let (mut tls, mut reader, cluster, node, epoch, remote) =
            tokio::time::timeout(self.config.limits.link_handshake_timeout, handshake)
                .await
                .map_err(|_| LinkError::Timeout)??;
        drop(handshake_slot);
        let counters = Arc::new(LinkCounters::default());
        counters.set_up(true);
        *lock(&counters.remote) = Some(remote);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = tokio_util::sync::CancellationToken::new();
        lock(&self.inbound).insert(
            node.clone(),
            Inlink {
                cluster: cluster.clone(),
                counters: counters.clone(),
                closed: closed.clone(),
                generation,
            },
        );
        tracing::info!(%node, %cluster, generation, "router link accepted");
        if let Some(router) = self.router.upgrade() {
            router.node_back(&node).await;
        }
        let result = tokio::select! {
            _ = closed.cancelled() => Err(LinkError::Removed(cluster.to_owned())),
            r = self.read_inlink(
                &mut tls,
                &mut reader,
                &cluster,
                &node,
                &epoch,
                generation,
                &counters,
            ) => r,
        };
        counters.set_up(false);
        // Only the current link's end means the node is gone: a stale link that a
        // newer one replaced leaves the newer link's presence alone.
        if self.is_current(&node, generation)
            && let Some(router) = self.router.upgrade()
        {
            router.node_lost(&node);
        }
        let deadline = self.config.limits.write_timeout;
        let _ = write_within(&mut tls, b"</stream:stream>", deadline).await;
        let _ = tls.shutdown().await;
        result
    }

    /// The accepted peer cluster a link's client certificate is pinned for.
    async fn link_peer<IO>(
        &self,
        tls: &tokio_rustls::server::TlsStream<IO>,
    ) -> Result<String, LinkError> {
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(LinkError::NoClientCertificate)?;
        let fingerprint = impmesh_certs::fingerprint(cert);
        let entries = self.store.trust_entries().await?;
        let cluster = entries
            .into_iter()
            .find(|e| e.kind == TrustKind::Pinned && e.fingerprint == fingerprint)
            .and_then(|e| e.peer)
            .ok_or_else(|| LinkError::NotPinned(fingerprint.clone()))?;
        match self.store.peer(&cluster).await {
            Ok(Some(p)) if p.state == impmesh_store::PeerState::Active => {}
            Ok(_) => return Err(LinkError::NotAccepted(cluster)),
            Err(e) => return Err(e.into()),
        }
        // A pin replaces the chain checks, not the dates.
        let alarm = impmesh_store::alarms::PEER_CERT_EXPIRED;
        if let Err(error) = impmesh_certs::within_validity(cert, impmesh_store::now_unix()) {
            let refused = LinkError::Expired {
                cluster: cluster.clone(),
                fingerprint,
                error,
            };
            if let Err(e) = self
                .store
                .raise_alarm(alarm, &cluster, &refused.to_string())
                .await
            {
                tracing::error!(error = %e, "cannot raise an alarm");
            }
            return Err(refused);
        }
        let _ = self
            .store
            .clear_alarm(alarm, &cluster, "a node connected with a valid certificate")
            .await;
        Ok(cluster)
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_inlink<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        reader: &mut FrameReader,
        cluster: &str,
        node: &str,
        epoch: &str,
        generation: u64,
        counters: &LinkCounters,
    ) -> Result<(), LinkError> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !self.is_current(node, generation) {
                // A newer link from the same node took over: this one is stale and
                // must not add to the count the new one acknowledges with.
                return Err(LinkError::Replaced(node.to_owned()));
            }
            let mut handled = 0u64;
            let mut failed = None;
            while let Some(frame) = reader.queue.pop_front() {
                match frame {
                    Frame::Element(el) => {
                        counters.stanzas.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = self.on_link_stanza(cluster, node, el).await {
                            failed = Some(e);
                            break;
                        }
                        handled += 1;
                    }
                    Frame::Footer => return Ok(()),
                    Frame::Header(_) => return Err(LinkError::Closed),
                }
            }
            if handled > 0 {
                // Count and acknowledge what was handled: a new link of the same epoch
                // resumes after it (each stanza handled once).
                let h = {
                    let mut received = lock(&self.received);
                    let entry = received
                        .entry(node.to_owned())
                        .or_insert_with(|| (epoch.to_owned(), 0));
                    if entry.0 != epoch {
                        *entry = (epoch.to_owned(), 0);
                    }
                    entry.1 += handled;
                    entry.1
                };
                write_within(stream, ack(h).as_bytes(), self.config.limits.write_timeout).await?;
            }
            if let Some(e) = failed {
                tracing::error!(%node, error = %e, "closing the link unacknowledged: the sender sends again");
                return Err(e);
            }
            let n = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout(self.config.limits.link_read_timeout, stream.read(&mut buf)) => {
                    r.map_err(|_| LinkError::Timeout)??
                }
            };
            if n == 0 {
                return Err(LinkError::Closed);
            }
            reader.feed(&buf[..n])?;
        }
    }

    /// A stanza that arrived over a link from `cluster`: checked, then handled as if a
    /// local user had sent it, never forwarded again.
    ///
    /// Fails only when the sender cannot be checked (the store): the stanza is then
    /// not handled, and the link must close unacknowledged.
    async fn on_link_stanza(
        &self,
        cluster: &str,
        node: &str,
        stanza: Element,
    ) -> Result<(), LinkError> {
        // The envelope is read once, here; what follows gets typed values.
        let env = match Envelope::parse(&stanza) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(%cluster, name = stanza.name(), error = ?e, "a malformed stanza on a router link; dropped");
                return Ok(());
            }
        };
        let domain = self.config.domain.as_str();
        let muc_host = self.config.muc.as_ref().map(|m| m.host.as_str());
        // The sender must be homed in the sending cluster, by the same rule as routing:
        // a local account or a quarantined name is nobody's to speak for. A room
        // speaks for itself only from the cluster the room directory says it lives in.
        let sender = match &env.from {
            Some(j) if j.domain().as_str() == domain => match j.node() {
                Some(user) => match self.home_of(user.as_str()).await {
                    Ok(Home::Remote { cluster: home, .. }) if home == cluster => {
                        Some(LinkSender::User)
                    }
                    Ok(_) => None,
                    // Not "no": the stanza is neither handled nor acknowledged, and
                    // the link closes so that the sender sends it again.
                    Err(e) => return Err(e.into()),
                },
                None => None,
            },
            Some(j) if Some(j.domain().as_str()) == muc_host => match j.node() {
                Some(room) => match self.room_home(room.as_str()).await {
                    Ok(RoomHome::Remote { cluster: home, .. }) if home == cluster => {
                        Some(LinkSender::Room)
                    }
                    Ok(_) => None,
                    Err(e) => return Err(e.into()),
                },
                None => None,
            },
            _ => None,
        };
        let Some(sender) = sender else {
            tracing::warn!(%cluster, from = ?stanza.attr("from"), "a stanza whose sender is not homed in the sending cluster; dropped");
            return Ok(());
        };
        let Some(to) = env.to else {
            return Ok(());
        };
        let to_user = to.domain().as_str() == domain && to.node().is_some();
        let to_room = Some(to.domain().as_str()) == muc_host && to.node().is_some();
        match sender {
            LinkSender::User if to_user || to_room => {}
            LinkSender::User => {
                self.bounce(&stanza, StanzaErrorCondition::ServiceUnavailable, None);
                return Ok(());
            }
            // A room's stanzas only for its occupants homed here.
            LinkSender::Room => {
                let here = match to.node().filter(|_| to_user) {
                    Some(user) => matches!(self.home_of(user.as_str()).await?, Home::Local { .. }),
                    None => false,
                };
                if !here {
                    tracing::warn!(%cluster, to = %to, "a room's stanza for someone not homed here; dropped");
                    return Ok(());
                }
            }
        }
        if let Some(router) = self.router.upgrade() {
            router
                .received(cluster, node, sender, env.ty, to, stanza)
                .await;
        }
        Ok(())
    }
}
