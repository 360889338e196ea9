//! The control API: HTTP/1.1 over a Unix socket, served from the master's event loop
//! ([`ControlServer`]), and the client the CLI uses to talk to it ([`request`]).
//!
//! Invariant: the server side never blocks the master: every socket is non-blocking, each
//! request is answered with `Connection: close`, and a `POST /reload` is parked until the
//! master resolves it. A request runs only once it arrived whole: its body (which the API
//! ignores) must be framed by one valid `Content-Length` of at most [`MAX_BODY`] bytes and
//! arrive in full; otherwise it is answered `400` or `413` and never executed. What one
//! connection may make the master buffer is bounded, and so is what refused clients cost the
//! log.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// Requests larger than this are refused (431): the API has no large requests.
const MAX_REQUEST: usize = 16 * 1024;
/// A request body larger than this is refused (413) as soon as its `Content-Length` is read:
/// the API takes no body (a small one, such as `curl -d ''` sends, is read and ignored).
pub const MAX_BODY: u64 = 4 * 1024;
/// The warning about refused clients (connection limit reached) is logged at most this often;
/// the next one says how many were refused in between.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// The whole answer to a client refused for the connection limit.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 53\r\nConnection: close\r\n\r\ntoo many control connections open; try again shortly\n";
/// Token space of control connections in the master's poll (`CONN_TOKEN_BASE + id`).
pub const CONN_TOKEN_BASE: usize = 1 << 32;

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Metrics,
    Reload,
    Stop,
    Page,
    /// `POST /rotation/in`, `POST /rotation/out`.
    Rotation(crate::master::agent::Rotation),
    /// Answered right away with this status and message.
    Bad(u16, String),
}

/// An answer to a control request.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
        body.push('\n');
        Response { status, content_type: "application/json", body }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut body = body.into();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response { status, content_type: "text/plain; charset=utf-8", body }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A request was taken from it; reading is over.
    answered: bool,
    opened: std::time::Instant,
}

/// Control connections beyond this many are closed at once: the control socket is for a few
/// operators and scripts, and each connection costs the master an fd.
const MAX_CONNECTIONS: usize = 64;
/// A control connection that has not sent a whole request within this long is closed (a
/// `POST /reload` waiting for its answer is not idle).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The listening control socket and its connections.
pub struct ControlServer {
    /// `None` once handed over to a new master (binary upgrade).
    listener: Option<UnixListener>,
    path: PathBuf,
    /// Whether this master removes the socket file at exit: not while a binary upgrade's new
    /// master only shares the old master's socket, nor after the old one handed it over.
    owns_path: bool,
    conns: HashMap<usize, Connection>,
    next_id: usize,
    /// Clients refused for the connection limit since the last warning about it.
    refused_unlogged: u64,
    /// When that warning was last logged.
    last_refusal_log: Option<std::time::Instant>,
}

