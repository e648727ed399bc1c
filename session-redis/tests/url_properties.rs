//! The proptest twin of the `url_config` fuzz target's Redis half (`fuzz/fuzz_targets`): the
//! same check (`props/url.rs`) on arbitrary text, and on valid URLs of every scheme and edits
//! of them, which reach the cluster, Sentinel, credential and parameter parsing.

#[path = "props/url.rs"]
mod props;

use proptest::prelude::*;

/// `text` with one to four edits, drawing new characters among this URL's separators.
fn edited(text: String) -> impl Strategy<Value = String> {
    session_conformance::strategies::edited(text, "[ -~]|[:/?&=@,%+]|.")
}

/// A query parameter: one of the store's own, or one passed on to the redis crate.
fn parameter() -> impl Strategy<Value = String> {
    let names = proptest::sample::select(vec![
        "timeout_ms",
        "connect_timeout_ms",
        "key_prefix",
        "max_record_size",
        "wait_replicas",
        "wait_timeout_ms",
        "protocol",
    ]);
    let values = prop_oneof![
        "[0-9]{1,20}",
        Just(u64::MAX.to_string()),
        "[ -~&&[^&]]{0,8}"
    ];
    (names, values).prop_map(|(name, value)| format!("{name}={value}"))
}

/// Valid-looking URLs of every scheme: optional credentials (with percent escapes; edits make bad ones), one or
/// more hosts, a path (a database, or a master's name and database), parameters.
fn url() -> impl Strategy<Value = String> {
    let scheme = proptest::sample::select(vec![
        "redis",
        "rediss",
        "redis+cluster",
        "rediss+cluster",
        "redis+sentinel",
    ]);
    let credentials = proptest::option::of("[a-z]{0,6}(:([a-z0-9]|%[2-7][0-9a-fA-F]){0,8})?@");
    let hosts = proptest::collection::vec("[a-z0-9.]{1,10}(:[0-9]{1,5})?", 1..4);
    let path = proptest::option::of("/[a-z0-9]{0,8}(/-?[0-9]{0,3})?/?");
    let parameters = proptest::collection::vec(parameter(), 0..4);
    (scheme, credentials, hosts, path, parameters).prop_map(
        |(scheme, credentials, hosts, path, parameters)| {
            let query = if parameters.is_empty() {
                String::new()
            } else {
                format!("?{}", parameters.join("&"))
            };
            format!(
                "{scheme}://{}{}{}{query}",
                credentials.unwrap_or_default(),
                hosts.join(","),
                path.unwrap_or_default()
            )
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_parses_or_fails_without_panicking(text in any::<String>()) {
        props::check_redis_url(&text);
        props::check_redis_url(&format!("redis+sentinel://{text}"));
        props::check_redis_url(&format!("redis+cluster://{text}"));
    }

    #[test]
    fn urls_and_their_edits_parse_consistently(url in url().prop_flat_map(|url| {
        prop_oneof![Just(url.clone()), edited(url)]
    })) {
        props::check_redis_url(&url);
    }
}

/// The generated URLs are not all rejected, and some carry credentials, so the credentials
/// comparison is exercised.
#[test]
fn the_url_strategy_reaches_valid_urls_with_credentials() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let valid: Vec<String> = (0..1000)
        .map(|_| url().new_tree(&mut runner).unwrap().current())
        .filter(|url| session_redis::RedisConfig::from_url(url).is_ok())
        .collect();
    assert!(
        valid.len() >= 100,
        "only {} of 1000 generated URLs parse",
        valid.len()
    );
    let with_credentials = valid
        .iter()
        .filter(|url| url.starts_with("redis+sentinel://") && url.contains('@'))
        .count();
    assert!(
        with_credentials >= 10,
        "{with_credentials} Sentinel URLs with credentials"
    );
}
