//! Reload cost, for `hello` with 2 workers × 4 threads:
//!
//! 1. 25 reloads with no request in flight: the time from asking (`POST /reload`, which answers
//!    once the new generation serves and the old one stopped accepting) to the answer, and the
//!    time until every old worker has exited; median and p99.
//! 2. 200 idle keep-alive connections through 10 reloads: after each, every one asks once more;
//!    how many the server closed, how many the new generation answered, and the time from the
//!    reload's answer until every old worker has exited (they hand their connections over).
//! 3. With `wrk` on PATH: throughput with no reload, then with a reload every second, and the
//!    failed requests of both (the goal: within 10 % of steady state, zero failures).
//!
//! `cargo build --release --workspace && cargo bench --bench reload`
//! (`RELOADS=N`, `WRK_SECONDS=S`, `WRK_CONNECTIONS=C` to change the defaults 25, 10, 50).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, alive, p50_p99};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn reload_times(server: &Server, reloads: u64) {
    let mut to_serving = Vec::new();
    let mut to_old_exit = Vec::new();
    for _ in 0..reloads {
        let generation = server.status().unwrap()["generation"].as_u64().unwrap();
        let old = server.workers_of(generation);
        let asked = Instant::now();
        let (code, body) = server.control("POST", "/reload").expect("no answer");
        assert_eq!(code, 200, "reload refused: {body}");
        to_serving.push(asked.elapsed());
        while old.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_micros(200));
        }
        to_old_exit.push(asked.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s50, s99) = p50_p99(to_serving);
    let (e50, e99) = p50_p99(to_old_exit);
    println!("{reloads} reloads, no request in flight:");
    println!("  ask → new generation serving (old one stopped accepting): median {s50:.1} ms, p99 {s99:.1} ms");
    println!("  ask → every old worker exited:                          median {e50:.1} ms, p99 {e99:.1} ms");
}

/// Runs wrk; returns (requests/s, failed requests, raw output).
fn wrk(server: &Server, seconds: u64, connections: u64) -> (f64, u64, String) {
    let url = format!("http://{}/", server.addr);
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), &url])
        .output()
        .expect("cannot run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    // "Socket errors: connect 0, read 3, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let mut failed = 0;
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("Socket errors:") {
            failed += rest.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
        }
        if let Some(rest) = line.trim().strip_prefix("Non-2xx or 3xx responses:") {
            failed += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (rps, failed, text)
}

fn throughput_during_reloads(server: &Server, seconds: u64, connections: u64) {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("wrk is not installed: skipping the throughput part (apt-get install wrk)");
        return;
    }
    let _ = wrk(server, 2, connections); // warm up
    let (steady, steady_failed, _) = wrk(server, seconds, connections);
    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let stop = stop.clone();
        let sock = server.dir.join("control.sock");
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                if let Some((200, _)) = common::control(&sock, "POST", "/reload") {
                    n += 1;
                }
            }
            n
        })
    };
    let (reloading, reloading_failed, raw) = wrk(server, seconds, connections);
    stop.store(true, Ordering::Relaxed);
    let reloads = reloader.join().unwrap();
    println!("wrk -t1 -c{connections} -d{seconds}s on hello:");
    println!("  steady:                    {steady:>9.0} req/s, {steady_failed} failed");
    println!(
        "  with a reload every second: {reloading:>9.0} req/s, {reloading_failed} failed, {reloads} reloads ({:.1} % of steady)",
        100.0 * reloading / steady.max(1.0)
    );
    if reloading_failed > 0 {
        println!("{raw}");
    }
}

/// One keep-alive `GET /` on `s`: the answering worker's pid, `None` when the server closed it.
fn ask(s: &mut std::io::BufReader<std::net::TcpStream>) -> Option<i32> {
    use std::io::{BufRead, Read, Write};
    s.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    let (mut pid, mut length) = (None, 0usize);
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(": ") {
            match k.to_ascii_lowercase().as_str() {
                "x-worker-pid" => pid = v.parse().ok(),
                "content-length" => length = v.parse().ok()?,
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    pid
}

fn idle_through_reloads(server: &Server, connections: usize, reloads: usize) {
    let mut idle: Vec<_> =
        (0..connections).map(|_| std::io::BufReader::new(std::net::TcpStream::connect(server.addr).unwrap())).collect();
    for c in &mut idle {
        ask(c).expect("a first answer");
    }
    let (mut closed, mut by_new, mut exits) = (0, 0, Vec::new());
    for _ in 0..reloads {
        let generation = server.status().unwrap()["generation"].as_u64().unwrap();
        let old = server.workers_of(generation);
        let (code, _) = server.control("POST", "/reload").unwrap();
        assert_eq!(code, 200);
        let answered = Instant::now();
        while old.iter().any(|p| alive(*p)) {
            assert!(answered.elapsed() < Duration::from_secs(60), "old workers still there after 60 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        exits.push(answered.elapsed());
        let new = server.workers_of(generation + 1);
        for c in &mut idle {
            match ask(c) {
                Some(pid) if new.contains(&pid) => by_new += 1,
                Some(_) => {}
                None => {
                    closed += 1;
                    *c = std::io::BufReader::new(std::net::TcpStream::connect(server.addr).unwrap());
                }
            }
        }
    }
    let (p50, p99) = p50_p99(exits);
    println!(
        "{connections} idle keep-alive connections through {reloads} reloads: {closed} closed by the server, \
         {by_new} of {} next requests answered by the new generation; old workers gone {p50:.1} ms (p50) / {p99:.1} ms (p99) after the reload's answer",
        connections * reloads
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let server = Server::start(2, 4);
    reload_times(&server, env_or("RELOADS", 25));
    idle_through_reloads(&server, 200, 10);
    throughput_during_reloads(&server, env_or("WRK_SECONDS", 10), env_or("WRK_CONNECTIONS", 50));
}
