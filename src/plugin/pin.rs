//! Pinned copies of plugin files: each generation loads its own immutable copy, named by the
//! file's version, so that `cp new.so old.so` over a running plugin never crashes a worker, and a worker
//! respawned later in a generation loads the same code as its siblings.
//!
//! Runs in the master: it reads and copies files, and never loads them. It never blocks on a
//! file either: a plugin path is opened non-blocking and must be a regular file (a FIFO would
//! block `open` until a writer comes, a device could block any read), and its size is bounded.
//! And since no flag keeps `open` or `read` from sleeping in the kernel on a hung network mount,
//! [`pin_all`] does the file work in a short-lived child process that the master waits for at
//! most [`PIN_TIMEOUT`], then kills.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// First bytes of an ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// What identifies one version of a file without reading it: replacing or rewriting the file
/// (`cp`, a build, a rename over it) changes at least one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileVersion {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileVersion {
    fn of(meta: &fs::Metadata) -> FileVersion {
        FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// A plugin larger than this is refused: copying it would hold up the master for seconds, and
/// no app is that big.
pub const MAX_PLUGIN_SIZE: u64 = 1 << 30;

/// Opens a plugin file for reading without ever blocking on it: non-blocking (a FIFO without a
/// writer, or a device, would otherwise block the `open` itself), then refuses anything but a
/// regular file (`fstat` of the open file, so what is checked is what is read) and a file
/// larger than [`MAX_PLUGIN_SIZE`]. The errors say what the path is instead.
pub fn open_regular(plugin: &Path) -> io::Result<File> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(plugin).map_err(
        |e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(e.kind(), format!("{e}; {}", build_hint(plugin))),
            _ => e,
        },
    )?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    use std::os::unix::fs::FileTypeExt;
    let what = if kind.is_file() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is {what}: a plugin must be a regular file (a shared library)", plugin.display()),
        ));
    }
    if meta.len() > MAX_PLUGIN_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {} bytes: larger than any plugin ({} MiB at most)",
                plugin.display(),
                meta.len(),
                MAX_PLUGIN_SIZE >> 20
            ),
        ));
    }
    Ok(file)
}

/// What to do about a plugin file that does not exist: build it (a plugin is the `cdylib` of a
/// cargo crate, named `lib<crate>.so` under `target/<profile>/`).
fn build_hint(plugin: &Path) -> String {
    let profile = plugin.parent().and_then(Path::file_name).and_then(|p| p.to_str());
    let in_target = plugin.parent().and_then(Path::parent).and_then(Path::file_name).is_some_and(|t| t == "target");
    match profile {
        Some("release") if in_target => {
            "is the app built? `cargo build --release --workspace` (or `cargo build --release` in the app's crate) writes it".into()
        }
        Some("debug") if in_target => {
            "is the app built? `cargo build --workspace` (or `cargo build` in the app's crate) writes it".into()
        }
        _ => "is the app built? a plugin is the `cdylib` that `cargo build --release` writes as target/release/lib<crate>.so; point `plugin` at it".into(),
    }
}

/// The longest the master waits for its plugin files to be read and copied (see [`pin_all`]).
pub const PIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A plugin pinned by [`pin_all`].
#[derive(Debug)]
pub struct PinnedCopy {
    /// The copy the workers load.
    pub path: PathBuf,
    /// The file had not changed since it was last pinned: its known copy was reused without
    /// reading the file (only `open` and `fstat`).
    pub unchanged: bool,
}

/// Pins every file of `plugins` into `dir` (see [`pin`]), in a child process, so that a file
/// that hangs (a hung network mount, where `open`, `stat` and `read` sleep in the kernel
/// whatever the flags) holds up the caller at most `limit`: then the child is killed and every
/// plugin refused with a reason that names the files. Returns each plugin's copy or error, in
/// order. The caller's cache of pinned versions is updated from the child's answer (the child
/// works on a copy of it), so that the next call reuses the copies of unchanged files. The
/// caller must be single-threaded (it forks); the child is left for the caller's `waitpid` to
/// reap.
pub fn pin_all(
    plugins: &[&Path],
    dir: &Path,
    limit: std::time::Duration,
) -> Result<Vec<io::Result<PinnedCopy>>, String> {
    use std::os::unix::ffi::OsStrExt;
    let work = || -> Vec<Pinned> {
        plugins
            .iter()
            .map(|p| {
                pin_version(p, dir)
                    .map(|(c, version, unchanged)| (c.as_os_str().as_bytes().to_vec(), version, unchanged))
                    .map_err(PinError::of)
            })
            .collect()
    };
    let results = in_child(limit, work).map_err(|e| {
        let names: Vec<String> = plugins.iter().map(|p| p.display().to_string()).collect();
        match e {
            ChildError::TimedOut => format!(
                "reading the plugin files ({}) took longer than {} s: is a file on a hung network mount?",
                names.join(", "),
                limit.as_secs_f64()
            ),
            ChildError::Failed(why) => format!("cannot pin the plugin files ({}): {why}", names.join(", ")),
        }
    })?;
    if results.len() != plugins.len() {
        return Err(format!("pinning the plugins: {} answers for {} files", results.len(), plugins.len()));
    }
    let mut cache = PINNED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    Ok(results
        .into_iter()
        .zip(plugins)
        .map(|(r, plugin)| {
            let (bytes, version, unchanged) = r.map_err(PinError::into_io)?;
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&bytes));
            cache.insert(plugin.to_path_buf(), (version, path.clone()));
            Ok(PinnedCopy { path, unchanged })
        })
        .collect())
}

