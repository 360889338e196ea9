//! The `proxy` app and the outbound connections under it: a client's `ROUTE <NAME>` connects to
//! that route's backend from the worker's event loop, bytes flow both ways untouched with flow
//! control between the two sides, and either side's end closes the other. Also connections an
//! app makes from a timer (`Settings::connector`, the testkit's `dial`).

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use util::*;

/// A backend on a real socket: greets each connection with `banner` (if any), then echoes.
fn echo_backend(banner: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                if let Some(banner) = banner {
                    let _ = stream.write_all(banner.as_bytes());
                }
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    addr
}

fn proxy(workers: usize, routes: &str, extra: &str) -> TestServer {
    let settings = format!("routes = {{ {routes} }}\n{extra}");
    TestServer::start(&Setup::new(workers, 2).app("proxy", "proxy", &settings))
}

/// A routed client: `ROUTE name` sent and `OK` read.
fn routed(server: &TestServer, name: &str) -> LineClient {
    let mut client = LineClient::connect(server.addr("proxy"));
    assert_eq!(client.ask(&format!("ROUTE {name}")), "OK");
    client
}

fn metrics(server: &TestServer) -> String {
    server.control("GET", "/metrics").expect("metrics").1
}

#[test]
fn a_routed_client_gets_the_backend_banner_unasked_and_bytes_flow_both_ways() {
    let echo = echo_backend(Some("HELLO from the backend\n"));
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // nobody listens
    // A host name is resolved too.
    let by_name = format!("localhost:{}", echo.port());
    let server = proxy(1, &format!("echo = \"{by_name}\", down = \"{closed}\""), "");
    let mut client = routed(&server, "echo");
    // The banner arrives though the client sends nothing more.
    assert_eq!(client.recv().as_deref(), Some("HELLO from the backend"));
    assert_eq!(client.ask("ping"), "ping");
    client.stream().write_all(b"\x00\xff\r\n").unwrap();
    let mut raw = [0u8; 4];
    client.stream().read_exact(&mut raw).unwrap();
    assert_eq!(&raw, b"\x00\xff\r\n", "bytes untouched");

    let mut lost = LineClient::connect(server.addr("proxy"));
    assert_eq!(lost.ask("ROUTE nowhere"), "ERR unknown route");
    assert!(lost.closed_by_peer());
    let mut refused = LineClient::connect(server.addr("proxy"));
    assert_eq!(refused.ask("ROUTE down"), "ERR backend unreachable");
    assert!(refused.closed_by_peer());
    wait_for(Duration::from_secs(5), "the failed connect counted", || {
        metrics(&server).contains("fdtserver_connections_closed_total{reason=\"connect_failed\"} 1").then_some(())
    });
    // The first client still works.
    assert_eq!(client.ask("pong"), "pong");
}

#[test]
fn a_connect_that_hangs_fails_at_its_timeout_without_holding_a_handler() {
    // A listener whose backlog is full drops further SYNs: a connect to it hangs.
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    listener.listen(0).unwrap();
    let hung = listener.local_addr().unwrap().as_socket().unwrap();
    let fillers: Vec<_> =
        (0..4).filter_map(|_| TcpStream::connect_timeout(&hung, Duration::from_millis(200)).ok()).collect();
    assert!(!fillers.is_empty());
    let echo = echo_backend(None);
    // One worker with one thread: a waiting connect must not hold it.
    let settings = format!("routes = {{ hung = \"{hung}\", echo = \"{echo}\" }}\nconnect_timeout_ms = 800");
    let server = TestServer::start(&Setup::new(1, 1).app("proxy", "proxy", &settings));
    let started = Instant::now();
    let mut waiting = LineClient::connect(server.addr("proxy"));
    waiting.send("ROUTE hung");
    let mut other = routed(&server, "echo");
    assert_eq!(other.ask("meanwhile"), "meanwhile");
    assert!(started.elapsed() < Duration::from_millis(700), "served while the connect waited");
    assert_eq!(waiting.recv().as_deref(), Some("ERR backend unreachable"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700) && waited < Duration::from_secs(3), "failed after {waited:?}");
    assert!(waiting.closed_by_peer());
}

