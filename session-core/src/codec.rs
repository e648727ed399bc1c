//! The one place that turns records and session values into bytes and back.
//!
//! A stored record is a format byte ([`FORMAT_V1`]) followed by the record in bincode 2's
//! standard configuration (through its serde support). Each session value inside a record is
//! itself a bincode encoding of the application's serde type. Decoding must consume every
//! byte and is bounded by its input. bincode allocates a string or byte buffer as soon as it
//! reads its length prefix, checked only against a claim limit that also counts every integer
//! at its in-memory size (16 bytes for a `u128` whose varint takes one byte): so each decode
//! runs under the smallest claim limit of 64 KiB, 1 MiB, 16 MiB, 256 MiB and [`DECODE_LIMIT`]
//! that is at least 16 times the input's length, which genuine bytes never exceed. A stored
//! entry is decoded only if it is within its store's record limit ([`decode_entry_within`]).
//! A record's names and values are read as borrowed slices of the input and copied only once
//! found there, so hostile record bytes allocate no more than their own length (a few bytes
//! claiming a 60 MiB name, or a 64 KiB record claiming a 16 MB value, fail without it).
//!
//! An application value is decoded by its own serde type, so hostile bytes inside it can make
//! the decoder allocate up to 16 times their length for a string, and serde reserves up to a
//! mebibyte for a sequence on the word of its length prefix. A type whose in-memory form is
//! much larger than its encoding (a long vector of `None` of a large array type) takes that
//! memory, and a sequence of a zero-sized type costs time per claimed element with no input
//! to read. Keep session values small and plain.
//!
//! A moved marker (what an id cycle leaves under the old key, see [`crate::store`]) is the
//! format byte [`FORMAT_MOVED`] followed by the new storage key as ASCII text.

use std::error::Error;
use std::fmt;

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::id::StorageKey;
use crate::record::Record;

/// The format byte of records written by this version.
pub const FORMAT_V1: u8 = 1;

/// The format byte of a moved marker: the entry's session now lives under another key.
pub const FORMAT_MOVED: u8 = 0x80;

/// The largest claim limit of any decode, in bytes: the limit for inputs over 16 MiB.
pub const DECODE_LIMIT: usize = 1024 * 1024 * 1024;

/// How many bytes of claim limit a decode gets per input byte: the most any one input byte
/// can claim (a one-byte varint of a `u128`).
const CLAIM_PER_INPUT_BYTE: usize = 16;

type CodecConfig<const LIMIT: usize> = Configuration<LittleEndian, Varint, Limit<LIMIT>>;

fn codec_config<const LIMIT: usize>() -> CodecConfig<LIMIT> {
    config::standard().with_limit::<LIMIT>()
}

/// A record or value could not be encoded.
#[derive(Debug)]
pub struct EncodeError(bincode::error::EncodeError);

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("encoding failed")
    }
}

impl Error for EncodeError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.0)
    }
}

/// Bytes that are not a record or value this version can read.
#[derive(Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// There were no bytes at all.
    Empty,
    /// The format byte is not one this version knows (corrupt, foreign or from a newer version).
    UnknownFormat(u8),
    /// The payload is malformed.
    Malformed(bincode::error::DecodeError),
    /// Fewer bytes than a backend's framing needs (a version prefix, say).
    TooShort {
        /// How many bytes there were.
        len: usize,
    },
    /// A moved marker whose target is not a storage key.
    BadMovedMarker,
    /// Bytes were left over after a complete value.
    TrailingBytes {
        /// How many bytes were left over.
        count: usize,
    },
    /// The stored bytes are longer than the store's record limit, so they were not decoded.
    TooLarge {
        /// How many bytes there were.
        size: usize,
        /// The store's record limit.
        limit: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("no bytes to decode"),
            Self::UnknownFormat(byte) => write!(f, "unknown format byte {byte:#04x}"),
            Self::Malformed(_) => f.write_str("malformed payload"),
            Self::TooShort { len } => write!(f, "only {len} bytes, too short to hold a record"),
            Self::BadMovedMarker => f.write_str("moved marker without a valid target key"),
            Self::TrailingBytes { count } => write!(f, "{count} bytes after the end of the value"),
            Self::TooLarge { size, limit } => {
                write!(f, "{size} stored bytes, over the record limit of {limit}")
            }
        }
    }
}

impl Error for DecodeError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Malformed(e) => Some(e),
            _ => None,
        }
    }
}

/// Encodes a record for storage.
pub fn encode_record(record: &Record) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V1);
    bincode::serde::encode_into_std_write(record, &mut out, codec_config::<DECODE_LIMIT>())
        .map_err(EncodeError)?;
    Ok(out)
}

