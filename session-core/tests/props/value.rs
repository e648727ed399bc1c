//! The session-value property, checked by the `value_decode` fuzz target and by its proptest
//! twin (`tests/codec_properties.rs`). Both include this file by path, so they check one
//! property; every check panics on a violation.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use session_core::codec::{decode_value, encode_value};

/// A small application value with an option, a map, a sequence and an enum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// A name.
    pub name: String,
    /// An optional nickname.
    pub nickname: Option<String>,
    /// A counter.
    pub visits: u64,
    /// Scores by game.
    pub scores: BTreeMap<String, i64>,
    /// What the user may do.
    pub role: Role,
}

/// A user's role: unit, struct and tuple variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// No account.
    Guest,
    /// An account, created at a Unix time.
    Member {
        /// When the account was created.
        since: u64,
    },
    /// An administrator of some areas.
    Admin(Vec<String>),
}

/// Any bytes, decoded as each representative type: never a panic, and a success survives a
/// round trip with canonical re-encoding.
pub fn check_value_bytes(bytes: &[u8]) {
    check_value_round_trip::<String>(bytes);
    check_value_round_trip::<u64>(bytes);
    check_value_round_trip::<Vec<String>>(bytes);
    check_value_round_trip::<Profile>(bytes);
}

/// `bytes` decoded as `T`: if it decodes, the value re-encodes to bytes that decode to an equal
/// value and re-encode to the same bytes.
pub fn check_value_round_trip<T>(bytes: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(value) = decode_value::<T>(bytes) else {
        return;
    };
    let encoded = encode_value(&value).expect("a decoded value encodes");
    let again: T = decode_value(&encoded).expect("an encoded value decodes");
    assert_eq!(again, value);
    assert_eq!(
        encode_value(&again).expect("a decoded value encodes"),
        encoded
    );
}
