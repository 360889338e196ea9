//! The event bus within one server: events/s emitted in one worker and delivered to a
//! subscription in another, and the latency from emit to delivery. One server, `workers = 2`,
//! `threads = 2`, the testkit app with `bench_events = true` (it subscribes to `bench.*` in
//! every worker); a connection to each worker drives it (`EMIT`, `RECEIVED`).
//!
//! Across servers: a throw-away PostgreSQL cluster (as the tests start one; skipped, saying so,
//! where PostgreSQL is not installed) and two such servers with `[events] database` on it; the
//! latency from an emit in one server to the delivery in the other.
//!
//! `cargo build --release --workspace && cargo bench --bench events` (`EVENTS=N` for the burst).

mod common;
#[path = "../tests/util/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::Server;

/// What `pg` waits with (as in the tests).
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server of the testkit app with `bench_events`, and `extra` config (TOML).
fn kit_server(workers: usize, server_toml: &str, extra: &str) -> Server {
    Server::start_apps(
        workers,
        2,
        server_toml,
        &format!(
            "[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"kit\"\n\
             [app.kit]\nplugin = \"{{plugins}}/libfdt_testkit.so\"\nbench_events = true\n{extra}"
        ),
    )
}

struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Client { reader: BufReader::new(s) }
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.reader.get_mut(), "{line}").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    }

    /// (count, p50 µs, p99 µs) received by this client's worker since the last call.
    fn received(&mut self) -> (u64, u64, u64) {
        let answer = self.ask("RECEIVED");
        let v: Vec<u64> = answer.split(' ').map(|w| w.parse().unwrap()).collect();
        (v[0], v[1], v[2])
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = std::env::var("EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000);
    let server = kit_server(2, "", "");
    // One connection to each worker.
    let (mut a, mut b) = loop {
        let mut clients: Vec<(String, Client)> = (0..8)
            .map(|_| {
                let mut c = Client::connect(server.addr);
                (c.ask("PID"), c)
            })
            .collect();
        let first = clients[0].0.clone();
        if let Some(i) = clients.iter().position(|(pid, _)| *pid != first) {
            let b = clients.swap_remove(i).1;
            break (clients.swap_remove(0).1, b);
        }
    };
    a.ask("EMIT 1000");
    std::thread::sleep(Duration::from_millis(300));
    a.received();
    b.received();

    // Throughput: a burst from one worker, counted as it arrives in the other.
    let began = Instant::now();
    let emitted = a.ask(&format!("EMIT {n}"));
    let emit_time = began.elapsed();
    let mut got = 0;
    let mut last_progress = Instant::now();
    let mut done_at = began.elapsed();
    while got < n && last_progress.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        let (count, _, _) = b.received();
        if count > 0 {
            got += count;
            last_progress = Instant::now();
            done_at = began.elapsed();
        }
    }
    let metrics = common::control_text(&server.dir.join("control.sock"), "/metrics").unwrap_or_default();
    let dropped: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("fdtserver_events_total{kind=\"dropped\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    println!("event bus, 2 workers × 2 threads, 64-byte events:");
    println!(
        "  burst of {n} from one worker ({emitted}, emitted in {:.3} s = {:.0}/s): the other worker received {got} in {:.3} s = {:.0} events/s; dropped (both workers' subscriptions) {dropped}",
        emit_time.as_secs_f64(),
        n as f64 / emit_time.as_secs_f64(),
        done_at.as_secs_f64(),
        got as f64 / done_at.as_secs_f64()
    );
    a.received();

    // Latency at a steady 10,000 events/s.
    a.ask("EMIT 20000 100");
    std::thread::sleep(Duration::from_millis(300));
    let (count, p50, p99) = b.received();
    println!("  20,000 at 10,000/s: the other worker received {count}; emit → delivery p50 {p50} µs, p99 {p99} µs");

    // Across two servers through PostgreSQL.
    if std::process::Command::new("sh")
        .args(["-c", "command -v initdb || ls /usr/lib/postgresql/*/bin/initdb"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        println!("  across servers: skipped (PostgreSQL is not installed here; .ci/run installs it)");
        return;
    }
    drop((a, b, server));
    let cluster = pg::PgCluster::start();
    cluster.create_db("main");
    let db = format!("[database.main]\nurl = \"{}\"\n[events]\ndatabase = \"main\"\n", cluster.url("main"));
    let one = kit_server(1, "node_id = \"one\"", &db);
    let two = kit_server(1, "node_id = \"two\"", &db);
    wait_for(Duration::from_secs(20), "both workers listening", || {
        let rows = cluster
            .client("main")
            .query("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN fdt_events'", &[])
            .unwrap();
        (rows[0].get::<_, i64>(0) >= 2).then_some(())
    });
    let (mut a, mut b) = (Client::connect(one.addr), Client::connect(two.addr));
    a.ask("EMIT 100");
    std::thread::sleep(Duration::from_millis(300));
    b.received();
    a.ask("EMIT 5000 1000");
    std::thread::sleep(Duration::from_millis(500));
    let (count, p50, p99) = b.received();
    println!(
        "  across two servers (NOTIFY/LISTEN, PostgreSQL on this machine), 5,000 at 1,000/s: the other server received {count}; emit → delivery p50 {p50} µs, p99 {p99} µs"
    );
}
