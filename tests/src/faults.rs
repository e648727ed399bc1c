//! Helpers for backend fault tests: every operation against a broken server must give a typed
//! error within the store's deadline, and a healthy one must work.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

use crate::new_key;

/// Time to live used by the fault helpers.
pub const TTL: Duration = Duration::from_secs(60);

/// Slack for scheduling on a loaded two-core machine, on top of a store's own deadline.
pub const SLACK: Duration = Duration::from_millis(500);

/// A record holding `tag`.
pub fn tagged(tag: &str) -> Record {
    let mut record = Record::new(SystemTime::UNIX_EPOCH);
    record.set_value("tag", tag.as_bytes().to_vec());
    record
}

/// Whether `error` is a backend fault or a timeout (what a dead server may give).
pub fn is_backend_or_timeout(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Backend { .. } | StoreError::Timeout { .. }
    )
}

/// Whether `error` is a timeout (what a hung server must give).
pub fn is_timeout(error: &StoreError) -> bool {
    matches!(error, StoreError::Timeout { .. })
}

async fn timed<T>(
    call: impl Future<Output = Result<T, StoreError>>,
) -> (Duration, Result<(), StoreError>) {
    let started = Instant::now();
    let outcome = call.await.map(|_| ());
    (started.elapsed(), outcome)
}

/// Runs every store operation once and checks that each fails with an error `expected`
/// accepts, within `deadline` (plus [`SLACK`]).
pub async fn every_operation_fails<S: SessionStore>(
    store: &S,
    deadline: Duration,
    expected: fn(&StoreError) -> bool,
) {
    let key = new_key();
    let record = tagged("x");
    let outcomes = [
        ("create", timed(store.create(&key, &record, TTL)).await),
        ("load", timed(store.load(&key)).await),
        (
            "save",
            timed(store.save(&key, &record, TTL, Version::new(1))).await,
        ),
        ("touch", timed(store.touch(&key, TTL)).await),
        ("delete", timed(store.delete(&key)).await),
    ];
    for (operation, (elapsed, outcome)) in outcomes {
        let error = outcome.expect_err(operation);
        assert!(expected(&error), "{operation}: unexpected {error:?}");
        assert!(
            elapsed <= deadline + SLACK,
            "{operation} took {elapsed:?}, deadline {deadline:?}"
        );
    }
}

/// Creates, loads and saves a new session; returns its key (holding `tagged("saved")`).
pub async fn works<S: SessionStore>(store: &S) -> StorageKey {
    let key = new_key();
    let version = store.create(&key, &tagged("alive"), TTL).await.unwrap();
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.version, version);
    store
        .save(&key, &tagged("saved"), TTL, version)
        .await
        .unwrap();
    key
}

/// Loads `key` until the store answers (a reconnecting client may fail a few requests after
/// its server comes back), for up to two seconds; panics with `what` if it never does.
pub async fn load_once_reachable<S: SessionStore>(
    store: &S,
    key: &StorageKey,
    what: &str,
) -> Option<session_core::LoadedRecord> {
    for _ in 0..20 {
        if let Ok(found) = store.load(key).await {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: the store did not answer within two seconds");
}

/// What a [`MarkHooked`] store does in place of a plain `mark_moved`: for tests that delay,
/// stall or lose an id cycle's mark.
#[async_trait::async_trait]
pub trait MarkHook: Send + Sync {
    /// Runs instead of `inner.mark_moved(key, version, to, ttl)`; `inner` is the wrapped store.
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError>;
}

/// A store that forwards every call to `inner`, but `mark_moved`, which goes to `hook`.
#[derive(Clone)]
pub struct MarkHooked<S, H> {
    /// The wrapped store.
    pub inner: S,
    /// What a mark does instead.
    pub hook: H,
}

#[async_trait::async_trait]
impl<S: SessionStore + 'static, H: MarkHook> SessionStore for MarkHooked<S, H> {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.inner.create(k, r, t).await
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.inner.load_entry(key).await
    }

    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        self.inner.load(key).await
    }

    async fn save(
        &self,
        k: &StorageKey,
        r: &Record,
        t: Duration,
        v: Version,
    ) -> Result<Version, StoreError> {
        self.inner.save(k, r, t, v).await
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.hook
            .mark_moved(&self.inner, key, version, to, ttl)
            .await
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.touch(key, ttl).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.inner.delete_if_version(key, version).await
    }

    fn max_record_size(&self) -> usize {
        self.inner.max_record_size()
    }

    fn max_key_len(&self) -> Option<usize> {
        self.inner.max_key_len()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}
