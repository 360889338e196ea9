//! Binary upgrade (`USR2`), as nginx and unicorn do it: the master re-executes the `fdtserver`
//! binary (by the path it was started with, so a new file there is the new version), handing
//! it the listening sockets and the control socket; the new master starts its own generation;
//! once that generation serves, the old master drains like on `TERM` and exits. If the new
//! master fails to start, it exits and the old one goes on as if nothing happened.
//!
//! Handover: the old master creates a socketpair and spawns the new binary with one end, the
//! listeners and the control socket kept open (`FD_CLOEXEC` cleared in the child only), and
//! their fd numbers in `FDTSERVER_UPGRADE` and `FDTSERVER_LISTENERS`. The listeners are the
//! same kernel sockets, so their accept queues never close: no connection is refused. The
//! control socket is the same socket too, so its path never changes hands through an unlink:
//! the new master leaves it to the old one (does not accept on it, never removes it) until its
//! generation serves; then it writes `ready` on the socketpair and starts accepting, and the old
//! master closes its copy without removing the file. Who owns a file (control socket, Unix
//! listeners, pidfile) is explicit, so neither master ever deletes one the other serves.
//!
//! Invariants: at most one upgrade at a time; no reload while one runs (and no upgrade while a
//! reload boots); the old master never blocks on the new one (the socketpair is in its poll).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mio::{Interest, Token};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Master;
use crate::ipc::LineBuffer;
use crate::listener::{Inherited, Origin};
use crate::sys;

/// `OLD_MASTER_PID CHANNEL_FD CONTROL_FD NEXT_GENERATION` (`CONTROL_FD` is `-` when none).
pub const ENV_UPGRADE: &str = "FDTSERVER_UPGRADE";
/// One line per listener: `FD ORIGIN KEY` (`ORIGIN`: `systemd` when systemd made the socket,
/// so that no master ever removes its file; `KEY`: the `ListenConfig::key` it serves).
pub const ENV_LISTENERS: &str = "FDTSERVER_LISTENERS";
/// Token of the socketpair to the new master in the old master's poll.
pub const UPGRADE_TOKEN: Token = Token(2);
/// The new master gets its own `boot_timeout` plus this to serve (it also loads its config,
/// binds, pins, forks); past that the old master gives up on it.
const NEW_MASTER_MARGIN: Duration = Duration::from_secs(10);
/// A new master told to stop (failed upgrade) is killed if still there this much later.
const NEW_MASTER_STOP_GRACE: Duration = Duration::from_secs(5);

/// The old master's side: the new master it started.
pub struct Upgrade {
    pub child: Pid,
    channel: mio::net::UnixStream,
    lines: LineBuffer,
    /// Given up on after this.
    deadline: Instant,
    /// Being stopped (the upgrade failed): killed at this time if still alive.
    kill_at: Option<Instant>,
}

/// The new master's side: what the old one handed over.
pub struct Handover {
    pub old_pid: Pid,
    channel: UnixStream,
    pub control: Option<OwnedFd>,
    pub next_generation: u64,
    /// The old master's rotation (`agent::ENV_ROTATION`), kept by the new one.
    pub rotation: Option<super::agent::Rotation>,
}

/// What the new master said on the socketpair.
pub enum NewMasterSays {
    Ready,
    Gone,
}

