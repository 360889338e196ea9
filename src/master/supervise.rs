//! Supervision limits: the master kills a worker that stopped making progress
//! (`heartbeat_timeout`), whose request runs too long (`request_timeout`), or that, as the
//! replacement of a dead worker, does not start within `boot_timeout`; and it recycles a worker
//! gracefully after `max_requests` (a replacement first, then the old one drains).
//!
//! Inputs are the heartbeats workers send every `worker::STATS_INTERVAL` from their control
//! thread, with a summary of their handler threads (see `ipc::WorkerStats`). A worker that is
//! stopped or deadlocked sends nothing; one whose every handler is stuck in app code reports
//! that it is stalled; one stuck request is named in the heartbeat. Killed workers are replaced
//! by the ordinary reaping path. Nothing here blocks: deadlines feed the master's poll timeout.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Master;
use super::table::{GenState, Worker, WorkerState};
use crate::ipc::{MasterMessage, WorkerStats};

/// Why the master killed a worker (a label of the `worker_kills_total` metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    Heartbeat,
    RequestTimeout,
    /// A replacement worker of a serving generation that did not start its apps in time (a
    /// booting generation has its own `boot_timeout`, which abandons the reload).
    BootTimeout,
}

impl KillReason {
    pub fn name(&self) -> &'static str {
        match self {
            KillReason::Heartbeat => "heartbeat_timeout",
            KillReason::RequestTimeout => "request_timeout",
            KillReason::BootTimeout => "boot_timeout",
        }
    }
}

/// Which limit a worker is up against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    /// A replacement worker still starting its apps.
    Boot,
    /// No heartbeat at all.
    Silent,
    /// Every handler thread busy.
    Stalled,
    /// One request running.
    Request,
}

impl Limit {
    fn reason(self) -> KillReason {
        match self {
            Limit::Boot => KillReason::BootTimeout,
            Limit::Silent | Limit::Stalled => KillReason::Heartbeat,
            Limit::Request => KillReason::RequestTimeout,
        }
    }
}

/// The shortest `heartbeat_timeout` that makes sense: two heartbeats, so that one late
/// heartbeat never gets a healthy worker killed. A shorter configured value is raised to it.
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2 * crate::worker::STATS_INTERVAL.as_millis() as u64);

/// `heartbeat_timeout` as enforced: 0 stays "never", anything else is at least
/// [`MIN_HEARTBEAT_TIMEOUT`].
pub fn effective_heartbeat_timeout(configured: Duration) -> Duration {
    if configured.is_zero() { configured } else { configured.max(MIN_HEARTBEAT_TIMEOUT) }
}

/// How long a worker condemned for a stuck request keeps running, draining, before it is
/// killed: enough for its drain to close idle keep-alive connections gently (it closes those
/// quiet for 200 ms, every 50 ms) and for requests of normal length to finish, short enough
/// that the stuck request ends within `request_timeout` plus a second.
pub const CONDEMNED_GRACE: Duration = Duration::from_millis(500);

/// A recycle whose replacement died before serving is retried after this long, so that an
/// app that cannot start costs one fork per slot per interval, not one per heartbeat.
const RECYCLE_RETRY: Duration = Duration::from_secs(5);

/// A little randomness for `max_requests`, so that workers started together do not all recycle
/// at once: 0 to a tenth of the limit more (gunicorn's `max_requests_jitter`, built in). The
/// randomness comes from std's randomly keyed hasher: no extra dependency.
pub fn jitter(max_requests: u64) -> u64 {
    let spread = max_requests / 10;
    if spread == 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max_requests);
    h.finish() % (spread + 1)
}

impl Master {
    /// A heartbeat arrived: record it, and recycle the worker if it reached its request limit.
    pub(super) fn on_stats(&mut self, pid: Pid, stats: WorkerStats) {
        let now = Instant::now();
        let Some(w) = self.table.workers.get_mut(&pid) else {
            return;
        };
        w.stalled_since = (stats.stalled_ms > 0).then(|| now - Duration::from_millis(stats.stalled_ms));
        w.running = stats.oldest.as_ref().map(|r| (now - Duration::from_millis(r.ms), r.peer.clone(), r.app.clone()));
        w.stats = stats;
        let due = w.request_limit.is_some_and(|limit| w.stats.requests >= limit)
            && w.state == WorkerState::Serving
            && w.replacement.is_none()
            && w.killed.is_none()
            && w.recycle_not_before.is_none_or(|t| now >= t);
        let active = self.table.generations.get(&w.generation).is_some_and(|g| g.state == GenState::Active);
        if due && active && self.stopping.is_none() {
            self.recycle(pid);
        }
    }

