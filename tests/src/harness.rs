//! Server processes for tests: memcached and redis-server on free loopback ports, started per
//! test, stopped on drop, and paused, killed or restarted on the same port by fault tests.
//!
//! When a server binary is missing, [`ServerProcess::start`] fails the test with the install
//! command if `SESSION_TEST_REQUIRE_SERVERS=1` (the README's test command sets it), and
//! otherwise prints a `SKIPPED` line and returns `None`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server a [`ServerProcess`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// `memcached`, from the Debian package `memcached`.
    Memcached,
    /// `redis-server`, from the Debian package `redis-server`.
    Redis,
}

impl ServerKind {
    fn binary(self) -> &'static str {
        match self {
            Self::Memcached => "memcached",
            Self::Redis => "redis-server",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Self::Memcached => "memcached",
            Self::Redis => "redis-server",
        }
    }

    fn args(self, port: u16) -> Vec<String> {
        let number = port;
        let port = port.to_string();
        match self {
            // -u root is ignored unless running as root, where memcached insists on it.
            Self::Memcached => [
                "-l",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "0",
                "-m",
                "64",
                "-u",
                "root",
            ]
            .map(str::to_owned)
            .to_vec(),
            Self::Redis => {
                // A directory of its own, so that the RDB file a replica writes when it
                // synchronizes lands neither in the source tree nor in another server's way.
                let directory = std::env::temp_dir().join(format!(
                    "session-tests-redis-{}-{number}",
                    std::process::id()
                ));
                std::fs::create_dir_all(&directory).expect("creating a Redis directory");
                let mut args: Vec<String> = [
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                ]
                .map(str::to_owned)
                .to_vec();
                args.push(directory.to_string_lossy().into_owned());
                args
            }
        }
    }

    /// The command that proves the server answers, and the start of its reply.
    fn probe(self) -> (&'static str, &'static str) {
        match self {
            Self::Memcached => ("version\r\n", "VERSION"),
            Self::Redis => ("PING\r\n", "+PONG"),
        }
    }
}

/// Finds a server's binary on the `PATH`, or reports it missing as the environment asks.
pub fn find_server_binary(kind: ServerKind) -> Option<PathBuf> {
    find_binary(kind.binary(), kind.package())
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller retries if it gets taken).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("binding an ephemeral loopback port")
}

