//! Events between servers (`[events] database`): this worker's emits go out as PostgreSQL
//! `NOTIFY` on `fdt_sdk::notify::CHANNEL`, and what other servers notify comes in through a
//! `LISTEN` session and is handed to this worker's `events-in` (`events::hand_in`, a batch of
//! what arrived together), which delivers it like any event (one thread calls subscriptions,
//! in arrival order). A server's own events come back too, and are skipped by their origin: its
//! workers have them from the local bus.
//!
//! Two threads, each with its own session, reconnecting with back-off (0.1 s doubling to 5 s)
//! and logging each outage once: `events-notify` sends what the bounded queue holds in one
//! statement per batch; `events-listen` waits for notifications.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use fdt_sdk::notify;
use fdt_sdk::txn::postgres::Client;

/// Notifications waiting to be sent, at most.
const QUEUE_MAX: usize = 10_000;
/// Notifications per statement.
const BATCH: usize = 500;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A session of this server's own to `db` (`application` shows in `pg_stat_activity`), listening
/// on the channel when `listen`.
pub fn session(db: &fdt_sdk::DatabaseSettings, application: &str, listen: bool) -> Result<Client, String> {
    let mut client = fdt_sdk::txn::connect(db, application).map_err(|e| e.to_string())?;
    if listen {
        client.batch_execute(&format!("LISTEN {}", notify::CHANNEL)).map_err(|e| fdt_sdk::txn::describe(&e))?;
    }
    Ok(client)
}

/// [`session`], waiting out an outage: tried again after 0.1 s doubling to 5 s; the outage is
/// logged once (`cannot <what>`), and its end.
fn open(db: &fdt_sdk::DatabaseSettings, listen: bool, what: &str) -> Client {
    let mut backoff = FIRST_BACKOFF;
    let mut down = false;
    loop {
        match session(db, "fdtserver events", listen) {
            Ok(client) => {
                if down {
                    log::info!("events: database {} reachable again", db.name);
                }
                return client;
            }
            Err(e) => {
                if !down {
                    log::error!("events: cannot {what}: {e}");
                    down = true;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

pub struct Link {
    pub origin: String,
    queue: Mutex<VecDeque<(String, String)>>,
    ready: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the link to `db` for this worker.
pub fn start(db: fdt_sdk::DatabaseSettings, origin: String) -> Result<&'static Link, String> {
    let link: &'static Link =
        Box::leak(Box::new(Link { origin, queue: Mutex::new(VecDeque::new()), ready: Condvar::new() }));
    let db2 = db.clone();
    std::thread::Builder::new()
        .name("events-notify".into())
        .spawn(move || link.notify_loop(&db))
        .map_err(|e| format!("cannot start the events-notify thread: {e}"))?;
    std::thread::Builder::new()
        .name("events-listen".into())
        .spawn(move || link.listen_loop(&db2))
        .map_err(|e| format!("cannot start the events-listen thread: {e}"))?;
    Ok(link)
}

impl Link {
    /// Queues an event for the other servers; `Err` (and nothing queued) when it is too large
    /// for a notification, `Ok(false)` when the queue is full (the database does not keep up).
    pub fn push(&self, topic: &str, payload: &[u8]) -> Result<bool, String> {
        let text = notify::encode(&self.origin, &notify::seq('h'), topic, payload)?;
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
        let what = format!("reach database {} to notify other servers", db.name);
        loop {
            let mut client = open(db, false, &what);
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
                let statement = "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i";
                let mut sent = client.execute(statement, &[&notify::CHANNEL, &texts]);
                // A session that closed while idle (a restarted database): once more on a new one.
                if sent.is_err()
                    && client.is_closed()
                    && let Ok(fresh) = fdt_sdk::txn::connect(db, "fdtserver events")
                {
                    client = fresh;
                    sent = client.execute(statement, &[&notify::CHANNEL, &texts]);
                }
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

    fn listen_loop(&self, db: &fdt_sdk::DatabaseSettings) {
        use fdt_sdk::txn::postgres::fallible_iterator::FallibleIterator;
        let what = format!("listen for other servers' events on database {}", db.name);
        loop {
            let mut client = open(db, true, &what);
            while !client.is_closed() {
                // The first notification to come (or none within half a second), then every one
                // already received with it: handed in together, as one datagram.
                let mut batch = Vec::new();
                let mut notifications = client.notifications();
                let first = notifications.timeout_iter(std::time::Duration::from_millis(500)).next();
                let failed = match first {
                    Ok(Some(n)) => {
                        self.take(n.payload(), &mut batch);
                        let mut more = notifications.iter();
                        loop {
                            match more.next() {
                                Ok(Some(n)) if batch.len() < crate::bus::DATAGRAM_MAX => {
                                    self.take(n.payload(), &mut batch)
                                }
                                Ok(Some(n)) => {
                                    self.hand_in(std::mem::take(&mut batch));
                                    self.take(n.payload(), &mut batch);
                                }
                                Ok(None) => break None,
                                Err(e) => break Some(e),
                            }
                        }
                    }
                    Ok(None) => None,
                    Err(e) => Some(e),
                };
                self.hand_in(batch);
                if let Some(e) = failed {
                    log::warn!(
                        "events: listening on database {} failed ({}); listening again",
                        db.name,
                        fdt_sdk::txn::describe(&e)
                    );
                    break;
                }
            }
        }
    }

    /// Adds another server's event (not this server's own) to `batch`.
    fn take(&self, text: &str, batch: &mut Vec<u8>) {
        if let Some((origin, _, topic, payload)) = notify::decode(text)
            && origin != self.origin
        {
            crate::bus::encode(batch, crate::bus::KIND_EVENT, topic.as_bytes(), &payload);
        }
    }

    /// Hands a batch to this worker's `events-in`; what does not fit is counted dropped.
    fn hand_in(&self, batch: Vec<u8>) {
        if batch.is_empty() {
            return;
        }
        let topics: Vec<Vec<u8>> = crate::bus::decode(&batch).map(|r| r.topic.to_vec()).collect();
        if !super::events::hand_in(batch) {
            for topic in topics {
                super::events::count_dropped(&topic);
            }
        }
    }
}
