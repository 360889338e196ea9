//! App plugins at the boundary: `fdtserver check` and server start-up refuse every kind of broken
//! plugin with a one-line reason that names the file, config errors name file and line, and the
//! SDK keeps its promise of a tiny, safe echo app.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;

use util::*;

/// A C library exporting `FDT_APP_DESCRIPTOR_V1` with this header (8 magic bytes, ABI major,
/// ABI minor, size), as `fdt_sdk::abi::AppDescriptor` starts.
fn c_descriptor(dir: &Path, name: &str, magic: &[u8; 8], major: u32) -> PathBuf {
    let bytes: Vec<String> = magic.iter().map(|b| b.to_string()).collect();
    let source = format!(
        "struct header {{ unsigned char magic[8]; unsigned int abi_major, abi_minor, size; }};\n\
         __attribute__((visibility(\"default\"))) const struct header FDT_APP_DESCRIPTOR_V1 = \
         {{ {{ {} }}, {major}, 0, sizeof(struct header) }};\n",
        bytes.join(", ")
    );
    gcc_shared(dir, name, &source)
}

/// A kind of broken plugin.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Missing,
    TextFile,
    NotAnApp,
    WrongMagic,
    Abi99,
    StartFails,
    StartPanics,
}

/// What an error must say: any one of the alternatives, each a list of texts that must all
/// appear.
type Reasons = &'static [&'static [&'static str]];

/// True when `text` says one of `reasons`.
fn says(text: &str, reasons: Reasons) -> bool {
    reasons.iter().any(|all| all.iter().all(|part| text.contains(part)))
}

/// A broken plugin in `dir`: (plugin path, app settings, what its error must say).
fn broken(fault: Fault, dir: &Path) -> (PathBuf, &'static str, Reasons) {
    match fault {
        Fault::Missing => {
            (dir.join("libdoesnotexist.so"), "", &[&["No such file", "is the app built?", "cargo build --release"]])
        }
        Fault::TextFile => {
            let text = dir.join("libtext.so");
            std::fs::write(&text, "this is a text file, not a shared library\n".repeat(20)).unwrap();
            (text, "", &[&["not a shared library"], &["invalid ELF header"], &["file too short"]])
        }
        Fault::NotAnApp => (
            gcc_shared(dir, "libnotanapp.so", "int answer(void) { return 42; }\n"),
            "",
            &[&["not an fdtserver app: no `FDT_APP_DESCRIPTOR_V1` symbol"]],
        ),
        Fault::WrongMagic => {
            (c_descriptor(dir, "libbadmagic.so", b"NOTMAGIC", 1), "", &[&["not an fdtserver app", "wrong magic"]])
        }
        Fault::Abi99 => {
            (c_descriptor(dir, "libabi99.so", b"FDTAPP\0\x01", 99), "", &[&["plugin ABI 99.0 is not supported"]])
        }
        Fault::StartFails => (plugin("testkit"), "fail_start = \"db is down\"", &[&["start failed: db is down"]]),
        Fault::StartPanics => {
            (plugin("testkit"), "panic_at_start = true", &[&["start panicked", "testkit was told to panic at start"]])
        }
    }
}

/// Writes the config of `setup` into `dir`; returns its path.
/// `fdtserver check` exits 1 with an error that names the plugin file and says what is wrong.
fn assert_check_refuses(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let (plugin, settings, reasons) = broken(fault, dir.path());
    let config = Setup::new(1, 1).app_at("bad", &plugin, settings, "127.0.0.1:0").write_to(dir.path());
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 1, "check with {fault:?} exited {code}; stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(&plugin.display().to_string()), "the error does not name {}:\n{err}", plugin.display());
    assert!(says(&err, reasons), "the error for {fault:?} does not say any of {reasons:?}:\n{err}");
    assert!(!out.contains("app bad: ok"), "{out}");
}

/// Starting the server exits 1, and the log names the plugin file and says what is wrong.
fn assert_start_refused(fault: Fault) {
    let dir = tempfile::tempdir().unwrap();
    let (plugin, settings, reasons) = broken(fault, dir.path());
    let mut server = TestServer::spawn(&Setup::new(1, 1).app_at("bad", &plugin, settings, "127.0.0.1:0"));
    let status = server.wait_exit(READY_TIMEOUT);
    let log = server.log();
    assert_eq!(status.code(), Some(1), "with {fault:?} the server exited {status}; log:\n{log}");
    assert!(log.contains(&plugin.display().to_string()), "the log does not name {}:\n{log}", plugin.display());
    assert!(says(&log, reasons), "the log for {fault:?} does not say any of {reasons:?}:\n{log}");
    assert!(!server.control_socket().exists(), "the control socket was left behind");
}

#[test]
fn check_accepts_valid_apps() {
    let dir = tempfile::tempdir().unwrap();
    let setup =
        Setup::new(1, 1).app("echo", "echo", "delay_ms = 1").app("hello", "hello", "").app("kit", "testkit", "");
    let config = setup.write_to(dir.path());
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for app in ["echo", "hello", "kit"] {
        assert!(out.contains(&format!("app {app}: ok")), "no `app {app}: ok` in:\n{out}");
    }
}

#[test]
fn check_refuses_a_plugin_path_that_does_not_exist() {
    assert_check_refuses(Fault::Missing);
}

#[test]
fn check_refuses_a_text_file() {
    assert_check_refuses(Fault::TextFile);
}

#[test]
fn check_refuses_a_shared_library_that_is_not_an_app() {
    assert_check_refuses(Fault::NotAnApp);
}

#[test]
fn check_refuses_a_descriptor_with_the_wrong_magic() {
    assert_check_refuses(Fault::WrongMagic);
}

#[test]
fn check_refuses_a_descriptor_of_another_abi_major() {
    assert_check_refuses(Fault::Abi99);
}

#[test]
fn check_reports_the_message_of_a_failing_start() {
    assert_check_refuses(Fault::StartFails);
}

#[test]
fn check_reports_a_panicking_start() {
    assert_check_refuses(Fault::StartPanics);
}

#[test]
fn check_lists_every_broken_app_not_just_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(1, 1).app("fine", "echo", "").app("down", "testkit", "fail_start = \"db is down\"").app_at(
        "ghost",
        &dir.path().join("libghost.so"),
        "",
        "127.0.0.1:0",
    );
    let config = setup.write_to(dir.path());
    let (code, out, err) = cli(&["check"], &config);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("app fine: ok"), "{out}");
    assert!(err.contains("db is down") && err.contains("libghost.so"), "{err}");
}

