//! A worker process: loads its generation's apps after the fork, serves connections from the
//! inherited listeners with a fixed pool of threads, reports to the master, and drains.
//!
//! Life: `start` (fresh signal handlers, fds, plugins) → report `ready` → wait for `accept` →
//! serve → on `drain` (or TERM, or the master's death) stop accepting and close connections as
//! they go idle → exit when none is left or at `graceful_timeout`.
//!
//! Invariants: a worker never returns into the master's code (it ends with `process::exit`);
//! it never touches an fd it inherited but does not own; its only link to the master is the
//! socketpair.

mod admission;
mod conn;
pub mod events;
mod handoff;
pub mod notify;
pub mod outbound;
mod pool;
pub mod push;
mod share;
mod table;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use socket2::Socket;

use crate::config::{Address, Config};
use crate::ipc::{LineBuffer, MasterMessage, RunningRequest, WorkerMessage, WorkerStats};
use crate::plugin::{App, StartContext};
use crate::sys;
use conn::{After, CloseReason, Phase};
use pool::{Listening, Pool};

pub use conn::CLOSE_LABELS;

/// How often a worker reports its counters (its heartbeat).
pub const STATS_INTERVAL: Duration = Duration::from_millis(500);
/// How often a draining worker looks for connections it may close.
const DRAIN_SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// A draining worker closes a connection that is between requests once it has been quiet
/// this long. Closing a keep-alive connection races with a request the client may be sending
/// right then; HTTP apps avoid that by answering the next request with `Connection: close`,
/// which a busy client sends within microseconds, so only really idle ones are closed here.
const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(200);
/// How long one drain sweep may spend handing connections off (the rest wait for the next).
const HANDOFF_ROUND: Duration = Duration::from_millis(250);
/// How long a worker draining for a successor waits for workers that take its connections
/// (`handoff`) to appear before its connections drain here as in a stop.
const TAKERS_PATIENCE: Duration = Duration::from_secs(2);
/// How long a draining worker waits for its interrupted acceptors to return before it reports
/// that it stopped accepting anyway. One that has not returned by then is inside app code
/// (opening the connection it accepted) or pausing, and checks the drain flag before it could
/// call `accept()` again.
const ACCEPTOR_STOP_WAIT: Duration = crate::listener::ACCEPT_WAKE_INTERVAL;
/// Exit status of a worker whose apps failed to start (the master reports the reason it sent).
pub const EXIT_START_FAILED: i32 = 3;

/// What the master hands a freshly forked worker.
pub struct WorkerSpec {
    pub slot: usize,
    pub generation: u64,
    pub config: Arc<Config>,
    /// Listening sockets of this generation: (fd, address as configured, app name).
    pub listeners: Vec<(RawFd, Address, String)>,
    /// App name → the pinned plugin copy of this generation.
    pub plugins: BTreeMap<String, PathBuf>,
    /// This worker's end of its socketpair with the master.
    pub channel: RawFd,
    pub master_pid: Pid,
    /// The master's signal-hook registrations, to drop in the child.
    pub master_signals: Vec<signal_hook::SigId>,
    /// The shared load table and this worker's record in it.
    pub load: &'static crate::balance::LoadTable,
    pub load_index: usize,
    /// The user to become before loading any plugin (`user`/`group`).
    pub identity: Option<crate::privileges::Identity>,
    /// The event bus's directory, open (`bus`).
    pub bus_dir: RawFd,
}

/// Everything that can happen to a worker's control loop.
enum Event {
    Master(MasterMessage),
    MasterGone,
    DrainSignal,
    StopSignal,
    Tick,
}

/// Runs a worker in the child right after `fork`. Never returns.
pub fn run(spec: WorkerSpec, saved_mask: SigSet) -> ! {
    let code = match Worker::start(spec, &saved_mask) {
        Ok(worker) => worker.serve(),
        Err(code) => code,
    };
    std::process::exit(code)
}

