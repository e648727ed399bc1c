//! The stored form of a session: its values and its timestamps.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A session as a store keeps it: named values (each one a value encoded by the
/// [codec](crate::codec)), the creation time and the optional absolute deadline.
///
/// The idle deadline is not part of the record: it is the entry's time to live in the store,
/// extended by `save` and `touch`, which is why `touch` need not rewrite the record.
/// `Debug` shows value names and sizes, never value bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    created_at_ms: u64,
    absolute_deadline_ms: Option<u64>,
    #[serde(with = "byte_values")]
    values: BTreeMap<String, Vec<u8>>,
}

/// The values as byte strings rather than sequences of `u8`: the same bytes on the wire (a
/// length, then the bytes). Names and values are read as borrowed `str` and `[u8]` and copied
/// only once the decoder has found that many bytes in its input, so a length prefix alone
/// never makes it allocate (an owned read would allocate the claimed length first, and a
/// sequence would reserve up to a mebibyte on the word of its prefix).
mod byte_values {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Serialize, Serializer};

    struct Bytes<'a>(&'a [u8]);

    impl Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(self.0)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        values: &BTreeMap<String, Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(values.iter().map(|(name, bytes)| (name, Bytes(bytes))))
    }

    struct ByteBuf(Vec<u8>);

    struct ByteBufVisitor;

    impl<'de> Visitor<'de> for ByteBufVisitor {
        type Value = ByteBuf;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<ByteBuf, E> {
            Ok(ByteBuf(bytes.to_vec()))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<ByteBuf, E> {
            Ok(ByteBuf(bytes))
        }

        /// For formats that write byte strings as sequences.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
            let mut bytes = Vec::new();
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(ByteBuf(bytes))
        }
    }

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_bytes(ByteBufVisitor)
        }
    }

    /// A value's name, read as a borrowed `str` where the format allows.
    struct Name(String);

    struct NameVisitor;

    impl<'de> Visitor<'de> for NameVisitor {
        type Value = Name;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a value name")
        }

        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
            Ok(Name(name.to_owned()))
        }

        fn visit_string<E: serde::de::Error>(self, name: String) -> Result<Name, E> {
            Ok(Name(name))
        }
    }

    impl<'de> Deserialize<'de> for Name {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_str(NameVisitor)
        }
    }

    /// Builds the map entry by entry (no intermediate map of wrappers).
    struct ValuesVisitor;

    impl<'de> Visitor<'de> for ValuesVisitor {
        type Value = BTreeMap<String, Vec<u8>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of names to byte strings")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut values = BTreeMap::new();
            while let Some((Name(name), ByteBuf(bytes))) = map.next_entry::<Name, ByteBuf>()? {
                values.insert(name, bytes);
            }
            Ok(values)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        deserializer.deserialize_map(ValuesVisitor)
    }
}

impl Record {
    /// An empty record created at `now`, with no absolute deadline.
    pub fn new(now: SystemTime) -> Self {
        Self {
            created_at_ms: unix_millis(now),
            absolute_deadline_ms: None,
            values: BTreeMap::new(),
        }
    }

    /// When the session was created.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_at_ms)
    }

    /// The moment after which the session is over however active it is, if there is one.
    pub fn absolute_deadline(&self) -> Option<SystemTime> {
        self.absolute_deadline_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Sets or removes the absolute deadline.
    pub fn set_absolute_deadline(&mut self, deadline: Option<SystemTime>) {
        self.absolute_deadline_ms = deadline.map(unix_millis);
    }

    /// Time left until the absolute deadline at `now`: `None` without a deadline,
    /// `Some(Duration::ZERO)` once it has passed.
    pub fn absolute_remaining(&self, now: SystemTime) -> Option<Duration> {
        self.absolute_deadline_ms
            .map(|deadline| Duration::from_millis(deadline.saturating_sub(unix_millis(now))))
    }

    /// The encoded bytes of the value named `name`.
    pub fn value(&self, name: &str) -> Option<&[u8]> {
        self.values.get(name).map(Vec::as_slice)
    }

    /// Stores encoded bytes under `name`, returning the previous bytes.
    pub fn set_value(&mut self, name: impl Into<String>, bytes: Vec<u8>) -> Option<Vec<u8>> {
        self.values.insert(name.into(), bytes)
    }

    /// Removes the value named `name`, returning its bytes.
    pub fn remove_value(&mut self, name: &str) -> Option<Vec<u8>> {
        self.values.remove(name)
    }

    /// Removes every value; timestamps stay.
    pub fn clear_values(&mut self) {
        self.values.clear();
    }

    /// The names of the values, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// How many values the record holds.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the record holds no value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Sizes<'a>(&'a BTreeMap<String, Vec<u8>>);
        impl fmt::Debug for Sizes<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, v)| (k, v.len())))
                    .finish()
            }
        }
        f.debug_struct("Record")
            .field("created_at_ms", &self.created_at_ms)
            .field("absolute_deadline_ms", &self.absolute_deadline_ms)
            .field("value_sizes", &Sizes(&self.values))
            .finish()
    }
}

/// Milliseconds since the Unix epoch; zero for times before it.
pub(crate) fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
