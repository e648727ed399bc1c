//! Sessions for tower services and axum handlers.
//!
//! [`SessionLayer`] wraps a service. For each request it reads the session cookie and puts a
//! [`Session`] handle into the request's extensions; nothing is loaded until a handler touches
//! the handle, so a request that never uses its session makes no store call. After the inner
//! service has answered, the layer commits the session through the
//! [`SessionManager`] and writes the `Set-Cookie` header from the manager's cookie directive
//! (only when the cookie changes), and puts the [`CommitOutcome`] in the response's extensions
//! for outer layers to see. A store failure, while committing or in a handler through
//! [`SessionFailure`], turns the response into a 500 (configurable); changes that could not be
//! written because the session was logged out or expired meanwhile turn it into a 409
//! (configurable, see [`LostWrites`]); an invalid cookie is simply a fresh session. The commit runs as a task of its
//! own, so that a client hanging up cannot cut it short: the layer needs a tokio runtime.
//!
//! The layer also keeps shared caches from handing one user's session to another: a
//! response that sets the session cookie gets `Cache-Control: private` (`no-store` when the
//! handler set none), and one whose session was used gets `Vary: Cookie`
//! ([`SessionLayer::protect_from_shared_caches`]). A handler that fails (a 5xx response)
//! has its changes dropped, as if the request never happened, except a
//! [`destroy`](Session::destroy), which still ends the session
//! ([`SessionLayer::save_on_server_error`]). [`CsrfLayer`] and [`SameOriginLayer`] refuse
//! forged cross-site requests.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{Router, routing::get};
//! use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
//! use session_memory::MemoryStore;
//! use session_tower::{Session, SessionFailure, SessionLayer};
//!
//! async fn visits(session: Session) -> Result<String, SessionFailure> {
//!     // Counted by an update, which concurrent requests of one browser never lose.
//!     let visits = session.update("visits", |n: Option<u32>| n.unwrap_or(0) + 1).await?;
//!     Ok(format!("visit number {visits}"))
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::single(SigningKey::generate()?);
//! let manager = SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys))?;
//! let app: Router = Router::new()
//!     .route("/", get(visits))
//!     .layer(SessionLayer::new(manager));
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, COOKIE, SET_COOKIE, VARY};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use session_core::{CommitOutcome, CommitStatus, RequestCookie, SessionError, SessionManager};
use tokio::sync::Mutex;
use tracing::Instrument;

mod csrf;
pub use csrf::{CsrfLayer, CsrfService, CsrfTokenService, InvalidOrigin, SameOriginLayer};

/// Where the request's session is in its life.
enum Slot {
    /// No handler has touched it: nothing loaded, nothing to commit.
    Untouched,
    /// Loaded (or fresh) and possibly changed.
    Loaded(session_core::Session),
    /// Handed to the manager's commit; later use is an error, not a silent loss.
    Committed,
}

/// The lazily loaded session of one request, shared by the layer and the handlers.
struct Shared {
    manager: SessionManager,
    cookie: Option<RequestCookie>,
    slot: Mutex<Slot>,
}

