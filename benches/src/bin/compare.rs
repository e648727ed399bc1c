//! The compare harness: session cycles per second (load a session, change it, save it back) of
//! our stores against the raw clients doing the same round trips and against peer libraries,
//! on the same servers in one run, at concurrency 1 and 32; and resident memory per stored
//! session of our memory store against tower-sessions' memory store.
//!
//! `cargo run --release -p session-benches --bin compare [-- --quick]`. It starts its own
//! memcached and redis-server on loopback ports, prints a table of medians and ratios, and
//! writes `target/compare/compare.md` and `target/compare/compare.svg`.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_session::storage::{RedisSessionStore, SessionKey, SessionStore as ActixStore};
use memcache::exp::{AsyncMetaClient, Ttl};
use session_conformance::harness::{ServerKind, ServerProcess};
use session_core::codec::{decode_value, encode_record, encode_value};
use session_core::{KeyPrefix, Record, SessionId, SessionStore, StorageKey};
use session_memcached::{MemcachedConfig, MemcachedStore};
use session_memory::MemoryStore;
use session_redis::redis;
use session_redis::{RedisConfig, RedisStore};
use tower_sessions::session::{Id, Record as PeerRecord};
use tower_sessions::session_store::SessionStore as PeerStore;
use tower_sessions_redis_store::fred::prelude::{ClientLike, Config as FredConfig};

const TTL: Duration = Duration::from_secs(3600);
/// Sessions each task cycles through (its own, so tasks never conflict).
const SESSIONS_PER_TASK: usize = 16;
const CONCURRENCIES: [usize; 2] = [1, 32];

/// How long to warm up and measure, and how many rounds to take the median of.
#[derive(Clone, Copy)]
struct Plan {
    warm_up: Duration,
    measure: Duration,
    rounds: usize,
    memory_sessions: usize,
}

impl Plan {
    fn from_args() -> Self {
        if std::env::args().any(|a| a == "--quick") {
            Self {
                warm_up: Duration::from_millis(200),
                measure: Duration::from_millis(500),
                rounds: 1,
                memory_sessions: 100_000,
            }
        } else {
            // Many short windows, every implementation once per round in a rotating order:
            // a busy moment of the machine falls on all of them alike, and each ratio is taken
            // within a round.
            Self {
                warm_up: Duration::from_millis(250),
                measure: Duration::from_secs(1),
                rounds: 9,
                memory_sessions: 100_000,
            }
        }
    }
}

/// One implementation's session cycle: `cycle(slot)` loads session `slot`, changes it, saves it.
trait Cycler: Send + Sync + 'static {
    fn cycle(&self, slot: usize) -> impl Future<Output = ()> + Send;
}

