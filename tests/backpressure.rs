//! A worker owns its memory whatever its clients do: a client that sends without reading makes
//! the worker stop reading it (`max_output`) rather than buffer without bound, a large
//! `GET /bytes/N` is produced as the client reads it, and every answer still arrives whole and
//! in order once the client reads. Also the app lifecycle events that write without a request:
//! a greeting on open and a notice when the worker starts draining.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use util::*;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const ALPHABET: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
const MIB: u64 = 1024 * 1024;

/// A process's resident memory (`VmRSS`), in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status (did the worker exit?): {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    kb * 1024
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Samples the resident memory of some processes every 50 ms until stopped; keeps each one's
/// largest figure.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pids: &[i32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = pids.to_vec();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut max: Vec<u64> = pids.iter().map(|&p| rss(p)).collect();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    for (m, &p) in max.iter_mut().zip(&pids) {
                        *m = (*m).max(rss(p));
                    }
                }
                max
            }
        });
        RssSampler { stop, thread }
    }

    /// The largest figure seen for each process, in the order given to `start`.
    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the RSS sampler failed (a worker exited?)")
    }
}

/// A client socket with a small receive buffer, so that answers it does not read fill the
/// socket buffers soon and wait in the worker.
fn small_receiver(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    stream
}

/// Splits `raw` into HTTP answers (status line, headers, `Content-Length` body); panics naming
/// the first one that is not `200 OK` with `body`, and on any bytes that are not a whole answer.
fn count_hello_answers(raw: &[u8], body: &[u8]) -> usize {
    let mut at = 0;
    let mut count = 0;
    while at < raw.len() {
        let rest = &raw[at..];
        let head_len = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("answer {count} (at byte {at}) has no end of head: {:?}", lossy(rest, 200)))
            + 4;
        let head = std::str::from_utf8(&rest[..head_len]).expect("an answer head that is not UTF-8");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "answer {count} is not 200 OK: {head:?}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("answer {count} has no Content-Length: {head:?}"));
        let got = rest.get(head_len..head_len + len);
        assert!(got == Some(body), "answer {count}: body {:?}, not {:?}", got.map(|b| lossy(b, 100)), lossy(body, 100));
        at += head_len + len;
        count += 1;
    }
    count
}

