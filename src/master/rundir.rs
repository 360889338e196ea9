//! The master's runtime directory, `$TMPDIR/fdtserver-<pid>`: the pinned plugin copies live
//! there (see `plugin::pin`).
//!
//! The master removes it when it exits. A master that never got to (killed with `SIGKILL`, a
//! machine that lost power before `/tmp` was cleared) leaves it behind, tens of MB per plugin
//! with debug info, so every master sweeps the ones left by dead masters when it starts. A
//! live master holds an exclusive `flock` on `<dir>/lock` for its whole life: whoever can take
//! that lock knows the owner is gone, whatever process now has its pid.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

const PREFIX: &str = "fdtserver-";
const LOCK: &str = "lock";

/// A runtime directory this master created and holds the lock of.
pub struct RunDir {
    path: PathBuf,
    /// Held until the master exits; never read.
    _lock: Flock<File>,
}

impl RunDir {
    /// Sweeps directories of dead masters from `parent`, then creates this master's own, with a
    /// `plugins` subdirectory. Both are mode 0755: workers that dropped to `user` load plugins
    /// from there, and only the master writes.
    pub fn create(parent: &Path) -> io::Result<RunDir> {
        let swept = sweep(parent);
        if swept > 0 {
            log::info!(
                "removed {swept} runtime director{} left by stopped masters",
                if swept == 1 { "y" } else { "ies" }
            );
        }
        let path = parent.join(format!("{PREFIX}{}", std::process::id()));
        if fs::symlink_metadata(&path).is_ok() {
            // Our pid, reused after a master that died with it: take it only if it is stale.
            if !is_stale(&path) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} is in use", path.display())));
            }
            fs::remove_dir_all(&path)?;
        }
        let mut builder = DirBuilder::new();
        builder.mode(0o755);
        builder.create(&path).map_err(|e| in_path(e, &path))?;
        let lock = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path.join(LOCK))
            .map_err(|e| in_path(e, &path))?;
        let lock =
            Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| in_path(io::Error::from(e), &path))?;
        builder.create(path.join("plugins")).map_err(|e| in_path(e, &path))?;
        // The umask may have narrowed the modes `mkdir` was given.
        for dir in [path.clone(), path.join("plugins")] {
            fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        Ok(RunDir { path, _lock: lock })
    }

    pub fn plugins(&self) -> PathBuf {
        self.path.join("plugins")
    }

    /// Removes the directory. The lock goes with the master.
    pub fn remove(&self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn in_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Removes every runtime directory in `parent` that is stale and ours to remove; returns how
/// many. Errors are ignored: a directory we cannot judge or remove is left as it is.
fn sweep(parent: &Path) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let uid = nix::unistd::geteuid().as_raw();
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let path = entry.path();
        // Only real directories this user owns (never through a symlink), named by a pid.
        let owned_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !owned_dir || pid.parse::<u32>().is_err() || pid == std::process::id().to_string() {
            continue;
        }
        if is_stale(&path) && fs::remove_dir_all(&path).is_ok() {
            swept += 1;
        }
    }
    swept
}

/// A directory is stale when nobody holds its lock. One without a lock file (a master killed
/// between `mkdir` and creating it) is stale once the pid in its name is gone.
fn is_stale(path: &Path) -> bool {
    let lock = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path.join(LOCK));
    match lock {
        Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let pid = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(PREFIX));
            pid.is_some_and(|pid| fs::metadata(format!("/proc/{pid}")).is_err())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_masters_directory_is_kept_and_a_dead_ones_is_swept() {
        let parent = tempfile::tempdir().unwrap();
        // A dead master's directory: a lock file nobody holds, and a pinned copy.
        let dead = parent.path().join("fdtserver-999999999");
        fs::create_dir_all(dead.join("plugins")).unwrap();
        fs::write(dead.join(LOCK), b"").unwrap();
        fs::write(dead.join("plugins/x.so"), b"\x7fELF").unwrap();
        // A live master's, whose lock is held.
        let live = parent.path().join("fdtserver-999999998");
        fs::create_dir(&live).unwrap();
        let held = Flock::lock(File::create(live.join(LOCK)).unwrap(), FlockArg::LockExclusive).unwrap();
        // Something else that only looks alike.
        fs::create_dir(parent.path().join("fdtserver-notapid")).unwrap();

        let own = RunDir::create(parent.path()).unwrap();
        assert!(!dead.exists(), "a dead master's directory is swept");
        assert!(live.exists(), "a live master's directory is kept");
        assert!(parent.path().join("fdtserver-notapid").exists());
        assert!(own.plugins().is_dir());
        // Another master sweeping now leaves ours alone too.
        assert_eq!(sweep(parent.path()), 0);
        drop(held);
        assert_eq!(sweep(parent.path()), 1);
        own.remove();
        assert!(!own.plugins().parent().unwrap().exists());
    }
}
