//! Every snippet `gatekeeper labels` prints, pasted into the real proxy and exercised. The test
//! takes the printed text, fills its `<placeholders>` from a small table (one left unfilled fails
//! the test), loads it into real nginx, Caddy or Traefik 3.7 in front of the real gatekeeper and
//! stand-in apps, and drives it: the mirror grants a client with a certificate, a protected site
//! answers 200 to it and 403 to a stranger, both link shapes of a share source open the app, a
//! made-up link does not, and a certificate subject the client sends itself is not believed.
//! Traefik v2 snippets (no v2 binary here) are checked against Traefik v2's JSON schema and
//! their rules loaded with `ruleSyntax: v2` in Traefik 3.7.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::proxies::{Certs, INSTALL_HINT, tool};
use common::traefik::{Traefik, labels_to_dynamic, merge, web_with};
use common::upstream::{Mode, Reply as AppReply, StandIn, yaml_to_json};
use common::{Daemon, POLL, SOON, free_port, run, wait_for};
use serde_json::{Value, json};

/// The trusted site (client certificate required; its traffic is the mirror source).
const HA: &str = "ha.test";
/// Immich: links at `/share/<key>` and `/s/<slug>`.
const PHOTOS: &str = "photos.test";
/// Nextcloud: links at `/s/<token>`.
const CLOUD: &str = "cloud.test";

/// The owner's phone: certificate `CN=alice`, which `identities` narrows to Immich.
const PHONE: &str = "127.0.0.2";
/// Never seen before.
const STRANGER: &str = "127.0.0.3";
/// Holds an Immich key link.
const VIEWER: &str = "127.0.0.6";
/// Holds an Immich slug link (the second pattern).
const SLUG_VIEWER: &str = "127.0.0.7";
/// Tries made-up links.
const GUESSER: &str = "127.0.0.8";
/// Holds a Nextcloud link.
const CLOUD_VIEWER: &str = "127.0.0.9";

const SLUG: &str = "summer-2024";
const TOKEN: &str = "Kn0wnT0ken12345";

/// An Immich key (67 characters) starting with `tag`.
fn key(tag: &str) -> String {
    format!("{tag:-<67}")
}

/// Enough for anything asynchronous (a mirrored request, a Traefik reload).
const ASYNC: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The policy, the apps, gatekeeper
// ---------------------------------------------------------------------------------------------

/// The stand-in apps.
struct Apps {
    home_assistant: StandIn,
    immich: StandIn,
    nextcloud: StandIn,
}

impl Apps {
    fn start() -> Apps {
        Apps {
            home_assistant: StandIn::start(Mode::Answer, |hit| AppReply {
                status: 200,
                content_type: "text/plain",
                body: format!("home-assistant {}", hit.target),
                location: None,
            }),
            immich: StandIn::immich(&[&key("known")], &[SLUG], Mode::Answer),
            nextcloud: StandIn::nextcloud(&[TOKEN], Mode::Answer),
        }
    }
}

