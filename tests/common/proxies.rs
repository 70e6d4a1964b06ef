//! End-to-end harness: real nginx or Caddy, loading the configs under `deploy/` unchanged, in
//! front of the real gatekeeper and stand-in apps (Home Assistant, Immich, Nextcloud). The
//! certificates come from the openssl CLI; clients are curl processes bound to their own loopback
//! addresses (127.0.0.2, .3, ...), which stand for different public IPs. gatekeeper trusts only
//! the proxy (127.0.0.1), so every client address it sees came from the proxy.
//!
//! One [`Stack`] per test, in its own temp dir, everything stopped on drop. [`flows`] holds the
//! scenarios; `tests/e2e_nginx.rs` and `tests/e2e_caddy.rs` run each against their proxy.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Daemon, PATIENCE, POLL, SOON, free_port, read_state, wait_for};

/// The trusted site (client certificate required, its traffic is the mirror source).
pub const HA: &str = "ha.test";
/// Immich, hidden; share links at `/share/<key>`.
pub const PHOTOS: &str = "photos.test";
/// Nextcloud, hidden; share links at `/s/<token>`.
pub const CLOUD: &str = "cloud.test";

/// The command named when a tool is missing: the suite fails rather than skips.
pub const INSTALL_HINT: &str = "apt-get install -y nginx-light caddy";

/// A client certificate, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cert {
    /// No certificate at all.
    None,
    /// Signed by the CA the trusted site requires: the owner's, `CN=alice`.
    Valid,
    /// Signed by the same CA for someone else: `CN=bob`.
    Second,
    /// Self-signed: a certificate, but not one the trusted site accepts.
    Foreign,
}

impl Cert {
    /// The CN in the certificate's subject, which gatekeeper records as the entry's identity.
    pub fn common_name(self) -> Option<&'static str> {
        match self {
            Cert::None => None,
            Cert::Valid => Some("alice"),
            Cert::Second => Some("bob"),
            Cert::Foreign => Some("client"),
        }
    }
}

/// The header in which the deploy configs pass the client certificate's subject to gatekeeper
/// (a mirror source's `identity_header`).
pub const SUBJECT_HEADER: &str = "X-Client-Subject";

/// A client: the loopback address it connects from (its "public IP") and its certificate.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub ip: &'static str,
    pub cert: Cert,
}

impl Client {
    /// The network gatekeeper grants this client.
    pub fn network(&self) -> String {
        format!("{}/32", self.ip)
    }
}

/// The owner's phone, with its client certificate.
pub const PHONE: Client = Client {
    ip: "127.0.0.2",
    cert: Cert::Valid,
};
/// Someone never seen before.
pub const STRANGER: Client = Client {
    ip: "127.0.0.3",
    cert: Cert::None,
};
/// Tries the trusted site without a certificate.
pub const NO_CERT: Client = Client {
    ip: "127.0.0.4",
    cert: Cert::None,
};
/// Tries the trusted site with a certificate the site's CA did not sign.
pub const FOREIGN_CERT: Client = Client {
    ip: "127.0.0.5",
    cert: Cert::Foreign,
};
/// Holds a valid Immich share link.
pub const VIEWER: Client = Client {
    ip: "127.0.0.6",
    cert: Cert::None,
};
/// Holds a valid Nextcloud share link.
pub const CLOUD_VIEWER: Client = Client {
    ip: "127.0.0.7",
    cert: Cert::None,
};
/// Tries made-up links.
pub const GUESSER: Client = Client {
    ip: "127.0.0.8",
    cert: Cert::None,
};
/// Someone else's phone, with a certificate of their own from the same CA.
pub const BOB: Client = Client {
    ip: "127.0.0.9",
    cert: Cert::Second,
};
/// The owner's laptop, with the owner's certificate (the phone's).
pub const LAPTOP: Client = Client {
    ip: "127.0.0.10",
    cert: Cert::Valid,
};

/// An Immich share key (67 characters, as Immich makes them) starting with `tag`.
pub fn immich_key(tag: &str) -> String {
    format!("{tag:-<67}")
}

/// The key the stand-in Immich knows.
pub fn known_key() -> String {
    immich_key("known")
}

/// A key the stand-in Immich has never issued (401 on its API).
pub fn unknown_key() -> String {
    immich_key("unknown")
}

/// A key whose check the stand-in Immich drops without an answer (Immich down).
pub fn dropped_key() -> String {
    immich_key("dropped")
}

/// The Nextcloud share token the stand-in Nextcloud knows (15 characters).
pub const KNOWN_TOKEN: &str = "Kn0wnT0ken12345";
/// A token it does not know (404).
pub const UNKNOWN_TOKEN: &str = "Unkn0wnT0ken123";

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// The path of `name`, from PATH or the usual system directories (`/usr/sbin` is often not on a
/// test runner's PATH); a failure names the package to install.
pub fn tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        [
            "/usr/sbin",
            "/usr/bin",
            "/usr/local/sbin",
            "/usr/local/bin",
            "/sbin",
        ]
        .into_iter()
        .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed, and the end-to-end tests run the real thing \
         (they never skip); install it with `{install}`"
    )
}

fn curl() -> PathBuf {
    tool("curl", "apt-get install -y curl")
}

fn openssl() -> PathBuf {
    tool("openssl", "apt-get install -y openssl")
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// The last `lines` lines of a log, for failure messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate for the three site names, two client certificates signed by the
/// CA (for two people) and a self-signed client certificate. EC P-256: quick to make.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// [`Cert::Valid`].
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// [`Cert::Second`].
    pub second_cert: PathBuf,
    pub second_key: PathBuf,
    pub foreign_cert: PathBuf,
    pub foreign_key: PathBuf,
}

