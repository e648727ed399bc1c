//! [`RedisStore`]: sessions in standalone Redis or a Redis Cluster.
//!
//! Every operation is one atomic server-side step, with millisecond expiry:
//!
//! | store operation | Redis |
//! |---|---|
//! | `create` | `SET key value NX PX ttl` |
//! | `load` | `GET key` |
//! | `save` | a Lua script: compare the stored version, then `SET key value PX ttl`; a missing key is not found and stays missing |
//! | `mark_moved` | the save script, writing a moved marker in place of the record |
//! | `touch` | a Lua script: unless the value is a moved marker, `PEXPIRE key ttl`, then `SETRANGE` of the 8-byte expiry stamp (the record and its version are untouched) |
//! | `delete` | `DEL key` |
//! | `delete_if_version` | a Lua script: compare the stored version, then `DEL key` |
//!
//! The stored value is a 16-byte header (the version, then the expiry as Unix milliseconds,
//! both big-endian) followed by the encoded record; the expiry stamp lets `load` report the
//! time left without a second command. Redis's own TTL stays the authority on expiry. Each store starts
//! its versions at a random 64-bit number and counts up, so a version taken before a delete
//! does not match an entry created after it (another process's versions could only meet ours
//! if their counted ranges overlapped, a chance of about writes² / 2⁶⁴). Scripts run by SHA
//! (`EVALSHA`) and are loaded on a server that does not have them yet.
//!
//! Standalone connections go through the redis crate's `ConnectionManager`, which reconnects by
//! itself; a cluster goes through its async cluster connection, which follows slot moves.
//! Every operation is bounded by [`RedisConfig::operation_deadline`]: a dead server gives
//! [`StoreError::Backend`], a hung one [`StoreError::Timeout`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
//! use session_redis::RedisStore;
//!
//! let store = RedisStore::from_url("redis://127.0.0.1:6379/0?timeout_ms=250").await?;
//! // or a cluster: RedisStore::from_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000").await?
//! let keys = KeyRing::single(SigningKey::new(std::env::var("SESSION_SECRET")?)?);
//! let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys))?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};
use session_core::codec::{DecodeError, FORMAT_MOVED, encode_moved, encode_record_within};
use session_core::store::check_ttl;
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

mod config;

pub use config::{ConfigError, RedisConfig, UrlError};
/// The client crate, re-exported so applications use the same version.
pub use redis;

use config::Topology;

/// Bytes of the version stored first in every value.
const VERSION_LEN: usize = 8;
/// Bytes of the header: the version, then the expiry stamp.
const HEADER_LEN: usize = 16;

/// ARGV: TTL in ms, new 8-byte expiry stamp, the moved marker's format byte. Returns 1 if a
/// session was there (and is touched), 0 for a missing key or a moved marker (left alone).
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local kind = redis.call('GETRANGE', KEYS[1], 16, 16)
if kind == '' or kind == ARGV[3] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SETRANGE', KEYS[1], 8, ARGV[2])
return 1
",
    )
});

/// ARGV: expected version. Returns 0 (not found), 1 (conflict), 2 (deleted).
static DELETE_IF_VERSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GETRANGE', KEYS[1], 0, 7)
if current == '' then return 0 end
if current ~= ARGV[1] then return 1 end
redis.call('DEL', KEYS[1])
return 2
",
    )
});

/// Milliseconds since the Unix epoch, now.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// ARGV: expected version, new value, TTL in ms. Returns 0 (not found), 1 (conflict), 2 (saved).
static SAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GETRANGE', KEYS[1], 0, 7)
if current == '' then return 0 end
if current ~= ARGV[1] then return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 2
",
    )
});

