//! Supervision limits: `heartbeat_timeout` replaces a worker that makes no progress,
//! `request_timeout` one whose request is stuck in app code, and `max_requests` recycles a
//! worker gracefully.

mod util;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

/// (pid, slot) of the serving workers of the active generation; `None` while the control
/// socket does not answer.
fn serving(server: &TestServer) -> Option<Vec<(i32, u64)>> {
    let (_, body) = server.control("GET", "/status")?;
    let v: Value = serde_json::from_str(&body).ok()?;
    let generation = v["generation"].as_u64();
    Some(
        v["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["generation"].as_u64() == generation && w["state"] == "serving")
            .map(|w| (w["pid"].as_i64().unwrap() as i32, w["slot"].as_u64().unwrap()))
            .collect(),
    )
}

/// Waits (up to `within`) for a worker other than `old` to serve in `slot`; returns its pid.
fn replaced(server: &TestServer, old: i32, slot: u64, within: Duration) -> i32 {
    wait_for(within, "a new worker serving in the old worker's slot", || {
        if alive(old) {
            return None;
        }
        serving(server)?.into_iter().find(|&(pid, s)| s == slot && pid != old).map(|(pid, _)| pid)
    })
}

#[test]
fn a_stopped_worker_is_replaced_within_heartbeat_timeout_plus_a_second() {
    let mut server = TestServer::start(&Setup::new(2, 2).app("kit", "testkit", "").server("heartbeat_timeout", "1"));
    let addr = server.addr("kit");
    let workers = serving(&server).unwrap();
    let (victim, slot) = workers[0];
    let survivor = workers[1].0;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let new = replaced(&server, victim, slot, Duration::from_secs(2));
    eprintln!("a stopped worker was replaced in {:?}", stopped.elapsed());
    server.assert_running();

    let v = server.status();
    assert_eq!(v["worker_kills"]["heartbeat_timeout"], 1, "{v}");
    assert_eq!(v["worker_restarts"], 1, "{v}");
    let log = server.log();
    assert!(log.contains(&format!("(pid {victim})")) && log.contains("heartbeat_timeout 1 s"), "{log}");
    assert!(server.worker_pids().contains(&survivor), "the healthy worker was touched");
    wait_for(READY_TIMEOUT, "a connection served by the new worker", || {
        (LineClient::connect(addr).ask("PID") == new.to_string()).then_some(())
    });
}

#[test]
fn a_request_stuck_in_an_endless_loop_is_killed_within_request_timeout_plus_a_second_and_its_worker_replaced() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "").server("request_timeout", "1"));
    let addr = server.addr("kit");
    let (victim, slot) = serving(&server).unwrap()[0];
    let mut stuck = LineClient::connect(addr);
    let peer = stuck.stream().local_addr().unwrap().to_string();
    // Another connection on the same worker keeps being served while one handler spins.
    let mut other = LineClient::connect(addr);
    assert_eq!(other.ask("PID"), victim.to_string());

    stuck.send("SPIN");
    let sent = Instant::now();
    assert_eq!(other.ask("still served"), "still served");
    stuck.stream().set_read_timeout(Some(Duration::from_secs(2).saturating_sub(sent.elapsed()))).unwrap();
    // Only the worker's death closes a connection whose handler spins.
    assert!(stuck.closed_by_peer(), "the stuck connection was not closed within request_timeout + 1 s");
    let killed = sent.elapsed();
    assert!(killed < Duration::from_secs(2), "killed {killed:?} after SPIN");
    let new = replaced(&server, victim, slot, READY_TIMEOUT);
    eprintln!("the stuck worker was killed {killed:?} after SPIN; pid {new} serves in its slot");
    server.assert_running();

    // The other connection of that worker was closed gently (EOF, not a reset) before the kill.
    assert_eq!(other.recv(), None, "the idle connection on the killed worker got data instead of an EOF");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("request_timeout 1 s")).unwrap_or_else(|| panic!("no log line: {log}"));
    assert!(line.contains("app kit") && line.contains(&peer) && line.contains("running for"), "{line}");
    assert!(line.contains(&format!("pid {victim}")), "{line}");
    let v = server.status();
    assert_eq!(v["worker_kills"]["request_timeout"], 1, "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert!(metrics.contains("fdtserver_worker_kills_total{reason=\"request_timeout\"} 1"), "{metrics}");
}

