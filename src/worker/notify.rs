//! Events between servers (`[events] database`): this worker's emits go out as PostgreSQL
//! `NOTIFY` on `fdt_sdk::notify::CHANNEL`, and what other servers notify comes in through a
//! `LISTEN` session and is handed to this worker's own bus socket, so that `events-in` delivers
//! it like any event (one thread calls subscriptions, in arrival order). A server's own events
//! come back too, and are skipped by their origin: its workers have them from the local bus.
//!
//! Two threads, each with its own session, reconnecting with back-off (0.1 s doubling to 5 s)
//! and logging each outage once: `events-notify` sends what the bounded queue holds in one
//! statement per batch; `events-listen` waits for notifications.

use std::collections::VecDeque;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use fdt_sdk::notify;

/// Notifications waiting to be sent, at most.
const QUEUE_MAX: usize = 10_000;
/// Notifications per statement.
const BATCH: usize = 500;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Link {
    pub origin: String,
    queue: Mutex<VecDeque<(String, String)>>,
    ready: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the link to `db` for this worker, whose bus socket is `own_socket`.
pub fn start(db: fdt_sdk::DatabaseSettings, origin: String, own_socket: PathBuf) -> Result<&'static Link, String> {
    let link: &'static Link =
        Box::leak(Box::new(Link { origin, queue: Mutex::new(VecDeque::new()), ready: Condvar::new() }));
    let db2 = db.clone();
    std::thread::Builder::new()
        .name("events-notify".into())
        .spawn(move || link.notify_loop(&db))
        .map_err(|e| format!("cannot start the events-notify thread: {e}"))?;
    std::thread::Builder::new()
        .name("events-listen".into())
        .spawn(move || link.listen_loop(&db2, &own_socket))
        .map_err(|e| format!("cannot start the events-listen thread: {e}"))?;
    Ok(link)
}

impl Link {
    /// Queues an event for the other servers; `Err` (and nothing queued) when it is too large
    /// for a notification, `Ok(false)` when the queue is full (the database does not keep up).
    pub fn push(&self, topic: &str, payload: &[u8]) -> Result<bool, String> {
        let text = notify::encode(&self.origin, topic, payload)?;
        let mut queue = lock(&self.queue);
        if queue.len() >= QUEUE_MAX {
            return Ok(false);
        }
        queue.push_back((topic.to_string(), text));
        drop(queue);
        self.ready.notify_one();
        Ok(true)
    }

    fn notify_loop(&self, db: &fdt_sdk::DatabaseSettings) {
        let mut backoff = FIRST_BACKOFF;
        let mut down = false;
        loop {
            let mut client = match fdt_sdk::txn::connect(db, "fdtserver events") {
                Ok(c) => c,
                Err(e) => {
                    if !down {
                        log::error!("events: cannot reach database {} to notify other servers: {e}", db.name);
                        down = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if down {
                log::info!("events: database {} reachable again", db.name);
                down = false;
            }
            backoff = FIRST_BACKOFF;
            loop {
                let batch: Vec<(String, String)> = {
                    let mut queue = lock(&self.queue);
                    while queue.is_empty() {
                        queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
                    }
                    let n = queue.len().min(BATCH);
                    queue.drain(..n).collect()
                };
                let texts: Vec<&str> = batch.iter().map(|(_, t)| t.as_str()).collect();
                let sent = client.execute(
                    "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i",
                    &[&notify::CHANNEL, &texts],
                );
                if let Err(e) = sent {
                    log::error!(
                        "events: notifying other servers failed ({}); {} event(s) dropped",
                        fdt_sdk::txn::describe(&e),
                        batch.len()
                    );
                    for (topic, _) in &batch {
                        super::events::count_dropped(topic.as_bytes());
                    }
                    break; // a fresh session
                }
            }
        }
    }

    fn listen_loop(&self, db: &fdt_sdk::DatabaseSettings, own_socket: &std::path::Path) {
        let Ok(socket) = UnixDatagram::unbound() else {
            log::error!("events: cannot make a socket to hand on other servers' events");
            return;
        };
        let mut backoff = FIRST_BACKOFF;
        let mut down = false;
        loop {
            let listening =
                fdt_sdk::txn::connect(db, "fdtserver events").map_err(|e| e.to_string()).and_then(|mut c| {
                    c.batch_execute(&format!("LISTEN {}", notify::CHANNEL)).map_err(|e| fdt_sdk::txn::describe(&e))?;
                    Ok(c)
                });
            let mut client = match listening {
                Ok(c) => c,
                Err(e) => {
                    if !down {
                        log::error!("events: cannot listen for other servers' events on database {}: {e}", db.name);
                        down = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            down = false;
            backoff = FIRST_BACKOFF;
            let mut datagram = Vec::new();
            'session: loop {
                if client.is_closed() {
                    break;
                }
                let mut notifications = client.notifications();
                let mut waiting = notifications.timeout_iter(Duration::from_millis(500));
                loop {
                    match fdt_sdk::txn::postgres::fallible_iterator::FallibleIterator::next(&mut waiting) {
                        Ok(Some(n)) => {
                            let Some((origin, topic, payload)) = notify::decode(n.payload()) else { continue };
                            if origin == self.origin {
                                continue;
                            }
                            datagram.clear();
                            crate::bus::encode(&mut datagram, crate::bus::KIND_EVENT, topic.as_bytes(), &payload);
                            if !matches!(crate::bus::send(&socket, own_socket, &datagram), Ok(true)) {
                                super::events::count_dropped(topic.as_bytes());
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log::warn!(
                                "events: listening on database {} failed ({}); listening again",
                                db.name,
                                fdt_sdk::txn::describe(&e)
                            );
                            break 'session;
                        }
                    }
                }
            }
        }
    }
}
