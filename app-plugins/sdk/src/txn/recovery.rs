//! Prepared transactions after the fact: list them, settle one by gid, and recover what this
//! node coordinated itself. Used by workers at start and by `fdtserver txn`.
//!
//! Recovery of a locally coordinated transaction (gtrid `lc.<n>.<db>`): commit every branch
//! when the decision table holds `lc.<n>`, roll back when it does not (presumed abort: the
//! decision is written before any commit). It never touches a transaction prepared less than
//! `min_age` ago, which may still be in flight. Branches prepared for an outside coordinator are
//! never settled here: only that coordinator knows their outcome.

use std::time::Duration;

use postgres::Client;

use super::{TxnError, describe};
use crate::gid::{self, Gid};

/// One row of `pg_prepared_xacts` in the connected database.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub gid: String,
    pub owner: String,
    pub age: Duration,
}

/// Refuses a server without two-phase commit, with what to do about it.
pub fn check_server(client: &mut Client, db: &str) -> Result<(), String> {
    let row = client
        .query_one("SELECT current_setting('max_prepared_transactions')::int", &[])
        .map_err(|e| format!("database {db}: {}", describe(&e)))?;
    let max: i32 = row.get(0);
    if max <= 0 {
        return Err(format!(
            "database {db}: max_prepared_transactions is 0, so PostgreSQL refuses two-phase commit; \
             set it to a positive value (for example 64) in postgresql.conf and restart PostgreSQL"
        ));
    }
    Ok(())
}

/// Runs schema set-up statements (`CREATE … IF NOT EXISTS`) in one transaction under an
/// advisory lock, so workers starting at the same time do not trip over each other in the
/// catalog (concurrent `IF NOT EXISTS` can still fail with a duplicate key).
pub fn set_up(client: &mut Client, ddl: &str) -> Result<(), String> {
    /// The advisory lock key of schema set-up ("fdtddl" in ASCII).
    const DDL_LOCK: i64 = 0x6664_7464_646c;
    let mut tx = client.transaction().map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK]).map_err(|e| describe(&e))?;
    tx.batch_execute(ddl).map_err(|e| describe(&e))?;
    tx.commit().map_err(|e| describe(&e))
}

/// Creates the bookkeeping of local coordination if missing: the decision table and the
/// sequence that numbers locally coordinated transactions.
pub fn ensure_schema(client: &mut Client) -> Result<(), String> {
    set_up(
        client,
        "CREATE TABLE IF NOT EXISTS fdt_decisions (\
             gtrid text PRIMARY KEY, participants text NOT NULL, decided_at timestamptz NOT NULL DEFAULT now());\
         CREATE SEQUENCE IF NOT EXISTS fdt_lc_seq;",
    )
}

/// Prepared transactions of the connected database.
pub fn list(client: &mut Client) -> Result<Vec<Prepared>, String> {
    let rows = client
        .query(
            "SELECT gid, owner, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
             WHERE database = current_database() ORDER BY prepared",
            &[],
        )
        .map_err(|e| describe(&e))?;
    Ok(rows
        .iter()
        .map(|r| Prepared { gid: r.get(0), owner: r.get(1), age: Duration::from_secs_f64(r.get::<_, f64>(2).max(0.0)) })
        .collect())
}

/// `COMMIT PREPARED` (or `ROLLBACK PREPARED`) `gid` on this connection.
pub fn settle(client: &mut Client, gid: &str, commit: bool) -> Result<(), TxnError> {
    if !gid::safe(gid) {
        return Err(TxnError::UnknownGid(gid.to_string()));
    }
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    match client.batch_execute(&format!("{verb} PREPARED '{gid}'")) {
        Ok(()) => Ok(()),
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42704") => Err(TxnError::UnknownGid(gid.into())),
        Err(e) if e.as_db_error().is_some() => Err(TxnError::Database(describe(&e))),
        Err(e) => Err(TxnError::OutcomeUnknown(describe(&e))),
    }
}

