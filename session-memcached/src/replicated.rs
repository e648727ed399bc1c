//! Several copies per session (`replicas = n`, n ≥ 2). The design is in the crate docs
//! ("Replicas"); in short: every copy carries a generation, reads ask every live replica and
//! take the newest copy (a tombstone over a marker over the session of the highest
//! generation), repair stale copies, and a conditional write is decided by compare-and-set on
//! the first replica that answers, then carried to the others without ever overwriting
//! something newer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use session_core::codec::DecodeError;
use session_core::codec::{encode_moved, encode_record_within};
use session_core::store::{MAX_TTL, MIN_TTL, check_ttl};
use session_core::{Record, StorageKey, StoreError, StoredEntry, Version};

use crate::MemcachedStore;
use crate::items::{
    self, Condition, GENERATION_LEN, GENERATION_SESSION_FLAGS, Item, Kind, MutationStatus, Put,
    TOMBSTONE, expiry_flags, time_left, wire_ttl, written_cas,
};
use crate::nodes::{Node, fnv1a};
use crate::wire::Ttl;

/// What this process last saw of recently loaded or saved sessions, so that a save right after
/// a load need not read the replicas again: the compare-and-set on the first replica checks
/// the same thing the read would have (a stale entry only costs a conflict, and the manager's
/// reload reads afresh). Direct-mapped by key hash; a newer key simply takes the slot.
pub(crate) struct SeenCache {
    slots: Box<[Mutex<Option<Seen>>]>,
}

/// Per replica asked: its server index, the server's failure count then, and the kind and
/// CAS it held (`None` for nothing).
type SeenCopies = Vec<(u16, u64, Option<(Kind, u64)>)>;

/// How long a remembered read stays usable: about one request's time from load to save.
const SEEN_FOR: Duration = Duration::from_secs(2);

/// The copies of one session at one generation, as last seen.
struct Seen {
    key: Box<str>,
    at: Instant,
    generation: u64,
    copies: SeenCopies,
}

impl SeenCache {
    /// Slots of a replicated store's cache (a single-copy store needs none, and gets one).
    pub(crate) const SLOTS: usize = 4096;

