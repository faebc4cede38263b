//! XEP-0045 multi-user chat rooms as decisions without I/O: one room's occupants,
//! affiliations, subject and history, and what each presence or message to it sends
//! to whom. The service that owns rooms (routing, the store, the mesh) hands it
//! parsed stanzas with the sender's real full JID and the current time, and sends the
//! stanzas it returns.
//!
//! Occupants are identified by nick; several sessions of one account may share a
//! nick (a phone and a laptop in the same room), and each receives the room's
//! traffic. A nick held by one account is a `conflict` for any other.
//!
//! The configuration form is in `form`, affiliation and role changes by IQ (kicks,
//! bans, voice) in `admin`, voice requests in `voice`, moderation (XEP-0425) in
//! `moderate`, registration (§7.10) in `register`, the room's vCard (its avatar,
//! XEP-0486) in `vcard`, each occupant's allowance of messages and presence changes
//! in `rate`.

mod admin;
mod form;
mod moderate;
mod rate;
mod register;
mod vcard;
mod voice;

use std::collections::{BTreeMap, HashMap, VecDeque};

use jid::{BareJid, FullJid, ResourcePart};
use minidom::Element;

use crate::core::archive::datetime;
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

/// XEP-0045's namespaces.
pub const NS: &str = "http://jabber.org/protocol/muc";
pub const NS_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0421: the room names each occupant's account by an opaque id of its own.
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
/// XEP-0033: addresses only servers put in stanzas between them (router links).
const NS_ADDRESS: &str = "http://jabber.org/protocol/address";
pub use admin::{Change, NS_ADMIN, parse_affiliation, parse_changes};
pub use form::{FORM_TYPE, Limits};
pub use moderate::{Moderation, NS_MODERATE, NS_RETRACT, announced, tombstone};
use rate::Allowance;
pub use rate::{Rate, Rates};
pub use register::FORM_REGISTER;
pub use vcard::MAX_VCARD_BYTES;
pub use voice::{NS_REQUEST, is_voice_form};
/// XEP-0203's delayed delivery, on history.
const DELAY: &str = "urn:xmpp:delay";

/// Characters of one history request, at most, however large the client asks.
pub const MAX_HISTORY_CHARS: usize = 256 * 1024;
/// Bytes of history a room keeps, at most, whatever its length: the oldest messages
/// go first.
pub const MAX_KEPT_BYTES: usize = 64 * 1024;
/// Invitations one message may carry, at most.
pub const MAX_INVITES: usize = 10;
/// Accounts that left a room whose allowances it remembers, at most (so that leaving
/// and entering again is no way around them).
const MAX_LEFT_KEPT: usize = 1000;

/// An account's use of a room's rates: messages; entries and presence changes. One
/// per account, whatever its sessions and nicks.
#[derive(Debug, Clone, Copy, Default)]
struct Allowances {
    said: Allowance,
    moved: Allowance,
}
/// Invitations a room remembers for declines, at most (the oldest go first).
const MAX_INVITES_KEPT: usize = 1000;
/// Bytes of an invitation's or a decline's reason passed on, at most.
const MAX_REASON_BYTES: usize = 1024;
/// XEP-0359's namespace: a room's stanza ids are its own to give.
const SID: &str = "urn:xmpp:sid:0";

/// An account's standing in a room, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outcast => "outcast",
            Self::None => "none",
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }
}

/// An occupant's role while present, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Visitor => "visitor",
            Self::Participant => "participant",
            Self::Moderator => "moderator",
        }
    }
}

/// Who may send private messages to occupants (`muc#roomconfig_allowpm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivateMessages {
    Anyone,
    /// Occupants with voice (not visitors).
    Participants,
    Moderators,
    Nobody,
}

impl PrivateMessages {
    /// Its value in the `muc#roomconfig_allowpm` field (and in the store).
    pub fn as_str(self) -> &'static str {
        match self {
            PrivateMessages::Anyone => "anyone",
            PrivateMessages::Participants => "participants",
            PrivateMessages::Moderators => "moderators",
            PrivateMessages::Nobody => "none",
        }
    }

    /// The value [`Self::as_str`] gives, or `None` for another.
    pub fn parse(value: &str) -> Option<PrivateMessages> {
        [
            PrivateMessages::Anyone,
            PrivateMessages::Participants,
            PrivateMessages::Moderators,
            PrivateMessages::Nobody,
        ]
        .into_iter()
        .find(|p| p.as_str() == value)
    }
}

/// A room's configuration (the `muc#roomconfig` fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub description: String,
    /// Kept when the last occupant leaves (and across restarts).
    pub persistent: bool,
    /// Listed in the service's disco#items.
    pub public: bool,
    /// Only members, admins and owners may enter.
    pub members_only: bool,
    /// Only participants and moderators may speak; others enter as visitors.
    pub moderated: bool,
    pub password: Option<String>,
    /// Occupants at most (admins and owners may enter beyond).
    pub max_users: usize,
    /// Every occupant sees real JIDs (non-anonymous); otherwise only moderators do.
    pub whois_anyone: bool,
    /// Messages kept for occupants who enter later.
    pub history_length: usize,
    pub private_messages: PrivateMessages,
    /// Participants may change the subject, not only moderators.
    pub subject_by_anyone: bool,
    /// Its messages are archived (XEP-0313 on the room's address) while it is
    /// persistent and the node keeps archives.
    pub archived: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: String::new(),
            description: String::new(),
            persistent: false,
            public: true,
            members_only: false,
            moderated: false,
            password: None,
            max_users: 200,
            whois_anyone: false,
            history_length: 20,
            private_messages: PrivateMessages::Anyone,
            subject_by_anyone: false,
            archived: true,
        }
    }
}

/// How much history an entering occupant asks for (XEP-0045 §7.2.14); each given
/// limit applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    pub max_stanzas: Option<usize>,
    pub max_chars: Option<usize>,
    pub seconds: Option<u64>,
    /// Microseconds since the epoch.
    pub since: Option<i64>,
}

/// What a join presence carries in its `<x xmlns='…muc'/>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Join {
    pub password: Option<String>,
    pub history: History,
}

impl Join {
    /// The `<x xmlns='http://jabber.org/protocol/muc'/>` of a presence, when it has one
    /// (a presence without it, to a room the session is not in, is still a join).
    pub fn parse(presence: &Element) -> Join {
        let Some(x) = presence.get_child("x", NS) else {
            return Join::default();
        };
        let password = x.get_child("password", NS).map(|p| p.text());
        let history = x
            .get_child("history", NS)
            .map(|h| {
                let num = |name: &str| h.attr(name).and_then(|v| v.parse::<u64>().ok());
                History {
                    max_stanzas: num("maxstanzas")
                        .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                    max_chars: num("maxchars").map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                    seconds: num("seconds"),
                    since: h
                        .attr("since")
                        .and_then(crate::core::archive::parse_datetime),
                }
            })
            .unwrap_or_default();
        Join { password, history }
    }
}

/// A stanza for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub to: FullJid,
    pub stanza: Element,
}

/// Someone in the room under one nick.
#[derive(Debug, Clone)]
pub struct Occupant {
    pub nick: String,
    pub bare: BareJid,
    /// The sessions sharing the nick, in the order they entered.
    pub sessions: Vec<FullJid>,
    /// The latest presence as the room shows it (without the MUC elements).
    presence: Element,
    pub affiliation: Affiliation,
    pub role: Role,
    /// A change of status over the allowance waits: the newest is sent when the
    /// allowance returns ([`Room::due`]).
    waiting: bool,
}

/// A message kept for history.
#[derive(Debug, Clone)]
struct Kept {
    /// As broadcast, without `to`.
    stanza: Element,
    micros: i64,
    chars: usize,
}

/// One room.
#[derive(Debug, Clone)]
pub struct Room {
    jid: BareJid,
    pub config: Config,
    affiliations: HashMap<BareJid, Affiliation>,
    occupants: BTreeMap<String, Occupant>,
    nick_of: HashMap<FullJid, String>,
    /// The subject and the nick that set it (empty: the room itself).
    subject: Option<(String, String)>,
    history: VecDeque<Kept>,
    /// Invitations sent (inviter, invitee, bare JIDs), the oldest first: a decline
    /// is passed on only to someone who invited its sender.
    invited: VecDeque<(BareJid, BareJid)>,
    /// A new room refuses everyone but its owner until it is configured
    /// (XEP-0045 §10.1).
    locked: bool,
    /// The room was just created: the owner's first self-presence says so (201).
    created: bool,
    /// Visitors' requests for voice waiting for a moderator, by nick.
    voice_requests: std::collections::HashSet<String>,
    /// How often an occupant may speak and change its presence.
    rates: Rates,
    /// Each account's allowances: of those in the room, and of those that left
    /// while they are not whole again.
    allowances: HashMap<BareJid, Allowances>,
    /// Nicks reserved by registration (§7.10), and the account of each; and each
    /// account's nick.
    reserved: BTreeMap<String, BareJid>,
    reserved_by: HashMap<BareJid, String>,
    /// The room's vCard-temp, serialized (its avatar, XEP-0486), and the SHA-1s of
    /// its photos.
    vcard: Option<String>,
    avatar_hashes: Vec<String>,
    /// The secret occupant ids are derived with (XEP-0421): the same for the room's
    /// life, across restarts, and unknown outside the service, so that an id tells
    /// nothing of the account.
    occupant_key: [u8; 32],
}

type Refusal = StanzaErrorCondition;

impl Room {
    /// A new room owned by `creator`, locked until [`Room::unlock`].
    pub fn create(jid: BareJid, creator: &BareJid, config: Config) -> Room {
        Room {
            jid,
            config,
            affiliations: HashMap::from([(creator.clone(), Affiliation::Owner)]),
            occupants: BTreeMap::new(),
            nick_of: HashMap::new(),
            subject: None,
            history: VecDeque::new(),
            invited: VecDeque::new(),
            locked: true,
            created: true,
            occupant_key: [0; 32],
            voice_requests: Default::default(),
            rates: Rates::default(),
            allowances: HashMap::new(),
            reserved: BTreeMap::new(),
            reserved_by: HashMap::new(),
            vcard: None,
            avatar_hashes: Vec::new(),
        }
    }

    /// A room kept across a restart: open, empty, with its configuration,
    /// affiliations and subject.
    pub fn restore(
        jid: BareJid,
        config: Config,
        affiliations: impl IntoIterator<Item = (BareJid, Affiliation)>,
        subject: Option<(String, String)>,
    ) -> Room {
        Room {
            jid,
            config,
            affiliations: affiliations
                .into_iter()
                .filter(|(_, a)| *a != Affiliation::None)
                .collect(),
            occupants: BTreeMap::new(),
            nick_of: HashMap::new(),
            subject,
            history: VecDeque::new(),
            invited: VecDeque::new(),
            locked: false,
            created: false,
            occupant_key: [0; 32],
            voice_requests: Default::default(),
            rates: Rates::default(),
            allowances: HashMap::new(),
            reserved: BTreeMap::new(),
            reserved_by: HashMap::new(),
            vcard: None,
            avatar_hashes: Vec::new(),
        }
    }

    /// Reserves `nick` for `account` (a registration kept across a restart).
    pub fn reserve_nick(&mut self, account: BareJid, nick: String) {
        self.reserve(account, nick);
    }

