//! Transactions tied to a client connection, on PostgreSQL, with two-phase commit
//! (feature `postgres`).
//!
//! An app opens its databases once at start ([`Databases::open`]) and gives each connection a
//! [`Transaction`] (kept in [`Conn::session`](crate::Conn::session)). The transaction begins
//! lazily, on its first statement in each database, on a connection from the worker's pool, and
//! keeps that connection until it ends. What happens when the client goes away follows from
//! ownership: the session, and so the transaction, is dropped when the connection closes.
//!
//! | state when the connection ends | outcome |
//! |---|---|
//! | active (or doomed by a failed statement) | rolled back at once, locks freed |
//! | prepared (`prepare`) | left prepared, logged with its gid, for its coordinator |
//! | committing | the commit is finished first (it runs inside the request) |
//!
//! ```no_run
//! use fdt_sdk::txn::{Databases, Transaction};
//! # fn demo(settings: &fdt_sdk::Settings) -> Result<(), Box<dyn std::error::Error>> {
//! let dbs = Databases::open(settings, &["main"])?;
//! let mut tx: Transaction = dbs.transaction();
//! tx.execute("main", "UPDATE accounts SET balance = balance - 5 WHERE id = $1", &[&"alice"])?;
//! let gid = tx.prepare("order-17")?; // phase one: durable, in doubt
//! tx.commit()?; // COMMIT PREPARED
//! # let _ = gid; Ok(()) }
//! ```
//!
//! A transaction spanning several databases is committed by the worker itself with two-phase
//! commit: prepare every branch, record the decision durably (table `fdt_decisions` in the
//! first database), then `COMMIT PREPARED` each; [`recovery`] settles what a crash left behind
//! (commit with a decision record, roll back without: presumed abort). The coordinating session
//! holds an advisory lock named by the transaction from before its first `PREPARE` until every
//! branch is settled, so recovery — which each worker runs every second — touches only
//! transactions whose coordinator is gone, with no timer to wait out. As that proof holds
//! whichever node coordinated, a worker settles its app's transactions of every node sharing
//! its databases: a node that died is cleaned up by those still running.
//!
//! Every session has the `[database.NAME]`'s `lock_timeout` and `statement_timeout` (5 s and
//! 10 s by default), so a request stuck behind another transaction's row lock fails instead of
//! hanging its handler thread.

mod pool;
pub mod recovery;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use postgres;
use postgres::types::ToSql;
use postgres::{Client, Row};

use crate::Settings;
use crate::gid::{self, Gid};
use pool::Pool;

/// Why a transaction operation failed. `Display` is a short reason fit for a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnError {
    /// No transaction is open.
    NotOpen,
    /// A statement failed earlier: the transaction can only roll back.
    Doomed,
    /// Phase one is done: only commit or rollback remain.
    AlreadyPrepared,
    /// No prepared transaction has this gid (its outcome is unknown to the server).
    UnknownGid(String),
    /// A gtrid or name that is not allowed.
    Invalid(String),
    /// The app used the API wrongly (for example an unknown database name).
    Usage(String),
    /// No pool connection became free in time.
    PoolExhausted(String),
    /// PostgreSQL reported an error (with its SQLSTATE), or the connection failed.
    Database(String),
    /// The connection broke while a commit was in flight: the outcome is unknown.
    OutcomeUnknown(String),
}

impl fmt::Display for TxnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnError::NotOpen => write!(f, "no transaction open"),
            TxnError::Doomed => write!(f, "transaction failed earlier; only ROLLBACK is possible"),
            TxnError::AlreadyPrepared => write!(f, "transaction is prepared; only COMMIT or ROLLBACK is possible"),
            TxnError::UnknownGid(_) => write!(f, "unknown gid"),
            TxnError::Invalid(m)
            | TxnError::Usage(m)
            | TxnError::PoolExhausted(m)
            | TxnError::Database(m)
            | TxnError::OutcomeUnknown(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for TxnError {}

/// Describes a PostgreSQL error in one line, with its SQLSTATE when there is one.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        // Connection errors keep the useful part (the OS error, say) in their source.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// The SQLSTATE of a database error (`None` for connection errors).
fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// True when PostgreSQL reported that the statement failed and the session goes on (severity
/// ERROR): then a statement outside a transaction block changed nothing. A connection error, or
/// a FATAL or PANIC (the session or the server ending), says nothing about what was committed.
fn statement_failed(e: &postgres::Error) -> bool {
    use postgres::error::Severity;
    e.as_db_error().is_some_and(|d| !matches!(d.parsed_severity(), Some(Severity::Fatal | Severity::Panic)))
}

/// Where a transaction is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnState {
    /// Nothing done yet (no `BEGIN` sent anywhere).
    Idle,
    /// Statements ran; it can prepare, commit or roll back.
    Active,
    /// A statement failed: it can only roll back.
    Doomed,
    /// Phase one done under this gid.
    Prepared(String),
    /// Committed or rolled back.
    Finished,
}

struct Shared {
    pools: BTreeMap<String, Pool>,
    node_id: String,
    app: String,
    /// Counts `txn_*` events into the server's metrics.
    events: crate::Events,
    /// `txn_idle_timeout`: how long an open transaction may wait for its client.
    idle_timeout: Option<Duration>,
    /// Recovery's own session per database (outside `pool_size`, opened on first need, replaced
    /// when broken): recovery must run exactly when requests have taken every pooled
    /// connection, waiting behind an orphaned branch's row locks.
    recovery: Mutex<BTreeMap<String, Client>>,
    /// Where [`Transaction::emit`] sends events once their transaction commits.
    bus: crate::Bus,
    /// `[events] database`: a transaction on it notifies other servers inside its own `COMMIT`.
    events_database: Option<String>,
    /// This server among those sharing the events database (`notify::origin`).
    origin: String,
}

