//! [`RedisConfig`]: standalone or cluster, timeouts, key prefix and record size, built in code or
//! parsed from a URL.

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Standalone Redis or a Redis Cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Topology {
    /// One server (`redis://` or `rediss://` URL, as the redis crate reads it).
    Standalone(String),
    /// Seed nodes of a cluster, each a `redis://` or `rediss://` URL.
    Cluster(Vec<String>),
}

/// Where the sessions live and how to talk to Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub(crate) topology: Topology,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) key_prefix: String,
    pub(crate) max_record_size: usize,
}

impl fmt::Debug for RedisConfig {
    /// Never prints the URLs, which may carry passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topology = match &self.topology {
            Topology::Standalone(_) => "standalone".to_owned(),
            Topology::Cluster(seeds) => format!("cluster of {} seeds", seeds.len()),
        };
        f.debug_struct("RedisConfig")
            .field("topology", &topology)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("key_prefix", &self.key_prefix)
            .field("max_record_size", &self.max_record_size)
            .finish()
    }
}

/// The query parameters this store reads itself; the rest of a URL goes to the redis crate.
const OWN_PARAMETERS: [&str; 4] = [
    "timeout_ms",
    "connect_timeout_ms",
    "key_prefix",
    "max_record_size",
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

    /// Parses a URL:
    /// - `redis://[user:password@]host[:port][/db][?params]` or `rediss://...`: standalone;
    /// - `redis+cluster://[user:password@]host:port,host:port[?params]` (or
    ///   `rediss+cluster://`): a cluster from seed nodes.
    ///
    /// This store's parameters: `timeout_ms` (response timeout), `connect_timeout_ms`,
    /// `key_prefix`, `max_record_size`; any other parameter is left for the redis crate.
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
        } else if base.starts_with("redis://") || base.starts_with("rediss://") {
            Self::standalone(format!("{base}{rest_query}"))
        } else {
            return Err(UrlError::Scheme);
        };
        for (name, value) in own {
            let number = || {
                value.parse::<u64>().map_err(|_| UrlError::BadValue {
                    parameter: name.to_owned(),
                })
            };
            match name {
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

    /// The longest any single operation may take before it is reported as a timeout: a
    /// reconnection and one request.
    pub fn operation_deadline(&self) -> Duration {
        self.connect_timeout + self.response_timeout
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if self.max_record_size == 0 {
            return Err(ConfigError::ZeroMaxRecordSize);
        }
        if let Topology::Cluster(seeds) = &self.topology
            && seeds.is_empty()
        {
            return Err(ConfigError::Url(UrlError::NoServers));
        }
        Ok(())
    }
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
    /// Not `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://`.
    Scheme,
    /// A cluster URL without any host.
    NoServers,
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
                "a Redis URL starts with redis://, rediss://, redis+cluster:// or rediss+cluster://",
            ),
            Self::NoServers => f.write_str("the cluster URL names no node"),
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
    /// The redis crate rejected the connection settings, or (for a cluster) could not reach
    /// any seed node.
    Client(redis::RedisError),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(_) => f.write_str("invalid Redis URL"),
            Self::ZeroTimeout => f.write_str("Redis timeouts must be above zero"),
            Self::ZeroMaxRecordSize => f.write_str("the maximum record size must be above zero"),
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
}
