//! Listeners behind a proxy (`proxy_protocol`, `proxy_from`): the client a PROXY protocol
//! header names is what the app (`Conn::peer`) and the access log see; a header from outside
//! `proxy_from`, a missing or malformed one, or one that arrives slower than `read_timeout`
//! closes only that connection.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use util::tls::{TestCert, TlsClient, client_config};
use util::*;

/// `testkit` behind a proxy speaking `version`, with these more `[[listen]]` keys.
fn server(version: &str, keys: &str) -> TestServer {
    let setup = Setup::new(1, 2)
        .app("kit", "testkit", "")
        .listener_keys("kit", &format!("proxy_protocol = \"{version}\"\n{keys}"))
        .server("access_log", "\"access.log\"")
        .server("read_timeout", "1");
    TestServer::start(&setup)
}

fn closed_total(server: &TestServer, reason: &str) -> u64 {
    let (_, body) = server.control("GET", "/metrics").expect("metrics");
    let prefix = format!("fdtserver_connections_closed_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// A v2 header for a TCP client `src` talking to `dst`, with `tlv` bytes of TLVs after the
/// addresses.
fn v2(src: SocketAddr, dst: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    let mut addresses = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            addresses.extend(s.ip().octets());
            addresses.extend(d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            addresses.extend(s.ip().octets());
            addresses.extend(d.ip().octets());
        }
        _ => panic!("one family"),
    }
    addresses.extend(src.port().to_be_bytes());
    addresses.extend(dst.port().to_be_bytes());
    addresses.extend(tlv);
    h.extend((addresses.len() as u16).to_be_bytes());
    h.extend(addresses);
    h
}

/// Sends `header` then `PEER`, and returns the answer line (`None`: the connection ended).
fn peer_after(addr: SocketAddr, header: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut bytes = header.to_vec();
    bytes.extend(b"PEER\n");
    let _ = stream.write_all(&bytes);
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim_end().to_string()),
        _ => None,
    }
}

