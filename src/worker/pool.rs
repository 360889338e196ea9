//! The handler and acceptor threads of one worker, and how they share its connections.
//!
//! Shape: one acceptor thread per listener waits in a blocking `accept()` (the kernel queues
//! blocked acceptors of all workers FIFO, which balances connections across processes) and
//! pauses while every handler is busy, so an idle worker takes the next connection instead.
//! Accepted connections are registered, edge-triggered, in one epoll instance; `threads`
//! handler threads wait on it, and the kernel hands each event to exactly one idle handler,
//! which serves the connection inline. An idle connection costs no thread, and serving a
//! request costs no `epoll_ctl`: the handler reads until the socket is empty, so the next
//! request makes a new edge.
//!
//! Invariants: a connection's slot lock is held by whoever touches it. An event that finds the
//! slot locked is not lost: it sets the slot's `again` flag, which is cleared only under the
//! lock, and whoever unlocks a slot with `again` set re-arms the connection (`epoll_ctl`
//! queues a new event if it is ready), so one handler serves it next.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle, Thread};
use std::time::Instant;

use socket2::Socket;

use super::admission::Admission;
use super::conn::{After, CLOSE_LABELS, CloseReason, Conn, Ctx, Phase, Scratch, prepare_socket};
use super::share::AppShares;
use super::table::{ConnTable, Guard, Slot, split_token, token};
use crate::balance::WorkerLoad;
use crate::config::Limits;
use crate::listener::ACCEPT_WAKE_INTERVAL;
use crate::plugin::App;
use crate::sys::{Epoll, Event, EventFd, interest, monotonic_ms};

/// Token of the stop eventfd in the epoll instance (connection tokens are `fd << 32 | seq`).
const STOP_TOKEN: u64 = u64::MAX;
/// How often the timer thread looks for connections whose app timer ran out: the timers'
/// resolution (app timers are for seconds-long quiet periods, such as an idle transaction).
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// App timers the clock runs in a row before it looks at its connections again.
const APP_TIMER_BURST: usize = 64;
/// How often the timer thread looks for connections past a limit (`idle_timeout`,
/// `read_timeout`, `send_timeout`): the limits' resolution.
const LIMIT_SWEEP_TICKS: u32 = 5;
/// File descriptors a worker keeps for itself (log files, plugins' own files, database
/// connections) when `max_connections` is derived from its open file limit.
const RESERVED_FDS: usize = 64;
/// How long an acceptor steps aside for a less loaded sibling before it looks again.
const YIELD_PAUSE: std::time::Duration = std::time::Duration::from_micros(500);

/// One handler thread's heartbeat: whether it is serving a connection, since when, and which.
/// The control thread reads these for the heartbeat it sends the master, which kills a worker
/// whose request outlives `request_timeout`, or whose every handler is stuck.
#[derive(Default)]
pub struct HandlerBeat {
    /// `monotonic_ms()` when the thread took its current connection; 0 while it waits.
    busy_since: AtomicU64,
    /// The connection it serves: (app index, peer). Rewritten in place, so no allocation per
    /// request once the string has grown to a peer's length.
    serving: Mutex<(usize, String)>,
    /// The thread's kernel id (0 until it starts), to tell blocked from runnable.
    tid: std::sync::atomic::AtomicI32,
}

impl HandlerBeat {
    /// The thread starts serving a connection of `app` from `peer`.
    fn begin(&self, app: usize, peer: &str) {
        {
            let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
            serving.0 = app;
            serving.1.clear();
            serving.1.push_str(peer);
        }
        self.busy_since.store(monotonic_ms().max(1), Ordering::Release);
    }

    /// The thread is done with it.
    fn end(&self) {
        self.busy_since.store(0, Ordering::Release);
    }

    /// How long the thread has been serving its current connection (0 while it waits).
    pub fn busy_ms(&self, now: u64) -> u64 {
        match self.busy_since.load(Ordering::Acquire) {
            0 => 0,
            since => now.saturating_sub(since),
        }
    }

    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }
}

/// What the handler threads are doing, summed up for the heartbeat.
pub struct HandlersReport {
    pub busy: u64,
    /// When every handler is busy: the shortest time one of them has been (0 otherwise).
    pub stalled_ms: u64,
    /// The longest-running request: (ms, app index, peer).
    pub oldest: Option<(u64, usize, String)>,
}

/// Counters reported to the master.
#[derive(Default)]
pub struct Counters {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub requests: AtomicU64,
    pub panics: AtomicU64,
    /// Connections closed, by reason (indexed like `conn::CLOSE_LABELS`).
    pub closed: [AtomicU64; CLOSE_LABELS.len()],
}

/// A listener of this worker and the app serving it.
pub struct Listening {
    /// Position in the generation's `[[listen]]` list (the same in every worker).
    pub index: usize,
    pub socket: Socket,
    pub address: String,
    pub app: usize,
    pub tcp: bool,
    /// Its TLS configuration, when it speaks TLS.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Its PROXY protocol settings, when connections start with that header.
    pub proxy: Option<crate::config::ProxyProtocol>,
}

/// State shared by the threads of one worker.
pub struct Pool {
    pub epoll: Epoll,
    pub conns: ConnTable,
    pub apps: Vec<App>,
    pub counters: Counters,
    pub draining: AtomicBool,
    stopping: AtomicBool,
    stop_event: EventFd,
    threads: usize,
    busy: AtomicUsize,
    next_seq: AtomicU32,
    acceptors: Mutex<Vec<Thread>>,
    load: WorkerLoad,
    beats: Box<[HandlerBeat]>,
    /// Which handlers may wait on the epoll instance or serve at once.
    admission: Admission,
    /// Connections with an app timer set: the timer thread sleeps through its ticks while 0.
    timed: AtomicUsize,
    /// How many handlers each app may hold (see `worker::share`).
    shares: AppShares,
    /// The timer thread's heartbeat: counted for the longest-running request (so a stuck
    /// `on_timer` meets `request_timeout`), not for "every handler stuck".
    timer_beat: HandlerBeat,
    /// Each listener's limits, by its place in the generation's `[[listen]]` list.
    limits: Vec<Limits>,
    /// Open connections of each listener (for its `max_connections`).
    listener_open: Vec<AtomicUsize>,
    /// The worker's `max_connections`.
    max_open: usize,
    /// Set when the drain starts; cleared by the timer thread once every connection was told
    /// (`App::on_drain`).
    drain_news: AtomicBool,
    /// Pushed bytes waiting for their connections (`worker::push`).
    pushes: super::push::PushTable,
    /// Where the server's own limits are in `limits`: those of an outbound connection made
    /// outside a connection's callback.
    server_limits: u32,
    /// This worker's listeners (as the acceptors have them): where a connection handed over
    /// from another worker goes (`Pool::adopt`).
    listening: Mutex<Vec<(usize, String, usize, bool)>>,
    /// Each listener's address, by its place in the generation's list (set once, with the
    /// acceptors): what a connection's app is told when its PROXY header has been read.
    addresses: std::sync::OnceLock<Vec<String>>,
    /// While draining: some worker takes this one's connections (see `drains_for`).
    takers: AtomicBool,
}