    pub(crate) fn new(slots: usize) -> Self {
        Self {
            slots: (0..slots.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn slot(&self, key: &StorageKey) -> std::sync::MutexGuard<'_, Option<Seen>> {
        let index = (fnv1a(key.as_str().as_bytes()) % self.slots.len() as u64) as usize;
        self.slots[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, key: &StorageKey, generation: u64, copies: SeenCopies) {
        *self.slot(key) = Some(Seen {
            key: key.as_str().into(),
            at: Instant::now(),
            generation,
            copies,
        });
    }

    fn forget(&self, key: &StorageKey) {
        let mut slot = self.slot(key);
        if slot.as_ref().is_some_and(|seen| *seen.key == *key.as_str()) {
            *slot = None;
        }
    }

    /// The copies seen of `key` at `generation`, if those are what this process last saw.
    fn recall(&self, key: &StorageKey, generation: u64) -> Option<SeenCopies> {
        let slot = self.slot(key);
        let seen = slot.as_ref()?;
        (*seen.key == *key.as_str()
            && seen.generation == generation
            && seen.at.elapsed() < SEEN_FOR)
            .then(|| seen.copies.clone())
    }
}

/// The most read repairs one store runs in the background at once (each holds a copy of one
/// session and a connection per stale replica).
const MAX_REPAIRS: usize = 64;

/// Frees a repair's place when its task ends, however it ends.
struct RepairSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for RepairSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many writes a replica gets before a write gives up on it (each lost race re-reads it).
const PLACE_TRIES: usize = 4;

/// What one replica held when read: an item, or nothing.
struct Copy {
    node: Arc<Node>,
    item: Option<Item>,
}

/// The copies the live replicas of one key answered with, best replica first.
struct ReadPhase {
    copies: Vec<Copy>,
    /// Whether some replica did not answer (down, or failed now).
    incomplete: bool,
}

impl ReadPhase {
    /// The newest copy: the highest [`order`]; on a tie, the copy on the replica placed last.
    /// (Two different copies of one generation mean two writers decided on different
    /// replicas; the one that decided on the better-placed replica finds the other's write
    /// when it carries its own there, and yields to it, so the later copy is the one that
    /// stays.)
    fn winner(&self) -> Option<&Item> {
        let mut best: Option<&Item> = None;
        for copy in &self.copies {
            if let Some(item) = &copy.item
                && best.is_none_or(|b| order(Some(item)) >= order(Some(b)))
            {
                best = Some(item);
            }
        }
        best
    }
}

/// How new a copy is: nothing, then sessions by generation, then a marker, then a tombstone.
fn order(item: Option<&Item>) -> (u8, u64) {
    match item.map(|i| i.kind) {
        None => (0, 0),
        Some(Kind::Unreadable) => (1, 0),
        Some(Kind::Session { generation }) => (2, generation),
        Some(Kind::Moved) => (3, 0),
        Some(Kind::Ended) => (4, 0),
    }
}

/// Whether a copy of kind `existing` may be replaced by a write of kind `new`: only by
/// something newer, and a tombstone never (a create carries itself over one only as
/// `carry_create` says).
fn replaceable(existing: Kind, new: Kind) -> bool {
    match (existing, new) {
        (Kind::Ended, _) => false,
        (_, Kind::Ended) => true,
        (Kind::Unreadable, _) => true,
        (_, Kind::Unreadable) => false,
        (Kind::Moved, _) => false,
        (Kind::Session { .. }, Kind::Moved) => true,
        (Kind::Session { generation: old }, Kind::Session { generation }) => old < generation,
    }
}

/// The rule of [`MemcachedStore::place`] for every write but a create's carry: replace only
/// what `write` is newer than.
fn newer(write: &Write) -> impl Fn(&Item, bool) -> bool + '_ {
    move |item, _| replaceable(item.kind, write.kind)
}

/// What [`MemcachedStore::place`] did on one replica.
enum Placed {
    /// Written; the new CAS.
    Written(u64),
    /// Not written: the replica holds this, as new as the write or newer.
    Holds(Item),
    /// Not written: it kept losing races, or failed.
    GaveUp,
}

/// Whether `held`, found on a replica while carrying `write` there, is another writer's write
/// of the same version decided on another replica (it could not reach the first one, or did
/// not yet count it back): the same generation, or another marker. A later generation was
/// decided after this write on the first replica, so it is built on it.
fn competes(held: &Item, write: &Write) -> bool {
    held.value != write.value
        && match (held.kind, write.kind) {
            (Kind::Session { generation: held }, Kind::Session { generation }) => {
                held == generation
            }
            (Kind::Moved, Kind::Moved) => true,
            _ => false,
        }
}

/// An item to write to the replicas.
struct Write {
    kind: Kind,
    flags: u32,
    value: Vec<u8>,
    ttl: Ttl,
}

impl Write {
    fn put(&self, condition: Condition) -> Put<'_> {
        Put {
            value: &self.value,
            flags: self.flags,
            ttl: self.ttl,
            condition,
        }
    }

    fn session(generation: u64, record_bytes: &[u8], ttl: Duration) -> Self {
        let mut value = Vec::with_capacity(GENERATION_LEN + record_bytes.len());
        value.extend_from_slice(&generation.to_be_bytes());
        value.extend_from_slice(record_bytes);
        Self {
            kind: Kind::Session { generation },
            flags: GENERATION_SESSION_FLAGS,
            value,
            ttl: wire_ttl(ttl),
        }
    }

    fn tombstone(operation: &'static str, ttl: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            kind: Kind::Ended,
            flags: expiry_flags(operation, ttl)?,
            value: TOMBSTONE.to_vec(),
            ttl: wire_ttl(ttl),
        })
    }

    /// A copy of `item` with the expiry it has left, for read repair; `None` when it has
    /// (almost) expired.
    fn repair_of(item: &Item) -> Option<Self> {
        // The time left as memcached counts it (a marker's end is judged by it).
        let left = item
            .ttl
            .and_then(|secs| u64::try_from(secs).ok())
            .filter(|secs| *secs > 1)
            .map(Duration::from_secs);
        let ttl = match item.kind {
            Kind::Session { .. } => Ttl::from(left?),
            Kind::Moved | Kind::Ended => {
                Ttl::from(left.unwrap_or_else(|| time_left(item.flags)).min(MAX_TTL))
            }
            Kind::Unreadable => return None,
        };
        Some(Self {
            kind: item.kind,
            flags: item.flags,
            value: item.value.clone(),
            ttl,
        })
    }
}

