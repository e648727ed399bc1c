//! [`MemcachedConfig`]: servers, timeouts, connections, key prefix and item size, built in code
//! or parsed from a `memcached://` URL.

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Where the sessions live and how to talk to the servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemcachedConfig {
    pub(crate) servers: Vec<String>,
    pub(crate) connect_timeout: Duration,
    pub(crate) io_timeout: Duration,
    pub(crate) connections: usize,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) key_prefix: String,
    pub(crate) max_item_size: usize,
    pub(crate) replicas: usize,
    pub(crate) retry_interval: Duration,
    pub(crate) tombstone_ttl: Duration,
}

impl MemcachedConfig {
    /// memcached's default port.
    pub const DEFAULT_PORT: u16 = 11211;
    /// Default time allowed to dial a server.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default time allowed for one request and its response.
    pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(1);
    /// Default number of connections per server, each carrying many requests at once.
    pub const DEFAULT_CONNECTIONS: usize = 2;
    /// Default cap on requests in flight per server (see
    /// [`max_in_flight`](Self::max_in_flight)).
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
    /// Default time between probes of a server that stopped answering.
    pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);
    /// Default least lifetime of a tombstone written while a replica does not answer.
    pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
    /// memcached's default maximum item size (`-I 1m`).
    pub const DEFAULT_MAX_ITEM_SIZE: usize = 1024 * 1024;
    /// What a record may not use of an item: memcached's item header, the key, the CAS and a
    /// replicated session's 8-byte generation.
    pub const ITEM_OVERHEAD: usize = 512;

    /// One server, or several separated by commas (`host:port`; the port defaults to 11211;
    /// IPv6 addresses in brackets). Keys are spread over several servers by rendezvous hashing.
    pub fn new(servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            servers: servers.into_iter().map(Into::into).collect(),
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            io_timeout: Self::DEFAULT_IO_TIMEOUT,
            connections: Self::DEFAULT_CONNECTIONS,
            max_in_flight: Some(Self::DEFAULT_MAX_IN_FLIGHT),
            key_prefix: String::new(),
            max_item_size: Self::DEFAULT_MAX_ITEM_SIZE,
            replicas: 1,
            retry_interval: Self::DEFAULT_RETRY_INTERVAL,
            tombstone_ttl: Self::DEFAULT_TOMBSTONE_TTL,
        }
    }

    /// Parses `memcached://host[:port][,host[:port]...][?parameters]`.
    ///
    /// Parameters: `timeout_ms` (I/O timeout), `connect_timeout_ms`, `connections`,
    /// `max_in_flight`, `key_prefix`, `max_item_size` (bytes), `replicas`,
    /// `retry_interval_ms`, `tombstone_ttl_secs`. For example
    /// `memcached://10.0.0.1:11211,10.0.0.2:11211,10.0.0.3:11211?timeout_ms=250&replicas=2`.
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        let rest = url.strip_prefix("memcached://").ok_or(UrlError::Scheme)?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.trim_end_matches('/');
        let mut servers = Vec::new();
        // memcached URLs hold no credentials; an `@` anywhere may be part of a password that
        // a `,` or `?` in it split, so then no server text is shown in an error.
        let hide = url.contains('@');
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            servers.push(normalize_server(host, hide)?);
        }
        if servers.is_empty() {
            return Err(UrlError::NoServers);
        }
        let mut config = Self::new(servers);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || {
                value.parse::<u64>().map_err(|_| UrlError::BadValue {
                    parameter: name.to_owned(),
                })
            };
            match name {
                "timeout_ms" => config.io_timeout = Duration::from_millis(number()?),
                "connect_timeout_ms" => config.connect_timeout = Duration::from_millis(number()?),
                "connections" => config.connections = to_usize(number()?, name)?,
                "max_in_flight" => config.max_in_flight = Some(to_usize(number()?, name)?),
                "max_item_size" => config.max_item_size = to_usize(number()?, name)?,
                "key_prefix" => config.key_prefix = value.to_owned(),
                "replicas" => config.replicas = to_usize(number()?, name)?,
                "retry_interval_ms" => config.retry_interval = Duration::from_millis(number()?),
                "tombstone_ttl_secs" => config.tombstone_ttl = Duration::from_secs(number()?),
                _ => return Err(UrlError::UnknownParameter(name.to_owned())),
            }
        }
        Ok(config)
    }

    /// Time allowed to dial a server (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Time allowed for one request and its response (default 1 s).
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }

    /// Connections per server (default 2). Each carries many requests at once: the requests
    /// of every task are queued on it and written together, so a few connections serve any
    /// number of concurrent requests. More can help a server with many cores under very high
    /// load; a request is lost with its connection when that fails (a hung server's timeout
    /// fails every request queued on the connection).
    pub fn connections(mut self, connections: usize) -> Self {
        self.connections = connections;
        self
    }

    /// Requests in flight per server at most (default 4096; `None` for no cap). At the cap, a
    /// request waits for one to finish, up to the connect timeout, then fails as a timeout
    /// without the server being counted down. The cap bounds the memory a hung server can
    /// tie up while its requests wait out their timeout.
    pub fn max_in_flight(mut self, requests: Option<usize>) -> Self {
        self.max_in_flight = requests;
        self
    }

    /// A prefix put in front of every storage key, to share servers between applications
    /// (default none). The whole key must stay within memcached's 250 bytes.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How many servers hold a copy of each session (default 1; at most
    /// [`MAX_REPLICAS`](crate::MAX_REPLICAS) and at most the number of servers). With 2 or
    /// more, a session survives the loss of all but one of its servers; see the crate docs
    /// ("Replicas") for the guarantees and their cost.
    pub fn replicas(mut self, copies: usize) -> Self {
        self.replicas = copies;
        self
    }

    /// How often a server that stopped answering is probed (default 1 s). Until a probe gets
    /// an answer, a replicated store leaves the server out of its requests, and each probe
    /// resolves the server's name again.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// The least lifetime of a tombstone written while one of the session's replicas does not
    /// answer (default 24 hours): the copy on that replica may outlive what the others show,
    /// so set this to the longest lifetime a session can have (its absolute timeout).
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// The servers' maximum item size (memcached's `-I`, default 1 MiB).
    pub fn max_item_size(mut self, bytes: usize) -> Self {
        self.max_item_size = bytes;
        self
    }

    /// The servers, as configured.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The longest any single request to a server may take before it is reported as a
    /// timeout: a wait for a free slot (at the in-flight cap), one dial, one redial of a
    /// connection that failed as the request was queued, and the exchange. An operation of a replicated store makes at most
    /// two such steps one after the other (a read, then a write).
    pub fn operation_deadline(&self) -> Duration {
        3 * self.connect_timeout + self.io_timeout
    }

    /// The longest store-level key prefix accepted, in bytes.
    pub const MAX_KEY_PREFIX_LEN: usize = 64;

    /// Checks the settings and brings every server address to `host:port` form (the same
    /// form `from_url` gives, so routing is the same however the servers were named).
    pub(crate) fn validated(mut self) -> Result<Self, ConfigError> {
        self.servers = self
            .servers
            .iter()
            .map(|server| normalize_server(server, server.contains('@')))
            .collect::<Result<_, _>>()?;
        self.validate()?;
        Ok(self)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        if self.connect_timeout.is_zero()
            || self.io_timeout.is_zero()
            || self.retry_interval.is_zero()
        {
            return Err(ConfigError::ZeroTimeout);
        }
        if self.connections == 0 || self.max_in_flight == Some(0) {
            return Err(ConfigError::NoConnections);
        }
        if self.servers.len() > usize::from(u16::MAX) {
            return Err(ConfigError::TooManyServers);
        }
        let mut names: Vec<&str> = self.servers.iter().map(String::as_str).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(ConfigError::DuplicateServer(pair[0].to_owned()));
        }
        let most = crate::MAX_REPLICAS.min(self.servers.len());
        if !(1..=most).contains(&self.replicas) {
            return Err(ConfigError::Replicas { most });
        }
        if !(session_core::store::MIN_TTL..=session_core::store::MAX_TTL)
            .contains(&self.tombstone_ttl)
        {
            return Err(ConfigError::TombstoneTtl);
        }
        if self.key_prefix.len() > Self::MAX_KEY_PREFIX_LEN
            || !self.key_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::InvalidKeyPrefix);
        }
        if self.max_item_size <= Self::ITEM_OVERHEAD {
            return Err(ConfigError::ItemSizeTooSmall {
                min: Self::ITEM_OVERHEAD + 1,
            });
        }
        Ok(())
    }
}

