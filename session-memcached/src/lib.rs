//! [`MemcachedStore`]: sessions in memcached, the primary backend, on one server or spread over
//! several by rendezvous hashing.
//!
//! It speaks memcached's meta protocol through the `memcache` crate's experimental `exp`
//! client ([`AsyncMetaClient`]), pinned to exactly `=0.21.0`:
//!
//! | store operation | meta command |
//! |---|---|
//! | `create` | `ms <key> <size> T<ttl> MS c` with add mode (`ME`): stores only if absent |
//! | `load` | `mg <key> v c t`: the value, its CAS (the version) and its remaining TTL |
//! | `save` | `ms <key> <size> T<ttl> C<cas> c`: compare-and-set; a vanished item stays vanished |
//! | `mark_moved` | `ms <key> <size> T<ttl> C<cas> F<expiry> c`: the marker, compare-and-set; its client flags hold its expiry |
//! | `touch` | `mg <key> T<ttl> f` without the value; nonzero flags (a marker) answer "no session", and a second `mg` gives the marker back its expiry |
//! | `delete` | `md <key>` |
//! | `delete_if_version` | `md <key> C<cas>`: removed only at that CAS |
//!
//! TTLs are sent as whole seconds rounded up, plus one: memcached's clock ticks once a second,
//! so an item stored with `T<n>` may expire up to a second before `n` seconds have passed. With
//! the extra second an entry never expires early, and outlives its TTL by at most two seconds.
//! TTLs above 30 days are sent as absolute timestamps (memcached's rule), which the client does.
//! A server started with CAS disabled (`-C`) cannot hold sessions safely and is reported as a
//! backend error. Every operation is bounded by
//! [`MemcachedConfig::operation_deadline`]: a dead server gives [`StoreError::Backend`], a hung
//! one [`StoreError::Timeout`], and the store recovers by itself when the server is back
//! (dead pooled connections are dropped and redialed).
//!
//! TLS: the `tls` feature forwards to the `memcache` crate's OpenSSL support. In 0.21.0 the
//! `exp` client dials plain TCP only, so this store does not yet use TLS even with the feature;
//! reach a TLS-only memcached through a local TLS tunnel until the client gains it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
//! use session_memcached::{MemcachedConfig, MemcachedStore};
//!
//! let config = MemcachedConfig::from_url("memcached://10.0.0.1:11211,10.0.0.2:11211?timeout_ms=250")?;
//! let store = MemcachedStore::connect(config).await?;
//! let keys = KeyRing::single(SigningKey::new(std::env::var("SESSION_SECRET")?)?);
//! let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys))?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use memcache::exp::{AsyncMetaClient, GetStatus, Meta, MutationResult, MutationStatus, Ttl};
use session_core::codec::{encode_moved, encode_record_within};
use session_core::store::check_ttl;
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

mod config;

pub use config::{ConfigError, MemcachedConfig, UrlError};
/// The client crate, re-exported so applications use the same version.
pub use memcache;

/// The memcached session store. Cheap to clone: clones share the connection pools.
#[derive(Clone)]
pub struct MemcachedStore {
    client: AsyncMetaClient,
    key_prefix: String,
    max_record_size: usize,
    deadline: Duration,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedStore")
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl MemcachedStore {
    /// Builds the store: checks the configuration and resolves the server addresses.
    /// Connections are dialed on first use, so a server that is down now fails operations,
    /// not construction.
    pub async fn connect(config: MemcachedConfig) -> Result<Self, ConfigError> {
        let config = config.validated()?;
        let resolve = AsyncMetaClient::builder()
            .connect_timeout(Some(config.connect_timeout))
            .io_timeout(Some(config.io_timeout))
            .max_idle(config.max_idle)
            .max_connections(config.max_connections)
            .connect_multiple_async(config.servers.iter().map(String::as_str));
        let client = tokio::time::timeout(config.connect_timeout, resolve)
            .await
            .map_err(|_| ConfigError::ResolveTimeout)?
            .map_err(ConfigError::Resolve)?;
        Ok(Self {
            client,
            key_prefix: config.key_prefix.clone(),
            max_record_size: config.max_item_size - MemcachedConfig::ITEM_OVERHEAD,
            deadline: config.operation_deadline(),
        })
    }

    /// Builds the store from a `memcached://` URL; see [`MemcachedConfig::from_url`].
    pub async fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::connect(MemcachedConfig::from_url(url)?).await
    }

