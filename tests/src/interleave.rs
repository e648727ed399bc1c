//! Deterministic interleavings of concurrent requests on one session, and the invariants every
//! one of them must keep.
//!
//! [`PausingStore`] wraps a store and pauses each request's store calls twice: before the call
//! (the call has not happened yet) and after it (the call took effect, the request has not
//! seen the answer). A scheduler decides, at every pause, which paused request goes on; only
//! one request runs at a time, so a schedule is a sequence of choices and replays exactly.
//!
//! - [`Harness::explore_all`] runs **every** schedule of a set of requests, by depth-first search over
//!   the choices (each run replays a prefix of the previous one and takes the next untried
//!   choice at the deepest point that has one).
//! - [`Harness::explore_random`] runs schedules drawn from a seeded generator.
//!
//! By default the scheduler branches at before-pauses and lets a request that just made a
//! call go on at once to its next call: what a request does between two store calls touches
//! no shared state, so branching there as well repeats schedules already run (the same order of
//! store calls). [`Exploration::branch_after_calls`] branches at after-pauses too.
//!
//! After each schedule, [`Harness::check`] tests the invariants ([`Invariant`]): no request fails; every
//! `update` acknowledged is applied exactly once and every lost one not at all; every
//! acknowledged `insert` is present unless a destroy ended the session, and no lost one is;
//! a destroyed session stays ended; at most one live entry per session lineage; the cookie the
//! browser keeps last loads the live session or is a removal; changes are lost only when a
//! destroy or an id cycle explains it; of concurrent `insert`s of one value, the last to commit
//! wins; after a login, no CSRF token rendered for the id before it verifies, and without one
//! the token stored first does.
//!
//! The browser applies `Set-Cookie` headers in the order the requests made their last store
//! call: a response leaves when its commit is done. (A response held back on the network after
//! its commit finished can still arrive late; no server can order that, and sending
//! `Set-Cookie` only when the cookie changes makes it rare.)

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use session_core::{
    CommitOutcome, CommitStatus, KeyPrefix, KeyRing, Record, SameKeyConflict, SessionConfig,
    SessionError, SessionId, SessionManager, SessionStore, SigningKey, StorageKey, StoreError,
    StoredEntry, Version, codec,
};
use tokio::sync::{mpsc, oneshot};

tokio::task_local! {
    /// The index of the request the current task runs; store calls outside a request pass
    /// through without pausing.
    static REQUEST: usize;
}

/// The idle timeout of the sessions the schedules work on.
const IDLE: Duration = Duration::from_secs(60);
/// The TTL the session starts with: below [`DUE`], above [`NOT_DUE`] (with a second of
/// rounding on whole-second backends).
const INITIAL_TTL: Duration = Duration::from_secs(30);
/// A touch threshold under which the session is due for a touch (and a cookie refresh).
const DUE: Duration = Duration::from_secs(60);
/// A touch threshold under which it is not.
const NOT_DUE: Duration = Duration::from_secs(5);
/// The longest a step of a schedule may take before the harness calls it hung.
const STEP_LIMIT: Duration = Duration::from_secs(20);

/// What one request of a schedule does with the session (all start with the same cookie).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    /// Reads the counter; its session is not due for a touch: nothing to write.
    ReadOnly,
    /// Inserts a value of its own (`own-<n>`); saves without pushing the expiry back.
    InsertOwn,
    /// Inserts `shared` = `r<n>`, a value other requests insert too; due, so its save pushes
    /// the expiry back and refreshes the cookie.
    InsertSame,
    /// Counts `counter` up by one with `Session::update`; due.
    UpdateSame,
    /// Logs in: inserts `login-<n>` and cycles the id.
    Cycle,
    /// Logs out: destroys the session.
    Destroy,
    /// Reads the counter with the session past its touch threshold: touches it and refreshes
    /// the cookie.
    UnchangedPastThreshold,
    /// Renders a form: takes the session's CSRF token (`Session::csrf_token`), making the
    /// session's first one. Not in [`ALL`](Self::ALL): explored with logins in a test of its
    /// own ([`Invariant::CsrfTokenRotatesWithTheId`]).
    RenderForm,
}

