//! Several nodes behind a load balancer: the agent check a node's master answers (`agent_check`,
//! `fdtserver rotation out|in`), and two real nodes behind a real HAProxy (the config of
//! `examples/cluster/haproxy.cfg`, ports filled in) under load — a rolling reload, taking a node
//! out of rotation and back, killing a node's whole process group, and bank transfers across
//! two databases while nodes die.
//!
//! The tests behind HAProxy need `haproxy`: without it they print why they are skipped, unless
//! `FDT_REQUIRE_HAPROXY` is set (as `.ci/run` does), where they fail.

mod util;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::haproxy::{HaProxy, free_port, installed_or_skip};
use util::pg::PgCluster;
use util::*;

// ---- the agent check, on one node ------------------------------------------------------------

/// What the agent check on `port` answers one connection (`None`: it could not be asked).
fn ask_agent(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// Waits until the agent check on `port` answers `wanted`.
fn wait_agent(port: u16, wanted: &str, timeout: Duration) {
    wait_for(timeout, &format!("the agent check to answer {wanted:?}"), || {
        (ask_agent(port).as_deref() == Some(wanted)).then_some(())
    });
}

fn agent_setup(agent: u16) -> Setup {
    Setup::new(1, 2)
        .server("node_id", "\"node-x\"")
        .server("agent_check", &format!("\"127.0.0.1:{agent}\""))
        .app("hello", "hello", "")
}

#[test]
fn the_agent_check_answers_up_ready_then_drain_when_out_of_rotation_across_a_reload_and_up_ready_when_back() {
    let agent = free_port();
    let server = TestServer::start(&agent_setup(agent));
    wait_agent(agent, "up ready\n", READY_TIMEOUT);
    let v = server.status();
    assert_eq!(v["rotation"], "in", "{v}");
    assert_eq!(v["agent_check"]["address"], format!("127.0.0.1:{agent}"), "{v}");
    assert_eq!(v["agent_check"]["answer"], "up ready", "{v}");

    // `rotation out` waits for the next check and says what it heard; a checker asks meanwhile.
    let config = server.config.clone();
    let cli = std::thread::spawn(move || cli(&["rotation", "out"], &config));
    let asked = Instant::now();
    let mut heard = None;
    while !cli.is_finished() && asked.elapsed() < Duration::from_secs(15) {
        heard = ask_agent(agent);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out, err) = cli.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("node-x: out of rotation; the agent check on 127.0.0.1:{agent} answers \"drain\"")),
        "{out}"
    );
    assert!(out.contains("a load balancer's agent check heard \"drain\""), "{out}{err}");
    assert_eq!(heard.as_deref(), Some("drain\n"));
    let v = server.status();
    assert_eq!((v["rotation"].as_str(), v["agent_check"]["answer"].as_str()), (Some("out"), Some("drain")), "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert!(metrics.contains("\nfdtserver_rotation_in 0\n"), "{metrics}");
    let (code, out, _) = server.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("rotation: out; the agent check on 127.0.0.1:{agent} answers \"drain\"")), "{out}");

    // A reload keeps the rotation: the new generation's node is still out.
    let generation = server.generation();
    let (code, body) = server.reload();
    assert_eq!(code, 200, "{body}");
    server.wait_serving();
    assert_eq!(server.generation(), generation + 1);
    assert_eq!(ask_agent(agent).as_deref(), Some("drain\n"));
    assert_eq!(server.status()["rotation"], "out");

    // Asked twice, it says so; back in, `up ready` (without waiting for a checker: --no-wait).
    let (code, out, _) = server.cli(&["rotation", "out", "--no-wait"]);
    assert_eq!(code, 0);
    assert!(out.contains("node-x: already out of rotation"), "{out}");
    let (code, out, err) = server.cli(&["rotation", "in", "--no-wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node-x: in rotation; the agent check on"), "{out}");
    assert_eq!(ask_agent(agent).as_deref(), Some("up ready\n"));
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert!(metrics.contains("\nfdtserver_rotation_in 1\n"), "{metrics}");
    assert!(metrics.contains("fdtserver_agent_checks_total "), "{metrics}");
}

