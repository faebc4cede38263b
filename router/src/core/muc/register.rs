//! Registering with a room (XEP-0045 §7.10, `jabber:iq:register`): an account
//! reserves a nick, which no other account may then take, and in a room that is
//! neither members-only nor moderated becomes a member (elsewhere admins decide who
//! is one, and moderators who speak); `<remove/>` gives the nick up. §7.12: the room
//! tells an account its reserved nick.

use jid::{BareJid, FullJid};
use minidom::Element;

use super::{Affiliation, Out, Refusal, Room};
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

/// The registration form's type.
pub const FORM_REGISTER: &str = "http://jabber.org/protocol/muc#register";
/// The nick field of the form.
const ROOMNICK: &str = "muc#register_roomnick";
/// Nicks a room reserves, at most.
const MAX_RESERVED: usize = 10_000;

impl Room {
    /// The nick `account` reserved, if any.
    pub fn reserved_nick(&self, account: &BareJid) -> Option<&str> {
        self.reserved_by.get(account).map(String::as_str)
    }

    /// Reserves `nick` (normalised) for `account`, in place of one it had.
    pub(super) fn reserve(&mut self, account: BareJid, nick: String) {
        self.unreserve(&account);
        self.reserved.insert(nick.clone(), account.clone());
        self.reserved_by.insert(account, nick);
    }

    /// Frees the nick `account` reserved, if any.
    pub(super) fn unreserve(&mut self, account: &BareJid) {
        if let Some(nick) = self.reserved_by.remove(account) {
            self.reserved.remove(&nick);
        }
    }

    /// The account that reserved `nick`, if another than `account` did.
    pub(super) fn reserved_by_another(&self, nick: &str, account: &BareJid) -> bool {
        self.reserved.get(nick).is_some_and(|a| a != account)
    }

    /// The answer to a registration request (`get`): the form to fill, or
    /// `<registered/>` with the nick when `account` already has one.
    pub fn registration_form(&self, account: &BareJid) -> Result<Element, Refusal> {
        self.may_register(account)?;
        let mut query = Element::bare("query", ns::REGISTER);
        if let Some(nick) = self.reserved_nick(account) {
            query.append_child(Element::bare("registered", ns::REGISTER));
            query.append_child(
                Element::builder("username", ns::REGISTER)
                    .append(nick)
                    .build(),
            );
            return Ok(query);
        }
        query.append_child(
            Element::builder("instructions", ns::REGISTER)
                .append("Choose the nick to reserve in this room; you become a member.")
                .build(),
        );
        let hidden = Element::builder("field", ns::DATA_FORMS)
            .attr(rxml::xml_ncname!("var").to_owned(), "FORM_TYPE")
            .attr(rxml::xml_ncname!("type").to_owned(), "hidden")
            .append(
                Element::builder("value", ns::DATA_FORMS)
                    .append(FORM_REGISTER)
                    .build(),
            )
            .build();
        let nick = Element::builder("field", ns::DATA_FORMS)
            .attr(rxml::xml_ncname!("var").to_owned(), ROOMNICK)
            .attr(rxml::xml_ncname!("type").to_owned(), "text-single")
            .attr(rxml::xml_ncname!("label").to_owned(), "Nick")
            .append(Element::bare("required", ns::DATA_FORMS))
            .build();
        query.append_child(
            Element::builder("x", ns::DATA_FORMS)
                .attr(rxml::xml_ncname!("type").to_owned(), "form")
                .append(
                    Element::builder("title", ns::DATA_FORMS)
                        .append(format!("Registration with {}", self.jid))
                        .build(),
                )
                .append(hidden)
                .append(nick)
                .build(),
        );
        Ok(query)
    }

    /// A registration (`set`): the submitted form reserves its nick and, in a room
    /// neither members-only nor moderated, makes the account a member (occupants see
    /// the new affiliation; roles stay); `<remove/>` gives the nick up (a membership
    /// stays: admins take it away).
    pub fn register(&mut self, from: &FullJid, query: &Element) -> Result<Vec<Out>, Refusal> {
        let account = from.to_bare();
        if query.has_child("remove", ns::REGISTER) {
            if self.reserved_nick(&account).is_none() {
                return Err(StanzaErrorCondition::ItemNotFound);
            }
            self.unreserve(&account);
            return Ok(Vec::new());
        }
        self.may_register(&account)?;
        let form = query
            .get_child("x", ns::DATA_FORMS)
            .filter(|x| x.attr("type") == Some("submit"))
            .ok_or(StanzaErrorCondition::BadRequest)?;
        let value = |var: &str| {
            form.children()
                .find(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
                .and_then(|f| f.get_child("value", ns::DATA_FORMS))
                .map(Element::text)
        };
        if value("FORM_TYPE").as_deref() != Some(FORM_REGISTER) {
            return Err(StanzaErrorCondition::BadRequest);
        }
        let nick = value(ROOMNICK)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .ok_or(StanzaErrorCondition::NotAcceptable)?;
        // As an occupant JID's resource would have it, so that one spelling cannot
        // slip past another.
        let nick = jid::ResourcePart::new(&nick)
            .map_err(|_| StanzaErrorCondition::JidMalformed)?
            .to_string();
        let in_use = self.occupants.get(&nick).is_some_and(|o| o.bare != account);
        if in_use || self.reserved_by_another(&nick, &account) {
            return Err(StanzaErrorCondition::Conflict);
        }
        if self.reserved.len() >= MAX_RESERVED && self.reserved_nick(&account).is_none() {
            return Err(StanzaErrorCondition::ResourceConstraint);
        }
        self.reserve(account.clone(), nick);
        if self.affiliation(&account) < Affiliation::Member && !self.config.moderated {
            return Ok(self.restand(&account, Affiliation::Member, None, true));
        }
        Ok(Vec::new())
    }

    /// Who may register: not an outcast; in a members-only room, only its members
    /// (admins make members there).
    fn may_register(&self, account: &BareJid) -> Result<(), Refusal> {
        let affiliation = self.affiliation(account);
        if affiliation == Affiliation::Outcast {
            return Err(StanzaErrorCondition::Forbidden);
        }
        if self.config.members_only && affiliation < Affiliation::Member {
            return Err(StanzaErrorCondition::NotAllowed);
        }
        if self.locked {
            return Err(StanzaErrorCondition::ItemNotFound);
        }
        Ok(())
    }

    /// §7.12: the `disco#info` of node `x-roomuser-item`, which names the account's
    /// reserved nick (an empty answer when it has none).
    pub fn reserved_nick_info(&self, account: &BareJid) -> Element {
        let mut query = Element::bare("query", ns::DISCO_INFO);
        stanza::set_attr(&mut query, "node", "x-roomuser-item");
        if let Some(nick) = self.reserved_nick(account) {
            let mut identity = Element::bare("identity", ns::DISCO_INFO);
            stanza::set_attr(&mut identity, "category", "conference");
            stanza::set_attr(&mut identity, "type", "text");
            stanza::set_attr(&mut identity, "name", nick);
            query.append_child(identity);
        }
        query
    }
}