/// The session of the current request: an axum extractor, also found in the request's
/// extensions by any tower service under [`SessionLayer`].
///
/// The first method call loads the session (one store call, or none for a missing or invalid
/// cookie); the layer commits it after the response is produced. Clones share the session.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    fn new(manager: SessionManager, cookie: Option<RequestCookie>) -> Self {
        Self {
            shared: Arc::new(Shared {
                manager,
                cookie,
                slot: Mutex::new(Slot::Untouched),
            }),
        }
    }

    /// Runs `f` on the loaded session, loading it first if needed.
    async fn with<R>(
        &self,
        f: impl FnOnce(&mut session_core::Session) -> R,
    ) -> Result<R, SessionError> {
        let mut slot = self.shared.slot.lock().await;
        if let Slot::Untouched = *slot {
            let loaded = self
                .shared
                .manager
                .load_request(self.shared.cookie.as_ref())
                .await?;
            *slot = Slot::Loaded(loaded);
        }
        match &mut *slot {
            Slot::Loaded(session) => Ok(f(session)),
            _ => Err(SessionError::AlreadyCommitted),
        }
    }

    /// The value named `name` decoded as `T`, or `None`.
    pub async fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SessionError> {
        self.with(|session| session.get(name)).await?
    }

    /// Sets the value named `name` to what `f` computes from its current value, and returns
    /// the new value; `f` runs again on the newer value if a concurrent request saved the
    /// session first, so no change is lost (see
    /// [`session_core::Session::update`]).
    ///
    /// ```
    /// # async fn handler(session: session_tower::Session) -> Result<String, session_tower::SessionFailure> {
    /// let visits = session.update("visits", |n: Option<u32>| n.unwrap_or(0) + 1).await?;
    /// Ok(format!("visit number {visits}"))
    /// # }
    /// ```
    pub async fn update<T, F>(&self, name: &str, f: F) -> Result<T, SessionError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T + Send + 'static,
    {
        self.with(|session| session.update(name, f)).await?
    }

    /// Sets the value named `name`.
    pub async fn insert<T: Serialize + ?Sized>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<(), SessionError> {
        self.with(|session| session.insert(name, value)).await?
    }

    /// Removes the value named `name`; returns whether there was one.
    pub async fn remove(&self, name: &str) -> Result<bool, SessionError> {
        self.with(|session| session.remove(name)).await
    }

    /// Removes every value.
    pub async fn clear(&self) -> Result<(), SessionError> {
        self.with(session_core::Session::clear).await
    }

    /// Gives the session a new id when the response is committed (after login).
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        self.with(session_core::Session::cycle_id).await
    }

    /// Ends the session: it is deleted and the cookie cleared when the response is committed.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        self.with(session_core::Session::destroy).await
    }

    /// Whether no stored session stands behind this one.
    pub async fn is_new(&self) -> Result<bool, SessionError> {
        self.with(|session| session.is_new()).await
    }

    /// The session's CSRF token, masked afresh, for a hidden form field (named as
    /// [`CsrfLayer`] expects, `csrf_token` by default) or a request header; see
    /// [`session_core::csrf`]. Makes the token on first use, which creates the session.
    pub async fn csrf_token(&self) -> Result<String, SessionError> {
        self.with(session_core::Session::csrf_token).await?
    }

    /// Whether `submitted` is a masked form of the session's CSRF token ([`CsrfLayer`] calls
    /// this; handlers that check tokens themselves can too).
    pub async fn verify_csrf_token(&self, submitted: &str) -> Result<bool, SessionError> {
        self.with(|session| session.verify_csrf_token(submitted))
            .await
    }

    /// Takes the session out for the commit; `None` when no handler used it (then the
    /// response does not depend on the cookie). Later use of the handle is an error.
    async fn take_for_commit(&self) -> Option<session_core::Session> {
        match std::mem::replace(&mut *self.shared.slot.lock().await, Slot::Committed) {
            Slot::Loaded(session) => Some(session),
            Slot::Untouched | Slot::Committed => None,
        }
    }
}

/// Commits a session a handler used; `None` when `discard_changes` (a failed handler) leaves
/// nothing to do. A discarded session that was destroyed is still ended, without the values
/// set after the destroy.
async fn commit_used(
    manager: &SessionManager,
    mut session: session_core::Session,
    discard_changes: bool,
) -> Result<Option<CommitOutcome>, SessionError> {
    if discard_changes {
        if !session.is_destroyed() {
            tracing::debug!("the handler failed; its session changes are not saved");
            return Ok(None);
        }
        session.destroy();
    }
    manager.commit(session).await.map(Some)
}

/// The handler-facing error of a session operation: answers with the layer's failure status
/// (500 Internal Server Error unless [`SessionLayer::failure_status`] says otherwise).
///
/// `?` converts a [`SessionError`] into it, so handlers can return
/// `Result<impl IntoResponse, SessionFailure>`.
#[derive(Debug)]
pub struct SessionFailure(pub SessionError);

impl From<SessionError> for SessionFailure {
    fn from(error: SessionError) -> Self {
        Self(error)
    }
}

impl fmt::Display for SessionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SessionFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Marks a response made from a [`SessionFailure`], so the layer can give it its status.
#[derive(Clone, Copy)]
struct FailureMarker;

impl IntoResponse for SessionFailure {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, source = ?std::error::Error::source(&self.0), "session operation failed");
        let mut response =
            (StatusCode::INTERNAL_SERVER_ERROR, "session unavailable").into_response();
        response.extensions_mut().insert(FailureMarker);
        response
    }
}

