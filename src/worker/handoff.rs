//! Handing open connections to the next generation on a reload (or to a sibling, when this
//! worker is recycled or removed), instead of closing them.
//!
//! Shape: a worker that serves binds a `SOCK_SEQPACKET` socket `h<generation>-<pid>` in the bus
//! directory (`crate::bus`), and removes it when it starts draining or stops: the sockets there
//! are the workers that take connections. A draining worker takes a connection that is between
//! requests out of its epoll instance and its slot (its fd stays open, so the number is not
//! reused), asks the app for its session, and offers it to a taker, one connection at a time,
//! in two steps, so that one worker serves it at every instant:
//!
//! 1. `OFFER <id>` with the fd (`SCM_RIGHTS`), the listener, protocol, peer and session. The
//!    taker prepares it — the app's `import_session`, a place in its table — but does not
//!    watch it yet, and answers `READY <id>` (or `NO <id> <reason>`: the offerer puts it back).
//! 2. `GO <id>`: the offerer lets go of its copy (ended here as handed off, without a word to
//!    the peer), and the taker starts watching it: input that arrived on the way reports at
//!    once. An offerer that got no `READY` in time sends `ABORT <id>` and puts it back; a taker
//!    that gets `ABORT`, anything else, or nothing in time drops what it prepared. Stale answers
//!    are told apart by their id.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// How long an offerer waits for `READY` (it sends `GO` at once after), and a taker for the
/// next offer of a round: generous, for a busy machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a taker waits for `GO` before it drops what it prepared: long, since a connection
/// whose `GO` comes after this is lost (the offerer has let go of it).
const GO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest offer (its session with the header).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// What a worker that drains answers (it takes no connection).
pub const DRAINS: &str = "this worker drains";

/// This worker's socket name for `generation`.
fn name(generation: u64) -> String {
    format!("h{generation}-{}", std::process::id())
}

/// The workers that take connections now, of generation `min_generation` or later, newest
/// generation first (only those), this one left out.
pub fn targets(dir: &Path, min_generation: u64) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let (generation, pid) = file.strip_prefix('h')?.split_once('-')?;
            let (generation, pid): (u64, u32) = (generation.parse().ok()?, pid.parse().ok()?);
            (pid != me && generation >= min_generation).then(|| (generation, e.path()))
        })
        .collect();
    let Some(newest) = found.iter().map(|(g, _)| *g).max() else { return Vec::new() };
    found.retain(|(g, _)| *g == newest);
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Binds this worker's socket (it takes connections from now on); returns it and its path.
pub fn bind(dir: &Path, generation: u64) -> std::io::Result<(Socket, PathBuf)> {
    // Bound and listening under a name no offerer looks at, then renamed: an offerer never
    // finds it before it listens (and removes it as the socket of a worker gone).
    let path = dir.join(name(generation));
    let making = dir.join(format!("making-{}", name(generation)));
    let _ = std::fs::remove_file(&making);
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    socket.bind(&SockAddr::unix(&making)?)?;
    socket.listen(64)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Any worker may connect (a generation may run as another user); the directory
        // keeps others out.
        std::fs::set_permissions(&making, std::fs::Permissions::from_mode(0o666))?;
    }
    std::fs::rename(&making, &path)?;
    Ok((socket, path))
}

/// One connection on its way: its fd and what the taker needs besides.
pub struct Outgoing {
    pub fd: RawFd,
    pub listener: String,
    pub protocol: String,
    pub peer: String,
    pub session: Vec<u8>,
}

/// Why an offer did not go through.
#[derive(Debug)]
pub enum Refused {
    /// The taker cannot be reached or did not answer in time: try it no more this round; the
    /// connection may move later.
    Unreachable(String),
    /// The taker said no (another protocol, no such listener, its app refused the session):
    /// the connection stays here.
    No(String),
}

/// A connection to one taker, for a round of offers.
pub struct Offerer {
    socket: Socket,
    next_id: u64,
}

