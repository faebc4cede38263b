//! HTTP file upload (XEP-0363) without I/O: the slot request, what a file name and a
//! content type may be, the slot and its refusals as XML, file URLs, and the one byte
//! range a GET may ask for (RFC 9110 §14).

use minidom::Element;

use crate::xml::{escape, ns};

/// Bytes of a file name, at most (what file systems allow for one name).
pub const MAX_FILENAME_BYTES: usize = 255;
/// Bytes of a content type, at most.
const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// The content type of a slot whose request named none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// A client's request for a slot, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRequest {
    pub filename: String,
    pub size: u64,
    /// `None` when the request named no type: the PUT's is taken.
    pub content_type: Option<String>,
}

/// Why a slot is not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRefusal {
    /// The request is malformed (`bad-request`, with this text).
    Bad(&'static str),
    /// Larger than the service takes (`not-acceptable` with `<file-too-large/>`).
    TooLarge { max: u64 },
    /// The account's files and open slots would exceed its quota
    /// (`resource-constraint`).
    QuotaFull { quota: u64 },
    /// The account has as many files and open slots as it may (`resource-constraint`).
    TooMany { max: u64 },
}

impl SlotRequest {
    /// Reads `<request xmlns='urn:xmpp:http:upload:0' filename= size= content-type=/>`
    /// and checks it against `max_size`.
    pub fn parse(request: &Element, max_size: u64) -> Result<SlotRequest, SlotRefusal> {
        let filename = request
            .attr("filename")
            .ok_or(SlotRefusal::Bad("the request names no file"))?;
        let size: u64 = request
            .attr("size")
            .and_then(|s| s.parse().ok())
            .ok_or(SlotRefusal::Bad("the request has no valid size"))?;
        if size == 0 {
            return Err(SlotRefusal::Bad("the file is empty"));
        }
        if size > max_size {
            return Err(SlotRefusal::TooLarge { max: max_size });
        }
        Ok(SlotRequest {
            filename: clean_filename(filename)?,
            size,
            content_type: match request.attr("content-type").map(str::trim) {
                Some(ty) if !ty.is_empty() => Some(clean_content_type(Some(ty))?),
                _ => None,
            },
        })
    }
}

/// A file name as the last segment of a URL and the name of a download: no path, no
/// control characters, not `.` or `..`, at most [`MAX_FILENAME_BYTES`].
pub fn clean_filename(name: &str) -> Result<String, SlotRefusal> {
    let name = name.trim();
    if name.is_empty() || name == "." || name == ".." {
        return Err(SlotRefusal::Bad("the file name is empty"));
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(SlotRefusal::Bad("the file name is too long"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control() || is_format(c))
    {
        return Err(SlotRefusal::Bad(
            "the file name has a path separator, a control or a formatting character",
        ));
    }
    Ok(name.to_owned())
}

/// Invisible formatting characters (Unicode Cf: bidirectional overrides and
/// isolates, zero-width characters) that can make `gpj.exe` look like `exe.jpg`.
pub(crate) fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// A media type (`type/subtype`, parameters allowed) in printable ASCII; the default
/// when none is given.
pub fn clean_content_type(ty: Option<&str>) -> Result<String, SlotRefusal> {
    let Some(ty) = ty.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(DEFAULT_CONTENT_TYPE.to_owned());
    };
    let essence = ty.split(';').next().unwrap_or_default().trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let valid = ty.len() <= MAX_CONTENT_TYPE_BYTES
        && ty.bytes().all(|b| (0x20..0x7f).contains(&b))
        && essence
            .split_once('/')
            .is_some_and(|(t, s)| token(t) && token(s));
    if valid {
        Ok(ty.to_owned())
    } else {
        Err(SlotRefusal::Bad("the content type is not a media type"))
    }
}

/// `name` as one URL path segment: unreserved characters kept, every other byte
/// percent-encoded (RFC 3986 §2).
pub fn url_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`url_segment`] for any percent-encoded segment; `None` when it is
/// not valid percent-encoding of UTF-8.
pub fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The path of a file's URL: `/upload/NODE/ID/NAME`.
pub fn file_path(node: &str, id: &str, filename: &str) -> String {
    format!(
        "/upload/{}/{}/{}",
        url_segment(node),
        url_segment(id),
        url_segment(filename)
    )
}