/// Default `txn_idle_timeout`: a client that opened a transaction and went silent holds a
/// pooled connection (and maybe row locks) no longer than this. Interactive enough for a person
/// at a terminal, short enough that a few silent clients cannot keep a pool exhausted.
pub const DEFAULT_TXN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The reason a client gets when its idle transaction was rolled back (`ERR <this>`).
pub const IDLE_TIMEOUT_REASON: &str = "transaction idle too long";

/// Reads `txn_idle_timeout` (seconds, fractions allowed; 0: never) from the app's settings.
fn idle_timeout(settings: &Settings) -> Result<Option<Duration>, String> {
    let secs = match settings.get("txn_idle_timeout") {
        None => return Ok(Some(DEFAULT_TXN_IDLE_TIMEOUT)),
        Some(toml::Value::Integer(i)) if *i >= 0 => *i as f64,
        Some(toml::Value::Float(f)) if *f >= 0.0 && f.is_finite() => *f,
        Some(v) => {
            return Err(format!(
                "app {}: `txn_idle_timeout` must be a non-negative number of seconds, got {v}",
                settings.app_name()
            ));
        }
    };
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

/// The databases an app uses, with one connection pool each per worker. Cheap to clone.
#[derive(Clone)]
pub struct Databases {
    shared: Arc<Shared>,
}

/// How often each worker's recovery thread looks for transactions whose coordinator is gone
/// (one `pg_prepared_xacts` query per database when there is none): orphaned branches hold
/// row locks, so they should go within a second or two.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Opens a session to `db` with its `lock_timeout` and `statement_timeout` set, as the pools
/// do (for tools that work outside a pool, such as `fdtserver txn`); `application` shows in
/// `pg_stat_activity`.
pub fn connect(db: &crate::DatabaseSettings, application: &str) -> Result<Client, TxnError> {
    pool::connect(db, application)
}

impl Databases {
    /// Opens the `[database.NAME]`s the app uses: checks each is reachable and has
    /// `max_prepared_transactions > 0`, creates the bookkeeping tables, settles this app's
    /// transactions whose coordinator is gone (coordinated by any node), logs what it settled
    /// and what it cannot settle, and starts a thread that settles such transactions every
    /// [`RECOVERY_INTERVAL`] (it ends once every clone of the returned value is dropped).
    pub fn open(settings: &Settings, names: &[&str]) -> Result<Databases, String> {
        if names.is_empty() {
            return Err(format!("app {}: no database given", settings.app_name()));
        }
        let mut pools = BTreeMap::new();
        for name in names {
            let db = settings.database(name)?;
            pools.insert(db.name.clone(), Pool::new(&db, &format!("fdtserver {}", settings.app_name())));
        }
        let dbs = Databases {
            shared: Arc::new(Shared {
                pools,
                node_id: settings.node_id().to_string(),
                app: settings.app_name().to_string(),
                events: settings.events(),
                idle_timeout: idle_timeout(settings)?,
                recovery: Mutex::new(BTreeMap::new()),
                bus: settings.bus(),
                events_database: settings.events_database().map(str::to_string),
                origin: crate::notify::origin(settings.node_id(), settings.server_id()),
            }),
        };
        let mut clients = Vec::new();
        for pool in dbs.shared.pools.values() {
            let mut client = pool.checkout().map_err(|e| e.to_string())?;
            recovery::check_server(&mut client, &pool.name)?;
            recovery::ensure_schema(&mut client).map_err(|e| format!("database {}: {e}", pool.name))?;
            clients.push((pool.name.clone(), client));
        }
        let recovered = dbs.recover_with(&mut clients);
        match &recovered {
            Ok(report) => report.log(),
            Err(e) => log::warn!("recovery at start failed: {e}"),
        }
        for (name, client) in clients {
            let pool = dbs.pool(&name).expect("opened above");
            // After a failure the session may still hold a coordinator lock: closing it frees it.
            if recovered.is_ok() { pool.checkin(client) } else { pool.discard(client) }
        }
        dbs.start_recovery_thread();
        Ok(dbs)
    }

    /// Recovery of this app's transactions, whatever node coordinated them, on these
    /// connections (one per database). Any node's: a node that died has no worker left to
    /// settle its own, and the coordinator lock keeps every recovery off a live coordinator's
    /// transactions and off each other's.
    fn recover_with(&self, clients: &mut [(String, Client)]) -> Result<recovery::Report, String> {
        let report = recovery::recover(clients, recovery::Nodes::Any, Some(&self.shared.app), Duration::ZERO)?;
        self.count("txn_recovered_commit", report.committed.len());
        self.count("txn_recovered_rollback", report.rolled_back.len());
        Ok(report)
    }

    /// Settles this app's transactions whose coordinator is gone (a worker that died mid-commit,
    /// on this node or on another sharing these databases) and returns what it did. It works on recovery's own session per database, opened on first
    /// need outside `pool_size` and replaced when broken, so a pool that requests have
    /// exhausted never holds it up. `Ok(None)`: another call is recovering at this moment. The
    /// recovery thread calls this every [`RECOVERY_INTERVAL`].
    pub fn recover_orphans(&self) -> Result<Option<recovery::Report>, TxnError> {
        let mut sessions = match self.shared.recovery.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        let mut clients = Vec::new();
        for pool in self.shared.pools.values() {
            let client = match sessions.remove(&pool.name).filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match pool.connect() {
                    Ok(c) => c,
                    Err(e) => {
                        sessions.extend(clients);
                        return Err(e);
                    }
                },
            };
            clients.push((pool.name.clone(), client));
        }
        let result = self.recover_with(&mut clients);
        // After a failure a session may still hold a coordinator lock: closing it frees it.
        if result.is_ok() {
            sessions.extend(clients);
        }
        let report = result.map_err(TxnError::Database)?;
        report.log_settled();
        Ok(Some(report))
    }

    /// The thread behind [`Databases::recover_orphans`]. It holds the databases only while it
    /// works, so it ends within one interval once the app drops them.
    fn start_recovery_thread(&self) {
        let weak = Arc::downgrade(&self.shared);
        let spawned = std::thread::Builder::new().name("fdt-txn-recovery".into()).spawn(move || {
            // A database that is down fails every round: say so when the failure changes only.
            let mut failing: Option<String> = None;
            loop {
                std::thread::sleep(RECOVERY_INTERVAL);
                let Some(shared) = weak.upgrade() else { return };
                match (Databases { shared }).recover_orphans() {
                    Err(e) if failing.as_deref() != Some(&e.to_string()) => {
                        log::warn!(
                            "recovery of transactions whose coordinator is gone failed (retried every second): {e}"
                        );
                        failing = Some(e.to_string());
                    }
                    Err(_) => {}
                    Ok(_) if failing.take().is_some() => log::info!("recovery of transactions works again"),
                    Ok(_) => {}
                }
            }
        });
        if let Err(e) = spawned {
            log::warn!("cannot start the transaction recovery thread ({e}); orphaned branches wait for a restart");
        }
    }

    fn count(&self, event: &str, n: usize) {
        if n > 0 {
            self.shared.events.count(event, n as u64);
        }
    }

    fn pool(&self, name: &str) -> Result<&Pool, TxnError> {
        self.shared.pools.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.shared.pools.keys().map(String::as_str).collect();
            TxnError::Usage(format!("unknown database {name} (this app has: {})", known.join(", ")))
        })
    }

    /// The database names, in order.
    pub fn names(&self) -> Vec<String> {
        self.shared.pools.keys().cloned().collect()
    }

    /// A new transaction; nothing is sent until its first statement.
    pub fn transaction(&self) -> Transaction {
        Transaction {
            dbs: self.clone(),
            branches: BTreeMap::new(),
            state: TxnState::Idle,
            events: Vec::new(),
            notified: false,
            savepoints: Vec::new(),
        }
    }

    /// The gid this node and app give a gtrid.
    pub fn gid(&self, gtrid: &str) -> String {
        Gid::new(&self.shared.node_id, gtrid, &self.shared.app).to_string()
    }

    /// Runs `f` on a pooled connection outside any transaction (autocommit).
    pub fn with_client<T>(&self, db: &str, f: impl FnOnce(&mut Client) -> Result<T, TxnError>) -> Result<T, TxnError> {
        let pool = self.pool(db)?;
        let mut client = pool.checkout()?;
        let result = f(&mut client);
        match &result {
            Err(TxnError::Database(_) | TxnError::OutcomeUnknown(_)) if client.is_closed() => pool.discard(client),
            _ => pool.checkin(client),
        }
        result
    }

    /// This node's prepared transactions of this app, in its databases.
    pub fn prepared(&self) -> Result<Vec<String>, TxnError> {
        let mut gids = Vec::new();
        for name in self.names() {
            let list = self.with_client(&name, |c| recovery::list(c).map_err(TxnError::Database))?;
            gids.extend(
                list.into_iter()
                    .filter(|p| {
                        Gid::parse(&p.gid).is_some_and(|g| g.node_id == self.shared.node_id && g.app == self.shared.app)
                    })
                    .map(|p| p.gid),
            );
        }
        Ok(gids)
    }

    /// Settles a prepared transaction of this node by gid, from any connection.
    /// Only gids prepared for an outside coordinator, of this node and this app, qualify: a
    /// branch of a transaction the worker coordinates itself is settled only by the worker or
    /// by recovery.
    pub fn resolve(&self, gid: &str, commit: bool) -> Result<(), TxnError> {
        let ours = Gid::parse(gid).filter(|g| g.node_id == self.shared.node_id && g.app == self.shared.app);
        match ours {
            None => return Err(TxnError::UnknownGid(gid.to_string())),
            Some(g) if g.is_local() => {
                return Err(TxnError::Usage(
                    "this gid belongs to a transaction the server coordinates itself (fdtserver txn recover settles it)"
                        .into(),
                ));
            }
            Some(_) => {}
        }
        for name in self.names() {
            match self.with_client(&name, |c| recovery::settle(c, gid, commit)) {
                Err(TxnError::UnknownGid(_)) => continue,
                Ok(()) => {
                    self.count(if commit { "txn_resolved_commit" } else { "txn_resolved_rollback" }, 1);
                    return Ok(());
                }
                other => return other,
            }
        }
        Err(TxnError::UnknownGid(gid.to_string()))
    }
}

