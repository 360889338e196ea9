//! What an operator sees: draining generations in `/status` and `/metrics` (how many, since
//! when, connections left) and drain durations once they are done.

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_draining_generation_shows_its_age_and_connections_left_and_its_drain_time_is_recorded() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", ""));
    let addr = server.addr("kit");
    let mut conversation = LineClient::connect(addr);
    assert_eq!(conversation.ask("BUSY"), "BUSY");
    assert_eq!(server.reload().0, 200);

    let v = wait_for(READY_TIMEOUT, "the old generation's connection count in its heartbeat", || {
        let v = server.status();
        (v["draining"]["connections"] == 1).then_some(v)
    });
    assert_eq!(v["draining"]["generations"], 1, "{v}");
    assert!(v["draining"]["oldest_since_secs"].as_f64().unwrap() >= 0.0, "{v}");
    let old: &Value = v["generations"].as_array().unwrap().iter().find(|g| g["id"] == 1).unwrap();
    assert_eq!(old["state"], "draining", "{v}");
    assert_eq!(old["connections"], 1, "{v}");
    assert!(old["draining_since_secs"].as_f64().is_some(), "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert_eq!(metric(&metrics, "fdtserver_generations_draining"), 1.0);
    assert_eq!(metric(&metrics, "fdtserver_draining_connections"), 1.0);
    assert_eq!(metric(&metrics, "fdtserver_drain_duration_seconds_count"), 0.0);

    // The conversation ends; the old generation drains and its drain time is counted.
    assert_eq!(conversation.ask("IDLE"), "IDLE");
    let v = wait_for(READY_TIMEOUT, "the old generation to finish draining", || {
        let v = server.status();
        (v["draining"]["generations"] == 0).then_some(v)
    });
    assert_eq!(v["drains"]["count"], 1, "{v}");
    let drained_ms = v["last_drain_ms"].as_u64().unwrap();
    assert_eq!(v["drains"]["total_ms"].as_u64().unwrap(), drained_ms, "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert_eq!(metric(&metrics, "fdtserver_drain_duration_seconds_count"), 1.0);
    let sum = metric(&metrics, "fdtserver_drain_duration_seconds_sum");
    assert!((sum - drained_ms as f64 / 1000.0).abs() < 0.002, "{sum} vs {drained_ms} ms");
    assert_eq!(metric(&metrics, "fdtserver_generations_draining"), 0.0);
}

/// Every sample line of a Prometheus text exposition: (name with labels, value). Panics on a
/// line that is neither a sample nor a `# HELP`/`# TYPE` comment.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            if l.starts_with("# HELP fdtserver_") || l.starts_with("# TYPE fdtserver_") {
                return None;
            }
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            assert!(name.starts_with("fdtserver_"), "not a sample: {l:?}");
            if let Some((_, labels)) = name.split_once('{') {
                assert!(labels.ends_with('}'), "bad labels: {l:?}");
            }
            Some((name.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value: {l:?}"))))
        })
        .collect()
}

fn sum(samples: &[(String, f64)], name: &str) -> f64 {
    samples.iter().filter(|(n, _)| n == name || n.starts_with(&format!("{name}{{"))).map(|(_, v)| v).sum()
}

#[test]
fn status_and_metrics_count_a_known_amount_of_traffic() {
    let server = TestServer::start(&Setup::new(2, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    for _ in 0..10 {
        let mut c = HttpClient::connect(addr).unwrap();
        for _ in 0..3 {
            assert_eq!(c.get("/").unwrap().status, 200);
        }
    }
    // The counters come with each worker's next heartbeat.
    let total = |v: &Value, key: &str| -> u64 {
        v["workers"].as_array().unwrap().iter().map(|w| w[key].as_u64().unwrap()).sum()
    };
    let v = wait_for(READY_TIMEOUT, "the heartbeats to report the traffic", || {
        let v = server.status();
        (total(&v, "requests") == 30 && total(&v, "connections") == 0).then_some(v)
    });
    assert_eq!(total(&v, "accepted"), 10, "{v}");
    assert_eq!(total(&v, "panics"), 0, "{v}");

    let (code, text) = server.control("GET", "/metrics").unwrap();
    assert_eq!(code, 200);
    let s = samples(&text);
    assert_eq!(sum(&s, "fdtserver_requests_total"), 30.0, "{text}");
    assert_eq!(sum(&s, "fdtserver_connections_accepted_total"), 10.0, "{text}");
    assert_eq!(sum(&s, "fdtserver_connections_open"), 0.0, "{text}");
    assert_eq!(sum(&s, "fdtserver_workers"), 2.0, "{text}");
    assert_eq!(sum(&s, "fdtserver_generation"), 1.0, "{text}");
    assert_eq!(sum(&s, "fdtserver_worker_kills_total"), 0.0, "{text}");

    // The CLI shows the same numbers.
    let (code, out, err) = server.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let cli: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(total(&cli, "requests"), 30);
    let (code, table, _) = server.cli(&["status"]);
    assert_eq!(code, 0);
    for pid in server.worker_pids() {
        assert!(table.contains(&pid.to_string()), "{table}");
    }
    assert!(table.contains("workers killed: 0 hung"), "{table}");
}

#[test]
fn the_control_api_answers_bad_requests_with_4xx_and_its_socket_is_private() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let mode = std::fs::metadata(server.control_socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    let raw = |request: &[u8]| -> u16 {
        let mut s = std::os::unix::net::UnixStream::connect(server.control_socket()).unwrap();
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(raw(b"DELETE /reload HTTP/1.1\r\nHost: x\r\n\r\n"), 405);
    assert_eq!(raw(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"), 404);
    assert_eq!(raw(b"\x01\x02 garbage\r\n\r\n"), 400);
    let (code, page) = server.control("GET", "/").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("<html") && page.contains("refresh") && page.contains(&server.pid.to_string()), "{page}");
    assert_eq!(server.status()["pid"], server.pid);
}

#[test]
fn a_second_server_on_the_same_pidfile_is_refused_and_the_pidfile_goes_at_exit() {
    let pid_dir = tempfile::tempdir().unwrap();
    let pidfile = pid_dir.path().join("fdt.pid");
    let setup = Setup::new(1, 1).app("echo", "echo", "").server("pidfile", &format!("\"{}\"", pidfile.display()));
    let mut first = TestServer::start(&setup);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap().trim(), first.pid.to_string());
    let mut second = TestServer::spawn(&setup);
    assert_eq!(second.wait_exit(READY_TIMEOUT).code(), Some(1));
    assert!(
        second.log().contains(&format!("another fdtserver (pid {}) is running with pidfile", first.pid)),
        "{}",
        second.log()
    );
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_exit(READY_TIMEOUT).success());
    assert!(!pidfile.exists(), "the pidfile is left behind");
}

#[test]
fn operator_signals_sent_to_every_process_leave_the_workers_serving() {
    // `systemctl kill -s SIG` and `pkill -SIG fdtserver` reach the workers too.
    let server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let worker = server.worker_pids()[0];
    for sig in [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGTTIN, Signal::SIGTTOU, Signal::SIGWINCH] {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), sig).unwrap();
    }
    let mut c = LineClient::connect(server.addr("echo"));
    assert_eq!(c.ask("still here"), "still here");
    assert!(alive(worker));
    assert_eq!(server.worker_pids(), vec![worker]);
    let state = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap();
    assert!(!state.rsplit_once(") ").unwrap().1.starts_with('T'), "the worker was stopped: {state}");
}