/// Whether the decision to commit the local transaction `key` (see `Gid::decision_key`) was
/// recorded in this database.
pub fn decided(client: &mut Client, key: &str) -> Result<bool, String> {
    match client.query_opt("SELECT 1 FROM fdt_decisions WHERE gtrid = $1", &[&key]) {
        Ok(row) => Ok(row.is_some()),
        // No decision table in this database: no decision was ever recorded here.
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => Ok(false),
        Err(e) => Err(describe(&e)),
    }
}

/// What a recovery did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub committed: Vec<String>,
    pub rolled_back: Vec<String>,
    /// Prepared for an outside coordinator: only it can settle them.
    pub in_doubt: Vec<String>,
    /// Locally coordinated, but too recent to touch (maybe still in flight), or coordinated
    /// from a database this recovery cannot see.
    pub left_alone: Vec<String>,
}

impl Report {
    pub fn log(&self) {
        for g in &self.committed {
            log::warn!("recovery: committed {g} (its decision was recorded)");
        }
        for g in &self.rolled_back {
            log::warn!("recovery: rolled back {g} (no decision was recorded)");
        }
        for g in &self.in_doubt {
            log::warn!("prepared transaction {g} waits for its coordinator (RESOLVE or fdtserver txn)");
        }
    }
}

/// Recovers what `node_id` coordinated (only `app`'s transactions when given) in these
/// databases (`(config name, connection)` each): a local branch is committed when its
/// coordinator database holds its decision, rolled back when it does not (presumed abort), and
/// left alone when prepared less than `min_age` ago or when its coordinator database is not
/// among `dbs`. Branches prepared for an outside coordinator are only reported.
pub fn recover(
    dbs: &mut [(String, Client)],
    node_id: &str,
    app: Option<&str>,
    min_age: Duration,
) -> Result<Report, String> {
    let mut report = Report::default();
    let mut branches = Vec::new();
    for (i, (name, client)) in dbs.iter_mut().enumerate() {
        for p in list(client).map_err(|e| format!("database {name}: {e}"))? {
            match Gid::parse(&p.gid) {
                Some(g) if g.node_id == node_id && app.is_none_or(|a| a == g.app) => branches.push((i, g, p)),
                _ => {}
            }
        }
    }
    let mut committed_keys = Vec::new();
    for (i, g, p) in branches {
        if !g.is_local() {
            report.in_doubt.push(p.gid);
            continue;
        }
        let (Some((_, coordinator, _)), Some(key)) = (g.local_parts(), g.decision_key()) else {
            report.left_alone.push(p.gid);
            continue;
        };
        let Some(c) = dbs.iter().position(|(name, _)| name == coordinator) else {
            report.left_alone.push(p.gid);
            continue;
        };
        if p.age < min_age {
            report.left_alone.push(p.gid);
            continue;
        }
        let commit = decided(&mut dbs[c].1, &key).map_err(|e| format!("database {coordinator}: {e}"))?;
        let (name, client) = &mut dbs[i];
        match settle(client, &p.gid, commit) {
            Ok(()) | Err(TxnError::UnknownGid(_)) => {
                if commit {
                    committed_keys.push((c, key));
                    report.committed.push(p.gid);
                } else {
                    report.rolled_back.push(p.gid);
                }
            }
            Err(e) => return Err(format!("database {name}: settling {}: {e}", p.gid)),
        }
    }
    // A decision whose branches are all settled is not needed any more.
    committed_keys.sort();
    committed_keys.dedup();
    for (c, key) in committed_keys {
        let still_prepared = dbs.iter_mut().any(|(_, client)| {
            list(client).is_ok_and(|l| {
                l.iter().any(|p| Gid::parse(&p.gid).and_then(|g| g.decision_key()).as_ref() == Some(&key))
            })
        });
        if !still_prepared {
            let _ = dbs[c].1.execute("DELETE FROM fdt_decisions WHERE gtrid = $1", &[&key]);
        }
    }
    Ok(report)
}
