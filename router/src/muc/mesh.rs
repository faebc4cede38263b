//! Rooms across the mesh (docs/muc.md, "Rooms across the mesh"): a room lives on one
//! node (its home, in the room directory); occupants homed on other clusters reach it
//! over the router links.
//!
//! - **The occupant's side.** A session's stanzas to a room of another cluster go to
//!   the room's node over the link; the node keeps the session's *seat* (room, nick,
//!   the room's node) so that the session's end leaves the room there, and so that a
//!   lost link tells the session it is out (status 333).
//! - **The room's side.** A stanza from a session of another cluster enters the room
//!   like a local one; the room keeps the session's node (a *visitor*), and what the
//!   room sends to visitors goes over their node's link in the order the room decided
//!   it: each distinct stanza once per node, with the recipients in an XEP-0033
//!   `<addresses/>` element, which that node fans out to its own sessions.

use std::collections::HashMap;

use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use crate::Server;
use crate::core::envelope::{IqType, Type};
use crate::core::muc;
use crate::hub::lock;
use crate::stanza;
use crate::xml::ns;

/// XEP-0033 extended stanza addressing: one stanza for many recipients of a node.
pub(crate) const NS_ADDRESS: &str = "http://jabber.org/protocol/address";

/// Recipients one fanned-out stanza names at most; more go in further copies.
pub(crate) const MAX_ADDRESSES: usize = 1_000;

/// What one stanza on a router link may hold (the receiving link's frame limits):
/// a fanned-out stanza with its addresses stays within them.
const LINK_ELEMENTS: usize = 4096;
const LINK_BYTES: usize = crate::link::MAX_LINK_STANZA;

/// The elements of `el`, itself included.
pub(crate) fn elements(el: &Element) -> usize {
    1 + el.children().map(elements).sum::<usize>()
}

/// Whether `el` may go over a router link as it is (the receiving end would close
/// a link that brings more than its frame limits).
fn fits_link(el: &Element) -> bool {
    elements(el) + 8 <= LINK_ELEMENTS && String::from(el).len() + 1024 <= LINK_BYTES
}

/// A local session's place in a room of another cluster.
#[derive(Debug, Clone)]
pub(crate) struct Seat {
    cluster: String,
    node: String,
    nick: String,
    /// The room confirmed the entry (its own presence, status 110, came back).
    confirmed: bool,
    /// Leaves sent whose answer (the session's unavailable presence, 110) has not
    /// come back yet, and whether the session entered again meanwhile: then the
    /// answer to the leave does not end the seat.
    leaving: u32,
    rejoined: bool,
}

/// Where a room is, for a stanza to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    /// On this node (or nowhere yet: made here).
    Here,
    /// On a node of another cluster.
    Peer { cluster: String, node: String },
    /// Not reachable from here: the refusal's text.
    Refused(String),
}

/// A session of another cluster in rooms here.
#[derive(Debug, Clone)]
pub(crate) struct Visitor {
    pub(crate) cluster: String,
    pub(crate) node: String,
    /// The rooms (names) it is in, or entering.
    rooms: std::collections::HashSet<String>,
}

/// Elements a stanza to a room may hold at most: with what the room adds, what it
/// sends on stays within a router link's frame limits.
pub(crate) const MAX_ROOM_STANZA_ELEMENTS: usize = 3_500;

/// Requests to rooms' archives and moderations from sessions of other clusters
/// handled at once, at most.
const STORED_REQUESTS: usize = 16;

/// The mesh's bookkeeping of the rooms of a node.
#[derive(Debug)]
pub(crate) struct Mesh {
    /// Sessions of other clusters in rooms here, with the node each is homed on.
    pub(crate) visitors: std::sync::Mutex<HashMap<FullJid, Visitor>>,
    /// Local sessions in rooms of other clusters, by session and room.
    seats: std::sync::Mutex<HashMap<FullJid, HashMap<BareJid, Seat>>>,
    /// Room for requests through the store from other clusters (STORED_REQUESTS).
    stored: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            visitors: Default::default(),
            seats: Default::default(),
            stored: std::sync::Arc::new(tokio::sync::Semaphore::new(STORED_REQUESTS)),
        }
    }
}

