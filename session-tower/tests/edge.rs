//! The web edge under attack and under shared caches: cache headers, failing handlers,
//! cookieless logouts, hostile `Cookie` headers, and cross-site request forgery.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, HOST, ORIGIN, SET_COOKIE, VARY};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;
use session_tower::{CsrfLayer, SameOriginLayer, Session, SessionFailure, SessionLayer};
use tower::ServiceExt;

mod common;
use common::{body, send, set_cookie};

fn manager() -> SessionManager {
    let keys = KeyRing::single(SigningKey::new([5u8; 32]).unwrap());
    SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap()
}

/// Routes that set, read, fail and log out, under `layer`.
fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route(
            "/set/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    Ok::<_, SessionFailure>("set")
                },
            ),
        )
        .route(
            "/set-public/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    Ok::<_, SessionFailure>(([(CACHE_CONTROL, "public, max-age=60, s-maxage=600")], "set"))
                },
            ),
        )
        .route(
            "/set-no-store/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    Ok::<_, SessionFailure>(([(CACHE_CONTROL, "no-store, no-cache")], "set"))
                },
            ),
        )
        .route(
            "/set-qualified/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    Ok::<_, SessionFailure>((
                        [
                            (CACHE_CONTROL, "private=\"X-User\", max-age=600"),
                            (HeaderName::from_static("cdn-cache-control"), "max-age=600"),
                            (HeaderName::from_static("surrogate-control"), "max-age=600"),
                            (HeaderName::from_static("cloudflare-cdn-cache-control"), "max-age=600"),
                            (HeaderName::from_static("x-accel-expires"), "600"),
                        ],
                        "set",
                    ))
                },
            ),
        )
        .route(
            "/fail-by-session-error/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    Err::<&str, _>(SessionFailure(session_core::SessionError::AlreadyCommitted))
                },
            ),
        )
        .route(
            "/get",
            get(|session: Session| async move {
                let value: Option<String> = session.get("v").await?;
                Ok::<_, SessionFailure>(value.unwrap_or_else(|| "-".into()))
            }),
        )
        .route("/untouched", get(|| async { "no session" }))
        .route(
            "/fail/{value}",
            get(
                |session: Session, axum::extract::Path(value): axum::extract::Path<String>| async move {
                    session.insert("v", &value).await?;
                    session.cycle_id().await?;
                    Ok::<_, SessionFailure>((StatusCode::INTERNAL_SERVER_ERROR, "half done"))
                },
            ),
        )
        .route(
            "/logout-then-fail",
            get(|session: Session| async move {
                session.destroy().await?;
                session.insert("after", "x").await?;
                Ok::<_, SessionFailure>((StatusCode::BAD_GATEWAY, "failed"))
            }),
        )
        .route(
            "/logout",
            get(|session: Session| async move {
                session.destroy().await?;
                Ok::<_, SessionFailure>("out")
            }),
        )
        .layer(layer)
}

