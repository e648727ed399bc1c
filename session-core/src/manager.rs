//! [`SessionManager`]: the request flow from cookie to store and back to a cookie directive.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

use crate::codec;
use crate::config::{SameKeyConflict, SameSite, SessionConfig};
use crate::csrf;
use crate::error::{ConfigError, SessionError, StoreError};
use crate::id::{SessionId, StorageKey};
use crate::observe::{self, Event, ObservedStore};
use crate::record::Record;
use crate::session::{Origin, Session, StoredSession};
use crate::signing::VerifiedCookie;
use crate::store::{LoadedRecord, MIN_TTL, SessionStore, StoredEntry, Version};

/// How many ids `create` draws before giving up on collisions.
const MAX_ID_DRAWS: u32 = 4;

/// What the response must do with the session cookie, independent of any web framework.
#[derive(Clone, PartialEq, Eq)]
pub struct CookieDirective {
    /// The cookie's name.
    pub name: String,
    /// The signed value; empty when the cookie is to be removed.
    pub value: String,
    /// `Max-Age`: `None` for a browser-session cookie, zero to remove the cookie.
    pub max_age: Option<Duration>,
    /// `Path`.
    pub path: String,
    /// `Domain`, if any.
    pub domain: Option<String>,
    /// `Secure`.
    pub secure: bool,
    /// `HttpOnly`.
    pub http_only: bool,
    /// `SameSite`.
    pub same_site: SameSite,
    /// `Partitioned`.
    pub partitioned: bool,
}

impl CookieDirective {
    /// Whether this directive removes the cookie.
    pub fn is_removal(&self) -> bool {
        self.value.is_empty()
    }

    /// The directive as the value of a `Set-Cookie` header (formatted by the `cookie` crate;
    /// a removal carries `Max-Age=0` and an `Expires` in 1970 for old clients).
    pub fn to_header_value(&self) -> String {
        use cookie::time::{Duration as CookieDuration, OffsetDateTime};
        let mut built = cookie::Cookie::build((self.name.as_str(), self.value.as_str()))
            .path(self.path.as_str())
            .secure(self.secure)
            .http_only(self.http_only)
            .same_site(match self.same_site {
                SameSite::Strict => cookie::SameSite::Strict,
                SameSite::Lax => cookie::SameSite::Lax,
                SameSite::None => cookie::SameSite::None,
            });
        if self.partitioned {
            built = built.partitioned(true);
        }
        if let Some(domain) = &self.domain {
            built = built.domain(domain.as_str());
        }
        if let Some(max_age) = self.max_age {
            let seconds = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
            built = built.max_age(CookieDuration::seconds(seconds));
            if self.is_removal() {
                built = built.expires(OffsetDateTime::UNIX_EPOCH);
            }
        }
        built.build().to_string()
    }
}

impl fmt::Debug for CookieDirective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieDirective")
            .field("name", &self.name)
            .field(
                "value",
                &if self.value.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// A request's session cookie, found among its `Cookie` headers and verified once by
/// [`SessionManager::verify_request_cookie`]; [`SessionManager::load_request`] takes it.
#[derive(Clone, Debug)]
pub struct RequestCookie {
    /// The cookie that verified; `None` for a cookie of the session's name that the manager
    /// did not sign.
    verified: Option<VerifiedCookie>,
}

impl RequestCookie {
    /// Whether the cookie is one the manager signed.
    pub fn is_valid(&self) -> bool {
        self.verified.is_some()
    }

    /// The cookie, if it verified.
    pub fn verified(&self) -> Option<&VerifiedCookie> {
        self.verified.as_ref()
    }
}

/// The value of the first cookie named `name` in a `Cookie` request header
/// (`a=1; name=value`). Surrounding double quotes are removed.
pub fn find_cookie<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    find_cookies(cookie_header, name).next()
}

/// The values of every cookie named `name` in a `Cookie` request header, in order. A browser
/// sends several when cookies of the same name were set for different paths or domains (a
/// sibling subdomain can plant one); pass them all to
/// [`SessionManager::first_valid_cookie`]. Parsing is lenient (by the `cookie` crate): a
/// malformed pair is skipped, never the whole header.
pub fn find_cookies<'a>(cookie_header: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    cookie::Cookie::split_parse(cookie_header)
        .filter_map(move |parsed| {
            let parsed = parsed.ok()?;
            (parsed.name_raw()? == name).then(|| parsed.value_raw())?
        })
        .map(|value| value.trim_matches('"'))
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitStatus {
    /// A fresh session with no values: nothing was written.
    Anonymous,
    /// A loaded session that was neither changed nor due for a touch.
    Unchanged,
    /// A new session was stored.
    Created,
    /// Changed values were saved (after replaying onto concurrent changes if needed).
    Saved,
    /// The session moved to a new id while the request ran (a concurrent login cycled it), and
    /// this request's changes were saved under the new id. The cookie is left alone: the
    /// request that moved the session sets the new one.
    Followed,
    /// The session's expiry was pushed back.
    Touched,
    /// The session moved to a new id; the old entry now only marks where it went.
    Cycled,
    /// The session was deleted.
    Destroyed,
    /// The session ended (deleted or expired) while the request ran; it stays ended, nothing is
    /// written, and the cookie is left alone. [`CommitOutcome::lost_changes`] says whether
    /// changes were lost.
    Ended,
    /// The session moved to a new id before this request could write: a concurrent login won
    /// (this request's own id cycle lost, or it made changes), or the cookie predates a login.
    /// Nothing is written and the cookie is left alone: the browser has, or is getting, the new
    /// one from the request that moved the session. [`CommitOutcome::lost_changes`] says
    /// whether changes were lost.
    Superseded,
}

impl CommitStatus {
    /// The status in snake case, as metrics and spans show it.
    fn label(self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
            Self::Unchanged => "unchanged",
            Self::Created => "created",
            Self::Saved => "saved",
            Self::Followed => "followed",
            Self::Touched => "touched",
            Self::Cycled => "cycled",
            Self::Destroyed => "destroyed",
            Self::Ended => "ended",
            Self::Superseded => "superseded",
        }
    }
}