/// Encodes a record for a store whose limit is `limit` bytes; [`StoreError::TooLarge`] when over.
///
/// [`StoreError::TooLarge`]: crate::StoreError::TooLarge
pub fn encode_record_within(record: &Record, limit: usize) -> Result<Vec<u8>, crate::StoreError> {
    let bytes = encode_record(record)?;
    if bytes.len() > limit {
        return Err(crate::StoreError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// The length [`encode_record`] would produce, computed without allocating.
pub fn encoded_record_len(record: &Record) -> Result<usize, EncodeError> {
    let mut counter = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(record, &mut counter, codec_config::<DECODE_LIMIT>())
        .map_err(EncodeError)?;
    Ok(1 + counter.bytes_written)
}

/// Decodes stored bytes into a record.
pub fn decode_record(bytes: &[u8]) -> Result<Record, DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&FORMAT_V1, payload)) => decode_exact(payload),
        Some((&other, _)) => Err(DecodeError::UnknownFormat(other)),
    }
}

/// What stored bytes hold: a session's record, or a marker saying where the session moved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedEntry {
    /// A session record.
    Record(Record),
    /// A moved marker naming the key the session moved to.
    Moved(StorageKey),
}

/// Encodes a moved marker pointing at `to`.
pub fn encode_moved(to: &StorageKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + to.as_str().len());
    out.push(FORMAT_MOVED);
    out.extend_from_slice(to.as_str().as_bytes());
    out
}

/// Whether stored bytes are a moved marker (decided by the format byte alone, so a store can
/// tell without decoding).
pub fn is_moved_marker(bytes: &[u8]) -> bool {
    bytes.first() == Some(&FORMAT_MOVED)
}

/// Decodes the bytes a store holds into a record or a moved marker, refusing without decoding
/// bytes longer than `limit`, the store's record limit
/// ([`SessionStore::max_record_size`](crate::SessionStore::max_record_size)).
pub fn decode_entry_within(bytes: &[u8], limit: usize) -> Result<DecodedEntry, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    decode_entry(bytes)
}

/// Decodes stored bytes into a record or a moved marker.
pub fn decode_entry(bytes: &[u8]) -> Result<DecodedEntry, DecodeError> {
    match bytes.split_first() {
        Some((&FORMAT_MOVED, target)) => std::str::from_utf8(target)
            .ok()
            .and_then(StorageKey::from_stored)
            .map(DecodedEntry::Moved)
            .ok_or(DecodeError::BadMovedMarker),
        _ => decode_record(bytes).map(DecodedEntry::Record),
    }
}

/// Encodes one session value.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, codec_config::<DECODE_LIMIT>()).map_err(EncodeError)
}

/// Decodes one session value as `T`.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_exact(bytes)
}

/// Decodes all of `bytes` as `T` under the claim limit of its length's tier (see the
/// [module documentation](self)).
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    const MIB: usize = 1024 * 1024;
    match bytes.len().saturating_mul(CLAIM_PER_INPUT_BYTE) {
        claim if claim <= MIB / 16 => decode_exact_within::<T, { MIB / 16 }>(bytes),
        claim if claim <= MIB => decode_exact_within::<T, MIB>(bytes),
        claim if claim <= 16 * MIB => decode_exact_within::<T, { 16 * MIB }>(bytes),
        claim if claim <= 256 * MIB => decode_exact_within::<T, { 256 * MIB }>(bytes),
        _ => decode_exact_within::<T, DECODE_LIMIT>(bytes),
    }
}

