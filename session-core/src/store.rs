//! The [`SessionStore`] trait: the one contract every backend honors.
//!
//! # The contract
//!
//! Stores keep encoded [`Record`]s under [`StorageKey`]s, each entry with a time to live (TTL)
//! and an opaque [`Version`]. The shared conformance suite (crate `session-conformance`) checks
//! every rule below against every backend.
//!
//! - **create** `(key, record, ttl)` stores the record only if no live entry exists under `key`,
//!   and returns the new entry's version. If one exists it returns
//!   [`StoreError::AlreadyExists`] and changes nothing; the manager then draws a new id.
//! - **load** `(key)` returns the record, its version and the time it has left, or `None` when
//!   there is no entry or it has expired. An expired record is never returned.
//! - **save** `(key, record, ttl, version)` writes only if the entry's version still equals
//!   `version`, and returns the new version; a different version is [`StoreError::Conflict`].
//!   A vanished entry (deleted, expired, evicted) is [`StoreError::NotFound`] and nothing is
//!   written: a save never brings a deleted session back. Versions never repeat for a key, so a
//!   version taken before a delete never matches an entry created after it.
//! - **touch** `(key, ttl)` sets the entry's TTL to `ttl` from now without rewriting its value
//!   or changing its version, and returns whether the entry existed.
//! - **delete** `(key)` removes the entry; deleting a missing entry succeeds.
//! - **TTL**: every TTL from [`MIN_TTL`] (one second) to [`MAX_TTL`] (400 days) works on every
//!   backend; one outside that range is [`StoreError::InvalidTtl`] and nothing is written.
//!   An entry never expires before its TTL has passed. Backends with whole-second expiry
//!   round up, so an entry may outlive its TTL by up to two seconds (and report up to two
//!   seconds more in `expires_in`). Create, save and touch all set the TTL.
//! - **Size**: a record whose encoding is over [`SessionStore::max_record_size`] is
//!   [`StoreError::TooLarge`], detected before anything is sent, and nothing is written.
//! - **Values** are arbitrary bytes; stores must be binary safe.
//! - **Faults**: an unreachable, dead or hung server gives [`StoreError::Timeout`] or
//!   [`StoreError::Backend`] within the store's configured timeout, never a panic or a hang,
//!   and the same store object works again once the server is back. Bytes that do not decode
//!   are [`StoreError::Decode`].
//! - Stores are shared by many tasks at once (`Send + Sync`) and must be object safe, so an
//!   application can hold any of them as `Arc<dyn SessionStore>`.
//!
//! # A complete store
//!
//! A minimal, unbounded store that honors the contract (the `session-memory` crate has the
//! production one):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::{Duration, Instant};
//!
//! use async_trait::async_trait;
//! use session_core::codec::{decode_record, encode_record_within};
//! use session_core::store::check_ttl;
//! use session_core::{LoadedRecord, Record, SessionStore, StorageKey, StoreError, Version};
//!
//! #[derive(Default)]
//! struct MapStore {
//!     // key -> (encoded record, version, expiry); versions come from one counter.
//!     entries: Mutex<(u64, HashMap<StorageKey, (Vec<u8>, u64, Instant)>)>,
//! }
//!
//! #[async_trait]
//! impl SessionStore for MapStore {
//!     async fn create(&self, key: &StorageKey, record: &Record, ttl: Duration)
//!         -> Result<Version, StoreError> {
//!         check_ttl(ttl)?;
//!         let bytes = encode_record_within(record, self.max_record_size())?;
//!         let mut guard = self.entries.lock().unwrap();
//!         let (counter, map) = &mut *guard;
//!         let now = Instant::now();
//!         if map.get(key).is_some_and(|(_, _, expiry)| *expiry > now) {
//!             return Err(StoreError::AlreadyExists);
//!         }
//!         *counter += 1;
//!         map.insert(key.clone(), (bytes, *counter, now + ttl));
//!         Ok(Version::new(*counter))
//!     }
//!
//!     async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
//!         let guard = self.entries.lock().unwrap();
//!         let now = Instant::now();
//!         match guard.1.get(key) {
//!             Some((bytes, version, expiry)) if *expiry > now => Ok(Some(LoadedRecord {
//!                 record: decode_record(bytes)?,
//!                 version: Version::new(*version),
//!                 expires_in: Some(*expiry - now),
//!             })),
//!             _ => Ok(None),
//!         }
//!     }
//!
//!     async fn save(&self, key: &StorageKey, record: &Record, ttl: Duration, version: Version)
//!         -> Result<Version, StoreError> {
//!         check_ttl(ttl)?;
//!         let bytes = encode_record_within(record, self.max_record_size())?;
//!         let mut guard = self.entries.lock().unwrap();
//!         let (counter, map) = &mut *guard;
//!         let now = Instant::now();
//!         match map.get_mut(key) {
//!             Some(entry) if entry.2 > now => {
//!                 if entry.1 != version.get() {
//!                     return Err(StoreError::Conflict);
//!                 }
//!                 *counter += 1;
//!                 *entry = (bytes, *counter, now + ttl);
//!                 Ok(Version::new(*counter))
//!             }
//!             _ => Err(StoreError::NotFound),
//!         }
//!     }
//!
//!     async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
//!         check_ttl(ttl)?;
//!         let mut guard = self.entries.lock().unwrap();
//!         let now = Instant::now();
//!         match guard.1.get_mut(key) {
//!             Some(entry) if entry.2 > now => {
//!                 entry.2 = now + ttl;
//!                 Ok(true)
//!             }
//!             _ => Ok(false),
//!         }
//!     }
//!
//!     async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
//!         self.entries.lock().unwrap().1.remove(key);
//!         Ok(())
//!     }
//!
//!     fn max_record_size(&self) -> usize {
//!         64 * 1024
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use session_core::{KeyPrefix, SessionId};
//!
//! let store: Arc<dyn SessionStore> = Arc::new(MapStore::default());
//! let key = StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
//! let ttl = Duration::from_secs(60);
//! let version = store.create(&key, &Record::new(SystemTime::now()), ttl).await.unwrap();
//! let loaded = store.load(&key).await.unwrap().unwrap();
//! assert_eq!(loaded.version, version);
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::id::StorageKey;
use crate::record::Record;

