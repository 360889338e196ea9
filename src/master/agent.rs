//! The agent check: a TCP port (`agent_check`) where the master tells a load balancer
//! (HAProxy's `agent-check`) whether this node should get new connections, and the node's
//! rotation, which an operator sets (`fdtserver rotation out|in`).
//!
//! Protocol: each connection gets one line, then the master closes it. `up ready` while the
//! node serves and is in rotation; `drain` while it is out of rotation or stopping (existing
//! connections go on, no new ones come); `down#no worker is serving` while no worker accepts
//! (the kernel would queue connections that nobody takes). HAProxy reads `ready` as "leave
//! DRAIN and MAINT", so an answer always carries both halves of the state it wants.
//!
//! Invariants: never blocks the master and is on no data path (it sees no client byte); the
//! answer is computed from the master's state when a check connects, so a load balancer that
//! missed a change hears the current state at its next check; the rotation changes only by
//! an operator's request and lives as long as the master (reloads keep it, a binary upgrade
//! hands it to the new master, a restart starts "in").

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use serde_json::{Value, json};

/// Token of the agent check's listening socket in the master's poll.
pub const LISTENER_TOKEN: Token = Token(3);
/// Token space of agent check connections (`CONN_TOKEN_BASE + id`), above the control
/// connections' (`control::CONN_TOKEN_BASE`).
pub const CONN_TOKEN_BASE: usize = 1 << 40;
/// The key of the agent check's socket in `FDTSERVER_LISTENERS` (binary upgrade).
pub const UPGRADE_KEY: &str = "agent_check";
/// Carries the rotation to the new master of a binary upgrade (`in` or `out`).
pub const ENV_ROTATION: &str = "FDTSERVER_ROTATION";
/// Connections kept open at once, waiting for the checker to close its side (HAProxy's
/// `agent-send` may still be arriving: closing with unread input would reset the connection
/// and could lose the answer). Past this, a connection is answered and closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long an answered connection waits for the checker to close its side: a checker reads
/// one line and closes, well within this.
const LINGER: Duration = Duration::from_secs(2);

/// Whether an operator wants this node to get new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    In,
    Out,
}

impl Rotation {
    pub fn name(self) -> &'static str {
        match self {
            Rotation::In => "in",
            Rotation::Out => "out",
        }
    }

    pub fn parse(text: &str) -> Option<Rotation> {
        match text {
            "in" => Some(Rotation::In),
            "out" => Some(Rotation::Out),
            _ => None,
        }
    }
}

/// What the agent answer depends on, read from the master when a check connects.
#[derive(Clone, Copy, Debug)]
pub struct NodeState {
    pub rotation: Rotation,
    /// The master is stopping (`TERM`, `QUIT`, `POST /stop`).
    pub stopping: bool,
    /// At least one worker accepts connections.
    pub serving: bool,
}

/// The line a check gets, newline included.
pub fn answer(state: NodeState) -> &'static str {
    if state.stopping || state.rotation == Rotation::Out {
        "drain\n"
    } else if !state.serving {
        "down#no worker is serving\n"
    } else {
        "up ready\n"
    }
}

/// The agent check's listening socket.
struct Bound {
    /// As configured.
    address: SocketAddr,
    socket: TcpListener,
    registered: bool,
}

/// An answered connection, waiting for the checker to close its side.
struct Conn {
    stream: TcpStream,
    until: Instant,
}

/// The agent check: its socket, its connections, the rotation, and what it answered.
pub struct Agent {
    rotation: Rotation,
    listener: Option<Bound>,
    /// A reload that moves the agent check: `Some(new socket or none)`, switched to once that
    /// generation serves, dropped if it fails.
    next: Option<Option<Bound>>,
    conns: HashMap<usize, Conn>,
    next_id: usize,
    /// Checks answered, and the last one: when and what.
    checks: u64,
    last: Option<(Instant, &'static str)>,
}

/// Binds the agent check's socket (non-blocking, for the master's poll).
pub fn bind(address: SocketAddr) -> Result<TcpListener, String> {
    // mio's bind sets SO_REUSEADDR: a restarted master rebinds at once, whatever TIME_WAIT
    // connections the last one left.
    TcpListener::bind(address).map_err(|e| bind_error(address, e))
}

/// Takes a socket handed over by an old master (binary upgrade) or by systemd.
pub fn adopt(socket: socket2::Socket, address: SocketAddr) -> Result<TcpListener, String> {
    socket.set_nonblocking(true).map_err(|e| bind_error(address, e))?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(socket)))
}

