//! TLS on a listener: loading its certificate and key (in the master, at start and at every
//! reload, before the workers fork: they inherit the loaded configuration, so a key readable
//! only by root still serves workers that run as `user`), and one connection's TLS session,
//! through which `worker::conn` reads and writes its socket.
//!
//! Never blocks and never buffers without bound: a session reads from its socket only once the
//! app took the plaintext read before, and holds at most rustls' buffer limit (64 KiB) of
//! records the socket did not take yet.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use socket2::Socket;

/// A listener's TLS settings as configured (`tls_cert`, `tls_key`, `tls_alpn`), with the
/// configuration loaded from them (see [`Tls::load`]).
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// ALPN protocol names offered, in order of preference (empty: no ALPN).
    pub alpn: Vec<String>,
    /// Session tickets under one key for all the generation's workers (`tls_tickets`).
    pub tickets: bool,
    /// Set by [`Tls::load`]; `None` until then.
    pub loaded: Option<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the certificate chain and the key afresh and builds the configuration that the
    /// listener's connections share. Errors name the file and the reason.
    pub fn load(&mut self) -> Result<(), String> {
        self.loaded = Some(Arc::new(server_config(&self.cert, &self.key, &self.alpn, self.tickets)?));
        Ok(())
    }

    /// The loaded configuration.
    pub fn config(&self) -> &Arc<ServerConfig> {
        self.loaded.as_ref().expect("TLS settings are loaded before any worker starts")
    }
}

/// The rustls configuration of a certificate chain and its key: TLS 1.2 and 1.3 with rustls'
/// safe defaults, on the `ring` provider (it builds with a C compiler alone).
///
/// With `tickets`, sessions resume from tickets under a key made here, in the master, before
/// the workers fork: every worker of the generation holds it, so a client resumes on whichever
/// worker its next connection reaches (a session cache is per process), once that worker has
/// issued a ticket at least as long itself (rustls refuses tickets longer than any its process
/// made; a ticket grows with the client's server name and ALPN protocol). rustls
/// rotates the key every 6 hours, in each worker on its own: from then on until the next
/// reload a ticket resumes only on the worker that issued it, as with the cache. Without
/// `tickets`, each worker keeps a cache of 256 sessions.
pub fn server_config(cert: &Path, key: &Path, alpn: &[String], tickets: bool) -> Result<ServerConfig, String> {
    let pem_error = |key: &str, path: &Path, e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(e) => format!("{key} {}: {e}", path.display()),
        rustls::pki_types::pem::Error::NoItemsFound => {
            let what = if key == "tls_cert" { "no CERTIFICATE" } else { "no PRIVATE KEY" };
            format!("{key} {}: {what} block in the file (a PEM file is expected)", path.display())
        }
        e => format!("{key} {}: not a valid PEM file: {e}", path.display()),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error("tls_cert", cert, e))?;
    if chain.is_empty() {
        return Err(pem_error("tls_cert", cert, rustls::pki_types::pem::Error::NoItemsFound));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("tls_key", key, e))?;
    // `ring`: the provider that builds from the registry with a C compiler alone (aws-lc-rs
    // needs cmake). rustls deprecates it for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| format!("tls_cert {} with tls_key {}: {e}", cert.display(), key.display()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if tickets {
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS: cannot make a session ticket key: {e}"))?;
    }
    Ok(config)
}

/// One connection's TLS session over its (non-blocking) socket. Reads and writes behave like
/// the socket's own: `Ok(0)` from [`Session::read`] is the end of input, `WouldBlock` means
/// "wait for the socket".
pub struct Session {
    conn: ServerConnection,
    /// The last read from the socket was short (or would block): the kernel's buffer was
    /// empty then, so no more input waits unless a new edge says so.
    socket_drained: bool,
    /// Plaintext was written before the handshake ended: rustls holds it until then.
    wrote_early: bool,
}

impl Session {
    pub fn new(config: &Arc<ServerConfig>) -> io::Result<Session> {
        let conn = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(Session { conn, socket_drained: false, wrote_early: false })
    }

    /// True until the handshake is complete.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// True while the handshake is under way with plaintext written already (a greeting): it
    /// can only be sent once the handshake ends.
    pub fn holds_plaintext(&self) -> bool {
        self.wrote_early && self.conn.is_handshaking()
    }

    /// True when records wait for the socket to take them.
    pub fn has_backlog(&self) -> bool {
        self.conn.wants_write()
    }

    /// True when a read may find more without a new readiness event: plaintext or records
    /// are buffered here, or the last read from the socket filled what it asked for.
    pub fn may_have_more(&self) -> bool {
        !self.socket_drained
    }

