//! TLS listeners (`tls_cert`, `tls_key`, `tls_alpn`): the apps see plain bytes through the same
//! SDK, the connection limits, bounded output and push hold, a reload serves a new certificate
//! (files that do not load refuse it while the old generation serves on), and a client that
//! does not speak TLS costs only its own connection.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::tls::{TestCert, TlsClient, client_config};
use util::*;

/// A server with `app` (plugin `plugin`) on a TLS listener serving `cert`.
fn tls_setup(dir: &std::path::Path, cert: &TestCert, app: &str, plugin: &str, settings: &str) -> Setup {
    Setup::new(1, 4).app(app, plugin, settings).listener_keys(app, &cert.listener_keys(dir, app))
}

/// `fdtserver_connections_closed_total{reason}` from `/metrics`.
fn closed_total(server: &TestServer, reason: &str) -> u64 {
    let (_, body) = server.control("GET", "/metrics").expect("metrics");
    let prefix = format!("fdtserver_connections_closed_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// A worker's resident memory in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[test]
fn apps_see_plain_bytes_over_tls_lines_keep_alive_requests_and_a_long_download() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let setup = tls_setup(dir.path(), &cert, "echo", "echo", "")
        .app("hello", "hello", "")
        .listener_keys("hello", &cert.listener_keys(dir.path(), "hello"));
    let server = TestServer::start(&setup);
    let config = client_config(&[&cert], &[]);

    let mut echo = TlsClient::connect(server.addr("echo"), &config).expect("handshake with the echo listener");
    assert_eq!(echo.server_cert(), cert.der);
    for i in 0..20 {
        assert_eq!(echo.ask(&format!("line {i}")), format!("line {i}"));
    }
    // A line cut in two records still arrives whole.
    echo.send(b"half and ").unwrap();
    echo.send(b"half\n").unwrap();
    assert_eq!(echo.recv_line().unwrap().as_deref(), Some("half and half"));

    let mut hello = TlsClient::connect(server.addr("hello"), &config).unwrap();
    for _ in 0..50 {
        let (status, body) = hello.get("/").unwrap();
        assert_eq!((status, body.as_str()), (200, "Hello, world!"));
    }
    // A body far larger than the output queue and the TLS buffers: produced as it is sent.
    let (status, body) = hello.get("/bytes/3000000").unwrap();
    assert_eq!((status, body.len()), (200, 3_000_000));
    assert_eq!(hello.get("/").unwrap().0, 200, "the connection serves on after the download");
}

#[test]
fn a_client_that_does_not_speak_tls_costs_only_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let server = TestServer::start(&tls_setup(dir.path(), &cert, "hello", "hello", "").server("read_timeout", "1"));
    let addr = server.addr("hello");
    let pids = server.worker_pids();
    let config = client_config(&[&cert], &[]);
    let mut good = TlsClient::connect(addr, &config).unwrap();

    // Plain HTTP on the TLS port: refused at its first bytes (with a TLS alert), at once.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sent = Instant::now();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let end = plain.read_to_end(&mut got);
    assert!(end.is_ok() || got.is_empty(), "the connection ends: {end:?}");
    assert!(sent.elapsed() < Duration::from_secs(2), "closed only after {:?}", sent.elapsed());
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1"), "no plaintext answer: {got:?}");

    // Silent, and a handshake that stops half-way: both have `read_timeout` to finish it.
    let silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]).unwrap();
    let before = closed_total(&server, "read_timeout");
    let opened = Instant::now();
    for mut stream in [silent, half] {
        stream.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf);
        let waited = opened.elapsed();
        assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "closed after {waited:?}");
    }
    wait_for(Duration::from_secs(3), "two read_timeout closes counted", || {
        (closed_total(&server, "read_timeout") >= before + 2).then_some(())
    });

    // The TLS client never noticed, and no worker was lost.
    assert_eq!(good.get("/").unwrap().0, 200);
    assert_eq!(server.worker_pids(), pids);
}

#[test]
fn output_stays_bounded_and_send_timeout_closes_a_tls_client_that_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let server = TestServer::start(&tls_setup(dir.path(), &cert, "hello", "hello", "").server("send_timeout", "1"));
    let addr = server.addr("hello");
    let config = client_config(&[&cert], &[]);
    let pid = server.worker_pids()[0];
    let before = rss_kib(pid);
    let mut stuck = TlsClient::connect(addr, &config).unwrap();
    stuck.send(b"GET /bytes/2000000000 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    wait_for(Duration::from_secs(8), "a send_timeout close", || {
        (closed_total(&server, "send_timeout") >= 1).then_some(())
    });
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 32 * 1024, "the worker grew by {grown} KiB for a client that read nothing");
    let mut other = TlsClient::connect(addr, &config).unwrap();
    assert_eq!(other.get("/").unwrap().0, 200, "the worker serves on");
    assert_eq!(server.worker_pids(), vec![pid]);
}