fn bind_error(address: SocketAddr, e: io::Error) -> String {
    format!("cannot listen on agent_check {address}: {e}")
}

impl Agent {
    /// An agent check listening on `socket` (configured as `address`), if any. Not watched
    /// until [`Agent::register`].
    pub fn new(rotation: Rotation, socket: Option<(SocketAddr, TcpListener)>) -> Agent {
        Agent {
            rotation,
            listener: socket.map(|(address, socket)| Bound { address, socket, registered: false }),
            next: None,
            conns: HashMap::new(),
            next_id: 0,
            checks: 0,
            last: None,
        }
    }

    pub fn rotation(&self) -> Rotation {
        self.rotation
    }

    /// Sets the rotation; true if it changed.
    pub fn set_rotation(&mut self, rotation: Rotation) -> bool {
        std::mem::replace(&mut self.rotation, rotation) != rotation
    }

    /// Where it listens (as configured), if it does.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|l| l.address)
    }

    /// Checks answered so far.
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// Starts accepting checks.
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        match self.listener.as_mut() {
            Some(l) if !l.registered => {
                registry.register(&mut l.socket, LISTENER_TOKEN, Interest::READABLE)?;
                l.registered = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A reload's config wants the agent check at `wanted`: binds it now if that is a new
    /// address (so that a busy port refuses the reload), to be switched to by
    /// [`Agent::commit`] once the new generation serves.
    pub fn prepare(&mut self, wanted: Option<SocketAddr>) -> Result<(), String> {
        self.next = None;
        if wanted == self.address() {
            return Ok(());
        }
        let next = match wanted {
            Some(address) => Some(Bound { address, socket: bind(address)?, registered: false }),
            None => None,
        };
        self.next = Some(next);
        Ok(())
    }

    /// The generation that [`Agent::prepare`] was for serves: switch to its agent check.
    pub fn commit(&mut self, registry: &Registry) {
        let Some(next) = self.next.take() else { return };
        if let Some(mut old) = self.listener.take() {
            let _ = registry.deregister(&mut old.socket);
            log::info!("agent check: no longer listening on {}", old.address);
        }
        self.listener = next;
        if let Some(l) = &self.listener {
            log::info!("agent check: listening on {}", l.address);
        }
        if let Err(e) = self.register(registry) {
            log::error!("agent check: cannot accept on {:?}: {e}", self.address());
        }
    }

    /// The generation that [`Agent::prepare`] was for failed: keep the agent check as it is.
    pub fn discard(&mut self) {
        self.next = None;
    }

    /// A binary upgrade's new master serves and answers the checks now (it has the same
    /// socket): stop accepting and close this master's copy. Checks already answered finish.
    pub fn hand_over(&mut self, registry: &Registry) {
        if let Some(mut l) = self.listener.take() {
            let _ = registry.deregister(&mut l.socket);
        }
        self.next = None;
    }

    /// The listening socket's fd, to hand to a new master.
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.listener.as_ref().map(|l| l.socket.as_raw_fd())
    }

    /// Accepts every waiting check and answers each as `state` says.
    pub fn accept(&mut self, registry: &Registry, state: NodeState) {
        let Some(listener) = self.listener.as_ref() else { return };
        let line = answer(state);
        loop {
            let (mut stream, peer) = match listener.socket.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds, say: the checker retries at its next interval.
                    log::warn!("agent check: accept failed: {e}");
                    return;
                }
            };
            // A fresh socket's send buffer takes one short line: one non-blocking write.
            let _ = stream.write(line.as_bytes());
            let _ = stream.shutdown(Shutdown::Write);
            self.checks += 1;
            let changed = self.last.is_none_or(|(_, before)| before != line);
            if changed {
                log::info!("agent check: answering {:?} (asked by {peer})", line.trim_end());
            } else {
                log::trace!("agent check from {peer}: {:?}", line.trim_end());
            }
            self.last = Some((Instant::now(), line));
            // What the checker may still send is read and dropped until it closes, so that the
            // close is not a reset (see `MAX_CONNECTIONS`).
            drain_input(&mut stream);
            if self.conns.len() >= MAX_CONNECTIONS {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if registry.register(&mut stream, Token(CONN_TOKEN_BASE + id), Interest::READABLE).is_ok() {
                self.conns.insert(id, Conn { stream, until: Instant::now() + LINGER });
            }
        }
    }

    /// Connection `id` is readable: drop its input; close it once the checker has closed.
    pub fn ready(&mut self, id: usize, registry: &Registry) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        if drain_input(&mut conn.stream) {
            self.close(id, registry);
        }
    }

    /// Closes the connections whose checker did not close within `LINGER`.
    pub fn expire(&mut self, registry: &Registry) {
        let now = Instant::now();
        let stale: Vec<usize> = self.conns.iter().filter(|(_, c)| c.until <= now).map(|(id, _)| *id).collect();
        for id in stale {
            self.close(id, registry);
        }
    }

    /// The earliest time a connection must be closed, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.until).min()
    }

    fn close(&mut self, id: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns.remove(&id) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    /// For the status JSON: `null` without an agent check.
    pub fn status_json(&self, state: NodeState) -> Value {
        let Some(l) = &self.listener else { return Value::Null };
        json!({
            "address": l.address.to_string(),
            "answer": answer(state).trim_end(),
            "checks": self.checks,
            "last_check_secs": self.last.map(|(at, _)| at.elapsed().as_secs_f64()),
            "last_answer": self.last.map(|(_, line)| line.trim_end()),
        })
    }
}