/// A server process on a loopback port; killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    kind: ServerKind,
    binary: PathBuf,
    port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl ServerProcess {
    /// How long a start may take before the test fails.
    const START_TIMEOUT: Duration = Duration::from_secs(10);

    /// Starts a server of `kind` on a free port and waits until it answers.
    pub fn start(kind: ServerKind) -> Option<Self> {
        Self::start_with(kind, &[])
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_with(kind: ServerKind, extra_args: &[&str]) -> Option<Self> {
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        Self::start_with_args(kind, || extra_args.clone())
    }

    /// Starts a server with extra arguments drawn anew for every attempt (so that a port in
    /// them that turned out to be taken is replaced on the next try).
    pub fn start_with_args(kind: ServerKind, extra_args: impl Fn() -> Vec<String>) -> Option<Self> {
        let binary = find_server_binary(kind)?;
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self {
                kind,
                binary: binary.clone(),
                port: free_port(),
                extra_args: extra_args(),
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Some(server),
                Err(error) => last_error = error,
            }
        }
        panic!("could not start {}: {last_error}", kind.binary());
    }

    /// Starts a server of `kind` on the given port (for a store built before its server).
    pub fn start_on_port(kind: ServerKind, port: u16) -> Option<Self> {
        let mut server = Self {
            kind,
            binary: find_server_binary(kind)?,
            port,
            extra_args: Vec::new(),
            child: None,
        };
        if let Err(error) = server.spawn_and_wait() {
            panic!("could not start {} on port {port}: {error}", kind.binary());
        }
        Some(server)
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        // Through setpriv, when present, the server gets SIGKILL if the test process dies
        // without dropping it (killed by a timeout, say), so no server outlives its test run.
        // setpriv executes the server in place: the pid stays the server's.
        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut command = Command::new(setpriv);
                command
                    .args(["--pdeathsig", "KILL", "--"])
                    .arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .args(self.kind.args(self.port))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + Self::START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited at start with {status}"));
            }
            let (probe, expected) = self.kind.probe();
            if self
                .command_line(probe)
                .is_ok_and(|reply| reply.starts_with(expected))
            {
                // Something answers on the port; make sure it is this process and not another
                // test's server that got the port first.
                if self.serving_pid() == self.pid() {
                    return Ok(());
                }
                self.kill();
                return Err(format!("port {} is taken by another server", self.port));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err("did not answer in time".to_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid the server on this port reports about itself.
    fn serving_pid(&self) -> Option<u32> {
        let (lines, prefix) = match self.kind {
            ServerKind::Memcached => (self.command_until_end("stats\r\n").ok()?, "STAT pid "),
            ServerKind::Redis => {
                let info = self.redis_bulk("INFO server\r\n").ok()?;
                (info.lines().map(str::to_owned).collect(), "process_id:")
            }
        };
        lines
            .iter()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Sends an inline Redis command whose reply is a bulk string, and returns that string.
    pub fn redis_bulk(&self, command: &str) -> std::io::Result<String> {
        let mut reader = BufReader::new(self.connect()?);
        reader.get_mut().write_all(command.as_bytes())?;
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let len: usize = header
            .trim()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a bulk reply: {header:?}")))?;
        let mut body = vec![0u8; len + 2];
        reader.read_exact(&mut body)?;
        body.truncate(len);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server is running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Stops the process (SIGSTOP): it keeps its port and accepts connections, but answers
    /// nothing, like a hung server. Returns once the kernel reports it stopped.
    pub fn pause(&self) {
        self.signal("-STOP");
        self.wait_for_state(true);
    }

    /// Continues a paused process (SIGCONT), and returns once it runs again.
    pub fn resume(&self) {
        self.signal("-CONT");
        self.wait_for_state(false);
    }

    /// Waits until `/proc/<pid>/stat` says the process is stopped (`T`) or not.
    fn wait_for_state(&self, stopped: bool) {
        let pid = self.pid().expect("the server is running");
        let deadline = Instant::now() + Self::START_TIMEOUT;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesized command name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if (state == Some('T')) == stopped {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} did not change state"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process (SIGKILL) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (it comes back empty).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Self::START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(error) if Instant::now() > deadline => {
                    panic!("could not restart on port {}: {error}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(stream)
    }

    /// Sends a raw text command and returns the first reply line.
    pub fn command_line(&self, command: &str) -> std::io::Result<String> {
        let mut stream = self.connect()?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(command.as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    }

    /// Sends a raw text command and returns every reply line up to (not including) `END`.
    pub fn command_until_end(&self, command: &str) -> std::io::Result<Vec<String>> {
        let mut stream = self.connect()?;
        stream.write_all(command.as_bytes())?;
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if line == "END" {
                return Ok(lines);
            }
            lines.push(line);
        }
    }

    /// Every key memcached holds, from `lru_crawler metadump all`, percent-decoded.
    pub fn memcached_keys(&self) -> Vec<String> {
        assert_eq!(self.kind, ServerKind::Memcached);
        self.command_until_end("lru_crawler metadump all\r\n")
            .expect("metadump")
            .iter()
            .filter_map(|line| line.strip_prefix("key="))
            .map(|rest| percent_decode(rest.split(' ').next().unwrap_or_default()))
            .collect()
    }

    /// memcached's `curr_items` statistic.
    pub fn memcached_item_count(&self) -> u64 {
        assert_eq!(self.kind, ServerKind::Memcached);
        self.command_until_end("stats\r\n")
            .expect("stats")
            .iter()
            .find_map(|line| line.strip_prefix("STAT curr_items "))
            .and_then(|n| n.trim().parse().ok())
            .expect("curr_items in stats")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("session%3Aab-_"), "session:ab-_");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("plain"), "plain");
    }
}

/// A Redis Cluster of three masters (no replicas): `redis-server --cluster-enabled yes`
/// processes joined with `redis-cli --cluster create`. Each node keeps its cluster state in a
/// directory of its own, removed on drop, so a killed node restarts with its identity.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
    directories: Vec<PathBuf>,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes, creates the cluster and waits until every node
    /// reports `cluster_state:ok`.
    pub fn start() -> Option<Self> {
        let cluster = Self::create(0, &["--cluster-node-timeout", "2000"])?;
        cluster.wait_until_ok();
        Some(cluster)
    }

    /// Starts `3 × (1 + replicas)` cluster-enabled nodes with the extra arguments `node_args`
    /// and joins them with `redis-cli --cluster create --cluster-replicas replicas`. Nodes keep
    /// serving their own slots while another node is down. A node can die right after its
    /// start (its cluster bus port, picked free, taken meanwhile), and `redis-cli` then waits
    /// for the cluster to join forever: the join is bounded, and the whole cluster is started
    /// again, up to three times.
    fn create(replicas: usize, node_args: &[&str]) -> Option<Self> {
        find_server_binary(ServerKind::Redis)?;
        let cli = find_binary("redis-cli", "redis-tools")?;
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::try_create(&cli, replicas, node_args) {
                Ok(cluster) => return Some(cluster),
                Err(failure) => failures.push(failure),
            }
        }
        panic!("could not create a Redis Cluster: {failures:?}");
    }

    fn try_create(cli: &Path, replicas: usize, node_args: &[&str]) -> Result<Self, String> {
        // Built up in place, so that a failure part-way stops the nodes already started and
        // removes their directories.
        let mut cluster = Self {
            nodes: Vec::new(),
            directories: Vec::new(),
        };
        for _ in 0..3 * (1 + replicas) {
            let directory = std::env::temp_dir().join(format!(
                "session-redis-cluster-{}-{}",
                std::process::id(),
                free_port()
            ));
            std::fs::create_dir_all(&directory).expect("creating a node directory");
            cluster.directories.push(directory.clone());
            // A directory per attempt: a start that failed (its port taken) must not leave its
            // nodes.conf to the next attempt.
            let attempts = std::cell::Cell::new(0u32);
            let node = ServerProcess::start_with_args(ServerKind::Redis, || {
                attempts.set(attempts.get() + 1);
                let attempt_dir = directory.join(format!("attempt-{}", attempts.get()));
                std::fs::create_dir_all(&attempt_dir).expect("creating a node directory");
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-require-full-coverage",
                    "no",
                ]
                .map(str::to_owned)
                .to_vec();
                args.extend(node_args.iter().map(|arg| (*arg).to_owned()));
                args.push("--cluster-port".into());
                args.push(free_port().to_string());
                args.push("--dir".into());
                args.push(attempt_dir.to_string_lossy().into_owned());
                args
            })
            .ok_or("a cluster node did not start")?;
            cluster.nodes.push(node);
        }
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        create.args(cluster.nodes.iter().map(ServerProcess::address));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        create.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = create.spawn().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => return Ok(cluster),
                Some(status) => return Err(format!("redis-cli --cluster create: {status}")),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("redis-cli --cluster create did not finish in 30 s".into());
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            loop {
                let info = node.redis_bulk("CLUSTER INFO\r\n").unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not become ready"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The nodes, to pause, kill or restart.
    pub fn nodes(&mut self) -> &mut [ServerProcess] {
        &mut self.nodes
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://{}", node.address()))
            .collect()
    }

    /// The index of the node that holds `key` (the one that answers `EXISTS` with 1).
    pub fn node_holding(&self, key: &str) -> Option<usize> {
        let command = format!("EXISTS {key}\r\n");
        self.nodes.iter().position(|node| {
            node.pid().is_some()
                && node
                    .command_line(&command)
                    .is_ok_and(|reply| reply.trim() == ":1")
        })
    }

    /// How many keys each node holds (`DBSIZE`).
    pub fn key_counts(&self) -> Vec<u64> {
        self.nodes.iter().map(ServerProcess::redis_dbsize).collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for directory in &self.directories {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

impl ServerProcess {
    /// Redis's `DBSIZE`.
    pub fn redis_dbsize(&self) -> u64 {
        assert_eq!(self.kind, ServerKind::Redis);
        self.command_line("DBSIZE\r\n")
            .ok()
            .and_then(|line| line.trim().strip_prefix(':').and_then(|n| n.parse().ok()))
            .expect("an integer reply to DBSIZE")
    }
}

/// `binary` on the `PATH`, if there.
fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    })
}

/// `setpriv` from util-linux, if installed.
fn setpriv() -> Option<PathBuf> {
    which("setpriv")
}

/// Finds a helper binary on the `PATH`, reporting it missing like a server binary.
pub fn find_binary(binary: &str, package: &str) -> Option<PathBuf> {
    let found = which(binary);
    if found.is_none() {
        let message = format!("{binary} is not installed (apt-get install {package})");
        if std::env::var("SESSION_TEST_REQUIRE_SERVERS").as_deref() == Ok("1") {
            panic!("{message}; SESSION_TEST_REQUIRE_SERVERS=1 makes this a failure");
        }
        let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
    }
    found
}

/// Sends `command` (inline) to the Redis-protocol server on `port` and reads one reply, arrays
/// flattened: a bulk or simple string is one item, an integer its digits, an array its items in
/// order (nested arrays flattened too), a nil nothing. An error reply is an `Err`.
pub fn redis_items(port: u16, command: &str) -> std::io::Result<Vec<String>> {
    fn read_value(
        reader: &mut BufReader<TcpStream>,
        items: &mut Vec<String>,
    ) -> std::io::Result<()> {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = header.trim_end_matches(['\r', '\n']);
        let (kind, rest) = header.split_at_checked(1).unwrap_or(("", ""));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| std::io::Error::other(format!("bad reply header {header:?}")))
        };
        match kind {
            "+" | ":" => items.push(rest.to_owned()),
            "-" => return Err(std::io::Error::other(rest.to_owned())),
            "$" => {
                let Ok(len) = usize::try_from(number()?) else {
                    return Ok(()); // $-1: nil
                };
                let mut body = vec![0u8; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                items.push(String::from_utf8_lossy(&body).into_owned());
            }
            "*" => {
                for _ in 0..number()?.max(0) {
                    read_value(reader, items)?;
                }
            }
            _ => {
                return Err(std::io::Error::other(format!(
                    "bad reply header {header:?}"
                )));
            }
        }
        Ok(())
    }
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream);
    reader
        .get_mut()
        .write_all(format!("{command}\r\n").as_bytes())?;
    let mut items = Vec::new();
    read_value(&mut reader, &mut items)?;
    Ok(items)
}

