//! The manager's request flow, observed through a store wrapper that counts and logs calls.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use session_conformance::recording::RecordingStore;
use session_core::{
    CommitStatus, ConfigError, CookieConfig, KeyRing, SameKeyConflict, SameSite, SessionConfig,
    SessionError, SessionManager, SessionStore, SigningKey, StoreError,
};
use session_memory::MemoryStore;

type Recording = RecordingStore<MemoryStore>;

fn key(byte: u8) -> SigningKey {
    SigningKey::new([byte; 32]).unwrap()
}

fn manager_with(store: &Recording, config: SessionConfig) -> SessionManager {
    SessionManager::new(Arc::new(store.clone()), config).unwrap()
}

fn manager(store: &Recording) -> SessionManager {
    manager_with(store, SessionConfig::new(KeyRing::single(key(1))))
}

/// Creates a session holding `user` = "alice" and returns its cookie value.
async fn logged_in(manager: &SessionManager) -> String {
    let mut session = manager.load(None).await.unwrap();
    session.insert("user", "alice").unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    outcome.cookie.unwrap().value
}

/// Cookie values that must never verify: derived from a valid one, or arbitrary.
fn bad_cookie(valid: String) -> impl Strategy<Value = String> {
    let len = valid.len();
    let alphabet: Vec<char> =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ é€\0"
            .chars()
            .collect();
    let v1 = valid.clone();
    let v2 = valid.clone();
    let v3 = valid.clone();
    prop_oneof![
        // Tampered: one character replaced by a different one.
        (0..len, proptest::sample::select(alphabet)).prop_filter_map("same char", move |(i, c)| {
            let original = v1.chars().nth(i).unwrap();
            (original != c).then(|| {
                let mut s: Vec<char> = v1.chars().collect();
                s[i] = c;
                s.into_iter().collect()
            })
        }),
        // Truncated.
        (0..len).prop_map(move |end| v2[..end].to_owned()),
        // Extended.
        "[ -~é]{1,20}".prop_map(move |tail| format!("{v3}{tail}")),
        // Arbitrary text, including non-ASCII and control characters.
        any::<String>(),
        // The right length and alphabet, but random.
        "[A-Za-z0-9_-]{22}\\.[A-Za-z0-9_-]{43}",
        // Oversized.
        (1000usize..20_000).prop_map(|n| "A".repeat(n)),
        Just(String::new()),
        Just(valid.to_uppercase()),
    ]
}

#[test]
fn bad_cookies_give_a_fresh_session_with_zero_store_calls() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Recording::default();
    let manager = manager(&store);
    let valid = runtime.block_on(logged_in(&manager));
    store.take_calls();
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&bad_cookie(valid.clone()), |cookie| {
            runtime.block_on(async {
                let session = manager.load(Some(&cookie)).await.unwrap();
                prop_assert!(session.is_new(), "{cookie:?} was accepted");
                let outcome = manager.commit(session).await.unwrap();
                prop_assert_eq!(outcome.status, CommitStatus::Anonymous);
                prop_assert!(outcome.cookie.is_none());
                prop_assert_eq!(
                    store.calls(),
                    Vec::<&str>::new(),
                    "{:?} reached the store",
                    cookie
                );
                Ok(())
            })
        })
        .unwrap();
    // The valid cookie still works, so the property is not vacuous.
    let session = runtime.block_on(manager.load(Some(&valid))).unwrap();
    assert!(!session.is_new());
    assert_eq!(store.calls(), ["load"]);
}

#[tokio::test]
async fn anonymous_request_without_data_writes_nothing_and_sets_no_cookie() {
    let store = Recording::default();
    let manager = manager(&store);
    let session = manager.load(None).await.unwrap();
    assert_eq!(session.get::<String>("user").unwrap(), None);
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Anonymous);
    assert_eq!(outcome.cookie, None);
    assert!(store.calls().is_empty());
    assert!(store.inner.is_empty());
}

