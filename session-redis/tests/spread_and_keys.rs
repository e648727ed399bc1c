//! Sessions spread over all three cluster masters; no Redis key holds a raw session id or
//! cookie; the store is built from URLs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use session_conformance::harness::{RedisCluster, ServerKind, ServerProcess};
use session_conformance::new_key;
use session_core::{KeyRing, Record, SessionConfig, SessionManager, SessionStore, SigningKey};
use session_redis::redis::AsyncCommands;
use session_redis::{RedisConfig, RedisStore};

#[tokio::test]
async fn sessions_are_spread_over_all_three_masters() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let seeds = cluster.seed_urls().join(",").replace("redis://", "");
    let url = format!("redis+cluster://{seeds}?timeout_ms=500");
    let store = RedisStore::from_url(&url).await.unwrap();
    for _ in 0..3000 {
        store
            .create(
                &new_key(),
                &Record::new(SystemTime::now()),
                Duration::from_secs(600),
            )
            .await
            .unwrap();
    }
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().sum::<u64>(), 3000, "{counts:?}");
    for count in &counts {
        let share = *count as f64 / 3000.0;
        assert!((0.20..=0.47).contains(&share), "uneven spread {counts:?}");
    }
    println!("sessions per master: {counts:?}");
}

/// Every key of a Redis server, by `SCAN`.
async fn scan_keys(url: &str) -> Vec<String> {
    let client = session_redis::redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let mut iter = connection.scan::<String>().await.unwrap();
    let mut keys = Vec::new();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    keys
}

async fn check_no_raw_ids(manager: &SessionManager, node_urls: &[String]) {
    let mut cookies = Vec::new();
    for i in 0..100u32 {
        let mut session = manager.load(None).await.unwrap();
        session.insert("n", &i).unwrap();
        cookies.push(manager.commit(session).await.unwrap().cookie.unwrap().value);
    }
    let mut stored = Vec::new();
    for url in node_urls {
        stored.extend(scan_keys(url).await);
    }
    assert_eq!(stored.len(), 100, "one key per session");
    for key in &stored {
        let hash = key
            .strip_prefix("app1:session:")
            .unwrap_or_else(|| panic!("unexpected key {key:?}"));
        assert_eq!(hash.len(), 43);
    }
    for cookie in &cookies {
        let (id, tag) = cookie.split_once('.').unwrap();
        for key in &stored {
            assert!(!key.contains(id), "a raw id is in the key {key:?}");
            assert!(!key.contains(tag), "a cookie tag is in the key {key:?}");
        }
    }
}

fn manager(store: RedisStore) -> SessionManager {
    let keys = KeyRing::single(SigningKey::new([5u8; 32]).unwrap());
    SessionManager::new(Arc::new(store), SessionConfig::new(keys)).unwrap()
}

#[tokio::test]
async fn no_redis_key_holds_a_session_id_standalone() {
    let Some(server) = ServerProcess::start(ServerKind::Redis) else {
        return;
    };
    let url = format!("redis://{}/0?key_prefix=app1:", server.address());
    let store = RedisStore::from_url(&url).await.unwrap();
    check_no_raw_ids(&manager(store), &[format!("redis://{}", server.address())]).await;
}

#[tokio::test]
async fn no_redis_key_holds_a_session_id_in_a_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let config = RedisConfig::cluster(cluster.seed_urls()).key_prefix("app1:");
    let store = RedisStore::connect(config).await.unwrap();
    check_no_raw_ids(&manager(store), &cluster.seed_urls()).await;
}

#[tokio::test]
async fn loads_report_the_remaining_ttl_in_milliseconds() {
    let Some(server) = ServerProcess::start(ServerKind::Redis) else {
        return;
    };
    let store = RedisStore::from_url(&format!("redis://{}", server.address()))
        .await
        .unwrap();
    let key = new_key();
    let ttl = Duration::from_millis(600_250);
    store
        .create(&key, &Record::new(SystemTime::now()), ttl)
        .await
        .unwrap();
    let left = store.load(&key).await.unwrap().unwrap().expires_in;
    let left = left.expect("Redis reports the remaining TTL");
    assert!(
        left > ttl - Duration::from_secs(5) && left <= ttl,
        "{left:?}"
    );
    assert_ne!(
        left.subsec_millis(),
        0,
        "millisecond precision expected: {left:?}"
    );
}
