//! Prepared transactions after the fact: list them, settle one by gid, and recover locally
//! coordinated transactions whose coordinator is gone — of this node (`fdtserver txn recover`,
//! or `--node NODE`'s) or of any node sharing these databases (the running servers' workers,
//! at start and every second).
//!
//! Recovery of a locally coordinated transaction (gtrid `lc.<n>.<c>.<db>`) waits for no timer:
//! it first takes the advisory lock that the coordinating session holds while it works
//! ([`Gid::coordinator_lock`]). Taken: the coordinator is gone, and every branch is committed
//! when the decision table holds `lc.<n>.<c>`, rolled back when it does not (presumed abort: the
//! decision is written before any commit). Not taken: the coordinator lives (or another
//! recovery is settling it right now), and settles it itself. That proof does not depend on
//! which node coordinated: the lock lives in the coordinator database, which every node sharing
//! it sees, and its key names the node. It needs only that a database name in a gid means the
//! same database on every node (advisory locks are per database); a branch found in a database
//! whose name its gid does not carry shows otherwise, and its transaction is left alone.
//! Branches prepared for an outside coordinator are never settled here: only that coordinator
//! knows their outcome.

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

/// Whose locally coordinated transactions a recovery settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nodes<'a> {
    /// Only those that this node coordinated: `fdtserver txn recover` (this node, or
    /// `--node NODE`), which answers for that node alone.
    Only(&'a str),
    /// Those of any node: the running servers' workers. The coordinator lock proves a
    /// coordinator gone whichever node it ran on.
    Any,
}

impl Nodes<'_> {
    fn include(self, node_id: &str) -> bool {
        match self {
            Nodes::Only(node) => node == node_id,
            Nodes::Any => true,
        }
    }
}

/// `gid` parsed, when it is ours and of the `nodes` and `app` (when given) asked for.
fn selected(gid: &str, nodes: Nodes<'_>, app: Option<&str>) -> Option<Gid> {
    Gid::parse(gid).filter(|g| nodes.include(&g.node_id) && app.is_none_or(|a| a == g.app))
}

/// The node named in `gid` (empty for a gid that is not ours).
fn node_of(gid: &str) -> String {
    Gid::parse(gid).map(|g| g.node_id).unwrap_or_default()
}

/// What a recovery did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub committed: Vec<String>,
    pub rolled_back: Vec<String>,
    /// Prepared for an outside coordinator: only it can settle them.
    pub in_doubt: Vec<String>,
    /// Locally coordinated, and the coordinator still holds its lock: it is alive (or another
    /// recovery is settling the transaction right now), so it settles them itself.
    pub coordinator_alive: Vec<String>,
    /// Locally coordinated, but prepared less than the `min_age` asked for.
    pub too_recent: Vec<String>,
    /// Locally coordinated from a database this recovery cannot see (not configured).
    pub coordinator_unknown: Vec<String>,
    /// Locally coordinated by a node that names the databases otherwise than this recovery: a
    /// branch of the transaction is prepared in a database whose name its gid does not carry,
    /// so the coordinator lock and the decision cannot be trusted to be looked up in the right
    /// database. Every branch of such a transaction is left alone.
    pub misnamed: Vec<String>,
    /// Decision records deleted because no branch of theirs was left.
    pub decisions_deleted: Vec<String>,
}

impl Report {
    /// Logs what was settled, each with the node that coordinated it.
    pub fn log_settled(&self) {
        for g in &self.committed {
            let node = node_of(g);
            log::warn!("recovery: committed {g} (its coordinator on node {node} is gone; the decision was recorded)");
        }
        for g in &self.rolled_back {
            let node = node_of(g);
            log::warn!("recovery: rolled back {g} (its coordinator on node {node} is gone; no decision was recorded)");
        }
    }

    /// Logs what was settled and what is left that recovery cannot settle.
    pub fn log(&self) {
        self.log_settled();
        for g in &self.in_doubt {
            let node = node_of(g);
            log::warn!(
                "prepared transaction {g} waits for its outside coordinator (RESOLVE on node {node}, or fdtserver txn)"
            );
        }
        for g in &self.coordinator_unknown {
            log::warn!("prepared transaction {g} cannot be settled here: its coordinator database is not configured");
        }
        for g in &self.misnamed {
            log::error!(
                "prepared transaction {g} cannot be settled here: its node names the databases otherwise than this \
                 config (nodes sharing a PostgreSQL must give each database the same [database.NAME])"
            );
        }
    }

