//! Transactions under faults: lock and statement timeouts, the sessions of a killed worker,
//! coordinator liveness (the advisory lock a coordinating session holds) and the recovery it
//! enables — in the running server (of this node's transactions and of any other node's, with
//! several servers recovering at once) and in `fdtserver txn recover` — and transfers in opposite
//! directions across two databases. Each against a real PostgreSQL started for the test.

mod util;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use util::pg::PgCluster;
use util::*;

const NODE: &str = "fault-node";
const INITIAL: i64 = 1000;

/// Settings of a bank over databases `a` and `b` of `pg`, with `extra` keys in each
/// `[database.*]`.
fn two_db_setup(pg: &PgCluster, workers: usize, extra: &str) -> Setup {
    pg.create_db("a");
    pg.create_db("b");
    Setup::new(workers, 4)
        .app("bank", "bank", "databases = [\"a\", \"b\"]")
        .server("node_id", &format!("\"{NODE}\""))
        .server("graceful_timeout", "2")
        .extra(&format!(
            "[database.a]\nurl = \"{}\"\npool_size = 8\n{extra}\n[database.b]\nurl = \"{}\"\npool_size = 8\n{extra}\n",
            pg.url("a"),
            pg.url("b")
        ))
}

/// Opens `n` accounts `acct0…` with [`INITIAL`] each; returns those in database a and in b.
fn open_accounts(pg: &PgCluster, addr: SocketAddr, n: usize) -> (Vec<String>, Vec<String>) {
    let mut c = LineClient::connect(addr);
    let (mut in_a, mut in_b) = (Vec::new(), Vec::new());
    for i in 0..n {
        let acct = format!("acct{i}");
        assert_eq!(c.ask(&format!("OPEN {acct} {INITIAL}")), "OK");
        let here: i64 =
            pg.client("a").query_one("SELECT count(*) FROM accounts WHERE id = $1", &[&acct]).unwrap().get(0);
        if here == 1 { in_a.push(acct) } else { in_b.push(acct) }
    }
    assert!(!in_a.is_empty() && !in_b.is_empty(), "accounts all in one database: {in_a:?} {in_b:?}");
    (in_a, in_b)
}

fn total(pg: &PgCluster) -> i64 {
    ["a", "b"]
        .iter()
        .map(|db| -> i64 {
            pg.client(db).query_one("SELECT coalesce(sum(balance), 0)::bigint FROM accounts", &[]).unwrap().get(0)
        })
        .sum()
}

/// Asks on a thread and gives up after `limit` (a hang must fail the test, not stall it);
/// returns the answers and how long they took.
fn ask_within(addr: SocketAddr, lines: &[&str], limit: Duration) -> (Vec<String>, Duration) {
    let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let mut c = LineClient::connect(addr);
        let answers: Vec<String> = lines.iter().map(|l| c.ask(l)).collect();
        let _ = tx.send(answers);
    });
    let answers = rx.recv_timeout(limit).unwrap_or_else(|_| panic!("no answer within {limit:?}"));
    (answers, start.elapsed())
}

/// What a coordinator of local transaction `n` (coordinated from `a`) that dies in the middle
/// of its two-phase commit leaves behind: branches prepared in a and b, each inserting `v` into
/// table `t`, with the decision to commit recorded when `decided`. Returns the gids and the
/// coordinator's session, which holds its lock (as a live coordinator does) until dropped.
fn coordinator(pg: &PgCluster, node: &str, n: u64, v: i32, decided: bool) -> (Vec<String>, postgres::Client) {
    let lock = hold_coordinator_lock(pg, node, n);
    let mut gids = Vec::new();
    for db in ["a", "b"] {
        let gid = format!("fdt1:{node}:lc.{n}.a.{db}:bank");
        pg.client(db)
            .batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({v}); PREPARE TRANSACTION '{gid}'"))
            .unwrap();
        gids.push(gid);
    }
    if decided {
        let key = format!("fdt1:{node}:lc.{n}.a:bank");
        pg.client("a").execute("INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, 'a,b')", &[&key]).unwrap();
    }
    (gids, lock)
}

/// [`coordinator`], dead already.
fn orphan(pg: &PgCluster, node: &str, n: u64, v: i32, decided: bool) -> Vec<String> {
    coordinator(pg, node, n, v, decided).0
}

