//! Bad input costs only its own connection: garbage, a client that vanishes mid-request, a
//! line too long to buffer, a reset.

mod util;

use std::io::{BufRead, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use util::*;

/// Open connections over every worker, as the last heartbeats reported them.
fn open_connections(server: &TestServer) -> u64 {
    server.status()["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap()).sum()
}

/// Waits until the workers report exactly `n` open connections (heartbeats come every 0.5 s).
fn wait_connections(server: &TestServer, n: u64) {
    wait_for(Duration::from_secs(5), &format!("/status to show {n} open connection(s)"), || {
        (open_connections(server) == n).then_some(())
    });
}

/// Facts that must not change when a client misbehaves: the workers, and no panic or restart.
fn unharmed(server: &mut TestServer, workers: &[i32]) {
    server.assert_running();
    assert_eq!(server.worker_pids(), workers, "a worker was replaced");
    let v: Value = server.status();
    assert_eq!(v["worker_restarts"], 0, "{v}");
    for w in v["workers"].as_array().unwrap() {
        assert_eq!(w["panics"], 0, "{v}");
    }
}

/// Reads until the server closes the connection; returns what it sent. A reset counts as a close.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server did not close the connection within {READY_TIMEOUT:?}")
            }
            Err(_) => return got, // reset
        }
    }
}

fn hello_ok(addr: SocketAddr) {
    let r = http_get(addr).expect("a fresh connection got no answer");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn garbage_gets_400_and_a_close_while_a_good_connection_goes_on() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "message = \"fine\""));
    let addr = server.addr("hello");
    let workers = server.worker_pids();
    let mut good = HttpClient::connect(addr).unwrap();
    assert_eq!(good.get("/").unwrap().body, "fine");

    let mut bad = TcpStream::connect(addr).unwrap();
    bad.write_all(b"\x00\x01\x02 GARBAGE \xff\xfe\r\n\x7f\r\n\r\n").unwrap();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut bad)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400"), "garbage was answered with:\n{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");

    // The good keep-alive connection, on the same single worker, is unaffected.
    for _ in 0..3 {
        let r = good.get("/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "fine"));
        assert!(!r.closes());
    }
    hello_ok(addr);
    wait_connections(&server, 1);
    unharmed(&mut server, &workers);
}

#[test]
fn a_client_that_vanishes_mid_request_costs_only_its_connection() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let workers = server.worker_pids();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"GET /half HTTP/1.1\r\nHost: test\r\nX-Unfinished: ").unwrap();
    wait_connections(&server, 1); // the worker holds it, half read
    drop(half);
    wait_connections(&server, 0);
    hello_ok(addr);
    unharmed(&mut server, &workers);
}

#[test]
fn a_line_longer_than_1_mib_closes_the_connection_and_the_server_goes_on() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let addr = server.addr("echo");
    let workers = server.worker_pids();
    let mut bystander = LineClient::connect(addr);
    assert_eq!(bystander.ask("before"), "before");

    let mut flood = TcpStream::connect(addr).unwrap();
    flood.set_write_timeout(Some(READY_TIMEOUT)).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    // 1.5 MiB without a newline; the server may close (and reset) before all of it is taken.
    while sent < 3 * 512 * 1024 {
        match flood.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server stopped reading after {sent} bytes but kept the connection open")
            }
            Err(_) => break, // closed or reset by the server
        }
    }
    let echoed = read_until_closed(&mut flood);
    assert!(!echoed.contains(&b'\n'), "a line came back from a request without a newline");

    assert_eq!(bystander.ask("after"), "after");
    assert_eq!(LineClient::connect(addr).ask("fresh"), "fresh");
    wait_for(Duration::from_secs(3), "the oversized request to be logged", || {
        server.log().contains("larger than 1 MiB").then_some(())
    });
    wait_connections(&server, 1);
    unharmed(&mut server, &workers);
}

#[test]
fn a_reset_mid_request_costs_nothing() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").app("echo", "echo", ""));
    let workers = server.worker_pids();
    let mut keeper = HttpClient::connect(server.addr("hello")).unwrap();
    assert_eq!(keeper.get("/").unwrap().status, 200);

    // Half an HTTP request, and half an echo line, each ended by a reset (SO_LINGER 0).
    let mut http = TcpStream::connect(server.addr("hello")).unwrap();
    http.write_all(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nonly some of the body").unwrap();
    let mut line = TcpStream::connect(server.addr("echo")).unwrap();
    line.write_all(b"half a line").unwrap();
    wait_connections(&server, 3);
    for s in [http, line] {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s); // RST instead of FIN
    }
    wait_connections(&server, 1);

    let r = keeper.get("/").unwrap();
    assert_eq!(r.status, 200);
    hello_ok(server.addr("hello"));
    assert_eq!(LineClient::connect(server.addr("echo")).ask("still echoing"), "still echoing");
    unharmed(&mut server, &workers);
}

#[test]
fn tcp_urgent_data_inside_a_request_does_not_leave_the_rest_unread() {
    // A read stops at the urgent mark; the rest of the line must still be read and answered.
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let stream = TcpStream::connect(server.addr("echo")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let socket = socket2::SockRef::from(&stream);
    (&stream).write_all(b"urgent ").unwrap();
    socket.send_out_of_band(b"!").unwrap();
    (&stream).write_all(b"data\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer).unwrap();
    // The urgent byte is out of band (not inline): the line arrives without it.
    assert_eq!(answer, "urgent data\n");
}

#[test]
fn a_unix_client_passing_an_fd_does_not_leave_its_next_request_unread() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    // A read of a Unix stream socket stops at a message that carries fds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let setup = Setup::new(1, 2).app_at("echo", &plugin("echo"), "", &format!("unix:{}", path.display()));
    let _server = TestServer::start(&setup);
    let stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let passed = std::fs::File::open("/dev/null").unwrap();
    let fds = [passed.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let first = [std::io::IoSlice::new(b"first ")];
    nix::sys::socket::sendmsg::<()>(stream.as_raw_fd(), &first, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
        .unwrap();
    (&stream).write_all(b"second\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer).unwrap();
    assert_eq!(answer, "first second\n");
}
