//! SASL2 (XEP-0388) with Bind 2 (XEP-0386) and FAST tokens (XEP-0484), without I/O:
//! what a client's `<authenticate/>` asks for, the tokens and proofs of the
//! `HT-SHA-256-NONE` mechanism (draft-schmaus-kitten-sasl-ht), the resource a Bind 2
//! request gets, and the elements the server answers with.
//!
//! A phone that comes back authenticates, binds a resource, enables stream management
//! and carbons, and gets a fresh token in one round trip, with no stream restart.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use impmesh_store::scram::ScramHash;
use minidom::Element;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::names::hex;
use crate::sasl::SaslFailure;
use crate::xml::{escape, ns};

pub const NS: &str = "urn:xmpp:sasl:2";
pub const BIND2: &str = "urn:xmpp:bind:0";
pub const FAST: &str = "urn:xmpp:fast:0";

/// The FAST mechanism offered. Its proofs do not depend on the connection, so only
/// their hashes need storing, never a token; the channel-binding variants (`-ENDP`,
/// `-EXPR`) would need the token itself on the server (docs/xmpp.md).
pub const HT_SHA_256_NONE: &str = "HT-SHA-256-NONE";

/// A user-agent `id` longer than this is refused (XEP-0388 suggests a UUID).
pub const MAX_CLIENT_ID: usize = 128;
/// Longer `software`, `device` and Bind 2 `tag` values are cut to this many characters.
pub const MAX_LABEL: usize = 64;

/// The client software and device, from `<user-agent/>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserAgent {
    /// Stable per installation; FAST tokens belong to it.
    pub id: Option<String>,
    pub software: String,
    pub device: String,
}

/// A Bind 2 request and the session features to enable with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindRequest {
    pub tag: Option<String>,
    /// XEP-0198 `<enable/>`: `Some(resume)`.
    pub sm: Option<bool>,
    /// XEP-0280 `<enable/>`.
    pub carbons: bool,
    /// XEP-0352: the session starts inactive.
    pub inactive: bool,
}

/// An XEP-0198 `<resume/>` inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub previd: String,
    /// `None` when the client's `h` is not a number: the resumption fails.
    pub h: Option<u32>,
}

/// A client's `<authenticate/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticate {
    pub mechanism: String,
    /// Present (possibly empty) when the client sent `<initial-response/>`.
    pub initial_response: Option<Vec<u8>>,
    pub user_agent: UserAgent,
    pub bind: Option<BindRequest>,
    pub resume: Option<Resume>,
    /// `<request-token mechanism='…'/>`.
    pub request_token: Option<String>,
    /// `<fast/>`: the client logs in with a token; `Some(invalidate)`.
    pub fast: Option<bool>,
}

/// Shown to admins (`impmesh user tokens`): no control or invisible formatting
/// characters (bidirectional overrides and the like).
fn shown(c: char) -> bool {
    !c.is_control() && !crate::core::upload::is_format(c)
}

fn label(text: String) -> String {
    let text = text.trim();
    text.chars().filter(|&c| shown(c)).take(MAX_LABEL).collect()
}

fn truthy(value: Option<&str>) -> bool {
    matches!(value, Some("true" | "1"))
}

