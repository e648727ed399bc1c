//! The cases. Each one panics (fails its test) when the store breaks the contract written in
//! `session_core::store`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use session_core::codec::encoded_record_len;
use session_core::store::{MAX_TTL, MIN_TTL};
use session_core::{
    CommitStatus, KeyRing, Record, Session, SessionConfig, SessionManager, SessionStore,
    SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use tokio::task::JoinSet;

use crate::new_key;
use crate::recording::RecordingStore;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A record with the value `name` = `bytes`, at a fixed creation time so records compare equal.
pub fn record_with(name: &str, bytes: &[u8]) -> Record {
    let mut record = Record::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    record.set_value(name, bytes.to_vec());
    record
}

fn load_err<T>(result: Result<T, StoreError>) -> StoreError {
    match result {
        Ok(_) => panic!("expected an error, the operation succeeded"),
        Err(e) => e,
    }
}

/// A created record loads back equal, with the version `create` returned and a sane TTL.
pub async fn create_load_round_trip<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    let mut record = record_with("user", b"alice");
    record.set_value("n", vec![1, 2, 3]);
    record.set_absolute_deadline(Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
    let version = store.create(&key, &record, 10 * MINUTE).await.unwrap();
    let loaded = store
        .load(&key)
        .await
        .unwrap()
        .expect("created record loads");
    assert_eq!(loaded.record, record);
    assert_eq!(loaded.version, version);
    if let Some(left) = loaded.expires_in {
        assert!(
            left <= 10 * MINUTE + 2 * MIN_TTL,
            "expires_in {left:?} beyond the TTL"
        );
        assert!(
            left >= 10 * MINUTE - 5 * MIN_TTL,
            "expires_in {left:?} far below the TTL"
        );
    }
}

/// `create` on an existing key is `AlreadyExists` and leaves the entry as it was.
pub async fn create_never_overwrites<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    let first = record_with("who", b"first");
    let version = store.create(&key, &first, MINUTE).await.unwrap();
    let error = load_err(
        store
            .create(&key, &record_with("who", b"second"), MINUTE)
            .await,
    );
    assert!(matches!(error, StoreError::AlreadyExists), "got {error:?}");
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.record, first);
    assert_eq!(loaded.version, version);
}

/// Loading a key that was never written is `None`.
pub async fn load_of_missing_key_is_none<S: SessionStore + Clone + 'static>(store: S) {
    assert!(store.load(&new_key()).await.unwrap().is_none());
}

/// A new key whose session was created with `n` = "1" (version `v1`) and saved with `n` = "2"
/// (version `v2`).
async fn saved_once<S: SessionStore>(store: &S) -> (StorageKey, Version, Version) {
    let key = new_key();
    let v1 = store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    let v2 = store
        .save(&key, &record_with("n", b"2"), MINUTE, v1)
        .await
        .unwrap();
    (key, v1, v2)
}

/// A save with the current version succeeds with a new version; a save with an older one is
/// `Conflict` and writes nothing.
pub async fn save_with_stale_version_is_conflict<S: SessionStore + Clone + 'static>(store: S) {
    let (key, v1, v2) = saved_once(&store).await;
    assert_ne!(v1, v2, "a save must change the version");
    let error = load_err(store.save(&key, &record_with("n", b"3"), MINUTE, v1).await);
    assert!(matches!(error, StoreError::Conflict), "got {error:?}");
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.record, record_with("n", b"2"));
    assert_eq!(loaded.version, v2);
    let v3 = store
        .save(&key, &record_with("n", b"3"), MINUTE, v2)
        .await
        .unwrap();
    assert!(v3 != v2 && v3 != v1);
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().record,
        record_with("n", b"3")
    );
}

/// A save after a delete is `NotFound` and does not bring the session back.
pub async fn save_after_delete_is_not_found_and_recreates_nothing<
    S: SessionStore + Clone + 'static,
>(
    store: S,
) {
    let key = new_key();
    let version = store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    let error = load_err(
        store
            .save(&key, &record_with("n", b"2"), MINUTE, version)
            .await,
    );
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "save resurrected a deleted session"
    );
    // A key that never existed behaves the same.
    let never = new_key();
    let error = load_err(
        store
            .save(&never, &record_with("n", b"2"), MINUTE, version)
            .await,
    );
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
    assert!(store.load(&never).await.unwrap().is_none());
}

