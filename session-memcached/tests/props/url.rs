//! The `memcached://` URL property, checked by the `url_config` fuzz target and by its proptest
//! twin (`tests/url_properties.rs`). Both include this file by path, so they check one
//! property; every check panics on a violation.

use session_memcached::{MemcachedConfig, UrlError};

/// Any text: parsing never panics. A URL that parses starts with `memcached://`, names at
/// least one server, each in `host:port` or `[address]:port` form, and parses to the same
/// configuration when its servers are given in that form. A rejected server is never shown
/// with what came before an `@` in it (credentials).
pub fn check_memcached_url(url: &str) {
    let config = match MemcachedConfig::from_url(url) {
        Ok(config) => config,
        Err(UrlError::BadServer(shown)) => {
            assert!(!shown.contains('@'), "{shown:?} from {url:?}");
            return;
        }
        Err(_) => return,
    };
    assert!(url.starts_with("memcached://"), "{url:?}");
    let servers = config.servers();
    assert!(!servers.is_empty(), "{url:?}");
    for server in servers {
        let (host, port) = server
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{server:?} has no port ({url:?})"));
        assert!(port.parse::<u16>().is_ok(), "{server:?} ({url:?})");
        assert!(
            !host.is_empty() && !server.contains(','),
            "{server:?} ({url:?})"
        );
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let normalized = format!("memcached://{}?{query}", servers.join(","));
    assert_eq!(
        MemcachedConfig::from_url(&normalized).as_ref(),
        Ok(&config),
        "{url:?} normalized as {normalized:?}"
    );
    let _ = config.operation_deadline();
    let _ = format!("{config:?}");
}
