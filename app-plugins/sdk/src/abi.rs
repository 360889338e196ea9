//! The C ABI between the fdtserver host and an app plugin: the one definition both sides compile.
//!
//! Only `#[repr(C)]` plain data, borrowed byte slices and `extern "C"` function pointers cross
//! this wall; nothing allocated on one side is ever freed on the other, and no Rust trait object
//! crosses it. Structs only grow by appending fields (bumping [`ABI_MINOR`]); every struct that
//! can grow carries its own size so that the reader knows which fields exist.
//!
//! This module never runs app code and never dereferences anything: it only describes layouts.

use std::ffi::c_void;

/// First bytes of every [`AppDescriptor`]: tells the host that the symbol really is ours.
pub const MAGIC: [u8; 8] = *b"FDTAPP\0\x01";
/// Bumped when a layout below changes incompatibly; the host refuses any other major.
pub const ABI_MAJOR: u32 = 1;
/// Bumped when fields are appended; a plugin built against a newer minor still loads.
pub const ABI_MINOR: u32 = 5;
/// Name of the exported static [`AppDescriptor`] the host looks up with `dlsym`.
pub const DESCRIPTOR_SYMBOL: &str = "FDT_APP_DESCRIPTOR_V1";

/// The SDK version compiled into both sides (shown by `fdtserver check`).
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `rustc --version` of the compiler that built this side. Informational only: the boundary is a
/// C ABI, so plugins built by another compiler are sound.
pub const RUSTC_VERSION: &str = env!("FDT_RUSTC_VERSION");
/// Target triple of this side; a plugin for another target cannot work.
pub const TARGET: &str = env!("FDT_TARGET");

/// A borrowed UTF-8 (or byte) string: valid only for the duration of the call it is passed to,
/// unless documented as `'static` (the strings of a descriptor).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StrRef {
    pub ptr: *const u8,
    pub len: usize,
}

impl StrRef {
    pub const fn new(s: &str) -> StrRef {
        StrRef { ptr: s.as_ptr(), len: s.len() }
    }
    pub const fn from_bytes(b: &[u8]) -> StrRef {
        StrRef { ptr: b.as_ptr(), len: b.len() }
    }
}

/// Result codes of the plugin's functions.
pub type Status = i32;
pub const STATUS_OK: Status = 0;
/// The call failed; the reason was passed to the error callback.
pub const STATUS_ERROR: Status = 1;
/// App code panicked; the panic message was passed to the error callback.
pub const STATUS_PANIC: Status = 2;

/// What the connection should do after `conn_data` returned (see `fdt_sdk::Next`).
pub type NextCode = i32;
/// Keep the connection; it is between requests and may be closed while draining.
pub const NEXT_KEEP_OPEN: NextCode = 0;
/// Keep the connection; the app is in the middle of a conversation (for example an open
/// transaction), so a drain must not close it while it is idle.
pub const NEXT_IN_PROGRESS: NextCode = 1;
/// Send what was written, then close the connection.
pub const NEXT_CLOSE: NextCode = 2;

/// Log levels of [`HostApi::log`], the same numbers as `log::Level`.
pub type LogLevel = u32;

/// Receives a message (an error text) from the other side during one call.
pub type MessageFn = unsafe extern "C" fn(ctx: *mut c_void, msg: StrRef);

