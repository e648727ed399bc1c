//! [`SessionManager`]: the request flow from cookie to store and back to a cookie directive.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::codec;
use crate::config::{SameSite, SessionConfig};
use crate::error::{ConfigError, SessionError, StoreError};
use crate::id::{SessionId, StorageKey};
use crate::record::Record;
use crate::session::{Origin, Session, StoredSession};
use crate::store::{LoadedRecord, MIN_TTL, SessionStore};

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
}

impl CookieDirective {
    /// Whether this directive removes the cookie.
    pub fn is_removal(&self) -> bool {
        self.value.is_empty()
    }

    /// The directive as the value of a `Set-Cookie` header.
    pub fn to_header_value(&self) -> String {
        let mut out = format!("{}={}", self.name, self.value);
        if let Some(max_age) = self.max_age {
            out.push_str(&format!("; Max-Age={}", max_age.as_secs()));
            if self.is_removal() {
                out.push_str("; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
            }
        }
        out.push_str("; Path=");
        out.push_str(&self.path);
        if let Some(domain) = &self.domain {
            out.push_str("; Domain=");
            out.push_str(domain);
        }
        if self.secure {
            out.push_str("; Secure");
        }
        if self.http_only {
            out.push_str("; HttpOnly");
        }
        out.push_str("; SameSite=");
        out.push_str(self.same_site.as_str());
        out
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

/// The value of the first cookie named `name` in a `Cookie` request header
/// (`a=1; name=value`). Surrounding double quotes are removed.
pub fn find_cookie<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    find_cookies(cookie_header, name).next()
}

/// The values of every cookie named `name` in a `Cookie` request header, in order. A browser
/// sends several when cookies of the same name were set for different paths or domains (a
/// sibling subdomain can plant one); pass them all to
/// [`SessionManager::first_valid_cookie`].
pub fn find_cookies<'a>(cookie_header: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    cookie_header.split(';').filter_map(move |pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
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
    /// The session's expiry was pushed back.
    Touched,
    /// The session moved to a new id; the old one was deleted.
    Cycled,
    /// The session was deleted.
    Destroyed,
    /// The session ended (deleted, expired or cycled elsewhere) while the request ran; it stays
    /// ended, and the cookie is left alone.
    Ended,
}

/// The result of [`SessionManager::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// What was done.
    pub status: CommitStatus,
    /// What to do with the cookie; `None` leaves the browser's cookie as it is.
    pub cookie: Option<CookieDirective>,
}