    /// True when nothing that recovery could settle is left prepared (branches of outside
    /// coordinators aside).
    pub fn all_local_settled(&self) -> bool {
        self.coordinator_alive.is_empty()
            && self.too_recent.is_empty()
            && self.coordinator_unknown.is_empty()
            && self.misnamed.is_empty()
    }
}

/// One locally coordinated transaction found prepared: its coordinator database, its lock
/// and the branches seen in the first listing.
struct Local {
    coordinator: String,
    lock: i64,
    branches: Vec<(usize, String, Duration)>,
}

/// Takes the coordinator lock `key` on `client` without waiting: `true` means the coordinator
/// is gone (and nobody else is settling the transaction) until [`unlock`].
pub fn try_lock(client: &mut Client, key: i64) -> Result<bool, String> {
    let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).map_err(|e| describe(&e))?;
    Ok(row.get(0))
}

/// Releases a lock taken with [`try_lock`].
pub fn unlock(client: &mut Client, key: i64) -> Result<(), String> {
    client.execute("SELECT pg_advisory_unlock($1)", &[&key]).map(drop).map_err(|e| describe(&e))
}

/// The branches of local transaction `key` (its decision key) prepared in the connected
/// database now.
pub fn branches_of(client: &mut Client, key: &str) -> Result<Vec<String>, String> {
    Ok(list(client)?
        .into_iter()
        .filter(|p| Gid::parse(&p.gid).and_then(|g| g.decision_key()).as_deref() == Some(key))
        .map(|p| p.gid)
        .collect())
}

/// Recovers what the `nodes` asked for coordinated (only `app`'s transactions when given) in
/// these databases (`(config name, connection)` each). A locally coordinated transaction is
/// settled only when its coordinator is gone — when this recovery can take the advisory lock
/// its coordinating session holds (see [`Gid::coordinator_lock`]) — and then all its branches
/// are committed when its coordinator database holds its decision, rolled back when it does
/// not (presumed abort). Left alone: transactions whose coordinator still lives (or that
/// another recovery, of any node, is settling at this moment), whose coordinator database is
/// not among `dbs`, with a branch prepared in a database whose name its gid does not carry
/// (see [`Report::misnamed`]), or (when `min_age` is not zero) with a branch prepared less
/// than `min_age` ago. Branches prepared for an outside coordinator are only reported.
///
/// The first listing only finds the transactions to look at: a coordinator may prepare more
/// branches after it, and another recovery may settle them. Once the lock is taken the
/// coordinator is gone and the set of branches is final, so the branches are listed again, in
/// every database, and exactly those are settled. A decision is never deleted here while a
/// branch of it may be prepared: that is [`delete_orphan_decisions`]'s, which looks again
/// under the lock.
pub fn recover(
    dbs: &mut [(String, Client)],
    nodes: Nodes<'_>,
    app: Option<&str>,
    min_age: Duration,
) -> Result<Report, String> {
    let mut report = Report::default();
    let mut locals: std::collections::BTreeMap<String, Local> = std::collections::BTreeMap::new();
    for (i, (name, client)) in dbs.iter_mut().enumerate() {
        for p in list(client).map_err(|e| format!("database {name}: {e}"))? {
            let Some(g) = selected(&p.gid, nodes, app) else {
                continue;
            };
            match (g.local_parts(), g.decision_key(), g.coordinator_lock()) {
                (Some((_, coordinator, _)), Some(key), Some(lock)) => {
                    let coordinator = coordinator.to_string();
                    let local = locals.entry(key).or_insert_with(|| Local { coordinator, lock, branches: Vec::new() });
                    local.branches.push((i, p.gid, p.age));
                }
                _ if g.is_local() => report.coordinator_unknown.push(p.gid),
                _ => report.in_doubt.push(p.gid),
            }
        }
    }
    for (key, local) in locals {
        let gids = || local.branches.iter().map(|(_, gid, _)| gid.clone());
        let Some(c) = dbs.iter().position(|(name, _)| *name == local.coordinator) else {
            report.coordinator_unknown.extend(gids());
            continue;
        };
        if local.branches.iter().any(|(_, _, age)| *age < min_age) {
            report.too_recent.extend(gids());
            continue;
        }
        let coordinator = &local.coordinator;
        if !try_lock(&mut dbs[c].1, local.lock).map_err(|e| format!("database {coordinator}: {e}"))? {
            report.coordinator_alive.extend(gids());
            continue;
        }
        let settled = settle_transaction(dbs, c, &key, coordinator, &mut report);
        let unlocked = unlock(&mut dbs[c].1, local.lock).map_err(|e| format!("database {coordinator}: {e}"));
        settled.and(unlocked)?;
    }
    delete_orphan_decisions(dbs, nodes, app, &mut report)?;
    Ok(report)
}

