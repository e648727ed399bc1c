//! [`SessionConfig`]: keys, timeouts, storage keys, size limit and cookie attributes.

use std::time::Duration;

use crate::error::ConfigError;
use crate::id::{KeyPrefix, StorageKey};
use crate::signing::KeyRing;
use crate::store::{MAX_TTL, MIN_TTL, SessionStore};

/// The most bytes of name and value a browser keeps for one cookie (RFC 6265bis).
const MAX_COOKIE_BYTES: usize = 4096;

/// The longest attribute value a browser heeds (RFC 6265bis); a longer one is ignored.
const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// The `SameSite` attribute of the session cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only with same-site requests.
    Strict,
    /// Sent with same-site requests and top-level cross-site navigations (the default).
    Lax,
    /// Sent with every request, cross-site ones included (embedded content); browsers
    /// require `Secure` with it, and the configuration refuses it without.
    None,
}

impl SameSite {
    /// The attribute's value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "Strict",
            Self::Lax => "Lax",
            Self::None => "None",
        }
    }
}

/// What a commit does when this request set or removed a value (with
/// [`Session::insert`](crate::Session::insert), [`remove`](crate::Session::remove) or
/// [`clear`](crate::Session::clear)) that a concurrent request also changed.
///
/// Values changed with [`Session::update`](crate::Session::update) never conflict: the update
/// is run again on the newer value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SameKeyConflict {
    /// This request's value replaces the concurrent one (the request that commits last wins
    /// that value; other values of both requests are kept). The default.
    #[default]
    LastWriterWins,
    /// The commit fails with
    /// [`SessionError::ConcurrentModification`](crate::SessionError::ConcurrentModification)
    /// and writes nothing.
    Fail,
}

/// The session cookie's name and attributes.
#[derive(Clone, Debug)]
pub struct CookieConfig {
    pub(crate) name: String,
    pub(crate) path: String,
    pub(crate) domain: Option<String>,
    pub(crate) secure: bool,
    pub(crate) http_only: bool,
    pub(crate) same_site: SameSite,
    pub(crate) persistent: bool,
    pub(crate) partitioned: bool,
}

impl Default for CookieConfig {
    /// Name `session`, `Path=/`, no `Domain`, `Secure`, `HttpOnly`, `SameSite=Lax`, persistent,
    /// not `Partitioned`.
    fn default() -> Self {
        Self {
            name: "session".to_owned(),
            path: "/".to_owned(),
            domain: None,
            secure: true,
            http_only: true,
            same_site: SameSite::Lax,
            persistent: true,
            partitioned: false,
        }
    }
}

impl CookieConfig {
    /// Sets the cookie's name (an RFC 6265 token). A name starting with `__Host-` (the
    /// strongest choice: browsers then accept the cookie only with `Secure`, `Path=/` and no
    /// `Domain`, so a sibling subdomain cannot plant or overwrite it) or `__Secure-` (only with
    /// `Secure`) is checked against its prefix's rules.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the `Path` attribute.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = path.into();
        self
    }

    /// Sets or removes the `Domain` attribute.
    pub fn domain(mut self, domain: Option<String>) -> Self {
        self.domain = domain;
        self
    }

    /// Sets the `Secure` attribute (on by default; turn off only for plain-HTTP development).
    pub fn secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the `HttpOnly` attribute (on by default).
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.http_only = http_only;
        self
    }

    /// Sets the `SameSite` attribute.
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.same_site = same_site;
        self
    }

    /// Whether the cookie carries `Max-Age` (on by default) or is a browser-session cookie that
    /// ends when the browser closes. `Max-Age` is the session's time left plus one idle timeout,
    /// capped at the absolute deadline, so that a refresh lost on the way does not let the
    /// cookie run out before the next one.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Sets the `Partitioned` attribute (CHIPS: a cookie kept per top-level site, for a session
    /// inside third-party iframes; off by default). Browsers require `Secure` with it.
    pub fn partitioned(mut self, partitioned: bool) -> Self {
        self.partitioned = partitioned;
        self
    }

    /// The cookie's name.
    pub fn cookie_name(&self) -> &str {
        &self.name
    }

    /// Checks the rules browsers enforce by silently dropping the cookie.
    fn validate_browser_rules(&self) -> Result<(), ConfigError> {
        let broken = |rule| Err(ConfigError::CookieRule { rule });
        let has_prefix = |prefix: &str| {
            self.name
                .get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
        };
        if !self.path.starts_with('/') {
            return broken("Path must start with '/'");
        }
        // The value is the signed id, whose length is fixed.
        if self.name.len() + crate::signing::COOKIE_VALUE_LEN > MAX_COOKIE_BYTES {
            return broken("the cookie's name and value must fit in 4096 bytes");
        }
        let domain_len = self.domain.as_deref().map_or(0, str::len);
        if self.path.len() > MAX_ATTRIBUTE_BYTES || domain_len > MAX_ATTRIBUTE_BYTES {
            return broken("Path and Domain must be at most 1024 bytes");
        }
        if self.same_site == SameSite::None && !self.secure {
            return broken("SameSite=None requires Secure");
        }
        if self.partitioned && !self.secure {
            return broken("Partitioned requires Secure");
        }
        if has_prefix("__Secure-") && !self.secure {
            return broken("a __Secure- cookie requires Secure");
        }
        if has_prefix("__Host-") {
            if !self.secure {
                return broken("a __Host- cookie requires Secure");
            }
            if self.path != "/" {
                return broken("a __Host- cookie requires Path=/");
            }
            if self.domain.is_some() {
                return broken("a __Host- cookie must not have a Domain");
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let is_token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if self.name.is_empty() || !self.name.bytes().all(is_token) {
            return Err(ConfigError::InvalidCookieName);
        }
        let is_attribute =
            |text: &str| text.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';');
        if !is_attribute(&self.path) {
            return Err(ConfigError::InvalidCookieAttribute { attribute: "path" });
        }
        if self
            .domain
            .as_deref()
            .is_some_and(|d| d.is_empty() || !is_attribute(d))
        {
            return Err(ConfigError::InvalidCookieAttribute {
                attribute: "domain",
            });
        }
        self.validate_browser_rules()
    }
}

