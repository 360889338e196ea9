//! Privileges: with `user` set, the master (root) binds even a port below 1024 and the workers
//! run as that user before any plugin code runs; a user that does not exist stops the start.
//! (The tests run as root.)

mod util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

/// The (real, effective, saved, fs) uids and gids of a process, and its supplementary groups.
fn credentials(pid: i32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// A TCP port below 1024 that is free right now on 127.0.0.1.
fn free_privileged_port() -> u16 {
    (900..1024)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("no free port between 900 and 1023")
}

#[test]
fn workers_run_as_the_configured_user_while_the_master_binds_a_port_below_1024() {
    assert!(nix::unistd::Uid::effective().is_root(), "this test needs root");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("no user nobody");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let port = free_privileged_port();
    let setup = Setup::new(2, 2)
        .app_at("kit", &plugin("testkit"), "", &format!("127.0.0.1:{port}"))
        .app("chat", "chat", "")
        .server("user", "\"nobody\"")
        .server("access_log", "\"access.log\"")
        .server("control_socket", "\"private/control.sock\"");
    let server = TestServer::start(&setup);
    // The control socket's directory is closed to the workers' user from now on: the next
    // generation reaches the event bus through the directory the master opened for them.
    {
        use std::os::unix::fs::PermissionsExt;
        let private = server.dir.path().join("private");
        std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let (master_uid, _, _) = credentials(server.pid);
    assert_eq!(master_uid, vec![0; 4], "the master must stay root");
    for pid in server.worker_pids() {
        let (uids, gids, groups) = credentials(pid);
        assert_eq!(uids, vec![uid; 4], "worker {pid}: real, effective, saved and fs uid");
        assert_eq!(gids, vec![gid; 4], "worker {pid}: real, effective, saved and fs gid");
        assert_eq!(groups, vec![gid], "worker {pid}: supplementary groups");
    }
    // The app code itself sees it, and serves the privileged port.
    assert_eq!(LineClient::connect(addr).ask("UID"), format!("{uid} {uid} {gid} {gid}"));

    // A reload and a respawn load their pinned plugin copies as that user too.
    assert_eq!(server.reload().0, 200);
    let victim = server.worker_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_for(READY_TIMEOUT, "a replacement worker", || {
        let pids = server.worker_pids();
        (pids.len() == 2 && !pids.contains(&victim)).then_some(())
    });
    server.wait_serving();
    for pid in server.worker_pids() {
        assert_eq!(credentials(pid).0, vec![uid; 4], "worker {pid} after a reload and a respawn");
    }
    assert_eq!(LineClient::connect(addr).ask("GEN"), "2");
    // Events cross the workers of the new generation (each worker has a chat client).
    let mut chatters = Vec::new();
    let mut pids = std::collections::BTreeSet::new();
    while pids.len() < 2 {
        let mut c = LineClient::connect(server.addr("chat"));
        pids.insert(c.recv().unwrap());
        chatters.push(c);
        assert!(chatters.len() < 50, "the chat clients all landed in one worker");
    }
    chatters[0].send("through the bus");
    for c in &mut chatters[1..] {
        assert_eq!(c.recv().as_deref(), Some("anon: through the bus"));
    }
    // Workers write to the access log the master opened, without the right to open it.
    wait_for(Duration::from_secs(5), "an access line", || {
        std::fs::read_to_string(server.dir.path().join("access.log"))
            .unwrap_or_default()
            .contains("app=kit")
            .then_some(())
    });
}

#[test]
fn a_user_that_does_not_exist_stops_the_start_with_a_clear_message() {
    let setup = Setup::new(1, 1).app("kit", "testkit", "").server("user", "\"no-such-user-fdt\"");
    let mut server = TestServer::spawn(&setup);
    let status = server.wait_exit(READY_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", server.log());
    assert!(
        server.log().contains("user `no-such-user-fdt` (the `user` in [server]) does not exist"),
        "{}",
        server.log()
    );
    let (code, _, err) = server.cli(&["check"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("user `no-such-user-fdt`"), "{err}");
}

#[test]
fn a_reload_to_a_user_that_does_not_exist_is_refused() {
    let setup = Setup::new(1, 1).app("kit", "testkit", "");
    let server = TestServer::start(&setup);
    server.write_config(&setup.clone().server("user", "\"no-such-user-fdt\""));
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no-such-user-fdt"), "{body}");
    assert_eq!(LineClient::connect(server.addr("kit")).ask("GEN"), "1");
}
