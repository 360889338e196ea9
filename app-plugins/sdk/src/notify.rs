//! How events travel between servers: PostgreSQL `NOTIFY` on the channel [`CHANNEL`] of the
//! `[events] database`, one notification per event. Both sides of the plugin boundary use this
//! (the worker for plain emits, [`Transaction::emit`](crate::txn::Transaction::emit) inside a
//! transaction), so that a server knows its own events when they come back.
//!
//! A payload is `<origin> <seq> <topic> <t|x><data>`: `seq` makes each notification unique
//! (PostgreSQL delivers two equal payloads of one transaction once), then `t` and the event's
//! payload when it is UTF-8 without NUL, else `x` and its bytes in hex (a notification is
//! text).

/// The `LISTEN`/`NOTIFY` channel.
pub const CHANNEL: &str = "fdt_events";
/// The longest notification payload PostgreSQL takes (8000 bytes, less one).
pub const MAX: usize = 7999;

/// What names one server among those sharing the database: its node and its control socket.
pub fn origin(node_id: &str, server_id: &str) -> String {
    // No spaces: it is the first word of a notification.
    format!("{node_id}@{server_id}").replace(' ', "_")
}

/// The longest [`seq`], to check an event's size before it has one.
pub const LONGEST_SEQ: &str = "a4294967295-18446744073709551615";

/// A sequence word unique among the notifications of this process: `side` tells the server's
/// own (`h`) from an app's (`a`), each with its own counter.
pub fn seq(side: char) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("{side}{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The notification for an event, or why it cannot be one (too large).
pub fn encode(origin: &str, seq: &str, topic: &str, payload: &[u8]) -> Result<String, String> {
    let data = match std::str::from_utf8(payload) {
        Ok(text) if !text.contains('\0') => format!("t{text}"),
        _ => format!("x{}", payload.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    };
    let text = format!("{origin} {seq} {topic} {data}");
    if text.len() > MAX {
        return Err(format!(
            "with an [events] database, an event must fit in a PostgreSQL NOTIFY ({MAX} bytes); this one takes {}",
            text.len()
        ));
    }
    Ok(text)
}

/// An event from a notification: (origin, seq, topic, payload).
pub fn decode(text: &str) -> Option<(&str, &str, &str, Vec<u8>)> {
    let mut words = text.splitn(4, ' ');
    let (origin, seq, topic, data) = (words.next()?, words.next()?, words.next()?, words.next()?);
    let payload = match data.split_at_checked(1)? {
        ("t", text) => text.as_bytes().to_vec(),
        ("x", hex) if hex.len().is_multiple_of(2) => (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?,
        _ => return None,
    };
    Some((origin, seq, topic, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_text_and_bytes_and_too_large_ones_are_refused() {
        let o = origin("node a", "/run/fdt.sock");
        assert_eq!(o, "node_a@/run/fdt.sock");
        let text = encode(&o, "a1-7", "bank.changed", b"{\"delta\":-5}").unwrap();
        assert_eq!(text, "node_a@/run/fdt.sock a1-7 bank.changed t{\"delta\":-5}");
        assert_eq!(decode(&text), Some((o.as_str(), "a1-7", "bank.changed", b"{\"delta\":-5}".to_vec())));
        let bytes = encode(&o, "1", "raw", b"\x00\xff a").unwrap();
        assert!(bytes.ends_with(" x00ff2061"));
        assert_eq!(decode(&bytes).unwrap().3, b"\x00\xff a");
        assert!(encode(&o, "1", "big", &[b'a'; 8000]).unwrap_err().contains("7999 bytes"));
        assert_eq!(decode("o 1 t y"), None);
        assert_eq!(decode("o 1 t x0"), None);
        assert_eq!(decode("o 1 t"), None);
        assert_ne!(seq('h'), seq('h'), "each notification its own");
    }
}