fn values(pg: &PgCluster, db: &str) -> Vec<i32> {
    pg.client(db).query("SELECT v FROM t ORDER BY v", &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// A session that holds the coordinator lock of local transaction `n` of `node` (coordinated
/// from `a`), as a live coordinator does.
fn hold_coordinator_lock(pg: &PgCluster, node: &str, n: u64) -> postgres::Client {
    let key = fdt_sdk::gid::coordinator_lock_key(&format!("fdt1:{node}:lc.{n}.a:bank"));
    let mut c = pg.client("a");
    c.execute("SELECT pg_advisory_lock($1)", &[&key]).unwrap();
    c
}

fn create_t(pg: &PgCluster) {
    for db in ["a", "b"] {
        pg.client(db).batch_execute("CREATE TABLE IF NOT EXISTS t (v int)").unwrap();
    }
}

#[test]
fn a_transfer_behind_a_silent_clients_row_lock_answers_err_within_lock_timeout() {
    let pg = PgCluster::start();
    let server = TestServer::start(&two_db_setup(&pg, 1, "lock_timeout = 0.5"));
    let addr = server.addr("bank");
    let (in_a, _) = open_accounts(&pg, addr, 6);
    let (held, other) = (&in_a[0], "acct_free");
    assert_eq!(LineClient::connect(addr).ask(&format!("OPEN {other} 10")), "OK");
    // A client takes the row lock and goes silent.
    let mut silent = LineClient::connect(addr);
    assert_eq!(silent.ask("BEGIN"), "OK");
    assert_eq!(silent.ask(&format!("DEBIT {held} 1")), "OK");
    let (answers, took) = ask_within(addr, &[&format!("TRANSFER {held} {other} 1")], Duration::from_secs(8));
    assert!(answers[0].starts_with("ERR ") && answers[0].contains("lock_timeout"), "{answers:?}");
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(4), "answered after {took:?}");
    // The worker is fine and the other accounts are not affected.
    let (answers, _) = ask_within(addr, &[&format!("TRANSFER {other} {} 1", in_a[1])], Duration::from_secs(4));
    assert_eq!(answers, ["OK"]);
    drop(silent);
}

#[test]
fn a_killed_workers_session_waiting_on_a_lock_ends_within_seconds() {
    let pg = PgCluster::start();
    // A long lock_timeout, so only the worker's death can end the wait.
    let server = TestServer::start(&two_db_setup(&pg, 1, "lock_timeout = 120\nstatement_timeout = 0"));
    let addr = server.addr("bank");
    let (in_a, _) = open_accounts(&pg, addr, 6);
    let mut holder = pg.client("a");
    holder.batch_execute(&format!("BEGIN; SELECT * FROM accounts WHERE id = '{}' FOR UPDATE", in_a[0])).unwrap();
    let mut waiting = LineClient::connect(addr);
    waiting.send(&format!("TRANSFER {} {} 1", in_a[0], in_a[1]));
    let waiting_backends = || -> Vec<i32> {
        pg.client("postgres")
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'fdtserver bank' \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let backend =
        wait_for(Duration::from_secs(5), "the transfer to wait on the lock", || waiting_backends().first().copied());
    let worker = server.worker_pids()[0];
    nix::sys::signal::kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    wait_for(Duration::from_secs(5), "the dead worker's backend to end", || {
        let gone: bool = pg
            .client("postgres")
            .query_one("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)", &[&backend])
            .unwrap()
            .get(0);
        gone.then_some(())
    });
    eprintln!("backend {backend} ended {:?} after its worker was killed", killed.elapsed());
    holder.batch_execute("ROLLBACK").unwrap();
    drop(waiting);
}

#[test]
fn transfers_in_opposite_directions_across_two_databases_all_succeed() {
    let pg = PgCluster::start();
    // A short lock_timeout: a distributed deadlock would show as ERR within seconds.
    let server = TestServer::start(&two_db_setup(&pg, 2, "lock_timeout = 2"));
    let addr = server.addr("bank");
    let (in_a, in_b) = open_accounts(&pg, addr, 6);
    let (x, y) = (in_a[0].clone(), in_b[0].clone());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (from, to) = if t % 2 == 0 { (x.clone(), y.clone()) } else { (y.clone(), x.clone()) };
            let (failures, ok) = (failures.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut c = LineClient::connect(addr);
                for _ in 0..25 {
                    let answer = c.ask(&format!("TRANSFER {from} {to} 1"));
                    if answer == "OK" {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(answer);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = start.elapsed();
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} of 200 transfers failed, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(ok.load(Ordering::Relaxed), 200);
    assert!(took < Duration::from_secs(30), "200 transfers took {took:?}");
    assert_eq!(total(&pg), 6 * INITIAL, "money was created or destroyed");
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty());
}

#[test]
fn the_running_server_settles_branches_whose_coordinator_is_gone_and_leaves_live_ones() {
    let pg = PgCluster::start();
    let server = TestServer::start(&two_db_setup(&pg, 1, ""));
    create_t(&pg);
    // A live coordinator (it holds its lock) and two dead ones, one decided, one not.
    let (live_gids, live) = coordinator(&pg, NODE, 1_000_001, 1, true);
    orphan(&pg, NODE, 1_000_002, 2, true);
    orphan(&pg, NODE, 1_000_003, 3, false);
    let start = Instant::now();
    wait_for(Duration::from_secs(5), "the dead coordinators' branches to be settled", || {
        (pg.prepared("a").len() == 1 && pg.prepared("b").len() == 1).then_some(())
    });
    eprintln!("settled {:?} after they were left", start.elapsed());
    assert_eq!(values(&pg, "a"), [2], "decided: committed; undecided: rolled back");
    assert_eq!(values(&pg, "b"), [2]);
    let mut left = pg.prepared("a");
    left.extend(pg.prepared("b"));
    left.sort();
    let mut want = live_gids.clone();
    want.sort();
    assert_eq!(left, want);
    // Recovery keeps looking: the live one is left alone while its lock is held…
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pg.prepared("b").len(), 1, "a branch of a live coordinator was settled");
    // …and settled once its coordinator is gone.
    drop(live);
    wait_for(Duration::from_secs(5), "the last coordinator's branches", || (values(&pg, "b") == [1, 2]).then_some(()));
    assert_eq!(values(&pg, "a"), [1, 2]);
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0, "decisions of settled transactions must be deleted");
    drop(server);
}

/// What a server of node `node` counted of `event` for bank (0 before any).
fn bank_events(server: &TestServer, event: &str) -> u64 {
    let (_, metrics) = server.control("GET", "/metrics").expect("the control socket answers");
    let prefix = format!("fdtserver_app_events_total{{app=\"bank\",event=\"{event}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

/// A node that died mid-commit has no worker left to settle what it coordinated: a running
/// server of another node does, once that node's coordinator is provably gone (its lock free),
/// and never while a live session still holds it.
#[test]
fn the_running_server_settles_another_nodes_branches_once_its_coordinator_is_gone() {
    let pg = PgCluster::start();
    let server = TestServer::start(&two_db_setup(&pg, 1, "").server("node_id", "\"n1\""));
    create_t(&pg);
    // Node "alive": a coordinator at work (its session holds the lock), decided.
    let (alive_gids, alive) = coordinator(&pg, "alive", 3, 3, true);
    // Node "dead": two dead coordinators, one decided, one not, and a branch prepared for an
    // outside coordinator, which only that coordinator may settle.
    orphan(&pg, "dead", 1, 1, true);
    orphan(&pg, "dead", 2, 2, false);
    let outside = "fdt1:dead:ext-1:bank";
    prepare_in(&pg, "b", outside, 9);
    let start = Instant::now();
    wait_for(Duration::from_secs(5), "node dead's branches to be settled", || {
        (values(&pg, "a") == [1] && values(&pg, "b") == [1]).then_some(())
    });
    eprintln!("node dead's branches settled {:?} after they were left", start.elapsed());
    assert_eq!(pg.prepared("a"), [alive_gids[0].clone()], "decided: committed; undecided: rolled back");
    let mut left = pg.prepared("b");
    left.sort();
    assert_eq!(left, [alive_gids[1].as_str(), outside]);
    // The log says which node coordinated what it settled.
    wait_for(Duration::from_secs(5), "the settled branches in the log", || {
        let log = server.log();
        let line = |verb: &str, n: u64| {
            log.lines().any(|l| {
                l.contains(&format!("recovery: {verb} fdt1:dead:lc.{n}.a.")) && l.contains("coordinator on node dead")
            })
        };
        (line("committed", 1) && line("rolled back", 2)).then_some(())
    });
    // Node alive's transaction is left alone while its coordinator's session lives…
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(pg.prepared("a"), [alive_gids[0].clone()], "a branch of a live coordinator was settled");
    assert_eq!(values(&pg, "a"), [1]);
    // …and settled once it is gone.
    drop(alive);
    let gone = Instant::now();
    wait_for(Duration::from_secs(5), "node alive's branches", || {
        (values(&pg, "a") == [1, 3] && values(&pg, "b") == [1, 3]).then_some(())
    });
    eprintln!("node alive's branches settled {:?} after its coordinator's session closed", gone.elapsed());
    assert!(pg.prepared("a").is_empty());
    assert_eq!(pg.prepared("b"), [outside], "a branch of an outside coordinator was settled");
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0, "decisions of settled transactions must be deleted");
    drop(server);
}

/// How many of the servers' sessions in database a run (or last ran) a statement that starts
/// with `statement` — only those waiting on a lock when `waiting`.
fn sessions_in(pg: &PgCluster, statement: &str, waiting: bool) -> i64 {
    pg.client("postgres")
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'a' AND application_name = 'fdtserver bank' \
             AND starts_with(query, $1) AND (NOT $2 OR wait_event_type = 'Lock')",
            &[&statement, &waiting],
        )
        .unwrap()
        .get(0)
}

/// Two servers (nodes n1 and n2, two workers each: four recoveries) over the same databases,
/// and many transactions of node "dead", whose coordinators all go at once. The four
/// recoveries are made to start together, each holding one transaction, and then race over
/// the rest with the same stale first look: every branch is settled exactly once (the servers'
/// counts add up), the way its decision says, and the decisions go.
#[test]
fn two_running_servers_recovering_the_same_dead_nodes_transactions_settle_each_branch_once_and_rightly() {
    const TRANSACTIONS: u64 = 40;
    let pg = PgCluster::start_with(2 * TRANSACTIONS as u32 + 16);
    // Recovery waits on the test's table lock below: longer than the default lock_timeout.
    let setup = two_db_setup(&pg, 2, "lock_timeout = 30");
    let n1 = TestServer::start(&setup.clone().server("node_id", "\"n1\""));
    let n2 = TestServer::start(&setup.server("node_id", "\"n2\""));
    create_t(&pg);
    // One session holds every coordinator's lock, as live coordinators would.
    let key = |n: u64| format!("fdt1:dead:lc.{n}.a:bank");
    let lock = |n: u64| fdt_sdk::gid::coordinator_lock_key(&key(n));
    let mut coordinators = pg.client("a");
    for n in 1..=TRANSACTIONS {
        coordinators.execute("SELECT pg_advisory_lock($1)", &[&lock(n)]).unwrap();
    }
    let (mut a, mut b) = (pg.client("a"), pg.client("b"));
    let decided = |n: u64| !n.is_multiple_of(3);
    for n in 1..=TRANSACTIONS {
        for (db, client) in [("a", &mut a), ("b", &mut b)] {
            let gid = format!("fdt1:dead:lc.{n}.a.{db}:bank");
            client.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({n}); PREPARE TRANSACTION '{gid}'")).unwrap();
        }
        if decided(n) {
            a.execute("INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, 'a,b')", &[&key(n)]).unwrap();
        }
    }
    // Line the four recoveries up: with the decision table locked, each finds every coordinator
    // alive and then waits on the table in its clean-up of decisions, holding no lock of ours.
    let mut table = pg.client("a");
    table.batch_execute("BEGIN; LOCK TABLE fdt_decisions IN ACCESS EXCLUSIVE MODE").unwrap();
    wait_for(Duration::from_secs(5), "four recoveries waiting in their clean-up", || {
        (sessions_in(&pg, "SELECT gtrid, participants FROM fdt_decisions", true) == 4).then_some(())
    });
    assert_eq!(pg.prepared("a").len(), TRANSACTIONS as usize, "a live coordinator's branches were settled");
    // The whole node dies.
    drop(coordinators);
    wait_for(Duration::from_secs(5), "the dead node's locks to be free", || {
        let free: bool = a.query_one("SELECT pg_try_advisory_lock($1)", &[&lock(TRANSACTIONS)]).unwrap().get(0);
        free.then(|| a.execute("SELECT pg_advisory_unlock($1)", &[&lock(TRANSACTIONS)]).unwrap()).map(drop)
    });
    // Let the clean-ups read the table (they touch it no more: every decision still has its
    // branches) and lock it again before their next rounds, a second later and together: each
    // takes one transaction's coordinator lock and waits to read its decision.
    table.batch_execute("ROLLBACK").unwrap();
    wait_for(Duration::from_secs(5), "the clean-ups past the decision table", || {
        (sessions_in(&pg, "SELECT gtrid, participants FROM fdt_decisions", false) == 0).then_some(())
    });
    table.batch_execute("BEGIN; LOCK TABLE fdt_decisions IN ACCESS EXCLUSIVE MODE").unwrap();
    wait_for(Duration::from_secs(5), "four recoveries, each holding a transaction", || {
        (sessions_in(&pg, "SELECT 1 FROM fdt_decisions", true) == 4).then_some(())
    });
    assert_eq!(pg.prepared("a").len(), TRANSACTIONS as usize, "settled without reading the decision");
    let released = Instant::now();
    table.batch_execute("ROLLBACK").unwrap();
    let committed: Vec<i32> = (1..=TRANSACTIONS).filter(|&n| decided(n)).map(|n| n as i32).collect();
    wait_for(Duration::from_secs(10), "every branch of node dead settled", || {
        (pg.prepared("a").is_empty() && pg.prepared("b").is_empty()).then_some(())
    });
    eprintln!("{TRANSACTIONS} transactions settled {:?} after the recoveries were let go", released.elapsed());
    assert_eq!(values(&pg, "a"), committed, "exactly the decided transactions are committed");
    assert_eq!(values(&pg, "b"), committed, "exactly the decided transactions are committed");
    wait_for(Duration::from_secs(5), "the decisions deleted", || {
        let left: i64 = a.query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
        (left == 0).then_some(())
    });
    // Each branch settled once: the two servers' counts add up to the number of branches.
    let by_server = |event: &str| [&n1, &n2].map(|server| bank_events(server, event));
    let branches = |commit: bool| 2 * (1..=TRANSACTIONS).filter(|&n| decided(n) == commit).count() as u64;
    let (commits, rollbacks) = wait_for(Duration::from_secs(5), "the recovered counts in the metrics", || {
        let (c, r) = (by_server("txn_recovered_commit"), by_server("txn_recovered_rollback"));
        (c.iter().sum::<u64>() >= branches(true) && r.iter().sum::<u64>() >= branches(false)).then_some((c, r))
    });
    eprintln!("branches committed by n1, n2: {commits:?}; rolled back: {rollbacks:?}");
    let total = (commits.iter().sum::<u64>(), rollbacks.iter().sum::<u64>());
    assert_eq!(total, (branches(true), branches(false)), "a branch was settled twice");
    // Both servers settled at least the transaction each of their workers held when let go.
    for (i, node) in ["n1", "n2"].iter().enumerate() {
        assert!(commits[i] + rollbacks[i] >= 4, "{node} settled only {} branches", commits[i] + rollbacks[i]);
    }
    for (server, node) in [(&n1, "n1"), (&n2, "n2")] {
        let log = server.log();
        assert!(!log.contains("recovery of transactions whose coordinator is gone failed"), "{node}:\n{log}");
    }
}

#[test]
fn workers_killed_during_cross_database_transfers_leave_nothing_prepared_while_the_server_runs() {
    let pg = PgCluster::start();
    let server = TestServer::start(&two_db_setup(&pg, 2, ""));
    let addr = server.addr("bank");
    let (in_a, in_b) = open_accounts(&pg, addr, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|t| {
            let (in_a, in_b, stop) = (in_a.clone(), in_b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (x, y) = (&in_a[n % in_a.len()], &in_b[(n / 2) % in_b.len()]);
                    let (from, to) = if n % 2 == 0 { (x, y) } else { (y, x) };
                    // Workers die under us: errors and cut connections are expected here.
                    if let Ok(s) = std::net::TcpStream::connect(addr) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut c = std::io::BufReader::new(s);
                        let _ = std::io::Write::write_all(c.get_mut(), format!("TRANSFER {from} {to} 1\n").as_bytes());
                        let _ = std::io::BufRead::read_line(&mut c, &mut String::new());
                    }
                }
            })
        })
        .collect();
    let mut kills = 0;
    let end = Instant::now() + Duration::from_secs(4);
    let mut i = 0u64;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(400 + (i * 97) % 200));
        i += 1;
        let pids = server.worker_pids();
        if let Some(&victim) = pids.get(i as usize % pids.len().max(1)) {
            let _ = nix::sys::signal::kill(Pid::from_raw(victim), Signal::SIGKILL);
            kills += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let stopped = Instant::now();
    server.wait_serving();
    wait_for(Duration::from_secs(10), "nothing left prepared", || {
        (pg.prepared("a").is_empty() && pg.prepared("b").is_empty()).then_some(())
    });
    eprintln!("{kills} kills; nothing prepared {:?} after the load stopped", stopped.elapsed());
    assert!(stopped.elapsed() < Duration::from_secs(10));
    // Every account can be transferred again, at once.
    let accounts: Vec<&String> = in_a.iter().chain(&in_b).collect();
    for pair in accounts.windows(2) {
        let (answers, _) = ask_within(addr, &[&format!("TRANSFER {} {} 1", pair[0], pair[1])], Duration::from_secs(4));
        assert_eq!(answers, ["OK"], "{} → {}", pair[0], pair[1]);
    }
    assert_eq!(total(&pg), 8 * INITIAL, "money was created or destroyed");
    assert!(kills > 0);
}

