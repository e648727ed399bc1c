//! The fault proxy against a small echo server: each fault does what its documentation says.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use session_conformance::proxy::{Fault, FaultProxy, Scope, Trigger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// An echo server on a free loopback port: every byte it reads it writes back. When a client
/// closes its side (the server reads EOF) the server says so on the channel.
struct Echo {
    address: SocketAddr,
    closed: mpsc::UnboundedReceiver<()>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tell, closed) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let tell = tell.clone();
            connections.spawn(async move {
                let mut buffer = [0u8; 4096];
                loop {
                    match stream.read(&mut buffer).await {
                        Ok(0) => {
                            let _ = tell.send(());
                            return;
                        }
                        Ok(n) => {
                            if stream.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    Echo {
        address,
        closed,
        task,
    }
}

/// `len` bytes that differ from one position to the next (so a shifted or mixed stream shows).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn setup() -> (Echo, FaultProxy) {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.address).await.unwrap();
    (echo, proxy)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.address()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until EOF or an error; returns the bytes and the error, if any.
async fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => return (received, None),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) => return (received, Some(error)),
        }
    }
}

/// Whether a read on `stream` gets nothing (no byte, no EOF, no error) for `wait`.
async fn stays_silent(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(wait, stream.read(&mut byte))
        .await
        .is_err()
}

/// Sends `message` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn without_a_fault_bytes_pass_intact_both_ways() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    let message = pattern(256 * 1024);
    let (mut read, mut write) = client.split();
    let sent = async {
        write.write_all(&message).await.unwrap();
    };
    let mut back = vec![0u8; message.len()];
    let received = read.read_exact(&mut back);
    let (_, received) = tokio::join!(sent, received);
    received.unwrap();
    assert!(back == message, "the echoed bytes differ");
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.open_connections(), 1);
}

#[tokio::test]
async fn latency_delays_each_direction_and_keeps_the_bytes() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    // A round trip before the fault, on the same connection: fast.
    let started = Instant::now();
    assert_eq!(round_trip(&mut client, b"before").await, b"before");
    let fast = started.elapsed();

    proxy.set(Fault::Latency(Duration::from_millis(150)));
    let message = pattern(1000);
    let started = Instant::now();
    assert_eq!(round_trip(&mut client, &message).await, message);
    let slow = started.elapsed();
    // One chunk each way, each held 150 ms.
    assert!(slow >= Duration::from_millis(300), "took {slow:?}");
    assert!(slow < Duration::from_secs(3), "took {slow:?}");
    assert!(
        fast < Duration::from_millis(150),
        "took {fast:?} without a fault"
    );

    proxy.clear();
    let started = Instant::now();
    assert_eq!(round_trip(&mut client, b"after").await, b"after");
    assert!(started.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn latency_delays_chunks_in_flight_side_by_side() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    proxy.set(Fault::Latency(Duration::from_millis(200)));
    let started = Instant::now();
    // Five messages 40 ms apart: five chunks in flight at once each way.
    for i in 0..5u8 {
        client.write_all(&[i; 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut back = [0u8; 50];
    client.read_exact(&mut back).await.unwrap();
    let elapsed = started.elapsed();
    let sent: Vec<u8> = (0..5u8).flat_map(|i| [i; 10]).collect();
    assert_eq!(back.to_vec(), sent);
    // 160 ms of sending, then 200 ms each way; delayed one after another the five chunks
    // would take 2 s.
    assert!(elapsed >= Duration::from_millis(560), "took {elapsed:?}");
    assert!(elapsed < Duration::from_millis(1100), "took {elapsed:?}");
}

#[tokio::test]
async fn hang_stalls_both_ways_with_the_sockets_open_until_cleared() {
    let (mut echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    assert_eq!(round_trip(&mut client, b"ping").await, b"ping");

    proxy.set(Fault::Hang);
    client.write_all(b"held").await.unwrap();
    assert!(stays_silent(&mut client, Duration::from_millis(400)).await);
    // The server got nothing either: it has not seen the client close.
    assert!(echo.closed.try_recv().is_err());

    proxy.clear();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut back))
        .await
        .expect("the held bytes arrive once the hang is lifted")
        .unwrap();
    assert_eq!(&back, b"held");
}

#[tokio::test]
async fn a_hang_after_some_reply_bytes_stops_the_reply_there() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    proxy.apply(Fault::Hang, Scope::All, Trigger::AfterReplyBytes(20));
    let message = pattern(100);
    client.write_all(&message).await.unwrap();
    let mut first = [0u8; 20];
    client.read_exact(&mut first).await.unwrap();
    assert_eq!(first, message[..20]);
    assert!(stays_silent(&mut client, Duration::from_millis(300)).await);

    proxy.clear();
    let mut rest = [0u8; 80];
    client.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest, message[20..]);
}

#[tokio::test]
async fn reset_after_some_reply_bytes_aborts_the_client_connection() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    assert_eq!(round_trip(&mut client, b"ping").await, b"ping");

    proxy.apply(Fault::Reset, Scope::All, Trigger::AfterReplyBytes(10));
    let message = pattern(100);
    client.write_all(&message).await.unwrap();
    let (received, error) = read_to_end(&mut client).await;
    assert_eq!(received, message[..10]);
    let error = error.expect("a reset, not a clean end");
    assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error:?}");
}

