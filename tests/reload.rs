//! Reloads: a new generation takes over without losing a connection, and a broken one never
//! takes the server down.

mod util;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

#[test]
fn reloads_while_clients_hammer_the_server_lose_no_request() {
    let server = TestServer::start(&Setup::new(2, 4).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let stop = Arc::new(AtomicBool::new(false));
    let clients = hammer(addr, 8, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..5 {
        let (code, body) = server.reload();
        assert_eq!(code, 200, "reload {round} failed: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let total = stop_hammer(&stop, clients);
    assert!(total > 200, "only {total} requests were made");
    assert_eq!(server.generation(), 6);
}

#[test]
fn hup_reloads_and_the_new_generation_serves_new_settings() {
    let mut setup = Setup::new(1, 2).app("kit", "testkit", "tag = \"one\"");
    let server = TestServer::start(&setup);
    let addr = server.addr("kit");
    assert_eq!(LineClient::connect(addr).ask("TAG"), "one");
    setup.apps[0].settings = "tag = \"two\"".into();
    server.write_config(&setup);
    server.signal(Signal::SIGHUP);
    wait_for(READY_TIMEOUT, "generation 2", || (server.generation() == 2).then_some(()));
    server.wait_serving();
    assert_eq!(LineClient::connect(addr).ask("TAG"), "two");
    assert_eq!(LineClient::connect(addr).ask("GEN"), "2");
}

/// Rewrites the config with `broken` as the kit app, reloads, and checks that the reload is
/// refused with a reason containing `expect` while generation 1 goes on serving.
fn assert_reload_refused(settings_or_plugin: (&str, Option<&std::path::Path>), expect: &str) {
    let setup = Setup::new(2, 2).app("kit", "testkit", "tag = \"old\"");
    let server = TestServer::start(&setup);
    let addr = server.addr("kit");
    let before = server.worker_pids();
    let mut open = LineClient::connect(addr);
    assert_eq!(open.ask("TAG"), "old");

    let mut broken = setup.clone();
    broken.apps[0].settings = settings_or_plugin.0.into();
    if let Some(p) = settings_or_plugin.1 {
        broken.apps[0].plugin = p.to_path_buf();
    }
    server.write_config(&broken);
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(reason.contains(expect), "reason {reason:?} does not contain {expect:?}");
    let (code, _, err) = server.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains(expect), "{err}");

    assert_eq!(server.generation(), 1);
    assert_eq!(server.worker_pids(), before, "the old workers were touched");
    assert_eq!(open.ask("TAG"), "old", "an open connection was lost");
    assert_eq!(LineClient::connect(addr).ask("TAG"), "old", "new connections are not served");
    assert_eq!(server.status()["reloads"]["failed"], 2);
}

#[test]
fn a_reload_to_an_app_whose_start_fails_keeps_the_old_generation() {
    assert_reload_refused(("fail_start = \"database is down\"", None), "database is down");
}

#[test]
fn a_reload_to_an_app_that_panics_at_start_keeps_the_old_generation() {
    assert_reload_refused(("panic_at_start = true", None), "panicked");
}

#[test]
fn a_reload_to_a_missing_plugin_keeps_the_old_generation() {
    assert_reload_refused(("", Some(std::path::Path::new("/nonexistent/libfdt_gone.so"))), "libfdt_gone.so");
}

#[test]
fn a_reload_to_a_file_that_is_not_a_library_keeps_the_old_generation() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfdt_fake.so");
    std::fs::write(&fake, "not a library").unwrap();
    assert_reload_refused(("", Some(&fake)), "not a shared library");
}

#[test]
fn a_reload_with_a_toml_error_names_the_file_and_line_and_changes_nothing() {
    let setup = Setup::new(1, 1).app("echo", "echo", "");
    let server = TestServer::start(&setup);
    let text = setup.render(server.dir.path()).replace("workers = 1", "workers = 1\nwrokers = 2");
    std::fs::write(&server.config, text).unwrap();
    let (code, body) = server.reload();
    assert_eq!(code, 409);
    let reason = body["error"].as_str().unwrap();
    assert!(reason.contains("fdt.toml:") && reason.contains("wrokers"), "{reason}");
    assert_eq!(server.generation(), 1);
}

#[test]
fn a_generation_not_ready_within_boot_timeout_is_abandoned() {
    let setup = Setup::new(1, 1).app("kit", "testkit", "").server("boot_timeout", "1");
    let server = TestServer::start(&setup);
    let mut slow = setup.clone();
    slow.apps[0].settings = "start_delay_ms = 5000".into();
    server.write_config(&slow);
    let started = std::time::Instant::now();
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("boot_timeout"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(server.generation(), 1);
    assert_eq!(LineClient::connect(server.addr("kit")).ask("GEN"), "1");
}

#[test]
fn overwriting_a_plugin_file_in_place_changes_nothing_until_the_next_reload() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("libapp.so");
    std::fs::copy(plugin("testkit"), &app).unwrap();
    let server = TestServer::start(&Setup::new(1, 1).app_at("app", &app, "", "127.0.0.1:0"));
    let addr = server.addr("app");
    let pid = server.worker_pids()[0];
    // A deploy that copies over the running file (the new file is echo, which answers
    // "PID" with "PID"; testkit answers with a number).
    std::fs::write(&app, std::fs::read(plugin("echo")).unwrap()).unwrap();
    assert_eq!(LineClient::connect(addr).ask("PID"), pid.to_string(), "the running worker broke");
    // A worker respawned in the same generation still loads the generation's code.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let respawned = wait_for(READY_TIMEOUT, "a replacement worker", || {
        let pids = server.worker_pids();
        (pids.len() == 1 && pids[0] != pid).then(|| pids[0])
    });
    server.wait_serving();
    assert_eq!(LineClient::connect(addr).ask("PID"), respawned.to_string(), "the respawned worker runs new code");
    // The next reload picks the new file up.
    assert_eq!(server.reload().0, 200);
    assert_eq!(LineClient::connect(addr).ask("PID"), "PID");
}

