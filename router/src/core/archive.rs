//! Message archives (XEP-0313 v2, `urn:xmpp:mam:2`) without I/O: which messages are
//! archived, an account's archiving preferences, what a query asks (its data form and
//! XEP-0059 paging), and the XML of results. The router's `mam` module does the
//! store calls, the batched writes and the sending.

use minidom::Element;

use crate::error::StanzaErrorCondition;
use crate::xml::{escape, ns};

/// Whether a message belongs in its owners' archives (XEP-0313 §5.1.1): a chat or
/// normal message with a body, or one the sender asked to store (XEP-0334) or
/// encrypted with OMEMO; never one the sender asked not to keep, an error, a carbon
/// or a forwarded archive result.
pub fn archivable(message: &Element) -> bool {
    matches!(message.attr("type"), None | Some("chat" | "normal")) && worth_keeping(message)
}

/// Whether a room's `groupchat` message belongs in the room's archive: on the same
/// terms as [`archivable`].
pub fn archivable_in_room(message: &Element) -> bool {
    message.attr("type") == Some("groupchat") && worth_keeping(message)
}

/// The terms of [`archivable`] but for the message's type.
fn worth_keeping(message: &Element) -> bool {
    if message.has_child("no-store", ns::HINTS)
        || message.has_child("no-permanent-store", ns::HINTS)
        || message.has_child("sent", ns::CARBONS)
        || message.has_child("received", ns::CARBONS)
        || message.has_child("result", ns::MAM)
    {
        return false;
    }
    message.has_child("body", ns::CLIENT)
        || message.has_child("store", ns::HINTS)
        || message.has_child("encrypted", ns::OMEMO)
}

/// Removes the `<stanza-id/>`s (XEP-0359) that claim to come from `by`: only this
/// server stamps them, so one that arrives with a message is a forgery (§5).
pub fn strip_stanza_ids(message: &mut Element, by: &str) {
    if stanza_id(message, by).is_none() {
        return;
    }
    let mut kept = Element::bare(message.name(), message.ns());
    for ((attr_ns, name), value) in message.attrs().iter() {
        kept.set_attr(attr_ns.clone(), name.clone(), value.as_str());
    }
    for child in message.children() {
        if !(child.is("stanza-id", ns::SID) && child.attr("by").is_some_and(|b| same_jid(b, by))) {
            kept.append_child(child.clone());
        }
    }
    *message = kept;
}

/// The stanza-id `by` stamped on a message, if any (`by` compared as a JID, so a
/// forgery in another case or form is found too).
pub fn stanza_id<'a>(message: &'a Element, by: &str) -> Option<&'a str> {
    message
        .children()
        .find(|c| c.is("stanza-id", ns::SID) && c.attr("by").is_some_and(|b| same_jid(b, by)))
        .and_then(|c| c.attr("id"))
}

pub(crate) fn same_jid(a: &str, b: &str) -> bool {
    a == b || matches!((jid::Jid::new(a), jid::Jid::new(b)), (Ok(a), Ok(b)) if a == b)
}

/// Stamps `<stanza-id id by/>` on a message.
pub fn stamp(message: &mut Element, id: &str, by: &str) {
    let mut sid = Element::bare("stanza-id", ns::SID);
    crate::stanza::set_attr(&mut sid, "id", id);
    crate::stanza::set_attr(&mut sid, "by", by);
    message.append_child(sid);
}

/// A serialized message with `<stanza-id id by/>` added as its last child, as
/// [`stamp`] then serializing would give, without serializing again: `xml` is one
/// serialized `<message>` element with content (every archivable message has some).
/// `None` when it is not (then stamp the element).
pub fn stamp_serialized(xml: &str, id: &str, by: &str) -> Option<String> {
    const END: &str = "</message>";
    let head = xml.strip_suffix(END)?;
    if !xml.starts_with("<message") {
        return None;
    }
    let (id, by) = (crate::xml::escape(id), crate::xml::escape(by));
    let mut out = String::with_capacity(xml.len() + id.len() + by.len() + 48);
    out.push_str(head);
    out.push_str("<stanza-id xmlns='");
    out.push_str(ns::SID);
    out.push_str("' id='");
    out.push_str(&id);
    out.push_str("' by='");
    out.push_str(&by);
    out.push_str("'/>");
    out.push_str(END);
    Some(out)
}

