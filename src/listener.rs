//! Listening sockets: bound once by the master (or adopted from systemd socket activation or
//! from the master a binary upgrade replaces), inherited by every worker of every generation.
//!
//! Invariant: a listener is bound once and closed only when no generation serves its address
//! any more, so its kernel accept queue survives every reload. Nothing here ever calls
//! `shutdown()` on a listener: the socket is shared by every process, so that would stop it
//! for all of them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Address, ListenConfig};

/// How long a worker's acceptor thread stays blocked in `accept()` before it looks at its
/// drain flag. Neither `close()` nor a signal wakes a thread blocked in `accept()`; this
/// `SO_RCVTIMEO` does. It bounds how long a draining worker may still take new connections
/// (each is still served) and costs an idle acceptor 10 wake-ups a second.
pub const ACCEPT_WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// A bound, listening socket.
pub struct Listener {
    /// As written in the config.
    pub address: Address,
    /// Where it really listens (the port the kernel chose for `:0`).
    pub local: String,
    pub socket: Socket,
    /// Where the socket came from.
    pub origin: Origin,
    /// Whether this master removes a Unix socket's file when it stops serving it: not
    /// systemd's, nor the old master's until the upgrade is done, nor after handing it over.
    pub owns_file: bool,
}

/// Where a listening socket came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this master.
    Bound,
    /// Passed by systemd (socket activation): its Unix socket file belongs to systemd.
    Systemd,
    /// Handed over by the master this one replaced (binary upgrade).
    Upgrade,
}

impl Origin {
    pub fn name(&self) -> &'static str {
        match self {
            Origin::Bound => "bound",
            Origin::Systemd => "systemd",
            Origin::Upgrade => "upgrade",
        }
    }
}

/// Binds and listens on `address`.
pub fn bind(address: &Address, backlog: i32) -> io::Result<Listener> {
    let socket = match address {
        Address::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&(*addr).into())?;
            socket
        }
        Address::Unix(path) => {
            remove_stale_unix_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&SockAddr::unix(path)?)?;
            socket
        }
    };
    socket.listen(backlog)?;
    ready(address, socket, Origin::Bound)
}

/// Sets up a listening socket for blocking accepts by the workers.
fn ready(address: &Address, socket: Socket, origin: Origin) -> io::Result<Listener> {
    // Workers wait in blocking accept(): blocked accept() calls form one FIFO queue in the
    // kernel across all processes, which spreads connections evenly over idle workers.
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(ACCEPT_WAKE_INTERVAL))?;
    let local = match socket.local_addr()?.as_socket() {
        Some(a) => a.to_string(),
        None => address.to_string(),
    };
    Ok(Listener { address: address.clone(), local, socket, origin, owns_file: origin == Origin::Bound })
}

/// Listening sockets this master was given rather than bound: by systemd socket activation
/// (`LISTEN_FDS`) or by the master it replaces in a binary upgrade. Each is adopted by the
/// `[[listen]]` it matches; the others wait in case a reload adds their address.
#[derive(Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
}

struct InheritedSocket {
    socket: Socket,
    /// The `ListenConfig::key` it served (upgrade), or `None` (systemd: matched by address).
    key: Option<String>,
    /// The systemd fd name, for messages.
    name: Option<String>,
    origin: Origin,
}

