//! What the master reports about itself: the status JSON, Prometheus metrics and the HTML page.
//!
//! Read-only views of the process table; nothing here changes state.

use std::fmt::Write;

use serde_json::{Value, json};

use super::Master;
use super::table::{GenState, WorkerState};

impl Master {
    pub(super) fn status_json(&self) -> Value {
        let now = std::time::Instant::now();
        let workers: Vec<Value> = self
            .table
            .workers
            .values()
            .map(|w| {
                json!({
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "slot": w.slot,
                    "state": w.state.name(),
                    "connections": w.stats.open,
                    "accepted": w.stats.accepted,
                    "requests": w.stats.requests,
                    "panics": w.stats.panics,
                    "uptime_secs": w.started.elapsed().as_secs_f64(),
                    "last_heard_secs": now.duration_since(w.last_heard).as_secs_f64(),
                    "busy_threads": w.stats.busy_threads,
                    "oldest_request_secs": w.running.as_ref().map(|r| now.duration_since(r.0).as_secs_f64()),
                    "request_limit": w.request_limit,
                    "recycling": w.replacement.is_some(),
                })
            })
            .collect();
        let generations: Vec<Value> = self
            .table
            .generations
            .values()
            .map(|g| {
                let since = match g.state {
                    GenState::Draining { since, .. } => since,
                    _ => g.started,
                };
                json!({
                    "id": g.id,
                    "state": g.state.name(),
                    "since_secs": since.elapsed().as_secs_f64(),
                    "draining_since_secs": match g.state {
                        GenState::Draining { since, .. } => Some(since.elapsed().as_secs_f64()),
                        _ => None,
                    },
                    "workers": self.table.workers_of(g.id).count(),
                    "target_workers": g.target_workers,
                    "connections": self.table.workers_of(g.id).map(|w| w.stats.open).sum::<u64>(),
                    // Connections its workers handed to others (`worker::handoff`).
                    "handed_off": self
                        .table
                        .workers_of(g.id)
                        .flat_map(|w| w.closed.iter().filter(|(r, _)| r == "handed_off").map(|(_, n)| *n))
                        .sum::<u64>(),
                })
            })
            .collect();
        let listeners: Vec<Value> = self
            .config
            .listeners
            .iter()
            .map(|l| {
                json!({
                    "address": l.address.to_string(),
                    "bound": self.listeners.get(&l.key()).map(|b| b.local.clone()),
                    "origin": self.listeners.get(&l.key()).map(|b| b.origin.name()),
                    "app": l.app,
                })
            })
            .collect();
        json!({
            "pid": std::process::id(),
            "generation": self.table.active_id(),
            "uptime_secs": self.started.elapsed().as_secs_f64(),
            "state": if self.stopping.is_some() { "stopping" } else { "running" },
            "config": self.config_path.display().to_string(),
            "node_id": self.config.server.node_id,
            // The operator's rotation (`fdtserver rotation in|out`), and what the agent check
            // answers a load balancer now (`null` without `agent_check`).
            "rotation": self.agent.rotation().name(),
            "agent_check": self.agent.status_json(self.node_state()),
            "listeners": listeners,
            "generations": generations,
            "workers": workers,
            "reloads": {
                "ok": self.counters.reloads_ok,
                "failed": self.counters.reloads_failed,
                "last_error": self.counters.last_reload_error,
            },
            "worker_restarts": self.counters.worker_restarts,
            "app_events": self.app_events_json(),
            "worker_kills": {
                "heartbeat_timeout": self.counters.heartbeat_kills,
                "request_timeout": self.counters.request_timeout_kills,
                "boot_timeout": self.counters.boot_kills,
            },
            "worker_recycles": self.counters.recycles,
            "upgrade": {
                "new_master": self.upgrade.as_ref().map(|u| u.child.as_raw()),
                "old_master_draining": self.old_master_draining().map(|p| p.as_raw()),
                "failed": self.counters.upgrades_failed,
            },
            "draining": self.draining_json(),
            "last_drain_ms": self.counters.last_drain_ms,
            "drains": { "count": self.counters.drains, "total_ms": self.counters.drain_ms_total },
        })
    }

    /// Generations and workers still draining: how many, since when, connections left.
    fn draining_json(&self) -> Value {
        let gens: Vec<_> =
            self.table.generations.values().filter(|g| matches!(g.state, GenState::Draining { .. })).collect();
        let oldest = gens
            .iter()
            .filter_map(|g| match g.state {
                GenState::Draining { since, .. } => Some(since.elapsed().as_secs_f64()),
                _ => None,
            })
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        // Draining workers of the active generation too (TTOU, max_requests).
        let workers: Vec<_> = self.table.workers.values().filter(|w| w.state == WorkerState::Draining).collect();
        json!({
            "generations": gens.len(),
            "oldest_since_secs": oldest,
            "workers": workers.len(),
            "connections": workers.iter().map(|w| w.stats.open).sum::<u64>(),
        })
    }

