//! [`MemoryStore`]: sessions in the process's memory, the embedded default backend.
//!
//! - Honors the whole [`SessionStore`] contract, versions included, so an application can use
//!   it in its own tests in place of memcached or Redis.
//! - Expired sessions are never returned; a background sweeper thread frees their memory every
//!   [`sweep_interval`](MemoryStoreBuilder::sweep_interval) without any caller action, and a
//!   full shard sweeps itself before it evicts or refuses anything.
//! - Bounded: at most [`max_sessions`](MemoryStoreBuilder::max_sessions) entries of at most
//!   [`max_record_size`](MemoryStoreBuilder::max_record_size) bytes each, so a client creating
//!   sessions in a loop cannot exhaust memory. What happens at the bound is set by [`OnFull`];
//!   by default a flood of new sessions evicts other new sessions, not the sessions of users who
//!   came back (see [below](#a-flood-of-new-sessions)).
//! - Sharded: entries are spread by key hash over independently locked shards (four per core,
//!   at most 64); no lock is held across an await or while decoding.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
//! use session_memory::MemoryStore;
//!
//! let store = MemoryStore::builder().max_sessions(50_000).build();
//! let config = SessionConfig::new(KeyRing::single(SigningKey::generate()?));
//! let manager = SessionManager::new(Arc::new(store), config)?;
//! let mut session = manager.load(None).await?;
//! session.insert("user", "alice")?;
//! let outcome = manager.commit(session).await?;
//! assert!(outcome.cookie.is_some());
//! # Ok(()) }
//! ```
//!
//! # A flood of new sessions
//!
//! **The threat.** Every request without a cookie to a page that writes the session creates an
//! entry. A client sending such requests in a loop (no cookie jar needed) fills the store to
//! its bound, and each of its entries expires later than the session of a user who has been
//! idle for a while. A store that evicted by expiry alone would then evict, and so log out,
//! every idle logged-in user.
//!
//! **What the store does.** It tells the two kinds of entry apart: an entry *came back* once it
//! is loaded, saved or touched after its `create` (a later request used it; the redirect after a
//! login loads it), and was *only created* until then. A flood that never presents its cookies
//! again only makes entries that were only created. With [`OnFull::EvictSoonestExpiring`] (the
//! default) a full shard evicts:
//!
//! 1. sessions only created, soonest-expiring first;
//! 2. then sessions that came back, soonest-expiring first;
//! 3. then moved markers, last (while one lives, a logout or a save that raced an id cycle
//!    follows it to the session; they expire soon anyway).
//!
//! So while a shard still holds a session that was only created, no session that came back is
//! evicted, whatever the expiries. Noting that an entry came back costs a flag set under the
//! shard lock that the load, save or touch holds anyway. Evicting keeps its bounded cost: a
//! full shard sweeps expired entries at most once a second, and otherwise frees 1/64 of its
//! share in one pass over its entries, so the cost of the pass is shared by the creates that
//! follow.
//!
//! **What it does not do.**
//!
//! - A session the flood's victims have just been given is only created: a new visitor's first
//!   session, and the session an id cycle (a login) moves to, until its next request. Under a
//!   flood these can be evicted before they come back.
//! - If a full shard holds fewer sessions only created than one eviction batch, the rest of the
//!   batch is taken from sessions that came back, soonest-expiring first: the shard is then
//!   full of real users, and the bound is too small.
//! - A client that does present each of its cookies again makes sessions that came back, which
//!   compete with real users on expiry alone; it costs the client a request per session.
//! - The flood still costs a create per request and fills the store.
//!
//! **What stays the application's job.** Rate-limit requests (and session creation above all)
//! per client in front of the application. Do not write to the session on pages anonymous
//! visitors reach: a new session with nothing in it is never stored, so such requests create
//! nothing. Size [`max_sessions`](MemoryStoreBuilder::max_sessions) for the real users plus
//! headroom. Where no session may ever be evicted, use [`OnFull::Reject`]: then new sessions
//! fail instead while the store is full.
//!
//! **Defaults.** [`max_sessions`](MemoryStoreBuilder::max_sessions) 100,000 (in shards of at
//! least 256), [`OnFull::EvictSoonestExpiring`] with the order above, an eviction batch of 1/64
//! of a shard's share (at least one entry), a full-shard sweep at most once a second, and the
//! background sweeper every 30 seconds.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use session_core::codec::{encode_moved, encode_record_within, is_moved_marker};
use session_core::store::check_ttl;
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};

