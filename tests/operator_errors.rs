//! What an operator sees when something is wrong: the CLI without a config or without a
//! server, a server that cannot start (address in use, unusable TMPDIR or access_log), reloads
//! refused while the server stops or upgrades, a stop that has to kill a stuck worker, and
//! `USR1` when a log cannot be reopened. Each test ends with the master exiting on its own.

mod util;

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use util::*;

/// Stops the server over the control socket and waits until the master exited successfully.
fn stop(server: &mut TestServer) {
    assert_eq!(server.control("POST", "/stop").map(|(code, _)| code), Some(202));
    assert!(server.wait_exit(READY_TIMEOUT).success(), "{}", server.log());
}

/// A config for a server that is not running: (its directory, the config file).
fn idle_config() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fdt.toml");
    std::fs::write(&config, Setup::new(1, 1).app("echo", "echo", "").render(dir.path())).unwrap();
    (dir, config)
}

#[test]
fn a_command_without_config_says_that_config_is_required() {
    for args in [&["status"][..], &["reload"], &[]] {
        let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "fdtserver: --config FILE is required (for example: fdtserver --config config/example.toml)\n"
        );
    }
}

#[test]
fn status_reload_and_stop_with_no_server_running_say_so_and_fail() {
    let (dir, config) = idle_config();
    let socket = dir.path().join("control.sock");
    for command in ["status", "reload", "stop"] {
        let (code, out, err) = cli(&[command], &config);
        assert_eq!(code, 1, "{command}: {out}{err}");
        assert!(
            err.starts_with(&format!("fdtserver: no fdtserver is answering on {} (", socket.display())),
            "{command}: {err}"
        );
        assert_eq!(out, "", "{command}");
    }
}

#[test]
fn status_reload_and_stop_with_an_invalid_config_print_its_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fdt.toml");
    std::fs::write(&config, "[server]\nworkers = \"many\"\n").unwrap();
    for command in ["status", "reload", "stop"] {
        let (code, out, err) = cli(&[command], &config);
        assert_eq!(code, 1, "{command}: {out}{err}");
        let problem = format!("fdtserver: {}:2: invalid type: string \"many\"", config.display());
        assert!(err.starts_with(&problem), "{command}: {err}");
        assert!(!err.contains("answering"), "{command} did not get as far as the socket: {err}");
    }
}

#[test]
fn reload_from_the_cli_reports_the_generation_now_serving_and_stop_waits_for_the_exit() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let (code, out, err) = server.cli(&["reload"]);
    assert_eq!((code, out.as_str()), (0, "reloaded: generation 2 is serving\n"), "{err}");
    assert_eq!(server.generation(), 2);
    let (code, out, err) = server.cli(&["stop"]);
    assert_eq!((code, out.as_str()), (0, "stopped\n"), "{err}");
    assert!(server.wait_exit(READY_TIMEOUT).success());
}

#[test]
fn check_says_when_an_app_crashes_the_check_process() {
    let dir = tempfile::tempdir().unwrap();
    // Its constructor aborts as soon as the library is loaded.
    let so = gcc_shared(
        dir.path(),
        "libcrash.so",
        "#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n",
    );
    let config = dir.path().join("fdt.toml");
    std::fs::write(&config, Setup::new(1, 1).app_at("crash", &so, "", "127.0.0.1:0").render(dir.path())).unwrap();
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("fdtserver: an app crashed the check process (signal: 6 (SIGABRT)"), "{err}");
    assert!(!out.contains(": ok"), "{out}");
}

#[test]
fn the_check_child_does_nothing_once_its_check_process_is_gone() {
    let (_dir, config) = idle_config();
    // Started for a `check` process that is not its parent (it exited): no app is started.
    let out = Command::new(BIN)
        .args(["__check-apps", "--config"])
        .arg(&config)
        .env("FDTSERVER_CHECK_PARENT", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "no app was started");
    // Run by hand (no check process), it reads the config first, as `check` does.
    std::fs::write(&config, "[server]\nworkers = \"many\"\n").unwrap();
    let out = Command::new(BIN).args(["__check-apps", "--config"]).arg(&config).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("fdtserver: {}:2: invalid type", config.display())), "{err}");
}

#[test]
fn check_starts_an_app_once_however_many_listeners_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let setup =
        Setup::new(1, 1).app("echo", "echo", "").extra("[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"echo\"\n");
    let config = setup.write_to(dir.path());
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("app echo: ok").count(), 1, "{out}");
    assert!(out.ends_with(&format!("{}: ok\n", config.display())), "{out}");
}

