//! The master's process table: every generation and every worker it has forked.
//!
//! Invariant: this is the master's only record of its children, and only the master loop
//! mutates it. At most one generation is `Active` and at most one is `Booting`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::config::Config;
use crate::ipc::{LineBuffer, WorkerStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenState {
    /// Workers are loading their apps; the reload is decided when all are ready.
    Booting { deadline: Instant },
    /// Serving: its workers accept connections.
    Active,
    /// Replaced (or stopping): its workers finish their connections and exit.
    Draining { since: Instant, kill_at: Instant },
    /// A reload that failed; its workers are being killed.
    Abandoned,
}

impl GenState {
    pub fn name(&self) -> &'static str {
        match self {
            GenState::Booting { .. } => "booting",
            GenState::Active => "active",
            GenState::Draining { .. } => "draining",
            GenState::Abandoned => "abandoned",
        }
    }
}

pub struct Generation {
    pub id: u64,
    pub config: Arc<Config>,
    /// App name → pinned plugin copy.
    pub plugins: BTreeMap<String, PathBuf>,
    pub state: GenState,
    pub started: Instant,
    /// How many workers it should run (changed by TTIN/TTOU).
    pub target_workers: usize,
    /// Slot → crash history, for back-off.
    pub crashes: BTreeMap<usize, CrashHistory>,
    /// Who its workers run as (`user`/`group`), resolved when it booted.
    pub identity: Option<crate::privileges::Identity>,
}

/// Deaths of the workers of one slot, for back-off and the crash-loop breaker.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashHistory {
    /// Deaths in a row of workers that had run less than `STABLE_AFTER`.
    pub quick_deaths: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Loading its apps.
    Booting,
    /// Apps started; waiting for the generation to be ready, or told to accept and not
    /// confirmed yet.
    Ready,
    /// Accepting and serving connections (confirmed by the worker).
    Serving,
    /// Told to drain; finishing its connections.
    Draining,
    /// Told to stop at once, or killed.
    Stopping,
}

impl WorkerState {
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Booting => "booting",
            WorkerState::Ready => "ready",
            WorkerState::Serving => "serving",
            WorkerState::Draining => "draining",
            WorkerState::Stopping => "stopping",
        }
    }
}

pub struct Worker {
    pub pid: Pid,
    pub generation: u64,
    pub slot: usize,
    pub state: WorkerState,
    pub channel: mio::net::UnixStream,
    pub lines: LineBuffer,
    pub started: Instant,
    pub stats: WorkerStats,
    pub last_heard: Instant,
    /// The reason the worker gave for failing to start.
    pub failure: Option<String>,
    /// Told to accept and not yet confirmed that it stopped.
    pub accepting: bool,
    /// Its record in the shared load table.
    pub load_index: usize,
    /// Recycled gracefully after this many requests (`max_requests` plus jitter).
    pub request_limit: Option<u64>,
    /// Since when every one of its handler threads has been busy (from its heartbeat).
    pub stalled_since: Option<Instant>,
    /// Its longest-running request, from its heartbeat: (started, peer, app).
    pub running: Option<(Instant, String, String)>,
    /// Why the master killed it (heartbeat or request timeout), for the log of its exit.
    pub killed: Option<String>,
    /// Being recycled: the worker started to take over its slot.
    pub replacement: Option<Pid>,
    /// Started to take over the slot of this (recycled) worker.
    pub replaces: Option<Pid>,
    /// A recycle whose replacement died is retried no earlier than this.
    pub recycle_not_before: Option<Instant>,
    /// Condemned (a thread stuck in app code): draining, and killed at this time.
    pub kill_at: Option<Instant>,
    /// Its apps' event counters, as last reported.
    pub events: Vec<crate::ipc::AppEvent>,
    /// Connections it closed, by reason, as it last reported them.
    pub closed: Vec<(String, u64)>,
    /// Messages to it that its channel did not take yet.
    pub outbox: crate::ipc::Outbox,
}

impl Worker {
    /// A freshly forked worker.
    pub fn new(pid: Pid, generation: u64, slot: usize, channel: mio::net::UnixStream, load_index: usize) -> Worker {
        let now = Instant::now();
        Worker {
            pid,
            generation,
            slot,
            state: WorkerState::Booting,
            channel,
            lines: LineBuffer::default(),
            started: now,
            stats: WorkerStats::default(),
            last_heard: now,
            failure: None,
            accepting: false,
            load_index,
            request_limit: None,
            stalled_since: None,
            running: None,
            killed: None,
            replacement: None,
            replaces: None,
            recycle_not_before: None,
            kill_at: None,
            events: Vec::new(),
            closed: Vec::new(),
            outbox: Default::default(),
        }
    }

    /// True while a supervision limit applies to it: neither told to stop nor killed.
    pub fn supervised(&self) -> bool {
        self.state != WorkerState::Stopping && self.killed.is_none()
    }
}

#[derive(Default)]
pub struct Table {
    pub generations: BTreeMap<u64, Generation>,
    pub workers: BTreeMap<Pid, Worker>,
}

impl Table {
    pub fn active(&self) -> Option<&Generation> {
        self.generations.values().find(|g| g.state == GenState::Active)
    }

