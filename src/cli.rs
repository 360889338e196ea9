//! The command line: parses arguments and runs the server or one of the client commands.
//!
//! Exit codes live in [`exit`]; every failure prints one line per problem on stderr.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control::{self, ClientError};
use crate::txn::TxnCommand;

/// Exit codes of every `fdtserver` command.
pub mod exit {
    pub const OK: i32 = 0;
    /// Could not start, invalid config, no server answering, refused reload, …
    pub const FAILURE: i32 = 1;
    /// `txn recover`: in-doubt transactions remain that only their coordinator can settle.
    pub const IN_DOUBT: i32 = 2;
}

#[derive(Parser)]
#[command(name = "fdtserver", version, about = "A pre-forking multi-process TCP server with reloadable app plugins")]
struct Cli {
    /// The config file (TOML).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and load every app plugin in a throw-away process.
    Check,
    /// Show the running server's master, generations and workers.
    Status {
        /// Print the JSON of the control API.
        #[arg(long)]
        json: bool,
    },
    /// Reload config and apps, and wait for the outcome.
    Reload,
    /// Stop gracefully and wait until the master has exited.
    Stop,
    /// Take this node out of its load balancer's rotation (the agent check answers `drain`),
    /// or put it back in (`up ready`), and wait until a load balancer's check has heard it.
    Rotation {
        #[arg(value_enum)]
        direction: RotationArg,
        /// Do not wait for the next agent check.
        #[arg(long)]
        no_wait: bool,
    },
    /// Prepared (in-doubt) transactions of the configured databases.
    Txn {
        #[command(subcommand)]
        action: TxnAction,
    },
    /// Emit one event on the running server's bus (to every worker, and other servers sharing
    /// its `[events]` database).
    Emit {
        /// `A-Z a-z 0-9 . _ - :`, up to 128.
        topic: String,
        payload: String,
    },
    /// Print `TOPIC PAYLOAD` for every event on the running server's bus whose topic PATTERN
    /// takes (`*`, `prefix.*`, or a topic), until interrupted.
    Subscribe { pattern: String },
    /// Internal: the throw-away child of `check`.
    #[command(name = "__check-apps", hide = true)]
    CheckApps,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RotationArg {
    In,
    Out,
}

#[derive(Subcommand)]
enum TxnAction {
    /// List prepared transactions: gid, database, owner, age.
    List,
    /// Commit one prepared transaction.
    Commit { gid: String },
    /// Roll back one prepared transaction.
    Rollback { gid: String },
    /// Settle every prepared transaction this node coordinated whose coordinator is gone
    /// (exit 2 if others remain).
    Recover {
        /// Also leave alone what was prepared less than this many seconds ago. Default: 0 (a
        /// live coordinator is recognised without it).
        #[arg(long, value_name = "SECS")]
        min_age: Option<f64>,
        /// Settle what the node NODE coordinated (from any node configured with the same
        /// databases), instead of this node's `node_id`.
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
}

/// Entry point of the binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let Some(config_path) = cli.config else {
        eprintln!("fdtserver: --config FILE is required (for example: fdtserver --config config/example.toml)");
        return exit::FAILURE;
    };
    match cli.command {
        None => crate::master::run(&config_path),
        Some(Command::Check) => check(&config_path),
        Some(Command::Status { json }) => status(&config_path, json),
        Some(Command::Reload) => reload(&config_path),
        Some(Command::Stop) => stop(&config_path),
        Some(Command::Rotation { direction, no_wait }) => rotation(&config_path, direction, !no_wait),
        Some(Command::Txn { action }) => crate::txn::run(
            &config_path,
            match action {
                TxnAction::List => TxnCommand::List,
                TxnAction::Commit { gid } => TxnCommand::Commit(gid),
                TxnAction::Rollback { gid } => TxnCommand::Rollback(gid),
                TxnAction::Recover { min_age, node } => TxnCommand::Recover { min_age, node },
            },
        ),
        Some(Command::CheckApps) => check_apps(&config_path),
        Some(Command::Emit { topic, payload }) => emit(&config_path, &topic, &payload),
        Some(Command::Subscribe { pattern }) => subscribe(&config_path, &pattern),
    }
}

