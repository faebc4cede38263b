//! A small namespace-aware XML tree for SOAP bodies, read with quick-xml's namespace
//! reader (no DTDs, so no entity declarations and nothing to expand; no processing
//! instructions) under depth and element-count caps, and written with escaping. Unqualified elements (the SOAP 1.1 fault's
//! children) are kept as such, which minidom cannot do. Attributes are kept when they
//! are unqualified (namespace declarations and qualified attributes are not data here).

/// Deepest nesting accepted.
pub(crate) const MAX_DEPTH: usize = 16;
/// Most elements accepted in one document (a full page of users needs one per user).
pub(crate) const MAX_ELEMENTS: usize = 20_000;

/// An element: namespace (empty when unqualified), local name, unqualified
/// attributes, text, children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct El {
    pub ns: &'static str,
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<El>,
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    #[error("elements nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {MAX_ELEMENTS} elements")]
    TooMany,
    #[error("namespace {0} is not one this API uses")]
    UnknownNamespace(String),
}

impl El {
    /// An element with no children.
    pub fn new(ns: &'static str, name: impl Into<String>) -> El {
        El {
            ns,
            name: name.into(),
            ..El::default()
        }
    }

    /// An element holding `text`.
    pub fn text(ns: &'static str, name: &str, text: impl Into<String>) -> El {
        El {
            text: text.into(),
            ..El::new(ns, name)
        }
    }

    /// Adds an unqualified attribute (builder style).
    pub fn with_attr(mut self, name: &str, value: impl Into<String>) -> El {
        self.attrs.push((name.to_owned(), value.into()));
        self
    }

    /// The value of the unqualified attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Adds a child (builder style).
    pub fn with(mut self, child: El) -> El {
        self.children.push(child);
        self
    }

    /// Adds children (builder style).
    pub fn with_all(mut self, children: impl IntoIterator<Item = El>) -> El {
        self.children.extend(children);
        self
    }

    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// The first child called `name` in namespace `ns`.
    pub fn child(&self, ns: &str, name: &str) -> Option<&El> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    /// Parses a document whose namespaces are all in `known` (or unqualified).
    pub fn parse(doc: &[u8], known: &[&'static str]) -> Result<El, XmlError> {
        use quick_xml::events::Event;
        use quick_xml::name::ResolveResult;

        let bad = |why: String| XmlError::NotWellFormed(why);
        let doc = std::str::from_utf8(doc).map_err(|e| bad(e.to_string()))?;
        let mut reader = strict_reader(doc);
        let mut stack: Vec<El> = vec![];
        let mut root: Option<El> = None;
        let mut count = 0usize;
        loop {
            let (ns, event) = reader
                .read_resolved_event()
                .map_err(|e| bad(e.to_string()))?;
            match event {
                Event::Start(_) if root.is_some() => {
                    return Err(bad("content after the root element".into()));
                }
                Event::Start(start) => {
                    count += 1;
                    if count > MAX_ELEMENTS {
                        return Err(XmlError::TooMany);
                    }
                    if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    let ns = match ns {
                        ResolveResult::Unbound => "",
                        ResolveResult::Bound(uri) => {
                            let uri: &str = uri.as_ref();
                            known
                                .iter()
                                .find(|k| **k == uri)
                                .copied()
                                .ok_or_else(|| XmlError::UnknownNamespace(uri.to_owned()))?
                        }
                        ResolveResult::Unknown(prefix) => {
                            return Err(bad(format!("undeclared namespace prefix {prefix:?}")));
                        }
                    };
                    let mut el = El::new(ns, start.local_name().into_inner());
                    for attribute in start.attributes() {
                        let attribute = attribute.map_err(|e| bad(e.to_string()))?;
                        if let Some((name, value)) = plain_attribute(attribute)? {
                            el.attrs.push((name.to_owned(), value.into_owned()));
                        }
                    }
                    stack.push(el);
                }
                Event::End(_) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| bad("unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => root = Some(done),
                    }
                }
                Event::Text(text) => match stack.last_mut() {
                    Some(top) => top.text.push_str(&text.xml10_content()),
                    None if text.xml10_content().trim().is_empty() => {}
                    None => return Err(bad("text outside the root element".into())),
                },
                Event::CData(data) => {
                    let data = data.into_inner();
                    match stack.last_mut() {
                        Some(top) => top.text.push_str(&data),
                        None => return Err(bad("CDATA outside the root element".into())),
                    }
                }
                Event::GeneralRef(reference) => {
                    let c = resolve_reference(reference)?;
                    match stack.last_mut() {
                        Some(top) => top.text.push(c),
                        None => return Err(bad("a reference outside the root element".into())),
                    }
                }
                Event::Decl(_) | Event::Comment(_) => {}
                Event::DocType(_) => {
                    return Err(bad("document type declarations are refused".into()));
                }
                Event::PI(_) => return Err(bad("processing instructions are refused".into())),
                Event::Empty(_) => return Err(bad("unexpanded empty element".into())),
                Event::Eof => {
                    return root.ok_or_else(|| bad("the document ends early".into()));
                }
            }
        }
    }

    /// Writes the element as a document, declaring `prefixes` (namespace, prefix) on the
    /// root; elements of other namespaces get a default namespace declaration.
    pub fn to_document(&self, prefixes: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        self.write(&mut out, prefixes, true);
        out
    }