#[test]
fn an_address_in_use_stops_the_start_and_is_shown_on_the_terminal_when_logging_to_a_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let logs = tempfile::tempdir().unwrap();
    let error_log = logs.path().join("error.log");
    let setup = Setup::new(1, 1)
        .app_at("echo", &plugin("echo"), "", &address)
        .server("error_log", &format!("\"{}\"", error_log.display()));
    let mut server = TestServer::spawn(&setup);
    assert_eq!(server.wait_exit(READY_TIMEOUT).code(), Some(1));
    let line = format!("cannot listen on {address}: ");
    // On the terminal (stderr), since the log goes to a file, and in that file.
    assert!(server.log().contains(&format!("fdtserver: {line}")), "{}", server.log());
    let logged = std::fs::read_to_string(&error_log).unwrap();
    assert!(logged.contains(&line), "{logged}");
    assert!(!server.control_socket().exists(), "a failed start leaves no control socket behind");
}

#[test]
fn an_unusable_tmpdir_stops_the_start_with_a_clear_reason_and_no_control_socket_left() {
    let dir = tempfile::tempdir().unwrap();
    // TMPDIR names a regular file: no runtime directory can be made in it.
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut server = TestServer::spawn_with(&Setup::new(1, 1).app("echo", "echo", ""), |config| {
        let mut cmd = server_command(config);
        cmd.env("TMPDIR", &not_a_dir);
        cmd
    });
    assert_eq!(server.wait_exit(READY_TIMEOUT).code(), Some(1));
    let log = server.log();
    assert!(log.contains("cannot set up the master: cannot create the runtime directory: "), "{log}");
    assert!(!server.control_socket().exists(), "the control socket was removed");
}

#[test]
fn an_access_log_that_cannot_be_opened_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("missing-dir").join("access.log");
    let error_log = dir.path().join("error.log");
    let setup = Setup::new(1, 1)
        .app("echo", "echo", "")
        .server("access_log", &format!("\"{}\"", access.display()))
        .server("error_log", &format!("\"{}\"", error_log.display()));
    let mut server = TestServer::spawn(&setup);
    assert_eq!(server.wait_exit(READY_TIMEOUT).code(), Some(1));
    let expected = format!("cannot open access_log {}: ", access.display());
    assert!(server.log().contains(&format!("fdtserver: {expected}")), "{}", server.log());
    assert!(std::fs::read_to_string(&error_log).unwrap().contains(&expected));
}

#[test]
fn a_heartbeat_timeout_shorter_than_two_heartbeats_is_raised_with_a_warning() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", "").server("heartbeat_timeout", "0.1"));
    assert!(
        server.log().contains("heartbeat_timeout 0.1 s is shorter than two heartbeats; using "),
        "{}",
        server.log()
    );
    // The worker is not killed for missing such a short deadline.
    let pids = server.worker_pids();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.worker_pids(), pids);
    assert_eq!(server.status()["worker_kills"]["heartbeat_timeout"], 0);
    stop(&mut server);
}

#[test]
fn a_reload_asked_while_the_server_drains_to_stop_is_refused() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", ""));
    let mut busy = LineClient::connect(server.addr("kit"));
    assert_eq!(busy.ask("BUSY"), "BUSY");
    assert_eq!(server.control("POST", "/stop").map(|(code, _)| code), Some(202));
    let (code, body) = server.reload();
    assert_eq!((code, &body["error"]), (409, &Value::from("the server is stopping")), "{body}");
    server.assert_running();
    // The conversation in progress ends; then the server exits.
    assert_eq!(busy.ask("IDLE"), "IDLE");
    assert!(server.wait_exit(READY_TIMEOUT).success(), "{}", server.log());
}

#[test]
fn a_reload_still_booting_when_the_server_stops_is_answered_that_the_server_is_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    let setup = Setup::new(1, 1).app("kit", "testkit", &format!("hang_at_start_if = \"{}\"", hang.display()));
    let mut server = TestServer::start(&setup);
    // The next generation's app hangs at start.
    std::fs::write(&hang, "").unwrap();
    let socket = server.control_socket();
    let waiting = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        std::io::Write::write_all(&mut s, b"POST /reload HTTP/1.1\r\nHost: fdt\r\n\r\n").unwrap();
        let mut raw = String::new();
        std::io::Read::read_to_string(&mut s, &mut raw).unwrap();
        raw
    });
    wait_for(READY_TIMEOUT, "generation 2 to be booting", || {
        let v = server.status();
        v["generations"].as_array()?.iter().any(|g| g["id"] == 2 && g["state"] == "booting").then_some(())
    });
    assert_eq!(server.control("POST", "/stop").map(|(code, _)| code), Some(202));
    let answer = waiting.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 409 Conflict\r\n"), "{answer}");
    assert!(answer.contains("\"error\": \"the server is stopping\""), "{answer}");
    assert!(server.wait_exit(READY_TIMEOUT).success(), "{}", server.log());
    assert!(server.log().contains("generation 2 abandoned: the server is stopping"), "{}", server.log());
}