impl RequestKind {
    /// Every kind.
    pub const ALL: [RequestKind; 7] = [
        Self::ReadOnly,
        Self::InsertOwn,
        Self::InsertSame,
        Self::UpdateSame,
        Self::Cycle,
        Self::Destroy,
        Self::UnchangedPastThreshold,
    ];

    fn due(self) -> bool {
        matches!(
            self,
            Self::InsertSame | Self::UpdateSame | Self::UnchangedPastThreshold
        )
    }
}

/// Where a request is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Before,
    After,
}

enum Event {
    Paused {
        request: usize,
        phase: Phase,
        resume: oneshot::Sender<()>,
    },
    Finished,
}

/// One store call as it happened.
#[derive(Clone, Debug)]
pub struct Call {
    /// The request that made it.
    pub request: usize,
    /// The operation.
    pub operation: &'static str,
    /// How it ended: `ok`, or the error's kind.
    pub outcome: &'static str,
}

/// What a schedule's store calls left behind, shared by the wrapper's clones.
#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    /// Every key a request created, with the request.
    created: Vec<(usize, StorageKey)>,
}

/// A store wrapper that pauses every call of a request before and after it; see the
/// [module documentation](self).
#[derive(Clone)]
pub struct PausingStore<S> {
    inner: S,
    events: mpsc::UnboundedSender<Event>,
    log: Arc<Mutex<Log>>,
}

impl<S> PausingStore<S> {
    async fn pause(&self, request: usize, phase: Phase) {
        let (resume, resumed) = oneshot::channel();
        let event = Event::Paused {
            request,
            phase,
            resume,
        };
        if self.events.send(event).is_ok() {
            // The scheduler always resumes or is gone (then the schedule is over).
            let _ = resumed.await;
        }
    }

    async fn around<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Ok(request) = REQUEST.try_with(|r| *r) else {
            return call.await;
        };
        self.pause(request, Phase::Before).await;
        let result = call.await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(StoreError::Conflict) => "conflict",
            Err(StoreError::NotFound) => "not found",
            Err(StoreError::AlreadyExists) => "exists",
            Err(_) => "error",
        };
        self.log.lock().expect("log").calls.push(Call {
            request,
            operation,
            outcome,
        });
        self.pause(request, Phase::After).await;
        result
    }
}

#[async_trait]
impl<S: SessionStore> SessionStore for PausingStore<S> {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        if let Ok(request) = REQUEST.try_with(|r| *r) {
            self.log
                .lock()
                .expect("log")
                .created
                .push((request, k.clone()));
        }
        self.around("create", self.inner.create(k, r, t)).await
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.around("load", self.inner.load_entry(key)).await
    }

    async fn save(
        &self,
        k: &StorageKey,
        r: &Record,
        t: Duration,
        v: Version,
    ) -> Result<Version, StoreError> {
        self.around("save", self.inner.save(k, r, t, v)).await
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.around("mark_moved", self.inner.mark_moved(key, version, to, ttl))
            .await
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        self.around("touch", self.inner.touch(key, ttl)).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.around("delete", self.inner.delete(key)).await
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.around(
            "delete_if_version",
            self.inner.delete_if_version(key, version),
        )
        .await
    }

    fn max_record_size(&self) -> usize {
        self.inner.max_record_size()
    }

    fn max_key_len(&self) -> Option<usize> {
        self.inner.max_key_len()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}

/// Picks the request to resume at each choice point.
trait Chooser {
    /// One of `0..options`.
    fn choose(&mut self, options: usize) -> usize;
}

/// Replays a recorded prefix of choices, then takes the first option; records every choice.
struct Replay {
    prefix: Vec<(usize, usize)>,
    taken: Vec<(usize, usize)>,
}

impl Chooser for Replay {
    fn choose(&mut self, options: usize) -> usize {
        let at = self.taken.len();
        let choice = match self.prefix.get(at) {
            Some(&(choice, recorded)) => {
                assert_eq!(
                    recorded, options,
                    "schedule not deterministic: choice point {at} had {recorded} options, now {options}"
                );
                choice
            }
            None => 0,
        };
        self.taken.push((choice, options));
        choice
    }
}

