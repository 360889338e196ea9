//! The fdtserver app SDK: implement [`App`] for a type and export it with [`export_app!`].
//!
//! An app never sees processes, sockets, signals or reloads. The worker calls
//! [`App::on_readable`] when a connection has new bytes; the app takes the complete requests it
//! finds ([`Conn::take_line`], [`Conn::consume_request`]), writes answers ([`Conn::write`]) and
//! returns a [`Next`] saying whether the connection stays open. An idle connection waits in the
//! worker's event loop, not in a thread, so an app must return as soon as no complete request is
//! left rather than wait for more input.
//!
//! ```
//! use fdt_sdk::{App, Conn, Next, Settings};
//!
//! struct Echo { delay: std::time::Duration }
//!
//! impl App for Echo {
//!     fn start(settings: &Settings) -> Result<Self, String> {
//!         Ok(Echo { delay: settings.duration_ms("delay_ms", 0)? })
//!     }
//!     fn on_readable(&self, conn: &mut Conn) -> Next {
//!         while let Some(line) = conn.take_line() {
//!             std::thread::sleep(self.delay);
//!             conn.write(line);
//!         }
//!         Next::KeepOpen
//!     }
//! }
//!
//! fdt_sdk::export_app!(Echo);
//!
//! // Drive it without a server:
//! let app = fdt_sdk::testing::TestApp::<Echo>::start("").unwrap();
//! let mut conn = app.connect();
//! conn.send(b"hi\nhal");
//! assert_eq!(conn.take_output(), b"hi\n");
//! ```
//!
//! The SDK catches every panic of app code before it reaches the server: a panic in
//! `on_readable` closes that one connection and is logged; the worker and its other
//! connections go on. Log with the `log` crate's macros: records go to the server's log.

pub mod abi;
mod bus;
pub mod gid;
pub mod notify;
mod outbound;
mod push;
mod services;
mod settings;
mod singleton;
pub mod testing;
mod timers;
#[cfg(feature = "postgres")]
pub mod txn;

#[doc(hidden)]
pub mod __private;

use std::any::Any;

pub use bus::{Bus, EmitError, SubscriptionId};
pub use outbound::{ConnectError, Connector, DEFAULT_CONNECT_TIMEOUT};
pub use push::{Handle, PushError};
pub use services::Stop;
pub use settings::{DatabaseSettings, Settings};
pub use singleton::Singleton;
pub use timers::{TimerId, Timers};

/// Event counters an app reports to the server's metrics, as
/// `fdtserver_app_events_total{app="NAME",event="EVENT"}`. Get one from
/// [`Settings::events`]; it is cheap to copy and usable from any thread. Outside a server (in
/// [`testing`]) counting does nothing.
///
/// ```
/// let events = fdt_sdk::Settings::parse("shop", "").unwrap().events();
/// events.count("orders_placed", 1);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Events {
    count: Option<unsafe extern "C" fn(*const std::ffi::c_void, abi::StrRef, u64)>,
    ctx: *const std::ffi::c_void,
}

// SAFETY: `ctx` points at the host's counters for this app, which live for the whole process
// and are updated under a lock by the host's `count` function.
unsafe impl Send for Events {}
// SAFETY: as above.
unsafe impl Sync for Events {}

impl Default for Events {
    fn default() -> Events {
        Events { count: None, ctx: std::ptr::null() }
    }
}

impl Events {
    pub(crate) fn from_host(
        count: unsafe extern "C" fn(*const std::ffi::c_void, abi::StrRef, u64),
        ctx: *const std::ffi::c_void,
    ) -> Events {
        Events { count: Some(count), ctx }
    }

    /// Adds `delta` to the counter `name` (`[a-z0-9_]`, up to 64 characters; other characters
    /// become `_`).
    pub fn count(&self, name: &str, delta: u64) {
        let Some(count) = self.count else { return };
        let clean: String = name
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' })
            .collect();
        // SAFETY: the host's function and context stay valid for the life of the process, and
        // the host copies the name before returning.
        unsafe { count(self.ctx, abi::StrRef::new(&clean), delta) }
    }
}