fn decode_exact_within<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (value, read) = bincode::serde::decode_from_slice(bytes, codec_config::<LIMIT>())
        .map_err(DecodeError::Malformed)?;
    if read != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            count: bytes.len() - read,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn sample() -> Record {
        let mut record = Record::new(SystemTime::now());
        record.set_value("user", encode_value("alice").unwrap());
        record.set_value("bin", vec![0, 255, 10, 13, 32]);
        record.set_absolute_deadline(Some(SystemTime::now()));
        record
    }

    #[test]
    fn records_round_trip_and_length_is_exact() {
        let record = sample();
        let bytes = encode_record(&record).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(encoded_record_len(&record).unwrap(), bytes.len());
        assert_eq!(decode_record(&bytes).unwrap(), record);
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        let bytes = encode_record(&sample()).unwrap();
        assert!(matches!(decode_record(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_record(&[9, 1, 2]),
            Err(DecodeError::UnknownFormat(9))
        ));
        assert!(matches!(
            decode_record(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Malformed(_))
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode_record(&longer),
            Err(DecodeError::TrailingBytes { count: 1 })
        ));
        // A length prefix claiming a huge map must fail without allocating it.
        let huge = [
            FORMAT_V1, 0, 0, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ];
        assert!(decode_record(&huge).is_err());
    }

    #[test]
    fn genuine_records_decode_at_every_size_tier() {
        // A record whose one value fills nearly the whole input, just under and over each
        // tier's limit: the claim limit never refuses genuine bytes.
        for size in [10, 4000, 4200, 65_000, 66_000, 1_040_000, 1_050_000] {
            let mut record = Record::new(SystemTime::now());
            record.set_value("v", encode_value(&"x".repeat(size)).unwrap());
            let bytes = encode_record(&record).unwrap();
            assert_eq!(decode_record(&bytes).unwrap(), record, "{size}");
            let value: String = decode_value(record.value("v").unwrap()).unwrap();
            assert_eq!(value.len(), size);
        }
    }

    #[test]
    fn genuine_values_whose_integers_claim_more_than_their_bytes_decode() {
        // bincode counts 8 bytes against its limit for each u64 (and each length prefix), 4
        // for each enum tag, 16 for each u128, however few bytes their varints take.
        for n in [512u64, 1100, 10_000, 200_000] {
            let ids: Vec<u64> = (0..n).map(|i| i % 100).collect();
            let bytes = encode_value(&ids).unwrap();
            assert_eq!(decode_value::<Vec<u64>>(&bytes).unwrap(), ids, "{n}");
            let wide: Vec<u128> = (0..n).map(|i| u128::from(i % 100)).collect();
            assert_eq!(
                decode_value::<Vec<u128>>(&encode_value(&wide).unwrap()).unwrap(),
                wide
            );
        }
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        enum Flag {
            On,
            Off,
        }
        let flags: Vec<Flag> = (0..1100)
            .map(|i| if i % 2 == 0 { Flag::On } else { Flag::Off })
            .collect();
        let bytes = encode_value(&flags).unwrap();
        assert_eq!(decode_value::<Vec<Flag>>(&bytes).unwrap(), flags);
        let mut record = Record::new(SystemTime::now());
        for i in 0..200 {
            record.set_value(format!("p{i}"), encode_value(&true).unwrap());
        }
        assert_eq!(
            decode_record(&encode_record(&record).unwrap()).unwrap(),
            record
        );
    }

    #[test]
    fn record_values_keep_the_wire_format_of_byte_sequences() {
        // Records written before values became byte strings (a derived map of `Vec<u8>`).
        #[derive(serde::Serialize)]
        struct Earlier {
            created_at_ms: u64,
            absolute_deadline_ms: Option<u64>,
            values: std::collections::BTreeMap<String, Vec<u8>>,
        }
        let values: std::collections::BTreeMap<String, Vec<u8>> = [
            ("a".to_owned(), vec![0, 1, 255]),
            ("long".to_owned(), vec![7; 300]),
            ("none".to_owned(), Vec::new()),
        ]
        .into();
        let mut earlier_bytes = vec![FORMAT_V1];
        bincode::serde::encode_into_std_write(
            &Earlier {
                created_at_ms: 1234,
                absolute_deadline_ms: None,
                values: values.clone(),
            },
            &mut earlier_bytes,
            codec_config::<DECODE_LIMIT>(),
        )
        .unwrap();
        let mut record =
            Record::new(std::time::UNIX_EPOCH + std::time::Duration::from_millis(1234));
        for (name, bytes) in values {
            record.set_value(name, bytes);
        }
        assert_eq!(encode_record(&record).unwrap(), earlier_bytes);
        assert_eq!(decode_record(&earlier_bytes).unwrap(), record);
    }

    #[test]
    fn entries_over_the_store_limit_are_refused_before_decoding() {
        let bytes = encode_record(&sample()).unwrap();
        assert!(decode_entry_within(&bytes, bytes.len()).is_ok());
        assert!(matches!(
            decode_entry_within(&bytes, bytes.len() - 1),
            Err(DecodeError::TooLarge { size, limit }) if size == bytes.len() && limit == size - 1
        ));
    }

    #[test]
    fn every_truncation_and_byte_flip_is_an_error_or_a_record_never_a_panic() {
        let bytes = encode_record(&sample()).unwrap();
        for end in 0..bytes.len() {
            assert!(decode_record(&bytes[..end]).is_err());
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                let _ = decode_record(&flipped);
            }
        }
    }

    #[test]
    fn moved_markers_round_trip_and_bad_targets_are_errors() {
        let to = crate::StorageKey::derive(
            &crate::KeyPrefix::default(),
            &crate::SessionId::generate().unwrap(),
        );
        let bytes = encode_moved(&to);
        assert!(is_moved_marker(&bytes));
        assert!(!is_moved_marker(&encode_record(&sample()).unwrap()));
        assert_eq!(decode_entry(&bytes).unwrap(), DecodedEntry::Moved(to));
        assert!(decode_record(&bytes).is_err(), "a marker is no record");
        for bad in [
            &[FORMAT_MOVED][..],
            &[FORMAT_MOVED, b'a', b' ', b'b'],
            &[FORMAT_MOVED, 0xff],
        ] {
            assert!(matches!(
                decode_entry(bad),
                Err(DecodeError::BadMovedMarker)
            ));
        }
        let record = sample();
        assert_eq!(
            decode_entry(&encode_record(&record).unwrap()).unwrap(),
            DecodedEntry::Record(record)
        );
    }

    #[test]
    fn values_round_trip_and_wrong_types_fail() {
        let bytes = encode_value(&vec![1u32, 2, 3]).unwrap();
        assert_eq!(decode_value::<Vec<u32>>(&bytes).unwrap(), vec![1, 2, 3]);
        assert!(decode_value::<String>(&encode_value(&u64::MAX).unwrap()).is_err());
    }
}
