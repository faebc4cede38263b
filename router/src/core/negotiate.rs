//! Client stream negotiation (RFC 6120 §4–§7) as typed steps, without I/O.
//!
//! Each stage of a client stream is its own type, and the only way to the next stage
//! is a method that consumes the one before: [`NeedTls::secured`] (after STARTTLS),
//! [`NeedAuth::succeeded`] (after SASL). A step out of order does not compile: there
//! is no way to bind a resource on a [`NeedAuth`], or to authenticate a [`NeedTls`]
//! stream. Each stage says what it offers (its `<stream:features/>`) and what it does
//! with the next top-level element the client sends ([`Request`]).
//!
//! The whole negotiation runs under one deadline, set when the connection is accepted
//! and carried from stage to stage: STARTTLS and SASL do not restart it.

use tokio::time::{Duration, Instant};

use crate::error::StreamErrorCondition;

/// SASL attempts allowed on one stream before it is closed.
pub const MAX_AUTH_ATTEMPTS: u32 = 3;

/// A top-level element a client sends while negotiating, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>`.
    StartTls,
    /// `<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>`.
    Auth,
    /// `<authenticate xmlns='urn:xmpp:sasl:2'/>` (XEP-0388: no stream restart after).
    Authenticate,
    /// An IQ with an XEP-0077 `<query xmlns='jabber:iq:register'/>`.
    Register,
    /// An IQ with `<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>`.
    Bind,
    /// XEP-0198 `<resume/>`.
    Resume,
    /// XEP-0198 `<enable/>`.
    Enable,
    /// Any other IQ.
    Iq,
    /// Anything else.
    Other,
}

impl Request {
    /// Classifies an element by its name, namespace, and (for IQs) whether it has a
    /// child of a given name and namespace.
    pub fn classify(name: &str, ns: &str, has_child: impl Fn(&str, &str) -> bool) -> Request {
        use crate::xml::ns;
        match (name, ns) {
            ("starttls", ns::TLS) => Request::StartTls,
            ("auth", ns::SASL) => Request::Auth,
            ("authenticate", crate::core::sasl2::NS) => Request::Authenticate,
            ("resume", ns::SM) => Request::Resume,
            ("enable", ns::SM) => Request::Enable,
            ("iq", ns::CLIENT) if has_child("query", ns::REGISTER) => Request::Register,
            ("iq", ns::CLIENT) if has_child("bind", ns::BIND) => Request::Bind,
            ("iq", ns::CLIENT) => Request::Iq,
            _ => Request::Other,
        }
    }
}

/// The stream is closed with this error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub condition: StreamErrorCondition,
    pub text: &'static str,
}

fn refuse(condition: StreamErrorCondition, text: &'static str) -> Refusal {
    Refusal { condition, text }
}

/// What a stage offers in `<stream:features/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// STARTTLS, required.
    StartTls,
    /// SASL mechanisms (and in-band registration where the server allows it).
    Sasl,
    /// Resource binding, the legacy session, XEP-0198 and roster versioning.
    Bind,
}

/// Where a new connection starts.
#[derive(Debug)]
pub enum Start {
    /// Plain TCP on the STARTTLS port (5222).
    NeedTls(NeedTls),
    /// TLS from the first byte (5223, XEP-0368).
    NeedAuth(NeedAuth),
}

/// A connection accepted at `now`, with `timeout` for the whole negotiation.
pub fn start(direct_tls: bool, now: Instant, timeout: Duration) -> Start {
    let deadline = now + timeout;
    if direct_tls {
        Start::NeedAuth(NeedAuth {
            deadline,
            failures: 0,
        })
    } else {
        Start::NeedTls(NeedTls { deadline })
    }
}

/// The negotiation's deadline, the same at every stage.
fn expired(deadline: Instant, now: Instant) -> Result<(), Refusal> {
    if now >= deadline {
        return Err(refuse(
            StreamErrorCondition::ConnectionTimeout,
            "negotiation took too long",
        ));
    }
    Ok(())
}

/// Plain TCP: only STARTTLS may come next.
#[derive(Debug)]
pub struct NeedTls {
    deadline: Instant,
}

impl NeedTls {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn offer(&self) -> Offer {
        Offer::StartTls
    }

    /// `Ok` for STARTTLS (answer `<proceed/>`, then [`Self::secured`] once TLS is up).
    pub fn on(&self, request: Request, now: Instant) -> Result<(), Refusal> {
        expired(self.deadline, now)?;
        match request {
            Request::StartTls => Ok(()),
            _ => Err(refuse(
                StreamErrorCondition::PolicyViolation,
                "STARTTLS is required before anything else",
            )),
        }
    }

