//! How many handler threads one app may hold at once, so that one app's stuck requests (a
//! lock wait, a slow backend, a bug) never take every handler of a worker that serves other
//! apps too: their connections would wait, and the master kills a worker whose every handler is
//! stuck, cutting them.
//!
//! In a worker that serves several apps, each app may hold at most `threads - 1` handlers (so
//! another app always finds one). An event for an app at its share waits in that app's queue
//! and is served by the next of its handlers to finish. A worker with one app has no limit
//! and pays nothing.
//!
//! Invariant: an event refused for its app's share is never lost and never queued twice: a
//! connection is queued at most once (its slot's `waiting` flag), and whoever leaves an app,
//! or queues an event while the app is below its share again, takes the queue's next event.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sys::Event;

struct Share {
    /// Handlers inside this app's code (or about to enter it) right now.
    busy: AtomicUsize,
    /// Events of connections that found the app at its share.
    waiting: Mutex<VecDeque<Event>>,
}

pub struct AppShares {
    /// The most handlers one app may hold; `usize::MAX` when the worker serves one app.
    cap: usize,
    apps: Box<[Share]>,
}

impl AppShares {
    pub fn new(apps: usize, threads: usize) -> AppShares {
        let cap = if apps > 1 { threads.saturating_sub(1).max(1) } else { usize::MAX };
        AppShares {
            cap,
            apps: (0..apps)
                .map(|_| Share { busy: AtomicUsize::new(0), waiting: Mutex::new(VecDeque::new()) })
                .collect(),
        }
    }

    /// The most handlers one app may hold at once.
    #[cfg(test)]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Takes a handler for `app`; false when the app holds its share already.
    pub fn enter(&self, app: usize) -> bool {
        if self.cap == usize::MAX {
            return true;
        }
        let share = &self.apps[app];
        // SeqCst with `leave`/`queue`: a handler leaving sees a queued event, or the queuer sees
        // the app below its share (see `next_waiting`).
        if share.busy.fetch_add(1, Ordering::SeqCst) < self.cap {
            return true;
        }
        share.busy.fetch_sub(1, Ordering::SeqCst);
        false
    }

    /// Gives back a handler taken with [`AppShares::enter`].
    pub fn leave(&self, app: usize) {
        if self.cap != usize::MAX {
            self.apps[app].busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Queues an event that found `app` at its share. The caller makes sure each connection is
    /// queued once (its slot's `waiting` flag).
    pub fn queue(&self, app: usize, event: Event) {
        let mut waiting = self.apps[app].waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.push_back(event);
    }

    /// The next queued event of `app` when the app is below its share now (call after
    /// [`AppShares::leave`], and after [`AppShares::queue`] in case every handler of the app
    /// left meanwhile).
    pub fn next_waiting(&self, app: usize) -> Option<Event> {
        if self.cap == usize::MAX {
            return None;
        }
        let share = &self.apps[app];
        if share.busy.load(Ordering::SeqCst) >= self.cap {
            return None;
        }
        share.waiting.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Events waiting for their app's share, all apps together.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.apps.iter().map(|s| s.waiting.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_app_is_never_limited() {
        let shares = AppShares::new(1, 4);
        assert!((0..100).all(|_| shares.enter(0)));
        assert!(shares.next_waiting(0).is_none());
    }

    #[test]
    fn an_app_at_its_share_queues_until_a_handler_leaves() {
        let shares = AppShares::new(2, 3);
        assert_eq!(shares.cap(), 2);
        assert!(shares.enter(0) && shares.enter(0));
        assert!(!shares.enter(0), "a third handler for app 0 would leave app 1 none");
        assert!(shares.enter(1), "app 1 still gets one");
        shares.queue(0, Event::EMPTY);
        assert!(shares.next_waiting(0).is_none(), "app 0 is still at its share");
        assert_eq!(shares.waiting(), 1);
        shares.leave(0);
        assert!(shares.next_waiting(0).is_some());
        assert_eq!(shares.waiting(), 0);
    }

    #[test]
    fn with_one_thread_each_app_may_still_take_it() {
        let shares = AppShares::new(3, 1);
        assert_eq!(shares.cap(), 1);
        assert!(shares.enter(2));
    }
}