fn load(path: &Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        for p in &e.problems {
            eprintln!("fdtserver: {p}");
        }
        exit::FAILURE
    })
}

/// `check`: config first, then the apps in a child process (never in this one: a plugin may
/// crash or leave threads behind). The child dies with this process (`PR_SET_PDEATHSIG`), and
/// this process waits for it at most `boot_timeout` + [`CHECK_MARGIN`] (the time the server
/// gives a generation to start its apps), then kills it and says so.
fn check(path: &Path) -> i32 {
    use std::io::Read;
    use std::process::Stdio;
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // What the server opens, opened now: a config it would refuse must not pass.
    let path_problems = crate::preflight::check(&config);
    for p in &path_problems {
        eprintln!("fdtserver: {}: {p}", config.path.display());
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("fdtserver: cannot find my own executable: {e}");
            return exit::FAILURE;
        }
    };
    let child = std::process::Command::new(exe)
        .arg("__check-apps")
        .arg("--config")
        .arg(&config.path)
        .env(CHECK_PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fdtserver: cannot start the check process: {e}");
            return exit::FAILURE;
        }
    };
    // Read both pipes while waiting, so a chatty app cannot fill one and stall.
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let limit = config.server.boot_timeout + CHECK_MARGIN;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                eprintln!("fdtserver: cannot wait for the check process: {e}");
                let _ = child.kill();
                let _ = child.wait();
                return exit::FAILURE;
            }
        }
    };
    // The child is gone, so its pipes are at end of file (unless an app started a process that
    // kept them: then what was read so far is all we wait for).
    let read = |h: std::thread::JoinHandle<Vec<u8>>| {
        let until = Instant::now() + Duration::from_secs(1);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if h.is_finished() { h.join().unwrap_or_default() } else { Vec::new() }
    };
    print!("{}", String::from_utf8_lossy(&read(stdout)));
    eprint!("{}", String::from_utf8_lossy(&read(stderr)));
    match status {
        Some(s) if s.success() && !path_problems.is_empty() => exit::FAILURE,
        Some(s) if s.success() => {
            println!("{}: ok", config.path.display());
            exit::OK
        }
        Some(s) => {
            if s.code().is_none() {
                eprintln!("fdtserver: an app crashed the check process ({s})");
            }
            exit::FAILURE
        }
        None => {
            eprintln!(
                "fdtserver: the apps of {} did not start within {} s (boot_timeout + {} s): an app's start hangs; stopped the check",
                config.path.display(),
                limit.as_secs_f64(),
                CHECK_MARGIN.as_secs()
            );
            exit::FAILURE
        }
    }
}

/// How much longer than `boot_timeout` `check` waits for its child (which also loads the config
/// and the plugins).
const CHECK_MARGIN: Duration = Duration::from_secs(5);
/// Tells the check child the pid of the `check` process it must not outlive.
const CHECK_PARENT_ENV: &str = "FDTSERVER_CHECK_PARENT";

