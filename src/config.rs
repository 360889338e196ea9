//! The config file: parsing, defaults and validation, with errors that name the file and line.
//!
//! Invariant: a [`Config`] value is always valid (every listener names a defined app, every
//! number is in range, paths are absolute). This module never touches sockets or plugins.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Default `backlog` of a `[[listen]]` socket; the kernel caps it at `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: i32 = 1024;

/// A validated config.
#[derive(Clone, Debug)]
pub struct Config {
    /// The config file, absolute.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub listeners: Vec<ListenConfig>,
    pub apps: BTreeMap<String, AppConfig>,
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// `[events] database`: the `[database.NAME]` whose PostgreSQL carries events between
    /// servers (LISTEN/NOTIFY), if any.
    pub events_database: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub workers: usize,
    pub threads: usize,
    pub graceful_timeout: Duration,
    pub pidfile: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub log_level: log::LevelFilter,
    pub boot_timeout: Duration,
    pub heartbeat_timeout: Duration,
    /// `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// 0: never recycle.
    pub max_requests: u64,
    pub user: Option<String>,
    pub group: Option<String>,
    pub error_log: Option<PathBuf>,
    pub access_log: Option<PathBuf>,
    pub node_id: String,
    /// `agent_check`: where the master answers a load balancer's agent check (HAProxy's
    /// `agent-check`), if anywhere.
    pub agent_check: Option<SocketAddr>,
    /// Connection limits of every listener that does not override them.
    pub limits: Limits,
}

#[derive(Clone, Debug)]
pub struct ListenConfig {
    pub address: Address,
    pub app: String,
    pub backlog: i32,
    /// The `[server]` limits, with this listener's own overrides.
    pub limits: Limits,
    /// `tls_cert`, `tls_key`, `tls_alpn`: the listener speaks TLS.
    pub tls: Option<crate::tls::Tls>,
    /// `proxy_protocol`, `proxy_from`: every connection starts with a PROXY protocol header.
    pub proxy: Option<ProxyProtocol>,
}

/// A listener behind a proxy that names each connection's client in a PROXY protocol header.
#[derive(Clone, Debug)]
pub struct ProxyProtocol {
    pub version: crate::proxy_protocol::Version,
    /// Who may send the header (`proxy_from`; default: loopback). A TCP connection from
    /// elsewhere is closed before anything of it is read; a Unix socket's peer is local.
    pub from: Vec<crate::proxy_protocol::Cidr>,
}

/// What a connection may hold and how long it may wait ("Connection limits and timeouts").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Between requests with no input; `None` (configured as 0): never closed for it.
    pub idle_timeout: Option<Duration>,
    /// A request begun, waiting for the rest of it.
    pub read_timeout: Option<Duration>,
    /// Output waiting for the peer to take any of it.
    pub send_timeout: Option<Duration>,
    /// Bytes of unsent output above which the worker stops reading the connection and calling
    /// its app for it, until half of it is sent.
    pub max_output: usize,
    /// Open connections per worker (for a listener: its own connections); 0: as many as the
    /// worker's open file limit allows.
    pub max_connections: usize,
}

impl Limits {
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_OUTPUT: usize = 256 * 1024;
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle_timeout: Some(Limits::DEFAULT_IDLE_TIMEOUT),
            read_timeout: Some(Limits::DEFAULT_READ_TIMEOUT),
            send_timeout: Some(Limits::DEFAULT_SEND_TIMEOUT),
            max_output: Limits::DEFAULT_MAX_OUTPUT,
            max_connections: 0,
        }
    }
}