#[tokio::test]
async fn new_session_cookie_has_the_configured_attributes() {
    let store = Recording::default();
    let cookie = new_session_cookie(&manager(&store)).await;
    // The idle timeout, twice: a refresh lost on the way must not let the cookie run out
    // before the next one.
    assert_eq!(cookie.max_age, Some(Duration::from_secs(7200)));
    let header = cookie.to_header_value();
    assert!(header.starts_with(&format!("session={}; ", cookie.value)));
    assert_eq!(
        attributes(&header),
        [
            "HttpOnly",
            "Max-Age=7200",
            "Path=/",
            "SameSite=Lax",
            "Secure"
        ]
    );

    let custom = SessionConfig::new(KeyRing::single(key(1))).cookie(
        CookieConfig::default()
            .name("sid")
            .same_site(SameSite::Strict)
            .secure(false)
            .persistent(false)
            .domain(Some("example.com".into())),
    );
    let header = new_session_cookie(&manager_with(&store, custom))
        .await
        .to_header_value();
    assert!(header.starts_with("sid="));
    assert_eq!(
        attributes(&header),
        [
            "Domain=example.com",
            "HttpOnly",
            "Path=/",
            "SameSite=Strict"
        ]
    );

    let partitioned = SessionConfig::new(KeyRing::single(key(1))).cookie(
        CookieConfig::default()
            .name("__Host-sid")
            .same_site(SameSite::None)
            .partitioned(true),
    );
    let cookie = new_session_cookie(&manager_with(&store, partitioned)).await;
    assert_eq!(
        attributes(&cookie.to_header_value()),
        [
            "HttpOnly",
            "Max-Age=7200",
            "Partitioned",
            "Path=/",
            "SameSite=None",
            "Secure"
        ]
    );
}

/// The cookie directive of a new session holding one value.
async fn new_session_cookie(manager: &SessionManager) -> session_core::CookieDirective {
    let mut session = manager.load(None).await.unwrap();
    session.insert("n", &1u8).unwrap();
    manager.commit(session).await.unwrap().cookie.unwrap()
}

/// The attributes of a `Set-Cookie` value, sorted (their order carries no meaning).
fn attributes(header: &str) -> Vec<&str> {
    let mut attributes: Vec<&str> = header.split("; ").skip(1).collect();
    attributes.sort_unstable();
    attributes
}

#[tokio::test]
async fn a_destroy_without_a_valid_cookie_sends_no_removal() {
    let store = Recording::default();
    let manager = manager(&store);
    for cookie in [None, Some("forged.value")] {
        let mut session = manager.load(cookie).await.unwrap();
        session.destroy();
        let outcome = manager.commit(session).await.unwrap();
        assert_eq!(outcome.status, CommitStatus::Anonymous);
        assert_eq!(outcome.cookie, None, "{cookie:?}");
    }
    // A valid cookie whose session has ended is still cleared.
    let cookie = logged_in(&manager).await;
    store.inner.delete(&session_key(&cookie)).await.unwrap();
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.destroy();
    let outcome = manager.commit(session).await.unwrap();
    assert!(outcome.cookie.unwrap().is_removal());
}

#[tokio::test]
async fn debug_shows_value_names_and_sizes_never_value_bytes() {
    let store = Recording::default();
    let manager = manager(&store);
    let mut session = manager.load(None).await.unwrap();
    session.insert("reset_token", "SECRET-RESET-TOKEN").unwrap();
    session.insert("user", "alice").unwrap();
    let shown = format!("{session:?} {session:#?}");
    assert!(
        !shown.contains("SECRET") && !shown.contains("alice"),
        "{shown}"
    );
    // bincode writes an 18-byte string as its length (one byte) and its bytes.
    assert!(shown.contains("\"reset_token\": 19"), "{shown}");
    assert!(shown.contains("\"user\": 6"), "{shown}");
}

#[tokio::test]
async fn a_configuration_that_does_not_fit_the_store_is_refused() {
    let small = MemoryStore::builder().max_record_size(1000).build();
    let config = || SessionConfig::new(KeyRing::single(key(1)));
    let refused =
        SessionManager::new(Arc::new(small.clone()), config().max_encoded_size(1001)).unwrap_err();
    assert_eq!(
        refused,
        ConfigError::MaxEncodedSizeOverStoreLimit {
            max_encoded_size: 1001,
            store_limit: 1000
        }
    );
    assert!(
        refused.to_string().contains("record limit of 1000"),
        "{refused}"
    );
    // Left at its default, the maximum follows the store's lower limit: an oversized
    // session is the manager's typed error, and nothing is written.
    let store = Recording::new(small);
    let manager = manager_with(&store, config());
    let mut session = manager.load(None).await.unwrap();
    session.insert("big", &"x".repeat(2000)).unwrap();
    store.take_calls();
    assert!(matches!(
        manager.commit(session).await,
        Err(SessionError::TooLarge { limit: 1000, .. })
    ));
    assert!(store.take_calls().is_empty());
}

