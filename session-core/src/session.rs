//! [`Session`]: the request-scoped handle to one session's values.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::config::SameKeyConflict;
use crate::csrf;
use crate::error::SessionError;
use crate::id::{SessionId, StorageKey};
use crate::record::Record;
use crate::store::Version;

/// Where a session came from.
#[derive(Debug)]
pub(crate) enum Origin {
    /// No stored session (no cookie, an invalid one, or one whose session has ended).
    Fresh,
    /// The cookie named a session that had moved to a new id (a concurrent login) before this
    /// request loaded it. The request sees no session; whatever it changes is reported lost
    /// instead of written, so that its response cannot replace the new cookie, and its
    /// destroy only clears the cookie: the revoked id has no power over the moved session.
    Moved,
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
    pub(crate) loaded_at: Instant,
    pub(crate) needs_resign: bool,
}

/// An update closure, type-erased to work on encoded values: the value it saw (if any) in, the
/// new value out.
type UpdateFn = Box<dyn FnMut(Option<&[u8]>) -> Result<Vec<u8>, SessionError> + Send>;

/// An update closure held so that [`Session`] stays `Sync` without asking closures to be: it
/// is only ever called through `&mut`, so the lock is never contended (nor even taken).
struct HeldUpdate(Mutex<UpdateFn>);

impl HeldUpdate {
    fn call(&mut self, old: Option<&[u8]>) -> Result<Vec<u8>, SessionError> {
        let update = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        update(old)
    }
}

/// What this request did to one value.
struct KeyChange {
    /// The value as this request first saw it, before its first change (`None`: absent).
    seen: Option<Vec<u8>>,
    /// The last `insert` (`Some(Some(bytes))`) or `remove` (`Some(None)`), if any.
    assigned: Option<Option<Vec<u8>>>,
    /// `update` closures applied after the assignment, or to the stored value when nothing
    /// was assigned, in order.
    updates: Vec<HeldUpdate>,
    /// Only an `insert` of the value the session already held: it writes nothing by itself,
    /// but if the request writes anyway, it is replayed like any other insert.
    passive: bool,
}

