//! Connection limits and timeouts ("Connection limits and timeouts" in the contract), against
//! the real binary: `idle_timeout` closes a quiet connection between requests gently (unless its
//! app lifted it), `read_timeout` ends a request that never arrives in full (`hello` answers
//! `408` first) and so defeats a slowloris, `send_timeout` ends a connection whose peer takes no
//! output, `max_connections` (server level and per `[[listen]]`) makes acceptors wait with the
//! kernel's backlog holding new clients, and bad values are refused with FILE:LINE. Each limit
//! that acts shows in `/metrics` (`fdtserver_connections_closed_total{reason}`).

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::*;

/// `fdtserver_connections_closed_total{reason="REASON"}` in `/metrics`; `None` while the
/// control socket does not answer.
fn closed_total(server: &TestServer, reason: &str) -> Option<u64> {
    let (code, body) = server.control("GET", "/metrics")?;
    assert_eq!(code, 200, "{body}");
    let prefix = format!("fdtserver_connections_closed_total{{reason=\"{reason}\"}} ");
    let line = body.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix}in {body}"));
    Some(line.trim().parse::<f64>().unwrap() as u64)
}

/// Waits (up to `within`) until `closed_total(reason)` is at least `n`.
fn wait_closed_total(server: &TestServer, reason: &str, n: u64, within: Duration) {
    wait_for(within, &format!("connections_closed_total{{reason=\"{reason}\"}} >= {n}"), || {
        closed_total(server, reason).filter(|&v| v >= n)
    });
}

/// How a connection ended, as its client saw it.
#[derive(Debug, PartialEq)]
enum End {
    /// EOF after these bytes (a gentle close: the server's FIN).
    Eof(Vec<u8>),
    /// A reset (or another read error) after these bytes.
    Reset(Vec<u8>, String),
    /// Neither within the time given; these bytes came.
    Open(Vec<u8>),
}

/// Reads until the peer ends the connection or `within` has passed; keeps at most `keep`
/// bytes of what came (the rest is counted in the second value).
fn read_until_end(stream: &mut TcpStream, within: Duration, keep: usize) -> (End, u64, Instant) {
    let deadline = Instant::now() + within;
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (End::Open(kept), total, Instant::now());
        }
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (End::Eof(kept), total, Instant::now()),
            Ok(n) => {
                total += n as u64;
                let room = keep.saturating_sub(kept.len()).min(n);
                kept.extend_from_slice(&buf[..room]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (End::Reset(kept, e.to_string()), total, Instant::now()),
        }
    }
}

/// True when nothing comes on `stream` for `quiet` (and the connection stays open).
fn nothing_comes(stream: &mut TcpStream, quiet: Duration) -> bool {
    stream.set_read_timeout(Some(quiet.max(Duration::from_millis(1)))).unwrap();
    let mut buf = [0u8; 256];
    let quiet = match stream.read(&mut buf) {
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        Ok(_) => false,
    };
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    quiet
}

fn access_log(server: &TestServer) -> String {
    std::fs::read_to_string(server.dir.path().join("access.log")).unwrap_or_default()
}

#[test]
fn idle_timeout_closes_an_idle_connection_gently_and_counts_and_logs_it() {
    let setup =
        Setup::new(1, 2).app("kit", "testkit", "").server("idle_timeout", "1").server("access_log", "\"access.log\"");
    let server = TestServer::start(&setup);
    let mut client = LineClient::connect(server.addr("kit"));
    let peer = client.stream().local_addr().unwrap().to_string();
    assert!(client.ask("PID").parse::<i32>().is_ok());
    let quiet_from = Instant::now();
    let (end, _, at) = read_until_end(client.stream(), Duration::from_secs(5), 1024);
    let after = at - quiet_from;
    assert_eq!(end, End::Eof(Vec::new()), "the idle connection must end with the server's FIN, not a reset");
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before idle_timeout (1 s) ran out");
    assert!(after <= Duration::from_millis(2500), "closed only after {after:?}: idle_timeout is 1 s");
    // The client's FIN ends the server's lingering close: then it counts and logs.
    drop(client);
    wait_closed_total(&server, "idle_timeout", 1, Duration::from_secs(5));
    let line = wait_for(Duration::from_secs(5), "the connection's access line", || {
        access_log(&server).lines().find(|l| l.contains(&format!("peer={peer} "))).map(str::to_string)
    });
    assert!(line.contains(" close=idle_timeout"), "{line}");
    assert!(line.contains(" requests=1 "), "{line}");
}