/// An application served by fdtserver. One value serves every connection of its listeners in
/// one worker process, from several threads at once: keep per-connection state in
/// [`Conn::session`].
pub trait App: Send + Sync + Sized + 'static {
    /// The keys of its `[app.NAME]` table that the app understands. When declared, the server
    /// refuses any other key (a typo such as `dealy_ms`) with the file and line, at start, at
    /// reload and in `fdtserver check`, instead of running with a default. `None` (the default)
    /// accepts any key. An app that uses [`txn`](crate::txn) lists `txn_idle_timeout` too.
    ///
    /// ```
    /// # use fdt_sdk::{App, Conn, Next, Settings};
    /// # struct Echo;
    /// impl App for Echo {
    ///     const SETTINGS: Option<&'static [&'static str]> = Some(&["delay_ms"]);
    ///     // …
    /// #   fn start(_: &Settings) -> Result<Self, String> { Ok(Echo) }
    /// #   fn on_readable(&self, _: &mut Conn) -> Next { Next::KeepOpen }
    /// }
    /// ```
    const SETTINGS: Option<&'static [&'static str]> = None;

    /// The app's protocol (`"http/1.1"`, `"echo"`): on a reload, a connection of this app that
    /// is between requests is handed to a worker of the new generation whose app on the same
    /// listener speaks the same protocol, and serves its next request there — the client never
    /// notices (see [`App::export_session`]). `None` (the default): its connections stay with
    /// their old worker until they end (or `graceful_timeout`), unless
    /// [`App::IDLE_CLOSE_HARMLESS`].
    const PROTOCOL: Option<&'static str> = None;

    /// True when closing a connection between requests is harmless for the protocol (HTTP
    /// keep-alive: the client opens another): a draining worker then closes gently those it
    /// cannot hand off, rather than keep them until `graceful_timeout`.
    const IDLE_CLOSE_HARMLESS: bool = false;

    /// Builds the app from its `[app.NAME]` settings, once per worker process, before the
    /// worker accepts any connection. An `Err` fails the worker's start (and so a reload) with
    /// that message.
    fn start(settings: &Settings) -> Result<Self, String>;

    /// The connection has new input in [`Conn::input`]. Take every complete request, answer it,
    /// and return; leave a partial request unconsumed and it is offered again with more bytes.
    fn on_readable(&self, conn: &mut Conn) -> Next;

    /// The connection's timer ([`Conn::set_timer`]) ran out: the peer sent nothing for that
    /// long. [`Conn::input`] holds whatever partial request is buffered; write, and return what
    /// the connection should do, as from [`App::on_readable`]. The timer starts again (unless
    /// changed), so an app that keeps the connection is called again after another quiet
    /// period. The default keeps the connection.
    ///
    /// ```
    /// use std::time::Duration;
    /// use fdt_sdk::{App, Conn, Next, Settings};
    /// struct Login;
    /// impl App for Login {
    ///     fn start(_: &Settings) -> Result<Self, String> { Ok(Login) }
    ///     fn on_readable(&self, conn: &mut Conn) -> Next {
    ///         conn.set_timer(Some(Duration::from_secs(10))); // ten seconds to say something
    ///         while let Some(line) = conn.take_line() { conn.write(line) }
    ///         Next::KeepOpen
    ///     }
    ///     fn on_timer(&self, conn: &mut Conn) -> Next {
    ///         conn.write(b"ERR too quiet\n");
    ///         Next::Close
    ///     }
    /// }
    /// let app = fdt_sdk::testing::TestApp::<Login>::start("").unwrap();
    /// let mut conn = app.connect();
    /// conn.send(b"hi\n");
    /// assert_eq!(conn.timer(), Some(Duration::from_secs(10)));
    /// assert_eq!(conn.fire_timer(), Next::Close);
    /// assert_eq!(conn.take_output(), b"hi\nERR too quiet\n");
    /// ```
    fn on_timer(&self, _conn: &mut Conn) -> Next {
        Next::KeepOpen
    }

    /// The connection was just accepted, before any input: write a greeting here (an SMTP
    /// `220` banner, a `WELCOME`), or set a timer. Runs in the thread that accepted the
    /// connection, so keep it short. The default writes nothing and keeps the connection.
    /// For an outbound connection ([`Conn::is_outbound`]), called once it is made.
    ///
    /// ```
    /// # use fdt_sdk::{App, Conn, Next, Settings};
    /// struct Smtp;
    /// impl App for Smtp {
    ///     fn start(_: &Settings) -> Result<Self, String> { Ok(Smtp) }
    ///     fn on_open(&self, conn: &mut Conn) -> Next {
    ///         conn.write(b"220 mail.example.com ready\r\n");
    ///         Next::KeepOpen
    ///     }
    ///     fn on_readable(&self, conn: &mut Conn) -> Next { Next::KeepOpen }
    /// }
    /// let app = fdt_sdk::testing::TestApp::<Smtp>::start("").unwrap();
    /// let mut conn = app.connect();
    /// assert_eq!(conn.take_output(), b"220 mail.example.com ready\r\n");
    /// ```
    fn on_open(&self, _conn: &mut Conn) -> Next {
        Next::KeepOpen
    }

    /// The connection asked to produce ([`Conn::want_writable`]) and its output has room
    /// again: it has drained to half of the server's `max_output`. Write up to
    /// [`Conn::output_room`] bytes and return; the app is called again as the peer takes them,
    /// until it says `conn.want_writable(false)`. So a response of any size costs at most
    /// `max_output` of memory, however slow the peer (Twisted's producers, Envoy's watermarks).
    ///
    /// ```
    /// # use fdt_sdk::{App, Conn, Next, Settings};
    /// /// Sends `N` bytes of `x` for a line `N`, as fast as the peer reads them.
    /// struct Bytes;
    /// #[derive(Default)]
    /// struct Left(usize);
    /// impl App for Bytes {
    ///     fn start(_: &Settings) -> Result<Self, String> { Ok(Bytes) }
    ///     fn on_readable(&self, conn: &mut Conn) -> Next {
    ///         if conn.session::<Left>().0 == 0 && let Some(line) = conn.take_line() {
    ///             conn.session::<Left>().0 = String::from_utf8_lossy(line).trim().parse().unwrap_or(0);
    ///             return self.on_writable(conn);
    ///         }
    ///         Next::KeepOpen
    ///     }
    ///     fn on_writable(&self, conn: &mut Conn) -> Next {
    ///         let left = conn.session::<Left>().0;
    ///         let n = left.min(conn.output_room());
    ///         conn.write(&vec![b'x'; n]);
    ///         conn.session::<Left>().0 = left - n;
    ///         conn.want_writable(left > n);
    ///         Next::KeepOpen
    ///     }
    /// }
    /// let app = fdt_sdk::testing::TestApp::<Bytes>::start("").unwrap();
    /// let mut conn = app.connect();
    /// conn.set_output_room(1000);
    /// conn.send(b"2500\n");
    /// assert_eq!(conn.take_output().len(), 1000);
    /// assert!(conn.wants_writable());
    /// conn.writable();
    /// conn.writable();
    /// assert_eq!(conn.take_output().len(), 1500);
    /// assert!(!conn.wants_writable());
    /// ```
    fn on_writable(&self, _conn: &mut Conn) -> Next {
        Next::KeepOpen
    }

    /// The worker has started draining (a reload or a stop). Called once for each open
    /// connection, also for one that is idle or only ever pushed to, which otherwise would learn
    /// it only from [`Conn::draining`] at its next input: say goodbye, or return
    /// [`Next::Close`]. The default keeps the connection (a draining worker closes it once it
    /// is between requests and quiet).
    ///
    /// From `on_open`, `on_writable` and `on_drain`, [`Next::KeepOpen`] leaves the connection
    /// as it was: a conversation [in progress](Next::InProgress) stays in progress.
    fn on_drain(&self, _conn: &mut Conn) -> Next {
        Next::KeepOpen
    }

    /// A request begun in [`Conn::input`] did not arrive in full within the server's
    /// `read_timeout`. Write a last answer if the protocol has one (`hello` answers `408`);
    /// the connection is closed after it.
    fn on_read_timeout(&self, _conn: &mut Conn) {}

    /// An outbound connection ([`Conn::connect`], [`Connector`]) could not be made: `error`
    /// says why (refused, unreachable, timed out). Pushes to it fail from now on; `on_close`
    /// follows.
    fn on_connect_failed(&self, _conn: &mut Conn, _error: &str) {}

    /// The connection is handed to the next generation ([`App::PROTOCOL`]): returns its session
    /// as bytes (a user, a nick, a subscription), given to [`App::import_session`] there. The
    /// default exports nothing: the protocol keeps no state between requests. `on_close`
    /// follows here, once it has moved.
    fn export_session(&self, _conn: &mut Conn) -> Option<Vec<u8>> {
        None
    }

    /// A connection handed over from the previous generation, between requests: restore what
    /// [`App::export_session`] gave (`session` is empty when it gave nothing), and register the
    /// connection where `on_open` would (it is not called: the client was greeted already). An
    /// `Err` sends the connection back to its old worker.
    fn import_session(&self, _conn: &mut Conn, _session: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// The connection has ended (peer closed, error, drain timeout or [`Next::Close`]). The
    /// session, if any, is dropped right after this returns.
    fn on_close(&self, _conn: &mut Conn) {}

    /// The worker is about to exit; every connection is already closed.
    fn stop(&self) {}
}

