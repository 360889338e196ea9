//! `fdtserver txn list|commit|rollback|recover`: prepared (in-doubt) transactions of the
//! configured databases, settled from the CLI process.
//!
//! Invariant: runs only in the CLI process, never in the master (a `postgres::Client` may start
//! threads, and the master must stay single-threaded).

use std::path::Path;
use std::time::Duration;

use fdt_sdk::gid::Gid;
use fdt_sdk::txn::postgres::Client;
use fdt_sdk::txn::{TxnError, recovery};

use crate::cli::exit;
use crate::config::Config;

/// What `fdtserver txn` was asked to do.
#[derive(Clone, Debug)]
pub enum TxnCommand {
    List,
    Commit(String),
    Rollback(String),
    /// Settle what `node` (default: this node) coordinated and whose coordinator is gone.
    Recover {
        min_age: Option<f64>,
        node: Option<String>,
    },
}

/// Runs a `txn` command; returns the exit code.
pub fn run(config_path: &Path, command: TxnCommand) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                eprintln!("fdtserver: {p}");
            }
            return exit::FAILURE;
        }
    };
    if config.databases.is_empty() {
        eprintln!("fdtserver: {} has no [database.*] section", config.path.display());
        return exit::FAILURE;
    }
    let mut clients = Vec::new();
    for db in config.databases.values() {
        // The same session settings as the workers' pools (lock_timeout, statement_timeout).
        let settings = db.settings();
        match fdt_sdk::txn::connect(&settings, "fdtserver txn") {
            Ok(c) => clients.push((db.name.clone(), c)),
            Err(e) => {
                eprintln!("fdtserver: {e}");
                return exit::FAILURE;
            }
        }
    }
    let node = &config.server.node_id;
    match command {
        TxnCommand::List => list(&mut clients, node),
        TxnCommand::Commit(gid) => settle(&mut clients, &gid, true),
        TxnCommand::Rollback(gid) => settle(&mut clients, &gid, false),
        TxnCommand::Recover { min_age, node: other } => {
            let min_age = match min_age {
                Some(secs) if secs >= 0.0 && secs.is_finite() => Duration::from_secs_f64(secs),
                Some(_) => {
                    eprintln!("fdtserver: --min-age must be a non-negative number of seconds");
                    return exit::FAILURE;
                }
                None => Duration::ZERO,
            };
            let node = match other {
                Some(n) if n.is_empty() || !fdt_sdk::gid::safe(&n) || n.contains(':') => {
                    eprintln!("fdtserver: --node {n:?} is not a node id (A-Z a-z 0-9 . _ -)");
                    return exit::FAILURE;
                }
                Some(n) => n,
                None => node.clone(),
            };
            recover(&mut clients, &node, min_age)
        }
    }
}

/// Who can settle a prepared transaction, as shown by `list`.
fn coordinator(gid: &str, node: &str) -> &'static str {
    match Gid::parse(gid) {
        Some(g) if g.node_id == node && g.is_local() => "this node",
        Some(g) if g.node_id == node => "outside (via this node)",
        Some(_) => "another node",
        None => "not fdtserver",
    }
}

fn list(clients: &mut [(String, Client)], node: &str) -> i32 {
    println!("{:<60} {:<12} {:<10} {:>9}  COORDINATOR", "GID", "DATABASE", "OWNER", "AGE");
    let mut failed = false;
    for (name, client) in clients.iter_mut() {
        match recovery::list(client) {
            Ok(rows) => {
                for p in rows {
                    println!(
                        "{:<60} {:<12} {:<10} {:>8.0}s  {}",
                        p.gid,
                        name,
                        p.owner,
                        p.age.as_secs_f64(),
                        coordinator(&p.gid, node)
                    );
                }
            }
            Err(e) => {
                eprintln!("fdtserver: database {name}: {e}");
                failed = true;
            }
        }
    }
    if failed { exit::FAILURE } else { exit::OK }
}

fn settle(clients: &mut [(String, Client)], gid: &str, commit: bool) -> i32 {
    if let Some(g) = Gid::parse(gid).filter(Gid::is_local) {
        return settle_local(clients, &g, gid, commit);
    }
    settle_branch(clients, gid, commit)
}