/// An account's default for messages with JIDs on neither list (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultMode {
    Always,
    Never,
    Roster,
}

impl DefaultMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultMode::Always => "always",
            DefaultMode::Never => "never",
            DefaultMode::Roster => "roster",
        }
    }

    pub fn parse(s: &str) -> Option<DefaultMode> {
        match s {
            "always" => Some(DefaultMode::Always),
            "never" => Some(DefaultMode::Never),
            "roster" => Some(DefaultMode::Roster),
            _ => None,
        }
    }
}

/// JIDs on one preference list, at most.
pub const MAX_PREF_JIDS: usize = 1000;

/// An account's archiving preferences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefs {
    pub default: DefaultMode,
    pub always: Vec<String>,
    pub never: Vec<String>,
}

impl Prefs {
    pub fn new(default: DefaultMode) -> Prefs {
        Prefs {
            default,
            always: vec![],
            never: vec![],
        }
    }

    /// Whether a message with `with` (a bare JID) is archived; `in_roster` says
    /// whether the account's roster has it (for the `roster` default).
    pub fn archives(&self, with: &str, in_roster: bool) -> bool {
        if self.never.iter().any(|j| j == with) {
            return false;
        }
        if self.always.iter().any(|j| j == with) {
            return true;
        }
        match self.default {
            DefaultMode::Always => true,
            DefaultMode::Never => false,
            DefaultMode::Roster => in_roster,
        }
    }

