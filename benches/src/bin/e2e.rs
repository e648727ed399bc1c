//! The end-to-end HTTP benchmark: an axum (or actix-web) app with and without sessions, each
//! setup served by its own process of this binary, loaded by `wrk -t2 -c32` on the same machine.
//!
//! `cargo run --release -p session-benches --bin e2e [-- OPTIONS]`, or `scripts/e2e`, which
//! installs wrk, memcached and redis-server first when they are missing. Options:
//!
//! - `--setups a,b,c`: which setups to run (default all: `none`, `ours-memory`,
//!   `ours-memcached`, `ours-redis`, `tower-memory`, `tower-redis`, `tower-redis-always-save`,
//!   `actix-redis`);
//! - `--rounds N` (default 3), `--seconds S` (default 10), `--warmup S` (default 2): every
//!   round runs each setup once, for a warm-up and then a measured window, in an order rotated
//!   each round so that a change of machine load affects all setups alike;
//! - `--quick`: one round of 3 s after a 1 s warm-up (explicit options still win);
//! - `--mix read|write|90-10` (default `90-10`): the share of `GET /read` and `POST /write`;
//! - `--quiet-wait S` (default 120): before each window, wait up to S seconds until other
//!   processes use less than 10% of the machine's CPU (0: do not wait). Windows during which
//!   they used more anyway are flagged in the report.
//!
//! Every window starts a fresh server process (`e2e --serve <setup> --port <p> --memcached
//! <addr> --redis <url>`, which prints `ready <port>` once it listens), creates 32 sessions with
//! a small blocking HTTP/1.1 client (`POST /write`, cookie from `Set-Cookie`) and checks each
//! reads back, writes a wrk Lua script holding the cookies to `target/e2e/`, runs wrk, and reads
//! the server's CPU time from `/proc/<pid>/stat` and the store's command counters (memcached
//! `stats`, Redis `INFO stats`) before and after the measured window. A window whose errors
//! (non-2xx responses plus socket errors) exceed 1% of its requests stops the run: a broken
//! setup must not produce a number. One memcached and one redis-server, started once on free
//! loopback ports by the test harness, serve every setup of the run.
//!
//! It prints a markdown table (medians with min–max over the rounds, and ratios computed from
//! the pairs of each round) and writes `target/e2e/e2e.md` and the bar chart `target/e2e/e2e.svg`.

#![forbid(unsafe_code)]

use std::error::Error;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use session_conformance::harness::{ServerKind, ServerProcess, free_port};

/// Sessions created before each window, one per wrk connection.
const SESSIONS: usize = 32;
/// wrk's threads.
const WRK_THREADS: usize = 2;
/// wrk's connections.
const WRK_CONNECTIONS: usize = 32;
/// The session value's name, in every setup.
const COUNTER: &str = "counter";
/// The largest share of a window's requests that may fail before the run is stopped.
const MAX_ERROR_SHARE: f64 = 0.01;
/// The share of the machine's CPU used by other processes above which a window is flagged.
const BUSY_MACHINE: f64 = 0.10;
/// How long a server process may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// An error that ends a server process or the run, with its message.
type BoxError = Box<dyn Error + Send + Sync>;

/// One benchmarked setup: a web framework, a session library and a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// axum without any session layer: handlers return a constant (the ceiling).
    None,
    /// Our `SessionLayer` over `MemoryStore`.
    OursMemory,
    /// Our `SessionLayer` over `MemcachedStore`.
    OursMemcached,
    /// Our `SessionLayer` over `RedisStore`.
    OursRedis,
    /// tower-sessions with its `MemoryStore`.
    TowerMemory,
    /// tower-sessions with tower-sessions-redis-store, saving only changed sessions.
    TowerRedis,
    /// tower-sessions with tower-sessions-redis-store and `with_always_save(true)`, which
    /// pushes the expiry back on every request (sliding expiry like ours).
    TowerRedisAlwaysSave,
    /// actix-web with actix-session's `RedisSessionStore`.
    ActixRedis,
}

/// Where a setup keeps its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// No sessions at all.
    Nothing,
    /// In the server process.
    Memory,
    /// In the run's memcached.
    Memcached,
    /// In the run's redis-server.
    Redis,
}

impl Setup {
    /// Every setup, in the order of the report.
    const ALL: [Self; 8] = [
        Self::None,
        Self::OursMemory,
        Self::OursMemcached,
        Self::OursRedis,
        Self::TowerMemory,
        Self::TowerRedis,
        Self::TowerRedisAlwaysSave,
        Self::ActixRedis,
    ];

    /// The name used on the command line and in the report.
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::OursMemory => "ours-memory",
            Self::OursMemcached => "ours-memcached",
            Self::OursRedis => "ours-redis",
            Self::TowerMemory => "tower-memory",
            Self::TowerRedis => "tower-redis",
            Self::TowerRedisAlwaysSave => "tower-redis-always-save",
            Self::ActixRedis => "actix-redis",
        }
    }

    /// The setup of a name.
    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|setup| setup.name() == name)
    }

    /// Where it keeps its sessions.
    fn backend(self) -> Backend {
        match self {
            Self::None => Backend::Nothing,
            Self::OursMemory | Self::TowerMemory => Backend::Memory,
            Self::OursMemcached => Backend::Memcached,
            Self::OursRedis | Self::TowerRedis | Self::TowerRedisAlwaysSave | Self::ActixRedis => {
                Backend::Redis
            }
        }
    }

    /// Whether it is this repository's layer.
    fn ours(self) -> bool {
        matches!(
            self,
            Self::OursMemory | Self::OursMemcached | Self::OursRedis
        )
    }
}

/// The share of reads and writes in the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    /// Only `GET /read`.
    Read,
    /// Only `POST /write`.
    Write,
    /// Nine `GET /read` to one `POST /write`.
    NinetyTen,
}

impl Mix {
    /// The name used on the command line and in the report.
    fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::NinetyTen => "90-10",
        }
    }

    /// Whether request `index` (of a session's requests, counted from 0) is a write.
    fn is_write(self, index: usize) -> bool {
        match self {
            Self::Read => false,
            Self::Write => true,
            Self::NinetyTen => index % 10 == 9,
        }
    }
}

