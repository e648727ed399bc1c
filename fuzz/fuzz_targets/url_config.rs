//! Fuzz target: `MemcachedConfig::from_url` and `RedisConfig::from_url`.
//!
//! The whole input, as lossy UTF-8, is a URL for both parsers; then its first byte picks a
//! scheme put in front of the rest, so that every input also reaches past the scheme check.
//! The checks are `session-memcached/tests/props/url.rs` and `session-redis/tests/props/url.rs`,
//! shared with the proptest twins.

#![no_main]
#![forbid(unsafe_code)]

#[path = "../../session-memcached/tests/props/url.rs"]
mod memcached;
#[path = "../../session-redis/tests/props/url.rs"]
mod redis;

use libfuzzer_sys::fuzz_target;

/// Every scheme either parser accepts.
const SCHEMES: [&str; 6] = [
    "memcached://",
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
];

fn check(url: &str) {
    memcached::check_memcached_url(url);
    redis::check_redis_url(url);
}

fuzz_target!(|data: &[u8]| {
    check(&String::from_utf8_lossy(data));
    if let Some((&first, rest)) = data.split_first() {
        let scheme = SCHEMES[usize::from(first) % SCHEMES.len()];
        check(&format!("{scheme}{}", String::from_utf8_lossy(rest)));
    }
});
