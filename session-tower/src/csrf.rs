//! Refusing forged cross-site requests: [`SameOriginLayer`] (the browser's own word on where a
//! request comes from) and [`CsrfLayer`] (that, plus the session's synchronizer token).
//!
//! Only requests with an unsafe method (anything but GET, HEAD, OPTIONS and TRACE) are
//! checked: handlers of safe methods must not change state. A refused request is answered
//! with 403 Forbidden and never reaches the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::body::Body;
use axum_core::response::{IntoResponse, Response};
use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Limited};

use crate::Session;

/// The request header browsers set to say where a request comes from.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Whether `method` may change state and so needs checking.
fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Which origins a request may come from.
#[derive(Clone, Debug, Default)]
struct Origins {
    /// Origins (`scheme://host[:port]`, lowercase) trusted besides the request's own host.
    trusted: Vec<String>,
}

impl Origins {
    /// Why the request is cross-origin, or `None` when it is not (or nothing says). The
    /// `Origin` fallback compares host and port only (behind a proxy the scheme of the
    /// request is not known here), and requires an `http` or `https` origin.
    ///
    /// `Sec-Fetch-Site`, when present, decides: only `same-origin` and `none` (typed in,
    /// bookmarked) pass; `same-site` (a sibling subdomain, or another port of the same host)
    /// and `cross-site` do not, unless the `Origin` header names a trusted origin. Without it,
    /// an `Origin` header must name this host (or a trusted origin); `Origin: null` never
    /// passes. A request with neither header (an old browser, a non-browser client) passes
    /// this check; [`CsrfLayer`]'s token check still applies.
    fn refusal(&self, headers: &HeaderMap, uri: &Uri) -> Option<&'static str> {
        let origin = headers
            .get(ORIGIN)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase());
        let trusted = origin
            .as_deref()
            .and_then(web_origin)
            .is_some_and(|(scheme, authority)| {
                let origin = format!("{scheme}://{authority}");
                self.trusted.contains(&origin)
            });
        if let Some(site) = headers.get(SEC_FETCH_SITE) {
            return match site.as_bytes() {
                b"same-origin" | b"none" => None,
                _ if trusted => None,
                _ => Some("Sec-Fetch-Site says the request comes from another site or origin"),
            };
        }
        let origin = origin?;
        if trusted {
            return None;
        }
        let host = headers
            .get(HOST)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase())
            .or_else(|| uri.authority().map(|a| a.as_str().to_ascii_lowercase()));
        // The Host header may carry the default port of the Origin's scheme (some proxies
        // add it); browsers never put it in Origin.
        let same = web_origin(&origin)
            .zip(host)
            .is_some_and(|((scheme, origin_host), host)| {
                let host = host
                    .parse::<http::uri::Authority>()
                    .map(|host| without_default_port(scheme, &host))
                    .unwrap_or(host);
                origin_host == host
            });
        if same {
            None
        } else {
            Some("the Origin header names another origin")
        }
    }

    fn trust(&mut self, origin: &str) -> Result<(), InvalidOrigin> {
        let (scheme, authority) = web_origin(origin.trim_end_matches('/')).ok_or(InvalidOrigin)?;
        self.trusted.push(format!("{scheme}://{authority}"));
        Ok(())
    }
}

/// The scheme and authority of `origin` if it is a web origin (`http` or `https`, a host, an
/// optional port that is a number, nothing else), lowercase and without the scheme's default
/// port (browsers leave it out of `Origin`).
fn web_origin(origin: &str) -> Option<(&'static str, String)> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => "http",
        "https" => "https",
        _ => return None,
    };
    let parsed: http::uri::Authority = authority.parse().ok()?;
    if parsed.as_str() != authority || authority.contains('@') || parsed.host().is_empty() {
        return None;
    }
    if authority.ends_with(':') || parsed.host().starts_with('[') && !parsed.host().ends_with(']') {
        return None;
    }
    let host_is_plain = parsed
        .host()
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        && parsed.host().bytes().any(|b| b.is_ascii_alphanumeric());
    if !host_is_plain {
        return None;
    }
    Some((scheme, without_default_port(scheme, &parsed)))
}

