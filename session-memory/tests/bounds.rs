//! What is particular to the memory store: its bound, its sweeper, its sharding, and its
//! eviction order at the bound: a flood of new sessions (cookieless requests to a page that
//! writes the session) must not evict the sessions of users who came back.

use std::time::{Duration, SystemTime};

use session_core::{
    KeyPrefix, Record, SessionId, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};
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

/// How long the sessions of a flood live, next to the real users' ten minutes.
#[derive(Clone, Copy, Debug)]
enum FloodExpiry {
    Later,
    Sooner,
    Mixed,
}

impl FloodExpiry {
    fn ttl(self, i: usize) -> Duration {
        match self {
            Self::Later => 30 * MINUTE,
            Self::Sooner => MINUTE,
            Self::Mixed if i.is_multiple_of(2) => 30 * MINUTE,
            Self::Mixed => MINUTE,
        }
    }
}

/// Creates `users` sessions that each come back once (by a load, a save or a touch, in turn),
/// then a flood of twenty times the bound of new sessions, and checks every user is still in.
async fn users_survive_a_flood(store: MemoryStore, users: usize, flood: FloodExpiry) {
    let bound = store.capacity();
    let mut real_users = Vec::new();
    for i in 0..users {
        let k = key();
        let version = store.create(&k, &record(), 10 * MINUTE).await.unwrap();
        match i % 3 {
            0 => assert!(store.load(&k).await.unwrap().is_some()),
            1 => drop(
                store
                    .save(&k, &record(), 10 * MINUTE, version)
                    .await
                    .unwrap(),
            ),
            _ => assert!(store.touch(&k, 10 * MINUTE).await.unwrap()),
        }
        real_users.push(k);
    }
    for i in 0..20 * bound {
        store.create(&key(), &record(), flood.ttl(i)).await.unwrap();
        assert!(store.len() <= bound);
    }
    let mut evicted = 0;
    for k in &real_users {
        if store.load(k).await.unwrap().is_none() {
            evicted += 1;
        }
    }
    assert_eq!(
        evicted, 0,
        "a flood of new sessions ({flood:?} expiry) evicted {evicted} of {users} users who \
         came back (bound {bound})"
    );
    assert!(store.len() >= bound * 9 / 10, "{} of {bound}", store.len());
}

#[tokio::test]
async fn users_who_came_back_survive_a_flood_of_later_expiring_new_sessions() {
    let one_shard = MemoryStore::builder().max_sessions(256).shards(1).build();
    users_survive_a_flood(one_shard, 64, FloodExpiry::Later).await;
    let default_shards = MemoryStore::builder().max_sessions(1024).build();
    users_survive_a_flood(default_shards, 256, FloodExpiry::Later).await;
}

#[tokio::test]
async fn users_who_came_back_survive_a_flood_of_sooner_expiring_new_sessions() {
    let one_shard = MemoryStore::builder().max_sessions(256).shards(1).build();
    users_survive_a_flood(one_shard, 64, FloodExpiry::Sooner).await;
    let default_shards = MemoryStore::builder().max_sessions(1024).build();
    users_survive_a_flood(default_shards, 256, FloodExpiry::Sooner).await;
}

#[tokio::test]
async fn users_who_came_back_survive_a_flood_of_mixed_expiry_new_sessions() {
    let one_shard = MemoryStore::builder().max_sessions(256).shards(1).build();
    users_survive_a_flood(one_shard, 64, FloodExpiry::Mixed).await;
    let default_shards = MemoryStore::builder().max_sessions(1024).build();
    users_survive_a_flood(default_shards, 256, FloodExpiry::Mixed).await;
}

/// Leaves a moved marker under a new key, living `ttl`; returns the key.
async fn marker(store: &MemoryStore, ttl: Duration) -> StorageKey {
    let k = key();
    let version = store.create(&k, &record(), 10 * MINUTE).await.unwrap();
    store.mark_moved(&k, version, &key(), ttl).await.unwrap();
    k
}

async fn is_marker(store: &MemoryStore, k: &StorageKey) -> bool {
    matches!(
        store.load_entry(k).await.unwrap(),
        Some(StoredEntry::Moved { .. })
    )
}

// One shard of 64 evicts one entry per create, so the order is visible entry by entry.
// Presence is checked only at the end: a load would make an entry count as come back.

