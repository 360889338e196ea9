//! `ticker`: a service that serves nothing. Every `interval_ms` (default 1000) it appends
//! `<unix time ms> pid=<pid> generation=<g> tick=<n>` to `file`. With `singleton = true` exactly
//! one worker of the server ticks at a time — also across a reload (the old generation's worker
//! ticks until it exits, then a new one takes over) and a worker's death (a sibling takes over):
//! a [`Singleton`] claim decides, before each tick.
//!
//! Give it no `[[listen]]`: the server starts it in every worker anyway.
//!
//! ```toml
//! [app.ticker]
//! plugin = "target/release/libfdt_ticker.so"
//! file = "/var/log/ticks.log"
//! interval_ms = 1000
//! singleton = true
//! ```

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fdt_sdk::{App, Conn, Next, Settings, Singleton};

struct Ticker;

/// One tick's work, owned by the app's timer.
struct Tick {
    file: String,
    pid: u32,
    generation: u64,
    /// `None`: tick in every worker.
    claim: Option<Singleton>,
    ticks: AtomicU64,
}

impl Tick {
    fn run(&self) {
        if self.claim.as_ref().is_some_and(|c| !c.try_hold()) {
            return; // another worker of the server ticks
        }
        let n = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = format!("{ms} pid={} generation={} tick={n}\n", self.pid, self.generation);
        // Never block the worker's clock on the file: a FIFO (or a device) is refused before
        // it is opened.
        if let Ok(meta) = std::fs::metadata(&self.file)
            && !meta.file_type().is_file()
        {
            log::warn!("ticker: {} is not a regular file; not ticking into it", self.file);
            return;
        }
        // One `write` of one line, in append mode: lines of several writers never mix.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            log::warn!("ticker: cannot append to {}: {e}", self.file);
        }
    }
}

impl App for Ticker {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["file", "interval_ms", "singleton"]);

    fn start(settings: &Settings) -> Result<Self, String> {
        let file = settings.string("file", "")?;
        if file.is_empty() {
            return Err("ticker needs `file`, the file to append its ticks to".into());
        }
        let interval = settings.duration_ms("interval_ms", 1000)?;
        if interval.is_zero() {
            return Err("`interval_ms` must be at least 1".into());
        }
        let tick = Arc::new(Tick {
            file,
            pid: settings.worker_pid(),
            generation: settings.generation(),
            claim: settings.bool("singleton", false)?.then(|| settings.singleton("tick")),
            ticks: AtomicU64::new(0),
        });
        let timer = settings.timers().every(interval.max(Duration::from_millis(1)), move || tick.run());
        if timer.is_none() {
            return Err("this server has no app timers (it is older than fdt-sdk's ABI 1.2)".into());
        }
        Ok(Ticker)
    }

    /// It serves nothing: a connection that reaches it (a listener named it) is closed.
    fn on_readable(&self, _conn: &mut Conn) -> Next {
        Next::Close
    }
}

fdt_sdk::export_app!(Ticker);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    fn lines(file: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_string).collect()
    }

    #[test]
    fn ticks_every_interval_into_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ticks");
        let app = TestApp::<Ticker>::start(&format!("file = \"{}\"\ninterval_ms = 100", file.display())).unwrap();
        assert_eq!(app.advance(Duration::from_millis(350)), 3);
        let lines = lines(&file);
        assert_eq!(lines.len(), 3);
        let pid = std::process::id();
        for (i, line) in lines.iter().enumerate() {
            assert!(line.ends_with(&format!(" pid={pid} generation=1 tick={}", i + 1)), "{line}");
            assert!(line.split(' ').next().unwrap().parse::<u128>().is_ok(), "{line}");
        }
        let mut conn = app.connect();
        assert_eq!(conn.send(b"hello\n"), Next::Close, "it serves nothing");
    }

    #[test]
    fn a_singleton_ticks_only_while_it_holds_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ticks");
        let settings = format!("file = \"{}\"\ninterval_ms = 100\nsingleton = true", file.display());
        let (a, b) = (TestApp::<Ticker>::start(&settings).unwrap(), TestApp::<Ticker>::start(&settings).unwrap());
        a.advance(Duration::from_millis(100));
        b.advance(Duration::from_millis(300));
        assert_eq!(lines(&file).len(), 1, "only the holder ticks: {:?}", lines(&file));
        drop(a); // its timer, and with it the claim, goes with the app
        b.advance(Duration::from_millis(100));
        assert_eq!(lines(&file).len(), 2);
    }

    #[test]
    fn refuses_a_start_without_a_file_or_with_a_zero_interval() {
        assert!(TestApp::<Ticker>::start("").err().unwrap().contains("`file`"));
        assert!(TestApp::<Ticker>::start("file = \"/tmp/x\"\ninterval_ms = 0").err().unwrap().contains("interval_ms"));
        assert!(TestApp::<Ticker>::start("fiel = \"/tmp/x\"").err().unwrap().contains("unknown setting `fiel`"));
    }
}
