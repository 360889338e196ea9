//! App timers (`fdt_sdk::Conn::set_timer` / `App::on_timer`): the worker calls the app when a
//! connection's peer has been quiet for the timer's length, with the partial request it holds,
//! and input restarts the countdown. A plugin built for ABI 1.0 (no timers) still loads and
//! serves.
//!
//! App timers (`fdt_sdk::Timers`): callbacks run after a delay or every interval by the worker's
//! clock thread, never overlapping with themselves, cancellable, dropped when the app stops.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use util::*;

fn testkit_server() -> TestServer {
    TestServer::start(&Setup::new(1, 2).app("testkit", "testkit", ""))
}

#[test]
fn timer_calls_the_app_after_quiet_and_it_may_close_the_connection() {
    let server = testkit_server();
    let mut client = LineClient::connect(server.addr("testkit"));
    let started = Instant::now();
    assert_eq!(client.ask("TIMEOUT 300"), "TIMER");
    assert_eq!(client.recv().as_deref(), Some("TIMED OUT"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "fired after {waited:?}, before the timer ran out");
    assert!(waited < Duration::from_secs(3), "fired only after {waited:?}");
    assert!(client.closed_by_peer(), "the app said Close after its last line");
}

#[test]
fn timer_repeats_keeps_the_partial_request_and_can_be_removed() {
    let server = testkit_server();
    let mut client = LineClient::connect(server.addr("testkit"));
    assert_eq!(client.ask("TIMER 200"), "TIMER");
    // A partial line waits in the worker's buffer; the timer sees it.
    client.stream().write_all(b"PI").unwrap();
    assert_eq!(client.recv().as_deref(), Some("TICK 1 2"));
    assert_eq!(client.recv().as_deref(), Some("TICK 2 2"));
    // The rest of the line completes the request; the connection is still served.
    client.send("D");
    let answer = recv_skipping_ticks(&mut client);
    assert!(answer.parse::<u32>().is_ok(), "PID expected, got {answer:?}");
    client.send("TIMER 0");
    assert_eq!(recv_skipping_ticks(&mut client), "TIMER");
    // No timer any more: nothing comes.
    client.stream().set_read_timeout(Some(Duration::from_millis(600))).unwrap();
    assert!(!client.closed_by_peer(), "the connection stays open without a timer");
}

#[test]
fn input_restarts_the_countdown() {
    let server = testkit_server();
    let mut client = LineClient::connect(server.addr("testkit"));
    assert_eq!(client.ask("TIMEOUT 700"), "TIMER");
    // Talk every 200 ms for 1.4 s: twice the timer, never quiet for its length.
    let until = Instant::now() + Duration::from_millis(1400);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(client.ask("ping"), "ping", "a connection in use must not time out");
    }
    let quiet_from = Instant::now();
    assert_eq!(client.recv().as_deref(), Some("TIMED OUT"));
    assert!(quiet_from.elapsed() >= Duration::from_millis(500));
}

#[test]
fn many_timed_connections_fire_independently() {
    let server = testkit_server();
    let mut clients: Vec<LineClient> = (0..50).map(|_| LineClient::connect(server.addr("testkit"))).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        // Half close on their timer, half keep ticking.
        let cmd = if i % 2 == 0 { "TIMEOUT 200" } else { "TIMER 200" };
        assert_eq!(c.ask(cmd), "TIMER");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 2 == 0 {
            assert_eq!(c.recv().as_deref(), Some("TIMED OUT"));
            assert!(c.closed_by_peer());
        } else {
            assert_eq!(c.recv().as_deref(), Some("TICK 1 0"));
        }
    }
    // The workers report every half second: wait for a report made after the timers fired.
    wait_for(READY_TIMEOUT, "25 connections open in the status", || {
        let status = server.status();
        let open: u64 =
            status["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap_or(0)).sum();
        (open == 25).then_some(())
    });
    for c in clients.iter_mut().skip(1).step_by(2) {
        c.send("still open");
        assert_eq!(recv_skipping_ticks(c), "still open");
    }
}

