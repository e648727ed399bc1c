//! [`RedisConfig`]: standalone, cluster or Sentinel, timeouts, key prefix, record size and the
//! wait-for-replicas option, built in code or parsed from a URL.

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Standalone Redis, a Redis Cluster, or a master found through Redis Sentinel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server (`redis://` or `rediss://` URL, as the redis crate reads it).
    Standalone(String),
    /// Seed nodes of a cluster, each a `redis://` or `rediss://` URL.
    Cluster(Vec<String>),
    /// A master named by Sentinel.
    Sentinel(SentinelTopology),
}

/// Where the sentinels are, which master they watch, and how to log in to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SentinelTopology {
    /// The sentinels, each a `redis://host:port` URL (credentials in a URL are the sentinel's).
    pub(crate) sentinels: Vec<String>,
    /// The master's name in the sentinels' configuration.
    pub(crate) master_name: String,
    /// The database to select on the master.
    pub(crate) database: i64,
    /// The master's ACL user name, if any.
    pub(crate) username: Option<String>,
    /// The master's password, if any.
    pub(crate) password: Option<String>,
}

/// `WAIT numreplicas timeout` after every write: see [`RedisConfig::wait_for_replicas`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WaitForReplicas {
    /// How many replicas must acknowledge each write.
    pub(crate) replicas: u32,
    /// How long the master waits for them.
    pub(crate) timeout: Duration,
}

/// Where the sessions live and how to talk to Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub(crate) topology: Topology,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) key_prefix: String,
    pub(crate) max_record_size: usize,
    pub(crate) wait: Option<WaitForReplicas>,
}

impl fmt::Debug for RedisConfig {
    /// Never prints the URLs, which may carry passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topology = match &self.topology {
            Topology::Standalone(_) => "standalone".to_owned(),
            Topology::Cluster(seeds) => format!("cluster of {} seeds", seeds.len()),
            Topology::Sentinel(sentinel) => format!(
                "master {:?} from {} sentinels",
                sentinel.master_name,
                sentinel.sentinels.len()
            ),
        };
        f.debug_struct("RedisConfig")
            .field("topology", &topology)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .field("wait", &self.wait)
            .finish()
    }
}

/// The query parameters this store reads itself; the rest of a URL goes to the redis crate.
const OWN_PARAMETERS: [&str; 6] = [
    "timeout_ms",
    "connect_timeout_ms",
    "key_prefix",
    "max_record_size",
    "wait_replicas",
    "wait_timeout_ms",
];

impl RedisConfig {
    /// Default time allowed to connect.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default time allowed for a response.
    pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default largest encoded record, in bytes.
    pub const DEFAULT_MAX_RECORD_SIZE: usize = 1024 * 1024;

    fn with_topology(topology: Topology) -> Self {
        Self {
            topology,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            response_timeout: Self::DEFAULT_RESPONSE_TIMEOUT,
            key_prefix: String::new(),
            max_record_size: Self::DEFAULT_MAX_RECORD_SIZE,
            wait: None,
        }
    }

    /// A standalone server: `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS
    /// (with the `tls` feature).
    pub fn standalone(url: impl Into<String>) -> Self {
        Self::with_topology(Topology::Standalone(url.into()))
    }

    /// A cluster, from one or more seed nodes given as `redis://` or `rediss://` URLs.
    pub fn cluster(seeds: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::with_topology(Topology::Cluster(
            seeds.into_iter().map(Into::into).collect(),
        ))
    }

    /// A master found through Redis Sentinel: `sentinels` are the sentinels' `redis://host:port`
    /// URLs (credentials in them are the sentinels' own), `master_name` the name they watch the
    /// master under. The store asks them for the master when it first needs it, and again after
    /// a connection error or a `READONLY` reply; see the crate docs. The master's database and
    /// credentials are set with [`master_database`](Self::master_database) and
    /// [`master_credentials`](Self::master_credentials).
    pub fn sentinel(
        sentinels: impl IntoIterator<Item = impl Into<String>>,
        master_name: impl Into<String>,
    ) -> Self {
        Self::with_topology(Topology::Sentinel(SentinelTopology {
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            master_name: master_name.into(),
            database: 0,
            username: None,
            password: None,
        }))
    }