/// Run openssl in `dir`; `args` are split on spaces (none of them holds one).
fn run_openssl(dir: &Path, args: &str) {
    let out = Command::new(openssl())
        .args(args.split(' '))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    /// Make every certificate in `dir`.
    pub fn make(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).expect("certs dir");
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        run_openssl(
            dir,
            &format!(
                "req -x509 {new_key} -days 2 -keyout ca.key -out ca.pem -subj /CN=gatekeeper-e2e-ca \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ),
        );
        let leaf = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";
        let client = format!("{leaf}extendedKeyUsage=clientAuth\n");
        let cn = |cert: Cert| cert.common_name().expect("a certificate has a CN");
        // (file name, subject, extensions); the subjects carry an O so the DN the proxies pass
        // has more than the CN in it.
        let leaves = [
            (
                "server",
                "/CN=server".to_string(),
                format!(
                    "{leaf}extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{HA},DNS:{PHOTOS},DNS:{CLOUD}\n"
                ),
            ),
            (
                "client",
                format!("/O=Home/CN={}", cn(Cert::Valid)),
                client.clone(),
            ),
            ("second", format!("/O=Home/CN={}", cn(Cert::Second)), client),
        ];
        for (serial, (name, subject, extensions)) in (2..).zip(leaves) {
            std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("write extensions");
            run_openssl(
                dir,
                &format!("req -new {new_key} -keyout {name}.key -out {name}.csr -subj {subject}"),
            );
            run_openssl(
                dir,
                &format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} \
                     -days 2 -out {name}.pem -extfile {name}.ext"
                ),
            );
        }
        // A client certificate, but not from the CA the trusted site requires.
        run_openssl(
            dir,
            &format!(
                "req -x509 {new_key} -days 2 -keyout foreign.key -out foreign.pem -subj /CN={} \
                 -addext extendedKeyUsage=clientAuth",
                cn(Cert::Foreign)
            ),
        );
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            second_cert: dir.join("second.pem"),
            second_key: dir.join("second.key"),
            foreign_cert: dir.join("foreign.pem"),
            foreign_key: dir.join("foreign.key"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stand-in apps
// ---------------------------------------------------------------------------------------------

/// What a stand-in answers for a request target: status and body, or `None` to close the
/// connection without a word.
type Answer = fn(&str) -> Option<(u16, String)>;

/// A tiny HTTP/1.1 server on 127.0.0.1, one thread per connection, every answer
/// `Connection: close`. Its bodies say who answered and for what: `immich /photos/1`.
pub struct App {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl App {
    fn start(answer: Answer) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a stand-in app");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || serve(conn, answer));
                }
            }
        });
        App {
            addr,
            stop,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:port`, as the proxy configs and the policy want it.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn serve(mut conn: TcpStream, answer: Answer) {
    let _ = conn.set_read_timeout(Some(SOON));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut chunk) {
            Ok(n) if n > 0 && buf.len() < 64 * 1024 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    // Read the body before answering: closing a socket with unread data resets the connection,
    // and the proxy could lose the answer.
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < length {
        match conn.read(&mut chunk) {
            Ok(n) if n > 0 => have += n,
            _ => return,
        }
    }
    let Some((status, body)) = answer(&target) else {
        return;
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Whatever",
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
}

fn home_assistant(target: &str) -> Option<(u16, String)> {
    Some((200, format!("home-assistant {target}")))
}

/// Like Immich: its web app answers 200 to every path, so links are checked on its API.
fn immich(target: &str) -> Option<(u16, String)> {
    if let Some(query) = target.strip_prefix("/api/shared-links/me?") {
        let key = query.strip_prefix("key=").unwrap_or("");
        return if key == known_key() {
            Some((200, format!("{{\"key\":\"{key}\"}}")))
        } else if key == dropped_key() {
            None
        } else {
            Some((401, "{\"message\":\"Invalid share key\"}".to_string()))
        };
    }
    Some((200, format!("immich {target}")))
}

/// Like Nextcloud: an unknown share token is a 404.
fn nextcloud(target: &str) -> Option<(u16, String)> {
    if let Some(token) = target.strip_prefix("/s/") {
        if token != KNOWN_TOKEN {
            return Some((404, "no such share".to_string()));
        }
    }
    Some((200, format!("nextcloud {target}")))
}

// ---------------------------------------------------------------------------------------------
// The proxies
// ---------------------------------------------------------------------------------------------

/// The proxy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Nginx,
    Caddy,
}

impl Proxy {
    fn program(self) -> PathBuf {
        match self {
            Proxy::Nginx => tool("nginx", INSTALL_HINT),
            Proxy::Caddy => tool("caddy", INSTALL_HINT),
        }
    }

    /// What the trusted site answers a client without an acceptable certificate: nginx
    /// completes the handshake and answers 400; Caddy ends the handshake (no HTTP answer: 0).
    pub fn status_without_certificate(self) -> u16 {
        match self {
            Proxy::Nginx => 400,
            Proxy::Caddy => 0,
        }
    }

    /// What a hidden site answers while gatekeeper is unreachable (fail closed): nginx's
    /// auth_request turns the failed subrequest into 500; Caddy's forward_auth answers 502.
    pub fn status_while_gatekeeper_down(self) -> u16 {
        match self {
            Proxy::Nginx => 500,
            Proxy::Caddy => 502,
        }
    }
}

/// The values the deploy configs read from the environment.
fn variables(certs: &Certs, gatekeeper: u16, apps: &Apps, https: u16) -> Vec<(String, String)> {
    let path = |p: &Path| p.display().to_string();
    [
        ("GATEKEEPER", format!("127.0.0.1:{gatekeeper}")),
        ("HTTPS_PORT", https.to_string()),
        ("TLS_CERT", path(&certs.server_cert)),
        ("TLS_KEY", path(&certs.server_key)),
        ("CLIENT_CA", path(&certs.ca)),
        ("HA_HOST", HA.to_string()),
        ("HA_UPSTREAM", apps.home_assistant.host_port()),
        ("IMMICH_HOST", PHOTOS.to_string()),
        ("IMMICH_UPSTREAM", apps.immich.host_port()),
        ("NEXTCLOUD_HOST", CLOUD.to_string()),
        ("NEXTCLOUD_UPSTREAM", apps.nextcloud.host_port()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What envsubst does in the official nginx image: `${NAME}` and `$NAME` for every variable
/// given. Anything left that looks like an environment variable (upper case; nginx's own are
/// lower case) fails: the container would leave it in, and nginx would refuse it.
pub fn envsubst(template: &str, vars: &[(String, String)]) -> Result<String, String> {
    let mut out = template.to_string();
    // Longest names first, so `$HA_HOST` is not eaten by a shorter `$HA`.
    let mut vars: Vec<&(String, String)> = vars.iter().collect();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    let left: BTreeSet<String> = template_variables(&out);
    if left.is_empty() {
        Ok(out)
    } else {
        Err(format!("variables without a value: {left:?}"))
    }
}

/// The environment-style variables (`${NAME}` or `$NAME`, upper case) a template uses,
/// comments excepted.
pub fn template_variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find('$') {
            rest = &rest[i + 1..];
            let name: String = rest
                .trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                found.insert(name);
            }
        }
    }
    found
}

/// The Caddyfile's `{$NAME}` / `{$NAME:default}` placeholders, comments excepted.
pub fn caddy_variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split('#').next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("{$") {
            rest = &rest[i + 2..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

/// The nginx templates, sorted by name: `(file name, text)`.
pub fn nginx_templates() -> Vec<(String, String)> {
    let dir = deploy_dir().join("nginx/templates");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".conf.template"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read template");
            (p.file_name().unwrap().to_string_lossy().into_owned(), text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.conf.template in {}", dir.display());
    files
}

/// The Caddyfile the tests load.
pub fn caddyfile() -> PathBuf {
    deploy_dir().join("caddy/Caddyfile")
}

/// A running proxy: its child, its HTTPS port and the file its output goes to.
struct ProxyProcess {
    child: Child,
    status: Option<ExitStatus>,
    https: u16,
    log: PathBuf,
    access_log: Option<PathBuf>,
}

impl ProxyProcess {
    /// Start `kind` in `dir` on fresh ports, retrying when a port was taken in between.
    fn start(kind: Proxy, dir: &Path, certs: &Certs, gatekeeper: u16, apps: &Apps) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let https = free_port();
            let vars = variables(certs, gatekeeper, apps, https);
            let attempt = match kind {
                Proxy::Nginx => Self::spawn_nginx(dir, &vars, https),
                Proxy::Caddy => Self::spawn_caddy(dir, &vars, https),
            };
            match attempt.ready(certs) {
                Ok(proxy) => return proxy,
                Err(log) if log.to_ascii_lowercase().contains("address already in use") => {
                    last = log;
                }
                Err(log) => panic!("{kind:?} did not start:\n{log}"),
            }
        }
        panic!("{kind:?} found no free port in 5 tries:\n{last}")
    }

    fn spawn(program: PathBuf, args: &[&str], dir: &Path, env: &[(String, String)]) -> Self {
        let log = dir.join("proxy.log");
        let out = std::fs::File::create(&log).expect("proxy log");
        let child = Command::new(&program)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        ProxyProcess {
            child,
            status: None,
            https: 0,
            log,
            access_log: None,
        }
    }

    /// The templates filled as the nginx image would, under a wrapper nginx.conf that holds only
    /// process-level settings.
    fn spawn_nginx(dir: &Path, vars: &[(String, String)], https: u16) -> Self {
        let dir = dir.join("nginx");
        let conf_d = dir.join("conf.d");
        std::fs::create_dir_all(&conf_d).expect("nginx conf.d");
        for (name, text) in nginx_templates() {
            let conf = envsubst(&text, vars).unwrap_or_else(|e| panic!("{name}: {e}"));
            let out = name.strip_suffix(".template").expect("template suffix");
            std::fs::write(conf_d.join(out), conf).expect("write nginx conf");
        }
        let d = dir.display();
        let access_log = dir.join("access.log");
        let wrapper = format!(
            "# Written by the end-to-end tests: process-level settings only.\n\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log stderr notice;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   access_log {d}/access.log;\n\
             \x20   include {d}/conf.d/*.conf;\n\
             }}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, wrapper).expect("write nginx.conf");
        let prefix = format!("{d}/");
        let conf = conf.display().to_string();
        let args = [
            "-e",
            "stderr",
            "-p",
            &prefix,
            "-c",
            &conf,
            "-g",
            "daemon off;",
        ];
        let mut proxy = Self::spawn(Proxy::Nginx.program(), &args, &dir, &[]);
        proxy.https = https;
        proxy.access_log = Some(access_log);
        proxy
    }

    /// The Caddyfile as it is, with the environment it reads; HOME and XDG dirs in the temp
    /// dir, no admin endpoint.
    fn spawn_caddy(dir: &Path, vars: &[(String, String)], https: u16) -> Self {
        let dir = dir.join("caddy");
        std::fs::create_dir_all(&dir).expect("caddy dir");
        let mut env = vars.to_vec();
        let d = dir.display();
        env.extend(
            [
                ("HTTP_PORT", free_port().to_string()),
                ("CADDY_ADMIN", "off".to_string()),
                ("HOME", format!("{d}/home")),
                ("XDG_DATA_HOME", format!("{d}/data")),
                ("XDG_CONFIG_HOME", format!("{d}/config")),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        let file = caddyfile().display().to_string();
        let args = ["run", "--config", &file, "--adapter", "caddyfile"];
        let mut proxy = Self::spawn(Proxy::Caddy.program(), &args, &dir, &env);
        proxy.https = https;
        proxy
    }

    /// Wait until the proxy answers TLS with the test certificate on its port (a request from
    /// 127.0.0.1, which gatekeeper never grants); `Err(log)` when it exits first.
    fn ready(mut self, certs: &Certs) -> Result<Self, String> {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.status = Some(status);
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.https)).is_ok() {
                let probe = Client {
                    ip: "127.0.0.1",
                    cert: Cert::None,
                };
                if curl_get(certs, self.https, probe, CLOUD, "/", &[]).status != 0 {
                    return Ok(self);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after {SOON:?}:\n{}", self.log()));
            }
            std::thread::sleep(POLL);
        }
    }

    fn log(&self) -> String {
        let mut log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(access) = &self.access_log {
            log.push_str("\n--- access log ---\n");
            log.push_str(&std::fs::read_to_string(access).unwrap_or_default());
        }
        log
    }
}

impl Drop for ProxyProcess {
    /// SIGTERM and wait: SIGKILL on nginx's master would leave its workers running.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        send_signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What a client got: the status (0 when there was no HTTP answer, e.g. a refused TLS
/// handshake), the body, and curl's complaint if any.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub error: String,
}

/// GET `https://host:port/path` from `client`'s address, checking the server against the test
/// CA and presenting `client`'s certificate. `extra` goes to curl as is (headers).
fn curl_get(
    certs: &Certs,
    port: u16,
    client: Client,
    host: &str,
    path: &str,
    extra: &[&str],
) -> Reply {
    let mut cmd = Command::new(curl());
    // -q first: no ~/.curlrc. No proxy from the environment either.
    cmd.args(["-q", "--silent", "--show-error", "--max-time", "10"])
        .args(["--noproxy", "*", "--interface", client.ip])
        .arg("--cacert")
        .arg(&certs.ca)
        .args(["--output", "-", "--write-out", "\n%{http_code}"]);
    for name in [HA, PHOTOS, CLOUD] {
        cmd.arg("--resolve").arg(format!("{name}:{port}:127.0.0.1"));
    }
    let pair = match client.cert {
        Cert::None => None,
        Cert::Valid => Some((&certs.client_cert, &certs.client_key)),
        Cert::Second => Some((&certs.second_cert, &certs.second_key)),
        Cert::Foreign => Some((&certs.foreign_cert, &certs.foreign_key)),
    };
    if let Some((cert, key)) = pair {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = cmd
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        error: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The stack
// ---------------------------------------------------------------------------------------------

/// The stand-in apps.
pub struct Apps {
    pub home_assistant: App,
    pub immich: App,
    pub nextcloud: App,
}

/// Policy knobs a flow may change.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `idle_ttl` of every source.
    pub idle_ttl: &'static str,
    /// `max_failures` of the share sources.
    pub max_failures: u32,
    /// `unlocks` of the mirror source, as YAML.
    pub mirror_unlocks: &'static str,
    /// `identities` of the mirror source, as YAML (`{ "CN=alice": [immich] }`); when set, the
    /// source also reads the certificate subject from [`SUBJECT_HEADER`].
    pub identities: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            idle_ttl: "1h",
            max_failures: 3,
            mirror_unlocks: "[immich]",
            identities: None,
        }
    }
}

