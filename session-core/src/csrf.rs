//! Cross-site request forgery tokens bound to the session (the synchronizer token pattern).
//!
//! A session holds one secret token of 32 random bytes under the value name
//! [`TOKEN_VALUE_NAME`], made on first use by [`Session::csrf_token`](crate::Session::csrf_token)
//! and removed by [`Session::cycle_id`](crate::Session::cycle_id), so a login (which cycles the id)
//! gets a token the pre-login page never saw. Pages put the token in their forms (a hidden
//! field) or scripts send it in a header; a request that changes anything must bring it back,
//! and [`Session::verify_csrf_token`](crate::Session::verify_csrf_token) checks it.
//!
//! The token a page shows is *masked*: a fresh random pad followed by the token XOR the pad,
//! as base64url ([`MASKED_TOKEN_LEN`] characters). Every response shows different bytes for
//! the same secret, so a compressed response cannot leak the token byte by byte to an attacker
//! who can inject text into it and watch its compressed size (BREACH). Any masked form of the
//! session's token verifies; the comparison runs in constant time.
//!
//! `session-tower`'s `CsrfLayer` enforces this for a tower service; other frameworks call the
//! two `Session` methods from their own middleware.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq as _;

use crate::error::RandomnessError;

/// The session value name the token is stored under; applications must not use it.
pub const TOKEN_VALUE_NAME: &str = "_csrf";

/// The token's length in bytes.
pub const TOKEN_LEN: usize = 32;

/// The length of a masked token's text: 64 bytes (pad and masked token) as base64url without
/// padding.
pub const MASKED_TOKEN_LEN: usize = 86;

/// The secret token kept in the session.
pub(crate) type Token = [u8; TOKEN_LEN];

/// Draws a new token from the operating system's CSPRNG.
pub(crate) fn new_token() -> Result<Token, RandomnessError> {
    let mut token = [0u8; TOKEN_LEN];
    getrandom::fill(&mut token).map_err(RandomnessError::new)?;
    Ok(token)
}

/// The token masked with a fresh random pad, as text.
pub(crate) fn mask(token: &Token) -> Result<String, RandomnessError> {
    let mut both = [0u8; 2 * TOKEN_LEN];
    let (pad, masked) = both.split_at_mut(TOKEN_LEN);
    getrandom::fill(pad).map_err(RandomnessError::new)?;
    for ((out, secret), pad) in masked.iter_mut().zip(token).zip(pad.iter()) {
        *out = secret ^ pad;
    }
    Ok(URL_SAFE_NO_PAD.encode(both))
}

/// Whether `submitted` is a masked form of `token`. Malformed text is `false`; the tokens are
/// compared in constant time.
pub(crate) fn matches(token: &Token, submitted: &str) -> bool {
    if submitted.len() != MASKED_TOKEN_LEN {
        return false;
    }
    let mut both = [0u8; 2 * TOKEN_LEN + 3];
    if URL_SAFE_NO_PAD.decode_slice(submitted.as_bytes(), &mut both) != Ok(2 * TOKEN_LEN) {
        return false;
    }
    let (pad, masked) = both[..2 * TOKEN_LEN].split_at(TOKEN_LEN);
    let mut unmasked = [0u8; TOKEN_LEN];
    for ((out, masked), pad) in unmasked.iter_mut().zip(masked).zip(pad) {
        *out = masked ^ pad;
    }
    bool::from(unmasked.ct_eq(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_tokens_differ_every_time_and_all_verify() {
        let token = new_token().unwrap();
        let first = mask(&token).unwrap();
        let second = mask(&token).unwrap();
        assert_eq!(first.len(), MASKED_TOKEN_LEN);
        assert_ne!(first, second, "a fresh pad each time");
        assert!(matches(&token, &first));
        assert!(matches(&token, &second));
        assert!(!matches(&new_token().unwrap(), &first));
    }

    #[test]
    fn malformed_or_altered_tokens_fail() {
        let token = new_token().unwrap();
        let masked = mask(&token).unwrap();
        assert!(!matches(&token, ""));
        assert!(!matches(&token, &masked[..MASKED_TOKEN_LEN - 1]));
        assert!(!matches(&token, &format!("{masked}A")));
        let mut flipped = masked.clone().into_bytes();
        flipped[50] = if flipped[50] == b'A' { b'B' } else { b'A' };
        assert!(!matches(&token, std::str::from_utf8(&flipped).unwrap()));
        // The bare token (unmasked, or with a zero pad) is not what pages carry, but a zero
        // pad is a valid mask: only the XOR matters.
        let zero_pad = URL_SAFE_NO_PAD.encode([[0u8; TOKEN_LEN], token].concat());
        assert!(matches(&token, &zero_pad));
        assert!(!matches(&token, &"é".repeat(MASKED_TOKEN_LEN / 2)));
    }
}
