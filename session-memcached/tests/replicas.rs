//! Replicas on real servers: three memcached nodes with `replicas = 2`. Killing any one node
//! loses no session, blocks no write and fails no create; a node restarted empty is filled
//! again; a logout done while a node was away stays a logout; a hung node is answered around
//! within the timeout; a node that moves to a new address is found again.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use session_conformance::faults::{SLACK, TTL, tagged as record};
use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::new_key;
use session_core::{SessionStore, StorageKey, Version};
use session_memcached::{MemcachedConfig, MemcachedStore, Resolver};
use tokio::task::JoinSet;

fn config(servers: &[ServerProcess]) -> MemcachedConfig {
    MemcachedConfig::new(servers.iter().map(ServerProcess::address))
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300))
        .retry_interval(Duration::from_millis(200))
        .replicas(2)
}

fn three_servers() -> Option<Vec<ServerProcess>> {
    (0..3)
        .map(|_| ServerProcess::start(ServerKind::Memcached))
        .collect()
}

/// A session the test wrote, with the value and version it last acknowledged.
struct Tracked {
    key: StorageKey,
    version: Version,
    tag: String,
}

/// Runs `work` over `items` on 16 tasks; returns the results in order.
async fn on_tasks<T, R, F, Fut>(items: Vec<T>, work: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R> + Send,
{
    let mut tasks = JoinSet::new();
    let chunk = items.len().div_ceil(16).max(1);
    let mut items = items.into_iter().enumerate().collect::<Vec<_>>();
    while !items.is_empty() {
        let part: Vec<(usize, T)> = items.drain(..chunk.min(items.len())).collect();
        let work = work.clone();
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(part.len());
            for (index, item) in part {
                out.push((index, work(item).await));
            }
            out
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        results.extend(joined.unwrap());
    }
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, r)| r).collect()
}

async fn create_all(store: &MemcachedStore, count: usize, tag: &str) -> (Vec<Tracked>, usize) {
    let results = on_tasks(vec![tag.to_owned(); count], {
        let store = store.clone();
        move |tag: String| {
            let store = store.clone();
            async move {
                let key = new_key();
                let created = store.create(&key, &record(&tag), TTL).await;
                created.map(|version| Tracked { key, version, tag })
            }
        }
    })
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    (results.into_iter().filter_map(Result::ok).collect(), failed)
}

/// Loads every session; returns how many did not load with their last acknowledged value.
async fn count_lost(store: &MemcachedStore, sessions: &[Tracked]) -> usize {
    let items: Vec<(StorageKey, String)> = sessions
        .iter()
        .map(|s| (s.key.clone(), s.tag.clone()))
        .collect();
    let results = on_tasks(items, {
        let store = store.clone();
        move |(key, tag): (StorageKey, String)| {
            let store = store.clone();
            async move {
                match store.load(&key).await {
                    Ok(Some(loaded)) => loaded.record == record(&tag),
                    _ => false,
                }
            }
        }
    })
    .await;
    results.iter().filter(|ok| !**ok).count()
}

/// Saves a new value into every session; returns how many saves failed.
async fn save_all(store: &MemcachedStore, sessions: &mut [Tracked], tag: &str) -> usize {
    let items: Vec<(StorageKey, Version)> = sessions
        .iter()
        .map(|s| (s.key.clone(), s.version))
        .collect();
    let tag = tag.to_owned();
    let results = on_tasks(items, {
        let (store, tag) = (store.clone(), tag.clone());
        move |(key, version): (StorageKey, Version)| {
            let (store, tag) = (store.clone(), tag.clone());
            async move { store.save(&key, &record(&tag), TTL, version).await }
        }
    })
    .await;
    let mut failed = 0;
    for (session, result) in sessions.iter_mut().zip(results) {
        match result {
            Ok(version) => {
                session.version = version;
                session.tag = tag.clone();
            }
            Err(_) => failed += 1,
        }
    }
    failed
}

