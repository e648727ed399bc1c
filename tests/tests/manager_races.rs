//! The manager under races and faults that the interleaving harness does not model: marks
//! whose reply is lost or that arrive late, a mark beaten while unanswered, `clear` before
//! `update`, lost cookie refreshes, a revoked pre-login id, a panicking update, inserts of the
//! loaded value, a failed marker cleanup, a marker in a full memory store. Each test began as
//! a finding of one of the two adversarial reviews of the moved-marker change and failed on
//! the code it was written against.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use session_conformance::faults::{MarkHook, MarkHooked};
use session_core::{
    CommitStatus, KeyPrefix, KeyRing, Record, SameKeyConflict, Session, SessionConfig,
    SessionError, SessionManager, SessionStore, SigningKey, StorageKey, StoreError, StoredEntry,
    Version,
};
use session_memory::MemoryStore;
use tokio::sync::Notify;

fn keys() -> KeyRing {
    KeyRing::single(SigningKey::new([9u8; 32]).unwrap())
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

/// A login on the session of `cookie`: loaded, the user set, the id to be cycled on commit.
async fn login(manager: &SessionManager, cookie: &str) -> Session {
    let mut login = manager.load(Some(cookie)).await.unwrap();
    login.insert("user", "alice").unwrap();
    login.cycle_id();
    login
}

/// Creates a session holding `name` = `value` and returns its cookie value.
async fn created<T: Serialize + ?Sized>(manager: &SessionManager, name: &str, value: &T) -> String {
    let mut session = manager.load(None).await.unwrap();
    session.insert(name, value).unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    outcome.cookie.unwrap().value
}

/// A mark hook whose next `mark_moved`, once armed, is applied but answered with a timeout
/// (the reply was lost on the network, or arrived after the client's deadline). Between
/// applying it and answering, it signals `applied` and waits for `release`, so that a test
/// can run other requests while the cycling request waits for its answer.
#[derive(Clone, Default)]
struct LostMarkReply {
    armed: Arc<AtomicBool>,
    applied: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait]
impl MarkHook for LostMarkReply {
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let result = inner.mark_moved(key, version, to, ttl).await;
        if result.is_ok() && self.armed.swap(false, Ordering::SeqCst) {
            self.applied.notify_one();
            self.release.notified().await;
            return Err(StoreError::Timeout {
                operation: "mark_moved",
                after: Duration::from_secs(1),
            });
        }
        result
    }
}

/// An id cycle whose `mark_moved` was applied but whose reply was lost (a timeout: the
/// ambiguous outcome every networked store has) must not delete the new entry: the old entry
/// already points at it, and a concurrent request may have followed the marker and saved
/// there (acknowledged as `Followed`). The manager reads the old key to tell, finds its own
/// marker, and reports the cycle done.
#[tokio::test]
async fn a_mark_applied_but_unanswered_keeps_the_session_and_a_followed_save() {
    let store = MarkHooked {
        inner: MemoryStore::new(),
        hook: LostMarkReply::default(),
    };
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "visits", &1u32).await;

    // A request that loaded the session before the login, and saves after it.
    let mut follower = manager.load(Some(&cookie)).await.unwrap();
    follower.insert("cart", &7u32).unwrap();
    // The login.
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.insert("user", &42u32).unwrap();
    login.cycle_id();
    store.hook.armed.store(true, Ordering::SeqCst);
    let cycling = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.commit(login).await })
    };
    store.hook.applied.notified().await;

    let followed = manager.commit(follower).await.unwrap();
    assert_eq!(
        followed.status,
        CommitStatus::Followed,
        "the follower's change was acknowledged as saved under the new id"
    );
    store.hook.release.notify_one();
    let login = cycling
        .await
        .unwrap()
        .expect("the mark landed, so the cycle is done");
    assert_eq!(login.status, CommitStatus::Cycled);
    let new_cookie = login.cookie.expect("the new id's cookie").value;

    // Where is the session now? The old key is a marker; follow it.
    let old = storage_key(&cookie);
    let Some(StoredEntry::Moved { to }) = store.inner.load_entry(&old).await.unwrap() else {
        panic!("the mark was applied, so the old key holds a marker");
    };
    assert_eq!(to, storage_key(&new_cookie));
    let live = store.inner.load(&to).await.unwrap();
    let live = live.expect("the session was deleted by a lost reply");
    assert!(
        live.record.value("cart").is_some(),
        "the follower's acknowledged cart is lost"
    );
    assert!(live.record.value("user").is_some());
}

