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
    next_id: std::sync::atomic::AtomicU64,
    clock: std::sync::Arc<crate::timers::TestClock>,
    /// Owns the services the app starts ([`Settings::service`]).
    owner: u64,
    bus: std::sync::Arc<crate::bus::TestBus>,
}

impl<A: App> TestApp<A> {
    /// Starts the app with the given `[app.NAME]` settings (TOML text).
    /// Like the server, refuses a key the app does not declare in [`App::SETTINGS`].
    pub fn start(settings_toml: &str) -> Result<TestApp<A>, String> {
        let clock = std::sync::Arc::new(crate::timers::TestClock::default());
        static OWNERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let owner = OWNERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bus = std::sync::Arc::new(crate::bus::TestBus::default());
        let settings = Settings::parse("test", settings_toml)?
            .with_service_owner(owner)
            .with_bus(crate::Bus::simulated(bus.clone()), "")
            .with_worker("test-node", std::process::id(), 1)
            .with_timers(crate::Timers::simulated(clock.clone()))
            .with_connector(crate::Connector::simulated());
        if let Some(declared) = A::SETTINGS
            && let Some(unknown) = settings.keys().find(|k| !declared.contains(k))
        {
            return Err(format!("unknown setting `{unknown}` (the app takes: {})", declared.join(", ")));
        }
        Ok(TestApp { app: A::start(&settings)?, next_id: Default::default(), clock, owner, bus })
    }

    /// The events the app emitted ([`Bus::emit`](crate::Bus::emit)) since the last call, in
    /// order, as (topic, payload).
    pub fn emitted(&self) -> Vec<(String, Vec<u8>)> {
        self.bus.take_emitted()
    }

    /// Delivers what the app emitted to its own subscriptions, in order, as the worker's event
    /// thread would (and what those deliveries emit, in turn); returns how many deliveries ran.
    /// Events wait for this call: a test decides when they arrive.
    pub fn deliver_events(&self) -> usize {
        self.bus.deliver_queued()
    }

    /// Delivers an event to the app's subscriptions as if another worker or server emitted it;
    /// returns how many subscriptions took it.
    pub fn inject(&self, topic: &str, payload: &[u8]) -> usize {
        self.bus.deliver(topic, payload)
    }

    /// Asks the app's background services ([`Settings::service`]) to stop, as when its worker
    /// drains, and waits for them as the worker does (up to 5 s); true when all returned in
    /// time. Services run on real threads from [`TestApp::start`] on; dropping the `TestApp`
    /// stops them too.
    pub fn stop_services(&self) -> bool {
        crate::services::stop_owned(self.owner, crate::services::STOP_WAIT)
    }

    /// Moves the app's simulated clock forward by `by`, running its timers
    /// ([`Settings::timers`]) as they come due, in order; returns how many runs there were.
    /// Time moves only here.
    pub fn advance(&self, by: std::time::Duration) -> usize {
        self.clock.advance(u64::try_from(by.as_millis()).unwrap_or(u64::MAX))
    }

    /// The app itself.
    pub fn app(&self) -> &A {
        &self.app
    }