/// The smallest share of `max_sessions` a default-sized shard gets.
const MIN_SHARD_SHARE: usize = 256;

/// A full shard sweeps expired entries at most this often; between sweeps it evicts or refuses
/// at once, so a flood of new sessions cannot make every create scan the shard.
const FULL_SHARD_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What a full store does with a `create` for a new key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Evict entries of the same shard: a full shard frees its 1/64 in one pass, so the cost
    /// of finding them is shared by the creates that follow. Sessions only ever created (never
    /// loaded, saved or touched since) go first, soonest-expiring first; then sessions that
    /// came back, soonest-expiring first (the least recently active ones, since activity
    /// pushes expiry back); moved markers last. New visitors always get a session; under a
    /// flood of new sessions, other sessions that never came back go first (see
    /// [the crate documentation](crate#a-flood-of-new-sessions)).
    #[default]
    EvictSoonestExpiring,
    /// Refuse with [`StoreError::Full`]: existing sessions are never evicted, new ones fail
    /// until entries expire or are deleted.
    Reject,
}

/// Settings of a [`MemoryStore`]; start from [`MemoryStore::builder`].
#[derive(Clone, Debug)]
pub struct MemoryStoreBuilder {
    max_sessions: usize,
    max_record_size: usize,
    on_full: OnFull,
    sweep_interval: Duration,
    shards: Option<usize>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_sessions: MemoryStore::DEFAULT_MAX_SESSIONS,
            max_record_size: MemoryStore::DEFAULT_MAX_RECORD_SIZE,
            on_full: OnFull::default(),
            sweep_interval: MemoryStore::DEFAULT_SWEEP_INTERVAL,
            shards: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most sessions held at once (default 100,000; at least 1). The bound is exact: each
    /// of the `n` shards holds at most `max_sessions / n`. Sessions spread over shards by key
    /// hash, so one shard can fill slightly before the whole store does (by about one percent
    /// at the default size; shards get at least 256 sessions each unless set by
    /// [`shards`](Self::shards)).
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max.max(1);
        self
    }

    /// The largest encoded record accepted, in bytes (default 64 KiB). Together with
    /// `max_sessions` it bounds the memory held by values.
    pub fn max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// What a full store does with a new session (default:
    /// [`OnFull::EvictSoonestExpiring`], sessions only created going first).
    pub fn on_full(mut self, policy: OnFull) -> Self {
        self.on_full = policy;
        self
    }

    /// How often the background sweeper frees expired entries (default 30 seconds).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How many independently locked shards to use (default: four per core, at most 64).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards.max(1));
        self
    }

    /// Builds the store and starts its sweeper thread.
    pub fn build(self) -> MemoryStore {
        let default_shards = std::thread::available_parallelism()
            .map_or(4, |n| n.get() * 4)
            .min(64);
        // Each shard holds an equal share of the bound; keeping shares at 256 or more keeps the
        // hash spread even enough that no shard fills long before the others.
        let shard_count = match self.shards {
            Some(shards) => shards.min(self.max_sessions),
            None => default_shards.min((self.max_sessions / MIN_SHARD_SHARE).max(1)),
        };
        let inner = Arc::new(Inner {
            shards: (0..shard_count).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            per_shard_cap: self.max_sessions / shard_count,
            max_record_size: self.max_record_size,
            on_full: self.on_full,
        });
        let sweeper = Arc::new(Sweeper::start(Arc::downgrade(&inner), self.sweep_interval));
        MemoryStore { inner, sweeper }
    }
}

/// The in-process session store. Cheap to clone: clones share the same sessions.
#[derive(Clone)]
pub struct MemoryStore {
    // Declared before `sweeper` so the sessions are gone when the sweeper is woken to exit.
    inner: Arc<Inner>,
    sweeper: Arc<Sweeper>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("per_shard_cap", &self.inner.per_shard_cap)
            .field("max_record_size", &self.inner.max_record_size)
            .field("on_full", &self.inner.on_full)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Default bound on the number of sessions.
    pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
    /// Default largest encoded record, in bytes.
    pub const DEFAULT_MAX_RECORD_SIZE: usize = 64 * 1024;
    /// Default interval of the background sweeper.
    pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

