//! Start, serve, stop: the shipped apps over real sockets, and the graceful and fast stops.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

#[test]
fn echo_sends_every_line_back_unchanged_after_its_delay() {
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", "delay_ms = 50"));
    let mut c = LineClient::connect(server.addr("echo"));
    let started = Instant::now();
    assert_eq!(c.ask("hello world"), "hello world");
    assert!(started.elapsed() >= Duration::from_millis(50), "the delay was not applied");
    // A line split over two writes is answered once complete.
    c.stream().write_all(b"par").unwrap();
    c.stream().flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.stream().write_all(b"tial\r\n").unwrap();
    assert_eq!(c.recv().unwrap(), "partial\r");
}

#[test]
fn hello_serves_http11_keep_alive_and_http10() {
    let server = TestServer::start(&Setup::new(2, 2).app("hello", "hello", "message = \"Hi!\""));
    let addr = server.addr("hello");
    let mut c = HttpClient::connect(addr).unwrap();
    let workers = server.worker_pids();
    for _ in 0..3 {
        let r = c.get("/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "Hi!"));
        assert!(workers.contains(&r.worker_pid()), "X-Worker-Pid {} is not a worker", r.worker_pid());
        assert!(!r.closes());
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap(); // HTTP/1.0 without keep-alive: the server closes
    assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("Hi!"), "{answer}");
}

#[test]
fn tcp_v6_and_unix_listeners_serve() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("hello.sock");
    let setup = Setup::new(1, 2).app_at("v6", &plugin("echo"), "", "[::1]:0").app_at(
        "unix",
        &plugin("echo"),
        "",
        &format!("unix:{}", unix.display()),
    );
    let server = TestServer::start(&setup);
    let mut c = LineClient::connect(server.addr("v6"));
    assert_eq!(c.ask("over v6"), "over v6");
    let mut u = std::os::unix::net::UnixStream::connect(&unix).unwrap();
    u.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    u.write_all(b"over unix\n").unwrap();
    let mut buf = [0u8; 10];
    u.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"over unix\n");
}

#[test]
fn the_master_stays_single_threaded_and_never_loads_a_plugin() {
    let server = TestServer::start(&Setup::new(2, 3).app("hello", "hello", ""));
    http_get(server.addr("hello")).unwrap();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid)).unwrap().count();
    assert_eq!(tasks, 1, "the master has {tasks} threads");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid)).unwrap();
    assert!(!maps.contains("libfdt_"), "the master mapped a plugin");
    for pid in server.worker_pids() {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(maps.contains("libfdt_hello"), "worker {pid} has not loaded the plugin");
    }
}

#[test]
fn term_lets_a_slow_request_finish_while_new_connections_are_refused() {
    let mut server = TestServer::start(&Setup::new(2, 2).app("kit", "testkit", ""));
    let addr = server.addr("kit");
    let mut slow = LineClient::connect(addr);
    slow.send("SLEEP 1500");
    // Make sure the request is being handled before the stop begins.
    wait_for(READY_TIMEOUT, "the slow request to be in flight", || {
        server.status()["workers"].as_array().unwrap().iter().any(|w| w["connections"] == 1).then_some(())
    });
    server.signal(Signal::SIGTERM);
    wait_for(Duration::from_secs(1), "new connections to be refused", || {
        TcpStream::connect(addr).is_err().then_some(())
    });
    assert_eq!(slow.recv().as_deref(), Some("SLEPT"), "the in-flight request was cut off");
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "master exited with {status}");
    assert!(!server.control_socket().exists(), "the control socket was left behind");
}

#[test]
fn a_second_term_stops_at_once() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("graceful_timeout", "30"));
    let mut busy = LineClient::connect(server.addr("kit"));
    assert_eq!(busy.ask("BUSY"), "BUSY"); // InProgress: a drain would wait for it
    server.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    server.assert_running();
    let asked = Instant::now();
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success());
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(busy.recv(), None, "the connection should have been closed");
}

#[test]
fn quit_stops_fast_even_with_a_request_in_flight() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", ""));
    let mut c = LineClient::connect(server.addr("kit"));
    assert_eq!(c.ask("PID"), server.worker_pids()[0].to_string());
    server.signal(Signal::SIGQUIT);
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success());
}

#[test]
fn stop_command_waits_for_the_master_to_exit() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let (code, out, err) = server.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!alive(server.pid) || server.wait_exit(Duration::from_secs(1)).success());
    let (code, _, err) = server.cli(&["status"]);
    assert_eq!(code, 1);
    assert!(err.contains("no fdtserver is answering"), "{err}");
}

#[test]
fn workers_exit_when_the_master_is_killed() {
    let server = TestServer::start(&Setup::new(2, 1).app("echo", "echo", ""));
    let workers = server.worker_pids();
    server.signal(Signal::SIGKILL);
    wait_for(Duration::from_secs(5), "the orphaned workers to exit", || {
        workers.iter().all(|&p| !alive(p)).then_some(())
    });
}

