//! A worker's end of the event bus (`crate::bus`): the apps' emits go out in batches to every
//! member of the server's bus (this worker included), and what arrives is delivered to the
//! apps' subscriptions (ABI 1.4 `HostApi::emit`, `subscribe`, `unsubscribe`).
//!
//! Shape: two threads. `events-out` takes the outbox (what was emitted since it last ran: a
//! batch under load, one event when quiet), cuts it into datagrams and sends each to every
//! member without waiting; `events-in` receives, and calls the matching subscriptions one at a
//! time, in the order the events arrived (so in emit order per emitter: a worker sends in
//! emit order, and a Unix datagram socket keeps the order of one sender).
//!
//! Bounds: the outbox holds at most `OUTBOX_MAX` bytes, and a member's socket what the kernel
//! lets it queue; what does not fit — a subscriber that cannot keep up makes its worker's
//! socket full — is dropped, counted (`fdtserver_events_total{kind="dropped"}`) and logged at
//! most once a second. Never silent, never unbounded. Each member is sent to through a socket
//! of its own (unread datagrams are charged to the sending socket): a member that stopped
//! reading holds back only itself, and costs the sender one short wait per stall
//! (`SUBSCRIBER_RETRY` for a `fdtserver subscribe`, `WORKER_RETRY` for a worker, which a busy
//! machine may hold up for a moment), not one per datagram.
//!
//! Invariants: no app code runs with a lock of this module held, except `delivering`, which
//! `stop_app` takes to wait for a callback in progress; a subscription's callback is dropped
//! exactly once, never while it runs (`events-in` holds its own reference while it calls it),
//! and never after its app stopped.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bus;
use crate::plugin::EventCallback;

/// The most bytes of events waiting to go out.
const OUTBOX_MAX: usize = 8 << 20;
/// How often the members are listed again (a newcomer also says hello at once).
const MEMBERS_REFRESH: Duration = Duration::from_secs(1);
/// How long the sender retries a member whose socket is full before it drops the datagram.
const SUBSCRIBER_RETRY: Duration = Duration::from_millis(20);
/// The same for a worker: longer, since a worker's queue (a few datagrams: the kernel's
/// `net.unix.max_dgram_qlen`) fills whenever the machine is busy for a moment.
const WORKER_RETRY: Duration = Duration::from_millis(250);
/// Distinct topic prefixes counted; others are counted as `other`.
const MAX_PREFIXES: usize = 64;
/// The app name under which the bus counters travel to the master (`ipc` `events` lines).
pub const COUNTERS_APP: &str = "@bus";

/// A member of the bus, as the sender sees it.
struct Member {
    path: PathBuf,
    socket: UnixDatagram,
    /// Its queue stayed full for its whole retry: datagrams are tried once, without waiting,
    /// until one is taken again.
    congested: bool,
}

/// An app's subscription.
struct Sub {
    id: u64,
    app: usize,
    pattern: Vec<u8>,
    callback: std::sync::Arc<EventCallback>,
}