impl ControlServer {
    /// Binds the control socket (mode 0600), refusing to replace one a live server answers on.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another fdtserver is running with this control socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlServer {
            listener: Some(listener),
            path: path.to_path_buf(),
            owns_path: true,
            conns: HashMap::new(),
            next_id: 0,
            refused_unlogged: 0,
            last_refusal_log: None,
        })
    }

    /// Uses the control socket a binary upgrade's old master handed over, if it is the one at
    /// `path`. The path stays the old master's until [`ControlServer::take_ownership`].
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> io::Result<ControlServer> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        let local = listener.local_addr()?;
        if local.as_pathname() != Some(path) {
            return Err(io::Error::other(format!(
                "the handed-over control socket is {:?}, not {}",
                local.as_pathname(),
                path.display()
            )));
        }
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener: Some(UnixListener::from_std(listener)),
            path: path.to_path_buf(),
            owns_path: false,
            conns: HashMap::new(),
            next_id: 0,
            refused_unlogged: 0,
            last_refusal_log: None,
        })
    }

    /// This master now answers at the path and removes the file at exit.
    pub fn take_ownership(&mut self) {
        self.owns_path = true;
    }

    /// The listening socket's fd, to hand to a new master.
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.listener.as_ref().map(|l| l.as_raw_fd())
    }

    /// Stops accepting control connections and closes this process's copy of the socket,
    /// leaving the file to the new master (which holds the same socket). Connections already
    /// accepted are still answered.
    pub fn hand_over(&mut self, registry: &Registry) {
        if let Some(mut listener) = self.listener.take() {
            let _ = registry.deregister(&mut listener);
        }
        self.owns_path = false;
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self.listener.as_mut() {
            Some(l) => registry.register(l, token, Interest::READABLE),
            None => Ok(()),
        }
    }

    /// Accepts every waiting connection.
    pub fn accept(&mut self, registry: &Registry) {
        let Some(listener) = self.listener.as_ref() else { return };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        // One non-blocking write of a short answer (a fresh socket's buffer
                        // takes it), then dropping `stream` closes it.
                        let _ = stream.write(REFUSED);
                        note_refusal(&mut self.refused_unlogged, &mut self.last_refusal_log);
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    if registry.register(&mut stream, Token(CONN_TOKEN_BASE + id), Interest::READABLE).is_ok() {
                        let opened = std::time::Instant::now();
                        let conn =
                            Connection { stream, input: Vec::new(), output: Vec::new(), answered: false, opened };
                        self.conns.insert(id, conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Closes connections that did not send a whole request within `REQUEST_TIMEOUT` (one
    /// whose head arrived but whose body did not is answered `400` first), and logs refusals
    /// not logged yet.
    pub fn expire(&mut self, registry: &Registry) {
        if self.refused_unlogged > 0 && self.last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
            log::warn!(
                "control socket: {} more refused since the last warning (at most {MAX_CONNECTIONS} connections)",
                self.refused_unlogged
            );
            self.refused_unlogged = 0;
            self.last_refusal_log = Some(std::time::Instant::now());
        }
        let stale: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.answered && c.opened.elapsed() >= REQUEST_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let incomplete = self.conns.get(&id).and_then(|c| incomplete_body(&c.input));
            match incomplete {
                Some(msg) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.answered = true;
                    }
                    let secs = REQUEST_TIMEOUT.as_secs();
                    self.respond(id, Response::text(400, format!("{msg} within {secs} s")), registry);
                }
                None => self.close(id, registry),
            }
        }
    }

    /// Handles readiness of connection `id`; returns its request once complete.
    pub fn ready(&mut self, id: usize, registry: &Registry) -> Option<Request> {
        let conn = self.conns.get_mut(&id)?;
        if !conn.output.is_empty() {
            self.flush(id, registry);
            return None;
        }
        if conn.answered {
            return None;
        }
        let mut buf = [0u8; 4096];
        let mut closed = false;
        // Bounded: past this much a request is decided (431 or 413) or complete.
        let cap = MAX_REQUEST + MAX_BODY as usize + buf.len();
        while conn.input.len() <= cap {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => conn.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let request = parse(&conn.input, closed);
        match request {
            Some(r) => {
                conn.answered = true;
                Some(r)
            }
            None if closed => {
                self.close(id, registry);
                None
            }
            None => None,
        }
    }

    /// Sends the answer to connection `id` and closes it once written.
    pub fn respond(&mut self, id: usize, response: Response, registry: &Registry) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            response.status,
            reason_phrase(response.status),
            response.content_type,
            response.body.len()
        );
        conn.output.extend_from_slice(head.as_bytes());
        conn.output.extend_from_slice(response.body.as_bytes());
        self.flush(id, registry);
    }

    fn flush(&mut self, id: usize, registry: &Registry) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        loop {
            match conn.stream.write(&conn.output) {
                Ok(0) => break,
                Ok(n) => {
                    conn.output.drain(..n);
                    if conn.output.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = registry.reregister(&mut conn.stream, Token(CONN_TOKEN_BASE + id), Interest::WRITABLE);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.close(id, registry);
    }

    fn close(&mut self, id: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns.remove(&id) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }

    /// Removes the socket file (at exit), if this master owns it.
    pub fn remove_file(&self) {
        if self.owns_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Counts a client refused for the connection limit; warns at most once per
/// [`REFUSAL_LOG_INTERVAL`] (a flood of clients must not flood the log).
fn note_refusal(refused_unlogged: &mut u64, last_refusal_log: &mut Option<std::time::Instant>) {
    *refused_unlogged += 1;
    if last_refusal_log.is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL) {
        return;
    }
    let others = *refused_unlogged - 1;
    log::warn!(
        "control socket: {MAX_CONNECTIONS} connections open already; refusing one more with 503{}",
        if others > 0 { format!(" ({others} more refused since the last warning)") } else { String::new() }
    );
    *refused_unlogged = 0;
    *last_refusal_log = Some(std::time::Instant::now());
}

/// How a request's body is framed, from its head.
enum Body {
    /// This many bytes follow the head (0: no body).
    Length(u64),
    /// Answer this instead of running the request.
    Refused(u16, String),
}

/// The body framing of a request whose head is complete (RFC 9112 §6: a `Content-Length` is
/// one or more digits; several different values, or one that is not a number, make the
/// request invalid; the API supports no `Transfer-Encoding`).
fn body_framing(headers: &[httparse::Header]) -> Body {
    let mut length: Option<u64> = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Body::Refused(
                400,
                "Transfer-Encoding is not supported: send the body with a Content-Length".into(),
            );
        }
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let value = std::str::from_utf8(h.value).unwrap_or("").trim_matches([' ', '\t']);
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Body::Refused(
                400,
                format!("invalid Content-Length {:?}: it must be digits only", String::from_utf8_lossy(h.value)),
            );
        }
        // More digits than a u64 holds is a body too large all the same.
        let n = value.parse::<u64>().unwrap_or(u64::MAX);
        if length.is_some_and(|l| l != n) {
            return Body::Refused(400, "conflicting Content-Length headers".into());
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY => Body::Refused(
            413,
            format!(
                "request body of {n} bytes refused: the control API takes no body (at most {MAX_BODY} bytes, ignored)"
            ),
        ),
        n => Body::Length(n.unwrap_or(0)),
    }
}