#[tokio::test]
async fn key_rotation_accepts_and_resigns_old_cookies_until_the_key_is_removed() {
    let store = Recording::default();
    let old = manager_with(&store, SessionConfig::new(KeyRing::single(key(1))));
    let cookie = logged_in(&old).await;

    let rotated = manager_with(
        &store,
        SessionConfig::new(KeyRing::new([key(2), key(1)]).unwrap()),
    );
    let session = rotated.load(Some(&cookie)).await.unwrap();
    assert_eq!(
        session.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
    let outcome = rotated.commit(session).await.unwrap();
    let resigned = outcome
        .cookie
        .expect("an old key's cookie is re-signed")
        .value;
    assert_ne!(resigned, cookie);
    assert_eq!(resigned[..22], cookie[..22], "re-signing keeps the id");

    let removed = manager_with(&store, SessionConfig::new(KeyRing::single(key(2))));
    store.take_calls();
    assert!(removed.load(Some(&cookie)).await.unwrap().is_new());
    assert!(
        store.take_calls().is_empty(),
        "a removed key's cookie reached the store"
    );
    let session = removed.load(Some(&resigned)).await.unwrap();
    assert_eq!(
        session.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
    // Once re-signed, an unchanged request sets no cookie.
    assert_eq!(removed.commit(session).await.unwrap().cookie, None);
}

#[tokio::test]
async fn cycle_id_creates_then_marks_the_old_entry_moved_and_the_old_id_stops_working() {
    let store = Recording::default();
    let manager = manager(&store);
    let first = logged_in(&manager).await;
    let mut session = manager.load(Some(&first)).await.unwrap();
    session.insert("role", "admin").unwrap();
    session.cycle_id();
    store.take_calls();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Cycled);
    assert_eq!(store.take_calls(), ["create", "mark_moved"]);
    let second = outcome.cookie.unwrap().value;
    assert_ne!(first[..22], second[..22]);
    assert!(manager.load(Some(&first)).await.unwrap().is_new());
    let session = manager.load(Some(&second)).await.unwrap();
    assert_eq!(
        session.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(
        session.get::<String>("role").unwrap().as_deref(),
        Some("admin")
    );
    assert_eq!(
        store.inner.len(),
        2,
        "the new entry and the old one's marker"
    );
}

#[tokio::test]
async fn an_unanswered_mark_is_tried_again_while_the_old_entry_shows_it_did_not_land() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.cycle_id();
    store.fail_next_marks.store(1, Ordering::SeqCst);
    store.take_calls();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Cycled);
    assert_eq!(
        store.take_calls(),
        ["create", "mark_moved", "load", "mark_moved"],
        "the old entry is read to tell whether the failed mark landed, then marked again"
    );
    assert!(manager.load(Some(&cookie)).await.unwrap().is_new());
    let new = outcome.cookie.unwrap().value;
    assert!(!manager.load(Some(&new)).await.unwrap().is_new());
}

#[tokio::test]
async fn marks_that_keep_failing_fail_the_cycle_and_keep_the_old_session() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.cycle_id();
    store.fail_next_marks.store(100, Ordering::SeqCst);
    store.take_calls();
    let error = manager.commit(session).await.unwrap_err();
    assert!(
        matches!(error, SessionError::Store(StoreError::Backend { .. })),
        "{error:?}"
    );
    assert_eq!(
        store.take_calls(),
        [
            "create",
            "mark_moved",
            "load",
            "mark_moved",
            "load",
            "mark_moved",
            "load",
            "save",
            "delete"
        ],
        "three marks, each checked; then the old entry is fenced (rewritten at its version, \
         so no mark still on its way can land) and the new entry removed"
    );
    assert!(!manager.load(Some(&cookie)).await.unwrap().is_new());
    assert_eq!(store.inner.len(), 1);
}

