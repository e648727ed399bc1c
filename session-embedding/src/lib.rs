//! `SessionManager` embedded by hand, without the tower layer:
//! the same visit counter in [`actix`] (actix-web) and in [`hyper_service`] (plain hyper).
//!
//! The pattern is the same in any framework:
//! 1. find the session cookie in the `Cookie` headers ([`session_core::find_cookies`] gives
//!    every cookie of the name, [`SessionManager::first_valid_cookie`] the signed one);
//! 2. `manager.load(cookie)` (no store call for a missing or invalid cookie);
//! 3. read and change the session;
//! 4. `manager.commit(session)`, and write the directive it returns as `Set-Cookie`.

pub mod actix;
pub mod hyper_service;

use session_core::{SessionError, SessionManager, find_cookies};

/// Steps 1 to 4 for the counter page: finds the session cookie in the request's `Cookie`
/// headers (HTTP/2 clients may send several), loads the session, counts the visit, commits,
/// and returns the new count with the `Set-Cookie` value, if any.
pub async fn count_visit<'a>(
    manager: &SessionManager,
    cookie_headers: impl IntoIterator<Item = &'a str>,
) -> Result<(u64, Option<String>), SessionError> {
    let name = manager.config().cookie_config().cookie_name();
    let candidates: Vec<&str> = cookie_headers
        .into_iter()
        .flat_map(|header| find_cookies(header, name))
        .collect();
    let cookie = manager.first_valid_cookie(candidates.iter().copied());
    let mut session = manager.load(cookie).await?;
    // An update rather than get + insert: concurrent requests of one browser both count.
    let visits = session.update("visits", |n: Option<u64>| n.unwrap_or(0) + 1)?;
    let outcome = manager.commit(session).await?;
    Ok((visits, outcome.cookie.map(|c| c.to_header_value())))
}
