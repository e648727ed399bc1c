//! Requests superseded by a login keep their response: a double-submitted login, overlapping
//! double clicks, and a page view sent with the cookie of a moment before a login. Their
//! changes are not written (the session moved to a new id), but the session goes on under the
//! new id, so an error page would only alarm the user. These began as findings of the
//! adversarial review of the lost-writes policy and answered 409 on that code.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response, StatusCode};
use session_core::{
    CommitOutcome, CommitStatus, KeyRing, SessionConfig, SessionManager, SigningKey,
};
use session_memory::MemoryStore;
use session_tower::{Session, SessionFailure, SessionLayer};
use tokio::sync::Barrier;
use tower::ServiceExt;

/// The README's application: a page that counts visits with `update`, and a login that sets
/// the user and cycles the id. `/login-together` waits until two logins have both loaded and
/// changed the session before answering (a double click whose requests overlap).
fn app() -> Router {
    let keys = KeyRing::single(SigningKey::new([5u8; 32]).unwrap());
    let manager =
        SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap();
    let barrier = Arc::new(Barrier::new(2));
    Router::new()
        .route(
            "/",
            get(|session: Session| async move {
                let visits = session
                    .update("visits", |n: Option<u32>| n.unwrap_or(0) + 1)
                    .await?;
                Ok::<_, SessionFailure>(format!("visit number {visits}"))
            }),
        )
        .route(
            "/login",
            get(|session: Session| async move {
                session.insert("user", "alice").await?;
                session.cycle_id().await?;
                Ok::<_, SessionFailure>("welcome")
            }),
        )
        .route(
            "/login-together",
            get(move |session: Session| {
                let barrier = Arc::clone(&barrier);
                async move {
                    session.insert("user", "alice").await?;
                    session.cycle_id().await?;
                    barrier.wait().await;
                    Ok::<_, SessionFailure>("welcome")
                }
            }),
        )
        .route(
            "/user",
            get(|session: Session| async move {
                let user: Option<String> = session.get("user").await?;
                Ok::<_, SessionFailure>(user.unwrap_or_else(|| "-".to_owned()))
            }),
        )
        .layer(SessionLayer::new(manager))
}

async fn body(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn send(app: &Router, path: &str, cookie: Option<&str>) -> Response<Body> {
    let mut request = Request::builder().uri(path);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, format!("session={cookie}"));
    }
    app.clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

fn set_cookie(response: &Response<Body>) -> Option<String> {
    let header = response.headers().get(SET_COOKIE)?.to_str().unwrap();
    let value = header.strip_prefix("session=")?.split(';').next().unwrap();
    Some(value.to_owned())
}

/// Whether the response's commit was superseded: changes not written, no cookie, and the
/// outcome in the extensions says so.
fn superseded(response: &Response<Body>) -> bool {
    let outcome = response.extensions().get::<CommitOutcome>();
    outcome.is_some_and(|o| o.status == CommitStatus::Superseded && o.lost_changes)
        && response.headers().get(SET_COOKIE).is_none()
}

/// A double-submitted login: the second request leaves with the pre-login cookie (the first
/// response has not arrived yet) and reaches the server after the first commit. The user is
/// logged in by the first; the second's changes are not written, it sets no cookie (so it
/// cannot replace the first's), and it keeps its own response instead of an error page.
#[tokio::test]
async fn a_double_submitted_login_keeps_its_response() {
    let app = app();
    let anonymous = set_cookie(&send(&app, "/", None).await).unwrap();
    let first = send(&app, "/login", Some(&anonymous)).await;
    assert_eq!(first.status(), StatusCode::OK);
    let logged_in = set_cookie(&first).unwrap();

    let second = send(&app, "/login", Some(&anonymous)).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert!(superseded(&second));
    assert_eq!(
        body(send(&app, "/user", Some(&logged_in)).await).await,
        "alice"
    );
}

/// The same when both clicks overlap (both load the pre-login session before either commits):
/// one cycle wins, the other is superseded; both answer 200, one sets the cookie, and it
/// loads the logged-in session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_double_submitted_logins_keep_their_responses() {
    let app = app();
    let anonymous = set_cookie(&send(&app, "/", None).await).unwrap();
    let (a, b) = tokio::join!(
        send(&app, "/login-together", Some(&anonymous)),
        send(&app, "/login-together", Some(&anonymous)),
    );
    assert_eq!([a.status(), b.status()], [StatusCode::OK, StatusCode::OK]);
    assert!(
        superseded(&a) != superseded(&b),
        "exactly one of the two is superseded"
    );
    let logged_in = set_cookie(&a).or_else(|| set_cookie(&b)).unwrap();
    assert_eq!(
        body(send(&app, "/user", Some(&logged_in)).await).await,
        "alice"
    );
}

/// An ordinary page view that counts visits with `update` (the README's own example), sent
/// with the pre-login cookie just after a login (in another tab, or in parallel), keeps its
/// page: its count is not written and it sets no cookie that could replace the login's.
#[tokio::test]
async fn a_page_view_racing_a_login_keeps_its_response() {
    let app = app();
    let anonymous = set_cookie(&send(&app, "/", None).await).unwrap();
    let login = send(&app, "/login", Some(&anonymous)).await;
    assert_eq!(login.status(), StatusCode::OK);
    let logged_in = set_cookie(&login).unwrap();

    let page = send(&app, "/", Some(&anonymous)).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(superseded(&page));
    assert_eq!(
        body(send(&app, "/user", Some(&logged_in)).await).await,
        "alice"
    );
}
