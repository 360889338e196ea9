//! `fdtserver check` passes only what the server accepts: it opens the log files, checks the
//! control socket's path, and refuses app settings the app does not declare — each with the
//! file and line or the path at fault. The server refuses the same configs with the same reasons.

mod util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use util::*;

/// A config with one echo app, `server` lines in `[server]` and `settings` under `[app.echo]`.
fn config(dir: &Path, server: &str, settings: &str) -> PathBuf {
    echo_config(dir, server, "", settings)
}

#[test]
fn check_refuses_an_error_log_in_a_directory_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let cfg = config(dir.path(), &format!("error_log = \"{}/error.log\"", missing.display()), "");
    check_refuses(&cfg, &["error_log", &format!("directory {} does not exist", missing.display())]);
    server_refuses(&cfg, &["error_log"]);
}

#[test]
fn check_refuses_a_directory_as_error_log_or_access_log() {
    let dir = tempfile::tempdir().unwrap();
    check_refuses(&config(dir.path(), "error_log = \"/\"", ""), &["error_log /", "is a directory"]);
    check_refuses(&config(dir.path(), "access_log = \"/\"", ""), &["access_log /", "is a directory"]);
}

#[test]
fn a_control_socket_path_too_long_for_unix_sockets_is_a_config_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("/tmp/{}/fdt.sock", "d".repeat(120));
    let cfg = config(dir.path(), &format!("control_socket = \"{long}\""), "");
    check_refuses(&cfg, &["fdt.toml:4: `control_socket`", "at most 107"]);
    server_refuses(&cfg, &["fdt.toml:4: `control_socket`", "at most 107"]);
}

#[test]
fn a_control_socket_under_a_file_names_the_component_that_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    let cfg = config(dir.path(), &format!("control_socket = \"{}/run/fdt.sock\"", file.display()), "");
    let wanted = format!("{} is not a directory", file.display());
    check_refuses(&cfg, &["control socket", &wanted]);
    server_refuses(&cfg, &["control socket", &wanted]);
}

#[test]
fn a_misspelt_app_setting_is_refused_with_file_line_and_the_settings_the_app_takes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "", "dealy_ms = 5");
    // [server] and its 3 lines, a blank, 3 lines of [[listen]], a blank, [app.echo], plugin.
    let wanted = ["fdt.toml:12: [app.echo]: unknown setting `dealy_ms`", "takes: delay_ms"];
    check_refuses(&cfg, &wanted);
    server_refuses(&cfg, &wanted);
}

#[test]
fn a_reload_with_a_misspelt_setting_is_refused_and_the_old_generation_serves() {
    let setup = Setup::new(1, 1).app("echo", "echo", "delay_ms = 0");
    let server = TestServer::start(&setup);
    let generation = server.generation();
    let mut bad = setup.clone();
    bad.apps[0].settings = "delay_ms = 0\nmesage = \"typo\"".into();
    server.write_config(&bad);
    let (code, _, err) = server.cli(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown setting `mesage`"), "{err}");
    assert_eq!(server.generation(), generation);
    let mut client = LineClient::connect(server.addr("echo"));
    client.stream().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(client.ask("still here"), "still here");
}

#[test]
fn check_passes_a_good_config_and_creates_its_log_files_like_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("error.log");
    let cfg = config(dir.path(), &format!("error_log = \"{}\"", log.display()), "delay_ms = 1");
    let (code, out, err) = cli(&["check"], &cfg);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ok"), "{out}");
    assert!(log.exists(), "check opens the error log as the server would");
}

#[test]
fn check_lists_every_path_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    let fifo = dir.path().join("log.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sock_dir = dir.path().join("missing");
    let text = format!(
        "[server]\nworkers = 1\npidfile = \"{file}/run/fdt.pid\"\naccess_log = \"{fifo}\"\n\n\
         [[listen]]\naddress = \"unix:{sock}/echo.sock\"\napp = \"echo\"\n\n[app.echo]\nplugin = \"{plugin}\"\n",
        file = file.display(),
        fifo = fifo.display(),
        sock = sock_dir.display(),
        plugin = plugin("echo").display()
    );
    let cfg = dir.path().join("fdt.toml");
    std::fs::write(&cfg, text).unwrap();
    let started = std::time::Instant::now();
    check_refuses(
        &cfg,
        &[
            &format!("cannot write pidfile {}/run/fdt.pid: {} is not a directory", file.display(), file.display()),
            &format!("cannot open access_log {}: it is a FIFO", fifo.display()),
            &format!(
                "cannot listen on unix:{}/echo.sock: directory {} does not exist",
                sock_dir.display(),
                sock_dir.display()
            ),
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(10), "check never blocks on the FIFO");
}

#[test]
fn a_fifo_as_error_log_stops_the_start_at_once_instead_of_blocking_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("error.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let setup =
        Setup::new(1, 1).app("echo", "echo", "").server("error_log", &format!("{:?}", fifo.display().to_string()));
    let mut server = TestServer::spawn(&setup);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).code(), Some(1), "{}", server.log());
    let wanted = format!("cannot open error_log {}: it is a FIFO", fifo.display());
    assert!(server.log().contains(&wanted), "{}", server.log());
}