#[test]
fn idle_timeout_closes_an_idle_tls_connection_gently() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let server = TestServer::start(&tls_setup(dir.path(), &cert, "echo", "echo", "").server("idle_timeout", "1"));
    let mut client = TlsClient::connect(server.addr("echo"), &client_config(&[&cert], &[])).unwrap();
    assert_eq!(client.ask("hi"), "hi");
    let quiet = Instant::now();
    // A clean TLS close: `close_notify`, then the end of input.
    assert_eq!(client.recv_line().expect("a clean TLS close, not a reset"), None);
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(4), "closed after {waited:?}");
    wait_for(Duration::from_secs(3), "an idle_timeout close counted", || {
        (closed_total(&server, "idle_timeout") >= 1).then_some(())
    });
}

#[test]
fn pushes_and_greetings_reach_tls_clients() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let server = TestServer::start(&tls_setup(dir.path(), &cert, "chat", "chat", ""));
    let config = client_config(&[&cert], &[]);
    let mut a = TlsClient::connect(server.addr("chat"), &config).unwrap();
    let mut b = TlsClient::connect(server.addr("chat"), &config).unwrap();
    for client in [&mut a, &mut b] {
        let welcome = client.recv_line().unwrap().unwrap();
        assert!(welcome.starts_with("WELCOME "), "{welcome}");
    }
    assert_eq!(b.ask("NICK bee"), "OK");
    for i in 0..20 {
        b.send(format!("hello {i}\n").as_bytes()).unwrap();
    }
    for i in 0..20 {
        assert_eq!(a.recv_line().unwrap().unwrap(), format!("bee: hello {i}"));
    }
}

#[test]
fn alpn_offers_the_configured_protocols_and_refuses_a_client_with_none_in_common() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let setup =
        tls_setup(dir.path(), &cert, "hello", "hello", "").listener_keys("hello", "tls_alpn = [\"h2\", \"http/1.1\"]");
    let server = TestServer::start(&setup);
    let addr = server.addr("hello");
    let mut client = TlsClient::connect(addr, &client_config(&[&cert], &["http/1.1"])).unwrap();
    assert_eq!(client.alpn().as_deref(), Some("http/1.1"));
    assert_eq!(client.get("/").unwrap().0, 200);
    let both = TlsClient::connect(addr, &client_config(&[&cert], &["http/1.1", "h2"])).unwrap();
    assert_eq!(both.alpn().as_deref(), Some("h2"), "the server's order of preference decides");
    let refused = TlsClient::connect(addr, &client_config(&[&cert], &["spdy/1"]));
    assert!(refused.is_err(), "no protocol in common must fail the handshake");
    let none = TlsClient::connect(addr, &client_config(&[&cert], &[])).unwrap();
    assert_eq!(none.alpn(), None, "a client without ALPN is served");
}

#[test]
fn a_reload_serves_a_new_certificate_and_files_that_do_not_load_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (TestCert::new(), TestCert::new());
    let server = TestServer::start(&tls_setup(dir.path(), &first, "echo", "echo", ""));
    let addr = server.addr("echo");
    let trusts_both = client_config(&[&first, &second], &[]);
    let mut kept = TlsClient::connect(addr, &trusts_both).unwrap();
    assert_eq!(kept.server_cert(), first.der);

    // The same paths, new contents: the next generation serves the new certificate.
    second.write(dir.path(), "echo");
    let (code, body) = server.reload();
    assert_eq!(code, 200, "{body}");
    let fresh = TlsClient::connect(addr, &trusts_both).unwrap();
    assert_eq!(fresh.server_cert(), second.der, "a new connection gets the reloaded certificate");
    // A TLS connection is not handed off (its session cannot move): it stays with its old
    // worker and serves on.
    assert_eq!(kept.ask("still here"), "still here");

    // A key that is not a key, a certificate that is gone, a key of another certificate: each
    // refuses the reload with the path and the reason; the serving generation goes on.
    let key = dir.path().join("echo.key");
    let crt = dir.path().join("echo.crt");
    let generation = server.generation();
    type Breakage<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let broken: [Breakage<'_>; 3] = [
        ("tls_key", Box::new(|| std::fs::write(&key, "not a key\n").unwrap()), "no PRIVATE KEY"),
        ("tls_cert", Box::new(|| std::fs::remove_file(&crt).unwrap()), "No such file"),
        ("tls_cert", Box::new(|| std::fs::write(&key, &first.key_pem).unwrap()), "tls_key"),
    ];
    for (what, breaks, reason) in broken {
        second.write(dir.path(), "echo");
        breaks();
        let (code, body) = server.reload();
        let text = body.to_string();
        assert_ne!(code, 200, "a broken {what} must refuse the reload: {text}");
        assert!(text.contains(what) && text.contains(reason), "the refusal names {what} and {reason:?}: {text}");
        assert_eq!(server.generation(), generation, "the serving generation stays");
        let client = TlsClient::connect(addr, &trusts_both).expect("the old generation serves on");
        assert_eq!(client.server_cert(), second.der);
    }
    assert!(server.log().contains("reload refused"));
}