/// Loads sessions for requests and commits them afterwards, following the rules of the
/// request flow: anonymous visitors write nothing, changes are saved against the loaded
/// version and replayed on conflict, unchanged sessions are touched only when due, ids are
/// cycled create-before-delete.
///
/// Cheap to clone; share one per application.
#[derive(Clone)]
pub struct SessionManager {
    store: Arc<dyn SessionStore>,
    config: Arc<SessionConfig>,
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
    pub fn new(store: Arc<dyn SessionStore>, config: SessionConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            store,
            config: Arc::new(config),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The store in use.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
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

    /// Loads the session a request's cookie value names.
    ///
    /// A missing, malformed, tampered or unknown cookie, an expired session and a stored record
    /// that does not decode all give a fresh session; only the first three make no store call.
    /// A store fault is an error.
    pub async fn load(&self, cookie_value: Option<&str>) -> Result<Session, SessionError> {
        let now = SystemTime::now();
        let Some(verified) =
            cookie_value.and_then(|value| self.config.keys.verify(&self.config.cookie.name, value))
        else {
            return Ok(self.fresh(now));
        };
        let key = StorageKey::derive(&self.config.key_prefix, &verified.id);
        let Some(loaded) = self.load_live(&key).await? else {
            return Ok(self.fresh(now));
        };
        if self.absolute_left(&loaded.record, now) == Some(Duration::ZERO) {
            tracing::debug!(key = %key, "session passed its absolute deadline");
            if let Err(error) = self.store.delete(&key).await {
                tracing::warn!(key = %key, %error, "could not delete a session past its absolute deadline");
            }
            return Ok(self.fresh(now));
        }
        Ok(Session::new(
            Origin::Stored(StoredSession {
                id: verified.id,
                key,
                version: loaded.version,
                expires_in: loaded.expires_in,
                needs_resign: verified.needs_resign,
            }),
            loaded.record,
        ))
    }

    /// Writes what the request did to the session and says what to do with the cookie.
    ///
    /// When the session turns out to have ended while the request ran (deleted by a logout,
    /// expired, or moved to a new id by a concurrent login), the outcome is
    /// [`CommitStatus::Ended`], nothing is written, and the cookie is left alone: a removal
    /// here could overwrite the newer cookie a concurrent login just set. Only
    /// [`Session::destroy`] clears the cookie.
    pub async fn commit(&self, session: Session) -> Result<CommitOutcome, SessionError> {
        let now = SystemTime::now();
        if session.destroyed {
            return self.commit_destroyed(session, now).await;
        }
        match &session.origin {
            Origin::Fresh if session.record.is_empty() => Ok(CommitOutcome {
                status: CommitStatus::Anonymous,
                cookie: None,
            }),
            Origin::Fresh => {
                self.create_new(&session.record, now, CommitStatus::Created)
                    .await
            }
            Origin::Stored(stored) if session.cycle_requested => {
                self.commit_cycled(&session, stored, now).await
            }
            Origin::Stored(stored) if session.is_modified() => {
                self.save_with_replay(&session, stored, now).await
            }
            Origin::Stored(stored) => self.touch_if_due(stored, &session.record, now).await,
        }
    }

    /// Loads the live entry under `key`; a record that does not decode counts as absent.
    async fn load_live(&self, key: &StorageKey) -> Result<Option<LoadedRecord>, SessionError> {
        match self.store.load(key).await {
            Ok(loaded) => Ok(loaded),
            Err(StoreError::Decode(error)) => {
                tracing::warn!(key = %key, %error, "stored session does not decode; treating it as absent");
                Ok(None)
            }
            Err(error) => Err(error.into()),
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

    /// The time to live a write at `now` gives `record`: the idle timeout, cut to the time left
    /// before the absolute deadline but never below the shortest TTL (the deadline itself is
    /// checked on every load). `None` once the deadline has passed.
    fn write_ttl(&self, record: &Record, now: SystemTime) -> Option<Duration> {
        let idle = self.config.idle_timeout;
        match self.absolute_left(record, now) {
            None => Some(idle),
            Some(Duration::ZERO) => None,
            Some(left) => Some(idle.min(left).max(MIN_TTL)),
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
        let (id, _) = self.store_under_new_id(record, ttl, status).await?;
        Ok(CommitOutcome {
            status,
            cookie: Some(self.set_cookie(&id, ttl)),
        })
    }

    /// Stores `record` under a newly drawn id for `ttl`, drawing again on a collision.
    async fn store_under_new_id(
        &self,
        record: &Record,
        ttl: Duration,
        status: CommitStatus,
    ) -> Result<(SessionId, StorageKey), SessionError> {
        self.check_size(record)?;
        for _ in 0..MAX_ID_DRAWS {
            let id = SessionId::generate()?;
            let key = StorageKey::derive(&self.config.key_prefix, &id);
            match self.store.create(&key, record, ttl).await {
                Ok(_) => {
                    tracing::debug!(key = %key, ?status, "session stored under a new id");
                    return Ok((id, key));
                }
                Err(StoreError::AlreadyExists) => {
                    tracing::warn!("session id collision; drawing another id");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(SessionError::IdCollisions)
    }

    /// Moves the session to a new id: reads the newest version of the old entry (so a session
    /// ended meanwhile stays ended and changes saved meanwhile are kept), replays this
    /// request's changes onto it, creates it under a new id, then deletes the old entry.
    async fn commit_cycled(
        &self,
        session: &Session,
        stored: &StoredSession,
        now: SystemTime,
    ) -> Result<CommitOutcome, SessionError> {
        let Some(latest) = self.load_live(&stored.key).await? else {
            return Ok(self.ended());
        };
        let mut record = latest.record;
        session.replay_onto(&mut record);
        let Some(ttl) = self.write_ttl(&record, now) else {
            self.store.delete(&stored.key).await?;
            return Ok(self.ended());
        };
        let (id, new_key) = self
            .store_under_new_id(&record, ttl, CommitStatus::Cycled)
            .await?;
        if let Err(error) = self.store.delete(&stored.key).await {
            // The old id must not stay valid beside the new one; the request fails, and the
            // new entry goes too, so that nothing is left behind (best effort).
            if let Err(cleanup) = self.store.delete(&new_key).await {
                tracing::warn!(key = %new_key, error = %cleanup, "could not remove the new entry of a failed id cycle");
            }
            return Err(error.into());
        }
        tracing::debug!(key = %stored.key, "session id cycled; old entry deleted");
        Ok(CommitOutcome {
            status: CommitStatus::Cycled,
            cookie: Some(self.set_cookie(&id, ttl)),
        })
    }

    /// Deletes the stored session, if any, and clears the cookie; values inserted after
    /// `destroy` go into a new session under a new id.
    async fn commit_destroyed(
        &self,
        session: Session,
        now: SystemTime,
    ) -> Result<CommitOutcome, SessionError> {
        let status = match &session.origin {
            Origin::Stored(stored) => {
                self.store.delete(&stored.key).await?;
                tracing::debug!(key = %stored.key, "session destroyed");
                CommitStatus::Destroyed
            }
            Origin::Fresh => CommitStatus::Anonymous,
        };
        if !session.record.is_empty() {
            let mut record = self.new_record(now);
            session.replay_onto(&mut record);
            return self.create_new(&record, now, CommitStatus::Created).await;
        }
        Ok(CommitOutcome {
            status,
            cookie: Some(self.removal_cookie()),
        })
    }

    /// Saves against the loaded version; on a conflict reloads, replays this request's changes
    /// onto the newer record and tries again, up to the configured number of saves.
    async fn save_with_replay(
        &self,
        session: &Session,
        stored: &StoredSession,
        now: SystemTime,
    ) -> Result<CommitOutcome, SessionError> {
        let attempts = self.config.max_conflict_retries;
        let mut version = stored.version;
        let mut newer: Option<Record> = None;
        for attempt in 1..=attempts {
            let record = newer.as_ref().unwrap_or(&session.record);
            self.check_size(record)?;
            let Some(ttl) = self.write_ttl(record, now) else {
                self.store.delete(&stored.key).await?;
                return Ok(self.ended());
            };
            match self.store.save(&stored.key, record, ttl, version).await {
                Ok(_) => {
                    return Ok(CommitOutcome {
                        status: CommitStatus::Saved,
                        cookie: Some(self.set_cookie(&stored.id, ttl)),
                    });
                }
                Err(StoreError::NotFound) => return Ok(self.ended()),
                Err(StoreError::Conflict) => {
                    tracing::debug!(key = %stored.key, attempt, "save conflict; replaying onto the newer version");
                    backoff(attempt).await;
                    let Some(loaded) = self.load_live(&stored.key).await? else {
                        return Ok(self.ended());
                    };
                    let mut record = loaded.record;
                    session.replay_onto(&mut record);
                    newer = Some(record);
                    version = loaded.version;
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
        let Some(ttl) = self.write_ttl(record, now) else {
            self.store.delete(&stored.key).await?;
            return Ok(self.ended());
        };
        let due = match stored.expires_in {
            None => true,
            Some(left) => left < self.config.effective_touch_threshold() && ttl >= left + MIN_TTL,
        };
        if !due {
            return Ok(self.unchanged(stored));
        }
        if self.store.touch(&stored.key, ttl).await? {
            Ok(CommitOutcome {
                status: CommitStatus::Touched,
                cookie: Some(self.set_cookie(&stored.id, ttl)),
            })
        } else {
            Ok(self.ended())
        }
    }

    fn unchanged(&self, stored: &StoredSession) -> CommitOutcome {
        let cookie = stored.needs_resign.then(|| {
            let left = stored.expires_in.unwrap_or(self.config.idle_timeout);
            self.set_cookie(&stored.id, left)
        });
        CommitOutcome {
            status: CommitStatus::Unchanged,
            cookie,
        }
    }

    fn ended(&self) -> CommitOutcome {
        CommitOutcome {
            status: CommitStatus::Ended,
            cookie: None,
        }
    }

    fn set_cookie(&self, id: &SessionId, ttl: Duration) -> CookieDirective {
        let cookie = &self.config.cookie;
        let value = self.config.keys.sign(&cookie.name, id);
        let max_age = cookie.persistent.then_some(ttl);
        self.directive(value, max_age)
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