/// Why a request whose head arrived is not complete yet (its body is missing), if it is so.
fn incomplete_body(input: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = req.parse(input) else { return None };
    match body_framing(req.headers) {
        Body::Length(n) if ((input.len() - head) as u64) < n => {
            Some(format!("incomplete request: a body of {n} bytes was declared, {} arrived", input.len() - head))
        }
        _ => None,
    }
}

/// Parses one request; `None` while incomplete (`closed`: the client will send nothing more,
/// so a missing body is an error now).
fn parse(input: &[u8], closed: bool) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Complete(head)) if head > MAX_REQUEST => {
            return Some(Request::Bad(431, "request too large".into()));
        }
        Ok(httparse::Status::Complete(head)) => match body_framing(req.headers) {
            Body::Refused(status, msg) => return Some(Request::Bad(status, msg)),
            Body::Length(n) if ((input.len() - head) as u64) < n => {
                if closed {
                    let got = input.len() - head;
                    return Some(Request::Bad(
                        400,
                        format!("incomplete request: a body of {n} bytes was declared, {got} arrived"),
                    ));
                }
                return None;
            }
            // The body is ignored: no endpoint takes one.
            Body::Length(_) => {}
        },
        Ok(httparse::Status::Partial) if input.len() > MAX_REQUEST => {
            return Some(Request::Bad(431, "request too large".into()));
        }
        Ok(httparse::Status::Partial) => return None,
        Err(e) => return Some(Request::Bad(400, format!("bad request: {e}"))),
    }
    let path = req.path.unwrap_or("/").split('?').next().unwrap_or("/");
    Some(match (req.method.unwrap_or(""), path) {
        ("GET", "/status") => Request::Status,
        ("GET", "/metrics") => Request::Metrics,
        ("GET", "/") => Request::Page,
        ("POST", "/reload") => Request::Reload,
        ("POST", "/stop") => Request::Stop,
        ("POST", "/rotation/in") => Request::Rotation(crate::master::agent::Rotation::In),
        ("POST", "/rotation/out") => Request::Rotation(crate::master::agent::Rotation::Out),
        (_, "/status" | "/metrics" | "/" | "/reload" | "/stop" | "/rotation/in" | "/rotation/out") => {
            Request::Bad(405, format!("{} is not allowed on {path}", req.method.unwrap_or("")))
        }
        _ => Request::Bad(
            404,
            format!("no such endpoint: {path} (try /status, /metrics, /reload, /stop, /rotation/in, /rotation/out)"),
        ),
    })
}