/// One database's part of a transaction: the pooled connection with `BEGIN` sent.
struct Branch {
    client: Option<Client>,
    /// Its transaction block is still open (not yet prepared): returning the connection needs a
    /// `ROLLBACK` first. A branch prepared by local coordination keeps its connection, outside
    /// any block, until phase two is done.
    in_block: bool,
}

/// A transaction over one or more of an app's databases. Dropping one that is not finished
/// rolls it back — unless it is prepared, which is left for its coordinator.
pub struct Transaction {
    dbs: Databases,
    branches: BTreeMap<String, Branch>,
    state: TxnState,
    /// Emitted in this transaction ([`Transaction::emit`]): delivered once it commits.
    events: Vec<(String, Vec<u8>)>,
    /// The events were notified to other servers inside the commit.
    notified: bool,
    /// Savepoints: (database, name, how many events were emitted before it).
    savepoints: Vec<(String, String, usize)>,
}

impl Transaction {
    pub fn state(&self) -> &TxnState {
        &self.state
    }

    /// How long the connection holding this transaction may stay silent before the
    /// transaction is rolled back (`txn_idle_timeout`): `Some` while it is open and not
    /// prepared (a prepared transaction belongs to its coordinator and is never touched).
    /// Set it as the connection's timer after every request, and call
    /// [`Transaction::expire_idle`] from [`App::on_timer`](crate::App::on_timer):
    ///
    /// ```no_run
    /// # use fdt_sdk::{Conn, Next, txn::Transaction};
    /// # #[derive(Default)] struct Session { tx: Option<Transaction> }
    /// fn after_request(conn: &mut Conn) {
    ///     let timer = conn.session::<Session>().tx.as_ref().and_then(Transaction::idle_timeout);
    ///     conn.set_timer(timer);
    /// }
    /// fn on_timer(conn: &mut Conn) -> Next {
    ///     match conn.session::<Session>().tx.take_if(|tx| tx.idle_timeout().is_some()) {
    ///         Some(tx) => {
    ///             tx.expire_idle();
    ///             conn.write(b"ERR transaction idle too long\n");
    ///             Next::Close
    ///         }
    ///         None => Next::KeepOpen,
    ///     }
    /// }
    /// ```
    pub fn idle_timeout(&self) -> Option<Duration> {
        let waiting = matches!(self.state, TxnState::Active | TxnState::Doomed);
        if waiting { self.dbs.shared.idle_timeout } else { None }
    }

