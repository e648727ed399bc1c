//! A connection to one server that is replaced when it cannot heal itself.
//!
//! The redis crate's `ConnectionManager` reconnects when a request fails with a dropped
//! connection. But when that reconnection fails with an error other than an I/O error (its
//! handshake reply cut short by the network, so the reply does not parse), redis 1.8 keeps the
//! failed attempt and answers every later request with the same error at once, forever; it
//! only tries again after an I/O error. The fault tests (a reply cut short, then healed) found
//! this. So a request that fails in a way that calls for a new connection without being an I/O
//! error replaces the whole manager with a new one, which connects on its next use. Each broken
//! manager is replaced once, by whichever request noticed first.

use std::sync::{Arc, PoisonError, RwLock};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// A `ConnectionManager` that is replaced by a new one when it cannot recover by itself.
/// Cheap to clone: clones share the manager.
#[derive(Clone)]
pub(crate) struct RenewableConnection(Arc<Shared>);

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The manager in use, and how many were replaced before it.
    current: RwLock<(u64, ConnectionManager)>,
}

impl RenewableConnection {
    /// A connection to `client`'s server, made on first use.
    pub(crate) fn new(client: redis::Client, config: ConnectionManagerConfig) -> RedisResult<Self> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Self(Arc::new(Shared {
            client,
            config,
            current: RwLock::new((0, manager)),
        })))
    }

    /// The manager in use and its number.
    fn current(&self) -> (u64, ConnectionManager) {
        self.0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many managers were replaced so far.
    #[cfg(test)]
    fn renewals(&self) -> u64 {
        self.current().0
    }

    /// After `error` from manager number `used`: replaces that manager if the error calls for a
    /// new connection that the manager does not make by itself, and no other request has
    /// replaced it yet.
    fn after_error(&self, used: u64, error: &RedisError) {
        if !needs_new_manager(error) {
            return;
        }
        let mut current = self
            .0
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if current.0 != used {
            return;
        }
        // A manager that cannot be built now keeps the old one; the next failure tries again.
        if let Ok(manager) =
            ConnectionManager::new_lazy_with_config(self.0.client.clone(), self.0.config.clone())
        {
            *current = (used + 1, manager);
        }
    }
}

/// Whether `error` means the connection must be replaced while the manager would not reconnect
/// on its own (it does for I/O errors).
fn needs_new_manager(error: &RedisError) -> bool {
    error.is_unrecoverable_error() && !error.is_io_error()
}

impl ConnectionLike for RenewableConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (used, mut manager) = self.current();
            let reply = manager.req_packed_command(cmd).await;
            if let Err(error) = &reply {
                self.after_error(used, error);
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (used, mut manager) = self.current();
            let replies = manager.req_packed_commands(pipeline, offset, count).await;
            if let Err(error) = &replies {
                self.after_error(used, error);
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_the_manager_does_not_heal_replace_it() {
        let parse = RedisError::from(redis::ParsingError::from("unexpected end of input"));
        assert!(needs_new_manager(&parse));
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(
            !needs_new_manager(&dropped),
            "the manager reconnects itself"
        );
        let server = redis::RedisError::from((redis::ErrorKind::Client, "a client error"));
        assert!(!needs_new_manager(&server));
    }

    #[tokio::test]
    async fn a_broken_manager_is_replaced_once() {
        let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
        let connection = RenewableConnection::new(client, ConnectionManagerConfig::new()).unwrap();
        let parse = RedisError::from(redis::ParsingError::from("cut short"));
        connection.after_error(0, &parse);
        assert_eq!(connection.renewals(), 1);
        // A second request that saw the same broken manager replaces nothing more.
        connection.after_error(0, &parse);
        assert_eq!(connection.renewals(), 1);
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        connection.after_error(1, &dropped);
        assert_eq!(connection.renewals(), 1);
    }
}