fn to_usize(value: u64, parameter: &str) -> Result<usize, UrlError> {
    usize::try_from(value).map_err(|_| UrlError::BadValue {
        parameter: parameter.to_owned(),
    })
}

/// `host` or `host:port` or `[v6]` or `[v6]:port`, with the default port added. With `hide`,
/// an error shows none of `host`.
fn normalize_server(host: &str, hide: bool) -> Result<String, UrlError> {
    let shown = if hide {
        "(not shown: the URL may hold a password)"
    } else {
        host
    };
    let bad = || UrlError::BadServer(shown.to_owned());
    if let Some(bracketed) = host.strip_prefix('[') {
        let (address, after) = bracketed.split_once(']').ok_or_else(bad)?;
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        let port = match after {
            "" => MemcachedConfig::DEFAULT_PORT,
            _ => after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        return Ok(format!("[{address}]:{port}"));
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, port.parse::<u16>().map_err(|_| bad())?),
        None => (host, MemcachedConfig::DEFAULT_PORT),
    };
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if !valid_name {
        return Err(bad());
    }
    Ok(format!("{name}:{port}"))
}

/// A `memcached://` URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// The URL does not start with `memcached://`.
    Scheme,
    /// The URL names no server.
    NoServers,
    /// A server is not `host`, `host:port`, `[v6]` or `[v6]:port`.
    BadServer(String),
    /// A query parameter this store does not know.
    UnknownParameter(String),
    /// A query parameter whose value is not a valid number.
    BadValue {
        /// The parameter's name.
        parameter: String,
    },
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scheme => f.write_str("a memcached URL starts with memcached://"),
            Self::NoServers => f.write_str("the memcached URL names no server"),
            Self::BadServer(server) => write!(f, "{server:?} is not a server address"),
            Self::UnknownParameter(name) => write!(f, "unknown parameter {name:?}"),
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
    /// No server was given.
    NoServers,
    /// A timeout of zero.
    ZeroTimeout,
    /// The key prefix is longer than 64 bytes or has characters memcached keys cannot hold
    /// (whitespace, control, non-ASCII).
    InvalidKeyPrefix,
    /// The maximum item size leaves no room for a record.
    ItemSizeTooSmall {
        /// The smallest size accepted.
        min: usize,
    },
    /// More than 65,535 servers.
    TooManyServers,
    /// Zero connections per server, or a cap of zero requests in flight.
    NoConnections,
    /// A server is listed twice (after adding the default port), which would put two copies
    /// of a session on one server.
    DuplicateServer(String),
    /// `replicas` is zero, or more than the servers or [`MAX_REPLICAS`](crate::MAX_REPLICAS).
    Replicas {
        /// The most replicas this configuration allows.
        most: usize,
    },
    /// The tombstone TTL is outside the store contract's TTL range (1 s to 400 days).
    TombstoneTtl,
    /// A server address could not be resolved.
    Resolve {
        /// The server, as configured.
        server: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// Resolving the server addresses took longer than the connect timeout.
    ResolveTimeout,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(_) => f.write_str("invalid memcached URL"),
            Self::NoServers => f.write_str("no memcached server given"),
            Self::ZeroTimeout => f.write_str("memcached timeouts must be above zero"),
            Self::InvalidKeyPrefix => {
                f.write_str("the key prefix must be printable ASCII without spaces")
            }
            Self::ItemSizeTooSmall { min } => {
                write!(f, "the maximum item size must be at least {min}")
            }
            Self::TooManyServers => f.write_str("at most 65535 memcached servers"),
            Self::NoConnections => f.write_str("connections and max_in_flight must be above zero"),
            Self::DuplicateServer(server) => {
                write!(f, "the memcached server {server} is listed twice")
            }
            Self::Replicas { most } => {
                write!(f, "replicas must be from 1 to {most} with these servers")
            }
            Self::TombstoneTtl => f.write_str("the tombstone TTL must be from 1 s to 400 days"),
            Self::Resolve { server, .. } => {
                write!(f, "the memcached server {server} could not be resolved")
            }
            Self::ResolveTimeout => f.write_str("resolving the memcached servers timed out"),
        }
    }
}

