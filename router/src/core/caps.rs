//! Entity capabilities (XEP-0115), without I/O: what a presence's `<c/>` claims, and
//! whether a disco#info answer matches the hash it claims (§5.1), so features are
//! cached by hash only when they are what the hash says.

use base64::Engine as _;
use minidom::Element;
use sha1::Digest as _;

use crate::xml::ns;

/// The namespace of `xml:lang`.
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// The capabilities a presence announces: the software's `node` and the `ver` hash
/// (SHA-1, the hash every client sends; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub node: String,
    pub ver: String,
}

impl Caps {
    /// The `<c/>` of a presence, if it has one this server can verify.
    pub fn of_presence(presence: &Element) -> Option<Caps> {
        let c = presence.get_child("c", ns::CAPS)?;
        if c.attr("hash") != Some("sha-1") {
            return None;
        }
        let (node, ver) = (c.attr("node")?, c.attr("ver")?);
        if node.is_empty() || ver.is_empty() || node.len() > 1024 || ver.len() > 64 {
            return None;
        }
        Some(Caps {
            node: node.to_owned(),
            ver: ver.to_owned(),
        })
    }

    /// The disco#info `node` attribute to ask the entity about (§6.2).
    pub fn disco_node(&self) -> String {
        format!("{}#{}", self.node, self.ver)
    }
}

/// The features of a disco#info answer when its verification string hashes to `ver`
/// (§5.4: identities, features and forms each unique; no `<` in any part, which would
/// let one answer stand for another's string), else `None`.
pub fn verified_features(info: &Element, ver: &str) -> Option<Vec<String>> {
    let (string, features) = verification_string(info)?;
    let hash = sha1::Sha1::digest(string.as_bytes());
    let computed = base64::engine::general_purpose::STANDARD.encode(hash);
    (computed == ver).then_some(features)
}

/// The `ver` (SHA-1, base64) of a disco#info `<query/>`, for an entity that announces
/// its own capabilities; `None` when the answer breaks §5.4's rules.
pub fn ver(info: &Element) -> Option<String> {
    let (string, _) = verification_string(info)?;
    Some(base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(string.as_bytes())))
}

/// XEP-0115 §5.1's verification string of a disco#info `<query/>`, and its features.
fn verification_string(info: &Element) -> Option<(String, Vec<String>)> {
    if !info.is("query", ns::DISCO_INFO) {
        return None;
    }
    let mut identities = vec![];
    let mut features = vec![];
    let mut forms = vec![];
    for child in info.children() {
        if child.is("identity", ns::DISCO_INFO) {
            let parts = [
                child.attr("category").unwrap_or_default(),
                child.attr("type").unwrap_or_default(),
                child.attr_ns(XML_NS, "lang").unwrap_or_default(),
                child.attr("name").unwrap_or_default(),
            ];
            if parts.iter().any(|p| p.contains('<')) {
                return None;
            }
            identities.push(parts.join("/"));
        } else if child.is("feature", ns::DISCO_INFO) {
            let var = child.attr("var")?;
            if var.contains('<') {
                return None;
            }
            features.push(var.to_owned());
        } else if child.is("x", ns::DATA_FORMS) {
            // Forms without a FORM_TYPE are ignored (§5.4 3.6).
            if let Some(form) = form_string(child)? {
                forms.push(form);
            }
        }
    }
    identities.sort();
    features.sort();
    forms.sort();
    let unique = |v: &[String]| v.windows(2).all(|w| w[0] != w[1]);
    let form_types: Vec<&str> = forms.iter().map(|(t, _)| t.as_str()).collect();
    if !unique(&identities) || !unique(&features) || form_types.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let mut s = String::new();
    for i in &identities {
        s.push_str(i);
        s.push('<');
    }
    for f in &features {
        s.push_str(f);
        s.push('<');
    }
    for (_, form) in &forms {
        s.push_str(form);
    }
    Some((s, features))
}

