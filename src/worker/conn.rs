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

use fdt_sdk::{Next, abi};
use socket2::Socket;

use super::{outbound, push};
use crate::config::Limits;
use crate::plugin::{App, Call, ConnHandle, DataOutcome};
use crate::sys::{self, Event, interest};
use crate::{proxy_protocol, tls};

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
    /// An outbound connection whose connect is under way, to fail at `deadline`
    /// (`sys::monotonic_ms`).
    Connecting { deadline: u64 },
    /// Serving requests.
    Open,
    /// Sending the rest of its output, then closing.
    Flushing,
    /// Our side is shut down; waiting (until the deadline) for the peer to close.
    Lingering { until: Instant },
}

/// Why a connection ended (for logs, the access log and the metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    Done,
    AppFailed(String),
    TooLarge,
    Error(String),
    Drained,
    Forced,
    /// A connection limit ended it (the close itself may have been gentle).
    Limit(Limit),
    /// An outbound connection could not be made (refused, unreachable, timed out).
    ConnectFailed(String),
    /// It moved to another worker (`worker::handoff`): not closed at all.
    HandedOff,
    /// Its PROXY protocol header was refused: from outside `proxy_from`, or malformed.
    ProxyHeader(String),
}

/// The connection limits that close a connection ("Connection limits and timeouts").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Between requests with no input for `idle_timeout`: closed gently.
    Idle,
    /// A request begun and not complete within `read_timeout`: the app may answer (`408`),
    /// then the connection is closed gently.
    Read,
    /// Output the peer took none of for `send_timeout`: closed at once.
    Send,
    /// An outbound connect not made by its timeout: failed.
    Connect,
}

/// Every label of [`CloseReason::label`], in the order of [`CloseReason::index`].
pub const CLOSE_LABELS: [&str; 13] = [
    "peer",
    "done",
    "app_failed",
    "too_large",
    "error",
    "drained",
    "forced",
    "idle_timeout",
    "read_timeout",
    "send_timeout",
    "connect_failed",
    "handed_off",
    "proxy_header",
];

impl CloseReason {
    /// Its place in [`CLOSE_LABELS`].
    pub fn index(&self) -> usize {
        match self {
            CloseReason::PeerClosed => 0,
            CloseReason::Done => 1,
            CloseReason::AppFailed(_) => 2,
            CloseReason::TooLarge => 3,
            CloseReason::Error(_) => 4,
            CloseReason::Drained => 5,
            CloseReason::Forced => 6,
            CloseReason::Limit(Limit::Idle) => 7,
            CloseReason::Limit(Limit::Read) => 8,
            CloseReason::Limit(Limit::Send) => 9,
            CloseReason::ConnectFailed(_) | CloseReason::Limit(Limit::Connect) => 10,
            CloseReason::HandedOff => 11,
            CloseReason::ProxyHeader(_) => 12,
        }
    }

    /// The word for the access log's `close=` and the metrics' `reason`.
    pub fn label(&self) -> &'static str {
        CLOSE_LABELS[self.index()]
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
/// A scratch output buffer that grew past this (an app that wrote more than its room) is
/// given back after use, so a handler does not keep a peak's memory forever.
const SCRATCH_KEEP: usize = 1024 * 1024;
/// How many times one event may call a producer or re-offer input in a row before the
/// connection goes back to the event loop (parked for writing: a socket with room reports at
/// once), so that one fast reader cannot hold a handler.
const PRODUCE_ROUNDS: usize = 16;

impl Scratch {
    pub fn new() -> Scratch {
        Scratch { input: vec![0; READ_CHUNK], output: Vec::with_capacity(READ_CHUNK) }
    }

    /// Gives back what a peak left in the output buffer.
    fn shrink(&mut self) {
        if self.output.capacity() > SCRATCH_KEEP {
            self.output = Vec::with_capacity(READ_CHUNK);
        }
    }
}

/// What a call into the app may use besides the connection.
pub struct Ctx<'a> {
    pub app: &'a App,
    /// The address of its listener (empty for an outbound connection).
    pub address: &'a str,
    pub limits: &'a Limits,
    pub draining: bool,
}

/// Which of the app's functions a call goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Callback {
    Input,
    Timer,
    Event(abi::EventKind),
}

