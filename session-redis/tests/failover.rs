//! High availability against real servers on loopback: a Sentinel-watched master with one
//! replica and three sentinels, and a three-master cluster with one replica per master. Both
//! pass the conformance suite (with the wait-for-replicas option on), and both keep every
//! acknowledged write and logout through the death of a master; the time until the store
//! serves again is measured and printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use session_conformance::faults::{TTL, tagged};
use session_conformance::harness::{RedisCluster, RedisSentinel};
use session_conformance::new_key;
use session_core::{SessionStore, StorageKey, StoreError, Version};
use session_redis::{NotReplicated, RedisConfig, RedisStore};

/// How long the master's WAIT waits for the replica in these tests.
const WAIT: Duration = Duration::from_millis(1000);

/// The longest a failover may take here before the test fails: the sentinels declare the
/// master down after one second (the cluster after its one-second node timeout), agree, and
/// promote; the store then finds the new master.
const FAILOVER_BOUND: Duration = Duration::from_secs(20);

fn sentinel_config(topology: &RedisSentinel) -> RedisConfig {
    RedisConfig::sentinel(topology.sentinel_urls(), RedisSentinel::MASTER_NAME)
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(500))
}

fn cluster_config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::cluster(cluster.seed_urls())
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(500))
        .wait_for_replicas(1, WAIT)
}

/// The topologies here (five or six Redis processes each) run one at a time: two at once on
/// two busy cores made saves slow enough for the suite's 32 committers on one session to
/// exhaust the manager's replays now and then (seen in fresh-clone CI runs).
static ONE_TOPOLOGY_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

mod sentinel {
    use super::*;

    session_conformance::conformance_suite!(async {
        let turn = ONE_TOPOLOGY_AT_A_TIME.lock().await;
        let topology = RedisSentinel::start()?;
        // Default timeouts, as in the other suites, and no wait option: 32 requests committing
        // to one session at once, each save also waiting for the replica, exhausted the
        // manager's 64 replays now and then on a loaded two-core machine. The option is
        // tested by the failover tests below.
        let config = RedisConfig::sentinel(topology.sentinel_urls(), RedisSentinel::MASTER_NAME);
        let store = RedisStore::connect(config).await.unwrap();
        Some((store, (topology, turn)))
    });
}

/// With the default timeouts (like the three-master suite), and without the wait option: the
/// suite's 32 requests committing to one session at once, on two busy cores (two six-node
/// clusters at once, before the topologies took turns), then took long enough per save to exhaust the manager's 64 conflict
/// replays now and then (`manager_concurrent_commits_lose_no_update`), with or without the
/// option. The option's routing in a cluster is checked by
/// `cluster_failover_loses_no_acknowledged_session`, the option itself by the Sentinel suite.
mod cluster_with_replicas {
    use super::*;

    session_conformance::conformance_suite!(async {
        let turn = ONE_TOPOLOGY_AT_A_TIME.lock().await;
        // No failover is wanted here: a node timeout a loaded machine does not reach.
        let cluster = RedisCluster::start_with_replicas(Duration::from_secs(5))?;
        let store = RedisStore::connect(RedisConfig::cluster(cluster.seed_urls()))
            .await
            .unwrap();
        Some((store, (cluster, turn)))
    });
}

/// What a writer learned about one session: what the store acknowledged.
#[derive(Debug)]
struct Written {
    key: StorageKey,
    /// The last acknowledged value and its version; `None` once its deletion was acknowledged.
    acknowledged: Option<(String, Version)>,
    /// A later write whose outcome is unknown (it failed): its value, or `None` for a delete.
    /// The session may hold either the acknowledged state or this one.
    unknown: Option<Option<String>>,
}

