//! `hello`: HTTP/1.1 (keep-alive) and HTTP/1.0; every request gets `200 OK` with the body
//! `message` and a header `X-Worker-Pid`.
//!
//! The answers are built once at start; a request costs one parse and one copy.
//!
//! Framing is strict (RFC 9112 §6), so that hello behind a proxy cannot be used to smuggle a
//! request: a `Content-Length` that is not digits, differing `Content-Length`s, or one beside
//! a `Transfer-Encoding` get `400` and a close; a `Transfer-Encoding` alone gets `501` (no
//! transfer coding is read) and a close.

use fdt_sdk::{App, Conn, Next, Settings};

/// Requests whose headers have not ended within this many bytes are refused (431).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Request bodies are read and discarded; larger ones are refused (413).
/// Half the server's limit on a pending request (1 MiB), so that every refused body gets a
/// 413 rather than a closed connection.
const MAX_BODY_BYTES: usize = 512 * 1024;
const MAX_HEADERS: usize = 64;

struct Hello {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
    body_len: usize,
    pid: u32,
}

impl Hello {
    fn response(message: &str, pid: u32, connection: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             X-Worker-Pid: {pid}\r\nConnection: {connection}\r\n\r\n{message}",
            message.len()
        )
        .into_bytes()
    }

    fn error(&self, conn: &mut Conn, status: &str) -> Next {
        let body = format!("{status}\n");
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Worker-Pid: {}\r\n\
             Connection: close\r\n\r\n",
            body.len(),
            self.pid
        );
        conn.write(head.as_bytes());
        conn.write(body.as_bytes());
        Next::Close
    }
}

/// What one parsed request asks for.
struct Request {
    /// Bytes of head and body together.
    len: usize,
    keep_alive: bool,
    head_only: bool,
}

enum Parsed {
    Complete(Request),
    Partial,
    Invalid(&'static str),
}

fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if input.len() > MAX_HEADER_BYTES => {
            return Parsed::Invalid("431 Request Header Fields Too Large");
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid("431 Request Header Fields Too Large");
        }
        Err(_) => return Parsed::Invalid("400 Bad Request"),
    };
    let http10 = req.version == Some(0);
    let mut keep_alive = !http10;
    // Every Content-Length value seen, which must all be the same.
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if v.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 §6.3: a Content-Length that is not 1*DIGIT, or several differing values,
            // is an unrecoverable framing error (400, then close): another server in front of
            // this one may have framed the request otherwise (request smuggling).
            for value in h.value.split(|&b| b == b',') {
                match content_length_value(value) {
                    Some(n) if content_length.is_none_or(|seen| seen == n) => content_length = Some(n),
                    _ => return Parsed::Invalid("400 Bad Request"),
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        }
    }
    if transfer_encoding {
        // No transfer coding is supported (RFC 9112 §6.1: 501). Together with a Content-Length
        // the framing is ambiguous, the shape of a smuggling attempt: 400. Either way, close.
        return Parsed::Invalid(if content_length.is_some() { "400 Bad Request" } else { "501 Not Implemented" });
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Parsed::Invalid("413 Content Too Large");
    }
    let len = head_len + body_len;
    if input.len() < len {
        return Parsed::Partial;
    }
    Parsed::Complete(Request { len, keep_alive, head_only: req.method == Some("HEAD") })
}

/// One Content-Length value: 1*DIGIT, with optional whitespace around it (no sign, nothing
/// else). Values too large for `usize` saturate: they are refused as too large, not as malformed.
fn content_length_value(value: &[u8]) -> Option<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0usize, |n, &d| n.saturating_mul(10).saturating_add(usize::from(d - b'0'))))
}