/// What counts go under: (kind, prefix).
type Key = (&'static str, String);

pub struct Events {
    dir: PathBuf,
    socket: UnixDatagram,
    /// This worker's socket's name in `dir`.
    name: String,
    outbox: Mutex<Vec<u8>>,
    /// Signalled when the outbox gets something.
    queued: Condvar,
    subs: Mutex<Vec<Sub>>,
    /// Datagrams handed in by this process (other servers' events, `worker::notify`), for
    /// `events-in`; at most `OUTBOX_MAX` bytes.
    inbox: Mutex<VecDeque<Vec<u8>>>,
    /// Apps that stopped (or are stopping): they may not subscribe again.
    stopped: Mutex<Vec<usize>>,
    /// Held by `events-in` around each callback (and its last reference to it).
    delivering: Mutex<()>,
    next_id: AtomicU64,
    counts: Mutex<BTreeMap<Key, u64>>,
    last_drop_log: Mutex<Option<Instant>>,
    stopping: AtomicBool,
    /// To the other servers on the `[events] database` (`worker::notify`).
    link: Option<&'static super::notify::Link>,
}

static EVENTS: OnceLock<&'static Events> = OnceLock::new();

/// Joins the bus of the server `config` describes, whose directory is `dir` (as the master
/// handed it: `bus::dir_of_fd`): binds this worker's socket and starts its threads; with
/// `[events] database`, also the link to the other servers.
pub fn start(config: &crate::config::Config, dir: PathBuf) -> Result<(), String> {
    let name = format!("w{}", std::process::id());
    let socket = bus::bind(&dir, &name).map_err(|e| {
        format!("cannot join the event bus at {}: {e}", bus::dir(&config.server.control_socket).join(&name).display())
    })?;
    let link = match &config.events_database {
        Some(db) => {
            let settings =
                config.databases.get(db).map(|d| d.settings()).ok_or_else(|| format!("no [database.{db}]"))?;
            Some(super::notify::start(settings, bus::origin(config))?)
        }
        None => None,
    };
    let events: &'static Events = Box::leak(Box::new(Events {
        dir,
        socket,
        name,
        outbox: Mutex::new(Vec::new()),
        queued: Condvar::new(),
        subs: Mutex::new(Vec::new()),
        stopped: Mutex::new(Vec::new()),
        inbox: Mutex::new(VecDeque::new()),
        delivering: Mutex::new(()),
        next_id: AtomicU64::new(1),
        counts: Mutex::new(BTreeMap::new()),
        last_drop_log: Mutex::new(None),
        stopping: AtomicBool::new(false),
        link,
    }));
    let _ = EVENTS.set(events);
    let spawn = |name: &str, f: fn(&'static Events)| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(events))
            .map_err(|e| format!("cannot start the {name} thread: {e}"))
    };
    spawn("events-in", Events::receive_loop)?;
    spawn("events-out", Events::send_loop)?;
    events.hello();
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Emits an event: to every worker of the server (`flags`: `fdt_sdk::abi::EMIT_LOCAL`). Errors
/// say why it was refused.
pub fn emit(topic: &[u8], payload: &[u8], flags: u32) -> Result<(), String> {
    let events = EVENTS.get().ok_or("there is no event bus here (fdtserver check starts apps without one)")?;
    bus::check(topic, payload, bus::PAYLOAD_MAX)?;
    if let Some(link) = events.link
        && flags & fdt_sdk::abi::EMIT_LOCAL == 0
        // (`check` made sure the topic is ASCII.)
        && !link.push(&String::from_utf8_lossy(topic), payload)?
    {
        events.dropped(topic, 1, "the queue to the [events] database is full (it does not keep up)");
    }
    events.count("emitted", topic, 1);
    events.queue(bus::KIND_EVENT, topic, payload);
    Ok(())
}

/// Hands `datagram` (whole records) to this worker's `events-in`, as if a member had sent it;
/// false (and nothing handed in) when its inbox is full.
pub fn hand_in(datagram: Vec<u8>) -> bool {
    let Some(events) = EVENTS.get() else { return false };
    {
        let mut inbox = lock(&events.inbox);
        if inbox.iter().map(Vec::len).sum::<usize>() + datagram.len() > OUTBOX_MAX {
            return false;
        }
        inbox.push_back(datagram);
    }
    // A wake for `events-in`, blocked in `recv`; when its queue is full it wakes anyway.
    let mut wake = Vec::new();
    bus::encode(&mut wake, bus::KIND_WAKE, b"wake", b"");
    let _ = bus::send(&events.socket, &events.dir.join(&events.name), &wake);
    true
}

/// Counts an event of `topic` dropped on its way (logged at most once a second).
pub fn count_dropped(topic: &[u8]) {
    if let Some(events) = EVENTS.get() {
        events.dropped(topic, 1, "it could not be passed on");
    }
}

/// Subscribes `app` to the topics `pattern` takes; returns the subscription's id. Without a
/// bus (`check`), the callback is dropped at once and the id names nothing.
pub fn subscribe(app: usize, pattern: &[u8], callback: EventCallback) -> u64 {
    let Some(events) = EVENTS.get() else { return u64::MAX };
    let id = events.next_id.fetch_add(1, Ordering::Relaxed);
    let mut subs = lock(&events.subs);
    // An app that stops subscribes no more (a service, or a callback, racing its stop).
    if lock(&events.stopped).contains(&app) {
        drop(subs);
        drop(callback);
        return u64::MAX;
    }
    subs.push(Sub { id, app, pattern: pattern.to_vec(), callback: std::sync::Arc::new(callback) });
    id
}

