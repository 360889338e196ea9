//! An app's own settings: the `[app.NAME]` table of the config, plus facts about its worker.

use std::time::Duration;

/// The `[app.NAME]` table (every key but `plugin`) and the worker the app runs in.
///
/// Getters take a default for an absent key and return an error message naming the app and
/// the key when the value has the wrong type, so `start` can just use `?`:
///
/// ```
/// let s = fdt_sdk::Settings::parse("hello", "message = \"hi\"\ndelay_ms = 5").unwrap();
/// assert_eq!(s.string("message", "Hello")?, "hi");
/// assert_eq!(s.duration_ms("delay_ms", 0)?, std::time::Duration::from_millis(5));
/// assert!(s.u64("message", 0).unwrap_err().contains("`message`"));
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Settings {
    table: toml::Table,
    app_name: String,
    node_id: String,
    worker_pid: u32,
    generation: u64,
    databases: toml::Table,
    events: crate::Events,
    timers: crate::Timers,
    connector: crate::Connector,
    bus: crate::Bus,
    /// `[events] database` of the server's config, if any.
    events_database: Option<String>,
    /// Whose services these settings start: 0 in a server, the test driver's app id in tests.
    service_owner: u64,
    /// What names the server (its control socket's path), for [`Settings::singleton`].
    server_id: String,
}

/// A `[database.NAME]` table of the server's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseSettings {
    pub name: String,
    /// A libpq-style connection string (`host=/tmp/pg port=5432 user=postgres dbname=bank`).
    pub url: String,
    /// Connections per worker process.
    pub pool_size: usize,
    /// `lock_timeout` of every session: a statement waiting this long for a lock fails.
    /// `None`: no limit (configured as 0).
    pub lock_timeout: Option<Duration>,
    /// `statement_timeout` of every session: a statement running this long fails. `None`: no
    /// limit (configured as 0).
    pub statement_timeout: Option<Duration>,
}

impl DatabaseSettings {
    /// Default `lock_timeout`: long enough for any honest lock wait, short enough that a
    /// request blocked behind a silent client's row lock fails well before the worker's
    /// `heartbeat_timeout` (30 s by default) counts its handlers as stuck.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default `statement_timeout`: the same bound for a statement that runs (or waits) too
    /// long for any other reason.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A database with the default pool size and timeouts.
    pub fn new(name: &str, url: &str) -> DatabaseSettings {
        DatabaseSettings {
            name: name.to_string(),
            url: url.to_string(),
            pool_size: 8,
            lock_timeout: Some(Self::DEFAULT_LOCK_TIMEOUT),
            statement_timeout: Some(Self::DEFAULT_STATEMENT_TIMEOUT),
        }
    }
}

/// Reads a timeout in seconds (integer or fraction) from a `[database.NAME]` table: absent →
/// `default`, 0 → no limit.
fn seconds(t: &toml::Table, db: &str, key: &str, default: Duration) -> Result<Option<Duration>, String> {
    let secs = match t.get(key) {
        None => return Ok(Some(default)),
        Some(toml::Value::Integer(i)) if *i >= 0 => *i as f64,
        Some(toml::Value::Float(f)) if *f >= 0.0 && f.is_finite() => *f,
        Some(v) => return Err(format!("[database.{db}]: `{key}` must be a non-negative number of seconds, got {v}")),
    };
    Ok((secs > 0.0).then(|| Duration::from_secs_f64(secs)))
}

impl Settings {
    /// Parses settings from TOML text (what the server passes; handy in tests).
    pub fn parse(app_name: &str, toml_text: &str) -> Result<Settings, String> {
        let table = toml_text
            .parse::<toml::Table>()
            .map_err(|e| format!("app {app_name}: settings are not valid TOML: {e}"))?;
        Ok(Settings { table, app_name: app_name.to_string(), ..Settings::default() })
    }

