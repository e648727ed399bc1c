//! Fuzz target: signed cookie values, and the session cookie's pick among `Cookie` headers.
//!
//! The whole input, as lossy UTF-8, is a cookie value to verify. Then its first byte picks a
//! signer and a cookie name, the next 16 bytes are a session id, and the rest is both an edit
//! script applied to that id's signed cookie and, split at newlines, the raw `Cookie` headers
//! of a request. The checks are `session-core/tests/props/cookie.rs`, shared with the
//! proptest twin.

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../session-core/tests/props/cookie.rs"]
mod props;

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use session_core::{KeyRing, SessionManager};
use session_memory::MemoryStore;

/// The ring and a manager over it, built once.
struct Fixture {
    ring: KeyRing,
    manager: SessionManager,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| Fixture {
    ring: props::ring(),
    manager: SessionManager::new(Arc::new(MemoryStore::new()), props::manager_config())
        .expect("a valid configuration"),
});

fuzz_target!(|data: &[u8]| {
    let Fixture { ring, manager } = &*FIXTURE;
    props::check_arbitrary(ring, &String::from_utf8_lossy(data));
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Some((id, tail)) = rest.split_first_chunk::<16>() else {
        return;
    };
    let signer = props::Signer::from_byte(selector);
    let name = props::NAMES[usize::from(selector / 3) % props::NAMES.len()];
    props::check_round_trip(ring, id, name);
    props::check_edited(ring, id, signer, name, tail);
    let headers: Vec<&[u8]> = tail.split(|&byte| byte == b'\n').collect();
    props::check_request_cookie(manager, ring, &headers, id, signer);
});