/// What the host gives the plugin at start; valid for the duration of `start` only, except the
/// function pointers, which stay valid for the life of the process.
#[repr(C)]
pub struct HostApi {
    /// `size_of::<HostApi>()` on the host side.
    pub size: u32,
    pub abi_major: u32,
    pub abi_minor: u32,
    /// The `[app.NAME]` table, as TOML text, without `plugin`.
    pub settings_toml: StrRef,
    pub app_name: StrRef,
    pub node_id: StrRef,
    pub worker_pid: u32,
    pub generation: u64,
    /// The most verbose level the host logs (0 off, 1 error … 5 trace).
    pub log_level: LogLevel,
    /// Writes one log record through the host's logger (thread-safe, callable any time).
    pub log: unsafe extern "C" fn(level: LogLevel, target: StrRef, msg: StrRef),
    /// The config's `[database.NAME]` tables, as TOML text with one table per database.
    pub databases_toml: StrRef,
    /// Adds `delta` to the app's event counter `name` (`[a-z0-9_]{1,64}`), reported in the
    /// server's metrics. Thread-safe, callable any time, with `count_ctx`.
    pub count: unsafe extern "C" fn(ctx: *const c_void, name: StrRef, delta: u64),
    /// This app's counters on the host side; valid for the life of the process.
    pub count_ctx: *const c_void,
    /// ABI 1.2: starts an app timer. After `delay_ms`, and then every `every_ms` (0: once), the
    /// host calls `tick(tick_ctx)` from the worker's clock thread, never two calls of one timer
    /// at once. Once the timer is done (cancelled, run once, or the app stops) the host calls
    /// `drop(tick_ctx)`, exactly once, so that the plugin frees what `tick_ctx` points at.
    /// Returns the timer's id (never 0). Thread-safe, callable any time, with `timers_ctx`.
    pub timer_start: unsafe extern "C" fn(
        ctx: *const c_void,
        delay_ms: u64,
        every_ms: u64,
        tick: TimerTickFn,
        drop: TimerDropFn,
        tick_ctx: *mut c_void,
    ) -> u64,
    /// ABI 1.2: cancels the timer `id` (nothing when it is done already). A tick running right
    /// now finishes first.
    pub timer_cancel: unsafe extern "C" fn(ctx: *const c_void, id: u64),
    /// This app's timers on the host side; valid for the life of the process.
    pub timers_ctx: *const c_void,
    /// ABI 1.2: writes `bytes` to the connection [`ConnInfo::handle`] names, from any thread and
    /// any callback, and closes it after them when `close` is not 0. Returns a [`PushStatus`].
    /// Thread-safe, callable any time, with `push_ctx`; it never blocks. ABI 1.3: a push
    /// refused as full from inside a connection's callback makes the host offer that
    /// connection's unconsumed input again once the target has room (flow control).
    pub push: unsafe extern "C" fn(ctx: *const c_void, handle: u64, bytes: StrRef, close: u32) -> PushStatus,
    /// The worker's connections on the host side; valid for the life of the process.
    pub push_ctx: *const c_void,
    /// ABI 1.2: what names this server on the machine, the same in all its workers and across
    /// its reloads and binary upgrades (its control socket's path).
    pub server_id: StrRef,
    /// ABI 1.3: starts an outbound connection to `addr` (`host:port`) in the worker's event
    /// loop, served by this app like an accepted one ([`ConnInfo::outbound`]). Returns its
    /// handle at once (the connect goes on without the caller: [`EVENT_OPEN`] once it is
    /// made, [`EVENT_CONNECT_FAILED`] then `conn_close` when it fails or takes longer than
    /// `timeout_ms`; a worker that exits meanwhile closes it with `conn_close` alone); 0 when it
    /// cannot start, with the reason passed to `error` (and no `conn_close`: the app's state for
    /// it is made only once nothing else can fail). Refused from inside the app's `start`. `link`: a
    /// handle the new connection's [`ConnInfo::link`] carries (0: none). Thread-safe, callable
    /// any time, with `connect_ctx`; it never waits for the peer (a host name is resolved in the
    /// calling thread).
    pub connect: unsafe extern "C" fn(
        ctx: *const c_void,
        addr: StrRef,
        link: u64,
        timeout_ms: u64,
        error: MessageFn,
        error_ctx: *mut c_void,
    ) -> u64,
    /// This app on the host side; valid for the life of the process.
    pub connect_ctx: *const c_void,
    /// ABI 1.4: emits the event (`topic`, `payload`) on the server's bus: it reaches the
    /// subscriptions of every worker of the server (and, with `[events] database`, of every
    /// server sharing that database), in emit order per emitter. `flags`: [`EMIT_LOCAL`].
    /// Returns [`STATUS_OK`], or [`STATUS_ERROR`] with the reason passed to `error` (a bad topic,
    /// a payload too large). Thread-safe, callable any time, with `events_ctx`; never blocks.
    pub emit: unsafe extern "C" fn(
        ctx: *const c_void,
        topic: StrRef,
        payload: StrRef,
        flags: u32,
        error: MessageFn,
        error_ctx: *mut c_void,
    ) -> Status,
    /// ABI 1.4: calls `deliver(sub_ctx, topic, payload)` for every event whose topic `pattern`
    /// takes (`*`, `prefix.*`, or a topic), from the worker's event thread, one call at a time,
    /// until [`HostApi::unsubscribe`] or the app stops; then `drop(sub_ctx)`, exactly once,
    /// never during a call. Returns the subscription's id. Thread-safe, with `events_ctx`.
    pub subscribe: unsafe extern "C" fn(
        ctx: *const c_void,
        pattern: StrRef,
        deliver: EventDeliverFn,
        drop: TimerDropFn,
        sub_ctx: *mut c_void,
    ) -> u64,
    /// ABI 1.4: ends the subscription `id` (nothing when it has ended already).
    pub unsubscribe: unsafe extern "C" fn(ctx: *const c_void, id: u64),
    /// This app's events on the host side; valid for the life of the process.
    pub events_ctx: *const c_void,
    /// ABI 1.4: the `[database.NAME]` whose PostgreSQL carries events between servers
    /// (`[events] database`), or empty.
    pub events_database: StrRef,
}