/// The result of [`SessionManager::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitOutcome {
    /// What was done.
    pub status: CommitStatus,
    /// What to do with the cookie; `None` leaves the browser's cookie as it is.
    pub cookie: Option<CookieDirective>,
    /// The request changed the session (or asked for a new id) but nothing was written,
    /// because the session ended ([`CommitStatus::Ended`]) or moved
    /// ([`CommitStatus::Superseded`]) while the request ran. Such a commit is logged at `warn`
    /// and counted ([`SessionManager::lost_writes`]); the tower layer answers an ended one
    /// with a configurable status.
    pub lost_changes: bool,
}

impl CommitOutcome {
    fn new(status: CommitStatus, cookie: Option<CookieDirective>) -> Self {
        Self {
            status,
            cookie,
            lost_changes: false,
        }
    }
}

/// How many times an id cycle marks the old entry again after a mark went unanswered (a
/// timeout or a lost connection) while the old entry showed it had not landed.
const MAX_UNANSWERED_MARKS: u32 = 2;

/// How many chained moves a commit follows (each one an id cycle that happened while the
/// request ran) before it treats the session as ended.
const MAX_MOVES_FOLLOWED: usize = 8;

/// What an id cycle found when it read the old entry again after its mark conflicted.
enum Carry {
    /// Still a session: the new entry was rewritten (version `new`); mark at version `old`.
    Again { old: Version, new: Version },
    /// Deleted or expired.
    Ended,
    /// Moved by a concurrent cycle.
    Moved,
    /// Moved by this cycle: a mark that went unanswered landed after all.
    Ours,
}

/// What fencing the old entry of a failed id cycle came to.
enum Fenced {
    /// No mark of this cycle can land any more: its new entry can go.
    Closed,
    /// A mark of this cycle had landed after all: the cycle is done.
    Ours,
    /// Unknown (the store did not answer): the new entry stands.
    Unknown,
}

/// What one commit met, for its span.
#[derive(Default)]
struct Tally {
    /// Store calls answered with a version conflict.
    conflicts: AtomicU32,
    /// Replays of the request's changes onto a newer version.
    replays: AtomicU32,
}

impl Tally {
    fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }
}

/// The newest state of a session that was loaded under some key.
enum Latest {
    /// Deleted, expired, or moved further than [`MAX_MOVES_FOLLOWED`] times.
    Gone,
    /// Live under `key` (the original one, or where it moved); `markers` are the keys passed
    /// through on the way.
    Live {
        key: StorageKey,
        loaded: LoadedRecord,
        markers: Vec<StorageKey>,
    },
}

/// Loads sessions for requests and commits them afterwards, following the rules of the
/// request flow: anonymous visitors write nothing, changes are saved against the loaded
/// version and replayed on conflict, unchanged sessions are touched only when due, ids are
/// cycled by creating the new entry and then marking the old one moved.
///
/// Cheap to clone; share one per application.
#[derive(Clone)]
pub struct SessionManager {
    store: ObservedStore,
    config: Arc<SessionConfig>,
    lost_writes: Arc<AtomicU64>,
}