    /// TLS is up: the client authenticates next, on a new stream.
    pub fn secured(self) -> NeedAuth {
        NeedAuth {
            deadline: self.deadline,
            failures: 0,
        }
    }
}

/// What an unauthenticated stream does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStep {
    /// Run a SASL exchange; then [`NeedAuth::succeeded`] or [`NeedAuth::failed`].
    Authenticate,
    /// Run a SASL2 exchange (XEP-0388), with what it asks for inline; then as above.
    Authenticate2,
    /// Answer an XEP-0077 registration request (the stream stays unauthenticated).
    Register,
}

/// TLS up, not authenticated.
#[derive(Debug)]
pub struct NeedAuth {
    deadline: Instant,
    failures: u32,
}

impl NeedAuth {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn offer(&self) -> Offer {
        Offer::Sasl
    }

    /// What to do with `request`; `registration`: the server allows XEP-0077.
    pub fn on(
        &self,
        request: Request,
        registration: bool,
        now: Instant,
    ) -> Result<AuthStep, Refusal> {
        expired(self.deadline, now)?;
        match request {
            Request::Auth => Ok(AuthStep::Authenticate),
            Request::Authenticate => Ok(AuthStep::Authenticate2),
            Request::Register if registration => Ok(AuthStep::Register),
            _ => Err(refuse(
                StreamErrorCondition::NotAuthorized,
                "authenticate first",
            )),
        }
    }

    /// A SASL exchange failed (the failure was sent): the client may try again, a few
    /// times.
    pub fn failed(&mut self) -> Result<(), Refusal> {
        self.failures += 1;
        if self.failures >= MAX_AUTH_ATTEMPTS {
            return Err(refuse(
                StreamErrorCondition::PolicyViolation,
                "too many failed authentication attempts",
            ));
        }
        Ok(())
    }

    /// Authenticated as `user` (a normalised localpart): binding comes next, on a new
    /// stream.
    pub fn succeeded(self, user: String) -> Authenticated {
        Authenticated {
            deadline: self.deadline,
            user,
        }
    }
}

/// What an authenticated stream does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindStep {
    /// Bind a resource: the stream becomes a session.
    Bind,
    /// XEP-0198 resumption: the connection goes to the session it names, or `<failed/>`.
    Resume,
    /// XEP-0198 `<enable/>` before binding: `<failed/>` with `unexpected-request`
    /// (XEP-0198 §3), the stream goes on.
    EnableTooEarly,
    /// Another IQ before binding: `not-allowed` (RFC 6120 §7.1), the stream goes on.
    IqTooEarly,
}

/// Authenticated, no resource bound yet.
#[derive(Debug)]
pub struct Authenticated {
    deadline: Instant,
    user: String,
}

impl Authenticated {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn offer(&self) -> Offer {
        Offer::Bind
    }

