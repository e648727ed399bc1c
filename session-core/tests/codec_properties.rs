//! The proptest twins of the `record_decode` and `value_decode` fuzz targets
//! (`fuzz/fuzz_targets`): the same checks (`props/record.rs`, `props/value.rs`) on arbitrary
//! bytes, and on edits of bytes the real encoder made, which get past the format byte and the
//! first length prefixes that arbitrary bytes rarely do.

#[path = "props/record.rs"]
mod record_props;
#[path = "props/seeds.rs"]
mod seeds;
#[path = "props/value.rs"]
mod value_props;

use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::sample::Index;
use session_core::Record;
use session_core::codec::{FORMAT_MOVED, FORMAT_V1, encode_record, encode_value};
use value_props::{Profile, Role};

/// `bytes` with one to five edits: a byte set, xored, inserted or removed, or a truncation.
fn edited(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((0..5u8, any::<Index>(), any::<u8>()), 1..6).prop_map(move |edits| {
        let mut bytes = bytes.clone();
        for (operation, at, byte) in edits {
            let len = bytes.len();
            match operation {
                0 if len > 0 => bytes[at.index(len)] = byte,
                1 if len > 0 => bytes[at.index(len)] ^= byte,
                2 => bytes.insert(at.index(len + 1), byte),
                3 if len > 0 => {
                    bytes.remove(at.index(len));
                }
                4 => bytes.truncate(at.index(len + 1)),
                _ => {}
            }
        }
        bytes
    })
}

/// Records with any timestamps and a few values.
fn record() -> impl Strategy<Value = Record> {
    (
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        proptest::collection::btree_map(
            ".{0,8}",
            proptest::collection::vec(any::<u8>(), 0..40),
            0..5,
        ),
    )
        .prop_map(|(created, deadline, values)| {
            let mut record = Record::new(UNIX_EPOCH + Duration::from_millis(created));
            record.set_absolute_deadline(deadline.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)));
            for (name, bytes) in values {
                record.set_value(name, bytes);
            }
            record
        })
}

/// Bytes a store could hold: arbitrary, behind a format byte, a moved marker, or an edit of an
/// encoded record.
fn stored_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        any::<Vec<u8>>().prop_map(|bytes| [&[FORMAT_V1][..], &bytes].concat()),
        "[!-~]{40,60}".prop_map(|key| [&[FORMAT_MOVED][..], key.as_bytes()].concat()),
        any::<Vec<u8>>().prop_map(|bytes| [&[FORMAT_MOVED][..], &bytes].concat()),
        record().prop_flat_map(|record| edited(encode_record(&record).unwrap())),
    ]
}

fn profile() -> impl Strategy<Value = Profile> {
    let role = prop_oneof![
        Just(Role::Guest),
        any::<u64>().prop_map(|since| Role::Member { since }),
        proptest::collection::vec(".{0,6}", 0..3).prop_map(Role::Admin),
    ];
    (
        ".{0,10}",
        proptest::option::of(".{0,10}"),
        any::<u64>(),
        proptest::collection::btree_map(".{0,6}", any::<i64>(), 0..4),
        role,
    )
        .prop_map(|(name, nickname, visits, scores, role)| Profile {
            name,
            nickname,
            visits,
            scores,
            role,
        })
}

/// Bytes a session value could be: arbitrary, or an edit of an encoded value of each type.
fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<Vec<u8>>(),
        ".{0,20}".prop_flat_map(|text| edited(encode_value(&text).unwrap())),
        any::<u64>().prop_flat_map(|n| edited(encode_value(&n).unwrap())),
        proptest::collection::vec(".{0,6}", 0..5)
            .prop_flat_map(|list| edited(encode_value(&list).unwrap())),
        profile().prop_flat_map(|profile| edited(encode_value(&profile).unwrap())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn records_round_trip(record in record()) {
        record_props::check_record(&record);
    }

    #[test]
    fn stored_bytes_decode_or_fail_and_successes_round_trip(bytes in stored_bytes()) {
        record_props::check_record_bytes(&bytes);
    }

    #[test]
    fn genuine_values_round_trip(profile in profile()) {
        value_props::check_value_bytes(&encode_value(&profile).unwrap());
        prop_assert_eq!(
            session_core::codec::decode_value::<Profile>(&encode_value(&profile).unwrap()).unwrap(),
            profile
        );
    }

    #[test]
    fn value_bytes_decode_or_fail_and_successes_round_trip(bytes in value_bytes()) {
        value_props::check_value_bytes(&bytes);
    }
}

/// The `record_decode` seeds: records the encoder made (empty, with a deadline and values,
/// with many values), a moved marker, and hostile length prefixes. Each passes the checks, and
/// they are the committed files.
#[test]
fn the_committed_record_seeds_are_current() {
    let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let empty = Record::new(at(1_700_000_000_000));
    let mut login = Record::new(at(1_700_000_000_000));
    login.set_absolute_deadline(Some(at(1_700_086_400_000)));
    login.set_value("user", encode_value("alice").unwrap());
    login.set_value("visits", encode_value(&3u64).unwrap());
    login.set_value("bin", vec![0, 255, 10, 13, 32]);
    let mut many = Record::new(at(u64::MAX));
    for i in 0..12u64 {
        many.set_value(format!("k{i}"), encode_value(&i).unwrap());
    }
    let mut moved = vec![FORMAT_MOVED];
    moved.extend_from_slice(b"session:");
    moved.extend_from_slice(&[b'Q'; 43]);
    let seeds = [
        ("empty", encode_record(&empty).unwrap()),
        ("login", encode_record(&login).unwrap()),
        ("many-values", encode_record(&many).unwrap()),
        ("moved", moved),
        // A name claiming 60 MiB; a value claiming 16 MiB.
        (
            "hostile-name",
            vec![FORMAT_V1, 0, 0, 1, 0xfc, 0x00, 0x00, 0xc0, 0x03],
        ),
        (
            "hostile-value",
            vec![FORMAT_V1, 0, 0, 1, 1, b'a', 0xfc, 0, 0, 0, 1],
        ),
    ];
    for (_, bytes) in &seeds {
        record_props::check_record_bytes(bytes);
    }
    for record in [&empty, &login, &many] {
        record_props::check_record(record);
    }
    seeds::check_or_write("record_decode", &seeds);
}

/// The `value_decode` seeds: a value of each type the target decodes, each role, and a
/// truncated one. Each passes the checks, and they are the committed files.
#[test]
fn the_committed_value_seeds_are_current() {
    let profile = |role| Profile {
        name: "alice".to_owned(),
        nickname: Some("al".to_owned()),
        visits: 300,
        scores: [("chess".to_owned(), -5), ("go".to_owned(), i64::MAX)].into(),
        role,
    };
    let member = encode_value(&profile(Role::Member {
        since: 1_700_000_000,
    }))
    .unwrap();
    let seeds = [
        ("string", encode_value("alice").unwrap()),
        ("u64-max", encode_value(&u64::MAX).unwrap()),
        ("list", encode_value(&["a", "bc", ""]).unwrap()),
        (
            "profile-guest",
            encode_value(&profile(Role::Guest)).unwrap(),
        ),
        ("profile-member", member.clone()),
        (
            "profile-admin",
            encode_value(&profile(Role::Admin(vec!["billing".to_owned()]))).unwrap(),
        ),
        ("profile-truncated", member[..member.len() - 3].to_vec()),
    ];
    for (_, bytes) in &seeds {
        value_props::check_value_bytes(bytes);
    }
    seeds::check_or_write("value_decode", &seeds);
}