    /// The underlying client, for operations this store does not cover.
    pub fn client(&self) -> &AsyncMetaClient {
        &self.client
    }

    /// Reads and decodes the entry under `key`: the one body of `load_entry` and `load`.
    async fn read_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        let item_key = self.item_key(key);
        let request = self
            .client
            .get(item_key.as_bytes())
            .meta(Meta::NONE.cas().ttl())
            .send();
        let result = self.run("load", request).await?;
        let (GetStatus::Hit, Some(bytes)) = (result.status, result.value) else {
            return Ok(None);
        };
        let cas = result
            .item
            .cas
            .ok_or_else(|| unexpected("load", "no CAS value in the reply".into()))?;
        let version = checked_cas("load", cas)?;
        // Without the second every write adds for the coarse clock (see `wire_ttl`), so that a
        // save with the time reported left keeps the expiry where it is instead of moving it a
        // second later each time.
        let expires_in = result
            .item
            .ttl
            .and_then(|secs| u64::try_from(secs).ok())
            .map(|secs| Duration::from_secs(secs.saturating_sub(1)));
        StoredEntry::decode(&bytes, self.max_record_size, version, expires_in).map(Some)
    }

    fn item_key<'a>(&self, key: &'a StorageKey) -> Cow<'a, str> {
        key.prefixed(&self.key_prefix)
    }

    /// Sets `key` to the encoded `record` for `ttl` under `condition`, asking for the new CAS.
    async fn write(
        &self,
        operation: &'static str,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        condition: Condition,
    ) -> Result<MutationResult, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.max_record_size)?;
        self.write_bytes(operation, key, &bytes, SESSION_FLAGS, ttl, condition)
            .await
    }

    /// Sets `key` to `bytes` with client `flags` for `ttl` under `condition`, asking for the
    /// new CAS.
    async fn write_bytes(
        &self,
        operation: &'static str,
        key: &StorageKey,
        bytes: &[u8],
        flags: u32,
        ttl: Duration,
        condition: Condition,
    ) -> Result<MutationResult, StoreError> {
        let item_key = self.item_key(key);
        let request = self
            .client
            .set(item_key.as_bytes(), bytes)
            .client_flags(flags)
            .ttl(wire_ttl(ttl))
            .return_cas();
        let request = match condition {
            Condition::Absent => request.add(),
            Condition::Cas(cas) => request.compare_cas(cas),
        };
        self.run(operation, request.send()).await
    }

    /// Runs one client call and maps its failure. The client bounds every call itself (a dial
    /// by the connect timeout, an exchange by the I/O timeout, a wait for a pooled connection
    /// by the connect timeout), so no timer of our own is armed on this hot path; the fault
    /// tests check the bound.
    async fn run<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = memcache::exp::Result<T>>,
    ) -> Result<T, StoreError> {
        call.await
            .map_err(|error| map_error(operation, error, self.deadline))
    }
}

