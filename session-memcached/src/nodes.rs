//! The servers: how a key is placed on them (stable rendezvous hashing), a few multiplexed connections per
//! server, and each server's health (marked down on a transport failure, probed in the
//! background, its name resolved again until it answers).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;

use crate::mux::Mux;
use crate::wire::Request;

/// Turns a server name (`host:port`, as configured) into socket addresses. The store asks it
/// when it is built, and again whenever a server stops answering, so a server that comes back
/// on a new address is reached without a restart.
///
/// [`SystemResolver`] (the system's resolver, through tokio) is the default; plug in another
/// one for service discovery.
#[async_trait]
pub trait Resolver: Send + Sync + 'static {
    /// The addresses `server` answers on now, best first. The store uses the first.
    async fn resolve(&self, server: &str) -> io::Result<Vec<SocketAddr>>;
}

/// The system's resolver (`getaddrinfo`, through `tokio::net::lookup_host`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

#[async_trait]
impl Resolver for SystemResolver {
    async fn resolve(&self, server: &str) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host(server).await?.collect())
    }
}

/// The settings every server's connections are built with.
#[derive(Clone, Debug)]
pub(crate) struct PoolSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) io_timeout: Duration,
    pub(crate) max_value: usize,
    pub(crate) connections: usize,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) retry_interval: Duration,
}

impl PoolSettings {
    fn connections_to(&self, address: SocketAddr) -> Mux {
        Mux::new(
            address,
            self.connections,
            self.connect_timeout,
            self.io_timeout,
            self.max_value,
        )
    }
}

/// One memcached server: its configured name, its connections, and whether it answered
/// last time.
pub(crate) struct Node {
    name: String,
    name_hash: u64,
    pool: RwLock<Pool>,
    down: AtomicBool,
    probing: AtomicBool,
    /// When a probe last found the server back, if it ever was down.
    back_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// When the running probe last showed it runs (started, or began a try).
    probe_beat: std::sync::Mutex<std::time::Instant>,
    /// One permit per request in flight, when requests in flight are capped.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    /// Counts the server's failures: CAS values remembered from before a failure may belong
    /// to items the server lost (a restart resets its CAS counter), so they are not reused.
    epoch: AtomicU64,
    settings: PoolSettings,
    resolver: Arc<dyn Resolver>,
}

/// The connections to the address the server's name resolved to.
struct Pool {
    connections: Arc<Mux>,
}

impl Node {
    /// Resolves `name` and builds its pool (connections are dialed on first use).
    pub(crate) async fn new(
        name: String,
        settings: PoolSettings,
        resolver: Arc<dyn Resolver>,
    ) -> io::Result<Self> {
        let address = first_address(resolver.as_ref(), &name).await?;
        let connections = Arc::new(settings.connections_to(address));
        Ok(Self {
            name_hash: fnv1a(name.as_bytes()),
            name,
            pool: RwLock::new(Pool { connections }),
            down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            back_since: std::sync::Mutex::new(None),
            probe_beat: std::sync::Mutex::new(std::time::Instant::now()),
            permits: settings
                .max_in_flight
                .map(|cap| Arc::new(tokio::sync::Semaphore::new(cap))),
            settings,
            resolver,
        })
    }

