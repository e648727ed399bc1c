//! Signing keys, the key ring and the signed cookie value `<id>.<tag>`.
//!
//! The tag is HMAC-SHA256 over the cookie name, a zero byte and the id's 16 bytes, written as
//! base64url without padding. Parsing is strict (exact length, exact alphabet, canonical
//! base64, nothing after the tag) and happens before any MAC work; verification compares in
//! constant time.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::error::KeyError;
use crate::id::{SESSION_ID_LEN, SESSION_ID_TEXT_LEN, SessionId};

type HmacSha256 = Hmac<Sha256>;

/// Length of the tag's text form (32 bytes as base64url without padding).
const TAG_TEXT_LEN: usize = 43;
/// Length of a whole cookie value: id, dot, tag.
pub(crate) const COOKIE_VALUE_LEN: usize = SESSION_ID_TEXT_LEN + 1 + TAG_TEXT_LEN;

/// A secret key for signing session cookies: at least [`SigningKey::MIN_LEN`] bytes.
///
/// `Debug` never shows the key's bytes.
#[derive(Clone)]
pub struct SigningKey {
    /// HMAC state with the key already absorbed; cloned for every signature.
    mac: HmacSha256,
}

impl SigningKey {
    /// The shortest key accepted, in bytes.
    pub const MIN_LEN: usize = 32;

    /// Makes a key from secret bytes, such as a long random string from the application's
    /// configuration (tornado's `cookie_secret`).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let secret = secret.as_ref();
        if secret.len() < Self::MIN_LEN {
            return Err(KeyError::TooShort {
                len: secret.len(),
                min: Self::MIN_LEN,
            });
        }
        let mac = HmacSha256::new_from_slice(secret).map_err(|_| KeyError::TooShort {
            len: secret.len(),
            min: Self::MIN_LEN,
        })?;
        Ok(Self { mac })
    }

    /// Draws a fresh random 32-byte key from the operating system's CSPRNG.
    ///
    /// Cookies signed with it stop verifying when the process ends; use it for tests and demos.
    pub fn generate() -> Result<Self, crate::error::RandomnessError> {
        let mut secret = [0u8; Self::MIN_LEN];
        getrandom::fill(&mut secret).map_err(crate::error::RandomnessError::new)?;
        Ok(Self::new(secret).expect("a 32-byte key is long enough"))
    }

    fn tag(&self, cookie_name: &str, id: &[u8; SESSION_ID_LEN]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(cookie_name.as_bytes());
        mac.update(&[0]);
        mac.update(id);
        mac
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// One or more signing keys: the first signs, every key verifies.
///
/// To rotate, put the new key first and keep the old ones behind it until the cookies they
/// signed have expired; a cookie that verifies with an older key is re-signed with the first
/// key on its next response.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<SigningKey>,
}

/// A cookie value whose signature verified.
#[derive(Debug)]
pub struct VerifiedCookie {
    /// The session id the cookie carries.
    pub(crate) id: SessionId,
    /// Whether it was signed by a key other than the current one and needs re-signing.
    pub(crate) needs_resign: bool,
}

impl VerifiedCookie {
    /// The session id the cookie carries.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Whether it was signed by an older key and should be re-signed with the current one.
    pub fn needs_resign(&self) -> bool {
        self.needs_resign
    }
}