    /// A store with the default settings.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Settings to build a store from.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// How many entries are held in memory now, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| lock(s).entries.len())
            .sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most entries the store holds at once.
    pub fn capacity(&self) -> usize {
        self.inner.per_shard_cap * self.inner.shards.len()
    }

    /// Whether the background sweeper thread is running (it is unless the thread could not be
    /// spawned; expired entries are then freed when touched or when a shard fills).
    pub fn has_sweeper(&self) -> bool {
        self.sweeper.thread.is_some()
    }

    /// The live entry under `key`, decoded.
    fn entry_now(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        let now = Instant::now();
        let found = self.shard(key).live(key, now).map(|entry| {
            entry.came_back = true;
            (Arc::clone(&entry.bytes), entry.version, entry.expires_at)
        });
        let Some((bytes, version, expires_at)) = found else {
            return Ok(None);
        };
        StoredEntry::decode(
            &bytes,
            self.inner.max_record_size,
            Version::new(version),
            Some(expires_at.saturating_duration_since(now)),
        )
        .map(Some)
    }

    /// Replaces the live session under `key` with `bytes` if its version is still `version`.
    fn replace(
        &self,
        key: &StorageKey,
        version: Version,
        bytes: Arc<[u8]>,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let next = shard.last_version + 1;
        let entry = shard.live(key, now).ok_or(StoreError::NotFound)?;
        if entry.version != version.get() || is_moved_marker(&entry.bytes) {
            return Err(StoreError::Conflict);
        }
        *entry = Entry {
            bytes,
            version: next,
            expires_at: now + ttl,
            came_back: true,
        };
        shard.last_version = next;
        Ok(Version::new(next))
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Shard> {
        let index = self.inner.hasher.hash_one(key.as_str()) as usize % self.inner.shards.len();
        lock(&self.inner.shards[index])
    }
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    per_shard_cap: usize,
    max_record_size: usize,
    on_full: OnFull,
}

impl Inner {
    fn sweep(&self) {
        let now = Instant::now();
        for shard in &*self.shards {
            lock(shard).sweep(now);
        }
    }
}

#[derive(Default)]
struct Shard {
    entries: HashMap<StorageKey, Entry>,
    /// When this shard last swept itself because it was full.
    last_full_sweep: Option<Instant>,
    /// The last version handed out in this shard. A key always lives in the same shard, so
    /// versions never repeat for a key, even across delete and re-create.
    last_version: u64,
}

struct Entry {
    bytes: Arc<[u8]>,
    version: u64,
    expires_at: Instant,
    /// Whether the entry was loaded, saved or touched since its `create`: a later request used
    /// it. Set under the shard lock those operations hold anyway.
    came_back: bool,
}

impl Entry {
    /// Which entries a full shard evicts first: the lowest rank, then the soonest expiry.
    fn eviction_rank(&self) -> EvictionRank {
        if is_moved_marker(&self.bytes) {
            EvictionRank::Marker
        } else if self.came_back {
            EvictionRank::CameBack
        } else {
            EvictionRank::OnlyCreated
        }
    }
}

/// The order in which a full shard evicts kinds of entries, first to last.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EvictionRank {
    /// A session never loaded, saved or touched since its `create`, as a flood of cookieless
    /// requests makes.
    OnlyCreated,
    /// A session a later request used.
    CameBack,
    /// A moved marker: while it lives, a logout or a save that raced an id cycle follows it.
    Marker,
}

impl Shard {
    fn next_version(&mut self) -> u64 {
        self.last_version += 1;
        self.last_version
    }

    /// The live entry under `key`, dropping it first if it has expired.
    fn live(&mut self, key: &StorageKey, now: Instant) -> Option<&mut Entry> {
        if self.entries.get(key).is_some_and(|e| e.expires_at <= now) {
            self.entries.remove(key);
        }
        self.entries.get_mut(key)
    }

    fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, entry| entry.expires_at > now);
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }

    /// Makes room for one new entry, or says the shard is full.
    fn make_room(&mut self, cap: usize, policy: OnFull, now: Instant) -> Result<(), StoreError> {
        if self.entries.len() < cap {
            return Ok(());
        }
        let sweep_due = self
            .last_full_sweep
            .is_none_or(|last| now.duration_since(last) >= FULL_SHARD_SWEEP_INTERVAL);
        if sweep_due {
            self.last_full_sweep = Some(now);
            self.sweep(now);
            if self.entries.len() < cap {
                return Ok(());
            }
        }
        match policy {
            OnFull::Reject => Err(StoreError::Full),
            OnFull::EvictSoonestExpiring => {
                self.evict((cap / 64).max(1));
                Ok(())
            }
        }
    }

    /// Removes `count` entries in one pass over the shard, first by [`EvictionRank`] (sessions
    /// only created, then sessions that came back, then moved markers), then soonest-expiring
    /// first: a flood of new sessions evicts its own kind before any session a later request
    /// used. Markers go only when there are not enough sessions: they expire soon anyway, and
    /// while they live a logout or a save that raced an id cycle follows them to the session.
    fn evict(&mut self, count: usize) {
        let mut ranked: Vec<((EvictionRank, Instant), &StorageKey)> = self
            .entries
            .iter()
            .map(|(key, entry)| ((entry.eviction_rank(), entry.expires_at), key))
            .collect();
        let count = count.min(ranked.len());
        if count == 0 {
            return;
        }
        if count < ranked.len() {
            ranked.select_nth_unstable_by_key(count - 1, |(order, _)| *order);
        }
        let victims: Vec<StorageKey> = ranked[..count]
            .iter()
            .map(|(_, key)| (*key).clone())
            .collect();
        for victim in &victims {
            self.entries.remove(victim);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a shard was locked cannot leave an entry half-written (every update is a
    // single insert or field store), so the data is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The background thread that frees expired entries; woken to exit when the store is dropped.
struct Sweeper {
    thread: Option<Thread>,
}

impl Sweeper {
    fn start(inner: Weak<Inner>, interval: Duration) -> Self {
        let spawned = std::thread::Builder::new()
            .name("session-memory-sweeper".to_owned())
            .spawn(move || {
                loop {
                    std::thread::park_timeout(interval);
                    match inner.upgrade() {
                        Some(inner) => inner.sweep(),
                        None => return,
                    }
                }
            });
        Self {
            thread: spawned.ok().map(|handle| handle.thread().clone()),
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        if let Some(thread) = &self.thread {
            thread.unpark();
        }
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes: Arc<[u8]> = encode_record_within(record, self.inner.max_record_size)?.into();
        let now = Instant::now();
        let mut shard = self.shard(key);
        if shard.live(key, now).is_some() {
            return Err(StoreError::AlreadyExists);
        }
        shard.make_room(self.inner.per_shard_cap, self.inner.on_full, now)?;
        let version = shard.next_version();
        shard.entries.insert(
            key.clone(),
            Entry {
                bytes,
                version,
                expires_at: now + ttl,
                came_back: false,
            },
        );
        Ok(Version::new(version))
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.entry_now(key)
    }

    async fn load(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, StoreError> {
        // Not the trait's default, which would box a second future around `load_entry`.
        Ok(self.entry_now(key)?.and_then(StoredEntry::into_session))
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.inner.max_record_size)?.into();
        self.replace(key, version, bytes, ttl)
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_ttl(ttl)?;
        self.replace(key, version, encode_moved(to).into(), ttl)
            .map(drop)
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        let now = Instant::now();
        let mut shard = self.shard(key);
        Ok(shard
            .live(key, now)
            .filter(|entry| !is_moved_marker(&entry.bytes))
            .map(|entry| {
                entry.expires_at = now + ttl;
                entry.came_back = true;
            })
            .is_some())
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.shard(key).entries.remove(key);
        Ok(())
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let entry = shard.live(key, now).ok_or(StoreError::NotFound)?;
        if entry.version != version.get() || is_moved_marker(&entry.bytes) {
            return Err(StoreError::Conflict);
        }
        shard.entries.remove(key);
        Ok(())
    }

    fn max_record_size(&self) -> usize {
        self.inner.max_record_size
    }

    /// Keys of any length the manager makes fit.
    fn max_key_len(&self) -> Option<usize> {
        None
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }
}