/// The next line that is not a `TICK` (ticks keep coming while a client is quiet).
fn recv_skipping_ticks(client: &mut LineClient) -> String {
    loop {
        let line = client.recv().expect("the connection stays open");
        if !line.starts_with("TICK") {
            return line;
        }
    }
}

/// An echo app in C whose descriptor ends at `conn_close`, as every plugin built for ABI 1.0
/// does: the host must neither refuse it nor read past its end.
const ABI_1_0_ECHO: &str = r#"
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
typedef struct { const unsigned char *ptr; size_t len; } StrRef;
typedef void (*MessageFn)(void *ctx, StrRef msg);
typedef struct {
    uint32_t size, flags; const unsigned char *input; size_t input_len;
    size_t consumed; uint64_t requests;
    void (*write)(void *ctx, StrRef bytes); void *write_ctx;
    MessageFn error; void *error_ctx;
} ConnIo;
static int start(const void *host, void **app_out, MessageFn error, void *ctx) {
    static int app; *app_out = &app; return 0;
}
static void stop(void *app) {}
static void *conn_open(void *app, const void *info) { return malloc(1); }
static int conn_data(void *app, void *conn, ConnIo *io) {
    size_t end = 0;
    for (size_t i = 0; i < io->input_len; i++) if (io->input[i] == '\n') end = i + 1;
    if (end) { StrRef out = { io->input, end }; io->write(io->write_ctx, out); io->requests = 1; }
    io->consumed = end;
    return 0;
}
static void conn_close(void *app, void *conn) { free(conn); }
struct Descriptor {
    unsigned char magic[8]; uint32_t abi_major, abi_minor, size;
    StrRef sdk_version, rustc_version, target, app_type;
    void *start, *stop, *conn_open, *conn_data, *conn_close;
};
__attribute__((visibility("default"))) const struct Descriptor FDT_APP_DESCRIPTOR_V1 = {
    { 'F', 'D', 'T', 'A', 'P', 'P', 0, 1 }, 1, 0, sizeof(struct Descriptor),
    { (const unsigned char *)"0.0.1", 5 }, { (const unsigned char *)"gcc", 3 },
    { (const unsigned char *)TARGET, sizeof(TARGET) - 1 }, { (const unsigned char *)"CEcho", 5 },
    (void *)start, (void *)stop, (void *)conn_open, (void *)conn_data, (void *)conn_close,
};
"#;

#[test]
fn a_plugin_built_for_abi_1_0_still_loads_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let source = format!("#define TARGET \"{}\"\n{ABI_1_0_ECHO}", fdt_sdk::abi::TARGET);
    let so = gcc_shared(dir.path(), "libcecho.so", &source);
    let server = TestServer::start(&Setup::new(1, 2).app_at("cecho", &so, "", "127.0.0.1:0"));
    let mut client = LineClient::connect(server.addr("cecho"));
    assert_eq!(client.ask("old plugins still work"), "old plugins still work");
    let mut stream = client.stream().try_clone().unwrap();
    stream.write_all(b"two\nlines\n").unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 10 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"two\nlines\n");
    // It has no drain callback (ABI 1.2): a reload's drain still closes its idle connection.
    assert_eq!(server.reload().0, 200);
    assert!(client.closed_by_peer(), "the old worker's drain closes the idle connection");
}

#[test]
fn a_panic_in_on_timer_closes_only_that_connection() {
    let server = testkit_server();
    let worker = server.worker_pids()[0];
    let mut other = LineClient::connect(server.addr("testkit"));
    assert_eq!(other.ask("PID"), worker.to_string());
    let mut doomed = LineClient::connect(server.addr("testkit"));
    assert_eq!(doomed.ask("TIMER_PANIC 200"), "TIMER");
    assert!(doomed.closed_by_peer(), "the connection whose app panicked is closed");
    assert_eq!(other.ask("PID"), worker.to_string(), "the worker and its other connections go on");
    wait_for(READY_TIMEOUT, "the panic in the log and the metrics", || {
        let (_, metrics) = server.control("GET", "/metrics")?;
        let counted = metrics.lines().any(|l| l.starts_with("fdtserver_handler_panics_total{") && l.ends_with(" 1"));
        (counted && server.log().contains("testkit was told to panic on its timer")).then_some(())
    });
}