/// A mirror source whose certificate identities narrow what it unlocks, an Immich share source
/// with two link shapes (the README's), a Nextcloud one; `traefik` is the policy's `traefik:`.
fn policy(apps: &Apps, traefik: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
state_file: ./data/state.json
trusted_proxies: [127.0.0.1/32]
always_allow: []
traefik: {traefik}
services: {{ immich: {{}}, nextcloud: {{}} }}
sources:
  home-assistant:
    kind: mirror
    hosts: [{HA}]
    unlocks: [immich, nextcloud]
    identity_header: X-Client-Subject
    identities: {{ \"CN=alice\": [immich] }}
  immich-share:
    kind: share
    upstream: {immich}
    patterns:
      - path: '^/share/(?P<key>[A-Za-z0-9_-]{{67}})$'
        check: '/api/shared-links/me?key={{key}}'
      - path: '^/s/(?P<slug>[A-Za-z0-9_-]+)$'
        check: '/api/shared-links/me?slug={{slug}}'
    unlocks: [immich]
  nextcloud-share:
    kind: share
    upstream: {nextcloud}
    path: '^/s/[A-Za-z0-9]{{15}}$'
    unlocks: [nextcloud]
",
        immich = apps.immich.origin(),
        nextcloud = apps.nextcloud.origin(),
    )
}

/// gatekeeper on `policy` in a temp dir of its own.
struct Gatekeeper {
    dir: tempfile::TempDir,
    daemon: Daemon,
}

impl Gatekeeper {
    fn start(policy: &str) -> Gatekeeper {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("gatekeeper.yaml"), policy).expect("write policy");
        let daemon = Daemon::start(dir.path(), &["--config", "gatekeeper.yaml"], &[]);
        Gatekeeper { dir, daemon }
    }

    /// How the proxies reach it: by name, as in a real deployment (`gatekeeper:5000`), so a
    /// snippet that needs a `resolver` fails here too.
    fn url(&self) -> String {
        format!("http://localhost:{}", self.daemon.addr.port())
    }

    /// `gatekeeper labels --proxy <proxy> --url <url>`.
    fn labels(&self, proxy: &str) -> String {
        let (status, out, err) = run(
            self.dir.path(),
            &[
                "labels",
                "--config",
                "gatekeeper.yaml",
                "--url",
                &self.url(),
                "--proxy",
                proxy,
            ],
            &[],
        );
        assert!(status.success(), "labels --proxy {proxy}: {status}\n{err}");
        out
    }

    /// The identity on `client`'s entry from the mirror source, once there is that entry.
    fn identity(&self, client: &str) -> Option<String> {
        let path = self.dir.path().join("data/state.json");
        let network = format!("{client}/32");
        wait_for(&format!("the mirror entry of {client}"), SOON, || {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let state: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let entry = state["entries"]
                .as_array()
                .and_then(|es| {
                    es.iter().find(|e| {
                        e["source"] == "home-assistant" && e["network"] == network.as_str()
                    })
                })
                .ok_or_else(|| text.clone())?;
            Ok(entry["identity"].as_str().map(str::to_string))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Placeholders
// ---------------------------------------------------------------------------------------------

/// `text` with every `(placeholder, value)` of `table` filled in; panics naming any `<...>`
/// placeholder left outside comments (a regex's own `(?P<name>` is not one).
fn fill(text: &str, table: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (placeholder, value) in table {
        out = out.replace(placeholder, value);
    }
    let placeholder = regex::Regex::new(r"(?:^|[^P?])(<[A-Za-z][^<>\n]*>)").unwrap();
    let left: Vec<String> = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| placeholder.captures_iter(l).map(|c| c[1].to_string()))
        .collect();
    assert!(
        left.is_empty(),
        "placeholders the test does not fill: {left:?} in\n{out}"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// curl `https://host:port/path` from `client` (a loopback address), checking the server
/// against the test CA, with alice's certificate when `cert`; extra arguments as they are.
/// Status 0: no HTTP answer.
fn curl(
    certs: &Certs,
    port: u16,
    client: &str,
    cert: bool,
    host: &str,
    path: &str,
    extra: &[&str],
) -> (u16, String) {
    let mut cmd = Command::new(tool("curl", "apt-get install -y curl"));
    cmd.args(["-q", "--silent", "--show-error", "--max-time", "10"])
        .args(["--noproxy", "*", "--interface", client])
        .arg("--cacert")
        .arg(&certs.ca)
        .args(["--output", "-", "--write-out", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"));
    if cert {
        cmd.arg("--cert")
            .arg(&certs.client_cert)
            .arg("--key")
            .arg(&certs.client_key);
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
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A proxy process (nginx or Caddy) serving HTTPS on `https`; stopped on drop.
struct ProxyProcess {
    name: &'static str,
    child: Child,
    https: u16,
    log: PathBuf,
    config: String,
}

impl ProxyProcess {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, String)],
        https: u16,
        config: String,
    ) -> ProxyProcess {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("proxy log");
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        ProxyProcess {
            name,
            child,
            https,
            log,
            config,
        }
    }

    /// Wait until it listens on its port (nginx and Caddy bind once their configuration is
    /// loaded, certificates included).
    fn ready(mut self) -> ProxyProcess {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited with {status} on the printed snippets:\n{}\n--- config ---\n{}",
                    self.name,
                    self.log(),
                    self.config
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.https)).is_ok() {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen within {SOON:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // SIGTERM: SIGKILL on nginx's master would leave its worker running.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
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

/// The proxy, gatekeeper and the apps of one test.
struct Stack {
    proxy: ProxyProcess,
    gk: Gatekeeper,
    certs: Certs,
    _apps: Apps,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn get(&self, client: &str, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
        let cert = client == PHONE;
        curl(
            &self.certs,
            self.proxy.https,
            client,
            cert,
            host,
            path,
            extra,
        )
    }

    fn logs(&self) -> String {
        format!(
            "--- gatekeeper ---\n{}\n--- {} ---\n{}\n--- config ---\n{}",
            self.gk.daemon.log(),
            self.proxy.name,
            self.proxy.log(),
            self.proxy.config
        )
    }

    fn expect(&self, client: &str, host: &str, path: &str, extra: &[&str], want: u16) -> String {
        let (status, body) = self.get(client, host, path, extra);
        assert_eq!(
            status,
            want,
            "{client} GET https://{host}{path} {extra:?}: {body}\n{}",
            self.logs()
        );
        body
    }

    fn wait_status(&self, client: &str, host: &str, path: &str, want: u16) {
        let deadline = Instant::now() + ASYNC;
        loop {
            let (status, body) = self.get(client, host, path, &[]);
            if status == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{client} GET https://{host}{path}: still {status} {body} after {ASYNC:?}, \
                 want {want}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The flows every printed nginx or Caddy configuration must pass.
    fn exercise(&self) {
        // The phone proves trust with alice's certificate and claims bob's subject in the
        // header gatekeeper reads identities from: bob has no rule and would unlock Nextcloud.
        self.expect(STRANGER, PHOTOS, "/", &[], 403);
        let forged = ["--http1.1", "-H", "X-Client-Subject: CN=bob"];
        self.expect(PHONE, HA, "/", &forged, 200);
        self.wait_status(PHONE, PHOTOS, "/photos/1", 200);
        assert_eq!(
            self.gk.identity(PHONE).as_deref(),
            Some("alice"),
            "{}",
            self.logs()
        );
        self.expect(PHONE, CLOUD, "/", &[], 403);

        self.expect(STRANGER, PHOTOS, "/", &[], 403);
        self.expect(STRANGER, CLOUD, "/", &[], 403);
        // Deeper than a link is no link: judged as the protected site.
        self.expect(
            STRANGER,
            PHOTOS,
            &format!("/share/{}/photos", key("known")),
            &[],
            403,
        );

        // Both link shapes of the Immich share source, and Nextcloud's.
        self.expect(
            VIEWER,
            PHOTOS,
            &format!("/share/{}", key("known")),
            &[],
            200,
        );
        self.expect(VIEWER, PHOTOS, "/photos/1", &[], 200);
        self.expect(VIEWER, CLOUD, "/", &[], 403);
        self.expect(SLUG_VIEWER, PHOTOS, &format!("/s/{SLUG}"), &[], 200);
        self.expect(SLUG_VIEWER, PHOTOS, "/photos/1", &[], 200);
        self.expect(CLOUD_VIEWER, CLOUD, &format!("/s/{TOKEN}"), &[], 200);
        // Past gatekeeper: the stand-in Nextcloud's own 404 for what is not a share.
        let body = self.expect(CLOUD_VIEWER, CLOUD, "/index.php", &[], 404);
        assert!(body.contains("Nextcloud"), "{body}");
        self.expect(CLOUD_VIEWER, PHOTOS, "/", &[], 403);

        self.expect(
            GUESSER,
            PHOTOS,
            &format!("/share/{}", key("made-up")),
            &[],
            403,
        );
        self.expect(GUESSER, PHOTOS, "/s/made-up", &[], 403);
        self.expect(GUESSER, CLOUD, "/s/Unkn0wnT0ken123", &[], 403);
        self.expect(GUESSER, PHOTOS, "/", &[], 403);
    }
}

/// The placeholders every nginx and Caddy snippet may use, for this stack. `origin` turns an app
/// into what the proxy's upstream directive takes.
fn table(
    certs: &Certs,
    apps: &Apps,
    origin: impl Fn(&StandIn) -> String,
) -> Vec<(&'static str, String)> {
    let path = |p: &Path| p.display().to_string();
    vec![
        ("<cert>", path(&certs.server_cert)),
        ("<key>", path(&certs.server_key)),
        ("<ca.pem>", path(&certs.ca)),
        ("<the trusted service>", origin(&apps.home_assistant)),
        ("<the immich service>", origin(&apps.immich)),
        ("<the nextcloud service>", origin(&apps.nextcloud)),
        ("<immich host>", PHOTOS.to_string()),
        ("<nextcloud host>", CLOUD.to_string()),
    ]
}

/// The printed text (its opening comment, then one part per site: a header comment at the
/// start of a line after a blank one, and the block) with only the sites `keep` accepts.
fn sites(printed: &str, keep: impl Fn(&str) -> bool) -> String {
    let mut parts = printed.split("\n\n# ");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts.map(|p| format!("# {p}")).filter(|p| keep(p)) {
        out.push_str("\n\n");
        out.push_str(&part);
    }
    out.push('\n');
    out
}

/// gatekeeper, the apps and `proxy` running every printed site; with `mirror_only`, the trusted
/// site alone, as pasted by someone who puts only Home Assistant behind this proxy.
fn start_stack(proxy: &str, mirror_only: bool) -> Stack {
    let dir = tempfile::tempdir().expect("temp dir");
    // nginx's worker runs as `nobody` when the tests run as root.
    let _ = std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    let certs = Certs::make(&dir.path().join("certs"));
    let apps = Apps::start();
    let gk = Gatekeeper::start(&policy(&apps, "{ propagation_delay: 0s }"));
    let printed = sites(&gk.labels(proxy), |site| {
        !mirror_only || site.starts_with("# Mirror source")
    });
    let https = free_port();
    let process = match proxy {
        "nginx" => {
            let mut table = table(&certs, &apps, StandIn::origin);
            table.push(("listen 443 ssl;", format!("listen {https} ssl;")));
            let snippet = fill(&printed, &table);
            spawn_nginx(dir.path(), &snippet, https)
        }
        "caddy" => {
            let table = table(&certs, &apps, |app| app.addr.to_string());
            let snippet = fill(&printed, &table);
            spawn_caddy(dir.path(), &snippet, https)
        }
        other => panic!("no such proxy {other}"),
    };
    Stack {
        proxy: process.ready(),
        gk,
        certs,
        _apps: apps,
        _dir: dir,
    }
}

/// The printed snippet inside `http { }` of an nginx.conf that holds only process settings.
fn spawn_nginx(dir: &Path, snippet: &str, https: u16) -> ProxyProcess {
    let dir = dir.join("nginx");
    std::fs::create_dir_all(&dir).expect("nginx dir");
    std::fs::write(dir.join("labels.conf"), snippet).expect("write snippet");
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr notice;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n    access_log {d}/access.log;\n\
         \x20   include {d}/labels.conf;\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, &conf).expect("write nginx.conf");
    let prefix = format!("{d}/");
    let path = path.display().to_string();
    let args = [
        "-e",
        "stderr",
        "-p",
        &prefix,
        "-c",
        &path,
        "-g",
        "daemon off;",
    ];
    let program = tool("nginx", INSTALL_HINT);
    ProxyProcess::spawn("nginx", &program, &args, &dir, &[], https, snippet.into())
}

/// The printed snippet after global options that set the test's ports and turn the admin
/// endpoint off.
fn spawn_caddy(dir: &Path, snippet: &str, https: u16) -> ProxyProcess {
    let dir = dir.join("caddy");
    std::fs::create_dir_all(&dir).expect("caddy dir");
    let caddyfile = format!(
        "{{\n\tadmin off\n\thttp_port {}\n\thttps_port {https}\n}}\n\n{snippet}",
        free_port()
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, &caddyfile).expect("write Caddyfile");
    let d = dir.display();
    let env = [
        ("HOME", format!("{d}/home")),
        ("XDG_DATA_HOME", format!("{d}/data")),
        ("XDG_CONFIG_HOME", format!("{d}/config")),
    ];
    let path = path.display().to_string();
    let args = ["run", "--config", &path, "--adapter", "caddyfile"];
    let program = tool("caddy", INSTALL_HINT);
    ProxyProcess::spawn("caddy", &program, &args, &dir, &env, https, caddyfile)
}

impl Stack {
    /// The trusted site on its own: the phone is granted, as alice whatever it claims.
    fn exercise_mirror_alone(&self) {
        let forged = ["--http1.1", "-H", "X-Client-Subject: CN=bob"];
        self.expect(PHONE, HA, "/", &forged, 200);
        assert_eq!(
            self.gk.identity(PHONE).as_deref(),
            Some("alice"),
            "{}",
            self.logs()
        );
    }
}

#[test]
fn nginx_snippets_pasted_into_nginx_grant_decide_and_check_links() {
    start_stack("nginx", false).exercise();
}

/// The mirror must reach gatekeeper with no other site naming it: nginx resolves a name in a
/// `proxy_pass` that holds a variable at request time, with a `resolver` only (unless a static
/// `proxy_pass` elsewhere made an upstream of the same name), and silently grants nobody.
#[test]
fn nginx_trusted_site_alone_grants() {
    start_stack("nginx", true).exercise_mirror_alone();
}

#[test]
fn caddy_snippets_pasted_into_caddy_grant_decide_and_check_links() {
    start_stack("caddy", false).exercise();
}

#[test]
fn caddy_trusted_site_alone_grants() {
    start_stack("caddy", true).exercise_mirror_alone();
}

// ---------------------------------------------------------------------------------------------
// Traefik
// ---------------------------------------------------------------------------------------------

/// What `labels --proxy traefik` printed, in parts: the Docker labels of each section (as
/// Compose would hand them to Docker) and the file-provider YAML snippets.
struct TraefikSnippets {
    /// The Docker labels, placeholders filled and `$$` read as Compose reads it.
    labels: Vec<String>,
    /// File-provider YAML (`http:` documents), placeholders filled.
    files: Vec<String>,
}

/// Split the printed text into sections at `# N.` headers, fill each section's placeholders
/// (the share sections name their own router and app host), and take out the labels and the
/// file snippets. Compose's `$$` is unescaped after asserting there is no single `$`.
fn traefik_snippets(printed: &str) -> TraefikSnippets {
    let mut sections: Vec<String> = Vec::new();
    for line in printed.lines() {
        let header = line.len() > 3
            && line.starts_with("# ")
            && line[2..].starts_with(|c: char| c.is_ascii_digit())
            && line[3..].starts_with(". ");
        if header || sections.is_empty() {
            sections.push(String::new());
        }
        let last = sections.last_mut().unwrap();
        last.push_str(line);
        last.push('\n');
    }
    let dollars = regex::Regex::new(r"\$\$|\$").unwrap();
    let mut labels = Vec::new();
    let mut files = Vec::new();
    for section in sections {
        let mut table: Vec<(&str, String)> = vec![
            ("<immich router>", "immich".into()),
            ("<nextcloud router>", "nextcloud".into()),
            ("<the trusted service>", "ha".into()),
        ];
        for (source, router, host) in [
            ("immich-share", "immich-link", PHOTOS),
            ("nextcloud-share", "nextcloud-link", CLOUD),
        ] {
            if section.starts_with(&format!("# 3. Share source `{source}`")) {
                table.push(("<share router>", router.into()));
                table.push(("<app host>", host.into()));
            }
        }
        let section = fill(&section, &table);
        // A YAML document starts at a line `http:` and runs to the next blank line.
        let mut file: Option<String> = None;
        for line in section.lines() {
            if line == "http:" {
                file = Some(String::new());
            }
            if let Some(f) = file.as_mut() {
                if line.trim().is_empty() {
                    files.push(file.take().unwrap());
                    continue;
                }
                f.push_str(line);
                f.push('\n');
                continue;
            }
            let Some(label) = line.trim().strip_prefix("- \"") else {
                continue;
            };
            let label = label.strip_suffix('"').expect("a label ends with `\"`");
            // Compose reads `$` as the start of a variable: a literal one is `$$`.
            assert!(
                dollars.find_iter(label).all(|m| m.as_str() == "$$"),
                "a single `$` in a label, which Docker Compose rejects: {label}"
            );
            labels.push(label.replace("$$", "$"));
        }
        if let Some(f) = file {
            files.push(f);
        }
    }
    TraefikSnippets { labels, files }
}

/// The printed labels and file snippets as one file-provider configuration, with what a user
/// adds themselves: each router's entrypoint, rule and service, and the apps' services.
fn traefik_dynamic(snippets: &TraefikSnippets, apps: &Apps) -> Value {
    let mut dynamic = labels_to_dynamic(&snippets.labels, &BTreeMap::new());
    for file in &snippets.files {
        let part = yaml_to_json(&file.replace("@docker", "@file")).expect("a YAML snippet");
        merge(&mut dynamic, part);
    }
    let server =
        |app: &StandIn| json!({ "loadBalancer": { "servers": [{ "url": app.origin() }] } });
    merge(
        &mut dynamic,
        json!({ "http": {
            "routers": {
                "ha": { "rule": format!("Host(`{HA}`)"), "entryPoints": ["web"],
                        "service": "home-assistant-mirrored@file" },
                "immich": { "rule": format!("Host(`{PHOTOS}`)"), "entryPoints": ["web"],
                            "service": "immich-app" },
                "nextcloud": { "rule": format!("Host(`{CLOUD}`)"), "entryPoints": ["web"],
                               "service": "nextcloud-app" },
                "immich-link": { "entryPoints": ["web"], "service": "immich-app" },
                "nextcloud-link": { "entryPoints": ["web"], "service": "nextcloud-app" },
            },
            "services": {
                "ha": server(&apps.home_assistant),
                "immich-app": server(&apps.immich),
                "nextcloud-app": server(&apps.nextcloud),
            }
        }}),
    );
    dynamic
}

/// A policy whose Traefik file is in `traefik`'s watched directory. `settle` is raised from its
/// default as in tests/traefik.rs: these Traefiks log at DEBUG, which slows every reload.
fn traefik_policy(apps: &Apps, traefik: &Traefik, version: u8) -> String {
    let file = traefik.dynamic().join("gatekeeper.yml");
    policy(
        apps,
        &format!(
            "{{ file: '{}', version: {version}, settle: 500ms }}",
            file.display()
        ),
    )
}

#[test]
fn traefik_v3_labels_and_file_snippets_load_in_traefik_3_7_and_work() {
    let apps = Apps::start();
    let traefik = Traefik::new();
    let gk = Gatekeeper::start(&traefik_policy(&apps, &traefik, 3));
    let printed = gk.labels("traefik");
    let snippets = traefik_snippets(&printed);
    assert!(!snippets.files.is_empty(), "no file snippet in\n{printed}");
    let dynamic = traefik_dynamic(&snippets, &apps);

    // Written before Traefik starts: a write of ours while gatekeeper waits for its grants to be
    // applied would start Traefik's provider throttle behind gatekeeper's back.
    traefik.write_dynamic("labels.yml", &dynamic.to_string());
    let providers = json!({ "file": { "directory": traefik.dynamic(), "watch": true } });
    let traefik = traefik.start(web_with(providers));
    traefik.wait_source_range("gatekeeper-immich@file", "loaded", |_| true);
    for router in ["ha", "immich", "nextcloud", "immich-link", "nextcloud-link"] {
        traefik.wait_router(&format!("{router}@file"));
    }
    let status = |client: &str, host: &str, path: &str| traefik.status("web", host, path, client);

    assert_eq!(status(STRANGER, PHOTOS, "/"), 403);
    // The mirror: Home Assistant answers, and gatekeeper grants the phone.
    assert_eq!(status(PHONE, HA, "/"), 200, "{}", traefik.log_tail(20));
    wait_for("the phone to reach Immich", ASYNC * 2, || {
        match status(PHONE, PHOTOS, "/photos/1") {
            200 => Ok(()),
            other => Err(format!("{other}\n{}", gk.daemon.log())),
        }
    });
    assert_eq!(status(STRANGER, PHOTOS, "/"), 403);
    let deeper = format!("/share/{}/photos", key("known"));
    assert_eq!(status(STRANGER, PHOTOS, &deeper), 403);

    // A share answer waits until gatekeeper expects Traefik to have applied the grant (without
    // traefik.api, a model of Traefik's throttle); under load Traefik may apply it a little
    // later, so what the grant opens is awaited (a liveness bound: this test is about the
    // snippets; tests/traefik.rs and scripts/traefik-bench hold the timing to account).
    let reaches = |client: &str, host: &str, path: &str, want: u16| {
        wait_for(
            &format!("{client} to get {want} for {host}{path}"),
            ASYNC,
            || match status(client, host, path) {
                got if got == want => Ok(()),
                other => Err(format!("{other}\n{}", traefik.log_tail(20))),
            },
        )
    };
    let link = format!("/share/{}", key("known"));
    assert_eq!(status(VIEWER, PHOTOS, &link), 200, "{}", gk.daemon.log());
    reaches(VIEWER, PHOTOS, "/photos/1", 200);
    assert_eq!(
        status(SLUG_VIEWER, PHOTOS, &format!("/s/{SLUG}")),
        200,
        "{}",
        gk.daemon.log()
    );
    reaches(SLUG_VIEWER, PHOTOS, "/photos/1", 200);
    // (Seen once answering 403 in a CI run while Traefik was rebuilding its routers: the logs
    // say which part refused.)
    assert_eq!(
        status(CLOUD_VIEWER, CLOUD, &format!("/s/{TOKEN}")),
        200,
        "{}\n{}",
        gk.daemon.log(),
        traefik.log_tail(40)
    );
    // Past gatekeeper: the stand-in Nextcloud's own 404 for what is not a share.
    reaches(CLOUD_VIEWER, CLOUD, "/index.php", 404);
    let made_up = format!("/share/{}", key("made-up"));
    assert_eq!(status(GUESSER, PHOTOS, &made_up), 403);
    assert_eq!(status(GUESSER, PHOTOS, "/s/made-up"), 403);
    assert_eq!(status(GUESSER, PHOTOS, "/"), 403);
    traefik.assert_no_problems();
}

/// Traefik's JSON schema for the file provider, and every property name it knows by its
/// lower-case spelling.
fn schema(version: u8) -> (jsonschema::Validator, BTreeMap<String, String>) {
    fn collect(v: &Value, names: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(o) => {
                if let Some(Value::Object(props)) = o.get("properties") {
                    for k in props.keys() {
                        names.insert(k.to_ascii_lowercase(), k.clone());
                    }
                }
                o.values().for_each(|v| collect(v, names));
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, names)),
            _ => {}
        }
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../shared/traefik/traefik-v{version}-file-provider.json"
    ));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeMap::new();
    collect(&schema, &mut names);
    let validator = jsonschema::validator_for(&schema).expect("a JSON schema");
    (validator, names)
}

/// Labels as Traefik reads them: keys match case-insensitively, and text values become the
/// booleans and numbers the schema types (the schema itself is strict about both).
fn as_the_schema_spells_it(v: &Value, names: &BTreeMap<String, String>) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let key = names.get(&k.to_ascii_lowercase()).unwrap_or(k).clone();
                    (key, as_the_schema_spells_it(v, names))
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| as_the_schema_spells_it(v, names))
                .collect(),
        ),
        Value::String(s) if s == "true" || s == "false" => json!(s == "true"),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            json!(s.parse::<u64>().unwrap())
        }
        other => other.clone(),
    }
}

/// Keys and matchers Traefik v2 does not have.
const V3_ONLY: &[&str] = &[
    "PathRegexp",
    "mirrorBody",
    "maxResponseBodySize",
    "ipAllowList",
];

#[test]
fn traefik_v2_snippets_validate_against_the_v2_schema_and_their_rules_match_the_links() {
    let apps = Apps::start();
    let traefik = Traefik::new();
    let gk = Gatekeeper::start(&traefik_policy(&apps, &traefik, 2));
    let printed = gk.labels("traefik");
    for line in printed.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let code = line.split(" #").next().unwrap_or(line);
        for key in V3_ONLY {
            assert!(
                !code.contains(key),
                "`{key}` is Traefik v3 only, printed for a v2 policy: {line}"
            );
        }
    }
    let snippets = traefik_snippets(&printed);
    let dynamic = traefik_dynamic(&snippets, &apps);
    let (schema, names) = schema(2);
    let typed = as_the_schema_spells_it(&dynamic, &names);
    let errors: Vec<String> = schema
        .iter_errors(&typed)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}\n{typed:#}");

    // The v2 rules, run by Traefik 3.7's v2 rule parser: exactly the link paths reach
    // gatekeeper's /share (the share routers only: the lists are v2's ipWhiteList).
    let mut links = json!({ "http": {
        "routers": {},
        "middlewares": dynamic["http"]["middlewares"].clone(),
        "services": dynamic["http"]["services"].clone(),
    }});
    for router in ["immich-link", "nextcloud-link"] {
        let mut r = dynamic["http"]["routers"][router].clone();
        r["ruleSyntax"] = json!("v2");
        links["http"]["routers"][router] = r;
    }
    traefik.write_dynamic("links.yml", &links.to_string());
    let providers = json!({ "file": { "directory": traefik.dynamic(), "watch": true } });
    let traefik = traefik.start(web_with(providers));
    traefik.wait_router("immich-link@file");
    traefik.wait_router("nextcloud-link@file");
    let status = |client: &str, host: &str, path: &str| traefik.status("web", host, path, client);
    assert_eq!(
        status(VIEWER, PHOTOS, &format!("/share/{}", key("known"))),
        200
    );
    assert_eq!(status(SLUG_VIEWER, PHOTOS, &format!("/s/{SLUG}")), 200);
    assert_eq!(status(CLOUD_VIEWER, CLOUD, &format!("/s/{TOKEN}")), 200);
    assert_eq!(status(GUESSER, PHOTOS, "/s/made-up"), 403);
    assert_eq!(status(GUESSER, CLOUD, "/s/Unkn0wnT0ken123"), 403);
    // No router for anything else: not a link, never sent to /share.
    for path in [
        format!("/share/{}/photos", key("known")),
        format!("/share/{}", &key("known")[1..]),
        "/s/".to_string(),
        "/x/s/abc".to_string(),
    ] {
        assert_eq!(status(GUESSER, PHOTOS, &path), 404, "{path}");
    }
    assert_eq!(status(GUESSER, CLOUD, "/s/short"), 404);
}