/// The child of `check`: starts and stops every app that a listener uses.
fn check_apps(path: &Path) -> i32 {
    // Dies with `check` (a kill of `check` must not leave an app running); if `check` is gone
    // already, the signal would never come: exit now.
    if let Ok(parent) = std::env::var(CHECK_PARENT_ENV) {
        if let Err(e) = crate::sys::set_parent_death_signal(nix::sys::signal::Signal::SIGKILL) {
            eprintln!("fdtserver: cannot tie the check process to its parent: {e}");
            return exit::FAILURE;
        }
        if nix::unistd::getppid().as_raw().to_string() != parent {
            return exit::FAILURE;
        }
    }
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init("check", log::LevelFilter::Warn);
    // Start the apps as the workers would: as `user`, if one is configured.
    match crate::privileges::resolve(config.server.user.as_deref(), config.server.group.as_deref())
        .and_then(|identity| identity.map_or(Ok(()), |i| crate::privileges::drop_to(&i)))
    {
        Ok(()) => {}
        Err(e) => {
            eprintln!("fdtserver: {}: {e}", config.path.display());
            return exit::FAILURE;
        }
    }
    let mut failed = false;
    let server_id = crate::bus::server_id(&config.server.control_socket);
    // Every app: the server starts one that no listener names too.
    for app in config.apps.values() {
        let ctx = crate::plugin::StartContext {
            app_name: &app.name,
            settings_toml: &app.settings_toml,
            node_id: &config.server.node_id,
            databases_toml: &config.databases_toml(),
            worker_pid: std::process::id(),
            generation: 0,
            setting_lines: &app.setting_lines,
            app_index: 0,
            server_id: &server_id,
            events_database: "",
        };
        // Never block on the file: a FIFO or a device at the plugin path is refused, as the
        // master refuses it.
        if let Err(e) = crate::plugin::pin::open_regular(&app.plugin) {
            failed = true;
            eprintln!("fdtserver: app {} ({}): {e}", app.name, app.plugin.display());
            continue;
        }
        match crate::plugin::App::start(&app.plugin, &ctx) {
            Ok(started) => {
                let d = started.describe.clone();
                started.stop();
                println!(
                    "app {}: ok ({}, {}; fdt-sdk {}, {})",
                    app.name,
                    d.app_type,
                    app.plugin.display(),
                    d.sdk_version,
                    d.rustc_version
                );
            }
            Err(e) => {
                failed = true;
                eprintln!("fdtserver: app {} ({}): {e}", app.name, app.plugin.display());
            }
        }
    }
    if failed { exit::FAILURE } else { exit::OK }
}

fn emit(path: &Path, topic: &str, payload: &str) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::bus::emit_command(&config, topic, payload) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("fdtserver: emit: {e}");
            exit::FAILURE
        }
    }
}

fn subscribe(path: &Path, pattern: &str) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Until interrupted; the process ends with it, so the flag may live as long.
    let stop: &'static std::sync::Arc<std::sync::atomic::AtomicBool> = Box::leak(Box::default());
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(signal, stop.clone());
    }
    let mut out = std::io::stdout().lock();
    match crate::bus::subscribe_command(&config, pattern, &mut out, stop) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("fdtserver: subscribe: {e}");
            exit::FAILURE
        }
    }
}

fn client_error(e: ClientError) -> i32 {
    eprintln!("fdtserver: {e}");
    exit::FAILURE
}

fn status(path: &Path, json: bool) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (code, body) = match control::request(&config.server.control_socket, "GET", "/status", Duration::from_secs(10))
    {
        Ok(r) => r,
        Err(e) => return client_error(e),
    };
    if code != 200 {
        eprintln!("fdtserver: status failed ({code}): {}", body.trim());
        return exit::FAILURE;
    }
    if json {
        print!("{body}");
        return exit::OK;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        eprintln!("fdtserver: the server sent a status that is not JSON");
        return exit::FAILURE;
    };
    print!("{}", format_status(&v));
    exit::OK
}

