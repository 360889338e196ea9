//! App timers: run something after a delay or every interval, in the worker's own clock thread.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::abi;

/// The app's timers: callbacks the server runs after a delay ([`Timers::after`]) or every
/// interval ([`Timers::every`]) in its worker's clock thread — no thread per timer. A timer never
/// runs twice at once, a slow one skips runs rather than bunching them, and every timer ends
/// when the app stops (its callback is dropped then). A panicking callback is logged and
/// counted; an `every` timer stays scheduled. Resolution: a few milliseconds.
///
/// Get it from [`Settings::timers`](crate::Settings::timers); it is cheap to clone and usable
/// from any thread (a callback may start and cancel timers, itself included). Keep callbacks
/// short, as for every callback: they share the clock with the worker's connection timers.
///
/// ```
/// use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
/// use std::time::Duration;
/// use fdt_sdk::{App, Conn, Next, Settings};
///
/// /// Answers every line with how many seconds the app has run.
/// struct Uptime { seconds: Arc<AtomicU64> }
///
/// impl App for Uptime {
///     fn start(settings: &Settings) -> Result<Self, String> {
///         let seconds = Arc::new(AtomicU64::new(0));
///         let counter = seconds.clone();
///         settings.timers().every(Duration::from_secs(1), move || {
///             counter.fetch_add(1, Ordering::Relaxed);
///         });
///         Ok(Uptime { seconds })
///     }
///     fn on_readable(&self, conn: &mut Conn) -> Next {
///         while conn.take_line().is_some() {
///             conn.write(format!("{}\n", self.seconds.load(Ordering::Relaxed)).as_bytes());
///         }
///         Next::KeepOpen
///     }
/// }
///
/// let app = fdt_sdk::testing::TestApp::<Uptime>::start("").unwrap();
/// assert_eq!(app.advance(Duration::from_millis(3500)), 3, "three ticks in 3.5 s");
/// let mut conn = app.connect();
/// conn.send(b"?\n");
/// assert_eq!(conn.take_output(), b"3\n");
/// ```
#[derive(Clone, Default)]
pub struct Timers {
    backend: Backend,
}

#[derive(Clone, Default)]
enum Backend {
    /// Outside a server and its test driver: timers are not started.
    #[default]
    None,
    /// The server's clock (ABI 1.2).
    Host {
        start: unsafe extern "C" fn(*const c_void, u64, u64, abi::TimerTickFn, abi::TimerDropFn, *mut c_void) -> u64,
        cancel: unsafe extern "C" fn(*const c_void, u64),
        ctx: *const c_void,
    },
    /// [`testing::TestApp`](crate::testing::TestApp)'s simulated clock.
    Test(Arc<TestClock>),
}

// SAFETY: `ctx` points at the host's record of this app's timers, which lives for the whole
// process; the host's functions are thread-safe (documented in the ABI).
unsafe impl Send for Backend {}
// SAFETY: as above.
unsafe impl Sync for Backend {}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::None => "none",
            Backend::Host { .. } => "the server's clock",
            Backend::Test(_) => "a simulated clock",
        };
        write!(f, "Timers({backend})")
    }
}

/// A started timer, to [cancel](Timers::cancel) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

/// What a timer runs.
pub(crate) type Callback = Box<dyn FnMut() + Send>;

impl Timers {
    pub(crate) fn from_host(
        start: unsafe extern "C" fn(*const c_void, u64, u64, abi::TimerTickFn, abi::TimerDropFn, *mut c_void) -> u64,
        cancel: unsafe extern "C" fn(*const c_void, u64),
        ctx: *const c_void,
    ) -> Timers {
        Timers { backend: Backend::Host { start, cancel, ctx } }
    }

    pub(crate) fn simulated(clock: Arc<TestClock>) -> Timers {
        Timers { backend: Backend::Test(clock) }
    }

    /// Runs `f` once, `delay` from now. `None` when there is no clock (outside a server and
    /// its test driver, or a server before ABI 1.2).
    pub fn after(&self, delay: Duration, f: impl FnOnce() + Send + 'static) -> Option<TimerId> {
        let mut f = Some(f);
        self.start(
            delay,
            Duration::ZERO,
            Box::new(move || {
                if let Some(f) = f.take() {
                    f()
                }
            }),
        )
    }

    /// Runs `f` every `period` (at least a millisecond), the first time `period` from now,
    /// until cancelled or the app stops. `None` as for [`Timers::after`].
    pub fn every(&self, period: Duration, f: impl FnMut() + Send + 'static) -> Option<TimerId> {
        let period = period.max(Duration::from_millis(1));
        self.start(period, period, Box::new(f))
    }

    /// Cancels a timer (nothing when it has ended already). A run in progress finishes first.
    pub fn cancel(&self, id: TimerId) {
        match &self.backend {
            Backend::None => {}
            // SAFETY: the host's function and context stay valid for the life of the process.
            Backend::Host { cancel, ctx, .. } => unsafe { cancel(*ctx, id.0) },
            Backend::Test(clock) => clock.cancel(id.0),
        }
    }

