//! An open-loop HTTP/1.1 load generator: requests at a fixed rate over keep-alive connections,
//! with each latency measured from when the request was *due*, not from when it was sent, so a
//! stalled server is charged for every request it delayed (no coordinated omission, unlike
//! `wrk`). For comparing tail latency of two servers at the same request rate.
//!
//! ```sh
//! cargo run --release --example loadgen -- 127.0.0.1:8080 --rate 20000 --seconds 10 --connections 50
//! ```
//! Prints one line: `rate=… sent=… ok=… errors=… p50_us=… p90_us=… p99_us=… p999_us=… max_us=…`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Args {
    addr: SocketAddr,
    rate: f64,
    seconds: f64,
    connections: usize,
}

fn usage() -> ! {
    eprintln!("usage: loadgen HOST:PORT [--rate REQ_PER_S] [--seconds S] [--connections N]");
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args { addr: "127.0.0.1:8080".parse().unwrap(), rate: 10_000.0, seconds: 10.0, connections: 50 };
    let mut it = std::env::args().skip(1);
    let mut addr = None;
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--rate" => a.rate = value().parse().unwrap_or_else(|_| usage()),
            "--seconds" => a.seconds = value().parse().unwrap_or_else(|_| usage()),
            "--connections" => a.connections = value().parse().unwrap_or_else(|_| usage()),
            "--help" | "-h" => usage(),
            other if addr.is_none() => addr = Some(other.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    a.addr = addr.unwrap_or_else(|| usage());
    if a.rate <= 0.0 || a.seconds <= 0.0 || a.connections == 0 {
        usage();
    }
    a
}

/// Reads one response (headers, then `Content-Length` bytes of body) from `buf`/`stream`.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                    return Err(std::io::Error::other("not 200"));
                }
                buf.drain(..end + 4 + len);
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One connection's share of the schedule: a request every `interval`, starting at `first`.
fn connection(addr: SocketAddr, first: Instant, interval: Duration, end: Instant) -> (Vec<u32>, u64) {
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::new();
    let mut due = first;
    while due < end {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if stream.is_none() {
            stream = TcpStream::connect(addr).ok().inspect(|s| {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            });
            buf.clear();
        }
        let ok = match stream.as_mut() {
            Some(s) => s.write_all(request.as_bytes()).is_ok() && read_response(s, &mut buf).is_ok(),
            None => false,
        };
        if ok {
            latencies.push(due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        } else {
            errors += 1;
            stream = None;
        }
        due += interval;
    }
    (latencies, errors)
}

fn main() {
    let a = args();
    let interval = Duration::from_secs_f64(a.connections as f64 / a.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(a.seconds);
    let threads: Vec<_> = (0..a.connections)
        .map(|i| {
            // Spread the connections' schedules evenly over one interval.
            let first = start + interval.mul_f64(i as f64 / a.connections as f64);
            let addr = a.addr;
            std::thread::spawn(move || connection(addr, first, interval, end))
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().unwrap();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let at = |q: f64| if all.is_empty() { 0 } else { all[((all.len() - 1) as f64 * q).round() as usize] };
    println!(
        "rate={} sent={} ok={} errors={errors} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        a.rate,
        all.len() as u64 + errors,
        all.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        all.last().copied().unwrap_or(0)
    );
}