/// The index of each server, by its configured name.
fn index_by_name(servers: &[ServerProcess]) -> HashMap<String, usize> {
    servers
        .iter()
        .enumerate()
        .map(|(index, server)| (server.address(), index))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_any_one_of_three_nodes_loses_no_session_and_fails_no_write() {
    let Some(mut servers) = three_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let names = index_by_name(&servers);
    let (mut sessions, failed) = create_all(&store, 3_000, "created").await;
    assert_eq!(failed, 0);
    assert_eq!(save_all(&store, &mut sessions, "saved").await, 0);

    for victim in 0..3 {
        servers[victim].kill();
        let lost = count_lost(&store, &sessions).await;
        println!(
            "node {victim} killed: {lost} of {} sessions lost",
            sessions.len()
        );
        assert_eq!(lost, 0, "sessions lost with node {victim} dead");

        let tag = format!("while {victim} was dead");
        let failed_saves = save_all(&store, &mut sessions, &tag).await;
        assert_eq!(failed_saves, 0, "saves failed with node {victim} dead");
        let touched = on_tasks(sessions.iter().map(|s| s.key.clone()).collect(), {
            let store = store.clone();
            move |key: StorageKey| {
                let store = store.clone();
                async move { store.touch(&key, TTL).await }
            }
        })
        .await;
        assert!(
            touched.iter().all(|t| matches!(t, Ok(true))),
            "a touch failed"
        );

        let (created, failed_creates) = create_all(&store, 1_000, &tag).await;
        println!("node {victim} dead: {failed_creates} of 1000 creates failed");
        assert_eq!(failed_creates, 0);
        sessions.extend(created);

        // Log out a few sessions that had a copy on the dead node.
        let mut logged_out = Vec::new();
        let mut index = 0;
        while logged_out.len() < 20 {
            let holders = store.servers_of(&sessions[index].key);
            if holders.iter().any(|name| names[*name] == victim) {
                let session = sessions.remove(index);
                store.delete(&session.key).await.unwrap();
                logged_out.push(session);
            } else {
                index += 1;
            }
        }

        servers[victim].restart();
        // Every write made while it was dead is visible, and nothing was lost.
        let lost = count_lost(&store, &sessions).await;
        println!(
            "node {victim} back empty: {lost} of {} lost",
            sessions.len()
        );
        assert_eq!(lost, 0, "sessions lost after node {victim} came back empty");
        for session in &logged_out {
            assert!(store.load(&session.key).await.unwrap().is_none());
        }
        wait_until_every_copy_is_back(&store, &servers, &sessions, &names).await;
        // Then the other copy's node dies: the logouts stay logouts.
        let mut others: Vec<usize> = logged_out
            .iter()
            .flat_map(|s| store.servers_of(&s.key))
            .map(|name| names[name])
            .filter(|index| *index != victim)
            .collect();
        others.sort_unstable();
        others.dedup();
        for other in others {
            servers[other].kill();
            for session in &logged_out {
                let loaded = store.load(&session.key).await;
                assert!(
                    matches!(loaded, Ok(None) | Err(_)),
                    "a logout done while node {victim} was dead came back: {loaded:?}"
                );
            }
            assert_eq!(count_lost(&store, &sessions).await, 0);
            servers[other].restart();
            // Let the restarted node be filled again (reads repair it).
            wait_until_every_copy_is_back(&store, &servers, &sessions, &names).await;
        }
    }
}

/// Loads every session until both of its replicas hold it (the read repair of a restarted
/// node runs in the background), at most for ten seconds.
async fn wait_until_every_copy_is_back(
    store: &MemcachedStore,
    servers: &[ServerProcess],
    sessions: &[Tracked],
    names: &HashMap<String, usize>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: Vec<std::collections::HashSet<String>> = servers
            .iter()
            .map(|s| s.memcached_keys().into_iter().collect())
            .collect();
        let missing = sessions
            .iter()
            .filter(|s| {
                store
                    .servers_of(&s.key)
                    .iter()
                    .any(|name| !held[names[*name]].contains(s.key.as_str()))
            })
            .count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} sessions still lack a copy"
        );
        count_lost(store, sessions).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_is_answered_around_within_the_timeout() {
    let Some(servers) = three_servers() else {
        return;
    };
    let config = config(&servers);
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();
    let (mut sessions, _) = create_all(&store, 300, "before").await;

    servers[1].pause();
    let mut slowest = Duration::ZERO;
    for session in &mut sessions {
        let started = Instant::now();
        let loaded = store.load(&session.key).await.unwrap().expect("loads");
        assert_eq!(loaded.record, record(&session.tag));
        session.version = store
            .save(&session.key, &record("during"), TTL, loaded.version)
            .await
            .unwrap();
        session.tag = "during".into();
        slowest = slowest.max(started.elapsed());
    }
    println!("node paused: slowest load and save {slowest:?} (deadline {deadline:?})");
    assert!(slowest <= deadline + SLACK, "{slowest:?}");

    // A logout while the node hangs, then the node resumes with its stale copies.
    let ended = sessions.pop().unwrap();
    store.delete(&ended.key).await.unwrap();
    servers[1].resume();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The newest copy wins over the stale one that slept through the writes.
    assert_eq!(count_lost(&store, &sessions).await, 0);
    assert!(store.load(&ended.key).await.unwrap().is_none());
}

