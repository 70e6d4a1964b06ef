//! Shared harness for the integration tests: a temp directory with a policy, the real
//! `gatekeeper` binary as a child process (killed on drop), raw HTTP/1.1 over `TcpStream`, and
//! readers for the Traefik file and the state file.
//!
//! Nothing here sleeps to synchronise: every wait polls a condition every 20 ms up to a deadline
//! and fails with what it last saw.

// Each test binary uses its own part of the harness.
#![allow(dead_code)]
pub mod proxies;
pub mod redis;
pub mod traefik;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_gatekeeper");
/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(20);
/// Generous upper bound for anything that should happen "at once" (a start, a write).
pub const SOON: Duration = Duration::from_secs(10);
/// Deadline for something that comes only after one of the daemon's own timeouts or delays (a
/// few seconds): long enough that only a hang misses it. A liveness check, not a speed assertion:
/// functional tests assert no upper bound on time (benches measure time).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Poll `check` every [`POLL`] until it returns `Ok` or `timeout` passes; then panic with `what`
/// and the last `Err` (what was observed instead).
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    wait_for_every(POLL, what, timeout, check)
}

/// [`wait_for`], polling every `interval` (for checks that start a process each time).
pub fn wait_for_every<T>(
    interval: Duration,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}

/// Wall-clock milliseconds, the daemon's own clock.
pub fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Wait until the wall clock has moved past the current millisecond, so the next request is
/// seen strictly later than everything before it (the ledger's LRU works in milliseconds).
pub fn next_millisecond() {
    let start = now_millis();
    while now_millis() <= start + 1 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------
// A temp directory with a policy
// ---------------------------------------------------------------------------------------------

/// A temp directory holding a policy file; the daemon runs with it as working directory, state
/// in `data/`, the Traefik file in `traefik/`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub policy: PathBuf,
    pub traefik: PathBuf,
    pub state: PathBuf,
}

/// The policy lines every test shares: ephemeral ports, state and Traefik file in the temp dir.
pub const PREAMBLE: &str = "\
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
state_file: ./data/state.json
traefik: { file: ./traefik/gatekeeper.yml }
";

