//! Binary upgrade (`USR2`): a new master takes over the sockets without losing a connection,
//! runs the binary now at the path the old one was started from, and a new master that cannot
//! start leaves the old one serving as before.

mod util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

/// The status, asked over the control socket at `path`, whoever answers it.
fn status_at(server: &TestServer) -> Option<Value> {
    let (code, body) = server.control("GET", "/status")?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// Waits until a master other than `old` answers on the control socket; returns its status.
fn new_master(server: &TestServer, old: i32) -> Value {
    wait_for(READY_TIMEOUT, "a new master answering on the control socket", || {
        status_at(server).filter(|v| v["pid"].as_i64() != Some(old as i64))
    })
}

/// Stops a master that is not the test's child, and waits until it is gone.
fn stop_master(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_for(READY_TIMEOUT, "the new master to stop", || (!alive(pid)).then_some(()));
}

#[test]
fn upgrades_under_load_lose_no_request_and_change_the_master_pid() {
    let setup = Setup::new(2, 4)
        .app("hello", "hello", "")
        .app_at("echo", &plugin("echo"), "", "unix:echo.sock")
        .server("pidfile", "\"fdt.pid\"");
    let mut server = TestServer::start(&setup);
    let old = server.pid;
    let addr = server.addr("hello");
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(addr, 8, stop.clone());
    std::thread::sleep(Duration::from_millis(300)); // let the load build up

    server.signal(Signal::SIGUSR2);
    let signalled = std::time::Instant::now();
    let v = new_master(&server, old);
    let took_over = signalled.elapsed();
    let new = v["pid"].as_i64().unwrap() as i32;
    let status = server.wait_exit(READY_TIMEOUT);
    eprintln!("the new master answered {took_over:?} after USR2; the old one exited after {:?}", signalled.elapsed());
    assert!(status.success(), "the old master exited with {status}");
    std::thread::sleep(Duration::from_millis(300)); // load on the new master alone

    // The new master (not the test's child) upgrades in turn, still under load.
    server.wait_serving();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGUSR2).unwrap();
    let newer = new_master(&server, new)["pid"].as_i64().unwrap() as i32;
    wait_for(READY_TIMEOUT, "the second master to exit", || (!alive(new)).then_some(()));
    std::thread::sleep(Duration::from_millis(300));

    let total = stop_hammer(&stop, clients);
    assert!(total > 200, "only {total} requests were made");
    eprintln!("{total} requests, none failed");

    let v = server.wait_serving();
    assert_eq!(v["pid"], newer);
    assert_eq!(v["generation"], 3, "generation numbers go on across upgrades: {v}");
    assert!(v["listeners"].as_array().unwrap().iter().all(|l| l["origin"] == "upgrade"), "{v}");
    let pidfile = std::fs::read_to_string(server.dir.path().join("fdt.pid")).unwrap();
    assert_eq!(pidfile.trim(), newer.to_string());
    // The old master removed no file the new one serves.
    let echo = std::os::unix::net::UnixStream::connect(server.dir.path().join("echo.sock")).unwrap();
    let mut echo = std::io::BufReader::new(echo);
    std::io::Write::write_all(echo.get_mut(), b"still here\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut echo, &mut line).unwrap();
    assert_eq!(line, "still here\n");
    let log = server.log();
    assert!(log.contains(&format!("the new master (pid {new}) serves; draining and exiting")), "{log}");
    assert!(log.contains(&format!("the new master (pid {newer}) serves; draining and exiting")), "{log}");
    stop_master(newer);
}

#[test]
fn an_upgrade_whose_new_master_cannot_start_leaves_the_old_master_serving() {
    let setup = Setup::new(1, 1)
        .app("kit", "testkit", "tag = \"old\"")
        .app_at("echo", &plugin("echo"), "", "unix:echo.sock")
        .server("pidfile", "\"fdt.pid\"");
    let mut server = TestServer::start(&setup);
    let addr = server.addr("kit");
    let workers = server.worker_pids();
    let mut open = LineClient::connect(addr);
    assert_eq!(open.ask("TAG"), "old");

    // The new master loads this config: its app fails to start.
    let mut broken = setup.clone();
    broken.apps[0].settings = "fail_start = \"the new build is broken\"".into();
    server.write_config(&broken);
    server.signal(Signal::SIGUSR2);
    wait_for(READY_TIMEOUT, "the upgrade to fail", || {
        let log = server.log();
        (log.contains("binary upgrade failed") && log.contains("the new build is broken")).then_some(())
    });
    wait_for(READY_TIMEOUT, "the failed new master to be reaped", || {
        status_at(&server).filter(|v| v["upgrade"]["new_master"].is_null())
    });
    server.assert_running();
    let v = server.status();
    assert_eq!(v["pid"], server.pid, "{v}");
    assert_eq!(v["upgrade"]["failed"], 1, "{v}");
    assert_eq!(server.worker_pids(), workers, "the old workers were touched");
    assert_eq!(open.ask("TAG"), "old", "an open connection was lost");
    assert_eq!(LineClient::connect(addr).ask("TAG"), "old");
    assert!(server.dir.path().join("echo.sock").exists(), "the failed new master removed a socket file");
    assert_eq!(
        std::fs::read_to_string(server.dir.path().join("fdt.pid")).unwrap().trim(),
        server.pid.to_string(),
        "the pidfile changed"
    );

    // Fixed: the next upgrade succeeds. A conversation in progress keeps the old master
    // draining, which the new master's status shows.
    assert_eq!(open.ask("BUSY"), "BUSY");
    server.write_config(&setup);
    server.signal(Signal::SIGUSR2);
    let old = server.pid;
    let new = new_master(&server, old)["pid"].as_i64().unwrap() as i32;
    assert_eq!(server.status()["upgrade"]["old_master_draining"], old);
    let (_, table, _) = server.cli(&["status"]);
    assert!(table.contains(&format!("the old master (pid {old}) is still draining")), "{table}");
    assert_eq!(open.ask("GEN"), "1", "the old worker serves its conversation to the end");
    assert_eq!(open.ask("IDLE"), "IDLE");
    assert!(server.wait_exit(READY_TIMEOUT).success());
    // The old worker drained: it closed the idle connection gently (EOF, not a reset).
    assert_eq!(open.recv(), None);
    wait_for(READY_TIMEOUT, "the new master to see the old one gone", || {
        server.status()["upgrade"]["old_master_draining"].is_null().then_some(())
    });
    wait_for(READY_TIMEOUT, "the new master's workers to serve", || {
        (LineClient::connect(addr).ask("GEN") == "2").then_some(())
    });
    stop_master(new);
}

#[test]
fn usr2_executes_the_binary_now_at_the_path_the_master_was_started_from_or_fails_harmlessly() {
    let bin_dir = tempfile::tempdir().unwrap();
    let exe = bin_dir.path().join("fdtserver");
    std::fs::copy(BIN, &exe).unwrap();
    let exe_for_start = exe.clone();
    let mut server = TestServer::start_with(&Setup::new(1, 1).app("kit", "testkit", ""), |config| {
        let mut cmd = std::process::Command::new(&exe_for_start);
        cmd.arg("--config").arg(config);
        cmd
    });
    // No binary at the path: the upgrade fails at once, and nothing changes.
    std::fs::remove_file(&exe).unwrap();
    server.signal(Signal::SIGUSR2);
    wait_for(READY_TIMEOUT, "the upgrade to fail", || {
        server.log().contains("binary upgrade failed: cannot execute").then_some(())
    });
    server.assert_running();
    assert_eq!(server.status()["pid"], server.pid);
    // A deploy: the new build is renamed into place.
    let staged = bin_dir.path().join("fdtserver.new");
    std::fs::copy(BIN, &staged).unwrap();
    std::fs::rename(&staged, &exe).unwrap();
    let old = server.pid;
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, old)["pid"].as_i64().unwrap() as i32;
    assert!(server.wait_exit(READY_TIMEOUT).success());
    let running = std::fs::metadata(format!("/proc/{new}/exe")).unwrap();
    let installed = std::fs::metadata(&exe).unwrap();
    assert_eq!(running.ino(), installed.ino(), "the new master does not run the file now at {}", exe.display());
    assert_eq!(std::fs::read_link(format!("/proc/{new}/exe")).unwrap(), Path::new(&exe));
    server.wait_serving();
    let threads = std::fs::read_dir(format!("/proc/{new}/task")).unwrap().count();
    assert_eq!(threads, 1, "the new master must be single-threaded");
    stop_master(new);
}
