//! What one memcached item holds, and the three requests every operation is built from (`mg`,
//! `ms`, `md` against one server), with their failures mapped to [`StoreError`]s and reported
//! to the server's health.
//!
//! # Item formats
//!
//! The client flags say what an item is:
//!
//! | flags | value | item |
//! |---|---|---|
//! | `0` | the encoded record | a session written by a single-copy store |
//! | `2` | an 8-byte big-endian generation, then the encoded record | a session written by a replicated store |
//! | the expiry, in Unix seconds | the encoded moved marker | a moved marker (single-copy store) |
//! | the item's expiry, in Unix seconds | [`REPLICATED_MARKER`], how many seconds the item outlives the marker (8 bytes, big-endian), the encoded moved marker | a moved marker (replicated store); once the item's remaining TTL, by memcached's clock, is down to those seconds it reads as ended |
//! | the expiry, in Unix seconds | [`TOMBSTONE`] | an ended session (a replicated store's delete) |
//!
//! Both kinds of store read every format. Keeping a marker's or tombstone's expiry in its
//! flags lets `touch`, which reads flags but not values, tell them from sessions and give
//! them back their own expiry. A replicated store keeps a marker item longer than the marker
//! lasts (as long as any copy of the session it replaced could), so that a stale copy on a
//! replica that missed the id cycle cannot come back after the marker expires.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use memcache::exp::{GetStatus, Meta, MutationResult, MutationStatus, Ttl};
use session_core::StoreError;

use crate::nodes::Node;

/// The flags of a session written by a single-copy store.
pub(crate) const SESSION_FLAGS: u32 = 0;
/// The flags of a session written by a replicated store: its value starts with a generation.
pub(crate) const GENERATION_SESSION_FLAGS: u32 = 2;
/// Flags above this are an expiry: the item is a marker or a tombstone, not a session.
pub(crate) const LAST_SESSION_FLAGS: u32 = 2;
/// The value of a tombstone. Its first byte is no codec format byte, so it never decodes as a
/// record or a marker.
pub(crate) const TOMBSTONE: &[u8] = b"\0ended";
/// The start of a replicated store's marker value (no codec format byte starts with zero).
pub(crate) const REPLICATED_MARKER: &[u8] = b"\0moved";
/// Where a replicated marker's encoded marker starts.
const REPLICATED_MARKER_HEADER: usize = REPLICATED_MARKER.len() + 8;

/// The value of a replicated marker whose item outlives the marker itself by `extra` seconds
/// and which points at the encoded marker `moved`. Its end is judged by the item's remaining
/// TTL, as memcached reports it, so every reader agrees on it whatever its own clock says.
pub(crate) fn replicated_marker(extra: u64, moved: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(REPLICATED_MARKER_HEADER + moved.len());
    value.extend_from_slice(REPLICATED_MARKER);
    value.extend_from_slice(&extra.to_be_bytes());
    value.extend_from_slice(moved);
    value
}

/// The length of the generation in front of a replicated session's record.
pub(crate) const GENERATION_LEN: usize = 8;

/// What an item is, read from its flags and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A session, with its generation (0 for one a single-copy store wrote).
    Session { generation: u64 },
    /// A moved marker.
    Moved,
    /// A tombstone, or a replicated marker whose own expiry has passed.
    Ended,
    /// A value this store cannot read (written by something else, or damaged): outranked by
    /// every readable copy; alone, it loads as a decode error.
    Unreadable,
}

/// One server's copy of an item.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub(crate) kind: Kind,
    pub(crate) flags: u32,
    pub(crate) cas: u64,
    /// Seconds left, as memcached reports them (one more than the TTL asked for, see
    /// [`wire_ttl`]).
    pub(crate) ttl: Option<i64>,
    pub(crate) value: Vec<u8>,
}

