//! One client connection inside a worker: its buffers and its I/O state machine.
//!
//! Invariant: a `Conn` is touched by one thread at a time, whoever holds its slot lock in the
//! worker's connection table: the handler serving an event for it, or the drain sweeper while
//! it is parked. A connection is closed only between requests, unless its peer is gone, the
//! app failed, or the drain timed out.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use fdt_sdk::Next;
use socket2::Socket;

use crate::plugin::{App, ConnHandle, DataOutcome};
use crate::sys::{self, Event, interest};

/// A request whose bytes reach this size without the app consuming any is refused: the
/// connection is closed rather than buffering without bound.
pub const MAX_PENDING_INPUT: usize = 1024 * 1024;
/// How long a closing connection waits for its peer to close after our FIN, discarding what
/// it sends, so that unread input does not turn our close into a reset that could destroy the
/// last answer in flight.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving requests.
    Open,
    /// Sending the rest of its output, then closing.
    Flushing,
    /// Our side is shut down; waiting (until the deadline) for the peer to close.
    Lingering { until: Instant },
}

/// Why a connection ended (for logs and the access log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    Done,
    AppFailed(String),
    TooLarge,
    Error(String),
    Drained,
    Forced,
}

impl CloseReason {
    /// The word for the access log.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer",
            CloseReason::Done => "done",
            CloseReason::AppFailed(_) => "app-failed",
            CloseReason::TooLarge => "too-large",
            CloseReason::Error(_) => "error",
            CloseReason::Drained => "drained",
            CloseReason::Forced => "forced",
        }
    }
}

/// What the handler must do with the connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Park it in the epoll instance with this interest.
    Park(u32),
    /// Close it now.
    Close(CloseReason),
}

/// Scratch buffers of one handler thread, reused for every connection it serves, so that a
/// connection whose requests are complete and answered keeps no buffer of its own.
pub struct Scratch {
    input: Vec<u8>,
    output: Vec<u8>,
}

/// How much a handler reads per `read` call.
const READ_CHUNK: usize = 64 * 1024;

impl Scratch {
    pub fn new() -> Scratch {
        Scratch { input: vec![0; READ_CHUNK], output: Vec::with_capacity(READ_CHUNK) }
    }
}

pub struct Conn {
    pub socket: Socket,
    pub seq: u32,
    pub app: usize,
    handle: Option<ConnHandle>,
    /// Unconsumed input (a partial request); usually empty and unallocated.
    input: Vec<u8>,
    /// Output the socket did not take yet; usually empty and unallocated.
    output: Vec<u8>,
    pub phase: Phase,
    /// The interest registered for it in the epoll instance (always edge-triggered).
    pub armed: u32,
    /// True when the last event's handling read the socket until it was empty, so that the
    /// next input is a new edge (see `Pool::apply`).
    pub read_empty: bool,
    /// A short read does not prove the socket empty: read until `EAGAIN` or the end of input.
    /// So on a Unix socket (a read stops at a message carrying fds or credentials), and once an
    /// event said the peer closed its side (the end of input takes one more read) or sent TCP
    /// urgent data (a read stops at its mark).
    read_to_eagain: bool,
    /// What the app said last.
    next: Next,
    /// The app's timer (`fdt_sdk::Conn::set_timer`): `App::on_timer` is called once the peer
    /// has been quiet this long.
    pub timer: Option<Duration>,
    pub last_active: Instant,
    /// When it was accepted (for the access log's duration).
    pub opened: Instant,
    pub peer: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
}