/// A small seeded generator (xorshift64*), so schedules replay from their seed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Chooser for Seeded {
    fn choose(&mut self, options: usize) -> usize {
        (self.next() % options as u64) as usize
    }
}

/// How schedules are run.
#[derive(Clone, Copy, Debug)]
pub struct Exploration {
    /// Branch at after-pauses too (see the module documentation).
    pub branch_after_calls: bool,
    /// What an `insert` meeting a concurrent change of the same value does.
    pub same_key: SameKeyConflict,
}

impl Default for Exploration {
    fn default() -> Self {
        Self {
            branch_after_calls: false,
            same_key: SameKeyConflict::LastWriterWins,
        }
    }
}

/// One invariant of [`Harness::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// A request's commit failed.
    NoRequestFails,
    /// The counter differs from the number of acknowledged updates.
    UpdatesAppliedExactlyOnce,
    /// An acknowledged insert is missing from the live session.
    AcknowledgedInsertsKept,
    /// A change reported lost is in the live session anyway.
    LostChangesNotWritten,
    /// A destroyed session, or an id that moved, still loads.
    EndedSessionsStayEnded,
    /// More than one live entry of the session.
    AtMostOneLiveEntry,
    /// The cookie the browser keeps last neither loads the live session nor removes it.
    LastCookieLoadsTheLiveSession,
    /// A request's changes were lost though no destroy or id cycle explains it.
    NoSpuriousEnd,
    /// Of concurrent inserts of one value, the last to commit did not win.
    LastWriterWins,
    /// After a login, a CSRF token a page rendered for the id before it verifies in the
    /// logged-in session; or, without a login, no rendered token verifies though one was saved.
    CsrfTokenRotatesWithTheId,
}

/// A broken invariant, with what showed it.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// What was seen.
    pub detail: String,
}

/// What one request's commit came to.
#[derive(Debug)]
pub struct RequestResult {
    /// What it did.
    pub kind: RequestKind,
    /// The commit's outcome or error.
    pub result: Result<CommitOutcome, SessionError>,
    /// The masked CSRF token a [`RequestKind::RenderForm`] rendered.
    pub csrf_token: Option<String>,
}

/// One schedule as it ran: the requests, the store calls in order, and the outcomes.
pub struct ScheduleRun {
    /// The requests and what their commits came to.
    pub requests: Vec<RequestResult>,
    /// The store calls, in the order they happened.
    pub calls: Vec<Call>,
    /// The original session's key.
    original: StorageKey,
    /// Every key a request created, with the request.
    created: Vec<(usize, StorageKey)>,
    /// The cookie every request started with.
    initial_cookie: String,
}

impl fmt::Debug for ScheduleRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "requests:")?;
        for (index, request) in self.requests.iter().enumerate() {
            let result = match &request.result {
                Ok(outcome) => format!(
                    "{:?}{}{}",
                    outcome.status,
                    if outcome.lost_changes { " (lost)" } else { "" },
                    match &outcome.cookie {
                        Some(c) if c.is_removal() => " + removal cookie",
                        Some(_) => " + cookie",
                        None => "",
                    }
                ),
                Err(error) => format!("error: {error}"),
            };
            writeln!(f, "  #{index} {:?}: {result}", request.kind)?;
        }
        writeln!(f, "store calls:")?;
        for call in &self.calls {
            writeln!(
                f,
                "  #{} {} -> {}",
                call.request, call.operation, call.outcome
            )?;
        }
        Ok(())
    }
}

/// The fixed parts of every schedule: the store and the signing keys.
pub struct Harness<S> {
    store: S,
    keys: KeyRing,
    exploration: Exploration,
}