/// The value of `field` in a `field:value` text reply (`INFO`, `CLUSTER INFO`).
fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// A `redis-server --sentinel` process on a loopback port, with its configuration file in a
/// directory of its own; killed when dropped.
#[derive(Debug)]
pub struct SentinelProcess {
    port: u16,
    child: Option<Child>,
}

impl SentinelProcess {
    /// Starts a sentinel monitoring `master_name` at `127.0.0.1:<master_port>` with `quorum`,
    /// declaring the master down after `down_after_ms`, and waits until it answers. The file
    /// goes into `directory` (the sentinel rewrites it).
    fn start(
        binary: &std::path::Path,
        directory: &std::path::Path,
        master_name: &str,
        master_port: u16,
        quorum: u32,
        down_after_ms: u64,
    ) -> Self {
        let mut last_error = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let attempt_dir = directory.join(format!("sentinel-{port}-{attempt}"));
            std::fs::create_dir_all(&attempt_dir).expect("creating a sentinel directory");
            let config_path = attempt_dir.join("sentinel.conf");
            let config = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds {master_name} {down_after_ms}\n\
                 sentinel failover-timeout {master_name} 5000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                dir = attempt_dir.display()
            );
            std::fs::write(&config_path, config).expect("writing sentinel.conf");
            let mut command = match setpriv() {
                Some(setpriv) => {
                    let mut command = Command::new(setpriv);
                    command.args(["--pdeathsig", "KILL", "--"]).arg(binary);
                    command
                }
                None => Command::new(binary),
            };
            command
                .arg(&config_path)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = match command.spawn() {
                Ok(child) => child,
                Err(error) => {
                    last_error = error.to_string();
                    continue;
                }
            };
            let mut sentinel = Self {
                port,
                child: Some(child),
            };
            match sentinel.wait_until_serving() {
                Ok(()) => return sentinel,
                Err(error) => {
                    sentinel.kill();
                    last_error = error;
                }
            }
        }
        panic!("could not start a sentinel: {last_error}");
    }

    fn wait_until_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("exited at start with {status}"));
            }
            if let Ok(info) = redis_items(self.port, "INFO server") {
                let pid = info
                    .first()
                    .and_then(|info| info_field(info, "process_id"))
                    .and_then(|pid| pid.parse::<u32>().ok());
                if pid == self.child.as_ref().map(Child::id) {
                    return Ok(());
                }
                return Err(format!("port {} is taken by another server", self.port));
            }
            if Instant::now() > deadline {
                return Err("did not answer in time".to_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the process (SIGKILL) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Sentinel-watched pair: a master, one replica, and three sentinels (quorum 2) that
/// declare the master down after one second, all on free loopback ports. Dropping it stops
/// every process and removes the sentinels' directory.
#[derive(Debug)]
pub struct RedisSentinel {
    /// The data nodes: the master first at the start; a failover swaps the roles.
    nodes: Vec<ServerProcess>,
    sentinels: Vec<SentinelProcess>,
    directory: PathBuf,
}

impl RedisSentinel {
    /// The name the sentinels watch the master under.
    pub const MASTER_NAME: &'static str = "sessions";
    /// How long a master must be unreachable before a sentinel thinks it is down.
    pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

    /// Starts the master, its replica (waiting until it has synchronized) and three sentinels
    /// (waiting until each one answers and watches the master). The sentinels learn about each
    /// other over the following seconds: [`wait_for_quorum`](Self::wait_for_quorum) before a
    /// failover.
    pub fn start() -> Option<Self> {
        let binary = find_server_binary(ServerKind::Redis)?;
        let directory = std::env::temp_dir().join(format!(
            "session-redis-sentinel-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&directory).expect("creating the sentinel directory");
        let mut topology = Self {
            nodes: Vec::new(),
            sentinels: Vec::new(),
            directory,
        };
        let master = ServerProcess::start(ServerKind::Redis)?;
        let master_port = master.port().to_string();
        topology.nodes.push(master);
        let replica = ServerProcess::start_with(
            ServerKind::Redis,
            &["--replicaof", "127.0.0.1", &master_port],
        )?;
        topology.nodes.push(replica);
        topology.wait_for_replicas(1);
        for _ in 0..3 {
            let sentinel = SentinelProcess::start(
                &binary,
                &topology.directory,
                Self::MASTER_NAME,
                topology.nodes[0].port(),
                2,
                u64::try_from(Self::DOWN_AFTER.as_millis()).unwrap_or(u64::MAX),
            );
            topology.sentinels.push(sentinel);
        }
        Some(topology)
    }

    /// Waits until the master reports `replicas` replicas online and each of them reports its
    /// link to the master up.
    pub fn wait_for_replicas(&self, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let master = self.master_index();
            let ready = master.is_some_and(|master| {
                let info = self.nodes[master]
                    .redis_bulk("INFO replication\r\n")
                    .unwrap_or_default();
                let online = info
                    .lines()
                    .filter(|line| line.starts_with("slave") && line.contains("state=online"))
                    .count();
                online >= replicas
                    && self.nodes.iter().enumerate().all(|(i, node)| {
                        i == master
                            || node.pid().is_none()
                            || node.redis_bulk("INFO replication\r\n").is_ok_and(|info| {
                                info_field(&info, "master_link_status").as_deref() == Some("up")
                            })
                    })
            });
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "the replica did not synchronize");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every sentinel knows the two others and the replica, so that a failover
    /// can be agreed on.
    pub fn wait_for_quorum(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for sentinel in &self.sentinels {
            loop {
                let fields = redis_items(
                    sentinel.port(),
                    &format!("SENTINEL MASTER {}", Self::MASTER_NAME),
                )
                .unwrap_or_default();
                let field = |name: &str| {
                    fields
                        .chunks(2)
                        .find(|pair| pair[0] == name)
                        .and_then(|pair| pair.get(1).cloned())
                };
                if field("num-other-sentinels").as_deref() == Some("2")
                    && field("num-slaves").as_deref() == Some("1")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the sentinels did not find each other"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `redis://127.0.0.1:<port>` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|sentinel| format!("redis://127.0.0.1:{}", sentinel.port()))
            .collect()
    }

    /// `redis+sentinel://127.0.0.1:<port>,.../sessions`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port()))
            .collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), Self::MASTER_NAME)
    }

    /// The index of the running node that reports itself master.
    pub fn master_index(&self) -> Option<usize> {
        self.nodes.iter().position(|node| {
            node.pid().is_some()
                && node
                    .redis_bulk("INFO replication\r\n")
                    .is_ok_and(|info| info_field(&info, "role").as_deref() == Some("master"))
        })
    }

    /// The master's address as the first sentinel that answers names it.
    pub fn master_address_from_sentinels(&self) -> Option<String> {
        self.sentinels.iter().find_map(|sentinel| {
            let command = format!("SENTINEL get-master-addr-by-name {}", Self::MASTER_NAME);
            let items = redis_items(sentinel.port(), &command).ok()?;
            (items.len() == 2).then(|| format!("{}:{}", items[0], items[1]))
        })
    }

    /// Kills the master (SIGKILL); returns its address.
    pub fn kill_master(&mut self) -> String {
        let master = self.master_index().expect("a running master");
        let address = self.nodes[master].address();
        self.nodes[master].kill();
        address
    }

    /// The data nodes, master and replica.
    pub fn nodes(&mut self) -> &mut [ServerProcess] {
        &mut self.nodes
    }

    /// The sentinels.
    pub fn sentinels(&mut self) -> &mut [SentinelProcess] {
        &mut self.sentinels
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for sentinel in &mut self.sentinels {
            sentinel.kill();
        }
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

impl RedisCluster {
    /// Starts a cluster of three masters with one replica each (six cluster-enabled nodes
    /// joined with `redis-cli --cluster create --cluster-replicas 1`), with the given node
    /// timeout (how long a master may not answer before its replica takes over: short for a
    /// failover test, longer where a loaded machine must not cause failovers) and replicas
    /// allowed to take over however long they were cut off. Waits until every node reports
    /// `cluster_state:ok` and every replica has synchronized.
    pub fn start_with_replicas(node_timeout: Duration) -> Option<Self> {
        let node_timeout = node_timeout.as_millis().to_string();
        // A cluster whose replicas do not all synchronize (seen now and then on a loaded
        // two-core machine) is started again, up to three times.
        for _ in 0..3 {
            let cluster = Self::create(
                1,
                &[
                    "--cluster-node-timeout",
                    &node_timeout,
                    "--cluster-replica-validity-factor",
                    "0",
                ],
            )?;
            cluster.wait_until_ok();
            if cluster.replicas_synchronized(Duration::from_secs(60)) {
                return Some(cluster);
            }
        }
        panic!("the cluster's replicas did not synchronize, three times");
    }

    /// Waits until every running replica reports its link to its master up, and every node
    /// reports `cluster_state:ok` with the replicas known.
    pub fn wait_for_replicas(&self) {
        assert!(
            self.replicas_synchronized(Duration::from_secs(60)),
            "the cluster's replicas did not synchronize"
        );
    }

    /// Whether every running replica reports its link up and every master a replica, within
    /// `within`.
    fn replicas_synchronized(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            loop {
                let info = node.redis_bulk("INFO replication\r\n").unwrap_or_default();
                let ready = match info_field(&info, "role").as_deref() {
                    Some("slave") => {
                        info_field(&info, "master_link_status").as_deref() == Some("up")
                    }
                    Some("master") => {
                        info_field(&info, "connected_slaves").is_some_and(|n| n != "0")
                    }
                    _ => false,
                };
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        true
    }

    /// Indices of the running nodes that report themselves masters.
    pub fn master_indices(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].pid().is_some()
                    && self.nodes[i]
                        .redis_bulk("INFO replication\r\n")
                        .is_ok_and(|info| info_field(&info, "role").as_deref() == Some("master"))
            })
            .collect()
    }
}
