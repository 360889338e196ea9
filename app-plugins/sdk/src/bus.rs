//! Events: emit `(topic, payload)` to every worker of the server (and other servers sharing the
//! `[events]` database), and subscribe to topic patterns.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use crate::abi;

/// Why an emit or a subscribe was refused: a bad topic or pattern, a payload too large, no bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitError(pub(crate) String);

impl std::fmt::Display for EmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EmitError {}

/// A subscription, to end with [`Bus::unsubscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

type Deliver = dyn Fn(&str, &[u8]) + Send + Sync;
type HostEmit = unsafe extern "C" fn(*const c_void, abi::StrRef, abi::StrRef, u32, abi::MessageFn, *mut c_void) -> i32;
type HostSubscribe =
    unsafe extern "C" fn(*const c_void, abi::StrRef, abi::EventDeliverFn, abi::TimerDropFn, *mut c_void) -> u64;
type HostUnsubscribe = unsafe extern "C" fn(*const c_void, u64);

/// The server's event bus, for this app: get it from [`Settings::bus`](crate::Settings::bus)
/// (cheap to clone; keep it).
///
/// [`Bus::emit`] sends an event to the subscriptions of every worker of the server, this one
/// included, and with `[events] database = "NAME"` in the config, of every server sharing that
/// PostgreSQL database. Delivery is at most once per subscription, in emit order per emitter
/// (between servers, an event of a transaction travels with its commit and may overtake plain
/// emits made just before it), from the worker's event thread, one event at a time. It never blocks: a worker whose
/// subscriptions do not keep up has events dropped (counted in
/// `fdtserver_events_total{kind="dropped"}` and logged), never a queue without bound. An event
/// emitted inside a transaction is delivered only once it commits
/// ([`Transaction::emit`](crate::txn::Transaction::emit), feature `postgres`).
///
/// ```
/// use std::sync::Mutex;
/// use fdt_sdk::{App, Bus, Conn, Handle, Next, Settings};
///
/// /// Every line goes to every client of every worker.
/// struct Shout { bus: Bus, clients: std::sync::Arc<Mutex<Vec<Handle>>> }
///
/// impl App for Shout {
///     fn start(settings: &Settings) -> Result<Self, String> {
///         let clients = std::sync::Arc::new(Mutex::new(Vec::<Handle>::new()));
///         let mine = clients.clone();
///         settings.bus().subscribe("shout", move |_topic, line| {
///             mine.lock().unwrap().retain(|c| c.write(line).is_ok());
///         }).map_err(|e| e.to_string())?;
///         Ok(Shout { bus: settings.bus(), clients })
///     }
///     fn on_open(&self, conn: &mut Conn) -> Next {
///         self.clients.lock().unwrap().push(conn.handle());
///         Next::KeepOpen
///     }
///     fn on_readable(&self, conn: &mut Conn) -> Next {
///         while let Some(line) = conn.take_line() {
///             let _ = self.bus.emit("shout", line);
///         }
///         Next::KeepOpen
///     }
/// }
///
/// let app = fdt_sdk::testing::TestApp::<Shout>::start("").unwrap();
/// let (mut a, mut b) = (app.connect(), app.connect());
/// a.send(b"hi\n");
/// assert_eq!(app.emitted(), [("shout".to_string(), b"hi\n".to_vec())]);
/// app.deliver_events();
/// assert_eq!(b.take_output(), b"hi\n");
/// ```
#[derive(Clone, Default)]
pub struct Bus {
    backend: Backend,
}

#[derive(Clone, Default)]
enum Backend {
    /// Outside a server (or a server before ABI 1.4).
    #[default]
    None,
    Host {
        emit: HostEmit,
        subscribe: HostSubscribe,
        unsubscribe: HostUnsubscribe,
        ctx: *const c_void,
    },
    Test(Arc<TestBus>),
}

// SAFETY: the host's functions are thread-safe and their context lives for the whole process.
unsafe impl Send for Backend {}
// SAFETY: as above.
unsafe impl Sync for Backend {}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::None => "none",
            Backend::Host { .. } => "host",
            Backend::Test(_) => "test",
        };
        f.debug_struct("Bus").field("backend", &kind).finish()
    }
}