/// A version taken before a delete does not match an entry created again under the same key.
pub async fn old_version_does_not_match_a_recreated_entry<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let key = new_key();
    let old = store
        .create(&key, &record_with("n", b"old"), MINUTE)
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    let new = store
        .create(&key, &record_with("n", b"new"), MINUTE)
        .await
        .unwrap();
    assert_ne!(old, new, "a re-created entry reused an old version");
    let error = load_err(
        store
            .save(&key, &record_with("n", b"stale"), MINUTE, old)
            .await,
    );
    assert!(matches!(error, StoreError::Conflict), "got {error:?}");
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().record,
        record_with("n", b"new")
    );
}

/// How long after its TTL an entry is surely gone: the contract lets whole-second backends keep
/// an entry up to two seconds past its TTL.
const EXPIRY_GRACE: Duration = Duration::from_millis(2100);

/// `touch` keeps an entry alive past its first TTL (and past the grace a whole-second backend
/// may add), with its data and version unchanged.
pub async fn touch_extends_expiry_without_changing_data<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let key = new_key();
    let record = record_with("keep", b"me");
    let version = store.create(&key, &record, MIN_TTL).await.unwrap();
    assert!(store.touch(&key, MINUTE).await.unwrap());
    tokio::time::sleep(MIN_TTL + EXPIRY_GRACE).await;
    let loaded = store
        .load(&key)
        .await
        .unwrap()
        .expect("a touched entry outlives its first TTL");
    assert_eq!(loaded.record, record);
    assert_eq!(loaded.version, version, "touch must not change the version");
    if let Some(left) = loaded.expires_in {
        assert!(
            left > MINUTE - 10 * MIN_TTL,
            "touch did not extend: {left:?} left"
        );
    }
    // The version from before the touch still saves.
    store
        .save(&key, &record_with("keep", b"changed"), MINUTE, version)
        .await
        .unwrap();
}

/// `touch` of a missing key is `false` and creates nothing.
pub async fn touch_of_missing_key_is_false_and_creates_nothing<
    S: SessionStore + Clone + 'static,
>(
    store: S,
) {
    let key = new_key();
    assert!(!store.touch(&key, MINUTE).await.unwrap());
    assert!(store.load(&key).await.unwrap().is_none());
    store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert!(!store.touch(&key, MINUTE).await.unwrap());
    assert!(store.load(&key).await.unwrap().is_none());
}

/// Deleting removes the entry; deleting again, or deleting a missing key, succeeds.
pub async fn delete_is_idempotent<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    store.delete(&key).await.unwrap();
    assert!(store.load(&key).await.unwrap().is_none());
    store.delete(&key).await.unwrap();
    store.delete(&new_key()).await.unwrap();
    // The key is free again.
    store
        .create(&key, &record_with("n", b"2"), MINUTE)
        .await
        .unwrap();
}

/// An entry lives its whole TTL (never expiring early) and is gone once the TTL and the
/// contract's grace have passed: not loaded, not saved, not touched, and its key can be
/// created again.
pub async fn idle_expiry_is_honored<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    let version = store
        .create(&key, &record_with("n", b"1"), MIN_TTL)
        .await
        .unwrap();
    let longer = new_key();
    store
        .create(&longer, &record_with("n", b"1"), 2 * MIN_TTL)
        .await
        .unwrap();
    assert!(store.load(&key).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        store.load(&longer).await.unwrap().is_some(),
        "an entry expired before its TTL"
    );
    tokio::time::sleep(MIN_TTL + EXPIRY_GRACE - Duration::from_millis(1500)).await;
    assert!(
        store.load(&key).await.unwrap().is_none(),
        "expired entry returned"
    );
    let error = load_err(
        store
            .save(&key, &record_with("n", b"2"), MINUTE, version)
            .await,
    );
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
    assert!(!store.touch(&key, MINUTE).await.unwrap());
    assert!(store.load(&key).await.unwrap().is_none());
    store
        .create(&key, &record_with("n", b"3"), MINUTE)
        .await
        .unwrap();
}

