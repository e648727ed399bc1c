//! The conformance suite against real memcached: one server, and three.

use session_conformance::harness::{ServerKind, ServerProcess};
use session_memcached::{MemcachedConfig, MemcachedStore};

async fn store_over(servers: &[ServerProcess]) -> MemcachedStore {
    let config = MemcachedConfig::new(servers.iter().map(ServerProcess::address));
    MemcachedStore::connect(config).await.unwrap()
}

mod single_server {
    use super::*;

    session_conformance::conformance_suite!(async {
        let server = ServerProcess::start(ServerKind::Memcached)?;
        let store = store_over(std::slice::from_ref(&server)).await;
        Some((store, server))
    });
}

mod three_servers {
    use super::*;

    session_conformance::conformance_suite!(async {
        let servers: Option<Vec<ServerProcess>> = (0..3)
            .map(|_| ServerProcess::start(ServerKind::Memcached))
            .collect();
        let servers = servers?;
        let store = store_over(&servers).await;
        Some((store, servers))
    });
}

/// Two copies of each session. The contract cases run with long timeouts: on a loaded machine
/// a request can take a second, and a server timed out in the middle of 32 concurrent saves to
/// one session is the documented limit of replicas (`tests/replicas.rs` measures it), not what
/// these cases test.
fn replicated(servers: &[ServerProcess]) -> MemcachedConfig {
    MemcachedConfig::new(servers.iter().map(ServerProcess::address))
        .replicas(2)
        .io_timeout(std::time::Duration::from_secs(5))
}

mod three_servers_two_replicas {
    use super::*;

    session_conformance::conformance_suite!(async {
        let servers: Option<Vec<ServerProcess>> = (0..3)
            .map(|_| ServerProcess::start(ServerKind::Memcached))
            .collect();
        let servers = servers?;
        let config = replicated(&servers);
        let store = MemcachedStore::connect(config).await.unwrap();
        Some((store, servers))
    });
}

mod two_servers_two_replicas {
    use super::*;

    session_conformance::conformance_suite!(async {
        let servers: Option<Vec<ServerProcess>> = (0..2)
            .map(|_| ServerProcess::start(ServerKind::Memcached))
            .collect();
        let servers = servers?;
        let config = replicated(&servers);
        let store = MemcachedStore::connect(config).await.unwrap();
        Some((store, servers))
    });
}