    /// Reads a `<prefs/>` set request.
    pub fn parse(prefs: &Element) -> Result<Prefs, StanzaErrorCondition> {
        let default = prefs
            .attr("default")
            .and_then(DefaultMode::parse)
            .ok_or(StanzaErrorCondition::BadRequest)?;
        let list = |name: &str| -> Result<Vec<String>, StanzaErrorCondition> {
            let mut jids: Vec<String> = prefs
                .get_child(name, ns::MAM)
                .map(|l| {
                    l.children()
                        .filter(|c| c.is("jid", ns::MAM))
                        .map(|c| c.text().trim().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            // Kept normalized: they are compared with normalized bare JIDs.
            for j in &mut jids {
                *j = jid::BareJid::new(j)
                    .map_err(|_| StanzaErrorCondition::JidMalformed)?
                    .to_string();
            }
            jids.sort();
            jids.dedup();
            if jids.len() > MAX_PREF_JIDS {
                return Err(StanzaErrorCondition::NotAcceptable);
            }
            Ok(jids)
        };
        Ok(Prefs {
            default,
            always: list("always")?,
            never: list("never")?,
        })
    }

    pub fn to_xml(&self) -> String {
        let list = |name: &str, jids: &[String]| {
            let inner: String = jids
                .iter()
                .map(|j| format!("<jid>{}</jid>", escape(j)))
                .collect();
            format!("<{name}>{inner}</{name}>")
        };
        format!(
            "<prefs xmlns='{}' default='{}'>{}{}</prefs>",
            ns::MAM,
            self.default.as_str(),
            list("always", &self.always),
            list("never", &self.never)
        )
    }
}

/// Which end of the result set a page is taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    /// The first `max` after `after` (an archive id), or from the start.
    Forward { after: Option<String> },
    /// The last `max` before `before` (an archive id), or up to the end.
    Backward { before: Option<String> },
}

/// A query (§4): the form's filters and the page asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub queryid: Option<String>,
    /// A bare or full JID the messages were exchanged with.
    pub with: Option<String>,
    /// Microseconds since the epoch, inclusive.
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// Extended (`urn:xmpp:mam:2#extended`): strictly after / before these ids.
    pub after_id: Option<String>,
    pub before_id: Option<String>,
    /// Extended: exactly these messages.
    pub ids: Vec<String>,
    pub max: usize,
    pub page: Page,
    /// XEP-0313 §4.1.2: the page's messages in reverse order.
    pub flip: bool,
}

/// Parses a `<query xmlns='urn:xmpp:mam:2'/>`; `max_page` caps the page size (a larger
/// `<max/>` gets that many, and the result says it is not complete).
pub fn parse_query(
    query: &Element,
    max_page: usize,
) -> Result<Query, (StanzaErrorCondition, &'static str)> {
    let bad = |text| (StanzaErrorCondition::BadRequest, text);
    if query.attr("queryid").is_some_and(|id| id.len() > 256) {
        return Err(bad("queryid is longer than 256 bytes"));
    }
    let mut q = Query {
        queryid: query.attr("queryid").map(String::from),
        with: None,
        start: None,
        end: None,
        after_id: None,
        before_id: None,
        ids: vec![],
        max: max_page.min(50),
        page: Page::Forward { after: None },
        flip: query.has_child("flip-page", ns::MAM),
    };
    if let Some(form) = query.get_child("x", ns::DATA_FORMS) {
        for field in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
            let values: Vec<String> = field
                .children()
                .filter(|v| v.is("value", ns::DATA_FORMS))
                .map(|v| v.text().trim().to_owned())
                .collect();
            let one = values.first().cloned().unwrap_or_default();
            match field.attr("var").unwrap_or_default() {
                "FORM_TYPE" => {
                    if one != ns::MAM {
                        return Err(bad("the form's FORM_TYPE must be urn:xmpp:mam:2"));
                    }
                }
                "with" if !one.is_empty() => {
                    if jid::Jid::new(&one).is_err() {
                        return Err((StanzaErrorCondition::JidMalformed, "with is not a JID"));
                    }
                    q.with = Some(one);
                }
                "start" if !one.is_empty() => {
                    q.start = Some(
                        parse_datetime(&one).ok_or(bad("start is not an XEP-0082 date-time"))?,
                    );
                }
                "end" if !one.is_empty() => {
                    q.end =
                        Some(parse_datetime(&one).ok_or(bad("end is not an XEP-0082 date-time"))?);
                }
                "after-id" if !one.is_empty() => q.after_id = Some(one),
                "before-id" if !one.is_empty() => q.before_id = Some(one),
                "ids" => {
                    if values.len() > max_page {
                        return Err((
                            StanzaErrorCondition::PolicyViolation,
                            "too many ids in one query",
                        ));
                    }
                    q.ids = values.into_iter().filter(|v| !v.is_empty()).collect();
                }
                "with" | "start" | "end" | "after-id" | "before-id" => {}
                _ => {
                    return Err((
                        StanzaErrorCondition::FeatureNotImplemented,
                        "an unknown field in the query form",
                    ));
                }
            }
        }
    }
    if let Some(set) = query.get_child("set", ns::RSM) {
        if let Some(max) = set.get_child("max", ns::RSM) {
            let max: usize = max
                .text()
                .trim()
                .parse()
                .map_err(|_| bad("max is not a number"))?;
            q.max = max.min(max_page);
        }
        if let Some(after) = set.get_child("after", ns::RSM) {
            q.page = Page::Forward {
                after: Some(after.text().trim().to_owned()).filter(|a| !a.is_empty()),
            };
        }
        if let Some(before) = set.get_child("before", ns::RSM) {
            q.page = Page::Backward {
                before: Some(before.text().trim().to_owned()).filter(|b| !b.is_empty()),
            };
        }
        if set.has_child("index", ns::RSM) {
            return Err((
                StanzaErrorCondition::FeatureNotImplemented,
                "paging by index is not supported; use after and before",
            ));
        }
    }
    Ok(q)
}

