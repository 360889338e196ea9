//! The master's runtime directory, `$TMPDIR/fdtserver-<pid>-<random>`: the pinned plugin
//! copies live there (see `plugin::pin`).
//!
//! The master removes it when it exits. A master that never got to (killed with `SIGKILL`, a
//! machine that lost power before `/tmp` was cleared) leaves it behind, tens of MB per plugin
//! with debug info, so every master sweeps the ones left by dead masters when it starts.
//!
//! Invariants: a live master holds an exclusive `flock` on its directory for its whole life,
//! taken before the directory gets its visible name (it is built as `.fdtserver-new-…` and
//! renamed into place), so whoever can take that lock knows the owner is gone, whatever
//! process now has its pid. A sweeper renames a stale directory away (`.fdtserver-gone-…`)
//! while it holds the lock, then deletes it. Names carry a random part: no directory is ever
//! taken over, and nobody can make a master fail by creating its name first. (`systemd-tmpfiles`
//! also leaves a directory alone while it is locked.)

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, Flock, FlockArg, RenameFlags, renameat2};

const PREFIX: &str = "fdtserver-";
/// A directory being built, before it gets its name.
const BUILDING: &str = ".fdtserver-new-";
/// A stale directory being deleted.
const DOOMED: &str = ".fdtserver-gone-";
/// A directory still being built after this long was abandoned by a master that died.
const BUILD_ABANDONED_AFTER: Duration = Duration::from_secs(60);

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
        for _ in 0..8 {
            let tag = format!("{}-{:016x}", std::process::id(), random());
            let building = parent.join(format!("{BUILDING}{tag}"));
            match DirBuilder::new().mode(0o755).create(&building) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(in_path(e, &building)),
            }
            let path = parent.join(format!("{PREFIX}{tag}"));
            match build(&building, &path) {
                Ok(lock) => return Ok(RunDir { path, _lock: lock }),
                Err(e) => {
                    let _ = fs::remove_dir_all(&building);
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(in_path(e, &building));
                    }
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free runtime directory name in {}", parent.display()),
        ))
    }

    pub fn plugins(&self) -> PathBuf {
        self.path.join("plugins")
    }

    /// Removes the directory. The lock goes with the master.
    pub fn remove(&self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Locks the new directory `building`, fills it, and gives it the name `path`.
fn build(building: &Path, path: &Path) -> io::Result<Flock<File>> {
    let lock = lock(building)?.ok_or_else(|| io::Error::other("locked by someone else"))?;
    let plugins = building.join("plugins");
    DirBuilder::new().mode(0o755).create(&plugins)?;
    // The umask may have narrowed the modes `mkdir` was given.
    for dir in [building, plugins.as_path()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    renameat2(AT_FDCWD, building, AT_FDCWD, path, RenameFlags::RENAME_NOREPLACE).map_err(io::Error::from)?;
    Ok(lock)
}

/// An exclusive lock on the directory `path` (never through a symlink): `None` when someone
/// else holds it.
fn lock(path: &Path) -> io::Result<Option<Flock<File>>> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

fn in_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A random number from std's randomly keyed hasher (no extra dependency).
fn random() -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish()
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
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        // Only real directories this user owns, never through a symlink.
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        let judged = if let Some(rest) = name.strip_prefix(PREFIX) {
            match rest.split_once('-') {
                Some((pid, _)) if pid.parse::<u32>().is_ok() => true,
                // `fdtserver-<pid>`: made by a version that did not lock its directory. Its
                // lock proves nothing; only a gone pid does.
                None if rest.parse::<u32>().is_ok() => !Path::new(&format!("/proc/{rest}")).exists(),
                _ => false,
            }
        } else if name.starts_with(BUILDING) {
            // Locked only after `mkdir`: give a master that is building it time to lock it.
            meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > BUILD_ABANDONED_AFTER)
        } else {
            name.starts_with(DOOMED)
        };
        if judged && remove_if_unlocked(parent, &path) {
            swept += 1;
        }
    }
    swept
}

/// Takes the lock of `path`, renames it away while holding it, and deletes it. False when its
/// owner lives (or anything fails).
fn remove_if_unlocked(parent: &Path, path: &Path) -> bool {
    let Ok(Some(_lock)) = lock(path) else { return false };
    let doomed = parent.join(format!("{DOOMED}{:016x}", random()));
    if renameat2(AT_FDCWD, path, AT_FDCWD, &doomed, RenameFlags::RENAME_NOREPLACE).is_err() {
        return false;
    }
    fs::remove_dir_all(&doomed).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_live_masters_directory_is_kept_and_a_dead_ones_is_swept() {
        let parent = tempfile::tempdir().unwrap();
        // A dead master's directory, with a pinned copy: nobody holds its lock.
        let dead = parent.path().join("fdtserver-999999999-0123456789abcdef");
        fs::create_dir_all(dead.join("plugins")).unwrap();
        fs::write(dead.join("plugins/x.so"), b"\x7fELF").unwrap();
        // A live master's, whose lock is held.
        let live = parent.path().join("fdtserver-999999998-0123456789abcdef");
        fs::create_dir(&live).unwrap();
        let held = lock(&live).unwrap().unwrap();
        // One of an older version, whose pid is gone; and things that only look alike.
        let old = parent.path().join("fdtserver-999999997");
        fs::create_dir(&old).unwrap();
        fs::create_dir(parent.path().join("fdtserver-notapid")).unwrap();
        std::os::unix::fs::symlink(&live, parent.path().join("fdtserver-999999996-0")).unwrap();

        let own = RunDir::create(parent.path()).unwrap();
        assert!(!dead.exists() && !old.exists(), "dead masters' directories are swept: {:?}", names(parent.path()));
        assert!(live.exists(), "a live master's directory is kept");
        assert!(parent.path().join("fdtserver-notapid").exists());
        assert!(parent.path().join("fdtserver-999999996-0").exists(), "a symlink is not followed or removed");
        assert!(own.plugins().is_dir());
        assert!(own.plugins().parent().unwrap().file_name().unwrap().to_str().unwrap().starts_with(PREFIX));
        // Another master sweeping now leaves ours alone too; the live one's goes once it dies.
        assert_eq!(sweep(parent.path()), 0);
        drop(held);
        assert_eq!(sweep(parent.path()), 1);
        assert!(!names(parent.path()).iter().any(|n| n.starts_with(DOOMED) || n.starts_with(BUILDING)));
        own.remove();
        assert!(!own.plugins().parent().unwrap().exists());
    }

    #[test]
    fn two_masters_get_different_directories() {
        let parent = tempfile::tempdir().unwrap();
        let (a, b) = (RunDir::create(parent.path()).unwrap(), RunDir::create(parent.path()).unwrap());
        assert_ne!(a.plugins(), b.plugins());
        assert!(a.plugins().is_dir() && b.plugins().is_dir());
    }
}
