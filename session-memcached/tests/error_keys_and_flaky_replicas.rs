//! Findings of the review of issue 12: storage keys in errors, and read-your-writes of the
//! replicated store with flaky servers.

use std::time::Duration;

use session_conformance::faults::{TTL, tagged};
use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::new_key;
use session_conformance::proxy::{Fault, FaultProxy};
use session_core::SessionStore;
use session_memcached::{MemcachedConfig, MemcachedStore};

/// A request written in full whose reply is lost to a reset fails as `StoreError::Backend`
/// whose source is the memcache client's `Ambiguous { key, .. }`: the storage key, in the
/// error. session-tower logs that source with `?` at ERROR level for every failed commit or
/// load (`source = ?std::error::Error::source(&error)`), so a network blip writes session
/// storage keys into the application's logs, which `observe` and the logging test promise
/// never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_carries_no_storage_key_in_its_error() {
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    let proxy = FaultProxy::start(server.address().parse().unwrap())
        .await
        .unwrap();
    let config = MemcachedConfig::new([proxy.address().to_string()])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300));
    let store = MemcachedStore::connect(config).await.unwrap();
    let key = new_key();
    let version = store.create(&key, &tagged("a"), TTL).await.unwrap();

    proxy.set(Fault::Reset);
    let mut leaks = Vec::new();
    let outcomes = [
        (
            "save",
            store
                .save(&key, &tagged("b"), TTL, version)
                .await
                .map(|_| ()),
        ),
        ("load", store.load(&key).await.map(|_| ())),
        ("touch", store.touch(&key, TTL).await.map(|_| ())),
        ("delete", store.delete(&key).await),
    ];
    let hashed = key.as_str().rsplit(':').next().unwrap().to_owned();
    for (operation, outcome) in outcomes {
        let Err(error) = outcome else { continue };
        // What session-tower logs, and the whole chain as text.
        let source = std::error::Error::source(&error);
        let mut logged = format!("{error} {source:?}");
        let mut next = source;
        while let Some(cause) = next {
            logged.push_str(&format!(" {cause}"));
            next = cause.source();
        }
        let as_bytes = format!("{:?}", key.as_str().as_bytes());
        let as_bytes = &as_bytes[1..as_bytes.len() - 1];
        if logged.contains(&hashed) || logged.contains(as_bytes) {
            leaks.push(format!("{operation}: {logged}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "storage keys in errors:\n{}",
        leaks.join("\n")
    );
}

/// Both servers of a two-copy store behind proxies that reset every connection 100 reply
/// bytes into it (a flaky network between the application and its memcached pool). A save
/// that answered `Ok` must be what the next successful load returns (read-your-writes; the
/// crate docs: an acknowledged write is read afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a known limit, documented in the crate's Replicas section: with both of a session's \
            servers failing now and then, a load can return the copy from before an \
            acknowledged save"]
async fn replicated_an_acknowledged_save_is_what_the_next_load_reads() {
    read_your_writes(2).await;
}

/// The same with one of the two servers flaky: read-your-writes holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_with_one_flaky_server_an_acknowledged_save_is_read_back() {
    read_your_writes(1).await;
}

/// Two servers, `faulted` of them behind a proxy that resets connections mid-reply.
async fn read_your_writes(faulted: usize) {
    use session_conformance::network::MID_REPLY;
    use session_conformance::proxy::{Scope, Trigger};
    let (Some(a), Some(b)) = (
        ServerProcess::start(ServerKind::Memcached),
        ServerProcess::start(ServerKind::Memcached),
    ) else {
        return;
    };
    let pa = FaultProxy::start(a.address().parse().unwrap())
        .await
        .unwrap();
    let pb = FaultProxy::start(b.address().parse().unwrap())
        .await
        .unwrap();
    let config = MemcachedConfig::new([pa.address().to_string(), pb.address().to_string()])
        .replicas(2)
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300))
        .retry_interval(Duration::from_millis(200));
    let store = MemcachedStore::connect(config).await.unwrap();
    for proxy in [&pa, &pb].into_iter().take(faulted) {
        proxy.apply(
            Fault::Reset,
            Scope::All,
            Trigger::AfterReplyBytes(MID_REPLY),
        );
    }
    let mut violations = Vec::new();
    let mut stale_keys = Vec::new();
    let mut saves_ok = 0;
    for round in 0..200 {
        let key = new_key();
        let Ok(created) = store
            .create(&key, &tagged(&format!("{round}-created")), TTL)
            .await
        else {
            continue;
        };
        let Ok(saved) = store
            .save(&key, &tagged(&format!("{round}-saved")), TTL, created)
            .await
        else {
            continue;
        };
        saves_ok += 1;
        if let Ok(loaded) = store.load(&key).await {
            let tag = loaded
                .as_ref()
                .and_then(|l| l.record.value("tag"))
                .map(|t| String::from_utf8_lossy(t).into_owned());
            let version = loaded.as_ref().map(|l| l.version);
            if tag.as_deref() != Some(&format!("{round}-saved")) || version != Some(saved) {
                stale_keys.push((key.clone(), saved));
                violations.push(format!(
                    "round {round}: save answered Ok (version {saved:?}, created {created:?}); the load gave {tag:?} at {version:?}"
                ));
            }
        }
    }
    // After the fault: is the acknowledged save there at all?
    pa.clear();
    pb.clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lost = 0;
    for (key, saved) in &stale_keys {
        let loaded = store.load(key).await.unwrap();
        if loaded.map(|l| l.version) != Some(*saved) {
            lost += 1;
        }
    }
    assert!(
        violations.is_empty(),
        "{} of {saves_ok} acknowledged saves not read back under the fault ({lost} of them \
         still not read back a second after it was lifted):\n{}",
        violations.len(),
        violations.join("\n")
    );
}
