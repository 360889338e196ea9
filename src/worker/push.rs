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

    /// Queues `bytes` for `token`; false when they would pass the limit.
    pub fn add(&self, token: u64, bytes: &[u8], close: bool) -> bool {
        let mut shard = self.shard(token);
        let waiting = shard.get(&token).map_or(0, |e| e.bytes.len());
        if waiting.saturating_add(bytes.len()) > self.limit {
            return false; // (no entry made: a refused push leaves nothing behind)
        }
        let entry = shard.entry(token).or_default();
        entry.bytes.extend_from_slice(bytes);
        entry.close |= close;
        true
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
