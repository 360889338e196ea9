//! `bank`: a line protocol over PostgreSQL, built on the SDK's transactions (`fdt_sdk::txn`)
//! with no transaction logic of its own.
//!
//! Settings: `database = "main"`, or `databases = ["a", "b"]` to spread accounts over several
//! databases (an account lives in the one its id hashes to; a transfer between two of them is
//! committed by two-phase commit); `txn_idle_timeout` (seconds, default 30, 0 = never): an open
//! transaction whose client says nothing for that long is rolled back, and the client gets
//! `ERR transaction idle too long` and is disconnected. Table `accounts(id text primary key, balance bigint not null
//! check (balance >= 0))`, created if missing.
//!
//! Commands (one answer line each, `ERR <reason>` on any error): `BALANCE a`,
//! `TRANSFER from to n`, `BEGIN`, `DEBIT a n`, `CREDIT a n`, `PREPARE gtrid`, `COMMIT`,
//! `ROLLBACK`, `RESOLVE COMMIT gid`, `RESOLVE ROLLBACK gid`, `RECOVER`, and `OPEN a [n]` to
//! create an account (for setting up).

use fdt_sdk::txn::{Databases, Transaction, TxnError, TxnState};
use fdt_sdk::{App, Conn, Next, Settings};

struct Bank {
    dbs: Databases,
    names: Vec<String>,
}

/// A connection's state: its open transaction, if any.
#[derive(Default)]
struct Session {
    tx: Option<Transaction>,
}

const CREATE_ACCOUNTS: &str =
    "CREATE TABLE IF NOT EXISTS accounts (id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))";

type Reply = Result<String, String>;

fn err(e: TxnError) -> String {
    match e {
        TxnError::Database(m) if m.contains("(23514)") => "insufficient funds".into(),
        TxnError::Database(m) if m.contains("(55P03)") => {
            "account busy: another transaction holds it (lock_timeout ran out)".into()
        }
        TxnError::Database(m) if m.contains("(57014)") => "statement took too long (statement_timeout)".into(),
        other => other.to_string(),
    }
}

fn amount(word: Option<&str>) -> Result<i64, String> {
    match word.map(str::parse::<i64>) {
        Some(Ok(n)) if n > 0 => Ok(n),
        _ => Err("amount must be a positive integer".into()),
    }
}

/// `s` as a JSON string.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn account(word: Option<&str>) -> Result<&str, String> {
    match word {
        Some(a) if !a.is_empty() && a.len() <= 64 => Ok(a),
        Some(_) => Err("account ids are 1 to 64 characters".into()),
        None => Err("missing account".into()),
    }
}

impl Bank {
    /// The database an account lives in (stable: FNV-1a of its id).
    fn home(&self, acct: &str) -> &str {
        let hash =
            acct.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        &self.names[(hash % self.names.len() as u64) as usize]
    }

    fn debit(&self, tx: &mut Transaction, acct: &str, n: i64) -> Result<(), String> {
        let db = self.home(acct);
        let changed = tx
            .execute(db, "UPDATE accounts SET balance = balance - $1 WHERE id = $2 AND balance >= $1", &[&n, &acct])
            .map_err(err)?;
        if changed == 1 {
            return Ok(());
        }
        let exists = tx.query(db, "SELECT 1 FROM accounts WHERE id = $1", &[&acct]).map_err(err)?;
        Err(if exists.is_empty() { "unknown account".into() } else { "insufficient funds".into() })
    }

    /// Locks an account's row for the rest of the transaction; returns its balance.
    fn lock(&self, tx: &mut Transaction, acct: &str) -> Result<i64, String> {
        let sql = "SELECT balance FROM accounts WHERE id = $1 FOR UPDATE";
        let rows = tx.query(self.home(acct), sql, &[&acct]).map_err(err)?;
        rows.first().map(|r| r.get::<_, i64>(0)).ok_or_else(|| "unknown account".into())
    }

    fn credit(&self, tx: &mut Transaction, acct: &str, n: i64) -> Result<(), String> {
        let db = self.home(acct);
        let changed =
            tx.execute(db, "UPDATE accounts SET balance = balance + $1 WHERE id = $2", &[&n, &acct]).map_err(err)?;
        if changed == 1 { Ok(()) } else { Err("unknown account".into()) }
    }