/// Sends `request` on a fresh control connection, then closes the sending side; returns the
/// status code of the answer (`None`: closed without an answer).
fn control_raw(server: &TestServer, request: &[u8]) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(server.control_socket()).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_control_request_with_a_missing_oversized_or_malformed_body_is_refused_and_not_executed() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let generation = server.generation();
    let started = std::time::Instant::now();
    // Declares a body it never sends: refused at once, not after a timeout.
    assert_eq!(
        control_raw(&server, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"),
        Some(413)
    );
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    // A body cut short.
    assert_eq!(control_raw(&server, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"), Some(400));
    assert_eq!(control_raw(&server, b"POST /stop HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"), Some(400));
    // Malformed lengths (RFC 9112: only digits, one value) and bodies the API cannot frame.
    for bad in [
        "Content-Length: +5\r\n",
        "Content-Length: five\r\n",
        "Content-Length: 1\r\nContent-Length: 2\r\n",
        "Transfer-Encoding: chunked\r\n",
    ] {
        let request = format!("POST /reload HTTP/1.1\r\nHost: x\r\n{bad}\r\n0\r\n\r\n");
        assert_eq!(control_raw(&server, request.as_bytes()), Some(400), "{bad:?}");
    }
    // None of them ran: no reload, no stop.
    let v = server.status();
    assert_eq!(v["generation"].as_u64(), Some(generation), "{v}");
    assert_eq!((v["reloads"]["ok"].as_u64(), v["reloads"]["failed"].as_u64()), (Some(0), Some(0)), "{v}");
    server.assert_running();
    // A small body that arrives whole is fine (ignored: the API takes none).
    assert_eq!(control_raw(&server, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"), Some(200));
    assert_eq!(server.generation(), generation + 1);
}

#[test]
fn silent_control_clients_are_capped_at_64_the_rest_get_503_and_a_bounded_log_and_all_close_after_10_s() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    // 64 clients that connect and say nothing.
    let silent: Vec<UnixStream> = (0..64).map(|_| UnixStream::connect(server.control_socket()).unwrap()).collect();
    let connected = std::time::Instant::now();
    let refused = |extra: &mut UnixStream| -> bool {
        extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        let _ = extra.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.1 503 ")
    };
    // Wait until the master has taken them all: one more is then answered 503 and closed.
    wait_for(READY_TIMEOUT, "a 65th control client to be refused with 503", || {
        let mut extra = UnixStream::connect(server.control_socket()).ok()?;
        refused(&mut extra).then_some(())
    });
    // A flood of refused clients costs a few log lines, not one per client.
    let flood = std::time::Instant::now();
    for i in 0..300 {
        let mut extra = UnixStream::connect(server.control_socket()).unwrap();
        assert!(refused(&mut extra), "client {i} of the flood was not answered 503");
    }
    let secs = flood.elapsed().as_secs();
    let warnings = server.log().matches("64 connections open already").count() as u64;
    assert!(warnings >= 1 && warnings <= secs + 2, "{warnings} warnings for 301 refused clients in {secs} s");
    // The silent ones are closed after the 10 s request timeout, and the API answers again.
    let mut first = silent.into_iter().next().unwrap();
    first.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(first.read(&mut buf), Ok(0)), "a silent control client was not closed");
    // Accepted a moment after `connected`: closed at about 10 s from then, not earlier.
    let waited = connected.elapsed();
    assert!(waited > Duration::from_secs(9) && waited < Duration::from_secs(13), "closed after {waited:?}");
    assert_eq!(server.status()["pid"], server.pid);
    let log = server.log();
    assert!(log.contains("more refused since"), "the suppressed refusals are not counted in the log:\n{log}");
    let mut c = LineClient::connect(server.addr("echo"));
    assert_eq!(c.ask("still serving"), "still serving");
}
