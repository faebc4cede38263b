//! Voice requests (XEP-0045 §7.13 and §8.6): in a moderated room, a visitor asks
//! for voice with a `muc#request` form; each moderator gets the form to approve; a
//! moderator's answer with `muc#request_allow` true makes the visitor a participant.

use std::collections::HashMap;

use jid::FullJid;
use minidom::Element;

use super::admin::Change;
use super::{Out, Refusal, Role, Room};
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

/// The form type of voice requests and their answers.
pub const NS_REQUEST: &str = "http://jabber.org/protocol/muc#request";

/// Requests a room keeps waiting for an answer, at most: a further one waits until
/// one of those is answered or its visitor leaves.
const MAX_PENDING: usize = 1000;

/// The first value of each field of a `muc#request` form, or `None` when `form` is
/// another form.
fn fields(form: &Element) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    for field in form.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
        let (Some(var), Some(value)) = (
            field.attr("var"),
            field.get_child("value", ns::DATA_FORMS).map(Element::text),
        ) else {
            continue;
        };
        out.entry(var.to_owned()).or_insert(value);
    }
    (out.get("FORM_TYPE").map(String::as_str) == Some(NS_REQUEST)).then_some(out)
}

/// Whether `form` (an `x` in `jabber:x:data`) is a voice request or an answer to one.
pub fn is_voice_form(form: &Element) -> bool {
    form.is("x", ns::DATA_FORMS) && fields(form).is_some()
}

/// A field of the form moderators get.
fn field(var: &str, kind: &str, label: Option<&str>, value: &str) -> Element {
    let mut f = Element::builder("field", ns::DATA_FORMS)
        .attr(rxml::xml_ncname!("var").to_owned(), var)
        .attr(rxml::xml_ncname!("type").to_owned(), kind)
        .append(
            Element::builder("value", ns::DATA_FORMS)
                .append(value)
                .build(),
        )
        .build();
    if let Some(label) = label {
        stanza::set_attr(&mut f, "label", label);
    }
    f
}

impl Room {
    /// A `muc#request` form sent to the room by `from`: a visitor's request for
    /// voice, passed on to every moderator as a form to approve (one waiting request
    /// per nick: asking again changes nothing), or a moderator's answer, which gives
    /// the visitor voice when `muc#request_allow` is true (a denial changes nothing).
    pub fn voice_request(&mut self, from: &FullJid, form: &Element) -> Result<Vec<Out>, Refusal> {
        let f = fields(form).ok_or(StanzaErrorCondition::BadRequest)?;
        if let Some(allow) = f.get("muc#request_allow") {
            if self.role_of(from) != Role::Moderator {
                return Err(StanzaErrorCondition::Forbidden);
            }
            let nick = f
                .get("muc#roomnick")
                .ok_or(StanzaErrorCondition::BadRequest)?;
            let waiting = self.voice_requests.remove(nick);
            let visitor = self
                .occupants
                .get(nick)
                .is_some_and(|o| o.role == Role::Visitor);
            if !matches!(allow.as_str(), "true" | "1") || !waiting || !visitor {
                return Ok(Vec::new());
            }
            let change = Change::Role {
                nick: nick.clone(),
                role: Role::Participant,
            };
            return self.admin_set(from, &[(change, None)]);
        }
        let Some(nick) = self.nick_of(from).map(str::to_owned) else {
            return Err(StanzaErrorCondition::NotAcceptable);
        };
        if f.get("muc#role").is_some_and(|r| r != "participant") {
            return Err(StanzaErrorCondition::BadRequest);
        }
        if self.role_of(from) != Role::Visitor {
            // It has voice already.
            return Err(StanzaErrorCondition::NotAcceptable);
        }
        // Requests of visitors who left, or got voice meanwhile, are over.
        let occupants = &self.occupants;
        self.voice_requests
            .retain(|n| occupants.get(n).is_some_and(|o| o.role == Role::Visitor));
        if self.voice_requests.contains(&nick) {
            return Ok(Vec::new());
        }
        if self.voice_requests.len() >= MAX_PENDING {
            return Err(StanzaErrorCondition::ResourceConstraint);
        }
        self.voice_requests.insert(nick.clone());
        let mut form = Element::builder("x", ns::DATA_FORMS)
            .attr(rxml::xml_ncname!("type").to_owned(), "form")
            .append(
                Element::builder("title", ns::DATA_FORMS)
                    .append("Voice request")
                    .build(),
            )
            .append(
                Element::builder("instructions", ns::DATA_FORMS)
                    .append("To approve this request for voice, select the \"Grant voice to this person?\" checkbox and submit this form.")
                    .build(),
            )
            .build();
        for f in [
            field("FORM_TYPE", "hidden", None, NS_REQUEST),
            field(
                "muc#role",
                "list-single",
                Some("Requested role"),
                "participant",
            ),
            field("muc#jid", "jid-single", Some("User ID"), &from.to_string()),
            field("muc#roomnick", "text-single", Some("Room nickname"), &nick),
            field(
                "muc#request_allow",
                "boolean",
                Some("Grant voice to this person?"),
                "false",
            ),
        ] {
            form.append_child(f);
        }
        let mut m = Element::builder("message", ns::CLIENT).append(form).build();
        stanza::set_attr(&mut m, "from", self.jid.as_str());
        let moderators: Vec<FullJid> = self
            .occupants
            .values()
            .filter(|o| o.role == Role::Moderator)
            .flat_map(|o| o.sessions.iter().cloned())
            .collect();
        Ok(moderators
            .into_iter()
            .map(|to| {
                let mut copy = m.clone();
                stanza::set_attr(&mut copy, "to", &to.to_string());
                Out { to, stanza: copy }
            })
            .collect())
    }
}
