//! systemd: readiness notifications reach `NOTIFY_SOCKET` in order, and sockets passed by
//! socket activation (`LISTEN_FDS`) are served instead of bound.

mod util;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use util::*;

/// A notify socket the test listens on, like systemd's.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        NotifySocket { _dir: dir, path, socket }
    }

    /// The next notification (one datagram), as its `KEY=value` lines.
    fn next(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("no notification within the timeout");
        String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()
    }

    /// Skips notifications until one has `key` (`STATUS=` lines may come alone); returns it.
    fn until(&self, key: &str) -> Vec<String> {
        loop {
            let message = self.next();
            if message.iter().any(|l| l == key || l.starts_with(&format!("{key}="))) {
                return message;
            }
            assert!(
                message.iter().all(|l| l.starts_with("STATUS=")),
                "unexpected notification {message:?} while waiting for {key}"
            );
        }
    }
}

#[test]
fn the_notify_socket_receives_ready_reloading_ready_and_stopping_in_order() {
    let notify = NotifySocket::new();
    let path = notify.path.clone();
    let mut server = TestServer::start_with(&Setup::new(1, 1).app("kit", "testkit", ""), |config| {
        let mut cmd = server_command(config);
        cmd.env("NOTIFY_SOCKET", &path);
        cmd
    });

    let ready = notify.until("READY");
    assert!(ready.contains(&format!("MAINPID={}", server.pid)), "{ready:?}");
    assert!(ready.iter().any(|l| l.starts_with("STATUS=generation 1 serving")), "{ready:?}");

    assert_eq!(server.reload().0, 200);
    let reloading = notify.until("RELOADING");
    let usec: u64 = reloading
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC in the same message: {reloading:?}"))
        .parse()
        .unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(usec <= now_usec && now_usec - usec < 10_000_000, "MONOTONIC_USEC {usec} is not CLOCK_MONOTONIC");
    let ready = notify.until("READY");
    assert!(ready.iter().any(|l| l.starts_with("STATUS=generation 2 serving")), "{ready:?}");

    // A refused reload ends the reloading state too.
    std::fs::write(&server.config, "not toml [").unwrap();
    assert_eq!(server.reload().0, 409);
    notify.until("RELOADING");
    let ready = notify.until("READY");
    assert!(ready.iter().any(|l| l.starts_with("STATUS=reload refused")), "{ready:?}");

    server.signal(Signal::SIGTERM);
    notify.until("STOPPING");
    assert!(server.wait_exit(READY_TIMEOUT).success());
}

#[test]
fn workers_do_not_inherit_notify_socket_but_the_master_keeps_it() {
    let notify = NotifySocket::new();
    let path = notify.path.clone();
    let server = TestServer::start_with(&Setup::new(1, 1).app("kit", "testkit", ""), |config| {
        let mut cmd = server_command(config);
        cmd.env("NOTIFY_SOCKET", &path);
        cmd
    });
    notify.until("READY");
    assert_eq!(LineClient::connect(server.addr("kit")).ask("ENV NOTIFY_SOCKET"), "-");
    // The master still notifies after forking (here: a reload's worker).
    assert_eq!(server.reload().0, 200);
    notify.until("RELOADING");
    notify.until("READY");
}