/// ABI 1.4, in [`HostApi::emit`]'s `flags`: deliver within this server only (the caller has
/// told the other servers itself, inside a transaction).
pub const EMIT_LOCAL: u32 = 1;

/// ABI 1.4: an event for a subscription ([`HostApi::subscribe`]); returns a [`Status`] (the
/// plugin logs a panic's message itself).
pub type EventDeliverFn = unsafe extern "C" fn(sub_ctx: *mut c_void, topic: StrRef, payload: StrRef) -> Status;

/// ABI 1.2: what [`HostApi::push`] did.
pub type PushStatus = i32;
/// Queued for the connection (or written to it at once).
pub const PUSH_OK: PushStatus = 0;
/// Nothing written: the connection's output would pass `max_output`.
pub const PUSH_FULL: PushStatus = 1;
/// Nothing written: the connection is closed (or closing), or the handle names no connection.
pub const PUSH_CLOSED: PushStatus = 2;

/// ABI 1.2: an app timer's tick ([`HostApi::timer_start`]); returns a [`Status`] (the plugin logs
/// a panic's message itself).
pub type TimerTickFn = unsafe extern "C" fn(tick_ctx: *mut c_void) -> Status;
/// ABI 1.2: frees an app timer's context ([`HostApi::timer_start`]).
pub type TimerDropFn = unsafe extern "C" fn(tick_ctx: *mut c_void);

/// What the host tells the plugin about a new connection; valid during `conn_open` only.
#[repr(C)]
pub struct ConnInfo {
    pub size: u32,
    /// Peer address as text (`127.0.0.1:5555`, or the Unix socket path, or empty).
    pub peer: StrRef,
    /// The listening address as written in the config.
    pub listener: StrRef,
    /// Unique within the worker process.
    pub id: u64,
    /// ABI 1.2: names the connection for [`HostApi::push`]; never names another connection,
    /// even once this one is closed.
    pub handle: u64,
    /// ABI 1.3: 1 for a connection the app made ([`HostApi::connect`]), 0 for an accepted one.
    pub outbound: u32,
    /// ABI 1.3: the `link` its [`HostApi::connect`] named (0: none, or accepted).
    pub link: u64,
}

/// Flags in [`ConnIo::flags`].
pub const FLAG_DRAINING: u32 = 1;
/// The peer has closed its sending side: no more input will come.
pub const FLAG_PEER_CLOSED: u32 = 2;

