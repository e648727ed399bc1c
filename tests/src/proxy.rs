//! A TCP proxy on 127.0.0.1 that injects network faults between a store and its server.
//!
//! [`FaultProxy::start`] listens on a free loopback port and forwards every connection it
//! accepts to one upstream address. The test points the store at [`FaultProxy::address`] and
//! then, through the handle, decides what happens to the bytes: a [`Fault`], the
//! [`Scope`] of connections it applies to, and the [`Trigger`] that brings it into force on
//! each of them. Faults act on the bytes as they pass, so a connection that idles in a pool
//! meets its fault when it is next used.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use session_conformance::proxy::{Fault, FaultProxy, Scope, Trigger};
//! # let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let proxy = FaultProxy::start(upstream.local_addr().unwrap()).await.unwrap();
//! // Replies on every connection stop after 10 bytes, with a reset.
//! proxy.apply(Fault::Reset, Scope::All, Trigger::AfterReplyBytes(10));
//! // ... the store under test fails its requests ...
//! proxy.clear();
//! # }
//! ```
//!
//! "Reply" bytes are those from the server to the client. Dropping the handle stops the proxy:
//! its listener and every connection task end.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// What the proxy does to a connection's bytes while the fault is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward every chunk as it comes.
    None,
    /// Forward each chunk this long after it arrived, in both directions (a long wire: chunks
    /// in flight are delayed side by side, not one after another).
    Latency(Duration),
    /// Forward nothing more in either direction, and read nothing, while keeping both sockets
    /// open (a peer that stopped answering), until the fault changes.
    Hang,
    /// When the next reply byte arrives, forward nothing more and abort the client's
    /// connection with a TCP reset (`RST`); the server's side is closed normally. Requests
    /// still go through, so that a reply comes to be cut.
    Reset,
    /// When the next reply byte arrives, forward nothing more and close both sides with `FIN`
    /// (a reply cut short). Requests still go through.
    Cut,
    /// Forward one byte per write, each after this delay, in both directions (with
    /// `Duration::ZERO`, as fast as the proxy goes: the peer reads the bytes in whatever
    /// pieces they gather into).
    Trickle(Duration),
    /// At most this many bytes per second in each direction of each connection (0 counts as
    /// 1), sent in slices of a fiftieth of a second.
    Bandwidth(u64),
}

/// Which connections [`FaultProxy::apply`] changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every connection open now, and every one accepted from now on.
    All,
    /// Only connections accepted from now on; open ones keep what they have.
    New,
    /// Only connections open now; the rule for connections accepted later stays as it was.
    Existing,
}

/// When a fault comes into force on a connection it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// At once: the next bytes to pass meet it.
    Now,
    /// Once this many more reply bytes have been forwarded on the connection, counted from
    /// when the fault was applied (or from its start, for a new connection). A chunk that
    /// crosses the mark is split: the bytes before it pass untouched. With [`Fault::Reset`]
    /// or [`Fault::Cut`], this is where the reply breaks off.
    AfterReplyBytes(u64),
}

/// A running proxy; dropping it stops the listener and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    listener: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Bumped on every change of a fault, so that waiting connections look again.
    changes: watch::Sender<u64>,
    accepted: AtomicUsize,
}

#[derive(Debug)]
struct State {
    /// The fault new connections get, and the reply bytes after which it is in force.
    for_new: (Fault, u64),
    connections: HashMap<u64, Connection>,
    next_id: u64,
}

#[derive(Debug)]
struct Connection {
    fault: Fault,
    /// The reply-byte count at which `fault` comes into force.
    in_force_at: u64,
    /// Reply bytes forwarded so far.
    reply_bytes: u64,
    task: Option<AbortHandle>,
}