    /// Rolls back a transaction whose client stayed silent for `txn_idle_timeout` (see
    /// [`Transaction::idle_timeout`]): its locks and pooled connections are free again. Counted
    /// as `txn_idle_timeouts` and logged. A prepared transaction is left as it is.
    pub fn expire_idle(self) {
        if self.idle_timeout().is_none() {
            return;
        }
        self.dbs.count("txn_idle_timeouts", 1);
        log::info!("rolling back a transaction idle for txn_idle_timeout ({:?})", self.dbs.shared.idle_timeout);
        if let Err(e) = self.rollback() {
            log::warn!("rolling back an idle transaction failed: {e}");
        }
    }

    /// Emits an event ([`Bus`](crate::Bus)) when, and only when, this transaction commits: it
    /// waits in the transaction and is dropped by a rollback, a failed commit or the end of the
    /// connection. With an `[events] database`, a one-phase commit on that database notifies
    /// the other servers inside the transaction itself (PostgreSQL delivers a `NOTIFY` only on
    /// commit, so even a crash between statement and commit loses nothing and announces
    /// nothing); the workers of this server get it once the commit returns. Otherwise (another
    /// database, or two-phase commit, where PostgreSQL refuses `NOTIFY`) the event goes out once
    /// the commit returns: a worker that dies between the two loses it, never announces a
    /// rollback.
    pub fn emit(&mut self, topic: &str, payload: &[u8]) -> Result<(), TxnError> {
        if !self.is_open() {
            return Err(TxnError::Usage("emit needs an open transaction (use Bus::emit outside one)".into()));
        }
        crate::bus::check(topic, payload).map_err(|e| TxnError::Usage(e.to_string()))?;
        if self.dbs.shared.events_database.is_some() {
            crate::notify::encode(&self.dbs.shared.origin, crate::notify::LONGEST_SEQ, topic, payload)
                .map_err(TxnError::Usage)?;
        }
        self.events.push((topic.to_string(), payload.to_vec()));
        Ok(())
    }

    /// Drops the events of a transaction that ended without committing.
    fn forget_events(&mut self) {
        self.events.clear();
        self.savepoints.clear();
        self.notified = false;
    }

    /// Sends the events of a transaction that committed.
    fn publish(&mut self) {
        let flags = if self.notified { crate::abi::EMIT_LOCAL } else { 0 };
        for (topic, payload) in std::mem::take(&mut self.events) {
            if let Err(e) = self.dbs.shared.bus.emit_with(&topic, &payload, flags) {
                log::error!("a committed transaction's event {topic} could not be emitted: {e}");
            }
        }
    }