/// What the worker does with a connection after [`App::on_readable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep it open and wait for more input. If no unconsumed input is left, the connection
    /// is *between requests*: a draining worker may close it (gently) at this point.
    KeepOpen,
    /// Keep it open; the app is in the middle of a conversation that spans requests (an open
    /// transaction, say), so a draining worker leaves it open until `graceful_timeout`.
    InProgress,
    /// Send everything written so far, then close the connection.
    Close,
}

impl Next {
    fn code(self) -> abi::NextCode {
        match self {
            Next::KeepOpen => abi::NEXT_KEEP_OPEN,
            Next::InProgress => abi::NEXT_IN_PROGRESS,
            Next::Close => abi::NEXT_CLOSE,
        }
    }
}

/// Per-connection state kept on the plugin side of the boundary.
#[derive(Default)]
pub(crate) struct ConnState {
    pub(crate) out: Vec<u8>,
    pub(crate) peer: String,
    pub(crate) listener: String,
    pub(crate) id: u64,
    /// What names the connection for pushes ([`Conn::handle`]).
    pub(crate) handle: u64,
    /// The app made this connection ([`Conn::is_outbound`]).
    pub(crate) outbound: bool,
    /// See [`Conn::link`]; 0 for none.
    pub(crate) link: u64,
    pub(crate) session: Option<Box<dyn Any + Send>>,
    /// See [`Conn::set_timer`]: milliseconds, 0 for none (a `Duration` would make every
    /// connection's state a size class larger).
    pub(crate) timer_ms: u64,
    /// See [`Conn::want_writable`].
    pub(crate) want_writable: bool,
    /// See [`Conn::lift_idle_timeout`].
    pub(crate) no_idle_timeout: bool,
    /// How many bytes at the start of the unconsumed input are known to hold no `\n`, so that
    /// [`Conn::take_line`] does not scan a long partial line again each time more of it comes.
    pub(crate) no_newline: u32,
}