#[test]
fn a_config_with_half_a_tls_setting_or_a_bad_file_is_refused_naming_the_line_and_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // The listener's keys are lines 9 on.
    let write = |listen: &str| echo_config(dir.path(), "", listen, "");
    check_refuses(&write("tls_cert = \"a.crt\""), &["fdt.toml:9", "`tls_cert` needs `tls_key`"]);
    check_refuses(&write("tls_key = \"a.key\""), &["fdt.toml:9", "`tls_key` needs `tls_cert`"]);
    check_refuses(&write("tls_alpn = [\"h2\"]"), &["fdt.toml:9", "`tls_alpn` needs `tls_cert`"]);
    check_refuses(&write("tls_tickets = false"), &["fdt.toml:9", "`tls_tickets` needs `tls_cert`"]);
    let missing = write("tls_cert = \"missing.crt\"\ntls_key = \"missing.key\"");
    let path = dir.path().join("missing.crt");
    check_refuses(&missing, &["tls_cert", &path.display().to_string(), "No such file"]);
    server_refuses(&missing, &["tls_cert", &path.display().to_string(), "No such file"]);
    let cert = TestCert::new();
    cert.write(dir.path(), "good");
    std::fs::write(dir.path().join("bad.key"), "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
        .unwrap();
    check_refuses(&write("tls_cert = \"good.crt\"\ntls_key = \"bad.key\""), &["tls_key", "bad.key", "not a valid PEM"]);
    check_refuses(
        &write("tls_cert = \"good.key\"\ntls_key = \"good.key\""),
        &["tls_cert", "good.key", "no CERTIFICATE block"],
    );
    let (code, out, err) =
        cli(&["check"], &write("tls_cert = \"good.crt\"\ntls_key = \"good.key\"\ntls_alpn = [\"h2\"]"));
    assert_eq!(code, 0, "{out}{err}");
}

/// A process's CPU time (user + system) in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_greeting_larger_than_the_tls_buffers_waits_for_the_handshake_without_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let greeting = "g".repeat(200_000);
    let server =
        TestServer::start(&tls_setup(dir.path(), &cert, "kit", "testkit", &format!("greeting = \"{greeting}\"")));
    let pid = server.worker_pids()[0];
    // Connected, silent: the greeting cannot move until the handshake does.
    let silent = TcpStream::connect(server.addr("kit")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    assert!(used < 20, "the worker used {used} ticks of CPU in 1 s for a silent TLS client: it spins");
    drop(silent);
    let mut client = TlsClient::connect(server.addr("kit"), &client_config(&[&cert], &[])).unwrap();
    assert_eq!(client.recv_line().unwrap().unwrap().len(), greeting.len(), "the whole greeting after the handshake");
    assert_eq!(client.ask("PEER").split(':').next(), Some("127.0.0.1"));
}

#[test]
fn a_tls_client_that_pipelines_more_than_it_reads_gets_every_answer_once_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let setup = tls_setup(dir.path(), &cert, "hello", "hello", "").server("max_output", "8192");
    let server = TestServer::start(&setup);
    let mut client = TlsClient::connect(server.addr("hello"), &client_config(&[&cert], &[])).unwrap();
    // 1500 requests in large records, sent before anything is read: their answers (1.6 MB)
    // fill the socket and `max_output` long before the last request is answered, so the worker
    // stops answering, and goes on, request by request, as the client reads.
    let requests = 1500;
    let mut batch = "GET /bytes/1000 HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(requests);
    batch.push_str("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    client.send(batch.as_bytes()).unwrap();
    let all = client.recv_to_end().expect("every answer, then the end of input");
    let all = String::from_utf8_lossy(&all);
    assert_eq!(all.matches("HTTP/1.1 200").count(), requests + 1, "one answer per request");
    assert!(all.ends_with("Hello, world!"), "the last answer is whole");
}