struct Worker {
    pool: &'static Pool,
    channel: UnixStream,
    lines: LineBuffer,
    listeners: Option<Vec<Listening>>,
    signal_pipe: UnixStream,
    drain_flag: Arc<AtomicBool>,
    stop_flag: Arc<AtomicBool>,
    graceful_timeout: Duration,
    handlers: Vec<std::thread::JoinHandle<()>>,
    acceptors: Vec<std::thread::JoinHandle<()>>,
    /// Fds that came over the channel, waiting for the message that says what they are.
    passed_fds: std::collections::VecDeque<std::os::fd::OwnedFd>,
    /// The app event counters last sent to the master.
    sent_events: Vec<crate::ipc::AppEvent>,
    /// The close counts last sent to the master.
    sent_closed: Vec<u64>,
    /// Messages the channel did not take yet.
    outbox: crate::ipc::Outbox,
    /// The bus directory (`crate::bus`), where the workers that take handed-off connections
    /// have their sockets (`handoff`).
    bus_dir: std::path::PathBuf,
    generation: u64,
    /// This worker's handoff socket, while it takes connections.
    handoff_path: Option<std::path::PathBuf>,
    /// Where the next connection handed off goes (round robin over the takers).
    next_target: usize,
    /// Draining for a successor (since when, the first generation that takes, how many of its
    /// workers do): its connections are handed off.
    successor: Option<(Instant, u64, u64)>,
}