#[test]
fn a_connection_that_sends_requests_more_often_than_idle_timeout_stays_open() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("idle_timeout", "1"));
    let mut client = LineClient::connect(server.addr("kit"));
    // Talk every 400 ms for 3 s: three times idle_timeout, never quiet for its length.
    let until = Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(400));
        n += 1;
        assert_eq!(client.ask(&format!("ping {n}")), format!("ping {n}"), "a connection in use must stay open");
    }
    assert_eq!(closed_total(&server, "idle_timeout"), Some(0));
    // Left quiet, the same connection is closed.
    assert!(client.closed_by_peer(), "a quiet connection is closed by idle_timeout");
}

#[test]
fn an_app_can_lift_idle_timeout_for_its_connection() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("idle_timeout", "1"));
    let addr = server.addr("kit");
    let mut lifted = LineClient::connect(addr);
    let mut plain = LineClient::connect(addr);
    assert_eq!(lifted.ask("LIFT"), "LIFTED");
    assert!(plain.ask("PID").parse::<i32>().is_ok());
    let started = Instant::now();
    // Quiet for three times idle_timeout: the plain connection is closed meanwhile...
    let (end, _, _) = read_until_end(plain.stream(), Duration::from_secs(3), 1024);
    assert_eq!(end, End::Eof(Vec::new()), "the connection that did not lift idle_timeout is closed");
    let left = Duration::from_secs(3).saturating_sub(started.elapsed());
    // ...and the lifted one is not,
    assert!(nothing_comes(lifted.stream(), left), "the lifted connection must stay open and quiet");
    assert!(started.elapsed() >= Duration::from_secs(3));
    // and it still answers.
    assert!(lifted.ask("PID").parse::<i32>().is_ok());
}

#[test]
fn read_timeout_answers_a_partial_request_with_408_then_closes_gently() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("read_timeout", "1"));
    let mut stream = TcpStream::connect(server.addr("hello")).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let sent = Instant::now();
    let (end, _, at) = read_until_end(&mut stream, Duration::from_secs(5), 4096);
    let after = at - sent;
    let End::Eof(answer) = end else { panic!("the connection must end with the server's FIN: {end:?}") };
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
    assert!(after >= Duration::from_millis(900), "closed after {after:?}, before read_timeout (1 s) ran out");
    assert!(after <= Duration::from_millis(2500), "closed only after {after:?}: read_timeout is 1 s");
    drop(stream);
    wait_closed_total(&server, "read_timeout", 1, Duration::from_secs(5));
}

