//! A release `fdtserver` serving `hello` for the benchmark programs, killed (with its whole
//! process group) on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Starts `hello` with `workers` × `threads` and waits until every worker serves.
    pub fn start(workers: usize, threads: usize) -> Server {
        Server::start_with(workers, threads, "")
    }

    /// Like [`Server::start`], with more `[server]` keys (TOML lines).
    pub fn start_with(workers: usize, threads: usize, server_toml: &str) -> Server {
        let apps = "[[listen]]\naddress = \"127.0.0.1:0\"\napp = \"hello\"\nbacklog = 4096\n\
                    [app.hello]\nplugin = \"{plugins}/libfdt_hello.so\"\n";
        Server::start_apps(workers, threads, server_toml, apps)
    }

    /// Starts a server with `[server]` keys and its `[[listen]]` and `[app.NAME]` tables (TOML,
    /// where `{plugins}` stands for the directory of the release plugins); `addr` is its first
    /// listener's.
    pub fn start_apps(workers: usize, threads: usize, server_toml: &str, apps_toml: &str) -> Server {
        // `FDTSERVER_BIN`: a release build elsewhere (a copy on another machine).
        let bin =
            std::env::var_os("FDTSERVER_BIN").map_or(PathBuf::from(env!("CARGO_BIN_EXE_fdtserver")), PathBuf::from);
        let plugins = bin.parent().unwrap();
        let plugin = plugins.join("libfdt_hello.so");
        assert!(plugin.exists(), "{} is missing: run `cargo build --release --workspace` first", plugin.display());
        let dir = tempfile::tempdir().unwrap().keep();
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nworkers = {workers}\nthreads = {threads}\ncontrol_socket = \"{}\"\n{server_toml}\n{}",
                dir.join("control.sock").display(),
                apps_toml.replace("{plugins}", &plugins.display().to_string())
            ),
        )
        .unwrap();
        let mut cmd = Command::new(&bin);
        // Its runtime files (pinned plugin copies) go inside `dir`, removed on drop.
        cmd.arg("--config").arg(&config).env("TMPDIR", &dir).stdin(Stdio::null());
        cmd.stderr(std::fs::File::create(dir.join("server.log")).unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap();
        let mut server = Server { child, dir, addr: "127.0.0.1:1".parse().unwrap() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = server.status() {
                let w = v["workers"].as_array().cloned().unwrap_or_default();
                if w.len() == workers && w.iter().all(|w| w["state"] == "serving") {
                    server.addr = server.bound(0);
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "the server did not start; see {}", server.dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address listener `i` is bound to.
    pub fn bound(&self, i: usize) -> SocketAddr {
        self.status().unwrap()["listeners"][i]["bound"].as_str().unwrap().parse().unwrap()
    }

    pub fn control(&self, method: &str, path: &str) -> Option<(u16, serde_json::Value)> {
        control(&self.dir.join("control.sock"), method, path)
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        self.control("GET", "/status").map(|r| r.1)
    }

    /// Pids of the workers of generation `generation`.
    pub fn workers_of(&self, generation: u64) -> Vec<i32> {
        let v = self.status().unwrap_or_default();
        v["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["generation"].as_u64() == Some(generation))
            .map(|w| w["pid"].as_i64().unwrap() as i32)
            .collect()
    }
}

pub fn control(sock: &Path, method: &str, path: &str) -> Option<(u16, serde_json::Value)> {
    let (code, body) = control_raw(sock, method, path)?;
    Some((code, serde_json::from_str(&body).unwrap_or_default()))
}

/// The body of a `GET` on the control socket, as text (`/metrics`).
pub fn control_text(sock: &Path, path: &str) -> Option<String> {
    control_raw(sock, "GET", path).map(|r| r.1)
}

fn control_raw(sock: &Path, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: fdt\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// True while a process runs (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

/// Median and 99th percentile of a sample, in milliseconds.
pub fn p50_p99(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}
