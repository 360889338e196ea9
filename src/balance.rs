//! Balancing connections across the worker processes of a generation: a table in shared
//! memory where each worker publishes how many connections it has open and, per listener,
//! whether one of its acceptors is ready to accept.
//!
//! Blocked `accept()` calls already form a FIFO across processes, which balances a steady
//! trickle of connections. A burst is different: connections queue up, and whichever acceptor
//! returns to `accept()` first takes them all. So an acceptor steps aside while its worker
//! holds more than `SLACK` connections above a sibling that is ready to accept on the same
//! listener. "Ready" is a timestamp the sibling refreshes at least every
//! `ACCEPT_WAKE_INTERVAL` while it waits; a sibling that is saturated, stopped or dead stops
//! refreshing it, so it never stalls the others for longer than `READY_FRESH`.
//!
//! Invariant: the master owns the records (claims one per forked worker, clears it when the
//! worker is reaped); a worker writes only its own record.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::listener::ACCEPT_WAKE_INTERVAL;
use crate::sys::{SharedAtomics, monotonic_ms};

/// How many live workers (across all generations) the table has records for.
pub const RECORDS: usize = 1024;
/// Listeners per generation that are balanced this way (the rest rely on the FIFO alone).
pub const BALANCED_LISTENERS: usize = 14;
/// Words per record: generation (0 = free), open connections, then per listener the time
/// (monotonic ms) an acceptor last said it was ready.
const FIELDS: usize = 2 + BALANCED_LISTENERS;
const GENERATION: usize = 0;
const OPEN: usize = 1;
const READY: usize = 2;
/// How many more connections than a ready sibling a worker may hold before it steps aside.
pub const SLACK: u64 = 1;
/// A ready stamp older than this is stale: its acceptor is not waiting any more.
const READY_FRESH_MS: u64 = 2 * ACCEPT_WAKE_INTERVAL.as_millis() as u64 + 50;

pub struct LoadTable {
    /// `RECORDS` records, then one more word: one past the highest record ever claimed.
    shared: SharedAtomics,
}

impl LoadTable {
    pub fn new() -> std::io::Result<LoadTable> {
        Ok(LoadTable { shared: SharedAtomics::new(RECORDS * FIELDS + 1)? })
    }

    fn field(&self, index: usize, field: usize) -> &AtomicU64 {
        &self.shared.get()[index * FIELDS + field]
    }

    fn high_water(&self) -> &AtomicU64 {
        &self.shared.get()[RECORDS * FIELDS]
    }

    /// Master: a free record, now owned by a worker of `generation`.
    pub fn claim(&self, generation: u64) -> Option<usize> {
        let index = (0..RECORDS).find(|&i| self.field(i, GENERATION).load(Ordering::Acquire) == 0)?;
        for f in 1..FIELDS {
            self.field(index, f).store(0, Ordering::Release);
        }
        self.field(index, GENERATION).store(generation, Ordering::Release);
        self.high_water().fetch_max(index as u64 + 1, Ordering::AcqRel);
        Some(index)
    }

    /// Master: the worker of this record is gone.
    pub fn release(&self, index: usize) {
        self.field(index, GENERATION).store(0, Ordering::Release);
    }

    /// Worker: its own record.
    pub fn record(&'static self, index: usize) -> WorkerLoad {
        WorkerLoad { table: self, index, generation: self.field(index, GENERATION).load(Ordering::Acquire) }
    }
}

/// A worker's own record.
#[derive(Clone, Copy)]
pub struct WorkerLoad {
    table: &'static LoadTable,
    index: usize,
    generation: u64,
}

impl WorkerLoad {
    pub fn opened(&self) {
        self.table.field(self.index, OPEN).fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.table.field(self.index, OPEN).fetch_sub(1, Ordering::Relaxed);
    }

    /// This worker's acceptor for `listener` is ready to accept (call at least once per
    /// `ACCEPT_WAKE_INTERVAL` while it is).
    pub fn ready(&self, listener: usize) {
        if listener < BALANCED_LISTENERS {
            self.table.field(self.index, READY + listener).store(monotonic_ms(), Ordering::Relaxed);
        }
    }

    /// This worker's acceptor for `listener` stops accepting (saturated or draining).
    pub fn not_ready(&self, listener: usize) {
        if listener < BALANCED_LISTENERS {
            self.table.field(self.index, READY + listener).store(0, Ordering::Relaxed);
        }
    }

    /// True when a sibling of the same generation is ready to accept on `listener` and holds
    /// more than `SLACK` connections fewer than this worker: let it take the next one.
    pub fn should_yield(&self, listener: usize) -> bool {
        let t = self.table;
        let mine = t.field(self.index, OPEN).load(Ordering::Relaxed);
        if listener >= BALANCED_LISTENERS || mine <= SLACK {
            return false;
        }
        let now = monotonic_ms();
        let high = t.high_water().load(Ordering::Acquire) as usize;
        (0..high).any(|i| {
            i != self.index
                && t.field(i, GENERATION).load(Ordering::Relaxed) == self.generation
                && now.saturating_sub(t.field(i, READY + listener).load(Ordering::Relaxed)) < READY_FRESH_MS
                && t.field(i, OPEN).load(Ordering::Relaxed) + SLACK < mine
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_yields_only_to_a_ready_sibling_with_fewer_connections() {
        let table: &'static LoadTable = Box::leak(Box::new(LoadTable::new().unwrap()));
        let (a, b, other_gen) = (table.claim(1).unwrap(), table.claim(1).unwrap(), table.claim(2).unwrap());
        let (a, b, c) = (table.record(a), table.record(b), table.record(other_gen));
        for _ in 0..5 {
            a.opened();
        }
        assert!(!a.should_yield(0), "b is not ready");
        c.ready(0);
        assert!(!a.should_yield(0), "a ready worker of another generation does not count");
        b.ready(1);
        assert!(!a.should_yield(0), "b is ready on another listener");
        b.ready(0);
        assert!(a.should_yield(0));
        for _ in 0..4 {
            b.opened();
        }
        assert!(!a.should_yield(0), "within the slack");
        b.closed();
        assert!(a.should_yield(0));
        b.not_ready(0);
        assert!(!a.should_yield(0));
    }
}