/// One `conn_data` call: the unread input, borrowed from the host, and where to write output.
#[repr(C)]
pub struct ConnIo {
    pub size: u32,
    pub flags: u32,
    pub input: *const u8,
    pub input_len: usize,
    /// Out: how many bytes of `input` the app consumed.
    pub consumed: usize,
    /// Out: how many complete requests the app handled in this call.
    pub requests: u64,
    /// Appends bytes to the connection's output; may be called several times.
    pub write: unsafe extern "C" fn(ctx: *mut c_void, bytes: StrRef),
    pub write_ctx: *mut c_void,
    /// Receives the reason when the call fails or panics.
    pub error: MessageFn,
    pub error_ctx: *mut c_void,
    /// ABI 1.1, out: the connection's timer, in milliseconds, as the app left it (0: none).
    /// When the peer sends nothing for that long, the host calls
    /// [`AppDescriptor::conn_timer`]. The plugin writes it after every call, when `size` says
    /// the field exists.
    pub timer_ms: u64,
    /// ABI 1.2, in: how many bytes the app may write in this call before the connection's
    /// output is full (`max_output` less what is queued); `u64::MAX` when unbounded.
    pub output_room: u64,
    /// ABI 1.2, out: the connection's `WANT_*` bits as the app left them. The plugin writes it
    /// after every call, when `size` says the field exists.
    pub wants: u32,
}

/// ABI 1.2, in [`ConnIo::wants`]: call [`AppDescriptor::conn_event`] with [`EVENT_WRITABLE`]
/// whenever the connection's output has drained to half of `max_output` (a producer).
pub const WANT_WRITABLE: u32 = 1;
/// ABI 1.2, in [`ConnIo::wants`]: the server's `idle_timeout` does not apply to this connection.
pub const WANT_NO_IDLE_TIMEOUT: u32 = 2;

/// ABI 1.2: what [`AppDescriptor::conn_event`] reports. A plugin answers a kind it does not know
/// with [`NEXT_KEEP_OPEN`] and no output, so the host may add kinds by bumping [`ABI_MINOR`].
pub type EventKind = u32;
/// The connection was just accepted (`io.input` is empty): the app may write a greeting.
pub const EVENT_OPEN: EventKind = 1;
/// The connection asked for [`WANT_WRITABLE`] and its output has room again.
pub const EVENT_WRITABLE: EventKind = 2;
/// The worker has started draining (a reload or a stop); called once per open connection.
pub const EVENT_DRAIN: EventKind = 3;
/// A request begun in `io.input` did not arrive in full within `read_timeout`: the app may
/// write a last answer; the connection is closed after it, whatever the app returns.
pub const EVENT_READ_TIMEOUT: EventKind = 4;
/// ABI 1.3: an outbound connection ([`HostApi::connect`]) could not be made: `io.input` holds
/// the reason as text; `conn_close` follows, whatever the app returns.
pub const EVENT_CONNECT_FAILED: EventKind = 5;

