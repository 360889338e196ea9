//! Loads an app plugin, checks its descriptor before running any of its code, and wraps its
//! `extern "C"` functions in a safe API.
//!
//! Invariants: no raw symbol or pointer from a plugin leaves this module; every check happens
//! before the first call into the plugin; a library is never unloaded (`dlclose` of a Rust
//! library runs thread-local destructors in unmapped code), so it outlives everything taken
//! from it.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::path::Path;

use fdt_sdk::abi::{self, AppDescriptor, ConnInfo, ConnIo, HostApi, StrRef};

/// What a worker tells an app at start.
pub struct StartContext<'a> {
    pub app_name: &'a str,
    pub settings_toml: &'a str,
    pub node_id: &'a str,
    /// The config's `[database.*]` tables as TOML text.
    pub databases_toml: &'a str,
    pub worker_pid: u32,
    pub generation: u64,
    /// `FILE:LINE` of each of the app's settings (`AppConfig::setting_lines`), for errors.
    pub setting_lines: &'a std::collections::BTreeMap<String, String>,
    /// The app's place in the worker's apps (for its timers).
    pub app_index: usize,
    /// What names the server (`HostApi::server_id`): its control socket's path.
    pub server_id: &'a str,
    /// `[events] database` (`HostApi::events_database`), or empty.
    pub events_database: &'a str,
}

/// Facts from a plugin's descriptor (shown by `fdtserver check`).
#[derive(Clone, Debug)]
pub struct Describe {
    pub app_type: String,
    pub sdk_version: String,
    pub rustc_version: String,
    pub abi_minor: u32,
}

/// A started app of a loaded plugin.
pub struct App {
    name: String,
    /// The app's event counters (see `fdt_sdk::Events`); never freed (the plugin may hold
    /// the pointer until the process exits).
    pub events: &'static AppEvents,
    table: Table,
    app: *mut c_void,
    stopped: std::sync::atomic::AtomicBool,
    /// Never dropped: see the module invariants.
    _library: ManuallyDrop<libloading::os::unix::Library>,
    pub describe: Describe,
}

// SAFETY: the app value behind `app` is `Send + Sync` (required by `fdt_sdk::App`), and the
// table holds only function pointers and owned strings.
unsafe impl Send for App {}
// SAFETY: as above.
unsafe impl Sync for App {}

/// One connection's state on the plugin side. Not `Clone`: exactly one handle per connection,
/// consumed by [`App::close_conn`].
pub struct ConnHandle(*mut c_void);

// SAFETY: the plugin-side connection state is only used by one thread at a time (the worker
// hands a connection to one handler thread at a time), and it is `Send` on the plugin side.
unsafe impl Send for ConnHandle {}

/// One call into an app for a connection: what it is given, and the connection's state an app
/// of an older ABI does not report back (kept as it was).
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// Unconsumed input.
    pub input: &'a [u8],
    /// `fdt_sdk::abi::FLAG_*`.
    pub flags: u32,
    /// Bytes the app may write before the output is full; `u64::MAX`: no bound.
    pub room: u64,
    /// The connection's timer and wishes as the app left them last time.
    pub timer_ms: u64,
    pub wants: u32,
}

impl DataOutcome {
    /// What a call the app does not implement leaves: nothing consumed, nothing changed.
    fn unchanged(call: Call<'_>) -> DataOutcome {
        DataOutcome::Next {
            next: fdt_sdk::Next::KeepOpen,
            consumed: 0,
            requests: 0,
            timer_ms: call.timer_ms,
            wants: call.wants,
        }
    }
}

/// What an app did with new input.
#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// See `fdt_sdk::Next`; `consumed` bytes of input were used, `requests` completed;
    /// `timer_ms`: the connection's timer as the app left it (0: none).
    /// `wants`: the `fdt_sdk::abi::WANT_*` bits as the app left them.
    Next { next: fdt_sdk::Next, consumed: usize, requests: u64, timer_ms: u64, wants: u32 },
    /// The app panicked or failed; the connection must be closed.
    Failed(String),
}

