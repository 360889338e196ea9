//! `fdtserver txn list|commit|rollback|recover`: prepared (in-doubt) transactions of the
//! configured databases, settled from the CLI process (never from the master, which must stay
//! single-threaded: a `postgres::Client` starts threads).

use std::path::Path;

/// What `fdtserver txn` was asked to do.
#[derive(Clone, Debug)]
pub enum TxnCommand {
    List,
    Commit(String),
    Rollback(String),
    Recover,
}

/// Runs a `txn` command; returns the exit code.
pub fn run(_config: &Path, _command: TxnCommand) -> i32 {
    eprintln!("fdtserver: `txn` is not built yet");
    crate::cli::exit::FAILURE
}
