//! Requests superseded by a login keep their response by default: a double-submitted login,
//! overlapping double clicks, and a page view sent with the cookie of a moment before a login.
//! Their changes are not written (the session moved to a new id), but the session goes on
//! under the new id, so an error page would only alarm the user. An application whose handlers
//! acknowledge changes (a shop's "added to cart") can answer them with a status too. These
//! began as findings of the two adversarial reviews of the lost-writes policy, and failed on
//! the code they were written against.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::header::SET_COOKIE;
use http::{Response, StatusCode};
use session_core::{
    CommitOutcome, CommitStatus, KeyRing, SessionConfig, SessionManager, SigningKey,
};
use session_memory::MemoryStore;
use session_tower::{LostWrites, Session, SessionFailure, SessionLayer};
use tokio::sync::Barrier;

mod common;
use common::{body, send, set_cookie};

/// The README's application: a page that counts visits with `update`, and a login that sets
/// the user and cycles the id. `/login-together` waits until two logins have both loaded and
/// changed the session before answering (a double click whose requests overlap).
fn app() -> Router {
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
        .route("/login", get(login))
        .route(
            "/login-together",
            get(move |session: Session| {
                let barrier = Arc::clone(&barrier);
                async move {
                    let answer = login(session).await?;
                    barrier.wait().await;
                    Ok::<_, SessionFailure>(answer)
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
        .layer(SessionLayer::new(manager(5)))
}

/// A manager over a fresh memory store, signing with a key of `key_byte`s.
fn manager(key_byte: u8) -> SessionManager {
    let keys = KeyRing::single(SigningKey::new([key_byte; 32]).unwrap());
    SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap()
}

/// The login both applications share: sets the user and cycles the id.
async fn login(session: Session) -> Result<&'static str, SessionFailure> {
    session.insert("user", "alice").await?;
    session.cycle_id().await?;
    Ok("welcome")
}

/// Logs in with the pre-login cookie `anonymous`; returns the logged-in cookie.
async fn log_in(app: &Router, anonymous: &str) -> String {
    let response = send(app, "/login", Some(anonymous)).await;
    assert_eq!(response.status(), StatusCode::OK);
    set_cookie(&response).unwrap()
}

/// The user the session of `cookie` holds (`-` for none).
async fn user_of(app: &Router, cookie: &str) -> String {
    body(send(app, "/user", Some(cookie)).await).await
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
    let logged_in = log_in(&app, &anonymous).await;

    let second = send(&app, "/login", Some(&anonymous)).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert!(superseded(&second));
    assert_eq!(user_of(&app, &logged_in).await, "alice");
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
    assert_eq!(user_of(&app, &logged_in).await, "alice");
}

/// An ordinary page view that counts visits with `update` (the README's own example), sent
/// with the pre-login cookie just after a login (in another tab, or in parallel), keeps its
/// page: its count is not written and it sets no cookie that could replace the login's.
#[tokio::test]
async fn a_page_view_racing_a_login_keeps_its_response() {
    let app = app();
    let anonymous = set_cookie(&send(&app, "/", None).await).unwrap();
    let logged_in = log_in(&app, &anonymous).await;

    let page = send(&app, "/", Some(&anonymous)).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(superseded(&page));
    assert_eq!(user_of(&app, &logged_in).await, "alice");
}

/// A shop: `/add/{item}` puts an item in the cart (with `update`, as the README advises),
/// `/login` sets the user and cycles the id, `/cart` lists the cart. The layer is configured
/// to answer lost writes, superseded ones included, with 409.
fn shop() -> Router {
    Router::new()
        .route(
            "/add/{item}",
            get(
                |session: Session, axum::extract::Path(item): axum::extract::Path<String>| async move {
                    let cart = session
                        .update("cart", move |cart: Option<Vec<String>>| {
                            let mut cart = cart.unwrap_or_default();
                            cart.push(item.clone());
                            cart
                        })
                        .await?;
                    Ok::<_, SessionFailure>(format!("added; the cart holds {}", cart.len()))
                },
            ),
        )
        .route("/login", get(login))
        .route(
            "/cart",
            get(|session: Session| async move {
                let cart: Option<Vec<String>> = session.get("cart").await?;
                Ok::<_, SessionFailure>(cart.unwrap_or_default().join(","))
            }),
        )
        .layer(
            SessionLayer::new(manager(12))
                .lost_writes(LostWrites::Respond(StatusCode::CONFLICT))
                .superseded_writes(LostWrites::Respond(StatusCode::CONFLICT)),
        )
}

/// An add-to-cart sent with the cookie of a moment before a login (another tab, or a request
/// in flight while the login's response arrives) cannot be written: the session moved. With
/// `superseded_writes` set, it answers 409 rather than "added", and the cart stays as it was.
#[tokio::test]
async fn an_add_to_cart_with_the_pre_login_cookie_answers_409_when_configured() {
    let app = shop();
    let anonymous = set_cookie(&send(&app, "/add/tea", None).await).unwrap();
    let logged_in = log_in(&app, &anonymous).await;

    // Sent before the login's response arrived, so with the pre-login cookie.
    let added = send(&app, "/add/coffee", Some(&anonymous)).await;
    let status = added.status();
    let outcome = added.extensions().get::<CommitOutcome>().cloned();
    let said = body(added).await;
    let cart = body(send(&app, "/cart", Some(&logged_in)).await).await;
    assert_eq!(status, StatusCode::CONFLICT, "answered {said:?}");
    assert!(outcome.is_some_and(|o| o.status == CommitStatus::Superseded && o.lost_changes));
    assert_eq!(cart, "tea");
}