/// TTLs of weeks and months (up to the contract's maximum) keep entries and report them.
pub async fn long_timeouts_are_honored<S: SessionStore + Clone + 'static>(store: S) {
    for ttl in [7 * DAY, 30 * DAY, 31 * DAY, 90 * DAY, MAX_TTL] {
        let key = new_key();
        let record = record_with("ttl", &ttl.as_secs().to_le_bytes());
        let version = store.create(&key, &record, ttl).await.unwrap();
        let loaded = store
            .load(&key)
            .await
            .unwrap()
            .expect("long-lived entry loads");
        assert_eq!(loaded.record, record);
        if let Some(left) = loaded.expires_in {
            assert!(
                left > ttl - MINUTE && left <= ttl + 2 * MIN_TTL,
                "{ttl:?}: {left:?} left"
            );
        }
        let version = store.save(&key, &record, ttl, version).await.unwrap();
        assert!(store.touch(&key, ttl).await.unwrap());
        let loaded = store
            .load(&key)
            .await
            .unwrap()
            .expect("still there after touch");
        assert_eq!(loaded.version, version);
        if let Some(left) = loaded.expires_in {
            assert!(
                left > ttl - MINUTE && left <= ttl + 2 * MIN_TTL,
                "{ttl:?} after touch: {left:?} left"
            );
        }
        store.delete(&key).await.unwrap();
    }
}

/// TTLs below one second or above the maximum are `InvalidTtl` for every operation and
/// write nothing (memcached would read a zero TTL as "never expires").
pub async fn ttl_outside_the_contract_range_is_rejected<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let bad = [Duration::ZERO, MIN_TTL / 2, MAX_TTL + MIN_TTL];
    let key = new_key();
    for ttl in bad {
        let error = load_err(store.create(&key, &record_with("n", b"1"), ttl).await);
        assert!(
            matches!(error, StoreError::InvalidTtl { .. }),
            "create {ttl:?}: {error:?}"
        );
        assert!(store.load(&key).await.unwrap().is_none());
    }
    let version = store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    for ttl in bad {
        let error = load_err(
            store
                .save(&key, &record_with("n", b"2"), ttl, version)
                .await,
        );
        assert!(
            matches!(error, StoreError::InvalidTtl { .. }),
            "save {ttl:?}: {error:?}"
        );
        let error = load_err(store.touch(&key, ttl).await);
        assert!(
            matches!(error, StoreError::InvalidTtl { .. }),
            "touch {ttl:?}: {error:?}"
        );
    }
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.record, record_with("n", b"1"));
    assert_eq!(loaded.version, version);
    if let Some(left) = loaded.expires_in {
        assert!(
            left <= MINUTE + 2 * MIN_TTL && left > MINUTE - 10 * MIN_TTL,
            "{left:?} left"
        );
    }
}

/// `save` and `touch` set the TTL from now, shortening as well as extending it.
pub async fn save_and_touch_set_the_ttl<S: SessionStore + Clone + 'static>(store: S) {
    let record = record_with("n", b"1");
    let saved_shorter = new_key();
    let version = store.create(&saved_shorter, &record, MINUTE).await.unwrap();
    store
        .save(&saved_shorter, &record, MIN_TTL, version)
        .await
        .unwrap();
    let touched_shorter = new_key();
    store
        .create(&touched_shorter, &record, MINUTE)
        .await
        .unwrap();
    assert!(store.touch(&touched_shorter, MIN_TTL).await.unwrap());
    let saved_longer = new_key();
    let version = store.create(&saved_longer, &record, MIN_TTL).await.unwrap();
    store
        .save(&saved_longer, &record, MINUTE, version)
        .await
        .unwrap();

    tokio::time::sleep(MIN_TTL + EXPIRY_GRACE).await;
    assert!(
        store.load(&saved_shorter).await.unwrap().is_none(),
        "save kept the old TTL"
    );
    assert!(
        store.load(&touched_shorter).await.unwrap().is_none(),
        "touch kept the old TTL"
    );
    assert!(
        store.load(&saved_longer).await.unwrap().is_some(),
        "save did not extend the TTL"
    );
}

/// A record whose encoding is exactly `size` bytes.
pub fn record_of_encoded_size(size: usize) -> Record {
    let smallest = encoded_record_len(&record_with("v", &[])).unwrap();
    assert!(
        size >= smallest,
        "no record encodes to {size} bytes (the smallest is {smallest})"
    );
    let mut value_len = size;
    let base = loop {
        let record = record_with("v", &vec![0xa5; value_len]);
        let len = encoded_record_len(&record).unwrap();
        if len <= size {
            break len;
        }
        value_len -= (len - size).min(value_len);
    };
    // Pad with the name's length, which adds exactly one byte per character below 251.
    let name = format!("v{}", "x".repeat(size - base));
    let record = record_with(&name, &vec![0xa5; value_len]);
    assert_eq!(encoded_record_len(&record).unwrap(), size);
    record
}