impl Setup {
    /// A temp dir with `PREAMBLE` + `body` as its policy.
    pub fn new(body: &str) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = dir.path().join("gatekeeper.yaml");
        std::fs::write(&policy, format!("{PREAMBLE}{body}")).expect("write policy");
        Setup {
            traefik: dir.path().join("traefik/gatekeeper.yml"),
            state: dir.path().join("data/state.json"),
            policy,
            dir,
        }
    }

    /// Run the daemon on this policy and wait until it listens.
    pub fn start(&self) -> Daemon {
        Daemon::start(self.dir.path(), &["--config", "gatekeeper.yaml"], &[])
    }

    /// The Traefik file's allow lists, once it exists.
    pub fn lists(&self) -> Lists {
        // The first Traefik file follows the start; a test that grants nothing can get here
        // first (seen on a loaded machine in tests/admin.rs).
        wait_for("the Traefik file", SOON, || read_lists(&self.traefik))
    }

    /// Wait until `check` accepts the Traefik file's allow lists.
    pub fn wait_lists(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Lists) -> bool,
    ) -> Lists {
        wait_for(what, timeout, || {
            let lists = read_lists(&self.traefik)?;
            if check(&lists) {
                Ok(lists)
            } else {
                Err(format!("{lists:?}"))
            }
        })
    }

    /// The state file's entries.
    pub fn state_entries(&self) -> Vec<StateEntry> {
        // The first state file follows the start; a test that grants nothing can get here first.
        wait_for("the state file", SOON, || read_state(&self.state))
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon process
// ---------------------------------------------------------------------------------------------

/// A running `gatekeeper`; SIGKILLed and reaped on drop, so a failing test leaves nothing behind.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    /// The proxy-facing address, read from the `listening` log line.
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

/// Spawn the binary in `dir` with a clean environment plus `env`, stderr captured.
fn spawn(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, Arc<Mutex<String>>, JoinHandle<()>) {
    spawn_program(BIN, &[], dir, args, env)
}

/// As [`spawn`], with `program` and `pre_args` in front of the binary's arguments (a wrapper).
fn spawn_program(
    program: &str,
    pre_args: &[&str],
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, Arc<Mutex<String>>, JoinHandle<()>) {
    let mut child = Command::new(program)
        .args(pre_args)
        .args(args)
        .current_dir(dir)
        // Nothing from the test runner's environment (GATEKEEPER_*, MAX_IP_LEN, RUST_LOG) leaks in.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, log, reader)
}

impl Daemon {
    /// Start the binary in `dir` with `args` and `env` (on top of an empty environment) and wait
    /// for its `listening addr=...` line.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let (child, log, reader) = spawn(dir, args, env);
        Self::wait_listening(child, log, reader)
    }

    /// As [`Daemon::start`], run through a wrapper (`program pre_args... BIN args...`).
    pub fn start_wrapped(
        program: &str,
        pre_args: &[&str],
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let (child, log, reader) = spawn_program(program, pre_args, dir, args, env);
        Self::wait_listening(child, log, reader)
    }

    fn wait_listening(child: Child, log: Arc<Mutex<String>>, reader: JoinHandle<()>) -> Daemon {
        let mut daemon = Daemon {
            child,
            status: None,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            reader: Some(reader),
        };
        daemon.addr = wait_for("the `listening addr=` log line", SOON, || {
            if let Some(addr) = listening_addr(&daemon.log()) {
                return Ok(addr);
            }
            if let Some(status) = daemon.child.try_wait().expect("try_wait") {
                daemon.status = Some(status);
                panic!(
                    "gatekeeper exited with {status} before listening:\n{}",
                    daemon.final_log()
                );
            }
            Err(daemon.log())
        });
        daemon
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGHUP (reload the policy).
    pub fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// The admin listener's address, from the `admin_addr=` log line.
    pub fn admin_addr(&self) -> SocketAddr {
        wait_for("the `admin_addr=` log line", SOON, || {
            let log = self.log();
            log.lines()
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("admin_addr="))
                })
                .and_then(|a| a.parse().ok())
                .ok_or(log)
        })
    }

    /// Wait until the log holds `needle` and return the log. gatekeeper writes its log from a
    /// thread of its own, so a line can arrive a moment after what it describes is visible.
    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(&format!("`{needle}` in the log"), SOON, || {
            let log = self.log();
            if log.contains(needle) {
                Ok(log)
            } else {
                Err(log)
            }
        })
    }

    /// Is the process still running?
    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything logged to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The whole log, once the process has exited (waits for the reader to see EOF).
    fn final_log(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            self.child.kill().expect("SIGKILL");
            self.status = Some(self.child.wait().expect("wait"));
        }
    }

    /// SIGTERM, then wait (polling, up to [`SOON`]) for the exit; returns the status and the log.
    pub fn terminate(&mut self) -> (ExitStatus, String) {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let status = wait_for("gatekeeper to exit after SIGTERM", SOON, || {
            self.child
                .try_wait()
                .expect("try_wait")
                .ok_or_else(|| "still running".to_string())
        });
        self.status = Some(status);
        (status, self.final_log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `listening addr=127.0.0.1:PORT` → the address.
pub fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("listening"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .and_then(|a| a.parse().ok())
}

/// Run the binary to completion (with a deadline); returns status, stdout, stderr.
pub fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gatekeeper");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_for(
        &format!("`gatekeeper {}` to exit", args.join(" ")),
        SOON,
        || {
            child
                .try_wait()
                .expect("try_wait")
                .ok_or_else(|| "still running".to_string())
        },
    );
    (status, out.join().unwrap(), err.join().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------------------------

/// What came back on a connection.
#[derive(Debug)]
pub struct Response {
    /// The status code of the status line.
    pub status: u16,
    /// The head (status line and headers), for messages.
    pub head: String,
}

/// A port on 127.0.0.1 that nothing listens on right now (bound, then released; whoever binds
/// it next must retry on "address in use").
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `/healthz` of the admin listener at `admin`: status and body.
pub fn health(admin: SocketAddr) -> (u16, String) {
    let a = http(admin, "GET", "/healthz", &[], "");
    (a.status, a.body)
}

/// Wait at most `within` for `/healthz` to answer `status`; its body.
pub fn wait_health(admin: SocketAddr, status: u16, within: Duration) -> String {
    wait_for(&format!("/healthz to answer {status}"), within, || {
        let (s, body) = health(admin);
        (s == status)
            .then(|| body.clone())
            .ok_or(format!("{s} {body}"))
    })
}

/// A whole answer: status, head and (de-chunked) body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `error` of an admin API error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no `error` in {self:?}"))
            .to_string()
    }
}

/// One request with `Connection: close` (a JSON `body` when not empty); the whole answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    http_within(addr, method, target, headers, body, SOON)
}

/// [`http`], waiting up to `patience` for the answer (a liveness bound for an answer that comes
/// only after a timeout of the daemon's own).
pub fn http_within(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    patience: Duration,
) -> Reply {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(patience)).unwrap();
    http_on(stream, addr, method, target, headers, body)
}

/// [`http`] from the loopback address `from`: the admin listener gives each peer address a share
/// of its connections, so many concurrent requests come from several addresses.
pub fn http_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let stream = connect_from(from, addr).unwrap_or_else(|e| panic!("from {from}: {e}"));
    http_on(stream, addr, method, target, headers, body)
}

/// A connection to `addr` from the local address `from` (a loopback address other than
/// 127.0.0.1 is another peer to the server), with [`SOON`] as its connect and read timeouts.
pub fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&addr.into(), SOON)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(SOON))?;
    Ok(stream)
}

fn http_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    parse_reply(&raw).unwrap_or_else(|e| panic!("{e}"))
}

