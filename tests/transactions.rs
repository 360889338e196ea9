//! Transactions tied to connections: each row of the guarantee table, proved against a real
//! PostgreSQL started for the test, through the `bank` app over TCP.

mod util;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::pg::PgCluster;
use util::*;

const NODE: &str = "test-node";

/// A server with `bank` on database `bank` of `pg`, and accounts alice and bob with 100 each.
fn bank(pg: &PgCluster, workers: usize, graceful_timeout: u32) -> TestServer {
    pg.create_db("bank");
    let setup = Setup::new(workers, 4)
        .app("bank", "bank", "database = \"main\"")
        .server("node_id", &format!("\"{NODE}\""))
        .server("graceful_timeout", &graceful_timeout.to_string())
        .extra(&format!("[database.main]\nurl = \"{}\"\npool_size = 4\n", pg.url("bank")));
    let server = TestServer::start(&setup);
    let mut c = LineClient::connect(server.addr("bank"));
    assert_eq!(c.ask("OPEN alice 100"), "OK");
    assert_eq!(c.ask("OPEN bob 100"), "OK");
    server
}

fn balance(pg: &PgCluster, db: &str, acct: &str) -> i64 {
    pg.client(db).query_one("SELECT balance FROM accounts WHERE id = $1", &[&acct]).unwrap().get(0)
}

/// Two clients: one with alice debited 10 in an open transaction, one with bob debited 20 in a
/// transaction prepared as `gtrid`. Returns both and the gid.
fn active_and_prepared(addr: std::net::SocketAddr, gtrid: &str) -> (LineClient, LineClient, String) {
    let mut active = LineClient::connect(addr);
    assert_eq!(active.ask("BEGIN"), "OK");
    assert_eq!(active.ask("DEBIT alice 10"), "OK");
    let mut prep = LineClient::connect(addr);
    assert_eq!(prep.ask("BEGIN"), "OK");
    assert_eq!(prep.ask("DEBIT bob 20"), "OK");
    let gid = format!("fdt1:{NODE}:{gtrid}:bank");
    assert_eq!(prep.ask(&format!("PREPARE {gtrid}")), format!("PREPARED {gid}"));
    (active, prep, gid)
}

/// Asks on a thread and gives up after `limit`: a lock that is not freed must fail the test,
/// not hang it.
fn ask_within(addr: std::net::SocketAddr, lines: &[&str], limit: Duration) -> Vec<String> {
    let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut c = LineClient::connect(addr);
        let answers: Vec<String> = lines.iter().map(|l| c.ask(l)).collect();
        let _ = tx.send(answers);
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("no answer within {limit:?}: a lock was not freed"))
}

#[test]
fn a_client_that_vanishes_mid_transaction_is_rolled_back_and_its_locks_freed_at_once() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let addr = server.addr("bank");
    let mut a = LineClient::connect(addr);
    assert_eq!(a.ask("BEGIN"), "OK");
    assert_eq!(a.ask("DEBIT alice 10"), "OK"); // holds alice's row lock
    drop(a);
    let answers = ask_within(addr, &["BEGIN", "DEBIT alice 5", "COMMIT"], Duration::from_secs(3));
    assert_eq!(answers, ["OK", "OK", "COMMITTED"]);
    assert_eq!(balance(&pg, "bank", "alice"), 95, "the vanished client's debit was applied");
}

#[test]
fn a_client_that_vanishes_after_prepare_leaves_it_prepared_for_its_coordinator() {
    let pg = PgCluster::start();
    let server = bank(&pg, 2, 10);
    let addr = server.addr("bank");
    let mut a = LineClient::connect(addr);
    assert_eq!(a.ask("BEGIN"), "OK");
    assert_eq!(a.ask("DEBIT alice 10"), "OK");
    let gid = format!("fdt1:{NODE}:order-1:bank");
    assert_eq!(a.ask("PREPARE order-1"), format!("PREPARED {gid}"));
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pg.prepared("bank"), std::slice::from_ref(&gid), "not left prepared");
    // Visible to operators and to the coordinator…
    let (code, out, err) = server.cli(&["txn", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&gid) && out.contains("outside"), "{out}");
    let mut b = LineClient::connect(addr);
    assert_eq!(b.ask("RECOVER"), format!("OK {gid}"));
    // …who settles it by gid from a new connection.
    assert_eq!(b.ask(&format!("RESOLVE COMMIT {gid}")), "COMMITTED");
    assert_eq!(balance(&pg, "bank", "alice"), 90);
    assert!(pg.prepared("bank").is_empty());
    assert_eq!(b.ask(&format!("RESOLVE COMMIT {gid}")), "ERR unknown gid");
    assert_eq!(b.ask("RECOVER"), "OK");
    // …and it was counted.
    for event in ["txn_prepared", "txn_left_prepared", "txn_resolved_commit"] {
        let line = format!("fdtserver_app_events_total{{app=\"bank\",event=\"{event}\"}} 1");
        wait_for(Duration::from_secs(3), &line, || server.control("GET", "/metrics")?.1.contains(&line).then_some(()));
    }
}

