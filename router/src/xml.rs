//! The XML framer of a stream (RFC 6120 §4, §11): bytes in, stream header, stanzas and
//! the stream footer out.
//!
//! Parsing is done by `rxml`, a restricted XML 1.0 parser: it knows no DTDs, no custom
//! entities, no processing instructions and (as configured here) no comments, so entity
//! expansion ("billion laughs") and external entities cannot happen. This module adds
//! the limits a server needs on top: a cap on the bytes of one top-level element (counted
//! as they are fed, so a never-ending text node or attribute hits it too), a cap on
//! nesting depth, and a mapping of every parser error to the RFC 6120 stream error it
//! deserves. The framer does no I/O: the connection task feeds it the chunks it reads.

use minidom::Element;
use rxml::{Parse as _, WithOptions as _};

/// Namespaces of the stream layer.
pub mod ns {
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    pub const CLIENT: &str = "jabber:client";
    pub const SERVER: &str = "jabber:server";
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    pub const SM: &str = "urn:xmpp:sm:3";
    pub const SASL_CB: &str = "urn:xmpp:sasl-cb:0";
    pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
    pub const REGISTER: &str = "jabber:iq:register";
    pub const ROSTER: &str = "jabber:iq:roster";
    pub const ROSTERVER: &str = "urn:xmpp:features:rosterver";
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
    pub const PING: &str = "urn:xmpp:ping";
    pub const VERSION: &str = "jabber:iq:version";
    pub const VCARD: &str = "vcard-temp";
    pub const PRIVATE: &str = "jabber:iq:private";
    pub const BLOCKING: &str = "urn:xmpp:blocking";
    pub const BLOCKING_ERRORS: &str = "urn:xmpp:blocking:errors";
    pub const CARBONS: &str = "urn:xmpp:carbons:2";
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    pub const DELAY: &str = "urn:xmpp:delay";
    pub const HINTS: &str = "urn:xmpp:hints";
    pub const OFFLINE: &str = "msgoffline";
    /// XEP-0157's form type (contact addresses in the server's disco#info).
    pub const SERVERINFO: &str = "http://jabber.org/network/serverinfo";
    pub const DATA_FORMS: &str = "jabber:x:data";
    pub const MAM: &str = "urn:xmpp:mam:2";
    pub const MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
    pub const RSM: &str = "http://jabber.org/protocol/rsm";
    pub const SID: &str = "urn:xmpp:sid:0";
    pub const OMEMO: &str = "eu.siacs.conversations.axolotl";
    pub const CAPS: &str = "http://jabber.org/protocol/caps";
    pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    pub const PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
    pub const PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
    pub const PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
    pub const PUBSUB_PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
    pub const PUBSUB_NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";
    pub const HTTP_UPLOAD: &str = "urn:xmpp:http:upload:0";
    pub const PUSH: &str = "urn:xmpp:push:0";
    pub const EXTDISCO: &str = "urn:xmpp:extdisco:2";
}

/// What the framer hands to the connection.
#[derive(Debug)]
pub enum Frame {
    /// `<stream:stream …>`: its attributes (`to`, `version`, `xml:lang`, …).
    Header(Header),
    /// A complete top-level element: a stanza or a stream-level element.
    Element(Element),
    /// `</stream:stream>`.
    Footer,
}

/// The attributes of a stream header that the server looks at.
#[derive(Debug, Default, Clone)]
pub struct Header {
    pub to: Option<String>,
    pub from: Option<String>,
    pub version: Option<String>,
    pub lang: Option<String>,
    /// The stream id (router links carry the sender's epoch in it).
    pub id: Option<String>,
    /// Router links: the intercluster protocol version and the features the node
    /// speaks (`impmesh:protocol`, `impmesh:features` in `urn:impmesh:link:1`).
    pub protocol: Option<String>,
    pub features: Option<String>,
    /// The default namespace the header declares (`jabber:client` on c2s).
    pub default_ns: Option<String>,
}