/// A resolver whose answers the test changes: stands in for DNS.
#[derive(Default)]
struct TableResolver(Mutex<HashMap<String, SocketAddr>>);

#[async_trait]
impl Resolver for TableResolver {
    async fn resolve(&self, server: &str) -> io::Result<Vec<SocketAddr>> {
        let table = self.0.lock().unwrap();
        let address = table.get(server).copied();
        address
            .map(|a| vec![a])
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such name"))
    }
}

#[tokio::test]
async fn a_node_that_comes_back_on_a_new_address_is_reached() {
    let Some(first) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let mut first = first;
    let resolver = Arc::new(TableResolver::default());
    let address: SocketAddr = first.address().parse().unwrap();
    resolver
        .0
        .lock()
        .unwrap()
        .insert("cache-a.internal:11211".into(), address);
    let config = MemcachedConfig::new(["cache-a.internal:11211"])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300))
        .retry_interval(Duration::from_millis(100));
    let store = MemcachedStore::connect_with_resolver(config, resolver.clone())
        .await
        .unwrap();
    let key = new_key();
    store.create(&key, &record("a"), TTL).await.unwrap();

    first.kill();
    assert!(store.load(&key).await.is_err());
    let Some(second) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    resolver.0.lock().unwrap().insert(
        "cache-a.internal:11211".into(),
        second.address().parse().unwrap(),
    );
    let started = Instant::now();
    let key = new_key();
    loop {
        match store.create(&key, &record("b"), TTL).await {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the new address was never used: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!("reached the new address after {:?}", started.elapsed());
    assert_eq!(second.memcached_keys(), [key.as_str()]);
}

fn two_servers() -> Option<Vec<ServerProcess>> {
    (0..2)
        .map(|_| ServerProcess::start(ServerKind::Memcached))
        .collect()
}

/// The server a store names, as a test process.
fn server_named<'a>(servers: &'a [ServerProcess], name: &str) -> &'a ServerProcess {
    servers.iter().find(|s| s.address() == name).unwrap()
}

/// Review finding: two processes that disagree about whether a key's first server is back
/// must not both acknowledge a save against one version. Process B still counts the server
/// down (it saw it hang, and probes rarely), process A never saw it fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_disagree_about_a_server_do_not_both_save_one_version() {
    let Some(servers) = two_servers() else {
        return;
    };
    let a = MemcachedStore::connect(config(&servers)).await.unwrap();
    let b = MemcachedStore::connect(config(&servers).retry_interval(Duration::from_secs(30)))
        .await
        .unwrap();
    let key = new_key();
    a.create(&key, &record("start"), TTL).await.unwrap();
    let version = a.load(&key).await.unwrap().unwrap().version;
    assert_eq!(b.load(&key).await.unwrap().unwrap().version, version);

    let first = server_named(&servers, a.servers_of(&key)[0]);
    first.pause();
    assert!(
        b.touch(&key, TTL).await.is_ok(),
        "answered by the second server"
    );
    first.resume();

    let saved_by_b = b.save(&key, &record("b"), TTL, version).await;
    let saved_by_a = a.save(&key, &record("a"), TTL, version).await;
    assert!(saved_by_b.is_ok(), "{saved_by_b:?}");
    assert!(
        matches!(saved_by_a, Err(session_core::StoreError::Conflict)),
        "both saves of one version were acknowledged: {saved_by_a:?}"
    );
    let seen_by_a = a.load(&key).await.unwrap().unwrap();
    let seen_by_b = b.load(&key).await.unwrap().unwrap();
    assert_eq!(seen_by_a.record, record("b"));
    assert_eq!(seen_by_b.record, record("b"));
    assert_eq!(seen_by_a.version, seen_by_b.version);
}