/// The human-readable `status` table.
fn format_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "master pid {}  generation {}  up {:.0} s  {}",
        v["pid"],
        v["generation"],
        v["uptime_secs"].as_f64().unwrap_or(0.0),
        v["state"].as_str().unwrap_or("?")
    );
    for l in v["listeners"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "listening on {} ({}) for app {}",
            l["bound"].as_str().unwrap_or("-"),
            l["address"].as_str().unwrap_or("?"),
            l["app"].as_str().unwrap_or("?")
        );
    }
    match v["agent_check"]["address"].as_str() {
        Some(address) => {
            let _ = writeln!(
                out,
                "rotation: {}; the agent check on {address} answers {} ({} checks{})",
                v["rotation"].as_str().unwrap_or("?"),
                v["agent_check"]["answer"],
                v["agent_check"]["checks"],
                v["agent_check"]["last_check_secs"]
                    .as_f64()
                    .map(|s| format!(", the last {s:.1} s ago"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "rotation: {} (no agent_check)", v["rotation"].as_str().unwrap_or("?"));
        }
    }
    let _ = writeln!(
        out,
        "reloads: {} ok, {} failed; worker restarts: {}",
        v["reloads"]["ok"], v["reloads"]["failed"], v["worker_restarts"]
    );
    if let Some(e) = v["reloads"]["last_error"].as_str() {
        let _ = writeln!(out, "last reload error: {e}");
    }
    let kills = &v["worker_kills"];
    let _ = writeln!(
        out,
        "workers killed: {} hung (heartbeat_timeout), {} stuck request (request_timeout), {} slow start; recycled (max_requests): {}",
        kills["heartbeat_timeout"], kills["request_timeout"], kills["boot_timeout"], v["worker_recycles"]
    );
    let draining = &v["draining"];
    if draining["workers"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "draining: {} generation(s), {} worker(s), {} connection(s) left{}",
            draining["generations"],
            draining["workers"],
            draining["connections"],
            draining["oldest_since_secs"].as_f64().map(|s| format!(", oldest for {s:.1} s")).unwrap_or_default()
        );
    }
    if let Some(pid) = v["upgrade"]["new_master"].as_i64() {
        let _ = writeln!(out, "binary upgrade under way: new master pid {pid}");
    }
    if let Some(pid) = v["upgrade"]["old_master_draining"].as_i64() {
        let _ = writeln!(out, "binary upgrade: the old master (pid {pid}) is still draining");
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:>4} {:>4} {:<9} {:>8} {:>10} {:>7}",
        "PID", "GEN", "SLOT", "STATE", "CONNS", "REQUESTS", "PANICS"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let n = |key: &str| w[key].to_string();
        let _ = writeln!(
            out,
            "{:>8} {:>4} {:>4} {:<9} {:>8} {:>10} {:>7}",
            n("pid"),
            n("generation"),
            n("slot"),
            w["state"].as_str().unwrap_or("?"),
            n("connections"),
            n("requests"),
            n("panics")
        );
    }
    out
}

fn reload(path: &Path) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The server answers once the new generation is ready or refused: give it boot_timeout.
    let timeout = config.server.boot_timeout + Duration::from_secs(10);
    match control::request(&config.server.control_socket, "POST", "/reload", timeout) {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            println!("reloaded: generation {} is serving", v["generation"]);
            exit::OK
        }
        Ok((_, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let reason = v["error"].as_str().map(str::to_string).unwrap_or(body);
            eprintln!("fdtserver: reload refused: {}; the old generation keeps serving", reason.trim());
            exit::FAILURE
        }
        Err(e) => client_error(e),
    }
}

/// How long `rotation` waits for a load balancer's next agent check (HAProxy checks every
/// `agent-inter`, 2 s by default).
const AGENT_HEARD_WAIT: Duration = Duration::from_secs(10);

fn rotation(path: &Path, direction: RotationArg, wait: bool) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let socket = &config.server.control_socket;
    let endpoint = match direction {
        RotationArg::In => "/rotation/in",
        RotationArg::Out => "/rotation/out",
    };
    let v: serde_json::Value = match control::request(socket, "POST", endpoint, Duration::from_secs(10)) {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
        Ok((code, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let reason = v["error"].as_str().map(str::to_string).unwrap_or(body);
            eprintln!("fdtserver: rotation refused ({code}): {}", reason.trim());
            return exit::FAILURE;
        }
        Err(e) => return client_error(e),
    };
    let node = v["node_id"].as_str().unwrap_or("?");
    let state = match direction {
        RotationArg::In => "in rotation",
        RotationArg::Out => "out of rotation",
    };
    let already = if v["changed"] == false { "already " } else { "" };
    let Some(address) = v["agent_check"].as_str() else {
        println!("{node}: {already}{state}");
        eprintln!("fdtserver: note: no agent_check is configured, so no load balancer hears of it");
        return exit::OK;
    };
    println!("{node}: {already}{state}; the agent check on {address} answers {}", v["answer"]);
    if !wait {
        return exit::OK;
    }
    // Any check answered after the change carries it.
    let before = v["checks"].as_u64().unwrap_or(0);
    let started = Instant::now();
    while started.elapsed() < AGENT_HEARD_WAIT {
        let status = control::request(socket, "GET", "/status", Duration::from_secs(10))
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok());
        let agent = status.as_ref().map(|s| &s["agent_check"]);
        if let Some(agent) = agent
            && agent["checks"].as_u64().is_some_and(|n| n > before)
        {
            println!(
                "a load balancer's agent check heard {} {:.1} s later",
                agent["last_answer"],
                started.elapsed().as_secs_f64()
            );
            return exit::OK;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "fdtserver: warning: no agent check came to {address} within {} s: is the load balancer's `agent-check` pointed there (agent-port)?",
        AGENT_HEARD_WAIT.as_secs()
    );
    exit::OK
}