    /// The reserved nicks and their accounts, by nick.
    pub fn reserved_nicks(&self) -> impl Iterator<Item = (&str, &BareJid)> {
        self.reserved.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// Sets how often an occupant may speak and change its presence.
    pub fn set_rates(&mut self, rates: Rates) {
        self.rates = rates;
    }

    /// Sets the secret occupant ids are derived with (the service's, for this room).
    pub fn set_occupant_key(&mut self, key: [u8; 32]) {
        self.occupant_key = key;
    }

    /// The occupant id of `account` in this room (XEP-0421 §4): the same whatever
    /// its sessions and nicks, another in every room.
    pub fn occupant_id(&self, account: &BareJid) -> String {
        use base64::Engine as _;
        use hmac::{KeyInit as _, Mac as _};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.occupant_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(account.as_str().as_bytes());
        let digest = mac.finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18])
    }

    /// An `<occupant-id/>` element for `account`.
    fn occupant_id_el(&self, account: &BareJid) -> Element {
        Element::builder("occupant-id", NS_OCCUPANT_ID)
            .attr(
                rxml::xml_ncname!("id").to_owned(),
                self.occupant_id(account),
            )
            .build()
    }

    pub fn jid(&self) -> &BareJid {
        &self.jid
    }

    /// Accounts with an affiliation other than `none`.
    pub fn affiliations(&self) -> impl Iterator<Item = (&BareJid, Affiliation)> {
        self.affiliations.iter().map(|(j, a)| (j, *a))
    }

    /// The subject and the nick that set it (empty: the room itself).
    pub fn subject(&self) -> Option<&(String, String)> {
        self.subject.as_ref()
    }

    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Opens a new room to others (the owner accepted the default configuration or
    /// submitted one).
    pub fn unlock(&mut self) {
        self.locked = false;
    }

    pub fn is_empty(&self) -> bool {
        self.occupants.is_empty()
    }

    pub fn occupants(&self) -> impl Iterator<Item = &Occupant> {
        self.occupants.values()
    }

    /// The nick a session is in the room under, if it is.
    pub fn nick_of(&self, session: &FullJid) -> Option<&str> {
        self.nick_of.get(session).map(String::as_str)
    }

    pub fn affiliation(&self, account: &BareJid) -> Affiliation {
        self.affiliations
            .get(account)
            .copied()
            .unwrap_or(Affiliation::None)
    }

    /// Sets an account's affiliation (`none` forgets it). Below member, a nick it
    /// reserved is free again.
    pub fn set_affiliation(&mut self, account: BareJid, affiliation: Affiliation) {
        if affiliation < Affiliation::Member {
            self.unreserve(&account);
        }
        if affiliation == Affiliation::None {
            self.affiliations.remove(&account);
        } else {
            self.affiliations.insert(account, affiliation);
        }
    }

    fn occupant_jid(&self, nick: &str) -> Option<FullJid> {
        ResourcePart::new(nick)
            .ok()
            .map(|r| self.jid.with_resource(&r))
    }

    /// `from` enters under `nick` with `presence` (its `<x xmlns='…muc'/>` parsed as
    /// `join`). Everyone present learns of it; the newcomer gets the occupants, its
    /// own presence (status 110), the history it asked for and the subject.
    pub fn join(
        &mut self,
        from: &FullJid,
        nick: &str,
        join: &Join,
        presence: &Element,
        now: i64,
    ) -> Result<Vec<Out>, Refusal> {
        if self.occupant_jid(nick).is_none() {
            return Err(StanzaErrorCondition::JidMalformed);
        }
        let bare = from.to_bare();
        let affiliation = self.affiliation(&bare);
        if affiliation == Affiliation::Outcast {
            return Err(StanzaErrorCondition::Forbidden);
        }
        if self.locked && affiliation != Affiliation::Owner {
            return Err(StanzaErrorCondition::ItemNotFound);
        }
        if self.config.members_only && affiliation < Affiliation::Member {
            return Err(StanzaErrorCondition::RegistrationRequired);
        }
        if let Some(password) = &self.config.password
            && affiliation != Affiliation::Owner
            && join.password.as_deref() != Some(password.as_str())
        {
            return Err(StanzaErrorCondition::NotAuthorized);
        }
        let shared = match self.occupants.get(nick) {
            Some(o) if o.bare != bare => return Err(StanzaErrorCondition::Conflict),
            Some(_) => true,
            None => false,
        };
        if self.reserved_by_another(nick, &bare) {
            return Err(StanzaErrorCondition::Conflict);
        }
        if !shared
            && self.occupants.len() >= self.config.max_users
            && affiliation < Affiliation::Admin
        {
            return Err(StanzaErrorCondition::ServiceUnavailable);
        }
        // One allowance per account, kept for a while after it leaves. A session
        // already in the room that enters again beyond it is not refused (its client
        // would take that as being out): it gets its own presence back, the others
        // nothing yet (the change waits like any other, see `update`).
        let again = self.nick_of.get(from).is_some_and(|n| n == nick);
        let rate = self.rates.presence;
        let allowed = self
            .allowances
            .entry(bare.clone())
            .or_default()
            .moved
            .take(rate, now);
        if !allowed && !again {
            return Err(StanzaErrorCondition::ResourceConstraint);
        }
        let quiet = !allowed;
        let role = match affiliation {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            Affiliation::Member => Role::Participant,
            _ if self.config.moderated => Role::Visitor,
            _ => Role::Participant,
        };
        let mut out = Vec::new();
        // The occupants already there, to the newcomer.
        let newcomer_moderator = role == Role::Moderator;
        for other in self.occupants.values().filter(|o| o.nick != nick && !quiet) {
            let p = self.presence_of(other, from, newcomer_moderator, &[], None);
            out.push(Out {
                to: from.clone(),
                stanza: p,
            });
        }
        let presence = room_presence(presence);
        let occupant = self
            .occupants
            .entry(nick.to_owned())
            .or_insert_with(|| Occupant {
                nick: nick.to_owned(),
                bare: bare.clone(),
                sessions: Vec::new(),
                presence: presence.clone(),
                affiliation,
                role,
                waiting: false,
            });
        occupant.presence = presence;
        occupant.waiting = quiet;
        if !occupant.sessions.contains(from) {
            occupant.sessions.push(from.clone());
        }
        self.nick_of.insert(from.clone(), nick.to_owned());
        // Its presence, to everyone (the newcomer's own with its status codes).
        let mut own = vec![110];
        if self.config.whois_anyone {
            own.push(100);
        }
        if std::mem::take(&mut self.created) {
            own.push(201);
        }
        let occupant = &self.occupants[nick];
        for to in self.sessions().filter(|to| !quiet || to == from) {
            let codes: &[u16] = if occupant.sessions.contains(&to) {
                &own
            } else {
                &[]
            };
            let moderator = self.is_moderator(&to);
            let p = self.presence_of(occupant, &to, moderator, codes, None);
            out.push(Out { to, stanza: p });
        }
        if quiet {
            return Ok(out);
        }
        // History, then the subject.
        for kept in self.history_for(&join.history, now) {
            let mut m = kept.stanza.clone();
            stanza::set_attr(&mut m, "to", &from.to_string());
            m.append_child(
                Element::builder("delay", DELAY)
                    .attr(rxml::xml_ncname!("from").to_owned(), self.jid.to_string())
                    .attr(rxml::xml_ncname!("stamp").to_owned(), datetime(kept.micros))
                    .build(),
            );
            out.push(Out {
                to: from.clone(),
                stanza: m,
            });
        }
        out.push(Out {
            to: from.clone(),
            stanza: self.subject_message(from),
        });
        Ok(out)
    }

    /// A presence from a session already in the room: a change of status, or of nick
    /// when `nick` differs from its own (XEP-0045 §7.6: unavailable with 303 under the
    /// old nick, then available under the new one, to everyone).
    ///
    /// Over the occupant's presence allowance, a change of nick is refused
    /// (`resource-constraint`) and a change of status waits: the room shows the
    /// newest to those who enter and sends it to everyone when [`Room::due`].
    pub fn update(
        &mut self,
        from: &FullJid,
        nick: &str,
        presence: &Element,
        now: i64,
    ) -> Result<Vec<Out>, Refusal> {
        let Some(old) = self.nick_of.get(from).cloned() else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        let presence = room_presence(presence);
        let rate = self.rates.presence;
        let mut out = Vec::new();
        if old != nick {
            if self.occupant_jid(nick).is_none() {
                return Err(StanzaErrorCondition::JidMalformed);
            }
            if self.occupants.contains_key(nick) || self.reserved_by_another(nick, &from.to_bare())
            {
                return Err(StanzaErrorCondition::Conflict);
            }
            if !self.allowances_of(&from.to_bare()).moved.take(rate, now) {
                return Err(StanzaErrorCondition::ResourceConstraint);
            }
            let Some(mut occupant) = self.occupants.remove(&old) else {
                return Err(StanzaErrorCondition::NotAcceptable);
            };
            for to in self.sessions().chain(occupant.sessions.iter().cloned()) {
                let own = occupant.sessions.contains(&to);
                let codes: &[u16] = if own { &[303, 110] } else { &[303] };
                let moderator = own || self.is_moderator(&to);
                let mut p = self.presence_of(&occupant, &to, moderator, codes, Some(nick));
                stanza::set_attr(&mut p, "type", "unavailable");
                out.push(Out { to, stanza: p });
            }
            occupant.nick = nick.to_owned();
            for s in &occupant.sessions {
                self.nick_of.insert(s.clone(), nick.to_owned());
            }
            self.occupants.insert(nick.to_owned(), occupant);
        }
        let Some(occupant) = self.occupants.get_mut(nick) else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        occupant.presence = presence;
        // A change of nick already used the allowance.
        let account = occupant.bare.clone();
        if old == nick && !self.allowances_of(&account).moved.take(rate, now) {
            if let Some(o) = self.occupants.get_mut(nick) {
                o.waiting = true;
            }
            return Ok(out);
        }
        if let Some(o) = self.occupants.get_mut(nick) {
            o.waiting = false;
        }
        out.extend(self.announce(nick, None));
        Ok(out)
    }

    /// The changes of status that waited for their occupant's allowance and may now
    /// be sent (see [`Room::update`]).
    pub fn due(&mut self, now: i64) -> Vec<Out> {
        let rate = self.rates.presence;
        let mut ready = Vec::new();
        for o in self.occupants.values_mut() {
            if o.waiting
                && self
                    .allowances
                    .entry(o.bare.clone())
                    .or_default()
                    .moved
                    .take(rate, now)
            {
                o.waiting = false;
                ready.push(o.nick.clone());
            }
        }
        ready
            .iter()
            .flat_map(|nick| self.announce(nick, None))
            .collect()
    }

    /// When the first change of status waiting for its allowance may be sent.
    pub fn next_due(&self) -> Option<i64> {
        let rate = self.rates.presence;
        self.occupants
            .values()
            .filter(|o| o.waiting)
            .map(|o| {
                self.allowances
                    .get(&o.bare)
                    .map_or(i64::MIN, |a| a.moved.ready_at(rate))
            })
            .min()
    }

    /// `nick`'s presence as it now stands, to every session (its own with 110),
    /// with the reason for a change of role or affiliation.
    fn announce(&self, nick: &str, reason: Option<&str>) -> Vec<Out> {
        let Some(occupant) = self.occupants.get(nick) else {
            return Vec::new();
        };
        self.sessions()
            .map(|to| {
                let own = occupant.sessions.contains(&to);
                let codes: &[u16] = if own { &[110] } else { &[] };
                let moderator = own || self.is_moderator(&to);
                let mut p = self.presence_of(occupant, &to, moderator, codes, None);
                with_reason(&mut p, reason);
                Out { to, stanza: p }
            })
            .collect()
    }

    /// Takes `nick` out of the room with every session of it, for `code` (301
    /// banned, 307 kicked, 321 or 322 no longer a member): each of its sessions and
    /// everyone left get its unavailable presence, with the reason.
    fn remove_occupant(&mut self, nick: &str, code: u16, reason: Option<&str>) -> Vec<Out> {
        let Some(mut gone) = self.occupants.remove(nick) else {
            return Vec::new();
        };
        for s in &gone.sessions {
            self.nick_of.remove(s);
        }
        gone.role = Role::None;
        gone.affiliation = self.affiliation(&gone.bare);
        gone.presence = Element::bare("presence", ns::CLIENT);
        self.sessions()
            .chain(gone.sessions.iter().cloned())
            .map(|to| {
                let own = gone.sessions.contains(&to);
                let codes: &[u16] = if own { &[code, 110] } else { &[code] };
                let moderator = own || self.is_moderator(&to);
                let mut p = self.presence_of(&gone, &to, moderator, codes, None);
                stanza::set_attr(&mut p, "type", "unavailable");
                with_reason(&mut p, reason);
                Out { to, stanza: p }
            })
            .collect()
    }

    /// A session leaves (its unavailable presence, or its stream ended). When it was
    /// the nick's last session, everyone sees the occupant go; otherwise only the
    /// session learns it is out.
    pub fn leave(&mut self, from: &FullJid, presence: &Element, now: i64) -> Vec<Out> {
        let Some(nick) = self.nick_of.remove(from) else {
            return Vec::new();
        };
        let Some(occupant) = self.occupants.get_mut(&nick) else {
            return Vec::new();
        };
        occupant.sessions.retain(|s| s != from);
        let last = occupant.sessions.is_empty();
        let mut leaving = occupant.clone();
        leaving.presence = room_presence(presence);
        let recipients: Vec<FullJid> = if last {
            self.occupants.remove(&nick);
            self.remember_allowance(&leaving, now);
            self.sessions().chain([from.clone()]).collect()
        } else {
            vec![from.clone()]
        };
        recipients
            .into_iter()
            .map(|to| {
                let own = &to == from;
                let codes: &[u16] = if own { &[110] } else { &[] };
                let moderator = own || self.is_moderator(&to);
                let mut p = self.presence_of(&leaving, &to, moderator, codes, None);
                stanza::set_attr(&mut p, "type", "unavailable");
                Out { to, stanza: p }
            })
            .collect()
    }

    /// Whether `session` may read the room's archive: an occupant may, and so may an
    /// account the room would let in without a password (not an outcast; a member, in
    /// a members-only room).
    pub fn may_read_archive(&self, session: &FullJid) -> bool {
        if self.nick_of.contains_key(session) {
            return true;
        }
        let affiliation = self.affiliation(&session.to_bare());
        affiliation != Affiliation::Outcast
            && !self.locked
            && (!self.config.members_only || affiliation >= Affiliation::Member)
            && (self.config.password.is_none() || affiliation == Affiliation::Owner)
    }

    /// `account`'s allowances (whole, for an account the room has not seen lately).
    fn allowances_of(&mut self, account: &BareJid) -> &mut Allowances {
        self.allowances.entry(account.clone()).or_default()
    }

    /// After `gone` left: the room forgets the allowances of accounts no longer in
    /// it once they are whole again, and keeps those of at most MAX_LEFT_KEPT that
    /// left (the account that just left first, when there is room).
    fn remember_allowance(&mut self, gone: &Occupant, now: i64) {
        let absent = |room: &Room, a: &BareJid| !room.occupants.values().any(|o| &o.bare == a);
        let kept = self.allowances.get(&gone.bare).copied().unwrap_or_default();
        if kept.said.is_full(now) && kept.moved.is_full(now) && absent(self, &gone.bare) {
            self.allowances.remove(&gone.bare);
        }
        if self.allowances.len() > self.occupants.len() + MAX_LEFT_KEPT {
            let present: std::collections::HashSet<BareJid> =
                self.occupants.values().map(|o| o.bare.clone()).collect();
            self.allowances.retain(|a, used| {
                present.contains(a) || !(used.said.is_full(now) && used.moved.is_full(now))
            });
            // Still too many in use: the oldest are not known; drop the one that left
            // (unless it is still in the room under another nick).
            if self.allowances.len() > self.occupants.len() + MAX_LEFT_KEPT
                && absent(self, &gone.bare)
            {
                self.allowances.remove(&gone.bare);
            }
        }
    }

    /// Uses one message of the allowance of `from`'s account (`resource-constraint`
    /// when there is none left).
    fn say(&mut self, from: &FullJid, now: i64) -> Result<(), Refusal> {
        if !self.nick_of.contains_key(from) {
            return Err(StanzaErrorCondition::NotAcceptable);
        }
        let rate = self.rates.messages;
        if self.allowances_of(&from.to_bare()).said.take(rate, now) {
            Ok(())
        } else {
            Err(StanzaErrorCondition::ResourceConstraint)
        }
    }

    /// A `groupchat` message from an occupant: to every occupant's sessions, from the
    /// sender's occupant JID, with the room's stanza id `id` (XEP-0359); kept for
    /// history when it has a body. A subject alone changes the subject, for those
    /// allowed to.
    pub fn groupchat(
        &mut self,
        from: &FullJid,
        message: &Element,
        now: i64,
        id: &str,
    ) -> Result<Vec<Out>, Refusal> {
        let Some(nick) = self.nick_of.get(from).cloned() else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        let Some(sender) = self.occupants.get(&nick) else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        if sender.role < Role::Participant {
            return Err(StanzaErrorCondition::Forbidden);
        }
        let has_body = message.get_child("body", ns::CLIENT).is_some();
        let subject = message.get_child("subject", ns::CLIENT).map(|s| s.text());
        let sets_subject = subject.is_some() && !has_body;
        if sets_subject && sender.role < Role::Moderator && !self.config.subject_by_anyone {
            return Err(StanzaErrorCondition::Forbidden);
        }
        if let Err(refusal) = self.say(from, now) {
            // Chat states, markers and receipts alone beyond the allowance are
            // dropped: they are stale by the time the allowance returns.
            if !has_body && subject.is_none() && only_notices(message) {
                return Ok(Vec::new());
            }
            return Err(refusal);
        }
        if let Some(subject) = subject.filter(|_| sets_subject) {
            self.subject = Some((subject, nick.clone()));
        }
        let Some(sender_jid) = self.occupant_jid(&nick) else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        let mut m = self.relayed(message);
        stanza::remove_attr(&mut m, "to");
        stanza::set_attr(&mut m, "from", &sender_jid.to_string());
        stanza::set_attr(&mut m, "type", "groupchat");
        m.append_child(self.occupant_id_el(&from.to_bare()));
        crate::core::archive::stamp(&mut m, id, self.jid.as_str());
        if has_body && self.config.history_length > 0 {
            let chars = stanza::serialize(&m).len();
            self.history.push_back(Kept {
                stanza: m.clone(),
                micros: now,
                chars,
            });
            let mut kept: usize = self.history.iter().map(|k| k.chars).sum();
            while self.history.len() > self.config.history_length || kept > MAX_KEPT_BYTES {
                match self.history.pop_front() {
                    Some(k) => kept -= k.chars,
                    None => break,
                }
            }
        }
        Ok(self
            .sessions()
            .map(|to| {
                let mut copy = m.clone();
                stanza::set_attr(&mut copy, "to", &to.to_string());
                Out { to, stanza: copy }
            })
            .collect())
    }

    /// A message to the room with mediated invitations or a decline (XEP-0045 §7.8.2,
    /// §7.8.3): each invitation goes to its invitee from the room, naming the inviter
    /// (and the password, when the room has one); a decline goes to the one who
    /// invited its sender. Only occupants invite; in a members-only room only admins
    /// and owners, and the invitee becomes a member. At most MAX_INVITES per message.
    pub fn invite(
        &mut self,
        from: &FullJid,
        message: &Element,
        now: i64,
    ) -> Result<Vec<(BareJid, Element)>, Refusal> {
        let Some(x) = message.get_child("x", NS_USER) else {
            return Err(StanzaErrorCondition::BadRequest);
        };
        let sender = from.to_bare();
        let reason_of = |e: &Element| {
            e.get_child("reason", NS_USER)
                .map(Element::text)
                .filter(|r| !r.is_empty() && r.len() <= MAX_REASON_BYTES)
        };
        let invites: Vec<&Element> = x.children().filter(|c| c.is("invite", NS_USER)).collect();
        let decline = x.get_child("decline", NS_USER);
        if invites.len() > MAX_INVITES || (invites.is_empty() && decline.is_none()) {
            return Err(StanzaErrorCondition::BadRequest);
        }
        let mut out = Vec::new();
        if !invites.is_empty() {
            if self.nick_of(from).is_none() {
                return Err(StanzaErrorCondition::NotAcceptable);
            }
            let standing = self.affiliation(&sender);
            if self.config.members_only && standing < Affiliation::Admin {
                return Err(StanzaErrorCondition::Forbidden);
            }
            let mut invitees = Vec::new();
            for invite in &invites {
                let to = invite
                    .attr("to")
                    .and_then(|j| BareJid::new(j).ok())
                    .ok_or(StanzaErrorCondition::JidMalformed)?;
                invitees.push((to, reason_of(invite)));
            }
            self.say(from, now)?;
            for (to, reason) in invitees {
                if self.config.members_only && self.affiliation(&to) < Affiliation::Member {
                    self.set_affiliation(to.clone(), Affiliation::Member);
                }
                let mut invite = Element::bare("invite", NS_USER);
                stanza::set_attr(&mut invite, "from", sender.as_str());
                if let Some(reason) = reason {
                    invite.append_child(Element::builder("reason", NS_USER).append(reason).build());
                }
                let mut x = Element::builder("x", NS_USER).append(invite).build();
                if let Some(password) = &self.config.password {
                    x.append_child(
                        Element::builder("password", NS_USER)
                            .append(password.as_str())
                            .build(),
                    );
                }
                let mut m = Element::builder("message", ns::CLIENT).append(x).build();
                stanza::set_attr(&mut m, "from", self.jid.as_str());
                stanza::set_attr(&mut m, "to", to.as_str());
                if self.invited.len() >= MAX_INVITES_KEPT {
                    self.invited.pop_front();
                }
                self.invited.push_back((sender.clone(), to.clone()));
                out.push((to, m));
            }
        }
        if let Some(decline) = decline {
            let to = decline
                .attr("to")
                .and_then(|j| BareJid::new(j).ok())
                .ok_or(StanzaErrorCondition::JidMalformed)?;
            let Some(at) = self
                .invited
                .iter()
                .position(|(inviter, invitee)| *inviter == to && *invitee == sender)
            else {
                return Err(StanzaErrorCondition::NotAcceptable);
            };
            self.invited.remove(at);
            let mut d = Element::bare("decline", NS_USER);
            stanza::set_attr(&mut d, "from", sender.as_str());
            if let Some(reason) = reason_of(decline) {
                d.append_child(Element::builder("reason", NS_USER).append(reason).build());
            }
            let mut m = Element::builder("message", ns::CLIENT)
                .append(Element::builder("x", NS_USER).append(d).build())
                .build();
            stanza::set_attr(&mut m, "from", self.jid.as_str());
            stanza::set_attr(&mut m, "to", to.as_str());
            out.push((to, m));
        }
        Ok(out)
    }

    /// A private message from an occupant to the occupant `to_nick`: to each of its
    /// sessions, from the sender's occupant JID, marked as coming through the room.
    pub fn private(
        &mut self,
        from: &FullJid,
        to_nick: &str,
        message: &Element,
        now: i64,
    ) -> Result<Vec<Out>, Refusal> {
        let Some(nick) = self.nick_of.get(from).cloned() else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        let allowed = match self.config.private_messages {
            PrivateMessages::Anyone => true,
            PrivateMessages::Participants => self.role_of(from) >= Role::Participant,
            PrivateMessages::Moderators => self.is_moderator(from),
            PrivateMessages::Nobody => false,
        };
        if !allowed {
            return Err(StanzaErrorCondition::Forbidden);
        }
        if !self.occupants.contains_key(to_nick) {
            return Err(StanzaErrorCondition::ItemNotFound);
        }
        let Some(sender_jid) = self.occupant_jid(&nick) else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        self.say(from, now)?;
        let Some(target) = self.occupants.get(to_nick) else {
            return Err(StanzaErrorCondition::ItemNotFound);
        };
        let mut m = self.relayed(message);
        stanza::set_attr(&mut m, "from", &sender_jid.to_string());
        m.append_child(Element::bare("x", NS_USER));
        m.append_child(self.occupant_id_el(&from.to_bare()));
        Ok(target
            .sessions
            .iter()
            .map(|to| {
                let mut copy = m.clone();
                stanza::set_attr(&mut copy, "to", &to.to_string());
                Out {
                    to: to.clone(),
                    stanza: copy,
                }
            })
            .collect())
    }

    /// Destroys the room: every occupant gets its unavailable presence with
    /// `<destroy/>` (XEP-0045 §10.9), naming the room to go to instead and why when
    /// given, and the room is left empty.
    pub fn destroy(&mut self, venue: Option<&BareJid>, reason: Option<&str>) -> Vec<Out> {
        let mut destroy = Element::bare("destroy", NS_USER);
        if let Some(venue) = venue {
            stanza::set_attr(&mut destroy, "jid", venue.as_str());
        }
        if let Some(reason) = reason {
            destroy.append_child(Element::builder("reason", NS_USER).append(reason).build());
        }
        let mut out = Vec::new();
        for occupant in std::mem::take(&mut self.occupants).into_values() {
            let Some(from) = self.occupant_jid(&occupant.nick) else {
                continue;
            };
            for to in &occupant.sessions {
                let mut p = Element::builder("presence", ns::CLIENT)
                    .append(
                        Element::builder("x", NS_USER)
                            .append(
                                Element::builder("item", NS_USER)
                                    .attr(rxml::xml_ncname!("affiliation").to_owned(), "none")
                                    .attr(rxml::xml_ncname!("role").to_owned(), "none")
                                    .build(),
                            )
                            .append(destroy.clone())
                            .build(),
                    )
                    .build();
                stanza::set_attr(&mut p, "from", &from.to_string());
                stanza::set_attr(&mut p, "to", &to.to_string());
                stanza::set_attr(&mut p, "type", "unavailable");
                out.push(Out {
                    to: to.clone(),
                    stanza: p,
                });
            }
        }
        self.nick_of.clear();
        out
    }

    /// A client's message as the room passes it on: without what only the room may
    /// say (its `muc#user` elements, its stanza ids, its delays).
    fn relayed(&self, message: &Element) -> Element {
        let room = self.jid.as_str();
        let mut m = Element::bare(message.name(), message.ns());
        for ((attr_ns, name), value) in message.attrs().iter() {
            m.set_attr(attr_ns.clone(), name.clone(), value.as_str());
        }
        // The room's address however it is written (JIDs compare normalised).
        let is_room = |a: Option<&str>| a.is_some_and(|a| crate::core::archive::same_jid(a, room));
        for child in message.children() {
            let forged = child.ns() == NS_USER
                || child.ns() == NS_OCCUPANT_ID
                || child.ns() == NS_ADDRESS
                || child.ns() == NS_MODERATE
                || child.ns() == "urn:xmpp:message-moderate:0"
                || (child.is("retract", NS_RETRACT) && child.has_child("moderated", NS_MODERATE))
                || (child.is("apply-to", "urn:xmpp:fasten:0")
                    && child.has_child("moderated", "urn:xmpp:message-moderate:0"))
                || (child.is("stanza-id", SID) && is_room(child.attr("by")))
                || (child.is("delay", DELAY) && is_room(child.attr("from")));
            if !forged {
                m.append_child(child.clone());
            }
        }
        m
    }

    /// Every session in the room.
    fn sessions(&self) -> impl Iterator<Item = FullJid> + '_ {
        self.occupants
            .values()
            .flat_map(|o| o.sessions.iter().cloned())
    }

    fn is_moderator(&self, session: &FullJid) -> bool {
        self.nick_of
            .get(session)
            .and_then(|n| self.occupants.get(n))
            .is_some_and(|o| o.role == Role::Moderator)
    }

    /// `occupant`'s presence as `to` sees it: from its occupant JID, with its
    /// affiliation and role, its real JID when the room shows it to `to`, and `codes`.
    fn presence_of(
        &self,
        occupant: &Occupant,
        to: &FullJid,
        sees_jids: bool,
        codes: &[u16],
        new_nick: Option<&str>,
    ) -> Element {
        let mut p = occupant.presence.clone();
        if let Some(jid) = self.occupant_jid(&occupant.nick) {
            stanza::set_attr(&mut p, "from", &jid.to_string());
        }
        stanza::set_attr(&mut p, "to", &to.to_string());
        let mut item = Element::builder("item", NS_USER)
            .attr(
                rxml::xml_ncname!("affiliation").to_owned(),
                occupant.affiliation.as_str(),
            )
            .attr(rxml::xml_ncname!("role").to_owned(), occupant.role.as_str())
            .build();
        if sees_jids || self.config.whois_anyone {
            let real = occupant
                .sessions
                .iter()
                .find(|s| *s == to)
                .or(occupant.sessions.first());
            if let Some(real) = real {
                stanza::set_attr(&mut item, "jid", &real.to_string());
            }
        }
        if let Some(new_nick) = new_nick {
            stanza::set_attr(&mut item, "nick", new_nick);
        }
        let mut x = Element::builder("x", NS_USER).append(item).build();
        for code in codes {
            x.append_child(
                Element::builder("status", NS_USER)
                    .attr(rxml::xml_ncname!("code").to_owned(), code.to_string())
                    .build(),
            );
        }
        p.append_child(x);
        p.append_child(self.occupant_id_el(&occupant.bare));
        p
    }

    /// The history an entering occupant asked for, oldest first: the latest messages
    /// within every limit it gave.
    fn history_for(&self, asked: &History, now: i64) -> Vec<&Kept> {
        let max_stanzas = asked.max_stanzas.unwrap_or(usize::MAX);
        let max_chars = asked.max_chars.unwrap_or(usize::MAX).min(MAX_HISTORY_CHARS);
        let since = [
            asked.since,
            asked.seconds.map(|s| {
                now.saturating_sub(
                    i64::try_from(s)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1_000_000),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .max();
        let mut chars = 0;
        let mut kept: Vec<&Kept> = self
            .history
            .iter()
            .rev()
            .take(max_stanzas)
            .take_while(|k| since.is_none_or(|s| k.micros >= s))
            .take_while(|k| {
                chars += k.chars;
                chars <= max_chars
            })
            .collect();
        kept.reverse();
        kept
    }

    /// The subject, as sent to an entering occupant (XEP-0045 §7.2.15): from whoever
    /// set it, empty from the room when none is set.
    fn subject_message(&self, to: &FullJid) -> Element {
        let (text, from) = match &self.subject {
            Some((text, nick)) => (
                text.as_str(),
                self.occupant_jid(nick)
                    .map_or(self.jid.to_string(), |j| j.to_string()),
            ),
            None => ("", self.jid.to_string()),
        };
        let mut m = Element::builder("message", ns::CLIENT)
            .append(Element::builder("subject", ns::CLIENT).append(text).build())
            .build();
        stanza::set_attr(&mut m, "from", &from);
        stanza::set_attr(&mut m, "to", &to.to_string());
        stanza::set_attr(&mut m, "type", "groupchat");
        m
    }
}

/// Puts `reason` in the `<item/>` of a room's presence (XEP-0045 §8.2, §9.1).
fn with_reason(presence: &mut Element, reason: Option<&str>) {
    let Some(reason) = reason else {
        return;
    };
    if let Some(item) = presence
        .get_child_mut("x", NS_USER)
        .and_then(|x| x.get_child_mut("item", NS_USER))
    {
        item.append_child(Element::builder("reason", NS_USER).append(reason).build());
    }
}

/// A client's presence as the room shows it: its show, status, priority and
/// extensions, without the MUC elements it sent to the room or any addressing.
/// Whether a message holds only chat states (XEP-0085), chat markers (XEP-0333) and
/// receipts (XEP-0184), and the hints that go with them.
fn only_notices(message: &Element) -> bool {
    message.children().all(|c| {
        matches!(
            c.ns().as_str(),
            "http://jabber.org/protocol/chatstates"
                | "urn:xmpp:chat-markers:0"
                | "urn:xmpp:receipts"
                | "urn:xmpp:hints"
                | "urn:xmpp:sid:0"
        )
    })
}

fn room_presence(presence: &Element) -> Element {
    let mut p = Element::bare("presence", ns::CLIENT);
    if let Some(t) = presence.attr("type") {
        stanza::set_attr(&mut p, "type", t);
    }
    for child in presence.children() {
        // The MUC elements it sent, and what only the room (or a server) may say.
        if [NS, NS_USER, NS_OCCUPANT_ID, NS_ADDRESS].contains(&child.ns().as_str()) {
            continue;
        }
        p.append_child(child.clone());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000;

    fn full(s: &str) -> FullJid {
        FullJid::new(s).unwrap()
    }

    fn bare(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    fn join_presence() -> Element {
        el("<presence xmlns='jabber:client'><show>chat</show>\
            <x xmlns='http://jabber.org/protocol/muc'/></presence>")
    }

    fn message(body: &str) -> Element {
        el(&format!(
            "<message xmlns='jabber:client' type='groupchat' to='team@conference.d'>\
             <body>{body}</body></message>"
        ))
    }

    /// An open room owned by alice, who is in it as "Alice".
    fn room_with_alice(config: Config) -> Room {
        let mut room = Room::create(bare("team@conference.d"), &bare("alice@d"), config);
        room.join(
            &full("alice@d/laptop"),
            "Alice",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        room.unlock();
        room
    }

    fn codes(p: &Element) -> Vec<String> {
        p.get_child("x", NS_USER)
            .map(|x| {
                x.children()
                    .filter(|c| c.name() == "status")
                    .filter_map(|c| c.attr("code").map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn item(p: &Element) -> &Element {
        p.get_child("x", NS_USER)
            .unwrap()
            .get_child("item", NS_USER)
            .unwrap()
    }

    fn to_and_from(out: &[Out]) -> Vec<(String, String, &str)> {
        out.iter()
            .map(|o| {
                (
                    o.to.to_string(),
                    o.stanza.attr("from").unwrap_or("").to_owned(),
                    o.stanza.name(),
                )
            })
            .collect()
    }

    #[test]
    fn the_creator_enters_a_locked_room_that_refuses_others_until_configured() {
        let mut room = Room::create(
            bare("team@conference.d"),
            &bare("alice@d"),
            Config::default(),
        );
        let out = room
            .join(
                &full("alice@d/laptop"),
                "Alice",
                &Join::default(),
                &join_presence(),
                NOW,
            )
            .unwrap();
        // Her own presence (owner, moderator, 110 and 201), then the empty subject.
        assert_eq!(out.len(), 2);
        let own = &out[0].stanza;
        assert_eq!(own.attr("from"), Some("team@conference.d/Alice"));
        assert_eq!(codes(own), ["110", "201"]);
        assert_eq!(item(own).attr("affiliation"), Some("owner"));
        assert_eq!(item(own).attr("role"), Some("moderator"));
        assert_eq!(item(own).attr("jid"), Some("alice@d/laptop"));
        // The show she sent is kept, the MUC element she sent is not.
        assert!(own.get_child("show", ns::CLIENT).is_some());
        assert!(own.get_child("x", NS).is_none());
        let subject = &out[1].stanza;
        assert_eq!(subject.attr("from"), Some("team@conference.d"));
        assert_eq!(subject.get_child("subject", ns::CLIENT).unwrap().text(), "");
        let bob = room.join(
            &full("bob@d/phone"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        );
        assert_eq!(bob, Err(StanzaErrorCondition::ItemNotFound));
        room.unlock();
        assert!(
            room.join(
                &full("bob@d/phone"),
                "Bob",
                &Join::default(),
                &join_presence(),
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn a_newcomer_gets_the_occupants_then_itself_and_everyone_learns_of_it() {
        let mut room = room_with_alice(Config::default());
        let out = room
            .join(
                &full("bob@d/phone"),
                "Bob",
                &Join::default(),
                &join_presence(),
                NOW,
            )
            .unwrap();
        let seen = to_and_from(&out);
        assert_eq!(
            seen,
            [
                (
                    "bob@d/phone".into(),
                    "team@conference.d/Alice".into(),
                    "presence"
                ),
                (
                    "alice@d/laptop".into(),
                    "team@conference.d/Bob".into(),
                    "presence"
                ),
                (
                    "bob@d/phone".into(),
                    "team@conference.d/Bob".into(),
                    "presence"
                ),
                ("bob@d/phone".into(), "team@conference.d".into(), "message"),
            ]
        );
        // Semi-anonymous: Bob does not see Alice's real JID; Alice, a moderator, sees
        // Bob's. Only Bob's own presence has 110 (and no 201: the room is not new).
        assert_eq!(item(&out[0].stanza).attr("jid"), None);
        assert_eq!(item(&out[1].stanza).attr("jid"), Some("bob@d/phone"));
        assert_eq!(codes(&out[1].stanza), Vec::<String>::new());
        assert_eq!(codes(&out[2].stanza), ["110"]);
        assert_eq!(item(&out[2].stanza).attr("role"), Some("participant"));
    }

    #[test]
    fn entry_is_refused_with_the_protocols_errors() {
        let config = Config {
            password: Some("s3cret".into()),
            max_users: 2,
            ..Config::default()
        };
        let mut room = room_with_alice(config);
        let p = join_presence();
        let with_password = Join {
            password: Some("s3cret".into()),
            ..Join::default()
        };
        assert_eq!(
            room.join(&full("bob@d/phone"), "Bob", &Join::default(), &p, NOW),
            Err(StanzaErrorCondition::NotAuthorized)
        );
        // Another account under a nick in use.
        assert_eq!(
            room.join(&full("bob@d/phone"), "Alice", &with_password, &p, NOW),
            Err(StanzaErrorCondition::Conflict)
        );
        assert_eq!(
            room.join(&full("bob@d/phone"), "", &with_password, &p, NOW),
            Err(StanzaErrorCondition::JidMalformed)
        );
        room.join(&full("bob@d/phone"), "Bob", &with_password, &p, NOW)
            .unwrap();
        // Full: two occupants.
        assert_eq!(
            room.join(&full("carol@d/x"), "Carol", &with_password, &p, NOW),
            Err(StanzaErrorCondition::ServiceUnavailable)
        );
        // An admin enters anyway.
        room.set_affiliation(bare("carol@d"), Affiliation::Admin);
        room.join(&full("carol@d/x"), "Carol", &with_password, &p, NOW)
            .unwrap();
        // Banned.
        room.set_affiliation(bare("dave@d"), Affiliation::Outcast);
        assert_eq!(
            room.join(&full("dave@d/x"), "Dave", &with_password, &p, NOW),
            Err(StanzaErrorCondition::Forbidden)
        );
        // Members only.
        room.config.members_only = true;
        assert_eq!(
            room.join(&full("erin@d/x"), "Erin", &with_password, &p, NOW),
            Err(StanzaErrorCondition::RegistrationRequired)
        );
        assert_eq!(
            StanzaErrorCondition::RegistrationRequired.error_type(),
            "auth"
        );
        // Nothing changed for those refused.
        let nicks: Vec<&str> = room.occupants().map(|o| o.nick.as_str()).collect();
        assert_eq!(nicks, ["Alice", "Bob", "Carol"]);
    }

    #[test]
    fn messages_reach_every_session_and_history_meets_every_limit() {
        let mut room = room_with_alice(Config::default());
        let p = join_presence();
        room.join(&full("bob@d/phone"), "Bob", &Join::default(), &p, NOW)
            .unwrap();
        // Bob's laptop shares his nick; both his sessions see it as his own (110).
        let out = room
            .join(&full("bob@d/laptop"), "Bob", &Join::default(), &p, NOW)
            .unwrap();
        for session in ["bob@d/phone", "bob@d/laptop"] {
            let own = out
                .iter()
                .find(|o| {
                    o.to == full(session) && o.stanza.attr("from") == Some("team@conference.d/Bob")
                })
                .unwrap();
            assert_eq!(codes(&own.stanza), ["110"], "{session}");
        }
        for (i, body) in ["one", "two", "three"].into_iter().enumerate() {
            let at = NOW + i64::try_from(i).unwrap() * 60_000_000;
            let out = room
                .groupchat(&full("alice@d/laptop"), &message(body), at, "sid")
                .unwrap();
            let mut to: Vec<String> = out.iter().map(|o| o.to.to_string()).collect();
            to.sort();
            assert_eq!(to, ["alice@d/laptop", "bob@d/laptop", "bob@d/phone"]);
            assert!(
                out.iter()
                    .all(|o| o.stanza.attr("from") == Some("team@conference.d/Alice"))
            );
        }
        let bodies = |out: &[Out]| -> Vec<String> {
            out.iter()
                .filter(|o| o.stanza.name() == "message")
                .filter_map(|o| o.stanza.get_child("body", ns::CLIENT).map(|b| b.text()))
                .collect()
        };
        let later = NOW + 180_000_000;
        let enter = |room: &mut Room, who: &str, history: History| {
            let join = Join {
                history,
                ..Join::default()
            };
            let out = room.join(&full(who), "Carol", &join, &p, later).unwrap();
            room.leave(
                &full(who),
                &el("<presence xmlns='jabber:client' type='unavailable'/>"),
                NOW,
            );
            out
        };
        let all = enter(&mut room, "carol@d/a", History::default());
        assert_eq!(bodies(&all), ["one", "two", "three"]);
        let delay = all[all.len() - 2].stanza.get_child("delay", DELAY).unwrap();
        assert_eq!(delay.attr("from"), Some("team@conference.d"));
        let last = History {
            max_stanzas: Some(1),
            ..History::default()
        };
        assert_eq!(bodies(&enter(&mut room, "carol@d/a", last)), ["three"]);
        let recent = History {
            seconds: Some(150),
            ..History::default()
        };
        assert_eq!(
            bodies(&enter(&mut room, "carol@d/a", recent)),
            ["two", "three"]
        );
        let none = History {
            max_chars: Some(0),
            ..History::default()
        };
        assert!(bodies(&enter(&mut room, "carol@d/a", none)).is_empty());
        // History keeps history_length messages.
        room.config.history_length = 2;
        room.groupchat(&full("alice@d/laptop"), &message("four"), later, "sid")
            .unwrap();
        assert_eq!(
            bodies(&enter(&mut room, "carol@d/a", History::default())),
            ["three", "four"]
        );
    }

    /// Who may send private messages: one name each way, in forms and in the store.
    #[test]
    fn private_message_settings_have_one_name_each() {
        for p in [
            PrivateMessages::Anyone,
            PrivateMessages::Participants,
            PrivateMessages::Moderators,
            PrivateMessages::Nobody,
        ] {
            assert_eq!(PrivateMessages::parse(p.as_str()), Some(p));
        }
        assert_eq!(PrivateMessages::parse("everyone"), None);
    }

    fn voice_form(fields: &[(&str, &str)]) -> Element {
        let mut xml = String::from("<x xmlns='jabber:x:data' type='submit'>");
        for (var, value) in fields {
            xml.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
        }
        xml.push_str("</x>");
        el(&xml)
    }

    /// XEP-0045 §7.13, §8.6: a visitor asks for voice; each moderator gets the form;
    /// asking again adds nothing; a participant's approval is refused; a moderator's
    /// denial changes nothing; a moderator's approval gives voice, seen by everyone.
    #[test]
    fn visitors_ask_for_voice_and_moderators_give_it() {
        let config = Config {
            moderated: true,
            ..Config::default()
        };
        let mut room = room_with_alice(config);
        for (who, nick) in [("bob@d/phone", "Bob"), ("carol@d/x", "Carol")] {
            room.join(&full(who), nick, &Join::default(), &join_presence(), NOW)
                .unwrap();
        }
        let request = voice_form(&[("FORM_TYPE", NS_REQUEST), ("muc#role", "participant")]);
        assert!(is_voice_form(&request));
        let out = room.voice_request(&full("bob@d/phone"), &request).unwrap();
        assert_eq!(out.len(), 1, "one moderator");
        assert_eq!(out[0].to, full("alice@d/laptop"));
        let form = out[0].stanza.get_child("x", ns::DATA_FORMS).unwrap();
        let value = |var: &str| {
            form.children()
                .find(|f| f.attr("var") == Some(var))
                .and_then(|f| f.get_child("value", ns::DATA_FORMS))
                .map(Element::text)
        };
        assert_eq!(value("muc#roomnick").as_deref(), Some("Bob"));
        assert_eq!(value("muc#jid").as_deref(), Some("bob@d/phone"));
        assert_eq!(value("muc#request_allow").as_deref(), Some("false"));
        assert!(
            room.voice_request(&full("bob@d/phone"), &request)
                .unwrap()
                .is_empty()
        );
        // Alice makes Carol a participant by hand; then only a moderator may answer.
        room.admin_set(
            &full("alice@d/laptop"),
            &[(
                Change::Role {
                    nick: "Carol".into(),
                    role: Role::Participant,
                },
                None,
            )],
        )
        .unwrap();
        assert_eq!(
            room.voice_request(&full("carol@d/x"), &request),
            Err(StanzaErrorCondition::NotAcceptable),
            "a participant has voice"
        );
        let answer = |allow: &str| {
            voice_form(&[
                ("FORM_TYPE", NS_REQUEST),
                ("muc#role", "participant"),
                ("muc#jid", "bob@d/phone"),
                ("muc#roomnick", "Bob"),
                ("muc#request_allow", allow),
            ])
        };
        assert_eq!(
            room.voice_request(&full("carol@d/x"), &answer("true")),
            Err(StanzaErrorCondition::Forbidden)
        );
        assert!(
            room.voice_request(&full("alice@d/laptop"), &answer("false"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(room.role_of(&full("bob@d/phone")), Role::Visitor);
        // Denied, the request is over: Bob asks again, Alice approves.
        room.voice_request(&full("bob@d/phone"), &request).unwrap();
        let out = room
            .voice_request(&full("alice@d/laptop"), &answer("true"))
            .unwrap();
        assert_eq!(room.role_of(&full("bob@d/phone")), Role::Participant);
        assert_eq!(out.len(), 3, "everyone sees Bob's new role");
        assert!(
            room.groupchat(&full("bob@d/phone"), &message("at last"), NOW, "sid")
                .is_ok()
        );
        // A form of another type is not a voice request.
        assert!(!is_voice_form(&voice_form(&[("FORM_TYPE", FORM_TYPE)])));
    }

    #[test]
    fn visitors_are_silent_and_subjects_are_for_moderators() {
        let config = Config {
            moderated: true,
            ..Config::default()
        };
        let mut room = room_with_alice(config);
        room.join(
            &full("bob@d/phone"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        assert_eq!(
            room.groupchat(&full("bob@d/phone"), &message("hi"), NOW, "sid"),
            Err(StanzaErrorCondition::Forbidden)
        );
        // Not in the room at all.
        assert_eq!(
            room.groupchat(&full("eve@d/x"), &message("hi"), NOW, "sid"),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        room.config.moderated = false;
        room.set_affiliation(bare("carol@d"), Affiliation::Member);
        room.join(
            &full("carol@d/x"),
            "Carol",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        let subject = el(
            "<message xmlns='jabber:client' type='groupchat'><subject>Plans</subject></message>",
        );
        assert_eq!(
            room.groupchat(&full("carol@d/x"), &subject, NOW, "sid"),
            Err(StanzaErrorCondition::Forbidden)
        );
        room.groupchat(&full("alice@d/laptop"), &subject, NOW, "sid")
            .unwrap();
        let out = room
            .join(
                &full("dave@d/x"),
                "Dave",
                &Join::default(),
                &join_presence(),
                NOW,
            )
            .unwrap();
        let last = &out.last().unwrap().stanza;
        assert_eq!(
            last.get_child("subject", ns::CLIENT).unwrap().text(),
            "Plans"
        );
        assert_eq!(last.attr("from"), Some("team@conference.d/Alice"));
        // A subject is not history.
        assert_eq!(
            out.iter().filter(|o| o.stanza.name() == "message").count(),
            1
        );
    }

    #[test]
    fn a_nick_change_is_unavailable_with_303_then_available() {
        let mut room = room_with_alice(Config::default());
        room.join(
            &full("bob@d/phone"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        assert_eq!(
            room.update(&full("bob@d/phone"), "Alice", &join_presence(), NOW),
            Err(StanzaErrorCondition::Conflict)
        );
        let out = room
            .update(&full("bob@d/phone"), "Robert", &join_presence(), NOW)
            .unwrap();
        let gone: Vec<&Out> = out
            .iter()
            .filter(|o| o.stanza.attr("type") == Some("unavailable"))
            .collect();
        assert_eq!(gone.len(), 2);
        for o in &gone {
            assert_eq!(o.stanza.attr("from"), Some("team@conference.d/Bob"));
            assert_eq!(item(&o.stanza).attr("nick"), Some("Robert"));
        }
        let to_bob = gone.iter().find(|o| o.to == full("bob@d/phone")).unwrap();
        assert_eq!(codes(&to_bob.stanza), ["303", "110"]);
        let back: Vec<&Out> = out
            .iter()
            .filter(|o| o.stanza.attr("type").is_none())
            .collect();
        assert_eq!(back.len(), 2);
        assert!(
            back.iter()
                .all(|o| o.stanza.attr("from") == Some("team@conference.d/Robert"))
        );
        assert_eq!(room.nick_of(&full("bob@d/phone")), Some("Robert"));
        // The old nick is free again.
        room.join(
            &full("carol@d/x"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn leaving_tells_everyone_once_the_last_session_goes() {
        let mut room = room_with_alice(Config::default());
        let p = join_presence();
        room.join(&full("bob@d/phone"), "Bob", &Join::default(), &p, NOW)
            .unwrap();
        room.join(&full("bob@d/laptop"), "Bob", &Join::default(), &p, NOW)
            .unwrap();
        let bye = el(
            "<presence xmlns='jabber:client' type='unavailable'><status>later</status></presence>",
        );
        let out = room.leave(&full("bob@d/phone"), &bye, NOW);
        assert_eq!(
            to_and_from(&out),
            [(
                "bob@d/phone".into(),
                "team@conference.d/Bob".into(),
                "presence"
            )]
        );
        assert_eq!(codes(&out[0].stanza), ["110"]);
        let out = room.leave(&full("bob@d/laptop"), &bye, NOW);
        let mut to: Vec<String> = out.iter().map(|o| o.to.to_string()).collect();
        to.sort();
        assert_eq!(to, ["alice@d/laptop", "bob@d/laptop"]);
        assert!(
            out.iter()
                .all(|o| o.stanza.attr("type") == Some("unavailable"))
        );
        assert!(
            out.iter()
                .all(|o| o.stanza.get_child("status", ns::CLIENT).unwrap().text() == "later")
        );
        room.leave(&full("alice@d/laptop"), &bye, NOW);
        assert!(room.is_empty());
        // Leaving twice, or without having entered, sends nothing.
        assert!(room.leave(&full("alice@d/laptop"), &bye, NOW).is_empty());
    }

    #[test]
    fn private_messages_follow_the_rooms_rule() {
        let mut room = room_with_alice(Config::default());
        room.join(
            &full("bob@d/phone"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        let pm = el(
            "<message xmlns='jabber:client' type='chat' to='team@conference.d/Alice'><body>psst</body></message>",
        );
        let out = room
            .private(&full("bob@d/phone"), "Alice", &pm, NOW)
            .unwrap();
        assert_eq!(
            to_and_from(&out),
            [(
                "alice@d/laptop".into(),
                "team@conference.d/Bob".into(),
                "message"
            )]
        );
        assert!(out[0].stanza.get_child("x", NS_USER).is_some());
        assert_eq!(
            room.private(&full("bob@d/phone"), "Nobody", &pm, NOW),
            Err(StanzaErrorCondition::ItemNotFound)
        );
        assert_eq!(
            room.private(&full("eve@d/x"), "Alice", &pm, NOW),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        room.config.private_messages = PrivateMessages::Moderators;
        assert_eq!(
            room.private(&full("bob@d/phone"), "Alice", &pm, NOW),
            Err(StanzaErrorCondition::Forbidden)
        );
        assert!(
            room.private(&full("alice@d/laptop"), "Bob", &pm, NOW)
                .is_ok()
        );
        room.config.private_messages = PrivateMessages::Nobody;
        assert_eq!(
            room.private(&full("alice@d/laptop"), "Bob", &pm, NOW),
            Err(StanzaErrorCondition::Forbidden)
        );
    }

    #[test]
    fn what_only_the_room_may_say_is_not_relayed() {
        let mut room = room_with_alice(Config::default());
        let forged = el(
            "<message xmlns='jabber:client' type='groupchat'><body>hi</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='team@conference.d' id='x'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='TEAM@Conference.D' id='x2'/>\
             <retract xmlns='urn:xmpp:message-retract:1' id='s0'><moderated xmlns='urn:xmpp:message-moderate:1' by='team@conference.d/Alice'/></retract>\
             <moderated xmlns='urn:xmpp:message-moderate:1'/>\
             <apply-to xmlns='urn:xmpp:fasten:0' id='s0'><moderated xmlns='urn:xmpp:message-moderate:0' by='team@conference.d/Alice'/></apply-to>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='alice@d' id='y'/>\
             <delay xmlns='urn:xmpp:delay' from='team@conference.d' stamp='2020-01-01T00:00:00Z'/>\
             <occupant-id xmlns='urn:xmpp:occupant-id:0' id='someone-else'/>\
             <addresses xmlns='http://jabber.org/protocol/address'><address type='bcc' jid='x@d/r'/></addresses>\
             <x xmlns='http://jabber.org/protocol/muc#user'><status code='110'/></x></message>",
        );
        let out = room
            .groupchat(&full("alice@d/laptop"), &forged, NOW, "sid")
            .unwrap();
        let m = &out[0].stanza;
        let kept: Vec<(&str, Option<&str>)> = m
            .children()
            .map(|c| (c.name(), c.attr("by").or(c.attr("id"))))
            .collect();
        let alice = room.occupant_id(&bare("alice@d"));
        // The room's own stanza id (XEP-0359) is the one it gave, not the forged one.
        assert_eq!(
            kept,
            [
                ("body", None),
                ("stanza-id", Some("alice@d")),
                ("occupant-id", Some(alice.as_str())),
                ("stanza-id", Some("team@conference.d")),
            ]
        );
        let sid = crate::core::archive::stanza_id(m, "team@conference.d");
        assert_eq!(sid, Some("sid"));
        // Newcomers get it in the history too.
        let out = room
            .join(
                &full("bob@d/x"),
                "Bob",
                &Join::default(),
                &join_presence(),
                NOW,
            )
            .unwrap();
        let kept = out
            .iter()
            .find(|o| o.stanza.get_child("body", ns::CLIENT).is_some())
            .unwrap();
        assert_eq!(
            crate::core::archive::stanza_id(&kept.stanza, "team@conference.d"),
            Some("sid")
        );
    }

    /// XEP-0421: every presence and message of an occupant names its account by the
    /// same opaque id, whatever the session or nick; another account, another id;
    /// another secret (another room), another id; an id a client sends in its
    /// presence is not passed on.
    #[test]
    fn occupants_are_named_by_an_opaque_id_of_their_account() {
        let mut room = room_with_alice(Config::default());
        room.set_occupant_key([7; 32]);
        let alice = room.occupant_id(&bare("alice@d"));
        assert!(!alice.contains("alice") && alice.len() == 24, "{alice}");
        let forged = el(
            "<presence xmlns='jabber:client'><occupant-id xmlns='urn:xmpp:occupant-id:0' id='fake'/></presence>",
        );
        let out = room
            .join(&full("bob@d/phone"), "Bob", &Join::default(), &forged, NOW)
            .unwrap();
        let bob = room.occupant_id(&bare("bob@d"));
        assert_ne!(alice, bob);
        // The room's own messages (the subject) name no occupant.
        for o in out.iter().filter(|o| o.stanza.name() == "presence") {
            let ids: Vec<&str> = o
                .stanza
                .children()
                .filter(|c| c.is("occupant-id", NS_OCCUPANT_ID))
                .filter_map(|c| c.attr("id"))
                .collect();
            let from = o.stanza.attr("from").unwrap_or_default();
            let expected = if from.ends_with("/Bob") { &bob } else { &alice };
            assert_eq!(ids, [expected.as_str()], "{}", String::from(&o.stanza));
        }
        let said = room
            .groupchat(&full("bob@d/phone"), &message("hi"), NOW, "sid")
            .unwrap();
        assert!(said.iter().all(|o| {
            o.stanza
                .get_child("occupant-id", NS_OCCUPANT_ID)
                .and_then(|c| c.attr("id"))
                == Some(bob.as_str())
        }));
        // Another room has another secret (the service derives one per room).
        room.set_occupant_key([8; 32]);
        assert_ne!(room.occupant_id(&bare("alice@d")), alice);
    }

    /// One occupant flapping its presence 10,000 times, or flooding the room, costs
    /// the others its allowance and no more; the room still shows its newest status.
    #[test]
    fn an_occupants_floods_are_held_to_its_allowance() {
        let mut room = room_with_alice(Config::default());
        let second = Rate::per_second(1.0, 3);
        room.set_rates(Rates {
            messages: second,
            presence: second,
        });
        let (bob, carol) = (full("bob@d/phone"), full("carol@d/pc"));
        for (who, nick) in [(&bob, "Bob"), (&carol, "Carol")] {
            room.join(who, nick, &Join::default(), &join_presence(), NOW)
                .unwrap();
        }
        let status = |show: &str| {
            el(&format!(
                "<presence xmlns='jabber:client'><show>{show}</show></presence>"
            ))
        };
        // Bob's entry used one of three; two changes pass, then the rest wait.
        let mut seen_by_carol = 0;
        for i in 0..10_000 {
            let show = if i % 2 == 0 { "away" } else { "dnd" };
            let out = room.update(&bob, "Bob", &status(show), NOW).unwrap();
            seen_by_carol += out.iter().filter(|o| o.to == carol).count();
        }
        assert_eq!(seen_by_carol, 2);
        // Carol still speaks, and newcomers see Bob's newest status.
        assert!(room.groupchat(&carol, &message("hi"), NOW, "sid").is_ok());
        let dave = full("dave@d/x");
        let out = room
            .join(&dave, "Dave", &Join::default(), &join_presence(), NOW)
            .unwrap();
        let of_bob = out
            .iter()
            .find(|o| o.stanza.attr("from") == Some("team@conference.d/Bob"))
            .unwrap();
        assert_eq!(
            of_bob.stanza.get_child("show", ns::CLIENT).unwrap().text(),
            "dnd"
        );
        // The newest waits for the allowance: one second, then once.
        assert_eq!(room.next_due(), Some(NOW + 1_000_000));
        assert!(room.due(NOW + 999_999).is_empty());
        let out = room.due(NOW + 1_000_000);
        assert_eq!(out.len(), 4, "to each session");
        assert!(out.iter().all(|o| {
            o.stanza
                .get_child("show", ns::CLIENT)
                .is_some_and(|s| s.text() == "dnd")
        }));
        assert_eq!(room.next_due(), None);
        assert!(room.due(NOW + 5_000_000).is_empty());

        // A change of nick over the allowance is refused, and so is entering again
        // after leaving: leaving is no way around it.
        let bye = el("<presence xmlns='jabber:client' type='unavailable'/>");
        assert_eq!(
            room.update(&bob, "Robert", &status("away"), NOW + 1_000_000),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        assert!(!room.leave(&bob, &bye, NOW + 1_000_000).is_empty());
        assert_eq!(
            room.join(
                &bob,
                "Bob",
                &Join::default(),
                &join_presence(),
                NOW + 1_000_000
            ),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        assert!(
            room.join(
                &bob,
                "Bob",
                &Join::default(),
                &join_presence(),
                NOW + 2_000_000
            )
            .is_ok()
        );

        // Messages: three at once, then one a second; the refused ones change
        // nothing (no subject, no history).
        let t = NOW + 10_000_000;
        for _ in 0..3 {
            assert!(room.groupchat(&bob, &message("spam"), t, "sid").is_ok());
        }
        let subject =
            el("<message xmlns='jabber:client' type='groupchat'><subject>x</subject></message>");
        room.config.subject_by_anyone = true;
        assert_eq!(
            room.groupchat(&bob, &subject, t, "sid"),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        assert_eq!(room.subject(), None);
        assert_eq!(
            room.private(&bob, "Carol", &message("psst"), t),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        let kept = room.history.len();
        assert!(room.groupchat(&bob, &message("spam"), t, "sid").is_err());
        assert_eq!(room.history.len(), kept);
        // Others are not held by Bob's use.
        assert!(room.private(&carol, "Bob", &message("hush"), t).is_ok());
        assert!(
            room.groupchat(&bob, &message("later"), t + 1_000_000, "sid")
                .is_ok()
        );
        // Chat states beyond the allowance are dropped, not refused.
        let typing = el("<message xmlns='jabber:client' type='groupchat'>\
            <composing xmlns='http://jabber.org/protocol/chatstates'/></message>");
        assert_eq!(
            room.groupchat(&bob, &typing, t + 1_000_000, "sid"),
            Ok(vec![])
        );
        // A reaction has no body but is no passing notice: refused, not dropped.
        let reaction = el("<message xmlns='jabber:client' type='groupchat'>\
            <reactions xmlns='urn:xmpp:reactions:0' id='x'><reaction>+1</reaction></reactions></message>");
        assert_eq!(
            room.groupchat(&bob, &reaction, t + 1_000_000, "sid"),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        // The allowances are the account's: neither another nick from another
        // session nor leaving and entering again gives a new one.
        let t = t + 11_000_000;
        let tablet = full("bob@d/tablet");
        room.join(&tablet, "Bob2", &Join::default(), &join_presence(), t)
            .unwrap();
        assert!((0..3).all(|_| room.groupchat(&tablet, &message("x"), t, "sid").is_ok()));
        assert_eq!(
            room.groupchat(&bob, &message("x"), t, "sid"),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        room.leave(&tablet, &bye, t);
        room.join(
            &tablet,
            "Bob2",
            &Join::default(),
            &join_presence(),
            t + 1_000_000,
        )
        .unwrap();
        assert!(
            room.groupchat(&tablet, &message("x"), t + 1_000_000, "sid")
                .is_ok()
        );
        assert_eq!(
            room.groupchat(&tablet, &message("x"), t + 1_000_000, "sid"),
            Err(StanzaErrorCondition::ResourceConstraint)
        );
        // A session entering again beyond the allowance is not refused: it gets the
        // room anew, and the others hear nothing.
        let t = t + 1_000_000;
        while room
            .update(&tablet, "Bob2", &status("away"), t)
            .is_ok_and(|o| !o.is_empty())
        {}
        let out = room
            .join(&tablet, "Bob2", &Join::default(), &join_presence(), t)
            .unwrap();
        assert_eq!(out.len(), 1, "its own presence only");
        assert!(out[0].to == tablet && codes(&out[0].stanza).contains(&"110".to_owned()));
        assert!(room.next_due().is_some(), "the others hear of it later");
    }

    /// Who reads a room's archive: its occupants, and those it would let in without
    /// a password.
    #[test]
    fn the_archive_is_read_by_those_the_room_lets_in() {
        let mut room = room_with_alice(Config::default());
        let (alice, bob) = (full("alice@d/laptop"), full("bob@d/phone"));
        assert!(room.may_read_archive(&alice) && room.may_read_archive(&bob));
        room.set_affiliation(bare("bob@d"), Affiliation::Outcast);
        assert!(!room.may_read_archive(&bob));
        room.set_affiliation(bare("bob@d"), Affiliation::None);
        room.config.members_only = true;
        assert!(!room.may_read_archive(&bob));
        room.set_affiliation(bare("bob@d"), Affiliation::Member);
        assert!(room.may_read_archive(&bob));
        room.config.password = Some("pw".into());
        assert!(!room.may_read_archive(&bob));
        assert!(room.may_read_archive(&alice), "an occupant");
        room.join(
            &bob,
            "Bob",
            &Join {
                password: Some("pw".into()),
                ..Join::default()
            },
            &join_presence(),
            NOW,
        )
        .unwrap();
        assert!(room.may_read_archive(&bob));
    }

    /// XEP-0425: a moderator retracts a message; others may not; the message leaves
    /// the history, and its tombstone names it, its author and the moderation.
    #[test]
    fn moderators_retract_messages() {
        let mut room = room_with_alice(Config::default());
        let bob = full("bob@d/phone");
        room.join(&bob, "Bob", &Join::default(), &join_presence(), NOW)
            .unwrap();
        let said = room.groupchat(&bob, &message("spam"), NOW, "s1").unwrap();
        let original = said[0].stanza.clone();
        let request = Moderation {
            id: "s1".into(),
            reason: Some("no ads".into()),
        };
        assert_eq!(
            room.moderation(&bob, &request),
            Err(StanzaErrorCondition::Forbidden)
        );
        let announcement = announced(
            &room.moderation(&full("alice@d/laptop"), &request).unwrap(),
            "s2",
            "team@conference.d",
        );
        assert_eq!(announcement.attr("from"), Some("team@conference.d"));
        let retract = announcement.get_child("retract", NS_RETRACT).unwrap();
        assert_eq!(retract.attr("id"), Some("s1"));
        let moderated = retract.get_child("moderated", NS_MODERATE).unwrap();
        assert_eq!(moderated.attr("by"), Some("team@conference.d/Alice"));
        let alice_id = room.occupant_id(&bare("alice@d"));
        assert_eq!(
            moderated
                .get_child("occupant-id", NS_OCCUPANT_ID)
                .and_then(|o| o.attr("id")),
            Some(alice_id.as_str())
        );
        assert_eq!(
            crate::core::archive::stanza_id(&announcement, "team@conference.d"),
            Some("s2")
        );
        assert!(crate::core::archive::archivable_in_room(&announcement));
        assert_eq!(room.broadcast(&announcement).len(), 2);
        // Out of the history: a newcomer does not get it.
        assert!(room.remembers("s1"));
        assert!(room.forget_message("s1").is_some());
        assert!(!room.remembers("s1"));
        assert!(room.forget_message("s1").is_none());
        let out = room
            .join(
                &full("carol@d/x"),
                "Carol",
                &Join::default(),
                &join_presence(),
                NOW,
            )
            .unwrap();
        assert!(
            out.iter()
                .all(|o| o.stanza.get_child("body", ns::CLIENT).is_none())
        );
        // The tombstone: the author's address and occupant id, no body.
        let t = tombstone(&original, &announcement, "2026-12-03T00:00:00Z");
        assert_eq!(t.attr("from"), Some("team@conference.d/Bob"));
        assert!(t.get_child("body", ns::CLIENT).is_none());
        let bob_id = room.occupant_id(&bare("bob@d"));
        assert_eq!(
            t.get_child("occupant-id", NS_OCCUPANT_ID)
                .and_then(|o| o.attr("id")),
            Some(bob_id.as_str())
        );
        let retracted = t.get_child("retracted", NS_RETRACT).unwrap();
        assert!(retracted.has_child("moderated", NS_MODERATE));
        assert_eq!(
            retracted.get_child("reason", NS_RETRACT).map(Element::text),
            Some("no ads".into())
        );
    }

    /// XEP-0045 §7.10, §7.12: registering reserves a nick (no other account takes
    /// it, to enter or by a change of nick) and makes a member; giving it up frees
    /// both; a ban frees the nick.
    #[test]
    fn registration_reserves_a_nick_and_makes_a_member() {
        let mut room = room_with_alice(Config::default());
        let (bob, carol) = (full("bob@d/phone"), full("carol@d/pc"));
        let form = room.registration_form(&bare("bob@d")).unwrap();
        let x = form.get_child("x", ns::DATA_FORMS).unwrap();
        assert!(
            x.children()
                .any(|f| f.attr("var") == Some("muc#register_roomnick"))
        );
        let submit = |nick: &str| {
            el(&format!(
                "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>{FORM_REGISTER}</value></field>\
                 <field var='muc#register_roomnick'><value>{nick}</value></field></x></query>"
            ))
        };
        // Alice holds "Alice": taken.
        assert_eq!(
            room.register(&bob, &submit("Alice")),
            Err(StanzaErrorCondition::Conflict)
        );
        assert_eq!(
            room.register(&bob, &el("<query xmlns='jabber:iq:register'/>")),
            Err(StanzaErrorCondition::BadRequest)
        );
        room.register(&bob, &submit("Bobby")).unwrap();
        assert_eq!(room.affiliation(&bare("bob@d")), Affiliation::Member);
        assert_eq!(room.reserved_nick(&bare("bob@d")), Some("Bobby"));
        let registered = room.registration_form(&bare("bob@d")).unwrap();
        assert!(registered.has_child("registered", ns::REGISTER));
        let info = room.reserved_nick_info(&bare("bob@d"));
        assert_eq!(
            info.get_child("identity", ns::DISCO_INFO)
                .and_then(|i| i.attr("name")),
            Some("Bobby")
        );
        assert!(
            room.reserved_nick_info(&bare("carol@d"))
                .children()
                .next()
                .is_none()
        );
        // Carol may neither enter as Bobby nor become Bobby.
        assert_eq!(
            room.join(&carol, "Bobby", &Join::default(), &join_presence(), NOW),
            Err(StanzaErrorCondition::Conflict)
        );
        room.join(&carol, "Carol", &Join::default(), &join_presence(), NOW)
            .unwrap();
        assert_eq!(
            room.update(&carol, "Bobby", &join_presence(), NOW),
            Err(StanzaErrorCondition::Conflict)
        );
        assert_eq!(
            room.register(&carol, &submit("Bobby")),
            Err(StanzaErrorCondition::Conflict)
        );
        // Nor under another spelling of it (a soft hyphen is mapped away).
        assert_eq!(
            room.register(&carol, &submit("Bo\u{AD}bby")),
            Err(StanzaErrorCondition::Conflict)
        );
        // Bob enters under his nick; Carol's registration while in the room shows
        // everyone her new affiliation.
        room.join(&bob, "Bobby", &Join::default(), &join_presence(), NOW)
            .unwrap();
        let out = room.register(&carol, &submit("Carol")).unwrap();
        assert!(
            out.iter()
                .any(|o| item(&o.stanza).attr("affiliation") == Some("member"))
        );
        // Giving it up frees the nick; the membership stays (admins take it away).
        room.register(
            &bob,
            &el("<query xmlns='jabber:iq:register'><remove/></query>"),
        )
        .unwrap();
        assert_eq!(room.affiliation(&bare("bob@d")), Affiliation::Member);
        assert_eq!(room.reserved_nick(&bare("bob@d")), None);
        // In a moderated room registering reserves a nick and gives no voice: a
        // visitor stays one.
        room.config.moderated = true;
        let eve = full("eve@d/x");
        room.join(&eve, "Eve", &Join::default(), &join_presence(), NOW)
            .unwrap();
        assert!(room.register(&eve, &submit("Eve")).unwrap().is_empty());
        assert_eq!(room.affiliation(&bare("eve@d")), Affiliation::None);
        assert_eq!(room.role_of(&eve), Role::Visitor);
        room.config.moderated = false;
        // A ban frees a nick; outcasts may not register.
        room.set_affiliation(bare("carol@d"), Affiliation::Outcast);
        assert_eq!(room.reserved_nick(&bare("carol@d")), None);
        assert_eq!(
            room.registration_form(&bare("carol@d")),
            Err(StanzaErrorCondition::Forbidden)
        );
        // Members-only: only members register.
        room.config.members_only = true;
        assert_eq!(
            room.register(&full("dave@d/x"), &submit("Dave")),
            Err(StanzaErrorCondition::NotAllowed)
        );
    }

    /// XEP-0486: owners set the room's vCard; occupants are told (104); the room
    /// names the SHA-1 of its photo; an empty vCard removes it.
    #[test]
    fn owners_give_rooms_avatars() {
        let mut room = room_with_three(Config::default());
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
        let card = el(&format!(
            "<vCard xmlns='vcard-temp'><PHOTO><TYPE>image/png</TYPE><BINVAL>{}\n{}</BINVAL></PHOTO></vCard>",
            &png[..40],
            &png[40..]
        ));
        assert_eq!(
            room.set_vcard(&full("bob@d/phone"), &card),
            Err(StanzaErrorCondition::Forbidden)
        );
        let out = room.set_vcard(&full("alice@d/laptop"), &card).unwrap();
        assert_eq!(out.len(), 3, "each session is told");
        assert!(out.iter().all(|o| codes(&o.stanza) == ["104"]));
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        let hash = crate::core::avatar::sha1_hex(&bytes);
        assert_eq!(room.avatar_hashes(), std::slice::from_ref(&hash));
        // Photos must carry an image, and a few at most.
        let empty = el("<vCard xmlns='vcard-temp'><PHOTO><BINVAL/></PHOTO></vCard>");
        assert_eq!(
            room.set_vcard(&full("alice@d/laptop"), &empty),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        let many = el(&format!(
            "<vCard xmlns='vcard-temp'>{}</vCard>",
            format!("<PHOTO><BINVAL>{png}</BINVAL></PHOTO>").repeat(5)
        ));
        assert_eq!(
            room.set_vcard(&full("alice@d/laptop"), &many),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        let form = stanza::serialize(&room.room_info_form().unwrap());
        assert!(
            form.contains("muc#roominfo_avatarhash") && form.contains(&hash),
            "{form}"
        );
        assert!(room.vcard().has_child("PHOTO", ns::VCARD));
        // The same again changes nothing; a photo that is not base64, or a vCard too
        // big, is refused and the avatar stays.
        assert!(
            room.set_vcard(&full("alice@d/laptop"), &card)
                .unwrap()
                .is_empty()
        );
        let bad = el("<vCard xmlns='vcard-temp'><PHOTO><BINVAL>!!</BINVAL></PHOTO></vCard>");
        assert_eq!(
            room.set_vcard(&full("alice@d/laptop"), &bad),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        let big = el(&format!(
            "<vCard xmlns='vcard-temp'><DESC>{}</DESC></vCard>",
            "x".repeat(MAX_VCARD_BYTES)
        ));
        assert_eq!(
            room.set_vcard(&full("alice@d/laptop"), &big),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        assert_eq!(room.avatar_hashes(), std::slice::from_ref(&hash));
        // Kept across a restart, hashes and all.
        let mut again = Room::restore(room.jid().clone(), room.config.clone(), [], None);
        again.restore_vcard(room.stored_vcard().map(str::to_owned));
        assert_eq!(again.avatar_hashes(), [hash]);
        // Empty: no avatar, no form.
        room.set_vcard(&full("alice@d/laptop"), &el("<vCard xmlns='vcard-temp'/>"))
            .unwrap();
        assert!(room.room_info_form().is_none() && room.stored_vcard().is_none());
    }

    #[test]
    fn history_keeps_at_most_its_bytes() {
        let config = Config {
            history_length: 1000,
            ..Config::default()
        };
        let mut room = room_with_alice(config);
        let big = "x".repeat(10_000);
        for i in 0..20 {
            room.groupchat(
                &full("alice@d/laptop"),
                &message(&big),
                NOW + i * 1_000_000,
                "sid",
            )
            .unwrap();
        }
        let kept: usize = room.history.iter().map(|k| k.chars).sum();
        assert!(kept <= MAX_KEPT_BYTES, "{kept}");
        assert_eq!(room.history.len(), MAX_KEPT_BYTES / 10_100);
    }

    #[test]
    fn a_destroyed_room_tells_every_session() {
        let mut room = room_with_alice(Config::default());
        let p = join_presence();
        room.join(&full("alice@d/phone"), "Alice", &Join::default(), &p, NOW)
            .unwrap();
        let venue = bare("team2@conference.d");
        let out = room.destroy(Some(&venue), Some("moved"));
        let mut to: Vec<String> = out.iter().map(|o| o.to.to_string()).collect();
        to.sort();
        assert_eq!(to, ["alice@d/laptop", "alice@d/phone"]);
        for o in &out {
            assert_eq!(o.stanza.attr("type"), Some("unavailable"));
            let x = o.stanza.get_child("x", NS_USER).unwrap();
            let destroy = x.get_child("destroy", NS_USER).unwrap();
            assert_eq!(destroy.attr("jid"), Some("team2@conference.d"));
            assert_eq!(
                destroy.get_child("reason", NS_USER).unwrap().text(),
                "moved"
            );
        }
        assert!(room.is_empty());
        assert_eq!(room.nick_of(&full("alice@d/phone")), None);
    }

    #[test]
    fn the_join_element_is_parsed() {
        let j = Join::parse(&el(
            "<presence xmlns='jabber:client'><x xmlns='http://jabber.org/protocol/muc'>\
             <password>pw</password>\
             <history maxstanzas='5' maxchars='100' seconds='60' since='2023-11-14T22:13:20Z'/>\
             </x></presence>",
        ));
        assert_eq!(j.password.as_deref(), Some("pw"));
        assert_eq!(
            j.history,
            History {
                max_stanzas: Some(5),
                max_chars: Some(100),
                seconds: Some(60),
                since: Some(NOW),
            }
        );
        assert_eq!(
            Join::parse(&el("<presence xmlns='jabber:client'/>")),
            Join::default()
        );
    }

    fn admin(xml: &str) -> Vec<(Change, Option<String>)> {
        parse_changes(&el(&format!(
            "<query xmlns='http://jabber.org/protocol/muc#admin'>{xml}</query>"
        )))
        .unwrap()
    }

    /// Alice owns the room; bob (a participant) and carol are in it.
    fn room_with_three(config: Config) -> Room {
        let mut room = room_with_alice(config);
        for (who, nick) in [("bob@d/pc", "Bob"), ("carol@d/pc", "Carol")] {
            room.join(&full(who), nick, &Join::default(), &join_presence(), NOW)
                .unwrap();
        }
        room
    }

    fn item_of<'a>(out: &'a [Out], to: &str, from_nick: &str) -> Option<&'a Element> {
        out.iter()
            .find(|o| {
                o.to.to_string() == to
                    && o.stanza.attr("from") == Some(&format!("team@conference.d/{from_nick}"))
            })
            .map(|o| &o.stanza)
    }

    #[test]
    fn a_moderator_kicks_and_an_admin_bans_with_their_reasons() {
        let mut room = room_with_three(Config::default());
        let alice = full("alice@d/laptop");
        // A participant may not kick.
        assert_eq!(
            room.admin_set(
                &full("bob@d/pc"),
                &admin("<item nick='Carol' role='none'/>")
            ),
            Err(StanzaErrorCondition::Forbidden)
        );
        assert_eq!(
            room.admin_set(&alice, &admin("<item nick='Nobody' role='none'/>")),
            Err(StanzaErrorCondition::ItemNotFound)
        );
        let out = room
            .admin_set(
                &alice,
                &admin("<item nick='Bob' role='none'><reason>spam</reason></item>"),
            )
            .unwrap();
        let to_bob = item_of(&out, "bob@d/pc", "Bob").unwrap();
        assert_eq!(to_bob.attr("type"), Some("unavailable"));
        assert_eq!(codes(to_bob), ["307", "110"]);
        assert_eq!(
            item(to_bob).get_child("reason", NS_USER).unwrap().text(),
            "spam"
        );
        assert_eq!(codes(item_of(&out, "carol@d/pc", "Bob").unwrap()), ["307"]);
        assert_eq!(room.nick_of(&full("bob@d/pc")), None);
        // A kicked occupant may come back; a banned one may not.
        room.join(
            &full("bob@d/pc"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        let out = room
            .admin_set(&alice, &admin("<item jid='bob@d' affiliation='outcast'/>"))
            .unwrap();
        let to_bob = item_of(&out, "bob@d/pc", "Bob").unwrap();
        assert_eq!(codes(to_bob), ["301", "110"]);
        assert_eq!(item(to_bob).attr("affiliation"), Some("outcast"));
        assert_eq!(
            room.join(
                &full("bob@d/other"),
                "Bobby",
                &Join::default(),
                &join_presence(),
                NOW
            ),
            Err(StanzaErrorCondition::Forbidden)
        );
        // The ban list, for admins only.
        let list = room
            .admin_get(&alice, &el("<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast'/></query>"))
            .unwrap();
        let jids: Vec<&str> = list.children().filter_map(|i| i.attr("jid")).collect();
        assert_eq!(jids, ["bob@d"]);
        assert_eq!(
            room.admin_get(&full("carol@d/pc"), &el("<query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast'/></query>")),
            Err(StanzaErrorCondition::Forbidden)
        );
        // Lifting the ban lets bob in again.
        room.admin_set(&alice, &admin("<item jid='bob@d' affiliation='none'/>"))
            .unwrap();
        room.join(
            &full("bob@d/pc"),
            "Bob",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn standing_decides_who_may_change_whom() {
        let mut room = room_with_three(Config::default());
        let alice = full("alice@d/laptop");
        // Carol made admin: a moderator who may ban others but not touch alice.
        let out = room
            .admin_set(&alice, &admin("<item jid='carol@d' affiliation='admin'/>"))
            .unwrap();
        let seen = item_of(&out, "bob@d/pc", "Carol").unwrap();
        assert_eq!(
            (item(seen).attr("affiliation"), item(seen).attr("role")),
            (Some("admin"), Some("moderator"))
        );
        let carol = full("carol@d/pc");
        for refused in [
            "<item nick='Alice' role='none'/>",
            "<item jid='alice@d' affiliation='outcast'/>",
            "<item jid='bob@d' affiliation='admin'/>",
        ] {
            assert_eq!(
                room.admin_set(&carol, &admin(refused)),
                Err(StanzaErrorCondition::NotAllowed),
                "{refused}"
            );
        }
        // All or nothing: a refused item undoes the items before it.
        assert_eq!(
            room.admin_set(
                &carol,
                &admin("<item jid='bob@d' affiliation='member'/><item jid='alice@d' affiliation='none'/>")
            ),
            Err(StanzaErrorCondition::NotAllowed)
        );
        assert_eq!(room.affiliation(&bare("bob@d")), Affiliation::None);
        // The last owner stays one.
        assert_eq!(
            room.admin_set(&alice, &admin("<item jid='alice@d' affiliation='admin'/>")),
            Err(StanzaErrorCondition::Conflict)
        );
        // Voice in a moderated room: bob, a newcomer, is a visitor until given it.
        room.config.moderated = true;
        room.join(
            &full("dave@d/pc"),
            "Dave",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        assert_eq!(
            room.groupchat(&full("dave@d/pc"), &message("hi"), NOW, "sid"),
            Err(StanzaErrorCondition::Forbidden)
        );
        room.admin_set(&carol, &admin("<item nick='Dave' role='participant'/>"))
            .unwrap();
        room.groupchat(&full("dave@d/pc"), &message("hi"), NOW, "sid")
            .unwrap();
        let voiced = room
            .admin_get(&carol, &el("<query xmlns='http://jabber.org/protocol/muc#admin'><item role='participant'/></query>"))
            .unwrap();
        let nicks: Vec<&str> = voiced.children().filter_map(|i| i.attr("nick")).collect();
        assert_eq!(nicks, ["Bob", "Dave"]);
        // The last owner may hand ownership over in one request, whatever the order.
        room.admin_set(
            &alice,
            &admin("<item jid='alice@d' affiliation='admin'/><item jid='carol@d' affiliation='owner'/>"),
        )
        .unwrap();
        assert_eq!(room.affiliation(&bare("carol@d")), Affiliation::Owner);
        // A moderator without affiliation (made one by an admin) kicks no member
        // and silences no one of its own standing.
        room.admin_set(
            &carol,
            &admin("<item jid='bob@d' affiliation='member'/><item nick='Dave' role='moderator'/>"),
        )
        .unwrap();
        room.join(
            &full("erin@d/pc"),
            "Erin",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        room.admin_set(&carol, &admin("<item nick='Erin' role='participant'/>"))
            .unwrap();
        let dave = full("dave@d/pc");
        for refused in [
            "<item nick='Bob' role='none'/>",
            "<item nick='Bob' role='visitor'/>",
            "<item nick='Erin' role='visitor'/>",
        ] {
            assert_eq!(
                room.admin_set(&dave, &admin(refused)),
                Err(StanzaErrorCondition::NotAllowed),
                "{refused}"
            );
        }
        room.admin_set(&dave, &admin("<item nick='Erin' role='none'/>"))
            .unwrap();
        // Malformed items.
        for bad in [
            "<query xmlns='http://jabber.org/protocol/muc#admin'/>",
            "<query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Bob' role='king'/></query>",
            "<query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Bob'/></query>",
        ] {
            assert_eq!(
                parse_changes(&el(bad)),
                Err(StanzaErrorCondition::BadRequest),
                "{bad}"
            );
        }
    }

    fn form(fields: &[(&str, &str)]) -> Element {
        let mut xml = format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{FORM_TYPE}</value></field>"
        );
        for (var, value) in fields {
            xml.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
        }
        xml.push_str("</x>");
        el(&xml)
    }

    const LIMITS: Limits = Limits {
        archive: true,
        max_users: 200,
        history_length: 20,
    };

    #[test]
    fn the_configuration_form_sets_what_it_names_and_refuses_what_it_cannot() {
        let mut room = room_with_three(Config::default());
        // The form shows the current values and offers limits within the service's.
        let shown = room.config_form(LIMITS);
        let value = |var: &str| {
            shown
                .children()
                .find(|f| f.attr("var") == Some(var))
                .and_then(|f| f.get_child("value", ns::DATA_FORMS))
                .map(Element::text)
        };
        assert_eq!(value("muc#roomconfig_maxusers").as_deref(), Some("200"));
        assert_eq!(
            value("muc#roomconfig_enablearchiving").as_deref(),
            Some("1")
        );
        let no_archive = room.config_form(Limits {
            archive: false,
            ..LIMITS
        });
        assert!(
            no_archive
                .children()
                .all(|f| f.attr("var") != Some("muc#roomconfig_enablearchiving"))
        );
        assert_eq!(value("muc#roomconfig_membersonly").as_deref(), Some("0"));
        let max_users = shown
            .children()
            .find(|f| f.attr("var") == Some("muc#roomconfig_maxusers"))
            .unwrap();
        assert!(max_users.children().all(|o| {
            o.name() != "option"
                || o.get_child("value", ns::DATA_FORMS)
                    .unwrap()
                    .text()
                    .parse::<usize>()
                    .unwrap()
                    <= 200
        }));
        // Refused, and nothing changes.
        for bad in [
            ("muc#roomconfig_maxusers", "201"),
            ("muc#roomconfig_maxusers", "0"),
            ("muc#maxhistoryfetch", "21"),
            ("muc#roomconfig_whois", "everyone"),
            ("muc#roomconfig_membersonly", "maybe"),
            ("muc#roomconfig_passwordprotectedroom", "1"),
        ] {
            assert_eq!(
                room.configure(&form(&[("muc#roomconfig_roomname", "x"), bad]), LIMITS),
                Err(StanzaErrorCondition::NotAcceptable),
                "{bad:?}"
            );
            assert_eq!(room.config, Config::default());
        }
        // A password, a name and real JIDs for everyone: everyone learns of it
        // (104 and 172); fields it does not know are ignored.
        let out = room
            .configure(
                &form(&[
                    ("muc#roomconfig_roomname", "Team"),
                    ("muc#roomconfig_passwordprotectedroom", "1"),
                    ("muc#roomconfig_roomsecret", "s3cret"),
                    ("muc#roomconfig_whois", "anyone"),
                    ("x-unknown#field", "1"),
                ]),
                LIMITS,
            )
            .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|o| codes(&o.stanza) == ["104", "172"]));
        assert_eq!(room.config.password.as_deref(), Some("s3cret"));
        assert_eq!(room.config.name, "Team");
        assert_eq!(
            room.join(
                &full("erin@d/pc"),
                "Erin",
                &Join::default(),
                &join_presence(),
                NOW
            ),
            Err(StanzaErrorCondition::NotAuthorized)
        );
        // Members only: bob, not a member, leaves with 322; alice and carol stay.
        room.admin_set(
            &full("alice@d/laptop"),
            &admin("<item jid='carol@d' affiliation='member'/>"),
        )
        .unwrap();
        let out = room
            .configure(&form(&[("muc#roomconfig_membersonly", "1")]), LIMITS)
            .unwrap();
        let to_bob = item_of(&out, "bob@d/pc", "Bob").unwrap();
        assert_eq!(codes(to_bob), ["322", "110"]);
        let nicks: Vec<&str> = room.occupants().map(|o| o.nick.as_str()).collect();
        assert_eq!(nicks, ["Alice", "Carol"]);
        // Turning the password off.
        room.configure(
            &form(&[("muc#roomconfig_passwordprotectedroom", "0")]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(room.config.password, None);
    }

    #[test]
    fn private_messages_for_participants_leave_visitors_out() {
        let mut room = room_with_three(Config {
            private_messages: PrivateMessages::Participants,
            ..Config::default()
        });
        room.config.moderated = true;
        room.join(
            &full("dave@d/pc"),
            "Dave",
            &Join::default(),
            &join_presence(),
            NOW,
        )
        .unwrap();
        let pm = el("<message xmlns='jabber:client' type='chat'><body>psst</body></message>");
        assert_eq!(
            room.private(&full("dave@d/pc"), "Bob", &pm, NOW),
            Err(StanzaErrorCondition::Forbidden)
        );
        assert!(room.private(&full("carol@d/pc"), "Bob", &pm, NOW).is_ok());
    }

    #[test]
    fn invitations_go_through_the_room_and_declines_back_to_the_inviter() {
        let invite = |to: &str| {
            el(&format!(
                "<message xmlns='jabber:client'><x xmlns='http://jabber.org/protocol/muc#user'>\
                 <invite to='{to}'><reason>join us</reason></invite></x></message>"
            ))
        };
        let decline = |to: &str| {
            el(&format!(
                "<message xmlns='jabber:client'><x xmlns='http://jabber.org/protocol/muc#user'>\
                 <decline to='{to}'><reason>busy</reason></decline></x></message>"
            ))
        };
        let mut room = room_with_three(Config::default());
        room.config.password = Some("pw".into());
        // Only occupants invite.
        assert_eq!(
            room.invite(&full("erin@d/pc"), &invite("dave@d"), NOW),
            Err(StanzaErrorCondition::NotAcceptable)
        );
        let out = room
            .invite(&full("bob@d/pc"), &invite("dave@d"), NOW)
            .unwrap();
        assert_eq!(out.len(), 1);
        let (to, m) = &out[0];
        assert_eq!(to.as_str(), "dave@d");
        assert_eq!(m.attr("from"), Some("team@conference.d"));
        let x = m.get_child("x", NS_USER).unwrap();
        let inv = x.get_child("invite", NS_USER).unwrap();
        assert_eq!(inv.attr("from"), Some("bob@d"));
        assert_eq!(inv.get_child("reason", NS_USER).unwrap().text(), "join us");
        assert_eq!(x.get_child("password", NS_USER).unwrap().text(), "pw");
        // A decline goes back to the inviter, once; one without an invitation is
        // refused (the room is no relay).
        let out = room
            .invite(&full("dave@d/phone"), &decline("bob@d"), NOW)
            .unwrap();
        assert_eq!(out[0].0.as_str(), "bob@d");
        let d = out[0]
            .1
            .get_child("x", NS_USER)
            .unwrap()
            .get_child("decline", NS_USER)
            .unwrap();
        assert_eq!(d.attr("from"), Some("dave@d"));
        for again in ["bob@d", "alice@d"] {
            assert_eq!(
                room.invite(&full("dave@d/phone"), &decline(again), NOW),
                Err(StanzaErrorCondition::NotAcceptable)
            );
        }
        // Members only: only admins and owners invite, and the invitee becomes a
        // member who may enter.
        room.config.members_only = true;
        assert_eq!(
            room.invite(&full("bob@d/pc"), &invite("erin@d"), NOW),
            Err(StanzaErrorCondition::Forbidden)
        );
        room.invite(&full("alice@d/laptop"), &invite("erin@d"), NOW)
            .unwrap();
        assert_eq!(room.affiliation(&bare("erin@d")), Affiliation::Member);
        let join = Join {
            password: Some("pw".into()),
            ..Join::default()
        };
        room.join(&full("erin@d/pc"), "Erin", &join, &join_presence(), NOW)
            .unwrap();
    }
}