/// The exported static the host looks up first. Read-only; every pointer in it is `'static`.
#[repr(C)]
pub struct AppDescriptor {
    pub magic: [u8; 8],
    pub abi_major: u32,
    pub abi_minor: u32,
    /// `size_of::<AppDescriptor>()` in the plugin's build.
    pub size: u32,
    pub sdk_version: StrRef,
    pub rustc_version: StrRef,
    pub target: StrRef,
    /// The Rust type name of the app, for messages.
    pub app_type: StrRef,
    /// Builds the app. On success stores an opaque app pointer in `*app_out`.
    pub start: unsafe extern "C" fn(
        host: *const HostApi,
        app_out: *mut *mut c_void,
        error: MessageFn,
        error_ctx: *mut c_void,
    ) -> Status,
    /// Stop hook, then frees the app. Called at most once, after every connection is closed.
    pub stop: unsafe extern "C" fn(app: *mut c_void),
    /// Creates the per-connection state; null when the app refused the connection.
    pub conn_open: unsafe extern "C" fn(app: *mut c_void, info: *const ConnInfo) -> *mut c_void,
    /// New input is available. Returns a [`NextCode`], or a negative [`Status`] on failure.
    pub conn_data: unsafe extern "C" fn(app: *mut c_void, conn: *mut c_void, io: *mut ConnIo) -> NextCode,
    /// The connection is gone; frees the per-connection state.
    pub conn_close: unsafe extern "C" fn(app: *mut c_void, conn: *mut c_void),
    /// ABI 1.1: the connection's timer ([`ConnIo::timer_ms`]) ran out with no input. Called
    /// like `conn_data` (`io.input` holds whatever partial request is buffered) and returns
    /// the same codes. Present only when `size` covers it.
    pub conn_timer: unsafe extern "C" fn(app: *mut c_void, conn: *mut c_void, io: *mut ConnIo) -> NextCode,
    /// ABI 1.1: the settings the app declares. Returns 0 when it declares none (any key is
    /// accepted); otherwise calls `key` once per setting name, with `ctx`, and returns 1. Runs no
    /// app code (the names are static data), so the host may call it before `start`.
    pub declared_settings: unsafe extern "C" fn(key: MessageFn, ctx: *mut c_void) -> i32,
    /// ABI 1.2: something happened to the connection other than input (an [`EventKind`]).
    /// Called like `conn_data` and returns the same codes.
    pub conn_event:
        unsafe extern "C" fn(app: *mut c_void, conn: *mut c_void, io: *mut ConnIo, kind: EventKind) -> NextCode,
    /// ABI 1.2: the worker has started draining (a reload, a stop): the app's background
    /// services are asked to stop. Runs no request; returns at once.
    pub app_drain: unsafe extern "C" fn(app: *mut c_void),
    /// ABI 1.5: the app's protocol, for handing its idle connections to the next generation on
    /// a reload: a connection moves only to an app of the same protocol. Empty: the app's
    /// connections are never handed off.
    pub protocol: StrRef,
    /// ABI 1.5: 1 when closing a connection between requests is harmless for the protocol (HTTP
    /// keep-alive: the client opens another): a drain may then close one it cannot hand off.
    /// 0: such a connection stays with its old worker until it ends or `graceful_timeout`.
    pub idle_close_harmless: u32,
    /// ABI 1.5: the connection leaves this worker (handed off): writes its session's bytes with
    /// `write(write_ctx, bytes)` (nothing for none). Returns a [`Status`]; on failure the
    /// connection stays. `conn_close` follows when it has moved.
    pub conn_export:
        unsafe extern "C" fn(app: *mut c_void, conn: *mut c_void, write: MessageFn, write_ctx: *mut c_void) -> Status,
    /// ABI 1.5: a connection handed over from the previous generation (after `conn_open`, with
    /// no `EVENT_OPEN`): restores its session from `session` (what `conn_export` wrote). Returns
    /// a [`Status`], the reason passed to `error` on failure: the connection then goes back.
    pub conn_import: unsafe extern "C" fn(
        app: *mut c_void,
        conn: *mut c_void,
        session: StrRef,
        error: MessageFn,
        error_ctx: *mut c_void,
    ) -> Status,
}

/// Size of an ABI 1.0 descriptor (the fields up to `conn_close`): the smallest one a host of
/// ABI 1.x accepts. Fields after it exist only where the descriptor's `size` covers them.
pub const DESCRIPTOR_SIZE_1_0: usize = std::mem::offset_of!(AppDescriptor, conn_timer);

/// True when a struct of `size` bytes (as its writer declared it) contains the field that ends
/// at `end` (its offset plus its size).
pub const fn covers(size: u32, end: usize) -> bool {
    size as usize >= end
}

// SAFETY: an `AppDescriptor` is immutable after construction and its pointers only point at
// `'static` string data and functions, which any thread may read or call.
unsafe impl Sync for AppDescriptor {}