/// What a benchmark run does, from the command line.
#[derive(Clone, Debug)]
struct Plan {
    /// The setups, in the order of the first round.
    setups: Vec<Setup>,
    /// How many rounds.
    rounds: usize,
    /// Seconds of each measured window.
    seconds: u64,
    /// Seconds of the warm-up before each window (0: none).
    warmup: u64,
    /// The share of reads and writes.
    mix: Mix,
    /// The longest wait, in seconds, for a quiet machine before each window.
    quiet_wait: u64,
}

/// The value after `flag`, or an error naming the flag.
fn value_of<'a>(args: &'a [String], index: usize, flag: &str) -> Result<&'a str, String> {
    args.get(index + 1)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

impl Plan {
    /// Reads the plan from the command-line arguments (without the program name).
    fn from_args(args: &[String]) -> Result<Self, String> {
        let mut setups = Setup::ALL.to_vec();
        let (mut rounds, mut seconds, mut warmup) = (None, None, None);
        let mut quiet_wait = 120;
        let mut quick = false;
        let mut mix = Mix::NinetyTen;
        let mut index = 0;
        while index < args.len() {
            let flag = args[index].as_str();
            let number = |text: &str| -> Result<u64, String> {
                text.parse()
                    .map_err(|_| format!("{flag} wants a whole number, not {text:?}"))
            };
            match flag {
                "--quick" => {
                    quick = true;
                    index += 1;
                    continue;
                }
                "--setups" => {
                    setups = value_of(args, index, flag)?
                        .split(',')
                        .filter(|name| !name.is_empty())
                        .map(|name| {
                            Setup::parse(name).ok_or_else(|| {
                                let known: Vec<&str> =
                                    Setup::ALL.iter().map(|s| s.name()).collect();
                                format!("unknown setup {name:?}; known: {}", known.join(","))
                            })
                        })
                        .collect::<Result<_, _>>()?;
                }
                "--rounds" => rounds = Some(number(value_of(args, index, flag)?)?),
                "--seconds" => seconds = Some(number(value_of(args, index, flag)?)?),
                "--warmup" => warmup = Some(number(value_of(args, index, flag)?)?),
                "--quiet-wait" => quiet_wait = number(value_of(args, index, flag)?)?,
                "--mix" => {
                    mix = match value_of(args, index, flag)? {
                        "read" => Mix::Read,
                        "write" => Mix::Write,
                        "90-10" => Mix::NinetyTen,
                        other => {
                            return Err(format!("--mix is read, write or 90-10, not {other:?}"));
                        }
                    }
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
            index += 2;
        }
        setups.dedup();
        if setups.is_empty() {
            return Err("--setups names no setup".to_owned());
        }
        let plan = Self {
            setups,
            rounds: usize::try_from(rounds.unwrap_or(if quick { 1 } else { 3 }))
                .map_err(|_| "--rounds is too large")?,
            seconds: seconds.unwrap_or(if quick { 3 } else { 10 }),
            warmup: warmup.unwrap_or(if quick { 1 } else { 2 }),
            mix,
            quiet_wait,
        };
        if plan.rounds == 0 || plan.seconds == 0 {
            return Err("--rounds and --seconds must be at least 1".to_owned());
        }
        Ok(plan)
    }

    /// The setups in the order of round `round` (counted from 0): rotated by one per round.
    fn order(&self, round: usize) -> Vec<Setup> {
        let mut order = self.setups.clone();
        let shift = round % order.len();
        order.rotate_left(shift);
        order
    }
}

// ---------------------------------------------------------------------------------------------
// The server processes (`--serve`).
// ---------------------------------------------------------------------------------------------

/// What a server process serves, from its command line.
struct ServeArgs {
    /// The setup.
    setup: Setup,
    /// The loopback port to listen on.
    port: u16,
    /// memcached's `host:port`, for a setup that uses it.
    memcached: Option<String>,
    /// Redis' `redis://host:port`, for a setup that uses it.
    redis: Option<String>,
}

impl ServeArgs {
    /// Reads `--serve <setup> --port <p> [--memcached <addr>] [--redis <url>]`.
    fn from_args(args: &[String]) -> Result<Self, String> {
        let mut setup = None;
        let mut port = None;
        let mut memcached = None;
        let mut redis = None;
        let mut index = 0;
        while index < args.len() {
            let flag = args[index].as_str();
            let value = value_of(args, index, flag)?;
            match flag {
                "--serve" => {
                    setup = Some(
                        Setup::parse(value).ok_or_else(|| format!("unknown setup {value:?}"))?,
                    );
                }
                "--port" => {
                    port = Some(
                        value
                            .parse()
                            .map_err(|_| format!("--port wants a port, not {value:?}"))?,
                    );
                }
                "--memcached" => memcached = Some(value.to_owned()),
                "--redis" => redis = Some(value.to_owned()),
                other => return Err(format!("unknown argument {other:?}")),
            }
            index += 2;
        }
        Ok(Self {
            setup: setup.ok_or("--serve needs a setup")?,
            port: port.ok_or("--serve needs --port")?,
            memcached,
            redis,
        })
    }

    /// memcached's address, which the setup needs.
    fn memcached(&self) -> Result<&str, BoxError> {
        self.memcached
            .as_deref()
            .ok_or_else(|| format!("{} needs --memcached", self.setup.name()).into())
    }

    /// Redis' URL, which the setup needs.
    fn redis(&self) -> Result<&str, BoxError> {
        self.redis
            .as_deref()
            .ok_or_else(|| format!("{} needs --redis", self.setup.name()).into())
    }
}

/// Tells the benchmark process that the server listens.
fn announce_ready(port: u16) {
    let mut stdout = std::io::stdout().lock();
    // A closed pipe means the benchmark is gone; the server is killed with it.
    let _ = writeln!(stdout, "ready {port}");
    let _ = stdout.flush();
}

/// Serves one setup until killed.
fn serve(args: &ServeArgs) -> Result<(), BoxError> {
    if args.setup == Setup::ActixRedis {
        return actix::serve(args.port, args.redis()?);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let app = axum_apps::app(args).await?;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
            announce_ready(args.port);
            axum::serve(listener, app).await?;
            Ok(())
        })
}

/// The axum apps: no sessions, our layer, tower-sessions.
mod axum_apps {
    use std::sync::Arc;