/// How long the proxy waits for the upstream to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1, forwarding to `upstream`, with no fault.
    /// Must be called within a tokio runtime (with time and I/O enabled).
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                for_new: (Fault::None, 0),
                connections: HashMap::new(),
                next_id: 0,
            }),
            changes: watch::Sender::new(0),
            accepted: AtomicUsize::new(0),
        });
        let listener = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            address,
            shared,
            listener,
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Applies `fault` to every connection, open or new, at once.
    pub fn set(&self, fault: Fault) {
        self.apply(fault, Scope::All, Trigger::Now);
    }

    /// Applies `fault` to the connections `scope` names, in force from `trigger` on.
    pub fn apply(&self, fault: Fault, scope: Scope, trigger: Trigger) {
        let after = match trigger {
            Trigger::Now => 0,
            Trigger::AfterReplyBytes(bytes) => bytes,
        };
        {
            let mut state = self.shared.lock();
            if scope != Scope::Existing {
                state.for_new = (fault, after);
            }
            if scope != Scope::New {
                for connection in state.connections.values_mut() {
                    connection.fault = fault;
                    connection.in_force_at = connection.reply_bytes.saturating_add(after);
                }
            }
        }
        self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Lifts every fault: open and new connections forward normally again.
    pub fn clear(&self) {
        self.set(Fault::None);
    }

    /// How many connections the proxy has accepted since it started.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Acquire)
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().connections.len()
    }

    /// Closes every open connection (both sides get a `FIN`, or a reset if they had sent
    /// bytes the proxy had not read yet). The proxy keeps accepting new ones.
    pub fn close_all(&self) {
        let tasks: Vec<AbortHandle> = self
            .shared
            .lock()
            .connections
            .values_mut()
            .filter_map(|connection| connection.task.take())
            .collect();
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.close_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: try again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        // Registered before its task runs, and its abort handle stored under the same lock,
        // so that `close_all` and `apply` see every connection.
        let mut state = shared.lock();
        let id = state.next_id;
        state.next_id += 1;
        let (fault, in_force_at) = state.for_new;
        let link = Link {
            shared: Arc::clone(&shared),
            id,
        };
        let task = tokio::spawn(serve(link, client)).abort_handle();
        state.connections.insert(
            id,
            Connection {
                fault,
                in_force_at,
                reply_bytes: 0,
                task: Some(task),
            },
        );
    }
}

/// A connection task's view of its entry in the shared state; removes it when the task ends.
struct Link {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.lock().connections.remove(&self.id);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client to server: requests.
    Up,
    /// Server to client: replies.
    Down,
}

/// How a direction, or the whole connection, ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The sender closed its side; the close was passed on.
    Eof,
    /// A socket failed, or the proxy is going away.
    Broken,
    /// A [`Fault::Reset`] fired.
    Reset,
    /// A [`Fault::Cut`] fired.
    Cut,
}

/// What to do with the next bytes of a chunk.
enum Step {
    /// Write up to `len` bytes, not before `at`.
    Send { len: usize, at: Instant },
    /// Wait for the fault to change.
    Wait,
    /// End the connection.
    End(End),
}

impl Link {
    /// The next step for `pending` bytes going `direction`, of a chunk read at `arrived`.
    fn plan(&self, direction: Direction, pending: usize, arrived: Instant) -> Step {
        let state = self.shared.lock();
        let Some(connection) = state.connections.get(&self.id) else {
            return Step::End(End::Broken);
        };
        let now = Instant::now();
        let send = |len: usize, at| Step::Send { len, at };
        if connection.fault == Fault::None {
            return send(pending, now);
        }
        if connection.reply_bytes < connection.in_force_at {
            let before = connection.in_force_at - connection.reply_bytes;
            return match direction {
                Direction::Up => send(pending, now),
                Direction::Down => send(
                    pending.min(usize::try_from(before).unwrap_or(usize::MAX)),
                    now,
                ),
            };
        }
        match (connection.fault, direction) {
            (Fault::None, _) | (Fault::Reset | Fault::Cut, Direction::Up) => send(pending, now),
            (Fault::Latency(delay), _) => send(pending, arrived + delay),
            (Fault::Hang, _) => Step::Wait,
            (Fault::Reset, Direction::Down) => Step::End(End::Reset),
            (Fault::Cut, Direction::Down) => Step::End(End::Cut),
            (Fault::Trickle(delay), _) => send(1, now + delay),
            (Fault::Bandwidth(rate), _) => {
                let rate = rate.max(1);
                let slice = usize::try_from(rate / 50).unwrap_or(usize::MAX).max(1);
                let len = pending.min(slice);
                send(len, now + Duration::from_secs_f64(len as f64 / rate as f64))
            }
        }
    }

    /// Whether the connection is hung now (read nothing).
    fn hung(&self) -> bool {
        let state = self.shared.lock();
        state.connections.get(&self.id).is_some_and(|connection| {
            connection.fault == Fault::Hang && connection.reply_bytes >= connection.in_force_at
        })
    }