    fn write(&self, out: &mut Vec<u8>, prefixes: &[(&str, &str)], root: bool) {
        let prefix = prefixes.iter().find(|(ns, _)| *ns == self.ns).map(|p| p.1);
        let qname = match prefix {
            Some(p) if !self.ns.is_empty() => format!("{p}:{}", self.name),
            _ => self.name.clone(),
        };
        out.push(b'<');
        out.extend_from_slice(qname.as_bytes());
        if root {
            for (ns, p) in prefixes {
                out.extend_from_slice(format!(" xmlns:{p}=\"{}\"", escape(ns)).as_bytes());
            }
        }
        if prefix.is_none() && !self.ns.is_empty() {
            out.extend_from_slice(format!(" xmlns=\"{}\"", escape(self.ns)).as_bytes());
        }
        for (name, value) in &self.attrs {
            out.extend_from_slice(format!(" {name}=\"{}\"", escape_attr(value)).as_bytes());
        }
        if self.text.is_empty() && self.children.is_empty() {
            out.extend_from_slice(b"/>");
            return;
        }
        out.push(b'>');
        out.extend_from_slice(escape(&self.text).as_bytes());
        for c in &self.children {
            c.write(out, prefixes, false);
        }
        out.extend_from_slice(b"</");
        out.extend_from_slice(qname.as_bytes());
        out.push(b'>');
    }
}

/// A namespace reader for a whole document: empty elements expanded (a start and an
/// end event), end tags and comments checked.
pub(crate) fn strict_reader(doc: &str) -> quick_xml::reader::NsReader<&[u8]> {
    let mut reader = quick_xml::reader::NsReader::from_str(doc);
    let config = reader.config_mut();
    config.expand_empty_elements = true;
    config.check_end_names = true;
    config.check_comments = true;
    reader
}

/// A reference in text: character references and the five predefined entities;
/// nothing else is declared (no DTDs), so nothing else expands.
pub(crate) fn resolve_reference(
    reference: quick_xml::events::BytesRef<'_>,
) -> Result<char, XmlError> {
    let bad = |why: String| XmlError::NotWellFormed(why);
    match reference.resolve_char_ref() {
        Ok(Some(c)) => Ok(c),
        Ok(None) => match &*reference.into_inner() {
            "lt" => Ok('<'),
            "gt" => Ok('>'),
            "amp" => Ok('&'),
            "quot" => Ok('"'),
            "apos" => Ok('\''),
            other => Err(bad(format!("undeclared entity &{other};"))),
        },
        Err(e) => Err(bad(e.to_string())),
    }
}

/// An unqualified attribute as (name, unescaped value); `None` for namespace
/// declarations and qualified attributes. Only the predefined entities and character
/// references are accepted in values (there are no DTDs).
pub(crate) fn plain_attribute(
    attribute: quick_xml::events::attributes::Attribute<'_>,
) -> Result<Option<(&str, std::borrow::Cow<'_, str>)>, XmlError> {
    let key = attribute.key.0;
    if key.starts_with("xmlns") || key.contains(':') {
        return Ok(None);
    }
    let value = attribute
        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
        .map_err(|e| XmlError::NotWellFormed(format!("attribute {key}: {e}")))?;
    Ok(Some((key, value)))
}

/// Escapes an attribute value: as text, and tabs and line feeds too (a parser
/// would turn them into spaces).
fn escape_attr(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\n', '\t']) {
        return escape(value);
    }
    escape(value)
        .replace('\n', "&#10;")
        .replace('\t', "&#9;")
        .into()
}

fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['<', '>', '&', '"', '\'', '\r']) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_unqualified_children_and_escaping() {
        let doc = El::new("urn:a", "root")
            .with_attr("id", "x'\"<&>\r\n\ty")
            .with(El::text("", "child", "a < b & \"c\""))
            .with(El::new("urn:b", "other").with(El::text("urn:b", "x", "1")));
        let bytes = doc.to_document(&[("urn:a", "a")]);
        let back = El::parse(&bytes, &["urn:a", "urn:b"]).unwrap();
        assert_eq!(back, doc, "{}", String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn hostile_documents_are_refused() {
        let known = ["urn:a"];
        let laughs =
            "<?xml version='1.0'?><!DOCTYPE l [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;'>]><l>&b;</l>";
        assert!(matches!(
            El::parse(laughs.as_bytes(), &known),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            El::parse(b"<x><?pi data?></x>", &known),
            Err(XmlError::NotWellFormed(_))
        ));
        let deep = format!("{}{}", "<a>".repeat(100), "</a>".repeat(100));
        assert_eq!(El::parse(deep.as_bytes(), &known), Err(XmlError::TooDeep));
        let wide = format!("<a>{}</a>", "<b/>".repeat(MAX_ELEMENTS + 1));
        assert_eq!(El::parse(wide.as_bytes(), &known), Err(XmlError::TooMany));
        assert!(matches!(
            El::parse(b"<x xmlns='urn:evil'/>", &known),
            Err(XmlError::UnknownNamespace(_))
        ));
        assert!(matches!(
            El::parse(b"<a>", &known),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            El::parse(b"", &known),
            Err(XmlError::NotWellFormed(_))
        ));
        for doc in [
            &b"<a>&foo;</a>"[..],
            b"<p:a/>",
            b"<a></b>",
            b"<a x='1' x='2'/>",
            b"<a x=1/>",
            b"<a/>trailing<b/>",
            b"text<a/>",
            b"<a>\xff</a>",
            b"<a><!-- a -- b --></a>",
        ] {
            assert!(
                matches!(El::parse(doc, &known), Err(XmlError::NotWellFormed(_))),
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
    }

    #[test]
    fn references_and_cdata_are_text() {
        let el = El::parse(b"<a>&#60;&#x3E;&amp;&apos;<![CDATA[x<y]]></a>", &[]).unwrap();
        assert_eq!(el.text, "<>&'x<y");
    }
}