    use axum::Router;
    use axum::extract::Extension;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use session_core::{CookieConfig, KeyRing, SessionConfig, SessionManager, SigningKey};
    use session_memcached::{MemcachedConfig, MemcachedStore};
    use session_memory::MemoryStore;
    use session_redis::{RedisConfig, RedisStore};
    use session_tower::{Session, SessionFailure, SessionLayer};
    use tower_sessions::cookie::time::Duration as CookieDuration;
    use tower_sessions::{Expiry, SessionManagerLayer};
    use tower_sessions_redis_store::fred::prelude::{ClientLike, Config as FredConfig, Pool};

    use super::{BoxError, COUNTER, Setup};

    /// The router of `args.setup` (any setup but actix's), connected to its store.
    pub(super) async fn app(args: &super::ServeArgs) -> Result<Router, BoxError> {
        Ok(match args.setup {
            Setup::None => Router::new()
                .route("/read", get(|| async { "0" }))
                .route("/write", post(|| async { "1" })),
            Setup::OursMemory => ours(Arc::new(MemoryStore::new()))?,
            Setup::OursMemcached => ours(Arc::new(
                MemcachedStore::connect(MemcachedConfig::new([args.memcached()?])).await?,
            ))?,
            Setup::OursRedis => ours(Arc::new(
                RedisStore::connect(RedisConfig::standalone(args.redis()?)).await?,
            ))?,
            Setup::TowerMemory => tower(tower_sessions::MemoryStore::default(), false),
            Setup::TowerRedis | Setup::TowerRedisAlwaysSave => {
                // As tower-sessions-redis-store's documentation sets it up: a pool of six.
                let pool = Pool::new(FredConfig::from_url(args.redis()?)?, None, None, None, 6)?;
                let _connections = pool.connect();
                pool.wait_for_connect().await?;
                tower(
                    tower_sessions_redis_store::RedisStore::new(pool),
                    args.setup == Setup::TowerRedisAlwaysSave,
                )
            }
            Setup::ActixRedis => return Err("actix-redis is not an axum app".into()),
        })
    }

    /// Our layer over `store`, with the default configuration (one hour idle timeout) but a
    /// cookie without `Secure`, as the load is plain HTTP.
    fn ours(store: Arc<dyn session_core::SessionStore>) -> Result<Router, BoxError> {
        let config = SessionConfig::new(KeyRing::single(SigningKey::generate()?))
            .cookie(CookieConfig::default().secure(false));
        let manager = SessionManager::new(store, config)?;
        Ok(Router::new()
            .route("/read", get(ours_read))
            .route("/write", post(ours_write))
            .layer(SessionLayer::new(manager)))
    }

    /// `GET /read` with our layer: the counter, 0 when unset.
    async fn ours_read(session: Session) -> Result<String, SessionFailure> {
        let counter: u64 = session.get(COUNTER).await?.unwrap_or(0);
        Ok(counter.to_string())
    }

    /// `POST /write` with our layer: the counter plus one (an update, which our layer replays
    /// on a concurrent save rather than losing).
    async fn ours_write(session: Session) -> Result<String, SessionFailure> {
        let counter = session
            .update(COUNTER, |counter: Option<u64>| counter.unwrap_or(0) + 1)
            .await?;
        Ok(counter.to_string())
    }

    /// tower-sessions over `store`, as its examples set it up: expiry after an hour of
    /// inactivity (our default idle timeout), a cookie without `Secure`.
    fn tower<S>(store: S, always_save: bool) -> Router
    where
        S: tower_sessions::SessionStore + Clone,
    {
        let layer = SessionManagerLayer::new(store)
            .with_secure(false)
            .with_expiry(Expiry::OnInactivity(CookieDuration::hours(1)))
            .with_always_save(always_save);
        Router::new()
            .route("/read", get(tower_read))
            .route("/write", post(tower_write))
            .layer(layer)
    }

    /// `GET /read` with tower-sessions: the counter, 0 when unset.
    async fn tower_read(
        Extension(session): Extension<tower_sessions::Session>,
    ) -> Result<String, StatusCode> {
        let counter: u64 = session
            .get(COUNTER)
            .await
            .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?
            .unwrap_or(0);
        Ok(counter.to_string())
    }

    /// `POST /write` with tower-sessions: the counter plus one (read, then insert).
    async fn tower_write(
        Extension(session): Extension<tower_sessions::Session>,
    ) -> Result<String, StatusCode> {
        let failed = |_| StatusCode::INTERNAL_SERVER_ERROR;
        let counter = session
            .get::<u64>(COUNTER)
            .await
            .map_err(failed)?
            .unwrap_or(0)
            + 1;
        session.insert(COUNTER, counter).await.map_err(failed)?;
        Ok(counter.to_string())
    }
}

/// The actix-web app with actix-session's Redis store.
mod actix {
    use actix_session::storage::RedisSessionStore;
    use actix_session::{Session, SessionMiddleware};
    use actix_web::cookie::Key;
    use actix_web::{App, HttpServer, web};

    use super::{BoxError, COUNTER};

    /// Serves on `port` with sessions in the Redis at `redis`, with as many workers as the
    /// tokio runtime of the axum setups has (one per core), until killed.
    pub(super) fn serve(port: u16, redis: &str) -> Result<(), BoxError> {
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        actix_web::rt::System::new().block_on(async move {
            let store = RedisSessionStore::new(redis)
                .await
                .map_err(|error| format!("connecting actix-session to Redis: {error:#}"))?;
            let key = Key::generate();
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(
                        SessionMiddleware::builder(store.clone(), key.clone())
                            .cookie_secure(false)
                            .build(),
                    )
                    .route("/read", web::get().to(read))
                    .route("/write", web::post().to(write))
            })
            .workers(workers)
            .bind(("127.0.0.1", port))?;
            super::announce_ready(port);
            server.run().await?;
            Ok(())
        })
    }

    /// `GET /read`: the counter, 0 when unset.
    async fn read(session: Session) -> actix_web::Result<String> {
        let counter: u64 = session.get(COUNTER)?.unwrap_or(0);
        Ok(counter.to_string())
    }

    /// `POST /write`: the counter plus one (read, then insert).
    async fn write(session: Session) -> actix_web::Result<String> {
        let counter = session.get::<u64>(COUNTER)?.unwrap_or(0) + 1;
        session.insert(COUNTER, counter)?;
        Ok(counter.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark process.
// ---------------------------------------------------------------------------------------------

/// A server process of this binary serving one setup; killed when dropped.
struct AppServer {
    /// The process (through `setpriv`, which executes it in place: the pid is the server's).
    child: Child,
    /// Its loopback port.
    port: u16,
}

/// `setpriv`, when installed: servers started through it get SIGKILL when the benchmark dies.
fn setpriv() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|directory| directory.join("setpriv"))
            .find(|candidate| candidate.is_file())
    })
}

