//! The `relay` app: a persistent outbound connection per worker to its upstream, redialled with
//! back-off, whose lines are pushed to every client of the app in that worker.

mod util;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use util::*;

fn relay(workers: usize, upstream: std::net::SocketAddr) -> TestServer {
    let settings = format!("upstream = \"{upstream}\"\nmax_backoff_ms = 400");
    TestServer::start(&Setup::new(workers, 2).app("relay", "relay", &settings))
}

/// Accepts `n` connections from the relay's workers (within 10 s).
fn links(upstream: &TcpListener, n: usize) -> Vec<TcpStream> {
    upstream.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut links = Vec::new();
    while links.len() < n {
        match upstream.accept() {
            Ok((s, _)) => links.push(s),
            Err(_) => {
                assert!(Instant::now() < deadline, "{} of {n} workers connected upstream", links.len());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    links
}

fn say(links: &mut [TcpStream], line: &str) {
    for link in links {
        link.write_all(format!("{line}\n").as_bytes()).unwrap();
    }
}

#[test]
fn upstream_lines_reach_every_client_of_every_worker_and_a_lost_upstream_is_redialled() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = relay(2, upstream.local_addr().unwrap());
    let mut links = links(&upstream, 2);
    let mut clients: Vec<LineClient> = (0..6).map(|_| LineClient::connect(server.addr("relay"))).collect();
    // Clients' input is ignored.
    for c in &mut clients {
        c.send("hello?");
    }
    // Every client is registered (its connection open in a worker) before the news.
    wait_for(Duration::from_secs(5), "six open connections", || {
        let open: u64 = server.active_workers().iter().map(|w| w["connections"].as_u64().unwrap_or(0)).sum();
        (open == 6).then_some(())
    });
    say(&mut links, "news 1");
    for c in &mut clients {
        assert_eq!(c.recv().as_deref(), Some("news 1"));
    }
    // The upstream drops both links: each worker dials again, after its back-off.
    drop(links);
    let mut links = self::links(&upstream, 2);
    say(&mut links, "news 2");
    for c in &mut clients {
        assert_eq!(c.recv().as_deref(), Some("news 2"));
    }
}

#[test]
fn an_upstream_that_is_down_at_start_is_dialled_until_it_comes_up() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = relay(1, port);
    let mut client = LineClient::connect(server.addr("relay"));
    std::thread::sleep(Duration::from_millis(800)); // a few refused dials, with back-off
    let upstream = TcpListener::bind(port).unwrap();
    let mut links = links(&upstream, 1);
    say(&mut links, "finally");
    assert_eq!(client.recv().as_deref(), Some("finally"));
    assert!(server.worker_pids().len() == 1);
}

#[test]
fn an_upstream_that_never_ends_its_line_is_dropped_and_dialled_again() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = relay(1, upstream.local_addr().unwrap());
    let pid = server.worker_pids()[0];
    let mut first = links(&upstream, 1).remove(0);
    // 1 MB without a newline: more than a line may be; the relay gives up on this link.
    let junk = vec![b'x'; 1 << 20];
    let _ = first.write_all(&junk);
    let mut second = links(&upstream, 1);
    let mut client = LineClient::connect(server.addr("relay"));
    wait_for(Duration::from_secs(5), "the client to be registered", || {
        let open: u64 = server.active_workers().iter().map(|w| w["connections"].as_u64().unwrap_or(0)).sum();
        (open == 1).then_some(())
    });
    say(&mut second, "fresh start");
    assert_eq!(client.recv().as_deref(), Some("fresh start"));
    assert!(server.log().contains("passed 65536 bytes; dropping the connection"), "{}", server.log());
    assert_eq!(server.worker_pids(), vec![pid]);
}