/// The policy: gatekeeper on a fixed port (the proxy config points at it, restarts keep it),
/// trusting only the proxy, nothing always allowed, no Traefik. By default the mirror source
/// unlocks Immich only, so the phone's reach is visibly limited.
fn policy(port: u16, apps: &Apps, o: Options) -> String {
    let Options {
        idle_ttl,
        max_failures,
        mirror_unlocks,
        identities,
    } = o;
    let identities = identities
        .map(|rules| format!("\n    identity_header: {SUBJECT_HEADER}\n    identities: {rules}"))
        .unwrap_or_default();
    format!(
        "listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:0 }}
state_file: ./data/state.json
trusted_proxies: [127.0.0.1/32]
always_allow: []
traefik: {{ propagation_delay: 0s }}
services: {{ immich: {{}}, nextcloud: {{}} }}
sources:
  home-assistant:
    kind: mirror
    hosts: [{HA}]
    unlocks: {mirror_unlocks}
    idle_ttl: {idle_ttl}{identities}
  immich-share:
    kind: share
    upstream: http://{immich}
    patterns:
      - path: '^/share/(?P<key>[A-Za-z0-9_-]{{67}})$'
        check: '/api/shared-links/me?key={{key}}'
    unlocks: [immich]
    idle_ttl: {idle_ttl}
    max_failures: {max_failures}
    timeout: 2s
  nextcloud-share:
    kind: share
    upstream: http://{nextcloud}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
    idle_ttl: {idle_ttl}
    max_failures: {max_failures}
    timeout: 2s
",
        immich = apps.immich.host_port(),
        nextcloud = apps.nextcloud.host_port(),
    )
}