impl AppServer {
    /// Starts a server of `setup` on a free port and waits for its ready line.
    fn start(setup: Setup, stores: &Stores) -> Result<Self, String> {
        let mut last_error = String::new();
        // A port found free can be taken before the server binds it: try another.
        for _ in 0..3 {
            match Self::try_start(setup, stores, free_port()) {
                Ok(server) => return Ok(server),
                Err(error) => last_error = error,
            }
        }
        Err(format!("{} did not start: {last_error}", setup.name()))
    }

    /// One attempt of [`AppServer::start`] on `port`.
    fn try_start(setup: Setup, stores: &Stores, port: u16) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut command = Command::new(setpriv);
                command.args(["--pdeathsig", "KILL", "--"]).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command.args(["--serve", setup.name(), "--port", &port.to_string()]);
        if let Some(memcached) = &stores.memcached {
            command.args(["--memcached", &memcached.address()]);
        }
        if let Some(redis) = &stores.redis {
            command.args(["--redis", &format!("redis://{}", redis.address())]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning the server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (ready, announced) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = ready.send(lines.next());
            // Keeps the pipe drained until the server ends.
            for _ in lines {}
        });
        let mut server = Self { child, port };
        match announced.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) if line == format!("ready {port}") => Ok(server),
            Ok(other) => {
                let status = server.child.wait().map_err(|e| e.to_string())?;
                Err(format!("server said {other:?} and exited with {status}"))
            }
            Err(_) => Err(format!("no ready line in {START_TIMEOUT:?}")),
        }
    }

    /// Its process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run's memcached and redis-server (absent when the selected setups need none).
struct Stores {
    /// memcached, for `ours-memcached`.
    memcached: Option<ServerProcess>,
    /// redis-server, for the Redis setups.
    redis: Option<ServerProcess>,
}

impl Stores {
    /// Starts the servers that `setups` need.
    fn start(setups: &[Setup]) -> Result<Self, String> {
        let start = |kind: ServerKind, backend: Backend, package: &str| {
            if !setups.iter().any(|setup| setup.backend() == backend) {
                return Ok(None);
            }
            ServerProcess::start(kind).map(Some).ok_or_else(|| {
                format!(
                    "{package} is not installed: apt-get install -y {package} (scripts/e2e does)"
                )
            })
        };
        Ok(Self {
            memcached: start(ServerKind::Memcached, Backend::Memcached, "memcached")?,
            redis: start(ServerKind::Redis, Backend::Redis, "redis-server")?,
        })
    }

    /// The server a setup's sessions live in.
    fn of(&self, setup: Setup) -> Option<&ServerProcess> {
        match setup.backend() {
            Backend::Memcached => self.memcached.as_ref(),
            Backend::Redis => self.redis.as_ref(),
            Backend::Nothing | Backend::Memory => None,
        }
    }

    /// The commands the store of `setup` has processed so far (`None` without a store server).
    fn commands(&self, setup: Setup) -> Result<Option<u64>, String> {
        let Some(server) = self.of(setup) else {
            return Ok(None);
        };
        match setup.backend() {
            Backend::Memcached => {
                let lines = server
                    .command_until_end("stats\r\n")
                    .map_err(|e| format!("memcached stats: {e}"))?;
                let counters = [
                    "cmd_get",
                    "cmd_set",
                    "cmd_touch",
                    "delete_hits",
                    "delete_misses",
                ];
                let mut total = 0;
                for counter in counters {
                    let prefix = format!("STAT {counter} ");
                    total += lines
                        .iter()
                        .find_map(|line| line.strip_prefix(&prefix))
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .ok_or_else(|| format!("no {counter} in memcached's stats"))?;
                }
                Ok(Some(total))
            }
            _ => {
                let info = server
                    .redis_bulk("INFO stats\r\n")
                    .map_err(|e| format!("Redis INFO: {e}"))?;
                info.lines()
                    .find_map(|line| line.strip_prefix("total_commands_processed:"))
                    .and_then(|n| n.trim().parse().ok())
                    .map(Some)
                    .ok_or_else(|| "no total_commands_processed in INFO stats".to_owned())
            }
        }
    }

    /// Commands that reading [`Stores::commands`] itself adds to the next reading: Redis counts
    /// the `INFO` (after answering it), memcached does not count `stats`.
    fn reading_overhead(setup: Setup) -> u64 {
        u64::from(setup.backend() == Backend::Redis)
    }
}

/// The sum of fields `numbers` (counted from 1, as in proc(5)) of `/proc/<process>/stat`.
fn stat_fields(process: &str, numbers: &[usize]) -> Result<u64, String> {
    let path = format!("/proc/{process}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The command name (field 2) is parenthesized and may hold spaces; field 3 follows it.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let mut sum = 0;
    for &number in numbers {
        sum += fields
            .get(number - 3)
            .and_then(|value| value.parse::<u64>().ok())
            .ok_or_else(|| format!("no field {number} in {path}"))?;
    }
    Ok(sum)
}

/// CPU time (user plus system) of process `pid` so far, in clock ticks: fields 14 and 15
/// (utime, stime) of `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    stat_fields(&pid.to_string(), &[14, 15])
}

/// CPU time of this process' waited-for children so far, in clock ticks: fields 16 and 17
/// (cutime, cstime) of `/proc/self/stat`. Across a wrk run, whose end is the only wait
/// meanwhile, its growth is wrk's CPU time.
fn children_ticks() -> Result<u64, String> {
    stat_fields("self", &[16, 17])
}

