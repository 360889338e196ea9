//! The event bus within one server: its place, its members and its wire format.
//!
//! Shape: every worker binds a Unix datagram socket `w<pid>` in the bus directory
//! (`<control_socket>.bus`, made by the master); `fdtserver subscribe` binds `s<pid>` there. A
//! worker sends each batch of events to every member (itself included), so an event reaches
//! every worker of every generation, and the master is never on the path. Members are found by
//! listing the directory (again every second, and at once when a newcomer says hello); a socket
//! whose owner is gone refuses the datagram and its file is removed.
//!
//! A datagram holds whole records, each `[kind u8][topic length u16][payload length u32]`
//! (little-endian) then the topic and the payload.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// The longest topic (`[A-Za-z0-9._:-]`).
pub const TOPIC_MAX: usize = 128;
/// The largest payload within one server.
pub const PAYLOAD_MAX: usize = 60 * 1024;
/// The largest datagram a batch is cut into (a record larger than this goes alone).
pub const DATAGRAM_MAX: usize = 64 * 1024;
/// What a receiving socket may queue before senders see it full.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Record kinds.
pub const KIND_EVENT: u8 = 0;
/// A new member: its socket's name is the payload.
pub const KIND_HELLO: u8 = 1;
/// An event for the receiving worker to emit as an app would (from `fdtserver emit`).
pub const KIND_RELAY: u8 = 2;
/// Nothing: wakes the receiver (something was handed to it within its process).
pub const KIND_WAKE: u8 = 3;

const HEADER: usize = 7;

/// The bus directory of the server whose control socket is `control_socket`.
pub fn dir(control_socket: &Path) -> PathBuf {
    let mut name = control_socket.as_os_str().to_owned();
    name.push(".bus");
    PathBuf::from(name)
}

/// Makes the bus directory of the server (the master, at start): private to the server's
/// user, and owned by the workers' user when they drop to one (`identity`).
pub fn prepare_dir(dir: &Path, identity: Option<&crate::privileges::Identity>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(id) = identity {
        nix::unistd::chown(dir, Some(id.uid), Some(id.gid)).map_err(io::Error::from)?;
    }
    remove_dead_members(dir);
    Ok(())
}

/// Removes the sockets that processes which died left in `dir` (`w<pid>`, `s<pid>`,
/// `h<generation>-<pid>`): a crash or a `kill -9` leaves them, and a taker's would turn handoffs
/// away.
fn remove_dead_members(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = match name.split_once('-') {
            Some((_, pid)) if name.starts_with('h') => pid,
            _ if name.starts_with('w') || name.starts_with('s') => &name[1..],
            _ => continue,
        };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let dead =
            matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH));
        if dead {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The bus directory as seen through `fd`, an open descriptor of it: a worker reaches it so
/// even when the path to it is closed to the worker's user, and the paths stay short (a Unix
/// socket's path has at most 107 bytes, whatever the control socket's length).
pub fn dir_of_fd(fd: std::os::fd::RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Appends one record to `out`.
pub fn encode(out: &mut Vec<u8>, kind: u8, topic: &[u8], payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(payload);
}

/// One record of a datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u8,
    pub topic: &'a [u8],
    pub payload: &'a [u8],
}

/// The records of `buf`, up to the first that is cut short (nothing after it is trusted).
pub fn decode(mut buf: &[u8]) -> impl Iterator<Item = Record<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER {
            return None;
        }
        let kind = buf[0];
        let topic_len = usize::from(u16::from_le_bytes([buf[1], buf[2]]));
        let payload_len = u32::from_le_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        let end = HEADER.checked_add(topic_len)?.checked_add(payload_len)?;
        if buf.len() < end {
            buf = &[];
            return None;
        }
        let record = Record { kind, topic: &buf[HEADER..HEADER + topic_len], payload: &buf[HEADER + topic_len..end] };
        buf = &buf[end..];
        Some(record)
    })
}

/// The length of the record that starts `buf` (for cutting a batch at record boundaries).
pub fn record_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER {
        return None;
    }
    let topic_len = usize::from(u16::from_le_bytes([buf[1], buf[2]]));
    let payload_len = u32::from_le_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    Some(HEADER + topic_len + payload_len).filter(|n| *n <= buf.len())
}

/// Why an event cannot be emitted.
pub fn check(topic: &[u8], payload: &[u8], payload_max: usize) -> Result<(), String> {
    if topic.is_empty() || topic.len() > TOPIC_MAX {
        return Err(format!("a topic is 1 to {TOPIC_MAX} bytes, not {}", topic.len()));
    }
    if !topic.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')) {
        return Err(format!("a topic is made of A-Z a-z 0-9 . _ - : ({:?})", String::from_utf8_lossy(topic)));
    }
    if payload.len() > payload_max {
        return Err(format!("a payload is at most {payload_max} bytes, not {}", payload.len()));
    }
    Ok(())
}

