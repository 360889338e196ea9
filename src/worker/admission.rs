//! Handler admission: which of a worker's handler threads may take events.
//!
//! Only as many as the worker's share of the CPUs are admitted (the CPUs it may run on, divided
//! among the workers of its generation), so under load the same few threads serve
//! with warm caches and no request waits for the scheduler to time-slice among handlers; the
//! others park. A handler that has been inside one request for `STUCK_AFTER_MS` while blocked
//! (a sleep, a database call), or for `LONG_AFTER_MS` whatever it does (a long computation),
//! counts as stuck, and one more is admitted in its place, up to `threads`: blocking apps keep
//! their concurrency. A handler that is only waiting for a CPU (the machine is busy) is not
//! stuck: admitting another would add a thread competing for the same CPU.
//!
//! A watchdog thread counts the stuck handlers. It ticks while handlers serve and sleeps once
//! they have been idle for a while, so an idle worker does not poll.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::{self, Thread};
use std::time::Duration;

use super::pool::HandlerBeat;
use crate::sys::monotonic_ms;

/// A handler blocked this long in one request counts as stuck...
const STUCK_AFTER_MS: u64 = 2;
/// ...and one that has been in one request this long counts as stuck even while it computes.
const LONG_AFTER_MS: u64 = 20;
/// The watchdog looks at the handlers once per this...
const WATCHDOG_TICK: Duration = Duration::from_millis(1);
/// ...and goes to sleep after this many ticks in a row with no handler serving. Under load
/// the busy count drops to 0 between most requests: sleeping at once would make the next
/// request's handler wake the watchdog (a futex call and a context switch) every time.
const WATCHDOG_IDLE_TICKS: u32 = 50;
/// A parked handler looks again this often even if nobody wakes it (a missed wake-up).
const PARK_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Admission {
    cpus: usize,
    threads: usize,
    admitted: AtomicUsize,
    /// Handlers stuck in a request, as the watchdog last counted them.
    stuck: AtomicUsize,
    /// Parked handlers, most recently parked last (woken first: its cache is the warmest).
    parked: Mutex<Vec<Thread>>,
    /// The watchdog sleeps here while no handler serves.
    watchdog: (Mutex<()>, Condvar),
    watchdog_asleep: AtomicBool,
    stopping: AtomicBool,
}

/// The worker's share of the CPUs: those it may run on (`available_parallelism` follows the
/// CPU affinity, `taskset`) divided among the `workers` of its generation, rounded up, and at
/// least one. On 8 CPUs with 8 workers each worker admits one handler, not eight: all workers
/// serve at once, and more admitted handlers than CPUs only time-slice.
pub fn cpu_share(cpus: usize, workers: usize) -> usize {
    cpus.div_ceil(workers.max(1)).max(1)
}

impl Admission {
    /// `workers`: how many workers the generation runs (they share the CPUs).
    pub fn new(threads: usize, workers: usize) -> Admission {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        Admission {
            cpus: cpu_share(cpus, workers).min(threads),
            threads,
            admitted: AtomicUsize::new(0),
            stuck: AtomicUsize::new(0),
            parked: Mutex::new(Vec::new()),
            watchdog: (Mutex::new(()), Condvar::new()),
            watchdog_asleep: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    fn limit(&self) -> usize {
        (self.cpus + self.stuck.load(Ordering::Acquire)).min(self.threads)
    }

    /// Waits until this handler may take events. False once stopping.
    pub fn admit(&self) -> bool {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return false;
            }
            let current = self.admitted.load(Ordering::Acquire);
            if current < self.limit() {
                if self.admitted.compare_exchange(current, current + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    return true;
                }
                continue;
            }
            self.parked().push(thread::current());
            // Woken by the watchdog (a handler is stuck), or at stop.
            thread::park_timeout(PARK_TIMEOUT);
            let me = thread::current().id();
            self.parked().retain(|t| t.id() != me);
        }
    }

