//! The master process: binds the listeners, forks and supervises generations of workers,
//! reloads, stops, and answers the control API.
//!
//! Shape (after nginx's master cycle): wait on one `mio::Poll` (self-pipe for signals,
//! control socket, one channel per worker, the socketpair to a binary upgrade's new master,
//! the agent check); turn what happened into [`Event`]s; handle them in a fixed order — what
//! workers and a new master said, then signals (reap children, stop, reload, reopen, upgrade,
//! resize), then control requests, then load balancers' agent checks (answered with the state
//! all that left) — then fire due timers (supervision limits, boot, drain and upgrade
//! deadlines). Supervision limits live in `supervise`, systemd in `systemd`, the binary upgrade
//! in `upgrade`, the agent check and the rotation in `agent`.
//!
//! Invariants: the master has exactly one thread, forever (checked before every fork); it never
//! loads a plugin and never touches a client byte; [`table::Table`] is its only record of its
//! children.

pub mod agent;
mod logfiles;
mod rundir;
mod status;
mod supervise;
pub mod systemd;
pub mod table;
mod upgrade;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use self::rundir::RunDir;
use crate::config::Config;
use crate::control::{self, ControlServer, Request, Response};
use crate::ipc::{MasterMessage, WorkerMessage};
use crate::listener::{self, Listener};
use crate::sys::{self, Fork};
use crate::worker::{self, WorkerSpec};
use table::{CrashHistory, GenState, Generation, Table, Worker, WorkerState};

const SIGNAL_TOKEN: Token = Token(0);
const CONTROL_TOKEN: Token = Token(1);
/// Worker channels use `Token(WORKER_TOKEN_BASE + pid)`.
const WORKER_TOKEN_BASE: usize = 16;
/// A draining generation gets this long past `graceful_timeout` to exit on its own (workers
/// enforce the timeout themselves) before the master kills what is left.
const DRAIN_KILL_MARGIN: Duration = Duration::from_secs(5);
/// After a fast stop is asked for, workers that have not exited by then are killed.
const FAST_STOP_GRACE: Duration = Duration::from_secs(2);
/// A successful reload is answered when the old workers confirm they stopped accepting, or
/// after this long at the latest.
const REPLY_AFTER_DRAIN_WAIT: Duration = Duration::from_secs(1);
/// The loop wakes at least this often, so a missed wake-up can delay nothing for long.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

/// The signals the master acts on, in the order it handles them within one loop turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sig {
    /// CHLD: reap and maybe replace workers.
    Child,
    /// TERM, INT: graceful stop (a second one: fast).
    Terminate,
    /// QUIT: fast stop.
    Quit,
    /// HUP: reload.
    Reload,
    /// USR1: reopen log files.
    Reopen,
    /// USR2: binary upgrade.
    Upgrade,
    /// TTIN: one worker more.
    MoreWorkers,
    /// TTOU: one worker fewer.
    FewerWorkers,
}

const SIGNALS: [(libc::c_int, Sig); 9] = [
    (libc::SIGCHLD, Sig::Child),
    (libc::SIGTERM, Sig::Terminate),
    (libc::SIGINT, Sig::Terminate),
    (libc::SIGQUIT, Sig::Quit),
    (libc::SIGHUP, Sig::Reload),
    (libc::SIGUSR1, Sig::Reopen),
    (libc::SIGUSR2, Sig::Upgrade),
    (libc::SIGTTIN, Sig::MoreWorkers),
    (libc::SIGTTOU, Sig::FewerWorkers),
];

/// Signal flags set by signal-hook's handlers, and the self-pipe that wakes the loop.
struct SignalPipe {
    read: UnixStream,
    flags: Vec<(libc::c_int, Sig, Arc<AtomicBool>)>,
    ids: Vec<signal_hook::SigId>,
}

impl SignalPipe {
    fn install() -> io::Result<SignalPipe> {
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for (sig, what) in SIGNALS {
            let flag = Arc::new(AtomicBool::new(false));
            // The flag first: the loop, woken by the pipe, must find it set.
            ids.push(signal_hook::flag::register(sig, flag.clone())?);
            ids.push(signal_hook::low_level::pipe::register(sig, write.try_clone()?)?);
            flags.push((sig, what, flag));
        }
        Ok(SignalPipe { read, flags, ids })
    }

    /// The signals that arrived since the last call, in handling order, each once (a second
    /// TERM is noticed because the first one already put the master in the stopping state).
    fn take(&mut self) -> Vec<Sig> {
        let mut buf = [0u8; 64];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        let mut arrived: Vec<Sig> =
            self.flags.iter().filter(|(_, _, f)| f.swap(false, Ordering::SeqCst)).map(|(_, s, _)| *s).collect();
        arrived.dedup();
        arrived
    }
}

/// Everything the master loop reacts to.
enum Event {
    Signal(Sig),
    Worker(Pid, WorkerMessage),
    /// The new master of a binary upgrade.
    NewMaster(upgrade::NewMasterSays),
    Control(usize, Request),
    /// A load balancer's agent check connected.
    AgentCheck,
}

/// How the master is stopping.
struct Stopping {
    fast: bool,
    kill_at: Instant,
}

/// A respawn waiting for its back-off delay.
struct Respawn {
    generation: u64,
    slot: usize,
    at: Instant,
}

#[derive(Default)]
struct Counters {
    reloads_ok: u64,
    reloads_failed: u64,
    worker_restarts: u64,
    last_reload_error: Option<String>,
    last_drain_ms: Option<u64>,
    /// Generations that finished draining, and the sum of their drain times.
    drains: u64,
    drain_ms_total: u64,
    /// Workers killed for `heartbeat_timeout` / `request_timeout`.
    heartbeat_kills: u64,
    request_timeout_kills: u64,
    /// Replacement workers killed for not starting within `boot_timeout`.
    boot_kills: u64,
    /// Workers replaced gracefully after `max_requests`.
    recycles: u64,
    /// Binary upgrades whose new master did not take over.
    upgrades_failed: u64,
}

pub struct Master {
    /// The event bus's directory (`bus`), open: its fd is passed to every worker.
    bus_dir: std::fs::File,
    config_path: PathBuf,
    config: Arc<Config>,
    poll: Poll,
    signals: SignalPipe,
    /// Keyed by `ListenConfig::key`.
    listeners: BTreeMap<String, Listener>,
    table: Table,
    control: ControlServer,
    runtime_dir: RunDir,
    stopping: Option<Stopping>,
    reload_waiters: Vec<usize>,
    /// A reload asked for while another was booting (with who waits for it): it starts once
    /// that one is decided, so that it reads the config as it is now.
    reload_again: Option<Vec<usize>>,
    /// Reloads that succeeded, waiting for the old workers to stop accepting:
    /// (control connection, generation, answer at the latest by).
    pending_replies: Vec<(usize, u64, Instant)>,
    respawns: Vec<Respawn>,
    next_generation: u64,
    started: Instant,
    counters: Counters,
    /// Set when the first generation could not start: the master exits 1 with it.
    startup_failure: Option<String>,
    pidfile_written: bool,
    /// Shared with every worker: their open connections, for balancing bursts.
    load: &'static crate::balance::LoadTable,
    /// systemd's notify socket (a no-op when not under systemd).
    notifier: systemd::Notifier,
    /// Sockets passed by systemd or the master of a binary upgrade, not adopted yet.
    inherited: listener::Inherited,
    /// How this master was started (re-executed for a binary upgrade).
    argv: Vec<std::ffi::OsString>,
    /// A binary upgrade this master started: the new master.
    upgrade: Option<upgrade::Upgrade>,
    /// This master was started by a binary upgrade and has not taken over yet.
    handover: Option<upgrade::Handover>,
    /// This master handed everything to a new master and is draining out.
    handed_over: bool,
    /// The master this one took over from (binary upgrade), shown in `status` while it drains.
    old_master: Option<Pid>,
    /// App event counts of workers that have exited (the totals stay monotonic).
    retired_events: BTreeMap<(String, String), u64>,
    /// Connections closed by workers that exited, by reason.
    retired_closed: BTreeMap<String, u64>,
    /// The agent check a load balancer asks, and the node's rotation.
    agent: agent::Agent,
}