impl Inherited {
    /// Takes ownership of an inherited fd, after checking that it is a listening stream socket.
    pub fn add(&mut self, fd: OwnedFd, key: Option<String>, name: Option<String>, origin: Origin) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let socket = Socket::from(fd);
        if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
            return Err(io::Error::other(format!("fd {raw} is not a listening stream socket")));
        }
        // Only the master holds these until a worker is forked; never passed on by exec.
        crate::sys::set_cloexec(raw, true)?;
        self.sockets.push(InheritedSocket { socket, key, name, origin });
        Ok(())
    }

    /// The inherited socket for `listen`, if there is one: by its key when the socket came from
    /// an upgrade, else by its address (a `:0` address never matches a systemd socket).
    pub fn take(&mut self, listen: &ListenConfig) -> io::Result<Option<Listener>> {
        let key = listen.key();
        let position = self.sockets.iter().position(|s| match &s.key {
            Some(k) => *k == key,
            None => matches_address(&s.socket, &listen.address),
        });
        let Some(i) = position else { return Ok(None) };
        let inherited = self.sockets.remove(i);
        // A second listen() only updates the backlog of a listening socket.
        inherited.socket.listen(listen.backlog)?;
        ready(&listen.address, inherited.socket, inherited.origin).map(Some)
    }

    /// The inherited socket for a socket of the master's own (the agent check), as it is: by
    /// `key` when it came from an upgrade (and still bound to `address`), else by its address.
    pub fn take_socket(&mut self, key: &str, address: &Address) -> Option<Socket> {
        let position = self
            .sockets
            .iter()
            .position(|s| s.key.as_deref().is_none_or(|k| k == key) && matches_address(&s.socket, address))?;
        Some(self.sockets.remove(position).socket)
    }

    /// Descriptions of the sockets nobody adopted (for a log line).
    pub fn leftovers(&self) -> Vec<String> {
        self.sockets
            .iter()
            .map(|s| {
                let addr = s.socket.local_addr().ok().map(|a| describe(&a)).unwrap_or_else(|| "?".into());
                match &s.name {
                    Some(n) => format!("{addr} (\"{n}\", from {})", s.origin.name()),
                    None => format!("{addr} (from {})", s.origin.name()),
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Closes the sockets an old master handed over that no `[[listen]]` uses any more (the
    /// old master closes its copies as it exits, so nobody would accept on them).
    pub fn close_upgrade_leftovers(&mut self) -> Vec<String> {
        let leftovers: Vec<InheritedSocket>;
        (leftovers, self.sockets) =
            std::mem::take(&mut self.sockets).into_iter().partition(|s| s.origin == Origin::Upgrade);
        leftovers.iter().map(|s| s.key.clone().unwrap_or_default()).collect()
    }
}

fn describe(addr: &SockAddr) -> String {
    match (addr.as_socket(), addr.as_pathname()) {
        (Some(a), _) => a.to_string(),
        (None, Some(p)) => format!("unix:{}", p.display()),
        _ => "an unnamed socket".into(),
    }
}

/// True when `socket` is bound to `address` (for a TCP address with port 0, never).
fn matches_address(socket: &Socket, address: &Address) -> bool {
    let Ok(local) = socket.local_addr() else { return false };
    match address {
        Address::Tcp(a) => a.port() != 0 && local.as_socket() == Some(*a),
        Address::Unix(path) => local.as_pathname() == Some(path.as_path()),
    }
}

/// The raw fd of a listener (for handing it to a new master).
pub fn raw_fd(listener: &Listener) -> RawFd {
    listener.socket.as_raw_fd()
}

/// Removes a Unix socket file left by a server that died, but refuses to steal one that a
/// live server still listens on, or to delete anything that is not a socket.
fn remove_stale_unix_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket"));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on this socket"));
    }
    std::fs::remove_file(path)
}

impl Listener {
    /// Removes the socket file of a Unix listener (when the server stops serving it), unless
    /// systemd made it: systemd owns that file and keeps listening on it.
    pub fn remove_file(&self) {
        if let Address::Unix(path) = &self.address
            && self.owns_file
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn listen(address: &str, app: &str) -> ListenConfig {
        ListenConfig {
            tls: None,
            proxy: None,
            address: Address::parse(address, Path::new("/")).unwrap(),
            app: app.into(),
            backlog: 16,
            limits: Default::default(),
        }
    }

    fn passed(addr: &str) -> OwnedFd {
        OwnedFd::from(std::net::TcpListener::bind(addr).unwrap())
    }

    #[test]
    fn passed_sockets_are_adopted_by_address_or_by_key_and_port_0_never_matches_an_address() {
        let mut inherited = Inherited::default();
        let systemd = passed("127.0.0.1:0");
        let systemd_addr = Socket::from(systemd.try_clone().unwrap()).local_addr().unwrap().as_socket().unwrap();
        inherited.add(systemd, None, Some("web".into()), Origin::Systemd).unwrap();
        inherited.add(passed("127.0.0.1:0"), Some("127.0.0.1:0#kit".into()), None, Origin::Upgrade).unwrap();

        assert!(inherited.take(&listen("127.0.0.1:0", "other")).unwrap().is_none(), "port 0 matched an address");
        let by_key = inherited.take(&listen("127.0.0.1:0", "kit")).unwrap().expect("the upgrade socket by its key");
        assert_eq!((by_key.origin, by_key.owns_file), (Origin::Upgrade, false));
        let by_addr =
            inherited.take(&listen(&systemd_addr.to_string(), "web")).unwrap().expect("the systemd socket by address");
        assert_eq!(by_addr.origin, Origin::Systemd);
        assert_eq!(by_addr.local, systemd_addr.to_string());
        assert!(inherited.is_empty());
    }

    #[test]
    fn a_passed_fd_that_is_not_a_listening_socket_is_refused() {
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = Inherited::default().add(OwnedFd::from(connected), None, None, Origin::Systemd).unwrap_err();
        assert!(err.to_string().contains("not a listening stream socket"), "{err}");
    }
}