/// Review finding: an id cycle done while one replica was down leaves the old session on it;
/// that copy must not come back once the marker's own TTL has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_an_id_cycle_does_not_bring_the_old_id_back() {
    let Some(servers) = two_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let key = new_key();
    let version = store
        .create(&key, &record("before login"), Duration::from_secs(3600))
        .await
        .unwrap();
    let second = server_named(&servers, store.servers_of(&key)[1]);
    second.pause();
    assert!(store.load_entry(&key).await.unwrap().is_some());
    let to = new_key();
    store
        .mark_moved(&key, version, &to, Duration::from_secs(2))
        .await
        .unwrap();
    second.resume();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let entry = store.load_entry(&key).await.unwrap();
    assert!(entry.is_none(), "the old id came back: {entry:?}");
}

/// Review finding: a burst that reaches this process's own in-flight cap says nothing
/// about the server, and must not mark it down (its deletes would then skip it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_in_flight_cap_does_not_count_as_a_dead_server() {
    let Some(servers) = three_servers() else {
        return;
    };
    // One request in flight per server, a wait for a slot of at most 2 ms, and a large
    // session that keeps the slot busy for longer.
    let config = config(&servers)
        .max_in_flight(Some(1))
        .connect_timeout(Duration::from_millis(2));
    let store = MemcachedStore::connect(config).await.unwrap();
    let busy = new_key();
    let mut large = record("x");
    large.set_value("filler", vec![7u8; 512 * 1024]);
    store.create(&busy, &large, TTL).await.unwrap();
    // A session sharing exactly one server with the busy one.
    let busy_servers = store.servers_of(&busy);
    let (key, shared) = loop {
        let key = new_key();
        let servers_of = store.servers_of(&key);
        let shared: Vec<&str> = servers_of
            .iter()
            .copied()
            .filter(|s| busy_servers.contains(s))
            .collect();
        if shared.len() == 1 {
            break (key, shared[0].to_owned());
        }
    };
    store.create(&key, &record("logged in"), TTL).await.unwrap();

    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let (store, busy) = (store.clone(), busy.clone());
        tasks.spawn(async move { store.load(&busy).await.is_err() });
    }
    let mut exhausted = 0;
    while let Some(failed) = tasks.join_next().await {
        exhausted += usize::from(failed.unwrap());
    }
    println!("{exhausted} of 50 loads found the in-flight cap reached");
    assert!(
        exhausted > 0,
        "the burst did not reach the cap; the test proves nothing"
    );
    store.delete(&key).await.unwrap();
    let reply = server_named(&servers, &shared)
        .command_line(&format!("mg {} v\r\n", key.as_str()))
        .unwrap();
    assert!(
        reply.starts_with("VA 6"),
        "no tombstone on {shared}: {reply}"
    );

    // During a burst, a logout either fails or ends the session on every replica: a replica
    // this process has no free slot for is not skipped as if it were down.
    let other = loop {
        let key = new_key();
        if store.servers_of(&key).contains(&shared.as_str()) {
            break key;
        }
    };
    store
        .create(&other, &record("logged in"), TTL)
        .await
        .unwrap();
    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let (store, busy) = (store.clone(), busy.clone());
        tasks.spawn(async move { store.load(&busy).await.is_err() });
    }
    let deleted = store.delete(&other).await;
    while tasks.join_next().await.is_some() {}
    if deleted.is_ok() {
        for name in store.servers_of(&other) {
            let reply = server_named(&servers, name)
                .command_line(&format!("mg {} v\r\n", other.as_str()))
                .unwrap();
            assert!(
                reply.starts_with("VA 6"),
                "a logout during a burst skipped {name}: {reply}"
            );
        }
    }
}

