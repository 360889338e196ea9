//! Background services (`Settings::service`, `Settings::singleton_service`): long-lived work that
//! starts with the worker, is asked to stop when the worker drains and waited for, is run again
//! with back-off after a panic (logged and counted), and — as a singleton — runs in one worker of
//! the server at a time.

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

/// A server of `workers` workers whose testkit app `svc` (no listener) runs the beat service
/// writing to `file`, with more testkit settings.
fn server(workers: usize, file: &Path, settings: &str) -> TestServer {
    let settings = format!("service_file = \"{}\"\n{settings}", file.display());
    TestServer::start(&Setup::new(workers, 2).app_without_listener("svc", "testkit", &settings))
}

/// The lines of `file`, as (word, pid).
fn lines(file: &Path) -> Vec<(String, i32)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .map(|l| {
            let (word, pid) = l.split_once(' ').unwrap();
            (word.to_string(), pid.parse().unwrap())
        })
        .collect()
}

fn count(file: &Path, word: &str, pid: i32) -> usize {
    lines(file).iter().filter(|(w, p)| w == word && *p == pid).count()
}

#[test]
fn a_service_runs_in_every_worker_and_stops_when_its_worker_drains() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("beats");
    let server = server(2, &file, "");
    let old = server.worker_pids();
    wait_for(Duration::from_secs(5), "both services to beat", || {
        old.iter().all(|&p| count(&file, "BEAT", p) >= 2).then_some(())
    });
    assert_eq!(server.reload().0, 200);
    wait_for(Duration::from_secs(10), "the old services to stop", || {
        old.iter().all(|&p| count(&file, "STOP", p) == 1).then_some(())
    });
    let new = server.worker_pids();
    wait_for(Duration::from_secs(5), "the new services to run", || {
        new.iter().all(|&p| count(&file, "RUN", p) == 1).then_some(())
    });
    // A stopped service's worker is gone soon after: it was waited for, not left behind.
    wait_for(Duration::from_secs(10), "the old workers to exit", || old.iter().all(|&p| !alive(p)).then_some(()));
    for &p in &old {
        let last = lines(&file).into_iter().rposition(|(_, q)| q == p).unwrap();
        assert_eq!(lines(&file)[last].0, "STOP", "worker {p}'s service wrote after it stopped");
    }
}

#[test]
fn a_stop_waits_for_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("beats");
    let mut server = server(1, &file, "");
    let pid = server.worker_pids()[0];
    wait_for(Duration::from_secs(5), "the service to beat", || (count(&file, "BEAT", pid) >= 1).then_some(()));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(count(&file, "STOP", pid), 1, "the service was asked to stop and waited for");
}

#[test]
fn a_panicking_service_is_logged_counted_and_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("beats");
    let server = server(1, &file, "service_panic_after = 2");
    let pid = server.worker_pids()[0];
    wait_for(Duration::from_secs(5), "the service to run a third time", || {
        (count(&file, "RUN", pid) >= 3).then_some(())
    });
    assert!(server.log().contains("app svc: service beat panicked"), "{}", server.log());
    assert!(server.log().contains("testkit's service was told to panic"), "the panic's message is logged");
    wait_for(Duration::from_secs(5), "service_panics in the metrics", || {
        let (_, metrics) = server.control("GET", "/metrics")?;
        metrics
            .lines()
            .any(|l| l.starts_with("fdtserver_app_events_total{app=\"svc\",event=\"service_panics\"}"))
            .then_some(())
    });
    assert_eq!(server.worker_pids(), vec![pid], "the worker lives on");
}

#[test]
fn a_singleton_service_runs_once_per_server_and_moves_at_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("beats");
    let server = server(2, &file, "service_singleton = true");
    wait_for(Duration::from_secs(5), "ten beats", || (lines(&file).len() >= 10).then_some(()));
    let runs: Vec<i32> = lines(&file).iter().filter(|(w, _)| w == "RUN").map(|(_, p)| *p).collect();
    assert_eq!(runs.len(), 1, "one instance per server: {:?}", lines(&file));
    let holder = runs[0];
    assert!(lines(&file).iter().all(|(_, p)| *p == holder));
    assert_eq!(server.reload().0, 200);
    let new = server.worker_pids();
    wait_for(Duration::from_secs(10), "a new worker to run it", || {
        lines(&file).iter().any(|(w, p)| w == "RUN" && new.contains(p)).then_some(())
    });
    let lines = lines(&file);
    let stop = lines.iter().position(|(w, p)| w == "STOP" && *p == holder).expect("the old instance stopped");
    let next = lines.iter().position(|(w, p)| w == "RUN" && new.contains(p)).unwrap();
    assert!(stop < next, "the new instance ran before the old one stopped: {lines:?}");
    assert_eq!(lines.iter().filter(|(w, _)| w == "RUN").count(), 2, "never two at once: {lines:?}");
}
