//! Handing open connections to the next generation on a reload (or to a sibling, when this
//! worker is recycled or removed), instead of closing them.
//!
//! Shape: a worker that serves binds a `SOCK_SEQPACKET` socket `h<generation>-<pid>` in the bus
//! directory (`crate::bus`), and removes it when it starts draining: the sockets there are the
//! workers that take connections. A draining worker takes a connection that is between requests
//! out of its epoll instance (still holding its slot lock, so nothing else touches it), asks
//! the app for its session (`App::export_conn`), and sends the fd (`SCM_RIGHTS`) with its
//! listener, protocol, peer and session to a worker of the newest generation there, round
//! robin. That worker adopts it (`Pool::adopt`: the app's `import_session`, then its epoll
//! instance, where input that arrived meanwhile reports at once) and answers `OK`; only then
//! does the old worker let go of its copy, without a word to the peer. Any other answer, or
//! none within `REPLY_TIMEOUT`, and the old worker puts the connection back and serves it as
//! before: one owner at every instant, and a failed handoff never closes a connection.
//!
//! The message: `listener\nprotocol\npeer\n` then the session's bytes.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// What a worker that drains answers (it takes no connection).
pub const DRAINS: &str = "this worker drains";

/// How long a draining worker waits for the answer of the worker it hands a connection to.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest session an app may hand over (with the message's header).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// This worker's socket name for `generation`.
fn name(generation: u64) -> String {
    format!("h{generation}-{}", std::process::id())
}

/// The workers that take connections now, newest generation first, this one left out.
pub fn targets(dir: &Path) -> Vec<PathBuf> {
    let me = std::process::id();
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let (generation, pid) = file.strip_prefix('h')?.split_once('-')?;
            let (generation, pid): (u64, u32) = (generation.parse().ok()?, pid.parse().ok()?);
            (pid != me).then(|| (generation, e.path()))
        })
        .collect();
    let Some(newest) = found.iter().map(|(g, _)| *g).max() else { return Vec::new() };
    found.retain(|(g, _)| *g == newest);
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Binds this worker's socket (it takes connections from now on); returns it and its path.
pub fn bind(dir: &Path, generation: u64) -> std::io::Result<(Socket, PathBuf)> {
    let path = dir.join(name(generation));
    let _ = std::fs::remove_file(&path);
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    socket.bind(&SockAddr::unix(&path)?)?;
    {
        use std::os::unix::fs::PermissionsExt;
        // Any worker may connect (a generation may run as another user); the directory
        // keeps others out.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    }
    socket.listen(64)?;
    Ok((socket, path))
}

/// One connection on its way: its fd and what the new worker needs besides.
pub struct Outgoing {
    pub fd: RawFd,
    pub listener: String,
    pub protocol: String,
    pub peer: String,
    pub session: Vec<u8>,
}

/// How many connections go out before their answers are read.
const WINDOW: usize = 16;

/// Hands the connections of `batch` to the worker at `target`, over one connection, a window at
/// a time; for each, `Ok` once that worker has adopted it (the caller then lets go of its
/// copy), `Err` with why not (the caller keeps serving it).
pub fn send(target: &Path, batch: &[Outgoing]) -> Vec<Result<(), String>> {
    let socket = match connect(target) {
        Ok(s) => s,
        Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for window in batch.chunks(WINDOW) {
        // What went out is answered in order; what could not go out fails here.
        let sent: Vec<Result<(), String>> = window.iter().map(|out| send_one(&socket, out)).collect();
        for outcome in sent {
            results.push(outcome.and_then(|()| answer(&socket)));
        }
    }
    results
}

fn connect(target: &Path) -> Result<Socket, String> {
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(|e| e.to_string())?;
    socket.connect(&SockAddr::unix(target).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(socket)
}

fn send_one(socket: &Socket, out: &Outgoing) -> Result<(), String> {
    let mut message = format!("{}\n{}\n{}\n", out.listener, out.protocol, out.peer).into_bytes();
    message.extend_from_slice(&out.session);
    if message.len() > MAX_MESSAGE {
        return Err(format!("its session ({} bytes) is too large to hand over", out.session.len()));
    }
    crate::sys::send_with_fds(socket.as_raw_fd(), &message, &[out.fd]).map(|_| ()).map_err(|e| e.to_string())
}

fn answer(socket: &Socket) -> Result<(), String> {
    let mut answer = [0u8; 256];
    let n = crate::sys::recv_with_fds(socket.as_raw_fd(), &mut answer).map_err(|e| format!("no answer: {e}"))?.0;
    match &answer[..n] {
        b"OK" => Ok(()),
        [] => Err("no answer: the worker went away".into()),
        other => Err(String::from_utf8_lossy(other).into_owned()),
    }
}

/// A connection handed over, as received.
pub struct Arrival {
    pub socket: Socket,
    pub listener: String,
    pub protocol: String,
    pub peer: String,
    pub session: Vec<u8>,
}

/// Serves this worker's handoff socket: each arrival goes to `adopt`, whose answer (`Ok`, or
/// the reason) goes back to the sender. Returns when the socket fails.
pub fn serve(listener: Socket, adopt: impl Fn(Arrival) -> Result<(), String>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((conn, _)) = listener.accept() else { return };
        let _ = conn.set_read_timeout(Some(REPLY_TIMEOUT));
        while serve_one(&conn, &mut buf, &adopt) {}
    }
}

/// Takes one arrival on `conn` and answers it; false at the end of the sender's batch.
fn serve_one(conn: &Socket, buf: &mut [u8], adopt: &impl Fn(Arrival) -> Result<(), String>) -> bool {
    {
        let answer = match crate::sys::recv_with_fds(conn.as_raw_fd(), buf) {
            Ok((0, _)) | Err(_) => return false,
            Ok((n, mut fds)) if fds.len() == 1 => match parse(&buf[..n]) {
                Some((listener, protocol, peer, session)) => adopt(Arrival {
                    socket: Socket::from(fds.remove(0)),
                    listener,
                    protocol,
                    peer,
                    session: session.to_vec(),
                }),
                None => Err("a malformed handoff".to_string()),
            },
            Ok(_) => Err("a handoff without exactly one connection".to_string()),
        };
        let reply = match &answer {
            Ok(()) => "OK".to_string(),
            Err(reason) => format!("refused: {reason}"),
        };
        crate::sys::send_with_fds(conn.as_raw_fd(), reply.as_bytes(), &[]).is_ok()
    }
}

fn parse(message: &[u8]) -> Option<(String, String, String, &[u8])> {
    let mut parts = message.splitn(4, |b| *b == b'\n');
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
    let (listener, protocol, peer) = (text(parts.next()?)?, text(parts.next()?)?, text(parts.next()?)?);
    Some((listener, protocol, peer, parts.next().unwrap_or(&[])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_targets_are_the_newest_generation_but_this_worker() {
        assert_eq!(
            parse(b"127.0.0.1:0\nhttp/1.1\n10.0.0.1:5\nnick=ann"),
            Some(("127.0.0.1:0".into(), "http/1.1".into(), "10.0.0.1:5".into(), &b"nick=ann"[..]))
        );
        assert_eq!(parse(b"a\nb"), None);
        let dir = tempfile::tempdir().unwrap();
        for name in ["h1-10", "h2-11", "h2-12", "w13", &format!("h3-{}", std::process::id())] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let found: Vec<String> =
            targets(dir.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(found, ["h2-11", "h2-12"], "generation 3 is this worker only");
    }
}