unsafe extern "C" fn host_log(level: abi::LogLevel, target: StrRef, msg: StrRef) {
    // SAFETY: the plugin passes strings valid for the duration of this call.
    let (target, msg) = unsafe { (lossy(target), lossy(msg)) };
    crate::logging::log_from_app(level, &target, &msg);
}

/// An app's event counters, filled through the ABI's `count` callback from any thread.
#[derive(Default)]
pub struct AppEvents {
    counts: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl AppEvents {
    /// Every counter and its total so far.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Counters per app beyond this many names are dropped: an app that counts unbounded names
/// (ids, say) must not grow the worker's memory and the metrics without limit.
const MAX_EVENT_NAMES: usize = 256;

/// An app timer's callback as the plugin gave it (`HostApi::timer_start`): run by one thread at
/// a time, and freed by the plugin exactly once, when this is dropped.
pub struct TimerCallback {
    tick: abi::TimerTickFn,
    drop: abi::TimerDropFn,
    ctx: *mut c_void,
}

// SAFETY: the plugin's timer context is `Send` on its side (the SDK requires `Send` closures),
// and the host uses it from one thread at a time (`&mut self`, or the drop).
unsafe impl Send for TimerCallback {}

impl TimerCallback {
    /// Runs the tick; false when the app's code panicked (the plugin logged why).
    pub fn tick(&mut self) -> bool {
        // SAFETY: `ctx` is live until `drop`, which has not run (we own it), and no other
        // thread uses it at the same time.
        unsafe { (self.tick)(self.ctx) == abi::STATUS_OK }
    }
}

impl Drop for TimerCallback {
    fn drop(&mut self) {
        // SAFETY: dropped once; `ctx` is not used after this.
        unsafe { (self.drop)(self.ctx) }
    }
}

unsafe extern "C" fn host_timer_start(
    ctx: *const c_void,
    delay_ms: u64,
    every_ms: u64,
    tick: abi::TimerTickFn,
    drop: abi::TimerDropFn,
    tick_ctx: *mut c_void,
) -> u64 {
    // SAFETY: `ctx` is the app index we leaked for this app (valid forever).
    let app = unsafe { *ctx.cast::<usize>() };
    crate::app_timers::start(app, delay_ms, every_ms, TimerCallback { tick, drop, ctx: tick_ctx })
}

unsafe extern "C" fn host_timer_cancel(_ctx: *const c_void, id: u64) {
    crate::app_timers::cancel(id);
}

/// An event subscription's callback as the plugin gave it (`HostApi::subscribe`): called by one
/// thread at a time, and freed by the plugin exactly once, when this is dropped.
pub struct EventCallback {
    deliver: abi::EventDeliverFn,
    drop: abi::TimerDropFn,
    ctx: *mut c_void,
}

// SAFETY: the plugin's subscription context is `Send + Sync` on its side (the SDK requires
// such closures); the host calls it from one thread at a time (`worker::events`).
unsafe impl Send for EventCallback {}
// SAFETY: as above.
unsafe impl Sync for EventCallback {}

impl EventCallback {
    /// Delivers one event; false when the app's code panicked (the plugin logged why).
    pub fn call(&self, topic: &[u8], payload: &[u8]) -> bool {
        // SAFETY: `ctx` is live until `drop`, which has not run (we are borrowed); the plugin
        // copies what it keeps of the borrowed bytes.
        unsafe { (self.deliver)(self.ctx, StrRef::from_bytes(topic), StrRef::from_bytes(payload)) == abi::STATUS_OK }
    }
}

impl Drop for EventCallback {
    fn drop(&mut self) {
        // SAFETY: dropped once; `ctx` is not used after this.
        unsafe { (self.drop)(self.ctx) }
    }
}

unsafe extern "C" fn host_emit(
    ctx: *const c_void,
    topic: StrRef,
    payload: StrRef,
    flags: u32,
    error: abi::MessageFn,
    error_ctx: *mut c_void,
) -> abi::Status {
    // SAFETY: `ctx` is the app index we leaked for this app; the bytes are valid during this call.
    let (_app, topic, payload) = unsafe { (*ctx.cast::<usize>(), bytes_of(topic), bytes_of(payload)) };
    // No panic may cross into the plugin's frames.
    let emitted = std::panic::catch_unwind(|| crate::worker::events::emit(topic, payload, flags));
    let reason = match emitted {
        Ok(Ok(())) => return abi::STATUS_OK,
        Ok(Err(reason)) => reason,
        Err(_) => "the server failed to emit (see its log)".to_string(),
    };
    // SAFETY: the plugin passed this callback and context for the duration of this call.
    unsafe { error(error_ctx, StrRef::new(&reason)) };
    abi::STATUS_ERROR
}

unsafe extern "C" fn host_subscribe(
    ctx: *const c_void,
    pattern: StrRef,
    deliver: abi::EventDeliverFn,
    drop: abi::TimerDropFn,
    sub_ctx: *mut c_void,
) -> u64 {
    let callback = EventCallback { deliver, drop, ctx: sub_ctx };
    // SAFETY: `ctx` is the app index we leaked for this app; the pattern is valid during this call.
    let (app, pattern) = unsafe { (*ctx.cast::<usize>(), bytes_of(pattern)) };
    crate::worker::events::subscribe(app, pattern, callback)
}

unsafe extern "C" fn host_unsubscribe(_ctx: *const c_void, id: u64) {
    crate::worker::events::unsubscribe(id);
}

/// What a push did (see `fdt_sdk::abi::PushStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Ok,
    Full,
    Closed,
}

unsafe extern "C" fn host_push(_ctx: *const c_void, handle: u64, bytes: StrRef, close: u32) -> abi::PushStatus {
    // SAFETY: the plugin passes bytes valid for the duration of this call.
    let bytes = unsafe { bytes_of(bytes) };
    // No panic may cross into the plugin's frames.
    let pushed = std::panic::catch_unwind(|| crate::worker::push::push(handle, bytes, close != 0));
    match pushed {
        Ok(PushOutcome::Ok) => abi::PUSH_OK,
        Ok(PushOutcome::Full) => abi::PUSH_FULL,
        Ok(PushOutcome::Closed) | Err(_) => abi::PUSH_CLOSED,
    }
}

unsafe extern "C" fn host_connect(
    ctx: *const c_void,
    addr: StrRef,
    link: u64,
    timeout_ms: u64,
    error: abi::MessageFn,
    error_ctx: *mut c_void,
) -> u64 {
    // SAFETY: `ctx` is null or the app index we leaked for this app (valid forever); the
    // address is valid during this call.
    let (app, addr) = unsafe { ((!ctx.is_null()).then(|| *ctx.cast::<usize>()), lossy(addr)) };
    // No panic may cross into the plugin's frames.
    let made = std::panic::catch_unwind(|| crate::worker::outbound::connect(app, &addr, link, timeout_ms));
    let reason = match made {
        Ok(Ok(handle)) => return handle,
        Ok(Err(reason)) => reason,
        Err(_) => format!("cannot connect to {addr}: the server failed (see its log)"),
    };
    // SAFETY: the plugin passed this callback and context for the duration of this call.
    unsafe { error(error_ctx, StrRef::new(&reason)) };
    0
}

unsafe extern "C" fn host_count(ctx: *const c_void, name: StrRef, delta: u64) {
    // SAFETY: `ctx` is the `AppEvents` we leaked for this app (valid forever); the name is
    // valid during this call.
    let (events, name) = unsafe { (&*ctx.cast::<AppEvents>(), bytes_of(name)) };
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
    if !valid {
        return;
    }
    let name = String::from_utf8_lossy(name);
    let mut counts = events.counts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(total) = counts.get_mut(name.as_ref()) {
        *total = total.saturating_add(delta);
    } else if counts.len() < MAX_EVENT_NAMES {
        counts.insert(name.into_owned(), delta);
    }
}

unsafe extern "C" fn collect_message(ctx: *mut c_void, msg: StrRef) {
    // SAFETY: `ctx` is the `&mut String` we passed for this call; `msg` is valid during it.
    unsafe { (*ctx.cast::<String>()).push_str(&lossy(msg)) };
}

unsafe extern "C" fn append_output(ctx: *mut c_void, bytes: StrRef) {
    // SAFETY: `ctx` is the `&mut Vec<u8>` we passed for this call; `bytes` is valid during it.
    unsafe { (*ctx.cast::<Vec<u8>>()).extend_from_slice(bytes_of(bytes)) };
}

/// # Safety
/// `s` must point at `s.len` readable bytes for the duration of the borrow.
unsafe fn bytes_of<'a>(s: StrRef) -> &'a [u8] {
    if s.len == 0 || s.ptr.is_null() {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(s.ptr, s.len) }
}

/// # Safety
/// As for [`bytes_of`].
unsafe fn lossy(s: StrRef) -> String {
    // SAFETY: guaranteed by the caller.
    String::from_utf8_lossy(unsafe { bytes_of(s) }).into_owned()
}

/// The plugin's functions and facts, copied out of its descriptor after the checks. Fields
/// appended to the ABI after 1.0 are `None` when the plugin's descriptor is too old to have
/// them: the descriptor is only ever read through raw pointers within its declared size.
struct Table {
    start: unsafe extern "C" fn(*const HostApi, *mut *mut c_void, abi::MessageFn, *mut c_void) -> abi::Status,
    stop: unsafe extern "C" fn(*mut c_void),
    conn_open: unsafe extern "C" fn(*mut c_void, *const ConnInfo) -> *mut c_void,
    conn_data: unsafe extern "C" fn(*mut c_void, *mut c_void, *mut ConnIo) -> abi::NextCode,
    conn_close: unsafe extern "C" fn(*mut c_void, *mut c_void),
    /// ABI 1.1.
    conn_timer: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut ConnIo) -> abi::NextCode>,
    /// ABI 1.1.
    declared_settings: Option<unsafe extern "C" fn(abi::MessageFn, *mut c_void) -> i32>,
    /// ABI 1.2.
    app_drain: Option<unsafe extern "C" fn(*mut c_void)>,
    /// ABI 1.2.
    conn_event: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, *mut ConnIo, abi::EventKind) -> abi::NextCode>,
    /// ABI 1.5: the handoff of connections on a reload.
    handoff: Option<Handoff>,
    describe: Describe,
}