fn header(response: &Response<Body>, name: http::header::HeaderName) -> Vec<String> {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_response_setting_the_cookie_is_kept_out_of_shared_caches() {
    let app = app(SessionLayer::new(manager()));
    let response = send(&app, "/set/1", None).await;
    assert!(set_cookie(&response).is_some());
    assert_eq!(header(&response, CACHE_CONTROL), ["no-store"]);
    assert_eq!(header(&response, VARY), ["Cookie"]);

    let response = send(&app, "/set-public/1", None).await;
    assert!(set_cookie(&response).is_some());
    assert_eq!(header(&response, CACHE_CONTROL), ["private, max-age=60"]);

    let response = send(&app, "/set-no-store/1", None).await;
    assert_eq!(header(&response, CACHE_CONTROL), ["no-store, no-cache"]);

    // A private qualified with field names lets a shared cache store the rest of the
    // response; CDN-only cache headers override Cache-Control at the CDNs that honour them.
    let response = send(&app, "/set-qualified/1", None).await;
    assert!(set_cookie(&response).is_some());
    assert_eq!(header(&response, CACHE_CONTROL), ["private, max-age=600"]);
    assert!(header(&response, HeaderName::from_static("cdn-cache-control")).is_empty());
    for cdn_header in [
        "cdn-cache-control",
        "surrogate-control",
        "cloudflare-cdn-cache-control",
        "x-accel-expires",
    ] {
        assert!(
            header(&response, HeaderName::from_static(cdn_header)).is_empty(),
            "{cdn_header}"
        );
    }
}

#[tokio::test]
async fn a_page_that_reads_the_session_varies_on_cookie_and_one_that_does_not_is_left_alone() {
    let app = app(SessionLayer::new(manager()));
    let cookie = set_cookie(&send(&app, "/set/1", None).await).unwrap();
    let read = send(&app, "/get", Some(&cookie)).await;
    assert!(set_cookie(&read).is_none(), "nothing to refresh yet");
    assert_eq!(header(&read, VARY), ["Cookie"]);
    assert!(header(&read, CACHE_CONTROL).is_empty());
    let untouched = send(&app, "/untouched", Some(&cookie)).await;
    assert!(header(&untouched, VARY).is_empty());
    assert!(header(&untouched, CACHE_CONTROL).is_empty());

    let off = self::app(SessionLayer::new(manager()).protect_from_shared_caches(false));
    let response = send(&off, "/set/1", None).await;
    assert!(set_cookie(&response).is_some());
    assert!(header(&response, CACHE_CONTROL).is_empty());
    assert!(header(&response, VARY).is_empty());
}

#[tokio::test]
async fn a_failing_handler_saves_nothing_but_a_logout_still_happens() {
    let app = app(SessionLayer::new(manager()));
    // A new visitor: nothing is created.
    let failed = send(&app, "/fail/x", None).await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(set_cookie(&failed).is_none());
    // An existing session keeps its value and its id.
    let cookie = set_cookie(&send(&app, "/set/before", None).await).unwrap();
    let failed = send(&app, "/fail/after", Some(&cookie)).await;
    assert!(set_cookie(&failed).is_none());
    assert_eq!(
        body(send(&app, "/get", Some(&cookie)).await).await,
        "before"
    );
    // A destroy still ends the session, and the value set after it is not kept.
    let failed = send(&app, "/logout-then-fail", Some(&cookie)).await;
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    let removal = header(&failed, SET_COOKIE);
    assert_eq!(removal.len(), 1);
    assert!(removal[0].starts_with("session=;"), "{removal:?}");
    assert_eq!(body(send(&app, "/get", Some(&cookie)).await).await, "-");

    let saving = self::app(SessionLayer::new(manager()).save_on_server_error(true));
    assert!(set_cookie(&send(&saving, "/fail/x", None).await).is_some());

    // A handler that fails through SessionFailure fails, whatever status the layer gives it.
    let teapot = self::app(SessionLayer::new(manager()).failure_status(StatusCode::IM_A_TEAPOT));
    let failed = send(&teapot, "/fail-by-session-error/x", None).await;
    assert_eq!(failed.status(), StatusCode::IM_A_TEAPOT);
    assert!(set_cookie(&failed).is_none());
}

#[tokio::test]
async fn a_logout_without_a_valid_cookie_sets_no_cookie() {
    let app = app(SessionLayer::new(manager()));
    let response = send(&app, "/logout", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, SET_COOKIE).is_empty());
    let response = send(&app, "/logout", Some("forged.value")).await;
    assert!(header(&response, SET_COOKIE).is_empty());
    // With a valid cookie, the removal is sent.
    let cookie = set_cookie(&send(&app, "/set/1", None).await).unwrap();
    let response = send(&app, "/logout", Some(&cookie)).await;
    assert!(header(&response, SET_COOKIE)[0].starts_with("session=;"));
}