#[test]
fn a_worker_whose_every_handler_is_stuck_is_killed_by_heartbeat_timeout() {
    // No request_timeout: the worker's control thread still sends heartbeats, but they say
    // that every handler thread has been busy for too long.
    let server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", "").server("heartbeat_timeout", "1"));
    let (victim, slot) = serving(&server).unwrap()[0];
    let mut stuck = LineClient::connect(server.addr("kit"));
    stuck.send("SPIN");
    let sent = Instant::now();
    // Stalled for heartbeat_timeout (1 s), then the condemned worker's grace (0.5 s).
    replaced(&server, victim, slot, Duration::from_millis(2500));
    eprintln!("replaced {:?} after SPIN", sent.elapsed());
    let log = server.log();
    assert!(log.contains("made no progress") && log.contains("all 1 handler threads are busy"), "{log}");
    assert_eq!(server.status()["worker_kills"]["heartbeat_timeout"], 1);
}

#[test]
fn max_requests_recycles_a_worker_after_starting_its_replacement_and_loses_no_request() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("max_requests", "20"));
    let addr = server.addr("hello");
    let first = server.worker_pids()[0];
    let limit = server.status()["workers"][0]["request_limit"].as_u64().unwrap();
    assert!((20..=22).contains(&limit), "limit {limit} is not 20 plus up to 10% jitter");
    // A keep-alive client across the recycle: the old worker answers it with
    // `Connection: close` when it drains, and the client reconnects.
    let mut keep_alive = HttpClient::connect(addr).unwrap();
    let mut served_by = Vec::new();
    let new = wait_for(Duration::from_secs(10), "a request served by a new worker", || {
        let r = http_get(addr).expect("a request failed during the recycle");
        assert_eq!(r.status, 200);
        served_by.push(r.worker_pid());
        let k = keep_alive.get("/").expect("a keep-alive request failed during the recycle");
        if k.closes() {
            keep_alive = HttpClient::connect(addr).unwrap();
        }
        (r.worker_pid() != first).then(|| r.worker_pid())
    });
    let before_new = served_by.iter().filter(|&&p| p == first).count() as u64;
    assert!(before_new >= limit / 2, "recycled after only {before_new} fresh-connection requests (limit {limit})");
    wait_for(Duration::from_secs(5), "the recycled worker to exit", || (!alive(first)).then_some(()));
    let v = server.status();
    assert_eq!(v["worker_recycles"], 1, "{v}");
    assert_eq!(v["worker_restarts"], 0, "a recycle is not a restart: {v}");
    assert_eq!(server.worker_pids(), vec![new]);
    // The replacement was serving before the old worker was told to drain.
    let log = server.log();
    let at = |needle: &str| log.find(needle).unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"));
    let recycling = at(&format!("recycling it; pid {new} takes over"));
    let new_serving = at(&format!("(pid {new}) of generation 1 serving"));
    let old_drains = at(&format!("(pid {first}) recycled: pid {new} serves; draining"));
    assert!(recycling < new_serving && new_serving < old_drains, "wrong order:\n{log}");
}

#[test]
fn a_replacement_worker_that_hangs_at_start_is_killed_after_boot_timeout_and_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let trap = dir.path().join("hang");
    let settings = format!("hang_at_start_if = \"{}\"", trap.display());
    let server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", &settings).server("boot_timeout", "1"));
    let (victim, slot) = serving(&server).unwrap()[0];
    std::fs::write(&trap, "").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_for(Duration::from_secs(3), "a hung replacement to be killed", || {
        (server.status()["worker_kills"]["boot_timeout"].as_u64()? >= 1).then_some(())
    });
    assert!(server.log().contains("did not start its apps within boot_timeout (1 s)"), "{}", server.log());
    std::fs::remove_file(&trap).unwrap();
    let new = replaced(&server, victim, slot, READY_TIMEOUT);
    assert_eq!(LineClient::connect(server.addr("kit")).ask("PID"), new.to_string());
}
