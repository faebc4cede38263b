//! Affiliations and roles changed and listed by IQ (XEP-0045 §8 to §10,
//! `muc#admin`): kicks, voice, moderators, members, admins, owners and bans.

use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use super::{Affiliation, Out, Refusal, Role, Room};
use crate::error::StanzaErrorCondition;
use crate::stanza;

/// XEP-0045's admin namespace.
pub const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
/// Items one request may change or name, at most.
const MAX_ITEMS: usize = 100;
/// Bytes of a reason, at most.
const MAX_REASON_BYTES: usize = 1024;

/// One change asked for in a `muc#admin` set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An occupant's role, by nick (`none` kicks it).
    Role { nick: String, role: Role },
    /// An account's affiliation, by bare JID (`outcast` bans it).
    Affiliation {
        jid: BareJid,
        affiliation: Affiliation,
    },
}

impl Change {
    /// Whether the change is to an affiliation (kept with the room), not a role.
    pub fn is_affiliation(&self) -> bool {
        matches!(self, Change::Affiliation { .. })
    }
}

/// An affiliation by its name in XEP-0045.
pub fn parse_affiliation(s: &str) -> Option<Affiliation> {
    affiliation(s)
}

fn role(s: &str) -> Option<Role> {
    Some(match s {
        "none" => Role::None,
        "visitor" => Role::Visitor,
        "participant" => Role::Participant,
        "moderator" => Role::Moderator,
        _ => return None,
    })
}

fn affiliation(s: &str) -> Option<Affiliation> {
    Some(match s {
        "outcast" => Affiliation::Outcast,
        "none" => Affiliation::None,
        "member" => Affiliation::Member,
        "admin" => Affiliation::Admin,
        "owner" => Affiliation::Owner,
        _ => return None,
    })
}

/// The changes of a `muc#admin` set, each with its reason; `bad-request` for an item
/// that names neither a nick with a role nor a JID with an affiliation.
pub fn parse_changes(query: &Element) -> Result<Vec<(Change, Option<String>)>, Refusal> {
    let items: Vec<&Element> = query
        .children()
        .filter(|c| c.is("item", NS_ADMIN))
        .collect();
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(StanzaErrorCondition::BadRequest);
    }
    items
        .into_iter()
        .map(|item| {
            let reason = item
                .get_child("reason", NS_ADMIN)
                .map(Element::text)
                .filter(|r| !r.is_empty());
            if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON_BYTES) {
                return Err(StanzaErrorCondition::NotAcceptable);
            }
            let change = match (
                item.attr("nick"),
                item.attr("role"),
                item.attr("jid"),
                item.attr("affiliation"),
            ) {
                (_, _, Some(jid), Some(a)) => Change::Affiliation {
                    jid: Jid::new(jid)
                        .map_err(|_| StanzaErrorCondition::JidMalformed)?
                        .to_bare(),
                    affiliation: affiliation(a).ok_or(StanzaErrorCondition::BadRequest)?,
                },
                (Some(nick), Some(r), _, None) => Change::Role {
                    nick: nick.to_owned(),
                    role: role(r).ok_or(StanzaErrorCondition::BadRequest)?,
                },
                _ => return Err(StanzaErrorCondition::BadRequest),
            };
            Ok((change, reason))
        })
        .collect()
}

impl Room {
    /// The role of `session` in the room (`none` when it is not in).
    pub(super) fn role_of(&self, session: &FullJid) -> Role {
        self.nick_of
            .get(session)
            .and_then(|n| self.occupants.get(n))
            .map_or(Role::None, |o| o.role)
    }

    /// Applies `changes` asked by `actor`, all or none, each judged by the actor's
    /// standing before the request: a change the actor may not make is `forbidden`
    /// (it lacks the standing) or `not-allowed` (the target stands too high), a nick
    /// not in the room `item-not-found`, a room left without an owner `conflict`.
    /// Occupants see the new roles and affiliations; those kicked (307), banned (301)
    /// or no longer admitted to a members-only room (321) leave it.
    pub fn admin_set(
        &mut self,
        actor: &FullJid,
        changes: &[(Change, Option<String>)],
    ) -> Result<Vec<Out>, Refusal> {
        let standing = self.affiliation(&actor.to_bare());
        let moderator = self.role_of(actor) == Role::Moderator;
        let mut next = self.clone();
        let mut out = Vec::new();
        for (change, reason) in changes {
            out.extend(next.apply(standing, moderator, change, reason.as_deref())?);
        }
        if !next.affiliations.values().any(|a| *a == Affiliation::Owner) {
            return Err(StanzaErrorCondition::Conflict);
        }
        *self = next;
        Ok(out)
    }

