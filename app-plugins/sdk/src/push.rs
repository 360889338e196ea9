//! Push: write to a connection from outside its own callbacks.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use crate::abi;

/// A connection's handle, to write to it or close it later — from another connection's
/// callback, a timer, a thread of the app's own. Get it with [`Conn::handle`](crate::Conn::handle);
/// it is a number (`Copy`), usable from any thread of the worker.
///
/// A push never blocks. It is bounded like the connection's own output: pushed bytes wait (for
/// the connection's output to drain to half of `max_output`) up to `max_output` (a push into an
/// empty queue is always taken), and a push that does not fit is refused with
/// [`PushError::Full`] and writes nothing — decide what a slow client costs (a chat server
/// disconnects it; a proxy leaves its input unconsumed: a push refused from a connection's
/// callback makes the worker offer that connection's input again once the target has room, see
/// [`Conn::connect`](crate::Conn::connect)). A handle whose connection has closed fails with
/// [`PushError::Closed`]; it never reaches another connection, even one that reuses the socket.
/// Pushed bytes go out after what the connection's current callback writes, in push order.
///
/// ```
/// use std::sync::Mutex;
/// use fdt_sdk::{App, Conn, Handle, Next, Settings};
///
/// /// Every line goes to every other connection.
/// #[derive(Default)]
/// struct Broadcast { clients: Mutex<Vec<Handle>> }
///
/// impl App for Broadcast {
///     fn start(_: &Settings) -> Result<Self, String> { Ok(Broadcast::default()) }
///     fn on_open(&self, conn: &mut Conn) -> Next {
///         self.clients.lock().unwrap().push(conn.handle());
///         Next::KeepOpen
///     }
///     fn on_readable(&self, conn: &mut Conn) -> Next {
///         let me = conn.handle();
///         while let Some(line) = conn.take_line() {
///             // A client that cannot keep up (or is gone) is dropped from the list.
///             self.clients.lock().unwrap().retain(|c| *c == me || c.write(line).is_ok());
///         }
///         Next::KeepOpen
///     }
///     fn on_close(&self, conn: &mut Conn) {
///         let me = conn.handle();
///         self.clients.lock().unwrap().retain(|c| *c != me);
///     }
/// }
///
/// let app = fdt_sdk::testing::TestApp::<Broadcast>::start("").unwrap();
/// let (mut a, mut b) = (app.connect(), app.connect());
/// a.send(b"hi\n");
/// assert_eq!(b.take_output(), b"hi\n");
/// assert!(a.take_output().is_empty());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle(pub(crate) u64);

/// Why a push wrote nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The connection's output is full (`max_output`): its peer does not read fast enough.
    Full,
    /// The connection is closed or closing (or the server has no push: an older server).
    Closed,
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushError::Full => "the connection's output is full (its peer does not read fast enough)",
            PushError::Closed => "the connection is closed",
        })
    }
}

impl std::error::Error for PushError {}

type HostPush = unsafe extern "C" fn(*const c_void, u64, abi::StrRef, u32) -> abi::PushStatus;

/// The server's push function and context, set when the app starts in a server.
struct Host(HostPush, *const c_void);

// SAFETY: the host's push function is thread-safe and its context lives for the whole process.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

static HOST: OnceLock<Host> = OnceLock::new();

pub(crate) fn set_host(push: HostPush, ctx: *const c_void) {
    let _ = HOST.set(Host(push, ctx));
}

impl Handle {
    /// The number that names the connection within its worker (with the worker's pid, it
    /// names the connection within the server: to tell a message's sender in an event).
    pub fn as_u64(&self) -> u64 {
        self.0
    }

    /// Writes `bytes` to the connection (see [`Handle`] for the bounds).
    pub fn write(&self, bytes: &[u8]) -> Result<(), PushError> {
        self.push(bytes, false)
    }

    /// Closes the connection after what was written and pushed so far.
    pub fn close(&self) -> Result<(), PushError> {
        self.push(&[], true)
    }

    fn push(&self, bytes: &[u8], close: bool) -> Result<(), PushError> {
        // A test connection (`testing`) is found first: a process that runs tests may also have
        // started an app as a server would.
        let simulated = SIMULATING.load(std::sync::atomic::Ordering::Acquire).then(|| simulated(self.0, bytes, close));
        let status = match (simulated.flatten(), HOST.get()) {
            (Some(status), _) => status,
            // SAFETY: the host's function and context stay valid for the life of the process,
            // and it copies the bytes before returning.
            (None, Some(Host(push, ctx))) => unsafe {
                push(*ctx, self.0, abi::StrRef::from_bytes(bytes), u32::from(close))
            },
            (None, None) => abi::PUSH_CLOSED,
        };
        match status {
            abi::PUSH_OK => Ok(()),
            abi::PUSH_FULL => Err(PushError::Full),
            _ => Err(PushError::Closed),
        }
    }
}

/// The connections of [`testing`](crate::testing), which pushes reach outside a server.
#[derive(Default)]
pub(crate) struct Simulated {
    pub(crate) bytes: Vec<u8>,
    pub(crate) closed: bool,
    /// Bytes that may wait (the test connection's output room).
    pub(crate) room: usize,
}

pub(crate) static SIMULATED: Mutex<Option<HashMap<u64, Simulated>>> = Mutex::new(None);
/// Set once a test connection exists: only then are pushes looked up among them.
static SIMULATING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The test connections (taking it marks that some exist).
pub(crate) fn simulated_connections() -> std::sync::MutexGuard<'static, Option<HashMap<u64, Simulated>>> {
    SIMULATING.store(true, std::sync::atomic::Ordering::Release);
    SIMULATED.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when `handle` names a test connection ([`testing`](crate::testing)).
pub(crate) fn is_simulated(handle: u64) -> bool {
    SIMULATING.load(std::sync::atomic::Ordering::Acquire)
        && SIMULATED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|m| m.contains_key(&handle))
}

/// A push to a test connection; `None` when `handle` names none (it may name a server's).
fn simulated(handle: u64, bytes: &[u8], close: bool) -> Option<abi::PushStatus> {
    let mut all = simulated_connections();
    let conn = all.as_mut()?.get_mut(&handle)?;
    if conn.closed {
        return Some(abi::PUSH_CLOSED);
    }
    if conn.bytes.len().saturating_add(bytes.len()) > conn.room {
        return Some(abi::PUSH_FULL);
    }
    conn.bytes.extend_from_slice(bytes);
    conn.closed |= close;
    Some(abi::PUSH_OK)
}
