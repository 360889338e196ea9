//! The one helper every integration test uses: [`TestServer`] starts the real `fdtserver`
//! binary with real plugins in a temp dir, waits for it to serve (by asking its control
//! socket, never by sleeping), and kills its whole process group on drop, printing its log if
//! the test failed.
#![allow(dead_code)]

pub mod haproxy;
pub mod pg;
pub mod tls;

impl pg::PgCluster {
    /// Writes `dir/fdt.toml`: a `bank` over this cluster's databases `a` and `b` as node `node`
    /// (for `fdtserver txn`, which needs no running server); returns its path.
    pub fn bank_config(&self, dir: &std::path::Path, node: &str) -> std::path::PathBuf {
        let setup = Setup::new(1, 1)
            .app("bank", "bank", "databases = [\"a\", \"b\"]")
            .server("node_id", &format!("\"{node}\""))
            .extra(&format!("[database.a]\nurl = \"{}\"\n[database.b]\nurl = \"{}\"\n", self.url("a"), self.url("b")));
        setup.write_to(dir)
    }
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_fdtserver");
/// Everything a test waits for must happen within this, or the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the workspace build put a plugin (`libfdt_<name>.so` beside the binary).
pub fn plugin(name: &str) -> PathBuf {
    let path = Path::new(BIN).parent().unwrap().join(format!("libfdt_{name}.so"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with `cargo build --workspace` (the README's test command does)",
        path.display()
    );
    path
}

/// Writes `dir/fdt.toml`: one worker with one thread serving the echo app, with `server` as line
/// 4 (in `[server]`), `listen` (when not empty) as line 9 (in its `[[listen]]`), and `settings`
/// under `[app.echo]`.
pub fn echo_config(dir: &Path, server: &str, listen: &str, settings: &str) -> PathBuf {
    let listen = if listen.is_empty() { String::new() } else { format!("{listen}\n") };
    let text = format!(
        "[server]\nworkers = 1\nthreads = 1\n{server}\n\n[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"echo\"\n\
         {listen}\n[app.echo]\nplugin = \"{}\"\n{settings}\n",
        plugin("echo").display()
    );
    let path = dir.join("fdt.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `check` fails with every text of `wanted` in its error output.
pub fn check_refuses(config: &Path, wanted: &[&str]) {
    let (code, out, err) = cli(&["check"], config);
    assert_eq!(code, 1, "check must refuse it; stdout: {out}\nstderr: {err}");
    for w in wanted {
        assert!(err.contains(w), "check's error must say {w:?}: {err}");
    }
}

/// The server refuses to start (exit 1) with every text of `wanted` on stderr.
pub fn server_refuses(config: &Path, wanted: &[&str]) {
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("TMPDIR", config.parent().unwrap())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the server must refuse it: {err}");
    for w in wanted {
        assert!(err.contains(w), "the server's error must say {w:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// Compiles `source` (C) into the shared library `dir/name` with gcc.
pub fn gcc_shared(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    let so = dir.join(name);
    std::fs::write(&c, source).unwrap();
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .expect("gcc is needed to build the test's C libraries, and it cannot be run");
    assert!(out.status.success(), "gcc failed: {}", String::from_utf8_lossy(&out.stderr));
    so
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One `[app.NAME]` table.
#[derive(Clone)]
pub struct AppSpec {
    pub name: String,
    pub plugin: PathBuf,
    pub settings: String,
}

/// A config under construction; [`TestServer::start`] writes it out.
#[derive(Clone)]
pub struct Setup {
    pub server: BTreeMap<String, String>,
    pub apps: Vec<AppSpec>,
    /// (address, app)
    pub listen: Vec<(String, String)>,
    /// More TOML, appended as is (`[database.NAME]` tables, say).
    pub extra: String,
    /// More keys of an app's `[[listen]]` table (TLS, PROXY protocol), by app.
    pub listen_keys: BTreeMap<String, String>,
}

impl Setup {
    /// `workers` workers of `threads` threads, a 10 s graceful_timeout, no listener yet.
    pub fn new(workers: usize, threads: usize) -> Setup {
        let mut server = BTreeMap::new();
        server.insert("workers".into(), workers.to_string());
        server.insert("threads".into(), threads.to_string());
        server.insert("graceful_timeout".into(), "10".into());
        server.insert("boot_timeout".into(), "10".into());
        server.insert("log_level".into(), "\"debug\"".into());
        Setup { server, apps: Vec::new(), listen: Vec::new(), extra: String::new(), listen_keys: BTreeMap::new() }
    }

    /// Sets a `[server]` key to a TOML value.
    pub fn server(mut self, key: &str, toml_value: &str) -> Setup {
        self.server.insert(key.into(), toml_value.into());
        self
    }

    /// Adds `[app.NAME]` with the shipped plugin `plugin_name` and a listener on 127.0.0.1:0.
    pub fn app(self, name: &str, plugin_name: &str, settings: &str) -> Setup {
        self.app_at(name, &plugin(plugin_name), settings, "127.0.0.1:0")
    }

    /// Adds keys (TOML lines) to the `[[listen]]` table of `app`.
    pub fn listener_keys(mut self, app: &str, toml: &str) -> Setup {
        let keys = self.listen_keys.entry(app.into()).or_default();
        keys.push_str(toml);
        keys.push('\n');
        self
    }

    /// Appends raw TOML to the config.
    pub fn extra(mut self, toml: &str) -> Setup {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Adds `[app.NAME]` from the workspace's plugin `plugin_name` with no `[[listen]]` naming
    /// it: a service that serves nothing.
    pub fn app_without_listener(mut self, name: &str, plugin_name: &str, settings: &str) -> Setup {
        self.apps.push(AppSpec { name: name.into(), plugin: plugin(plugin_name), settings: settings.into() });
        self
    }

    pub fn app_at(mut self, name: &str, plugin: &Path, settings: &str, address: &str) -> Setup {
        self.apps.push(AppSpec { name: name.into(), plugin: plugin.to_path_buf(), settings: settings.into() });
        self.listen.push((address.into(), name.into()));
        self
    }

    /// Writes the config as `dir/fdt.toml` (its control socket in `dir`); returns its path.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        let config = dir.join("fdt.toml");
        std::fs::write(&config, self.render(dir)).unwrap();
        config
    }

    pub fn render(&self, dir: &Path) -> String {
        let mut text = String::from("[server]\n");
        for (k, v) in &self.server {
            text.push_str(&format!("{k} = {v}\n"));
        }
        if !self.server.contains_key("control_socket") {
            text.push_str(&format!("control_socket = \"{}\"\n", dir.join("control.sock").display()));
        }
        for (address, app) in &self.listen {
            text.push_str(&format!("\n[[listen]]\naddress = \"{address}\"\napp = \"{app}\"\n"));
            text.push_str(self.listen_keys.get(app).map_or("", String::as_str));
        }
        for a in &self.apps {
            text.push_str(&format!("\n[app.{}]\nplugin = \"{}\"\n{}\n", a.name, a.plugin.display(), a.settings));
        }
        text.push('\n');
        text.push_str(&self.extra);
        text
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    /// Its control socket: `control.sock` in `dir`, or where the setup's `control_socket` says.
    control: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub pid: i32,
    exited: Option<ExitStatus>,
}

impl TestServer {
    /// Starts the server and waits until its first generation serves.
    pub fn start(setup: &Setup) -> TestServer {
        let server = TestServer::spawn(setup);
        server.wait_serving();
        server
    }

    /// Starts the server without waiting.
    pub fn spawn(setup: &Setup) -> TestServer {
        TestServer::spawn_with(setup, server_command)
    }

    /// Starts the server with the command `make` builds from the config file's path (to set
    /// environment variables, pass fds, or start it through a wrapper that `exec`s it), and
    /// waits until it serves.
    pub fn start_with(setup: &Setup, make: impl FnOnce(&Path) -> Command) -> TestServer {
        let server = TestServer::spawn_with(setup, make);
        server.wait_serving();
        server
    }

    /// [`TestServer::start_with`] without waiting.
    pub fn spawn_with(setup: &Setup, make: impl FnOnce(&Path) -> Command) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fdt.toml");
        std::fs::write(&config, setup.render(dir.path())).unwrap();
        let log = dir.path().join("server.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = make(&config);
        // The server's runtime files (pinned plugin copies) go inside the test's directory, so
        // that nothing is left behind even when the server is killed.
        if !cmd.get_envs().any(|(k, _)| k == "TMPDIR") {
            let tmp = dir.path().join("tmp");
            std::fs::create_dir(&tmp).unwrap();
            cmd.env("TMPDIR", tmp);
        }
        cmd.stdin(Stdio::null()).stdout(log_file.try_clone().unwrap()).stderr(log_file);
        // Its own process group, so that drop can kill the master and every worker at once.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("cannot start fdtserver");
        let pid = child.id() as i32;
        let control = match setup.server.get("control_socket") {
            Some(value) => dir.path().join(value.trim_matches('"')),
            None => dir.path().join("control.sock"),
        };
        TestServer { dir, control, config, child: Some(child), log, pid, exited: None }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.control.clone()
    }

    /// The `TMPDIR` the server was started with (unless the test set its own).
    pub fn tmpdir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// Rewrites the config file (for a reload).
    pub fn write_config(&self, setup: &Setup) {
        std::fs::write(&self.config, setup.render(self.dir.path())).unwrap();
    }

    /// One control API request: (status, body).
    pub fn control(&self, method: &str, path: &str) -> Option<(u16, String)> {
        let mut s = std::os::unix::net::UnixStream::connect(self.control_socket()).ok()?;
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: fdt\r\nConnection: close\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        Some((head.split_whitespace().nth(1)?.parse().ok()?, body.to_string()))
    }

    pub fn status(&self) -> Value {
        let (code, body) = self.control("GET", "/status").expect("the control socket does not answer");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Panics (with the log) if the master has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            self.exited = Some(status);
            panic!("fdtserver exited ({status}); log:\n{}", self.log());
        }
    }

    /// Waits until a generation is active and every worker of it serves.
    pub fn wait_serving(&self) -> Value {
        wait_for(READY_TIMEOUT, "the server to serve", || {
            // (A master that exited after a binary upgrade leaves a new master to ask.)
            if self.exited.is_none() && !alive(self.pid) {
                panic!("fdtserver exited before serving; log:\n{}", self.log());
            }
            let v = self.control("GET", "/status").and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())?;
            let generation = v["generation"].as_u64()?;
            let workers: Vec<&Value> =
                v["workers"].as_array()?.iter().filter(|w| w["generation"].as_u64() == Some(generation)).collect();
            let serving = !workers.is_empty() && workers.iter().all(|w| w["state"] == "serving");
            serving.then_some(v)
        })
    }

    /// The address the server really listens on for `app` (port chosen by the kernel).
    pub fn addr(&self, app: &str) -> SocketAddr {
        let v = self.status();
        let l = v["listeners"].as_array().unwrap().iter().find(|l| l["app"] == app).expect("no such app");
        l["bound"].as_str().unwrap().parse().unwrap()
    }

    /// Pids of the workers of the active generation.
    pub fn worker_pids(&self) -> Vec<i32> {
        self.active_workers().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect()
    }

    /// The `/status` records of the active generation's workers.
    pub fn active_workers(&self) -> Vec<Value> {
        let v = self.status();
        let generation = v["generation"].as_u64();
        v["workers"].as_array().unwrap().iter().filter(|w| w["generation"].as_u64() == generation).cloned().collect()
    }

    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig).unwrap();
    }

    /// `POST /reload`: (status, body as JSON).
    pub fn reload(&self) -> (u16, Value) {
        let (code, body) = self.control("POST", "/reload").expect("no answer to POST /reload");
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// Waits for the master to exit; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let child = self.child.as_mut().unwrap();
        let status = wait_for(timeout, "fdtserver to exit", || child.try_wait().unwrap());
        self.exited = Some(status);
        status
    }

    /// Runs `fdtserver ARGS --config <this config>`; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli(args, &self.config)
    }
}

/// The plain command that runs the server on `config`.
pub fn server_command(config: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config);
    cmd
}

/// Runs `fdtserver ARGS --config CONFIG`; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).arg("--config").arg(config).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The master and every worker share the process group the master leads.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- fdtserver log ----\n{}\n---- end of log ----", self.log());
        }
    }
}

/// True while a process runs (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A line-protocol client (echo, testkit) with a read timeout.
pub struct LineClient {
    reader: BufReader<TcpStream>,
}

impl LineClient {
    pub fn connect(addr: SocketAddr) -> LineClient {
        LineClient::from_stream(TcpStream::connect(addr).expect("cannot connect"))
    }