/// The whole seconds memcached is sent for `ttl` (see [`wire_ttl`]): rounded up, plus one.
fn wire_secs(ttl: Duration) -> u64 {
    ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0) + 1
}

/// A new session's first generation: the time in microseconds, shifted, with random low bits,
/// so that a session created again under a deleted key outranks any old copy of the key.
fn first_generation(key: &StorageKey) -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let random = fnv1a(&micros.to_le_bytes()) ^ fnv1a(key.as_str().as_bytes());
    // 51 bits of microseconds last until 2041, after which the time wraps: ordering by time
    // only matters for a key created again after a delete, which the manager never does.
    ((micros as u64 & ((1 << 51) - 1)) << 12) | (random & 0xfff)
}

impl MemcachedStore {
    /// The replicas of `key` to ask now: those not marked down, best first; all of them when
    /// every one is marked down (so the caller gets an error, or a server that is back).
    fn live_replicas(&self, key: &StorageKey) -> (Vec<Arc<Node>>, bool) {
        let (indices, skipped) = self.live_replica_indices(key);
        let nodes = indices
            .iter()
            .map(|&index| Arc::clone(&self.nodes[usize::from(index)]))
            .collect();
        (nodes, skipped)
    }

    fn live_replica_indices(&self, key: &StorageKey) -> (Vec<u16>, bool) {
        let placement = self.placement(key);
        let all = placement.as_slice();
        let live: Vec<u16> = all
            .iter()
            .copied()
            .filter(|&index| !self.nodes[usize::from(index)].is_down())
            .collect();
        if live.is_empty() {
            (all.to_vec(), false)
        } else {
            let skipped = live.len() < all.len();
            (live, skipped)
        }
    }

    /// Remembers the copies `phase` read (or wrote) of `key`'s session at `generation`.
    fn remember(&self, key: &StorageKey, generation: u64, copies: &[Copy]) {
        let seen = copies
            .iter()
            .map(|copy| {
                let index = self
                    .nodes
                    .iter()
                    .position(|node| Arc::ptr_eq(node, &copy.node))
                    .unwrap_or(0) as u16;
                let seen = copy.item.as_ref().map(|item| (item.kind, item.cas));
                (index, copy.node.epoch(), seen)
            })
            .collect();
        self.seen.remember(key, generation, seen);
    }

    /// The read phase this process last saw of `key` at `generation`, when it still asked
    /// the same replicas; `None` means read afresh.
    fn recalled_phase(&self, key: &StorageKey, generation: u64) -> Option<ReadPhase> {
        let copies = self.seen.recall(key, generation)?;
        let (live, skipped) = self.live_replica_indices(key);
        // The same replicas, none of which has failed since (a restart resets a server's CAS
        // counter, so a remembered CAS could match a different item).
        let unchanged = live.len() == copies.len()
            && live.iter().zip(&copies).all(|(index, (seen, epoch, _))| {
                index == seen && self.nodes[usize::from(*index)].epoch() == *epoch
            });
        if !unchanged {
            return None;
        }
        let copies = copies
            .into_iter()
            .map(|(index, _, item)| Copy {
                node: Arc::clone(&self.nodes[usize::from(index)]),
                item: item.map(|(kind, cas)| Item {
                    kind,
                    flags: GENERATION_SESSION_FLAGS,
                    cas,
                    ttl: None,
                    value: Vec::new(),
                }),
            })
            .collect();
        Some(ReadPhase {
            copies,
            incomplete: skipped,
        })
    }

    /// Reads every live replica of `key` at once.
    async fn read_phase(
        &self,
        operation: &'static str,
        key: &StorageKey,
    ) -> Result<ReadPhase, StoreError> {
        let (nodes, skipped) = self.live_replicas(key);
        let item_key = self.item_key(key);
        let reads = nodes
            .iter()
            .map(|node| items::get(node, operation, &item_key, self.deadline));
        let results = join_all(reads).await;
        let mut copies = Vec::with_capacity(nodes.len());
        let mut failure = None;
        for (node, result) in nodes.into_iter().zip(results) {
            match result {
                Ok(item) => copies.push(Copy { node, item }),
                Err(StoreError::Decode(source)) => return Err(StoreError::Decode(source)),
                // Not a server failure (those mark the server down before returning): this
                // process ran out of connections. Leaving the replica out would make this
                // operation act as if it were down, so the operation fails instead.
                Err(error) if !node.is_down() => return Err(error),
                Err(error) => failure = Some(error),
            }
        }
        if copies.is_empty() {
            return Err(
                failure.unwrap_or_else(|| items::unexpected(operation, "no replica to ask".into()))
            );
        }
        Ok(ReadPhase {
            incomplete: skipped || failure.is_some(),
            copies,
        })
    }

