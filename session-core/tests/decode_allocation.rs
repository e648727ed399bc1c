//! Hostile stored bytes cannot make the decoder allocate more than a small multiple of their
//! own length. Its own test binary, so the counting allocator sees little besides the decode.

use std::alloc::System;

use cap::Cap;
use session_core::codec::{DecodeError, FORMAT_V1, decode_record};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Nine bytes: a record created at 0 with no deadline, one value whose name claims to be a
/// 60 MiB string.
const HOSTILE: [u8; 9] = [FORMAT_V1, 0, 0, 1, 0xfc, 0x00, 0x00, 0xc0, 0x03];

#[test]
fn nine_hostile_bytes_do_not_allocate_sixty_mebibytes() {
    let before = ALLOCATOR.total_allocated();
    let decoded = decode_record(&HOSTILE);
    let allocated = ALLOCATOR.total_allocated() - before;
    assert!(
        matches!(decoded, Err(DecodeError::Malformed(_))),
        "{decoded:?}"
    );
    assert!(
        allocated < 64 * 1024,
        "decoding 9 bytes allocated {allocated} bytes"
    );
}