/// ABI 1.5: what an app says about handing its connections to the next generation.
struct Handoff {
    /// Its protocol; `None`: never handed off.
    protocol: Option<String>,
    idle_close_harmless: bool,
    export: unsafe extern "C" fn(*mut c_void, *mut c_void, abi::MessageFn, *mut c_void) -> abi::Status,
    import: unsafe extern "C" fn(*mut c_void, *mut c_void, StrRef, abi::MessageFn, *mut c_void) -> abi::Status,
}

/// Opens the library and checks its descriptor; runs no plugin code but its ELF initialisers.
fn open(path: &Path) -> Result<(libloading::os::unix::Library, Table), String> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: loading a library runs its ELF initialisers; that is the point of loading a
    // plugin. RTLD_NOW makes a missing symbol fail here rather than at first call.
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        // libloading keeps dlerror()'s text (the useful part) in the error's source.
        let detail = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
        format!("cannot load the plugin: {detail}")
    })?;
    // SAFETY: we only take the address of the symbol here; it is read after the checks below.
    let symbol = unsafe { library.get::<*const AppDescriptor>(abi::DESCRIPTOR_SYMBOL.as_bytes()) }.map_err(|_| {
        format!("not an fdtserver app: no `{}` symbol (use fdt_sdk::export_app!)", abi::DESCRIPTOR_SYMBOL)
    })?;
    let ptr: *const AppDescriptor = *symbol;
    // SAFETY: the symbol names a static of at least the fixed header (magic, versions, size):
    // every version of the ABI starts with these fields, so reading them is in bounds.
    let (magic, major, minor, size) = unsafe {
        (
            std::ptr::addr_of!((*ptr).magic).read_unaligned(),
            std::ptr::addr_of!((*ptr).abi_major).read_unaligned(),
            std::ptr::addr_of!((*ptr).abi_minor).read_unaligned(),
            std::ptr::addr_of!((*ptr).size).read_unaligned(),
        )
    };
    if magic != abi::MAGIC {
        return Err(format!("not an fdtserver app: `{}` has the wrong magic bytes", abi::DESCRIPTOR_SYMBOL));
    }
    if major != abi::ABI_MAJOR {
        return Err(format!(
            "plugin ABI {major}.{minor} is not supported by this server (ABI {}.{}); rebuild the app against fdt-sdk {}",
            abi::ABI_MAJOR,
            abi::ABI_MINOR,
            abi::SDK_VERSION
        ));
    }
    if (size as usize) < abi::DESCRIPTOR_SIZE_1_0 {
        return Err(format!(
            "plugin descriptor is {size} bytes, smaller than the {} bytes of ABI {major}.0: corrupt or incompatible build",
            abi::DESCRIPTOR_SIZE_1_0
        ));
    }
    let ends = |offset: usize| abi::covers(size, offset + size_of::<usize>());
    let timer_end = std::mem::offset_of!(AppDescriptor, conn_timer);
    let settings_end = std::mem::offset_of!(AppDescriptor, declared_settings);
    let event_end = std::mem::offset_of!(AppDescriptor, conn_event);
    let drain_end = std::mem::offset_of!(AppDescriptor, app_drain);
    let import_end = std::mem::offset_of!(AppDescriptor, conn_import);
    // SAFETY: magic, major version and size checked: the static has the ABI 1.0 layout we
    // compiled up to `DESCRIPTOR_SIZE_1_0`, and a later field is read only when the declared
    // size covers it. The static lives as long as the library (forever, see invariants) and is
    // immutable, and its strings are 'static data of the plugin.
    let table = unsafe {
        Table {
            start: std::ptr::addr_of!((*ptr).start).read(),
            stop: std::ptr::addr_of!((*ptr).stop).read(),
            conn_open: std::ptr::addr_of!((*ptr).conn_open).read(),
            conn_data: std::ptr::addr_of!((*ptr).conn_data).read(),
            conn_close: std::ptr::addr_of!((*ptr).conn_close).read(),
            conn_timer: ends(timer_end).then(|| std::ptr::addr_of!((*ptr).conn_timer).read()),
            declared_settings: ends(settings_end).then(|| std::ptr::addr_of!((*ptr).declared_settings).read()),
            conn_event: ends(event_end).then(|| std::ptr::addr_of!((*ptr).conn_event).read()),
            app_drain: ends(drain_end).then(|| std::ptr::addr_of!((*ptr).app_drain).read()),
            handoff: ends(import_end).then(|| {
                let protocol = lossy(std::ptr::addr_of!((*ptr).protocol).read());
                Handoff {
                    protocol: (!protocol.is_empty()).then_some(protocol),
                    idle_close_harmless: std::ptr::addr_of!((*ptr).idle_close_harmless).read() != 0,
                    export: std::ptr::addr_of!((*ptr).conn_export).read(),
                    import: std::ptr::addr_of!((*ptr).conn_import).read(),
                }
            }),
            describe: Describe {
                app_type: lossy(std::ptr::addr_of!((*ptr).app_type).read()),
                sdk_version: lossy(std::ptr::addr_of!((*ptr).sdk_version).read()),
                rustc_version: lossy(std::ptr::addr_of!((*ptr).rustc_version).read()),
                abi_minor: minor,
            },
        }
    };
    // SAFETY: as above, a 'static string of the descriptor.
    let target = unsafe { lossy(std::ptr::addr_of!((*ptr).target).read()) };
    if target != abi::TARGET {
        return Err(format!("plugin was built for {target}, this server runs on {}", abi::TARGET));
    }
    Ok((library, table))
}

