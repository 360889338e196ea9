//! The SDK's transaction API used directly (as an app does), against a real PostgreSQL.

mod util;

use std::time::{Duration, Instant};

use fdt_sdk::Settings;
use fdt_sdk::txn::{Databases, TxnError, TxnState};
use util::pg::PgCluster;

fn open(pg: &PgCluster, pool_size: usize) -> Databases {
    pg.create_db("app");
    pg.client("app").batch_execute("CREATE TABLE t (v int PRIMARY KEY)").unwrap();
    let settings = Settings::parse("demo", "")
        .unwrap()
        .with_worker("sdk-node", std::process::id(), 1)
        .with_databases(&format!("[main]\nurl = \"{}\"\npool_size = {pool_size}\n", pg.url("app")))
        .unwrap();
    Databases::open(&settings, &["main"]).unwrap()
}

fn count(pg: &PgCluster) -> i64 {
    pg.client("app").query_one("SELECT count(*) FROM t", &[]).unwrap().get(0)
}

#[test]
fn a_failed_statement_dooms_the_transaction_until_it_rolls_back() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    let err = tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap_err();
    assert!(err.to_string().contains("23505"), "{err}");
    assert_eq!(tx.state(), &TxnState::Doomed);
    assert_eq!(tx.execute("main", "INSERT INTO t VALUES (2)", &[]), Err(TxnError::Doomed));
    assert_eq!(tx.prepare("g1"), Err(TxnError::Doomed));
    assert_eq!(tx.commit(), Err(TxnError::Doomed));
    assert_eq!(count(&pg), 0);
}

#[test]
fn rolling_back_to_a_savepoint_undoes_only_what_followed_it() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    tx.savepoint("main", "before_two").unwrap();
    tx.execute("main", "INSERT INTO t VALUES (2)", &[]).unwrap();
    assert!(tx.execute("main", "INSERT INTO t VALUES (2)", &[]).is_err());
    tx.rollback_to("main", "before_two").unwrap();
    assert_eq!(tx.state(), &TxnState::Active);
    tx.execute("main", "INSERT INTO t VALUES (3)", &[]).unwrap();
    tx.commit().unwrap();
    let rows: Vec<i32> =
        pg.client("app").query("SELECT v FROM t ORDER BY v", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, [1, 3]);
}

#[test]
fn prepare_is_verified_and_the_gid_follows_the_contract() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    assert_eq!(tx.prepare("order.7"), Ok("fdt1:sdk-node:order.7:demo".into()));
    assert_eq!(tx.execute("main", "INSERT INTO t VALUES (2)", &[]), Err(TxnError::AlreadyPrepared));
    assert_eq!(dbs.prepared().unwrap(), ["fdt1:sdk-node:order.7:demo"]);
    // A second transaction cannot reuse the gid.
    let mut other = dbs.transaction();
    other.execute("main", "INSERT INTO t VALUES (5)", &[]).unwrap();
    let err = other.prepare("order.7").unwrap_err();
    assert!(err.to_string().contains("already in use"), "{err}");
    assert_eq!(other.state(), &TxnState::Finished);
    tx.commit().unwrap();
    assert_eq!(count(&pg), 1);
    assert_eq!(
        dbs.resolve("fdt1:sdk-node:order.7:demo", true),
        Err(TxnError::UnknownGid("fdt1:sdk-node:order.7:demo".into()))
    );
}

#[test]
fn dropping_an_open_transaction_rolls_it_back_and_returns_its_connection() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 1);
    {
        let mut tx = dbs.transaction();
        tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    }
    // The pool's only connection is back and clean.
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (2)", &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!(count(&pg), 1);
}

#[test]
fn an_exhausted_pool_gives_a_clear_error_after_its_timeout() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 1);
    let mut holder = dbs.transaction();
    holder.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    let started = std::time::Instant::now();
    let err = dbs.transaction().execute("main", "SELECT 1", &[]).unwrap_err();
    assert!(matches!(err, TxnError::PoolExhausted(_)), "{err:?}");
    assert!(err.to_string().contains("pool_size"), "{err}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(4));
    holder.rollback().unwrap();
}