/// A record of exactly the store's limit is stored; one byte more is `TooLarge` and nothing is
/// written, for create and for save.
pub async fn record_at_the_size_limit_works_and_over_it_is_rejected<
    S: SessionStore + Clone + 'static,
>(
    store: S,
) {
    let limit = store.max_record_size();
    let at_limit = record_of_encoded_size(limit);
    let over_limit = record_of_encoded_size(limit + 1);

    let key = new_key();
    let version = store.create(&key, &at_limit, MINUTE).await.unwrap();
    assert_eq!(store.load(&key).await.unwrap().unwrap().record, at_limit);

    let missing = new_key();
    let error = load_err(store.create(&missing, &over_limit, MINUTE).await);
    assert!(
        matches!(error, StoreError::TooLarge { size, limit: l } if size == limit + 1 && l == limit),
        "got {error:?}"
    );
    assert!(store.load(&missing).await.unwrap().is_none());

    let error = load_err(store.save(&key, &over_limit, MINUTE, version).await);
    assert!(
        matches!(error, StoreError::TooLarge { .. }),
        "got {error:?}"
    );
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.record, at_limit);
    assert_eq!(loaded.version, version);
    store.delete(&key).await.unwrap();
}

/// Every byte value, protocol-looking bytes and non-ASCII names survive a round trip.
pub async fn binary_safe_values<S: SessionStore + Clone + 'static>(store: S) {
    let mut record = record_with("all bytes", &(0..=255u8).collect::<Vec<_>>());
    record.set_value(
        "protocol",
        b"END\r\nVALUE x 0 1\r\n\0$-1\r\n*3\r\n".to_vec(),
    );
    record.set_value("empty", Vec::new());
    record.set_value("ключ 🔑\n", vec![0, 0, 0]);
    record.set_value("", vec![0xff; 1000]);
    let key = new_key();
    let version = store.create(&key, &record, MINUTE).await.unwrap();
    assert_eq!(store.load(&key).await.unwrap().unwrap().record, record);
    record.set_value("protocol", b"\r\n\r\n".to_vec());
    store.save(&key, &record, MINUTE, version).await.unwrap();
    assert_eq!(store.load(&key).await.unwrap().unwrap().record, record);
}

/// A save whose TTL is the time a load reported left keeps the expiry where it was (within the
/// two seconds of rounding the contract allows), however often it is repeated. The manager saves
/// this way until a session is due for a touch; an expiry that crept forward with every save
/// would put off the touch, and the cookie refresh with it, past the cookie's own expiry.
pub async fn saves_with_the_reported_ttl_keep_the_expiry<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let key = new_key();
    store
        .create(&key, &record_with("n", b"0"), 10 * MINUTE)
        .await
        .unwrap();
    let Some(first) = store.load(&key).await.unwrap().unwrap().expires_in else {
        return; // The backend cannot tell the time left; the manager then always extends.
    };
    for round in 0..20u8 {
        let loaded = store.load(&key).await.unwrap().unwrap();
        let left = loaded.expires_in.expect("reported before");
        store
            .save(
                &key,
                &record_with("n", &[round]),
                left.max(MIN_TTL),
                loaded.version,
            )
            .await
            .unwrap();
    }
    let last = store.load(&key).await.unwrap().unwrap().expires_in.unwrap();
    assert!(
        last <= first + 2 * MIN_TTL,
        "20 saves with the reported TTL pushed the expiry from {first:?} to {last:?}"
    );
}

/// Five thousand sessions, created by many tasks at once, all load back with their own data.
pub async fn thousands_of_sessions<S: SessionStore + Clone + 'static>(store: S) {
    const TASKS: usize = 50;
    const PER_TASK: usize = 100;
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut keys = Vec::with_capacity(PER_TASK);
            for i in 0..PER_TASK {
                let key = new_key();
                let tag = format!("{task}:{i}");
                store
                    .create(&key, &record_with("tag", tag.as_bytes()), 10 * MINUTE)
                    .await
                    .unwrap();
                keys.push((key, tag));
            }
            keys
        });
    }
    let mut all = Vec::with_capacity(TASKS * PER_TASK);
    while let Some(keys) = tasks.join_next().await {
        all.extend(keys.unwrap());
    }
    assert_eq!(all.len(), TASKS * PER_TASK);
    for (key, tag) in &all {
        let loaded = store.load(key).await.unwrap().expect("every session loads");
        assert_eq!(loaded.record, record_with("tag", tag.as_bytes()));
    }
    for (key, _) in &all {
        store.delete(key).await.unwrap();
    }
}

