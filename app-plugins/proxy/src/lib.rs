//! `proxy`: a TCP proxy with routing. Settings: `routes = { NAME = "host:port", … }` and
//! `connect_timeout_ms` (default 5000). A client's first line `ROUTE <NAME>` connects to that
//! route's backend, from the worker's event loop (no thread waits for it): `OK` once connected,
//! then bytes flow both ways untouched — the backend's first bytes reach the client even if the
//! client sends nothing more. `ERR unknown route` or `ERR backend unreachable`, then close.
//! Either side closing closes the other after what is in flight is delivered.
//!
//! Flow control is the worker's: what one side sends is pushed to the other's handle; a push
//! refused as full leaves the input unconsumed, and the worker stops reading that side until
//! the other has room (Envoy's high and low watermarks, here `max_output` and half of it).

use std::collections::BTreeMap;
use std::time::Duration;

use fdt_sdk::{App, Conn, Handle, Next, PushError, Settings};

/// The longest first line a client may send before it names a route.
const MAX_ROUTE_LINE: usize = 1024;

struct Proxy {
    routes: BTreeMap<String, String>,
    connect_timeout: Duration,
}

/// A client connection's session: its backend, once routed.
#[derive(Default)]
struct Routed(Option<Handle>);

impl App for Proxy {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["routes", "connect_timeout_ms"]);

    fn start(settings: &Settings) -> Result<Self, String> {
        let routes = settings.string_table("routes")?.unwrap_or_default();
        if routes.is_empty() {
            return Err("app proxy: `routes` names no backend (routes = { NAME = \"host:port\" })".into());
        }
        Ok(Proxy { routes, connect_timeout: settings.duration_ms("connect_timeout_ms", 5000)? })
    }

    fn on_open(&self, conn: &mut Conn) -> Next {
        // The backend answered the connect: tell the client. (A client gone meanwhile pushed
        // its last bytes and a close here: they end this connection after those bytes.)
        if let Some(client) = conn.link().filter(|_| conn.is_outbound()) {
            let _ = client.write(b"OK\n");
        }
        Next::KeepOpen
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        match other_side(conn) {
            Some(other) => forward(conn, other),
            None => self.route(conn),
        }
    }

    fn on_connect_failed(&self, conn: &mut Conn, error: &str) {
        log::info!("proxy: {error}");
        if let Some(client) = conn.link() {
            let _ = client.write(b"ERR backend unreachable\n");
            let _ = client.close();
        }
    }

    fn on_close(&self, conn: &mut Conn) {
        if let Some(other) = other_side(conn) {
            let _ = other.close();
        }
    }
}

/// The connection at the other end: a backend's client, or a routed client's backend.
fn other_side(conn: &mut Conn) -> Option<Handle> {
    if conn.is_outbound() { conn.link() } else { conn.session::<Routed>().0 }
}

impl Proxy {
    /// A client's first line: `ROUTE <NAME>`.
    fn route(&self, conn: &mut Conn) -> Next {
        let Some(line) = conn.take_line() else {
            if conn.input().len() > MAX_ROUTE_LINE || conn.peer_closed() {
                conn.write(b"ERR expected ROUTE <NAME>\n");
                return Next::Close;
            }
            return Next::KeepOpen;
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(name) = line.strip_prefix(b"ROUTE ") else {
            conn.write(b"ERR expected ROUTE <NAME>\n");
            return Next::Close;
        };
        let Some(addr) = std::str::from_utf8(name).ok().and_then(|n| self.routes.get(n.trim())) else {
            conn.write(b"ERR unknown route\n");
            return Next::Close;
        };
        match conn.connect_timeout(addr, self.connect_timeout) {
            Ok(backend) => {
                conn.session::<Routed>().0 = Some(backend);
                // Bytes sent behind the route wait for the connect.
                forward(conn, backend)
            }
            Err(e) => {
                log::info!("proxy: {e}");
                conn.write(b"ERR backend unreachable\n");
                Next::Close
            }
        }
    }
}

/// Passes what `conn` received to `other`.
fn forward(conn: &mut Conn, other: Handle) -> Next {
    let input = conn.input();
    if !input.is_empty() {
        match other.write(input) {
            Ok(()) => conn.consume(input.len()),
            // The worker offers the input again once `other` has room.
            Err(PushError::Full) => return Next::KeepOpen,
            // The other side is gone; its close reaches this side after what it sent.
            Err(PushError::Closed) => conn.consume(input.len()),
        }
    }
    if conn.peer_closed() {
        let _ = other.close();
        return Next::Close;
    }
    Next::KeepOpen
}

fdt_sdk::export_app!(Proxy);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    fn proxy() -> TestApp<Proxy> {
        TestApp::start("routes = { echo = \"127.0.0.1:7001\" }").unwrap()
    }

    #[test]
    fn a_routed_client_and_its_backend_exchange_bytes_untouched() {
        let app = proxy();
        let mut client = app.connect();
        client.send(b"ROUTE echo\nearly");
        let mut backend = client.take_outbound().expect("a connect to the route");
        assert_eq!(backend.peer(), "127.0.0.1:7001");
        assert_eq!(backend.take_output(), b"early", "what came behind the route waits for the connect");
        backend.connected();
        assert_eq!(client.take_output(), b"OK\n");
        backend.send(b"banner\r\n\x00\xff");
        assert_eq!(client.take_output(), b"banner\r\n\x00\xff");
        client.send(b"more");
        assert_eq!(backend.take_output(), b"more");
        backend.close();
        assert!(client.closed_by_push(), "a backend that ends closes its client");
    }

    #[test]
    fn a_full_side_leaves_the_input_for_later() {
        let app = proxy();
        let mut client = app.connect();
        client.send(b"ROUTE echo\n");
        let mut backend = client.take_outbound().unwrap();
        backend.connected();
        backend.set_output_room(4);
        client.send(b"abcd");
        assert_eq!(client.send(b"efgh"), Next::KeepOpen);
        assert_eq!(client.pending_input(), b"efgh", "refused: left for the worker to offer again");
        assert_eq!(backend.take_output(), b"abcd");
        client.send(b"");
        assert_eq!(backend.take_output(), b"efgh");
    }

    #[test]
    fn unknown_routes_bad_first_lines_and_failed_connects_are_answered_then_closed() {
        let app = proxy();
        let mut client = app.connect();
        assert_eq!(client.send(b"ROUTE nowhere\n"), Next::Close);
        assert_eq!(client.take_output(), b"ERR unknown route\n");
        let mut client = app.connect();
        assert_eq!(client.send(b"HELLO\r\n"), Next::Close);
        assert_eq!(client.take_output(), b"ERR expected ROUTE <NAME>\n");
        let mut client = app.connect();
        assert_eq!(client.send(&[b'x'; MAX_ROUTE_LINE + 1]), Next::Close);
        let mut client = app.connect();
        client.send(b"ROUTE echo\r\n");
        client.take_outbound().unwrap().refuse("connection refused");
        assert_eq!(client.take_output(), b"ERR backend unreachable\n");
        assert!(client.closed_by_push());
        assert!(TestApp::<Proxy>::start("").err().unwrap().contains("`routes` names no backend"));
    }

    #[test]
    fn a_client_that_closes_closes_its_backend() {
        let app = proxy();
        let mut client = app.connect();
        client.send(b"ROUTE echo\n");
        let mut backend = client.take_outbound().unwrap();
        backend.connected();
        let handle = backend.handle();
        client.close();
        assert_eq!(handle.write(b"x"), Err(PushError::Closed), "closed by the client's end");
        assert!(backend.closed_by_push());
    }
}
