//! An application whose handlers acknowledge changes (a shop's "added to cart") can answer
//! superseded writes with a status too. Began as a finding of the second adversarial review,
//! which showed the add-to-cart answering 200 for an item that was not added.

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
use session_tower::{LostWrites, Session, SessionFailure, SessionLayer};
use tower::ServiceExt;

/// A shop: `/add/{item}` puts an item in the cart (with `update`, as the README advises),
/// `/login` sets the user and cycles the id, `/cart` lists the cart. The layer is configured
/// to answer lost writes, superseded ones included, with 409.
fn app() -> Router {
    let keys = KeyRing::single(SigningKey::new([12u8; 32]).unwrap());
    let manager =
        SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap();
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
        .route(
            "/login",
            get(|session: Session| async move {
                session.insert("user", "alice").await?;
                session.cycle_id().await?;
                Ok::<_, SessionFailure>("welcome")
            }),
        )
        .route(
            "/cart",
            get(|session: Session| async move {
                let cart: Option<Vec<String>> = session.get("cart").await?;
                Ok::<_, SessionFailure>(cart.unwrap_or_default().join(","))
            }),
        )
        .layer(
            SessionLayer::new(manager)
                .lost_writes(LostWrites::Respond(StatusCode::CONFLICT))
                .superseded_writes(LostWrites::Respond(StatusCode::CONFLICT)),
        )
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

/// An add-to-cart sent with the cookie of a moment before a login (another tab, or a request
/// in flight while the login's response arrives) cannot be written: the session moved. With
/// `superseded_writes` set, it answers 409 rather than "added", and the cart stays as it was.
#[tokio::test]
async fn an_add_to_cart_with_the_pre_login_cookie_answers_409_when_configured() {
    let app = app();
    let anonymous = set_cookie(&send(&app, "/add/tea", None).await).unwrap();
    let login = send(&app, "/login", Some(&anonymous)).await;
    assert_eq!(login.status(), StatusCode::OK);
    let logged_in = set_cookie(&login).unwrap();

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
