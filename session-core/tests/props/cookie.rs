//! The signed-cookie property, checked by the `cookie_verify` fuzz target and by its proptest
//! twin (`tests/cookie_properties.rs`). Both include this file by path, so they check one
//! property; every check panics on a violation.
//!
//! Cookies are computed here from the documented scheme (the MAC key is HKDF-SHA256 of the
//! secret with [`MAC_KEY_LABEL`] as `info`; the tag is HMAC-SHA256 over the cookie name, a
//! zero byte and the id's 16 bytes; the value is `base64url(id).base64url(tag)` without
//! padding), independently of [`KeyRing`], so an id can be built from arbitrary bytes (the
//! library only draws ids at random) and the ring is checked against the specification.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use session_core::{
    KeyRing, MAC_KEY_LABEL, SESSION_ID_LEN, SessionConfig, SessionManager, SigningKey, find_cookies,
};
use sha2::Sha256;

/// The secret of the ring's current (first) key.
const CURRENT_SECRET: [u8; 32] = [0x11; 32];

/// The secret of the ring's older key, which also accepts the legacy tags made with this
/// secret as the raw MAC key.
const OLDER_SECRET: [u8; 32] = [0x22; 32];

/// The cookie names signed and verified under; the first is the manager's (the default name).
pub const NAMES: [&str; 2] = ["session", "other"];

/// The fixed ring: the current key, then an older one that accepts legacy tags.
pub fn ring() -> KeyRing {
    KeyRing::new([
        SigningKey::new(CURRENT_SECRET).expect("a 32-byte secret"),
        SigningKey::new(OLDER_SECRET)
            .expect("a 32-byte secret")
            .accept_legacy_tags(OLDER_SECRET),
    ])
    .expect("two keys")
}

/// The configuration of the manager [`check_request_cookie`] is given: the fixed ring, the
/// default cookie name.
pub fn manager_config() -> SessionConfig {
    SessionConfig::new(ring())
}

/// Which key made a reference cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The ring's current key: verifies without asking for re-signing.
    Current,
    /// The ring's older key.
    Older,
    /// The older key's raw secret (a tag of the first release).
    Legacy,
}

impl Signer {
    /// Every signer.
    pub const ALL: [Self; 3] = [Self::Current, Self::Older, Self::Legacy];

    /// The signer picked by a fuzz byte.
    pub fn from_byte(byte: u8) -> Self {
        Self::ALL[usize::from(byte) % Self::ALL.len()]
    }

    /// Whether a cookie it made verifies as needing re-signing.
    pub fn needs_resign(self) -> bool {
        self != Self::Current
    }

    fn mac_key(self) -> &'static [u8; 32] {
        static DERIVED: LazyLock<[[u8; 32]; 2]> =
            LazyLock::new(|| [derive(&CURRENT_SECRET), derive(&OLDER_SECRET)]);
        match self {
            Self::Current => &DERIVED[0],
            Self::Older => &DERIVED[1],
            Self::Legacy => &OLDER_SECRET,
        }
    }
}