impl<S: SessionStore + Clone + 'static> Harness<S> {
    /// A harness over `store`.
    pub fn new(store: S, exploration: Exploration) -> Self {
        Self {
            store,
            keys: KeyRing::single(SigningKey::generate().expect("the OS RNG works")),
            exploration,
        }
    }

    fn config(&self, threshold: Duration) -> SessionConfig {
        SessionConfig::new(self.keys.clone())
            .idle_timeout(IDLE)
            .touch_threshold(threshold)
            .same_key_conflicts(self.exploration.same_key)
    }

    /// A manager straight on the store (no pauses), for setting up and checking.
    fn plain_manager(&self) -> SessionManager {
        SessionManager::new(Arc::new(self.store.clone()), self.config(NOT_DUE))
            .expect("valid config")
    }

    /// Runs one schedule of `kinds`, resuming requests as `chooser` says.
    async fn run(&self, kinds: &[RequestKind], chooser: &mut dyn Chooser) -> ScheduleRun {
        // The session every request starts from.
        let id = SessionId::generate().expect("the OS RNG works");
        let key = StorageKey::derive(&KeyPrefix::default(), &id);
        let mut record = Record::new(SystemTime::now());
        record.set_value("counter", codec::encode_value(&0u32).expect("encodes"));
        record.set_value("shared", codec::encode_value("initial").expect("encodes"));
        self.store
            .create(&key, &record, INITIAL_TTL)
            .await
            .expect("the initial session is stored");
        let cookie = self.keys.sign("session", &id);

        let (events, mut received) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Log::default()));
        let pausing = PausingStore {
            inner: self.store.clone(),
            events: events.clone(),
            log: Arc::clone(&log),
        };
        let mut handles = Vec::new();
        for (index, kind) in kinds.iter().copied().enumerate() {
            let threshold = if kind.due() { DUE } else { NOT_DUE };
            let manager = SessionManager::new(Arc::new(pausing.clone()), self.config(threshold))
                .expect("valid config");
            let (cookie, events) = (cookie.clone(), events.clone());
            handles.push(tokio::spawn(REQUEST.scope(index, async move {
                let result = run_request(&manager, &cookie, kind, index).await;
                let _ = events.send(Event::Finished);
                result
            })));
        }
        drop(events);

        let mut running = kinds.len();
        let mut paused: BTreeMap<usize, (Phase, oneshot::Sender<()>)> = BTreeMap::new();
        loop {
            while running > 0 {
                let event = tokio::time::timeout(STEP_LIMIT, received.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "a request hung; calls so far: {:?}",
                            log.lock().expect("log").calls
                        )
                    })
                    .expect("requests report before they end");
                running -= 1;
                if let Event::Paused {
                    request,
                    phase,
                    resume,
                } = event
                {
                    paused.insert(request, (phase, resume));
                }
            }
            let forced = if self.exploration.branch_after_calls {
                None
            } else {
                paused
                    .iter()
                    .find(|(_, (phase, _))| *phase == Phase::After)
                    .map(|(request, _)| *request)
            };
            let next = match forced {
                Some(request) => request,
                None if paused.is_empty() => break,
                None if paused.len() == 1 => *paused.keys().next().expect("one"),
                None => {
                    let choice = chooser.choose(paused.len());
                    *paused.keys().nth(choice).expect("in range")
                }
            };
            let (_, resume) = paused.remove(&next).expect("paused");
            let _ = resume.send(());
            running = 1;
        }

        let mut requests = Vec::new();
        for (handle, kind) in handles.into_iter().zip(kinds) {
            let (result, csrf_token) = handle.await.expect("a request panicked");
            requests.push(RequestResult {
                kind: *kind,
                result,
                csrf_token,
            });
        }
        let log = std::mem::take(&mut *log.lock().expect("log"));
        ScheduleRun {
            requests,
            calls: log.calls,
            original: key,
            created: log.created,
            initial_cookie: cookie,
        }
    }

    /// Removes what a schedule left in the store.
    async fn clean_up(&self, run: &ScheduleRun) {
        let created = run.created.iter().map(|(_, key)| key);
        for key in std::iter::once(&run.original).chain(created) {
            let _ = self.store.delete(key).await;
        }
    }

    /// Checks the invariants of the module documentation after `run`.
    pub async fn check(&self, run: &ScheduleRun) -> Result<(), Violation> {
        check(self, run).await
    }
}