fn stop(path: &Path) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let socket = &config.server.control_socket;
    let master_pid = control::request(socket, "GET", "/status", Duration::from_secs(10))
        .ok()
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["pid"].as_i64());
    match control::request(socket, "POST", "/stop", Duration::from_secs(10)) {
        Ok((202, _)) => {}
        Ok((code, body)) => {
            eprintln!("fdtserver: stop failed ({code}): {}", body.trim());
            return exit::FAILURE;
        }
        Err(e) => return client_error(e),
    }
    let deadline = Instant::now() + config.server.graceful_timeout + Duration::from_secs(15);
    while Instant::now() < deadline {
        let exited = match master_pid {
            Some(pid) => !process_alive(pid as i32),
            // The master removes its control socket as it exits.
            None => std::os::unix::net::UnixStream::connect(socket).is_err(),
        };
        if exited {
            println!("stopped");
            return exit::OK;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("fdtserver: the server did not exit within graceful_timeout + 15 s");
    exit::FAILURE
}

/// True while `pid` runs (a zombie waiting for its parent counts as exited).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_shows_the_last_reload_error_a_drain_and_a_binary_upgrade_under_way() {
        let v = serde_json::json!({
            "pid": 4242, "generation": 3, "uptime_secs": 12.4, "state": "running",
            "listeners": [{"bound": "127.0.0.1:8080", "address": "127.0.0.1:8080", "app": "echo"}],
            "reloads": {"ok": 2, "failed": 1, "last_error": "app echo: plugin /x.so: missing"},
            "worker_restarts": 0,
            "worker_kills": {"heartbeat_timeout": 0, "request_timeout": 0, "boot_timeout": 0},
            "worker_recycles": 0,
            "draining": {"generations": 1, "workers": 2, "connections": 5, "oldest_since_secs": 3.25},
            "upgrade": {"new_master": 5151},
            "rotation": "out",
            "agent_check": {"address": "127.0.0.1:9101", "answer": "drain", "checks": 7, "last_check_secs": 0.25},
            "workers": [{"pid": 77, "generation": 3, "slot": 0, "state": "serving", "connections": 1, "requests": 9, "panics": 0}]
        });
        let text = format_status(&v);
        assert!(text.starts_with("master pid 4242  generation 3  up 12 s  running\n"), "{text}");
        assert!(text.contains("last reload error: app echo: plugin /x.so: missing\n"), "{text}");
        assert!(
            text.contains("draining: 1 generation(s), 2 worker(s), 5 connection(s) left, oldest for 3.2 s\n"),
            "{text}"
        );
        assert!(text.contains("binary upgrade under way: new master pid 5151\n"), "{text}");
        assert!(
            text.contains(
                "rotation: out; the agent check on 127.0.0.1:9101 answers \"drain\" (7 checks, the last 0.2 s ago)\n"
            ),
            "{text}"
        );
        // Without them, none of these lines.
        let mut quiet = v.clone();
        quiet["reloads"]["last_error"] = serde_json::Value::Null;
        quiet["draining"]["workers"] = 0.into();
        quiet["upgrade"]["new_master"] = serde_json::Value::Null;
        quiet["rotation"] = "in".into();
        quiet["agent_check"] = serde_json::Value::Null;
        let text = format_status(&quiet);
        assert!(text.contains("rotation: in (no agent_check)\n"), "{text}");
        for absent in ["last reload error", "draining:", "binary upgrade"] {
            assert!(!text.contains(absent), "{absent}: {text}");
        }
    }

    #[test]
    fn stop_counts_a_master_that_exited_or_is_a_zombie_as_gone() {
        assert!(process_alive(std::process::id() as i32));
        // Exited and not reaped yet: a zombie.
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let pid = zombie.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) {
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Reaped: no /proc entry at all.
        zombie.wait().unwrap();
        assert!(!process_alive(pid));
    }
}
