//! The conformance suite against real Redis: a standalone server, and a three-master cluster.

use session_conformance::harness::{RedisCluster, ServerKind, ServerProcess};
use session_redis::{RedisConfig, RedisStore};

mod standalone {
    use super::*;

    session_conformance::conformance_suite!(async {
        let server = ServerProcess::start(ServerKind::Redis)?;
        let url = format!("redis://{}", server.address());
        let store = RedisStore::connect(RedisConfig::standalone(url))
            .await
            .unwrap();
        Some((store, server))
    });
}

mod cluster {
    use super::*;

    session_conformance::conformance_suite!(async {
        let cluster = RedisCluster::start()?;
        let store = RedisStore::connect(RedisConfig::cluster(cluster.seed_urls()))
            .await
            .unwrap();
        Some((store, cluster))
    });
}