    /// The database to select on a Sentinel-named master (default 0). Ignored by the other
    /// topologies, whose URLs carry the database.
    pub fn master_database(mut self, database: i64) -> Self {
        if let Topology::Sentinel(sentinel) = &mut self.topology {
            sentinel.database = database;
        }
        self
    }

    /// The user name (`None` for the default user) and password to log in to a Sentinel-named
    /// master with. Ignored by the other topologies, whose URLs carry credentials.
    pub fn master_credentials(
        mut self,
        username: Option<impl Into<String>>,
        password: impl Into<String>,
    ) -> Self {
        if let Topology::Sentinel(sentinel) = &mut self.topology {
            sentinel.username = username.map(Into::into);
            sentinel.password = Some(password.into());
        }
        self
    }

    /// After every write (create, save, mark_moved, touch, delete, delete_if_version), send
    /// `WAIT replicas timeout` on the same connection, pipelined with the write, and fail the
    /// operation unless at least `replicas` replicas acknowledged it within `timeout`.
    ///
    /// A write that falls short is reported as [`StoreError::Backend`] whose source is a
    /// [`NotReplicated`](crate::NotReplicated): the master applied it, but it may or may not
    /// survive a failover. Each write costs one replication round trip more (the master waits
    /// for the replicas' acknowledgement), and the response timeout of every request is extended
    /// by `timeout`, so [`operation_deadline`](Self::operation_deadline) grows by it too.
    /// `replicas` and `timeout` must be above zero ([`ConfigError::ZeroReplicas`],
    /// [`ConfigError::ZeroTimeout`]).
    ///
    /// [`StoreError::Backend`]: session_core::StoreError::Backend
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = Some(WaitForReplicas { replicas, timeout });
        self
    }

    /// Parses a URL:
    /// - `redis://[user:password@]host[:port][/db][?params]` or `rediss://...`: standalone;
    /// - `redis+cluster://[user:password@]host:port,host:port[?params]` (or
    ///   `rediss+cluster://`): a cluster from seed nodes;
    /// - `redis+sentinel://[user:password@]host:port,host:port/master-name[/db][?params]`: the
    ///   master that the sentinels at the listed addresses watch under `master-name`; the
    ///   credentials and the database are the master's (the sentinels are asked without
    ///   credentials; give sentinel URLs with credentials to [`RedisConfig::sentinel`] if they
    ///   need them). No TLS for Sentinel.
    ///
    /// This store's parameters: `timeout_ms` (response timeout), `connect_timeout_ms`,
    /// `key_prefix`, `max_record_size`, and `wait_replicas` with `wait_timeout_ms` (both or
    /// neither: [`RedisConfig::wait_for_replicas`]); any other parameter is left for the redis
    /// crate (ignored for Sentinel).
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut own = Vec::new();
        let mut passed_on = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if OWN_PARAMETERS.contains(&name) {
                own.push((name, value));
            } else {
                passed_on.push(pair);
            }
        }
        let rest_query = if passed_on.is_empty() {
            String::new()
        } else {
            format!("?{}", passed_on.join("&"))
        };
        let mut config = if let Some((scheme, hosts)) = cluster_scheme(base) {
            let (credentials, hosts) = match hosts.rsplit_once('@') {
                Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
                None => (String::new(), hosts),
            };
            let seeds: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|host| format!("{scheme}://{credentials}{host}{rest_query}"))
                .collect();
            if seeds.is_empty() {
                return Err(UrlError::NoServers);
            }
            Self::cluster(seeds)
        } else if let Some(rest) = base.strip_prefix("redis+sentinel://") {
            sentinel_from_url(rest)?
        } else if base.starts_with("redis://") || base.starts_with("rediss://") {
            Self::standalone(format!("{base}{rest_query}"))
        } else {
            return Err(UrlError::Scheme);
        };
        let mut wait_replicas = None;
        let mut wait_timeout = None;
        for (name, value) in own {
            let number = || {
                value.parse::<u64>().map_err(|_| UrlError::BadValue {
                    parameter: name.to_owned(),
                })
            };
            match name {
                "wait_replicas" => {
                    wait_replicas =
                        Some(u32::try_from(number()?).map_err(|_| UrlError::BadValue {
                            parameter: name.to_owned(),
                        })?);
                }
                "wait_timeout_ms" => wait_timeout = Some(Duration::from_millis(number()?)),
                "timeout_ms" => config.response_timeout = Duration::from_millis(number()?),
                "connect_timeout_ms" => config.connect_timeout = Duration::from_millis(number()?),
                "max_record_size" => {
                    config.max_record_size =
                        usize::try_from(number()?).map_err(|_| UrlError::BadValue {
                            parameter: name.to_owned(),
                        })?;
                }
                _ => config.key_prefix = value.to_owned(),
            }
        }
        match (wait_replicas, wait_timeout) {
            (Some(replicas), Some(timeout)) => config = config.wait_for_replicas(replicas, timeout),
            (None, None) => {}
            _ => return Err(UrlError::WaitNeedsBoth),
        }
        Ok(config)
    }

    /// Time allowed to connect (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for a response (default 1 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// A prefix put in front of every storage key, to share a server between applications.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The largest encoded record accepted, in bytes (default 1 MiB).
    pub fn max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// Whether this is a cluster configuration.
    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    /// Whether the master is found through Sentinel.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.topology, Topology::Sentinel(_))
    }

    /// The response timeout of every request: the configured one, plus the replicas' wait when
    /// [`wait_for_replicas`](Self::wait_for_replicas) is set (the write and its `WAIT` travel
    /// together).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.response_timeout + self.wait.map_or(Duration::ZERO, |wait| wait.timeout)
    }

    /// The longest any single operation may take before it is reported as a timeout: a
    /// reconnection and one request (whose response timeout includes the replicas' wait, if
    /// set). With Sentinel, an operation that fails on a connection error or a `READONLY` reply
    /// spends what is left of this deadline asking the sentinels and retrying; it never takes
    /// longer.
    pub fn operation_deadline(&self) -> Duration {
        self.connect_timeout + self.request_timeout()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if self.max_record_size == 0 {
            return Err(ConfigError::ZeroMaxRecordSize);
        }
        match &self.topology {
            Topology::Cluster(seeds) if seeds.is_empty() => {
                return Err(ConfigError::Url(UrlError::NoServers));
            }
            Topology::Sentinel(sentinel) if sentinel.sentinels.is_empty() => {
                return Err(ConfigError::Url(UrlError::NoServers));
            }
            Topology::Sentinel(sentinel) if sentinel.master_name.is_empty() => {
                return Err(ConfigError::Url(UrlError::NoMasterName));
            }
            _ => {}
        }
        if let Some(wait) = self.wait {
            if wait.replicas == 0 {
                return Err(ConfigError::ZeroReplicas);
            }
            if wait.timeout.is_zero() {
                // WAIT with a timeout of 0 blocks forever.
                return Err(ConfigError::ZeroTimeout);
            }
        }
        Ok(())
    }
}

