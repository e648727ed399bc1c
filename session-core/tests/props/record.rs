//! The record property, checked by the `record_decode` fuzz target and by its proptest twin
//! (`tests/codec_properties.rs`). Both include this file by path, so they check one property;
//! every check panics on a violation.

use std::time::SystemTime;

use session_core::Record;
use session_core::codec::{
    DecodeError, DecodedEntry, FORMAT_MOVED, FORMAT_V1, decode_entry, decode_entry_within,
    decode_record, encode_moved, encode_record, encode_record_within, encoded_record_len,
    is_moved_marker,
};

/// Any bytes: decoding never panics, and whatever decodes survives a round trip.
///
/// A record re-encodes to bytes that decode to an equal record and re-encode to the same bytes
/// (the encoding of a decoded record is canonical; the input need not be), and
/// [`encoded_record_len`] is exact. [`decode_entry`] agrees with [`decode_record`] except on a
/// moved marker, which is exactly its target's [`encode_moved`]. [`decode_entry_within`]
/// refuses bytes over its limit, and otherwise agrees with [`decode_entry`].
pub fn check_record_bytes(bytes: &[u8]) {
    let record = decode_record(bytes);
    if let Ok(record) = &record {
        check_record(record);
    }
    let entry = decode_entry(bytes);
    if is_moved_marker(bytes) {
        assert!(
            matches!(record, Err(DecodeError::UnknownFormat(FORMAT_MOVED))),
            "a moved marker decoded as a record: {record:?}"
        );
        match &entry {
            Ok(DecodedEntry::Moved(to)) => assert_eq!(encode_moved(to), bytes),
            Ok(DecodedEntry::Record(_)) => panic!("a moved marker decoded as a record entry"),
            Err(error) => assert!(matches!(error, DecodeError::BadMovedMarker), "{error:?}"),
        }
    } else {
        assert_eq!(
            entry.as_ref().ok(),
            record.ok().map(DecodedEntry::Record).as_ref()
        );
    }
    let len = bytes.len();
    for limit in [0, len.saturating_sub(1), len, usize::MAX] {
        let within = decode_entry_within(bytes, limit);
        if len > limit {
            assert!(
                matches!(within, Err(DecodeError::TooLarge { size, limit: l }) if size == len && l == limit),
                "{within:?}"
            );
        } else {
            assert_eq!(within.ok(), entry.as_ref().ok().cloned());
        }
    }
}

/// A record (decoded, or built by a test) survives encoding and decoding, and its accessors
/// work on whatever timestamps and values it holds.
pub fn check_record(record: &Record) {
    let bytes = encode_record(record).expect("a record encodes");
    assert_eq!(bytes.first(), Some(&FORMAT_V1));
    assert_eq!(
        encoded_record_len(record).expect("a record encodes"),
        bytes.len()
    );
    let again = decode_record(&bytes).expect("an encoded record decodes");
    assert_eq!(&again, record);
    assert_eq!(encode_record(&again).expect("a record encodes"), bytes);
    assert_eq!(
        encode_record_within(record, bytes.len()).expect("within its own size"),
        bytes
    );
    assert!(encode_record_within(record, bytes.len() - 1).is_err());

    let _ = record.created_at();
    let deadline = record.absolute_deadline();
    let remaining = record.absolute_remaining(SystemTime::now());
    assert_eq!(deadline.is_some(), remaining.is_some());
    assert_eq!(record.names().count(), record.len());
    assert_eq!(record.is_empty(), record.names().next().is_none());
    for name in record.names() {
        assert!(record.value(name).is_some(), "{name:?}");
    }
    let _ = format!("{record:?}");
}
