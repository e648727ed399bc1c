//! The demo web application: a page that counts the visitor's visits, a login form (any user
//! name; logging in cycles the session id), a page only a logged-in user can see, and logout.
//!
//! An anonymous page view creates no session (a flood of cookieless requests must not fill the
//! store): the first session starts at the login form, which needs one for its CSRF token;
//! from then on the home page counts visits in it. Login and logout are posts checked by
//! [`CsrfLayer`]: a form auto-posted from another site can neither log the user out nor log
//! them in to someone else's account.
//!
//! Configuration, all from the environment:
//! - `SESSION_STORE_URL`: `memory://` (the default), `memcached://host:port[,host:port]...`,
//!   `redis://...`, `rediss://...` or `redis+cluster://...`;
//! - `SESSION_SECRET`: the signing key, at least 32 bytes (a random one, with a warning, when
//!   unset: sessions then end when the process does);
//! - `SESSION_DEMO_ADDR`: where to listen (default `127.0.0.1:8080`; port 0 picks a free one);
//! - `SESSION_COOKIE_SECURE=1`: mark the cookie `Secure` (off by default, since the demo
//!   serves plain HTTP).
//!
//! It prints `listening on http://<address>` once it accepts connections.
//!
//! `/metrics` serves the session metrics (see `session_core::observe`) in Prometheus text format,
//! and `/dashboard` is a page that reads it once a second and shows the counters and a chart of
//! store-call latency, to watch a load run. (A real deployment would serve `/metrics` on an
//! address of its own, not to the public.)

use std::error::Error;
use std::io::Write;
use std::sync::Arc;

use axum::Form;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use session_core::{
    CookieConfig, KeyRing, SessionConfig, SessionManager, SessionStore, SigningKey,
};
use session_memcached::MemcachedStore;
use session_memory::MemoryStore;
use session_redis::RedisStore;
use session_tower::{CsrfLayer, LostWrites, Session, SessionFailure, SessionLayer};

/// Builds the store a `SESSION_STORE_URL` names.
async fn store_from_url(url: &str) -> Result<Arc<dyn SessionStore>, Box<dyn Error>> {
    if url == "memory://" || url.is_empty() {
        Ok(Arc::new(MemoryStore::new()))
    } else if url.starts_with("memcached://") {
        Ok(Arc::new(MemcachedStore::from_url(url).await?))
    } else if url.starts_with("redis") {
        Ok(Arc::new(RedisStore::from_url(url).await?))
    } else {
        Err(format!(
            "SESSION_STORE_URL must start with memory://, memcached:// or redis (got {:?})",
            url.split("://").next().unwrap_or_default()
        )
        .into())
    }
}

fn signing_key() -> Result<SigningKey, Box<dyn Error>> {
    match std::env::var("SESSION_SECRET") {
        Ok(secret) => Ok(SigningKey::new(secret)?),
        Err(_) => {
            eprintln!(
                "warning: SESSION_SECRET is not set; using a random key, so sessions end when \
                 this process does"
            );
            Ok(SigningKey::generate()?)
        }
    }
}

/// Store-call latency buckets, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// How often the exporter drains its histograms.
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder (with latency buckets, so the histogram renders as one)
/// and starts its upkeep; the handle renders the text format.
fn install_metrics() -> Result<PrometheusHandle, Box<dyn Error>> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(session_core::observe::STORE_OPERATION_SECONDS.to_owned()),
            &LATENCY_BUCKETS,
        )?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(METRICS_UPKEEP).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The demo's router over `manager`. A request whose session changes could not be written
/// (its session was logged out or moved by a concurrent request) answers 409 Conflict, the
/// layer's default, instead of pretending it worked. `/metrics` and `/dashboard` are outside
/// the session layers.
fn app(manager: SessionManager, metrics: PrometheusHandle) -> Router {
    let observed = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/dashboard", get(dashboard))
        .with_state(metrics);
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login))
        .route("/private", get(private))
        .route("/logout", axum::routing::post(logout))
        .layer(CsrfLayer::new())
        .layer(SessionLayer::new(manager).lost_writes(LostWrites::Respond(StatusCode::CONFLICT)))
        .merge(observed)
        .layer(axum::middleware::map_response(no_store))
}