#[test]
fn the_agent_check_answers_down_while_no_worker_serves_and_drain_while_the_server_stops() {
    let agent = free_port();
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    let setup = Setup::new(1, 2).server("agent_check", &format!("\"127.0.0.1:{agent}\"")).app(
        "kit",
        "testkit",
        &format!("hang_at_start_if = \"{}\"", hang.display()),
    );
    let mut server = TestServer::start(&setup);
    wait_agent(agent, "up ready\n", READY_TIMEOUT);

    // The worker dies and its replacement hangs in its start: nobody takes connections.
    std::fs::write(&hang, "").unwrap();
    for pid in server.worker_pids() {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }
    wait_agent(agent, "down#no worker is serving\n", Duration::from_secs(5));
    std::fs::remove_file(&hang).unwrap();
    wait_agent(agent, "up ready\n", READY_TIMEOUT);

    // A request in progress keeps the stopping master alive for 2 s: it answers `drain`.
    let mut client = LineClient::connect(server.addr("kit"));
    client.send("SLEEP 2000");
    std::thread::sleep(Duration::from_millis(200)); // in the worker now
    server.signal(Signal::SIGTERM);
    let stopping = Instant::now();
    wait_agent(agent, "drain\n", Duration::from_secs(1));
    assert!(stopping.elapsed() < Duration::from_millis(1500), "the server stopped too soon: the test proves nothing");
    assert_eq!(client.recv().as_deref(), Some("SLEPT"), "the request in progress finished");
    assert!(server.wait_exit(READY_TIMEOUT).success());
    assert!(ask_agent(agent).is_none(), "the agent check closes with the master");
}

#[test]
fn a_busy_agent_check_port_stops_the_start_naming_the_key_and_check_refuses_a_shared_port() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = agent_setup(port).write_to(dir.path());
    server_refuses(&config, &[&format!("cannot listen on agent_check 127.0.0.1:{port}: Address already in use")]);

    // Its port is a listener's: `check` (and the server) refuse the config, with the line.
    let listener = free_port();
    let shared = Setup::new(1, 1)
        .server("agent_check", &format!("\"127.0.0.1:{listener}\""))
        .app_at("hello", &plugin("hello"), "", &format!("127.0.0.1:{listener}"))
        .write_to(dir.path());
    check_refuses(
        &shared,
        &[&format!(
            "fdt.toml:2: `agent_check` 127.0.0.1:{listener} takes the port of the [[listen]] 127.0.0.1:{listener}"
        )],
    );
    let unix = agent_setup(port).server("agent_check", "\"unix:agent.sock\"").write_to(dir.path());
    check_refuses(&unix, &["`agent_check`: `unix:agent.sock` must be host:port"]);
    let (code, out, err) = cli(&["check"], &agent_setup(free_port()).write_to(dir.path()));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_reload_moves_the_agent_check_and_one_to_a_busy_port_is_refused_keeping_the_old() {
    let (first, second) = (free_port(), free_port());
    let server = TestServer::start(&agent_setup(first));
    wait_agent(first, "up ready\n", READY_TIMEOUT);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    server.write_config(&agent_setup(busy_port));
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(&format!("cannot listen on agent_check 127.0.0.1:{busy_port}")),
        "{body}"
    );
    assert_eq!(ask_agent(first).as_deref(), Some("up ready\n"), "the old agent check goes on");

    server.write_config(&agent_setup(second));
    let (code, body) = server.reload();
    assert_eq!(code, 200, "{body}");
    assert_eq!(ask_agent(second).as_deref(), Some("up ready\n"));
    assert_eq!(ask_agent(first), None, "the old port is closed");
    assert_eq!(server.status()["agent_check"]["address"], format!("127.0.0.1:{second}"));
}

