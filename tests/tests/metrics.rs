//! The manager's metrics after a scripted sequence of requests: each counter holds exactly what
//! the script did, under the store's backend label.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use session_core::observe::{
    CONFLICTS, CREATES, CYCLES, DESTROYS, ERRORS, LOADS, LOST_CHANGES, REPLAYS, SAVES,
    STORE_OPERATION_SECONDS, TOUCHES,
};
use session_core::{
    CommitStatus, KeyRing, SessionConfig, SessionError, SessionManager, SessionStore, SigningKey,
    StoreError,
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