unsafe extern "C" fn deliver(ctx: *mut c_void, topic: abi::StrRef, payload: abi::StrRef) -> abi::Status {
    // SAFETY: `ctx` is the `Box<Deliver>` made in `subscribe`, live until `drop_deliver`; the
    // host's bytes are valid during this call.
    let (f, topic, payload) = unsafe {
        let bytes = |s: abi::StrRef| if s.len == 0 { &[][..] } else { std::slice::from_raw_parts(s.ptr, s.len) };
        (&*ctx.cast::<Box<Deliver>>(), bytes(topic), bytes(payload))
    };
    let topic = String::from_utf8_lossy(topic);
    match catch_unwind(AssertUnwindSafe(|| f(&topic, payload))) {
        Ok(()) => abi::STATUS_OK,
        Err(panic) => {
            log::error!("an event subscription for {topic}: {}", crate::__private::panic_text(panic));
            abi::STATUS_PANIC
        }
    }
}

unsafe extern "C" fn drop_deliver(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `Box::into_raw` in `subscribe`; the host drops it once.
    let f = unsafe { Box::from_raw(ctx.cast::<Box<Deliver>>()) };
    if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(f))) {
        std::mem::forget(again);
    }
}

impl Bus {
    pub(crate) fn from_host(
        emit: HostEmit,
        subscribe: HostSubscribe,
        unsubscribe: HostUnsubscribe,
        ctx: *const c_void,
    ) -> Bus {
        Bus { backend: Backend::Host { emit, subscribe, unsubscribe, ctx } }
    }

    pub(crate) fn simulated(bus: Arc<TestBus>) -> Bus {
        Bus { backend: Backend::Test(bus) }
    }

    /// Emits the event (`topic`: 1 to 128 of `A-Z a-z 0-9 . _ - :`; `payload`: up to 60 KiB,
    /// or with an `[events] database`, what fits in 8000 bytes of PostgreSQL `NOTIFY`). Never
    /// blocks; an `Err` says why it was refused.
    pub fn emit(&self, topic: &str, payload: &[u8]) -> Result<(), EmitError> {
        self.emit_with(topic, payload, 0)
    }

    /// `emit` with `abi::EMIT_*` flags.
    pub(crate) fn emit_with(&self, topic: &str, payload: &[u8], flags: u32) -> Result<(), EmitError> {
        match &self.backend {
            Backend::None => {
                Err(EmitError("there is no event bus (a server of plugin ABI 1.4 or later has one)".into()))
            }
            Backend::Host { emit, ctx, .. } => {
                let mut error = String::new();
                // SAFETY: the host's function and context stay valid for the life of the process;
                // the strings outlive the call, and the host copies them.
                let status = unsafe {
                    emit(
                        *ctx,
                        abi::StrRef::new(topic),
                        abi::StrRef::from_bytes(payload),
                        flags,
                        crate::__private::collect_message,
                        (&mut error as *mut String).cast(),
                    )
                };
                if status == abi::STATUS_OK { Ok(()) } else { Err(EmitError(error)) }
            }
            Backend::Test(bus) => {
                check(topic, payload)?;
                bus.queue(topic, payload);
                Ok(())
            }
        }
    }

