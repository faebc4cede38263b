//! The multi-user chat service (XEP-0045) at `[muc] host`, for the users of this
//! node: rooms live in memory, created by the first presence to them and gone when
//! the last occupant leaves, unless configured persistent: those are kept in the
//! store and restored at start. Room logic lives in `core::muc`; this routes the
//! users' stanzas to it and its answers to their sessions, and keeps the room
//! directory (`impmesh_store::RoomHome`) in step with the rooms here. Rooms of other
//! clusters are reached over the router links (`mesh`).
//!
//! Not here yet (issue 16): rooms served by several nodes of one cluster.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use impmesh_store::StoredRoom;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use crate::Server;
use crate::context::Context;
use crate::core::archive;
use crate::core::muc::{self, Join, Room};
use crate::core::pubsub::Refusal;
use crate::error::StanzaErrorCondition;
use crate::hub::lock;
use crate::stanza;
use crate::stats::MucLimit;
use crate::xml::{escape, ns};

mod mesh;
use mesh::Place;

/// What became of a session's stanza to a room, as far as the mesh goes.
enum Routed {
    /// The room is here (or is made here).
    Here,
    /// Sent over the link to the room's node.
    Sent,
    /// The room cannot be reached: why.
    Refused(String),
}

/// The service's settings (`[muc]`).
#[derive(Debug, Clone)]
pub struct MucSettings {
    /// The service's domain, e.g. `conference.example.com`.
    pub host: String,
    /// Rooms at most on this node.
    pub max_rooms: usize,
    /// Rooms one account may have created and own at once.
    pub max_rooms_per_user: usize,
    /// Occupants of a room at most (its owners and admins may enter beyond).
    pub max_occupants: usize,
    /// Messages a room keeps for those who enter later.
    pub history_length: usize,
    /// Bytes of a message to a room or an occupant, at most.
    pub max_message_bytes: usize,
    /// How often an occupant may speak and change its presence.
    pub rates: muc::Rates,
}

impl MucSettings {
    /// What the service allows any room.
    fn limits(&self, archive: bool) -> muc::Limits {
        muc::Limits {
            max_users: self.max_occupants,
            history_length: self.history_length,
            archive,
        }
    }

    pub fn new(domain: &str) -> MucSettings {
        MucSettings {
            host: format!("conference.{domain}"),
            max_rooms: 10_000,
            max_rooms_per_user: 50,
            max_occupants: 200,
            history_length: 20,
            max_message_bytes: 65_536,
            rates: muc::Rates::default(),
        }
    }
}

/// A room as an admin sees it (`impmesh room list|show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    pub jid: String,
    pub config: muc::Config,
    /// Locked: created, waiting for its owner's configuration.
    pub locked: bool,
    pub subject: Option<String>,
    /// Nick, bare JID, role, affiliation and sessions of each occupant, by nick.
    pub occupants: Vec<(String, String, muc::Role, muc::Affiliation, usize)>,
    /// Accounts with an affiliation, by JID.
    pub affiliations: Vec<(String, muc::Affiliation)>,
}

impl RoomInfo {
    fn of(room: &Room) -> RoomInfo {
        let mut affiliations: Vec<(String, muc::Affiliation)> = room
            .affiliations()
            .map(|(j, a)| (j.to_string(), a))
            .collect();
        affiliations.sort();
        RoomInfo {
            jid: room.jid().to_string(),
            config: room.config.clone(),
            locked: room.locked(),
            subject: room.subject().map(|(text, _)| text.clone()),
            occupants: room
                .occupants()
                .map(|o| {
                    (
                        o.nick.clone(),
                        o.bare.to_string(),
                        o.role,
                        o.affiliation,
                        o.sessions.len(),
                    )
                })
                .collect(),
            affiliations,
        }
    }
}

/// Why an admin's request about rooms cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomAdminError {
    #[error("the chat service is off on this node ([muc] enabled = false)")]
    Off,
    #[error("no room {0} on this node")]
    NoSuchRoom(String),
    #[error("{0:?} is not a room's address (room@{1})")]
    BadVenue(String, String),
}

/// The rooms of this node.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    rooms: Mutex<HashMap<String, Room>>,
    /// A room was created or went: the room directory is brought in step.
    changed: tokio::sync::Notify,
    /// Occupants homed on other clusters, and this node's sessions in rooms of
    /// other clusters.
    mesh: mesh::Mesh,
    /// The cluster's secret for occupant ids (XEP-0421), from the store at start
    /// (a random one for a server that never restores rooms, as in unit tests).
    occupant_secret: std::sync::OnceLock<[u8; 32]>,
    /// The version of the last write of a room to the store (microseconds, made to
    /// grow): the store keeps the newest whatever order writes land in.
    version: AtomicI64,
    /// Rooms with a change of status waiting for its occupant's allowance, and a
    /// wake-up for the task that sends them ([`Server::send_waiting_presence`]).
    waiting: Mutex<std::collections::HashSet<String>>,
    waited: tokio::sync::Notify,
}

impl Rooms {
    /// The secret a room derives its occupant ids with: the cluster's, keyed by the
    /// room's address, so that ids differ from room to room and survive restarts.
    fn occupant_key(&self, room: &BareJid) -> [u8; 32] {
        use hmac::{KeyInit as _, Mac as _};
        let secret = self.occupant_secret.get_or_init(rand::random);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(room.as_str().as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn next_version(&self) -> i64 {
        let now = crate::time::now_micros();
        let prev = self
            .version
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(now.max(v.saturating_add(1)))
            })
            .unwrap_or(now);
        now.max(prev.saturating_add(1))
    }
}

/// A room as the store keeps it.
fn stored(name: &str, version: i64, room: &Room) -> StoredRoom {
    let c = &room.config;
    let (subject, subject_by) = match room.subject() {
        Some((text, nick)) => (Some(text.clone()), nick.clone()),
        None => (None, String::new()),
    };
    // "affiliation" or "affiliation nick" for an account that reserved one.
    let mut affiliations: Vec<(String, String)> = room
        .affiliations()
        .map(|(j, a)| {
            let standing = match room.reserved_nick(j) {
                Some(nick) => format!("{} {nick}", a.as_str()),
                None => a.as_str().to_owned(),
            };
            (j.to_string(), standing)
        })
        .collect();
    affiliations.sort();
    StoredRoom {
        name: name.to_owned(),
        version,
        title: c.name.clone(),
        description: c.description.clone(),
        public: c.public,
        members_only: c.members_only,
        moderated: c.moderated,
        password: c.password.clone(),
        max_users: u32::try_from(c.max_users).unwrap_or(u32::MAX),
        whois_anyone: c.whois_anyone,
        history_length: u32::try_from(c.history_length).unwrap_or(u32::MAX),
        private_messages: c.private_messages.as_str().to_owned(),
        subject_by_anyone: c.subject_by_anyone,
        subject,
        subject_by,
        affiliations,
        archived: c.archived,
        vcard: room.stored_vcard().map(str::to_owned),
    }
}