impl Worker {
    fn start(spec: WorkerSpec, saved_mask: &SigSet) -> Result<Worker, i32> {
        crate::logging::set_role(&format!("worker {} gen {}", spec.slot, spec.generation));
        let _ = sys::set_parent_death_signal(Signal::SIGTERM);
        if nix::unistd::getppid() != spec.master_pid {
            std::process::exit(0); // the master died before we could ask to be told
        }
        // Order matters (see ARCHITECTURE.md, "fork"), and every signal is still blocked:
        // 1. drop the master's signal actions (they would wake the master's loop through the
        //    shared self-pipe); signal-hook closes their pipe ends right here;
        //    signal-hook leaves its handler installed, so the master's other signals (HUP, USR1,
        //    USR2, TTIN, TTOU) are swallowed here rather than killing or stopping the worker when
        //    an operator signals every process (`pkill -HUP fdtserver`);
        for id in &spec.master_signals {
            signal_hook::low_level::unregister(*id);
        }
        // 2. close every inherited fd this worker does not own (the master's epoll, control
        //    socket, other workers' channels, other generations' listeners);
        let mut keep: Vec<RawFd> = spec.listeners.iter().map(|l| l.0).collect();
        keep.push(spec.channel);
        keep.push(spec.bus_dir);
        keep.extend(crate::logging::raw_fd());
        keep.extend(crate::logging::access_raw_fd());
        let _ = sys::close_fds_except(&keep);
        // Only the master talks to systemd; a plugin must not mistake these for its own.
        let _ = sys::remove_env_single_threaded(&["NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]);
        // 3. install our own handlers, then unblock.
        let drain_flag = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::new(AtomicBool::new(false));
        let (signal_pipe, signal_write) = UnixStream::pair().map_err(|_| 1)?;
        let registered = (|| -> std::io::Result<()> {
            for sig in [libc::SIGTERM, libc::SIGINT] {
                signal_hook::flag::register(sig, drain_flag.clone())?;
                signal_hook::low_level::pipe::register(sig, signal_write.try_clone()?)?;
            }
            signal_hook::flag::register(libc::SIGQUIT, stop_flag.clone())?;
            signal_hook::low_level::pipe::register(libc::SIGQUIT, signal_write)?;
            // Only there to interrupt a blocked accept() (see sys::interrupt_thread).
            signal_hook::flag::register(sys::INTERRUPT_SIGNAL, Arc::new(AtomicBool::new(false)))?;
            Ok(())
        })();
        let _ = sys::restore_signal_mask(saved_mask);
        if let Err(e) = registered {
            log::error!("cannot install signal handlers: {e}");
            return Err(1);
        }

        let mut channel = UnixStream::from(sys::take_inherited_fd(spec.channel));
        // 4. become `user`, still single-threaded and before any plugin code runs. A change of
        //    credentials clears the parent-death signal: set it again.
        if let Some(identity) = &spec.identity {
            if let Err(reason) = crate::privileges::drop_to(identity) {
                let reason = format!("worker {} cannot run as user `{}`: {reason}", spec.slot, identity.user);
                log::error!("{reason}");
                let _ = channel.write_all(WorkerMessage::Failed(reason).to_string().as_bytes());
                return Err(EXIT_START_FAILED);
            }
            let _ = sys::set_parent_death_signal(Signal::SIGTERM);
            if nix::unistd::getppid() != spec.master_pid {
                std::process::exit(0);
            }
        }
        let max_fds = match sys::raise_fd_limit() {
            Ok(n) => n as usize,
            Err(_) => 1024,
        };

        let config = &spec.config;
        // Before the apps: they may subscribe as they start.
        if let Err(e) = events::start(config, crate::bus::dir_of_fd(spec.bus_dir)) {
            log::error!("{e}");
            let _ = channel.write_all(WorkerMessage::Failed(e).to_string().as_bytes());
            return Err(EXIT_START_FAILED);
        }
        let mut apps = Vec::new();
        let mut app_index = BTreeMap::new();
        let server_id = crate::bus::server_id(&config.server.control_socket);
        // The listeners' apps in their order, then every app no listener names (a service
        // that serves nothing: its timers and threads are its work).
        let names = spec.listeners.iter().map(|(_, _, name)| name).chain(config.apps.keys());
        for name in names {
            if app_index.contains_key(name) {
                continue;
            }
            let app_config = config.app(name);
            let pinned = &spec.plugins[name];
            let ctx = StartContext {
                app_name: name,
                settings_toml: &app_config.settings_toml,
                node_id: &config.server.node_id,
                databases_toml: &config.databases_toml(),
                worker_pid: std::process::id(),
                generation: spec.generation,
                setting_lines: &app_config.setting_lines,
                app_index: apps.len(),
                server_id: &server_id,
                events_database: config.events_database.as_deref().unwrap_or(""),
            };
            match App::start(pinned, &ctx) {
                Ok(app) => {
                    app_index.insert(name.clone(), apps.len());
                    apps.push(app);
                }
                Err(e) => {
                    let reason = format!("app {name} ({}): {e}", app_config.plugin.display());
                    log::error!("{reason}");
                    let _ = channel.write_all(WorkerMessage::Failed(reason).to_string().as_bytes());
                    return Err(EXIT_START_FAILED);
                }
            }
        }
        let listeners = spec
            .listeners
            .iter()
            .enumerate()
            .map(|(index, (fd, address, app))| Listening {
                index,
                socket: Socket::from(sys::take_inherited_fd(*fd)),
                address: address.to_string(),
                app: app_index[app],
                tcp: matches!(address, Address::Tcp(_)),
                tls: config.listeners[index].tls.as_ref().map(|t| std::sync::Arc::clone(t.config())),
                proxy: config.listeners[index].proxy.clone(),
            })
            .collect();
        let load = spec.load.record(spec.load_index);
        let limits = config.listeners.iter().map(|l| l.limits).collect();
        let workers = config.server.workers;
        let max_open = config.server.limits.max_connections;
        let limits = (limits, config.server.limits, max_open);
        let pool = match Pool::new(apps, (config.server.threads, workers), max_fds, limits, load) {
            Ok(pool) => {
                let pool: &'static Pool = Box::leak(Box::new(pool));
                push::set_pool(pool);
                pool
            }
            Err(e) => {
                let _ = channel
                    .write_all(WorkerMessage::Failed(format!("cannot set up epoll: {e}")).to_string().as_bytes());
                return Err(EXIT_START_FAILED);
            }
        };
        let mut handlers = pool.spawn_handlers();
        handlers.push(pool.spawn_watchdog());
        handlers.push(pool.spawn_timer_thread());
        let _ = channel.set_nonblocking(true);
        let _ = signal_pipe.set_nonblocking(true);
        let mut worker = Worker {
            pool,
            channel,
            lines: LineBuffer::default(),
            listeners: Some(listeners),
            signal_pipe,
            drain_flag,
            stop_flag,
            graceful_timeout: config.server.graceful_timeout,
            handlers,
            acceptors: Vec::new(),
            passed_fds: Default::default(),
            sent_events: Vec::new(),
            sent_closed: Vec::new(),
            outbox: Default::default(),
            bus_dir: crate::bus::dir_of_fd(spec.bus_dir),
            generation: spec.generation,
            handoff_path: None,
            next_target: 0,
            successor: None,
        };
        worker.send(WorkerMessage::Ready);
        log::debug!("ready");
        Ok(worker)
    }

    /// Sends the apps' event counters when they changed since the last time.
    fn send_events(&mut self) {
        let events: Vec<crate::ipc::AppEvent> = self
            .pool
            .apps
            .iter()
            .flat_map(|app| app.events.snapshot().into_iter().map(|(event, n)| (app.name().to_string(), event, n)))
            .chain(
                events::counters()
                    .into_iter()
                    .map(|(kind, prefix, n)| (events::COUNTERS_APP.to_string(), format!("{kind}:{prefix}"), n)),
            )
            .collect();
        if events != self.sent_events {
            self.send(WorkerMessage::Events(events.clone()));
            self.sent_events = events;
        }
        let closed: Vec<u64> = self.pool.counters.closed.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        if closed != self.sent_closed {
            let counts = CLOSE_LABELS.iter().zip(&closed).map(|(l, n)| (l.to_string(), *n)).collect();
            self.send(WorkerMessage::Closed(counts));
            self.sent_closed = closed;
        }
    }

    fn send(&mut self, msg: WorkerMessage) {
        // A full channel (a master that does not read) keeps the rest for later (`serve`).
        let _ = self.outbox.send(&mut self.channel, &msg.to_string());
    }

    fn stats(&self) -> WorkerStats {
        let c = &self.pool.counters;
        let handlers = self.pool.handlers_report();
        WorkerStats {
            open: c.open.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            busy_threads: handlers.busy,
            stalled_ms: handlers.stalled_ms,
            log_failures: crate::logging::write_failures(),
            oldest: handlers.oldest.map(|(ms, app, peer)| RunningRequest {
                ms,
                peer,
                app: self.pool.apps[app].name().to_string(),
            }),
        }
    }

    /// Waits for the next events (at most `timeout`).
    fn wait(&mut self, timeout: Duration) -> Vec<Event> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut events = Vec::new();
        let (channel_ready, signal_ready) = {
            let mut fds = [
                PollFd::new(self.channel.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signal_pipe.as_fd(), PollFlags::POLLIN),
            ];
            let ms = PollTimeout::try_from(timeout.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut fds, ms);
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if signal_ready {
            let mut buf = [0u8; 64];
            while matches!(self.signal_pipe.read(&mut buf), Ok(n) if n > 0) {}
        }
        if self.stop_flag.swap(false, Ordering::SeqCst) {
            events.push(Event::StopSignal);
        }
        if self.drain_flag.swap(false, Ordering::SeqCst) {
            events.push(Event::DrainSignal);
        }
        if channel_ready {
            let mut buf = [0u8; 1024];
            loop {
                // recvmsg, not read: a `reopen` message comes with the new log files.
                match sys::recv_with_fds(self.channel.as_raw_fd(), &mut buf) {
                    Ok((0, _)) => {
                        events.push(Event::MasterGone);
                        break;
                    }
                    Ok((n, fds)) => {
                        self.passed_fds.extend(fds);
                        self.lines.push(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        events.push(Event::MasterGone);
                        break;
                    }
                }
            }
            while let Some(line) = self.lines.next_line() {
                match MasterMessage::parse(&line) {
                    Some(m) => events.push(Event::Master(m)),
                    None => log::warn!("ignoring an unknown message from the master: {line:?}"),
                }
            }
        }
        if events.is_empty() {
            events.push(Event::Tick);
        }
        events
    }

    /// The control loop: serve until drained or stopped. Returns the exit status.
    fn serve(mut self) -> i32 {
        let mut drain_deadline: Option<Instant> = None;
        let mut last_stats = Instant::now();
        loop {
            let timeout = if drain_deadline.is_some() { DRAIN_SWEEP_INTERVAL } else { STATS_INTERVAL };
            for event in self.wait(timeout) {
                match event {
                    Event::Master(MasterMessage::Accept) => self.start_accepting(),
                    Event::Master(MasterMessage::Drain) | Event::DrainSignal => {
                        if drain_deadline.is_none() {
                            drain_deadline = Some(self.begin_drain(None));
                        }
                    }
                    Event::Master(MasterMessage::Handoff { generation, takers }) => {
                        if drain_deadline.is_none() {
                            drain_deadline = Some(self.begin_drain(Some((generation, takers))));
                        }
                    }
                    Event::MasterGone => {
                        if drain_deadline.is_none() {
                            log::warn!("the master is gone; draining");
                            drain_deadline = Some(self.begin_drain(None));
                        }
                    }
                    Event::Master(MasterMessage::Stop) | Event::StopSignal => {
                        self.finish(false);
                        return 0;
                    }
                    Event::Master(MasterMessage::Reopen { error, access }) => self.reopen_logs(error, access),
                    Event::Tick => {}
                }
            }
            let _ = self.outbox.flush(&mut self.channel);
            if last_stats.elapsed() >= STATS_INTERVAL {
                last_stats = Instant::now();
                let stats = self.stats();
                self.send(WorkerMessage::Stats(stats));
                self.send_events();
            }
            self.close_expired_lingerers();
            if let Some(deadline) = drain_deadline {
                self.settle_idle_connections();
                // An acceptor may still hand over one last connection: done only once every
                // acceptor has returned and no connection is open.
                let accepting = self.acceptors.iter().any(|a| !a.is_finished());
                if !accepting && self.pool.counters.open.load(Ordering::Acquire) == 0 {
                    self.finish(true);
                    return 0;
                }
                if Instant::now() >= deadline {
                    let left = self.pool.counters.open.load(Ordering::Acquire);
                    log::warn!("graceful_timeout reached with {left} connection(s) open; closing them");
                    self.finish(false);
                    return 0;
                }
            }
        }
    }

    /// Switches to the log files the master sent with its `reopen` message.
    fn reopen_logs(&mut self, error: bool, access: bool) {
        let mut take = |wanted: bool| if wanted { self.passed_fds.pop_front().map(std::fs::File::from) } else { None };
        let (error_log, access_log) = (take(error), take(access));
        if (error && error_log.is_none()) || (access && access_log.is_none()) {
            log::warn!("the master's reopen message came without its files; keeping the old ones");
            return;
        }
        // Files of a later message read in the same batch (USR1 right after a reload) stay
        // queued for it.
        crate::logging::use_files(error_log, access_log);
        log::debug!("log files reopened");
    }

    fn start_accepting(&mut self) {
        if let Some(listeners) = self.listeners.take() {
            self.acceptors = self.pool.spawn_acceptors(listeners);
            // From now on it takes connections handed off by draining workers too.
            match handoff::bind(&self.bus_dir, self.generation) {
                Ok((socket, path)) => {
                    let pool = self.pool;
                    let started =
                        std::thread::Builder::new().name("handoff".into()).spawn(move || handoff::serve(socket, pool));
                    match started {
                        Ok(_) => self.handoff_path = Some(path),
                        Err(e) => log::error!("cannot start the handoff thread: {e}"),
                    }
                }
                Err(e) => log::error!("cannot take handed-off connections: {e}"),
            }
            self.send(WorkerMessage::Accepting);
            log::debug!("accepting connections");
        }
    }

    /// Starts the drain; `successor`: the first generation whose workers take this one's
    /// connections (`handoff`), and how many of them do.
    fn begin_drain(&mut self, successor: Option<(u64, u64)>) -> Instant {
        log::info!("draining: {} connection(s) open", self.pool.counters.open.load(Ordering::Relaxed));
        // No more connections handed to this one; are there workers that take its own?
        if let Some(path) = self.handoff_path.take() {
            let _ = std::fs::remove_file(path);
        }
        // Known before the drain shows: an app must not see it for a connection that moves
        // (`Pool::drains_for`). A reload's new workers may bind their sockets a moment after
        // this (the sweeps hand off once they are there).
        self.successor = successor.map(|(g, n)| (Instant::now(), g, n));
        self.pool.set_takers(successor.is_some());
        self.pool.draining.store(true, Ordering::SeqCst);
        self.pool.announce_drain();
        for app in &self.pool.apps {
            app.drain();
        }
        // Listeners never handed to acceptors are closed now; acceptors close theirs as soon
        // as they return from accept(), which this interrupt makes immediate.
        self.listeners = None;
        // Tell the master once no acceptor can take a connection any more: it answers a
        // reload only then, so that every connection made after a reload meets new code.
        self.stop_acceptors();
        self.send(WorkerMessage::StoppedAccepting);
        Instant::now() + self.graceful_timeout
    }

    /// Interrupts the acceptors (the drain flag must be set) and waits, up to
    /// `ACCEPTOR_STOP_WAIT`, for them to return. True when none is left.
    fn stop_acceptors(&self) -> bool {
        use std::os::unix::thread::JoinHandleExt;
        let deadline = Instant::now() + ACCEPTOR_STOP_WAIT;
        let mut waited = 0u32;
        loop {
            let left: Vec<_> = self.acceptors.iter().filter(|a| !a.is_finished()).collect();
            if left.is_empty() || Instant::now() >= deadline {
                return left.is_empty();
            }
            // Again every few milliseconds: an acceptor that checked the drain flag just before
            // it was set, and entered `accept()` just after the last interrupt, is blocked there
            // now and returns at the next one.
            if waited.is_multiple_of(4) {
                for acceptor in left {
                    let _ = sys::interrupt_thread(acceptor.as_pthread_t());
                }
            }
            waited += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Every parked connection that is between requests either moves to a worker that takes
    /// connections (`handoff`: the next generation, or a sibling when this one is recycled),
    /// or — where none takes them (a stop), or its app says closing it is harmless (HTTP
    /// keep-alive) — is closed gently once quiet; the rest stay until they end or
    /// `graceful_timeout`.
    fn settle_idle_connections(&mut self) {
        let targets = match self.successor {
            Some((_, generation, _)) => handoff::targets(&self.bus_dir, generation),
            None => Vec::new(),
        };
        // Until every taker is there (or a while has passed), none: spread over them all.
        if let Some((since, _, takers)) = self.successor
            && (targets.len() as u64) < takers
            && since.elapsed() < TAKERS_PATIENCE
        {
            return;
        }
        // Successors that never show up (they failed): the connections drain as in a stop.
        if targets.is_empty() && self.successor.is_some_and(|(since, ..)| since.elapsed() >= TAKERS_PATIENCE) {
            log::warn!("no worker takes this one's connections; they drain here");
            self.successor = None;
            self.pool.drain_here();
        }
        // One taker after another, each over one connection, for a bounded time per sweep
        // (the control thread has the master to listen to).
        if !targets.is_empty() {
            let deadline = Instant::now() + HANDOFF_ROUND;
            let mut takers: Vec<handoff::Offerer> = targets
                .iter()
                .filter_map(|t| handoff::Offerer::connect(t).map_err(|e| log::debug!("{}: {e}", t.display())).ok())
                .collect();
            let mut next = self.next_target;
            let offered = takers.len();
            let moved = self.pool.offer_round(&mut takers, &mut next, deadline);
            log::debug!(
                "handoff round: {moved} moved to {offered} taker(s) ({} of {} reachable)",
                takers.len(),
                targets.len()
            );
            self.next_target = next;
        }
        let now_ms = sys::monotonic_ms();
        self.pool.sweep(|slot| {
            let conn = slot.as_mut().expect("sweep only offers occupied slots");
            let app = &self.pool.apps[conn.app()];
            if !(targets.is_empty() || app.idle_close_harmless()) {
                return;
            }
            // A request already in the kernel's buffer (its event not handled yet) means the
            // connection is not between requests after all.
            // Not before its app heard of the drain (`App::on_drain`, from the clock).
            let told = conn.told_drain || !app.has_events();
            if conn.between_requests()
                && told
                && u128::from(conn.quiet_ms(now_ms)) >= DRAIN_IDLE_GRACE.as_millis()
                && !conn.input_waiting()
                && let After::Close(_) = conn.begin_close()
                && let Some(conn) = slot.take()
            {
                self.pool.finish(conn, CloseReason::Drained);
            }
        });
    }

    fn close_expired_lingerers(&self) {
        let now = Instant::now();
        self.pool.sweep(|slot| {
            if slot.as_ref().is_some_and(|c| c.linger_expired(now))
                && let Some(conn) = slot.take()
            {
                self.pool.finish(conn, CloseReason::Done);
            }
        });
    }

    /// Ends the worker: every connection closed, handlers stopped, apps stopped.
    fn finish(mut self, graceful: bool) {
        // It takes no connection any more.
        if let Some(path) = self.handoff_path.take() {
            let _ = std::fs::remove_file(path);
        }
        self.pool.draining.store(true, Ordering::SeqCst);
        // Services wind down from now on, also when the stop hooks below are skipped.
        for app in &self.pool.apps {
            app.drain();
        }
        // No acceptor may take a connection (or touch an app) once the apps stop: a sibling
        // worker serves the connections this one no longer takes.
        let acceptors_done = self.stop_acceptors();
        self.pool.stop_handlers();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut unfinished = 0;
        // The timer thread may be asleep between ticks: wake every thread at once, then wait.
        self.handlers.iter().for_each(|h| h.thread().unpark());
        for h in std::mem::take(&mut self.handlers) {
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                unfinished += 1;
            }
        }
        // A thread that has not returned is inside app code (a request, a timer).
        let stuck = self.pool.busy_handlers().max(unfinished) + usize::from(!acceptors_done);
        self.pool.sweep(|slot| {
            if let Some(conn) = slot.take() {
                let reason = if conn.phase == Phase::Open { CloseReason::Forced } else { CloseReason::Done };
                self.pool.finish(conn, reason);
            }
        });
        drop(std::mem::take(&mut self.acceptors));
        // What closing the connections counted (transactions left prepared, say).
        self.send_events();
        if stuck > 0 {
            log::warn!("{stuck} thread(s) still inside app code; exiting without the apps' stop hooks");
            return;
        }
        // Every connection is closed and no handler runs (nor the clock): the apps' timers end,
        // and the apps may stop.
        for (index, app) in self.pool.apps.iter().enumerate() {
            crate::app_timers::stop_app(index);
            // An event callback of the app that does not return in a second is inside app code.
            if !events::stop_app(index, Duration::from_secs(1)) {
                log::warn!(
                    "app {}: an event callback is still running; exiting without the app's stop hook",
                    app.name()
                );
                continue;
            }
            app.stop();
        }
        events::stop();
        if graceful {
            log::info!("drained; exiting");
        }
    }
}
