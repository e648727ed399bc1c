//! The visit counter on actix-web: `cargo run -p session-embedding --example actix`, then open
//! <http://127.0.0.1:8081/> and reload.

use std::sync::Arc;

use actix_web::{App, HttpServer, web};
use session_core::{CookieConfig, KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let key = SigningKey::generate().map_err(std::io::Error::other)?;
    let config =
        SessionConfig::new(KeyRing::single(key)).cookie(CookieConfig::default().secure(false));
    let manager =
        SessionManager::new(Arc::new(MemoryStore::new()), config).map_err(std::io::Error::other)?;
    let manager = web::Data::new(manager);
    println!("listening on http://127.0.0.1:8081");
    HttpServer::new(move || {
        App::new()
            .app_data(manager.clone())
            .configure(session_embedding::actix::configure)
    })
    .bind(("127.0.0.1", 8081))?
    .run()
    .await
}