#[tokio::test]
async fn destroy_deletes_and_clears_the_cookie() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.destroy();
    store.take_calls();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Destroyed);
    assert_eq!(store.take_calls(), ["delete_if_version"]);
    let removal = outcome.cookie.unwrap();
    assert!(removal.is_removal());
    let header = removal.to_header_value();
    assert!(header.starts_with("session=; "), "{header}");
    let attributes = attributes(&header);
    assert!(attributes.contains(&"Max-Age=0"), "{header}");
    assert!(
        attributes.contains(&"Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
        "{header}"
    );
    assert!(store.inner.is_empty());
    assert!(manager.load(Some(&cookie)).await.unwrap().is_new());
}

#[tokio::test]
async fn destroy_then_insert_starts_a_new_session() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.destroy();
    session.insert("flash", "logged out").unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    let fresh = outcome.cookie.unwrap().value;
    assert!(manager.load(Some(&cookie)).await.unwrap().is_new());
    let session = manager.load(Some(&fresh)).await.unwrap();
    assert_eq!(session.get::<String>("user").unwrap(), None);
    assert_eq!(
        session.get::<String>("flash").unwrap().as_deref(),
        Some("logged out")
    );
}

#[tokio::test]
async fn concurrent_requests_changing_different_keys_both_persist() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut first = manager.load(Some(&cookie)).await.unwrap();
    let mut second = manager.load(Some(&cookie)).await.unwrap();
    first.insert("a", &1u8).unwrap();
    second.insert("b", &2u8).unwrap();
    second.remove("user");
    assert_eq!(
        manager.commit(first).await.unwrap().status,
        CommitStatus::Saved
    );
    store.take_calls();
    assert_eq!(
        manager.commit(second).await.unwrap().status,
        CommitStatus::Saved
    );
    assert_eq!(store.take_calls(), ["save", "load", "save"]);
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(session.get::<u8>("a").unwrap(), Some(1));
    assert_eq!(session.get::<u8>("b").unwrap(), Some(2));
    assert_eq!(session.get::<String>("user").unwrap(), None);
}

#[tokio::test]
async fn a_session_ended_during_the_request_stays_ended() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut slow = manager.load(Some(&cookie)).await.unwrap();
    let mut logout = manager.load(Some(&cookie)).await.unwrap();
    logout.destroy();
    manager.commit(logout).await.unwrap();
    slow.insert("late", &true).unwrap();
    let outcome = manager.commit(slow).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Ended);
    assert_eq!(
        outcome.cookie, None,
        "an ended session must not clear a newer cookie"
    );
    assert!(
        store.inner.is_empty(),
        "a late save resurrected the session"
    );
}

#[tokio::test]
async fn cycling_a_session_ended_meanwhile_does_not_bring_it_back() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    let mut logout = manager.load(Some(&cookie)).await.unwrap();
    logout.destroy();
    manager.commit(logout).await.unwrap();
    login.cycle_id();
    let outcome = manager.commit(login).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Ended);
    assert!(
        store.inner.is_empty(),
        "the cycle resurrected a destroyed session"
    );
}

#[tokio::test]
async fn cycling_keeps_changes_saved_meanwhile_and_a_parallel_request_follows_without_a_cookie() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let mut login = manager.load(Some(&cookie)).await.unwrap();
    let mut parallel = manager.load(Some(&cookie)).await.unwrap();
    let mut earlier = manager.load(Some(&cookie)).await.unwrap();
    earlier.insert("theme", "dark").unwrap();
    manager.commit(earlier).await.unwrap();
    login.insert("role", "admin").unwrap();
    login.cycle_id();
    let new_cookie = manager.commit(login).await.unwrap().cookie.unwrap().value;
    // A request that loaded the session before the login saves after it: its change follows
    // the session to the new id, and it leaves the cookie to the login's response.
    parallel.insert("late", &1u8).unwrap();
    let outcome = manager.commit(parallel).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Followed);
    assert_eq!(outcome.cookie, None);
    assert!(!outcome.lost_changes);
    let session = manager.load(Some(&new_cookie)).await.unwrap();
    assert_eq!(
        session.get::<String>("theme").unwrap().as_deref(),
        Some("dark")
    );
    assert_eq!(
        session.get::<String>("role").unwrap().as_deref(),
        Some("admin")
    );
    assert_eq!(session.get::<u8>("late").unwrap(), Some(1));
    // A request arriving with the old cookie after the login sees no session, and its
    // changes are reported lost rather than written into a new anonymous session whose cookie
    // would replace the login's.
    let mut late = manager.load(Some(&cookie)).await.unwrap();
    assert!(late.is_new());
    late.insert("later", &2u8).unwrap();
    let lost_before = manager.lost_writes();
    let outcome = manager.commit(late).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Superseded);
    assert!(outcome.lost_changes);
    assert_eq!(outcome.cookie, None);
    assert_eq!(manager.lost_writes(), lost_before + 1);
}

