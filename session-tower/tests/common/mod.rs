//! Request helpers shared by the layer's test files.

use axum::Router;
use axum::body::Body;
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use tower::ServiceExt;

/// Sends a GET of `path` through `app`, with the session cookie `cookie` (beside another
/// cookie, as browsers send them) if there is one.
pub async fn send(app: &Router, path: &str, cookie: Option<&str>) -> Response<Body> {
    let mut request = Request::builder().uri(path);
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, format!("theme=dark; session={cookie}"));
    }
    app.clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

/// The session cookie's value from `Set-Cookie`, if the response sets one.
pub fn set_cookie(response: &Response<Body>) -> Option<String> {
    let header = response.headers().get(SET_COOKIE)?.to_str().unwrap();
    let value = header.strip_prefix("session=")?.split(';').next().unwrap();
    Some(value.to_owned())
}

/// The response body as text.
pub async fn body(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}
