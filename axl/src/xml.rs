//! A small namespace-aware XML tree for SOAP bodies, read with rxml (no DTDs, no
//! entity declarations, no processing instructions) under depth and element-count
//! caps, and written with escaping. Unqualified elements (the SOAP 1.1 fault's
//! children) are kept as such, which minidom cannot do.

/// Deepest nesting accepted.
const MAX_DEPTH: usize = 16;
/// Most elements accepted in one document (a full page of users needs ~6,000).
const MAX_ELEMENTS: usize = 20_000;

/// An element: namespace (empty when unqualified), local name, text, children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct El {
    pub ns: &'static str,
    pub name: String,
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
        let mut reader = rxml::Reader::new(doc);
        let mut stack: Vec<El> = vec![];
        let mut count = 0usize;
        loop {
            let event = reader
                .read()
                .map_err(|e| XmlError::NotWellFormed(e.to_string()))?;
            match event {
                Some(rxml::Event::StartElement(_, (ns, name), _)) => {
                    count += 1;
                    if count > MAX_ELEMENTS {
                        return Err(XmlError::TooMany);
                    }
                    if stack.len() >= MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    let ns = if ns.is_none() {
                        ""
                    } else {
                        known
                            .iter()
                            .find(|k| **k == ns.as_str())
                            .copied()
                            .ok_or_else(|| XmlError::UnknownNamespace(ns.as_str().to_owned()))?
                    };
                    stack.push(El::new(ns, name.as_str()));
                }
                Some(rxml::Event::EndElement(_)) => {
                    let done = stack
                        .pop()
                        .ok_or_else(|| XmlError::NotWellFormed("unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(done),
                        None => return Ok(done),
                    }
                }
                Some(rxml::Event::Text(_, text)) => {
                    if let Some(top) = stack.last_mut() {
                        top.text.push_str(text.as_str());
                    }
                }
                Some(rxml::Event::XmlDeclaration(..)) => {}
                None => return Err(XmlError::NotWellFormed("the document ends early".into())),
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
    }
}