/// The rejection when a handler asks for a [`Session`] but no [`SessionLayer`] is installed.
#[derive(Debug)]
pub struct MissingSessionLayer;

impl IntoResponse for MissingSessionLayer {
    fn into_response(self) -> Response {
        tracing::error!("a handler asked for a Session, but no SessionLayer is installed");
        (StatusCode::INTERNAL_SERVER_ERROR, "session layer missing").into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = MissingSessionLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(MissingSessionLayer)
    }
}

/// What the layer does with the response of a request whose session changes were not
/// written because the session ended while the request ran (a concurrent logout, or an
/// expiry: [`CommitStatus::Ended`] with
/// [`CommitOutcome::lost_changes`]), or because a concurrent request changed the same value
/// under [`SameKeyConflict::Fail`](session_core::SameKeyConflict::Fail)
/// ([`SessionError::ConcurrentModification`]). Either way it is logged at `warn`.
///
/// Changes lost because the session *moved* to a new id ([`CommitStatus::Superseded`]: a
/// double-submitted login, or a page view sent with the cookie of a moment before a login)
/// have a policy of their own, [`SessionLayer::superseded_writes`], which keeps the handler's
/// response by default: the session goes on under the new id, whose cookie the browser has or
/// is getting, so an error page would mostly alarm the user over a double click. An
/// application whose handlers acknowledge changes (an "added to cart" page) may answer those
/// with 409 too. Every lost change is logged and counted, and the outcome is in the response's
/// extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostWrites {
    /// Keep the handler's response.
    Ignore,
    /// Replace it with an empty response of this status. The default is
    /// `Respond(StatusCode::CONFLICT)`: the handler's success must not stand for a change that
    /// was not made.
    Respond(StatusCode),
}

impl Default for LostWrites {
    fn default() -> Self {
        Self::Respond(StatusCode::CONFLICT)
    }
}

/// Adds sessions to a service. See the [crate documentation](crate).
#[derive(Clone, Debug)]
pub struct SessionLayer {
    manager: SessionManager,
    failure_status: StatusCode,
    lost_writes: LostWrites,
    superseded_writes: LostWrites,
    protect_caches: bool,
    save_on_server_error: bool,
}

impl SessionLayer {
    /// A layer over `manager`; a failed commit answers 500, lost changes 409; cache headers
    /// protect the cookie; a 5xx response's session changes are dropped.
    pub fn new(manager: SessionManager) -> Self {
        Self {
            manager,
            failure_status: StatusCode::INTERNAL_SERVER_ERROR,
            lost_writes: LostWrites::default(),
            superseded_writes: LostWrites::Ignore,
            protect_caches: true,
            save_on_server_error: false,
        }
    }

    /// Whether responses get the cache headers that keep a shared cache (a CDN, a proxy) from
    /// storing one user's session cookie or session-dependent page and serving it to others
    /// (on by default):
    ///
    /// - a response with a session `Set-Cookie` gets `Cache-Control: no-store` when the
    ///   handler set no `Cache-Control`; one the handler set is kept if it already says
    ///   `no-store` or `private`, and otherwise made `private` (dropping `public` and
    ///   `s-maxage`);
    /// - a response whose session a handler used gets `Vary: Cookie`.
    pub fn protect_from_shared_caches(mut self, protect: bool) -> Self {
        self.protect_caches = protect;
        self
    }

    /// Whether the session changes of a request whose response is a server error (5xx), or
    /// that failed with [`SessionFailure`] (whatever [`failure_status`](Self::failure_status)
    /// makes of it), are saved (off by default: a handler that failed half-way, or panicked
    /// inside a layer that turns panics into 500s, leaves the session as it was). A
    /// [`destroy`](Session::destroy) is carried out either way.
    pub fn save_on_server_error(mut self, save: bool) -> Self {
        self.save_on_server_error = save;
        self
    }

    /// The status that replaces the response when committing the session fails (for example
    /// 503 Service Unavailable).
    pub fn failure_status(mut self, status: StatusCode) -> Self {
        self.failure_status = status;
        self
    }

    /// What to do when a request's session changes were not written (default: answer 409
    /// Conflict); see [`LostWrites`].
    pub fn lost_writes(mut self, policy: LostWrites) -> Self {
        self.lost_writes = policy;
        self
    }