/// A stored room as it is restored, within the service's limits as they are now.
fn restored(settings: &MucSettings, s: StoredRoom) -> Option<Room> {
    let jid = BareJid::new(&format!("{}@{}", s.name, settings.host)).ok()?;
    let config = muc::Config {
        name: s.title,
        description: s.description,
        persistent: true,
        public: s.public,
        members_only: s.members_only,
        moderated: s.moderated,
        password: s.password,
        max_users: usize::try_from(s.max_users)
            .unwrap_or(usize::MAX)
            .min(settings.max_occupants)
            .max(1),
        whois_anyone: s.whois_anyone,
        history_length: usize::try_from(s.history_length)
            .unwrap_or(usize::MAX)
            .min(settings.history_length),
        // A value this release does not know: the default.
        private_messages: muc::PrivateMessages::parse(&s.private_messages)
            .unwrap_or(muc::PrivateMessages::Anyone),
        subject_by_anyone: s.subject_by_anyone,
        archived: s.archived,
    };
    let mut reserved = Vec::new();
    let mut affiliations = Vec::new();
    for (j, standing) in &s.affiliations {
        let (a, nick) = match standing.split_once(' ') {
            Some((a, nick)) => (a, Some(nick)),
            None => (standing.as_str(), None),
        };
        let (Ok(account), Some(a)) = (BareJid::new(j), muc::parse_affiliation(a)) else {
            continue;
        };
        if let Some(nick) = nick {
            reserved.push((account.clone(), nick.to_owned()));
        }
        affiliations.push((account, a));
    }
    let subject = s.subject.map(|text| (text, s.subject_by));
    let mut room = Room::restore(jid, config, affiliations, subject);
    room.restore_vcard(s.vcard);
    for (account, nick) in reserved {
        room.reserve_nick(account, nick);
    }
    Some(room)
}

/// The payload of an IQ to a room that the room answers after the store does: a
/// request to its archive (XEP-0313) or a moderation (XEP-0425), if it is one.
pub(crate) fn stored_request<'a>(iq: &'a Element, to: &Jid) -> Option<&'a Element> {
    let payload = iq.children().next()?;
    let wanted = (payload.ns() == ns::MAM && matches!(payload.name(), "query" | "metadata"))
        || payload.is("moderate", muc::NS_MODERATE);
    (to.node().is_some() && to.resource().is_none() && wanted).then_some(payload)
}

/// XEP-0410: the room answers a client's ping of its own occupant JID itself.
const SELF_PING: &str = "http://jabber.org/protocol/muc#self-ping-optimization";
/// The name of the cluster secret occupant ids are derived from.
const OCCUPANT_ID_SECRET: &str = "muc-occupant-id";

/// Features of the service itself.
const SERVICE_FEATURES: &[&str] = &[muc::NS, ns::DISCO_INFO, ns::DISCO_ITEMS];

impl Server {
    /// Restores the persistent rooms from the store (at start, before clients come)
    /// and starts keeping the room directory in step with the rooms of this node;
    /// returns how many rooms were restored.
    pub async fn restore_rooms(&self) -> Result<usize, impmesh_store::StoreError> {
        let Some(settings) = &self.config.muc else {
            // The service is off here: rooms this node once served are no one's.
            for room in self.store.node_rooms(&self.config.node_name).await? {
                self.store
                    .release_room(&room.name, &self.config.node_name)
                    .await?;
            }
            return Ok(0);
        };
        let secret = self
            .store
            .cluster_secret(OCCUPANT_ID_SECRET, || rand::random::<[u8; 32]>().to_vec())
            .await?;
        if let Ok(secret) = <[u8; 32]>::try_from(secret.as_slice()) {
            let _ = self.muc.occupant_secret.set(secret);
        }
        let stored = self.store.rooms(crate::time::now_micros()).await?;
        // Later writes must be newer than any stored, tombstones too (a clock set
        // back would otherwise lose a room made again under a destroyed one's name).
        let newest = self.store.newest_room_version().await?;
        self.muc.version.fetch_max(newest, Ordering::AcqRel);
        let mut rooms = lock(&self.muc.rooms);
        for s in stored {
            let name = s.name.clone();
            match restored(settings, s) {
                Some(mut room) => {
                    room.set_occupant_key(self.muc.occupant_key(room.jid()));
                    room.set_rates(settings.rates);
                    rooms.insert(name, room);
                }
                None => {
                    tracing::warn!(room = %name, "a stored room's name is not a JID; not restored")
                }
            }
        }
        let restored = rooms.len();
        drop(rooms);
        if let Some(server) = self.me.upgrade() {
            self.tasks.spawn(server.clone().keep_room_directory());
            self.tasks.spawn(server.send_waiting_presence());
        }
        Ok(restored)
    }

