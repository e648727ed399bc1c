//! Network faults between the store and Redis, injected by a TCP proxy (see
//! `session_conformance::proxy`): latency, a hang, resets and replies cut short, a trickle and
//! a bandwidth limit. Under each, every operation succeeds with the right data or fails with a
//! typed error within the store's deadline; once the fault is lifted, the same store works
//! and many concurrent loads each get their own session (no multiplexed connection out of step).
//! Run with `--nocapture` to see the worst latency under each fault.

use std::time::Duration;

use session_conformance::faults::{TTL, is_backend_or_timeout, tagged, works};
use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::network::Target;
use session_conformance::new_key;
use session_conformance::proxy::{Fault, FaultProxy, Scope, Trigger};
use session_core::{SessionStore, StoreError};
use session_redis::{RedisConfig, RedisStore};

const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);

/// Redis, a proxy in front of it, and a store connected through the proxy; `None` (the
/// test skipped) when redis-server is not installed.
async fn target() -> Option<Target<RedisStore>> {
    let server = ServerProcess::start(ServerKind::Redis)?;
    let upstream = server.address().parse().expect("a socket address");
    let proxy = FaultProxy::start(upstream)
        .await
        .expect("starting the proxy");
    let config = RedisConfig::standalone(format!("redis://{}", proxy.address()))
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(RESPONSE_TIMEOUT);
    let deadline = config.operation_deadline();
    let store = RedisStore::connect(config).await.expect("the store");
    Some(Target {
        backend: "redis",
        store,
        proxy,
        deadline,
        timeout: RESPONSE_TIMEOUT,
        guard: Box::new(server),
    })
}

session_conformance::network_fault_suite!(target);

/// A connection whose handshake reply (the replies to the `CLIENT SETINFO` commands the
/// client sends on every new connection) ends part way, with a `FIN`, makes the connection
/// attempt fail with a parse error. The connection manager reconnects after I/O errors only,
/// so it keeps that failed attempt: every later operation fails at once with the same parse
/// error, long after the network is healthy again, until the process restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_reply_cut_short_does_not_stop_the_store_for_good() {
    let Some(target) = target().await else { return };
    let (store, proxy) = (&target.store, &target.proxy);
    works(store).await;
    // New connections get three reply bytes, then a FIN: inside the first handshake reply.
    proxy.apply(Fault::Cut, Scope::New, Trigger::AfterReplyBytes(3));
    proxy.close_all();
    // The first load fails on the closed connection and starts a reconnection; the second
    // waits for that attempt, whose handshake reply is cut.
    for attempt in ["on the closed connection", "on the new connection"] {
        let error = store.load(&new_key()).await.expect_err(attempt);
        assert!(is_backend_or_timeout(&error), "{attempt}: {error:?}");
    }

    proxy.clear();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(error) = store.load(&new_key()).await {
        assert!(
            std::time::Instant::now() < until,
            "five seconds after the fault was lifted the store still fails: {error:?} \
             ({} connections accepted, {} open)",
            proxy.accepted(),
            proxy.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    works(store).await;
}

/// A write on a server that does not have the store's script yet (a fresh or restarted
/// server, a promoted replica, after `SCRIPT FLUSH`) takes three round trips: `EVALSHA`
/// answered `NOSCRIPT`, `SCRIPT LOAD`, `EVALSHA` again, each with the full response timeout.
/// `operation_deadline()` counts one request and one reconnection: the two extra round trips
/// must end by that deadline too, or the write fails as timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_loads_its_script_stays_within_the_deadline() {
    let Some(target) = target().await else { return };
    let (store, proxy) = (&target.store, &target.proxy);
    let key = new_key();
    // A create is a plain SET: the script is not loaded yet.
    let version = store.create(&key, &tagged("a"), TTL).await.unwrap();
    // Each round trip takes at least 240 ms, under the 300 ms response timeout.
    proxy.set(Fault::Latency(RESPONSE_TIMEOUT * 2 / 5));
    let started = std::time::Instant::now();
    let outcome = store.save(&key, &tagged("b"), TTL, version).await;
    let elapsed = started.elapsed();
    // Three round trips do not fit: the save gives up, as timed out, by the deadline.
    assert!(
        matches!(outcome, Err(StoreError::Timeout { .. })),
        "{outcome:?}"
    );
    // 100 ms for scheduling; three round trips take at least 720 ms.
    assert!(
        elapsed <= target.deadline + Duration::from_millis(100),
        "the save took {elapsed:?}, the store's deadline is {:?}",
        target.deadline
    );
}
