//! Names the router makes or checks: random ids for streams, stanzas, resources and
//! link epochs, and account names normalised as RFC 7622 says.

use jid::BareJid;
use rand::RngCore as _;

/// 96 random bits as 24 hex digits.
pub(crate) fn random_id() -> String {
    let mut raw = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut raw);
    hex(&raw)
}

/// Bytes as lowercase hex digits.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalises a SASL user name to a localpart of our domain (RFC 7622 nodeprep).
pub fn normalize_username(name: &str, domain: &str) -> Option<String> {
    let jid = BareJid::new(&format!("{name}@{domain}")).ok()?;
    Some(jid.node()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_nodeprepped() {
        assert_eq!(normalize_username("Alice", "d").as_deref(), Some("alice"));
        assert_eq!(normalize_username("a b", "d"), None);
        assert_eq!(normalize_username("", "d"), None);
    }

    #[test]
    fn ids_are_24_hex_digits_and_differ() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