/// The query form clients ask for (§4.1.1, with the extended fields).
pub fn query_form() -> String {
    format!(
        "<query xmlns='{mam}'><x xmlns='{df}' type='form'><field var='FORM_TYPE' type='hidden'><value>{mam}</value></field><field var='with' type='jid-single'/><field var='start' type='text-single'/><field var='end' type='text-single'/><field var='after-id' type='text-single'/><field var='before-id' type='text-single'/><field var='ids' type='text-multi'/></x></query>",
        mam = ns::MAM,
        df = ns::DATA_FORMS
    )
}

/// One archived message as a query result (§4.2), to `to`, from the archive's
/// address when it is not the account's own (a room's).
pub fn result_message(
    to: &str,
    from: Option<&str>,
    queryid: Option<&str>,
    id: &str,
    micros: i64,
    stanza: &str,
) -> String {
    let queryid = queryid
        .map(|q| format!(" queryid='{}'", escape(q)))
        .unwrap_or_default();
    let from = from
        .map(|f| format!(" from='{}'", escape(f)))
        .unwrap_or_default();
    format!(
        "<message xmlns='jabber:client'{from} to='{}'><result xmlns='{}'{queryid} id='{}'><forwarded xmlns='{}'><delay xmlns='{}' stamp='{}'/>{stanza}</forwarded></result></message>",
        escape(to),
        ns::MAM,
        escape(id),
        ns::FORWARD,
        ns::DELAY,
        datetime(micros)
    )
}

/// The `<fin/>` that ends a query (§4.3): the page's first and last ids, and whether
/// the page reached the end of the results in its direction.
pub fn fin(first_last: Option<(&str, &str)>, complete: bool) -> String {
    let set = match first_last {
        Some((first, last)) => format!(
            "<set xmlns='{}'><first>{}</first><last>{}</last></set>",
            ns::RSM,
            escape(first),
            escape(last)
        ),
        None => format!("<set xmlns='{}'/>", ns::RSM),
    };
    let complete = if complete { " complete='true'" } else { "" };
    format!("<fin xmlns='{}'{complete}>{set}</fin>", ns::MAM)
}

/// Microseconds since the epoch as an XEP-0082 date-time (UTC, with microseconds).
pub fn datetime(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let base = crate::time::rfc3339(secs);
    format!("{}.{frac:06}Z", base.trim_end_matches('Z'))
}

/// Parses an XEP-0082 date-time (`YYYY-MM-DDThh:mm:ss[.sss](Z|±hh:mm)`) into
/// microseconds since the epoch.
pub fn parse_datetime(s: &str) -> Option<i64> {
    // ASCII only: every slice below is then on a character boundary.
    if !s.is_ascii() {
        return None;
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut padded: String = frac[..digits.min(6)].to_owned();
        while padded.len() < 6 {
            padded.push('0');
        }
        micros = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs * 1_000_000 + micros)
}

