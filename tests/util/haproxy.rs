//! HAProxy for the cluster tests: started in the foreground (`-db`) on a config the test
//! gives, in a temp dir and a process group of its own, killed on drop (its output printed if
//! the test failed). Its admin socket tells what HAProxy thinks of each server.
//!
//! When `haproxy` is not installed, [`installed_or_skip`] says so: a test then prints why it
//! is skipped, unless `FDT_REQUIRE_HAPROXY` is set (CI), where it fails.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_for;

/// True when `haproxy` can be run. When it cannot: panics if `FDT_REQUIRE_HAPROXY` is set,
/// else prints that `test` is skipped and returns false.
pub fn installed_or_skip(test: &str) -> bool {
    let installed = Command::new("haproxy").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if installed {
        return true;
    }
    if std::env::var_os("FDT_REQUIRE_HAPROXY").is_some() {
        panic!("haproxy is not installed, and FDT_REQUIRE_HAPROXY is set: apt-get install haproxy");
    }
    eprintln!("{test}: skipped: haproxy not installed (apt-get install haproxy)");
    false
}

/// A free TCP port on 127.0.0.1 below the kernel's ephemeral range (32768 and up), so that no
/// socket bound to port 0 elsewhere takes it between now and its use: a test behind HAProxy
/// needs its ports before anything listens on them.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        ^ (u64::from(std::process::id()) << 20)
        ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut x = seed | 1;
    for _ in 0..1000 {
        // xorshift: cheap and good enough to spread tests over the range.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20000 + (x % 12000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// Has the process `cmd` starts killed when the test's thread ends without dropping what
/// owns it (a test killed for its time limit runs no `Drop`).
pub fn die_with_test(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub struct HaProxy {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pid: i32,
    socket: PathBuf,
    log: PathBuf,
}

impl HaProxy {
    /// Starts haproxy on `config`, in which `@DIR@` stands for its temp dir (put the admin
    /// socket at `@DIR@/haproxy.sock`), and waits until its admin socket answers.
    pub fn start(config: &str) -> HaProxy {
        let dir = tempfile::Builder::new().prefix("fdt-haproxy").tempdir().unwrap();
        let text = config.replace("@DIR@", &dir.path().display().to_string());
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, &text).unwrap();
        let log = dir.path().join("haproxy.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        // Its own process group: drop kills it and anything it started.
        cmd.process_group(0);
        die_with_test(&mut cmd);
        let child = cmd.spawn().expect("cannot start haproxy");
        let pid = child.id() as i32;
        let mut haproxy = HaProxy { socket: dir.path().join("haproxy.sock"), dir, child: Some(child), pid, log };
        wait_for(Duration::from_secs(10), "haproxy's admin socket", || {
            if let Some(status) = haproxy.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("haproxy exited ({status}):\n{}\nconfig:\n{text}", haproxy.log());
            }
            haproxy.try_command("show info").filter(|s| s.contains("Pid:"))
        });
        haproxy
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_command(&self, command: &str) -> Option<String> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// One command on the admin socket; its answer.
    pub fn command(&self, command: &str) -> String {
        self.try_command(command).unwrap_or_else(|| panic!("haproxy's admin socket did not answer {command:?}"))
    }

    /// What HAProxy says of `backend`/`server` (the `status` column of `show stat`): `UP`,
    /// `DOWN`, `DRAIN (agent)` (drained by the agent check), `MAINT`, `UP 1/2` (going down),
    /// `DOWN 1/2` (coming up), …
    pub fn server_status(&self, backend: &str, server: &str) -> String {
        let stat = self.command("show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines.next().unwrap_or("").trim_start_matches("# ").split(',').collect();
        let column = header.iter().position(|h| *h == "status").expect("no status column in show stat");
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > column && f[0] == backend && f[1] == server)
            .map(|f| f[column].to_string())
            .unwrap_or_else(|| panic!("no server {backend}/{server} in show stat:\n{stat}"))
    }

    /// Waits until HAProxy says `wanted` of `backend`/`server`.
    pub fn wait_status(&self, backend: &str, server: &str, wanted: &str, timeout: Duration) {
        wait_for(timeout, &format!("haproxy to see {backend}/{server} {wanted}"), || {
            (self.server_status(backend, server) == wanted).then_some(())
        });
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- haproxy log ----\n{}\n---- end of haproxy log ----", self.log());
        }
    }
}