/// The part of a `redis+sentinel://` URL after the scheme, query removed:
/// `[user:password@]host:port,host:port/master-name[/db]`.
fn sentinel_from_url(rest: &str) -> Result<RedisConfig, UrlError> {
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((credentials, rest)) => (Some(credentials), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let sentinels: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| format!("redis://{host}"))
        .collect();
    if sentinels.is_empty() {
        return Err(UrlError::NoServers);
    }
    let mut segments = path.split('/');
    let master_name = segments.next().unwrap_or_default();
    if master_name.is_empty() {
        return Err(UrlError::NoMasterName);
    }
    let database = match segments.next() {
        None | Some("") => 0,
        Some(db) => db.parse::<i64>().map_err(|_| UrlError::BadDatabase)?,
    };
    if segments.any(|s| !s.is_empty()) {
        return Err(UrlError::BadDatabase);
    }
    let mut config = RedisConfig::sentinel(sentinels, master_name).master_database(database);
    if let Some(credentials) = credentials {
        let (username, password) = credentials.split_once(':').unwrap_or(("", credentials));
        let username = percent_decode(username)?;
        let username = (!username.is_empty()).then_some(username);
        config = config.master_credentials(username, percent_decode(password)?);
    }
    Ok(config)
}

/// Decodes `%XX` escapes in a URL's user name or password.
fn percent_decode(text: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or(UrlError::BadCredentials)?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::BadCredentials)
}

