//! Fuzz target: stored bytes through `decode_record`, `decode_entry` and
//! `decode_entry_within`; whatever decodes must survive a round trip. The checks are
//! `session-core/tests/props/record.rs`, shared with the proptest twin.

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../session-core/tests/props/record.rs"]
mod props;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| props::check_record_bytes(data));