/// An outbound connection to make (see `worker::outbound`).
pub struct Outbound {
    pub app: usize,
    /// The address as the app wrote it.
    pub peer: String,
    pub address: std::net::SocketAddr,
    /// What its `Conn::link` returns (0: none).
    pub link: u64,
    /// The listener whose limits it takes (`None`: the server's).
    pub listener: Option<u32>,
    pub timeout_ms: u64,
}

impl Pool {
    /// `workers`: how many workers the generation runs (for the admission's share of the CPUs);
    /// `limits`: each listener's, then the server's; `max_open`: the worker's
    /// `max_connections` (0: derived from `max_fds`, its open file limit).
    pub fn new(
        apps: Vec<App>,
        (threads, workers): (usize, usize),
        max_fds: usize,
        (limits, server, max_open): (Vec<Limits>, Limits, usize),
        load: WorkerLoad,
    ) -> std::io::Result<Pool> {
        let mut limits = limits;
        let server_limits = limits.len() as u32;
        limits.push(server);
        // Pushes wait up to the largest `max_output` of the listeners.
        let push_limit = limits.iter().map(|l| l.max_output).max().unwrap_or(Limits::DEFAULT_MAX_OUTPUT);
        let epoll = Epoll::new()?;
        let stop_event = EventFd::new()?;
        let apps_len = apps.len();
        // Level-triggered: once signalled, it wakes every handler.
        epoll.add(stop_event.as_raw_fd(), interest::READ, STOP_TOKEN)?;
        Ok(Pool {
            epoll,
            conns: ConnTable::new(max_fds),
            apps,
            counters: Counters::default(),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop_event,
            threads,
            busy: AtomicUsize::new(0),
            next_seq: AtomicU32::new(1),
            acceptors: Mutex::new(Vec::new()),
            load,
            beats: (0..threads).map(|_| HandlerBeat::default()).collect(),
            admission: Admission::new(threads, workers),
            timed: AtomicUsize::new(0),
            shares: AppShares::new(apps_len, threads),
            timer_beat: HandlerBeat::default(),
            listener_open: limits.iter().map(|_| AtomicUsize::new(0)).collect(),
            limits,
            max_open: if max_open > 0 { max_open } else { max_fds.saturating_sub(RESERVED_FDS).max(16) },
            drain_news: AtomicBool::new(false),
            pushes: super::push::PushTable::new(push_limit),
            server_limits,
            listening: Mutex::new(Vec::new()),
            addresses: std::sync::OnceLock::new(),
            takers: AtomicBool::new(false),
        })
    }

    /// Starts the admission watchdog.
    pub fn spawn_watchdog(&'static self) -> JoinHandle<()> {
        thread::Builder::new()
            .name("admission".into())
            .spawn(move || self.admission.watchdog_loop(&self.beats, &self.busy))
            .expect("cannot start the admission watchdog")
    }

    /// Starts the thread that fires app timers (`fdt_sdk::Conn::set_timer`).
    pub fn spawn_timer_thread(&'static self) -> JoinHandle<()> {
        let handle = thread::Builder::new()
            .name("timers".into())
            .spawn(move || self.timer_loop())
            .expect("cannot start the timer thread");
        crate::app_timers::set_clock(handle.thread().clone());
        handle
    }