/// `clear()` followed by `update()` of a value that did not exist when the request loaded
/// replays as a clear: the update runs on nothing, not on the concurrent request's value.
/// Request R clears the session and counts `cart` up from nothing (it computes 1); request S
/// sets `cart` = 5 meanwhile and commits first. Either serial order gives 1 (S then R) or 5
/// (R then S); a replay starting from S's value would store 6.
#[tokio::test]
async fn clear_then_update_of_a_new_value_replays_from_nothing() {
    let manager = manager_on(MemoryStore::new(), SessionConfig::new(keys()));
    let cookie = created(&manager, "a", &1u32).await;

    let mut r = manager.load(Some(&cookie)).await.unwrap();
    r.clear();
    let computed = r
        .update("cart", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    assert_eq!(computed, 1);

    let mut s = manager.load(Some(&cookie)).await.unwrap();
    s.insert("cart", &5u32).unwrap();
    assert_eq!(manager.commit(s).await.unwrap().status, CommitStatus::Saved);
    assert_eq!(manager.commit(r).await.unwrap().status, CommitStatus::Saved);

    let stored = manager.load(Some(&cookie)).await.unwrap();
    let cart = stored.get::<u32>("cart").unwrap();
    assert!(
        matches!(cart, Some(1 | 5)),
        "cart is {cart:?}: not the result of any serial order of the two requests (1 or 5)"
    );
}

/// The same under `SameKeyConflict::Fail`: a concurrent addition to a value this request
/// cleared and then updated is a `ConcurrentModification`, not a silent mix of the two.
#[tokio::test]
async fn clear_then_update_of_a_new_value_conflicts_under_fail() {
    let config = SessionConfig::new(keys()).same_key_conflicts(SameKeyConflict::Fail);
    let manager = manager_on(MemoryStore::new(), config);
    let cookie = created(&manager, "a", &1u32).await;

    let mut r = manager.load(Some(&cookie)).await.unwrap();
    r.clear();
    r.update("cart", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    let mut s = manager.load(Some(&cookie)).await.unwrap();
    s.insert("cart", &5u32).unwrap();
    manager.commit(s).await.unwrap();

    let committed = manager.commit(r).await;
    let cart = manager
        .load(Some(&cookie))
        .await
        .unwrap()
        .get::<u32>("cart")
        .unwrap();
    assert!(
        matches!(committed, Err(SessionError::ConcurrentModification { .. })) || cart != Some(6),
        "committed {:?} and stored cart = {cart:?}",
        committed.map(|o| o.status)
    );
}

/// The cookie's `Max-Age` is refreshed only by the response whose save or touch pushes the
/// expiry back. If that response never reaches the browser (the client hung up: the layer
/// still commits, by design; a cancelled navigation; a dropped connection), the cookie must
/// still last until the next refresh, or an active user is logged out by the browser while the
/// server session lives: `Max-Age` has the time between refreshes added for that. Here: idle
/// 4 s, default threshold 2 s, a request every 200 ms, every other one a save; the first
/// refreshing response is lost.
#[tokio::test]
async fn one_lost_refresh_does_not_make_an_active_browser_drop_its_cookie() {
    let config = SessionConfig::new(keys()).idle_timeout(Duration::from_secs(4));
    let manager = manager_on(MemoryStore::new(), config);
    let mut session = manager.load(None).await.unwrap();
    session.insert("n", &0u32).unwrap();
    let created = manager.commit(session).await.unwrap().cookie.unwrap();
    let cookie = created.value;
    let mut cookie_expires = Instant::now() + created.max_age.unwrap();
    let mut lost_one = false;
    let start = Instant::now();
    let mut round = 0u32;
    while start.elapsed() < Duration::from_secs(7) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        round += 1;
        assert!(
            Instant::now() < cookie_expires,
            "the browser dropped its cookie after {:?} of activity (one refresh was lost), \
             while the server session is still live: {}",
            start.elapsed(),
            !manager.load(Some(&cookie)).await.unwrap().is_new()
        );
        let mut session = manager.load(Some(&cookie)).await.unwrap();
        assert!(!session.is_new(), "the server session ended");
        if round.is_multiple_of(2) {
            session.insert("n", &round).unwrap();
        }
        let outcome = manager.commit(session).await.unwrap();
        if let Some(directive) = outcome.cookie {
            if !lost_one {
                // This response never reaches the browser.
                lost_one = true;
                continue;
            }
            cookie_expires = Instant::now() + directive.max_age.unwrap();
        }
    }
    assert!(lost_one, "no refresh happened at all");
}

/// The pre-login id, which cycling revokes (session fixation: an attacker may know it), has
/// no power over the post-login session: an attacker who planted cookie A and sends a logout
/// with A after the victim logged in (A moved to B) only clears its own cookie; B lives on.
/// (Only a request that loaded the session before the move, as the user's own requests in
/// flight do, follows the marker.)
#[tokio::test]
async fn the_revoked_pre_login_id_cannot_log_the_victim_out() {
    let manager = manager_on(MemoryStore::new(), SessionConfig::new(keys()));
    // The attacker's session, planted in the victim's browser.
    let fixated = created(&manager, "visits", &1u32).await;

    // The victim logs in: the id is cycled.
    let mut login = manager.load(Some(&fixated)).await.unwrap();
    login.insert("user", &42u32).unwrap();
    login.cycle_id();
    let outcome = manager.commit(login).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Cycled);
    let victim = outcome.cookie.unwrap().value;

    // The attacker, with the old (revoked) id, probes, then sends a logout.
    let mut probe = manager.load(Some(&fixated)).await.unwrap();
    probe.insert("probe", &1u32).unwrap();
    assert!(
        manager.commit(probe).await.unwrap().lost_changes,
        "the login is observable"
    );
    let mut logout = manager.load(Some(&fixated)).await.unwrap();
    logout.destroy();
    manager.commit(logout).await.unwrap();

    let session = manager.load(Some(&victim)).await.unwrap();
    assert!(
        !session.is_new(),
        "the victim's post-login session was ended by the revoked pre-login id"
    );
}

