//! The layer and the extractor, driven with requests through an axum router.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::header::SET_COOKIE;
use http::{Request, Response, StatusCode};
use session_conformance::recording::RecordingStore;
use session_core::{
    CommitOutcome, CommitStatus, KeyRing, SameKeyConflict, SessionConfig, SessionManager,
    SigningKey,
};
use session_memory::MemoryStore;
use session_tower::{LostWrites, Session, SessionFailure, SessionLayer};
use tokio::sync::Notify;
use tower::ServiceExt;

mod common;
use common::{body, send, set_cookie};

type Store = RecordingStore<MemoryStore>;

fn app(store: &Store) -> Router {
    app_with(store, |layer| layer)
}

fn app_with(store: &Store, configure: impl FnOnce(SessionLayer) -> SessionLayer) -> Router {
    app_full(store, SessionConfig::new, configure, Gate::default())
}

/// Two signals for a handler that must stop half-way: it says when it has changed the session
/// (`ready`), then waits for `go` before it answers.
#[derive(Clone, Default)]
struct Gate {
    ready: Arc<Notify>,
    go: Arc<Notify>,
}

fn app_full(
    store: &Store,
    config: impl FnOnce(KeyRing) -> SessionConfig,
    configure: impl FnOnce(SessionLayer) -> SessionLayer,
    gate: Gate,
) -> Router {
    let keys = KeyRing::single(SigningKey::new([4u8; 32]).unwrap());
    let manager = SessionManager::new(Arc::new(store.clone()), config(keys)).unwrap();
    Router::new()
        .route(
            "/gated/{key}/{value}",
            get(
                move |session: Session,
                      axum::extract::Path((key, value)): axum::extract::Path<(String, String)>| {
                    let gate = gate.clone();
                    async move {
                        session.insert(&key, &value).await?;
                        gate.ready.notify_one();
                        gate.go.notified().await;
                        Ok::<_, SessionFailure>("set after waiting")
                    }
                },
            ),
        )
        .route(
            "/count",
            get(|session: Session| async move {
                let n = session
                    .update("count", |n: Option<u32>| n.unwrap_or(0) + 1)
                    .await?;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Ok::<_, SessionFailure>(n.to_string())
            }),
        )
        .route("/untouched", get(|| async { "no session here" }))
        .route(
            "/set/{key}/{value}",
            get(
                |session: Session,
                 axum::extract::Path((key, value)): axum::extract::Path<(String, String)>| async move {
                    session.insert(&key, &value).await?;
                    Ok::<_, SessionFailure>("set")
                },
            ),
        )
        .route(
            "/slow/{key}/{value}",
            get(
                |session: Session,
                 axum::extract::Path((key, value)): axum::extract::Path<(String, String)>| async move {
                    session.insert(&key, &value).await?;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    Ok::<_, SessionFailure>("set slowly")
                },
            ),
        )
        .route(
            "/get/{key}",
            get(
                |session: Session, axum::extract::Path(key): axum::extract::Path<String>| async move {
                    let value: Option<String> = session.get(&key).await?;
                    Ok::<_, SessionFailure>(value.unwrap_or_else(|| "-".into()))
                },
            ),
        )
        .route(
            "/read-twice/{key}",
            get(
                |session: Session, axum::extract::Path(key): axum::extract::Path<String>| async move {
                    let first: Option<String> = session.get(&key).await?;
                    let second: Option<String> = session.get(&key).await?;
                    Ok::<_, SessionFailure>(format!("{} {}", first.unwrap(), second.unwrap()))
                },
            ),
        )
        .route(
            "/login",
            get(|session: Session| async move {
                session.insert("user", "alice").await?;
                session.cycle_id().await?;
                Ok::<_, SessionFailure>("in")
            }),
        )
        .route(
            "/logout",
            get(|session: Session| async move {
                session.destroy().await?;
                Ok::<_, SessionFailure>("out")
            }),
        )
        .layer(configure(SessionLayer::new(manager)))
}

#[tokio::test]
async fn a_handler_that_never_touches_the_session_causes_zero_store_calls() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/a/1", None).await).unwrap();
    store.take_calls();

    let response = send(&app, "/untouched", Some(&cookie)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let response = send(&app, "/untouched", None).await;
    assert!(response.headers().get(SET_COOKIE).is_none());
    assert_eq!(store.calls(), Vec::<&str>::new());
}

#[tokio::test]
async fn a_handler_that_only_reads_loads_once_and_writes_nothing() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/a/1", None).await).unwrap();
    store.take_calls();
    let response = send(&app, "/read-twice/a", Some(&cookie)).await;
    assert!(response.headers().get(SET_COOKIE).is_none());
    assert_eq!(body(response).await, "1 1");
    assert_eq!(store.take_calls(), ["load"]);
}

