//! The meta protocol as this store speaks it: the four requests it sends (`mg`, `ms`, `md`,
//! `mn`), encoded straight into a connection's outgoing buffer, and a parser for the replies,
//! which takes complete replies off the front of a connection's incoming buffer.
//!
//! Written here rather than taken from the `memcache` crate: its reply type is filled in by its
//! own transport (the length of a `VA` value and the value itself are private to it), so a
//! connection that pipelines requests cannot use it, and it allocates a vector per flag token.
//! This module allocates nothing but the value a `VA` reply carries.
//!
//! Every request but `mn` carries an opaque token (`O<n>`), echoed in its reply; the connection
//! checks the echo, so a reply paired with the wrong request is caught, not trusted.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest key memcached accepts, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 250;
/// The longest reply line accepted before the reply counts as garbage.
const MAX_LINE: usize = 4096;
/// The largest value a `VA` reply may announce when nothing smaller is given (memcached's own
/// item size limit is 1 GiB at most). A connection passes the configured item size instead, so
/// that a corrupt length (or another service on the port) cannot make it buffer more.
pub(crate) const MAX_VALUE: usize = 256 * 1024 * 1024;
/// TTLs above this many seconds go on the wire as a Unix time (memcached's rule).
const MAX_RELATIVE_TTL: u64 = 30 * 24 * 60 * 60;

/// An item's lifetime as sent to memcached: whole seconds from now, at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ttl(u64);

impl From<Duration> for Ttl {
    /// Rounds up to whole seconds, and up to one second at least.
    fn from(ttl: Duration) -> Self {
        Self((ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1))
    }
}

impl Ttl {
    /// The number memcached reads: the seconds, or, above 30 days, the Unix time of the end.
    fn wire(self) -> u64 {
        if self.0 <= MAX_RELATIVE_TTL {
            self.0
        } else {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            now + self.0
        }
    }
}

/// A request, borrowing its key and value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Request<'a> {
    /// `mg <key> v c t f`: the value, CAS, remaining TTL and client flags.
    Get { key: &'a str },
    /// `mg <key> T<ttl> f`: sets the TTL and tells the client flags, without the value.
    Touch { key: &'a str, ttl: Ttl },
    /// `ms <key> <len> T<ttl> F<flags> c [ME | C<cas>]`: stores, asking for the new CAS.
    Set {
        key: &'a str,
        value: &'a [u8],
        flags: u32,
        ttl: Ttl,
        mode: SetMode,
    },
    /// `md <key> [C<cas>]`.
    Delete { key: &'a str, cas: Option<u64> },
    /// `mn`: answered with `MN`; checks that the server answers.
    Noop,
}

/// When an `ms` stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SetMode {
    /// Always.
    Set,
    /// Only if no item exists (`ME`).
    Add,
    /// Only if the item's CAS is this one (`C<cas>`).
    Cas(u64),
}

/// A request this module refuses to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EncodeError {
    /// Empty, longer than 250 bytes, or holding a space or control byte.
    BadKey,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the key is empty, longer than 250 bytes, or holds a space or control byte")
    }
}

impl std::error::Error for EncodeError {}

fn check_key(key: &str) -> Result<(), EncodeError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.bytes().all(|byte| byte.is_ascii_graphic());
    if ok { Ok(()) } else { Err(EncodeError::BadKey) }
}

fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_flag(out: &mut Vec<u8>, flag: u8, n: u64) {
    out.push(b' ');
    out.push(flag);
    push_number(out, n);
}