    /// Writes `write` to `node` where it holds nothing, or something `replaces(item, first)`
    /// allows to replace (`first`: the item is the one `known` gave, not one re-read after a
    /// lost race); `known` is what it held when last read (`None`: not read). Re-reads after a
    /// lost race, up to `tries` writes. Returns the new CAS when written.
    #[allow(clippy::too_many_arguments)] // reason: one private helper; the rule says what it may replace
    async fn place(
        &self,
        operation: &'static str,
        node: &Arc<Node>,
        item_key: &str,
        write: &Write,
        mut known: Option<Option<Item>>,
        tries: usize,
        replaces: impl Fn(&Item, bool) -> bool,
    ) -> Placed {
        for try_ in 0..tries {
            let condition = match known {
                None | Some(None) => Condition::Absent,
                Some(Some(item)) if replaces(&item, try_ == 0) => Condition::Cas(item.cas),
                Some(Some(item)) => return Placed::Holds(item),
            };
            let put = write.put(condition);
            let Ok(result) = items::set(node, operation, item_key, put, self.deadline).await else {
                return Placed::GaveUp;
            };
            if result.status == MutationStatus::Applied {
                return written_cas(operation, &result).map_or(Placed::GaveUp, Placed::Written);
            }
            let Ok(held) = items::get(node, operation, item_key, self.deadline).await else {
                return Placed::GaveUp;
            };
            known = Some(held);
        }
        Placed::GaveUp
    }

