//! [`Session`]: the request-scoped handle to one session's values.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::error::SessionError;
use crate::id::{SessionId, StorageKey};
use crate::record::Record;
use crate::store::Version;

/// Where a session came from.
#[derive(Debug)]
pub(crate) enum Origin {
    /// No stored session (no cookie, an invalid one, or one whose session has ended).
    Fresh,
    /// Loaded from the store.
    Stored(StoredSession),
}

/// The identity and version of a loaded session.
#[derive(Debug)]
pub(crate) struct StoredSession {
    pub(crate) id: SessionId,
    pub(crate) key: StorageKey,
    pub(crate) version: Version,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) needs_resign: bool,
}

/// One pending change to a value: `Some(bytes)` set, `None` removed.
type Change = Option<Vec<u8>>;

/// A session during one request: typed values, with every change recorded per key so that the
/// commit can replay this request's own changes onto a newer version written concurrently.
///
/// Get one from [`SessionManager::load`](crate::SessionManager::load) and hand it back to
/// [`SessionManager::commit`](crate::SessionManager::commit) when the request is done.
#[derive(Debug)]
pub struct Session {
    pub(crate) origin: Origin,
    pub(crate) record: Record,
    changes: BTreeMap<String, Change>,
    cleared: bool,
    pub(crate) cycle_requested: bool,
    pub(crate) destroyed: bool,
}

impl Session {
    pub(crate) fn new(origin: Origin, record: Record) -> Self {
        Self {
            origin,
            record,
            changes: BTreeMap::new(),
            cleared: false,
            cycle_requested: false,
            destroyed: false,
        }
    }

    /// Whether no stored session stands behind this one (it will be created on commit if it
    /// gets any value).
    pub fn is_new(&self) -> bool {
        matches!(self.origin, Origin::Fresh)
    }

    /// The value named `name` decoded as `T`, or `None` when there is none.
    ///
    /// A stored value that does not decode as `T` is [`SessionError::DecodeValue`].
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SessionError> {
        self.record
            .value(name)
            .map(|bytes| {
                codec::decode_value(bytes).map_err(|source| SessionError::DecodeValue {
                    key: name.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Sets the value named `name`. Setting the value it already has changes nothing.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        let bytes = codec::encode_value(value).map_err(|source| SessionError::EncodeValue {
            key: name.to_owned(),
            source,
        })?;
        if self.record.value(name) == Some(bytes.as_slice()) {
            return Ok(());
        }
        self.record.set_value(name, bytes.clone());
        self.changes.insert(name.to_owned(), Some(bytes));
        Ok(())
    }

    /// Removes the value named `name`; returns whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.record.remove_value(name).is_none() {
            return false;
        }
        self.changes.insert(name.to_owned(), None);
        true
    }

    /// Removes every value; the session itself stays (use [`destroy`](Self::destroy) to end it).
    pub fn clear(&mut self) {
        if self.record.is_empty() && self.changes.is_empty() {
            return;
        }
        self.record.clear_values();
        self.changes.clear();
        self.cleared = true;
    }

    /// Whether a value named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.record.value(name).is_some()
    }

    /// The names of the session's values.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.record.names()
    }

    /// Whether the session holds no value.
    pub fn is_empty(&self) -> bool {
        self.record.is_empty()
    }

    /// When the session was created.
    pub fn created_at(&self) -> SystemTime {
        self.record.created_at()
    }

    /// Gives the session a new id on commit, keeping its values; the old id stops working.
    /// Call it after login and after any change of privilege.
    pub fn cycle_id(&mut self) {
        self.cycle_requested = true;
    }

    /// Ends the session: on commit it is deleted and the cookie cleared. Values inserted after
    /// this start a new session under a new id.
    pub fn destroy(&mut self) {
        self.destroyed = true;
        self.cycle_requested = false;
        self.record.clear_values();
        self.changes.clear();
        self.cleared = false;
    }

    /// Whether this request changed any value.
    pub fn is_modified(&self) -> bool {
        self.cleared || !self.changes.is_empty()
    }

    /// Applies this request's changes, in the order of their effect, onto `target`.
    pub(crate) fn replay_onto(&self, target: &mut Record) {
        if self.cleared {
            target.clear_values();
        }
        for (name, change) in &self.changes {
            match change {
                Some(bytes) => {
                    target.set_value(name.clone(), bytes.clone());
                }
                None => {
                    target.remove_value(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Session {
        Session::new(Origin::Fresh, Record::new(SystemTime::now()))
    }

    #[test]
    fn typed_values_round_trip_and_track_changes() {
        let mut s = fresh();
        assert!(!s.is_modified());
        s.insert("n", &5u32).unwrap();
        assert_eq!(s.get::<u32>("n").unwrap(), Some(5));
        assert!(s.get::<String>("n").is_err());
        assert_eq!(s.get::<u32>("missing").unwrap(), None);
        assert!(s.is_modified());
        assert!(s.remove("n"));
        assert!(!s.remove("n"));
        assert!(!s.contains("n"));
    }

    #[test]
    fn replay_applies_only_this_requests_changes() {
        let mut s = fresh();
        s.record
            .set_value("kept", codec::encode_value(&1u8).unwrap());
        s.record
            .set_value("gone", codec::encode_value(&1u8).unwrap());
        s.insert("mine", &"x").unwrap();
        s.remove("gone");
        let mut newer = Record::new(SystemTime::now());
        newer.set_value("theirs", codec::encode_value(&2u8).unwrap());
        newer.set_value("gone", codec::encode_value(&1u8).unwrap());
        s.replay_onto(&mut newer);
        let names: Vec<&str> = newer.names().collect();
        assert_eq!(names, ["mine", "theirs"]);
    }

    #[test]
    fn clear_then_insert_replays_as_clear_then_insert() {
        let mut s = fresh();
        s.record.set_value("a", vec![1]);
        s.clear();
        s.insert("b", &1u8).unwrap();
        let mut newer = Record::new(SystemTime::now());
        newer.set_value("c", vec![1]);
        s.replay_onto(&mut newer);
        assert_eq!(newer.names().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn inserting_the_same_value_is_not_a_change() {
        let mut s = fresh();
        s.record.set_value("a", codec::encode_value(&1u8).unwrap());
        s.insert("a", &1u8).unwrap();
        assert!(!s.is_modified());
    }
}
