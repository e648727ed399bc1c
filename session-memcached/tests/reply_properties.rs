//! The proptest twin of the `memcached_replies` fuzz target: the same check
//! (`props/replies.rs`) on arbitrary bytes, and on streams of well-formed replies with noise
//! mixed in.

#[path = "props/replies.rs"]
mod props;

use proptest::prelude::*;

/// One well-formed reply of any kind the store reads, with flags in any order.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let flag = prop_oneof![
        any::<u64>().prop_map(|n| format!("c{n}")),
        (-1i64..100_000).prop_map(|n| format!("t{n}")),
        any::<u32>().prop_map(|n| format!("f{n}")),
        any::<u32>().prop_map(|n| format!("O{n}")),
        Just("k".to_owned()),
    ];
    let flags = proptest::collection::vec(flag, 0..5).prop_map(|flags| flags.join(" "));
    let value = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        (flags.clone(), value).prop_map(|(flags, value)| {
            let mut out = format!("VA {} {flags}\r\n", value.len()).into_bytes();
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
            out
        }),
        (
            proptest::sample::select(vec!["HD", "EN", "NS", "EX", "NF", "MN"]),
            flags
        )
            .prop_map(|(code, flags)| format!("{code} {flags}\r\n").into_bytes()),
        "[ -~]{0,20}".prop_map(|m| format!("SERVER_ERROR {m}\r\n").into_bytes()),
        Just(b"ERROR\r\n".to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        props::check_replies(&input);
    }

    #[test]
    fn streams_of_replies_with_noise(
        replies in proptest::collection::vec(reply(), 1..6),
        noise in proptest::collection::vec(any::<u8>(), 0..4),
        at in any::<proptest::sample::Index>(),
    ) {
        let mut stream: Vec<u8> = replies.concat();
        props::check_replies(&stream);
        let at = at.index(stream.len() + 1);
        stream.splice(at..at, noise);
        props::check_replies(&stream);
    }

    #[test]
    fn well_formed_streams_parse_reply_by_reply(replies in proptest::collection::vec(reply(), 1..6)) {
        let stream: Vec<u8> = replies.concat();
        let mut rest = &stream[..];
        for one in &replies {
            let (_, used) = session_memcached::fuzzing::parse_reply(rest)
                .expect("well formed")
                .expect("complete");
            prop_assert_eq!(used, one.len());
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
    }
}