/// One stanza for each distinct (node, stanza) of `out` to visitors, in order: the
/// stanzas with the same content for several sessions of one node become one, with
/// their `to` in an `<addresses/>` element. Returns (cluster, node, stanza).
pub(crate) fn fan_out(out: Vec<(String, String, muc::Out)>) -> Vec<(String, String, Element)> {
    // Keyed by node and the stanza without its `to`, in the order first seen. A
    // recipient joins a group only if none of its stanzas is in a later group: each
    // session still gets the room's stanzas in the order the room decided them.
    // Each group: its stanza, recipients, and how many more addresses and bytes of
    // them fit on a link.
    struct Group {
        cluster: String,
        node: String,
        stanza: Element,
        to: Vec<FullJid>,
        room: (usize, usize),
    }
    let mut groups: Vec<Group> = vec![];
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    let mut last: HashMap<FullJid, usize> = HashMap::new();
    for (cluster, node, mut o) in out {
        // Only this fan-out names recipients (the room strips what clients send).
        while o.stanza.remove_child("addresses", NS_ADDRESS).is_some() {}
        let mut bare = o.stanza.clone();
        stanza::remove_attr(&mut bare, "to");
        let text = String::from(&bare);
        // An address: about 40 bytes of markup and the JID, escaped at worst 6×.
        let cost = 40 + 6 * o.to.as_str().len();
        let key = (node.clone(), text);
        let after = last.get(&o.to).copied();
        let fits = |g: &Group| g.to.len() < MAX_ADDRESSES && g.room.0 >= 1 && g.room.1 >= cost;
        let at = match index.get(&key) {
            Some(&i) if fits(&groups[i]) && after.is_none_or(|a| a <= i) => {
                let g = &mut groups[i];
                g.to.push(o.to.clone());
                g.room = (g.room.0 - 1, g.room.1 - cost);
                i
            }
            _ => {
                // The room for addresses beside the stanza (and its `<addresses/>`).
                let room = (
                    LINK_ELEMENTS.saturating_sub(elements(&o.stanza) + 1),
                    LINK_BYTES.saturating_sub(key.1.len() + 256),
                );
                index.insert(key, groups.len());
                groups.push(Group {
                    cluster,
                    node,
                    stanza: o.stanza,
                    to: vec![o.to.clone()],
                    room,
                });
                groups.len() - 1
            }
        };
        last.insert(o.to, at);
    }
    groups
        .into_iter()
        .map(
            |Group {
                 cluster,
                 node,
                 mut stanza,
                 to,
                 ..
             }| {
                if to.len() > 1 {
                    let mut addresses = Element::bare("addresses", NS_ADDRESS);
                    for jid in &to {
                        addresses.append_child(
                            Element::builder("address", NS_ADDRESS)
                                .attr(rxml::xml_ncname!("type").to_owned(), "bcc")
                                .attr(rxml::xml_ncname!("jid").to_owned(), jid.to_string())
                                .build(),
                        );
                    }
                    stanza.append_child(addresses);
                }
                (cluster, node, stanza)
            },
        )
        .collect()
}

/// The recipients a fanned-out stanza names (its `<addresses/>` removed), or `None`
/// when it names none (a stanza for its `to` alone). At most [`MAX_ADDRESSES`];
/// addresses that are not full JIDs are skipped.
pub(crate) fn take_addresses(stanza: &mut Element) -> Option<Vec<FullJid>> {
    let addresses = stanza.remove_child("addresses", NS_ADDRESS)?;
    Some(
        addresses
            .children()
            .filter(|a| a.name() == "address" && a.attr("type") == Some("bcc"))
            .filter_map(|a| a.attr("jid").and_then(|j| FullJid::new(j).ok()))
            .take(MAX_ADDRESSES)
            .collect(),
    )
}

