//! Error types. Callers of the manager see [`SessionError`]; stores return [`StoreError`].

use std::error::Error;
use std::fmt;
use std::time::Duration;

use crate::codec::{DecodeError, EncodeError};

/// The operating system's random number generator failed.
#[derive(Debug)]
pub struct RandomnessError(getrandom::Error);

impl RandomnessError {
    pub(crate) fn new(source: getrandom::Error) -> Self {
        Self(source)
    }
}

impl fmt::Display for RandomnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the operating system's random number generator failed")
    }
}

impl Error for RandomnessError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.0)
    }
}

/// A signing key or key ring that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is shorter than the minimum.
    TooShort {
        /// The key's length in bytes.
        len: usize,
        /// The minimum length in bytes.
        min: usize,
    },
    /// The key ring has no key.
    Empty,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len, min } => {
                write!(f, "signing key is {len} bytes; at least {min} are required")
            }
            Self::Empty => f.write_str("a key ring needs at least one key"),
        }
    }
}

impl Error for KeyError {}

/// A session configuration value out of its allowed range.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A timeout outside the range every store supports.
    TimeoutOutOfRange {
        /// Which setting.
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// The touch threshold is longer than the idle timeout.
    TouchThresholdTooLong,
    /// The storage key prefix is too long or has characters outside printable ASCII.
    InvalidKeyPrefix,
    /// The cookie name is not an RFC 6265 token.
    InvalidCookieName,
    /// The cookie path or domain contains characters a cookie attribute cannot hold.
    InvalidCookieAttribute {
        /// Which attribute.
        attribute: &'static str,
    },
    /// The maximum encoded size is zero.
    ZeroMaxEncodedSize,
    /// A cookie setting breaks a rule browsers enforce by dropping the cookie (so every
    /// request would be anonymous): `SameSite=None` or `Partitioned` without `Secure`, or a
    /// `__Secure-` / `__Host-` name prefix whose conditions are not met.
    CookieRule {
        /// The rule broken, as browsers state it.
        rule: &'static str,
    },
    /// Storage keys (the key prefix plus 43 characters) would be longer than the store can
    /// hold, so every request would fail.
    KeyTooLong {
        /// The length of a storage key with this prefix.
        len: usize,
        /// The store's limit ([`SessionStore::max_key_len`](crate::SessionStore::max_key_len)).
        limit: usize,
    },
    /// The manager's maximum encoded size is above the store's record limit: sessions in
    /// between would be accepted by the manager and refused by the store.
    MaxEncodedSizeOverStoreLimit {
        /// The manager's maximum encoded size.
        max_encoded_size: usize,
        /// The store's limit ([`SessionStore::max_record_size`](crate::SessionStore::max_record_size)).
        store_limit: usize,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimeoutOutOfRange { setting, value } => write!(
                f,
                "{setting} of {value:?} is outside the supported range of {:?} to {:?}",
                crate::store::MIN_TTL,
                crate::store::MAX_TTL
            ),
            Self::TouchThresholdTooLong => {
                f.write_str("the touch threshold must not exceed the idle timeout")
            }
            Self::InvalidKeyPrefix => f.write_str(
                "the storage key prefix must be at most 200 bytes of printable ASCII without spaces",
            ),
            Self::InvalidCookieName => f.write_str("the cookie name is not a valid cookie token"),
            Self::InvalidCookieAttribute { attribute } => {
                write!(f, "the cookie {attribute} contains forbidden characters")
            }
            Self::ZeroMaxEncodedSize => f.write_str("the maximum encoded size must be above zero"),
            Self::CookieRule { rule } => write!(f, "cookie setting refused: {rule}"),
            Self::KeyTooLong { len, limit } => write!(
                f,
                "storage keys of {len} bytes exceed the store's key limit of {limit}: shorten the key prefix"
            ),
            Self::MaxEncodedSizeOverStoreLimit {
                max_encoded_size,
                store_limit,
            } => write!(
                f,
                "the maximum encoded size of {max_encoded_size} bytes exceeds the store's record limit of {store_limit}"
            ),
        }
    }
}

impl Error for ConfigError {}

