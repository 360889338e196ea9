//! `fdtserver txn list|commit|rollback|recover`: prepared (in-doubt) transactions of the
//! configured databases, settled from the CLI process.
//!
//! Invariant: runs only in the CLI process, never in the master (a `postgres::Client` may start
//! threads, and the master must stay single-threaded).

use std::path::Path;
use std::time::Duration;

use fdt_sdk::gid::Gid;
use fdt_sdk::txn::postgres::{Client, NoTls};
use fdt_sdk::txn::{TxnError, recovery};

use crate::cli::exit;
use crate::config::Config;

/// What `fdtserver txn` was asked to do.
#[derive(Clone, Debug)]
pub enum TxnCommand {
    List,
    Commit(String),
    Rollback(String),
    Recover { min_age: Option<f64> },
}

/// The in-flight guard of `recover` unless `--min-age` says otherwise: a worker (of this or of
/// another server using the same databases and node id) may still be committing what it
/// prepared less than this long ago.
const DEFAULT_MIN_AGE: Duration = Duration::from_secs(60);
/// How long connecting to a database may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
        let connected = db
            .url
            .parse::<fdt_sdk::txn::postgres::Config>()
            .and_then(|mut c| c.connect_timeout(CONNECT_TIMEOUT).connect(NoTls));
        match connected {
            Ok(c) => clients.push((db.name.clone(), c)),
            Err(e) => {
                eprintln!("fdtserver: database {}: cannot connect: {}", db.name, fdt_sdk::txn::describe(&e));
                return exit::FAILURE;
            }
        }
    }
    let node = &config.server.node_id;
    match command {
        TxnCommand::List => list(&mut clients, node),
        TxnCommand::Commit(gid) => settle(&mut clients, &gid, true),
        TxnCommand::Rollback(gid) => settle(&mut clients, &gid, false),
        TxnCommand::Recover { min_age } => {
            let min_age = match min_age {
                Some(secs) if secs >= 0.0 => Duration::from_secs_f64(secs),
                Some(_) => {
                    eprintln!("fdtserver: --min-age must not be negative");
                    return exit::FAILURE;
                }
                None => DEFAULT_MIN_AGE,
            };
            recover(&mut clients, node, min_age)
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
    for (name, client) in clients.iter_mut() {
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

fn recover(clients: &mut [(String, Client)], node: &str, min_age: Duration) -> i32 {
    let report = match recovery::recover(clients, node, None, min_age) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fdtserver: recovery failed: {e}");
            return exit::FAILURE;
        }
    };
    for g in &report.committed {
        println!("committed   {g} (decision recorded)");
    }
    for g in &report.rolled_back {
        println!("rolled back {g} (no decision: presumed abort)");
    }
    for g in &report.left_alone {
        println!(
            "left alone  {g} (prepared less than {} s ago, so maybe in flight — use --min-age 0 when no server runs; \
             or its coordinator database is not configured)",
            min_age.as_secs()
        );
    }
    for g in &report.in_doubt {
        println!(
            "in doubt    {g} (only its outside coordinator can settle it: RESOLVE or fdtserver txn commit|rollback)"
        );
    }
    println!(
        "recovered: {} committed, {} rolled back; {} left alone; {} waiting for an outside coordinator",
        report.committed.len(),
        report.rolled_back.len(),
        report.left_alone.len(),
        report.in_doubt.len()
    );
    if report.in_doubt.is_empty() { exit::OK } else { exit::IN_DOUBT }
}
