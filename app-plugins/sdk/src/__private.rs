//! The plugin side of the ABI wall: `extern "C"` functions that turn host calls into [`App`]
//! calls. Used only by [`export_app!`](crate::export_app); not part of the public API.
//!
//! Every function catches panics before they can cross into the host, and frees only what this
//! side allocated.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{addr_of, addr_of_mut};
use std::sync::Once;

use crate::abi::{self, AppDescriptor, ConnInfo, ConnIo, HostApi, MessageFn, NextCode, Status, StrRef};
use crate::{App, Conn, ConnState, Settings};

/// Builds the descriptor that `export_app!` exports for `A`.
pub const fn descriptor<A: App>(app_type: &'static str) -> AppDescriptor {
    AppDescriptor {
        magic: abi::MAGIC,
        abi_major: abi::ABI_MAJOR,
        abi_minor: abi::ABI_MINOR,
        size: size_of::<AppDescriptor>() as u32,
        sdk_version: StrRef::new(abi::SDK_VERSION),
        rustc_version: StrRef::new(abi::RUSTC_VERSION),
        target: StrRef::new(abi::TARGET),
        app_type: StrRef::new(app_type),
        start: start::<A>,
        stop: stop::<A>,
        conn_open,
        conn_data: conn_data::<A>,
        conn_close: conn_close::<A>,
        conn_timer: conn_timer::<A>,
        declared_settings: declared_settings::<A>,
        conn_event: conn_event::<A>,
        app_drain,
        protocol: match A::PROTOCOL {
            Some(p) => StrRef::new(p),
            None => StrRef::new(""),
        },
        idle_close_harmless: A::IDLE_CLOSE_HARMLESS as u32,
        conn_export: conn_export::<A>,
        conn_import: conn_import::<A>,
    }
}

/// Output buffers above this capacity are released after use, so that thousands of idle
/// connections that once sent a large answer do not keep that memory.
const MAX_IDLE_OUTPUT_CAPACITY: usize = 64 * 1024;

/// Reads a borrowed string from the host.
///
/// # Safety
/// `s` must point at `s.len` readable bytes that stay valid for `'a`.
unsafe fn borrowed<'a>(s: StrRef) -> &'a [u8] {
    if s.len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(s.ptr, s.len) }
}

/// # Safety
/// As for [`borrowed`].
unsafe fn borrowed_str(s: StrRef) -> String {
    // SAFETY: guaranteed by the caller.
    String::from_utf8_lossy(unsafe { borrowed(s) }).into_owned()
}

/// A [`MessageFn`] that appends the message to the `String` its context points at (how the SDK
/// collects the reason of a refused host call).
///
/// # Safety
/// `ctx` is a `*mut String` valid during the call; `msg` is valid during it.
pub(crate) unsafe extern "C" fn collect_message(ctx: *mut c_void, msg: StrRef) {
    // SAFETY: guaranteed by the caller.
    unsafe { (*ctx.cast::<String>()).push_str(&borrowed_str(msg)) }
}

fn report(error: MessageFn, ctx: *mut c_void, msg: &str) {
    // SAFETY: the host passed this callback and context for the duration of the current call.
    unsafe { error(ctx, StrRef::new(msg)) }
}

thread_local! {
    /// Where the last panic on this thread happened, recorded by our panic hook.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the plugin's own panic hook (each cdylib has its own copy of std) with one that
/// only records the location: the message reaches the host's log through the error callback.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_LOCATION.with(|p| *p.borrow_mut() = location);
        }));
    });
}

/// Drops a panic payload without letting a panic in its `Drop` escape (it would cross the
/// `extern "C"` boundary and abort the worker).
fn discard<T>(result: std::thread::Result<T>) {
    if let Err(payload) = result
        && let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload)))
    {
        std::mem::forget(again);
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    };
    discard::<()>(Err(payload));
    match PANIC_LOCATION.with(|p| p.borrow_mut().take()) {
        Some(at) => format!("app panicked at {at}: {msg}"),
        None => format!("app panicked: {msg}"),
    }
}

/// Forwards the plugin's `log` records to the host's logger.
struct HostLogger {
    log: unsafe extern "C" fn(abi::LogLevel, StrRef, StrRef),
}

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        // SAFETY: the host's log callback is valid for the life of the process and copies
        // the borrowed strings before returning.
        unsafe { (self.log)(record.level() as u32, StrRef::new(record.target()), StrRef::new(&msg)) }
    }
    fn flush(&self) {}
}

