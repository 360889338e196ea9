//! What `fdtserver check` verifies beyond the config itself: that the server could open the
//! files and sockets the config names, so that `check` passes only what the server accepts
//! (like `nginx -t`, which opens its log files).
//!
//! Invariant: touches the file system only as the server would at start (log files are
//! created if missing, in append mode; nothing is bound, removed or truncated), and never
//! blocks on a file (a FIFO is opened non-blocking).

use std::path::{Component, Path, PathBuf};

use crate::config::Config;

/// Every problem with the paths of `config`, one line each, naming the key and the path.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, path) in [("error_log", &config.server.error_log), ("access_log", &config.server.access_log)] {
        if let Some(path) = path
            && let Err(e) = open_log(path)
        {
            problems.push(format!("cannot open {key} {}: {e}", path.display()));
        }
    }
    if let Some(pidfile) = &config.server.pidfile
        && let Err(e) = directory_for(pidfile, Missing::Created)
    {
        problems.push(format!("cannot write pidfile {}: {e}", pidfile.display()));
    }
    if let Err(e) = directory_for(&config.server.control_socket, Missing::Created) {
        problems.push(format!("cannot create the control socket {}: {e}", config.server.control_socket.display()));
    }
    for l in &config.listeners {
        if let crate::config::Address::Unix(path) = &l.address
            && let Err(e) = directory_for(path, Missing::Refused)
        {
            problems.push(format!("cannot listen on {}: {e}", l.address));
        }
        if let Some(tls) = &l.tls {
            let mut tls = tls.clone();
            if let Err(e) = tls.load() {
                problems.push(format!("listener {}: {e}", l.address));
            }
        }
    }
    problems
}

/// Opens a log file as the master does (`logging::open_log`: append, created if missing, never
/// blocking on a FIFO), and explains the usual failures.
fn open_log(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err("it is a directory".into());
    }
    directory_for(path, Missing::Refused)?;
    crate::logging::open_log(path).map(drop).map_err(|e| e.to_string())
}

/// What the server does when the directory of a file it makes does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// It creates it (the control socket, the pidfile).
    Created,
    /// It fails (log files, Unix listeners).
    Refused,
}

/// Checks that the directory `path` goes in exists, or that the server creates it: no
/// component of it is a file. Names the component that is not a directory.
pub fn directory_for(path: &Path, missing: Missing) -> Result<(), String> {
    let Some(parent) = path.parent() else { return Ok(()) };
    let mut so_far = PathBuf::new();
    for component in parent.components() {
        so_far.push(component);
        if matches!(component, Component::RootDir | Component::CurDir | Component::ParentDir) {
            continue;
        }
        match std::fs::metadata(&so_far) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", so_far.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return match missing {
                    Missing::Created => Ok(()),
                    Missing::Refused => Err(format!("directory {} does not exist", so_far.display())),
                };
            }
            Err(e) => return Err(format!("{}: {e}", so_far.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_that_is_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = directory_for(&file.join("sub/app.sock"), Missing::Created).unwrap_err();
        assert_eq!(err, format!("{} is not a directory", file.display()));
    }

    #[test]
    fn a_missing_log_directory_is_an_error_but_a_socket_directory_is_created_later() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_log(&dir.path().join("nope/error.log")).unwrap_err();
        assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
        assert!(directory_for(&dir.path().join("run/app.sock"), Missing::Created).is_ok());
        assert!(directory_for(&dir.path().join("run/app.sock"), Missing::Refused).is_err());
        assert_eq!(open_log(Path::new("/")).unwrap_err(), "it is a directory");
        assert!(open_log(&dir.path().join("ok.log")).is_ok());
    }
}
