//! `testkit`: an app for fdtserver's own tests, with commands that misbehave on purpose.
//!
//! Settings: `fail_start = "reason"` makes `start` fail; `panic_at_start = true` makes it
//! panic; `abort_at_start_if = "/path"` kills the worker at start while that file exists (a
//! crash loop on demand); `hang_at_start_if = "/path"` keeps the start waiting while that file
//! exists (a hung start on demand); `start_delay_ms` delays the start; `abort_after_ms` kills the
//! worker that long after its start returned (a worker that crashes shortly after it reported
//! ready); `tag` is echoed by `TAG`. Line commands, one answer line each:
//! `PID`, `GEN`, `TAG`, `PEER` (the client as the app sees it: `Conn::peer`), `DRAINING` (yes/no), `SLEEP <ms>` (answers `SLEPT`), `PANIC`,
//! `ABORT` (kills the worker process), `BUSY` (stays `InProgress` until `IDLE`), `SPIN`
//! (loops forever inside the handler, never answering: a request stuck in app code), `UID`
//! (the worker's real and effective uid and gid: `uid euid gid egid`), `ENV <name>` (the
//! variable's value in the worker, `-` when unset), `TIMER <ms>` (sets the connection's timer;
//! each time it runs out the app writes `TICK <n> <bytes of partial input>`; `TIMER 0` removes
//! it), `TIMEOUT <ms>` (when the timer runs out: `TIMED OUT`, then close), `TIMER_PANIC <ms>`
//! (the app panics when the timer runs out), `LIFT` (lifts the server's `idle_timeout` for
//! this connection; answers `LIFTED`), `EVERY <ms> [<sleep ms>]` (starts an app timer that runs
//! every `ms`, sleeping that long inside; answers `STARTED`), `AFTER <ms>` (a one-shot app timer;
//! `STARTED`), `EVERY_PANIC <ms>` (an app timer that panics each run; `STARTED`), `CANCEL`
//! (cancels every app timer started by commands; `CANCELLED`), `RUNS` (`<runs> <overlaps>` of
//! those timers: an overlap is a run that began while another run of the same timer was still
//! going), `FLOOD <bytes>` (writes that many bytes at once, ignoring the output room, then
//! closes), anything else is echoed.
//!
//! Push (one room per worker): `JOIN` (answers `JOINED`), `SAY <text>` (pushes `<text>` as a line
//! to every other member; answers `SAID ok=N full=N closed=N`, and members that were full or
//! closed leave the room), `FLOOD_OTHERS <bytes>` (pushes chunks of that size to every other
//! member until one push is refused; answers `FLOODED <chunks> <full|closed>`), `KICK_OTHERS`
//! (closes every other member after what was pushed; `KICKED N`), `LATER <ms> <text>` (an app
//! timer pushes `<text>` to this connection after `ms`; answers `LATER`), `KEEP` (keeps this
//! connection's handle for good, even after it closes; `KEPT`), `TELL_KEPT <text>` (pushes to
//! every kept handle; `TOLD ok=N closed=N`).
//!
//! Lifecycle: `greeting = "text"` is written as a line when a connection opens (and with
//! `close_after_greeting = true` the connection is closed right after it, as a server that
//! turns a client away with a reason would); with
//! `drain_notice = true`, every open connection gets a line `DRAIN <pid>` when its worker starts
//! draining. With `tick_file = "/path"`, an app timer appends `TICK <pid>` to that file every
//! 100 ms, and `DROPPED <pid>` once the server drops the timer (when the app stops).
//!
//! Services: with `service_file = "/path"`, a background service appends `RUN <pid>` when it
//! starts, `BEAT <pid>` every 50 ms, and `STOP <pid>` when asked to stop; with
//! `service_panic_after = N` it panics after N beats (and is run again); with
//! `service_singleton = true` one instance runs per server.
//!
//! Events: with `bench_events = true`, the app counts the events `bench.*` it receives and
//! their latency; `EMIT <n> [gap_us]` emits n of them (64 bytes, stamped with the time, one every
//! gap_us if given; answers `EMITTED <n> refused=<r>`), `RECEIVED` answers
//! `<count> <p50 µs> <p99 µs>` for this worker since the last `RECEIVED`.
//!
//! `LISTEN <pattern>` subscribes this connection to events (each arrives as a line
//! `EVENT <topic> <payload>`; answers `LISTENING`), `UNLISTEN` ends that (`UNLISTENED`),
//! `EMIT1 <topic> <payload>` emits one event (`EMITTED` or `ERR <reason>`).
//!
//! Outbound: with `dial = "host:port"`, each worker connects there from an app timer once it
//! serves (a connect from `start` itself is tried first and logged as refused), writes
//! `HELLO <pid>` once connected and answers each line `<l>` from that peer with `GOT <l>`;
//! failures are logged (`testkit: dial failed: …`).

