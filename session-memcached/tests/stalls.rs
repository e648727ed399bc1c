//! A real memcached stalled (SIGSTOP) across a login's mark and its re-read. Began as a
//! finding of the second adversarial review and failed on the code it was written against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use session_conformance::faults::{MarkHook, MarkHooked};
use session_conformance::harness::{ServerKind, ServerProcess};
use session_core::{
    KeyPrefix, KeyRing, SessionConfig, SessionManager, SessionStore, SigningKey, StorageKey,
    StoreError, StoredEntry, Version,
};
use session_memcached::{MemcachedConfig, MemcachedStore};

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
    let config = MemcachedConfig::new([server.address()])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300));
    let inner = MemcachedStore::connect(config).await.unwrap();
    let store = MarkHooked {
        inner: inner.clone(),
        hook: StallFromMark {
            server: Arc::clone(&server),
            stalled: Arc::default(),
        },
    };
    let keys = KeyRing::single(SigningKey::new([13u8; 32]).unwrap());
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
