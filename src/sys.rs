//! The thin layer over the OS that the rest of the server builds on: fork, signal masks,
//! parent-death signals, fd hygiene, rlimits, and the shared epoll instance of a worker.
//!
//! Invariant: together with `plugin::loader`, this is the only module with `unsafe` code; each
//! block says why it holds. Everything here returns `io::Error`s; callers add context.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

/// Calls a libc function and turns its `-1` into the `errno` as an `io::Error`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller's comment on the enclosing block says why the arguments are valid.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 { Err(io::Error::last_os_error()) } else { Ok(res) }
    }};
}

/// Which side of a `fork` we are on.
pub enum Fork {
    Parent(Pid),
    Child,
}

/// Forks the (single-threaded) master. All signals are blocked in both processes when this
/// returns: the parent restores its mask with [`restore_signal_mask`] and the child with the
/// same call once it has replaced the master's signal handlers with its own, so no signal is
/// handled by the wrong code in between.
///
/// Refuses to fork when the process has more than one thread: a child forked from a
/// multi-threaded process may inherit locks held by threads that do not exist in it.
pub fn fork_with_signals_blocked() -> io::Result<(Fork, SigSet)> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "refusing to fork: the master has {threads} threads, and must have exactly one"
        )));
    }
    let old = block_all_signals()?;
    // SAFETY: the process has exactly one thread (checked above), so the child gets a
    // consistent copy of every lock and allocator, and can keep running Rust code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => Ok((Fork::Parent(child), old)),
        Ok(nix::unistd::ForkResult::Child) => Ok((Fork::Child, old)),
        Err(e) => {
            let _ = restore_signal_mask(&old);
            Err(e.into())
        }
    }
}

/// Blocks every signal in the calling thread; returns the previous mask.
pub fn block_all_signals() -> io::Result<SigSet> {
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old))?;
    Ok(old)
}

/// Restores a signal mask saved by [`block_all_signals`].
pub fn restore_signal_mask(mask: &SigSet) -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), None)?;
    Ok(())
}

/// Threads of this process, counted in `/proc/self/task`.
pub fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Asks the kernel to send `signal` to this process when its parent exits.
pub fn set_parent_death_signal(signal: Signal) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory of ours.
    syscall!(prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0))?;
    Ok(())
}

/// Closes every file descriptor of this process except `keep` (and stdio).
///
/// Used right after `fork`: a worker must not hold the master's epoll, control socket, other
/// workers' pipes or listeners of other generations. Any Rust value that owned one of these is
/// never dropped in the child (the child never returns into the master's code).
pub fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let fds: Vec<RawFd> =
        std::fs::read_dir("/proc/self/fd")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing an fd we do not keep; the values that owned it are never used
            // or dropped again in this process (see above). EBADF for the directory's own fd,
            // already closed, is harmless.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Takes ownership of an fd a forked child inherited and that nothing else in it owns (the
/// values that owned it in the master are never used or dropped in the child).
pub fn take_inherited_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the master passes each child the fds meant for it; in the child no other value
    // will close or use them (see above), so this `OwnedFd` is their only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`) over a Unix stream socket, in one
/// `sendmsg`. The receiver gets its own copies of the fds with the first byte of `bytes`.
pub fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let iov = [io::IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    Ok(sendmsg::<UnixAddr>(socket, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT, None)?)
}

/// The most fds [`recv_with_fds`] takes in one message (the master sends at most two).
const MAX_PASSED_FDS: usize = 4;

/// Reads from a Unix stream socket like `read`, and also returns the fds that came with the
/// bytes (`SCM_RIGHTS`), close-on-exec. `Ok((0, _))` is the end of the stream.
pub fn recv_with_fds(socket: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSED_FDS]);
    let msg = recvmsg::<UnixAddr>(socket, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these fds in our table for this message;
            // nothing else refers to them, so each `OwnedFd` is the only owner.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Sets or clears `FD_CLOEXEC` on an fd: cleared, the fd survives an `exec` (binary upgrade).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on an fd we hold; no memory is passed.
    let flags = syscall!(fcntl(fd, libc::F_GETFD))?;
    let flags = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
    // SAFETY: as above.
    syscall!(fcntl(fd, libc::F_SETFD, flags))?;
    Ok(())
}