#[tokio::test]
async fn values_persist_across_requests_through_the_cookie() {
    let store = Store::default();
    let app = app(&store);
    let first = send(&app, "/set/colour/blue", None).await;
    let header = first
        .headers()
        .get(SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        header.contains("HttpOnly") && header.contains("SameSite=Lax"),
        "{header}"
    );
    let cookie = set_cookie(&first).unwrap();
    assert_eq!(
        body(send(&app, "/get/colour", Some(&cookie)).await).await,
        "blue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_requests_of_one_browser_changing_different_keys_both_persist() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/start/1", None).await).unwrap();
    for round in 0..10 {
        // Each handler waits after loading and changing, so both requests hold the same
        // version before either commits: the second commit conflicts and must replay.
        let (path_a, path_b) = (format!("/slow/a/{round}"), format!("/slow/b/{round}"));
        let (a, b) = tokio::join!(
            send(&app, &path_a, Some(&cookie)),
            send(&app, &path_b, Some(&cookie)),
        );
        assert_eq!(a.status(), StatusCode::OK);
        assert_eq!(b.status(), StatusCode::OK);
        assert_eq!(
            body(send(&app, "/get/a", Some(&cookie)).await).await,
            round.to_string()
        );
        assert_eq!(
            body(send(&app, "/get/b", Some(&cookie)).await).await,
            round.to_string()
        );
    }
    assert!(store.conflicts() >= 10, "the requests did not overlap");
}

#[tokio::test]
async fn a_tampered_cookie_gives_a_fresh_session_and_a_new_cookie() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/secret/1", None).await).unwrap();
    let mut tampered = cookie.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    store.take_calls();

    let response = send(&app, "/get/secret", Some(&tampered)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get(SET_COOKIE).is_none(),
        "nothing stored, no cookie"
    );
    assert_eq!(body(response).await, "-");
    assert!(
        store.take_calls().is_empty(),
        "a tampered cookie reached the store"
    );

    let response = send(&app, "/set/mine/2", Some(&tampered)).await;
    let fresh = set_cookie(&response).expect("a fresh session gets a cookie");
    assert_ne!(fresh, tampered);
    assert_ne!(fresh, cookie);
    assert_eq!(store.take_calls(), ["create"]);
    assert_eq!(
        body(send(&app, "/get/secret", Some(&fresh)).await).await,
        "-"
    );
}

#[tokio::test]
async fn login_cycles_the_id_and_logout_clears_the_cookie() {
    let store = Store::default();
    let app = app(&store);
    let before = set_cookie(&send(&app, "/set/cart/tea", None).await).unwrap();
    let after = set_cookie(&send(&app, "/login", Some(&before)).await).unwrap();
    assert_ne!(before, after);
    assert_eq!(
        body(send(&app, "/get/user", Some(&after)).await).await,
        "alice"
    );
    assert_eq!(
        body(send(&app, "/get/cart", Some(&after)).await).await,
        "tea"
    );
    assert_eq!(
        body(send(&app, "/get/cart", Some(&before)).await).await,
        "-"
    );

    let response = send(&app, "/logout", Some(&after)).await;
    let header = response
        .headers()
        .get(SET_COOKIE)
        .unwrap()
        .to_str()
        .unwrap();
    assert!(header.starts_with("session=; "), "{header}");
    assert!(header.contains("; Max-Age=0"), "{header}");
    assert_eq!(body(send(&app, "/get/user", Some(&after)).await).await, "-");
}