/// Start gatekeeper in `dir` (policy already written), retrying while its port is taken.
fn start_gatekeeper(dir: &Path, tries: usize) -> Result<Daemon, String> {
    let mut last = String::new();
    for _ in 0..tries {
        let started = catch_unwind(AssertUnwindSafe(|| {
            Daemon::start(dir, &["--config", "gatekeeper.yaml"], &[])
        }));
        match started {
            Ok(daemon) => return Ok(daemon),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                if !message.contains("Address already in use") {
                    resume_unwind(panic);
                }
                last = message;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(last)
}

/// gatekeeper, the proxy and the apps, in one temp dir; all stopped on drop (proxy first).
pub struct Stack {
    proxy: ProxyProcess,
    gatekeeper: Option<Daemon>,
    gatekeeper_dir: PathBuf,
    pub kind: Proxy,
    pub certs: Certs,
    pub apps: Apps,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Certificates, apps, gatekeeper on a picked port, then the proxy pointing at it.
    pub fn start(kind: Proxy, options: Options) -> Stack {
        // Fail on a missing tool before anything starts.
        kind.program();
        curl();
        let dir = tempfile::tempdir().expect("temp dir");
        // nginx's workers run as `nobody` when the tests run as root; let them reach their
        // temp paths.
        let _ = std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let certs = Certs::make(&dir.path().join("certs"));
        let apps = Apps {
            home_assistant: App::start(home_assistant),
            immich: App::start(immich),
            nextcloud: App::start(nextcloud),
        };
        let gatekeeper_dir = dir.path().join("gatekeeper");
        std::fs::create_dir_all(&gatekeeper_dir).expect("gatekeeper dir");
        let mut started = Err(String::new());
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(
                gatekeeper_dir.join("gatekeeper.yaml"),
                policy(port, &apps, options),
            )
            .expect("write policy");
            started = start_gatekeeper(&gatekeeper_dir, 1).map(|d| (d, port));
            if started.is_ok() {
                break;
            }
        }
        let (gatekeeper, port) =
            started.unwrap_or_else(|log| panic!("gatekeeper found no free port:\n{log}"));
        let proxy = ProxyProcess::start(kind, dir.path(), &certs, port, &apps);
        Stack {
            proxy,
            gatekeeper: Some(gatekeeper),
            gatekeeper_dir,
            kind,
            certs,
            apps,
            _dir: dir,
        }
    }

    /// GET `path` on `host` as `client`.
    pub fn get(&self, client: Client, host: &str, path: &str) -> Reply {
        self.get_with(client, host, path, &[])
    }

    /// [`Stack::get`] with extra curl arguments (headers; `--data` makes it a POST).
    pub fn get_with(&self, client: Client, host: &str, path: &str, extra: &[&str]) -> Reply {
        curl_get(&self.certs, self.proxy.https, client, host, path, extra)
    }

    /// GET and assert the status; the failure shows both logs.
    pub fn expect(&self, client: Client, host: &str, path: &str, status: u16) -> Reply {
        self.expect_with(client, host, path, &[], status)
    }

    /// [`Stack::expect`] with extra curl arguments.
    pub fn expect_with(
        &self,
        client: Client,
        host: &str,
        path: &str,
        extra: &[&str],
        status: u16,
    ) -> Reply {
        let reply = self.get_with(client, host, path, extra);
        if reply.status != status {
            panic!(
                "{:?}: {} GET https://{host}{path} {extra:?}: want {status}, got {reply:?}\n{}",
                self.kind,
                client.ip,
                self.logs()
            );
        }
        reply
    }

    /// Poll until `client` gets `status` (for effects that arrive asynchronously, such as
    /// nginx's mirror, or on time, such as expiry).
    pub fn wait_status(
        &self,
        client: Client,
        host: &str,
        path: &str,
        status: u16,
        timeout: Duration,
    ) -> Reply {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.get(client, host, path);
            if reply.status == status {
                return reply;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{:?}: {} GET https://{host}{path}: still {reply:?} after {timeout:?}, \
                     want {status}\n{}",
                    self.kind,
                    client.ip,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(source, network)` of every entry in gatekeeper's state file (none before it exists).
    pub fn grants(&self) -> BTreeSet<(String, String)> {
        let path = self.gatekeeper_dir.join("data/state.json");
        if !path.exists() {
            return BTreeSet::new();
        }
        read_state(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|e| (e.source, e.network))
            .collect()
    }

    /// Wait until the state file holds exactly `want` (its writes trail mirror grants).
    pub fn wait_grants(&self, want: &[(&str, Client)]) {
        let want: BTreeSet<(String, String)> = want
            .iter()
            .map(|(source, client)| (source.to_string(), client.network()))
            .collect();
        wait_for("the state file's grants", SOON, || {
            let got = self.grants();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}, want {want:?}\n{}", self.logs()))
            }
        });
    }

    /// The identity on `client`'s entry from `source` in the state file, once there is one
    /// (`None` for an entry without an identity); waits up to [`SOON`] for the entry.
    pub fn wait_identity(&self, source: &str, client: Client) -> Option<String> {
        let path = self.gatekeeper_dir.join("data/state.json");
        let network = client.network();
        wait_for(&format!("{source}'s entry for {network}"), SOON, || {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let state: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("state file is not JSON ({e}):\n{text}"));
            let entries = state["entries"]
                .as_array()
                .unwrap_or_else(|| panic!("state file has no entries list:\n{text}"));
            let entry = entries
                .iter()
                .find(|e| e["source"] == source && e["network"] == network.as_str())
                .ok_or_else(|| format!("{text}\n{}", self.logs()))?;
            Ok(match &entry["identity"] {
                serde_json::Value::Null => None,
                serde_json::Value::String(id) => Some(id.clone()),
                other => panic!("entry with a non-string identity {other}:\n{text}"),
            })
        })
    }

    /// kill -9 gatekeeper.
    pub fn kill_gatekeeper(&mut self) {
        let mut daemon = self.gatekeeper.take().expect("gatekeeper is running");
        daemon.kill9();
    }

    /// SIGTERM gatekeeper and wait for it to exit 0.
    pub fn terminate_gatekeeper(&mut self) {
        let mut daemon = self.gatekeeper.take().expect("gatekeeper is running");
        let (status, log) = daemon.terminate();
        assert!(status.success(), "gatekeeper exited with {status}:\n{log}");
    }

    /// Start gatekeeper again on the same port (the proxy's config names it).
    pub fn restart_gatekeeper(&mut self) {
        assert!(self.gatekeeper.is_none(), "gatekeeper is still running");
        let daemon = start_gatekeeper(&self.gatekeeper_dir, 20)
            .unwrap_or_else(|log| panic!("gatekeeper cannot get its port back:\n{log}"));
        self.gatekeeper = Some(daemon);
    }

    /// The tails of gatekeeper's and the proxy's logs.
    pub fn logs(&self) -> String {
        let gatekeeper = self
            .gatekeeper
            .as_ref()
            .map(Daemon::log)
            .unwrap_or_default();
        format!(
            "--- gatekeeper ---\n{}\n--- {:?} ---\n{}",
            tail(&gatekeeper, 30),
            self.kind,
            tail(&self.proxy.log(), 40)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The flows, the same for every proxy
// ---------------------------------------------------------------------------------------------

/// The scenarios, each on a fresh [`Stack`].
pub mod flows {
    use super::*;

    /// Enough for anything asynchronous (nginx's mirror, a state file write): the harness's
    /// liveness deadline, no bound on the machine's speed.
    const ASYNC: Duration = SOON;

    fn assert_body(reply: &Reply, want: &str) {
        assert_eq!(reply.body, want, "{reply:?}");
    }

    /// The phone passes the certificate check on Home Assistant and so reaches Immich (what the
    /// mirror source unlocks) but not Nextcloud.
    pub fn phone_with_certificate_reaches_what_its_source_unlocks(proxy: Proxy) {
        let stack = Stack::start(proxy, Options::default());
        stack.expect(PHONE, PHOTOS, "/", 403);

        // A POST with a body (nginx mirrors it without the body, Caddy asks with a GET), and a
        // forwarding header of the phone's own, which must not decide who is granted.
        let extra = [
            "--data",
            r#"{"entity_id":"light.porch"}"#,
            "-H",
            "X-Forwarded-For: 203.0.113.9",
        ];
        let reply = stack.expect_with(PHONE, HA, "/api/services/light/turn_on", &extra, 200);
        assert_body(&reply, "home-assistant /api/services/light/turn_on");

        let reply = stack.wait_status(PHONE, PHOTOS, "/photos/1", 200, ASYNC);
        assert_body(&reply, "immich /photos/1");
        stack.expect(PHONE, CLOUD, "/", 403);
        stack.wait_grants(&[("home-assistant", PHONE)]);
    }

    /// The subject of the certificate that passed the trusted site's check reaches gatekeeper
    /// through the proxy and ends up on the entry as its identity, and an `identities` rule
    /// narrows what that identity unlocks: alice (the phone and the laptop) reaches Immich only,
    /// bob, with no rule, everything the source unlocks. A subject header the client sends itself
    /// decides nothing.
    pub fn certificate_subject_is_the_identity_and_a_rule_narrows_it(proxy: Proxy) {
        let stack = Stack::start(
            proxy,
            Options {
                mirror_unlocks: "[immich, nextcloud]",
                identities: Some(r#"{ "CN=alice": [immich] }"#),
                ..Options::default()
            },
        );
        let source = "home-assistant";

        stack.expect(PHONE, HA, "/", 200);
        stack.wait_status(PHONE, PHOTOS, "/", 200, ASYNC);
        stack.expect(PHONE, CLOUD, "/", 403);
        assert_eq!(
            stack.wait_identity(source, PHONE).as_deref(),
            Some("alice"),
            "{}",
            stack.logs()
        );

        stack.expect(BOB, HA, "/", 200);
        let reply = stack.wait_status(BOB, PHOTOS, "/", 200, ASYNC);
        assert_body(&reply, "immich /");
        let reply = stack.expect(BOB, CLOUD, "/", 200);
        assert_body(&reply, "nextcloud /");
        assert_eq!(
            stack.wait_identity(source, BOB).as_deref(),
            Some("bob"),
            "{}",
            stack.logs()
        );

        // alice's certificate with bob's subject claimed in the header the proxy sets, twice and
        // in two spellings (HTTP/1.1 keeps the case), from an address never seen before: the
        // entry it makes shows what gatekeeper was told.
        let exact = format!("{SUBJECT_HEADER}: CN=bob");
        let lower = format!("{}: O=Home,CN=bob", SUBJECT_HEADER.to_ascii_lowercase());
        let forged = ["--http1.1", "-H", &exact, "-H", &lower];
        stack.expect_with(LAPTOP, HA, "/", &forged, 200);
        stack.wait_status(LAPTOP, PHOTOS, "/", 200, ASYNC);
        stack.expect(LAPTOP, CLOUD, "/", 403);
        assert_eq!(
            stack.wait_identity(source, LAPTOP).as_deref(),
            Some("alice"),
            "{}",
            stack.logs()
        );

        stack.expect(PHONE, CLOUD, "/", 403);
        stack.wait_grants(&[(source, PHONE), (source, BOB), (source, LAPTOP)]);
    }

    /// A never-seen address gets 403 on every hidden site, whatever forwarding headers it
    /// forges and whichever path it tries.
    pub fn stranger_is_refused_whatever_it_claims(proxy: Proxy) {
        let stack = Stack::start(proxy, Options::default());
        // Someone to impersonate.
        stack.expect(PHONE, HA, "/", 200);
        stack.wait_status(PHONE, PHOTOS, "/", 200, ASYNC);

        stack.expect(STRANGER, PHOTOS, "/", 403);
        stack.expect(STRANGER, CLOUD, "/", 403);
        let forged = [
            "-H",
            "X-Forwarded-For: 127.0.0.2",
            "-H",
            "X-Real-IP: 127.0.0.2",
            "-H",
            "Forwarded: for=127.0.0.2",
        ];
        stack.expect_with(STRANGER, PHOTOS, "/", &forged, 403);
        stack.expect_with(STRANGER, PHOTOS, "/api/assets", &forged, 403);
        // Deeper than a link is no link: judged as the hidden site.
        let deeper = format!("/share/{}/photos/1", known_key());
        stack.expect(STRANGER, PHOTOS, &deeper, 403);
        stack.expect(STRANGER, PHOTOS, "/share/not-a-key", 403);
        // nginx's internal auth locations cannot be called from outside (404); for Caddy they
        // are ordinary paths of the hidden site (403).
        let internal = match proxy {
            Proxy::Nginx => 404,
            Proxy::Caddy => 403,
        };
        for path in ["/_gatekeeper/allow", "/_gatekeeper/share"] {
            stack.expect(STRANGER, PHOTOS, path, internal);
        }
        stack.expect(
            STRANGER,
            HA,
            "/_gatekeeper/mirror",
            proxy.status_without_certificate(),
        );
        stack.wait_grants(&[("home-assistant", PHONE)]);
    }

    /// No certificate, a certificate from another CA, or a session made for another name:
    /// refused by the trusted site and never granted.
    pub fn client_without_a_valid_certificate_is_refused_and_never_granted(proxy: Proxy) {
        let stack = Stack::start(proxy, Options::default());
        let refused = proxy.status_without_certificate();
        stack.expect(NO_CERT, HA, "/", refused);
        stack.expect(FOREIGN_CERT, HA, "/", refused);
        // TLS made for a hidden site (no certificate asked), then a request for the trusted
        // site on that connection: both proxies answer 421 Misdirected Request.
        let host = format!("Host: {HA}");
        stack.expect_with(NO_CERT, PHOTOS, "/", &["-H", &host], 421);

        // Let any grant those requests could have caused land: a real one that comes after.
        stack.expect(PHONE, HA, "/", 200);
        stack.wait_status(PHONE, PHOTOS, "/", 200, ASYNC);
        for client in [NO_CERT, FOREIGN_CERT] {
            stack.expect(client, PHOTOS, "/", 403);
            stack.expect(client, CLOUD, "/", 403);
        }
        stack.wait_grants(&[("home-assistant", PHONE)]);
    }

    /// A valid share link opens its own app at once, and only that app.
    pub fn share_link_opens_only_the_sharing_app(proxy: Proxy) {
        let stack = Stack::start(proxy, Options::default());
        let link = format!("/share/{}", known_key());
        let reply = stack.expect(VIEWER, PHOTOS, &link, 200);
        assert_body(&reply, &format!("immich {link}"));
        // No waiting: the grant is in force when the link's answer arrives.
        let reply = stack.expect(VIEWER, PHOTOS, "/api/shared-links/me", 200);
        assert_body(&reply, "immich /api/shared-links/me");
        stack.expect(VIEWER, PHOTOS, &format!("{link}/photos/1"), 200);
        stack.expect(VIEWER, CLOUD, "/", 403);
        stack.expect(VIEWER, HA, "/", proxy.status_without_certificate());

        let link = format!("/s/{KNOWN_TOKEN}");
        let reply = stack.expect(CLOUD_VIEWER, CLOUD, &link, 200);
        assert_body(&reply, &format!("nextcloud {link}"));
        stack.expect(CLOUD_VIEWER, CLOUD, "/index.php/apps/files", 200);
        stack.expect(CLOUD_VIEWER, PHOTOS, "/", 403);

        stack.wait_grants(&[("immich-share", VIEWER), ("nextcloud-share", CLOUD_VIEWER)]);
    }

    /// A link the app does not know: 403, and the guesser is granted nothing.
    pub fn invalid_share_link_is_refused_and_grants_nothing(proxy: Proxy) {
        let stack = Stack::start(proxy, Options::default());
        stack.expect(GUESSER, PHOTOS, &format!("/share/{}", unknown_key()), 403);
        stack.expect(GUESSER, CLOUD, &format!("/s/{UNKNOWN_TOKEN}"), 403);
        stack.expect(GUESSER, PHOTOS, "/", 403);
        stack.expect(GUESSER, CLOUD, "/", 403);
        stack.wait_grants(&[]);
    }

    /// gatekeeper's 503 (the app did not answer the check) and 429 (too many bad links) reach
    /// the client as such, through nginx's auth_request too.
    pub fn share_check_503_and_429_reach_the_client(proxy: Proxy) {
        let stack = Stack::start(
            proxy,
            Options {
                max_failures: 2,
                ..Options::default()
            },
        );
        let dropped = format!("/share/{}", dropped_key());
        stack.expect(VIEWER, PHOTOS, &dropped, 503);
        stack.expect(VIEWER, PHOTOS, "/", 403);

        let unknown = format!("/share/{}", unknown_key());
        stack.expect(GUESSER, PHOTOS, &unknown, 403);
        stack.expect(GUESSER, PHOTOS, &unknown, 403);
        // Banned now: even a valid link is not checked.
        stack.expect(GUESSER, PHOTOS, &format!("/share/{}", known_key()), 429);
        stack.expect(GUESSER, PHOTOS, "/", 403);

        // An unreachable app is not the viewer's fault: no ban for it.
        stack.expect(VIEWER, PHOTOS, &format!("/share/{}", known_key()), 200);
        stack.wait_grants(&[("immich-share", VIEWER)]);
    }

    /// With `idle_ttl: 2s`, access ends about 2 s after the last trust signal, with no request
    /// needed; the next certificate visit opens it again.
    pub fn access_expires_after_idle_ttl(proxy: Proxy) {
        let idle = Duration::from_secs(2);
        let stack = Stack::start(
            proxy,
            Options {
                idle_ttl: "2s",
                ..Options::default()
            },
        );
        // Both grants are made and seen to work within one idle_ttl of their trust signals. A
        // round that takes longer (a slow machine) cannot tell expiry from slowness: it is
        // repeated, fresh signals refreshing both grants, rather than failed. Grants that never
        // work fail after PATIENCE (a liveness bound).
        let signalled = wait_for("a round of grants seen within idle_ttl", PATIENCE, || {
            let signalled = Instant::now();
            stack.expect(PHONE, HA, "/", 200);
            stack.expect(VIEWER, PHOTOS, &format!("/share/{}", known_key()), 200);
            // nginx's mirror is asynchronous: poll for the phone's grant within the TTL.
            let phone = loop {
                let status = stack.get(PHONE, PHOTOS, "/").status;
                if status == 200 || signalled.elapsed() >= idle {
                    break status;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let viewer = stack.get(VIEWER, PHOTOS, "/").status;
            let took = signalled.elapsed();
            if phone == 200 && viewer == 200 && took < idle {
                Ok(signalled)
            } else {
                Err(format!(
                    "phone {phone}, viewer {viewer}, {took:?} after the signals\n{}",
                    stack.logs()
                ))
            }
        });

        // Asking /allow is no trust signal: polling does not keep the grants alive.
        stack.wait_status(PHONE, PHOTOS, "/", 403, idle + ASYNC);
        let expired = signalled.elapsed();
        stack.wait_status(VIEWER, PHOTOS, "/", 403, ASYNC);
        assert!(
            expired >= idle - Duration::from_millis(100),
            "expired after {expired:?}, before idle_ttl"
        );
        stack.wait_grants(&[]);

        stack.expect(PHONE, HA, "/", 200);
        stack.wait_status(PHONE, PHOTOS, "/", 200, ASYNC);
    }

    /// Grants survive kill -9 (one acknowledged a moment before) and SIGTERM; gatekeeper comes
    /// back on the same port and the proxy, unchanged, reaches it at once. While it is down the
    /// hidden sites fail closed and the trusted site still works.
    pub fn gatekeeper_restart_keeps_access(proxy: Proxy) {
        let mut stack = Stack::start(proxy, Options::default());
        stack.expect(PHONE, HA, "/", 200);
        stack.wait_status(PHONE, PHOTOS, "/", 200, ASYNC);
        // Mirror grants are written shortly after; share grants before their 200.
        stack.wait_grants(&[("home-assistant", PHONE)]);
        stack.expect(VIEWER, PHOTOS, &format!("/share/{}", known_key()), 200);
        stack.kill_gatekeeper();

        let down = proxy.status_while_gatekeeper_down();
        stack.expect(PHONE, PHOTOS, "/", down);
        stack.expect(VIEWER, PHOTOS, "/", down);
        let reply = stack.expect(PHONE, HA, "/while-down", 200);
        assert_body(&reply, "home-assistant /while-down");

        stack.restart_gatekeeper();
        // No polling: gatekeeper listens, so the first answer must be right.
        stack.expect(PHONE, PHOTOS, "/", 200);
        stack.expect(VIEWER, PHOTOS, "/", 200);
        stack.expect(STRANGER, PHOTOS, "/", 403);
        stack.expect(PHONE, CLOUD, "/", 403);

        // SIGTERM, and straight back: the proxy's kept-alive connections to the old process are
        // dead, and the first request must not trip over them.
        stack.terminate_gatekeeper();
        stack.restart_gatekeeper();
        stack.expect(PHONE, PHOTOS, "/", 200);
        stack.expect(VIEWER, PHOTOS, "/", 200);
        stack.wait_grants(&[("home-assistant", PHONE), ("immich-share", VIEWER)]);
    }
}

/// One `#[test]` per flow of [`flows`] for `$proxy`, so every proxy runs the same list. (Only the
/// end-to-end binaries use it.)
#[allow(unused_macros)]
macro_rules! flow_tests {
    ($proxy:expr) => {
        $crate::common::proxies::flow_tests!(
            $proxy;
            phone_with_certificate_reaches_what_its_source_unlocks,
            certificate_subject_is_the_identity_and_a_rule_narrows_it,
            stranger_is_refused_whatever_it_claims,
            client_without_a_valid_certificate_is_refused_and_never_granted,
            share_link_opens_only_the_sharing_app,
            invalid_share_link_is_refused_and_grants_nothing,
            share_check_503_and_429_reach_the_client,
            access_expires_after_idle_ttl,
            gatekeeper_restart_keeps_access
        );
    };
    ($proxy:expr; $($flow:ident),*) => {
        $(
            #[test]
            fn $flow() {
                $crate::common::proxies::flows::$flow($proxy);
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use flow_tests;