/// Runs `concurrency` tasks that each cycle their own sessions for `duration`; cycles per second.
async fn measure<C: Cycler>(cycler: &Arc<C>, concurrency: usize, duration: Duration) -> f64 {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let cycler = Arc::clone(cycler);
        tasks.spawn(async move {
            let mut cycles = 0u64;
            while Instant::now() < deadline {
                let slot = task * SESSIONS_PER_TASK + (cycles as usize % SESSIONS_PER_TASK);
                cycler.cycle(slot).await;
                cycles += 1;
            }
            cycles
        });
    }
    let mut total = 0u64;
    while let Some(cycles) = tasks.join_next().await {
        total += cycles.expect("a benchmark task panicked");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// The session every implementation stores: a user name, a visit counter and a cart.
fn our_record() -> Record {
    let mut record = Record::new(SystemTime::now());
    record.set_value("user", encode_value("alice").unwrap());
    record.set_value("visits", encode_value(&0u64).unwrap());
    record.set_value("cart", encode_value(&["tea", "milk", "bread"]).unwrap());
    record
}

fn slots() -> usize {
    CONCURRENCIES.iter().max().unwrap() * SESSIONS_PER_TASK
}

/// Our store, called through `Arc<dyn SessionStore>` as the manager calls it.
struct Ours {
    store: Arc<dyn SessionStore>,
    keys: Vec<StorageKey>,
}

impl Ours {
    async fn new(store: Arc<dyn SessionStore>) -> Self {
        let record = our_record();
        let mut keys = Vec::new();
        for _ in 0..slots() {
            let key = StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
            store.create(&key, &record, TTL).await.unwrap();
            keys.push(key);
        }
        Self { store, keys }
    }
}

impl Cycler for Ours {
    async fn cycle(&self, slot: usize) {
        let key = &self.keys[slot];
        let loaded = self.store.load(key).await.unwrap().unwrap();
        let mut record = loaded.record;
        let visits: u64 = decode_value(record.value("visits").unwrap()).unwrap();
        record.set_value("visits", encode_value(&(visits + 1)).unwrap());
        self.store
            .save(key, &record, TTL, loaded.version)
            .await
            .unwrap();
    }
}

/// memcache's meta client doing the same round trips: get, then set.
struct RawMemcached {
    client: AsyncMetaClient,
    keys: Vec<String>,
    value: Vec<u8>,
}

impl Cycler for RawMemcached {
    async fn cycle(&self, slot: usize) {
        let key = &self.keys[slot];
        let got = self.client.get(key).send().await.unwrap();
        assert!(got.value.is_some());
        self.client
            .set(key, &self.value)
            .ttl(Ttl::secs(3600))
            .send()
            .await
            .unwrap();
    }
}

/// memcache's meta client doing the round trips our store makes, without our store: get with
/// the CAS value and TTL, then a compare-and-set. Separates the cost of CAS from ours.
struct RawMemcachedCas {
    client: AsyncMetaClient,
    keys: Vec<String>,
    value: Vec<u8>,
}

impl Cycler for RawMemcachedCas {
    async fn cycle(&self, slot: usize) {
        let key = &self.keys[slot];
        let got = self
            .client
            .get(key)
            .meta(memcache::exp::Meta::NONE.cas().ttl())
            .send()
            .await
            .unwrap();
        let cas = got.item.cas.unwrap();
        self.client
            .set(key, &self.value)
            .ttl(Ttl::secs(3600))
            .compare_cas(cas)
            .return_cas()
            .send()
            .await
            .unwrap();
    }
}

/// The redis crate doing the same round trips: GET, then SET ... EX.
struct RawRedis {
    connection: redis::aio::ConnectionManager,
    keys: Vec<String>,
    value: Vec<u8>,
}

impl Cycler for RawRedis {
    async fn cycle(&self, slot: usize) {
        let key = &self.keys[slot];
        let mut connection = self.connection.clone();
        let got: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(got.is_some());
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(&self.value)
            .arg("EX")
            .arg(3600)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
}

/// The redis crate doing the least an atomic save needs on Redis 7: `GET`, then a minimal
/// compare-and-set script (`EVALSHA`) that writes only if the value still starts with the
/// eight bytes read. The reference for our store, whose saves never lose an update (a plain
/// `GET` + `SET` does not compare).
struct RawRedisCas {
    connection: redis::aio::ConnectionManager,
    keys: Vec<String>,
    value: Vec<u8>,
    script: redis::Script,
}

impl RawRedisCas {
    fn new(connection: redis::aio::ConnectionManager, keys: Vec<String>, value: Vec<u8>) -> Self {
        let script = redis::Script::new(
            r"
if redis.call('GETRANGE', KEYS[1], 0, 7) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
",
        );
        Self {
            connection,
            keys,
            value,
            script,
        }
    }
}

impl Cycler for RawRedisCas {
    async fn cycle(&self, slot: usize) {
        let key = &self.keys[slot];
        let mut connection = self.connection.clone();
        let got: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap();
        let saved: u8 = self
            .script
            .key(key)
            .arg(&got[..8.min(got.len())])
            .arg(&self.value)
            .arg(3_600_000)
            .invoke_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(saved, 1);
    }
}

/// A tower-sessions store (memory, moka or Redis): load the record, change it, save it.
struct TowerSessions<S> {
    store: S,
    ids: Vec<Id>,
}

fn peer_record() -> PeerRecord {
    let mut data = HashMap::new();
    data.insert("user".to_owned(), serde_json::json!("alice"));
    data.insert("visits".to_owned(), serde_json::json!(0u64));
    data.insert(
        "cart".to_owned(),
        serde_json::json!(["tea", "milk", "bread"]),
    );
    PeerRecord {
        id: Id::default(),
        data,
        expiry_date: tower_sessions::cookie::time::OffsetDateTime::now_utc()
            + tower_sessions::cookie::time::Duration::hours(1),
    }
}

impl<S: PeerStore> TowerSessions<S> {
    async fn new(store: S) -> Self {
        let mut ids = Vec::new();
        for _ in 0..slots() {
            let mut record = peer_record();
            store.create(&mut record).await.unwrap();
            ids.push(record.id);
        }
        Self { store, ids }
    }
}

impl<S: PeerStore> Cycler for TowerSessions<S> {
    async fn cycle(&self, slot: usize) {
        let mut record = self.store.load(&self.ids[slot]).await.unwrap().unwrap();
        let visits = record.data["visits"].as_u64().unwrap();
        record
            .data
            .insert("visits".to_owned(), serde_json::json!(visits + 1));
        self.store.save(&record).await.unwrap();
    }
}

/// actix-session's Redis store: load the state, change it, update it.
struct ActixSession {
    store: RedisSessionStore,
    keys: Vec<tokio::sync::Mutex<Option<SessionKey>>>,
}

fn actix_state() -> HashMap<String, String> {
    HashMap::from([
        ("user".to_owned(), "\"alice\"".to_owned()),
        ("visits".to_owned(), "0".to_owned()),
        ("cart".to_owned(), "[\"tea\",\"milk\",\"bread\"]".to_owned()),
    ])
}

impl ActixSession {
    async fn new(url: &str) -> Self {
        let store = RedisSessionStore::new(url).await.unwrap();
        let mut keys = Vec::new();
        for _ in 0..slots() {
            let key = store.save(actix_state(), &actix_web_ttl()).await.unwrap();
            keys.push(tokio::sync::Mutex::new(Some(key)));
        }
        Self { store, keys }
    }
}

fn actix_web_ttl() -> tower_sessions::cookie::time::Duration {
    tower_sessions::cookie::time::Duration::hours(1)
}

impl Cycler for ActixSession {
    async fn cycle(&self, slot: usize) {
        let mut guard = self.keys[slot].lock().await;
        let key = guard.take().unwrap();
        let mut state = self.store.load(&key).await.unwrap().unwrap();
        let visits: u64 = state["visits"].parse().unwrap();
        state.insert("visits".to_owned(), (visits + 1).to_string());
        let key = self
            .store
            .update(key, state, &actix_web_ttl())
            .await
            .unwrap();
        *guard = Some(key);
    }
}

/// A measurement in progress: cycles per second when it completes.
type Measurement = std::pin::Pin<Box<dyn Future<Output = f64>>>;

/// One implementation on one backend, ready to be measured at any concurrency.
struct Entry {
    backend: &'static str,
    name: &'static str,
    ours: bool,
    run: Box<dyn Fn(usize, Duration) -> Measurement>,
}

fn entry<C: Cycler>(backend: &'static str, name: &'static str, ours: bool, cycler: C) -> Entry {
    let cycler = Arc::new(cycler);
    Entry {
        backend,
        name,
        ours,
        run: Box::new(move |concurrency, duration| {
            let cycler = Arc::clone(&cycler);
            Box::pin(async move { measure(&cycler, concurrency, duration).await })
        }),
    }
}

fn new_keys(prefix: &str) -> Vec<String> {
    (0..slots())
        .map(|i| format!("bench:{prefix}:{i}:{}", std::process::id()))
        .collect()
}

async fn memory_entries() -> Vec<Entry> {
    vec![
        entry(
            "memory",
            "ours: MemoryStore",
            true,
            Ours::new(Arc::new(MemoryStore::new())).await,
        ),
        entry(
            "memory",
            "tower-sessions MemoryStore",
            false,
            TowerSessions::new(tower_sessions::MemoryStore::default()).await,
        ),
        entry(
            "memory",
            "tower-sessions MokaStore",
            false,
            TowerSessions::new(tower_sessions_moka_store::MokaStore::new(Some(1_000_000))).await,
        ),
    ]
}

async fn memcached_entries(server: &ServerProcess) -> Vec<Entry> {
    // The raw client's pool keeps one connection per request in flight.
    let idle = 64;
    // `COMPARE_MEMCACHED_CONNECTIONS=n` sizes our store's connections, for tuning the default.
    let connections = std::env::var("COMPARE_MEMCACHED_CONNECTIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MemcachedConfig::DEFAULT_CONNECTIONS);
    let config = MemcachedConfig::new([server.address()]).connections(connections);
    let store = MemcachedStore::connect(config).await.unwrap();
    let client = AsyncMetaClient::builder()
        .max_idle(idle)
        .connect_async(server.address())
        .await
        .unwrap();
    let value = encode_record(&our_record()).unwrap();
    let keys = new_keys("memcached");
    for key in &keys {
        client
            .set(key, &value)
            .ttl(Ttl::secs(3600))
            .send()
            .await
            .unwrap();
    }
    vec![
        entry(
            "memcached",
            "ours: MemcachedStore",
            true,
            Ours::new(Arc::new(store)).await,
        ),
        entry(
            "memcached",
            "raw memcache meta client (get, set)",
            false,
            RawMemcached {
                client: client.clone(),
                keys: keys.clone(),
                value: value.clone(),
            },
        ),
        entry(
            "memcached",
            "raw meta client with CAS (get c t, set C)",
            false,
            RawMemcachedCas {
                client,
                keys,
                value,
            },
        ),
    ]
}

/// Three servers: our store keeping one copy of each session, and two copies (`replicas=2`),
/// the cost of surviving a server's death.
async fn replicated_memcached_entries(servers: &[ServerProcess]) -> Vec<Entry> {
    let config = |replicas| {
        MemcachedConfig::new(servers.iter().map(ServerProcess::address)).replicas(replicas)
    };
    let single = MemcachedStore::connect(config(1)).await.unwrap();
    let replicated = MemcachedStore::connect(config(2)).await.unwrap();
    vec![
        entry(
            "memcached-x3",
            "ours: MemcachedStore, replicas=1",
            true,
            Ours::new(Arc::new(single)).await,
        ),
        entry(
            "memcached-x3",
            "ours: MemcachedStore, replicas=2",
            false,
            Ours::new(Arc::new(replicated)).await,
        ),
    ]
}

async fn redis_entries(server: &ServerProcess) -> Vec<Entry> {
    let url = format!("redis://{}", server.address());
    let store = RedisStore::connect(RedisConfig::standalone(url.clone()))
        .await
        .unwrap();
    let connection = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let value = encode_record(&our_record()).unwrap();
    let keys = new_keys("redis");
    let mut setup = connection.clone();
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(&value)
            .arg("EX")
            .arg(3600)
            .query_async(&mut setup)
            .await
            .unwrap();
    }
    let fred = tower_sessions_redis_store::fred::prelude::Client::new(
        FredConfig::from_url(&url).unwrap(),
        None,
        None,
        None,
    );
    fred.init().await.unwrap();
    vec![
        entry(
            "redis",
            "ours: RedisStore",
            true,
            Ours::new(Arc::new(store)).await,
        ),
        entry(
            "redis",
            "raw redis crate (GET, SET EX)",
            false,
            RawRedis {
                connection: connection.clone(),
                keys: keys.clone(),
                value: value.clone(),
            },
        ),
        entry(
            "redis",
            "raw redis crate (GET, compare-and-set script)",
            false,
            RawRedisCas::new(connection, keys, value),
        ),
        entry(
            "redis",
            "tower-sessions-redis-store (fred)",
            false,
            TowerSessions::new(tower_sessions_redis_store::RedisStore::new(fred)).await,
        ),
        entry(
            "redis",
            "actix-session RedisSessionStore",
            false,
            ActixSession::new(&url).await,
        ),
    ]
}

/// The median of a non-empty list.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// In a child process: store `count` sessions in one memory store and print bytes per session.
fn memory_child(which: &str, count: usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = rss_kib();
    let held: Box<dyn std::any::Any> = runtime.block_on(async {
        if which == "ours" {
            // Room to spare: shards fill a little unevenly, and nothing may be evicted here.
            let store = MemoryStore::builder().max_sessions(count * 2).build();
            let record = our_record();
            for _ in 0..count {
                let key =
                    StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap());
                store.create(&key, &record, TTL).await.unwrap();
            }
            assert_eq!(store.len(), count);
            Box::new(store) as Box<dyn std::any::Any>
        } else {
            let store = tower_sessions::MemoryStore::default();
            for _ in 0..count {
                let mut record = peer_record();
                store.create(&mut record).await.unwrap();
            }
            Box::new(store) as Box<dyn std::any::Any>
        }
    });
    let after = rss_kib();
    println!("{}", (after.saturating_sub(before)) * 1024 / count as u64);
    drop(held);
}

/// Bytes per session of `which`, measured in a fresh process.
fn memory_per_session(which: &str, count: usize) -> u64 {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--memory-child", which, &count.to_string()])
        .output()
        .expect("running the memory measurement");
    assert!(output.status.success(), "memory child failed");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

struct Row {
    backend: &'static str,
    name: &'static str,
    ours: bool,
    concurrency: usize,
    median: f64,
    runs: Vec<f64>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn today() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    output.map_or_else(
        |_| "unknown date".into(),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
    )
}

/// The smallest and largest of `values`.
fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), v| {
            (low.min(*v), high.max(*v))
        })
}

