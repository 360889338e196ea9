//! TLS for the tests: a throw-away certificate (rcgen) and a blocking rustls client that trusts
//! only it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A self-signed certificate for `localhost` and its key.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    pub fn new() -> TestCert {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("generate a certificate");
        TestCert { cert_pem: made.cert.pem(), key_pem: made.signing_key.serialize_pem(), der: made.cert.der().clone() }
    }

    /// Writes `dir/NAME.crt` and `dir/NAME.key`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    /// The `[[listen]]` keys of a TLS listener serving this certificate from `dir/NAME.*`.
    pub fn listener_keys(&self, dir: &Path, name: &str) -> String {
        let (cert, key) = self.write(dir, name);
        format!("tls_cert = \"{}\"\ntls_key = \"{}\"", cert.display(), key.display())
    }
}

/// A client configuration that trusts the certificates `trusted` only, offering `alpn`.
pub fn client_config(trusted: &[&TestCert], alpn: &[&str]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A blocking TLS client with line helpers.
pub struct TlsClient {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsClient {
    /// Connects and completes the handshake (`Err`: it failed, with rustls' reason).
    pub fn connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<TlsClient> {
        TlsClient::connect_after(addr, config, b"")
    }

    /// Connects, sends `preamble` in the clear (a PROXY protocol header), then starts TLS.
    pub fn connect_after(addr: SocketAddr, config: &Arc<ClientConfig>, preamble: &[u8]) -> std::io::Result<TlsClient> {
        let mut tcp = TcpStream::connect(addr)?;
        tcp.write_all(preamble)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(Arc::clone(config), name).map_err(std::io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsClient { stream: BufReader::new(stream) })
    }

    /// The server's certificate.
    pub fn server_cert(&self) -> CertificateDer<'static> {
        self.stream.get_ref().conn.peer_certificates().expect("a server certificate")[0].clone()
    }

    /// True when the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.stream.get_ref().conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// The protocol ALPN chose.
    pub fn alpn(&self) -> Option<String> {
        self.stream.get_ref().conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stream = self.stream.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    /// One line without its end; `None` at the end of input.
    pub fn recv_line(&mut self) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        match self.stream.read_line(&mut line)? {
            0 => Ok(None),
            _ => Ok(Some(line.trim_end_matches(['\r', '\n']).to_string())),
        }
    }

    /// Sends a line and reads one back.
    pub fn ask(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes()).unwrap();
        self.recv_line().unwrap().expect("an answer before the end of input")
    }

    /// A GET over keep-alive: (status, body).
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before an answer");
        let status = self.recv_line()?.ok_or_else(eof)?;
        let status = status.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(eof)?;
        let mut len = 0;
        loop {
            let h = self.recv_line()?.ok_or_else(eof)?;
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':')
                && n.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Everything up to the end of input (`Err` if it does not come within the read timeout).
    pub fn recv_to_end(&mut self) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        self.stream.read_to_end(&mut all)?;
        Ok(all)
    }

    /// Reads until the end of input or an error; true when the server closed the connection
    /// (cleanly or not) within the read timeout.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.stream.get_mut().sock
    }
}