/// Reads an `<authenticate xmlns='urn:xmpp:sasl:2'/>`.
pub fn parse(element: &Element) -> Result<Authenticate, SaslFailure> {
    let mechanism = element
        .attr("mechanism")
        .filter(|m| !m.is_empty())
        .ok_or(SaslFailure::InvalidMechanism)?
        .to_owned();
    let initial_response = match element.get_child("initial-response", NS) {
        Some(r) => {
            let text = r.text();
            let text = text.trim();
            Some(if text.is_empty() || text == "=" {
                Vec::new()
            } else {
                B64.decode(text)
                    .map_err(|_| SaslFailure::IncorrectEncoding)?
            })
        }
        None => None,
    };
    let mut user_agent = UserAgent::default();
    if let Some(ua) = element.get_child("user-agent", NS) {
        if let Some(id) = ua.attr("id") {
            if id.is_empty() || id.len() > MAX_CLIENT_ID || !id.chars().all(shown) {
                return Err(SaslFailure::MalformedRequest);
            }
            user_agent.id = Some(id.to_owned());
        }
        user_agent.software = ua
            .get_child("software", NS)
            .map(|e| label(e.text()))
            .unwrap_or_default();
        user_agent.device = ua
            .get_child("device", NS)
            .map(|e| label(e.text()))
            .unwrap_or_default();
    }
    let bind = element.get_child("bind", BIND2).map(|b| BindRequest {
        tag: b
            .get_child("tag", BIND2)
            .map(|t| label(t.text()))
            .filter(|t| !t.is_empty()),
        sm: b
            .get_child("enable", ns::SM)
            .map(|e| truthy(e.attr("resume"))),
        carbons: b.has_child("enable", ns::CARBONS),
        inactive: b.has_child("inactive", crate::core::csi::NS),
    });
    let resume = element.get_child("resume", ns::SM).map(|r| Resume {
        previd: r.attr("previd").unwrap_or_default().to_owned(),
        h: r.attr("h").and_then(|h| h.parse().ok()),
    });
    let request_token = element
        .get_child("request-token", FAST)
        .map(|r| r.attr("mechanism").unwrap_or_default().to_owned());
    let fast = element
        .get_child("fast", FAST)
        .map(|f| truthy(f.attr("invalidate")));
    Ok(Authenticate {
        mechanism,
        initial_response,
        user_agent,
        bind,
        resume,
        request_token,
        fast,
    })
}

/// The `<authentication/>` stream feature: `mechanisms`, and inline Bind 2 (with
/// stream management, carbons and client state), XEP-0198 resumption and, where
/// `fast`, FAST.
pub fn feature(mechanisms: &[&str], fast: bool) -> String {
    let mut out = format!("<authentication xmlns='{NS}'>");
    for m in mechanisms {
        out.push_str(&format!("<mechanism>{m}</mechanism>"));
    }
    out.push_str(&format!(
        "<inline><bind xmlns='{BIND2}'><inline><feature var='{}'/><feature var='{}'/><feature var='{}'/></inline></bind><sm xmlns='{}'/>",
        ns::SM,
        ns::CARBONS,
        crate::core::csi::NS,
        ns::SM
    ));
    if fast {
        out.push_str(&format!(
            "<fast xmlns='{FAST}'><mechanism>{HT_SHA_256_NONE}</mechanism></fast>"
        ));
    }
    out.push_str("</inline></authentication>");
    out
}

/// `<challenge/>` with `data`.
pub fn challenge(data: &[u8]) -> String {
    if data.is_empty() {
        return format!("<challenge xmlns='{NS}'/>");
    }
    format!("<challenge xmlns='{NS}'>{}</challenge>", B64.encode(data))
}

/// `<failure/>` with an RFC 6120 condition.
pub fn failure(condition: SaslFailure, text: Option<&str>) -> String {
    let text = text
        .map(|t| format!("<text xml:lang='en'>{}</text>", escape(t)))
        .unwrap_or_default();
    format!(
        "<failure xmlns='{NS}'><{} xmlns='{}'/>{text}</failure>",
        condition.as_str(),
        ns::SASL
    )
}

/// `<success/>`: the mechanism's final data, the identity now in force (a full JID
/// once a resource is bound or a session resumed), and what inline features answered.
pub fn success(additional: Option<&[u8]>, identity: &str, inner: &str) -> String {
    let additional = additional
        .map(|d| format!("<additional-data>{}</additional-data>", B64.encode(d)))
        .unwrap_or_default();
    format!(
        "<success xmlns='{NS}'>{additional}<authorization-identifier>{}</authorization-identifier>{inner}</success>",
        escape(identity)
    )
}