/// The command that starts the server the way systemd does with socket activation: `fd` at
/// fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES`, and `LISTEN_PID` = the server's own pid (a shell sets
/// it to its own pid, then `exec`s the server, which keeps the pid).
fn socket_activated(config: &Path, fd: i32, name: &str, listen_pid: Option<&str>) -> Command {
    let mut cmd = Command::new("sh");
    let pid = listen_pid.unwrap_or("$$");
    cmd.arg("-c").arg(format!("LISTEN_PID={pid} exec \"$0\" \"$@\"")).arg(BIN).arg("--config").arg(config);
    cmd.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", name);
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (dup2,
    // fcntl) on an fd the test owns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

#[test]
fn a_socket_passed_by_socket_activation_is_served_instead_of_bound() {
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = passed.local_addr().unwrap();
    let setup = Setup::new(2, 2).app_at("kit", &plugin("testkit"), "", &addr.to_string());
    let fd = passed.as_raw_fd();
    let server = TestServer::start_with(&setup, |config| socket_activated(config, fd, "web", None));
    // The server serves on the passed socket (binding it again would have failed: the test
    // still holds it, without SO_REUSEPORT).
    let v = server.status();
    assert_eq!(v["listeners"][0]["origin"], "systemd", "{v}");
    assert_eq!(v["listeners"][0]["bound"], addr.to_string(), "{v}");
    let pids: std::collections::BTreeSet<String> = (0..20).map(|_| LineClient::connect(addr).ask("PID")).collect();
    assert!(pids.iter().all(|p| server.worker_pids().contains(&p.parse().unwrap())), "{pids:?}");
    // A connection queued on the test's copy of the socket is served by the server as well:
    // it is one socket.
    assert_eq!(LineClient::connect(addr).ask("ENV LISTEN_FDS"), "-", "workers must not see LISTEN_FDS");
    drop(passed);
    assert_eq!(LineClient::connect(addr).ask("hello"), "hello");
}

#[test]
fn a_listen_pid_of_another_process_means_no_socket_was_passed() {
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let setup = Setup::new(1, 1).app("kit", "testkit", "");
    let fd = passed.as_raw_fd();
    let server = TestServer::start_with(&setup, |config| socket_activated(config, fd, "web", Some("1")));
    let v = server.status();
    assert_eq!(v["listeners"][0]["origin"], "bound", "{v}");
    assert_ne!(v["listeners"][0]["bound"], passed.local_addr().unwrap().to_string());
    assert_eq!(LineClient::connect(server.addr("kit")).ask("x"), "x");
}

#[test]
fn a_binary_upgrade_under_systemd_announces_the_new_mainpid_and_keeps_the_passed_socket() {
    let notify = NotifySocket::new();
    let path = notify.path.clone();
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = passed.local_addr().unwrap();
    let setup = Setup::new(1, 1).app_at("kit", &plugin("testkit"), "", &addr.to_string());
    let fd = passed.as_raw_fd();
    let mut server = TestServer::start_with(&setup, |config| {
        let mut cmd = socket_activated(config, fd, "web", None);
        cmd.env("NOTIFY_SOCKET", &path);
        cmd
    });
    drop(passed);
    notify.until("READY");
    let old = server.pid;
    server.signal(Signal::SIGUSR2);
    let ready = notify.until("READY");
    let new: i32 = ready
        .iter()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap_or_else(|| panic!("READY=1 without MAINPID: {ready:?}"))
        .parse()
        .unwrap();
    assert_ne!(new, old, "{ready:?}");
    assert!(server.wait_exit(READY_TIMEOUT).success());
    let v = server.wait_serving();
    assert_eq!(v["pid"], new);
    assert_eq!(v["listeners"][0]["origin"], "systemd", "the socket is still systemd's: {v}");
    assert_eq!(LineClient::connect(addr).ask("GEN"), "2");
    // The old master left quietly: no STOPPING=1 for the service.
    notify.socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.socket.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(!text.contains("STOPPING=1"), "the old master told systemd it stops: {text}");
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new), Signal::SIGTERM).unwrap();
    wait_for(READY_TIMEOUT, "the new master to stop", || (!alive(new)).then_some(()));
}

#[test]
fn a_unix_socket_passed_by_systemd_is_served_and_its_file_is_left_to_systemd() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("echo.sock");
    let passed = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let setup = Setup::new(1, 1).app_at("echo", &plugin("echo"), "", &format!("unix:{}", path.display()));
    let fd = passed.as_raw_fd();
    let mut server = TestServer::start_with(&setup, |config| socket_activated(config, fd, "echo", None));
    assert_eq!(server.status()["listeners"][0]["origin"], "systemd");
    let mut c = std::io::BufReader::new(std::os::unix::net::UnixStream::connect(&path).unwrap());
    std::io::Write::write_all(c.get_mut(), b"over unix\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut c, &mut line).unwrap();
    assert_eq!(line, "over unix\n");
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(READY_TIMEOUT).success());
    assert!(path.exists(), "the server removed the socket file systemd made");
}