    /// Brings every copy older than the winner up to it, in the background so that the read
    /// does not wait; best effort, one try each (a lost race means a newer write got there; a
    /// failure leaves the copy for the next read).
    fn repair(&self, key: &StorageKey, phase: &ReadPhase) {
        let Some(winner) = phase.winner() else {
            return;
        };
        let stale: Vec<(Arc<Node>, Option<Item>)> = phase
            .copies
            .iter()
            .filter(|copy| order(copy.item.as_ref()) < order(Some(winner)))
            .map(|copy| (Arc::clone(&copy.node), copy.item.clone()))
            .collect();
        if stale.is_empty() {
            return;
        }
        let (Some(write), Ok(runtime)) = (
            Write::repair_of(winner),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        if self.repairs.fetch_add(1, Ordering::AcqRel) >= MAX_REPAIRS {
            // Enough repairs run already; a later read repairs this copy.
            self.repairs.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let running = RepairSlot(Arc::clone(&self.repairs));
        let store = self.clone();
        let item_key = self.item_key(key).into_owned();
        runtime.spawn(async move {
            let _running = running;
            let repairs = stale.into_iter().map(|(node, item)| {
                let (store, item_key, write) = (&store, &item_key, &write);
                async move {
                    let known = Some(item);
                    store
                        .place("repair", &node, item_key, write, known, 1, newer(write))
                        .await
                }
            });
            join_all(repairs).await;
        });
    }

    pub(crate) async fn replicated_load_entry(
        &self,
        key: &StorageKey,
    ) -> Result<Option<StoredEntry>, StoreError> {
        let phase = self.read_phase("load", key).await?;
        self.repair(key, &phase);
        let Some(winner) = phase.winner() else {
            self.seen.forget(key);
            return Ok(None);
        };
        if let Kind::Session { generation } = winner.kind {
            self.remember(key, generation, &phase.copies);
        }
        let version = match winner.kind {
            Kind::Ended => return Ok(None),
            Kind::Session { generation } => Version::new(generation),
            Kind::Moved => Version::new(0),
            Kind::Unreadable => {
                return Err(StoreError::Decode(DecodeError::TooShort {
                    len: winner.value.len(),
                }));
            }
        };
        StoredEntry::decode(
            winner.payload(),
            self.max_record_size,
            version,
            winner.expires_in(),
        )
        .map(Some)
    }

    pub(crate) async fn replicated_create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.max_record_size)?;
        let generation = first_generation(key);
        self.note_ttl(ttl);
        let write = Write::session(generation, &bytes, ttl);
        let (nodes, _) = self.live_replicas(key);
        let item_key = self.item_key(key);
        // The first replica decides, as for a save: add there first, then carry the session to
        // the others. A racer that lost there has written nothing anywhere, so no read can
        // count a loser's copy, and no copy a loser takes back leaves a hole that a later
        // racer could fill. (Adding on every replica at once and letting the newest copy win
        // made two winners: reads of different replicas are not one snapshot.)
        let unread = ReadPhase {
            copies: nodes
                .iter()
                .map(|node| Copy {
                    node: Arc::clone(node),
                    item: None,
                })
                .collect(),
            incomplete: false,
        };
        let ((decider, decided_cas), phase, read) =
            match self.decide("create", &item_key, &write, &unread).await {
                Ok(decided) => (decided, unread, false),
                Err(StoreError::Conflict) => {
                    // The deciding replica holds something. Only a tombstone (a session ended
                    // under this key) is created over, compare-and-set so that one racer wins;
                    // anything else there is an entry this create must not replace.
                    let phase = self.read_phase("create", key).await?;
                    let ended = self.deciding_copies(&phase).first().is_some_and(|copy| {
                        copy.item.as_ref().is_none_or(|i| i.kind == Kind::Ended)
                    });
                    if !ended {
                        return Err(StoreError::AlreadyExists);
                    }
                    match self.decide("create", &item_key, &write, &phase).await {
                        Ok(decided) => (decided, phase, true),
                        Err(StoreError::Conflict) => return Err(StoreError::AlreadyExists),
                        Err(error) => return Err(error),
                    }
                }
                Err(error) => return Err(error),
            };
        let rest: Vec<&Copy> = phase
            .copies
            .iter()
            .filter(|copy| !Arc::ptr_eq(&copy.node, &decider))
            .collect();
        let carries = rest.iter().map(|copy| {
            let known = read.then(|| copy.item.clone());
            self.carry_create(&copy.node, &item_key, &write, known)
        });
        let carried = join_all(carries).await;
        let mut written = vec![(decider, decided_cas)];
        let mut exists = false;
        for (copy, carried) in rest.iter().zip(carried) {
            match carried {
                Placed::Written(cas) => written.push((Arc::clone(&copy.node), cas)),
                Placed::Holds(held) => {
                    exists |= matches!(held.kind, Kind::Session { .. } | Kind::Moved)
                }
                // A replica the session did not reach gets it from the next read's repair.
                Placed::GaveUp => {}
            }
        }
        if exists {
            return self.withdraw_create(&item_key, generation, &written).await;
        }
        Ok(Version::new(generation))
    }

    /// Carries a decided create to another replica: adds it where the replica holds nothing,
    /// and replaces only an unreadable value, or the tombstone `known` from the read made
    /// before the decision (compare-and-set on it). Anything else is held: a session or a
    /// marker (the key exists; the first replica lost it, or another process decided
    /// elsewhere), or a tombstone written since (a delete that raced this create, and ended it).
    async fn carry_create(
        &self,
        node: &Arc<Node>,
        item_key: &str,
        write: &Write,
        known: Option<Option<Item>>,
    ) -> Placed {
        let replaces = |item: &Item, first: bool| match item.kind {
            Kind::Unreadable => true,
            Kind::Ended => first,
            Kind::Session { .. } | Kind::Moved => false,
        };
        self.place(
            "create",
            node,
            item_key,
            write,
            known,
            PLACE_TRIES,
            replaces,
        )
        .await
    }

    /// A create found the key alive on another replica: takes its copies back (each
    /// compare-and-set against its own CAS) and reports [`StoreError::AlreadyExists`]. If the
    /// copy on the deciding replica was changed meanwhile (a save or a move built on it, or a
    /// delete), the create was seen and stands.
    async fn withdraw_create(
        &self,
        item_key: &str,
        generation: u64,
        written: &[(Arc<Node>, u64)],
    ) -> Result<Version, StoreError> {
        let undo = written
            .iter()
            .map(|(node, cas)| items::delete(node, "create", item_key, Some(*cas), self.deadline));
        let undone = join_all(undo).await;
        match undone.first() {
            Some(Ok(MutationStatus::CasMismatch)) => Ok(Version::new(generation)),
            _ => Err(StoreError::AlreadyExists),
        }
    }