/// Why the CLI could not get an answer.
#[derive(Debug)]
pub enum ClientError {
    /// No server listens on the socket.
    NotRunning(String),
    Other(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(m) | ClientError::Other(m) => write!(f, "{m}"),
        }
    }
}

/// Sends one request to the control socket and waits (up to `timeout`) for the answer.
/// Returns the status code and body.
pub fn request(socket: &Path, method: &str, path: &str, timeout: Duration) -> Result<(u16, String), ClientError> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| ClientError::NotRunning(format!("no fdtserver is answering on {} ({e})", socket.display())))?;
    let io_err = |e: io::Error| ClientError::Other(format!("control socket {}: {e}", socket.display()));
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: fdt\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(io_err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
            ClientError::Other(format!("no answer from the server within {} s", timeout.as_secs()))
        } else {
            io_err(e)
        }
    })?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| ClientError::Other("malformed answer".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Other("malformed status line".into()))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_endpoints_and_bad_ones_get_4xx() {
        assert_eq!(parse(b"GET /status HTTP/1.1\r\n\r\n", false), Some(Request::Status));
        assert_eq!(parse(b"POST /reload HTTP/1.1\r\nHost: x\r\n\r\n", false), Some(Request::Reload));
        assert_eq!(parse(b"GET /status HTTP/1.1\r\n", false), None);
        assert!(matches!(parse(b"DELETE /reload HTTP/1.1\r\n\r\n", false), Some(Request::Bad(405, _))));
        assert!(matches!(parse(b"GET /nope HTTP/1.1\r\n\r\n", false), Some(Request::Bad(404, _))));
        use crate::master::agent::Rotation;
        assert_eq!(parse(b"POST /rotation/out HTTP/1.1\r\n\r\n", false), Some(Request::Rotation(Rotation::Out)));
        assert_eq!(parse(b"POST /rotation/in HTTP/1.1\r\n\r\n", false), Some(Request::Rotation(Rotation::In)));
        assert!(matches!(parse(b"GET /rotation/in HTTP/1.1\r\n\r\n", false), Some(Request::Bad(405, _))));
        assert!(matches!(parse(b"POST /rotation/sideways HTTP/1.1\r\n\r\n", false), Some(Request::Bad(404, _))));
        assert!(matches!(parse(b"\x01\x02\r\n\r\n", false), Some(Request::Bad(400, _))));
    }

    #[test]
    fn the_503_answer_declares_its_own_length() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
    }

    #[test]
    fn a_request_runs_only_with_its_whole_body_and_a_valid_length() {
        let reload = |headers: &str, body: &str, closed| {
            parse(format!("POST /reload HTTP/1.1\r\nHost: x\r\n{headers}\r\n{body}").as_bytes(), closed)
        };
        assert_eq!(reload("Content-Length: 2\r\n", "{}", false), Some(Request::Reload));
        assert_eq!(reload("Content-Length: 0\r\n", "", false), Some(Request::Reload));
        // Waits for the rest; a client that stopped sending gets 400.
        assert_eq!(reload("Content-Length: 5\r\n", "ab", false), None);
        assert!(matches!(reload("Content-Length: 5\r\n", "ab", true), Some(Request::Bad(400, _))));
        assert!(matches!(reload("Content-Length: 99999999\r\n", "", false), Some(Request::Bad(413, _))));
        assert!(matches!(reload("Content-Length: 99999999999999999999999\r\n", "", false), Some(Request::Bad(413, _))));
        for bad in ["Content-Length: +5\r\n", "Content-Length: -1\r\n", "Content-Length: 1\r\nContent-Length: 2\r\n"] {
            assert!(matches!(reload(bad, "", false), Some(Request::Bad(400, _))), "{bad}");
        }
        assert!(matches!(reload("Transfer-Encoding: chunked\r\n", "0\r\n\r\n", false), Some(Request::Bad(400, _))));
        assert!(incomplete_body(b"POST /reload HTTP/1.1\r\nContent-Length: 3\r\n\r\n").is_some());
        assert!(incomplete_body(b"POST /reload HTTP/1.1\r\n").is_none());
    }
}