    /// True from the first statement (or [`Transaction::begin`]) until commit or rollback.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, TxnState::Idle | TxnState::Finished)
    }

    /// Marks the transaction as begun; `BEGIN` itself is sent lazily per database.
    pub fn begin(&mut self) -> Result<(), TxnError> {
        match self.state {
            TxnState::Idle | TxnState::Finished => {
                self.forget_events();
                self.state = TxnState::Active;
                Ok(())
            }
            _ => Err(TxnError::Usage("a transaction is already open".into())),
        }
    }

    /// The databases this transaction has touched.
    pub fn databases(&self) -> Vec<String> {
        self.branches.keys().cloned().collect()
    }

    fn usable(&self) -> Result<(), TxnError> {
        match self.state {
            TxnState::Doomed => Err(TxnError::Doomed),
            TxnState::Prepared(_) => Err(TxnError::AlreadyPrepared),
            _ => Ok(()),
        }
    }

    /// The branch for `db`, sending `BEGIN` on a pooled connection the first time.
    fn branch(&mut self, db: &str) -> Result<&mut Client, TxnError> {
        self.usable()?;
        if !self.branches.contains_key(db) {
            let pool = self.dbs.pool(db)?;
            let mut client = pool.checkout()?;
            if let Err(e) = client.batch_execute("BEGIN") {
                pool.discard(client);
                return Err(TxnError::Database(format!("database {db}: BEGIN failed: {}", describe(&e))));
            }
            self.branches.insert(db.to_string(), Branch { client: Some(client), in_block: true });
        }
        if matches!(self.state, TxnState::Idle | TxnState::Finished) {
            self.forget_events(); // a transaction used again: the last one's events are gone
        }
        self.state = TxnState::Active;
        Ok(self.branches.get_mut(db).and_then(|b| b.client.as_mut()).expect("branch just ensured"))
    }

    /// Runs a statement in `db`; returns the rows affected. A failure dooms the transaction.
    pub fn execute(&mut self, db: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, TxnError> {
        let client = self.branch(db)?;
        let result = client.execute(sql, params);
        result.map_err(|e| self.doom(db, &e))
    }

    /// Runs a query in `db`. A failure dooms the transaction.
    pub fn query(&mut self, db: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, TxnError> {
        let client = self.branch(db)?;
        let result = client.query(sql, params);
        result.map_err(|e| self.doom(db, &e))
    }

    fn doom(&mut self, db: &str, e: &postgres::Error) -> TxnError {
        self.state = TxnState::Doomed;
        TxnError::Database(format!("database {db}: {}", describe(e)))
    }

    fn check_name(name: &str) -> Result<(), TxnError> {
        let ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if ok { Ok(()) } else { Err(TxnError::Invalid(format!("bad savepoint name {name:?}"))) }
    }

    /// `SAVEPOINT name` in `db`.
    pub fn savepoint(&mut self, db: &str, name: &str) -> Result<(), TxnError> {
        Self::check_name(name)?;
        let client = self.branch(db)?;
        let result = client.batch_execute(&format!("SAVEPOINT {name}"));
        result.map_err(|e| self.doom(db, &e))?;
        // Events emitted after it go with what a rollback to it undoes.
        self.savepoints.push((db.to_string(), name.to_string(), self.events.len()));
        Ok(())
    }

    /// `ROLLBACK TO SAVEPOINT name` in `db`: undoes what followed it, and un-dooms the
    /// transaction if the failure came after the savepoint.
    pub fn rollback_to(&mut self, db: &str, name: &str) -> Result<(), TxnError> {
        Self::check_name(name)?;
        if let TxnState::Prepared(_) = self.state {
            return Err(TxnError::AlreadyPrepared);
        }
        let client = self.branches.get_mut(db).and_then(|b| b.client.as_mut()).ok_or(TxnError::NotOpen)?;
        match client.batch_execute(&format!("ROLLBACK TO SAVEPOINT {name}")) {
            Ok(()) => {
                self.state = TxnState::Active;
                // The savepoint stays; those after it are gone, and so are the events.
                if let Some(i) = self.savepoints.iter().rposition(|(d, n, _)| d == db && n == name) {
                    self.events.truncate(self.savepoints[i].2);
                    self.savepoints.truncate(i + 1);
                }
                Ok(())
            }
            Err(e) => Err(self.doom(db, &e)),
        }
    }

    /// `RELEASE SAVEPOINT name` in `db`.
    pub fn release(&mut self, db: &str, name: &str) -> Result<(), TxnError> {
        Self::check_name(name)?;
        let client = self.branch(db)?;
        let result = client.batch_execute(&format!("RELEASE SAVEPOINT {name}"));
        result.map_err(|e| self.doom(db, &e))?;
        if let Some(i) = self.savepoints.iter().rposition(|(d, n, _)| d == db && n == name) {
            self.savepoints.truncate(i);
        }
        Ok(())
    }

    /// Phase one under a gtrid chosen by an outside coordinator: `PREPARE TRANSACTION`, then
    /// checks that PostgreSQL really prepared it (it answers a prepare of a failed transaction
    /// with a rollback that looks like success). Returns the gid. Works for a transaction on
    /// one database; one that touched none is prepared (empty) on the app's first database.
    pub fn prepare(&mut self, gtrid: &str) -> Result<String, TxnError> {
        gid::check_gtrid(gtrid).map_err(TxnError::Invalid)?;
        match self.state {
            TxnState::Idle | TxnState::Finished => return Err(TxnError::NotOpen),
            _ => self.usable()?,
        }
        if self.branches.len() > 1 {
            return Err(TxnError::Usage(format!(
                "PREPARE needs a transaction on one database; this one spans {}",
                self.databases().join(", ")
            )));
        }
        if self.branches.is_empty() {
            let first = self.dbs.names().into_iter().next().expect("an app has a database");
            self.branch(&first)?;
        }
        let gid = self.dbs.gid(gtrid);
        let db = self.databases().remove(0);
        self.prepare_branch(&db, &gid)?;
        self.state = TxnState::Prepared(gid.clone());
        self.dbs.count("txn_prepared", 1);
        Ok(gid)
    }

    /// Prepares one branch under `gid` and verifies it; returns its connection to the pool.
    fn prepare_branch(&mut self, db: &str, gid: &str) -> Result<(), TxnError> {
        let pool = self.dbs.pool(db)?;
        let branch = self.branches.get_mut(db).ok_or(TxnError::NotOpen)?;
        let mut client = branch.client.take().ok_or(TxnError::NotOpen)?;
        let result = prepare_on(&mut client, db, gid);
        if client.is_closed() {
            pool.discard(client)
        } else {
            pool.checkin(client)
        }
        if let Err(TxnError::Database(_)) = result {
            // A failed PREPARE TRANSACTION is a ROLLBACK: the transaction is gone.
            self.state = TxnState::Finished;
        }
        result
    }

    /// Phase one of local coordination on a participant's branch: prepares it under `gid` and
    /// verifies it, and **keeps** its connection (now outside any block) for phase two, so
    /// `COMMIT PREPARED` never waits for the pool — where other requests may have taken every
    /// connection — while the branch holds its row locks.
    fn prepare_participant(&mut self, db: &str, gid: &str) -> Result<(), TxnError> {
        let pool = self.dbs.pool(db)?;
        let branch = self.branches.get_mut(db).ok_or(TxnError::NotOpen)?;
        let client = branch.client.as_mut().ok_or(TxnError::NotOpen)?;
        branch.in_block = false;
        let result = prepare_on(client, db, gid);
        if client.is_closed() {
            pool.discard(branch.client.take().expect("checked above"));
        }
        result
    }

    /// Settles a participant's prepared branch `gid` in `db` on the connection it was prepared
    /// on; when that connection is lost, on pooled ones with retries.
    fn settle_participant(&mut self, db: &str, gid: &str, commit: bool) -> Result<(), TxnError> {
        if let Some(client) = self.branches.get_mut(db).and_then(|b| b.client.as_mut()) {
            match recovery::settle(client, gid, commit) {
                Err(TxnError::Database(_) | TxnError::OutcomeUnknown(_)) => {
                    if client.is_closed()
                        && let (Some(client), Ok(pool)) =
                            (self.branches.get_mut(db).and_then(|b| b.client.take()), self.dbs.pool(db))
                    {
                        pool.discard(client);
                    }
                }
                other => return other,
            }
        }
        settle_with_retry(&self.dbs, db, gid, commit)
    }

    /// Commits: one-phase on one database, `COMMIT PREPARED` after [`Transaction::prepare`],
    /// or two-phase commit coordinated by this worker across several databases.
    pub fn commit(mut self) -> Result<(), TxnError> {
        let state = std::mem::replace(&mut self.state, TxnState::Finished);
        let counted = !matches!(state, TxnState::Idle | TxnState::Finished);
        let two_phase = state == TxnState::Active && self.branches.len() > 1;
        let result = self.commit_from(state);
        // Every path ends with the connections back in their pools (none is left in a block).
        self.rollback_branches();
        match &result {
            Ok(()) => self.publish(),
            Err(_) => self.forget_events(),
        }
        if counted {
            match &result {
                Ok(()) if two_phase => {
                    self.dbs.count("txn_committed", 1);
                    self.dbs.count("txn_two_phase_committed", 1);
                }
                Ok(()) => self.dbs.count("txn_committed", 1),
                Err(TxnError::OutcomeUnknown(_)) => self.dbs.count("txn_outcome_unknown", 1),
                Err(_) => self.dbs.count("txn_rolled_back", 1),
            }
        }
        result
    }

    fn commit_from(&mut self, state: TxnState) -> Result<(), TxnError> {
        match state {
            TxnState::Idle | TxnState::Finished => Ok(()),
            TxnState::Doomed => {
                self.rollback_branches();
                Err(TxnError::Doomed)
            }
            TxnState::Prepared(gid) => {
                let db = self.databases().remove(0);
                settle_with_retry(&self.dbs, &db, &gid, true)
            }
            TxnState::Active if self.branches.len() <= 1 => self.commit_one_phase(),
            TxnState::Active => self.commit_two_phase(),
        }
    }

    fn commit_one_phase(&mut self) -> Result<(), TxnError> {
        let Some((db, mut branch)) = self.branches.pop_first() else { return Ok(()) };
        let pool = self.dbs.pool(&db)?;
        let mut client = branch.client.take().ok_or(TxnError::NotOpen)?;
        // The events travel to other servers with the commit itself.
        if !self.events.is_empty() && self.dbs.shared.events_database.as_deref() == Some(db.as_str()) {
            let texts: Vec<String> = self
                .events
                .iter()
                .filter_map(|(topic, payload)| {
                    crate::notify::encode(&self.dbs.shared.origin, &crate::notify::seq('a'), topic, payload).ok()
                })
                .collect();
            let notified = client.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
                &[&crate::notify::CHANNEL, &texts],
            );
            if let Err(e) = notified {
                let _ = client.batch_execute("ROLLBACK");
                pool.checkin(client);
                return Err(TxnError::Database(format!(
                    "database {db}: the events could not be notified, rolled back: {}",
                    describe(&e)
                )));
            }
            self.notified = true;
        }
        match client.batch_execute("COMMIT") {
            Ok(()) => {
                pool.checkin(client);
                Ok(())
            }
            Err(e) if client.is_closed() || e.as_db_error().is_none() => {
                pool.discard(client);
                Err(TxnError::OutcomeUnknown(format!("database {db}: connection lost during COMMIT: {}", describe(&e))))
            }
            Err(e) => {
                // COMMIT failed (a deferred constraint, say): PostgreSQL rolled back.
                let _ = client.batch_execute("ROLLBACK");
                pool.checkin(client);
                Err(TxnError::Database(format!("database {db}: COMMIT failed, rolled back: {}", describe(&e))))
            }
        }
    }

    /// Local coordination: take the coordinator lock, prepare all, record the decision, commit
    /// all, release the lock.
    fn commit_two_phase(&mut self) -> Result<(), TxnError> {
        let dbs = self.databases();
        let coordinator = dbs[0].clone();
        // The coordinator database's session holds the liveness lock, records the decision and
        // settles its own branch; it leaves the pool only when the transaction is settled.
        let client = self.branches.remove(&coordinator).and_then(|mut b| b.client.take());
        let mut coord =
            Coordinator { dbs: self.dbs.clone(), db: coordinator.clone(), client, in_block: true, lock: None };
        let Some(client) = coord.client.as_mut() else {
            self.rollback_branches();
            return Err(TxnError::NotOpen);
        };
        // A transaction id no restart can repeat: a sequence in the coordinator database.
        let n: i64 = match client.query_one("SELECT nextval('fdt_lc_seq')", &[]) {
            Ok(row) => row.get(0),
            Err(e) => {
                self.rollback_branches();
                return Err(TxnError::Database(format!("database {coordinator}: {}", describe(&e))));
            }
        };
        let Ok(n) = u64::try_from(n) else {
            self.rollback_branches();
            return Err(TxnError::Database("fdt_lc_seq returned a negative number".into()));
        };
        let gids: Vec<(String, String)> =
            dbs.iter().map(|db| (db.clone(), self.dbs.gid(&gid::local_branch(n, &coordinator, db)))).collect();
        let branch = Gid::parse(&gids[0].1).expect("a gid we built parses");
        let key = branch.decision_key().expect("a local gid has a decision key");
        let lock = branch.coordinator_lock().expect("a local gid has a coordinator lock");
        // Liveness, before any PREPARE: while this session holds the lock, recovery leaves the
        // transaction alone; once the session is gone (worker killed), recovery settles it.
        if let Err(e) = client.execute("SELECT pg_advisory_lock($1)", &[&lock]) {
            self.rollback_branches();
            return Err(TxnError::Database(format!("database {coordinator}: {}", describe(&e))));
        }
        coord.lock = Some(lock);
        // Phase one (the coordinator's branch first: `dbs` is sorted and it is `dbs[0]`). Any
        // failure: roll back what was prepared and what was not (presumed abort).
        for (i, (db, gid)) in gids.iter().enumerate() {
            let prepared = if *db == coordinator { coord.prepare(gid) } else { self.prepare_participant(db, gid) };
            if let Err(e) = prepared {
                for (db, gid) in &gids[..i] {
                    let _ = if *db == coordinator {
                        coord.settle(db, gid, false)
                    } else {
                        self.settle_participant(db, gid, false)
                    };
                }
                self.rollback_branches();
                return Err(e);
            }
        }
        // The decision, durable before any COMMIT PREPARED, written by the session that holds
        // the lock: once recovery can take the lock, the decision is final either way.
        let participants = dbs.join(",");
        let decided = match coord.client.as_mut() {
            Some(c) => c
                .execute("INSERT INTO fdt_decisions (gtrid, participants) VALUES ($1, $2)", &[&key, &participants])
                .map_err(|e| {
                    // Only an ordinary error of the statement proves the row was not written; a
                    // lost connection, or a FATAL/PANIC (the session ending: 57P01, 57P02…),
                    // may come after the INSERT committed.
                    if c.is_closed() || !statement_failed(&e) {
                        TxnError::OutcomeUnknown(describe(&e))
                    } else {
                        TxnError::Database(describe(&e))
                    }
                }),
            None => Err(TxnError::OutcomeUnknown("the coordinator's connection was lost".into())),
        };
        match decided {
            Ok(_) => {}
            Err(TxnError::OutcomeUnknown(e)) => {
                log::error!(
                    "transaction {key}: the decision may or may not be recorded ({e}); recovery will settle it"
                );
                return Err(TxnError::OutcomeUnknown(format!("commit outcome unknown: {e}")));
            }
            Err(e) => {
                for (db, gid) in &gids {
                    let _ = if *db == coordinator {
                        coord.settle(db, gid, false)
                    } else {
                        self.settle_participant(db, gid, false)
                    };
                }
                return Err(e);
            }
        }
        // Phase two: from here on the transaction is committed, whatever fails.
        let mut pending = Vec::new();
        for (db, gid) in &gids {
            let settled =
                if *db == coordinator { coord.settle(db, gid, true) } else { self.settle_participant(db, gid, true) };
            match settled {
                Ok(()) => {}
                // Nobody may settle a branch of ours but us and recovery (which waits for our
                // lock): a branch that is gone was settled by an operator.
                Err(TxnError::UnknownGid(_)) => {
                    log::error!("transaction {key}: branch {gid} is no longer prepared; its outcome is unknown");
                    return Err(TxnError::OutcomeUnknown(format!("branch {gid} was settled by someone else")));
                }
                Err(e) => {
                    log::error!("transaction {key}: COMMIT PREPARED {gid} failed ({e}); recovery will finish it");
                    pending.push(gid.clone());
                }
            }
        }
        if pending.is_empty() {
            let _ = coord.with_client(|c| {
                c.execute("DELETE FROM fdt_decisions WHERE gtrid = $1", &[&key])
                    .map_err(|e| TxnError::Database(describe(&e)))
            });
        }
        // Dropping `coord` releases the lock: what is still pending is recovery's now.
        Ok(())
    }

    /// Rolls back: `ROLLBACK` on each branch, or `ROLLBACK PREPARED` after a prepare.
    pub fn rollback(mut self) -> Result<(), TxnError> {
        let state = std::mem::replace(&mut self.state, TxnState::Finished);
        if !matches!(state, TxnState::Idle | TxnState::Finished) {
            self.dbs.count("txn_rolled_back", 1);
        }
        match state {
            TxnState::Prepared(gid) => {
                let db = self.databases().remove(0);
                settle_with_retry(&self.dbs, &db, &gid, false)
            }
            _ => {
                self.rollback_branches();
                Ok(())
            }
        }
    }

    /// Rolls back the branches still in a transaction block and returns every connection the
    /// transaction holds to its pool.
    fn rollback_branches(&mut self) {
        for (db, mut branch) in std::mem::take(&mut self.branches) {
            let Some(mut client) = branch.client.take() else { continue };
            let Ok(pool) = self.dbs.pool(&db) else { continue };
            if !branch.in_block {
                pool.checkin(client);
                continue;
            }
            match client.batch_execute("ROLLBACK") {
                Ok(()) => pool.checkin(client),
                // Unknown state: closing the connection makes PostgreSQL abort the transaction.
                Err(_) => pool.discard(client),
            }
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        match &self.state {
            TxnState::Active | TxnState::Doomed => {
                log::debug!("rolling back the open transaction of a closed connection");
                self.rollback_branches();
                self.dbs.count("txn_rolled_back", 1);
            }
            TxnState::Prepared(gid) => {
                log::warn!("connection ended with transaction {gid} prepared: left for its coordinator to settle");
                self.dbs.count("txn_left_prepared", 1);
            }
            TxnState::Idle | TxnState::Finished => {}
        }
    }
}

/// `PREPARE TRANSACTION` on `client`, then the check that PostgreSQL really prepared it.
/// Either way the session is outside any transaction block afterwards.
fn prepare_on(client: &mut Client, db: &str, gid: &str) -> Result<(), TxnError> {
    if let Err(e) = client.batch_execute(&format!("PREPARE TRANSACTION '{gid}'")) {
        return Err(TxnError::Database(if sqlstate(&e) == Some("42710") {
            format!("gid {gid} is already in use")
        } else {
            format!("database {db}: PREPARE failed, transaction rolled back: {}", describe(&e))
        }));
    }
    match client.query_opt("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1", &[&gid]) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(TxnError::Database(
            "PREPARE did not prepare: a statement of the transaction had failed, so it was rolled back".into(),
        )),
        Err(e) => Err(TxnError::OutcomeUnknown(format!("database {db}: cannot verify the prepare: {}", describe(&e)))),
    }
}