fn markdown(rows: &[Row], memory: &[(String, u64)], plan: Plan) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Run {}, {}; {} interleaved round(s) of {:?} windows after {:?} warm-up each; \
         medians, and for each ratio the median of the per-round ratios with their range.\n\n",
        today(),
        machine(),
        plan.rounds,
        plan.measure,
        plan.warm_up
    ));
    out.push_str(
        "| backend | tasks | implementation | cycles/s (min–max) | ours ÷ this (min–max) |\n\
         |---|---:|---|---:|---:|\n",
    );
    for row in rows {
        let ours = rows
            .iter()
            .find(|r| r.ours && r.backend == row.backend && r.concurrency == row.concurrency);
        let ratio = match ours {
            Some(ours) if !row.ours => {
                let ratios: Vec<f64> = ours
                    .runs
                    .iter()
                    .zip(&row.runs)
                    .map(|(ours, this)| ours / this)
                    .collect();
                let (low, high) = range(&ratios);
                format!("{:.2} ({low:.2}–{high:.2})", median(&ratios))
            }
            Some(_) => "1.00".to_owned(),
            None => "–".to_owned(),
        };
        let (low, high) = range(&row.runs);
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} ({low:.0}–{high:.0}) | {ratio} |\n",
            row.backend, row.concurrency, row.name, row.median,
        ));
    }
    if !memory.is_empty() {
        let ours = memory[0].1 as f64;
        out.push_str("\n| memory store, 100,000 sessions | bytes per session | ours ÷ this |\n|---|---:|---:|\n");
        for (name, bytes) in memory {
            out.push_str(&format!(
                "| {name} | {bytes} | {:.2} |\n",
                ours / *bytes as f64
            ));
        }
    }
    out
}

