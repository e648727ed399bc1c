//! Each conformance case can fail: stores with one deliberate defect each are run through the
//! case meant to catch it, and the case must panic. The same wrapper without a defect passes,
//! so the failure comes from the defect and not from the wrapper.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use session_conformance::cases;
use session_core::store::{MAX_TTL, MIN_TTL, check_ttl};
use session_core::{
    LoadedRecord, Record, SessionStore, StorageKey, StoreError, StoredEntry, Version,
};
use session_memory::MemoryStore;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Defect {
    None,
    /// `create` replaces an existing entry.
    OverwritesOnCreate,
    /// `save` ignores the version it is given.
    IgnoresVersions,
    /// `save` on a vanished entry creates it again.
    ResurrectsOnSave,
    /// `touch` rewrites the entry, changing its version.
    TouchRewrites,
    /// `touch` of a missing key creates an empty entry.
    TouchCreates,
    /// TTLs are stretched to at least a minute.
    IgnoresShortTtl,
    /// TTLs above 30 days become one second (memcached's absolute-time trap).
    TruncatesLongTtl,
    /// The advertised size limit is not enforced.
    NoSizeLimit,
    /// Values lose their last byte when it is a newline.
    StripsTrailingNewline,
    /// `load` reports a fixed version instead of the entry's.
    FixedVersion,
    /// `load` of a missing key invents an empty record.
    LoadInventsEntries,
    /// `delete` does nothing.
    DeleteIsNoop,
    /// `delete` of a missing key is an error.
    DeleteMissingFails,
    /// Out-of-range TTLs are clamped into range instead of rejected.
    ClampsTtl,
    /// Only 1,000 entries fit; older ones are evicted silently.
    SmallCapacity,
    /// `save` keeps the entry's expiry instead of setting the new TTL.
    SaveKeepsExpiry,
    /// `touch` only ever extends the expiry.
    TouchOnlyExtends,
    /// `save` keeps entries a second longer than asked, each time.
    SaveAddsASecond,
    /// `mark_moved` ignores the version it is given.
    MarkIgnoresVersions,
    /// `mark_moved` deletes the entry instead of leaving a marker.
    MarkDeletes,
    /// `mark_moved` keeps markers for an hour whatever the TTL.
    MarkerIgnoresTtl,
    /// `touch` counts a marker as a session.
    TouchCountsMarkers,
    /// `touch` extends a marker's expiry.
    TouchExtendsMarkers,
    /// `save` over a marker writes the session again.
    SaveReplacesMarkers,
    /// `delete_if_version` ignores the version it is given.
    VersionedDeleteIgnoresVersions,
    /// `delete_if_version` reports success and removes nothing.
    VersionedDeleteIsNoop,
}

#[derive(Clone)]
struct Faulty {
    inner: MemoryStore,
    defect: Defect,
}

const ADVERTISED_LIMIT: usize = 4096;

impl Faulty {
    fn new(defect: Defect) -> Self {
        let inner = MemoryStore::builder()
            .max_sessions(if defect == Defect::SmallCapacity {
                1000
            } else {
                MemoryStore::DEFAULT_MAX_SESSIONS
            })
            .max_record_size(if defect == Defect::NoSizeLimit {
                1 << 20
            } else {
                ADVERTISED_LIMIT
            })
            .build();
        Self { inner, defect }
    }

    fn ttl(&self, ttl: Duration) -> Duration {
        match self.defect {
            Defect::IgnoresShortTtl if ttl >= Duration::from_secs(1) => {
                ttl.max(Duration::from_secs(60))
            }
            Defect::TruncatesLongTtl if ttl > Duration::from_secs(30 * 86400) => {
                Duration::from_secs(1)
            }
            Defect::ClampsTtl => ttl.clamp(MIN_TTL, MAX_TTL),
            _ => ttl,
        }
    }

    fn mangle(&self, record: &Record) -> Record {
        let mut record = record.clone();
        if self.defect == Defect::StripsTrailingNewline {
            let names: Vec<String> = record.names().map(str::to_owned).collect();
            for name in names {
                let mut bytes = record.value(&name).unwrap().to_vec();
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                record.set_value(name, bytes);
            }
        }
        record
    }
}

