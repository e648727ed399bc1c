//! Server faults: killed, restarted, paused, down from the start, one node of three lost.
//! Every failing operation must give a typed error within the configured deadline.

use std::time::{Duration, Instant};

use session_conformance::faults::{
    SLACK, TTL, every_operation_fails, is_backend_or_timeout, is_timeout, tagged as record, works,
};
use session_conformance::harness::{ServerKind, ServerProcess, free_port};
use session_conformance::new_key;
use session_core::{SessionStore, StorageKey, StoreError};
use session_memcached::{MemcachedConfig, MemcachedStore};

fn config(addresses: impl IntoIterator<Item = String>) -> MemcachedConfig {
    MemcachedConfig::new(addresses)
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300))
}

#[tokio::test]
async fn a_killed_server_gives_typed_errors_and_the_same_store_recovers_after_restart() {
    let Some(mut server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let config = config([server.address()]);
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();
    works(&store).await;

    server.kill();
    every_operation_fails(&store, deadline, is_backend_or_timeout).await;
    // Refused connections are reported as backend errors, not as timeouts.
    let refused = store.load(&new_key()).await.unwrap_err();
    assert!(matches!(refused, StoreError::Backend { .. }), "{refused:?}");

    server.restart();
    let key = works(&store).await;
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().record,
        record("saved")
    );
}

#[tokio::test]
async fn a_paused_server_gives_timeouts_in_bounded_time_and_recovers_when_resumed() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let config = config([server.address()]);
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();
    let key = works(&store).await;

    server.pause();
    every_operation_fails(&store, deadline, is_timeout).await;
    server.resume();

    assert_eq!(
        store.load(&key).await.unwrap().unwrap().record,
        record("saved")
    );
    works(&store).await;
}

#[tokio::test]
async fn a_store_built_while_the_server_is_down_works_once_it_is_up() {
    let port = free_port();
    let config = config([format!("127.0.0.1:{port}")]);
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();
    every_operation_fails(&store, deadline, is_backend_or_timeout).await;
    let Some(_server) = ServerProcess::start_on_port(ServerKind::Memcached, port) else {
        return;
    };
    works(&store).await;
}

#[tokio::test]
async fn with_one_of_three_nodes_killed_sessions_on_the_others_still_load_and_save() {
    let servers: Option<Vec<ServerProcess>> = (0..3)
        .map(|_| ServerProcess::start(ServerKind::Memcached))
        .collect();
    let Some(mut servers) = servers else {
        return;
    };
    let config = config(servers.iter().map(ServerProcess::address));
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();

    let mut keys = Vec::new();
    for i in 0..300 {
        let key = new_key();
        let version = store
            .create(&key, &record(&i.to_string()), TTL)
            .await
            .unwrap();
        keys.push((key, version, i));
    }
    // Which node holds which key, read from the nodes themselves.
    let on_node: Vec<Vec<String>> = servers.iter().map(ServerProcess::memcached_keys).collect();
    let node_of = |key: &StorageKey| {
        on_node
            .iter()
            .position(|keys| keys.iter().any(|k| k == key.as_str()))
            .expect("every key is on some node")
    };

    servers[0].kill();
    let (mut survived, mut lost) = (0, 0);
    for (key, version, i) in &keys {
        if node_of(key) == 0 {
            let started = Instant::now();
            let error = store.load(key).await.unwrap_err();
            assert!(is_backend_or_timeout(&error), "{error:?}");
            assert!(started.elapsed() <= deadline + SLACK);
            lost += 1;
        } else {
            let loaded = store
                .load(key)
                .await
                .unwrap()
                .expect("session on a live node");
            assert_eq!(loaded.record, record(&i.to_string()));
            assert_eq!(loaded.version, *version);
            store
                .save(key, &record("after"), TTL, *version)
                .await
                .unwrap();
            survived += 1;
        }
    }
    assert!(lost > 0 && survived > 0, "lost {lost}, survived {survived}");
    assert_eq!(lost + survived, keys.len());
}