/// The limit keys as written in `[server]` or a `[[listen]]` (serde's `flatten` would lose
/// their spans).
struct RawLimits {
    idle_timeout: Option<Spanned<f64>>,
    read_timeout: Option<Spanned<f64>>,
    send_timeout: Option<Spanned<f64>>,
    max_output: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

impl RawLimits {
    /// `base` with the keys written here put in place.
    fn over(self, base: Limits, problems: &mut Problems<'_>) -> Limits {
        let timeout = |value: Option<Spanned<f64>>, old: Option<Duration>, key, problems: &mut Problems<'_>| match value
        {
            None => old,
            some => Some(seconds(some, 0.0, key, problems)).filter(|d| !d.is_zero()),
        };
        let max_output = match self.max_output {
            None => base.max_output,
            Some(v) if !(1024..=1 << 40).contains(v.get_ref()) => {
                problems.at(
                    v.span(),
                    format!("`max_output` must be between 1024 and {} bytes, got {}", 1u64 << 40, v.get_ref()),
                );
                base.max_output
            }
            Some(v) => v.into_inner() as usize,
        };
        let max_connections = match self.max_connections {
            None => base.max_connections,
            Some(v) if !(0..=1 << 24).contains(v.get_ref()) => {
                problems.at(
                    v.span(),
                    format!(
                        "`max_connections` must be 0 (the open file limit) or up to {}, got {}",
                        1 << 24,
                        v.get_ref()
                    ),
                );
                base.max_connections
            }
            Some(v) => v.into_inner() as usize,
        };
        Limits {
            idle_timeout: timeout(self.idle_timeout, base.idle_timeout, "idle_timeout", problems),
            read_timeout: timeout(self.read_timeout, base.read_timeout, "read_timeout", problems),
            send_timeout: timeout(self.send_timeout, base.send_timeout, "send_timeout", problems),
            max_output,
            max_connections,
        }
    }
}

impl Config {
    /// Loads every TLS listener's certificate and key (see `tls::Tls::load`): at start and at
    /// each reload, in the master, before the workers fork.
    pub fn load_tls(&mut self) -> Result<(), String> {
        for l in &mut self.listeners {
            if let Some(tls) = &mut l.tls {
                tls.load().map_err(|e| format!("listener {}: {e}", l.address))?;
            }
        }
        Ok(())
    }
}

impl ListenConfig {
    /// What identifies this listener's socket across reloads: its address, except that
    /// every `host:0` (a port the kernel picks) is a socket of its own, told apart by its app.
    pub fn key(&self) -> String {
        match &self.address {
            Address::Tcp(a) if a.port() == 0 => format!("{a}#{}", self.app),
            other => other.to_string(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AppConfig {
    pub name: String,
    /// The plugin file, absolute.
    pub plugin: PathBuf,
    /// The app's own settings (the table without `plugin`), as TOML text.
    pub settings_toml: String,
    /// `FILE:LINE` of each of its settings, for messages about them (an app refusing a key).
    pub setting_lines: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub name: String,
    pub url: String,
    pub pool_size: usize,
    /// `lock_timeout` of every session; `None` (configured as 0): no limit.
    pub lock_timeout: Option<Duration>,
    /// `statement_timeout` of every session; `None` (configured as 0): no limit.
    pub statement_timeout: Option<Duration>,
}

impl DatabaseConfig {
    /// The session settings the workers' pools use (`lock_timeout`, `statement_timeout`), for
    /// one session of the server's own.
    pub fn settings(&self) -> fdt_sdk::DatabaseSettings {
        fdt_sdk::DatabaseSettings {
            pool_size: 1,
            lock_timeout: self.lock_timeout,
            statement_timeout: self.statement_timeout,
            ..fdt_sdk::DatabaseSettings::new(&self.name, &self.url)
        }
    }
}

/// Where a listener listens.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Address {
    /// Parses `host:port`, `[v6]:port` or `unix:/path` (relative to `base`).
    pub fn parse(text: &str, base: &Path) -> Result<Address, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, as in `unix:/run/app.sock`".into());
            }
            return Ok(Address::Unix(base.join(path)));
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Address::Tcp(addr));
        }
        match text.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => Ok(Address::Tcp(addr)),
                None => Err(format!("`{text}` resolves to no address")),
            },
            Err(e) => Err(format!("`{text}` is not host:port, [v6]:port or unix:/path ({e})")),
        }
    }
}