    fn start(&self, delay: Duration, every: Duration, f: Callback) -> Option<TimerId> {
        match &self.backend {
            Backend::None => None,
            Backend::Host { start, ctx, .. } => {
                let tick_ctx = crate::__private::timer_context(f);
                // SAFETY: the host's function and context stay valid for the life of the
                // process; `tick_ctx` is freed by `timer_drop`, which the host calls once.
                let id = unsafe {
                    start(
                        *ctx,
                        millis(delay),
                        millis(every),
                        crate::__private::timer_tick,
                        crate::__private::timer_drop,
                        tick_ctx,
                    )
                };
                Some(TimerId(id))
            }
            Backend::Test(clock) => Some(TimerId(clock.start(millis(delay), millis(every), f))),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The simulated clock of [`testing::TestApp`](crate::testing::TestApp): time moves only when
/// the test says so.
#[derive(Default)]
pub(crate) struct TestClock {
    state: Mutex<TestState>,
}

#[derive(Default)]
struct TestState {
    now: u64,
    next_id: u64,
    /// id → (due, every, callback; `None` while it runs).
    timers: std::collections::BTreeMap<u64, (u64, u64, Option<Callback>)>,
}

impl TestClock {
    fn state(&self) -> std::sync::MutexGuard<'_, TestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, delay: u64, every: u64, f: Callback) -> u64 {
        let mut state = self.state();
        state.next_id += 1;
        let (id, due) = (state.next_id, state.now.saturating_add(delay));
        state.timers.insert(id, (due, every, Some(f)));
        id
    }

    fn cancel(&self, id: u64) {
        let removed = self.state().timers.remove(&id);
        drop(removed);
    }

    /// Moves the clock `by` milliseconds, running each timer as it comes due, in order.
    /// Returns how many runs there were.
    pub(crate) fn advance(&self, by: u64) -> usize {
        let end = self.state().now.saturating_add(by);
        let mut runs = 0;
        loop {
            let next = {
                let mut state = self.state();
                let due = state.timers.iter().filter(|(_, t)| t.2.is_some() && t.0 <= end).min_by_key(|(_, t)| t.0);
                let Some((&id, &(due, _, _))) = due else {
                    state.now = end;
                    return runs;
                };
                state.now = due;
                let callback = state.timers.get_mut(&id).and_then(|t| t.2.take());
                (id, callback)
            };
            let (id, Some(mut callback)) = next else { continue };
            callback();
            runs += 1;
            let mut state = self.state();
            let now = state.now;
            match state.timers.get_mut(&id) {
                Some(t) if t.1 > 0 => {
                    t.0 = t.0.saturating_add(t.1).max(now);
                    t.2 = Some(callback);
                }
                _ => {
                    state.timers.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter() -> (Arc<AtomicUsize>, impl FnMut() + Send + 'static) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        (n, move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn the_simulated_clock_runs_timers_as_they_come_due_and_cancel_stops_them() {
        let clock = Arc::new(TestClock::default());
        let timers = Timers::simulated(clock.clone());
        let (every, tick) = counter();
        let (once, shot) = counter();
        let id = timers.every(Duration::from_millis(100), tick).unwrap();
        timers.after(Duration::from_millis(250), shot).unwrap();
        assert_eq!(clock.advance(99), 0);
        assert_eq!(clock.advance(1), 1, "due at 100 ms");
        assert_eq!(clock.advance(200), 3, "200 and 300 ms, and the one-shot at 250");
        assert_eq!((every.load(Ordering::SeqCst), once.load(Ordering::SeqCst)), (3, 1));
        timers.cancel(id);
        assert_eq!(clock.advance(1000), 0, "cancelled; the one-shot ran once");
        assert_eq!(format!("{timers:?}"), "Timers(a simulated clock)");
    }

    #[test]
    fn a_timer_may_cancel_itself_while_it_runs() {
        let clock = Arc::new(TestClock::default());
        let timers = Timers::simulated(clock.clone());
        let own_id = Arc::new(Mutex::new(None::<TimerId>));
        let (runs, mut count) = counter();
        let (t, slot) = (timers.clone(), own_id.clone());
        let id = timers
            .every(Duration::ZERO, move || {
                count();
                if let Some(id) = *slot.lock().unwrap() {
                    t.cancel(id);
                }
            })
            .unwrap();
        *own_id.lock().unwrap() = Some(id);
        assert_eq!(clock.advance(50), 1, "a zero period is a millisecond; it cancelled itself at its first run");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn without_a_clock_no_timer_starts() {
        let timers = Timers::default();
        assert!(timers.after(Duration::from_millis(1), || {}).is_none());
        assert!(timers.every(Duration::from_millis(1), || {}).is_none());
        timers.cancel(TimerId(1));
        assert_eq!(format!("{timers:?}"), "Timers(none)");
    }
}