/// Adds status code `code` to a room's presence (its `muc#user` element).
fn with_status(presence: &mut Element, code: u16) {
    if let Some(x) = presence.children_mut().find(|c| c.is("x", muc::NS_USER)) {
        x.append_child(
            Element::builder("status", muc::NS_USER)
                .attr(rxml::xml_ncname!("code").to_owned(), code.to_string())
                .build(),
        );
    }
}

/// Whether a room's presence says the session is out of the room: its own
/// unavailable presence (110, but not a nick change, 303), or the room's end.
pub(crate) fn says_out(presence: &Element) -> bool {
    if presence.name() != "presence" || presence.attr("type") != Some("unavailable") {
        return false;
    }
    let codes = status_codes(presence);
    let destroyed = presence
        .get_child("x", muc::NS_USER)
        .is_some_and(|x| x.get_child("destroy", muc::NS_USER).is_some());
    destroyed || (codes.iter().any(|c| c == "110") && !codes.iter().any(|c| c == "303"))
}

/// The room a room's stanza comes from (its `from`'s local part).
pub(crate) fn room_of(stanza: &Element) -> Option<String> {
    let from = Jid::new(stanza.attr("from")?).ok()?;
    Some(from.node()?.to_string())
}

/// The status codes of a room's presence.
fn status_codes(presence: &Element) -> Vec<String> {
    presence
        .get_child("x", muc::NS_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.is("status", muc::NS_USER))
                .filter_map(|c| c.attr("code").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Forgets that `session` is in `room`, and the visitor once it is in no room.
pub(crate) fn forget_room(visitors: &mut HashMap<FullJid, Visitor>, session: &FullJid, room: &str) {
    if let Some(v) = visitors.get_mut(session) {
        v.rooms.remove(room);
        if v.rooms.is_empty() {
            visitors.remove(session);
        }
    }
}

impl Server {
    /// Where the room `to` names is, for a stanza of a local session.
    pub(crate) async fn muc_place(&self, to: &Jid) -> Place {
        use impmesh_store::RoomHome;
        let Some(name) = to.node() else {
            return Place::Here;
        };
        if lock(&self.muc.rooms).contains_key(name.as_str()) {
            return Place::Here;
        }
        match self.links.room_home(name.as_str()).await {
            Ok(RoomHome::Local { node }) if node == self.config.node_name => Place::Here,
            Ok(RoomHome::Local { node }) => Place::Refused(format!(
                "{} lives on node {node}; rooms are served by one node of a cluster",
                to.to_bare()
            )),
            Ok(RoomHome::Remote { cluster, node }) => Place::Peer {
                cluster: cluster.into_string(),
                node: node.into_string(),
            },
            Ok(RoomHome::Unknown) => Place::Here,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the room directory");
                Place::Refused("the room directory cannot be read right now; try again".into())
            }
        }
    }

    /// Sends a local session's stanza to a room of another cluster, keeping the
    /// session's seat for presence.
    pub(crate) fn muc_to_peer(&self, cluster: &str, node: &str, from: &FullJid, stanza: &Element) {
        if stanza.name() == "presence"
            && let Some(Ok(to)) = stanza.attr("to").map(Jid::new)
        {
            let room = to.to_bare();
            let mut seats = lock(&self.muc.mesh.seats);
            if stanza.attr("type") == Some("unavailable") {
                if let Some(mine) = seats.get_mut(from) {
                    mine.remove(&room);
                    if mine.is_empty() {
                        seats.remove(from);
                    }
                }
            } else if stanza.attr("type").is_none() {
                let nick = to.resource().map(|r| r.to_string()).unwrap_or_default();
                let seat = seats
                    .entry(from.clone())
                    .or_default()
                    .entry(room)
                    .or_insert_with(|| Seat {
                        cluster: cluster.to_owned(),
                        node: node.to_owned(),
                        nick: nick.clone(),
                        confirmed: false,
                        leaving: 0,
                        rejoined: false,
                    });
                if seat.leaving > 0 {
                    // Entering again before the room answered the leave.
                    seat.rejoined = true;
                    seat.confirmed = false;
                }
                if !seat.confirmed {
                    seat.nick = nick;
                }
            }
        }
        self.forward(cluster, node, stanza);
    }

    /// A session that ends, or leaves: its unavailable presence to the room `to`,
    /// over the link when the room is another cluster's. Whether it was. A session
    /// that stays (`answered`) keeps its seat until the room's answer (its own
    /// unavailable presence, 110) comes back and ends it.
    pub(crate) fn muc_leave_peer(&self, session: &FullJid, to: &Jid, answered: bool) -> bool {
        let seat = {
            let mut seats = lock(&self.muc.mesh.seats);
            let Some(mine) = seats.get_mut(session) else {
                return false;
            };
            let seat = if answered {
                mine.get_mut(&to.to_bare()).map(|s| {
                    s.leaving += 1;
                    s.rejoined = false;
                    s.clone()
                })
            } else {
                mine.remove(&to.to_bare())
            };
            if mine.is_empty() {
                seats.remove(session);
            }
            seat
        };
        let Some(seat) = seat else {
            return false;
        };
        let xml = format!(
            "<presence xmlns='jabber:client' type='unavailable' from='{}' to='{}/{}'/>",
            crate::xml::escape(&session.to_string()),
            crate::xml::escape(&to.to_bare().to_string()),
            crate::xml::escape(&seat.nick)
        );
        if let Some(p) = stanza::parse_own(&xml) {
            self.forward(&seat.cluster, &seat.node, &p);
        }
        true
    }

    /// A stanza of a room of another cluster, for sessions homed here (checked by the
    /// link): each recipient it names gets its copy; seats follow the room's word.
    pub(crate) async fn room_stanza_from_link(&self, ty: Type, to: &Jid, mut stanza: Element) {
        let recipients = match take_addresses(&mut stanza) {
            Some(r) => r,
            None => match to.clone().try_into_full() {
                Ok(full) => vec![full],
                // To an account (an invitation): delivered like any message.
                Err(bare) => {
                    if matches!(ty, Type::Message(_)) {
                        let to = Jid::from(bare);
                        if let Err(b) = self.deliver_local_message(stanza, &to).await {
                            self.bounce(&b.stanza, b.condition, b.text);
                        }
                    }
                    return;
                }
            },
        };
        let domain = self.config.domain.as_str();
        let Some(room) = stanza
            .attr("from")
            .and_then(|f| Jid::new(f).ok())
            .map(|f| f.to_bare())
        else {
            return;
        };
        for jid in recipients {
            // The link checked the stanza's `to`; each address is checked here.
            if jid.domain().as_str() != domain {
                continue;
            }
            let user = jid.node().map(|n| n.as_str()).unwrap_or_default();
            let local = self.hub.has_sessions(user)
                || matches!(
                    self.links.home_of(user).await,
                    Ok(impmesh_store::Home::Local { .. })
                );
            if !local {
                continue;
            }
            // Only to sessions that entered the room (or are entering it): answers to
            // their own requests aside, a room speaks to its occupants.
            let answer = matches!(ty, Type::Iq(IqType::Result | IqType::Error))
                || stanza.attr("type") == Some("error");
            if !answer && !self.has_seat(&jid, &room) {
                tracing::debug!(session = %jid, room = %room, "a room's stanza for a session not in it; dropped");
                continue;
            }
            if matches!(ty, Type::Iq(IqType::Get | IqType::Set)) {
                continue;
            }
            let mut copy = stanza.clone();
            stanza::set_attr(&mut copy, "to", &jid.to_string());
            if matches!(ty, Type::Presence(_)) {
                self.seat_update(&jid, &copy);
            }
            self.send_to_jid_as(&copy, true);
        }
    }

    /// The nick `session` is under in `room`, a room of this node or of another
    /// cluster, if it is in.
    pub(crate) fn muc_nick_of(&self, session: &FullJid, room: &BareJid) -> Option<String> {
        if let Some(seat) = lock(&self.muc.mesh.seats)
            .get(session)
            .and_then(|mine| mine.get(room))
        {
            return Some(seat.nick.clone());
        }
        let name = room.node()?;
        if !self.is_muc(&Jid::from(room.clone())) {
            return None;
        }
        lock(&self.muc.rooms)
            .get(name.as_str())
            .and_then(|r| r.nick_of(session))
            .map(str::to_owned)
    }

    /// Whether `session` entered (or is entering) the room `room` of another cluster.
    fn has_seat(&self, session: &FullJid, room: &BareJid) -> bool {
        lock(&self.muc.mesh.seats)
            .get(session)
            .is_some_and(|mine| mine.contains_key(room))
    }

    /// What a room's presence to a local session says of its seat: confirmed (its
    /// own presence, 110), moved (303), gone (unavailable), or refused (an error to
    /// an entry not yet confirmed).
    fn seat_update(&self, session: &FullJid, presence: &Element) {
        let Some(Ok(from)) = presence.attr("from").map(Jid::new) else {
            return;
        };
        let room = from.to_bare();
        let codes = status_codes(presence);
        let own = codes.iter().any(|c| c == "110");
        let mut seats = lock(&self.muc.mesh.seats);
        let Some(mine) = seats.get_mut(session) else {
            return;
        };
        match presence.attr("type") {
            Some("unavailable") if says_out(presence) => {
                let destroyed = presence
                    .get_child("x", muc::NS_USER)
                    .is_some_and(|x| x.has_child("destroy", muc::NS_USER));
                match mine.get_mut(&room) {
                    // The answer to a leave (its only status is 110: a kick or a ban
                    // says more) of a session that entered again since.
                    Some(seat)
                        if seat.leaving > 0 && seat.rejoined && !destroyed && codes == ["110"] =>
                    {
                        seat.leaving -= 1;
                        if seat.leaving == 0 {
                            seat.rejoined = false;
                        }
                    }
                    _ => {
                        mine.remove(&room);
                    }
                }
            }
            Some("error") if mine.get(&room).is_some_and(|s| !s.confirmed) => {
                mine.remove(&room);
            }
            None if own => {
                if let (Some(seat), Some(nick)) = (mine.get_mut(&room), from.resource()) {
                    seat.confirmed = true;
                    seat.nick = nick.to_string();
                }
            }
            _ => {}
        }
        if mine.is_empty() {
            seats.remove(session);
        }
    }

    /// A stanza from a session of another cluster (node `node` of `cluster`, checked
    /// by the link) to a room here: handled as a local session's; answers and errors
    /// go back over the link.
    pub(crate) async fn muc_from_link(
        &self,
        cluster: &str,
        node: &str,
        ty: Type,
        to: &Jid,
        stanza: Element,
    ) {
        let Some(Ok(from)) = stanza.attr("from").map(FullJid::new) else {
            return;
        };
        let room = to.node().map(|n| n.to_string()).unwrap_or_default();
        // Only rooms of this node: a peer whose directory is stale is told so, and no
        // second room of a name homed elsewhere is made here.
        if !matches!(self.muc_place(to).await, Place::Here) {
            if let Some(r) = crate::error::error_reply(
                &stanza,
                crate::error::StanzaErrorCondition::ServiceUnavailable,
                Some("this room does not live on this node"),
            ) {
                self.forward(cluster, node, &r);
            }
            return;
        }
        let reply = |reply: Option<Element>| {
            if let Some(r) = reply {
                self.forward(cluster, node, &r);
            }
        };
        match ty {
            Type::Presence(_) => {
                match stanza.attr("type") {
                    None => {
                        lock(&self.muc.mesh.visitors)
                            .entry(from.clone())
                            .or_insert_with(|| Visitor {
                                cluster: cluster.to_owned(),
                                node: node.to_owned(),
                                rooms: Default::default(),
                            })
                            .rooms
                            .insert(room.clone());
                    }
                    Some("unavailable") => {}
                    // Probes, subscriptions, errors: nothing for a room.
                    Some(_) => return,
                }
                let result = self.muc_presence(&from, &stanza, to);
                if let Err(condition) = result
                    && let Some(mut r) = crate::error::error_reply(&stanza, condition, None)
                {
                    if r.get_child("x", muc::NS).is_none() {
                        r.append_child(Element::bare("x", muc::NS));
                    }
                    reply(Some(r));
                }
                self.settle_visitor(&from, &room);
            }
            Type::Message(_) => {
                if let Err(condition) = self.muc_message(&from, &stanza, to).await {
                    reply(crate::error::error_reply(&stanza, condition, None));
                }
            }
            Type::Iq(IqType::Get | IqType::Set) if super::stored_request(&stanza, to).is_some() => {
                // The store's work happens beside the link, not in its way: at most
                // STORED_REQUESTS at once from all peers, others refused for now.
                let (Some(server), Ok(permit)) = (
                    self.me.upgrade(),
                    self.muc.mesh.stored.clone().try_acquire_owned(),
                ) else {
                    reply(crate::error::error_reply(
                        &stanza,
                        crate::error::StanzaErrorCondition::ResourceConstraint,
                        Some("too many requests to rooms' archives; try again later"),
                    ));
                    return;
                };
                let (cluster, node, to) = (cluster.to_owned(), node.to_owned(), to.clone());
                self.tasks.spawn(async move {
                    let _permit = permit;
                    server
                        .stored_request_from_link(&cluster, &node, &from, &to, &stanza)
                        .await;
                });
            }
            Type::Iq(IqType::Get | IqType::Set) => {
                let answer = match self.muc_iq(&from, &stanza, to) {
                    Ok(payload) => {
                        let xml = format!(
                            "<iq xmlns='jabber:client' type='result' id='{}' from='{}' to='{}'>{}</iq>",
                            crate::xml::escape(stanza.attr("id").unwrap_or_default()),
                            crate::xml::escape(&to.to_string()),
                            crate::xml::escape(&from.to_string()),
                            payload.unwrap_or_default()
                        );
                        stanza::parse_own(&xml)
                    }
                    Err(condition) => crate::error::error_reply(&stanza, condition, None),
                };
                // An answer too big for the link (a list of thousands of members).
                let answer = match answer {
                    Some(a) if !fits_link(&a) => crate::error::error_reply(
                        &stanza,
                        crate::error::StanzaErrorCondition::ResourceConstraint,
                        Some("the answer is too big to cross to your cluster"),
                    ),
                    other => other,
                };
                reply(answer);
            }
            Type::Iq(_) => {}
        }
    }

    /// A request to a room that goes through the store, from a session of another
    /// cluster ([`Server::muc_from_link`]): its results cross the link before the
    /// answer; when one cannot (the link's queue is full), the answer is an error
    /// rather than a page that lacks it.
    async fn stored_request_from_link(
        &self,
        cluster: &str,
        node: &str,
        from: &FullJid,
        to: &Jid,
        stanza: &Element,
    ) {
        let refused =
            |condition, text: Option<&str>| crate::error::error_reply(stanza, condition, text);
        let answer = match self.muc_stored_request(from, to, stanza, true).await {
            Ok((results, answer)) => {
                let crossed = results.iter().all(|xml| {
                    stanza::parse_own(xml)
                        .is_some_and(|m| fits_link(&m) && self.forward(cluster, node, &m))
                });
                if crossed {
                    stanza::parse_own(&format!(
                        "<iq xmlns='jabber:client' type='result' id='{}' from='{}' to='{}'>{}</iq>",
                        crate::xml::escape(stanza.attr("id").unwrap_or_default()),
                        crate::xml::escape(&to.to_string()),
                        crate::xml::escape(&from.to_string()),
                        answer.unwrap_or_default()
                    ))
                } else {
                    refused(
                        crate::error::StanzaErrorCondition::ResourceConstraint,
                        Some("the results could not all cross to your cluster; ask again"),
                    )
                }
            }
            Err(refusal) => refused(refusal.condition, refusal.text.as_deref()),
        };
        if let Some(a) = answer {
            self.forward(cluster, node, &a);
        }
    }

    /// After a visitor's presence to `room`: the room is forgotten for it unless it is
    /// in it (an entry refused, a leave), and the visitor once it is in no room.
    fn settle_visitor(&self, session: &FullJid, room: &str) {
        let inside = lock(&self.muc.rooms)
            .get(room)
            .is_some_and(|r| r.nick_of(session).is_some());
        if !inside {
            forget_room(&mut lock(&self.muc.mesh.visitors), session, room);
        }
    }

    /// The link from `node` went down. Its sessions in rooms here are out: the others
    /// see them go with status 333. Local sessions in rooms on that node are told they
    /// are out, with 333 (their clients enter again when they see fit).
    pub(crate) fn muc_node_lost(&self, node: &str) {
        if self.config.muc.is_none() {
            return;
        }
        let gone: Vec<FullJid> = lock(&self.muc.mesh.visitors)
            .iter()
            .filter(|(_, v)| v.node == node)
            .map(|(s, _)| s.clone())
            .collect();
        if !gone.is_empty() {
            let unavailable = Element::builder("presence", ns::CLIENT)
                .attr(rxml::xml_ncname!("type").to_owned(), "unavailable")
                .build();
            let now = crate::time::now_micros();
            let mut rooms = lock(&self.muc.rooms);
            let mut emptied = vec![];
            for (name, room) in rooms.iter_mut() {
                for session in &gone {
                    if room.nick_of(session).is_none() {
                        continue;
                    }
                    // The session itself is told too: the link it came over is
                    // only one direction of two, the other may still carry it.
                    let out: Vec<muc::Out> = room
                        .leave(session, &unavailable, now)
                        .into_iter()
                        .map(|mut o| {
                            with_status(&mut o.stanza, 333);
                            o
                        })
                        .collect();
                    self.muc_send(out);
                }
                if room.is_empty() && !room.config.persistent {
                    emptied.push(name.clone());
                }
            }
            for name in emptied {
                rooms.remove(&name);
                self.muc.changed.notify_one();
            }
            drop(rooms);
            let mut visitors = lock(&self.muc.mesh.visitors);
            for s in &gone {
                visitors.remove(s);
            }
            tracing::info!(%node, sessions = gone.len(), "router link lost; its sessions left the rooms here");
        }
        let cut: Vec<(FullJid, BareJid, Seat)> = {
            let mut seats = lock(&self.muc.mesh.seats);
            let mut cut = vec![];
            seats.retain(|session, mine| {
                mine.retain(|room, seat| {
                    if seat.node == node {
                        cut.push((session.clone(), room.clone(), seat.clone()));
                        false
                    } else {
                        true
                    }
                });
                !mine.is_empty()
            });
            cut
        };
        for (session, room, seat) in &cut {
            // The room learns it too, over the other direction if it still works:
            // no occupant stays there that its client thinks gone.
            let leave = format!(
                "<presence xmlns='jabber:client' type='unavailable' from='{}' to='{}/{}'/>",
                crate::xml::escape(&session.to_string()),
                crate::xml::escape(&room.to_string()),
                crate::xml::escape(&seat.nick)
            );
            if let Some(p) = stanza::parse_own(&leave) {
                self.forward(&seat.cluster, &seat.node, &p);
            }
            let nick = &seat.nick;
            let xml = format!(
                "<presence xmlns='jabber:client' type='unavailable' from='{}/{}' to='{}'>\
                 <x xmlns='{}'><item affiliation='none' role='none'/>\
                 <status code='110'/><status code='333'/></x></presence>",
                crate::xml::escape(&room.to_string()),
                crate::xml::escape(nick),
                crate::xml::escape(&session.to_string()),
                muc::NS_USER
            );
            if let Some(p) = stanza::parse_own(&xml) {
                self.send_to_jid(&p);
            }
        }
        if !cut.is_empty() {
            tracing::info!(%node, seats = cut.len(), "router link lost; sessions here told they are out of its rooms");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(to: &str, body: &str) -> muc::Out {
        let to = FullJid::new(to).unwrap();
        let stanza = stanza::parse_own(&format!(
            "<message xmlns='jabber:client' type='groupchat' from='r@conference.d/n' to='{to}'><body>{body}</body></message>"
        ))
        .unwrap();
        muc::Out { to, stanza }
    }

    /// The same stanza for several sessions of a node goes once, naming them; other
    /// nodes and other stanzas go apart, in order.
    #[test]
    fn a_broadcast_goes_once_per_node_naming_the_recipients() {
        let at = |node: &str, o| ("c".to_owned(), node.to_owned(), o);
        let sent = fan_out(vec![
            at("n1", out("a@d/1", "hi")),
            at("n2", out("b@d/1", "hi")),
            at("n1", out("c@d/1", "hi")),
            at("n1", out("c@d/2", "other")),
        ]);
        assert_eq!(sent.len(), 3);
        let (_, node, mut first) = sent[0].clone();
        assert_eq!(node, "n1");
        let to = take_addresses(&mut first).unwrap();
        assert_eq!(
            to.iter().map(|j| j.to_string()).collect::<Vec<_>>(),
            ["a@d/1", "c@d/1"]
        );
        assert!(first.get_child("addresses", NS_ADDRESS).is_none());
        // One recipient: a plain stanza.
        let (_, node, mut second) = sent[1].clone();
        assert_eq!(node, "n2");
        assert!(take_addresses(&mut second).is_none());
        assert_eq!(second.attr("to"), Some("b@d/1"));
    }

    /// A session's stanzas keep their order: a recipient does not join a group that
    /// comes before one of its earlier stanzas.
    #[test]
    fn fanning_out_keeps_each_sessions_order() {
        let at = |o| ("c".to_owned(), "n1".to_owned(), o);
        let sent = fan_out(vec![
            at(out("y@d/1", "second")),
            at(out("x@d/1", "first")),
            at(out("x@d/1", "second")),
        ]);
        let seen: Vec<(Option<&str>, String)> = sent
            .iter()
            .map(|(_, _, s)| {
                let body = s.get_child("body", "jabber:client").unwrap().text();
                (s.attr("to"), body)
            })
            .collect();
        assert_eq!(
            seen,
            [
                (Some("y@d/1"), "second".to_owned()),
                (Some("x@d/1"), "first".to_owned()),
                (Some("x@d/1"), "second".to_owned()),
            ],
            "x's second may not go before its first"
        );
    }

    /// A peer's address list is bounded and keeps full JIDs only.
    #[test]
    fn a_peers_address_list_is_bounded() {
        let mut addresses = String::new();
        for i in 0..MAX_ADDRESSES + 5 {
            addresses.push_str(&format!("<address type='bcc' jid='u{i}@d/r'/>"));
        }
        addresses.push_str("<address type='bcc' jid='bare@d'/>");
        let mut m = stanza::parse_own(&format!(
            "<message xmlns='jabber:client' to='a@d/r'><addresses xmlns='{NS_ADDRESS}'>{addresses}</addresses></message>"
        ))
        .unwrap();
        assert_eq!(take_addresses(&mut m).unwrap().len(), MAX_ADDRESSES);
    }
}