    /// Sends each change of status that waited for its occupant's allowance
    /// ([`Room::update`]) once the allowance returns, until shutdown.
    async fn send_waiting_presence(self: std::sync::Arc<Self>) {
        loop {
            let next = self.send_due_presence(crate::time::now_micros());
            let wait = match next {
                Some(at) => {
                    let micros = at.saturating_sub(crate::time::now_micros()).max(1);
                    std::time::Duration::from_micros(u64::try_from(micros).unwrap_or(1))
                }
                // Nothing waits: until a room says something does.
                None => std::time::Duration::from_secs(86_400),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.muc.waited.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass of [`Self::send_waiting_presence`] at `now`: sends what is due, and
    /// returns when the next waiting change is.
    fn send_due_presence(&self, now: i64) -> Option<i64> {
        let mut rooms = lock(&self.muc.rooms);
        let mut waiting = lock(&self.muc.waiting);
        let mut next: Option<i64> = None;
        waiting.retain(|name| {
            let Some(room) = rooms.get_mut(name) else {
                return false;
            };
            let out = room.due(now);
            self.muc_send(out);
            match room.next_due() {
                Some(at) => {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    true
                }
                None => false,
            }
        });
        next
    }

    /// Keeps the room directory in step with the rooms of this node, and this node's
    /// rooms with the directory: after each creation or end of a room, and when the
    /// directory changed (a peer's rooms synced), until shutdown.
    async fn keep_room_directory(self: std::sync::Arc<Self>) {
        let mut seen = None;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.muc.changed.notified() => {}
                _ = tick.tick() => {
                    let now = self.store.room_generation();
                    if seen == Some(now) {
                        continue;
                    }
                }
            }
            seen = Some(self.store.room_generation());
            if let Err(e) = self.sync_room_directory().await {
                tracing::error!(error = %e, "cannot bring the room directory in step; trying again");
                seen = None;
            }
        }
    }

    /// One pass of [`Self::keep_room_directory`]: claims the rooms of this node the
    /// directory lacks, withdraws those it lists that are gone, and closes the rooms
    /// that lost their name to an older room of a peer (docs/muc.md): their
    /// occupants are told to go to the winner, which has the same address.
    async fn sync_room_directory(&self) -> Result<(), impmesh_store::StoreError> {
        use impmesh_store::RoomHome;
        let (cluster, node) = (&self.config.cluster_name, &self.config.node_name);
        let here: std::collections::HashSet<String> =
            lock(&self.muc.rooms).keys().cloned().collect();
        let listed = self.store.node_rooms(node).await?;
        for name in &here {
            if listed.iter().any(|r| &r.name == name) {
                continue;
            }
            let now = crate::time::now_micros();
            match self.store.claim_room(name, cluster, node, now).await? {
                RoomHome::Local { node: n } if n == *node => {}
                // Another node of the cluster serves it (a persistent room both
                // restored from the shared store): it stays in the store, for that
                // node.
                RoomHome::Local { node: n } => self.muc_lose(name, &format!("node {n}"), false),
                RoomHome::Remote { cluster: c, .. } => {
                    self.muc_lose(name, &format!("cluster {c}"), true)
                }
                RoomHome::Unknown => {}
            }
        }
        for r in &listed {
            if !lock(&self.muc.rooms).contains_key(&r.name) {
                self.store.release_room(&r.name, node).await?;
            }
        }
        for lost in self.store.lost_rooms().await? {
            if lost.node == *node {
                self.muc_lose(&lost.name, &format!("cluster {}", lost.winner), true);
                self.store.release_room(&lost.name, node).await?;
            }
        }
        Ok(())
    }

    /// Closes a room of this node whose name an older room elsewhere holds: its
    /// occupants get the room's destruction, naming the same address (the winner's
    /// room) as the place to go. With `forget`, a persistent room leaves the store.
    fn muc_lose(&self, name: &str, winner: &str, forget: bool) {
        let mut rooms = lock(&self.muc.rooms);
        let Some(mut room) = rooms.remove(name) else {
            return;
        };
        tracing::warn!(room = %name, %winner, "an older room of the same name lives elsewhere; this one is closed");
        let venue = room.jid().clone();
        let reason = format!("an older room of this name lives on {winner}; please go there");
        let stored = room.config.persistent;
        let out = room.destroy(Some(&venue), Some(&reason));
        if stored && forget {
            self.muc_persist(name, None);
        }
        self.muc_send(out);
    }

    /// Sends a session's stanza on when its room lives on a node of another cluster.
    async fn muc_route(&self, from: &FullJid, stanza: &Element, to: &Jid) -> Routed {
        match self.muc_place(to).await {
            Place::Here => Routed::Here,
            Place::Peer { cluster, node } => {
                let mut stanza = stanza.clone();
                stanza::set_attr(&mut stanza, "from", &from.to_string());
                self.muc_to_peer(&cluster, &node, from, &stanza);
                Routed::Sent
            }
            Place::Refused(text) => Routed::Refused(text),
        }
    }

    /// Writes a room's change to the store in the background: the room as it is when
    /// it is persistent and open, else its removal (destroyed, or made temporary).
    /// Called under the rooms' lock, for rooms that are or were persistent; versions
    /// keep the last change the one kept.
    fn muc_persist(&self, name: &str, room: Option<&Room>) {
        let version = self.muc.next_version();
        let store = self.store.clone();
        // The room ended, or its owners turned its archive off (not the node's
        // setting: turning archives off for a while deletes nothing).
        if !room.is_some_and(|r| r.config.persistent && r.config.archived) {
            self.muc_forget_archive(name);
        }
        match room.filter(|r| r.config.persistent && !r.locked()) {
            Some(room) => {
                let row = stored(name, version, room);
                self.tasks.spawn(async move {
                    if let Err(e) = store.save_room(&row).await {
                        tracing::error!(room = %row.name, error = %e, "storing a room failed; its last change is lost at restart");
                    }
                });
            }
            None => {
                let name = name.to_owned();
                self.tasks.spawn(async move {
                    if let Err(e) = store.forget_room(&name, version).await {
                        tracing::error!(room = %name, error = %e, "forgetting a stored room failed");
                    }
                });
            }
        }
    }

    /// Whether `room`'s messages are archived: it is persistent, its owners did not
    /// turn archiving off, and this node keeps archives.
    fn muc_archives(&self, room: &Room) -> bool {
        self.config.archive.enabled && room.config.persistent && room.config.archived
    }

    /// Deletes the archive of the room `name` (it ended, or is no longer archived)
    /// in the background: what is archived up to now, once the writer stored it.
    fn muc_forget_archive(&self, name: &str) {
        let (Some(settings), Some(server)) = (&self.config.muc, self.me.upgrade()) else {
            return;
        };
        // Also with archives off now: what was archived before must not pass to a
        // room made again under the name.
        let writing = self.config.archive.enabled;
        let owner = format!("{name}@{}", settings.host);
        let before = crate::time::now_micros().saturating_add(1);
        self.tasks.spawn(async move {
            if writing {
                server.archive_flush().await;
            }
            if let Err(e) = server.store.archive_forget(&owner, before).await {
                tracing::error!(room = %owner, error = %e, "deleting a room's archive failed");
            }
        });
    }

    /// The row that archives a room's message (as `out`'s first copy shows it) under
    /// the id it was stamped with, when the room is archived. The caller queues it
    /// for the writer once the rooms' lock is released, waiting while the writer's
    /// queue is full (the store sets the pace).
    fn muc_archive(
        &self,
        room: &Room,
        nick: &str,
        id: String,
        out: &[muc::Out],
        now: i64,
    ) -> Option<impmesh_store::ArchiveRow> {
        let first = out.first()?;
        if !self.muc_archives(room) || !archive::archivable_in_room(&first.stanza) {
            return None;
        }
        let mut kept = first.stanza.clone();
        stanza::remove_attr(&mut kept, "to");
        archive::strip_stanza_ids(&mut kept, room.jid().as_str());
        let row = impmesh_store::ArchiveRow {
            owner: room.jid().to_string(),
            id,
            peer: room.jid().to_string(),
            resource: nick.to_owned(),
            ts: now,
            outgoing: false,
            stanza: stanza::serialize(&kept).into(),
        };
        Some(row)
    }

    /// A request to a room that goes through the store ([`stored_request`]): the
    /// messages for `from` that come before the answer, and the answer's payload.
    pub(crate) async fn muc_stored_request(
        &self,
        from: &FullJid,
        to: &Jid,
        iq: &Element,
        remote: bool,
    ) -> Result<(Vec<String>, Option<String>), Refusal> {
        let Some(payload) = iq.children().next() else {
            return Err(StanzaErrorCondition::BadRequest.into());
        };
        let set = iq.attr("type") == Some("set");
        if payload.ns() == ns::MAM {
            return self.muc_mam(from, to, payload, set, remote).await;
        }
        if !set {
            return Err(StanzaErrorCondition::BadRequest.into());
        }
        self.muc_moderate(from, to, payload).await?;
        Ok((Vec::new(), None))
    }

    /// A moderator retracts a message (XEP-0425): the room tells every occupant,
    /// forgets the message from its history, and puts a tombstone in its place in the
    /// archive. A message neither remembers is `item-not-found`.
    async fn muc_moderate(
        &self,
        from: &FullJid,
        to: &Jid,
        payload: &Element,
    ) -> Result<(), Refusal> {
        let request = muc::Moderation::parse(payload)?;
        let name = to.node().map(|n| n.to_string()).unwrap_or_default();
        // Who may is checked first; what the archive keeps as the moderation (the
        // tombstone) does not depend on the announcement's id.
        let (preview, archived, remembered) = {
            let rooms = lock(&self.muc.rooms);
            let Some(room) = rooms.get(&name) else {
                return Err(StanzaErrorCondition::ItemNotFound.into());
            };
            let preview = room.moderation(from, &request)?;
            (
                preview,
                self.muc_archives(room),
                room.remembers(&request.id),
            )
        };
        let mut found = remembered;
        if archived {
            self.archive_flush().await;
            let stamp = archive::datetime(crate::time::now_micros());
            let replaced = self
                .store
                .archive_replace(&to.to_bare().to_string(), &request.id, |old| {
                    let original = stanza::parse_own(old)
                        .unwrap_or_else(|| Element::bare("message", ns::CLIENT));
                    stanza::serialize(&muc::tombstone(&original, &preview, &stamp))
                })
                .await
                .map_err(crate::pep::store_failed)?;
            found |= replaced.is_some();
        }
        if !found {
            return Err(Refusal::from(StanzaErrorCondition::ItemNotFound)
                .with_text("the room has no message with that id"));
        }
        tracing::info!(room = %to, moderator = %from, id = %request.id, "a message was retracted by a moderator");
        // The announcement's id is made now, after the store's work: it sorts after
        // every message archived before it. The moderator's standing was checked
        // before anything changed: it is not checked again once the archive did.
        let row = {
            let mut rooms = lock(&self.muc.rooms);
            let Some(room) = rooms.get_mut(&name) else {
                return Ok(());
            };
            let id = crate::mam::archive_id();
            let announcement = muc::announced(&preview, &id, room.jid().as_str());
            room.forget_message(&request.id);
            let out = room.broadcast(&announcement);
            let row = self.muc_archive(room, "", id, &out, crate::time::now_micros());
            self.muc_send(out);
            row
        };
        if let Some(row) = row {
            self.enqueue(row).await;
        }
        Ok(())
    }

    /// A request to a room's archive (XEP-0313 on its address) from `from`: the
    /// result messages, from the room, and the answer's payload. A session of
    /// another cluster (`remote`) reads it from inside the room: its node takes the
    /// room's messages only for sessions in it.
    async fn muc_mam(
        &self,
        from: &FullJid,
        to: &Jid,
        payload: &Element,
        set: bool,
        remote: bool,
    ) -> Result<(Vec<String>, Option<String>), Refusal> {
        let owner = to.to_bare().to_string();
        {
            let rooms = lock(&self.muc.rooms);
            let Some(room) = to.node().and_then(|n| rooms.get(n.as_str())) else {
                return Err(StanzaErrorCondition::ItemNotFound.into());
            };
            if !self.muc_archives(room) {
                return Err(Refusal::from(StanzaErrorCondition::FeatureNotImplemented)
                    .with_text("this room keeps no archive"));
            }
            if remote && room.nick_of(from).is_none() {
                return Err(Refusal::from(StanzaErrorCondition::Forbidden)
                    .with_text("enter the room to read its archive from another cluster"));
            }
            if !room.may_read_archive(from) {
                return Err(StanzaErrorCondition::Forbidden.into());
            }
        }
        match (payload.name(), set) {
            ("query", false) => Ok((Vec::new(), Some(archive::query_form()))),
            ("query", true) => {
                let to = from.to_string();
                let (results, fin) = self
                    .archive_results(&owner, &to, Some(&owner), payload)
                    .await?;
                Ok((results, Some(fin)))
            }
            ("metadata", false) => {
                self.archive_flush().await;
                let metadata = self
                    .archive_metadata(&owner)
                    .await
                    .map_err(crate::pep::store_failed)?;
                Ok((Vec::new(), Some(metadata)))
            }
            _ => Err(StanzaErrorCondition::BadRequest.into()),
        }
    }

    /// The local part of a room named by it or by its address on this service.
    fn room_name<'a>(settings: &MucSettings, name: &'a str) -> &'a str {
        name.strip_suffix(settings.host.as_str())
            .and_then(|n| n.strip_suffix('@'))
            .unwrap_or(name)
    }

    /// Every room of this node, by name, for admins.
    pub fn muc_room_list(&self) -> Result<Vec<RoomInfo>, RoomAdminError> {
        if self.config.muc.is_none() {
            return Err(RoomAdminError::Off);
        }
        let rooms = lock(&self.muc.rooms);
        let mut list: Vec<(&String, &Room)> = rooms.iter().collect();
        list.sort_by(|a, b| a.0.cmp(b.0));
        Ok(list.into_iter().map(|(_, r)| RoomInfo::of(r)).collect())
    }

    /// One room (by name or address), for admins.
    pub fn muc_room_show(&self, name: &str) -> Result<RoomInfo, RoomAdminError> {
        let Some(settings) = &self.config.muc else {
            return Err(RoomAdminError::Off);
        };
        let rooms = lock(&self.muc.rooms);
        rooms
            .get(Self::room_name(settings, name))
            .map(RoomInfo::of)
            .ok_or_else(|| RoomAdminError::NoSuchRoom(name.to_owned()))
    }

    /// Destroys a room for an admin, as its owner would (XEP-0045 §10.9): every
    /// occupant learns of it, with the room to go to instead and why; the store
    /// forgets it. Returns how many sessions were told.
    pub fn muc_room_destroy(
        &self,
        name: &str,
        venue: Option<&str>,
        reason: Option<&str>,
    ) -> Result<usize, RoomAdminError> {
        let Some(settings) = &self.config.muc else {
            return Err(RoomAdminError::Off);
        };
        let venue = venue
            .map(|v| {
                BareJid::new(v)
                    .ok()
                    .filter(|j| j.node().is_some())
                    .ok_or_else(|| RoomAdminError::BadVenue(v.to_owned(), settings.host.clone()))
            })
            .transpose()?;
        let name = Self::room_name(settings, name);
        let mut rooms = lock(&self.muc.rooms);
        let Some(mut room) = rooms.remove(name) else {
            return Err(RoomAdminError::NoSuchRoom(name.to_owned()));
        };
        self.muc.changed.notify_one();
        let stored = room.config.persistent;
        let out = room.destroy(venue.as_ref(), reason);
        let told = out.len();
        if stored {
            self.muc_persist(name, None);
        }
        self.muc_send(out);
        Ok(told)
    }

    /// Whether `jid` is this node's multi-user chat service or one of its rooms.
    pub(crate) fn is_muc(&self, jid: &Jid) -> bool {
        self.config
            .muc
            .as_ref()
            .is_some_and(|m| jid.domain().as_str() == m.host)
    }

    /// Sends what a room decided to the local sessions it names. Called with the
    /// rooms locked, so each room's stanzas leave in the order it decided them
    /// (sending only queues; nothing sent comes back to a room).
    fn muc_send(&self, out: Vec<muc::Out>) {
        let mut remote = vec![];
        {
            let mut visitors = lock(&self.muc.mesh.visitors);
            for o in out {
                let Some(v) = visitors.get(&o.to) else {
                    self.send_to_jid_as(&o.stanza, true);
                    continue;
                };
                let (cluster, node) = (v.cluster.clone(), v.node.clone());
                // Out of the room (left, kicked, banned, the room gone): forgotten.
                if mesh::says_out(&o.stanza)
                    && let Some(room) = mesh::room_of(&o.stanza)
                {
                    mesh::forget_room(&mut visitors, &o.to, &room);
                }
                remote.push((cluster, node, o));
            }
        }
        // Sessions of other clusters: each distinct stanza once per node, in order.
        for (cluster, node, stanza) in mesh::fan_out(remote) {
            self.forward(&cluster, &node, &stanza);
        }
    }

    /// A session's presence to a room: enter, change, or leave. A session that ends
    /// leaves through the unavailable presence its directed presence gets.
    pub(crate) fn muc_presence(
        &self,
        from: &FullJid,
        presence: &Element,
        to: &Jid,
    ) -> Result<(), StanzaErrorCondition> {
        let Some(settings) = &self.config.muc else {
            return Err(StanzaErrorCondition::ServiceUnavailable);
        };
        let (Some(room_name), Some(nick)) = (to.node(), to.resource()) else {
            // XEP-0045 §7.2.1: entering needs a nick.
            return Err(StanzaErrorCondition::JidMalformed);
        };
        if mesh::elements(presence) > mesh::MAX_ROOM_STANZA_ELEMENTS {
            return Err(StanzaErrorCondition::ResourceConstraint);
        }
        let room_name = room_name.as_str().to_owned();
        let nick = nick.as_str();
        let unavailable = presence.attr("type") == Some("unavailable");
        let now = crate::time::now_micros();
        let mut rooms = lock(&self.muc.rooms);
        if unavailable {
            let Some(room) = rooms.get_mut(&room_name) else {
                return Ok(());
            };
            let out = room.leave(from, presence, now);
            if room.is_empty() && !room.config.persistent {
                rooms.remove(&room_name);
                self.muc.changed.notify_one();
            }
            self.muc_send(out);
            return Ok(());
        }
        if !rooms.contains_key(&room_name) {
            let creator = from.to_bare();
            if rooms.len() >= settings.max_rooms {
                self.stats.muc_refused(MucLimit::Rooms);
                return Err(StanzaErrorCondition::ResourceConstraint);
            }
            let owned = rooms
                .values()
                .filter(|r| r.affiliation(&creator) == muc::Affiliation::Owner)
                .count();
            if owned >= settings.max_rooms_per_user {
                self.stats.muc_refused(MucLimit::RoomsPerUser);
                return Err(StanzaErrorCondition::NotAllowed);
            }
            let config = muc::Config {
                max_users: settings.max_occupants,
                history_length: settings.history_length,
                ..muc::Config::default()
            };
            let jid = to.to_bare();
            let mut room = Room::create(jid, &creator, config);
            room.set_occupant_key(self.muc.occupant_key(room.jid()));
            room.set_rates(settings.rates);
            rooms.insert(room_name.clone(), room);
            self.muc.changed.notify_one();
        }
        let Some(room) = rooms.get_mut(&room_name) else {
            return Err(StanzaErrorCondition::ItemNotFound);
        };
        // A session already in the room under this nick that sends the MUC element
        // again enters again (a client that lost track of the room): it gets the
        // occupants, history and subject anew. Otherwise a change of status or nick.
        let rejoin = room.nick_of(from) == Some(nick) && presence.get_child("x", muc::NS).is_some();
        let result = if room.nick_of(from).is_some() && !rejoin {
            room.update(from, nick, presence, now)
        } else {
            room.join(from, nick, &Join::parse(presence), presence, now)
                .inspect_err(|e| {
                    if *e == StanzaErrorCondition::ServiceUnavailable {
                        self.stats.muc_refused(MucLimit::Occupants);
                    }
                })
        };
        if result == Err(StanzaErrorCondition::ResourceConstraint) {
            self.stats.muc_refused(MucLimit::PresenceRate);
        }
        if room.next_due().is_some() {
            lock(&self.muc.waiting).insert(room_name.clone());
            // Also for a room already waiting: this change may be due earlier.
            self.muc.waited.notify_one();
        }
        // A room created for an entry that failed is not kept.
        if result.is_err() && room.is_empty() && !room.config.persistent {
            rooms.remove(&room_name);
        }
        self.muc_send(result?);
        Ok(())
    }

    /// A session that ends leaves the rooms among its directed-presence targets.
    pub(crate) fn muc_leave_all(&self, session: &FullJid, targets: impl IntoIterator<Item = Jid>) {
        let unavailable = Element::builder("presence", ns::CLIENT)
            .attr(rxml::xml_ncname!("type").to_owned(), "unavailable")
            .build();
        for target in targets {
            if self.is_muc(&target) && !self.muc_leave_peer(session, &target, false) {
                let _ = self.muc_presence(session, &unavailable, &target);
            }
        }
    }

    /// A session's message to a room (`groupchat`) or to an occupant (private), and
    /// then the room's archive.
    pub(crate) async fn muc_message(
        &self,
        from: &FullJid,
        message: &Element,
        to: &Jid,
    ) -> Result<(), StanzaErrorCondition> {
        if let Some(row) = self.muc_message_now(from, message, to)? {
            self.enqueue(row).await;
        }
        Ok(())
    }

    /// [`Self::muc_message`] under the rooms' lock: what to archive.
    fn muc_message_now(
        &self,
        from: &FullJid,
        message: &Element,
        to: &Jid,
    ) -> Result<Option<impmesh_store::ArchiveRow>, StanzaErrorCondition> {
        let Some(room_name) = to.node() else {
            return Err(StanzaErrorCondition::ServiceUnavailable);
        };
        if mesh::elements(message) > mesh::MAX_ROOM_STANZA_ELEMENTS
            || self
                .config
                .muc
                .as_ref()
                .is_some_and(|m| stanza::serialize(message).len() > m.max_message_bytes)
        {
            self.stats.muc_refused(MucLimit::Size);
            return Err(StanzaErrorCondition::PolicyViolation);
        }
        let groupchat = message.attr("type") == Some("groupchat");
        let now = crate::time::now_micros();
        let mut rooms = lock(&self.muc.rooms);
        let Some(room) = rooms.get_mut(room_name.as_str()) else {
            return Err(StanzaErrorCondition::ItemNotFound);
        };
        let subject = room.subject().cloned();
        let said = self.muc_said(room, from, message, to, groupchat, now);
        // A voice request refused (one waits already) is not over the allowance.
        let voice =
            to.resource().is_none() && !groupchat && message.get_child("x", muc::NS_USER).is_none();
        if said.as_ref().err() == Some(&StanzaErrorCondition::ResourceConstraint) && !voice {
            self.stats.muc_refused(MucLimit::MessageRate);
        }
        let (out, row) = said?;
        if room.config.persistent && room.subject() != subject.as_ref() {
            self.muc_persist(room_name.as_str(), Some(&*room));
        }
        self.stats.muc_messages(out.len());
        self.muc_send(out);
        Ok(row)
    }

    /// What a room does with a session's message: the stanzas it sends.
    fn muc_said(
        &self,
        room: &mut Room,
        from: &FullJid,
        message: &Element,
        to: &Jid,
        groupchat: bool,
        now: i64,
    ) -> Result<(Vec<muc::Out>, Option<impmesh_store::ArchiveRow>), StanzaErrorCondition> {
        Ok((
            match (to.resource(), groupchat) {
                (None, true) => {
                    let id = crate::mam::archive_id();
                    let out = room.groupchat(from, message, now, &id)?;
                    let nick = room.nick_of(from).unwrap_or_default().to_owned();
                    let row = self.muc_archive(room, &nick, id, &out, now);
                    return Ok((out, row));
                }
                // XEP-0045 §7.5: a groupchat message to an occupant is an error.
                (Some(_), true) => return Err(StanzaErrorCondition::BadRequest),
                (Some(nick), false) => room.private(from, nick.as_str(), message, now)?,
                // Mediated invitations and declines (XEP-0045 §7.8.2): delivered like
                // any message (stored offline, over a router link, or bounced).
                (None, false) if message.get_child("x", muc::NS_USER).is_some() => {
                    let invitations = room.invite(from, message, now)?;
                    if let Some(server) = self.me.upgrade() {
                        for (to, m) in invitations {
                            let server = server.clone();
                            self.tasks.spawn(async move {
                                server.deliver_or_bounce(m, &Jid::from(to)).await;
                            });
                        }
                    }
                    Vec::new()
                }
                // Voice requests and their answers (XEP-0045 §7.13, §8.6).
                (None, false) => match message
                    .get_child("x", ns::DATA_FORMS)
                    .filter(|x| muc::is_voice_form(x))
                {
                    Some(form) => room.voice_request(from, form)?,
                    // XEP-0045 §7.4: what else a client sends the room is not for it.
                    None => return Err(StanzaErrorCondition::BadRequest),
                },
            },
            None,
        ))
    }

    /// What rooms and occupants there are now, for `/metrics`.
    pub fn muc_counts(&self) -> (usize, usize) {
        let rooms = lock(&self.muc.rooms);
        let occupants = rooms.values().map(|r| r.occupants().count()).sum();
        (rooms.len(), occupants)
    }

    /// disco#info of the service or of a room.
    fn muc_info(&self, room: Option<&str>) -> Result<String, StanzaErrorCondition> {
        let mut body = format!("<query xmlns='{}'>", ns::DISCO_INFO);
        match room {
            None => {
                body.push_str("<identity category='conference' type='text' name='Chatrooms'/>");
                for f in SERVICE_FEATURES {
                    body.push_str(&format!("<feature var='{f}'/>"));
                }
            }
            Some(name) => {
                let rooms = lock(&self.muc.rooms);
                let Some(room) = rooms.get(name) else {
                    return Err(StanzaErrorCondition::ItemNotFound);
                };
                let c = &room.config;
                let title = if c.name.is_empty() { name } else { &c.name };
                body.push_str(&format!(
                    "<identity category='conference' type='text' name='{}'/>",
                    escape(title)
                ));
                let pick =
                    |on: bool, yes: &'static str, no: &'static str| if on { yes } else { no };
                for f in [
                    muc::NS,
                    ns::REGISTER,
                    ns::VCARD,
                    SELF_PING,
                    muc::NS_OCCUPANT_ID,
                    pick(c.public, "muc_public", "muc_hidden"),
                    pick(c.members_only, "muc_membersonly", "muc_open"),
                    pick(c.moderated, "muc_moderated", "muc_unmoderated"),
                    pick(c.whois_anyone, "muc_nonanonymous", "muc_semianonymous"),
                    pick(
                        c.password.is_some(),
                        "muc_passwordprotected",
                        "muc_unsecured",
                    ),
                    pick(c.persistent, "muc_persistent", "muc_temporary"),
                    ns::SID,
                ] {
                    body.push_str(&format!("<feature var='{f}'/>"));
                }
                if self.muc_archives(room) {
                    for f in [ns::MAM, ns::MAM_EXTENDED] {
                        body.push_str(&format!("<feature var='{f}'/>"));
                    }
                }
                // Moderation finds messages in the archive or the history.
                if self.muc_archives(room) || c.history_length > 0 {
                    body.push_str(&format!("<feature var='{}'/>", muc::NS_MODERATE));
                }
                if let Some(form) = room.room_info_form() {
                    body.push_str(&stanza::serialize(&form));
                }
            }
        }
        body.push_str("</query>");
        Ok(body)
    }

    /// disco#items of the service: its public rooms.
    fn muc_items(&self) -> String {
        let rooms = lock(&self.muc.rooms);
        let mut body = format!("<query xmlns='{}'>", ns::DISCO_ITEMS);
        let mut public: Vec<(&String, &Room)> = rooms
            .iter()
            .filter(|(_, r)| r.config.public && !r.locked())
            .collect();
        public.sort_by(|a, b| a.0.cmp(b.0));
        for (_, room) in public {
            let name = if room.config.name.is_empty() {
                room.jid().node().map_or("", |n| n.as_str())
            } else {
                &room.config.name
            };
            body.push_str(&format!(
                "<item jid='{}' name='{}'/>",
                escape(room.jid().as_str()),
                escape(name)
            ));
        }
        body.push_str("</query>");
        body
    }

    /// An IQ request to the service or a room; the answer's payload.
    fn muc_iq(
        &self,
        from: &FullJid,
        iq: &Element,
        to: &Jid,
    ) -> Result<Option<String>, StanzaErrorCondition> {
        let Some(payload) = iq.children().next() else {
            return Err(StanzaErrorCondition::BadRequest);
        };
        let set = iq.attr("type") == Some("set");
        if let Some(nick) = to.resource() {
            // XEP-0410: a client pinging its own occupant JID learns whether it is
            // still in the room; the service answers for it.
            if payload.is("ping", ns::PING) && !set {
                let rooms = lock(&self.muc.rooms);
                let joined = to
                    .node()
                    .and_then(|room| rooms.get(room.as_str()))
                    .is_some_and(|room| room.nick_of(from) == Some(nick.as_str()));
                return if joined {
                    Ok(None)
                } else {
                    Err(StanzaErrorCondition::NotAcceptable)
                };
            }
            // Other IQs to occupants (vCards, pings of others) are not passed on yet.
            return Err(StanzaErrorCondition::FeatureNotImplemented);
        }
        let room = to.node().map(|n| n.as_str());
        match (payload.name(), payload.ns().as_str(), set) {
            ("query", ns::DISCO_INFO, false) if payload.attr("node").is_none() => {
                self.muc_info(room).map(Some)
            }
            // XEP-0045 §7.12: the nick the account reserved.
            ("query", ns::DISCO_INFO, false) if payload.attr("node") == Some("x-roomuser-item") => {
                let rooms = lock(&self.muc.rooms);
                let room = room
                    .and_then(|name| rooms.get(name))
                    .ok_or(StanzaErrorCondition::ItemNotFound)?;
                Ok(Some(stanza::serialize(
                    &room.reserved_nick_info(&from.to_bare()),
                )))
            }
            ("query", ns::REGISTER, _) => {
                let Some(name) = room else {
                    return Err(StanzaErrorCondition::ServiceUnavailable);
                };
                self.muc_register(from, name, payload, set)
            }
            // XEP-0486: the room's vCard, its avatar.
            ("vCard", ns::VCARD, _) => {
                let Some(name) = room else {
                    return Err(StanzaErrorCondition::ServiceUnavailable);
                };
                let mut rooms = lock(&self.muc.rooms);
                let Some(r) = rooms.get_mut(name) else {
                    return Err(StanzaErrorCondition::ItemNotFound);
                };
                if !set {
                    return Ok(Some(stanza::serialize(&r.vcard())));
                }
                let out = r.set_vcard(from, payload)?;
                if r.config.persistent {
                    self.muc_persist(name, Some(&*r));
                }
                self.muc_send(out);
                Ok(None)
            }
            ("query", ns::DISCO_ITEMS, false) if room.is_none() => Ok(Some(self.muc_items())),
            ("query", ns::DISCO_ITEMS, false) => {
                Ok(Some(format!("<query xmlns='{}'/>", ns::DISCO_ITEMS)))
            }
            ("query", muc::NS_OWNER | muc::NS_ADMIN, _) => {
                let Some(name) = room else {
                    return Err(StanzaErrorCondition::BadRequest);
                };
                self.muc_room_iq(from, name, payload, set)
            }
            _ => Err(StanzaErrorCondition::ServiceUnavailable),
        }
    }

    /// Registration with a room (XEP-0045 §7.10): the form, or a nick reserved or
    /// given up.
    fn muc_register(
        &self,
        from: &FullJid,
        name: &str,
        payload: &Element,
        set: bool,
    ) -> Result<Option<String>, StanzaErrorCondition> {
        let mut rooms = lock(&self.muc.rooms);
        let Some(room) = rooms.get_mut(name) else {
            return Err(StanzaErrorCondition::ItemNotFound);
        };
        if !set {
            let form = room.registration_form(&from.to_bare())?;
            return Ok(Some(stanza::serialize(&form)));
        }
        let out = room.register(from, payload)?;
        if room.config.persistent {
            self.muc_persist(name, Some(&*room));
        }
        self.muc_send(out);
        Ok(None)
    }

    /// An owner's or an admin's request to a room (XEP-0045 §9, §10): its
    /// configuration form, its destruction, and affiliations and roles.
    fn muc_room_iq(
        &self,
        from: &FullJid,
        name: &str,
        payload: &Element,
        set: bool,
    ) -> Result<Option<String>, StanzaErrorCondition> {
        let Some(settings) = &self.config.muc else {
            return Err(StanzaErrorCondition::ServiceUnavailable);
        };
        let mut rooms = lock(&self.muc.rooms);
        let Some(room) = rooms.get_mut(name) else {
            return Err(StanzaErrorCondition::ItemNotFound);
        };
        let owner = room.affiliation(&from.to_bare()) == muc::Affiliation::Owner;
        let (answer, out) = if payload.ns() == muc::NS_ADMIN {
            if set {
                let changes = muc::parse_changes(payload)?;
                let out = room.admin_set(from, &changes)?;
                if room.config.persistent && changes.iter().any(|(c, _)| c.is_affiliation()) {
                    self.muc_persist(name, Some(&*room));
                }
                (None, out)
            } else {
                (
                    Some(stanza::serialize(&room.admin_get(from, payload)?)),
                    Vec::new(),
                )
            }
        } else if !owner {
            return Err(StanzaErrorCondition::Forbidden);
        } else if !set {
            let mut query = Element::bare("query", muc::NS_OWNER);
            query.append_child(room.config_form(settings.limits(self.config.archive.enabled)));
            (Some(stanza::serialize(&query)), Vec::new())
        } else if let Some(destroy) = payload.get_child("destroy", muc::NS_OWNER) {
            // §10.9: the owner destroys the room, naming where to go instead.
            let venue = match destroy.attr("jid") {
                Some(j) => {
                    Some(jid::BareJid::new(j).map_err(|_| StanzaErrorCondition::JidMalformed)?)
                }
                None => None,
            };
            let reason = destroy
                .get_child("reason", muc::NS_OWNER)
                .map(Element::text);
            let stored = room.config.persistent;
            let out = room.destroy(venue.as_ref(), reason.as_deref());
            rooms.remove(name);
            self.muc.changed.notify_one();
            if stored {
                self.muc_persist(name, None);
            }
            self.muc_send(out);
            return Ok(None);
        } else {
            match payload.get_child("x", ns::DATA_FORMS) {
                // §10.1.2: an instant room, the default configuration accepted.
                Some(x) if x.attr("type") == Some("submit") && x.children().count() == 0 => {
                    room.unlock();
                    (None, Vec::new())
                }
                Some(x) if x.attr("type") == Some("submit") => {
                    let stored = room.config.persistent;
                    let out = room.configure(x, settings.limits(self.config.archive.enabled))?;
                    // Stored, or forgotten when it stops being persistent.
                    if stored || room.config.persistent {
                        self.muc_persist(name, Some(&*room));
                    }
                    (None, out)
                }
                // §10.1.3: the owner gave up creating the room: it is destroyed.
                Some(x) if x.attr("type") == Some("cancel") && room.locked() => {
                    let out = room.destroy(None, None);
                    rooms.remove(name);
                    self.muc.changed.notify_one();
                    self.muc_send(out);
                    return Ok(None);
                }
                Some(x) if x.attr("type") == Some("cancel") => (None, Vec::new()),
                _ => return Err(StanzaErrorCondition::BadRequest),
            }
        };
        // A room that is empty and not kept when empty goes (its last occupant
        // kicked, or kept-when-empty turned off while nobody is in).
        if room.is_empty() && !room.config.persistent {
            rooms.remove(name);
            self.muc.changed.notify_one();
        }
        self.muc_send(out);
        Ok(answer)
    }
}

