//! The proptest twin of the `url_config` fuzz target's memcached half (`fuzz/fuzz_targets`):
//! the same check (`props/url.rs`) on arbitrary text, and on valid URLs and edits of them,
//! which reach the server and parameter parsing that arbitrary text rarely does.

#[path = "props/url.rs"]
mod props;

use proptest::prelude::*;

/// `text` with one to four edits, drawing new characters among this URL's separators.
fn edited(text: String) -> impl Strategy<Value = String> {
    session_conformance::strategies::edited(text, "[ -~]|[:/?&=@,\\[\\]%]|.")
}

/// A server as a URL may name it: a host or an IPv6 address in brackets, with or without a
/// port, or something close.
fn server() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{1,12}",
        "[a-z0-9.-]{1,12}:[0-9]{1,6}",
        "\\[(::1|::|fe80::[0-9a-f]{1,4}|[0-9a-f]{1,4}::[0-9a-f]{1,4}|[0-9a-f:]{0,12})\\](:[0-9]{1,6})?",
        "[a-z]{1,8}:[a-z0-9]{1,8}@[a-z]{1,8}(:[0-9x]{1,5})?",
        "[ -~]{0,12}",
    ]
}

/// A query parameter: one the store knows or not, with a number or not.
fn parameter() -> impl Strategy<Value = String> {
    let names = proptest::sample::select(vec![
        "timeout_ms",
        "connect_timeout_ms",
        "connections",
        "max_in_flight",
        "key_prefix",
        "max_item_size",
        "replicas",
        "retry_interval_ms",
        "tombstone_ttl_secs",
        "timeout",
    ]);
    let values = prop_oneof![
        "[0-9]{1,20}",
        Just(u64::MAX.to_string()),
        "[ -~&&[^&]]{0,8}"
    ];
    (names, values).prop_map(|(name, value)| format!("{name}={value}"))
}

/// Valid-looking URLs: one or more servers, an optional slash, optional parameters.
fn url() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(server(), 1..4),
        any::<bool>(),
        proptest::collection::vec(parameter(), 0..4),
    )
        .prop_map(|(servers, slash, parameters)| {
            let slash = if slash { "/" } else { "" };
            let query = if parameters.is_empty() {
                String::new()
            } else {
                format!("?{}", parameters.join("&"))
            };
            format!("memcached://{}{slash}{query}", servers.join(","))
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_parses_or_fails_without_panicking(text in any::<String>()) {
        props::check_memcached_url(&text);
        props::check_memcached_url(&format!("memcached://{text}"));
    }

    #[test]
    fn urls_and_their_edits_parse_consistently(url in url().prop_flat_map(|url| {
        prop_oneof![Just(url.clone()), edited(url)]
    })) {
        props::check_memcached_url(&url);
    }
}

/// The generated URLs are not all rejected, so the round trip is exercised.
#[test]
fn the_url_strategy_reaches_valid_urls() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let valid = (0..200)
        .filter(|_| {
            let url = url().new_tree(&mut runner).unwrap().current();
            session_memcached::MemcachedConfig::from_url(&url).is_ok()
        })
        .count();
    assert!(valid >= 20, "only {valid} of 200 generated URLs parse");
}
