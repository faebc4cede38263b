//! TURN credentials in the TURN REST API form that coturn's `use-auth-secret` checks
//! (draft-uberti-behave-turn-rest): the username is `EXPIRY:user` (Unix seconds, then
//! the account's local part) and the password is the base64 HMAC-SHA1 of the username
//! with the cluster's secret. Nothing is stored per credential: a relay that knows the
//! secret checks any username it is shown, and a peer cluster, which does not know
//! it, cannot mint one. The secret rotates; the previous one stays valid for a grace
//! period so that credentials handed out just before still work.

use base64::Engine as _;
use hmac::{KeyInit, Mac};

use crate::stun::long_term_key;

/// A short-lived credential for one user, as XEP-0215 hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
    /// Unix seconds.
    pub expires: u64,
}

/// The password for a username under a secret.
pub fn password(secret: &[u8], username: &str) -> String {
    let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret)
        .expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A credential for `user` valid until `now + lifetime` (Unix seconds).
pub fn mint(secret: &[u8], user: &str, now: u64, lifetime: u64) -> Credential {
    let expires = now.saturating_add(lifetime);
    let username = format!("{expires}:{user}");
    Credential {
        password: password(secret, &username),
        username,
        expires,
    }
}

/// Why a username is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not `EXPIRY:user`.
    Malformed,
    /// Past its expiry.
    Expired,
}

/// A username's parts once it is well formed and not expired: the user, and the
/// long-term keys (RFC 8489 §9.2.2) it may have been signed with, one per secret in
/// use (the current one first). The message's MESSAGE-INTEGRITY says which, if any.
pub fn keys(
    secrets: &[&[u8]],
    username: &str,
    realm: &str,
    now: u64,
) -> Result<(String, Vec<[u8; 16]>), Refused> {
    let (expiry, user) = username.split_once(':').ok_or(Refused::Malformed)?;
    let expiry: u64 = expiry.parse().map_err(|_| Refused::Malformed)?;
    if user.is_empty() {
        return Err(Refused::Malformed);
    }
    if expiry < now {
        return Err(Refused::Expired);
    }
    let keys = secrets
        .iter()
        .map(|s| long_term_key(username, realm, &password(s, username)))
        .collect();
    Ok((user.to_owned(), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_credentials_give_the_key_they_were_made_with() {
        let c = mint(b"secret", "alice", 1_000, 3_600);
        assert_eq!(c.username, "4600:alice");
        assert_eq!(c.expires, 4_600);
        // The same as `echo -n 4600:alice | openssl dgst -sha1 -hmac secret -binary | base64`.
        assert_eq!(c.password, "a3AFq0ZxH8TvdQLL5U+temOYdmc=");
        let (user, keys) = keys(&[b"new", b"secret"], &c.username, "d", 2_000).unwrap();
        assert_eq!(user, "alice");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1], long_term_key(&c.username, "d", &c.password));
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn expired_and_malformed_usernames_are_refused() {
        assert_eq!(
            keys(&[b"s"], "999:alice", "d", 1_000),
            Err(Refused::Expired)
        );
        assert_eq!(keys(&[b"s"], "alice", "d", 1_000), Err(Refused::Malformed));
        assert_eq!(
            keys(&[b"s"], "x:alice", "d", 1_000),
            Err(Refused::Malformed)
        );
        assert_eq!(keys(&[b"s"], "2000:", "d", 1_000), Err(Refused::Malformed));
        assert!(keys(&[b"s"], "1000:alice", "d", 1_000).is_ok());
    }
}
