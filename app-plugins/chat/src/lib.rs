//! `chat`: a line protocol over the event bus. On connect the server sends `WELCOME <worker
//! pid>`; `NICK <name>` answers `OK`; every other line `<text>` is delivered as `<name>: <text>`
//! (name `anon` until set) to every other client of the app, in every worker of the server and
//! of every server sharing its `[events]` database. A client that does not read fast enough is
//! disconnected once its queued output passes `max_output`, after a last line `ERR too slow`
//! when that still fits (Redis's answer for slow pub/sub clients).
//!
//! Each line is one event `chat.line` whose payload is `<worker> <handle> <name>: <text>\n`: the
//! sender's worker (a random id of this worker: pids repeat across servers) and connection, so
//! that every worker passes it to its clients but the sender.

use std::sync::{Arc, Mutex};

use fdt_sdk::{App, Bus, Conn, Handle, Next, PushError, Settings};

/// The longest nick.
const MAX_NICK: usize = 32;

struct Chat {
    bus: Bus,
    pid: u32,
    /// Names this worker among every server's (see the module doc).
    worker: u64,
    clients: Arc<Mutex<Vec<Handle>>>,
}

/// A client's name.
#[derive(Default)]
struct Nick(Option<String>);

/// Passes a line to every client but its sender; drops the clients that are gone or too slow.
fn fan_out(clients: &Mutex<Vec<Handle>>, worker: u64, payload: &[u8]) {
    let mut fields = payload.splitn(3, |b| *b == b' ');
    let (Some(from_worker), Some(from), Some(line)) = (fields.next(), fields.next(), fields.next()) else { return };
    let sender = (from_worker == worker.to_string().as_bytes()).then(|| from.to_vec());
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    clients.retain(|c| {
        if sender.as_deref() == Some(c.as_u64().to_string().as_bytes()) {
            return true;
        }
        match c.write(line) {
            Ok(()) => true,
            Err(PushError::Full) => {
                let _ = c.write(b"ERR too slow\n");
                let _ = c.close();
                false
            }
            Err(PushError::Closed) => false,
        }
    });
}

impl App for Chat {
    const SETTINGS: Option<&'static [&'static str]> = Some(&[]);
    /// A reload hands its clients to the new generation, nick and all.
    const PROTOCOL: Option<&'static str> = Some("chat");

    fn start(settings: &Settings) -> Result<Self, String> {
        let clients = Arc::new(Mutex::new(Vec::new()));
        let worker = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(settings.worker_pid());
            h.finish()
        };
        let mine = clients.clone();
        settings
            .bus()
            .subscribe("chat.line", move |_, payload| fan_out(&mine, worker, payload))
            .map_err(|e| format!("app chat: {e}"))?;
        Ok(Chat { bus: settings.bus(), pid: settings.worker_pid(), worker, clients })
    }

    fn on_open(&self, conn: &mut Conn) -> Next {
        conn.write(format!("WELCOME {}\n", self.pid).as_bytes());
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(conn.handle());
        Next::KeepOpen
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        while let Some(line) = conn.take_line() {
            let text = String::from_utf8_lossy(line);
            let text = text.trim_end_matches(['\r', '\n']);
            if let Some(name) = text.strip_prefix("NICK ") {
                let name = name.trim();
                if name.is_empty() || name.len() > MAX_NICK || name.contains(char::is_whitespace) {
                    conn.write(format!("ERR a nick is 1 to {MAX_NICK} characters without spaces\n").as_bytes());
                } else {
                    conn.session::<Nick>().0 = Some(name.to_string());
                    conn.write(b"OK\n");
                }
                continue;
            }
            let name = conn.session::<Nick>().0.clone().unwrap_or_else(|| "anon".into());
            let payload = format!("{} {} {name}: {text}\n", self.worker, conn.handle().as_u64());
            if let Err(e) = self.bus.emit("chat.line", payload.as_bytes()) {
                conn.write(format!("ERR {e}\n").as_bytes());
            }
        }
        Next::KeepOpen
    }

    fn export_session(&self, conn: &mut Conn) -> Option<Vec<u8>> {
        conn.session::<Nick>().0.clone().map(String::into_bytes)
    }

    fn import_session(&self, conn: &mut Conn, session: &[u8]) -> Result<(), String> {
        if !session.is_empty() {
            conn.session::<Nick>().0 = Some(String::from_utf8_lossy(session).into_owned());
        }
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(conn.handle());
        Ok(())
    }

    fn on_close(&self, conn: &mut Conn) {
        let me = conn.handle();
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| *c != me);
    }
}

fdt_sdk::export_app!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    #[test]
    fn lines_reach_every_other_client_with_the_senders_name() {
        let app = TestApp::<Chat>::start("").unwrap();
        let (mut a, mut b, mut c) = (app.connect(), app.connect(), app.connect());
        let welcome = format!("WELCOME {}\n", std::process::id()).into_bytes();
        assert_eq!(a.take_output(), welcome);
        b.take_output();
        c.take_output();
        a.send(b"NICK ann\n");
        assert_eq!(a.take_output(), b"OK\n");
        a.send(b"hello\r\n");
        b.send(b"hi\n");
        assert_eq!(app.deliver_events(), 2, "one subscription, two events");
        assert_eq!(a.take_output(), b"anon: hi\n", "not its own line");
        assert_eq!(b.take_output(), b"ann: hello\n");
        assert_eq!(c.take_output(), b"ann: hello\nanon: hi\n");
        a.send(b"NICK two words\n");
        assert!(a.take_output().starts_with(b"ERR a nick"));
    }

    #[test]
    fn a_client_handed_to_the_next_generation_keeps_its_nick_and_gets_lines() {
        let old = TestApp::<Chat>::start("").unwrap();
        let mut ann = old.connect();
        ann.send(b"NICK ann\n");
        let session = ann.hand_off();
        assert_eq!(session, b"ann");
        let new = TestApp::<Chat>::start("").unwrap();
        let mut moved = new.take_over(&session).unwrap();
        assert!(moved.take_output().is_empty(), "no second welcome");
        let mut bob = new.connect();
        moved.send(b"hi again\n");
        new.deliver_events();
        assert!(bob.take_output().ends_with(b"ann: hi again\n"), "its nick came along");
        bob.send(b"welcome back\n");
        new.deliver_events();
        assert_eq!(moved.take_output(), b"anon: welcome back\n", "registered to get lines");
    }

    #[test]
    fn a_slow_client_is_told_and_disconnected() {
        let app = TestApp::<Chat>::start("").unwrap();
        let mut slow = app.connect();
        slow.take_output();
        slow.set_output_room(30);
        let mut talker = app.connect();
        talker.send(b"0123456789abcdef\n");
        talker.send(b"again\n");
        app.deliver_events();
        assert_eq!(slow.take_output(), b"anon: 0123456789abcdef\n");
        assert!(slow.closed_by_push(), "the second line did not fit");
        // Another worker's line reaches the clients here, and none is the sender.
        app.inject("chat.line", b"1 2 far: away\n");
        assert!(talker.take_output().ends_with(b"far: away\n"));
    }
}