/// The coordinating session of a locally coordinated transaction: its branch in the coordinator
/// database, then the holder of the coordinator lock ([`Gid::coordinator_lock`]). Dropping it
/// rolls back its branch if still open, releases the lock and returns the connection (or closes
/// it, which releases the lock too).
struct Coordinator {
    dbs: Databases,
    db: String,
    client: Option<Client>,
    /// Its branch's transaction block is still open (not prepared, not rolled back).
    in_block: bool,
    lock: Option<i64>,
}

impl Coordinator {
    /// Phase one on the coordinator's own branch.
    fn prepare(&mut self, gid: &str) -> Result<(), TxnError> {
        let client = self.client.as_mut().ok_or(TxnError::NotOpen)?;
        self.in_block = false;
        prepare_on(client, &self.db, gid)
    }

    /// Runs `f` on the coordinating session; a connection failure drops the session (and with
    /// it the lock).
    fn with_client<T>(&mut self, f: impl FnOnce(&mut Client) -> Result<T, TxnError>) -> Result<T, TxnError> {
        let client = self.client.as_mut().ok_or(TxnError::NotOpen)?;
        let result = f(client);
        if client.is_closed()
            && let (Some(client), Ok(pool)) = (self.client.take(), self.dbs.pool(&self.db))
        {
            pool.discard(client);
        }
        result
    }