/// True when `pattern` takes `topic`: `*` takes every topic, `a.*` (a trailing `*`) every topic
/// that begins with `a.`, anything else only itself.
pub fn matches(pattern: &[u8], topic: &[u8]) -> bool {
    match pattern.strip_suffix(b"*") {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// What the metrics count a topic under: its first segment (`bank` for `bank.transferred`).
pub fn prefix(topic: &[u8]) -> &[u8] {
    topic.split(|b| *b == b'.').next().unwrap_or(topic)
}

/// Binds a member's socket `name` in `dir` (a file left by a dead member of that name goes).
pub fn bind(dir: &Path, name: &str) -> io::Result<UnixDatagram> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path)?;
    // Any member may send to it (a `subscribe` run as root, workers run as `user`): the
    // directory (0700, the server's user) is what keeps others out.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    }
    let fd = std::os::fd::AsFd::as_fd(&socket);
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &SOCKET_BUFFER);
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    Ok(socket)
}

/// The members' sockets in `dir`: workers (`w…`) and subscribers (`s…`).
pub fn members(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            (name.starts_with('w') || name.starts_with('s')) && name[1..].bytes().all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path())
        .collect()
}

/// A socket connected to one member, to send to it: each member has its own, so that the
/// datagrams a member has not read yet (charged to the sending socket) hold back only that
/// member.
pub fn connect_member(member: &Path) -> io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    socket.connect(member)?;
    socket.set_nonblocking(true)?;
    let fd = std::os::fd::AsFd::as_fd(&socket);
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    Ok(socket)
}

