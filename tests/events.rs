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

// ---- Across servers, and with transactions: PostgreSQL LISTEN/NOTIFY ([events] database) ----

use util::pg::PgCluster;

/// A server on `cluster`'s database `main` with `[events] database = "main"`, as node `node`,
/// serving the given apps.
fn on_bus(cluster: &PgCluster, node: &str, setup: Setup) -> TestServer {
    TestServer::start(
        &setup
            .server("node_id", &format!("\"{node}\""))
            .extra(&format!("[database.main]\nurl = \"{}\"\n\n[events]\ndatabase = \"main\"\n", cluster.url("main"))),
    )
}

/// Waits until `n` sessions listen for events on the cluster's `main` (each worker has one).
fn listening(cluster: &PgCluster, n: i64) {
    wait_for(Duration::from_secs(20), "the workers' LISTEN sessions", || {
        let rows = cluster
            .client("main")
            .query("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN fdt_events'", &[])
            .unwrap();
        (rows[0].get::<_, i64>(0) >= n).then_some(())
    });
}

#[test]
fn chat_reaches_the_clients_of_another_server_sharing_the_events_database_once() {
    let cluster = PgCluster::start();
    cluster.create_db("main");
    let one = on_bus(&cluster, "one", Setup::new(2, 2).app("chat", "chat", ""));
    let two = on_bus(&cluster, "two", Setup::new(1, 2).app("chat", "chat", ""));
    listening(&cluster, 3);
    // `fdtserver subscribe` on the second server listens there too.
    let mut watcher = Subscriber::start(&two, "chat.*");
    listening(&cluster, 4);
    let (mut a, _) = join(&one);
    let (mut a2, _) = join(&one);
    let (mut b, _) = join(&two);
    assert_eq!(a.ask("NICK ann"), "OK");
    a.send("hello from one");
    assert_eq!(b.recv().as_deref(), Some("ann: hello from one"), "another server's client");
    assert_eq!(a2.recv().as_deref(), Some("ann: hello from one"));
    let seen = watcher.next();
    assert!(seen.starts_with("chat.line ") && seen.ends_with(" ann: hello from one"), "{seen}");
    b.send("and back");
    assert_eq!(a.recv().as_deref(), Some("anon: and back"));
    assert_eq!(a2.recv().as_deref(), Some("anon: and back"));
    // Each line once: the next line each gets is the next one said.
    a2.send("last");
    assert_eq!(a.recv().as_deref(), Some("anon: last"));
    assert_eq!(b.recv().as_deref(), Some("anon: last"));
    assert!(watcher.next().ends_with(" anon: and back"), "its own server's events once");
    assert!(watcher.next().ends_with(" anon: last"));
    // Equal lines are not merged, and a burst arrives whole and in order on the other server.
    for _ in 0..5 {
        a.send("same again");
    }
    for n in 0..300 {
        a.send(&format!("burst {n}"));
    }
    for _ in 0..5 {
        assert_eq!(b.recv().as_deref(), Some("ann: same again"));
    }
    for n in 0..300 {
        assert_eq!(b.recv(), Some(format!("ann: burst {n}")), "line {n} of the burst on the other server");
    }
    // A line too large for a NOTIFY is refused with the reason, at the emit.
    let long = "x".repeat(8000);
    assert!(a.ask(&long).starts_with("ERR with an [events] database, an event must fit in a PostgreSQL NOTIFY"));
    let (code, _, err) = one.cli(&["emit", "big", &long]);
    assert_eq!(code, 1);
    assert!(err.contains("PostgreSQL NOTIFY"), "{err}");
}

#[test]
fn bank_events_arrive_when_their_transaction_commits_and_never_otherwise() {
    let cluster = PgCluster::start();
    cluster.create_db("main");
    let server = on_bus(&cluster, "bank-events", Setup::new(1, 2).app("bank", "bank", "database = \"main\""));
    let mut sub = Subscriber::start(&server, "bank.*");
    // Another server on the same database, watched by its own subscriber.
    let other = on_bus(&cluster, "elsewhere", Setup::new(1, 1).app("chat", "chat", ""));
    let mut far = Subscriber::start(&other, "bank.*");
    listening(&cluster, 3);
    let mut c = LineClient::connect(server.addr("bank"));
    assert_eq!(c.ask("OPEN a 100"), "OK");
    assert_eq!(c.ask("OPEN b 0"), "OK");
    assert_eq!(c.ask("TRANSFER a b 5"), "OK");
    assert_eq!(sub.next(), "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":5}");
    // Rolled back: nothing.
    for command in ["BEGIN", "DEBIT a 3", "CREDIT b 3"] {
        assert_eq!(c.ask(command), "OK");
    }
    assert_eq!(c.ask("ROLLBACK"), "ROLLED-BACK");
    assert_eq!(c.ask("TRANSFER a b 1"), "OK");
    assert_eq!(sub.next(), "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":1}", "nothing from the rollback");
    // Committed: each change, in order.
    for command in ["BEGIN", "DEBIT a 2", "CREDIT b 2"] {
        assert_eq!(c.ask(command), "OK");
    }
    assert_eq!(c.ask("COMMIT"), "COMMITTED");
    assert_eq!(sub.next(), "bank.changed {\"account\":\"a\",\"delta\":-2}");
    assert_eq!(sub.next(), "bank.changed {\"account\":\"b\",\"delta\":2}");
    // Two equal changes in one transaction are two events, here and on the other server.
    for command in ["BEGIN", "DEBIT a 1", "DEBIT a 1"] {
        assert_eq!(c.ask(command), "OK");
    }
    assert_eq!(c.ask("COMMIT"), "COMMITTED");
    for _ in 0..2 {
        assert_eq!(sub.next(), "bank.changed {\"account\":\"a\",\"delta\":-1}");
    }
    assert_eq!(far.next(), "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":5}");
    assert_eq!(far.next(), "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":1}");
    assert_eq!(far.next(), "bank.changed {\"account\":\"a\",\"delta\":-2}");
    assert_eq!(far.next(), "bank.changed {\"account\":\"b\",\"delta\":2}");
    for _ in 0..2 {
        assert_eq!(far.next(), "bank.changed {\"account\":\"a\",\"delta\":-1}", "not merged by PostgreSQL");
    }
    // A failed transfer inside an open transaction emits nothing either.
    assert_eq!(c.ask("TRANSFER b a 1000"), "ERR insufficient funds");
    // The worker is killed between the statement and the commit: nothing, ever.
    for command in ["BEGIN", "CREDIT b 7"] {
        assert_eq!(c.ask(command), "OK");
    }
    let victim = server.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(c.closed_by_peer());
    let mut after = wait_for(Duration::from_secs(20), "a respawned worker", || {
        let pids = server.worker_pids();
        (pids.len() == 1 && pids[0] != victim).then(|| LineClient::connect(server.addr("bank")))
    });
    assert_eq!(after.ask("TRANSFER a b 1"), "OK");
    assert_eq!(
        sub.next(),
        "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":1}",
        "the killed transaction's CREDIT never came"
    );
    assert_eq!(after.ask("BALANCE b"), "OK 9");
    assert_eq!(far.next(), "bank.transferred {\"from\":\"a\",\"to\":\"b\",\"amount\":1}");
}

