//! The `log` backend: one line per record with time, level, role and pid, to stderr or to the
//! `error_log` file (reopened on `USR1`), or with journald priority prefixes under systemd;
//! and the `access_log`: one line per connection.
//!
//! Files are opened by the master only: it reopens them on `USR1` and hands the new files to
//! its workers over their channel (`SCM_RIGHTS`), so a worker that dropped its privileges
//! never needs the right to open a log file.
//!
//! Written here rather than taken from a crate because it must change role after `fork`,
//! reopen its file on a signal, and never start a thread (the master must stay
//! single-threaded). Each line goes out in one `write`, so lines of concurrent processes
//! never interleave; a line the file takes only in part (a full disk) is cut off again, so the
//! file holds whole lines only, and every line that could not be written is counted
//! ([`write_failures`], `fdtserver_log_write_failures_total` in the metrics).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct State {
    role: String,
    pid: u32,
    /// `Some` when logging to a file; `None` means stderr.
    file: Option<(PathBuf, File)>,
    /// Started by systemd with stderr connected to the journal: use `<N>` priority prefixes.
    journald: bool,
}

struct Logger {
    state: Mutex<State>,
}

static LOGGER: Logger =
    Logger { state: Mutex::new(State { role: String::new(), pid: 0, file: None, journald: false }) };

/// The access log file, if any, and its path (the master reopens it by path).
static ACCESS: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);
/// Checked before formatting an access line, so a server without an access log pays nothing.
static ACCESS_ON: AtomicBool = AtomicBool::new(false);

/// Log and access lines this process could not write (or wrote only in part, then cut off).
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many log or access lines this process failed to write.
pub fn write_failures() -> u64 {
    WRITE_FAILURES.load(Ordering::Relaxed)
}