impl Offerer {
    /// Connects to the taker at `target`. A socket whose worker is gone (it died without
    /// removing it) is removed.
    pub fn connect(target: &Path) -> Result<Offerer, String> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(|e| e.to_string())?;
        if let Err(e) = socket.connect(&SockAddr::unix(target).map_err(|e| e.to_string())?) {
            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                let _ = std::fs::remove_file(target);
            }
            return Err(e.to_string());
        }
        socket.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(Offerer { socket, next_id: 1 })
    }

    /// Offers one connection and waits for the taker to be ready: `Ok(id)` then, to be
    /// finished with [`Offerer::go`] (the taker serves it) or [`Offerer::abort`] (it stays);
    /// else why not (it stays).
    pub fn offer(&mut self, out: &Outgoing) -> Result<u64, Refused> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = format!("OFFER {id}\n{}\n{}\n{}\n", out.listener, out.protocol, out.peer).into_bytes();
        message.extend_from_slice(&out.session);
        if message.len() > MAX_MESSAGE {
            return Err(Refused::No(format!("its session ({} bytes) is too large to hand over", out.session.len())));
        }
        let fd = self.socket.as_raw_fd();
        crate::sys::send_with_fds(fd, &message, &[out.fd]).map_err(|e| Refused::Unreachable(e.to_string()))?;
        let ready = format!("READY {id}");
        let no = format!("NO {id} ");
        loop {
            let mut answer = [0u8; 512];
            let n = match crate::sys::recv_with_fds(fd, &mut answer) {
                Ok((0, _)) => return Err(Refused::Unreachable("the taker went away".into())),
                Ok((n, _)) => n,
                Err(e) => {
                    // No answer in time: the taker must drop what it may have prepared.
                    self.abort(id);
                    return Err(Refused::Unreachable(format!("no answer: {e}")));
                }
            };
            let answer = String::from_utf8_lossy(&answer[..n]);
            if answer == ready {
                return Ok(id);
            }
            if let Some(reason) = answer.strip_prefix(&no) {
                return Err(Refused::No(reason.to_string()));
            }
            // An answer to an earlier offer that timed out: not this one's.
        }
    }

    /// The taker serves offer `id` from now on: the caller must not touch its fd again.
    /// `Err`: the taker will not get the word, and drops it (the caller keeps it).
    pub fn go(&mut self, id: u64) -> Result<(), String> {
        crate::sys::send_with_fds(self.socket.as_raw_fd(), format!("GO {id}").as_bytes(), &[])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The taker drops offer `id` (the caller keeps it).
    pub fn abort(&mut self, id: u64) {
        let _ = crate::sys::send_with_fds(self.socket.as_raw_fd(), format!("ABORT {id}").as_bytes(), &[]);
    }
}

/// A connection offered, as received.
pub struct Arrival {
    pub socket: Socket,
    pub listener: String,
    pub protocol: String,
    pub peer: String,
    pub session: Vec<u8>,
}

/// What a worker that takes connections does with them (`Pool`'s side).
pub trait Taker {
    /// Prepares an arrival (its app's session imported, its place taken, not watched yet);
    /// returns what names it for [`Taker::commit`] or [`Taker::drop_prepared`], or why not.
    fn prepare(&self, arrival: Arrival) -> Result<u64, String>;
    /// Starts serving a prepared connection.
    fn commit(&self, prepared: u64);
    /// Drops a prepared connection (the offerer keeps it).
    fn drop_prepared(&self, prepared: u64);
}

/// Serves this worker's handoff socket: offers go to `taker`, each offerer's on a thread of
/// its own (several old workers hand off at once). Never returns.
pub fn serve(listener: Socket, taker: &'static (impl Taker + Sync)) {
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of fds, say: offers wait in the backlog (or time out there) meanwhile.
                log::warn!("taking handed-off connections failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = conn.set_read_timeout(Some(STEP_TIMEOUT));
        let started = std::thread::Builder::new().name("handoff-in".into()).spawn(move || {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while serve_offer(&conn, &mut buf, taker) {}
        });
        if let Err(e) = started {
            log::warn!("cannot take handed-off connections now: {e}");
        }
    }
}

/// Takes one offer on `conn` through both steps; false at the end of the offerer's round.
fn serve_offer(conn: &Socket, buf: &mut [u8], taker: &impl Taker) -> bool {
    let fd = conn.as_raw_fd();
    let (n, mut fds) = match crate::sys::recv_with_fds(fd, buf) {
        Ok((0, _)) | Err(_) => return false,
        Ok(received) => received,
    };
    let Some((id, listener, protocol, peer, session)) = parse(&buf[..n]) else { return false };
    let prepared = match fds.len() {
        1 => taker.prepare(Arrival {
            socket: Socket::from(fds.remove(0)),
            listener,
            protocol,
            peer,
            session: session.to_vec(),
        }),
        _ => Err("an offer without exactly one connection".to_string()),
    };
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(reason) => return crate::sys::send_with_fds(fd, format!("NO {id} {reason}").as_bytes(), &[]).is_ok(),
    };
    if crate::sys::send_with_fds(fd, format!("READY {id}").as_bytes(), &[]).is_err() {
        taker.drop_prepared(prepared);
        return false;
    }
    let go = format!("GO {id}");
    let _ = conn.set_read_timeout(Some(GO_TIMEOUT));
    let word = crate::sys::recv_with_fds(fd, buf);
    let _ = conn.set_read_timeout(Some(STEP_TIMEOUT));
    match word {
        Ok((n, _)) if buf[..n] == *go.as_bytes() => {
            taker.commit(prepared);
            true
        }
        // `ABORT`, the end, or nothing in time: the offerer keeps it.
        _ => {
            taker.drop_prepared(prepared);
            false
        }
    }
}