/// Prints a problem that stops the server from starting: to the log, and to stderr when the
/// log goes to a file.
fn fatal(config: &Config, msg: &str) {
    log::error!("{msg}");
    if config.server.error_log.is_some() {
        eprintln!("fdtserver: {msg}");
    }
}

/// Runs the server in the foreground until it is stopped. Returns the exit status.
pub fn run(config_path: &Path) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                eprintln!("fdtserver: {p}");
            }
            return 1;
        }
    };
    crate::logging::init("master", config.server.log_level);
    if let Some(path) = &config.server.error_log
        && let Err(e) = crate::logging::set_file(Some(path))
    {
        eprintln!("fdtserver: cannot open error_log {}: {e}", path.display());
        return 1;
    }
    if let Some(path) = &config.server.access_log
        && let Err(e) = crate::logging::set_access_file(Some(path))
    {
        fatal(&config, &format!("cannot open access_log {}: {e}", path.display()));
        return 1;
    }
    match Master::start(config) {
        Ok(mut master) => master.run_loop(),
        Err(()) => 1,
    }
}

impl Master {
    fn start(config: Config) -> Result<Master, ()> {
        match sys::raise_fd_limit() {
            Ok(n) => log::info!("open file limit: {n} (each connection takes one)"),
            Err(e) => log::warn!("cannot raise the open file limit: {e}"),
        }
        let mut inherited = listener::Inherited::default();
        let mut handover = match upgrade::take_handover(&mut inherited) {
            Ok(h) => h,
            Err(e) => {
                fatal(&config, &format!("binary upgrade: {e}"));
                return Err(());
            }
        };
        if let Some(pidfile) = &config.server.pidfile
            && let Some(pid) = live_pid_in(pidfile)
            && handover.as_ref().is_none_or(|h| h.old_pid.as_raw() != pid)
        {
            fatal(&config, &format!("another fdtserver (pid {pid}) is running with pidfile {}", pidfile.display()));
            return Err(());
        }
        let mut problems = systemd::adopt_listen_fds(&mut inherited);
        let mut listeners = BTreeMap::new();
        for l in &config.listeners {
            match adopt_or_bind(&mut inherited, l) {
                Ok(bound) => {
                    listeners.insert(l.key(), bound);
                }
                Err(e) => problems.push(e),
            }
        }
        // The agent check's socket: the old master's (binary upgrade) or systemd's when it is
        // the one at this address, else bound here. One the old master handed over for another
        // address is closed.
        let agent_socket = config.server.agent_check.and_then(|address| {
            let socket = match inherited.take_socket(agent::UPGRADE_KEY, &crate::config::Address::Tcp(address)) {
                Some(socket) => agent::adopt(socket, address),
                None => agent::bind(address),
            };
            socket.map(|s| (address, s)).map_err(|e| problems.push(e)).ok()
        });
        let rotation = handover.as_ref().and_then(|h| h.rotation).unwrap_or(agent::Rotation::In);
        let control_path = &config.server.control_socket;
        let control = match handover.as_mut().and_then(|h| h.control.take()) {
            // The old master's socket, at the same path: shared until this master takes over.
            Some(fd) => ControlServer::adopt(fd, control_path).or_else(|e| {
                log::warn!("{e}; binding a control socket of my own");
                ControlServer::bind(control_path)
            }),
            None => ControlServer::bind(control_path),
        }
        .map_err(|e| {
            // "Not a directory" alone does not say which part of the path is a file.
            let why = crate::preflight::directory_for(control_path, crate::preflight::Missing::Created)
                .err()
                .unwrap_or_else(|| e.to_string());
            problems.push(format!("cannot open the control socket {}: {why}", control_path.display()))
        });
        // The event bus's directory, beside the control socket (see `bus`), opened here and
        // handed to every worker: it reaches it even when the path is closed to its user.
        let mut bus_dir = None;
        if control.is_ok() {
            let identity = crate::privileges::resolve(config.server.user.as_deref(), config.server.group.as_deref());
            let path = crate::bus::dir(control_path);
            match crate::bus::prepare_dir(&path, identity.ok().flatten().as_ref())
                .and_then(|()| std::fs::File::open(&path))
            {
                Ok(dir) => bus_dir = Some(dir),
                Err(e) => problems.push(format!("cannot make the event bus directory {}: {e}", path.display())),
            }
        }
        // The pidfile is written once the first generation serves; a path that can never hold
        // it (a component that is a file) is refused now, as `check` refuses it.
        if let Some(pidfile) = &config.server.pidfile
            && let Err(e) = crate::preflight::directory_for(pidfile, crate::preflight::Missing::Created)
        {
            problems.push(format!("cannot write pidfile {}: {e}", pidfile.display()));
        }
        if !problems.is_empty() {
            for p in &problems {
                fatal(&config, p);
            }
            // The control socket bound above belongs to no server now.
            if let Ok(control) = &control {
                control.remove_file();
            }
            return Err(());
        }
        let mut control = control.map_err(|_| ())?;
        if let Some((address, _)) = &agent_socket {
            log::info!("agent check: listening on {address} (rotation: {})", rotation.name());
        }
        let mut agent = agent::Agent::new(rotation, agent_socket);
        let setup = (|| -> io::Result<(RunDir, Poll, SignalPipe)> {
            let runtime_dir = RunDir::create(&std::env::temp_dir())
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create the runtime directory: {e}")))?;
            let poll = Poll::new()?;
            let signals = SignalPipe::install()?;
            poll.registry().register(&mut SourceFd(&signals.read.as_raw_fd()), SIGNAL_TOKEN, Interest::READABLE)?;
            // A new master of a binary upgrade leaves the control socket (and the agent check)
            // to the old one until its own generation serves.
            if handover.is_none() {
                control.register(poll.registry(), CONTROL_TOKEN)?;
                agent.register(poll.registry())?;
            }
            Ok((runtime_dir, poll, signals))
        })();
        let (runtime_dir, poll, signals) = match setup {
            Ok(s) => s,
            Err(e) => {
                fatal(&config, &format!("cannot set up the master: {e}"));
                control.remove_file();
                return Err(());
            }
        };
        let load = match crate::balance::LoadTable::new() {
            // Lives as long as the master: leaked on purpose.
            Ok(t) => Box::leak(Box::new(t)),
            Err(e) => {
                fatal(&config, &format!("cannot map the shared load table: {e}"));
                control.remove_file();
                runtime_dir.remove();
                return Err(());
            }
        };
        for l in listeners.values() {
            log::info!("listening on {} ({}, {})", l.local, l.address, l.origin.name());
        }
        for key in inherited.close_upgrade_leftovers() {
            log::info!("closed the old master's listener {key}: the config no longer has it");
        }
        if !inherited.is_empty() {
            log::warn!(
                "passed sockets that no [[listen]] uses (kept for a reload that adds them): {}",
                inherited.leftovers().join(", ")
            );
        }
        let Some(bus_dir) = bus_dir else { return Err(()) };
        let mut master = Master {
            bus_dir,
            config_path: config.path.clone(),
            config: Arc::new(config),
            poll,
            signals,
            listeners,
            table: Table::default(),
            control,
            runtime_dir,
            stopping: None,
            reload_waiters: Vec::new(),
            reload_again: None,
            pending_replies: Vec::new(),
            respawns: Vec::new(),
            next_generation: 1,
            started: Instant::now(),
            counters: Counters::default(),
            startup_failure: None,
            pidfile_written: false,
            load,
            retired_events: BTreeMap::new(),
            retired_closed: BTreeMap::new(),
            agent,
            notifier: systemd::Notifier::from_env(),
            inherited,
            argv: std::env::args_os().collect(),
            upgrade: None,
            handover: None,
            handed_over: false,
            old_master: None,
        };
        if let Some(h) = handover {
            log::info!("binary upgrade: starting in place of the old master (pid {})", h.old_pid);
            master.next_generation = h.next_generation;
            master.handover = Some(h);
        }
        let config = Config::clone(&master.config);
        if let Err(reason) = master.boot_generation(config) {
            fatal(&master.config, &reason);
            master.cleanup();
            return Err(());
        }
        Ok(master)
    }

