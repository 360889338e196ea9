//! systemd integration: readiness notifications (`sd_notify` protocol) and socket activation
//! (`sd_listen_fds` protocol), without libsystemd.
//!
//! Invariants: notifications never block the master (a non-blocking datagram; a full or absent
//! socket only costs a debug line); `NOTIFY_SOCKET` stays in the master's environment (a binary
//! upgrade's new master needs it) and workers remove it; `LISTEN_*` are removed once read, so
//! nothing forked or executed later mistakes them for its own.

use std::io;
use std::os::unix::net::UnixDatagram;

use crate::listener::{Inherited, Origin};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Where to send readiness notifications: `NOTIFY_SOCKET`, if set.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) => Notifier::to(&path),
            None => Notifier { target: None },
        }
    }

    /// Notifies the socket at `path` (a path, or `@name` for an abstract socket).
    pub fn to(path: &std::ffi::OsStr) -> Notifier {
        let target = (|| -> io::Result<_> {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(name)?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(path)?,
            };
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok((socket, addr))
        })();
        match target {
            Ok(t) => Notifier { target: Some(t) },
            Err(e) => {
                log::warn!("NOTIFY_SOCKET={}: {e}; systemd will not be notified", path.to_string_lossy());
                Notifier { target: None }
            }
        }
    }

    /// Sends one notification: `KEY=value` lines, in one datagram.
    pub fn notify(&self, lines: &[String]) {
        let Some((socket, addr)) = &self.target else { return };
        let mut message = lines.join("\n");
        message.push('\n');
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            log::debug!("cannot notify systemd ({}): {e}", lines.join(" "));
        }
    }

    /// The server serves: `READY=1`, with the master's pid (it changes in a binary upgrade).
    pub fn ready(&self, status: &str) {
        self.notify(&["READY=1".into(), format!("MAINPID={}", std::process::id()), status_line(status)]);
    }

    /// A reload begins. `RELOADING=1` and `MONOTONIC_USEC` must be in one message, or
    /// `systemctl reload` waits forever (systemd matches them to tell reloads apart).
    pub fn reloading(&self) {
        self.notify(&[
            "RELOADING=1".into(),
            format!("MONOTONIC_USEC={}", crate::sys::monotonic_us()),
            status_line("reloading"),
        ]);
    }

    pub fn stopping(&self) {
        self.notify(&["STOPPING=1".into(), status_line("stopping")]);
    }

    pub fn status(&self, status: &str) {
        self.notify(&[status_line(status)]);
    }
}

fn status_line(status: &str) -> String {
    format!("STATUS={}", status.replace('\n', " "))
}

/// Adopts the sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`) into
/// `inherited`, then removes those variables. A `LISTEN_PID` other than ours means the
/// variables were meant for another process: no sockets were passed to us.
pub fn adopt_listen_fds(inherited: &mut Inherited) -> Vec<String> {
    let mut problems = Vec::new();
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let _ = crate::sys::remove_env_single_threaded(&["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]);
    let (Some(pid), Some(count)) = (pid, count) else { return problems };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        log::debug!("LISTEN_PID={pid} is not this process: no sockets were passed");
        return problems;
    }
    let Ok(count) = count.trim().parse::<i32>() else {
        problems.push(format!("LISTEN_FDS={count} is not a number"));
        return problems;
    };
    let names: Vec<&str> = names.as_deref().map(|n| n.split(':').collect()).unwrap_or_default();
    for i in 0..count {
        let fd = LISTEN_FDS_START + i;
        let name = names.get(i as usize).map(|n| n.to_string());
        let adopted =
            crate::sys::adopt_fd(fd).and_then(|owned| inherited.add(owned, None, name.clone(), Origin::Systemd));
        if let Err(e) = adopted {
            problems.push(format!("socket {} passed by systemd: {e}", name.unwrap_or_else(|| format!("fd {fd}"))));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abstract_notify_socket_gets_one_datagram_per_notification() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("fdtserver-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::to(std::ffi::OsStr::new(&format!("@{name}")));
        notifier.reloading();
        let mut buf = [0u8; 512];
        let n = listener.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        assert!(lines[1].starts_with("MONOTONIC_USEC="), "{text}");
        assert_eq!(lines[2], "STATUS=reloading");
    }

    #[test]
    fn without_a_notify_socket_nothing_is_sent_and_nothing_fails() {
        Notifier { target: None }.ready("serving");
    }
}