#[test]
fn an_idle_keep_alive_connection_moves_to_the_new_generation_on_a_reload() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let mut idle = HttpClient::connect(server.addr("hello")).unwrap();
    let old = idle.get("/").unwrap().worker_pid();
    assert_eq!(server.reload().0, 200);
    // Handed to the new worker between requests (so the old one has nothing left, and exits):
    // the client notices nothing.
    wait_for(Duration::from_secs(5), "the old worker to exit", || (!alive(old)).then_some(()));
    let r = idle.get("/").expect("the idle connection was closed");
    assert_eq!(r.status, 200);
    assert_ne!(r.worker_pid(), old, "served by the new generation");
    assert!(!r.closes());
}

#[test]
fn an_idle_keep_alive_connection_is_closed_gently_by_a_stop() {
    let mut server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let mut idle = HttpClient::connect(server.addr("hello")).unwrap();
    assert_eq!(idle.get("/").unwrap().status, 200);
    server.signal(Signal::SIGTERM);
    // No one takes it: closed between requests with a FIN (EOF), not a reset.
    let mut buf = [0u8; 16];
    match idle.stream().read(&mut buf) {
        Ok(0) => {}
        other => panic!("expected a clean EOF, got {other:?}"),
    }
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_request_half_sent_when_the_drain_begins_is_answered_and_the_next_by_the_new_generation() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let old = server.worker_pids()[0];
    let mut c = HttpClient::connect(server.addr("hello")).unwrap();
    c.stream().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(server.reload().0, 200);
    std::thread::sleep(Duration::from_millis(400)); // longer than the drain's idle grace
    c.stream().write_all(b"\r\n").unwrap();
    let r = c.read_response().expect("the half-sent request was dropped");
    assert_eq!(r.status, 200);
    assert_eq!(r.worker_pid(), old, "the old worker finishes what it began");
    assert!(!r.closes(), "and then hands the connection on");
    wait_for(Duration::from_secs(5), "the old worker to exit", || (!alive(old)).then_some(()));
    let next = c.get("/").expect("the connection was closed");
    assert_ne!(next.worker_pid(), old);
}

#[test]
fn a_conversation_in_progress_outlives_the_reload_until_it_ends() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", ""));
    let mut c = LineClient::connect(server.addr("kit"));
    assert_eq!(c.ask("BUSY"), "BUSY");
    assert_eq!(server.reload().0, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.ask("GEN"), "1", "the old worker must still serve its conversation");
    assert_eq!(c.ask("DRAINING"), "yes");
    assert_eq!(c.ask("IDLE"), "IDLE");
    // Between requests now: the draining worker closes it.
    wait_for(Duration::from_secs(2), "the idle connection to be closed", || c.recv().is_none().then_some(()));
    assert_eq!(LineClient::connect(server.addr("kit")).ask("GEN"), "2");
}