impl Request<'_> {
    /// Appends the request to `out`, with `opaque` as its `O` token (`mn` carries none).
    /// Nothing is appended when the request is refused.
    pub(crate) fn encode(&self, opaque: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match *self {
            Request::Get { key } => {
                check_key(key)?;
                out.extend_from_slice(b"mg ");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b" v c t f");
            }
            Request::Touch { key, ttl } => {
                check_key(key)?;
                out.extend_from_slice(b"mg ");
                out.extend_from_slice(key.as_bytes());
                push_flag(out, b'T', ttl.wire());
                out.extend_from_slice(b" f");
            }
            Request::Set {
                key,
                value,
                flags,
                ttl,
                mode,
            } => {
                check_key(key)?;
                out.extend_from_slice(b"ms ");
                out.extend_from_slice(key.as_bytes());
                out.push(b' ');
                push_number(out, value.len() as u64);
                push_flag(out, b'T', ttl.wire());
                push_flag(out, b'F', u64::from(flags));
                out.extend_from_slice(b" c");
                match mode {
                    SetMode::Set => {}
                    SetMode::Add => out.extend_from_slice(b" ME"),
                    SetMode::Cas(cas) => push_flag(out, b'C', cas),
                }
                push_flag(out, b'O', u64::from(opaque));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
                return Ok(());
            }
            Request::Delete { key, cas } => {
                check_key(key)?;
                out.extend_from_slice(b"md ");
                out.extend_from_slice(key.as_bytes());
                if let Some(cas) = cas {
                    push_flag(out, b'C', cas);
                }
            }
            Request::Noop => {
                out.extend_from_slice(b"mn\r\n");
                return Ok(());
            }
        }
        push_flag(out, b'O', u64::from(opaque));
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// Whether the request carries an opaque token (and its reply echoes it).
    pub(crate) fn has_opaque(&self) -> bool {
        !matches!(self, Request::Noop)
    }
}

/// A reply's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// `VA`: a hit, with a value.
    Value,
    /// `HD`: done (a hit without value, a stored item, a deleted item).
    Done,
    /// `EN`: a miss.
    Miss,
    /// `NS`: not stored (an add over an existing item).
    NotStored,
    /// `EX`: the CAS did not match.
    Exists,
    /// `NF`: not found (a CAS write or delete of a missing item).
    NotFound,
    /// `MN`: the answer to `mn`.
    Noop,
}

/// One reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    /// `c`.
    pub(crate) cas: Option<u64>,
    /// `t`: seconds left, `-1` for none.
    pub(crate) ttl: Option<i64>,
    /// `f`.
    pub(crate) client_flags: Option<u32>,
    /// `O`.
    pub(crate) opaque: Option<u32>,
    /// The data block of a `VA` reply.
    pub(crate) value: Option<Vec<u8>>,
}

/// A reply the server sent instead of a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ErrorReply {
    /// `SERVER_ERROR <message>`: the server failed the request (out of memory, too large);
    /// the connection stays in step.
    Server(String),
    /// `CLIENT_ERROR <message>` or `ERROR`: the server did not understand the request; what
    /// it makes of the bytes after it is unknown, so the connection is out of step.
    Client(String),
}

/// Bytes that are no reply of the meta protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Garbage(pub(crate) &'static str);

impl fmt::Display for Garbage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memcached sent a malformed reply: {}", self.0)
    }
}

impl std::error::Error for Garbage {}

