//! Redis faults: killed, restarted, paused, down at start; a cluster node killed. Every failing
//! operation must give a typed error within the configured deadline.

use std::time::Duration;

use session_conformance::faults::{
    every_operation_fails, is_backend_or_timeout, is_timeout, load_once_reachable, tagged, works,
};
use session_conformance::harness::{RedisCluster, ServerKind, ServerProcess, free_port};
use session_conformance::new_key;
use session_core::SessionStore;
use session_redis::{RedisConfig, RedisStore};

fn config(url: String) -> RedisConfig {
    RedisConfig::standalone(url)
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn a_killed_server_gives_typed_errors_and_the_same_store_recovers_after_restart() {
    let Some(mut server) = ServerProcess::start(ServerKind::Redis) else {
        return;
    };
    let config = config(format!("redis://{}", server.address()));
    let deadline = config.operation_deadline();
    let store = RedisStore::connect(config).await.unwrap();
    works(&store).await;

    server.kill();
    every_operation_fails(&store, deadline, is_backend_or_timeout).await;

    server.restart();
    // The connection manager reconnects in the background; give it its deadline.
    load_once_reachable(&store, &new_key(), "after a restart").await;
    let key = works(&store).await;
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().record,
        tagged("saved")
    );
}

#[tokio::test]
async fn a_paused_server_gives_timeouts_in_bounded_time_and_recovers_when_resumed() {
    let Some(server) = ServerProcess::start(ServerKind::Redis) else {
        return;
    };
    let config = config(format!("redis://{}", server.address()));
    let deadline = config.operation_deadline();
    let store = RedisStore::connect(config).await.unwrap();
    let key = works(&store).await;

    server.pause();
    every_operation_fails(&store, deadline, is_timeout).await;
    server.resume();

    let loaded = load_once_reachable(&store, &key, "after a pause").await;
    assert_eq!(
        loaded.expect("the session survives a pause").record,
        tagged("saved")
    );
    works(&store).await;
}

#[tokio::test]
async fn a_store_built_while_the_server_is_down_works_once_it_is_up() {
    let port = free_port();
    let config = config(format!("redis://127.0.0.1:{port}"));
    let deadline = config.operation_deadline();
    let store = RedisStore::connect(config).await.unwrap();
    every_operation_fails(&store, deadline, is_backend_or_timeout).await;
    let Some(_server) = ServerProcess::start_on_port(ServerKind::Redis, port) else {
        return;
    };
    load_once_reachable(&store, &new_key(), "once the server was up").await;
    works(&store).await;
}

#[tokio::test]
async fn a_killed_cluster_node_gives_typed_errors_for_its_slots_only() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let config = RedisConfig::cluster(cluster.seed_urls())
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300));
    let deadline = config.operation_deadline();
    let store = RedisStore::connect(config).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..60 {
        let key = works(&store).await;
        let node = cluster
            .node_holding(key.as_str())
            .expect("every key is on some node");
        keys.push((key, node));
    }
    assert!(keys.iter().any(|(_, node)| *node == 0));
    cluster.nodes()[0].kill();
    // Past the cluster's node timeout, so the others have marked the node as failed; they
    // keep serving their own slots (full coverage is not required).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (key, node) in &keys {
        let started = std::time::Instant::now();
        let outcome = store.load(key).await;
        // A dead node may cost a reconnect attempt and a retry on top of one request.
        assert!(started.elapsed() <= 2 * deadline + session_conformance::faults::SLACK);
        if *node == 0 {
            let error = outcome.expect_err("a key on the killed node");
            assert!(is_backend_or_timeout(&error), "{error:?}");
        } else {
            let found = outcome.expect("a key on a live node loads");
            assert_eq!(found.expect("still stored").record, tagged("saved"));
        }
    }
}

/// A reply cut short while the client reconnects (its handshake reply does not parse) must not
/// leave the store failing every request once the network heals. With redis 1.8's
/// `ConnectionManager` alone it did: the failed reconnection was kept and answered every later
/// request at once with the same parse error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_short_during_a_reconnection_leave_no_stuck_connection() {
    use session_conformance::proxy::{Fault, FaultProxy, Scope, Trigger};
    let Some(server) = ServerProcess::start(ServerKind::Redis) else {
        return;
    };
    let proxy = FaultProxy::start(server.address().parse().unwrap())
        .await
        .unwrap();
    let config = RedisConfig::standalone(format!("redis://{}", proxy.address()))
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(300));
    let store = RedisStore::connect(config).await.unwrap();
    let key = works(&store).await;

    // Every reply, the reconnection's handshake included, is cut after five bytes.
    proxy.apply(Fault::Cut, Scope::All, Trigger::AfterReplyBytes(5));
    let mut failures = 0;
    for _ in 0..5 {
        failures += usize::from(store.load(&key).await.is_err());
    }
    assert!(failures >= 4, "the cut did not bite: {failures} failures");

    proxy.clear();
    assert_eq!(
        load_once_reachable(&store, &key, "after the cut")
            .await
            .unwrap()
            .record,
        tagged("saved")
    );
    for _ in 0..20 {
        assert_eq!(
            store.load(&key).await.unwrap().unwrap().record,
            tagged("saved")
        );
    }
}