/// The metrics in Prometheus text format.
async fn render_metrics(
    axum::extract::State(metrics): axum::extract::State<PrometheusHandle>,
) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

/// A page that polls `/metrics` and shows the counters and a latency chart.
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// Every page here is personal: no cache may keep it (or a `Set-Cookie` with it), and Back
/// after logout must not show the private page from the browser's cache.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1>{body}<nav><a href=\"/\">home</a> · <a href=\"/login\">login</a> · \
         <a href=\"/private\">private</a></nav></body></html>"
    ))
}

async fn home(session: Session) -> Result<Html<String>, SessionFailure> {
    // Visits are counted only in a session that exists: a page view must not create one.
    // An update, not get + insert: if the browser loads two pages at once, both visits count.
    let anonymous = session.is_new().await?;
    let visits = if anonymous {
        0
    } else {
        session
            .update("visits", |n: Option<u64>| n.unwrap_or(0) + 1)
            .await?
    };
    let user: Option<String> = session.get("user").await?;
    let who = match user {
        Some(user) => format!("<p id=\"user\">{}</p>", escape(&user)),
        None => "<p id=\"user\">anonymous</p>".to_owned(),
    };
    let note = if anonymous {
        "<p>Visits are counted once you have a session; the login form starts one.</p>"
    } else {
        ""
    };
    Ok(page(
        "Visits",
        &format!("<p>Visits: <span id=\"visits\">{visits}</span></p>{note}{who}"),
    ))
}

/// The hidden form field carrying the session's CSRF token, masked for this response.
async fn csrf_field(session: &Session) -> Result<String, SessionFailure> {
    let token = session.csrf_token().await?;
    Ok(format!(
        "<input type=\"hidden\" name=\"csrf_token\" value=\"{token}\">"
    ))
}

async fn login_form(session: Session) -> Result<Html<String>, SessionFailure> {
    let csrf = csrf_field(&session).await?;
    Ok(page(
        "Log in",
        &format!(
            "<form method=\"post\" action=\"/login\">{csrf}\
             <label>User name <input id=\"username\" name=\"username\" required></label>\
             <button id=\"login\" type=\"submit\">Log in</button></form>"
        ),
    ))
}

#[derive(Deserialize)]
struct Login {
    username: String,
}

async fn login(session: Session, Form(login): Form<Login>) -> Result<Response, SessionFailure> {
    let username = login.username.trim();
    if username.is_empty() {
        return Ok((StatusCode::BAD_REQUEST, "a user name is required").into_response());
    }
    session.insert("user", username).await?;
    session.cycle_id().await?;
    Ok(Redirect::to("/private").into_response())
}

async fn private(session: Session) -> Result<Response, SessionFailure> {
    let user: Option<String> = session.get("user").await?;
    Ok(match user {
        Some(user) => page(
            "Private",
            &format!(
                "<p>Hello, <span id=\"user\">{}</span>.</p>\
                 <form method=\"post\" action=\"/logout\">{}<button id=\"logout\" \
                 type=\"submit\">Log out</button></form>",
                escape(&user),
                csrf_field(&session).await?
            ),
        )
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            page(
                "Private",
                "<p id=\"user\">not logged in</p><p><a href=\"/login\">Log in</a> first.</p>",
            ),
        )
            .into_response(),
    })
}

async fn logout(session: Session) -> Result<Redirect, SessionFailure> {
    session.destroy().await?;
    Ok(Redirect::to("/"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("SESSION_STORE_URL").unwrap_or_else(|_| "memory://".to_owned());
    let store = store_from_url(&url).await?;
    let secure = std::env::var("SESSION_COOKIE_SECURE").as_deref() == Ok("1");
    let config = SessionConfig::new(KeyRing::single(signing_key()?))
        .cookie(CookieConfig::default().name("demo_session").secure(secure));
    let manager = SessionManager::new(store, config)?;
    let metrics = install_metrics()?;

    let address = std::env::var("SESSION_DEMO_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!(
        "listening on http://{} (sessions in {})",
        listener.local_addr()?,
        url.split("://").next().unwrap_or("memory")
    );
    std::io::stdout().flush()?;
    axum::serve(listener, app(manager, metrics))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