/// Runs sixteen racing writes of `n` = task number; asserts that exactly one succeeded, that
/// every other failed with the error `loser` accepts, and that the winner's record is stored.
async fn exactly_one_wins<S, F, Fut>(
    store: &S,
    key: &StorageKey,
    write: F,
    loser: fn(&StoreError) -> bool,
) where
    S: SessionStore + Clone + 'static,
    F: Fn(S, StorageKey, Record) -> Fut,
    Fut: std::future::Future<Output = Result<Version, StoreError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for task in 0..16u8 {
        let write = write(store.clone(), key.clone(), record_with("n", &[task]));
        tasks.spawn(async move { (task, write.await) });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            (task, Ok(version)) => winners.push((task, version)),
            (_, Err(error)) if loser(&error) => {}
            (_, Err(other)) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let loaded = store.load(key).await.unwrap().unwrap();
    assert_eq!(loaded.record, record_with("n", &[winners[0].0]));
    assert_eq!(loaded.version, winners[0].1);
}

/// Sixteen tasks create the same key at once: exactly one succeeds, and its record is stored.
pub async fn concurrent_creates_have_one_winner<S: SessionStore + Clone + 'static>(store: S) {
    let write = |store: S, key: StorageKey, record: Record| async move {
        store.create(&key, &record, MINUTE).await
    };
    exactly_one_wins(&store, &new_key(), write, |e| {
        matches!(e, StoreError::AlreadyExists)
    })
    .await;
}

/// Sixteen tasks save against the same version at once: exactly one succeeds.
pub async fn concurrent_saves_have_one_winner<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    let version = store
        .create(&key, &record_with("n", b"start"), MINUTE)
        .await
        .unwrap();
    let write = move |store: S, key: StorageKey, record: Record| async move {
        store.save(&key, &record, MINUTE, version).await
    };
    exactly_one_wins(&store, &key, write, |e| matches!(e, StoreError::Conflict)).await;
}

/// `mark_moved` leaves a marker that names the new key and is no session: `load` does not
/// return it, `touch` does not count it, every conditional write against it conflicts, `create`
/// cannot replace it, and `delete` removes it.
pub async fn mark_moved_leaves_a_marker_that_is_no_session<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let (old, new) = (new_key(), new_key());
    let version = store
        .create(&old, &record_with("user", b"alice"), MINUTE)
        .await
        .unwrap();
    store.mark_moved(&old, version, &new, MINUTE).await.unwrap();
    let moved = Some(StoredEntry::Moved { to: new.clone() });
    assert_eq!(store.load_entry(&old).await.unwrap(), moved);
    assert!(
        store.load(&old).await.unwrap().is_none(),
        "a marker loaded as a session"
    );
    assert!(
        !store.touch(&old, MINUTE).await.unwrap(),
        "touch counted a marker"
    );
    let error = load_err(
        store
            .save(&old, &record_with("user", b"mallory"), MINUTE, version)
            .await,
    );
    assert!(matches!(error, StoreError::Conflict), "save: {error:?}");
    let error = load_err(store.mark_moved(&old, version, &new_key(), MINUTE).await);
    assert!(
        matches!(error, StoreError::Conflict),
        "mark_moved: {error:?}"
    );
    let error = load_err(store.delete_if_version(&old, version).await);
    assert!(
        matches!(error, StoreError::Conflict),
        "delete_if_version: {error:?}"
    );
    let error = load_err(
        store
            .create(&old, &record_with("user", b"mallory"), MINUTE)
            .await,
    );
    assert!(
        matches!(error, StoreError::AlreadyExists),
        "create: {error:?}"
    );
    assert_eq!(
        store.load_entry(&old).await.unwrap(),
        moved,
        "the marker changed"
    );
    assert!(
        store.load_entry(&new).await.unwrap().is_none(),
        "the target was touched"
    );
    store.delete(&old).await.unwrap();
    assert!(store.load_entry(&old).await.unwrap().is_none());
}