    /// What a call into `conn`'s app may use.
    fn ctx(&self, conn: &Conn) -> Ctx<'_> {
        Ctx {
            app: &self.apps[conn.app()],
            address: self.addresses.get().and_then(|a| a.get(conn.listener as usize)).map_or("", String::as_str),
            limits: &self.limits[conn.listener as usize],
            draining: self.drains_for(conn),
        }
    }

    /// True when `conn`'s app should see the drain (`Conn::draining`, `on_drain`): the worker
    /// drains, and the connection will not move to a worker that takes connections — there is
    /// none (a stop), its app hands off nothing, or its handoff failed. One that will move is
    /// served as if nothing happened.
    fn drains_for(&self, conn: &Conn) -> bool {
        let moves = self.takers.load(Ordering::Relaxed)
            && !conn.handoff_failed
            && !conn.outbound
            && conn.tls.is_none() // a TLS session cannot move: it stays and hears the drain
            && self.apps[conn.app()].protocol().is_some();
        self.draining.load(Ordering::Relaxed) && !moves
    }

    /// Tells the pool whether some worker takes this one's connections (`worker::handoff`).
    pub fn set_takers(&self, any: bool) {
        self.takers.store(any, Ordering::Relaxed);
    }

    /// Starts the handler threads.
    pub fn spawn_handlers(&'static self) -> Vec<JoinHandle<()>> {
        (0..self.threads)
            .map(|i| {
                thread::Builder::new()
                    .name(format!("handler-{i}"))
                    .spawn(move || self.handler_loop(&self.beats[i]))
                    .expect("cannot start a handler thread")
            })
            .collect()
    }

    /// Starts one acceptor thread per listener.
    pub fn spawn_acceptors(&'static self, listeners: Vec<Listening>) -> Vec<JoinHandle<()>> {
        *self.listening.lock().unwrap_or_else(|e| e.into_inner()) =
            listeners.iter().map(|l| (l.index, l.address.clone(), l.app, l.tcp)).collect();
        let mut addresses = vec![String::new(); listeners.iter().map(|l| l.index + 1).max().unwrap_or(0)];
        for l in &listeners {
            addresses[l.index] = l.address.clone();
        }
        let _ = self.addresses.set(addresses);
        let handles: Vec<JoinHandle<()>> = listeners
            .into_iter()
            .map(|l| {
                thread::Builder::new()
                    .name(format!("accept {}", l.address))
                    .spawn(move || self.acceptor_loop(l))
                    .expect("cannot start an acceptor thread")
            })
            .collect();
        *self.acceptors.lock().unwrap_or_else(|e| e.into_inner()) =
            handles.iter().map(|h| h.thread().clone()).collect();
        handles
    }

    /// Makes handler threads return once the connections they are serving are done.
    pub fn stop_handlers(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop_event.notify();
        self.admission.stop();
    }

    pub fn busy_handlers(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Reads every handler's heartbeat (for the worker's report to the master).
    pub fn handlers_report(&self) -> HandlersReport {
        let now = monotonic_ms();
        let mut report = HandlersReport { busy: 0, stalled_ms: u64::MAX, oldest: None };
        let mut oldest: Option<(u64, &HandlerBeat)> = None;
        for beat in self.beats.iter() {
            let since = beat.busy_since.load(Ordering::Acquire);
            if since == 0 {
                report.stalled_ms = 0;
                continue;
            }
            let ms = now.saturating_sub(since);
            report.busy += 1;
            report.stalled_ms = report.stalled_ms.min(ms);
            if oldest.is_none_or(|(o, _)| ms > o) {
                oldest = Some((ms, beat));
            }
        }
        if report.busy == 0 {
            report.stalled_ms = 0;
        }
        // The timer thread's `on_timer` call counts as a request, but not as a handler.
        let timer_since = self.timer_beat.busy_since.load(Ordering::Acquire);
        if timer_since != 0 {
            let ms = now.saturating_sub(timer_since);
            if oldest.is_none_or(|(o, _)| ms > o) {
                oldest = Some((ms, &self.timer_beat));
            }
        }
        if let Some((ms, beat)) = oldest {
            let serving = beat.serving.lock().unwrap_or_else(|e| e.into_inner());
            report.oldest = Some((ms, serving.0, serving.1.clone()));
        }
        report
    }

    fn acceptor_loop(&self, listener: Listening) {
        let mut last_error_log: Option<Instant> = None;
        // For the apps' greetings (`App::on_open`); allocated at the first one.
        let mut scratch = None;
        while !self.draining.load(Ordering::Acquire) {
            // Saturated, or at `max_connections`: let another worker take the next connection
            // (at the limit of every worker, the kernel's backlog holds it).
            if self.busy.load(Ordering::Acquire) >= self.threads || self.at_capacity(listener.index) {
                self.load.not_ready(listener.index);
                thread::park_timeout(ACCEPT_WAKE_INTERVAL);
                continue;
            }
            self.load.ready(listener.index);
            // Holding more than a sibling that is ready too: let it take the next one. Sleep
            // until one arrives (not polling: the balance may stay like this for hours), then
            // give the sibling a moment to take it before looking again.
            if self.load.should_yield(listener.index) {
                if connection_waiting(&listener.socket, ACCEPT_WAKE_INTERVAL) {
                    thread::sleep(YIELD_PAUSE);
                }
                continue;
            }
            match listener.socket.accept() {
                Ok((socket, peer)) => {
                    let peer = peer.as_socket().map(|a| a.to_string()).unwrap_or_default();
                    self.register(socket, peer, &listener, &mut scratch);
                }
                Err(e) => match e.raw_os_error() {
                    // SO_RCVTIMEO expired, or the connection died in the queue: carry on.
                    Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                    _ => {
                        // EMFILE and friends: log at most once a second, back off briefly.
                        if last_error_log.is_none_or(|t| t.elapsed().as_secs() >= 1) {
                            log::error!("accept on {} failed: {e}", listener.address);
                            last_error_log = Some(Instant::now());
                        }
                        thread::sleep(std::time::Duration::from_millis(10));
                    }
                },
            }
        }
        self.load.not_ready(listener.index);
        log::debug!("stopped accepting on {}", listener.address);
        // Dropping `listener` closes this worker's copy of the socket.
    }

    /// True when the worker, or this listener, holds its `max_connections`.
    fn at_capacity(&self, listener: usize) -> bool {
        let max = self.limits[listener].max_connections;
        self.counters.open.load(Ordering::Acquire) as usize >= self.max_open
            || (max > 0 && self.listener_open[listener].load(Ordering::Acquire) >= max)
    }

    /// Starts telling every connection's app that the worker drains (`App::on_drain`), from
    /// the timer thread.
    pub fn announce_drain(&self) {
        self.drain_news.store(true, Ordering::SeqCst);
        crate::app_timers::wake_clock();
    }

    fn register(&self, socket: Socket, peer: String, listener: &Listening, scratch: &mut Option<Scratch>) {
        if let Err(e) = prepare_socket(&socket, listener.tcp) {
            log::warn!("dropping a connection from {peer}: {e}");
            return;
        }
        let fd = socket.as_raw_fd() as usize;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed).max(1);
        let token = token(fd, seq);
        let app = &self.apps[listener.app];
        let Some(slot) = self.conns.slot(fd) else {
            log::error!("connection fd {fd} is beyond the table; closing it");
            return;
        };
        let ids = (listener.index as u32, listener.app);
        let (mut conn, refused) = match &listener.proxy {
            // The header names the client: the app hears of the connection once it is read.
            Some(proxy) => {
                let refused = !proxy_allowed(proxy, &peer);
                (Conn::awaiting_header(socket, listener.tcp, seq, ids, peer, proxy.version), refused)
            }
            None => {
                let Some(handle) = app.open_conn(&peer, &listener.address, u64::from(seq), token, None) else {
                    log::error!("app {} refused a connection from {peer}", app.name());
                    return;
                };
                (Conn::new(socket, listener.tcp, seq, ids, handle, peer), false)
            }
        };
        if let Some(config) = &listener.tls {
            match crate::tls::Session::new(config) {
                Ok(session) => conn.tls = Some(Box::new(session)),
                Err(e) => {
                    log::error!("cannot start TLS for a connection from {}: {e}", conn.peer);
                    return conn.release(app);
                }
            }
        }
        let mut guard = slot.lock();
        let conn = guard.insert(conn);
        // A connection closed while its event waited for its app's share left its mark.
        slot.waiting.store(0, Ordering::SeqCst);
        slot.live.store(seq, Ordering::Release);
        self.conns.note_used(fd);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.listener_open[listener.index].fetch_add(1, Ordering::Relaxed);
        self.load.opened();
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        if refused {
            let conn = guard.take().expect("inserted above");
            drop(guard);
            log::debug!("connection from {} refused: not in proxy_from", conn.peer);
            return self.finish(conn, CloseReason::ProxyHeader("not in proxy_from".into()));
        }
        // The app's greeting, if it has one (`App::on_open`), in this thread (behind a proxy:
        // once the header is read, see `Conn::read_proxy_header`).
        if app.has_events() && !conn.awaiting_proxy_header() {
            let ctx = self.ctx(conn);
            let had_timer = conn.has_timer();
            let after = conn.on_open(&ctx, scratch.get_or_insert_with(Scratch::new));
            // Before a close too: `finish` counts the timer off.
            self.track_timer(had_timer, conn.has_timer());
            match after {
                After::Park(wanted) => conn.armed = wanted | interest::EDGE,
                After::Close(reason) => {
                    let conn = guard.take().expect("inserted above");
                    drop(guard);
                    return self.finish(conn, reason);
                }
            }
        }
        let armed = conn.armed;
        if let Err(e) = self.epoll.add(fd as i32, armed, token) {
            log::error!("cannot watch a new connection: {e}");
            if let Some(conn) = guard.take() {
                drop(guard);
                self.finish(conn, CloseReason::Error(e.to_string()));
            }
            return;
        }
        // Its first request may have raced us to a handler.
        self.unlock(slot, guard);
    }

    /// Takes a connection's slot for an event. When another thread holds it, flags the event
    /// for that thread to re-arm (see [`Pool::unlock`]) and returns `None`, unless the holder
    /// let go meanwhile.
    fn lock_for_event<'a>(&self, slot: &'a Slot) -> Option<Guard<'a>> {
        slot.try_lock().or_else(|| {
            slot.again.store(true, Ordering::SeqCst);
            // Pairs with the fence in `unlock`: the holder sees the flag, or we get the lock.
            std::sync::atomic::fence(Ordering::SeqCst);
            slot.try_lock()
        })
    }

    /// Releases a slot. If an event found it locked meanwhile, re-arms the connection, under
    /// the lock (an fd may be closed and reused as soon as the slot is free), so that the event
    /// comes again to whichever handler is idle. If another thread holds the slot by then, the
    /// flag stays set for it.
    fn unlock<'a>(&self, slot: &'a Slot, mut guard: Guard<'a>) {
        loop {
            drop(guard);
            std::sync::atomic::fence(Ordering::SeqCst);
            if !slot.again.load(Ordering::SeqCst) {
                return;
            }
            let Some(next) = slot.try_lock() else { return };
            guard = next;
            // Pushed bytes or a wake wait: ask for a writable event, which a socket with room
            // gives at once.
            let pushed = slot.waiting_interest();
            if slot.again.swap(false, Ordering::SeqCst)
                && let Some(conn) = guard.as_mut()
                && let Err(e) = self.epoll.modify(conn.fd(), conn.armed | pushed, token(conn.fd() as usize, conn.seq))
            {
                log::warn!("cannot re-arm the connection from {}: {e}", conn.peer);
            }
        }
    }

    /// Calls `f` on every connection whose slot is free right now (none is being served).
    pub fn sweep(&self, mut f: impl FnMut(&mut Option<Conn>)) {
        for slot in self.conns.used() {
            if let Some(mut guard) = slot.try_lock()
                && guard.is_some()
            {
                f(&mut guard);
                self.unlock(slot, guard);
            }
        }
    }

    /// The worker's clock: every `TIMER_TICK` while some connection has a timer, calls
    /// `on_timer` for each one whose peer has been quiet long enough; every
    /// `LIMIT_SWEEP_TICKS` ticks, acts on connections past a limit (`idle_timeout`,
    /// `read_timeout`, `send_timeout`); once the drain starts, tells every connection's app
    /// (`on_drain`). Each under the slot lock like a handler, within the app's share of
    /// handlers and with a heartbeat of its own (so `request_timeout` sees a call that never
    /// returns). A connection being served or waiting for its app's share is skipped this
    /// time; one whose input waits in the kernel is not quiet (no timer, no idle limit).
    fn timer_loop(&self) {
        let mut scratch = Scratch::new();
        let mut ticks = 0u32;
        let tick_ms = TIMER_TICK.as_millis() as u64;
        let mut next_tick = monotonic_ms() + tick_ms;
        // A due app timer whose app holds its whole share of handlers waits for the next tick
        // (not a spin).
        let mut held_back = false;
        while !self.stopping.load(Ordering::Acquire) {
            // Asleep until the next tick, or the next app timer if it comes first (or a wake:
            // a new timer, the drain).
            let now = monotonic_ms();
            let due_in = if held_back { None } else { crate::app_timers::next_due_in(now) };
            let wait = next_tick.saturating_sub(now).min(due_in.unwrap_or(u64::MAX));
            if wait > 0 {
                thread::park_timeout(std::time::Duration::from_millis(wait));
            }
            held_back = self.run_app_timers() == 0 && crate::app_timers::next_due_in(monotonic_ms()) == Some(0);
            let now = monotonic_ms();
            let ticked = now >= next_tick;
            if ticked {
                ticks = ticks.wrapping_add(1);
                next_tick = now + tick_ms;
            }
            let limits = ticked && ticks.is_multiple_of(LIMIT_SWEEP_TICKS);
            let timers = ticked && self.timed.load(Ordering::Acquire) > 0;
            let news = self.drain_news.swap(false, Ordering::SeqCst);
            if !(limits || timers || news) {
                continue;
            }
            let mut untold = false;
            for slot in self.conns.used() {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                let Some(guard) = slot.try_lock() else {
                    untold |= news;
                    continue;
                };
                untold |= self.tick(slot, guard, Tick { now, limits, timers, news }, &mut scratch);
            }
            if untold {
                self.drain_news.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Runs the app timers that are due (`fdt_sdk::Timers`), each within its app's share of
    /// handlers and under the clock's heartbeat, at most `APP_TIMER_BURST` of them before the
    /// clock looks at its connections again.
    /// Returns how many ran.
    fn run_app_timers(&self) -> usize {
        let now = monotonic_ms();
        let mut ran = 0;
        for _ in 0..APP_TIMER_BURST {
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            let Some(due) = crate::app_timers::take_due(now, |app| self.shares.enter(app)) else { break };
            ran += 1;
            let app = due.app;
            self.timer_beat.begin(app, "(app timer)");
            let ok = due.run();
            self.timer_beat.end();
            self.shares.leave(app);
            if !ok {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                log::error!("app {}: a timer's callback panicked; the timer stays scheduled", self.apps[app].name());
            }
        }
        ran
    }

    /// The clock's work on one connection (see `timer_loop`). True when it still has to hear
    /// of the drain.
    fn tick<'a>(&self, slot: &'a Slot, mut guard: Guard<'a>, tick: Tick, scratch: &mut Scratch) -> bool {
        let Some(conn) = guard.as_mut() else { return false };
        let queued = slot.waiting.load(Ordering::SeqCst) == token(conn.fd() as usize, conn.seq);
        if tick.news && conn.drain_news_due() && !self.drains_for(conn) {
            // It moves to another worker: no news for its app.
            conn.told_drain = true;
        }
        let untold = tick.news && conn.drain_news_due();
        let limit = if tick.limits { conn.limit_due(tick.now, &self.limits[conn.listener as usize]) } else { None };
        let job = if queued {
            None
        } else if untold {
            Some(Job::Drain)
        } else if let Some(limit) = limit {
            Some(Job::Limit(limit))
        } else if tick.timers && conn.timer_due(tick.now) {
            Some(Job::Timer)
        } else {
            None
        };
        // Input in the kernel: the connection is not quiet, its event is on its way. Output in
        // the kernel: the peer is still reading its last answer, not idle.
        let job = match job {
            Some(Job::Timer) if conn.input_waiting() => None,
            Some(Job::Limit(super::conn::Limit::Idle)) if conn.input_waiting() || conn.still_reading() => None,
            job => job,
        };
        let Some(job) = job else {
            self.unlock(slot, guard);
            return untold;
        };
        if job == Job::Drain && !self.apps[conn.app()].has_events() {
            conn.told_drain = true;
            self.unlock(slot, guard);
            return false;
        }
        let app = conn.app();
        if !self.shares.enter(app) {
            // Again at the next tick, when the app may have a handler to spare.
            self.unlock(slot, guard);
            return untold;
        }
        let had_timer = conn.has_timer();
        let ctx = self.ctx(conn);
        self.timer_beat.begin(app, &conn.peer);
        let (after, requests) = match job {
            Job::Drain => conn.on_drain(&ctx, scratch),
            Job::Limit(limit) => (conn.enforce(limit, &ctx, scratch), 0),
            Job::Timer => conn.on_timer(&ctx, scratch),
        };
        self.timer_beat.end();
        self.track_timer(had_timer, conn.has_timer());
        if requests > 0 {
            self.counters.requests.fetch_add(requests, Ordering::Relaxed);
        }
        self.apply(slot, guard, after);
        self.shares.leave(app);
        false
    }

    /// Keeps `timed` in step when a connection's timer was set or removed.
    fn track_timer(&self, had: bool, has: bool) {
        match (had, has) {
            (false, true) => {
                self.timed.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.timed.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    fn handler_loop(&self, beat: &HandlerBeat) {
        beat.tid.store(nix::unistd::gettid().as_raw(), Ordering::Release);
        let mut scratch = Scratch::new();
        // One event per wait: the others stay queued for idle handlers, so a request that
        // blocks (a sleep, a database call, an endless loop) never holds up a connection that
        // another thread could serve. Batches of 8, with the stuck handler's unserved events
        // handed back by the watchdog, were measured (BENCHMARKS.md): no CPU saved once a
        // request costs no `epoll_ctl`, and a longer p99.
        let mut events = [Event::EMPTY; 1];
        'admitted: loop {
            if !self.admission.admit() {
                return;
            }
            loop {
                let n = match self.epoll.wait(&mut events, None) {
                    Ok(n) => n,
                    Err(e) => {
                        log::error!("epoll_wait failed: {e}");
                        return;
                    }
                };
                for event in &events[..n] {
                    if event.token() == STOP_TOKEN {
                        return;
                    }
                    // SeqCst: pairs with the watchdog's going to sleep (see `first_busy`).
                    if self.busy.fetch_add(1, Ordering::SeqCst) == 0 {
                        self.admission.first_busy();
                    }
                    self.serve(*event, &mut scratch, beat);
                    if self.busy.fetch_sub(1, Ordering::AcqRel) == self.threads {
                        self.wake_acceptors();
                    }
                }
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                if self.admission.leave_if_surplus() {
                    continue 'admitted;
                }
            }
        }
    }

    fn wake_acceptors(&self) {
        if let Ok(acceptors) = self.acceptors.try_lock() {
            acceptors.iter().for_each(Thread::unpark);
        }
    }

    /// Serves an event, then the events that waited for the share of the app it touched, for
    /// as long as that app is below its share (an event that turns out stale, or finds its
    /// connection busy, does not end the round: the queue behind it is served too).
    fn serve(&self, event: Event, scratch: &mut Scratch, beat: &HandlerBeat) {
        let mut app = self.serve_one(event, false, scratch, beat);
        while let Some(a) = app {
            let Some(queued) = self.take_waiting(a) else { break };
            app = self.serve_one(queued, true, scratch, beat).or(Some(a));
        }
    }

    /// The next event that waited for `app`'s share, if the app is below it now. The
    /// connection may be queued again from here on (should it find the share taken again).
    fn take_waiting(&self, app: usize) -> Option<Event> {
        let event = self.shares.next_waiting(app)?;
        if let Some(slot) = self.conns.slot(split_token(event.token()).0) {
            // Only its own mark: a connection closed while queued may have left the slot to a
            // new one, already queued under its own token.
            let _ = slot.waiting.compare_exchange(event.token(), 0, Ordering::SeqCst, Ordering::SeqCst);
        }
        Some(event)
    }

    /// Serves one event (`queued`: it waited for its app's share); returns the app whose share
    /// it touched (served, or queued for).
    fn serve_one(&self, event: Event, queued: bool, scratch: &mut Scratch, beat: &HandlerBeat) -> Option<usize> {
        let (fd, seq) = split_token(event.token());
        let slot = self.conns.slot(fd)?;
        let mut guard = self.lock_for_event(slot)?;
        if guard.as_ref().is_none_or(|conn| conn.seq != seq) {
            // A stale event for an fd that was closed (and maybe reused): a flag set for the
            // connection there now is not ours to clear.
            self.unlock(slot, guard);
            return None;
        }
        let conn = guard.as_mut().expect("checked above");
        let app_index = conn.app();
        let ctx = self.ctx(conn);
        // Only app code counts against an app's share: a connection flushing or closing runs
        // none, and must not wait behind the app's stuck requests.
        let runs_app = matches!(conn.phase, Phase::Open | Phase::Connecting { .. });
        if runs_app && !self.shares.enter(app_index) {
            // The app holds its share of handlers: the connection waits for one of them, not
            // for a handler another app needs. Its event is kept (once), not re-armed.
            if slot.waiting.swap(event.token(), Ordering::SeqCst) != event.token() {
                self.shares.queue(app_index, event);
            }
            self.unlock(slot, guard);
            return Some(app_index);
        }
        // Anything that arrived before this point is read now; a later arrival is a new edge.
        slot.again.store(false, Ordering::SeqCst);
        if slot.wake.swap(false, Ordering::SeqCst) {
            conn.unblock();
        }
        self.deliver_pushes(slot, conn);
        beat.begin(app_index, &conn.peer);
        let had_timer = conn.has_timer();
        let (after, requests) = conn.on_ready(&event, &ctx, scratch);
        self.track_timer(had_timer, conn.has_timer());
        beat.end();
        if queued {
            // What happened while it waited (more input, the peer's FIN) came as events that
            // were dropped rather than queued twice: re-arm, and the kernel reports it again.
            conn.read_empty = false;
        }
        if requests > 0 {
            self.counters.requests.fetch_add(requests, Ordering::Relaxed);
        }
        self.apply(slot, guard, after);
        if runs_app {
            self.shares.leave(app_index);
        }
        Some(app_index)
    }

    /// Parks or closes a connection after it was handled, and releases its slot.
    fn apply<'a>(&self, slot: &'a Slot, mut guard: Guard<'a>, after: After) {
        let Some(conn) = guard.as_mut() else { return };
        let reason = match after {
            After::Park(wanted) => {
                // Pushed bytes that waited for room (or a wake) are handled at the next
                // writable event.
                let pushed = slot.waiting_interest();
                let wanted = wanted | pushed | interest::EDGE;
                // The common case: waiting for the next request on a socket read empty. Its
                // arrival is a new edge; nothing to tell the kernel. (Not with pushed bytes
                // waiting: the writable edge that would deliver them may have passed.)
                if wanted == conn.armed && conn.read_empty && pushed == 0 {
                    return self.unlock(slot, guard);
                }
                // Otherwise (new interest, or input possibly left unread) re-arm: the kernel
                // queues an event at once if the socket is ready already.
                let token = token(conn.fd() as usize, conn.seq);
                match self.epoll.modify(conn.fd(), wanted, token) {
                    Ok(()) => {
                        conn.armed = wanted;
                        return self.unlock(slot, guard);
                    }
                    Err(e) => CloseReason::Error(format!("cannot re-arm: {e}")),
                }
            }
            After::Close(reason) => reason,
        };
        let conn = guard.take().expect("checked above");
        // Release the slot before the fd is closed: once closed, the fd number may be reused
        // by the acceptor, which then needs the slot.
        drop(guard);
        self.finish(conn, reason);
    }

    /// Pushes `bytes` to the connection `token` names, then closes it when `close` (see
    /// `worker::push`). Never blocks: a connection being served gets the bytes from the thread
    /// serving it.
    pub fn push(&self, token: u64, bytes: &[u8], close: bool) -> crate::plugin::PushOutcome {
        use crate::plugin::PushOutcome;
        let (fd, seq) = split_token(token);
        let Some(slot) = self.conns.slot(fd) else { return PushOutcome::Closed };
        if !super::push::is_live(&slot.live, seq) {
            return PushOutcome::Closed;
        }
        // The common case: nothing waits for it and nobody holds it: straight into its output,
        // without the table.
        if !slot.pushed.load(Ordering::SeqCst)
            && let Some(mut guard) = slot.try_lock()
        {
            if let Some(conn) = guard.as_mut().filter(|c| c.seq == seq && c.phase == Phase::Open)
                && conn.has_push_room(&self.limits[conn.listener as usize])
                && !slot.pushed.load(Ordering::SeqCst)
            {
                conn.accept_push(bytes, close);
                self.rearm_after_push(slot, conn, token);
                self.unlock(slot, guard);
                return PushOutcome::Ok;
            }
            self.unlock(slot, guard);
        }
        let waiter = super::outbound::current().map(|c| c.token);
        if self.pushes.add(token, bytes, close, waiter) == super::push::Added::Full {
            return PushOutcome::Full;
        }
        slot.pushed.store(true, Ordering::SeqCst);
        // It may have ended meanwhile: then nothing may be left for the fd's next connection.
        if !super::push::is_live(&slot.live, seq) {
            self.drop_pushes(token);
            return PushOutcome::Closed;
        }
        // Deliver now if nobody holds the connection; else its holder re-arms it for writing as
        // it lets go, and the handler of that event delivers.
        if let Some(mut guard) = self.lock_for_event(slot) {
            if let Some(conn) = guard.as_mut().filter(|c| c.seq == seq) {
                self.deliver_pushes(slot, conn);
                self.rearm_after_push(slot, conn, token);
            }
            self.unlock(slot, guard);
        }
        PushOutcome::Ok
    }

    /// Parks a connection that a push reached outside its own events — never closes it here:
    /// closing runs the app's `on_close`, and the pushing thread may be inside app code holding
    /// the app's locks (a handler closes it). No system call when the interest is unchanged:
    /// output left queued is announced by the writable edge to come.
    fn rearm_after_push(&self, slot: &Slot, conn: &mut Conn, token: u64) {
        let wanted = conn.after_push(&self.limits[conn.listener as usize]) | slot.waiting_interest() | interest::EDGE;
        if wanted == conn.armed {
            return;
        }
        match self.epoll.modify(conn.fd(), wanted, token) {
            Ok(()) => conn.armed = wanted,
            Err(e) => log::warn!("cannot re-arm the connection from {}: {e}", conn.peer),
        }
    }

    /// Moves what was pushed to `conn` into its output, once the output has room (at most half
    /// of `max_output` queued); until then it waits, and so do further pushes, up to the limit.
    fn deliver_pushes(&self, slot: &Slot, conn: &mut Conn) {
        if !slot.pushed.load(Ordering::SeqCst) {
            return;
        }
        match conn.phase {
            // What was written before the connect completes waits for it.
            Phase::Connecting { .. } => return,
            Phase::Open => {}
            Phase::Flushing | Phase::Lingering { .. } => {
                // Closing: nothing more goes out.
                slot.pushed.store(false, Ordering::SeqCst);
                self.drop_pushes(token(conn.fd() as usize, conn.seq));
                return;
            }
        }
        if !conn.has_push_room(&self.limits[conn.listener as usize]) {
            return;
        }
        slot.pushed.store(false, Ordering::SeqCst);
        if let Some(pushed) = self.pushes.take(token(conn.fd() as usize, conn.seq)) {
            conn.accept_push(&pushed.bytes, pushed.close);
            self.wake_all(&pushed.waiters);
        }
    }

    /// Drops what was pushed to the connection `token` names (it ends), waking the
    /// connections that waited for its room: their next push fails as closed.
    fn drop_pushes(&self, token: u64) {
        if let Some(pushed) = self.pushes.take(token) {
            self.wake_all(&pushed.waiters);
        }
    }

    /// Wakes connections whose push was refused as full (see `worker::push`): each is re-armed
    /// for writing, and the handler that takes its event offers its input again. Never waits
    /// for a lock (the caller holds another connection's).
    fn wake_all(&self, waiters: &[u64]) {
        for &waiter in waiters {
            let (fd, seq) = split_token(waiter);
            let Some(slot) = self.conns.slot(fd) else { continue };
            if !super::push::is_live(&slot.live, seq) {
                continue;
            }
            slot.wake.store(true, Ordering::SeqCst);
            // Held: its holder re-arms it as it lets go (`unlock`), asking for writable.
            let Some(mut guard) = self.lock_for_event(slot) else { continue };
            if let Some(conn) = guard.as_mut().filter(|c| c.seq == seq) {
                let wanted = conn.armed | interest::WRITE;
                if let Err(e) = self.epoll.modify(conn.fd(), wanted, waiter) {
                    log::warn!("cannot re-arm the connection from {}: {e}", conn.peer);
                } else {
                    conn.armed = wanted;
                }
            }
            self.unlock(slot, guard);
        }
    }

    /// Offers the connections that may move (between requests, app with a protocol, no
    /// pushed bytes waiting, no handoff of it refused) to the takers, round robin from `*next`,
    /// one at a time under its slot lock, until `deadline` (`worker::handoff` for the two
    /// steps). A connection that moved is ended here as handed off; one that did not is back as
    /// it was. A taker that cannot be reached is left out for the rest of the round. Returns
    /// how many moved.
    pub fn offer_round(&self, takers: &mut Vec<super::handoff::Offerer>, next: &mut usize, deadline: Instant) -> usize {
        use super::handoff::Refused;
        let mut moved = 0;
        for slot in self.conns.used() {
            if Instant::now() >= deadline || takers.is_empty() {
                break;
            }
            let i = *next % takers.len();
            let offerer = &mut takers[i];
            let Some(mut guard) = slot.try_lock() else { continue };
            let Some(outgoing) = guard.as_mut().and_then(|conn| self.outgoing(slot, conn)) else {
                self.unlock(slot, guard);
                continue;
            };
            let conn = guard.as_mut().expect("checked above");
            if self.epoll.delete(conn.fd()).is_err() {
                self.unlock(slot, guard);
                continue;
            }
            let offered = offerer.offer(&outgoing);
            // Ready, and nothing pushed to it meanwhile (which would stay behind): it goes.
            // From here on pushes to it fail here as closed; its new worker has its own handle.
            let went = match offered {
                Ok(id) if !slot.pushed.load(Ordering::SeqCst) => {
                    slot.live.store(0, Ordering::SeqCst);
                    match offerer.go(id) {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Refused::Unreachable(e)),
                    }
                }
                Ok(id) => {
                    offerer.abort(id);
                    Err(Refused::Unreachable("bytes were pushed to it meanwhile".into()))
                }
                Err(refused) => Err(refused),
            };
            match went {
                Ok(()) => {
                    let conn = guard.take().expect("checked above");
                    drop(guard);
                    self.finish(conn, CloseReason::HandedOff);
                    moved += 1;
                }
                Err(refused) => {
                    let conn = guard.as_mut().expect("checked above");
                    slot.live.store(conn.seq, Ordering::SeqCst);
                    let wanted = conn.armed | slot.waiting_interest();
                    if let Err(e) = self.epoll.add(conn.fd(), wanted, token(conn.fd() as usize, conn.seq)) {
                        log::error!("cannot watch the connection from {} again: {e}", conn.peer);
                    } else {
                        conn.armed = wanted;
                    }
                    let unreachable = match refused {
                        Refused::No(reason) if reason.contains(super::handoff::DRAINS) => Some(reason),
                        Refused::No(reason) => {
                            log::info!("keeping the connection from {} (not handed off: {reason})", conn.peer);
                            // It stays: the app hears of the drain after all.
                            conn.handoff_failed = true;
                            conn.told_drain = false;
                            self.drain_news.store(true, Ordering::SeqCst);
                            None
                        }
                        Refused::Unreachable(reason) => Some(reason),
                    };
                    self.unlock(slot, guard);
                    if let Some(reason) = unreachable {
                        log::debug!("a taker is out of this round: {reason}");
                        takers.remove(i);
                        continue;
                    }
                }
            }
            *next = next.wrapping_add(1);
        }
        moved
    }

    /// What a taker needs for `conn`, if it may move now (see [`Pool::offer_round`]).
    fn outgoing(&self, slot: &Slot, conn: &mut Conn) -> Option<super::handoff::Outgoing> {
        let app = &self.apps[conn.app()];
        let protocol = app.protocol()?.to_string();
        if !conn.movable() || conn.handoff_failed || slot.pushed.load(Ordering::SeqCst) {
            return None;
        }
        let listener = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(index, ..)| *index == conn.listener as usize)
            .map(|(_, address, ..)| address.clone())?;
        match conn.export_session(app) {
            Ok(session) => {
                Some(super::handoff::Outgoing { fd: conn.fd(), listener, protocol, peer: conn.peer.clone(), session })
            }
            Err(e) => {
                log::info!("keeping the connection from {} (its session: {e})", conn.peer);
                conn.handoff_failed = true;
                None
            }
        }
    }

    /// Gives up on the drain's handoffs (no taker showed up): every connection hears of the
    /// drain as in a stop.
    pub fn drain_here(&self) {
        self.takers.store(false, Ordering::SeqCst);
        self.sweep(|slot| {
            if let Some(conn) = slot.as_mut() {
                conn.told_drain = false;
            }
        });
        self.announce_drain();
    }

    /// Starts an outbound connection (see `worker::outbound`); returns its token.
    pub fn connect(&self, out: Outbound) -> Result<u64, String> {
        use socket2::{Domain, Protocol, Type};
        if self.stopping.load(Ordering::SeqCst) {
            return Err(format!("cannot connect to {}: the worker is stopping", out.peer));
        }
        let fail = |e: std::io::Error| format!("cannot connect to {}: {e}", out.peer);
        let socket = Socket::new(Domain::for_address(out.address), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
        prepare_socket(&socket, true).map_err(fail)?;
        match socket.connect(&out.address.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(fail(e)),
        }
        let fd = socket.as_raw_fd() as usize;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed).max(1);
        let token = token(fd, seq);
        let Some(slot) = self.conns.slot(fd) else {
            return Err(format!("cannot connect to {}: fd {fd} is beyond the connection table", out.peer));
        };
        // Every step that can fail comes before the app's state exists: a failure here is the
        // caller's `Err` alone, never an `on_close` run inside the app's own call.
        let mut guard = slot.lock();
        if self.stopping.load(Ordering::SeqCst) {
            return Err(format!("cannot connect to {}: the worker is stopping", out.peer));
        }
        // An event that comes before the connection is in its slot finds the slot locked, and
        // `unlock` re-arms it.
        if let Err(e) = self.epoll.add(fd as i32, interest::WRITE | interest::EDGE, token) {
            return Err(format!("cannot connect to {}: cannot watch the socket: {e}", out.peer));
        }
        let app = &self.apps[out.app];
        let Some(handle) = app.open_conn(&out.peer, "", u64::from(seq), token, Some(out.link)) else {
            return Err(format!("cannot connect to {}: the app refused the connection", out.peer));
        };
        let listener = out.listener.unwrap_or(self.server_limits);
        let conn = Conn::new(socket, true, seq, (listener, out.app), handle, out.peer).connecting(out.timeout_ms);
        *guard = Some(conn);
        slot.waiting.store(0, Ordering::SeqCst);
        slot.live.store(seq, Ordering::Release);
        self.conns.note_used(fd);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.load.opened();
        // Its connect may have completed already, its event raced us to a handler.
        self.unlock(slot, guard);
        Ok(token)
    }

    /// Ends a connection: tells the app, counts it, closes the socket.
    pub fn finish(&self, mut conn: Conn, reason: CloseReason) {
        let app = &self.apps[conn.app()];
        // A limit that began a gentle close is what ended the connection.
        let reason = match conn.limit {
            Some(limit) => CloseReason::Limit(limit),
            None => reason,
        };
        self.counters.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        // Pushes to it fail from now on, and what waited for it is dropped (the slot may hold
        // the next connection on this fd already: only its own mark is cleared).
        if let Some(slot) = self.conns.slot(conn.fd() as usize) {
            let _ = slot.live.compare_exchange(conn.seq, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        self.drop_pushes(token(conn.fd() as usize, conn.seq));
        match &reason {
            CloseReason::AppFailed(msg) => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                log::error!("app {}: connection from {} closed: {msg}", app.name(), conn.peer);
            }
            CloseReason::TooLarge => {
                log::warn!("app {}: connection from {} closed: request larger than 1 MiB", app.name(), conn.peer)
            }
            CloseReason::Error(e) => log::debug!("connection from {} closed: {e}", conn.peer),
            CloseReason::ConnectFailed(e) => log::debug!("app {}: {e}", app.name()),
            _ => {}
        }
        self.track_timer(conn.has_timer(), false);
        conn.release(app);
        if crate::logging::access_enabled() {
            crate::logging::access(format_args!(
                "pid={} peer={} app={} requests={} in={} out={} ms={:.3} close={}",
                std::process::id(),
                if conn.peer.is_empty() { "unix" } else { &conn.peer },
                app.name(),
                conn.requests,
                conn.bytes_in,
                conn.bytes_out,
                conn.opened.elapsed().as_secs_f64() * 1000.0,
                reason.label()
            ));
        }
        let listener_open =
            if conn.outbound { 0 } else { self.listener_open[conn.listener as usize].fetch_sub(1, Ordering::Relaxed) };
        let open = self.counters.open.fetch_sub(1, Ordering::Relaxed);
        self.load.closed();
        let at_listener_max = !conn.outbound && listener_open == self.limits[conn.listener as usize].max_connections;
        if open as usize >= self.max_open || at_listener_max {
            self.wake_acceptors(); // one may wait at `max_connections`
        }
        // Dropping `conn` closes the socket, which also removes it from the epoll instance.
    }
}

/// True when a PROXY protocol header may come from `peer` (a TCP peer's address as text; a
/// Unix socket's peer, empty, is local and always may).
fn proxy_allowed(proxy: &crate::config::ProxyProtocol, peer: &str) -> bool {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(addr) => proxy.from.iter().any(|cidr| cidr.contains(addr.ip())),
        Err(_) => peer.is_empty(),
    }
}