#[async_trait]
impl SessionStore for Faulty {
    async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        if self.defect == Defect::OverwritesOnCreate {
            self.inner.delete(key).await?;
        }
        self.inner
            .create(key, &self.mangle(record), self.ttl(ttl))
            .await
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        let mut loaded = self.inner.load_entry(key).await?;
        if self.defect == Defect::LoadInventsEntries && loaded.is_none() {
            loaded = Some(StoredEntry::Session(LoadedRecord {
                record: Record::new(std::time::SystemTime::now()),
                version: Version::new(1),
                expires_in: None,
            }));
        }
        if self.defect == Defect::FixedVersion
            && let Some(StoredEntry::Session(loaded)) = &mut loaded
        {
            loaded.version = Version::new(7);
        }
        Ok(loaded)
    }

    async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        let record = self.mangle(record);
        let ttl = self.ttl(ttl);
        match self.defect {
            Defect::IgnoresVersions => match self.inner.load(key).await? {
                Some(current) => self.inner.save(key, &record, ttl, current.version).await,
                None => Err(StoreError::NotFound),
            },
            Defect::ResurrectsOnSave => match self.inner.save(key, &record, ttl, version).await {
                Err(StoreError::NotFound) => self.inner.create(key, &record, ttl).await,
                other => other,
            },
            Defect::FixedVersion => match self.inner.load(key).await? {
                Some(current) => self.inner.save(key, &record, ttl, current.version).await,
                None => Err(StoreError::NotFound),
            },
            Defect::SaveReplacesMarkers
                if matches!(
                    self.inner.load_entry(key).await?,
                    Some(StoredEntry::Moved { .. })
                ) =>
            {
                self.inner.delete(key).await?;
                self.inner.create(key, &record, ttl).await
            }
            Defect::SaveAddsASecond => {
                let ttl = ttl + Duration::from_secs(1);
                self.inner.save(key, &record, ttl, version).await
            }
            Defect::SaveKeepsExpiry => {
                let left = self.inner.load(key).await?.and_then(|l| l.expires_in);
                let ttl = left.map_or(ttl, |left| left.max(MIN_TTL));
                self.inner.save(key, &record, ttl, version).await
            }
            _ => self.inner.save(key, &record, ttl, version).await,
        }
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = self.ttl(ttl);
        match self.defect {
            Defect::TouchRewrites => match self.inner.load(key).await? {
                Some(current) => {
                    self.inner
                        .save(key, &current.record, ttl, current.version)
                        .await?;
                    Ok(true)
                }
                None => Ok(false),
            },
            Defect::TouchCreates => {
                if !self.inner.touch(key, ttl).await? {
                    let empty = Record::new(std::time::SystemTime::now());
                    self.inner.create(key, &empty, ttl).await?;
                }
                Ok(true)
            }
            Defect::TouchOnlyExtends => {
                let left = self.inner.load(key).await?.and_then(|l| l.expires_in);
                self.inner
                    .touch(key, left.map_or(ttl, |left| left.max(ttl)))
                    .await
            }
            Defect::TouchExtendsMarkers => match self.inner.load_entry(key).await? {
                Some(StoredEntry::Moved { to }) => {
                    // Rewrite the marker with the touch's TTL (a backend that touches blindly).
                    self.inner.delete(key).await?;
                    let version = self
                        .inner
                        .create(key, &Record::new(std::time::SystemTime::now()), ttl)
                        .await?;
                    self.inner.mark_moved(key, version, &to, ttl).await?;
                    Ok(false)
                }
                _ => self.inner.touch(key, ttl).await,
            },
            Defect::TouchCountsMarkers => Ok(self.inner.touch(key, ttl).await?
                || matches!(
                    self.inner.load_entry(key).await?,
                    Some(StoredEntry::Moved { .. })
                )),
            _ => self.inner.touch(key, ttl).await,
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
            Defect::MarkDeletes => match self.inner.load(key).await? {
                Some(_) => self.inner.delete(key).await,
                None => Err(StoreError::NotFound),
            },
            Defect::MarkerIgnoresTtl => {
                check_ttl(ttl)?;
                let hour = Duration::from_secs(3600);
                self.inner.mark_moved(key, version, to, hour).await
            }
            _ => self.inner.mark_moved(key, version, to, ttl).await,
        }
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        match self.defect {
            Defect::DeleteIsNoop => Ok(()),
            Defect::DeleteMissingFails if self.inner.load(key).await?.is_none() => {
                Err(StoreError::NotFound)
            }
            _ => self.inner.delete(key).await,
        }
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        match self.defect {
            Defect::VersionedDeleteIgnoresVersions => match self.inner.load(key).await? {
                Some(_) => self.inner.delete(key).await,
                None => Err(StoreError::NotFound),
            },
            Defect::VersionedDeleteIsNoop => Ok(()),
            _ => self.inner.delete_if_version(key, version).await,
        }
    }

    fn max_record_size(&self) -> usize {
        ADVERTISED_LIMIT
    }

    fn max_key_len(&self) -> Option<usize> {
        self.inner.max_key_len()
    }
}