    /// Waits for a free slot under the in-flight cap, at most the connect timeout; `Err` when
    /// none came (this process is at its cap: the server is not to blame).
    pub(crate) async fn permit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
        let Some(permits) = &self.permits else {
            return Ok(None);
        };
        let acquire = Arc::clone(permits).acquire_owned();
        match tokio::time::timeout(self.settings.connect_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            _ => Err(()),
        }
    }

    /// The server's name, as configured.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The connections to use now.
    pub(crate) fn client(&self) -> Arc<Mux> {
        Arc::clone(
            &self
                .pool
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .connections,
        )
    }

    /// Whether the server failed its last request and has not answered a probe since. A down
    /// server always has a probe running: one whose task ended with its runtime, or that has
    /// not run for longer than a try can take (its runtime sits idle while another uses the
    /// store), is started again here, on the caller's runtime, since requests leave a down
    /// server out and report nothing new.
    pub(crate) fn is_down(self: &Arc<Self>) -> bool {
        let down = self.down.load(Ordering::Acquire);
        if down {
            if !self.probing.load(Ordering::Acquire) {
                self.start_probe();
            } else if self.probe_stalled() {
                self.spawn_probe();
            }
        }
        down
    }

    /// Whether the running probe has not shown it runs for longer than one try can take: a
    /// retry interval of sleep, a name lookup and a no-op (each bounded by the timeouts), and
    /// a retry interval to spare.
    fn probe_stalled(&self) -> bool {
        let settings = &self.settings;
        let one_try =
            2 * settings.retry_interval + 3 * settings.connect_timeout + settings.io_timeout;
        self.probe_beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            > one_try
    }

    /// Notes that the probe runs.
    fn probe_beats(&self) {
        *self.probe_beat.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// Records a transport failure (refused, reset, timed out): the server is down until a
    /// background probe gets an answer. The probe resolves the name again before each try, so
    /// it also finds a server that moved to a new address.
    pub(crate) fn report_failure(self: &Arc<Self>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.down.store(true, Ordering::Release);
        self.start_probe();
    }

    fn start_probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.spawn_probe();
    }

    /// Spawns a probe on the caller's runtime (a stalled one, if any, may still end the
    /// probing later; two probes of one server are harmless).
    fn spawn_probe(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::Release);
            return;
        };
        self.probing.store(true, Ordering::Release);
        self.probe_beats();
        runtime.spawn(probe(ProbeGuard(Arc::downgrade(self))));
    }

    /// Whether the server came back less than `settle` ago: every process of the deployment
    /// probes a returned server within one retry interval, so until then some may still count
    /// it down, and it must not decide writes (see the crate docs, "Replicas").
    pub(crate) fn settling(&self, settle: Duration) -> bool {
        self.back_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|since| since.elapsed() < settle)
    }

    /// The number of failures reported so far.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Resolves the name again and, when it points somewhere new, swaps in a pool for the new
    /// address (the old pool's connections close as their requests finish).
    async fn re_resolve(&self) {
        let lookup = first_address(self.resolver.as_ref(), &self.name);
        let Ok(Ok(address)) = tokio::time::timeout(self.settings.connect_timeout, lookup).await
        else {
            return;
        };
        if address == self.client().address() {
            return;
        }
        *self.pool.write().unwrap_or_else(|e| e.into_inner()) = Pool {
            connections: Arc::new(self.settings.connections_to(address)),
        };
    }
}

/// Every retry interval: resolve the name again, then send a `mn` (no-op); the first answer
/// marks the server up. Ends when the server answers or the store is dropped.
async fn probe(guard: ProbeGuard) {
    loop {
        let Some(interval) = guard.0.upgrade().map(|n| n.settings.retry_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(node) = guard.0.upgrade() else {
            return;
        };
        node.probe_beats();
        node.re_resolve().await;
        if node.client().call(Request::Noop, None).await.is_ok() {
            // Probing ends before the server counts as up: a failure reported in between
            // starts a new probe instead of being left with none.
            node.probing.store(false, Ordering::Release);
            *node.back_since.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
            node.down.store(false, Ordering::Release);
            return;
        }
    }
}

/// Ends a probe however its task ends (answered, or its runtime shut down), so that the next
/// failure starts a new one.
struct ProbeGuard(Weak<Node>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(node) = self.0.upgrade() {
            node.probing.store(false, Ordering::Release);
        }
    }
}

async fn first_address(resolver: &dyn Resolver, name: &str) -> io::Result<SocketAddr> {
    resolver
        .resolve(name)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "the server name resolved to no address",
            )
        })
}

/// The most copies of one session the store keeps.
pub const MAX_REPLICAS: usize = 4;

/// Where one key lives: its replica servers, best first (indices into the server list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    nodes: [u16; MAX_REPLICAS],
    len: u8,
}

impl Placement {
    pub(crate) fn as_slice(&self) -> &[u16] {
        &self.nodes[..usize::from(self.len)]
    }
}