/// Runs one request; also returns the CSRF token a [`RequestKind::RenderForm`] rendered.
async fn run_request(
    manager: &SessionManager,
    cookie: &str,
    kind: RequestKind,
    index: usize,
) -> (Result<CommitOutcome, SessionError>, Option<String>) {
    let mut csrf_token = None;
    let result = async {
        let mut session = manager.load(Some(cookie)).await?;
        if kind == RequestKind::RenderForm {
            csrf_token = Some(session.csrf_token()?);
        }
        act(&mut session, kind, index)?;
        manager.commit(session).await
    }
    .await;
    (result, csrf_token)
}

/// What a request of `kind` does to its session before the commit.
fn act(
    session: &mut session_core::Session,
    kind: RequestKind,
    index: usize,
) -> Result<(), SessionError> {
    match kind {
        RequestKind::ReadOnly | RequestKind::UnchangedPastThreshold => {
            session.get::<u32>("counter")?;
        }
        RequestKind::InsertOwn => session.insert(&format!("own-{index}"), &index)?,
        RequestKind::InsertSame => session.insert("shared", &format!("r{index}"))?,
        RequestKind::UpdateSame => {
            session.update("counter", |n: Option<u32>| n.unwrap_or(0) + 1)?;
        }
        RequestKind::Cycle => {
            session.insert(&format!("login-{index}"), &index)?;
            session.cycle_id();
        }
        RequestKind::Destroy => session.destroy(),
        RequestKind::RenderForm => {}
    }
    Ok(())
}

fn violation(invariant: Invariant, detail: impl Into<String>) -> Result<(), Violation> {
    Err(Violation {
        invariant,
        detail: detail.into(),
    })
}

