//! The bank test, after Jepsen's: money moves between accounts in two databases while workers
//! are killed and the server reloads at random; at the end no money was created or destroyed,
//! no balance is negative, every cross-bank transfer the coordinator settled is applied on both
//! sides, and no transaction is left prepared.
//!
//! `FDT_BANK_SECS` (default 8) and `FDT_BANK_SEED` (default 42) make longer or other runs:
//! `FDT_BANK_SECS=120 FDT_BANK_SEED=7 cargo nextest run --test bank`.

mod util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::pg::PgCluster;
use util::*;

const NODE: &str = "bank-node";
const ACCOUNTS: usize = 8;
const INITIAL: i64 = 1000;

/// splitmix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A line connection that reports failures instead of panicking (workers die under it).
struct Line {
    addr: SocketAddr,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl Line {
    fn new(addr: SocketAddr) -> Line {
        Line { addr, conn: None }
    }

    /// Sends one command; `None` if the connection failed before the answer arrived.
    fn ask(&mut self, command: &str) -> Option<String> {
        use std::io::{BufRead, Write};
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect(self.addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
            self.conn = Some(std::io::BufReader::new(s));
        }
        let c = self.conn.as_mut().unwrap();
        let mut answer = String::new();
        let ok = c.get_mut().write_all(format!("{command}\n").as_bytes()).is_ok()
            && matches!(c.read_line(&mut answer), Ok(n) if n > 0);
        if !ok {
            self.conn = None;
            return None;
        }
        Some(answer.trim_end().to_string())
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

/// The outside coordinator's log: gtrid → (decided to commit?, amount, from bank a to b?).
type Decisions = Arc<Mutex<BTreeMap<String, (bool, i64, bool)>>>;

/// Settles one branch as decided, from a fresh connection, until the server gives a definite
/// answer. "unknown gid" is definite: the branch is not (or no longer) prepared.
fn resolve(addr: SocketAddr, gid: &str, commit: bool, until: Instant) {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    while Instant::now() < until {
        let mut line = Line::new(addr);
        match line.ask(&format!("RESOLVE {verb} {gid}")).as_deref() {
            Some("COMMITTED" | "ROLLED-BACK" | "ERR unknown gid") => return,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// One cross-bank transfer run as an outside coordinator with two-phase commit: prepare both
/// branches, log the decision (commit only if both answered PREPARED), then settle each branch
/// on its own connection or, when that failed, by gid from a new one.
fn cross_transfer(
    a: &mut Line,
    b: &mut Line,
    (from, to, amount, a_to_b): (String, String, i64, bool),
    gtrid: &str,
    decisions: &Decisions,
) {
    let (debit, credit) = if a_to_b { ((a, "bank_a"), (b, "bank_b")) } else { ((b, "bank_b"), (a, "bank_a")) };
    let mut sides = [(debit.0, debit.1, "DEBIT", from), (credit.0, credit.1, "CREDIT", to)];
    let mut commit = true;
    for (line, _, verb, acct) in sides.iter_mut() {
        let prepared = line.ask("BEGIN").as_deref() == Some("OK")
            && line.ask(&format!("{verb} {acct} {amount}")).as_deref() == Some("OK")
            && line.ask(&format!("PREPARE {gtrid}")).is_some_and(|a| a.starts_with("PREPARED "));
        if !prepared {
            commit = false;
            break;
        }
    }
    // The coordinator's log, written before phase two (in memory: this coordinator never crashes).
    decisions.lock().unwrap().insert(gtrid.to_string(), (commit, amount, a_to_b));
    let (verb, want) = if commit { ("COMMIT", "COMMITTED") } else { ("ROLLBACK", "ROLLED-BACK") };
    for (line, app, _, _) in sides.iter_mut() {
        if line.conn.is_some() && line.ask(verb).as_deref() == Some(want) {
            continue;
        }
        line.reset();
        resolve(line.addr, &format!("fdt1:{NODE}:{gtrid}:{app}"), commit, Instant::now() + Duration::from_secs(10));
    }
}

#[test]
fn money_is_conserved_while_workers_die_and_the_server_reloads() {
    let secs = env_or("FDT_BANK_SECS", 8);
    let seed = env_or("FDT_BANK_SEED", 42);
    let pg = PgCluster::start();
    pg.create_db("a");
    pg.create_db("b");
    let setup = Setup::new(2, 4)
        .server("node_id", &format!("\"{NODE}\""))
        .server("graceful_timeout", "3")
        .server("log_level", "\"info\"")
        .app("bank_a", "bank", "database = \"a\"")
        .app("bank_b", "bank", "database = \"b\"")
        .app("bank_ab", "bank", "databases = [\"a\", \"b\"]")
        .extra(&format!(
            "[database.a]\nurl = \"{}\"\npool_size = 12\n[database.b]\nurl = \"{}\"\npool_size = 12\n",
            pg.url("a"),
            pg.url("b")
        ));
    let mut server = TestServer::start(&setup);
    let (addr_a, addr_b, addr_ab) = (server.addr("bank_a"), server.addr("bank_b"), server.addr("bank_ab"));
    for (addr, prefix) in [(addr_a, "a"), (addr_b, "b"), (addr_ab, "x")] {
        let mut c = LineClient::connect(addr);
        for i in 0..ACCOUNTS {
            assert_eq!(c.ask(&format!("OPEN {prefix}{i} {INITIAL}")), "OK");
        }
    }
    let total = 3 * ACCOUNTS as i64 * INITIAL;

    let stop = Arc::new(AtomicBool::new(false));
    let decisions: Decisions = Arc::new(Mutex::new(BTreeMap::new()));
    let clients: Vec<_> = (0..6u64)
        .map(|t| {
            let (stop, decisions) = (stop.clone(), decisions.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x1234_5678_9abc));
                let (mut a, mut b, mut ab) = (Line::new(addr_a), Line::new(addr_b), Line::new(addr_ab));
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (i, j) = (rng.below(ACCOUNTS as u64), rng.below(ACCOUNTS as u64));
                    let amount = 1 + rng.below(50) as i64;
                    match rng.below(4) {
                        0 => drop(a.ask(&format!("TRANSFER a{i} a{j} {amount}"))),
                        1 => drop(b.ask(&format!("TRANSFER b{i} b{j} {amount}"))),
                        // Local two-phase commit by the worker when x{i} and x{j} live apart.
                        2 => drop(ab.ask(&format!("TRANSFER x{i} x{j} {amount}"))),
                        _ => {
                            n += 1;
                            let a_to_b = rng.below(2) == 0;
                            let (from, to) = if a_to_b {
                                (format!("a{i}"), format!("b{j}"))
                            } else {
                                (format!("b{i}"), format!("a{j}"))
                            };
                            cross_transfer(
                                &mut a,
                                &mut b,
                                (from, to, amount, a_to_b),
                                &format!("t{t}-{n}"),
                                &decisions,
                            );
                        }
                    }
                }
            })
        })
        .collect();

    // Chaos: kill a worker or reload, every few hundred milliseconds.
    let mut rng = Rng(seed);
    let (mut kills, mut reloads) = (0, 0);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut round = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200 + rng.below(400)));
        round += 1;
        // Every third fault is a reload, at a random moment; the others kill a random worker.
        if round % 3 == 0 {
            let (code, body) = server.reload();
            if code == 200 {
                reloads += 1;
            } else {
                eprintln!("reload refused: {body}");
            }
        } else {
            let pids = server.worker_pids();
            if !pids.is_empty() {
                let victim = pids[rng.below(pids.len() as u64) as usize];
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL);
                kills += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    server.assert_running();
    server.wait_serving();

    // The coordinator's recovery: settle every branch of ours as logged (none logged: abort).
    let decisions = decisions.lock().unwrap().clone();
    let until = Instant::now() + Duration::from_secs(30);
    for (addr, app) in [(addr_a, "bank_a"), (addr_b, "bank_b")] {
        for gtrid in decisions.keys() {
            let gid = format!("fdt1:{NODE}:{gtrid}:{app}");
            resolve(addr, &gid, decisions[gtrid].0, until);
        }
        let listed = LineClient::connect(addr).ask("RECOVER");
        for gid in listed.trim_start_matches("OK").split_whitespace() {
            let gtrid = gid.split(':').nth(2).unwrap();
            resolve(addr, gid, decisions.get(gtrid).is_some_and(|d| d.0), until);
        }
    }
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    // The server's own recovery of what workers coordinated (killed mid local commit).
    let (code, out, err) = server.cli(&["txn", "recover"]);
    assert_eq!(code, 0, "txn recover: {out}{err}");

    let sums = |db: &str, prefix: &str| -> (i64, i64) {
        let row = pg
            .client(db)
            .query_one(
                "SELECT coalesce(sum(balance), 0)::bigint, coalesce(min(balance), 0) FROM accounts WHERE id LIKE $1",
                &[&format!("{prefix}%")],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let (a_sum, a_min) = sums("a", "a");
    let (b_sum, b_min) = sums("b", "b");
    let (xa_sum, xa_min) = sums("a", "x");
    let (xb_sum, xb_min) = sums("b", "x");
    let moved: i64 =
        decisions.values().filter(|d| d.0).map(|&(_, amount, a_to_b)| if a_to_b { amount } else { -amount }).sum();
    let committed = decisions.values().filter(|d| d.0).count();
    eprintln!(
        "bank: {secs} s, seed {seed}: {kills} kills, {reloads} reloads, {} cross-bank transfers ({committed} committed)",
        decisions.len()
    );
    assert!(a_min >= 0 && b_min >= 0 && xa_min >= 0 && xb_min >= 0, "a negative balance");
    assert_eq!(a_sum + b_sum + xa_sum + xb_sum, total, "money was created or destroyed");
    assert_eq!(xa_sum + xb_sum, ACCOUNTS as i64 * INITIAL, "local two-phase commit lost money");
    assert_eq!(a_sum, ACCOUNTS as i64 * INITIAL - moved, "a settled cross-bank transfer is missing on side a");
    assert_eq!(b_sum, ACCOUNTS as i64 * INITIAL + moved, "a settled cross-bank transfer is missing on side b");
    for db in ["a", "b"] {
        let left: i64 = pg.client(db).query_one("SELECT count(*) FROM pg_prepared_xacts", &[]).unwrap().get(0);
        assert_eq!(left, 0, "transactions left prepared in {db}");
    }
    assert!(committed > 0 && kills > 0, "the test did not exercise anything");
}