#[test]
fn a_commit_sent_just_before_the_client_vanishes_is_finished() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let mut a = LineClient::connect(server.addr("bank"));
    // Everything in one write, then gone without reading a single answer.
    std::io::Write::write_all(a.stream(), b"BEGIN\nDEBIT alice 7\nCREDIT bob 7\nCOMMIT\n").unwrap();
    a.stream().shutdown(std::net::Shutdown::Both).unwrap();
    drop(a);
    wait_for(Duration::from_secs(3), "the commit", || (balance(&pg, "bank", "bob") == 107).then_some(()));
    assert_eq!(balance(&pg, "bank", "alice"), 93);
}

#[test]
fn killing_the_worker_aborts_open_transactions_and_keeps_prepared_ones() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let addr = server.addr("bank");
    let (_active, _prep, gid) = active_and_prepared(addr, "k-1");
    let worker = server.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    wait_for(READY_TIMEOUT, "a replacement worker", || server.worker_pids().first().filter(|&&p| p != worker).copied());
    server.wait_serving();
    // PostgreSQL aborted the unprepared one (its connection died): alice is free.
    let answers = ask_within(addr, &["BEGIN", "DEBIT alice 1", "COMMIT"], Duration::from_secs(5));
    assert_eq!(answers, ["OK", "OK", "COMMITTED"]);
    assert_eq!(balance(&pg, "bank", "alice"), 99);
    // The prepared one survived the crash, and is settled by gid.
    assert_eq!(pg.prepared("bank"), std::slice::from_ref(&gid));
    assert_eq!(LineClient::connect(addr).ask(&format!("RESOLVE ROLLBACK {gid}")), "ROLLED-BACK");
    assert_eq!(balance(&pg, "bank", "bob"), 100);
}

#[test]
fn a_reload_lets_open_transactions_finish_on_the_old_worker() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let addr = server.addr("bank");
    let mut a = LineClient::connect(addr);
    assert_eq!(a.ask("BEGIN"), "OK");
    assert_eq!(a.ask("DEBIT alice 10"), "OK");
    let old = server.worker_pids()[0];
    assert_eq!(server.reload().0, 200);
    std::thread::sleep(Duration::from_millis(500)); // past the drain's idle grace
    assert!(alive(old), "the old worker left with a transaction open");
    assert_eq!(a.ask("CREDIT bob 10"), "OK");
    assert_eq!(a.ask("COMMIT"), "COMMITTED");
    assert_eq!((balance(&pg, "bank", "alice"), balance(&pg, "bank", "bob")), (90, 110));
    // Between requests again, without a transaction: the old worker closes it and exits.
    wait_for(Duration::from_secs(3), "the old worker to exit", || (!alive(old)).then_some(()));
}

