//! `hello` frames requests as RFC 9112 §6 asks (issue 13, point 8): a `Content-Length` that
//! is not 1*DIGIT, several differing ones, or one beside `Transfer-Encoding` is answered `400`
//! and the connection closed — a proxy in front could frame such a request otherwise, and what
//! one reads as a body the other would read as a second request (request smuggling).

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use util::*;

/// A second request, hidden where a body would be.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n";

/// Sends `request` on a fresh connection and reads until the server closes it.
fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    // The server answers and closes at once; a keep-alive connection would wait here.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the connection stayed open {:?} after {request:?}, having answered:\n{}",
                    started.elapsed(),
                    String::from_utf8_lossy(&got)
                )
            }
            Err(_) => break, // reset
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// One `400` with `Connection: close`, nothing after it, and the connection closed.
fn assert_rejected(addr: SocketAddr, request: &str) {
    let answer = exchange(addr, request);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{request:?} was answered:\n{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{request:?} got more than one answer:\n{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
}

#[test]
fn a_content_length_with_a_sign_or_other_non_digits_gets_400_and_a_close() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let workers = server.worker_pids();
    for value in ["+5", "-0", "0x5", "5 5", "5;", "", "٥"] {
        let body = "abcde";
        assert_rejected(addr, &format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {value}\r\n\r\n{body}"));
    }
    // `+38` would have framed exactly the smuggled request as this one's body.
    let plus = format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: +{}\r\n\r\n{SMUGGLED}", SMUGGLED.len());
    assert_rejected(addr, &plus);
    // Whitespace around the digits is allowed (it is not part of the field value).
    let fine = exchange(addr, "POST / HTTP/1.1\r\nHost: test\r\nContent-Length:  3 \r\nConnection: close\r\n\r\nabc");
    assert!(fine.starts_with("HTTP/1.1 200 OK\r\n"), "{fine}");
    server.assert_running();
    assert_eq!(server.worker_pids(), workers);
}

#[test]
fn conflicting_content_lengths_get_400_and_a_close() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let n = SMUGGLED.len();
    // Taking either value would hide, or reveal, the second request.
    assert_rejected(
        addr,
        &format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nContent-Length: {n}\r\n\r\n{SMUGGLED}"),
    );
    assert_rejected(
        addr,
        &format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\nContent-Length: 0\r\n\r\n{SMUGGLED}"),
    );
    assert_rejected(addr, &format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {n}, 0\r\n\r\n{SMUGGLED}"));
    // The same value twice frames the request one way only: it is served.
    let mut client = HttpClient::connect(addr).unwrap();
    client
        .stream()
        .write_all(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let r = client.read_response().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.closes(), "{r:?}");
    assert_eq!(client.get("/").unwrap().status, 200);
}

#[test]
fn transfer_encoding_beside_content_length_gets_400_and_a_close() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    // hello reads no chunked body: a proxy that does would see `0\r\n\r\n` end this request
    // and the smuggled one follow.
    let chunked = format!("0\r\n\r\n{SMUGGLED}");
    let n = chunked.len();
    assert_rejected(
        addr,
        &format!("POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"),
    );
    assert_rejected(
        addr,
        &format!("POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n{chunked}"),
    );
    // Transfer-Encoding alone: not implemented, and closed too (its body cannot be framed).
    let answer =
        exchange(addr, &format!("POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"));
    assert!(answer.starts_with("HTTP/1.1 501 Not Implemented\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
}