/// The invariants; see the module documentation.
async fn check<S: SessionStore + Clone + 'static>(
    harness: &Harness<S>,
    run: &ScheduleRun,
) -> Result<(), Violation> {
    let outcomes: Vec<Option<&CommitOutcome>> = run
        .requests
        .iter()
        .map(|r| r.result.as_ref().ok())
        .collect();
    let status = |index: usize| outcomes[index].map(|o| o.status);
    let kind = |index: usize| run.requests[index].kind;
    let count = run.requests.len();

    for (index, request) in run.requests.iter().enumerate() {
        match &request.result {
            Ok(_) => {}
            Err(SessionError::ConcurrentModification { .. })
                if harness.exploration.same_key == SameKeyConflict::Fail
                    && request.kind == RequestKind::InsertSame => {}
            Err(error) => {
                return violation(Invariant::NoRequestFails, format!("#{index}: {error}"));
            }
        }
    }

    // The session's lineage: the original entry and what id cycles moved it to. A request
    // whose cookie named an ended session starts a fresh one of its own (status `Created`).
    let mut lineage = vec![run.original.clone()];
    let mut fresh = Vec::new();
    for (creator, key) in &run.created {
        match status(*creator) {
            Some(CommitStatus::Created) => fresh.push((*creator, key.clone())),
            _ => lineage.push(key.clone()),
        }
    }
    let live = live_sessions(&harness.store, &lineage).await?;
    if live.len() > 1 {
        return violation(
            Invariant::AtMostOneLiveEntry,
            format!("{} live entries of one session", live.len()),
        );
    }
    let destroyed = (0..count)
        .any(|i| kind(i) == RequestKind::Destroy && status(i) == Some(CommitStatus::Destroyed));
    if destroyed && !live.is_empty() {
        return violation(
            Invariant::EndedSessionsStayEnded,
            "a destroy was acknowledged, and the session still loads",
        );
    }
    let cycled = (0..count).any(|i| status(i) == Some(CommitStatus::Cycled));
    if cycled && live.first().is_some_and(|(key, _)| *key == run.original) {
        return violation(
            Invariant::EndedSessionsStayEnded,
            "an id cycle was acknowledged, and the old id still loads",
        );
    }

    // A fresh session holds its creator's change and nothing of the ended one.
    let live_fresh = live_sessions(
        &harness.store,
        &fresh.iter().map(|(_, key)| key.clone()).collect::<Vec<_>>(),
    )
    .await?;
    for (key, record) in &live_fresh {
        let creator = fresh
            .iter()
            .find(|(_, k)| k == key)
            .map(|(c, _)| *c)
            .expect("known");
        let own = match kind(creator) {
            RequestKind::InsertOwn => format!("own-{creator}"),
            RequestKind::InsertSame => "shared".to_owned(),
            RequestKind::UpdateSame => "counter".to_owned(),
            RequestKind::Cycle => format!("login-{creator}"),
            other => {
                return violation(
                    Invariant::EndedSessionsStayEnded,
                    format!("#{creator} ({other:?}) created a session"),
                );
            }
        };
        let names: Vec<&str> = record.names().collect();
        if names != [own.as_str()] {
            return violation(
                Invariant::EndedSessionsStayEnded,
                format!("#{creator}'s new session holds {names:?}, not only {own}"),
            );
        }
        if kind(creator) == RequestKind::UpdateSame
            && record.value("counter").map(decode::<u32>) != Some(1)
        {
            return violation(
                Invariant::UpdatesAppliedExactlyOnce,
                "an update on a new session did not start from nothing",
            );
        }
    }

    if let Some((_, record)) = live.first() {
        let applied = |index: usize| {
            matches!(
                status(index),
                Some(CommitStatus::Saved | CommitStatus::Followed | CommitStatus::Cycled)
            )
        };
        // Updates: exactly the acknowledged ones that reached the session.
        let updates = (0..count)
            .filter(|&i| kind(i) == RequestKind::UpdateSame && applied(i))
            .count() as u32;
        let counter = record.value("counter").map(decode::<u32>);
        if counter != Some(updates) {
            return violation(
                Invariant::UpdatesAppliedExactlyOnce,
                format!("counter {counter:?}, acknowledged updates {updates}"),
            );
        }
        // Inserts of values of their own: present when acknowledged, absent otherwise.
        for index in 0..count {
            let name = match kind(index) {
                RequestKind::InsertOwn => format!("own-{index}"),
                RequestKind::Cycle => format!("login-{index}"),
                _ => continue,
            };
            let present = record.value(&name).is_some();
            if applied(index) && !present {
                return violation(
                    Invariant::AcknowledgedInsertsKept,
                    format!("#{index}'s {name} is missing"),
                );
            }
            if !applied(index) && present {
                return violation(
                    Invariant::LostChangesNotWritten,
                    format!("#{index}'s {name} was not acknowledged and is stored"),
                );
            }
        }
        // Inserts of one shared value: the last acknowledged one wins.
        let last_writer = last_call_order(run)
            .into_iter()
            .rev()
            .find(|&i| kind(i) == RequestKind::InsertSame && applied(i));
        let expected = last_writer.map_or("initial".to_owned(), |i| format!("r{i}"));
        let shared = record.value("shared").map(decode::<String>);
        if shared.as_deref() != Some(expected.as_str()) {
            return violation(
                Invariant::LastWriterWins,
                format!("shared is {shared:?}, the last acknowledged insert wrote {expected:?}"),
            );
        }
    }

    // The cookie the browser keeps: every Set-Cookie, in the order the requests finished.
    let mut browser = Some(run.initial_cookie.clone());
    for index in last_call_order(run) {
        if let Some(cookie) = outcomes[index].and_then(|o| o.cookie.as_ref()) {
            browser = (!cookie.is_removal()).then(|| cookie.value.clone());
        }
    }
    if let Some(cookie) = browser {
        let names = harness
            .keys
            .verify("session", &cookie)
            .map(|verified| StorageKey::derive(&KeyPrefix::default(), verified.id()));
        let reaches_live = names.is_some_and(|key| {
            live.iter()
                .chain(&live_fresh)
                .any(|(live_key, _)| *live_key == key)
        });
        let loads = harness
            .plain_manager()
            .load(Some(&cookie))
            .await
            .map_err(|e| Violation {
                invariant: Invariant::NoRequestFails,
                detail: format!("checking: {e}"),
            })?;
        if !reaches_live || loads.is_new() {
            return violation(
                Invariant::LastCookieLoadsTheLiveSession,
                "the cookie the browser keeps last loads no live session",
            );
        }
    }

    check_csrf_tokens(harness, run).await?;

    // Lost changes: only a destroy, a competing cycle, or a move before the request loaded
    // explains them. (A request without changes may find its session moved: nothing is lost.)
    let any_destroy = (0..count).any(|i| kind(i) == RequestKind::Destroy);
    if !any_destroy {
        let first_mark = run
            .calls
            .iter()
            .position(|c| c.operation == "mark_moved" && c.outcome == "ok");
        for (index, outcome) in outcomes.iter().enumerate() {
            if outcome.is_none_or(|o| !o.lost_changes) {
                continue;
            }
            let loaded_at = run.calls.iter().position(|c| c.request == index);
            let stale = matches!((first_mark, loaded_at), (Some(m), Some(l)) if l > m);
            let lost_a_cycle_race = kind(index) == RequestKind::Cycle
                && (0..count).any(|other| other != index && kind(other) == RequestKind::Cycle);
            if !stale && !lost_a_cycle_race {
                return violation(
                    Invariant::NoSpuriousEnd,
                    format!("#{index} ({:?}) ended", kind(index)),
                );
            }
        }
    }
    Ok(())
}