#[tokio::test]
async fn cut_delivers_exactly_the_first_bytes_then_closes_both_sides() {
    let (mut echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    proxy.apply(Fault::Cut, Scope::All, Trigger::AfterReplyBytes(37));
    let message = pattern(100);
    client.write_all(&message).await.unwrap();
    let (received, error) = read_to_end(&mut client).await;
    assert!(error.is_none(), "a clean end, not {error:?}");
    assert_eq!(received, message[..37]);
    // The server's side was closed too.
    tokio::time::timeout(Duration::from_secs(2), echo.closed.recv())
        .await
        .expect("the server sees its connection closed")
        .unwrap();
}

#[tokio::test]
async fn trickle_delivers_everything_one_byte_per_read() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    let delay = Duration::from_millis(8);
    proxy.set(Fault::Trickle(delay));
    let message = pattern(40);
    let started = Instant::now();
    client.write_all(&message).await.unwrap();
    let mut received = Vec::new();
    let mut reads = Vec::new();
    let mut buffer = [0u8; 4096];
    while received.len() < message.len() {
        let n = client.read(&mut buffer).await.unwrap();
        assert!(n > 0, "EOF after {} bytes", received.len());
        reads.push(n);
        received.extend_from_slice(&buffer[..n]);
    }
    let elapsed = started.elapsed();
    assert_eq!(received, message);
    // Each byte is delayed on the way up and again on the way down; the two overlap.
    assert!(elapsed >= delay * 40, "took {elapsed:?}");
    // A loaded machine may let two bytes gather before the client reads; most reads are one
    // byte, where an untouched stream would come in one or two reads.
    let single = reads.iter().filter(|&&n| n == 1).count();
    assert!(single >= message.len() * 3 / 4, "reads: {reads:?}");
    assert!(reads.iter().all(|&n| n <= 4), "reads: {reads:?}");
}

#[tokio::test]
async fn a_bandwidth_limit_takes_about_the_expected_time() {
    let (_echo, proxy) = setup().await;
    let mut client = connect(&proxy).await;
    let rate = 100_000u64;
    proxy.set(Fault::Bandwidth(rate));
    let message = pattern(50_000);
    let started = Instant::now();
    let (mut read, mut write) = client.split();
    let sent = async {
        write.write_all(&message).await.unwrap();
    };
    let mut back = vec![0u8; message.len()];
    let (_, received) = tokio::join!(sent, read.read_exact(&mut back));
    received.unwrap();
    let elapsed = started.elapsed();
    assert!(back == message, "the echoed bytes differ");
    // 50 kB at 100 kB/s is half a second each way; the ways overlap (the echo sends each
    // slice back as it comes).
    assert!(elapsed >= Duration::from_millis(450), "took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
}

#[tokio::test]
async fn scopes_choose_the_connections_and_clear_lifts_everything() {
    let (_echo, proxy) = setup().await;
    let mut old = connect(&proxy).await;
    assert_eq!(round_trip(&mut old, b"a").await, b"a");

    // New connections only: the open one keeps working, a new one hangs.
    proxy.apply(Fault::Hang, Scope::New, Trigger::Now);
    assert_eq!(round_trip(&mut old, b"b").await, b"b");
    let mut new = connect(&proxy).await;
    new.write_all(b"c").await.unwrap();
    assert!(stays_silent(&mut new, Duration::from_millis(300)).await);

    proxy.clear();
    let mut back = [0u8; 1];
    new.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"c");

    // Existing connections only: both open ones hang, a later one works.
    proxy.apply(Fault::Hang, Scope::Existing, Trigger::Now);
    let mut later = connect(&proxy).await;
    assert_eq!(round_trip(&mut later, b"d").await, b"d");
    for stream in [&mut old, &mut new] {
        stream.write_all(b"e").await.unwrap();
        assert!(stays_silent(stream, Duration::from_millis(300)).await);
    }
    proxy.clear();
    for stream in [&mut old, &mut new] {
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"e");
    }
    assert_eq!(proxy.accepted(), 3);
}

#[tokio::test]
async fn close_all_closes_the_open_connections_and_new_ones_still_work() {
    let (_echo, proxy) = setup().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = connect(&proxy).await;
        assert_eq!(round_trip(&mut client, b"x").await, b"x");
        clients.push(client);
    }
    assert_eq!(proxy.accepted(), 3);
    assert_eq!(proxy.open_connections(), 3);

    proxy.close_all();
    for client in &mut clients {
        let (received, _) = tokio::time::timeout(Duration::from_secs(2), read_to_end(client))
            .await
            .expect("a closed connection ends");
        assert!(received.is_empty());
    }
    let mut fresh = connect(&proxy).await;
    assert_eq!(round_trip(&mut fresh, b"y").await, b"y");
    assert_eq!(proxy.accepted(), 4);
    // A closed connection leaves the count as its task ends.
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.open_connections() != 1 {
        assert!(
            Instant::now() < deadline,
            "{} open",
            proxy.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dropping_the_proxy_stops_it() {
    let (_echo, proxy) = setup().await;
    let address = proxy.address();
    let mut client = connect(&proxy).await;
    assert_eq!(round_trip(&mut client, b"x").await, b"x");
    drop(proxy);

    let (received, _) = tokio::time::timeout(Duration::from_secs(2), read_to_end(&mut client))
        .await
        .expect("the open connection is closed");
    assert!(received.is_empty());
    // The listener goes with it (its task ends shortly after the drop).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect(address).await {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => break,
            _ => {
                assert!(Instant::now() < deadline, "the proxy still accepts");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
