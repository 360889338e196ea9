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

/// `fdtserver subscribe PATTERN` running, killed (and reaped) on drop.
struct Subscriber {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Subscriber {
    fn start(server: &TestServer, pattern: &str) -> Subscriber {
        let mut child = std::process::Command::new(BIN)
            .args(["subscribe", pattern, "--config"])
            .arg(&server.config)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let socket = std::path::PathBuf::from(format!("{}.bus/s{}", server.control_socket().display(), child.id()));
        wait_for(Duration::from_secs(10), "the subscriber's socket", || socket.exists().then_some(()));
        let stdout = child.stdout.take().unwrap();
        Subscriber { child, lines: std::io::BufRead::lines(std::io::BufReader::new(stdout)) }
    }

    fn next(&mut self) -> String {
        self.lines.next().expect("the subscriber ended").unwrap()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn subscribe_sees_what_emit_and_the_apps_emit_and_leaves_no_socket_behind() {
    let server = chat(2);
    let mut sub = Subscriber::start(&server, "demo.*");
    let mut all = Subscriber::start(&server, "*");
    let (code, _, err) = server.cli(&["emit", "demo.hello", "hi there"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(server.cli(&["emit", "other.topic", "not for demo"]).0, 0);
    assert_eq!(server.cli(&["emit", "demo.second", "{\"n\":2}"]).0, 0);
    assert_eq!(sub.next(), "demo.hello hi there");
    assert_eq!(sub.next(), "demo.second {\"n\":2}", "other.topic is not taken by demo.*");
    assert_eq!(all.next(), "demo.hello hi there");
    assert_eq!(all.next(), "other.topic not for demo");
    assert_eq!(all.next(), "demo.second {\"n\":2}");
    // What an app emits too.
    let (mut a, _) = join(&server);
    a.send("from the app");
    let line = all.next();
    assert!(line.starts_with("chat.line ") && line.ends_with(" anon: from the app"), "{line}");
    // Interrupted: it exits 0 and takes its socket with it.
    let socket = std::path::PathBuf::from(format!("{}.bus/s{}", server.control_socket().display(), sub.child.id()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sub.child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let status = wait_for(Duration::from_secs(5), "the subscriber to exit", || sub.child.try_wait().unwrap());
    assert!(status.success());
    assert!(!socket.exists());
    // Bad input is refused with a reason.
    let (code, _, err) = server.cli(&["emit", "bad topic", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("a topic is made of"), "{err}");
}

#[test]
fn emit_and_subscribe_without_a_server_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = echo_config(dir.path(), "", "", "");
    let (code, _, err) = cli(&["emit", "a.b", "x"], &config);
    assert_eq!(code, 1);
    assert!(err.starts_with("fdtserver: emit: "), "{err}");
    let (code, _, err) = cli(&["subscribe", "*"], &config);
    assert_eq!(code, 1);
    assert!(err.starts_with("fdtserver: subscribe: "), "{err}");
}
