//! The [`SessionStore`] trait: the one contract every backend honors.
//!
//! # The contract
//!
//! Stores keep entries under [`StorageKey`]s, each with a time to live (TTL) and an opaque
//! [`Version`]. An entry is either a session (an encoded [`Record`]) or a *moved marker*: what an
//! id cycle leaves under the old key, naming the key the session moved to. The shared
//! conformance suite (crate `session-conformance`) checks every rule below against every backend.
//!
//! - **create** `(key, record, ttl)` stores the record only if no live entry (session or
//!   marker) exists under `key`, and returns the new entry's version. If one exists it returns
//!   [`StoreError::AlreadyExists`] and changes nothing; the manager then draws a new id.
//! - **load_entry** `(key)` returns the live entry: a session with its record, version and the
//!   time it has left ([`StoredEntry::Session`]), or a marker with the key it points at
//!   ([`StoredEntry::Moved`]); `None` when there is no entry or it has expired. An expired entry
//!   is never returned. **load** `(key)` is the same for sessions only: a marker is `None`.
//! - **save** `(key, record, ttl, version)` writes only if the entry is a session whose version
//!   still equals `version`, and returns the new version; a different version, or a marker, is
//!   [`StoreError::Conflict`]. A vanished entry (deleted, expired, evicted) is
//!   [`StoreError::NotFound`] and nothing is written: a save never brings a deleted session
//!   back. Versions never repeat for a key, so a version taken before a delete or a move never
//!   matches a later entry.
//! - **mark_moved** `(key, version, to, ttl)` replaces the session under `key` with a moved
//!   marker pointing at `to`, under the same condition as `save` (same version, else
//!   `Conflict`; missing, `NotFound`). The marker lives for `ttl`. A marker's version is never
//!   handed out, so every conditional write against it is a `Conflict`.
//! - **touch** `(key, ttl)` sets a session's TTL to `ttl` from now without rewriting its value
//!   or changing its version, and returns whether a live session was there: `false` for a
//!   missing entry and for a marker, whose expiry stays as `mark_moved` set it.
//! - **delete** `(key)` removes the entry, session or marker; deleting a missing entry succeeds.
//! - **delete_if_version** `(key, version)` removes the session under `key` only if its version
//!   still equals `version`: a different version or a marker is `Conflict` (nothing removed),
//!   a missing entry `NotFound`.
//! - **TTL**: every TTL from [`MIN_TTL`] (one second) to [`MAX_TTL`] (400 days) works on every
//!   backend; one outside that range is [`StoreError::InvalidTtl`] and nothing is written.
//!   An entry never expires before its TTL has passed. Backends with whole-second expiry
//!   round up, so an entry may outlive its TTL by up to two seconds (and report up to two
//!   seconds more in `expires_in`). Create, save, mark_moved and touch all set the TTL.
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
//! # Why markers and conditional deletes
//!
//! They let the [`SessionManager`](crate::SessionManager) end an old entry so that no
//! concurrent request slips past. An id cycle creates the new entry, then marks the old one
//! moved against the version it last read: a concurrent save to the old key lands either
//! before the mark (the mark conflicts, and the cycle re-reads and carries that change to the
//! new entry) or after it (the save conflicts, reloads, finds the marker and follows it to the
//! new entry). Of two concurrent cycles only one mark succeeds; the other removes its own new
//! entry. A destroy deletes with `delete_if_version` and, finding a marker, follows it, so a
//! logout racing a login ends the session wherever it went. A request that *arrives* with the
//! old id after the move finds a marker, which loads as no session: the old id is dead.
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
//! use session_core::codec::{encode_moved, encode_record_within, is_moved_marker};
//! use session_core::store::check_ttl;
//! use session_core::{Record, SessionStore, StorageKey, StoreError, StoredEntry, Version};
//!
//! /// An entry: its bytes (a record or a moved marker), its version and its expiry.
//! type Entry = (Vec<u8>, u64, Instant);
//!
//! #[derive(Default)]
//! struct MapStore {
//!     // The last version handed out (versions never repeat), and the entries.
//!     entries: Mutex<(u64, HashMap<StorageKey, Entry>)>,
//! }
//!
//! impl MapStore {
//!     /// Replaces the live session under `key` if its version is `version`.
//!     fn replace(&self, key: &StorageKey, version: Version, bytes: Vec<u8>, ttl: Duration)
//!         -> Result<Version, StoreError> {
//!         check_ttl(ttl)?;
//!         let mut guard = self.entries.lock().unwrap();
//!         let (counter, map) = &mut *guard;
//!         let now = Instant::now();
//!         match map.get_mut(key) {
//!             Some(entry) if entry.2 > now => {
//!                 if entry.1 != version.get() || is_moved_marker(&entry.0) {
//!                     return Err(StoreError::Conflict);
//!                 }
//!                 *counter += 1;
//!                 *entry = (bytes, *counter, now + ttl);
//!                 Ok(Version::new(*counter))
//!             }
//!             _ => Err(StoreError::NotFound),
//!         }
//!     }
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
//!     async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
//!         let guard = self.entries.lock().unwrap();
//!         let now = Instant::now();
//!         match guard.1.get(key) {
//!             Some((bytes, version, expiry)) if *expiry > now => Ok(Some(StoredEntry::decode(
//!                 bytes,
//!                 64 * 1024,
//!                 Version::new(*version),
//!                 Some(*expiry - now),
//!             )?)),
//!             _ => Ok(None),
//!         }
//!     }
//!
//!     async fn save(&self, key: &StorageKey, record: &Record, ttl: Duration, version: Version)
//!         -> Result<Version, StoreError> {
//!         let bytes = encode_record_within(record, self.max_record_size())?;
//!         self.replace(key, version, bytes, ttl)
//!     }
//!
//!     async fn mark_moved(&self, key: &StorageKey, version: Version, to: &StorageKey,
//!         ttl: Duration) -> Result<(), StoreError> {
//!         self.replace(key, version, encode_moved(to), ttl).map(drop)
//!     }
//!
//!     async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
//!         check_ttl(ttl)?;
//!         let mut guard = self.entries.lock().unwrap();
//!         let now = Instant::now();
//!         match guard.1.get_mut(key) {
//!             Some(entry) if entry.2 > now && !is_moved_marker(&entry.0) => {
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
//!     async fn delete_if_version(&self, key: &StorageKey, version: Version)
//!         -> Result<(), StoreError> {
//!         let mut guard = self.entries.lock().unwrap();
//!         let now = Instant::now();
//!         match guard.1.get(key) {
//!             Some((bytes, current, expiry)) if *expiry > now => {
//!                 if *current != version.get() || is_moved_marker(bytes) {
//!                     return Err(StoreError::Conflict);
//!                 }
//!                 guard.1.remove(key);
//!                 Ok(())
//!             }
//!             _ => Err(StoreError::NotFound),
//!         }
//!     }
//!
//!     fn max_record_size(&self) -> usize {
//!         64 * 1024
//!     }
//!
//!     fn max_key_len(&self) -> Option<usize> {
//!         None
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
//! let new_key = || StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
//! let (old, new) = (new_key(), new_key());
//! let ttl = Duration::from_secs(60);
//! let version = store.create(&old, &Record::new(SystemTime::now()), ttl).await.unwrap();
//! let loaded = store.load(&old).await.unwrap().unwrap();
//! assert_eq!(loaded.version, version);
//! store.mark_moved(&old, version, &new, ttl).await.unwrap();
//! assert!(store.load(&old).await.unwrap().is_none());
//! assert_eq!(store.load_entry(&old).await.unwrap(), Some(StoredEntry::Moved { to: new }));
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::codec::{DecodedEntry, decode_entry_within};
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