/// Spawns `command` with `keep` open in the new program: their `FD_CLOEXEC` is cleared in the
/// child only, between `fork` and `exec` (the parent's fds keep the flag). For a binary
/// upgrade, which hands the listening sockets to the new master this way.
pub fn spawn_keeping_fds(command: &mut std::process::Command, keep: Vec<RawFd>) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes only fcntl calls on fds the parent owns
    // (and the child inherited), and allocates nothing (`keep` was allocated before the fork).
    unsafe {
        command.pre_exec(move || {
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags == -1 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    command.spawn()
}

/// Removes variables from this process's environment.
///
/// Only for a process that has exactly one thread (checked): `setenv`/`unsetenv` race with
/// any other thread reading the environment, which is why `remove_var` is `unsafe`.
pub fn remove_env_single_threaded(names: &[&str]) -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!("cannot change the environment with {threads} threads running")));
    }
    for name in names {
        // SAFETY: this process has one thread (checked above), so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    Ok(())
}

/// Takes ownership of an fd this process received across `exec` (systemd socket activation,
/// binary upgrade), after checking that it is open.
///
/// The caller must only pass an fd number that the protocol it follows reserves for this
/// purpose (`LISTEN_FDS`, or the upgrade's variable): nothing else in the process owns it.
pub fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!("fd {fd} is stdio, not a passed socket")));
    }
    // SAFETY: F_GETFD only checks that the fd is open; no memory is passed.
    syscall!(fcntl(fd, libc::F_GETFD)).map_err(|e| io::Error::other(format!("fd {fd}: {e}")))?;
    // SAFETY: the fd is open (checked above) and, by the passing protocol, owned by nothing
    // else in this process (see the doc comment), so the `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Sets `O_NONBLOCK` on an fd (it lives on the open file description, shared with `dup`s).
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we hold; no memory is passed.
    let flags = syscall!(fcntl(fd, libc::F_GETFL))?;
    let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
    // SAFETY: as above.
    syscall!(fcntl(fd, libc::F_SETFL, flags))?;
    Ok(())
}

/// Copies up to `buf.len()` bytes waiting in a socket's receive queue without taking them
/// (`recv` with `MSG_PEEK`, non-blocking).
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    let n = syscall!(recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT))?;
    Ok(n as usize)
}

/// Bytes written to a socket that its peer has not taken yet (`SIOCOUTQ`): unsent, or sent and
/// not acknowledged.
pub fn unsent_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket we hold writes one int to `n`, which outlives
    // the call.
    syscall!(ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Zeroed memory shared by this process and every child it forks afterwards
/// (`MAP_SHARED | MAP_ANONYMOUS`), seen as 64-bit atomics.
pub struct SharedAtomics {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
}

// SAFETY: the memory is only accessed through atomics, which any thread (or process) may use.
unsafe impl Send for SharedAtomics {}
// SAFETY: as above.
unsafe impl Sync for SharedAtomics {}

impl SharedAtomics {
    /// Maps `len` zeroed atomics.
    pub fn new(len: usize) -> io::Result<SharedAtomics> {
        let bytes = len * size_of::<u64>();
        // SAFETY: an anonymous mapping at an address of the kernel's choosing touches no
        // existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedAtomics { ptr, len })
    }

    pub fn get(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds `len` u64s, zeroed by the kernel (a valid AtomicU64 bit
        // pattern), page-aligned, and lives as long as `self` (it is never unmapped).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// Milliseconds of `CLOCK_MONOTONIC`: comparable across the processes of this machine.
pub fn monotonic_ms() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// Microseconds of `CLOCK_MONOTONIC` (systemd's `MONOTONIC_USEC`).
pub fn monotonic_us() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1000
}

/// The signal that [`interrupt_thread`] sends. Its default action is "ignore", so a stray one
/// harms nothing; workers install a handler that does nothing.
pub const INTERRUPT_SIGNAL: libc::c_int = libc::SIGURG;

/// Interrupts a thread blocked in `accept()` on a listener that has `SO_RCVTIMEO` set: with a
/// timeout set, the kernel does not restart `accept()` after a handled signal, it fails with
/// `EINTR` (signal(7)). Lets a draining worker stop accepting at once.
pub fn interrupt_thread(thread: libc::pthread_t) -> io::Result<()> {
    // SAFETY: `thread` comes from a `JoinHandle` that the caller still holds, so the thread
    // has not been detached or joined and the id is valid.
    let res = unsafe { libc::pthread_kill(thread, INTERRUPT_SIGNAL) };
    if res == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(res)) }
}

/// Readiness interest for [`Epoll`].
pub mod interest {
    pub const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI) as u32;
    pub const WRITE: u32 = libc::EPOLLOUT as u32;
    /// Edge-triggered: one event when the fd becomes ready, none while it stays ready; `modify`
    /// queues an event at once if the fd is ready then.
    pub const EDGE: u32 = libc::EPOLLET as u32;
}