/// Every problem found in a config file, one per line, each as `FILE:LINE: message`.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: Option<Spanned<RawServer>>,
    #[serde(default)]
    listen: Vec<Spanned<RawListen>>,
    #[serde(default)]
    app: BTreeMap<String, Spanned<toml::Table>>,
    #[serde(default)]
    database: BTreeMap<String, Spanned<RawDatabase>>,
    #[serde(default)]
    events: Option<Spanned<RawEvents>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    database: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    workers: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    graceful_timeout: Option<Spanned<f64>>,
    pidfile: Option<String>,
    control_socket: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    boot_timeout: Option<Spanned<f64>>,
    heartbeat_timeout: Option<Spanned<f64>>,
    request_timeout: Option<Spanned<f64>>,
    max_requests: Option<Spanned<i64>>,
    user: Option<String>,
    group: Option<String>,
    error_log: Option<String>,
    access_log: Option<String>,
    node_id: Option<Spanned<String>>,
    agent_check: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<f64>>,
    read_timeout: Option<Spanned<f64>>,
    send_timeout: Option<Spanned<f64>>,
    max_output: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Spanned<String>,
    app: Spanned<String>,
    backlog: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<f64>>,
    read_timeout: Option<Spanned<f64>>,
    send_timeout: Option<Spanned<f64>>,
    max_output: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    tls_alpn: Option<Spanned<Vec<String>>>,
    tls_tickets: Option<Spanned<bool>>,
    proxy_protocol: Option<Spanned<String>>,
    proxy_from: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: String,
    pool_size: Option<Spanned<i64>>,
    lock_timeout: Option<Spanned<f64>>,
    statement_timeout: Option<Spanned<f64>>,
}

