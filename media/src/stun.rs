//! The STUN wire format (RFC 8489) with TURN's methods and attributes (RFC 8656), and
//! TURN's ChannelData frames: parsing borrowed from the packet, building into a
//! caller's buffer (the relay reuses one per socket). Written here rather than taken
//! from a crate: the relay's hot path is a ChannelData header and a table lookup,
//! and the control messages need only the attributes below (docs/media.md).
//!
//! Everything parsed comes from the network: lengths are checked before any slice is
//! taken, and a message is either fully well formed or refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{KeyInit, Mac};

/// The magic cookie of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// The STUN header's length.
pub const HEADER_LEN: usize = 20;
/// What FINGERPRINT's CRC-32 is XORed with.
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// The largest message or frame the relay reads (a UDP datagram's payload).
pub const MAX_MESSAGE: usize = 65_535;
/// The largest frame a stream can announce: a STUN header and the largest length
/// (65,532, a multiple of four), or a ChannelData header and 65,535 bytes padded.
pub const MAX_FRAME: usize = HEADER_LEN + 0xFFFC;

/// Methods (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;

    /// Attributes below 0x8000 must be understood (RFC 8489 §14): a request with one
    /// the server does not know gets 420 with UNKNOWN-ATTRIBUTES.
    pub fn comprehension_required(ty: u16) -> bool {
        ty < 0x8000
    }
}

/// A message's class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }

    fn from_type(ty: u16) -> Class {
        match ty & 0x110 {
            0x000 => Class::Request,
            0x010 => Class::Indication,
            0x100 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// The message type field for a method and class (the class bits sit between the
/// method's bits, RFC 8489 §5).
fn message_type(method: u16, class: Class) -> u16 {
    (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class.bits()
}

fn method_of(ty: u16) -> u16 {
    (ty & 0x000F) | ((ty & 0x00E0) >> 1) | ((ty & 0x3E00) >> 2)
}

/// A transaction id.
pub type TransactionId = [u8; 12];

/// Why bytes are not a STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("shorter than a STUN header")]
    Short,
    #[error("not a STUN message (first bits, magic cookie)")]
    NotStun,
    #[error("the length field does not match the message")]
    Length,
    #[error("an attribute runs past the end of the message")]
    Attribute,
    #[error("FINGERPRINT is not the last attribute, or does not match")]
    Fingerprint,
    #[error("MESSAGE-INTEGRITY is malformed")]
    Integrity,
    #[error("an attribute's value is malformed")]
    Value,
}

/// One attribute as it appears in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    pub ty: u16,
    pub value: &'a [u8],
    /// Where the attribute starts in the message.
    offset: usize,
}

/// A parsed message, borrowing the packet.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    pub class: Class,
    pub method: u16,
    pub transaction: TransactionId,
    /// Where MESSAGE-INTEGRITY starts, when present: attributes after it (but
    /// FINGERPRINT) are ignored (RFC 8489 §14.5).
    integrity_at: Option<usize>,
    /// Where the attributes that count end (MESSAGE-INTEGRITY's start, else
    /// FINGERPRINT's, else the message's end).
    counted_end: usize,
    fingerprinted: bool,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Whether a packet starts like a STUN message (first two bits zero, the magic cookie)
/// rather than a ChannelData frame.
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= 8 && buf[0] & 0xC0 == 0 && read_u32(buf, 4) == MAGIC_COOKIE
}

