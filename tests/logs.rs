//! Log files: `access_log` has one line per connection, and `USR1` makes the master and every
//! worker switch to fresh `error_log` and `access_log` files (as logrotate needs).

mod util;

use std::io::Write;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_access_log_has_one_line_per_connection_with_peer_app_bytes_duration_and_reason() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", "").server("access_log", "\"access.log\""));
    let access = server.dir.path().join("access.log");
    let request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut c = HttpClient::connect(server.addr("hello")).unwrap();
    let peer = c.stream().local_addr().unwrap().to_string();
    c.stream().write_all(request).unwrap();
    let first = c.read_response().unwrap();
    c.stream().write_all(request).unwrap();
    c.read_response().unwrap();
    drop(c);
    let line = wait_for(READY_TIMEOUT, "the access line", || {
        read(&access).lines().find(|l| l.contains(&format!("peer={peer} "))).map(str::to_string)
    });
    let field = |name: &str| -> String {
        line.split(' ').find_map(|f| f.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("{line}")).into()
    };
    assert_eq!(field("app"), "hello", "{line}");
    assert_eq!(field("pid"), first.worker_pid().to_string(), "{line}");
    assert_eq!(field("requests"), "2", "{line}");
    assert_eq!(field("in"), (2 * request.len()).to_string(), "{line}");
    let out: usize = field("out").parse().unwrap();
    assert!(out > 2 * first.body.len(), "{line}");
    let ms: f64 = field("ms").parse().unwrap();
    assert!(ms > 0.0 && ms < 10_000.0, "{line}");
    assert_eq!(field("close"), "peer", "{line}");
    assert!(line.starts_with("20"), "a line starts with its time: {line}");
}

#[test]
fn usr1_makes_the_master_and_every_worker_reopen_both_log_files() {
    let setup = Setup::new(2, 2)
        .app("kit", "testkit", "")
        .server("error_log", "\"error.log\"")
        .server("access_log", "\"access.log\"");
    let server = TestServer::start(&setup);
    let (error, access) = (server.dir.path().join("error.log"), server.dir.path().join("access.log"));
    let addr = server.addr("kit");
    let workers = server.worker_pids();
    let one_connection = || {
        let mut c = LineClient::connect(addr);
        c.ask("PID")
    };
    one_connection();
    wait_for(READY_TIMEOUT, "an access line", || read(&access).contains("app=kit").then_some(()));

    // What logrotate does: move the files away, then signal.
    let (old_error, old_access) = (server.dir.path().join("error.log.1"), server.dir.path().join("access.log.1"));
    std::fs::rename(&error, &old_error).unwrap();
    std::fs::rename(&access, &old_access).unwrap();
    server.signal(Signal::SIGUSR1);
    wait_for(READY_TIMEOUT, "every process to reopen its log files", || {
        let text = read(&error);
        let master = text.contains(&format!("master [{}] log files reopened", server.pid));
        let all_workers = workers.iter().all(|p| text.contains(&format!("[{p}] log files reopened")));
        (master && all_workers).then_some(())
    });

    let old_access_len = read(&old_access).len();
    let old_error_len = read(&old_error).len();
    // Connections on every worker, each logged by the worker that served it.
    let mut seen = std::collections::BTreeSet::new();
    wait_for(READY_TIMEOUT, "a connection on every worker", || {
        seen.insert(one_connection().parse::<i32>().unwrap());
        (seen.len() == workers.len()).then_some(())
    });
    wait_for(READY_TIMEOUT, "access lines of every worker in the new file", || {
        let text = read(&access);
        workers.iter().all(|p| text.contains(&format!("pid={p} "))).then_some(())
    });
    // A worker's own log line after the reopen goes to the new error log.
    server.signal(Signal::SIGTTOU);
    wait_for(READY_TIMEOUT, "a worker's drain line in the new error log", || {
        read(&error).contains("worker 1 gen 1").then_some(())
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read(&old_access).len(), old_access_len, "a worker still writes to the rotated access log");
    assert_eq!(read(&old_error).len(), old_error_len, "a process still writes to the rotated error log");
}

#[test]
fn workers_running_as_nobody_write_to_reopened_logs_they_could_not_open_themselves() {
    // The temp dir is 0700 root: `nobody` cannot open anything in it, so the new files can only
    // come from the master.
    let setup = Setup::new(1, 1)
        .app("kit", "testkit", "")
        .server("user", "\"nobody\"")
        .server("error_log", "\"error.log\"")
        .server("access_log", "\"access.log\"");
    let server = TestServer::start(&setup);
    let (error, access) = (server.dir.path().join("error.log"), server.dir.path().join("access.log"));
    let worker = server.worker_pids()[0];
    std::fs::rename(&access, server.dir.path().join("access.log.1")).unwrap();
    std::fs::rename(&error, server.dir.path().join("error.log.1")).unwrap();
    server.signal(Signal::SIGUSR1);
    wait_for(READY_TIMEOUT, "the worker to reopen its logs", || {
        read(&error).contains(&format!("[{worker}] log files reopened")).then_some(())
    });
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid.to_string();
    assert_eq!(LineClient::connect(server.addr("kit")).ask("UID").split(' ').next(), Some(nobody.as_str()));
    wait_for(READY_TIMEOUT, "the worker's access line in the new file", || {
        read(&access).contains(&format!("pid={worker} ")).then_some(())
    });
}

#[test]
fn a_reload_switches_the_master_and_every_worker_to_new_log_paths_or_is_refused_if_they_cannot_open() {
    let setup = Setup::new(2, 2).app("kit", "testkit", "").server("error_log", "\"error.log\"");
    let server = TestServer::start(&setup);
    let dir = server.dir.path();

    // A path that cannot be opened refuses the reload; nothing changes.
    server.write_config(&setup.clone().server("access_log", "\"no/such/dir/access.log\""));
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("cannot open access_log"), "{body}");

    let moved = setup.clone().server("error_log", "\"error2.log\"").server("access_log", "\"access.log\"");
    server.write_config(&moved);
    assert_eq!(server.reload().0, 200);
    let text = read(&dir.join("error2.log"));
    assert!(text.contains("reloaded: generation 2 serving"), "{text}");
    let new_workers = server.worker_pids();
    for pid in &new_workers {
        wait_for(READY_TIMEOUT, "a line of every new worker in the new error log", || {
            read(&dir.join("error2.log")).contains(&format!("[{pid}] accepting connections")).then_some(())
        });
    }
    let pid = LineClient::connect(server.addr("kit")).ask("PID");
    wait_for(READY_TIMEOUT, "an access line in the new access log", || {
        read(&dir.join("access.log")).contains(&format!("pid={pid} ")).then_some(())
    });
    assert!(!read(&dir.join("error.log")).contains("reloaded: generation 2"));

    // Both paths removed: the log goes back to stderr and the access log ends, in the master
    // and in every worker, without a restart.
    server.write_config(&Setup::new(2, 2).app("kit", "testkit", ""));
    assert_eq!(server.reload().0, 200);
    wait_for(READY_TIMEOUT, "the master's log back on stderr", || {
        server.log().contains("reloaded: generation 3 serving").then_some(())
    });
    for pid in server.worker_pids() {
        wait_for(READY_TIMEOUT, "every new worker's log on stderr", || {
            server.log().contains(&format!("[{pid}] accepting connections")).then_some(())
        });
    }
    let pid: i32 = LineClient::connect(server.addr("kit")).ask("PID").parse().unwrap();
    // The worker writes a connection's access line before it counts the connection closed: a
    // report that counts our request and no open connection comes after that line.
    wait_for(READY_TIMEOUT, "the worker to report the connection closed", || {
        let status = server.status();
        let worker = status["workers"].as_array()?.iter().find(|w| w["pid"] == pid)?.clone();
        (worker["requests"].as_u64()? >= 1 && worker["connections"].as_u64()? == 0).then_some(())
    });
    assert!(
        !read(&dir.join("access.log")).contains(&format!("pid={pid} ")),
        "an access line after access_log was removed"
    );
    assert!(!read(&dir.join("error2.log")).contains("reloaded: generation 3"));
}

