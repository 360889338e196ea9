//! Drive an app without a server: feed bytes to a connection and read what it wrote.
//!
//! ```
//! use fdt_sdk::{App, Conn, Next, Settings, testing::TestApp};
//! struct Shout;
//! impl App for Shout {
//!     fn start(_: &Settings) -> Result<Self, String> { Ok(Shout) }
//!     fn on_readable(&self, conn: &mut Conn) -> Next {
//!         while let Some(line) = conn.take_line() { conn.write(&line.to_ascii_uppercase()) }
//!         Next::KeepOpen
//!     }
//! }
//! let app = TestApp::<Shout>::start("").unwrap();
//! let mut conn = app.connect();
//! assert_eq!(conn.send(b"hey\n"), Next::KeepOpen);
//! assert_eq!(conn.take_output(), b"HEY\n");
//! ```

use crate::{App, Conn, ConnState, Next, Settings, abi};

/// An app started from settings text, as a worker would start it.
pub struct TestApp<A: App> {
    app: A,
}

impl<A: App> TestApp<A> {
    /// Starts the app with the given `[app.NAME]` settings (TOML text).
    /// Like the server, refuses a key the app does not declare in [`App::SETTINGS`].
    pub fn start(settings_toml: &str) -> Result<TestApp<A>, String> {
        let settings = Settings::parse("test", settings_toml)?.with_worker("test-node", std::process::id(), 1);
        if let Some(declared) = A::SETTINGS
            && let Some(unknown) = settings.keys().find(|k| !declared.contains(k))
        {
            return Err(format!("unknown setting `{unknown}` (the app takes: {})", declared.join(", ")));
        }
        Ok(TestApp { app: A::start(&settings)? })
    }

    /// The app itself.
    pub fn app(&self) -> &A {
        &self.app
    }

    /// Opens a new simulated connection.
    pub fn connect(&self) -> TestConn<'_, A> {
        TestConn { app: &self.app, input: Vec::new(), state: ConnState::default(), draining: false, requests: 0 }
    }
}

/// A simulated connection: keeps the unconsumed input between calls, like the worker does.
pub struct TestConn<'a, A: App> {
    app: &'a A,
    input: Vec<u8>,
    state: ConnState,
    draining: bool,
    requests: u64,
}

impl<A: App> TestConn<'_, A> {
    /// Appends bytes to the input and calls `on_readable` once.
    pub fn send(&mut self, bytes: &[u8]) -> Next {
        self.input.extend_from_slice(bytes);
        self.call(A::on_readable)
    }

    /// Calls `on_timer` once, as the worker does when the connection's timer runs out.
    pub fn fire_timer(&mut self) -> Next {
        self.call(A::on_timer)
    }

    /// One call into the app, with the input kept since the last call.
    fn call(&mut self, f: impl FnOnce(&A, &mut Conn) -> Next) -> Next {
        let flags = if self.draining { abi::FLAG_DRAINING } else { 0 };
        let mut conn = Conn::new(&self.input, flags, &mut self.state);
        let next = f(self.app, &mut conn);
        let (consumed, requests) = conn.finish();
        self.input.drain(..consumed);
        self.requests += requests;
        next
    }

    /// The connection's timer as the app left it ([`Conn::set_timer`]).
    pub fn timer(&self) -> Option<std::time::Duration> {
        self.state.timer
    }

    /// Everything the app wrote since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.state.out)
    }

    /// Input the app has not consumed yet (a partial request).
    pub fn pending_input(&self) -> &[u8] {
        &self.input
    }

    /// Requests the app counted so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Makes [`Conn::draining`] true from now on, as during a reload or stop.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Closes the connection: calls `on_close` and drops the session.
    pub fn close(mut self) {
        let mut conn = Conn::new(&[], abi::FLAG_PEER_CLOSED, &mut self.state);
        self.app.on_close(&mut conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Reports what a connection knows about itself; keeps a count in its session, which
    /// `on_close` takes back.
    struct Facts;

    #[derive(Default)]
    struct Count(u32);

    static CLOSED_WITH: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    impl App for Facts {
        fn start(_: &Settings) -> Result<Self, String> {
            Ok(Facts)
        }
        fn on_readable(&self, conn: &mut Conn) -> Next {
            while let Some(line) = conn.take_line() {
                conn.session::<Count>().0 += 1;
                let facts = format!(
                    "{} peer={:?} listener={:?} id={} closed={} timer={:?}\n",
                    String::from_utf8_lossy(line).trim(),
                    conn.peer(),
                    conn.listener(),
                    conn.id(),
                    conn.peer_closed(),
                    conn.timer()
                );
                conn.write(facts.as_bytes());
            }
            Next::KeepOpen
        }
        fn on_close(&self, conn: &mut Conn) {
            assert!(conn.peer_closed());
            assert!(conn.take_session::<String>().is_none(), "another type leaves the session in place");
            let count = conn.take_session::<Count>().map_or(0, |c| c.0);
            CLOSED_WITH.store(count, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_test_connection_drives_the_app_as_the_worker_would() {
        let app = TestApp::<Facts>::start("").unwrap();
        let _: &Facts = app.app();
        let mut conn = app.connect();
        conn.send(b"one\ntw");
        assert_eq!(conn.pending_input(), b"tw");
        let out = String::from_utf8(conn.take_output()).unwrap();
        assert_eq!(out, "one peer=\"\" listener=\"\" id=0 closed=false timer=None\n");
        // No timer set, and the default `on_timer` keeps the connection.
        assert_eq!(conn.timer(), None);
        assert_eq!(conn.fire_timer(), Next::KeepOpen);
        conn.send(b"o\n");
        assert_eq!(conn.requests(), 2);
        conn.close();
        assert_eq!(CLOSED_WITH.load(std::sync::atomic::Ordering::SeqCst), 2, "on_close took the session");
    }

    #[test]
    fn settings_an_app_does_not_declare_are_refused_by_the_test_driver_too() {
        struct Strict;
        impl App for Strict {
            const SETTINGS: Option<&'static [&'static str]> = Some(&["delay_ms"]);
            fn start(_: &Settings) -> Result<Self, String> {
                Ok(Strict)
            }
            fn on_readable(&self, conn: &mut Conn) -> Next {
                conn.set_timer(Some(Duration::from_secs(1)));
                Next::KeepOpen
            }
        }
        assert!(TestApp::<Strict>::start("delay_ms = 1").is_ok());
        let err = TestApp::<Strict>::start("delay = 1").err().unwrap();
        assert_eq!(err, "unknown setting `delay` (the app takes: delay_ms)");
        let app = TestApp::<Strict>::start("").unwrap();
        let mut conn = app.connect();
        conn.set_draining(true);
        conn.send(b"x");
        assert_eq!(conn.timer(), Some(Duration::from_secs(1)));
    }
}
