//! Background services: long-lived work with a lifecycle of its own.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First pause before a service that panicked runs again; it doubles up to [`MAX_BACKOFF`],
/// and starts over once a run lasted [`STEADY`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STEADY: Duration = Duration::from_secs(10);
/// How long a stopping worker waits for its services to return.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// What a service is given: whether to stop, and a sleep that ends when it must.
///
/// A service checks [`Stop::requested`] between pieces of work and waits with
/// [`Stop::sleep`]; it is asked to stop when its worker starts draining (a reload, a stop), and
/// the worker waits up to 5 s for it to return before it exits.
#[derive(Clone, Default)]
pub struct Stop {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Stop {
    /// True once the service must stop.
    pub fn requested(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps for `d`, or less when the service is asked to stop meanwhile. True when it must
    /// stop.
    pub fn sleep(&self, d: Duration) -> bool {
        // `Duration::MAX`: until asked to stop.
        let deadline = Instant::now().checked_add(d);
        let mut stop = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        while !*stop {
            let Some(deadline) = deadline else {
                stop = self.inner.1.wait(stop).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stop = self.inner.1.wait_timeout(stop, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *stop
    }

    fn request(&self) {
        *self.inner.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.inner.1.notify_all();
    }
}

/// One service this plugin started in this process.
struct Running {
    /// Whose it is: 0 for a server's app, else the test driver's app (`testing`) that started it.
    owner: u64,
    stop: Stop,
    thread: JoinHandle<()>,
}

/// The services this plugin started in this process.
static RUNNING: Mutex<Vec<Running>> = Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<Running>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a service runs (see [`Settings::service`](crate::Settings::service)).
pub(crate) struct Spec {
    pub(crate) app: String,
    pub(crate) name: String,
    pub(crate) events: crate::Events,
    /// Runs only while this worker holds the claim: one instance per server.
    pub(crate) claim: Option<crate::Singleton>,
    /// See [`Running::owner`].
    pub(crate) owner: u64,
}

/// Starts `work` on a thread of its own: run, restarted with back-off after a panic (logged,
/// counted as the app event `service_panics`), until its worker drains.
pub(crate) fn spawn(spec: Spec, work: impl Fn(&Stop) + Send + Sync + 'static) -> Result<(), String> {
    let stop = Stop::default();
    let thread_stop = stop.clone();
    let (thread, name, owner) = (format!("service {}", spec.name), spec.name.clone(), spec.owner);
    let thread = std::thread::Builder::new()
        .name(thread)
        .spawn(move || supervise(&spec, &work, &thread_stop))
        .map_err(|e| format!("cannot start service {name}: {e}"))?;
    running().push(Running { owner, stop, thread });
    Ok(())
}

fn supervise(spec: &Spec, work: &(impl Fn(&Stop) + Send + Sync), stop: &Stop) {
    let mut backoff = FIRST_BACKOFF;
    while !stop.requested() {
        if let Some(claim) = &spec.claim
            && !claim.try_hold()
        {
            // Another worker of the server runs it: look again soon.
            stop.sleep(Duration::from_millis(100));
            continue;
        }
        let began = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| work(stop)));
        if stop.requested() {
            break;
        }
        match result {
            Ok(()) => {
                log::info!("app {}: service {} returned; it is not run again", spec.app, spec.name);
                // A singleton keeps its claim until the worker drains: its work is done for the
                // server, not to be run again by each sibling in turn.
                while spec.claim.is_some() && !stop.sleep(Duration::from_secs(3600)) {}
                break;
            }
            Err(panic) => {
                if began.elapsed() >= STEADY {
                    backoff = FIRST_BACKOFF;
                }
                let msg = crate::__private::panic_text(panic);
                log::error!("app {}: service {} panicked: {msg}; running it again in {backoff:?}", spec.app, spec.name);
                spec.events.count("service_panics", 1);
                if stop.sleep(backoff) {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    if let Some(claim) = &spec.claim {
        claim.release();
    }
}

/// Asks every service to stop (the worker drains).
pub(crate) fn stop_all() {
    for service in running().iter() {
        service.stop.request();
    }
}

/// Asks every service to stop and waits, up to `limit`, for them to return.
pub(crate) fn stop_and_wait(limit: Duration) {
    stop_all();
    wait(|_| true, limit);
}

/// Asks the services of `owner` (a test driver's app) to stop and waits, up to `limit`, for
/// them to return; true when all did.
pub(crate) fn stop_owned(owner: u64, limit: Duration) -> bool {
    for service in running().iter().filter(|s| s.owner == owner) {
        service.stop.request();
    }
    wait(|s| s.owner == owner, limit)
}

/// Waits, up to `limit`, for the services `which` picks (asked to stop) to return; true when
/// all did.
fn wait(which: impl Fn(&Running) -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let services: Vec<Running> = {
        let mut all = running();
        let (picked, kept) = std::mem::take(&mut *all).into_iter().partition(|s| which(s));
        *all = kept;
        picked
    };
    let mut all_stopped = true;
    for service in services {
        while !service.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if service.thread.is_finished() {
            let _ = service.thread.join();
        } else {
            all_stopped = false;
            log::warn!("a service did not stop within {limit:?}; the worker exits without it");
        }
    }
    all_stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_without_end_lasts_until_the_stop() {
        let stop = Stop::default();
        let sleeper = stop.clone();
        let t = std::thread::spawn(move || sleeper.sleep(Duration::MAX));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        stop.request();
        assert!(t.join().unwrap(), "it says the service must stop");
        assert!(stop.requested() && stop.sleep(Duration::from_secs(10)), "a stopped Stop never sleeps");
    }
}