impl KeyRing {
    /// Builds a ring from keys, newest first. An empty list is an error.
    pub fn new(keys: impl IntoIterator<Item = SigningKey>) -> Result<Self, KeyError> {
        let keys: Vec<SigningKey> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    /// A ring of one key.
    pub fn single(key: SigningKey) -> Self {
        Self { keys: vec![key] }
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a ring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Signs `id` for the cookie `cookie_name` with the current (first) key: the cookie value
    /// `<id>.<tag>`. The manager does this; it is public for integrations and benchmarks.
    pub fn sign(&self, cookie_name: &str, id: &SessionId) -> String {
        let tag = self.keys[0]
            .tag(cookie_name, id.as_bytes())
            .finalize()
            .into_bytes();
        let mut value = String::with_capacity(COOKIE_VALUE_LEN);
        value.push_str(&id.encode_text());
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut value);
        value
    }

    /// Parses and verifies a cookie value; `None` for anything that is not a value this ring
    /// signed for `cookie_name`. Strict parsing comes first and costs no MAC work; the tag is
    /// compared in constant time.
    pub fn verify(&self, cookie_name: &str, value: &str) -> Option<VerifiedCookie> {
        let bytes = value.as_bytes();
        if bytes.len() != COOKIE_VALUE_LEN || bytes[SESSION_ID_TEXT_LEN] != b'.' {
            return None;
        }
        let id = decode_exact::<SESSION_ID_LEN>(&bytes[..SESSION_ID_TEXT_LEN])?;
        let tag = decode_exact::<32>(&bytes[SESSION_ID_TEXT_LEN + 1..])?;
        let index = self
            .keys
            .iter()
            .position(|key| key.tag(cookie_name, &id).verify_slice(&tag).is_ok())?;
        Some(VerifiedCookie {
            id: SessionId::from_verified_bytes(id),
            needs_resign: index != 0,
        })
    }
}

/// Decodes canonical base64url without padding into exactly `N` bytes.
fn decode_exact<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    // The engine's length estimate rounds up to whole 3-byte groups; leave room for it.
    let mut buffer = [0u8; 48];
    let written = URL_SAFE_NO_PAD.decode_slice(text, &mut buffer).ok()?;
    if written != N {
        return None;
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&buffer[..N]);
    Some(out)
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::new([byte; 32]).unwrap()
    }

    #[test]
    fn short_keys_and_empty_rings_are_rejected() {
        assert!(matches!(
            SigningKey::new([0u8; 31]),
            Err(KeyError::TooShort { len: 31, min: 32 })
        ));
        assert!(matches!(KeyRing::new(Vec::new()), Err(KeyError::Empty)));
    }

    #[test]
    fn debug_never_shows_key_material() {
        let secret = "a-very-secret-value-that-is-long-enough";
        let ring = KeyRing::single(SigningKey::new(secret).unwrap());
        let shown = format!("{ring:?} {:?}", SigningKey::new(secret).unwrap());
        assert!(!shown.contains("secret"));
        assert!(!shown.contains("very"));
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let ring = KeyRing::single(key(1));
        let id = SessionId::generate().unwrap();
        let value = ring.sign("sid", &id);
        assert_eq!(value.len(), COOKIE_VALUE_LEN);
        let verified = ring.verify("sid", &value).unwrap();
        assert_eq!(verified.id, id);
        assert!(!verified.needs_resign);
    }

    #[test]
    fn the_tag_binds_the_cookie_name() {
        let ring = KeyRing::single(key(1));
        let value = ring.sign("sid", &SessionId::generate().unwrap());
        assert!(ring.verify("other", &value).is_none());
    }

    #[test]
    fn rotation_accepts_old_keys_and_asks_for_resigning() {
        let old = KeyRing::single(key(1));
        let rotated = KeyRing::new([key(2), key(1)]).unwrap();
        let removed = KeyRing::single(key(2));
        let id = SessionId::generate().unwrap();
        let value = old.sign("sid", &id);
        let verified = rotated.verify("sid", &value).unwrap();
        assert_eq!(verified.id, id);
        assert!(verified.needs_resign);
        assert!(removed.verify("sid", &value).is_none());
    }

    #[test]
    fn non_canonical_and_malformed_values_are_rejected() {
        let ring = KeyRing::single(key(1));
        let value = ring.sign("sid", &SessionId::generate().unwrap());
        // Flip the last character of the id to one that differs only in the unused low bits.
        let mut bytes = value.clone().into_bytes();
        let last_id_char = bytes[SESSION_ID_TEXT_LEN - 1];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == last_id_char).unwrap();
        bytes[SESSION_ID_TEXT_LEN - 1] = alphabet[pos ^ 1];
        assert!(
            ring.verify("sid", std::str::from_utf8(&bytes).unwrap())
                .is_none()
        );
        assert!(ring.verify("sid", &format!("{value}=")).is_none());
        assert!(ring.verify("sid", &value.replace('.', ":")).is_none());
        assert!(ring.verify("sid", "").is_none());
        let non_ascii = format!("{}é", &value[..COOKIE_VALUE_LEN - 2]);
        assert_eq!(non_ascii.len(), COOKIE_VALUE_LEN);
        assert!(ring.verify("sid", &non_ascii).is_none());
    }
}
