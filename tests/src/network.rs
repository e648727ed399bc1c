//! Workloads for network-fault tests: a store talks to its server through a
//! [`FaultProxy`], and every operation under a fault must either
//! succeed with the right data or fail with a typed error within the store's deadline; once
//! the fault is lifted, the same store must work again with no connection left out of step.
//!
//! A backend's test file builds a [`Target`] (its server, a proxy in front of it, and a store
//! connected through the proxy) and hands it to one of the cases below, one test per fault.
//! Each case seeds sessions, sets its fault, runs [`exercise`] with what it [`Expect`]s,
//! prints the worst latency seen ([`Tally::report`]), lifts the fault and runs [`recovers`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use session_core::{Record, SessionStore, StorageKey, StoreError, Version};
use tokio::task::JoinSet;

use crate::faults::{SLACK, TTL, is_backend_or_timeout, is_timeout, tagged, works};
use crate::new_key;
use crate::proxy::{Fault, FaultProxy, Scope, Trigger};

/// What every operation run under a fault must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Success with the right data (a fault the store's timeouts absorb).
    Success,
    /// [`StoreError::Timeout`].
    Timeout,
    /// [`StoreError::Timeout`] or [`StoreError::Backend`].
    Failure,
    /// Success with the right data, or [`StoreError::Timeout`] or [`StoreError::Backend`].
    Either,
}

/// Sessions written before a fault: distinct keys holding distinct records of varied sizes
/// (from tens of bytes to a few KiB, so that replies span one or several TCP segments).
#[derive(Clone, Debug)]
pub struct Seeded {
    entries: Arc<Vec<(StorageKey, Version, Record)>>,
}

impl Seeded {
    /// The seeded sessions: key, version, record.
    pub fn entries(&self) -> &[(StorageKey, Version, Record)] {
        &self.entries
    }
}

/// The record seeded as session number `index`: tagged `seed-<index>`, with a padding value
/// whose bytes and length (none for session 0, up to 6000 bytes) depend on the index.
pub fn seeded_record(index: usize) -> Record {
    let mut record = tagged(&format!("seed-{index}"));
    let len = index * 997 % 6000;
    let padding = (0..len).map(|i| (i * 31 + index) as u8).collect();
    record.set_value("padding", padding);
    record
}

/// Creates `count` sessions through `store` (which must work now).
pub async fn seed<S: SessionStore>(store: &S, count: usize) -> Seeded {
    let mut entries = Vec::with_capacity(count);
    for index in 0..count {
        let key = new_key();
        let record = seeded_record(index);
        let version = store
            .create(&key, &record, TTL)
            .await
            .expect("seeding before the fault");
        entries.push((key, version, record));
    }
    Seeded {
        entries: Arc::new(entries),
    }
}

/// What a workload saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Operations run.
    pub operations: usize,
    /// Operations that succeeded (with the right data: anything else fails the test).
    pub succeeded: usize,
    /// Operations that gave [`StoreError::Timeout`].
    pub timeouts: usize,
    /// Operations that gave [`StoreError::Backend`].
    pub backend_errors: usize,
    /// The longest any operation took.
    pub worst: Duration,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.operations += other.operations;
        self.succeeded += other.succeeded;
        self.timeouts += other.timeouts;
        self.backend_errors += other.backend_errors;
        self.worst = self.worst.max(other.worst);
    }

    /// Operations that failed.
    pub fn failed(&self) -> usize {
        self.timeouts + self.backend_errors
    }

    /// Prints `<backend> <fault>: worst <ms>ms over <n> ops (...)` to standard error.
    pub fn report(&self, backend: &str, fault: &str) {
        eprintln!(
            "{backend} {fault}: worst {}ms over {} ops ({} ok, {} timeouts, {} backend errors)",
            self.worst.as_millis(),
            self.operations,
            self.succeeded,
            self.timeouts,
            self.backend_errors
        );
    }
}

/// Checks each operation's outcome and time against what the test expects.
struct Checker {
    fault: &'static str,
    deadline: Duration,
    expect: Expect,
    tally: Tally,
}