/// Why [`in_child`] has no answer.
#[derive(Debug)]
enum ChildError {
    /// The work took longer than its limit: the child was killed.
    TimedOut,
    /// No pipe, no fork, or the child died without answering.
    Failed(String),
}

/// Runs `work` in a forked child and returns its answer, waiting at most `limit` (then the
/// child is killed). The child keeps no fd of the caller's but the pipe it answers on, keeps
/// every signal blocked (SIGKILL still ends it), dies with the caller, and is left for the
/// caller's `waitpid` to reap. The caller must be single-threaded.
fn in_child<T: serde::Serialize + serde::de::DeserializeOwned>(
    limit: std::time::Duration,
    work: impl FnOnce() -> T,
) -> Result<T, ChildError> {
    use std::os::fd::AsRawFd;
    let (mut ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| ChildError::Failed(format!("no pipe: {e}")))?;
    let (fork, saved_mask) =
        crate::sys::fork_with_signals_blocked().map_err(|e| ChildError::Failed(format!("cannot fork: {e}")))?;
    let child = match fork {
        crate::sys::Fork::Child => {
            let _ = crate::sys::close_fds_except(&[theirs.as_raw_fd()]);
            let _ = crate::sys::set_parent_death_signal(nix::sys::signal::Signal::SIGKILL);
            let answer = serde_json::to_vec(&work()).unwrap_or_default();
            let mut theirs = theirs;
            let _ = io::Write::write_all(&mut theirs, &answer);
            std::process::exit(0);
        }
        crate::sys::Fork::Parent(pid) => pid,
    };
    let _ = crate::sys::restore_signal_mask(&saved_mask);
    drop(theirs);
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let finished = loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() || ours.set_read_timeout(Some(left)).is_err() {
            break false;
        }
        match ours.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    if !finished {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        return Err(ChildError::TimedOut);
    }
    serde_json::from_slice(&answer)
        .map_err(|_| ChildError::Failed(format!("its process (pid {child}) died without an answer")))
}

/// What the child of [`pin_all`] answers for one plugin: the copy's path (bytes), the version
/// it is a copy of, and whether it was known already; or why not.
type Pinned = Result<(Vec<u8>, FileVersion, bool), PinError>;

/// An `io::Error` across the pipe: an OS error keeps its code (so its kind and text), any
/// other its kind (as far as it matters here) and message.
#[derive(serde::Serialize, serde::Deserialize)]
struct PinError {
    os: Option<i32>,
    invalid: bool,
    message: String,
}

impl PinError {
    fn of(e: io::Error) -> PinError {
        let invalid = matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput);
        PinError { os: e.raw_os_error(), invalid, message: e.to_string() }
    }

    fn into_io(self) -> io::Error {
        match (self.os, self.invalid) {
            (Some(code), _) => io::Error::from_raw_os_error(code),
            (None, true) => io::Error::new(io::ErrorKind::InvalidInput, self.message),
            (None, false) => io::Error::other(self.message),
        }
    }
}

/// Plugin path → (the version last pinned, its copy), so that a reload with unchanged plugins
/// reads and copies nothing. In the master it is updated by [`pin_all`] from its child's
/// answer; each pin child starts with a copy of it.
static PINNED: Mutex<Option<HashMap<PathBuf, (FileVersion, PathBuf)>>> = Mutex::new(None);

/// Copies `plugin` into `dir` under a name derived from its version (device, inode, times,
/// length), unless that copy exists. Returns the copy's path.
pub fn pin(plugin: &Path, dir: &Path) -> io::Result<PathBuf> {
    pin_version(plugin, dir).map(|(pinned, _, _)| pinned)
}