/// Collects problems with their position in the file.
struct Problems<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset].iter().filter(|&&b| b == b'\n').count() + 1
    }
    fn at(&mut self, span: std::ops::Range<usize>, msg: impl fmt::Display) {
        let line = self.line_of(span.start);
        self.list.push(format!("{}:{line}: {msg}", self.file.display()));
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = absolute(path);
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            problems: vec![format!("{}: cannot read the config file: {e}", path.display())],
        })?;
        Config::parse(&path, &text)
    }

    /// Validates config text that came from `path` (used for messages and relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut problems = Problems { file: path, text, list: Vec::new() };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let msg = e.message().trim().to_string();
                match e.span() {
                    Some(span) => problems.at(span, msg),
                    None => problems.list.push(format!("{}: {msg}", path.display())),
                }
                return Err(ConfigError { problems: problems.list });
            }
        };
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let config = build(raw, path, &dir, &mut problems);
        if problems.list.is_empty() { Ok(config) } else { Err(ConfigError { problems: problems.list }) }
    }

    /// The `[database.*]` tables as TOML text (what apps receive).
    pub fn databases_toml(&self) -> String {
        let mut table = toml::Table::new();
        for db in self.databases.values() {
            let mut t = toml::Table::new();
            t.insert("url".into(), db.url.clone().into());
            t.insert("pool_size".into(), (db.pool_size as i64).into());
            let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
            t.insert("lock_timeout".into(), secs(db.lock_timeout).into());
            t.insert("statement_timeout".into(), secs(db.statement_timeout).into());
            table.insert(db.name.clone(), t.into());
        }
        toml::to_string(&table).unwrap_or_default()
    }

    /// The app a listener serves.
    pub fn app(&self, name: &str) -> &AppConfig {
        &self.apps[name]
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn seconds(value: Option<Spanned<f64>>, default: f64, key: &str, problems: &mut Problems<'_>) -> Duration {
    let Some(v) = value else {
        return Duration::from_secs_f64(default);
    };
    let span = v.span();
    let secs = v.into_inner();
    if !(0.0..=1e7).contains(&secs) {
        problems.at(span, format!("`{key}` must be a number of seconds between 0 and 10000000, got {secs}"));
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(secs)
}

fn count(value: Option<Spanned<i64>>, default: usize, max: usize, key: &str, problems: &mut Problems<'_>) -> usize {
    let Some(v) = value else { return default };
    let span = v.span();
    let n = v.into_inner();
    if n < 1 || n as u64 > max as u64 {
        problems.at(span, format!("`{key}` must be between 1 and {max}, got {n}"));
        return default;
    }
    n as usize
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn build(raw: RawConfig, path: &Path, dir: &Path, problems: &mut Problems<'_>) -> Config {
    let (server_span, s) = match raw.server {
        Some(s) => (s.span(), s.into_inner()),
        None => (0..0, RawServer::default()),
    };
    let log_level = match s.log_level {
        None => log::LevelFilter::Info,
        Some(l) => match l.get_ref().as_str() {
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            other => {
                problems.at(l.span(), format!("`log_level` must be error, warn, info, debug or trace, got `{other}`"));
                log::LevelFilter::Info
            }
        },
    };
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "fdtserver".into());
    let node_id = match s.node_id {
        Some(n) => {
            let valid = !n.get_ref().is_empty()
                && n.get_ref().len() <= 64
                && n.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                problems.at(n.span(), "`node_id` must be 1 to 64 characters of A-Z a-z 0-9 . _ -");
            }
            n.into_inner()
        }
        None => default_node_id(),
    };
    let max_requests = match s.max_requests {
        Some(m) if *m.get_ref() < 0 => {
            problems.at(m.span(), "`max_requests` must be 0 (never) or a positive number");
            0
        }
        Some(m) => m.into_inner() as u64,
        None => 0,
    };
    let request_timeout = seconds(s.request_timeout, 0.0, "request_timeout", problems);
    let limits = RawLimits {
        idle_timeout: s.idle_timeout,
        read_timeout: s.read_timeout,
        send_timeout: s.send_timeout,
        max_output: s.max_output,
        max_connections: s.max_connections,
    }
    .over(Limits::default(), problems);
    let agent_check_span = s.agent_check.as_ref().map(|a| a.span());
    let agent_check = s.agent_check.and_then(|a| match agent_check_address(a.get_ref(), dir) {
        Ok(addr) => Some(addr),
        Err(e) => {
            problems.at(a.span(), format!("`agent_check`: {e}"));
            None
        }
    });
    let server = ServerConfig {
        workers: count(s.workers, default_workers(), 1024, "workers", problems),
        threads: count(s.threads, 4, 1024, "threads", problems),
        graceful_timeout: seconds(s.graceful_timeout, 30.0, "graceful_timeout", problems),
        pidfile: s.pidfile.map(|p| dir.join(p)),
        control_socket: control_socket(s.control_socket, dir, &stem, &server_span, problems),
        log_level,
        boot_timeout: seconds(s.boot_timeout, 30.0, "boot_timeout", problems),
        heartbeat_timeout: seconds(s.heartbeat_timeout, 30.0, "heartbeat_timeout", problems),
        request_timeout: (!request_timeout.is_zero()).then_some(request_timeout),
        max_requests,
        user: s.user,
        group: s.group,
        error_log: s.error_log.map(|p| dir.join(p)),
        access_log: s.access_log.map(|p| dir.join(p)),
        node_id,
        agent_check,
        limits,
    };

    let mut apps = BTreeMap::new();
    for (name, table) in raw.app {
        let span = table.span();
        let mut table = table.into_inner();
        let plugin = match table.remove("plugin") {
            Some(toml::Value::String(p)) => dir.join(p),
            Some(other) => {
                problems.at(span.clone(), format!("[app.{name}]: `plugin` must be a path (a string), got {other}"));
                continue;
            }
            None => {
                problems.at(span.clone(), format!("[app.{name}] has no `plugin` (the path of the app's .so file)"));
                continue;
            }
        };
        let settings_toml = toml::to_string(&table).unwrap_or_default();
        let setting_lines = setting_lines(problems, &name);
        apps.insert(name.clone(), AppConfig { name, plugin, settings_toml, setting_lines });
    }

    let mut listeners = Vec::new();
    if raw.listen.is_empty() && apps.is_empty() {
        let at = if server_span.is_empty() { 0..0 } else { server_span };
        problems.at(at, "no [[listen]] and no [app.NAME]: the server would have nothing to run");
    }
    for l in raw.listen {
        let l = l.into_inner();
        let address = match Address::parse(l.address.get_ref(), dir) {
            Ok(a) => a,
            Err(e) => {
                problems.at(l.address.span(), format!("bad listen address: {e}"));
                continue;
            }
        };
        if let Address::Unix(path) = &address
            && let Err(e) = check_socket_path(path)
        {
            problems.at(l.address.span(), format!("bad listen address: {e}"));
            continue;
        }
        let ephemeral = matches!(address, Address::Tcp(a) if a.port() == 0);
        if !ephemeral && listeners.iter().any(|o: &ListenConfig| o.address == address) {
            problems.at(l.address.span(), format!("address {address} is listed twice"));
            continue;
        }
        if !apps.contains_key(l.app.get_ref()) {
            problems.at(
                l.app.span(),
                format!(
                    "listener {address} names app `{}`, but there is no [app.{}]",
                    l.app.get_ref(),
                    l.app.get_ref()
                ),
            );
            continue;
        }
        let backlog = match l.backlog {
            Some(b) if !(1..=65535).contains(b.get_ref()) => {
                problems.at(b.span(), "`backlog` must be between 1 and 65535");
                DEFAULT_BACKLOG
            }
            Some(b) => b.into_inner() as i32,
            None => DEFAULT_BACKLOG,
        };
        let limits = RawLimits {
            idle_timeout: l.idle_timeout,
            read_timeout: l.read_timeout,
            send_timeout: l.send_timeout,
            max_output: l.max_output,
            max_connections: l.max_connections,
        }
        .over(server.limits, problems);
        let tls = tls_settings(l.tls_cert, l.tls_key, l.tls_alpn, l.tls_tickets, dir, problems);
        let proxy = proxy_settings(l.proxy_protocol, l.proxy_from, problems);
        listeners.push(ListenConfig { address, app: l.app.into_inner(), backlog, limits, tls, proxy });
    }
    if let (Some(agent), Some(span)) = (server.agent_check, agent_check_span)
        && let Some(l) = listeners.iter().find(|l| matches!(l.address, Address::Tcp(a) if same_port(a, agent)))
    {
        problems.at(
            span,
            format!(
                "`agent_check` {agent} takes the port of the [[listen]] {} (app {}): give it a port of its own",
                l.address, l.app
            ),
        );
    }

    let mut databases = BTreeMap::new();
    for (name, db) in raw.database {
        if let Err(e) = fdt_sdk::gid::check_database_name(&name) {
            problems.at(db.span(), format!("[database.{name}]: {e}"));
        }
        let db = db.into_inner();
        let pool_size = count(db.pool_size, 8, 1024, "pool_size", problems);
        // Defaults: fdt_sdk's DatabaseSettings::DEFAULT_LOCK_TIMEOUT and _STATEMENT_TIMEOUT.
        let timeout = |value, default: Duration, key, problems: &mut Problems<'_>| {
            Some(seconds(value, default.as_secs_f64(), key, problems)).filter(|d| !d.is_zero())
        };
        let lock_timeout =
            timeout(db.lock_timeout, fdt_sdk::DatabaseSettings::DEFAULT_LOCK_TIMEOUT, "lock_timeout", problems);
        let statement_timeout = timeout(
            db.statement_timeout,
            fdt_sdk::DatabaseSettings::DEFAULT_STATEMENT_TIMEOUT,
            "statement_timeout",
            problems,
        );
        databases
            .insert(name.clone(), DatabaseConfig { name, url: db.url, pool_size, lock_timeout, statement_timeout });
    }

    let events_database = raw.events.and_then(|e| e.into_inner().database).and_then(|name| {
        if databases.contains_key(name.get_ref()) {
            return Some(name.into_inner());
        }
        problems.at(
            name.span(),
            format!("[events] database = {:?}: there is no [database.{}]", name.get_ref(), name.get_ref()),
        );
        None
    });

    Config { path: path.to_path_buf(), server, listeners, apps, databases, events_database }
}