impl Checker {
    /// Runs one operation; returns its value if it succeeded (the caller checks the value).
    async fn run<T>(
        &mut self,
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        let started = Instant::now();
        let outcome = call.await;
        let elapsed = started.elapsed();
        let fault = self.fault;
        assert!(
            elapsed <= self.deadline + SLACK,
            "{fault}: {what} took {elapsed:?}, deadline {:?}",
            self.deadline
        );
        self.tally.operations += 1;
        self.tally.worst = self.tally.worst.max(elapsed);
        match outcome {
            Ok(value) => {
                assert!(
                    matches!(self.expect, Expect::Success | Expect::Either),
                    "{fault}: {what} succeeded where it must fail ({:?})",
                    self.expect
                );
                self.tally.succeeded += 1;
                Some(value)
            }
            Err(error) => {
                let allowed = match self.expect {
                    Expect::Success => false,
                    Expect::Timeout => is_timeout(&error),
                    Expect::Failure | Expect::Either => is_backend_or_timeout(&error),
                };
                assert!(
                    allowed,
                    "{fault}: {what} gave {error:?}, expected {:?}",
                    self.expect
                );
                if is_timeout(&error) {
                    self.tally.timeouts += 1;
                } else {
                    self.tally.backend_errors += 1;
                }
                None
            }
        }
    }
}