/// `mark_moved` applies only at the current version: an older one is `Conflict`, a missing
/// entry `NotFound`, and neither writes anything.
pub async fn mark_moved_is_conditional<S: SessionStore + Clone + 'static>(store: S) {
    let (key, v1, v2) = saved_once(&store).await;
    let to = new_key();
    let error = load_err(store.mark_moved(&key, v1, &to, MINUTE).await);
    assert!(matches!(error, StoreError::Conflict), "got {error:?}");
    let loaded = store.load(&key).await.unwrap().expect("still a session");
    assert_eq!(
        (loaded.record, loaded.version),
        (record_with("n", b"2"), v2)
    );
    let missing = new_key();
    let error = load_err(store.mark_moved(&missing, v2, &to, MINUTE).await);
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
    assert!(
        store.load_entry(&missing).await.unwrap().is_none(),
        "a marker was created"
    );
    let error = load_err(store.mark_moved(&key, v2, &to, Duration::ZERO).await);
    assert!(
        matches!(error, StoreError::InvalidTtl { .. }),
        "got {error:?}"
    );
    assert!(store.load(&key).await.unwrap().is_some());
}

/// A marker lives for its own TTL, then is gone; a touch (a request that loaded the session
/// before it moved) does not extend it.
pub async fn moved_marker_expires_after_its_ttl<S: SessionStore + Clone + 'static>(store: S) {
    let key = new_key();
    let version = store
        .create(&key, &record_with("n", b"1"), MINUTE)
        .await
        .unwrap();
    store
        .mark_moved(&key, version, &new_key(), MIN_TTL)
        .await
        .unwrap();
    assert!(!store.touch(&key, MINUTE).await.unwrap());
    assert!(matches!(
        store.load_entry(&key).await.unwrap(),
        Some(StoredEntry::Moved { .. })
    ));
    tokio::time::sleep(MIN_TTL + EXPIRY_GRACE).await;
    assert!(
        store.load_entry(&key).await.unwrap().is_none(),
        "the marker outlived its TTL"
    );
}

/// `delete_if_version` removes the session only at its current version: an older version is
/// `Conflict` and removes nothing; a missing entry is `NotFound`.
pub async fn delete_if_version_is_conditional<S: SessionStore + Clone + 'static>(store: S) {
    let (key, v1, v2) = saved_once(&store).await;
    let error = load_err(store.delete_if_version(&key, v1).await);
    assert!(matches!(error, StoreError::Conflict), "got {error:?}");
    assert_eq!(store.load(&key).await.unwrap().unwrap().version, v2);
    store.delete_if_version(&key, v2).await.unwrap();
    assert!(store.load_entry(&key).await.unwrap().is_none());
    let error = load_err(store.delete_if_version(&key, v2).await);
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
    let error = load_err(store.delete_if_version(&new_key(), v2).await);
    assert!(matches!(error, StoreError::NotFound), "got {error:?}");
}

/// Sixteen tasks race on one version of one session, half saving and half marking it moved
/// (each to a key of its own): exactly one wins, and the entry is the winner's.
pub async fn concurrent_saves_and_marks_have_one_winner<S: SessionStore + Clone + 'static>(
    store: S,
) {
    let key = new_key();
    let version = store
        .create(&key, &record_with("n", b"start"), MINUTE)
        .await
        .unwrap();
    let mut tasks = JoinSet::new();
    for task in 0..16u8 {
        let (store, key) = (store.clone(), key.clone());
        tasks.spawn(async move {
            let to = new_key();
            let won = if task % 2 == 0 {
                store
                    .save(&key, &record_with("n", &[task]), MINUTE, version)
                    .await
                    .map(|_| None)
            } else {
                store
                    .mark_moved(&key, version, &to, MINUTE)
                    .await
                    .map(|()| Some(to))
            };
            (task, won)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            (task, Ok(moved_to)) => winners.push((task, moved_to)),
            (_, Err(StoreError::Conflict)) => {}
            (_, Err(other)) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let entry = store.load_entry(&key).await.unwrap();
    match &winners[0] {
        (task, None) => match entry {
            Some(StoredEntry::Session(loaded)) => {
                assert_eq!(loaded.record, record_with("n", &[*task]));
            }
            other => panic!("the winning save is not stored: {other:?}"),
        },
        (_, Some(to)) => assert_eq!(entry, Some(StoredEntry::Moved { to: to.clone() })),
    }
}

/// Random sequences of operations on a few keys agree with a reference model (proptest).
pub async fn model_based_operations<S: SessionStore + Clone + 'static>(store: S) {
    crate::model::check_against_model(store, 64).await;
}

fn test_manager<S: SessionStore + 'static>(store: S) -> SessionManager {
    let keys = KeyRing::single(SigningKey::generate().unwrap());
    SessionManager::new(Arc::new(store), SessionConfig::new(keys)).unwrap()
}

/// A manager for 32 requests at once on one session, far past a browser's six connections:
/// each commit may lose the race for the session dozens of times, and on a loaded two-core
/// machine the default 64 replays were once exhausted (an error, with nothing lost). What
/// these cases check is that no update is lost, so they allow more replays.
fn stress_manager<S: SessionStore + 'static>(store: S) -> SessionManager {
    let keys = KeyRing::single(SigningKey::generate().unwrap());
    let config = SessionConfig::new(keys).max_conflict_retries(512);
    SessionManager::new(Arc::new(store), config).unwrap()
}