#[test]
fn a_binary_upgrade_keeps_the_rotation_and_answers_every_check_meanwhile() {
    let agent = free_port();
    let server = TestServer::start(&agent_setup(agent));
    let (code, out, err) = server.cli(&["rotation", "out", "--no-wait"]);
    assert_eq!(code, 0, "{out}{err}");
    // A checker asks all along: every check is answered (the socket is handed over, never
    // closed), and always `drain`.
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                answers.push(ask_agent(agent));
                std::thread::sleep(Duration::from_millis(5));
            }
            answers
        })
    };
    let old = server.pid;
    server.signal(Signal::SIGUSR2);
    let v = wait_for(READY_TIMEOUT, "a new master", || {
        server
            .control("GET", "/status")
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .filter(|v| v["pid"].as_i64() != Some(old as i64))
    });
    wait_for(READY_TIMEOUT, "the old master to exit", || (!alive(old)).then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let answers = checker.join().unwrap();
    assert_eq!(v["rotation"], "out", "{v}");
    assert!(answers.len() > 10, "only {} checks", answers.len());
    let wrong: Vec<_> = answers.iter().filter(|a| a.as_deref() != Some("drain\n")).collect();
    assert!(wrong.is_empty(), "{} of {} checks were not answered \"drain\": {:?}", wrong.len(), answers.len(), wrong);
    // The new master goes on: back in rotation.
    let (code, out, err) = server.cli(&["rotation", "in", "--no-wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(ask_agent(agent).as_deref(), Some("up ready\n"));
}

// ---- two nodes behind HAProxy ------------------------------------------------------------

/// The example's HAProxy config, used as it is (with its ports filled in).
const HAPROXY_TEMPLATE: &str = include_str!("../examples/cluster/haproxy.cfg");
/// Within this, HAProxy acts on what its checks (every 0.5 s in the example config) find.
const LB_NOTICES: Duration = Duration::from_secs(2);

struct NodePorts {
    hello: u16,
    bank: u16,
    agent: u16,
}

/// A node: its config and, while it runs, its server.
struct Node {
    name: &'static str,
    ports: NodePorts,
    setup: Setup,
    server: Option<TestServer>,
}

impl Node {
    fn new(name: &'static str, pg: Option<&PgCluster>) -> Node {
        let ports = NodePorts { hello: free_port(), bank: free_port(), agent: free_port() };
        // As examples/cluster/node.toml, with shorter timeouts.
        let mut setup = Setup::new(2, 4)
            .server("node_id", &format!("\"{name}\""))
            .server("agent_check", &format!("\"127.0.0.1:{}\"", ports.agent))
            .server("graceful_timeout", "5")
            .app_at("hello", &plugin("hello"), &format!("message = \"{name}\""), &format!("127.0.0.1:{}", ports.hello));
        if let Some(pg) = pg {
            setup = setup
                .app_at("bank", &plugin("bank"), "databases = [\"a\", \"b\"]", &format!("127.0.0.1:{}", ports.bank))
                .extra(&format!(
                    "[database.a]\nurl = \"{}\"\npool_size = 4\nlock_timeout = 1\n\
                     [database.b]\nurl = \"{}\"\npool_size = 4\nlock_timeout = 1\n",
                    pg.url("a"),
                    pg.url("b")
                ));
        }
        Node { name, ports, setup, server: None }
    }

    fn start(&mut self) {
        // A test killed for its time limit must not leave a node serving (its workers follow
        // their master).
        self.server = Some(TestServer::start_with(&self.setup, |config| {
            let mut cmd = server_command(config);
            util::haproxy::die_with_test(&mut cmd);
            cmd
        }));
    }

    fn server(&self) -> &TestServer {
        self.server.as_ref().expect("the node runs")
    }

    /// SIGKILL to the master and every worker at once (its process group), as a crash of the
    /// machine would leave it.
    fn kill(&mut self) {
        let server = self.server.as_ref().expect("the node runs");
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(server.pid), Signal::SIGKILL).unwrap();
        // Dropping it reaps the master (and would kill the group again).
        self.server = None;
    }
}

/// HAProxy in front of node-a and node-b.
struct Cluster {
    nodes: [Node; 2],
    haproxy: HaProxy,
    hello: SocketAddr,
    bank: SocketAddr,
}

impl Cluster {
    /// Starts both nodes (with `bank` when `pg` is given) and HAProxy, and waits until HAProxy
    /// sees both nodes up.
    fn start(pg: Option<&PgCluster>) -> Cluster {
        let mut nodes = [Node::new("node-a", pg), Node::new("node-b", pg)];
        for n in &mut nodes {
            n.start();
        }
        let (lb_hello, lb_bank, lb_stats) = (free_port(), free_port(), free_port());
        let [a, b] = &nodes;
        let mut config = HAPROXY_TEMPLATE.to_string();
        for (name, port) in [
            ("LB_HELLO_PORT", lb_hello),
            ("LB_BANK_PORT", lb_bank),
            ("LB_STATS_PORT", lb_stats),
            ("A_HELLO_PORT", a.ports.hello),
            ("A_BANK_PORT", a.ports.bank),
            ("A_AGENT_PORT", a.ports.agent),
            ("B_HELLO_PORT", b.ports.hello),
            ("B_BANK_PORT", b.ports.bank),
            ("B_AGENT_PORT", b.ports.agent),
        ] {
            config = config.replace(&format!("@{name}@"), &port.to_string());
        }
        let unfilled = config.lines().any(|l| !l.trim_start().starts_with('#') && l.replace("@DIR@", "").contains('@'));
        assert!(!unfilled, "a placeholder is left:\n{config}");
        let haproxy = HaProxy::start(&config);
        let backend = if pg.is_some() { "bank" } else { "hello" };
        for n in &nodes {
            haproxy.wait_status(backend, n.name, "UP", READY_TIMEOUT);
        }
        let hello = SocketAddr::from(([127, 0, 0, 1], lb_hello));
        let bank = SocketAddr::from(([127, 0, 0, 1], lb_bank));
        Cluster { nodes, haproxy, hello, bank }
    }
}

/// One request of the load: when it started, and which node answered (or why it failed).
struct Outcome {
    started: Instant,
    result: Result<String, String>,
}

/// Clients asking `hello` through HAProxy until stopped: those with an even index keep their
/// connection alive (and follow `Connection: close`), the others open one per request.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, keep_alive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let keep = keep_alive && i % 2 == 0;
                    let mut outcomes = Vec::new();
                    let mut conn: Option<HttpClient> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        if conn.is_none() || !keep {
                            match HttpClient::connect(addr) {
                                Ok(c) => conn = Some(c),
                                Err(e) => {
                                    outcomes.push(Outcome { started, result: Err(format!("connect: {e}")) });
                                    std::thread::sleep(Duration::from_millis(5));
                                    continue;
                                }
                            }
                        }
                        let result = match conn.as_mut().unwrap().get("/") {
                            Ok(r) if r.status == 200 => {
                                if r.closes() {
                                    conn = None;
                                }
                                Ok(r.body)
                            }
                            Ok(r) => Err(format!("status {}", r.status)),
                            Err(e) => {
                                conn = None;
                                Err(format!("request: {e}"))
                            }
                        };
                        outcomes.push(Outcome { started, result });
                        // A steady load, leaving the two CPUs some room for the servers.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    outcomes
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients; every outcome, in order of start.
    fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Outcome> = self.clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        all.sort_by_key(|o| o.started);
        all
    }
}