/// Refuses settings the app does not declare (see `fdt_sdk::App::SETTINGS`), each with where
/// it is written. Runs no app code.
fn check_settings(table: &Table, ctx: &StartContext<'_>) -> Result<(), String> {
    let Some(declared_settings) = table.declared_settings else { return Ok(()) };
    let mut declared: Vec<String> = Vec::new();
    // SAFETY: the plugin's function only passes static names to our callback, which copies
    // them into `declared` (the context) before returning.
    let declares = unsafe { declared_settings(collect_name, (&mut declared as *mut Vec<String>).cast()) };
    if declares == 0 {
        return Ok(());
    }
    let given: toml::Table = ctx.settings_toml.parse().unwrap_or_default();
    let unknown: Vec<String> = given
        .keys()
        .filter(|k| !declared.contains(k))
        .map(|k| {
            let at = ctx.setting_lines.get(k).map(|l| format!("{l}: ")).unwrap_or_default();
            let takes = if declared.is_empty() { "no settings".to_string() } else { declared.join(", ") };
            format!("{at}[app.{}]: unknown setting `{k}` (app {} takes: {takes})", ctx.app_name, ctx.app_name)
        })
        .collect();
    if unknown.is_empty() { Ok(()) } else { Err(unknown.join("; ")) }
}

