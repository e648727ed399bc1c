//! The manager under faults and corner cases: marks that arrive late, a mark beaten while
//! unanswered, an insert of the loaded value before an update, a refresh lost just before the
//! expiry, a marker evicted from a full memory store. Each test began as a finding of the
//! second adversarial review and failed on the code it was written against.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use session_core::{
    CommitStatus, KeyPrefix, KeyRing, Record, SessionConfig, SessionManager, SessionStore,
    SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::MemoryStore;
use tokio::sync::Notify;

fn keys() -> KeyRing {
    KeyRing::single(SigningKey::new([11u8; 32]).unwrap())
}

fn manager_on<S: SessionStore + 'static>(store: S, config: SessionConfig) -> SessionManager {
    SessionManager::new(Arc::new(store), config).unwrap()
}

/// The storage key a cookie value names.
fn storage_key(cookie: &str) -> StorageKey {
    let verified = keys()
        .verify("session", cookie)
        .expect("a cookie we signed");
    StorageKey::derive(&KeyPrefix::default(), verified.id())
}

/// Creates a session holding `name` = `value` and returns its cookie value.
async fn created(manager: &SessionManager, name: &str, value: &str) -> String {
    let mut session = manager.load(None).await.unwrap();
    session.insert(name, value).unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    outcome.cookie.unwrap().value
}

/// A mark that was sent but not yet applied: the server still has it (in its socket buffer,
/// or in a TCP retransmission queue) and applies it later.
type PendingMark = (StorageKey, Version, StorageKey, Duration);

/// A memory store whose next `armed` marks go unanswered *without having been applied yet*:
/// each is kept as pending and answered with a timeout, as a client does when the server (or
/// the path to it) stalls; [`DelayedMarks::land`] applies them later, as the server does once
/// it gets to them. With `hold` set, an intercepted mark first signals `reached` and waits for
/// `release`, so that a test can run another request while the mark is unanswered.
#[derive(Clone)]
struct DelayedMarks {
    inner: MemoryStore,
    armed: Arc<AtomicUsize>,
    pending: Arc<Mutex<Vec<PendingMark>>>,
    hold: bool,
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

impl DelayedMarks {
    fn new(armed: usize, hold: bool) -> Self {
        Self {
            inner: MemoryStore::new(),
            armed: Arc::new(AtomicUsize::new(armed)),
            pending: Arc::default(),
            hold,
            reached: Arc::default(),
            release: Arc::default(),
        }
    }

    /// The server gets to the marks it was sent: applies each (the first that still matches
    /// lands, the others conflict).
    async fn land(&self) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut landed = 0;
        for (key, version, to, ttl) in pending {
            if self.inner.mark_moved(&key, version, &to, ttl).await.is_ok() {
                landed += 1;
            }
        }
        landed
    }
}

#[async_trait]
impl SessionStore for DelayedMarks {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.inner.create(k, r, t).await
    }
    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.inner.load_entry(key).await
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
        let intercept = self
            .armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !intercept {
            return self.inner.mark_moved(key, version, to, ttl).await;
        }
        self.pending
            .lock()
            .unwrap()
            .push((key.clone(), version, to.clone(), ttl));
        if self.hold {
            self.reached.notify_one();
            self.release.notified().await;
        }
        Err(StoreError::Timeout {
            operation: "mark_moved",
            after: Duration::from_millis(300),
        })
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
}

/// Where the session a cookie named lives now: the session under its key, or the session its
/// marker points at; `None` when neither exists.
async fn reachable_from(store: &MemoryStore, key: &StorageKey) -> Option<Record> {
    match store.load_entry(key).await.unwrap() {
        Some(StoredEntry::Session(loaded)) => Some(loaded.record),
        Some(StoredEntry::Moved { to }) => store.load(&to).await.unwrap().map(|l| l.record),
        None => None,
    }
}