/// A live session as [`SessionStore::load`] returns it.
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

/// A live entry as [`SessionStore::load_entry`] returns it: a session, or the marker an id
/// cycle left under the old key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredEntry {
    /// A session.
    Session(LoadedRecord),
    /// A moved marker: the session now lives under `to`.
    Moved {
        /// The key the session moved to.
        to: StorageKey,
    },
}

impl StoredEntry {
    /// Builds the entry from stored bytes (a record or a moved marker, see the
    /// [codec](crate::codec)) with the version and time left the backend reports; for stores.
    /// Bytes longer than `max_record_size` (the store's own limit: something else wrote them)
    /// are refused without decoding.
    pub fn decode(
        bytes: &[u8],
        max_record_size: usize,
        version: Version,
        expires_in: Option<Duration>,
    ) -> Result<Self, StoreError> {
        Ok(match decode_entry_within(bytes, max_record_size)? {
            DecodedEntry::Record(record) => Self::Session(LoadedRecord {
                record,
                version,
                expires_in,
            }),
            DecodedEntry::Moved(to) => Self::Moved { to },
        })
    }

    /// The session, if this entry is one.
    pub fn into_session(self) -> Option<LoadedRecord> {
        match self {
            Self::Session(loaded) => Some(loaded),
            Self::Moved { .. } => None,
        }
    }
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

