//! `relay`: keeps one persistent connection per worker to `upstream = "host:port"` and sends
//! every line received from it to every client connected to the app in that worker. Clients'
//! own input is ignored. A lost or refused upstream is dialled again after a pause of 0.1 s,
//! doubling up to `max_backoff_ms` (default 5000) and back to 0.1 s once connected (Twisted's
//! `ClientService`). A client that does not read fast enough to keep up is disconnected
//! (its pushes are refused at `max_output`).
//!
//! The upstream link is a background service (`Settings::service`): it stops when the worker
//! drains, and is dialled afresh by the next generation.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fdt_sdk::{App, Conn, Handle, Next, Settings, Stop};

/// How long one wait for the upstream lasts before the service looks at `stop` again.
const POLL: Duration = Duration::from_millis(100);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long one dial of one upstream address may take.
const DIAL: Duration = Duration::from_secs(1);
/// Longest line relayed (a longer one ends the upstream connection): a line must fit in a
/// client's output (`max_output`, 256 KiB by default) to be pushed.
const MAX_LINE: usize = 64 * 1024;

struct Relay {
    clients: Arc<Mutex<Vec<Handle>>>,
}

/// Sends `line` to every client; those that cannot take it are disconnected.
fn fan_out(clients: &Mutex<Vec<Handle>>, line: &[u8]) {
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    clients.retain(|c| match c.write(line) {
        Ok(()) => true,
        Err(_) => {
            let _ = c.close();
            false
        }
    });
}

/// One connection to the upstream, read line by line until it ends or the service must stop.
/// Returns whether it connected at all.
fn serve_upstream(upstream: &str, clients: &Mutex<Vec<Handle>>, stop: &Stop) -> bool {
    // Each address for a second at most, looking at `stop` in between.
    let addrs: Vec<_> = upstream.to_socket_addrs().map(Iterator::collect).unwrap_or_default();
    let connected =
        addrs.iter().take_while(|_| !stop.requested()).find_map(|a| TcpStream::connect_timeout(a, DIAL).ok());
    let Some(stream) = connected else { return false };
    log::info!("relay: connected to {upstream}");
    let _ = stream.set_read_timeout(Some(POLL));
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.requested() {
        // One buffer at a time (never waiting for a newline that may not come), so that `stop`
        // and the line limit are looked at between reads.
        let taken = match reader.fill_buf() {
            Ok([]) => break,
            Ok(buf) => match memchr(buf) {
                Some(i) => {
                    line.extend_from_slice(&buf[..=i]);
                    i + 1
                }
                None => {
                    line.extend_from_slice(buf);
                    buf.len()
                }
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => 0,
            Err(e) => {
                log::warn!("relay: reading from {upstream} failed: {e}");
                break;
            }
        };
        reader.consume(taken);
        if line.ends_with(b"\n") {
            fan_out(clients, &line);
            line.clear();
        } else if line.len() > MAX_LINE {
            log::warn!("relay: a line from {upstream} passed {MAX_LINE} bytes; dropping the connection");
            break;
        }
    }
    true
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

impl App for Relay {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["upstream", "max_backoff_ms"]);
    /// A reload hands its clients to the new generation's relay (they only listen).
    const PROTOCOL: Option<&'static str> = Some("relay");

    fn start(settings: &Settings) -> Result<Self, String> {
        let upstream = settings.string("upstream", "")?;
        if upstream.is_empty() {
            return Err("relay needs `upstream`, the host:port to relay lines from".into());
        }
        let max_backoff = settings.duration_ms("max_backoff_ms", 5000)?.max(FIRST_BACKOFF);
        let clients = Arc::new(Mutex::new(Vec::new()));
        let shared = clients.clone();
        settings.service("upstream", move |stop| {
            let mut backoff = FIRST_BACKOFF;
            while !stop.requested() {
                if serve_upstream(&upstream, &shared, stop) {
                    backoff = FIRST_BACKOFF;
                    if stop.requested() {
                        break;
                    }
                    log::warn!("relay: lost {upstream}; dialling again in {backoff:?}");
                }
                if stop.sleep(backoff) {
                    break;
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        })?;
        Ok(Relay { clients })
    }

    fn import_session(&self, conn: &mut Conn, _session: &[u8]) -> Result<(), String> {
        self.on_open(conn);
        Ok(())
    }

    fn on_open(&self, conn: &mut Conn) -> Next {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(conn.handle());
        conn.lift_idle_timeout(true); // a subscriber mostly listens
        Next::KeepOpen
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        // Clients' own input is ignored.
        let all = conn.input().len();
        conn.consume(all);
        Next::KeepOpen
    }

    fn on_close(&self, conn: &mut Conn) {
        let me = conn.handle();
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| *c != me);
    }
}

fdt_sdk::export_app!(Relay);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    #[test]
    fn lines_fan_out_to_every_client_and_input_is_ignored() {
        let clients = Mutex::new(Vec::new());
        // No upstream here: drive the fan-out with test connections.
        let app = TestApp::<Relay>::start("upstream = \"127.0.0.1:9\"").unwrap();
        let (mut a, mut b) = (app.connect(), app.connect());
        clients.lock().unwrap().extend(app.app().clients.lock().unwrap().iter().copied());
        fan_out(&clients, b"news\n");
        assert_eq!((a.take_output(), b.take_output()), (b"news\n".to_vec(), b"news\n".to_vec()));
        assert_eq!(a.send(b"ignored\n"), Next::KeepOpen);
        assert!(a.take_output().is_empty() && a.pending_input().is_empty());
        b.set_output_room(3);
        fan_out(&clients, b"too long\n");
        assert!(b.closed_by_push(), "a client that cannot keep up is disconnected");
        assert_eq!(clients.lock().unwrap().len(), 1);
    }

    #[test]
    fn refuses_a_start_without_upstream() {
        assert!(TestApp::<Relay>::start("").err().unwrap().contains("`upstream`"));
    }
}
