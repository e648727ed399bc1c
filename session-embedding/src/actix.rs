//! The visit counter in actix-web: the manager lives in the app data.

use actix_web::http::header::{COOKIE, SET_COOKIE};
use actix_web::{HttpRequest, HttpResponse, web};
use session_core::SessionManager;

use crate::count_visit;

/// The counter route: `GET /` answers `visits: N` and sets the session cookie when needed.
pub async fn counter(request: HttpRequest, manager: web::Data<SessionManager>) -> HttpResponse {
    let cookie_headers = request
        .headers()
        .get_all(COOKIE)
        .map(|value| value.as_bytes());
    match count_visit(&manager, cookie_headers).await {
        Ok((visits, set_cookie)) => {
            let mut response = HttpResponse::Ok();
            if let Some(set_cookie) = set_cookie {
                response.insert_header((SET_COOKIE, set_cookie));
            }
            response.body(format!("visits: {visits}"))
        }
        Err(error) => {
            eprintln!("session error: {error}");
            HttpResponse::InternalServerError().body("session unavailable")
        }
    }
}

/// Registers the counter route; the app must hold a `web::Data<SessionManager>`.
pub fn configure(config: &mut web::ServiceConfig) {
    config.route("/", web::get().to(counter));
}