impl App for Hello {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["message"]);

    fn start(settings: &Settings) -> Result<Self, String> {
        let message = settings.string("message", "Hello, world!")?;
        let pid = settings.worker_pid();
        Ok(Hello {
            keep_alive: Hello::response(&message, pid, "keep-alive"),
            close: Hello::response(&message, pid, "close"),
            body_len: message.len(),
            pid,
        })
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        loop {
            let request = match parse(conn.input()) {
                Parsed::Complete(r) => r,
                Parsed::Partial => return Next::KeepOpen,
                Parsed::Invalid(status) => return self.error(conn, status),
            };
            conn.consume_request(request.len);
            let keep_alive = request.keep_alive && !conn.draining();
            let answer = if keep_alive { &self.keep_alive } else { &self.close };
            let answer = if request.head_only { &answer[..answer.len() - self.body_len] } else { answer };
            conn.write(answer);
            if !keep_alive {
                return Next::Close;
            }
        }
    }
}

fdt_sdk::export_app!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn answers_pipelined_keep_alive_requests_with_the_message() {
        let app = TestApp::<Hello>::start("message = \"hi there\"").unwrap();
        let mut conn = app.connect();
        let next = conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET");
        assert_eq!(next, Next::KeepOpen);
        let out = text(conn.take_output());
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.ends_with("\r\n\r\nhi there"), "{out}");
        assert!(out.contains(&format!("X-Worker-Pid: {}\r\n", std::process::id())));
        assert!(out.contains("Connection: keep-alive"));
        assert_eq!(conn.pending_input(), b"GET");
        assert_eq!(conn.requests(), 2);
    }

    #[test]
    fn http10_closes_unless_keep_alive_is_asked_for() {
        let app = TestApp::<Hello>::start("").unwrap();
        let mut conn = app.connect();
        assert_eq!(conn.send(b"GET / HTTP/1.0\r\n\r\n"), Next::Close);
        assert!(text(conn.take_output()).contains("Connection: close"));
        let mut conn = app.connect();
        assert_eq!(conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), Next::KeepOpen);
    }

    #[test]
    fn a_draining_worker_answers_with_connection_close() {
        let app = TestApp::<Hello>::start("").unwrap();
        let mut conn = app.connect();
        conn.set_draining(true);
        assert_eq!(conn.send(b"GET / HTTP/1.1\r\n\r\n"), Next::Close);
        let out = text(conn.take_output());
        assert!(out.contains("Connection: close") && out.ends_with("Hello, world!"), "{out}");
    }

    #[test]
    fn waits_for_the_whole_body_and_skips_it() {
        let app = TestApp::<Hello>::start("").unwrap();
        let mut conn = app.connect();
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab");
        assert!(conn.take_output().is_empty());
        conn.send(b"cde");
        assert!(text(conn.take_output()).starts_with("HTTP/1.1 200 OK"));
        assert!(conn.pending_input().is_empty());
    }

    #[test]
    fn a_content_length_that_is_not_digits_or_that_conflicts_gets_400_and_a_close() {
        let app = TestApp::<Hello>::start("").unwrap();
        for request in [
            &b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nabcde"[..],
            b"POST / HTTP/1.1\r\nContent-Length: -0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 0\r\n\r\nabcde",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ] {
            let mut conn = app.connect();
            assert_eq!(conn.send(request), Next::Close, "{}", String::from_utf8_lossy(request));
            let out = text(conn.take_output());
            assert!(out.starts_with("HTTP/1.1 400 Bad Request"), "{}: {out}", String::from_utf8_lossy(request));
        }
    }

    #[test]
    fn repeated_equal_content_lengths_frame_the_request() {
        let app = TestApp::<Hello>::start("").unwrap();
        let mut conn = app.connect();
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3, 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n");
        assert_eq!(text(conn.take_output()).matches("HTTP/1.1 200 OK").count(), 2);
        let mut conn = app.connect();
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(conn.send(huge), Next::Close);
        assert!(text(conn.take_output()).starts_with("HTTP/1.1 413"));
    }

    #[test]
    fn garbage_gets_400_and_a_close() {
        let app = TestApp::<Hello>::start("").unwrap();
        let mut conn = app.connect();
        assert_eq!(conn.send(b"\x00\x01 nonsense\r\n\r\n"), Next::Close);
        assert!(text(conn.take_output()).starts_with("HTTP/1.1 400 Bad Request"));
    }
}