/// [`Invariant::CsrfTokenRotatesWithTheId`]: every request started with the cookie of before
/// any login, so after an acknowledged login none of the tokens rendered may verify in the
/// logged-in session; without one, if a rendering request saved, the token stored first (one
/// of those rendered) verifies.
async fn check_csrf_tokens<S: SessionStore + Clone + 'static>(
    harness: &Harness<S>,
    run: &ScheduleRun,
) -> Result<(), Violation> {
    let tokens: Vec<&str> = run
        .requests
        .iter()
        .filter_map(|r| r.csrf_token.as_deref())
        .collect();
    if tokens.is_empty() {
        return Ok(());
    }
    let outcome = |r: &RequestResult| r.result.as_ref().ok().cloned();
    let login = run
        .requests
        .iter()
        .filter_map(outcome)
        .find(|o| o.status == CommitStatus::Cycled);
    let (cookie, after_login) = match &login {
        Some(login) => (
            login
                .cookie
                .as_ref()
                .map(|c| c.value.clone())
                .unwrap_or_default(),
            true,
        ),
        None => (run.initial_cookie.clone(), false),
    };
    let session = harness
        .plain_manager()
        .load(Some(&cookie))
        .await
        .map_err(|e| Violation {
            invariant: Invariant::NoRequestFails,
            detail: format!("checking: {e}"),
        })?;
    let verifying = tokens
        .iter()
        .filter(|t| session.verify_csrf_token(t))
        .count();
    let saved = run.requests.iter().any(|r| {
        r.kind == RequestKind::RenderForm
            && outcome(r).is_some_and(|o| o.status == CommitStatus::Saved)
    });
    let destroyed = run.requests.iter().any(|r| r.kind == RequestKind::Destroy);
    if after_login && verifying > 0 {
        return violation(
            Invariant::CsrfTokenRotatesWithTheId,
            format!("{verifying} token(s) rendered before the login verify after it"),
        );
    }
    if !after_login && saved && !destroyed && verifying == 0 {
        return violation(
            Invariant::CsrfTokenRotatesWithTheId,
            "a rendering request saved its token, and no rendered token verifies",
        );
    }
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
    codec::decode_value(bytes).expect("the harness's own values decode")
}

/// The keys among `keys` that hold a live session, with their records.
async fn live_sessions<S: SessionStore>(
    store: &S,
    keys: &[StorageKey],
) -> Result<Vec<(StorageKey, Record)>, Violation> {
    let mut live = Vec::new();
    for key in keys {
        let entry = store.load_entry(key).await.map_err(|e| Violation {
            invariant: Invariant::NoRequestFails,
            detail: format!("checking: {e}"),
        })?;
        if let Some(StoredEntry::Session(loaded)) = entry {
            live.push((key.clone(), loaded.record));
        }
    }
    Ok(live)
}

