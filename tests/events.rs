//! The event bus: events reach the subscriptions of every worker of the server (the `chat` app
//! across workers), and `fdtserver emit` / `subscribe` talk to it.

mod util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use util::*;

fn chat(workers: usize) -> TestServer {
    TestServer::start(&Setup::new(workers, 2).app("chat", "chat", ""))
}

fn metrics(server: &TestServer) -> String {
    server.control("GET", "/metrics").expect("metrics").1
}

/// A chat client, its worker's pid read from the welcome line.
fn join(server: &TestServer) -> (LineClient, i32) {
    let mut c = LineClient::connect(server.addr("chat"));
    let welcome = c.recv().expect("a welcome line");
    let pid = welcome.strip_prefix("WELCOME ").and_then(|p| p.parse().ok()).expect(&welcome);
    (c, pid)
}

#[test]
fn a_burst_reaches_every_other_client_of_every_worker_in_order_per_sender() {
    let server = chat(2);
    let mut clients = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..20 {
        let (mut c, pid) = join(&server);
        assert_eq!(c.ask(&format!("NICK c{i}")), "OK");
        pids.insert(pid);
        clients.push(c);
    }
    assert_eq!(pids.len(), 2, "the clients are spread over both workers");
    let started = Instant::now();
    for (i, c) in clients.iter_mut().enumerate() {
        let burst: String = (0..50).map(|n| format!("line {n} from {i}\n")).collect();
        std::io::Write::write_all(c.stream(), burst.as_bytes()).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut next: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..19 * 50 {
            let line = c.recv().unwrap_or_else(|| panic!("client {i} was closed"));
            let (name, text) = line.split_once(": ").expect(&line);
            let n: usize =
                text.strip_prefix("line ").and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).expect(&line);
            assert_ne!(name, format!("c{i}"), "a client never gets its own line");
            let expected = next.entry(name.to_string()).or_insert(0);
            assert_eq!(n, *expected, "client {i}: {name}'s lines in order");
            *expected += 1;
        }
        assert_eq!(next.len(), 19);
        assert!(next.values().all(|n| *n == 50));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "the burst took {took:?}");
    wait_for(Duration::from_secs(5), "the bus counted", || {
        let m = metrics(&server);
        m.contains("fdtserver_events_total{kind=\"emitted\",prefix=\"chat\"} 1000").then_some(())
    });
    let m = metrics(&server);
    assert!(m.contains("fdtserver_events_total{kind=\"delivered\",prefix=\"chat\"} 2000"), "{m}");
    assert!(!m.contains("kind=\"dropped\""), "{m}");
}