/// What a successful SASL2 exchange answers with, whoever sends the `<success/>`: the
/// negotiation for a new session, or the session a `<resume/>` goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// The mechanism's final data.
    pub additional: Option<Vec<u8>>,
    /// Elements after the inline features' answers (a FAST `<token/>`).
    pub extra: String,
    /// The stream features that follow the success (empty: none).
    pub features: String,
}

impl Completion {
    /// `<success/>` for `identity` with `inner` (inline answers) and the extras, then
    /// the new stream features (once a session is bound or resumed, only what informs:
    /// the server's capabilities).
    pub fn bound(&self, identity: &str, inner: &str) -> String {
        let mut out = success(
            self.additional.as_deref(),
            identity,
            &format!("{inner}{}", self.extra),
        );
        if self.features.is_empty() {
            out.push_str("<stream:features/>");
        } else {
            out.push_str(&self.features);
        }
        out
    }
}

/// A FAST token for the client, and what the server keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// Given to the client; never stored.
    pub token: String,
    /// Hex SHA-256 of the initiator proof the client will send.
    pub initiator: String,
    /// The responder proof the server answers with (base64).
    pub responder: String,
}

fn ht_proof(token: &[u8], label: &[u8]) -> Vec<u8> {
    ScramHash::Sha256.hmac(token, label)
}

/// What is stored of an initiator proof: its SHA-256, in hex.
pub fn initiator_hash(proof: &[u8]) -> String {
    hex(&Sha256::digest(proof))
}

impl IssuedToken {
    /// 32 random bytes, base64url: the token's text is the HMAC key (as clients use it).
    pub fn generate() -> IssuedToken {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        IssuedToken::from_token(B64URL.encode(raw))
    }

    fn from_token(token: String) -> IssuedToken {
        // HT-*-NONE: no channel binding data follows the label.
        let initiator = initiator_hash(&ht_proof(token.as_bytes(), b"Initiator"));
        let responder = B64.encode(ht_proof(token.as_bytes(), b"Responder"));
        IssuedToken {
            token,
            initiator,
            responder,
        }
    }

    /// The `<token/>` element, expiring at `expires` (Unix seconds).
    pub fn xml(&self, expires: i64) -> String {
        format!(
            "<token xmlns='{FAST}' expiry='{}' token='{}'/>",
            crate::time::rfc3339(expires),
            self.token
        )
    }
}

/// An `HT-SHA-256-NONE` initial response: the user name and the hash of the proof.
pub fn ht_response(data: &[u8]) -> Result<(String, String), SaslFailure> {
    let split = data
        .iter()
        .position(|&b| b == 0)
        .ok_or(SaslFailure::MalformedRequest)?;
    let (name, proof) = (&data[..split], &data[split + 1..]);
    let name = std::str::from_utf8(name).map_err(|_| SaslFailure::MalformedRequest)?;
    if name.is_empty() || proof.len() != 32 {
        return Err(SaslFailure::MalformedRequest);
    }
    Ok((name.to_owned(), initiator_hash(proof)))
}

/// Whether a token issued at `issued` and expiring at `expires` is due for a
/// replacement at `now`: past half its life.
pub fn rotation_due(issued: i64, expires: i64, now: i64) -> bool {
    now >= issued + (expires - issued) / 2
}

