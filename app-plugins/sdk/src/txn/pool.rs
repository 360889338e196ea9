//! A worker's pool of PostgreSQL connections to one database: at most `pool_size`, opened on
//! first need, handed out with a timeout.
//!
//! Invariant: a connection returns to the pool only outside any transaction block; one whose
//! state is unknown (an error mid-way, a closed socket) is dropped instead.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::TxnError;
use crate::DatabaseSettings;

/// How long a request waits for a free connection before it gets an error.
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a backend busy with a statement of ours (waiting on a lock, say) checks that our
/// side of the connection is still there (`client_connection_check_interval`, PostgreSQL 14+):
/// the sessions of a killed worker end within about this long instead of waiting on.
const CLIENT_CHECK_INTERVAL_MS: u32 = 1000;
/// TCP keepalives on both ends of a session over TCP (ignored on Unix sockets): idle this long
/// before the first probe, then a probe every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_COUNT`]
/// unanswered ones ending the connection. On the server side (`tcp_keepalives_*`) this bounds
/// how long the backend of a coordinator whose host crashed or was cut off keeps its advisory
/// lock (and so keeps recovery away): about 10 + 3 × 5 = 25 s. On our side it ends a session
/// to a server host that vanished.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_COUNT: u32 = 3;

/// Opens a session to `db` with its timeouts set; `application` shows in `pg_stat_activity`.
pub fn connect(db: &DatabaseSettings, application: &str) -> Result<Client, TxnError> {
    let bad = |e: &dyn std::fmt::Display| TxnError::Database(format!("database {}: {e}", db.name));
    let mut config: postgres::Config = db.url.parse().map_err(|e| bad(&format_args!("bad url: {e}")))?;
    // Server settings ride in the startup packet (no extra round trip), after any the url gives.
    let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis().max(1));
    let mut options = config.get_options().unwrap_or_default().to_string();
    options.push_str(&format!(
        " -c lock_timeout={} -c statement_timeout={} -c tcp_keepalives_idle={} -c tcp_keepalives_interval={} \
         -c tcp_keepalives_count={KEEPALIVE_COUNT}",
        ms(db.lock_timeout),
        ms(db.statement_timeout),
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
    ));
    config.options(options.trim_start());
    if config.get_application_name().is_none() {
        config.application_name(application);
    }
    config.connect_timeout(CONNECT_TIMEOUT);
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_COUNT);
    let mut client =
        config.connect(NoTls).map_err(|e| bad(&format_args!("cannot connect: {}", super::describe(&e))))?;
    // Not in the startup packet: a server older than 14 would refuse the unknown setting.
    client
        .batch_execute(&format!(
            "SELECT set_config('client_connection_check_interval', '{CLIENT_CHECK_INTERVAL_MS}', false) \
             WHERE current_setting('server_version_num')::int >= 140000"
        ))
        .map_err(|e| bad(&format_args!("cannot set up the session: {}", super::describe(&e))))?;
    Ok(client)
}

pub struct Pool {
    pub name: String,
    settings: DatabaseSettings,
    application: String,
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
    pub fn new(settings: &DatabaseSettings, application: &str) -> Pool {
        Pool {
            name: settings.name.clone(),
            settings: settings.clone(),
            application: application.to_string(),
            size: settings.pool_size.max(1),
            state: Mutex::new(State { idle: Vec::new(), open: 0 }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a new connection (not counted in the pool).
    pub fn connect(&self) -> Result<Client, TxnError> {
        connect(&self.settings, &self.application)
    }

    /// A connection for exclusive use, waiting up to [`CHECKOUT_TIMEOUT`] for one to be free.
    pub fn checkout(&self) -> Result<Client, TxnError> {
        self.checkout_within(CHECKOUT_TIMEOUT)
    }

    /// A connection for exclusive use, waiting up to `wait` for one to be free.
    pub fn checkout_within(&self, wait: Duration) -> Result<Client, TxnError> {
        let deadline = Instant::now() + wait;
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
                    wait.as_secs_f64()
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