impl fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// Checks `config` and builds a manager over `store`.
    ///
    /// Besides its own rules, the configuration must fit the store: storage keys within
    /// [`SessionStore::max_key_len`] and a
    /// [`max_encoded_size`](SessionConfig::max_encoded_size) within
    /// [`SessionStore::max_record_size`] (a maximum left at its default is lowered to it).
    pub fn new(
        store: Arc<dyn SessionStore>,
        mut config: SessionConfig,
    ) -> Result<Self, ConfigError> {
        config.fit_to(&*store)?;
        Ok(Self {
            store: ObservedStore::new(store),
            config: Arc::new(config),
            lost_writes: Arc::default(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The store in use.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        self.store.inner()
    }

    /// How many commits of this manager (and its clones) lost their changes because the
    /// session ended while the request ran (see [`CommitOutcome::lost_changes`]).
    pub fn lost_writes(&self) -> u64 {
        self.lost_writes.load(Ordering::Relaxed)
    }

    /// The session cookie among a request's `Cookie` headers, given as raw bytes (a header with
    /// bytes outside ASCII, which a sibling subdomain can plant, does not hide the session
    /// cookie): of every cookie with the session's name, the first one this manager signed,
    /// else the first one (which [`load`](Self::load) treats as invalid without a store call).
    pub fn request_cookie<'a>(
        &self,
        cookie_headers: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<String> {
        let name = &self.config.cookie.name;
        let headers: Vec<std::borrow::Cow<'a, str>> = cookie_headers
            .into_iter()
            .map(String::from_utf8_lossy)
            .collect();
        let candidates: Vec<&str> = headers
            .iter()
            .flat_map(|header| find_cookies(header, name))
            .collect();
        self.first_valid_cookie(candidates.iter().copied())
            .or(candidates.first().copied())
            .map(str::to_owned)
    }

    /// The first of `candidates` that is a cookie value this manager signed (no store call),
    /// so that a planted cookie of the same name cannot hide the real one.
    pub fn first_valid_cookie<'a>(
        &self,
        candidates: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        let name = &self.config.cookie.name;
        candidates
            .into_iter()
            .find(|value| self.config.keys.verify(name, value).is_some())
    }

    /// The session cookie among a request's `Cookie` headers (raw bytes, as for
    /// [`request_cookie`](Self::request_cookie)), verified once: the first cookie of the
    /// session's name that this manager signed, else an invalid one if any cookie has the
    /// name, else `None`. [`load_request`](Self::load_request) loads its session without
    /// verifying it again.
    pub fn verify_request_cookie<'a>(
        &self,
        cookie_headers: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<RequestCookie> {
        let name = &self.config.cookie.name;
        let mut found = false;
        for header in cookie_headers {
            let header = String::from_utf8_lossy(header);
            for value in find_cookies(&header, name) {
                found = true;
                if let Some(verified) = self.config.keys.verify(name, value) {
                    return Some(RequestCookie {
                        verified: Some(verified),
                    });
                }
            }
        }
        found.then_some(RequestCookie { verified: None })
    }

    /// Loads the session of a cookie [`verify_request_cookie`](Self::verify_request_cookie)
    /// found, as [`load`](Self::load) does, without verifying it again.
    pub async fn load_request(
        &self,
        cookie: Option<&RequestCookie>,
    ) -> Result<Session, SessionError> {
        let verified = match cookie {
            None => Err("no_cookie"),
            Some(RequestCookie { verified: None }) => Err("bad_cookie"),
            Some(RequestCookie {
                verified: Some(verified),
            }) => Ok(verified.clone()),
        };
        self.load_observed(verified).await
    }

    /// Whether committing `session` would call the store. When it would not (a fresh session
    /// left empty or destroyed, one whose cookie named a moved session, or a loaded one
    /// neither changed nor due for a touch), the commit has nothing to protect from a client hanging up, so
    /// an integration may run it in place instead of on a task of its own.
    pub fn commit_calls_store(&self, session: &Session) -> bool {
        if session.destroyed {
            // A delete for a stored session; a create for values set after the destroy.
            return matches!(session.origin, Origin::Stored(_)) || !session.record.is_empty();
        }
        match &session.origin {
            Origin::Fresh => !session.record.is_empty(),
            Origin::Moved => false,
            Origin::Stored(_) if session.cycle_requested || session.is_modified() => true,
            Origin::Stored(stored) => !matches!(
                self.ttl_plan(
                    &session.record,
                    stored.expires_in,
                    stored.loaded_at,
                    SystemTime::now()
                ),
                Some((_, false))
            ),
        }
    }

    /// Loads the session a request's cookie value names.
    ///
    /// A missing, malformed, tampered or unknown cookie, an expired session and a stored record
    /// that does not decode all give a fresh session; only the first three make no store call.
    /// A cookie whose session moved to a new id gives a session that holds nothing and whose
    /// changes are not written (its commit reports them lost). A store fault is an error.
    pub async fn load(&self, cookie_value: Option<&str>) -> Result<Session, SessionError> {
        let verified = match cookie_value {
            None => Err("no_cookie"),
            Some(value) => self
                .config
                .keys
                .verify(&self.config.cookie.name, value)
                .ok_or("bad_cookie"),
        };
        self.load_observed(verified).await
    }

    /// Loads the session of a verified cookie (or a fresh one, for the reason given), in a
    /// span, counted.
    async fn load_observed(
        &self,
        verified: Result<VerifiedCookie, &'static str>,
    ) -> Result<Session, SessionError> {
        let backend = self.store.backend();
        let span = tracing::debug_span!(
            "session.load",
            backend,
            outcome = tracing::field::Empty,
            elapsed_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let loaded = self.load_counted(verified).instrument(span.clone()).await;
        let outcome = match &loaded {
            Ok((_, outcome)) => outcome,
            Err(error) => {
                if let Some(kind) = observe::session_error_kind(error) {
                    observe::count(backend, observe::ERRORS, Some(("kind", kind)));
                }
                self.store.count(Event::Load("error"));
                "error"
            }
        };
        span.record("outcome", outcome);
        span.record("elapsed_us", observe::micros(started.elapsed()));
        loaded.map(|(session, _)| session)
    }

    /// Loads as [`load`](Self::load) does; counts the load and gives its outcome.
    async fn load_counted(
        &self,
        verified: Result<VerifiedCookie, &'static str>,
    ) -> Result<(Session, &'static str), SessionError> {
        let now = SystemTime::now();
        let (session, outcome) = match verified {
            Err(outcome) => (self.fresh(now), outcome),
            Ok(verified) => {
                let (mut session, outcome) = self.load_verified(verified, now).await?;
                session.had_valid_cookie = true;
                (session, outcome)
            }
        };
        self.store.count(Event::Load(outcome));
        Ok((session, outcome))
    }

    /// Loads the session of a cookie that verified; gives the load's outcome too.
    async fn load_verified(
        &self,
        verified: VerifiedCookie,
        now: SystemTime,
    ) -> Result<(Session, &'static str), SessionError> {
        let key = StorageKey::derive(&self.config.key_prefix, &verified.id);
        let loaded = match self.store.load_entry(&key).await {
            Ok(None) => return Ok((self.fresh(now), "miss")),
            Ok(Some(StoredEntry::Moved { .. })) => {
                return Ok((Session::new(Origin::Moved, self.new_record(now)), "moved"));
            }
            Ok(Some(StoredEntry::Session(loaded))) => loaded,
            Err(StoreError::Decode(error)) => {
                tracing::warn!(%error, "stored session does not decode; treating it as absent");
                return Ok((self.fresh(now), "undecodable"));
            }
            Err(error) => return Err(error.into()),
        };
        if self.absolute_left(&loaded.record, now) == Some(Duration::ZERO) {
            tracing::debug!("session passed its absolute deadline");
            if let Err(error) = self.store.delete(&key).await {
                tracing::warn!(%error, "could not delete a session past its absolute deadline");
            }
            return Ok((self.fresh(now), "expired"));
        }
        let session = Session::new(
            Origin::Stored(StoredSession {
                id: verified.id,
                key,
                version: loaded.version,
                expires_in: loaded.expires_in,
                loaded_at: Instant::now(),
                needs_resign: verified.needs_resign,
            }),
            loaded.record,
        );
        Ok((session, "hit"))
    }

    /// Writes what the request did to the session and says what to do with the cookie.
    ///
    /// `Set-Cookie` is asked for only when the cookie changes: a new id (created or cycled), a
    /// re-signature with the current key, a removal, or, for a persistent cookie, a new
    /// `Max-Age` when the session's expiry was pushed back. The expiry is pushed back (by a
    /// save or a touch) only once less than the touch threshold is left, so most saves send
    /// no cookie, and fewer late responses can overwrite a newer cookie.
    ///
    /// When the session turns out to have ended while the request ran (deleted by a logout,
    /// expired, or moved to a new id by a concurrent login before this request loaded it),
    /// the outcome is [`CommitStatus::Ended`], nothing is written, and the cookie is left
    /// alone: a removal here could overwrite the newer cookie a concurrent login just set.
    /// If the request had changes, [`CommitOutcome::lost_changes`] is set. Only
    /// [`Session::destroy`] clears the cookie.
    pub async fn commit(&self, session: Session) -> Result<CommitOutcome, SessionError> {
        let backend = self.store.backend();
        let span = tracing::debug_span!(
            "session.commit",
            backend,
            status = tracing::field::Empty,
            conflicts = tracing::field::Empty,
            replays = tracing::field::Empty,
            lost_changes = tracing::field::Empty,
            elapsed_us = tracing::field::Empty,
        );
        let started = Instant::now();
        let tally = Tally::default();
        let committed = self
            .commit_counted(session, &tally)
            .instrument(span.clone())
            .await;
        span.record("conflicts", tally.conflicts.load(Ordering::Relaxed));
        span.record("replays", tally.replays.load(Ordering::Relaxed));
        match &committed {
            Ok(outcome) => {
                span.record("status", outcome.status.label());
                span.record("lost_changes", outcome.lost_changes);
            }
            Err(error) => {
                if let Some(kind) = observe::session_error_kind(error) {
                    observe::count(backend, observe::ERRORS, Some(("kind", kind)));
                }
                span.record("status", "error");
            }
        }
        span.record("elapsed_us", observe::micros(started.elapsed()));
        committed
    }

    /// Commits as [`commit`](Self::commit) does, counting what it did.
    async fn commit_counted(
        &self,
        session: Session,
        tally: &Tally,
    ) -> Result<CommitOutcome, SessionError> {
        let outcome = self.commit_uncounted(session, tally).await?;
        let backend = self.store.backend();
        let event = match outcome.status {
            CommitStatus::Created => Some(Event::Create),
            CommitStatus::Saved | CommitStatus::Followed => Some(Event::Save),
            CommitStatus::Touched => Some(Event::TouchDone),
            CommitStatus::Unchanged => Some(Event::TouchSkipped),
            // Cycles and destroys are counted where they happen.
            CommitStatus::Anonymous
            | CommitStatus::Cycled
            | CommitStatus::Destroyed
            | CommitStatus::Ended
            | CommitStatus::Superseded => None,
        };
        if let Some(event) = event {
            self.store.count(event);
        }
        if outcome.lost_changes {
            observe::count(
                backend,
                observe::LOST_CHANGES,
                Some(("status", outcome.status.label())),
            );
        }
        Ok(outcome)
    }

    async fn commit_uncounted(
        &self,
        mut session: Session,
        tally: &Tally,
    ) -> Result<CommitOutcome, SessionError> {
        let now = SystemTime::now();
        if session.destroyed {
            return self.commit_destroyed(session, now, tally).await;
        }
        match std::mem::replace(&mut session.origin, Origin::Fresh) {
            Origin::Fresh if session.record.is_empty() => {
                Ok(CommitOutcome::new(CommitStatus::Anonymous, None))
            }
            Origin::Fresh => {
                self.create_new(&session.record, now, CommitStatus::Created)
                    .await
            }
            Origin::Moved if session.record.is_empty() => {
                Ok(CommitOutcome::new(CommitStatus::Anonymous, None))
            }
            Origin::Moved => Ok(self.lost(
                CommitStatus::Superseded,
                "the cookie named a session that moved",
            )),
            Origin::Stored(stored) if session.cycle_requested => {
                self.commit_cycled(&mut session, stored, now, tally).await
            }
            Origin::Stored(stored) if session.is_modified() => {
                self.save_with_replay(&mut session, stored, now, tally)
                    .await
            }
            Origin::Stored(stored) => self.touch_if_due(&stored, &session.record, now).await,
        }
    }

    /// Loads the live entry under `key`; a record that does not decode counts as absent.
    async fn load_latest(&self, key: &StorageKey) -> Result<Option<StoredEntry>, SessionError> {
        match self.store.load_entry(key).await {
            Ok(entry) => Ok(entry),
            Err(StoreError::Decode(error)) => {
                tracing::warn!(%error, "stored session does not decode; treating it as absent");
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The newest version of the session loaded under `key`, following moves.
    async fn resolve(&self, key: &StorageKey) -> Result<Latest, SessionError> {
        let mut key = key.clone();
        let mut markers = Vec::new();
        loop {
            match self.load_latest(&key).await? {
                None => return Ok(Latest::Gone),
                Some(StoredEntry::Session(loaded)) => {
                    return Ok(Latest::Live {
                        key,
                        loaded,
                        markers,
                    });
                }
                Some(StoredEntry::Moved { to }) => {
                    if markers.len() == MAX_MOVES_FOLLOWED {
                        tracing::warn!("session moved too many times while a request ran");
                        return Ok(Latest::Gone);
                    }
                    markers.push(std::mem::replace(&mut key, to));
                }
            }
        }
    }

    fn fresh(&self, now: SystemTime) -> Session {
        Session::new(Origin::Fresh, self.new_record(now))
    }

    fn new_record(&self, now: SystemTime) -> Record {
        let mut record = Record::new(now);
        record.set_absolute_deadline(self.config.absolute_timeout.map(|t| now + t));
        record
    }

    /// Time left before the session's absolute deadline: the earlier of the deadline stored in
    /// the record and creation time plus the configured absolute timeout (so a timeout
    /// introduced or shortened later also covers older sessions). `None` when neither is set.
    fn absolute_left(&self, record: &Record, now: SystemTime) -> Option<Duration> {
        let from_config = self.config.absolute_timeout.map(|timeout| {
            (record.created_at() + timeout)
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
        });
        match (record.absolute_remaining(now), from_config) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The time to live a write at `now` gives `record` when it pushes the expiry back: the
    /// idle timeout, cut to the time left before the absolute deadline but never below the
    /// shortest TTL (the deadline itself is checked on every load). `None` once the deadline
    /// has passed.
    fn write_ttl(&self, record: &Record, now: SystemTime) -> Option<Duration> {
        let idle = self.config.idle_timeout;
        match self.absolute_left(record, now) {
            None => Some(idle),
            Some(Duration::ZERO) => None,
            Some(left) => Some(idle.min(left).max(MIN_TTL)),
        }
    }

    /// The TTL a save or touch of a loaded session gives it, and whether that pushes its expiry
    /// back: only once less than the touch threshold is left (or the store cannot tell) does
    /// it get [`write_ttl`](Self::write_ttl); until then it keeps the expiry it has. `None`
    /// once the absolute deadline has passed.
    fn ttl_plan(
        &self,
        record: &Record,
        expires_in: Option<Duration>,
        loaded_at: Instant,
        now: SystemTime,
    ) -> Option<(Duration, bool)> {
        let full = self.write_ttl(record, now)?;
        let left = expires_in.map(|left| left.saturating_sub(loaded_at.elapsed()));
        match left {
            Some(left)
                if left >= self.config.effective_touch_threshold() || full < left + MIN_TTL =>
            {
                Some((left.min(full).max(MIN_TTL), false))
            }
            _ => Some((full, true)),
        }
    }

    fn check_size(&self, record: &Record) -> Result<(), SessionError> {
        let size = codec::encoded_record_len(record).map_err(StoreError::Encode)?;
        let limit = self.config.max_encoded_size;
        if size > limit {
            return Err(SessionError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// Stores `record` under a newly drawn id, drawing again on a collision.
    async fn create_new(
        &self,
        record: &Record,
        now: SystemTime,
        status: CommitStatus,
    ) -> Result<CommitOutcome, SessionError> {
        let Some(ttl) = self.write_ttl(record, now) else {
            return Ok(self.ended());
        };
        let (id, _, _) = self.store_under_new_id(record, ttl, status).await?;
        let cookie = self.set_cookie(&id, ttl, record, now);
        Ok(CommitOutcome::new(status, Some(cookie)))
    }

    /// Stores `record` under a newly drawn id for `ttl`, drawing again on a collision.
    async fn store_under_new_id(
        &self,
        record: &Record,
        ttl: Duration,
        status: CommitStatus,
    ) -> Result<(SessionId, StorageKey, Version), SessionError> {
        self.check_size(record)?;
        for _ in 0..MAX_ID_DRAWS {
            let id = SessionId::generate()?;
            let key = StorageKey::derive(&self.config.key_prefix, &id);
            match self.store.create(&key, record, ttl).await {
                Ok(version) => {
                    tracing::debug!(?status, "session stored under a new id");
                    return Ok((id, key, version));
                }
                Err(StoreError::AlreadyExists) => {
                    observe::count(self.store.backend(), observe::ID_COLLISIONS, None);
                    tracing::warn!("session id collision; drawing another id");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(SessionError::IdCollisions)
    }

    /// Moves the session to a new id. The new entry is created from what this request holds;
    /// then the old entry is marked moved, against the version this request loaded. If that
    /// conflicts (a concurrent save), the newer version is read, this request's changes are
    /// replayed onto it, the new entry is rewritten with the result, and the mark is tried
    /// again, so no change acknowledged to a concurrent request is lost. If the old entry
    /// ended or moved meanwhile (a logout, or a concurrent login that won), the new entry is
    /// removed and the outcome is `Ended` or `Superseded`: two concurrent cycles leave one live
    /// entry. If the mark fails without an answer (a timeout), the old entry is read to tell
    /// whether it was applied.
    async fn commit_cycled(
        &self,
        session: &mut Session,
        stored: StoredSession,
        now: SystemTime,
        tally: &Tally,
    ) -> Result<CommitOutcome, SessionError> {
        let Some(ttl) = self.write_ttl(&session.record, now) else {
            self.store.delete(&stored.key).await?;
            return Ok(self.lost(
                CommitStatus::Ended,
                "the session passed its absolute deadline",
            ));
        };
        let (id, new_key, mut new_version) = self
            .store_under_new_id(&session.record, ttl, CommitStatus::Cycled)
            .await?;
        let cookie = self.set_cookie(&id, ttl, &session.record, now);
        // Whether the old entry was seen marked (confirmed) or not (unconfirmed).
        let cycled = |event: Event| {
            tracing::debug!(?event, "session id cycled");
            self.store.count(event);
            CommitOutcome::new(CommitStatus::Cycled, Some(cookie.clone()))
        };
        let marker_ttl = self.config.moved_marker_ttl;
        let mut version = stored.version;
        let attempts = self.config.max_conflict_retries;
        // The last mark went unanswered (a timeout, a lost connection) while the old entry still
        // held the version it was sent against: it may land still. With the error it gave.
        let mut pending: Option<(LoadedRecord, StoreError)> = None;
        let mut unanswered = 0;
        let failed = 'attempts: {
            for attempt in 1..=attempts {
                let marked = self
                    .store
                    .mark_moved(&stored.key, version, &new_key, marker_ttl)
                    .await;
                match marked {
                    Ok(()) => return Ok(cycled(Event::CycleConfirmed)),
                    Err(StoreError::Conflict) => {
                        tally.conflict();
                    }
                    Err(StoreError::NotFound) => {
                        break 'attempts Ok(
                            self.lost(CommitStatus::Ended, "the session ended during an id cycle")
                        );
                    }
                    Err(error) => {
                        // Applied or not? The server may have applied the mark and lost the
                        // reply, or may apply it still. The old entry tells: our marker means
                        // done; the same version means not yet, so mark again; anything else
                        // means it can no longer land, and is handled like a conflict.
                        unanswered += 1;
                        match self.store.load_entry(&stored.key).await {
                            Ok(Some(StoredEntry::Moved { to })) if to == new_key => {
                                return Ok(cycled(Event::CycleConfirmed));
                            }
                            Ok(Some(StoredEntry::Session(loaded))) if loaded.version == version => {
                                tracing::warn!(%error, "an id cycle's mark went unanswered");
                                pending = Some((loaded, error));
                                if unanswered > MAX_UNANSWERED_MARKS {
                                    break;
                                }
                                backoff(attempt).await;
                                continue;
                            }
                            Ok(_) => {}
                            Err(_) => {
                                return Ok(self
                                    .cycled_unconfirmed(&error, cycled(Event::CycleUnconfirmed)));
                            }
                        }
                    }
                }
                pending = None;
                tracing::debug!(attempt, "id cycle raced a save; carrying it over");
                backoff(attempt).await;
                let carried = self
                    .carry_over(session, &stored.key, &new_key, new_version, ttl)
                    .await;
                match carried {
                    Ok(Carry::Again { old, new }) => {
                        self.count_replay(tally);
                        (version, new_version) = (old, new);
                    }
                    Ok(Carry::Ours) => return Ok(cycled(Event::CycleConfirmed)),
                    Ok(Carry::Ended) => {
                        break 'attempts Ok(
                            self.lost(CommitStatus::Ended, "the session ended during an id cycle")
                        );
                    }
                    Ok(Carry::Moved) => {
                        break 'attempts Ok(
                            self.lost(CommitStatus::Superseded, "a concurrent id cycle won")
                        );
                    }
                    // A mark of ours went unanswered earlier and may be what the conflict met,
                    // but the store could not be asked: the old entry may point at the new one
                    // now, so the new entry must stay, and its cookie go out.
                    Err(SessionError::Store(error)) if unanswered > 0 => {
                        return Ok(self.cycled_unconfirmed(&error, cycled(Event::CycleUnconfirmed)));
                    }
                    Err(error) => break 'attempts Err(error),
                }
            }
            // Giving up. A mark that may land still must be made unable to, or it would move
            // the session to the entry removed below: rewriting the old entry at its version
            // (a fence) does that.
            let Some((loaded, error)) = pending else {
                break 'attempts Err(SessionError::ConflictRetriesExhausted { attempts });
            };
            match self.fence(&stored.key, &loaded, version, &new_key).await {
                Fenced::Ours => return Ok(cycled(Event::CycleConfirmed)),
                Fenced::Closed => Err(error.into()),
                Fenced::Unknown => {
                    return Ok(self.cycled_unconfirmed(&error, cycled(Event::CycleUnconfirmed)));
                }
            }
        };
        // The cycle failed or lost: the new entry must not outlive it.
        if let Err(cleanup) = self.store.delete(&new_key).await {
            tracing::warn!(error = %cleanup, "could not remove the new entry of a failed id cycle");
        }
        failed
    }

    /// The outcome of an id cycle whose mark went unanswered and whose store could not be asked
    /// whether it landed: the new entry holds the session with this request's changes, so its
    /// cookie is handed out. If the mark lands later, the old id follows nowhere (it is dead,
    /// as intended); if it never does, the old entry keeps the pre-login session until it
    /// expires, unreachable once the browser has the new cookie, and never the new session's
    /// data. Either way the login stands, rather than failing now and possibly logging the user
    /// out later, when a delayed mark lands.
    fn cycled_unconfirmed(&self, error: &StoreError, cycled: CommitOutcome) -> CommitOutcome {
        tracing::warn!(%error, "an id cycle's mark could not be confirmed; the new id stands");
        cycled
    }

    /// Rewrites the old entry of a failed id cycle as it was, at `version`, so that no mark sent
    /// against that version (and still on its way) can land any more.
    async fn fence(
        &self,
        old_key: &StorageKey,
        loaded: &LoadedRecord,
        version: Version,
        new_key: &StorageKey,
    ) -> Fenced {
        let keep = loaded
            .expires_in
            .unwrap_or(self.config.idle_timeout)
            .max(MIN_TTL);
        match self
            .store
            .save(old_key, &loaded.record, keep, version)
            .await
        {
            Ok(_) => Fenced::Closed,
            Err(StoreError::Conflict | StoreError::NotFound) => {
                match self.store.load_entry(old_key).await {
                    Ok(Some(StoredEntry::Moved { to })) if to == *new_key => Fenced::Ours,
                    Ok(_) => Fenced::Closed,
                    Err(_) => Fenced::Unknown,
                }
            }
            Err(_) => Fenced::Unknown,
        }
    }

    /// After an id cycle's mark conflicted: reads the old entry again, replays this request's
    /// changes onto it and rewrites the new entry with the result. A panic in an update closure
    /// first removes the new entry, then goes on unwinding.
    async fn carry_over(
        &self,
        session: &mut Session,
        old_key: &StorageKey,
        new_key: &StorageKey,
        new_version: Version,
        ttl: Duration,
    ) -> Result<Carry, SessionError> {
        let loaded = match self.load_latest(old_key).await? {
            None => return Ok(Carry::Ended),
            // An earlier mark of ours that went unanswered landed after all.
            Some(StoredEntry::Moved { to }) if to == *new_key => return Ok(Carry::Ours),
            Some(StoredEntry::Moved { .. }) => return Ok(Carry::Moved),
            Some(StoredEntry::Session(loaded)) => loaded,
        };
        let mut record = loaded.record;
        let policy = self.config.same_key_conflict;
        let replayed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session.replay_onto(&mut record, policy)
        }));
        match replayed {
            Ok(result) => result?,
            Err(panic) => {
                if let Err(cleanup) = self.store.delete(new_key).await {
                    tracing::warn!(error = %cleanup, "could not remove the new entry of a failed id cycle");
                }
                std::panic::resume_unwind(panic);
            }
        }
        // The new id keeps the CSRF token this cycle gave it (rotated, or none): a token a
        // concurrent request saved under the old id was rendered for that id.
        set_value_as_in(&mut record, &session.record, csrf::TOKEN_VALUE_NAME);
        self.check_size(&record)?;
        let saved = self.store.save(new_key, &record, ttl, new_version).await?;
        Ok(Carry::Again {
            old: loaded.version,
            new: saved,
        })
    }

    /// Deletes the stored session, if any, and clears the cookie; values inserted after
    /// `destroy` go into a new session under a new id.
    async fn commit_destroyed(
        &self,
        mut session: Session,
        now: SystemTime,
        tally: &Tally,
    ) -> Result<CommitOutcome, SessionError> {
        let status = match std::mem::replace(&mut session.origin, Origin::Fresh) {
            Origin::Stored(stored) => {
                self.end_session(&stored.key, stored.version, tally).await?;
                self.store.count(Event::Destroy);
                CommitStatus::Destroyed
            }
            // The cookie's id was revoked by an id cycle: it has no power over the session it
            // moved to (a planted pre-login id must not log the user out), so only the cookie
            // is cleared.
            Origin::Moved | Origin::Fresh => CommitStatus::Anonymous,
        };
        let had_valid_cookie = session.had_valid_cookie;
        if !session.record.is_empty() {
            let mut record = self.new_record(now);
            session.replay_onto(&mut record, SameKeyConflict::LastWriterWins)?;
            return self.create_new(&record, now, CommitStatus::Created).await;
        }
        // No removal for a request that came without a valid cookie: there is nothing of ours
        // to clear, and a removal in answer to a cross-site request (which carries no
        // `SameSite=Lax` cookie) would let any site log the user out.
        let removal = had_valid_cookie.then(|| self.removal_cookie());
        Ok(CommitOutcome::new(status, removal))
    }

    /// Ends the session loaded under `key` at `version`: deletes it only at the version last
    /// read, so a concurrent cycle cannot slip a move past the delete, and follows any move to
    /// end the session where it went, then removes the markers passed on the way.
    async fn end_session(
        &self,
        key: &StorageKey,
        version: Version,
        tally: &Tally,
    ) -> Result<(), SessionError> {
        let (mut key, mut version) = (key.clone(), version);
        let mut markers = Vec::new();
        let attempts = self.config.max_conflict_retries;
        for attempt in 1..=attempts {
            match self.store.delete_if_version(&key, version).await {
                Ok(()) | Err(StoreError::NotFound) => break,
                Err(StoreError::Conflict) => {
                    tally.conflict();
                    backoff(attempt).await;
                }
                Err(error) => return Err(error.into()),
            }
            match self.resolve(&key).await? {
                Latest::Gone => break,
                Latest::Live {
                    key: latest,
                    loaded,
                    markers: passed,
                } => {
                    markers.extend(passed);
                    (key, version) = (latest, loaded.version);
                }
            }
            if attempt == attempts {
                return Err(SessionError::ConflictRetriesExhausted { attempts });
            }
        }
        // The markers expire by themselves; removing them now is a courtesy, and its failure
        // does not undo a logout that happened.
        for marker in markers {
            if let Err(error) = self.store.delete(&marker).await {
                tracing::warn!(%error, "could not remove a moved marker after a logout");
            }
        }
        tracing::debug!("session destroyed");
        Ok(())
    }

    /// Saves against the loaded version; on a conflict reloads (following a move to a new id),
    /// replays this request's changes onto the newer record and tries again, up to the
    /// configured number of saves.
    async fn save_with_replay(
        &self,
        session: &mut Session,
        stored: StoredSession,
        now: SystemTime,
        tally: &Tally,
    ) -> Result<CommitOutcome, SessionError> {
        let attempts = self.config.max_conflict_retries;
        let mut key = stored.key.clone();
        let mut version = stored.version;
        let mut expires_in = stored.expires_in;
        let mut loaded_at = stored.loaded_at;
        let mut newer: Option<Record> = None;
        for attempt in 1..=attempts {
            let record = newer.as_ref().unwrap_or(&session.record);
            self.check_size(record)?;
            let Some((ttl, extended)) = self.ttl_plan(record, expires_in, loaded_at, now) else {
                self.store.delete(&key).await?;
                return Ok(self.lost(
                    CommitStatus::Ended,
                    "the session passed its absolute deadline",
                ));
            };
            match self.store.save(&key, record, ttl, version).await {
                // Saved where the session moved to (a concurrent login): no cookie.
                Ok(_) if key != stored.key => {
                    return Ok(CommitOutcome::new(CommitStatus::Followed, None));
                }
                Ok(_) => {
                    let refresh = extended && self.config.cookie.persistent;
                    let cookie = (refresh || stored.needs_resign)
                        .then(|| self.set_cookie(&stored.id, ttl, record, now));
                    return Ok(CommitOutcome::new(CommitStatus::Saved, cookie));
                }
                Err(StoreError::NotFound) => {
                    return Ok(self.lost(
                        CommitStatus::Ended,
                        "the session ended while the request ran",
                    ));
                }
                Err(StoreError::Conflict) => {
                    tally.conflict();
                    tracing::debug!(attempt, "save conflict; replaying onto the newer version");
                    backoff(attempt).await;
                    let Latest::Live {
                        key: latest_key,
                        loaded,
                        ..
                    } = self.resolve(&key).await?
                    else {
                        return Ok(self.lost(
                            CommitStatus::Ended,
                            "the session ended while the request ran",
                        ));
                    };
                    key = latest_key;
                    let mut record = loaded.record;
                    let followed = (key != stored.key).then(|| record.clone());
                    session.replay_onto(&mut record, self.config.same_key_conflict)?;
                    self.count_replay(tally);
                    if let Some(followed) = followed {
                        // A request on the id before a move (a login) never changes the CSRF
                        // token of the session it follows: its token was rendered for the old id.
                        set_value_as_in(&mut record, &followed, csrf::TOKEN_VALUE_NAME);
                    }
                    newer = Some(record);
                    version = loaded.version;
                    expires_in = loaded.expires_in;
                    loaded_at = Instant::now();
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(SessionError::ConflictRetriesExhausted { attempts })
    }

    async fn touch_if_due(
        &self,
        stored: &StoredSession,
        record: &Record,
        now: SystemTime,
    ) -> Result<CommitOutcome, SessionError> {
        let Some((ttl, due)) = self.ttl_plan(record, stored.expires_in, stored.loaded_at, now)
        else {
            self.store.delete(&stored.key).await?;
            return Ok(self.ended());
        };
        if !due {
            return Ok(self.unchanged(stored, record, now));
        }
        if self.store.touch(&stored.key, ttl).await? {
            let cookie = (self.config.cookie.persistent || stored.needs_resign)
                .then(|| self.set_cookie(&stored.id, ttl, record, now));
            Ok(CommitOutcome::new(CommitStatus::Touched, cookie))
        } else {
            Ok(self.ended())
        }
    }

    fn unchanged(&self, stored: &StoredSession, record: &Record, now: SystemTime) -> CommitOutcome {
        let cookie = stored.needs_resign.then(|| {
            let left = stored.expires_in.map_or(self.config.idle_timeout, |left| {
                left.saturating_sub(stored.loaded_at.elapsed())
            });
            self.set_cookie(&stored.id, left, record, now)
        });
        CommitOutcome::new(CommitStatus::Unchanged, cookie)
    }

    /// Counts a replay of a commit's changes onto a newer version.
    fn count_replay(&self, tally: &Tally) {
        tally.replays.fetch_add(1, Ordering::Relaxed);
        self.store.count(Event::Replay);
    }

    fn ended(&self) -> CommitOutcome {
        CommitOutcome::new(CommitStatus::Ended, None)
    }

    /// A commit whose changes were not written because the session ended or moved: logged
    /// (without id or key), counted, and reported.
    fn lost(&self, status: CommitStatus, why: &'static str) -> CommitOutcome {
        tracing::warn!(
            why,
            "session changes lost: the session ended or moved while the request ran"
        );
        self.lost_writes.fetch_add(1, Ordering::Relaxed);
        CommitOutcome {
            status,
            cookie: None,
            lost_changes: true,
        }
    }

    /// The directive for the cookie of `id`, whose session (holding `record`) has `ttl` left.
    /// A persistent cookie's `Max-Age` is `ttl` plus one idle timeout, but never past the
    /// absolute deadline: a refresh is sent once, with the response whose save or touch pushes
    /// the expiry back, and if that response is lost (the client hung up), even just before
    /// the old expiry, the cookie still lasts a whole touch threshold past the moment the next
    /// refresh falls due. The server's expiry stays the authority; a cookie that outlives its
    /// session loads nothing.
    fn set_cookie(
        &self,
        id: &SessionId,
        ttl: Duration,
        record: &Record,
        now: SystemTime,
    ) -> CookieDirective {
        let cookie = &self.config.cookie;
        let value = self.config.keys.sign(&cookie.name, id);
        let mut max_age = ttl + self.config.idle_timeout;
        if let Some(left) = self.absolute_left(record, now) {
            max_age = max_age.min(left.max(ttl));
        }
        self.directive(value, cookie.persistent.then_some(max_age))
    }

    fn removal_cookie(&self) -> CookieDirective {
        self.directive(String::new(), Some(Duration::ZERO))
    }

    fn directive(&self, value: String, max_age: Option<Duration>) -> CookieDirective {
        let cookie = &self.config.cookie;
        CookieDirective {
            name: cookie.name.clone(),
            value,
            max_age,
            path: cookie.path.clone(),
            domain: cookie.domain.clone(),
            secure: cookie.secure,
            http_only: cookie.http_only,
            same_site: cookie.same_site,
            partitioned: cookie.partitioned,
        }
    }
}

/// Makes the value `name` of `record` what it is in `source` (set or absent).
fn set_value_as_in(record: &mut Record, source: &Record, name: &str) {
    match source.value(name) {
        Some(bytes) => {
            record.set_value(name, bytes.to_vec());
        }
        None => {
            record.remove_value(name);
        }
    }
}

/// After the `attempt`-th conflict, waits a random whole number of milliseconds below a window
/// that doubles with each conflict (2 ms up to 16 ms), retrying at once when the draw is zero, so
/// that requests racing on one session stop colliding in lockstep. (Whole milliseconds because
/// that is the timer's resolution: finer draws would all round to the same tick.)
async fn backoff(attempt: u32) {
    let window_ms: u64 = 2u64 << attempt.saturating_sub(1).min(3);
    let mut random = [0u8; 2];
    if getrandom::fill(&mut random).is_err() {
        random = [1, 0];
    }
    let wait_ms = u64::from(u16::from_le_bytes(random)) % window_ms;
    if wait_ms > 0 {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::find_cookie;

    #[test]
    fn cookies_are_found_by_exact_name() {
        assert_eq!(
            find_cookie("a=1; session=abc.def; b=2", "session"),
            Some("abc.def")
        );
        assert_eq!(
            find_cookie("sessionx=1; session=\"q\"", "session"),
            Some("q")
        );
        assert_eq!(find_cookie("a=1", "session"), None);
        assert_eq!(find_cookie("novalue; =x; session", "session"), None);
        assert_eq!(find_cookie("", "session"), None);
        let all: Vec<&str> = super::find_cookies("session=a; x=1; session=b", "session").collect();
        assert_eq!(all, ["a", "b"]);
    }
}
