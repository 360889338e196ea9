//! Slowloris against `read_timeout`: with `workers = 2`, `threads = 4` and `read_timeout = 10`,
//! 2,000 connections each begin a request and then send one more byte every 5 s. Measures when
//! the server closes them (it should, about 10 s after each began), and a normal client's
//! latency (new connection, one request, its answer) before and during the attack.
//!
//! `cargo build --release --workspace && cargo bench --bench slowloris`
//! (`SLOW_CONNECTIONS=N`, `READ_TIMEOUT=S` for other figures).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, p50_p99};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
/// Between two bytes of one slow connection.
const DRIP: Duration = Duration::from_secs(5);

/// One normal client: connect, ask, read the answer. Its latency.
fn normal_request(addr: SocketAddr) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(REQUEST).unwrap();
    let mut buf = [0u8; 512];
    let mut got = 0;
    while !buf[..got].ends_with(b"Hello, world!") {
        let n = s.read(&mut buf[got..]).unwrap();
        assert!(n > 0, "a normal client was closed");
        got += n;
    }
    t.elapsed()
}

/// Normal clients, one after another with a 2 ms pause, until `stop`: when each began, and
/// its latency.
fn normal_clients(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(Instant, Duration)>> {
    std::thread::spawn(move || {
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            latencies.push((Instant::now(), normal_request(addr)));
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies
    })
}

/// A slow connection: when it began, when it sent last, when the server closed it.
struct Slow {
    stream: TcpStream,
    began: Instant,
    last: Instant,
    closed: Option<Instant>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let n: usize = std::env::var("SLOW_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let read_timeout: u64 = std::env::var("READ_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit.1, limit.1);
    let server = Server::start_with(2, 4, &format!("read_timeout = {read_timeout}"));
    let addr = server.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let before = normal_clients(addr, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let before = before.join().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let during = normal_clients(addr, stop.clone());
    let started = Instant::now();
    let mut slow: Vec<Slow> = (0..n)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            stream.set_nonblocking(true).unwrap();
            let now = Instant::now();
            Slow { stream, began: now, last: now, closed: None }
        })
        .collect();
    println!("{n} slow connections opened in {:.1} s", started.elapsed().as_secs_f64());
    let give_up = Instant::now() + Duration::from_secs(read_timeout * 3 + 10);
    let mut buf = [0u8; 1024];
    while slow.iter().any(|s| s.closed.is_none()) && Instant::now() < give_up {
        for s in slow.iter_mut().filter(|s| s.closed.is_none()) {
            // Closed by the server: its `408`, then the end, or a reset.
            loop {
                match s.stream.read(&mut buf) {
                    Ok(0) => s.closed = Some(Instant::now()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => s.closed = Some(Instant::now()),
                }
                break;
            }
            if s.closed.is_none() && s.last.elapsed() >= DRIP {
                if s.stream.write_all(b"X").is_err() {
                    s.closed = Some(Instant::now());
                }
                s.last = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let during = during.join().unwrap();

    let lives: Vec<Duration> = slow.iter().filter_map(|s| s.closed.map(|c| c - s.began)).collect();
    let open = n - lives.len();
    let (life_p50, _) = p50_p99(lives.clone());
    let longest = lives.iter().max().copied().unwrap_or_default();
    println!(
        "read_timeout = {read_timeout} s: {} of {n} slow connections closed by the server, {open} left open; \
         a slow connection lived p50 {:.1} s, at most {:.1} s (from its first byte)",
        lives.len(),
        life_p50 / 1000.0,
        longest.as_secs_f64()
    );
    // While the slow connections drip, and while the server closes them (their `408`s and
    // closes come within a fraction of a second of each other).
    let first_close = slow.iter().filter_map(|s| s.closed).min().unwrap_or_else(Instant::now);
    let figures = |label: &str, sample: Vec<Duration>| {
        let (p50, p99) = p50_p99(sample.clone());
        format!("{label} p50 {p50:.2} ms, p99 {p99:.2} ms ({} requests)", sample.len())
    };
    type Sample = Vec<(Instant, Duration)>;
    let (dripping, closing): (Sample, Sample) =
        during.into_iter().partition(|(t, _)| *t + Duration::from_millis(500) < first_close);
    println!("normal client (connect + request + answer):");
    println!("  {}", figures("before the attack:", before.iter().map(|r| r.1).collect()));
    println!("  {}", figures("while the slow connections drip:", dripping.iter().map(|r| r.1).collect()));
    println!("  {}", figures("while the server closes them:", closing.iter().map(|r| r.1).collect()));
    // Gentle closes are counted once the peer's end is closed too (or after the 2 s linger).
    drop(slow);
    std::thread::sleep(Duration::from_secs(3));
    let metrics = common::control_text(&server.dir.join("control.sock"), "/metrics").unwrap_or_default();
    if let Some(line) =
        metrics.lines().find(|l| l.starts_with("fdtserver_connections_closed_total{reason=\"read_timeout\"}"))
    {
        println!("server: {line}");
    }
}
