//! Messages between the master and a worker, one text line each, over the socketpair the
//! master creates before forking the worker.
//!
//! Text keeps the channel readable in `strace`; both directions are tiny and infrequent.

use std::fmt;

/// Worker → master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerMessage {
    /// Every app is started; the worker waits for [`MasterMessage::Accept`].
    Ready,
    /// The worker could not start (the reason), and exits.
    Failed(String),
    /// Heartbeat with the worker's counters and its handler threads' progress, sent every
    /// `STATS_INTERVAL` by the worker's control thread.
    Stats(WorkerStats),
    /// The acceptors run: the worker takes connections.
    Accepting,
    /// Draining: the worker's acceptors have returned; it takes no new connection.
    StoppedAccepting,
    /// The apps' event counters (totals), sent with a heartbeat when they changed.
    Events(Vec<AppEvent>),
    /// Connections the worker closed so far, by reason (`closed REASON=N …`), sent when they
    /// change.
    Closed(Vec<(String, u64)>),
}

/// One app event counter: (app, event, total).
pub type AppEvent = (String, String, u64);

/// Makes a name safe for the `events` line (no spaces, `/` or `=`).
fn token(name: &str) -> String {
    name.chars().map(|c| if c.is_whitespace() || c == '/' || c == '=' { '_' } else { c }).collect()
}

/// A worker's counters, as reported in its heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub open: u64,
    pub accepted: u64,
    pub requests: u64,
    pub panics: u64,
    /// Handler threads serving a connection right now.
    pub busy_threads: u64,
    /// When every handler thread is busy: how long the one that started last has been busy
    /// (the worker made no progress at all for that long). 0 otherwise.
    pub stalled_ms: u64,
    /// Log and access lines the worker failed to write (see `logging::write_failures`).
    pub log_failures: u64,
    /// The request that has been inside a handler longest, if any.
    pub oldest: Option<RunningRequest>,
}

/// A request a handler thread is serving (for `request_timeout` and its log line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunningRequest {
    /// How long it has been running, in milliseconds.
    pub ms: u64,
    /// The client's address.
    pub peer: String,
    /// The app serving it.
    pub app: String,
}

/// Master → worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterMessage {
    /// Start accepting connections (the whole generation is ready).
    Accept,
    /// Stop accepting, finish the connections in progress, then exit.
    Drain,
    /// Drain, and hand the connections between requests to the workers that take them, of
    /// this generation or a later one (a reload's new generation, or the siblings of a worker
    /// recycled or removed).
    Handoff {
        generation: u64,
        /// How many workers of it take connections (wait for them, to spread over them all).
        takers: u64,
    },
    /// Close everything now and exit.
    Stop,
    /// Switch the log files to the ones passed with this message (`SCM_RIGHTS`): the error log
    /// when `error` is true, then the access log when `access` is true. See `USR1`.
    Reopen { error: bool, access: bool },
}

impl fmt::Display for WorkerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerMessage::Ready => writeln!(f, "ready"),
            WorkerMessage::Failed(reason) => writeln!(f, "failed {}", reason.replace('\n', " ")),
            WorkerMessage::Stats(s) => {
                write!(
                    f,
                    "stats {} {} {} {} {} {} {}",
                    s.open, s.accepted, s.requests, s.panics, s.busy_threads, s.stalled_ms, s.log_failures
                )?;
                match &s.oldest {
                    // The app name last: it is the only field that may contain spaces.
                    Some(r) => writeln!(f, " {} {} {}", r.ms, r.peer.replace(' ', "_"), r.app.replace('\n', " ")),
                    None => writeln!(f),
                }
            }
            WorkerMessage::StoppedAccepting => writeln!(f, "stopped-accepting"),
            WorkerMessage::Accepting => writeln!(f, "accepting"),
            WorkerMessage::Closed(counts) => {
                write!(f, "closed")?;
                for (reason, n) in counts {
                    write!(f, " {}={n}", token(reason))?;
                }
                writeln!(f)
            }
            WorkerMessage::Events(events) => {
                write!(f, "events")?;
                for (app, event, total) in events {
                    write!(f, " {}/{}={total}", token(app), token(event))?;
                }
                writeln!(f)
            }
        }
    }
}