    /// The authenticated user's normalised localpart.
    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn on(&self, request: Request, now: Instant) -> Result<BindStep, Refusal> {
        expired(self.deadline, now)?;
        match request {
            Request::Bind => Ok(BindStep::Bind),
            Request::Resume => Ok(BindStep::Resume),
            Request::Enable => Ok(BindStep::EnableTooEarly),
            Request::Iq | Request::Register => Ok(BindStep::IqTooEarly),
            _ => Err(refuse(
                StreamErrorCondition::NotAuthorized,
                "bind a resource first",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::ns;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn plain() -> NeedTls {
        match start(false, Instant::now(), TIMEOUT) {
            Start::NeedTls(s) => s,
            other => panic!("{other:?}"),
        }
    }

    const EVERY: [Request; 9] = [
        Request::StartTls,
        Request::Auth,
        Request::Authenticate,
        Request::Register,
        Request::Bind,
        Request::Resume,
        Request::Enable,
        Request::Iq,
        Request::Other,
    ];

    #[test]
    fn requests_are_classified_by_name_namespace_and_child() {
        let none = |_: &str, _: &str| false;
        assert_eq!(
            Request::classify("starttls", ns::TLS, none),
            Request::StartTls
        );
        assert_eq!(
            Request::classify("starttls", ns::SASL, none),
            Request::Other
        );
        assert_eq!(Request::classify("auth", ns::SASL, none), Request::Auth);
        assert_eq!(
            Request::classify("authenticate", "urn:xmpp:sasl:2", none),
            Request::Authenticate
        );
        assert_eq!(
            Request::classify("authenticate", ns::SASL, none),
            Request::Other
        );
        assert_eq!(Request::classify("resume", ns::SM, none), Request::Resume);
        assert_eq!(Request::classify("enable", ns::SM, none), Request::Enable);
        assert_eq!(Request::classify("iq", ns::CLIENT, none), Request::Iq);
        let bind = |n: &str, x: &str| (n, x) == ("bind", ns::BIND);
        assert_eq!(Request::classify("iq", ns::CLIENT, bind), Request::Bind);
        let register = |n: &str, x: &str| (n, x) == ("query", ns::REGISTER);
        assert_eq!(
            Request::classify("iq", ns::CLIENT, register),
            Request::Register
        );
        // An IQ in another namespace is not a client IQ.
        assert_eq!(
            Request::classify("iq", "jabber:server", bind),
            Request::Other
        );
    }

    #[tokio::test(start_paused = true)]
    async fn plain_streams_take_starttls_and_nothing_else() {
        let s = plain();
        assert_eq!(s.offer(), Offer::StartTls);
        for r in EVERY {
            let got = s.on(r, Instant::now());
            if r == Request::StartTls {
                assert_eq!(got, Ok(()));
            } else {
                assert_eq!(
                    got.unwrap_err().condition,
                    StreamErrorCondition::PolicyViolation,
                    "{r:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn authentication_comes_before_anything_else() {
        let s = plain().secured();
        assert_eq!(s.offer(), Offer::Sasl);
        let now = Instant::now();
        assert_eq!(s.on(Request::Auth, false, now), Ok(AuthStep::Authenticate));
        assert_eq!(
            s.on(Request::Authenticate, false, now),
            Ok(AuthStep::Authenticate2)
        );
        assert_eq!(s.on(Request::Register, true, now), Ok(AuthStep::Register));
        // Registration only where the server allows it.
        assert_eq!(
            s.on(Request::Register, false, now).unwrap_err().condition,
            StreamErrorCondition::NotAuthorized
        );
        for r in [
            Request::Bind,
            Request::Resume,
            Request::Iq,
            Request::StartTls,
        ] {
            assert_eq!(
                s.on(r, true, now).unwrap_err().condition,
                StreamErrorCondition::NotAuthorized,
                "{r:?}"
            );
        }
    }

    #[test]
    fn failed_attempts_are_counted_until_the_stream_is_closed() {
        let mut s = plain().secured();
        for _ in 1..MAX_AUTH_ATTEMPTS {
            assert_eq!(s.failed(), Ok(()));
        }
        assert_eq!(
            s.failed().unwrap_err().condition,
            StreamErrorCondition::PolicyViolation
        );
        // Direct TLS starts at the same place with the same count.
        let Start::NeedAuth(mut d) = start(true, Instant::now(), TIMEOUT) else {
            panic!("direct TLS starts unauthenticated");
        };
        for _ in 1..MAX_AUTH_ATTEMPTS {
            assert_eq!(d.failed(), Ok(()));
        }
        assert!(d.failed().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn after_authentication_a_resource_is_bound_or_a_session_resumed() {
        let s = plain().secured().succeeded("alice".into());
        assert_eq!(s.user(), "alice");
        assert_eq!(s.offer(), Offer::Bind);
        let now = Instant::now();
        assert_eq!(s.on(Request::Bind, now), Ok(BindStep::Bind));
        assert_eq!(s.on(Request::Resume, now), Ok(BindStep::Resume));
        assert_eq!(s.on(Request::Enable, now), Ok(BindStep::EnableTooEarly));
        assert_eq!(s.on(Request::Iq, now), Ok(BindStep::IqTooEarly));
        assert_eq!(s.on(Request::Register, now), Ok(BindStep::IqTooEarly));
        for r in [
            Request::Auth,
            Request::Authenticate,
            Request::StartTls,
            Request::Other,
        ] {
            assert_eq!(
                s.on(r, now).unwrap_err().condition,
                StreamErrorCondition::NotAuthorized,
                "{r:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_deadline_for_the_whole_negotiation() {
        let s = plain();
        let deadline = s.deadline();
        assert_eq!(deadline, Instant::now() + TIMEOUT);
        tokio::time::advance(TIMEOUT / 2).await;
        // STARTTLS and SASL do not restart the clock.
        let s = s.secured();
        assert_eq!(s.deadline(), deadline);
        tokio::time::advance(TIMEOUT / 4).await;
        let s = s.succeeded("alice".into());
        assert_eq!(s.deadline(), deadline);
        assert_eq!(s.on(Request::Bind, Instant::now()), Ok(BindStep::Bind));
        tokio::time::advance(TIMEOUT / 4).await;
        assert_eq!(
            s.on(Request::Bind, Instant::now()).unwrap_err().condition,
            StreamErrorCondition::ConnectionTimeout
        );
    }
}