/// The control server driven as the master drives it (one poll, non-blocking sockets), with
/// real client sockets.
#[cfg(test)]
mod server_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Instant;

    struct Harness {
        _dir: tempfile::TempDir,
        path: PathBuf,
        poll: mio::Poll,
        server: ControlServer,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("control.sock");
            let poll = mio::Poll::new().unwrap();
            let mut server = ControlServer::bind(&path).unwrap();
            server.register(poll.registry(), Token(0)).unwrap();
            Harness { _dir: dir, path, poll, server }
        }

        /// Connects a client and has the server accept it; returns (client, connection id).
        fn connect(&mut self) -> (std::os::unix::net::UnixStream, usize) {
            let client = std::os::unix::net::UnixStream::connect(&self.path).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let before: Vec<usize> = self.server.conns.keys().copied().collect();
            self.server.accept(self.poll.registry());
            let id = *self.server.conns.keys().find(|id| !before.contains(id)).expect("the connection was accepted");
            (client, id)
        }

        /// Calls `ready` until it returns a request (the client's bytes are in the socket already).
        fn request(&mut self, id: usize) -> Option<Request> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(r) = self.server.ready(id, self.poll.registry()) {
                    return Some(r);
                }
                if !self.server.conns.contains_key(&id) || Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn read_all(client: &mut std::os::unix::net::UnixStream) -> String {
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    }

    #[test]
    fn a_request_head_over_16_kib_is_answered_431_request_header_fields_too_large() {
        let mut h = Harness::new();
        let (mut client, id) = h.connect();
        // No end of head in sight, and already past the limit.
        let huge = format!("GET /status HTTP/1.1\r\nX-Filler: {}\r\n", "a".repeat(MAX_REQUEST + 10));
        client.write_all(huge.as_bytes()).unwrap();
        let request = h.request(id).expect("a request past the limit is decided");
        let Request::Bad(status, msg) = request else { panic!("{request:?}") };
        assert_eq!((status, msg.as_str()), (431, "request too large"));
        h.server.respond(id, Response::text(status, msg), h.poll.registry());
        let answer = read_all(&mut client);
        assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nrequest too large\n"), "{answer}");
        assert!(!h.server.conns.contains_key(&id), "closed once answered");
        // A complete head that is too large is refused the same way.
        let whole = format!("GET /status HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(MAX_REQUEST));
        assert_eq!(parse(whole.as_bytes(), false), Some(Request::Bad(431, "request too large".into())));
    }

    #[test]
    fn every_status_the_api_sends_has_its_reason_phrase() {
        assert_eq!(reason_phrase(503), "Service Unavailable");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(409), "Conflict");
        // A status without a known phrase still makes a valid status line.
        assert_eq!(reason_phrase(418), "Status");
    }

    #[test]
    fn a_request_whose_declared_body_never_arrives_is_answered_400_at_the_request_timeout() {
        let mut h = Harness::new();
        let (mut client, id) = h.connect();
        client.write_all(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab").unwrap();
        let (mut silent, _) = h.connect();
        // The bytes are in the socket already: one read takes them all.
        assert_eq!(
            h.server.ready(id, h.poll.registry()),
            None,
            "waits for the rest of the body; the reload does not run"
        );
        assert_eq!(h.server.conns[&id].input.len(), 55);
        assert!(h.server.conns.contains_key(&id));
        // Both connections have been open for longer than the request timeout.
        let long_ago = Instant::now().checked_sub(REQUEST_TIMEOUT + Duration::from_secs(1)).unwrap();
        for conn in h.server.conns.values_mut() {
            conn.opened = long_ago;
        }
        h.server.expire(h.poll.registry());
        let answer = read_all(&mut client);
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert!(
            answer.contains("incomplete request: a body of 5 bytes was declared, 2 arrived within 10 s"),
            "{answer}"
        );
        // One that sent nothing at all is closed without an answer.
        assert_eq!(read_all(&mut silent), "");
        assert!(h.server.conns.is_empty(), "both connections are closed");
    }

    #[test]
    fn a_connection_within_the_request_timeout_is_kept() {
        let mut h = Harness::new();
        let (_client, id) = h.connect();
        h.server.expire(h.poll.registry());
        assert!(h.server.conns.contains_key(&id));
        // A complete request has no missing body.
        assert_eq!(incomplete_body(b"POST /reload HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"), None);
    }

    #[test]
    fn an_answer_larger_than_the_socket_buffer_reaches_a_slow_reader_whole() {
        let mut h = Harness::new();
        let (mut client, id) = h.connect();
        client.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(h.request(id), Some(Request::Metrics));
        let body = "x".repeat(4 << 20);
        h.server.respond(
            id,
            Response { status: 200, content_type: "text/plain", body: body.clone() },
            h.poll.registry(),
        );
        // The client has read nothing yet: the rest waits in the master, which did not block.
        assert!(h.server.conns.get(&id).is_some_and(|c| !c.output.is_empty()), "the answer is not all written yet");
        let reader = std::thread::spawn(move || read_all(&mut client));
        let mut events = mio::Events::with_capacity(16);
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.server.conns.contains_key(&id) {
            assert!(Instant::now() < deadline, "the answer was not delivered in time");
            h.poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            if events.iter().any(|e| e.token() == Token(CONN_TOKEN_BASE + id)) {
                assert_eq!(h.server.ready(id, h.poll.registry()), None, "no second request is read");
            }
        }
        let answer = reader.join().unwrap();
        let (head, got) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
        assert_eq!(got.len(), body.len(), "the whole body arrived");
    }

    #[test]
    fn an_answer_to_a_client_that_hung_up_is_dropped_and_its_connection_closed() {
        let mut h = Harness::new();
        let (mut client, id) = h.connect();
        client.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
        drop(client);
        // The request arrived whole before the hang-up: it is still taken.
        assert_eq!(h.request(id), Some(Request::Status));
        h.server.respond(id, Response::text(200, "x".repeat(1 << 20)), h.poll.registry());
        assert!(!h.server.conns.contains_key(&id), "nothing is kept for a client that is gone");
        // The server goes on serving others.
        let (mut next, next_id) = h.connect();
        next.write_all(b"GET /status HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(h.request(next_id), Some(Request::Status));
    }

    #[test]
    fn binding_refuses_a_socket_a_live_server_answers_on_and_replaces_a_stale_one() {
        let h = Harness::new();
        let e = ControlServer::bind(&h.path).err().expect("a second server on the same socket is refused");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(e.to_string(), "another fdtserver is running with this control socket");
        // The server was killed: its socket file is left, and nobody answers on it.
        let Harness { _dir, path, server, .. } = h;
        drop(server);
        assert!(path.exists());
        let mut next = ControlServer::bind(&path).expect("a stale socket file is replaced");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok(), "the new server answers there");
        next.take_ownership();
        next.remove_file();
        assert!(!path.exists());
    }

    #[test]
    fn the_client_reports_a_server_that_never_answers_within_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // Accepts connections (the kernel does) but never answers: a hung master.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let e = request(&path, "GET", "/status", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::Other(_)), "{e:?}");
        assert_eq!(e.to_string(), "no answer from the server within 1 s");
        assert!(started.elapsed() < Duration::from_secs(10));
        // With nothing at the path, it says no server is answering there.
        let missing = dir.path().join("none.sock");
        let e = request(&missing, "GET", "/status", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning(_)), "{e:?}");
        assert!(e.to_string().starts_with(&format!("no fdtserver is answering on {}", missing.display())), "{e}");
    }
}
