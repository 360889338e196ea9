//! Push: an app writes to a connection from outside that connection's own callbacks — another
//! connection's, a timer's, a thread of its own — through a handle (`fdt_sdk::Handle`, ABI 1.2
//! `HostApi::push`).
//!
//! Shape: pushed bytes wait in a small table keyed by the connection's token (fd and sequence
//! number), bounded by `max_output` per connection; whoever holds the connection's slot lock
//! moves them into its output when the output has room (at most half of `max_output` queued).
//! A push never blocks and never waits for a lock: when the slot is free, the pushing thread
//! delivers at once; when it is held, the holder re-arms the connection for writing as it lets
//! go (`Pool::unlock`), and the handler that takes the event delivers.
//!
//! Flow control: a push refused as full from inside another connection's callback (a proxy
//! forwarding what one side sent to the other) leaves that connection's token among the
//! target's waiters; the callback leaves its input unconsumed, and the worker stops reading
//! its connection (`Conn::blocked`) until the target's waiting bytes move into its output, or
//! the target ends: then each waiter is woken (`Pool::wake`) and its input offered again.
//!
//! Invariants: a push reaches only the connection its token names — the slot's `live` sequence
//! number is checked before and after the bytes are queued, and a connection's pushes are
//! dropped when it ends, so nothing is left for a connection that reuses its fd; a refused push
//! (full, closed) writes nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};

use super::table::split_token;
use crate::plugin::PushOutcome;

/// Shards of the table, so that pushes to different connections rarely meet on one lock.
const SHARDS: usize = 16;

/// What waits to be written to one connection.
#[derive(Default)]
pub struct Pushed {
    pub bytes: Vec<u8>,
    /// Close the connection after the bytes.
    pub close: bool,
    /// Connections whose push here was refused as full, to wake once these bytes move on.
    pub waiters: Vec<u64>,
}

/// What [`PushTable::add`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    Queued,
    /// Refused: the bytes would pass the limit. The waiter, if any, was noted.
    Full,
}

std::thread_local! {
    /// Set when a push from this thread was refused as full and its connection noted as a
    /// waiter (see the module doc); taken after each call into the app.
    static BLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True (once) when a push from the app call that just returned on this thread was refused as
/// full, with the calling connection noted as a waiter.
pub fn take_blocked() -> bool {
    BLOCKED.with(|b| b.replace(false))
}

/// Pushed bytes not yet moved into their connections' output.
pub struct PushTable {
    shards: Box<[Mutex<HashMap<u64, Pushed>>]>,
    /// Bytes that may wait for one connection (the server's `max_output`).
    limit: usize,
}

impl PushTable {
    pub fn new(limit: usize) -> PushTable {
        PushTable { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), limit }
    }

    fn shard(&self, token: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Pushed>> {
        let i = (split_token(token).0 ^ token as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `bytes` for `token`, unless bytes wait already and these would pass the limit
    /// (a push into an empty queue is always taken, however large: like a connection's own
    /// answer, it is bounded by what the app holds; so is a close, which adds no bytes). A refused push notes `waiter` (the
    /// connection whose callback pushed), to wake when the waiting bytes move on.
    pub fn add(&self, token: u64, bytes: &[u8], close: bool, waiter: Option<u64>) -> Added {
        let mut shard = self.shard(token);
        if let Some(entry) = shard.get_mut(&token)
            && !bytes.is_empty()
            && !entry.bytes.is_empty()
            && entry.bytes.len().saturating_add(bytes.len()) > self.limit
        {
            if let Some(waiter) = waiter.filter(|w| *w != token) {
                if !entry.waiters.contains(&waiter) {
                    entry.waiters.push(waiter);
                }
                BLOCKED.with(|b| b.set(true));
            }
            return Added::Full;
        }
        let entry = shard.entry(token).or_default();
        entry.bytes.extend_from_slice(bytes);
        entry.close |= close;
        Added::Queued
    }

    /// Takes what waits for `token`.
    pub fn take(&self, token: u64) -> Option<Pushed> {
        self.shard(token).remove(&token)
    }
}

/// The pool whose connections pushes go to (set once the worker's pool exists).
static POOL: OnceLock<&'static super::pool::Pool> = OnceLock::new();

/// Makes `pool` the target of pushes.
pub fn set_pool(pool: &'static super::pool::Pool) {
    let _ = POOL.set(pool);
}

/// The worker's pool, once it exists.
pub fn pool() -> Option<&'static super::pool::Pool> {
    POOL.get().copied()
}

/// Pushes `bytes` to the connection `token` names (see the module doc).
pub fn push(token: u64, bytes: &[u8], close: bool) -> PushOutcome {
    match POOL.get() {
        Some(pool) => pool.push(token, bytes, close),
        None => PushOutcome::Closed,
    }
}

/// True while the slot's live connection is the one `seq` names.
pub fn is_live(live: &std::sync::atomic::AtomicU32, seq: u32) -> bool {
    seq != 0 && live.load(Ordering::Acquire) == seq
}