/// `RUNS` of testkit: (runs, overlaps) of its command-started app timers.
fn runs(client: &mut LineClient) -> (u64, u64) {
    let answer = client.ask("RUNS");
    let mut words = answer.split_whitespace().map(|w| w.parse::<u64>().unwrap());
    (words.next().unwrap(), words.next().unwrap())
}

#[test]
fn an_app_timer_runs_every_interval_until_cancelled() {
    let server = testkit_server();
    let mut client = LineClient::connect(server.addr("testkit"));
    let started = Instant::now();
    assert_eq!(client.ask("EVERY 100"), "STARTED");
    wait_for(Duration::from_secs(5), "five runs of a 100 ms timer", || (runs(&mut client).0 >= 5).then_some(()));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(500), "five runs of a 100 ms timer came after only {took:?}");
    assert_eq!(client.ask("CANCEL"), "CANCELLED");
    let after_cancel = runs(&mut client).0;
    std::thread::sleep(Duration::from_millis(400));
    assert!(runs(&mut client).0 <= after_cancel + 1, "a cancelled timer ran on (a run in progress may finish)");
}

#[test]
fn an_app_timer_never_overlaps_with_itself_and_a_one_shot_runs_once() {
    let server = testkit_server();
    let mut client = LineClient::connect(server.addr("testkit"));
    // Due every 10 ms, each run takes 50 ms: runs are skipped, never run side by side.
    assert_eq!(client.ask("EVERY 10 50"), "STARTED");
    std::thread::sleep(Duration::from_millis(1000));
    let (n, overlaps) = runs(&mut client);
    assert_eq!(overlaps, 0, "runs of one timer overlapped");
    assert!((5..=21).contains(&n), "{n} runs of 50 ms in one second");
    assert_eq!(client.ask("CANCEL"), "CANCELLED");
    // A run in progress at the cancel finishes (50 ms); then the count holds still.
    let mut before = runs(&mut client).0;
    wait_for(Duration::from_secs(3), "the cancelled timer's last run", || {
        std::thread::sleep(Duration::from_millis(100));
        let now = runs(&mut client).0;
        std::mem::replace(&mut before, now).eq(&now).then_some(())
    });
    assert_eq!(client.ask("AFTER 200"), "STARTED");
    wait_for(Duration::from_secs(3), "the one-shot timer", || (runs(&mut client).0 > before).then_some(()));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(runs(&mut client).0, before + 1, "a one-shot timer runs once");
}

#[test]
fn a_panicking_app_timer_is_counted_and_keeps_running_and_the_worker_serves() {
    let server = testkit_server();
    let pid = server.worker_pids()[0];
    let mut client = LineClient::connect(server.addr("testkit"));
    assert_eq!(client.ask("EVERY_PANIC 100"), "STARTED");
    wait_for(Duration::from_secs(5), "three panicking runs", || (runs(&mut client).0 >= 3).then_some(()));
    assert_eq!(client.ask("PID"), pid.to_string(), "the worker lives on");
    let panics = wait_for(Duration::from_secs(5), "the panics in the metrics", || {
        let (_, metrics) = server.control("GET", "/metrics")?;
        let line = metrics.lines().find(|l| l.starts_with("fdtserver_handler_panics_total"))?.to_string();
        let n: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (n >= 2.0).then_some(n)
    });
    assert!(panics >= 2.0);
    assert!(server.log().contains("a timer's callback panicked"), "{}", server.log());
    assert!(server.log().contains("testkit was told to panic in a timer"), "the panic's message is logged");
}