pub struct Conn {
    pub socket: Socket,
    /// Its TLS session, on a TLS listener: every read and write goes through it.
    pub tls: Option<Box<tls::Session>>,
    /// The PROXY protocol header still to read, on a listener behind a proxy: until it is,
    /// the app has not heard of the connection (`handle` is `None`).
    header: Option<proxy_protocol::Version>,
    pub seq: u32,
    /// Its listener's place in the generation's `[[listen]]` list (for its limits).
    pub listener: u32,
    /// Its app's place in the worker's apps (see [`Conn::app`]).
    app: u32,
    handle: Option<ConnHandle>,
    /// Unconsumed input (a partial request, or requests waiting for output room); usually
    /// empty and unallocated.
    input: Vec<u8>,
    /// Output the socket did not take yet (from `sent` on); usually empty and unallocated.
    output: Vec<u8>,
    /// How much of `output` was sent: a partial write moves this, not the rest of the buffer.
    sent: usize,
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
    /// The output went above `max_output`: no reading and no app call until it drains to half.
    full: bool,
    /// The app stopped answering for lack of output room (or its producer finished): the
    /// input may hold complete requests, to offer again once there is room.
    stalled: bool,
    /// The peer closed its sending side: nothing more to read, the rest of the input and the
    /// output to finish.
    eof: bool,
    /// A push from the app's last call to another connection was refused as full, with input
    /// left: no reading and no call until that connection has room (`worker::push`, flow
    /// control), when its input is offered again.
    blocked: bool,
    /// The app made this connection (`worker::outbound`).
    pub outbound: bool,
    /// A handoff of it was refused or failed (`worker::handoff`): it stays here.
    pub handoff_failed: bool,
    /// The app was told that the worker drains (`App::on_drain`).
    pub told_drain: bool,
    /// The limit that is closing it, if one is.
    pub limit: Option<Limit>,
    /// What the app said last.
    next: Next,
    /// The app's `WANT_*` bits.
    wants: u32,
    /// The app's timer in milliseconds, 0 for none (`fdt_sdk::Conn::set_timer`): `App::on_timer`
    /// is called once the peer has been quiet this long.
    timer_ms: u64,
    /// When the peer last sent something or got its answer (`sys::monotonic_ms`; times are
    /// kept as milliseconds, not `Instant`s, to keep an idle connection small).
    last_active: u64,
    /// When the current wait began: with output queued, the peer's last progress in taking
    /// it; otherwise, when the partial request in `input` began.
    since: u64,
    /// When it was accepted (for the access log's duration).
    pub opened: Instant,
    pub peer: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub requests: u64,
}

impl Conn {
    pub fn new(
        socket: Socket,
        tcp: bool,
        seq: u32,
        (listener, app): (u32, usize),
        handle: ConnHandle,
        peer: String,
    ) -> Conn {
        Conn::build(socket, tcp, seq, (listener, app), Some(handle), peer)
    }

    /// A connection on a listener behind a proxy: its first bytes are a PROXY protocol header
    /// naming the client, read before anything else (see [`Conn::read_proxy_header`]).
    pub fn awaiting_header(
        socket: Socket,
        tcp: bool,
        seq: u32,
        ids: (u32, usize),
        peer: String,
        version: proxy_protocol::Version,
    ) -> Conn {
        let mut conn = Conn::build(socket, tcp, seq, ids, None, peer);
        conn.header = Some(version);
        conn
    }

    fn build(
        socket: Socket,
        tcp: bool,
        seq: u32,
        (listener, app): (u32, usize),
        handle: Option<ConnHandle>,
        peer: String,
    ) -> Conn {
        let now = Instant::now();
        let now_ms = sys::monotonic_ms();
        Conn {
            socket,
            tls: None,
            header: None,
            seq,
            listener,
            app: app as u32,
            handle,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            phase: Phase::Open,
            armed: interest::READ | interest::EDGE,
            read_empty: false,
            read_to_eagain: !tcp,
            full: false,
            stalled: false,
            eof: false,
            blocked: false,
            outbound: false,
            handoff_failed: false,
            told_drain: false,
            limit: None,
            next: Next::KeepOpen,
            wants: 0,
            timer_ms: 0,
            last_active: now_ms,
            since: now_ms,
            opened: now,
            peer,
            bytes_in: 0,
            bytes_out: 0,
            requests: 0,
        }
    }

    /// An outbound connection whose connect is under way (see `worker::outbound`), to fail
    /// after `timeout_ms`.
    pub fn connecting(mut self, timeout_ms: u64) -> Conn {
        self.phase = Phase::Connecting { deadline: sys::monotonic_ms().saturating_add(timeout_ms) };
        self.armed = interest::WRITE | interest::EDGE;
        self.outbound = true;
        self
    }