/// Runs `tasks` concurrent tasks against `store`, each `rounds` times: a load and a touch of a
/// seeded session (which must give exactly its record and version, and `true`), and a new
/// session taken through create, load, save, load, delete and load, each step checked
/// against the last (a sequence stops at its first failure, after which the session's state
/// is unknown). Every outcome must be what `expect` allows, within `deadline` plus
/// [`SLACK`]; `fault` names the fault in failure messages.
pub async fn exercise<S: SessionStore + Clone + 'static>(
    store: &S,
    seeded: &Seeded,
    fault: &'static str,
    deadline: Duration,
    expect: Expect,
    tasks: usize,
    rounds: usize,
) -> Tally {
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let store = store.clone();
        let seeded = seeded.clone();
        set.spawn(async move {
            let mut check = Checker {
                fault,
                deadline,
                expect,
                tally: Tally::default(),
            };
            for round in 0..rounds {
                let index = (task * rounds + round) % seeded.entries.len();
                let (key, version, record) = &seeded.entries[index];
                if let Some(loaded) = check.run("load of a seeded session", store.load(key)).await {
                    let loaded = loaded.unwrap_or_else(|| panic!("{fault}: seeded {index} lost"));
                    assert!(
                        loaded.record == *record,
                        "{fault}: seeded session {index} loaded another record (tag {:?})",
                        loaded.record.value("tag").map(String::from_utf8_lossy)
                    );
                    assert_eq!(loaded.version, *version, "{fault}: seeded {index}");
                }
                if let Some(found) = check.run("touch", store.touch(key, TTL)).await {
                    assert!(found, "{fault}: touch did not find seeded session {index}");
                }
                scratch_session(&store, &mut check, &format!("scratch-{task}-{round}")).await;
            }
            check.tally
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(part) => tally.add(part),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    tally
}

/// Takes a new session through its life, checking each step against the one before.
async fn scratch_session<S: SessionStore>(store: &S, check: &mut Checker, tag: &str) {
    let fault = check.fault;
    let key = new_key();
    let first = tagged(&format!("{tag}-created"));
    let Some(created) = check.run("create", store.create(&key, &first, TTL)).await else {
        return;
    };
    let Some(loaded) = check.run("load after create", store.load(&key)).await else {
        return;
    };
    let loaded = loaded.unwrap_or_else(|| panic!("{fault}: {tag} lost after create"));
    assert!(
        loaded.record == first,
        "{fault}: {tag} loaded another record"
    );
    assert_eq!(loaded.version, created, "{fault}: {tag}");

    let second = tagged(&format!("{tag}-saved"));
    let save = store.save(&key, &second, TTL, created);
    let Some(saved) = check.run("save", save).await else {
        return;
    };
    let Some(loaded) = check.run("load after save", store.load(&key)).await else {
        return;
    };
    let loaded = loaded.unwrap_or_else(|| panic!("{fault}: {tag} lost after save"));
    assert!(
        loaded.record == second,
        "{fault}: {tag} loaded another record"
    );
    assert_eq!(loaded.version, saved, "{fault}: {tag}");

    if check.run("delete", store.delete(&key)).await.is_none() {
        return;
    }
    if let Some(loaded) = check.run("load after delete", store.load(&key)).await {
        assert!(loaded.is_none(), "{fault}: {tag} survived its delete");
    }
}

/// After a fault is lifted: the same store answers again (within three seconds, for a client
/// that reconnects in the background), works, and `rounds` times loads every seeded session
/// `copies` times at once, each load getting exactly its own record and version: a pooled or
/// multiplexed connection left out of step by the fault would hand one session another's
/// reply.
pub async fn recovers<S: SessionStore + Clone + 'static>(
    store: &S,
    seeded: &Seeded,
    fault: &'static str,
    copies: usize,
    rounds: usize,
) {
    let (probe, ..) = &seeded.entries[0];
    let until = Instant::now() + Duration::from_secs(3);
    while let Err(error) = store.load(probe).await {
        assert!(
            Instant::now() < until,
            "{fault}: the store does not answer after the fault was lifted: {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    works(store).await;
    for _ in 0..rounds {
        let mut set = JoinSet::new();
        for copy in 0..copies {
            for index in 0..seeded.entries.len() {
                let store = store.clone();
                let seeded = seeded.clone();
                set.spawn(async move {
                    let (key, version, record) = &seeded.entries[index];
                    let loaded = store
                        .load(key)
                        .await
                        .unwrap_or_else(|e| panic!("{fault}: load {index}/{copy}: {e:?}"))
                        .unwrap_or_else(|| panic!("{fault}: seeded {index} lost"));
                    assert!(
                        loaded.record == *record,
                        "{fault}: after the fault, seeded session {index} loaded another \
                         record (tag {:?})",
                        loaded.record.value("tag").map(String::from_utf8_lossy)
                    );
                    assert_eq!(loaded.version, *version, "{fault}: seeded {index}");
                });
            }
        }
        while let Some(joined) = set.join_next().await {
            if let Err(error) = joined {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
}

/// The load a case puts on the store under its fault.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Loads of the smallest seeded session, one after another, run first under the fault;
    /// each must succeed (for a fault that lets short exchanges through, checked before the
    /// workload's long replies clog a connection).
    pub probes: usize,
    /// Concurrent tasks of [`exercise`], each running three rounds.
    pub tasks: usize,
}

impl Default for Workload {
    /// No probes, 8 tasks.
    fn default() -> Self {
        Self {
            probes: 0,
            tasks: 8,
        }
    }
}

/// A store whose every connection goes through a fault proxy.
pub struct Target<S> {
    /// The backend's name, for the printed lines (`memcached`, `redis`).
    pub backend: &'static str,
    /// The store, connected to the proxy's address.
    pub store: S,
    /// The proxy in front of the server.
    pub proxy: FaultProxy,
    /// The store's operation deadline (its `operation_deadline()`).
    pub deadline: Duration,
    /// The store's timeout for one request and its reply (I/O or response timeout).
    pub timeout: Duration,
    /// Whatever must live as long as the test: the server process.
    pub guard: Box<dyn std::any::Any + Send>,
}

/// How many sessions each case seeds.
const SEEDED: usize = 32;

/// The reply bytes a connection forwards before a mid-reply fault strikes: inside the value
/// of most seeded sessions' load replies, after a few short replies.
pub const MID_REPLY: u64 = 100;

impl<S: SessionStore + Clone + 'static> Target<S> {
    /// Seeds sessions, and loads them all at once so that the store's pool holds several
    /// open connections for the fault to meet; then sets the fault, runs the default
    /// [`Workload`] checking every outcome against `expect`, prints the worst latency, lifts
    /// the fault and checks that the store recovers with no connection out of step.
    pub async fn run(
        self,
        fault: &'static str,
        apply: impl FnOnce(&FaultProxy),
        expect: Expect,
    ) -> Tally {
        self.run_with(fault, apply, Workload::default(), expect)
            .await
    }

    /// [`run`](Self::run) with another [`Workload`].
    pub async fn run_with(
        self,
        fault: &'static str,
        apply: impl FnOnce(&FaultProxy),
        workload: Workload,
        expect: Expect,
    ) -> Tally {
        let seeded = seed(&self.store, SEEDED).await;
        recovers(&self.store, &seeded, "before the fault", 2, 1).await;
        apply(&self.proxy);
        let mut probe = Checker {
            fault,
            deadline: self.deadline,
            expect: Expect::Success,
            tally: Tally::default(),
        };
        let (key, version, record) = &seeded.entries[0];
        for _ in 0..workload.probes {
            let loaded = probe.run("probe load", self.store.load(key)).await;
            let loaded = loaded.flatten().expect("the smallest seeded session");
            assert!(
                loaded.record == *record,
                "{fault}: the probe loaded another record"
            );
            assert_eq!(loaded.version, *version, "{fault}: probe");
        }
        let mut tally = exercise(
            &self.store,
            &seeded,
            fault,
            self.deadline,
            expect,
            workload.tasks,
            3,
        )
        .await;
        tally.add(probe.tally);
        tally.report(self.backend, fault);
        self.proxy.clear();
        recovers(&self.store, &seeded, fault, 4, 3).await;
        tally
    }
}

/// Latency of an eighth of the timeout on every chunk, both ways: every operation succeeds
/// with the right data.
pub async fn latency_below_the_timeout<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let latency = target.timeout / 8;
    let tally = target
        .run(
            "latency below the timeout",
            |proxy| proxy.set(Fault::Latency(latency)),
            Expect::Success,
        )
        .await;
    assert!(tally.worst >= 2 * latency, "the latency did not apply");
}

/// Latency of the timeout and 150 ms on every chunk: every operation times out.
pub async fn latency_above_the_timeout<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let latency = target.timeout + Duration::from_millis(150);
    target
        .run(
            "latency above the timeout",
            |proxy| proxy.set(Fault::Latency(latency)),
            Expect::Timeout,
        )
        .await;
}

/// Nothing forwarded either way, sockets open: every operation times out.
pub async fn hang<S: SessionStore + Clone + 'static>(target: Target<S>) {
    target
        .run("hang", |proxy| proxy.set(Fault::Hang), Expect::Timeout)
        .await;
}

/// A hang after [`MID_REPLY`] more reply bytes on each connection: replies stop part way.
/// Operations time out or succeed; some must time out.
pub async fn hang_mid_reply<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run(
            "hang mid-reply",
            |proxy| proxy.apply(Fault::Hang, Scope::All, Trigger::AfterReplyBytes(MID_REPLY)),
            Expect::Either,
        )
        .await;
    assert!(tally.timeouts > 0, "the fault never struck: {tally:?}");
}

