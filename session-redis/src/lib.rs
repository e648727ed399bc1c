//! [`RedisStore`]: sessions in standalone Redis, a Redis Cluster, or a master found through Redis
//! Sentinel.
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
//! (`EVALSHA`) and are loaded on a server that does not have them yet. Each script starts with
//! a write that changes nothing (`SETRANGE key 0 ""`), so that a replica refuses it with
//! `READONLY` before it reads anything, instead of answering "not found" or "conflict" from
//! its copy.
//!
//! Standalone connections go through the redis crate's `ConnectionManager`, which reconnects by
//! itself (and is replaced by a new one when its reconnection fails in a way it would not retry:
//! a handshake reply cut short); a cluster goes through its async cluster connection, which follows slot moves.
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
//! // or Sentinel, waiting for one replica on every write:
//! // RedisStore::from_url(
//! //     "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/sessions\
//! //      ?wait_replicas=1&wait_timeout_ms=500",
//! // ).await?
//! let keys = KeyRing::single(SigningKey::new(std::env::var("SESSION_SECRET")?)?);
//! let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys))?;
//! # Ok(()) }
//! ```
//!
//! # High availability
//!
//! ## Replication is asynchronous unless you wait for it
//!
//! A Redis master acknowledges a write before any replica has it. When the master dies, the
//! replica that takes over lacks whatever had not reached it yet: **without
//! [`RedisConfig::wait_for_replicas`], a failover can lose the last acknowledged writes** — a
//! save (the user's latest change), a logout (the session comes back), an id cycle after a
//! login (the old id, which should be dead, lives again). On a healthy network the window is a
//! few milliseconds of writes; it is not zero.
//!
//! ## Wait for replicas
//!
//! [`RedisConfig::wait_for_replicas`]`(n, timeout)` (URL: `wait_replicas=n&wait_timeout_ms=t`)
//! sends `WAIT n t` after every write — create, save, mark_moved, touch, delete,
//! delete_if_version — pipelined with it on the same connection, so it costs no extra round
//! trip from the client; the cost is the replication round trip the master waits for (about
//! one network round trip between master and replica per write, plus the replica's processing).
//! In a cluster the pipeline is routed by the write's key, so the `WAIT` runs on the master
//! that owns the key. If fewer than `n` replicas acknowledge within `t`, the operation returns
//! [`StoreError::Backend`] whose source is a [`NotReplicated`]. Writes that wrote nothing
//! (`AlreadyExists`, `Conflict`, `NotFound`, a touch of a missing session) return their own
//! outcome; a delete checks the count even when the entry was already gone.
//!
//! What this guarantees: a write the store acknowledged is on at least `n` replicas. A failover
//! promotes the replica with the most replicated data (Sentinel and Cluster both prefer the
//! replica with the highest replication offset), so with `n` equal to the number of replicas — e.g. one master and one
//! replica with `n = 1` — the promoted replica has every acknowledged write: no acknowledged
//! save is lost and no acknowledged logout undone. The failover tests kill a master under a
//! running writer and check exactly that.
//!
//! What it does not: `WAIT` does not make Redis strongly consistent. A write that timed out
//! waiting (`NotReplicated`) is on the master and may reach the replicas later: it may or may
//! not survive a failover, so treat its outcome as unknown. With more replicas than `n`, the
//! sentinels may promote a replica that missed the write (Sentinel prefers the most up-to-date
//! replica it can reach, but one that is cut off cannot be compared). A master cut off from its
//! replicas and sentinels, but not from the application, keeps accepting writes until it is
//! demoted; with the option those writes fail with `NotReplicated` instead of being silently
//! lost (Redis's `min-replicas-to-write` makes the master refuse them outright). And when no
//! replica is left (after a failover, before the old master returns as a replica), every write
//! fails with `NotReplicated` — the price of not acknowledging what could be lost.
//!
//! Each request's response timeout grows by the wait's timeout (the write and its `WAIT` are
//! one request), and so does [`RedisConfig::operation_deadline`].
//!
//! ## Sentinel
//!
//! [`RedisConfig::sentinel`] / `redis+sentinel://host:port,host:port/master-name[/db]` names the
//! sentinels and the master's name. The store asks the sentinels for the master when it first
//! needs it, and asks again whenever an operation fails in a way that may mean the master moved:
//! a connection error or timeout, or a `READONLY` reply (a demoted master refusing a write).
//! Re-resolutions run one at a time in the background, at most one every 100 ms, and ask all
//! sentinels at once; the first that names a master confirming its role with `ROLE` wins, so a
//! dead or hung sentinel does not delay it. The connection is replaced only when the address
//! changes.
//!
//! The operation that failed is sent again, on the new master, only when that is safe: when the
//! error proves it changed nothing (`READONLY`, or a refused connection: never sent), or when
//! it is idempotent (load, touch, delete). A create, save, mark_moved or delete_if_version whose
//! connection broke after it was sent may have been applied; sending it again could report a
//! conflict for its own write, so it returns its error instead. All of it stays within
//! [`RedisConfig::operation_deadline`]. During a failover (about the sentinels'
//! `down-after-milliseconds` plus election and promotion: 3 to 4 seconds in the tests, with one
//! second) operations fail with typed errors, and the same store serves again afterwards.
//!
//! Loads go to the master too (no reads from replicas). The sentinels are asked without
//! credentials from a URL; give [`RedisConfig::sentinel`] sentinel URLs with credentials when
//! they need them. Sentinel has no TLS here.
//!
//! ## Cluster with replicas
//!
//! A cluster's masters may each have replicas (`redis-cli --cluster create ...
//! --cluster-replicas 1`). When a master dies, the cluster promotes its replica after
//! `cluster-node-timeout` and the redis crate's cluster connection finds the new owner of the
//! slots; sessions on the other masters are served throughout. The same replication caveat
//! applies per master, and the same option closes it: `WAIT` runs on the master that owns the
//! key. The cluster connection resends a request once after a broken connection itself (as it
//! does for redirects), so in a cluster a save whose connection broke after it was applied can
//! come back as a conflict: the manager then replays this request's changes onto its own write,
//! harmless for inserted values, but an update closure runs a second time.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Script, Value};
use session_core::codec::{DecodeError, FORMAT_MOVED, encode_moved, encode_record_within};
use session_core::store::check_ttl;
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