#[test]
fn sessions_get_the_configured_timeouts_and_a_slow_statement_fails() {
    let pg = PgCluster::start();
    pg.create_db("app");
    let settings = |extra: &str| {
        Settings::parse("demo", "")
            .unwrap()
            .with_worker("sdk-node", std::process::id(), 1)
            .with_databases(&format!("[main]\nurl = \"{}\"\npool_size = 2\n{extra}", pg.url("app")))
            .unwrap()
    };
    let show = |dbs: &Databases, name: &str| -> String {
        dbs.with_client("main", |c| Ok(c.query_one(&format!("SHOW {name}"), &[]).unwrap().get(0))).unwrap()
    };
    // The defaults: no statement can keep a handler thread for longer than 10 s.
    let dbs = Databases::open(&settings(""), &["main"]).unwrap();
    assert_eq!(show(&dbs, "lock_timeout"), "5s");
    assert_eq!(show(&dbs, "statement_timeout"), "10s");
    assert_eq!(show(&dbs, "client_connection_check_interval"), "1s");
    assert_eq!(show(&dbs, "application_name"), "fdtserver demo");
    // Keepalives for TCP sessions (a Unix socket, as here, shows 0 for them: the session's own
    // settings are what PostgreSQL would apply over TCP).
    let keepalives = dbs
        .with_client("main", |c| {
            let rows = c
                .query(
                    "SELECT name, reset_val, source FROM pg_settings WHERE name LIKE 'tcp_keepalives_%' ORDER BY name",
                    &[],
                )
                .unwrap();
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect::<Vec<(String, String, String)>>())
        })
        .unwrap();
    let want = [("tcp_keepalives_count", "3"), ("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5")];
    let got: Vec<(&str, &str)> = keepalives.iter().map(|(n, v, _)| (n.as_str(), v.as_str())).collect();
    assert_eq!(got, want, "{keepalives:?}");
    // Configured, with fractions; 0 lifts a limit.
    let dbs = Databases::open(&settings("statement_timeout = 0.3\nlock_timeout = 0"), &["main"]).unwrap();
    assert_eq!(show(&dbs, "lock_timeout"), "0");
    let started = std::time::Instant::now();
    let mut tx = dbs.transaction();
    let err = tx.query("main", "SELECT pg_sleep(5)", &[]).unwrap_err();
    assert!(err.to_string().contains("57014"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(tx.state(), &TxnState::Doomed);
    let bad = Databases::open(&settings("lock_timeout = \"soon\""), &["main"]).err().unwrap();
    assert!(bad.contains("[database.main]") && bad.contains("lock_timeout"), "{bad}");
}

/// Databases `a` and `b`, each with table `d` whose unique key is checked only at commit (so a
/// duplicate makes `PREPARE TRANSACTION` or `COMMIT` fail), opened with pools of `pool_size`.
fn open_two(pg: &PgCluster, pool_size: usize) -> Databases {
    let mut toml = String::new();
    for db in ["a", "b"] {
        pg.create_db(db);
        pg.client(db).batch_execute("CREATE TABLE d (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)").unwrap();
        toml.push_str(&format!("[{db}]\nurl = \"{}\"\npool_size = {pool_size}\n", pg.url(db)));
    }
    let settings = Settings::parse("demo", "")
        .unwrap()
        .with_worker("sdk-node", std::process::id(), 1)
        .with_databases(&toml)
        .unwrap();
    Databases::open(&settings, &["a", "b"]).unwrap()
}

fn rows(pg: &PgCluster, db: &str) -> i64 {
    pg.client(db).query_one("SELECT count(*) FROM d", &[]).unwrap().get(0)
}

/// Prepared transactions and advisory locks (a coordinator lock left behind) in the cluster.
fn leftovers(pg: &PgCluster) -> (i64, i64) {
    let mut c = pg.client("postgres");
    let prepared: i64 = c.query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).unwrap().get(0);
    let locks: i64 = c.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[]).unwrap().get(0);
    (prepared, locks)
}

