//! Fuzz target: session-value bytes through `decode_value` as a `String`, a `u64`, a
//! `Vec<String>` and a struct with an option, a map and an enum; whatever decodes must survive
//! a round trip. The checks are `session-core/tests/props/value.rs`, shared with the proptest
//! twin.

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../session-core/tests/props/value.rs"]
mod props;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| props::check_value_bytes(data));