/// Runs `case` on a store with `defect` and on one without, expecting only the first to fail.
async fn caught<F, Fut>(defect: Defect, case: F)
where
    F: Fn(Faulty) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let healthy = tokio::spawn(case(Faulty::new(Defect::None))).await;
    assert!(healthy.is_ok(), "the case fails even without a defect");
    let broken = tokio::spawn(case(Faulty::new(defect))).await;
    match broken {
        Err(error) if error.is_panic() => {}
        _ => panic!("the case did not catch {defect:?}"),
    }
}

macro_rules! catches {
    ($($test:ident: $defect:ident by $($case:ident),+;)+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            $(caught(Defect::$defect, cases::$case).await;)+
        }
    )+};
}

catches! {
    overwrite_on_create: OverwritesOnCreate by
        create_never_overwrites, concurrent_creates_have_one_winner, model_based_operations;
    ignored_versions: IgnoresVersions by
        save_with_stale_version_is_conflict, old_version_does_not_match_a_recreated_entry,
        concurrent_saves_have_one_winner, model_based_operations,
        manager_concurrent_commits_lose_no_update;
    resurrection: ResurrectsOnSave by
        save_after_delete_is_not_found_and_recreates_nothing, idle_expiry_is_honored,
        model_based_operations;
    touch_rewriting: TouchRewrites by touch_extends_expiry_without_changing_data;
    touch_creating: TouchCreates by
        touch_of_missing_key_is_false_and_creates_nothing, model_based_operations;
    short_ttl_ignored: IgnoresShortTtl by idle_expiry_is_honored;
    long_ttl_truncated: TruncatesLongTtl by long_timeouts_are_honored;
    size_limit_unenforced: NoSizeLimit by record_at_the_size_limit_works_and_over_it_is_rejected;
    not_binary_safe: StripsTrailingNewline by binary_safe_values;
    wrong_versions: FixedVersion by create_load_round_trip, model_based_operations;
    invented_entries: LoadInventsEntries by load_of_missing_key_is_none;
    deletes_ignored: DeleteIsNoop by
        delete_is_idempotent, save_after_delete_is_not_found_and_recreates_nothing,
        model_based_operations;
    missing_delete_fails: DeleteMissingFails by delete_is_idempotent;
    ttl_clamped: ClampsTtl by ttl_outside_the_contract_range_is_rejected;
    capacity_too_small: SmallCapacity by thousands_of_sessions;
    save_ignoring_ttl: SaveKeepsExpiry by save_and_touch_set_the_ttl;
    touch_never_shortening: TouchOnlyExtends by save_and_touch_set_the_ttl;
    marks_ignoring_versions: MarkIgnoresVersions by
        mark_moved_is_conditional, concurrent_saves_and_marks_have_one_winner,
        model_based_operations;
    marks_deleting: MarkDeletes by
        mark_moved_leaves_a_marker_that_is_no_session, moved_marker_expires_after_its_ttl,
        model_based_operations;
    markers_outliving_their_ttl: MarkerIgnoresTtl by moved_marker_expires_after_its_ttl;
    touch_extending_markers: TouchExtendsMarkers by moved_marker_expires_after_its_ttl;
    touch_counting_markers: TouchCountsMarkers by
        mark_moved_leaves_a_marker_that_is_no_session, model_based_operations;
    saves_replacing_markers: SaveReplacesMarkers by
        mark_moved_leaves_a_marker_that_is_no_session, model_based_operations;
    versioned_deletes_ignoring_versions: VersionedDeleteIgnoresVersions by
        delete_if_version_is_conditional, model_based_operations;
    versioned_deletes_doing_nothing: VersionedDeleteIsNoop by
        delete_if_version_is_conditional, model_based_operations, manager_request_flow;
    updates_lost_to_ignored_versions: IgnoresVersions by
        manager_concurrent_updates_count_every_one;
    expiry_creeping_with_saves: SaveAddsASecond by
        saves_with_the_reported_ttl_keep_the_expiry, manager_active_sessions_keep_a_live_cookie;
}
