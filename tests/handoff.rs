//! Reloads that no client notices: a connection between requests is handed to the new
//! generation (`SCM_RIGHTS`), with its session, and serves its next request there; what cannot
//! be handed off stays with its old worker.

mod util;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use util::*;

fn metric_sum(server: &TestServer, name: &str) -> f64 {
    let text = server.control("GET", "/metrics").expect("metrics").1;
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Waits (at most `within`) until none of `pids` runs.
fn gone(pids: &[i32], within: Duration, what: &str) {
    wait_for(within, what, || pids.iter().all(|p| !alive(*p)).then_some(()));
}

#[test]
fn idle_and_busy_keep_alive_connections_live_through_ten_reloads_and_old_workers_leave_at_once() {
    let server = TestServer::start(&Setup::new(2, 4).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let mut idle: Vec<HttpClient> = (0..200).map(|_| HttpClient::connect(addr).unwrap()).collect();
    for c in &mut idle {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    // Four clients that never stop asking, on one connection each.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut c = HttpClient::connect(addr).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let r = c.get("/").map_err(|e| format!("a busy connection failed: {e}"))?;
                    if r.status != 200 || r.closes() {
                        return Err(format!("a busy connection got {} (closes: {})", r.status, r.closes()));
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let mut even_rounds = 0;
    for round in 0..10 {
        let old = server.worker_pids();
        let (code, _) = server.reload();
        assert_eq!(code, 200, "reload {round}");
        let reloaded = Instant::now();
        gone(&old, Duration::from_secs(2), "the old workers to exit (every connection handed off)");
        let took = reloaded.elapsed();
        let new = server.worker_pids();
        let mut per_worker = std::collections::BTreeMap::new();
        for (i, c) in idle.iter_mut().enumerate() {
            let r = c.get("/").unwrap_or_else(|e| panic!("round {round}: idle connection {i} was closed: {e}"));
            assert_eq!(r.status, 200);
            assert!(
                new.contains(&r.worker_pid()),
                "round {round}: answered by {}, not the new generation",
                r.worker_pid()
            );
            *per_worker.entry(r.worker_pid()).or_insert(0) += 1;
        }
        // Spread over the new workers (round robin), as new connections are.
        if per_worker.len() == 2 && per_worker.values().all(|n| *n >= 70) {
            even_rounds += 1;
        } else {
            eprintln!(
                "round {round}: uneven {per_worker:?}\n{}",
                server
                    .log()
                    .lines()
                    .filter(|l| l.contains("cannot") || l.contains("no worker takes") || l.contains("handed"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        eprintln!("reload {round}: old workers gone {took:?} after the reload answered; {per_worker:?} new {new:?}");
    }
    assert_eq!(even_rounds, 10, "the connections were spread evenly in only {even_rounds} of 10 rounds");
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        if let Err(e) = b.join().unwrap() {
            let kept: Vec<&str> = server.log().lines().filter(|l| l.contains("not handed off")).map(|_| "").collect();
            panic!(
                "{e}; the log says:\n{}",
                server
                    .log()
                    .lines()
                    .filter(|l| l.contains("handed")
                        || l.contains("take connections")
                        || l.contains("WARN")
                        || l.contains("ERROR"))
                    .collect::<Vec<_>>()
                    .join("\n")
                    + &kept.join("")
            );
        }
    }
    assert!(served.load(Ordering::Relaxed) > 100);
    assert_eq!(metric_sum(&server, "fdtserver_connections_closed_total{reason=\"drained\"}"), 0.0);
    assert!(metric_sum(&server, "fdtserver_connections_handed_off_total") >= 2040.0);
}

#[test]
fn an_echo_session_and_a_half_sent_line_cross_a_reload_with_new_settings() {
    let server = TestServer::start(&Setup::new(1, 2).app("echo", "echo", ""));
    let addr = server.addr("echo");
    let mut idle = LineClient::connect(addr);
    assert_eq!(idle.ask("before"), "before");
    let mut half = LineClient::connect(addr);
    half.stream().write_all(b"half a ").unwrap();
    let old = server.worker_pids();
    server.write_config(&Setup::new(1, 2).app("echo", "echo", "delay_ms = 1"));
    assert_eq!(server.reload().0, 200);
    assert_eq!(idle.ask("after"), "after", "the idle connection moved and works");
    half.stream().write_all(b"line\n").unwrap();
    assert_eq!(half.recv().as_deref(), Some("half a line"), "completed and answered");
    assert_eq!(half.ask("then more"), "then more");
    gone(&old, Duration::from_secs(3), "the old worker to exit");
    assert_eq!(idle.ask("still"), "still");
}

#[test]
fn echo_clients_are_not_handed_to_hello_when_the_port_changes_app() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = TestServer::start(&Setup::new(1, 2).app_at("port", &plugin("echo"), "", &port.to_string()));
    let addr = server.addr("port");
    let mut c = LineClient::connect(addr);
    assert_eq!(c.ask("one"), "one");
    let old = server.worker_pids();
    // The same address now served by hello: echo's clients stay with the old code.
    let switched = Setup::new(1, 2).app_at("port", &plugin("hello"), "", &addr.to_string());
    server.write_config(&switched);
    assert_eq!(server.reload().0, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.ask("two"), "two", "still echo, on the old worker");
    assert!(old.iter().all(|p| alive(*p)));
}

#[test]
fn a_chat_client_keeps_its_nick_across_a_reload_and_the_count_shows() {
    let server = TestServer::start(&Setup::new(2, 2).app("chat", "chat", ""));
    let mut a = LineClient::connect(server.addr("chat"));
    let mut b = LineClient::connect(server.addr("chat"));
    a.recv();
    b.recv();
    assert_eq!(a.ask("NICK ann"), "OK");
    let old = server.worker_pids();
    assert_eq!(server.reload().0, 200);
    gone(&old, Duration::from_secs(3), "the old workers to exit");
    a.send("moved");
    assert_eq!(b.recv().as_deref(), Some("ann: moved"), "the nick came along, and b gets lines");
    wait_for(Duration::from_secs(5), "the count in the metrics", || {
        (metric_sum(&server, "fdtserver_connections_handed_off_total") >= 2.0).then_some(())
    });
}

#[test]
fn idle_connections_move_to_the_new_master_on_a_binary_upgrade_and_to_a_sibling_on_ttou() {
    use nix::sys::signal::Signal;
    let mut server = TestServer::start(&Setup::new(2, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let mut idle: Vec<HttpClient> = (0..10).map(|_| HttpClient::connect(addr).unwrap()).collect();
    for c in &mut idle {
        assert_eq!(c.get("/").unwrap().status, 200);
    }
    // TTOU: one worker fewer; its connections go to the one that stays.
    let before = server.worker_pids();
    server.signal(Signal::SIGTTOU);
    let left = wait_for(Duration::from_secs(5), "one worker left", || {
        let pids = server.worker_pids();
        (pids.len() == 1 && before.iter().filter(|p| alive(**p)).count() == 1).then_some(pids)
    });
    for c in &mut idle {
        let r = c.get("/").expect("a connection of the removed worker was closed");
        assert_eq!(r.worker_pid(), left[0]);
    }
    // USR2: the new master's workers take them; the old master exits at once.
    let old_master = server.pid;
    server.signal(Signal::SIGUSR2);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success());
    let v = wait_for(READY_TIMEOUT, "the new master", || {
        let (code, body) = server.control("GET", "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["pid"].as_i64() != Some(old_master as i64)).then_some(v)
    });
    let new_workers: Vec<i32> =
        v["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect();
    for c in &mut idle {
        let r = c.get("/").expect("a connection was closed by the upgrade");
        assert!(new_workers.contains(&r.worker_pid()), "served by {} (new workers {new_workers:?})", r.worker_pid());
    }
    let new_master = v["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new_master), Signal::SIGTERM).unwrap();
    wait_for(READY_TIMEOUT, "the new master to stop", || (!alive(new_master)).then_some(()));
}
