//! What an operator sees: draining generations in `/status` and `/metrics` (how many, since
//! when, connections left) and drain durations once they are done.

mod util;

use serde_json::Value;
use util::*;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_draining_generation_shows_its_age_and_connections_left_and_its_drain_time_is_recorded() {
    let server = TestServer::start(&Setup::new(1, 2).app("kit", "testkit", ""));
    let addr = server.addr("kit");
    let mut conversation = LineClient::connect(addr);
    assert_eq!(conversation.ask("BUSY"), "BUSY");
    assert_eq!(server.reload().0, 200);

    let v = wait_for(READY_TIMEOUT, "the old generation's connection count in its heartbeat", || {
        let v = server.status();
        (v["draining"]["connections"] == 1).then_some(v)
    });
    assert_eq!(v["draining"]["generations"], 1, "{v}");
    assert!(v["draining"]["oldest_since_secs"].as_f64().unwrap() >= 0.0, "{v}");
    let old: &Value = v["generations"].as_array().unwrap().iter().find(|g| g["id"] == 1).unwrap();
    assert_eq!(old["state"], "draining", "{v}");
    assert_eq!(old["connections"], 1, "{v}");
    assert!(old["draining_since_secs"].as_f64().is_some(), "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert_eq!(metric(&metrics, "fdtserver_generations_draining"), 1.0);
    assert_eq!(metric(&metrics, "fdtserver_draining_connections"), 1.0);
    assert_eq!(metric(&metrics, "fdtserver_drain_duration_seconds_count"), 0.0);

    // The conversation ends; the old generation drains and its drain time is counted.
    assert_eq!(conversation.ask("IDLE"), "IDLE");
    let v = wait_for(READY_TIMEOUT, "the old generation to finish draining", || {
        let v = server.status();
        (v["draining"]["generations"] == 0).then_some(v)
    });
    assert_eq!(v["drains"]["count"], 1, "{v}");
    let drained_ms = v["last_drain_ms"].as_u64().unwrap();
    assert_eq!(v["drains"]["total_ms"].as_u64().unwrap(), drained_ms, "{v}");
    let (_, metrics) = server.control("GET", "/metrics").unwrap();
    assert_eq!(metric(&metrics, "fdtserver_drain_duration_seconds_count"), 1.0);
    let sum = metric(&metrics, "fdtserver_drain_duration_seconds_sum");
    assert!((sum - drained_ms as f64 / 1000.0).abs() < 0.002, "{sum} vs {drained_ms} ms");
    assert_eq!(metric(&metrics, "fdtserver_generations_draining"), 0.0);
}