fn cluster_scheme(url: &str) -> Option<(&'static str, &str)> {
    if let Some(hosts) = url.strip_prefix("redis+cluster://") {
        Some(("redis", hosts))
    } else {
        url.strip_prefix("rediss+cluster://")
            .map(|hosts| ("rediss", hosts))
    }
}

/// A Redis URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// Not `redis://`, `rediss://`, `redis+cluster://`, `rediss+cluster://` or
    /// `redis+sentinel://`.
    Scheme,
    /// A cluster or Sentinel URL without any host.
    NoServers,
    /// A Sentinel URL without the master's name (`/master-name` after the hosts).
    NoMasterName,
    /// A Sentinel URL whose path after the master's name is not a database number.
    BadDatabase,
    /// `wait_replicas` without `wait_timeout_ms`, or the other way round.
    WaitNeedsBoth,
    /// A Sentinel URL's user name or password holds a bad `%` escape or is not UTF-8.
    BadCredentials,
    /// One of this store's parameters does not hold a number.
    BadValue {
        /// The parameter's name.
        parameter: String,
    },
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scheme => f.write_str(
                "a Redis URL starts with redis://, rediss://, redis+cluster://, rediss+cluster:// \
                 or redis+sentinel://",
            ),
            Self::NoServers => f.write_str("the URL names no node"),
            Self::NoMasterName => {
                f.write_str("the Sentinel URL names no master (redis+sentinel://hosts/name)")
            }
            Self::BadDatabase => f.write_str("the Sentinel URL's database is not a number"),
            Self::BadCredentials => {
                f.write_str("the Sentinel URL's credentials are not valid percent-encoded UTF-8")
            }
            Self::WaitNeedsBoth => {
                f.write_str("wait_replicas and wait_timeout_ms go together: give both or neither")
            }
            Self::BadValue { parameter } => write!(f, "parameter {parameter:?} needs a number"),
        }
    }
}

impl Error for UrlError {}

/// A configuration the store cannot be built from.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL did not parse.
    Url(UrlError),
    /// A timeout of zero.
    ZeroTimeout,
    /// A maximum record size of zero.
    ZeroMaxRecordSize,
    /// [`RedisConfig::wait_for_replicas`] with zero replicas.
    ZeroReplicas,
    /// The redis crate rejected the connection settings (a sentinel URL, say), or (for a
    /// cluster) could not reach any seed node.
    Client(redis::RedisError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(_) => f.write_str("invalid Redis URL"),
            Self::ZeroTimeout => f.write_str("Redis timeouts must be above zero"),
            Self::ZeroMaxRecordSize => f.write_str("the maximum record size must be above zero"),
            Self::ZeroReplicas => f.write_str("waiting for zero replicas waits for nothing"),
            Self::Client(_) => f.write_str("the Redis client could not be set up"),
        }
    }
}

impl Error for ConfigError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Url(e) => Some(e),
            Self::Client(e) => Some(e),
            _ => None,
        }
    }
}

