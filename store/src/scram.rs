//! SCRAM verifiers (RFC 5802, RFC 7677): what the store keeps instead of a password.
//!
//! A verifier holds the salt, the iteration count, `StoredKey = H(HMAC(SaltedPassword,
//! "Client Key"))` and `ServerKey = HMAC(SaltedPassword, "Server Key")`. Neither key lets
//! anyone log in without the password: a SCRAM client needs `ClientKey`, which the server
//! never sees.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use rand::RngCore as _;
use subtle::ConstantTimeEq as _;

/// Iterations for new verifiers, unless `[limits] scram_iterations` says otherwise.
/// RFC 7677 asks for at least 4096, a floor set in 2015; 10,000 costs a login about 2 ms
/// more of CPU (the server checks a SCRAM proof without PBKDF2; only PLAIN and
/// password changes derive) and makes a stolen database 2.4 times dearer to crack
/// (security review L13). Existing verifiers keep their own count.
pub const DEFAULT_ITERATIONS: u32 = 10_000;

/// The least a configuration may ask for (RFC 7677 §4).
pub const MIN_ITERATIONS: u32 = 4096;

/// Salt length in bytes (RFC 5802 leaves it open; 16 random bytes are ample).
const SALT_LEN: usize = 16;

/// The hash a SCRAM mechanism is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    /// Output length of the hash in bytes.
    pub fn output_len(self) -> usize {
        match self {
            ScramHash::Sha1 => 20,
            ScramHash::Sha256 => 32,
        }
    }

    /// `H(data)`.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest as _;
        match self {
            ScramHash::Sha1 => sha1::Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => sha2::Sha256::digest(data).to_vec(),
        }
    }

    /// `HMAC(key, data)`.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                let mut mac = <hmac::Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key)
                    .expect("HMAC takes keys of any length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
                    .expect("HMAC takes keys of any length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    /// `Hi(password, salt, i)`, i.e. PBKDF2 with this hash's HMAC.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        match self {
            ScramHash::Sha1 => {
                pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, &mut out);
            }
            ScramHash::Sha256 => {
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, &mut out);
            }
        }
        out
    }
}

/// What the server keeps for one user and one hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub hash: ScramHash,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are not secret in the password sense, but they are not for logs either.
        f.debug_struct("ScramVerifier")
            .field("hash", &self.hash)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// A password was refused by SASLprep (RFC 4013): prohibited or unassigned characters.
#[derive(Debug, thiserror::Error)]
#[error("the password contains characters that SASLprep (RFC 4013) prohibits")]
pub struct InvalidPassword;

/// Normalises a password with SASLprep, as SCRAM requires (RFC 5802 §2.2).
pub fn saslprep(password: &str) -> Result<String, InvalidPassword> {
    stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .map_err(|_| InvalidPassword)
}

impl ScramVerifier {
    /// Derives a verifier from a clear password with a fresh random salt.
    pub fn new(hash: ScramHash, password: &str, iterations: u32) -> Result<Self, InvalidPassword> {
        let mut salt = vec![0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::with_salt(hash, password, salt, iterations)
    }

    /// Derives a verifier with a given salt (for tests against the RFC vectors).
    pub fn with_salt(
        hash: ScramHash,
        password: &str,
        salt: Vec<u8>,
        iterations: u32,
    ) -> Result<Self, InvalidPassword> {
        let password = saslprep(password)?;
        let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        Ok(ScramVerifier {
            hash,
            stored_key: hash.hash(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
            salt,
            iterations,
        })
    }

    /// Checks a clear password (SASL PLAIN) against this verifier in constant time.
    /// Runs PBKDF2: call it off the async worker threads.
    pub fn verify_password(&self, password: &str) -> bool {
        let Ok(candidate) =
            Self::with_salt(self.hash, password, self.salt.clone(), self.iterations)
        else {
            return false;
        };
        candidate.stored_key.ct_eq(&self.stored_key).into()
    }

    /// The text form kept in the store: `iterations$salt$storedkey$serverkey` (base64).
    pub fn encode(&self) -> String {
        format!(
            "{}${}${}${}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }

    /// Parses [`Self::encode`]'s form; `None` when the text is damaged.
    pub fn decode(hash: ScramHash, text: &str) -> Option<Self> {
        let mut parts = text.split('$');
        let iterations = parts.next()?.parse().ok()?;
        let salt = B64.decode(parts.next()?).ok()?;
        let stored_key = B64.decode(parts.next()?).ok()?;
        let server_key = B64.decode(parts.next()?).ok()?;
        if parts.next().is_some()
            || stored_key.len() != hash.output_len()
            || server_key.len() != hash.output_len()
        {
            return None;
        }
        Some(ScramVerifier {
            hash,
            salt,
            iterations,
            stored_key,
            server_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5: user "user", password "pencil", salt QSXCR+Q6sek8bf92, 4096 iterations.
    #[test]
    fn rfc5802_sha1_vector() {
        let salt = B64.decode("QSXCR+Q6sek8bf92").unwrap();
        let v = ScramVerifier::with_salt(ScramHash::Sha1, "pencil", salt, 4096).unwrap();
        // ServerSignature in the RFC is HMAC(ServerKey, AuthMessage) = rmF9pqV8S7suAoZWja4dJRkFsKQ=
        let auth_message = "n=user,r=fyko+d2lbbFgONRv9qkxdawL,\
r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096,\
c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j";
        let sig = ScramHash::Sha1.hmac(&v.server_key, auth_message.as_bytes());
        assert_eq!(B64.encode(sig), "rmF9pqV8S7suAoZWja4dJRkFsKQ=");
    }

    /// RFC 7677 §3: the SHA-256 vector.
    #[test]
    fn rfc7677_sha256_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::with_salt(ScramHash::Sha256, "pencil", salt, 4096).unwrap();
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let sig = ScramHash::Sha256.hmac(&v.server_key, auth_message.as_bytes());
        assert_eq!(
            B64.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn encode_decode_round_trip_and_password_check() {
        let v = ScramVerifier::new(ScramHash::Sha256, "correct horse", 4096).unwrap();
        let back = ScramVerifier::decode(ScramHash::Sha256, &v.encode()).unwrap();
        assert_eq!(v, back);
        assert!(back.verify_password("correct horse"));
        assert!(!back.verify_password("correct horse "));
        assert!(ScramVerifier::decode(ScramHash::Sha256, "4096$$$").is_none());
        assert!(ScramVerifier::decode(ScramHash::Sha1, &v.encode()).is_none());
    }

    #[test]
    fn encoded_form_holds_no_password() {
        let v = ScramVerifier::new(ScramHash::Sha1, "hunter2hunter2", 4096).unwrap();
        assert!(!v.encode().contains("hunter2"));
    }
}