    /// After a request: gives up this handler's admission when more are admitted than are
    /// needed now (the handler it stood in for is no longer stuck). True if it gave it up.
    pub fn leave_if_surplus(&self) -> bool {
        let current = self.admitted.load(Ordering::Acquire);
        current > self.limit()
            && self.admitted.compare_exchange(current, current - 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// A handler started serving while none was: wakes the watchdog if it sleeps.
    pub fn first_busy(&self) {
        if self.watchdog_asleep.load(Ordering::SeqCst) {
            let (lock, cond) = &self.watchdog;
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            cond.notify_one();
        }
    }

    /// Makes `admit` return false, the watchdog return, and every parked handler look.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let (lock, cond) = &self.watchdog;
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        cond.notify_all();
        self.parked().drain(..).for_each(|t| t.unpark());
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Vec<Thread>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watchdog: counts the stuck handlers every tick and admits a parked handler for each.
    /// `busy` is the number of handlers serving.
    pub fn watchdog_loop(&self, beats: &[HandlerBeat], busy: &AtomicUsize) {
        let (lock, cond) = &self.watchdog;
        let mut idle_ticks: u32 = 0;
        let mut stats: Vec<Option<File>> = beats.iter().map(|_| None).collect();
        while !self.stopping.load(Ordering::Acquire) {
            if busy.load(Ordering::Acquire) == 0 {
                idle_ticks = idle_ticks.saturating_add(1);
            } else {
                idle_ticks = 0;
            }
            if idle_ticks > WATCHDOG_IDLE_TICKS {
                self.stuck.store(0, Ordering::Release);
                let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                self.watchdog_asleep.store(true, Ordering::SeqCst);
                if busy.load(Ordering::SeqCst) == 0 && !self.stopping.load(Ordering::SeqCst) {
                    let _ = cond.wait_timeout(guard, Duration::from_millis(500));
                }
                self.watchdog_asleep.store(false, Ordering::SeqCst);
                continue;
            }
            thread::sleep(WATCHDOG_TICK);
            self.stuck.store(count_stuck(beats, &mut stats), Ordering::Release);
            if self.admitted.load(Ordering::Acquire) < self.limit()
                && let Some(t) = self.parked().pop()
            {
                t.unpark();
            }
        }
        // A handler that parked just as `stop` ran.
        self.parked().drain(..).for_each(|t| t.unpark());
    }
}

/// Counts the stuck handlers. `stats` caches each handler's `/proc/self/task/<tid>/stat`,
/// re-read with one `pread`.
fn count_stuck(beats: &[HandlerBeat], stats: &mut [Option<File>]) -> usize {
    let now = monotonic_ms();
    let mut stuck = 0;
    for (beat, stat) in beats.iter().zip(stats.iter_mut()) {
        let busy_ms = beat.busy_ms(now);
        if busy_ms >= LONG_AFTER_MS || (busy_ms >= STUCK_AFTER_MS && !runnable(beat, stat)) {
            stuck += 1;
        }
    }
    stuck
}

/// True when the handler's thread is running or waiting for a CPU, from the state field of
/// its `/proc` stat (opened into `stat` on first use). When that cannot be read, false: the
/// handler is then judged by its time alone, as if blocked.
fn runnable(beat: &HandlerBeat, stat: &mut Option<File>) -> bool {
    use std::os::unix::fs::FileExt;
    if stat.is_none() {
        *stat = File::open(format!("/proc/self/task/{}/stat", beat.tid())).ok();
    }
    let Some(file) = stat else { return false };
    let mut buf = [0u8; 256];
    let Ok(n) = file.read_at(&mut buf, 0) else { return false };
    // "tid (comm) S ...": the comm may contain anything, so look after its last ')'.
    let text = &buf[..n];
    text.iter().rposition(|&b| b == b')').and_then(|i| text.get(i + 2)).is_some_and(|&state| state == b'R')
}

#[cfg(test)]
mod tests {
    use super::cpu_share;

    #[test]
    fn each_worker_admits_its_share_of_the_cpus() {
        assert_eq!(cpu_share(8, 8), 1);
        assert_eq!(cpu_share(16, 8), 2);
        assert_eq!(cpu_share(2, 2), 1);
        assert_eq!(cpu_share(3, 2), 2, "rounded up: no CPU is left without a handler");
        assert_eq!(cpu_share(1, 4), 1, "at least one");
        assert_eq!(cpu_share(4, 1), 4);
        assert_eq!(cpu_share(4, 0), 4);
    }
}