mod config;
mod renewable;
mod request;
mod sentinel;

pub use config::{ConfigError, RedisConfig, UrlError};
/// The client crate, re-exported so applications use the same version.
pub use redis;
pub use request::NotReplicated;
pub use sentinel::NoMaster;

use config::{Topology, WaitForReplicas};
use renewable::RenewableConnection;
use request::{Request, check_replicated};
use sentinel::{Failure, SentinelLink};

/// Bytes of the version stored first in every value.
const VERSION_LEN: usize = 8;
/// Bytes of the header: the version, then the expiry stamp.
const HEADER_LEN: usize = 16;

// Every script starts with `SETRANGE key 0 ''`, a write that changes nothing (no key is
// created, no byte is written, nothing is replicated), so that on a replica (a demoted master
// still answering an old connection) the script stops right there with `READONLY` instead of
// answering "not found" or "conflict" from the replica's copy.

/// ARGV: TTL in ms, new 8-byte expiry stamp, the moved marker's format byte. Returns 1 if a
/// session was there (and is touched), 0 for a missing key or a moved marker (left alone).
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SETRANGE', KEYS[1], 0, '')
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
redis.call('SETRANGE', KEYS[1], 0, '')
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
redis.call('SETRANGE', KEYS[1], 0, '')
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
    Standalone(RenewableConnection),
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

/// How the store reaches Redis.
#[derive(Clone)]
enum Backend {
    /// A standalone server or a cluster: the client follows reconnects and slot moves itself.
    Direct(Connection),
    /// The master Sentinel names, followed through failovers by the store.
    Sentinel(Arc<SentinelLink>),
}