/// A horizontal bar chart, one panel per backend and concurrency, bars scaled within a panel.
fn svg(rows: &[Row]) -> String {
    const WIDTH: f64 = 900.0;
    const LABEL: f64 = 330.0;
    const BAR: f64 = 18.0;
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for row in rows {
        if !groups.contains(&(row.backend, row.concurrency)) {
            groups.push((row.backend, row.concurrency));
        }
    }
    let mut body = String::new();
    let mut y = 40.0;
    for (backend, concurrency) in groups {
        let members: Vec<&Row> = rows
            .iter()
            .filter(|r| r.backend == backend && r.concurrency == concurrency)
            .collect();
        let max = members.iter().map(|r| r.median).fold(0.0, f64::max);
        body.push_str(&format!(
            "<text x=\"10\" y=\"{y}\" font-weight=\"bold\">{backend}, {concurrency} task(s): session cycles per second</text>\n"
        ));
        y += 8.0;
        for row in members {
            let length = (WIDTH - LABEL - 120.0) * row.median / max;
            let colour = if row.ours { "#2b7bb9" } else { "#9a9a9a" };
            body.push_str(&format!(
                "<text x=\"10\" y=\"{}\">{}</text><rect x=\"{LABEL}\" y=\"{y}\" width=\"{length:.1}\" height=\"{BAR}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{:.0}</text>\n",
                y + 14.0,
                row.name,
                LABEL + length + 6.0,
                y + 14.0,
                row.median
            ));
            y += BAR + 6.0;
        }
        y += 26.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\">Session cycles per second (load, change, save); blue: ours, grey: raw client or peer</text>\n{body}</svg>\n"
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(position) = args.iter().position(|a| a == "--memory-child") {
        memory_child(&args[position + 1], args[position + 2].parse().unwrap());
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(compare(Plan::from_args()));
}

async fn compare(plan: Plan) {
    let started = Instant::now();

    // `--only memory|memcached|memcached-x3|redis` measures one backend, for quick iterations.
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let wanted = |backend: &str| only.as_deref().is_none_or(|o| o == backend);
    let memcached = ServerProcess::start_with(ServerKind::Memcached, &["-c", "4096"]);
    let redis_server = ServerProcess::start(ServerKind::Redis);
    let three_memcached: Option<Vec<ServerProcess>> = (0..3)
        .map(|_| ServerProcess::start_with(ServerKind::Memcached, &["-c", "4096"]))
        .collect();
    let mut entries = Vec::new();
    if wanted("memory") {
        entries.extend(memory_entries().await);
    }
    match &memcached {
        Some(server) if wanted("memcached") => entries.extend(memcached_entries(server).await),
        Some(_) => {}
        None => eprintln!("memcached is not installed: its rows are missing"),
    }
    if let Some(servers) = &three_memcached
        && wanted("memcached-x3")
    {
        entries.extend(replicated_memcached_entries(servers).await);
    }
    match &redis_server {
        Some(server) if wanted("redis") => entries.extend(redis_entries(server).await),
        Some(_) => {}
        None => eprintln!("redis-server is not installed: its rows are missing"),
    }

    // `--impl TEXT` keeps the implementations whose name contains TEXT (for profiling one).
    if let Some(filter) = args
        .iter()
        .position(|a| a == "--impl")
        .and_then(|i| args.get(i + 1))
    {
        entries.retain(|entry| entry.name.contains(filter.as_str()));
    }
    let mut runs: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
    for round in 0..plan.rounds {
        let count = entries.len().max(1);
        let order = (0..count).map(|i| (i + round) % count);
        for (index, entry) in order.filter_map(|i| entries.get(i).map(|e| (i, e))) {
            for concurrency in CONCURRENCIES {
                (entry.run)(concurrency, plan.warm_up).await;
                let rate = (entry.run)(concurrency, plan.measure).await;
                eprintln!(
                    "round {}: {:<9} {:>2} task(s)  {:<40} {:>12.0} cycles/s",
                    round + 1,
                    entry.backend,
                    concurrency,
                    entry.name,
                    rate
                );
                runs.entry((index, concurrency)).or_default().push(rate);
            }
        }
    }
    let mut rows = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        for concurrency in CONCURRENCIES {
            let rates = runs[&(index, concurrency)].clone();
            rows.push(Row {
                backend: entry.backend,
                name: entry.name,
                ours: entry.ours,
                concurrency,
                median: median(&rates),
                runs: rates,
            });
        }
    }
    rows.sort_by_key(|r| {
        let backend = ["memory", "memcached", "memcached-x3", "redis"]
            .iter()
            .position(|b| *b == r.backend);
        (backend, r.concurrency, !r.ours)
    });

    let memory = if wanted("memory") {
        vec![
            (
                "ours: MemoryStore".to_owned(),
                memory_per_session("ours", plan.memory_sessions),
            ),
            (
                "tower-sessions MemoryStore".to_owned(),
                memory_per_session("tower", plan.memory_sessions),
            ),
        ]
    } else {
        Vec::new()
    };

    let table = markdown(&rows, &memory, plan);
    println!("{table}");
    for row in &rows {
        let spread: Vec<String> = row.runs.iter().map(|r| format!("{r:.0}")).collect();
        eprintln!(
            "runs {} {} {}: {}",
            row.backend,
            row.concurrency,
            row.name,
            spread.join(", ")
        );
    }
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/compare");
    std::fs::create_dir_all(&directory).unwrap();
    std::fs::write(directory.join("compare.md"), &table).unwrap();
    std::fs::write(directory.join("compare.svg"), svg(&rows)).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "wrote {} and compare.svg in {:.0?}",
        directory.join("compare.md").display(),
        started.elapsed()
    );
}