/// Transport timeouts (a hung server) become [`StoreError::Timeout`]; anything else is
/// [`StoreError::Backend`] with the client's error as its source.
fn map_error(operation: &'static str, error: memcache::exp::Error, after: Duration) -> StoreError {
    use memcache::exp::Error as E;
    let timed_out = |e: &E| match e {
        E::Timeout { .. } => true,
        E::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    let is_timeout = match &error {
        E::Ambiguous { source, .. } => timed_out(source),
        other => timed_out(other),
    };
    if is_timeout {
        StoreError::Timeout { operation, after }
    } else {
        StoreError::Backend {
            operation,
            source: Box::new(error),
        }
    }
}

/// The TTL to send for `ttl`: whole seconds rounded up, plus one for memcached's coarse clock.
fn wire_ttl(ttl: Duration) -> Ttl {
    Ttl::from(ttl + Duration::from_secs(1))
}

/// A CAS value of zero means the server runs with CAS disabled (`-C`): every compare would
/// match, so versions would mean nothing.
fn checked_cas(operation: &'static str, cas: u64) -> Result<Version, StoreError> {
    if cas == 0 {
        return Err(unexpected(
            operation,
            "memcached runs with CAS disabled (-C); sessions need CAS".into(),
        ));
    }
    Ok(Version::new(cas))
}

/// The client flags of an item holding a session record. A moved marker's flags are instead
/// the moment it expires, in Unix seconds (never zero), so that `touch`, which reads flags but
/// not values, can tell a marker from a session and give the marker back its own expiry.
const SESSION_FLAGS: u32 = 0;

/// The longest key memcached accepts, in bytes.
const MAX_MEMCACHED_KEY_LEN: usize = 250;

/// When a write may happen.
enum Condition {
    /// Only if no item exists (memcached's add mode).
    Absent,
    /// Only if the item's CAS value is still this one.
    Cas(u64),
}

/// The version of an applied write: the item's new CAS value.
fn written_version(operation: &'static str, result: MutationResult) -> Result<Version, StoreError> {
    match (result.status, result.cas) {
        (MutationStatus::Applied, Some(cas)) => checked_cas(operation, cas),
        (MutationStatus::Applied, None) => {
            Err(unexpected(operation, "no CAS value in the reply".into()))
        }
        (other, _) => Err(unexpected(operation, format!("unexpected reply {other:?}"))),
    }
}

fn unexpected(operation: &'static str, what: String) -> StoreError {
    StoreError::Backend {
        operation,
        source: what.into(),
    }
}

#[async_trait]
impl SessionStore for MemcachedStore {
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        let result = self
            .write("create", key, record, ttl, Condition::Absent)
            .await?;
        match result.status {
            MutationStatus::AlreadyExists => Err(StoreError::AlreadyExists),
            _ => written_version("create", result),
        }
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.read_entry(key).await
    }

    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        // Not the trait's default, which would box a second future around `load_entry`.
        Ok(self
            .read_entry(key)
            .await?
            .and_then(StoredEntry::into_session))
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        let result = self
            .write("save", key, record, ttl, Condition::Cas(version.get()))
            .await?;
        match result.status {
            MutationStatus::CasMismatch => Err(StoreError::Conflict),
            MutationStatus::NotFound => Err(StoreError::NotFound),
            _ => written_version("save", result),
        }
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_ttl(ttl)?;
        let marker = encode_moved(to);
        let expires = SystemTime::now() + ttl + Duration::from_secs(1);
        let expires_secs = expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let flags = u32::try_from(expires_secs).map_err(|_| {
            unexpected(
                "mark_moved",
                "the marker's expiry does not fit memcached's flags".into(),
            )
        })?;
        let result = self
            .write_bytes(
                "mark_moved",
                key,
                &marker,
                flags,
                ttl,
                Condition::Cas(version.get()),
            )
            .await?;
        match result.status {
            MutationStatus::CasMismatch => Err(StoreError::Conflict),
            MutationStatus::NotFound => Err(StoreError::NotFound),
            _ => written_version("mark_moved", result).map(drop),
        }
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        let item_key = self.item_key(key);
        let request = self
            .client
            .get(item_key.as_bytes())
            .touch(wire_ttl(ttl))
            .without_value()
            .send();
        let result = self.run("touch", request).await?;
        match result.client_flags {
            // A marker: memcached touched it before answering, so give it back its own expiry
            // (a second request, only when a touch races an id cycle). Sent as the time left by
            // this host's clock, the one that set it, not as a moment on memcached's clock.
            Some(expires) if expires != SESSION_FLAGS && result.status == GetStatus::Hit => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let left = u64::from(expires).saturating_sub(now).max(1);
                let restore = self
                    .client
                    .get(item_key.as_bytes())
                    .touch(Ttl::from(Duration::from_secs(left)))
                    .without_value()
                    .send();
                self.run("touch", restore).await?;
                Ok(false)
            }
            _ => Ok(result.status == GetStatus::Hit),
        }
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        let item_key = self.item_key(key);
        let request = self.client.delete(item_key.as_bytes()).send();
        let result = self.run("delete", request).await?;
        match result.status {
            MutationStatus::Applied | MutationStatus::NotFound => Ok(()),
            other => Err(unexpected("delete", format!("unexpected reply {other:?}"))),
        }
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        let item_key = self.item_key(key);
        let request = self
            .client
            .delete(item_key.as_bytes())
            .compare_cas(version.get())
            .send();
        let result = self.run("delete_if_version", request).await?;
        match result.status {
            MutationStatus::Applied => Ok(()),
            MutationStatus::NotFound => Err(StoreError::NotFound),
            MutationStatus::CasMismatch => Err(StoreError::Conflict),
            other => Err(unexpected(
                "delete_if_version",
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    fn max_record_size(&self) -> usize {
        self.max_record_size
    }

    /// memcached's 250-byte key limit less this store's own prefix.
    fn max_key_len(&self) -> Option<usize> {
        Some(MAX_MEMCACHED_KEY_LEN - self.key_prefix.len())
    }
}