/// A whole HTTP/1.1 answer as read until the server closed: status, head, and the body
/// (de-chunked when chunked).
pub fn parse_reply(raw: &str) -> Result<Reply, String> {
    let (head, rest) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {raw:?}"))?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    let mut reply = Reply {
        status,
        head: head.to_string(),
        body: rest.to_string(),
    };
    if reply
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        reply.body = dechunk(rest)?;
    }
    Ok(reply)
}

fn dechunk(mut s: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| format!("no chunk size line in {s:?}"))?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| format!("a chunk of {size} bytes in {rest:?}"))?;
        out.push_str(chunk);
        s = rest.get(size + 2..).unwrap_or("");
    }
}

/// Send `request` as is, then read the response head. Writing happens on its own thread so a
/// server that answers before reading the body (mirrored requests) is read while the body is
/// still going out, instead of the answer being lost to a reset.
pub fn send_raw(addr: SocketAddr, request: Vec<u8>) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(SOON))?;
    stream.set_write_timeout(Some(SOON))?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || {
        // The server may close early (an answer before the body, a refused header); what
        // matters is what it answered.
        let _ = writer.write_all(&request);
        let _ = writer.flush();
    });
    let mut reader = stream;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        match reader.read(&mut chunk) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {:?}",
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e),
        }
    };
    let _ = reader.shutdown(Shutdown::Both);
    let _ = sender.join();
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP/1.1 status line: {head:?}")))?;
    Ok(Response { status, head })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request with `Connection: close`: `GET /` with `host` (no Host header when `None`) and one
/// `X-Forwarded-For` header per element of `xff`.
pub fn request(host: Option<&str>, xff: &[&[u8]]) -> Vec<u8> {
    let mut r = b"GET /some/path?q=1 HTTP/1.1\r\n".to_vec();
    if let Some(host) = host {
        r.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    for value in xff {
        r.extend_from_slice(b"X-Forwarded-For: ");
        r.extend_from_slice(value);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"User-Agent: gatekeeper-tests\r\nConnection: close\r\n\r\n");
    r
}

/// A mirrored request for `client` with Host `host`; returns the status, panicking on I/O errors.
pub fn mirror(addr: SocketAddr, host: &str, client: &str) -> u16 {
    send_raw(addr, request(Some(host), &[client.as_bytes()]))
        .unwrap_or_else(|e| panic!("request for {client} to {addr}: {e}"))
        .status
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

/// Middleware name → its `sourceRange`, as Traefik would read it.
pub type Lists = BTreeMap<String, Vec<String>>;

/// Parse Traefik file-provider YAML into middleware → `sourceRange`. Every middleware must have
/// exactly one `ipAllowList` / `ipWhiteList` with a list of strings.
pub fn parse_lists(text: &str) -> Result<Lists, String> {
    use figment::providers::{Format, Yaml};
    let value: Value = figment::Figment::from(Yaml::string(text))
        .extract()
        .map_err(|e| format!("not YAML ({e}):\n{text}"))?;
    let middlewares = value
        .pointer("/http/middlewares")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("no http.middlewares mapping:\n{text}"))?;
    let mut lists = Lists::new();
    for (name, body) in middlewares {
        let body = body
            .as_object()
            .ok_or_else(|| format!("{name} is not a mapping"))?;
        let kind = body
            .get("ipAllowList")
            .or_else(|| body.get("ipWhiteList"))
            .ok_or_else(|| format!("{name} has no ipAllowList / ipWhiteList:\n{text}"))?;
        let range = kind
            .get("sourceRange")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{name} has no sourceRange list:\n{text}"))?;
        let range = range
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{name}: {v} is not a string"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        lists.insert(name.clone(), range);
    }
    Ok(lists)
}

/// [`parse_lists`] of a file; an error (with the reason) when it is missing or does not parse.
pub fn read_lists(path: &Path) -> Result<Lists, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_lists(&text)
}

/// `["a", "b"]` as owned strings, for comparing with a list.
pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// One entry of the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub source: String,
    pub network: String,
    pub hits: u64,
}

/// Parse the state file (format 1, an `entries` list); an error when missing or invalid.
pub fn read_state(path: &Path) -> Result<Vec<StateEntry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| format!("state file is not JSON ({e}):\n{text}"))?;
    if value.get("format") != Some(&Value::from(1)) {
        return Err(format!("state file has no `format: 1`:\n{text}"));
    }
    let entries = value
        .get("entries")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("state file has no entries list:\n{text}"))?;
    entries
        .iter()
        .map(|e| {
            Ok(StateEntry {
                source: e["source"]
                    .as_str()
                    .ok_or("entry without source")?
                    .to_string(),
                network: e["network"]
                    .as_str()
                    .ok_or("entry without network")?
                    .to_string(),
                hits: e["hits"].as_u64().ok_or("entry without hits")?,
            })
        })
        .collect::<Result<_, String>>()
}

/// The networks of the state file's entries.
pub fn state_networks(path: &Path) -> Result<BTreeSet<String>, String> {
    Ok(read_state(path)?.into_iter().map(|e| e.network).collect())
}

/// Names in a directory (empty when it does not exist).
pub fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}
