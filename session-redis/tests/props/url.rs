//! The Redis URL property, checked by the `url_config` fuzz target and by its proptest twin
//! (`tests/url_properties.rs`). Both include this file by path, so they check one property;
//! every check panics on a violation.

use session_redis::RedisConfig;

/// Any text: parsing never panics. A URL that parses has one of the five schemes and the
/// topology its scheme names; its `Debug` form is the same whatever credentials it carries (it
/// shows no URL), and so are its topology and deadline.
pub fn check_redis_url(url: &str) {
    let Ok(config) = RedisConfig::from_url(url) else {
        return;
    };
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    let cluster = base.starts_with("redis+cluster://") || base.starts_with("rediss+cluster://");
    let sentinel = base.starts_with("redis+sentinel://");
    let standalone = base.starts_with("redis://") || base.starts_with("rediss://");
    assert!(cluster || sentinel || standalone, "{url:?}");
    assert_eq!(config.is_cluster(), cluster, "{url:?}");
    assert_eq!(config.is_sentinel(), sentinel, "{url:?}");
    let deadline = config.operation_deadline();
    let debug = format!("{config:?}");
    if let Some(other) = with_other_credentials(url) {
        let changed = RedisConfig::from_url(&other)
            .unwrap_or_else(|e| panic!("{other:?} (from {url:?}) did not parse: {e}"));
        assert_eq!(format!("{changed:?}"), debug, "{url:?} and {other:?}");
        assert_eq!(changed.is_cluster(), cluster);
        assert_eq!(changed.is_sentinel(), sentinel);
        assert_eq!(changed.operation_deadline(), deadline);
    }
}

/// `url` with what stands between its scheme and the last `@` before the query (its
/// credentials) replaced by other valid ones; `None` without an `@` there.
fn with_other_credentials(url: &str) -> Option<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://")?;
    let (_, after) = rest.rsplit_once('@')?;
    Some(format!("{scheme}://someone:other%20secret@{after}{query}"))
}