/// Busy CPU time of the whole machine so far, in clock ticks: the first line of `/proc/stat`
/// less idle and iowait.
fn machine_busy_ticks() -> Result<u64, String> {
    let stat =
        std::fs::read_to_string("/proc/stat").map_err(|e| format!("reading /proc/stat: {e}"))?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if fields.len() < 8 {
        return Err("no cpu line in /proc/stat".to_owned());
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    Ok(fields[..8].iter().sum::<u64>() - fields[3] - fields[4])
}

/// Clock ticks per second, from `getconf CLK_TCK`.
fn clock_ticks_per_second() -> Result<u64, String> {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .map_err(|e| format!("running getconf: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| "getconf CLK_TCK printed no number".to_owned())
}

/// An HTTP response, as much of it as the session set-up needs.
struct Reply {
    /// The status code.
    status: u16,
    /// The `name=value` part of each `Set-Cookie` header.
    cookies: Vec<String>,
    /// The body.
    body: String,
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the whole response.
fn http(port: u16, method: &str, path: &str, cookie: Option<&str>) -> Result<Reply, String> {
    let failed = |e: std::io::Error| format!("{method} {path}: {e}");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(failed)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(failed)?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n"
    );
    if let Some(cookie) = cookie {
        let _ = write!(request, "Cookie: {cookie}\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(failed)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(failed)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: no end of headers in {response:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status in {head:?}"))?;
    let mut cookies = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
            return Err(format!(
                "{method} {path}: a chunked response, which this client does not read"
            ));
        }
        if name.eq_ignore_ascii_case("set-cookie") {
            let pair = value.split(';').next().unwrap_or_default().trim();
            cookies.push(pair.to_owned());
        }
    }
    Ok(Reply {
        status,
        cookies,
        body: body.to_owned(),
    })
}

/// Creates [`SESSIONS`] sessions (`POST /write` without a cookie) and returns their cookies,
/// after checking that each reads back as `1`. The `none` setup has no sessions: it gets
/// constant cookies, so that its requests have the same shape.
fn create_sessions(setup: Setup, port: u16) -> Result<Vec<String>, String> {
    let name = setup.name();
    let mut cookies = Vec::with_capacity(SESSIONS);
    for index in 0..SESSIONS {
        let created = http(port, "POST", "/write", None)?;
        if created.status != 200 || created.body != "1" {
            return Err(format!(
                "{name}: POST /write answered {} {:?}",
                created.status, created.body
            ));
        }
        if setup == Setup::None {
            cookies.push(format!("none={index}"));
            continue;
        }
        if created.cookies.is_empty() {
            return Err(format!("{name}: POST /write set no cookie"));
        }
        let cookie = created.cookies.join("; ");
        let read = http(port, "GET", "/read", Some(&cookie))?;
        if read.status != 200 || read.body != "1" {
            return Err(format!(
                "{name}: GET /read with the new session's cookie answered {} {:?}",
                read.status, read.body
            ));
        }
        cookies.push(cookie);
    }
    Ok(cookies)
}

/// The wrk script: the cookies, and per thread a precomputed cycle of requests. Session `s`
/// is used by every [`SESSIONS`]-th request; of its ten requests in a cycle of
/// `10 × SESSIONS`, the mix decides which write (for 90-10 one, at a place shifted by the
/// session, so that writes spread evenly over time). The second thread starts half-way
/// through the sessions, so that the threads' requests go to different sessions.
fn wrk_script(cookies: &[String], mix: Mix) -> String {
    let mut script = String::from(
        "-- Generated by benches/src/bin/e2e.rs: the session cookies and a cycle of requests.\n",
    );
    script.push_str("local cookies = {\n");
    for cookie in cookies {
        let _ = writeln!(script, "  {cookie:?},");
    }
    script.push_str("}\n");
    // Cookie values are base64 or hex, so Rust's debug quoting is a valid Lua string.
    let writes: Vec<String> = (0..10)
        .map(|index| mix.is_write(index).to_string())
        .collect();
    let _ = write!(
        script,
        r#"local writes = {{ {writes} }}
local threads = 0

function setup(thread)
  thread:set("offset", threads * math.floor(#cookies / {WRK_THREADS}))
  threads = threads + 1
end

local requests = {{}}
local position = 0

function init(args)
  local n = #cookies
  for k = 0, 10 * n - 1 do
    local session = (offset + k) % n
    local turn = math.floor(k / n)
    local headers = {{ ["Cookie"] = cookies[session + 1] }}
    if writes[((session + turn) % 10) + 1] then
      requests[k + 1] = wrk.format("POST", "/write", headers, "")
    else
      requests[k + 1] = wrk.format("GET", "/read", headers)
    end
  end
end

function request()
  position = position % #requests + 1
  return requests[position]
end
"#,
        writes = writes.join(", ")
    );
    script
}

/// What wrk reported about one run.
#[derive(Debug)]
struct WrkResult {
    /// Completed requests.
    requests: u64,
    /// Requests per second.
    rate: f64,
    /// The 99th percentile latency, in microseconds.
    p99_us: f64,
    /// Responses with a status above 399.
    bad_status: u64,
    /// Socket errors (connect, read, write, timeout).
    socket_errors: u64,
}

/// A wrk duration (`512.00us`, `1.23ms`, `1.00s`, `2.00m`) in microseconds.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(number * scale)
}

/// Reads wrk's text output.
fn parse_wrk(output: &str) -> Result<WrkResult, String> {
    let missing = |what: &str| format!("no {what} in wrk's output:\n{output}");
    let mut requests = None;
    let mut rate = None;
    let mut p99_us = None;
    let mut bad_status = 0;
    let mut socket_errors = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rate = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99_us = wrk_duration_us(rest.trim());
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            bad_status = rest.trim().parse().map_err(|_| missing("error count"))?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in rest.split(',') {
                let count = part
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok());
                socket_errors += count.ok_or_else(|| missing("socket error count"))?;
            }
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    Ok(WrkResult {
        requests: requests.ok_or_else(|| missing("request count"))?,
        rate: rate.ok_or_else(|| missing("Requests/sec"))?,
        p99_us: p99_us.ok_or_else(|| missing("99% latency"))?,
        bad_status,
        socket_errors,
    })
}

/// Runs wrk against `port` for `seconds` with `script`, and fails when more than 1% of the
/// requests failed.
fn run_wrk(setup: Setup, port: u16, script: &Path, seconds: u64) -> Result<WrkResult, String> {
    let output = Command::new("wrk")
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running wrk (install it: apt-get install -y wrk): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "wrk failed with {}: {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let result = parse_wrk(&text)?;
    let errors = result.bad_status + result.socket_errors;
    if result.requests == 0 || errors as f64 > MAX_ERROR_SHARE * result.requests as f64 {
        return Err(format!(
            "{}: {errors} errors in {} requests (more than {}%), so no number:\n{text}",
            setup.name(),
            result.requests,
            MAX_ERROR_SHARE * 100.0
        ));
    }
    Ok(result)
}

/// One measured window of one setup.
#[derive(Clone, Debug)]
struct Window {
    /// Requests per second.
    rate: f64,
    /// The 99th percentile latency, in microseconds.
    p99_us: f64,
    /// The app server's CPU time per request, in microseconds.
    cpu_us: f64,
    /// The store server's CPU time per request, in microseconds (`None` without one).
    store_cpu_us: Option<f64>,
    /// Store commands per request (`None` without a store server).
    commands: Option<f64>,
    /// Errors (non-2xx and socket) in the window.
    errors: u64,
    /// The share of the machine's CPU time that processes other than the app server, the
    /// store server and wrk used during the window (other work on the machine skews it).
    other_load: f64,
}

/// Fixed facts of a run that every window needs.
struct Bench {
    /// The plan.
    plan: Plan,
    /// The store servers.
    stores: Stores,
    /// Clock ticks per second.
    ticks_per_second: u64,
    /// The machine's CPU cores.
    cores: usize,
    /// Where scripts and the report go.
    directory: PathBuf,
}

impl Bench {
    /// Waits, up to the plan's `quiet_wait`, until the machine is quiet: in one second, less
    /// than [`BUSY_MACHINE`] of its CPU time busy (nothing of the benchmark runs meanwhile: the
    /// store servers are idle between windows).
    fn wait_for_quiet(&self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(self.plan.quiet_wait);
        let mut said = false;
        while std::time::Instant::now() < deadline {
            let before = machine_busy_ticks()?;
            std::thread::sleep(Duration::from_secs(1));
            let busy = (machine_busy_ticks()? - before) as f64
                / (self.ticks_per_second as f64 * self.cores as f64);
            if busy < BUSY_MACHINE {
                return Ok(());
            }
            if !said {
                eprintln!(
                    "waiting for a quiet machine: other processes use {:.0}% of the CPU (up to {} s, --quiet-wait)",
                    busy * 100.0,
                    self.plan.quiet_wait
                );
                said = true;
            }
        }
        Ok(())
    }

    /// Measures one window of `setup`: a fresh server, fresh sessions, a warm-up, the window.
    fn window(&self, setup: Setup) -> Result<Window, String> {
        self.wait_for_quiet()?;
        let server = AppServer::start(setup, &self.stores)?;
        let cookies = create_sessions(setup, server.port)?;
        let script = self.directory.join(format!("{}.lua", setup.name()));
        std::fs::write(&script, wrk_script(&cookies, self.plan.mix))
            .map_err(|e| format!("writing {}: {e}", script.display()))?;
        if self.plan.warmup > 0 {
            run_wrk(setup, server.port, &script, self.plan.warmup)?;
        }
        let store_pid = self.stores.of(setup).and_then(ServerProcess::pid);
        let commands_before = self.stores.commands(setup)?;
        let store_before = store_pid.map(cpu_ticks).transpose()?;
        let (machine_before, wrk_before) = (machine_busy_ticks()?, children_ticks()?);
        let before = cpu_ticks(server.pid())?;
        let started = std::time::Instant::now();
        let result = run_wrk(setup, server.port, &script, self.plan.seconds)?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = cpu_ticks(server.pid())?;
        let store_after = store_pid.map(cpu_ticks).transpose()?;
        let (machine_after, wrk_after) = (machine_busy_ticks()?, children_ticks()?);
        let commands_after = self.stores.commands(setup)?;
        drop(server);

        let requests = result.requests as f64;
        let us_per_request =
            |ticks: u64| ticks as f64 * 1e6 / self.ticks_per_second as f64 / requests;
        let commands = match (commands_before, commands_after) {
            (Some(before), Some(after)) => {
                let overhead = Stores::reading_overhead(setup);
                Some(after.saturating_sub(before).saturating_sub(overhead) as f64 / requests)
            }
            _ => None,
        };
        let store_cpu_us = match (store_before, store_after) {
            (Some(before), Some(after)) => Some(us_per_request(after.saturating_sub(before))),
            _ => None,
        };
        let known = (after - before)
            + (wrk_after - wrk_before)
            + store_after.zip(store_before).map_or(0, |(a, b)| a - b);
        let other = (machine_after - machine_before).saturating_sub(known);
        let capacity = elapsed * self.ticks_per_second as f64 * self.cores as f64;
        Ok(Window {
            other_load: other as f64 / capacity,
            rate: result.rate,
            p99_us: result.p99_us,
            cpu_us: us_per_request(after.saturating_sub(before)),
            store_cpu_us,
            commands,
            errors: result.bad_status + result.socket_errors,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The report.
// ---------------------------------------------------------------------------------------------

/// Median, smallest and largest of a non-empty list.
#[derive(Clone, Copy, Debug)]
struct Spread {
    /// The median (the mean of the middle two of an even count).
    median: f64,
    /// The smallest.
    min: f64,
    /// The largest.
    max: f64,
}

impl Spread {
    /// The spread of `values` (`None` when empty).
    fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let upper = *sorted.get(sorted.len() / 2)?;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[sorted.len() / 2 - 1] + upper) / 2.0
        } else {
            upper
        };
        Some(Self {
            median,
            min: *sorted.first()?,
            max: *sorted.last()?,
        })
    }
}

/// The windows of every round: `windows[round]` holds each setup's window of that round.
type Results = Vec<Vec<(Setup, Window)>>;

/// The windows of one setup, in round order.
fn windows_of(results: &Results, setup: Setup) -> Vec<&Window> {
    results
        .iter()
        .filter_map(|round| round.iter().find(|(s, _)| *s == setup).map(|(_, w)| w))
        .collect()
}

/// The spread of a quantity over a setup's windows.
fn spread_of(
    results: &Results,
    setup: Setup,
    value: impl Fn(&Window) -> Option<f64>,
) -> Option<Spread> {
    let values: Vec<f64> = windows_of(results, setup)
        .into_iter()
        .filter_map(value)
        .collect();
    Spread::of(&values)
}

/// The ratios the report computes, `(numerator, denominator)`.
const RATIOS: [(Setup, Setup); 7] = [
    (Setup::OursRedis, Setup::TowerRedis),
    (Setup::OursRedis, Setup::TowerRedisAlwaysSave),
    (Setup::OursRedis, Setup::ActixRedis),
    (Setup::OursMemory, Setup::TowerMemory),
    (Setup::OursMemcached, Setup::OursRedis),
    (Setup::OursMemcached, Setup::None),
    (Setup::OursMemory, Setup::None),
];

/// The per-round ratios of `value` of `a` to `b`, over the rounds that measured both.
fn paired_ratio(
    results: &Results,
    a: Setup,
    b: Setup,
    value: impl Fn(&Window) -> f64,
) -> Option<Spread> {
    let ratios: Vec<f64> = results
        .iter()
        .filter_map(|round| {
            let find = |setup| {
                round
                    .iter()
                    .find(|(s, _)| *s == setup)
                    .map(|(_, w)| value(w))
            };
            Some(find(a)? / find(b)?)
        })
        .collect();
    Spread::of(&ratios)
}

/// The output of a command, trimmed, or `unknown`.
fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text.lines().next().unwrap_or_default().trim().to_owned()
        })
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The CPU model, from `/proc/cpuinfo`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|line| line.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// `12345` → `12,345`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A latency in microseconds, as ms above one millisecond.
fn latency(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// The markdown report.
fn markdown(plan: &Plan, results: &Results) -> String {
    let mut out = String::new();
    let wrk = command_output("wrk", &["-v"]);
    let wrk_version = wrk.split_whitespace().nth(1).unwrap_or("unknown");
    let _ = write!(
        out,
        "End-to-end HTTP benchmark, {date}; `nproc` {nproc}; kernel {kernel}; {cpu}; wrk {wrk_version}.\n\n\
         Each setup is its own server process on 127.0.0.1 (tokio or actix with one worker per \
         core), loaded on the same machine by `wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s` \
         over {SESSIONS} sessions created just before, mix {mix} (`GET /read` : `POST /write`); \
         {rounds} round(s) of {seconds} s after a {warmup} s warm-up per window, the order of the \
         setups rotated each round; one memcached and one redis-server for all. Medians over the \
         rounds, min–max in brackets. Server CPU is the app process' utime+stime \
         (`/proc/<pid>/stat`) per request; store commands and store CPU per request come from \
         memcached's `stats` (cmd_get+cmd_set+cmd_touch+delete_hits+delete_misses) or Redis' \
         `INFO stats` (total_commands_processed, less the INFO itself; Redis also counts the \
         commands a script runs, so our save, one `EVALSHA` round trip, counts as four) and \
         the store server's `/proc/<pid>/stat`.\n\n",
        date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        nproc = command_output("nproc", &[]),
        kernel = command_output("uname", &["-r"]),
        cpu = cpu_model(),
        seconds = plan.seconds,
        mix = plan.mix.name(),
        rounds = plan.rounds,
        warmup = plan.warmup,
    );
    out.push_str(
        "| setup | requests/s | p99 latency | server CPU µs/request | store commands/request | store CPU µs/request |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for &setup in &plan.setups {
        let Some(rate) = spread_of(results, setup, |w| Some(w.rate)) else {
            continue;
        };
        let p99 = spread_of(results, setup, |w| Some(w.p99_us));
        let cpu = spread_of(results, setup, |w| Some(w.cpu_us));
        let commands = spread_of(results, setup, |w| w.commands);
        let store_cpu = spread_of(results, setup, |w| w.store_cpu_us);
        let name = if setup.ours() {
            format!("**{}**", setup.name())
        } else {
            setup.name().to_owned()
        };
        let _ = writeln!(
            out,
            "| {name} | {} ({}–{}) | {} | {} ({:.1}–{:.1}) | {} | {} |",
            thousands(rate.median),
            thousands(rate.min),
            thousands(rate.max),
            p99.map_or_else(|| "-".to_owned(), |p| latency(p.median)),
            cpu.map_or_else(|| "-".to_owned(), |c| format!("{:.1}", c.median)),
            cpu.map_or(0.0, |c| c.min),
            cpu.map_or(0.0, |c| c.max),
            commands.map_or_else(|| "-".to_owned(), |c| format!("{:.2}", c.median)),
            store_cpu.map_or_else(|| "-".to_owned(), |c| format!("{:.1}", c.median)),
        );
    }
    let mut ratios = String::new();
    for (a, b) in RATIOS {
        let Some(rate) = paired_ratio(results, a, b, |w| w.rate) else {
            continue;
        };
        let cpu = paired_ratio(results, a, b, |w| w.cpu_us);
        let _ = writeln!(
            ratios,
            "| {} ÷ {} | {:.2} ({:.2}–{:.2}) | {} |",
            a.name(),
            b.name(),
            rate.median,
            rate.min,
            rate.max,
            cpu.map_or_else(
                || "-".to_owned(),
                |c| format!("{:.2} ({:.2}–{:.2})", c.median, c.min, c.max)
            ),
        );
    }
    if !ratios.is_empty() {
        out.push_str(
            "\nRatios from the pairs of each round (median, min–max):\n\n\
             | ratio | requests/s | server CPU µs/request |\n|---|---:|---:|\n",
        );
        out.push_str(&ratios);
    }
    out.push_str(
        "\nRequests/s of each round, in the order run, with the share of the machine's CPU \
         that other processes (not the app server, the store server or wrk) used meanwhile:\n\n",
    );
    for (round, windows) in results.iter().enumerate() {
        let runs: Vec<String> = windows
            .iter()
            .map(|(setup, window)| {
                format!(
                    "{} {:.0} (other load {:.0}%)",
                    setup.name(),
                    window.rate,
                    window.other_load * 100.0
                )
            })
            .collect();
        let _ = writeln!(out, "- round {}: {}", round + 1, runs.join(", "));
    }
    let windows = results.iter().flatten().count();
    let busy = results
        .iter()
        .flatten()
        .filter(|(_, window)| window.other_load > BUSY_MACHINE)
        .count();
    if busy > 0 {
        let _ = writeln!(
            out,
            "\n**Note:** in {busy} of {windows} windows other processes used more than {:.0}% \
             of the machine's CPU: those windows are skewed.",
            BUSY_MACHINE * 100.0
        );
    }
    out
}

/// A horizontal bar chart of requests/s per setup (median), with min–max whiskers.
fn svg(plan: &Plan, results: &Results) -> String {
    const WIDTH: f64 = 900.0;
    const LABEL: f64 = 210.0;
    const RIGHT: f64 = 110.0;
    const BAR: f64 = 20.0;
    const GAP: f64 = 10.0;
    const TOP: f64 = 50.0;
    let rows: Vec<(Setup, Spread)> = plan
        .setups
        .iter()
        .filter_map(|&setup| spread_of(results, setup, |w| Some(w.rate)).map(|s| (setup, s)))
        .collect();
    let largest = rows.iter().map(|(_, s)| s.max).fold(1.0, f64::max);
    let scale = (WIDTH - LABEL - RIGHT) / largest;
    let mut body = String::new();
    let mut y = TOP;
    for (setup, spread) in &rows {
        let colour = match setup {
            Setup::None => "#5a8f5a",
            s if s.ours() => "#2b7bb9",
            _ => "#9a9a9a",
        };
        let length = spread.median * scale;
        let (low, high) = (LABEL + spread.min * scale, LABEL + spread.max * scale);
        let middle = y + BAR / 2.0;
        let _ = write!(
            body,
            "<text x=\"10\" y=\"{text_y:.1}\">{name}</text>\n\
             <rect x=\"{LABEL}\" y=\"{y:.1}\" width=\"{length:.1}\" height=\"{BAR}\" fill=\"{colour}\"/>\n\
             <path d=\"M{low:.1} {middle:.1}H{high:.1}M{low:.1} {top:.1}V{bottom:.1}M{high:.1} {top:.1}V{bottom:.1}\" stroke=\"black\" fill=\"none\"/>\n\
             <text x=\"{label_x:.1}\" y=\"{text_y:.1}\">{value}</text>\n",
            text_y = y + 15.0,
            name = setup.name(),
            top = y + 4.0,
            bottom = y + BAR - 4.0,
            label_x = high + 8.0,
            value = thousands(spread.median),
        );
        y += BAR + GAP;
    }
    let height = y + 20.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">Requests/s, wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}, mix {mix}: median of {rounds} round(s) of {seconds} s, whiskers min–max</text>\n\
         <text x=\"10\" y=\"40\" fill=\"#555\">blue: our layer; grey: peer libraries; green: no sessions</text>\n\
         {body}</svg>\n",
        mix = plan.mix.name(),
        rounds = plan.rounds,
        seconds = plan.seconds,
    )
}