/// Writes `line` to the end of `file` (opened with `O_APPEND`) in one `write`: all of it, or
/// nothing. When the file takes only part of it (the disk filled up), that part is cut off
/// again — but only when the file still ends with exactly that part: the master and the
/// workers share one open file (and so one offset), and another process may have appended a
/// line of its own behind it meanwhile, which must not be cut (then the part stays, and the
/// loss is still counted). A failure is counted, never reported: logging the failure of
/// logging would fail the same way.
fn append_line(mut file: &File, line: &[u8]) {
    use std::io::Seek;
    use std::os::unix::fs::FileExt;
    match file.write(line) {
        Ok(n) if n == line.len() => {}
        Ok(n) => {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
            let written = &line[..n];
            // With O_APPEND the offset is now the end of the last append to this open file.
            if let (Ok(end), Ok(meta)) = (file.stream_position(), file.metadata())
                && n > 0
                && meta.len() == end
                && let Some(start) = end.checked_sub(n as u64)
            {
                let mut tail = vec![0; n];
                if file.read_exact_at(&mut tail, start).is_ok() && tail == written {
                    let _ = file.set_len(start);
                }
            }
        }
        Err(_) => {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Installs the logger for this process as `role` (e.g. `master`).
pub fn init(role: &str, level: LevelFilter) {
    {
        let mut s = lock();
        s.role = role.to_string();
        s.pid = std::process::id();
        s.journald = std::env::var_os("JOURNAL_STREAM").is_some();
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Changes the role and pid shown in every line (after `fork`).
pub fn set_role(role: &str) {
    let mut s = lock();
    s.role = role.to_string();
    s.pid = std::process::id();
}

pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

/// Sends the log to `path` (appending), or back to stderr with `None`.
pub fn set_file(path: Option<&Path>) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some((p.to_path_buf(), open_log(p)?)),
        None => None,
    };
    lock().file = file;
    Ok(())
}

/// Sends access lines to `path` (appending), or nowhere with `None`.
pub fn set_access_file(path: Option<&Path>) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some((p.to_path_buf(), open_log(p)?)),
        None => None,
    };
    ACCESS_ON.store(file.is_some(), Ordering::Release);
    *lock_access() = file;
    Ok(())
}

/// Reopens both log files at their paths (after logrotate moved them away). Each file that
/// cannot be reopened keeps its old one; the errors name the file.
pub fn reopen() -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if let Some((path, file)) = lock().file.as_mut() {
        match open_log(path) {
            Ok(f) => *file = f,
            Err(e) => errors.push(format!("cannot reopen error_log {}: {e}", path.display())),
        }
    }
    if let Some((path, file)) = lock_access().as_mut() {
        match open_log(path) {
            Ok(f) => *file = f,
            Err(e) => errors.push(format!("cannot reopen access_log {}: {e}", path.display())),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// A worker: write to these files from now on (the master reopened them, or a reload changed
/// or removed their paths, and sent what it uses now): `None` is stderr for the error log, and
/// no access log. A worker never reopens by path, so it keeps no path.
pub fn use_files(error_log: Option<File>, access_log: Option<File>) {
    lock().file = error_log.map(|f| (PathBuf::new(), f));
    ACCESS_ON.store(access_log.is_some(), Ordering::Release);
    *lock_access() = access_log.map(|f| (PathBuf::new(), f));
}

/// The path of the error log file (`None`: stderr).
pub fn error_log_path() -> Option<PathBuf> {
    lock().file.as_ref().map(|(p, _)| p.clone())
}

/// The path of the access log file, if any.
pub fn access_log_path() -> Option<PathBuf> {
    lock_access().as_ref().map(|(p, _)| p.clone())
}

/// The fd lines are written to, so that a forked worker keeps it open.
pub fn raw_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    lock().file.as_ref().map(|(_, f)| f.as_raw_fd())
}

/// The access log's fd, so that a forked worker keeps it open.
pub fn access_raw_fd() -> Option<std::os::fd::RawFd> {
    use std::os::fd::AsRawFd;
    lock_access().as_ref().map(|(_, f)| f.as_raw_fd())
}

/// True when there is an access log to write to.
pub fn access_enabled() -> bool {
    ACCESS_ON.load(Ordering::Acquire)
}

/// Writes one access line (time first, then `fields`), in one `write`.
pub fn access(fields: std::fmt::Arguments<'_>) {
    if !access_enabled() {
        return;
    }
    let now = humantime::format_rfc3339_millis(SystemTime::now());
    let line = format!("{now} {fields}\n");
    if let Some((_, f)) = lock_access().as_ref() {
        append_line(f, line.as_bytes());
    }
}

fn lock_access() -> std::sync::MutexGuard<'static, Option<(PathBuf, File)>> {
    ACCESS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a log file for appending; readable too where the permissions allow, so that a line
/// cut short by a full disk can be checked before it is cut off again (see `append_line`).
/// Never blocks: the master opens log files (at start, reload and `USR1`), and opening a FIFO
/// for writing would wait for a reader, so the open is non-blocking and a FIFO is refused.
pub fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let open =
        |read: bool| OpenOptions::new().create(true).append(true).read(read).custom_flags(libc::O_NONBLOCK).open(path);
    let fifo = || std::io::Error::other("it is a FIFO (named pipe): a log must be a file");
    let file = open(true)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => open(false),
            _ => Err(e),
        })
        // A FIFO nobody reads fails the non-blocking open with ENXIO: say what it is.
        .map_err(|e| if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) { fifo() } else { e })?;
    if file.metadata()?.file_type().is_fifo() {
        return Err(fifo());
    }
    // Writes block as usual (a terminal, say); only the open had to be non-blocking.
    crate::sys::set_nonblocking(file.as_raw_fd(), false)?;
    Ok(file)
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    LOGGER.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A log record from an app plugin, passed through the plugin ABI.
pub fn log_from_app(level: u32, target: &str, msg: &str) {
    let level = match level {
        1 => Level::Error,
        2 => Level::Warn,
        3 => Level::Info,
        4 => Level::Debug,
        _ => Level::Trace,
    };
    if level <= log::max_level() {
        LOGGER.write(level, target, format_args!("{msg}"));
    }
}

impl Logger {
    fn write(&self, level: Level, target: &str, args: std::fmt::Arguments<'_>) {
        let s = lock();
        let app = if target.starts_with("fdtserver") { String::new() } else { format!("{target}: ") };
        let line = if s.journald && s.file.is_none() {
            let prio = match level {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{} [{}] {app}{args}\n", s.role, s.pid)
        } else {
            let now = humantime::format_rfc3339_millis(SystemTime::now());
            format!("{now} {level:<5} {} [{}] {app}{args}\n", s.role, s.pid)
        };
        match s.file.as_ref() {
            Some((_, f)) => append_line(f, line.as_bytes()),
            // A pipe or the journal: a line up to PIPE_BUF (4 KiB) goes out in one atomic write;
            // a longer one (a long app message) may interleave with another process's.
            None => {
                if std::io::stderr().write_all(line.as_bytes()).is_err() {
                    WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // rustls logs every handshake's details at debug level: a line per connection would
        // drown the server's own. Its warnings and errors still show.
        metadata.level() <= log::max_level()
            && (metadata.level() <= log::Level::Warn || !metadata.target().starts_with("rustls"))
    }
    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            self.write(record.level(), record.target(), *record.args());
        }
    }
    fn flush(&self) {}
}
