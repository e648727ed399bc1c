//! Every interleaving of two concurrent requests on one session, and a seeded sample of three,
//! on the memory store: the invariants of `session_conformance::interleave` hold after each.
//! Then the harness itself is shown able to fail: stores with one deliberate defect each break
//! the invariant meant to catch it, and the same wrapper without the defect passes.

use std::time::Duration;

use async_trait::async_trait;
use session_conformance::interleave::{
    Exploration, Harness, Invariant, Report, RequestKind, all_pairs,
};
use session_core::{
    Record, SameKeyConflict, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::MemoryStore;

use RequestKind::*;

/// The seed of the three-request sample; `SESSION_INTERLEAVE_SEED` picks another.
fn seed() -> u64 {
    std::env::var("SESSION_INTERLEAVE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5e55_10f5)
}

async fn every_pair(exploration: Exploration) -> Report {
    let harness = Harness::new(MemoryStore::new(), exploration);
    let mut report = Report::default();
    for pair in all_pairs() {
        let before = report.schedules;
        harness.explore_all(&pair, &mut report).await;
        report.assert_clean();
        println!("{pair:?}: {} schedules", report.schedules - before);
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interleaving_of_two_requests() {
    let report = every_pair(Exploration::default()).await;
    println!(
        "checked every interleaving of two requests: {} schedules ({} lost writes reported, {} \
         saves followed a move)",
        report.schedules, report.lost_writes, report.followed
    );
    assert!(report.lost_writes > 0 && report.followed > 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interleaving_of_two_requests_branching_after_calls_too() {
    let report = every_pair(Exploration {
        branch_after_calls: true,
        ..Exploration::default()
    })
    .await;
    println!(
        "checked every interleaving of two requests, branching after calls too: {} schedules",
        report.schedules
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interleaving_of_two_requests_when_same_key_inserts_fail() {
    let report = every_pair(Exploration {
        same_key: SameKeyConflict::Fail,
        ..Exploration::default()
    })
    .await;
    println!(
        "checked every interleaving of two requests with same-key inserts failing: {} schedules, \
         {} same-key failures",
        report.schedules, report.same_key_failures
    );
    assert!(report.same_key_failures > 0, "no insert ever conflicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_sample_of_three_request_interleavings() {
    let seed = seed();
    let harness = Harness::new(MemoryStore::new(), Exploration::default());
    let mut report = Report::default();
    harness.explore_random(3, 3000, seed, &mut report).await;
    report.assert_clean();
    println!(
        "checked {} random three-request interleavings (seed {seed}; rerun with \
         SESSION_INTERLEAVE_SEED={seed})",
        report.schedules
    );
    assert_eq!(report.schedules, 3000);
}

/// Pages rendering forms (each making or reading the session's CSRF token) around logins, in
/// every interleaving: after an acknowledged login no token rendered for the id before it
/// verifies, whether the rendering request saved first, followed the login's marker, or had
/// its save carried over by the login; without a login, the token stored first verifies. Both
/// same-key policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interleaving_of_form_pages_and_logins_keeps_tokens_with_their_id() {
    let schedules: &[&[RequestKind]] = &[
        &[RenderForm, Cycle],
        &[RenderForm, RenderForm],
        &[RenderForm, RenderForm, Cycle],
        &[RenderForm, Cycle, UpdateSame],
    ];
    for same_key in [SameKeyConflict::LastWriterWins, SameKeyConflict::Fail] {
        let harness = Harness::new(
            MemoryStore::new(),
            Exploration {
                same_key,
                ..Exploration::default()
            },
        );
        let mut report = Report::default();
        for kinds in schedules {
            let before = report.schedules;
            harness.explore_all(kinds, &mut report).await;
            report.assert_clean();
            println!(
                "{same_key:?} {kinds:?}: {} schedules",
                report.schedules - before
            );
        }
    }
}

/// One deliberate defect of a store, each meant to break one invariant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Defect {
    None,
    /// Loading a moved marker fails.
    LoadFailsOnMarkers,
    /// `save` ignores the version it is given.
    SaveIgnoresVersions,
    /// `mark_moved` ignores the version it is given (so a save that landed after the cycle
    /// read the session is dropped with the old entry).
    MarkIgnoresVersions,
    /// `save` writes, then reports the session gone (a reply lost after the write).
    SaveAppliesButReportsNotFound,
    /// `save` on a vanished entry creates it again.
    SaveResurrects,
    /// `mark_moved` reports success and writes nothing.
    MarkWritesNothing,
    /// `touch` counts a marker as a session.
    TouchCountsMarkers,
    /// A version conflict is reported as a vanished session.
    ConflictReportedAsNotFound,
    /// A save with a stale version reports success and writes nothing.
    ConflictReportedAsSuccess,
}

#[derive(Clone)]
struct Broken {
    inner: MemoryStore,
    defect: Defect,
}

#[async_trait]
impl SessionStore for Broken {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.inner.create(k, r, t).await
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        let entry = self.inner.load_entry(key).await?;
        if self.defect == Defect::LoadFailsOnMarkers
            && matches!(entry, Some(StoredEntry::Moved { .. }))
        {
            return Err(StoreError::Backend {
                operation: "load",
                source: "marker (injected)".into(),
            });
        }
        Ok(entry)
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        let result = match self.defect {
            Defect::SaveIgnoresVersions => match self.inner.load(key).await? {
                Some(current) => self.inner.save(key, record, ttl, current.version).await,
                None => Err(StoreError::NotFound),
            },
            _ => self.inner.save(key, record, ttl, version).await,
        };
        match (self.defect, result) {
            (Defect::SaveAppliesButReportsNotFound, Ok(_)) => Err(StoreError::NotFound),
            (Defect::SaveResurrects, Err(StoreError::NotFound)) => {
                self.inner.create(key, record, ttl).await
            }
            (Defect::ConflictReportedAsNotFound, Err(StoreError::Conflict)) => {
                Err(StoreError::NotFound)
            }
            (Defect::ConflictReportedAsSuccess, Err(StoreError::Conflict)) => Ok(version),
            (_, result) => result,
        }
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self.defect {
            Defect::MarkIgnoresVersions => match self.inner.load(key).await? {
                Some(current) => self.inner.mark_moved(key, current.version, to, ttl).await,
                None => Err(StoreError::NotFound),
            },
            Defect::MarkWritesNothing => Ok(()),
            _ => self.inner.mark_moved(key, version, to, ttl).await,
        }
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        let touched = self.inner.touch(key, ttl).await?;
        let marker = matches!(
            self.inner.load_entry(key).await?,
            Some(StoredEntry::Moved { .. })
        );
        Ok(touched || (self.defect == Defect::TouchCountsMarkers && marker))
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.inner.delete_if_version(key, version).await
    }

    fn max_record_size(&self) -> usize {
        self.inner.max_record_size()
    }

    fn max_key_len(&self) -> Option<usize> {
        self.inner.max_key_len()
    }
}

/// Explores every schedule of `kinds` on a store with `defect` and expects `invariant` to
/// break; the same requests on the wrapper without a defect keep every invariant.
async fn caught(defect: Defect, kinds: [RequestKind; 2], invariant: Invariant) {
    let run = |defect| async move {
        let store = Broken {
            inner: MemoryStore::new(),
            defect,
        };
        let harness = Harness::new(store, Exploration::default());
        let mut report = Report::default();
        harness.explore_all(&kinds, &mut report).await;
        report
    };
    run(Defect::None).await.assert_clean();
    let report = run(defect).await;
    match &report.violation {
        Some((violation, schedule)) => {
            assert_eq!(
                violation.invariant, invariant,
                "{defect:?} broke another invariant first: {}\n{schedule}",
                violation.detail
            );
            println!(
                "{defect:?} on {kinds:?}: {invariant:?} broken after {} schedules",
                report.schedules
            );
        }
        None => panic!("{defect:?} on {kinds:?} broke no invariant"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invariant_can_fail() {
    caught(
        Defect::LoadFailsOnMarkers,
        [InsertOwn, Cycle],
        Invariant::NoRequestFails,
    )
    .await;
    caught(
        Defect::SaveIgnoresVersions,
        [UpdateSame, UpdateSame],
        Invariant::UpdatesAppliedExactlyOnce,
    )
    .await;
    caught(
        Defect::MarkIgnoresVersions,
        [InsertOwn, Cycle],
        Invariant::AcknowledgedInsertsKept,
    )
    .await;
    caught(
        Defect::SaveAppliesButReportsNotFound,
        [InsertOwn, ReadOnly],
        Invariant::LostChangesNotWritten,
    )
    .await;
    caught(
        Defect::SaveResurrects,
        [InsertOwn, Destroy],
        Invariant::EndedSessionsStayEnded,
    )
    .await;
    caught(
        Defect::MarkWritesNothing,
        [Cycle, ReadOnly],
        Invariant::AtMostOneLiveEntry,
    )
    .await;
    caught(
        Defect::TouchCountsMarkers,
        [Cycle, UnchangedPastThreshold],
        Invariant::LastCookieLoadsTheLiveSession,
    )
    .await;
    caught(
        Defect::ConflictReportedAsNotFound,
        [InsertOwn, InsertOwn],
        Invariant::NoSpuriousEnd,
    )
    .await;
    caught(
        Defect::ConflictReportedAsSuccess,
        [InsertSame, InsertSame],
        Invariant::LastWriterWins,
    )
    .await;
}