/// A reset at the first reply byte of every connection: every operation fails.
pub async fn reset<S: SessionStore + Clone + 'static>(target: Target<S>) {
    target
        .run("reset", |proxy| proxy.set(Fault::Reset), Expect::Failure)
        .await;
}

/// A reset after [`MID_REPLY`] more reply bytes on each connection: replies break off part
/// way. Operations fail or succeed; some must fail.
pub async fn reset_mid_reply<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run(
            "reset mid-reply",
            |proxy| {
                proxy.apply(
                    Fault::Reset,
                    Scope::All,
                    Trigger::AfterReplyBytes(MID_REPLY),
                )
            },
            Expect::Either,
        )
        .await;
    assert!(tally.failed() > 0, "the fault never struck: {tally:?}");
}

/// A reset at the next reply on the connections open now (a pool's idle connections), while
/// new connections work. Operations fail or succeed.
pub async fn reset_of_open_connections<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run(
            "reset of open connections",
            |proxy| proxy.apply(Fault::Reset, Scope::Existing, Trigger::Now),
            Expect::Either,
        )
        .await;
    assert!(tally.succeeded > 0, "nothing got through: {tally:?}");
}

/// Replies cut short: after [`MID_REPLY`] more reply bytes on each connection, both sides
/// are closed (new connections too, so a connection's handshake reply may be cut).
/// Operations fail or succeed; some must fail.
pub async fn cut_mid_reply<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run(
            "cut mid-reply",
            |proxy| proxy.apply(Fault::Cut, Scope::All, Trigger::AfterReplyBytes(MID_REPLY)),
            Expect::Either,
        )
        .await;
    assert!(tally.failed() > 0, "the fault never struck: {tally:?}");
}