unsafe extern "C" fn collect_name(ctx: *mut c_void, name: StrRef) {
    // SAFETY: `ctx` is the `&mut Vec<String>` passed by `check_settings` for this call; `name`
    // is valid during it.
    unsafe { (*ctx.cast::<Vec<String>>()).push(lossy(name)) };
}

impl App {
    /// Loads the plugin at `path` and starts its app. Errors are one line, without the path
    /// (the caller names the app and file).
    pub fn start(path: &Path, ctx: &StartContext<'_>) -> Result<App, String> {
        let (library, table) = open(path)?;
        check_settings(&table, ctx)?;
        let describe = table.describe.clone();
        if describe.rustc_version != abi::RUSTC_VERSION {
            log::debug!(
                "app {}: plugin built by {}, server by {} (fine: the boundary is a C ABI)",
                ctx.app_name,
                describe.rustc_version,
                abi::RUSTC_VERSION
            );
        }
        let events: &'static AppEvents = Box::leak(Box::default());
        let app_index = (Box::leak(Box::new(ctx.app_index)) as *const usize).cast();
        let host = HostApi {
            size: size_of::<HostApi>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            settings_toml: StrRef::new(ctx.settings_toml),
            app_name: StrRef::new(ctx.app_name),
            node_id: StrRef::new(ctx.node_id),
            worker_pid: ctx.worker_pid,
            generation: ctx.generation,
            log_level: log::max_level() as u32,
            log: host_log,
            databases_toml: StrRef::new(ctx.databases_toml),
            count: host_count,
            count_ctx: (events as *const AppEvents).cast(),
            timer_start: host_timer_start,
            timer_cancel: host_timer_cancel,
            timers_ctx: app_index,
            push: host_push,
            push_ctx: std::ptr::null(),
            server_id: StrRef::new(ctx.server_id),
            connect: host_connect,
            connect_ctx: app_index,
            emit: host_emit,
            subscribe: host_subscribe,
            unsubscribe: host_unsubscribe,
            events_ctx: app_index,
            events_database: StrRef::new(ctx.events_database),
        };
        let mut app: *mut c_void = std::ptr::null_mut();
        let mut error = String::new();
        // SAFETY: the descriptor passed its checks; `host`, `app` and `error` outlive the call.
        let status = crate::worker::outbound::starting(|| unsafe {
            (table.start)(&host, &mut app, collect_message, (&mut error as *mut String).cast())
        });
        match status {
            abi::STATUS_OK if !app.is_null() => Ok(App {
                name: ctx.app_name.to_string(),
                events,
                table,
                app,
                stopped: std::sync::atomic::AtomicBool::new(false),
                _library: ManuallyDrop::new(library),
                describe,
            }),
            abi::STATUS_PANIC => Err(format!("the app's start panicked: {error}")),
            _ if error.is_empty() => Err(format!("the app's start failed (status {status})")),
            _ => Err(format!("the app's start failed: {error}")),
        }
    }