impl<'a> Message<'a> {
    /// Parses one whole message (a UDP datagram, or a frame cut from a stream by
    /// [`frame_len`]). A FINGERPRINT, when present, must be last and must match.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::Short);
        }
        if !looks_like_stun(buf) {
            return Err(ParseError::NotStun);
        }
        let length = usize::from(read_u16(buf, 2));
        if length % 4 != 0 || HEADER_LEN + length != buf.len() {
            return Err(ParseError::Length);
        }
        let ty = read_u16(buf, 0);
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&buf[8..20]);
        let mut at = HEADER_LEN;
        let mut integrity_at = None;
        let mut fingerprint_at = None;
        while at < buf.len() {
            if fingerprint_at.is_some() {
                return Err(ParseError::Fingerprint);
            }
            if at + 4 > buf.len() {
                return Err(ParseError::Attribute);
            }
            let aty = read_u16(buf, at);
            let alen = usize::from(read_u16(buf, at + 2));
            if at + 4 + padded(alen) > buf.len() {
                return Err(ParseError::Attribute);
            }
            match aty {
                attr::MESSAGE_INTEGRITY if integrity_at.is_none() => {
                    if alen != 20 {
                        return Err(ParseError::Integrity);
                    }
                    integrity_at = Some(at);
                }
                attr::FINGERPRINT => {
                    if alen != 4 {
                        return Err(ParseError::Fingerprint);
                    }
                    fingerprint_at = Some(at);
                }
                _ => {}
            }
            at += 4 + padded(alen);
        }
        if let Some(f) = fingerprint_at {
            let want = read_u32(buf, f + 4);
            if fingerprint(buf, f) != want {
                return Err(ParseError::Fingerprint);
            }
        }
        let counted_end = integrity_at.or(fingerprint_at).unwrap_or(buf.len());
        Ok(Message {
            buf,
            class: Class::from_type(ty),
            method: method_of(ty),
            transaction,
            integrity_at,
            counted_end,
            fingerprinted: fingerprint_at.is_some(),
        })
    }

    /// The attributes that count, in order (not MESSAGE-INTEGRITY, FINGERPRINT or
    /// anything after MESSAGE-INTEGRITY).
    pub fn attributes(&self) -> impl Iterator<Item = RawAttribute<'a>> + 'a {
        let buf = self.buf;
        let end = self.counted_end;
        let mut at = HEADER_LEN;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let ty = read_u16(buf, at);
            let len = usize::from(read_u16(buf, at + 2));
            let a = RawAttribute {
                ty,
                value: &buf[at + 4..at + 4 + len],
                offset: at,
            };
            at += 4 + padded(len);
            Some(a)
        })
    }

    /// The first attribute of a type, if any.
    pub fn get(&self, ty: u16) -> Option<&'a [u8]> {
        self.attributes().find(|a| a.ty == ty).map(|a| a.value)
    }

    pub fn has(&self, ty: u16) -> bool {
        self.get(ty).is_some()
    }

    /// The comprehension-required attributes not in `known`, for a 420 answer.
    pub fn unknown_required(&self, known: &[u16]) -> Vec<u16> {
        let mut unknown: Vec<u16> = self
            .attributes()
            .map(|a| a.ty)
            .filter(|t| attr::comprehension_required(*t) && !known.contains(t))
            .collect();
        unknown.dedup();
        unknown
    }

    /// An XOR-…-ADDRESS attribute's address (RFC 8489 §14.2).
    pub fn xor_address(&self, ty: u16) -> Result<Option<SocketAddr>, ParseError> {
        self.get(ty)
            .map(|v| decode_xor_address(v, &self.transaction))
            .transpose()
    }

    /// Every XOR-…-ADDRESS attribute of a type (CreatePermission may carry several).
    pub fn xor_addresses(&self, ty: u16) -> Result<Vec<SocketAddr>, ParseError> {
        self.attributes()
            .filter(|a| a.ty == ty)
            .map(|a| decode_xor_address(a.value, &self.transaction))
            .collect()
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn u32_attr(&self, ty: u16) -> Result<Option<u32>, ParseError> {
        match self.get(ty) {
            None => Ok(None),
            Some(v) if v.len() == 4 => Ok(Some(read_u32(v, 0))),
            Some(_) => Err(ParseError::Value),
        }
    }

    /// A text attribute (USERNAME, REALM, NONCE, SOFTWARE), which must be UTF-8.
    pub fn text(&self, ty: u16) -> Result<Option<&'a str>, ParseError> {
        self.get(ty)
            .map(|v| std::str::from_utf8(v).map_err(|_| ParseError::Value))
            .transpose()
    }

    /// An ERROR-CODE attribute: the code (300–699) and the reason.
    pub fn error_code(&self) -> Result<Option<(u16, &'a str)>, ParseError> {
        let Some(v) = self.get(attr::ERROR_CODE) else {
            return Ok(None);
        };
        if v.len() < 4 {
            return Err(ParseError::Value);
        }
        let code = u16::from(v[2] & 0x07) * 100 + u16::from(v[3]);
        let reason = std::str::from_utf8(&v[4..]).map_err(|_| ParseError::Value)?;
        Ok(Some((code, reason)))
    }

    /// Whether the message ends with a (matching) FINGERPRINT: a response to it
    /// carries one too (RFC 8489 §7.3).
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprinted
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Whether MESSAGE-INTEGRITY is there and is the HMAC-SHA1 of the message with
    /// `key` (compared in constant time).
    pub fn check_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_at else {
            return false;
        };
        let want = &self.buf[at + 4..at + 24];
        integrity(self.buf, at, key).verify_slice(want).is_ok()
    }

    /// The whole message.
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
}