/// Rendezvous (highest random weight) placement, specified so that every build and every
/// process places a key on the same servers: each server scores
/// `mix(fnv1a(key) ^ fnv1a(name))`, where `fnv1a` is 64-bit FNV-1a over the bytes of the
/// storage key and of the server's configured name (`host:port`), and `mix` is SplitMix64's
/// finalizer. The key's replicas are the `replicas` highest scores, highest first (a tie, with
/// odds of 2⁻⁶⁴, goes to the server listed first). Adding or removing a server moves only the
/// keys it gains or held; the order of the list does not matter.
pub(crate) fn place(key: &str, name_hashes: &[u64], replicas: usize) -> Placement {
    let key_hash = fnv1a(key.as_bytes());
    let mut best: [(u64, u16); MAX_REPLICAS] = [(0, 0); MAX_REPLICAS];
    let mut len = 0usize;
    for (index, name_hash) in name_hashes.iter().enumerate() {
        let score = mix(key_hash ^ name_hash);
        // Insertion into the short sorted list of the best so far.
        let mut at = len;
        while at > 0 && best[at - 1].0 < score {
            at -= 1;
        }
        if at >= replicas {
            continue;
        }
        let end = len.min(replicas - 1);
        best.copy_within(at..end, at + 1);
        // At most 2^16 servers are accepted by the configuration.
        best[at] = (score, index as u16);
        len = (len + 1).min(replicas);
    }
    let mut nodes = [0u16; MAX_REPLICAS];
    for (slot, (_, index)) in nodes.iter_mut().zip(&best[..len]) {
        *slot = *index;
    }
    Placement {
        nodes,
        len: len as u8,
    }
}

/// The hashes [`place`] scores servers with, one per configured name.
pub(crate) fn name_hashes(nodes: &[Arc<Node>]) -> Vec<u64> {
    nodes.iter().map(|node| node.name_hash).collect()
}

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finalizer: spreads every input bit over the whole output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(names: &[&str]) -> Vec<u64> {
        names.iter().map(|n| fnv1a(n.as_bytes())).collect()
    }

    #[test]
    fn fnv1a_matches_its_specification() {
        // Test vectors of the FNV specification (draft-eastlake-fnv).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn placement_of_fixed_keys_is_pinned() {
        // If this test has to change, every deployment's sessions move to other servers on
        // upgrade: routing is part of the stored format.
        let servers = hashes(&["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"]);
        let placed: Vec<Vec<u16>> = ["session:a", "session:b", "session:c", "session:d"]
            .iter()
            .map(|key| place(key, &servers, 3).as_slice().to_vec())
            .collect();
        assert_eq!(
            placed, PINNED_PLACEMENTS,
            "the placement of fixed keys changed"
        );
        for key in ["session:a", "session:b", "session:c", "session:d"] {
            let all = place(key, &servers, 3);
            assert_eq!(place(key, &servers, 1).as_slice(), &all.as_slice()[..1]);
            assert_eq!(place(key, &servers, 2).as_slice(), &all.as_slice()[..2]);
        }
    }

    /// Computed independently from the specification (a few lines of Python over the same
    /// FNV-1a and SplitMix64 definitions), not taken from this code's output.
    const PINNED_PLACEMENTS: [[u16; 3]; 4] = [[0, 2, 1], [1, 2, 0], [0, 1, 2], [1, 0, 2]];

    #[test]
    fn placement_is_fair_and_moves_only_the_keys_of_a_removed_server() {
        let four = hashes(&["a:1", "b:1", "c:1", "d:1"]);
        let three = hashes(&["a:1", "c:1", "d:1"]);
        let mut first = [0usize; 4];
        let mut pairs = std::collections::HashMap::new();
        for n in 0..40_000u32 {
            let key = format!("session:{n}");
            let placed = place(&key, &four, 2);
            let [p, s] = [placed.as_slice()[0], placed.as_slice()[1]];
            assert_ne!(p, s);
            first[usize::from(p)] += 1;
            *pairs.entry((p, s)).or_insert(0usize) += 1;
            let after = place(&key, &three, 1).as_slice()[0];
            let renamed = |i: u16| ["a:1", "c:1", "d:1"][usize::from(i)];
            let names = ["a:1", "b:1", "c:1", "d:1"];
            if p != 1 {
                assert_eq!(renamed(after), names[usize::from(p)], "{key} moved");
            } else {
                // The removed server's keys go to their second choice.
                assert_eq!(renamed(after), names[usize::from(s)], "{key}");
            }
        }
        for count in first {
            assert!((9_000..=11_000).contains(&count), "unfair: {first:?}");
        }
        // Each ordered pair of servers is equally likely as (first, second).
        assert_eq!(pairs.len(), 12);
        for count in pairs.values() {
            assert!((2_900..=3_800).contains(count), "unfair pairs: {pairs:?}");
        }
    }
}
