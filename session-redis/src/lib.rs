//! [`RedisStore`]: sessions in standalone Redis or a Redis Cluster.
//!
//! Every operation is one atomic server-side step, with millisecond expiry:
//!
//! | store operation | Redis |
//! |---|---|
//! | `create` | `SET key value NX PX ttl` |
//! | `load` | a Lua script returning the value and its `PTTL` together |
//! | `save` | a Lua script: compare the stored version, then `SET key value PX ttl`; a missing key is not found and stays missing |
//! | `touch` | `PEXPIRE key ttl` (the value and its version are untouched) |
//! | `delete` | `DEL key` |
//!
//! The stored value is an 8-byte version followed by the encoded record. Versions are drawn
//! from the OS random number generator on every write, so a version taken before a delete
//! cannot match an entry created after it (the chance of a repeat is 2⁻⁶⁴). Scripts run by SHA
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
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};
use session_core::codec::{DecodeError, decode_record, encode_record_within};
use session_core::store::check_ttl;
use session_core::{LoadedRecord, Record, SessionStore, StorageKey, StoreError, Version};

mod config;

pub use config::{ConfigError, RedisConfig, UrlError};
/// The client crate, re-exported so applications use the same version.
pub use redis;

use config::Topology;

/// Bytes of the version stored in front of every record.
const VERSION_LEN: usize = 8;

/// Returns `{value, pttl}` for a live key, nil otherwise.
static LOAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}
",
    )
});

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
            key_prefix: config.key_prefix.clone(),
            max_record_size: config.max_record_size,
            deadline: config.operation_deadline(),
        })
    }

    /// Builds the store from a URL; see [`RedisConfig::from_url`].
    pub async fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    fn redis_key<'a>(&self, key: &'a StorageKey) -> Cow<'a, str> {
        if self.key_prefix.is_empty() {
            Cow::Borrowed(key.as_str())
        } else {
            Cow::Owned(format!("{}{}", self.key_prefix, key.as_str()))
        }
    }

    /// Runs one request under the store's deadline and maps its failure.
    async fn run<T>(
        &self,
        operation: &'static str,
        request: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if error.is_timeout() => Err(StoreError::Timeout {
                operation,
                after: self.deadline,
            }),
            Ok(Err(error)) => Err(StoreError::Backend {
                operation,
                source: Box::new(error),
            }),
            Err(_) => Err(StoreError::Timeout {
                operation,
                after: self.deadline,
            }),
        }
    }

    /// A fresh random version and the value to store: the version, then the encoded record.
    fn versioned_value(&self, record: &Record) -> Result<(u64, Vec<u8>), StoreError> {
        let encoded = encode_record_within(record, self.max_record_size)?;
        let version = random_version()?;
        let mut value = Vec::with_capacity(VERSION_LEN + encoded.len());
        value.extend_from_slice(&version.to_be_bytes());
        value.extend_from_slice(&encoded);
        Ok((version, value))
    }
}

fn random_version() -> Result<u64, StoreError> {
    let mut bytes = [0u8; VERSION_LEN];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Backend {
        operation: "draw a version",
        source: Box::new(e),
    })?;
    Ok(u64::from_be_bytes(bytes))
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
        let (version, value) = self.versioned_value(record)?;
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

    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let invocation = LOAD.key(redis_key.as_ref());
        let reply: Option<(Vec<u8>, i64)> = self
            .run("load", invocation.invoke_async(&mut connection))
            .await?;
        let Some((value, pttl)) = reply else {
            return Ok(None);
        };
        let Some((version, encoded)) = value.split_at_checked(VERSION_LEN) else {
            return Err(StoreError::Decode(DecodeError::TooShort {
                len: value.len(),
            }));
        };
        let version = u64::from_be_bytes(version.try_into().expect("eight bytes"));
        Ok(Some(LoadedRecord {
            record: decode_record(encoded)?,
            version: Version::new(version),
            expires_in: u64::try_from(pttl).ok().map(Duration::from_millis),
        }))
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let (new_version, value) = self.versioned_value(record)?;
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let mut invocation = SAVE.key(redis_key.as_ref());
        invocation
            .arg(&version.get().to_be_bytes()[..])
            .arg(value)
            .arg(millis(ttl));
        let outcome: i64 = self
            .run("save", invocation.invoke_async(&mut connection))
            .await?;
        match outcome {
            2 => Ok(Version::new(new_version)),
            1 => Err(StoreError::Conflict),
            0 => Err(StoreError::NotFound),
            other => Err(StoreError::Backend {
                operation: "save",
                source: format!("unexpected script reply {other}").into(),
            }),
        }
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("PEXPIRE");
        command.arg(self.redis_key(key).as_ref()).arg(millis(ttl));
        let touched: i64 = self
            .run("touch", command.query_async(&mut connection))
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

    fn max_record_size(&self) -> usize {
        self.max_record_size
    }
}
