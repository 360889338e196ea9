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
    /// Heartbeat with the worker's counters, sent every `STATS_INTERVAL`.
    Stats(WorkerStats),
    /// The acceptors run: the worker takes connections.
    Accepting,
    /// Draining: the worker's acceptors have returned; it takes no new connection.
    StoppedAccepting,
}

/// A worker's counters, as reported in its heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    pub open: u64,
    pub accepted: u64,
    pub requests: u64,
    pub panics: u64,
}

/// Master → worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterMessage {
    /// Start accepting connections (the whole generation is ready).
    Accept,
    /// Stop accepting, finish the connections in progress, then exit.
    Drain,
    /// Close everything now and exit.
    Stop,
}

impl fmt::Display for WorkerMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerMessage::Ready => writeln!(f, "ready"),
            WorkerMessage::Failed(reason) => writeln!(f, "failed {}", reason.replace('\n', " ")),
            WorkerMessage::Stats(s) => writeln!(f, "stats {} {} {} {}", s.open, s.accepted, s.requests, s.panics),
            WorkerMessage::StoppedAccepting => writeln!(f, "stopped-accepting"),
            WorkerMessage::Accepting => writeln!(f, "accepting"),
        }
    }
}

impl fmt::Display for MasterMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterMessage::Accept => writeln!(f, "accept"),
            MasterMessage::Drain => writeln!(f, "drain"),
            MasterMessage::Stop => writeln!(f, "stop"),
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
            "failed" => Some(WorkerMessage::Failed(rest.to_string())),
            "stats" => {
                let n: Vec<u64> = rest.split(' ').filter_map(|w| w.parse().ok()).collect();
                let [open, accepted, requests, panics] = n[..] else {
                    return None;
                };
                Some(WorkerMessage::Stats(WorkerStats { open, accepted, requests, panics }))
            }
            _ => None,
        }
    }
}

impl MasterMessage {
    pub fn parse(line: &str) -> Option<MasterMessage> {
        match line {
            "accept" => Some(MasterMessage::Accept),
            "drain" => Some(MasterMessage::Drain),
            "stop" => Some(MasterMessage::Stop),
            _ => None,
        }
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

    #[test]
    fn messages_round_trip_through_lines() {
        let msgs = [
            WorkerMessage::Ready,
            WorkerMessage::Failed("app echo: cannot load\nthe plugin".into()),
            WorkerMessage::Stats(WorkerStats { open: 1, accepted: 2, requests: 3, panics: 4 }),
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
        assert_eq!(lines.next_line(), None);
        for m in [MasterMessage::Accept, MasterMessage::Drain, MasterMessage::Stop] {
            assert_eq!(MasterMessage::parse(m.to_string().trim_end()), Some(m));
        }
    }
}