/// A session during one request: typed values, with every change recorded per value so that
/// the commit can replay this request's own changes onto a newer version written
/// concurrently.
///
/// Get one from [`SessionManager::load`](crate::SessionManager::load) and hand it back to
/// [`SessionManager::commit`](crate::SessionManager::commit) when the request is done.
///
/// # Concurrent requests
///
/// When another request saved the session after this one loaded it, the commit replays this
/// request's changes onto the newer values, value by value:
///
/// - a value changed with [`update`](Self::update) is computed again by its closure from the
///   newer value, so read-modify-write (counters, carts, lists) never loses a change;
/// - a value set with [`insert`](Self::insert) or removed with [`remove`](Self::remove) or
///   [`clear`](Self::clear) that the other request did not change is set or removed;
/// - one that the other request also changed is a *same-key conflict*: by default this
///   request's value wins ([`SameKeyConflict::LastWriterWins`]); configured with
///   [`SameKeyConflict::Fail`], the commit fails with
///   [`SessionError::ConcurrentModification`] and writes nothing;
/// - values only the other request changed are kept.
///
/// `Debug` shows value names and sizes, never value bytes.
pub struct Session {
    pub(crate) origin: Origin,
    pub(crate) record: Record,
    changes: BTreeMap<String, KeyChange>,
    cleared: bool,
    pub(crate) cycle_requested: bool,
    pub(crate) destroyed: bool,
    /// Whether the request came with a cookie this manager signed (the session may still be
    /// fresh: expired or unknown). Only then does a `destroy` send a removal cookie.
    pub(crate) had_valid_cookie: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = match self.origin {
            Origin::Fresh => "fresh",
            Origin::Moved => "moved",
            Origin::Stored(_) => "stored",
        };
        f.debug_struct("Session")
            .field("origin", &origin)
            .field("values", &self.record)
            .field("changed", &self.changes.keys().collect::<Vec<_>>())
            .field("cleared", &self.cleared)
            .field("cycle_requested", &self.cycle_requested)
            .field("destroyed", &self.destroyed)
            .finish()
    }
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
            had_valid_cookie: false,
        }
    }

    /// Whether no stored session stands behind this one (it will be created on commit if it
    /// gets any value, unless the cookie named a session that moved to a new id meanwhile).
    pub fn is_new(&self) -> bool {
        !matches!(self.origin, Origin::Stored(_))
    }

    /// The value named `name` decoded as `T`, or `None` when there is none.
    ///
    /// A stored value that does not decode as `T` is [`SessionError::DecodeValue`].
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SessionError> {
        self.record
            .value(name)
            .map(|bytes| decode_named(name, bytes))
            .transpose()
    }

    /// Sets the value named `name`. Setting the value it already has changes nothing.
    ///
    /// If a concurrent request changes the same value, the configured [`SameKeyConflict`]
    /// policy decides; use [`update`](Self::update) for values computed from their old value.
    pub fn insert<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        let bytes = encode_named(name, value)?;
        let unchanged = self.record.value(name) == Some(bytes.as_slice());
        let fresh = !self.changes.contains_key(name);
        let change = self.change_of(name);
        change.passive = unchanged && (fresh || change.passive);
        change.assigned = Some(Some(bytes.clone()));
        change.updates.clear();
        if !unchanged {
            self.record.set_value(name, bytes);
        }
        Ok(())
    }

    /// Sets the value named `name` to what `f` computes from its current value (`None` when
    /// there is none), and returns the new value.
    ///
    /// If a concurrent request saved the session in the meantime, the commit runs `f` again on
    /// the newer value, as many times as it has to, so no change of either request is lost:
    /// `update("visits", |n: Option<u32>| n.unwrap_or(0) + 1)` counts every visit. `f` should
    /// therefore compute from its argument alone. The value returned here is what this request
    /// computed; the stored one can be newer. An update that leaves an unchanged value as it is
    /// changes nothing.
    pub fn update<T, F>(&mut self, name: &str, f: F) -> Result<T, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T + Send + 'static,
    {
        let mut update = HeldUpdate(Mutex::new(erase_update(name, f)));
        let bytes = update.call(self.record.value(name))?;
        let value = decode_named(name, &bytes)?;
        // A no-op on a value this request has not changed can be dropped (the request then
        // reads as if it ran before any concurrent one); after a change it must be re-run.
        let changed_before = self.changes.get(name).is_some_and(|c| !c.passive);
        if self.record.value(name) == Some(bytes.as_slice()) && !changed_before {
            return Ok(value);
        }
        let change = self.change_of(name);
        if change.passive {
            // The insert before it changed nothing: the update works on the stored value.
            change.assigned = None;
            change.passive = false;
        }
        change.updates.push(update);
        self.record.set_value(name, bytes);
        Ok(value)
    }

    /// Removes the value named `name`; returns whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        if self.record.value(name).is_none() {
            return false;
        }
        let change = self.change_of(name);
        change.assigned = Some(None);
        change.updates.clear();
        change.passive = false;
        self.record.remove_value(name);
        true
    }

    /// Removes every value; the session itself stays (use [`destroy`](Self::destroy) to end it).
    /// Values a concurrent request added are removed too.
    pub fn clear(&mut self) {
        if self.record.is_empty() && self.changes.is_empty() {
            return;
        }
        let names: Vec<String> = self.record.names().map(str::to_owned).collect();
        for name in &names {
            self.change_of(name);
        }
        for change in self.changes.values_mut() {
            change.assigned = Some(None);
            change.updates.clear();
            change.passive = false;
        }
        self.record.clear_values();
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
    ///
    /// It also gives a session that has a CSRF token ([`csrf`](crate::csrf)) a new one, so
    /// forms rendered before a login stop being accepted after it, and pages rendered right
    /// after it do not race to make one.
    pub fn cycle_id(&mut self) {
        self.cycle_requested = true;
        if self.record.value(csrf::TOKEN_VALUE_NAME).is_none() {
            return;
        }
        // An update, not an insert: replayed onto a newer version it sets the new token
        // again instead of meeting a concurrent token change as a conflict.
        let rotated = csrf::new_token()
            .map(|fresh| self.update(csrf::TOKEN_VALUE_NAME, move |_: Option<csrf::Token>| fresh));
        if !matches!(rotated, Ok(Ok(_))) {
            // No randomness: drop the old token instead; the next page makes one.
            self.remove(csrf::TOKEN_VALUE_NAME);
        }
    }

    /// The session's CSRF token, masked afresh for this response (see [`csrf`](crate::csrf)),
    /// for a hidden form field or a header. The first call on a session without a token makes
    /// one, which is a change: an anonymous session is then created. Two requests that make
    /// the first token at once do not fail: the token stored first is kept (the other page's
    /// forms are refused until it is reloaded); only a request that also cleared the session
    /// meets the other's token as a same-key conflict, as it would any value.
    pub fn csrf_token(&mut self) -> Result<String, SessionError> {
        let token = match self.get::<csrf::Token>(csrf::TOKEN_VALUE_NAME) {
            Ok(Some(token)) => token,
            Ok(None) => {
                let made = csrf::new_token().map_err(SessionError::Randomness)?;
                // An update keeps a token a concurrent request stored first.
                self.update(
                    csrf::TOKEN_VALUE_NAME,
                    move |stored: Option<csrf::Token>| stored.unwrap_or(made),
                )?
            }
            // A value under the reserved name that is not a token is replaced.
            Err(SessionError::DecodeValue { .. }) => {
                let made = csrf::new_token().map_err(SessionError::Randomness)?;
                self.insert(csrf::TOKEN_VALUE_NAME, &made)?;
                made
            }
            Err(other) => return Err(other),
        };
        csrf::mask(&token).map_err(SessionError::Randomness)
    }

    /// Whether `submitted` is a masked form of this session's CSRF token; `false` when the
    /// session has none (a request that never saw a page of this session).
    pub fn verify_csrf_token(&self, submitted: &str) -> bool {
        matches!(
            self.get::<csrf::Token>(csrf::TOKEN_VALUE_NAME),
            Ok(Some(token)) if csrf::matches(&token, submitted)
        )
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

    /// Whether [`destroy`](Self::destroy) was called.
    pub fn is_destroyed(&self) -> bool {
        self.destroyed
    }

    /// Whether this request changed any value.
    pub fn is_modified(&self) -> bool {
        self.cleared || self.changes.values().any(|change| !change.passive)
    }

    /// The change record of `name`, made on first use with the value as it is now. After
    /// [`clear`](Self::clear), a value not seen before starts out removed by the clear, so
    /// that an update of it starts from nothing on replay too.
    fn change_of(&mut self, name: &str) -> &mut KeyChange {
        let (record, cleared) = (&self.record, self.cleared);
        self.changes
            .entry(name.to_owned())
            .or_insert_with(|| KeyChange {
                seen: record.value(name).map(<[u8]>::to_vec),
                assigned: cleared.then_some(None),
                updates: Vec::new(),
                passive: false,
            })
    }

    /// Applies this request's changes onto `target`, a newer version of the session: updates
    /// run again on the newer values, and an assigned value that the newer version changed too
    /// is handled by `policy`. On an error `target` is left half-changed; discard it.
    pub(crate) fn replay_onto(
        &mut self,
        target: &mut Record,
        policy: SameKeyConflict,
    ) -> Result<(), SessionError> {
        let fail = policy == SameKeyConflict::Fail;
        if self.cleared {
            let added: Vec<String> = target
                .names()
                .filter(|name| !self.changes.contains_key(*name))
                .map(str::to_owned)
                .collect();
            if let Some(name) = added.first().filter(|_| fail) {
                return Err(SessionError::ConcurrentModification { name: name.clone() });
            }
            for name in &added {
                target.remove_value(name);
            }
        }
        for (name, change) in &mut self.changes {
            let theirs = target.value(name).map(<[u8]>::to_vec);
            let mut value = match &change.assigned {
                Some(assigned) => assigned.clone(),
                None => theirs.clone(),
            };
            for update in &mut change.updates {
                value = Some(update.call(value.as_deref())?);
            }
            let same_key_conflict =
                change.assigned.is_some() && theirs != change.seen && theirs != value;
            if same_key_conflict {
                if fail {
                    return Err(SessionError::ConcurrentModification { name: name.clone() });
                }
                tracing::debug!(name = %name, "same-key conflict; this request's value wins");
            }
            match value {
                Some(bytes) => {
                    target.set_value(name.clone(), bytes);
                }
                None => {
                    target.remove_value(name);
                }
            }
        }
        Ok(())
    }
}

fn encode_named<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<Vec<u8>, SessionError> {
    codec::encode_value(value).map_err(|source| SessionError::EncodeValue {
        key: name.to_owned(),
        source,
    })
}

fn decode_named<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, SessionError> {
    codec::decode_value(bytes).map_err(|source| SessionError::DecodeValue {
        key: name.to_owned(),
        source,
    })
}

/// Wraps a typed update closure as one on encoded values.
fn erase_update<T, F>(name: &str, mut f: F) -> UpdateFn
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> T + Send + 'static,
{
    let name = name.to_owned();
    Box::new(move |old: Option<&[u8]>| {
        let old = old.map(|bytes| decode_named(&name, bytes)).transpose()?;
        encode_named(&name, &f(old))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LWW: SameKeyConflict = SameKeyConflict::LastWriterWins;
    const FAIL: SameKeyConflict = SameKeyConflict::Fail;

    fn fresh() -> Session {
        Session::new(Origin::Fresh, Record::new(SystemTime::now()))
    }

    /// A session that loaded `values` (name, u32).
    fn loaded(values: &[(&str, u32)]) -> Session {
        let mut record = Record::new(SystemTime::now());
        for (name, value) in values {
            record.set_value(*name, codec::encode_value(value).unwrap());
        }
        Session::new(Origin::Fresh, record)
    }

    fn record_of(values: &[(&str, u32)]) -> Record {
        loaded(values).record
    }

    fn value(record: &Record, name: &str) -> Option<u32> {
        record.value(name).map(|b| codec::decode_value(b).unwrap())
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
        let mut s = loaded(&[("kept", 1), ("gone", 1)]);
        s.insert("mine", &7u32).unwrap();
        s.remove("gone");
        let mut newer = record_of(&[("theirs", 2), ("gone", 1), ("kept", 1)]);
        s.replay_onto(&mut newer, FAIL).unwrap();
        let names: Vec<&str> = newer.names().collect();
        assert_eq!(names, ["kept", "mine", "theirs"]);
    }

    #[test]
    fn clear_then_insert_replays_as_clear_then_insert() {
        let mut s = loaded(&[("a", 1)]);
        s.clear();
        s.insert("b", &1u8).unwrap();
        let mut newer = record_of(&[("a", 1), ("c", 1)]);
        s.replay_onto(&mut newer, LWW).unwrap();
        assert_eq!(newer.names().collect::<Vec<_>>(), ["b"]);
        let mut newer = record_of(&[("a", 1), ("c", 1)]);
        assert!(matches!(
            s.replay_onto(&mut newer, FAIL),
            Err(SessionError::ConcurrentModification { name }) if name == "c"
        ));
    }

    #[test]
    fn inserting_the_same_value_is_not_a_change() {
        let mut s = loaded(&[("a", 1)]);
        s.insert("a", &1u32).unwrap();
        assert!(!s.is_modified());
        assert_eq!(s.update("a", |n: Option<u32>| n.unwrap_or(0)).unwrap(), 1);
        assert!(!s.is_modified());
    }

    #[test]
    fn an_insert_of_the_loaded_value_still_wins_when_the_request_writes() {
        let mut s = loaded(&[("theme", 1), ("n", 0)]);
        s.insert("theme", &1u32).unwrap();
        s.insert("n", &1u32).unwrap();
        let mut newer = record_of(&[("theme", 2), ("n", 0)]);
        s.replay_onto(&mut newer, LWW).unwrap();
        assert_eq!(value(&newer, "theme"), Some(1), "the last writer wins");
        let mut newer = record_of(&[("theme", 2), ("n", 0)]);
        assert!(matches!(
            s.replay_onto(&mut newer, FAIL),
            Err(SessionError::ConcurrentModification { name }) if name == "theme"
        ));
    }

    #[test]
    fn an_update_after_an_insert_of_the_loaded_value_still_counts_concurrent_changes() {
        let mut s = loaded(&[("n", 3)]);
        s.insert("n", &3u32).unwrap();
        s.update("n", |n: Option<u32>| n.unwrap_or(0) + 1).unwrap();
        let mut newer = record_of(&[("n", 4)]);
        s.replay_onto(&mut newer, FAIL).unwrap();
        assert_eq!(value(&newer, "n"), Some(5));
    }

    #[test]
    fn an_update_after_clear_starts_from_nothing_on_replay() {
        let mut s = loaded(&[("a", 1)]);
        s.clear();
        assert_eq!(
            s.update("cart", |n: Option<u32>| n.unwrap_or(0) + 1)
                .unwrap(),
            1
        );
        let mut newer = record_of(&[("a", 1), ("cart", 5)]);
        s.replay_onto(&mut newer, LWW).unwrap();
        assert_eq!(value(&newer, "cart"), Some(1));
        assert_eq!(newer.names().collect::<Vec<_>>(), ["cart"]);
        let mut newer = record_of(&[("a", 1), ("cart", 5)]);
        assert!(s.replay_onto(&mut newer, FAIL).is_err());
    }

    #[test]
    fn updates_run_again_on_the_newer_value() {
        let mut s = loaded(&[("visits", 3)]);
        assert_eq!(
            s.update("visits", |n: Option<u32>| n.unwrap_or(0) + 1)
                .unwrap(),
            4
        );
        assert_eq!(
            s.update("visits", |n: Option<u32>| n.unwrap_or(0) * 10)
                .unwrap(),
            40
        );
        assert_eq!(s.get::<u32>("visits").unwrap(), Some(40));
        // Another request counted to 5 meanwhile: (5 + 1) * 10, under either policy.
        for policy in [LWW, FAIL] {
            let mut newer = record_of(&[("visits", 5)]);
            s.replay_onto(&mut newer, policy).unwrap();
            assert_eq!(value(&newer, "visits"), Some(60));
        }
        // The other request removed it: the closures see `None`.
        let mut newer = record_of(&[]);
        s.replay_onto(&mut newer, LWW).unwrap();
        assert_eq!(value(&newer, "visits"), Some(10));
    }

    #[test]
    fn same_key_inserts_follow_the_policy() {
        let mut s = loaded(&[("color", 1)]);
        s.insert("color", &2u32).unwrap();
        // The other request did not touch it: no conflict under either policy.
        let mut newer = record_of(&[("color", 1), ("x", 9)]);
        s.replay_onto(&mut newer, FAIL).unwrap();
        assert_eq!(value(&newer, "color"), Some(2));
        // The other request set it to the same value: no conflict.
        let mut newer = record_of(&[("color", 2)]);
        s.replay_onto(&mut newer, FAIL).unwrap();
        // The other request set it to something else.
        let mut newer = record_of(&[("color", 3)]);
        assert!(matches!(
            s.replay_onto(&mut newer, FAIL),
            Err(SessionError::ConcurrentModification { name }) if name == "color"
        ));
        let mut newer = record_of(&[("color", 3)]);
        s.replay_onto(&mut newer, LWW).unwrap();
        assert_eq!(value(&newer, "color"), Some(2));
        // A removal the other request's change conflicts with, too.
        let mut r = loaded(&[("color", 1)]);
        r.remove("color");
        let mut newer = record_of(&[("color", 3)]);
        assert!(r.replay_onto(&mut newer, FAIL).is_err());
    }

    #[test]
    fn update_after_insert_builds_on_the_inserted_value() {
        let mut s = loaded(&[("n", 1)]);
        s.insert("n", &10u32).unwrap();
        s.update("n", |n: Option<u32>| n.unwrap_or(0) + 1).unwrap();
        let mut newer = record_of(&[("n", 1)]);
        s.replay_onto(&mut newer, FAIL).unwrap();
        assert_eq!(value(&newer, "n"), Some(11));
    }

    #[test]
    fn an_update_that_cannot_decode_the_newer_value_is_an_error() {
        let mut s = loaded(&[("n", 1)]);
        s.update("n", |n: Option<u32>| n.unwrap_or(0) + 1).unwrap();
        let mut newer = Record::new(SystemTime::now());
        newer.set_value("n", codec::encode_value("text").unwrap());
        assert!(matches!(
            s.replay_onto(&mut newer, LWW),
            Err(SessionError::DecodeValue { .. })
        ));
    }

    #[test]
    fn sessions_stay_send_and_sync_with_updates_held() {
        fn send_and_sync<T: Send + Sync>(_: &T) {}
        let mut s = fresh();
        let not_sync = std::cell::Cell::new(1u32);
        s.update("n", move |n: Option<u32>| n.unwrap_or(not_sync.get()))
            .unwrap();
        send_and_sync(&s);
    }

    #[test]
    fn debug_shows_names_never_bytes() {
        let mut s = fresh();
        s.insert("reset_token", "s3cr3t-value").unwrap();
        let shown = format!("{s:?}");
        assert!(shown.contains("reset_token"));
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
