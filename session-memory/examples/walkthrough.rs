//! Walks one session through its life on the memory store, printing each step:
//! create, load, change, cycle the id, destroy.
//!
//! Run with `cargo run -p session-memory --example walkthrough`.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use session_core::{CommitOutcome, KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;

fn show(step: &str, outcome: &CommitOutcome) {
    let cookie = match &outcome.cookie {
        None => "no Set-Cookie".to_owned(),
        Some(directive) => format!("Set-Cookie: {}", directive.to_header_value()),
    };
    println!("{step:<10} {:?}\n{:<10} {cookie}", outcome.status, "");
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = MemoryStore::new();
    let keys = KeyRing::single(SigningKey::generate()?);
    let config = SessionConfig::new(keys).idle_timeout(Duration::from_secs(30 * 60));
    let manager = SessionManager::new(Arc::new(store.clone()), config)?;

    // 1. A first visit with no cookie: nothing is stored until the session holds a value.
    let session = manager.load(None).await?;
    show("anonymous", &manager.commit(session).await?);
    println!("{:<10} sessions stored: {}", "", store.len());

    // 2. Create: the visitor puts something in the session.
    let mut session = manager.load(None).await?;
    session.insert("cart", &vec!["tea", "milk"])?;
    let outcome = manager.commit(session).await?;
    show("create", &outcome);
    let cookie = outcome.cookie.ok_or("a new session sets a cookie")?.value;
    println!("{:<10} sessions stored: {}", "", store.len());

    // 3. Load: the next request presents the cookie.
    let session = manager.load(Some(&cookie)).await?;
    let cart: Option<Vec<String>> = session.get("cart")?;
    println!(
        "load       cart = {cart:?}, new session: {}",
        session.is_new()
    );
    show("", &manager.commit(session).await?);

    // 4. Change: count a visit; the commit saves against the loaded version (and on a
    //    conflict runs the update again on the newer value).
    let mut session = manager.load(Some(&cookie)).await?;
    session.update("visits", |n: Option<u32>| n.unwrap_or(1) + 1)?;
    show("change", &manager.commit(session).await?);

    // 5. Cycle: after login the id changes; the old cookie stops working.
    let mut session = manager.load(Some(&cookie)).await?;
    session.insert("user", "alice")?;
    session.cycle_id();
    let outcome = manager.commit(session).await?;
    show("cycle", &outcome);
    let new_cookie = outcome
        .cookie
        .ok_or("a cycled session sets a cookie")?
        .value;
    let old = manager.load(Some(&cookie)).await?;
    println!(
        "{:<10} old cookie gives a new session: {}",
        "",
        old.is_new()
    );
    let session = manager.load(Some(&new_cookie)).await?;
    let user: Option<String> = session.get("user")?;
    let visits: Option<u32> = session.get("visits")?;
    println!(
        "{:<10} new cookie: user = {user:?}, visits = {visits:?}",
        ""
    );

    // 6. Destroy: logout deletes the session and clears the cookie.
    let mut session = session;
    session.destroy();
    show("destroy", &manager.commit(session).await?);
    let after = manager.load(Some(&new_cookie)).await?;
    println!(
        "{:<10} cookie now gives a new session: {}",
        "",
        after.is_new()
    );
    println!(
        "{:<10} entries stored: {} (the marker the id cycle left under the old id, gone \
         within a minute)",
        "",
        store.len()
    );

    // 7. A tampered cookie is just a fresh session, with no store call.
    let mut tampered = new_cookie.clone();
    tampered.replace_range(0..1, if tampered.starts_with('A') { "B" } else { "A" });
    let session = manager.load(Some(&tampered)).await?;
    println!("tampered   new session: {}", session.is_new());
    Ok(())
}