    /// App event totals: every live worker's last report plus what exited workers counted.
    /// The apps' event counters, and the bus's (under `worker::events::COUNTERS_APP`), totalled
    /// over live and retired workers.
    fn all_events(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut totals = self.retired_events.clone();
        for w in self.table.workers.values() {
            for (app, event, n) in &w.events {
                *totals.entry((app.clone(), event.clone())).or_insert(0) += n;
            }
        }
        totals
    }

    fn app_events(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut totals = self.all_events();
        totals.retain(|(app, _), _| app != crate::worker::events::COUNTERS_APP);
        totals
    }

    /// The event bus's counters: ((kind, topic prefix), total).
    fn bus_events(&self) -> Vec<((String, String), u64)> {
        self.all_events()
            .into_iter()
            .filter(|((app, _), _)| app == crate::worker::events::COUNTERS_APP)
            .filter_map(|((_, name), n)| {
                let (kind, prefix) = name.split_once(':')?;
                Some(((kind.to_string(), prefix.to_string()), n))
            })
            .collect()
    }

    fn app_events_json(&self) -> Value {
        let mut apps = serde_json::Map::new();
        for ((app, event), n) in self.app_events() {
            let entry = apps.entry(app).or_insert_with(|| json!({}));
            entry[event] = json!(n);
        }
        Value::Object(apps)
    }