    /// `save` and `mark_moved`: `write` replaces the session at generation `version`. Tries
    /// what this process last saw first; when that is out of date, reads the replicas.
    async fn replace(
        &self,
        operation: &'static str,
        key: &StorageKey,
        version: Version,
        write: &Write,
    ) -> Result<(), StoreError> {
        if let Some(phase) = self.recalled_phase(key, version.get()) {
            self.seen.forget(key);
            match self.replace_in(operation, key, version, write, phase).await {
                Err(StoreError::Conflict) => {}
                other => return other,
            }
        }
        let phase = self.read_phase(operation, key).await?;
        self.replace_in(operation, key, version, write, phase).await
    }

    async fn replace_in(
        &self,
        operation: &'static str,
        key: &StorageKey,
        version: Version,
        write: &Write,
        phase: ReadPhase,
    ) -> Result<(), StoreError> {
        match phase.winner().map(|w| w.kind) {
            None | Some(Kind::Ended) => return Err(StoreError::NotFound),
            Some(Kind::Session { generation }) if generation == version.get() => {}
            Some(_) => return Err(StoreError::Conflict),
        }
        let item_key = self.item_key(key);
        let (decider, decided_cas) = self.decide(operation, &item_key, write, &phase).await?;
        let rest: Vec<&Copy> = phase
            .copies
            .iter()
            .filter(|copy| !Arc::ptr_eq(&copy.node, &decider))
            .collect();
        let placed = join_all(rest.iter().map(|copy| {
            let known = Some(copy.item.clone());
            self.place(
                operation,
                &copy.node,
                &item_key,
                write,
                known,
                PLACE_TRIES,
                newer(write),
            )
        }))
        .await;
        let mut written = vec![(decider, decided_cas)];
        let mut everywhere = true;
        for (copy, placed) in rest.iter().zip(placed) {
            match placed {
                Placed::Written(cas) => written.push((Arc::clone(&copy.node), cas)),
                // Another writer decided on this replica (it could not reach the first one,
                // or did not yet count it as back): yield to it.
                Placed::Holds(held) if competes(&held, write) => {
                    return self.yield_to(operation, &item_key, &held, &written).await;
                }
                _ => everywhere = false,
            }
        }
        if let (Kind::Session { generation }, true) = (write.kind, everywhere) {
            // In the order of the read, which is placement order.
            written.sort_by_key(|(node, _)| {
                phase
                    .copies
                    .iter()
                    .position(|copy| Arc::ptr_eq(&copy.node, node))
            });
            let copies: Vec<Copy> = written
                .into_iter()
                .map(|(node, cas)| Copy {
                    node,
                    item: Some(Item {
                        kind: write.kind,
                        flags: write.flags,
                        cas,
                        ttl: None,
                        value: Vec::new(),
                    }),
                })
                .collect();
            self.remember(key, generation, &copies);
        }
        Ok(())
    }

    /// Writes `write` on the first replica that answered (in placement order), compare-and-set
    /// against what it held when read (add, if it held nothing: a server back empty); returns
    /// that replica and the new CAS. Of two racing writers, one wins there and the other gets
    /// a conflict. Every writer picks the same replica whatever its read saw, since the reads
    /// of different replicas are not one snapshot. A replica that came back less than a retry
    /// interval plus the deadline ago does not decide (other processes may not count it back
    /// yet). A replica that surely did not apply the write (refused, or not sent in time)
    /// hands the decision to the next one; one that may have applied it (sent, not answered)
    /// ends the write with its error, since a second replica deciding could make two writes
    /// of one version.
    async fn decide(
        &self,
        operation: &'static str,
        item_key: &str,
        write: &Write,
        phase: &ReadPhase,
    ) -> Result<(Arc<Node>, u64), StoreError> {
        let mut failure = None;
        for copy in self.deciding_copies(phase) {
            let condition = match &copy.item {
                None => Condition::Absent,
                Some(item) => Condition::Cas(item.cas),
            };
            let put = write.put(condition);
            match items::set_telling(&copy.node, operation, item_key, put, self.deadline).await {
                Ok(result) if result.status == MutationStatus::Applied => {
                    return Ok((Arc::clone(&copy.node), written_cas(operation, &result)?));
                }
                Ok(_) => return Err(StoreError::Conflict),
                Err(failed) if failed.maybe_applied || !copy.node.is_down() => {
                    return Err(failed.error);
                }
                Err(failed) => failure = Some(failed.error),
            }
        }
        Err(failure.unwrap_or(StoreError::Conflict))
    }