#[test]
fn read_timeout_closes_50_slowloris_connections_while_normal_requests_are_answered_quickly() {
    const SLOW: usize = 50;
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("read_timeout", "2"));
    let addr = server.addr("hello");
    // Each sends one byte every 400 ms of a request head that never ends.
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            std::thread::spawn(move || -> Result<(Duration, String), String> {
                let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
                let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                let started = Instant::now();
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                for i in 0.. {
                    if started.elapsed() > Duration::from_secs(10) {
                        return Err(format!("still open after 10 s, got {:?}", String::from_utf8_lossy(&got)));
                    }
                    let byte = head.get(i).copied().unwrap_or(b'a');
                    if s.write_all(&[byte]).is_err() {
                        return Ok((started.elapsed(), String::from_utf8_lossy(&got).into_owned()));
                    }
                    match s.read(&mut buf) {
                        Ok(0) => return Ok((started.elapsed(), String::from_utf8_lossy(&got).into_owned())),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return Ok((started.elapsed(), String::from_utf8_lossy(&got).into_owned())),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    // Meanwhile, a normal client's requests, each on a fresh connection, are answered quickly.
    let mut answered = 0;
    let mut slowest = Duration::ZERO;
    while !slow.iter().all(|t| t.is_finished()) {
        let t = Instant::now();
        let response = http_get(addr).expect("a normal request must be answered during the slowloris");
        assert_eq!(response.status, 200);
        slowest = slowest.max(t.elapsed());
        answered += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered >= 5, "only {answered} normal requests were made during the slowloris");
    assert!(slowest < Duration::from_secs(1), "a normal request took {slowest:?} during the slowloris");
    for (i, t) in slow.into_iter().enumerate() {
        let (after, got) = t.join().unwrap().unwrap_or_else(|e| panic!("slow connection {i}: {e}"));
        assert!(
            after >= Duration::from_millis(1800),
            "slow connection {i} closed after {after:?}, read_timeout is 2 s"
        );
        assert!(after <= Duration::from_millis(4500), "slow connection {i} closed only after {after:?}");
        assert!(got.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "slow connection {i} got {got:?}");
    }
    wait_closed_total(&server, "read_timeout", SLOW as u64, Duration::from_secs(5));
}

#[test]
fn send_timeout_closes_a_connection_whose_peer_reads_nothing_and_the_worker_serves_on() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("send_timeout", "1"));
    let addr = server.addr("hello");
    let pid = http_get(addr).unwrap().worker_pid();
    let mut stuck = TcpStream::connect(addr).unwrap();
    stuck.write_all(b"GET /bytes/2000000000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let asked = Instant::now();
    // The client reads nothing: once the socket buffers and the output queue are full, the
    // peer takes none of it for send_timeout.
    wait_closed_total(&server, "send_timeout", 1, Duration::from_secs(8));
    let counted = asked.elapsed();
    assert!(counted <= Duration::from_secs(5), "closed for send_timeout only after {counted:?}: it is 1 s");
    // What was in flight still arrives, then the connection ends: far from the 2 GB asked for.
    let (end, total, _) = read_until_end(&mut stuck, Duration::from_secs(10), 64);
    assert!(!matches!(end, End::Open(_)), "the connection must end after its output drained: {end:?}");
    assert!(total < 1_000_000_000, "{total} bytes came of a body the server had stopped sending");
    // The worker lives on and serves others.
    assert_eq!(server.worker_pids(), vec![pid]);
    let response = http_get(addr).expect("the worker serves on");
    assert_eq!((response.status, response.worker_pid()), (200, pid));
}

#[test]
fn read_timeout_spares_a_request_pipelined_behind_a_download_until_the_download_ends() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("read_timeout", "1"));
    let mut client = TcpStream::connect(server.addr("hello")).unwrap();
    // A 16 MB download with the start of another request behind it, read over about 2 s.
    const N: usize = 16_000_000;
    client.write_all(b"GET /bytes/16000000 HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo").unwrap();
    let mut received = Vec::with_capacity(N + 1024);
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let head_end = loop {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "closed during the download after {} bytes", received.len());
        received.extend_from_slice(&buf[..n]);
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    // Slowly for 1.6 s (the worker keeps producing as it is read), then the rest at once, so
    // that the download ends for the client about when the worker finished producing it.
    while received.len() < head_end + N {
        let slow = started.elapsed() < Duration::from_millis(1600);
        let n = client.read(&mut buf[..if slow { 64 * 1024 } else { 1 << 20 }]).unwrap();
        assert!(n > 0, "closed during the download after {} bytes", received.len() - head_end);
        received.extend_from_slice(&buf[..n]);
        if slow {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let ended = Instant::now();
    assert!(ended - started > Duration::from_millis(1500), "the download was read too fast to test anything");
    assert_eq!(received.len(), head_end + N, "the body, and nothing after it yet");
    // The begun request now waits for its client alone: 408 about read_timeout later.
    let (end, _, at) = read_until_end(&mut client, Duration::from_secs(5), 4096);
    let waited = at - ended;
    let End::Eof(bytes) = end else { panic!("expected a 408 and a gentle close: {end:?}") };
    assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&bytes));
    assert!(waited >= Duration::from_millis(750), "408 came {waited:?} after the download: counted from before it");
}

