//! The manager's metrics after a scripted sequence of requests: each counter holds exactly what
//! the script did, under the store's backend label; failed loads and refused same-key conflicts
//! are counted as what they are.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use session_core::observe::{
    CONFLICTS, CREATES, CYCLES, DESTROYS, ERRORS, LOADS, LOST_CHANGES, REPLAYS, SAVES,
    STORE_OPERATION_SECONDS, TOUCHES,
};
use session_core::{
    CommitStatus, KeyRing, LoadedRecord, Record, SameKeyConflict, SessionConfig, SessionError,
    SessionManager, SessionStore, SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::{MemoryStore, OnFull};

/// A metric's name and its labels other than `backend`, as `name{key=value,...}`.
type Series = String;

/// Runs `script` on a current-thread runtime with a recorder of its own, and gives every
/// counter and the sample count of every histogram, keyed by series; panics if a metric came
/// without `backend="memory"`.
fn recorded(script: impl std::future::Future<Output = ()>) -> BTreeMap<Series, u64> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(script));
    let mut values = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let mut labels = Vec::new();
        let mut backend = None;
        for label in key.labels() {
            if label.key() == "backend" {
                backend = Some(label.value().to_owned());
            } else {
                labels.push(format!("{}={}", label.key(), label.value()));
            }
        }
        assert_eq!(backend.as_deref(), Some("memory"), "{key:?}");
        let series = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        let value = match value {
            DebugValue::Counter(count) => count,
            DebugValue::Histogram(samples) => {
                assert!(
                    samples.iter().all(|s| s.into_inner() >= 0.0),
                    "{series}: {samples:?}"
                );
                samples.len() as u64
            }
            DebugValue::Gauge(_) => panic!("no gauge is documented: {series}"),
        };
        values.insert(series, value);
    }
    values
}

fn manager(
    store: Arc<dyn SessionStore>,
    idle: Duration,
    touch_threshold: Duration,
) -> SessionManager {
    let keys = KeyRing::single(SigningKey::new([7u8; 32]).unwrap());
    let config = SessionConfig::new(keys)
        .idle_timeout(idle)
        .touch_threshold(touch_threshold);
    SessionManager::new(store, config).unwrap()
}