/// Takes the first complete reply off `input`: `Ok(None)` when more bytes are needed, else the
/// reply (or the error the server sent) and how many bytes it took. A `VA` value longer than
/// `max_value` bytes is garbage.
#[allow(clippy::type_complexity)] // reason: one private parser result, spelled out once
pub(crate) fn parse(
    input: &[u8],
    max_value: usize,
) -> Result<Option<(Result<Reply, ErrorReply>, usize)>, Garbage> {
    let Some(end) = input.windows(2).position(|pair| pair == b"\r\n") else {
        return if input.len() > MAX_LINE {
            Err(Garbage("a reply line without an end"))
        } else {
            Ok(None)
        };
    };
    if end > MAX_LINE {
        return Err(Garbage("a reply line too long"));
    }
    let line = &input[..end];
    let after_line = end + 2;
    let mut tokens = line.split(|&byte| byte == b' ').filter(|t| !t.is_empty());
    let code = tokens.next().ok_or(Garbage("an empty reply line"))?;
    let status = match code {
        b"VA" => Status::Value,
        b"HD" => Status::Done,
        b"EN" => Status::Miss,
        b"NS" => Status::NotStored,
        b"EX" => Status::Exists,
        b"NF" => Status::NotFound,
        b"MN" => Status::Noop,
        b"SERVER_ERROR" | b"CLIENT_ERROR" | b"ERROR" => {
            let message = String::from_utf8_lossy(&line[code.len()..])
                .trim()
                .to_owned();
            let error = if code == b"SERVER_ERROR" {
                ErrorReply::Server(message)
            } else {
                ErrorReply::Client(if message.is_empty() {
                    "ERROR".to_owned()
                } else {
                    message
                })
            };
            return Ok(Some((Err(error), after_line)));
        }
        _ => return Err(Garbage("an unknown reply code")),
    };
    let mut reply = Reply {
        status,
        cas: None,
        ttl: None,
        client_flags: None,
        opaque: None,
        value: None,
    };
    let mut value_len = None;
    if status == Status::Value {
        let len = tokens
            .next()
            .ok_or(Garbage("a VA reply without a length"))?;
        let len = number(len).ok_or(Garbage("a VA reply with a bad length"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= max_value.min(MAX_VALUE))
            .ok_or(Garbage("a VA reply announcing too large a value"))?;
        value_len = Some(len);
    }
    for token in tokens {
        let (flag, rest) = token.split_first().ok_or(Garbage("an empty flag"))?;
        match flag {
            b'c' => reply.cas = Some(number(rest).ok_or(Garbage("a bad CAS"))?),
            b't' => {
                let ttl = if rest == b"-1" {
                    -1
                } else {
                    let secs = number(rest).ok_or(Garbage("a bad TTL"))?;
                    i64::try_from(secs).map_err(|_| Garbage("a bad TTL"))?
                };
                reply.ttl = Some(ttl);
            }
            b'f' => {
                let flags = number(rest).ok_or(Garbage("bad client flags"))?;
                reply.client_flags =
                    Some(u32::try_from(flags).map_err(|_| Garbage("bad client flags"))?);
            }
            b'O' => {
                let opaque = number(rest).ok_or(Garbage("a bad opaque token"))?;
                reply.opaque = Some(u32::try_from(opaque).map_err(|_| Garbage("a bad opaque"))?);
            }
            // Flags this store does not ask for (a newer server may add some) are skipped.
            _ => {}
        }
    }
    let Some(len) = value_len else {
        return Ok(Some((Ok(reply), after_line)));
    };
    let total = after_line + len + 2;
    if input.len() < total {
        return Ok(None);
    }
    if &input[after_line + len..total] != b"\r\n" {
        return Err(Garbage("a value not followed by its line end"));
    }
    reply.value = Some(input[after_line..after_line + len].to_vec());
    Ok(Some((Ok(reply), total)))
}

/// A decimal number of at most 20 digits.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(request: Request<'_>) -> String {
        let mut out = Vec::new();
        request.encode(7, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn requests_are_encoded_as_the_protocol_says() {
        assert_eq!(encoded(Request::Get { key: "k" }), "mg k v c t f O7\r\n");
        let ttl = Ttl::from(Duration::from_millis(1500));
        assert_eq!(
            encoded(Request::Touch { key: "k", ttl }),
            "mg k T2 f O7\r\n"
        );
        let set = |mode| Request::Set {
            key: "k",
            value: b"ab",
            flags: 2,
            ttl: Ttl::from(Duration::from_secs(60)),
            mode,
        };
        assert_eq!(encoded(set(SetMode::Set)), "ms k 2 T60 F2 c O7\r\nab\r\n");
        assert_eq!(
            encoded(set(SetMode::Add)),
            "ms k 2 T60 F2 c ME O7\r\nab\r\n"
        );
        assert_eq!(
            encoded(set(SetMode::Cas(99))),
            "ms k 2 T60 F2 c C99 O7\r\nab\r\n"
        );
        let delete = |cas| Request::Delete { key: "k", cas };
        assert_eq!(encoded(delete(None)), "md k O7\r\n");
        assert_eq!(encoded(delete(Some(5))), "md k C5 O7\r\n");
        assert_eq!(encoded(Request::Noop), "mn\r\n");
    }

    #[test]
    fn a_ttl_above_thirty_days_is_sent_as_a_unix_time() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let days = |n: u64| Ttl::from(Duration::from_secs(n * 24 * 3600));
        assert_eq!(days(30).wire(), 30 * 24 * 3600);
        let wire = days(31).wire();
        assert!((now + 31 * 24 * 3600..now + 31 * 24 * 3600 + 5).contains(&wire));
        assert_eq!(Ttl::from(Duration::ZERO).wire(), 1);
    }

    #[test]
    fn bad_keys_are_refused_and_nothing_is_written() {
        let mut out = Vec::new();
        let long = "k".repeat(251);
        for key in ["", "a b", "a\r\nmn", long.as_str(), "é"] {
            let refused = Request::Get { key }.encode(1, &mut out);
            assert_eq!(refused, Err(EncodeError::BadKey), "{key:?}");
        }
        assert!(out.is_empty());
    }

    fn one(input: &[u8]) -> (Result<Reply, ErrorReply>, usize) {
        parse(input, MAX_VALUE).unwrap().unwrap()
    }

    #[test]
    fn replies_are_parsed() {
        let (reply, used) = one(b"VA 2 c1 t60 f5 O9\r\nhi\r\nHD\r\n");
        assert_eq!(used, 23);
        let reply = reply.unwrap();
        assert_eq!(
            reply,
            Reply {
                status: Status::Value,
                cas: Some(1),
                ttl: Some(60),
                client_flags: Some(5),
                opaque: Some(9),
                value: Some(b"hi".to_vec()),
            }
        );
        let miss = one(b"EN O123\r\n").0.unwrap();
        assert_eq!((miss.status, miss.opaque), (Status::Miss, Some(123)));
        let forever = one(b"VA 0 t-1 c3\r\n\r\n").0.unwrap();
        assert_eq!((forever.ttl, forever.value), (Some(-1), Some(Vec::new())));
        let refused = one(b"NS c0 O8\r\n").0.unwrap();
        assert_eq!(refused.status, Status::NotStored);
        for (line, status) in [
            (&b"HD c1 O7\r\n"[..], Status::Done),
            (b"EX O1\r\n", Status::Exists),
            (b"NF O1\r\n", Status::NotFound),
            (b"MN\r\n", Status::Noop),
        ] {
            assert_eq!(one(line).0.unwrap().status, status);
        }
        assert_eq!(
            one(b"SERVER_ERROR out of memory storing object\r\n").0,
            Err(ErrorReply::Server("out of memory storing object".into()))
        );
        assert_eq!(
            one(b"CLIENT_ERROR bad data chunk\r\n").0,
            Err(ErrorReply::Client("bad data chunk".into()))
        );
        assert_eq!(one(b"ERROR\r\n").0, Err(ErrorReply::Client("ERROR".into())));
    }

    #[test]
    fn incomplete_replies_wait_for_more_bytes() {
        let whole = b"VA 5 c1 O2\r\nhello\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut], MAX_VALUE), Ok(None), "cut at {cut}");
        }
        assert!(parse(whole, MAX_VALUE).unwrap().is_some());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b"XX\r\n"[..],
            b"\r\n",
            b"VA\r\n",
            b"VA x\r\n",
            b"VA 99999999999999999999\r\n",
            b"VA 268435457\r\n",
            b"VA 1 c1\r\nab\r\n",
            b"HD cx\r\n",
            b"HD f4294967296\r\n",
            b"HD O4294967296\r\n",
            b"HD t-2\r\n",
            b"HD c\r\n",
        ] {
            assert!(
                parse(input, MAX_VALUE).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(parse(&[b'a'; MAX_LINE + 1], MAX_VALUE).is_err());
        // A value above the configured item size is refused before it is read.
        assert!(parse(b"VA 1025 O1\r\n", 1024).is_err());
        assert!(parse(b"VA 1024 O1\r\n", 1024).unwrap().is_none());
    }
}