use fdt_sdk::{App, Conn, Handle, Next, PushError, Settings, TimerId, Timers};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the app timers started by commands did.
#[derive(Default)]
struct TimerStats {
    runs: AtomicU64,
    overlaps: AtomicU64,
}

/// The wall clock in nanoseconds (the same in every process of the machine).
fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Appends a line to `path` (for `tick_file`).
fn append(path: &str, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Owned by the `tick_file` timer: says when the server drops it.
struct DropNotice {
    path: String,
    pid: u32,
}

impl Drop for DropNotice {
    fn drop(&mut self) {
        append(&self.path, &format!("DROPPED {}\n", self.pid));
    }
}

struct Testkit {
    tag: String,
    greeting: String,
    close_after_greeting: bool,
    drain_notice: bool,
    timers: Timers,
    started: Mutex<Vec<TimerId>>,
    stats: Arc<TimerStats>,
    /// `JOIN`ed connections.
    room: Mutex<Vec<Handle>>,
    /// `KEEP`: handles kept after their connections close (stale ones, on purpose).
    kept: Mutex<Vec<Handle>>,
    pid: u32,
    generation: u64,
    bus: fdt_sdk::Bus,
    /// `bench_events`: latencies (ns) of the `bench.*` events received since the last `RECEIVED`.
    received: Arc<Mutex<Vec<u64>>>,
}

#[derive(Default)]
struct Session {
    busy: bool,
    /// `TIMEOUT` rather than `TIMER`: close when the timer runs out.
    close_on_timer: bool,
    /// `TIMER_PANIC`: panic when the timer runs out.
    panic_on_timer: bool,
    ticks: u64,
    /// `LISTEN`: its event subscription.
    listening: Option<fdt_sdk::SubscriptionId>,
}

impl App for Testkit {
    /// Its connections keep state the tests look at: never handed off; a drain closes idle ones.
    const IDLE_CLOSE_HARMLESS: bool = true;
    const SETTINGS: Option<&'static [&'static str]> = Some(&[
        "start_delay_ms",
        "fail_start",
        "hang_at_start_if",
        "abort_at_start_if",
        "abort_after_ms",
        "panic_at_start",
        "tag",
        "greeting",
        "close_after_greeting",
        "drain_notice",
        "tick_file",
        "service_file",
        "service_panic_after",
        "service_singleton",
        "dial",
        "bench_events",
    ]);

    fn start(settings: &Settings) -> Result<Self, String> {
        std::thread::sleep(settings.duration_ms("start_delay_ms", 0)?);
        let fail = settings.string("fail_start", "")?;
        if !fail.is_empty() {
            return Err(fail);
        }
        let hang = settings.string("hang_at_start_if", "")?;
        while !hang.is_empty() && std::path::Path::new(&hang).exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let trap = settings.string("abort_at_start_if", "")?;
        if !trap.is_empty() && std::path::Path::new(&trap).exists() {
            std::process::abort();
        }
        if settings.bool("panic_at_start", false)? {
            panic!("testkit was told to panic at start");
        }
        let abort_after = settings.duration_ms("abort_after_ms", 0)?;
        if !abort_after.is_zero() {
            std::thread::spawn(move || {
                std::thread::sleep(abort_after);
                std::process::abort();
            });
        }
        let tick_file = settings.string("tick_file", "")?;
        if !tick_file.is_empty() {
            let notice = DropNotice { path: tick_file, pid: settings.worker_pid() };
            settings.timers().every(Duration::from_millis(100), move || {
                append(&notice.path, &format!("TICK {}\n", notice.pid));
            });
        }
        let dial = settings.string("dial", "")?;
        if !dial.is_empty() {
            let connector = settings.connector();
            if let Err(e) = connector.connect(&dial, None) {
                log::warn!("testkit: dial from start: {e}");
            }
            settings.timers().after(Duration::ZERO, move || {
                if let Err(e) = connector.connect(&dial, None) {
                    log::warn!("testkit: dial failed: {e}");
                }
            });
        }
        let received = Arc::new(Mutex::new(Vec::new()));
        if settings.bool("bench_events", false)? {
            let mine = received.clone();
            settings
                .bus()
                .subscribe("bench.*", move |_, payload| {
                    let sent =
                        payload.get(..16).and_then(|p| u128::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok());
                    let now = now_ns();
                    let mut all = mine.lock().unwrap_or_else(|e| e.into_inner());
                    if all.len() < 4_000_000 {
                        all.push(sent.map_or(0, |s| now.saturating_sub(s) as u64));
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        let service_file = settings.string("service_file", "")?;
        if !service_file.is_empty() {
            let (pid, panic_after) = (settings.worker_pid(), settings.u64("service_panic_after", 0)?);
            let work = move |stop: &fdt_sdk::Stop| {
                append(&service_file, &format!("RUN {pid}\n"));
                let mut beats = 0;
                while !stop.sleep(Duration::from_millis(50)) {
                    append(&service_file, &format!("BEAT {pid}\n"));
                    beats += 1;
                    assert!(panic_after == 0 || beats < panic_after, "testkit's service was told to panic");
                }
                append(&service_file, &format!("STOP {pid}\n"));
            };
            if settings.bool("service_singleton", false)? {
                settings.singleton_service("beat", work)?;
            } else {
                settings.service("beat", work)?;
            }
        }
        Ok(Testkit {
            timers: settings.timers(),
            started: Mutex::new(Vec::new()),
            stats: Arc::new(TimerStats::default()),
            room: Mutex::new(Vec::new()),
            kept: Mutex::new(Vec::new()),
            tag: settings.string("tag", "")?,
            greeting: settings.string("greeting", "")?,
            close_after_greeting: settings.bool("close_after_greeting", false)?,
            drain_notice: settings.bool("drain_notice", false)?,
            pid: settings.worker_pid(),
            generation: settings.generation(),
            bus: settings.bus(),
            received,
        })
    }

    fn on_close(&self, conn: &mut Conn) {
        let me = conn.handle();
        self.members().retain(|m| *m != me);
    }

    fn on_connect_failed(&self, _conn: &mut Conn, error: &str) {
        log::warn!("testkit: dial failed: {error}");
    }

    fn on_open(&self, conn: &mut Conn) -> Next {
        if conn.is_outbound() {
            conn.write(format!("HELLO {}\n", self.pid).as_bytes());
            return Next::KeepOpen;
        }
        if !self.greeting.is_empty() {
            conn.write(format!("{}\n", self.greeting).as_bytes());
        }
        if self.close_after_greeting { Next::Close } else { Next::KeepOpen }
    }

    fn on_drain(&self, conn: &mut Conn) -> Next {
        if self.drain_notice {
            conn.write(format!("DRAIN {}\n", self.pid).as_bytes());
        }
        Next::KeepOpen
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        if conn.is_outbound() {
            while let Some(line) = conn.take_line() {
                conn.write(b"GOT ");
                conn.write(line);
            }
            return Next::KeepOpen;
        }
        while let Some(line) = conn.take_line() {
            let line = String::from_utf8_lossy(line).trim().to_string();
            let mut words = line.split_whitespace();
            let answer = match (words.next().unwrap_or(""), words.next()) {
                ("PID", _) => self.pid.to_string(),
                ("PEER", _) => conn.peer().to_string(),
                ("LISTEN", Some(pattern)) => {
                    let me = conn.handle();
                    let subscribed = self.bus.subscribe(pattern, move |topic, payload| {
                        let line = format!("EVENT {topic} {}\n", String::from_utf8_lossy(payload));
                        let _ = me.write(line.as_bytes());
                    });
                    match subscribed {
                        Ok(id) => {
                            conn.session::<Session>().listening = Some(id);
                            "LISTENING".to_string()
                        }
                        Err(e) => format!("ERR {e}"),
                    }
                }
                ("UNLISTEN", _) => match conn.session::<Session>().listening.take() {
                    Some(id) => {
                        self.bus.unsubscribe(id);
                        "UNLISTENED".to_string()
                    }
                    None => "ERR not listening".to_string(),
                },
                ("EMIT1", Some(topic)) => {
                    let payload: Vec<&str> = words.by_ref().collect();
                    match self.bus.emit(topic, payload.join(" ").as_bytes()) {
                        Ok(()) => "EMITTED".to_string(),
                        Err(e) => format!("ERR {e}"),
                    }
                }
                ("EMIT", Some(n)) => {
                    let n: usize = n.parse().unwrap_or(0);
                    let gap = Duration::from_micros(words.next().and_then(|g| g.parse().ok()).unwrap_or(0));
                    let mut refused = 0;
                    let began = std::time::Instant::now();
                    for i in 0..n {
                        if !gap.is_zero() {
                            let due = began + gap * i as u32;
                            std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                        }
                        let payload = format!("{:016x}{:048}", now_ns(), i);
                        refused += usize::from(self.bus.emit("bench.e", payload.as_bytes()).is_err());
                    }
                    format!("EMITTED {n} refused={refused}")
                }
                ("RECEIVED", _) => {
                    let mut all = std::mem::take(&mut *self.received.lock().unwrap_or_else(|e| e.into_inner()));
                    all.sort_unstable();
                    let at = |q: f64| all.get(((all.len().max(1) - 1) as f64 * q) as usize).map_or(0, |ns| ns / 1000);
                    format!("{} {} {}", all.len(), at(0.5), at(0.99))
                }
                ("GEN", _) => self.generation.to_string(),
                ("TAG", _) => self.tag.clone(),
                ("DRAINING", _) => if conn.draining() { "yes" } else { "no" }.to_string(),
                ("SLEEP", Some(ms)) => {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                    "SLEPT".to_string()
                }
                ("PANIC", _) => panic!("testkit was told to panic"),
                ("ABORT", _) => std::process::abort(),
                ("SPIN", _) => loop {
                    std::hint::black_box(&line);
                },
                ("ENV", Some(name)) => std::env::var(name).unwrap_or_else(|_| "-".into()),
                ("UID", _) => {
                    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                    let field = |name: &str| {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix(name))
                            .map(|v| v.split_whitespace().collect::<Vec<_>>())
                    };
                    let (uid, gid) = (field("Uid:").unwrap_or_default(), field("Gid:").unwrap_or_default());
                    format!(
                        "{} {} {} {}",
                        uid.first().unwrap_or(&"?"),
                        uid.get(1).unwrap_or(&"?"),
                        gid.first().unwrap_or(&"?"),
                        gid.get(1).unwrap_or(&"?")
                    )
                }
                ("BUSY", _) => {
                    conn.session::<Session>().busy = true;
                    "BUSY".to_string()
                }
                ("EVERY" | "AFTER" | "EVERY_PANIC", Some(ms)) => {
                    let period = Duration::from_millis(ms.parse().unwrap_or(100));
                    let sleep = Duration::from_millis(words.next().and_then(|w| w.parse().ok()).unwrap_or(0));
                    let (stats, running) = (self.stats.clone(), Arc::new(AtomicBool::new(false)));
                    let panics = line.starts_with("EVERY_PANIC");
                    let run = move || {
                        if running.swap(true, Ordering::SeqCst) {
                            stats.overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        std::thread::sleep(sleep);
                        stats.runs.fetch_add(1, Ordering::SeqCst);
                        running.store(false, Ordering::SeqCst);
                        assert!(!panics, "testkit was told to panic in a timer");
                    };
                    let id = if line.starts_with("AFTER") {
                        self.timers.after(period, run)
                    } else {
                        self.timers.every(period, run)
                    };
                    match id {
                        Some(id) => {
                            self.started.lock().unwrap_or_else(|e| e.into_inner()).push(id);
                            "STARTED".to_string()
                        }
                        None => "NO CLOCK".to_string(),
                    }
                }
                ("CANCEL", _) => {
                    for id in self.started.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                        self.timers.cancel(id);
                    }
                    "CANCELLED".to_string()
                }
                ("RUNS", _) => {
                    format!("{} {}", self.stats.runs.load(Ordering::SeqCst), self.stats.overlaps.load(Ordering::SeqCst))
                }
                ("FLOOD", Some(n)) => {
                    conn.write(&vec![b'x'; n.parse().unwrap_or(0)]);
                    return Next::Close;
                }
                ("KEEP", _) => {
                    self.kept.lock().unwrap_or_else(|e| e.into_inner()).push(conn.handle());
                    "KEPT".to_string()
                }
                ("TELL_KEPT", Some(_)) => {
                    let text = format!("{}\n", line.split_once(' ').map_or("", |(_, t)| t));
                    let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
                    let ok = kept.iter().filter(|h| h.write(text.as_bytes()).is_ok()).count();
                    format!("TOLD ok={ok} closed={}", kept.len() - ok)
                }
                ("JOIN", _) => {
                    self.members().push(conn.handle());
                    "JOINED".to_string()
                }
                ("SAY", Some(_)) => {
                    let text = format!("{}\n", line.split_once(' ').map_or("", |(_, t)| t));
                    let me = conn.handle();
                    let (mut ok, mut full, mut closed) = (0, 0, 0);
                    self.members().retain(|m| match if *m == me { Ok(()) } else { m.write(text.as_bytes()) } {
                        _ if *m == me => true,
                        Ok(()) => {
                            ok += 1;
                            true
                        }
                        Err(PushError::Full) => {
                            full += 1;
                            false
                        }
                        Err(PushError::Closed) => {
                            closed += 1;
                            false
                        }
                    });
                    format!("SAID ok={ok} full={full} closed={closed}")
                }
                ("FLOOD_OTHERS", Some(n)) => {
                    let chunk = vec![b'f'; n.parse().unwrap_or(1)];
                    let me = conn.handle();
                    let others: Vec<Handle> = self.members().iter().copied().filter(|m| *m != me).collect();
                    let mut chunks = 0u64;
                    let why = 'flood: loop {
                        for m in &others {
                            match m.write(&chunk) {
                                Ok(()) => chunks += 1,
                                Err(e) => break 'flood e,
                            }
                        }
                        if others.is_empty() {
                            break PushError::Closed;
                        }
                    };
                    format!("FLOODED {chunks} {}", if why == PushError::Full { "full" } else { "closed" })
                }
                ("KICK_OTHERS", _) => {
                    let me = conn.handle();
                    let mut kicked = 0;
                    self.members().retain(|m| {
                        *m == me
                            || (m.close().is_ok() && {
                                kicked += 1;
                                false
                            })
                    });
                    format!("KICKED {kicked}")
                }
                ("LATER", Some(ms)) => {
                    let text = format!("{}\n", words.collect::<Vec<_>>().join(" "));
                    let me = conn.handle();
                    self.timers.after(Duration::from_millis(ms.parse().unwrap_or(0)), move || {
                        let _ = me.write(text.as_bytes());
                    });
                    "LATER".to_string()
                }
                ("LIFT", _) => {
                    conn.lift_idle_timeout(true);
                    "LIFTED".to_string()
                }
                ("IDLE", _) => {
                    conn.session::<Session>().busy = false;
                    "IDLE".to_string()
                }
                ("TIMER" | "TIMEOUT" | "TIMER_PANIC", Some(ms)) => {
                    let ms: u64 = ms.parse().unwrap_or(0);
                    conn.set_timer((ms > 0).then(|| Duration::from_millis(ms)));
                    let session = conn.session::<Session>();
                    session.close_on_timer = line.starts_with("TIMEOUT");
                    session.panic_on_timer = line.starts_with("TIMER_PANIC");
                    "TIMER".to_string()
                }
                ("QUIT", _) => {
                    conn.write(b"BYE\n");
                    return Next::Close;
                }
                _ => line,
            };
            conn.write(answer.as_bytes());
            conn.write(b"\n");
        }
        if conn.session::<Session>().busy { Next::InProgress } else { Next::KeepOpen }
    }

    fn on_timer(&self, conn: &mut Conn) -> Next {
        let pending = conn.input().len();
        let session = conn.session::<Session>();
        if session.panic_on_timer {
            panic!("testkit was told to panic on its timer");
        }
        if session.close_on_timer {
            conn.write(b"TIMED OUT\n");
            return Next::Close;
        }
        session.ticks += 1;
        let answer = format!("TICK {} {pending}\n", session.ticks);
        conn.write(answer.as_bytes());
        Next::KeepOpen
    }
}

impl Testkit {
    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Handle>> {
        self.room.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fdt_sdk::export_app!(Testkit);