#[tokio::test]
async fn oversized_session_is_a_typed_error_and_nothing_is_written() {
    let store = Recording::default();
    let config = SessionConfig::new(KeyRing::single(key(1))).max_encoded_size(1024);
    let manager = manager_with(&store, config);
    let mut session = manager.load(None).await.unwrap();
    session.insert("blob", &vec![7u8; 2000]).unwrap();
    let error = manager.commit(session).await.unwrap_err();
    assert!(
        matches!(error, SessionError::TooLarge { limit: 1024, .. }),
        "{error:?}"
    );
    assert!(store.calls().is_empty());

    let cookie = logged_in(&manager).await;
    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.insert("blob", &vec![7u8; 2000]).unwrap();
    store.take_calls();
    let error = manager.commit(session).await.unwrap_err();
    assert!(matches!(error, SessionError::TooLarge { .. }), "{error:?}");
    assert!(store.take_calls().is_empty());
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(session.get::<Vec<u8>>("blob").unwrap(), None);
}

#[tokio::test]
async fn idle_timeout_ends_an_idle_session_and_activity_keeps_it() {
    let store = Recording::default();
    let config = SessionConfig::new(KeyRing::single(key(1))).idle_timeout(Duration::from_secs(2));
    let manager = manager_with(&store, config);

    let active = logged_in(&manager).await;
    let idle = logged_in(&manager).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let session = manager.load(Some(&active)).await.unwrap();
        assert!(!session.is_new(), "an active session expired");
        manager.commit(session).await.unwrap();
    }
    // 3.6 s have passed: twice the idle timeout for the untouched session.
    assert!(manager.load(Some(&idle)).await.unwrap().is_new());
    let gone = manager.load(Some(&idle)).await.unwrap();
    let outcome = manager.commit(gone).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Anonymous);
    assert_eq!(outcome.cookie, None);
}

#[tokio::test]
async fn absolute_timeout_ends_even_an_active_session() {
    let store = Recording::default();
    let config =
        SessionConfig::new(KeyRing::single(key(1))).absolute_timeout(Some(Duration::from_secs(2)));
    let manager = manager_with(&store, config);
    let mut session = manager.load(None).await.unwrap();
    session.insert("n", &0u32).unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap();
    assert!(
        cookie.max_age.unwrap() <= Duration::from_secs(2),
        "{:?}",
        cookie.max_age
    );
    for n in 1..=3u32 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut session = manager.load(Some(&cookie.value)).await.unwrap();
        assert!(!session.is_new());
        session.insert("n", &n).unwrap();
        manager.commit(session).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(manager.load(Some(&cookie.value)).await.unwrap().is_new());
}

#[tokio::test]
async fn an_absolute_timeout_set_later_also_ends_older_sessions() {
    let store = Recording::default();
    let before = manager(&store);
    let cookie = logged_in(&before).await;
    let after = manager_with(
        &store,
        SessionConfig::new(KeyRing::single(key(1))).absolute_timeout(Some(Duration::from_secs(1))),
    );
    assert!(!after.load(Some(&cookie)).await.unwrap().is_new());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(after.load(Some(&cookie)).await.unwrap().is_new());
    assert!(
        store.inner.is_empty(),
        "the expired session was not deleted"
    );
}

