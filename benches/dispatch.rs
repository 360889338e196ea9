//! Micro-benchmarks of the hot path inside a worker: one request handed across the plugin
//! boundary to a real app and its answer copied back (`App::on_data`), for the shipped apps.
//!
//! Needs the release plugins: `cargo build --release --workspace && cargo bench --bench dispatch`.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fdtserver::plugin::{App, Call, DataOutcome, StartContext};

/// A call with `input`, as a worker makes it for a connection with nothing queued and the
/// default `max_output`.
fn call(input: &[u8]) -> Call<'_> {
    Call { input, flags: 0, room: 256 * 1024, timer_ms: 0, wants: 0 }
}

fn plugin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/release/libfdt_{name}.so"));
    assert!(path.exists(), "{} is missing: run `cargo build --release --workspace` first", path.display());
    path
}

fn start(name: &str, settings: &str) -> App {
    let ctx = StartContext {
        app_name: name,
        settings_toml: settings,
        node_id: "bench",
        databases_toml: "",
        worker_pid: std::process::id(),
        generation: 1,
        setting_lines: &Default::default(),
        app_index: 0,
        server_id: "bench",
        events_database: "",
    };
    App::start(&plugin(name), &ctx).unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

/// Offers `input` (holding `requests` requests) to a connection of `app` again and again;
/// checks the first answer.
fn bench_request(c: &mut Criterion, id: &str, app: &App, (input, requests): (&[u8], u64), expect: &[u8]) {
    let mut conn = app.open_conn("127.0.0.1:9", "127.0.0.1:0", 1, 0, None).expect("conn_open");
    let mut output = Vec::with_capacity(4096);
    let outcome = app.on_data(&mut conn, call(input), &mut output);
    assert!(matches!(outcome, DataOutcome::Next { consumed, .. } if consumed == input.len()), "{outcome:?}");
    assert!(
        output.windows(expect.len()).any(|w| w == expect),
        "unexpected answer: {}",
        String::from_utf8_lossy(&output)
    );
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(requests));
    group.bench_function(id, |b| {
        b.iter(|| {
            output.clear();
            app.on_data(&mut conn, call(std::hint::black_box(input)), &mut output)
        })
    });
    group.finish();
    app.close_conn(conn);
}

fn dispatch(c: &mut Criterion) {
    let hello = start("hello", "message = \"Hello, world!\"");
    let request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n";
    bench_request(c, "hello: one keep-alive GET", &hello, (request, 1), b"Hello, world!");
    let pipelined = request.repeat(16);
    bench_request(c, "hello: 16 pipelined GETs", &hello, (&pipelined, 16), b"Hello, world!");
    let echo = start("echo", "delay_ms = 0");
    bench_request(c, "echo: one 32-byte line", &echo, (b"0123456789abcdef0123456789abcde\n", 1), b"0123");
    let partial = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n";
    let mut conn = hello.open_conn("127.0.0.1:9", "127.0.0.1:0", 2, 0, None).expect("conn_open");
    let mut output = Vec::new();
    c.bench_function("dispatch/hello: partial request (nothing to answer)", |b| {
        b.iter(|| hello.on_data(&mut conn, call(std::hint::black_box(partial)), &mut output))
    });
    hello.close_conn(conn);
    long_line(c, &echo);
}

/// Feeds `total` bytes of one line to echo in `piece`-byte reads, keeping the unconsumed input
/// as the worker does, then the final newline. Returns the output length.
fn feed_line_in_pieces(app: &App, total: usize, piece: usize) -> usize {
    let mut conn = app.open_conn("127.0.0.1:9", "127.0.0.1:0", 3, 0, None).expect("conn_open");
    let (mut pending, mut output) = (Vec::with_capacity(total + 1), Vec::new());
    let chunk = vec![b'x'; piece];
    let mut sent = 0;
    while sent <= total {
        let n = piece.min(total - sent);
        pending.extend_from_slice(if n == 0 { b"\n" } else { &chunk[..n] });
        sent += n.max(1);
        if let DataOutcome::Next { consumed, .. } = app.on_data(&mut conn, call(&pending), &mut output) {
            pending.drain(..consumed);
        }
    }
    app.close_conn(conn);
    output.len()
}

/// A 1 MiB line that arrives in 50-byte pieces against the same bytes arriving at once: with
/// the scan position remembered, the pieces cost about as much as the whole (before: 9×).
fn long_line(c: &mut Criterion, echo: &App) {
    const LINE: usize = 1 << 20;
    assert_eq!(feed_line_in_pieces(echo, LINE, 50), LINE + 1);
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Bytes(LINE as u64));
    group.sample_size(10);
    group.bench_function("echo: 1 MiB line in 50-byte pieces", |b| b.iter(|| feed_line_in_pieces(echo, LINE, 50)));
    group.bench_function("echo: 1 MiB line at once", |b| b.iter(|| feed_line_in_pieces(echo, LINE, LINE)));
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
