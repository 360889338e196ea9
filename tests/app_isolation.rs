//! One app's stuck requests never cost another app's connections: in a worker that serves
//! several apps, one app holds at most `threads - 1` handlers, so the others are still served,
//! and the worker is never counted as hung (every handler stuck) and killed because of one app.

mod util;

use std::time::{Duration, Instant};

use util::*;

#[test]
fn requests_stuck_in_one_app_leave_a_handler_for_another_and_the_worker_alive() {
    let setup = Setup::new(1, 2)
        .app("kit", "testkit", "")
        .app("echo", "echo", "")
        // Counted as hung once every handler is stuck for a second.
        .server("heartbeat_timeout", "1");
    let server = TestServer::start(&setup);
    let worker = server.worker_pids()[0];
    let mut echo = LineClient::connect(server.addr("echo"));
    assert_eq!(echo.ask("before"), "before");
    // Two requests that block in the app for 2.5 s each: more than this worker's two handlers
    // can take without starving echo.
    let mut stuck: Vec<LineClient> = (0..2).map(|_| LineClient::connect(server.addr("kit"))).collect();
    let started = Instant::now();
    for c in &mut stuck {
        c.send("SLEEP 2500");
    }
    // Give both a moment to reach the worker; then echo must still be answered at once, over
    // and over, while the app is stuck, and after the time a hung worker would be killed.
    std::thread::sleep(Duration::from_millis(200));
    while started.elapsed() < Duration::from_millis(2000) {
        let asked = Instant::now();
        assert_eq!(echo.ask("during"), "during");
        assert!(asked.elapsed() < Duration::from_millis(500), "echo waited {:?} for a handler", asked.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The stuck app's requests are all served in turn: nothing of it was lost either.
    for c in &mut stuck {
        assert_eq!(c.recv().as_deref(), Some("SLEPT"));
    }
    assert!(started.elapsed() >= Duration::from_millis(4900), "one at a time: the app held one handler");
    assert_eq!(echo.ask("after"), "after", "the echo connection survived");
    assert_eq!(server.worker_pids(), vec![worker], "the worker was never killed as hung");
    let status = server.status();
    assert_eq!(status["worker_kills"]["heartbeat_timeout"], 0, "{status}");
}

#[test]
fn a_worker_with_one_app_gives_it_every_handler() {
    let server = TestServer::start(&Setup::new(1, 3).app("kit", "testkit", ""));
    let mut clients: Vec<LineClient> = (0..3).map(|_| LineClient::connect(server.addr("kit"))).collect();
    let started = Instant::now();
    for c in &mut clients {
        c.send("SLEEP 1000");
    }
    for c in &mut clients {
        assert_eq!(c.recv().as_deref(), Some("SLEPT"));
    }
    // Three handlers at once: about one second, not three.
    assert!(started.elapsed() < Duration::from_millis(2500), "took {:?}", started.elapsed());
}

/// A worker with two handlers and two apps: `kit` may hold one handler at a time.
fn two_app_server() -> TestServer {
    TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").app("echo", "echo", ""))
}

#[test]
fn a_connection_that_waited_for_its_apps_share_still_sees_its_peers_close() {
    let server = two_app_server();
    let mut busy = LineClient::connect(server.addr("kit"));
    busy.send("SLEEP 1500");
    std::thread::sleep(Duration::from_millis(200));
    // This one's request waits for kit's share; then its peer half-closes.
    let mut waiting = LineClient::connect(server.addr("kit"));
    waiting.send("GEN");
    std::thread::sleep(Duration::from_millis(200));
    waiting.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(busy.recv().as_deref(), Some("SLEPT"));
    assert_eq!(waiting.recv().as_deref(), Some("1"), "its request is served once kit has a handler");
    // The FIN that came while it waited is not lost: the server closes its side at once.
    waiting.stream().set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(waiting.closed_by_peer(), "the server must see the peer's close and close too");
}

#[test]
fn a_timer_does_not_fire_on_a_connection_whose_request_waits_for_its_apps_share() {
    let server = two_app_server();
    let mut timed = LineClient::connect(server.addr("kit"));
    assert_eq!(timed.ask("TIMEOUT 400"), "TIMER");
    let mut busy = LineClient::connect(server.addr("kit"));
    busy.send("SLEEP 1500");
    std::thread::sleep(Duration::from_millis(100));
    // Sent in time: the peer is not quiet, its request only waits for a handler.
    timed.send("GEN");
    assert_eq!(busy.recv().as_deref(), Some("SLEPT"));
    assert_eq!(timed.recv().as_deref(), Some("1"), "answered, not timed out while it waited");
    assert_eq!(timed.recv().as_deref(), Some("TIMED OUT"), "then quiet for real");
}

#[test]
fn the_quiet_time_of_a_timer_starts_when_the_answer_is_sent_not_while_the_app_works() {
    let server = two_app_server();
    let mut c = LineClient::connect(server.addr("kit"));
    assert_eq!(c.ask("TIMEOUT 500"), "TIMER");
    c.send("SLEEP 1000");
    assert_eq!(c.recv().as_deref(), Some("SLEPT"));
    let answered = Instant::now();
    assert_eq!(c.recv().as_deref(), Some("TIMED OUT"));
    assert!(answered.elapsed() >= Duration::from_millis(400), "timed out {:?} after its answer", answered.elapsed());
}