#[test]
fn counters_match_a_scripted_sequence() {
    let values = recorded(async {
        // Room for two entries at most, refusing more, so the script can fill the store.
        let store: Arc<dyn SessionStore> = Arc::new(
            MemoryStore::builder()
                .shards(1)
                .max_sessions(2)
                .on_full(OnFull::Reject)
                .build(),
        );
        let manager = manager(
            store.clone(),
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        // A manager whose touches are always due (its idle timeout is longer than what a
        // session made by the first one has left).
        let toucher = manager_with_due_touches(store.clone());

        // No cookie; a new session is created (load: no_cookie; create).
        let mut session = manager.load(None).await.unwrap();
        session.insert("user", "alice").unwrap();
        let outcome = manager.commit(session).await.unwrap();
        assert_eq!(outcome.status, CommitStatus::Created);
        let cookie = outcome.cookie.unwrap().value;

        // A hit, unchanged and not due: a skipped touch.
        let session = manager.load(Some(&cookie)).await.unwrap();
        assert_eq!(
            manager.commit(session).await.unwrap().status,
            CommitStatus::Unchanged
        );

        // A hit, unchanged and due: a touch done.
        let session = toucher.load(Some(&cookie)).await.unwrap();
        assert_eq!(
            toucher.commit(session).await.unwrap().status,
            CommitStatus::Touched
        );

        // A cookie that does not verify.
        let session = manager.load(Some("not-a-signed-cookie")).await.unwrap();
        assert!(session.is_new());

        // Two requests change the session at once: one save, one conflict replayed and saved.
        let mut a = manager.load(Some(&cookie)).await.unwrap();
        let mut b = manager.load(Some(&cookie)).await.unwrap();
        a.insert("a", &1).unwrap();
        b.insert("b", &2).unwrap();
        assert_eq!(manager.commit(a).await.unwrap().status, CommitStatus::Saved);
        assert_eq!(manager.commit(b).await.unwrap().status, CommitStatus::Saved);

        // An id cycle; the old cookie then names a moved session.
        let mut session = manager.load(Some(&cookie)).await.unwrap();
        session.cycle_id();
        let outcome = manager.commit(session).await.unwrap();
        assert_eq!(outcome.status, CommitStatus::Cycled);
        let cycled = outcome.cookie.unwrap().value;
        manager.load(Some(&cookie)).await.unwrap();

        // The store now holds the marker and the session: a new session finds it full.
        let mut session = manager.load(None).await.unwrap();
        session.insert("user", "bob").unwrap();
        let refused = manager.commit(session).await.unwrap_err();
        assert!(
            matches!(refused, SessionError::Store(StoreError::Full)),
            "{refused:?}"
        );

        // A request changes the session while another logs out: its changes are lost.
        let mut late = manager.load(Some(&cycled)).await.unwrap();
        let mut logout = manager.load(Some(&cycled)).await.unwrap();
        logout.destroy();
        assert_eq!(
            manager.commit(logout).await.unwrap().status,
            CommitStatus::Destroyed
        );
        late.insert("late", &3).unwrap();
        let outcome = manager.commit(late).await.unwrap();
        assert_eq!(outcome.status, CommitStatus::Ended);
        assert!(outcome.lost_changes);

        // The logged-out cookie: its session is gone.
        assert!(manager.load(Some(&cycled)).await.unwrap().is_new());
    });

    let counter = |series: &str| values.get(series).copied().unwrap_or(0);
    let loads = |result: &str| counter(&format!("{LOADS}{{result={result}}}"));
    assert_eq!(loads("no_cookie"), 2, "{values:#?}");
    assert_eq!(loads("bad_cookie"), 1, "{values:#?}");
    // Unchanged, touched, a, b, the cycle, the logout and the late request.
    assert_eq!(loads("hit"), 7, "{values:#?}");
    assert_eq!(loads("moved"), 1, "{values:#?}");
    assert_eq!(loads("miss"), 1, "{values:#?}");
    assert_eq!(loads("expired"), 0, "{values:#?}");
    assert_eq!(counter(CREATES), 1, "{values:#?}");
    assert_eq!(counter(SAVES), 2, "{values:#?}");
    assert_eq!(
        counter(&format!("{CONFLICTS}{{operation=save}}")),
        1,
        "{values:#?}"
    );
    assert_eq!(counter(REPLAYS), 1, "{values:#?}");
    assert_eq!(
        counter(&format!("{TOUCHES}{{result=skipped}}")),
        1,
        "{values:#?}"
    );
    assert_eq!(
        counter(&format!("{TOUCHES}{{result=done}}")),
        1,
        "{values:#?}"
    );
    assert_eq!(
        counter(&format!("{CYCLES}{{result=confirmed}}")),
        1,
        "{values:#?}"
    );
    assert_eq!(counter(DESTROYS), 1, "{values:#?}");
    assert_eq!(
        counter(&format!("{LOST_CHANGES}{{status=ended}}")),
        1,
        "{values:#?}"
    );
    assert_eq!(counter(&format!("{ERRORS}{{kind=full}}")), 1, "{values:#?}");
    // Every store call has a latency sample: 9 loads that reached the store and one more by
    // the conflict's replay; creates: the first session, the cycle's new entry, the refused one;
    // saves: a, b twice, the late one; marks: the cycle's; deletes: the logout; touches: one.
    let latency = |operation: &str| {
        counter(&format!(
            "{STORE_OPERATION_SECONDS}{{operation={operation}}}"
        ))
    };
    assert_eq!(latency("load"), 10, "{values:#?}");
    assert_eq!(latency("create"), 3, "{values:#?}");
    assert_eq!(latency("save"), 4, "{values:#?}");
    assert_eq!(latency("mark_moved"), 1, "{values:#?}");
    assert_eq!(latency("delete_if_version"), 1, "{values:#?}");
    assert_eq!(latency("touch"), 1, "{values:#?}");
}

fn manager_with_due_touches(store: Arc<dyn SessionStore>) -> SessionManager {
    manager(store, Duration::from_secs(120), Duration::from_secs(120))
}

fn keys() -> KeyRing {
    KeyRing::single(SigningKey::new([7u8; 32]).unwrap())
}

/// With `SameKeyConflict::Fail`, a commit that meets another request's change of the same
/// value fails with `ConcurrentModification`: a conflict between requests, as the
/// configuration asked, counted as `kind="same_key_conflict"`, not as a misuse, and the refused
/// replay is no replay.
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
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}

/// During a store outage every request with a cookie fails its load: those loads are counted
/// (`result="error"`), so the load rate does not fall to zero as if traffic had stopped, and
/// failures can be divided by loads.
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