/// Everything the [`SessionManager`](crate::SessionManager) needs besides its store.
///
/// The tornado-memcached-sessions settings map onto it: `cookie_secret` / `session_secret`
/// become keys of the [`KeyRing`], `session_timeout` the [`idle_timeout`](Self::idle_timeout).
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub(crate) keys: KeyRing,
    pub(crate) idle_timeout: Duration,
    pub(crate) absolute_timeout: Option<Duration>,
    pub(crate) touch_threshold: Option<Duration>,
    pub(crate) key_prefix: KeyPrefix,
    pub(crate) max_encoded_size: usize,
    /// Whether `max_encoded_size` was set (else it follows the store's limit when lower).
    pub(crate) max_encoded_size_set: bool,
    pub(crate) cookie: CookieConfig,
    pub(crate) max_conflict_retries: u32,
    pub(crate) same_key_conflict: SameKeyConflict,
    pub(crate) moved_marker_ttl: Duration,
}

impl SessionConfig {
    /// The default idle timeout: 60 minutes.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
    /// The default maximum encoded session size: 64 KiB.
    pub const DEFAULT_MAX_ENCODED_SIZE: usize = 64 * 1024;
    /// The default number of saves tried when concurrent requests conflict.
    pub const DEFAULT_MAX_CONFLICT_RETRIES: u32 = 64;
    /// The default life of the marker an id cycle leaves under the old key: one minute.
    pub const DEFAULT_MOVED_MARKER_TTL: Duration = Duration::from_secs(60);

    /// A configuration with `keys` and every other setting at its default.
    pub fn new(keys: KeyRing) -> Self {
        Self {
            keys,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            absolute_timeout: None,
            touch_threshold: None,
            key_prefix: KeyPrefix::default(),
            max_encoded_size: Self::DEFAULT_MAX_ENCODED_SIZE,
            max_encoded_size_set: false,
            cookie: CookieConfig::default(),
            max_conflict_retries: Self::DEFAULT_MAX_CONFLICT_RETRIES,
            same_key_conflict: SameKeyConflict::default(),
            moved_marker_ttl: Self::DEFAULT_MOVED_MARKER_TTL,
        }
    }