    /// Calls `f(topic, payload)` for every event whose topic `pattern` takes: `*` (every topic),
    /// `prefix.*` (every topic that begins with `prefix.`), or one topic. `f` runs on the
    /// worker's event thread, one event at a time: it may push to connections
    /// ([`Handle::write`](crate::Handle::write)) but should not block.
    pub fn subscribe(
        &self,
        pattern: &str,
        f: impl Fn(&str, &[u8]) + Send + Sync + 'static,
    ) -> Result<SubscriptionId, EmitError> {
        let bare = pattern.strip_suffix('*').unwrap_or(pattern);
        if !bare.is_empty() {
            check(bare.trim_end_matches('.'), b"").map_err(|e| EmitError(format!("bad pattern {pattern:?}: {e}")))?;
        }
        match &self.backend {
            Backend::None => {
                Err(EmitError("there is no event bus (a server of plugin ABI 1.4 or later has one)".into()))
            }
            Backend::Host { subscribe, ctx, .. } => {
                let boxed: Box<Box<Deliver>> = Box::new(Box::new(f));
                let sub_ctx = Box::into_raw(boxed).cast::<c_void>();
                // SAFETY: the host keeps `sub_ctx` until it calls `drop_deliver`, exactly once.
                let id = unsafe { subscribe(*ctx, abi::StrRef::new(pattern), deliver, drop_deliver, sub_ctx) };
                Ok(SubscriptionId(id))
            }
            Backend::Test(bus) => Ok(bus.subscribe(pattern, Arc::new(f))),
        }
    }

    /// Ends a subscription (a callback running now finishes first).
    pub fn unsubscribe(&self, id: SubscriptionId) {
        match &self.backend {
            Backend::None => {}
            // SAFETY: the host's function and context stay valid for the life of the process.
            Backend::Host { unsubscribe, ctx, .. } => unsafe { unsubscribe(*ctx, id.0) },
            Backend::Test(bus) => lock(&bus.subs).retain(|(i, _, _)| *i != id.0),
        }
    }
}