/// Settles every branch of local transaction `key` whose coordinator lock this recovery holds
/// (in `dbs[c]`): commit if the decision is recorded, else roll back. The branches are listed
/// afresh in every database: under the lock, that set is final. A branch in a database whose
/// name its gid does not carry leaves the whole transaction alone ([`Report::misnamed`]). The
/// decision stays (see [`delete_orphan_decisions`]).
fn settle_transaction(
    dbs: &mut [(String, Client)],
    c: usize,
    key: &str,
    coordinator: &str,
    report: &mut Report,
) -> Result<(), String> {
    let mut branches = Vec::new();
    for (i, (name, client)) in dbs.iter_mut().enumerate() {
        let here = branches_of(client, key).map_err(|e| format!("database {name}: {e}"))?;
        branches.extend(here.into_iter().map(|gid| (i, gid)));
    }
    let misplaced = |(i, gid): &(usize, String)| {
        Gid::parse(gid).and_then(|g| g.local_parts().map(|(_, _, db)| db != dbs[*i].0)).unwrap_or(true)
    };
    if branches.iter().any(misplaced) {
        report.misnamed.extend(branches.into_iter().map(|(_, gid)| gid));
        return Ok(());
    }
    // Read under the lock: the coordinating session is gone, so the decision is final.
    let commit = decided(&mut dbs[c].1, key).map_err(|e| format!("database {coordinator}: {e}"))?;
    for (i, gid) in branches {
        let (name, client) = &mut dbs[i];
        match settle(client, &gid, commit) {
            Ok(()) => if commit { &mut report.committed } else { &mut report.rolled_back }.push(gid),
            // Settled since it was listed a moment ago: by an operator's SQL (`fdtserver txn`
            // and every node's recovery take the same lock).
            Err(TxnError::UnknownGid(_)) => {}
            Err(e) => return Err(format!("database {name}: settling {gid}: {e}")),
        }
    }
    Ok(())
}

/// Deletes the decision records (of the `nodes` asked for, and `app` when given) whose
/// transaction has no branch left prepared and whose coordinator is gone: what a coordinator
/// that died between its last `COMMIT PREPARED` and the clean-up leaves behind. The check and
/// the delete run under the coordinator lock, which every recovery and every coordinator of
/// that transaction takes, so no recovery reads a decision while another deletes it with a
/// branch still prepared.
fn delete_orphan_decisions(
    dbs: &mut [(String, Client)],
    nodes: Nodes<'_>,
    app: Option<&str>,
    report: &mut Report,
) -> Result<(), String> {
    let names: Vec<String> = dbs.iter().map(|(n, _)| n.clone()).collect();
    for c in 0..dbs.len() {
        let rows = match dbs[c].1.query("SELECT gtrid, participants FROM fdt_decisions", &[]) {
            Ok(rows) => rows,
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => continue,
            Err(e) => return Err(format!("database {}: {}", names[c], describe(&e))),
        };
        for row in rows {
            let (key, participants): (String, String) = (row.get(0), row.get(1));
            let Some(g) = selected(&key, nodes, app) else {
                continue;
            };
            let lock = gid::coordinator_lock_key(&key);
            // Only where every participant is visible here can "no branch left" be known.
            if g.gtrid.strip_prefix(gid::LOCAL_MARKER).is_none()
                || !participants.split(',').all(|p| names.iter().any(|n| n == p))
                || !try_lock(&mut dbs[c].1, lock).map_err(|e| format!("database {}: {e}", names[c]))?
            {
                continue;
            }
            // Under the lock, look again: branches prepared since the first look count too.
            let mut left = false;
            for (name, client) in dbs.iter_mut() {
                let prepared = list(client).map_err(|e| format!("database {name}: {e}"))?;
                left |= prepared
                    .iter()
                    .any(|p| Gid::parse(&p.gid).and_then(|g| g.decision_key()).as_deref() == Some(key.as_str()));
            }
            let client = &mut dbs[c].1;
            let deleted = if left {
                Ok(())
            } else {
                client
                    .execute("DELETE FROM fdt_decisions WHERE gtrid = $1", &[&key])
                    .map(drop)
                    .map_err(|e| describe(&e))
            };
            let unlocked = unlock(client, lock);
            deleted.and(unlocked).map_err(|e| format!("database {}: {e}", names[c]))?;
            if !left {
                report.decisions_deleted.push(key);
            }
        }
    }
    Ok(())
}