#[test]
fn idle_timeout_counts_from_the_end_of_a_long_download_not_from_the_request() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("idle_timeout", "1"));
    // A small receive buffer: what the client has not read yet waits on the server's side,
    // where the server can see it (what a client's kernel took is out of any server's sight).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(&server.addr("hello").into()).unwrap();
    let mut client: TcpStream = socket.into();
    client.write_all(b"GET /bytes/3000000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Read it over about 2 s: longer than idle_timeout, and no byte sent meanwhile.
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head_end = None;
    let mut head = Vec::new();
    while head_end.is_none_or(|h| got < h + 3_000_000) {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {got} bytes, {:?} into the download", started.elapsed());
        if head_end.is_none() {
            head.extend_from_slice(&buf[..n]);
            head_end = head.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        got += n;
        std::thread::sleep(Duration::from_millis(15));
    }
    assert!(started.elapsed() > Duration::from_millis(1500), "the download was read too fast to test anything");
    // Quiet for less than idle_timeout after the end: the connection still serves.
    std::thread::sleep(Duration::from_millis(500));
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = client.read(&mut buf).unwrap();
    assert!(n > 0 && buf.starts_with(b"HTTP/1.1 200 OK"), "closed as idle right after its download");
}

#[test]
fn send_timeout_also_ends_a_close_whose_last_answer_the_peer_never_reads() {
    let setup = Setup::new(1, 2).app("kit", "testkit", "").server("send_timeout", "1");
    let server = TestServer::start(&setup);
    let mut stuck = TcpStream::connect(server.addr("kit")).unwrap();
    // 64 MB at once (an app that ignores the output room), then the app closes: the
    // connection is flushing its last answer to a peer that reads none of it.
    stuck.write_all(b"FLOOD 64000000\n").unwrap();
    wait_closed_total(&server, "send_timeout", 1, Duration::from_secs(8));
    let mut client = LineClient::connect(server.addr("kit"));
    assert_eq!(client.ask("PING"), "PING", "the worker serves on");
}

/// Three clients of `addr` where at most two connections are allowed: the third waits until
/// one of the first two closes. `other`, when given, is served meanwhile.
fn third_waits_for_a_free_place(addr: SocketAddr, other: Option<SocketAddr>) {
    let mut first = LineClient::connect(addr);
    let mut second = LineClient::connect(addr);
    let pid = first.ask("PID");
    assert_eq!(second.ask("PID"), pid);
    // The kernel's backlog takes the third: connect succeeds, but nothing answers.
    let mut third = LineClient::connect(addr);
    third.send("PID");
    assert!(nothing_comes(third.stream(), Duration::from_millis(700)), "a third connection was served");
    if let Some(other) = other {
        let t = Instant::now();
        assert_eq!(LineClient::connect(other).ask("PID"), pid, "the other listener is served by the same worker");
        assert!(t.elapsed() < Duration::from_secs(1), "the other listener took {:?}", t.elapsed());
    }
    assert_eq!(second.ask("PID"), pid, "the connections held are served");
    drop(first);
    let closed = Instant::now();
    assert_eq!(third.recv().as_deref(), Some(pid.as_str()), "the waiting client is served once a place is free");
    let waited = closed.elapsed();
    assert!(waited < Duration::from_millis(1500), "the waiting client was served {waited:?} after a place freed");
    assert_eq!(second.ask("PID"), pid);
}

#[test]
fn max_connections_of_the_server_makes_a_third_client_wait_in_the_backlog_until_one_closes() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("max_connections", "2"));
    third_waits_for_a_free_place(server.addr("kit"), None);
}

#[test]
fn max_connections_of_a_listener_makes_its_third_client_wait_while_other_listeners_serve() {
    // `Setup` renders `[[listen]]` without limits: this one is written out.
    let mut setup = Setup::new(1, 2).app("free", "testkit", "");
    setup.apps.push(AppSpec { name: "kit".into(), plugin: plugin("testkit"), settings: String::new() });
    let setup = setup.extra("[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"kit\"\nmax_connections = 2\n");
    let server = TestServer::start(&setup);
    third_waits_for_a_free_place(server.addr("kit"), Some(server.addr("free")));
}

/// A config of one echo app whose `[server]` line 4 is `server_line` and whose `[[listen]]`
/// line 9 is `listen_line`.
fn config(dir: &Path, server_line: &str, listen_line: &str) -> PathBuf {
    echo_config(dir, server_line, listen_line, "")
}

/// `fdtserver check` and the server itself refuse `config`, each saying `wanted`.
fn refused_with(config: &Path, wanted: &[&str]) {
    check_refuses(config, wanted);
    server_refuses(config, wanted);
}

#[test]
fn bad_limits_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    refused_with(&config(dir.path(), "max_output = 10", ""), &["fdt.toml:4: `max_output`", "1024", "got 10"]);
    refused_with(&config(dir.path(), "idle_timeout = -1", ""), &["fdt.toml:4: `idle_timeout`", "got -1"]);
    refused_with(&config(dir.path(), "", "read_timeout = -2"), &["fdt.toml:9: `read_timeout`", "got -2"]);
    refused_with(&config(dir.path(), "", "max_connections = -3"), &["fdt.toml:9: `max_connections`", "got -3"]);
    // Good values pass.
    let (code, out, err) = cli(&["check"], &config(dir.path(), "idle_timeout = 0.5", "max_output = 1024"));
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
}
