//! Network faults between the store and memcached, injected by a TCP proxy (see
//! `session_conformance::proxy`): latency, a hang, resets and replies cut short, a trickle and
//! a bandwidth limit. Under each, every operation succeeds with the right data or fails with a
//! typed error within the store's deadline; once the fault is lifted, the same store works
//! and many concurrent loads each get their own session (no pooled connection out of step).
//! Run with `--nocapture` to see the worst latency under each fault.

use std::time::Duration;

use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::network::{self, Target};
use session_conformance::proxy::FaultProxy;
use session_memcached::{MemcachedConfig, MemcachedStore};

const IO_TIMEOUT: Duration = Duration::from_millis(300);

/// memcached, a proxy in front of it, and a store connected through the proxy; `None` (the
/// test skipped) when memcached is not installed.
async fn target() -> Option<Target<MemcachedStore>> {
    let server = ServerProcess::start(ServerKind::Memcached)?;
    let upstream = server.address().parse().expect("a socket address");
    let proxy = FaultProxy::start(upstream)
        .await
        .expect("starting the proxy");
    let config = MemcachedConfig::new([proxy.address().to_string()])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(IO_TIMEOUT);
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.expect("the store");
    Some(Target {
        backend: "memcached",
        store,
        proxy,
        deadline,
        timeout: IO_TIMEOUT,
        guard: Box::new(server),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_below_the_timeout_gives_the_right_data() {
    let Some(target) = target().await else { return };
    network::latency_below_the_timeout(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_above_the_timeout_gives_timeouts() {
    let Some(target) = target().await else { return };
    network::latency_above_the_timeout(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_gives_timeouts() {
    let Some(target) = target().await else { return };
    network::hang(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_mid_reply_gives_timeouts() {
    let Some(target) = target().await else { return };
    network::hang_mid_reply(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_at_every_reply_fails_every_operation() {
    let Some(target) = target().await else { return };
    network::reset(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_reply_leaves_no_connection_out_of_step() {
    let Some(target) = target().await else { return };
    network::reset_mid_reply(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_pooled_connections_leaves_new_ones_working() {
    let Some(target) = target().await else { return };
    network::reset_of_open_connections(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_short_on_open_connections_leaves_none_out_of_step() {
    let Some(target) = target().await else { return };
    network::cut_mid_reply_of_open_connections(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_short_leaves_no_connection_out_of_step() {
    let Some(target) = target().await else { return };
    network::cut_mid_reply(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_in_single_bytes_give_the_right_data() {
    let Some(target) = target().await else { return };
    network::trickle(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_trickle_gives_the_right_data_or_timeouts() {
    let Some(target) = target().await else { return };
    network::slow_trickle(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_limit_gives_the_right_data_or_timeouts() {
    let Some(target) = target().await else { return };
    network::bandwidth_limit(target).await;
}
