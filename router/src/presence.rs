//! Presence (RFC 6121 §4) and the subscription state machine (RFC 6121 §3).
//!
//! Subscription stanzas are processed twice, as the RFC describes: outbound at the
//! user's server and inbound at the contact's: on this node when both are homed here,
//! else the inbound half runs on the contact's home node, reached over a router link
//! (`link/`).

use std::sync::Arc;

use impmesh_store::{RosterItem, Subscription};
use jid::{BareJid, Jid};
use minidom::Element;

use crate::Server;
use crate::context::Context;
use crate::core::envelope::PresenceType;
use crate::core::subscription::{self, Kind, State};
use crate::deliver::sender_of;
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::roster::{MAX_ROSTER_ITEMS, roster_item_xml};
use crate::stanza;
use crate::xml::ns;

impl Context<'_> {
    /// A presence stanza from this session's client.
    pub(crate) async fn on_presence(
        &mut self,
        presence: Element,
        ty: PresenceType,
        to: Option<Jid>,
    ) {
        match (ty, to) {
            (PresenceType::Subscription(kind), Some(to)) => {
                let user = self.user();
                self.server
                    .outbound_subscription(&user, kind, to.to_bare(), presence)
                    .await;
            }
            (PresenceType::Available, None) => self.go_available(presence).await,
            (PresenceType::Unavailable, None) => self.go_unavailable(Some(presence)).await,
            (
                PresenceType::Available | PresenceType::Unavailable | PresenceType::Error,
                Some(to),
            ) => self.directed_presence(presence, to, ty).await,
            // Probes come from servers, not clients (RFC 6121 §4.3).
            (PresenceType::Probe, _) => {}
            _ => self.reply_error(&presence, StanzaErrorCondition::BadRequest, None),
        }
    }

    /// Initial or updated available presence (RFC 6121 §4.2, §4.4).
    async fn go_available(&mut self, presence: Element) {
        // XEP-0153: the hash of the account's avatar, whatever the client put there.
        let server = self.server.clone();
        let presence = server.with_avatar_hash(&self.user(), presence).await;
        let priority = presence
            .get_child("priority", ns::CLIENT)
            .and_then(|p| p.text().trim().parse::<i8>().ok())
            .unwrap_or(0);
        let xml: Arc<str> = String::from(&presence).into();
        let initial = {
            let mut state = lock(&self.handle.state);
            let initial = !state.available;
            state.available = true;
            state.priority = priority;
            state.last = Some(xml.clone());
            initial
        };
        let user = self.user();
        let server = self.server.clone();
        let roster = match server.roster_of(&user).await {
            Ok(items) => items,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the roster for a presence broadcast");
                Default::default()
            }
        };
        for item in roster.values().filter(|i| i.subscription.has_from()) {
            server
                .presence_to_contact(&user, &item.contact, &presence)
                .await;
        }
        server.presence_to_own_resources(&self.handle.jid, &presence);
        if !initial {
            return;
        }
        // Probes (§4.3): the current presence of every contact the user subscribes to.
        for item in roster.values().filter(|i| i.subscription.has_to()) {
            for xml in server.probe(&user, &item.contact).await {
                // The contact's capabilities are news for the user's PEP service too.
                if xml.contains(ns::CAPS)
                    && let Some(p) = stanza::parse_own(&xml)
                {
                    server.pep_presence(&user, &p);
                }
                self.push_out(xml);
            }
        }
        // Presence of the user's other available resources.
        for other in server.hub.sessions(&user) {
            if other.id != self.handle.id
                && let Some(last) = other.presence().last.filter(|_| other.presence().available)
            {
                self.push_out(last);
            }
        }
        self.start_offline();
        match server.store.subscription_requests(&user).await {
            Ok(requests) => {
                for (_, stanza) in requests {
                    self.push_out(stanza.into());
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read stored subscription requests"),
        }
    }

    /// Unavailable presence: to subscribers, directed-presence targets and the user's
    /// own resources (RFC 6121 §4.5). `presence` is the client's stanza, or `None` when
    /// the session ended without one.
    pub(crate) async fn go_unavailable(&mut self, presence: Option<Element>) {
        let was_available = std::mem::take(&mut lock(&self.handle.state).available);
        let mut unavailable = presence.unwrap_or_else(|| {
            Element::builder("presence", ns::CLIENT)
                .attr(rxml::xml_ncname!("type").to_owned(), "unavailable")
                .build()
        });
        stanza::set_attr(&mut unavailable, "from", &self.jid().to_string());
        let user = self.user();
        let server = self.server.clone();
        if was_available && let Ok(roster) = server.roster_of(&user).await {
            for item in roster.values().filter(|i| i.subscription.has_from()) {
                server
                    .presence_to_contact(&user, &item.contact, &unavailable)
                    .await;
            }
        }
        for target in std::mem::take(self.directed) {
            let mut p = unavailable.clone();
            stanza::set_attr(&mut p, "to", &target.to_string());
            server.send_to_jid(&p);
        }
        server.presence_to_own_resources(&self.handle.jid, &unavailable);
    }

    /// Whether the session may count `to` among its directed-presence targets, each
    /// told when the session ends (the set is bounded); if not, the client is told.
    fn directed_has_room(&mut self, presence: &Element, to: &Jid) -> bool {
        if self.directed.len() < MAX_DIRECTED || self.directed.contains(to) {
            return true;
        }
        self.reply_error(
            presence,
            StanzaErrorCondition::ResourceConstraint,
            Some("too many directed presence targets in this session"),
        );
        false
    }

    /// Presence sent to one JID (RFC 6121 §4.6).
    async fn directed_presence(&mut self, presence: Element, to: Jid, ty: PresenceType) {
        let server = self.server.clone();
        if server.is_muc(&to) {
            // A room: entered with directed presence, left when the session ends.
            match ty {
                PresenceType::Available => {
                    if !self.directed_has_room(&presence, &to) {
                        return;
                    }
                    if self.on_muc_presence(&presence, &to).await {
                        self.directed.insert(to);
                    }
                }
                PresenceType::Unavailable => {
                    self.directed.remove(&to);
                    self.on_muc_presence(&presence, &to).await;
                }
                _ => {}
            }
            return;
        }
        if to.domain().as_str() != server.config.domain {
            self.reply_error(&presence, StanzaErrorCondition::RemoteServerNotFound, None);
            return;
        }
        let user = self.user();
        if to.node().is_none() || server.is_blocked_by(&user, &to.to_bare()).await {
            return;
        }
        if server
            .is_blocked_by(
                to.node().map(|n| n.as_str()).unwrap_or_default(),
                &self.jid().to_bare(),
            )
            .await
        {
            return;
        }
        let subscribed = matches!(
            server.roster_of(&user).await,
            Ok(roster) if roster.get(to.to_bare().as_str()).is_some_and(|i| i.subscription.has_from())
        );
        match ty {
            PresenceType::Available if !subscribed => {
                // Each target is told when the session ends: the set is bounded.
                if !self.directed_has_room(&presence, &to) {
                    return;
                }
                self.directed.insert(to.clone());
            }
            PresenceType::Unavailable => {
                self.directed.remove(&to);
            }
            _ => {}
        }
        let presence = if ty == PresenceType::Available {
            server.with_avatar_hash(&user, presence).await
        } else {
            presence
        };
        server.send_to_jid(&presence);
    }
}