/// The parts of a file path, decoded: (node, id, file name); `None` for any other
/// path.
pub fn parse_file_path(path: &str) -> Option<(String, String, String)> {
    let rest = path.strip_prefix("/upload/")?;
    let mut parts = rest.split('/');
    let (node, id, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((
        decode_segment(node)?,
        decode_segment(id)?,
        decode_segment(name)?,
    ))
}

/// The slot (XEP-0363 §4): where to PUT with which header, and where to GET.
pub fn slot_xml(url: &str, token: &str) -> String {
    let url = escape(url);
    format!(
        "<slot xmlns='{}'><put url='{url}'><header name='Authorization'>Bearer {}</header></put><get url='{url}'/></slot>",
        ns::HTTP_UPLOAD,
        escape(token)
    )
}

/// The error element of a refusal (XEP-0363 §5).
pub fn refusal_xml(refusal: &SlotRefusal) -> String {
    let stanzas = "urn:ietf:params:xml:ns:xmpp-stanzas";
    match refusal {
        SlotRefusal::Bad(text) => format!(
            "<error type='modify'><bad-request xmlns='{stanzas}'/><text xmlns='{stanzas}'>{}</text></error>",
            escape(text)
        ),
        SlotRefusal::TooLarge { max } => format!(
            "<error type='modify'><not-acceptable xmlns='{stanzas}'/><text xmlns='{stanzas}'>File too large: at most {max} bytes</text><file-too-large xmlns='{}'><max-file-size>{max}</max-file-size></file-too-large></error>",
            ns::HTTP_UPLOAD
        ),
        SlotRefusal::QuotaFull { quota } => format!(
            "<error type='wait'><resource-constraint xmlns='{stanzas}'/><text xmlns='{stanzas}'>Upload quota reached: files and open slots may hold {quota} bytes</text></error>"
        ),
        SlotRefusal::TooMany { max } => format!(
            "<error type='wait'><resource-constraint xmlns='{stanzas}'/><text xmlns='{stanzas}'>Upload quota reached: at most {max} files and open slots</text></error>"
        ),
    }
}

/// The service's identity in the server's disco#info (XEP-0363 §3).
pub const DISCO_IDENTITY: &str = "<identity category='store' type='file' name='HTTP File Upload'/>";

/// The feature and XEP-0363 §3's form with the largest file, for the server's
/// disco#info.
pub fn disco_xml(max_size: u64) -> String {
    format!(
        "<feature var='{0}'/><x xmlns='{1}' type='result'><field var='FORM_TYPE' type='hidden'><value>{0}</value></field><field var='max-file-size'><value>{max_size}</value></field></x>",
        ns::HTTP_UPLOAD,
        ns::DATA_FORMS
    )
}

/// What a GET's `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The whole file (no header, or one this service does not serve in part: several
    /// ranges, another unit; RFC 9110 lets a server ignore it).
    Whole,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// No byte of the range is in the file (416).
    Unsatisfiable,
}