/// A listener's PROXY protocol settings: `proxy_from` only with `proxy_protocol`.
fn proxy_settings(
    version: Option<Spanned<String>>,
    from: Option<Spanned<Vec<String>>>,
    problems: &mut Problems<'_>,
) -> Option<ProxyProtocol> {
    let Some(version) = version else {
        if let Some(from) = from {
            problems.at(from.span(), "`proxy_from` needs `proxy_protocol` (\"v1\", \"v2\" or \"any\")");
        }
        return None;
    };
    let version = match version.get_ref().parse() {
        Ok(v) => v,
        Err(e) => {
            problems.at(version.span(), format!("`proxy_protocol`: {e}"));
            return None;
        }
    };
    let from = match from {
        None => crate::proxy_protocol::loopback(),
        Some(list) => {
            let span = list.span();
            let mut cidrs = Vec::new();
            for text in list.into_inner() {
                match text.parse() {
                    Ok(cidr) => cidrs.push(cidr),
                    Err(e) => problems.at(span.clone(), format!("`proxy_from`: {text:?}: {e}")),
                }
            }
            cidrs
        }
    };
    Some(ProxyProtocol { version, from })
}

/// A listener's TLS settings: both files or neither; ALPN names and tickets only with them.
fn tls_settings(
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    alpn: Option<Spanned<Vec<String>>>,
    tickets: Option<Spanned<bool>>,
    dir: &Path,
    problems: &mut Problems<'_>,
) -> Option<crate::tls::Tls> {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            if let Some(alpn) = alpn {
                problems.at(alpn.span(), "`tls_alpn` needs `tls_cert` and `tls_key` (ALPN is part of TLS)");
            }
            if let Some(tickets) = tickets {
                problems.at(tickets.span(), "`tls_tickets` needs `tls_cert` and `tls_key` (tickets are part of TLS)");
            }
            return None;
        }
        (Some(cert), None) => {
            problems.at(cert.span(), "`tls_cert` needs `tls_key` too (the certificate's private key)");
            return None;
        }
        (None, Some(key)) => {
            problems.at(key.span(), "`tls_key` needs `tls_cert` too (the certificate chain)");
            return None;
        }
    };
    let mut names = Vec::new();
    if let Some(alpn) = alpn {
        let span = alpn.span();
        names = alpn.into_inner();
        if names.iter().any(|n| n.is_empty() || n.len() > 255) {
            problems.at(span, "`tls_alpn` names are 1 to 255 bytes each (for example \"h2\", \"http/1.1\")");
        }
    }
    Some(crate::tls::Tls {
        cert: dir.join(cert.into_inner()),
        key: dir.join(key.into_inner()),
        alpn: names,
        tickets: tickets.is_none_or(|t| t.into_inner()),
        loaded: None,
    })
}