/// Writes sessions until `stop`: create, save, and for every fifth session a delete (a
/// logout) — each acknowledged or not. A session whose write failed is left alone afterwards.
async fn write_sessions(
    store: RedisStore,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Vec<Written> {
    let mut written = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = new_key();
        let created = format!("{n}-created");
        let mut entry = Written {
            key: key.clone(),
            acknowledged: None,
            unknown: None,
        };
        match store.create(&key, &tagged(&created), TTL).await {
            Ok(version) => entry.acknowledged = Some((created, version)),
            Err(_) => {
                entry.unknown = Some(Some(created));
                written.push(entry);
                // Failing writes are fast: do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let saved = format!("{n}-saved");
        let version = entry
            .acknowledged
            .as_ref()
            .map(|(_, v)| *v)
            .expect("created");
        match store.save(&key, &tagged(&saved), TTL, version).await {
            Ok(version) => entry.acknowledged = Some((saved, version)),
            Err(_) => entry.unknown = Some(Some(saved)),
        }
        if n.is_multiple_of(5) && entry.unknown.is_none() {
            match store.delete(&key).await {
                Ok(()) => entry.acknowledged = None,
                Err(_) => entry.unknown = Some(None),
            }
        }
        written.push(entry);
        count.fetch_add(1, Ordering::Relaxed);
    }
    written
}

/// Checks every written session: an acknowledged value loads with its version, an
/// acknowledged delete stays deleted; a session with a failed later write holds either state.
/// Returns (acknowledged sessions checked, acknowledged deletes checked).
async fn check_written(store: &RedisStore, written: &[Written]) -> (usize, usize) {
    let mut sessions = 0;
    let mut logouts = 0;
    for entry in written {
        let loaded = store
            .load(&entry.key)
            .await
            .expect("the store serves loads");
        let found = loaded.as_ref().map(|l| {
            let tag = l.record.value("tag").expect("a tag");
            (String::from_utf8(tag.to_vec()).expect("UTF-8"), l.version)
        });
        let acknowledged_state = match (&entry.acknowledged, &found) {
            (Some((value, version)), Some((found_value, found_version))) => {
                value == found_value && version == found_version
            }
            (None, None) => true,
            _ => false,
        };
        let unknown_state = match (&entry.unknown, &found) {
            (Some(Some(value)), Some((found_value, _))) => value == found_value,
            (Some(None), None) => true,
            _ => false,
        };
        if entry.unknown.is_none() {
            assert!(
                acknowledged_state,
                "an acknowledged write was lost: expected {:?}, found {found:?}",
                entry.acknowledged
            );
            if entry.acknowledged.is_some() {
                sessions += 1;
            } else {
                logouts += 1;
            }
        } else {
            assert!(
                acknowledged_state || unknown_state || entry.acknowledged.is_none(),
                "a session holds neither its acknowledged nor its attempted state: \
                 acknowledged {:?}, attempted {:?}, found {found:?}",
                entry.acknowledged,
                entry.unknown
            );
        }
    }
    (sessions, logouts)
}

/// Polls `probe` until it succeeds; panics past [`FAILOVER_BOUND`] after `since`.
async fn until_ok<T>(
    since: Instant,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, StoreError>,
) -> T {
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(error) => {
                assert!(
                    since.elapsed() < FAILOVER_BOUND,
                    "{what}: still failing after {:?}: {error}",
                    since.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_loses_no_acknowledged_write_and_the_store_follows_the_master() {
    let _turn = ONE_TOPOLOGY_AT_A_TIME.lock().await;
    let Some(mut topology) = RedisSentinel::start() else {
        return;
    };
    topology.wait_for_quorum();
    let url = format!(
        "{}?wait_replicas=1&wait_timeout_ms={}&timeout_ms=500&connect_timeout_ms=300",
        topology.url(),
        WAIT.as_millis()
    );
    let waiting = RedisStore::from_url(&url).await.unwrap();
    let plain = RedisStore::connect(sentinel_config(&topology))
        .await
        .unwrap();

    // Sessions are written without pause while the master is killed under them.
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_sessions(
        waiting.clone(),
        Arc::clone(&count),
        Arc::clone(&stop),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::Relaxed) < 300 {
        assert!(Instant::now() < deadline, "the writer is stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = topology.kill_master();
    let killed_at = Instant::now();

    // Loads come back once the replica is promoted and the store has asked the sentinels.
    let first = until_ok(killed_at, "a load through the waiting store", async || {
        waiting.load(&new_key()).await
    })
    .await;
    assert!(first.is_none());
    let loads_back = killed_at.elapsed();
    // Writes too, through a store without the wait option (the promoted master has no
    // replica left to acknowledge anything).
    let key = new_key();
    until_ok(killed_at, "a create through the plain store", async || {
        plain.create(&key, &tagged("after"), TTL).await
    })
    .await;
    let writes_back = killed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();

    let promoted = topology
        .master_address_from_sentinels()
        .expect("the sentinels name a master");
    assert_ne!(
        promoted, killed,
        "the sentinels still name the killed master"
    );
    let (sessions, logouts) = check_written(&waiting, &written).await;
    let unknown = written.iter().filter(|w| w.unknown.is_some()).count();
    eprintln!(
        "sentinel failover: loads served again {loads_back:?} and writes {writes_back:?} after \
         the master was killed; {sessions} acknowledged sessions and {logouts} acknowledged \
         logouts all intact, {unknown} writes failed during the failover (outcome unknown)"
    );
    assert!(sessions >= 200 && logouts >= 50, "{sessions} {logouts}");

    // With no replica left, a write through the waiting store is applied but reported as not
    // replicated, as a typed error within the deadline.
    let started = Instant::now();
    let error = waiting
        .create(&new_key(), &tagged("alone"), TTL)
        .await
        .expect_err("no replica can acknowledge it");
    assert!(started.elapsed() < WAIT + Duration::from_secs(2));
    let StoreError::Backend { operation, source } = &error else {
        panic!("expected a backend error, got {error:?}");
    };
    assert_eq!(*operation, "create");
    let shortfall = source
        .downcast_ref::<NotReplicated>()
        .unwrap_or_else(|| panic!("expected NotReplicated, got {source}"));
    assert_eq!((shortfall.acknowledged, shortfall.required), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_loses_no_acknowledged_session() {
    let _turn = ONE_TOPOLOGY_AT_A_TIME.lock().await;
    let Some(mut cluster) = RedisCluster::start_with_replicas(Duration::from_secs(1)) else {
        return;
    };
    let store = RedisStore::connect(cluster_config(&cluster)).await.unwrap();
    let mut written = Vec::new();
    for n in 0..1000u32 {
        let key = new_key();
        let version = store
            .create(&key, &tagged(&format!("{n}-created")), TTL)
            .await
            .unwrap();
        let saved = format!("{n}-saved");
        let version = store
            .save(&key, &tagged(&saved), TTL, version)
            .await
            .unwrap();
        let acknowledged = if n.is_multiple_of(10) {
            store.delete(&key).await.unwrap();
            None
        } else {
            Some((saved, version))
        };
        written.push(Written {
            key,
            acknowledged,
            unknown: None,
        });
    }
    let masters = cluster.master_indices();
    assert_eq!(masters.len(), 3, "three masters");
    let victim = masters[0];
    let on_victim: Vec<&Written> = written
        .iter()
        .filter(|w| {
            w.acknowledged.is_some() && cluster.node_holding(w.key.as_str()) == Some(victim)
        })
        .collect();
    assert!(
        on_victim.len() > 150,
        "{} sessions on the victim",
        on_victim.len()
    );

    cluster.nodes()[victim].kill();
    let killed_at = Instant::now();
    // Every session on the killed master's slots loads again once its replica took over.
    for entry in &on_victim {
        until_ok(
            killed_at,
            "a load from the killed master's slots",
            async || store.load(&entry.key).await,
        )
        .await;
    }
    let loads_back = killed_at.elapsed();
    let (sessions, logouts) = check_written(&store, &written).await;
    eprintln!(
        "cluster failover: the {} sessions on the killed master's slots loaded again {loads_back:?} \
         after it was killed; {sessions} acknowledged sessions and {logouts} acknowledged \
         logouts all intact",
        on_victim.len()
    );
    assert_eq!((sessions, logouts), (900, 100));
    let masters_after = cluster.master_indices();
    assert_eq!(masters_after.len(), 3, "a replica took over");
    let promoted = masters_after
        .iter()
        .copied()
        .find(|m| !masters.contains(m))
        .expect("the promoted replica is a master now");

    // WAIT goes to the master that owns the key: the promoted replica has no replica of its
    // own, so writes to its slots are applied but not replicated, while the two other
    // masters' writes are.
    // Once every node agrees the cluster is whole again. (A short wait, so that the writes
    // that fall short cost little time.)
    cluster.wait_until_ok();
    let config = cluster_config(&cluster).wait_for_replicas(1, Duration::from_millis(100));
    let short_wait = RedisStore::connect(config).await.unwrap();
    let mut outcomes = [0usize; 2];
    for _ in 0..60 {
        let key = new_key();
        let outcome = short_wait.create(&key, &tagged("after"), TTL).await;
        let node = cluster
            .node_holding(key.as_str())
            .unwrap_or_else(|| panic!("the write is applied either way: {outcome:?}"));
        if node == promoted {
            let error = outcome.expect_err("no replica acknowledges the promoted master's writes");
            let StoreError::Backend { source, .. } = &error else {
                panic!("expected a backend error, got {error:?}");
            };
            assert!(source.downcast_ref::<NotReplicated>().is_some(), "{source}");
            outcomes[0] += 1;
        } else {
            outcome.expect("the other masters' replicas acknowledge");
            outcomes[1] += 1;
        }
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