#[test]
fn two_hundred_proxied_connections_at_once_on_two_workers_of_two_threads() {
    let echo = echo_backend(None);
    let server = proxy(2, &format!("echo = \"{echo}\""), "");
    let started = Instant::now();
    let mut clients: Vec<LineClient> = (0..200).map(|_| LineClient::connect(server.addr("proxy"))).collect();
    for c in &mut clients {
        c.send("ROUTE echo");
    }
    for c in &mut clients {
        assert_eq!(c.recv().as_deref(), Some("OK"));
    }
    for round in 0..3 {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(&format!("round {round} client {i}"));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.recv(), Some(format!("round {round} client {i}")));
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "200 connections × 3 round trips took {took:?}");
    let open: u64 = server.active_workers().iter().map(|w| w["connections"].as_u64().unwrap_or(0)).sum();
    assert_eq!(open, 400, "each client and its backend connection");
    // Clients that leave close their backends.
    drop(clients);
    wait_for(Duration::from_secs(10), "every backend connection closed", || {
        let open: u64 = server.active_workers().iter().map(|w| w["connections"].as_u64().unwrap_or(0)).sum();
        (open == 0).then_some(())
    });
}

const TEN_MB: usize = 10 * 1024 * 1024;

/// Sends `len` bytes of a pattern through `stream` while reading as many back; true when what
/// came back is identical.
fn round_trip(stream: TcpStream, len: usize) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min(len - sent);
                writer.write_all(&chunk[..n]).unwrap();
                sent += n;
            }
        });
        let mut reader = stream;
        reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = 0usize;
        let mut same = true;
        let mut buf = vec![0u8; 65_536];
        while got < len {
            let n = reader.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {got} bytes");
            same &= buf[..n].iter().enumerate().all(|(i, b)| *b == ((((got + i) % 65_536) as u32 * 7 % 251) as u8));
            got += n;
        }
        sender.join().unwrap();
        same
    })
}

#[test]
fn ten_megabytes_both_ways_arrive_identical_also_across_a_reload() {
    let echo = echo_backend(None);
    let server = proxy(2, &format!("echo = \"{echo}\""), "");
    let transfers: Vec<_> = (0..2).map(|_| round_trip(routed(&server, "echo").into_stream(), TEN_MB)).collect();
    // A reload while they run: a connection in mid-transfer is not between requests, and
    // finishes on the old generation.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(server.reload().0, 200);
    for t in transfers {
        assert!(t.join().unwrap(), "the bytes came back changed");
    }
    // And the new generation proxies too.
    assert_eq!(routed(&server, "echo").ask("after"), "after");
}

/// A backend that accepts one connection and reads nothing until told to.
fn stalled_backend() -> (SocketAddr, std::sync::mpsc::Sender<()>, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, wait) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        wait.recv().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 65_536];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("backend read failed after {total} bytes: {e}"),
            }
        }
    });
    (addr, go, reader)
}

#[test]
fn a_backend_that_does_not_read_stops_the_proxy_reading_its_client_and_nothing_is_lost() {
    let (backend, go, reader) = stalled_backend();
    let server = proxy(1, &format!("slow = \"{backend}\""), "");
    let pid = server.worker_pids()[0];
    let mut client = routed(&server, "slow").into_stream();
    client.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    let before = rss(pid);
    // Write until the client's own socket is full: the proxy stopped reading it.
    let chunk = vec![b'x'; 65_536];
    let mut sent = 0usize;
    let started = Instant::now();
    loop {
        match client.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("write failed after {sent} bytes: {e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the proxy read {sent} bytes without end");
    }
    let grown = rss(pid).saturating_sub(before);
    eprintln!("stalled after {sent} bytes; the worker grew {grown} bytes");
    assert!(grown < 8 * 1024 * 1024, "the worker grew {grown} bytes holding a stalled flow of {sent}");
    // The backend reads now: every byte arrives, the client's pending writes included.
    go.send(()).unwrap();
    client.set_write_timeout(None).unwrap();
    client.write_all(b"tail").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap(), sent + 4);
}

/// A process's resident memory (`VmRSS`), in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_backend_that_closes_closes_its_client_after_what_it_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
        stream.write_all(format!("last words for {line}").as_bytes()).unwrap();
        // Dropped: closed.
    });
    let server = proxy(1, &format!("once = \"{addr}\""), "");
    let mut client = routed(&server, "once");
    assert_eq!(client.ask("me"), "last words for me");
    backend.join().unwrap();
    assert!(client.closed_by_peer());
}

#[test]
fn a_killed_worker_costs_only_its_own_proxied_connections() {
    let echo = echo_backend(None);
    let server = proxy(2, &format!("echo = \"{echo}\""), "");
    let mut clients: Vec<LineClient> = (0..8).map(|_| routed(&server, "echo")).collect();
    let victim = server.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut survivors = 0;
    for c in &mut clients {
        c.send("still there?");
        let answer = c.stream().set_read_timeout(Some(Duration::from_secs(5))).ok().and_then(|()| {
            let mut line = String::new();
            match BufReader::new(c.stream()).read_line(&mut line) {
                Ok(n) if n > 0 => Some(line),
                _ => None,
            }
        });
        if answer.as_deref() == Some("still there?\n") {
            survivors += 1;
        }
    }
    assert!(survivors > 0 && survivors < 8, "{survivors} of 8 survived the worker's death");
    // A new connection is served (by the survivor or the respawned worker).
    assert_eq!(routed(&server, "echo").ask("new"), "new");
}

