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

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use session_core::StoreError;

use crate::mux::CallError;
use crate::nodes::Node;
use crate::wire::{Reply, Request, SetMode, Status, Ttl};

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
    let reply = call(node, operation, deadline, Request::Get { key }).await?;
    match reply.status {
        Status::Value => {}
        Status::Miss => return Ok(None),
        other => return Err(unexpected(operation, format!("unexpected reply {other:?}"))),
    }
    let cas = reply
        .cas
        .ok_or_else(|| unexpected(operation, "no CAS value in the reply".into()))?;
    let cas = checked_cas(operation, cas)?;
    let flags = reply.client_flags.unwrap_or(SESSION_FLAGS);
    let value = reply.value.unwrap_or_default();
    Ok(Some(Item {
        kind: classify(flags, &value, reply.ttl),
        flags,
        cas,
        ttl: reply.ttl,
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

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MutationStatus {
    /// Stored (`HD`), or deleted.
    Applied,
    /// An add found an item there (`NS`).
    NotStored,
    /// The CAS did not match (`EX`).
    CasMismatch,
    /// A compare-and-set write or a delete found no item (`NF`).
    NotFound,
}

/// A write's outcome and, when stored, the item's new CAS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MutationResult {
    pub(crate) status: MutationStatus,
    pub(crate) cas: Option<u64>,
}

fn mutation(operation: &'static str, reply: &Reply) -> Result<MutationResult, StoreError> {
    let status = match reply.status {
        Status::Done => MutationStatus::Applied,
        Status::NotStored => MutationStatus::NotStored,
        Status::Exists => MutationStatus::CasMismatch,
        Status::NotFound => MutationStatus::NotFound,
        other => return Err(unexpected(operation, format!("unexpected reply {other:?}"))),
    };
    Ok(MutationResult {
        status,
        cas: reply.cas,
    })
}

/// `ms <key> <size> T<ttl> F<flags> c [C<cas>|ME]`: sets `key` on `node`, asking for the new
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
    let mode = match put.condition {
        Condition::Always => SetMode::Set,
        Condition::Absent => SetMode::Add,
        Condition::Cas(cas) => SetMode::Cas(cas),
    };
    let request = Request::Set {
        key,
        value: put.value,
        flags: put.flags,
        ttl: put.ttl,
        mode,
    };
    let reply = call_telling(node, operation, deadline, request).await?;
    mutation(operation, &reply).map_err(|error| SetFailed {
        error,
        maybe_applied: false,
    })
}

/// `md <key> [C<cas>]`.
pub(crate) async fn delete(
    node: &Arc<Node>,
    operation: &'static str,
    key: &str,
    cas: Option<u64>,
    deadline: Duration,
) -> Result<MutationStatus, StoreError> {
    let reply = call(node, operation, deadline, Request::Delete { key, cas }).await?;
    mutation(operation, &reply).map(|result| result.status)
}

/// Sends one request to `node` and maps its failure; a transport failure also marks the
/// server down (see [`Node::report_failure`]). The connection bounds every call (a wait for a
/// free slot under the in-flight cap and a dial by the connect timeout each, an exchange by
/// the I/O timeout, watched by one timer per connection, with a backstop for a connection
/// whose tasks stopped running); the fault tests check the bound.
pub(crate) async fn call(
    node: &Arc<Node>,
    operation: &'static str,
    deadline: Duration,
    request: Request<'_>,
) -> Result<Reply, StoreError> {
    call_telling(node, operation, deadline, request)
        .await
        .map_err(|failed| failed.error)
}

async fn call_telling(
    node: &Arc<Node>,
    operation: &'static str,
    deadline: Duration,
    request: Request<'_>,
) -> Result<Reply, SetFailed> {
    let permit = node.permit().await.map_err(|()| SetFailed {
        error: no_connection(operation, deadline),
        maybe_applied: false,
    })?;
    node.client()
        .call(request, permit)
        .await
        .map_err(|error| SetFailed {
            maybe_applied: error.maybe_applied(),
            error: failed(node, operation, deadline, error),
        })
}

/// The error of a request that found no free slot in time (see [`Node::permit`]).
fn no_connection(operation: &'static str, deadline: Duration) -> StoreError {
    StoreError::Timeout {
        operation,
        after: deadline,
    }
}

/// Whether a touch found the item, and its client flags.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Touched {
    pub(crate) hit: bool,
    pub(crate) client_flags: Option<u32>,
}