#[test]
fn the_server_refuses_to_start_with_a_missing_plugin() {
    assert_start_refused(Fault::Missing);
}

#[test]
fn the_server_refuses_to_start_with_a_text_file_as_plugin() {
    assert_start_refused(Fault::TextFile);
}

#[test]
fn the_server_refuses_to_start_with_a_library_that_is_not_an_app() {
    assert_start_refused(Fault::NotAnApp);
}

#[test]
fn the_server_refuses_to_start_with_the_wrong_magic() {
    assert_start_refused(Fault::WrongMagic);
}

#[test]
fn the_server_refuses_to_start_with_another_abi_major() {
    assert_start_refused(Fault::Abi99);
}

#[test]
fn the_server_refuses_to_start_when_an_app_start_fails() {
    assert_start_refused(Fault::StartFails);
}

#[test]
fn the_server_refuses_to_start_when_an_app_start_panics() {
    assert_start_refused(Fault::StartPanics);
}

#[test]
fn a_config_error_stops_the_start_with_file_and_line() {
    let setup = Setup::new(1, 1).server("frobnicate", "1").app("echo", "echo", "");
    let mut server = TestServer::spawn(&setup);
    let status = server.wait_exit(READY_TIMEOUT);
    let log = server.log();
    assert_eq!(status.code(), Some(1), "exited {status}; log:\n{log}");
    let text = std::fs::read_to_string(&server.config).unwrap();
    let line = text.lines().position(|l| l.starts_with("frobnicate")).unwrap() + 1;
    let at = format!("{}:{line}:", server.config.display());
    assert!(log.contains(&at), "stderr does not point at {at}:\n{log}");
    assert!(log.contains("frobnicate"), "stderr does not name the key:\n{log}");
    assert!(!server.control_socket().exists());
}

#[test]
fn the_echo_app_is_under_30_lines_without_unsafe() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("app-plugins/echo/src/lib.rs");
    let source = std::fs::read_to_string(&path).unwrap();
    let app = source.split("#[cfg(test)]").next().unwrap();
    let lines = app.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(lines < 30, "{} has {lines} non-blank lines outside its tests", path.display());
    assert!(!app.contains("unsafe"), "{} uses unsafe", path.display());
    assert!(app.contains("export_app!"), "{} does not export its app with the SDK macro", path.display());
}

/// A FIFO (named pipe) in `dir`: opening it for reading blocks until a writer comes.
fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    path
}

/// Runs `fdtserver check` on `config` in a process group of its own, waiting at most `limit`;
/// then kills whatever is left of the group. Returns (exit code if it exited, how long it took,
/// stdout, stderr).
fn check_within(config: &Path, limit: std::time::Duration) -> (Option<i32>, std::time::Duration, String, String) {
    let dir = config.parent().unwrap();
    let (out_path, err_path) = (dir.join("check.out"), dir.join("check.err"));
    let mut cmd = Command::new(BIN);
    cmd.arg("check").arg("--config").arg(config);
    cmd.stdout(std::fs::File::create(&out_path).unwrap()).stderr(std::fs::File::create(&err_path).unwrap());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut code = None;
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            code = Some(status.code().unwrap_or(-1));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let took = started.elapsed();
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (code, took, read(&out_path), read(&err_path))
}