#[test]
fn txn_recover_right_after_the_server_is_killed_settles_everything_and_exits_0() {
    let pg = PgCluster::start();
    let mut server = TestServer::start(&two_db_setup(&pg, 2, ""));
    let addr = server.addr("bank");
    let (in_a, in_b) = open_accounts(&pg, addr, 6);
    create_t(&pg);
    // Load, then the whole server killed at once, mid-commit for some transfers.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (x, y, stop) = (in_a[t % in_a.len()].clone(), in_b[t % in_b.len()].clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = std::net::TcpStream::connect(addr) {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut c = std::io::BufReader::new(s);
                        let _ = std::io::Write::write_all(c.get_mut(), format!("TRANSFER {x} {y} 1\n").as_bytes());
                        let _ = std::io::BufRead::read_line(&mut c, &mut String::new());
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::killpg(Pid::from_raw(server.pid), Signal::SIGKILL).unwrap();
    server.wait_exit(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    // And for certain: branches a killed coordinator left a moment ago, decided or not.
    orphan(&pg, NODE, 1_000_001, 1, true);
    orphan(&pg, NODE, 1_000_002, 2, false);
    let (code, out, err) = server.cli(&["txn", "recover"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty(), "left prepared:\n{out}");
    assert_eq!((values(&pg, "a"), values(&pg, "b")), (vec![1], vec![1]), "{out}");
    assert_eq!(total(&pg), 6 * INITIAL, "money was created or destroyed");
    // --min-age is still accepted.
    let (code, out, err) = server.cli(&["txn", "recover", "--min-age", "0"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn txn_recover_leaves_a_live_coordinators_branches_and_settles_another_nodes_with_node() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    create_t(&pg);
    for db in ["a", "b"] {
        pg.client(db)
            .batch_execute(
                "CREATE TABLE fdt_decisions (gtrid text PRIMARY KEY, participants text NOT NULL, \
                 decided_at timestamptz NOT NULL DEFAULT now())",
            )
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = pg.bank_config(dir.path(), NODE);
    // This node: one live coordinator. Node "web-2": one dead coordinator, decided.
    let (_, live) = coordinator(&pg, NODE, 7, 7, true);
    let other = orphan(&pg, "web-2", 8, 8, true);
    let (code, out, err) = cli(&["txn", "recover"], &config);
    assert_eq!(code, 2, "a live coordinator's transaction remains: exit 2\n{out}{err}");
    assert!(out.contains("in flight") && err.contains("still held by their coordinator"), "{out}{err}");
    assert_eq!(pg.prepared("a").len(), 2, "{out}");
    // Another node's transactions: only with --node.
    assert!(!out.contains(&other[0]), "{out}");
    let (code, out, err) = cli(&["txn", "recover", "--node", "web-2"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&other[0]) && out.contains("committed"), "{out}");
    assert_eq!(values(&pg, "b"), [8]);
    // Once the coordinator is gone, this node's is settled too.
    drop(live);
    let (code, out, err) = cli(&["txn", "recover"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(values(&pg, "b"), [7, 8]);
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty());
    let (code, _, err) = cli(&["txn", "recover", "--node", "bad:node"], &config);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn txn_commands_explain_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, setup: Setup| {
        let path = dir.path().join(name);
        std::fs::write(&path, setup.render(dir.path())).unwrap();
        path
    };
    let base =
        || Setup::new(1, 1).app("bank", "bank", "databases = [\"a\", \"b\"]").server("node_id", &format!("\"{NODE}\""));
    let none = write("none.toml", base());
    let (code, _, err) = cli(&["txn", "list"], &none);
    assert_eq!(code, 1);
    assert!(err.contains("has no [database.*] section"), "{err}");
    let gone = write("gone.toml", base().extra("[database.a]\nurl = \"host=/nonexistent port=5432 user=postgres\"\n"));
    let (code, _, err) = cli(&["txn", "recover"], &gone);
    assert_eq!(code, 1);
    assert!(err.contains("database a: cannot connect"), "{err}");
    let (code, _, err) = cli(&["txn", "recover"], &dir.path().join("missing.toml"));
    assert_eq!(code, 1, "{err}");

    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    create_t(&pg);
    let only_b = write("b.toml", base().extra(&format!("[database.b]\nurl = \"{}\"\n", pg.url("b"))));
    let (code, _, err) = cli(&["txn", "recover", "--min-age=-1"], &only_b);
    assert_eq!(code, 1);
    assert!(err.contains("--min-age"), "{err}");
    let (code, _, err) = cli(&["txn", "commit", &format!("fdt1:{NODE}:nope:bank")], &only_b);
    assert_eq!(code, 1);
    assert!(err.contains("no prepared transaction") && err.contains("database(s) b"), "{err}");
    // Branches of every kind, as `list` names their coordinators.
    let prepare = |gid: &str| {
        pg.client("b").batch_execute(&format!("BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION '{gid}'")).unwrap();
    };
    let local = format!("fdt1:{NODE}:lc.5.a.b:bank");
    prepare(&local);
    prepare(&format!("fdt1:{NODE}:ext-1:bank"));
    prepare("fdt1:web-9:ext-2:bank");
    prepare("someone-else-17");
    let (code, out, err) = cli(&["txn", "list"], &only_b);
    assert_eq!(code, 0, "{err}");
    for (gid, who) in [
        (local.as_str(), "this node"),
        (&format!("fdt1:{NODE}:ext-1:bank"), "outside (via this node)"),
        ("fdt1:web-9:ext-2:bank", "another node"),
        ("someone-else-17", "not fdtserver"),
    ] {
        assert!(out.lines().any(|l| l.starts_with(gid) && l.ends_with(who)), "{gid} {who}:\n{out}");
    }
    // The local branch's coordinator database (a) is not configured here: cannot be settled.
    let (code, out, err) = cli(&["txn", "recover"], &only_b);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("not configured here") && err.contains("configure their coordinator database"), "{out}{err}");
    assert_eq!(pg.prepared("b").len(), 4);
    // Nor by hand: its decision cannot be read from here.
    let (code, out, err) = cli(&["txn", "rollback", &local], &only_b);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("not configured here") && err.contains("fdtserver txn recover"), "{err}");
    assert_eq!(pg.prepared("b").len(), 4);
    let (code, out, err) = cli(&["txn", "rollback", &format!("fdt1:{NODE}:ext-1:bank")], &only_b);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rolled back"), "{out}");
}

/// A bank over database `a` only, with `txn_idle_timeout` and `pool_size` as given.
fn idle_setup(pg: &PgCluster, txn_idle_timeout: &str, pool_size: usize) -> Setup {
    pg.create_db("a");
    Setup::new(1, 4)
        .app("bank", "bank", &format!("database = \"a\"\ntxn_idle_timeout = {txn_idle_timeout}"))
        .server("node_id", &format!("\"{NODE}\""))
        .extra(&format!("[database.a]\nurl = \"{}\"\npool_size = {pool_size}\n", pg.url("a")))
}

#[test]
fn silent_clients_with_open_transactions_are_rolled_back_after_txn_idle_timeout_and_free_the_pool() {
    let pg = PgCluster::start();
    // Two pooled connections, both taken by clients that begin, debit and go silent.
    let server = TestServer::start(&idle_setup(&pg, "1", 2));
    let addr = server.addr("bank");
    let mut setup = LineClient::connect(addr);
    for acct in ["x0", "x1", "x2"] {
        assert_eq!(setup.ask(&format!("OPEN {acct} 100")), "OK");
    }
    let started = Instant::now();
    let mut silent: Vec<LineClient> = ["x0", "x1"]
        .iter()
        .map(|acct| {
            let mut c = LineClient::connect(addr);
            assert_eq!(c.ask("BEGIN"), "OK");
            assert_eq!(c.ask(&format!("DEBIT {acct} 5")), "OK");
            c
        })
        .collect();
    // Each is told why, then disconnected, about one second after its last line.
    for c in &mut silent {
        assert_eq!(c.recv().as_deref(), Some("ERR transaction idle too long"));
        assert!(c.closed_by_peer());
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "rolled back after {waited:?}, before the timeout");
    assert!(waited < Duration::from_secs(4), "rolled back only after {waited:?}");
    // Their debits are gone, their row locks and pooled connections free: a transfer from the
    // accounts they held answers at once.
    let (answers, took) =
        ask_within(addr, &["TRANSFER x0 x2 1", "TRANSFER x1 x2 1", "BALANCE x0"], Duration::from_secs(3));
    assert_eq!(answers, ["OK", "OK", "OK 99"], "took {took:?}");
    // Counted in the metrics (workers report every half second).
    wait_for(READY_TIMEOUT, "2 idle timeouts in the metrics", || {
        let (_, metrics) = server.control("GET", "/metrics")?;
        metrics.contains("fdtserver_app_events_total{app=\"bank\",event=\"txn_idle_timeouts\"} 2").then_some(())
    });
}

#[test]
fn txn_idle_timeout_spares_talking_clients_prepared_transactions_and_clients_between_transactions() {
    let pg = PgCluster::start();
    let server = TestServer::start(&idle_setup(&pg, "0.6", 4));
    let addr = server.addr("bank");
    let mut talking = LineClient::connect(addr);
    assert_eq!(talking.ask("OPEN y0 100"), "OK");
    assert_eq!(talking.ask("OPEN y1 100"), "OK");
    let mut prepared_client = LineClient::connect(addr);
    assert_eq!(prepared_client.ask("BEGIN"), "OK");
    assert_eq!(prepared_client.ask("DEBIT y1 1"), "OK");
    assert!(prepared_client.ask("PREPARE idle-test").starts_with("PREPARED "));
    let mut between = LineClient::connect(addr);
    assert_eq!(between.ask("BALANCE y0"), "OK 100");
    assert_eq!(talking.ask("BEGIN"), "OK");
    // A client that keeps talking inside its transaction for three timeouts is never cut.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(talking.ask("BALANCE y0"), "OK 100");
    }
    assert_eq!(talking.ask("DEBIT y0 1"), "OK");
    assert_eq!(talking.ask("COMMIT"), "COMMITTED");
    // Quiet for twice the timeout: the prepared transaction and the idle client are untouched.
    std::thread::sleep(Duration::from_millis(1300));
    for c in [&mut prepared_client, &mut between] {
        c.stream().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        assert!(!c.closed_by_peer(), "a connection without an idle open transaction stays");
        c.stream().set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    }
    assert_eq!(pg.prepared("a").len(), 1, "the prepared transaction is its coordinator's");
    assert_eq!(prepared_client.ask("COMMIT"), "COMMITTED");
    assert_eq!(between.ask("BALANCE y1"), "OK 99");
}

/// The decision table as the SDK creates it, in database `a` (for tests without a server).
fn create_decisions(pg: &PgCluster) {
    pg.client("a")
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS fdt_decisions (gtrid text PRIMARY KEY, participants text NOT NULL, \
             decided_at timestamptz NOT NULL DEFAULT now())",
        )
        .unwrap();
}

fn prepare_in(pg: &PgCluster, db: &str, gid: &str, v: i32) {
    pg.client(db).batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({v}); PREPARE TRANSACTION '{gid}'")).unwrap();
}

/// Recovery settles the branches it finds once it holds the coordinator lock, not those of its
/// first look: a coordinator may prepare a branch after that look, record the decision, commit
/// another branch and die. That branch must be committed too, and the decision kept until no
/// branch of it is left — not deleted, which made the next round roll the branch back.
#[test]
fn recovery_commits_a_branch_prepared_after_its_first_look_and_keeps_the_decision_until_then() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    create_t(&pg);
    create_decisions(&pg);
    // Transaction 1: an orphan, undecided (recovery looks at it first: its key sorts first).
    orphan(&pg, NODE, 1, 1, false);
    // Transaction 2: a live coordinator with only its branch in a prepared so far, decided.
    let t2 = |db: &str| format!("fdt1:{NODE}:lc.2.a.{db}:bank");
    let coordinator2 = hold_coordinator_lock(&pg, NODE, 2);
    prepare_in(&pg, "a", &t2("a"), 2);
    pg.client("a")
        .execute(
            "INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, 'a,b')",
            &[&format!("fdt1:{NODE}:lc.2.a:bank")],
        )
        .unwrap();
    // Hold recovery on transaction 1 (reading its decision), after its first look.
    let mut hold = pg.client("a");
    hold.batch_execute("BEGIN; LOCK TABLE fdt_decisions IN ACCESS EXCLUSIVE MODE").unwrap();
    let (url_a, url_b) = (pg.url("a"), pg.url("b"));
    let (done, rounds) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let connect = |url: &str| postgres::Client::connect(url, postgres::NoTls).unwrap();
        let mut dbs = vec![("a".to_string(), connect(&url_a)), ("b".to_string(), connect(&url_b))];
        let only = fdt_sdk::txn::recovery::Nodes::Only(NODE);
        let first = fdt_sdk::txn::recovery::recover(&mut dbs, only, None, Duration::ZERO);
        let second = fdt_sdk::txn::recovery::recover(&mut dbs, only, None, Duration::ZERO);
        let _ = done.send((first, second));
    });
    wait_for(Duration::from_secs(5), "recovery to wait on the decision table", || {
        let waiting: i64 = pg
            .client("postgres")
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = 'a' AND wait_event_type = 'Lock'", &[])
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    });
    // Meanwhile the coordinator prepares b, commits a, and dies before committing b.
    prepare_in(&pg, "b", &t2("b"), 2);
    pg.client("a").batch_execute(&format!("COMMIT PREPARED '{}'", t2("a"))).unwrap();
    drop(coordinator2);
    let key = fdt_sdk::gid::coordinator_lock_key(&format!("fdt1:{NODE}:lc.2.a:bank"));
    wait_for(Duration::from_secs(5), "the dead coordinator's lock to be free", || {
        let mut probe = pg.client("a");
        let free: bool = probe.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).unwrap().get(0);
        // Released here, not when this session ends: recovery must find it free.
        free.then(|| probe.execute("SELECT pg_advisory_unlock($1)", &[&key]).unwrap()).map(drop)
    });
    hold.batch_execute("ROLLBACK").unwrap();
    let (first, second) = rounds.recv_timeout(Duration::from_secs(10)).expect("recovery did not finish");
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(values(&pg, "b"), [2], "a branch of a committed transaction was rolled back: {first:?} {second:?}");
    assert_eq!(values(&pg, "a"), [2]);
    assert!(first.committed.contains(&t2("b")), "the branch prepared after the first look is reported: {first:?}");
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty());
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0, "once no branch is left, the decision goes");
}