/// Settles `gid` in whichever configured database holds it (`pg_prepared_xacts` shows the
/// whole cluster, and PostgreSQL settles a transaction only from its own database).
fn settle_branch(clients: &mut [(String, Client)], gid: &str, commit: bool) -> i32 {
    for (name, client) in clients.iter_mut() {
        match recovery::list(client) {
            Ok(prepared) if prepared.iter().any(|p| p.gid == gid) => {}
            Ok(_) => continue,
            Err(e) => {
                eprintln!("fdtserver: database {name}: {e}");
                return exit::FAILURE;
            }
        }
        match recovery::settle(client, gid, commit) {
            Ok(()) => {
                println!("{} {gid} in database {name}", if commit { "committed" } else { "rolled back" });
                return exit::OK;
            }
            Err(TxnError::UnknownGid(_)) => continue,
            Err(e) => {
                eprintln!("fdtserver: database {name}: {e}");
                return exit::FAILURE;
            }
        }
    }
    let names: Vec<&str> = clients.iter().map(|(n, _)| n.as_str()).collect();
    eprintln!("fdtserver: no prepared transaction {gid} in database(s) {}", names.join(", "));
    exit::FAILURE
}

/// A branch of a locally coordinated transaction: settled only the way its decision says, and
/// only under its coordinator lock (so never while its coordinator lives, and never beside a
/// recovery settling the same transaction). Anything else could commit one branch and roll
/// back another.
fn settle_local(clients: &mut [(String, Client)], g: &Gid, gid: &str, commit: bool) -> i32 {
    let (Some((_, coordinator, _)), Some(key), Some(lock)) = (g.local_parts(), g.decision_key(), g.coordinator_lock())
    else {
        eprintln!("fdtserver: {gid} is not a well-formed branch of a locally coordinated transaction");
        return exit::FAILURE;
    };
    let Some(c) = clients.iter().position(|(name, _)| name == coordinator) else {
        eprintln!(
            "fdtserver: {gid} belongs to a transaction coordinated from database {coordinator}, which is not \
             configured here: its decision cannot be read; configure it and run `fdtserver txn recover`"
        );
        return exit::FAILURE;
    };
    match recovery::try_lock(&mut clients[c].1, lock) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!(
                "fdtserver: {gid}: its coordinator is still working on it (or a recovery is settling it right \
                 now): it settles the transaction itself; if no worker runs, try again in a moment"
            );
            return exit::IN_DOUBT;
        }
        Err(e) => {
            eprintln!("fdtserver: database {coordinator}: {e}");
            return exit::FAILURE;
        }
    }
    // Under the lock the coordinator is gone: the decision is final.
    let code = match recovery::decided(&mut clients[c].1, &key) {
        Err(e) => {
            eprintln!("fdtserver: database {coordinator}: {e}");
            exit::FAILURE
        }
        Ok(decided) if decided != commit => {
            eprintln!(
                "fdtserver: refusing to {} {gid}: the transaction's decision in database {coordinator} says {} \
                 (its other branches are, or will be, {}); `fdtserver txn recover` settles every branch that way",
                if commit { "commit" } else { "roll back" },
                if decided { "commit" } else { "roll back (no decision was recorded)" },
                if decided { "committed" } else { "rolled back" },
            );
            exit::FAILURE
        }
        Ok(_) => settle_branch(clients, gid, commit),
    };
    if let Err(e) = recovery::unlock(&mut clients[c].1, lock) {
        eprintln!("fdtserver: database {coordinator}: {e}");
        return exit::FAILURE;
    }
    code
}

/// Branches of transactions `node` coordinated locally that are prepared now and that `report`
/// does not account for (prepared after its first look, by a coordinator still at work).
fn unaccounted(clients: &mut [(String, Client)], node: &str, report: &recovery::Report) -> Result<Vec<String>, String> {
    let mut left = Vec::new();
    for (name, client) in clients.iter_mut() {
        for p in recovery::list(client).map_err(|e| format!("database {name}: {e}"))? {
            let known = [&report.coordinator_alive, &report.too_recent, &report.coordinator_unknown, &report.misnamed]
                .iter()
                .any(|l| l.contains(&p.gid));
            if !known && Gid::parse(&p.gid).is_some_and(|g| g.node_id == node && g.is_local()) {
                left.push(p.gid);
            }
        }
    }
    Ok(left)
}