/// A standalone or cluster connection; both are cheap to clone.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis session store. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    key_prefix: String,
    max_record_size: usize,
    deadline: Duration,
    versions: Arc<Versions>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.connection {
            Connection::Standalone(_) => "standalone",
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the store. A standalone connection is made on first use, so a server that is
    /// down now fails operations, not construction; a cluster connection reads the slot map
    /// from a seed node now, so at least one seed must answer.
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let connection = match &config.topology {
            Topology::Standalone(url) => {
                let client = redis::Client::open(url.as_str()).map_err(ConfigError::Client)?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.response_timeout))
                    .set_number_of_retries(1);
                let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
                    .map_err(ConfigError::Client)?;
                Connection::Standalone(manager)
            }
            Topology::Cluster(seeds) => {
                let client =
                    redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(config.response_timeout)
                        // By default a whole request, redirects and reconnects included, must
                        // fit in one response timeout; allow the store's full deadline.
                        .overall_response_timeout(Some(config.operation_deadline()))
                        .retries(1)
                        .build()
                        .map_err(ConfigError::Client)?;
                let connection = tokio::time::timeout(
                    config.operation_deadline(),
                    client.get_async_connection(),
                )
                .await
                .map_err(|_| {
                    ConfigError::Client(RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )))
                })?
                .map_err(ConfigError::Client)?;
                Connection::Cluster(connection)
            }
        };
        Ok(Self {
            connection,
            versions: Arc::new(Versions::new()?),
            key_prefix: config.key_prefix.clone(),
            max_record_size: config.max_record_size,
            deadline: config.operation_deadline(),
        })
    }

    /// Builds the store from a URL; see [`RedisConfig::from_url`].
    pub async fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// Reads and decodes the entry under `key`: the one body of `load_entry` and `load`.
    async fn read_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("GET");
        command.arg(self.redis_key(key).as_ref());
        let value: Option<Vec<u8>> = self
            .run("load", command.query_async(&mut connection))
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let Some((header, encoded)) = value.split_at_checked(HEADER_LEN) else {
            return Err(StoreError::Decode(DecodeError::TooShort {
                len: value.len(),
            }));
        };
        let (version, expires_at) = header.split_at(VERSION_LEN);
        let version = u64::from_be_bytes(version.try_into().expect("eight bytes"));
        let expires_at = u64::from_be_bytes(expires_at.try_into().expect("eight bytes"));
        let expires_in = Duration::from_millis(expires_at.saturating_sub(now_millis()));
        StoredEntry::decode(
            encoded,
            self.max_record_size,
            Version::new(version),
            Some(expires_in),
        )
        .map(Some)
    }

    fn redis_key<'a>(&self, key: &'a StorageKey) -> Cow<'a, str> {
        key.prefixed(&self.key_prefix)
    }

    /// Runs one request and maps its failure. The client bounds every request itself (the
    /// response timeout, the connection timeout for a reconnect, and for a cluster the overall
    /// response timeout across redirects and retries), so no timer of our own is armed on this
    /// hot path; the fault tests check the bound.
    async fn run<T>(
        &self,
        operation: &'static str,
        request: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        request.await.map_err(|error| {
            if error.is_timeout() {
                StoreError::Timeout {
                    operation,
                    after: self.deadline,
                }
            } else {
                StoreError::Backend {
                    operation,
                    source: Box::new(error),
                }
            }
        })
    }

    /// A fresh version and the value to store for `ttl`: the header, then the encoded record.
    fn versioned_value(
        &self,
        record: &Record,
        ttl: Duration,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        let encoded = encode_record_within(record, self.max_record_size)?;
        Ok(self.versioned_bytes(&encoded, ttl))
    }

    /// A fresh version and the value to store for `ttl`: the header, then `encoded`.
    fn versioned_bytes(&self, encoded: &[u8], ttl: Duration) -> (u64, Vec<u8>) {
        let version = self.versions.next();
        let mut value = Vec::with_capacity(HEADER_LEN + encoded.len());
        value.extend_from_slice(&version.to_be_bytes());
        value.extend_from_slice(&now_millis().saturating_add(millis(ttl)).to_be_bytes());
        value.extend_from_slice(encoded);
        (version, value)
    }

    /// Runs the save script: writes `value` if the stored version is still `version`.
    async fn compare_and_set(
        &self,
        operation: &'static str,
        key: &StorageKey,
        version: Version,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let mut invocation = SAVE.key(redis_key.as_ref());
        invocation
            .arg(&version.get().to_be_bytes()[..])
            .arg(value)
            .arg(millis(ttl));
        let outcome: i64 = self
            .run(operation, invocation.invoke_async(&mut connection))
            .await?;
        conditional_outcome(operation, outcome)
    }
}

/// Versions for writes: a random 64-bit start drawn once per store, then counting up. Within a
/// process no version repeats; across processes (and restarts) two stores meet on a version
/// only if their counted ranges overlap, a chance of about (writes per store)² / 2⁶⁴. No
/// system call per write.
struct Versions {
    next: AtomicU64,
}

impl Versions {
    fn new() -> Result<Self, ConfigError> {
        let mut bytes = [0u8; VERSION_LEN];
        getrandom::fill(&mut bytes).map_err(|e| {
            ConfigError::Client(RedisError::from(std::io::Error::other(e.to_string())))
        })?;
        Ok(Self {
            next: AtomicU64::new(u64::from_be_bytes(bytes)),
        })
    }

    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// Maps a conditional script's reply: 2 done, 1 conflict, 0 not found.
fn conditional_outcome(operation: &'static str, outcome: i64) -> Result<(), StoreError> {
    match outcome {
        2 => Ok(()),
        1 => Err(StoreError::Conflict),
        0 => Err(StoreError::NotFound),
        other => Err(StoreError::Backend {
            operation,
            source: format!("unexpected script reply {other}").into(),
        }),
    }
}

/// Milliseconds, rounded up so a sub-millisecond remainder never shortens a TTL.
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let (version, value) = self.versioned_value(record, ttl)?;
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("SET");
        command
            .arg(self.redis_key(key).as_ref())
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let reply: Option<String> = self
            .run("create", command.query_async(&mut connection))
            .await?;
        match reply {
            Some(_) => Ok(Version::new(version)),
            None => Err(StoreError::AlreadyExists),
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
        check_ttl(ttl)?;
        let (new_version, value) = self.versioned_value(record, ttl)?;
        self.compare_and_set("save", key, version, value, ttl)
            .await?;
        Ok(Version::new(new_version))
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_ttl(ttl)?;
        let (_, value) = self.versioned_bytes(&encode_moved(to), ttl);
        self.compare_and_set("mark_moved", key, version, value, ttl)
            .await
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let expires_at = now_millis().saturating_add(millis(ttl));
        let mut invocation = TOUCH.key(redis_key.as_ref());
        invocation
            .arg(millis(ttl))
            .arg(&expires_at.to_be_bytes()[..])
            .arg(&[FORMAT_MOVED][..]);
        let touched: i64 = self
            .run("touch", invocation.invoke_async(&mut connection))
            .await?;
        Ok(touched == 1)
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("DEL");
        command.arg(self.redis_key(key).as_ref());
        let _: i64 = self
            .run("delete", command.query_async(&mut connection))
            .await?;
        Ok(())
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let mut invocation = DELETE_IF_VERSION.key(redis_key.as_ref());
        invocation.arg(&version.get().to_be_bytes()[..]);
        let outcome: i64 = self
            .run(
                "delete_if_version",
                invocation.invoke_async(&mut connection),
            )
            .await?;
        conditional_outcome("delete_if_version", outcome)
    }

    fn max_record_size(&self) -> usize {
        self.max_record_size
    }

    /// Keys of any length the manager makes fit.
    fn max_key_len(&self) -> Option<usize> {
        None
    }
}