impl Error for ConfigError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Url(e) => Some(e),
            Self::Resolve { source, .. } => Some(source),
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
    fn urls_parse_servers_and_parameters() {
        let config = MemcachedConfig::from_url(
            "memcached://10.0.0.1:11211,10.0.0.2,[::1]:11300,[fe80::1]?timeout_ms=250&connect_timeout_ms=100&connections=3&max_in_flight=64&key_prefix=app1:&max_item_size=2097152",
        )
        .unwrap();
        assert_eq!(
            config.servers(),
            [
                "10.0.0.1:11211",
                "10.0.0.2:11211",
                "[::1]:11300",
                "[fe80::1]:11211"
            ]
        );
        assert_eq!(config.io_timeout, Duration::from_millis(250));
        assert_eq!(config.connect_timeout, Duration::from_millis(100));
        assert_eq!(config.connections, 3);
        assert_eq!(config.max_in_flight, Some(64));
        assert_eq!(config.key_prefix, "app1:");
        assert_eq!(config.max_item_size, 2 * 1024 * 1024);
        assert_eq!(
            MemcachedConfig::from_url("memcached://localhost/").unwrap(),
            MemcachedConfig::new(["localhost:11211"])
        );
    }

    #[test]
    fn errors_never_echo_credentials() {
        let error = MemcachedConfig::from_url("memcached://user:secret@host:x").unwrap_err();
        assert!(matches!(error, UrlError::BadServer(_)));
        assert!(!format!("{error} {error:?}").contains("secret"));
    }

    #[test]
    fn addresses_given_in_code_are_normalized_like_urls() {
        let config = MemcachedConfig::new(["localhost", "[::1]", "10.0.0.1:11300"])
            .validated()
            .unwrap();
        assert_eq!(
            config.servers(),
            ["localhost:11211", "[::1]:11211", "10.0.0.1:11300"]
        );
        assert!(matches!(
            MemcachedConfig::new(["bad host"]).validated(),
            Err(ConfigError::Url(UrlError::BadServer(_)))
        ));
        assert!(matches!(
            MemcachedConfig::new(["h"])
                .key_prefix("p".repeat(65))
                .validated(),
            Err(ConfigError::InvalidKeyPrefix)
        ));
        assert!(matches!(
            MemcachedConfig::new(["h", "h:11211"]).validated(),
            Err(ConfigError::DuplicateServer(server)) if server == "h:11211"
        ));
        assert!(matches!(
            MemcachedConfig::new(["a", "b"]).replicas(3).validated(),
            Err(ConfigError::Replicas { most: 2 })
        ));
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        assert_eq!(
            MemcachedConfig::from_url("redis://x"),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            MemcachedConfig::from_url("memcached://"),
            Err(UrlError::NoServers)
        );
        assert_eq!(
            MemcachedConfig::from_url("memcached://?timeout_ms=1"),
            Err(UrlError::NoServers)
        );
        assert!(matches!(
            MemcachedConfig::from_url("memcached://a:99999"),
            Err(UrlError::BadServer(_))
        ));
        assert!(matches!(
            MemcachedConfig::from_url("memcached://a b"),
            Err(UrlError::BadServer(_))
        ));
        assert!(matches!(
            MemcachedConfig::from_url("memcached://[::1"),
            Err(UrlError::BadServer(_))
        ));
        assert!(matches!(
            MemcachedConfig::from_url("memcached://[]:1"),
            Err(UrlError::BadServer(_))
        ));
        assert_eq!(
            MemcachedConfig::from_url("memcached://a?timeout=5"),
            Err(UrlError::UnknownParameter("timeout".into()))
        );
        assert_eq!(
            MemcachedConfig::from_url("memcached://a?timeout_ms=soon"),
            Err(UrlError::BadValue {
                parameter: "timeout_ms".into()
            })
        );
    }

    #[test]
    fn validation() {
        assert!(MemcachedConfig::new(["a:1"]).validate().is_ok());
        assert!(matches!(
            MemcachedConfig::new(Vec::<String>::new()).validate(),
            Err(ConfigError::NoServers)
        ));
        assert!(matches!(
            MemcachedConfig::new(["a:1"])
                .io_timeout(Duration::ZERO)
                .validate(),
            Err(ConfigError::ZeroTimeout)
        ));
        assert!(matches!(
            MemcachedConfig::new(["a:1"]).key_prefix("a b").validate(),
            Err(ConfigError::InvalidKeyPrefix)
        ));
        assert!(matches!(
            MemcachedConfig::new(["a:1"]).max_item_size(100).validate(),
            Err(ConfigError::ItemSizeTooSmall { .. })
        ));
    }

    #[test]
    fn no_part_of_a_password_is_shown_and_brackets_hold_ipv6_addresses() {
        for url in [
            "memcached://user:se,cret@host:11211",
            "memcached://user:sec?ret@host:11211",
            "memcached://[user@x]:1",
        ] {
            let error = MemcachedConfig::from_url(url).unwrap_err();
            let shown = error.to_string();
            assert!(
                !shown.contains("se,") && !shown.contains("sec") && !shown.contains("user"),
                "{url}: {shown}"
            );
        }
        assert!(MemcachedConfig::from_url("memcached://[a b]").is_err());
        assert_eq!(
            MemcachedConfig::from_url("memcached://[::1]")
                .unwrap()
                .servers(),
            ["[::1]:11211"]
        );
    }
}