#[test]
fn a_stop_removes_the_runtime_directory_and_a_killed_masters_is_swept_by_the_next_start() {
    let first = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let tmp = first.tmpdir();
    let own = runtime_dir(&tmp, first.pid).expect("the master's runtime directory");
    assert!(std::fs::read_dir(own.join("plugins")).unwrap().count() > 0, "the plugin is pinned in {own:?}");
    first.signal(Signal::SIGKILL);
    wait_for(Duration::from_secs(5), "the killed master to be gone", || (!alive(first.pid)).then_some(()));
    assert!(own.exists(), "a killed master cannot clean up");

    let mut next = TestServer::start_with(&Setup::new(1, 1).app("echo", "echo", ""), |config| {
        let mut cmd = server_command(config);
        cmd.env("TMPDIR", &tmp);
        cmd
    });
    assert!(!own.exists(), "the next master sweeps the dead one's directory");
    assert!(next.log().contains("removed 1 runtime directory left by stopped masters"), "{}", next.log());
    assert!(runtime_dir(&tmp, next.pid).is_some());
    let (code, out, err) = next.cli(&["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    next.wait_exit(Duration::from_secs(5));
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a stopped server leaves nothing in TMPDIR: {left:?}");
}

/// The runtime directory of the master `pid` in `tmp` (`fdtserver-<pid>-<random>`).
fn runtime_dir(tmp: &std::path::Path, pid: i32) -> Option<std::path::PathBuf> {
    let prefix = format!("fdtserver-{pid}-");
    std::fs::read_dir(tmp)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)))
}

#[test]
fn term_during_the_first_boot_is_a_clean_stop() {
    let mut server = TestServer::spawn(&Setup::new(1, 1).app("kit", "testkit", "start_delay_ms = 3000"));
    wait_for(READY_TIMEOUT, "the first generation to be booting", || {
        let (_, body) = server.control("GET", "/status")?;
        body.contains("\"booting\"").then_some(())
    });
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "a stop during the first boot exited with {status}");
    assert!(!server.log().contains("cannot start"), "{}", server.log());
}

#[test]
fn a_peer_that_half_closes_still_gets_every_answer() {
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let stream = TcpStream::connect(server.addr("echo")).unwrap();
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let line = format!("{}\n", "x".repeat(999));
    let lines = 4000; // about 4 MB: far more than the socket buffers hold
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..lines {
            writer.write_all(line.as_bytes()).unwrap();
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&stream).read_to_end(&mut got).unwrap();
    sender.join().unwrap();
    assert_eq!(got.len(), lines * 1000, "answers were cut off after the half-close");
}

#[test]
fn a_slow_request_never_holds_up_another_connection_while_a_thread_is_free() {
    // On one CPU only one handler takes events until the other is found blocked (2 ms).
    let server = TestServer::start_with(&Setup::new(1, 2).app("kit", "testkit", ""), on_one_cpu);
    let addr = server.addr("kit");
    for _ in 0..5 {
        let mut slow = LineClient::connect(addr);
        let mut quick = LineClient::connect(addr);
        // Both requests become ready together, for one worker with two handler threads.
        slow.send("SLEEP 1000");
        quick.send("PID");
        let asked = Instant::now();
        assert!(quick.recv().is_some());
        assert!(asked.elapsed() < Duration::from_millis(500), "the quick request waited {:?}", asked.elapsed());
        assert_eq!(slow.recv().as_deref(), Some("SLEPT"));
    }
}

#[test]
fn a_request_computing_endlessly_does_not_hold_up_another_connection_while_a_thread_is_free() {
    // Unlike a blocked handler, a computing one is not replaced at once (it might only be
    // waiting for a CPU), but after `LONG_AFTER_MS` (20 ms) it is.
    let server = TestServer::start_with(&Setup::new(1, 2).app("kit", "testkit", ""), on_one_cpu);
    let addr = server.addr("kit");
    let mut spinning = LineClient::connect(addr);
    spinning.send("SPIN");
    let mut quick = LineClient::connect(addr);
    for _ in 0..5 {
        let asked = Instant::now();
        assert!(quick.ask("PID").parse::<i32>().is_ok());
        assert!(asked.elapsed() < Duration::from_millis(500), "the quick request waited {:?}", asked.elapsed());
    }
}

#[test]
fn pipelined_and_split_requests_on_many_connections_are_all_answered_in_order() {
    // Edge-triggered events: input that arrives while a handler still holds its connection,
    // or together with the peer's close, must not be left unread. Two handlers, sixteen
    // clients, each writing lines in bursts and in fragments while it reads the answers.
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let addr = server.addr("echo");
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let lines = 2000;
                let sender = std::thread::spawn(move || {
                    let text: String = (0..lines).map(|k| format!("client {i} line {k}\n")).collect();
                    let bytes = text.as_bytes();
                    // Chunks of 1 to 4,000 bytes, cutting lines anywhere.
                    let (mut at, mut seed) = (0, i * 7919 + 1);
                    while at < bytes.len() {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let len = (1 + (seed >> 33) as usize % 4000).min(bytes.len() - at);
                        writer.write_all(&bytes[at..at + len]).unwrap();
                        at += len;
                    }
                    // The last lines travel with the close of our side.
                    writer.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut answers = String::new();
                let read = (&stream).read_to_string(&mut answers);
                sender.join().unwrap();
                read.unwrap_or_else(|e| panic!("client {i}: {e} after {} bytes", answers.len()));
                let expected: String = (0..lines).map(|k| format!("client {i} line {k}\n")).collect();
                assert!(
                    answers == expected,
                    "client {i}: {} bytes of answers, {} expected",
                    answers.len(),
                    expected.len()
                );
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

/// The server command, pinned to CPU 0 (the worker then admits one handler at a time).
fn on_one_cpu(config: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "0", BIN, "--config"]).arg(config);
    cmd
}
