//! What the manager tells an operator: tracing spans and metrics.
//!
//! # Tracing
//!
//! Every span is at `DEBUG`, so an application logging at `INFO` sees none of them (the same
//! convention as tower-http's `TraceLayer`). No span or event carries a session id, a cookie
//! value or a storage key.
//!
//! | span | fields |
//! |---|---|
//! | `session.load` | `backend`; `outcome` (as the `result` label of [`LOADS`]); `elapsed_us` |
//! | `session.commit` | `backend`; `status` ([`CommitStatus`](crate::CommitStatus) in snake case, or `error`); `conflicts` (this commit's version conflicts that made it read again and retry: a save's, a mark's, a logout's delete; [`CONFLICTS`] counts every one), `replays` (this commit's); `lost_changes`; `elapsed_us` |
//! | `session.store` | `backend`; `operation` (as the label below); `outcome` (`ok`, or the error kind); `elapsed_us` |
//!
//! A store span is a child of the load or commit span that made the call.
//!
//! # Metrics
//!
//! Emitted through the [`metrics`] facade: nothing is recorded until the application installs a
//! recorder (an exporter such as `metrics-exporter-prometheus`); this library never installs
//! one. Every metric has the label `backend`, the store's
//! [`backend_name`](crate::SessionStore::backend_name) (`memory`, `memcached`, `redis`, or
//! `custom`).
//!
//! | name | kind | other labels | counts |
//! |---|---|---|---|
//! | [`LOADS`] `session_loads_total` | counter | `result`: `hit`, `miss`, `expired`, `undecodable`, `moved`, `no_cookie`, `bad_cookie`, `error` | requests' loads: a live session found; a valid cookie whose session is gone; a session past its absolute deadline (deleted); a stored record that does not decode; a cookie whose session moved to a new id; no cookie; a cookie that does not verify (no store call for these two); a load that failed (the store's failure is also counted by kind) |
//! | [`CREATES`] `session_creates_total` | counter | | new sessions stored (not counting id cycles) |
//! | [`SAVES`] `session_saves_total` | counter | | commits that saved changes (also where a session moved to) |
//! | [`CONFLICTS`] `session_conflicts_total` | counter | `operation` | store calls answered with a version conflict |
//! | [`REPLAYS`] `session_replays_total` | counter | | a request's changes replayed onto a newer version after a conflict (a replay refused as a same-key conflict is not counted) |
//! | [`TOUCHES`] `session_touches_total` | counter | `result`: `done`, `skipped` | unchanged sessions whose expiry was pushed back, or left as it was because the touch was not due |
//! | [`CYCLES`] `session_cycles_total` | counter | `result`: `confirmed`, `unconfirmed` | id cycles done: the old entry seen marked moved, or not (the mark went unanswered and the store could not be asked whether it landed; the new id stands, and the old one may keep the pre-login session until it expires) |
//! | [`DESTROYS`] `session_destroys_total` | counter | | stored sessions ended by [`Session::destroy`](crate::Session::destroy) |
//! | [`LOST_CHANGES`] `session_lost_changes_total` | counter | `status`: `ended`, `superseded` | commits that had changes but found the session ended or moved (see [`CommitOutcome::lost_changes`](crate::CommitOutcome::lost_changes)) |
//! | [`ID_COLLISIONS`] `session_id_collisions_total` | counter | | new ids that were already taken (another id is drawn) |
//! | [`ERRORS`] `session_errors_total` | counter | `kind` | failures: store calls by kind (`timeout`, `backend`, `full`, `too_large`, `invalid_ttl`, `encode`, `decode`) and commits that failed for a reason of the manager's (`retries_exhausted`, `id_draws_exhausted`, `too_large`, `value_encode`, `value_decode`, `same_key_conflict` (with [`SameKeyConflict::Fail`](crate::SameKeyConflict::Fail)), `randomness`, `misuse`) |
//! | [`STORE_OPERATION_SECONDS`] `session_store_operation_seconds` | histogram | `operation`: `create`, `load`, `save`, `mark_moved`, `touch`, `delete`, `delete_if_version` | the time a store call took, in seconds, whatever its outcome |
//!
//! A `decode` store error is also counted by the load that met it (`result="undecodable"`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::store::{StoredEntry, Version};
use crate::{Record, SessionError, SessionStore, StorageKey, StoreError};

