//! Listening sockets: bound once by the master, inherited by every worker of every generation.
//!
//! Invariant: a listener is bound once and closed only when no generation serves its address
//! any more, so its kernel accept queue survives every reload. Nothing here ever calls
//! `shutdown()` on a listener: the socket is shared by every process, so that would stop it
//! for all of them.

use std::io;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::Address;

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
    // Workers wait in blocking accept(): blocked accept() calls form one FIFO queue in the
    // kernel across all processes, which spreads connections evenly over idle workers.
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(ACCEPT_WAKE_INTERVAL))?;
    let local = match socket.local_addr()?.as_socket() {
        Some(a) => a.to_string(),
        None => address.to_string(),
    };
    Ok(Listener { address: address.clone(), local, socket })
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
    /// Removes the socket file of a Unix listener (when the server stops serving it).
    pub fn remove_file(&self) {
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
    }
}
