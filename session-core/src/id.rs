//! Session ids and the storage keys derived from them.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::error::{ConfigError, RandomnessError};

/// Length of a session id in bytes (128 bits).
pub const SESSION_ID_LEN: usize = 16;

/// Length of a session id's text form: base64url without padding.
pub(crate) const SESSION_ID_TEXT_LEN: usize = 22;

/// A 128-bit session id drawn from the operating system's CSPRNG.
///
/// Ids are only ever created by the server ([`SessionId::generate`]); a request can present
/// one only inside a cookie whose signature verifies. `Debug` never shows the id's bytes, and the
/// type has no `Display`: the id is a bearer credential and must not reach logs or error messages.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId([u8; SESSION_ID_LEN]);

impl SessionId {
    /// Draws a new random id from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut bytes = [0u8; SESSION_ID_LEN];
        getrandom::fill(&mut bytes).map_err(RandomnessError::new)?;
        Ok(Self(bytes))
    }

    /// Rebuilds an id from bytes that were verified to come from this server.
    pub(crate) fn from_verified_bytes(bytes: [u8; SESSION_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes of the id.
    pub(crate) fn as_bytes(&self) -> &[u8; SESSION_ID_LEN] {
        &self.0
    }

    /// The id's text form as used inside the cookie value.
    pub(crate) fn encode_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// The prefix put in front of every storage key, such as `session:`.
///
/// At most [`KeyPrefix::MAX_LEN`] bytes of printable ASCII without spaces, so that every key
/// stays within memcached's rules (at most 250 bytes, no whitespace or control characters).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// The longest prefix accepted, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates a prefix.
    pub fn new(prefix: impl Into<String>) -> Result<Self, ConfigError> {
        let prefix = prefix.into();
        if prefix.len() > Self::MAX_LEN || !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::InvalidKeyPrefix);
        }
        Ok(Self(prefix))
    }

    /// The prefix as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self("session:".to_owned())
    }
}

/// The key a session is stored under: `<prefix><base64url(SHA-256(id))>`.
///
/// A store only ever sees this key, never the session id, so a dump of a cache server's keys
/// hands nobody a usable cookie. It is safe to log.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey(String);

impl StorageKey {
    /// Length of the hashed part of every key, in bytes.
    pub const HASH_TEXT_LEN: usize = 43;

    /// Derives the storage key of `id` under `prefix`.
    pub fn derive(prefix: &KeyPrefix, id: &SessionId) -> Self {
        let digest = Sha256::digest(id.as_bytes());
        let mut key = String::with_capacity(prefix.0.len() + Self::HASH_TEXT_LEN);
        key.push_str(&prefix.0);
        URL_SAFE_NO_PAD.encode_string(digest, &mut key);
        Self(key)
    }

    /// Rebuilds a key read back from a store (the target of a moved marker): printable ASCII
    /// without spaces, no longer than a derived key can be; `None` otherwise.
    pub(crate) fn from_stored(text: &str) -> Option<Self> {
        let fits = (Self::HASH_TEXT_LEN..=KeyPrefix::MAX_LEN + Self::HASH_TEXT_LEN)
            .contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_graphic());
        fits.then(|| Self(text.to_owned()))
    }

    /// The key as text: printable ASCII, at most 243 bytes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key with a store's own `prefix` in front (borrowed when the prefix is empty), for
    /// backends that namespace keys shared with other applications.
    pub fn prefixed<'a>(&'a self, prefix: &str) -> std::borrow::Cow<'a, str> {
        if prefix.is_empty() {
            std::borrow::Cow::Borrowed(&self.0)
        } else {
            std::borrow::Cow::Owned(format!("{prefix}{}", self.0))
        }
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self.0)
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_debug_is_redacted() {
        let a = SessionId::generate().unwrap();
        let b = SessionId::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "SessionId(<redacted>)");
        assert_eq!(a.encode_text().len(), SESSION_ID_TEXT_LEN);
    }

    #[test]
    fn storage_key_hides_the_id_and_fits_memcached_rules() {
        let id = SessionId::generate().unwrap();
        let prefix = KeyPrefix::new("x".repeat(KeyPrefix::MAX_LEN)).unwrap();
        let key = StorageKey::derive(&prefix, &id);
        assert!(key.as_str().len() <= 250);
        assert!(!key.as_str().contains(&id.encode_text()));
        assert!(key.as_str().bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(key, StorageKey::derive(&prefix, &id));
        let default_key = StorageKey::derive(&KeyPrefix::default(), &id);
        assert!(default_key.as_str().starts_with("session:"));
        assert_eq!(default_key.as_str().len(), 8 + StorageKey::HASH_TEXT_LEN);
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(KeyPrefix::new("app:sess:").is_ok());
        assert!(KeyPrefix::new("").is_ok());
        assert!(KeyPrefix::new("has space").is_err());
        assert!(KeyPrefix::new("tab\t").is_err());
        assert!(KeyPrefix::new("ünï").is_err());
        assert!(KeyPrefix::new("x".repeat(KeyPrefix::MAX_LEN + 1)).is_err());
    }
}