/// One extended form's part of the string, keyed by its FORM_TYPE: `Some(None)` for a
/// form without one (left out, §5.4 3.6), `None` for an answer to refuse (a FORM_TYPE
/// with several values, a `<` anywhere).
fn form_string(form: &Element) -> Option<Option<(String, String)>> {
    let mut form_type = None;
    let mut fields = vec![];
    for field in form.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
        let var = field.attr("var")?;
        let mut values: Vec<String> = field
            .children()
            .filter(|v| v.is("value", ns::DATA_FORMS))
            .map(|v| v.text())
            .collect();
        if var.contains('<') || values.iter().any(|v| v.contains('<')) {
            return None;
        }
        if var == "FORM_TYPE" {
            if values.len() != 1 || form_type.is_some() {
                return None;
            }
            form_type = values.pop();
            continue;
        }
        values.sort();
        fields.push((var.to_owned(), values));
    }
    let Some(form_type) = form_type else {
        return Some(None);
    };
    fields.sort();
    let mut s = format!("{form_type}<");
    for (var, values) in fields {
        s.push_str(&var);
        s.push('<');
        for v in values {
            s.push_str(&v);
            s.push('<');
        }
    }
    Some(Some((form_type, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    /// An entity's own `ver` is what a client verifies.
    #[test]
    fn an_entitys_own_ver_is_the_one_clients_verify() {
        let info = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'>\
             <identity category='client' name='Exodus 0.9.1' type='pc'/>\
             <feature var='http://jabber.org/protocol/caps'/>\
             <feature var='http://jabber.org/protocol/disco#info'/>\
             <feature var='http://jabber.org/protocol/disco#items'/>\
             <feature var='http://jabber.org/protocol/muc'/></query>",
        );
        assert_eq!(ver(&info).as_deref(), Some("QgayPKawpkPSDYmwT/WM94uAlu0="));
        let twice = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'>\
             <feature var='a'/><feature var='a'/></query>",
        );
        assert_eq!(ver(&twice), None);
    }

    /// XEP-0115 §5.2's simple example.
    #[test]
    fn the_simple_example_verifies() {
        let info = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info' node='http://code.google.com/p/exodus#QgayPKawpkPSDYmwT/WM94uAlu0='>\
             <identity category='client' name='Exodus 0.9.1' type='pc'/>\
             <feature var='http://jabber.org/protocol/caps'/>\
             <feature var='http://jabber.org/protocol/disco#info'/>\
             <feature var='http://jabber.org/protocol/disco#items'/>\
             <feature var='http://jabber.org/protocol/muc'/></query>",
        );
        let features = verified_features(&info, "QgayPKawpkPSDYmwT/WM94uAlu0=").unwrap();
        assert_eq!(features.len(), 4);
        assert!(verified_features(&info, "AAAAPKawpkPSDYmwT/WM94uAlu0=").is_none());
    }

    /// XEP-0115 §5.3's complex example: languages, names and an extended form.
    #[test]
    fn the_complex_example_verifies() {
        let info = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'>\
             <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>\
             <identity xml:lang='el' category='client' name='Ψ 0.11' type='pc'/>\
             <feature var='http://jabber.org/protocol/caps'/>\
             <feature var='http://jabber.org/protocol/disco#info'/>\
             <feature var='http://jabber.org/protocol/disco#items'/>\
             <feature var='http://jabber.org/protocol/muc'/>\
             <x xmlns='jabber:x:data' type='result'>\
             <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>\
             <field var='ip_version'><value>ipv4</value><value>ipv6</value></field>\
             <field var='os'><value>Mac</value></field>\
             <field var='os_version'><value>10.5.1</value></field>\
             <field var='software'><value>Psi</value></field>\
             <field var='software_version'><value>0.11</value></field></x></query>",
        );
        assert!(verified_features(&info, "q07IKJEyjvHSyhy//CH0CxmKi8w=").is_some());
    }

    /// §5.4: a duplicated feature is refused, whatever the hash.
    #[test]
    fn duplicates_are_refused() {
        let info = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'>\
             <feature var='a'/><feature var='a'/></query>",
        );
        assert!(verification_string(&info).is_none());
    }

    /// The known preimage trick: a feature holding `<` would hash like two features
    /// (or an identity name like a feature), so such an answer is refused.
    #[test]
    fn a_less_than_sign_is_refused() {
        let merged = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'><identity category='client' type='pc' name='x&lt;urn:a+notify'/></query>",
        );
        assert!(verification_string(&merged).is_none());
        let feature = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'><feature var='a&lt;b'/></query>",
        );
        assert!(verification_string(&feature).is_none());
        // Forms without a FORM_TYPE are left out, not fatal.
        let forms = parse(
            "<query xmlns='http://jabber.org/protocol/disco#info'><feature var='a'/><x xmlns='jabber:x:data' type='result'><field var='x'><value>1</value></field></x><x xmlns='jabber:x:data' type='result'><field var='y'><value>2</value></field></x></query>",
        );
        assert_eq!(verification_string(&forms).unwrap().0, "a<");
    }

    #[test]
    fn only_sha1_caps_are_read() {
        let p = parse(
            "<presence xmlns='jabber:client'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>",
        );
        let caps = Caps::of_presence(&p).unwrap();
        assert_eq!(caps.disco_node(), "n#v");
        let legacy = parse(
            "<presence xmlns='jabber:client'><c xmlns='http://jabber.org/protocol/caps' node='n' ver='v'/></presence>",
        );
        assert!(Caps::of_presence(&legacy).is_none());
    }
}