/// The resource a Bind 2 request gets: `tag/id` (XEP-0386 §3.2), the tag left out when
/// it is not a valid resourcepart. The id is the same for every bind of one client (a
/// keyed hash of the account and the user-agent id, which it does not reveal), so a
/// client that binds again replaces its earlier session; without a user-agent id it
/// is random.
pub fn resource(key: &[u8], user: &str, agent: Option<&str>, tag: Option<&str>) -> String {
    let id = match agent {
        Some(agent) => {
            let message = [user.as_bytes(), b"\0", agent.as_bytes()].concat();
            B64URL.encode(&ScramHash::Sha256.hmac(key, &message)[..9])
        }
        None => {
            let mut raw = [0u8; 9];
            rand::thread_rng().fill_bytes(&mut raw);
            B64URL.encode(raw)
        }
    };
    match tag.filter(|t| jid::ResourcePart::new(&format!("{t}/{id}")).is_ok()) {
        Some(tag) => format!("{tag}/{id}"),
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(xml: &str) -> Result<Authenticate, SaslFailure> {
        parse(&xml.parse::<Element>().unwrap())
    }

    #[test]
    fn an_authenticate_request_is_read_with_its_inline_requests() {
        let a = parse_str(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='SCRAM-SHA-1'>\
               <initial-response>biwsbj11c2VyLHI9YWJj</initial-response>\
               <user-agent id='d4565fa7-4d72-4749-b3d3-740edbf87770'>\
                 <software>AwesomeXMPP</software><device>Kiva's Phone</device></user-agent>\
               <bind xmlns='urn:xmpp:bind:0'><tag>AwesomeXMPP</tag>\
                 <enable xmlns='urn:xmpp:carbons:2'/><enable xmlns='urn:xmpp:sm:3' resume='true'/>\
                 <inactive xmlns='urn:xmpp:csi:0'/></bind>\
               <resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>\
               <request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-NONE'/>\
             </authenticate>",
        )
        .unwrap();
        assert_eq!(a.mechanism, "SCRAM-SHA-1");
        assert_eq!(a.initial_response.as_deref(), Some(&b"n,,n=user,r=abc"[..]));
        assert_eq!(
            a.user_agent.id.as_deref(),
            Some("d4565fa7-4d72-4749-b3d3-740edbf87770")
        );
        assert_eq!(a.user_agent.device, "Kiva's Phone");
        assert_eq!(
            a.bind,
            Some(BindRequest {
                tag: Some("AwesomeXMPP".into()),
                sm: Some(true),
                carbons: true,
                inactive: true,
            })
        );
        assert_eq!(
            a.resume,
            Some(Resume {
                previd: "abc".into(),
                h: Some(7)
            })
        );
        assert_eq!(a.request_token.as_deref(), Some(HT_SHA_256_NONE));
        assert_eq!(a.fast, None);

        let fast = parse_str(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-NONE'>\
               <fast xmlns='urn:xmpp:fast:0' invalidate='true'/></authenticate>",
        )
        .unwrap();
        assert_eq!(fast.fast, Some(true));
        assert_eq!(fast.initial_response, None);
        assert_eq!(fast.bind, None);
    }

    #[test]
    fn bad_requests_are_refused_with_their_conditions() {
        assert_eq!(
            parse_str("<authenticate xmlns='urn:xmpp:sasl:2'/>"),
            Err(SaslFailure::InvalidMechanism)
        );
        assert_eq!(
            parse_str(
                "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>***</initial-response></authenticate>"
            ),
            Err(SaslFailure::IncorrectEncoding)
        );
        let long = "x".repeat(MAX_CLIENT_ID + 1);
        assert_eq!(
            parse_str(
                "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><user-agent id='a\u{202e}b'/></authenticate>"
            ),
            Err(SaslFailure::MalformedRequest)
        );
        assert_eq!(
            parse_str(&format!(
                "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><user-agent id='{long}'/></authenticate>"
            )),
            Err(SaslFailure::MalformedRequest)
        );
        // Labels are cut, not refused.
        let a = parse_str(&format!(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><user-agent id='a'><software>{long}</software></user-agent></authenticate>"
        ))
        .unwrap();
        assert_eq!(a.user_agent.software.len(), MAX_LABEL);
    }

    #[test]
    fn tokens_are_checked_by_the_hash_of_their_proof() {
        let issued = IssuedToken::generate();
        assert_eq!(issued.token.len(), 43);
        assert_ne!(issued.token, IssuedToken::generate().token);
        // What a client sends: the user name, NUL, HMAC-SHA-256(token, "Initiator").
        let proof = ht_proof(issued.token.as_bytes(), b"Initiator");
        let mut response = b"alice\0".to_vec();
        response.extend_from_slice(&proof);
        let (user, hash) = ht_response(&response).unwrap();
        assert_eq!(user, "alice");
        assert_eq!(hash, issued.initiator);
        // The stored hash is not the proof: a copy of the store cannot log in.
        assert_ne!(hash, hex(&proof));
        assert_eq!(
            B64.decode(&issued.responder).unwrap(),
            ht_proof(issued.token.as_bytes(), b"Responder")
        );
        assert_eq!(ht_response(b"alice"), Err(SaslFailure::MalformedRequest));
        assert_eq!(
            ht_response(b"alice\0short"),
            Err(SaslFailure::MalformedRequest)
        );
        assert_eq!(ht_response(&[0; 33]), Err(SaslFailure::MalformedRequest));
        let xml = issued.xml(86_400);
        assert!(xml.contains("expiry='1970-01-02T00:00:00Z'"), "{xml}");
    }

    const RESPONDER_SECRET: &str =
        "89c7af02627bcde98741a1090dffb254610f1e335bbf086e3b02e708ada5a682";

    /// A known vector: the HMAC-SHA-256 of "Initiator" and "Responder" keyed with the
    /// token's text, as xmpp.js's HT-SHA-256-NONE computes it.
    #[test]
    fn proofs_are_hmac_sha256_keyed_with_the_token_text() {
        // Computed apart, with `printf Responder | openssl dgst -sha256 -hmac secret`.
        let t = IssuedToken::from_token("secret".into());
        assert_eq!(hex(&B64.decode(&t.responder).unwrap()), RESPONDER_SECRET);
    }

    #[test]
    fn tokens_rotate_past_half_their_life() {
        assert!(!rotation_due(0, 100, 49));
        assert!(rotation_due(0, 100, 50));
        assert!(rotation_due(0, 100, 200));
    }

    #[test]
    fn bind2_resources_are_stable_per_client_and_carry_the_tag() {
        let a = resource(b"k", "alice", Some("ua-1"), Some("Conversations"));
        assert!(a.starts_with("Conversations/"), "{a}");
        assert_eq!(
            a,
            resource(b"k", "alice", Some("ua-1"), Some("Conversations"))
        );
        assert_ne!(
            a,
            resource(b"k", "alice", Some("ua-2"), Some("Conversations"))
        );
        assert_ne!(
            a,
            resource(b"k", "bob", Some("ua-1"), Some("Conversations"))
        );
        assert_ne!(
            a,
            resource(b"other", "alice", Some("ua-1"), Some("Conversations"))
        );
        // The id does not show the user-agent id.
        assert!(!a.contains("ua-1"));
        // Without a user-agent id: random; a tag that is no resourcepart is left out.
        assert_ne!(
            resource(b"k", "alice", None, None),
            resource(b"k", "alice", None, None)
        );
        let bad = resource(b"k", "alice", Some("ua-1"), Some("\u{202e}"));
        assert!(!bad.contains('/'), "{bad}");
    }

    #[test]
    fn answers_are_well_formed() {
        for xml in [
            feature(&["SCRAM-SHA-1", "PLAIN"], true),
            feature(&["SCRAM-SHA-1"], false),
            challenge(b""),
            challenge(b"r=abc"),
            failure(SaslFailure::CredentialsExpired, Some("a <token>")),
            success(Some(b"v=x"), "a@b/c", "<bound xmlns='urn:xmpp:bind:0'/>"),
        ] {
            let e: Element = xml.parse().unwrap_or_else(|e| panic!("{xml}: {e}"));
            assert_eq!(e.ns(), NS);
        }
        let f: Element = feature(&["PLAIN"], true).parse().unwrap();
        let inline = f.get_child("inline", NS).unwrap();
        assert!(inline.has_child("fast", FAST));
        assert!(inline.has_child("bind", BIND2));
        assert!(inline.has_child("sm", ns::SM));
        let s: Element = success(None, "a@b", "").parse().unwrap();
        assert_eq!(
            s.get_child("authorization-identifier", NS).unwrap().text(),
            "a@b"
        );
    }
}