/// Replies cut short on the connections open now only: after [`MID_REPLY`] more reply bytes
/// each of them is closed, while new connections work. Operations fail or succeed; some
/// must fail.
pub async fn cut_mid_reply_of_open_connections<S: SessionStore + Clone + 'static>(
    target: Target<S>,
) {
    let tally = target
        .run(
            "cut mid-reply of open connections",
            |proxy| {
                proxy.apply(
                    Fault::Cut,
                    Scope::Existing,
                    Trigger::AfterReplyBytes(MID_REPLY),
                )
            },
            Expect::Either,
        )
        .await;
    assert!(tally.failed() > 0, "the fault never struck: {tally:?}");
}

/// One byte per write, as fast as the proxy goes, both ways: replies come in pieces cut at
/// every possible place, and every operation still succeeds with the right data. Two tasks
/// only: a byte per system call is slow, and on a multiplexed connection (Redis) every
/// reply waits behind the others.
pub async fn trickle<S: SessionStore + Clone + 'static>(target: Target<S>) {
    target
        .run_with(
            "trickle",
            |proxy| proxy.set(Fault::Trickle(Duration::ZERO)),
            Workload {
                probes: 0,
                tasks: 2,
            },
            Expect::Success,
        )
        .await;
}

/// One byte at a time, a millisecond apart, both ways: long exchanges (KiB-sized records)
/// cannot finish within the timeout. Operations time out or succeed; some must time out.
pub async fn slow_trickle<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run(
            "slow trickle",
            |proxy| proxy.set(Fault::Trickle(Duration::from_millis(1))),
            Expect::Either,
        )
        .await;
    assert!(tally.timeouts > 0, "the fault never struck: {tally:?}");
}

/// 10 kB/s each way: short exchanges succeed (three probes of the smallest session must),
/// KiB-sized records cannot arrive within the timeout (some operations must time out).
pub async fn bandwidth_limit<S: SessionStore + Clone + 'static>(target: Target<S>) {
    let tally = target
        .run_with(
            "bandwidth limit",
            |proxy| proxy.set(Fault::Bandwidth(10_000)),
            Workload {
                probes: 3,
                ..Workload::default()
            },
            Expect::Either,
        )
        .await;
    assert!(tally.timeouts > 0, "the fault never struck: {tally:?}");
}

/// Generates one `#[tokio::test]` per network-fault case for a backend: the argument is an
/// async function (a path) giving `Option<Target<_>>`, `None` when the backend cannot run.
/// The generated tests need `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! network_fault_suite {
    ($target:path) => {
        $crate::network_fault_suite!(@cases $target;
            latency_below_the_timeout_gives_the_right_data => latency_below_the_timeout,
            latency_above_the_timeout_gives_timeouts => latency_above_the_timeout,
            a_hang_gives_timeouts => hang,
            a_hang_mid_reply_gives_timeouts => hang_mid_reply,
            a_reset_at_every_reply_fails_every_operation => reset,
            a_reset_mid_reply_leaves_no_connection_out_of_step => reset_mid_reply,
            a_reset_of_open_connections_leaves_new_ones_working => reset_of_open_connections,
            a_reply_cut_short_on_open_connections_leaves_none_out_of_step
                => cut_mid_reply_of_open_connections,
            a_reply_cut_short_leaves_no_connection_out_of_step => cut_mid_reply,
            replies_in_single_bytes_give_the_right_data => trickle,
            a_slow_trickle_gives_the_right_data_or_timeouts => slow_trickle,
            a_bandwidth_limit_gives_the_right_data_or_timeouts => bandwidth_limit
        );
    };
    (@cases $target:path; $($test:ident => $case:ident),+ $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let Some(target) = $target().await else { return };
            $crate::network::$case(target).await;
        }
    )+};
}