impl Context<'_> {
    /// A request of this session's client to the chat service or a room.
    pub(crate) async fn on_muc_iq(&mut self, iq: &Element, to: &Jid) {
        if !matches!(iq.attr("type"), Some("get" | "set")) {
            return;
        }
        let server = self.server.clone();
        let from = self.jid().clone();
        match server.muc_route(&from, iq, to).await {
            Routed::Here => {}
            Routed::Sent => return,
            Routed::Refused(text) => {
                self.reply_error(iq, StanzaErrorCondition::ServiceUnavailable, Some(&text));
                return;
            }
        }
        if stored_request(iq, to).is_some() {
            match server.muc_stored_request(&from, to, iq, false).await {
                Ok((results, answer)) => {
                    for xml in results {
                        self.push_out(xml.into());
                    }
                    self.reply_result(iq, answer);
                }
                Err(refusal) => self.refuse(iq, &refusal),
            }
            return;
        }
        match server.muc_iq(&from, iq, to) {
            Ok(payload) => self.reply_result(iq, payload),
            Err(condition) => self.reply_error(iq, condition, None),
        }
    }

    /// A message of this session's client to a room or an occupant.
    pub(crate) async fn on_muc_message(&mut self, message: &Element, to: &Jid) {
        let server = self.server.clone();
        let from = self.jid().clone();
        match server.muc_route(&from, message, to).await {
            Routed::Here => {}
            Routed::Sent => return,
            Routed::Refused(text) => {
                self.reply_error(
                    message,
                    StanzaErrorCondition::ServiceUnavailable,
                    Some(&text),
                );
                return;
            }
        }
        let mut message = message.clone();
        stanza::set_attr(&mut message, "from", &from.to_string());
        if let Err(condition) = server.muc_message(&from, &message, to).await {
            self.reply_error(&message, condition, None);
        }
    }

    /// A presence of this session's client to a room; whether the room took it.
    pub(crate) async fn on_muc_presence(&mut self, presence: &Element, to: &Jid) -> bool {
        let server = self.server.clone();
        let mut presence = presence.clone();
        let from = self.jid().clone();
        stanza::set_attr(&mut presence, "from", &from.to_string());
        let routed = match presence.attr("type") {
            Some("unavailable") if server.muc_leave_peer(&from, to, true) => Routed::Sent,
            Some("unavailable") => Routed::Here,
            _ => server.muc_route(&from, &presence, to).await,
        };
        let (condition, text) = match routed {
            Routed::Sent => return true,
            Routed::Refused(text) => (StanzaErrorCondition::ServiceUnavailable, Some(text)),
            Routed::Here => match server.muc_presence(&from, &presence, to) {
                Ok(()) => return true,
                Err(condition) => (condition, None),
            },
        };
        if let Some(mut reply) = crate::error::error_reply(&presence, condition, text.as_deref()) {
            stanza::set_attr(&mut reply, "to", &from.to_string());
            // XEP-0045 §7.2.6: the error carries the MUC element.
            if reply.get_child("x", muc::NS).is_none() {
                reply.append_child(Element::bare("x", muc::NS));
            }
            self.send_self(&reply);
        }
        false
    }
}
