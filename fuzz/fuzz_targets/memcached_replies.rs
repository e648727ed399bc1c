//! Fuzz target: the memcached store's meta-protocol reply parser, fed a stream of bytes as a
//! connection would be. The check is `session-memcached/tests/props/replies.rs`, shared with
//! the proptest twin (`tests/reply_properties.rs`).

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../session-memcached/tests/props/replies.rs"]
mod replies;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replies::check_replies(data));
