//! Network faults between the store and memcached, injected by a TCP proxy (see
//! `session_conformance::proxy`): latency, a hang, resets and replies cut short, a trickle and
//! a bandwidth limit. Under each, every operation succeeds with the right data or fails with a
//! typed error within the store's deadline; once the fault is lifted, the same store works
//! and many concurrent loads each get their own session (no pooled connection out of step).
//! Run with `--nocapture` to see the worst latency under each fault.

use std::time::Duration;

use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::network::Target;
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

session_conformance::network_fault_suite!(target);