impl Item {
    /// The encoded record or marker (the value without a generation).
    pub(crate) fn payload(&self) -> &[u8] {
        match (self.flags, self.kind) {
            (GENERATION_SESSION_FLAGS, Kind::Session { .. }) => {
                self.value.get(GENERATION_LEN..).unwrap_or_default()
            }
            (_, Kind::Moved) if self.value.starts_with(REPLICATED_MARKER) => self
                .value
                .get(REPLICATED_MARKER_HEADER..)
                .unwrap_or_default(),
            _ => &self.value,
        }
    }

    /// The time left the store reports: memcached's figure less the second every write adds.
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        self.ttl
            .and_then(|secs| u64::try_from(secs).ok())
            .map(|secs| Duration::from_secs(secs.saturating_sub(1)))
    }
}

/// Classifies a stored item from its flags, value and remaining TTL (memcached's `t`).
pub(crate) fn classify(flags: u32, value: &[u8], ttl: Option<i64>) -> Kind {
    match flags {
        SESSION_FLAGS => Kind::Session { generation: 0 },
        GENERATION_SESSION_FLAGS => match value.first_chunk::<GENERATION_LEN>() {
            Some(generation) => Kind::Session {
                generation: u64::from_be_bytes(*generation),
            },
            None => Kind::Unreadable,
        },
        1 => Kind::Unreadable,
        _ if value == TOMBSTONE => Kind::Ended,
        _ if value.starts_with(REPLICATED_MARKER) => {
            let extra = value
                .get(REPLICATED_MARKER.len()..REPLICATED_MARKER_HEADER)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes);
            let left = ttl.and_then(|secs| u64::try_from(secs).ok());
            match (extra, left) {
                (Some(extra), Some(left)) if left > extra => Kind::Moved,
                (Some(_), _) => Kind::Ended,
                (None, _) => Kind::Unreadable,
            }
        }
        _ => Kind::Moved,
    }
}

/// This host's clock, in Unix seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When a write may happen.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Condition {
    /// Always.
    Always,
    /// Only if no item exists (memcached's add mode).
    Absent,
    /// Only if the item's CAS value is still this one.
    Cas(u64),
}

/// `mg <key> v c t f`: the item under `key` on `node`, `None` on a miss.
pub(crate) async fn get(
    node: &Arc<Node>,
    operation: &'static str,
    key: &str,
    deadline: Duration,
) -> Result<Option<Item>, StoreError> {
    let client = node.client();
    let request = client
        .get(key.as_bytes())
        .meta(Meta::NONE.cas().ttl())
        .send();
    let result = call(node, operation, deadline, request).await?;
    let (GetStatus::Hit, Some(value)) = (result.status, result.value) else {
        return Ok(None);
    };
    let cas = result
        .item
        .cas
        .ok_or_else(|| unexpected(operation, "no CAS value in the reply".into()))?;
    let cas = checked_cas(operation, cas)?;
    let flags = result.client_flags.unwrap_or(SESSION_FLAGS);
    Ok(Some(Item {
        kind: classify(flags, &value, result.item.ttl),
        flags,
        cas,
        ttl: result.item.ttl,
        value,
    }))
}

/// One `ms`: what to store and when.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Put<'a> {
    pub(crate) value: &'a [u8],
    pub(crate) flags: u32,
    pub(crate) ttl: Ttl,
    pub(crate) condition: Condition,
}

/// `ms <key> <size> T<ttl> F<flags> [C<cas>|ME] c`: sets `key` on `node`, asking for the new
/// CAS.
pub(crate) async fn set(
    node: &Arc<Node>,
    operation: &'static str,
    key: &str,
    put: Put<'_>,
    deadline: Duration,
) -> Result<MutationResult, StoreError> {
    set_telling(node, operation, key, put, deadline)
        .await
        .map_err(|failed| failed.error)
}

/// A failed `ms`, and whether it may have been applied (written in full, not answered).
pub(crate) struct SetFailed {
    pub(crate) error: StoreError,
    pub(crate) maybe_applied: bool,
}