fn lossy(bytes: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

/// Writes `data` to every stream (non-blocking) until each has taken it all or has taken
/// nothing for `stuck` (the server stopped reading it); returns how much each took.
fn write_until_stuck(streams: &[TcpStream], data: &[u8], stuck: Duration) -> Vec<usize> {
    for s in streams {
        s.set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = vec![0; streams.len()];
    let mut progress = vec![Instant::now(); streams.len()];
    let mut done = vec![false; streams.len()];
    while done.iter().any(|d| !d) {
        assert!(Instant::now() < deadline, "writing the requests took more than a minute");
        let mut moved = false;
        for (i, mut s) in streams.iter().enumerate() {
            if done[i] {
                continue;
            }
            match s.write(&data[sent[i]..]) {
                Ok(n) => {
                    sent[i] += n;
                    progress[i] = Instant::now();
                    moved |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("connection {i}: writing requests failed after {} bytes: {e}", sent[i]),
            }
            done[i] = sent[i] == data.len() || progress[i].elapsed() >= stuck;
        }
        if !moved {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    sent
}

/// Waits until the active workers' count of requests answered (reported every 500 ms) stands
/// still for 700 ms, and returns it: the workers answer nothing more while their clients read
/// nothing.
fn requests_when_still(server: &TestServer) -> u64 {
    let requests = || {
        let workers = server.active_workers();
        workers.iter().map(|w| w["requests"].as_u64().expect("no request count in /status")).sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answered = requests();
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = requests();
        if now == answered {
            return now;
        }
        assert!(Instant::now() < deadline, "the workers kept answering clients that read nothing ({now} requests)");
        answered = now;
    }
}

#[test]
fn clients_that_send_without_reading_leave_workers_alive_small_and_every_answer_in_order() {
    let server = TestServer::start(&Setup::new(2, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let mut workers = server.worker_pids();
    workers.sort();
    assert_eq!(workers.len(), 2);
    let baseline: Vec<u64> = workers.iter().map(|&p| rss(p)).collect();
    let sampler = RssSampler::start(&workers);
    let started = Instant::now();

    // 200 connections, each given 1 MiB of pipelined requests it never reads the answers of.
    let data = REQUEST.repeat((MIB as usize) / REQUEST.len());
    let streams: Vec<TcpStream> =
        (0..200).map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
    let sent: Vec<usize> = std::thread::scope(|scope| {
        let parts: Vec<_> = streams
            .chunks(50)
            .map(|part| scope.spawn(|| write_until_stuck(part, &data, Duration::from_millis(1500))))
            .collect();
        parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
    });
    let total: usize = sent.iter().sum();
    let stuck = sent.iter().filter(|&&n| n < data.len()).count();
    eprintln!(
        "wrote {} to 200 connections in {:?} ({stuck} stopped taking data before 1 MiB)",
        mib(total as u64),
        started.elapsed()
    );
    // The workers answer until the answers fill the kernel's socket buffers and `max_output`,
    // then stop: their peak is behind them.
    let answered = requests_when_still(&server);
    let requests_sent: usize = sent.iter().map(|n| n / REQUEST.len()).sum();
    eprintln!("{answered} of {requests_sent} requests answered while no client reads");
    let peak = sampler.finish();

    let mut now = server.worker_pids();
    now.sort();
    assert_eq!(now, workers, "the workers changed");
    assert!(workers.iter().all(|&p| alive(p)), "a worker died");
    let status = server.status();
    let connections = |pid: i32| {
        let w = status["workers"].as_array().unwrap().iter().find(|w| w["pid"] == pid);
        w.and_then(|w| w["connections"].as_u64()).unwrap_or(0)
    };
    let report: Vec<String> = workers
        .iter()
        .zip(peak.iter().zip(&baseline))
        .map(|(&pid, (peak, base))| {
            format!("worker {pid}: {} at most (from {}) with {} connections", mib(*peak), mib(*base), connections(pid))
        })
        .collect();
    eprintln!("{}", report.join("; "));
    assert!(peak.iter().all(|&p| p < 256 * MIB), "a worker went above 256 MiB: {}", report.join("; "));

    // One connection read to the end: every complete request it sent is answered, in order.
    let mut streams = streams;
    let mut chosen = streams.swap_remove(0);
    drop(streams);
    chosen.set_nonblocking(false).unwrap();
    chosen.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    // The end of input: the partial request the writes may have stopped in is never answered.
    chosen.shutdown(std::net::Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    chosen.read_to_end(&mut raw).expect("reading the answers failed");
    let requests = sent[0] / REQUEST.len();
    let answers = count_hello_answers(&raw, b"Hello, world!");
    assert_eq!(answers, requests, "{requests} complete requests sent ({} bytes), {answers} answers", sent[0]);
    eprintln!("{answers} answers read in order; the test took {:?}", started.elapsed());
}

#[test]
fn bytes_n_sends_exactly_n_pattern_bytes_then_answers_the_request_pipelined_behind_it() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let mut client = HttpClient::connect(server.addr("hello")).unwrap();
    // Long enough for any answer here; short of `read_timeout` (30 s), whose `408` would
    // answer a request left unanswered.
    client.stream().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for n in [0usize, 1, 25, 26, 27, 1_000_000] {
        let requests = format!("GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        client.stream().write_all(requests.as_bytes()).unwrap();
        let r = client.read_response().unwrap_or_else(|e| panic!("GET /bytes/{n}: {e}"));
        assert_eq!(r.status, 200, "GET /bytes/{n}: {r:?}");
        assert_eq!(r.header("Content-Length"), Some(n.to_string().as_str()), "GET /bytes/{n}");
        assert!(!r.closes(), "GET /bytes/{n} closes a keep-alive connection");
        assert_eq!(r.body.len(), n, "GET /bytes/{n}: body length");
        if let Some(i) = r.body.bytes().enumerate().position(|(i, b)| b != ALPHABET[i % 26]) {
            panic!(
                "GET /bytes/{n}: byte {i} is {:?}, not {:?}",
                r.body.as_bytes()[i] as char,
                ALPHABET[i % 26] as char
            );
        }
        let next = client
            .read_response()
            .unwrap_or_else(|e| panic!("no answer (within 5 s) to the GET / pipelined behind GET /bytes/{n}: {e}"));
        assert_eq!((next.status, next.body.as_str()), (200, "Hello, world!"), "the GET / behind GET /bytes/{n}");
    }
}

/// The size of the large download: 400 MB (reads at several hundred MB/s on the test machine).
const DOWNLOAD: u64 = 400_000_000;

#[test]
fn a_large_download_read_slowly_keeps_the_worker_memory_bounded() {
    let server = TestServer::start(&Setup::new(1, 2).app("hello", "hello", ""));
    let addr = server.addr("hello");
    let worker = server.worker_pids()[0];
    // Warm up (handler buffers, the app's first answers), then measure.
    assert_eq!(http_get(addr).unwrap().status, 200);
    let before = rss(worker);
    let sampler = RssSampler::start(&[worker]);

    let mut stream = small_receiver(addr, 16 * 1024);
    write!(stream, "GET /bytes/{DOWNLOAD} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    // The head, and the start of the body read with it.
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let head_end = loop {
        let n = stream.read(&mut buf).expect("reading the head failed");
        assert!(n > 0, "the connection closed before the head ended: {:?}", lossy(&head, 500));
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head_text = String::from_utf8_lossy(&head[..head_end]).into_owned();
    assert!(head_text.starts_with("HTTP/1.1 200 OK\r\n"), "{head_text}");
    assert!(head_text.contains(&format!("\r\nContent-Length: {DOWNLOAD}\r\n")), "{head_text}");
    let pattern: Vec<u8> = ALPHABET.iter().copied().cycle().take(buf.len() + 26).collect();
    let mut got: u64 = 0;
    let check = |piece: &[u8], got: &mut u64| {
        let at = (*got % 26) as usize;
        assert!(
            piece == &pattern[at..at + piece.len()],
            "the body is not the pattern between bytes {got} and +{}",
            piece.len()
        );
        *got += piece.len() as u64;
    };
    check(&head[head_end..], &mut got);
    while got < DOWNLOAD {
        let n = stream.read(&mut buf).unwrap_or_else(|e| panic!("reading the body failed after {got} bytes: {e}"));
        assert!(n > 0, "the connection closed after {got} of {DOWNLOAD} bytes");
        check(&buf[..n], &mut got);
    }
    let took = started.elapsed();
    let peak = sampler.finish();
    assert_eq!(got, DOWNLOAD, "more bytes than Content-Length");
    // Exactly N: the next answer on the connection starts right after.
    stream.write_all(REQUEST).unwrap();
    let mut next = Vec::new();
    while !next.ends_with(b"Hello, world!") {
        let n = stream.read(&mut buf).expect("no answer to a request after the download");
        assert!(n > 0, "the connection closed instead of answering a request after the download");
        next.extend_from_slice(&buf[..n]);
    }
    assert_eq!(count_hello_answers(&next, b"Hello, world!"), 1);
    let growth = peak[0].saturating_sub(before);
    eprintln!(
        "{} downloaded in {took:?} ({:.0} MB/s); worker RSS {} before, {} at most (+{})",
        DOWNLOAD,
        DOWNLOAD as f64 / 1e6 / took.as_secs_f64(),
        mib(before),
        mib(peak[0]),
        mib(growth)
    );
    assert!(growth < 64 * MIB, "the worker grew by {} while sending the download", mib(growth));
    let after = wait_for(Duration::from_secs(3), "the worker's memory to return within 32 MiB of its start", || {
        let now = rss(worker);
        (now < before + 32 * MIB).then_some(now)
    });
    eprintln!("worker RSS {} after the download", mib(after));
}

#[test]
fn a_greeting_is_sent_on_open_before_the_client_sends_anything() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", "greeting = \"220 ready\""));
    let worker = server.worker_pids()[0];
    let mut client = LineClient::connect(server.addr("kit"));
    assert_eq!(client.recv().as_deref(), Some("220 ready"));
    assert_eq!(client.ask("PID"), worker.to_string());
}

#[test]
fn a_draining_worker_notifies_its_idle_connection_then_closes_it() {
    let server = TestServer::start(
        &Setup::new(1, 2).app("kit", "testkit", "drain_notice = true").server("graceful_timeout", "30"),
    );
    let old = server.worker_pids()[0];
    let mut client = LineClient::connect(server.addr("kit"));
    assert_eq!(client.ask("PID"), old.to_string());
    // Idle for longer than the drain's grace for a connection that just had its answer (0.2 s):
    // the drain would close it at once, but the notice comes first.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.reload().0, 200);
    assert_eq!(client.recv().as_deref(), Some(format!("DRAIN {old}").as_str()));
    // Closed by the drain as an idle connection, long before graceful_timeout (30 s) forces it.
    let since = Instant::now();
    assert_eq!(client.recv(), None, "expected the end of the connection after the notice");
    assert!(since.elapsed() < Duration::from_secs(10), "closed only after {:?}", since.elapsed());
}

#[test]
fn a_small_max_output_slows_a_client_that_does_not_read_and_loses_nothing() {
    let server = TestServer::start(&Setup::new(1, 2).server("max_output", "4096").app("echo", "echo", ""));
    let worker = server.worker_pids()[0];
    let before = rss(worker);
    let sampler = RssSampler::start(&[worker]);
    let mut stream = small_receiver(server.addr("echo"), 4096);
    // 4 MiB of numbered 64-byte lines.
    const LINES: usize = 64 * 1024;
    let sent: Vec<u8> = (0..LINES).flat_map(|i| format!("{i:063}\n").into_bytes()).collect();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn({
        let sent = sent.clone();
        move || writer.write_all(&sent)
    });
    // Not reading: the answers fill the socket buffers and `max_output`, then the worker stops
    // reading the requests.
    std::thread::sleep(Duration::from_millis(1000));
    // The worker answers nothing more while the client reads nothing.
    let answered = requests_when_still(&server);
    assert!(answered < LINES as u64, "all {LINES} lines were answered before the client read any");
    let mut got = vec![0; sent.len()];
    stream.read_exact(&mut got).expect("reading the answers failed");
    sender.join().unwrap().expect("sending the requests failed");
    let peak = sampler.finish()[0];
    if got != sent {
        let line = got.chunks(64).zip(sent.chunks(64)).position(|(a, b)| a != b).unwrap();
        panic!("answer line {line} is {:?}", lossy(&got[line * 64..], 64));
    }
    let growth = peak.saturating_sub(before);
    eprintln!("worker RSS {} before, {} at most (+{})", mib(before), mib(peak), mib(growth));
    assert!(growth < 32 * MIB, "the worker grew by {}", mib(growth));
}