fn install_logger(log_fn: unsafe extern "C" fn(abi::LogLevel, StrRef, StrRef), level: abi::LogLevel) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if log::set_boxed_logger(Box::new(HostLogger { log: log_fn })).is_ok() {
            let filter = match level {
                0 => log::LevelFilter::Off,
                1 => log::LevelFilter::Error,
                2 => log::LevelFilter::Warn,
                3 => log::LevelFilter::Info,
                4 => log::LevelFilter::Debug,
                _ => log::LevelFilter::Trace,
            };
            log::set_max_level(filter);
        }
    });
}

unsafe extern "C" fn start<A: App>(
    host: *const HostApi,
    app_out: *mut *mut c_void,
    error: MessageFn,
    error_ctx: *mut c_void,
) -> Status {
    install_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        // The host's `HostApi` may be shorter than ours (an older host): it is read field by
        // field through raw pointers, a later field only where `size` covers it.
        // SAFETY: the host passes a valid `HostApi` with at least the fields up to
        // `databases_toml` for the duration of this call.
        let (size, major) = unsafe { (addr_of!((*host).size).read(), addr_of!((*host).abi_major).read()) };
        if major != abi::ABI_MAJOR {
            return Err(format!("the server speaks plugin ABI {major}, this app was built for ABI {}", abi::ABI_MAJOR));
        }
        // SAFETY: as above; the strings are valid for the duration of this call.
        let (log_fn, level, name, text, node, databases, pid, generation) = unsafe {
            (
                addr_of!((*host).log).read(),
                addr_of!((*host).log_level).read(),
                borrowed_str(addr_of!((*host).app_name).read()),
                borrowed_str(addr_of!((*host).settings_toml).read()),
                borrowed_str(addr_of!((*host).node_id).read()),
                borrowed_str(addr_of!((*host).databases_toml).read()),
                addr_of!((*host).worker_pid).read(),
                addr_of!((*host).generation).read(),
            )
        };
        install_logger(log_fn, level);
        // A host built before the counters existed passes a shorter `HostApi`.
        let has_counters = abi::covers(size, std::mem::offset_of!(HostApi, count_ctx) + size_of::<*const c_void>());
        let events = if has_counters {
            // SAFETY: `size` says the host's `HostApi` has both fields.
            unsafe { crate::Events::from_host(addr_of!((*host).count).read(), addr_of!((*host).count_ctx).read()) }
        } else {
            Default::default()
        };
        // A host before ABI 1.2 has no clock for app timers.
        let has_timers = abi::covers(size, std::mem::offset_of!(HostApi, timers_ctx) + size_of::<*const c_void>());
        let timers = if has_timers {
            // SAFETY: `size` says the host's `HostApi` has these fields.
            unsafe {
                crate::Timers::from_host(
                    addr_of!((*host).timer_start).read(),
                    addr_of!((*host).timer_cancel).read(),
                    addr_of!((*host).timers_ctx).read(),
                )
            }
        } else {
            Default::default()
        };
        if abi::covers(size, std::mem::offset_of!(HostApi, push_ctx) + size_of::<*const c_void>()) {
            // SAFETY: `size` says the host's `HostApi` has these fields.
            unsafe { crate::push::set_host(addr_of!((*host).push).read(), addr_of!((*host).push_ctx).read()) };
        }
        // A host before ABI 1.3 makes no outbound connections.
        let connector = if abi::covers(size, std::mem::offset_of!(HostApi, connect_ctx) + size_of::<*const c_void>()) {
            // SAFETY: `size` says the host's `HostApi` has these fields.
            unsafe {
                crate::Connector::from_host(addr_of!((*host).connect).read(), addr_of!((*host).connect_ctx).read())
            }
        } else {
            Default::default()
        };
        // A host before ABI 1.4 has no event bus.
        let (bus, events_database) =
            if abi::covers(size, std::mem::offset_of!(HostApi, events_database) + size_of::<StrRef>()) {
                // SAFETY: `size` says the host's `HostApi` has these fields; the string is valid
                // during this call.
                unsafe {
                    (
                        crate::Bus::from_host(
                            addr_of!((*host).emit).read(),
                            addr_of!((*host).subscribe).read(),
                            addr_of!((*host).unsubscribe).read(),
                            addr_of!((*host).events_ctx).read(),
                        ),
                        borrowed_str(addr_of!((*host).events_database).read()),
                    )
                }
            } else {
                (crate::Bus::default(), String::new())
            };
        // A host before ABI 1.2 names no server: its singletons are per app name only.
        let server_id = if abi::covers(size, std::mem::offset_of!(HostApi, server_id) + size_of::<StrRef>()) {
            // SAFETY: `size` says the host's `HostApi` has this field; its string is valid
            // during this call.
            unsafe { borrowed_str(addr_of!((*host).server_id).read()) }
        } else {
            String::new()
        };
        let settings = Settings::parse(&name, &text)?
            .with_worker(&node, pid, generation)
            .with_databases(&databases)?
            .with_events(events)
            .with_timers(timers)
            .with_connector(connector)
            .with_bus(bus, &events_database)
            .with_server_id(&server_id);
        A::start(&settings)
    }));
    match result {
        Ok(Ok(app)) => {
            // SAFETY: `app_out` is a valid out-pointer supplied by the host for this call.
            unsafe { *app_out = Box::into_raw(Box::new(app)).cast::<c_void>() };
            abi::STATUS_OK
        }
        Ok(Err(msg)) => {
            report(error, error_ctx, &msg);
            abi::STATUS_ERROR
        }
        Err(panic) => {
            report(error, error_ctx, &panic_message(panic));
            abi::STATUS_PANIC
        }
    }
}

