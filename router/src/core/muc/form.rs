//! A room's configuration as the `muc#roomconfig` data form (XEP-0045 §10.2 and
//! §15.5.3): the form an owner gets, and what a submitted one changes.

use minidom::Element;

use super::{Affiliation, Config, NS_USER, Out, PrivateMessages, Refusal, Room};
use crate::error::StanzaErrorCondition;
use crate::stanza;
use crate::xml::ns;

/// The form's `FORM_TYPE`.
pub const FORM_TYPE: &str = "http://jabber.org/protocol/muc#roomconfig";
/// Bytes of a room's name or description, at most.
const MAX_TEXT_BYTES: usize = 1024;
/// Bytes of a room's password, at most.
const MAX_SECRET_BYTES: usize = 256;
/// The occupant limits offered (those within the service's limit, and that limit).
const MAX_USERS_CHOICES: &[usize] = &[10, 20, 30, 50, 100, 200, 500, 1000];

/// What the service allows any room, whatever its owner asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_users: usize,
    pub history_length: usize,
    /// The node keeps archives: rooms may be archived.
    pub archive: bool,
}

fn field(var: &str, kind: &str, label: &str, values: &[&str]) -> Element {
    let mut f = Element::builder("field", ns::DATA_FORMS)
        .attr(rxml::xml_ncname!("var").to_owned(), var)
        .attr(rxml::xml_ncname!("type").to_owned(), kind)
        .build();
    if !label.is_empty() {
        stanza::set_attr(&mut f, "label", label);
    }
    for v in values {
        f.append_child(Element::builder("value", ns::DATA_FORMS).append(*v).build());
    }
    f
}

fn with_options(mut f: Element, options: &[(&str, &str)]) -> Element {
    for (label, value) in options {
        f.append_child(
            Element::builder("option", ns::DATA_FORMS)
                .attr(rxml::xml_ncname!("label").to_owned(), *label)
                .append(
                    Element::builder("value", ns::DATA_FORMS)
                        .append(*value)
                        .build(),
                )
                .build(),
        );
    }
    f
}