/// A login whose marks all go unanswered (the server stalled, not dead: they are only
/// delayed) gives up with an error. Before it removes the new entry it fences the old one (a
/// compare-and-set rewrite at the version the marks were sent against), so that none of them
/// can land later and move the user's session to an entry no cookie reaches: the user's cookie
/// still loads the session, cart and all.
#[tokio::test]
async fn a_login_giving_up_on_delayed_marks_fences_them_out() {
    let store = DelayedMarks::new(3, false);
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "cart", "tea").await;

    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.insert("user", "alice").unwrap();
    login.cycle_id();
    let committed = manager.commit(login).await;
    assert!(committed.is_err(), "every mark timed out: {committed:?}");
    assert_eq!(
        store.land().await,
        0,
        "a delayed mark landed past the fence"
    );

    // The browser still holds the old cookie: the failed commit set none.
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(
        session.get::<String>("cart").unwrap().as_deref(),
        Some("tea"),
        "after a failed login and a late mark, the user's cookie loads no session (is_new: {}), \
         the cart is only in an entry nobody has a cookie for",
        session.is_new()
    );
}

/// The same when the mark loop runs out of attempts (`max_conflict_retries` of 2) right after
/// an unanswered mark: the fence comes first, and the delayed marks cannot land afterwards.
#[tokio::test]
async fn running_out_of_attempts_after_an_unanswered_mark_fences_it_out() {
    let store = DelayedMarks::new(2, false);
    let config = SessionConfig::new(keys()).max_conflict_retries(2);
    let manager = manager_on(store.clone(), config);
    let cookie = created(&manager, "cart", "tea").await;

    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.insert("user", "alice").unwrap();
    login.cycle_id();
    let committed = manager.commit(login).await;
    assert!(committed.is_err(), "both marks timed out");
    let error = committed.unwrap_err();
    assert_eq!(
        store.land().await,
        0,
        "a delayed mark landed past the fence"
    );

    let session = reachable_from(&store.inner, &storage_key(&cookie)).await;
    assert!(
        session.is_some(),
        "the delayed mark landed after the cycle deleted the entry it points at: the session is \
         gone (the commit reported {error:?})"
    );
}

/// A mark goes unanswered (not applied), and while the client waits a concurrent login wins
/// the race. The re-read finds the winner's marker: this mark can never land, so the login is
/// `Superseded` (a double-submitted login the other request completed), not an error.
#[tokio::test]
async fn an_unanswered_mark_beaten_by_a_concurrent_login_is_superseded() {
    let store = DelayedMarks::new(1, true);
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "cart", "tea").await;

    let mut second = manager.load(Some(&cookie)).await.unwrap();
    second.insert("user", "alice").unwrap();
    second.cycle_id();
    let mut first = manager.load(Some(&cookie)).await.unwrap();
    first.insert("user", "alice").unwrap();
    first.cycle_id();

    let pending = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.commit(second).await })
    };
    store.reached.notified().await;
    assert_eq!(
        manager.commit(first).await.unwrap().status,
        CommitStatus::Cycled
    );
    store.release.notify_one();
    let committed = pending.await.unwrap();
    assert!(
        matches!(&committed, Ok(o) if o.status == CommitStatus::Superseded),
        "the losing login of a double submit reports {committed:?}, though the re-read showed \
         the other login won"
    );
}