    /// Runs `f` in the session's open transaction, or in a transaction of its own that is
    /// committed when `f` succeeds (and rolled back when it fails).
    fn in_transaction(
        &self,
        session: &mut Session,
        f: impl FnOnce(&mut Transaction) -> Result<String, String>,
    ) -> Reply {
        if let Ok(tx) = Self::open_tx(session) {
            if let TxnState::Prepared(_) = tx.state() {
                return Err(err(TxnError::AlreadyPrepared));
            }
            return f(tx);
        }
        let mut tx = self.dbs.transaction();
        let answer = f(&mut tx)?; // on error, dropping `tx` rolls it back
        tx.commit().map_err(err)?;
        Ok(answer)
    }

    /// The session's open transaction; forgets one that has ended (a failed PREPARE, say).
    fn open_tx(session: &mut Session) -> Result<&mut Transaction, String> {
        if !session.tx.as_ref().is_some_and(Transaction::is_open) {
            session.tx = None;
            return Err("no transaction open (send BEGIN first)".into());
        }
        Ok(session.tx.as_mut().expect("checked"))
    }

    fn command(&self, session: &mut Session, line: &str) -> Reply {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "BALANCE" => {
                let acct = account(words.next())?;
                let db = self.home(acct);
                self.in_transaction(session, |tx| {
                    let rows = tx.query(db, "SELECT balance FROM accounts WHERE id = $1", &[&acct]).map_err(err)?;
                    let row = rows.first().ok_or("unknown account")?;
                    Ok(format!("OK {}", row.get::<_, i64>(0)))
                })
            }
            "OPEN" => {
                let acct = account(words.next())?;
                let balance = match words.next() {
                    None => 0,
                    Some(w) => {
                        w.parse::<i64>().ok().filter(|n| *n >= 0).ok_or("balance must be a non-negative integer")?
                    }
                };
                let db = self.home(acct);
                self.in_transaction(session, |tx| {
                    let sql = "INSERT INTO accounts (id, balance) VALUES ($1, $2) ON CONFLICT DO NOTHING";
                    match tx.execute(db, sql, &[&acct, &balance]).map_err(err)? {
                        1 => Ok("OK".into()),
                        _ => Err("account exists".into()),
                    }
                })
            }
            "TRANSFER" => {
                let (from, to) = (account(words.next())?, account(words.next())?);
                let n = amount(words.next())?;
                if from == to {
                    return Err("cannot transfer to the same account".into());
                }
                self.in_transaction(session, |tx| {
                    // Lock both rows first, in one global order (by id, whatever database each
                    // lives in): two transfers in opposite directions across two databases
                    // would otherwise each hold one row and wait for the other through
                    // different sessions, a cycle no PostgreSQL deadlock detector can see.
                    // Checking before changing anything also means a transfer that fails inside
                    // an open transaction leaves nothing behind.
                    let mut balance = 0;
                    for acct in if from < to { [from, to] } else { [to, from] } {
                        let b = self.lock(tx, acct)?;
                        if acct == from {
                            balance = b;
                        }
                    }
                    if balance < n {
                        return Err("insufficient funds".into());
                    }
                    self.debit(tx, from, n)?;
                    self.credit(tx, to, n)?;
                    let event = format!("{{\"from\":{},\"to\":{},\"amount\":{n}}}", json_str(from), json_str(to));
                    tx.emit("bank.transferred", event.as_bytes()).map_err(err)?;
                    Ok("OK".into())
                })
            }
            "BEGIN" => {
                if session.tx.as_ref().is_some_and(Transaction::is_open) {
                    return Err("a transaction is already open".into());
                }
                let mut tx = self.dbs.transaction();
                tx.begin().map_err(err)?;
                session.tx = Some(tx);
                Ok("OK".into())
            }
            "DEBIT" | "CREDIT" => {
                let acct = account(words.next())?;
                let n = amount(words.next())?;
                let tx = Self::open_tx(session)?;
                let delta = if verb == "DEBIT" {
                    self.debit(tx, acct, n)?;
                    -n
                } else {
                    self.credit(tx, acct, n)?;
                    n
                };
                let event = format!("{{\"account\":{},\"delta\":{delta}}}", json_str(acct));
                tx.emit("bank.changed", event.as_bytes()).map_err(err)?;
                Ok("OK".into())
            }
            "PREPARE" => {
                let gtrid = words.next().ok_or("missing gtrid")?;
                let gid = Self::open_tx(session)?.prepare(gtrid).map_err(err)?;
                Ok(format!("PREPARED {gid}"))
            }
            "COMMIT" => {
                Self::open_tx(session)?;
                session.tx.take().expect("checked").commit().map_err(err)?;
                Ok("COMMITTED".into())
            }
            "ROLLBACK" => {
                Self::open_tx(session)?;
                session.tx.take().expect("checked").rollback().map_err(err)?;
                Ok("ROLLED-BACK".into())
            }
            "RESOLVE" => {
                let commit = match words.next().map(str::to_ascii_uppercase).as_deref() {
                    Some("COMMIT") => true,
                    Some("ROLLBACK") => false,
                    _ => return Err("usage: RESOLVE COMMIT|ROLLBACK <gid>".into()),
                };
                let gid = words.next().ok_or("missing gid")?;
                self.dbs.resolve(gid, commit).map_err(err)?;
                Ok(if commit { "COMMITTED" } else { "ROLLED-BACK" }.into())
            }
            "RECOVER" => {
                let gids = self.dbs.prepared().map_err(err)?;
                Ok(if gids.is_empty() { "OK".into() } else { format!("OK {}", gids.join(" ")) })
            }
            "" => Err("empty command".into()),
            other => Err(format!("unknown command {other}")),
        }
    }
}

