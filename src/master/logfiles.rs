//! The master's log files: reopening them on `USR1`, switching paths on a reload, and handing
//! the open files to every worker over its channel (`SCM_RIGHTS`).
//!
//! Invariant: only the master opens log files; workers (which may have dropped to `user`)
//! only ever write to files the master gave them.

use std::os::fd::AsRawFd;

use super::Master;
use crate::config::Config;
use crate::ipc::MasterMessage;
use crate::sys;

impl Master {
    /// USR1: reopen the log files, and hand the new ones to every worker.
    pub(super) fn reopen_logs(&mut self) {
        if let Err(errors) = crate::logging::reopen() {
            for e in errors {
                log::error!("{e}");
            }
        }
        if crate::logging::raw_fd().is_none() && crate::logging::access_raw_fd().is_none() {
            log::info!("USR1: no log file to reopen (logging to stderr)");
            return;
        }
        self.send_log_files();
        log::info!("log files reopened");
    }

    /// Hands the master's current log files to every worker (`SCM_RIGHTS`).
    fn send_log_files(&mut self) {
        let error = crate::logging::raw_fd();
        let access = crate::logging::access_raw_fd();
        let message = MasterMessage::Reopen { error: error.is_some(), access: access.is_some() }.to_string();
        let fds: Vec<i32> = error.into_iter().chain(access).collect();
        for w in self.table.workers.values_mut() {
            // The fds travel with the message's first byte: only a whole message, in order.
            let _ = w.outbox.flush(&mut w.channel);
            if !w.outbox.is_empty() {
                log::warn!("cannot hand the log files to worker pid {}: it does not read its channel", w.pid);
                continue;
            }
            if let Err(e) = sys::send_with_fds(w.channel.as_raw_fd(), message.as_bytes(), &fds) {
                log::warn!("cannot hand the log files to worker pid {}: {e}", w.pid);
            }
        }
    }

    /// A reload may name other log files: checks that they can be opened (before anything
    /// changes, so that a bad path refuses the reload).
    pub(super) fn check_log_paths(config: &Config) -> Result<(), String> {
        let changes = [
            ("error_log", &config.server.error_log, crate::logging::error_log_path()),
            ("access_log", &config.server.access_log, crate::logging::access_log_path()),
        ];
        for (key, wanted, current) in changes {
            if let Some(path) = wanted
                && Some(path) != current.as_ref()
            {
                crate::logging::open_log(path).map_err(|e| format!("cannot open {key} {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// A new generation serves: switch to the log files its config names (a removed
    /// `error_log` sends the log back to stderr, a removed `access_log` ends the access log),
    /// and hand them to every worker.
    pub(super) fn switch_log_files(&mut self) {
        let server = &self.config.server;
        let mut changed = false;
        let (error, access) = (server.error_log.clone(), server.access_log.clone());
        let shown =
            |path: &Option<std::path::PathBuf>| path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        if error != crate::logging::error_log_path() {
            if error.is_none() {
                log::info!("error_log was removed from the config: logging to stderr from now on");
            }
            match crate::logging::set_file(error.as_deref()) {
                Ok(()) => changed = true,
                Err(e) => log::error!("cannot open error_log {}: {e}; keeping the old one", shown(&error)),
            }
        }
        if access != crate::logging::access_log_path() {
            match crate::logging::set_access_file(access.as_deref()) {
                Ok(()) => changed = true,
                Err(e) => log::error!("cannot open access_log {}: {e}; keeping the old one", shown(&access)),
            }
            if access.is_none() {
                log::info!("access_log was removed from the config: no access log from now on");
            }
        }
        if changed {
            self.send_log_files();
            log::info!("log files switched to the reloaded config's paths");
        }
    }
}
