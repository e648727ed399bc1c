//! [`MemcachedStore`]: sessions in memcached, the primary backend, on one server or spread over
//! several by rendezvous hashing, with one copy of each session or several (replicas).
//!
//! It speaks memcached's meta protocol over a few multiplexed connections per server
//! ([`connections`](MemcachedConfig::connections), default
//! [`DEFAULT_CONNECTIONS`](MemcachedConfig::DEFAULT_CONNECTIONS)): the requests of every task
//! are queued on them and written together, one `write` for all that gathered while the last
//! one went out, and the replies are paired with their requests in order, each checked by the
//! opaque token (`O`) it echoes. A reply that does not come within the I/O timeout, or one out
//! of step, fails every request on its connection (they may have been applied) and the next
//! request dials a new one, so no request is ever paired with another's reply. A
//! `SERVER_ERROR` counts as not applied, which holds for memcached itself; behind a proxy
//! that answers `SERVER_ERROR` for a backend that timed out (mcrouter, memcached's proxy
//! mode), a write so answered may have landed, and a replicated store could decide it again
//! on another replica. The framing is
//! written here (`wire.rs`, fuzzed): the `memcache` crate's reply type is filled in by its own
//! transport, which holds one pooled connection per request in flight. With one copy (the
//! default):
//!
//! | store operation | meta command |
//! |---|---|
//! | `create` | `ms <key> <size> T<ttl> MS c` with add mode (`ME`): stores only if absent |
//! | `load` | `mg <key> v c t f`: the value, its CAS (the version), its remaining TTL and flags |
//! | `save` | `ms <key> <size> T<ttl> C<cas> c`: compare-and-set; a vanished item stays vanished |
//! | `mark_moved` | `ms <key> <size> T<ttl> C<cas> F<expiry> c`: the marker, compare-and-set; its client flags hold its expiry |
//! | `touch` | `mg <key> T<ttl> f` without the value; flags holding an expiry (a marker) answer "no session", and a second `mg` gives the marker back its expiry |
//! | `delete` | `md <key>` |
//! | `delete_if_version` | `md <key> C<cas>`: removed only at that CAS |
//!
//! TTLs are sent as whole seconds rounded up, plus one: memcached's clock ticks once a second,
//! so an item stored with `T<n>` may expire up to a second before `n` seconds have passed. With
//! the extra second an entry never expires early, and outlives its TTL by at most two seconds.
//! TTLs above 30 days are sent as absolute timestamps (memcached's rule).
//! A server started with CAS disabled (`-C`) cannot hold sessions safely and is reported as a
//! backend error. Every operation is bounded by
//! [`MemcachedConfig::operation_deadline`]: a dead server gives [`StoreError::Backend`], a hung
//! one [`StoreError::Timeout`], and the store recovers by itself when the server is back
//! (a failed connection is dropped and the next request dials a new one).
//!
//! # Placement
//!
//! A key's servers are chosen by rendezvous hashing with a specified hash, so every build and
//! every process agree (a rolling deploy never splits a session between two servers): each
//! server scores `mix(fnv1a(storage key) ^ fnv1a(server name))`, with 64-bit FNV-1a and
//! SplitMix64's finalizer as `mix`, and the key lives on the highest-scoring server (and the
//! next ones, with replicas). The server name is the address as configured (`host:port`), not
//! what it resolves to, so renumbering a host moves nothing. A unit test pins the placement of
//! fixed keys. Adding or removing a server moves only the keys it gains or held. Releases
//! before this one routed with the `memcache` crate's hash: upgrading a multi-server
//! deployment moves most sessions, which logs their users out, and during a rolling upgrade
//! old and new processes look for a session on different servers (a logout on one is not
//! seen by the other). Upgrade every process at once, with a new
//! [`key_prefix`](MemcachedConfig::key_prefix).
//!
//! A server that fails a request (refused, reset, timed out) is marked down; a background
//! probe resolves its name again (through the [`Resolver`], by default the system's) and sends
//! a no-op every [`retry_interval`](MemcachedConfig::retry_interval) until it answers, so a
//! server that comes back on a new address is reached. The requests in flight to each server
//! are capped (see [`MemcachedConfig::max_in_flight`]).
//!
//! # Replicas
//!
//! With [`replicas(n)`](MemcachedConfig::replicas) (URL `?replicas=n`, n ≥ 2), each session
//! lives on its `n` best servers, and the store keeps working, losing nothing acknowledged,
//! while all but one of them are dead, hung or restarted empty. memcached has no replication
//! and its CAS values differ per server (1.6.18 cannot set them), so the design is ours:
//!
//! - **Generations.** Every copy starts with an 8-byte generation (flags `2`): a new session's
//!   is its creation time in microseconds, shifted left 12 bits, with 12 random bits; each save
//!   adds one. The store's [`Version`] is the generation, the same whichever copy answered.
//!   Ends are written as *tombstones* (an item whose flags hold its expiry and whose value is
//!   `\0ended`), never as deletions, so that a copy on a server that missed the logout cannot
//!   bring the session back.
//! - **Reads** ask every live replica at once and take the newest copy: a tombstone over a
//!   moved marker over the session of the highest generation (ties: the best-placed server).
//!   A server that errs or times out is left out (a down server is not asked at all), so a
//!   read succeeds while one replica answers; a server restarted empty simply answers "miss".
//!   Copies older than the newest are *repaired* in the background, each by a write that never
//!   overwrites anything newer (compare-and-set against what was read, or add).
//! - **Which copy decides.** A conditional write (`save`, `mark_moved`, `delete_if_version`)
//!   is decided by compare-and-set on the *first replica that answers*, in placement order,
//!   against what that server held when read: of two racing writers one wins there and the
//!   other gets [`StoreError::Conflict`], exactly as with one copy. A deciding write that was
//!   sent but not answered may have been applied, so it ends the write with its timeout (no
//!   second replica decides it too); one that surely was not applied (refused) hands the
//!   decision to the next replica. The winner then carries the write to the other replicas,
//!   never overwriting anything newer. If it finds there a *competing* write of the same
//!   version (another process decided on that replica, because it counted the first one down),
//!   it yields: it puts the other write back over its own (compare-and-set against its own
//!   write, so a later write built on it is left alone) and reports a conflict, so the two
//!   processes do not both acknowledge. (Of two different copies of one generation, reads
//!   take the one on the later-placed replica: the one that stays.) A save right after a load in the same process reuses
//!   the CAS values that load read (for two seconds, and only while none of those servers has
//!   failed since); a stale guess costs a conflict, after which the replicas are read again.
//!   A load and save then cost two round trips to each of two replicas: three in sequence
//!   (the reads together, the deciding write, the carried write).
//! - **Creates** are decided like saves: an add on the first replica, then the session is
//!   carried to the others. A racer refused there has written nothing anywhere and reports
//!   [`StoreError::AlreadyExists`], so no read ever sees a losing create's copy. A create
//!   over a tombstone replaces it, compare-and-set on that first replica; anything else
//!   there (a session, a marker, an unreadable value) makes the create fail. Carrying, a
//!   create replaces only nothing, an unreadable value, or the tombstone it read before it
//!   was decided; if another replica still holds the key alive (the first one lost it, or
//!   another process, counting the first one down, created there), the create takes its
//!   copies back and fails.
//! - **`delete` and `cycle_id`.** `delete` reads the copies, then writes a tombstone to every
//!   live replica, living as long as the longest copy it ends; when a replica did not answer
//!   and its copy's expiry is unknown, at least [`tombstone_ttl`](MemcachedConfig::tombstone_ttl)
//!   (default a day) and at least the longest TTL this process has given a session. An id cycle
//!   leaves moved markers, which outrank any session copy, on every live replica of the old
//!   key; the marker reads as gone after its own TTL, but its item stays as long as a
//!   tombstone would, so a replica that missed the cycle cannot bring the old id back. (The
//!   marker's end is judged by the item's remaining TTL as memcached counts it, so app hosts
//!   with different clocks agree on it.) The
//!   manager's logout follows markers.
//! - **While a server is down** writes go to the live replicas only, and its keys have one
//!   copy fewer until it returns; when it returns (restarted empty, or resumed with old
//!   copies), reads fill it again and outrank what it missed. A value on one replica that this
//!   store cannot read (written by something else) is outranked by any readable copy and
//!   replaced by repair.
//!
//! Limits, stated precisely:
//!
//! - The copies of a session are brought back to `n` by reads (and by writes). A session that
//!   is not read between one of its servers' return and the death of its other server is lost,
//!   as is one whose every replica dies. A server that comes back holding a stale copy (hung,
//!   or partitioned from this process) is outranked while a newer copy or a tombstone is
//!   readable; if the servers holding the newer copy die before a read repairs it, the stale
//!   copy is what remains: an older value, or, for a logout done during the partition, the
//!   session as it was before the logout.
//! - Compare-and-set is exact while the processes saving one session agree about which of
//!   its servers answer: every writer decides on the first replica it reads, whatever the
//!   copies it read. A server that returns does not decide writes until it has been back for
//!   a retry interval plus the operation deadline; but in the moments in which processes
//!   disagree (one has timed a hung server out and another has not, processes probed a
//!   returned server at different times, or a true partition), two concurrent saves may both
//!   be acknowledged and one of them lost, or both be reported as conflicts while one of them
//!   stays (a manager replaying it then applies its changes twice). The stress tests in `tests/replicas.rs` (two
//!   processes, eight writers on four sessions, a server killed or hung every 0.9 s) lose
//!   between none and a few in a thousand acknowledged increments, and the processes always
//!   read the same value afterwards; with no failure in progress, none is lost.
//! - Read-your-writes holds while at most one of a session's servers fails. When requests to
//!   all of them fail now and then (a flaky network in front of the whole pool), a save can be
//!   acknowledged after landing on one copy, and the next load, whose read of that copy fails,
//!   returns the other, older one; repair brings the newer copy back once both answer
//!   (a test with every reply of both servers reset mid-way saw 2 to 65 of 200 saves read back
//!   stale under the fault; with one server faulted, none).
//! - A remembered CAS value is reused only for two seconds and only if its server has not
//!   failed since; a server restarted and refilled within those two seconds, unnoticed by
//!   this process, whose CAS counter reaches exactly the remembered value, would let one stale
//!   save through.
//! - Markers and tombstones outrank every session copy whatever its generation. A mark sent
//!   to a hung server (reported as a timeout) and applied when it resumes outranks a save
//!   decided on another replica meanwhile; `touch` extends every session copy it reaches,
//!   including a stale one beside a marker, which can then outlive the marker if no read
//!   repairs it.
//! - `replicas` cannot be changed on a running deployment: single-copy stores delete without
//!   tombstones and write no generations, so old copies could come back. Change it together
//!   with [`key_prefix`](MemcachedConfig::key_prefix) (which starts every session afresh),
//!   as for any change of the server list that moves many keys.
//! - A key created again under a deleted key (session ids are random 128-bit numbers, so only
//!   direct store users do this) reads as ended if a tombstone survives on a replica that was
//!   unreachable while it was created, if the first replica lost its tombstone (evicted,
//!   restarted empty) while another kept one, or if a load repaired the first replica with
//!   the tombstone while the create was being carried; and the create is refused if the
//!   first replica missed the delete (it still holds the old session).
//! - memcached may evict any item under memory pressure, tombstones included; size the
//!   servers so that sessions are not evicted.
//! - Cost: every read asks `n` servers and every write writes `n`; a save after a load in the
//!   same process adds one round trip (to the second replica), a create one (it is decided
//!   on the first replica before it goes to the others), a `delete` and a `mark_moved`
//!   one read. With `n` = 3 and two servers hung, an operation can take up to about twice
//!   [`operation_deadline`](MemcachedConfig::operation_deadline) (a read, then a write, each
//!   waiting for a timeout). The compare harness reports `replicas=2` beside `replicas=1` on
//!   the same three servers.
//!
//! TLS: not supported; reach a TLS-only memcached through a local TLS tunnel.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
//! use session_memcached::{MemcachedConfig, MemcachedStore};
//!
//! let config = MemcachedConfig::from_url(
//!     "memcached://10.0.0.1:11211,10.0.0.2:11211,10.0.0.3:11211?timeout_ms=250&replicas=2",
//! )?;
//! let store = MemcachedStore::connect(config).await?;
//! let keys = KeyRing::single(SigningKey::new(std::env::var("SESSION_SECRET")?)?);
//! let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys))?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