/// Boxes an app timer's callback for the host (freed by [`timer_drop`]).
pub(crate) fn timer_context(f: crate::timers::Callback) -> *mut c_void {
    Box::into_raw(Box::new(f)).cast::<c_void>()
}

/// Runs an app timer's callback; a panic is logged here (through the host's logger) and
/// reported as `STATUS_PANIC`.
pub(crate) unsafe extern "C" fn timer_tick(ctx: *mut c_void) -> Status {
    // SAFETY: `ctx` came from `timer_context` and is not freed yet; the host runs one tick of
    // a timer at a time.
    let f = unsafe { &mut *ctx.cast::<crate::timers::Callback>() };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => abi::STATUS_OK,
        Err(panic) => {
            log::error!("timer: {}", panic_message(panic));
            abi::STATUS_PANIC
        }
    }
}

/// Frees an app timer's callback (the host calls it once, when the timer is done).
pub(crate) unsafe extern "C" fn timer_drop(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `timer_context`, and the host calls this once, last.
    let f = unsafe { Box::from_raw(ctx.cast::<crate::timers::Callback>()) };
    discard(catch_unwind(AssertUnwindSafe(move || drop(f))));
}

unsafe extern "C" fn app_drain(_app: *mut c_void) {
    discard(catch_unwind(crate::services::stop_all));
}

/// The text of a caught panic, with where it happened when known.
pub(crate) fn panic_text(payload: Box<dyn Any + Send>) -> String {
    panic_message(payload)
}

unsafe extern "C" fn stop<A: App>(app: *mut c_void) {
    // Its services first: they may use the app's state.
    discard(catch_unwind(|| crate::services::stop_and_wait(crate::services::STOP_WAIT)));
    // SAFETY: `app` came from `start::<A>` (a `Box<A>`), and the host calls `stop` once, after
    // every other call has returned, so we own it again.
    let app = unsafe { Box::from_raw(app.cast::<A>()) };
    // Two steps: a panicking stop hook must not make the app's `Drop` run during unwinding.
    discard(catch_unwind(AssertUnwindSafe(|| app.stop())));
    discard(catch_unwind(AssertUnwindSafe(move || drop(app))));
}

unsafe extern "C" fn conn_open(_app: *mut c_void, info: *const ConnInfo) -> *mut c_void {
    // The host's `ConnInfo` may be shorter than ours (an older host): read field by field, the
    // appended ones only where `size` covers them.
    // SAFETY: the host passes a valid `ConnInfo` of at least the ABI 1.0 fields, and its
    // strings, for the duration of this call.
    let (size, peer, listener, id) = unsafe {
        (
            addr_of!((*info).size).read(),
            addr_of!((*info).peer).read(),
            addr_of!((*info).listener).read(),
            addr_of!((*info).id).read(),
        )
    };
    let handle = if abi::covers(size, std::mem::offset_of!(ConnInfo, handle) + size_of::<u64>()) {
        // SAFETY: `size` says the host's `ConnInfo` has this field.
        unsafe { addr_of!((*info).handle).read() }
    } else {
        0
    };
    let (outbound, link) = if abi::covers(size, std::mem::offset_of!(ConnInfo, link) + size_of::<u64>()) {
        // SAFETY: `size` says the host's `ConnInfo` has these fields.
        unsafe { (addr_of!((*info).outbound).read() != 0, addr_of!((*info).link).read()) }
    } else {
        (false, 0)
    };
    let state = catch_unwind(AssertUnwindSafe(|| ConnState {
        // SAFETY: as above, the strings are valid during this call.
        peer: unsafe { borrowed_str(peer) },
        // SAFETY: as above.
        listener: unsafe { borrowed_str(listener) },
        id,
        handle,
        outbound,
        link,
        ..ConnState::default()
    }));
    match state {
        Ok(state) => Box::into_raw(Box::new(state)).cast::<c_void>(),
        Err(payload) => {
            discard::<()>(Err(payload));
            std::ptr::null_mut()
        }
    }
}

