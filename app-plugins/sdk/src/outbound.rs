//! Outbound connections: the app connects to another server, and the worker's event loop
//! serves that connection like an accepted one.

use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::{Handle, abi};

/// How long a connect may take before it counts as failed, unless the app says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connect could not start (the address does not resolve, no socket, the worker stops).
/// A connect that starts and then fails is reported to [`App::on_connect_failed`](crate::App::on_connect_failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectError(pub(crate) String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

type HostConnect = unsafe extern "C" fn(*const c_void, abi::StrRef, u64, u64, abi::MessageFn, *mut c_void) -> u64;

/// Makes outbound connections from anywhere in the app — a background service, a timer (not
/// from [`App::start`](crate::App::start) itself, which runs before the app can serve them) —
/// served by the worker's event loop with the app's callbacks ([`App::on_open`](crate::App::on_open)
/// once connected, then `on_readable`, `on_writable`, `on_close`; [`Conn::is_outbound`](crate::Conn::is_outbound)
/// tells them apart). Get it from [`Settings::connector`](crate::Settings::connector); it is cheap
/// to clone. Within a connection's callback, [`Conn::connect`](crate::Conn::connect) is shorter.
///
/// ```
/// use std::time::Duration;
/// use fdt_sdk::{App, Conn, Connector, Next, Settings};
///
/// /// Says hello to a server once the worker serves, and logs what it answers.
/// struct Hello;
///
/// impl App for Hello {
///     fn start(settings: &Settings) -> Result<Self, String> {
///         let peer = settings.string("peer", "127.0.0.1:7000")?;
///         let connector: Connector = settings.connector();
///         // Not from `start` itself: the app must be started to serve the connection.
///         settings.timers().after(Duration::ZERO, move || {
///             if let Err(e) = connector.connect(&peer, None) {
///                 log::error!("{e}");
///             }
///         });
///         Ok(Hello)
///     }
///     fn on_open(&self, conn: &mut Conn) -> Next {
///         if conn.is_outbound() {
///             conn.write(b"HELLO\n");
///         }
///         Next::KeepOpen
///     }
///     fn on_readable(&self, conn: &mut Conn) -> Next {
///         while let Some(line) = conn.take_line() {
///             log::info!("{} says {}", conn.peer(), String::from_utf8_lossy(line).trim_end());
///         }
///         Next::KeepOpen
///     }
/// }
///
/// let app = fdt_sdk::testing::TestApp::<Hello>::start("peer = \"10.0.0.7:7000\"").unwrap();
/// app.advance(Duration::ZERO);
/// let mut server = app.take_outbound("10.0.0.7:7000").expect("the app connected");
/// server.connected();
/// assert_eq!(server.take_output(), b"HELLO\n");
/// ```
#[derive(Clone, Default)]
pub struct Connector {
    backend: Backend,
}

#[derive(Clone, Copy, Default)]
enum Backend {
    /// Outside a server (or a server before ABI 1.3): every connect fails.
    #[default]
    None,
    Host(HostConnect, *const c_void),
    /// The test driver's (`testing`): connects are recorded for the test to take.
    Test,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::None => "none",
            Backend::Host(..) => "host",
            Backend::Test => "test",
        };
        f.debug_struct("Connector").field("backend", &kind).finish()
    }
}

// SAFETY: the host's connect function is thread-safe and its context lives for the whole
// process.
unsafe impl Send for Backend {}
// SAFETY: as above.
unsafe impl Sync for Backend {}

/// The host's connect function, for [`Conn::connect`](crate::Conn::connect), which names no app:
/// the host serves the new connection with the app of the connection being served.
static HOST: OnceLock<HostConnect> = OnceLock::new();

impl Connector {
    pub(crate) fn from_host(connect: HostConnect, ctx: *const c_void) -> Connector {
        let _ = HOST.set(connect);
        Connector { backend: Backend::Host(connect, ctx) }
    }

    pub(crate) fn simulated() -> Connector {
        Connector { backend: Backend::Test }
    }

    /// Starts connecting to `addr` (`host:port`; a host name is resolved now, in this thread)
    /// and returns the new connection's handle at once: write to it right away (what is written
    /// waits for the connect), close it with [`Handle::close`]. `link` is what the new
    /// connection's [`Conn::link`](crate::Conn::link) returns. Times out after
    /// [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect(&self, addr: &str, link: Option<Handle>) -> Result<Handle, ConnectError> {
        self.connect_timeout(addr, link, DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`Connector::connect`] with a timeout of its own.
    pub fn connect_timeout(&self, addr: &str, link: Option<Handle>, timeout: Duration) -> Result<Handle, ConnectError> {
        match self.backend {
            Backend::None => Err(ConnectError("outbound connections need a server of plugin ABI 1.3 or later".into())),
            Backend::Host(connect, ctx) => host_connect(connect, ctx, addr, link, timeout),
            Backend::Test => Ok(simulated_connect(addr, link)),
        }
    }
}

/// A connect from a connection's callback: served by that connection's app.
pub(crate) fn connect_from_callback(addr: &str, link: Handle, timeout: Duration) -> Result<Handle, ConnectError> {
    if crate::push::is_simulated(link.0) {
        return Ok(simulated_connect(addr, Some(link)));
    }
    match HOST.get() {
        Some(connect) => host_connect(*connect, std::ptr::null(), addr, Some(link), timeout),
        None => Connector::default().connect_timeout(addr, Some(link), timeout),
    }
}

fn host_connect(
    connect: HostConnect,
    ctx: *const c_void,
    addr: &str,
    link: Option<Handle>,
    timeout: Duration,
) -> Result<Handle, ConnectError> {
    let mut error = String::new();
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
    // SAFETY: the host's function and context stay valid for the life of the process; the
    // address and the error string outlive the call, and the host copies what it keeps.
    let handle = unsafe {
        connect(
            ctx,
            abi::StrRef::new(addr),
            link.map_or(0, |h| h.0),
            timeout_ms,
            crate::__private::collect_message,
            (&mut error as *mut String).cast(),
        )
    };
    match handle {
        0 if error.is_empty() => Err(ConnectError(format!("cannot connect to {addr}"))),
        0 => Err(ConnectError(error)),
        h => Ok(Handle(h)),
    }
}

/// A connect the test driver recorded, waiting for the test to take it.
pub(crate) struct Pending {
    pub(crate) addr: String,
    pub(crate) handle: u64,
    pub(crate) link: u64,
}

pub(crate) static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());

fn simulated_connect(addr: &str, link: Option<Handle>) -> Handle {
    let handle = crate::testing::new_handle();
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).push(Pending {
        addr: addr.to_string(),
        handle,
        link: link.map_or(0, |h| h.0),
    });
    Handle(handle)
}

/// Takes the first recorded connect that `pick` accepts.
pub(crate) fn take_pending(pick: impl Fn(&Pending) -> bool) -> Option<Pending> {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let i = pending.iter().position(pick)?;
    Some(pending.remove(i))
}