/// `authority` lowercase, without the port when it is `scheme`'s default.
fn without_default_port(scheme: &str, authority: &http::uri::Authority) -> String {
    let default = if scheme == "https" { 443 } else { 80 };
    match authority.port_u16() {
        Some(port) if port == default => authority.host().to_ascii_lowercase(),
        _ => authority.as_str().to_ascii_lowercase(),
    }
}

/// A trusted origin that is not `http://` or `https://` followed by a host and an optional
/// port (`https://app.example.com`, `http://localhost:8080`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidOrigin;

impl std::fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a trusted origin must be http:// or https:// with a host and an optional port, and nothing else")
    }
}

impl std::error::Error for InvalidOrigin {}

/// The 403 answer to a refused request.
fn forbidden(reason: &'static str) -> Response {
    tracing::info!(reason, "refused a possibly forged cross-site request");
    (
        StatusCode::FORBIDDEN,
        "forbidden: cross-site request refused",
    )
        .into_response()
}

/// Refuses requests with an unsafe method that the browser says come from another origin
/// (`Sec-Fetch-Site`, else `Origin` against the `Host` header): a defence against
/// cross-site request forgery that needs no token, usable alone or under [`CsrfLayer`]
/// (which includes it). Behind a proxy that rewrites `Host`, name the public origin with
/// [`trust_origin`](Self::trust_origin).
#[derive(Clone, Debug, Default)]
pub struct SameOriginLayer {
    origins: Arc<Origins>,
}

impl SameOriginLayer {
    /// Only the request's own host is trusted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also accepts requests from `origin` (`https://app.example.com`, with a port when it is
    /// not the scheme's default); anything but such an origin is an error.
    pub fn trust_origin(mut self, origin: &str) -> Result<Self, InvalidOrigin> {
        Arc::make_mut(&mut self.origins).trust(origin)?;
        Ok(self)
    }
}

impl<S> tower_layer::Layer<S> for SameOriginLayer {
    type Service = SameOriginService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SameOriginService {
            inner,
            origins: Arc::clone(&self.origins),
        }
    }
}

/// The service [`SameOriginLayer`] produces.
#[derive(Clone, Debug)]
pub struct SameOriginService<S> {
    inner: S,
    origins: Arc<Origins>,
}

type BoxedResponse<E> = Pin<Box<dyn Future<Output = Result<Response, E>> + Send>>;

impl<S, RequestBody> tower_service::Service<Request<RequestBody>> for SameOriginService<S>
where
    S: tower_service::Service<Request<RequestBody>, Response = Response>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxedResponse<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        if is_unsafe(request.method())
            && let Some(reason) = self.origins.refusal(request.headers(), request.uri())
        {
            return Box::pin(async move { Ok(forbidden(reason)) });
        }
        Box::pin(self.inner.call(request))
    }
}

/// The settings of [`CsrfLayer`].
#[derive(Clone, Debug)]
struct CsrfSettings {
    origins: Origins,
    check_origin: bool,
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
            settings: Arc::new(CsrfSettings {
                origins: Origins::default(),
                check_origin: true,
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

    /// Also accepts requests from `origin` (see [`SameOriginLayer::trust_origin`]).
    pub fn trust_origin(mut self, origin: &str) -> Result<Self, InvalidOrigin> {
        self.settings().origins.trust(origin)?;
        Ok(self)
    }

    /// Whether the origin check runs too (on by default); off leaves only the token check.
    pub fn check_origin(mut self, check: bool) -> Self {
        self.settings().check_origin = check;
        self
    }
}

impl<S> tower_layer::Layer<S> for CsrfLayer {
    type Service = CsrfService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CsrfService {
            inner,
            settings: Arc::clone(&self.settings),
        }
    }
}

/// The service [`CsrfLayer`] produces.
#[derive(Clone, Debug)]
pub struct CsrfService<S> {
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

impl<S> tower_service::Service<Request<Body>> for CsrfService<S>
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
        if self.settings.check_origin
            && let Some(reason) = self
                .settings
                .origins
                .refusal(request.headers(), request.uri())
        {
            return Box::pin(async move { Ok(forbidden(reason)) });
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
