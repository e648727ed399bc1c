//! Refusing forged cross-site requests: [`SameOriginLayer`] (the browser's own word on where a
//! request comes from: tower-http's port of Go's cross-origin protection, re-exported) and
//! [`CsrfLayer`] (that, plus the session's synchronizer token).
//!
//! Why tower-http for the origin check: it is the tower project's own middleware crate, well
//! kept, and its `csrf` module follows Go 1.25's `CrossOriginProtection` (`Sec-Fetch-Site`,
//! then `Origin` against the request's host, trusted origins validated), which is exactly the
//! check wanted here. No kept crate binds a token to a server-side session with per-response
//! masking, so the token check is written here.
//!
//! Only requests with an unsafe method (anything but GET, HEAD and OPTIONS) are checked:
//! handlers of safe methods must not change state. A refused request is answered with 403
//! Forbidden and never reaches the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::body::Body;
use axum_core::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use tower_http::csrf::{Csrf, ProtectionError};

/// Refuses requests with an unsafe method that the browser says come from another origin
/// (`Sec-Fetch-Site`, else `Origin` against the request's host): tower-http's
/// [`CsrfLayer`](tower_http::csrf::CsrfLayer), usable alone. [`CsrfLayer`] includes it.
pub use tower_http::csrf::CsrfLayer as SameOriginLayer;

/// The error [`CsrfLayer::trust_origin`] gives for a string that is not a browser origin.
pub use tower_http::csrf::ConfigError as InvalidOrigin;

use crate::Session;

/// Whether `method` may change state and so needs checking (as tower-http's origin check
/// decides).
fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The 403 answer to a refused request, from either check.
fn forbidden_response() -> Response {
    (
        StatusCode::FORBIDDEN,
        "forbidden: cross-site request refused",
    )
        .into_response()
}

/// The 403 answer to a request the token check refused.
fn forbidden(reason: &'static str) -> Response {
    tracing::info!(reason, "refused a possibly forged cross-site request");
    forbidden_response()
}

/// The 403 answer to a request the origin check refused.
fn refuse_cross_origin(error: ProtectionError) -> Response {
    tracing::info!(%error, "refused a cross-origin request");
    forbidden_response()
}

/// How [`CsrfLayer`] answers a request the origin check refused.
type CrossOriginRejection = fn(ProtectionError) -> Response;

type BoxedResponse<E> = Pin<Box<dyn Future<Output = Result<Response, E>> + Send>>;

/// The settings of [`CsrfLayer`]'s token check.
#[derive(Clone, Debug)]
struct CsrfSettings {
    header: HeaderName,
    form_field: String,
    max_form_bytes: usize,
}

/// Cross-site request forgery protection bound to the session: every request with an unsafe
/// method must carry the session's CSRF token, masked as
/// [`Session::csrf_token`] gives it, in the `x-csrf-token` header or, for an
/// `application/x-www-form-urlencoded` body, in the form field `csrf_token`; and must pass
/// [`SameOriginLayer`]'s origin check. Anything else is answered 403 without calling the
/// handler. A session without a token (a visitor who never loaded a page with a form) has no
/// valid token, which also stops login CSRF: a forged login post from another site carries
/// none.
///
/// Put it inside [`SessionLayer`](crate::SessionLayer) (added before it with
/// `Router::layer`), which must provide the session. The form body is read (up to 64 KiB by
/// default, else 413) and handed on unchanged. Multipart forms must send the header (from a
/// script) or use a urlencoded form.
///
/// The token rotates when the session id is cycled (a login), so a form rendered before a
/// login is refused after it: render forms after the session they post to exists.
#[derive(Clone, Debug)]
pub struct CsrfLayer {
    origin_check: SameOriginLayer<CrossOriginRejection>,
    settings: Arc<CsrfSettings>,
}

impl Default for CsrfLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CsrfLayer {
    /// Token in `x-csrf-token` or the form field `csrf_token`; origin check on; forms up to
    /// 64 KiB.
    pub fn new() -> Self {
        Self {
            origin_check: SameOriginLayer::new()
                .with_rejection_response(refuse_cross_origin as CrossOriginRejection),
            settings: Arc::new(CsrfSettings {
                header: HeaderName::from_static("x-csrf-token"),
                form_field: "csrf_token".to_owned(),
                max_form_bytes: 64 * 1024,
            }),
        }
    }