impl HeaderSniffer {
    /// Reads the bytes the resolving parser consumed, up to the root element's head.
    fn feed(&mut self, mut bytes: &[u8]) {
        use rxml::Parse as _;
        while !bytes.is_empty() {
            match self.raw.parse(&mut bytes, false) {
                Ok(Some(rxml::RawEvent::ElementHeadOpen(_, (prefix, name)))) => {
                    self.depth += 1;
                    if self.depth == 1 {
                        self.root.push('<');
                        if let Some(prefix) = prefix {
                            self.root.push_str(prefix.as_str());
                            self.root.push(':');
                        }
                        self.root.push_str(name.as_str());
                    }
                }
                Ok(Some(rxml::RawEvent::Attribute(_, (prefix, name), value)))
                    if self.depth == 1 =>
                {
                    let declared = match prefix.as_ref().map(|p| p.as_str()) {
                        None if name.as_str() == "xmlns" => {
                            self.default_ns = Some(value.to_string());
                            "xmlns".to_owned()
                        }
                        Some("xmlns") => format!("xmlns:{}", name.as_str()),
                        _ => continue,
                    };
                    self.root
                        .push_str(&format!(" {declared}='{}'", escape(&value)));
                }
                Ok(Some(_)) => {}
                // The resolving parser reports errors; this one only watches.
                Ok(None) | Err(_) => return,
            }
        }
    }
}

/// Longest element name, attribute name or attribute value (bytes). JIDs are at most
/// 3071 bytes (RFC 7622); 16 KiB leaves room for any real attribute.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Maximum nesting depth inside one stanza. Real payloads (forwarded carbons inside
/// messages, pubsub items) stay below 20; 64 leaves room without allowing stack games.
pub const MAX_DEPTH: usize = 64;

/// What one top-level element may hold. Bytes alone do not bound memory: `<a/>` is 4
/// bytes of input and about 300 bytes of tree, so the element count is capped too
/// (security review H3), and the attributes kept per element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub bytes: usize,
    pub elements: usize,
    pub attributes: usize,
}

impl FrameLimits {
    /// Before authentication: STARTTLS, SASL and XEP-0077 need a handful of elements.
    pub fn unauthenticated(bytes: usize) -> FrameLimits {
        FrameLimits {
            bytes,
            elements: 32,
            attributes: 16,
        }
    }

    /// After authentication: room for the largest real payloads (an OMEMO bundle with
    /// 100 pre-keys is about 110 elements, a bookmarks list of 500 rooms about 1,000),
    /// and a bound on the tree a 256 KiB stanza can build (about 1.2 MB, not 20).
    pub fn authenticated(bytes: usize) -> FrameLimits {
        FrameLimits {
            bytes,
            elements: 4096,
            attributes: 64,
        }
    }
}

/// An incremental framer for one XML stream (one per stream restart).
pub struct Framer {
    /// The resolving parser; `None` while the stream rests ([`Self::rest`]).
    parsing: Option<Box<Parsing>>,
    /// The root element's head as the peer declared it (its name and namespace
    /// declarations, nothing else), from which a resting stream's parser is rebuilt.
    /// Set when the stream header is read.
    root: Option<Box<str>>,
    /// Until the stream header is read: a raw parser over the same bytes, which sees the
    /// namespace declarations the resolving parser hides (the header's default
    /// namespace is checked, RFC 6120 §4.9.3.10, and the root's declarations kept).
    header: Option<Box<HeaderSniffer>>,
    /// Elements under construction: `[stanza, child, grandchild, …]`.
    stack: Vec<Element>,
    /// Whether the stream header was seen (depth 0 is open).
    open: bool,
    /// Bytes fed since the current top-level element (or whitespace run) began.
    element_bytes: usize,
    /// Bytes the parser consumed that no event has accounted for yet: what it holds
    /// of a token still incomplete (`<` of the next stanza, a `\r`). Zero between
    /// complete events.
    held: usize,
    /// Elements started in the current top-level element.
    elements: usize,
    limits: FrameLimits,
}

/// A resolving parser and its namespace table.
struct Parsing {
    parser: rxml::Parser,
    /// This stream's namespace table (security review M14). Each stream has its own:
    /// the cleanup that runs whenever a stream goes idle then takes an uncontended
    /// lock and scans only the namespaces this stream used, where a table shared by
    /// the process took a global lock and scanned every stream's namespaces on every
    /// wake-up of every session. The strings are copied into each element's tree
    /// anyway, so sharing them saved little.
    namespaces: std::sync::Arc<rxml::Context>,
}

impl Parsing {
    fn options(limits: FrameLimits, namespaces: &std::sync::Arc<rxml::Context>) -> rxml::Options {
        // rxml reserves this much scratch space whenever a token starts, so it is kept
        // well below the stanza cap: text longer than it arrives in several chunks, and
        // only a single name or attribute value is limited to it.
        rxml::Options {
            max_token_length: limits.bytes.clamp(64, MAX_TOKEN_BYTES),
            context: Some(namespaces.clone()),
            ..Default::default()
        }
    }

