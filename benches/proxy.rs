//! The `proxy` app's round trip against a direct connection to its backend: one server
//! (`workers = 2`, `threads = 2`) serves `echo` (and `slow`, an echo that works 1 ms per
//! line), another (the same size) the `proxy` whose routes lead to them. 32 clients each send
//! a 64-byte line and wait for it to come back, either straight to the backend or through the
//! proxy (client → proxy → backend → proxy → client: two more hops); the two runs alternate,
//! three rounds each, so that both see the same machine.
//!
//! Three loads: `closed` (each client sends its next line as soon as the last came back: the
//! machine is saturated, and the round trip is the CPU each one costs), `paced` (each client
//! one line every 5 ms: the latency a hop adds when there is CPU to spare), and `closed, 1 ms
//! backend` (a backend that works 1 ms per line, `echo` with `delay_ms = 1`, as a service
//! behind a proxy does).
//!
//! `cargo build --release --workspace && cargo bench --bench proxy`
//! (`CLIENTS=N`, `SECONDS=S` per run for other figures).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Server, p50_p99};

const LINE: &[u8] = b"012345678901234567890123456789012345678901234567890123456789012\n";

/// One client: connects (through the proxy when `route`), then sends lines for `run`, each
/// `pace` after the last began (zero: at once); returns its round trips.
fn client(addr: SocketAddr, route: Option<&str>, run: Duration, pace: Duration) -> Vec<Duration> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = Vec::new();
    if let Some(route) = route {
        writer.write_all(format!("ROUTE {route}\n").as_bytes()).unwrap();
        reader.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line, b"OK\n", "the proxy did not route");
    }
    let mut trips = Vec::new();
    let end = Instant::now() + run;
    while Instant::now() < end {
        let began = Instant::now();
        writer.write_all(LINE).unwrap();
        line.clear();
        reader.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line, LINE, "the line came back changed");
        trips.push(began.elapsed());
        if let Some(rest) = pace.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    trips
}

/// `clients` clients at once; every round trip of them all.
fn run(addr: SocketAddr, route: Option<&'static str>, clients: usize, run: Duration, pace: Duration) -> Vec<Duration> {
    let threads: Vec<_> = (0..clients).map(|_| std::thread::spawn(move || client(addr, route, run, pace))).collect();
    threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and friends
    }
    let clients: usize = std::env::var("CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let seconds: u64 = std::env::var("SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let backends = Server::start_apps(
        2,
        2,
        "",
        "[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"echo\"\nbacklog = 1024\n\
         [[listen]]\naddress = \"127.0.0.1:0\"\napp = \"slow\"\nbacklog = 1024\n\
         [app.echo]\nplugin = \"{plugins}/libfdt_echo.so\"\n\
         [app.slow]\nplugin = \"{plugins}/libfdt_echo.so\"\ndelay_ms = 1\n",
    );
    let (echo, slow) = (backends.bound(0), backends.bound(1));
    let proxies = format!(
        "[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"proxy\"\nbacklog = 1024\n\
         [app.proxy]\nplugin = \"{{plugins}}/libfdt_proxy.so\"\nroutes = {{ echo = \"{echo}\", slow = \"{slow}\" }}\n"
    );
    let server = Server::start_apps(2, 2, "", &proxies);
    let proxy = server.addr;
    let each = Duration::from_secs(seconds);
    println!(
        "proxy round trip, {clients} clients, proxy and backend 2 workers × 2 threads each, {seconds} s per run, 3 rounds:"
    );
    let loads = [
        ("closed", echo, "echo", Duration::ZERO),
        ("paced 5 ms", echo, "echo", Duration::from_millis(5)),
        ("closed, 1 ms backend", slow, "slow", Duration::ZERO),
    ];
    for (load, backend, route, pace) in loads {
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            direct.extend(run(backend, None, clients, each, pace));
            proxied.extend(run(proxy, Some(route), clients, each, pace));
        }
        let per_s = |v: &Vec<Duration>| v.len() as f64 / (3 * seconds) as f64;
        let (d_n, p_n) = (per_s(&direct), per_s(&proxied));
        let (d50, d99) = p50_p99(direct);
        let (p50, p99) = p50_p99(proxied);
        println!(
            "  {load:>20}: direct p50 {d50:.3} ms p99 {d99:.3} ms ({d_n:.0}/s) | proxied p50 {p50:.3} ms \
             p99 {p99:.3} ms ({p_n:.0}/s) | ratio p50 {:.2} p99 {:.2}",
            p50 / d50,
            p99 / d99
        );
    }
}