/// Sends one datagram on a connected, non-blocking socket. `Ok(false)`: the member's queue is
/// full.
pub fn send_connected(socket: &UnixDatagram, datagram: &[u8]) -> io::Result<bool> {
    loop {
        match socket.send(datagram) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Sends one datagram to `to` without waiting. `Ok(false)`: its queue is full.
pub fn send(socket: &UnixDatagram, to: &Path, datagram: &[u8]) -> io::Result<bool> {
    use nix::sys::socket::{MsgFlags, UnixAddr, sendto};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new(to).map_err(io::Error::from)?;
    loop {
        match sendto(socket.as_raw_fd(), datagram, &addr, MsgFlags::MSG_DONTWAIT) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// `fdtserver emit TOPIC PAYLOAD`: hands the event to one worker of the running server, which
/// emits it as an app would (to every worker, and other servers on the `[events]` database).
pub fn emit_command(config: &crate::config::Config, topic: &str, payload: &str) -> Result<(), String> {
    let control_socket = &config.server.control_socket;
    check(topic.as_bytes(), payload.as_bytes(), PAYLOAD_MAX)?;
    if config.events_database.is_some() {
        fdt_sdk::notify::encode(&origin(config), fdt_sdk::notify::LONGEST_SEQ, topic, payload.as_bytes())?;
    }
    let (_open, dir) = running_bus(control_socket)?;
    let socket = UnixDatagram::unbound().map_err(|e| format!("cannot make a socket: {e}"))?;
    let mut datagram = Vec::new();
    encode(&mut datagram, KIND_RELAY, topic.as_bytes(), payload.as_bytes());
    let workers =
        members(&dir).into_iter().filter(|m| m.file_name().is_some_and(|n| n.to_string_lossy().starts_with('w')));
    for worker in workers {
        if let Ok(true) = send(&socket, &worker, &datagram) {
            return Ok(());
        }
    }
    Err(format!("no worker of the server took the event (bus {})", dir.display()))
}

/// `fdtserver subscribe PATTERN`: prints `TOPIC PAYLOAD` for every event the pattern takes,
/// until `stop` is set (an interrupt). With an `[events] database`, the events of the other
/// servers too (it listens there itself: the workers hand theirs only to their own apps).
pub fn subscribe_command(
    config: &crate::config::Config,
    pattern: &str,
    out: &mut dyn io::Write,
    stop: &'static std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let control_socket = &config.server.control_socket;
    let (_open, dir) = running_bus(control_socket)?;
    let name = format!("s{}", std::process::id());
    let socket = bind(&dir, &name).map_err(|e| format!("cannot join the event bus at {}: {e}", dir.display()))?;
    let path = dir.join(&name);
    let result = (|| {
        socket.set_read_timeout(Some(std::time::Duration::from_millis(200))).map_err(|e| e.to_string())?;
        if let Some(db) = config.events_database.as_ref().and_then(|db| config.databases.get(db)) {
            let origin = origin(config);
            let (settings, me) = (db.settings(), path.clone());
            std::thread::spawn(move || listen_for_others(&settings, &origin, &me, stop));
        }
        let mut hello = Vec::new();
        encode(&mut hello, KIND_HELLO, b"hello", name.as_bytes());
        for member in members(&dir) {
            let _ = send(&socket, &member, &hello);
        }
        let mut buf = vec![0u8; DATAGRAM_MAX.max(PAYLOAD_MAX + TOPIC_MAX + 64)];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let n = match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(format!("receiving from the event bus failed: {e}")),
            };
            for record in decode(&buf[..n]).filter(|r| r.kind == KIND_EVENT && matches(pattern.as_bytes(), r.topic)) {
                let payload = record.payload.strip_suffix(b"\n").unwrap_or(record.payload);
                let mut line = record.topic.to_vec();
                line.push(b' ');
                line.extend_from_slice(payload);
                line.push(b'\n');
                out.write_all(&line).and_then(|()| out.flush()).map_err(|e| format!("cannot write: {e}"))?;
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Hands the events other servers notify on `db` to the socket `me` (a subscriber's), until
/// `stop`; a lost session is opened again after a second.
fn listen_for_others(db: &fdt_sdk::DatabaseSettings, origin: &str, me: &Path, stop: &std::sync::atomic::AtomicBool) {
    use fdt_sdk::txn::postgres::fallible_iterator::FallibleIterator;
    let Ok(socket) = UnixDatagram::unbound() else { return };
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut client = match crate::worker::notify::session(db, "fdtserver subscribe", true) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fdtserver: subscribe: cannot listen for other servers' events: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let mut datagram = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && !client.is_closed() {
            let mut notifications = client.notifications();
            let mut waiting = notifications.timeout_iter(std::time::Duration::from_millis(200));
            while let Ok(Some(n)) = waiting.next() {
                let Some((from, _, topic, payload)) = fdt_sdk::notify::decode(n.payload()) else { continue };
                if from != origin {
                    datagram.clear();
                    encode(&mut datagram, KIND_EVENT, topic.as_bytes(), &payload);
                    let _ = send(&socket, me, &datagram);
                }
            }
        }
    }
}

/// What names the server among those sharing its `[events] database`: its node and its control
/// socket's real path (so that two spellings of one path name one server).
pub fn origin(config: &crate::config::Config) -> String {
    fdt_sdk::notify::origin(&config.server.node_id, &server_id(&config.server.control_socket))
}

/// The control socket's path with its directory resolved (symbolic links, `..`): what names
/// the server on this machine (`HostApi::server_id`).
pub fn server_id(control_socket: &Path) -> String {
    let resolved = control_socket
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .zip(control_socket.file_name())
        .map(|(d, f)| d.join(f));
    resolved.as_deref().unwrap_or(control_socket).display().to_string()
}

/// The bus directory of the server answering on `control_socket` (an error when none does),
/// open, and its path through that descriptor (short, whatever the control socket's length).
fn running_bus(control_socket: &Path) -> Result<(std::fs::File, PathBuf), String> {
    match crate::control::request(control_socket, "GET", "/status", std::time::Duration::from_secs(10)) {
        Ok((200, _)) => {
            let path = dir(control_socket);
            let open =
                std::fs::File::open(&path).map_err(|e| format!("cannot open the event bus {}: {e}", path.display()))?;
            let through = dir_of_fd(std::os::fd::AsRawFd::as_raw_fd(&open));
            Ok((open, through))
        }
        Ok((code, body)) => Err(format!("the server answered {code}: {}", body.trim())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_cut_record_ends_the_datagram() {
        let mut buf = Vec::new();
        encode(&mut buf, KIND_EVENT, b"bank.transferred", b"{\"amount\":5}");
        encode(&mut buf, KIND_HELLO, b"hello", b"w42");
        let records: Vec<_> = decode(&buf).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], Record { kind: KIND_EVENT, topic: b"bank.transferred", payload: b"{\"amount\":5}" });
        assert_eq!(record_len(&buf), Some(7 + 16 + 12));
        let cut = &buf[..buf.len() - 1];
        assert_eq!(decode(cut).count(), 1, "the cut record is not read");
        assert_eq!(record_len(&buf[..3]), None);
    }

    #[test]
    fn topics_patterns_and_prefixes() {
        assert!(check(b"chat.line", b"x", 10).is_ok());
        assert!(check(b"", b"", 10).unwrap_err().contains("1 to 128"));
        assert!(check(b"a b", b"", 10).unwrap_err().contains("made of"));
        assert!(check(b"a", b"12345678901", 10).unwrap_err().contains("at most 10"));
        assert!(matches(b"*", b"anything"));
        assert!(matches(b"bank.*", b"bank.changed") && !matches(b"bank.*", b"banker"));
        assert!(matches(b"chat.line", b"chat.line") && !matches(b"chat.line", b"chat.lines"));
        assert_eq!(prefix(b"bank.transferred"), b"bank");
        assert_eq!(prefix(b"plain"), b"plain");
        assert_eq!(dir(Path::new("/run/fdt.sock")), PathBuf::from("/run/fdt.sock.bus"));
    }
}