impl Conn {
    pub fn new(socket: Socket, tcp: bool, seq: u32, app: usize, handle: ConnHandle, peer: String) -> Conn {
        let now = Instant::now();
        Conn {
            socket,
            seq,
            app,
            handle: Some(handle),
            input: Vec::new(),
            output: Vec::new(),
            phase: Phase::Open,
            armed: interest::READ | interest::EDGE,
            read_empty: false,
            read_to_eagain: !tcp,
            next: Next::KeepOpen,
            timer: None,
            last_active: now,
            opened: now,
            peer,
            bytes_in: 0,
            bytes_out: 0,
            requests: 0,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// True when the connection is between requests and the app allows closing it: no partial
    /// input, nothing left to send, and the app did not say [`Next::InProgress`].
    pub fn between_requests(&self) -> bool {
        self.phase == Phase::Open && self.input.is_empty() && self.output.is_empty() && self.next == Next::KeepOpen
    }

    /// True when input waits in the kernel's buffer, not yet read (its event not handled yet).
    pub fn input_waiting(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(self.socket.peek(&mut byte), Ok(n) if n > 0)
    }

    /// Handles readiness. `draining` is passed to the app so it can answer with a close.
    pub fn on_ready(&mut self, event: &Event, app: &App, draining: bool, scratch: &mut Scratch) -> (After, u64) {
        let (readable, writable) = (event.readable(), event.writable());
        self.read_empty = false;
        // The edge that announced it is spent: read on past a stop a short read cannot see.
        self.read_to_eagain |= event.read_may_stop_early();
        match self.phase {
            Phase::Lingering { .. } => (self.discard_input(), 0),
            Phase::Flushing => (self.flush_then(), 0),
            Phase::Open if !self.output.is_empty() => {
                // Parked for writing: the app's answer did not fit into the socket.
                if writable { (self.flush_then(), 0) } else { (After::Park(interest::WRITE), 0) }
            }
            Phase::Open if readable => self.serve(app, draining, scratch),
            Phase::Open => (After::Park(interest::READ), 0),
        }
    }

    /// Reads what arrived, lets the app answer, and writes the answer.
    fn serve(&mut self, app: &App, draining: bool, scratch: &mut Scratch) -> (After, u64) {
        let mut peer_closed = false;
        let mut fresh = 0;
        loop {
            match (&self.socket).read(&mut scratch.input) {
                Ok(0) => {
                    peer_closed = true;
                    self.read_empty = true;
                    break;
                }
                Ok(n) => {
                    fresh = n;
                    self.bytes_in += n as u64;
                    // A full buffer means more may be waiting: keep it and read again.
                    if n == scratch.input.len() {
                        self.input.extend_from_slice(&scratch.input[..n]);
                        fresh = 0;
                        if self.input.len() >= MAX_PENDING_INPUT {
                            break;
                        }
                        continue;
                    }
                    // A short read took every byte queued, unless something stopped it early.
                    if self.read_to_eagain {
                        fresh = 0;
                        self.input.extend_from_slice(&scratch.input[..n]);
                        continue;
                    }
                    self.read_empty = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_empty = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (After::Close(CloseReason::Error(e.to_string())), 0),
            }
        }
        self.last_active = Instant::now();
        // Common case: the connection had no partial request, so the app reads straight from
        // the scratch buffer and nothing is copied.
        let use_scratch = self.input.is_empty();
        if !use_scratch && fresh > 0 {
            self.input.extend_from_slice(&scratch.input[..fresh]);
        }
        let available = if use_scratch { fresh } else { self.input.len() };
        let mut requests = 0;
        if available > 0 || peer_closed {
            let flags = (if draining { fdt_sdk::abi::FLAG_DRAINING } else { 0 })
                | (if peer_closed { fdt_sdk::abi::FLAG_PEER_CLOSED } else { 0 });
            let data = if use_scratch { &scratch.input[..fresh] } else { &self.input[..] };
            scratch.output.clear();
            let handle = self.handle.as_mut().expect("open connection has an app handle");
            match app.on_data(handle, data, flags, &mut scratch.output) {
                DataOutcome::Failed(reason) => {
                    return (After::Close(CloseReason::AppFailed(reason)), 0);
                }
                DataOutcome::Next { next, consumed, requests: r, timer_ms } => {
                    requests = r;
                    self.requests += r;
                    self.next = next;
                    self.timer = timer_from_ms(timer_ms);
                    if use_scratch {
                        if consumed < fresh {
                            self.input.extend_from_slice(&scratch.input[consumed..fresh]);
                        }
                    } else {
                        self.input.drain(..consumed);
                        if self.input.is_empty() {
                            self.input = Vec::new();
                        }
                    }
                    if consumed == 0 && self.input.len() >= MAX_PENDING_INPUT {
                        return (After::Close(CloseReason::TooLarge), requests);
                    }
                }
            }
            // The peer's quiet time (app timers, the drain's grace) starts once it has its
            // answer, not while the app was still working on the request.
            self.last_active = Instant::now();
            if let Err(e) = self.write_out(&scratch.output) {
                return (After::Close(CloseReason::Error(e.to_string())), requests);
            }
        }
        if peer_closed {
            // The peer sends no more, but if it only half-closed it still reads: send the rest
            // of the answers first.
            if self.output.is_empty() {
                return (After::Close(CloseReason::PeerClosed), requests);
            }
            self.phase = Phase::Flushing;
            return (After::Park(interest::WRITE), requests);
        }
        (self.settle(), requests)
    }

    /// After the app answered: start the close it asked for, or wait for what comes next.
    fn settle(&mut self) -> After {
        if self.next == Next::Close {
            self.phase = Phase::Flushing;
            return self.flush_then();
        }
        if self.output.is_empty() { After::Park(interest::READ) } else { After::Park(interest::WRITE) }
    }

    /// True when the app's timer has run out: the connection is serving requests and the peer
    /// has sent nothing for the timer's length.
    pub fn timer_due(&self, now: Instant) -> bool {
        self.phase == Phase::Open && self.timer.is_some_and(|t| now.duration_since(self.last_active) >= t)
    }

    /// Calls the app's `on_timer` (see [`Conn::timer_due`]); the quiet period starts again.
    pub fn on_timer(&mut self, app: &App, draining: bool, scratch: &mut Scratch) -> (After, u64) {
        let flags = if draining { fdt_sdk::abi::FLAG_DRAINING } else { 0 };
        scratch.output.clear();
        let handle = self.handle.as_mut().expect("open connection has an app handle");
        let requests = match app.on_timer(handle, &self.input, flags, &mut scratch.output) {
            DataOutcome::Failed(reason) => return (After::Close(CloseReason::AppFailed(reason)), 0),
            DataOutcome::Next { next, consumed, requests, timer_ms } => {
                self.next = next;
                self.timer = timer_from_ms(timer_ms);
                self.requests += requests;
                self.input.drain(..consumed);
                if self.input.is_empty() {
                    self.input = Vec::new();
                }
                requests
            }
        };
        self.last_active = Instant::now();
        if let Err(e) = self.write_out(&scratch.output) {
            return (After::Close(CloseReason::Error(e.to_string())), requests);
        }
        (self.settle(), requests)
    }

    /// Writes `bytes` (after anything already queued); queues what the socket does not take.
    fn write_out(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.output.is_empty() {
            self.output.extend_from_slice(bytes);
            return self.flush();
        }
        let mut written = 0;
        while written < bytes.len() {
            match (&self.socket).write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.bytes_out += written as u64;
        if written < bytes.len() {
            self.output.extend_from_slice(&bytes[written..]);
        }
        Ok(())
    }

    /// Writes queued output until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.output.len() {
            match (&self.socket).write(&self.output[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.bytes_out += written as u64;
        self.output.drain(..written);
        if self.output.is_empty() {
            self.output = Vec::new();
        }
        Ok(())
    }

    /// Flushes; when everything is out, moves on (serve again, or start the close).
    fn flush_then(&mut self) -> After {
        if let Err(e) = self.flush() {
            return After::Close(CloseReason::Error(e.to_string()));
        }
        if !self.output.is_empty() {
            return After::Park(interest::WRITE);
        }
        match self.phase {
            Phase::Flushing => self.begin_close(),
            _ => After::Park(interest::READ),
        }
    }

    /// Starts a gentle close: FIN to the peer, then wait for its FIN while discarding input.
    pub fn begin_close(&mut self) -> After {
        if self.socket.shutdown(Shutdown::Write).is_err() {
            return After::Close(CloseReason::Done);
        }
        self.phase = Phase::Lingering { until: Instant::now() + LINGER_TIMEOUT };
        After::Park(interest::READ)
    }

    fn discard_input(&mut self) -> After {
        let mut buf = [0u8; 4096];
        loop {
            match (&self.socket).read(&mut buf) {
                Ok(0) => return After::Close(CloseReason::Done),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_empty = true;
                    return After::Park(interest::READ);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return After::Close(CloseReason::Done),
            }
        }
    }

    /// Hands the app's connection state back to the app; called once, when the connection ends.
    pub fn release(&mut self, app: &App) {
        if let Some(handle) = self.handle.take() {
            app.close_conn(handle);
        }
    }

    /// True when a lingering close has waited long enough.
    pub fn linger_expired(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::Lingering { until } if now >= until)
    }
}

fn timer_from_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Makes a freshly accepted socket ready for the event loop.
pub fn prepare_socket(socket: &Socket, tcp: bool) -> io::Result<()> {
    sys::set_nonblocking(socket.as_raw_fd(), true)?;
    if tcp {
        socket.set_tcp_nodelay(true)?;
    }
    Ok(())
}
