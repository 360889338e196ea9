//! One holder per server: work that must not run in two workers at once.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::sync::Mutex;

/// A claim that at most one worker of the server holds at a time — for work that must run
/// once per server, not once per worker (a ticker, a poller, a scheduled job). Get it from
/// [`Settings::singleton`](crate::Settings::singleton) and call [`Singleton::try_hold`] before
/// each piece of that work, for example at each run of an app timer: the worker that holds
/// it does the work, the others skip.
///
/// The claim is a Linux abstract Unix socket named after the server and the name, bound by
/// its holder: the kernel gives it to one process at a time and takes it back the moment the
/// holder exits or dies — no file, no lock left behind, no master involved. So it moves,
/// never doubles: across a reload the old generation's worker keeps it until it has drained
/// and exited, then a worker of the new generation takes it at its next try; after a worker's
/// death, a sibling does.
///
/// ```
/// let settings = fdt_sdk::Settings::parse("ticker", "").unwrap();
/// let a = settings.singleton("tick");
/// let b = settings.singleton("tick");
/// assert!(a.try_hold());
/// assert!(!b.try_hold(), "held elsewhere");
/// a.release();
/// assert!(b.try_hold());
/// ```
#[derive(Debug)]
pub struct Singleton {
    name: Vec<u8>,
    held: Mutex<Option<UnixListener>>,
}

impl Singleton {
    pub(crate) fn new(server_id: &str, app: &str, name: &str) -> Singleton {
        // The abstract namespace allows 107 bytes: a hash of what identifies the claim.
        let key = fnv1a(format!("{server_id}\0{app}\0{name}").as_bytes());
        Singleton { name: format!("fdtserver-singleton-{key:016x}").into_bytes(), held: Mutex::new(None) }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<UnixListener>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this worker holds the claim: it did already, or took it now.
    pub fn try_hold(&self) -> bool {
        let mut held = self.held();
        if held.is_some() {
            return true;
        }
        *held = SocketAddr::from_abstract_name(&self.name).and_then(|a| UnixListener::bind_addr(&a)).ok();
        held.is_some()
    }

    /// True while this worker holds the claim.
    pub fn is_held(&self) -> bool {
        self.held().is_some()
    }

    /// Gives the claim up (another worker may take it at its next try).
    pub fn release(&self) {
        self.held().take();
    }
}

/// FNV-1a, 64 bits: stable across builds and processes (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_of_other_servers_apps_or_names_do_not_meet() {
        let a = Singleton::new("/run/one.sock", "ticker", "tick");
        assert!(a.try_hold() && a.is_held());
        assert!(a.try_hold(), "holding it again is fine");
        for other in [
            Singleton::new("/run/two.sock", "ticker", "tick"),
            Singleton::new("/run/one.sock", "other", "tick"),
            Singleton::new("/run/one.sock", "ticker", "tock"),
        ] {
            assert!(other.try_hold(), "{other:?} is another claim");
        }
        let same = Singleton::new("/run/one.sock", "ticker", "tick");
        assert!(!same.try_hold() && !same.is_held());
        drop(a);
        assert!(same.try_hold(), "a dropped holder gives it up");
    }
}