/// [`set`], telling a failure that may have been applied from one that surely was not.
pub(crate) async fn set_telling(
    node: &Arc<Node>,
    operation: &'static str,
    key: &str,
    put: Put<'_>,
    deadline: Duration,
) -> Result<MutationResult, SetFailed> {
    let _permit = node.permit().await.map_err(|()| SetFailed {
        error: no_connection(operation, deadline),
        maybe_applied: false,
    })?;
    let client = node.client();
    let request = client
        .set(key.as_bytes(), put.value)
        .client_flags(put.flags)
        .ttl(put.ttl)
        .return_cas();
    let request = match put.condition {
        Condition::Always => request,
        Condition::Absent => request.add(),
        Condition::Cas(cas) => request.compare_cas(cas),
    };
    request.send().await.map_err(|error| SetFailed {
        maybe_applied: error.is_ambiguous(),
        error: failed(node, operation, deadline, error),
    })
}

/// Runs one client call against `node` and maps its failure; a transport failure also marks
/// the server down (see [`Node::report_failure`]). The client bounds every call itself (a dial
/// by the connect timeout, an exchange by the I/O timeout, a wait for a pooled connection by
/// the connect timeout), so no timer of our own is armed on this hot path; the fault tests
/// check the bound.
pub(crate) async fn call<T>(
    node: &Arc<Node>,
    operation: &'static str,
    deadline: Duration,
    request: impl Future<Output = memcache::exp::Result<T>>,
) -> Result<T, StoreError> {
    let _permit = node
        .permit()
        .await
        .map_err(|()| no_connection(operation, deadline))?;
    request
        .await
        .map_err(|error| failed(node, operation, deadline, error))
}

/// The error of a request that found no free connection in time (see [`Node::permit`]).
fn no_connection(operation: &'static str, deadline: Duration) -> StoreError {
    StoreError::Timeout {
        operation,
        after: deadline,
    }
}

/// `mg <key> T<ttl> f` without the value: sets the item's TTL, and tells whether it was there
/// and its flags (a marker or tombstone holds its expiry in them).
pub(crate) async fn touch(
    node: &Arc<Node>,
    key: &str,
    ttl: Ttl,
    deadline: Duration,
) -> Result<memcache::exp::GetResult, StoreError> {
    let client = node.client();
    let request = client.get(key.as_bytes()).touch(ttl).without_value().send();
    call(node, "touch", deadline, request).await
}

/// Maps a client error, reporting a transport failure to the server's health. (A request that
/// waits too long for one of this process's own connections fails before it gets here, in
/// [`Node::permit`]: that says nothing about the server.)
fn failed(
    node: &Arc<Node>,
    operation: &'static str,
    deadline: Duration,
    error: memcache::exp::Error,
) -> StoreError {
    use memcache::exp::Error as E;
    if matches!(error, E::Io(_) | E::Timeout { .. } | E::Ambiguous { .. }) {
        node.report_failure();
    }
    map_error(operation, error, deadline)
}

