//! `SessionManager` embedded by hand, without the tower layer:
//! the same visit counter in [`actix`] (actix-web) and in [`hyper_service`] (plain hyper).
//!
//! The pattern is the same in any framework:
//! 1. find the session cookie in the `Cookie` headers' raw bytes, and verify it
//!    ([`SessionManager::verify_request_cookie`]: the signed one among every cookie of the
//!    name, parsed leniently, so one malformed or non-ASCII cookie does not hide it);
//! 2. `manager.load_request(cookie)` (no second verification, and no store call for a
//!    missing or invalid cookie);
//! 3. read and change the session;
//! 4. `manager.commit(session)`, and write the directive it returns as `Set-Cookie`.

pub mod actix;
pub mod hyper_service;

use session_core::{SessionError, SessionManager};

/// Steps 1 to 4 for the counter page: finds the session cookie in the request's `Cookie`
/// headers (HTTP/2 clients may send several), loads the session, counts the visit, commits,
/// and returns the new count with the `Set-Cookie` value, if any.
pub async fn count_visit<'a>(
    manager: &SessionManager,
    cookie_headers: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(u64, Option<String>), SessionError> {
    let cookie = manager.verify_request_cookie(cookie_headers);
    let mut session = manager.load_request(cookie.as_ref()).await?;
    // An update rather than get + insert: concurrent requests of one browser both count.
    let visits = session.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1)?;
    let outcome = manager.commit(session).await?;
    Ok((visits, outcome.cookie.map(|c| c.to_header_value())))
}
