//! App timers (`fdt_sdk::Timers`, ABI 1.2): run an app's callback after a delay, or every
//! interval, in the worker's own clock thread — not a thread per timer.
//!
//! Invariants: one thread (the worker's clock) runs ticks, so a timer never overlaps with
//! itself; a timer's callback is dropped (the plugin frees it) exactly once — when it is
//! cancelled, after its only run, or when its app stops — and never while it runs; no lock is
//! held while app code runs, so a tick may start or cancel timers, its own included.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread::Thread;

use crate::plugin::TimerCallback;

/// The timers of every app of this worker process.
static TABLE: Mutex<Table> = Mutex::new(Table { next_id: 1, timers: BTreeMap::new(), clock: None });

struct Table {
    next_id: u64,
    timers: BTreeMap<u64, Timer>,
    /// The clock thread, woken when a timer is due before its next tick.
    clock: Option<Thread>,
}

struct Timer {
    /// The app's place in the worker's apps.
    app: usize,
    /// When it is due next (`sys::monotonic_ms`).
    due: u64,
    /// 0: once.
    every: u64,
    /// `None` while its tick runs (the clock holds it).
    callback: Option<TimerCallback>,
    /// Cancelled while its tick ran: dropped once the tick returns.
    cancelled: bool,
}

fn table() -> std::sync::MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a timer of app `app`: first due `delay_ms` from now, then every `every_ms` (0: once).
/// Returns its id.
pub fn start(app: usize, delay_ms: u64, every_ms: u64, callback: TimerCallback) -> u64 {
    // +1: the clock is read in whole milliseconds, so a timer is never early (at most 1 ms late).
    let due = crate::sys::monotonic_ms().saturating_add(delay_ms).saturating_add(1);
    let mut table = table();
    let id = table.next_id;
    table.next_id += 1;
    table.timers.insert(id, Timer { app, due, every: every_ms, callback: Some(callback), cancelled: false });
    if let Some(clock) = &table.clock {
        clock.unpark();
    }
    id
}

/// Cancels timer `id`, if it is still there.
pub fn cancel(id: u64) {
    let dropped = {
        let mut table = table();
        match table.timers.get_mut(&id) {
            Some(timer) if timer.callback.is_none() => {
                timer.cancelled = true; // running: the clock drops it after the tick
                None
            }
            Some(_) => table.timers.remove(&id),
            None => None,
        }
    };
    // Dropped outside the lock: it runs the plugin's code.
    drop(dropped);
}

/// Ends every timer of app `app` (before the app stops). Call only once the clock has stopped.
pub fn stop_app(app: usize) {
    let dropped: Vec<Timer> = {
        let mut table = table();
        let ids: Vec<u64> = table.timers.iter().filter(|(_, t)| t.app == app).map(|(id, _)| *id).collect();
        ids.iter().filter_map(|id| table.timers.remove(id)).collect()
    };
    drop(dropped);
}

/// Makes `clock` the thread woken when a timer is started (and by [`wake_clock`]).
pub fn set_clock(clock: Thread) {
    table().clock = Some(clock);
}

/// Wakes the worker's clock thread now (the drain started).
pub fn wake_clock() {
    if let Some(clock) = &table().clock {
        clock.unpark();
    }
}

/// How many milliseconds from `now` until the next timer is due (`None`: no timer).
pub fn next_due_in(now: u64) -> Option<u64> {
    table().timers.values().filter(|t| t.callback.is_some()).map(|t| t.due.saturating_sub(now)).min()
}

/// Takes the next timer due at `now` whose app `may_run` allows, for the clock to run.
pub fn take_due(now: u64, may_run: impl Fn(usize) -> bool) -> Option<Due> {
    let mut table = table();
    let (id, timer) = table.timers.iter_mut().find(|(_, t)| t.due <= now && t.callback.is_some() && may_run(t.app))?;
    Some(Due { id: *id, app: timer.app, callback: timer.callback.take()? })
}

/// A timer whose tick the clock runs now.
pub struct Due {
    pub id: u64,
    pub app: usize,
    pub callback: TimerCallback,
}

impl Due {
    /// Runs the tick; then puts the timer back for its next run, or ends it. False when the app
    /// code panicked.
    pub fn run(mut self) -> bool {
        let ok = self.callback.tick();
        let now = crate::sys::monotonic_ms();
        let finished = {
            let mut table = table();
            match table.timers.get_mut(&self.id) {
                Some(timer) if !timer.cancelled && timer.every > 0 => {
                    // The next run is a period after this one was due, never in the past: a
                    // slow tick or a late clock skips runs rather than bunching them.
                    timer.due = timer.due.saturating_add(timer.every).max(now);
                    timer.callback = Some(self.callback);
                    None
                }
                _ => {
                    table.timers.remove(&self.id);
                    Some(self.callback)
                }
            }
        };
        drop(finished);
        ok
    }
}