#[tokio::test]
async fn an_unmodified_session_is_touched_only_past_the_threshold() {
    let store = Recording::default();
    let config = SessionConfig::new(KeyRing::single(key(1)))
        .idle_timeout(Duration::from_secs(4))
        .touch_threshold(Duration::from_secs(3));
    let manager = manager_with(&store, config);
    let cookie = logged_in(&manager).await;

    store.take_calls();
    let session = manager.load(Some(&cookie)).await.unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Unchanged);
    assert_eq!(outcome.cookie, None);
    assert_eq!(store.take_calls(), ["load"]);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let session = manager.load(Some(&cookie)).await.unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Touched);
    assert_eq!(
        outcome.cookie.unwrap().max_age,
        Some(Duration::from_secs(4 + 4)),
        "the idle timeout, plus one more"
    );
    assert_eq!(store.take_calls(), ["load", "touch"]);

    let session = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(
        manager.commit(session).await.unwrap().status,
        CommitStatus::Unchanged
    );
    assert_eq!(store.take_calls(), ["load"]);
}

#[tokio::test]
async fn store_faults_are_errors_and_undecodable_records_are_fresh_sessions() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    store.fail_loads.store(true, Ordering::SeqCst);
    let error = manager.load(Some(&cookie)).await.unwrap_err();
    assert!(
        matches!(error, SessionError::Store(StoreError::Backend { .. })),
        "{error:?}"
    );
    store.fail_loads.store(false, Ordering::SeqCst);
    store.corrupt_loads.store(true, Ordering::SeqCst);
    assert!(manager.load(Some(&cookie)).await.unwrap().is_new());
    store.corrupt_loads.store(false, Ordering::SeqCst);
    assert!(!manager.load(Some(&cookie)).await.unwrap().is_new());
}

#[tokio::test]
async fn a_value_of_the_wrong_type_is_a_typed_error() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let session = manager.load(Some(&cookie)).await.unwrap();
    let error = session.get::<u64>("user").unwrap_err();
    assert!(matches!(error, SessionError::DecodeValue { ref key, .. } if key == "user"));
}

#[tokio::test]
async fn saves_push_the_expiry_back_and_refresh_the_cookie_only_when_a_touch_is_due() {
    let store = Recording::default();
    let config = SessionConfig::new(KeyRing::single(key(1)))
        .idle_timeout(Duration::from_secs(600))
        .touch_threshold(Duration::from_secs(300));
    let manager = manager_with(&store, config);
    let cookie = logged_in(&manager).await;

    let mut session = manager.load(Some(&cookie)).await.unwrap();
    session.insert("a", &1u8).unwrap();
    let outcome = manager.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Saved);
    assert_eq!(outcome.cookie, None, "not due: no cookie");
    let left = store.inner.load(&session_key(&cookie)).await;
    let left = left.unwrap().unwrap().expires_in.unwrap();
    assert!(left <= Duration::from_secs(600), "{left:?}");

    // Once less than the threshold is left, a save extends the expiry and refreshes Max-Age.
    let due = SessionConfig::new(KeyRing::single(key(1)))
        .idle_timeout(Duration::from_secs(900))
        .touch_threshold(Duration::from_secs(899));
    let due = manager_with(&store, due);
    let mut session = due.load(Some(&cookie)).await.unwrap();
    session.insert("a", &2u8).unwrap();
    let outcome = due.commit(session).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Saved);
    let refreshed = outcome.cookie.expect("due: the cookie is refreshed");
    assert_eq!(refreshed.value, cookie, "same id, same signature");
    assert_eq!(refreshed.max_age, Some(Duration::from_secs(900 + 900)));
    let left = store.inner.load(&session_key(&cookie)).await;
    assert!(left.unwrap().unwrap().expires_in.unwrap() > Duration::from_secs(890));
}

/// The storage key a cookie value names.
fn session_key(cookie: &str) -> session_core::StorageKey {
    let verified = KeyRing::single(key(1)).verify("session", cookie).unwrap();
    session_core::StorageKey::derive(&session_core::KeyPrefix::default(), verified.id())
}