/// Name of the counter of loads, by `result`.
pub const LOADS: &str = "session_loads_total";
/// Name of the counter of new sessions stored.
pub const CREATES: &str = "session_creates_total";
/// Name of the counter of commits that saved changes.
pub const SAVES: &str = "session_saves_total";
/// Name of the counter of store calls answered with a version conflict, by `operation`.
pub const CONFLICTS: &str = "session_conflicts_total";
/// Name of the counter of replays of a request's changes onto a newer version.
pub const REPLAYS: &str = "session_replays_total";
/// Name of the counter of touches, by `result` (`done` or `skipped`).
pub const TOUCHES: &str = "session_touches_total";
/// Name of the counter of id cycles done.
pub const CYCLES: &str = "session_cycles_total";
/// Name of the counter of sessions destroyed.
pub const DESTROYS: &str = "session_destroys_total";
/// Name of the counter of commits whose changes were lost, by `status`.
pub const LOST_CHANGES: &str = "session_lost_changes_total";
/// Name of the counter of new ids that were already taken.
pub const ID_COLLISIONS: &str = "session_id_collisions_total";
/// Name of the counter of failures, by `kind`.
pub const ERRORS: &str = "session_errors_total";
/// Name of the histogram of store-call latency in seconds, by `operation`.
pub const STORE_OPERATION_SECONDS: &str = "session_store_operation_seconds";

/// Adds one to the counter `name` of `backend`, with one more label if given: for the rare
/// events (conflicts, failures, lost changes, collisions); the frequent ones go through the
/// keys a [`Meters`] made once.
pub(crate) fn count(
    backend: &'static str,
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
) {
    match label {
        None => metrics::counter!(name, "backend" => backend).increment(1),
        Some((key, value)) => {
            metrics::counter!(name, "backend" => backend, key => value).increment(1)
        }
    }
}

/// What the frequent events are registered with.
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The `result` labels of [`LOADS`], in the order of [`Meters::loads`].
const LOAD_RESULTS: [&str; 8] = [
    "hit",
    "miss",
    "expired",
    "undecodable",
    "moved",
    "no_cookie",
    "bad_cookie",
    "error",
];

/// A store call, for its span and the `operation` label of its latency.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Operation {
    Create,
    Load,
    Save,
    MarkMoved,
    Touch,
    Delete,
    DeleteIfVersion,
}

impl Operation {
    const ALL: [Self; 7] = [
        Self::Create,
        Self::Load,
        Self::Save,
        Self::MarkMoved,
        Self::Touch,
        Self::Delete,
        Self::DeleteIfVersion,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Load => "load",
            Self::Save => "save",
            Self::MarkMoved => "mark_moved",
            Self::Touch => "touch",
            Self::Delete => "delete",
            Self::DeleteIfVersion => "delete_if_version",
        }
    }
}

/// The keys of the metrics a request moves every time, made once per manager: building a key
/// (labels and hash) per event cost more than the rest of the metrics work put together.
struct Meters {
    loads: [metrics::Key; LOAD_RESULTS.len()],
    creates: metrics::Key,
    saves: metrics::Key,
    touches_done: metrics::Key,
    touches_skipped: metrics::Key,
    cycles_confirmed: metrics::Key,
    cycles_unconfirmed: metrics::Key,
    destroys: metrics::Key,
    replays: metrics::Key,
    latency: [metrics::Key; Operation::ALL.len()],
}

impl Meters {
    fn new(backend: &'static str) -> Self {
        let key = |name: &'static str, label: Option<(&'static str, &'static str)>| {
            let mut labels = vec![metrics::Label::new("backend", backend)];
            if let Some((key, value)) = label {
                labels.push(metrics::Label::new(key, value));
            }
            metrics::Key::from_parts(name, labels)
        };
        Self {
            loads: LOAD_RESULTS.map(|result| key(LOADS, Some(("result", result)))),
            creates: key(CREATES, None),
            saves: key(SAVES, None),
            touches_done: key(TOUCHES, Some(("result", "done"))),
            touches_skipped: key(TOUCHES, Some(("result", "skipped"))),
            cycles_confirmed: key(CYCLES, Some(("result", "confirmed"))),
            cycles_unconfirmed: key(CYCLES, Some(("result", "unconfirmed"))),
            destroys: key(DESTROYS, None),
            replays: key(REPLAYS, None),
            latency: Operation::ALL.map(|operation| {
                key(
                    STORE_OPERATION_SECONDS,
                    Some(("operation", operation.label())),
                )
            }),
        }
    }
}

/// Adds one to the counter `key`.
fn add(key: &metrics::Key) {
    metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA).increment(1));
}

/// A frequent event of the request flow, counted under the keys made once.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    /// A load, with its `result` label (one of [`LOAD_RESULTS`]).
    Load(&'static str),
    Create,
    Save,
    TouchDone,
    TouchSkipped,
    CycleConfirmed,
    CycleUnconfirmed,
    Destroy,
    Replay,
}

/// The label of a store error: `None` for the answers the contract defines (an existing entry,
/// a conflict, a missing entry), which are outcomes rather than failures.
fn store_error_kind(error: &StoreError) -> Option<&'static str> {
    match error {
        StoreError::AlreadyExists | StoreError::Conflict | StoreError::NotFound => None,
        StoreError::TooLarge { .. } => Some("too_large"),
        StoreError::InvalidTtl { .. } => Some("invalid_ttl"),
        StoreError::Full => Some("full"),
        StoreError::Encode(_) => Some("encode"),
        StoreError::Decode(_) => Some("decode"),
        StoreError::Timeout { .. } => Some("timeout"),
        StoreError::Backend { .. } => Some("backend"),
    }
}