impl fmt::Display for MasterMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterMessage::Accept => writeln!(f, "accept"),
            MasterMessage::Drain => writeln!(f, "drain"),
            MasterMessage::Handoff { generation, takers } => writeln!(f, "handoff {generation} {takers}"),
            MasterMessage::Stop => writeln!(f, "stop"),
            MasterMessage::Reopen { error, access } => {
                writeln!(f, "reopen{}{}", if *error { " error" } else { "" }, if *access { " access" } else { "" })
            }
        }
    }
}

impl WorkerMessage {
    pub fn parse(line: &str) -> Option<WorkerMessage> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "ready" => Some(WorkerMessage::Ready),
            "stopped-accepting" => Some(WorkerMessage::StoppedAccepting),
            "accepting" => Some(WorkerMessage::Accepting),
            "events" => rest
                .split_whitespace()
                .map(|item| {
                    let (name, total) = item.split_once('=')?;
                    let (app, event) = name.split_once('/')?;
                    Some((app.to_string(), event.to_string(), total.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()
                .map(WorkerMessage::Events),
            "failed" => Some(WorkerMessage::Failed(rest.to_string())),
            "closed" => rest
                .split_whitespace()
                .map(|item| {
                    let (reason, n) = item.split_once('=')?;
                    Some((reason.to_string(), n.parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()
                .map(WorkerMessage::Closed),
            "stats" => {
                let mut words = rest.splitn(10, ' ');
                let mut n = [0u64; 7];
                for v in &mut n {
                    *v = words.next()?.parse().ok()?;
                }
                let [open, accepted, requests, panics, busy_threads, stalled_ms, log_failures] = n;
                let oldest = match (words.next(), words.next(), words.next()) {
                    (Some(ms), Some(peer), Some(app)) => {
                        Some(RunningRequest { ms: ms.parse().ok()?, peer: peer.to_string(), app: app.to_string() })
                    }
                    _ => None,
                };
                Some(WorkerMessage::Stats(WorkerStats {
                    open,
                    accepted,
                    requests,
                    panics,
                    busy_threads,
                    stalled_ms,
                    log_failures,
                    oldest,
                }))
            }
            _ => None,
        }
    }
}

impl MasterMessage {
    pub fn parse(line: &str) -> Option<MasterMessage> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "accept" => Some(MasterMessage::Accept),
            "drain" => Some(MasterMessage::Drain),
            "handoff" => {
                let (generation, takers) = rest.trim().split_once(' ')?;
                Some(MasterMessage::Handoff { generation: generation.parse().ok()?, takers: takers.parse().ok()? })
            }
            "stop" => Some(MasterMessage::Stop),
            "reopen" => {
                let files: Vec<&str> = rest.split_whitespace().collect();
                Some(MasterMessage::Reopen { error: files.contains(&"error"), access: files.contains(&"access") })
            }
            _ => None,
        }
    }
}

/// Lines waiting to go out on a non-blocking socket. A line the socket takes only in part is
/// finished first, so lines never interleave, whatever the other side's reading pace.
#[derive(Default)]
pub struct Outbox {
    pending: Vec<u8>,
}

/// Beyond this much unsent data the peer is not reading at all (stopped, hung): new lines are
/// dropped rather than queued without bound; the supervision limits deal with such a peer.
const MAX_PENDING: usize = 1024 * 1024;

impl Outbox {
    /// Queues `line` and sends what the socket takes now.
    pub fn send(&mut self, stream: &mut impl std::io::Write, line: &str) -> std::io::Result<()> {
        if self.pending.len() + line.len() > MAX_PENDING {
            return Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, "the peer reads nothing"));
        }
        self.pending.extend_from_slice(line.as_bytes());
        self.flush(stream)
    }

    /// Sends what the socket takes of the queued bytes.
    pub fn flush(&mut self, stream: &mut impl std::io::Write) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            match stream.write(&self.pending) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Splits a byte stream into lines; keeps a partial last line for the next read.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

/// Lines longer than this are a broken peer; the buffer is cut rather than grown forever.
const MAX_LINE: usize = 64 * 1024;

impl LineBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_LINE && !self.buf.contains(&b'\n') {
            self.buf.clear();
        }
    }

    pub fn next_line(&mut self) -> Option<String> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..=end);
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `room` bytes per call, then would block.
    struct Trickle {
        taken: Vec<u8>,
        room: usize,
    }