/// The coordinator lock and the decision are looked up by the database name in the gid, and
/// advisory locks are per database: a node that names the shared databases otherwise would
/// look in the wrong one. A branch found in a database whose name its gid does not carry shows
/// that, and recovery leaves the whole transaction alone.
#[test]
fn recovery_leaves_alone_a_transaction_whose_branch_is_found_under_another_database_name() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    create_t(&pg);
    let gids = orphan(&pg, "web-2", 1, 1, false);
    let connect = |db: &str| postgres::Client::connect(&pg.url(db), postgres::NoTls).unwrap();
    let recover = |dbs: &mut [(String, postgres::Client)]| {
        fdt_sdk::txn::recovery::recover(dbs, fdt_sdk::txn::recovery::Nodes::Any, None, Duration::ZERO).unwrap()
    };
    // Database a under the name b and the other way round.
    let mut swapped = [("a".to_string(), connect("b")), ("b".to_string(), connect("a"))];
    let report = recover(&mut swapped);
    let mut misnamed = report.misnamed.clone();
    misnamed.sort();
    assert_eq!(misnamed, gids, "{report:?}");
    assert!(report.rolled_back.is_empty() && !report.all_local_settled(), "{report:?}");
    assert_eq!((pg.prepared("a").len(), pg.prepared("b").len()), (1, 1));
    // Under the names its node gave them: settled.
    let mut named = [("a".to_string(), connect("a")), ("b".to_string(), connect("b"))];
    let report = recover(&mut named);
    assert_eq!(report.rolled_back.len(), 2, "{report:?}");
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty());
}