unsafe extern "C" fn declared_settings<A: App>(key: MessageFn, ctx: *mut c_void) -> i32 {
    let Some(keys) = A::SETTINGS else { return 0 };
    for k in keys {
        report(key, ctx, k);
    }
    1
}

unsafe extern "C" fn conn_data<A: App>(app: *mut c_void, conn: *mut c_void, io: *mut ConnIo) -> NextCode {
    // SAFETY: passed on from the host's call, with the same guarantees.
    unsafe { conn_call(app, conn, io, |app: &A, c| app.on_readable(c)) }
}

unsafe extern "C" fn conn_timer<A: App>(app: *mut c_void, conn: *mut c_void, io: *mut ConnIo) -> NextCode {
    // SAFETY: passed on from the host's call, with the same guarantees.
    unsafe { conn_call(app, conn, io, |app: &A, c| app.on_timer(c)) }
}

unsafe extern "C" fn conn_event<A: App>(
    app: *mut c_void,
    conn: *mut c_void,
    io: *mut ConnIo,
    kind: abi::EventKind,
) -> NextCode {
    let f: fn(&A, &mut Conn) -> crate::Next = match kind {
        abi::EVENT_OPEN => A::on_open,
        abi::EVENT_WRITABLE => A::on_writable,
        abi::EVENT_DRAIN => A::on_drain,
        abi::EVENT_READ_TIMEOUT => |app: &A, c: &mut Conn| {
            app.on_read_timeout(c);
            crate::Next::Close
        },
        abi::EVENT_CONNECT_FAILED => |app: &A, c: &mut Conn| {
            let reason = String::from_utf8_lossy(c.input()).into_owned();
            c.consume(c.input().len());
            app.on_connect_failed(c, &reason);
            crate::Next::Close
        },
        // A kind added after this SDK was built: nothing to do.
        _ => |_: &A, _: &mut Conn| crate::Next::KeepOpen,
    };
    // SAFETY: passed on from the host's call, with the same guarantees.
    unsafe { conn_call(app, conn, io, f) }
}

/// One call into the app for a connection (`conn_data`, `conn_timer` or `conn_event`): runs
/// `f` inside `catch_unwind`, then hands over what it wrote, the connection's timer and its
/// wishes.
///
/// # Safety
/// `app` is the live `A` from `start`; `conn` came from `conn_open` and is used by no other
/// call at the same time; `io` is valid and exclusive for the duration of the call.
unsafe fn conn_call<A: App>(
    app: *mut c_void,
    conn: *mut c_void,
    io: *mut ConnIo,
    f: impl FnOnce(&A, &mut Conn) -> crate::Next,
) -> NextCode {
    // SAFETY: `app` is the live `A` from `start`; apps are `Sync`, so shared use from several
    // threads is fine.
    let app = unsafe { &*app.cast::<A>() };
    // SAFETY: `conn` came from `conn_open`, and the host never calls twice at once for one
    // connection, so this is the only reference.
    let state = unsafe { &mut *conn.cast::<ConnState>() };
    // The host's `ConnIo` may be shorter than ours (an older host): no reference to the whole
    // struct is made; each field is read or written through a raw pointer, the appended ones
    // only where `size` covers them.
    // SAFETY: the host passes a valid, exclusive `ConnIo` of at least the ABI 1.0 fields for
    // the duration of this call; these fields are all ABI 1.0.
    let (size, flags, input_ptr, input_len, write, write_ctx, error, error_ctx) = unsafe {
        (
            addr_of!((*io).size).read(),
            addr_of!((*io).flags).read(),
            addr_of!((*io).input).read(),
            addr_of!((*io).input_len).read(),
            addr_of!((*io).write).read(),
            addr_of!((*io).write_ctx).read(),
            addr_of!((*io).error).read(),
            addr_of!((*io).error_ctx).read(),
        )
    };
    // SAFETY: the input is valid and not modified during this call.
    let input = unsafe { borrowed(StrRef { ptr: input_ptr, len: input_len }) };
    // A host before ABI 1.2 bounds no output.
    let has = |end: usize| abi::covers(size, end);
    let room_end = std::mem::offset_of!(ConnIo, output_room) + size_of::<u64>();
    let room = if has(room_end) {
        // SAFETY: `size` says the host's `ConnIo` has this field.
        usize::try_from(unsafe { addr_of!((*io).output_room).read() }).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut c = Conn::new(input, flags, state).with_room(room);
        let next = f(app, &mut c);
        let (consumed, requests) = c.finish();
        (next, consumed, requests)
    }));
    let code = match result {
        Ok((next, consumed, requests)) => {
            // SAFETY: ABI 1.0 fields of the host's exclusive `ConnIo` (see above).
            unsafe {
                addr_of_mut!((*io).consumed).write(consumed);
                addr_of_mut!((*io).requests).write(requests);
            }
            next.code()
        }
        Err(panic) => {
            report(error, error_ctx, &panic_message(panic));
            -abi::STATUS_PANIC
        }
    };
    // A host of ABI 1.0 passes a shorter `ConnIo`, without the timer.
    if has(std::mem::offset_of!(ConnIo, timer_ms) + size_of::<u64>()) {
        let ms = state.timer_ms;
        // SAFETY: `size` says the host's `ConnIo` has this field.
        unsafe { addr_of_mut!((*io).timer_ms).write(ms) };
    }
    if has(std::mem::offset_of!(ConnIo, wants) + size_of::<u32>()) {
        let wants = if state.want_writable { abi::WANT_WRITABLE } else { 0 }
            | if state.no_idle_timeout { abi::WANT_NO_IDLE_TIMEOUT } else { 0 };
        // SAFETY: `size` says the host's `ConnIo` has this field.
        unsafe { addr_of_mut!((*io).wants).write(wants) };
    }
    if !state.out.is_empty() {
        // SAFETY: the host's write callback copies the bytes before returning.
        unsafe { write(write_ctx, StrRef::from_bytes(&state.out)) };
        state.out.clear();
        if state.out.capacity() > MAX_IDLE_OUTPUT_CAPACITY {
            state.out = Vec::new();
        }
    }
    code
}