/// A step of the subscription machine that reaches another user, run after the roster
/// lock of the user whose roster changed is released.
enum After {
    /// A subscription stanza to `0` (type `1`, from `2`).
    Deliver(BareJid, Kind, BareJid, Element),
    /// A presence to the JID in its `to`.
    Send(Element),
    /// Unavailable from each available resource of user `0` to `1`.
    Unavailable(String, String),
}

impl Server {
    /// The lock that orders the subscription steps changing `owner`'s roster: a step
    /// reads an item, decides and writes it back, and two steps for the same owner
    /// (say, the user's approval and the contact's answer arriving over a link) must
    /// not interleave. Striped: a few locks for every user, held one at a time.
    pub(crate) fn roster_lock(&self, owner: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        owner.hash(&mut hasher);
        &self.roster_locks[(hasher.finish() as usize) % self.roster_locks.len()]
    }

    /// Sends a user's presence to one contact's available resources, unless either side
    /// blocks the other.
    async fn presence_to_contact(&self, user: &str, contact: &str, presence: &Element) {
        let Some(contact_jid) = stanza::parse_jid(contact) else {
            return;
        };
        let Some(contact_user) = contact_jid.node().map(|n| n.to_string()) else {
            return;
        };
        if contact_jid.domain().as_str() != self.config.domain {
            return;
        }
        let user_bare = match stanza::bare(user, &self.config.domain) {
            Some(b) => b,
            None => return,
        };
        if presence.attr("type") == Some("unavailable") {
            // Forgotten by the contact's PEP service whatever else happens (only
            // forgets: harmless where the contact is not homed).
            self.pep_presence(&contact_user, presence);
        }
        if self.is_blocked_by(user, &contact_jid.to_bare()).await
            || self.is_blocked_by(&contact_user, &user_bare).await
        {
            return;
        }
        let mut p = presence.clone();
        stanza::set_attr(&mut p, "to", contact);
        let sessions = self.hub.sessions(&contact_user);
        if sessions.is_empty() {
            if !self.route_remote(&contact_user, &p).await {
                // Homed here and offline: its PEP service still hears of it.
                self.pep_presence(&contact_user, &p);
            }
            return;
        }
        self.pep_presence(&contact_user, &p);
        let xml: Arc<str> = String::from(&p).into();
        for s in sessions {
            if s.presence().available {
                // A full queue drops presence (RFC 6121 §4.4 allows it).
                let _ = s.send(xml.clone(), sender_of(&p));
            }
        }
    }