    /// Starts a replacement for a worker that served its `max_requests`; the old one drains
    /// once the replacement accepts (see [`Master::on_replacement_accepting`]).
    fn recycle(&mut self, pid: Pid) {
        let w = &self.table.workers[&pid];
        let (generation, slot, requests) = (w.generation, w.slot, w.stats.requests);
        let limit = w.request_limit.unwrap_or(0);
        match self.spawn_worker(generation, slot) {
            Ok(new) => {
                log::info!(
                    "worker {slot} (pid {pid}) of generation {generation} served {requests} requests (limit {limit}): recycling it; pid {new} takes over"
                );
                if let Some(w) = self.table.workers.get_mut(&pid) {
                    w.replacement = Some(new);
                }
                if let Some(n) = self.table.workers.get_mut(&new) {
                    n.replaces = Some(pid);
                }
            }
            Err(e) => {
                log::error!("cannot fork a replacement for worker {slot} (pid {pid}): {e}");
                if let Some(w) = self.table.workers.get_mut(&pid) {
                    w.recycle_not_before = Some(Instant::now() + RECYCLE_RETRY);
                }
            }
        }
    }

    /// A worker confirmed it accepts: if it replaces a recycled worker, that one drains now.
    pub(super) fn on_replacement_accepting(&mut self, pid: Pid) {
        let Some(old) = self.table.workers.get_mut(&pid).and_then(|w| w.replaces.take()) else {
            return;
        };
        let Some(w) = self.table.workers.get_mut(&old) else {
            return;
        };
        w.replacement = None;
        if w.state == WorkerState::Draining || w.state == WorkerState::Stopping {
            return;
        }
        w.state = WorkerState::Draining;
        self.counters.recycles += 1;
        log::info!("worker {} (pid {old}) recycled: pid {pid} serves; draining", w.slot);
        let generation = w.generation;
        // Its replacement, and the siblings.
        let takers = self.table.workers_of(generation).filter(|w| w.state != WorkerState::Draining).count() as u64;
        self.send(old, MasterMessage::Handoff { generation, takers });
    }

    /// A worker exited: undo the recycle pairing it was part of.
    pub(super) fn forget_recycle(&mut self, pid: Pid, replaces: Option<Pid>, replacement: Option<Pid>) {
        if let Some(old) = replaces
            && let Some(w) = self.table.workers.get_mut(&old)
        {
            w.replacement = None;
            // A slot drained as a whole (TTOU) takes both away: nothing to retry.
            if !matches!(w.state, WorkerState::Draining | WorkerState::Stopping) {
                log::warn!(
                    "the replacement (pid {pid}) of worker {} (pid {old}) died; the old worker keeps serving",
                    w.slot
                );
                w.recycle_not_before = Some(Instant::now() + RECYCLE_RETRY);
            }
        }
        if let Some(new) = replacement
            && let Some(n) = self.table.workers.get_mut(&new)
        {
            n.replaces = None;
        }
    }

    /// The earliest moment a supervision limit may expire.
    pub(super) fn next_supervision_deadline(&self) -> Option<Instant> {
        self.table.workers.values().filter(|w| w.supervised()).filter_map(|w| self.first_deadline(w)).map(|d| d.0).min()
    }

    /// The limit of worker `w` that expires first, and when. Cheap: runs for every worker at
    /// every turn of the master loop; the log line is only made for a limit that expired.
    fn first_deadline(&self, w: &Worker) -> Option<(Instant, Limit)> {
        let gen_ = self.table.generations.get(&w.generation)?;
        let server = &gen_.config.server;
        if w.state == WorkerState::Booting {
            // Heartbeats start once the apps are started; a booting generation has its own
            // boot_timeout (which abandons the reload).
            let applies = gen_.state == GenState::Active && !server.boot_timeout.is_zero();
            return applies.then(|| (w.started + server.boot_timeout, Limit::Boot));
        }
        let heartbeat = effective_heartbeat_timeout(server.heartbeat_timeout);
        let mut candidates = Vec::with_capacity(3);
        if !heartbeat.is_zero() {
            candidates.push((w.last_heard + heartbeat, Limit::Silent));
            if let Some(since) = w.stalled_since {
                candidates.push((since + heartbeat, Limit::Stalled));
            }
        }
        if let (Some(limit), Some((since, _, _))) = (server.request_timeout, &w.running) {
            candidates.push((*since + limit, Limit::Request));
        }
        candidates.into_iter().min_by_key(|c| c.0)
    }