    fn new(limits: FrameLimits) -> Box<Parsing> {
        let namespaces = std::sync::Arc::new(rxml::Context::new());
        let mut parser = rxml::Parser::with_options(Parsing::options(limits, &namespaces));
        // Emit text as it arrives, so whitespace keepalives are seen (and reset the byte
        // count) at once instead of being buffered towards the cap.
        parser.set_text_buffering(false);
        Box::new(Parsing { parser, namespaces })
    }
}

/// The raw parser that reads the stream header's namespace declarations.
struct HeaderSniffer {
    raw: rxml::RawParser,
    /// The root element's `xmlns` attribute, once seen.
    default_ns: Option<String>,
    /// The root element's head, rebuilt: its qualified name and every namespace
    /// declaration (`xmlns`, `xmlns:p`), without the closing `>`.
    root: String,
    /// Depth of raw elements seen (the root is depth 1).
    depth: usize,
}

impl std::fmt::Debug for Framer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framer")
            .field("depth", &self.stack.len())
            .field("open", &self.open)
            .field("resting", &self.parsing.is_none())
            .finish_non_exhaustive()
    }
}

impl Framer {
    /// A framer that refuses top-level elements beyond `limits`.
    pub fn new(limits: FrameLimits) -> Framer {
        let parsing = Parsing::new(limits);
        let mut raw = rxml::RawParser::with_options(Parsing::options(limits, &parsing.namespaces));
        raw.set_text_buffering(false);
        Framer {
            parsing: Some(parsing),
            root: None,
            header: Some(Box::new(HeaderSniffer {
                raw,
                default_ns: None,
                root: String::new(),
                depth: 0,
            })),
            stack: Vec::new(),
            open: false,
            element_bytes: 0,
            held: 0,
            elements: 0,
            limits,
        }
    }

    /// Feeds bytes; returns the next complete frame, or `None` when `buf` is used up.
    /// Call again with the rest of `buf` until it returns `None`.
    pub fn next_frame(&mut self, buf: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        if self.parsing.is_none() {
            if buf.is_empty() {
                return Ok(None);
            }
            self.parsing = Some(self.wake()?);
        }
        loop {
            let Some(parsing) = self.parsing.as_mut() else {
                return Ok(None);
            };
            let start = *buf;
            let before = buf.len();
            let event = parsing.parser.parse(buf, false);
            let consumed = before - buf.len();
            self.element_bytes += consumed;
            self.held += consumed;
            if self.element_bytes > self.limits.bytes {
                return Err(FrameError::OverLimit);
            }
            if let Some(sniffer) = &mut self.header {
                sniffer.feed(&start[..consumed]);
            }
            let event = match event {
                Ok(Some(event)) => event,
                Ok(None) => return Err(FrameError::NotWellFormed),
                Err(rxml::error::EndOrError::NeedMoreData) => return Ok(None),
                Err(rxml::error::EndOrError::Error(e)) => return Err(map_parse_error(&e)),
            };
            self.held = self.held.saturating_sub(event.metrics().len());
            if let Some(frame) = self.handle(event)? {
                return Ok(Some(frame));
            }
        }
    }