    /// Sends a presence to every available resource of its sender's account.
    fn presence_to_own_resources(&self, from: &jid::FullJid, presence: &Element) {
        let Some(user) = from.node() else { return };
        let mut p = presence.clone();
        stanza::set_attr(&mut p, "to", &from.to_bare().to_string());
        self.pep_presence(user.as_str(), &p);
        let xml: Arc<str> = String::from(&p).into();
        for s in self.hub.sessions(user.as_str()) {
            if s.presence().available || s.jid == *from {
                let _ = s.send(xml.clone(), sender_of(&p));
            }
        }
    }

    /// The current presence of a contact's available resources, for a probe from `user`.
    pub(crate) async fn probe(&self, user: &str, contact: &str) -> Vec<Arc<str>> {
        let Some(contact_jid) = stanza::parse_jid(contact) else {
            return vec![];
        };
        if contact_jid.domain().as_str() != self.config.domain {
            return vec![];
        }
        let Some(contact_user) = contact_jid.node().map(|n| n.to_string()) else {
            return vec![];
        };
        let Some(user_bare) = stanza::bare(user, &self.config.domain) else {
            return vec![];
        };
        if self.is_blocked_by(&contact_user, &user_bare).await {
            return vec![];
        }
        let sessions = self.hub.sessions(&contact_user);
        if sessions.is_empty() {
            // A contact homed on another cluster: the probe goes to its home node,
            // whose answers come back over its link (RFC 6121 §4.3.2).
            let probe = Element::builder("presence", ns::CLIENT)
                .attr(rxml::xml_ncname!("from").to_owned(), user_bare.to_string())
                .attr(
                    rxml::xml_ncname!("to").to_owned(),
                    contact_jid.to_bare().to_string(),
                )
                .attr(rxml::xml_ncname!("type").to_owned(), "probe")
                .build();
            self.route_remote(&contact_user, &probe).await;
            return vec![];
        }
        let mut out = vec![];
        for s in sessions {
            let p = s.presence();
            if let (true, Some(last)) = (p.available, p.last)
                && let Some(mut element) = stanza::parse_own(&last)
            {
                stanza::set_attr(&mut element, "to", &user_bare.to_string());
                out.push(String::from(&element).into());
            }
        }
        out
    }

    /// Outbound processing of a subscription stanza from a local user (RFC 6121 §3).
    /// The user's roster changes under the user's roster lock; what goes to others
    /// goes after it is released (never two roster locks at once).
    pub async fn outbound_subscription(
        &self,
        user: &str,
        kind: Kind,
        contact: BareJid,
        stanza: Element,
    ) {
        let after = {
            let _owner = self.roster_lock(user).lock().await;
            self.outbound_locked(user, kind, contact, stanza).await
        };
        self.run_after(after).await;
    }