mod config;
mod items;
mod mux;
mod nodes;
mod replicated;
mod single;
mod wire;

pub use config::{ConfigError, MemcachedConfig, UrlError};

/// The reply parser, for the fuzzer (`fuzz/`, target `memcached_replies`) and its property
/// test twin only; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// Takes the first reply off `input` as a connection would: `Ok(None)` when more bytes
    /// are needed, else the reply (its `Debug` form) and how many bytes it took; `Err` for
    /// bytes that are no reply.
    #[allow(clippy::type_complexity)] // reason: a test hook, spelled out once
    pub fn parse_reply(input: &[u8]) -> Result<Option<(String, usize)>, String> {
        crate::wire::parse(input, crate::wire::MAX_VALUE)
            .map(|parsed| parsed.map(|(reply, used)| (format!("{reply:?}"), used)))
            .map_err(|garbage| garbage.to_string())
    }
}
pub use items::RequestFailure;
pub use nodes::{MAX_REPLICAS, Resolver, SystemResolver};

use nodes::{Node, Placement, PoolSettings};

/// The memcached session store. Cheap to clone: clones share the connection pools.
#[derive(Clone)]
pub struct MemcachedStore {
    nodes: Arc<[Arc<Node>]>,
    name_hashes: Arc<[u64]>,
    replicas: usize,
    key_prefix: Arc<str>,
    max_record_size: usize,
    deadline: Duration,
    tombstone_ttl: Duration,
    retry_interval: Duration,
    seen: Arc<replicated::SeenCache>,
    /// The longest TTL this store has given a session, in seconds.
    longest_ttl: Arc<std::sync::atomic::AtomicU64>,
    /// Read repairs running in the background.
    repairs: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<&str> = self.nodes.iter().map(|node| node.name()).collect();
        f.debug_struct("MemcachedStore")
            .field("servers", &servers)
            .field("replicas", &self.replicas)
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl MemcachedStore {
    /// Builds the store: checks the configuration and resolves the server addresses with the
    /// system's resolver. Connections are dialed on first use, so a server that is down now
    /// fails operations, not construction.
    pub async fn connect(config: MemcachedConfig) -> Result<Self, ConfigError> {
        Self::connect_with_resolver(config, Arc::new(SystemResolver)).await
    }

    /// [`connect`](Self::connect) with a resolver of your own (service discovery), asked for
    /// each server's address now and again whenever the server stops answering.
    pub async fn connect_with_resolver(
        config: MemcachedConfig,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, ConfigError> {
        let config = config.validated()?;
        let settings = PoolSettings {
            connect_timeout: config.connect_timeout,
            io_timeout: config.io_timeout,
            // A reply's value: an item, which is at most the configured item size.
            max_value: config.max_item_size,
            connections: config.connections,
            max_in_flight: config.max_in_flight,
            retry_interval: config.retry_interval,
        };
        let mut nodes = Vec::with_capacity(config.servers.len());
        for server in &config.servers {
            let node = Node::new(server.clone(), settings.clone(), Arc::clone(&resolver));
            let node = tokio::time::timeout(config.connect_timeout, node)
                .await
                .map_err(|_| ConfigError::ResolveTimeout)?
                .map_err(|source| ConfigError::Resolve {
                    server: server.clone(),
                    source,
                })?;
            nodes.push(Arc::new(node));
        }
        Ok(Self {
            name_hashes: nodes::name_hashes(&nodes).into(),
            nodes: nodes.into(),
            replicas: config.replicas,
            key_prefix: config.key_prefix.as_str().into(),
            max_record_size: config.max_item_size - MemcachedConfig::ITEM_OVERHEAD,
            deadline: config.operation_deadline(),
            tombstone_ttl: config.tombstone_ttl,
            retry_interval: config.retry_interval,
            longest_ttl: Arc::default(),
            repairs: Arc::default(),
            seen: Arc::new(replicated::SeenCache::new(if config.replicas > 1 {
                replicated::SeenCache::SLOTS
            } else {
                1
            })),
        })
    }

    /// Builds the store from a `memcached://` URL; see [`MemcachedConfig::from_url`].
    pub async fn from_url(url: &str) -> Result<Self, ConfigError> {
        Self::connect(MemcachedConfig::from_url(url)?).await
    }

    /// The servers that hold `key`'s copies, best first, by their configured names (for
    /// operators, and for tests that stop a key's server).
    pub fn servers_of(&self, key: &StorageKey) -> Vec<&str> {
        self.placement(key)
            .as_slice()
            .iter()
            .map(|&index| self.nodes[usize::from(index)].name())
            .collect()
    }

    fn placement(&self, key: &StorageKey) -> Placement {
        nodes::place(key.as_str(), &self.name_hashes, self.replicas)
    }

    /// The one server of `key` when the store keeps a single copy.
    fn single_node(&self, key: &StorageKey) -> &Arc<Node> {
        let index = nodes::place(key.as_str(), &self.name_hashes, 1).as_slice()[0];
        &self.nodes[usize::from(index)]
    }

    fn replicated(&self) -> bool {
        self.replicas > 1
    }

    fn item_key<'a>(&self, key: &'a StorageKey) -> Cow<'a, str> {
        key.prefixed(&self.key_prefix)
    }
}