/// Reads a `Range` header for a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> Range {
    // The unit is case-insensitive (RFC 9110 §14.1).
    let Some(spec) = header
        .map(str::trim)
        .filter(|h| h.get(..6).is_some_and(|u| u.eq_ignore_ascii_case("bytes=")))
        .map(|h| &h[6..])
    else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => Range::Unsatisfiable,
            Some(n) if len > 0 => Range::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Some(_) => Range::Unsatisfiable,
            None => Range::Whole,
        },
        (false, _) => {
            let Some(start) = parse(first) else {
                return Range::Whole;
            };
            let end = if last.is_empty() {
                Some(u64::MAX)
            } else {
                parse(last)
            };
            match end {
                Some(end) if end < start => Range::Whole,
                Some(_) if start >= len => Range::Unsatisfiable,
                Some(end) => Range::Part {
                    start,
                    end: end.min(len - 1),
                },
                None => Range::Whole,
            }
        }
        (true, true) => Range::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(attrs: &[(&str, &str)]) -> Element {
        let attrs: String = attrs
            .iter()
            .map(|(k, v)| format!(" {k}='{}'", escape(v)))
            .collect();
        format!("<request xmlns='{}'{attrs}/>", ns::HTTP_UPLOAD)
            .parse()
            .unwrap()
    }

    #[test]
    fn slot_requests_are_checked() {
        let ok = SlotRequest::parse(
            &request(&[
                ("filename", "cat.jpg"),
                ("size", "2048"),
                ("content-type", "image/jpeg"),
            ]),
            4096,
        );
        assert_eq!(
            ok,
            Ok(SlotRequest {
                filename: "cat.jpg".into(),
                size: 2048,
                content_type: Some("image/jpeg".into())
            })
        );
        let untyped = SlotRequest::parse(&request(&[("filename", "a"), ("size", "1")]), 4096);
        assert_eq!(untyped.unwrap().content_type, None);
        let refused =
            |attrs: &[(&str, &str)]| SlotRequest::parse(&request(attrs), 4096).unwrap_err();
        assert_eq!(
            refused(&[("filename", "a"), ("size", "4097")]),
            SlotRefusal::TooLarge { max: 4096 }
        );
        for bad in [
            &[("size", "1")][..],
            &[("filename", "a")],
            &[("filename", "a"), ("size", "-1")],
            &[("filename", "a"), ("size", "0")],
            &[("filename", "../../etc/passwd"), ("size", "1")],
            &[("filename", ".."), ("size", "1")],
            &[("filename", "a\\b"), ("size", "1")],
            &[("filename", "a"), ("size", "1"), ("content-type", "text")],
            &[
                ("filename", "a"),
                ("size", "1"),
                ("content-type", "text/html\r\nX: y"),
            ],
        ] {
            assert!(matches!(refused(bad), SlotRefusal::Bad(_)), "{bad:?}");
        }
        assert!(clean_filename(&"x".repeat(256)).is_err());
        // (An XML attribute cannot carry a raw newline: the parser makes it a space.)
        assert!(clean_filename("a\nb").is_err());
        assert!(clean_filename("invoice\u{202E}gpj.exe").is_err());
        assert!(clean_filename("zero\u{200B}width").is_err());
        assert!(clean_filename("café ☕.png").is_ok());
        assert_eq!(
            clean_content_type(Some("text/plain; charset=utf-8")).unwrap(),
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn file_paths_round_trip_and_refuse_traversal() {
        let path = file_path("node1.a.example", "00ff", "my photo (1)/ä.jpg");
        assert_eq!(
            path,
            "/upload/node1.a.example/00ff/my%20photo%20%281%29%2F%C3%A4.jpg"
        );
        assert_eq!(
            parse_file_path(&path),
            Some((
                "node1.a.example".into(),
                "00ff".into(),
                "my photo (1)/ä.jpg".into()
            ))
        );
        assert_eq!(parse_file_path("/upload/n/id"), None);
        assert_eq!(parse_file_path("/upload/n/id/a/b"), None);
        assert_eq!(parse_file_path("/upload/n/id/%zz"), None);
        assert_eq!(parse_file_path("/other/n/id/a"), None);
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |h: &str| parse_range(Some(h), 100);
        assert_eq!(parse_range(None, 100), Range::Whole);
        assert_eq!(r("bytes=0-9"), Range::Part { start: 0, end: 9 });
        assert_eq!(r("bytes=90-"), Range::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=90-500"), Range::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-10"), Range::Part { start: 90, end: 99 });
        assert_eq!(r("bytes=-500"), Range::Part { start: 0, end: 99 });
        assert_eq!(r("bytes=100-"), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Range::Unsatisfiable);
        assert_eq!(r("bytes=5-1"), Range::Whole);
        assert_eq!(r("bytes=0-1,5-6"), Range::Whole);
        assert_eq!(r("items=0-1"), Range::Whole);
        assert_eq!(r("Bytes=0-1"), Range::Part { start: 0, end: 1 });
        assert_eq!(parse_range(Some("bytes=-5"), 0), Range::Unsatisfiable);
    }

    #[test]
    fn refusals_carry_xep_0363_conditions() {
        let too_large = refusal_xml(&SlotRefusal::TooLarge { max: 10 });
        assert!(too_large.contains("<not-acceptable"));
        assert!(too_large.contains("<max-file-size>10</max-file-size>"));
        assert!(refusal_xml(&SlotRefusal::QuotaFull { quota: 5 }).contains("<resource-constraint"));
        let slot = slot_xml("https://h/upload/n/i/a%27b", "t");
        assert!(slot.contains("url='https://h/upload/n/i/a%27b'"));
        assert!(slot.contains("Bearer t</header>"));
    }
}