    /// The subscription state between `user` and `contact` as the tables of
    /// [`subscription`] see it: the roster item and the stored inbound request.
    async fn subscription_state(
        &self,
        user: &str,
        contact: &str,
    ) -> impmesh_store::Result<(Option<RosterItem>, State)> {
        let item = self.store.roster_item(user, contact).await?;
        let pending_in = self.store.has_subscription_request(user, contact).await?;
        let state = match &item {
            Some(i) => State::new(
                i.subscription.has_to(),
                i.subscription.has_from(),
                i.ask,
                pending_in,
            ),
            None => State::new(false, false, false, pending_in),
        };
        Ok((item, state))
    }

    /// Writes the roster half of a subscription step: the item with `next`'s halves
    /// and `ask`, when they changed. False (logged) when the store failed.
    async fn save_state(
        &self,
        user: &str,
        contact: &str,
        item: Option<RosterItem>,
        state: State,
        next: State,
    ) -> bool {
        let roster_part = |s: State| (s.to(), s.from(), s.pending_out());
        if roster_part(state) == roster_part(next) {
            return true;
        }
        let mut item = item.unwrap_or_else(|| RosterItem {
            contact: contact.to_owned(),
            ..Default::default()
        });
        item.subscription = Subscription::from_halves(next.to(), next.from());
        item.ask = next.pending_out();
        self.save_and_push(user, &item).await
    }

    async fn outbound_locked(
        &self,
        user: &str,
        kind: Kind,
        contact: BareJid,
        mut stanza: Element,
    ) -> Vec<After> {
        let mut after = vec![];
        let domain = self.config.domain.clone();
        let Some(user_bare) = stanza::bare(user, &domain) else {
            return after;
        };
        if contact.domain().as_str() != domain {
            self.bounce(&stanza, StanzaErrorCondition::RemoteServerNotFound, None);
            return after;
        }
        // Subscription stanzas travel between bare JIDs (§3.1.2).
        stanza::set_attr(&mut stanza, "from", &user_bare.to_string());
        stanza::set_attr(&mut stanza, "to", &contact.to_string());
        let contact_s = contact.to_string();
        let Ok((item, state)) = self.subscription_state(user, &contact_s).await else {
            // L4: nothing is sent on a state that could not be read.
            self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
            return after;
        };
        let step = subscription::outbound(state, kind);
        let creates_item =
            item.is_none() && (step.next.to() || step.next.from() || step.next.pending_out());
        if creates_item {
            // A step that creates a roster item (a request, or the approval of one)
            // meets the roster cap as a roster set does (security review M9).
            match self.store.roster_len(user).await {
                Ok(n) if n < MAX_ROSTER_ITEMS => {}
                Ok(_) => {
                    self.bounce(
                        &stanza,
                        StanzaErrorCondition::ResourceConstraint,
                        Some("the roster is full"),
                    );
                    return after;
                }
                Err(_) => {
                    self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
                    return after;
                }
            }
        }
        if !self
            .save_state(user, &contact_s, item, state, step.next)
            .await
        {
            // L4: the step was not recorded; the contact must not be told it was.
            self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
            return after;
        }
        if state.pending_in() && !step.next.pending_in() {
            let _ = self
                .store
                .remove_subscription_request(user, &contact_s)
                .await;
        }
        if step.route {
            after.push(After::Deliver(
                contact.clone(),
                kind,
                user_bare.clone(),
                stanza,
            ));
        }
        if step.send_presence {
            // The contact now sees the user's current presence (§3.1.5).
            for s in self.hub.sessions(user) {
                let p = s.presence();
                if let (true, Some(last)) = (p.available, p.last)
                    && let Some(mut element) = stanza::parse_own(&last)
                {
                    stanza::set_attr(&mut element, "to", &contact_s);
                    after.push(After::Send(element));
                }
            }
        }
        if step.send_unavailable {
            after.push(After::Unavailable(user.to_owned(), contact_s));
        }
        after
    }

    /// What a subscription step sends once its roster lock is released, in order.
    async fn run_after(&self, after: Vec<After>) {
        for step in after {
            match step {
                After::Deliver(contact, kind, from, stanza) => {
                    Box::pin(self.deliver_subscription(&contact, kind, &from, stanza)).await;
                }
                After::Send(stanza) => {
                    self.send_to_jid(&stanza);
                    self.pep_presence_if_homed_here(&stanza).await;
                }
                After::Unavailable(user, to) => self.unavailable_from_user_to(&user, &to),
            }
        }
    }