    fn forwarded(&self, direction: Direction, bytes: usize) {
        if direction == Direction::Down {
            let mut state = self.shared.lock();
            if let Some(connection) = state.connections.get_mut(&self.id) {
                connection.reply_bytes = connection.reply_bytes.saturating_add(bytes as u64);
            }
        }
    }
}

/// Forwards one connection until it ends, then closes it as the ending asks.
async fn serve(link: Link, mut client: TcpStream) {
    let connect = TcpStream::connect(link.shared.upstream);
    let Ok(Ok(mut server)) = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect).await else {
        return;
    };
    // Small writes (a trickle) must leave at once, not be gathered.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(&link, Direction::Up, client_read, server_write);
        let down = pump(&link, Direction::Down, server_read, client_write);
        tokio::pin!(up, down);
        // One side closing (EOF) leaves the other running; anything else ends both.
        tokio::select! {
            end = &mut up => if end == End::Eof { down.await } else { end },
            end = &mut down => if end == End::Eof { up.await } else { end },
        }
    };
    match end {
        End::Reset => {
            // A zero linger makes the close abortive: the kernel sends RST, not FIN.
            let _ = client.set_zero_linger();
        }
        End::Cut => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
        End::Eof | End::Broken => {}
    }
    drop(client);
    drop(server);
}

/// A chunk read, with when it arrived; `None` once the sender closed its side.
type Chunk = Option<(Instant, Vec<u8>)>;

/// Copies `from` to `to`, applying the connection's fault to every chunk. Reading and
/// writing run side by side, so that a delayed chunk does not hold back the reading of the
/// next one (latency delays each chunk from its arrival, like a long wire).
async fn pump(link: &Link, direction: Direction, from: ReadHalf<'_>, to: WriteHalf<'_>) -> End {
    let (chunks, arrivals) = mpsc::unbounded_channel();
    let reader = read_side(link, from, chunks);
    let writer = write_side(link, direction, to, arrivals);
    tokio::pin!(reader, writer);
    let mut reading = true;
    loop {
        tokio::select! {
            // The writer ends after passing on the sender's close, or on a fault or failure.
            end = &mut writer => return end,
            () = &mut reader, if reading => reading = false,
        }
    }
}

/// Reads chunks into `chunks` (reading nothing while the connection is hung), then `None` at
/// the sender's close; on a failure, just stops (the writer then sees the channel closed).
async fn read_side(link: &Link, mut from: ReadHalf<'_>, chunks: mpsc::UnboundedSender<Chunk>) {
    let mut changes = link.shared.changes.subscribe();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        changes.borrow_and_update();
        if link.hung() {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let chunk = match from.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => Some((Instant::now(), buffer[..read].to_vec())),
            Err(_) => return,
        };
        let end = chunk.is_none();
        if chunks.send(chunk).is_err() || end {
            return;
        }
    }
}

/// Writes the chunks as the fault allows; at the sender's close, closes `to` (`FIN`).
async fn write_side(
    link: &Link,
    direction: Direction,
    mut to: WriteHalf<'_>,
    mut arrivals: mpsc::UnboundedReceiver<Chunk>,
) -> End {
    let mut changes = link.shared.changes.subscribe();
    loop {
        let Some(chunk) = arrivals.recv().await else {
            return End::Broken;
        };
        let Some((arrived, chunk)) = chunk else {
            let _ = to.shutdown().await;
            return End::Eof;
        };
        let mut pending = &chunk[..];
        while !pending.is_empty() {
            changes.borrow_and_update();
            match link.plan(direction, pending.len(), arrived) {
                Step::Send { len, at } => {
                    if at > Instant::now() {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            // A new fault is planned for afresh (a lifted one sends at once).
                            changed = changes.changed() => {
                                if changed.is_err() {
                                    return End::Broken;
                                }
                                continue;
                            }
                        }
                    }
                    if to.write_all(&pending[..len]).await.is_err() {
                        return End::Broken;
                    }
                    link.forwarded(direction, len);
                    pending = &pending[len..];
                }
                Step::Wait => {
                    if changes.changed().await.is_err() {
                        return End::Broken;
                    }
                }
                Step::End(end) => return end,
            }
        }
    }
}
