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