#[test]
fn a_reload_can_add_a_listener() {
    let setup = Setup::new(1, 1).app("echo", "echo", "");
    let server = TestServer::start(&setup);
    let with_two = setup.clone().app("kit", "testkit", "");
    server.write_config(&with_two);
    assert_eq!(server.reload().0, 200);
    assert_eq!(LineClient::connect(server.addr("kit")).ask("GEN"), "2");
    assert_eq!(LineClient::connect(server.addr("echo")).ask("x"), "x");
}

#[test]
fn old_workers_exit_soon_after_a_reload_when_idle() {
    let server = TestServer::start(&Setup::new(2, 2).app("echo", "echo", ""));
    let old = server.worker_pids();
    assert_eq!(server.reload().0, 200);
    wait_for(Duration::from_secs(1), "the old generation to exit", || old.iter().all(|&p| !alive(p)).then_some(()));
    assert_eq!(LineClient::connect(server.addr("echo")).ask("still here"), "still here");
}

#[test]
fn a_reload_asked_during_another_one_reads_the_config_as_it_is_then() {
    let mut setup = Setup::new(1, 1).app("kit", "testkit", "tag = \"one\"\nstart_delay_ms = 800");
    let server = TestServer::start(&setup);
    let addr = server.addr("kit");
    setup.apps[0].settings = "tag = \"two\"\nstart_delay_ms = 800".into();
    server.write_config(&setup);
    let first = {
        let control = server.control_socket();
        std::thread::spawn(move || {
            let mut s = std::os::unix::net::UnixStream::connect(control).unwrap();
            std::io::Write::write_all(&mut s, b"POST /reload HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
            answer
        })
    };
    wait_for(READY_TIMEOUT, "the first reload to boot", || {
        server.status()["generations"].as_array().unwrap().iter().any(|g| g["state"] == "booting").then_some(())
    });
    setup.apps[0].settings = "tag = \"three\"\nstart_delay_ms = 800".into();
    server.write_config(&setup);
    let (code, body) = server.reload();
    assert_eq!(code, 200, "{body}");
    assert!(first.join().unwrap().starts_with("HTTP/1.1 200"));
    assert_eq!(body["generation"], 3, "the second reload must be a generation of its own");
    assert_eq!(LineClient::connect(addr).ask("TAG"), "three");
}

#[test]
fn a_reload_with_an_unchanged_plugin_reuses_its_copy_and_a_rewritten_one_is_pinned_anew() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("libapp.so");
    std::fs::copy(plugin("testkit"), &app).unwrap();
    let server = TestServer::start(&Setup::new(1, 1).app_at("app", &app, "", "127.0.0.1:0"));
    let pinned = format!("app app: plugin {} pinned as ", app.display());
    let reused = format!("app app: plugin {} unchanged: reusing its pinned copy ", app.display());
    // The copy named in the last line of the log that starts with `prefix`.
    let copy = |prefix: &str| -> Option<String> {
        let log = server.log();
        let at = log.rfind(prefix)? + prefix.len();
        Some(log[at..].lines().next()?.to_string())
    };
    let first = copy(&pinned).unwrap_or_else(|| panic!("the plugin was not pinned:\n{}", server.log()));
    // Pinning runs in a child process: the master learns from its answer what it pinned, so
    // the next reload's child knows the file and does not read it again.
    assert_eq!(server.reload().0, 200);
    assert_eq!(copy(&reused).as_deref(), Some(first.as_str()), "{}", server.log());
    assert_eq!(server.reload().0, 200);
    assert_eq!(server.log().matches(&reused).count(), 2, "{}", server.log());
    // A new build of the file: pinned anew.
    std::fs::write(&app, std::fs::read(plugin("echo")).unwrap()).unwrap();
    assert_eq!(server.reload().0, 200);
    let second = copy(&pinned).unwrap();
    assert_ne!(second, first, "{}", server.log());
    assert_eq!(server.log().matches(&pinned).count(), 2, "{}", server.log());
    assert_eq!(LineClient::connect(server.addr("app")).ask("PID"), "PID", "the new file is not served");
}