/// What the clock looks at in one round (see `Pool::timer_loop`).
#[derive(Clone, Copy)]
struct Tick {
    /// `sys::monotonic_ms()`.
    now: u64,
    limits: bool,
    timers: bool,
    news: bool,
}

/// What the clock does to one connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Job {
    Drain,
    Limit(super::conn::Limit),
    Timer,
}

/// Waits up to `timeout` for a connection in `listener`'s queue, without taking it. An
/// interrupted wait (a drain starting) returns false.
fn connection_waiting(listener: &Socket, timeout: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

/// A worker taking connections handed over by a draining one (`worker::handoff`): an arrival is
/// registered like an accepted connection on the listener with the same address, if its app
/// speaks the same protocol, with the app's `import_session` instead of its greeting, but
/// watched only once the offerer says `GO`. It is named by its token meanwhile.
impl super::handoff::Taker for Pool {
    fn prepare(&self, arrival: super::handoff::Arrival) -> Result<u64, String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(super::handoff::DRAINS.into());
        }
        let found = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, address, app, _)| {
                *address == arrival.listener && self.apps[*app].protocol() == Some(arrival.protocol.as_str())
            })
            .cloned();
        let Some((index, address, app_index, tcp)) = found else {
            return Err(format!("no listener {} of protocol {} here", arrival.listener, arrival.protocol));
        };
        if self.at_capacity(index) {
            return Err("this worker is at max_connections".into());
        }
        let socket = arrival.socket;
        prepare_socket(&socket, tcp).map_err(|e| e.to_string())?;
        let fd = socket.as_raw_fd() as usize;
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed).max(1);
        let token = token(fd, seq);
        let slot = self.conns.slot(fd).ok_or_else(|| format!("fd {fd} is beyond the connection table"))?;
        let app = &self.apps[app_index];
        let mut guard = slot.lock();
        let mut handle = app
            .open_conn(&arrival.peer, &address, u64::from(seq), token, None)
            .ok_or("the app refused the connection")?;
        if let Err(e) = app.import_conn(&mut handle, &arrival.session) {
            app.close_conn(handle);
            return Err(format!("the app refused its session: {e}"));
        }
        *guard = Some(Conn::new(socket, tcp, seq, (index as u32, app_index), handle, arrival.peer));
        slot.waiting.store(0, Ordering::SeqCst);
        slot.live.store(seq, Ordering::Release);
        self.conns.note_used(fd);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.listener_open[index].fetch_add(1, Ordering::Relaxed);
        self.load.opened();
        self.unlock(slot, guard);
        Ok(token)
    }

    fn commit(&self, prepared: u64) {
        let (fd, seq) = split_token(prepared);
        let Some(slot) = self.conns.slot(fd) else { return };
        let mut guard = slot.lock();
        if let Some(conn) = guard.as_mut().filter(|c| c.seq == seq) {
            // Input that arrived on the way reports at once (the `EPOLL_CTL_ADD` of a ready
            // socket), and so do pushes that wait.
            let wanted = interest::READ | interest::EDGE | slot.waiting_interest();
            match self.epoll.add(fd as i32, wanted, prepared) {
                Ok(()) => conn.armed = wanted,
                Err(e) => log::error!("cannot watch the connection handed over from {}: {e}", conn.peer),
            }
            // This worker may have begun to drain meanwhile: its app hears of it.
            if self.draining.load(Ordering::SeqCst) {
                self.announce_drain();
            }
        }
        self.unlock(slot, guard);
    }

    fn drop_prepared(&self, prepared: u64) {
        let (fd, seq) = split_token(prepared);
        let Some(slot) = self.conns.slot(fd) else { return };
        let mut guard = slot.lock();
        let Some(mut conn) = guard.take_if(|c| c.seq == seq) else {
            self.unlock(slot, guard);
            return;
        };
        drop(guard);
        // Not a close: the offerer keeps the connection. The app's state for it goes; this
        // worker's copy of the fd closes, the connection lives on there.
        let _ = slot.live.compare_exchange(seq, 0, Ordering::AcqRel, Ordering::Acquire);
        self.drop_pushes(prepared);
        conn.release(&self.apps[conn.app()]);
        self.listener_open[conn.listener as usize].fetch_sub(1, Ordering::Relaxed);
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
        self.load.closed();
    }
}
