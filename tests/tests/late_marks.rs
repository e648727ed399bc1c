//! An id cycle whose own delayed mark landed, and which then cannot read the old entry, must not
//! delete the entry the mark points at (found in the review of issue 12; the code was older).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use session_conformance::faults::{MarkHook, MarkHooked};
use session_core::{
    CommitStatus, KeyPrefix, KeyRing, LoadedRecord, Record, SessionConfig, SessionManager,
    SessionStore, SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::MemoryStore;

fn keys() -> KeyRing {
    KeyRing::single(SigningKey::new([9u8; 32]).unwrap())
}

fn storage_key(cookie: &str) -> StorageKey {
    let verified = keys()
        .verify("session", cookie)
        .expect("a cookie we signed");
    StorageKey::derive(&KeyPrefix::default(), verified.id())
}

type Pending = (StorageKey, Version, StorageKey, Duration);

/// The first mark goes unanswered and is held back by the network; the server gets to it just
/// before the second mark (sent against the same version), which therefore conflicts. From
/// then on the path to the server fails loads for a moment (`fail_loads`).
#[derive(Clone, Default)]
struct LateFirstMark {
    calls: Arc<AtomicUsize>,
    held: Arc<Mutex<Option<Pending>>>,
    fail_loads: Arc<AtomicBool>,
}

#[async_trait]
impl MarkHook for LateFirstMark {
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => {
                *self.held.lock().unwrap() = Some((key.clone(), version, to.clone(), ttl));
                Err(StoreError::Timeout {
                    operation: "mark_moved",
                    after: Duration::from_millis(300),
                })
            }
            1 => {
                let (k, v, t, ttl) = self.held.lock().unwrap().take().unwrap();
                inner
                    .mark_moved(&k, v, &t, ttl)
                    .await
                    .expect("the first mark lands");
                let second = inner.mark_moved(key, version, to, ttl).await;
                self.fail_loads.store(true, Ordering::SeqCst);
                second
            }
            _ => inner.mark_moved(key, version, to, ttl).await,
        }
    }
}

/// `MarkHooked` whose loads fail while the hook says so (once).
#[derive(Clone)]
struct Store(MarkHooked<MemoryStore, LateFirstMark>);

#[async_trait]
impl SessionStore for Store {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.0.create(k, r, t).await
    }
    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        if self.0.hook.fail_loads.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Timeout {
                operation: "load",
                after: Duration::from_millis(300),
            });
        }
        self.0.load_entry(key).await
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
        self.0.save(k, r, t, v).await
    }
    async fn mark_moved(
        &self,
        k: &StorageKey,
        v: Version,
        to: &StorageKey,
        t: Duration,
    ) -> Result<(), StoreError> {
        self.0.mark_moved(k, v, to, t).await
    }
    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        self.0.touch(key, ttl).await
    }
    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.0.delete_if_version(key, version).await
    }
    fn max_record_size(&self) -> usize {
        self.0.max_record_size()
    }
    fn max_key_len(&self) -> Option<usize> {
        self.0.max_key_len()
    }
}

/// A login's first mark goes unanswered (the old entry still shows the version, so it marks
/// again); the delayed first mark lands just before the second, which conflicts; the re-read
/// that would find the landed mark (`carry_over`'s `load_latest`) fails. `commit_cycled`
/// breaks out with that error and deletes the new entry, though the old entry is now a marker
/// pointing at it: the user's cookie (the failed commit set no new one) loads nothing, and the
/// session and its cart are gone, where a fence or an "unconfirmed" outcome would have kept it.
#[tokio::test]
async fn a_login_whose_late_mark_landed_does_not_delete_the_session() {
    let store = Store(MarkHooked {
        inner: MemoryStore::new(),
        hook: LateFirstMark::default(),
    });
    let manager = SessionManager::new(Arc::new(store.clone()), SessionConfig::new(keys())).unwrap();
    let mut session = manager.load(None).await.unwrap();
    session.insert("cart", "tea").unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    let cookie = outcome.cookie.unwrap().value;

    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.insert("user", "alice").unwrap();
    login.cycle_id();
    let committed = manager.commit(login).await;
    let kept_cookie = match &committed {
        Ok(outcome) => outcome
            .cookie
            .as_ref()
            .map_or(cookie.clone(), |c| c.value.clone()),
        Err(_) => cookie.clone(),
    };

    let inner = &store.0.inner;
    let old = inner.load_entry(&storage_key(&cookie)).await.unwrap();
    let reachable = match old {
        Some(StoredEntry::Session(loaded)) => Some(loaded.record),
        Some(StoredEntry::Moved { to }) => inner.load(&to).await.unwrap().map(|l| l.record),
        None => None,
    };
    let session = manager.load(Some(&kept_cookie)).await.unwrap();
    assert!(
        reachable.is_some() && !session.is_new(),
        "the login reported {committed:?}; the old entry is {:?} and the entry it points at \
         was deleted: the cookie the browser holds loads a new, empty session (cart: {:?})",
        inner
            .load_entry(&storage_key(&cookie))
            .await
            .unwrap()
            .map(|e| matches!(e, StoredEntry::Moved { .. })),
        session.get::<String>("cart").unwrap()
    );
}