#[tokio::test]
async fn a_non_ascii_or_malformed_cookie_beside_the_session_cookie_is_skipped() {
    let app = app(SessionLayer::new(manager()));
    let cookie = set_cookie(&send(&app, "/set/kept", None).await).unwrap();
    for hostile in [
        format!("planted=caf\u{e9}; session={cookie}").into_bytes(),
        [
            b"junk=\xff\xfe; session=".as_slice(),
            cookie.as_bytes(),
            b"; =novalue; lonely",
        ]
        .concat(),
    ] {
        let request = Request::builder()
            .uri("/get")
            .header(COOKIE, HeaderValue::from_bytes(&hostile).unwrap())
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(body(response).await, "kept");
    }
}

/// A site with a form page and state-changing posts, under CSRF protection.
fn protected_app() -> Router {
    Router::new()
        .route(
            "/form",
            get(|session: Session| async move {
                Ok::<_, SessionFailure>(session.csrf_token().await?)
            }),
        )
        .route(
            "/change",
            post(|session: Session, body: String| async move {
                session.insert("changed", &body).await?;
                Ok::<_, SessionFailure>("changed")
            }),
        )
        .route(
            "/login",
            post(|session: Session| async move {
                session.insert("user", "alice").await?;
                session.cycle_id().await?;
                Ok::<_, SessionFailure>("in")
            }),
        )
        .layer(CsrfLayer::new())
        .layer(SessionLayer::new(manager()))
}

/// A same-origin POST of a urlencoded `form` body, with `extra` headers.
fn form_post(
    path: &str,
    cookie: Option<&str>,
    form: &str,
    extra: &[(&str, &str)],
) -> Request<Body> {
    let mut request = Request::builder()
        .method("POST")
        .uri(path)
        .header(HOST, "app.test")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, format!("session={cookie}"));
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(Body::from(form.to_owned())).unwrap()
}

async fn status_of(app: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    (response.status(), body(response).await)
}

/// A session with a token: the form page's cookie and masked token.
async fn visit_form(app: &Router) -> (String, String) {
    let response = send(app, "/form", None).await;
    let cookie = set_cookie(&response).unwrap();
    (cookie, body(response).await)
}

