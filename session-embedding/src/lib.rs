//! `SessionManager` embedded by hand, without the tower layer:
//! the same visit counter in [`actix`] (actix-web) and in [`hyper_service`] (plain hyper).
//!
//! The pattern is the same in any framework:
//! 1. find the session cookie in the `Cookie` header ([`session_core::find_cookie`]);
//! 2. `manager.load(cookie)` (no store call for a missing or invalid cookie);
//! 3. read and change the session;
//! 4. `manager.commit(session)`, and write the directive it returns as `Set-Cookie`.

pub mod actix;
pub mod hyper_service;

use session_core::{SessionError, SessionManager, find_cookie};

/// Steps 2 to 4 for the counter page: loads the session the cookie header names, counts the
/// visit, commits, and returns the new count with the `Set-Cookie` value, if any.
pub async fn count_visit(
    manager: &SessionManager,
    cookie_header: Option<&str>,
) -> Result<(u64, Option<String>), SessionError> {
    let name = manager.config().cookie_config().cookie_name();
    let cookie = cookie_header.and_then(|header| find_cookie(header, name));
    let mut session = manager.load(cookie).await?;
    let visits: u64 = session.get("visits")?.unwrap_or(0) + 1;
    session.insert("visits", &visits)?;
    let outcome = manager.commit(session).await?;
    Ok((visits, outcome.cookie.map(|c| c.to_header_value())))
}