#[test]
fn a_client_that_only_receives_is_not_idle() {
    // The backend streams a line every 200 ms and reads nothing; the client only listens.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        for i in 0..20 {
            if stream.write_all(format!("tick {i}\n").as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let settings = format!("routes = {{ ticks = \"{addr}\" }}");
    let server = TestServer::start(&Setup::new(1, 2).app("proxy", "proxy", &settings).server("idle_timeout", "1"));
    let mut client = routed(&server, "ticks");
    for i in 0..12 {
        assert_eq!(client.recv(), Some(format!("tick {i}")), "a stream of 2.4 s outlived idle_timeout = 1");
    }
}

#[test]
fn a_blocked_upload_ended_by_its_client_survives_a_reload_and_arrives_whole() {
    let (backend, go, reader) = stalled_backend();
    let server = proxy(1, &format!("slow = \"{backend}\""), "");
    let mut client = routed(&server, "slow").into_stream();
    client.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    let chunk = vec![b'y'; 65_536];
    let mut sent = 0usize;
    while let Ok(n) = client.write(&chunk) {
        sent += n;
    }
    // The client is done: what it sent waits in the proxy (blocked) and the kernel.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    // The drain tells the app (`on_drain`) while the connection waits for its backend.
    assert_eq!(server.reload().0, 200);
    std::thread::sleep(Duration::from_millis(300));
    go.send(()).unwrap();
    assert_eq!(reader.join().unwrap(), sent, "every byte the client sent reached the backend");
}

/// A server whose testkit app dials `addr` from an app timer in each worker.
fn dialer(workers: usize, addr: &str) -> TestServer {
    TestServer::start(&Setup::new(workers, 2).app("kit", "testkit", &format!("dial = \"{addr}\"")))
}

#[test]
fn an_app_timer_connects_through_the_connector_and_the_connection_is_served_like_any_other() {
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = dialer(2, &peer.local_addr().unwrap().to_string());
    let mut pids = Vec::new();
    for _ in 0..2 {
        let (stream, _) = peer.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut link = BufReader::new(stream);
        let mut hello = String::new();
        link.read_line(&mut hello).unwrap();
        let pid: i32 = hello.strip_prefix("HELLO ").and_then(|p| p.trim().parse().ok()).expect(&hello);
        link.get_mut().write_all(b"ping\n").unwrap();
        let mut answer = String::new();
        link.read_line(&mut answer).unwrap();
        assert_eq!(answer, "GOT ping\n");
        pids.push(pid);
    }
    pids.sort();
    assert_eq!(pids, server.worker_pids(), "one connection from each worker");
    assert!(
        server.log().contains("cannot connect to") && server.log().contains("from App::start"),
        "a connect from start is refused with its reason:\n{}",
        server.log()
    );
}

#[test]
fn a_refused_or_unresolvable_connect_reaches_the_app_with_its_reason() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let server = dialer(1, &closed);
    wait_for(Duration::from_secs(10), "the refused connect logged", || {
        server.log().contains(&format!("testkit: dial failed: cannot connect to {closed}")).then_some(())
    });
    wait_for(Duration::from_secs(5), "the failed connect counted", || {
        metrics(&server).contains("fdtserver_connections_closed_total{reason=\"connect_failed\"} 1").then_some(())
    });
    let server = dialer(1, "no-such-host.invalid:7");
    wait_for(Duration::from_secs(10), "the unresolvable name logged", || {
        server.log().contains("testkit: dial failed: cannot resolve \"no-such-host.invalid:7\"").then_some(())
    });
}

#[test]
fn term_ends_idle_proxied_pairs_gently_and_the_server_exits() {
    let echo = echo_backend(None);
    let mut server = proxy(2, &format!("echo = \"{echo}\""), "");
    let mut clients: Vec<LineClient> = (0..4).map(|_| routed(&server, "echo")).collect();
    assert_eq!(clients[0].ask("before"), "before");
    let started = Instant::now();
    server.signal(nix::sys::signal::Signal::SIGTERM);
    for c in &mut clients {
        assert!(c.closed_by_peer(), "an idle proxied client is closed by the stop");
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert!(started.elapsed() < Duration::from_secs(5), "stopped in {:?}", started.elapsed());
}