    /// Reads plaintext: what is buffered, else what the socket brings (handshake messages are
    /// answered on the way).
    pub fn read(&mut self, socket: &Socket, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed the TCP connection without `close_notify`: for a stream of
                // requests that is simply the end of input (what it sent was answered or is
                // being answered; nothing is taken as complete that was not).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let mut source = SocketRead { socket, short: false };
            let got = match self.conn.read_tls(&mut source) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.socket_drained = true;
                    self.flush(socket)?;
                    return Err(e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.socket_drained = source.short || got == 0;
            if let Err(e) = self.conn.process_new_packets() {
                // Tell the peer why (the alert rustls queued), as far as the socket takes it.
                let _ = self.flush(socket);
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
            // Handshake messages to answer, or plaintext written before the handshake ended.
            self.flush(socket)?;
            if got == 0 {
                // The end of input: what is buffered is read first, then `Ok(0)`.
                return match self.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// Moves the plaintext already decrypted into `into`, reading nothing from the socket:
    /// how much it moved (at most rustls' plaintext buffer, 16 KiB).
    pub fn take_plaintext(&mut self, into: &mut Vec<u8>) -> usize {
        let mut buf = [0u8; 4096];
        let mut moved = 0;
        while let Ok(n @ 1..) = self.conn.reader().read(&mut buf) {
            into.extend_from_slice(&buf[..n]);
            moved += n;
        }
        moved
    }

    /// Writes plaintext: takes what fits in the session's buffer and sends its records as far
    /// as the socket takes them. `WouldBlock` when the records of earlier writes still wait.
    pub fn write(&mut self, socket: &Socket, buf: &[u8]) -> io::Result<usize> {
        self.flush(socket)?;
        if self.conn.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let taken = self.conn.writer().write(buf)?;
        self.wrote_early |= taken > 0 && self.conn.is_handshaking();
        self.flush(socket)?;
        if taken == 0 && !buf.is_empty() {
            // Its buffer is full of plaintext written before the handshake ended.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Sends waiting records as far as the socket takes them; returns how many bytes it took
    /// (progress, for `send_timeout`).
    pub fn flush(&mut self, socket: &Socket) -> io::Result<usize> {
        let mut sink = socket;
        let mut sent = 0;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut sink) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(sent),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// True while the handshake is under way and nothing waits for the socket: output cannot
    /// move until the peer's next handshake message, so the connection waits to read, not to
    /// write (a writable socket would report at once, forever).
    pub fn waits_for_peer(&self) -> bool {
        self.conn.is_handshaking() && !self.conn.wants_write()
    }

    /// Starts a TLS close: `close_notify`, sent as far as the socket takes it.
    pub fn close_notify(&mut self, socket: &Socket) {
        self.conn.send_close_notify();
        let _ = self.flush(socket);
    }
}

/// The socket as rustls reads it, noting a short read (the kernel's buffer emptied).
struct SocketRead<'a> {
    socket: &'a Socket,
    short: bool,
}

impl Read for SocketRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut socket = self.socket;
        let n = socket.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use socket2::{Domain, Type};

    /// A server session over one end of a socket pair and a client over the other, the
    /// handshake done.
    fn connected() -> (Session, Socket, rustls::ClientConnection, Socket) {
        let dir = tempfile::tempdir().unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let mut server = Session::new(&Arc::new(server_config(&cert, &key, &[], false).unwrap())).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let (server_end, mut client_end) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        server_end.set_nonblocking(true).unwrap();
        client_end.set_nonblocking(true).unwrap();
        for _ in 0..100 {
            while client.wants_write() {
                client.write_tls(&mut client_end).unwrap();
            }
            let _ = server.read(&server_end, &mut [0u8; 16]);
            if client.read_tls(&mut client_end).is_ok() {
                client.process_new_packets().unwrap();
            }
            if !client.is_handshaking() && !server.handshaking() && !client.wants_write() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.handshaking(), "the handshake completes");
        (server, server_end, client, client_end)
    }

    #[test]
    fn plaintext_decrypted_beyond_what_a_read_took_is_kept_whole_and_in_order() {
        let (mut server, server_end, mut client, mut client_end) = connected();
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        client.writer().write_all(&sent).unwrap();
        while client.wants_write() {
            client.write_tls(&mut client_end).unwrap();
        }
        let mut got = vec![0u8; 100];
        let n = server.read(&server_end, &mut got).unwrap();
        got.truncate(n);
        assert!(server.take_plaintext(&mut got) > 0, "a short read leaves decrypted plaintext behind");
        while got.len() < sent.len() {
            let mut buf = vec![0u8; 65536];
            match server.read(&server_end, &mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn a_file_with_no_certificate_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = server_config(&empty, &empty, &[], true).unwrap_err();
        assert!(err.contains("tls_cert") && err.contains("no CERTIFICATE block"), "{err}");
    }
}
