//! The multiplexed connections under conditions the fault suites do not reach: a connection
//! dialed on a runtime that stops running it, and callers that give up on requests a hung
//! server holds (review findings on the multiplexed connection).

use std::time::{Duration, Instant};

use session_conformance::faults::tagged as record;
use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::new_key;
use session_conformance::proxy::{Fault, FaultProxy};
use session_core::{SessionStore, StoreError};
use session_memcached::{MemcachedConfig, MemcachedStore};

const TTL: Duration = Duration::from_secs(60);

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The store's connection was dialed on runtime A, which is still alive but runs nothing now
/// (a sync application's runtime between `block_on` calls). A request from runtime B must
/// still end within the operation deadline, and the next one must get through on a
/// connection of its own.
#[test]
fn a_connection_whose_runtime_sits_idle_does_not_hang_another_runtimes_requests() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let config = MemcachedConfig::new([server.address()])
        .connections(1)
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300));
    let deadline = config.operation_deadline();
    let runtime_a = current_thread();
    let key = new_key();
    let store = runtime_a.block_on(async {
        let store = MemcachedStore::connect(config).await.unwrap();
        store.create(&key, &record("a"), TTL).await.unwrap();
        store
    });
    let runtime_b = current_thread();
    runtime_b.block_on(async {
        let started = Instant::now();
        let first = tokio::time::timeout(deadline * 3, store.load(&key)).await;
        let first = first.expect("a request hung on a connection whose runtime is idle");
        assert!(
            started.elapsed() <= deadline + Duration::from_millis(200),
            "took {:?}, deadline {deadline:?}",
            started.elapsed()
        );
        if let Err(error) = &first {
            assert!(matches!(error, StoreError::Timeout { .. }), "{error:?}");
        }
        let second = store.load(&key).await.unwrap().expect("the session");
        assert_eq!(second.record, record("a"));
    });
    drop(runtime_a);
}

/// Callers that give up on requests held by a hung server do not free their slots under the
/// in-flight cap while the requests stay queued: with the cap reached, a new request fails
/// after waiting the connect timeout for a slot, long before the I/O timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_keep_their_slot_under_the_in_flight_cap() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let upstream = server.address().parse().unwrap();
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let config = MemcachedConfig::new([proxy.address().to_string()])
        .connections(1)
        .max_in_flight(Some(4))
        .connect_timeout(Duration::from_millis(100))
        .io_timeout(Duration::from_secs(3));
    let store = MemcachedStore::connect(config).await.unwrap();
    let key = new_key();
    store.create(&key, &record("a"), TTL).await.unwrap();
    proxy.set(Fault::Hang);
    for _ in 0..100 {
        let gave_up = tokio::time::timeout(Duration::from_millis(2), store.load(&key)).await;
        assert!(gave_up.is_err(), "a load answered through a hung server");
    }
    let started = Instant::now();
    let load = store.load(&key).await;
    let took = started.elapsed();
    assert!(matches!(load, Err(StoreError::Timeout { .. })), "{load:?}");
    assert!(
        took < Duration::from_secs(1),
        "the request was queued behind 100 abandoned ones instead of waiting for a slot: {took:?}"
    );
}