/// An offer: (id, listener, protocol, peer, session).
fn parse(message: &[u8]) -> Option<(u64, String, String, String, &[u8])> {
    let mut parts = message.splitn(5, |b| *b == b'\n');
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let id = text(parts.next()?)?.strip_prefix("OFFER ")?.parse().ok()?;
    let (listener, protocol, peer) = (text(parts.next()?)?, text(parts.next()?)?, text(parts.next()?)?);
    Some((id, listener, protocol, peer, parts.next().unwrap_or(&[])))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A taker that records what happens to its offers, refusing those from `refuse`.
    #[derive(Default)]
    struct Recorder {
        log: std::sync::Mutex<Vec<String>>,
    }

    impl Taker for Recorder {
        fn prepare(&self, arrival: Arrival) -> Result<u64, String> {
            self.log.lock().unwrap().push(format!(
                "prepare {} {}",
                arrival.peer,
                String::from_utf8_lossy(&arrival.session)
            ));
            if arrival.peer == "refuse" { Err("not here".into()) } else { Ok(arrival.session.len() as u64) }
        }
        fn commit(&self, prepared: u64) {
            self.log.lock().unwrap().push(format!("commit {prepared}"));
        }
        fn drop_prepared(&self, prepared: u64) {
            self.log.lock().unwrap().push(format!("drop {prepared}"));
        }
    }

    #[test]
    fn offers_go_abort_or_are_refused_and_the_taker_hears_which() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = bind(dir.path(), 4).unwrap();
        let taker: &'static Recorder = Box::leak(Box::default());
        std::thread::spawn(move || serve(listener, taker));
        assert!(targets(dir.path(), 4).is_empty(), "its own socket is left out");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = |peer: &str, session: &[u8]| Outgoing {
            fd: a.as_raw_fd(),
            listener: "127.0.0.1:0".into(),
            protocol: "p".into(),
            peer: peer.into(),
            session: session.to_vec(),
        };
        let mut offerer = Offerer::connect(&path).unwrap();
        let id = offerer.offer(&out("one", b"abc")).unwrap();
        offerer.go(id).unwrap();
        let id = offerer.offer(&out("two", b"xy")).unwrap();
        offerer.abort(id);
        // An abort ends the taker's round with this offerer: the next round connects anew.
        let mut offerer = Offerer::connect(&path).unwrap();
        match offerer.offer(&out("refuse", b"")) {
            Err(Refused::No(reason)) => assert_eq!(reason, "not here"),
            other => panic!("{other:?}"),
        }
        match offerer.offer(&out("big", &vec![0; MAX_MESSAGE])) {
            Err(Refused::No(reason)) => assert!(reason.contains("too large"), "{reason}"),
            other => panic!("{other:?}"),
        }
        drop(offerer);
        wait(|| taker.log.lock().unwrap().len() >= 5);
        assert_eq!(
            *taker.log.lock().unwrap(),
            ["prepare one abc", "commit 3", "prepare two xy", "drop 2", "prepare refuse "],
            "an aborted offer is dropped; the session of the first is committed"
        );
        // A socket whose worker is gone is removed by the first offerer that finds it.
        let gone = dir.path().join("h9-1");
        drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
        assert!(Offerer::connect(&gone).is_err());
        assert!(!gone.exists());
    }

    fn wait(done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_offer_round_trips_and_targets_are_the_newest_generation_but_this_worker() {
        assert_eq!(
            parse(b"OFFER 3\n127.0.0.1:0\nhttp/1.1\n10.0.0.1:5\nnick=ann"),
            Some((3, "127.0.0.1:0".into(), "http/1.1".into(), "10.0.0.1:5".into(), &b"nick=ann"[..]))
        );
        assert_eq!(parse(b"OFFER x\na\nb\nc\n"), None);
        assert_eq!(parse(b"a\nb"), None);
        let dir = tempfile::tempdir().unwrap();
        for name in ["h1-10", "h2-11", "h2-12", "w13", &format!("h3-{}", std::process::id())] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names = |found: Vec<PathBuf>| -> Vec<String> {
            found.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
        };
        assert_eq!(names(targets(dir.path(), 1)), ["h2-11", "h2-12"], "generation 3 is this worker only");
        assert!(targets(dir.path(), 3).is_empty(), "none of a later generation");
    }
}
