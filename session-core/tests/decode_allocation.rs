//! Hostile stored bytes cannot make the decoder allocate more than a small multiple of their
//! own length. Its own test binary, so the counting allocator sees little besides the decode.

use std::alloc::System;

use cap::Cap;
use session_core::codec::{DecodeError, FORMAT_V1, decode_record};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Nine bytes: a record created at 0 with no deadline, one value whose name claims to be a
/// 60 MiB string.
const HOSTILE_NAME: [u8; 9] = [FORMAT_V1, 0, 0, 1, 0xfc, 0x00, 0x00, 0xc0, 0x03];

/// Eleven bytes: one value named `a` whose bytes claim to be 16 MiB long.
const HOSTILE_VALUE: [u8; 11] = [FORMAT_V1, 0, 0, 1, 1, b'a', 0xfc, 0, 0, 0, 1];

/// Decodes `bytes` and returns the outcome with the bytes allocated meanwhile.
fn allocated_by(bytes: &[u8]) -> (Result<session_core::Record, DecodeError>, usize) {
    let before = ALLOCATOR.total_allocated();
    let decoded = decode_record(bytes);
    (decoded, ALLOCATOR.total_allocated() - before)
}

#[test]
fn a_few_hostile_bytes_do_not_allocate_mebibytes() {
    for hostile in [&HOSTILE_NAME[..], &HOSTILE_VALUE[..]] {
        let (decoded, allocated) = allocated_by(hostile);
        assert!(
            matches!(decoded, Err(DecodeError::Malformed(_))),
            "{decoded:?}"
        );
        assert!(
            allocated < 64 * 1024,
            "decoding {hostile:?} allocated {allocated} bytes"
        );
    }
}