#[test]
fn an_app_subscribes_and_unsubscribes_at_run_time_and_a_reload_ends_its_subscriptions_cleanly() {
    let server = TestServer::start(&Setup::new(2, 2).app("kit", "testkit", ""));
    let mut listener = LineClient::connect(server.addr("kit"));
    assert_eq!(listener.ask("LISTEN demo.*"), "LISTENING");
    assert_eq!(listener.ask("LISTEN"), "LISTEN", "without a pattern, an unknown line: echoed");
    let mut talker = LineClient::connect(server.addr("kit"));
    assert_eq!(talker.ask("EMIT1 demo.one hello there"), "EMITTED");
    assert_eq!(listener.recv().as_deref(), Some("EVENT demo.one hello there"));
    assert_eq!(talker.ask("EMIT1 bad!topic x"), "ERR a topic is made of A-Z a-z 0-9 . _ - : (\"bad!topic\")");
    assert_eq!(listener.ask("UNLISTEN"), "UNLISTENED");
    assert_eq!(listener.ask("UNLISTEN"), "ERR not listening");
    assert_eq!(talker.ask("EMIT1 demo.two unheard"), "EMITTED");
    assert_eq!(listener.ask("LISTEN demo.three"), "LISTENING");
    assert_eq!(talker.ask("EMIT1 demo.three heard"), "EMITTED");
    assert_eq!(listener.recv().as_deref(), Some("EVENT demo.three heard"), "demo.two never came");
    // The old generation's subscriptions end with its apps; the new one's work.
    assert_eq!(server.reload().0, 200);
    let mut fresh = LineClient::connect(server.addr("kit"));
    assert_eq!(fresh.ask("LISTEN demo.*"), "LISTENING");
    assert_eq!(LineClient::connect(server.addr("kit")).ask("EMIT1 demo.four after"), "EMITTED");
    assert_eq!(fresh.recv().as_deref(), Some("EVENT demo.four after"));
}

#[test]
fn a_server_whose_events_database_is_down_delivers_within_itself_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("host={} port=5432 user=postgres dbname=main connect_timeout=1", dir.path().display());
    let server = TestServer::start(
        &Setup::new(2, 2)
            .app("chat", "chat", "")
            .extra(&format!("[database.main]\nurl = \"{url}\"\n\n[events]\ndatabase = \"main\"\n")),
    );
    let (mut a, _) = join(&server);
    let (mut b, _) = join(&server);
    a.send("local still works");
    assert_eq!(b.recv().as_deref(), Some("anon: local still works"));
    wait_for(Duration::from_secs(10), "the outage in the log", || {
        let log = server.log();
        (log.contains("events: cannot reach database main to notify other servers")
            && log.contains("events: cannot listen for other servers' events on database main"))
        .then_some(())
    });
}

#[test]
fn a_subscriber_that_stops_reading_costs_only_its_own_events_counted_and_logged() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", ""));
    let stalled = Subscriber::start(&server, "*");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stalled.child.id() as i32), nix::sys::signal::Signal::SIGSTOP)
        .unwrap();
    let mut listener = LineClient::connect(server.addr("kit"));
    assert_eq!(listener.ask("LISTEN demo.*"), "LISTENING");
    let mut talker = LineClient::connect(server.addr("kit"));
    // Far more than a stopped reader's socket holds.
    assert_eq!(talker.ask("EMIT 50000"), "EMITTED 50000 refused=0");
    assert_eq!(talker.ask("EMIT1 demo.after all that"), "EMITTED");
    assert_eq!(listener.recv().as_deref(), Some("EVENT demo.after all that"), "the app's own subscription got it");
    wait_for(Duration::from_secs(10), "the drops counted", || {
        (metric_value(&server, "fdtserver_events_total{kind=\"dropped\",prefix=\"bench\"}") > 0.0).then_some(())
    });
    assert!(server.log().contains("does not keep up"), "{}", server.log());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stalled.child.id() as i32), nix::sys::signal::Signal::SIGCONT)
        .unwrap();
}

fn metric_value(server: &TestServer, name: &str) -> f64 {
    metrics(server).lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}
