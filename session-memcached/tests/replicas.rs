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
