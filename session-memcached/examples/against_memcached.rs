//! Stores a session in a running memcached and reads it back through the manager.
//!
//! `cargo run -p session-memcached --example against_memcached -- memcached://127.0.0.1:11211`
//! (start one first with `memcached -l 127.0.0.1 -p 11211`). Several servers and options go in
//! the URL: `memcached://127.0.0.1:11211,127.0.0.1:11212?timeout_ms=250&connections=2`.

use std::error::Error;
use std::sync::Arc;

use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memcached::MemcachedStore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memcached://127.0.0.1:11211".to_owned());
    let store = MemcachedStore::from_url(&url).await?;
    let keys = KeyRing::single(SigningKey::generate()?);
    let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys))?;

    let mut session = manager.load(None).await?;
    session.insert("user", "alice")?;
    let outcome = manager.commit(session).await?;
    println!("create  {:?}", outcome.status);
    let cookie = outcome.cookie.ok_or("a new session sets a cookie")?.value;

    let mut session = manager.load(Some(&cookie)).await?;
    let user: Option<String> = session.get("user")?;
    println!("load    user = {user:?}");
    session.destroy();
    println!("destroy {:?}", manager.commit(session).await?.status);
    println!("gone    {}", manager.load(Some(&cookie)).await?.is_new());
    Ok(())
}