/// The longest key memcached accepts, in bytes.
const MAX_MEMCACHED_KEY_LEN: usize = 250;

#[async_trait]
impl SessionStore for MemcachedStore {
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        if self.replicated() {
            self.replicated_create(key, record, ttl).await
        } else {
            self.single_create(self.single_node(key), key, record, ttl)
                .await
        }
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        if self.replicated() {
            self.replicated_load_entry(key).await
        } else {
            self.single_load_entry(self.single_node(key), key).await
        }
    }

    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        // Not the trait's default, which would box a second future around `load_entry`.
        let entry = if self.replicated() {
            self.replicated_load_entry(key).await?
        } else {
            self.single_load_entry(self.single_node(key), key).await?
        };
        Ok(entry.and_then(StoredEntry::into_session))
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        if self.replicated() {
            self.replicated_save(key, record, ttl, version).await
        } else {
            self.single_save(self.single_node(key), key, record, ttl, version)
                .await
        }
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.replicated() {
            self.replicated_mark_moved(key, version, to, ttl).await
        } else {
            self.single_mark_moved(self.single_node(key), key, version, to, ttl)
                .await
        }
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        if self.replicated() {
            self.replicated_touch(key, ttl).await
        } else {
            self.single_touch(self.single_node(key), key, ttl).await
        }
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        if self.replicated() {
            self.replicated_delete(key, None).await
        } else {
            self.single_delete(self.single_node(key), key, None).await
        }
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        if self.replicated() {
            self.replicated_delete(key, Some(version)).await
        } else {
            self.single_delete(self.single_node(key), key, Some(version))
                .await
        }
    }

    fn max_record_size(&self) -> usize {
        self.max_record_size
    }

    /// memcached's 250-byte key limit less this store's own prefix.
    fn max_key_len(&self) -> Option<usize> {
        Some(MAX_MEMCACHED_KEY_LEN - self.key_prefix.len())
    }

    fn backend_name(&self) -> &'static str {
        "memcached"
    }
}