#[tokio::test]
async fn a_request_on_the_pre_login_id_cannot_put_its_token_into_the_logged_in_session() {
    let store = Recording::default();
    let manager = manager(&store);
    let before_login = logged_in(&manager).await;
    // A slow request loads the session while it has no token.
    let mut slow = manager.load(Some(&before_login)).await.unwrap();
    // The victim loads the login form (a token is made) and logs in (the id is cycled).
    let mut form = manager.load(Some(&before_login)).await.unwrap();
    form.csrf_token().unwrap();
    manager.commit(form).await.unwrap();
    let mut login = manager.load(Some(&before_login)).await.unwrap();
    login.insert("user", "victim").unwrap();
    login.cycle_id();
    let after_login = manager.commit(login).await.unwrap().cookie.unwrap().value;
    // The slow request renders a form with a token of its own and commits into the new id.
    let known = slow.csrf_token().unwrap();
    let outcome = manager.commit(slow).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Followed);
    let session = manager.load(Some(&after_login)).await.unwrap();
    assert!(!session.verify_csrf_token(&known));

    // Also when the login made no token at all: the slow request's token is not carried over.
    let before_login = logged_in(&manager).await;
    let mut slow = manager.load(Some(&before_login)).await.unwrap();
    let mut login = manager.load(Some(&before_login)).await.unwrap();
    login.cycle_id();
    let after_login = manager.commit(login).await.unwrap().cookie.unwrap().value;
    let known = slow.csrf_token().unwrap();
    slow.insert("seen", &true).unwrap();
    let outcome = manager.commit(slow).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Followed);
    let session = manager.load(Some(&after_login)).await.unwrap();
    assert!(!session.verify_csrf_token(&known));
    assert_eq!(session.get::<bool>("seen").unwrap(), Some(true));
}

#[tokio::test]
async fn a_token_saved_on_the_pre_login_id_while_the_login_ran_does_not_reach_the_new_id() {
    let store = Recording::default();
    let manager = manager(&store);
    let before_login = logged_in(&manager).await;
    let mut login = manager.load(Some(&before_login)).await.unwrap();
    let mut slow = manager.load(Some(&before_login)).await.unwrap();
    let known = slow.csrf_token().unwrap();
    assert_eq!(
        manager.commit(slow).await.unwrap().status,
        CommitStatus::Saved
    );
    // The login's mark conflicts with that save, and its changes are carried over.
    login.insert("user", "victim").unwrap();
    login.cycle_id();
    let outcome = manager.commit(login).await.unwrap();
    assert_eq!(outcome.status, CommitStatus::Cycled);
    let session = manager
        .load(Some(&outcome.cookie.unwrap().value))
        .await
        .unwrap();
    assert_eq!(
        session.get::<String>("user").unwrap().as_deref(),
        Some("victim")
    );
    assert!(!session.verify_csrf_token(&known));
}

#[tokio::test]
async fn pages_rendered_at_once_both_get_a_token_that_verifies() {
    for policy in [SameKeyConflict::LastWriterWins, SameKeyConflict::Fail] {
        let store = Recording::default();
        let config = SessionConfig::new(KeyRing::single(key(1))).same_key_conflicts(policy);
        let manager = manager_with(&store, config);
        let cookie = logged_in(&manager).await;
        // Right after a login, the session already has its new token: pages rendered at
        // once do not race to make one.
        let mut login = manager.load(Some(&cookie)).await.unwrap();
        login.csrf_token().unwrap();
        login.cycle_id();
        let cookie = manager.commit(login).await.unwrap().cookie.unwrap().value;
        let mut first = manager.load(Some(&cookie)).await.unwrap();
        let mut second = manager.load(Some(&cookie)).await.unwrap();
        let tokens = [first.csrf_token().unwrap(), second.csrf_token().unwrap()];
        manager.commit(first).await.unwrap();
        manager.commit(second).await.unwrap();
        let session = manager.load(Some(&cookie)).await.unwrap();
        for token in &tokens {
            assert!(session.verify_csrf_token(token), "{policy:?}");
        }
    }
}