/// The label of a failed commit or load that no store call accounts for (a store error was
/// counted when the call returned it).
pub(crate) fn session_error_kind(error: &SessionError) -> Option<&'static str> {
    match error {
        SessionError::Store(_) => None,
        SessionError::EncodeValue { .. } => Some("value_encode"),
        SessionError::DecodeValue { .. } => Some("value_decode"),
        SessionError::TooLarge { .. } => Some("too_large"),
        SessionError::ConflictRetriesExhausted { .. } => Some("retries_exhausted"),
        SessionError::IdCollisions => Some("id_draws_exhausted"),
        SessionError::Randomness(_) => Some("randomness"),
        SessionError::ConcurrentModification { .. } => Some("same_key_conflict"),
        _ => Some("misuse"),
    }
}

/// How a store call ended, for its span.
fn outcome_label<T>(result: &Result<T, StoreError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::AlreadyExists) => "already_exists",
        Err(StoreError::Conflict) => "conflict",
        Err(StoreError::NotFound) => "not_found",
        Err(error) => store_error_kind(error).unwrap_or("error"),
    }
}

/// Microseconds in `elapsed`, saturating.
pub(crate) fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

/// The manager's store: every call gets a span, a latency sample, and its conflict or
/// failure counted.
#[derive(Clone)]
pub(crate) struct ObservedStore {
    inner: Arc<dyn SessionStore>,
    backend: &'static str,
    meters: Arc<Meters>,
}

impl ObservedStore {
    pub(crate) fn new(inner: Arc<dyn SessionStore>) -> Self {
        let backend = inner.backend_name();
        Self {
            inner,
            backend,
            meters: Arc::new(Meters::new(backend)),
        }
    }

    /// Counts `event`.
    pub(crate) fn count(&self, event: Event) {
        let meters = &*self.meters;
        let key = match event {
            Event::Load(result) => {
                let Some(at) = LOAD_RESULTS.iter().position(|r| *r == result) else {
                    debug_assert!(false, "an undocumented load result: {result}");
                    return;
                };
                &meters.loads[at]
            }
            Event::Create => &meters.creates,
            Event::Save => &meters.saves,
            Event::TouchDone => &meters.touches_done,
            Event::TouchSkipped => &meters.touches_skipped,
            Event::CycleConfirmed => &meters.cycles_confirmed,
            Event::CycleUnconfirmed => &meters.cycles_unconfirmed,
            Event::Destroy => &meters.destroys,
            Event::Replay => &meters.replays,
        };
        add(key);
    }

    /// The wrapped store.
    pub(crate) fn inner(&self) -> &Arc<dyn SessionStore> {
        &self.inner
    }

    /// The store's backend label.
    pub(crate) fn backend(&self) -> &'static str {
        self.backend
    }

    async fn observe<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = tracing::debug_span!(
            "session.store",
            backend = self.backend,
            operation = operation.label(),
            outcome = tracing::field::Empty,
            elapsed_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = call.instrument(span.clone()).await;
        let elapsed = started.elapsed();
        span.record("outcome", outcome_label(&result));
        span.record("elapsed_us", micros(elapsed));
        let latency = &self.meters.latency[operation as usize];
        metrics::with_recorder(|recorder| {
            recorder
                .register_histogram(latency, &METADATA)
                .record(elapsed.as_secs_f64());
        });
        match &result {
            Err(StoreError::Conflict) => count(
                self.backend,
                CONFLICTS,
                Some(("operation", operation.label())),
            ),
            Err(error) => {
                if let Some(kind) = store_error_kind(error) {
                    count(self.backend, ERRORS, Some(("kind", kind)));
                }
            }
            Ok(_) => {}
        }
        result
    }

    pub(crate) async fn create(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        self.observe(Operation::Create, self.inner.create(key, record, ttl))
            .await
    }

    pub(crate) async fn load_entry(
        &self,
        key: &StorageKey,
    ) -> Result<Option<StoredEntry>, StoreError> {
        self.observe(Operation::Load, self.inner.load_entry(key))
            .await
    }

    pub(crate) async fn save(
        &self,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        self.observe(Operation::Save, self.inner.save(key, record, ttl, version))
            .await
    }

    pub(crate) async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.observe(
            Operation::MarkMoved,
            self.inner.mark_moved(key, version, to, ttl),
        )
        .await
    }

    pub(crate) async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        self.observe(Operation::Touch, self.inner.touch(key, ttl))
            .await
    }

    pub(crate) async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.observe(Operation::Delete, self.inner.delete(key))
            .await
    }

    pub(crate) async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.observe(
            Operation::DeleteIfVersion,
            self.inner.delete_if_version(key, version),
        )
        .await
    }
}