#[test]
fn a_stop_rolls_back_active_transactions_at_graceful_timeout_and_leaves_prepared_ones() {
    let pg = PgCluster::start();
    let mut server = bank(&pg, 1, 1);
    let (_active, _prep, gid) = active_and_prepared(server.addr("bank"), "stop-1");
    let stopping = Instant::now();
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    assert!(stopping.elapsed() >= Duration::from_millis(900), "did not wait for graceful_timeout");
    assert_eq!(balance(&pg, "bank", "alice"), 100, "the active transaction was not rolled back");
    assert_eq!(pg.prepared("bank"), std::slice::from_ref(&gid), "the prepared transaction must be left alone");
    assert!(server.log().contains(&gid), "the log does not report the prepared gid");
    // The operator settles it with the CLI (no server running).
    let (code, out, err) = server.cli(&["txn", "commit", &gid]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(balance(&pg, "bank", "bob"), 80);
}

#[test]
fn the_server_refuses_a_database_without_two_phase_commit() {
    let pg = PgCluster::start_with(0);
    pg.create_db("bank");
    let setup = Setup::new(1, 1)
        .app("bank", "bank", "database = \"main\"")
        .extra(&format!("[database.main]\nurl = \"{}\"\n", pg.url("bank")));
    let mut server = TestServer::spawn(&setup);
    let status = server.wait_exit(READY_TIMEOUT);
    assert_eq!(status.code(), Some(1));
    let log = server.log();
    assert!(log.contains("max_prepared_transactions is 0") && log.contains("restart"), "{log}");
}

#[test]
fn bad_commands_get_err_and_change_nothing() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let mut c = LineClient::connect(server.addr("bank"));
    let cases = [
        ("BALANCE nobody", "ERR unknown account"),
        ("TRANSFER alice bob -5", "ERR amount must be a positive integer"),
        ("TRANSFER alice bob ten", "ERR amount must be a positive integer"),
        ("TRANSFER alice bob 1000", "ERR insufficient funds"),
        ("TRANSFER alice nobody 5", "ERR unknown account"),
        ("PREPARE g1", "ERR no transaction open (send BEGIN first)"),
        ("DEBIT alice 5", "ERR no transaction open (send BEGIN first)"),
        ("COMMIT", "ERR no transaction open (send BEGIN first)"),
        ("RESOLVE COMMIT fdt1:test-node:nope:bank", "ERR unknown gid"),
        ("RESOLVE MAYBE x", "ERR usage: RESOLVE COMMIT|ROLLBACK <gid>"),
        ("FLY away", "ERR unknown command FLY"),
    ];
    for (command, answer) in cases {
        assert_eq!(c.ask(command), answer, "{command}");
    }
    assert_eq!(c.ask("BEGIN"), "OK");
    assert_eq!(c.ask("BEGIN"), "ERR a transaction is already open");
    assert_eq!(c.ask("DEBIT alice 500"), "ERR insufficient funds");
    assert_eq!(c.ask("DEBIT alice 5"), "OK");
    assert_eq!(c.ask("PREPARE bad'gtrid"), "ERR gtrid may only contain A-Z a-z 0-9 . _ -");
    assert_eq!(c.ask(&format!("PREPARE {}", "x".repeat(65))), "ERR gtrid must be 1 to 64 characters");
    assert!(c.ask("PREPARE ok-1").starts_with("PREPARED "));
    assert_eq!(c.ask("DEBIT alice 5"), "ERR transaction is prepared; only COMMIT or ROLLBACK is possible");
    assert_eq!(c.ask("ROLLBACK"), "ROLLED-BACK");
    assert_eq!((balance(&pg, "bank", "alice"), balance(&pg, "bank", "bob")), (100, 100));
    assert_eq!(c.ask("TRANSFER alice bob 30"), "OK");
    assert_eq!(c.ask("BALANCE alice"), "OK 70");
    // Inside an open transaction, a failed transfer leaves nothing behind either.
    assert_eq!(c.ask("BEGIN"), "OK");
    assert_eq!(c.ask("TRANSFER alice nobody 5"), "ERR unknown account");
    assert_eq!(c.ask("TRANSFER alice bob 500"), "ERR insufficient funds");
    assert_eq!(c.ask("COMMIT"), "COMMITTED");
    assert_eq!((balance(&pg, "bank", "alice"), balance(&pg, "bank", "bob")), (70, 130));
    // A branch of a transaction the server coordinates itself cannot be settled by a client.
    assert!(c.ask("RESOLVE ROLLBACK fdt1:test-node:lc.1.a.b:bank").starts_with("ERR this gid belongs"));
}

#[test]
fn a_line_that_is_not_utf8_gets_err_and_names_no_account() {
    let pg = PgCluster::start();
    let server = bank(&pg, 1, 10);
    let mut c = LineClient::connect(server.addr("bank"));
    // Decoded lossily, both would name the account "\u{fffd}".
    assert_eq!(c.ask("OPEN \u{fffd} 5"), "OK");
    for bad in [&b"BALANCE \xff\n"[..], b"BALANCE \xfe\n", b"OPEN \xc3 1\n"] {
        std::io::Write::write_all(c.stream(), bad).unwrap();
        assert_eq!(c.recv().as_deref(), Some("ERR line is not valid UTF-8"), "{bad:?}");
    }
    // The connection goes on.
    assert_eq!(c.ask("BALANCE alice"), "OK 100");
}

