//! The control API: HTTP/1.1 over a Unix socket, served from the master's event loop
//! ([`ControlServer`]), and the client the CLI uses to talk to it ([`request`]).
//!
//! Invariant: the server side never blocks the master: every socket is non-blocking, each
//! request is answered with `Connection: close`, and a `POST /reload` is parked until the
//! master resolves it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

/// Requests larger than this are refused (431): the API has no large requests.
const MAX_REQUEST: usize = 16 * 1024;
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
                        log::warn!("control socket: {MAX_CONNECTIONS} connections open already; refusing one more");
                        continue; // dropping `stream` closes it
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

    /// Closes connections that did not send a whole request within `REQUEST_TIMEOUT`.
    pub fn expire(&mut self, registry: &Registry) {
        let stale: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.answered && c.opened.elapsed() >= REQUEST_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.close(id, registry);
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
        loop {
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
        let request = parse(&conn.input);
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

/// Parses one request; `None` while incomplete.
fn parse(input: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Complete(_)) => {}
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
        (_, "/status" | "/metrics" | "/" | "/reload" | "/stop") => {
            Request::Bad(405, format!("{} is not allowed on {path}", req.method.unwrap_or("")))
        }
        _ => Request::Bad(404, format!("no such endpoint: {path} (try /status, /metrics, /reload, /stop)")),
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
        assert_eq!(parse(b"GET /status HTTP/1.1\r\n\r\n"), Some(Request::Status));
        assert_eq!(parse(b"POST /reload HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Request::Reload));
        assert_eq!(parse(b"GET /status HTTP/1.1\r\n"), None);
        assert!(matches!(parse(b"DELETE /reload HTTP/1.1\r\n\r\n"), Some(Request::Bad(405, _))));
        assert!(matches!(parse(b"GET /nope HTTP/1.1\r\n\r\n"), Some(Request::Bad(404, _))));
        assert!(matches!(parse(b"\x01\x02\r\n\r\n"), Some(Request::Bad(400, _))));
    }
}