    /// How long a session lives without a request (default 60 minutes).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How long a session lives at most from its creation, however active (default: no limit;
    /// at most 400 days). It applies to sessions created before it was set, too.
    pub fn absolute_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.absolute_timeout = timeout;
        self
    }

    /// An unmodified session is touched (its expiry pushed back) only once its remaining idle
    /// time falls below this (default: half the idle timeout; at least one second).
    pub fn touch_threshold(mut self, threshold: Duration) -> Self {
        self.touch_threshold = Some(threshold);
        self
    }

    /// The prefix of every storage key (default `session:`).
    pub fn key_prefix(mut self, prefix: KeyPrefix) -> Self {
        self.key_prefix = prefix;
        self
    }

    /// The largest encoded session the manager writes (default 64 KiB, or the store's
    /// record limit if that is lower). Set above the store's limit, the manager refuses it.
    pub fn max_encoded_size(mut self, bytes: usize) -> Self {
        self.max_encoded_size = bytes;
        self.max_encoded_size_set = true;
        self
    }

    /// The cookie's name and attributes.
    pub fn cookie(mut self, cookie: CookieConfig) -> Self {
        self.cookie = cookie;
        self
    }

    /// How many saves a commit tries when concurrent requests change the same session.
    pub fn max_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries.max(1);
        self
    }

    /// What a commit does when this request's `insert`, `remove` or `clear` meets a
    /// concurrent change of the same value (default: last writer wins).
    pub fn same_key_conflicts(mut self, policy: SameKeyConflict) -> Self {
        self.same_key_conflict = policy;
        self
    }

    /// How long the marker an id cycle leaves under the old key lives (default one minute).
    ///
    /// While it lives, a request that loaded the session before the cycle and saves after it
    /// follows the marker and saves into the new entry, a logout that loaded it before follows
    /// it and ends the new entry, and a request arriving with the old id sees no session and
    /// cannot write one (its changes are reported lost as
    /// [`CommitStatus::Superseded`](crate::CommitStatus::Superseded), so a late response cannot
    /// replace the new cookie with a fresh anonymous one). Set it above the longest time a
    /// request can run; a touch does not extend it.
    pub fn moved_marker_ttl(mut self, ttl: Duration) -> Self {
        self.moved_marker_ttl = ttl;
        self
    }

    /// The idle timeout.
    pub fn idle(&self) -> Duration {
        self.idle_timeout
    }

    /// The cookie settings.
    pub fn cookie_config(&self) -> &CookieConfig {
        &self.cookie
    }

    pub(crate) fn effective_touch_threshold(&self) -> Duration {
        self.touch_threshold
            .unwrap_or((self.idle_timeout / 2).max(MIN_TTL))
    }

    /// Checks the configuration against itself and against the limits of `store`, and lowers
    /// a default maximum encoded size to the store's record limit.
    pub(crate) fn fit_to(&mut self, store: &dyn SessionStore) -> Result<(), ConfigError> {
        if !self.max_encoded_size_set {
            self.max_encoded_size = self.max_encoded_size.min(store.max_record_size());
        }
        self.validate()?;
        let key_len = self.key_prefix.as_str().len() + StorageKey::HASH_TEXT_LEN;
        if let Some(limit) = store.max_key_len()
            && key_len > limit
        {
            return Err(ConfigError::KeyTooLong {
                len: key_len,
                limit,
            });
        }
        if self.max_encoded_size > store.max_record_size() {
            return Err(ConfigError::MaxEncodedSizeOverStoreLimit {
                max_encoded_size: self.max_encoded_size,
                store_limit: store.max_record_size(),
            });
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let in_range = |d: Duration| (MIN_TTL..=MAX_TTL).contains(&d);
        if !in_range(self.idle_timeout) {
            return Err(ConfigError::TimeoutOutOfRange {
                setting: "idle timeout",
                value: self.idle_timeout,
            });
        }
        if let Some(absolute) = self.absolute_timeout
            && !in_range(absolute)
        {
            return Err(ConfigError::TimeoutOutOfRange {
                setting: "absolute timeout",
                value: absolute,
            });
        }
        if !in_range(self.moved_marker_ttl) {
            return Err(ConfigError::TimeoutOutOfRange {
                setting: "moved marker TTL",
                value: self.moved_marker_ttl,
            });
        }
        if self.touch_threshold.is_some_and(|t| t < MIN_TTL) {
            return Err(ConfigError::TimeoutOutOfRange {
                setting: "touch threshold",
                value: self.effective_touch_threshold(),
            });
        }
        if self.effective_touch_threshold() > self.idle_timeout {
            return Err(ConfigError::TouchThresholdTooLong);
        }
        if self.max_encoded_size == 0 {
            return Err(ConfigError::ZeroMaxEncodedSize);
        }
        self.cookie.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SigningKey;

    fn config() -> SessionConfig {
        SessionConfig::new(KeyRing::single(SigningKey::new([7u8; 32]).unwrap()))
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = config();
        assert!(c.validate().is_ok());
        assert_eq!(c.idle(), Duration::from_secs(3600));
        assert_eq!(c.effective_touch_threshold(), Duration::from_secs(1800));
        assert!(c.cookie.secure && c.cookie.http_only);
        assert_eq!(c.cookie.same_site, SameSite::Lax);
    }

    #[test]
    fn out_of_range_settings_are_rejected() {
        assert!(
            config()
                .idle_timeout(Duration::from_millis(999))
                .validate()
                .is_err()
        );
        assert!(
            config()
                .idle_timeout(MAX_TTL + Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            config()
                .idle_timeout(Duration::from_secs(90 * 86400))
                .validate()
                .is_ok()
        );
        assert!(
            config()
                .absolute_timeout(Some(Duration::ZERO))
                .validate()
                .is_err()
        );
        assert!(
            config()
                .absolute_timeout(Some(Duration::MAX))
                .validate()
                .is_err()
        );
        assert!(config().touch_threshold(Duration::ZERO).validate().is_err());
        assert!(
            config()
                .idle_timeout(Duration::from_secs(1))
                .validate()
                .is_ok()
        );
        assert_eq!(
            config()
                .idle_timeout(Duration::from_secs(10))
                .touch_threshold(Duration::from_secs(11))
                .validate(),
            Err(ConfigError::TouchThresholdTooLong)
        );
        assert_eq!(
            config().max_encoded_size(0).validate(),
            Err(ConfigError::ZeroMaxEncodedSize)
        );
        for bad in ["", "a b", "a;b", "sé", "a=b"] {
            assert_eq!(
                config()
                    .cookie(CookieConfig::default().name(bad))
                    .validate(),
                Err(ConfigError::InvalidCookieName),
                "{bad:?}"
            );
        }
        assert!(
            config()
                .cookie(CookieConfig::default().path("/a;b"))
                .validate()
                .is_err()
        );
        assert!(
            config()
                .cookie(CookieConfig::default().domain(Some("a b".into())))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn cookie_settings_browsers_would_drop_are_refused_naming_the_rule() {
        let refused = |cookie: CookieConfig| match config().cookie(cookie).validate() {
            Err(ConfigError::CookieRule { rule }) => rule,
            other => panic!("expected a cookie rule error, got {other:?}"),
        };
        let plain = || CookieConfig::default().secure(false);
        assert_eq!(
            refused(plain().same_site(SameSite::None)),
            "SameSite=None requires Secure"
        );
        assert_eq!(
            refused(plain().partitioned(true)),
            "Partitioned requires Secure"
        );
        assert_eq!(
            refused(plain().name("__Secure-sid")),
            "a __Secure- cookie requires Secure"
        );
        assert_eq!(
            refused(plain().name("__host-sid")),
            "a __Host- cookie requires Secure"
        );
        let host = || CookieConfig::default().name("__Host-sid");
        assert_eq!(
            refused(host().path("/app")),
            "a __Host- cookie requires Path=/"
        );
        assert_eq!(
            refused(host().domain(Some("example.com".into()))),
            "a __Host- cookie must not have a Domain"
        );
        let message = config()
            .cookie(plain().same_site(SameSite::None))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("SameSite=None requires Secure"),
            "{message}"
        );
        // Browsers ignore a Path that does not start with '/' (the cookie then gets the
        // request's directory) and drop a cookie whose name and value pass 4096 bytes.
        for bad_path in ["", "login", "app/"] {
            assert_eq!(
                config()
                    .cookie(CookieConfig::default().path(bad_path))
                    .validate(),
                Err(ConfigError::CookieRule {
                    rule: "Path must start with '/'"
                }),
                "{bad_path:?}"
            );
        }
        assert_eq!(
            refused(CookieConfig::default().name("n".repeat(4096))),
            "the cookie's name and value must fit in 4096 bytes"
        );
        let longest_name = 4096 - crate::signing::COOKIE_VALUE_LEN;
        assert!(
            config()
                .cookie(CookieConfig::default().name("n".repeat(longest_name)))
                .validate()
                .is_ok()
        );
        // Browsers ignore a Path or Domain over 1024 bytes.
        assert_eq!(
            refused(CookieConfig::default().path(format!("/{}", "a".repeat(1024)))),
            "Path and Domain must be at most 1024 bytes"
        );
        assert_eq!(
            refused(CookieConfig::default().domain(Some("a".repeat(1025)))),
            "Path and Domain must be at most 1024 bytes"
        );
        for fine in [
            CookieConfig::default().same_site(SameSite::None),
            CookieConfig::default().partitioned(true),
            host(),
            CookieConfig::default().name("__Secure-sid").path("/app"),
            plain(),
        ] {
            assert!(config().cookie(fine).validate().is_ok());
        }
    }
}