#[test]
fn a_fast_stop_kills_a_frozen_worker_after_its_grace() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let frozen = server.worker_pids()[0];
    // Frozen (SIGSTOP, or stuck in the kernel): it cannot read the master's Stop.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen), Signal::SIGSTOP).unwrap();
    let asked = std::time::Instant::now();
    server.signal(Signal::SIGQUIT);
    assert!(server.wait_exit(READY_TIMEOUT).success(), "{}", server.log());
    assert!(asked.elapsed() >= Duration::from_millis(1500), "the worker had its grace first");
    assert!(
        server.log().contains(&format!("worker pid {frozen} did not stop in time; killing it")),
        "{}",
        server.log()
    );
    assert!(!alive(frozen));
}

#[test]
fn usr1_with_no_log_file_says_there_is_nothing_to_reopen_and_keeps_serving() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    server.signal(Signal::SIGUSR1);
    wait_for(READY_TIMEOUT, "the master to handle USR1", || {
        server.log().contains("USR1: no log file to reopen (logging to stderr)").then_some(())
    });
    assert_eq!(LineClient::connect(server.addr("echo")).ask("hi"), "hi");
    stop(&mut server);
}

#[test]
fn usr1_when_a_log_cannot_be_reopened_logs_why_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let error_log = dir.path().join("error.log");
    let access_dir = dir.path().join("access");
    std::fs::create_dir(&access_dir).unwrap();
    let access = access_dir.join("access.log");
    let setup = Setup::new(1, 1)
        .app("echo", "echo", "")
        .server("error_log", &format!("\"{}\"", error_log.display()))
        .server("access_log", &format!("\"{}\"", access.display()));
    let mut server = TestServer::start(&setup);
    // The access log's directory goes away (a rotation gone wrong).
    std::fs::remove_dir_all(&access_dir).unwrap();
    server.signal(Signal::SIGUSR1);
    let expected = format!("cannot reopen access_log {}: ", access.display());
    wait_for(READY_TIMEOUT, "the reopen error in the error log", || {
        let log = std::fs::read_to_string(&error_log).ok()?;
        (log.contains(&expected) && log.contains("log files reopened")).then_some(())
    });
    assert_eq!(LineClient::connect(server.addr("echo")).ask("hi"), "hi", "still serving");
    stop(&mut server);
}

#[test]
fn a_reload_during_a_binary_upgrade_is_refused_and_the_upgrade_completes() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    let setup = Setup::new(1, 1).app("kit", "testkit", &format!("hang_at_start_if = \"{}\"", hang.display()));
    let mut server = TestServer::start(&setup);
    let old = server.pid;
    // The new master's workers hang at start until the file goes.
    std::fs::write(&hang, "").unwrap();
    server.signal(Signal::SIGUSR2);
    wait_for(READY_TIMEOUT, "the old master to report the upgrade", || {
        server.status()["upgrade"]["new_master"].as_i64()
    });
    let (code, body) = server.reload();
    assert_eq!((code, &body["error"]), (409, &Value::from("a binary upgrade is under way")), "{body}");
    assert!(server.log().contains("reload refused: a binary upgrade is under way"), "{}", server.log());
    std::fs::remove_file(&hang).unwrap();
    // The upgrade goes on: the old master hands over and exits.
    assert!(server.wait_exit(READY_TIMEOUT).success(), "{}", server.log());
    let new = wait_for(READY_TIMEOUT, "the new master to answer", || {
        let (code, body) = server.control("GET", "/status")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v["pid"] != old).then(|| v["pid"].as_i64()).flatten()
    }) as i32;
    assert_eq!(server.control("POST", "/stop").map(|(code, _)| code), Some(202));
    wait_for(READY_TIMEOUT, "the new master to stop", || (!alive(new)).then_some(()));
}

#[test]
fn a_reload_whose_app_crashes_at_start_is_refused_naming_how_the_worker_died() {
    let dir = tempfile::tempdir().unwrap();
    let trap = dir.path().join("abort");
    let setup = Setup::new(1, 1).app("kit", "testkit", &format!("abort_at_start_if = \"{}\"", trap.display()));
    let mut server = TestServer::start(&setup);
    let serving = server.worker_pids();
    std::fs::write(&trap, "").unwrap();
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("worker 0 (pid ")
            && error.ends_with("of generation 2 was killed by SIGABRT (signal 6) before it was ready"),
        "{error}"
    );
    assert_eq!(server.worker_pids(), serving, "generation 1 keeps serving");
    assert_eq!(server.status()["reloads"]["last_error"], error);
    std::fs::remove_file(&trap).unwrap();
    stop(&mut server);
}