    /// Its app's place in the worker's apps.
    pub fn app(&self) -> usize {
        self.app as usize
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// True while the app has a timer set.
    pub fn has_timer(&self) -> bool {
        self.timer_ms > 0
    }

    /// How long the peer has been quiet at `now` (`sys::monotonic_ms`), in milliseconds.
    pub fn quiet_ms(&self, now: u64) -> u64 {
        now.saturating_sub(self.last_active)
    }

    /// Output waiting for the peer. TLS records waiting in the session count as one byte:
    /// their size is not known, only that they are there (at most the session's buffer).
    fn queued(&self) -> usize {
        self.output.len() - self.sent + usize::from(self.tls.as_ref().is_some_and(|t| t.has_backlog()))
    }

    /// Reads from the peer: through TLS on a TLS listener.
    fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(session) => session.read(&self.socket, buf),
            None => (&self.socket).read(buf),
        }
    }

    /// Writes to the peer: through TLS on a TLS listener.
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(session) => session.write(&self.socket, bytes),
            None => (&self.socket).write(bytes),
        }
    }

    /// True until the app's conversation can begin: its PROXY header is still to read, or its
    /// TLS handshake is under way. Such a connection has `read_timeout` to get there.
    fn handshaking(&self) -> bool {
        self.header.is_some() || self.tls.as_ref().is_some_and(|t| t.handshaking())
    }

    /// True while its PROXY protocol header is still to read (the app has not heard of it).
    pub fn awaiting_proxy_header(&self) -> bool {
        self.header.is_some()
    }

    /// Reads the PROXY protocol header: peeks at what arrived and takes exactly the header
    /// (what follows is the app's, or TLS's), so nothing is read ahead. Once it is whole, the
    /// client it names is the connection's peer, the app hears of the connection
    /// (`open_conn`, then `on_open`), and what followed the header is served.
    fn read_proxy_header(&mut self, event: &Event, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        let Some(version) = self.header else { return (After::Park(interest::READ), 0) };
        let mut buf = [0u8; proxy_protocol::MAX_HEADER];
        let seen = match sys::peek(self.fd(), &mut buf) {
            Ok(0) => return (After::Close(CloseReason::PeerClosed), 0),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.read_empty = true;
                return (After::Park(interest::READ), 0);
            }
            Err(e) => return (After::Close(CloseReason::Error(e.to_string())), 0),
        };
        let header = match proxy_protocol::parse(&buf[..seen], version) {
            Ok(proxy_protocol::Parsed::Done(header)) => header,
            // The rest of it comes as a new edge; `read_timeout` bounds the wait.
            Ok(proxy_protocol::Parsed::Incomplete) => {
                self.read_empty = true;
                return (After::Park(interest::READ), 0);
            }
            Err(e) => return (After::Close(CloseReason::ProxyHeader(e.to_string())), 0),
        };
        // The header's bytes are in the kernel's buffer: one read takes exactly them.
        match (&self.socket).read(&mut buf[..header.len]) {
            Ok(n) if n == header.len => self.bytes_in += n as u64,
            Ok(_) => return (After::Close(CloseReason::Error("PROXY header read short".into())), 0),
            Err(e) => return (After::Close(CloseReason::Error(e.to_string())), 0),
        }
        if let Some(client) = header.source {
            self.peer = client.to_string();
        }
        self.header = None;
        let token = super::table::token(self.fd() as usize, self.seq);
        let Some(handle) = ctx.app.open_conn(&self.peer, ctx.address, u64::from(self.seq), token, None) else {
            return (After::Close(CloseReason::AppFailed("the app refused the connection".into())), 0);
        };
        self.handle = Some(handle);
        if ctx.app.has_events() {
            if let After::Close(reason) = self.on_open(ctx, scratch) {
                return (After::Close(reason), 0);
            }
            // The drain's news went out while the header was awaited.
            if ctx.draining && self.phase == Phase::Open && self.next != Next::Close {
                self.told_drain = true;
                if let Err(reason) = self.invoke(Callback::Event(abi::EVENT_DRAIN), 0, self.flags(ctx), ctx, scratch) {
                    return (After::Close(reason), 0);
                }
            }
        }
        if self.phase != Phase::Open {
            return (self.flush_then(), 0);
        }
        self.on_ready(event, ctx, scratch)
    }

    /// True when the connection is between requests and the app allows closing it: no partial
    /// input, nothing left to send, and the app did not say [`Next::InProgress`].
    pub fn between_requests(&self) -> bool {
        self.phase == Phase::Open
            && self.input.is_empty()
            && self.queued() == 0
            && self.next == Next::KeepOpen
            && self.wants & abi::WANT_WRITABLE == 0
    }

    /// True when input waits in the kernel's buffer, not yet read (its event not handled yet).
    pub fn input_waiting(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(self.socket.peek(&mut byte), Ok(n) if n > 0)
    }

    /// Handles readiness.
    pub fn on_ready(&mut self, event: &Event, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        self.read_empty = false;
        // The edge that announced it is spent: read on past a stop a short read cannot see.
        self.read_to_eagain |= event.read_may_stop_early();
        match self.phase {
            Phase::Connecting { .. } => self.on_connected(event, ctx, scratch),
            Phase::Lingering { .. } => (self.discard_input(), 0),
            Phase::Flushing if self.holds_tls_plaintext() => (self.finish_handshake(scratch), 0),
            Phase::Flushing => (self.flush_then(), 0),
            Phase::Open if self.header.is_some() => self.read_proxy_header(event, ctx, scratch),
            Phase::Open if self.tls.is_some() => {
                let (after, requests) = self.serve_open(event, ctx, scratch);
                (self.handshake_interest(after), requests)
            }
            Phase::Open => self.serve_open(event, ctx, scratch),
        }
    }

    /// Handles readiness of a connection serving requests: flushes, then reads and lets the
    /// app answer while its output has room.
    fn serve_open(&mut self, event: &Event, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        let (readable, writable) = (event.readable(), event.writable());
        if writable
            && self.queued() > 0
            && let Err(e) = self.flush()
        {
            return (After::Close(CloseReason::Error(e.to_string())), 0);
        }
        // During a TLS handshake output cannot move until the peer's next message:
        // read it whatever is queued.
        if self.full && !self.tls.as_ref().is_some_and(|t| t.waits_for_peer()) {
            if self.queued() > ctx.limits.max_output / 2 {
                return (After::Park(interest::WRITE), 0);
            }
            // Drained to half: serve again; what arrived meanwhile is reported again
            // when the interest changes back (see `Pool::apply`).
            self.full = false;
        }
        let mut requests = 0;
        if readable && !self.eof && !self.blocked {
            match self.serve(ctx, scratch) {
                Ok(n) => requests = n,
                Err(after) => return (after, 0),
            }
        }
        let after = self.settle(ctx, scratch, &mut requests);
        (after, requests)
    }

    /// Reads what arrived and lets the app answer, a chunk at a time for as long as the app
    /// keeps up (so a client that pipelines megabytes is read only as fast as it is answered).
    /// `Err`: what to do instead of settling.
    fn serve(&mut self, ctx: &Ctx<'_>, scratch: &mut Scratch) -> Result<u64, After> {
        let mut requests = 0;
        loop {
            let (fresh, more) = self.read_chunk(scratch)?;
            self.last_active = sys::monotonic_ms();
            // Common case: the connection had no partial request, so the app reads straight
            // from the scratch buffer and nothing is copied (see `invoke`).
            if !self.input.is_empty() && fresh > 0 {
                self.input.extend_from_slice(&scratch.input[..fresh]);
            }
            // At the end of input the app is called once more, with the flag: the peer sends
            // no more, but if it only half-closed it still reads, so the rest of the input is
            // answered and sent first (see `settle`). Nothing new: the app saw it all already.
            if fresh > 0 || self.eof {
                requests += self.invoke(Callback::Input, fresh, self.flags(ctx), ctx, scratch).map_err(After::Close)?;
                // The peer's quiet time (app timers, the drain's grace) starts once it has its
                // answer, not while the app was still working on the request.
                self.last_active = sys::monotonic_ms();
            }
            // Read on only while the app keeps up: what it has no room to answer waits in the
            // kernel's buffer (and, at the end, the client's), not in ours.
            if !more || self.eof || self.stalled || self.blocked || self.queued() > ctx.limits.max_output {
                self.keep_tls_plaintext();
                return Ok(requests);
            }
        }
    }

    /// Keeps what the TLS session decrypted already but the app was not offered yet: no
    /// readiness event would announce it (the socket may be empty), so it waits in `input`,
    /// offered again like any input the app had no room for.
    fn keep_tls_plaintext(&mut self) {
        if let Some(session) = &mut self.tls
            && session.take_plaintext(&mut self.input) > 0
            && !self.blocked
        {
            self.stalled = true;
        }
    }

    /// One `read` into the scratch buffer: how many bytes came, and whether more may be
    /// waiting (a full buffer, or a short read that may have stopped early). Notes the end of
    /// input and whether the socket was read empty.
    fn read_chunk(&mut self, scratch: &mut Scratch) -> Result<(usize, bool), After> {
        loop {
            return match self.receive(&mut scratch.input) {
                Ok(0) => {
                    self.eof = true;
                    self.read_empty = true;
                    Ok((0, false))
                }
                Ok(n) => {
                    self.bytes_in += n as u64;
                    // A short read took every byte queued, unless something stopped it early
                    // (or, through TLS, the socket was not read empty).
                    let more = n == scratch.input.len()
                        || self.read_to_eagain
                        || self.tls.as_ref().is_some_and(|t| t.may_have_more());
                    self.read_empty = !more;
                    Ok((n, more))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_empty = true;
                    Ok((0, false))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(After::Close(CloseReason::Error(e.to_string()))),
            };
        }
    }

    /// The flags of a call into the app.
    fn flags(&self, ctx: &Ctx<'_>) -> u32 {
        (if ctx.draining { abi::FLAG_DRAINING } else { 0 }) | if self.eof { abi::FLAG_PEER_CLOSED } else { 0 }
    }

    /// One call into the app: `Input` offers the fresh bytes in the scratch buffer (`fresh`)
    /// when no input is kept, else the kept input. Writes what the app wrote; returns the
    /// requests it completed.
    fn invoke(
        &mut self,
        callback: Callback,
        fresh: usize,
        flags: u32,
        ctx: &Ctx<'_>,
        scratch: &mut Scratch,
    ) -> Result<u64, CloseReason> {
        let use_scratch = callback == Callback::Input && self.input.is_empty();
        let had_input = !self.input.is_empty();
        let room = ctx.limits.max_output.saturating_sub(self.queued());
        scratch.output.clear();
        let call = Call {
            input: if use_scratch { &scratch.input[..fresh] } else { &self.input },
            flags,
            room: room as u64,
            timer_ms: self.timer_ms,
            wants: self.wants,
        };
        let handle = self.handle.as_mut().expect("open connection has an app handle");
        let current = outbound::Current {
            token: super::table::token(self.socket.as_raw_fd() as usize, self.seq),
            app: self.app as usize,
            listener: self.listener,
        };
        let outcome = outbound::serving(current, || match callback {
            Callback::Input => ctx.app.on_data(handle, call, &mut scratch.output),
            Callback::Timer => ctx.app.on_timer(handle, call, &mut scratch.output),
            Callback::Event(kind) => ctx.app.on_event(handle, kind, call, &mut scratch.output),
        });
        // A push it made to another connection was refused as full (flow control).
        let refused = push::take_blocked();
        let (consumed, requests) = match outcome {
            DataOutcome::Failed(reason) => return Err(CloseReason::AppFailed(reason)),
            DataOutcome::Next { next, consumed, requests, timer_ms, wants } => {
                // An event's `KeepOpen` says nothing about the conversation: one in progress
                // stays so.
                if !(matches!(callback, Callback::Event(_)) && next == Next::KeepOpen) {
                    self.next = next;
                }
                self.timer_ms = timer_ms;
                self.wants = wants;
                (consumed, requests)
            }
        };
        self.requests += requests;
        if use_scratch {
            if consumed < fresh {
                self.input.extend_from_slice(&scratch.input[consumed..fresh]);
            }
        } else {
            self.input.drain(..consumed);
            if self.input.is_empty() {
                self.input = Vec::new();
            } else if self.input.capacity() > 2 * READ_CHUNK && self.input.len() < self.input.capacity() / 4 {
                // A peak (a long request, a pipelined burst) is given back as it is consumed.
                self.input.shrink_to(self.input.len().max(READ_CHUNK));
            }
        }
        // Input left once the app ran out of room, or once its producer finished, may hold
        // requests it has not answered yet: offer it again when there is room.
        let producer_done = callback == Callback::Event(abi::EVENT_WRITABLE) && self.wants & abi::WANT_WRITABLE == 0;
        // Input left behind a refused push waits for the other connection's room: that
        // connection wakes this one (`Pool::wake`).
        // Until woken (`unblock`), whatever else is called meanwhile (a timer, the drain).
        self.blocked = (refused || self.blocked) && !self.input.is_empty();
        self.stalled = !self.blocked && !self.input.is_empty() && (scratch.output.len() >= room || producer_done);
        // A request has begun, or the response it waited behind is done: `read_timeout` counts
        // from here.
        // (While output is queued, `since` is the send timeout's; the flush that empties the
        // queue starts the read timeout's count.)
        if (!had_input || producer_done) && !self.input.is_empty() && self.queued() == 0 {
            self.since = sys::monotonic_ms();
        }
        if producer_done {
            self.last_active = sys::monotonic_ms(); // the client's quiet time starts now
        }
        if consumed == 0 && !self.stalled && self.input.len() >= MAX_PENDING_INPUT {
            return Err(CloseReason::TooLarge);
        }
        let written = self.write_out(&scratch.output).map_err(|e| CloseReason::Error(e.to_string()));
        scratch.shrink();
        written.map(|()| requests)
    }

    /// After the app answered: start the close it asked for; answer the requests that waited
    /// for room and call the producer while the output has room; then wait for what comes
    /// next (reading only while the output is not full).
    fn settle(&mut self, ctx: &Ctx<'_>, scratch: &mut Scratch, requests: &mut u64) -> After {
        let max = ctx.limits.max_output;
        for _ in 0..=PRODUCE_ROUNDS {
            if self.next == Next::Close {
                self.phase = Phase::Flushing;
                return self.flush_then();
            }
            let producing = self.wants & abi::WANT_WRITABLE != 0 && ctx.app.has_events();
            if self.blocked {
                // Nothing read, nothing called until woken; only output still to send.
                return After::Park(if self.queued() > 0 { interest::WRITE } else { 0 });
            }
            if self.queued() > max || ((self.stalled || producing) && self.queued() > max / 2) {
                self.full = true;
                return After::Park(interest::WRITE);
            }
            let callback = match (self.stalled, producing) {
                (true, _) => Callback::Input,
                (false, true) => Callback::Event(abi::EVENT_WRITABLE),
                (false, false) if self.eof && self.queued() == 0 => return After::Close(CloseReason::PeerClosed),
                (false, false) if self.eof => {
                    self.phase = Phase::Flushing;
                    return After::Park(interest::WRITE);
                }
                (false, false) => {
                    return After::Park(if self.queued() == 0 {
                        interest::READ
                    } else {
                        interest::READ | interest::WRITE
                    });
                }
            };
            match self.invoke(callback, 0, self.flags(ctx), ctx, scratch) {
                Ok(n) => *requests += n,
                Err(reason) => return After::Close(reason),
            }
        }
        // Enough for one event: back to the event loop, which reports a socket with room at
        // once.
        After::Park(interest::WRITE)
    }

    /// The connection a push from this one was refused by has room now (`Pool::wake`): offer
    /// the input left behind again.
    pub fn unblock(&mut self) {
        if self.blocked {
            self.blocked = false;
            self.stalled = !self.input.is_empty();
        }
    }

    /// The end of an outbound connect (the socket reported writable, or an error): on success
    /// the connection serves requests and the app hears `on_open` (and `on_drain` when the
    /// worker drains already); on failure, `on_connect_failed`, then it is closed.
    fn on_connected(&mut self, event: &Event, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        let error = match self.socket.take_error() {
            Ok(error) => error,
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            return (self.connect_failed(&format!("cannot connect to {}: {e}", self.peer), ctx, scratch), 0);
        }
        if !event.writable() {
            return (After::Park(interest::WRITE), 0);
        }
        self.phase = Phase::Open;
        self.last_active = sys::monotonic_ms();
        self.since = self.last_active;
        if !ctx.app.has_events() {
            return (After::Park(interest::READ), 0);
        }
        let mut requests = match self.invoke(Callback::Event(abi::EVENT_OPEN), 0, self.flags(ctx), ctx, scratch) {
            Ok(n) => n,
            Err(reason) => return (After::Close(reason), 0),
        };
        if ctx.draining && self.next != Next::Close {
            // The drain's news went out before this connection could hear it.
            self.told_drain = true;
            match self.invoke(Callback::Event(abi::EVENT_DRAIN), 0, self.flags(ctx), ctx, scratch) {
                Ok(n) => requests += n,
                Err(reason) => return (After::Close(reason), 0),
            }
        }
        let after = self.settle(ctx, scratch, &mut requests);
        (after, requests)
    }

    /// Tells the app that its connect failed (`reason`), and closes the connection.
    fn connect_failed(&mut self, reason: &str, ctx: &Ctx<'_>, scratch: &mut Scratch) -> After {
        if ctx.app.has_events() {
            self.input = reason.as_bytes().to_vec();
            // Whatever it returns or writes: nothing can be sent.
            let _ = self.invoke(Callback::Event(abi::EVENT_CONNECT_FAILED), 0, self.flags(ctx), ctx, scratch);
            self.input = Vec::new();
        }
        After::Close(CloseReason::ConnectFailed(reason.to_string()))
    }

    /// True when pushed bytes may be moved into the output: at most half of `max_output`
    /// queued.
    pub fn has_push_room(&self, limits: &Limits) -> bool {
        self.queued() <= limits.max_output / 2
    }

    /// Adds pushed bytes to the output (written at once when the socket takes them), and
    /// starts a close after them when asked.
    pub fn accept_push(&mut self, bytes: &[u8], close: bool) {
        if !bytes.is_empty() {
            // Traffic: a connection that only receives (a stream, a subscriber) is not idle.
            self.last_active = sys::monotonic_ms();
        }
        if let Err(e) = self.write_out(bytes) {
            log::debug!("a push to {} failed: {e}", self.peer);
        }
        if close {
            self.next = Next::Close;
        }
    }

    /// Where a connection waits after a push was delivered outside its own events. Never a
    /// close: the pushing thread may be inside app code (another connection's callback, with
    /// the app's locks held), so the close is left to a handler — parked for writing, the
    /// connection gets an event at once.
    pub fn after_push(&mut self, limits: &Limits) -> u32 {
        let wanted = self.push_interest(limits);
        match &self.tls {
            Some(t) if t.waits_for_peer() => (wanted & !interest::WRITE) | interest::READ,
            _ => wanted,
        }
    }

    fn push_interest(&mut self, limits: &Limits) -> u32 {
        if self.phase != Phase::Open {
            return self.armed & !interest::EDGE;
        }
        if self.next == Next::Close {
            self.phase = Phase::Flushing;
            return interest::WRITE;
        }
        if self.full || self.queued() > limits.max_output {
            self.full = true;
            return interest::WRITE;
        }
        if self.blocked {
            return if self.queued() > 0 { interest::WRITE } else { 0 };
        }
        // A producer waits for writable events whatever the push left.
        if self.wants & abi::WANT_WRITABLE != 0 || self.queued() > 0 {
            return if self.eof { interest::WRITE } else { interest::READ | interest::WRITE };
        }
        if self.eof { interest::WRITE } else { interest::READ }
    }

    /// Calls the app for a timer, an event or a limit, then settles as after input.
    fn call_and_settle(&mut self, callback: Callback, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        let mut requests = match self.invoke(callback, 0, self.flags(ctx), ctx, scratch) {
            Ok(n) => n,
            Err(reason) => return (After::Close(reason), 0),
        };
        let after = self.settle(ctx, scratch, &mut requests);
        (after, requests)
    }

    /// True when the app's timer has run out: the connection is serving requests, its output
    /// is not full, and the peer has sent nothing for the timer's length.
    pub fn timer_due(&self, now: u64) -> bool {
        self.phase == Phase::Open && !self.full && self.timer_ms > 0 && self.quiet_ms(now) >= self.timer_ms
    }

    /// Calls the app's `on_timer` (see [`Conn::timer_due`]); the quiet period starts again.
    pub fn on_timer(&mut self, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        let result = self.call_and_settle(Callback::Timer, ctx, scratch);
        self.last_active = sys::monotonic_ms();
        result
    }

    /// Calls the app's `on_open` for a connection just accepted (it may write a greeting). The
    /// caller checks that the app has events (ABI 1.2).
    pub fn on_open(&mut self, ctx: &Ctx<'_>, scratch: &mut Scratch) -> After {
        let after = self.call_and_settle(Callback::Event(abi::EVENT_OPEN), ctx, scratch).0;
        self.handshake_interest(after)
    }

    /// What a connection waits for while its TLS handshake waits for the peer: reading, never
    /// writing (see `tls::Session::waits_for_peer`).
    fn handshake_interest(&self, after: After) -> After {
        match after {
            After::Park(wanted) if self.tls.as_ref().is_some_and(|t| t.waits_for_peer()) => {
                After::Park((wanted & !interest::WRITE) | interest::READ)
            }
            after => after,
        }
    }

    /// True when the app should hear that the worker drains: it was not told yet, and the
    /// connection is open with room in its output.
    pub fn drain_news_due(&self) -> bool {
        !self.told_drain && self.phase == Phase::Open && !self.full && self.handle.is_some()
    }

    /// Calls the app's `on_drain` (once per connection). The caller checks that the app has
    /// events (ABI 1.2).
    pub fn on_drain(&mut self, ctx: &Ctx<'_>, scratch: &mut Scratch) -> (After, u64) {
        self.told_drain = true;
        self.call_and_settle(Callback::Event(abi::EVENT_DRAIN), ctx, scratch)
    }

    /// The limit this connection has run into by `now`, if any (see [`Limit`]).
    pub fn limit_due(&self, now: u64, limits: &Limits) -> Option<Limit> {
        let past =
            |t: Option<Duration>, since: u64| t.is_some_and(|t| u128::from(now.saturating_sub(since)) >= t.as_millis());
        if let Phase::Connecting { deadline } = self.phase {
            return (now >= deadline).then_some(Limit::Connect);
        }
        // A TLS handshake or a PROXY header is a request begun: it has `read_timeout` to
        // finish. So has a handshake the app's close waits for (see `finish_handshake`), which
        // nothing else bounds: without `read_timeout` it ends at the first limit set, and
        // without any, after the time a close lingers.
        let handshake_limit = match self.phase {
            Phase::Open => limits.read_timeout.map(|t| (t, Limit::Read)),
            Phase::Flushing => [
                (limits.read_timeout, Limit::Read),
                (limits.idle_timeout, Limit::Idle),
                (limits.send_timeout, Limit::Send),
                (Some(LINGER_TIMEOUT), Limit::Idle),
            ]
            .into_iter()
            .find_map(|(timeout, limit)| Some((timeout?, limit))),
            _ => None,
        };
        if self.handshaking()
            && let Some((timeout, limit)) = handshake_limit
        {
            return (self.opened.elapsed() >= timeout).then_some(limit);
        }
        if matches!(self.phase, Phase::Lingering { .. }) || self.limit == Some(Limit::Send) {
            return None;
        }
        // Also while a close is under way (the app's last answer, a `408`): a peer that takes
        // none of it holds nothing for longer than `send_timeout`.
        if self.queued() > 0 {
            return past(limits.send_timeout, self.since).then_some(Limit::Send);
        }
        if self.phase != Phase::Open || self.limit.is_some() {
            return None;
        }
        // A request begun is the client's to finish, unless it waits for the app: answers it
        // had no room for, or a response still being produced (requests pipelined behind it).
        if !self.input.is_empty() {
            let producing = self.wants & abi::WANT_WRITABLE != 0;
            let waits = self.stalled || producing || self.blocked;
            return (!waits && past(limits.read_timeout, self.since)).then_some(Limit::Read);
        }
        let lifted = self.wants & abi::WANT_NO_IDLE_TIMEOUT != 0;
        (self.between_requests() && !lifted && past(limits.idle_timeout, self.last_active)).then_some(Limit::Idle)
    }

    /// True while what the worker wrote still waits in the kernel for the peer to read it (a
    /// long answer handed over whole, still being read). The peer is then not idle: its quiet
    /// time starts again from now. One system call; for connections already past
    /// `idle_timeout` only.
    pub fn still_reading(&mut self) -> bool {
        let reading = sys::unsent_bytes(self.fd()).is_ok_and(|n| n > 0);
        if reading {
            self.last_active = sys::monotonic_ms();
        }
        reading
    }

    /// Acts on a limit reached (see [`Conn::limit_due`]).
    pub fn enforce(&mut self, limit: Limit, ctx: &Ctx<'_>, scratch: &mut Scratch) -> After {
        if limit == Limit::Connect {
            let reason = format!("cannot connect to {}: timed out", self.peer);
            return self.connect_failed(&reason, ctx, scratch);
        }
        self.limit = Some(limit);
        if self.handshaking() {
            // No app conversation began: nothing to answer, nothing to flush.
            return After::Close(CloseReason::Limit(limit));
        }
        match limit {
            Limit::Send | Limit::Connect => After::Close(CloseReason::Limit(limit)),
            Limit::Idle => self.begin_close(),
            Limit::Read => {
                if ctx.app.has_events()
                    && let Err(reason) =
                        self.invoke(Callback::Event(abi::EVENT_READ_TIMEOUT), 0, self.flags(ctx), ctx, scratch)
                {
                    return After::Close(reason);
                }
                self.phase = Phase::Flushing;
                self.flush_then()
            }
        }
    }

    /// Writes `bytes` (after anything already queued); queues what the socket does not take.
    fn write_out(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.queued() > 0 {
            // Move the unsent rest to the front only once it is at most half the buffer, so
            // each byte is moved at most once on average.
            if self.sent >= self.output.len() / 2 {
                self.output.drain(..self.sent);
                self.sent = 0;
            }
            self.output.extend_from_slice(bytes);
            return self.flush();
        }
        let mut written = 0;
        while written < bytes.len() {
            match self.send(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.bytes_out += written as u64;
        if written < bytes.len() {
            self.output.clear();
            self.sent = 0;
            self.output.extend_from_slice(&bytes[written..]);
            self.since = sys::monotonic_ms(); // `send_timeout` counts from here
        } else if self.queued() > 0 {
            // All taken by the TLS session, some of its records not by the socket yet.
            self.since = sys::monotonic_ms();
        }
        Ok(())
    }

    /// Writes queued output until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        let before = self.sent;
        let tls_sent = match &mut self.tls {
            Some(session) => session.flush(&self.socket)?,
            None => 0,
        };
        while self.sent < self.output.len() {
            let (start, end) = (self.sent, self.output.len());
            let result = match &mut self.tls {
                Some(session) => session.write(&self.socket, &self.output[start..end]),
                None => (&self.socket).write(&self.output[start..end]),
            };
            match result {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.bytes_out += (self.sent - before) as u64;
        let progressed = self.sent > before || tls_sent > 0;
        if progressed {
            // The peer took some: `send_timeout` counts again (or, with everything sent,
            // `read_timeout` for a partial request that waited behind the output).
            self.since = sys::monotonic_ms();
        }
        if self.queued() == 0 {
            self.output = Vec::new();
            self.sent = 0;
            if progressed {
                // The peer has every answer: its quiet time (`idle_timeout`, timers) starts now.
                self.last_active = self.since;
            }
        }
        Ok(())
    }

    /// Flushes; when everything is out, moves on (serve again, or start the close).
    fn flush_then(&mut self) -> After {
        if let Err(e) = self.flush() {
            return After::Close(CloseReason::Error(e.to_string()));
        }
        if self.queued() > 0 || self.holds_tls_plaintext() {
            return self.handshake_interest(After::Park(interest::WRITE));
        }
        match self.phase {
            Phase::Flushing => self.begin_close(),
            _ => After::Park(interest::READ),
        }
    }

    /// True while what the app wrote waits in the TLS session for the handshake to end.
    fn holds_tls_plaintext(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.holds_plaintext())
    }

    /// A close the app asked for before the TLS handshake ended, after writing something (a
    /// greeting, a refusal): the handshake is finished first, so that what it wrote is sent,
    /// within the limit `limit_due` gives it. What the peer sends after it is not read.
    fn finish_handshake(&mut self, scratch: &mut Scratch) -> After {
        while let Some(session) = self.tls.as_mut().filter(|t| t.handshaking()) {
            match session.read(&self.socket, &mut scratch.input) {
                // The peer's last handshake message came with its FIN: what it was sent first
                // still goes out, as far as it reads it.
                Ok(0) if !session.handshaking() => {
                    self.eof = true;
                    break;
                }
                Ok(0) => return After::Close(CloseReason::PeerClosed),
                Ok(n) => self.bytes_in += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_empty = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return After::Close(CloseReason::Error(e.to_string())),
            }
        }
        self.flush_then()
    }

    /// Starts a gentle close: FIN to the peer, then wait for its FIN while discarding input.
    pub fn begin_close(&mut self) -> After {
        if let Some(session) = &mut self.tls
            && !session.handshaking()
        {
            session.close_notify(&self.socket);
        }
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

    /// True when the connection may be handed to another worker: between requests, not an
    /// outbound one, nothing read ahead and nothing unsent.
    /// A TLS connection never moves: its session state (keys, sequence numbers) cannot go
    /// with the socket.
    pub fn movable(&self) -> bool {
        self.between_requests()
            && !self.outbound
            && !self.eof
            && self.limit.is_none()
            && self.tls.is_none()
            && self.header.is_none()
    }

    /// The app's session of a connection that moves (`App::export_conn`).
    pub fn export_session(&mut self, app: &App) -> Result<Vec<u8>, String> {
        let handle = self.handle.as_mut().ok_or("the connection has no app state")?;
        app.export_conn(handle)
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

/// Makes a freshly accepted socket ready for the event loop.
pub fn prepare_socket(socket: &Socket, tcp: bool) -> io::Result<()> {
    sys::set_nonblocking(socket.as_raw_fd(), true)?;
    if tcp {
        socket.set_tcp_nodelay(true)?;
    }
    Ok(())
}