    /// Opens a new simulated connection and calls [`App::on_open`] (its greeting is in
    /// [`TestConn::take_output`]). Each connection has its own [`Conn::id`] (1, 2, …) and
    /// [`Conn::peer`] (`127.0.0.1:40001`, `127.0.0.1:40002`, …); its listener is
    /// `127.0.0.1:7000`.
    pub fn connect(&self) -> TestConn<'_, A> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let state = ConnState {
            peer: format!("127.0.0.1:{}", 40_000 + id % 20_000),
            listener: "127.0.0.1:7000".into(),
            id,
            handle: new_handle(),
            ..ConnState::default()
        };
        let mut conn = self.conn(state);
        conn.opened = conn.call(A::on_open);
        conn
    }

    /// A connection handed over from the previous generation on a reload, as the worker adopts
    /// one: with the session its old app exported ([`TestConn::hand_off`]), and
    /// [`App::import_session`] called instead of `on_open`. `Err`: the app refused it.
    pub fn take_over(&self, session: &[u8]) -> Result<TestConn<'_, A>, String> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut conn = self.conn(ConnState {
            peer: format!("127.0.0.1:{}", 40_000 + id % 20_000),
            listener: "127.0.0.1:7000".into(),
            id,
            handle: new_handle(),
            ..ConnState::default()
        });
        let mut c = Conn::new(&[], 0, &mut conn.state);
        self.app.import_session(&mut c, session)?;
        Ok(conn)
    }

    /// Takes the outbound connection the app started to `addr` ([`Connector::connect`](crate::Connector::connect),
    /// [`Conn::connect`]), if it started one that was not taken yet: the test plays its peer.
    /// It is not connected yet: call [`TestConn::connected`] (the app's `on_open`) or
    /// [`TestConn::refuse`]. What the app wrote to its handle meanwhile is in its
    /// [`TestConn::take_output`].
    pub fn take_outbound(&self, addr: &str) -> Option<TestConn<'_, A>> {
        let pending = crate::outbound::take_pending(|p| p.addr == addr)?;
        Some(self.outbound(pending))
    }

    fn outbound(&self, pending: crate::outbound::Pending) -> TestConn<'_, A> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.conn(ConnState {
            peer: pending.addr,
            id,
            handle: pending.handle,
            outbound: true,
            link: pending.link,
            ..ConnState::default()
        })
    }

    fn conn(&self, state: ConnState) -> TestConn<'_, A> {
        TestConn {
            app: self,
            input: Vec::new(),
            state,
            draining: false,
            requests: 0,
            room: usize::MAX,
            opened: Next::KeepOpen,
        }
    }
}

impl<A: App> Drop for TestApp<A> {
    fn drop(&mut self) {
        self.stop_services();
    }
}

/// A new handle, unique in the process (tests run side by side), that pushes find.
pub(crate) fn new_handle() -> u64 {
    static HANDLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let handle = HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    crate::push::simulated_connections()
        .get_or_insert_with(Default::default)
        .insert(handle, crate::push::Simulated { room: usize::MAX, ..Default::default() });
    handle
}

/// A simulated connection: keeps the unconsumed input between calls, like the worker does.
pub struct TestConn<'a, A: App> {
    app: &'a TestApp<A>,
    input: Vec<u8>,
    state: ConnState,
    draining: bool,
    requests: u64,
    /// What each call may write before the output counts as full (see [`Conn::output_room`]).
    room: usize,
    /// What [`App::on_open`] returned.
    opened: Next,
}

impl<'a, A: App> TestConn<'a, A> {
    /// Appends bytes to the input and calls `on_readable` once.
    pub fn send(&mut self, bytes: &[u8]) -> Next {
        self.input.extend_from_slice(bytes);
        self.call(A::on_readable)
    }

    /// Calls `on_timer` once, as the worker does when the connection's timer runs out.
    pub fn fire_timer(&mut self) -> Next {
        self.call(A::on_timer)
    }

    /// What [`App::on_open`] returned when the connection was made.
    pub fn opened(&self) -> Next {
        self.opened
    }

    /// Calls `on_writable` once, as the worker does when the output has drained to half of
    /// `max_output` and the app [wants it](Conn::want_writable). (The test connection's output
    /// is what [`TestConn::take_output`] has not taken; it never counts as queued.)
    pub fn writable(&mut self) -> Next {
        self.call(A::on_writable)
    }

    /// Tells the app that the worker started draining: makes [`Conn::draining`] true from now
    /// on and calls `on_drain` once.
    pub fn drain(&mut self) -> Next {
        self.draining = true;
        self.call(A::on_drain)
    }