    /// Limits for the elements that follow on the same stream (SASL2 authenticates
    /// without a restart). The parser's token cap comes from them: it is rebuilt with
    /// the next input when the stream is between elements, as it should be here.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
        self.rest();
    }

    /// Lets the stream rest while it waits between stanzas: the parser goes (about
    /// 1.5 KiB with its tables, docs/benchmarks.md) and the root's declarations stay,
    /// from which the next input rebuilds it. Only between top-level elements, with
    /// nothing of the next one fed yet; returns whether the stream rests.
    pub fn rest(&mut self) -> bool {
        if self.can_rest() {
            self.parsing = None;
        }
        self.parsing.is_none()
    }

    /// Whether the stream is awake and could rest now: between top-level elements
    /// with nothing of the next one fed (a peer that sent half a tag and paused
    /// keeps its parser).
    pub fn can_rest(&self) -> bool {
        self.parsing.is_some()
            && self.open
            && self.stack.is_empty()
            && self.held == 0
            && self.root.is_some()
    }

    /// A parser in the state the stream left it in: inside the root element, with the
    /// root's namespace declarations in scope.
    fn wake(&self) -> Result<Box<Parsing>, FrameError> {
        let mut parsing = Parsing::new(self.limits);
        let mut root = self.root.as_deref().unwrap_or_default().as_bytes();
        loop {
            match parsing.parser.parse(&mut root, false) {
                Ok(Some(rxml::Event::StartElement(..))) if root.is_empty() => return Ok(parsing),
                Ok(Some(_)) => {}
                // The peer's own declarations, which parsed before: cannot fail.
                _ => return Err(FrameError::NotWellFormed),
            }
        }
    }

    /// Frees the parser's temporary buffers while the stream is idle, the namespaces
    /// no open element of this stream holds, and the element stack between stanzas
    /// (its capacity outlived every stanza: 448 bytes per idle session).
    pub fn release_temporaries(&mut self) {
        if let Some(parsing) = &mut self.parsing {
            parsing.parser.release_temporaries();
        }
        if self.stack.is_empty() {
            self.stack = Vec::new();
        }
    }

    /// The namespace the stream header declared as default (`None` before the header,
    /// or when it declared none).
    fn header_default_ns(&self) -> Option<&str> {
        self.header.as_ref()?.default_ns.as_deref()
    }

    fn handle(&mut self, event: rxml::Event) -> Result<Option<Frame>, FrameError> {
        match event {
            rxml::Event::XmlDeclaration(..) => Ok(None),
            rxml::Event::StartElement(_, (ns, name), attrs) => {
                if !self.open {
                    if ns.as_str() != ns::STREAM || name.as_str() != "stream" {
                        return Err(FrameError::NotAStream);
                    }
                    self.open = true;
                    self.element_bytes = 0;
                    let mut header = Header {
                        default_ns: self.header_default_ns().map(str::to_owned),
                        ..Header::default()
                    };
                    // The raw parser is done: the header is the only place it is needed.
                    if let Some(sniffer) = self.header.take() {
                        let mut root = sniffer.root;
                        root.push('>');
                        self.root = Some(root.into_boxed_str());
                    }
                    for ((attr_ns, attr_name), value) in attrs.into_iter() {
                        match (attr_ns.as_str(), attr_name.as_str()) {
                            ("", "to") => header.to = Some(value.to_string()),
                            ("", "from") => header.from = Some(value.to_string()),
                            ("", "version") => header.version = Some(value.to_string()),
                            ("", "id") => header.id = Some(value.to_string()),
                            (rxml::XMLNS_XML, "lang") => header.lang = Some(value.to_string()),
                            ("urn:impmesh:link:1", "protocol") => {
                                header.protocol = Some(value.to_string());
                            }
                            ("urn:impmesh:link:1", "features") => {
                                header.features = Some(value.to_string());
                            }
                            _ => {}
                        }
                    }
                    return Ok(Some(Frame::Header(header)));
                }
                if self.stack.len() >= MAX_DEPTH {
                    return Err(FrameError::OverLimit);
                }
                if self.stack.is_empty() {
                    self.elements = 0;
                }
                self.elements += 1;
                if self.elements > self.limits.elements || attrs.len() > self.limits.attributes {
                    return Err(FrameError::OverLimit);
                }
                let mut element = Element::bare(name.as_str(), ns.as_str());
                *element.attrs_mut() = attrs;
                self.stack.push(element);
                Ok(None)
            }
            rxml::Event::EndElement(_) => match self.stack.pop() {
                None => {
                    self.open = false;
                    Ok(Some(Frame::Footer))
                }
                Some(done) => match self.stack.last_mut() {
                    Some(parent) => {
                        parent.append_child(done);
                        Ok(None)
                    }
                    None => {
                        self.element_bytes = 0;
                        Ok(Some(Frame::Element(done)))
                    }
                },
            },
            rxml::Event::Text(_, text) => match self.stack.last_mut() {
                Some(parent) => {
                    parent.append_text(text.as_str());
                    Ok(None)
                }
                // Between top-level elements only whitespace (keepalives) is allowed.
                None if text.chars().all(|c| c.is_ascii_whitespace()) => {
                    self.element_bytes = 0;
                    Ok(None)
                }
                None => Err(FrameError::NotWellFormed),
            },
        }
    }
}

/// Why the framer refused its input; each is one stream error of RFC 6120 §4.9.3
/// (see `From<FrameError> for StreamErrorCondition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not XML, or XML that breaks the stream's structure (`not-well-formed`).
    NotWellFormed,
    /// Something the restricted profile of RFC 6120 §11.1 forbids: a DTD, an entity, a
    /// processing instruction, a comment (`restricted-xml`).
    RestrictedXml,
    /// The first element is not `<stream:stream/>` (`invalid-namespace`).
    NotAStream,
    /// Over a size, depth, element or attribute limit (`policy-violation`).
    OverLimit,
}

