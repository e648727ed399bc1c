//! The visit counter on plain hyper: `cargo run -p session-embedding --example hyper`, then
//! open <http://127.0.0.1:8082/> and reload.

use std::sync::Arc;

use session_core::{CookieConfig, KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = SessionConfig::new(KeyRing::single(SigningKey::generate()?))
        .cookie(CookieConfig::default().secure(false));
    let manager = SessionManager::new(Arc::new(MemoryStore::new()), config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8082").await?;
    println!("listening on http://{}", listener.local_addr()?);
    session_embedding::hyper_service::serve(listener, manager).await?;
    Ok(())
}