    /// Calls `on_read_timeout`, as the worker does when a begun request did not arrive in full
    /// within `read_timeout` (the worker then closes the connection).
    pub fn read_timeout(&mut self) {
        self.call(|app, conn| {
            app.on_read_timeout(conn);
            Next::Close
        });
    }

    /// Sets how many bytes each later call may write before the output counts as full
    /// ([`Conn::output_room`]), as the server's `max_output` does. Unlimited by default.
    /// Pushes to this connection ([`Handle::write`](crate::Handle::write)) are bounded the
    /// same way: what waits untaken in [`TestConn::take_output`] counts.
    pub fn set_output_room(&mut self, bytes: usize) {
        self.room = bytes;
        if let Some(conn) = crate::push::simulated_connections().as_mut().and_then(|m| m.get_mut(&self.state.handle)) {
            conn.room = bytes;
        }
    }

    /// True once a push asked to close this connection ([`Handle::close`](crate::Handle::close)).
    pub fn closed_by_push(&self) -> bool {
        crate::push::simulated_connections().as_ref().and_then(|m| m.get(&self.state.handle)).is_some_and(|c| c.closed)
    }

    /// True while the app asks for `on_writable` calls ([`Conn::want_writable`]).
    pub fn wants_writable(&self) -> bool {
        self.state.want_writable
    }

    /// True while the app lifted the server's `idle_timeout` ([`Conn::lift_idle_timeout`]).
    pub fn idle_timeout_lifted(&self) -> bool {
        self.state.no_idle_timeout
    }

    /// One call into the app, with the input kept since the last call.
    fn call(&mut self, f: impl FnOnce(&A, &mut Conn) -> Next) -> Next {
        let flags = if self.draining { abi::FLAG_DRAINING } else { 0 };
        // Like the worker: what was written in earlier calls and not taken does not count (it
        // was sent), only what this call writes.
        let room = self.room.saturating_add(self.state.out.len());
        let mut conn = Conn::new(&self.input, flags, &mut self.state).with_room(room);
        let next = f(&self.app.app, &mut conn);
        let (consumed, requests) = conn.finish();
        self.input.drain(..consumed);
        self.requests += requests;
        next
    }

    /// The connection's timer as the app left it ([`Conn::set_timer`]).
    pub fn timer(&self) -> Option<std::time::Duration> {
        self.state.timer()
    }

    /// Everything the app wrote since the last call.
    /// Pushed bytes ([`Handle::write`](crate::Handle::write)) come after what the app's own
    /// callbacks wrote.
    pub fn take_output(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.state.out);
        if let Some(conn) = crate::push::simulated_connections().as_mut().and_then(|m| m.get_mut(&self.state.handle)) {
            out.append(&mut conn.bytes);
        }
        out
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
        self.forget();
        let mut conn = Conn::new(&[], abi::FLAG_PEER_CLOSED, &mut self.state);
        self.app.app.on_close(&mut conn);
    }

    /// Takes the outbound connection this connection's callback started ([`Conn::connect`]),
    /// if any (see [`TestApp::take_outbound`]).
    pub fn take_outbound(&self) -> Option<TestConn<'a, A>> {
        let handle = self.state.handle;
        let pending = crate::outbound::take_pending(|p| p.link == handle)?;
        Some(self.app.outbound(pending))
    }

    /// Hands the connection off, as a reload does to one between requests: returns the session
    /// [`App::export_session`] gives (empty for none), then closes it here (`on_close`). Give
    /// the bytes to [`TestApp::take_over`] of the next generation's app.
    pub fn hand_off(mut self) -> Vec<u8> {
        let session = {
            let mut c = Conn::new(&[], 0, &mut self.state);
            self.app.app.export_session(&mut c).unwrap_or_default()
        };
        self.close();
        session
    }

    /// For an outbound connection: the connect succeeded. Calls [`App::on_open`].
    pub fn connected(&mut self) -> Next {
        self.opened = self.call(A::on_open);
        self.opened
    }

    /// For an outbound connection: the connect failed with `reason`. Calls
    /// [`App::on_connect_failed`], then closes the connection (`on_close`).
    pub fn refuse(mut self, reason: &str) {
        self.forget();
        self.call(|app, conn| {
            app.on_connect_failed(conn, reason);
            Next::Close
        });
        self.close();
    }

    /// The peer's address: for an outbound connection, the address the app connected to.
    pub fn peer(&self) -> &str {
        &self.state.peer
    }

    /// The handle pushes to this connection use ([`Conn::handle`]).
    pub fn handle(&self) -> crate::Handle {
        crate::Handle(self.state.handle)
    }

    /// From now on, pushes to this connection fail as closed.
    fn forget(&mut self) {
        if let Some(all) = crate::push::simulated_connections().as_mut() {
            all.remove(&self.state.handle);
        }
    }
}