/// One readiness event from [`Epoll::wait`].
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Event(libc::epoll_event);

impl Event {
    pub const EMPTY: Event = Event(libc::epoll_event { events: 0, u64: 0 });
    pub fn token(&self) -> u64 {
        self.0.u64
    }
    pub fn readable(&self) -> bool {
        self.0.events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLHUP | libc::EPOLLERR) as u32
            != 0
    }
    pub fn writable(&self) -> bool {
        self.0.events & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
    /// A read may stop before the socket is empty: the peer closed its side or the connection
    /// broke (the end of input takes a read of its own), or TCP urgent data came (a read stops
    /// at its mark).
    pub fn read_may_stop_early(&self) -> bool {
        self.0.events & (libc::EPOLLRDHUP | libc::EPOLLPRI | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
}

/// An epoll instance shared by a worker's handler threads.
///
/// Why not `mio::Poll`: it needs `&mut` to wait, so only one thread could wait on it; any idle
/// handler thread waits on this one, and the kernel hands each event to exactly one of them.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes only flags.
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        syscall!(epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev))?;
        Ok(())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits for events; `None` waits forever. Returns how many of `events` were filled.
    pub fn wait(&self, events: &mut [Event], timeout: Option<Duration>) -> io::Result<usize> {
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        loop {
            // SAFETY: `Event` is a transparent wrapper of `epoll_event`, and the kernel writes
            // at most `events.len()` of them into the slice.
            let res = syscall!(epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr().cast::<libc::epoll_event>(),
                events.len() as libc::c_int,
                timeout_ms,
            ));
            match res {
                Ok(n) => return Ok(n as usize),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// An `eventfd`: a counter other threads can wait on through an [`Epoll`].
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes only an initial value and flags.
        let fd = syscall!(eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(EventFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the eventfd readable (it stays readable: nobody resets it).
    pub fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        syscall!(write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_sent_with_a_message_arrive_with_it() {
        use std::io::{Seek, Write};
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed").unwrap();
        send_with_fds(a.as_raw_fd(), b"reopen error\n", &[file.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"reopen error\n");
        assert_eq!(fds.len(), 1);
        let mut received = std::fs::File::from(fds.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut received, &mut text).unwrap();
        assert_eq!(text, "passed");
    }

    #[test]
    fn an_edge_fires_once_and_modify_fires_again_while_ready() {
        let ep = Epoll::new().unwrap();
        let ev = EventFd::new().unwrap();
        ep.add(ev.as_raw_fd(), interest::READ | interest::EDGE, 7).unwrap();
        ev.notify().unwrap();
        let mut events = [Event::EMPTY; 4];
        assert_eq!(ep.wait(&mut events, Some(Duration::from_millis(100))).unwrap(), 1);
        assert_eq!(events[0].token(), 7);
        // Still readable, but no new edge.
        assert_eq!(ep.wait(&mut events, Some(Duration::from_millis(20))).unwrap(), 0);
        ep.modify(ev.as_raw_fd(), interest::READ | interest::EDGE, 8).unwrap();
        assert_eq!(ep.wait(&mut events, Some(Duration::from_millis(100))).unwrap(), 1);
        assert_eq!(events[0].token(), 8);
    }
}