/// An update closure that panics when it is re-run on the newer value during an id cycle's
/// carry-over (e.g. `n.expect(..)` after a concurrent request removed `n`) unwinds out of the
/// commit after the new entry was created: the entry must be removed on the way, not left
/// orphaned (unreachable, kept for the whole idle timeout).
#[tokio::test]
async fn a_panicking_update_during_a_cycles_carry_over_leaves_no_orphan() {
    let store = MemoryStore::new();
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "n", &1u32).await;
    assert_eq!(store.len(), 1);

    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login
        .update("n", |n: Option<u32>| n.expect("n is set") + 1)
        .unwrap();
    login.cycle_id();
    let mut other = manager.load(Some(&cookie)).await.unwrap();
    assert!(other.remove("n"));
    manager.commit(other).await.unwrap();

    let committed = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.commit(login).await }).await
    };
    assert!(committed.is_err(), "the update panicked on replay");
    assert_eq!(
        store.len(),
        1,
        "an entry of the failed cycle is left behind beside the session"
    );
}

/// An `insert` of the value the request loaded writes nothing by itself, but when the request
/// writes anyway it counts as this request's value: a concurrent request changed it to "dark"
/// and committed first, so under `SameKeyConflict::LastWriterWins` the request that commits
/// last wins ("light"), and under `Fail` the commit reports the conflict. A request whose only
/// change is such an insert writes nothing (it reads as if it ran first).
#[tokio::test]
async fn the_last_writer_wins_even_when_it_sets_the_value_it_loaded() {
    for policy in [SameKeyConflict::LastWriterWins, SameKeyConflict::Fail] {
        let config = SessionConfig::new(keys()).same_key_conflicts(policy);
        let manager = manager_on(MemoryStore::new(), config);
        let mut session = manager.load(None).await.unwrap();
        session.insert("theme", "light").unwrap();
        let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;

        let mut last = manager.load(Some(&cookie)).await.unwrap();
        let mut first = manager.load(Some(&cookie)).await.unwrap();
        first.insert("theme", "dark").unwrap();
        manager.commit(first).await.unwrap();
        last.insert("theme", "light").unwrap();
        assert!(
            !last.is_modified(),
            "setting the loaded value writes nothing by itself"
        );
        last.insert("visits", &1u32).unwrap();
        let committed = manager.commit(last).await;

        let theme = manager
            .load(Some(&cookie))
            .await
            .unwrap()
            .get::<String>("theme")
            .unwrap();
        match policy {
            SameKeyConflict::LastWriterWins => {
                assert_eq!(committed.unwrap().status, CommitStatus::Saved);
                assert_eq!(
                    theme.as_deref(),
                    Some("light"),
                    "the last writer did not win"
                );
            }
            _ => {
                assert!(
                    matches!(committed, Err(SessionError::ConcurrentModification { ref name }) if name == "theme"),
                    "{committed:?}"
                );
                assert_eq!(theme.as_deref(), Some("dark"), "a failed commit wrote");
            }
        }
    }
}

