//! A worker's connections, indexed by fd.
//!
//! The kernel never hands out an fd twice while it is open, so the fd is the index; a sequence
//! number in the epoll token tells a stale event from one for a reused fd. Each slot has a lock
//! (whoever touches a connection holds it) and an `again` flag for events that found it locked
//! (see `Pool::unlock`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use super::conn::Conn;

/// The table covers fds below this (its index costs 16 bytes per 1,024 fds even when unused,
/// and the open file limit can be a billion); a connection on a higher fd is refused, logged.
const MAX_TABLE_FDS: usize = 1 << 22;
/// Connections per lazily allocated chunk of the table.
const CHUNK: usize = 1024;

/// A connection's place in the table.
pub struct Slot {
    pub conn: Mutex<Option<Conn>>,
    /// An event for this fd arrived while another thread held `conn`.
    pub again: AtomicBool,
    /// The token of the connection whose event waits for its app's share of handlers
    /// (`worker::share`); 0 when none. A token, not a flag, so that a connection closed while
    /// queued leaves nothing that could hold back the next connection on the same fd.
    pub waiting: AtomicU64,
    /// The sequence number of the connection in `conn` (0: none), readable without its lock:
    /// a push (`worker::push`) checks it to tell a live connection from a closed one.
    pub live: AtomicU32,
    /// Pushed bytes may wait for this connection (`worker::push`).
    pub pushed: AtomicBool,
    /// A connection this one's push was refused by has room now: its input is offered again
    /// (`Pool::wake`).
    pub wake: AtomicBool,
}

pub type Guard<'a> = MutexGuard<'a, Option<Conn>>;

impl Slot {
    /// The slot's lock, unless another thread holds it. A poisoned lock is taken as it is: a
    /// panic in app code is caught before it could leave a connection half-changed.
    pub fn try_lock(&self) -> Option<Guard<'_>> {
        match self.conn.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The interest to add when re-arming it: writable (reported at once by a socket with
    /// room) while pushed bytes or a wake wait for its handler.
    pub fn waiting_interest(&self) -> u32 {
        if self.pushed.load(Ordering::SeqCst) || self.wake.load(Ordering::SeqCst) {
            crate::sys::interest::WRITE
        } else {
            0
        }
    }

    pub fn lock(&self) -> Guard<'_> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct ConnTable {
    chunks: Vec<OnceLock<Box<[Slot]>>>,
    /// One past the highest fd ever stored: a sweep need not look further.
    high_water: AtomicUsize,
}

impl ConnTable {
    pub fn new(max_fds: usize) -> ConnTable {
        let n = max_fds.min(MAX_TABLE_FDS).div_ceil(CHUNK).max(1);
        ConnTable { chunks: (0..n).map(|_| OnceLock::new()).collect(), high_water: AtomicUsize::new(0) }
    }

    /// The slot of `fd`, or `None` beyond the table.
    pub fn slot(&self, fd: usize) -> Option<&Slot> {
        let chunk = self.chunks.get(fd / CHUNK)?;
        let slots = chunk.get_or_init(|| {
            (0..CHUNK)
                .map(|_| Slot {
                    conn: Mutex::new(None),
                    again: AtomicBool::new(false),
                    waiting: AtomicU64::new(0),
                    live: AtomicU32::new(0),
                    pushed: AtomicBool::new(false),
                    wake: AtomicBool::new(false),
                })
                .collect()
        });
        Some(&slots[fd % CHUNK])
    }

    /// Records that `fd` holds a connection, for [`ConnTable::used`].
    pub fn note_used(&self, fd: usize) {
        self.high_water.fetch_max(fd + 1, Ordering::AcqRel);
    }

    /// Every slot that was ever used.
    pub fn used(&self) -> impl Iterator<Item = &Slot> {
        let high = self.high_water.load(Ordering::Acquire);
        (0..high).filter_map(|fd| self.chunks.get(fd / CHUNK)?.get().map(|chunk| &chunk[fd % CHUNK]))
    }
}

/// The epoll token of a connection.
pub fn token(fd: usize, seq: u32) -> u64 {
    ((fd as u64) << 32) | u64::from(seq)
}

pub fn split_token(token: u64) -> (usize, u32) {
    ((token >> 32) as usize, token as u32)
}