/// Runs `tasks` tasks of `rounds` requests each on the session `cookie` names, all at once:
/// each request loads the session, makes `change(session, task, round)`, yields (so requests
/// interleave) and commits, which must save.
async fn concurrent_requests(
    manager: &SessionManager,
    cookie: &str,
    tasks: u32,
    rounds: u32,
    change: fn(&mut Session, u32, u32),
) {
    let mut running = JoinSet::new();
    for task in 0..tasks {
        let (manager, cookie) = (manager.clone(), cookie.to_owned());
        running.spawn(async move {
            for round in 1..=rounds {
                let mut session = manager.load(Some(&cookie)).await.unwrap();
                assert!(!session.is_new(), "the session vanished");
                change(&mut session, task, round);
                tokio::task::yield_now().await;
                let outcome = manager.commit(session).await.unwrap();
                assert_eq!(outcome.status, CommitStatus::Saved);
            }
        });
    }
    while let Some(joined) = running.join_next().await {
        joined.unwrap();
    }
}

/// Through the manager, 32 tasks each set their own key 50 times on one session at once, every
/// task yielding between its load and its commit so that requests interleave; every last value
/// persists (conflicts happen, and are replayed, never lost).
pub async fn manager_concurrent_commits_lose_no_update<S: SessionStore + Clone + 'static>(
    store: S,
) {
    const TASKS: u32 = 32;
    const ROUNDS: u32 = 50;
    let recording = RecordingStore::new(store);
    let manager = stress_manager(recording.clone());
    let mut session = manager.load(None).await.unwrap();
    session.insert("owner", "conformance").unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;

    concurrent_requests(&manager, &cookie, TASKS, ROUNDS, |session, task, round| {
        session.insert(&format!("task-{task}"), &round).unwrap();
    })
    .await;
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(
        session.get::<String>("owner").unwrap().as_deref(),
        Some("conformance")
    );
    for task in 0..TASKS {
        assert_eq!(
            session.get::<u32>(&format!("task-{task}")).unwrap(),
            Some(ROUNDS),
            "task {task} lost an update"
        );
    }
    assert!(
        recording.conflicts() > 0,
        "no save conflicted, so the case proved nothing about replay"
    );
}

/// Through the manager, 32 tasks each count one shared value up 20 times with
/// `Session::update` on one session at once: the count ends at exactly 640 (every conflict is
/// replayed by running the update again on the newer value, never by overwriting it).
pub async fn manager_concurrent_updates_count_every_one<S: SessionStore + Clone + 'static>(
    store: S,
) {
    const TASKS: u32 = 32;
    const ROUNDS: u32 = 20;
    let recording = RecordingStore::new(store);
    let manager = stress_manager(recording.clone());
    let mut session = manager.load(None).await.unwrap();
    session.insert("count", &0u32).unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;

    concurrent_requests(&manager, &cookie, TASKS, ROUNDS, |session, _, _| {
        session
            .update("count", |n: Option<u32>| n.unwrap_or(0) + 1)
            .unwrap();
    })
    .await;
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(session.get::<u32>("count").unwrap(), Some(TASKS * ROUNDS));
    assert!(
        recording.conflicts() > 0,
        "no save conflicted, so the case proved nothing about replay"
    );
}