impl ConnState {
    pub(crate) fn timer(&self) -> Option<std::time::Duration> {
        (self.timer_ms > 0).then(|| std::time::Duration::from_millis(self.timer_ms))
    }
}

/// One client connection, as seen during one call into the app.
///
/// Input is borrowed for the duration of the call: [`Conn::take_line`] returns slices that stay
/// valid while the app writes, so `conn.write(line)` needs no copy.
pub struct Conn<'a> {
    input: &'a [u8],
    pos: usize,
    /// `input[pos..scanned]` holds no `\n` (see [`ConnState::no_newline`]).
    scanned: usize,
    requests: u64,
    flags: u32,
    /// How many bytes this call may write before the output is full (see [`Conn::output_room`]).
    room: usize,
    state: &'a mut ConnState,
}

impl<'a> Conn<'a> {
    #[inline]
    pub(crate) fn new(input: &'a [u8], flags: u32, state: &'a mut ConnState) -> Conn<'a> {
        let scanned = (state.no_newline as usize).min(input.len());
        Conn { input, pos: 0, scanned, requests: 0, flags, room: usize::MAX, state }
    }

    /// Sets what this call may write before the output is full (the server's `max_output`
    /// less what is queued).
    #[inline]
    pub(crate) fn with_room(mut self, room: usize) -> Conn<'a> {
        self.room = room;
        self
    }

    /// The input not consumed yet.
    #[inline]
    pub fn input(&self) -> &'a [u8] {
        &self.input[self.pos..]
    }

    /// Marks `n` bytes of [`Conn::input`] as consumed (without counting a request).
    ///
    /// # Panics
    /// When `n` is larger than the input left.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.input.len() - self.pos, "consume({n}) past the end of the input");
        self.pos += n;
    }

    /// Consumes `n` bytes that made up one complete request, and counts it in the server's
    /// "requests served" figures.
    #[inline]
    pub fn consume_request(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos;
        self.consume(n);
        self.requests += 1;
        &self.input[start..start + n]
    }

    /// Takes the next complete line, including its `\n`, and counts it as one request; `None`
    /// when no complete line is left, or when the connection's output is full
    /// ([`Conn::has_room`]): the rest of the input waits, and the app is called again once the
    /// peer has read enough.
    ///
    /// ```
    /// # use fdt_sdk::{App, Conn, Next, Settings};
    /// # struct Upper;
    /// # impl App for Upper {
    /// #   fn start(_: &Settings) -> Result<Self, String> { Ok(Upper) }
    /// fn on_readable(&self, conn: &mut Conn) -> Next {
    ///     while let Some(line) = conn.take_line() {
    ///         conn.write(&line.to_ascii_uppercase());
    ///     }
    ///     Next::KeepOpen
    /// }
    /// # }
    /// ```
    #[inline]
    pub fn take_line(&mut self) -> Option<&'a [u8]> {
        if !self.has_room() {
            return None;
        }
        let from = self.scanned.max(self.pos);
        match memchr::memchr(b'\n', &self.input[from..]) {
            Some(i) => Some(self.consume_request(from + i + 1 - self.pos)),
            None => {
                self.scanned = self.input.len();
                None
            }
        }
    }

    /// Appends bytes to the connection's output; they are sent when the call returns. A write
    /// is never refused, so a well-behaved app writes no more than [`Conn::output_room`] at a
    /// time: answer one request per [`Conn::has_room`], produce a large body from
    /// [`App::on_writable`].
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        self.state.out.extend_from_slice(bytes);
    }

    /// How many more bytes this call may write before the connection's output reaches the
    /// server's `max_output` (what the peer has not read yet counts). Above it the server stops
    /// reading the connection and calling the app for it until the peer has read half.
    #[inline]
    pub fn output_room(&self) -> usize {
        self.room.saturating_sub(self.state.out.len())
    }

    /// True while [`Conn::output_room`] is not zero: the app may answer another request.
    /// [`Conn::take_line`] checks it; an app that parses [`Conn::input`] itself checks it before
    /// each request it answers.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.output_room() > 0
    }

    /// Asks to be called at [`App::on_writable`] each time the output has room again (`true`),
    /// or no longer (`false`). It stays as set across calls. See [`App::on_writable`].
    pub fn want_writable(&mut self, yes: bool) {
        self.state.want_writable = yes;
    }

    /// True while the app asked for [`App::on_writable`] calls.
    pub fn wants_writable(&self) -> bool {
        self.state.want_writable
    }

    /// Lifts (`true`) or restores (`false`) the server's `idle_timeout` for this connection: a
    /// subscriber that mostly listens, a connection the app pushes to. It stays as set across
    /// calls. The other timeouts still apply.
    pub fn lift_idle_timeout(&mut self, yes: bool) {
        self.state.no_idle_timeout = yes;
    }

    /// Sets the connection's timer: once the peer has sent nothing for `after` (counted from
    /// its last input, or from now when the timer is set without input), the worker calls
    /// [`App::on_timer`]. `None` removes it. It stays as set across calls until changed; an
    /// app that uses it typically sets it at the end of every `on_readable` (for example while
    /// a transaction is open). Its resolution is about a tenth of a second.
    pub fn set_timer(&mut self, after: Option<std::time::Duration>) {
        self.state.timer_ms = after.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1));
    }

    /// The connection's timer, as last set with [`Conn::set_timer`].
    pub fn timer(&self) -> Option<std::time::Duration> {
        self.state.timer()
    }

    /// True once the worker is draining (reload or stop): answer the current request and
    /// close, e.g. with `Connection: close` in HTTP.
    pub fn draining(&self) -> bool {
        self.flags & abi::FLAG_DRAINING != 0
    }

    /// True when the peer has closed its side: no more input will come.
    pub fn peer_closed(&self) -> bool {
        self.flags & abi::FLAG_PEER_CLOSED != 0
    }

    /// The peer's address (`127.0.0.1:5555`), or an empty string for Unix sockets.
    pub fn peer(&self) -> &str {
        &self.state.peer
    }

    /// The listening address this connection came in on, as written in the config.
    pub fn listener(&self) -> &str {
        &self.state.listener
    }

    /// This connection's [`Handle`]: keep it to write to the connection, or close it, later
    /// and from anywhere in the worker (push).
    pub fn handle(&self) -> Handle {
        Handle(self.state.handle)
    }

    /// Connects to `addr` (`host:port`) from the worker's event loop, for this app: returns the
    /// new connection's [`Handle`] at once, and the worker serves that connection with this
    /// app's callbacks — [`App::on_open`] once it is made (or [`App::on_connect_failed`]), then
    /// `on_readable`, `on_writable`, `on_close` — with the same bounds and timeouts as this
    /// one. Its [`Conn::link`] is this connection. What is written to the handle before the
    /// connect completes waits for it. Times out after [`DEFAULT_CONNECT_TIMEOUT`].
    ///
    /// Flow control between the two: when a [`Handle::write`] from this connection's callback
    /// is refused as [`Full`](crate::PushError::Full), leave the input unconsumed and return —
    /// the worker stops reading this connection and offers its input again once the other
    /// side has room. A complete proxy is in the README ("Outbound connections").
    ///
    /// ```
    /// use fdt_sdk::{App, Conn, Next, Settings};
    ///
    /// /// Forwards every line to a backend; the backend's lines come back to the client.
    /// struct Forward;
    ///
    /// impl App for Forward {
    ///     fn start(_: &Settings) -> Result<Self, String> { Ok(Forward) }
    ///     fn on_open(&self, conn: &mut Conn) -> Next {
    ///         if !conn.is_outbound() {
    ///             match conn.connect("127.0.0.1:7001") {
    ///                 Ok(backend) => *conn.session() = Some(backend),
    ///                 Err(_) => return Next::Close,
    ///             }
    ///         }
    ///         Next::KeepOpen
    ///     }
    ///     fn on_readable(&self, conn: &mut Conn) -> Next {
    ///         let other = if conn.is_outbound() { conn.link() } else { *conn.session::<Option<fdt_sdk::Handle>>() };
    ///         let Some(other) = other else { return Next::Close };
    ///         match other.write(conn.input()) {
    ///             Ok(()) => conn.consume(conn.input().len()),
    ///             Err(fdt_sdk::PushError::Full) => {} // called again once it has room
    ///             Err(fdt_sdk::PushError::Closed) => return Next::Close,
    ///         }
    ///         Next::KeepOpen
    ///     }
    /// }
    ///
    /// let app = fdt_sdk::testing::TestApp::<Forward>::start("").unwrap();
    /// let mut client = app.connect();
    /// let mut backend = client.take_outbound().expect("it connected");
    /// assert_eq!(backend.peer(), "127.0.0.1:7001");
    /// backend.connected();
    /// client.send(b"ping\n");
    /// assert_eq!(backend.take_output(), b"ping\n");
    /// backend.send(b"pong\n");
    /// assert_eq!(client.take_output(), b"pong\n");
    /// ```
    pub fn connect(&self, addr: &str) -> Result<Handle, ConnectError> {
        self.connect_timeout(addr, crate::DEFAULT_CONNECT_TIMEOUT)
    }

    /// [`Conn::connect`] with a timeout of its own.
    pub fn connect_timeout(&self, addr: &str, timeout: std::time::Duration) -> Result<Handle, ConnectError> {
        outbound::connect_from_callback(addr, self.handle(), timeout)
    }

    /// True for a connection the app made ([`Conn::connect`], [`Connector`]); its
    /// [`Conn::peer`] is the address it connected to.
    pub fn is_outbound(&self) -> bool {
        self.state.outbound
    }

    /// For an outbound connection, the handle its connect named: with [`Conn::connect`], the
    /// connection that made it. `None` otherwise.
    pub fn link(&self) -> Option<Handle> {
        (self.state.link != 0).then_some(Handle(self.state.link))
    }

    /// A number unique to this connection within its worker process.
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The connection's own state of type `T`, created with `T::default()` on first use and
    /// dropped when the connection closes.
    ///
    /// # Panics
    /// When the same connection asks for two different types.
    pub fn session<T: Default + Send + 'static>(&mut self) -> &mut T {
        self.state
            .session
            .get_or_insert_with(|| Box::new(T::default()))
            .downcast_mut::<T>()
            .expect("Conn::session called with two different types on one connection")
    }

    /// Takes the session out of the connection (for example to finish it in `on_close`).
    pub fn take_session<T: Send + 'static>(&mut self) -> Option<T> {
        let boxed = self.state.session.take()?;
        match boxed.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(other) => {
                self.state.session = Some(other);
                None
            }
        }
    }

    /// Ends the call: how much input was consumed and how many requests it held. Remembers
    /// how far a failed line scan got, relative to the input left for the next call.
    pub(crate) fn finish(self) -> (usize, u64) {
        // (A partial line is at most the server's 1 MiB limit on a pending request.)
        self.state.no_newline = u32::try_from(self.scanned.saturating_sub(self.pos)).unwrap_or(u32::MAX);
        (self.pos, self.requests)
    }
}

