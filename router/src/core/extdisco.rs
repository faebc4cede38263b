//! External service discovery (XEP-0215, `urn:xmpp:extdisco:2`): the cluster's TURN
//! and STUN relays as a client asks for them, each TURN relay with short-lived
//! credentials for the asking user (`restricted='1'`).

use crate::xml::{escape, ns};

/// What a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Turn,
    Turns,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stun => "stun",
            Kind::Turn => "turn",
            Kind::Turns => "turns",
        }
    }
}

/// A credential for a relay (the TURN REST API form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
    /// Unix seconds.
    pub expires: i64,
}

/// One relay as XEP-0215 §3 lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    /// "udp" or "tcp".
    pub transport: &'static str,
    pub credential: Option<Credential>,
}

impl Service {
    fn xml(&self) -> String {
        let mut s = format!(
            "<service type='{}' host='{}' port='{}' transport='{}'",
            self.kind.as_str(),
            escape(&self.host),
            self.port,
            self.transport
        );
        if let Some(c) = &self.credential {
            s.push_str(&format!(
                " restricted='1' username='{}' password='{}' expires='{}'",
                escape(&c.username),
                escape(&c.password),
                crate::time::rfc3339(c.expires)
            ));
        }
        s.push_str("/>");
        s
    }
}

/// The answer to `<services/>`, with only the services of `kind` when the request
/// names one (§3.1).
pub fn services(all: &[Service], kind: Option<&str>) -> String {
    let body: String = all
        .iter()
        .filter(|s| kind.is_none_or(|k| k == s.kind.as_str()))
        .map(Service::xml)
        .collect();
    format!("<services xmlns='{}'>{body}</services>", ns::EXTDISCO)
}

/// The answer to `<credentials><service host type [port]/></credentials>` (§3.3):
/// the named services with their credentials; `None` when none matches (the request
/// gets item-not-found).
pub fn credentials(all: &[Service], host: &str, kind: &str, port: Option<u16>) -> Option<String> {
    let body: String = all
        .iter()
        .filter(|s| s.host == host && s.kind.as_str() == kind && port.is_none_or(|p| p == s.port))
        .filter(|s| s.credential.is_some())
        .map(Service::xml)
        .collect();
    (!body.is_empty())
        .then(|| format!("<credentials xmlns='{}'>{body}</credentials>", ns::EXTDISCO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    fn relay() -> Vec<Service> {
        let credential = Credential {
            username: "1800003600:alice".into(),
            password: "p/w=".into(),
            expires: 1_800_003_600,
        };
        vec![
            Service {
                kind: Kind::Stun,
                host: "turn.example.com".into(),
                port: 3478,
                transport: "udp",
                credential: None,
            },
            Service {
                kind: Kind::Turn,
                host: "turn.example.com".into(),
                port: 3478,
                transport: "udp",
                credential: Some(credential.clone()),
            },
            Service {
                kind: Kind::Turn,
                host: "turn.example.com".into(),
                port: 3478,
                transport: "tcp",
                credential: Some(credential),
            },
        ]
    }

    #[test]
    fn services_and_credentials_answers() {
        let all: Element = services(&relay(), None).parse().unwrap();
        assert_eq!(all.children().count(), 3);
        let turn = all.children().nth(1).unwrap();
        assert_eq!(turn.attr("type"), Some("turn"));
        assert_eq!(turn.attr("restricted"), Some("1"));
        assert_eq!(turn.attr("username"), Some("1800003600:alice"));
        assert_eq!(turn.attr("password"), Some("p/w="));
        assert_eq!(turn.attr("expires"), Some("2027-01-15T09:00:00Z"));
        let stun: Element = services(&relay(), Some("stun")).parse().unwrap();
        assert_eq!(stun.children().count(), 1);
        assert_eq!(stun.children().next().unwrap().attr("username"), None);
        let c: Element = credentials(&relay(), "turn.example.com", "turn", Some(3478))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(c.name(), "credentials");
        assert_eq!(c.children().count(), 2);
        // Unknown services, and STUN (which needs none), have no credentials.
        assert_eq!(
            credentials(&relay(), "other.example.com", "turn", None),
            None
        );
        assert_eq!(
            credentials(&relay(), "turn.example.com", "stun", None),
            None
        );
        assert_eq!(
            credentials(&relay(), "turn.example.com", "turn", Some(5349)),
            None
        );
    }
}