/// Parses `agent_check`: a TCP `host:port` with a port (a load balancer must know where to ask).
fn agent_check_address(text: &str, dir: &Path) -> Result<SocketAddr, String> {
    match Address::parse(text, dir)? {
        Address::Tcp(a) if a.port() == 0 => {
            Err(format!("`{text}` needs a fixed port: the load balancer's `agent-port` must know it"))
        }
        Address::Tcp(a) => Ok(a),
        Address::Unix(_) => Err(format!("`{text}` must be host:port: a load balancer's agent check connects over TCP")),
    }
}

/// True when binding `b` would fail because `a` is bound: the same port on the same address,
/// or on a wildcard address of the same family.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The longest path a Unix socket can have (`sun_path` is 108 bytes, with its final NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a Unix socket path the kernel cannot bind.
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(format!(
            "the socket path {} is {len} bytes long; a Unix socket path can have at most {MAX_SOCKET_PATH} (choose a shorter one)",
            path.display()
        ));
    }
    Ok(())
}

/// `control_socket`, or its default beside the config file, checked for length.
fn control_socket(
    value: Option<Spanned<String>>,
    dir: &Path,
    stem: &str,
    server_span: &std::ops::Range<usize>,
    problems: &mut Problems<'_>,
) -> PathBuf {
    let (path, span) = match value {
        Some(v) => (dir.join(v.get_ref()), v.span()),
        None => (dir.join(format!("{stem}.sock")), server_span.clone()),
    };
    if let Err(e) = check_socket_path(&path) {
        problems.at(span, format!("`control_socket`: {e}"));
    }
    path
}

