//! Server-side web sessions: the core.
//!
//! - [`SessionId`]: 128 random bits, signed into the cookie value by a rotating [`KeyRing`].
//! - [`StorageKey`]: what a store sees instead of the id, `<prefix><base64url(SHA-256(id))>`.
//! - [`Record`] and the [`codec`]: a session's values and timestamps, and their bytes.
//! - [`SessionStore`]: the contract every backend honors, written out in the [`store`] module.
//! - [`Session`], [`SessionManager`], [`SessionConfig`]: the request flow.
//!
//! ```
//! use std::sync::Arc;
//! use session_core::{KeyRing, SessionConfig, SessionManager, SessionStore, SigningKey};
//!
//! # fn store() -> Arc<dyn SessionStore> { unimplemented!() }
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::single(SigningKey::new("a secret of at least thirty-two bytes!")?);
//! let config = SessionConfig::new(keys).idle_timeout(std::time::Duration::from_secs(3600));
//! let manager = SessionManager::new(store(), config)?;
//! # Ok(()) }
//! ```

pub mod codec;
mod config;
pub mod csrf;
mod error;
mod id;
mod manager;
pub mod observe;
mod record;
mod session;
mod signing;
pub mod store;

pub use config::{CookieConfig, SameKeyConflict, SameSite, SessionConfig};
pub use error::{ConfigError, KeyError, RandomnessError, SessionError, StoreError};
pub use id::{KeyPrefix, SESSION_ID_LEN, SessionId, StorageKey};
pub use manager::{
    CommitOutcome, CommitStatus, CookieDirective, RequestCookie, SessionManager, find_cookie,
    find_cookies,
};
pub use record::Record;
pub use session::Session;
pub use signing::{KeyRing, MAC_KEY_LABEL, SigningKey, VerifiedCookie};
pub use store::{LoadedRecord, SessionStore, StoredEntry, Version};
