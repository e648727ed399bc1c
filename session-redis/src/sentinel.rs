//! The master named by Redis Sentinel, followed through failovers.
//!
//! The current master's connection sits in a `watch` cell. An operation that fails in a way
//! that may mean the master moved (a connection error or timeout, a `READONLY` reply) asks for
//! a re-resolution and waits for it within its own deadline. Re-resolutions run one at a time
//! in a background task, at most one per [`RESOLVE_INTERVAL`], so a burst of failing
//! operations asks the sentinels once; the task outlives an operation that gave up waiting,
//! so the next operation finds the new master. All sentinels are asked at once, each bounded
//! by a timeout, and the first that names a master which confirms its role (`ROLE`) wins, so a
//! dead or hung sentinel costs nothing. Only when the address changes is a new connection
//! made (and the old one dropped).
//!
//! A failed operation is sent again, on the new master, only when that cannot apply it twice:
//! when the error proves it changed nothing ([`proves_unapplied`]), or when the operation is
//! idempotent. Everything stays within the operation's deadline.

use std::error::Error;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{RedisConnectionInfo, RedisError};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::SentinelTopology;
use crate::renewable::RenewableConnection;
use crate::request::{Reply, Request, proves_unapplied, suggests_failover};

/// The least time between two re-resolutions.
pub(crate) const RESOLVE_INTERVAL: Duration = Duration::from_millis(100);

/// A master, as last named by the sentinels.
struct Master {
    /// `host:port`.
    address: String,
    connection: RenewableConnection,
    /// Counts the masters this link has had: a failed operation names the one it used.
    generation: u64,
}

#[derive(Default)]
struct LinkState {
    master: Option<Arc<Master>>,
    /// Completed re-resolutions, successful or not.
    resolutions: u64,
    /// Why the last re-resolution found no master.
    last_error: Option<RedisError>,
}

#[derive(Default)]
struct Schedule {
    in_flight: bool,
    last_started: Option<Instant>,
}

/// The sentinels, the master they name, and the connection to it.
pub(crate) struct SentinelLink {
    /// One client per sentinel, so that each is asked (and timed out) on its own.
    sentinels: Vec<Arc<tokio::sync::Mutex<Sentinel>>>,
    master_name: Arc<str>,
    node: SentinelNodeConnectionInfo,
    manager_config: ConnectionManagerConfig,
    /// The time one sentinel gets to name a master whose role is confirmed.
    lookup_timeout: Duration,
    state: watch::Sender<LinkState>,
    schedule: Mutex<Schedule>,
}

impl SentinelLink {
    /// Prepares the link; nothing is asked until the first operation.
    pub(crate) fn new(
        topology: &SentinelTopology,
        manager_config: ConnectionManagerConfig,
        lookup_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let sentinels = topology
            .sentinels
            .iter()
            .map(|url| Sentinel::build(vec![url.as_str()]).map(tokio::sync::Mutex::new))
            .map(|sentinel| sentinel.map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let mut redis = RedisConnectionInfo::default().set_db(topology.database);
        if let Some(username) = &topology.username {
            redis = redis.set_username(username);
        }
        if let Some(password) = &topology.password {
            redis = redis.set_password(password);
        }
        Ok(Self {
            sentinels,
            master_name: topology.master_name.as_str().into(),
            node: SentinelNodeConnectionInfo::default().set_redis_connection_info(redis),
            manager_config,
            lookup_timeout,
            state: watch::Sender::new(LinkState::default()),
            schedule: Mutex::new(Schedule::default()),
        })
    }

    /// Sends `request` to the master, following it through a failover; see the module docs.
    /// Gives up at `deadline`.
    pub(crate) async fn send(
        self: &Arc<Self>,
        request: &Request<'_>,
        deadline: Instant,
    ) -> Result<Reply, Failure> {
        let master = match self.current() {
            Some(master) => master,
            None => self.next_master(None, deadline).await.ok_or_else(|| {
                if Instant::now() >= deadline {
                    Failure::Deadline
                } else {
                    Failure::NoMaster(NoMaster {
                        last_error: self.state.borrow().last_error.clone(),
                    })
                }
            })?,
        };
        let error = match tokio::time::timeout_at(
            deadline,
            request.send(&mut master.connection.clone(), deadline),
        )
        .await
        {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(error)) => error,
            Err(_) => return Err(self.deadline_passed(&master)),
        };
        if !suggests_failover(&error) {
            return Err(Failure::Redis(error));
        }
        let retry_is_safe = request.idempotent || proves_unapplied(&error);
        let Some(next) = self.next_master(Some(master.generation), deadline).await else {
            return Err(Failure::Redis(error));
        };
        if !retry_is_safe {
            return Err(Failure::Redis(error));
        }
        match tokio::time::timeout_at(
            deadline,
            request.send(&mut next.connection.clone(), deadline),
        )
        .await
        {
            Ok(outcome) => outcome.map_err(Failure::Redis),
            Err(_) => Err(Failure::Deadline),
        }
    }