    impl std::io::Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_outbox_finishes_a_partly_sent_line_before_the_next() {
        let mut out = Outbox::default();
        let mut sock = Trickle { taken: Vec::new(), room: 3 };
        out.send(&mut sock, "drain\n").unwrap();
        out.send(&mut sock, "stop\n").unwrap();
        assert_eq!(sock.taken, b"dra");
        sock.room = 100;
        out.flush(&mut sock).unwrap();
        assert_eq!(sock.taken, b"drain\nstop\n");
        assert!(out.is_empty());
    }

    #[test]
    fn messages_round_trip_through_lines() {
        let msgs = [
            WorkerMessage::Ready,
            WorkerMessage::Failed("app echo: cannot load\nthe plugin".into()),
            WorkerMessage::Stats(WorkerStats { open: 1, accepted: 2, requests: 3, panics: 4, ..Default::default() }),
            WorkerMessage::Stats(WorkerStats {
                busy_threads: 2,
                stalled_ms: 5,
                oldest: Some(RunningRequest { ms: 1500, peer: "127.0.0.1:5000".into(), app: "my app".into() }),
                ..Default::default()
            }),
        ];
        let mut lines = LineBuffer::default();
        for m in &msgs {
            lines.push(m.to_string().as_bytes());
        }
        assert_eq!(WorkerMessage::parse(&lines.next_line().unwrap()), Some(WorkerMessage::Ready));
        assert_eq!(
            WorkerMessage::parse(&lines.next_line().unwrap()),
            Some(WorkerMessage::Failed("app echo: cannot load the plugin".into()))
        );
        assert_eq!(WorkerMessage::parse(&lines.next_line().unwrap()), Some(msgs[2].clone()));
        assert_eq!(WorkerMessage::parse(&lines.next_line().unwrap()), Some(msgs[3].clone()));
        assert_eq!(lines.next_line(), None);
        let events =
            WorkerMessage::Events(vec![("bank".into(), "txn_committed".into(), 7), ("a b".into(), "x".into(), 0)]);
        assert_eq!(
            WorkerMessage::parse(events.to_string().trim_end()),
            Some(WorkerMessage::Events(vec![
                ("bank".into(), "txn_committed".into(), 7),
                ("a_b".into(), "x".into(), 0)
            ]))
        );
        assert_eq!(WorkerMessage::parse("events"), Some(WorkerMessage::Events(vec![])));
        let closed = WorkerMessage::Closed(vec![("idle_timeout".into(), 3), ("peer".into(), 0)]);
        assert_eq!(closed.to_string(), "closed idle_timeout=3 peer=0\n");
        assert_eq!(WorkerMessage::parse(closed.to_string().trim_end()), Some(closed));
        assert_eq!(WorkerMessage::parse("closed x"), None);
        for m in [
            MasterMessage::Accept,
            MasterMessage::Drain,
            MasterMessage::Handoff { generation: 7, takers: 4 },
            MasterMessage::Stop,
            MasterMessage::Reopen { error: true, access: false },
            MasterMessage::Reopen { error: true, access: true },
        ] {
            assert_eq!(MasterMessage::parse(m.to_string().trim_end()), Some(m));
        }
    }
}
