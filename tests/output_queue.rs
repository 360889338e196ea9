//! Output the socket does not take at once waits in the worker and is sent as the client
//! reads: a client that sends many requests before reading any answer gets every answer, in
//! order, and a client that closes its sending side still gets every answer before the close.

mod util;

use std::io::{Read, Write};
use std::time::Duration;

use util::*;

/// A client connection whose receive buffer is as small as the kernel allows, so that the
/// server's answers outgrow the socket buffers quickly and wait in the worker.
fn slow_reader(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    stream
}

/// `n` numbered 64-byte lines.
fn lines(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| format!("{i:063}\n").into_bytes()).collect()
}

#[test]
fn answers_to_requests_sent_before_reading_any_arrive_whole_and_in_order() {
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let mut stream = slow_reader(server.addr("echo"));
    // 16 MiB of requests: more than the socket buffers hold, so answers queue in the worker.
    let sent = lines(256 * 1024);
    let mut writer = stream.try_clone().unwrap();
    let expected = sent.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    // Long enough for the worker to fill the socket buffers and queue the rest.
    std::thread::sleep(Duration::from_millis(1500));
    let mut got = vec![0; expected.len()];
    stream.read_exact(&mut got).unwrap();
    sender.join().unwrap().unwrap();
    assert!(got == expected, "answers differ from the requests (lengths {} and {})", got.len(), expected.len());
}

#[test]
fn a_client_that_stops_sending_still_gets_every_answer_before_the_close() {
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let mut stream = slow_reader(server.addr("echo"));
    let sent = lines(128 * 1024);
    let mut writer = stream.try_clone().unwrap();
    let expected = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    // Long enough for the worker to fill the socket buffers and queue the rest.
    std::thread::sleep(Duration::from_millis(1500));
    let mut got = Vec::new();
    stream.read_to_end(&mut got).unwrap();
    sender.join().unwrap().unwrap();
    assert!(got == expected, "{} bytes of answers for {} of requests", got.len(), expected.len());
}