#[test]
fn a_two_phase_commit_that_fails_in_either_phase_leaves_nothing_behind() {
    let pg = PgCluster::start();
    // Pools of one: every failure path must give its connection back, or the next step starves.
    let dbs = open_two(&pg, 1);
    // Phase one fails in the second database: the first branch, already prepared, is rolled back.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (1)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (1), (1)", &[]).unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.to_string().contains("PREPARE failed") && err.to_string().contains("23505"), "{err}");
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (0, 0));
    assert_eq!(leftovers(&pg), (0, 0), "a branch or the coordinator lock was left behind");
    // The decision cannot be recorded: every branch is rolled back.
    let mut refuse = pg.client("a");
    refuse.batch_execute("ALTER TABLE fdt_decisions ADD CONSTRAINT refuse CHECK (gtrid = '')").unwrap();
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (2)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (2)", &[]).unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.to_string().contains("23514"), "{err}");
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (0, 0));
    assert_eq!(leftovers(&pg), (0, 0), "a branch or the coordinator lock was left behind");
    refuse.batch_execute("ALTER TABLE fdt_decisions DROP CONSTRAINT refuse").unwrap();
    // A failed first statement: nothing was prepared, the lock never taken.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (3)", &[]).unwrap();
    assert!(tx.execute("b", "INSERT INTO nowhere VALUES (3)", &[]).is_err());
    assert_eq!(tx.commit(), Err(TxnError::Doomed));
    // The sequence that numbers local transactions is gone: rolled back before any PREPARE.
    pg.client("a").batch_execute("DROP SEQUENCE fdt_lc_seq").unwrap();
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (3)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (3)", &[]).unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.to_string().contains("fdt_lc_seq"), "{err}");
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (0, 0));
    assert_eq!(leftovers(&pg), (0, 0));
    pg.client("a").batch_execute("CREATE SEQUENCE fdt_lc_seq START 100").unwrap();
    // And then it works, with the decision cleaned up.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (4)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (4)", &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (1, 1));
    assert_eq!(leftovers(&pg), (0, 0));
    let decisions: i64 = pg.client("a").query_one("SELECT count(*) FROM fdt_decisions", &[]).unwrap().get(0);
    assert_eq!(decisions, 0);
    // One database: a COMMIT that fails (the deferred check) is rolled back.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (5)", &[]).unwrap();
    tx.savepoint("a", "s1").unwrap();
    tx.execute("a", "INSERT INTO d VALUES (4)", &[]).unwrap();
    tx.release("a", "s1").unwrap();
    let err = tx.commit().unwrap_err();
    assert!(err.to_string().contains("COMMIT failed, rolled back"), "{err}");
    assert_eq!(rows(&pg, "a"), 1);
    // PREPARE is for one database only.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (6)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (6)", &[]).unwrap();
    assert!(matches!(tx.prepare("g-2"), Err(TxnError::Usage(m)) if m.contains("spans a, b")));
    tx.rollback().unwrap();
    assert!(
        matches!(dbs.transaction().execute("c", "SELECT 1", &[]), Err(TxnError::Usage(m)) if m.contains("this app has: a, b"))
    );
}

#[test]
fn the_pool_replaces_sessions_that_postgresql_ended() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    tx.commit().unwrap();
    // An operator (or a restart) ends every session of the app.
    let ours = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fdtserver demo'";
    let mut admin = pg.client("postgres");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fdtserver demo'",
            &[],
        )
        .unwrap();
    util::wait_for(std::time::Duration::from_secs(5), "the sessions to end", || {
        (admin.query_one(ours, &[]).unwrap().get::<_, i64>(0) == 0).then_some(())
    });
    // The next transactions get fresh sessions (the first may meet a dead one and fail).
    let mut done = 0;
    for v in 2..6 {
        let mut tx = dbs.transaction();
        if tx.execute("main", "INSERT INTO t VALUES ($1)", &[&v]).is_ok() && tx.commit().is_ok() {
            done += 1;
        }
    }
    assert!(done >= 3, "only {done} of 4 transactions after the sessions ended");
    assert_eq!(count(&pg), 1 + done);
}