    pub(super) fn metrics_text(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP fdtserver_{name} {help}\n# TYPE fdtserver_{name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "fdtserver_{name}{labels} {value}");
            }
        };
        let per_worker = |f: &dyn Fn(&super::table::Worker) -> u64| -> Vec<(String, f64)> {
            self.table
                .workers
                .values()
                .map(|w| {
                    (format!("{{pid=\"{}\",generation=\"{}\",slot=\"{}\"}}", w.pid, w.generation, w.slot), f(w) as f64)
                })
                .collect()
        };
        let escape = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        metric(
            "app_events_total",
            "counter",
            "Events counted by apps (fdt_sdk::Events), by app and event.",
            self.app_events()
                .into_iter()
                .map(|((app, event), n)| {
                    (format!("{{app=\"{}\",event=\"{}\"}}", escape(&app), escape(&event)), n as f64)
                })
                .collect(),
        );
        metric(
            "events_total",
            "counter",
            "Events on the server's bus by kind (emitted, delivered to a subscription, dropped) and topic prefix.",
            self.bus_events()
                .into_iter()
                .map(|((kind, prefix), n)| {
                    (format!("{{kind=\"{}\",prefix=\"{}\"}}", escape(&kind), escape(&prefix)), n as f64)
                })
                .collect(),
        );
        let mut closed: std::collections::BTreeMap<&str, u64> =
            crate::worker::CLOSE_LABELS.iter().map(|l| (*l, 0)).collect();
        let live = self.table.workers.values().flat_map(|w| w.closed.iter());
        for (reason, n) in self.retired_closed.iter().chain(live.map(|(r, n)| (r, n))) {
            if let Some(total) = closed.get_mut(reason.as_str()) {
                *total += n;
            }
        }
        let handed_off = closed.get("handed_off").copied().unwrap_or(0);
        metric(
            "connections_closed_total",
            "counter",
            "Connections closed, by reason (idle_timeout, read_timeout and send_timeout are limits; handed_off moved to another worker).",
            closed.into_iter().map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), n as f64)).collect(),
        );
        metric(
            "connections_handed_off_total",
            "counter",
            "Connections a draining worker handed to a worker that took them (a reload's new generation, a recycled worker's sibling).",
            vec![(String::new(), handed_off as f64)],
        );
        metric("connections_open", "gauge", "Open client connections per worker.", per_worker(&|w| w.stats.open));
        metric(
            "connections_accepted_total",
            "counter",
            "Connections accepted per worker.",
            per_worker(&|w| w.stats.accepted),
        );
        metric("requests_total", "counter", "Requests served per worker.", per_worker(&|w| w.stats.requests));
        metric("handler_panics_total", "counter", "App handler panics per worker.", per_worker(&|w| w.stats.panics));
        metric(
            "handler_threads_busy",
            "gauge",
            "Handler threads serving a connection, per worker.",
            per_worker(&|w| w.stats.busy_threads),
        );
        let mut log_failures = per_worker(&|w| w.stats.log_failures);
        log_failures.push(("{pid=\"master\"}".into(), crate::logging::write_failures() as f64));
        metric(
            "log_write_failures_total",
            "counter",
            "Log and access lines that could not be written (a full disk, say), per process.",
            log_failures,
        );
        metric(
            "rotation_in",
            "gauge",
            "1 while the node is in rotation, 0 while an operator took it out (`fdtserver rotation out`).",
            vec![(String::new(), if self.agent.rotation() == super::agent::Rotation::In { 1.0 } else { 0.0 })],
        );
        metric(
            "agent_checks_total",
            "counter",
            "Load balancer agent checks answered (`agent_check`).",
            vec![(String::new(), self.agent.checks() as f64)],
        );
        metric("workers", "gauge", "Worker processes alive.", vec![(String::new(), self.table.workers.len() as f64)]);
        metric(
            "generation",
            "gauge",
            "The generation that serves.",
            vec![(String::new(), self.table.active_id().unwrap_or(0) as f64)],
        );
        let draining = self.table.generations.values().filter(|g| matches!(g.state, GenState::Draining { .. })).count();
        metric("generations_draining", "gauge", "Generations still draining.", vec![(String::new(), draining as f64)]);
        let draining_workers: Vec<_> =
            self.table.workers.values().filter(|w| w.state == WorkerState::Draining).collect();
        metric(
            "draining_connections",
            "gauge",
            "Connections left on draining workers.",
            vec![(String::new(), draining_workers.iter().map(|w| w.stats.open).sum::<u64>() as f64)],
        );
        metric(
            "worker_kills_total",
            "counter",
            "Workers the master killed for a supervision limit.",
            vec![
                ("{reason=\"heartbeat_timeout\"}".into(), self.counters.heartbeat_kills as f64),
                ("{reason=\"request_timeout\"}".into(), self.counters.request_timeout_kills as f64),
                ("{reason=\"boot_timeout\"}".into(), self.counters.boot_kills as f64),
            ],
        );
        metric(
            "worker_recycles_total",
            "counter",
            "Workers replaced gracefully after max_requests.",
            vec![(String::new(), self.counters.recycles as f64)],
        );
        metric(
            "worker_restarts_total",
            "counter",
            "Workers replaced after dying.",
            vec![(String::new(), self.counters.worker_restarts as f64)],
        );
        metric(
            "reloads_total",
            "counter",
            "Reloads by outcome.",
            vec![
                ("{outcome=\"ok\"}".into(), self.counters.reloads_ok as f64),
                ("{outcome=\"failed\"}".into(), self.counters.reloads_failed as f64),
            ],
        );
        metric(
            "drain_duration_seconds",
            "summary",
            "How long generations took to drain.",
            vec![
                ("_count".into(), self.counters.drains as f64),
                ("_sum".into(), self.counters.drain_ms_total as f64 / 1000.0),
            ],
        );
        metric(
            "last_drain_seconds",
            "gauge",
            "How long the last generation took to drain.",
            vec![(String::new(), self.counters.last_drain_ms.unwrap_or(0) as f64 / 1000.0)],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            vec![(String::new(), self.started.elapsed().as_secs_f64())],
        );
        out
    }

    pub(super) fn status_page(&self) -> String {
        let mut rows = String::new();
        for w in self.table.workers.values() {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                w.pid,
                w.generation,
                w.state.name(),
                w.stats.open,
                w.stats.requests,
                w.stats.panics
            );
        }
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
             <title>fdtserver</title><style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:right}}</style>\
             </head><body><h1>fdtserver</h1><p>master pid {} · generation {} · up {:.0} s · {} · reloads {} ok, {} failed · {} worker restarts · rotation: {}</p>\
             <p>killed: {} hung, {} stuck requests · {} recycled · draining: {} generation(s), {} connection(s) left</p>\
             <table><tr><th>pid</th><th>generation</th><th>state</th><th>connections</th><th>requests</th><th>panics</th></tr>{rows}</table>\
             </body></html>\n",
            std::process::id(),
            self.table.active_id().map_or("-".into(), |g| g.to_string()),
            self.started.elapsed().as_secs_f64(),
            if self.stopping.is_some() { "stopping" } else { "running" },
            self.counters.reloads_ok,
            self.counters.reloads_failed,
            self.counters.worker_restarts,
            self.agent.rotation().name(),
            self.counters.heartbeat_kills,
            self.counters.request_timeout_kills,
            self.counters.recycles,
            self.table.generations.values().filter(|g| matches!(g.state, GenState::Draining { .. })).count(),
            self.table.workers.values().filter(|w| w.state == WorkerState::Draining).map(|w| w.stats.open).sum::<u64>(),
        )
    }
}