    /// The keys of the `[app.NAME]` table.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.table.keys().map(String::as_str)
    }

    /// Sets the facts about the worker (the server does this; handy in tests).
    pub fn with_worker(mut self, node_id: &str, worker_pid: u32, generation: u64) -> Self {
        self.node_id = node_id.to_string();
        self.worker_pid = worker_pid;
        self.generation = generation;
        self
    }

    /// Adds the server's `[database.*]` tables (TOML text, one table per database).
    pub fn with_databases(mut self, toml_text: &str) -> Result<Settings, String> {
        self.databases = toml_text.parse::<toml::Table>().map_err(|e| format!("bad [database] settings: {e}"))?;
        Ok(self)
    }

    /// The app's event counters (see [`Events`](crate::Events)).
    pub fn events(&self) -> crate::Events {
        self.events
    }

    pub(crate) fn with_events(mut self, events: crate::Events) -> Settings {
        self.events = events;
        self
    }

    /// The app's timers (see [`Timers`](crate::Timers)): callbacks run after a delay or every
    /// interval by the worker's clock. Keep it (it is cheap to clone) to start timers later.
    pub fn timers(&self) -> crate::Timers {
        self.timers.clone()
    }

    pub(crate) fn with_timers(mut self, timers: crate::Timers) -> Settings {
        self.timers = timers;
        self
    }

    /// Makes outbound connections (see [`Connector`](crate::Connector)), from anywhere in the
    /// app. Keep it (it is cheap to clone).
    pub fn connector(&self) -> crate::Connector {
        self.connector.clone()
    }

    pub(crate) fn with_service_owner(mut self, owner: u64) -> Settings {
        self.service_owner = owner;
        self
    }

    /// The server's event bus, for this app (see [`Bus`](crate::Bus)). Keep it (it is cheap
    /// to clone).
    pub fn bus(&self) -> crate::Bus {
        self.bus.clone()
    }

    pub(crate) fn with_bus(mut self, bus: crate::Bus, events_database: &str) -> Settings {
        self.bus = bus;
        self.events_database = (!events_database.is_empty()).then(|| events_database.to_string());
        self
    }

    /// The `[database.NAME]` that carries events between servers (`[events] database`), if any.
    pub fn events_database(&self) -> Option<&str> {
        self.events_database.as_deref()
    }

    pub(crate) fn with_connector(mut self, connector: crate::Connector) -> Settings {
        self.connector = connector;
        self
    }

    /// What names the server (its control socket's path; empty outside a server).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn server_id(&self) -> &str {
        &self.server_id
    }

    pub(crate) fn with_server_id(mut self, server_id: &str) -> Settings {
        self.server_id = server_id.to_string();
        self
    }

    /// Starts a background service: `work` runs on a thread of its own from now on, in every
    /// worker. It is asked to stop when its worker drains ([`Stop`](crate::Stop)), and the
    /// worker waits up to 5 s for it before exiting; if it panics, the panic is logged with the
    /// app, counted (`fdtserver_app_events_total{event="service_panics"}`), and `work` runs
    /// again after a pause (0.1 s, doubling up to 30 s). If it returns while not asked to stop,
    /// it is not run again. (`fdtserver check`, which starts apps to check them, runs none.)
    ///
    /// ```
    /// use std::time::Duration;
    /// # let settings = fdt_sdk::Settings::parse("app", "").unwrap();
    /// settings.service("poller", |stop| {
    ///     while !stop.requested() {
    ///         // … poll something …
    ///         stop.sleep(Duration::from_secs(1));
    ///     }
    /// })?;
    /// # Ok::<(), String>(())
    /// ```
    pub fn service(&self, name: &str, work: impl Fn(&crate::Stop) + Send + Sync + 'static) -> Result<(), String> {
        self.spawn_service(name, None, work)
    }

    /// Like [`Settings::service`], but one instance per server: it runs in the worker that
    /// holds the [`Singleton`](crate::Singleton) claim named after the service, and moves —
    /// never doubled — to another worker when that one drains (a reload) or dies.
    pub fn singleton_service(
        &self,
        name: &str,
        work: impl Fn(&crate::Stop) + Send + Sync + 'static,
    ) -> Result<(), String> {
        self.spawn_service(name, Some(self.singleton(&format!("service {name}"))), work)
    }

    fn spawn_service(
        &self,
        name: &str,
        claim: Option<crate::Singleton>,
        work: impl Fn(&crate::Stop) + Send + Sync + 'static,
    ) -> Result<(), String> {
        // `fdtserver check` starts apps (generation 0) only to see that they start.
        if self.generation == 0 {
            return Ok(());
        }
        let spec = crate::services::Spec {
            app: self.app_name.clone(),
            name: name.to_string(),
            events: self.events,
            claim,
            owner: self.service_owner,
        };
        crate::services::spawn(spec, work)
    }

    /// A claim named `name` that one worker of this server holds at a time (see
    /// [`Singleton`](crate::Singleton)): for work that runs once per server.
    pub fn singleton(&self, name: &str) -> crate::Singleton {
        crate::Singleton::new(&self.server_id, &self.app_name, name)
    }

    /// The server's `[database.NAME]`, or an error naming what is configured.
    pub fn database(&self, name: &str) -> Result<DatabaseSettings, String> {
        let Some(toml::Value::Table(t)) = self.databases.get(name) else {
            let known: Vec<&str> = self.databases.keys().map(String::as_str).collect();
            return Err(format!(
                "app {}: no [database.{name}] in the server's config (configured: {})",
                self.app_name,
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ));
        };
        let url = t.get("url").and_then(toml::Value::as_str).unwrap_or_default().to_string();
        let pool_size = t.get("pool_size").and_then(toml::Value::as_integer).unwrap_or(8).max(1) as usize;
        let lock_timeout = seconds(t, name, "lock_timeout", DatabaseSettings::DEFAULT_LOCK_TIMEOUT)?;
        let statement_timeout = seconds(t, name, "statement_timeout", DatabaseSettings::DEFAULT_STATEMENT_TIMEOUT)?;
        Ok(DatabaseSettings { name: name.to_string(), url, pool_size, lock_timeout, statement_timeout })
    }

    /// The app's name: the `NAME` of `[app.NAME]`.
    pub fn app_name(&self) -> &str {
        &self.app_name
    }
    /// The server's `node_id` (stable across restarts).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
    /// The pid of the worker process this app runs in.
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }
    /// The generation of that worker: 1 at start, one more at every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The raw value of a key, if present.
    pub fn get(&self, key: &str) -> Option<&toml::Value> {
        self.table.get(key)
    }

    fn wrong_type(&self, key: &str, want: &str, got: &toml::Value) -> String {
        format!("app {}: setting `{key}` must be {want}, got {got}", self.app_name)
    }

    /// A string setting.
    pub fn string(&self, key: &str, default: &str) -> Result<String, String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(toml::Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    /// A non-negative integer setting.
    pub fn u64(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as u64),
            Some(v) => Err(self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    /// A boolean setting.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.wrong_type(key, "true or false", v)),
        }
    }

    /// A duration given in milliseconds.
    pub fn duration_ms(&self, key: &str, default_ms: u64) -> Result<Duration, String> {
        match self.get(key) {
            None => Ok(Duration::from_millis(default_ms)),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Duration::from_millis(*i as u64)),
            Some(v) => Err(self.wrong_type(key, "a non-negative number of milliseconds", v)),
        }
    }

    /// A list of strings; `None` when absent.
    pub fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong_type(key, "a list of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, "a list of strings", v)),
        }
    }

    /// A table of strings (`routes = { api = "10.0.0.5:7000", db = "10.0.0.6:5432" }`), in
    /// key order; `None` when absent.
    ///
    /// ```
    /// let settings = fdt_sdk::Settings::parse("proxy", "routes = { b = \"h:2\", a = \"h:1\" }")?;
    /// let routes = settings.string_table("routes")?.unwrap();
    /// assert_eq!(routes.into_iter().collect::<Vec<_>>(), [("a".into(), "h:1".into()), ("b".into(), "h:2".into())]);
    /// assert!(settings.string_table("other")?.is_none());
    /// # Ok::<(), String>(())
    /// ```
    pub fn string_table(&self, key: &str) -> Result<Option<std::collections::BTreeMap<String, String>>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(items)) => items
                .iter()
                .map(|(k, v)| match v {
                    toml::Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(self.wrong_type(&format!("{key}.{k}"), "a string", other)),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, "a table of strings", v)),
        }
    }
}