#[test]
fn the_client_a_v1_header_names_is_what_the_app_and_the_access_log_see() {
    let server = server("v1", "");
    let addr = server.addr("kit");
    assert_eq!(peer_after(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n").as_deref(), Some("203.0.113.7:4242"));
    assert_eq!(peer_after(addr, b"PROXY TCP6 2001:db8::1 ::1 5353 80\r\n").as_deref(), Some("[2001:db8::1]:5353"));
    // UNKNOWN (a proxy's own health check, say): the connection's own address stands.
    let own = peer_after(addr, b"PROXY UNKNOWN\r\n").expect("an answer");
    assert!(own.starts_with("127.0.0.1:"), "{own}");
    wait_for(Duration::from_secs(3), "the access log line with the named client", || {
        std::fs::read_to_string(server.dir.path().join("access.log"))
            .ok()
            .filter(|log| log.contains("peer=203.0.113.7:4242 "))
    });
}

#[test]
fn v2_headers_with_tlvs_and_local_ones_are_read_and_any_takes_both_versions() {
    let server = server("any", "");
    let addr = server.addr("kit");
    let v4 = v2("198.51.100.9:1234".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), &[0x05, 0, 3, b'a', b'b', b'c']);
    assert_eq!(peer_after(addr, &v4).as_deref(), Some("198.51.100.9:1234"));
    let v6 = v2("[2001:db8::2]:99".parse().unwrap(), "[::1]:80".parse().unwrap(), &[]);
    assert_eq!(peer_after(addr, &v6).as_deref(), Some("[2001:db8::2]:99"));
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend([0x20, 0x00, 0x00, 0x00]);
    assert!(peer_after(addr, &local).expect("an answer").starts_with("127.0.0.1:"));
    assert_eq!(peer_after(addr, b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n").as_deref(), Some("192.0.2.1:1"));
}

#[test]
fn a_missing_malformed_or_wrong_version_header_closes_only_that_connection() {
    let server = server("v2", "");
    let addr = server.addr("kit");
    let pids = server.worker_pids();
    let mut good = TcpStream::connect(addr).unwrap();
    good.write_all(&v2("192.0.2.5:5".parse().unwrap(), "127.0.0.1:1".parse().unwrap(), &[])).unwrap();
    let mut good = LineClient::from_stream(good);
    assert_eq!(good.ask("PEER"), "192.0.2.5:5");

    let refused: [&[u8]; 4] = [
        b"PEER\n",                                           // no header at all
        b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n",           // v1 on a v2 listener
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x02ab",           // addresses shorter than TCP4's
        b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c0123456789ab", // version 3
    ];
    let before = closed_total(&server, "proxy_header");
    for header in refused {
        let began = Instant::now();
        assert_eq!(peer_after(addr, header), None, "{header:?} must be refused");
        assert!(began.elapsed() < Duration::from_millis(900), "refused at once, not at read_timeout");
    }
    wait_for(Duration::from_secs(3), "4 proxy_header closes counted", || {
        (closed_total(&server, "proxy_header") >= before + 4).then_some(())
    });
    assert_eq!(good.ask("PEER"), "192.0.2.5:5", "the good connection never noticed");
    assert_eq!(server.worker_pids(), pids);
}

#[test]
fn a_header_from_outside_proxy_from_is_refused_before_it_is_read() {
    let server = server("v1", "proxy_from = [\"10.0.0.0/8\", \"192.168.1.1\"]");
    let addr = server.addr("kit");
    assert_eq!(peer_after(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n"), None);
    wait_for(Duration::from_secs(3), "a proxy_header close counted", || {
        (closed_total(&server, "proxy_header") >= 1).then_some(())
    });
    let open = server.addr("kit"); // still listening
    assert_eq!(open, addr);
    let allowed = self::server("v1", "proxy_from = [\"127.0.0.0/8\"]");
    assert_eq!(
        peer_after(allowed.addr("kit"), b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n").as_deref(),
        Some("203.0.113.7:4242")
    );
}

#[test]
fn a_header_in_pieces_is_read_whole_within_read_timeout_and_closed_when_slower() {
    let server = server("v1", "");
    let addr = server.addr("kit");
    // Three pieces within the timeout: read whole.
    let mut quick = TcpStream::connect(addr).unwrap();
    for piece in [&b"PROXY TCP4 203."[..], b"0.113.7 127.0.0.1 ", b"4242 80\r\nPEER\n"] {
        quick.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut quick = LineClient::from_stream(quick);
    assert_eq!(quick.recv().as_deref(), Some("203.0.113.7:4242"));

    // A byte every 300 ms: the header is not whole after read_timeout (1 s).
    let mut slow = TcpStream::connect(addr).unwrap();
    let began = Instant::now();
    let mut closed_after = None;
    for byte in b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n" {
        let _ = slow.write_all(&[*byte]);
        if is_closed(&mut slow) {
            closed_after = Some(began.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let waited = closed_after.expect("a header trickled slower than read_timeout must be closed");
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "closed after {waited:?}");
    wait_for(Duration::from_secs(3), "a read_timeout close counted", || {
        (closed_total(&server, "read_timeout") >= 1).then_some(())
    });
}

#[test]
fn with_no_read_timeout_a_header_never_sent_is_closed_at_idle_timeout() {
    let setup = Setup::new(1, 2)
        .app("kit", "testkit", "")
        .listener_keys("kit", "proxy_protocol = \"v1\"")
        .server("read_timeout", "0")
        .server("idle_timeout", "1");
    let server = TestServer::start(&setup);
    let mut silent = TcpStream::connect(server.addr("kit")).unwrap();
    let began = Instant::now();
    let closed = wait_for(Duration::from_secs(4), "a connection that never sends its header closed", || {
        is_closed(&mut silent).then(|| began.elapsed())
    });
    assert!(closed >= Duration::from_millis(900), "closed after {closed:?}, before idle_timeout");
    wait_for(Duration::from_secs(3), "an idle_timeout close counted", || {
        (closed_total(&server, "idle_timeout") >= 1).then_some(())
    });
}

#[test]
fn a_unix_listener_takes_the_header_of_its_local_proxy() {
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kit.sock");
    let setup = Setup::new(1, 2)
        .app_at("kit", &plugin("testkit"), "", &format!("unix:{}", path.display()))
        .listener_keys("kit", "proxy_protocol = \"v1\"");
    let _server = TestServer::start(&setup);
    let stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&stream).write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 5151 80\r\nPEER\n").unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "198.51.100.9:5151");
}

/// True when the peer has closed `stream` (a zero-length read, or a reset).
fn is_closed(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    match stream.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

#[test]
fn behind_a_proxy_tls_starts_after_the_header_and_the_app_sees_the_named_client() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let setup = Setup::new(1, 2)
        .app("kit", "testkit", "")
        .listener_keys("kit", &format!("proxy_protocol = \"v1\"\n{}", cert.listener_keys(dir.path(), "kit")));
    let server = TestServer::start(&setup);
    let config = client_config(&[&cert], &[]);
    let mut client =
        TlsClient::connect_after(server.addr("kit"), &config, b"PROXY TCP4 203.0.113.8 127.0.0.1 7 443\r\n")
            .expect("a TLS handshake after the header");
    assert_eq!(client.ask("PEER"), "203.0.113.8:7");
}

#[test]
fn proxy_settings_that_make_no_sense_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    // The listener's keys are lines 9 on.
    let write = |listen: &str| echo_config(dir.path(), "", listen, "");
    check_refuses(&write("proxy_protocol = \"v3\""), &["fdt.toml:9", "\"v1\", \"v2\" or \"any\""]);
    check_refuses(&write("proxy_from = [\"10.0.0.0/8\"]"), &["fdt.toml:9", "`proxy_from` needs `proxy_protocol`"]);
    check_refuses(&write("proxy_protocol = \"v1\"\nproxy_from = [\"10.0.0.0/33\"]"), &["fdt.toml:10", "10.0.0.0/33"]);
    check_refuses(&write("proxy_protocol = \"v1\"\nproxy_from = [\"example.com\"]"), &["fdt.toml:10", "example.com"]);
    let (code, out, err) = cli(&["check"], &write("proxy_protocol = \"any\"\nproxy_from = [\"10.0.0.0/8\", \"::1\"]"));
    assert_eq!(code, 0, "{out}{err}");
}