/// How long `recover` keeps retrying transactions whose coordinator still holds its lock: a
/// coordinator's session outlives its killed worker by a moment (PostgreSQL notices the closed
/// socket when the statement in progress ends), and a live coordinator finishes a commit in
/// milliseconds. Longer than that, it is a running server's worker: its to settle.
const LIVE_COORDINATOR_GRACE: Duration = Duration::from_secs(2);

/// `txn recover`: settles what `node` coordinated and whose coordinator is gone; exit 0 only
/// when nothing of `node` is left prepared. Only `node`'s, so the exit code answers for it
/// alone (the running servers' workers settle every node's by themselves).
fn recover(clients: &mut [(String, Client)], node: &str, min_age: Duration) -> i32 {
    let started = std::time::Instant::now();
    let mut report = recovery::Report::default();
    let report = loop {
        let mut round = match recovery::recover(clients, recovery::Nodes::Only(node), None, min_age) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fdtserver: recovery failed: {e}");
                return exit::FAILURE;
            }
        };
        report.committed.append(&mut round.committed);
        report.rolled_back.append(&mut round.rolled_back);
        report.decisions_deleted.append(&mut round.decisions_deleted);
        // What this round did not see (prepared after its first look) counts too: it is still
        // held by a coordinator at work, or the next round settles it.
        match unaccounted(clients, node, &round) {
            Ok(left) => round.coordinator_alive.extend(left),
            Err(e) => {
                eprintln!("fdtserver: recovery failed: {e}");
                return exit::FAILURE;
            }
        }
        if round.coordinator_alive.is_empty() || started.elapsed() >= LIVE_COORDINATOR_GRACE {
            break recovery::Report {
                committed: report.committed,
                rolled_back: report.rolled_back,
                decisions_deleted: report.decisions_deleted,
                ..round
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for g in &report.committed {
        println!("committed   {g} (coordinator gone, decision recorded)");
    }
    for g in &report.rolled_back {
        println!("rolled back {g} (coordinator gone, no decision: presumed abort)");
    }
    for g in &report.coordinator_alive {
        println!(
            "in flight   {g} (its coordinator still holds the transaction: it settles it, or once it is gone \
             a running server of any node with these databases does; if none runs, its session is still ending \
             — run this again)"
        );
    }
    for g in &report.too_recent {
        println!("left alone  {g} (prepared less than {} s ago: --min-age)", min_age.as_secs_f64());
    }
    for g in &report.coordinator_unknown {
        println!("left alone  {g} (its coordinator database is not configured here)");
    }
    for g in &report.misnamed {
        println!(
            "left alone  {g} (found in a database its gid names otherwise: node {node} names the databases \
             differently from this config)"
        );
    }
    for g in &report.in_doubt {
        println!(
            "in doubt    {g} (only its outside coordinator can settle it: RESOLVE or fdtserver txn commit|rollback)"
        );
    }
    println!(
        "recovered: {} committed, {} rolled back; {} in flight; {} left alone; {} waiting for an outside coordinator",
        report.committed.len(),
        report.rolled_back.len(),
        report.coordinator_alive.len(),
        report.too_recent.len() + report.coordinator_unknown.len() + report.misnamed.len(),
        report.in_doubt.len()
    );
    if !report.coordinator_unknown.is_empty() || !report.misnamed.is_empty() {
        eprintln!(
            "fdtserver: {} prepared transaction(s) of node {node} cannot be settled from this config: configure \
             their coordinator database, under the name node {node} gives each database",
            report.coordinator_unknown.len() + report.misnamed.len()
        );
        exit::FAILURE
    } else if !report.all_local_settled() {
        eprintln!(
            "fdtserver: {} prepared transaction(s) of node {node} are still held by their coordinator",
            report.coordinator_alive.len() + report.too_recent.len()
        );
        exit::IN_DOUBT
    } else if !report.in_doubt.is_empty() {
        exit::IN_DOUBT
    } else {
        exit::OK
    }
}
