//! The SDK's transaction API used directly (as an app does), against a real PostgreSQL.

mod util;

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