/// The checks of the server (`crate::bus::check` on its side), for the test driver.
pub(crate) fn check(topic: &str, payload: &[u8]) -> Result<(), EmitError> {
    let ok = !topic.is_empty()
        && topic.len() <= 128
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if !ok {
        return Err(EmitError(format!("a topic is 1 to 128 of A-Z a-z 0-9 . _ - : ({topic:?})")));
    }
    if payload.len() > 60 * 1024 {
        return Err(EmitError(format!("a payload is at most 61440 bytes, not {}", payload.len())));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The test driver's bus (`testing`): events wait until the test delivers them.
#[derive(Default)]
pub(crate) struct TestBus {
    /// Emitted and not yet delivered.
    queue: Mutex<Vec<(String, Vec<u8>)>>,
    /// Emitted and not yet taken by [`TestApp::emitted`](crate::testing::TestApp::emitted).
    emitted: Mutex<Vec<(String, Vec<u8>)>>,
    #[allow(clippy::type_complexity)]
    subs: Mutex<Vec<(u64, String, Arc<Deliver>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl TestBus {
    fn queue(&self, topic: &str, payload: &[u8]) {
        lock(&self.queue).push((topic.to_string(), payload.to_vec()));
        lock(&self.emitted).push((topic.to_string(), payload.to_vec()));
    }

    fn subscribe(&self, pattern: &str, f: Arc<Deliver>) -> SubscriptionId {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        lock(&self.subs).push((id, pattern.to_string(), f));
        SubscriptionId(id)
    }

    pub(crate) fn take_emitted(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut *lock(&self.emitted))
    }

    /// Delivers `topic` to the matching subscriptions; how many ran.
    pub(crate) fn deliver(&self, topic: &str, payload: &[u8]) -> usize {
        let matching: Vec<Arc<Deliver>> = lock(&self.subs)
            .iter()
            .filter(|(_, p, _)| match p.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => p == topic,
            })
            .map(|(_, _, f)| f.clone())
            .collect();
        for f in &matching {
            f(topic, payload);
        }
        matching.len()
    }

    /// Delivers what was emitted, in order (also what the deliveries emit); how many deliveries.
    pub(crate) fn deliver_queued(&self) -> usize {
        let mut delivered = 0;
        loop {
            let queued = std::mem::take(&mut *lock(&self.queue));
            if queued.is_empty() {
                return delivered;
            }
            for (topic, payload) in queued {
                delivered += self.deliver(&topic, &payload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_server_there_is_no_bus_and_bad_topics_and_patterns_are_refused() {
        let none = Bus::default();
        assert!(none.emit("a.b", b"x").unwrap_err().to_string().contains("no event bus"));
        assert!(none.subscribe("a.*", |_, _| {}).is_err());
        none.unsubscribe(SubscriptionId(1));
        assert_eq!(format!("{none:?}"), "Bus { backend: \"none\" }");
        let test = Bus::simulated(Arc::default());
        assert_eq!(format!("{test:?}"), "Bus { backend: \"test\" }");
        assert!(test.emit("bad topic", b"").unwrap_err().to_string().contains("a topic is 1 to 128"));
        assert!(test.emit("big", &vec![0; 61 * 1024]).unwrap_err().to_string().contains("at most 61440"));
        assert!(test.subscribe("bad pattern*", |_, _| {}).unwrap_err().to_string().contains("bad pattern"));
        assert!(test.subscribe("*", |_, _| {}).is_ok(), "every topic");
    }

    #[test]
    fn test_subscriptions_take_their_patterns_and_end_when_unsubscribed() {
        let bus = Arc::new(TestBus::default());
        let handle = Bus::simulated(bus.clone());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mine = seen.clone();
        let id =
            handle.subscribe("bank.*", move |t, p| mine.lock().unwrap().push((t.to_string(), p.to_vec()))).unwrap();
        handle.emit("bank.changed", b"1").unwrap();
        handle.emit("chat.line", b"2").unwrap();
        assert_eq!(bus.deliver_queued(), 1);
        assert_eq!(*seen.lock().unwrap(), [("bank.changed".to_string(), b"1".to_vec())]);
        assert_eq!(bus.take_emitted().len(), 2);
        handle.unsubscribe(id);
        assert_eq!(bus.deliver("bank.x", b""), 0);
    }

    unsafe extern "C" fn host_emit(
        _: *const c_void,
        topic: abi::StrRef,
        _: abi::StrRef,
        flags: u32,
        error: abi::MessageFn,
        ctx: *mut c_void,
    ) -> i32 {
        if flags == abi::EMIT_LOCAL {
            return abi::STATUS_OK;
        }
        // SAFETY: the SDK passes its own callback, context and a valid topic.
        unsafe {
            let _ = topic;
            error(ctx, abi::StrRef::new("refused by the host"));
        }
        abi::STATUS_ERROR
    }

    unsafe extern "C" fn host_subscribe(
        _: *const c_void,
        _: abi::StrRef,
        deliver_fn: abi::EventDeliverFn,
        drop_fn: abi::TimerDropFn,
        ctx: *mut c_void,
    ) -> u64 {
        // SAFETY: as the host does: a delivery (one that panics, too), then the drop, once.
        unsafe {
            assert_eq!(deliver_fn(ctx, abi::StrRef::new("t"), abi::StrRef::new("ok")), abi::STATUS_OK);
            assert_eq!(deliver_fn(ctx, abi::StrRef::new("t"), abi::StrRef::new("boom")), abi::STATUS_PANIC);
            drop_fn(ctx);
        }
        7
    }

    static UNSUBSCRIBED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    unsafe extern "C" fn host_unsubscribe(_: *const c_void, id: u64) {
        UNSUBSCRIBED.store(id, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn the_host_backend_passes_errors_deliveries_panics_and_ends() {
        let bus = Bus::from_host(host_emit, host_subscribe, host_unsubscribe, std::ptr::null());
        assert_eq!(format!("{bus:?}"), "Bus { backend: \"host\" }");
        assert_eq!(bus.emit("a", b"x").unwrap_err().to_string(), "refused by the host");
        assert!(bus.emit_with("a", b"x", abi::EMIT_LOCAL).is_ok());
        let got = Arc::new(Mutex::new(Vec::new()));
        let mine = got.clone();
        let id = bus
            .subscribe("t", move |_, p| {
                assert_ne!(p, b"boom", "a subscription's panic is caught");
                mine.lock().unwrap().push(p.to_vec());
            })
            .unwrap();
        assert_eq!(*got.lock().unwrap(), [b"ok".to_vec()]);
        bus.unsubscribe(id);
        assert_eq!(UNSUBSCRIBED.load(std::sync::atomic::Ordering::SeqCst), 7);
    }
}
