//! Push (`fdt_sdk::Handle`): an app writes to a connection from another connection's callback
//! or from an app timer, bounded by `max_output`, and a handle to a closed connection fails
//! without ever reaching the connection that reuses its socket.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::*;

fn server(max_output: usize) -> TestServer {
    TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("max_output", &max_output.to_string()))
}

/// A member of testkit's room.
fn member(server: &TestServer) -> LineClient {
    let mut c = LineClient::connect(server.addr("kit"));
    assert_eq!(c.ask("JOIN"), "JOINED");
    c
}

/// A member of testkit's room whose socket has a receive buffer of `rcvbuf` bytes.
fn small_member(server: &TestServer, rcvbuf: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    socket.connect(&server.addr("kit").into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.write_all(b"JOIN\n").unwrap();
    let mut joined = [0u8; 7];
    stream.read_exact(&mut joined).unwrap();
    assert_eq!(&joined, b"JOINED\n");
    stream
}

#[test]
fn a_line_said_on_one_connection_is_pushed_to_the_others() {
    let server = server(256 * 1024);
    let (mut a, mut b, mut c) = (member(&server), member(&server), member(&server));
    assert_eq!(a.ask("SAY hello there"), "SAID ok=2 full=0 closed=0");
    assert_eq!(b.recv().as_deref(), Some("hello there"));
    assert_eq!(c.recv().as_deref(), Some("hello there"));
    // Pushed lines and a connection's own answers stay whole and in order.
    for i in 0..100 {
        assert_eq!(b.ask(&format!("SAY {i}")), "SAID ok=2 full=0 closed=0");
    }
    for i in 0..100 {
        assert_eq!(a.recv(), Some(i.to_string()));
        assert_eq!(c.recv(), Some(i.to_string()));
    }
    assert_eq!(c.ask("PID"), a.ask("PID"));
}

#[test]
fn an_app_timer_pushes_to_a_connection_that_sends_nothing() {
    let server = server(256 * 1024);
    let mut a = LineClient::connect(server.addr("kit"));
    let asked = Instant::now();
    assert_eq!(a.ask("LATER 300 wake up"), "LATER");
    assert_eq!(a.recv().as_deref(), Some("wake up"));
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "pushed after {waited:?}");
}

#[test]
fn pushes_to_a_client_that_does_not_read_are_refused_once_max_output_is_reached() {
    let server = server(64 * 1024);
    let pid = server.worker_pids()[0];
    let mut sender = member(&server);
    // A member with a small receive buffer that reads nothing.
    let mut slow = small_member(&server, 4096);
    let before = rss_kib(pid);
    // 16 KiB chunks until one is refused: the kernel's buffers, then max_output in the worker.
    let answer = sender.ask("FLOOD_OTHERS 16384");
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!((words[0], words[2]), ("FLOODED", "full"), "{answer}");
    let chunks: u64 = words[1].parse().unwrap();
    assert!(chunks < 2000, "{chunks} chunks of 16 KiB were taken by a client that reads nothing");
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 16 * 1024, "the worker grew by {grown} KiB");
    // Refused pushes wrote nothing: what the slow client reads is whole chunks, then it is
    // still a member who gets what is said next once it reads.
    assert_eq!(sender.ask("PID"), pid.to_string(), "the sender is served on");
    slow.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match slow.read(&mut buf) {
            Ok(0) => panic!("the slow client was closed"),
            Ok(n) => {
                assert!(buf[..n].iter().all(|&b| b == b'f'), "something other than the chunks came");
                got += n as u64;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, chunks * 16384, "every accepted chunk arrived, whole");
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_handle_to_a_closed_connection_fails_and_never_reaches_the_next_one_on_its_socket() {
    let server = server(256 * 1024);
    let mut a = LineClient::connect(server.addr("kit"));
    let mut b = LineClient::connect(server.addr("kit"));
    // The app keeps B's handle after B closes (testkit's KEEP never forgets one).
    assert_eq!(b.ask("KEEP"), "KEPT");
    drop(b);
    // New connections, one of which likely takes the closed one's fd.
    let mut others: Vec<LineClient> = (0..4).map(|_| LineClient::connect(server.addr("kit"))).collect();
    for o in &mut others {
        assert_eq!(o.ask("GEN"), "1");
    }
    wait_for(Duration::from_secs(5), "a push through the stale handle to fail as closed", || {
        (a.ask("TELL_KEPT not for you") == "TOLD ok=0 closed=1").then_some(())
    });
    // Nothing pushed reached the newcomers: their next line is their own answer.
    for o in &mut others {
        assert_eq!(o.ask("TAG"), "", "a newcomer got a line pushed to a closed connection");
    }
}

#[test]
fn a_pushed_close_ends_the_connection_after_what_was_pushed() {
    let server = server(256 * 1024);
    let mut a = member(&server);
    let mut b = member(&server);
    assert_eq!(a.ask("SAY last words"), "SAID ok=1 full=0 closed=0");
    assert_eq!(a.ask("KICK_OTHERS"), "KICKED 1");
    assert_eq!(b.recv().as_deref(), Some("last words"));
    assert!(b.closed_by_peer(), "the kicked connection ends after its last line");
    assert_eq!(a.ask("SAY anyone"), "SAID ok=0 full=0 closed=0", "the kicked one left the room");
}

#[test]
fn a_pushed_close_of_a_reset_connection_never_runs_the_apps_close_inside_the_pusher() {
    // One handler. Closing B runs testkit's `on_close`, which takes the room's lock; the push
    // that asks for it runs inside A's callback holding that lock. Were the close done in the
    // pushing thread, the worker would deadlock.
    let server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", ""));
    let mut a = member(&server);
    let b = member(&server);
    let mut busy = LineClient::connect(server.addr("kit"));
    busy.send("SLEEP 600");
    a.send("KICK_OTHERS");
    // B resets its connection while the handler sleeps: the close pushed to it fails at once.
    let b = socket2::Socket::from(b.into_stream());
    b.set_linger(Some(Duration::ZERO)).unwrap();
    drop(b);
    assert_eq!(busy.recv().as_deref(), Some("SLEPT"));
    assert_eq!(a.recv().as_deref(), Some("KICKED 1"), "the worker is stuck");
    assert_eq!(LineClient::connect(server.addr("kit")).ask("GEN"), "1", "a new client is served");
}

#[test]
fn pushed_bytes_waiting_for_room_are_delivered_without_more_input() {
    // One handler, a small max_output: B's pushes wait in the worker while B's output is more
    // than half full. B then reads everything it has and asks something, in one event with the
    // handler busy: the rest must still come without B sending anything more.
    let server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", "").server("max_output", "1024"));
    let mut a = member(&server);
    let mut b = small_member(&server, 1024);
    let answer = a.ask("FLOOD_OTHERS 100");
    let chunks: usize = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut busy = LineClient::connect(server.addr("kit"));
    busy.send("SLEEP 800");
    std::thread::sleep(Duration::from_millis(100));
    // While the handler sleeps: take what came, then ask (one readable and writable event).
    b.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = b.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    b.write_all(b"PID\n").unwrap();
    let pid = server.worker_pids()[0].to_string();
    let want = chunks * 100 + pid.len() + 1;
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while got.len() < want {
        match b.read(&mut buf) {
            Ok(0) => panic!("closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{} of {want} bytes after 5 s ({e}): pushed bytes stalled", got.len()),
        }
    }
    let pushed = got.iter().filter(|&&c| c == b'f').count();
    assert_eq!(pushed, chunks * 100, "every accepted push arrived");
    assert!(String::from_utf8_lossy(&got).contains(&format!("{pid}\n")));
}