#[tokio::test]
async fn two_first_tokens_made_at_once_never_fail_a_page() {
    // A session without a token, rendered twice at once: neither commit fails, whatever the
    // conflict policy; the token the first commit stored stays.
    let store = Recording::default();
    let config =
        SessionConfig::new(KeyRing::single(key(1))).same_key_conflicts(SameKeyConflict::Fail);
    let manager = manager_with(&store, config);
    let cookie = logged_in(&manager).await;
    let mut first = manager.load(Some(&cookie)).await.unwrap();
    let mut second = manager.load(Some(&cookie)).await.unwrap();
    let first_token = first.csrf_token().unwrap();
    second.csrf_token().unwrap();
    manager.commit(first).await.unwrap();
    manager.commit(second).await.unwrap();
    let session = manager.load(Some(&cookie)).await.unwrap();
    assert!(session.verify_csrf_token(&first_token));
}

/// A change a request makes to its session.
type Change = fn(&mut session_core::Session);

/// `commit_calls_store` (which lets the tower layer skip a task for a commit that writes
/// nothing) says exactly whether the commit then calls the store, in every situation a
/// request can leave a session in.
#[tokio::test]
async fn commit_calls_store_agrees_with_what_the_commit_does() {
    let store = Recording::default();
    let due = manager_with(
        &store,
        SessionConfig::new(KeyRing::single(key(1))).touch_threshold(Duration::from_secs(3600)),
    );
    let not_due = manager(&store);
    let cookie = logged_in(&not_due).await;
    let cases: Vec<(&str, &SessionManager, Option<&str>, Change)> = vec![
        ("fresh, untouched", &not_due, None, |_| {}),
        ("fresh, written", &not_due, None, |s| {
            s.insert("n", &1).unwrap();
        }),
        ("fresh, destroyed", &not_due, None, |s| s.destroy()),
        ("bad cookie, untouched", &not_due, Some("bad"), |_| {}),
        (
            "loaded, read only, not due",
            &not_due,
            Some(&cookie),
            |_| {},
        ),
        ("loaded, read only, due", &due, Some(&cookie), |_| {}),
        ("loaded, written", &not_due, Some(&cookie), |s| {
            s.insert("n", &2).unwrap();
        }),
        ("loaded, cycled", &not_due, Some(&cookie), |s| s.cycle_id()),
        ("fresh, destroyed, then written", &not_due, None, |s| {
            s.destroy();
            s.insert("n", &3).unwrap();
        }),
        ("loaded, destroyed", &not_due, Some(&cookie), |s| {
            s.destroy()
        }),
    ];
    for (name, manager, cookie, change) in cases {
        let mut session = manager.load(cookie).await.unwrap();
        change(&mut session);
        let predicted = manager.commit_calls_store(&session);
        store.take_calls();
        manager.commit(session).await.unwrap();
        let calls = store.take_calls();
        assert_eq!(predicted, !calls.is_empty(), "{name}: {calls:?}");
    }
}

/// A cookie verified once by `verify_request_cookie` loads what `load` of its value loads,
/// and an invalid or missing one gives a fresh session without a store call.
#[tokio::test]
async fn a_request_cookie_verified_once_loads_the_same_session() {
    let store = Recording::default();
    let manager = manager(&store);
    let cookie = logged_in(&manager).await;
    let header = format!("other=1; session={cookie}; session=planted");
    let found = manager
        .verify_request_cookie([header.as_bytes()])
        .expect("a session cookie");
    assert!(found.is_valid());
    let by_request = manager.load_request(Some(&found)).await.unwrap();
    let by_value = manager.load(Some(&cookie)).await.unwrap();
    assert_eq!(
        by_request.get::<String>("user").unwrap(),
        by_value.get::<String>("user").unwrap()
    );
    assert_eq!(
        by_request.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );

    store.take_calls();
    let planted = manager
        .verify_request_cookie([b"session=planted".as_slice()])
        .expect("a cookie of the name");
    assert!(!planted.is_valid());
    let fresh = manager.load_request(Some(&planted)).await.unwrap();
    assert!(fresh.get::<String>("user").unwrap().is_none());
    assert!(
        manager
            .verify_request_cookie([b"other=1".as_slice()])
            .is_none()
    );
    let fresh = manager.load_request(None).await.unwrap();
    assert!(fresh.get::<String>("user").unwrap().is_none());
    assert!(store.take_calls().is_empty());
}