    /// The master loop. Returns the exit status.
    fn run_loop(&mut self) -> i32 {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("poll failed: {e}");
            }
            // What children said comes first (a worker's last words before its exit is reaped),
            // then signals in their fixed order, then control requests.
            let mut happened: Vec<Event> = Vec::new();
            let mut requests: Vec<Event> = Vec::new();
            let mut agent_checks = false;
            for event in events.iter() {
                match event.token() {
                    SIGNAL_TOKEN => {}
                    CONTROL_TOKEN => self.control.accept(self.poll.registry()),
                    upgrade::UPGRADE_TOKEN => happened.extend(self.read_new_master().into_iter().map(Event::NewMaster)),
                    agent::LISTENER_TOKEN => agent_checks = true,
                    Token(t) if t >= agent::CONN_TOKEN_BASE => {
                        self.agent.ready(t - agent::CONN_TOKEN_BASE, self.poll.registry());
                    }
                    Token(t) if t >= control::CONN_TOKEN_BASE => {
                        let id = t - control::CONN_TOKEN_BASE;
                        if let Some(request) = self.control.ready(id, self.poll.registry()) {
                            requests.push(Event::Control(id, request));
                        }
                    }
                    Token(t) => {
                        let pid = Pid::from_raw((t - WORKER_TOKEN_BASE) as i32);
                        happened.extend(self.read_worker(pid).into_iter().map(|m| Event::Worker(pid, m)));
                    }
                }
            }
            happened.extend(self.signals.take().into_iter().map(Event::Signal));
            happened.extend(requests);
            happened.extend(agent_checks.then_some(Event::AgentCheck));
            for event in happened {
                match event {
                    Event::Signal(sig) => self.on_signal(sig),
                    Event::Worker(pid, msg) => self.on_worker_message(pid, msg),
                    Event::NewMaster(said) => self.on_new_master(said),
                    Event::Control(id, request) => self.on_control(id, request),
                    Event::AgentCheck => {
                        let state = self.node_state();
                        self.agent.accept(self.poll.registry(), state);
                    }
                }
            }
            self.on_timers();
            if self.stopping.is_some() && self.table.workers.is_empty() {
                return self.exit();
            }
        }
    }

    fn on_signal(&mut self, sig: Sig) {
        match sig {
            Sig::Child => self.reap(),
            Sig::Terminate => self.begin_stop(self.stopping.is_some()),
            Sig::Quit => self.begin_stop(true),
            Sig::Reload => {
                log::info!("HUP: reloading {}", self.config_path.display());
                self.begin_reload(None);
            }
            Sig::Reopen => self.reopen_logs(),
            Sig::Upgrade => {
                log::info!("USR2: binary upgrade");
                self.begin_upgrade();
            }
            Sig::MoreWorkers => self.resize(1),
            Sig::FewerWorkers => self.resize(-1),
        }
    }

    // ---- workers --------------------------------------------------------------------------

    /// Forks one worker of `generation` for `slot`.
    fn spawn_worker(&mut self, generation: u64, slot: usize) -> io::Result<Pid> {
        let gen_ = &self.table.generations[&generation];
        let listeners: Vec<_> = gen_
            .config
            .listeners
            .iter()
            .map(|l| (self.listeners[&l.key()].socket.as_raw_fd(), l.address.clone(), l.app.clone()))
            .collect();
        let (master_end, worker_end) = UnixStream::pair()?;
        let master_pid = Pid::this();
        let load_index = self
            .load
            .claim(generation)
            .ok_or_else(|| io::Error::other(format!("more than {} workers alive at once", crate::balance::RECORDS)))?;
        // Fork before threads: the master is single-threaded (checked inside), the worker
        // starts its threads after this point.
        let (fork, saved_mask) = sys::fork_with_signals_blocked().inspect_err(|_| self.load.release(load_index))?;
        match fork {
            Fork::Child => worker::run(
                WorkerSpec {
                    slot,
                    generation,
                    config: gen_.config.clone(),
                    listeners,
                    plugins: gen_.plugins.clone(),
                    channel: worker_end.into_raw_fd(),
                    master_pid,
                    master_signals: self.signals.ids.clone(),
                    load: self.load,
                    load_index,
                    identity: gen_.identity.clone(),
                    bus_dir: self.bus_dir.as_raw_fd(),
                },
                saved_mask,
            ),
            Fork::Parent(pid) => {
                let _ = sys::restore_signal_mask(&saved_mask);
                drop(worker_end);
                master_end.set_nonblocking(true)?;
                let mut channel = mio::net::UnixStream::from_std(master_end);
                self.poll.registry().register(
                    &mut channel,
                    Token(WORKER_TOKEN_BASE + pid.as_raw() as usize),
                    Interest::READABLE,
                )?;
                let mut worker = Worker::new(pid, generation, slot, channel, load_index);
                let max_requests = gen_.config.server.max_requests;
                worker.request_limit = (max_requests > 0).then(|| max_requests + supervise::jitter(max_requests));
                self.table.workers.insert(pid, worker);
                log::debug!("forked worker {slot} of generation {generation}: pid {pid}");
                Ok(pid)
            }
        }
    }

    fn send(&mut self, pid: Pid, msg: MasterMessage) {
        if let Some(w) = self.table.workers.get_mut(&pid) {
            // A broken channel means the worker is gone (waitpid tells); a full one, that it is
            // stuck: the rest goes out as it reads (see `on_timers`).
            let _ = w.outbox.send(&mut w.channel, &msg.to_string());
        }
    }

    fn read_worker(&mut self, pid: Pid) -> Vec<WorkerMessage> {
        let mut messages = Vec::new();
        let Some(w) = self.table.workers.get_mut(&pid) else {
            return messages;
        };
        let mut buf = [0u8; 4096];
        loop {
            match w.channel.read(&mut buf) {
                Ok(0) => {
                    let _ = self.poll.registry().deregister(&mut w.channel);
                    break;
                }
                Ok(n) => w.lines.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        while let Some(line) = w.lines.next_line() {
            match WorkerMessage::parse(&line) {
                Some(m) => messages.push(m),
                None => log::warn!("worker {pid} sent an unknown message: {line:?}"),
            }
        }
        messages
    }

    fn on_worker_message(&mut self, pid: Pid, msg: WorkerMessage) {
        let Some(w) = self.table.workers.get_mut(&pid) else {
            return;
        };
        w.last_heard = Instant::now();
        let generation = w.generation;
        let gen_state = self.table.generations.get(&generation).map(|g| g.state);
        match msg {
            WorkerMessage::Stats(stats) => self.on_stats(pid, stats),
            WorkerMessage::StoppedAccepting => w.accepting = false,
            WorkerMessage::Events(events) => w.events = events,
            WorkerMessage::Closed(counts) => w.closed = counts,
            WorkerMessage::Accepting => {
                if w.state == WorkerState::Ready {
                    w.state = WorkerState::Serving;
                }
                self.on_replacement_accepting(pid);
            }
            WorkerMessage::Failed(reason) => {
                w.failure = Some(reason.clone());
                if matches!(gen_state, Some(GenState::Booting { .. })) {
                    self.abandon(generation, reason);
                } else {
                    log::error!("worker {} (pid {pid}) failed to start: {reason}", w.slot);
                }
            }
            WorkerMessage::Ready if matches!(w.state, WorkerState::Draining | WorkerState::Stopping) => {
                // Told to drain (TTOU, or its generation was replaced) or to stop while it was
                // still starting: it keeps that state and is never told to accept; the message
                // already queued on its channel makes it exit, and that exit is no crash.
                log::debug!("worker {} (pid {pid}) is ready, and stays {}", w.slot, w.state.name());
            }
            WorkerMessage::Ready => {
                w.state = WorkerState::Ready;
                match gen_state {
                    Some(GenState::Booting { .. }) => {
                        let gen_ = &self.table.generations[&generation];
                        let ready = self.table.workers_of(generation).filter(|w| w.state == WorkerState::Ready).count();
                        if ready >= gen_.target_workers {
                            self.promote(generation);
                        }
                    }
                    Some(GenState::Active) if self.stopping.is_none() => {
                        w.accepting = true;
                        self.send(pid, MasterMessage::Accept);
                        log::info!(
                            "worker {} (pid {pid}) of generation {generation} serving",
                            self.table.workers[&pid].slot
                        );
                    }
                    _ => self.send(pid, MasterMessage::Stop),
                }
            }
        }
    }

    /// Reaps every child that exited (SIGCHLDs merge, so loop until none is left).
    fn reap(&mut self) {
        loop {
            let (pid, how, signal) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, 0)) => (pid, "exited".to_string(), None),
                Ok(WaitStatus::Exited(pid, code)) => (pid, format!("exited with status {code}"), None),
                Ok(WaitStatus::Signaled(pid, sig, core)) => (
                    pid,
                    format!("was killed by {sig} (signal {}){}", sig as i32, if core { " (core dumped)" } else { "" }),
                    Some(sig),
                ),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    break;
                }
            };
            if !self.on_new_master_exit(pid, &how) {
                self.on_worker_exit(pid, &how, signal);
            }
        }
        self.retire_finished_generations();
    }

    /// A worker exited (`how`, for the log; `signal`: the signal that ended it): forget it, and
    /// replace it if its generation serves and has fewer live workers than its target.
    ///
    /// Back-off: a slot whose workers keep dying within `STABLE_AFTER` of starting is
    /// respawned at once the first time, then after a delay that doubles. The delay is capped
    /// at 30 s for a worker that died before it reported ready (its app cannot start) or that
    /// crashed while other workers serve; at 1 s for a worker that had reported ready and was
    /// killed from outside (`kill -9`, the OOM killer: logged as such, never as a crash loop)
    /// or was the generation's last live one: back-off never leaves a serving generation with
    /// no worker for long, and a worker killed or crashing again and again soon after its
    /// start costs at most a fork a second.
    fn on_worker_exit(&mut self, pid: Pid, how: &str, signal: Option<Signal>) {
        if let Some(w) = self.table.workers.get_mut(&pid) {
            w.accepting = false;
        }
        // Read what the worker said last (such as why it failed) before forgetting it: its
        // exit may be noticed before its last message.
        for msg in self.read_worker(pid) {
            match (msg, self.table.workers.get_mut(&pid)) {
                (WorkerMessage::Failed(reason), Some(w)) => w.failure = Some(reason),
                (WorkerMessage::Events(events), Some(w)) => w.events = events,
                (WorkerMessage::Closed(counts), Some(w)) => w.closed = counts,
                _ => {}
            }
        }
        let Some(mut w) = self.table.workers.remove(&pid) else {
            return;
        };
        // Its counts stay in the totals after it is gone.
        for (app, event, n) in std::mem::take(&mut w.events) {
            *self.retired_events.entry((app, event)).or_insert(0) += n;
        }
        for (reason, n) in std::mem::take(&mut w.closed) {
            *self.retired_closed.entry(reason).or_insert(0) += n;
        }
        let _ = self.poll.registry().deregister(&mut w.channel);
        self.load.release(w.load_index);
        self.forget_recycle(pid, w.replaces, w.replacement);
        let how = match &w.killed {
            Some(limit) => format!("{how} (killed by the master: {limit})"),
            None => how.to_string(),
        };
        let how = how.as_str();
        let Some(gen_) = self.table.generations.get_mut(&w.generation) else {
            return;
        };
        match gen_.state {
            GenState::Booting { .. } => {
                let reason = w.failure.take().unwrap_or_else(|| {
                    format!("worker {} (pid {pid}) of generation {} {how} before it was ready", w.slot, gen_.id)
                });
                let id = gen_.id;
                self.abandon(id, reason);
            }
            GenState::Active if self.stopping.is_none() && w.state != WorkerState::Draining => {
                let id = gen_.id;
                let target = gen_.target_workers;
                let live = self.filled_slots(id).len();
                if live >= target {
                    // Its place is taken already (a replacement started for it): replacing it
                    // too would leave one worker more than the target.
                    log::info!(
                        "worker {} (pid {pid}) of generation {id} {how}; not replaced: {live} of {target} worker(s) live",
                        w.slot
                    );
                    return;
                }
                self.counters.worker_restarts += 1;
                let was_ready = matches!(w.state, WorkerState::Ready | WorkerState::Serving);
                let outside = was_ready && w.killed.is_none() && signal.is_some_and(table::killed_from_outside);
                // No other worker of the generation is alive (a respawn that is only queued
                // serves nobody).
                let last = was_ready && self.table.live_slots(id).is_empty();
                let gen_ = self.table.generations.get_mut(&id).expect("checked above");
                let lived = w.started.elapsed();
                let history = gen_.crashes.entry(w.slot).or_default();
                if lived < table::STABLE_AFTER {
                    history.quick_deaths += 1;
                } else {
                    *history = CrashHistory { quick_deaths: 1 };
                }
                let quick = history.quick_deaths;
                // A worker that had started its apps shows that they can start: when it was
                // killed from outside, or no other worker is left, it is replaced at once, and
                // if it keeps dying soon after it started, after a delay of at most 1 s (so
                // that neither a memory limit it reaches after its start nor an app that
                // crashes soon after it started makes the master fork in a tight loop).
                let cap = if outside || last { table::RESPAWN_SHORT_MAX_DELAY } else { table::RESPAWN_MAX_DELAY };
                let delay = table::respawn_delay(quick, cap);
                let when = if delay.is_zero() { "now".to_string() } else { format!("in {} ms", delay.as_millis()) };
                if outside {
                    let again = if quick > 1 {
                        format!(
                            "; killed from outside {quick} times in a row within {} s of starting",
                            table::STABLE_AFTER.as_secs()
                        )
                    } else {
                        String::new()
                    };
                    log::warn!(
                        "worker {} (pid {pid}) of generation {id} {how}, sent from outside fdtserver (an operator, or the kernel's OOM killer: see `dmesg`){again}; it had started its apps, so it is replaced {when}",
                        w.slot
                    );
                    self.respawns.push(Respawn { generation: id, slot: w.slot, at: Instant::now() + delay });
                    return;
                }
                let why = w.failure.as_deref().map(|f| format!(": {f}")).unwrap_or_default();
                if quick >= table::CRASH_LOOP_THRESHOLD {
                    log::error!(
                        "CRASH LOOP: worker {} of generation {id} {how}{why}; it died {quick} times in a row within {} s of starting. Next attempt in {} ms. Fix the app and reload.",
                        w.slot,
                        table::STABLE_AFTER.as_secs(),
                        delay.as_millis()
                    );
                } else {
                    log::error!(
                        "worker {} (pid {pid}) of generation {id} {how}{why}; replacing it{}",
                        w.slot,
                        if delay.is_zero() { String::new() } else { format!(" in {} ms", delay.as_millis()) }
                    );
                }
                self.respawns.push(Respawn { generation: id, slot: w.slot, at: Instant::now() + delay });
            }
            _ => log::debug!("worker {} (pid {pid}) of generation {} {how}", w.slot, gen_.id),
        }
    }

    /// Slots of `generation` that count toward its target: those with a live worker (see
    /// [`Table::live_slots`]) and those waiting for a respawn.
    fn filled_slots(&self, generation: u64) -> std::collections::BTreeSet<usize> {
        let mut slots = self.table.live_slots(generation);
        slots.extend(self.respawns.iter().filter(|r| r.generation == generation).map(|r| r.slot));
        slots
    }

    /// Forgets generations that are done: drained or abandoned, with no worker left.
    fn retire_finished_generations(&mut self) {
        let done: Vec<u64> = self
            .table
            .generations
            .values()
            .filter(|g| matches!(g.state, GenState::Draining { .. } | GenState::Abandoned))
            .filter(|g| self.table.workers_of(g.id).next().is_none())
            .map(|g| g.id)
            .collect();
        let retired = done.len();
        for id in done {
            if let Some(gen_) = self.table.generations.remove(&id)
                && let GenState::Draining { since, .. } = gen_.state
            {
                let ms = since.elapsed().as_millis() as u64;
                self.counters.last_drain_ms = Some(ms);
                self.counters.drains += 1;
                self.counters.drain_ms_total += ms;
                log::info!("generation {id} finished draining in {ms} ms");
            }
        }
        if retired == 0 {
            return;
        }
        let keep: Vec<&Path> =
            self.table.generations.values().flat_map(|g| g.plugins.values().map(PathBuf::as_path)).collect();
        crate::plugin::pin::prune(&self.runtime_dir.plugins(), &keep);
    }

    // ---- generations and reloads ----------------------------------------------------------

    /// Starts the reload asked for while another one was booting, once that one is decided.
    fn start_queued_reload(&mut self) {
        if self.table.booting_id().is_some() || self.stopping.is_some() {
            return;
        }
        let Some(waiters) = self.reload_again.take() else { return };
        log::info!("reloading again, as asked during the previous reload");
        let mut waiters = waiters.into_iter();
        self.begin_reload(waiters.next());
        if self.table.booting_id().is_some() {
            // The others wait for the same outcome.
            self.reload_waiters.extend(waiters);
        } else {
            // Refused at once: each hears why.
            for w in waiters {
                self.begin_reload(Some(w));
            }
        }
    }

    /// Reads the config and starts a new generation; on failure nothing has changed.
    fn begin_reload(&mut self, waiter: Option<usize>) {
        if self.stopping.is_some() {
            self.reply_reload(waiter, Err("the server is stopping".into()));
            return;
        }
        if self.upgrade.is_some() || self.handover.is_some() {
            let why = "a binary upgrade is under way";
            log::warn!("reload refused: {why}");
            self.reply_reload(waiter, Err(why.into()));
            return;
        }
        if self.table.booting_id().is_some() {
            // A reload is already under way, with the config as it was when it started: this
            // one runs after it (see `on_timers`).
            self.reload_again.get_or_insert_with(Vec::new).extend(waiter);
            return;
        }
        self.notifier.reloading();
        let result = Config::load(&self.config_path).map_err(|e| e.to_string());
        let result = result.and_then(|config| Master::check_log_paths(&config).map(|()| config));
        let result = result.and_then(|config| self.agent.prepare(config.server.agent_check).map(|()| config));
        let result = result.and_then(|config| self.boot_generation(config));
        match result {
            Ok(_) => self.reload_waiters.extend(waiter),
            Err(reason) => {
                self.agent.discard();
                self.counters.reloads_failed += 1;
                self.counters.last_reload_error = Some(reason.clone());
                log::error!("reload refused: {reason}; {}", self.keeps_serving());
                self.notifier.ready(&format!("reload refused: {reason}; {}", self.keeps_serving()));
                self.reply_reload(waiter, Err(reason));
            }
        }
    }

    fn keeps_serving(&self) -> String {
        match self.table.active_id() {
            Some(id) => format!("generation {id} keeps serving"),
            None => "nothing is serving".into(),
        }
    }

    /// Binds new listeners, pins plugins and forks the workers of a new generation.
    fn boot_generation(&mut self, mut config: Config) -> Result<u64, String> {
        // Certificates and keys are read afresh for every generation; ones that do not load
        // refuse it (the generation serving now goes on).
        config.load_tls()?;
        for l in &config.listeners {
            if !self.listeners.contains_key(&l.key()) {
                let bound = adopt_or_bind(&mut self.inherited, l).inspect_err(|_| self.close_unused_listeners())?;
                log::info!("listening on {} ({}, {})", bound.local, bound.address, bound.origin.name());
                self.listeners.insert(l.key(), bound);
            }
        }
        let identity = crate::privileges::resolve(config.server.user.as_deref(), config.server.group.as_deref())
            .inspect_err(|_| self.close_unused_listeners())?;
        // Every app, also one no listener names (a service that serves nothing); its plugin
        // file is pinned in a child process that may take at most `PIN_TIMEOUT` (a file on a
        // hung mount never hangs the master).
        let apps: Vec<(String, PathBuf)> =
            config.apps.values().map(|app| (app.name.clone(), app.plugin.clone())).collect();
        let files: Vec<&Path> = apps.iter().map(|(_, p)| p.as_path()).collect();
        let pinned = crate::plugin::pin::pin_all(&files, &self.runtime_dir.plugins(), crate::plugin::pin::PIN_TIMEOUT)
            .inspect_err(|_| self.close_unused_listeners())?;
        let mut plugins = BTreeMap::new();
        for ((name, plugin), pinned) in apps.into_iter().zip(pinned) {
            // Readable by the workers' user whatever the umask: they load it after dropping root.
            let pinned = pinned
                .and_then(|p| std::fs::set_permissions(&p.path, std::fs::Permissions::from_mode(0o644)).map(|()| p));
            match pinned {
                Ok(pinned) => {
                    if pinned.unchanged {
                        log::debug!(
                            "app {name}: plugin {} unchanged: reusing its pinned copy {}",
                            plugin.display(),
                            pinned.path.display()
                        );
                    } else {
                        log::debug!("app {name}: plugin {} pinned as {}", plugin.display(), pinned.path.display());
                    }
                    plugins.insert(name, pinned.path)
                }
                Err(e) => {
                    self.close_unused_listeners();
                    return Err(format!("app {name}: plugin {}: {e}", plugin.display()));
                }
            };
        }
        let id = self.next_generation;
        self.next_generation += 1;
        let workers = config.server.workers;
        let deadline = Instant::now() + config.server.boot_timeout;
        self.table.generations.insert(
            id,
            Generation {
                id,
                config: Arc::new(config),
                plugins,
                state: GenState::Booting { deadline },
                started: Instant::now(),
                target_workers: workers,
                crashes: BTreeMap::new(),
                identity,
            },
        );
        for slot in 0..workers {
            if let Err(e) = self.spawn_worker(id, slot) {
                let reason = format!("cannot fork a worker: {e}");
                self.abandon(id, reason.clone());
                return Err(reason);
            }
        }
        log::info!("generation {id}: starting {workers} worker(s)");
        let heartbeat = self.table.generations[&id].config.server.heartbeat_timeout;
        if supervise::effective_heartbeat_timeout(heartbeat) != heartbeat {
            log::warn!(
                "heartbeat_timeout {} s is shorter than two heartbeats; using {} s",
                heartbeat.as_secs_f64(),
                supervise::MIN_HEARTBEAT_TIMEOUT.as_secs_f64()
            );
        }
        Ok(id)
    }

    /// Every worker of a booting generation is ready: it takes over.
    fn promote(&mut self, id: u64) {
        let old = self.table.active_id();
        if let Some(old) = old {
            let takers = self.table.generations.get(&id).map_or(1, |g| g.target_workers as u64);
            self.drain_generation(old, Some((id, takers)));
        }
        let gen_ = self.table.generations.get_mut(&id).expect("promoted generation exists");
        gen_.state = GenState::Active;
        let took = gen_.started.elapsed().as_millis();
        self.config = gen_.config.clone();
        self.agent.commit(self.poll.registry());
        crate::logging::set_level(self.config.server.log_level);
        self.switch_log_files();
        for pid in self.table.pids_of(id) {
            if let Some(w) = self.table.workers.get_mut(&pid) {
                w.accepting = true;
            }
            self.send(pid, MasterMessage::Accept);
        }
        match old {
            Some(old) => {
                self.counters.reloads_ok += 1;
                log::info!("reloaded: generation {id} serving (ready in {took} ms); generation {old} draining");
            }
            None => {
                let s = &self.config.server;
                log::info!(
                    "generation {id} serving: {} worker(s) × {} thread(s), ready in {took} ms",
                    s.workers,
                    s.threads
                );
                self.write_pidfile();
                self.take_over();
            }
        }
        let s = &self.config.server;
        self.notifier.ready(&format!("generation {id} serving: {} worker(s) × {} thread(s)", s.workers, s.threads));
        self.close_unused_listeners();
        // Answered once the old workers confirm they stopped accepting (see on_timers).
        let waiters = std::mem::take(&mut self.reload_waiters);
        let deadline = Instant::now() + REPLY_AFTER_DRAIN_WAIT;
        self.pending_replies.extend(waiters.into_iter().map(|w| (w, id, deadline)));
        self.send_pending_replies();
    }

    /// Answers reloads whose old generation no longer accepts (or that waited long enough).
    fn send_pending_replies(&mut self) {
        if self.pending_replies.is_empty() {
            return;
        }
        let active = self.table.active_id();
        let old_accepting = self.table.workers.values().any(|w| w.accepting && Some(w.generation) != active);
        let now = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_replies)
            .into_iter()
            .partition(|(_, _, deadline)| !old_accepting || now >= *deadline);
        self.pending_replies = wait;
        for (waiter, generation, _) in due {
            self.reply_reload(Some(waiter), Ok(generation));
        }
    }

    /// Drains generation `id`; `successor`: the generation that serves after it (a reload), to
    /// whose workers (how many) its workers hand their connections.
    fn drain_generation(&mut self, id: u64, successor: Option<(u64, u64)>) {
        let Some(gen_) = self.table.generations.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        gen_.state =
            GenState::Draining { since: now, kill_at: now + gen_.config.server.graceful_timeout + DRAIN_KILL_MARGIN };
        for pid in self.table.pids_of(id) {
            if let Some(w) = self.table.workers.get_mut(&pid) {
                w.state = WorkerState::Draining;
            }
            self.send(
                pid,
                successor
                    .map_or(MasterMessage::Drain, |(generation, takers)| MasterMessage::Handoff { generation, takers }),
            );
        }
        self.respawns.retain(|r| r.generation != id);
    }

    /// A booting generation failed: kill its workers, keep the old one, report why.
    fn abandon(&mut self, id: u64, reason: String) {
        let Some(gen_) = self.table.generations.get_mut(&id) else {
            return;
        };
        if gen_.state == GenState::Abandoned {
            return;
        }
        gen_.state = GenState::Abandoned;
        self.agent.discard();
        for pid in self.table.pids_of(id) {
            // Nothing was accepted by a booting worker: killing it loses nothing.
            let _ = kill(pid, Signal::SIGKILL);
            if let Some(w) = self.table.workers.get_mut(&pid) {
                w.state = WorkerState::Stopping;
            }
        }
        if self.stopping.is_some() {
            // Abandoned because the server stops: not a failure of the generation.
            log::info!("generation {id} abandoned: {reason}");
        } else if self.table.active_id().is_none() {
            // The first generation: the server cannot start.
            fatal(&self.config, &format!("cannot start: {reason}"));
            self.startup_failure = Some(reason.clone());
            self.begin_stop(true);
        } else {
            self.counters.reloads_failed += 1;
            self.counters.last_reload_error = Some(reason.clone());
            log::error!("reload failed: {reason}; {}", self.keeps_serving());
            self.notifier.ready(&format!("reload failed: {reason}; {}", self.keeps_serving()));
        }
        self.close_unused_listeners();
        let waiters = std::mem::take(&mut self.reload_waiters);
        for w in waiters {
            self.reply_reload(Some(w), Err(reason.clone()));
        }
    }

    /// Closes the master's copy of listeners that neither the active nor a booting generation
    /// serves (draining workers keep their own copies until they exit).
    fn close_unused_listeners(&mut self) {
        let used: Vec<String> = self
            .table
            .generations
            .values()
            .filter(|g| matches!(g.state, GenState::Active | GenState::Booting { .. }))
            .flat_map(|g| g.config.listeners.iter().map(|l| l.key()))
            .collect();
        let unused: Vec<String> = self.listeners.keys().filter(|a| !used.contains(a)).cloned().collect();
        for address in unused {
            if let Some(l) = self.listeners.remove(&address) {
                log::info!("no longer listening on {}", l.address);
                l.remove_file();
            }
        }
    }

    fn reply_reload(&mut self, waiter: Option<usize>, outcome: Result<u64, String>) {
        let Some(id) = waiter else { return };
        let response = match outcome {
            Ok(generation) => Response::json(200, &serde_json::json!({ "ok": true, "generation": generation })),
            Err(reason) => Response::json(409, &serde_json::json!({ "ok": false, "error": reason })),
        };
        self.control.respond(id, response, self.poll.registry());
    }

    /// TTIN / TTOU: one worker more or fewer in the active generation.
    fn resize(&mut self, delta: i32) {
        if self.stopping.is_some() {
            return;
        }
        let Some(id) = self.table.active_id() else {
            return;
        };
        let gen_ = self.table.generations.get_mut(&id).expect("active exists");
        if delta > 0 {
            gen_.target_workers += 1;
            let target = gen_.target_workers;
            // A slot waiting for a respawn is taken too.
            let mut occupied = self.table.occupied_slots(id);
            occupied.extend(self.respawns.iter().filter(|r| r.generation == id).map(|r| r.slot));
            let slot = (0..).find(|s| !occupied.contains(s)).unwrap_or(0);
            log::info!("TTIN: {target} worker(s)");
            if let Err(e) = self.spawn_worker(id, slot) {
                // The target stands: the ordinary respawn path tries again.
                log::error!("cannot fork a worker: {e}; retrying in 1 s");
                self.respawns.push(Respawn { generation: id, slot, at: Instant::now() + Duration::from_secs(1) });
            }
        } else if gen_.target_workers > 1 {
            gen_.target_workers -= 1;
            let target = gen_.target_workers;
            log::info!("TTOU: {target} worker(s)");
            // The highest slot goes as a whole: every live worker in it (a worker being
            // recycled and its replacement, still starting, are one slot) and its queued
            // respawn.
            let Some(slot) = self.filled_slots(id).last().copied() else {
                return;
            };
            self.respawns.retain(|r| r.generation != id || r.slot != slot);
            let victims: Vec<Pid> = self
                .table
                .workers_of(id)
                .filter(|w| w.slot == slot && !matches!(w.state, WorkerState::Draining | WorkerState::Stopping))
                .map(|w| w.pid)
                .collect();
            for pid in victims {
                if let Some(w) = self.table.workers.get_mut(&pid) {
                    w.state = WorkerState::Draining;
                }
                let takers = self.table.workers_of(id).filter(|w| w.state != WorkerState::Draining).count() as u64;
                self.send(pid, MasterMessage::Handoff { generation: id, takers });
            }
        } else {
            log::warn!("TTOU: already down to one worker");
        }
    }

    // ---- stopping -------------------------------------------------------------------------

    fn begin_stop(&mut self, fast: bool) {
        let now = Instant::now();
        if let Some(stopping) = &mut self.stopping {
            if fast && !stopping.fast {
                log::warn!("fast stop: closing every connection now");
                stopping.fast = true;
                stopping.kill_at = now + FAST_STOP_GRACE;
                for pid in self.table.workers.keys().copied().collect::<Vec<_>>() {
                    self.send(pid, MasterMessage::Stop);
                }
            }
            return;
        }
        let timeout = self.config.server.graceful_timeout;
        if fast {
            log::info!("stopping now (fast)");
        } else {
            log::info!(
                "stopping: no new connections; waiting up to {} s for connections in progress",
                timeout.as_secs_f64()
            );
        }
        // From here on the master is stopping (so a booting generation abandoned below is not a
        // failed start or reload).
        let kill_at = now + if fast { FAST_STOP_GRACE } else { timeout + DRAIN_KILL_MARGIN };
        self.stopping = Some(Stopping { fast, kill_at });
        // New connections are refused from now on: close our copy of every listener (each
        // worker closes its own as its acceptors notice the drain).
        for (_, l) in std::mem::take(&mut self.listeners) {
            l.remove_file();
        }
        if let Some(id) = self.table.booting_id() {
            self.abandon(id, "the server is stopping".into());
        }
        self.respawns.clear();
        let ids: Vec<u64> = self.table.generations.keys().copied().collect();
        for id in ids {
            if fast {
                for pid in self.table.pids_of(id) {
                    self.send(pid, MasterMessage::Stop);
                }
            } else if self.table.generations[&id].state == GenState::Active {
                // After a binary upgrade the new master's workers take the connections.
                // After a binary upgrade the new master's workers take the connections (as many
                // as this one ran: it has the same config).
                let takers = self.config.server.workers as u64;
                self.drain_generation(id, self.handed_over.then_some((id + 1, takers)));
            }
        }
        // After abandoning a booting generation, whose failed reload ends with READY=1. A
        // master that handed over to a new one stops quietly: the service goes on.
        if !self.handed_over {
            self.notifier.stopping();
        }
        self.abort_upgrade("the server is stopping".into());
        let mut waiters = std::mem::take(&mut self.reload_waiters);
        waiters.extend(self.reload_again.take().unwrap_or_default());
        for w in waiters {
            self.reply_reload(Some(w), Err("the server is stopping".into()));
        }
    }

    fn exit(&mut self) -> i32 {
        self.cleanup();
        match &self.startup_failure {
            Some(_) => 1,
            None => {
                log::info!("stopped");
                0
            }
        }
    }

    fn cleanup(&mut self) {
        self.control.remove_file();
        for (_, l) in std::mem::take(&mut self.listeners) {
            l.remove_file();
        }
        if self.pidfile_written
            && let Some(p) = &self.config.server.pidfile
        {
            let _ = std::fs::remove_file(p);
        }
        self.runtime_dir.remove();
    }

    fn write_pidfile(&mut self) {
        let Some(path) = self.config.server.pidfile.clone() else {
            return;
        };
        let tmp = path.with_extension("pid.tmp");
        let result = (|| -> io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
            std::fs::rename(&tmp, &path)
        })();
        match result {
            Ok(()) => self.pidfile_written = true,
            Err(e) => log::error!("cannot write pidfile {}: {e}", path.display()),
        }
    }

    // ---- timers ---------------------------------------------------------------------------

    fn next_timeout(&self) -> Duration {
        let now = Instant::now();
        let mut next = now + MAX_POLL_WAIT;
        for r in &self.respawns {
            next = next.min(r.at);
        }
        for g in self.table.generations.values() {
            match g.state {
                GenState::Booting { deadline } => next = next.min(deadline),
                GenState::Draining { kill_at, .. } => next = next.min(kill_at),
                _ => {}
            }
        }
        if let Some(s) = &self.stopping {
            next = next.min(s.kill_at);
        }
        for (_, _, deadline) in &self.pending_replies {
            next = next.min(*deadline);
        }
        if let Some(deadline) = self.next_supervision_deadline() {
            next = next.min(deadline);
        }
        if let Some(deadline) = self.next_upgrade_deadline() {
            next = next.min(deadline);
        }
        if let Some(deadline) = self.next_condemned_kill() {
            next = next.min(deadline);
        }
        if let Some(deadline) = self.agent.next_deadline() {
            next = next.min(deadline);
        }
        next.saturating_duration_since(now)
    }

    fn on_timers(&mut self) {
        self.control.expire(self.poll.registry());
        self.agent.expire(self.poll.registry());
        for w in self.table.workers.values_mut().filter(|w| !w.outbox.is_empty()) {
            let _ = w.outbox.flush(&mut w.channel);
        }
        self.send_pending_replies();
        self.retire_finished_generations();
        self.start_queued_reload();
        self.enforce_supervision_limits();
        self.kill_condemned();
        self.upgrade_timers();
        let now = Instant::now();
        let (due, later): (Vec<Respawn>, Vec<Respawn>) =
            std::mem::take(&mut self.respawns).into_iter().partition(|r| r.at <= now);
        self.respawns = later;
        for r in due {
            let active = self.table.generations.get(&r.generation).is_some_and(|g| g.state == GenState::Active);
            // Only while the generation is short of workers (a TTOU meanwhile may have lowered
            // its target).
            let short = self
                .table
                .generations
                .get(&r.generation)
                .is_some_and(|g| self.filled_slots(r.generation).len() < g.target_workers);
            if active
                && short
                && self.stopping.is_none()
                && !self.table.occupied_slots(r.generation).contains(&r.slot)
                && let Err(e) = self.spawn_worker(r.generation, r.slot)
            {
                log::error!("cannot fork a worker: {e}; retrying in 1 s");
                self.respawns.push(Respawn { at: now + Duration::from_secs(1), ..r });
            }
        }
        let gens: Vec<(u64, GenState)> = self.table.generations.values().map(|g| (g.id, g.state)).collect();
        for (id, state) in gens {
            match state {
                GenState::Booting { deadline } if now >= deadline => {
                    let waiting: Vec<String> = self
                        .table
                        .workers_of(id)
                        .filter(|w| w.state == WorkerState::Booting)
                        .map(|w| w.pid.to_string())
                        .collect();
                    let secs = self.table.generations[&id].config.server.boot_timeout.as_secs_f64();
                    self.abandon(
                        id,
                        format!(
                            "generation {id} was not ready within boot_timeout ({secs} s); still booting: pid {}",
                            waiting.join(", ")
                        ),
                    );
                }
                GenState::Draining { since, kill_at } if now >= kill_at => {
                    for pid in self.table.pids_of(id) {
                        log::warn!("worker pid {pid} of generation {id} did not finish draining in time; killing it");
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    // Once is enough: look again in a while, not at every turn of the loop.
                    if let Some(g) = self.table.generations.get_mut(&id) {
                        g.state = GenState::Draining { since, kill_at: now + MAX_POLL_WAIT };
                    }
                }
                _ => {}
            }
        }
        if let Some(s) = &self.stopping
            && now >= s.kill_at
        {
            for pid in self.table.workers.keys() {
                log::warn!("worker pid {pid} did not stop in time; killing it");
                let _ = kill(*pid, Signal::SIGKILL);
            }
            self.stopping.as_mut().expect("checked").kill_at = now + MAX_POLL_WAIT;
        }
    }

    // ---- control API ----------------------------------------------------------------------

    fn on_control(&mut self, id: usize, request: Request) {
        let response = match request {
            Request::Status => Response::json(200, &self.status_json()),
            Request::Metrics => {
                Response { status: 200, content_type: "text/plain; version=0.0.4", body: self.metrics_text() }
            }
            Request::Page => {
                Response { status: 200, content_type: "text/html; charset=utf-8", body: self.status_page() }
            }
            Request::Reload => {
                log::info!("reload requested over the control socket");
                self.begin_reload(Some(id));
                return;
            }
            Request::Stop => {
                self.control.respond(id, Response::text(202, "stopping"), self.poll.registry());
                self.begin_stop(false);
                return;
            }
            Request::Rotation(rotation) => self.set_rotation(rotation),
            Request::Bad(status, msg) => Response::text(status, msg),
        };
        self.control.respond(id, response, self.poll.registry());
    }
}