    /// Hands a subscription stanza to the contact's side: inbound processing here when
    /// `contact` is homed on this cluster (or nowhere), else over the router link to its
    /// home node, which does the inbound half.
    async fn deliver_subscription(
        &self,
        contact: &BareJid,
        kind: Kind,
        from: &BareJid,
        stanza: Element,
    ) {
        if let Some(user) = contact.node()
            && self.route_remote(user.as_str(), &stanza).await
        {
            return;
        }
        self.inbound_subscription(contact, kind, from, stanza).await;
    }

    /// Inbound processing at the contact's side: `owner` receives `kind` from `from`.
    pub(crate) async fn inbound_subscription(
        &self,
        owner: &BareJid,
        kind: Kind,
        from: &BareJid,
        stanza: Element,
    ) {
        let Some(owner_user) = owner.node().map(|n| n.to_string()) else {
            return;
        };
        let after = {
            let _owner = self.roster_lock(&owner_user).lock().await;
            self.inbound_locked(owner, &owner_user, kind, from, stanza)
                .await
        };
        self.run_after(after).await;
    }

    async fn inbound_locked(
        &self,
        owner: &BareJid,
        owner_user: &str,
        kind: Kind,
        from: &BareJid,
        stanza: Element,
    ) -> Vec<After> {
        let mut after = vec![];
        let answer = |kind: Kind| {
            let reply = Element::builder("presence", ns::CLIENT)
                .attr(rxml::xml_ncname!("from").to_owned(), owner.to_string())
                .attr(rxml::xml_ncname!("to").to_owned(), from.to_string())
                .attr(rxml::xml_ncname!("type").to_owned(), kind.as_str())
                .build();
            After::Deliver(from.clone(), kind, owner.clone(), reply)
        };
        match self.store.user_exists(owner_user).await {
            Ok(true) => {}
            Ok(false) => {
                if kind == Kind::Subscribe {
                    // §3.1.3: the contact does not exist; tell the user it is unsubscribed.
                    after.push(answer(Kind::Unsubscribed));
                }
                return after;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read an account for a subscription");
                self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
                return after;
            }
        }
        if self.is_blocked_by(owner_user, from).await {
            return after;
        }
        let from_s = from.to_string();
        tracing::debug!(owner = %owner_user, from = %from_s, ?kind, "inbound subscription");
        let Ok((item, state)) = self.subscription_state(owner_user, &from_s).await else {
            self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
            return after;
        };
        let step = subscription::inbound(state, kind);
        if let Some(reply) = step.reply {
            // Already subscribed: answered on the owner's behalf (§3.1.3).
            after.push(answer(reply));
            return after;
        }
        // What is kept and shown of a request: the request itself, a status and a
        // nick, trimmed (the client's whole stanza could be 256 KiB).
        let stanza = if kind == Kind::Subscribe {
            stored_request(&stanza)
        } else {
            stanza
        };
        if step.next.pending_in() && !state.pending_in() {
            let xml = String::from(&stanza);
            match self
                .store
                .put_subscription_request(owner_user, &from_s, &xml, MAX_PENDING_REQUESTS)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    self.bounce(
                        &stanza,
                        StanzaErrorCondition::ResourceConstraint,
                        Some("the contact has too many pending subscription requests"),
                    );
                    return after;
                }
                Err(e) => {
                    // L4: the sender is told, not left waiting for an answer.
                    tracing::error!(error = %e, "cannot store a subscription request");
                    self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
                    return after;
                }
            }
        } else if state.pending_in() && !step.next.pending_in() {
            let _ = self
                .store
                .remove_subscription_request(owner_user, &from_s)
                .await;
        }
        if !self
            .save_state(owner_user, &from_s, item, state, step.next)
            .await
        {
            self.bounce(&stanza, StanzaErrorCondition::InternalServerError, None);
            return after;
        }
        if step.deliver {
            self.to_available_resources(owner_user, &stanza);
        }
        if step.send_unavailable {
            // §3.3.3: the sender no longer sees the owner's presence.
            after.push(After::Unavailable(owner_user.to_owned(), from_s));
        }
        after
    }

    /// Delivers a stanza to every available resource of a local user.
    pub(crate) fn to_available_resources(&self, user: &str, stanza: &Element) {
        let xml: Arc<str> = String::from(stanza).into();
        for s in self.hub.sessions(user) {
            if s.presence().available {
                let _ = s.send(xml.clone(), sender_of(stanza));
            }
        }
    }

    /// Unavailable presence from each of `user`'s available resources to `to`.
    fn unavailable_from_user_to(&self, user: &str, to: &str) {
        for s in self.hub.sessions(user) {
            if s.presence().available {
                let p = Element::builder("presence", ns::CLIENT)
                    .attr(rxml::xml_ncname!("from").to_owned(), s.jid.to_string())
                    .attr(rxml::xml_ncname!("to").to_owned(), to)
                    .attr(rxml::xml_ncname!("type").to_owned(), "unavailable")
                    .build();
                if let Some(owner) =
                    stanza::parse_jid(to).and_then(|j| j.node().map(|n| n.to_string()))
                {
                    // Only forgets: harmless where the owner is not homed.
                    self.pep_presence(&owner, &p);
                }
                self.send_to_jid(&p);
            }
        }
    }

    /// `user`'s roster, from the session cache (loaded from the store on first use
    /// while the user has a session here).
    pub(crate) async fn roster_of(
        &self,
        user: &str,
    ) -> impmesh_store::Result<Arc<std::collections::HashMap<String, RosterItem>>> {
        let writes = match self.hub.roster(user) {
            Ok(roster) => return Ok(roster),
            Err(writes) => writes,
        };
        let (_, items) = self.store.roster(user).await?;
        if let Some(writes) = writes {
            self.hub.cache_roster(user, writes, items.clone());
        }
        Ok(Arc::new(
            items.into_iter().map(|i| (i.contact.clone(), i)).collect(),
        ))
    }

    /// Saves a roster item and pushes it to the owner's interested resources; false
    /// (logged) when the store failed, for the caller to report.
    pub(crate) async fn save_and_push(&self, owner: &str, item: &RosterItem) -> bool {
        match self.store.put_roster_item(owner, item).await {
            Ok(version) => {
                self.hub.roster_changed(owner, item, false);
                self.push_roster(owner, item, false, version);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot save a roster item");
                false
            }
        }
    }

    /// A roster push (RFC 6121 §2.1.6) to every interested resource of `owner`.
    pub(crate) fn push_roster(&self, owner: &str, item: &RosterItem, removed: bool, version: i64) {
        for s in self.hub.sessions(owner) {
            if !s.presence().interested {
                continue;
            }
            let push = format!(
                "<iq type='set' id='push{}' to='{}'><query xmlns='{}' ver='{version}'>{}</query></iq>",
                crate::names::random_id(),
                crate::xml::escape(&s.jid.to_string()),
                ns::ROSTER,
                roster_item_xml(item, removed)
            );
            let _ = s.send(push.into(), "");
        }
    }
}

