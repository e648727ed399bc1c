//! The reply-parser property, checked by the `memcached_replies` fuzz target and by its
//! proptest twin (`tests/reply_properties.rs`). Both include this file by path; every check
//! panics on a violation.

use session_memcached::fuzzing::parse_reply;

/// Any bytes: parsing never panics; a reply takes at least one byte and no more than there
/// are; it is self-delimiting (the bytes it took parse to the same reply, and no strict
/// prefix of them is a reply); and taking replies one after another from the front, as a
/// connection does, ends without a panic.
pub fn check_replies(input: &[u8]) {
    let mut rest = input;
    while let Ok(Some((reply, used))) = parse_reply(rest) {
        assert!(used >= 1 && used <= rest.len(), "{used} of {}", rest.len());
        let taken = &rest[..used];
        assert_eq!(
            parse_reply(taken),
            Ok(Some((reply.clone(), used))),
            "not self-delimiting: {taken:?}"
        );
        for cut in 0..used.min(600) {
            if let Ok(Some((early, _))) = parse_reply(&taken[..cut]) {
                panic!("a prefix of {taken:?} parsed as {early}");
            }
        }
        rest = &rest[used..];
    }
}
