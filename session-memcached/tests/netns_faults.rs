//! A packet-level fault: memcached and the store in a network namespace of their own
//! (`unshare -rn`), whose loopback is shaped by the kernel (`tc qdisc ... tbf`) to 100 kbit/s.
//! Under it, every operation succeeds with the right data or times out within the store's
//! deadline; once the shaping is removed, the same store works again.
//!
//! The outer test runs this test binary again inside a new namespace, where the inner test
//! (ignored otherwise) does the work. Without user namespaces or `tc` the outer test prints a
//! `SKIPPED` line, or fails if `SESSION_TEST_REQUIRE_SERVERS=1`.

use std::process::Command;
use std::time::Duration;

use session_conformance::harness::{ServerKind, ServerProcess};
use session_conformance::network::{Expect, exercise, recovers, seed};
use session_core::SessionStore;
use session_memcached::{MemcachedConfig, MemcachedStore};

/// Set for the run inside the namespace.
const INSIDE: &str = "SESSION_TEST_INSIDE_NETNS";
const INNER_TEST: &str = "shaped_loopback_inside_the_namespace";

/// Runs `command` with `sh -c`, failing the test with its output if it fails.
fn sh(command: &str) {
    let output = Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("running sh");
    assert!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_shaped_loopback_gives_the_right_data_or_timeouts_and_the_store_recovers() {
    // Can this machine make a namespace and shape its loopback?
    let probe = Command::new("unshare")
        .args(["-rn", "sh", "-c"])
        .arg("ip link set lo up && tc qdisc add dev lo root tbf rate 1mbit burst 16kb latency 50ms")
        .output();
    let available = probe.as_ref().is_ok_and(|out| out.status.success());
    if !available {
        let why = match &probe {
            Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            Err(error) => error.to_string(),
        };
        assert!(
            std::env::var("SESSION_TEST_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "network namespaces with tc are required (SESSION_TEST_REQUIRE_SERVERS=1): {why}"
        );
        eprintln!("SKIPPED: no network namespace with tc shaping: {why}");
        return;
    }
    let output = Command::new("unshare")
        .arg("-rn")
        .arg(std::env::current_exe().expect("the test binary"))
        .args(["--exact", INNER_TEST, "--include-ignored", "--nocapture"])
        .env(INSIDE, "1")
        .output()
        .expect("running the test binary in a namespace");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    eprint!("{stderr}");
    assert!(
        output.status.success(),
        "the test in the namespace failed:\n{stdout}"
    );
    // It ran (a filter that matched nothing would pass too).
    assert!(stdout.contains("1 passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside a network namespace, started by the test above"]
async fn shaped_loopback_inside_the_namespace() {
    // Never shape the host's own loopback: only in the namespace the outer test made.
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).lines().count();
    if std::env::var_os(INSIDE).is_none() || links != 1 {
        eprintln!("not inside the test's network namespace: nothing to do");
        return;
    }
    // A real MTU, so that the shaper sees packets of a usual size.
    sh("ip link set lo up && ip link set lo mtu 1500");
    let Some(server) = ServerProcess::start(ServerKind::Memcached) else {
        panic!("memcached is needed in the namespace");
    };
    let config = MemcachedConfig::new([server.address()])
        .connect_timeout(Duration::from_millis(200))
        .io_timeout(Duration::from_millis(300));
    let deadline = config.operation_deadline();
    let store = MemcachedStore::connect(config).await.unwrap();
    let seeded = seed(&store, 32).await;
    recovers(&store, &seeded, "before shaping", 2, 1).await;

    // 100 kbit/s (12.5 kB/s) for both directions together: a 6 kB record cannot arrive
    // within the 300 ms I/O timeout; short exchanges pass.
    sh("tc qdisc add dev lo root tbf rate 100kbit burst 3000 latency 2s");
    let (key, version, record) = &seeded.entries()[0];
    for _ in 0..3 {
        let loaded = store
            .load(key)
            .await
            .unwrap()
            .expect("the smallest session");
        assert!(loaded.record == *record && loaded.version == *version);
    }
    let tally = exercise(
        &store,
        &seeded,
        "tbf 100kbit",
        deadline,
        Expect::Either,
        8,
        3,
    )
    .await;
    tally.report("memcached", "tbf 100kbit (network namespace)");
    assert!(tally.timeouts > 0, "the shaping never struck: {tally:?}");

    sh("tc qdisc del dev lo root");
    recovers(&store, &seeded, "tbf 100kbit", 4, 3).await;
}