/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn a_serialized_stamp_is_the_stamped_element() {
        let message = parse(
            "<message xmlns='jabber:client' from='a@d/r' to='b@d' type='chat'>\
             <body>x &amp; y</body><x xmlns='urn:example'><y/></x></message>",
        );
        let xml = String::from(&message);
        let spliced = stamp_serialized(&xml, "0123", "b@d").unwrap();
        let mut stamped = message.clone();
        stamp(&mut stamped, "0123", "b@d");
        assert_eq!(parse(&spliced), stamped);
        assert_eq!(stanza_id(&parse(&spliced), "b@d"), Some("0123"));
        // Attribute values are escaped.
        let odd = stamp_serialized(&xml, "a'b", "b@d").unwrap();
        assert_eq!(stanza_id(&parse(&odd), "b@d"), Some("a'b"));
        // Not a message with content: the caller stamps the element instead.
        assert_eq!(
            stamp_serialized("<message xmlns='jabber:client'/>", "1", "b@d"),
            None
        );
        assert_eq!(
            stamp_serialized("<iq xmlns='jabber:client'></iq>", "1", "b@d"),
            None
        );
    }

    #[test]
    fn what_is_archived() {
        let m = |inner: &str, ty: &str| {
            parse(&format!(
                "<message xmlns='jabber:client' type='{ty}'>{inner}</message>"
            ))
        };
        assert!(archivable(&m("<body>hi</body>", "chat")));
        assert!(archivable(&m("<body>hi</body>", "normal")));
        assert!(!archivable(&m("<body>hi</body>", "headline")));
        assert!(!archivable(&m("<body>hi</body>", "groupchat")));
        assert!(!archivable(&m(
            "<composing xmlns='http://jabber.org/protocol/chatstates'/>",
            "chat"
        )));
        assert!(!archivable(&m(
            "<body>hi</body><no-store xmlns='urn:xmpp:hints'/>",
            "chat"
        )));
        assert!(archivable(&m("<store xmlns='urn:xmpp:hints'/>", "chat")));
        assert!(archivable(&m(
            "<encrypted xmlns='eu.siacs.conversations.axolotl'/>",
            "chat"
        )));
    }

    #[test]
    fn forged_stanza_ids_are_removed() {
        let mut m = parse(
            "<message xmlns='jabber:client'><stanza-id xmlns='urn:xmpp:sid:0' id='x' by='bob@d'/><stanza-id xmlns='urn:xmpp:sid:0' id='y' by='room@muc.other'/></message>",
        );
        strip_stanza_ids(&mut m, "Bob@D");
        assert_eq!(stanza_id(&m, "bob@d"), None);
        assert_eq!(stanza_id(&m, "room@muc.other"), Some("y"));
        stamp(&mut m, "z", "bob@d");
        assert_eq!(stanza_id(&m, "bob@d"), Some("z"));
    }

    #[test]
    fn preferences() {
        let p = Prefs::parse(&parse(
            "<prefs xmlns='urn:xmpp:mam:2' default='roster'><always><jid>a@d</jid></always><never><jid>b@d</jid></never></prefs>",
        ))
        .unwrap();
        assert!(p.archives("a@d", false));
        assert!(!p.archives("b@d", true));
        assert!(p.archives("c@d", true));
        assert!(!p.archives("c@d", false));
        assert_eq!(Prefs::parse(&parse(&p.to_xml())).unwrap(), p);
        assert!(
            Prefs::parse(&parse(
                "<prefs xmlns='urn:xmpp:mam:2' default='sometimes'/>"
            ))
            .is_err()
        );
    }

    #[test]
    fn queries_and_pages() {
        let q = parse_query(
            &parse(
                "<query xmlns='urn:xmpp:mam:2' queryid='f27'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field><field var='with'><value>juliet@capulet.lit</value></field><field var='start'><value>2010-06-07T00:00:00Z</value></field></x><set xmlns='http://jabber.org/protocol/rsm'><max>1000000</max><before/></set></query>",
            ),
            250,
        )
        .unwrap();
        assert_eq!(q.queryid.as_deref(), Some("f27"));
        assert_eq!(q.with.as_deref(), Some("juliet@capulet.lit"));
        assert_eq!(q.start, Some(1_275_868_800_000_000));
        // A huge page is the largest page.
        assert_eq!(q.max, 250);
        assert_eq!(q.page, Page::Backward { before: None });
        let e = parse_query(
            &parse("<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data'><field var='colour'><value>red</value></field></x></query>"),
            250,
        )
        .unwrap_err();
        assert_eq!(e.0, StanzaErrorCondition::FeatureNotImplemented);
    }

    #[test]
    fn date_times() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_datetime("1970-01-01T01:00:00.5+01:00"), Some(500_000));
        assert_eq!(
            parse_datetime("2000-02-29T00:00:00Z"),
            Some(951_782_400_000_000)
        );
        assert_eq!(parse_datetime("2000-02-29"), None);
        assert_eq!(parse_datetime("2000-13-01T00:00:00Z"), None);
        // A multi-byte character where the offset's colon goes: refused, no panic.
        assert_eq!(parse_datetime("2010-06-07T00:00:00+0\u{e9}00"), None);
        assert_eq!(datetime(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(
            parse_datetime(&datetime(1_795_826_096_123_456)),
            Some(1_795_826_096_123_456)
        );
    }
}