/// [`pin`], also returning the version pinned and whether its copy was known already (then the
/// file was not read).
fn pin_version(plugin: &Path, dir: &Path) -> io::Result<(PathBuf, FileVersion, bool)> {
    let mut file = open_regular(plugin)?;
    let version = FileVersion::of(&file.metadata()?);
    let mut cache = PINNED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((known, pinned)) = cache.get(plugin)
        && *known == version
        && pinned.starts_with(dir)
        && pinned.exists()
    {
        return Ok((pinned.clone(), version, true));
    }
    let pinned = copy_version(plugin, &mut file, &version, dir)?;
    cache.insert(plugin.to_path_buf(), (version, pinned.clone()));
    Ok((pinned, version, false))
}

/// Copies the open `file` (a version of `plugin`) into `dir`, in the kernel (`copy_file_range`:
/// no pass through user space, and no hashing: a 13 MB plugin takes milliseconds), unless the
/// copy exists already.
fn copy_version(plugin: &Path, file: &mut File, version: &FileVersion, dir: &Path) -> io::Result<PathBuf> {
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || magic != ELF_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a shared library (no ELF header)"));
    }
    let name = plugin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin.so".into());
    // Every field of the version: `cp -p` or a build with fixed timestamps can keep the inode,
    // size and mtime, but not the ctime, which only the kernel sets.
    let v = version;
    let pinned = dir.join(format!("{:x}-{:x}-{:x}-{:x}-{}-{name}", v.dev, v.ino, v.mtime_ns, v.ctime_ns, v.len));
    if fs::metadata(&pinned).is_ok_and(|m| m.len() == version.len) {
        return Ok(pinned);
    }
    // Write a temporary file and rename it, so a worker never sees a half-written copy. No
    // fsync: the copy matters only while this master lives, and a new master sweeps it.
    let tmp = dir.join(format!(".{}.tmp-{}", name, std::process::id()));
    file.seek(SeekFrom::Start(0))?;
    let mut out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
    // Readable by workers that dropped to `user`, whatever the umask.
    let copied = io::copy(file, &mut out).and_then(|_| out.set_permissions(fs::Permissions::from_mode(0o644)));
    drop(out);
    // A file being rewritten while we copied it (a build still writing) gives a torn copy.
    let changed = file.metadata().map(|m| FileVersion::of(&m) != *version).unwrap_or(true);
    if copied.is_err() || changed {
        let _ = fs::remove_file(&tmp);
        copied?;
        return Err(io::Error::other("it changed while it was being copied; reload again once it is written"));
    }
    fs::rename(&tmp, &pinned)?;
    Ok(pinned)
}