impl From<UrlError> for ConfigError {
    fn from(e: UrlError) -> Self {
        Self::Url(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_urls_keep_credentials_and_pass_unknown_parameters_on() {
        let config = RedisConfig::from_url(
            "redis://user:secret@host:6380/2?timeout_ms=250&protocol=resp3&key_prefix=app:",
        )
        .unwrap();
        assert_eq!(
            config.topology,
            Topology::Standalone("redis://user:secret@host:6380/2?protocol=resp3".into())
        );
        assert_eq!(config.response_timeout, Duration::from_millis(250));
        assert_eq!(config.key_prefix, "app:");
        assert!(!format!("{config:?}").contains("secret"));
        assert!(RedisConfig::from_url("rediss://host").is_ok());
    }

    #[test]
    fn cluster_urls_become_seed_lists() {
        let config = RedisConfig::from_url(
            "redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/?connect_timeout_ms=100&max_record_size=4096",
        )
        .unwrap();
        assert_eq!(
            config.topology,
            Topology::Cluster(vec![
                "redis://u:p@10.0.0.1:7000".into(),
                "redis://u:p@10.0.0.2:7001".into()
            ])
        );
        assert_eq!(config.connect_timeout, Duration::from_millis(100));
        assert_eq!(config.max_record_size, 4096);
        assert!(config.is_cluster());
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        assert_eq!(
            RedisConfig::from_url("memcached://x"),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            RedisConfig::from_url("redis+cluster://"),
            Err(UrlError::NoServers)
        );
        assert_eq!(
            RedisConfig::from_url("redis://h?timeout_ms=x"),
            Err(UrlError::BadValue {
                parameter: "timeout_ms".into()
            })
        );
    }

    #[test]
    fn sentinel_urls_name_sentinels_master_database_and_credentials() {
        let config = RedisConfig::from_url(
            "redis+sentinel://app:s%40cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/3?timeout_ms=250&key_prefix=a:",
        )
        .unwrap();
        assert_eq!(
            config.topology,
            Topology::Sentinel(SentinelTopology {
                sentinels: vec![
                    "redis://10.0.0.1:26379".into(),
                    "redis://10.0.0.2:26380".into()
                ],
                master_name: "mymaster".into(),
                database: 3,
                username: Some("app".into()),
                password: Some("s@cret".into()),
            })
        );
        assert!(config.is_sentinel() && !config.is_cluster());
        assert_eq!(config.response_timeout, Duration::from_millis(250));
        assert_eq!(config.key_prefix, "a:");
        let debug = format!("{config:?}");
        assert!(!debug.contains("cret"), "{debug}");
        assert!(debug.contains("mymaster"), "{debug}");

        let plain = RedisConfig::from_url("redis+sentinel://h:26379/m").unwrap();
        assert_eq!(
            plain.topology,
            Topology::Sentinel(SentinelTopology {
                sentinels: vec!["redis://h:26379".into()],
                master_name: "m".into(),
                database: 0,
                username: None,
                password: None,
            })
        );
        // A password alone (no user name), and a trailing slash.
        let password_only = RedisConfig::from_url("redis+sentinel://:pw@h:1/m/").unwrap();
        let Topology::Sentinel(sentinel) = password_only.topology else {
            panic!("a Sentinel topology");
        };
        assert_eq!(
            (sentinel.username, sentinel.password),
            (None, Some("pw".into()))
        );
    }

    #[test]
    fn the_builder_matches_the_url() {
        let built = RedisConfig::sentinel(["redis://h:26379"], "m")
            .master_database(2)
            .master_credentials(Some("u"), "p")
            .wait_for_replicas(1, Duration::from_millis(500));
        let parsed = RedisConfig::from_url(
            "redis+sentinel://u:p@h:26379/m/2?wait_replicas=1&wait_timeout_ms=500",
        )
        .unwrap();
        assert_eq!(built, parsed);
        // The master's settings do not apply to other topologies.
        let standalone = RedisConfig::standalone("redis://h")
            .master_database(2)
            .master_credentials(None::<String>, "p");
        assert_eq!(standalone, RedisConfig::standalone("redis://h"));
    }

    #[test]
    fn wait_parameters_set_the_option_and_extend_the_deadline() {
        let config =
            RedisConfig::from_url("redis://h?wait_replicas=2&wait_timeout_ms=300&timeout_ms=100")
                .unwrap();
        assert_eq!(
            config.wait,
            Some(WaitForReplicas {
                replicas: 2,
                timeout: Duration::from_millis(300)
            })
        );
        // Not passed on to the redis crate.
        assert_eq!(config.topology, Topology::Standalone("redis://h".into()));
        assert_eq!(config.request_timeout(), Duration::from_millis(400));
        assert_eq!(
            config.operation_deadline(),
            RedisConfig::DEFAULT_CONNECT_TIMEOUT + Duration::from_millis(400)
        );
        let cluster =
            RedisConfig::from_url("redis+cluster://a:1,b:2?wait_replicas=1&wait_timeout_ms=50")
                .unwrap();
        assert_eq!(cluster.wait.map(|w| w.replicas), Some(1));
        assert_eq!(RedisConfig::from_url("redis://h").unwrap().wait, None);
    }

    #[test]
    fn bad_sentinel_and_wait_urls_are_typed_errors() {
        let cases = [
            ("redis+sentinel://", UrlError::NoServers),
            ("redis+sentinel:///m", UrlError::NoServers),
            ("redis+sentinel://h:1", UrlError::NoMasterName),
            ("redis+sentinel://h:1/", UrlError::NoMasterName),
            ("redis+sentinel://h:1/m/x", UrlError::BadDatabase),
            ("redis+sentinel://h:1/m/1/2", UrlError::BadDatabase),
            ("redis+sentinel://u:%zz@h:1/m", UrlError::BadCredentials),
            ("redis+sentinel://u:%ff@h:1/m", UrlError::BadCredentials),
            ("rediss+sentinel://h:1/m", UrlError::Scheme),
            ("redis://h?wait_replicas=1", UrlError::WaitNeedsBoth),
            ("redis://h?wait_timeout_ms=10", UrlError::WaitNeedsBoth),
            (
                "redis://h?wait_replicas=x&wait_timeout_ms=10",
                UrlError::BadValue {
                    parameter: "wait_replicas".into(),
                },
            ),
            (
                "redis://h?wait_replicas=4294967296&wait_timeout_ms=10",
                UrlError::BadValue {
                    parameter: "wait_replicas".into(),
                },
            ),
            (
                "redis+sentinel://h:1/m?wait_replicas=1&wait_timeout_ms=-1",
                UrlError::BadValue {
                    parameter: "wait_timeout_ms".into(),
                },
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(RedisConfig::from_url(url), Err(expected), "{url}");
        }
    }

    #[test]
    fn invalid_settings_are_typed_errors_at_validation() {
        let zero_replicas =
            RedisConfig::standalone("redis://h").wait_for_replicas(0, Duration::from_secs(1));
        assert!(matches!(
            zero_replicas.validate(),
            Err(ConfigError::ZeroReplicas)
        ));
        let zero_wait = RedisConfig::standalone("redis://h").wait_for_replicas(1, Duration::ZERO);
        assert!(matches!(
            zero_wait.validate(),
            Err(ConfigError::ZeroTimeout)
        ));
        let no_sentinels = RedisConfig::sentinel(Vec::<String>::new(), "m");
        assert!(matches!(
            no_sentinels.validate(),
            Err(ConfigError::Url(UrlError::NoServers))
        ));
        let no_name = RedisConfig::sentinel(["redis://h:1"], "");
        assert!(matches!(
            no_name.validate(),
            Err(ConfigError::Url(UrlError::NoMasterName))
        ));
        assert!(
            RedisConfig::sentinel(["redis://h:1"], "m")
                .wait_for_replicas(1, Duration::from_millis(1))
                .validate()
                .is_ok()
        );
    }
}
