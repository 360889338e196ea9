//! `echo`: a line protocol; every line received is sent back unchanged after `delay_ms`.

use fdt_sdk::{App, Conn, Next, Settings};

struct Echo {
    delay: std::time::Duration,
}

impl App for Echo {
    const SETTINGS: Option<&'static [&'static str]> = Some(&["delay_ms"]);
    /// A reload hands its idle connections to the new generation (no state between lines).
    const PROTOCOL: Option<&'static str> = Some("echo");

    fn start(settings: &Settings) -> Result<Self, String> {
        Ok(Echo { delay: settings.duration_ms("delay_ms", 0)? })
    }

    fn on_readable(&self, conn: &mut Conn) -> Next {
        while let Some(line) = conn.take_line() {
            std::thread::sleep(self.delay);
            conn.write(line);
        }
        Next::KeepOpen
    }
}

fdt_sdk::export_app!(Echo);

#[cfg(test)]
mod tests {
    use super::*;
    use fdt_sdk::testing::TestApp;

    #[test]
    fn echoes_complete_lines_and_keeps_partial_ones() {
        let app = TestApp::<Echo>::start("delay_ms = 0").unwrap();
        let mut conn = app.connect();
        conn.send(b"one\ntwo\r\nthr");
        assert_eq!(conn.take_output(), b"one\ntwo\r\n");
        assert_eq!(conn.pending_input(), b"thr");
        conn.send(b"ee\n");
        assert_eq!(conn.take_output(), b"three\n");
        assert_eq!(conn.requests(), 3);
    }

    #[test]
    fn refuses_a_misspelt_setting() {
        let err = TestApp::<Echo>::start("dealy_ms = 5").err().unwrap();
        assert!(err.contains("unknown setting `dealy_ms`") && err.contains("delay_ms"), "{err}");
    }

    #[test]
    fn rejects_a_delay_that_is_not_a_number() {
        let err = TestApp::<Echo>::start("delay_ms = \"soon\"").err().unwrap();
        assert!(err.contains("delay_ms"), "{err}");
    }
}