#[test]
fn check_refuses_a_fifo_as_plugin_at_once_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = fifo(dir.path(), "libpipe.so");
    let config = Setup::new(1, 1).app_at("piped", &pipe, "", "127.0.0.1:0").write_to(dir.path());
    let (code, took, out, err) = check_within(&config, std::time::Duration::from_secs(20));
    assert_eq!(code, Some(1), "check did not exit 1 within 20 s (took {took:?}); stdout:\n{out}\nstderr:\n{err}");
    assert!(took < std::time::Duration::from_secs(5), "check took {took:?}");
    assert!(err.contains(&pipe.display().to_string()) && err.contains("FIFO"), "{err}");
    assert!(!out.contains("piped: ok"), "{out}");
}

#[test]
fn check_gives_up_on_an_app_whose_start_hangs_and_its_child_dies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang");
    std::fs::write(&hang, "").unwrap();
    let setup = Setup::new(1, 1).server("boot_timeout", "1").app(
        "kit",
        "testkit",
        &format!("hang_at_start_if = \"{}\"", hang.display()),
    );
    let config = setup.write_to(dir.path());

    // Killed: the child that runs the apps goes with it.
    let mut cmd = Command::new(BIN);
    cmd.arg("check").arg("--config").arg(&config).stdout(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut check = cmd.spawn().unwrap();
    let children = format!("/proc/{0}/task/{0}/children", check.id());
    let child: i32 = wait_for(READY_TIMEOUT, "the check process to start its child", || {
        std::fs::read_to_string(&children).ok()?.split_whitespace().next()?.parse().ok()
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(check.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = check.wait();
    let outlived = std::panic::catch_unwind(|| {
        wait_for(std::time::Duration::from_secs(3), "the check child to die with its parent", || {
            (!alive(child)).then_some(())
        })
    });
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(check.id() as i32), nix::sys::signal::Signal::SIGKILL);
    assert!(outlived.is_ok(), "the check child {child} outlived its parent");

    // Left alone: it gives up after boot_timeout (1 s) + 5 s, saying why.
    let (code, took, out, err) = check_within(&config, std::time::Duration::from_secs(20));
    assert_eq!(code, Some(1), "check did not exit 1 within 20 s (took {took:?}); stdout:\n{out}\nstderr:\n{err}");
    assert!(took < std::time::Duration::from_secs(12), "check took {took:?}");
    assert!(err.contains("did not start within") && err.contains("boot_timeout"), "{err}");
}

#[test]
fn a_reload_to_a_fifo_plugin_is_refused_at_once_and_the_old_generation_keeps_serving() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let generation = server.generation();
    let pipe = fifo(server.dir.path(), "libpipe.so");
    server.write_config(&Setup::new(1, 1).app_at("echo", &pipe, "", "127.0.0.1:0"));

    let asked = std::time::Instant::now();
    let (code, body) = server.reload();
    let took = asked.elapsed();
    assert_eq!(code, 409, "{body}");
    assert!(took < std::time::Duration::from_secs(5), "the reload took {took:?}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(&pipe.display().to_string()) && error.contains("FIFO"), "{body}");

    // The master is not stuck: it answers, serves with the old generation, and stops on TERM.
    assert_eq!(server.generation(), generation);
    let mut c = LineClient::connect(server.addr("echo"));
    assert_eq!(c.ask("still serving"), "still serving");
    drop(c);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(std::time::Duration::from_secs(10)).success(), "{}", server.log());
}

#[test]
fn a_reload_to_a_fifo_as_error_log_is_refused_at_once() {
    let mut server = TestServer::start(&Setup::new(1, 1).app("echo", "echo", ""));
    let generation = server.generation();
    let pipe = fifo(server.dir.path(), "error.log");
    server.write_config(
        &Setup::new(1, 1).app("echo", "echo", "").server("error_log", &format!("\"{}\"", pipe.display())),
    );
    let asked = std::time::Instant::now();
    let (code, body) = server.reload();
    assert_eq!(code, 409, "{body}");
    assert!(asked.elapsed() < std::time::Duration::from_secs(5), "the reload took {:?}", asked.elapsed());
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(&pipe.display().to_string()) && error.contains("FIFO"), "{body}");
    assert_eq!(server.generation(), generation);
    assert_eq!(LineClient::connect(server.addr("echo")).ask("still serving"), "still serving");
    server.assert_running();
}