/// An `insert` of the value already held changes nothing, and an `update` is computed again
/// from the newer value: together, a no-op insert followed by an update still counts a
/// concurrent request's change (the update replays on the newer value, not on the inserted one).
#[tokio::test]
async fn a_no_op_insert_before_an_update_still_counts_a_concurrent_change() {
    let manager = manager_on(MemoryStore::new(), SessionConfig::new(keys()));
    let mut session = manager.load(None).await.unwrap();
    session.insert("visits", &3u32).unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;

    // Request R re-stores the value it loaded (a handler writing back what it read), then
    // counts a visit.
    let mut r = manager.load(Some(&cookie)).await.unwrap();
    let loaded: u32 = r.get("visits").unwrap().unwrap();
    r.insert("visits", &loaded).unwrap();
    assert!(!r.is_modified(), "the insert changes nothing by itself");
    r.update("visits", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();

    // Request S counts a visit and commits first.
    let mut s = manager.load(Some(&cookie)).await.unwrap();
    s.update("visits", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    assert_eq!(manager.commit(s).await.unwrap().status, CommitStatus::Saved);
    assert_eq!(manager.commit(r).await.unwrap().status, CommitStatus::Saved);

    let visits: Option<u32> = manager
        .load(Some(&cookie))
        .await
        .unwrap()
        .get("visits")
        .unwrap();
    assert_eq!(
        visits,
        Some(5),
        "two acknowledged `update`s counted from 3, one of them lost"
    );
}

/// A refresh lost for a request that came shortly before the expiry (a user back after a
/// pause) must still leave the cookie alive until the next refresh falls due and a little
/// after: with `Max-Age` = time left + one idle timeout it lasts a whole threshold past that
/// moment. (Idle 4 s, default threshold 2 s, a request every 0.6 s.)
#[tokio::test]
async fn a_refresh_lost_near_the_expiry_does_not_drop_an_active_cookie() {
    let config = SessionConfig::new(keys()).idle_timeout(Duration::from_secs(4));
    let manager = manager_on(MemoryStore::new(), config);
    let start = tokio::time::Instant::now();
    let mut session = manager.load(None).await.unwrap();
    session.insert("n", &0u32).unwrap();
    let created = manager.commit(session).await.unwrap().cookie.unwrap();
    let cookie = created.value;
    let mut cookie_expires = Instant::now() + created.max_age.unwrap();

    // Back 0.2 s before the session expires: this request's refresh never arrives.
    tokio::time::sleep_until(start + Duration::from_millis(3800)).await;
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert!(!session.is_new());
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Touched);
    assert!(outcome.cookie.is_some(), "a refresh was sent (and lost)");

    // Then a request every 0.6 s.
    let mut at = Duration::from_millis(3800);
    while at < Duration::from_secs(9) {
        at += Duration::from_millis(600);
        tokio::time::sleep_until(start + at).await;
        let live = !manager.load(Some(&cookie)).await.unwrap().is_new();
        assert!(
            Instant::now() < cookie_expires || !live,
            "the browser dropped its cookie {at:?} after the session began, with the user \
             active every 0.6 s and the server session still live"
        );
        let session = manager.load(Some(&cookie)).await.unwrap();
        let outcome = manager.commit(session).await.unwrap();
        if let Some(directive) = outcome.cookie {
            cookie_expires = Instant::now() + directive.max_age.unwrap();
        }
    }
}

/// The memory store at its bound evicts the soonest-expiring sessions, but not moved markers
/// (which would always go first: they expire in a minute): a logout that loaded the session
/// before a concurrent login still finds the marker and ends the session where it went.
#[tokio::test]
async fn a_full_memory_store_keeps_the_marker_a_racing_logout_follows() {
    let store = MemoryStore::builder().max_sessions(4).shards(1).build();
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "user", "alice").await;

    let mut logout = manager.load(Some(&cookie)).await.unwrap();
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.cycle_id();
    let outcome = manager.commit(login).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Cycled);
    let new_cookie = outcome.cookie.unwrap().value;

    // Three new visitors fill the store (marker + new session + 3 > 4 entries).
    for n in 0..3 {
        created(&manager, "visitor", &n.to_string()).await;
    }

    logout.destroy();
    let outcome = manager.commit(logout).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Destroyed);
    let after = manager.load(Some(&new_cookie)).await.unwrap();
    assert!(
        after.is_new(),
        "the logout was acknowledged (Destroyed) and the session still loads under the new id \
         (the marker was evicted before the session)"
    );
}