/// Runs the benchmark of `plan` and writes its report.
fn bench(plan: Plan) -> Result<(), String> {
    // The repository's target/e2e (benches/ is one level below the repository's root).
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let directory = manifest.parent().unwrap_or(manifest).join("target/e2e");
    std::fs::create_dir_all(&directory)
        .map_err(|e| format!("creating {}: {e}", directory.display()))?;
    if command_output("wrk", &["-v"]) == "unknown" {
        return Err("wrk is not installed: apt-get install -y wrk (scripts/e2e does)".to_owned());
    }
    let bench = Bench {
        stores: Stores::start(&plan.setups)?,
        ticks_per_second: clock_ticks_per_second()?,
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        directory,
        plan,
    };
    let plan = &bench.plan;
    let mut results: Results = Vec::new();
    for round in 0..plan.rounds {
        let mut windows = Vec::new();
        for setup in plan.order(round) {
            let window = bench.window(setup)?;
            eprintln!(
                "round {}/{}: {:<24} {:>8.0} requests/s  p99 {:>9}  server CPU {:>6.1} µs/request  store commands/request {}  errors {}  other load {:.0}%",
                round + 1,
                plan.rounds,
                setup.name(),
                window.rate,
                latency(window.p99_us),
                window.cpu_us,
                window
                    .commands
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
                window.errors,
                window.other_load * 100.0,
            );
            windows.push((setup, window));
        }
        results.push(windows);
    }
    let table = markdown(plan, &results);
    println!("{table}");
    let report = bench.directory.join("e2e.md");
    std::fs::write(&report, &table).map_err(|e| format!("writing {}: {e}", report.display()))?;
    let chart = bench.directory.join("e2e.svg");
    std::fs::write(&chart, svg(plan, &results))
        .map_err(|e| format!("writing {}: {e}", chart.display()))?;
    eprintln!("wrote {} and {}", report.display(), chart.display());
    Ok(())
}

