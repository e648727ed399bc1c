//! Hostile stored bytes cannot make the decoder allocate more than a small multiple of their
//! own length. Its own test binary with a single test, so the counting allocator sees little
//! besides the decodes.

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

/// A 64 KiB record whose one value claims to be 16 MB long.
fn a_record_of_64_kib_claiming_16_mb() {
    let mut hostile = vec![FORMAT_V1, 0, 0, 1, 1, b'a', 0xfc];
    hostile.extend_from_slice(&16_000_000u32.to_le_bytes());
    hostile.resize(65_538, 0);
    let (decoded, allocated) = allocated_by(&hostile);
    assert!(
        matches!(decoded, Err(DecodeError::Malformed(_))),
        "{decoded:?}"
    );
    assert!(
        allocated < 2 * hostile.len(),
        "decoding {} bytes allocated {allocated} bytes",
        hostile.len()
    );
}

/// One test, so that no other test allocates while it counts.
#[test]
fn hostile_bytes_allocate_at_most_about_their_own_length() {
    a_record_of_64_kib_claiming_16_mb();
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
