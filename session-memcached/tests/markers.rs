//! Moved markers on a real memcached: a touch does not stretch a marker past its TTL, a server
//! pause during a login's mark does not lose the session, and neither does a stall across the
//! mark and its re-read. Each began as a finding of an adversarial review of the moved-marker
//! change and failed on the code it was written against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use session_conformance::faults::{MarkHook, MarkHooked};
use session_conformance::harness::{ServerKind, ServerProcess};
use std::time::SystemTime;

use session_core::{
    CommitStatus, KeyPrefix, KeyRing, Record, Session, SessionConfig, SessionId, SessionManager,
    SessionStore, SigningKey, StorageKey, StoreError, StoredEntry, Version,
};
use session_memcached::{MemcachedConfig, MemcachedStore};

/// `SessionConfig::moved_marker_ttl` says how long the marker an id cycle leaves under the
/// old key lives (here one second). A request that loaded the session before the cycle and
/// commits after it, unchanged but due for a touch, sends `mg <old key> T<idle>`, which
/// memcached applies to the marker too; the store must give the marker back its own expiry,
/// or the revoked id's marker lasts the idle timeout.
#[tokio::test]
async fn a_touch_does_not_stretch_a_marker_past_its_ttl() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let store = MemcachedStore::connect(MemcachedConfig::new([server.address()]))
        .await
        .unwrap();
    let keys = KeyRing::single(SigningKey::new([3u8; 32]).unwrap());
    let config = SessionConfig::new(keys.clone())
        .idle_timeout(Duration::from_secs(600))
        .moved_marker_ttl(Duration::from_secs(1));
    let manager = SessionManager::new(Arc::new(store.clone()), config).unwrap();

    // A session idle for most of its timeout: 100 s of 600 s left, below the default touch
    // threshold (half the idle timeout), so an unchanged request touches it.
    let id = SessionId::generate().unwrap();
    let old_key = StorageKey::derive(&KeyPrefix::default(), &id);
    let mut record = Record::new(SystemTime::now());
    record.set_value("user", session_core::codec::encode_value("alice").unwrap());
    store
        .create(&old_key, &record, Duration::from_secs(100))
        .await
        .unwrap();
    let cookie = keys.sign("session", &id);

    // A read-only request loads the session; a login cycles it; the read-only request then
    // commits (a touch, which finds the marker).
    let reader = manager.load(Some(&cookie)).await.unwrap();
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.cycle_id();
    assert_eq!(
        manager.commit(login).await.unwrap().status,
        CommitStatus::Cycled
    );
    assert_eq!(
        manager.commit(reader).await.unwrap().status,
        CommitStatus::Ended
    );

    // The marker was to live one second (memcached may keep it up to two more).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let entry = store.load_entry(&old_key).await.unwrap();
    assert!(
        entry.is_none(),
        "the marker outlived moved_marker_ttl (1 s) by far: still a marker after 4 s: {:?}",
        entry.map(|e| matches!(e, StoredEntry::Moved { .. }))
    );
}

/// A login about to commit on a memcached store (short timeouts) whose marks go through a
/// fault hook.
struct LoginUnderFault {
    manager: SessionManager,
    /// The store without the hook, to look at what the server holds.
    inner: MemcachedStore,
    /// The cookie of the session before the login.
    cookie: String,
    /// Its storage key.
    old_key: StorageKey,
    /// The login: loaded with `cookie`, the user set, the id to be cycled.
    login: Session,
}

/// A session holding a cart on the memcached at `address`, and a login on it, with marks sent
/// through `hook`.
async fn login_under_fault<H: MarkHook + 'static>(address: String, hook: H) -> LoginUnderFault {
    let config = MemcachedConfig::new([address])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300));
    let inner = MemcachedStore::connect(config).await.unwrap();
    let store = MarkHooked {
        inner: inner.clone(),
        hook,
    };
    let keys = KeyRing::single(SigningKey::new([3u8; 32]).unwrap());
    let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys.clone())).unwrap();
    let mut session = manager.load(None).await.unwrap();
    session.insert("cart", "tea").unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;
    let old_key = StorageKey::derive(
        &KeyPrefix::default(),
        keys.verify("session", &cookie).unwrap().id(),
    );
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    login.insert("user", "alice").unwrap();
    login.cycle_id();
    LoginUnderFault {
        manager,
        inner,
        cookie,
        old_key,
        login,
    }
}