impl App for Bank {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["database", "databases", "txn_idle_timeout"]);
    /// Between transactions a connection holds nothing: a reload hands it to the new
    /// generation. One with a transaction open is in progress, and stays.
    const PROTOCOL: Option<&'static str> = Some("bank");

    fn start(settings: &Settings) -> Result<Self, String> {
        let names = match (settings.string("database", "")?, settings.string_list("databases")?) {
            (one, None) if !one.is_empty() => vec![one],
            (one, Some(many)) if one.is_empty() && !many.is_empty() => many,
            (_, Some(_)) => return Err("app bank: set `database` or `databases`, not both".into()),
            _ => return Err("app bank: set `database = \"NAME\"` or `databases = [\"A\", \"B\"]`".into()),
        };
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let dbs = Databases::open(settings, &refs)?;
        for db in &names {
            dbs.with_client(db, |c| fdt_sdk::txn::recovery::set_up(c, CREATE_ACCOUNTS).map_err(TxnError::Database))
                .map_err(|e| format!("database {db}: cannot create table accounts: {e}"))?;
        }
        let mut names = dbs.names();
        names.sort();
        Ok(Bank { dbs, names })
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        while let Some(line) = conn.take_line() {
            // Strictly UTF-8: a lossy decoding would give different byte strings the same
            // account name.
            let reply = match std::str::from_utf8(line) {
                Ok(line) => self.command(conn.session::<Session>(), line.trim()),
                Err(_) => Err("line is not valid UTF-8".into()),
            };
            answer(conn, reply);
        }
        next(conn)
    }

    /// The client left its transaction open and said nothing for `txn_idle_timeout`: roll it
    /// back (freeing its locks and pooled connections), say why, and close.
    fn on_timer(&self, conn: &mut Conn) -> Next {
        match conn.session::<Session>().tx.take_if(|tx| tx.idle_timeout().is_some()) {
            Some(tx) => {
                tx.expire_idle();
                answer(conn, Err(fdt_sdk::txn::IDLE_TIMEOUT_REASON.into()));
                Next::Close
            }
            None => next(conn),
        }
    }
}

/// Writes one answer line: the answer, or `ERR <reason>`.
fn answer(conn: &mut Conn, reply: Reply) {
    match reply {
        Ok(answer) => conn.write(answer.as_bytes()),
        Err(reason) => {
            conn.write(b"ERR ");
            conn.write(reason.as_bytes());
        }
    }
    conn.write(b"\n");
}

/// What the connection does next: an open (or prepared) transaction spans requests, so a
/// drain must leave it be; an open one that is not prepared may wait for the client only
/// `txn_idle_timeout` (the connection's timer).
fn next(conn: &mut Conn) -> Next {
    let tx = conn.session::<Session>().tx.as_ref();
    let (open, idle_timeout) = (tx.is_some_and(Transaction::is_open), tx.and_then(Transaction::idle_timeout));
    conn.set_timer(idle_timeout);
    if open { Next::InProgress } else { Next::KeepOpen }
}

fdt_sdk::export_app!(Bank);