#[tokio::test]
async fn store_errors_become_server_errors_never_panics() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/a/1", None).await).unwrap();

    store.fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&app, "/set/a/2", Some(&cookie)).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send(&app, "/set/new/1", None).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    store.fail_writes.store(false, Ordering::SeqCst);

    store.fail_loads.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&app, "/get/a", Some(&cookie)).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // A request that never touches the session is unaffected by the store being down.
    assert_eq!(
        send(&app, "/untouched", Some(&cookie)).await.status(),
        StatusCode::OK
    );
    store.fail_loads.store(false, Ordering::SeqCst);

    let unavailable = app_with(&store, |layer| {
        layer.failure_status(StatusCode::SERVICE_UNAVAILABLE)
    });
    store.fail_loads.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&unavailable, "/get/a", Some(&cookie)).await.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a load failure in a handler takes the configured status too"
    );
    store.fail_loads.store(false, Ordering::SeqCst);
    store.fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&unavailable, "/set/a/3", Some(&cookie)).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn a_session_extractor_without_the_layer_is_a_server_error() {
    let app: Router = Router::new().route("/", get(|_: Session| async { "unreachable" }));
    let response = app
        .oneshot(Request::builder().uri("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_through_the_extractor_count_every_request() {
    let store = Store::default();
    let app = app(&store);
    let cookie = set_cookie(&send(&app, "/set/start/1", None).await).unwrap();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (app, cookie) = (app.clone(), cookie.clone());
        requests.spawn(async move {
            for _ in 0..5 {
                let response = send(&app, "/count", Some(&cookie)).await;
                assert_eq!(response.status(), StatusCode::OK);
            }
        });
    }
    while let Some(done) = requests.join_next().await {
        done.unwrap();
    }
    assert_eq!(body(send(&app, "/count", Some(&cookie)).await).await, "81");
    assert!(store.conflicts() > 0, "the requests did not overlap");
}

#[tokio::test]
async fn ordinary_saves_send_no_cookie_and_the_outcome_is_in_the_extensions() {
    let store = Store::default();
    let app = app(&store);
    let created = send(&app, "/set/a/1", None).await;
    let outcome = created.extensions().get::<CommitOutcome>().unwrap();
    assert_eq!(outcome.status, CommitStatus::Created);
    let cookie = set_cookie(&created).unwrap();
    let saved = send(&app, "/set/a/2", Some(&cookie)).await;
    assert_eq!(saved.status(), StatusCode::OK);
    assert_eq!(
        saved.extensions().get::<CommitOutcome>().unwrap().status,
        CommitStatus::Saved
    );
    assert!(
        saved.headers().get(SET_COOKIE).is_none(),
        "a save that changes neither the id nor the expiry must not set the cookie again"
    );
    assert_eq!(body(send(&app, "/get/a", Some(&cookie)).await).await, "2");
}

/// Runs a request that changes the session and stops half-way, ends the session with a logout
/// meanwhile, then lets the first request finish; returns its response.
async fn change_while_logged_out(app: &Router, gate: &Gate, cookie: &str) -> Response<Body> {
    let slow = {
        let (app, cookie) = (app.clone(), cookie.to_owned());
        tokio::spawn(async move { send(&app, "/gated/note/kept", Some(&cookie)).await })
    };
    gate.ready.notified().await;
    let logout = send(app, "/logout", Some(cookie)).await;
    assert_eq!(logout.status(), StatusCode::OK);
    gate.go.notify_one();
    slow.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_lost_to_a_concurrent_logout_answer_409_or_as_configured() {
    let store = Store::default();
    let gate = Gate::default();
    let app = app_full(&store, SessionConfig::new, |layer| layer, gate.clone());
    let cookie = set_cookie(&send(&app, "/set/a/1", None).await).unwrap();
    let response = change_while_logged_out(&app, &gate, &cookie).await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert!(response.headers().get(SET_COOKIE).is_none());
    let outcome = response.extensions().get::<CommitOutcome>().unwrap();
    assert!(outcome.lost_changes && outcome.status == CommitStatus::Ended);

    let ignoring = app_full(
        &store,
        SessionConfig::new,
        |layer| layer.lost_writes(LostWrites::Ignore),
        gate.clone(),
    );
    let cookie = set_cookie(&send(&ignoring, "/set/a/1", None).await).unwrap();
    let response = change_while_logged_out(&ignoring, &gate, &cookie).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .extensions()
            .get::<CommitOutcome>()
            .unwrap()
            .lost_changes
    );
    assert_eq!(body(response).await, "set after waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_key_conflict_under_the_fail_policy_answers_409_and_writes_nothing() {
    let store = Store::default();
    let gate = Gate::default();
    let failing = |keys| SessionConfig::new(keys).same_key_conflicts(SameKeyConflict::Fail);
    let app = app_full(&store, failing, |layer| layer, gate.clone());
    let cookie = set_cookie(&send(&app, "/set/note/first", None).await).unwrap();
    let slow = {
        let (app, cookie) = (app.clone(), cookie.clone());
        tokio::spawn(async move { send(&app, "/gated/note/slow", Some(&cookie)).await })
    };
    gate.ready.notified().await;
    let fast = send(&app, "/set/note/fast", Some(&cookie)).await;
    assert_eq!(fast.status(), StatusCode::OK);
    gate.go.notify_one();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), StatusCode::CONFLICT);
    assert_eq!(
        body(send(&app, "/get/note", Some(&cookie)).await).await,
        "fast"
    );
}
