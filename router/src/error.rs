//! Errors of the router, kept apart by who is at fault (STYLE 7): the peer broke the
//! protocol (a stream error per RFC 6120 §4.9.3 ends the stream), a request is refused (a
//! stanza error per RFC 6120 §8.3 answers it), or something failed locally.

use minidom::Element;

use crate::xml::ns;

/// RFC 6120 §4.9.3 stream error conditions that this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamErrorCondition {
    BadFormat,
    Conflict,
    ConnectionTimeout,
    HostUnknown,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    ResourceConstraint,
    RestrictedXml,
    SeeOtherHost,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl From<crate::xml::FrameError> for StreamErrorCondition {
    fn from(e: crate::xml::FrameError) -> StreamErrorCondition {
        use crate::xml::FrameError;
        match e {
            FrameError::NotWellFormed => StreamErrorCondition::NotWellFormed,
            FrameError::RestrictedXml => StreamErrorCondition::RestrictedXml,
            FrameError::NotAStream => StreamErrorCondition::InvalidNamespace,
            FrameError::OverLimit => StreamErrorCondition::PolicyViolation,
        }
    }
}

impl StreamErrorCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadFormat => "bad-format",
            Self::Conflict => "conflict",
            Self::ConnectionTimeout => "connection-timeout",
            Self::HostUnknown => "host-unknown",
            Self::InternalServerError => "internal-server-error",
            Self::InvalidFrom => "invalid-from",
            Self::InvalidNamespace => "invalid-namespace",
            Self::NotAuthorized => "not-authorized",
            Self::NotWellFormed => "not-well-formed",
            Self::PolicyViolation => "policy-violation",
            Self::ResourceConstraint => "resource-constraint",
            Self::RestrictedXml => "restricted-xml",
            Self::SeeOtherHost => "see-other-host",
            Self::SystemShutdown => "system-shutdown",
            Self::UndefinedCondition => "undefined-condition",
            Self::UnsupportedStanzaType => "unsupported-stanza-type",
            Self::UnsupportedVersion => "unsupported-version",
        }
    }

    /// RFC 6120 §4.9.3.19: `see-other-host` naming where to connect (`host:port`, an
    /// IPv6 address in brackets).
    pub fn see_other_host_xml(address: &str, text: Option<&str>) -> String {
        let text = text_xml(text);
        format!(
            "<stream:error><see-other-host xmlns='{}'>{}</see-other-host>{text}</stream:error>",
            ns::STREAMS,
            crate::xml::escape(address)
        )
    }

    /// The `<stream:error>` element, with an optional human-readable text.
    pub fn to_xml(self, text: Option<&str>) -> String {
        let text = text_xml(text);
        format!(
            "<stream:error><{} xmlns='{}'/>{text}</stream:error>",
            self.as_str(),
            ns::STREAMS
        )
    }
}

/// The `<text/>` of a stream error, or nothing.
fn text_xml(text: Option<&str>) -> String {
    text.map(|t| {
        format!(
            "<text xmlns='{}'>{}</text>",
            ns::STREAMS,
            crate::xml::escape(t)
        )
    })
    .unwrap_or_default()
}

impl std::fmt::Display for StreamErrorCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RFC 6120 §8.3.3 stanza error conditions that this server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StanzaErrorCondition {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RegistrationRequired,
    RecipientUnavailable,
    RemoteServerNotFound,
    RemoteServerTimeout,
    ResourceConstraint,
    ServiceUnavailable,
    UndefinedCondition,
    UnexpectedRequest,
}

impl StanzaErrorCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Conflict => "conflict",
            Self::FeatureNotImplemented => "feature-not-implemented",
            Self::Forbidden => "forbidden",
            Self::InternalServerError => "internal-server-error",
            Self::ItemNotFound => "item-not-found",
            Self::JidMalformed => "jid-malformed",
            Self::NotAcceptable => "not-acceptable",
            Self::NotAllowed => "not-allowed",
            Self::NotAuthorized => "not-authorized",
            Self::PolicyViolation => "policy-violation",
            Self::RegistrationRequired => "registration-required",
            Self::RecipientUnavailable => "recipient-unavailable",
            Self::RemoteServerNotFound => "remote-server-not-found",
            Self::RemoteServerTimeout => "remote-server-timeout",
            Self::ResourceConstraint => "resource-constraint",
            Self::ServiceUnavailable => "service-unavailable",
            Self::UndefinedCondition => "undefined-condition",
            Self::UnexpectedRequest => "unexpected-request",
        }
    }

    /// The error `type` RFC 6120 §8.3.3 gives for the condition.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::BadRequest | Self::JidMalformed | Self::NotAcceptable => "modify",
            Self::Conflict
            | Self::FeatureNotImplemented
            | Self::ItemNotFound
            | Self::NotAllowed
            | Self::RemoteServerNotFound
            | Self::ServiceUnavailable
            | Self::UnexpectedRequest => "cancel",
            Self::Forbidden | Self::NotAuthorized | Self::RegistrationRequired => "auth",
            Self::InternalServerError
            | Self::RecipientUnavailable
            | Self::RemoteServerTimeout
            | Self::ResourceConstraint
            | Self::UndefinedCondition => "wait",
            Self::PolicyViolation => "modify",
        }
    }
}

/// Builds the error reply to `stanza` (RFC 6120 §8.3.1): `from` and `to` swapped, the
/// original payload kept, and an `<error/>` child. Returns `None` for a stanza of type
/// `error` (never answer an error with an error).
pub fn error_reply(
    stanza: &Element,
    condition: StanzaErrorCondition,
    text: Option<&str>,
) -> Option<Element> {
    error_reply_with(stanza, condition, text, None)
}

/// [`error_reply`] with an application-specific condition element.
pub fn error_reply_with(
    stanza: &Element,
    condition: StanzaErrorCondition,
    text: Option<&str>,
    app: Option<Element>,
) -> Option<Element> {
    if stanza.attr("type") == Some("error") {
        return None;
    }
    let mut reply = Element::bare(stanza.name(), stanza.ns());
    for ((attr_ns, name), value) in stanza.attrs().iter() {
        match (attr_ns.as_str(), name.as_str()) {
            ("", "to") => reply.set_attr(
                attr_ns.clone(),
                rxml::NcName::try_from("from").ok()?,
                value.as_str(),
            ),
            ("", "from") => reply.set_attr(
                attr_ns.clone(),
                rxml::NcName::try_from("to").ok()?,
                value.as_str(),
            ),
            ("", "type") => {}
            _ => reply.set_attr(attr_ns.clone(), name.clone(), value.as_str()),
        }
    }
    crate::stanza::set_attr(&mut reply, "type", "error");
    // IQ errors carry the request payload only optionally; keep messages' and presences'.
    if stanza.name() != "iq" {
        for child in stanza.children() {
            reply.append_child(child.clone());
        }
    }
    let mut error = Element::builder("error", ns::CLIENT)
        .attr(rxml::xml_ncname!("type").to_owned(), condition.error_type())
        .append(Element::bare(condition.as_str(), ns::STANZAS))
        .build();
    if let Some(text) = text {
        error.append_child(Element::builder("text", ns::STANZAS).append(text).build());
    }
    if let Some(app) = app {
        error.append_child(app);
    }
    reply.append_child(error);
    Some(reply)
}

/// Local failures of the router (store, TLS setup, I/O).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    #[error("store: {0}")]
    Store(#[from] impmesh_store::StoreError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer broke the protocol: {0}")]
    Stream(StreamErrorCondition),
}