    /// Settles `gid` in `db`: on the coordinating session for its own database (which frees
    /// a pool connection of the coordinator database for others), otherwise, or when that
    /// session is lost, on pooled connections with retries.
    fn settle(&mut self, db: &str, gid: &str, commit: bool) -> Result<(), TxnError> {
        if db == self.db && self.client.is_some() {
            match self.with_client(|c| recovery::settle(c, gid, commit)) {
                Err(TxnError::Database(_) | TxnError::OutcomeUnknown(_) | TxnError::NotOpen) => {}
                other => return other,
            }
        }
        settle_with_retry(&self.dbs, db, gid, commit)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let (Some(mut client), Ok(pool)) = (self.client.take(), self.dbs.pool(&self.db)) else { return };
        let mut clean = !client.is_closed();
        if clean && self.in_block {
            clean = client.batch_execute("ROLLBACK").is_ok();
        }
        if let (true, Some(lock)) = (clean, self.lock) {
            // Session-level: a ROLLBACK does not release it.
            clean = client.query_one("SELECT pg_advisory_unlock($1)", &[&lock]).is_ok_and(|r| r.get::<_, bool>(0));
        }
        if clean { pool.checkin(client) } else { pool.discard(client) }
    }
}

/// How often settling a prepared transaction is tried on fresh connections before giving up
/// (leaving it to recovery).
const SETTLE_ATTEMPTS: usize = 3;