/// A logout that had to follow a move (it loaded the session before a concurrent login
/// cycled it) deletes the session where it went, then the markers it passed; a failure of
/// that last, optional step (the markers expire by themselves) must not fail a logout that
/// happened (a 500 with no removal cookie).
#[tokio::test]
async fn a_failed_marker_cleanup_does_not_fail_a_logout_that_happened() {
    use session_conformance::recording::RecordingStore;
    let store = RecordingStore::new(MemoryStore::new());
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "user", &42u32).await;

    let mut logout = manager.load(Some(&cookie)).await.unwrap();
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.cycle_id();
    let new_cookie = manager.commit(login).await.unwrap().cookie.unwrap().value;

    logout.destroy();
    store.fail_next_deletes.store(1, Ordering::SeqCst);
    let committed = manager.commit(logout).await;
    let ended = manager.load(Some(&new_cookie)).await.unwrap().is_new();
    assert!(ended, "the logout did end the session");
    assert!(
        matches!(committed, Ok(ref outcome) if outcome.status == CommitStatus::Destroyed),
        "the logout ended the session but reports {committed:?}"
    );
}

/// A mark that was sent but not yet applied: the server still has it (in its socket buffer,
/// or in a TCP retransmission queue) and applies it later.
type PendingMark = (StorageKey, Version, StorageKey, Duration);

/// A mark hook whose next `armed` marks go unanswered *without having been applied yet*:
/// each is kept as pending and answered with a timeout, as a client does when the server (or
/// the path to it) stalls; [`DelayedMarks::land`] applies them later, as the server does once
/// it gets to them. With `hold` set, an intercepted mark first signals `reached` and waits for
/// `release`, so that a test can run another request while the mark is unanswered.
#[derive(Clone)]
struct DelayedMarks {
    armed: Arc<AtomicUsize>,
    pending: Arc<Mutex<Vec<PendingMark>>>,
    hold: bool,
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

/// A memory store whose marks go through [`DelayedMarks`].
fn delayed_marks(armed: usize, hold: bool) -> MarkHooked<MemoryStore, DelayedMarks> {
    MarkHooked {
        inner: MemoryStore::new(),
        hook: DelayedMarks {
            armed: Arc::new(AtomicUsize::new(armed)),
            pending: Arc::default(),
            hold,
            reached: Arc::default(),
            release: Arc::default(),
        },
    }
}

impl DelayedMarks {
    /// The server gets to the marks it was sent: applies each to `store` (the first that still
    /// matches lands, the others conflict).
    async fn land(&self, store: &MemoryStore) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut landed = 0;
        for (key, version, to, ttl) in pending {
            if store.mark_moved(&key, version, &to, ttl).await.is_ok() {
                landed += 1;
            }
        }
        landed
    }
}

#[async_trait]
impl MarkHook for DelayedMarks {
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
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
            return inner.mark_moved(key, version, to, ttl).await;
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
    let store = delayed_marks(3, false);
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "cart", "tea").await;

    let login = login(&manager, &cookie).await;
    let committed = manager.commit(login).await;
    assert!(committed.is_err(), "every mark timed out: {committed:?}");
    assert_eq!(
        store.hook.land(&store.inner).await,
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
    let store = delayed_marks(2, false);
    let config = SessionConfig::new(keys()).max_conflict_retries(2);
    let manager = manager_on(store.clone(), config);
    let cookie = created(&manager, "cart", "tea").await;

    let login = login(&manager, &cookie).await;
    let committed = manager.commit(login).await;
    assert!(committed.is_err(), "both marks timed out");
    let error = committed.unwrap_err();
    assert_eq!(
        store.hook.land(&store.inner).await,
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
    let store = delayed_marks(1, true);
    let manager = manager_on(store.clone(), SessionConfig::new(keys()));
    let cookie = created(&manager, "cart", "tea").await;

    let second = login(&manager, &cookie).await;
    let first = login(&manager, &cookie).await;

    let pending = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.commit(second).await })
    };
    store.hook.reached.notified().await;
    assert_eq!(
        manager.commit(first).await.unwrap().status,
        CommitStatus::Cycled
    );
    store.hook.release.notify_one();
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