/// In a new master: takes what the old master handed over (`None` when this is a normal
/// start), adopting its listeners into `inherited`, and removes the variables.
pub fn take_handover(inherited: &mut Inherited) -> Result<Option<Handover>, String> {
    let upgrade = std::env::var(ENV_UPGRADE).ok();
    let listeners = std::env::var(ENV_LISTENERS).ok();
    let rotation = std::env::var(super::agent::ENV_ROTATION).ok();
    let _ = sys::remove_env_single_threaded(&[ENV_UPGRADE, ENV_LISTENERS, super::agent::ENV_ROTATION]);
    let Some(upgrade) = upgrade else { return Ok(None) };
    let bad = || format!("{ENV_UPGRADE}={upgrade:?} is not `PID CHANNEL_FD CONTROL_FD GENERATION`");
    let words: Vec<&str> = upgrade.split_whitespace().collect();
    let [pid, channel, control, generation] = words[..] else { return Err(bad()) };
    let old_pid = Pid::from_raw(pid.parse().map_err(|_| bad())?);
    let channel_fd: RawFd = channel.parse().map_err(|_| bad())?;
    let next_generation: u64 = generation.parse().map_err(|_| bad())?;
    let adopt = |fd: RawFd, what: &str| -> Result<OwnedFd, String> {
        let owned = sys::adopt_fd(fd).map_err(|e| format!("the old master's {what}: {e}"))?;
        sys::set_cloexec(fd, true).map_err(|e| format!("the old master's {what}: {e}"))?;
        Ok(owned)
    };
    let channel = UnixStream::from(adopt(channel_fd, "channel")?);
    let control = match control {
        "-" => None,
        fd => Some(adopt(fd.parse().map_err(|_| bad())?, "control socket")?),
    };
    for line in listeners.as_deref().unwrap_or("").lines().filter(|l| !l.is_empty()) {
        let mut words = line.splitn(3, ' ');
        let (Some(fd), Some(origin), Some(key)) = (words.next(), words.next(), words.next()) else {
            return Err(format!("{ENV_LISTENERS}: bad line {line:?}"));
        };
        let fd: RawFd = fd.parse().map_err(|_| format!("{ENV_LISTENERS}: bad fd in {line:?}"))?;
        let origin = if origin == Origin::Systemd.name() { Origin::Systemd } else { Origin::Upgrade };
        let owned = sys::adopt_fd(fd).map_err(|e| format!("the old master's listener {key}: {e}"))?;
        inherited
            .add(owned, Some(key.to_string()), None, origin)
            .map_err(|e| format!("the old master's listener {key}: {e}"))?;
    }
    let rotation = rotation.as_deref().and_then(super::agent::Rotation::parse);
    Ok(Some(Handover { old_pid, channel, control, next_generation, rotation }))
}

impl Master {
    /// USR2: start the new binary with our sockets.
    pub(super) fn begin_upgrade(&mut self) {
        let refuse = if self.stopping.is_some() {
            Some("the server is stopping")
        } else if self.upgrade.is_some() {
            Some("an upgrade is already under way")
        } else if self.handover.is_some() {
            Some("this master is itself still starting from an upgrade")
        } else if self.table.booting_id().is_some() {
            Some("a reload is under way")
        } else if self.table.active_id().is_none() {
            Some("nothing is serving yet")
        } else {
            None
        };
        if let Some(why) = refuse {
            log::warn!("USR2 (binary upgrade) ignored: {why}");
            return;
        }
        match self.spawn_new_master() {
            Ok(upgrade) => {
                log::info!(
                    "binary upgrade: started {} as pid {}; it takes over once its workers serve",
                    self.argv[0].to_string_lossy(),
                    upgrade.child
                );
                self.notifier.status(&format!("binary upgrade: new master pid {} starting", upgrade.child));
                self.upgrade = Some(upgrade);
            }
            Err(e) => log::error!("binary upgrade failed: {e}; this master goes on serving"),
        }
    }

