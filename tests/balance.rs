//! Connections spread evenly over the workers, and idle connections cost no thread.

mod util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use util::*;

/// Busiest over least busy worker; every worker must have served some.
fn skew(counts: &BTreeMap<i32, u64>, workers: &[i32]) -> f64 {
    let per: Vec<u64> = workers.iter().map(|p| counts.get(p).copied().unwrap_or(0)).collect();
    let (min, max) = (*per.iter().min().unwrap(), *per.iter().max().unwrap());
    assert!(min > 0, "a worker served nothing: {counts:?}");
    max as f64 / min as f64
}

#[test]
fn short_connections_spread_evenly_over_the_workers() {
    let server = TestServer::start(&Setup::new(2, 4).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let workers = server.worker_pids();
    let mut counts = BTreeMap::new();
    for _ in 0..400 {
        *counts.entry(http_get(addr).unwrap().worker_pid()).or_insert(0u64) += 1;
    }
    let skew = skew(&counts, &workers);
    assert!(skew <= 1.5, "busiest/least busy = {skew:.2}: {counts:?}");
}

#[test]
fn keep_alive_connections_spread_evenly_over_the_workers() {
    let server = TestServer::start(&Setup::new(2, 4).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let workers = server.worker_pids();
    // Like a load generator: all connections open at once, then every one works.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = HttpClient::connect(addr).unwrap();
                barrier.wait();
                let mut counts = BTreeMap::new();
                for _ in 0..50 {
                    *counts.entry(c.get("/").unwrap().worker_pid()).or_insert(0u64) += 1;
                }
                counts
            })
        })
        .collect();
    let mut counts = BTreeMap::new();
    for c in clients {
        for (pid, n) in c.join().unwrap() {
            *counts.entry(pid).or_insert(0) += n;
        }
    }
    let skew = skew(&counts, &workers);
    assert!(skew <= 1.5, "busiest/least busy = {skew:.2}: {counts:?}");
}

#[test]
fn idle_keep_alive_connections_take_no_thread() {
    let threads = 2;
    let server = TestServer::start(&Setup::new(1, threads).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let worker = server.worker_pids()[0];
    let tasks_before = std::fs::read_dir(format!("/proc/{worker}/task")).unwrap().count();
    // Many more idle keep-alive connections than handler threads.
    let idle: Vec<HttpClient> = (0..300)
        .map(|_| {
            let mut c = HttpClient::connect(addr).unwrap();
            assert_eq!(c.get("/").unwrap().status, 200);
            c
        })
        .collect();
    let started = Instant::now();
    assert_eq!(http_get(addr).unwrap().status, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "a new client waited {:?}", started.elapsed());
    let tasks_after = std::fs::read_dir(format!("/proc/{worker}/task")).unwrap().count();
    assert_eq!(tasks_after, tasks_before, "the worker started threads for idle connections");
    wait_for(READY_TIMEOUT, "the status to count 300 open connections", || {
        (server.status()["workers"][0]["connections"] == 300).then_some(())
    });
    drop(idle);
}