#[test]
fn a_transfer_across_two_databases_is_committed_with_two_phase_commit() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    let setup = Setup::new(1, 2)
        .app("bank", "bank", "databases = [\"a\", \"b\"]")
        .server("node_id", &format!("\"{NODE}\""))
        .extra(&format!("[database.a]\nurl = \"{}\"\n[database.b]\nurl = \"{}\"\n", pg.url("a"), pg.url("b")));
    let server = TestServer::start(&setup);
    let mut c = LineClient::connect(server.addr("bank"));
    // Open accounts until both databases hold some.
    let accounts: Vec<String> = (0..8).map(|i| format!("acct{i}")).collect();
    for a in &accounts {
        assert_eq!(c.ask(&format!("OPEN {a} 100")), "OK");
    }
    let home = |a: &str| -> &str {
        let in_a: i64 = pg.client("a").query_one("SELECT count(*) FROM accounts WHERE id = $1", &[&a]).unwrap().get(0);
        if in_a == 1 { "a" } else { "b" }
    };
    let from = accounts.iter().find(|a| home(a) == "a").expect("no account in a");
    let to = accounts.iter().find(|a| home(a) == "b").expect("no account in b");
    assert_eq!(c.ask(&format!("TRANSFER {from} {to} 25")), "OK");
    assert_eq!(balance(&pg, "a", from), 75);
    assert_eq!(balance(&pg, "b", to), 125);
    assert!(pg.prepared("a").is_empty() && pg.prepared("b").is_empty());
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0, "the decision record was not cleaned up");
    // An overdraft across databases changes nothing on either side.
    assert_eq!(c.ask(&format!("TRANSFER {from} {to} 1000")), "ERR insufficient funds");
    assert_eq!((balance(&pg, "a", from), balance(&pg, "b", to)), (75, 125));
}

#[test]
fn txn_recover_commits_decided_local_transactions_rolls_back_the_rest_and_reports_outside_ones() {
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    for db in ["a", "b"] {
        pg.client(db).batch_execute("CREATE TABLE t (v int); CREATE TABLE fdt_decisions (gtrid text PRIMARY KEY, participants text NOT NULL, decided_at timestamptz NOT NULL DEFAULT now())").unwrap();
    }
    // What a worker killed mid-commit leaves behind: lc.1 (coordinated from a) decided, lc.2
    // not; and a branch of another app's lc.1, whose decision must not be taken for this one's.
    let prepare = |db: &str, v: i32, gid: &str| {
        let mut c = pg.client(db);
        c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({v}); PREPARE TRANSACTION '{gid}'")).unwrap();
    };
    prepare("a", 1, &format!("fdt1:{NODE}:lc.1.a.a:bank"));
    prepare("b", 1, &format!("fdt1:{NODE}:lc.1.a.b:bank"));
    prepare("a", 2, &format!("fdt1:{NODE}:lc.2.a.a:bank"));
    prepare("b", 2, &format!("fdt1:{NODE}:lc.2.a.b:bank"));
    prepare("b", 4, &format!("fdt1:{NODE}:lc.1.a.b:shop"));
    let decision = format!("fdt1:{NODE}:lc.1.a:bank");
    pg.client("a").execute("INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, 'a,b')", &[&decision]).unwrap();
    let outside = format!("fdt1:{NODE}:ext-9:bank");
    prepare("a", 3, &outside);
    let dir = tempfile::tempdir().unwrap();
    let config = pg.bank_config(dir.path(), NODE);
    // --min-age still holds back what is younger (no coordinator lock is needed to tell).
    let (code, out, err) = cli(&["txn", "recover", "--min-age", "60"], &config);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains("left alone") && pg.prepared("b").len() == 3, "{out}");
    // No coordinator holds these (no server runs): settled at once, with no --min-age.
    let (code, out, err) = cli(&["txn", "recover"], &config);
    assert_eq!(code, 2, "in-doubt outside transactions remain: exit 2\n{out}{err}");
    assert!(out.contains("in doubt") && out.contains(&outside), "{out}");
    let values = |db: &str| -> Vec<i32> {
        pg.client(db).query("SELECT v FROM t ORDER BY v", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };
    assert_eq!(values("a"), [1], "lc.1 must be committed and lc.2 rolled back in a");
    assert_eq!(values("b"), [1], "another app's lc.1 has no decision of its own: rolled back");
    assert_eq!(pg.prepared("a"), std::slice::from_ref(&outside));
    assert!(pg.prepared("b").is_empty());
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0, "a decision with no branch left must be deleted");
    let (code, _, _) = cli(&["txn", "rollback", &outside], &config);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&["txn", "recover"], &config);
    assert_eq!(code, 0, "{out}");
}