/// What a [`SessionStore`](crate::SessionStore) operation can fail with.
///
/// The first variants are outcomes the contract defines (see the trait's documentation); the
/// last ones are faults of the backend.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// `create` found an entry under the key; nothing was changed.
    AlreadyExists,
    /// `save` found a different version than the one given; nothing was written.
    Conflict,
    /// `save` found no entry (deleted, expired or evicted); nothing was written.
    NotFound,
    /// The encoded record is over the store's limit; nothing was sent or written.
    TooLarge {
        /// The record's encoded size in bytes.
        size: usize,
        /// The store's limit in bytes.
        limit: usize,
    },
    /// The time to live is outside [`MIN_TTL`](crate::store::MIN_TTL) to
    /// [`MAX_TTL`](crate::store::MAX_TTL).
    InvalidTtl {
        /// The time to live given.
        ttl: Duration,
    },
    /// The store is at its configured bound and refuses new entries.
    Full,
    /// The record could not be encoded.
    Encode(EncodeError),
    /// The stored bytes are not a record this version can read.
    Decode(DecodeError),
    /// The backend did not answer within its configured timeout.
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The backend failed: connection refused or lost, protocol error, server error.
    Backend {
        /// The operation that failed.
        operation: &'static str,
        /// The client library's error.
        source: Box<dyn Error + Send + Sync>,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyExists => f.write_str("a session is already stored under this key"),
            Self::Conflict => f.write_str("the session was changed by another request"),
            Self::NotFound => f.write_str("the session no longer exists"),
            Self::TooLarge { size, limit } => {
                write!(
                    f,
                    "the session is {size} bytes encoded; the store's limit is {limit}"
                )
            }
            Self::InvalidTtl { ttl } => write!(
                f,
                "time to live {ttl:?} is outside {:?} to {:?}",
                crate::store::MIN_TTL,
                crate::store::MAX_TTL
            ),
            Self::Full => f.write_str("the session store is full"),
            Self::Encode(_) => f.write_str("the session could not be encoded"),
            Self::Decode(_) => f.write_str("the stored session could not be decoded"),
            Self::Timeout { operation, after } => {
                write!(f, "session store {operation} timed out after {after:?}")
            }
            Self::Backend { operation, .. } => write!(f, "session store {operation} failed"),
        }
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Encode(e) => Some(e),
            Self::Decode(e) => Some(e),
            Self::Backend { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<EncodeError> for StoreError {
    fn from(e: EncodeError) -> Self {
        Self::Encode(e)
    }
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

/// The error type of [`SessionManager`](crate::SessionManager) and [`Session`](crate::Session).
#[derive(Debug)]
#[non_exhaustive]
pub enum SessionError {
    /// The store failed.
    Store(StoreError),
    /// A value could not be encoded for the session.
    EncodeValue {
        /// The session key of the value.
        key: String,
        /// The codec's error.
        source: EncodeError,
    },
    /// A stored value could not be decoded as the requested type.
    DecodeValue {
        /// The session key of the value.
        key: String,
        /// The codec's error.
        source: DecodeError,
    },
    /// The session's encoded size is over the configured maximum; nothing was written.
    TooLarge {
        /// The session's encoded size in bytes.
        size: usize,
        /// The configured maximum in bytes.
        limit: usize,
    },
    /// Other requests kept changing the session; the retries ran out and nothing was written.
    ConflictRetriesExhausted {
        /// How many saves were tried.
        attempts: u32,
    },
    /// No unused session id could be drawn (the store kept reporting collisions).
    IdCollisions,
    /// The random number generator failed.
    Randomness(RandomnessError),
    /// The session was already committed for this request; later changes would be lost.
    AlreadyCommitted,
    /// A concurrent request changed the value this request set or removed, and the
    /// configuration says to fail rather than overwrite
    /// ([`SameKeyConflict::Fail`](crate::SameKeyConflict::Fail)); nothing was written.
    ConcurrentModification {
        /// The name of the value.
        name: String,
    },
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(_) => f.write_str("session store operation failed"),
            Self::EncodeValue { key, .. } => {
                write!(f, "session value {key:?} could not be encoded")
            }
            Self::DecodeValue { key, .. } => {
                write!(
                    f,
                    "session value {key:?} could not be decoded as the requested type"
                )
            }
            Self::TooLarge { size, limit } => {
                write!(
                    f,
                    "the session is {size} bytes encoded; the maximum is {limit}"
                )
            }
            Self::ConflictRetriesExhausted { attempts } => write!(
                f,
                "the session kept changing under concurrent requests; gave up after {attempts} saves"
            ),
            Self::IdCollisions => f.write_str("could not draw an unused session id"),
            Self::Randomness(_) => f.write_str("could not draw a session id"),
            Self::AlreadyCommitted => {
                f.write_str("the session was already committed for this request")
            }
            Self::ConcurrentModification { name } => write!(
                f,
                "session value {name:?} was changed by a concurrent request; nothing was written"
            ),
        }
    }
}

impl Error for SessionError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            Self::EncodeValue { source, .. } => Some(source),
            Self::DecodeValue { source, .. } => Some(source),
            Self::Randomness(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<RandomnessError> for SessionError {
    fn from(e: RandomnessError) -> Self {
        Self::Randomness(e)
    }
}