    /// What to do when a request's session changes were not written because a concurrent
    /// login moved the session to a new id first ([`CommitStatus::Superseded`]; default: keep
    /// the handler's response); see [`LostWrites`].
    pub fn superseded_writes(mut self, policy: LostWrites) -> Self {
        self.superseded_writes = policy;
        self
    }
}

impl<S> tower_layer::Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionLayer`] produces.
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    layer: SessionLayer,
}

/// The session cookie of a request, verified once (see
/// [`SessionManager::verify_request_cookie`]).
fn request_cookie(headers: &HeaderMap, manager: &SessionManager) -> Option<RequestCookie> {
    manager.verify_request_cookie(headers.get_all(COOKIE).iter().map(HeaderValue::as_bytes))
}

/// The comma-separated items of every `name` header, trimmed, empties dropped.
fn header_items(headers: &HeaderMap, name: http::header::HeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|item| item.trim().to_owned())
                .filter(|item| !item.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Headers by which CDNs and caching proxies let the origin override `Cache-Control` for them
/// alone.
const CDN_CACHE_HEADERS: [&str; 6] = [
    "cdn-cache-control",
    "surrogate-control",
    "cloudflare-cdn-cache-control",
    "vercel-cdn-cache-control",
    "edge-control",
    "x-accel-expires",
];

/// Keeps shared caches from storing a response that sets the session cookie: no
/// `Cache-Control` becomes `no-store`; one without `no-store` or a bare `private` becomes
/// `private` (without `public`, `s-maxage` or a `private` qualified with field names, which
/// lets shared caches store the rest); CDN-only cache headers are removed.
fn make_private(headers: &mut HeaderMap) {
    for cdn_header in CDN_CACHE_HEADERS {
        headers.remove(cdn_header);
    }
    let directives = header_items(headers, CACHE_CONTROL);
    let name_of = |directive: &str| {
        let name = directive.split('=').next().unwrap_or_default();
        name.trim().to_ascii_lowercase()
    };
    let names: Vec<String> = directives.iter().map(|d| name_of(d)).collect();
    // A bare `private` or `no-store` keeps every shared cache out; a `private` qualified with
    // field names does not.
    let keeps_shared_caches_out = directives
        .iter()
        .zip(&names)
        .any(|(directive, name)| name == "no-store" || directive.eq_ignore_ascii_case("private"));
    if keeps_shared_caches_out {
        return;
    }
    let value = if directives.is_empty() {
        "no-store".to_owned()
    } else {
        let kept = directives
            .iter()
            .zip(&names)
            .filter(|(_, name)| !matches!(name.as_str(), "public" | "s-maxage" | "private"))
            .map(|(directive, _)| directive.as_str());
        std::iter::once("private")
            .chain(kept)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let value = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("no-store"));
    headers.insert(CACHE_CONTROL, value);
}

/// Adds `Cookie` to `Vary`, unless it (or `*`) is there already.
fn vary_on_cookie(headers: &mut HeaderMap) {
    let present = header_items(headers, VARY)
        .iter()
        .any(|field| field == "*" || field.eq_ignore_ascii_case("cookie"));
    if !present {
        headers.append(VARY, HeaderValue::from_static("Cookie"));
    }
}

/// The status a lost write is answered with, if any.
fn lost_write_status(policy: LostWrites) -> Option<StatusCode> {
    match policy {
        LostWrites::Ignore => None,
        LostWrites::Respond(status) => Some(status),
    }
}

/// A response with the layer's failure status and an empty body.
fn failure_response<B: Default>(status: StatusCode) -> http::Response<B> {
    let mut failed = http::Response::new(B::default());
    *failed.status_mut() = status;
    failed
}

impl<S, RequestBody, ResponseBody> tower_service::Service<Request<RequestBody>>
    for SessionService<S>
where
    S: tower_service::Service<Request<RequestBody>, Response = http::Response<ResponseBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RequestBody: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let cookie = request_cookie(request.headers(), &self.layer.manager);
        let manager = self.layer.manager.clone();
        let session = Session::new(manager.clone(), cookie);
        request.extensions_mut().insert(session.clone());
        // The clone that was made ready by poll_ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let failure_status = self.layer.failure_status;
        let (lost_writes, superseded_writes) =
            (self.layer.lost_writes, self.layer.superseded_writes);
        let (protect_caches, save_on_server_error) =
            (self.layer.protect_caches, self.layer.save_on_server_error);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            let handler_failed = response.extensions().get::<FailureMarker>().is_some();
            if handler_failed {
                *response.status_mut() = failure_status;
            }
            let discard =
                (handler_failed || response.status().is_server_error()) && !save_on_server_error;
            let Some(used) = session.take_for_commit().await else {
                // The handler never touched the session: nothing to commit.
                return Ok(response);
            };
            if protect_caches {
                vary_on_cookie(response.headers_mut());
            }
            // A failed handler's changes are dropped; only its destroy is carried out.
            let calls_store =
                (!discard || used.is_destroyed()) && manager.commit_calls_store(&used);
            let committed = if calls_store {
                // The commit runs as its own task, so that a client hanging up (which drops
                // this future) cannot stop a logout's delete or an id cycle half-way. It stays
                // in the request's span (tower-http's `TraceLayer`, say), so its spans nest
                // under it.
                tokio::spawn(
                    async move { commit_used(&manager, used, discard).await }
                        .instrument(tracing::Span::current()),
                )
                .await
            } else {
                // No store call, so nothing a hang-up could stop half-way: no task.
                Ok(commit_used(&manager, used, discard).await)
            };
            let replace_with = match committed {
                Ok(Ok(Some(outcome))) => {
                    let cookie = outcome
                        .cookie
                        .as_ref()
                        .map(|directive| HeaderValue::from_str(&directive.to_header_value()));
                    let lost = match outcome.status {
                        _ if !outcome.lost_changes => None,
                        CommitStatus::Superseded => lost_write_status(superseded_writes),
                        _ => lost_write_status(lost_writes),
                    };
                    response.extensions_mut().insert(outcome);
                    match cookie {
                        Some(Ok(value)) => {
                            response.headers_mut().append(SET_COOKIE, value);
                            if protect_caches {
                                make_private(response.headers_mut());
                            }
                            None
                        }
                        Some(Err(_)) => {
                            tracing::error!("the session cookie is not a valid header value");
                            Some(failure_status)
                        }
                        None => lost,
                    }
                }
                Ok(Ok(None)) => None,
                Ok(Err(SessionError::ConcurrentModification { name })) => {
                    tracing::warn!(
                        name,
                        "a concurrent request changed the same session value; nothing was written"
                    );
                    lost_write_status(lost_writes)
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, source = ?std::error::Error::source(&error), "committing the session failed");
                    Some(failure_status)
                }
                Err(join_error) => {
                    tracing::error!(%join_error, "the session commit task failed");
                    Some(failure_status)
                }
            };
            if let Some(status) = replace_with {
                let outcome = response.extensions_mut().remove::<CommitOutcome>();
                response = failure_response(status);
                if let Some(outcome) = outcome {
                    response.extensions_mut().insert(outcome);
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use session_core::{KeyRing, SessionConfig, SessionId, SigningKey};
    use session_memory::MemoryStore;

    use super::*;

    fn manager() -> SessionManager {
        let keys = KeyRing::single(SigningKey::new([6u8; 32]).unwrap());
        SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap()
    }

    #[test]
    fn a_signed_cookie_wins_over_planted_ones_of_the_same_name() {
        let manager = manager();
        let keys = KeyRing::single(SigningKey::new([6u8; 32]).unwrap());
        let id = SessionId::generate().unwrap();
        let valid = keys.sign("session", &id);
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1; session=planted; b=2"),
        );
        headers.append(
            COOKIE,
            HeaderValue::from_str(&format!("session={valid}")).unwrap(),
        );
        let found = request_cookie(&headers, &manager).expect("a session cookie");
        assert_eq!(found.verified().map(|cookie| cookie.id()), Some(&id));

        let mut only_bad = HeaderMap::new();
        only_bad.append(COOKIE, HeaderValue::from_static("x=1; session=abc.def"));
        let found = request_cookie(&only_bad, &manager).expect("a session cookie");
        assert!(!found.is_valid());
        let mut none = HeaderMap::new();
        none.append(COOKIE, HeaderValue::from_static("novalue; =x; session"));
        assert!(request_cookie(&none, &manager).is_none());
    }
}
