//! Signing keys, the key ring and the signed cookie value `<id>.<tag>`.
//!
//! The tag is HMAC-SHA256 over the cookie name, a zero byte and the id's 16 bytes, written as
//! base64url without padding. The MAC key is not the configured secret itself but one derived
//! from it with HKDF-SHA256 and the purpose label [`MAC_KEY_LABEL`], so a secret that also
//! serves another purpose (a migrated tornado `cookie_secret` that signs XSRF tokens too)
//! cannot be used to forge session cookies through that other use, or the other way round.
//! Parsing is strict (exact length, exact alphabet, canonical base64, nothing after the tag)
//! and happens before any MAC work; verification compares in constant time.
//!
//! The first release (0.1.0 before this change) used the secret as the MAC key directly. To upgrade without logging
//! everyone out, build the keys with [`SigningKey::accept_legacy_tags`] for one cookie
//! lifetime (the idle timeout plus the cookie's extra idle timeout, or the absolute timeout):
//! cookies with a legacy tag verify and are re-signed with the derived key on their next
//! response. Nothing is ever signed with the raw secret.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::error::KeyError;
use crate::id::{SESSION_ID_LEN, SESSION_ID_TEXT_LEN, SessionId};

type HmacSha256 = Hmac<Sha256>;

/// The HKDF `info` label the cookie MAC key is derived with: the key's one purpose.
pub const MAC_KEY_LABEL: &[u8] = b"session-core/v1 cookie tag: HMAC-SHA256(name || 0 || id)";

/// Length of the tag's text form (32 bytes as base64url without padding).
const TAG_TEXT_LEN: usize = 43;
/// Length of a whole cookie value: id, dot, tag.
pub(crate) const COOKIE_VALUE_LEN: usize = SESSION_ID_TEXT_LEN + 1 + TAG_TEXT_LEN;

/// A secret key for signing session cookies: at least [`SigningKey::MIN_LEN`] bytes.
///
/// The MAC key is derived from the secret (HKDF-SHA256, label [`MAC_KEY_LABEL`]), so a secret
/// that also serves another purpose cannot be used to forge cookies through that other use;
/// to upgrade from versions that used the secret directly, see
/// [`accept_legacy_tags`](Self::accept_legacy_tags). `Debug` never shows the key's bytes.
#[derive(Clone)]
pub struct SigningKey {
    /// HMAC state with the derived key already absorbed; cloned for every signature.
    mac: HmacSha256,
    /// HMAC state keyed with the raw secret, kept only to verify the tags of versions before
    /// the first release during a migration ([`SigningKey::accept_legacy_tags`]); never used
    /// to sign.
    legacy: Option<HmacSha256>,
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
        let mut derived = [0u8; 32];
        Hkdf::<Sha256>::new(None, secret)
            .expand(MAC_KEY_LABEL, &mut derived)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Ok(Self {
            mac: hmac_with(&derived),
            legacy: None,
        })
    }

    /// Also accepts cookies whose tag was made with the raw secret as the MAC key (versions
    /// the first release), so that upgrading does not log everyone out; they verify as needing a
    /// re-signature and get a cookie signed with the derived key on their next response.
    /// Keep it for one cookie lifetime after the upgrade, then remove it.
    pub fn accept_legacy_tags(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.legacy = Some(hmac_with(secret.as_ref()));
        self
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
        tag_with(&self.mac, cookie_name, id)
    }

    /// Whether `tag` is the legacy (raw-secret) tag of `id`, when legacy tags are accepted.
    fn verifies_legacy(&self, cookie_name: &str, id: &[u8; SESSION_ID_LEN], tag: &[u8]) -> bool {
        self.legacy
            .as_ref()
            .is_some_and(|legacy| tag_with(legacy, cookie_name, id).verify_slice(tag).is_ok())
    }
}

/// An HMAC-SHA256 state keyed with `key` (HMAC takes keys of any length).
fn hmac_with(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// The MAC of `cookie_name`, a zero byte and `id` under the keyed state `mac`.
fn tag_with(mac: &HmacSha256, cookie_name: &str, id: &[u8; SESSION_ID_LEN]) -> HmacSha256 {
    let mut mac = mac.clone();
    mac.update(cookie_name.as_bytes());
    mac.update(&[0]);
    mac.update(id);
    mac
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
#[derive(Clone, Debug)]
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
        let current = self
            .keys
            .iter()
            .position(|key| key.tag(cookie_name, &id).verify_slice(&tag).is_ok());
        let needs_resign = match current {
            Some(index) => index != 0,
            None if self
                .keys
                .iter()
                .any(|key| key.verifies_legacy(cookie_name, &id, &tag)) =>
            {
                true
            }
            None => return None,
        };
        Some(VerifiedCookie {
            id: SessionId::from_verified_bytes(id),
            needs_resign,
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

    /// The tag the first release made: HMAC keyed with the raw secret.
    fn legacy_value(secret: &[u8], name: &str, id: &SessionId) -> String {
        let tag = tag_with(&hmac_with(secret), name, id.as_bytes())
            .finalize()
            .into_bytes();
        format!("{}.{}", id.encode_text(), URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn the_mac_key_is_derived_not_the_raw_secret() {
        let secret = [1u8; 32];
        let ring = KeyRing::single(key(1));
        let id = SessionId::generate().unwrap();
        let legacy = legacy_value(&secret, "sid", &id);
        // A tag made with the raw secret (another use of the same secret, or an old version)
        // does not verify, and the ring's own tag is not the raw-secret HMAC.
        assert!(ring.verify("sid", &legacy).is_none());
        assert_ne!(ring.sign("sid", &id), legacy);
        // The derived key is HKDF-SHA256(secret, info = MAC_KEY_LABEL).
        let mut derived = [0u8; 32];
        Hkdf::<Sha256>::new(None, &secret)
            .expand(MAC_KEY_LABEL, &mut derived)
            .unwrap();
        assert_eq!(ring.sign("sid", &id), legacy_value(&derived, "sid", &id));
    }

    #[test]
    fn legacy_tags_verify_only_during_a_migration_and_ask_for_resigning() {
        let secret = [1u8; 32];
        let id = SessionId::generate().unwrap();
        let legacy = legacy_value(&secret, "sid", &id);
        let migrating = KeyRing::single(key(1).accept_legacy_tags(secret));
        let verified = migrating.verify("sid", &legacy).unwrap();
        assert_eq!(verified.id, id);
        assert!(verified.needs_resign);
        // New signatures use the derived key, which verifies without re-signing.
        let fresh = migrating.sign("sid", &id);
        assert_ne!(fresh, legacy);
        assert!(!migrating.verify("sid", &fresh).unwrap().needs_resign);
        // The legacy tag binds the cookie name too.
        assert!(migrating.verify("other", &legacy).is_none());
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