/// Review finding: one copy that cannot be read (written by something else) must not block
/// loading the good copy, or logging out.
#[tokio::test]
async fn an_unreadable_copy_neither_hides_the_good_one_nor_blocks_a_logout() {
    let Some(servers) = two_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let key = new_key();
    let version = store.create(&key, &record("good"), TTL).await.unwrap();
    let first = server_named(&servers, store.servers_of(&key)[0]);
    let reply = first
        .command_line(&format!("ms {} 3 F2 T60\r\nabc\r\n", key.as_str()))
        .unwrap();
    assert!(reply.starts_with("HD"), "{reply}");
    let loaded = store.load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.record, record("good"));
    assert_eq!(loaded.version, version);
    // The load repairs the unreadable copy in the background.
    let started = Instant::now();
    while first
        .command_line(&format!("mg {} v\r\n", key.as_str()))
        .unwrap()
        .starts_with("VA 3")
    {
        assert!(started.elapsed() < Duration::from_secs(5), "never repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.delete_if_version(&key, version).await.unwrap();
    assert!(store.load(&key).await.unwrap().is_none());
}

/// Review finding: a save whose deciding write was sent but not answered may have been
/// applied; no other replica may decide it as well. It reports the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_sent_to_a_hung_first_server_is_not_decided_again_elsewhere() {
    let Some(servers) = two_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let key = new_key();
    store.create(&key, &record("start"), TTL).await.unwrap();
    let version = store.load(&key).await.unwrap().unwrap().version;
    let first = server_named(&servers, store.servers_of(&key)[0]);
    let second = server_named(&servers, store.servers_of(&key)[1]);
    let on_second = || {
        second
            .command_line(&format!("mg {} v c\r\n", key.as_str()))
            .unwrap()
    };
    let before = on_second();
    assert!(before.starts_with("VA"), "{before}");
    first.pause();
    let saved = store.save(&key, &record("during"), TTL, version).await;
    assert!(
        matches!(saved, Err(session_core::StoreError::Timeout { .. })),
        "{saved:?}"
    );
    // Same length and CAS: the second server's copy was not written.
    assert_eq!(
        on_second(),
        before,
        "the second server decided the save too"
    );
    first.resume();
}