    /// Loads the live entry under `key` (a session or a moved marker), or `None`.
    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError>;

    /// Loads the live session under `key`, or `None` (also for a moved marker).
    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        Ok(self
            .load_entry(key)
            .await?
            .and_then(StoredEntry::into_session))
    }

    /// Replaces the session under `key` if its version is still `version`; returns the new one.
    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError>;

    /// Replaces the session under `key`, if its version is still `version`, with a marker
    /// saying it moved to `to`; the marker lives for `ttl`.
    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Sets the session's time to live to `ttl` from now; returns whether a live session was
    /// there (`false` for a moved marker).
    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError>;

    /// Removes the entry under `key`, if any.
    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError>;

    /// Removes the session under `key` only if its version is still `version`.
    async fn delete_if_version(&self, key: &StorageKey, version: Version)
    -> Result<(), StoreError>;

    /// The largest encoded record this store accepts, in bytes. The manager refuses a
    /// [`max_encoded_size`](crate::SessionConfig::max_encoded_size) above it, and entries longer
    /// than it are not decoded.
    fn max_record_size(&self) -> usize;

    /// The longest [`StorageKey`] this store can hold, in bytes, after anything the store adds
    /// to it (its own prefix); `None` when keys of any length the manager makes fit. The
    /// manager refuses a key prefix that would make keys longer. (No default: a wrapper around
    /// another store must pass its limit on.)
    fn max_key_len(&self) -> Option<usize>;

    /// A short name of the backend, for the `backend` label of the manager's metrics and
    /// spans (see [`observe`](crate::observe)): `memory`, `memcached`, `redis`. The default is
    /// `custom`; a wrapper around another store passes its name on.
    fn backend_name(&self) -> &'static str {
        "custom"
    }
}

macro_rules! forward_store {
    ($($wrapper:ident),+) => {$(
        #[async_trait]
        impl<S: SessionStore + ?Sized> SessionStore for $wrapper<S> {
            async fn create(&self, key: &StorageKey, record: &Record, ttl: Duration)
                -> Result<Version, StoreError> {
                (**self).create(key, record, ttl).await
            }
            async fn load_entry(&self, key: &StorageKey)
                -> Result<Option<StoredEntry>, StoreError> {
                (**self).load_entry(key).await
            }
            async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
                (**self).load(key).await
            }
            async fn save(&self, key: &StorageKey, record: &Record, ttl: Duration, version: Version)
                -> Result<Version, StoreError> {
                (**self).save(key, record, ttl, version).await
            }
            async fn mark_moved(&self, key: &StorageKey, version: Version, to: &StorageKey,
                ttl: Duration) -> Result<(), StoreError> {
                (**self).mark_moved(key, version, to, ttl).await
            }
            async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
                (**self).touch(key, ttl).await
            }
            async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
                (**self).delete(key).await
            }
            async fn delete_if_version(&self, key: &StorageKey, version: Version)
                -> Result<(), StoreError> {
                (**self).delete_if_version(key, version).await
            }
            fn max_record_size(&self) -> usize {
                (**self).max_record_size()
            }
            fn max_key_len(&self) -> Option<usize> {
                (**self).max_key_len()
            }
            fn backend_name(&self) -> &'static str {
                (**self).backend_name()
            }
        }
    )+};
}

forward_store!(Arc, Box);