#[tokio::test]
async fn only_created_sessions_go_first_soonest_expiring_first() {
    let store = MemoryStore::builder().max_sessions(64).shards(1).build();
    let mut markers = Vec::new();
    for _ in 0..4 {
        markers.push(marker(&store, 2 * MINUTE).await);
    }
    // Came back, and expiring sooner than any session only created.
    let mut came_back = Vec::new();
    for _ in 0..20 {
        let k = key();
        store.create(&k, &record(), 5 * MINUTE).await.unwrap();
        assert!(store.load(&k).await.unwrap().is_some());
        came_back.push(k);
    }
    // Only created, each expiring a second after the one before.
    let mut only_created = Vec::new();
    for i in 0..40 {
        let k = key();
        let ttl = 10 * MINUTE + Duration::from_secs(i);
        store.create(&k, &record(), ttl).await.unwrap();
        only_created.push(k);
    }
    assert_eq!(store.len(), 64);
    // A flood of 30, expiring later than all of the above.
    let mut flood = Vec::new();
    for _ in 0..30 {
        let k = key();
        store.create(&k, &record(), 60 * MINUTE).await.unwrap();
        flood.push(k);
    }
    assert_eq!(store.len(), 64);

    for k in &markers {
        assert!(is_marker(&store, k).await, "a marker was evicted");
    }
    for k in &came_back {
        assert!(
            store.load(k).await.unwrap().is_some(),
            "a session that came back was evicted while sessions only created remained"
        );
    }
    for (i, k) in only_created.iter().enumerate() {
        let kept = store.load(k).await.unwrap().is_some();
        assert_eq!(kept, i >= 30, "only created #{i}: kept {kept}");
    }
    for k in &flood {
        assert!(store.load(k).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn markers_go_last() {
    let store = MemoryStore::builder().max_sessions(64).shards(1).build();
    let mut markers = Vec::new();
    for _ in 0..4 {
        markers.push(marker(&store, 2 * MINUTE).await);
    }
    let mut sessions = Vec::new();
    for i in 0..60 {
        let k = key();
        let ttl = 10 * MINUTE + Duration::from_secs(i);
        store.create(&k, &record(), ttl).await.unwrap();
        assert!(store.load(&k).await.unwrap().is_some());
        sessions.push(k);
    }
    // Ten new sessions that come back at once: sessions that came back are all that is left
    // to evict besides markers.
    for _ in 0..10 {
        let k = key();
        store.create(&k, &record(), 60 * MINUTE).await.unwrap();
        assert!(store.load(&k).await.unwrap().is_some());
    }
    assert_eq!(store.len(), 64);
    for k in &markers {
        assert!(is_marker(&store, k).await, "a marker went before a session");
    }
    for (i, k) in sessions.iter().enumerate() {
        let kept = store.load(k).await.unwrap().is_some();
        assert_eq!(kept, i >= 10, "session #{i}: kept {kept}");
    }

    // A shard holding nothing but markers evicts the soonest-expiring one.
    let store = MemoryStore::builder().max_sessions(3).shards(1).build();
    let soon = marker(&store, 2 * MINUTE).await;
    let later = marker(&store, 5 * MINUTE).await;
    let latest = marker(&store, 8 * MINUTE).await;
    store.create(&key(), &record(), MINUTE).await.unwrap();
    assert!(store.load_entry(&soon).await.unwrap().is_none());
    assert!(is_marker(&store, &later).await);
    assert!(is_marker(&store, &latest).await);
}

#[tokio::test]
async fn a_key_created_again_after_a_delete_starts_as_only_created() {
    let store = MemoryStore::builder().max_sessions(64).shards(1).build();
    let reused = key();
    let version: Version = store.create(&reused, &record(), MINUTE).await.unwrap();
    assert!(store.load(&reused).await.unwrap().is_some());
    store.delete_if_version(&reused, version).await.unwrap();
    store.create(&reused, &record(), 20 * MINUTE).await.unwrap();
    let mut came_back = Vec::new();
    for _ in 0..63 {
        let k = key();
        store.create(&k, &record(), 10 * MINUTE).await.unwrap();
        assert!(store.load(&k).await.unwrap().is_some());
        came_back.push(k);
    }
    store.create(&key(), &record(), 10 * MINUTE).await.unwrap();
    for k in &came_back {
        assert!(store.load(k).await.unwrap().is_some());
    }
    assert!(store.load(&reused).await.unwrap().is_none());
}