/// The documented MAC key of `secret`.
fn derive(secret: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(None, secret)
        .expand(MAC_KEY_LABEL, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// The cookie value `signer` makes for the id `id` under `name`, from the specification.
pub fn reference_cookie(signer: Signer, name: &str, id: &[u8; SESSION_ID_LEN]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(signer.mac_key()).expect("any key length");
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(id);
    let tag = mac.finalize().into_bytes();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(id),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// Arbitrary text verifies, under any name, only as one of the three reference cookies of the
/// id its first 22 characters encode, asks for re-signing exactly when the current key did not
/// make it, and the ring signs its id as the current key does.
pub fn check_arbitrary(ring: &KeyRing, text: &str) {
    for name in NAMES {
        let Some(verified) = ring.verify(name, text) else {
            continue;
        };
        let id = text
            .get(..22)
            .and_then(|encoded| URL_SAFE_NO_PAD.decode(encoded).ok())
            .and_then(|bytes| <[u8; SESSION_ID_LEN]>::try_from(bytes).ok())
            .unwrap_or_else(|| panic!("{text:?} verified under {name:?} but starts with no id"));
        let signer = Signer::ALL
            .into_iter()
            .find(|&signer| reference_cookie(signer, name, &id) == text)
            .unwrap_or_else(|| panic!("{text:?} verified under {name:?} but no key made it"));
        assert_eq!(verified.needs_resign(), signer.needs_resign(), "{text:?}");
        assert_eq!(
            ring.sign(name, verified.id()),
            reference_cookie(Signer::Current, name, &id),
            "{text:?}"
        );
    }
}

/// The id `id` round-trips under `name`: each signer's cookie verifies as one id under that
/// name only, re-signing as expected; the ring signs that id as the specification says, and
/// its own cookie verifies as the same id without re-signing.
pub fn check_round_trip(ring: &KeyRing, id: &[u8; SESSION_ID_LEN], name: &str) {
    let current = reference_cookie(Signer::Current, name, id);
    for signer in Signer::ALL {
        let value = reference_cookie(signer, name, id);
        let verified = ring
            .verify(name, &value)
            .unwrap_or_else(|| panic!("{signer:?}'s cookie {value:?} did not verify"));
        assert_eq!(verified.needs_resign(), signer.needs_resign(), "{value:?}");
        let signed = ring.sign(name, verified.id());
        assert_eq!(signed, current, "{value:?}");
        let again = ring.verify(name, &signed).expect("the ring's own cookie");
        assert!(again.id() == verified.id());
        assert!(!again.needs_resign());
        for other_name in NAMES.into_iter().filter(|&other| other != name) {
            assert!(
                ring.verify(other_name, &value).is_none(),
                "{value:?} verified under {other_name:?}"
            );
        }
    }
}

/// Edits `original` by `script`, three bytes per edit (an operation, a position, a byte):
/// set, xor, insert or remove a byte, or truncate. Positions wrap around the current length.
pub fn apply_edits(original: &[u8], script: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for edit in script.chunks_exact(3) {
        let (operation, at, byte) = (edit[0] % 5, usize::from(edit[1]), edit[2]);
        let len = bytes.len();
        match operation {
            0 if len > 0 => bytes[at % len] = byte,
            1 if len > 0 => bytes[at % len] ^= byte,
            2 => bytes.insert(at % (len + 1), byte),
            3 if len > 0 => {
                bytes.remove(at % len);
            }
            4 => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
    bytes
}

/// A signed cookie edited by `script` verifies, if at all, as the same id (so as one of that
/// id's reference cookies), and the edit obeys [`check_arbitrary`].
pub fn check_edited(
    ring: &KeyRing,
    id: &[u8; SESSION_ID_LEN],
    signer: Signer,
    name: &str,
    script: &[u8],
) {
    let original = reference_cookie(signer, name, id);
    let original_id = ring
        .verify(name, &original)
        .expect("a reference cookie verifies")
        .id()
        .clone();
    let edited = String::from_utf8_lossy(&apply_edits(original.as_bytes(), script)).into_owned();
    if let Some(verified) = ring.verify(name, &edited) {
        assert!(
            verified.id() == &original_id,
            "{edited:?}, an edit of {original:?}, verified as another id"
        );
    }
    check_arbitrary(ring, &edited);
}

/// Of the cookies named like the session's in `headers` (raw bytes, read as lossy UTF-8),
/// `request_cookie` returns the first that verifies, else the first; a header holding only a
/// valid cookie (`signer`'s for `id`) is found when it comes first, and a valid cookie is
/// found when it comes last.
pub fn check_request_cookie(
    manager: &SessionManager,
    ring: &KeyRing,
    headers: &[&[u8]],
    id: &[u8; SESSION_ID_LEN],
    signer: Signer,
) {
    let name = manager.config().cookie_config().cookie_name();
    assert_eq!(name, NAMES[0], "the manager uses the default cookie name");
    let texts: Vec<String> = headers
        .iter()
        .map(|header| String::from_utf8_lossy(header).into_owned())
        .collect();
    let candidates: Vec<&str> = texts
        .iter()
        .flat_map(|text| find_cookies(text, name))
        .collect();
    let expected = candidates
        .iter()
        .copied()
        .find(|value| ring.verify(name, value).is_some())
        .or(candidates.first().copied());
    assert_eq!(
        manager.request_cookie(headers.iter().copied()).as_deref(),
        expected,
        "{texts:?}"
    );

    let valid = reference_cookie(signer, name, id);
    let planted = format!("{name}={valid}").into_bytes();
    let first = std::iter::once(planted.as_slice()).chain(headers.iter().copied());
    assert_eq!(
        manager.request_cookie(first).as_deref(),
        Some(valid.as_str()),
        "{texts:?}"
    );
    let last = headers
        .iter()
        .copied()
        .chain(std::iter::once(planted.as_slice()));
    let found = manager
        .request_cookie(last)
        .expect("a cookie of the session's name is there");
    assert!(
        ring.verify(name, &found).is_some(),
        "{found:?} was picked over a valid cookie in {texts:?}"
    );
}