/// Review finding: a server marked down by a runtime that then shut down (taking its probe
/// task along) must still be probed, and come back, for the store's next runtime.
#[test]
fn a_server_marked_down_under_a_runtime_that_ended_comes_back() {
    let Some(servers) = two_servers() else {
        return;
    };
    let first_runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, key) = first_runtime.block_on(async {
        let store = MemcachedStore::connect(config(&servers)).await.unwrap();
        let key = new_key();
        store.create(&key, &record("x"), TTL).await.unwrap();
        (store, key)
    });
    let first = server_named(&servers, store.servers_of(&key)[0]);
    first.pause();
    first_runtime.block_on(async { store.load(&key).await.unwrap() });
    drop(first_runtime);
    first.resume();

    let second_runtime = tokio::runtime::Runtime::new().unwrap();
    second_runtime.block_on(async {
        let started = Instant::now();
        loop {
            let fresh = new_key();
            store.create(&fresh, &record("y"), TTL).await.unwrap();
            // With two servers and two replicas every key has a copy on each.
            if first.memcached_keys().iter().any(|k| k == fresh.as_str()) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the server stayed down for this store"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// How the counting test breaks servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Kill a server and restart it empty, one after another.
    KillAndRestart,
    /// Hang a server (SIGSTOP) and resume it, one after another.
    HangAndResume,
}

/// Two processes (two stores, each with its own view of server health) increment counters in
/// a few sessions as fast as they can while servers fail under them. Returns, per session,
/// the final count and the acknowledged and unknown (timed out) increments, after checking
/// that both processes read the same count and that it holds no increment nobody made.
async fn count_through(fault: Fault) -> Vec<(u64, u64, u64)> {
    let Some(mut servers) = three_servers() else {
        return Vec::new();
    };
    let first = MemcachedStore::connect(config(&servers)).await.unwrap();
    let second = MemcachedStore::connect(config(&servers)).await.unwrap();
    let counter = |n: u64| record(&n.to_string());
    let count_of = |r: &session_core::Record| -> u64 {
        String::from_utf8(r.value("tag").unwrap().to_vec())
            .unwrap()
            .parse()
            .unwrap()
    };
    let keys: Vec<StorageKey> = (0..4).map(|_| new_key()).collect();
    for key in &keys {
        first.create(key, &counter(0), TTL).await.unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for task in 0..8usize {
        let store = if task % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let (keys, stop) = (keys.clone(), Arc::clone(&stop));
        tasks.spawn(async move {
            let (mut acked, mut unknown) = (vec![0u64; keys.len()], vec![0u64; keys.len()]);
            let mut round = task;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                let index = round % keys.len();
                let Ok(Some(loaded)) = store.load(&keys[index]).await else {
                    continue;
                };
                let next = count_of(&loaded.record) + 1;
                match store
                    .save(&keys[index], &counter(next), TTL, loaded.version)
                    .await
                {
                    Ok(_) => acked[index] += 1,
                    Err(session_core::StoreError::Conflict) => {}
                    Err(_) => unknown[index] += 1,
                }
            }
            (acked, unknown)
        });
    }
    for round in 0..6 {
        let victim = round % servers.len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        match fault {
            Fault::KillAndRestart => servers[victim].kill(),
            Fault::HangAndResume => servers[victim].pause(),
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        match fault {
            Fault::KillAndRestart => servers[victim].restart(),
            Fault::HangAndResume => servers[victim].resume(),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut unknown) = (vec![0u64; keys.len()], vec![0u64; keys.len()]);
    while let Some(joined) = tasks.join_next().await {
        let (a, u) = joined.unwrap();
        for i in 0..keys.len() {
            acked[i] += a[i];
            unknown[i] += u[i];
        }
    }
    // Let both stores count every server back before reading.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut counts = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let by_first = count_of(&first.load(key).await.unwrap().unwrap().record);
        let by_second = count_of(&second.load(key).await.unwrap().unwrap().record);
        println!(
            "{fault:?}, session {i}: {by_first} counted, {} acknowledged, {} unknown",
            acked[i], unknown[i]
        );
        assert_eq!(by_first, by_second, "the processes read different counts");
        assert!(
            by_first <= acked[i] + unknown[i],
            "session {i}: {by_first} counted, more than {} acknowledged and {} unknown",
            acked[i],
            unknown[i]
        );
        counts.push((by_first, acked[i], unknown[i]));
    }
    counts
}

/// Servers killed and restarted empty in turn, then hung and resumed in turn, under two
/// writing processes. A save racing a server's failure or return, from processes that do not
/// yet agree about that server, can be lost even though it was acknowledged: the crate docs
/// state this limit, and these tests measure it. They hold the store to what it promises
/// there: both processes read the same count, no increment appears that nobody made, and at
/// most one acknowledged increment in a hundred is lost (the runs here lose well under one in
/// a thousand while a server fails every 0.9 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_counting_through_killed_servers_agree_and_lose_almost_nothing() {
    check_losses(Fault::KillAndRestart).await;
}

/// See [`two_processes_counting_through_killed_servers_agree_and_lose_almost_nothing`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_counting_through_hung_servers_agree_and_lose_almost_nothing() {
    check_losses(Fault::HangAndResume).await;
}

async fn check_losses(fault: Fault) {
    for (i, (counted, acked, _)) in count_through(fault).await.into_iter().enumerate() {
        let lost = acked.saturating_sub(counted);
        println!("{fault:?}, session {i}: {lost} of {acked} acknowledged increments lost");
        assert!(
            lost * 100 <= acked,
            "session {i}: {counted} counted of {acked} acknowledged"
        );
    }
}

/// Racing creates of one key, many rounds, with one task per racer and loads racing them:
/// exactly one create is acknowledged per key, and from the moment it is, every load returns
/// its record (a racer that lost must not leave a copy that reads win). A CI run once saw two
/// creates of one key both acknowledged: a loser took its copy back and a later racer added
/// into the hole, while the first winner's read had already counted it as the winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_of_one_key_have_one_winner_every_time() {
    let Some(servers) = three_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    for round in 0..150 {
        let key = new_key();
        let mut tasks = JoinSet::new();
        for racer in 0..24u8 {
            let (store, key) = (store.clone(), key.clone());
            tasks.spawn(async move {
                let tag = format!("racer {racer}");
                let created = store.create(&key, &record(&tag), TTL).await;
                (tag, created)
            });
        }
        let mut winners = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined.unwrap() {
                (tag, Ok(version)) => winners.push((tag, version)),
                (_, Err(session_core::StoreError::AlreadyExists)) => {}
                (_, Err(other)) => panic!("round {round}: unexpected error {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let (tag, version) = &winners[0];
        for _ in 0..3 {
            let loaded = store.load(&key).await.unwrap().expect("the winner loads");
            assert_eq!(loaded.record, record(tag), "round {round}");
            assert_eq!(loaded.version, *version, "round {round}");
        }
    }
}

/// Deletes `key`'s copy on its first replica behind the store's back (as an eviction or a
/// restart would lose it).
fn lose_first_copy(store: &MemcachedStore, servers: &[ServerProcess], key: &StorageKey) {
    let first = server_named(servers, store.servers_of(key)[0]);
    let deleted = first.command_line(&format!("md {}\r\n", key.as_str()));
    assert_eq!(deleted.unwrap(), "HD\r\n");
}

/// Review finding: a create decides on a key's first replica, but the key may still exist on
/// another one (the first lost its copy: evicted, or restarted empty). A live session there
/// is not replaced, and the create fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_does_not_replace_a_session_its_first_replica_lost() {
    let Some(servers) = two_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let key = new_key();
    store.create(&key, &record("first"), TTL).await.unwrap();
    lose_first_copy(&store, &servers, &key);
    let again = store.create(&key, &record("second"), TTL).await;
    assert!(
        matches!(again, Err(session_core::StoreError::AlreadyExists)),
        "{again:?}"
    );
    let loaded = store.load(&key).await.unwrap().expect("the first session");
    assert_eq!(loaded.record, record("first"));
}

/// Review finding: the same with a moved marker on the second replica: the create fails, and
/// the marker is what a read finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_does_not_hide_a_marker_its_first_replica_lost() {
    let Some(servers) = two_servers() else {
        return;
    };
    let store = MemcachedStore::connect(config(&servers)).await.unwrap();
    let key = new_key();
    let version = store.create(&key, &record("first"), TTL).await.unwrap();
    let to = new_key();
    store.mark_moved(&key, version, &to, TTL).await.unwrap();
    lose_first_copy(&store, &servers, &key);
    let again = store.create(&key, &record("second"), TTL).await;
    assert!(
        matches!(again, Err(session_core::StoreError::AlreadyExists)),
        "{again:?}"
    );
    let entry = store.load_entry(&key).await.unwrap().expect("the marker");
    assert!(
        matches!(entry, session_core::StoredEntry::Moved { .. }),
        "{entry:?}"
    );
}

