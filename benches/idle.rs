//! Idle connections: with `workers = 2` and `threads = 4`, open 10,000 idle keep-alive
//! connections to `hello`, then measure how fast a new client is answered (p50/p99 over
//! 1,000 fresh connections), and what the workers cost (RSS, threads, connections each).
//!
//! `cargo build --release --workspace && cargo bench --bench idle` (`IDLE_CONNECTIONS=N` for
//! another count). Source addresses 127.0.0.2, .3, … are used past 20,000 connections.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Server;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const BODY: &[u8] = b"Hello, world!";

fn read_answer(s: &mut TcpStream) {
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.ends_with(BODY) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
    }
}

fn connect_from(index: usize, addr: SocketAddr) -> TcpStream {
    // One source address has about 28k ports: spread larger counts over 127.0.0.2, .3, …
    let source: SocketAddr = format!("127.0.0.{}:0", 2 + index / 20_000).parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&source.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

fn rss_kib(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let n: usize = std::env::var("IDLE_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, limit.1, limit.1);
    let server = Server::start(2, 4);
    let addr = server.addr;
    let status = server.status().unwrap();
    let log = std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
    let baseline: Vec<(i64, u64)> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let pid = w["pid"].as_i64().unwrap();
            (pid, rss_kib(pid))
        })
        .collect();
    let started = Instant::now();
    let mut idle = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = connect_from(i, addr);
        s.write_all(REQUEST).unwrap();
        idle.push(s);
    }
    for s in &mut idle {
        read_answer(s);
    }
    println!("{n} idle keep-alive connections opened and answered in {:.1} s", started.elapsed().as_secs_f64());
    let mut latencies = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(REQUEST).unwrap();
        read_answer(&mut s);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "new client, connect + request + answer, 1000 runs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(latencies[500]),
        ms(latencies[990]),
        ms(latencies[999])
    );
    std::thread::sleep(Duration::from_millis(700)); // one heartbeat, so the counts are fresh
    let v = server.status().unwrap_or(status);
    for w in v["workers"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap();
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
        let rss = rss_kib(pid);
        let before = baseline.iter().find(|(p, _)| *p == pid).map_or(0, |b| b.1);
        let conns = w["connections"].as_u64().unwrap_or(0);
        let per_conn = (rss.saturating_sub(before) * 1024) as f64 / conns.max(1) as f64;
        println!(
            "worker {pid}: {conns} connections, {threads} threads, RSS {:.1} MiB (was {:.1} MiB with none: {per_conn:.0} bytes per idle connection)",
            rss as f64 / 1024.0,
            before as f64 / 1024.0
        );
    }
    if let Some(line) = log.lines().find(|l| l.contains("open file limit")) {
        println!("server: {}", line.split("] ").nth(1).unwrap_or(line));
    }
    drop(idle);
}