    fn apply(
        &mut self,
        standing: Affiliation,
        moderator: bool,
        change: &Change,
        reason: Option<&str>,
    ) -> Result<Vec<Out>, Refusal> {
        match change {
            Change::Role { nick, role } => {
                if !moderator {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                let Some(target) = self.occupants.get(nick) else {
                    return Err(StanzaErrorCondition::ItemNotFound);
                };
                // Admins and owners keep their voice and their seat; moderators are
                // made and unmade by admins (§8.2, §8.4, §9.6): no moderator kicks an
                // occupant of a higher affiliation, or silences one of its own or a
                // higher one.
                if target.affiliation >= Affiliation::Admin && *role < Role::Moderator {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                if *role == Role::None && target.affiliation > standing {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                if *role == Role::Visitor
                    && target.role > Role::Visitor
                    && target.affiliation >= standing
                {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                if (target.role == Role::Moderator || *role == Role::Moderator)
                    && standing < Affiliation::Admin
                {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                if *role == Role::None {
                    return Ok(self.remove_occupant(nick, 307, reason));
                }
                if let Some(o) = self.occupants.get_mut(nick) {
                    o.role = *role;
                }
                Ok(self.announce(nick, reason))
            }
            Change::Affiliation { jid, affiliation } => {
                if standing < Affiliation::Admin {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                let current = self.affiliation(jid);
                if (current >= Affiliation::Admin || *affiliation >= Affiliation::Admin)
                    && standing < Affiliation::Owner
                {
                    return Err(StanzaErrorCondition::NotAllowed);
                }
                Ok(self.restand(jid, *affiliation, reason, false))
            }
        }
    }

    /// Gives `jid` the affiliation `affiliation`: its occupants get the role that goes
    /// with it (unless `keep_roles`) and everyone sees the change, with the reason;
    /// those banned (301) or no longer admitted to a members-only room (321) leave.
    pub(super) fn restand(
        &mut self,
        jid: &BareJid,
        affiliation: Affiliation,
        reason: Option<&str>,
        keep_roles: bool,
    ) -> Vec<Out> {
        let current = self.affiliation(jid);
        self.set_affiliation(jid.clone(), affiliation);
        let present: Vec<String> = self
            .occupants
            .values()
            .filter(|o| &o.bare == jid)
            .map(|o| o.nick.clone())
            .collect();
        let mut out = Vec::new();
        for nick in present {
            if affiliation == Affiliation::Outcast {
                out.extend(self.remove_occupant(&nick, 301, reason));
                continue;
            }
            if self.config.members_only && affiliation < Affiliation::Member {
                out.extend(self.remove_occupant(&nick, 321, reason));
                continue;
            }
            let moderated = self.config.moderated;
            if let Some(o) = self.occupants.get_mut(&nick) {
                o.affiliation = affiliation;
                o.role = match affiliation {
                    _ if keep_roles => o.role,
                    Affiliation::Owner | Affiliation::Admin => Role::Moderator,
                    _ if current >= Affiliation::Admin || o.role == Role::Visitor => {
                        if affiliation == Affiliation::Member || !moderated {
                            Role::Participant
                        } else {
                            Role::Visitor
                        }
                    }
                    _ => o.role,
                };
            }
            out.extend(self.announce(&nick, reason));
        }
        out
    }

    /// The list a `muc#admin` get asks for: accounts of one affiliation (for admins
    /// and owners) or occupants of one role (for moderators).
    pub fn admin_get(&self, actor: &FullJid, query: &Element) -> Result<Element, Refusal> {
        let item = query
            .get_child("item", NS_ADMIN)
            .ok_or(StanzaErrorCondition::BadRequest)?;
        let mut answer = Element::bare("query", NS_ADMIN);
        match (item.attr("affiliation"), item.attr("role")) {
            (Some(a), None) => {
                let wanted = affiliation(a)
                    .filter(|a| *a != Affiliation::None)
                    .ok_or(StanzaErrorCondition::BadRequest)?;
                if self.affiliation(&actor.to_bare()) < Affiliation::Admin {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                let mut listed: Vec<&BareJid> = self
                    .affiliations
                    .iter()
                    .filter(|(_, a)| **a == wanted)
                    .map(|(j, _)| j)
                    .collect();
                listed.sort_by_key(|j| j.as_str());
                for jid in listed {
                    let mut i = Element::bare("item", NS_ADMIN);
                    stanza::set_attr(&mut i, "affiliation", wanted.as_str());
                    stanza::set_attr(&mut i, "jid", jid.as_str());
                    if let Some(nick) = self.reserved_nick(jid) {
                        stanza::set_attr(&mut i, "nick", nick);
                    }
                    answer.append_child(i);
                }
            }
            (None, Some(r)) => {
                let wanted = role(r)
                    .filter(|r| *r != Role::None)
                    .ok_or(StanzaErrorCondition::BadRequest)?;
                if self.role_of(actor) != Role::Moderator {
                    return Err(StanzaErrorCondition::Forbidden);
                }
                for o in self.occupants.values().filter(|o| o.role == wanted) {
                    let mut i = Element::bare("item", NS_ADMIN);
                    stanza::set_attr(&mut i, "affiliation", o.affiliation.as_str());
                    stanza::set_attr(&mut i, "role", o.role.as_str());
                    stanza::set_attr(&mut i, "nick", &o.nick);
                    stanza::set_attr(&mut i, "jid", o.bare.as_str());
                    answer.append_child(i);
                }
            }
            _ => return Err(StanzaErrorCondition::BadRequest),
        }
        Ok(answer)
    }
}