/// `COMMIT PREPARED` / `ROLLBACK PREPARED` on `db`, retried on connection failures.
fn settle_with_retry(dbs: &Databases, db: &str, gid: &str, commit: bool) -> Result<(), TxnError> {
    let mut last = TxnError::NotOpen;
    for attempt in 0..SETTLE_ATTEMPTS {
        match dbs.with_client(db, |c| recovery::settle(c, gid, commit)) {
            Ok(()) => return Ok(()),
            Err(e @ (TxnError::UnknownGid(_) | TxnError::Usage(_))) => return Err(e),
            Err(e) => {
                log::warn!("settling {gid} (attempt {}): {e}", attempt + 1);
                last = e;
                std::thread::sleep(std::time::Duration::from_millis(50 << attempt));
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errors_a_client_sees_say_what_it_may_do_next() {
        assert_eq!(TxnError::NotOpen.to_string(), "no transaction open");
        assert_eq!(TxnError::Doomed.to_string(), "transaction failed earlier; only ROLLBACK is possible");
        assert_eq!(
            TxnError::AlreadyPrepared.to_string(),
            "transaction is prepared; only COMMIT or ROLLBACK is possible"
        );
        assert_eq!(TxnError::UnknownGid("g1".into()).to_string(), "unknown gid");
        assert_eq!(
            TxnError::OutcomeUnknown("commit outcome unknown: x".into()).to_string(),
            "commit outcome unknown: x"
        );
    }

    fn settings(app: &str) -> Settings {
        Settings::parse("demo", app)
            .unwrap()
            .with_databases("[main]\nurl = \"postgresql://nobody@127.0.0.1:1/none\"\n")
            .unwrap()
    }

    #[test]
    fn txn_idle_timeout_takes_seconds_defaults_to_30_and_0_means_never() {
        assert_eq!(idle_timeout(&settings("")), Ok(Some(DEFAULT_TXN_IDLE_TIMEOUT)));
        assert_eq!(idle_timeout(&settings("txn_idle_timeout = 5")), Ok(Some(Duration::from_secs(5))));
        assert_eq!(idle_timeout(&settings("txn_idle_timeout = 0.25")), Ok(Some(Duration::from_millis(250))));
        assert_eq!(idle_timeout(&settings("txn_idle_timeout = 0")), Ok(None));
    }

    #[test]
    fn a_txn_idle_timeout_that_is_not_a_non_negative_number_keeps_the_app_from_starting() {
        for (value, shown) in [("-1", "-1"), ("\"30s\"", "\"30s\""), ("nan", "nan")] {
            // Refused before any connection is tried (the database here is unreachable).
            let e = Databases::open(&settings(&format!("txn_idle_timeout = {value}")), &["main"]).err().unwrap();
            assert_eq!(
                e,
                format!("app demo: `txn_idle_timeout` must be a non-negative number of seconds, got {shown}")
            );
        }
    }
}