/// Where each key of `[app.NAME]` is written: `FILE:LINE` by key. (serde's view of the file
/// keeps the span of a whole table only, so the file is read once more, spanned.)
fn setting_lines(problems: &Problems<'_>, app: &str) -> BTreeMap<String, String> {
    use toml::de::{DeTable, DeValue};
    fn find<'t, 'i>(table: &'t DeTable<'i>, key: &str) -> Option<&'t DeTable<'i>> {
        match table.iter().find(|(k, _)| k.get_ref() == key)?.1.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => None,
        }
    }
    let Ok(root) = DeTable::parse(problems.text) else { return BTreeMap::new() };
    let Some(table) = find(root.get_ref(), "app").and_then(|apps| find(apps, app)) else { return BTreeMap::new() };
    table
        .keys()
        .map(|k| {
            let line = problems.line_of(k.span().start);
            (k.get_ref().to_string(), format!("{}:{line}", problems.file.display()))
        })
        .collect()
}

fn default_node_id() -> String {
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let clean: String =
        host.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).take(64).collect();
    if clean.is_empty() { "node".into() } else { clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/fdt/test.toml"), text)
    }

    const MINIMAL: &str = "[[listen]]\naddress = \"127.0.0.1:7000\"\napp = \"echo\"\n\n[app.echo]\nplugin = \"libfdt_echo.so\"\ndelay_ms = 5\n";

    #[test]
    fn a_minimal_config_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.threads, 4);
        assert_eq!(c.server.graceful_timeout, Duration::from_secs(30));
        assert_eq!(c.server.control_socket, Path::new("/etc/fdt/test.sock"));
        assert_eq!(c.apps["echo"].plugin, Path::new("/etc/fdt/libfdt_echo.so"));
        assert_eq!(c.apps["echo"].settings_toml.trim(), "delay_ms = 5");
        assert_eq!(c.apps["echo"].setting_lines["delay_ms"], "/etc/fdt/test.toml:7");
        assert_eq!(c.listeners[0].backlog, DEFAULT_BACKLOG);
        assert!(c.server.request_timeout.is_none());
    }

    #[test]
    fn database_timeouts_have_safe_defaults_take_fractions_and_refuse_unknown_keys() {
        let url = "[database.main]\nurl = \"host=/tmp\"\n";
        let c = parse(&format!("{MINIMAL}{url}")).unwrap();
        let db = &c.databases["main"];
        assert_eq!(
            (db.lock_timeout, db.statement_timeout),
            (Some(Duration::from_secs(5)), Some(Duration::from_secs(10)))
        );
        let c = parse(&format!("{MINIMAL}{url}lock_timeout = 0.25\nstatement_timeout = 0\n")).unwrap();
        let db = &c.databases["main"];
        assert_eq!((db.lock_timeout, db.statement_timeout), (Some(Duration::from_millis(250)), None));
        assert!(c.databases_toml().contains("lock_timeout = 0.25"), "{}", c.databases_toml());
        let err = parse(&format!("{MINIMAL}{url}lock_timeout = -1\n")).unwrap_err().to_string();
        assert!(err.contains("test.toml:10: `lock_timeout`"), "{err}");
        let err = parse(&format!("{MINIMAL}{url}lock_timout = 1\n")).unwrap_err().to_string();
        assert!(err.contains("test.toml:10:") && err.contains("lock_timout"), "{err}");
    }

    #[test]
    fn an_unknown_server_key_is_reported_with_file_and_line() {
        let err = parse(&format!("[server]\nworkers = 2\nwokers = 3\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(err.problems[0].starts_with("/etc/fdt/test.toml:3: "), "{err}");
        assert!(err.problems[0].contains("wokers"), "{err}");
    }

    #[test]
    fn every_semantic_problem_is_listed_with_its_line() {
        let text = "[server]\nworkers = 0\nlog_level = \"loud\"\n[[listen]]\naddress = \"127.0.0.1:7000\"\napp = \"nope\"\n[[listen]]\naddress = \"nonsense\"\napp = \"echo\"\n[app.echo]\ndelay_ms = 1\n";
        let err = parse(text).unwrap_err();
        let all = err.to_string();
        assert!(all.contains("test.toml:2: `workers` must be between 1"), "{all}");
        assert!(all.contains("test.toml:3: `log_level`"), "{all}");
        assert!(all.contains("test.toml:6: listener 127.0.0.1:7000 names app `nope`"), "{all}");
        assert!(all.contains("test.toml:8: bad listen address"), "{all}");
        assert!(all.contains("test.toml:10: [app.echo] has no `plugin`"), "{all}");
    }

    #[test]
    fn unix_and_ipv6_addresses_parse() {
        let base = Path::new("/srv");
        assert_eq!(Address::parse("unix:run/a.sock", base).unwrap(), Address::Unix("/srv/run/a.sock".into()));
        assert_eq!(Address::parse("[::1]:80", base).unwrap().to_string(), "[::1]:80");
    }

    #[test]
    fn agent_check_is_a_tcp_address_with_a_port_of_its_own() {
        assert_eq!(parse(MINIMAL).unwrap().server.agent_check, None);
        let with = |value: &str| parse(&format!("[server]\nagent_check = \"{value}\"\n{MINIMAL}"));
        assert_eq!(with("127.0.0.1:9101").unwrap().server.agent_check, Some("127.0.0.1:9101".parse().unwrap()));
        for (value, wanted) in [
            ("unix:/run/agent.sock", "test.toml:2: `agent_check`: `unix:/run/agent.sock` must be host:port"),
            ("127.0.0.1:0", "test.toml:2: `agent_check`: `127.0.0.1:0` needs a fixed port"),
            ("nonsense", "test.toml:2: `agent_check`: `nonsense` is not host:port"),
            (
                "127.0.0.1:7000",
                "test.toml:2: `agent_check` 127.0.0.1:7000 takes the port of the [[listen]] 127.0.0.1:7000 (app echo)",
            ),
            ("0.0.0.0:7000", "test.toml:2: `agent_check` 0.0.0.0:7000 takes the port of the [[listen]] 127.0.0.1:7000"),
        ] {
            let err = with(value).unwrap_err().to_string();
            assert!(err.contains(wanted), "{value}: {err}");
        }
        // Another port of the same host, or the same port of another address, is fine.
        assert!(with("127.0.0.1:7001").is_ok());
        assert!(with("127.0.0.2:7000").is_ok());
    }

    #[test]
    fn a_toml_syntax_error_names_the_line() {
        let err = parse("[server\nworkers = 2\n").unwrap_err();
        assert!(err.problems[0].starts_with("/etc/fdt/test.toml:1: "), "{err}");
    }
}
