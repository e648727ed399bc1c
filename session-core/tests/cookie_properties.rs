//! The proptest twin of the `cookie_verify` fuzz target (`fuzz/fuzz_targets`): the same
//! checks (`props/cookie.rs`) on arbitrary text and bytes, on ids built from arbitrary bytes,
//! and on edits of signed cookies, which reach the MAC and the re-signing paths that arbitrary
//! text never does. (The manager-level twin, bad cookies reaching no store, is in the
//! conformance crate's `tests/manager.rs`.)

#[path = "props/cookie.rs"]
mod props;
#[path = "props/seeds.rs"]
mod seeds;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use props::{NAMES, Signer};
use proptest::prelude::*;
use session_core::store::{LoadedRecord, StoredEntry};
use session_core::{Record, SessionManager, SessionStore, StorageKey, StoreError, Version};

/// A store the checks never reach: `request_cookie` makes no store call.
struct Unreachable;

#[async_trait]
impl SessionStore for Unreachable {
    async fn create(&self, _: &StorageKey, _: &Record, _: Duration) -> Result<Version, StoreError> {
        unreachable!("no store call")
    }
    async fn load_entry(&self, _: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        unreachable!("no store call")
    }
    async fn load(&self, _: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        unreachable!("no store call")
    }
    async fn save(
        &self,
        _: &StorageKey,
        _: &Record,
        _: Duration,
        _: Version,
    ) -> Result<Version, StoreError> {
        unreachable!("no store call")
    }
    async fn mark_moved(
        &self,
        _: &StorageKey,
        _: Version,
        _: &StorageKey,
        _: Duration,
    ) -> Result<(), StoreError> {
        unreachable!("no store call")
    }
    async fn touch(&self, _: &StorageKey, _: Duration) -> Result<bool, StoreError> {
        unreachable!("no store call")
    }
    async fn delete(&self, _: &StorageKey) -> Result<(), StoreError> {
        unreachable!("no store call")
    }
    async fn delete_if_version(&self, _: &StorageKey, _: Version) -> Result<(), StoreError> {
        unreachable!("no store call")
    }
    fn max_record_size(&self) -> usize {
        64 * 1024
    }
    fn max_key_len(&self) -> Option<usize> {
        None
    }
}

fn manager() -> SessionManager {
    SessionManager::new(Arc::new(Unreachable), props::manager_config()).unwrap()
}

/// A signer, picked by a byte as the fuzz target picks it.
fn signer() -> impl Strategy<Value = Signer> {
    any::<u8>().prop_map(Signer::from_byte)
}

/// One of the two cookie names.
fn name() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(NAMES.to_vec())
}

/// Text a cookie value could be: arbitrary, the right shape, or a reference cookie.
fn cookie_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        any::<Vec<u8>>().prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        "[A-Za-z0-9_-]{22}\\.[A-Za-z0-9_-]{43}",
        (signer(), name(), any::<[u8; 16]>())
            .prop_map(|(signer, name, id)| props::reference_cookie(signer, name, &id)),
    ]
}

/// One cookie pair: a name like the session's or not, and a value that may verify.
fn cookie_pair() -> impl Strategy<Value = String> {
    let names = proptest::sample::select(vec!["session", "other", "Session", " session", "s"]);
    let value = prop_oneof![
        (signer(), any::<[u8; 16]>())
            .prop_map(|(signer, id)| props::reference_cookie(signer, NAMES[0], &id)),
        (
            signer(),
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 3..9)
        )
            .prop_map(|(signer, id, script)| {
                let valid = props::reference_cookie(signer, NAMES[0], &id);
                String::from_utf8_lossy(&props::apply_edits(valid.as_bytes(), &script)).into_owned()
            }),
        "[ -~]{0,70}",
        any::<String>(),
    ];
    (names, value, any::<bool>()).prop_map(|(name, value, quoted)| {
        if quoted {
            format!("{name}=\"{value}\"")
        } else {
            format!("{name}={value}")
        }
    })
}