    fn settings(&mut self) -> &mut CsrfSettings {
        Arc::make_mut(&mut self.settings)
    }

    /// The request header that carries the token.
    pub fn header(mut self, header: HeaderName) -> Self {
        self.settings().header = header;
        self
    }

    /// The form field that carries the token.
    pub fn form_field(mut self, name: impl Into<String>) -> Self {
        self.settings().form_field = name.into();
        self
    }

    /// The largest urlencoded form body read to find the token; a longer one is answered 413.
    pub fn max_form_bytes(mut self, bytes: usize) -> Self {
        self.settings().max_form_bytes = bytes;
        self
    }

    /// Also accepts requests whose `Origin` is exactly `origin`, written as a browser sends it
    /// (`https://app.example.com`: lowercase, no default port, no trailing slash); see
    /// [`SameOriginLayer::add_trusted_origin`].
    pub fn trust_origin(mut self, origin: &str) -> Result<Self, InvalidOrigin> {
        self.origin_check = self.origin_check.add_trusted_origin(origin)?;
        Ok(self)
    }
}

impl<S> tower_layer::Layer<S> for CsrfLayer {
    type Service = CsrfService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.origin_check.layer(CsrfTokenService {
            inner,
            settings: Arc::clone(&self.settings),
        })
    }
}

/// The service [`CsrfLayer`] produces: the origin check around the token check.
pub type CsrfService<S> = Csrf<CsrfTokenService<S>, CrossOriginRejection>;

/// The token check of [`CsrfLayer`].
#[derive(Clone, Debug)]
pub struct CsrfTokenService<S> {
    inner: S,
    settings: Arc<CsrfSettings>,
}

/// Whether the request's body is a urlencoded form.
fn is_urlencoded_form(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        value
            .as_bytes()
            .split(|&b| b == b';')
            .next()
            .is_some_and(|mime| {
                mime.trim_ascii()
                    .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
            })
    })
}

/// What the token check came to.
enum TokenCheck {
    /// The token verified; the request (with its body read back in) goes on.
    Passed(Request<Body>),
    /// The request is refused with this response.
    Refused(Response),
}

impl CsrfSettings {
    /// Finds the token in the header or the form body and verifies it against the session.
    async fn check_token(&self, request: Request<Body>) -> TokenCheck {
        let Some(session) = request.extensions().get::<Session>().cloned() else {
            tracing::error!("CsrfLayer needs a SessionLayer outside it");
            return TokenCheck::Refused(StatusCode::INTERNAL_SERVER_ERROR.into_response());
        };
        let from_header = request
            .headers()
            .get(&self.header)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let (submitted, request) = match from_header {
            Some(token) => (Some(token), request),
            None if is_urlencoded_form(request.headers()) => {
                let (parts, body) = request.into_parts();
                let bytes = match Limited::new(body, self.max_form_bytes).collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(_) => {
                        return TokenCheck::Refused(StatusCode::PAYLOAD_TOO_LARGE.into_response());
                    }
                };
                let token = form_urlencoded::parse(&bytes)
                    .find(|(name, _)| *name == self.form_field.as_str())
                    .map(|(_, value)| value.into_owned());
                (token, Request::from_parts(parts, Body::from(bytes)))
            }
            None => (None, request),
        };
        let Some(submitted) = submitted else {
            return TokenCheck::Refused(forbidden("no CSRF token in the request"));
        };
        match session.verify_csrf_token(&submitted).await {
            Ok(true) => TokenCheck::Passed(request),
            Ok(false) => {
                TokenCheck::Refused(forbidden("the CSRF token does not match the session"))
            }
            Err(error) => TokenCheck::Refused(crate::SessionFailure(error).into_response()),
        }
    }
}

impl<S> tower_service::Service<Request<Body>> for CsrfTokenService<S>
where
    S: tower_service::Service<Request<Body>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxedResponse<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !is_unsafe(request.method()) {
            return Box::pin(self.inner.call(request));
        }
        // The clone that was made ready by poll_ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = Arc::clone(&self.settings);
        Box::pin(async move {
            match settings.check_token(request).await {
                TokenCheck::Passed(request) => inner.call(request).await,
                TokenCheck::Refused(response) => Ok(response),
            }
        })
    }
}