/// Review finding: two processes that disagree about whether a key's first server is up do
/// not both acknowledge a create of one key. B counts the first server down and creates on
/// the second; A then creates on the first and, carrying its session to the second, finds
/// B's: A's create fails and both read B's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_disagree_about_a_server_do_not_both_create_one_key() {
    let Some(servers) = two_servers() else {
        return;
    };
    let a = MemcachedStore::connect(config(&servers)).await.unwrap();
    let b = MemcachedStore::connect(config(&servers).retry_interval(Duration::from_secs(30)))
        .await
        .unwrap();
    let key = new_key();
    let first = server_named(&servers, a.servers_of(&key)[0]);
    first.pause();
    assert!(
        b.load(&key).await.unwrap().is_none(),
        "answered by the second server"
    );
    first.resume();
    b.create(&key, &record("b"), TTL).await.unwrap();
    let by_a = a.create(&key, &record("a"), TTL).await;
    assert!(
        matches!(by_a, Err(session_core::StoreError::AlreadyExists)),
        "both creates of one key were acknowledged: {by_a:?}"
    );
    assert_eq!(a.load(&key).await.unwrap().unwrap().record, record("b"));
    assert_eq!(b.load(&key).await.unwrap().unwrap().record, record("b"));
}

/// Review finding: a server marked down from a runtime that then sits idle (a sync
/// application's runtime between `block_on` calls) had its probe stuck on that runtime, and a
/// replicated store used from another runtime left the server out for good. The probe is
/// started again on a runtime that runs.
#[test]
fn a_probe_stuck_on_an_idle_runtime_is_started_again() {
    let Some(servers) = two_servers() else {
        return;
    };
    let current_thread = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let runtime_a = current_thread();
    let key = new_key();
    let (store, first) = runtime_a.block_on(async {
        let store = MemcachedStore::connect(config(&servers)).await.unwrap();
        store.create(&key, &record("a"), TTL).await.unwrap();
        let first = server_named(&servers, store.servers_of(&key)[0]);
        first.pause();
        // Answered by the second server; the first is marked down, its probe spawned here.
        assert!(store.load(&key).await.unwrap().is_some());
        first.resume();
        (store, first)
    });
    // Runtime A stays alive, running nothing.
    let runtime_b = current_thread();
    runtime_b.block_on(async {
        let started = Instant::now();
        let mut reached = false;
        while started.elapsed() < Duration::from_secs(10) && !reached {
            // Every request asks whether the first server is down, which is where a stuck
            // probe is noticed; a create shows whether the first server is asked again.
            let probe_key = new_key();
            let _ = store.create(&probe_key, &record("b"), TTL).await;
            let reply = first
                .command_line(&format!("mg {} v\r\n", probe_key.as_str()))
                .unwrap();
            reached = reply.starts_with("VA");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(reached, "the first server was left out for good");
    });
    drop(runtime_a);
}