/// `fdtserver_log_write_failures_total`, summed over the master and every worker.
fn lost_log_lines(server: &TestServer) -> Option<f64> {
    let (_, metrics) = server.control("GET", "/metrics")?;
    Some(
        metrics
            .lines()
            .filter(|l| l.starts_with("fdtserver_log_write_failures_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// Unmounts a tmpfs (and its files) when dropped, even when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_leaves_whole_log_lines_only_and_counts_the_lines_it_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("small"), "16k");
    let access = disk.0.join("access.log");
    let setup =
        Setup::new(1, 2).app("kit", "testkit", "").server("access_log", &format!("{:?}", access.display().to_string()));
    let server = TestServer::start(&setup);
    let addr = server.addr("kit");
    // Access lines are about 120 bytes: 400 connections need three times the disk.
    for _ in 0..400 {
        let mut c = LineClient::connect(addr);
        assert_eq!(c.ask("hello"), "hello");
    }
    let lost =
        wait_for(READY_TIMEOUT, "the lost lines in the metrics", || lost_log_lines(&server).filter(|&lost| lost > 0.0));
    assert!(lost >= 100.0, "about 260 lines cannot fit, {lost} counted");
    let text = std::fs::read(&access).unwrap();
    assert!(text.len() > 8 * 1024, "the disk was filled ({} bytes)", text.len());
    assert_eq!(text.last(), Some(&b'\n'), "the file ends with a whole line");
    for line in String::from_utf8(text).expect("no line cut in the middle of a character").lines() {
        assert!(line.starts_with("20") && line.contains(" close="), "a line cut short or mixed up: {line:?}");
    }
}

#[test]
fn a_log_that_refuses_every_write_is_counted_and_costs_no_connection() {
    // /dev/full takes the open and fails every write with ENOSPC.
    let setup = Setup::new(1, 2).app("kit", "testkit", "").server("access_log", "\"/dev/full\"");
    let server = TestServer::start(&setup);
    for _ in 0..5 {
        assert_eq!(LineClient::connect(server.addr("kit")).ask("hi"), "hi");
    }
    wait_for(READY_TIMEOUT, "5 lost access lines in the metrics", || {
        lost_log_lines(&server).filter(|&lost| lost >= 5.0)
    });
}

#[test]
fn under_systemd_the_journal_gets_priority_prefixes_instead_of_timestamps() {
    let setup = Setup::new(1, 1).app("kit", "testkit", "").server("log_level", "\"debug\"");
    let server = TestServer::spawn_with(&setup, |config| {
        let mut cmd = server_command(config);
        // What systemd sets when stderr is connected to the journal.
        cmd.env("JOURNAL_STREAM", "8:12345");
        cmd
    });
    server.wait_serving();
    // An app's warning (a panic) comes through the plugin's logger at its own level.
    let mut c = LineClient::connect(server.addr("kit"));
    c.send("PANIC");
    assert!(c.closed_by_peer());
    let log = wait_for(READY_TIMEOUT, "an error line from the worker", || {
        let log = server.log();
        log.contains("<3>worker 0 gen 1").then_some(log)
    });
    assert!(log.contains(&format!("<6>master [{}] ", server.pid)), "{log}");
    assert!(log.contains("<7>"), "debug lines have priority 7: {log}");
    assert!(!log.lines().any(|l| l.starts_with("20")), "no timestamps: the journal adds its own\n{log}");
}