/// Exports `$app` (a type implementing [`App`]) from a `cdylib` crate as an fdtserver app.
/// Use it once per crate.
///
/// ```
/// use fdt_sdk::{App, Conn, Next, Settings};
/// struct Nothing;
/// impl App for Nothing {
///     fn start(_: &Settings) -> Result<Self, String> { Ok(Nothing) }
///     fn on_readable(&self, _: &mut Conn) -> Next { Next::Close }
/// }
/// fdt_sdk::export_app!(Nothing);
/// ```
#[macro_export]
macro_rules! export_app {
    ($app:ty) => {
        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub static FDT_APP_DESCRIPTOR_V1: $crate::abi::AppDescriptor =
            $crate::__private::descriptor::<$app>(stringify!($app));
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `take_line` until it returns `None`, as an app does; returns the lines.
    fn lines_of(input: &[u8], state: &mut ConnState) -> (Vec<Vec<u8>>, usize) {
        let mut conn = Conn::new(input, 0, state);
        let mut lines = Vec::new();
        while let Some(l) = conn.take_line() {
            lines.push(l.to_vec());
        }
        let (consumed, _) = conn.finish();
        (lines, consumed)
    }

    #[test]
    fn take_line_resumes_its_scan_where_the_last_call_stopped() {
        let mut state = ConnState::default();
        let mut pending = b"partial".to_vec();
        let (lines, consumed) = lines_of(&pending, &mut state);
        assert!(lines.is_empty() && consumed == 0);
        assert_eq!(state.no_newline, 7, "the 7 bytes scanned hold no newline");
        pending.extend_from_slice(b" line\nnext");
        let (lines, consumed) = lines_of(&pending, &mut state);
        assert_eq!(lines, vec![b"partial line\n".to_vec()]);
        pending.drain(..consumed);
        assert_eq!(pending, b"next");
        assert_eq!(state.no_newline, 4, "relative to what is left: `next`");
        pending.extend_from_slice(b"\n");
        assert_eq!(lines_of(&pending, &mut state).0, vec![b"next\n".to_vec()]);
        assert_eq!(state.no_newline, 0);
    }

    #[test]
    fn a_long_line_in_small_pieces_is_scanned_once() {
        let mut state = ConnState::default();
        let mut pending = Vec::new();
        for i in 0..1000 {
            pending.extend_from_slice(&[b'a'; 50]);
            let (lines, _) = lines_of(&pending, &mut state);
            assert!(lines.is_empty());
            assert_eq!(state.no_newline as usize, 50 * (i + 1));
        }
        pending.push(b'\n');
        let (lines, consumed) = lines_of(&pending, &mut state);
        assert_eq!(lines.len(), 1);
        assert_eq!(consumed, 50_001);
    }

    #[test]
    fn consuming_after_a_failed_scan_keeps_the_position_relative_to_what_is_left() {
        let mut state = ConnState::default();
        let mut conn = Conn::new(b"abc", 0, &mut state);
        assert!(conn.take_line().is_none());
        conn.consume(2);
        conn.finish();
        assert_eq!(state.no_newline, 1);
    }
}