    pub fn active_id(&self) -> Option<u64> {
        self.active().map(|g| g.id)
    }

    pub fn booting_id(&self) -> Option<u64> {
        self.generations.values().find(|g| matches!(g.state, GenState::Booting { .. })).map(|g| g.id)
    }

    pub fn workers_of(&self, generation: u64) -> impl Iterator<Item = &Worker> {
        self.workers.values().filter(move |w| w.generation == generation)
    }

    pub fn pids_of(&self, generation: u64) -> Vec<Pid> {
        self.workers_of(generation).map(|w| w.pid).collect()
    }

    /// Slots of a generation that have a live worker.
    pub fn occupied_slots(&self, generation: u64) -> Vec<usize> {
        self.workers_of(generation).filter(|w| w.state != WorkerState::Draining).map(|w| w.slot).collect()
    }

    /// Slots of a generation that count toward its target: those with a worker neither told
    /// to drain nor to stop (a worker told to drain while it was starting stays draining when
    /// it reports ready). Slots, not workers: a worker being recycled and its replacement, or a
    /// condemned worker and its replacement, are one slot.
    pub fn live_slots(&self, generation: u64) -> BTreeSet<usize> {
        self.workers_of(generation)
            .filter(|w| !matches!(w.state, WorkerState::Draining | WorkerState::Stopping))
            .map(|w| w.slot)
            .collect()
    }

    pub fn by_token(&mut self, pid: Pid) -> Option<&mut Worker> {
        self.workers.get_mut(&pid)
    }
}

/// Workers that ran at least this long before dying reset their slot's crash history: they
/// were not crash-looping at start.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The first respawn after a quick death is immediate; then the delay doubles from this...
pub const RESPAWN_BASE_DELAY: Duration = Duration::from_millis(100);
/// ...up to this cap, so a broken app costs at most one fork per slot every 30 s.
pub const RESPAWN_MAX_DELAY: Duration = Duration::from_secs(30);
/// The cap instead for a worker that had started its apps and either was killed from outside
/// or was the generation's last live one: short, so back-off never leaves a serving generation
/// without a worker for long, yet a worker killed again and again (a memory limit it reaches
/// after it started) or crashing soon after it started costs at most a fork a second.
pub const RESPAWN_SHORT_MAX_DELAY: Duration = Duration::from_secs(1);
/// From this many quick deaths in a row on, every death is logged as a crash loop.
pub const CRASH_LOOP_THRESHOLD: u32 = 5;

/// Whether a worker killed by `signal` was killed from outside (an operator's `kill -9`, the
/// kernel's OOM killer) rather than by a fault of its own code: the signals a crash raises
/// (a bad memory access, `abort`, a bad instruction, …) are the app's; any other signal that
/// ends a worker was sent to it (workers handle TERM, INT and QUIT themselves).
pub fn killed_from_outside(signal: nix::sys::signal::Signal) -> bool {
    use nix::sys::signal::Signal::*;
    !matches!(signal, SIGSEGV | SIGBUS | SIGILL | SIGFPE | SIGABRT | SIGSYS | SIGTRAP | SIGXCPU | SIGXFSZ)
}

/// Delay before respawning a slot that has died `quick_deaths` times in a row: none the first
/// time, then doubling from [`RESPAWN_BASE_DELAY`] up to `cap`.
pub fn respawn_delay(quick_deaths: u32, cap: Duration) -> Duration {
    if quick_deaths <= 1 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (quick_deaths - 2).min(16);
    (RESPAWN_BASE_DELAY * factor).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_starts_at_zero_doubles_and_is_capped() {
        assert_eq!(respawn_delay(1, RESPAWN_MAX_DELAY), Duration::ZERO);
        assert_eq!(respawn_delay(2, RESPAWN_MAX_DELAY), Duration::from_millis(100));
        assert_eq!(respawn_delay(3, RESPAWN_MAX_DELAY), Duration::from_millis(200));
        assert_eq!(respawn_delay(4, RESPAWN_MAX_DELAY), Duration::from_millis(400));
        assert_eq!(respawn_delay(40, RESPAWN_MAX_DELAY), RESPAWN_MAX_DELAY);
        assert_eq!(respawn_delay(1, RESPAWN_SHORT_MAX_DELAY), Duration::ZERO);
        assert_eq!(respawn_delay(5, RESPAWN_SHORT_MAX_DELAY), Duration::from_millis(800));
        assert_eq!(respawn_delay(6, RESPAWN_SHORT_MAX_DELAY), RESPAWN_SHORT_MAX_DELAY);
        assert_eq!(respawn_delay(40, RESPAWN_SHORT_MAX_DELAY), RESPAWN_SHORT_MAX_DELAY);
    }

    #[test]
    fn crash_signals_are_the_apps_and_kill_9_comes_from_outside() {
        use nix::sys::signal::Signal;
        assert!(killed_from_outside(Signal::SIGKILL));
        assert!(killed_from_outside(Signal::SIGHUP));
        assert!(!killed_from_outside(Signal::SIGSEGV));
        assert!(!killed_from_outside(Signal::SIGABRT));
    }
}