/// `mg <key> T<ttl> f` without the value: sets the item's TTL, and tells whether it was there
/// and its flags (a marker or tombstone holds its expiry in them).
pub(crate) async fn touch(
    node: &Arc<Node>,
    key: &str,
    ttl: Ttl,
    deadline: Duration,
) -> Result<Touched, StoreError> {
    let reply = call(node, "touch", deadline, Request::Touch { key, ttl }).await?;
    let hit = match reply.status {
        Status::Done | Status::Value => true,
        Status::Miss => false,
        other => return Err(unexpected("touch", format!("unexpected reply {other:?}"))),
    };
    Ok(Touched {
        hit,
        client_flags: reply.client_flags,
    })
}

/// Maps a connection's error, reporting a transport failure to the server's health. (A
/// request that waits too long for a slot under this process's own in-flight cap fails
/// before it gets here, in [`Node::permit`]: that says nothing about the server.)
fn failed(
    node: &Arc<Node>,
    operation: &'static str,
    deadline: Duration,
    error: CallError,
) -> StoreError {
    if error.is_transport() {
        node.report_failure();
    }
    match error {
        CallError::TimedOut | CallError::ConnectTimedOut | CallError::Stalled => {
            StoreError::Timeout {
                operation,
                after: deadline,
            }
        }
        other => StoreError::Backend {
            operation,
            source: Box::new(RequestFailure::from(other)),
        },
    }
}

/// Why a request to memcached failed: the source of a [`StoreError::Backend`]. None of these
/// names the request's key, so an application logging the error chain never logs a storage
/// key.
#[derive(Debug)]
#[non_exhaustive]
pub enum RequestFailure {
    /// No connection to the server could be made (nothing was sent).
    Connect(std::io::Error),
    /// The request was queued or sent, and its connection failed before the reply came: it
    /// may have been applied.
    Unanswered(std::io::Error),
    /// The server answered `SERVER_ERROR` with this message.
    Server(String),
    /// The server answered `CLIENT_ERROR` (or `ERROR`) with this message.
    Rejected(String),
    /// The server sent something that is no meta-protocol reply.
    Malformed(&'static str),
    /// The key was refused before sending (empty, too long, or holding a space or control
    /// byte).
    BadKey,
}

impl From<CallError> for RequestFailure {
    fn from(error: CallError) -> Self {
        match error {
            CallError::Encode(_) => Self::BadKey,
            CallError::Connect(kind, message) => Self::Connect(std::io::Error::new(kind, message)),
            CallError::ConnectTimedOut => Self::Connect(std::io::ErrorKind::TimedOut.into()),
            CallError::TimedOut | CallError::Stalled => {
                Self::Unanswered(std::io::ErrorKind::TimedOut.into())
            }
            CallError::Lost(kind, message) => Self::Unanswered(std::io::Error::new(kind, message)),
            CallError::Server(message) => Self::Server(message),
            CallError::Rejected(message) => Self::Rejected(message),
            CallError::Garbage(what) => Self::Malformed(what),
        }
    }
}

impl std::fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(_) => f.write_str("could not connect to memcached"),
            Self::Unanswered(_) => f.write_str(
                "the connection failed before the reply came; the request may have been applied",
            ),
            Self::Server(message) => write!(f, "memcached answered SERVER_ERROR {message}"),
            Self::Rejected(message) => write!(f, "memcached rejected the request: {message}"),
            Self::Malformed(what) => write!(f, "memcached sent a malformed reply: {what}"),
            Self::BadKey => f.write_str("the key is not one memcached accepts"),
        }
    }
}

impl std::error::Error for RequestFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(error) | Self::Unanswered(error) => Some(error),
            _ => None,
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