#[test]
fn misuse_gets_a_clear_error_and_an_empty_prepare_uses_the_first_database() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    assert_eq!(tx.prepare("g-1"), Err(TxnError::NotOpen));
    tx.begin().unwrap();
    assert!(matches!(tx.begin(), Err(TxnError::Usage(m)) if m.contains("already open")));
    assert!(tx.rollback_to("main", "nowhere").is_err(), "no such savepoint, nothing begun there");
    // Nothing done yet: prepared (empty) on the app's first database.
    let mut tx = dbs.transaction();
    tx.begin().unwrap();
    assert_eq!(tx.prepare("g-2"), Ok("fdt1:sdk-node:g-2:demo".into()));
    assert_eq!(tx.rollback_to("main", "s"), Err(TxnError::AlreadyPrepared));
    assert_eq!(
        dbs.resolve("fdt1:other-node:g-2:demo", true),
        Err(TxnError::UnknownGid("fdt1:other-node:g-2:demo".into())),
        "another node's gid is not this app's to settle"
    );
    tx.rollback().unwrap();
    assert!(dbs.prepared().unwrap().is_empty());
    // A failed ROLLBACK TO dooms the transaction.
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    assert!(tx.rollback_to("main", "never_made").is_err());
    assert_eq!(tx.state(), &TxnState::Doomed);
    drop(tx);
    assert_eq!(count(&pg), 0);
    // A database the server does not configure.
    let settings =
        Settings::parse("demo", "").unwrap().with_databases(&format!("[main]\nurl = \"{}\"\n", pg.url("app"))).unwrap();
    let err = Databases::open(&settings, &["nope"]).err().unwrap();
    assert!(err.contains("no [database.nope]") && err.contains("configured: main"), "{err}");
    assert!(Databases::open(&settings, &[]).err().unwrap().contains("no database given"));
}

#[test]
fn a_prepared_transaction_an_operator_settled_meanwhile_is_reported_as_an_unknown_gid() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    let gid = tx.prepare("op.1").unwrap();
    pg.client("app").batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(tx.commit(), Err(TxnError::UnknownGid(gid.clone())));
    // Not retried: the answer is final (each retry would wait 50 ms and more).
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(count(&pg), 0);
    assert!(dbs.prepared().unwrap().is_empty());
}

#[test]
fn a_prepared_transaction_commits_on_a_fresh_connection_when_postgresql_ended_the_session() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    tx.prepare("cut.1").unwrap();
    // Every pooled session of the app ends (a restart of the database's backends, an admin).
    let ended: i64 = pg
        .client("postgres")
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ended >= 1, "the app's pooled session was ended");
    // The first COMMIT PREPARED fails on the dead session; it is retried on a new one.
    tx.commit().unwrap();
    assert_eq!(count(&pg), 1);
    assert!(dbs.prepared().unwrap().is_empty());
}

#[test]
fn the_idle_timeout_applies_to_open_transactions_only_and_leaves_a_prepared_one_to_its_coordinator() {
    let pg = PgCluster::start();
    let dbs = open(&pg, 2);
    // Nothing begun: nothing to time out, and committing it does nothing.
    let tx = dbs.transaction();
    assert_eq!(tx.idle_timeout(), None);
    assert_eq!(tx.commit(), Ok(()));
    let mut tx = dbs.transaction();
    tx.execute("main", "INSERT INTO t VALUES (1)", &[]).unwrap();
    assert_eq!(tx.idle_timeout(), Some(fdt_sdk::txn::DEFAULT_TXN_IDLE_TIMEOUT));
    let gid = tx.prepare("slow.1").unwrap();
    assert_eq!(tx.idle_timeout(), None, "phase one is done: the client's silence holds nothing up");
    tx.expire_idle();
    assert_eq!(dbs.prepared().unwrap(), [gid.as_str()], "still prepared after expire_idle");
    dbs.resolve(&gid, true).unwrap();
    assert_eq!(count(&pg), 1);
}

/// Makes the next two-phase commit of `dbs` (opened by [`open_two`]) stop at recording its
/// decision, until the returned session (which holds the same decision key, uncommitted) ends
/// its transaction: numbers that commit `n` and takes its key first.
fn stall_decision(pg: &PgCluster, n: i64) -> postgres::Client {
    pg.client("a").batch_execute(&format!("ALTER SEQUENCE fdt_lc_seq RESTART {n}")).unwrap();
    let mut stall = pg.client("a");
    stall
        .batch_execute(&format!(
            "BEGIN; INSERT INTO fdt_decisions (gtrid, participants) VALUES ('fdt1:sdk-node:lc.{n}.a:demo', 'x')"
        ))
        .unwrap();
    stall
}

/// The pid of the coordinating session waiting to record its decision.
fn waiting_coordinator(pg: &PgCluster) -> i32 {
    util::wait_for(Duration::from_secs(5), "the commit to wait at its decision", || {
        pg.client("postgres")
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'a' AND application_name = 'fdtserver demo' \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .map(|r| r.get(0))
    })
}