/// Serves a setup (`--serve ...`) or runs the benchmark.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        let served = ServeArgs::from_args(&args)
            .map_err(BoxError::from)
            .and_then(|serve_args| serve(&serve_args));
        if let Err(error) = served {
            eprintln!("e2e --serve: {error}");
            std::process::exit(1);
        }
        return;
    }
    let result = Plan::from_args(&args).and_then(bench);
    if let Err(error) = result {
        eprintln!("e2e: {error}");
        std::process::exit(1);
    }
}

/// Checks of the pure parts: wrk's output, the mix, the round order, number formatting.
#[cfg(test)]
mod tests {
    use super::*;

    /// The counts, rate and p99 of a wrk report with `--latency`.
    #[test]
    fn reads_wrk_output() {
        let output = "Running 3s test @ http://127.0.0.1:1234/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.00us  100.00us   5.00ms   90.00%
    Req/Sec    30.00k     1.00k   32.00k    70.00%
  Latency Distribution
     50%  500.00us
     75%  600.00us
     90%  700.00us
     99%    1.25ms
  180000 requests in 3.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  60000.00
Transfer/sec:      6.67MB
";
        let result = parse_wrk(output).unwrap();
        assert_eq!(result.requests, 180_000);
        assert!((result.rate - 60_000.0).abs() < 1e-9);
        assert!((result.p99_us - 1250.0).abs() < 1e-9);
        assert_eq!(result.bad_status, 4);
        assert_eq!(result.socket_errors, 3);
    }

    /// 90-10 writes one request in ten.
    #[test]
    fn ninety_ten_writes_each_session_once_in_ten() {
        let mix = Mix::NinetyTen;
        let writes = (0..10).filter(|&i| mix.is_write(i)).count();
        assert_eq!(writes, 1);
    }

    /// Round `r` starts with the setup `r` places further, and the order comes back.
    #[test]
    fn rotates_the_order_each_round() {
        let plan =
            Plan::from_args(&["--setups".into(), "none,ours-memory,tower-memory".into()]).unwrap();
        assert_eq!(plan.order(1)[0], Setup::OursMemory);
        assert_eq!(plan.order(3), plan.setups);
    }

    /// The median of an even count is the mean of the middle two.
    #[test]
    fn median_of_even_count() {
        let spread = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert!((spread.median - 2.5).abs() < 1e-12);
        assert!((spread.min - 1.0).abs() < 1e-12 && (spread.max - 4.0).abs() < 1e-12);
    }

    /// Thousands get commas.
    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