impl<A: App> Drop for TestConn<'_, A> {
    fn drop(&mut self) {
        self.forget();
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
        assert_eq!(out, "one peer=\"127.0.0.1:40001\" listener=\"127.0.0.1:7000\" id=1 closed=false timer=None\n");
        let other = app.connect();
        assert_eq!((other.state.id, other.state.peer.as_str()), (2, "127.0.0.1:40002"), "each connection its own");
        // No timer set, and the default `on_timer` keeps the connection.
        assert_eq!(conn.timer(), None);
        assert_eq!(conn.fire_timer(), Next::KeepOpen);
        conn.send(b"o\n");
        assert_eq!(conn.requests(), 2);
        conn.close();
        assert_eq!(CLOSED_WITH.load(std::sync::atomic::Ordering::SeqCst), 2, "on_close took the session");
    }

    /// Greets, answers lines while there is room, says goodbye on a drain and `408` on a read
    /// timeout, and keeps subscribers (`SUB`) past the idle timeout.
    struct Lifecycle;

    impl App for Lifecycle {
        fn start(_: &Settings) -> Result<Self, String> {
            Ok(Lifecycle)
        }
        fn on_open(&self, conn: &mut Conn) -> Next {
            conn.write(format!("WELCOME {}\n", conn.id()).as_bytes());
            Next::KeepOpen
        }
        fn on_readable(&self, conn: &mut Conn) -> Next {
            while let Some(line) = conn.take_line() {
                if line == b"SUB\n" {
                    conn.lift_idle_timeout(true);
                }
                conn.write(line);
            }
            Next::KeepOpen
        }
        fn on_drain(&self, conn: &mut Conn) -> Next {
            assert!(conn.draining());
            conn.write(b"BYE\n");
            Next::Close
        }
        fn on_read_timeout(&self, conn: &mut Conn) {
            let partial = conn.input().len();
            conn.write(format!("408 after {partial} bytes\n").as_bytes());
        }
    }

    #[test]
    fn the_test_driver_drives_open_room_drain_and_read_timeout() {
        let app = TestApp::<Lifecycle>::start("").unwrap();
        let mut conn = app.connect();
        assert_eq!((conn.opened(), conn.take_output()), (Next::KeepOpen, b"WELCOME 1\n".to_vec()));
        conn.set_output_room(4);
        conn.send(b"ab\ncd\nef\n");
        assert_eq!(conn.take_output(), b"ab\ncd\n", "the second line filled the room: the third waits");
        assert_eq!(conn.pending_input(), b"ef\n");
        conn.set_output_room(usize::MAX);
        conn.send(b"SUB\npart");
        assert_eq!(conn.take_output(), b"ef\nSUB\n");
        assert!(conn.idle_timeout_lifted() && !conn.wants_writable());
        conn.read_timeout();
        assert_eq!(conn.take_output(), b"408 after 4 bytes\n");
        assert_eq!(conn.writable(), Next::KeepOpen, "the default on_writable does nothing");
        assert_eq!(conn.drain(), Next::Close);
        assert_eq!(conn.take_output(), b"BYE\n");
    }

    /// Keeps the first connection's handle; `PUSH <text>` pushes to it, `KICK` closes it.
    #[derive(Default)]
    struct Pusher {
        first: std::sync::Mutex<Option<crate::Handle>>,
    }

    impl App for Pusher {
        fn start(_: &Settings) -> Result<Self, String> {
            Ok(Pusher::default())
        }
        fn on_open(&self, conn: &mut Conn) -> Next {
            self.first.lock().unwrap().get_or_insert(conn.handle());
            Next::KeepOpen
        }
        fn on_readable(&self, conn: &mut Conn) -> Next {
            let first = self.first.lock().unwrap().unwrap();
            while let Some(line) = conn.take_line() {
                let result = match line {
                    b"KICK\n" => first.close(),
                    _ => first.write(line),
                };
                conn.write(format!("{result:?}\n").as_bytes());
            }
            Next::KeepOpen
        }
    }

    #[test]
    fn pushes_reach_a_test_connection_bounded_by_its_room_and_fail_once_it_closed() {
        let app = TestApp::<Pusher>::start("").unwrap();
        let mut first = app.connect();
        let mut second = app.connect();
        first.set_output_room(8);
        second.send(b"abc\n");
        assert_eq!(second.take_output(), b"Ok(())\n");
        second.send(b"defgh\n");
        assert_eq!(second.take_output(), b"Err(Full)\n", "4 + 6 bytes pass the room of 8");
        assert_eq!(first.take_output(), b"abc\n");
        second.send(b"KICK\n");
        assert!(first.closed_by_push());
        assert_eq!(second.take_output(), b"Ok(())\n");
        second.send(b"late\n");
        assert_eq!(second.take_output(), b"Err(Closed)\n");
        first.close();
        assert_eq!(
            crate::PushError::Full.to_string(),
            "the connection's output is full (its peer does not read fast enough)"
        );
    }

    /// A service that dials `peer` through the app's connector, then counts until stopped.
    struct Dialer {
        rounds: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl App for Dialer {
        fn start(settings: &Settings) -> Result<Self, String> {
            let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
            let (counter, connector) = (rounds.clone(), settings.connector());
            settings.service("dial", move |stop| {
                let link = connector.connect("10.1.2.3:99", None).expect("a simulated connect");
                let _ = link.write(b"HELLO\n");
                while !stop.sleep(Duration::from_millis(5)) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })?;
            Ok(Dialer { rounds })
        }
        fn on_readable(&self, conn: &mut Conn) -> Next {
            assert!(conn.is_outbound() && conn.link().is_none());
            while let Some(line) = conn.take_line() {
                conn.write(line);
            }
            Next::KeepOpen
        }
    }

    #[test]
    fn a_service_runs_on_its_own_thread_dials_through_the_connector_and_stops_when_asked() {
        let app = TestApp::<Dialer>::start("").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut link = loop {
            if let Some(link) = app.take_outbound("10.1.2.3:99") {
                break link;
            }
            assert!(std::time::Instant::now() < deadline, "the service did not connect");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(link.connected(), Next::KeepOpen);
        assert_eq!(link.take_output(), b"HELLO\n", "written before the connect completed");
        link.send(b"echo\n");
        assert_eq!(link.take_output(), b"echo\n");
        while app.app().rounds.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "the service does not run");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(app.stop_services(), "the service returned when asked");
        let after = app.app().rounds.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(app.app().rounds.load(std::sync::atomic::Ordering::SeqCst), after, "stopped for good");
        assert!(app.take_outbound("10.1.2.3:99").is_none(), "taken once");
    }

    #[test]
    fn a_connect_outside_a_server_or_its_test_driver_fails_with_a_reason() {
        let err = crate::Connector::default().connect("127.0.0.1:1", None).unwrap_err();
        assert!(err.to_string().contains("plugin ABI 1.3"), "{err}");
        assert_eq!(format!("{:?}", crate::Connector::default()), "Connector { backend: \"none\" }");
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