    fn spawn_new_master(&mut self) -> Result<Upgrade, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
        let mut keep = vec![theirs.as_raw_fd()];
        let mut listeners = String::new();
        for (key, l) in &self.listeners {
            let fd = crate::listener::raw_fd(l);
            keep.push(fd);
            listeners.push_str(&format!("{fd} {} {key}\n", l.origin.name()));
        }
        // The agent check's socket too: the checks a load balancer sends meanwhile wait in its
        // accept queue, never refused.
        if let Some(fd) = self.agent.listener_fd() {
            keep.push(fd);
            listeners.push_str(&format!("{fd} {} {}\n", Origin::Bound.name(), super::agent::UPGRADE_KEY));
        }
        let control = self.control.listener_fd();
        keep.extend(control);
        let upgrade = format!(
            "{} {} {} {}",
            std::process::id(),
            theirs.as_raw_fd(),
            control.map_or("-".to_string(), |fd| fd.to_string()),
            self.next_generation
        );
        let mut command = std::process::Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .env(ENV_UPGRADE, upgrade)
            .env(ENV_LISTENERS, listeners)
            .env(super::agent::ENV_ROTATION, self.agent.rotation().name());
        // The new master is ours only until it takes over: it must not see sockets systemd
        // passed to us as its own (they are in the list above).
        command.env_remove("LISTEN_PID").env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        command.stdin(std::process::Stdio::null());
        // Watched before the new master exists, so that nothing can fail after it started.
        ours.set_nonblocking(true).map_err(|e| format!("cannot set up the socketpair: {e}"))?;
        let mut channel = mio::net::UnixStream::from_std(ours);
        self.poll
            .registry()
            .register(&mut channel, UPGRADE_TOKEN, Interest::READABLE)
            .map_err(|e| format!("cannot watch the new master: {e}"))?;
        let child = sys::spawn_keeping_fds(&mut command, keep).map_err(|e| {
            let _ = self.poll.registry().deregister(&mut channel);
            format!("cannot execute {}: {e}", self.argv[0].to_string_lossy())
        })?;
        drop(theirs);
        let deadline = Instant::now() + self.config.server.boot_timeout + NEW_MASTER_MARGIN;
        Ok(Upgrade {
            child: Pid::from_raw(child.id() as i32),
            channel,
            lines: LineBuffer::default(),
            deadline,
            kill_at: None,
        })
    }

    /// Reads what the new master said (`ready`, or the end of the socketpair).
    pub(super) fn read_new_master(&mut self) -> Vec<NewMasterSays> {
        let Some(upgrade) = self.upgrade.as_mut() else { return Vec::new() };
        let mut said = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match upgrade.channel.read(&mut buf) {
                Ok(0) => {
                    let _ = self.poll.registry().deregister(&mut upgrade.channel);
                    said.push(NewMasterSays::Gone);
                    break;
                }
                Ok(n) => upgrade.lines.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        while let Some(line) = upgrade.lines.next_line() {
            if line == "ready" {
                said.insert(0, NewMasterSays::Ready);
            } else {
                log::warn!("the new master said something unexpected: {line:?}");
            }
        }
        said
    }

    pub(super) fn on_new_master(&mut self, said: NewMasterSays) {
        match said {
            // Too late when it is already being stopped (failed upgrade, or this master stops).
            NewMasterSays::Ready if self.upgrade.as_ref().is_some_and(|u| u.kill_at.is_none()) => self.hand_over(),
            NewMasterSays::Ready => {}
            NewMasterSays::Gone => {
                if self.upgrade.as_ref().is_some_and(|u| u.kill_at.is_none()) {
                    self.abort_upgrade("the new master exited before it served".into());
                }
            }
        }
    }

    /// The reaper found the new master's exit. True if `pid` was it.
    pub(super) fn on_new_master_exit(&mut self, pid: Pid, how: &str) -> bool {
        if self.upgrade.as_ref().is_none_or(|u| u.child != pid) {
            return false;
        }
        let stopping = self.upgrade.as_ref().is_some_and(|u| u.kill_at.is_some());
        if stopping {
            log::info!("the new master (pid {pid}) {how}");
        } else {
            self.abort_upgrade(format!("the new master (pid {pid}) {how} before it served"));
        }
        if let Some(mut u) = self.upgrade.take() {
            let _ = self.poll.registry().deregister(&mut u.channel);
        }
        true
    }

    /// The upgrade failed: stop the new master (it serves nothing and owns no shared file)
    /// and go on.
    pub(super) fn abort_upgrade(&mut self, reason: String) {
        let Some(upgrade) = self.upgrade.as_mut() else { return };
        if upgrade.kill_at.is_some() {
            return;
        }
        if self.stopping.is_some() {
            log::warn!("binary upgrade abandoned: {reason}; stopping the new master (pid {})", upgrade.child);
        } else {
            log::error!("binary upgrade failed: {reason}; this master goes on serving");
        }
        self.counters.upgrades_failed += 1;
        upgrade.kill_at = Some(Instant::now() + NEW_MASTER_STOP_GRACE);
        let _ = kill(upgrade.child, Signal::SIGTERM);
        let status = format!("binary upgrade failed: {reason}; {}", self.keeps_serving());
        self.notifier.status(&status);
    }

    /// The new master serves: give it the control socket and the files, then drain and exit.
    fn hand_over(&mut self) {
        let Some(upgrade) = self.upgrade.take() else { return };
        let mut channel = upgrade.channel;
        let _ = self.poll.registry().deregister(&mut channel);
        log::info!("binary upgrade: the new master (pid {}) serves; draining and exiting", upgrade.child);
        self.handed_over = true;
        self.control.hand_over(self.poll.registry());
        // The new master answers the checks now; this one, draining, would answer `drain`.
        self.agent.hand_over(self.poll.registry());
        for l in self.listeners.values_mut() {
            l.owns_file = false;
        }
        // It wrote its own pid there.
        self.pidfile_written = false;
        self.begin_stop(false);
    }

    /// In a new master whose first generation serves: tell the old master, and take over the
    /// control socket and the files.
    pub(super) fn take_over(&mut self) {
        let Some(mut handover) = self.handover.take() else { return };
        if let Err(e) = handover.channel.write_all(b"ready\n") {
            log::error!("cannot tell the old master (pid {}) that this one serves: {e}", handover.old_pid);
        }
        self.control.take_ownership();
        if let Err(e) = self.control.register(self.poll.registry(), super::CONTROL_TOKEN) {
            log::error!("cannot accept on the control socket: {e}");
        }
        if let Err(e) = self.agent.register(self.poll.registry()) {
            log::error!("cannot accept on the agent check: {e}");
        }
        for l in self.listeners.values_mut() {
            l.owns_file = l.origin != Origin::Systemd;
        }
        log::info!("binary upgrade: took over from the old master (pid {}), which drains", handover.old_pid);
        self.old_master = Some(handover.old_pid);
    }

    /// The master this one took over from, while it still drains.
    pub(super) fn old_master_draining(&self) -> Option<Pid> {
        let pid = self.old_master?;
        // Not our child: look at /proc (a zombie waiting for its parent has exited).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let running = stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
        running.then_some(pid)
    }

    /// The earliest upgrade deadline.
    pub(super) fn next_upgrade_deadline(&self) -> Option<Instant> {
        self.upgrade.as_ref().map(|u| u.kill_at.unwrap_or(u.deadline))
    }

    pub(super) fn upgrade_timers(&mut self) {
        // Forget the old master once it is gone, before its pid can be reused.
        if self.old_master.is_some() && self.old_master_draining().is_none() {
            log::info!("the old master (pid {}) has exited", self.old_master.take().expect("checked"));
        }
        let now = Instant::now();
        let Some(upgrade) = self.upgrade.as_mut() else { return };
        match upgrade.kill_at {
            Some(at) if now >= at => {
                log::warn!("the new master (pid {}) did not stop; killing it", upgrade.child);
                let _ = kill(upgrade.child, Signal::SIGKILL);
                upgrade.kill_at = Some(now + NEW_MASTER_STOP_GRACE);
            }
            None if now >= upgrade.deadline => {
                let secs = (self.config.server.boot_timeout + NEW_MASTER_MARGIN).as_secs();
                self.abort_upgrade(format!("the new master did not serve within {secs} s"));
            }
            _ => {}
        }
    }
}
