//! A worker's pool of PostgreSQL connections to one database: at most `pool_size`, opened on
//! first need, handed out with a timeout.
//!
//! Invariant: a connection returns to the pool only outside any transaction block; one whose
//! state is unknown (an error mid-way, a closed socket) is dropped instead.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::TxnError;

/// How long a request waits for a free connection before it gets an error.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Pool {
    pub name: String,
    url: String,
    size: usize,
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    idle: Vec<Client>,
    /// Connections that exist (idle or handed out).
    open: usize,
}

impl Pool {
    pub fn new(name: &str, url: &str, size: usize) -> Pool {
        Pool {
            name: name.to_string(),
            url: url.to_string(),
            size: size.max(1),
            state: Mutex::new(State { idle: Vec::new(), open: 0 }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a new connection (not counted in the pool).
    pub fn connect(&self) -> Result<Client, TxnError> {
        let mut config: postgres::Config =
            self.url.parse().map_err(|e| TxnError::Database(format!("database {}: bad url: {e}", self.name)))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config
            .connect(NoTls)
            .map_err(|e| TxnError::Database(format!("database {}: cannot connect: {}", self.name, super::describe(&e))))
    }

    /// A connection for exclusive use, waiting up to [`CHECKOUT_TIMEOUT`] for one to be free.
    pub fn checkout(&self) -> Result<Client, TxnError> {
        let deadline = Instant::now() + CHECKOUT_TIMEOUT;
        let mut state = self.lock();
        loop {
            while let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(client);
                }
                state.open -= 1;
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                return self.connect().inspect_err(|_| {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TxnError::PoolExhausted(format!(
                    "database {}: all {} connections of this worker are in use (pool_size); waited {} s",
                    self.name,
                    self.size,
                    CHECKOUT_TIMEOUT.as_secs()
                )));
            }
            state = self.freed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Returns a connection that is outside any transaction block.
    pub fn checkin(&self, client: Client) {
        let mut state = self.lock();
        if client.is_closed() {
            state.open -= 1;
        } else {
            state.idle.push(client);
        }
        self.freed.notify_one();
    }

    /// Forgets a connection whose state is unknown (it is closed by dropping it).
    pub fn discard(&self, client: Client) {
        drop(client);
        self.lock().open -= 1;
        self.freed.notify_one();
    }
}