impl Master {
    /// What the agent check's answer depends on, now.
    fn node_state(&self) -> agent::NodeState {
        agent::NodeState {
            rotation: self.agent.rotation(),
            stopping: self.stopping.is_some(),
            serving: self.table.workers.values().any(|w| w.accepting),
        }
    }

    /// `POST /rotation/in|out`: the answer says what the agent check answers from now on, and
    /// how many checks it answered so far (the CLI waits for the next one).
    fn set_rotation(&mut self, rotation: agent::Rotation) -> Response {
        if self.upgrade.is_some() {
            // The new master took the rotation when it started; a change now would be lost.
            return Response::json(
                409,
                &serde_json::json!({ "ok": false, "error": "a binary upgrade is under way; change the rotation once it is done" }),
            );
        }
        let changed = self.agent.set_rotation(rotation);
        let state = self.node_state();
        let answer = agent::answer(state).trim_end();
        if changed {
            match self.agent.address() {
                Some(address) => {
                    log::info!("rotation: {} (the agent check on {address} answers {answer:?})", rotation.name())
                }
                None => log::info!("rotation: {} (no agent_check is configured)", rotation.name()),
            }
        }
        Response::json(
            200,
            &serde_json::json!({
                "ok": true,
                "node_id": self.config.server.node_id,
                "rotation": rotation.name(),
                "changed": changed,
                "agent_check": self.agent.address().map(|a| a.to_string()),
                "answer": answer,
                "checks": self.agent.checks(),
            }),
        )
    }
}

/// The inherited socket for `l` if there is one, else a freshly bound one.
fn adopt_or_bind(inherited: &mut listener::Inherited, l: &crate::config::ListenConfig) -> Result<Listener, String> {
    match inherited.take(l) {
        Ok(Some(adopted)) => Ok(adopted),
        Ok(None) => listener::bind(&l.address, l.backlog).map_err(|e| format!("cannot listen on {}: {e}", l.address)),
        Err(e) => Err(format!("cannot use the passed socket for {}: {e}", l.address)),
    }
}

/// The pid in a pidfile, if that process is alive.
fn live_pid_in(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (pid > 0 && kill(Pid::from_raw(pid), None).is_ok()).then_some(pid)
}