#[tokio::test]
async fn posts_without_the_sessions_token_are_refused_and_with_it_pass() {
    let app = protected_app();
    let (cookie, token) = visit_form(&app).await;
    let (_, other_token) = visit_form(&app).await;
    let field = |token: &str| format!("a=1&csrf_token={token}");

    let refused = [
        form_post("/change", Some(&cookie), "a=1", &[]),
        form_post("/change", Some(&cookie), &field(&other_token), &[]),
        form_post("/change", Some(&cookie), &field("garbage"), &[]),
        form_post("/change", None, &field(&token), &[]),
    ];
    for request in refused {
        assert_eq!(status_of(&app, request).await.0, StatusCode::FORBIDDEN);
    }
    let (status, text) = status_of(
        &app,
        form_post("/change", Some(&cookie), &field(&token), &[]),
    )
    .await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "changed"));
    // The header works too, and the form body reaches the handler unchanged.
    let by_header = form_post("/change", Some(&cookie), "b=2", &[("x-csrf-token", &token)]);
    assert_eq!(status_of(&app, by_header).await.0, StatusCode::OK);
    // A second, differently masked token of the same session verifies too.
    let again = body(send(&app, "/form", Some(&cookie)).await).await;
    assert_ne!(again, token);
    assert_eq!(
        status_of(
            &app,
            form_post("/change", Some(&cookie), &field(&again), &[])
        )
        .await
        .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_login_without_a_token_is_refused_and_a_login_rotates_the_token() {
    let app = protected_app();
    // Login CSRF: a forged login post carries no token of the victim's session.
    assert_eq!(
        status_of(&app, form_post("/login", None, "user=mallory", &[]))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (cookie, token) = visit_form(&app).await;
    let response = app
        .clone()
        .oneshot(form_post(
            "/login",
            Some(&cookie),
            &format!("csrf_token={token}"),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let new_cookie = set_cookie(&response).unwrap();
    assert_ne!(new_cookie, cookie);
    // The pre-login token no longer works with the new session.
    let old_token = form_post(
        "/change",
        Some(&new_cookie),
        &format!("csrf_token={token}"),
        &[],
    );
    assert_eq!(status_of(&app, old_token).await.0, StatusCode::FORBIDDEN);
    let fresh = body(send(&app, "/form", Some(&new_cookie)).await).await;
    let with_fresh = form_post(
        "/change",
        Some(&new_cookie),
        &format!("csrf_token={fresh}"),
        &[],
    );
    assert_eq!(status_of(&app, with_fresh).await.0, StatusCode::OK);
}

#[tokio::test]
async fn cross_origin_posts_are_refused_even_with_a_valid_token() {
    let app = protected_app();
    let (cookie, token) = visit_form(&app).await;
    let form = format!("csrf_token={token}");
    let cases: [(&[(&str, &str)], StatusCode); 7] = [
        (&[("origin", "http://app.test")], StatusCode::OK),
        (&[("sec-fetch-site", "same-origin")], StatusCode::OK),
        (&[("origin", "http://evil.test")], StatusCode::FORBIDDEN),
        (&[("origin", "null")], StatusCode::FORBIDDEN),
        (&[("sec-fetch-site", "cross-site")], StatusCode::FORBIDDEN),
        (&[("sec-fetch-site", "same-site")], StatusCode::FORBIDDEN),
        (
            &[
                ("sec-fetch-site", "same-site"),
                ("origin", "http://app.test"),
            ],
            StatusCode::FORBIDDEN,
        ),
    ];
    for (headers, expected) in cases {
        let request = form_post("/change", Some(&cookie), &form, headers);
        assert_eq!(status_of(&app, request).await.0, expected, "{headers:?}");
    }
}

#[tokio::test]
async fn the_same_origin_check_works_alone_and_trusts_named_origins() {
    let app = Router::new()
        .route("/change", post(|| async { "changed" }))
        .route("/read", get(|| async { "read" }))
        .layer(
            SameOriginLayer::new()
                .add_trusted_origin("https://front.example")
                .unwrap(),
        );
    let post_from = |origin: &str| {
        Request::builder()
            .method("POST")
            .uri("/change")
            .header(HOST, "api.example")
            .header(ORIGIN, origin)
            .body(Body::empty())
            .unwrap()
    };
    for (origin, expected) in [
        ("http://api.example", StatusCode::OK),
        ("https://front.example", StatusCode::OK),
        ("https://evil.example", StatusCode::FORBIDDEN),
        ("null", StatusCode::FORBIDDEN),
    ] {
        assert_eq!(
            status_of(&app, post_from(origin)).await.0,
            expected,
            "{origin}"
        );
    }
    // Trusted origins must be origins as browsers send them.
    for bad in [
        "front.example",
        "https://front.example/",
        "https://front.example/path",
        "ftp://front.example",
        "null",
    ] {
        assert!(
            SameOriginLayer::new().add_trusted_origin(bad).is_err(),
            "{bad}"
        );
        assert!(CsrfLayer::new().trust_origin(bad).is_err(), "{bad}");
    }
    // Safe methods are never refused.
    let read = Request::builder()
        .uri("/read")
        .header(ORIGIN, "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .body(Body::empty())
        .unwrap();
    assert_eq!(status_of(&app, read).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_oversized_form_is_refused_before_the_handler() {
    let app = protected_app();
    let (cookie, _) = visit_form(&app).await;
    let huge = "a".repeat(70 * 1024);
    assert_eq!(
        status_of(&app, form_post("/change", Some(&cookie), &huge, &[]))
            .await
            .0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}