/// Ends the subscription `id` (nothing when it has ended already).
pub fn unsubscribe(id: u64) {
    let Some(events) = EVENTS.get() else { return };
    let ended = {
        let mut subs = lock(&events.subs);
        subs.iter().position(|s| s.id == id).map(|i| subs.remove(i))
    };
    // Dropped here, or by `events-in` once the call in progress returns.
    drop(ended);
}

/// Ends every subscription of `app` (it stops), after the callback in progress returns — if it
/// returns within `wait`: false when it did not (the app must then not be stopped: its code
/// is still running).
pub fn stop_app(app: usize, wait: Duration) -> bool {
    let Some(events) = EVENTS.get() else { return true };
    let ended: Vec<Sub> = {
        let mut subs = lock(&events.subs);
        lock(&events.stopped).push(app);
        let (ended, kept) = std::mem::take(&mut *subs).into_iter().partition(|s| s.app == app);
        *subs = kept;
        ended
    };
    drop(ended);
    // A callback of the app in progress returns, and its last reference goes with it.
    let deadline = Instant::now() + wait;
    loop {
        match events.delivering.try_lock() {
            Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => return true,
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(std::sync::TryLockError::WouldBlock) => return false,
        }
    }
}

/// Stops delivering (the worker exits).
pub fn stop() {
    if let Some(events) = EVENTS.get() {
        events.stopping.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(events.dir.join(&events.name));
    }
}

/// The bus counters, as (kind, prefix, total), for the heartbeat.
pub fn counters() -> Vec<(String, String, u64)> {
    let Some(events) = EVENTS.get() else { return Vec::new() };
    lock(&events.counts).iter().map(|((kind, prefix), n)| (kind.to_string(), prefix.clone(), *n)).collect()
}

impl Events {
    fn count(&self, kind: &'static str, topic: &[u8], n: u64) {
        let prefix = String::from_utf8_lossy(bus::prefix(topic)).into_owned();
        let mut counts = lock(&self.counts);
        let key = if counts.len() < MAX_PREFIXES * 3 || counts.contains_key(&(kind, prefix.clone())) {
            (kind, prefix)
        } else {
            (kind, "other".to_string())
        };
        *counts.entry(key).or_insert(0) += n;
    }