unsafe extern "C" fn conn_export<A: App>(
    app: *mut c_void,
    conn: *mut c_void,
    write: MessageFn,
    write_ctx: *mut c_void,
) -> Status {
    // SAFETY: as in `conn_data`.
    let (app, state) = unsafe { (&*app.cast::<A>(), &mut *conn.cast::<ConnState>()) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut c = Conn::new(&[], 0, state);
        app.export_session(&mut c)
    }));
    match result {
        Ok(session) => {
            if let Some(bytes) = session.filter(|b| !b.is_empty()) {
                // SAFETY: the host's callback copies the bytes before returning.
                unsafe { write(write_ctx, StrRef::from_bytes(&bytes)) };
            }
            abi::STATUS_OK
        }
        Err(panic) => {
            log::error!("export_session: {}", panic_message(panic));
            abi::STATUS_PANIC
        }
    }
}

unsafe extern "C" fn conn_import<A: App>(
    app: *mut c_void,
    conn: *mut c_void,
    session: StrRef,
    error: MessageFn,
    error_ctx: *mut c_void,
) -> Status {
    // SAFETY: as in `conn_data`; the session bytes are valid during this call.
    let (app, state, session) = unsafe { (&*app.cast::<A>(), &mut *conn.cast::<ConnState>(), borrowed(session)) };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut c = Conn::new(&[], 0, state);
        app.import_session(&mut c, session)
    }));
    match result {
        Ok(Ok(())) => abi::STATUS_OK,
        Ok(Err(reason)) => {
            report(error, error_ctx, &reason);
            abi::STATUS_ERROR
        }
        Err(panic) => {
            report(error, error_ctx, &panic_message(panic));
            abi::STATUS_PANIC
        }
    }
}

unsafe extern "C" fn conn_close<A: App>(app: *mut c_void, conn: *mut c_void) {
    // SAFETY: as in `conn_data`.
    let app = unsafe { &*app.cast::<A>() };
    // SAFETY: `conn` came from `conn_open` and the host calls this once, last.
    let mut state = unsafe { Box::from_raw(conn.cast::<ConnState>()) };
    discard(catch_unwind(AssertUnwindSafe(|| {
        let mut c = Conn::new(&[], abi::FLAG_PEER_CLOSED, &mut state);
        app.on_close(&mut c);
    })));
    // Dropping the session (a transaction rolls back here) is a step of its own, so that a
    // panicking `on_close` does not drop it during unwinding.
    discard(catch_unwind(AssertUnwindSafe(move || drop(state))));
}