/// Reads and drops what is waiting; true once the peer has closed (or the connection broke).
fn drain_input(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn state(rotation: Rotation, stopping: bool, serving: bool) -> NodeState {
        NodeState { rotation, stopping, serving }
    }

    #[test]
    fn the_answer_is_drain_when_out_or_stopping_down_without_a_worker_and_up_ready_otherwise() {
        assert_eq!(answer(state(Rotation::In, false, true)), "up ready\n");
        assert_eq!(answer(state(Rotation::Out, false, true)), "drain\n");
        assert_eq!(answer(state(Rotation::In, true, true)), "drain\n");
        assert_eq!(answer(state(Rotation::Out, true, false)), "drain\n");
        assert_eq!(answer(state(Rotation::In, false, false)), "down#no worker is serving\n");
        assert_eq!(Rotation::parse("out"), Some(Rotation::Out));
        assert_eq!(Rotation::parse(Rotation::In.name()), Some(Rotation::In));
        assert_eq!(Rotation::parse("sideways"), None);
    }

    /// An agent check on 127.0.0.1 driven as the master drives it: one poll, non-blocking.
    struct Harness {
        poll: mio::Poll,
        agent: Agent,
        addr: SocketAddr,
    }

    impl Harness {
        fn new() -> Harness {
            let poll = mio::Poll::new().unwrap();
            let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = socket.local_addr().unwrap();
            let mut agent = Agent::new(Rotation::In, Some((addr, socket)));
            agent.register(poll.registry()).unwrap();
            Harness { poll, agent, addr }
        }

        /// Turns the loop until `done`, answering as `state` says.
        fn turn_until(&mut self, state: NodeState, mut done: impl FnMut(&Agent) -> bool) {
            let mut events = mio::Events::with_capacity(16);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(&self.agent) {
                assert!(Instant::now() < deadline, "the agent check did not get there in time");
                self.poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
                for e in events.iter() {
                    match e.token() {
                        LISTENER_TOKEN => self.agent.accept(self.poll.registry(), state),
                        Token(t) => self.agent.ready(t - CONN_TOKEN_BASE, self.poll.registry()),
                    }
                }
                self.agent.expire(self.poll.registry());
            }
        }
    }

    fn ask(addr: SocketAddr, send: &[u8]) -> std::thread::JoinHandle<String> {
        let send = send.to_vec();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&send).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        })
    }

    #[test]
    fn each_check_gets_one_line_and_an_end_of_file_even_when_it_sends_something_first() {
        let mut h = Harness::new();
        let plain = ask(h.addr, b"");
        h.turn_until(state(Rotation::In, false, true), |a| a.checks() == 1);
        assert_eq!(plain.join().unwrap(), "up ready\n");
        // HAProxy's `agent-send` string: read and dropped, so the close is no reset.
        let chatty = ask(h.addr, b"hello agent\n");
        h.turn_until(state(Rotation::Out, false, true), |a| a.checks() == 2);
        assert_eq!(chatty.join().unwrap(), "drain\n");
        // The checkers closed their side: nothing is left open in the master.
        h.turn_until(state(Rotation::In, false, true), |a| a.conns.is_empty());
        let v = h.agent.status_json(state(Rotation::In, true, true));
        assert_eq!(v["answer"], "drain");
        assert_eq!(v["last_answer"], "drain");
        assert_eq!(v["checks"], 2);
        assert_eq!(v["address"], h.addr.to_string());
    }

    #[test]
    fn a_checker_that_never_closes_is_let_go_after_the_linger_time_and_many_at_once_are_all_answered() {
        let mut h = Harness::new();
        let silent = std::net::TcpStream::connect(h.addr).unwrap();
        h.turn_until(state(Rotation::In, false, true), |a| a.checks() == 1);
        assert_eq!(h.agent.conns.len(), 1, "waits for the checker to close");
        for conn in h.agent.conns.values_mut() {
            conn.until = Instant::now();
        }
        h.turn_until(state(Rotation::In, false, true), |a| a.conns.is_empty());
        drop(silent);
        // More checkers than connections kept: every one is answered all the same.
        let held: Vec<std::net::TcpStream> =
            (0..MAX_CONNECTIONS + 5).map(|_| std::net::TcpStream::connect(h.addr).unwrap()).collect();
        h.turn_until(state(Rotation::In, false, true), |a| a.checks() == 1 + held.len() as u64);
        assert_eq!(h.agent.conns.len(), MAX_CONNECTIONS);
        for mut s in held {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert_eq!(answer, "up ready\n");
        }
    }

    #[test]
    fn a_reload_moves_the_agent_check_only_once_its_generation_serves_and_a_busy_port_refuses_it() {
        let mut h = Harness::new();
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = h.agent.prepare(Some(busy.local_addr().unwrap())).unwrap_err();
        assert!(err.starts_with(&format!("cannot listen on agent_check {}: ", busy.local_addr().unwrap())), "{err}");
        // The same address: nothing to do.
        h.agent.prepare(Some(h.addr)).unwrap();
        h.agent.commit(h.poll.registry());
        assert_eq!(h.agent.address(), Some(h.addr));
        // A new one: bound now, used once committed; a failed reload drops it.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        h.agent.prepare(Some(free)).unwrap();
        assert_eq!(h.agent.address(), Some(h.addr), "not before the generation serves");
        h.agent.discard();
        h.agent.commit(h.poll.registry());
        assert_eq!(h.agent.address(), Some(h.addr));
        h.agent.prepare(Some(free)).unwrap();
        h.agent.commit(h.poll.registry());
        assert_eq!(h.agent.address(), Some(free));
        let check = ask(free, b"");
        h.turn_until(state(Rotation::In, false, false), |a| a.checks() == 1);
        assert_eq!(check.join().unwrap(), "down#no worker is serving\n");
        assert!(std::net::TcpStream::connect(h.addr).is_err(), "the old address is closed");
        // Removed from the config: no agent check at all.
        h.agent.prepare(None).unwrap();
        h.agent.commit(h.poll.registry());
        assert_eq!(h.agent.address(), None);
        assert!(std::net::TcpStream::connect(free).is_err());
        assert_eq!(h.agent.status_json(state(Rotation::In, false, true)), Value::Null);
    }
}