#[test]
fn a_greeting_written_before_a_close_during_the_handshake_reaches_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let settings = "greeting = \"BUSY come back later\"\nclose_after_greeting = true";
    let config = client_config(&[&cert], &[]);
    // A client that never completes the handshake is still closed at read_timeout; with none,
    // at the first limit that is set; with none at all, after the time a close lingers (2 s).
    for (timeouts, bound, reason) in [
        (&[("read_timeout", "1")][..], Duration::from_secs(1), "read_timeout"),
        (&[("read_timeout", "0"), ("idle_timeout", "1")][..], Duration::from_secs(1), "idle_timeout"),
        (
            &[("read_timeout", "0"), ("idle_timeout", "0"), ("send_timeout", "0")][..],
            Duration::from_secs(2),
            "idle_timeout",
        ),
    ] {
        let setup =
            timeouts.iter().fold(tls_setup(dir.path(), &cert, "kit", "testkit", settings), |setup, (key, value)| {
                setup.server(key, value)
            });
        let server = TestServer::start(&setup);
        for _ in 0..2 {
            let mut client = TlsClient::connect(server.addr("kit"), &config).expect("the handshake completes");
            assert_eq!(client.recv_line().unwrap().as_deref(), Some("BUSY come back later"));
            assert_eq!(client.recv_line().unwrap(), None, "then the end of input, with close_notify");
        }
        let mut silent = TcpStream::connect(server.addr("kit")).unwrap();
        silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let began = Instant::now();
        let got = silent.read(&mut [0u8; 64]);
        assert!(matches!(got, Ok(0)) || got.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset), "closed");
        let waited = began.elapsed();
        assert!(
            waited >= bound - Duration::from_millis(100) && waited < bound + Duration::from_secs(2),
            "{timeouts:?}: closed after {waited:?}"
        );
        wait_for(Duration::from_secs(3), "the close counted", || (closed_total(&server, reason) >= 1).then_some(()));
    }
}

/// Full handshakes with a client of its own until both workers of `server` made tickets
/// (rustls takes a ticket only once its process has made one at least as long), then
/// connections with `config`, which keeps the tickets it is given, again and again until both
/// workers served some: (worker pid, resumed) for each connection after the first.
fn reconnections(server: &TestServer, cert: &TestCert) -> Vec<(String, bool)> {
    let mut warmed = std::collections::HashSet::new();
    let began = Instant::now();
    while warmed.len() < 2 {
        assert!(began.elapsed() < Duration::from_secs(10), "connections never reached both workers");
        let mut client = TlsClient::connect(server.addr("kit"), &client_config(&[cert], &[])).unwrap();
        warmed.insert(client.ask("PID"));
    }
    let config = client_config(&[cert], &[]);
    let mut first = TlsClient::connect(server.addr("kit"), &config).unwrap();
    first.ask("PID"); // the tickets come before the answer
    let mut seen: Vec<(String, bool)> = Vec::new();
    while seen.len() < 10 || seen.iter().all(|(pid, _)| *pid == seen[0].0) {
        assert!(began.elapsed() < Duration::from_secs(10), "connections never reached both workers: {seen:?}");
        let mut client = TlsClient::connect(server.addr("kit"), &config).unwrap();
        let pid = client.ask("PID");
        seen.push((pid, client.resumed()));
    }
    seen
}

#[test]
fn a_session_resumes_on_whichever_worker_the_next_connection_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new();
    let keys = cert.listener_keys(dir.path(), "kit");
    let server = TestServer::start(&Setup::new(2, 2).app("kit", "testkit", "").listener_keys("kit", &keys));
    let seen = reconnections(&server, &cert);
    assert!(seen.iter().all(|(_, resumed)| *resumed), "every reconnection resumes: {seen:?}");
    drop(server);

    // With tls_tickets = false each worker keeps its own session cache: a session resumes only
    // on the worker that made it.
    let keys = format!("{keys}\ntls_tickets = false");
    let server = TestServer::start(&Setup::new(2, 2).app("kit", "testkit", "").listener_keys("kit", &keys));
    let seen = reconnections(&server, &cert);
    assert!(seen.iter().any(|(_, resumed)| !resumed), "a reconnection to the other worker cannot resume: {seen:?}");
    assert!(seen.iter().any(|(_, resumed)| *resumed), "one to the same worker does: {seen:?}");
}