/// Transport timeouts (a hung server) become [`StoreError::Timeout`]; anything else is
/// [`StoreError::Backend`] with the client's error, less its key, as its source.
fn map_error(operation: &'static str, error: memcache::exp::Error, after: Duration) -> StoreError {
    use memcache::exp::Error as E;
    let timed_out = |e: &E| match e {
        E::Timeout { .. } => true,
        E::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    let is_timeout = match &error {
        E::Ambiguous { source, .. } => timed_out(source),
        other => timed_out(other),
    };
    if is_timeout {
        StoreError::Timeout { operation, after }
    } else {
        StoreError::Backend {
            operation,
            source: Box::new(RequestFailure::from(error)),
        }
    }
}

/// Why a request to memcached failed: the source of a [`StoreError::Backend`]. The client's
/// errors name the key of the failed request; this keeps everything but the key, so that an
/// application logging the error chain never logs a storage key.
#[derive(Debug)]
#[non_exhaustive]
pub enum RequestFailure {
    /// The server did not answer in time.
    TimedOut,
    /// The request was written in full but not answered: it may have been applied.
    Unanswered(Box<RequestFailure>),
    /// Any other failure the client reported (none of these carries a key).
    Client(memcache::exp::Error),
}

impl From<memcache::exp::Error> for RequestFailure {
    fn from(error: memcache::exp::Error) -> Self {
        use memcache::exp::Error as E;
        match error {
            E::Timeout { .. } => Self::TimedOut,
            E::Ambiguous { source, .. } => Self::Unanswered(Box::new(Self::from(*source))),
            other => Self::Client(other),
        }
    }
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TimedOut => f.write_str("memcached did not answer in time"),
            Self::Unanswered(_) => {
                f.write_str("the request was sent but not answered; it may have been applied")
            }
            Self::Client(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for RequestFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TimedOut => None,
            Self::Unanswered(cause) => Some(cause.as_ref()),
            Self::Client(error) => Some(error),
        }
    }
}

/// The TTL to send for `ttl`: whole seconds rounded up, plus one for memcached's coarse clock.
pub(crate) fn wire_ttl(ttl: Duration) -> Ttl {
    Ttl::from(ttl + Duration::from_secs(1))
}

/// The flags of a marker or tombstone written now for `ttl`: its expiry in Unix seconds.
pub(crate) fn expiry_flags(operation: &'static str, ttl: Duration) -> Result<u32, StoreError> {
    let expires = SystemTime::now() + ttl + Duration::from_secs(1);
    let expires_secs = expires
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    u32::try_from(expires_secs)
        .ok()
        .filter(|secs| *secs > LAST_SESSION_FLAGS)
        .ok_or_else(|| {
            unexpected(
                operation,
                "the expiry does not fit memcached's flags".into(),
            )
        })
}

/// The time left before the expiry held in a marker's or tombstone's `flags`, by this host's
/// clock (the one that set it), at least a second.
pub(crate) fn time_left(flags: u32) -> Duration {
    Duration::from_secs(u64::from(flags).saturating_sub(unix_now()).max(1))
}

/// A CAS value of zero means the server runs with CAS disabled (`-C`): every compare would
/// match, so versions would mean nothing.
pub(crate) fn checked_cas(operation: &'static str, cas: u64) -> Result<u64, StoreError> {
    if cas == 0 {
        return Err(unexpected(
            operation,
            "memcached runs with CAS disabled (-C); sessions need CAS".into(),
        ));
    }
    Ok(cas)
}

/// The CAS of an applied write.
pub(crate) fn written_cas(
    operation: &'static str,
    result: &MutationResult,
) -> Result<u64, StoreError> {
    match (result.status, result.cas) {
        (MutationStatus::Applied, Some(cas)) => checked_cas(operation, cas),
        (MutationStatus::Applied, None) => {
            Err(unexpected(operation, "no CAS value in the reply".into()))
        }
        (other, _) => Err(unexpected(operation, format!("unexpected reply {other:?}"))),
    }
}

pub(crate) fn unexpected(operation: &'static str, what: String) -> StoreError {
    StoreError::Backend {
        operation,
        source: what.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicated_marker_ends_by_memcached_clock_not_the_readers() {
        let marker = replicated_marker(100, b"\x80target");
        let far_future = u32::MAX - 1;
        // The item has 101 s left and outlives the marker by 100 s: one second of marker left.
        assert_eq!(classify(far_future, &marker, Some(101)), Kind::Moved);
        assert_eq!(classify(far_future, &marker, Some(100)), Kind::Ended);
        assert_eq!(classify(far_future, &marker, None), Kind::Ended);
        // The flags (the writer's clock) play no part.
        assert_eq!(classify(3, &marker, Some(101)), Kind::Moved);
        assert_eq!(classify(3, b"\0moved\0", Some(101)), Kind::Unreadable);
    }
}
