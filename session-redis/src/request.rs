//! One request to Redis: a command or a script, sent alone or pipelined with `WAIT`.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisResult, Script, ServerErrorKind, Value};

use crate::config::WaitForReplicas;

/// A request, ready to send on any connection.
pub(crate) struct Request<'a> {
    /// The command, or the script's `EVALSHA`.
    command: Cmd,
    /// The script, to load when the server answers `NOSCRIPT`.
    script: Option<&'a Script>,
    /// The command followed by `WAIT`, for writes when the option is set.
    with_wait: Option<Pipeline>,
    /// Whether sending it twice leaves the same state as sending it once, so that a request
    /// whose fate is unknown (the connection dropped after it was sent) may be sent again.
    pub(crate) idempotent: bool,
}

/// What a request got back: the command's reply and, for a write followed by `WAIT`, the
/// number of replicas that acknowledged it.
pub(crate) struct Reply {
    pub(crate) value: Value,
    pub(crate) acknowledged: Option<i64>,
}

impl<'a> Request<'a> {
    /// A read: never followed by `WAIT`, always safe to repeat.
    pub(crate) fn read(command: Cmd) -> Self {
        Self {
            command,
            script: None,
            with_wait: None,
            idempotent: true,
        }
    }

    /// A write command, followed by `WAIT` when `wait` is set.
    pub(crate) fn write(command: Cmd, wait: Option<WaitForReplicas>, idempotent: bool) -> Self {
        let with_wait = wait.map(|wait| with_wait(&command, wait));
        Self {
            command,
            script: None,
            with_wait,
            idempotent,
        }
    }

    /// A writing script on one key, run by `EVALSHA`, followed by `WAIT` when `wait` is set.
    pub(crate) fn script(
        script: &'a Script,
        key: &str,
        args: &[&[u8]],
        wait: Option<WaitForReplicas>,
        idempotent: bool,
    ) -> Self {
        let mut command = redis::cmd("EVALSHA");
        command.arg(script.get_hash()).arg(1).arg(key);
        for arg in args {
            command.arg(*arg);
        }
        let mut request = Self::write(command, wait, idempotent);
        request.script = Some(script);
        request
    }

    /// Sends the request on `connection` and waits for its reply. The client bounds the round
    /// trip; a script the server did not have costs two more (`SCRIPT LOAD`, then the script
    /// again), and those must end by `deadline`, else the request fails as timed out.
    pub(crate) async fn send<C: ConnectionLike>(
        &self,
        connection: &mut C,
        deadline: tokio::time::Instant,
    ) -> RedisResult<Reply> {
        match &self.with_wait {
            None => {
                let mut reply = connection.req_packed_command(&self.command).await?;
                if self.needs_load(&reply) {
                    reply = self
                        .load_and_resend(connection, deadline, |c| {
                            c.req_packed_command(&self.command)
                        })
                        .await?;
                }
                Ok(Reply {
                    value: reply.extract_error()?,
                    acknowledged: None,
                })
            }
            Some(pipeline) => {
                let mut replies = connection.req_packed_commands(pipeline, 0, 2).await?;
                if replies.first().is_some_and(|reply| self.needs_load(reply)) {
                    // NOSCRIPT: the script did not run, so nothing was written; load and resend.
                    replies = self
                        .load_and_resend(connection, deadline, |c| {
                            c.req_packed_commands(pipeline, 0, 2)
                        })
                        .await?;
                }
                let mut replies = replies.into_iter();
                let (Some(value), Some(acknowledged)) = (replies.next(), replies.next()) else {
                    return Err(RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "a write and its WAIT gave fewer than two replies",
                    )));
                };
                let value = value.extract_error()?;
                let acknowledged = redis::from_redis_value(acknowledged.extract_error()?)?;
                Ok(Reply {
                    value,
                    acknowledged: Some(acknowledged),
                })
            }
        }
    }

    /// After `NOSCRIPT`: loads the script and sends the request again with `resend`, all by
    /// `deadline`.
    async fn load_and_resend<'c, C: ConnectionLike, T>(
        &self,
        connection: &'c mut C,
        deadline: tokio::time::Instant,
        resend: impl FnOnce(&'c mut C) -> redis::RedisFuture<'c, T>,
    ) -> RedisResult<T> {
        let again = async {
            self.load(connection).await?;
            resend(connection).await
        };
        tokio::time::timeout_at(deadline, again)
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            })
    }

    fn needs_load(&self, reply: &Value) -> bool {
        self.script.is_some()
            && matches!(reply, Value::ServerError(error)
                if error.kind() == Some(ServerErrorKind::NoScript))
    }

    async fn load<C: ConnectionLike>(&self, connection: &mut C) -> RedisResult<()> {
        if let Some(script) = self.script {
            script.load_async(connection).await?;
        }
        Ok(())
    }
}

/// `command`, then `WAIT replicas timeout`, in one pipeline: one round trip, on the same
/// connection (in a cluster, to the node that owns the command's key: `WAIT` has no key, so
/// the pipeline is routed by the command's).
fn with_wait(command: &Cmd, wait: WaitForReplicas) -> Pipeline {
    let mut pipeline = redis::pipe();
    pipeline
        .add_command(command.clone())
        .cmd("WAIT")
        .arg(wait.replicas)
        .arg(crate::millis(wait.timeout));
    pipeline
}

/// A write the master applied but fewer replicas acknowledged than
/// [`RedisConfig::wait_for_replicas`](crate::RedisConfig::wait_for_replicas) asks for, within
/// its timeout. It is the source of the [`StoreError::Backend`](session_core::StoreError::Backend)
/// such a write returns.
///
/// The write is on the master and may reach the replicas later, so it may or may not survive a
/// failover: treat the operation's outcome as unknown, like a lost connection's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReplicated {
    /// Replicas that acknowledged the write (`WAIT`'s reply).
    pub acknowledged: u64,
    /// Replicas the configuration asks for.
    pub required: u32,
    /// How long the master waited for them.
    pub waited: Duration,
}

impl fmt::Display for NotReplicated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the write reached {} of the {} replicas required within {:?}; it is on the master \
             but may not survive a failover",
            self.acknowledged, self.required, self.waited
        )
    }
}

impl Error for NotReplicated {}

/// Checks `WAIT`'s reply against the option.
pub(crate) fn check_replicated(
    wait: Option<WaitForReplicas>,
    acknowledged: Option<i64>,
) -> Result<(), NotReplicated> {
    let (Some(wait), Some(acknowledged)) = (wait, acknowledged) else {
        return Ok(());
    };
    let acknowledged = u64::try_from(acknowledged).unwrap_or(0);
    if acknowledged >= u64::from(wait.replicas) {
        Ok(())
    } else {
        Err(NotReplicated {
            acknowledged,
            required: wait.replicas,
            waited: wait.timeout,
        })
    }
}

/// Whether `error` may mean the master moved: the connection failed or timed out, or a server
/// that is now a replica refused a write.
pub(crate) fn suggests_failover(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// Whether `error` proves that the request changed nothing, so that sending it again cannot
/// apply it twice: a replica refused it (`READONLY`: a replica applies no client write, and
/// the scripts start with a write, so they stop there), or the connection was refused (the
/// request was never sent).
pub(crate) fn proves_unapplied(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) || error.is_connection_refusal()
}