/// Removes pinned copies in `dir` that are not in `keep`.
pub fn prune(dir: &Path, keep: &[&Path]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path.as_path()) {
            let _ = fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_file_keeps_its_copy_and_a_rewritten_one_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libapp.so");
        let pins = dir.path().join("pins");
        fs::create_dir(&pins).unwrap();
        fs::write(&src, b"\x7fELF one").unwrap();
        let a = pin(&src, &pins).unwrap();
        assert_eq!(pin(&src, &pins).unwrap(), a);
        assert_eq!(fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o644, "readable by workers");
        // Rewritten in place (`cp new.so old.so`): same inode, new content.
        fs::write(&src, b"\x7fELF second").unwrap();
        let b = pin(&src, &pins).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(&a).unwrap(), b"\x7fELF one");
        assert_eq!(fs::read(&b).unwrap(), b"\x7fELF second");
        prune(&pins, &[b.as_path()]);
        assert!(!a.exists() && b.exists());
    }

    #[test]
    fn a_fifo_a_directory_and_a_device_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("libfifo.so");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let e = pin(&fifo, dir.path()).unwrap_err().to_string();
        assert!(e.contains("FIFO") && e.contains(&fifo.display().to_string()), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = pin(dir.path(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let e = pin(Path::new("/dev/null"), dir.path()).unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("notes.txt");
        fs::write(&src, b"hello").unwrap();
        assert!(pin(&src, dir.path()).unwrap_err().to_string().contains("not a shared library"));
    }

    #[test]
    fn a_plugin_file_over_1_gib_is_refused_before_anything_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libhuge.so");
        let pins = dir.path().join("pins");
        fs::create_dir(&pins).unwrap();
        // Sparse: costs no disk.
        let f = File::create(&src).unwrap();
        f.set_len(MAX_PLUGIN_SIZE + 1).unwrap();
        let e = pin(&src, &pins).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            format!("{} is {} bytes: larger than any plugin (1024 MiB at most)", src.display(), MAX_PLUGIN_SIZE + 1)
        );
        assert_eq!(fs::read_dir(&pins).unwrap().count(), 0, "no copy, not even a temporary one");
    }

    #[test]
    fn a_missing_plugin_says_which_cargo_build_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let hint = |path: &Path| {
            let e = open_regular(path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
            e.to_string()
        };
        let release = dir.path().join("target/release/libfdt_app.so");
        assert!(hint(&release).contains("`cargo build --release --workspace`"), "{}", hint(&release));
        let debug = dir.path().join("target/debug/libfdt_app.so");
        let e = hint(&debug);
        assert!(e.contains("`cargo build --workspace`") && !e.contains("--release"), "{e}");
        let elsewhere = dir.path().join("plugins/libfdt_app.so");
        assert!(
            hint(&elsewhere).contains("target/release/lib<crate>.so; point `plugin` at it"),
            "{}",
            hint(&elsewhere)
        );
    }

    #[test]
    fn a_plugin_error_crossing_the_pin_childs_pipe_keeps_its_os_code_kind_and_message() {
        let across = |e: io::Error| {
            let bytes = serde_json::to_vec(&PinError::of(e)).unwrap();
            serde_json::from_slice::<PinError>(&bytes).unwrap().into_io()
        };
        // An OS error (a symlink loop at the plugin path) keeps its code.
        let dir = tempfile::tempdir().unwrap();
        let looped = dir.path().join("libloop.so");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let e = across(open_regular(&looped).unwrap_err());
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        // A refusal keeps its kind and text.
        let e = across(open_regular(dir.path()).unwrap_err());
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().ends_with("is a directory: a plugin must be a regular file (a shared library)"), "{e}");
        // Any other keeps its text.
        let e = across(io::Error::other("it changed while it was being copied"));
        assert_eq!(e.to_string(), "it changed while it was being copied");
    }

    #[test]
    fn pinning_from_a_multithreaded_process_is_refused_naming_the_files() {
        // A second thread alive during the call: forking now could deadlock the child.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("liba.so");
        let b = dir.path().join("libb.so");
        let e = pin_all(&[&a, &b], dir.path(), PIN_TIMEOUT).unwrap_err();
        assert!(
            e.starts_with(&format!("cannot pin the plugin files ({}, {}): cannot fork:", a.display(), b.display())),
            "{e}"
        );
        assert!(e.contains("threads"), "{e}");
        drop(tx);
        let _ = other.join();
    }

    #[test]
    fn a_plugin_rewritten_while_it_is_copied_is_refused_and_no_partial_copy_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libbuilding.so");
        let pins = dir.path().join("pins");
        fs::create_dir(&pins).unwrap();
        let mut content = b"\x7fELF".to_vec();
        content.resize(16 << 20, 0x5a);
        fs::write(&src, &content).unwrap();
        // A build still writing the file: its metadata keeps changing (each chmod sets a new ctime).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, src) = (stop.clone(), src.clone());
            std::thread::spawn(move || {
                let mut mode = 0o644;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    mode ^= 0o111;
                    let _ = fs::set_permissions(&src, fs::Permissions::from_mode(mode));
                }
            })
        };
        let started = std::time::Instant::now();
        let refused = loop {
            match pin(&src, &pins) {
                Err(e) => break e,
                Ok(copy) => fs::remove_file(copy).unwrap(),
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "never saw the file change during a copy");
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert_eq!(refused.to_string(), "it changed while it was being copied; reload again once it is written");
        assert_eq!(fs::read_dir(&pins).unwrap().count(), 0, "the torn copy was removed");
    }

    #[test]
    fn a_file_version_crosses_the_pin_childs_pipe_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("libapp.so");
        fs::write(&src, b"\x7fELF").unwrap();
        let version = FileVersion::of(&fs::metadata(&src).unwrap());
        let answer: Pinned = Ok((b"/run/copy.so".to_vec(), version, true));
        let bytes = serde_json::to_vec(&answer).unwrap();
        let back: Pinned = serde_json::from_slice(&bytes).unwrap();
        let (path, v, unchanged) = back.ok().unwrap();
        assert_eq!((path.as_slice(), v, unchanged), (&b"/run/copy.so"[..], version, true));
    }

    #[test]
    fn pruning_a_runtime_directory_that_is_gone_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("plugins");
        prune(&gone, &[]);
        assert!(!gone.exists());
    }
}
