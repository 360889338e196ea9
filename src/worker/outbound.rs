//! Outbound connections: an app connects to another server (ABI 1.3 `HostApi::connect`), and
//! the worker serves that connection in its event loop like an accepted one, with the app's
//! callbacks, bounds and timeouts.
//!
//! Shape: the connect is started non-blocking in the calling thread, which registers the socket
//! in the connection table (phase `Connecting`) and returns its token at once; the writable
//! event that ends the connect goes to a handler like any other (`Conn::on_ready`), which calls
//! the app's `on_open`, or its `on_connect_failed` and then closes it. A connect that takes
//! longer than its timeout is failed by the clock's limit sweep.
//!
//! Which app and limits: the app whose `Connector` made it; a connect from a connection's
//! callback (`fdt_sdk::Conn::connect`, which names no app) is made for that connection's app,
//! with that connection's listener's limits. Elsewhere (a service, a timer) the server's.

use std::cell::Cell;
use std::net::{SocketAddr, ToSocketAddrs};

/// The connection whose callback runs on this thread (see [`serving`]).
#[derive(Clone, Copy)]
pub struct Current {
    pub token: u64,
    pub app: usize,
    /// Its listener's place in the pool's limits.
    pub listener: u32,
}

std::thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
    /// True on the thread that runs an app's `start`.
    static STARTING: Cell<bool> = const { Cell::new(false) };
}

/// How long a connect made while the worker starts (from a service or a timer that an app's
/// `start` began) waits for the worker's event loop to exist.
const POOL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `f`, an app's `start`: a connect from inside it is refused with a clear reason (the
/// app, not started yet, could not serve the connection).
pub fn starting<R>(f: impl FnOnce() -> R) -> R {
    STARTING.with(|s| s.set(true));
    let result = f();
    STARTING.with(|s| s.set(false));
    result
}

/// Runs `f` (a call into the app for `current`) with `current` known to connects and pushes
/// made on this thread meanwhile; restores what was known before (a callback may run inside
/// another's thread, as a greeting does in the acceptor's).
pub fn serving<R>(current: Current, f: impl FnOnce() -> R) -> R {
    let before = CURRENT.with(|c| c.replace(Some(current)));
    let result = f();
    CURRENT.with(|c| c.set(before));
    result
}

/// The connection whose callback runs on this thread, if any.
pub fn current() -> Option<Current> {
    CURRENT.with(Cell::get)
}

/// Starts a connect to `addr` for `app` (`None`: the app of the connection being served on
/// this thread); returns the new connection's token, or why it could not start.
pub fn connect(app: Option<usize>, addr: &str, link: u64, timeout_ms: u64) -> Result<u64, String> {
    if STARTING.with(Cell::get) {
        return Err(format!(
            "cannot connect to {addr} from App::start: the app must be started to serve the connection \
             (connect from a service, a timer or a connection's callback)"
        ));
    }
    let pool = wait_for_pool().ok_or_else(|| format!("cannot connect to {addr}: the worker is not serving"))?;
    let current = current();
    let Some(app) = app.or(current.map(|c| c.app)) else {
        return Err("Conn::connect works inside a connection's callback; elsewhere use Settings::connector".into());
    };
    let address = resolve(addr)?;
    let listener = current.filter(|c| c.app == app).map(|c| c.listener);
    pool.connect(super::pool::Outbound { app, peer: addr.to_string(), address, link, listener, timeout_ms })
}

/// The worker's pool: a service or timer started by an app's `start` may run before the
/// worker has set it up.
fn wait_for_pool() -> Option<&'static super::pool::Pool> {
    let deadline = std::time::Instant::now() + POOL_WAIT;
    loop {
        if let Some(pool) = super::push::pool() {
            return Some(pool);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// The first address `addr` names (`host:port`, an IP address or a name).
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = addr.parse::<SocketAddr>() {
        return Ok(address);
    }
    let mut found = addr.to_socket_addrs().map_err(|e| format!("cannot resolve {addr:?}: {e}"))?;
    found.next().ok_or_else(|| format!("cannot resolve {addr:?}: no address"))
}