/// A mark hook whose `mark_moved` runs while the memcached server is paused (SIGSTOP, as the
/// project's own fault tests do), so the client times out with the request already in the
/// server's socket buffer; the server is resumed once the client has given up.
#[derive(Clone)]
struct PausedDuringMark {
    server: Arc<ServerProcess>,
}

#[async_trait]
impl MarkHook for PausedDuringMark {
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.server.pause();
        let result = inner.mark_moved(key, version, to, ttl).await;
        self.server.resume();
        // Let the server work through what it had buffered before the next call.
        tokio::time::sleep(Duration::from_millis(200)).await;
        result
    }
}

/// A memcached pause during a login's `mark_moved` (the fault the fault tests inject) times the
/// mark out on the client while the request sits in the server's socket buffer, and the
/// server, once resumed, applies it. The cycle must not delete the new entry the marker points
/// at (that would lose the session, cart and all, to a transient stall): the manager reads the
/// old key to tell whether the mark landed, and keeps the new entry while it may.
#[tokio::test]
async fn a_server_stall_during_a_login_mark_does_not_lose_the_session() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let hook = PausedDuringMark {
        server: Arc::new(server),
    };
    let address = hook.server.address();
    let LoginUnderFault {
        manager,
        inner,
        old_key,
        login,
        ..
    } = login_under_fault(address, hook).await;
    // Either the manager saw its marker once the server was back (the cycle is done), or it
    // could not tell (an error, with the new entry kept); never a lost session.
    let committed = manager.commit(login).await;
    if let Ok(outcome) = &committed {
        assert_eq!(outcome.status, CommitStatus::Cycled, "{committed:?}");
    }

    let session = match inner.load_entry(&old_key).await.unwrap() {
        Some(StoredEntry::Moved { to }) => inner.load(&to).await.unwrap(),
        Some(StoredEntry::Session(loaded)) => Some(loaded),
        None => None,
    };
    assert!(
        session.is_some(),
        "after a failed login the session (with its cart) is gone: the old key is {:?}",
        inner.load_entry(&old_key).await.unwrap().map(|e| match e {
            StoredEntry::Moved { .. } => "a marker pointing at a deleted entry",
            StoredEntry::Session(_) => "a session",
        })
    );
}

/// A mark hook that stops the memcached server (SIGSTOP, as the project's fault tests do) when the
/// first `mark_moved` is sent, and leaves it stopped: the test resumes it.
#[derive(Clone)]
struct StallFromMark {
    server: Arc<ServerProcess>,
    stalled: Arc<AtomicBool>,
}

#[async_trait]
impl MarkHook for StallFromMark {
    async fn mark_moved(
        &self,
        inner: &(dyn SessionStore + 'static),
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if !self.stalled.swap(true, Ordering::SeqCst) {
            self.server.pause();
        }
        inner.mark_moved(key, version, to, ttl).await
    }
}

/// memcached stalls just as a login sends its mark, and stays stalled longer than the
/// client's timeouts: the mark times out, and so does the re-read that would tell whether it
/// landed. When memcached resumes it applies the mark still in its socket buffer. Whatever the
/// commit answered, the cookie the browser keeps afterwards must reach the session, cart and
/// all (removing the new entry, or leaving the browser with the old id, would lose it).
#[tokio::test]
async fn a_stall_across_a_logins_mark_and_re_read_keeps_the_session_reachable() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let server = Arc::new(server);
    let hook = StallFromMark {
        server: Arc::clone(&server),
        stalled: Arc::default(),
    };
    let LoginUnderFault {
        manager,
        inner,
        cookie,
        old_key,
        login,
    } = login_under_fault(server.address(), hook).await;
    let committed = manager.commit(login).await;
    server.resume();
    let browser = match &committed {
        Ok(outcome) => outcome
            .cookie
            .as_ref()
            .map_or(cookie.clone(), |c| c.value.clone()),
        Err(_) => cookie.clone(),
    };
    // Let memcached work through what it had buffered.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old = match inner.load_entry(&old_key).await.unwrap() {
        Some(StoredEntry::Moved { .. }) => "a marker (the mark landed after the commit failed)",
        Some(StoredEntry::Session(_)) => "a session",
        None => "nothing",
    };
    let session = manager.load(Some(&browser)).await.unwrap();
    assert_eq!(
        session.get::<String>("cart").unwrap().as_deref(),
        Some("tea"),
        "after the stall the browser's cookie loads no session (commit: {:?}); the old key \
         holds {old}",
        committed.map(|o| o.status)
    );
}