/// Directed-presence targets one session may have (RFC 6121 §4.6).
const MAX_DIRECTED: usize = 1000;

/// Subscription requests kept per user until answered.
const MAX_PENDING_REQUESTS: usize = 1000;

/// The status text and nick kept with a stored subscription request, at most.
const MAX_REQUEST_TEXT: usize = 1024;

/// The part of an inbound subscription request that is stored and delivered: the
/// request, its status (RFC 6121 §3.1.1) and nick (XEP-0172), each trimmed.
fn stored_request(stanza: &Element) -> Element {
    let mut out = Element::builder("presence", ns::CLIENT);
    for attr in ["from", "to", "type", "id"] {
        if let Some(v) = stanza.attr(attr) {
            out = out.attr(rxml::NcName::try_from(attr).expect("a constant NCName"), v);
        }
    }
    let trimmed = |e: &Element| -> String { e.text().chars().take(MAX_REQUEST_TEXT).collect() };
    if let Some(status) = stanza.get_child("status", ns::CLIENT) {
        out = out.append(
            Element::builder("status", ns::CLIENT)
                .append(trimmed(status))
                .build(),
        );
    }
    if let Some(nick) = stanza.get_child("nick", NICK) {
        out = out.append(Element::builder("nick", NICK).append(trimmed(nick)).build());
    }
    out.build()
}

/// XEP-0172 user nickname.
const NICK: &str = "http://jabber.org/protocol/nick";