/// A `Cookie` header's raw bytes: pairs joined by `; `, or arbitrary bytes.
fn header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(cookie_pair(), 0..4).prop_map(|pairs| pairs.join("; ").into()),
        any::<Vec<u8>>(),
        (any::<Vec<u8>>(), cookie_pair()).prop_map(|(mut bytes, pair)| {
            bytes.extend_from_slice(b"; ");
            bytes.extend_from_slice(pair.as_bytes());
            bytes
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_verifies_only_as_a_reference_cookie(text in cookie_text()) {
        props::check_arbitrary(&props::ring(), &text);
    }

    #[test]
    fn ids_from_arbitrary_bytes_round_trip(id in any::<[u8; 16]>(), name in name()) {
        props::check_round_trip(&props::ring(), &id, name);
    }

    #[test]
    fn edited_cookies_never_verify_as_another_id(
        id in any::<[u8; 16]>(),
        signer in signer(),
        name in name(),
        script in proptest::collection::vec(any::<u8>(), 0..15),
    ) {
        props::check_edited(&props::ring(), &id, signer, name, &script);
    }

    #[test]
    fn request_cookie_finds_the_first_valid_cookie(
        headers in proptest::collection::vec(header(), 0..4),
        id in any::<[u8; 16]>(),
        signer in signer(),
    ) {
        let headers: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        props::check_request_cookie(&manager(), &props::ring(), &headers, &id, signer);
    }
}

/// The edits the fuzz target and the strategies above rely on do what they say.
#[test]
fn edits_set_xor_insert_remove_and_truncate() {
    assert_eq!(props::apply_edits(b"abc", &[0, 1, b'x']), b"axc");
    assert_eq!(props::apply_edits(b"abc", &[1, 4, 1]), b"acc");
    assert_eq!(props::apply_edits(b"abc", &[2, 3, b'd']), b"abcd");
    assert_eq!(props::apply_edits(b"abc", &[3, 0, 0]), b"bc");
    assert_eq!(props::apply_edits(b"abc", &[4, 2, 0]), b"ab");
    assert_eq!(
        props::apply_edits(b"abc", &[0, 1]),
        b"abc",
        "an incomplete edit"
    );
    assert_eq!(props::apply_edits(b"", &[0, 1, 2, 1, 0, 0, 3, 0, 0]), b"");
}

/// The reference cookies are the ring's: the current key's is what the ring signs, so the
/// checks above test the ring against the specification rather than against itself.
#[test]
fn reference_cookies_match_the_ring() {
    let ring = props::ring();
    let value = props::reference_cookie(Signer::Current, "session", &[7; 16]);
    let verified = ring.verify("session", &value).unwrap();
    assert!(!verified.needs_resign());
    assert_eq!(ring.sign("session", verified.id()), value);
    for signer in [Signer::Older, Signer::Legacy] {
        let value = props::reference_cookie(signer, "session", &[7; 16]);
        assert!(ring.verify("session", &value).unwrap().needs_resign());
    }
}

/// The `cookie_verify` seeds: the three signers' cookies as whole inputs (which verify), and
/// inputs in the target's layout (a selector byte, an id, then an edit script that is also the
/// request's `Cookie` headers). Each passes the checks, and they are the committed files.
#[test]
fn the_committed_seeds_are_current() {
    let id: [u8; 16] = std::array::from_fn(|i| u8::try_from(i).unwrap() * 17);
    let other_id = [0xa5; 16];
    let layout = |selector: u8, tail: &[u8]| [&[selector][..], &id, tail].concat();
    let planted = format!(
        "theme=dark; session={}\nsession=\"{}\"; other=1",
        props::reference_cookie(Signer::Older, NAMES[0], &other_id),
        props::reference_cookie(Signer::Current, NAMES[1], &other_id)
    );
    let seeds = [
        (
            "current",
            props::reference_cookie(Signer::Current, NAMES[0], &id).into_bytes(),
        ),
        (
            "older",
            props::reference_cookie(Signer::Older, NAMES[0], &id).into_bytes(),
        ),
        (
            "legacy-other-name",
            props::reference_cookie(Signer::Legacy, NAMES[1], &id).into_bytes(),
        ),
        (
            "non-ascii",
            format!(
                "{}\u{e9}",
                &props::reference_cookie(Signer::Current, NAMES[0], &id)[..64]
            )
            .into_bytes(),
        ),
        ("layout-no-edits", layout(0, b"")),
        // Xor the id's last character: the same character or one its unused low bits
        // tell apart; set the dot; truncate.
        (
            "layout-edits",
            layout(4, &[1, 21, 1, 0, 22, b':', 4, 60, 0]),
        ),
        ("layout-headers", layout(2, planted.as_bytes())),
    ];
    let ring = props::ring();
    let manager = manager();
    for (name, bytes) in &seeds {
        props::check_arbitrary(&ring, &String::from_utf8_lossy(bytes));
        if let Some((id, tail)) = bytes[1..].split_first_chunk::<16>() {
            let signer = Signer::from_byte(bytes[0]);
            let name = NAMES[usize::from(bytes[0] / 3) % NAMES.len()];
            props::check_round_trip(&ring, id, name);
            props::check_edited(&ring, id, signer, name, tail);
            let headers: Vec<&[u8]> = tail.split(|&byte| byte == b'\n').collect();
            props::check_request_cookie(&manager, &ring, &headers, id, signer);
        }
        assert!(bytes.len() < 512, "{name}");
    }
    seeds::check_or_write("cookie_verify", &seeds);
}
