//! Metrics of failures: a refused same-key conflict is neither misuse nor a replay, and a
//! failed load is counted among the loads (findings of the review of issue 12).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use session_core::observe::{ERRORS, LOADS, REPLAYS};
use session_core::{
    KeyRing, LoadedRecord, Record, SameKeyConflict, SessionConfig, SessionError, SessionManager,
    SessionStore, SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::MemoryStore;

/// Every counter after `script`, as `name` or `name{label=value}` (the `backend` label left out).
fn recorded(script: impl std::future::Future<Output = ()>) -> BTreeMap<String, u64> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(script));
    let mut values = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let DebugValue::Counter(count) = value else {
            continue;
        };
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .filter(|l| l.key() != "backend")
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let series = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        values.insert(series, count);
    }
    values
}

fn keys() -> KeyRing {
    KeyRing::single(SigningKey::new([7u8; 32]).unwrap())
}

/// With `SameKeyConflict::Fail`, a commit that meets another request's change of the same
/// value fails with `ConcurrentModification`: a conflict between requests, as the
/// configuration asked, not a misuse of the library. Yet `session_errors_total` files it under
/// `kind="misuse"` (the catch-all arm of `session_error_kind`), and `session_replays_total`
/// counts a replay that was refused (the counter moves before `replay_onto` runs).
#[test]
fn a_refused_same_key_conflict_is_neither_misuse_nor_a_replay() {
    let values = recorded(async {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::builder().build());
        let config = SessionConfig::new(keys()).same_key_conflicts(SameKeyConflict::Fail);
        let manager = SessionManager::new(store, config).unwrap();
        let mut session = manager.load(None).await.unwrap();
        session.insert("theme", "light").unwrap();
        let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;

        let mut a = manager.load(Some(&cookie)).await.unwrap();
        let mut b = manager.load(Some(&cookie)).await.unwrap();
        a.insert("theme", "dark").unwrap();
        b.insert("theme", "blue").unwrap();
        manager.commit(a).await.unwrap();
        let refused = manager.commit(b).await.unwrap_err();
        assert!(
            matches!(refused, SessionError::ConcurrentModification { .. }),
            "{refused:?}"
        );
    });
    let counter = |series: &str| values.get(series).copied().unwrap_or(0);
    let misuse = counter(&format!("{ERRORS}{{kind=misuse}}"));
    let replays = counter(REPLAYS);
    assert!(
        misuse == 0 && replays == 0,
        "a configured same-key conflict counted as misuse {misuse} time(s), and the refused \
         replay counted as {replays} replay(s): {values:#?}"
    );
}

/// A store whose loads fail (a Redis or memcached outage) while `failing` is set.
struct FailingLoads {
    inner: MemoryStore,
    failing: AtomicBool,
}

#[async_trait::async_trait]
impl SessionStore for FailingLoads {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.inner.create(k, r, t).await
    }
    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(StoreError::Timeout {
                operation: "load",
                after: Duration::from_millis(1),
            });
        }
        self.inner.load_entry(key).await
    }
    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        Ok(self
            .load_entry(key)
            .await?
            .and_then(StoredEntry::into_session))
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
        k: &StorageKey,
        v: Version,
        to: &StorageKey,
        t: Duration,
    ) -> Result<(), StoreError> {
        self.inner.mark_moved(k, v, to, t).await
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
}

/// During a store outage every request with a cookie fails its load, and
/// `session_loads_total` stops moving: the dashboard's "loads per second" falls to zero as if
/// traffic had stopped, and there is no load count to divide the failures by (the errors
/// counter mixes in commits' store calls). A failed load should be counted too (say
/// `result="error"`).
#[test]
fn a_failed_load_is_counted_among_the_loads() {
    let values = recorded(async {
        let store = Arc::new(FailingLoads {
            inner: MemoryStore::builder().build(),
            failing: AtomicBool::new(false),
        });
        let manager = SessionManager::new(store.clone(), SessionConfig::new(keys())).unwrap();
        let mut session = manager.load(None).await.unwrap();
        session.insert("user", "alice").unwrap();
        let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;
        store.failing.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            manager.load(Some(&cookie)).await.unwrap_err();
        }
    });
    let loads: u64 = values
        .iter()
        .filter(|(series, _)| series.starts_with(LOADS))
        .map(|(_, count)| count)
        .sum();
    assert_eq!(
        loads, 4,
        "one load without a cookie and three failed loads, but session_loads_total shows \
         {loads}: {values:#?}"
    );
}