/// Request indices ordered by their last store call (requests without one first).
fn last_call_order(run: &ScheduleRun) -> Vec<usize> {
    let mut order: Vec<(Option<usize>, usize)> = (0..run.requests.len())
        .map(|index| {
            let last = run.calls.iter().rposition(|c| c.request == index);
            (last, index)
        })
        .collect();
    order.sort();
    order.into_iter().map(|(_, index)| index).collect()
}

/// What a set of explored schedules came to.
#[derive(Debug, Default)]
pub struct Report {
    /// How many schedules ran.
    pub schedules: usize,
    /// How many commits reported lost changes.
    pub lost_writes: usize,
    /// How many commits followed a move to a new id.
    pub followed: usize,
    /// How many commits failed with a same-key conflict (under [`SameKeyConflict::Fail`]).
    pub same_key_failures: usize,
    /// The first broken invariant, with its schedule.
    pub violation: Option<(Violation, String)>,
}

impl Report {
    fn record(&mut self, run: &ScheduleRun, checked: Result<(), Violation>) {
        self.schedules += 1;
        for request in &run.requests {
            match &request.result {
                Ok(o) if o.lost_changes => self.lost_writes += 1,
                Ok(o) if o.status == CommitStatus::Followed => self.followed += 1,
                Err(SessionError::ConcurrentModification { .. }) => self.same_key_failures += 1,
                _ => {}
            }
        }
        if let (Err(violation), None) = (checked, &self.violation) {
            self.violation = Some((violation, format!("{run:?}")));
        }
    }

    /// Panics with the schedule when an invariant broke.
    pub fn assert_clean(&self) {
        if let Some((violation, schedule)) = &self.violation {
            panic!(
                "{:?} broken after {} schedules: {}\n{schedule}",
                violation.invariant, self.schedules, violation.detail
            );
        }
    }
}

impl<S: SessionStore + Clone + 'static> Harness<S> {
    /// Runs one schedule, checks it into `report` and removes what it stored; whether every
    /// invariant held.
    async fn run_checked(
        &self,
        kinds: &[RequestKind],
        chooser: &mut dyn Chooser,
        report: &mut Report,
    ) -> bool {
        let run = self.run(kinds, chooser).await;
        let checked = self.check(&run).await;
        let held = checked.is_ok();
        report.record(&run, checked);
        self.clean_up(&run).await;
        held
    }

    /// Runs every schedule of `kinds` (until the first broken invariant).
    pub async fn explore_all(&self, kinds: &[RequestKind], report: &mut Report) {
        let mut prefix: Vec<(usize, usize)> = Vec::new();
        loop {
            let mut chooser = Replay {
                prefix: std::mem::take(&mut prefix),
                taken: Vec::new(),
            };
            if !self.run_checked(kinds, &mut chooser, report).await {
                return;
            }
            prefix = chooser.taken;
            // The next schedule: the deepest choice point with an untried option.
            while let Some((choice, options)) = prefix.pop() {
                if choice + 1 < options {
                    prefix.push((choice + 1, options));
                    break;
                }
            }
            if prefix.is_empty() {
                return;
            }
        }
    }

    /// Runs `count` schedules, each of `requests` requests of kinds drawn at random, with
    /// random choices, all from `seed` (until the first broken invariant).
    pub async fn explore_random(
        &self,
        requests: usize,
        count: usize,
        seed: u64,
        report: &mut Report,
    ) {
        let mut random = Seeded(seed | 1);
        for _ in 0..count {
            let kinds: Vec<RequestKind> = (0..requests)
                .map(|_| RequestKind::ALL[random.choose(RequestKind::ALL.len())])
                .collect();
            if !self.run_checked(&kinds, &mut random, report).await {
                return;
            }
        }
    }
}

/// Every unordered pair of request kinds (with repeats): 28 pairs.
pub fn all_pairs() -> Vec<[RequestKind; 2]> {
    let mut pairs = Vec::new();
    for (i, a) in RequestKind::ALL.iter().enumerate() {
        for b in &RequestKind::ALL[i..] {
            pairs.push([*a, *b]);
        }
    }
    pairs
}
