//! An open-loop HTTP/1.1 load generator: requests at a fixed rate, spread round-robin over
//! keep-alive connections, each latency measured from when the request was *due* — not from
//! when it could be sent — so a server that stalls is charged for every request it delayed
//! (no coordinated omission, unlike `wrk`). One thread, one `mio` poll: the client costs little
//! next to the server it measures. For comparing the tail latency of servers at equal rates.
//! It spins while a send is due within a millisecond, so it keeps its CPU busy: pin it to one
//! the server does not use.
//!
//! ```sh
//! cargo run --release --example loadgen -- 127.0.0.1:8080 --rate 20000 --seconds 10 --connections 50
//! ```
//! Prints one line: `rate=… sent=… ok=… errors=… late=… p50_us=… p90_us=… p99_us=… p999_us=… max_us=…`
//! (`late`: requests that were sent more than 1 ms after they were due, because their
//! connection was still waiting for an earlier answer).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

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

struct Conn {
    stream: TcpStream,
    /// Due times of the requests assigned to this connection and not answered yet; the front
    /// one is in flight when `in_flight`.
    due: VecDeque<Instant>,
    in_flight: bool,
    input: Vec<u8>,
}

/// Length of the first complete response in `buf` (headers and `Content-Length` body), and
/// whether it was a 200.
fn complete_response(buf: &[u8]) -> Option<(usize, bool)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    (buf.len() >= end + 4 + len).then(|| (end + 4 + len, head.starts_with("http/1.1 200")))
}

fn main() {
    let a = args();
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", a.addr).into_bytes();
    let mut poll = Poll::new().unwrap();
    let mut conns: Vec<Conn> = (0..a.connections)
        .map(|i| {
            let std =
                std::net::TcpStream::connect(a.addr).unwrap_or_else(|e| panic!("cannot connect to {}: {e}", a.addr));
            std.set_nodelay(true).unwrap();
            std.set_nonblocking(true).unwrap();
            let mut stream = TcpStream::from_std(std);
            poll.registry().register(&mut stream, Token(i), Interest::READABLE).unwrap();
            Conn { stream, due: VecDeque::new(), in_flight: false, input: Vec::new() }
        })
        .collect();
    let interval = Duration::from_secs_f64(1.0 / a.rate);
    let total = (a.rate * a.seconds) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let mut next = 0u64; // next request to schedule
    let mut latencies: Vec<u32> = Vec::with_capacity(total as usize);
    let (mut errors, mut late) = (0u64, 0u64);
    let mut events = Events::with_capacity(1024);
    let send = |c: &mut Conn, late: &mut u64, errors: &mut u64| {
        let due = *c.due.front().expect("a request is queued");
        if due.elapsed() > Duration::from_millis(1) {
            *late += 1;
        }
        // Requests are small: the socket buffer always takes one whole.
        match c.stream.write(&request) {
            Ok(n) if n == request.len() => c.in_flight = true,
            _ => {
                *errors += 1;
                c.due.pop_front();
            }
        }
    };
    let deadline = start + interval * total as u32 + Duration::from_secs(10);
    while (next < total || conns.iter().any(|c| !c.due.is_empty())) && Instant::now() < deadline {
        // Hand out every request that is due.
        let now = Instant::now();
        while next < total && start + interval.mul_f64(next as f64) <= now {
            let c = &mut conns[(next % a.connections as u64) as usize];
            c.due.push_back(start + interval.mul_f64(next as f64));
            if !c.in_flight {
                send(c, &mut late, &mut errors);
            }
            next += 1;
        }
        // epoll's timeout counts whole milliseconds, rounded up: waiting for a send due in
        // 50 µs would make it up to 1 ms late and charge that to the server. Spin (a zero
        // timeout) for the last millisecond instead: this thread has its own CPU.
        let timeout = if next < total {
            let until_due = (start + interval.mul_f64(next as f64)).saturating_duration_since(Instant::now());
            until_due.saturating_sub(Duration::from_millis(1))
        } else {
            Duration::from_millis(100)
        };
        poll.poll(&mut events, Some(timeout)).unwrap();
        for event in events.iter() {
            let c = &mut conns[event.token().0];
            let mut chunk = [0u8; 8192];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => {
                        errors += c.due.len() as u64;
                        c.due.clear();
                        c.in_flight = false;
                        break;
                    }
                    Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        errors += c.due.len() as u64;
                        c.due.clear();
                        c.in_flight = false;
                        break;
                    }
                }
            }
            while let Some((len, ok)) = complete_response(&c.input) {
                c.input.drain(..len);
                let due = c.due.pop_front().expect("an answer to a request in flight");
                c.in_flight = false;
                if ok {
                    latencies.push(due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors += 1;
                }
                if !c.due.is_empty() {
                    send(c, &mut late, &mut errors);
                }
            }
        }
    }
    latencies.sort_unstable();
    let at =
        |q: f64| if latencies.is_empty() { 0 } else { latencies[((latencies.len() - 1) as f64 * q).round() as usize] };
    println!(
        "rate={} sent={next} ok={} errors={errors} late={late} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        a.rate,
        latencies.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        latencies.last().copied().unwrap_or(0)
    );
}