    /// A timeout on `master`: the master may be hung or cut off, so have the sentinels asked
    /// (for the operations that follow; this one has no time left).
    fn deadline_passed(self: &Arc<Self>, master: &Master) -> Failure {
        if self.current().map(|m| m.generation) == Some(master.generation) {
            self.schedule_resolution();
        }
        Failure::Deadline
    }

    fn current(&self) -> Option<Arc<Master>> {
        self.state.borrow().master.clone()
    }

    /// Waits, until `deadline`, for a master other than generation `stale` (`None`: for any
    /// master), having the sentinels asked. `None` if the next re-resolution names the same
    /// master, finds none, or does not finish in time.
    async fn next_master(
        self: &Arc<Self>,
        stale: Option<u64>,
        deadline: Instant,
    ) -> Option<Arc<Master>> {
        let moved_on = |state: &LinkState| {
            state
                .master
                .as_ref()
                .filter(|master| Some(master.generation) != stale)
                .cloned()
        };
        let mut receiver = self.state.subscribe();
        let seen = {
            let state = receiver.borrow_and_update();
            if let Some(master) = moved_on(&state) {
                return Some(master);
            }
            state.resolutions
        };
        self.schedule_resolution();
        let waited = tokio::time::timeout_at(
            deadline,
            receiver.wait_for(|state| moved_on(state).is_some() || state.resolutions > seen),
        )
        .await;
        match waited {
            Ok(Ok(state)) => moved_on(&state),
            _ => None,
        }
    }

    /// Starts a re-resolution in the background unless one is under way; it starts no sooner
    /// than [`RESOLVE_INTERVAL`] after the previous one.
    fn schedule_resolution(self: &Arc<Self>) {
        let start = {
            let mut schedule = self.schedule.lock().unwrap_or_else(PoisonError::into_inner);
            if schedule.in_flight {
                return;
            }
            let now = Instant::now();
            let start = schedule
                .last_started
                .map_or(now, |last| last + RESOLVE_INTERVAL)
                .max(now);
            schedule.in_flight = true;
            schedule.last_started = Some(start);
            start
        };
        let link = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let found = link.ask_sentinels().await;
            // Cleared before the waiters wake, so that one of them can schedule the next.
            link.schedule
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .in_flight = false;
            link.state.send_modify(|state| {
                state.resolutions += 1;
                match found {
                    Ok(client) => {
                        state.last_error = None;
                        let address = client.get_connection_info().addr().to_string();
                        if state.master.as_ref().is_some_and(|m| m.address == address) {
                            return;
                        }
                        match RenewableConnection::new(client, link.manager_config.clone()) {
                            Ok(connection) => {
                                let generation =
                                    state.master.as_ref().map_or(0, |m| m.generation + 1);
                                state.master = Some(Arc::new(Master {
                                    address,
                                    connection,
                                    generation,
                                }));
                            }
                            Err(error) => state.last_error = Some(error),
                        }
                    }
                    Err(error) => state.last_error = Some(error),
                }
            });
        });
    }

    /// Asks every sentinel at once for the master; the first that names one whose role is
    /// confirmed wins.
    async fn ask_sentinels(&self) -> Result<redis::Client, RedisError> {
        let mut lookups = JoinSet::new();
        for sentinel in &self.sentinels {
            let sentinel = Arc::clone(sentinel);
            let name = Arc::clone(&self.master_name);
            let node = self.node.clone();
            let timeout = self.lookup_timeout;
            lookups.spawn(async move {
                let lookup = async {
                    sentinel
                        .lock()
                        .await
                        .async_master_for(&name, Some(&node))
                        .await
                };
                tokio::time::timeout(timeout, lookup)
                    .await
                    .unwrap_or_else(|_| {
                        Err(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the sentinel did not name a master in time",
                        )))
                    })
            });
        }
        let mut last_error = None;
        while let Some(joined) = lookups.join_next().await {
            match joined {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(error)) => last_error = Some(error),
                Err(join_error) => {
                    last_error = Some(RedisError::from(std::io::Error::other(
                        join_error.to_string(),
                    )));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from(std::io::Error::other("no sentinel is configured"))
        }))
    }
}

/// Why an operation through Sentinel failed.
pub(crate) enum Failure {
    /// The request failed.
    Redis(RedisError),
    /// The operation's deadline passed.
    Deadline,
    /// The sentinels named no master (yet).
    NoMaster(NoMaster),
}

/// The sentinels named no reachable master within the operation's deadline: none answered,
/// none knows the master's name, or the master they name is down or not a master. The source
/// of the [`StoreError::Backend`](session_core::StoreError::Backend) the operation returns.
#[derive(Debug, Clone)]
pub struct NoMaster {
    last_error: Option<RedisError>,
}

impl fmt::Display for NoMaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the sentinels named no reachable master")
    }
}

impl Error for NoMaster {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.last_error
            .as_ref()
            .map(|e| e as &(dyn Error + 'static))
    }
}