/// Failures among `outcomes`, for a message.
fn failures(outcomes: &[&Outcome]) -> Vec<String> {
    outcomes.iter().filter_map(|o| o.result.as_ref().err().cloned()).collect()
}

/// Every request of `outcomes` was answered (the first failures are shown).
fn assert_none_failed(outcomes: &[Outcome]) {
    let failed = failures(&outcomes.iter().collect::<Vec<_>>());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
}

/// The nodes that answered `outcomes`.
fn served_by<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for o in outcomes {
        if let Ok(node) = &o.result {
            *by.entry(node.clone()).or_insert(0) += 1;
        }
    }
    by
}

#[test]
fn a_rolling_reload_through_haproxy_under_load_loses_no_request() {
    if !installed_or_skip("a_rolling_reload_through_haproxy_under_load_loses_no_request") {
        return;
    }
    let cluster = Cluster::start(None);
    let load = Load::start(cluster.hello, 4, true);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    for node in &cluster.nodes {
        let server = node.server();
        let generation = server.generation();
        let (code, body) = server.reload();
        assert_eq!(code, 200, "{}: {body}", node.name);
        // Its new generation serves before the other node reloads.
        let v = server.wait_serving();
        assert_eq!(v["generation"].as_u64(), Some(generation + 1), "{}: {v}", node.name);
        std::thread::sleep(Duration::from_millis(500));
    }
    let reloaded = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let outcomes = load.stop();
    assert_none_failed(&outcomes);
    let during = served_by(outcomes.iter().filter(|o| o.started >= started && o.started < reloaded));
    let after = served_by(outcomes.iter().filter(|o| o.started >= reloaded));
    eprintln!("{} requests; during the rolling reload {during:?}, after it {after:?}", outcomes.len());
    assert!(during.values().sum::<usize>() > 100, "too little load during the reloads: {during:?}");
    assert_eq!(after.len(), 2, "both nodes serve after the rolling reload: {after:?}");
}