/// HMAC-SHA1 of `buf[..at]` with the header's length set as if the message ended
/// after a MESSAGE-INTEGRITY attribute at `at` (RFC 8489 §14.5).
fn integrity(buf: &[u8], at: usize, key: &[u8]) -> hmac::Hmac<sha1::Sha1> {
    let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    let length = u16::try_from(at + 24 - HEADER_LEN).unwrap_or(u16::MAX);
    mac.update(&buf[..2]);
    mac.update(&length.to_be_bytes());
    mac.update(&buf[4..at]);
    mac
}

/// FINGERPRINT's value for a FINGERPRINT attribute at `at` (RFC 8489 §14.7).
fn fingerprint(buf: &[u8], at: usize) -> u32 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let length = u16::try_from(at + 8 - HEADER_LEN).unwrap_or(u16::MAX);
    let mut digest = CRC.digest();
    digest.update(&buf[..2]);
    digest.update(&length.to_be_bytes());
    digest.update(&buf[4..at]);
    digest.finalize() ^ FINGERPRINT_XOR
}

fn decode_xor_address(v: &[u8], transaction: &TransactionId) -> Result<SocketAddr, ParseError> {
    if v.len() < 4 {
        return Err(ParseError::Value);
    }
    let port = read_u16(v, 2) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (v[1], v.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = v[4 + i] ^ cookie[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(transaction);
            let mut ip = [0u8; 16];
            for (i, b) in ip.iter_mut().enumerate() {
                *b = v[4 + i] ^ key[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(ParseError::Value),
    }
}

/// The bytes of a whole message or frame at the start of a stream, once its first
/// four bytes are in: a STUN message (`20 + length`) or a ChannelData frame
/// (`4 + length`, padded to four bytes on streams, RFC 8656 §12.5). `None` for
/// bytes that are neither (the stream is broken and is closed).
pub fn frame_len(head: [u8; 4]) -> Option<usize> {
    let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
    match head[0] >> 6 {
        0b00 => (length % 4 == 0).then_some(HEADER_LEN + length),
        0b01 => {
            let channel = u16::from_be_bytes([head[0], head[1]]);
            is_channel(channel).then_some(4 + padded(length))
        }
        _ => None,
    }
}

/// Whether a number is a TURN channel: 0x4000 through 0x7FFF, the range of RFC 5766
/// §11, which clients still use (coturn's own picks from all of it), although RFC
/// 8656 §12 narrowed it to 0x4FFF to keep clear of DTLS-SRTP on the client's port.
pub fn is_channel(n: u16) -> bool {
    (0x4000..=0x7FFF).contains(&n)
}

/// A ChannelData frame's channel and data; `None` when it is not one (a channel
/// outside the range, a length past the end). Padding after the data (streams) is
/// allowed.
pub fn channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    if buf.len() < 4 {
        return None;
    }
    let channel = read_u16(buf, 0);
    let len = usize::from(read_u16(buf, 2));
    if !is_channel(channel) || 4 + len > buf.len() {
        return None;
    }
    Some((channel, &buf[4..4 + len]))
}

/// Writes a ChannelData frame, padded to four bytes when `pad` (streams).
pub fn write_channel_data(out: &mut Vec<u8>, channel: u16, data: &[u8], pad: bool) {
    out.clear();
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&u16::try_from(data.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(data);
    if pad {
        out.resize(padded(out.len()), 0);
    }
}

/// Builds a message into a caller's buffer (cleared first).
#[derive(Debug)]
pub struct Builder<'b> {
    out: &'b mut Vec<u8>,
    transaction: TransactionId,
}

impl<'b> Builder<'b> {
    pub fn new(
        out: &'b mut Vec<u8>,
        method: u16,
        class: Class,
        transaction: TransactionId,
    ) -> Builder<'b> {
        out.clear();
        out.extend_from_slice(&message_type(method, class).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&transaction);
        Builder { out, transaction }
    }

    fn set_length(&mut self) {
        let length = u16::try_from(self.out.len() - HEADER_LEN).unwrap_or(u16::MAX);
        self.out[2..4].copy_from_slice(&length.to_be_bytes());
    }

    /// Adds an attribute, padding its value to four bytes with zeros.
    pub fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        self.out.extend_from_slice(&ty.to_be_bytes());
        self.out
            .extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
        self.out.extend_from_slice(value);
        self.out.resize(padded(self.out.len()), 0);
        self
    }

    pub fn u32_attr(&mut self, ty: u16, value: u32) -> &mut Self {
        self.attr(ty, &value.to_be_bytes())
    }

    /// An XOR-…-ADDRESS attribute.
    pub fn xor_address(&mut self, ty: u16, addr: SocketAddr) -> &mut Self {
        let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
        let cookie = MAGIC_COOKIE.to_be_bytes();
        let mut v = [0u8; 20];
        v[2..4].copy_from_slice(&port.to_be_bytes());
        let len = match addr.ip() {
            IpAddr::V4(ip) => {
                v[1] = 0x01;
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ cookie[i];
                }
                8
            }
            IpAddr::V6(ip) => {
                v[1] = 0x02;
                let mut key = [0u8; 16];
                key[..4].copy_from_slice(&cookie);
                key[4..].copy_from_slice(&self.transaction);
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ key[i];
                }
                20
            }
        };
        self.attr(ty, &v[..len])
    }

    /// A plain (not XORed) address attribute: ALTERNATE-SERVER, MAPPED-ADDRESS.
    pub fn address(&mut self, ty: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        v[2..4].copy_from_slice(&addr.port().to_be_bytes());
        let len = match addr.ip() {
            IpAddr::V4(ip) => {
                v[1] = 0x01;
                v[4..8].copy_from_slice(&ip.octets());
                8
            }
            IpAddr::V6(ip) => {
                v[1] = 0x02;
                v[4..20].copy_from_slice(&ip.octets());
                20
            }
        };
        self.attr(ty, &v[..len])
    }

    /// ERROR-CODE with its reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0]);
        v.push(u8::try_from(code / 100).unwrap_or(5) & 0x07);
        v.push(u8::try_from(code % 100).unwrap_or(0));
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// UNKNOWN-ATTRIBUTES.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let v: Vec<u8> = types.iter().flat_map(|t| t.to_be_bytes()).collect();
        self.attr(attr::UNKNOWN_ATTRIBUTES, &v)
    }

    /// MESSAGE-INTEGRITY with `key` (add it after every other attribute but
    /// FINGERPRINT).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let at = self.out.len();
        let mac = integrity(self.out, at, key).finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// FINGERPRINT (last).
    pub fn fingerprint(&mut self) -> &mut Self {
        let at = self.out.len();
        let value = fingerprint(self.out, at);
        self.attr(attr::FINGERPRINT, &value.to_be_bytes())
    }
}