/// The shortest time to live a store must support.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// The longest time to live a store must support: 400 days.
pub const MAX_TTL: Duration = Duration::from_secs(400 * 24 * 60 * 60);

/// Checks that `ttl` is within [`MIN_TTL`] and [`MAX_TTL`]; for stores to call first.
pub fn check_ttl(ttl: Duration) -> Result<(), StoreError> {
    if (MIN_TTL..=MAX_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(StoreError::InvalidTtl { ttl })
    }
}

/// An opaque token naming one written state of an entry (memcached's CAS value, for example).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Version(u64);

impl Version {
    /// Wraps a backend's version number.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The backend's version number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// What [`SessionStore::load`] returns for a live entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedRecord {
    /// The decoded record.
    pub record: Record,
    /// The version to pass to [`SessionStore::save`].
    pub version: Version,
    /// How long the entry has left before it expires, as far as the backend can tell
    /// (`None` when it cannot). The manager uses it to decide when to touch.
    pub expires_in: Option<Duration>,
}

/// Where sessions live. See the [module documentation](self) for the contract every
/// implementation honors.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores `record` under `key` for `ttl` unless an entry exists; returns its version.
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError>;

    /// Loads the live entry under `key`, or `None`.
    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError>;

    /// Replaces the entry under `key` if its version is still `version`; returns the new one.
    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError>;

    /// Sets the entry's time to live to `ttl` from now; returns whether it existed.
    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError>;

    /// Removes the entry under `key`, if any.
    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError>;

    /// The largest encoded record this store accepts, in bytes.
    fn max_record_size(&self) -> usize;
}

macro_rules! forward_store {
    ($($wrapper:ident),+) => {$(
        #[async_trait]
        impl<S: SessionStore + ?Sized> SessionStore for $wrapper<S> {
            async fn create(&self, key: &StorageKey, record: &Record, ttl: Duration)
                -> Result<Version, StoreError> {
                (**self).create(key, record, ttl).await
            }
            async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
                (**self).load(key).await
            }
            async fn save(&self, key: &StorageKey, record: &Record, ttl: Duration, version: Version)
                -> Result<Version, StoreError> {
                (**self).save(key, record, ttl, version).await
            }
            async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
                (**self).touch(key, ttl).await
            }
            async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
                (**self).delete(key).await
            }
            fn max_record_size(&self) -> usize {
                (**self).max_record_size()
            }
        }
    )+};
}

forward_store!(Arc, Box);