fn boolean(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn parse_bool(value: &str) -> Result<bool, Refusal> {
    match value {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(StanzaErrorCondition::NotAcceptable),
    }
}

/// Sends each of `codes` to every session of the room, in one message from the room
/// (XEP-0045 §10.2.1: a configuration change that occupants should know of).
pub(super) fn status_message(room: &Room, codes: &[u16]) -> Vec<Out> {
    let mut x = Element::bare("x", NS_USER);
    for code in codes {
        x.append_child(
            Element::builder("status", NS_USER)
                .attr(rxml::xml_ncname!("code").to_owned(), code.to_string())
                .build(),
        );
    }
    room.sessions()
        .map(|to| {
            let mut m = Element::builder("message", ns::CLIENT)
                .append(x.clone())
                .build();
            stanza::set_attr(&mut m, "from", room.jid().as_str());
            stanza::set_attr(&mut m, "to", &to.to_string());
            stanza::set_attr(&mut m, "type", "groupchat");
            Out { to, stanza: m }
        })
        .collect()
}

impl Room {
    /// The configuration form with the room's current values.
    pub fn config_form(&self, limits: Limits) -> Element {
        let c = &self.config;
        let mut x = Element::builder("x", ns::DATA_FORMS)
            .attr(rxml::xml_ncname!("type").to_owned(), "form")
            .append(
                Element::builder("title", ns::DATA_FORMS)
                    .append(format!("Configuration of {}", self.jid()))
                    .build(),
            )
            .build();
        let max_users = c.max_users.to_string();
        let history = c.history_length.to_string();
        let mut choices: Vec<String> = MAX_USERS_CHOICES
            .iter()
            .filter(|n| **n < limits.max_users)
            .map(usize::to_string)
            .collect();
        choices.push(limits.max_users.to_string());
        let choices: Vec<(&str, &str)> = choices.iter().map(|c| (c.as_str(), c.as_str())).collect();
        for f in [
            field("FORM_TYPE", "hidden", "", &[FORM_TYPE]),
            field(
                "muc#roomconfig_roomname",
                "text-single",
                "Name",
                &[c.name.as_str()],
            ),
            field(
                "muc#roomconfig_roomdesc",
                "text-single",
                "Description",
                &[c.description.as_str()],
            ),
            field(
                "muc#roomconfig_persistentroom",
                "boolean",
                "Kept when empty",
                &[boolean(c.persistent)],
            ),
            field(
                "muc#roomconfig_publicroom",
                "boolean",
                "Listed in the directory of rooms",
                &[boolean(c.public)],
            ),
            field(
                "muc#roomconfig_membersonly",
                "boolean",
                "Only members may enter",
                &[boolean(c.members_only)],
            ),
            field(
                "muc#roomconfig_moderatedroom",
                "boolean",
                "Only occupants with voice may speak",
                &[boolean(c.moderated)],
            ),
            field(
                "muc#roomconfig_passwordprotectedroom",
                "boolean",
                "A password is needed to enter",
                &[boolean(c.password.is_some())],
            ),
            field(
                "muc#roomconfig_roomsecret",
                "text-private",
                "Password",
                &[c.password.as_deref().unwrap_or("")],
            ),
            with_options(
                field(
                    "muc#roomconfig_maxusers",
                    "list-single",
                    "Occupants at most",
                    &[max_users.as_str()],
                ),
                &choices,
            ),
            with_options(
                field(
                    "muc#roomconfig_whois",
                    "list-single",
                    "Who may see occupants' real addresses",
                    &[if c.whois_anyone {
                        "anyone"
                    } else {
                        "moderators"
                    }],
                ),
                &[("Moderators", "moderators"), ("Anyone", "anyone")],
            ),
            field(
                "muc#maxhistoryfetch",
                "text-single",
                "Messages of history kept",
                &[history.as_str()],
            ),
            with_options(
                field(
                    "muc#roomconfig_allowpm",
                    "list-single",
                    "Who may send private messages",
                    &[c.private_messages.as_str()],
                ),
                &[
                    ("Anyone", "anyone"),
                    ("Participants", "participants"),
                    ("Moderators", "moderators"),
                    ("Nobody", "none"),
                ],
            ),
            field(
                "muc#roomconfig_changesubject",
                "boolean",
                "Occupants may change the subject",
                &[boolean(c.subject_by_anyone)],
            ),
        ] {
            x.append_child(f);
        }
        if limits.archive {
            x.append_child(field(
                "muc#roomconfig_enablearchiving",
                "boolean",
                "Archive the messages of the room while it is persistent",
                &[boolean(c.archived)],
            ));
        }
        x
    }

    /// Applies a submitted configuration form: the fields it gives change, the rest
    /// stay; a field this room does not know is ignored, a value out of range is
    /// `not-acceptable` and changes nothing. A new room opens. Occupants learn of a
    /// change (status 104, and 172 or 173 when real addresses become visible or
    /// hidden); those a members-only room no longer admits leave it (322).
    pub fn configure(&mut self, form: &Element, limits: Limits) -> Result<Vec<Out>, Refusal> {
        let mut c: Config = self.config.clone();
        let mut protected: Option<bool> = None;
        let mut secret: Option<String> = None;
        for f in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
            let Some(var) = f.attr("var") else {
                continue;
            };
            let value = f
                .get_child("value", ns::DATA_FORMS)
                .map(Element::text)
                .unwrap_or_default();
            let text = |limit: usize| {
                if value.len() > limit {
                    Err(StanzaErrorCondition::NotAcceptable)
                } else {
                    Ok(value.clone())
                }
            };
            let number = || {
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| StanzaErrorCondition::NotAcceptable)
            };
            match var {
                "FORM_TYPE" if value != FORM_TYPE => {
                    return Err(StanzaErrorCondition::NotAcceptable);
                }
                "muc#roomconfig_roomname" => c.name = text(MAX_TEXT_BYTES)?,
                "muc#roomconfig_roomdesc" => c.description = text(MAX_TEXT_BYTES)?,
                "muc#roomconfig_persistentroom" => c.persistent = parse_bool(&value)?,
                "muc#roomconfig_publicroom" => c.public = parse_bool(&value)?,
                "muc#roomconfig_membersonly" => c.members_only = parse_bool(&value)?,
                "muc#roomconfig_moderatedroom" => c.moderated = parse_bool(&value)?,
                "muc#roomconfig_passwordprotectedroom" => protected = Some(parse_bool(&value)?),
                "muc#roomconfig_roomsecret" => secret = Some(text(MAX_SECRET_BYTES)?),
                "muc#roomconfig_maxusers" => {
                    c.max_users = if value == "none" {
                        limits.max_users
                    } else {
                        number()?
                    };
                    if c.max_users == 0 || c.max_users > limits.max_users {
                        return Err(StanzaErrorCondition::NotAcceptable);
                    }
                }
                "muc#roomconfig_whois" => {
                    c.whois_anyone = match value.as_str() {
                        "anyone" => true,
                        "moderators" => false,
                        _ => return Err(StanzaErrorCondition::NotAcceptable),
                    }
                }
                "muc#maxhistoryfetch" => {
                    c.history_length = number()?;
                    if c.history_length > limits.history_length {
                        return Err(StanzaErrorCondition::NotAcceptable);
                    }
                }
                "muc#roomconfig_allowpm" => {
                    c.private_messages =
                        PrivateMessages::parse(&value).ok_or(StanzaErrorCondition::NotAcceptable)?
                }
                "muc#roomconfig_changesubject" => c.subject_by_anyone = parse_bool(&value)?,
                "muc#roomconfig_enablearchiving" => c.archived = parse_bool(&value)?,
                _ => {}
            }
        }
        // A password given turns protection on unless the form turns it off; turning
        // it on needs one.
        let secret = secret.filter(|s| !s.is_empty());
        c.password = match (protected, secret) {
            (Some(false), _) => None,
            (_, Some(s)) => Some(s),
            (Some(true), None) if c.password.is_some() => c.password.clone(),
            (Some(true), None) => return Err(StanzaErrorCondition::NotAcceptable),
            (None, None) => c.password.clone(),
        };
        let before = std::mem::replace(&mut self.config, c);
        self.unlock();
        while self.history.len() > self.config.history_length {
            self.history.pop_front();
        }
        let mut out = Vec::new();
        if self.config.members_only && !before.members_only {
            let outsiders: Vec<String> = self
                .occupants
                .values()
                .filter(|o| o.affiliation < Affiliation::Member)
                .map(|o| o.nick.clone())
                .collect();
            for nick in outsiders {
                out.extend(self.remove_occupant(&nick, 322, None));
            }
        }
        if before != self.config {
            let mut codes = vec![104];
            if self.config.whois_anyone != before.whois_anyone {
                codes.push(if self.config.whois_anyone { 172 } else { 173 });
            }
            out.extend(status_message(self, &codes));
        }
        Ok(out)
    }
}
