//! A throw-away PostgreSQL cluster for one test: `initdb` in a temp dir, `postgres` listening
//! only on a Unix socket in that dir, with `max_prepared_transactions` set. Stopped and removed
//! on drop; if the test process dies, the postmaster gets SIGQUIT (parent-death signal) and
//! shuts down at once.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the cluster runs as the
//! `postgres` user. Binaries are found on `PATH` or under `/usr/lib/postgresql/*/bin`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_for;

pub struct PgCluster {
    pub dir: tempfile::TempDir,
    postmaster: Option<Child>,
}

/// Where `initdb` and `postgres` live.
fn bin_dir() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() {
                // Debian links only some tools onto PATH: follow the link to find `postgres`.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return real.parent().unwrap().to_path_buf();
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); .ci/run installs it")
}

/// The user the cluster runs as: `postgres` when we are root (PostgreSQL refuses root).
fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres").unwrap().expect("no `postgres` user to run PostgreSQL as");
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn command(bin: &Path, name: &str) -> Command {
    let mut cmd = Command::new(bin.join(name));
    if let Some((uid, gid)) = run_as() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl PgCluster {
    /// Starts a fresh cluster; panics (with PostgreSQL's output) if it cannot.
    pub fn start() -> PgCluster {
        PgCluster::start_with(64)
    }

    /// Starts a fresh cluster with this `max_prepared_transactions`.
    pub fn start_with(max_prepared_transactions: u32) -> PgCluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("fdt-pg").tempdir().unwrap();
        if let Some((uid, gid)) = run_as() {
            nix::unistd::chown(dir.path(), Some(uid.into()), Some(gid.into())).unwrap();
        }
        let data = dir.path().join("data");
        let out = command(&bin, "initdb")
            .args(["-D", data.to_str().unwrap(), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("cannot run initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let mut cmd = command(&bin, "postgres");
        cmd.args(["-D", data.to_str().unwrap(), "-k", dir.path().to_str().unwrap(), "-p", "5432"])
            .args(["-c", "listen_addresses=", "-c", "max_connections=200"])
            .args(["-c", &format!("max_prepared_transactions={max_prepared_transactions}")])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // If this test process dies, PostgreSQL stops (SIGQUIT: immediate shutdown).
        stop_with_parent(&mut cmd);
        let postmaster = cmd.spawn().expect("cannot start postgres");
        let cluster = PgCluster { dir, postmaster: Some(postmaster) };
        wait_for(Duration::from_secs(30), "PostgreSQL to accept connections", || {
            if cluster.dir.path().join(".s.PGSQL.5432").exists() { cluster.try_client("postgres").ok() } else { None }
        });
        cluster
    }

    /// A libpq connection string for `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        format!("host={} port=5432 user=postgres dbname={dbname}", self.dir.path().display())
    }

    fn try_client(&self, dbname: &str) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.url(dbname), postgres::NoTls)
    }

    pub fn client(&self, dbname: &str) -> postgres::Client {
        self.try_client(dbname).unwrap_or_else(|e| panic!("cannot connect to {dbname}: {e}"))
    }

    /// The gids of the transactions prepared in database `db`.
    pub fn prepared(&self, db: &str) -> Vec<String> {
        self.client(db)
            .query("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub fn create_db(&self, name: &str) {
        self.client("postgres").batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

/// Sets the parent-death signal in the child between fork and exec — after std changed its uid,
/// which would reset it.
fn stop_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            // SIGQUIT: immediate shutdown; the cluster is thrown away anyway.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- postgres log ----\n{}", self.log());
        }
    }
}