    /// Loads the plugin only to read its descriptor (for `fdtserver check`).
    pub fn inspect(path: &Path) -> Result<Describe, String> {
        let (library, table) = open(path)?;
        std::mem::forget(library);
        Ok(table.describe)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the app's state for a new connection; `None` if the app failed to.
    /// `handle`: what names it for pushes (its token); `outbound`: for a connection the app
    /// made, the link its connect named.
    pub fn open_conn(
        &self,
        peer: &str,
        listener: &str,
        id: u64,
        handle: u64,
        outbound: Option<u64>,
    ) -> Option<ConnHandle> {
        let info = ConnInfo {
            size: size_of::<ConnInfo>() as u32,
            peer: StrRef::new(peer),
            listener: StrRef::new(listener),
            id,
            handle,
            outbound: u32::from(outbound.is_some()),
            link: outbound.unwrap_or(0),
        };
        // SAFETY: `app` is live (not stopped), `info` outlives the call.
        let conn = unsafe { (self.table.conn_open)(self.app, &info) };
        (!conn.is_null()).then_some(ConnHandle(conn))
    }

    /// Offers `input` to the app; what it writes is appended to `output`. `room`: how much it
    /// may write before the connection's output is full (`u64::MAX`: no bound).
    pub fn on_data(&self, conn: &mut ConnHandle, call: Call<'_>, output: &mut Vec<u8>) -> DataOutcome {
        let entry = self.table.conn_data;
        // SAFETY: `conn_data` has the signature `call_with` expects.
        self.call_with(conn, call, output, |app, c, io| unsafe { entry(app, c, io) })
    }

    /// Tells the app that the connection's timer ran out (`input`: the partial request
    /// buffered, if any). An app without timers (ABI 1.0) keeps the connection as it is.
    pub fn on_timer(&self, conn: &mut ConnHandle, call: Call<'_>, output: &mut Vec<u8>) -> DataOutcome {
        match self.table.conn_timer {
            // SAFETY: as in `on_data`.
            Some(entry) => self.call_with(conn, call, output, |app, c, io| unsafe { entry(app, c, io) }),
            None => DataOutcome::unchanged(call),
        }
    }

    /// Tells the app about an event of kind `kind` (`fdt_sdk::abi::EVENT_*`). An app built
    /// before ABI 1.2 keeps the connection as it is.
    pub fn on_event(
        &self,
        conn: &mut ConnHandle,
        kind: abi::EventKind,
        call: Call<'_>,
        output: &mut Vec<u8>,
    ) -> DataOutcome {
        match self.table.conn_event {
            // SAFETY: as in `on_data`.
            Some(entry) => self.call_with(conn, call, output, |app, c, io| unsafe { entry(app, c, io, kind) }),
            None => DataOutcome::unchanged(call),
        }
    }

    /// Tells the app that its worker drains: its background services are asked to stop (ABI
    /// 1.2; an older plugin has none).
    pub fn drain(&self) {
        if let Some(app_drain) = self.table.app_drain {
            // SAFETY: `app` is live (not stopped); the function only signals the app's threads.
            unsafe { app_drain(self.app) }
        }
    }

    /// The app's protocol for handoffs (ABI 1.5); `None`: its connections are never handed off.
    pub fn protocol(&self) -> Option<&str> {
        self.table.handoff.as_ref().and_then(|h| h.protocol.as_deref())
    }

    /// True when a drain may close an idle connection it cannot hand off (ABI 1.5, the app's
    /// word; an app built before says nothing, and keeps the behaviour it was built for).
    pub fn idle_close_harmless(&self) -> bool {
        self.table.handoff.as_ref().is_none_or(|h| h.idle_close_harmless)
    }

    /// The session of a connection that is handed off (`conn_export`).
    pub fn export_conn(&self, conn: &mut ConnHandle) -> Result<Vec<u8>, String> {
        let Some(handoff) = &self.table.handoff else { return Err("the app hands off no connection".into()) };
        let mut session = Vec::new();
        // SAFETY: `app` is live; `conn` is a live handle used by this thread only; `session`
        // outlives the call.
        let status =
            unsafe { (handoff.export)(self.app, conn.0, append_output, (&mut session as *mut Vec<u8>).cast()) };
        if status == abi::STATUS_OK { Ok(session) } else { Err(format!("export_session failed (status {status})")) }
    }

    /// Restores the session of a connection handed over (`conn_import`).
    pub fn import_conn(&self, conn: &mut ConnHandle, session: &[u8]) -> Result<(), String> {
        let Some(handoff) = &self.table.handoff else { return Err("the app takes no connection".into()) };
        let mut error = String::new();
        // SAFETY: as in `export_conn`; the session bytes and `error` outlive the call.
        let status = unsafe {
            (handoff.import)(
                self.app,
                conn.0,
                StrRef::from_bytes(session),
                collect_message,
                (&mut error as *mut String).cast(),
            )
        };
        match status {
            abi::STATUS_OK => Ok(()),
            _ if error.is_empty() => Err(format!("import_session failed (status {status})")),
            _ => Err(error),
        }
    }

    /// True when the plugin knows `conn_event` (ABI 1.2): greetings, producers, drain news.
    pub fn has_events(&self) -> bool {
        self.table.conn_event.is_some()
    }

    /// Calls one of the app's connection functions through `entry` (which must be safe to call
    /// with this app's live pointer, a live connection handle used by this thread only, and a
    /// valid `ConnIo`).
    fn call_with(
        &self,
        conn: &mut ConnHandle,
        call: Call<'_>,
        output: &mut Vec<u8>,
        entry: impl FnOnce(*mut c_void, *mut c_void, *mut ConnIo) -> abi::NextCode,
    ) -> DataOutcome {
        let mut error = String::new();
        let mut io = ConnIo {
            size: size_of::<ConnIo>() as u32,
            flags: call.flags,
            input: call.input.as_ptr(),
            input_len: call.input.len(),
            consumed: 0,
            requests: 0,
            write: append_output,
            write_ctx: (output as *mut Vec<u8>).cast(),
            error: collect_message,
            error_ctx: (&mut error as *mut String).cast(),
            // What an app that does not write these (ABI 1.0, 1.1) leaves.
            timer_ms: call.timer_ms,
            output_room: call.room,
            wants: call.wants,
        };
        // `conn`, `io`, the input, `output` and `error` outlive the call.
        let code = entry(self.app, conn.0, &mut io);
        let next = match code {
            abi::NEXT_KEEP_OPEN => fdt_sdk::Next::KeepOpen,
            abi::NEXT_IN_PROGRESS => fdt_sdk::Next::InProgress,
            abi::NEXT_CLOSE => fdt_sdk::Next::Close,
            _ if error.is_empty() => {
                return DataOutcome::Failed(format!("app failed (code {code})"));
            }
            _ => return DataOutcome::Failed(error),
        };
        if io.consumed > call.input.len() {
            return DataOutcome::Failed(format!("app consumed {} bytes of {}", io.consumed, call.input.len()));
        }
        DataOutcome::Next { next, consumed: io.consumed, requests: io.requests, timer_ms: io.timer_ms, wants: io.wants }
    }

    /// Tells the app the connection is gone and frees its state.
    pub fn close_conn(&self, conn: ConnHandle) {
        // SAFETY: `conn` is a live handle of this app, consumed here, so never used again.
        unsafe { (self.table.conn_close)(self.app, conn.0) }
    }

    /// Runs the app's stop hook and frees it; later calls do nothing. The caller must have
    /// closed every connection and must make no other call into this app afterwards.
    pub fn stop(&self) {
        use std::sync::atomic::Ordering;
        if !self.stopped.swap(true, Ordering::SeqCst) {
            // SAFETY: `app` is live (first stop) and, by the caller's contract, no other call
            // into it is running or will be made.
            unsafe { (self.table.stop)(self.app) }
        }
    }
}