    /// The log line for worker `w` killed for `limit`.
    fn describe(&self, w: &Worker, limit: Limit) -> String {
        let server = &self.table.generations[&w.generation].config.server;
        let now = Instant::now();
        let who = format!("worker {} (pid {}) of generation {}", w.slot, w.pid, w.generation);
        let secs = |since: Instant| now.duration_since(since).as_secs_f64();
        let heartbeat = effective_heartbeat_timeout(server.heartbeat_timeout).as_secs_f64();
        match limit {
            Limit::Boot => format!(
                "{who} did not start its apps within boot_timeout ({} s); killing it",
                server.boot_timeout.as_secs_f64()
            ),
            Limit::Silent => format!(
                "{who} sent no heartbeat for {:.1} s (heartbeat_timeout {heartbeat} s): it is stopped or hung; killing it",
                secs(w.last_heard)
            ),
            Limit::Stalled => format!(
                "{who} made no progress for {:.1} s: all {} handler threads are busy (heartbeat_timeout {heartbeat} s); replacing it, killing it in {} ms",
                w.stalled_since.map_or(0.0, secs),
                w.stats.busy_threads,
                CONDEMNED_GRACE.as_millis()
            ),
            Limit::Request => {
                let (since, peer, app) = w.running.clone().unwrap_or_else(|| (now, "?".into(), "?".into()));
                format!(
                    "{who}: a request of app {app} from {peer} has been running for {:.1} s (request_timeout {} s); replacing the worker, which drains and is killed in {} ms",
                    secs(since),
                    server.request_timeout.unwrap_or_default().as_secs_f64(),
                    CONDEMNED_GRACE.as_millis()
                )
            }
        }
    }

    /// Kills every worker whose supervision limit expired; the reaper replaces them.
    pub(super) fn enforce_supervision_limits(&mut self) {
        let now = Instant::now();
        let expired: Vec<(Pid, Limit, String)> = self
            .table
            .workers
            .values()
            .filter(|w| w.supervised())
            .filter_map(|w| match self.first_deadline(w) {
                Some((at, limit)) if at <= now => Some((w.pid, limit, self.describe(w, limit))),
                _ => None,
            })
            .collect();
        for (pid, limit, line) in expired {
            log::error!("{line}");
            // `systemctl status` shows the last one.
            self.notifier.status(&line);
            let reason = limit.reason();
            match reason {
                KillReason::Heartbeat => self.counters.heartbeat_kills += 1,
                KillReason::RequestTimeout => self.counters.request_timeout_kills += 1,
                KillReason::BootTimeout => self.counters.boot_kills += 1,
            }
            if let Some(w) = self.table.workers.get_mut(&pid) {
                w.killed = Some(reason.name().into());
            }
            match limit {
                // Its control thread still runs: let it close its other connections gently.
                Limit::Request | Limit::Stalled => self.condemn(pid),
                // SIGKILL also ends a stopped process.
                Limit::Silent | Limit::Boot => kill_now(pid),
            }
        }
    }

    /// A worker with a thread stuck in app code (which nothing but its death can stop): start
    /// its replacement, tell it to drain so that its idle connections are closed with a FIN and
    /// its quick requests finish, and kill it [`CONDEMNED_GRACE`] later.
    fn condemn(&mut self, pid: Pid) {
        let Some(w) = self.table.workers.get(&pid) else { return };
        let (generation, slot, was_draining) = (w.generation, w.slot, w.state == WorkerState::Draining);
        let active = self.table.generations.get(&generation).is_some_and(|g| g.state == GenState::Active);
        if active && !was_draining && self.stopping.is_none() && w.replacement.is_none() {
            self.counters.worker_restarts += 1;
            match self.spawn_worker(generation, slot) {
                Ok(new) => log::info!("worker {slot}: pid {new} replaces pid {pid}"),
                // The reaper replaces it once it is dead.
                Err(e) => log::error!("cannot fork a replacement for worker {slot} (pid {pid}) yet: {e}"),
            }
        }
        if let Some(w) = self.table.workers.get_mut(&pid) {
            w.kill_at = Some(Instant::now() + CONDEMNED_GRACE);
            if !was_draining {
                w.state = WorkerState::Draining;
                self.send(pid, MasterMessage::Drain);
            }
        }
    }

    /// Kills condemned workers whose grace is over.
    pub(super) fn kill_condemned(&mut self) {
        let now = Instant::now();
        for w in self.table.workers.values_mut() {
            if w.kill_at.is_some_and(|at| now >= at) {
                w.kill_at = None;
                kill_now(w.pid);
            }
        }
    }

    /// When the next condemned worker is due.
    pub(super) fn next_condemned_kill(&self) -> Option<Instant> {
        self.table.workers.values().filter_map(|w| w.kill_at).min()
    }
}

fn kill_now(pid: Pid) {
    if let Err(e) = kill(pid, Signal::SIGKILL) {
        log::error!("cannot kill worker pid {pid}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_timeout_shorter_than_two_heartbeats_is_raised_and_zero_means_never() {
        assert_eq!(effective_heartbeat_timeout(Duration::ZERO), Duration::ZERO);
        assert_eq!(effective_heartbeat_timeout(Duration::from_millis(200)), Duration::from_secs(1));
        assert_eq!(effective_heartbeat_timeout(Duration::from_secs(30)), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_a_tenth_of_the_limit() {
        assert_eq!(jitter(5), 0);
        for _ in 0..100 {
            assert!(jitter(1000) <= 100);
        }
    }
}