/// Through the manager on this store: every interleaving of two concurrent requests on one
/// session (reads, inserts, same-key inserts, updates, id cycles, destroys, touches), and 300
/// seeded three-request interleavings, keep every invariant of [`crate::interleave`].
pub async fn manager_interleavings_keep_every_invariant<S: SessionStore + Clone + 'static>(
    store: S,
) {
    use crate::interleave::{Exploration, Harness, Report, all_pairs};
    let harness = Harness::new(store, Exploration::default());
    let mut report = Report::default();
    for pair in all_pairs() {
        harness.explore_all(&pair, &mut report).await;
        report.assert_clean();
    }
    let pairs = report.schedules;
    harness
        .explore_random(3, 300, 0x5e55_10f5, &mut report)
        .await;
    report.assert_clean();
    println!(
        "checked {pairs} two-request and {} three-request interleavings",
        report.schedules - pairs
    );
}

/// Through the manager with a 3-second idle timeout: a browser that sends a request every 200
/// ms for 6 seconds, every other one a save, and that drops its cookie when the cookie's
/// `Max-Age` runs out (as browsers do), stays in its session all along. The session is
/// refreshed (a touch or an extending save, with a new `Max-Age`) before the cookie runs out,
/// however many saves that keep the expiry come in between.
pub async fn manager_active_sessions_keep_a_live_cookie<S: SessionStore + Clone + 'static>(
    store: S,
) {
    use std::time::Instant;
    let keys = KeyRing::single(SigningKey::generate().unwrap());
    let config = SessionConfig::new(keys)
        .idle_timeout(Duration::from_secs(3))
        .touch_threshold(Duration::from_secs(2));
    let manager = SessionManager::new(Arc::new(store), config).unwrap();
    let mut session = manager.load(None).await.unwrap();
    session.insert("n", &0u32).unwrap();
    let created = manager.commit(session).await.unwrap().cookie.unwrap();
    let mut cookie = created.value;
    let mut cookie_expires = Instant::now() + created.max_age.unwrap();
    let mut refreshes = 0;
    let start = Instant::now();
    let mut round = 0u32;
    while start.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        round += 1;
        assert!(
            Instant::now() < cookie_expires,
            "the browser dropped its cookie after {:?} of activity",
            start.elapsed()
        );
        let mut session = manager.load(Some(&cookie)).await.unwrap();
        assert!(
            !session.is_new(),
            "the session ended after {:?} of activity",
            start.elapsed()
        );
        if round.is_multiple_of(2) {
            session.insert("n", &round).unwrap();
        }
        let outcome = manager.commit(session).await.unwrap();
        if let Some(directive) = outcome.cookie {
            cookie = directive.value;
            cookie_expires = Instant::now() + directive.max_age.unwrap();
            refreshes += 1;
        }
    }
    assert!(refreshes > 0, "the cookie was never refreshed");
}

/// The manager's whole flow on this store: create, load, change, cycle, destroy.
pub async fn manager_request_flow<S: SessionStore + Clone + 'static>(store: S) {
    let manager = test_manager(store);
    let mut session = manager.load(None).await.unwrap();
    session.insert("user", "alice").unwrap();
    let created = manager.commit(session).await.unwrap();
    assert_eq!(created.status, CommitStatus::Created);
    let first = created.cookie.unwrap().value;

    let mut session = manager.load(Some(&first)).await.unwrap();
    assert_eq!(
        session.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
    session.insert("visits", &2u32).unwrap();
    assert_eq!(
        manager.commit(session).await.unwrap().status,
        CommitStatus::Saved
    );

    let mut session = manager.load(Some(&first)).await.unwrap();
    session.cycle_id();
    let cycled = manager.commit(session).await.unwrap();
    assert_eq!(cycled.status, CommitStatus::Cycled);
    let second = cycled.cookie.unwrap().value;
    assert_ne!(first, second);
    assert!(
        manager.load(Some(&first)).await.unwrap().is_new(),
        "old id still works"
    );

    let mut session = manager.load(Some(&second)).await.unwrap();
    assert_eq!(session.get::<u32>("visits").unwrap(), Some(2));
    session.destroy();
    let destroyed = manager.commit(session).await.unwrap();
    assert_eq!(destroyed.status, CommitStatus::Destroyed);
    assert!(destroyed.cookie.unwrap().is_removal());
    assert!(manager.load(Some(&second)).await.unwrap().is_new());
}
