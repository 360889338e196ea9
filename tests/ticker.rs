//! The `ticker` app: a service no `[[listen]]` names, ticking in every worker, or — with
//! `singleton = true` — in exactly one worker of the server at a time, also across a worker's
//! death and a reload.

mod util;

use std::path::Path;
use std::time::Duration;

use util::*;

/// A server of `workers` workers running `ticker` (no listener) into `file` every 50 ms.
fn ticker(workers: usize, file: &Path, singleton: bool) -> TestServer {
    let settings = format!("file = \"{}\"\ninterval_ms = 50\nsingleton = {singleton}", file.display());
    TestServer::start(&Setup::new(workers, 2).app_without_listener("ticker", "ticker", &settings))
}

/// Each line's (pid, generation), in file order.
fn ticks(file: &Path) -> Vec<(i32, u64)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .map(|l| {
            let field = |k: &str| l.split(' ').find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{l:?}"));
            (field("pid=").parse().unwrap(), field("generation=").parse().unwrap())
        })
        .collect()
}

/// The pids in file order, each run of equal pids once: a singleton never comes back to a
/// worker it left, so no pid may appear twice here.
fn runs(ticks: &[(i32, u64)]) -> Vec<i32> {
    let mut runs: Vec<i32> = Vec::new();
    for &(pid, _) in ticks {
        if runs.last() != Some(&pid) {
            runs.push(pid);
        }
    }
    runs
}

fn assert_one_at_a_time(file: &Path) -> Vec<i32> {
    let ticks = ticks(file);
    let runs = runs(&ticks);
    let mut seen = runs.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), runs.len(), "two workers ticked at the same time: {runs:?}");
    runs
}

#[test]
fn without_singleton_every_worker_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let server = ticker(2, &file, false);
    let mut workers = server.worker_pids();
    workers.sort();
    wait_for(Duration::from_secs(5), "both workers to tick", || {
        let mut pids: Vec<i32> = ticks(&file).iter().map(|t| t.0).collect();
        pids.sort();
        pids.dedup();
        (pids == workers).then_some(())
    });
}

#[test]
fn a_singleton_ticks_in_one_worker_and_moves_when_that_worker_dies() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let server = ticker(2, &file, true);
    wait_for(Duration::from_secs(5), "ten ticks", || (ticks(&file).len() >= 10).then_some(()));
    let holder = assert_one_at_a_time(&file)[0];
    assert!(server.worker_pids().contains(&holder));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holder), nix::sys::signal::Signal::SIGKILL).unwrap();
    let before = ticks(&file).len();
    let next = wait_for(Duration::from_secs(5), "another worker to take over", || {
        let ticks = ticks(&file);
        ticks[before..].iter().map(|t| t.0).find(|&p| p != holder)
    });
    wait_for(Duration::from_secs(5), "ten more ticks", || (ticks(&file).len() >= before + 10).then_some(()));
    let runs = assert_one_at_a_time(&file);
    assert_eq!(runs, vec![holder, next], "the singleton moved once, to one worker");
}

#[test]
fn a_singleton_moves_to_the_new_generation_at_a_reload_never_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ticks");
    let server = ticker(2, &file, true);
    wait_for(Duration::from_secs(5), "five ticks", || (ticks(&file).len() >= 5).then_some(()));
    assert_eq!(server.reload().0, 200);
    wait_for(Duration::from_secs(10), "the new generation to tick", || {
        ticks(&file).iter().any(|t| t.1 == 2).then_some(())
    });
    wait_for(Duration::from_secs(5), "five more ticks", || {
        (ticks(&file).iter().filter(|t| t.1 == 2).count() >= 5).then_some(())
    });
    let ticks = ticks(&file);
    let first_new = ticks.iter().position(|t| t.1 == 2).unwrap();
    assert!(ticks[first_new..].iter().all(|t| t.1 == 2), "the old generation ticked after the new one began");
    assert_one_at_a_time(&file);
}