/// The Redis session store. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    backend: Backend,
    key_prefix: String,
    max_record_size: usize,
    deadline: Duration,
    wait: Option<WaitForReplicas>,
    versions: Arc<Versions>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::Direct(Connection::Standalone(_)) => "standalone",
            Backend::Direct(Connection::Cluster(_)) => "cluster",
            Backend::Sentinel(_) => "sentinel",
        };
        f.debug_struct("RedisStore")
            .field("kind", &kind)
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .field("deadline", &self.deadline)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the store. A standalone connection is made on first use, so a server that is
    /// down now fails operations, not construction; so is the first question to the sentinels.
    /// A cluster connection reads the slot map from a seed node now, so at least one seed must
    /// answer.
    pub async fn connect(config: RedisConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.request_timeout()))
            .set_number_of_retries(1);
        let backend = match &config.topology {
            Topology::Standalone(url) => {
                let client = redis::Client::open(url.as_str()).map_err(ConfigError::Client)?;
                let manager = RenewableConnection::new(client, manager_config)
                    .map_err(ConfigError::Client)?;
                Backend::Direct(Connection::Standalone(manager))
            }
            Topology::Sentinel(topology) => {
                // A sentinel is asked, then the master it names is asked its role: two
                // connections and two requests.
                let lookup_timeout = 2 * (config.connect_timeout + config.response_timeout);
                let link = SentinelLink::new(topology, manager_config, lookup_timeout)
                    .map_err(ConfigError::Client)?;
                Backend::Sentinel(Arc::new(link))
            }
            Topology::Cluster(seeds) => {
                let client =
                    redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(config.request_timeout())
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
                Backend::Direct(Connection::Cluster(connection))
            }
        };
        Ok(Self {
            backend,
            wait: config.wait,
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
        let mut command = redis::cmd("GET");
        command.arg(self.redis_key(key).as_ref());
        let (value, _): (Option<Vec<u8>>, _) = self.send("load", Request::read(command)).await?;
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

    /// Sends one request and maps its failure; returns the reply, converted, and for a write
    /// followed by `WAIT` the replicas' count, to check with [`Self::replicated`] once the
    /// reply shows that the operation wrote.
    ///
    /// Standalone and cluster: the client bounds every request itself (the response timeout,
    /// the connection timeout for a reconnect, and for a cluster the overall response timeout
    /// across redirects and retries), so no timer of our own is armed on this hot path; the
    /// fault tests check the bound. Sentinel: the link may ask the sentinels and resend, so it
    /// keeps the operation within its deadline itself.
    async fn send<T: FromRedisValue>(
        &self,
        operation: &'static str,
        request: Request<'_>,
    ) -> Result<(T, Option<i64>), StoreError> {
        let reply = match &self.backend {
            Backend::Direct(connection) => {
                let deadline = tokio::time::Instant::now() + self.deadline;
                let outcome = request.send(&mut connection.clone(), deadline).await;
                outcome.map_err(|error| self.redis_error(operation, error))?
            }
            Backend::Sentinel(link) => {
                let deadline = tokio::time::Instant::now() + self.deadline;
                link.send(&request, deadline)
                    .await
                    .map_err(|failure| match failure {
                        Failure::Redis(error) => self.redis_error(operation, error),
                        Failure::Deadline => StoreError::Timeout {
                            operation,
                            after: self.deadline,
                        },
                        Failure::NoMaster(error) => StoreError::Backend {
                            operation,
                            source: Box::new(error),
                        },
                    })?
            }
        };
        let value = redis::from_redis_value(reply.value).map_err(|error| StoreError::Backend {
            operation,
            source: Box::new(RedisError::from(error)),
        })?;
        Ok((value, reply.acknowledged))
    }

    fn redis_error(&self, operation: &'static str, error: RedisError) -> StoreError {
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
    }

    /// Checks the replicas' acknowledgement of a write that was applied.
    fn replicated(
        &self,
        operation: &'static str,
        acknowledged: Option<i64>,
    ) -> Result<(), StoreError> {
        check_replicated(self.wait, acknowledged).map_err(|error| StoreError::Backend {
            operation,
            source: Box::new(error),
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
        let redis_key = self.redis_key(key);
        let version = version.get().to_be_bytes();
        let ttl = millis(ttl).to_string();
        // Not idempotent: run twice, the second run would find the first one's version.
        let request = Request::script(
            &SAVE,
            &redis_key,
            &[&version, &value, ttl.as_bytes()],
            self.wait,
            false,
        );
        let (outcome, acknowledged) = self.send(operation, request).await?;
        conditional_outcome(operation, outcome)?;
        self.replicated(operation, acknowledged)
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
pub(crate) fn millis(ttl: Duration) -> u64 {
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
        let mut command = redis::cmd("SET");
        command
            .arg(self.redis_key(key).as_ref())
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        // Not idempotent: sent again after it was applied, it would report `AlreadyExists`.
        let request = Request::write(command, self.wait, false);
        let (reply, acknowledged): (Option<String>, _) = self.send("create", request).await?;
        match reply {
            Some(_) => {
                self.replicated("create", acknowledged)?;
                Ok(Version::new(version))
            }
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
        let redis_key = self.redis_key(key);
        let expires_at = now_millis().saturating_add(millis(ttl)).to_be_bytes();
        let ttl = millis(ttl).to_string();
        // Idempotent: a second run sets the same expiry again (a few milliseconds later).
        let request = Request::script(
            &TOUCH,
            &redis_key,
            &[ttl.as_bytes(), &expires_at, &[FORMAT_MOVED]],
            self.wait,
            true,
        );
        let (touched, acknowledged): (i64, _) = self.send("touch", request).await?;
        if touched == 1 {
            self.replicated("touch", acknowledged)?;
        }
        Ok(touched == 1)
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        let mut command = redis::cmd("DEL");
        command.arg(self.redis_key(key).as_ref());
        // Idempotent: deleting a deleted entry is fine (and nothing recreates a deleted id).
        let request = Request::write(command, self.wait, true);
        let (_, acknowledged): (i64, _) = self.send("delete", request).await?;
        // Checked even when nothing was deleted: the entry may have been deleted by a request
        // whose own wait fell short, and this logout must not be undone by a failover.
        self.replicated("delete", acknowledged)
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        let redis_key = self.redis_key(key);
        let version = version.get().to_be_bytes();
        // Not idempotent: run twice, the second run would report `NotFound`.
        let request = Request::script(
            &DELETE_IF_VERSION,
            &redis_key,
            &[&version],
            self.wait,
            false,
        );
        let (outcome, acknowledged) = self.send("delete_if_version", request).await?;
        conditional_outcome("delete_if_version", outcome)?;
        self.replicated("delete_if_version", acknowledged)
    }

    fn max_record_size(&self) -> usize {
        self.max_record_size
    }

    /// Keys of any length the manager makes fit.
    fn max_key_len(&self) -> Option<usize> {
        None
    }

    fn backend_name(&self) -> &'static str {
        "redis"
    }
}