    /// The copies that may decide a write, in the order they are tried: those whose replica
    /// did not come back within the settling time (a retry interval plus the deadline), or
    /// all of them when every one did.
    fn deciding_copies<'a>(&self, phase: &'a ReadPhase) -> Vec<&'a Copy> {
        let settle = self.retry_interval + self.deadline;
        let settled: Vec<&Copy> = phase
            .copies
            .iter()
            .filter(|copy| !copy.node.settling(settle))
            .collect();
        if settled.is_empty() {
            phase.copies.iter().collect()
        } else {
            settled
        }
    }

    /// Another writer's `held` competes with this write, decided elsewhere: put it back over
    /// this write wherever this write still stands (compare-and-set against this write's own
    /// CAS) and report a conflict, so that one of the two is acknowledged, not both. Where
    /// this write no longer stands, a later write was built on it: it stays acknowledged.
    async fn yield_to(
        &self,
        operation: &'static str,
        item_key: &str,
        held: &Item,
        written: &[(Arc<Node>, u64)],
    ) -> Result<(), StoreError> {
        let Some(theirs) = Write::repair_of(held) else {
            return Err(StoreError::Conflict);
        };
        let backs = written.iter().map(|(node, cas)| {
            let put = theirs.put(Condition::Cas(*cas));
            items::set(node, operation, item_key, put, self.deadline)
        });
        let mut superseded = true;
        for result in join_all(backs).await {
            match result {
                Ok(result) if result.status == MutationStatus::Applied => superseded = false,
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        if superseded {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    pub(crate) async fn replicated_save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.max_record_size)?;
        let generation = version.get().checked_add(1).ok_or(StoreError::Conflict)?;
        self.note_ttl(ttl);
        let write = Write::session(generation, &bytes, ttl);
        self.replace("save", key, version, &write).await?;
        Ok(Version::new(generation))
    }

    /// The marker lasts `ttl`, but its item as long as a tombstone would: a replica that
    /// misses the marker keeps its copy of the session, which must not outlive the marker.
    pub(crate) async fn replicated_mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_ttl(ttl)?;
        self.seen.forget(key);
        let phase = self.read_phase("mark_moved", key).await?;
        let item_ttl = self.tombstone_ttl(&phase).max(ttl);
        let (item_secs, marker_secs) = (wire_secs(item_ttl), wire_secs(ttl));
        let write = Write {
            kind: Kind::Moved,
            flags: expiry_flags("mark_moved", item_ttl)?,
            value: items::replicated_marker(item_secs - marker_secs, &encode_moved(to)),
            ttl: Ttl::from(Duration::from_secs(item_secs)),
        };
        self.replace_in("mark_moved", key, version, &write, phase)
            .await
    }

    pub(crate) async fn replicated_touch(
        &self,
        key: &StorageKey,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        self.note_ttl(ttl);
        let (nodes, _) = self.live_replicas(key);
        let item_key = self.item_key(key);
        let touches = nodes
            .iter()
            .map(|node| items::touch(node, &item_key, wire_ttl(ttl), self.deadline));
        let results = join_all(touches).await;
        let mut session = false;
        let mut ended = false;
        let mut failure = None;
        let mut restores = Vec::new();
        for (node, result) in nodes.iter().zip(results) {
            match result {
                Ok(touched) if touched.hit => match touched.client_flags {
                    Some(flags) if flags > items::LAST_SESSION_FLAGS => {
                        ended = true;
                        restores.push((node, flags));
                    }
                    _ => session = true,
                },
                Ok(_) => {}
                Err(error) => failure = Some(error),
            }
        }
        // A marker or tombstone was touched: give it back its own expiry.
        let restore = restores.into_iter().map(|(node, flags)| {
            let restore = Ttl::from(time_left(flags));
            items::touch(node, &item_key, restore, self.deadline)
        });
        for restored in join_all(restore).await {
            restored?;
        }
        match failure {
            Some(error) if !session && !ended => Err(error),
            _ => Ok(session && !ended),
        }
    }

    /// `delete` (no version) and `delete_if_version`: tombstones on every live replica, so
    /// that a copy on a replica that is unreachable now cannot bring the session back later.
    pub(crate) async fn replicated_delete(
        &self,
        key: &StorageKey,
        version: Option<Version>,
    ) -> Result<(), StoreError> {
        let operation = if version.is_some() {
            "delete_if_version"
        } else {
            "delete"
        };
        self.seen.forget(key);
        let phase = self.read_phase(operation, key).await?;
        let winner = phase.winner();
        if let Some(version) = version {
            match winner.map(|w| w.kind) {
                None | Some(Kind::Ended) => return Err(StoreError::NotFound),
                Some(Kind::Session { generation }) if generation == version.get() => {}
                Some(_) => return Err(StoreError::Conflict),
            }
        } else if !phase.incomplete
            && phase
                .copies
                .iter()
                .all(|copy| copy.item.as_ref().is_none_or(|i| i.kind == Kind::Ended))
        {
            // Every replica answered and none holds a live entry: nothing to end.
            return Ok(());
        }
        let write = Write::tombstone(operation, self.tombstone_ttl(&phase))?;
        let item_key = self.item_key(key);
        let decider = match version {
            // A replica decides, as for a save.
            Some(_) => Some(self.decide(operation, &item_key, &write, &phase).await?.0),
            None => None,
        };
        // A tombstone outranks everything, so it is written unconditionally.
        let rest = phase
            .copies
            .iter()
            .filter(|copy| decider.as_ref().is_none_or(|d| !Arc::ptr_eq(&copy.node, d)));
        let writes = rest.map(|copy| async {
            let written = items::set(
                &copy.node,
                operation,
                &item_key,
                write.put(Condition::Always),
                self.deadline,
            )
            .await;
            (&copy.node, written)
        });
        let results = join_all(writes).await;
        // A replica whose tombstone failed while it still counts as up (this process had no
        // free connection for it, or it answered with an error) keeps its live copy: the
        // logout must fail rather than be acknowledged with a copy that outlives the
        // tombstones if their servers die. One that failed in transport is down now, and is
        // left out as the read phase would have (the tombstones outrank it when it returns).
        let mut first_error = None;
        let mut written = 0;
        for (node, result) in results {
            match result {
                Ok(_) => written += 1,
                Err(error) if !node.is_down() => return Err(error),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if version.is_none()
            && written == 0
            && let Some(error) = first_error
        {
            return Err(error);
        }
        Ok(())
    }

    /// How long a tombstone must last: as long as any copy it ends could (the longest time
    /// left among the copies read, plus a second); at least the configured tombstone TTL when
    /// a replica did not answer, since its copy's expiry is unknown.
    fn tombstone_ttl(&self, phase: &ReadPhase) -> Duration {
        let unknown = self.fallback_tombstone_ttl();
        let longest = phase
            .copies
            .iter()
            .filter_map(|copy| copy.item.as_ref())
            .map(|item| match item.kind {
                Kind::Session { .. } => item.expires_in().unwrap_or(unknown),
                Kind::Moved | Kind::Ended => time_left(item.flags),
                Kind::Unreadable => unknown,
            })
            .max()
            .unwrap_or(Duration::ZERO)
            + Duration::from_secs(1);
        let ttl = if phase.incomplete {
            longest.max(unknown)
        } else {
            longest
        };
        ttl.clamp(MIN_TTL, MAX_TTL)
    }

    /// The configured tombstone TTL, or the longest TTL this process has given a session if
    /// that is longer.
    fn fallback_tombstone_ttl(&self) -> Duration {
        let longest = Duration::from_secs(self.longest_ttl.load(Ordering::Relaxed));
        self.tombstone_ttl.max(longest)
    }

    /// Notes a TTL given to a session, for [`fallback_tombstone_ttl`](Self::fallback_tombstone_ttl).
    fn note_ttl(&self, ttl: Duration) {
        self.longest_ttl
            .fetch_max(ttl.as_secs().saturating_add(1), Ordering::Relaxed);
    }
}