    /// Counts `n` events of `topic` dropped, and logs it at most once a second.
    fn dropped(&self, topic: &[u8], n: u64, why: &str) {
        self.count("dropped", topic, n);
        let mut last = lock(&self.last_drop_log);
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            log::warn!("event bus: dropped {n} event(s) of {}: {why}", String::from_utf8_lossy(topic));
        }
    }

    fn queue(&self, kind: u8, topic: &[u8], payload: &[u8]) {
        let mut outbox = lock(&self.outbox);
        if outbox.len() + topic.len() + payload.len() > OUTBOX_MAX {
            drop(outbox);
            self.dropped(topic, 1, "the worker's outbox is full (its bus socket does not keep up)");
            return;
        }
        bus::encode(&mut outbox, kind, topic, payload);
        drop(outbox);
        self.queued.notify_one();
    }

    /// Tells every member this worker's socket exists (they send to it from now on).
    fn hello(&self) {
        let mut datagram = Vec::new();
        bus::encode(&mut datagram, bus::KIND_HELLO, b"hello", self.name.as_bytes());
        for member in bus::members(&self.dir) {
            let _ = bus::send(&self.socket, &member, &datagram);
        }
    }

    fn send_loop(&'static self) {
        let mut members = Vec::new();
        self.list_members(&mut members);
        let mut listed = Instant::now();
        loop {
            let batch = {
                let mut outbox = lock(&self.outbox);
                while outbox.is_empty() {
                    outbox = self.queued.wait_timeout(outbox, MEMBERS_REFRESH).unwrap_or_else(|e| e.into_inner()).0;
                    if outbox.is_empty() && listed.elapsed() >= MEMBERS_REFRESH {
                        break;
                    }
                }
                std::mem::take(&mut *outbox)
            };
            if listed.elapsed() >= MEMBERS_REFRESH || self.take_newcomers() {
                self.list_members(&mut members);
                listed = Instant::now();
            }
            let mut at = 0;
            while at < batch.len() {
                let end = cut(&batch[at..]) + at;
                let datagram = &batch[at..end];
                members.retain_mut(|member| self.send_to(member, datagram));
                at = end;
            }
        }
    }

    /// Lists the members again: keeps the sockets of those still there, connects to newcomers,
    /// forgets the gone.
    fn list_members(&self, members: &mut Vec<Member>) {
        let listed = bus::members(&self.dir);
        members.retain(|m| listed.contains(&m.path));
        for path in listed {
            if members.iter().any(|m| m.path == path) {
                continue;
            }
            match bus::connect_member(&path) {
                Ok(socket) => members.push(Member { path, socket, congested: false }),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    // Its owner is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => log::debug!("event bus: cannot reach {}: {e}", path.display()),
            }
        }
    }

    /// Sends one datagram to `member`; false when the member is gone (its file is removed).
    fn send_to(&self, member: &mut Member, datagram: &[u8]) -> bool {
        let worker = member.path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('w'));
        let retry = match (member.congested, worker) {
            (true, _) => Duration::ZERO,
            (false, true) => WORKER_RETRY,
            (false, false) => SUBSCRIBER_RETRY,
        };
        let deadline = Instant::now() + retry;
        loop {
            match bus::send_connected(&member.socket, datagram) {
                Ok(true) => {
                    member.congested = false;
                    return true;
                }
                Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
                Ok(false) => {
                    member.congested = true;
                    for record in bus::decode(datagram) {
                        self.dropped(record.topic, 1, &format!("{} does not keep up", member.path.display()));
                    }
                    return true;
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                        let _ = std::fs::remove_file(&member.path);
                    } else {
                        log::warn!("event bus: cannot send to {}: {e}", member.path.display());
                    }
                    return false;
                }
            }
        }
    }

    /// True once (and then false) after a newcomer said hello.
    fn take_newcomers(&self) -> bool {
        NEWCOMER.swap(false, Ordering::SeqCst)
    }

    fn receive_loop(&'static self) {
        let mut buf = vec![0u8; bus::DATAGRAM_MAX.max(bus::PAYLOAD_MAX + bus::TOPIC_MAX + 64)];
        while !self.stopping.load(Ordering::Acquire) {
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("event bus: receiving failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.handle(&buf[..n]);
            loop {
                let handed = lock(&self.inbox).pop_front();
                let Some(datagram) = handed else { break };
                self.handle(&datagram);
            }
        }
    }

    /// Handles the records of one datagram (from a member, or handed in).
    fn handle(&self, datagram: &[u8]) {
        let mut relayed = Vec::new();
        for record in bus::decode(datagram) {
            match record.kind {
                bus::KIND_EVENT => self.deliver(record.topic, record.payload),
                bus::KIND_HELLO => NEWCOMER.store(true, Ordering::SeqCst),
                bus::KIND_RELAY => relayed.push((record.topic, record.payload)),
                _ => {}
            }
        }
        // Emitted as an app would, after this datagram's deliveries.
        for (topic, payload) in relayed {
            if let Err(e) = emit(topic, payload, 0) {
                log::warn!("event bus: an event from fdtserver emit was refused: {e}");
            }
        }
    }

    /// Calls every subscription whose pattern takes `topic`, one at a time.
    fn deliver(&self, topic: &[u8], payload: &[u8]) {
        let matching: Vec<u64> =
            lock(&self.subs).iter().filter(|s| bus::matches(&s.pattern, topic)).map(|s| s.id).collect();
        for id in matching {
            let delivering = lock(&self.delivering);
            // It may have ended meanwhile: look it up again, and call it without the list's lock
            // (its callback may subscribe, unsubscribe, or push).
            let callback = lock(&self.subs).iter().find(|s| s.id == id).map(|s| s.callback.clone());
            let Some(callback) = callback else { continue };
            let ok = callback.call(topic, payload);
            // Its last reference, if it ended meanwhile, goes before `stop_app` may return.
            drop(callback);
            drop(delivering);
            self.count("delivered", topic, 1);
            if !ok {
                log::error!("an event callback for {} panicked", String::from_utf8_lossy(topic));
            }
        }
    }
}

/// A newcomer said hello: list the members again before the next send.
static NEWCOMER: AtomicBool = AtomicBool::new(false);

/// The end of the first datagram of `batch`: whole records up to `bus::DATAGRAM_MAX` bytes (a
/// larger record goes alone).
fn cut(batch: &[u8]) -> usize {
    let mut end = 0;
    while let Some(len) = bus::record_len(&batch[end..]) {
        if end > 0 && end + len > bus::DATAGRAM_MAX {
            break;
        }
        end += len;
    }
    end.max(1).min(batch.len())
}
