//! What is particular to the memory store: its bound, its sweeper and its sharding.

use std::time::{Duration, SystemTime};

use session_core::{KeyPrefix, Record, SessionId, SessionStore, StorageKey, StoreError};
use session_memory::{MemoryStore, OnFull};

fn key() -> StorageKey {
    StorageKey::derive(&KeyPrefix::default(), &SessionId::generate().unwrap())
}

fn record() -> Record {
    let mut record = Record::new(SystemTime::now());
    record.set_value("v", vec![1; 100]);
    record
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_creation_loop_never_grows_past_the_bound_and_evicts_the_idlest() {
    let store = MemoryStore::builder().max_sessions(1000).build();
    assert!(store.capacity() <= 1000);
    let long_lived = key();
    store
        .create(&long_lived, &record(), 10 * MINUTE)
        .await
        .unwrap();
    for _ in 0..20_000 {
        store.create(&key(), &record(), MINUTE).await.unwrap();
        assert!(store.len() <= 1000);
    }
    assert!(
        store.len() >= 900,
        "shards should fill evenly: {}",
        store.len()
    );
    assert!(
        store.load(&long_lived).await.unwrap().is_some(),
        "the entry with the latest expiry was evicted before idler ones"
    );
}

#[tokio::test]
async fn the_reject_policy_refuses_new_sessions_and_keeps_old_ones() {
    let store = MemoryStore::builder()
        .max_sessions(64)
        .shards(1)
        .on_full(OnFull::Reject)
        .build();
    let keys: Vec<StorageKey> = (0..64).map(|_| key()).collect();
    for k in &keys {
        store.create(k, &record(), MINUTE).await.unwrap();
    }
    let refused = store.create(&key(), &record(), MINUTE).await;
    assert!(matches!(refused, Err(StoreError::Full)), "{refused:?}");
    for k in &keys {
        assert!(store.load(k).await.unwrap().is_some());
    }
    store.delete(&keys[0]).await.unwrap();
    store.create(&key(), &record(), MINUTE).await.unwrap();
}

#[tokio::test]
async fn a_full_shard_reclaims_expired_entries_before_refusing() {
    let store = MemoryStore::builder()
        .max_sessions(10)
        .shards(1)
        .on_full(OnFull::Reject)
        .sweep_interval(Duration::from_secs(3600))
        .build();
    for _ in 0..10 {
        store
            .create(&key(), &record(), Duration::from_secs(1))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..10 {
        store.create(&key(), &record(), MINUTE).await.unwrap();
    }
    assert_eq!(store.len(), 10);
}

#[tokio::test]
async fn expired_entries_are_freed_without_any_caller_action() {
    let store = MemoryStore::builder()
        .sweep_interval(Duration::from_millis(100))
        .build();
    assert!(store.has_sweeper());
    for _ in 0..5000 {
        store
            .create(&key(), &record(), Duration::from_secs(1))
            .await
            .unwrap();
    }
    let kept = key();
    store.create(&kept, &record(), MINUTE).await.unwrap();
    assert_eq!(store.len(), 5001);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.len(), 1, "the sweeper did not free expired entries");
    assert!(store.load(&kept).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_store() {
    let store = MemoryStore::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let store = store.clone();
        tasks.spawn(async move {
            for _ in 0..200 {
                let k = key();
                let v = store.create(&k, &record(), MINUTE).await.unwrap();
                let loaded = store.load(&k).await.unwrap().unwrap();
                let v2 = store.save(&k, &loaded.record, MINUTE, v).await.unwrap();
                assert!(store.touch(&k, MINUTE).await.unwrap());
                assert_eq!(store.load(&k).await.unwrap().unwrap().version, v2);
                store.delete(&k).await.unwrap();
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    assert!(store.is_empty());
}

#[tokio::test]
async fn small_stores_use_few_shards_so_the_bound_is_nearly_reachable() {
    let tiny = MemoryStore::builder()
        .max_sessions(10)
        .on_full(OnFull::Reject)
        .build();
    for _ in 0..10 {
        tiny.create(&key(), &record(), MINUTE).await.unwrap();
    }
    assert!(matches!(
        tiny.create(&key(), &record(), MINUTE).await,
        Err(StoreError::Full)
    ));

    let small = MemoryStore::builder()
        .max_sessions(2000)
        .on_full(OnFull::Reject)
        .build();
    let mut accepted = 0;
    for _ in 0..2000 {
        if small.create(&key(), &record(), MINUTE).await.is_ok() {
            accepted += 1;
        }
    }
    assert!(accepted >= 1900, "only {accepted} of 2000 fit");
    assert!(accepted <= 2000);
}