/// `fdtserver txn commit|rollback` on a branch of a locally coordinated transaction: only under
/// its coordinator lock, and only the way its decision says.
#[test]
fn txn_commit_and_rollback_of_a_local_branch_follow_the_decision_and_wait_for_the_coordinator() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    create_t(&pg);
    create_decisions(&pg);
    let dir = tempfile::tempdir().unwrap();
    let config = pg.bank_config(dir.path(), NODE);
    // A live coordinator: nothing may be settled by hand.
    let (live, lock) = coordinator(&pg, NODE, 1, 1, true);
    for verb in ["commit", "rollback"] {
        let (code, out, err) = cli(&["txn", verb, &live[1]], &config);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("its coordinator is still working on it"), "{err}");
    }
    assert_eq!(pg.prepared("b").len(), 1);
    drop(lock);
    // Decided: commit only.
    wait_for(Duration::from_secs(5), "the coordinator's lock to be free", || {
        let (code, out, err) = cli(&["txn", "rollback", &live[1]], &config);
        (code != 2).then_some((code, out, err))
    });
    let (code, out, err) = cli(&["txn", "rollback", &live[1]], &config);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refusing to roll back") && err.contains("fdtserver txn recover"), "{err}");
    assert_eq!(pg.prepared("b").len(), 1, "a branch of a committed transaction was rolled back");
    let (code, out, err) = cli(&["txn", "commit", &live[1]], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("committed"), "{out}");
    assert_eq!(values(&pg, "b"), [1]);
    // Undecided: rollback only.
    let undecided = orphan(&pg, NODE, 2, 2, false);
    let (code, out, err) = cli(&["txn", "commit", &undecided[0]], &config);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refusing to commit") && err.contains("no decision was recorded"), "{err}");
    let (code, out, err) = cli(&["txn", "rollback", &undecided[0]], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(values(&pg, "a"), Vec::<i32>::new());
}