    /// A line client over a connection already made (after a PROXY header, say).
    pub fn from_stream(s: TcpStream) -> LineClient {
        s.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
        LineClient { reader: BufReader::new(s) }
    }

    pub fn send(&mut self, line: &str) {
        self.reader.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// The next line without its newline; `None` at EOF.
    pub fn recv(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_string()),
            Err(e) => panic!("reading a line failed: {e}"),
        }
    }

    pub fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.recv().unwrap_or_else(|| panic!("connection closed instead of answering {line:?}"))
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// The socket itself (what was buffered but not read is lost).
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// True once the peer has closed the connection (EOF or reset), reading and discarding
    /// any data; false when nothing more came within the read timeout.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.reader.get_mut().read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true, // reset
            }
        }
    }
}

/// A minimal HTTP/1.1 client on one connection (keep-alive).
pub struct HttpClient {
    reader: BufReader<TcpStream>,
}

/// One HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn worker_pid(&self) -> i32 {
        self.header("X-Worker-Pid").expect("no X-Worker-Pid").parse().unwrap()
    }
    pub fn closes(&self) -> bool {
        self.header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

impl HttpClient {
    pub fn connect(addr: SocketAddr) -> std::io::Result<HttpClient> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(READY_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(HttpClient { reader: BufReader::new(s) })
    }

    /// Sends a GET and reads the answer; `Err` if the connection ended first.
    pub fn get(&mut self, path: &str) -> std::io::Result<HttpResponse> {
        self.reader.get_mut().write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
        self.read_response()
    }

    pub fn read_response(&mut self) -> std::io::Result<HttpResponse> {
        let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before an answer");
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(eof());
        }
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(eof)?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if self.reader.read_line(&mut h)? == 0 {
                return Err(eof());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                headers.push((n.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(HttpResponse { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// One request on a fresh connection.
pub fn http_get(addr: SocketAddr) -> std::io::Result<HttpResponse> {
    HttpClient::connect(addr)?.get("/")
}

/// Clients that hammer `hello` until stopped: half with a new connection per request, half
/// with keep-alive connections that follow `Connection: close`. Returns (ok, failures).
pub fn hammer(
    addr: std::net::SocketAddr,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u64, Vec<String>)>> {
    (0..clients)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                let mut failures = Vec::new();
                let mut conn: Option<HttpClient> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let keep_alive = i % 2 == 0;
                    if conn.is_none() || !keep_alive {
                        match HttpClient::connect(addr) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                failures.push(format!("connect: {e}"));
                                continue;
                            }
                        }
                    }
                    match conn.as_mut().unwrap().get("/") {
                        Ok(r) if r.status == 200 => {
                            ok += 1;
                            if r.closes() {
                                conn = None;
                            }
                        }
                        Ok(r) => failures.push(format!("status {}", r.status)),
                        Err(e) => {
                            failures.push(format!("request: {e}"));
                            conn = None;
                        }
                    }
                }
                (ok, failures)
            })
        })
        .collect()
}

/// Stops and joins the clients of [`hammer`], fails the test if any request failed, and
/// returns how many were answered.
pub fn stop_hammer(
    stop: &std::sync::atomic::AtomicBool,
    clients: Vec<std::thread::JoinHandle<(u64, Vec<String>)>>,
) -> u64 {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut total, mut failures) = (0, Vec::new());
    for c in clients {
        let (ok, f) = c.join().unwrap();
        total += ok;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    total
}