/// Maps a parser error to what RFC 6120 §4.9.3 asks for: anything the
/// restricted profile of §11.1 forbids (DTDs, entity declarations or references,
/// processing instructions, comments) is `restricted-xml`; the rest is `not-well-formed`.
fn map_parse_error(e: &rxml::Error) -> FrameError {
    match e {
        // A name or attribute value over MAX_TOKEN_BYTES: a size limit, not a grammar rule.
        rxml::Error::RestrictedXml(msg)
            if msg.contains("too long") || msg.starts_with("long name") =>
        {
            FrameError::OverLimit
        }
        rxml::Error::RestrictedXml(_) | rxml::Error::UndeclaredEntity => FrameError::RestrictedXml,
        // `<!DOCTYPE`, `<!ENTITY`: the lexer only knows `<!--` and `<![CDATA[` after `<!`,
        // so a markup declaration surfaces as this syntax error.
        rxml::Error::InvalidSyntax(msg) if msg.contains("cdata or comment") => {
            FrameError::RestrictedXml
        }
        _ => FrameError::NotWellFormed,
    }
}

/// Escapes text for an attribute value or character data.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Serializes an element (no XML declaration).
pub fn to_string(element: &Element) -> String {
    String::from(element)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

    use impmesh_testkit::mutate;

    /// Fuzzing on stable (STYLE 12): 20,000 mutations of real streams, fed in random
    /// chunks, never panic and never exceed the limits (each run uses a new seed,
    /// printed on failure so the input can be kept as a regression case).
    #[test]
    fn mutated_streams_never_panic() {
        use rand::{Rng as _, SeedableRng as _};
        let seed: u64 = rand::random();
        // Shown with the failure (test output is captured): the input can be replayed.
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let corpus = [
            format!(
                "{HEADER}<message to='bob@localhost' type='chat'><body>hi</body></message></stream:stream>"
            ),
            format!(
                "{HEADER}<iq type='set' id='1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>"
            ),
            format!(
                "{HEADER}<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHB3</auth>"
            ),
            format!(
                "{HEADER}<presence><x:c xmlns:x='urn:x' x:a='1'><![CDATA[a]]></x:c></presence> "
            ),
        ];
        for round in 0..20_000 {
            let input = mutate(corpus[round % corpus.len()].as_bytes(), &mut rng);
            let limits = if round % 2 == 0 {
                FrameLimits::unauthenticated(2_000)
            } else {
                FrameLimits::authenticated(4_000)
            };
            let mut framer = Framer::new(limits);
            let mut rest = &input[..];
            'feed: while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(64));
                let mut chunk = &rest[..n];
                rest = &rest[n..];
                loop {
                    match framer.next_frame(&mut chunk) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                assert!(framer.stack.len() <= MAX_DEPTH, "seed {seed}");
                assert!(framer.elements <= limits.elements, "seed {seed}");
            }
        }
    }

    fn frames(input: &str, max: usize) -> Result<Vec<Frame>, FrameError> {
        let mut framer = Framer::new(FrameLimits::authenticated(max));
        let mut out = vec![];
        // Feed byte by byte: the framer must not care how the input is chunked.
        for byte in input.as_bytes().chunks(1) {
            let mut buf = byte;
            while let Some(frame) = framer.next_frame(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    fn frames_with(input: &str, limits: FrameLimits) -> Result<Vec<Frame>, FrameError> {
        let mut framer = Framer::new(limits);
        let mut out = vec![];
        for byte in input.as_bytes().chunks(7) {
            let mut buf = byte;
            while let Some(frame) = framer.next_frame(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    /// RFC 6120 §4.9.3.10: the header's default namespace is read (the resolving
    /// parser hides declarations), whatever the chunking.
    #[test]
    fn the_header_default_namespace_is_seen() {
        let default_of = |header: &str| {
            let out = frames(header, 10_000).unwrap();
            let Frame::Header(h) = &out[0] else { panic!() };
            h.default_ns.clone()
        };
        assert_eq!(default_of(HEADER).as_deref(), Some(ns::CLIENT));
        let server = HEADER.replace("jabber:client", "jabber:server");
        assert_eq!(default_of(&server).as_deref(), Some("jabber:server"));
        let none = HEADER.replace("xmlns='jabber:client' ", "");
        assert_eq!(default_of(&none), None);
        // A declaration on a child is not the stream's.
        let prefixed = "<s:stream xmlns:s='http://etherx.jabber.org/streams' to='x' version='1.0'>";
        assert_eq!(default_of(prefixed), None);
    }

    /// H3: elements and attributes are counted, not only bytes. `<a/>` is 4 bytes of
    /// input and about 300 of tree; before authentication a stanza may hold 32
    /// elements and 16 attributes each.
    #[test]
    fn elements_and_attributes_per_stanza_are_capped() {
        let limits = FrameLimits::unauthenticated(10_000);
        let nested = |n: usize| format!("{HEADER}<iq>{}</iq>", "<a/>".repeat(n));
        assert!(frames_with(&nested(31), limits).is_ok());
        assert_eq!(
            frames_with(&nested(32), limits).err(),
            Some(FrameError::OverLimit)
        );
        // The count starts again with each top-level element.
        let two = format!("{HEADER}<iq>{0}</iq><iq>{0}</iq>", "<a/>".repeat(31));
        assert_eq!(frames_with(&two, limits).unwrap().len(), 3);
        let attrs = |n: usize| {
            let a: String = (0..n).map(|i| format!(" a{i}='x'")).collect();
            format!("{HEADER}<iq{a}/>")
        };
        assert!(frames_with(&attrs(16), limits).is_ok());
        assert_eq!(
            frames_with(&attrs(17), limits).err(),
            Some(FrameError::OverLimit)
        );
        // After authentication: thousands.
        let after = FrameLimits::authenticated(262_144);
        assert!(frames_with(&nested(4095), after).is_ok());
        assert!(frames_with(&nested(4096), after).is_err());
    }

    #[test]
    fn header_stanzas_whitespace_and_footer() {
        let input = format!(
            "{HEADER}<message to='bob@localhost' type='chat'><body>hi &amp; bye</body></message> \n\
             <iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
        );
        let out = frames(&input, 10_000).unwrap();
        assert_eq!(out.len(), 4);
        let Frame::Header(h) = &out[0] else { panic!() };
        assert_eq!(h.to.as_deref(), Some("localhost"));
        assert_eq!(h.version.as_deref(), Some("1.0"));
        let Frame::Element(m) = &out[1] else { panic!() };
        assert!(m.is("message", ns::CLIENT));
        assert_eq!(m.get_child("body", ns::CLIENT).unwrap().text(), "hi & bye");
        let Frame::Element(iq) = &out[2] else {
            panic!()
        };
        assert!(iq.has_child("ping", ns::PING));
        assert!(matches!(out[3], Frame::Footer));
    }

    #[test]
    fn billion_laughs_and_dtds_are_restricted_xml() {
        let laughs = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>\
            <!ENTITY lol2 '&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;'>]>\
            <stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
        assert_eq!(
            frames(laughs, 10_000).unwrap_err(),
            FrameError::RestrictedXml
        );
        let entity_ref = format!("{HEADER}<message><body>&lol9;</body></message>");
        assert_eq!(
            frames(&entity_ref, 10_000).unwrap_err(),
            FrameError::RestrictedXml
        );
        let comment = format!("{HEADER}<!-- hi --><message/>");
        assert_eq!(
            frames(&comment, 10_000).unwrap_err(),
            FrameError::RestrictedXml
        );
        let pi = format!("{HEADER}<?xml-stylesheet href='x'?>");
        assert_eq!(frames(&pi, 10_000).unwrap_err(), FrameError::RestrictedXml);
    }

    #[test]
    fn malformed_xml_is_not_well_formed() {
        let bad = format!("{HEADER}<message><body></message>");
        assert_eq!(frames(&bad, 10_000).unwrap_err(), FrameError::NotWellFormed);
        let text = format!("{HEADER}stray text");
        assert_eq!(
            frames(&text, 10_000).unwrap_err(),
            FrameError::NotWellFormed
        );
        let unbound = format!("{HEADER}<foo:bar/>");
        assert_eq!(
            frames(&unbound, 10_000).unwrap_err(),
            FrameError::NotWellFormed
        );
        let not_stream = "<html>";
        assert_eq!(
            frames(not_stream, 10_000).unwrap_err(),
            FrameError::NotAStream
        );
    }

    #[test]
    fn oversized_elements_and_endless_text_hit_the_cap() {
        let big = format!(
            "{HEADER}<message><body>{}</body></message>",
            "a".repeat(5000)
        );
        assert_eq!(frames(&big, 1000).unwrap_err(), FrameError::OverLimit);
        // A text node that never ends is caught while it streams in.
        let mut framer = Framer::new(FrameLimits::authenticated(1000));
        let mut head = HEADER.as_bytes();
        while framer.next_frame(&mut head).unwrap().is_some() {}
        let mut start = &b"<message><body>"[..];
        assert!(framer.next_frame(&mut start).unwrap().is_none());
        let chunk = [b'x'; 100];
        let mut err = None;
        for _ in 0..20 {
            let mut buf = &chunk[..];
            if let Err(e) = framer.next_frame(&mut buf) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(FrameError::OverLimit));
        // Whitespace keepalives between stanzas never accumulate towards the cap.
        let keepalives = format!("{HEADER}{}<presence/>", " ".repeat(3000));
        assert_eq!(frames(&keepalives, 1000).unwrap().len(), 2);
    }

    #[test]
    fn long_text_passes_in_chunks_but_a_huge_attribute_is_a_policy_violation() {
        let text = "t".repeat(3 * MAX_TOKEN_BYTES);
        let ok = format!("{HEADER}<message><body>{text}</body></message>");
        let out = frames(&ok, 262_144).unwrap();
        let Frame::Element(m) = &out[1] else { panic!() };
        assert_eq!(m.get_child("body", ns::CLIENT).unwrap().text(), text);
        let attr = format!(
            "{HEADER}<message id='{}'/>",
            "a".repeat(MAX_TOKEN_BYTES + 1)
        );
        assert_eq!(frames(&attr, 262_144).unwrap_err(), FrameError::OverLimit);
    }

    /// Security review M14: a stream's namespace table is its own. Namespaces one
    /// stream holds open are not in the table another stream cleans when it goes
    /// idle, and the idle cleanup drops those no open element holds.
    #[test]
    fn each_stream_cleans_only_its_own_namespaces() {
        let many_ns: String = (0..200)
            .map(|i| format!(" xmlns:p{i}='urn:x:{i}'"))
            .collect();
        let mut hostile = Framer::new(FrameLimits::authenticated(1 << 20));
        let mut input = format!("{HEADER}<message{many_ns}><body>");
        let mut buf = input.as_bytes();
        while hostile.next_frame(&mut buf).unwrap().is_some() {}
        assert!(hostile.parsing.as_ref().unwrap().namespaces.namespaces() >= 200);
        let mut quiet = Framer::new(FrameLimits::authenticated(4_000));
        let mut buf = HEADER.as_bytes();
        while quiet.next_frame(&mut buf).unwrap().is_some() {}
        quiet.release_temporaries();
        assert!(
            quiet.parsing.as_ref().unwrap().namespaces.namespaces() <= 2,
            "another stream's namespaces are in this stream's table: {}",
            quiet.parsing.as_ref().unwrap().namespaces.namespaces()
        );
        // Once the element closes, the hostile stream's own cleanup drops them.
        input = "</body></message>".into();
        let mut buf = input.as_bytes();
        while hostile.next_frame(&mut buf).unwrap().is_some() {}
        hostile.release_temporaries();
        assert!(hostile.parsing.as_ref().unwrap().namespaces.namespaces() <= 2);
    }

    /// Between stanzas an idle stream keeps no element stack (memory per session);
    /// inside a stanza split over reads, the open elements stay.
    #[test]
    fn an_idle_stream_keeps_no_element_stack() {
        let mut framer = Framer::new(FrameLimits::authenticated(4_000));
        let input = format!("{HEADER}<message><body><x><y/></x></body></message><iq><a>");
        let mut buf = input.as_bytes();
        while framer.next_frame(&mut buf).unwrap().is_some() {}
        framer.release_temporaries();
        assert_eq!(framer.stack.len(), 2, "the open <iq><a> stays");
        let mut buf: &[u8] = b"</a></iq>";
        assert!(matches!(
            framer.next_frame(&mut buf),
            Ok(Some(Frame::Element(_)))
        ));
        framer.release_temporaries();
        assert_eq!(framer.stack.capacity(), 0);
    }

    /// A stream that rests between stanzas frames exactly as one that never does,
    /// however its input is cut: the rebuilt parser has the root's prefixes and
    /// default namespace, and a stream rests only where nothing of the next element
    /// has been fed (rxml holds the `<` that ends a whitespace run, and a `\r`).
    #[test]
    fn a_resting_stream_frames_as_one_that_never_rests() {
        use rand::{Rng as _, SeedableRng as _};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let input = "<?xml version='1.0'?><s:stream xmlns='jabber:client' \
            xmlns:s='http://etherx.jabber.org/streams' xmlns:x='urn:x&amp;y' xml:lang='en' \
            to='localhost' version='1.0'> <message to='a@b'><body>hi &amp; bye</body></message>\r\n \t\
            <presence><x:c x:a='1'/></presence>  <iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq> \
            <s:error><x:c/></s:error>\r</s:stream>";
        let expected = format!("{:?}", frames(input, 4_000).unwrap());
        let mut rested = 0;
        for _ in 0..2_000 {
            let mut framer = Framer::new(FrameLimits::authenticated(4_000));
            let mut out = vec![];
            let mut rest = input.as_bytes();
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(24));
                let mut chunk = &rest[..n];
                rest = &rest[n..];
                while let Some(frame) = framer.next_frame(&mut chunk).unwrap() {
                    out.push(frame);
                }
                if framer.rest() {
                    assert!(framer.parsing.is_none());
                    rested += 1;
                }
            }
            assert_eq!(format!("{out:?}"), expected, "seed {seed}");
        }
        assert!(rested > 1_000, "rested {rested} times");
        // Not with a partial token held: the `<` after a whitespace run.
        let mut framer = Framer::new(FrameLimits::authenticated(4_000));
        let input = format!("{HEADER}<presence/> <").into_bytes();
        let mut buf = &input[..];
        while framer.next_frame(&mut buf).unwrap().is_some() {}
        assert!(!framer.can_rest());
        assert!(!framer.rest());
        let mut buf: &[u8] = b"presence/>";
        assert!(matches!(
            framer.next_frame(&mut buf),
            Ok(Some(Frame::Element(_)))
        ));
        assert!(framer.rest());
    }

    /// The adversarial inputs of shared/anchors/security.md (parser amplification):
    /// each ends in a stream error, within the stanza cap, and quickly.
    #[test]
    fn adversarial_inputs_hit_the_caps() {
        let pre_auth = 10_000;
        let many_attrs: String = (0..100_000).map(|i| format!(" a{i}='x'")).collect();
        let many_ns: String = (0..10_000)
            .map(|i| format!(" xmlns:p{i}='urn:x:{i}'"))
            .collect();
        let cases = [
            ("100k attributes", format!("{HEADER}<message{many_attrs}/>")),
            (
                "10k namespace declarations",
                format!("{HEADER}<message{many_ns}/>"),
            ),
            (
                "1 MB attribute value",
                format!("{HEADER}<message id='{}'/>", "v".repeat(1 << 20)),
            ),
            (
                "1 MB element name",
                format!("{HEADER}<{}/>", "n".repeat(1 << 20)),
            ),
            (
                "100k-deep nesting",
                format!("{HEADER}{}", "<a>".repeat(100_000)),
            ),
            (
                "unclosed tags",
                format!("{HEADER}{}", "<message><body>".repeat(10_000)),
            ),
        ];
        for (what, input) in cases {
            let started = std::time::Instant::now();
            let err = frames_fast(&input, pre_auth).unwrap_err();
            assert!(
                matches!(err, FrameError::OverLimit | FrameError::NotWellFormed),
                "{what}: {err:?}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{what} took too long"
            );
        }
        // Duplicate attributes are a well-formedness error, found without blowing up.
        let dup: String = (0..500).map(|_| " a='x'").collect();
        assert_eq!(
            frames_fast(&format!("{HEADER}<message{dup}/>"), 262_144).unwrap_err(),
            FrameError::NotWellFormed
        );
    }

    /// Like `frames`, in 4 KiB chunks (byte-at-a-time would make big inputs slow).
    fn frames_fast(input: &str, max: usize) -> Result<Vec<Frame>, FrameError> {
        let mut framer = Framer::new(FrameLimits::authenticated(max));
        let mut out = vec![];
        for chunk in input.as_bytes().chunks(4096) {
            let mut buf = chunk;
            while let Some(frame) = framer.next_frame(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{HEADER}<message>{}", "<a>".repeat(MAX_DEPTH + 1));
        assert_eq!(frames(&deep, 100_000).unwrap_err(), FrameError::OverLimit);
    }
}