/// The plugin side of the wall, driven the way the host drives it (including a host of ABI 1.0,
/// whose `ConnIo` is shorter), without a server.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::Next;
    use std::time::Duration;

    /// Echoes lines and keeps a 250 ms timer; `boom` panics with a formatted message; on its
    /// timer it says `T` and closes.
    struct Timed;

    impl App for Timed {
        const SETTINGS: Option<&'static [&'static str]> = Some(&["a", "b"]);
        fn start(_: &Settings) -> Result<Self, String> {
            Ok(Timed)
        }
        fn on_readable(&self, conn: &mut Conn) -> Next {
            conn.set_timer(Some(Duration::from_millis(250)));
            while let Some(line) = conn.take_line() {
                if line == b"boom\n" {
                    panic!("told to {}", "boom");
                }
                conn.write(line);
            }
            Next::KeepOpen
        }
        fn on_timer(&self, conn: &mut Conn) -> Next {
            conn.write(b"T");
            Next::Close
        }
        fn on_open(&self, conn: &mut Conn) -> Next {
            conn.write(b"hello\n");
            conn.want_writable(true);
            conn.lift_idle_timeout(true);
            Next::KeepOpen
        }
        fn on_writable(&self, conn: &mut Conn) -> Next {
            let room = conn.output_room();
            conn.write(&vec![b'w'; room]);
            conn.want_writable(false);
            Next::InProgress
        }
        fn on_drain(&self, conn: &mut Conn) -> Next {
            conn.write(if conn.draining() { b"bye\n" } else { b"??\n" });
            Next::Close
        }
        fn on_read_timeout(&self, conn: &mut Conn) {
            conn.write(conn.input());
        }
    }

    /// An app that declares no settings.
    struct Open;

    impl App for Open {
        fn start(_: &Settings) -> Result<Self, String> {
            Ok(Open)
        }
        fn on_readable(&self, _: &mut Conn) -> Next {
            Next::KeepOpen
        }
    }

    unsafe extern "C" fn collect(ctx: *mut c_void, bytes: StrRef) {
        // SAFETY: `ctx` is the `Vec<u8>` of the test's current call; `bytes` is valid during it.
        unsafe { (*ctx.cast::<Vec<u8>>()).extend_from_slice(borrowed(bytes)) }
    }

    /// What one call returned: the code, the output, the error text, and the `ConnIo` after.
    struct Called {
        code: NextCode,
        out: Vec<u8>,
        error: Vec<u8>,
        io: ConnIo,
    }

    /// Calls `entry` as the host does, with a `ConnIo` that says it is `size` bytes long,
    /// whose `timer_ms` and `wants` hold 777 before the call, and 2 bytes of output room.
    fn call(
        entry: unsafe extern "C" fn(*mut c_void, *mut c_void, *mut ConnIo) -> NextCode,
        conn: *mut c_void,
        input: &[u8],
        size: usize,
    ) -> Called {
        call_with(
            |app, c, io| {
                // SAFETY: as `call_with` promises.
                unsafe { entry(app, c, io) }
            },
            conn,
            input,
            size,
            0,
        )
    }

    /// Like `call`, for `conn_event` with `kind` and `flags`.
    fn event(kind: abi::EventKind, conn: *mut c_void, input: &[u8], flags: u32) -> Called {
        call_with(
            |app, c, io| {
                // SAFETY: as `call_with` promises.
                unsafe { conn_event::<Timed>(app, c, io, kind) }
            },
            conn,
            input,
            size_of::<ConnIo>(),
            flags,
        )
    }

    /// Calls `entry` with a live `Timed`, `conn`, and a `ConnIo` valid for the call.
    fn call_with(
        entry: impl FnOnce(*mut c_void, *mut c_void, *mut ConnIo) -> NextCode,
        conn: *mut c_void,
        input: &[u8],
        size: usize,
        flags: u32,
    ) -> Called {
        let (mut out, mut error) = (Vec::new(), Vec::new());
        let mut io = ConnIo {
            size: size as u32,
            flags,
            input: input.as_ptr(),
            input_len: input.len(),
            consumed: 0,
            requests: 0,
            write: collect,
            write_ctx: (&mut out as *mut Vec<u8>).cast(),
            error: collect,
            error_ctx: (&mut error as *mut Vec<u8>).cast(),
            timer_ms: 777,
            output_room: 2,
            wants: 777,
        };
        let mut app = Timed;
        // `app` and `conn` are a live `Timed` and connection state; `io` and what it points at
        // outlive the call, which is the only one on this connection.
        let code = entry((&mut app as *mut Timed).cast(), conn, &mut io);
        Called { code, out, error, io }
    }

    fn open_conn() -> *mut c_void {
        let info = ConnInfo {
            size: size_of::<ConnInfo>() as u32,
            peer: StrRef::new("p"),
            listener: StrRef::new("l"),
            id: 7,
            handle: 0,
            outbound: 0,
            link: 0,
        };
        // SAFETY: `info` is valid during the call; the app pointer is unused by `conn_open`.
        unsafe { conn_open(std::ptr::null_mut(), &info) }
    }

    fn close_conn(conn: *mut c_void) {
        let mut app = Timed;
        // SAFETY: `conn` came from `conn_open` and is closed once, last.
        unsafe { conn_close::<Timed>((&mut app as *mut Timed).cast(), conn) }
    }

    #[test]
    fn a_call_reports_consumed_input_output_and_the_timer() {
        let conn = open_conn();
        let c = call(conn_data::<Timed>, conn, b"hi\npartial", size_of::<ConnIo>());
        assert_eq!(c.code, abi::NEXT_KEEP_OPEN);
        assert_eq!(c.out, b"hi\n");
        assert_eq!((c.io.consumed, c.io.requests), (3, 1));
        assert_eq!(c.io.timer_ms, 250);
        let t = call(conn_timer::<Timed>, conn, b"partial", size_of::<ConnIo>());
        assert_eq!((t.code, t.out.as_slice()), (abi::NEXT_CLOSE, &b"T"[..]));
        close_conn(conn);
    }

    #[test]
    fn a_host_of_abi_1_0_gets_no_timer_written_past_its_conn_io() {
        let conn = open_conn();
        let size_1_0 = std::mem::offset_of!(ConnIo, timer_ms);
        let c = call(conn_data::<Timed>, conn, b"hi\n", size_1_0);
        assert_eq!(c.out, b"hi\n");
        assert_eq!(c.io.timer_ms, 777, "the field a 1.0 host does not have is left alone");
        close_conn(conn);
    }

    #[test]
    fn events_reach_their_callbacks_with_the_output_room_and_report_the_wishes() {
        let conn = open_conn();
        let open = event(abi::EVENT_OPEN, conn, b"", 0);
        assert_eq!((open.code, open.out.as_slice()), (abi::NEXT_KEEP_OPEN, &b"hello\n"[..]));
        assert_eq!(open.io.wants, abi::WANT_WRITABLE | abi::WANT_NO_IDLE_TIMEOUT);
        let writable = event(abi::EVENT_WRITABLE, conn, b"", 0);
        assert_eq!(writable.out, b"ww", "exactly the room the host gave");
        assert_eq!((writable.code, writable.io.wants), (abi::NEXT_IN_PROGRESS, abi::WANT_NO_IDLE_TIMEOUT));
        let drain = event(abi::EVENT_DRAIN, conn, b"", abi::FLAG_DRAINING);
        assert_eq!((drain.code, drain.out.as_slice()), (abi::NEXT_CLOSE, &b"bye\n"[..]));
        let late = event(abi::EVENT_READ_TIMEOUT, conn, b"GET /", 0);
        assert_eq!((late.code, late.out.as_slice()), (abi::NEXT_CLOSE, &b"GET /"[..]), "closed whatever the app says");
        let unknown = event(99, conn, b"x", 0);
        assert_eq!((unknown.code, unknown.out.len()), (abi::NEXT_KEEP_OPEN, 0), "a kind from a newer host");
        close_conn(conn);
    }

    #[test]
    fn a_host_of_abi_1_1_gets_no_wishes_written_and_bounds_no_output() {
        let conn = open_conn();
        let size_1_1 = std::mem::offset_of!(ConnIo, output_room);
        // Two lines: with a room of 2 bytes only the first would be taken, but a 1.1 host
        // passes no room.
        let c = call(conn_data::<Timed>, conn, b"hi\nho\n", size_1_1);
        assert_eq!(c.out, b"hi\nho\n");
        assert_eq!((c.io.timer_ms, c.io.wants), (250, 777), "the timer is written, the wishes are not");
        close_conn(conn);
    }

    #[test]
    fn a_panic_becomes_an_error_code_with_its_message() {
        let conn = open_conn();
        let c = call(conn_data::<Timed>, conn, b"boom\n", size_of::<ConnIo>());
        assert_eq!(c.code, -abi::STATUS_PANIC);
        let error = String::from_utf8(c.error).unwrap();
        // (The location is added by the hook `start` installs; this test process keeps its own.)
        assert!(error.starts_with("app panicked") && error.contains("told to boom"), "{error}");
        close_conn(conn);
    }

    #[test]
    fn declared_settings_are_listed_and_an_app_without_declares_none() {
        let mut keys = Vec::new();
        // SAFETY: `collect` appends to `keys`, which outlives the call.
        let declared = unsafe { declared_settings::<Timed>(collect, (&mut keys as *mut Vec<u8>).cast()) };
        assert_eq!((declared, keys.as_slice()), (1, &b"ab"[..]));
        // SAFETY: as above.
        assert_eq!(unsafe { declared_settings::<Open>(collect, (&mut keys as *mut Vec<u8>).cast()) }, 0);
    }

    #[test]
    fn the_descriptor_declares_the_abi_it_was_built_for_and_every_function() {
        let d = descriptor::<Timed>("Timed");
        assert_eq!(d.magic, abi::MAGIC);
        assert_eq!((d.abi_major, d.abi_minor), (abi::ABI_MAJOR, abi::ABI_MINOR));
        assert_eq!(d.size as usize, size_of::<AppDescriptor>());
        assert!(abi::covers(d.size, std::mem::offset_of!(AppDescriptor, declared_settings) + size_of::<usize>()));
        assert!(abi::DESCRIPTOR_SIZE_1_0 < d.size as usize);
    }

    unsafe extern "C" fn no_log(_: abi::LogLevel, _: StrRef, _: StrRef) {}

    fn host_api(major: u32) -> HostApi {
        HostApi {
            size: size_of::<HostApi>() as u32,
            abi_major: major,
            abi_minor: abi::ABI_MINOR,
            settings_toml: StrRef::new("a = 1"),
            app_name: StrRef::new("timed"),
            node_id: StrRef::new("n"),
            worker_pid: 1,
            generation: 1,
            log_level: 0,
            log: no_log,
            databases_toml: StrRef::new(""),
            count: no_count,
            count_ctx: std::ptr::null(),
            timer_start: no_timer_start,
            timer_cancel: no_timer_cancel,
            timers_ctx: std::ptr::null(),
            push: no_push,
            push_ctx: std::ptr::null(),
            server_id: StrRef::new("/run/test.sock"),
            connect: no_connect,
            connect_ctx: std::ptr::null(),
            emit: no_emit,
            subscribe: no_subscribe,
            unsubscribe: no_unsubscribe,
            events_ctx: std::ptr::null(),
            events_database: StrRef::new(""),
        }
    }

    unsafe extern "C" fn no_count(_: *const c_void, _: StrRef, _: u64) {}

    unsafe extern "C" fn no_timer_start(
        _: *const c_void,
        _: u64,
        _: u64,
        _: abi::TimerTickFn,
        drop: abi::TimerDropFn,
        ctx: *mut c_void,
    ) -> u64 {
        // SAFETY: the timer is done at once: freed exactly once, here.
        unsafe { drop(ctx) };
        1
    }

    unsafe extern "C" fn no_timer_cancel(_: *const c_void, _: u64) {}

    unsafe extern "C" fn no_connect(
        _: *const c_void,
        _: StrRef,
        _: u64,
        _: u64,
        _: abi::MessageFn,
        _: *mut c_void,
    ) -> u64 {
        0
    }

    unsafe extern "C" fn no_emit(
        _: *const c_void,
        _: StrRef,
        _: StrRef,
        _: u32,
        _: abi::MessageFn,
        _: *mut c_void,
    ) -> abi::Status {
        abi::STATUS_ERROR
    }

    unsafe extern "C" fn no_subscribe(
        _: *const c_void,
        _: StrRef,
        _: abi::EventDeliverFn,
        drop: abi::TimerDropFn,
        ctx: *mut c_void,
    ) -> u64 {
        // SAFETY: the subscription ends at once: freed exactly once, here.
        unsafe { drop(ctx) };
        1
    }

    unsafe extern "C" fn no_unsubscribe(_: *const c_void, _: u64) {}

    unsafe extern "C" fn no_push(_: *const c_void, _: u64, _: StrRef, _: u32) -> abi::PushStatus {
        abi::PUSH_CLOSED
    }

    #[test]
    fn a_timer_callback_runs_reports_a_panic_and_is_freed_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let ctx = timer_context(Box::new(|| {
            if RUNS.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("second run");
            }
        }));
        // SAFETY: `ctx` came from `timer_context`; ticks one at a time, then freed once.
        unsafe {
            assert_eq!(timer_tick(ctx), abi::STATUS_OK);
            assert_eq!(timer_tick(ctx), abi::STATUS_PANIC);
            assert_eq!(timer_tick(ctx), abi::STATUS_OK, "a panic does not end it");
            timer_drop(ctx);
        }
        assert_eq!(RUNS.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn start_builds_the_app_and_refuses_another_abi_major() {
        let (mut app, mut error) = (std::ptr::null_mut(), Vec::new());
        let host = host_api(abi::ABI_MAJOR);
        // SAFETY: `host`, `app` and `error` outlive the call.
        let status = unsafe { start::<Timed>(&host, &mut app, collect, (&mut error as *mut Vec<u8>).cast()) };
        assert_eq!(status, abi::STATUS_OK, "{}", String::from_utf8_lossy(&error));
        // SAFETY: `app` came from `start::<Timed>` and is stopped once.
        unsafe { stop::<Timed>(app) };
        let host = host_api(abi::ABI_MAJOR + 1);
        // SAFETY: as above.
        let status = unsafe { start::<Timed>(&host, &mut app, collect, (&mut error as *mut Vec<u8>).cast()) };
        assert_eq!(status, abi::STATUS_ERROR);
        assert!(String::from_utf8_lossy(&error).contains("this app was built for ABI 1"));
    }
}