#[test]
fn rotation_out_sends_every_new_connection_to_the_other_node_within_seconds_and_rotation_in_brings_it_back() {
    if !installed_or_skip(
        "rotation_out_sends_every_new_connection_to_the_other_node_within_seconds_and_rotation_in_brings_it_back",
    ) {
        return;
    }
    let cluster = Cluster::start(None);
    let [a, _] = &cluster.nodes;
    // A keep-alive connection that node-a serves: a drain lets it go on.
    let mut kept = wait_for(READY_TIMEOUT, "a connection to node-a", || {
        let mut c = HttpClient::connect(cluster.hello).ok()?;
        (c.get("/").ok()?.body == "node-a").then_some(c)
    });
    let load = Load::start(cluster.hello, 3, false);
    std::thread::sleep(Duration::from_millis(500));

    let out_at = Instant::now();
    let (code, out, err) = a.server().cli(&["rotation", "out"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("node-a: out of rotation") && out.contains("heard \"drain\""), "{out}{err}");
    cluster.haproxy.wait_status("hello", "node-a", "DRAIN (agent)", LB_NOTICES);
    let drained = out_at.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(kept.get("/").expect("the kept connection goes on").body, "node-a");

    let in_at = Instant::now();
    let (code, out, err) = a.server().cli(&["rotation", "in"]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.haproxy.wait_status("hello", "node-a", "UP", LB_NOTICES);
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.stop();

    assert_none_failed(&outcomes);
    let out_window: Vec<&Outcome> =
        outcomes.iter().filter(|o| o.started >= out_at + LB_NOTICES && o.started < in_at).collect();
    let by = served_by(out_window.iter().copied());
    eprintln!("HAProxy drained node-a {drained:?} after `rotation out`; then {by:?}");
    assert!(out_window.len() > 20, "too little load while node-a was out: {by:?}");
    assert_eq!(by.keys().collect::<Vec<_>>(), ["node-b"], "while node-a is out of rotation");
    let back = outcomes.iter().find(|o| o.started >= in_at && o.result.as_deref() == Ok("node-a"));
    let back = back.expect("node-a takes new connections again after `rotation in`").started - in_at;
    eprintln!("node-a served a new connection {back:?} after `rotation in`");
    assert!(back < LB_NOTICES);
}

#[test]
fn killing_a_nodes_process_group_costs_only_its_requests_in_flight_and_the_restarted_node_takes_traffic_again() {
    if !installed_or_skip(
        "killing_a_nodes_process_group_costs_only_its_requests_in_flight_and_the_restarted_node_takes_traffic_again",
    ) {
        return;
    }
    let mut cluster = Cluster::start(None);
    let clients = 4;
    let load = Load::start(cluster.hello, clients, true);
    std::thread::sleep(Duration::from_secs(1));

    let killed_at = Instant::now();
    cluster.nodes[0].kill();
    cluster.haproxy.wait_status("hello", "node-a", "DOWN", Duration::from_secs(5));
    let down = killed_at.elapsed();
    std::thread::sleep(Duration::from_secs(4).saturating_sub(down));

    let restarted_at = Instant::now();
    cluster.nodes[0].start();
    cluster.haproxy.wait_status("hello", "node-a", "UP", Duration::from_secs(5));
    let up = restarted_at.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.stop();

    let settled = killed_at + Duration::from_secs(3);
    let early: Vec<&Outcome> = outcomes.iter().filter(|o| o.started < settled).collect();
    let late: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= settled).collect();
    let (lost, late_failed) = (failures(&early), failures(&late));
    eprintln!(
        "{} requests; HAProxy saw node-a down {down:?} after the kill, up {up:?} after its restart; lost before the kill settled: {lost:?}",
        outcomes.len()
    );
    assert!(
        late_failed.is_empty(),
        "{} of {} requests started 3 s or more after the kill failed: {:?}",
        late_failed.len(),
        late.len(),
        &late_failed[..late_failed.len().min(10)]
    );
    // At most what was in flight on node-a: a request per client, and the next one of a
    // keep-alive client whose idle connection died with it.
    assert!(lost.len() <= 2 * clients, "{} requests lost: {lost:?}", lost.len());
    let down_window = served_by(late.iter().copied().filter(|o| o.started < restarted_at));
    assert_eq!(down_window.keys().collect::<Vec<_>>(), ["node-b"], "while node-a is dead");
    assert!(down_window["node-b"] > 20, "too little load while node-a was dead: {down_window:?}");
    let after = served_by(late.iter().copied().filter(|o| o.started >= restarted_at + up));
    assert!(after.contains_key("node-a"), "the restarted node-a takes traffic again: {after:?}");
}

/// Bank accounts the load uses, and what each holds at first.
const ACCOUNTS: usize = 8;
const INITIAL: i64 = 1000;
/// Spare accounts (see [`spare_accounts`]) hold this each.
const SPARE: i64 = 100;
/// Spare accounts needed in each database: one per orphan made.
const SPARES_PER_DB: usize = 4;

/// Opens accounts `spare0…` that the load never touches, until each database holds
/// [`SPARES_PER_DB`] of them; returns them (those in a, those in b) and how many were opened.
fn spare_accounts(pg: &PgCluster, bank: SocketAddr) -> ([Vec<String>; 2], usize) {
    let in_db = |db: &str| -> Vec<String> {
        let rows = pg.client(db).query("SELECT id FROM accounts WHERE id LIKE 'spare%' ORDER BY id", &[]).unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    for i in 0..64 {
        assert_eq!(bank_ask(bank, &format!("OPEN spare{i} {SPARE}")).as_deref(), Some("OK"));
        let (a, b) = (in_db("a"), in_db("b"));
        if a.len() >= SPARES_PER_DB && b.len() >= SPARES_PER_DB {
            return ([a, b], i + 1);
        }
    }
    panic!("64 spare accounts and still not {SPARES_PER_DB} in each database");
}

/// What a worker of `node` that coordinated transfer `n` of `amount` (from `from` in database
/// a to `to` in b) leaves when it dies in the middle of its two-phase commit: both branches
/// prepared, and the decision to commit recorded when `decided`, as `fdt_sdk::txn` writes them.
fn orphan_transfer(pg: &PgCluster, node: &str, n: u64, (from, to): (&str, &str), amount: i64, decided: bool) {
    for (db, acct, delta) in [("a", from, -amount), ("b", to, amount)] {
        let gid = format!("fdt1:{node}:lc.{n}.a.{db}:bank");
        pg.client(db)
            .batch_execute(&format!(
                "SET lock_timeout = '5s'; BEGIN; UPDATE accounts SET balance = balance + ({delta}) WHERE id = '{acct}'; \
                 PREPARE TRANSACTION '{gid}'"
            ))
            .unwrap_or_else(|e| panic!("cannot prepare {gid}: {e}"));
    }
    if decided {
        let key = format!("fdt1:{node}:lc.{n}.a:bank");
        pg.client("a").execute("INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, 'a,b')", &[&key]).unwrap();
    }
}

fn bank_total(pg: &PgCluster) -> i64 {
    ["a", "b"]
        .iter()
        .map(|db| -> i64 {
            pg.client(db).query_one("SELECT coalesce(sum(balance), 0)::bigint FROM accounts", &[]).unwrap().get(0)
        })
        .sum()
}

fn prepared(pg: &PgCluster) -> Vec<String> {
    let mut all = pg.prepared("a");
    all.extend(pg.prepared("b"));
    all
}

/// One line to `bank` through HAProxy on a connection of its own; `None` if it was cut.
fn bank_ask(addr: SocketAddr, line: &str) -> Option<String> {
    use std::io::{BufRead, Write};
    let s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut s = std::io::BufReader::new(s);
    s.get_mut().write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    (s.read_line(&mut answer).ok()? > 0).then(|| answer.trim_end().to_string())
}

#[test]
fn bank_transfers_through_haproxy_while_nodes_are_killed_conserve_money_and_leave_nothing_prepared() {
    if !installed_or_skip(
        "bank_transfers_through_haproxy_while_nodes_are_killed_conserve_money_and_leave_nothing_prepared",
    ) {
        return;
    }
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    let mut cluster = Cluster::start(Some(&pg));
    let bank = cluster.bank;
    for i in 0..ACCOUNTS {
        assert_eq!(bank_ask(bank, &format!("OPEN acct{i} {INITIAL}")).as_deref(), Some("OK"));
    }
    // Accounts no transfer of the load touches, for the orphans made below: one in each
    // database.
    let ([spare_a, spare_b], spares) = spare_accounts(&pg, bank);
    let total = ACCOUNTS as i64 * INITIAL + spares as i64 * SPARE;
    assert_eq!(bank_total(&pg), total);

    // Transfers across the two databases (two-phase commit, coordinated by the worker that
    // takes the connection), each on a connection of its own, so both nodes get them.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut answers: Vec<(Instant, Option<String>)> = Vec::new();
                let mut n = t * 7919;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (from, to) = (n % ACCOUNTS, (n / ACCOUNTS + 1 + n) % ACCOUNTS);
                    if from == to {
                        continue;
                    }
                    let started = Instant::now();
                    answers.push((started, bank_ask(bank, &format!("TRANSFER acct{from} acct{to} {}", 1 + n % 5))));
                }
                answers
            })
        })
        .collect();

    for victim in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        let name = cluster.nodes[victim].name;
        let killed_at = Instant::now();
        cluster.nodes[victim].kill();
        let left_by_kill = prepared(&pg).iter().filter(|g| g.contains(&format!(":{name}:"))).count();
        // What a coordinator of the dead node left in the middle of its two-phase commit, for
        // certain (a kill under load leaves that only by chance): one transfer decided (its
        // branches must both commit), one not (both must roll back).
        for (k, (amount, decided)) in [(7, true), (11, false)].into_iter().enumerate() {
            let i = 2 * victim + k;
            orphan_transfer(&pg, name, 9_000_000 + i as u64, (&spare_a[i], &spare_b[i]), amount, decided);
        }
        // The survivor settles them while the dead node stays down (cross-node recovery: the
        // coordinator lock of each is free, so its coordinator is gone).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = prepared(&pg);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is dead and these are still prepared 15 s later (the survivor settles what a dead node coordinated): {left:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{name} killed with {left_by_kill} branch(es) of its own prepared, 2 transfers made orphans; nothing prepared {:?} after the kill",
            killed_at.elapsed()
        );
        cluster.nodes[victim].start();
        cluster.haproxy.wait_status("bank", name, "UP", Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let answers: Vec<(Instant, Option<String>)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let ok = answers.iter().filter(|(_, a)| a.as_deref() == Some("OK")).count();
    eprintln!("{ok} of {} transfers answered OK", answers.len());
    assert!(ok > 50, "too few transfers went through: {ok}");

    wait_for(Duration::from_secs(15), "nothing left prepared", || prepared(&pg).is_empty().then_some(()));
    assert_eq!(bank_total(&pg), total, "money was created or destroyed");
    // The decided orphans moved their money, the others did not.
    let balance = |db: &str, acct: &str| -> i64 {
        pg.client(db).query_one("SELECT balance FROM accounts WHERE id = $1", &[&acct]).unwrap().get(0)
    };
    for i in 0..SPARES_PER_DB {
        let moved = if i % 2 == 0 { 7 } else { 0 };
        assert_eq!(
            (balance("a", &spare_a[i]), balance("b", &spare_b[i])),
            (SPARE - moved, SPARE + moved),
            "orphan transfer {i} ({spare_a:?} → {spare_b:?})",
        );
    }
    // Every account takes a transfer again at once (no row lock left behind).
    for i in 0..ACCOUNTS {
        let line = format!("TRANSFER acct{i} acct{} 1", (i + 1) % ACCOUNTS);
        assert_eq!(bank_ask(bank, &line).as_deref(), Some("OK"), "{line}");
    }
    assert_eq!(bank_total(&pg), total);
}