#[test]
fn app_timers_end_when_the_app_stops_and_their_callbacks_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let settings = format!("tick_file = \"{}\"", file.display());
    let server = TestServer::start(&Setup::new(1, 2).app("testkit", "testkit", &settings));
    let old = server.worker_pids()[0];
    let ticks_of = |pid: i32| {
        std::fs::read_to_string(&file).unwrap_or_default().lines().filter(|l| *l == format!("TICK {pid}")).count()
    };
    wait_for(Duration::from_secs(5), "the tick timer to run", || (ticks_of(old) >= 2).then_some(()));
    assert_eq!(server.reload().0, 200);
    wait_for(Duration::from_secs(10), "the old worker to exit", || (!alive(old)).then_some(()));
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let dropped = lines.iter().position(|l| *l == format!("DROPPED {old}"));
    let last_tick = lines.iter().rposition(|l| *l == format!("TICK {old}"));
    assert!(dropped.is_some(), "the old app's timer was not dropped:\n{text}");
    assert!(last_tick < dropped, "the old app's timer ticked after it was dropped:\n{text}");
    let new = server.worker_pids()[0];
    wait_for(Duration::from_secs(5), "the new generation's timer", || (ticks_of(new) >= 1).then_some(()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ticks_of(old), text.lines().filter(|l| *l == format!("TICK {old}")).count(), "no tick after exit");
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_due_timer_whose_app_holds_its_whole_share_waits_without_spinning() {
    // Two apps and two handlers: each app may hold one. App `a` is busy in a request, so its
    // due timer waits; the clock must sleep meanwhile, not spin.
    let setup = Setup::new(1, 2).app("a", "testkit", "").app("b", "testkit", "");
    let server = TestServer::start(&setup);
    let pid = server.worker_pids()[0];
    let mut a = LineClient::connect(server.addr("a"));
    assert_eq!(a.ask("EVERY 50"), "STARTED");
    let mut busy = LineClient::connect(server.addr("a"));
    busy.send("SLEEP 2000");
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_secs(pid);
    std::thread::sleep(Duration::from_millis(1500));
    let used = cpu_secs(pid) - before;
    assert!(used < 0.5, "the worker used {used:.2} s of CPU in 1.5 s while a timer waited for its app");
    assert_eq!(busy.recv().as_deref(), Some("SLEPT"));
    wait_for(Duration::from_secs(3), "the timer to run once its app has a handler again", || {
        (runs(&mut a).0 >= 1).then_some(())
    });
}

/// `setup` with `[app.svc]`: testkit appending `TICK <pid>` to `file` every 100 ms, named by no
/// listener.
fn with_service(setup: Setup, file: &std::path::Path) -> Setup {
    setup.app_without_listener("svc", "testkit", &format!("tick_file = \"{}\"", file.display()))
}

/// The pids that wrote `TICK <pid>` to `file`.
fn tickers(file: &std::path::Path) -> std::collections::BTreeSet<i32> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().filter_map(|l| l.strip_prefix("TICK ")?.parse().ok()).collect()
}

#[test]
fn an_app_no_listener_names_is_started_in_every_worker_and_runs_its_timers() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let server = TestServer::start(&with_service(Setup::new(2, 2).app("echo", "echo", ""), &file));
    let workers: std::collections::BTreeSet<i32> = server.worker_pids().into_iter().collect();
    wait_for(Duration::from_secs(5), "both workers' services to tick", || (tickers(&file) == workers).then_some(()));
    assert_eq!(LineClient::connect(server.addr("echo")).ask("still serving"), "still serving");
    let (code, out, err) = server.cli(&["check"]);
    assert_eq!(code, 0, "check starts the service app too: {out}{err}");
    assert!(out.contains("app svc: ok"), "{out}");
}

#[test]
fn a_server_with_no_listener_runs_its_services() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let server = TestServer::start(&with_service(Setup::new(1, 1), &file));
    let worker = server.worker_pids()[0];
    wait_for(Duration::from_secs(5), "the service to tick", || tickers(&file).contains(&worker).then_some(()));
}