#[test]
fn the_only_worker_crashing_after_it_served_is_replaced_at_once() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("kit", "testkit", ""));
    let crashed = server.worker_pids()[0];
    let mut client = LineClient::connect(server.addr("kit"));
    client.send("ABORT");
    assert_eq!(client.recv(), None, "the worker died with the connection");
    let replacement = wait_for(READY_TIMEOUT, "a replacement worker", || {
        let pids = server.worker_pids();
        (pids.len() == 1 && pids[0] != crashed).then(|| pids[0])
    });
    let log = server.log();
    let line = format!("worker 0 (pid {crashed}) of generation 1 was killed by SIGABRT (signal 6); replacing it\n");
    assert!(log.contains(&line), "no delay for the last worker: {log}");
    server.wait_serving();
    assert_eq!(LineClient::connect(server.addr("kit")).ask("PID"), replacement.to_string());
    stop(&mut server);
}

#[test]
fn a_draining_worker_that_does_not_finish_in_time_is_killed() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", "").server("graceful_timeout", "0"));
    let frozen = server.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen), Signal::SIGSTOP).unwrap();
    server.signal(Signal::SIGHUP);
    let line = format!("worker pid {frozen} of generation 1 did not finish draining in time; killing it");
    wait_for(READY_TIMEOUT, "the frozen worker to be killed", || server.log().contains(&line).then_some(()));
    wait_for(READY_TIMEOUT, "the frozen worker to be gone", || (!alive(frozen)).then_some(()));
    assert_eq!(server.generation(), 2);
    assert_eq!(LineClient::connect(server.addr("echo")).ask("hi"), "hi");
    stop(&mut server);
}

#[test]
fn a_passed_socket_that_no_listener_uses_is_kept_and_named_in_a_warning() {
    use std::os::fd::AsRawFd;
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = passed.as_raw_fd();
    // Inherited by the shell, which moves it to fd 3 as systemd would.
    nix::fcntl::fcntl(&passed, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
    let mut server = TestServer::start_with(&Setup::new(1, 1).app("echo", "echo", ""), |config| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec 3<&{fd}; LISTEN_PID=$$ exec \"$0\" \"$@\""))
            .arg(BIN)
            .arg("--config")
            .arg(config);
        cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "spare");
        cmd
    });
    let log = server.log();
    assert!(log.contains("passed sockets that no [[listen]] uses (kept for a reload that adds them): "), "{log}");
    assert!(log.contains(&passed.local_addr().unwrap().port().to_string()), "{log}");
    stop(&mut server);
}

#[test]
fn a_pidfile_under_a_regular_file_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    // Its directory would have to be inside a regular file: `check` refuses it, so does the server.
    let pidfile = file.join("fdt.pid");
    let setup = Setup::new(1, 1).app("echo", "echo", "").server("pidfile", &format!("\"{}\"", pidfile.display()));
    let mut server = TestServer::spawn(&setup);
    assert_eq!(server.wait_exit(READY_TIMEOUT).code(), Some(1));
    let log = server.log();
    let wanted = format!("cannot write pidfile {}: {} is not a directory", pidfile.display(), file.display());
    assert!(log.contains(&wanted), "{log}");
    assert!(!server.control_socket().exists(), "a failed start leaves no control socket behind");
}

#[test]
fn usr1_with_a_frozen_worker_warns_and_never_blocks_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let error_log = dir.path().join("error.log");
    let setup = Setup::new(2, 1)
        .app("echo", "echo", "")
        .server("log_level", "\"info\"")
        .server("error_log", &format!("\"{}\"", error_log.display()));
    let mut server = TestServer::start(&setup);
    let frozen = server.worker_pids()[0];
    // Frozen: it reads nothing more from its channel, and each USR1 queues log files there.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen), Signal::SIGSTOP).unwrap();
    let log = || std::fs::read_to_string(&error_log).unwrap_or_default();
    let warning = format!("cannot hand the log files to worker pid {frozen}: ");
    let started = std::time::Instant::now();
    for round in 1.. {
        server.signal(Signal::SIGUSR1);
        wait_for(READY_TIMEOUT, "the master to handle USR1", || {
            (log().matches("log files reopened").count() >= round).then_some(())
        });
        if log().contains(&warning) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no warning after {round} USR1s");
    }
    // The master still answers.
    assert_eq!(server.status()["pid"], server.pid);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen), Signal::SIGCONT).unwrap();
    stop(&mut server);
}