/// The header's length is set when the builder goes: the message is then in the
/// buffer.
impl Drop for Builder<'_> {
    fn drop(&mut self) {
        self.set_length();
    }
}

/// The long-term credential key (RFC 8489 §9.2.2): MD5 of `username:realm:password`.
/// TURN REST API passwords are base64 text, so SASLprep changes nothing in them.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::Digest as _;
    let mut h = md5::Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 §2.1: a sample request with a short-term credential, SOFTWARE,
    /// PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY and FINGERPRINT.
    const RFC5769_REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae\
        802200105354554e207465737420636c69656e74\
        002400046e0001ff80290008932ff9b151263b36\
        000600096576746a3a68367659202020\
        000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2\
        80280004e57a3bcf";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc5769_sample_request_parses_and_checks() {
        let bytes = hex(RFC5769_REQUEST);
        let m = Message::parse(&bytes).unwrap();
        assert_eq!((m.class, m.method), (Class::Request, method::BINDING));
        assert_eq!(m.text(attr::USERNAME).unwrap(), Some("evtj:h6vY"));
        assert_eq!(m.text(attr::SOFTWARE).unwrap(), Some("STUN test client"));
        // Short-term credential: the key is the password itself.
        assert!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.check_integrity(b"wrong"));
        // A flipped bit breaks the fingerprint.
        let mut broken = bytes.clone();
        broken[30] ^= 1;
        assert_eq!(
            Message::parse(&broken).unwrap_err(),
            ParseError::Fingerprint
        );
    }

    /// RFC 5769 §2.2 and §2.3: the sample responses' XOR-MAPPED-ADDRESS, IPv4 and IPv6.
    #[test]
    fn rfc5769_sample_responses_give_their_addresses() {
        let v4 = hex("0101003c2112a442b7e7a701bc34d686fa87dfae8022000b\
             7465737420766563746f7220002000080001a147e112a643\
             000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
             80280004c07d4c96");
        let m = Message::parse(&v4).unwrap();
        assert_eq!(m.class, Class::Success);
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        assert!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        let v6 = hex("010100482112a442b7e7a701bc34d686fa87dfae8022000b\
             7465737420766563746f7220002000140002a1470113a9fa\
             a5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1\
             1784c97c8292c275bfe3ed4180280004c8fb0b4c");
        let m = Message::parse(&v6).unwrap();
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap()
            )
        );
        assert!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    /// RFC 5769 §2.4: a long-term credential request (the key from username, realm
    /// and password).
    #[test]
    fn rfc5769_long_term_request_checks() {
        let bytes = hex("000100602112a44278ad3433c6ad72c029da412e\
             00060012e3839ee38388e383aae38383e382afe382b90000\
             0015001c662f2f3439396b39353464364f4c33346f4c39465354767936347341\
             0014000b6578616d706c652e6f726700\
             00080014f67024656dd64a3e02b8e0712e85c9a28ca89666");
        let m = Message::parse(&bytes).unwrap();
        let username = m.text(attr::USERNAME).unwrap().unwrap();
        let realm = m.text(attr::REALM).unwrap().unwrap();
        assert_eq!(realm, "example.org");
        // The password is "TheMatrIX" after SASLprep of "The<U+00AD>M<U+00AA>trIX".
        let key = long_term_key(username, realm, "TheMatrIX");
        assert!(m.check_integrity(&key));
    }

    #[test]
    fn built_messages_parse_back() {
        let tx = [7u8; 12];
        let mut out = Vec::new();
        let key = long_term_key("1700000000:alice", "example.com", "pw");
        {
            let mut b = Builder::new(&mut out, method::ALLOCATE, Class::Success, tx);
            b.xor_address(
                attr::XOR_RELAYED_ADDRESS,
                "198.51.100.7:49152".parse().unwrap(),
            )
            .xor_address(
                attr::XOR_MAPPED_ADDRESS,
                "[2001:db8::1]:5000".parse().unwrap(),
            )
            .u32_attr(attr::LIFETIME, 600)
            .address(attr::ALTERNATE_SERVER, "203.0.113.9:3478".parse().unwrap())
            .integrity(&key)
            .fingerprint();
        }
        let m = Message::parse(&out).unwrap();
        assert_eq!(
            (m.class, m.method, m.transaction),
            (Class::Success, method::ALLOCATE, tx)
        );
        assert_eq!(
            m.xor_address(attr::XOR_RELAYED_ADDRESS).unwrap(),
            Some("198.51.100.7:49152".parse().unwrap())
        );
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap(),
            Some("[2001:db8::1]:5000".parse().unwrap())
        );
        assert_eq!(m.u32_attr(attr::LIFETIME).unwrap(), Some(600));
        assert!(m.check_integrity(&key));
        // Errors, with unknown attributes.
        {
            let mut b = Builder::new(&mut out, method::ALLOCATE, Class::Error, tx);
            b.error_code(420, "Unknown Attribute")
                .unknown_attributes(&[0x7777]);
        }
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.error_code().unwrap(), Some((420, "Unknown Attribute")));
        assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES), Some(&[0x77, 0x77][..]));
    }

    #[test]
    fn attributes_after_integrity_do_not_count() {
        let tx = [1u8; 12];
        let mut out = Vec::new();
        {
            let mut b = Builder::new(&mut out, method::REFRESH, Class::Request, tx);
            b.u32_attr(attr::LIFETIME, 600)
                .integrity(b"k")
                .u32_attr(attr::LIFETIME, 0);
        }
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.u32_attr(attr::LIFETIME).unwrap(), Some(600));
        assert_eq!(m.attributes().count(), 1);
        assert!(m.check_integrity(b"k"));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let tx = [2u8; 12];
        let mut out = Vec::new();
        {
            let mut b = Builder::new(&mut out, method::BINDING, Class::Request, tx);
            b.attr(attr::SOFTWARE, b"x");
        }
        let good = out.clone();
        assert!(Message::parse(&good).is_ok());
        assert_eq!(Message::parse(&good[..10]).unwrap_err(), ParseError::Short);
        // Truncated: the length field no longer matches.
        assert_eq!(
            Message::parse(&good[..good.len() - 4]).unwrap_err(),
            ParseError::Length
        );
        // An attribute claiming more than there is.
        let mut long = good.clone();
        long[22..24].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(Message::parse(&long).unwrap_err(), ParseError::Attribute);
        // No magic cookie.
        let mut cookie = good.clone();
        cookie[4] ^= 0xFF;
        assert_eq!(Message::parse(&cookie).unwrap_err(), ParseError::NotStun);
        // A short MESSAGE-INTEGRITY.
        {
            let mut b = Builder::new(&mut out, method::BINDING, Class::Request, tx);
            b.attr(attr::MESSAGE_INTEGRITY, &[0; 8]);
        }
        assert_eq!(Message::parse(&out).unwrap_err(), ParseError::Integrity);
        // Something after FINGERPRINT.
        {
            let mut b = Builder::new(&mut out, method::BINDING, Class::Request, tx);
            b.fingerprint().attr(attr::SOFTWARE, b"late");
        }
        assert_eq!(Message::parse(&out).unwrap_err(), ParseError::Fingerprint);
        // A bad address family.
        {
            let mut b = Builder::new(&mut out, method::SEND, Class::Indication, tx);
            b.attr(attr::XOR_PEER_ADDRESS, &[0, 9, 0, 0, 0, 0, 0, 0]);
        }
        let m = Message::parse(&out).unwrap();
        assert_eq!(
            m.xor_address(attr::XOR_PEER_ADDRESS).unwrap_err(),
            ParseError::Value
        );
    }

    #[test]
    fn channel_data_frames() {
        let mut out = Vec::new();
        write_channel_data(&mut out, 0x4001, b"hello", true);
        assert_eq!(out.len(), 12);
        assert_eq!(frame_len([out[0], out[1], out[2], out[3]]), Some(12));
        assert_eq!(channel_data(&out), Some((0x4001, &b"hello"[..])));
        write_channel_data(&mut out, 0x7FFF, b"hello", false);
        assert_eq!(out.len(), 9);
        assert_eq!(channel_data(&out), Some((0x7FFF, &b"hello"[..])));
        // Outside the channel range, or a length past the end.
        assert_eq!(channel_data(&[0x80, 0, 0, 0]), None);
        assert_eq!(channel_data(&[0x3F, 0xFF, 0, 0]), None);
        assert_eq!(channel_data(&[0x40, 0, 0, 9, 1]), None);
        assert_eq!(frame_len([0x80, 0, 0, 4]), None);
        // A STUN header's frame length; the largest either kind announces fits.
        assert_eq!(frame_len([0, 1, 0, 8]), Some(28));
        assert_eq!(frame_len([0, 1, 0xFF, 0xFC]), Some(MAX_FRAME));
        assert!(frame_len([0x40, 0, 0xFF, 0xFF]).unwrap() <= MAX_FRAME);
        assert_eq!(frame_len([0, 1, 0, 7]), None);
    }

    #[test]
    fn method_and_class_bits() {
        for m in [
            method::BINDING,
            method::ALLOCATE,
            method::REFRESH,
            method::SEND,
            method::DATA,
            method::CREATE_PERMISSION,
            method::CHANNEL_BIND,
            0xFFF,
        ] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = message_type(m, c);
                assert_eq!((method_of(t), Class::from_type(t)), (m, c));
            }
        }
        // RFC 5769: a Binding success response is 0x0101.
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
    }
}
