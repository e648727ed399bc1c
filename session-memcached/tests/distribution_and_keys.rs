//! Three nodes share the sessions fairly; no stored key reveals a session id or cookie; the
//! store is built from a URL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::new_key;
use session_core::{
    ConfigError, KeyPrefix, KeyRing, Record, SessionConfig, SessionManager, SessionStore,
    SigningKey,
};
use session_memcached::{MemcachedConfig, MemcachedStore};
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_hold_a_fair_share_of_ten_thousand_sessions() {
    let servers: Option<Vec<ServerProcess>> = (0..3)
        .map(|_| ServerProcess::start(ServerKind::Memcached))
        .collect();
    let Some(servers) = servers else {
        return;
    };
    let config = MemcachedConfig::new(servers.iter().map(ServerProcess::address));
    let store = MemcachedStore::connect(config).await.unwrap();
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.spawn(async move {
            let record = Record::new(SystemTime::now());
            for _ in 0..500 {
                store
                    .create(&new_key(), &record, Duration::from_secs(600))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let counts: Vec<u64> = servers
        .iter()
        .map(ServerProcess::memcached_item_count)
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 10_000, "{counts:?}");
    for count in &counts {
        let share = *count as f64 / 10_000.0;
        assert!((0.20..=0.47).contains(&share), "unfair spread {counts:?}");
    }
    println!("sessions per node: {counts:?}");
}

#[tokio::test]
async fn no_stored_key_holds_a_session_id_or_cookie_value() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let url = format!(
        "memcached://{}?timeout_ms=500&key_prefix=app1:",
        server.address()
    );
    let store = MemcachedStore::from_url(&url).await.unwrap();
    let keys = KeyRing::single(SigningKey::new([9u8; 32]).unwrap());
    let manager = SessionManager::new(Arc::new(store), SessionConfig::new(keys)).unwrap();

    let mut cookies = Vec::new();
    for i in 0..200u32 {
        let mut session = manager.load(None).await.unwrap();
        session.insert("n", &i).unwrap();
        let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;
        // Log in half of them, so cycled ids are covered too.
        if i % 2 == 0 {
            let mut session = manager.load(Some(&cookie)).await.unwrap();
            session.cycle_id();
            cookies.push(cookie);
            let cycled = manager.commit(session).await.unwrap().cookie.unwrap().value;
            cookies.push(cycled);
        } else {
            cookies.push(cookie);
        }
    }

    let stored = server.memcached_keys();
    assert_eq!(
        stored.len(),
        300,
        "one live key per session, and a moved marker for each of the 100 cycled ids"
    );
    for key in &stored {
        let hash = key
            .strip_prefix("app1:session:")
            .unwrap_or_else(|| panic!("unexpected key {key:?}"));
        assert_eq!(hash.len(), 43, "{key:?}");
    }
    for cookie in &cookies {
        let (id, tag) = cookie.split_once('.').unwrap();
        let id_standard_base64 = id.replace('-', "+").replace('_', "/");
        for key in &stored {
            assert!(!key.contains(id), "a raw id is in the key {key:?}");
            assert!(!key.contains(&id_standard_base64), "a raw id is in {key:?}");
            assert!(!key.contains(tag), "a cookie tag is in the key {key:?}");
        }
    }
}

#[tokio::test]
async fn urls_with_several_servers_build_a_working_store() {
    let servers: Option<Vec<ServerProcess>> = (0..2)
        .map(|_| ServerProcess::start(ServerKind::Memcached))
        .collect();
    let Some(servers) = servers else {
        return;
    };
    let url = format!(
        "memcached://{},{}?timeout_ms=250&connect_timeout_ms=250&connections=1",
        servers[0].address(),
        servers[1].address()
    );
    let store = MemcachedStore::from_url(&url).await.unwrap();
    for _ in 0..50 {
        let key = new_key();
        store
            .create(
                &key,
                &Record::new(SystemTime::now()),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(store.load(&key).await.unwrap().is_some());
    }
    assert!(servers.iter().all(|s| s.memcached_item_count() > 0));
}

#[tokio::test]
async fn loads_report_the_remaining_ttl() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let store = MemcachedStore::connect(MemcachedConfig::new([server.address()]))
        .await
        .unwrap();
    let key = new_key();
    let ttl = Duration::from_secs(600);
    store
        .create(&key, &Record::new(SystemTime::now()), ttl)
        .await
        .unwrap();
    let left = store.load(&key).await.unwrap().unwrap().expires_in;
    let left = left.expect("memcached reports the remaining TTL");
    assert!(left > ttl - Duration::from_secs(5) && left <= ttl + Duration::from_secs(2));
}

#[tokio::test]
async fn a_key_prefix_too_long_for_memcached_is_refused_when_the_manager_is_built() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let config = MemcachedConfig::new([server.address()]).key_prefix("m".repeat(64));
    let store = MemcachedStore::connect(config).await.unwrap();
    assert_eq!(store.max_key_len(), Some(250 - 64));
    let manager_config = |prefix_len: usize| {
        SessionConfig::new(KeyRing::single(SigningKey::new([3u8; 32]).unwrap()))
            .key_prefix(KeyPrefix::new("p".repeat(prefix_len)).unwrap())
    };
    // 144 + 43 = 187 bytes, one over what memcached leaves after the store's own prefix.
    let refused = SessionManager::new(Arc::new(store.clone()), manager_config(144)).unwrap_err();
    assert_eq!(
        refused,
        ConfigError::KeyTooLong {
            len: 187,
            limit: 186
        }
    );
    assert!(
        refused.to_string().contains("key limit of 186"),
        "{refused}"
    );
    // The longest prefix that fits works end to end.
    let manager = SessionManager::new(Arc::new(store), manager_config(143)).unwrap();
    let mut session = manager.load(None).await.unwrap();
    session.insert("user", "alice").unwrap();
    let cookie = manager.commit(session).await.unwrap().cookie.unwrap();
    let loaded = manager.load(Some(&cookie.value)).await.unwrap();
    assert_eq!(
        loaded.get::<String>("user").unwrap().as_deref(),
        Some("alice")
    );
}