/// A two-phase commit in a thread; its result comes on the channel.
fn commit_in_thread(dbs: &Databases, v: i32) -> std::sync::mpsc::Receiver<Result<(), TxnError>> {
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES ($1)", &[&v]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES ($1)", &[&v]).unwrap();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(tx.commit());
    });
    result
}

#[test]
fn a_two_phase_commit_keeps_each_branchs_connection_until_it_is_committed() {
    let pg = PgCluster::start();
    // Pools of one: between PREPARE and COMMIT PREPARED, another request wants b's connection.
    let dbs = open_two(&pg, 1);
    let stall = stall_decision(&pg, 500);
    let committed = commit_in_thread(&dbs, 1);
    waiting_coordinator(&pg);
    assert_eq!(pg.prepared("b").len(), 1, "b is prepared, its commit not yet begun");
    let (got, other) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let other_dbs = dbs.clone();
    let other_request = std::thread::spawn(move || {
        let mut tx = other_dbs.transaction();
        let r = tx.execute("b", "SELECT 1", &[]);
        let _ = got.send(r.is_ok());
        let _ = released.recv();
        drop(tx);
    });
    // While the commit is between its phases, its branch's connection is not in the pool.
    assert!(
        other.recv_timeout(Duration::from_millis(500)).is_err(),
        "another request took the prepared branch's connection before COMMIT PREPARED"
    );
    drop(stall);
    let started = Instant::now();
    assert_eq!(committed.recv_timeout(Duration::from_secs(8)).expect("the commit hangs"), Ok(()));
    assert!(started.elapsed() < Duration::from_secs(3), "phase two took {:?}", started.elapsed());
    assert!(other.recv_timeout(Duration::from_secs(5)).unwrap(), "the connection is back in the pool afterwards");
    release.send(()).unwrap();
    other_request.join().unwrap();
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (1, 1));
    assert_eq!(leftovers(&pg), (0, 0));
}

#[test]
fn recovery_settles_an_orphan_while_requests_hold_every_pooled_connection() {
    let pg = PgCluster::start();
    let dbs = open_two(&pg, 1);
    // Requests hold the only pooled connection of each database.
    let mut busy = dbs.transaction();
    busy.execute("a", "SELECT 1", &[]).unwrap();
    busy.execute("b", "SELECT 1", &[]).unwrap();
    // A coordinator died mid-commit, undecided.
    for db in ["a", "b"] {
        pg.client(db)
            .batch_execute(&format!(
                "BEGIN; INSERT INTO d VALUES (7); PREPARE TRANSACTION 'fdt1:sdk-node:lc.7.a.{db}:demo'"
            ))
            .unwrap();
    }
    let started = Instant::now();
    util::wait_for(Duration::from_secs(5), "recovery to roll the orphan back", || {
        (leftovers(&pg).0 == 0).then_some(())
    });
    eprintln!("settled {:?} after it was left", started.elapsed());
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (0, 0));
    busy.rollback().unwrap();
}

#[test]
fn a_fatal_error_while_recording_the_decision_leaves_the_outcome_to_recovery() {
    let pg = PgCluster::start();
    let dbs = open_two(&pg, 1);
    let mut stall = stall_decision(&pg, 600);
    let committed = commit_in_thread(&dbs, 1);
    // The coordinating session ends (FATAL 57P01) while its INSERT waits: whether a decision
    // was written cannot be known from its answer, so no branch may be rolled back for it.
    let pid = waiting_coordinator(&pg);
    pg.client("postgres").execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    let result = committed.recv_timeout(Duration::from_secs(8)).expect("the commit hangs");
    assert!(matches!(result, Err(TxnError::OutcomeUnknown(_))), "{result:?}");
    // It was not written: recovery, free to take the coordinator lock now, rolls back.
    stall.batch_execute("ROLLBACK").unwrap();
    util::wait_for(Duration::from_secs(5), "recovery to settle the branches", || {
        (leftovers(&pg) == (0, 0)).then_some(())
    });
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (0, 0));
    // And the pools work.
    let mut tx = dbs.transaction();
    tx.execute("a", "INSERT INTO d VALUES (2)", &[]).unwrap();
    tx.execute("b", "INSERT INTO d VALUES (2)", &[]).unwrap();
    tx.commit().unwrap();
    assert_eq!((rows(&pg, "a"), rows(&pg, "b")), (1, 1));
}
